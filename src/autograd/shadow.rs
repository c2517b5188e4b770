//! The compiled backward at batch sizes it has not met (issue 16).
//!
//! A backward has no forward to run again at a smaller batch size, as the
//! compiled step has. What it has is its graph: every node's op and its
//! attributes, the metadata of every gradient and the views of the saved
//! tensors. Those are all the backward formulas read, and the signature
//! shows every one of them. This module makes that graph at a smaller batch
//! size, with views but no buffers, and traces the formulas on it: a
//! *shadow* of the backward, which the compiler fits with the traced size
//! as it fits three traced sizes (`compiler/family.rs`).
//!
//! The batch size B is the leading dim that most op nodes' gradients have
//! (of two tied, the smaller, then, where its shadows cannot be made, the
//! other).
//! At size B' a leading dim that is a multiple k·B becomes k·B' (a
//! gradient, a saved view, an op's input shape), an op's length along the
//! leading dim follows its input there, and a mean's scalar 1 / (k·B)
//! (times a sum over k·B elements) becomes 1 / (k·B'). Strides and offsets stay: growing the outermost dim
//! of a row-major view moves neither. A leaf is a parameter (its shape
//! stays, as does an op of parameters alone) or data (it follows the
//! batch). Which is searched for: all parameters first, then every leaf
//! whose leading dim could follow the batch, walking again with the
//! leaves flipped whose gradient came in their other shape, or, where a
//! formula failed, with each leaf of the failing node flipped in turn.
//!
//! A shadow is a guess only in *which* graph it makes: the formulas that
//! trace it are the real ones, so a shadow is the backward of a graph with
//! its signature, and the fit is as sound as a fit of three traced sizes.
//! A later size is instantiated only where its real signature is the one
//! the fit predicts, number for number. A wrong guess (a model dim equal to
//! the batch size, taken for it) mispredicts the next size, which is then
//! traced, and the family learns from traced sizes as before.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::autograd::capture::{Bindings, capture};
use crate::autograd::engine::{BackwardOptions, GraphTask, key};
use crate::autograd::graph::{AutogradMeta, Edge, Hook, LeafState, Node, NodeKind};
use crate::compiler::Signature;
use crate::compiler::ir::CapturedGraph;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::metadata::{InputMetadata, Shape};
use crate::ops::{Op, binary};
use crate::tensor::Tensor;

/// The smallest batch size shadows are made from: it and the two sizes
/// below it are all 2 or more (a batch of 1 is a size range of its own).
const MIN_BATCH: usize = 4;

/// How many shadow walks the search for which leaves follow the batch
/// may take.
const MAX_WALKS: usize = 8;

/// The positions of the leaves that follow the batch.
type Scaled = BTreeSet<usize>;

/// What a shadow walk learns of its leaves.
#[derive(Default)]
pub(crate) struct Learn {
    /// Per leaf node position, the gradient metadata it would have with
    /// its other shape (following the batch or not).
    pub other_shapes: HashMap<usize, InputMetadata>,
    /// Leaves whose gradient came in their other shape.
    pub flips: Vec<usize>,
    /// The node whose formula runs (or last ran).
    pub at: usize,
}

/// How a number of the graph at batch size `from` reads at size `to`.
#[derive(Debug, Clone, Copy)]
struct Resize {
    from: usize,
    to: usize,
}

impl Resize {
    fn dim(self, d: usize) -> usize {
        if d >= self.from && d.is_multiple_of(self.from) { d / self.from * self.to } else { d }
    }

    fn leading(self, shape: &Shape) -> Shape {
        let mut dims = shape.dims().to_vec();
        if let Some(first) = dims.first_mut() {
            *first = self.dim(*first);
        }
        Shape::new(dims)
    }

    fn meta(self, m: &InputMetadata) -> InputMetadata {
        InputMetadata { shape: self.leading(&m.shape), ..m.clone() }
    }
}

/// How many elements each result of a sum node adds up.
fn summed(node: &Node) -> Option<usize> {
    match &node.kind {
        NodeKind::Op(Op::Sum { input, axes, .. }) => Some(axes.iter().map(|&a| input.dims()[a]).product()),
        _ => None,
    }
}

/// Per node position, whether the node keeps its shape at every batch
/// size: a leaf not in `scaled` (a parameter), or an op all of whose
/// inputs are such nodes (a weight's transpose). An op with an input that
/// wants no gradient may read data, so it follows the batch.
fn fixed_nodes(task: &GraphTask, scaled: &Scaled) -> Vec<bool> {
    let mut fixed = vec![false; task.order.len()];
    for i in (0..task.order.len()).rev() {
        let node = &task.order[i];
        fixed[i] = match &node.kind {
            NodeKind::AccumulateGrad(_) => !scaled.contains(&i),
            NodeKind::Op(_) => {
                !node.edges.is_empty()
                    && node.edges.iter().zip(&task.needs[i]).all(|(e, &need)| {
                        need && e.node.as_ref().and_then(|c| task.index.get(&key(c))).is_some_and(|&c| fixed[c])
                    })
            }
        };
    }
    fixed
}

/// The backward at batch sizes `B - 1` and `B - 2` with their signatures,
/// or nothing where no shadow can be made (no batch size of 4 or more, no
/// guess that the formulas trace). Errors of a shadow
/// are not the user's: they only mean no shadow.
pub(crate) fn smaller_sizes(
    task: &GraphTask,
    bindings: &Bindings,
    options: BackwardOptions,
    device: &Device,
) -> Vec<(Signature, CapturedGraph)> {
    for b in batch_sizes(task) {
        if let Some(shadows) = shadows_for(task, bindings, options, device, b) {
            return shadows;
        }
    }
    Vec::new()
}

/// The shadows at `b - 1` and `b - 2`, taking `b` for the batch size.
fn shadows_for(
    task: &GraphTask,
    bindings: &Bindings,
    options: BackwardOptions,
    device: &Device,
    b: usize,
) -> Option<Vec<(Signature, CapturedGraph)>> {
    let near = Resize { from: b, to: b - 1 };
    // Leaves whose leading dim follows a batch size of `b`.
    let candidates: Scaled = task
        .order
        .iter()
        .enumerate()
        .filter(|(_, n)| match &n.kind {
            NodeKind::AccumulateGrad(leaf) => near.leading(&leaf.metadata.shape) != leaf.metadata.shape,
            NodeKind::Op(_) => false,
        })
        .map(|(i, _)| i)
        .collect();
    // Parameters first (the leaves of a training step), then data.
    let scaled = search(task, bindings, device, near, vec![Scaled::new(), candidates])?;
    [b - 1, b - 2]
        .into_iter()
        .map(|to| shadow(task, bindings, options, device, Resize { from: b, to }, &scaled).ok())
        .collect()
}

/// The batch sizes to try: the leading dim that most op nodes' gradients
/// have, or the two smallest of those tied, where 4 or more.
fn batch_sizes(task: &GraphTask) -> Vec<usize> {
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for node in &task.order {
        if let (NodeKind::Op(_), Some(&d)) = (&node.kind, node.metadata.shape.dims().first()) {
            *counts.entry(d).or_default() += 1;
        }
    }
    let most = counts.values().copied().max().unwrap_or(0);
    let mut tied: Vec<usize> = counts.into_iter().filter(|&(_, n)| n == most).map(|(d, _)| d).collect();
    tied.sort_unstable();
    tied.into_iter().take(2).filter(|&d| d >= MIN_BATCH).collect()
}

/// Which leaves follow the batch: a search from `starts`, each state a set
/// of leaf positions, by walks of the shadow at `resize`. A walk whose
/// leaves got their gradients in their other shape goes on with those
/// flipped; one whose formula failed goes on with each leaf of the
/// failing node flipped in turn (a square matmul's two leaves, one data,
/// one a parameter). The first walk that flips none and resizes an op is
/// the answer.
fn search(
    task: &GraphTask,
    bindings: &Bindings,
    device: &Device,
    resize: Resize,
    starts: Vec<Scaled>,
) -> Option<Scaled> {
    let mut queue: VecDeque<Scaled> = starts.into_iter().collect();
    let mut seen: HashSet<Scaled> = queue.iter().cloned().collect();
    for _ in 0..MAX_WALKS {
        let scaled = queue.pop_front()?;
        let Ok((shadow_task, shadow_bindings)) = build(task, bindings, device, resize, &scaled) else { continue };
        let mut learn = Learn { other_shapes: other_shapes(task, resize, &scaled), ..Learn::default() };
        let traced = capture(&shadow_task, &shadow_bindings, device, Some(&mut learn));
        let next: Vec<Scaled> = match (traced, learn.flips.is_empty()) {
            // A graph whose every op keeps its shape (all leaves kept,
            // where every input is a leaf) is no shadow at another size.
            (Ok(_), true)
                if fixed_nodes(task, &scaled)
                    .iter()
                    .zip(&task.order)
                    .any(|(&kept, n)| !kept && matches!(n.kind, NodeKind::Op(_))) =>
            {
                return Some(scaled);
            }
            (Ok(_), true) => Vec::new(),
            (_, false) => vec![scaled.symmetric_difference(&learn.flips.iter().copied().collect()).copied().collect()],
            (Err(_), true) => task.order[learn.at]
                .edges
                .iter()
                .filter_map(|e| e.node.as_ref())
                .filter(|c| matches!(c.kind, NodeKind::AccumulateGrad(_)))
                .filter_map(|c| task.index.get(&key(c)))
                .map(|&leaf| {
                    let mut flipped = scaled.clone();
                    if !flipped.remove(&leaf) {
                        flipped.insert(leaf);
                    }
                    flipped
                })
                .collect(),
        };
        for state in next {
            if seen.insert(state.clone()) {
                queue.push_back(state);
            }
        }
    }
    None
}

/// Per leaf position, its gradient's metadata with the other shape than
/// `scaled` gives it, where the two differ.
fn other_shapes(task: &GraphTask, resize: Resize, scaled: &Scaled) -> HashMap<usize, InputMetadata> {
    let mut out = HashMap::new();
    for (i, node) in task.order.iter().enumerate() {
        if let NodeKind::AccumulateGrad(leaf) = &node.kind {
            let grown = resize.meta(&leaf.metadata);
            if grown != leaf.metadata {
                out.insert(i, if scaled.contains(&i) { leaf.metadata.clone() } else { grown });
            }
        }
    }
    out
}

/// The shadow at `resize` traced, with its signature.
fn shadow(
    task: &GraphTask,
    bindings: &Bindings,
    options: BackwardOptions,
    device: &Device,
    resize: Resize,
    scaled: &Scaled,
) -> Result<(Signature, CapturedGraph)> {
    let (shadow_task, shadow_bindings) = build(task, bindings, device, resize, scaled)?;
    let graph = capture(&shadow_task, &shadow_bindings, device, None)?;
    Ok((Signature::of(&shadow_task, options, &shadow_bindings), graph))
}

/// The graph of `task` at `resize`'s size, with leaves in `scaled`
/// following the batch, and its bindings: views without buffers.
fn build(
    task: &GraphTask,
    bindings: &Bindings,
    device: &Device,
    resize: Resize,
    scaled: &Scaled,
) -> Result<(GraphTask, Bindings)> {
    let internal = |what: &str| Error::InvalidArgument {
        op: "compiled backward",
        message: format!("internal: a shadow of the backward {what}"),
    };
    // Which leaf each old `.grad` slot belongs to.
    let grad_leaf: HashMap<usize, usize> = bindings.old_grads.iter().map(|(&leaf, &slot)| (slot, leaf)).collect();
    let fixed = fixed_nodes(task, scaled);
    // Whether a bound tensor keeps its shape: a parameter's `.grad`, a
    // parameter, or a value computed from parameters alone (a weight's
    // transpose). Any other tensor, a leaf of no node here too, is data.
    let keeps_shape = |slot: usize, t: &Tensor| {
        if let Some(leaf) = grad_leaf.get(&slot) {
            return !scaled.contains(leaf);
        }
        let node = match &t.0.autograd {
            AutogradMeta::Leaf(leaf) => leaf.accumulator(),
            AutogradMeta::Interior(node) => node.clone(),
            AutogradMeta::None => return false,
        };
        task.index.get(&key(&node)).is_some_and(|&i| fixed[i])
    };
    let tensors: Vec<Tensor> = bindings
        .tensors
        .iter()
        .enumerate()
        .map(|(slot, t)| shadow_view(t, keeps_shape(slot, t), resize, device))
        .collect();
    // Nodes from the leaves up, so that a node's children exist first.
    let n = task.order.len();
    let mut nodes: Vec<Option<Arc<Node>>> = vec![None; n];
    for i in (0..n).rev() {
        let node = &task.order[i];
        let mut edges = Vec::with_capacity(node.edges.len());
        for (e, &need) in node.edges.iter().zip(&task.needs[i]) {
            let child = match (&e.node, need) {
                (Some(c), true) => {
                    let at = *task.index.get(&key(c)).ok_or_else(|| internal("lost an edge"))?;
                    Some(nodes[at].clone().ok_or_else(|| internal("met a child before its node"))?)
                }
                _ => None,
            };
            edges.push(Edge { node: child });
        }
        let (kind, metadata) = match &node.kind {
            NodeKind::AccumulateGrad(leaf) => {
                let metadata = if scaled.contains(&i) { resize.meta(&leaf.metadata) } else { leaf.metadata.clone() };
                let state = Arc::new(LeafState::new(metadata.clone()));
                if let Some(&slot) = bindings.old_grads.get(&i) {
                    *state.grad.lock() = Some(tensors[slot].clone());
                } else if let Some(g) = leaf.grad.lock().as_ref() {
                    // A `.grad` the program does not add (a graph with
                    // hooks): its view is in the signature all the same.
                    *state.grad.lock() = Some(shadow_view(g, fixed[i], resize, device));
                }
                (NodeKind::AccumulateGrad(state), metadata)
            }
            NodeKind::Op(op) => {
                let child = |e: usize| -> Option<(&Node, &Node)> {
                    Some((node.edges.get(e)?.node.as_deref()?, edges.get(e)?.node.as_deref()?))
                };
                let metadata = if fixed[i] { node.metadata.clone() } else { resize.meta(&node.metadata) };
                let op = resize_op(op, &node.metadata.shape, &metadata.shape, resize, &child)
                    .ok_or_else(|| internal("made an op that contradicts its shapes"))?;
                (NodeKind::Op(op), metadata)
            }
        };
        let shadow = Node::new(kind, edges, metadata, Vec::new());
        // Hook points where the node has hooks (the signature counts them;
        // a trace records where they run and runs none).
        for _ in 0..node.hook_count() {
            let point: Hook = Arc::new(|_| None);
            match &shadow.kind {
                NodeKind::AccumulateGrad(leaf) => leaf.hooks.lock().push((0, point)),
                NodeKind::Op(_) => shadow.pre_hooks.lock().push((0, point)),
            }
        }
        nodes[i] = Some(Arc::new(shadow));
    }
    let order: Vec<Arc<Node>> = nodes.into_iter().collect::<Option<_>>().ok_or_else(|| internal("lost a node"))?;
    let index = order.iter().enumerate().map(|(i, n)| (key(n), i)).collect();
    let roots =
        task.roots.iter().enumerate().map(|(r, (i, _))| (*i, tensors[bindings.seeds.start + r].clone())).collect();
    let shadow_task = GraphTask {
        order,
        index,
        needs: task.needs.clone(),
        roots,
        targets: task.targets.clone(),
        inputs: task.inputs.clone(),
        retain: task.retain.clone(),
    };
    let shadow_bindings = Bindings {
        tensors,
        seeds: bindings.seeds.clone(),
        saved: bindings.saved.clone(),
        old_grads: bindings.old_grads.clone(),
        accumulates: bindings.accumulates,
    };
    Ok((shadow_task, shadow_bindings))
}

/// `t`'s view at `resize`'s size, without a buffer: as it is where it
/// `keeps` its shape, its leading dim resized otherwise (strides and offset
/// stay).
fn shadow_view(t: &Tensor, keeps: bool, resize: Resize, device: &Device) -> Tensor {
    let l = t.layout();
    let shape = if keeps { l.shape.clone() } else { resize.leading(&l.shape) };
    let layout = Layout { shape, strides: l.strides.clone(), offset: l.offset };
    crate::compiler::trace::shape_only(layout, t.dtype(), device)
}

/// `op` at `resize`'s size: an input shape follows the shadow of that input
/// where the input has a node (and otherwise its leading dim follows the
/// batch), a length along the leading dim follows its input, and a mean's
/// scalar (`1 / count` times a sum over `count` elements) its count. `out`
/// and `new_out` are the op's output shape at both sizes; `child(e)` the
/// node of input `e` and its shadow, where it has a node. `None` where the
/// op would contradict its shapes (a narrow past the end of its resized
/// input): the formulas are written for graphs that ops made, so a
/// shadow must be one.
fn resize_op<'a>(
    op: &Op,
    out: &Shape,
    new_out: &Shape,
    resize: Resize,
    child: &dyn Fn(usize) -> Option<(&'a Node, &'a Node)>,
) -> Option<Op> {
    let input = |e: usize, shape: &Shape| match child(e) {
        Some((old, new)) if old.metadata.shape == *shape => new.metadata.shape.clone(),
        _ => resize.leading(shape),
    };
    let along = |e: usize, dim: usize, len: usize| match child(e) {
        Some((old, new)) if old.metadata.shape.dims().get(dim) == Some(&len) => new.metadata.shape.dims()[dim],
        _ if dim == 0 => resize.dim(len),
        _ => len,
    };
    let dim_of = |shape: &Shape, dim: usize| shape.dims().get(dim).copied();
    let resized = match op {
        Op::Binary { op: op @ binary::BinaryOp::Mul, scalars } => {
            let mean = |s: f64| match child(0).map(|(old, new)| (summed(old), summed(new))) {
                Some((Some(count), Some(new_count))) if 1.0 / count as f64 == s => 1.0 / new_count as f64,
                _ => s,
            };
            Op::Binary { op: *op, scalars: scalars.map(|v| v.map(mean)) }
        }
        Op::Sum { input: s, axes, keepdim } => {
            let input = input(0, s);
            let kept: Vec<usize> = (0..input.rank())
                .filter_map(|a| match (axes.contains(&a), keepdim) {
                    (false, _) => Some(input.dims()[a]),
                    (true, true) => Some(1),
                    (true, false) => None,
                })
                .collect();
            (kept == new_out.dims()).then_some(())?;
            Op::Sum { input, axes: axes.clone(), keepdim: *keepdim }
        }
        Op::Reshape { input: s } => {
            let input = input(0, s);
            (input.numel() == new_out.numel()).then_some(())?;
            Op::Reshape { input }
        }
        Op::Expand { input: s } => {
            let input = input(0, s);
            let lead = new_out.rank().checked_sub(input.rank())?;
            let fits = input.dims().iter().zip(&new_out.dims()[lead..]).all(|(&i, &o)| i == o || i == 1);
            fits.then_some(())?;
            Op::Expand { input }
        }
        Op::Narrow { input: s, dim, start } => {
            let input = input(0, s);
            (start + dim_of(new_out, *dim)? <= dim_of(&input, *dim)?).then_some(())?;
            Op::Narrow { input, dim: *dim, start: *start }
        }
        Op::StridedNarrow { input: s, dim, start, step } => {
            let input = input(0, s);
            let (len, n) = (dim_of(new_out, *dim)?, dim_of(&input, *dim)?);
            (len == 0 || start + (len - 1) * step < n).then_some(())?;
            Op::StridedNarrow { input, dim: *dim, start: *start, step: *step }
        }
        Op::Pad { dim, start, len } => {
            let len = along(0, *dim, *len);
            (start + len <= dim_of(new_out, *dim)?).then_some(())?;
            Op::Pad { dim: *dim, start: *start, len }
        }
        Op::Cat { dim, sizes } => {
            let sizes: Vec<usize> = sizes.iter().enumerate().map(|(e, &l)| along(e, *dim, l)).collect();
            (sizes.iter().sum::<usize>() == dim_of(new_out, *dim)?).then_some(())?;
            Op::Cat { dim: *dim, sizes }
        }
        Op::Gather { source, batched } => Op::Gather { source: input(0, source), batched: *batched },
        Op::ScatterAdd { target, batched } => {
            let target = if target == out { new_out.clone() } else { resize.leading(target) };
            Op::ScatterAdd { target, batched: *batched }
        }
        Op::Binary { .. }
        | Op::Where { .. }
        | Op::Unary(_)
        | Op::Cast { .. }
        | Op::Extremum { .. }
        | Op::Matmul
        | Op::Permute { .. }
        | Op::Copy => op.clone(),
    };
    Some(resized)
}
