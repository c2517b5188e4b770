//! The elementwise kernel IR: a small SSA graph over inputs, scalar uniforms
//! and the element index. An eager op is the one-node case; the compiled
//! backward fuses whole subgraphs into one of these.

use crate::metadata::DType;
use crate::ops::binary::BinaryOp;
use crate::ops::compare::CmpOp;
use crate::ops::unary::UnaryOp;

/// Index of a node in [`MapKernel::nodes`].
pub(crate) type NodeId = usize;

/// How a kernel addresses a buffer: contiguous from an offset, or through
/// per-dimension strides (broadcasts, transposes, slices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    Linear,
    Strided,
    /// Every element reads the same one (a broadcast scalar: all strides
    /// 0), at the view's offset: no index arithmetic per element.
    Broadcast,
    /// A view whose dims merge into two evenly strided runs (a transpose,
    /// a row or column broadcast, a slice of rows): element `i` is at
    /// `offset + (i / n) * outer + (i % n) * inner`, words 1..3 of the view
    /// holding `outer`, `inner` and `n`. No loop over the rank, which
    /// [`Access::Strided`] pays per read.
    Planar,
    /// In a reduction over an [A, K] iteration, a view that is affine in
    /// the two: element (a, kk) is at `offset + a * sa + kk * sk`, words
    /// 1..2 holding `sa` and `sk` (a [`Access::Planar`] view whose inner
    /// run is a whole row of K, or one run over everything). The template
    /// passes `a` and `kk`, so the read divides nothing: an integer
    /// division per element is a scalar loop over the SIMD lanes on CPU
    /// adapters (W4's column sums: 3.7 -> 2.3 ms on lavapipe).
    Split,
    /// Read at computed element offsets ([`Node::Gather`], [`Node::SegmentSum`]),
    /// not at the current index: the binding keeps its own contiguous view
    /// instead of being broadcast to the kernel's shape.
    Gathered,
}

/// Counter-based random numbers: a pure function of (seed, element index),
/// so results do not depend on how work is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RandomKind {
    /// Uniform in [0, 1).
    Uniform,
    /// Standard normal (Box–Muller).
    Normal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Node {
    /// Element of input binding `i` at the current index.
    Input(usize),
    /// Scalar uniform slot `i`, read as the node's dtype.
    Scalar(usize),
    /// The linear element index (u32).
    Index,
    /// Random number from the element index and two u32 seed slots.
    Random(RandomKind, usize),
    /// Random number from the element index and two u32 seed words that
    /// other nodes compute (read from a device tensor: a compiled step's
    /// seeds, which change every call). Same numbers as [`Node::Random`]
    /// for the same seed.
    RandomAt(RandomKind, NodeId, NodeId),
    Unary(UnaryOp, NodeId),
    Binary(BinaryOp, NodeId, NodeId),
    Compare(CmpOp, NodeId, NodeId),
    /// `cond != 0 ? a : b`.
    Select(NodeId, NodeId, NodeId),
    /// Conversion to the node's dtype.
    Cast(NodeId),
    /// The value a template hands to its epilogue (a matmul's accumulator).
    Arg,
    /// Element `offset` (a u32 node) of gathered binding `binding`.
    Gather(usize, NodeId),
    /// The sum of `values[positions[k]]` for k in `starts[i] .. starts[i + 1]`
    /// (bindings, all gathered; `i` is the current index): a deterministic
    /// scatter-add, each output summing its sources in a fixed order.
    /// `batched`: one map for every image of a batch, `starts` beginning
    /// with two words, the segments S and values E per image; output `i`
    /// is segment `i % S` of image `i / S`, whose values start at
    /// `(i / S) * E` (see `ops::index::batched_index_map`).
    SegmentSum {
        values: usize,
        starts: usize,
        positions: usize,
        batched: bool,
    },
    /// The reduction of the operand over the current row: only in a row
    /// kernel ([`crate::exec::codegen::render_rows`]), where an invocation
    /// owns a row, evaluates the operand at every element of it, and reads
    /// the result anywhere after (softmax's max and sum, layer_norm's mean
    /// and variance).
    RowReduce(crate::exec::ReduceKind, NodeId),
    /// The row sum of `src` (an element-varying node), known as `fast` (a
    /// row-uniform node: the sum distributed over per-row factors, see
    /// `compiler::row_sums`) when that is trustworthy; otherwise summed
    /// over the row as written. Row-uniform too: `addends`, the sum of the
    /// distributed addends' absolute values (`Σ_j |f_j · Σ t_j|`),
    /// `magnitude`, the same over their terms' absolute values
    /// (`Σ_j |f_j| · Σ |t_j|`), and `smallest`, the least `Σ |t_j|`.
    /// `fast` is used when all are finite, `fast` is not zero (whose sign
    /// the sum as written may not share), no addend's `Σ |t_j|` is below
    /// 2^-110 (its terms near underflow), and the error of summing the
    /// distributed addends (about `ε · sqrt(K) · addends`) is below either
    /// 2^-13 of `|fast|` or four times the error the sum as written makes
    /// anyway in rounding its addends (`4 ε · magnitude`): addends that
    /// cancel where the written ones did not are summed as written (one
    /// element at a time, in element order). Only in a row kernel.
    CheckedRowSum {
        fast: NodeId,
        src: NodeId,
        addends: NodeId,
        magnitude: NodeId,
        smallest: NodeId,
    },
}

impl Node {
    /// The same node with its operands, bindings and scalar slots
    /// renumbered (splicing one kernel into another).
    pub fn remap(
        self,
        id: impl Fn(NodeId) -> NodeId,
        binding: impl Fn(usize) -> usize,
        slot: impl Fn(usize) -> usize,
    ) -> Node {
        match self {
            Node::Input(b) => Node::Input(binding(b)),
            Node::Scalar(s) => Node::Scalar(slot(s)),
            Node::Index => Node::Index,
            Node::Random(kind, s) => Node::Random(kind, slot(s)),
            Node::RandomAt(kind, lo, hi) => Node::RandomAt(kind, id(lo), id(hi)),
            Node::Unary(op, a) => Node::Unary(op, id(a)),
            Node::Binary(op, x, y) => Node::Binary(op, id(x), id(y)),
            Node::Compare(op, x, y) => Node::Compare(op, id(x), id(y)),
            Node::Select(c, x, y) => Node::Select(id(c), id(x), id(y)),
            Node::Cast(a) => Node::Cast(id(a)),
            Node::Arg => Node::Arg,
            Node::Gather(b, offset) => Node::Gather(binding(b), id(offset)),
            Node::SegmentSum { values, starts, positions, batched } => Node::SegmentSum {
                values: binding(values),
                starts: binding(starts),
                positions: binding(positions),
                batched,
            },
            Node::RowReduce(kind, a) => Node::RowReduce(kind, id(a)),
            Node::CheckedRowSum { fast, src, addends, magnitude, smallest } => Node::CheckedRowSum {
                fast: id(fast),
                src: id(src),
                addends: id(addends),
                magnitude: id(magnitude),
                smallest: id(smallest),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct MapKernel {
    pub inputs: Vec<(DType, Access)>,
    pub nodes: Vec<(Node, DType)>,
    pub outputs: Vec<(NodeId, Access)>,
    /// dtype of each scalar slot (scalars travel as 32-bit patterns).
    pub scalars: Vec<DType>,
}

impl MapKernel {
    /// The kernel that copies its one input: `out = in`.
    pub fn copy(dtype: DType) -> MapKernel {
        let mut k = MapKernel::default();
        let x = k.input(dtype);
        k.output(x);
        k
    }

    pub fn input(&mut self, dtype: DType) -> NodeId {
        self.inputs.push((dtype, Access::Linear));
        self.push(Node::Input(self.inputs.len() - 1), dtype)
    }

    /// A gathered binding (no node of its own: [`Node::Gather`] and
    /// [`Node::SegmentSum`] read it).
    pub fn gathered(&mut self, dtype: DType) -> usize {
        self.inputs.push((dtype, Access::Gathered));
        self.inputs.len() - 1
    }

    /// Whether the kernel's value at an index depends on the index itself
    /// (so it cannot be evaluated through another view of its output).
    pub fn positional(&self) -> bool {
        self.nodes
            .iter()
            .any(|(n, _)| matches!(n, Node::Index | Node::Random(..) | Node::RandomAt(..) | Node::SegmentSum { .. }))
    }

    pub fn scalar(&mut self, dtype: DType) -> NodeId {
        let slot = self.scalar_slot(dtype);
        self.push(Node::Scalar(slot), dtype)
    }

    /// A scalar uniform slot with no node of its own (e.g. a random seed).
    pub fn scalar_slot(&mut self, dtype: DType) -> usize {
        self.scalars.push(dtype);
        self.scalars.len() - 1
    }

    pub fn push(&mut self, node: Node, dtype: DType) -> NodeId {
        self.nodes.push((node, dtype));
        self.nodes.len() - 1
    }

    pub fn dtype(&self, id: NodeId) -> DType {
        self.nodes[id].1
    }

    pub fn output(&mut self, id: NodeId) {
        self.outputs.push((id, Access::Linear));
    }

    /// The ops of the kernel in order (`mul, exp, where`), for the
    /// profiler; empty for a copy.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self
            .nodes
            .iter()
            .filter_map(|(n, _)| match n {
                Node::Input(_) | Node::Scalar(_) | Node::Index | Node::Arg => None,
                Node::Random(RandomKind::Uniform, _) => Some("rand"),
                Node::Random(RandomKind::Normal, _) => Some("randn"),
                Node::RandomAt(RandomKind::Uniform, ..) => Some("rand"),
                Node::RandomAt(RandomKind::Normal, ..) => Some("randn"),
                Node::Unary(op, _) => Some(op.name()),
                Node::Binary(op, _, _) => Some(op.name()),
                Node::Compare(op, _, _) => Some(op.name()),
                Node::Select(..) => Some("where"),
                Node::Cast(_) => Some("cast"),
                Node::Gather(..) => Some("gather"),
                Node::SegmentSum { .. } => Some("segment_sum"),
                Node::RowReduce(crate::exec::ReduceKind::Sum, _) => Some("row sum"),
                Node::RowReduce(crate::exec::ReduceKind::Max, _) => Some("row max"),
                Node::RowReduce(crate::exec::ReduceKind::Min, _) => Some("row min"),
                Node::CheckedRowSum { .. } => Some("row sum"),
            })
            .collect();
        names.join(", ")
    }

    pub fn uses_f16(&self) -> bool {
        self.nodes.iter().any(|(_, d)| *d == DType::F16) || self.inputs.iter().any(|(d, _)| *d == DType::F16)
    }
}
