//! [`WgslCompiler`]: the compiler users install. It caches programs by
//! signature, and on a miss runs the graph passes, fusion and lowering to
//! WGSL pipelines. `WGRAD_LOG=compiled` prints the IR before and after the
//! passes, every generated kernel and the reason for every cache miss.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::compiler::fusion::Passes;
use crate::compiler::guard::{CompilerGuard, CompilerInterface, CompilerStats};
use crate::compiler::ir::CapturedGraph;
use crate::compiler::runtime::{Program, ProgramReport};
use crate::compiler::signature::Signature;
use crate::compiler::{dot, fusion, lower, passes};
use crate::device::Device;
use crate::error::Result;

/// The largest number of storage buffers a fused kernel binds (the device
/// may allow fewer; lavapipe allows 32).
const MAX_BINDINGS: usize = 32;

/// Lowers captured backward graphs to fused WGSL compute pipelines and
/// caches them by signature.
///
/// ```
/// # use wgrad::{Device, Tensor, WgslCompiler};
/// # let device = Device::new()?;
/// let _compiled = WgslCompiler::install(&device)?; // every backward is compiled from here on
/// let x = Tensor::from_slice(&[0.5f32, 1.0], [2], &device)?.requires_grad(true)?;
/// x.tanh()?.mul(&x)?.sum_all()?.backward()?;
/// assert!(x.grad().is_some());
/// # Ok::<(), wgrad::Error>(())
/// ```
pub struct WgslCompiler {
    device: Device,
    cache: Mutex<HashMap<Signature, Arc<Program>>>,
    last_signature: Mutex<Option<Signature>>,
    last_miss: Mutex<Option<String>>,
    stats: Mutex<CompilerStats>,
    log: bool,
    passes: Passes,
}

impl WgslCompiler {
    /// A compiler for programs on `device`.
    pub fn new(device: &Device) -> WgslCompiler {
        let log = std::env::var("WGRAD_LOG").is_ok_and(|v| v.split(',').any(|p| p.trim() == "compiled"));
        WgslCompiler {
            device: device.clone(),
            cache: Mutex::new(HashMap::new()),
            last_signature: Mutex::new(None),
            last_miss: Mutex::new(None),
            stats: Mutex::new(CompilerStats::default()),
            log,
            passes: Passes::from_env(),
        }
    }

    /// The compiler with only `passes` of the optional passes (by default
    /// all, less those `WGRAD_PASSES` turns off).
    pub fn with_passes(mut self, passes: Passes) -> WgslCompiler {
        self.passes = passes;
        self
    }

    /// Installs a new compiler for `device`: the one-line way to compile
    /// every backward while the returned guard lives.
    pub fn install(device: &Device) -> Result<CompilerGuard> {
        CompilerGuard::install(WgslCompiler::new(device))
    }

    /// Number of cached programs.
    pub fn cached_programs(&self) -> usize {
        self.cache.lock().len()
    }

    /// Why the most recent cache miss missed, compared with the signature
    /// of the backward before it ("changed shape (...)", "new node (...)",
    /// "changed leaf set (...)", ...).
    pub fn last_miss_reason(&self) -> Option<String> {
        self.last_miss.lock().clone()
    }

    /// The cached programs (in no particular order), to inspect their
    /// kernels and reports.
    pub fn programs(&self) -> Vec<Arc<Program>> {
        self.cache.lock().values().cloned().collect()
    }

    /// Forgets every cached program (and the buffers they hold).
    pub fn clear_cache(&self) {
        self.cache.lock().clear();
    }
}

impl CompilerInterface for WgslCompiler {
    fn device(&self) -> &Device {
        &self.device
    }

    fn lookup(&self, signature: &Signature) -> Option<Arc<Program>> {
        let hit = self.cache.lock().get(signature).cloned();
        let mut stats = self.stats.lock();
        stats.captures += 1;
        if hit.is_some() {
            stats.cache_hits += 1;
        } else {
            stats.cache_misses += 1;
            let reason = match self.last_signature.lock().as_ref() {
                Some(previous) => signature.difference(previous),
                None => "first capture".to_string(),
            };
            if self.log {
                eprintln!("[wgrad compiled] cache miss: {reason}");
            }
            *self.last_miss.lock() = Some(reason);
        }
        *self.last_signature.lock() = Some(signature.clone());
        hit
    }

    fn compile(&self, signature: &Signature, graph: CapturedGraph) -> Result<Arc<Program>> {
        let pipelines_before = self.device.counters().pipelines_created;
        let program = Arc::new(build_program(&self.device, graph, self.log, self.passes)?);
        let ops_fused = program.report().ops_fused;
        let mut stats = self.stats.lock();
        stats.ops_fused += ops_fused as u64;
        stats.pipelines_created += self.device.counters().pipelines_created - pipelines_before;
        drop(stats);
        self.cache.lock().insert(signature.clone(), program.clone());
        Ok(program)
    }

    fn fallback(&self, reason: &str) {
        self.stats.lock().fallbacks += 1;
        if self.log {
            eprintln!("[wgrad compiled] running eagerly: {reason}");
        }
    }

    fn replayed(&self, program: &Program) {
        let mut stats = self.stats.lock();
        stats.replays += 1;
        stats.kernels_last_replay = program.kernel_count() as u64;
    }

    fn stats(&self) -> CompilerStats {
        *self.stats.lock()
    }
}

/// Runs the graph passes, fusion and lowering: the program of a captured
/// graph (a backward's or a whole step's). With `log`, prints the IR
/// before and after the passes and every kernel.
pub(crate) fn build_program(device: &Device, graph: CapturedGraph, log: bool, passes: Passes) -> Result<Program> {
    let ir_before = graph.to_string();
    let (graph, pass_stats) = passes::optimize(graph);
    let direct = device.matmul_template() == crate::exec::codegen::MatmulTemplate::Direct;
    let passes = Passes { epilogues: passes.epilogues && !direct, ..passes };
    let (graph, split) =
        if passes.rows { crate::compiler::rows::split_reductions(graph, passes.min_rows) } else { (graph, 0) };
    let ir_after = graph.to_string();
    let limits = fusion::BindingLimits {
        operands: MAX_BINDINGS,
        buffers: device.max_storage_bindings(),
        dedicated_bytes: device.dedicated_bytes(),
    };
    let (steps, ops_fused) = fusion::schedule(&graph, limits, passes);
    let report = ProgramReport {
        ir_before,
        ir_after,
        ops_fused,
        simplified: pass_stats.simplified,
        merged: pass_stats.merged,
        removed: pass_stats.removed,
        dot: dot::render(&graph, &steps),
        ..ProgramReport::default()
    };
    let program = lower::lower(device, &graph, &steps, report)?;
    if log {
        let r = program.report();
        eprintln!("[wgrad compiled] captured IR:\n{}", r.ir_before);
        eprintln!(
            "[wgrad compiled] after passes ({} reads simplified, {} values merged, {} removed, {split} reductions split into rows):\n{}",
            pass_stats.simplified, pass_stats.merged, pass_stats.removed, r.ir_after
        );
        eprintln!(
            "[wgrad compiled] {} kernels, {} ops fused, intermediates {} B planned ({} B unshared)",
            program.kernel_count(),
            r.ops_fused,
            r.planned_bytes,
            r.unplanned_bytes
        );
        for (i, k) in r.kernels.iter().enumerate() {
            eprintln!("[wgrad compiled] kernel {i}:\n{k}");
        }
    }
    Ok(program)
}
