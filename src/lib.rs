//! # wgrad
//!
//! A GPU-backed autograd runtime on [wgpu](https://wgpu.rs): tensors live in
//! device buffers, ops record a backward graph, and `backward()` runs it on
//! the GPU — on Vulkan, Metal, DX12, or headless on Mesa's lavapipe.
//!
//! ```
//! use wgrad::{DType, Device, Tensor};
//!
//! let device = Device::new()?; // picks the best adapter; WGRAD_ADAPTER overrides
//! let x = Tensor::rand([64, 3], 0, &device)?;
//! let w = Tensor::randn([3, 1], 1, &device)?.requires_grad(true)?;
//! let b = Tensor::zeros([1], DType::F32, &device)?.requires_grad(true)?;
//!
//! let y = x.matmul(&w)?.add(&b)?.tanh()?;
//! let loss = y.square()?.mean_all()?;
//! loss.backward()?;
//!
//! let dw = w.grad().expect("w received a gradient");
//! println!("loss {} dL/dw {:?}", loss.to_scalar::<f32>()?, dw.to_vec::<f32>()?);
//! # Ok::<(), wgrad::Error>(())
//! ```
//!
//! Every fallible call returns [`Result`]; the library does not panic on
//! user input, and a failed backward leaves every `.grad` as it was.

mod alloc;
mod autograd;
pub mod compiler;
mod device;
mod error;
mod exec;
mod layout;
mod metadata;
pub mod nn;
mod ops;
pub mod optim;
mod poison;
mod profile;
mod tensor;

pub use alloc::MemoryStats;
pub use autograd::{BackwardOptions, Edge, HookHandle, NoGradGuard, backward, grad, is_grad_enabled, no_grad};
pub use compiler::{
    CompiledStep, CompilerGuard, CompilerInterface, CompilerStats, Passes, StepStats, WgslCompiler, compile_step,
};
pub use device::{ArenaPolicy, Device, DeviceCounters, DeviceInfo, DeviceLimits, DeviceOptions, LimitsPreset};
pub use error::{Error, Result};
/// The `half` crate, for building and reading `DType::F16` tensors (`half::f16`).
pub use half;
pub use metadata::{DType, DeviceId, InputMetadata, Shape, collect_input_metadata};
pub use ops::{ClassLoss, Conv2dOptions, Operand, Pool2dOptions, Reduction, cat, embedding, stack, where_};
pub use optim::{Adam, AdamW, CosineWithWarmup, LrScheduler, Optimizer, Sgd, StepLr, clip_grad_norm};
pub use profile::{BatchRecord, KernelRecord, Profile, Timing};
pub use tensor::{Element, Tensor};

// The README's Rust examples run as doctests, so the tour cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Runs `f` with graph recording off.
pub(crate) fn no_grad_scope<T>(f: impl FnOnce() -> T) -> T {
    let _guard = no_grad();
    f()
}
