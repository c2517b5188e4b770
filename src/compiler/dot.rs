//! Graphviz export of a captured graph: one box per value, one cluster
//! per kernel (the values it stores and those it computes inline). In a
//! compiled step, values are filled by the part of the step that traced
//! them (forward blue, backward yellow, optimizer green) and each kernel
//! names the parts it fuses.

use std::fmt::Write;

use crate::compiler::fusion::Step;
use crate::compiler::ir::{CapturedGraph, IrOp, Phase, fmt_use, kernel_expr, kind_name};

fn color(phase: Phase) -> &'static str {
    match phase {
        Phase::Forward => "#dbe8fb",
        Phase::Backward => "#fbf1c7",
        Phase::Optimizer => "#d8f0d2",
    }
}

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
    let step_graph = g.values.iter().any(|v| v.phase != Phase::Backward);
    let name = if step_graph { "step" } else { "backward" };
    let mut s = format!("digraph {name} {{\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
    let mut clustered = vec![false; g.values.len()];
    let fill = |id: usize| {
        if step_graph { format!(", style=filled, fillcolor=\"{}\"", color(g.values[id].phase)) } else { String::new() }
    };
    for (k, step) in steps.iter().enumerate() {
        let members: Vec<usize> = step.stores().into_iter().chain(step.inlined().iter().copied()).collect();
        let mut parts: Vec<Phase> = Vec::new();
        for &v in &members {
            if !parts.contains(&g.values[v].phase) {
                parts.push(g.values[v].phase);
            }
        }
        let parts = match step_graph {
            true => {
                format!(" [{}]", parts.iter().map(|p| format!("{p:?}").to_lowercase()).collect::<Vec<_>>().join("+"))
            }
            false => String::new(),
        };
        let _ =
            writeln!(s, "  subgraph cluster_{k} {{\n    label=\"kernel {k}: {}{parts}\"; style=rounded;", step.name());
        for v in members {
            if !clustered[v] {
                clustered[v] = true;
                let _ = writeln!(s, "    v{v} [label=\"{}\"{}];", escape(&label(g, v)), fill(v));
            }
        }
        s.push_str("  }\n");
    }
    for (id, done) in clustered.iter().enumerate() {
        if !done {
            let style = if step_graph {
                format!("style=\"dashed,filled\", fillcolor=\"{}\"", color(g.values[id].phase))
            } else {
                "style=dashed".to_string()
            };
            let _ = writeln!(s, "  v{id} [label=\"{}\", {style}];", escape(&label(g, id)));
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
