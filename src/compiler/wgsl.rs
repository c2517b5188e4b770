//! [`WgslCompiler`]: the compiler users install. It caches programs by
//! signature, and on a miss runs the graph passes, fusion and lowering to
//! WGSL pipelines. `WGRAD_LOG=compiled` prints the IR before and after the
//! passes, every generated kernel and the reason for every cache miss.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::compiler::family::Family;
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
    /// Per signature without its numbers, the batch families of the graphs
    /// with such signatures (one per graph but for its numbers): a later
    /// size is fused against the family's first and, once the family is
    /// fitted (at its first size from shadows, or from three traced
    /// sizes), instantiated without tracing.
    families: Mutex<HashMap<String, Vec<Family>>>,
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
            families: Mutex::new(HashMap::new()),
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
        self.families.lock().clear();
    }
}

impl WgslCompiler {
    fn note(&self, message: std::fmt::Arguments) {
        if self.log {
            eprintln!("[wgrad compiled] {message}");
        }
    }

    /// The program of a new size of a fitted batch family, instantiated
    /// without tracing, or `None` (trace it) when the signature is not one
    /// the family predicts or the build fails (logged).
    fn replan(&self, signature: &Signature) -> Option<Arc<Program>> {
        let (key, numbers) = signature.split_numbers();
        let (b, graph, twin) = {
            let families = self.families.lock();
            families.get(&key)?.iter().find_map(|family| {
                let (b, graph) = family.instantiate(&numbers)?;
                Some((b, graph, family.first.clone()))
            })?
        };
        let Some(graph) = graph else {
            self.note(format_args!(
                "batch size {b} of a fitted batch family: traced, its graph {}",
                crate::compiler::batch::DOES_NOT_CARRY_OVER
            ));
            return None;
        };
        self.note(format_args!("batch size {b} of a fitted batch family: re-planned without tracing"));
        match self.build(signature, graph, Some(twin), true) {
            Ok(program) => {
                self.stats.lock().replans += 1;
                Some(program)
            }
            Err(e) => {
                self.note(format_args!("re-planning batch size {b} failed ({e}): traced instead"));
                None
            }
        }
    }

    /// Optimises, fuses and lowers `graph` (fused against `twin`, another
    /// size of it, where given) and caches the program; `new_size`: a
    /// graph compiled before at another size.
    fn build(
        &self,
        signature: &Signature,
        graph: CapturedGraph,
        twin: Option<CapturedGraph>,
        new_size: bool,
    ) -> Result<Arc<Program>> {
        let pipelines_before = self.device.counters().pipelines_created;
        // Row kernels for any number of rows, at the first size too: the
        // rows grow with the batch, and a first size under `MIN_ROWS`
        // lowered without them gave its later sizes other kernels (W1 at
        // batch 10 then 20: 2 new pipelines). A compiled step's batch
        // families are lowered so too.
        let passes = Passes { min_rows: 1, ..self.passes };
        let program = Arc::new(build_program(&self.device, graph, twin, self.log, passes)?);
        let ops_fused = program.report().ops_fused;
        let mut stats = self.stats.lock();
        stats.ops_fused += ops_fused as u64;
        stats.new_sizes += u64::from(new_size);
        stats.pipelines_created += self.device.counters().pipelines_created - pipelines_before;
        drop(stats);
        self.cache.lock().insert(signature.clone(), program.clone());
        Ok(program)
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
        drop(stats);
        hit.or_else(|| self.replan(signature))
    }

    fn compile(&self, signature: &Signature, graph: CapturedGraph) -> Result<Arc<Program>> {
        // A graph compiled before at another batch size (the same graph but
        // for its numbers) is fused against that size, making only the
        // choices that hold at both: the same kernels at every size. (A
        // first size is fused against its twin one size up where its
        // family was fitted from shadows, `compile_with_sizes`, and for
        // itself alone otherwise.)
        let (key, numbers) = signature.split_numbers();
        let twin = {
            let mut families = self.families.lock();
            // Graphs whose signatures differ only in numbers (a batch of
            // 1, where a broadcast dim takes other paths; another hook
            // count) are families of their own under one key.
            let list = families.entry(key).or_default();
            match list.iter_mut().find(|f| crate::compiler::batch::same_but_numbers(&f.first, &graph)) {
                Some(family) => {
                    if family.mispredicts(&numbers) {
                        self.note(format_args!(
                            "the batch family fitted at its first size from shadows did not predict this size: \
                             taken back, sizes are traced and fitted"
                        ));
                        family.forget_guess();
                    }
                    let twin = family.first.clone();
                    if let Some(sizes) = family.observe(numbers, graph.clone()) {
                        self.note(format_args!("batch family fitted at sizes {sizes:?}: later sizes are not traced"));
                    } else if let Some(reason) = &family.unfit {
                        self.note(format_args!("batch family not fitted ({reason}): every size is traced"));
                    }
                    Some(twin)
                }
                None => {
                    list.push(Family::new(numbers, graph.clone()));
                    None
                }
            }
        };
        if twin.is_some() {
            self.note(format_args!("a graph compiled before at other sizes: fused as those sizes are"));
        }
        let new_size = twin.is_some();
        self.build(signature, graph, twin, new_size)
    }

    /// At a graph's first size, fits its batch family from the traced size
    /// and its shadows at two smaller sizes (`autograd::shadow`), so that
    /// no later size is traced where the fit predicts it, and fuses the
    /// first size against the graph one size up, as every later size is.
    fn compile_with_sizes(
        &self,
        signature: &Signature,
        graph: CapturedGraph,
        smaller: &mut dyn FnMut() -> Vec<(Signature, CapturedGraph)>,
    ) -> Result<Arc<Program>> {
        let (key, numbers) = signature.split_numbers();
        let known = self
            .families
            .lock()
            .get(&key)
            .is_some_and(|list| list.iter().any(|f| crate::compiler::batch::same_but_numbers(&f.first, &graph)));
        if known {
            return self.compile(signature, graph);
        }
        let mut shadows = Vec::new();
        let started = std::time::Instant::now();
        let made = smaller();
        let shadow_ms = started.elapsed().as_secs_f64() * 1e3;
        for (s, g) in made {
            let (k, n) = s.split_numbers();
            if k != key || !crate::compiler::batch::same_but_numbers(&graph, &g) {
                self.note(format_args!("a shadow at a smaller batch size is another graph: not fitted"));
                shadows.clear();
                break;
            }
            shadows.push((n, g));
        }
        let (family, twin) = match Family::from_shadows(numbers.clone(), graph.clone(), shadows) {
            Ok((family, sizes)) => {
                self.note(format_args!(
                    "batch family fitted at its first size from shadows at sizes {sizes:?} (made and traced in \
                     {shadow_ms:.1} ms): later sizes it predicts are not traced"
                ));
                self.stats.lock().shadow_fits += 1;
                let twin = family.twin(sizes[0]);
                (family, twin)
            }
            Err(reason) => {
                self.note(format_args!("no batch family fitted at the first size ({reason}; {shadow_ms:.1} ms)"));
                (Family::new(numbers, graph.clone()), None)
            }
        };
        self.families.lock().entry(key).or_default().push(family);
        self.build(signature, graph, twin, false)
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
///
/// `twin` is the same graph at another batch size, for a program that is
/// one of a family of batch sizes: fusion then makes only the choices that
/// hold at both sizes, so every size of the family gets the same kernels
/// (see `fusion::schedule`). A twin whose passes end in another graph is
/// not used (logged).
pub(crate) fn build_program(
    device: &Device,
    graph: CapturedGraph,
    twin: Option<CapturedGraph>,
    log: bool,
    passes: Passes,
) -> Result<Program> {
    let started = std::time::Instant::now();
    let ir_before = graph.to_string();
    let direct = device.matmul_template() == crate::exec::codegen::MatmulTemplate::Direct;
    let passes = Passes { epilogues: passes.epilogues && !direct, ..passes };
    let optimize = |graph: CapturedGraph| {
        let (graph, pass_stats) = passes::optimize(graph);
        let (graph, split) =
            if passes.rows { crate::compiler::rows::split_reductions(graph, passes.min_rows) } else { (graph, 0) };
        (graph, pass_stats, split)
    };
    let (graph, pass_stats, split) = optimize(graph);
    let twin = twin.map(|t| optimize(t).0).filter(|t| {
        let same = crate::compiler::batch::same_but_numbers(&graph, t);
        if !same && log {
            eprintln!(
                "[wgrad compiled] the passes give another graph at the twin batch size: fused for this size only"
            );
        }
        same
    });
    let ir_after = graph.to_string();
    let limits = fusion::BindingLimits {
        operands: MAX_BINDINGS,
        buffers: device.max_storage_bindings(),
        dedicated_bytes: device.dedicated_bytes(),
    };
    let passes_done = started.elapsed();
    let (mut steps, ops_fused) = fusion::schedule(&graph, twin.as_ref(), limits, passes);
    let row_loops_saved = if passes.row_sums { crate::compiler::row_sums::distribute(&mut steps) } else { 0 };
    let pass_lines = if log { pass_lines(&steps, row_loops_saved) } else { Vec::new() };
    let fused = started.elapsed();
    let report = ProgramReport {
        ir_before,
        ir_after,
        ops_fused,
        simplified: pass_stats.simplified,
        merged: pass_stats.merged,
        removed: pass_stats.removed,
        row_loops_saved,
        dot: dot::render(&graph, &steps),
        ..ProgramReport::default()
    };
    let program = lower::lower(device, &graph, twin.as_ref(), &steps, report)?;
    if log {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "[wgrad compiled] passes {:.2} ms, fusion {:.2} ms, lowering {:.2} ms",
            ms(passes_done),
            ms(fused - passes_done),
            ms(started.elapsed() - fused)
        );
        let r = program.report();
        eprintln!("[wgrad compiled] captured IR:\n{}", r.ir_before);
        eprintln!(
            "[wgrad compiled] after passes ({} reads simplified, {} values merged, {} removed, {split} reductions split into rows):\n{}",
            pass_stats.simplified, pass_stats.merged, pass_stats.removed, r.ir_after
        );
        eprintln!(
            "[wgrad compiled] {} kernels, {} ops fused, {} loops over rows saved by distributing row sums, intermediates {} B planned ({} B unshared)",
            program.kernel_count(),
            r.ops_fused,
            r.row_loops_saved,
            r.planned_bytes,
            r.unplanned_bytes
        );
        for line in &pass_lines {
            eprintln!("[wgrad compiled] {line}");
        }
        eprintln!(
            "[wgrad compiled] memory plan: the program holds {} B at most, the liveness bound is {} B ({:.2}x)",
            r.program_bytes,
            r.liveness_bound_bytes,
            r.program_bytes as f64 / r.liveness_bound_bytes.max(1) as f64
        );
        for (i, k) in r.kernels.iter().enumerate() {
            eprintln!("[wgrad compiled] kernel {i}:\n{k}");
        }
    }
    Ok(program)
}

/// One log line per fusion pass: what each did to this program (the
/// passes themselves are in `fusion`, `rows` and `row_sums`).
fn pass_lines(steps: &[fusion::Step], row_loops_saved: usize) -> Vec<String> {
    use fusion::Step;
    let rows: Vec<usize> =
        steps.iter().filter_map(|s| if let Step::Rows { passes, .. } = s { Some(*passes) } else { None }).collect();
    // A value computed inside more than one kernel is recomputed where it
    // is read instead of stored (rematerialized).
    let mut computed_in: std::collections::HashMap<crate::compiler::ValueId, usize> = Default::default();
    for s in steps {
        for &v in s.inlined() {
            *computed_in.entry(v).or_default() += 1;
        }
    }
    let recomputed = computed_in.values().filter(|&&n| n > 1).count();
    let side_stores: usize =
        steps.iter().map(|s| if let Step::Reduce { stores, .. } = s { stores.len() } else { 0 }).sum();
    let siblings: usize =
        steps.iter().map(|s| if let Step::Reduce { siblings, .. } = s { siblings.len() } else { 0 }).sum();
    let epilogue_outputs: usize =
        steps.iter().map(|s| if let Step::Matmul { stores, .. } = s { stores.len() } else { 0 }).sum();
    vec![
        format!("row kernels: {} (loops over each row: {rows:?})", rows.len()),
        format!("row sums distributed over per-row factors: {row_loops_saved} loops over rows saved"),
        format!("rematerialization: {recomputed} values recomputed where they are read instead of stored"),
        format!("reductions storing what they walk: {side_stores} values stored, {siblings} sibling sums folded in"),
        format!("matmul epilogues: {epilogue_outputs} more outputs stored beside products (activations, updates)"),
    ]
}
