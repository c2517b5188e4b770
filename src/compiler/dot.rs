//! Graphviz export of a captured graph: one box per value, one cluster
//! per kernel (the values it stores and those it computes inline).

use std::fmt::Write;

use crate::compiler::fusion::Step;
use crate::compiler::ir::{CapturedGraph, IrOp, fmt_use, kernel_expr, kind_name};

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn label(g: &CapturedGraph, id: usize) -> String {
    let v = &g.values[id];
    let what = match &v.op {
        IrOp::Input { slot } => format!("input {slot}"),
        IrOp::Map { label, kernel, scalars, .. } => {
            format!("{label}: {}", kernel_expr(kernel, kernel.outputs[0].0, scalars))
        }
        IrOp::Hook { point, .. } => format!("hooks of node {point}"),
        op => kind_name(op).to_string(),
    };
    format!("%{id} {what}\\n{:?}{}", v.meta.dtype, v.meta.shape)
}

pub(crate) fn render(g: &CapturedGraph, steps: &[Step]) -> String {
    let mut s = String::from("digraph backward {\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
    let mut clustered = vec![false; g.values.len()];
    for (k, step) in steps.iter().enumerate() {
        let _ = writeln!(s, "  subgraph cluster_{k} {{\n    label=\"kernel {k}: {}\"; style=rounded;", step.name());
        for v in step.stores().into_iter().chain(step.inlined().iter().copied()) {
            if !clustered[v] {
                clustered[v] = true;
                let _ = writeln!(s, "    v{v} [label=\"{}\"];", escape(&label(g, v)));
            }
        }
        s.push_str("  }\n");
    }
    for (id, done) in clustered.iter().enumerate() {
        if !done {
            let _ = writeln!(s, "  v{id} [label=\"{}\", style=dashed];", escape(&label(g, id)));
        }
    }
    for (id, v) in g.values.iter().enumerate() {
        for u in v.op.uses() {
            let view = fmt_use(u, &g.values);
            let attr = if view.contains('{') {
                format!(" [label=\"view\", tooltip=\"{}\"]", escape(&view))
            } else {
                String::new()
            };
            let _ = writeln!(s, "  v{} -> v{id}{attr};", u.value);
        }
    }
    for (v, role) in &g.outputs {
        let _ = writeln!(s, "  out_{v} [label=\"{}\", shape=oval];\n  v{v} -> out_{v};", escape(&format!("{role:?}")));
    }
    s.push_str("}\n");
    s
}
