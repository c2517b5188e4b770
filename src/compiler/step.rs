//! Whole-step compilation: [`compile_step`] wraps a training step (forward,
//! loss, `backward()`, optimizer `step()`, `zero_grad()`) and replays it as
//! one program. The first call with a new signature runs the closure under
//! a step trace: forward ops, the backward walk and the optimizer update
//! all become IR values; tensors that live in buffers (the arguments,
//! parameters, optimizer state, old `.grad`s) become program inputs; what
//! the step changes (`.grad`s, parameters and states updated in place) is
//! recorded as effects and put back. The program then runs for that call
//! too, and later calls with the same signature only replay it.
//!
//! What a trace cannot see reaches the program as data: the optimizer's
//! learning rate and bias corrections, `nn::Dropout`'s seeds and the gather
//! maps of indices passed in as arguments are host inputs computed at every
//! call (so `set_lr` needs no re-trace, and new indices give new maps), and
//! labels and indices that eager mode checks on the host are checked again
//! on every call's. What a replay cannot do (a readback, a hook, an index
//! map of indices computed inside the step, `set_lr` inside the step) is a
//! graph break: that call, and later calls with its signature, run the
//! closure eagerly, and the reason is counted and logged.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::alloc::PooledBuffer;
use crate::autograd::LeafState;
use crate::compiler::ValueId;
use crate::compiler::batch::BatchModel;
use crate::compiler::ir::{CapturedGraph, OutputRole};
use crate::compiler::runtime::Program;
use crate::compiler::trace::{self, ArgCheck, Commit, GradGuard, HostValues, Source, StepState, TraceScope};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::metadata::{DType, Shape};
use crate::tensor::{Storage, Tensor};

/// Counts of what a [`CompiledStep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Calls of [`CompiledStep::call`].
    pub calls: u64,
    /// Calls that traced the step (a new signature).
    pub traces: u64,
    /// Calls that ran a program (the tracing calls included).
    pub replays: u64,
    /// Traces that met something a program cannot replay.
    pub graph_breaks: u64,
    /// Calls that ran the closure eagerly: after a graph break, because a
    /// replay could not run, because an argument requires grad, or because
    /// the signature's programs no longer match and it traces no more
    /// (the retrace limit; [`CompiledStep::last_graph_break`] says why).
    pub eager_calls: u64,
    /// Kernels the last replay dispatched.
    pub kernels_last_replay: u64,
    /// Calls with a new batch size that instantiated a traced step's
    /// graph at that size and lowered it, without running the closure
    /// (see [`compile_step`]).
    pub replans: u64,
    /// Replans whose kernels differ from those of the size the step was
    /// traced at: the new size is across the boundary of a kernel choice
    /// that depends on sizes (four-wide kernels from 4,096 elements, a
    /// column reduction's four results, a chunked reduction's passes), so
    /// it may create pipelines; `WGRAD_LOG=compiled` says how many kernels
    /// differ. Sizes on the same side of every boundary share kernels.
    pub replans_across_boundaries: u64,
}

/// What becomes of a `.grad` the step changed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GradEffect {
    /// Cleared (`zero_grad()` and no backward after it).
    Clear,
    /// The program's output `k` (in output order).
    Output(usize),
}

/// A step program's outputs, in order, with what each becomes.
type Outputs = Vec<(ValueId, OutputRole)>;

/// What each changed `.grad` becomes after a replay.
type GradEffects = Vec<(Arc<LeafState>, GradEffect)>;

/// A returned tensor: a program output (every returned tensor is one, so
/// an argument or a `.grad` returned is this call's, not the trace's).
#[derive(Clone)]
enum Returned {
    Output(usize),
}

/// The arguments' dtype and view, which of them share a buffer (each with
/// the first argument on its buffer: a trace reads one buffer as one
/// input), and grad mode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ArgKey {
    args: Vec<(DType, Layout, usize)>,
    grad_mode: bool,
}

impl ArgKey {
    fn of(args: &[Tensor]) -> ArgKey {
        let first = |i: usize| (0..i).find(|&j| args[j].shares_storage(&args[i])).unwrap_or(i);
        ArgKey {
            args: args.iter().enumerate().map(|(i, a)| (a.dtype(), a.layout().clone(), first(i))).collect(),
            grad_mode: crate::is_grad_enabled(),
        }
    }
}

/// A traced step: its program and how a call binds it and applies it.
struct Entry {
    key: ArgKey,
    /// `.grad`s the trace read before changing them, as they were.
    guards: Vec<GradGuard>,
    sources: Vec<Source>,
    /// How to compute each host input, and its dtype.
    host: Arc<Vec<(HostValues, DType)>>,
    /// Each host input's length at this entry's batch size (a batch
    /// family's entries share `host` and differ here).
    host_sizes: Vec<usize>,
    /// Program-owned buffers of the host inputs, made on the first replay.
    host_buffers: Mutex<Vec<Arc<PooledBuffer>>>,
    commits: Arc<Vec<Commit>>,
    checks: Vec<(usize, Option<usize>, ArgCheck)>,
    grads: GradEffects,
    /// Tensors updated in place, with the input slot of each.
    assigned: Vec<(Tensor, usize)>,
    returns: Vec<Returned>,
    program: Program,
    /// The captured IR and where its inputs come from, for `debug_retrace`.
    fingerprint: String,
    /// The step as a function of its batch size, when it is one.
    batch: Option<Arc<BatchFamily>>,
    /// Per input slot, the elements its reads span from its allocation's
    /// start: a step lowered at a larger batch size may read further into
    /// a tensor that did not grow (a table sliced by the batch size), so
    /// every call checks its inputs hold that much.
    extents: Vec<usize>,
}

/// A traced step's graph as a function of the batch size, and which
/// arguments carry the batch (their leading dim).
struct BatchFamily {
    model: BatchModel,
    args: Vec<bool>,
    uploads: std::collections::HashMap<usize, u64>,
    /// The passes every size is lowered with: the same kernel choices at
    /// every size where they do not depend on it. (A row kernel is made
    /// for any number of rows, as the rows grow with the batch.)
    passes: crate::compiler::Passes,
}

impl BatchFamily {
    /// The graph at batch size `b + 1`: what the program at `b` is fused
    /// against, so that every size gets the same kernels.
    fn twin(&self, b: usize) -> Option<CapturedGraph> {
        self.model.at(b + 1)
    }
}

impl Entry {
    /// The batch size of a call with arguments `key` whose batch this
    /// entry can change: the same arguments but for the leading dim of
    /// the batch arguments, which they share.
    fn batch_size_of(&self, key: &ArgKey) -> Option<usize> {
        let family = self.batch.as_ref()?;
        if key.grad_mode != self.key.grad_mode || key.args.len() != self.key.args.len() {
            return None;
        }
        let mut batch = None;
        for ((new, old), &is_batch) in key.args.iter().zip(&self.key.args).zip(&family.args) {
            let (dims, old_dims) = (new.1.shape.dims(), old.1.shape.dims());
            let same_view =
                new.0 == old.0 && new.2 == old.2 && new.1.strides == old.1.strides && new.1.offset == old.1.offset;
            if !same_view || dims.len() != old_dims.len() || dims.get(1..) != old_dims.get(1..) {
                return None;
            }
            match (is_batch, dims.first()) {
                (true, Some(&b)) if batch.is_none_or(|x| x == b) => batch = Some(b),
                (false, _) if dims == old_dims => {}
                _ => return None,
            }
        }
        batch
    }

    /// This entry's step at batch size `b`: its graph instantiated at `b`
    /// and lowered (no trace), for arguments `key`.
    fn at_batch(&self, b: usize, key: ArgKey, device: &Device, log: bool) -> Result<Option<Entry>> {
        let family = self.batch.as_ref().expect("a batch family");
        let Some(graph) = family.model.at(b) else { return Ok(None) };
        let mut host_sizes = self.host_sizes.clone();
        for v in &graph.values {
            if let crate::compiler::ir::IrOp::Input { slot } = v.op
                && let Source::Host(k) = self.sources[slot]
            {
                host_sizes[k] = v.meta.shape.numel();
            }
        }
        let fingerprint = fingerprint(&graph, &self.sources, &family.uploads);
        let extents = input_extents(&graph);
        let program = crate::compiler::wgsl::build_program(device, graph, family.twin(b), log, family.passes)?;
        Ok(Some(Entry {
            key,
            guards: self.guards.clone(),
            sources: self.sources.clone(),
            host: self.host.clone(),
            host_sizes,
            host_buffers: Mutex::new(Vec::new()),
            commits: self.commits.clone(),
            checks: self.checks.clone(),
            grads: self.grads.clone(),
            assigned: self.assigned.clone(),
            returns: self.returns.clone(),
            program,
            fingerprint,
            batch: self.batch.clone(),
            extents,
        }))
    }

    /// Whether this call's state matches what the trace saw.
    fn guards_pass(&self) -> bool {
        let grads_as_seen = self.guards.iter().all(|(leaf, seen)| {
            let now = leaf.grad.lock().as_ref().map(|g| (g.dtype(), g.layout().clone()));
            now == *seen
        });
        // A hook registered since the trace (on a parameter, between
        // calls) would not run in a replay: the step traces again, and the
        // hook breaks that trace, so the call runs eagerly with it. (Hooks
        // present at the trace broke it already.) Only on leaves the step
        // gives a new `.grad`: a hook on a leaf it merely clears breaks no
        // trace, and every call would trace again.
        let no_new_hooks = self.grads.iter().all(|(leaf, effect)| {
            matches!(effect, GradEffect::Clear) || (leaf.hooks.lock().is_empty() && leaf.post_hooks.lock().is_empty())
        });
        grads_as_seen && no_new_hooks
    }
}

/// The most programs a step traces for one argument signature whose
/// guards failed (see [`CompiledStep::call`]); past it, a call that no
/// program matches runs eagerly.
const RETRACE_LIMIT: usize = 8;

/// A training step compiled as one program. See [`compile_step`].
pub struct CompiledStep<F> {
    device: Device,
    f: F,
    cache: Vec<Entry>,
    /// Signatures whose trace broke, with the reason: run eagerly.
    broken: Vec<(ArgKey, String)>,
    stats: StepStats,
    last_break: Option<String>,
    debug_retrace: bool,
    last_difference: Option<String>,
    log: bool,
    passes: crate::compiler::Passes,
}

/// Compiles the training step `f` (forward, loss, `backward()`, optimizer
/// `step()`, `zero_grad()`) into one program per signature, replayed on
/// every call: one submit, no tracing, no WGSL, no new pipeline or buffer.
///
/// The program's inputs are the call's arguments plus every tensor the
/// step reads that existed before the call (parameters, optimizer state,
/// constants, `.grad`s); its effects (`.grad`s, parameters and optimizer
/// state updated in place) are applied as eager mode applies them, and it
/// returns what `f` returns (as values: they record no autograd graph).
///
/// A replay does not run `f`: Rust state `f` reads or changes is not part
/// of the program. The optimizer's learning rate and step counts are read
/// at every call ([`crate::Optimizer::set_lr`] needs no re-trace); other
/// host values `f` uses are baked in when it is traced, and tensors `f`
/// captures are bound by identity — replace a parameter and the program
/// keeps using the old one. [`CompiledStep::set_debug_retrace`] traces
/// every call again and reports any difference the signature missed.
///
/// ```
/// # use wgrad::{Device, Tensor, Sgd, Optimizer, compile_step};
/// # let device = Device::new()?;
/// let w = Tensor::from_slice(&[1.0f32, -2.0], [2], &device)?.requires_grad(true)?;
/// let mut opt = Sgd::new(&[w.clone()], 0.25, 0.0, 0.0)?;
/// let w2 = w.clone();
/// let mut step = compile_step(&device, move |args: &[Tensor]| {
///     let loss = w2.mul(&args[0])?.square()?.sum_all()?;
///     opt.zero_grad();
///     loss.backward()?;
///     opt.step()?;
///     Ok(vec![loss])
/// });
/// let x = Tensor::from_slice(&[1.0f32, 1.0], [2], &device)?;
/// for _ in 0..3 {
///     step.call(&[x.clone()])?;
/// }
/// assert_eq!(step.stats().traces, 1);
/// assert_eq!(step.stats().replays, 3);
/// assert_eq!(w.to_vec::<f32>()?, vec![0.125, -0.25]); // each step halves w
/// # Ok::<(), wgrad::Error>(())
/// ```
pub fn compile_step<F>(device: &Device, f: F) -> CompiledStep<F>
where
    F: FnMut(&[Tensor]) -> Result<Vec<Tensor>>,
{
    let log = std::env::var("WGRAD_LOG").is_ok_and(|v| v.split(',').any(|p| p.trim() == "compiled"));
    CompiledStep {
        device: device.clone(),
        f,
        cache: Vec::new(),
        broken: Vec::new(),
        stats: StepStats::default(),
        last_break: None,
        debug_retrace: false,
        last_difference: None,
        log,
        passes: crate::compiler::Passes::from_env(),
    }
}

impl<F> CompiledStep<F>
where
    F: FnMut(&[Tensor]) -> Result<Vec<Tensor>>,
{
    /// The step compiled with only `passes` of the optional passes (by
    /// default all, less those `WGRAD_PASSES` turns off); forgets the
    /// programs compiled so far.
    pub fn with_passes(mut self, passes: crate::compiler::Passes) -> Self {
        self.passes = passes;
        self.cache.clear();
        self
    }

    /// Runs one step on `args`: replays its program, tracing it first if
    /// this signature is new. On an `Err` found before the program is
    /// recorded, parameters, optimizer state and `.grad`s are as before.
    ///
    /// A program is replayed only while the `.grad`s it read are as they
    /// were when it was traced; otherwise the step traces again. After 8
    /// programs of one argument signature (state that changes every call)
    /// it traces no more: a call that matches one of them replays it, any
    /// other runs eagerly.
    pub fn call(&mut self, args: &[Tensor]) -> Result<Vec<Tensor>> {
        self.stats.calls += 1;
        if let Some(a) = args.iter().find(|a| a.device() != &self.device) {
            return Err(Error::DeviceMismatch {
                op: "CompiledStep::call",
                lhs: self.device.id(),
                rhs: a.device().id(),
            });
        }
        if args.iter().any(|a| a.traced_value().is_some()) {
            return Err(Error::InvalidArgument {
                op: "CompiledStep::call",
                message: "an argument belongs to a trace; call a compiled step with tensors that hold data".into(),
            });
        }
        if trace::is_active() {
            return Err(Error::InvalidArgument {
                op: "CompiledStep::call",
                message: "called inside a trace (a compiled step inside a compiled step or a hook)".into(),
            });
        }
        if args.iter().any(Tensor::needs_grad) {
            return self.eager(args, "an argument requires grad (its .grad would change per call)");
        }
        let key = ArgKey::of(args);
        if let Some((_, reason)) = self.broken.iter().find(|(k, _)| *k == key) {
            let reason = reason.clone();
            return self.eager(args, &reason);
        }
        let hit = self.cache.iter().position(|e| e.key == key && e.guards_pass());
        let index = match hit {
            Some(i) if !self.debug_retrace => i,
            None if !self.debug_retrace
                && let Some(i) = self.replan(&key)? =>
            {
                i
            }
            None if self.cache.iter().filter(|e| e.key == key).count() >= RETRACE_LIMIT => {
                // Every program of this signature failed its guards: the
                // state they depend on changes from call to call. Trace no
                // more of it; a call whose state a program was traced with
                // still replays, any other runs eagerly (PyTorch's
                // recompile limit, in its run-only mode).
                let reason = format!(
                    "{RETRACE_LIMIT} programs of one argument signature each found the state it was traced with \
                     changed on a later call (a .grad the step reads appears, disappears, or changes its shape \
                     or view, or a hook was registered since); no more are traced, and calls that match none \
                     run eagerly"
                );
                self.last_break = Some(reason.clone());
                return self.eager(args, &reason);
            }
            hit => match self.trace(args, key)? {
                Traced::Broke => return self.run_eagerly(args),
                Traced::Entry(entry) => self.keep(hit, *entry),
            },
        };
        self.replay(index, args)
    }

    /// Counts of traces, replays and graph breaks.
    pub fn stats(&self) -> StepStats {
        self.stats
    }

    /// Why the last graph break happened (the op and the reason), or why
    /// the step stopped tracing a signature (the retrace limit).
    pub fn last_graph_break(&self) -> Option<&str> {
        self.last_break.as_deref()
    }

    /// Traces every call again and compares the new program with the
    /// cached one; a difference the signature missed (a host value baked
    /// in, a replaced tensor) is reported by
    /// [`CompiledStep::last_difference`] and the new program is used.
    pub fn set_debug_retrace(&mut self, on: bool) {
        self.debug_retrace = on;
    }

    /// The last difference `debug_retrace` found between a cached program
    /// and a new trace of the same signature.
    pub fn last_difference(&self) -> Option<&str> {
        self.last_difference.as_deref()
    }

    /// Kernels per replay of the most recent program.
    pub fn kernel_count(&self) -> Option<usize> {
        self.cache.last().map(|e| e.program.kernel_count())
    }

    /// The report of each cached program (IR, kernels, DOT).
    pub fn reports(&self) -> Vec<&crate::compiler::ProgramReport> {
        self.cache.iter().map(|e| e.program.report()).collect()
    }

    fn eager(&mut self, args: &[Tensor], reason: &str) -> Result<Vec<Tensor>> {
        if self.log {
            eprintln!("[wgrad compiled] step runs eagerly: {reason}");
        }
        self.run_eagerly(args)
    }

    fn run_eagerly(&mut self, args: &[Tensor]) -> Result<Vec<Tensor>> {
        self.stats.eager_calls += 1;
        (self.f)(args)
    }

    /// A cached step at this call's batch size, made from an entry traced
    /// at another (instantiated and lowered, not traced), added to the
    /// cache; `None` when no entry's batch family covers the call.
    fn replan(&mut self, key: &ArgKey) -> Result<Option<usize>> {
        let found = self.cache.iter().find_map(|e| {
            let b = e.batch_size_of(key).filter(|&b| b >= 2)?;
            e.guards_pass().then_some((e, b))
        });
        let Some((base, b)) = found else { return Ok(None) };
        let traced_at = base.batch.as_ref().map_or(0, |f| f.model.base());
        let Some(entry) = base.at_batch(b, key.clone(), &self.device, self.log)? else {
            if self.log {
                eprintln!(
                    "[wgrad compiled] batch size {b}: the step traced at batch size {traced_at} {}; tracing",
                    crate::compiler::batch::DOES_NOT_CARRY_OVER
                );
            }
            return Ok(None);
        };
        // Kernel choices that depend on sizes (four-wide kernels from 4,096
        // elements, chunked reductions' passes) may differ here.
        let (was, now) = (&base.program.report().kernels, &entry.program.report().kernels);
        let differing = was.iter().zip(now).filter(|(a, b)| a != b).count();
        if differing > 0 || was.len() != now.len() {
            self.stats.replans_across_boundaries += 1;
        }
        if self.log {
            let changed = match was.len() == now.len() {
                true => format!("{differing} of {} kernels differ", now.len()),
                false => format!("{} kernels instead of {}", now.len(), was.len()),
            };
            eprintln!(
                "[wgrad compiled] batch size {b}: the step traced at batch size {traced_at}, lowered at {b} (no \
                 trace); {changed} from the traced size's"
            );
        }
        self.stats.replans += 1;
        self.cache.push(entry);
        Ok(Some(self.cache.len() - 1))
    }

    /// Keeps a new entry: in place of the one it re-traced, or added.
    fn keep(&mut self, replaced: Option<usize>, entry: Entry) -> usize {
        match replaced {
            Some(i) => {
                if self.cache[i].fingerprint != entry.fingerprint {
                    let message = format!(
                        "a new trace of a cached signature differs (a host value baked in, or a tensor replaced):\n\
                         cached:\n{}\nnew:\n{}",
                        self.cache[i].fingerprint, entry.fingerprint
                    );
                    if self.log {
                        eprintln!("[wgrad compiled] {message}");
                    }
                    self.last_difference = Some(message);
                }
                self.cache[i] = entry;
                i
            }
            None => {
                self.cache.push(entry);
                self.cache.len() - 1
            }
        }
    }

    /// Runs `f` under a step trace and lowers what it did to a program.
    fn trace(&mut self, args: &[Tensor], key: ArgKey) -> Result<Traced> {
        self.stats.traces += 1;
        if self.log {
            let reason = if self.cache.iter().any(|e| e.key == key) {
                "a .grad the step reads changed (exists, its shape or view), or a hook was registered since"
            } else {
                "new argument signature"
            };
            eprintln!("[wgrad compiled] tracing the step: {reason}");
        }
        // The smaller batch sizes first, so that the closure's last run
        // (whose Rust-side effects stay) is on this call's arguments.
        let smaller = self.smaller_batches(args);
        let c = match capture(&mut self.f, &self.device, args)? {
            Captured::Broke(reason) => return Ok(self.broke(key, reason)),
            Captured::Step(c) => *c,
        };
        if let Some(reason) = c.aliased {
            return Ok(self.broke(key, reason.to_string()));
        }
        if self.log {
            let in_place = c.graph.outputs.iter().filter(|(_, r)| matches!(r, OutputRole::Assign(_))).count();
            eprintln!(
                "[wgrad compiled] step: {} inputs ({} arguments, {} host inputs), effects: {} .grad(s) set, {} \
                 tensor(s) updated in place, {} label check(s) per call; inputs:\n{}",
                c.sources.len(),
                c.sources.iter().filter(|s| matches!(s, Source::Arg(_))).count(),
                c.sources.iter().filter(|s| matches!(s, Source::Host(_))).count(),
                c.grads.len(),
                in_place,
                c.checks.len(),
                c.fingerprint.lines().filter(|l| l.starts_with("input ")).collect::<Vec<_>>().join("\n")
            );
        }
        let batch = smaller.and_then(|s| self.batch_family(s, &c));
        let passes = batch.as_ref().map_or(self.passes, |f| f.passes);
        let (host, host_sizes) = c.host.into_iter().map(|(values, n, dtype)| ((values, dtype), n)).unzip();
        let extents = input_extents(&c.graph);
        let twin = batch.as_ref().and_then(|f| f.twin(f.model.base()));
        let program = crate::compiler::wgsl::build_program(&self.device, c.graph, twin, self.log, passes)?;
        // A leaf nothing but the trace held once the closure returned
        // (FGSM's perturbed input, made anew every call) is gone: the
        // program neither guards nor sets it (before, the `.grad` the last
        // replay set failed its guard, so every call traced again and
        // cached one more program). A leaf the closure made and kept (in a
        // field; a parameter a module makes on first use) is guarded and
        // set as any other, so what it holds is this call's. Every leaf
        // weakly first, then kept where something else holds it.
        let guards: Vec<_> = c.guards.into_iter().map(|(leaf, seen)| (Arc::downgrade(&leaf), seen)).collect();
        let grads: Vec<_> = c.grads.into_iter().map(|(leaf, effect)| (Arc::downgrade(&leaf), effect)).collect();
        let entry = Entry {
            key,
            guards: guards.into_iter().filter_map(|(leaf, seen)| Some((leaf.upgrade()?, seen))).collect(),
            sources: c.sources,
            host: Arc::new(host),
            host_sizes,
            host_buffers: Mutex::new(Vec::new()),
            commits: Arc::new(c.commits),
            checks: c.checks,
            grads: grads.into_iter().filter_map(|(leaf, effect)| Some((leaf.upgrade()?, effect))).collect(),
            assigned: c.assigned,
            returns: c.returns,
            program,
            fingerprint: c.fingerprint,
            batch,
            extents,
        };
        Ok(Traced::Entry(Box::new(entry)))
    }

    /// The step traced at batch sizes two and one smaller than this call's
    /// (the batch arguments narrowed to their first rows), for
    /// [`CompiledStep::batch_family`]; `None` (logged) when the call has no
    /// batch of 3 or more, or a smaller trace fails or breaks. The batch
    /// size is the leading dim of the first argument that has one; every
    /// argument with that leading dim carries the batch.
    fn smaller_batches(&mut self, args: &[Tensor]) -> Option<Smaller> {
        let b = *args.iter().find_map(|a| a.dims().first())?;
        let is_batch: Vec<bool> = args.iter().map(|a| a.dims().first() == Some(&b)).collect();
        if b < 3 {
            return None;
        }
        let mut captures = Vec::new();
        for smaller in [b - 2, b - 1] {
            let narrowed: Result<Vec<Tensor>> = args
                .iter()
                .zip(&is_batch)
                .map(|(a, &t)| if t { a.narrow(0, 0, smaller) } else { Ok(a.clone()) })
                .collect();
            match narrowed.and_then(|n| capture(&mut self.f, &self.device, &n)) {
                Ok(Captured::Step(c)) => captures.push(*c),
                Ok(Captured::Broke(reason)) => return self.not_batched(format!("at batch size {smaller}: {reason}")),
                Err(e) => return self.not_batched(format!("at batch size {smaller}: {e}")),
            }
        }
        let [two, one] = <[Capture; 2]>::try_from(captures).ok()?;
        Some(Smaller { b, is_batch, one, two })
    }

    fn not_batched<T>(&self, reason: String) -> Option<T> {
        if self.log {
            eprintln!("[wgrad compiled] the step is not batch-polymorphic ({reason}): a new batch size traces again");
        }
        None
    }

    /// The step as a function of the batch size ([`BatchModel`]), from
    /// this call's trace and the smaller ones, or `None` (logged) when the
    /// traces do not fit one.
    fn batch_family(&self, smaller: Smaller, first: &Capture) -> Option<Arc<BatchFamily>> {
        let Smaller { b, is_batch, one, two } = smaller;
        if first.arg_maps {
            // Its bounds and strides are the traced sizes' (a gather whose
            // indices are an argument).
            return self.not_batched("a gather map built from an argument's indices".into());
        }
        if first.clamped || one.clamped || two.clamped {
            // `x[-64:]` on 32 rows starts at 0 at 32, 31 and 30, and at 36
            // on 100 rows: a clamp fits as a constant.
            return self.not_batched("a slice clamped to the bounds of a dim".into());
        }
        if first.prefix_checks || one.prefix_checks || two.prefix_checks {
            return self.not_batched("labels or indices checked through a prefix of an argument".into());
        }
        for (size, c) in [(b - 1, &one), (b - 2, &two)] {
            if let Some(what) = first.differs(c) {
                return self.not_batched(format!("at batch size {size} the step {what}"));
            }
        }
        match BatchModel::fit([&first.graph, &one.graph, &two.graph], b) {
            Ok(model) => {
                let passes = crate::compiler::Passes { min_rows: 1, ..self.passes };
                Some(Arc::new(BatchFamily { model, args: is_batch, uploads: first.uploads.clone(), passes }))
            }
            Err(reason) => self.not_batched(reason),
        }
    }

    /// Records a graph break of signature `key`: it runs eagerly from now on.
    fn broke(&mut self, key: ArgKey, reason: String) -> Traced {
        if self.log {
            eprintln!("[wgrad compiled] graph break: {reason}; this signature runs eagerly");
        }
        self.stats.graph_breaks += 1;
        self.last_break = Some(reason.clone());
        self.broken.push((key, reason));
        Traced::Broke
    }

    /// Replays entry `index` on `args` and applies its effects.
    fn replay(&mut self, index: usize, args: &[Tensor]) -> Result<Vec<Tensor>> {
        let entry = &self.cache[index];
        for (i, prefix, check) in &entry.checks {
            let values = args[*i].int_values("CompiledStep::call", "labels are i32 or u32")?;
            check(&values[..prefix.unwrap_or(values.len()).min(values.len())])?;
        }
        let mut host_buffers = entry.host_buffers.lock();
        if host_buffers.is_empty() {
            *host_buffers = entry
                .host
                .iter()
                .zip(&entry.host_sizes)
                .map(|((_, dtype), n)| self.device.alloc(4 * *n as u64, *dtype))
                .collect::<Result<_>>()?;
        }
        let mut inputs = Vec::with_capacity(entry.sources.len());
        for source in &entry.sources {
            inputs.push(match source {
                Source::Arg(i) => args[*i].clone(),
                Source::State(t) => t.clone(),
                Source::Grad(leaf) => leaf.grad.lock().clone().ok_or_else(|| Error::InvalidArgument {
                    op: "CompiledStep::call",
                    message: "internal: a guarded .grad is gone".into(),
                })?,
                Source::Host(k) => {
                    let (values, dtype) = &entry.host[*k];
                    let n = &entry.host_sizes[*k];
                    let words = values(args)?;
                    if words.len() != *n {
                        drop(host_buffers);
                        let reason = "a map built from this call's indices has another size than the traced one";
                        return self.eager(args, reason);
                    }
                    let buffer = &host_buffers[*k];
                    self.device.record_uniform_write(buffer.raw(), buffer.range().start, &words);
                    let layout = Layout::contiguous(Shape::new([*n]));
                    Tensor::from_parts(Storage::Buffer(buffer.clone()), layout, *dtype, self.device.clone())
                }
            });
        }
        drop(host_buffers);
        // The program updates parameters in place, some while it runs: an
        // input that shares a buffer with one (a parameter passed as an
        // argument too) would read it half-updated.
        let aliased = inputs
            .iter()
            .enumerate()
            .any(|(s, t)| entry.assigned.iter().any(|(target, slot)| s != *slot && t.shares_storage(target)));
        if aliased {
            return self.eager(args, "an input shares its buffer with a tensor the step updates in place");
        }
        let no_hooks = &mut |_: usize, _: Tensor| -> Result<Tensor> {
            Err(Error::InvalidArgument {
                op: "CompiledStep::call",
                message: "internal: a step program has hooks".into(),
            })
        };
        // A new `.grad` goes into the old one's storage when nothing else
        // holds that (no handle, no view, not read by the program): the
        // step's peak then holds one gradient per leaf, as eager mode's
        // `zero_grad()` first does. Nothing is written there unless the
        // whole program is recorded.
        let mut into = Vec::new();
        for (leaf, effect) in &entry.grads {
            let GradEffect::Output(k) = effect else { continue };
            let read = entry.sources.iter().any(|s| matches!(s, Source::Grad(l) if Arc::ptr_eq(l, leaf)));
            let meta = &entry.program.outputs[*k].1;
            let reusable = (!read).then(|| reusable_grad(leaf, meta)).flatten();
            if into.len() <= *k {
                into.resize(*k + 1, None);
            }
            into[*k] = reusable;
        }
        for (t, &extent) in inputs.iter().zip(&entry.extents) {
            // Against what the tensor's storage was asked for, not its size
            // class: a table sliced by the batch size must not read the
            // pool's slack past its end (eager mode's `narrow` errs there).
            if t.pooled()?.requested_bytes() / (t.dtype().size_in_bytes() as u64) < extent as u64 {
                return self
                    .eager(args, "the step at this batch size would read past a tensor that did not grow with it");
            }
        }
        let Some(outputs) = entry.program.run_into(&inputs, no_hooks, into)? else {
            return self.eager(args, "this call's tensors span more buffers than a kernel of the program may bind");
        };
        // Recorded: apply the effects as eager mode would have.
        for (leaf, effect) in &entry.grads {
            *leaf.grad.lock() = match effect {
                GradEffect::Clear => None,
                GradEffect::Output(k) => Some(outputs[*k].clone()),
            };
        }
        for (t, _) in &entry.assigned {
            t.pooled()?.bump_version();
        }
        for commit in entry.commits.iter() {
            commit();
        }
        self.stats.replays += 1;
        self.stats.kernels_last_replay = entry.program.kernel_count() as u64;
        Ok(entry.returns.iter().map(|Returned::Output(k)| outputs[*k].clone()).collect())
    }
}

enum Traced {
    Entry(Box<Entry>),
    Broke,
}

/// The step traced at batch sizes `b - 1` (`one`) and `b - 2` (`two`).
struct Smaller {
    b: usize,
    is_batch: Vec<bool>,
    one: Capture,
    two: Capture,
}

/// Per input slot of `graph`, how many elements from its allocation's
/// start its reads span (the furthest element read, plus one).
fn input_extents(graph: &CapturedGraph) -> Vec<usize> {
    let mut extents = vec![0; graph.inputs];
    let slot_of = |v: ValueId| match graph.values[v].op {
        crate::compiler::ir::IrOp::Input { slot } => Some(slot),
        _ => None,
    };
    let span = |l: &Layout| match l.shape.numel() {
        0 => 0,
        _ => l.offset + l.shape.dims().iter().zip(&l.strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1,
    };
    for v in &graph.values {
        for u in v.op.uses() {
            if let Some(slot) = slot_of(u.value) {
                extents[slot] = extents[slot].max(span(&u.layout));
            }
        }
    }
    for &(v, _) in &graph.outputs {
        if let Some(slot) = slot_of(v) {
            extents[slot] = extents[slot].max(graph.values[v].meta.shape.numel());
        }
    }
    extents
}

/// What one trace of the step recorded.
struct Capture {
    graph: CapturedGraph,
    sources: Vec<Source>,
    guards: Vec<GradGuard>,
    host: Vec<(HostValues, usize, DType)>,
    commits: Vec<Commit>,
    checks: Vec<(usize, Option<usize>, ArgCheck)>,
    uploads: std::collections::HashMap<usize, u64>,
    aliased: Option<&'static str>,
    arg_maps: bool,
    clamped: bool,
    prefix_checks: bool,
    grads: GradEffects,
    assigned: Vec<(Tensor, usize)>,
    returns: Vec<Returned>,
    fingerprint: String,
}

enum Captured {
    Step(Box<Capture>),
    /// A graph break, with its op and reason.
    Broke(String),
}

/// Runs `f` on `args` under a step trace. Leaves every tensor and
/// `.grad` as it was, whatever happens (nothing is committed).
fn capture<F>(f: &mut F, device: &Device, args: &[Tensor]) -> Result<Captured>
where
    F: FnMut(&[Tensor]) -> Result<Vec<Tensor>>,
{
    let scope = TraceScope::start_step(device, args)?;
    let returned = match f(args) {
        Ok(returned) => returned,
        Err(Error::GraphBreak { op, reason }) => {
            drop(scope);
            return Ok(Captured::Broke(format!("{op}: {reason}")));
        }
        Err(e) => return Err(e),
    };
    let (mut outputs, returns) = outputs_of(&returned)?;
    let (grads, assigned) = effects(&mut outputs)?;
    let (values, inputs, state) = scope.finish_step();
    let StepState {
        sources, guards, host, commits, checks, uploads, aliased, arg_maps, clamped, prefix_checks, ..
    } = state;
    let graph = CapturedGraph { values, inputs, outputs };
    let fingerprint = fingerprint(&graph, &sources, &uploads);
    let c = Capture {
        graph,
        sources,
        guards,
        host,
        commits,
        checks,
        uploads,
        aliased,
        arg_maps,
        clamped,
        prefix_checks,
        grads,
        assigned,
        returns,
        fingerprint,
    };
    Ok(Captured::Step(Box::new(c)))
}

impl Capture {
    /// Whether nothing but this capture holds `leaf` (a leaf its closure
    /// made and dropped).
    fn only_here(&self, leaf: &Arc<LeafState>) -> bool {
        let mine = self.grads.iter().filter(|(l, _)| Arc::ptr_eq(l, leaf)).count()
            + self.guards.iter().filter(|(l, _)| Arc::ptr_eq(l, leaf)).count()
            + self.sources.iter().filter(|s| matches!(s, Source::Grad(l) if Arc::ptr_eq(l, leaf))).count();
        Arc::strong_count(leaf) == mine
    }

    /// What `other` (a trace at another batch size) reads or changes that
    /// this trace does not, if anything: the two must bind the same
    /// tensors and have the same effects to be one step.
    fn differs(&self, other: &Capture) -> Option<&'static str> {
        let same_source = |a: &Source, b: &Source| match (a, b) {
            (Source::Arg(i), Source::Arg(j)) => i == j,
            // The same buffer: how the program reads it (a view that grows
            // with the batch) is in the graph's numbers.
            (Source::State(t), Source::State(u)) => t.shares_storage(u),
            (Source::Grad(l), Source::Grad(m)) => Arc::ptr_eq(l, m),
            (Source::Host(i), Source::Host(j)) => i == j,
            _ => false,
        };
        let same_grads = self.grads.len() == other.grads.len()
            && self.grads.iter().zip(&other.grads).all(|((l, e), (m, f))| {
                // Leaves each trace made and dropped play the same part.
                (Arc::ptr_eq(l, m) || (self.only_here(l) && other.only_here(m))) && e == f
            });
        let same_assigns = self.assigned.len() == other.assigned.len()
            && self.assigned.iter().zip(&other.assigned).all(|((t, i), (u, j))| t.shares_storage(u) && i == j);
        if self.sources.len() != other.sources.len()
            || !self.sources.iter().zip(&other.sources).all(|(a, b)| same_source(a, b))
        {
            Some("reads other tensors (a constant made in the step from host data?)")
        } else if !same_grads || !same_assigns || self.guards.len() != other.guards.len() {
            Some("changes other state")
        } else if self.host.len() != other.host.len()
            || self.commits.len() != other.commits.len()
            || self.checks.len() != other.checks.len()
            || self.returns.len() != other.returns.len()
            || other.aliased.is_some()
        {
            Some("has other host inputs, checks or results")
        } else {
            None
        }
    }
}

/// The program outputs for the returned tensors, and how to return each.
/// A tensor that lives in a buffer (an argument, a parameter) is read by
/// the program and returned as a copy, so a replay returns this call's
/// value, not the trace's tensor.
fn outputs_of(returned: &[Tensor]) -> Result<(Outputs, Vec<Returned>)> {
    let mut outputs = Vec::new();
    let mut returns = Vec::new();
    for (i, t) in returned.iter().enumerate() {
        returns.push(Returned::Output(outputs.len()));
        outputs.push((trace::output(t)?, OutputRole::Returned(i)));
    }
    Ok((outputs, returns))
}

/// The step's effects, still inside the trace: each changed `.grad` as it
/// ends (an output when it is a traced value), and each in-place update
/// as an output written back into its input's buffer. Output indices
/// count only returned outputs (write-backs return nothing).
fn effects(outputs: &mut Outputs) -> Result<(GradEffects, Vec<(Tensor, usize)>)> {
    let (undo, assigns) = trace::step_effects();
    let mut grads = Vec::new();
    for (k, (leaf, now)) in undo.into_iter().enumerate() {
        // A `.grad` left as a tensor in a buffer (set from an argument, or
        // unchanged) goes through the program too: a replay sets this
        // call's value.
        let effect = match now {
            None => GradEffect::Clear,
            Some(g) => {
                let index = outputs.len();
                outputs.push((trace::output(&g)?, OutputRole::StepGrad(k)));
                GradEffect::Output(index)
            }
        };
        grads.push((leaf, effect));
    }
    let mut assigned = Vec::new();
    for (target, value, slot) in assigns {
        outputs.push((trace::output(&trace::value_tensor(value))?, OutputRole::Assign(slot)));
        assigned.push((target, slot));
    }
    Ok((grads, assigned))
}

/// The captured IR and where each input comes from: two traces of one
/// signature that differ here would compute different things. A constant
/// the step made from host data is named by its contents (a new trace
/// makes a new one), any other tensor by its identity.
fn fingerprint(graph: &CapturedGraph, sources: &[Source], uploads: &std::collections::HashMap<usize, u64>) -> String {
    let mut s = graph.to_string();
    for (slot, source) in sources.iter().enumerate() {
        let from = match source {
            Source::Arg(i) => format!("argument {i}"),
            Source::State(t) => match t.storage() {
                Storage::Buffer(b) => match uploads.get(&(Arc::as_ptr(b) as usize)) {
                    Some(hash) => format!("constant made in the step, contents {hash:016x}"),
                    None => format!("tensor {:p}", Arc::as_ptr(b)),
                },
                Storage::Traced(_, v) => format!("traced value %{v}"),
            },
            Source::Grad(leaf) => format!(".grad of leaf {:p}", Arc::as_ptr(leaf)),
            Source::Host(k) => format!("host values {k}"),
        };
        s.push_str(&format!("input {slot}: {from}\n"));
    }
    s
}

/// The storage of `leaf`'s `.grad` if only that `.grad` holds it (no other
/// handle or view of it exists) and it is a whole contiguous tensor: the
/// next `.grad` of the same shape can be written there.
fn reusable_grad(leaf: &Arc<LeafState>, meta: &crate::metadata::InputMetadata) -> Option<Arc<PooledBuffer>> {
    let slot = leaf.grad.lock();
    let g = slot.as_ref()?;
    let whole = g.is_contiguous() && g.layout().offset == 0 && g.dtype() == meta.dtype && g.shape() == &meta.shape;
    let pooled = g.pooled().ok()?;
    (whole && Arc::strong_count(&g.0) == 1 && Arc::strong_count(pooled) == 1).then(|| pooled.clone())
}
