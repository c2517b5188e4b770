//! The one error type of the crate. Every variant says what was wrong and
//! what to do about it; the library never panics on user input.

use crate::metadata::{DType, DeviceId, InputMetadata, Shape};

/// Result alias used throughout wgrad.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in wgrad.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No usable GPU adapter was found.
    #[error(
        "no GPU adapter found{detail}: install a GPU driver with Vulkan, Metal or DX12 support, \
         or Mesa's software Vulkan driver lavapipe (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`, \
         or run scripts/ensure-vulkan.sh)"
    )]
    NoAdapter {
        /// Extra context (the `WGRAD_ADAPTER` filter and the adapters seen).
        detail: String,
    },
    /// The adapter refused to create a device.
    #[error("the adapter `{adapter}` refused to create a device: {message}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// wgpu's message.
        message: String,
    },
    /// Two operand shapes cannot be broadcast together.
    #[error(
        "{op}: shapes {lhs} and {rhs} cannot be broadcast together; \
         trailing dimensions must be equal or 1 (reshape or unsqueeze one operand)"
    )]
    ShapeMismatch {
        /// The op.
        op: &'static str,
        /// Left shape.
        lhs: Shape,
        /// Right shape.
        rhs: Shape,
    },
    /// Operand shapes that do not fit the op's rule (other than broadcasting).
    #[error("{op}: shapes {lhs} and {rhs} do not fit: {rule}")]
    IncompatibleShapes {
        /// The op.
        op: &'static str,
        /// Left (or first) shape.
        lhs: Shape,
        /// Right (or offending) shape.
        rhs: Shape,
        /// What the op needs, and so what to change.
        rule: &'static str,
    },
    /// An argument (shape, axis, range, ...) is invalid for the op.
    #[error("{op}: {message}")]
    InvalidArgument {
        /// The op.
        op: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// Two operands have different dtypes.
    #[error("{op}: dtype mismatch, {lhs:?} vs {rhs:?}; convert one side with `.to_dtype(..)`")]
    DTypeMismatch {
        /// The op.
        op: &'static str,
        /// Left dtype.
        lhs: DType,
        /// Right dtype.
        rhs: DType,
    },
    /// The op does not support this dtype.
    #[error("{op}: dtype {dtype:?} is not supported; {hint}")]
    UnsupportedDType {
        /// The op.
        op: &'static str,
        /// The dtype given.
        dtype: DType,
        /// What to use instead.
        hint: &'static str,
    },
    /// Operands live on different devices.
    #[error("{op}: operands live on different devices ({lhs} and {rhs}); create both on the same `Device`")]
    DeviceMismatch {
        /// The op.
        op: &'static str,
        /// Left device.
        lhs: DeviceId,
        /// Right device.
        rhs: DeviceId,
    },
    /// `backward()` was called on a tensor with more than one element.
    #[error(
        "backward() needs a scalar (one-element) output, got shape {shape}; \
         reduce it first (e.g. `.sum_all()`), or pass a seed gradient with `backward_with`"
    )]
    NonScalarBackward {
        /// Shape of the output.
        shape: Shape,
    },
    /// A tensor that should be differentiated does not require grad.
    #[error(
        "{what} does not require grad and has no grad_fn: \
         call `.requires_grad(true)` on the leaves before building the graph, and do not build it under `no_grad()`"
    )]
    NoGradFn {
        /// Which tensor.
        what: String,
    },
    /// A graph was walked a second time after its saved tensors were released.
    #[error(
        "backward through `{op}` a second time: its saved tensors were released by the first backward; \
         pass `BackwardOptions {{ retain_graph: true, .. }}` to the first call if you need to backward twice"
    )]
    GraphReleased {
        /// The node that was already released.
        op: &'static str,
    },
    /// A tensor saved for the backward was modified in place after it was saved.
    #[error(
        "backward through `{op}`: saved tensor {index} (shape {shape}) was modified by an in-place \
         operation after the forward saved it (version {found}, saved at version {expected}); run the \
         forward again after the in-place update (e.g. after `optimizer.step()`), or backward before it"
    )]
    ModifiedInPlace {
        /// The node whose saved tensor changed.
        op: &'static str,
        /// Which of its saved tensors.
        index: usize,
        /// That tensor's shape.
        shape: Shape,
        /// Its version when saved.
        expected: u64,
        /// Its version now.
        found: u64,
    },
    /// A backward formula or hook produced a gradient that does not match its input.
    #[error(
        "the gradient produced by `{op}` for input {input} is {got:?} but the input is {expected:?}; \
         a hook must return a gradient of the same shape, dtype and device"
    )]
    GradientMismatch {
        /// The node (or hook) that produced the gradient.
        op: &'static str,
        /// Index of the input.
        input: usize,
        /// What the edge expects.
        expected: Box<InputMetadata>,
        /// What arrived.
        got: Box<InputMetadata>,
    },
    /// `set_grad` was given a gradient unlike its tensor.
    #[error(
        "set_grad: the gradient is {got:?} but the tensor is {expected:?}; pass a gradient of the tensor's \
         shape, dtype and device (or `None` to clear it)"
    )]
    SetGradMismatch {
        /// The tensor's metadata.
        expected: Box<InputMetadata>,
        /// The given gradient's.
        got: Box<InputMetadata>,
    },
    /// A seed gradient has the wrong shape or dtype.
    #[error(
        "the seed gradient is {got:?} but the output is {expected:?}; pass a seed of the output's shape, \
         dtype and device (e.g. `out.ones_like()?`, or convert it with `.to_dtype(..)`)"
    )]
    SeedMismatch {
        /// The output's metadata.
        expected: Box<InputMetadata>,
        /// The seed's metadata.
        got: Box<InputMetadata>,
    },
    /// A tensor is larger than one storage binding of this device.
    #[error(
        "a tensor of {bytes} bytes exceeds this device's largest storage binding ({limit} bytes); \
         split it into smaller tensors"
    )]
    TensorTooLarge {
        /// Requested size.
        bytes: u64,
        /// The device's limit.
        limit: u64,
    },
    /// The device ran out of memory.
    #[error(
        "out of device memory allocating {bytes} bytes ({live} bytes live); \
         free tensors, call `Device::empty_cache()`, or use smaller batches"
    )]
    OutOfMemory {
        /// Requested size.
        bytes: u64,
        /// Bytes live at the time.
        live: u64,
    },
    /// A generated or hand-written shader failed to compile.
    #[error("shader `{label}` failed to compile: {message}")]
    Shader {
        /// Kernel label.
        label: String,
        /// The compiler's message.
        message: String,
    },
    /// wgpu reported an error on the device.
    #[error(
        "the GPU reported an error at a sync point ({0}); work submitted since the previous sync may not \
         have run: tensors whose computation failed report their own error when read"
    )]
    Gpu(String),
    /// The GPU rejected the work that computes this tensor (or a tensor it
    /// was computed from); its value was never computed.
    #[error(
        "{op}: the GPU rejected the work that computes this tensor, so it has no value \
         (the GPU said: {message}); tensors that do not depend on it are unaffected and the device \
         still works: fix the cause and compute it again"
    )]
    GpuFailed {
        /// The op whose kernel wrote the tensor, or the first failed one upstream of it.
        op: &'static str,
        /// What the GPU reported.
        message: String,
    },
    /// The device was lost (driver reset, GPU removed, or destroyed).
    #[error(
        "the GPU device was lost ({reason}); its tensors are gone: create a new `Device` and \
         recompute (or reload) what you need"
    )]
    DeviceLost {
        /// wgpu's reason and message.
        reason: String,
    },
    /// A compiler is already installed for this process.
    #[error(
        "a compiler is already installed; drop its `CompilerGuard` before installing another \
         (one compiler is active per process)"
    )]
    CompilerAlreadyActive,
    /// No compiler is installed.
    #[error("no compiler is installed; install one with `WgslCompiler::install(&device)`")]
    NoActiveCompiler,
    /// Reading a buffer back to the host failed.
    #[error("reading back from the device failed: {0}")]
    Readback(String),
    /// A compiled step met something its program cannot replay (a readback
    /// to the host, a hook, an index map of indices computed inside the
    /// step): `CompiledStep::call` runs
    /// that call eagerly instead. Returned to the caller only when a step
    /// is traced outside `CompiledStep`.
    #[error("{op}: graph break in a compiled step: {reason}; the step runs eagerly")]
    GraphBreak {
        /// The op that broke the graph.
        op: &'static str,
        /// Why a replay cannot do what it did.
        reason: String,
    },
}
