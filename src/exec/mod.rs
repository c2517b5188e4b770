//! The executor: the only way ops reach the GPU. Ops describe kernel-level
//! work (an elementwise [`kernel::MapKernel`], a reduction, a matmul, a copy
//! into a view) and the executor carries it out. Today that is the eager
//! executor, which encodes the dispatch at once; the compiled backward adds a
//! tracing executor behind the same calls, which records the work as IR
//! instead.

pub(crate) mod codegen;
pub(crate) mod kernel;
mod launch;
pub(crate) mod merge;
#[cfg(test)]
mod naga_tests;

pub(crate) use launch::{
    Launch, assemble, map, map_launch, matmul, matmul_launches, reduce, reduce_chunks, reduce_launch, reduce_view,
};

/// Reductions the reduce template implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReduceKind {
    Sum,
    Max,
    Min,
}
