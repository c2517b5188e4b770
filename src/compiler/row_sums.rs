//! Row sums distributed over per-row factors: a pass on row kernels that
//! cuts the loops a row kernel makes over each row (issue 15).
//!
//! A row kernel loops over its row once per level of row reductions (a
//! reduction that reads another's result waits a loop for it). In a
//! backward, most row sums read earlier sums only as per-row factors: the
//! softmax backward sums `(g_k / s + c) * e_k * h_k` where `s` and `c` are
//! row sums and `e_k` is the exponential the forward summed. Such a sum is
//! `(1 / s) · Σ g_k e_k h_k + c · Σ e_k h_k`: two sums that wait only for
//! what `e_k` waits for, so they join the loop of `s` itself. A layer_norm
//! and softmax step (W4) goes from eight loops over each row to five.
//!
//! The rewrite is exact in real arithmetic. In floating point:
//! - only sums that are linear in the factors they are distributed over
//!   are rewritten (`x * u`, `x / u`, `a + b` and `a - b` where both sides
//!   depend on the factors, negation), never a product of two values that
//!   both depend on them: `Σ (x - m)²` (a variance) stays as written;
//! - each addend of a distributed `a + b` has been multiplied or divided
//!   by a factor, so the sum as written rounds each addend before adding
//!   it, as the distributed sums do;
//! - the distributed sum is checked in the kernel ([`Node::CheckedRowSum`])
//!   and where it is not to be trusted the row is summed again as written:
//!   an inf or NaN (so they come out as eager's), a zero (whose sign the
//!   sum as written may not share: `-0` would flip an infinity later), a
//!   term near underflow (the distribution multiplies before it divides),
//!   and addends that cancel where the written ones did not: the error of
//!   summing K addends, about `ε·sqrt(K)·Σ|f·Σt|`, past 2^-13 of the
//!   result and past four times the rounding error the sum as written
//!   makes anyway (`Σ (a·u - b·u)` with a ≈ b). A review found each of
//!   these (`tests/row_kernels.rs`). Where the rows have inherent
//!   cancellation (a layer_norm backward's sums over centred values) the
//!   distributed sums keep the written sum's order of error, and run.
//!   A distributed sum can be finite where the undistributed one
//!   overflowed (the products overflow, their sum would not): then it is
//!   the better answer, not eager's inf.
//!
//! The rewrite is kept only where it removes a loop, and only while the
//! kernel's worst case (every checked sum summing again) stays within the
//! loops the fusion budgeted for the group ([`crate::exec::LOOP_BUDGET`]).

use std::collections::HashMap;

use crate::exec::ReduceKind;
use crate::exec::codegen::{row_levels, row_uniform_nodes};
use crate::exec::kernel::{Access, MapKernel, Node, NodeId};
use crate::metadata::DType;
use crate::ops::binary::BinaryOp;
use crate::ops::unary::UnaryOp;

use super::fusion::Step;

/// The most addends one distributed sum may have.
const MAX_TERMS: usize = 16;

/// Distributes the row sums of every row kernel of `steps`; the loops over
/// rows it saved, in all.
pub(crate) fn distribute(steps: &mut [Step]) -> usize {
    let mut saved = 0;
    for step in steps {
        let Step::Rows { kernel, reads, passes, .. } = step else { continue };
        // Inputs read through a view that stays put along the row. (The
        // launch also counts every input of a row of one element as
        // uniform; counting fewer is only less rewriting.)
        let uniform_inputs: Vec<bool> = kernel
            .inputs
            .iter()
            .zip(reads.iter())
            .map(|((_, access), u)| *access != Access::Gathered && u.layout.strides.get(1) == Some(&0))
            .collect();
        let before = loops(kernel);
        let rewritten = rewrite(kernel, &uniform_inputs);
        let after = loops(&rewritten);
        let checked = rewritten.nodes.iter().filter(|(n, _)| matches!(n, Node::CheckedRowSum { .. })).count();
        if after < before && after + checked <= *passes {
            saved += before - after;
            *kernel = rewritten;
            *passes = after;
        }
    }
    saved
}

/// Loops over each row: one per level of row reductions, one for the stores.
fn loops(k: &MapKernel) -> usize {
    row_levels(k).into_iter().max().unwrap_or(0) + 1
}

/// One addend of a distributed sum: `±(Σ term) op f op f ...`, the row sum
/// of an element-varying `term` times or over per-row `factors`. `term`
/// is `None` for a per-row factor alone (the sum of it is not formed:
/// that addend must meet an element-varying value before the sum).
#[derive(Clone)]
struct Addend {
    negated: bool,
    factors: Vec<(BinaryOp, NodeId)>,
    term: Option<NodeId>,
}

/// The kernel being rewritten: nodes copied from the old one in order,
/// and the nodes the distribution adds (each built once).
struct Rewriter<'a> {
    k: MapKernel,
    uniform_inputs: &'a [bool],
    uniform: Vec<bool>,
    level: Vec<usize>,
    built: HashMap<(Node, DType), NodeId>,
}

impl Rewriter<'_> {
    fn push(&mut self, node: Node, dtype: DType) -> NodeId {
        let id = self.k.push(node, dtype);
        // Uniformity and level of the new node, as codegen sees them.
        let uniform = crate::exec::codegen::row_uniform(&node, &self.uniform, self.uniform_inputs);
        let level = crate::exec::codegen::row_level(&node, &self.level);
        self.uniform.push(uniform);
        self.level.push(level);
        id
    }

    /// `node`, reusing an identical one the distribution built before.
    fn build(&mut self, node: Node) -> NodeId {
        if let Some(&id) = self.built.get(&(node, DType::F32)) {
            return id;
        }
        let id = self.push(node, DType::F32);
        self.built.insert((node, DType::F32), id);
        id
    }

    /// `n` as a sum of addends whose terms wait for no row reduction of
    /// level `at` or above; `None` where it is not linear in the per-row
    /// values that do (or not f32, or too many addends).
    fn split(&mut self, n: NodeId, at: usize) -> Option<Vec<Addend>> {
        if self.k.dtype(n) != DType::F32 {
            return None;
        }
        if self.level[n] < at {
            return Some(vec![Addend { negated: false, factors: Vec::new(), term: Some(n) }]);
        }
        if self.uniform[n] {
            return Some(vec![Addend { negated: false, factors: vec![(BinaryOp::Mul, n)], term: None }]);
        }
        let high = |r: &Self, x: NodeId| r.level[x] >= at;
        let out = match self.k.nodes[n].0 {
            Node::Unary(UnaryOp::Neg, a) => {
                let mut v = self.split(a, at)?;
                v.iter_mut().for_each(|t| t.negated = !t.negated);
                v
            }
            Node::Binary(BinaryOp::Mul, a, b) => match (high(self, a), high(self, b)) {
                (true, true) if self.uniform[a] => self.scaled(b, (BinaryOp::Mul, a), at)?,
                (true, true) if self.uniform[b] => self.scaled(a, (BinaryOp::Mul, b), at)?,
                (true, true) => return None,
                (true, false) => self.times(a, b, at)?,
                (false, _) => self.times(b, a, at)?,
            },
            Node::Binary(BinaryOp::Div, a, b) => match high(self, b) {
                true if self.uniform[b] => self.scaled(a, (BinaryOp::Div, b), at)?,
                true => return None,
                false => {
                    let mut v = self.split(a, at)?;
                    for t in &mut v {
                        t.term = Some(self.build(Node::Binary(BinaryOp::Div, t.term?, b)));
                    }
                    v
                }
            },
            Node::Binary(op @ (BinaryOp::Add | BinaryOp::Sub), a, b) if high(self, a) && high(self, b) => {
                let mut v = self.split(a, at)?;
                let mut w = self.split(b, at)?;
                if op == BinaryOp::Sub {
                    w.iter_mut().for_each(|t| t.negated = !t.negated);
                }
                v.extend(w);
                v
            }
            _ => return None,
        };
        (out.len() <= MAX_TERMS).then_some(out)
    }

    /// The addends of `n`, each scaled by a per-row `factor`.
    fn scaled(&mut self, n: NodeId, factor: (BinaryOp, NodeId), at: usize) -> Option<Vec<Addend>> {
        let mut v = self.split(n, at)?;
        v.iter_mut().for_each(|t| t.factors.push(factor));
        Some(v)
    }

    /// The addends of `n`, each term times `low` (a value that waits for
    /// no reduction at level `at` or above).
    fn times(&mut self, n: NodeId, low: NodeId, at: usize) -> Option<Vec<Addend>> {
        let mut v = self.split(n, at)?;
        for t in &mut v {
            t.term = Some(match t.term {
                Some(term) => self.build(Node::Binary(BinaryOp::Mul, term, low)),
                None => low,
            });
        }
        Some(v)
    }

    /// The distributed row sum of `src` at the lowest level it splits at,
    /// checked against the sum as written; `None` where it does not split.
    fn distributed(&mut self, src: NodeId) -> Option<NodeId> {
        for at in 1..=self.level[src] {
            let mark = self.k.nodes.len();
            let built = self.built.clone();
            match self.split(src, at) {
                Some(addends) if addends.iter().all(|t| t.term.is_some()) => {
                    // The sum, and what its check reads (see the node).
                    let (mut fast, mut values, mut magnitude, mut smallest): (
                        Option<NodeId>,
                        Option<NodeId>,
                        Option<NodeId>,
                        Option<NodeId>,
                    ) = (None, None, None, None);
                    let add = |r: &mut Self, acc: Option<NodeId>, v: NodeId, op: BinaryOp| {
                        Some(acc.map_or(v, |acc| r.build(Node::Binary(op, acc, v))))
                    };
                    for t in addends {
                        let term = t.term?;
                        let mut v = self.build(Node::RowReduce(ReduceKind::Sum, term));
                        let absolute = self.build(Node::Unary(UnaryOp::Abs, term));
                        let absolute = self.build(Node::RowReduce(ReduceKind::Sum, absolute));
                        let mut size = absolute;
                        for (op, f) in t.factors {
                            v = self.build(Node::Binary(op, v, f));
                            size = self.build(Node::Binary(op, size, f));
                        }
                        let (value, size) =
                            (self.build(Node::Unary(UnaryOp::Abs, v)), self.build(Node::Unary(UnaryOp::Abs, size)));
                        if t.negated {
                            v = self.build(Node::Unary(UnaryOp::Neg, v));
                        }
                        fast = add(self, fast, v, BinaryOp::Add);
                        values = add(self, values, value, BinaryOp::Add);
                        magnitude = add(self, magnitude, size, BinaryOp::Add);
                        smallest = add(self, smallest, absolute, BinaryOp::Minimum);
                    }
                    let (fast, addends, magnitude, smallest) = (fast?, values?, magnitude?, smallest?);
                    let checked = Node::CheckedRowSum { fast, src, addends, magnitude, smallest };
                    return Some(self.push(checked, DType::F32));
                }
                _ => {
                    // Drop what the failed split built.
                    self.k.nodes.truncate(mark);
                    self.uniform.truncate(mark);
                    self.level.truncate(mark);
                    self.built = built;
                }
            }
        }
        None
    }
}

/// `k` with each f32 row sum that reads earlier row sums as linear
/// per-row factors distributed over them (see the module doc).
fn rewrite(k: &MapKernel, uniform_inputs: &[bool]) -> MapKernel {
    let mut r = Rewriter {
        k: MapKernel { inputs: k.inputs.clone(), nodes: Vec::new(), outputs: Vec::new(), scalars: k.scalars.clone() },
        uniform_inputs,
        uniform: Vec::new(),
        level: Vec::new(),
        built: HashMap::new(),
    };
    let mut map: Vec<NodeId> = Vec::with_capacity(k.nodes.len());
    for &(node, dtype) in &k.nodes {
        let node = node.remap(|n| map[n], |b| b, |s| s);
        let id = match node {
            Node::RowReduce(ReduceKind::Sum, src) if dtype == DType::F32 && r.level[src] > 0 => {
                match r.distributed(src) {
                    Some(id) => id,
                    None => r.push(node, dtype),
                }
            }
            _ => r.push(node, dtype),
        };
        map.push(id);
    }
    r.k.outputs = k.outputs.iter().map(|&(n, access)| (map[n], access)).collect();
    debug_assert_eq!(r.uniform, row_uniform_nodes(&r.k, uniform_inputs));
    r.k
}
