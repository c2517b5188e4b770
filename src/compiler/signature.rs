//! The signature of a backward: everything that decides what the compiled
//! program computes. Two backward calls with equal signatures run the
//! same program on different buffers.

use std::fmt::Write;

use crate::autograd::BackwardOptions;
use crate::autograd::GraphTask;
use crate::autograd::NodeKind;
use crate::autograd::capture::Bindings;
use crate::tensor::Tensor;

/// Node kinds and attributes, the [`crate::InputMetadata`] of every input
/// (with the saved tensors' strides), which leaves want gradients and
/// whether their `.grad` is defined, hook counts, and the options; one line
/// per item so a cache miss can say what changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    lines: Vec<(Kind, String)>,
}

/// What a signature line describes, to classify cache misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Options,
    Root,
    Node,
    Saved,
    Leaf,
}

fn view(t: &Tensor) -> String {
    let l = t.layout();
    format!("{:?}{} strides {:?} offset {}", t.dtype(), t.shape(), l.strides, l.offset)
}

impl Signature {
    pub(crate) fn of(task: &GraphTask, options: BackwardOptions, bindings: &Bindings) -> Signature {
        let mut lines = Vec::new();
        let sink = match (&task.targets, &task.inputs) {
            (None, None) => "accumulate into leaves".to_string(),
            (None, Some(inputs)) => format!("accumulate into inputs at nodes {inputs:?}"),
            (Some(t), _) => {
                let mut t: Vec<_> = t.iter().collect();
                t.sort();
                format!("grad() of nodes {t:?}")
            }
        };
        lines.push((Kind::Options, format!("{options:?}; {sink}")));
        for (i, seed) in &task.roots {
            lines.push((Kind::Root, format!("root node {i} seed {}", view(seed))));
        }
        for (i, node) in task.order.iter().enumerate() {
            let edges: Vec<String> = node
                .edges
                .iter()
                .zip(&task.needs[i])
                .map(|(e, &need)| match (&e.node, need) {
                    (Some(c), true) => task.index[&crate::autograd::key(c)].to_string(),
                    _ => "-".into(),
                })
                .collect();
            let hooks = node.hook_count();
            match &node.kind {
                NodeKind::Op(op) => {
                    let mut s = format!("node {i} {op:?} -> [{}] hooks {hooks}", edges.join(","));
                    if task.retain.contains(&i) {
                        s.push_str(" retained");
                    }
                    let _ = write!(s, " grad {:?}{}", node.metadata.dtype, node.metadata.shape);
                    lines.push((Kind::Node, s));
                    for (j, &slot) in bindings.saved.get(&i).map(Vec::as_slice).unwrap_or(&[]).iter().enumerate() {
                        let t = &bindings.tensors[slot];
                        lines.push((Kind::Saved, format!("node {i} saved {j} = input {slot} {}", view(t))));
                    }
                }
                NodeKind::AccumulateGrad(leaf) => {
                    let grad = match (&task.targets, leaf.grad.lock().as_ref()) {
                        (None, Some(g)) => format!(".grad defined {}", view(g)),
                        (None, None) => ".grad undefined".into(),
                        (Some(_), _) => ".grad untouched".into(),
                    };
                    let meta = &leaf.metadata;
                    lines.push((Kind::Leaf, format!("leaf {i} {:?}{} hooks {hooks} {grad}", meta.dtype, meta.shape)));
                }
            }
        }
        Signature { lines }
    }

    /// The signature's text with its numbers replaced by `#` (the same at
    /// every batch size of a graph: its batch family's key) and those
    /// numbers, in order ([`crate::compiler::family::split_numbers`]).
    pub(crate) fn split_numbers(&self) -> (String, Vec<crate::compiler::family::Number>) {
        crate::compiler::family::split_numbers(&self.text())
    }

    /// A stable text of the whole signature (the cache key).
    pub fn text(&self) -> String {
        self.lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// Why a program for this signature cannot be the one for `previous`:
    /// the first line that differs, classified.
    pub fn difference(&self, previous: &Signature) -> String {
        let shapes_only = |a: &str, b: &str| {
            let strip = crate::compiler::family::without_numbers;
            strip(a) == strip(b)
        };
        for (k, ((ka, a), (kb, b))) in self.lines.iter().zip(&previous.lines).enumerate() {
            if a == b {
                continue;
            }
            let what = match (ka, kb) {
                (Kind::Options, _) => "changed backward options",
                (Kind::Leaf, Kind::Leaf) if shapes_only(a, b) => "changed shape",
                (Kind::Leaf, Kind::Leaf) => "changed leaf .grad state or hooks",
                (Kind::Leaf, _) | (_, Kind::Leaf) => "changed leaf set",
                (Kind::Node | Kind::Saved | Kind::Root, _) if ka == kb && shapes_only(a, b) => "changed shape",
                _ => "new node",
            };
            return format!("{what} (line {k}: `{b}` is now `{a}`)");
        }
        format!("graph grew from {} to {} signature lines (new node)", previous.lines.len(), self.lines.len())
    }
}
