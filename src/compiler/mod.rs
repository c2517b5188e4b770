//! The compiled backward. With a compiler installed ([`CompilerGuard`]),
//! `backward()` captures the backward graph by running the same formulas
//! as eager mode under a tracing executor, optimises it, fuses it into few
//! WGSL kernels, and caches the program by the graph's [`Signature`];
//! later backward calls with the same signature replay it in one submit.
//!
//! Pipeline: `trace` (capture) → `passes` (simplify, CSE, DCE) →
//! `fusion` (kernels and their order) → `lower` (memory plan, launches)
//! → `runtime` (replay). [`WgslCompiler`] ties them together.

mod batch;
mod dot;
mod emit;
mod family;
mod fusion;
pub(crate) mod guard;
pub(crate) mod ir;
mod lower;
mod passes;
mod row_sums;
mod rows;
pub(crate) mod runtime;
mod signature;
mod step;
pub(crate) mod trace;
mod wgsl;

pub use fusion::Passes;
pub use guard::{CompilerGuard, CompilerInterface, CompilerStats};
pub use ir::{CapturedGraph, Phase, ValueId};
pub use runtime::{Program, ProgramReport};
pub use signature::Signature;
pub use step::{CompiledStep, StepStats, compile_step};
pub use wgsl::WgslCompiler;
