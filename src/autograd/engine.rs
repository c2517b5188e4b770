//! The eager backward engine: finds the part of the graph that matters,
//! then runs each node's formula in topological order (decreasing creation
//! sequence), summing gradients that meet at a node.
//!
//! A backward either succeeds or changes nothing: leaf updates are collected
//! and applied only once every node has run, and saved tensors are released
//! only then.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use crate::autograd::grad_mode::set_grad_enabled;
use crate::autograd::graph::{AutogradMeta, Hook, LeafState, Node, NodeKind};
use crate::error::{Error, Result};
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
}

type NodeKey = *const Node;

fn key(node: &Arc<Node>) -> NodeKey {
    Arc::as_ptr(node)
}

/// Where the engine delivers gradients.
enum Sink<'a> {
    /// Accumulate into every reached leaf's `.grad`.
    Leaves,
    /// Return the gradients of these nodes; touch no `.grad`.
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
        run(&[(self.clone(), seed.clone())], Sink::Leaves, options).map(|_| ())
    }

    /// Registers a hook on this tensor's gradient. Hooks run in registration
    /// order each time a gradient for this tensor is computed, before it is
    /// accumulated (leaves) or used further (other tensors); a hook that
    /// returns `Some(g)` replaces the gradient.
    pub fn register_hook(&self, hook: impl Fn(&Tensor) -> Option<Tensor> + Send + Sync + 'static) -> Result<()> {
        let hook: Hook = Arc::new(hook);
        match &self.0.autograd {
            AutogradMeta::Leaf(leaf) => leaf.hooks.lock().push(hook),
            AutogradMeta::Interior(node) => node.pre_hooks.lock().push(hook),
            AutogradMeta::None => {
                return Err(Error::NoGradFn { what: "the tensor given to register_hook".into() });
            }
        }
        Ok(())
    }
}

/// Gradients of `outputs` w.r.t. `inputs` (PyTorch's `torch.autograd.grad`),
/// returned rather than accumulated: no `.grad` is touched. `grad_outputs`
/// seeds each output (`None`: ones, for scalar outputs). An input that does
/// not influence the outputs gets `None`.
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
    let mut roots = Vec::with_capacity(outputs.len());
    for (i, out) in outputs.iter().enumerate() {
        let seed = match grad_outputs {
            Some(seeds) => seeds.get(i).cloned().ok_or_else(|| Error::InvalidArgument {
                op: "grad",
                message: format!(
                    "{} outputs but {} grad_outputs; pass one seed per output",
                    outputs.len(),
                    seeds.len()
                ),
            })?,
            None => {
                if out.numel() != 1 {
                    return Err(Error::NonScalarBackward { shape: out.shape().clone() });
                }
                crate::no_grad_scope(|| out.ones_like())?
            }
        };
        roots.push(((*out).clone(), seed));
    }
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

/// Runs the graph from `roots` (output, seed) pairs.
fn run(roots: &[(Tensor, Tensor)], sink: Sink<'_>, options: BackwardOptions) -> Result<HashMap<usize, Tensor>> {
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

    // Which nodes must run: all of them when accumulating into leaves;
    // only those from which a capture target is reachable otherwise.
    let needed: HashSet<NodeKey> = match &sink {
        Sink::Leaves => nodes.keys().copied().collect(),
        Sink::Capture(targets) => {
            let mut order: Vec<&Arc<Node>> = nodes.values().collect();
            order.sort_by_key(|n| n.seq); // children before parents
            let mut needed = HashSet::new();
            for n in order {
                let k = key(n);
                let child_needed = n.edges.iter().any(|e| e.node.as_ref().is_some_and(|c| needed.contains(&key(c))));
                if targets.contains_key(&k) || child_needed {
                    needed.insert(k);
                }
            }
            needed
        }
    };

    // Refuse before doing anything if part of the graph was released.
    for k in &needed {
        let n = &nodes[k];
        if matches!(n.kind, NodeKind::Op(_)) && n.saved.lock().is_none() {
            return Err(Error::GraphReleased { op: n.name() });
        }
    }

    // Dependencies: how many needed edges point at each needed node.
    let mut deps: HashMap<NodeKey, usize> = HashMap::new();
    for k in &needed {
        for e in &nodes[k].edges {
            if let Some(c) = &e.node {
                if needed.contains(&key(c)) {
                    *deps.entry(key(c)).or_default() += 1;
                }
            }
        }
    }

    let _mode = set_grad_enabled(options.create_graph);
    let mut pending: HashMap<NodeKey, Tensor> = HashMap::new();
    for (node, seed) in &root_nodes {
        if needed.contains(&key(node)) {
            accumulate(&mut pending, key(node), seed.clone())?;
        }
    }
    let mut ready: BinaryHeap<u64> = BinaryHeap::new();
    let mut by_seq: HashMap<u64, NodeKey> = HashMap::new();
    for k in &needed {
        by_seq.insert(nodes[k].seq, *k);
        if deps.get(k).copied().unwrap_or(0) == 0 {
            ready.push(nodes[k].seq);
        }
    }

    let mut captured: HashMap<usize, Tensor> = HashMap::new();
    let mut leaf_updates: Vec<(Arc<LeafState>, Tensor)> = Vec::new();
    let mut executed: Vec<Arc<Node>> = Vec::new();
    while let Some(seq) = ready.pop() {
        let k = by_seq[&seq];
        let node = nodes[&k].clone();
        let incoming = pending.remove(&k);
        if let Some(mut g) = incoming {
            let hooks: Vec<Hook> = match &node.kind {
                NodeKind::AccumulateGrad(leaf) => leaf.hooks.lock().clone(),
                NodeKind::Op(_) => node.pre_hooks.lock().clone(),
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
            if let Sink::Capture(targets) = &sink {
                if let Some(indices) = targets.get(&k) {
                    for &i in indices {
                        captured.insert(i, g.clone());
                    }
                }
            }
            match &node.kind {
                NodeKind::AccumulateGrad(leaf) => {
                    if let Sink::Leaves = sink {
                        leaf_updates.push((leaf.clone(), g));
                    }
                }
                NodeKind::Op(op) => {
                    let needs: Vec<bool> =
                        node.edges.iter().map(|e| e.node.as_ref().is_some_and(|c| needed.contains(&key(c)))).collect();
                    if needs.iter().any(|&b| b) {
                        let saved = node.saved.lock().clone().ok_or(Error::GraphReleased { op: node.name() })?;
                        let grads = op.backward(&saved, &g, &needs)?;
                        for (i, (edge, grad)) in node.edges.iter().zip(grads).enumerate() {
                            let (Some(child), Some(grad), true) = (&edge.node, grad, needs[i]) else { continue };
                            if grad.metadata() != child.metadata {
                                return Err(Error::GradientMismatch {
                                    op: node.name(),
                                    input: i,
                                    expected: Box::new(child.metadata.clone()),
                                    got: Box::new(grad.metadata()),
                                });
                            }
                            accumulate(&mut pending, key(child), grad)?;
                        }
                    }
                    executed.push(node.clone());
                }
            }
        } else if matches!(node.kind, NodeKind::Op(_)) {
            executed.push(node.clone());
        }
        for e in &node.edges {
            if let Some(c) = &e.node {
                let ck = key(c);
                if let Some(d) = deps.get_mut(&ck) {
                    *d -= 1;
                    if *d == 0 {
                        ready.push(c.seq);
                    }
                }
            }
        }
    }

    // Everything ran: compute the new `.grad`s, then publish them together.
    let mut new_grads = Vec::with_capacity(leaf_updates.len());
    for (leaf, g) in leaf_updates {
        let g = if options.create_graph { g } else { g.detach() };
        let old = leaf.grad.lock().clone();
        let total = match old {
            Some(old) => old.add(&g)?,
            None if g.is_contiguous() => g,
            None => g.contiguous()?,
        };
        new_grads.push((leaf, total));
    }
    for (leaf, total) in new_grads {
        *leaf.grad.lock() = Some(total);
    }
    if !(options.retain_graph || options.create_graph) {
        for n in executed {
            *n.saved.lock() = None;
        }
    }
    Ok(captured)
}

fn accumulate(pending: &mut HashMap<NodeKey, Tensor>, k: NodeKey, g: Tensor) -> Result<()> {
    let sum = match pending.remove(&k) {
        Some(prev) => prev.add(&g)?,
        None => g,
    };
    pending.insert(k, sum);
    Ok(())
}
