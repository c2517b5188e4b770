//! The eager backward engine: finds the part of the graph that matters,
//! then runs each node's formula in topological order (decreasing creation
//! sequence), summing gradients that meet at a node.
//!
//! A backward either succeeds or changes nothing: leaf updates are collected
//! and applied only once every node has run, and saved tensors are released
//! only then.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::autograd::grad_mode::set_grad_enabled;
use crate::autograd::graph::{AutogradMeta, Hook, LeafState, Node, NodeKind};
use crate::error::{Error, Result};
use crate::metadata::InputMetadata;
use crate::tensor::Tensor;

/// Options of a backward pass, as in PyTorch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackwardOptions {
    /// Keep the saved tensors so the graph can be walked again.
    pub retain_graph: bool,
    /// Record the backward itself, so gradients are differentiable (higher
    /// order derivatives). Implies `retain_graph`. With `backward_with`, a
    /// leaf's `.grad` then holds a graph that refers back to the leaf, which
    /// keeps both alive until `zero_grad()` (as in PyTorch); prefer
    /// [`grad`] for higher-order derivatives.
    pub create_graph: bool,
    /// For [`grad`]: an input the outputs do not depend on gets `None`
    /// instead of being an error (PyTorch's `allow_unused`; off by default,
    /// as there).
    pub allow_unused: bool,
}

pub(crate) type NodeKey = *const Node;

pub(crate) fn key(node: &Arc<Node>) -> NodeKey {
    Arc::as_ptr(node)
}

/// Where the engine delivers gradients.
enum Sink<'a> {
    /// Accumulate into the `.grad` of every reached leaf, or (PyTorch's
    /// `backward(inputs=)`) only into those of these nodes: leaves'
    /// accumulators, and non-leaf nodes whose gradient is then retained.
    Leaves(Option<&'a HashSet<NodeKey>>),
    /// Return the gradients of these nodes; touch no leaf's `.grad`.
    Capture(&'a HashMap<NodeKey, Vec<usize>>),
}

impl Tensor {
    /// Backpropagates from this scalar into the `.grad` of every leaf that
    /// requires grad. The graph is released afterwards; see
    /// [`Tensor::backward_with`] to keep it or to seed a non-scalar output.
    pub fn backward(&self) -> Result<()> {
        if self.numel() != 1 {
            return Err(Error::NonScalarBackward { shape: self.shape().clone() });
        }
        let seed = crate::no_grad_scope(|| self.ones_like())?;
        self.backward_with(&seed, BackwardOptions::default())
    }

    /// Backpropagates `seed` (the gradient of some loss w.r.t. this tensor,
    /// same shape and dtype) into the leaves' `.grad`.
    pub fn backward_with(&self, seed: &Tensor, options: BackwardOptions) -> Result<()> {
        run(&[(self.clone(), seed.clone())], Sink::Leaves(None), options).map(|_| ())
    }
}

/// Gradients of `outputs` w.r.t. `inputs` (PyTorch's `torch.autograd.grad`),
/// returned rather than accumulated: no leaf's `.grad` is touched (a
/// non-leaf on which [`Tensor::retain_grad`] was called does keep the
/// gradient that reaches it, as in PyTorch). `grad_outputs`
/// seeds each output (`None`: ones, for scalar outputs). An input that does
/// not influence the outputs is an error, or gets `None` with
/// `allow_unused: true` in `options` (as in PyTorch).
///
/// ```
/// # use wgrad::{Device, Tensor, BackwardOptions};
/// # let device = Device::new()?;
/// let x = Tensor::from_slice(&[2.0f32], [1], &device)?.requires_grad(true)?;
/// let y = x.mul(&x)?.mul(&x)?.sum_all()?; // x³
/// let opts = BackwardOptions { create_graph: true, ..Default::default() };
/// let dx = wgrad::grad(&[&y], &[&x], None, opts)?[0].clone().unwrap(); // 3x² = 12
/// let ddx = wgrad::grad(&[&dx.sum_all()?], &[&x], None, opts)?[0].clone().unwrap(); // 6x = 12
/// # Ok::<(), wgrad::Error>(())
/// ```
pub fn grad(
    outputs: &[&Tensor],
    inputs: &[&Tensor],
    grad_outputs: Option<&[Tensor]>,
    options: BackwardOptions,
) -> Result<Vec<Option<Tensor>>> {
    let roots = seeded_roots("grad", outputs, grad_outputs)?;
    let mut targets: HashMap<NodeKey, Vec<usize>> = HashMap::new();
    let mut keep = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        let node = match &t.0.autograd {
            AutogradMeta::None => {
                return Err(Error::NoGradFn { what: format!("input {i} of grad()") });
            }
            // Get-or-create: when an output is the leaf itself, its
            // accumulator may not exist yet. One that no output reaches
            // simply yields `None`; `keep` holds it for the call.
            AutogradMeta::Leaf(leaf) => leaf.accumulator(),
            AutogradMeta::Interior(node) => node.clone(),
        };
        targets.entry(key(&node)).or_default().push(i);
        keep.push(node);
    }
    let captured = run(&roots, Sink::Capture(&targets), options)?;
    Ok((0..inputs.len()).map(|i| captured.get(&i).cloned()).collect())
}

/// Backpropagates from `outputs` (seeded by `grad_outputs`, or ones for
/// scalar outputs) into `.grad`s, as PyTorch's `torch.autograd.backward`.
/// With `inputs`, only the `.grad` of those tensors changes (and of
/// retained non-leaves on the way to them), and only the part of the graph
/// that leads to them is computed: a leaf outside `inputs` keeps its
/// `.grad` and its hooks do not run. A non-leaf in `inputs` gets its
/// gradient accumulated in its `.grad`, and retains it from then on, as if
/// [`Tensor::retain_grad`] had been called (as in PyTorch). An input the
/// outputs do not depend on keeps its `.grad` (as in PyTorch).
///
/// ```
/// # use wgrad::{Device, Tensor, BackwardOptions};
/// # let device = Device::new()?;
/// let x = Tensor::from_slice(&[2.0f32], [1], &device)?.requires_grad(true)?;
/// let w = Tensor::from_slice(&[3.0f32], [1], &device)?.requires_grad(true)?;
/// let loss = x.mul(&w)?.sum_all()?;
/// wgrad::backward(&[&loss], None, Some(&[&w]), BackwardOptions::default())?;
/// assert_eq!(w.grad().unwrap().to_vec::<f32>()?, vec![2.0]);
/// assert!(x.grad().is_none()); // not among the inputs
/// # Ok::<(), wgrad::Error>(())
/// ```
pub fn backward(
    outputs: &[&Tensor],
    grad_outputs: Option<&[Tensor]>,
    inputs: Option<&[&Tensor]>,
    options: BackwardOptions,
) -> Result<()> {
    let roots = seeded_roots("backward", outputs, grad_outputs)?;
    let Some(inputs) = inputs else {
        return run(&roots, Sink::Leaves(None), options).map(|_| ());
    };
    if inputs.is_empty() {
        return Err(Error::InvalidArgument {
            op: "backward",
            message: "`inputs` is empty, so no gradient would be computed; pass `None` to accumulate into \
                      every leaf"
                .into(),
        });
    }
    let mut only = HashSet::new();
    let mut keep = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        let node = match &t.0.autograd {
            AutogradMeta::None => return Err(Error::NoGradFn { what: format!("input {i} of backward()") }),
            AutogradMeta::Leaf(leaf) => leaf.accumulator(),
            AutogradMeta::Interior(node) => node.clone(),
        };
        only.insert(key(&node));
        keep.push(node);
    }
    run(&roots, Sink::Leaves(Some(&only)), options)?;
    // As PyTorch, a non-leaf input keeps retaining its gradient afterwards.
    for node in keep.iter().filter(|n| matches!(n.kind, NodeKind::Op(_))) {
        node.retains_grad.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// (output, seed) pairs: `grad_outputs`, or ones for scalar outputs.
fn seeded_roots(
    op: &'static str,
    outputs: &[&Tensor],
    grad_outputs: Option<&[Tensor]>,
) -> Result<Vec<(Tensor, Tensor)>> {
    if let Some(seeds) = grad_outputs.filter(|s| s.len() != outputs.len()) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("{} outputs but {} grad_outputs; pass one seed per output", outputs.len(), seeds.len()),
        });
    }
    if outputs.is_empty() {
        return Err(Error::InvalidArgument {
            op,
            message: "no outputs given; pass the tensors to differentiate".into(),
        });
    }
    let mut roots = Vec::with_capacity(outputs.len());
    for (i, out) in outputs.iter().enumerate() {
        let seed = match grad_outputs {
            Some(seeds) => seeds[i].clone(),
            None => {
                if out.numel() != 1 {
                    return Err(Error::NonScalarBackward { shape: out.shape().clone() });
                }
                crate::no_grad_scope(|| out.ones_like())?
            }
        };
        roots.push(((*out).clone(), seed));
    }
    Ok(roots)
}

/// The part of the graph a backward runs, in execution order.
pub(crate) struct GraphTask {
    /// Needed nodes by decreasing creation sequence: a topological order
    /// from the roots to the leaves, the order eager mode runs them in.
    pub order: Vec<Arc<Node>>,
    pub index: HashMap<NodeKey, usize>,
    /// For each node, which of its edges lead to a needed node.
    pub needs: Vec<Vec<bool>>,
    /// (node position, seed) of each root that is needed.
    pub roots: Vec<(usize, Tensor)>,
    /// Capture targets: node position -> indices of `grad()` inputs.
    pub targets: Option<HashMap<usize, Vec<usize>>>,
    /// With `backward(inputs=)`: the positions of the inputs' nodes, sorted.
    pub inputs: Option<Vec<usize>>,
    /// Positions of the non-leaf nodes whose gradient is kept in their
    /// `.grad` (`retain_grad()`, or a non-leaf in `backward(inputs=)`).
    pub retain: HashSet<usize>,
}

/// Finds the nodes a backward from `roots` must run and checks that it can.
fn plan(roots: &[(Tensor, Tensor)], sink: &Sink<'_>, options: BackwardOptions) -> Result<GraphTask> {
    let mut root_nodes = Vec::new();
    for (out, seed) in roots {
        let edge = out.gradient_edge();
        let Some(node) = edge.node else {
            return Err(Error::NoGradFn { what: "the output given to backward".into() });
        };
        if seed.metadata() != out.metadata() {
            return Err(Error::SeedMismatch { expected: Box::new(out.metadata()), got: Box::new(seed.metadata()) });
        }
        root_nodes.push((node, seed.clone()));
    }

    // Every node reachable from the roots, by key.
    let mut nodes: HashMap<NodeKey, Arc<Node>> = HashMap::new();
    let mut stack: Vec<Arc<Node>> = root_nodes.iter().map(|(n, _)| n.clone()).collect();
    while let Some(n) = stack.pop() {
        if nodes.insert(key(&n), n.clone()).is_none() {
            stack.extend(n.edges.iter().filter_map(|e| e.node.clone()));
        }
    }
    let mut order: Vec<Arc<Node>> = nodes.into_values().collect();
    order.sort_by_key(|n| std::cmp::Reverse(n.seq));

    // Which nodes must run: all of them when accumulating into leaves;
    // only those from which a capture target is reachable otherwise.
    let is_target = |k: &NodeKey| match sink {
        Sink::Leaves(None) => true,
        Sink::Leaves(Some(only)) => only.contains(k),
        Sink::Capture(targets) => targets.contains_key(k),
    };
    let mut needed = HashSet::new();
    for n in order.iter().rev() {
        let k = key(n);
        let child_needed = n.edges.iter().any(|e| e.node.as_ref().is_some_and(|c| needed.contains(&key(c))));
        if is_target(&k) || child_needed {
            needed.insert(k);
        }
    }
    order.retain(|n| needed.contains(&key(n)));

    // Refuse before doing anything if part of the graph was released, or
    // a tensor it saved was modified in place since (PyTorch's version
    // check), in eager and compiled mode alike.
    for n in &order {
        if !matches!(n.kind, NodeKind::Op(_)) {
            continue;
        }
        let saved = n.saved.lock();
        let Some(saved) = saved.as_ref() else {
            return Err(Error::GraphReleased { op: n.name() });
        };
        for (index, (t, &expected)) in saved.iter().zip(&n.saved_versions).enumerate() {
            let found = t.version();
            if found != expected {
                return Err(Error::ModifiedInPlace { op: n.name(), index, shape: t.shape().clone(), expected, found });
            }
        }
    }
    let index: HashMap<NodeKey, usize> = order.iter().enumerate().map(|(i, n)| (key(n), i)).collect();
    // Checked before anything runs, so the error changes nothing.
    if let Sink::Capture(targets) = sink {
        let unused = targets.iter().filter(|(k, _)| !index.contains_key(*k)).flat_map(|(_, v)| v.iter()).min();
        if let (Some(input), false) = (unused, options.allow_unused) {
            return Err(Error::InvalidArgument {
                op: "grad",
                message: format!(
                    "input {input} was not used to compute the outputs, so it has no gradient; pass \
                     `BackwardOptions {{ allow_unused: true, .. }}` to get `None` for it"
                ),
            });
        }
    }
    let needs = order
        .iter()
        .map(|n| n.edges.iter().map(|e| e.node.as_ref().is_some_and(|c| index.contains_key(&key(c)))).collect())
        .collect();
    let roots = root_nodes.into_iter().filter_map(|(n, seed)| index.get(&key(&n)).map(|&i| (i, seed))).collect();
    let targets = match sink {
        Sink::Leaves(_) => None,
        Sink::Capture(targets) => {
            Some(targets.iter().filter_map(|(k, v)| index.get(k).map(|&i| (i, v.clone()))).collect())
        }
    };
    let inputs = match sink {
        Sink::Leaves(Some(only)) => {
            let mut positions: Vec<usize> = only.iter().filter_map(|k| index.get(k).copied()).collect();
            positions.sort_unstable();
            Some(positions)
        }
        _ => None,
    };
    let retain = order
        .iter()
        .enumerate()
        .filter(|(i, n)| {
            matches!(n.kind, NodeKind::Op(_))
                && (n.retains_grad() || inputs.as_ref().is_some_and(|p| p.binary_search(i).is_ok()))
        })
        .map(|(i, _)| i)
        .collect();
    Ok(GraphTask { order, index, needs, roots, targets, inputs, retain })
}

/// What the walk needs from its surroundings: eager mode hands it the real
/// saved tensors and runs hooks; capture hands it placeholders and records
/// hook points.
pub(crate) trait WalkEnv {
    /// The saved tensors of the node at `position`.
    fn saved(&mut self, position: usize, node: &Node) -> Result<Vec<Tensor>>;
    /// The seed of root `r`.
    fn seed(&mut self, r: usize, seed: &Tensor) -> Tensor;
    /// `g` after the hooks of the node at `position` (which has some).
    fn hooks(&mut self, position: usize, node: &Node, g: Tensor) -> Result<Tensor>;
    /// The gradient `got` that `node`'s formula gave its input `input` does
    /// not have the metadata of that input (the node at `child`): an error,
    /// except where a walk over a graph at another batch size learns from
    /// it which way a leaf follows the batch (`autograd::shadow`).
    fn mismatch(&mut self, node: &Node, input: usize, child: usize, got: InputMetadata) -> Result<()> {
        let _ = child;
        Err(mismatch_error(node, input, got))
    }
}

/// The error of a formula whose gradient for input `input` of `node` has
/// metadata `got`, not its input's.
pub(crate) fn mismatch_error(node: &Node, input: usize, got: InputMetadata) -> Error {
    Error::GradientMismatch {
        op: node.name(),
        input,
        expected: Box::new(node.edges[input].metadata().unwrap_or_else(|| got.clone())),
        got: Box::new(got),
    }
}

/// What a walk produced: the gradient reaching each leaf (by position),
/// the gradients for `grad()`'s inputs, and those of retained non-leaves
/// (by position).
pub(crate) struct WalkResult {
    pub leaf_grads: Vec<(usize, Tensor)>,
    pub captured: HashMap<usize, Tensor>,
    pub retained: Vec<(usize, Tensor)>,
}

/// Runs every node's formula in order, summing gradients that meet.
pub(crate) fn walk(task: &GraphTask, env: &mut dyn WalkEnv) -> Result<WalkResult> {
    let mut pending: Vec<Option<Tensor>> = vec![None; task.order.len()];
    for (r, (i, seed)) in task.roots.iter().enumerate() {
        let seed = env.seed(r, seed);
        accumulate(&mut pending[*i], seed)?;
    }
    let mut result = WalkResult { leaf_grads: Vec::new(), captured: HashMap::new(), retained: Vec::new() };
    for (i, node) in task.order.iter().enumerate() {
        let Some(mut g) = pending[i].take() else { continue };
        if node.has_hooks() {
            g = env.hooks(i, node, g)?;
        }
        // After the hooks, as PyTorch runs its retain-grad hook last.
        if task.retain.contains(&i) {
            result.retained.push((i, g.clone()));
        }
        if let Some(indices) = task.targets.as_ref().and_then(|t| t.get(&i)) {
            for &input in indices {
                result.captured.insert(input, g.clone());
            }
        }
        match &node.kind {
            NodeKind::AccumulateGrad(_) => {
                if task.targets.is_none() {
                    result.leaf_grads.push((i, g));
                }
            }
            NodeKind::Op(op) => {
                let needs = &task.needs[i];
                if !needs.iter().any(|&b| b) {
                    continue;
                }
                let saved = env.saved(i, node)?;
                let grads = op.backward(&saved, &g, needs)?;
                for (e, (edge, grad)) in node.edges.iter().zip(grads).enumerate() {
                    let (Some(child), Some(grad), true) = (&edge.node, grad, needs[e]) else { continue };
                    let at = task.index[&key(child)];
                    if grad.metadata() != child.metadata {
                        env.mismatch(node, e, at, grad.metadata())?;
                    }
                    accumulate(&mut pending[at], grad)?;
                }
            }
        }
    }
    Ok(result)
}

/// Runs the user's hooks of `node` on `g`, in registration order.
pub(crate) fn run_hooks(node: &Node, mut g: Tensor) -> Result<Tensor> {
    let hooks: Vec<Hook> = match &node.kind {
        NodeKind::AccumulateGrad(leaf) => leaf.hooks.lock().iter().map(|(_, h)| h.clone()).collect(),
        NodeKind::Op(_) => node.pre_hooks.lock().iter().map(|(_, h)| h.clone()).collect(),
    };
    for hook in hooks {
        if let Some(replaced) = hook(&g) {
            if replaced.metadata() != node.metadata {
                return Err(Error::GradientMismatch {
                    op: "hook",
                    input: 0,
                    expected: Box::new(node.metadata.clone()),
                    got: Box::new(replaced.metadata()),
                });
            }
            g = replaced;
        }
    }
    Ok(g)
}

struct EagerEnv;

impl WalkEnv for EagerEnv {
    fn saved(&mut self, _: usize, node: &Node) -> Result<Vec<Tensor>> {
        node.saved.lock().clone().ok_or(Error::GraphReleased { op: node.name() })
    }
    fn seed(&mut self, _: usize, seed: &Tensor) -> Tensor {
        seed.clone()
    }
    fn hooks(&mut self, _: usize, node: &Node, g: Tensor) -> Result<Tensor> {
        run_hooks(node, g)
    }
}

/// The leaf state of an accumulator node.
fn leaf_of_node(node: &Node) -> Option<&Arc<LeafState>> {
    match &node.kind {
        NodeKind::AccumulateGrad(leaf) => Some(leaf),
        NodeKind::Op(_) => None,
    }
}

/// The leaf state of the node at `position` (an accumulator).
pub(crate) fn leaf_of(task: &GraphTask, position: usize) -> Option<&Arc<LeafState>> {
    match &task.order[position].kind {
        NodeKind::AccumulateGrad(leaf) => Some(leaf),
        NodeKind::Op(_) => None,
    }
}

/// The new `.grad`s of a backward, computed before any is published.
#[derive(Default)]
pub(crate) struct NewGrads {
    pub leaves: Vec<(Arc<LeafState>, Tensor)>,
    pub retained: Vec<(Arc<Node>, Tensor)>,
}

impl NewGrads {
    /// Adds the retained gradient `g` of the node at `position` to its
    /// current one.
    pub(crate) fn retain(&mut self, task: &GraphTask, position: usize, g: Tensor) -> Result<()> {
        let node = task.order[position].clone();
        let total = accumulated(node.retained_grad.lock().clone(), g)?;
        self.retained.push((node, total));
        Ok(())
    }
}

/// A `.grad` after a backward: `old + g`, or `g` (contiguous) when there
/// was none.
pub(crate) fn accumulated(old: Option<Tensor>, g: Tensor) -> Result<Tensor> {
    match old {
        Some(old) => old.add(&g),
        None if g.is_contiguous() => Ok(g),
        None => g.contiguous(),
    }
}

/// Publishes new `.grad`s together and releases the saved tensors unless
/// the graph is retained, then runs the post-accumulate hooks: the common
/// end of eager and compiled backward.
pub(crate) fn finish(task: &GraphTask, new_grads: NewGrads, options: BackwardOptions) -> Result<()> {
    let mut reached = Vec::with_capacity(new_grads.leaves.len());
    for (leaf, total) in new_grads.leaves {
        leaf.replace_grad(Some(total));
        reached.push(leaf);
    }
    for (node, total) in new_grads.retained {
        *node.retained_grad.lock() = Some(total);
    }
    if !(options.retain_graph || options.create_graph) {
        for n in &task.order {
            if matches!(n.kind, NodeKind::Op(_)) {
                *n.saved.lock() = None;
            }
        }
    }
    crate::autograd::hooks::run_post_accumulate_hooks(&reached)
}

/// Runs the graph from `roots` (output, seed) pairs: compiled when a
/// compiler is installed and the backward qualifies, eagerly otherwise.
fn run(roots: &[(Tensor, Tensor)], sink: Sink<'_>, options: BackwardOptions) -> Result<HashMap<usize, Tensor>> {
    let task = plan(roots, &sink, options)?;
    // A compiled step traces this backward eagerly: its formulas become part
    // of the step's program. Hooks are host code a replay would not run.
    if crate::compiler::trace::is_step() {
        let hooked = task
            .order
            .iter()
            .any(|n| n.has_hooks() || leaf_of_node(n).is_some_and(|leaf| !leaf.post_hooks.lock().is_empty()));
        if hooked {
            return Err(Error::GraphBreak {
                op: "backward",
                reason: "the graph has hooks, which are host code".into(),
            });
        }
        let before = crate::compiler::trace::set_phase(crate::compiler::Phase::Backward);
        let result = run_eagerly(&task, options);
        crate::compiler::trace::set_phase(before);
        return result;
    } else if let Some(compiler) = crate::compiler::guard::active_compiler() {
        if let Some(result) = crate::autograd::capture::run_compiled(&task, compiler, options)? {
            return Ok(result);
        }
    }
    run_eagerly(&task, options)
}

/// The eager walk of `task` and the publishing of its `.grad`s.
fn run_eagerly(task: &GraphTask, options: BackwardOptions) -> Result<HashMap<usize, Tensor>> {
    let _mode = set_grad_enabled(options.create_graph);
    let result = walk(task, &mut EagerEnv)?;

    // Everything ran: compute the new `.grad`s, then publish them together.
    let mut new_grads = NewGrads::default();
    let keep_graph = |g: Tensor| if options.create_graph { g } else { g.detach() };
    for (i, g) in result.retained {
        new_grads.retain(task, i, keep_graph(g))?;
    }
    for (i, g) in result.leaf_grads {
        let leaf = leaf_of(task, i).expect("leaf gradients come from accumulators").clone();
        let total = accumulated(leaf.current_grad(), keep_graph(g))?;
        new_grads.leaves.push((leaf, total));
    }
    finish(task, new_grads, options)?;
    Ok(result.captured)
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(prev) => prev.add(&g)?,
        None => g,
    });
    Ok(())
}
