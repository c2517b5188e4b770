//! Graph passes on the captured IR: algebraic simplification, common
//! subexpression elimination and dead-code elimination. Movement chains
//! (reshape of transpose of broadcast ...) never reach the IR as nodes:
//! the trace composes them into one view per use, and simplification
//! looks through copies by composing views again.

use std::collections::HashMap;

use crate::compiler::ir::{CapturedGraph, IrOp, Use, Value, ValueId};
use crate::exec::kernel::{Access, MapKernel, Node};
use crate::ops::binary::BinaryOp;
use crate::ops::unary::UnaryOp;

/// What each pass changed, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PassStats {
    pub simplified: usize,
    pub merged: usize,
    pub removed: usize,
}

pub(crate) fn optimize(g: CapturedGraph) -> (CapturedGraph, PassStats) {
    let (g, simplified) = simplify(g);
    let (g, merged) = cse(g);
    let (g, removed) = dce(g);
    (g, PassStats { simplified, merged, removed })
}

/// A single-op kernel operand: a kernel input or a scalar constant.
enum Operand {
    Input(usize),
    Scalar(f64),
}

fn operand(k: &MapKernel, scalars: &[f64], n: usize) -> Option<Operand> {
    match k.nodes[n].0 {
        Node::Input(j) => Some(Operand::Input(j)),
        Node::Scalar(j) => scalars.get(j).map(|&v| Operand::Scalar(v)),
        _ => None,
    }
}

/// The input a value equals without computing anything, if any: `x * 1`,
/// `1 * x`, `x / 1`, `x + 0`, `0 + x`, `x - 0`, a cast to the same dtype,
/// a copy, `-(-x)` (the inner negation being `inner`).
fn passthrough(v: &Value, values: &[Value]) -> Option<Use> {
    let IrOp::Map { kernel: k, args, scalars, .. } = &v.op else { return None };
    let out = k.outputs[0].0;
    let arg = |j: usize| args.get(j).cloned();
    match k.nodes[out].0 {
        Node::Input(j) => arg(j),
        Node::Cast(a) if k.dtype(a) == k.dtype(out) => match operand(k, scalars, a)? {
            Operand::Input(j) => arg(j),
            Operand::Scalar(_) => None,
        },
        Node::Binary(op, a, b) => {
            let (x, y) = (operand(k, scalars, a)?, operand(k, scalars, b)?);
            match (op, x, y) {
                (BinaryOp::Mul | BinaryOp::Div, Operand::Input(j), Operand::Scalar(1.0)) => arg(j),
                (BinaryOp::Add | BinaryOp::Sub, Operand::Input(j), Operand::Scalar(0.0)) => arg(j),
                (BinaryOp::Mul, Operand::Scalar(1.0), Operand::Input(j)) => arg(j),
                (BinaryOp::Add, Operand::Scalar(0.0), Operand::Input(j)) => arg(j),
                _ => None,
            }
        }
        Node::Unary(UnaryOp::Neg, a) => {
            let Operand::Input(j) = operand(k, scalars, a)? else { return None };
            let inner = arg(j)?;
            let IrOp::Map { kernel: ik, args: iargs, .. } = &values[inner.value].op else { return None };
            let iout = ik.outputs[0].0;
            let Node::Unary(UnaryOp::Neg, ia) = ik.nodes[iout].0 else { return None };
            let Node::Input(ij) = ik.nodes[ia].0 else { return None };
            let x = iargs.get(ij)?;
            Some(Use { value: x.value, layout: inner.layout.compose(&x.layout)? })
        }
        _ => None,
    }
}

/// Redirects reads of pass-through values to what they pass through,
/// where the reader's view composes with theirs. The pass-through values
/// themselves stay until DCE finds them unread.
fn simplify(mut g: CapturedGraph) -> (CapturedGraph, usize) {
    let mut alias: Vec<Option<Use>> = vec![None; g.values.len()];
    let mut count = 0;
    for id in 0..g.values.len() {
        // Reads first, so chains of pass-throughs collapse in one sweep.
        let reader_is_matmul = matches!(g.values[id].op, IrOp::Matmul { .. });
        // Reads at computed offsets see a flat buffer: they need contiguous views.
        let gathered: Vec<bool> = match &g.values[id].op {
            IrOp::Map { kernel, .. } => kernel.inputs.iter().map(|(_, a)| *a == Access::Gathered).collect(),
            _ => Vec::new(),
        };
        let mut op = g.values[id].op.clone();
        for (j, u) in op.uses_mut().into_iter().enumerate() {
            if reader_is_matmul {
                continue; // matmul operands need a batch-collapsible view
            }
            if let Some(target) = &alias[u.value] {
                if let Some(layout) = u.layout.compose(&target.layout) {
                    if gathered.get(j).copied().unwrap_or(false) && !layout.is_contiguous() {
                        continue;
                    }
                    *u = Use { value: target.value, layout };
                    count += 1;
                }
            }
        }
        g.values[id].op = op;
        alias[id] = passthrough(&g.values[id], &g.values);
    }
    // An output that passes a computed value through, element for element,
    // can be that value (outputs need buffers of their own, so not inputs).
    for o in 0..g.outputs.len() {
        let Some(target) = &alias[g.outputs[o].0] else { continue };
        let v = &g.values[target.value];
        let owned = !matches!(v.op, IrOp::Input { .. } | IrOp::Hook { .. });
        let taken = g.outputs.iter().any(|(out, _)| *out == target.value);
        if owned && target.is_identity(&v.meta) && !taken {
            g.outputs[o].0 = target.value;
            count += 1;
        }
    }
    (g, count)
}

/// Merges values computed by the same op from the same reads.
fn cse(mut g: CapturedGraph) -> (CapturedGraph, usize) {
    let mut seen: HashMap<String, ValueId> = HashMap::new();
    let mut canon: Vec<ValueId> = (0..g.values.len()).collect();
    let mut merged = 0;
    for id in 0..g.values.len() {
        for u in g.values[id].op.uses_mut() {
            u.value = canon[u.value];
        }
        let v = &g.values[id];
        let key = match &v.op {
            IrOp::Input { .. } | IrOp::Hook { .. } => continue,
            IrOp::Map { kernel, args, scalars, .. } => {
                let bits: Vec<u64> = scalars.iter().map(|s| s.to_bits()).collect();
                format!("map {kernel:?} {args:?} {bits:?} {:?}", v.meta)
            }
            op => format!("{op:?} {:?}", v.meta),
        };
        match seen.get(&key) {
            Some(&first) => {
                canon[id] = first;
                merged += 1;
            }
            None => {
                seen.insert(key, id);
            }
        }
    }
    for (v, _) in &mut g.outputs {
        *v = canon[*v];
    }
    (g, merged)
}

/// Drops values nothing reads (hooks always run: they are user code), and
/// renumbers the rest.
fn dce(g: CapturedGraph) -> (CapturedGraph, usize) {
    let n = g.values.len();
    let mut live = vec![false; n];
    for (v, _) in &g.outputs {
        live[*v] = true;
    }
    for (id, v) in g.values.iter().enumerate() {
        if matches!(v.op, IrOp::Hook { .. }) {
            live[id] = true;
        }
    }
    for id in (0..n).rev() {
        if live[id] {
            for u in g.values[id].op.uses() {
                live[u.value] = true;
            }
        }
    }
    let mut new_id = vec![usize::MAX; n];
    let mut values = Vec::new();
    for (id, mut v) in g.values.into_iter().enumerate() {
        // Inputs keep their slots: the program is bound to all of them.
        if !live[id] && !matches!(v.op, IrOp::Input { .. }) {
            continue;
        }
        for u in v.op.uses_mut() {
            u.value = new_id[u.value];
        }
        new_id[id] = values.len();
        values.push(v);
    }
    let removed = n - values.len();
    let outputs = g.outputs.into_iter().map(|(v, r)| (new_id[v], r)).collect();
    (CapturedGraph { values, inputs: g.inputs, outputs }, removed)
}
