//! The tracing executor. While a trace is active on this thread, the
//! executor calls (`exec::map`, `reduce`, `matmul`, `assemble`) append IR
//! values here instead of touching the GPU, and return tensors whose
//! storage is that value. The backward formulas run unchanged on such
//! tensors; that is the whole of "capture".

use std::cell::RefCell;

use crate::compiler::ir::{IrOp, Use, Value, ValueId};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::ReduceKind;
use crate::exec::kernel::{Access, MapKernel};
use crate::layout::Layout;
use crate::metadata::{DType, InputMetadata, Shape};
use crate::tensor::{Storage, Tensor};

struct Tracer {
    device: Device,
    values: Vec<Value>,
    inputs: usize,
    outputs: Vec<ValueId>,
}

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
            *t = Some(Tracer { device: device.clone(), values: Vec::new(), inputs: 0, outputs: Vec::new() });
            Ok(TraceScope(()))
        })
    }

    /// Ends the trace and returns its values and input count.
    pub fn finish(self) -> (Vec<Value>, usize) {
        let tracer = TRACER.with(|t| t.borrow_mut().take()).expect("trace is active while its scope lives");
        (tracer.values, tracer.inputs)
    }
}

impl Drop for TraceScope {
    fn drop(&mut self) {
        TRACER.with(|t| t.borrow_mut().take());
    }
}

fn with<R>(f: impl FnOnce(&mut Tracer) -> R) -> R {
    TRACER.with(|t| f(t.borrow_mut().as_mut().expect("trace is active")))
}

fn push(tracer: &mut Tracer, op: IrOp, meta: InputMetadata) -> ValueId {
    tracer.values.push(Value { op, meta });
    tracer.values.len() - 1
}

fn tensor(tracer: &Tracer, value: ValueId, layout: Layout, dtype: DType) -> Tensor {
    Tensor::from_parts(Storage::Traced(value), layout, dtype, tracer.device.clone())
}

/// The use of a traced tensor through a view of `shape` (a broadcast of it).
fn use_of(tracer: &Tracer, t: &Tensor, shape: &Shape) -> Result<Use> {
    if t.device() != &tracer.device {
        return Err(Error::DeviceMismatch { op: "compiled backward", lhs: tracer.device.id(), rhs: t.device().id() });
    }
    let Some(value) = t.traced_value() else {
        return Err(Error::InvalidArgument {
            op: "compiled backward",
            message: "a tensor from outside the trace reached a backward formula".into(),
        });
    };
    Ok(Use { value, layout: t.layout().broadcast_to("compiled backward", shape)? })
}

/// A placeholder for a tensor bound at replay (same view, no data).
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
        let (ua, ub) = (use_of(tr, a, a.shape())?, use_of(tr, b, b.shape())?);
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
            pieces.iter().map(|(t, d, s)| Ok((use_of(tr, t, t.shape())?, *d, *s))).collect::<Result<Vec<_>>>()?;
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
            let mut kernel = MapKernel::default();
            let x = kernel.input(t.dtype());
            kernel.output(x);
            push(tr, IrOp::Map { label: "copy", kernel, args: vec![u], scalars: Vec::new() }, t.metadata())
        };
        tr.outputs.push(value);
        Ok(value)
    })
}
