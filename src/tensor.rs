//! [`Tensor`]: a cheap-to-clone handle to a strided view of a device buffer,
//! plus its place in the autograd graph.

use std::sync::Arc;

use crate::alloc::PooledBuffer;
use crate::autograd::{AutogradMeta, LeafState, Node};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::kernel::{MapKernel, Node as K, RandomKind};
use crate::layout::Layout;
use crate::metadata::{DType, InputMetadata, Shape};

/// Host element types a tensor can be created from and read back into.
pub trait Element: bytemuck::Pod + Send + Sync + std::fmt::Debug {
    /// The matching dtype.
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}

/// An n-dimensional array on a [`Device`], recording the ops applied to it
/// when it requires grad. Cloning is cheap (an `Arc`).
///
/// ```
/// use wgrad::{Device, Tensor};
/// let device = Device::new()?;
/// let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0], [3], &device)?.requires_grad(true)?;
/// let y = x.mul(&x)?.sum_all()?; // sum of squares
/// y.backward()?;
/// assert_eq!(x.grad().unwrap().to_vec::<f32>()?, vec![2.0, 4.0, 6.0]);
/// # Ok::<(), wgrad::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<TensorImpl>);

/// Where a tensor's elements live: a device buffer, or, while the compiled
/// backward traces its formulas, a value of the IR graph being built.
#[derive(Clone)]
pub(crate) enum Storage {
    Buffer(Arc<PooledBuffer>),
    /// Value `.1` of trace `.0` (traces are numbered, so a tensor kept from
    /// an earlier trace is recognised as such, not read as another value).
    Traced(u64, crate::compiler::ValueId),
}

pub(crate) struct TensorImpl {
    storage: Storage,
    layout: Layout,
    dtype: DType,
    device: Device,
    pub(crate) autograd: AutogradMeta,
    /// For integer tensors made from host data: the values, kept so index
    /// checks and index maps need no readback (a sync) from the device.
    host_ints: Option<Arc<[i64]>>,
}

impl Tensor {
    pub(crate) fn from_parts(storage: Storage, layout: Layout, dtype: DType, device: Device) -> Tensor {
        Tensor(Arc::new(TensorImpl { storage, layout, dtype, device, autograd: AutogradMeta::None, host_ints: None }))
    }

    /// Uninitialised contiguous storage; every element must be written.
    pub(crate) fn empty(shape: Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        check_dtype_supported(dtype, device)?;
        let bytes = (shape.numel() as u64).saturating_mul(dtype.size_in_bytes() as u64);
        crate::compiler::trace::graph_break("allocate", "this op has no tracing executor")?;
        if crate::compiler::trace::is_active() {
            return Err(Error::InvalidArgument {
                op: "compiled backward",
                message: "allocated a buffer while tracing; this op has no tracing executor".into(),
            });
        }
        let storage = device.alloc(bytes, dtype)?;
        Ok(Tensor::from_parts(Storage::Buffer(storage), Layout::contiguous(shape), dtype, device.clone()))
    }

    /// The same data seen through another layout, with no autograd history.
    pub(crate) fn with_layout(&self, layout: Layout) -> Tensor {
        // A reshape of the whole contiguous data keeps the element order,
        // and a prefix of it (the first rows) keeps the first values.
        let prefix = layout.is_contiguous() && layout.offset == 0 && layout.numel() <= self.numel();
        let host_ints = match &self.0.host_ints {
            Some(v) if prefix && self.0.layout.offset == 0 && self.is_contiguous() => match layout.numel() == v.len() {
                true => Some(v.clone()),
                false => Some(v[..layout.numel().min(v.len())].into()),
            },
            _ => None,
        };
        let mut t = Tensor::from_parts(self.0.storage.clone(), layout, self.0.dtype, self.0.device.clone());
        Arc::get_mut(&mut t.0).expect("a new tensor has one handle").host_ints = host_ints;
        t
    }

    /// The values of an integer tensor made from host data, in row-major
    /// order, if they are known on the host.
    pub(crate) fn host_ints(&self) -> Option<&[i64]> {
        self.0.host_ints.as_deref()
    }

    pub(crate) fn with_autograd(&self, autograd: AutogradMeta) -> Tensor {
        Tensor(Arc::new(TensorImpl {
            storage: self.0.storage.clone(),
            layout: self.0.layout.clone(),
            dtype: self.0.dtype,
            device: self.0.device.clone(),
            autograd,
            host_ints: self.0.host_ints.clone(),
        }))
    }

    /// The version of this tensor's storage: how many in-place writes
    /// (optimizer updates) it has seen. Views share their base's version.
    pub fn version(&self) -> u64 {
        match &self.0.storage {
            Storage::Buffer(b) => b.version(),
            Storage::Traced(..) => 0,
        }
    }

    /// The node that produced this tensor, if this was the tensor's last
    /// handle (so dropping the node is up to the caller; see `Node`'s `Drop`).
    pub(crate) fn into_last_grad_fn(self) -> Option<Arc<Node>> {
        let mut inner = Arc::into_inner(self.0)?;
        match std::mem::replace(&mut inner.autograd, AutogradMeta::None) {
            AutogradMeta::Interior(node) => Some(node),
            AutogradMeta::None | AutogradMeta::Leaf(_) => None,
        }
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.0.layout
    }

    /// The device buffer; an error for a tensor of a compiled-backward trace.
    /// The pooled buffer behind this tensor (see [`Self::buffer`]).
    pub(crate) fn pooled(&self) -> Result<&Arc<PooledBuffer>> {
        match &self.0.storage {
            Storage::Buffer(b) => Ok(b),
            Storage::Traced(..) => Err(Error::InvalidArgument {
                op: "compiled backward",
                message: "a tensor of a compiled-backward trace has no data outside the trace; \
                          read gradients after backward() returns"
                    .into(),
            }),
        }
    }

    /// The tensor's storage as a kernel operand (its buffer, the byte
    /// range of its allocation there, its dtype).
    pub(crate) fn operand(&self) -> Result<crate::exec::bind::Operand> {
        self.pooled().map(|b| b.operand(self.0.dtype))
    }

    /// Whether both handles view the same elements of the same buffer.
    pub(crate) fn same_view(&self, other: &Tensor) -> bool {
        let same_storage = match (&self.0.storage, &other.0.storage) {
            (Storage::Buffer(a), Storage::Buffer(b)) => Arc::ptr_eq(a, b),
            (Storage::Traced(ta, a), Storage::Traced(tb, b)) => (ta, a) == (tb, b),
            _ => false,
        };
        same_storage && self.0.layout == other.0.layout && self.0.dtype == other.0.dtype
    }

    /// Whether both handles view the same buffer (any elements).
    pub(crate) fn shares_storage(&self, other: &Tensor) -> bool {
        match (&self.0.storage, &other.0.storage) {
            (Storage::Buffer(a), Storage::Buffer(b)) => Arc::ptr_eq(a, b),
            (Storage::Traced(ta, a), Storage::Traced(tb, b)) => (ta, a) == (tb, b),
            _ => false,
        }
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.0.storage
    }

    /// The IR value this tensor views, when it belongs to a trace.
    pub(crate) fn traced_value(&self) -> Option<crate::compiler::ValueId> {
        match &self.0.storage {
            Storage::Traced(_, v) => Some(*v),
            Storage::Buffer(_) => None,
        }
    }

    /// The trace this tensor's value belongs to, if it is traced.
    pub(crate) fn trace_id(&self) -> Option<u64> {
        match &self.0.storage {
            Storage::Traced(trace, _) => Some(*trace),
            Storage::Buffer(_) => None,
        }
    }

    /// The values of an i32 or u32 tensor, for a check on the host: known
    /// there when it was made from host data, read back otherwise. Any other
    /// dtype is an `Err` naming `op` and giving `hint`.
    pub(crate) fn int_values(&self, op: &'static str, hint: &'static str) -> Result<Vec<i64>> {
        Ok(match self.dtype() {
            DType::I32 | DType::U32 if self.host_ints().is_some() => self.host_ints().unwrap_or_default().to_vec(),
            DType::I32 => self.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
            DType::U32 => self.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
            dtype => return Err(Error::UnsupportedDType { op, dtype, hint }),
        })
    }

    /// Copies host data to a new tensor of the given shape.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        crate::layout::check_shape("from_slice", &shape)?;
        if shape.numel() != data.len() {
            return Err(Error::InvalidArgument {
                op: "from_slice",
                message: format!("{} elements cannot fill shape {shape} ({} elements)", data.len(), shape.numel()),
            });
        }
        check_dtype_supported(T::DTYPE, device)?;
        let storage = device.upload(bytemuck::cast_slice(data), T::DTYPE)?;
        let mut t = Tensor::from_parts(Storage::Buffer(storage), Layout::contiguous(shape), T::DTYPE, device.clone());
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let host_ints: Option<Arc<[i64]>> = match T::DTYPE {
            DType::I32 => {
                Some(bytes.chunks_exact(4).map(|c| i64::from(i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))).collect())
            }
            DType::U32 => {
                Some(bytes.chunks_exact(4).map(|c| i64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))).collect())
            }
            DType::F32 | DType::F16 => None,
        };
        Arc::get_mut(&mut t.0).expect("a new tensor has one handle").host_ints = host_ints;
        crate::compiler::trace::note_upload(&t, bytes);
        Ok(t)
    }

    /// A tensor filled with `value` (converted to `dtype`).
    pub fn full(shape: impl Into<Shape>, value: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut k = MapKernel::default();
        let v = k.scalar(dtype);
        k.output(v);
        let out = crate::exec::map("full", k, &[], &[value], &shape.into(), device)?;
        Ok(out.into_iter().next().expect("one output"))
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(shape, 0.0, dtype, device)
    }

    /// A tensor of ones.
    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(shape, 1.0, dtype, device)
    }

    /// Zeros with this tensor's shape, dtype and device.
    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.shape().clone(), self.dtype(), self.device())
    }

    /// Ones with this tensor's shape, dtype and device.
    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::ones(self.shape().clone(), self.dtype(), self.device())
    }

    /// `start, start + step, ...` up to (excluding) `end`, as f32, like `torch.arange`.
    pub fn arange(start: f64, end: f64, step: f64, device: &Device) -> Result<Tensor> {
        if step == 0.0 || !step.is_finite() || !start.is_finite() || !end.is_finite() {
            return Err(Error::InvalidArgument {
                op: "arange",
                message: format!("needs finite start/end and a non-zero step, got {start}..{end} step {step}"),
            });
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        let mut k = MapKernel::default();
        let i = k.push(K::Index, DType::F32);
        let s = k.scalar(DType::F32);
        let b = k.scalar(DType::F32);
        let scaled = k.push(K::Binary(crate::ops::binary::BinaryOp::Mul, i, s), DType::F32);
        let out = k.push(K::Binary(crate::ops::binary::BinaryOp::Add, scaled, b), DType::F32);
        k.output(out);
        let t = crate::exec::map("arange", k, &[], &[step, start], &Shape::new([n]), device)?;
        Ok(t.into_iter().next().expect("one output"))
    }

    fn random(kind: RandomKind, shape: Shape, seed: u64, device: &Device) -> Result<Tensor> {
        let mut k = MapKernel::default();
        // The 64-bit seed travels as two u32 words in consecutive slots.
        let slot = k.scalar_slot(DType::U32);
        k.scalar_slot(DType::U32);
        let r = k.push(K::Random(kind, slot), DType::F32);
        k.output(r);
        let seeds = [(seed & 0xffff_ffff) as f64, (seed >> 32) as f64];
        let t = crate::exec::map("random", k, &[], &seeds, &shape, device)?;
        Ok(t.into_iter().next().expect("one output"))
    }

    /// Random numbers whose 64-bit seed is read from `seeds` (u32 `[2]`,
    /// low word first): the numbers [`Tensor::random`] gives for that seed.
    /// A compiled step draws its dropout masks this way, its seeds being
    /// data that change every call.
    pub(crate) fn random_from(kind: RandomKind, shape: Shape, seeds: &Tensor) -> Result<Tensor> {
        let mut k = MapKernel::default();
        let b = k.gathered(DType::U32);
        let (zero, one) = (k.scalar(DType::U32), k.scalar(DType::U32));
        let lo = k.push(K::Gather(b, zero), DType::U32);
        let hi = k.push(K::Gather(b, one), DType::U32);
        let r = k.push(K::RandomAt(kind, lo, hi), DType::F32);
        k.output(r);
        let t = crate::exec::map("random", k, &[seeds], &[0.0, 1.0], &shape, seeds.device())?;
        Ok(t.into_iter().next().expect("one output"))
    }

    /// Uniform in [0, 1), f32, from a seed: the same seed gives the same
    /// values on every device and for every way the work is split.
    pub fn rand(shape: impl Into<Shape>, seed: u64, device: &Device) -> Result<Tensor> {
        Tensor::random(RandomKind::Uniform, shape.into(), seed, device)
    }

    /// Standard normal, f32, from a seed.
    pub fn randn(shape: impl Into<Shape>, seed: u64, device: &Device) -> Result<Tensor> {
        Tensor::random(RandomKind::Normal, shape.into(), seed, device)
    }

    /// Reads the elements back in row-major order. `T` must match the dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        crate::compiler::trace::graph_break("to_vec", "it reads a value back to the host")?;
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch { op: "to_vec", lhs: self.dtype(), rhs: T::DTYPE });
        }
        let t = if self.layout().is_contiguous() { self.clone() } else { self.contiguous_copy()? };
        let size = t.dtype().size_in_bytes() as u64;
        let bytes = t.device().read(&t.operand()?, t.layout().offset as u64 * size, t.shape().numel() as u64 * size)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads a one-element tensor back.
    pub fn to_scalar<T: Element>(&self) -> Result<T> {
        if self.shape().numel() != 1 {
            return Err(Error::InvalidArgument {
                op: "to_scalar",
                message: format!("needs exactly one element, got shape {}; reduce it first", self.shape()),
            });
        }
        Ok(self.to_vec::<T>()?[0])
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.0.layout.shape
    }

    /// The dimensions (shorthand for `shape().dims()`).
    pub fn dims(&self) -> &[usize] {
        self.0.layout.shape.dims()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.layout.shape.rank()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.layout.shape.numel()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    /// The device holding the data.
    pub fn device(&self) -> &Device {
        &self.0.device
    }

    /// Device, dtype and shape: what a gradient of this tensor must match.
    pub fn metadata(&self) -> InputMetadata {
        InputMetadata { device: self.0.device.id(), dtype: self.0.dtype, shape: self.0.layout.shape.clone() }
    }

    /// Whether this tensor's data is laid out row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }

    /// A new handle to the same data with no autograd history; it does not require grad.
    pub fn detach(&self) -> Tensor {
        self.with_autograd(AutogradMeta::None)
    }

    /// Marks this tensor as a leaf whose gradient is accumulated into
    /// [`Tensor::grad`] (`true`), or returns a detached handle (`false`).
    /// Only float tensors can require grad, and only leaves can be switched.
    pub fn requires_grad(&self, on: bool) -> Result<Tensor> {
        if let AutogradMeta::Interior(_) = self.0.autograd {
            return Err(Error::InvalidArgument {
                op: "requires_grad",
                message: "only leaf tensors can change requires_grad; use `.detach()` to get a leaf".into(),
            });
        }
        if !on {
            return Ok(self.detach());
        }
        if !self.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                op: "requires_grad",
                dtype: self.dtype(),
                hint: "only float tensors can require grad; convert with `.to_dtype(DType::F32)`",
            });
        }
        if let AutogradMeta::Leaf(_) = self.0.autograd {
            return Ok(self.clone());
        }
        Ok(self.with_autograd(AutogradMeta::Leaf(Arc::new(LeafState::new(self.metadata())))))
    }

    /// Whether gradients flow to this tensor (a leaf that requires grad, or
    /// the result of an op on one).
    pub fn needs_grad(&self) -> bool {
        !matches!(self.0.autograd, AutogradMeta::None)
    }

    /// Whether this tensor is a leaf: created by the user rather than by an
    /// op that recorded a gradient.
    pub fn is_leaf(&self) -> bool {
        !matches!(self.0.autograd, AutogradMeta::Interior(_))
    }

    /// The node that produced this tensor, if it was recorded.
    pub(crate) fn grad_fn(&self) -> Option<&Arc<Node>> {
        match &self.0.autograd {
            AutogradMeta::Interior(node) => Some(node),
            _ => None,
        }
    }

    /// The accumulated gradient of a leaf, or of a non-leaf on which
    /// [`Tensor::retain_grad`] was called, if any backward reached it.
    pub fn grad(&self) -> Option<Tensor> {
        match &self.0.autograd {
            AutogradMeta::Leaf(leaf) => leaf.current_grad(),
            AutogradMeta::Interior(node) => node.retained_grad.lock().clone(),
            AutogradMeta::None => None,
        }
    }

    /// Forgets the accumulated gradient (PyTorch's `zero_grad(set_to_none=True)`).
    pub fn zero_grad(&self) {
        match &self.0.autograd {
            AutogradMeta::Leaf(leaf) => leaf.replace_grad(None),
            AutogradMeta::Interior(node) => *node.retained_grad.lock() = None,
            AutogradMeta::None => {}
        }
    }

    /// Replaces the accumulated gradient of a leaf (used by optimizers).
    pub fn set_grad(&self, grad: Option<Tensor>) -> Result<()> {
        let AutogradMeta::Leaf(leaf) = &self.0.autograd else {
            return Err(Error::InvalidArgument {
                op: "set_grad",
                message: "only leaves that require grad hold a .grad".into(),
            });
        };
        if let Some(g) = &grad {
            if g.metadata() != leaf.metadata {
                return Err(Error::SetGradMismatch {
                    expected: Box::new(leaf.metadata.clone()),
                    got: Box::new(g.metadata()),
                });
            }
        }
        leaf.replace_grad(grad.map(|g| g.detach()));
        Ok(())
    }
}

fn check_dtype_supported(dtype: DType, device: &Device) -> Result<()> {
    if dtype == DType::F16 && !device.supports_f16() {
        return Err(Error::UnsupportedDType {
            op: "create",
            dtype,
            hint: "this adapter lacks SHADER_F16; use DType::F32 (check `Device::supports_f16()`)",
        });
    }
    Ok(())
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}{}, {})", self.dtype(), self.shape(), self.device().id())?;
        if self.needs_grad() {
            write!(f, " requires_grad")?;
        }
        Ok(())
    }
}
