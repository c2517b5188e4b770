//! The autograd graph and the eager backward engine.
//!
//! Nodes are reference-counted (`Arc`) and owned by the tensors that can
//! still reach them, so a graph lives exactly as long as someone can
//! backward through it; the compiled backward lowers graphs into an
//! arena-based IR of its own.

pub(crate) mod capture;
mod engine;
mod grad_mode;
mod graph;
mod hooks;
pub(crate) mod shadow;

pub use engine::{BackwardOptions, backward, grad};
pub(crate) use engine::{GraphTask, key};
pub use grad_mode::{NoGradGuard, is_grad_enabled, no_grad};
pub(crate) use graph::NodeKind;
pub(crate) use graph::{AutogradMeta, LeafState, Node, record};
pub use graph::{Edge, HookHandle};
