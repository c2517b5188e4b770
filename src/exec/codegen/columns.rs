//! Column reductions: a reduction over the outer axis of its operands (a
//! bias gradient summed over a batch, a layer_norm weight's gradient) run
//! four results per invocation, so the four read neighbouring elements as
//! one vec4, and a value the four share (a per-row statistic) is read once.
//! The reduce template's own form reads a row apart per invocation; on
//! llvmpipe, which loads storage one scalar per SIMD lane in a loop, that
//! is four times the loads.

use std::fmt::Write;

use super::{
    Binds, MapKernel, Names, REDUCE_WORDS, ReduceKind, declare, index_at, node_line, reduce_head, reduced_parts,
    split_index, view_base,
};
use crate::exec::kernel::{Access, Node};

const TEMPLATE: &str = include_str!("../../../shaders/reduce_columns.wgsl");

/// How a column reduction reads one input for its four results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ColumnRead {
    /// One vec4 of the four neighbouring elements (an [`Access::Split`]
    /// view with `sa` = 1, every step's four vec4-aligned).
    Vec4,
    /// One element the four share (`sa` = 0, or a broadcast scalar).
    Once,
    /// An element per result, at its own index.
    PerResult,
}

/// The first pass of a reduction over an [A, K] iteration (as
/// [`super::render_reduce`]), four results per invocation, input `j` read
/// as `reads[j]` says. The template words count A / 4.
pub(crate) fn render_reduce_columns(
    k: &MapKernel,
    kind: ReduceKind,
    reduced: usize,
    reads: &[ColumnRead],
    binds: &Binds,
) -> String {
    let n_in = k.inputs.len();
    let vec4_inputs = (0..n_in).filter(|&j| reads[j] == ColumnRead::Vec4);
    let names = Names::new(binds, vec4_inputs.collect::<Vec<_>>(), n_in..n_in + k.outputs.len());
    let mut s = declare(k, &names, REDUCE_WORDS);
    s.push_str(&reduce_head(k, kind, reduced, &names));
    s.push_str("fn fold4(acc: array<T, 4>, a4: u32, kk: u32) -> array<T, 4> {\n");
    for (j, read) in reads.iter().enumerate() {
        let base = view_base(j);
        match read {
            ColumnRead::Vec4 => {
                let q = format!("(p({base}u) + kk * p({}u)) / 4u + a4 / 4u", base + 2);
                let _ = writeln!(s, "    let in{j}_q = {};", names.vec_load(j, &q));
            }
            ColumnRead::Once => {
                let at = match k.inputs[j].1 {
                    Access::Broadcast => format!("p({base}u)"),
                    _ => split_index(base, "a4", "kk"),
                };
                let _ = writeln!(s, "    let in{j}_s = {};", names.at(j, &at));
            }
            ColumnRead::PerResult => {}
        }
    }
    let mut results = Vec::new();
    for l in 0..4 {
        let a = format!("(a4 + {l}u)");
        let i = format!("({a} * p(R + 1u) + kk)");
        let name = |n: usize| format!("v{n}_{l}");
        let read = |j: usize| match (reads[j], k.inputs[j].1) {
            (ColumnRead::Vec4, _) => format!("in{j}_q.{}", ["x", "y", "z", "w"][l]),
            (ColumnRead::Once, _) => format!("in{j}_s"),
            (ColumnRead::PerResult, Access::Split) => names.at(j, &split_index(view_base(j), &a, "kk")),
            (ColumnRead::PerResult, access) => names.at(j, &index_at(access, view_base(j), &i)),
        };
        for id in 0..k.nodes.len() {
            s.push_str(&node_line(k, &names, id, &i, &name, &read));
        }
        for (o, (node, access)) in k.outputs.iter().enumerate().skip(reduced) {
            let at = index_at(*access, view_base(n_in + o), &i);
            let _ = writeln!(s, "    {} = {};", names.at(n_in + o, &at), name(*node));
        }
        let parts: Vec<String> = k.outputs[..reduced].iter().map(|(n, _)| name(*n)).collect();
        results.push(format!("combine(acc[{l}], T({}))", reduced_parts(k, &parts)));
    }
    let _ = writeln!(s, "    return array<T, 4>({});\n}}", results.join(", "));
    debug_assert!(!k.nodes.iter().any(|(n, _)| matches!(n, Node::SegmentSum { .. })));
    s.push_str(TEMPLATE);
    s
}
