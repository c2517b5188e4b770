//! The executor: the only way ops reach the GPU. Ops describe kernel-level
//! work (an elementwise [`kernel::MapKernel`], a reduction, a matmul, a copy
//! into a view) and the executor carries it out. Today that is the eager
//! executor, which encodes the dispatch at once; the compiled backward adds a
//! tracing executor behind the same calls, which records the work as IR
//! instead.

pub(crate) mod bind;
pub(crate) mod codegen;
pub(crate) mod kernel;
mod launch;
pub(crate) mod merge;
#[cfg(test)]
mod naga_tests;

pub(crate) use launch::{
    Launch, assemble, map, map_launch, map_launch_sized, matmul, matmul_launches, partial_dtype, reduce, reduce_chunks,
    reduce_launch, reduce_view, rows_launch, with_partial_dtype,
};

/// Mesa's llvmpipe (lavapipe, the CI device) silently ends an invocation
/// after 65,535 loop back-edges in total, nested loops included, and the
/// kernel's results are then simply wrong. Every loop in generated code is
/// bounded to stay below this (with a margin): a reduction splits `k`
/// across invocations and passes, counting the rank loops of its strided
/// reads, a long matmul
/// contraction is split ([`MATMUL_K_CHUNK`]), and scatter-add segments are
/// cut into runs of [`SEGMENT_CHUNK`].
pub(crate) const LOOP_BUDGET: usize = 60_000;

/// The longest contraction one matmul kernel runs: both templates loop once
/// per element (direct) or per tile (tiled) of k.
pub(crate) const MATMUL_K_CHUNK: usize = 16_384;

/// The longest run a `SegmentSum` node loops over; longer segments are
/// summed in runs of this length and the runs summed after.
pub(crate) const SEGMENT_CHUNK: usize = 4_096;

/// Reductions the reduce template implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReduceKind {
    Sum,
    Max,
    Min,
}
