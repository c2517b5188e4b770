//! The tracing executor. While a trace is active on this thread, the
//! executor calls (`exec::map`, `reduce`, `matmul`, `assemble`) append IR
//! values here instead of touching the GPU, and return tensors whose
//! storage is that value. The backward formulas run unchanged on such
//! tensors; that is the whole of "capture".
//!
//! A *step* trace (`compile_step`) also lifts tensors that live in buffers
//! (the call's arguments, parameters, optimizer state, old `.grad`s) into
//! program inputs on first use, records what the step changes (`.grad`s,
//! in-place updates) as effects instead of doing it, and turns anything it
//! cannot replay (a readback, a hook) into [`Error::GraphBreak`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use crate::autograd::LeafState;

use crate::compiler::ir::{IrOp, Phase, Use, Value, ValueId};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::ReduceKind;
use crate::exec::kernel::{Access, MapKernel};
use crate::layout::Layout;
use crate::metadata::{DType, InputMetadata, Shape};
use crate::tensor::{Storage, Tensor};

struct Tracer {
    /// This trace's number (see `Storage::Traced`).
    id: u64,
    device: Device,
    values: Vec<Value>,
    inputs: usize,
    outputs: Vec<ValueId>,
    /// Set for a step trace.
    step: Option<StepState>,
    /// The part of the step being traced (values are tagged with it).
    phase: Phase,
}

/// Where a step program's input comes from at each call.
#[derive(Clone)]
pub(crate) enum Source {
    /// Argument `i` of the call.
    Arg(usize),
    /// A tensor that existed before the call and is bound as it was traced
    /// (a parameter, optimizer state, a constant made inside the step).
    State(Tensor),
    /// The `.grad` this leaf has when the call starts.
    Grad(Arc<LeafState>),
    /// Values the host computes at every call ([`host_input`]).
    Host(usize),
}

/// Host values a step reads as data: computed at every call (a learning
/// rate, Adam's bias corrections, a dropout seed), as 32-bit words of the
/// input's dtype, written into a small program-owned buffer in queue order.
/// They may depend on the call's arguments (an index map built from the
/// indices passed in) and fail (indices out of range).
pub(crate) type HostValues = Box<dyn Fn(&[Tensor]) -> Result<Vec<u32>> + Send + Sync>;

/// Host state a step changes (an optimizer's step count), applied once the
/// program has been recorded without error.
pub(crate) type Commit = Box<dyn Fn() + Send + Sync>;

/// A check of integer argument values that eager mode makes on the host
/// (labels in range), made again on every call's argument.
pub(crate) type ArgCheck = Arc<dyn Fn(&[i64]) -> Result<()> + Send + Sync>;

/// A `.grad` a step trace read before changing it, and how it was then:
/// present (its dtype and view) or not. A replay needs it the same.
pub(crate) type GradGuard = (Arc<LeafState>, Option<(DType, Layout)>);

/// A leaf whose `.grad` a step trace changed, and the `.grad` (before the
/// step in the undo log, at its end in `step_effects`).
pub(crate) type GradChange = (Arc<LeafState>, Option<Tensor>);

/// An in-place update: the target tensor (it owns its buffer), its new
/// value, and the input slot of its buffer.
pub(crate) type Assign = (Tensor, ValueId, usize);

/// What a step trace records besides its values.
#[derive(Default)]
pub(crate) struct StepState {
    pub args: Vec<Tensor>,
    /// Per input slot, where it comes from.
    pub sources: Vec<Source>,
    /// Storage identity -> input value of lifted tensors; storage identity
    /// -> how to lift a known but not yet used storage (arguments, `.grad`s).
    lifted: HashMap<usize, usize>,
    pending: HashMap<usize, Source>,
    /// Storage identity -> the value an in-place update gave it.
    current: HashMap<usize, ValueId>,
    /// In-place updates.
    pub assigns: Vec<Assign>,
    /// `.grad`s changed by the step, with what they held before.
    pub undo: Vec<GradChange>,
    /// `.grad`s read before the step changed them.
    pub guards: Vec<GradGuard>,
    /// Host inputs: how to compute them, their length and dtype.
    pub host: Vec<(HostValues, usize, DType)>,
    pub commits: Vec<Commit>,
    /// Checks of host-known argument values: the argument, how many of
    /// its first values the checked tensor saw (`None`: all of them), and
    /// the check.
    pub checks: Vec<(usize, Option<usize>, ArgCheck)>,
    /// Per host counter (by address), its uses so far in this trace.
    uses: HashMap<usize, u64>,
    /// Set when an argument's buffer is also a tensor the step updates in
    /// place or a `.grad` it reads: a replay with other arguments would
    /// confuse the two, so such a call runs eagerly.
    pub aliased: Option<&'static str>,
    /// Tensors uploaded while tracing (constants the step makes), by
    /// storage identity: a hash of their bytes.
    pub uploads: HashMap<usize, u64>,
    /// Whether a host input is a gather map built from an argument's
    /// indices: it knows the traced sizes, so the step is not one program
    /// over batch sizes.
    pub arg_maps: bool,
    /// Whether an op clamped a size to the bounds of a dim (Python's
    /// slicing): at other batch sizes it may clamp otherwise, which no
    /// fit over three sizes can tell, so the step is not one program over
    /// batch sizes.
    pub clamped: bool,
    /// Whether a check saw only a prefix of an argument: the prefix need
    /// not follow the batch size, so the step is not one program over
    /// batch sizes either.
    pub prefix_checks: bool,
}

fn storage_key(t: &Tensor) -> Option<usize> {
    match t.storage() {
        Storage::Buffer(b) => Some(Arc::as_ptr(b) as usize),
        Storage::Traced(..) => None,
    }
}

/// Numbers traces (see `Storage::Traced`).
static NEXT_TRACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    static TRACER: RefCell<Option<Tracer>> = const { RefCell::new(None) };
}

/// Whether this thread is tracing.
pub(crate) fn is_active() -> bool {
    TRACER.with(|t| t.borrow().is_some())
}

/// An active trace; dropping it (also on error) ends the trace.
pub(crate) struct TraceScope(());

impl TraceScope {
    pub fn start(device: &Device) -> Result<TraceScope> {
        TRACER.with(|t| {
            let mut t = t.borrow_mut();
            if t.is_some() {
                return Err(Error::InvalidArgument {
                    op: "compiled backward",
                    message: "a backward started inside a compiled backward's trace (from a hook?)".into(),
                });
            }
            *t = Some(Tracer {
                id: NEXT_TRACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                device: device.clone(),
                values: Vec::new(),
                inputs: 0,
                outputs: Vec::new(),
                step: None,
                phase: Phase::Backward,
            });
            Ok(TraceScope(()))
        })
    }

    /// A step trace over the call's arguments `args`.
    pub fn start_step(device: &Device, args: &[Tensor]) -> Result<TraceScope> {
        let scope = TraceScope::start(device)?;
        let mut step = StepState { args: args.to_vec(), ..StepState::default() };
        for (i, a) in args.iter().enumerate() {
            if let Some(key) = storage_key(a) {
                step.pending.entry(key).or_insert(Source::Arg(i));
            }
        }
        with(|tr| {
            tr.step = Some(step);
            tr.phase = Phase::Forward;
        });
        Ok(scope)
    }

    /// Ends the trace and returns its values and input count.
    pub fn finish(self) -> (Vec<Value>, usize) {
        let tracer = TRACER.with(|t| t.borrow_mut().take()).expect("trace is active while its scope lives");
        (tracer.values, tracer.inputs)
    }

    /// Ends a step trace: its values, what its inputs come from, and the
    /// rest of what it recorded. Every `.grad` the step changed is put back
    /// as it was (the program's replay makes the change).
    pub fn finish_step(self) -> (Vec<Value>, usize, StepState) {
        let tracer = TRACER.with(|t| t.borrow_mut().take()).expect("trace is active while its scope lives");
        let step = tracer.step.expect("a step trace");
        restore_grads(&step.undo);
        (tracer.values, tracer.inputs, step)
    }
}

impl Drop for TraceScope {
    fn drop(&mut self) {
        // Also on error: a step trace changed `.grad`s only to trace what
        // follows; they go back to what they were.
        if let Some(tracer) = TRACER.with(|t| t.borrow_mut().take()) {
            if let Some(step) = tracer.step {
                restore_grads(&step.undo);
            }
        }
    }
}

/// Puts back the `.grad`s a step trace changed.
pub(crate) fn restore_grads(undo: &[GradChange]) {
    for (leaf, old) in undo.iter().rev() {
        *leaf.grad.lock() = old.clone();
    }
}

/// In a step trace: tags what is traced from here on with `phase`, and
/// returns the phase before (to put back).
pub(crate) fn set_phase(phase: Phase) -> Phase {
    TRACER.with(|t| match t.borrow_mut().as_mut() {
        Some(tr) => std::mem::replace(&mut tr.phase, phase),
        None => phase,
    })
}

/// Whether this thread runs a step trace.
pub(crate) fn is_step() -> bool {
    TRACER.with(|t| t.borrow().as_ref().is_some_and(|t| t.step.is_some()))
}

/// A [`Error::GraphBreak`] if this thread runs a step trace: `op` needs
/// something a replay cannot do (`reason`).
pub(crate) fn graph_break(op: &'static str, reason: &str) -> Result<()> {
    if is_step() {
        return Err(Error::GraphBreak { op, reason: reason.to_string() });
    }
    Ok(())
}

/// Notes a read of `leaf`'s `.grad` (`now`) in a step trace: unless the
/// step already changed it, the program depends on whether it exists (a
/// guard), and a `.grad` tensor it reads is bound from the leaf at each call.
pub(crate) fn note_grad_read(leaf: &Arc<LeafState>, now: &Option<Tensor>) {
    with_step(|step| {
        if step.undo.iter().any(|(l, _)| Arc::ptr_eq(l, leaf)) || step.guards.iter().any(|(l, _)| Arc::ptr_eq(l, leaf))
        {
            return;
        }
        step.guards.push((leaf.clone(), now.as_ref().map(|g| (g.dtype(), g.layout().clone()))));
        if let Some(key) = now.as_ref().and_then(storage_key) {
            if step.args.iter().any(|a| storage_key(a) == Some(key)) {
                step.aliased = Some("an argument shares its buffer with a .grad the step reads");
            }
            step.pending.entry(key).or_insert(Source::Grad(leaf.clone()));
        }
    });
}

/// Notes that a step trace is about to change `leaf`'s `.grad`.
pub(crate) fn note_grad_write(leaf: &Arc<LeafState>) {
    with_step(|step| {
        if !step.undo.iter().any(|(l, _)| Arc::ptr_eq(l, leaf)) {
            step.undo.push((leaf.clone(), leaf.grad.lock().clone()));
        }
    });
}

fn with_step(f: impl FnOnce(&mut StepState)) {
    TRACER.with(|t| {
        if let Some(step) = t.borrow_mut().as_mut().and_then(|t| t.step.as_mut()) {
            f(step)
        }
    })
}

/// In a step trace: `target` (a tensor owning its whole buffer, as
/// optimizer parameters and states do) holds `value` from here on, and the
/// program writes it back in place after everything that reads the old one.
pub(crate) fn assign(target: &Tensor, value: &Tensor) -> Result<()> {
    with(|tr| {
        let u = use_of(tr, value, target.shape())?;
        let v = if u.is_identity(&tr.values[u.value].meta) && !matches!(tr.values[u.value].op, IrOp::Input { .. }) {
            u.value
        } else {
            copy_of(tr, u, target.metadata())
        };
        let Some(key) = storage_key(target) else {
            // Made inside the step (`Tensor::zeros(..).requires_grad(true)`
            // updated by an optimizer made in the step): not a buffer a
            // program can write back into.
            return Err(Error::GraphBreak {
                op: "in-place update",
                reason: "its target was made inside the step; create it outside the step (and reset it each \
                         call if it should start afresh) to compile the step"
                    .into(),
            });
        };
        if !target.is_contiguous() || target.layout().offset != 0 {
            return Err(Error::InvalidArgument {
                op: "compiled step",
                message: "internal: an in-place update of a view (targets own their whole buffer)".into(),
            });
        }
        // Made from host data in this trace (PGD's perturbation, zeros from
        // a slice, updated by an optimizer made in the step): eager mode
        // starts each call from the host data, but a replay would update
        // the buffer the last replay left.
        if tr.step.as_ref().is_some_and(|s| s.uploads.contains_key(&key)) {
            return Err(Error::GraphBreak {
                op: "in-place update",
                reason: "its target was made from host data inside the step: eager mode starts it from that \
                         data every call, a replay would continue from the last call's values; create it outside \
                         the step (and reset it each call) to compile the step"
                    .into(),
            });
        }
        // The target is an input of the program (the buffer written back).
        let input = match tr.step.as_ref().expect("assign in a step trace").lifted.get(&key) {
            Some(&input) => input,
            None => lift(tr, target, key),
        };
        let IrOp::Input { slot } = tr.values[input].op else { unreachable!("lifted values are inputs") };
        let step = tr.step.as_mut().expect("assign in a step trace");
        if matches!(step.sources[slot], Source::Arg(_) | Source::Grad(_)) {
            step.aliased = Some("an argument or a .grad shares its buffer with a tensor the step updates in place");
        }
        step.current.insert(key, v);
        step.assigns.retain(|(t, _, _)| storage_key(t) != Some(key));
        step.assigns.push((target.clone(), v, slot));
        Ok(())
    })
}

/// In a step trace: a `[values().len()]` tensor of `dtype` (32-bit) whose
/// elements the host computes at every call (`values` is called once now,
/// for the shape, and once per replay).
pub(crate) fn host_input(values: HostValues, dtype: DType, device: &Device) -> Result<Tensor> {
    // Computed outside the tracer's borrow: `values` may read tensors.
    let args = TRACER.with(|t| t.borrow().as_ref().and_then(|t| t.step.as_ref()).map(|s| s.args.clone()));
    let n = values(&args.unwrap_or_default())?.len();
    with(|tr| {
        let step = tr.step.as_mut().expect("host inputs in a step trace");
        let index = step.host.len();
        step.host.push((values, n, dtype));
        let slot = tr.inputs;
        tr.inputs += 1;
        tr.step.as_mut().expect("step").sources.push(Source::Host(index));
        let meta = InputMetadata { device: device.id(), dtype, shape: Shape::new([n]) };
        let v = push(tr, IrOp::Input { slot }, meta);
        Ok(tensor(tr, v, Layout::contiguous(Shape::new([n])), dtype))
    })
}

/// The `.grad`s a step trace changed, as they are now (the trace's ends),
/// and its in-place updates.
pub(crate) fn step_effects() -> (Vec<GradChange>, Vec<Assign>) {
    TRACER.with(|t| {
        let t = t.borrow();
        let step = t.as_ref().and_then(|t| t.step.as_ref()).expect("a step trace");
        let grads = step.undo.iter().map(|(leaf, _)| (leaf.clone(), leaf.grad.lock().clone())).collect();
        (grads, step.assigns.clone())
    })
}

/// How many times this step trace has asked for `key` before (a dropout
/// layer's `k`-th forward in the step draws the `k`-th seed after its
/// counter).
pub(crate) fn uses_of(key: usize) -> u64 {
    let mut n = 0;
    with_step(|step| {
        let count = step.uses.entry(key).or_insert(0);
        n = *count;
        *count += 1;
    });
    n
}

/// In a step trace, whether `t` is argument `i` of the call, viewed whole
/// (the same elements in the same order).
pub(crate) fn arg_of(t: &Tensor) -> Option<usize> {
    let whole = |x: &Tensor| x.is_contiguous() && x.layout().offset == 0;
    TRACER.with(|tr| {
        let tr = tr.borrow();
        let args = &tr.as_ref()?.step.as_ref()?.args;
        args.iter().position(|a| a.shares_storage(t) && whole(a) && whole(t) && a.numel() == t.numel())
    })
}

/// In a step trace: whether `t` views (some of) an argument's storage.
pub(crate) fn views_arg(t: &Tensor) -> bool {
    TRACER.with(|tr| {
        let tr = tr.borrow();
        tr.as_ref().and_then(|tr| tr.step.as_ref()).is_some_and(|step| step.args.iter().any(|a| a.shares_storage(t)))
    })
}

/// In a step trace: notes that `t` was made from host `bytes` inside the
/// step (a constant the program will read), so `debug_retrace` compares
/// its contents, not its identity, with a new trace's.
pub(crate) fn note_upload(t: &Tensor, bytes: &[u8]) {
    use std::hash::{Hash, Hasher};
    if !is_step() {
        return;
    }
    let Some(key) = storage_key(t) else { return };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (t.dtype(), t.dims(), bytes).hash(&mut hasher);
    let hash = hasher.finish();
    with_step(|step| {
        step.uploads.insert(key, hash);
    });
}

/// In a step trace: notes that a host input is a map built from an
/// argument's indices (see [`StepState::arg_maps`]).
pub(crate) fn note_arg_map() {
    with_step(|step| step.arg_maps = true);
}

/// In a step trace: notes that an op clamped a size (see
/// [`StepState::clamped`]).
pub(crate) fn note_clamped() {
    with_step(|step| step.clamped = true);
}

/// In a step trace: runs `commit` when the program has been recorded.
pub(crate) fn on_commit(commit: Commit) {
    with_step(|step| step.commits.push(commit));
}

/// In a step trace, for an integer tensor whose host values an op checked:
/// if it is an argument of the call, `check` runs on that argument at
/// every call (a replay makes every check eager mode makes).
///
/// A tensor with host values is the argument or a prefix of it (the first
/// rows: `Tensor::with_layout` keeps host values for nothing else), and
/// the check sees only that prefix, as eager mode's does. A prefix makes
/// the step one program per batch size: its length need not follow the
/// batch size as the argument's does.
pub(crate) fn check_arg(t: &Tensor, check: ArgCheck) {
    with_step(|step| {
        if let Some(i) = step.args.iter().position(|a| a.shares_storage(t)) {
            let prefix = (t.numel() < step.args[i].numel()).then(|| t.numel());
            step.prefix_checks |= prefix.is_some();
            step.checks.push((i, prefix, check));
        }
    });
}

fn with<R>(f: impl FnOnce(&mut Tracer) -> R) -> R {
    TRACER.with(|t| f(t.borrow_mut().as_mut().expect("trace is active")))
}

fn push(tracer: &mut Tracer, op: IrOp, meta: InputMetadata) -> ValueId {
    let phase = tracer.phase;
    tracer.values.push(Value { op, meta, phase });
    tracer.values.len() - 1
}

fn tensor(tracer: &Tracer, value: ValueId, layout: Layout, dtype: DType) -> Tensor {
    Tensor::from_parts(Storage::Traced(tracer.id, value), layout, dtype, tracer.device.clone())
}

/// The use of a traced tensor through a view of `shape` (a broadcast of it).
/// In a step trace a tensor in a buffer is lifted to an input (once per
/// buffer), or read as the value an in-place update gave it.
fn use_of(tracer: &mut Tracer, t: &Tensor, shape: &Shape) -> Result<Use> {
    if t.device() != &tracer.device {
        return Err(Error::DeviceMismatch { op: "compiled backward", lhs: tracer.device.id(), rhs: t.device().id() });
    }
    if t.trace_id().is_some_and(|id| id != tracer.id) {
        return Err(Error::InvalidArgument {
            op: "compiled step",
            message: "a tensor of an earlier trace was used (kept from a previous call of the step?); \
                      keep tensors across calls only as returned values"
                .into(),
        });
    }
    let value = match (t.traced_value(), storage_key(t), tracer.step.is_some()) {
        (Some(value), _, _) => value,
        (None, Some(key), true) => lift(tracer, t, key),
        (None, _, _) => {
            return Err(Error::InvalidArgument {
                op: "compiled backward",
                message: "a tensor from outside the trace reached a backward formula".into(),
            });
        }
    };
    Ok(Use { value, layout: t.layout().broadcast_to("compiled step", shape)? })
}

/// The value of buffer-backed `t` in a step trace: what an in-place update
/// made it, or its input (added on first use).
fn lift(tracer: &mut Tracer, t: &Tensor, key: usize) -> ValueId {
    let step = tracer.step.as_mut().expect("a step trace");
    if let Some(&v) = step.current.get(&key) {
        return v;
    }
    if let Some(&v) = step.lifted.get(&key) {
        return v;
    }
    let source = step.pending.remove(&key).unwrap_or_else(|| Source::State(t.detach()));
    step.sources.push(source);
    let slot = tracer.inputs;
    tracer.inputs += 1;
    let v = push(tracer, IrOp::Input { slot }, t.metadata());
    tracer.step.as_mut().expect("a step trace").lifted.insert(key, v);
    v
}

/// A new value holding a copy of what `u` reads (`meta` describes it).
fn copy_of(tr: &mut Tracer, u: Use, meta: InputMetadata) -> ValueId {
    let kernel = MapKernel::copy(meta.dtype);
    push(tr, IrOp::Map { label: "copy", kernel, args: vec![u], scalars: Vec::new() }, meta)
}

/// A placeholder for a tensor bound at replay (same view, no data).
/// A tensor that is only a view's shape (dtype, layout, device): what a
/// backward at another batch size is traced from (`autograd::shadow`). It
/// belongs to no trace (traces are numbered from 1), so any op on it is an
/// error; [`input`] reads only its view.
pub(crate) fn shape_only(layout: Layout, dtype: DType, device: &Device) -> Tensor {
    Tensor::from_parts(Storage::Traced(0, 0), layout, dtype, device.clone())
}

pub(crate) fn input(t: &Tensor) -> Tensor {
    with(|tr| {
        let slot = tr.inputs;
        tr.inputs += 1;
        let v = push(tr, IrOp::Input { slot }, t.metadata());
        tensor(tr, v, t.layout().clone(), t.dtype())
    })
}

pub(crate) fn map(
    label: &'static str,
    kernel: MapKernel,
    inputs: &[&Tensor],
    scalars: &[f64],
    shape: &Shape,
    device: &Device,
) -> Result<Vec<Tensor>> {
    with(|tr| {
        if device != &tr.device {
            return Err(Error::DeviceMismatch { op: label, lhs: tr.device.id(), rhs: device.id() });
        }
        if kernel.outputs.len() != 1 {
            return Err(Error::InvalidArgument {
                op: label,
                message: "internal: traced kernels have exactly one output".into(),
            });
        }
        let args = inputs
            .iter()
            .zip(&kernel.inputs)
            .map(|(t, (_, access))| match access {
                Access::Gathered => use_of(tr, t, t.shape()),
                _ => use_of(tr, t, shape),
            })
            .collect::<Result<Vec<_>>>()?;
        let dtype = kernel.dtype(kernel.outputs[0].0);
        let meta = InputMetadata { device: device.id(), dtype, shape: shape.clone() };
        let v = push(tr, IrOp::Map { label, kernel, args, scalars: scalars.to_vec() }, meta);
        Ok(vec![tensor(tr, v, Layout::contiguous(shape.clone()), dtype)])
    })
}

pub(crate) fn reduce(kind: ReduceKind, x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    with(|tr| {
        let src = use_of(tr, x, x.shape())?;
        let dims = x.dims();
        let kept: Vec<usize> = dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
        let out_dims: Vec<usize> = if keepdim {
            dims.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect()
        } else {
            kept.clone()
        };
        let meta = InputMetadata { device: tr.device.id(), dtype: x.dtype(), shape: Shape::new(kept) };
        let v = push(tr, IrOp::Reduce { kind, src, axes: axes.to_vec() }, meta);
        Ok(tensor(tr, v, Layout::contiguous(Shape::new(out_dims)), x.dtype()))
    })
}

/// `a` and `b` are already broadcast to the batch and collapsible.
pub(crate) fn matmul(a: &Tensor, b: &Tensor, out_shape: &Shape) -> Result<Tensor> {
    with(|tr| {
        let ua = use_of(tr, a, a.shape())?;
        let ub = use_of(tr, b, b.shape())?;
        let meta = InputMetadata { device: tr.device.id(), dtype: a.dtype(), shape: out_shape.clone() };
        let v = push(tr, IrOp::Matmul { a: ua, b: ub }, meta);
        Ok(tensor(tr, v, Layout::contiguous(out_shape.clone()), a.dtype()))
    })
}

pub(crate) fn assemble(
    shape: &Shape,
    dtype: DType,
    device: &Device,
    pieces: &[(&Tensor, usize, usize)],
    zero_fill: bool,
) -> Result<Tensor> {
    with(|tr| {
        if device != &tr.device {
            return Err(Error::DeviceMismatch { op: "assemble", lhs: tr.device.id(), rhs: device.id() });
        }
        let pieces =
            pieces.iter().map(|(t, d, s)| Ok((use_of(&mut *tr, t, t.shape())?, *d, *s))).collect::<Result<Vec<_>>>()?;
        let meta = InputMetadata { device: device.id(), dtype, shape: shape.clone() };
        let v = push(tr, IrOp::Assemble { pieces, zero_fill }, meta);
        Ok(tensor(tr, v, Layout::contiguous(shape.clone()), dtype))
    })
}

/// The gradient `g` after the hooks of hook point `point`.
pub(crate) fn hook(point: usize, g: &Tensor) -> Result<Tensor> {
    with(|tr| {
        let src = use_of(tr, g, g.shape())?;
        let v = push(tr, IrOp::Hook { src, point }, g.metadata());
        Ok(tensor(tr, v, Layout::contiguous(g.shape().clone()), g.dtype()))
    })
}

/// A tensor viewing value `v` whole (an in-place update's new value).
pub(crate) fn value_tensor(v: ValueId) -> Tensor {
    with(|tr| {
        let meta = tr.values[v].meta.clone();
        tensor(tr, v, Layout::contiguous(meta.shape.clone()), meta.dtype)
    })
}

/// Marks `t` as a graph output and returns its value: a fresh buffer
/// holding exactly `t`, so a copy is added when `t` is an input, a hook
/// result, a view, or already another output.
pub(crate) fn output(t: &Tensor) -> Result<ValueId> {
    with(|tr| {
        let u = use_of(tr, t, t.shape())?;
        let v = &tr.values[u.value];
        let owned = !matches!(v.op, IrOp::Input { .. } | IrOp::Hook { .. });
        let value = if owned && u.is_identity(&v.meta) && !tr.outputs.contains(&u.value) {
            u.value
        } else {
            copy_of(tr, u, t.metadata())
        };
        tr.outputs.push(value);
        Ok(value)
    })
}
