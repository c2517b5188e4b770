//! The captured backward graph: an arena of values, each produced by one
//! kernel-level op and carrying the [`InputMetadata`] of what it holds.
//! Ops read other values through strided views ([`Use`]), so transposes,
//! broadcasts, slices and reshapes never appear as nodes: chains of them
//! are already composed into one view when the trace records the use.

use std::fmt::{self, Write};

use crate::exec::ReduceKind;
use crate::exec::kernel::{MapKernel, Node};
use crate::layout::Layout;
use crate::metadata::{DType, InputMetadata};

/// Index of a value in [`CapturedGraph`].
pub type ValueId = usize;

/// A read of a value through a strided view of its (contiguous) buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Use {
    pub value: ValueId,
    pub layout: Layout,
}

impl Use {
    /// Whether the read walks the value element for element.
    pub fn is_identity(&self, meta: &InputMetadata) -> bool {
        self.layout.is_identity_of(&meta.shape)
    }
}

#[derive(Debug, Clone)]
pub(crate) enum IrOp {
    /// A tensor bound at replay: a saved tensor, a seed, an existing `.grad`.
    /// Its buffer may hold more than the value (the use's view says where).
    Input { slot: usize },
    /// An elementwise kernel over the value's shape; `args[j]` feeds the
    /// kernel's input `j` through a view of that shape. Exactly one output.
    Map { label: &'static str, kernel: MapKernel, args: Vec<Use>, scalars: Vec<f64> },
    /// Reduces `src` over `axes`; the value has the kept dims.
    Reduce { kind: ReduceKind, src: Use, axes: Vec<usize> },
    /// `a` [.., m, k] @ `b` [.., k, n], both broadcast to the batch dims.
    Matmul { a: Use, b: Use },
    /// Pieces copied into windows `(dim, start)`; zeros elsewhere if `zero_fill`.
    Assemble { pieces: Vec<(Use, usize, usize)>, zero_fill: bool },
    /// The gradient after the user's hooks at hook point `point` ran on `src`.
    /// Hooks are host code: they run at replay, between kernels, in eager order.
    Hook { src: Use, point: usize },
}

impl IrOp {
    /// The values this op reads.
    pub fn uses(&self) -> Vec<&Use> {
        match self {
            IrOp::Input { .. } => Vec::new(),
            IrOp::Map { args, .. } => args.iter().collect(),
            IrOp::Reduce { src, .. } | IrOp::Hook { src, .. } => vec![src],
            IrOp::Matmul { a, b } => vec![a, b],
            IrOp::Assemble { pieces, .. } => pieces.iter().map(|(u, _, _)| u).collect(),
        }
    }

    pub fn uses_mut(&mut self) -> Vec<&mut Use> {
        match self {
            IrOp::Input { .. } => Vec::new(),
            IrOp::Map { args, .. } => args.iter_mut().collect(),
            IrOp::Reduce { src, .. } | IrOp::Hook { src, .. } => vec![src],
            IrOp::Matmul { a, b } => vec![a, b],
            IrOp::Assemble { pieces, .. } => pieces.iter_mut().map(|(u, _, _)| u).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Value {
    pub op: IrOp,
    pub meta: InputMetadata,
    /// Which part of a training step traced it (a backward graph is all
    /// `Backward`), for logs and the DOT drawing.
    pub phase: Phase,
}

/// The part of a compiled step a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Phase {
    /// The forward pass and the loss (and inputs).
    #[default]
    Forward,
    /// The backward formulas.
    Backward,
    /// The optimizer's update.
    Optimizer,
}

/// What a graph output becomes after replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum OutputRole {
    /// The new `.grad` of the leaf at this position of the walk.
    Leaf(usize),
    /// The gradient returned for this input of `wgrad::grad`.
    Captured(usize),
    /// The gradient of the retained non-leaf at this position of the walk
    /// (added to its `.grad` after the replay).
    Retained(usize),
    /// A compiled step's `i`-th returned tensor.
    Returned(usize),
    /// The `.grad` a compiled step leaves on its `i`-th changed leaf.
    StepGrad(usize),
    /// The new contents of input `slot`, written back into its buffer after
    /// every kernel that reads the old ones (an in-place update).
    Assign(usize),
}

/// A backward graph captured by the tracing executor: values in
/// topological order, the number of bound inputs, and the outputs.
#[derive(Debug, Clone)]
pub struct CapturedGraph {
    pub(crate) values: Vec<Value>,
    pub(crate) inputs: usize,
    pub(crate) outputs: Vec<(ValueId, OutputRole)>,
}

impl CapturedGraph {
    /// Number of values (nodes) in the graph.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the graph has no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// How many values of each kind, e.g. `"input": 3, "map": 7`.
    pub fn op_counts(&self) -> Vec<(&'static str, usize)> {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for v in &self.values {
            let k = kind_name(&v.op);
            match counts.iter_mut().find(|(n, _)| *n == k) {
                Some((_, c)) => *c += 1,
                None => counts.push((k, 1)),
            }
        }
        counts
    }

    /// Uses of each value (by consumers; outputs not counted).
    pub(crate) fn use_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.values.len()];
        for v in &self.values {
            for u in v.op.uses() {
                counts[u.value] += 1;
            }
        }
        counts
    }
}

pub(crate) fn kind_name(op: &IrOp) -> &'static str {
    match op {
        IrOp::Input { .. } => "input",
        IrOp::Map { .. } => "map",
        IrOp::Reduce { .. } => "reduce",
        IrOp::Matmul { .. } => "matmul",
        IrOp::Assemble { .. } => "assemble",
        IrOp::Hook { .. } => "hook",
    }
}

pub(crate) fn fmt_use(u: &Use, values: &[Value]) -> String {
    if u.is_identity(&values[u.value].meta) {
        format!("%{}", u.value)
    } else {
        format!("%{}{{{:?}/{:?}+{}}}", u.value, u.layout.shape.dims(), u.layout.strides, u.layout.offset)
    }
}

/// A one-line description of an elementwise kernel: the expression of its
/// output in terms of its inputs `$j` and scalars.
pub(crate) fn kernel_expr(k: &MapKernel, node: usize, scalars: &[f64]) -> String {
    let e = |n: usize| kernel_expr(k, n, scalars);
    match k.nodes[node].0 {
        Node::Input(j) => format!("${j}"),
        Node::Scalar(j) => scalars.get(j).map_or(format!("s{j}"), |v| format!("{v}")),
        Node::Index => "index".into(),
        Node::Random(kind, _) => format!("{kind:?}").to_lowercase(),
        Node::RandomAt(kind, lo, hi) => format!("{}({}, {})", format!("{kind:?}").to_lowercase(), e(lo), e(hi)),
        Node::Unary(op, a) => format!("{}({})", op.name(), e(a)),
        Node::Binary(op, a, b) => format!("{}({}, {})", op.name(), e(a), e(b)),
        Node::Compare(op, a, b) => format!("{op:?}({}, {})", e(a), e(b)).to_lowercase(),
        Node::Select(c, a, b) => format!("where({}, {}, {})", e(c), e(a), e(b)),
        Node::Cast(a) => format!("{}({})", dtype_name(k.nodes[node].1), e(a)),
        Node::Arg => "acc".into(),
        Node::Gather(j, off) => format!("${j}[{}]", e(off)),
        Node::SegmentSum { values, .. } => format!("segment_sum(${values})"),
        Node::RowReduce(kind, a) => format!("row_{}({})", format!("{kind:?}").to_lowercase(), e(a)),
        Node::CheckedRowSum { fast, src, .. } => format!("row_sum({} or {})", e(fast), e(src)),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::I32 => "i32",
        DType::U32 => "u32",
    }
}

impl fmt::Display for CapturedGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vals = &self.values;
        for (id, v) in vals.iter().enumerate() {
            let mut s = String::new();
            let _ = write!(s, "%{id}: {}{} = ", dtype_name(v.meta.dtype), v.meta.shape);
            if v.phase != Phase::Forward || self.values.iter().any(|v| v.phase != Phase::Forward) {
                let _ = write!(s, "[{}] ", format!("{:?}", v.phase).to_lowercase());
            }
            let _ = match &v.op {
                IrOp::Input { slot } => write!(s, "input {slot}"),
                IrOp::Map { label, kernel, args, scalars } => {
                    let args: Vec<String> = args.iter().map(|u| fmt_use(u, vals)).collect();
                    let expr = kernel_expr(kernel, kernel.outputs[0].0, scalars);
                    write!(s, "{label} {expr} ; $ = [{}]", args.join(", "))
                }
                IrOp::Reduce { kind, src, axes } => {
                    write!(s, "{} {} axes {axes:?}", format!("{kind:?}").to_lowercase(), fmt_use(src, vals))
                }
                IrOp::Matmul { a, b } => write!(s, "matmul {} {}", fmt_use(a, vals), fmt_use(b, vals)),
                IrOp::Assemble { pieces, zero_fill } => {
                    let p: Vec<String> =
                        pieces.iter().map(|(u, d, st)| format!("{}@dim{d}:{st}", fmt_use(u, vals))).collect();
                    write!(s, "assemble [{}] zero_fill={zero_fill}", p.join(", "))
                }
                IrOp::Hook { src, point } => write!(s, "hook point {point} {}", fmt_use(src, vals)),
            };
            writeln!(f, "{s}")?;
        }
        let outs: Vec<String> = self.outputs.iter().map(|(v, r)| format!("%{v} -> {r:?}")).collect();
        writeln!(f, "outputs: {}", outs.join(", "))
    }
}
