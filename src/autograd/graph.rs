//! Nodes and edges of the backward graph.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::autograd::grad_mode::is_grad_enabled;
use crate::metadata::InputMetadata;
use crate::ops::Op;
use crate::tensor::{Tensor, TensorImpl};

/// A gradient hook: sees the gradient of a tensor and may replace it.
pub(crate) type Hook = Arc<dyn Fn(&Tensor) -> Option<Tensor> + Send + Sync>;

/// A registered hook with the id its [`HookHandle`] removes it by.
pub(crate) type HookEntry = (u64, Hook);

/// A hook run after a leaf's `.grad` is updated; it is handed the leaf.
pub(crate) type PostAccumulateHook = Arc<dyn Fn(&Tensor) -> crate::Result<()> + Send + Sync>;

/// A registered post-accumulate hook and the leaf it is handed. The leaf
/// is held weakly: the leaf's own state holds the hook, so a strong handle
/// would keep the leaf alive forever.
pub(crate) struct PostHookEntry {
    pub id: u64,
    pub leaf: Weak<TensorImpl>,
    pub hook: PostAccumulateHook,
}

static NEXT_HOOK_ID: AtomicU64 = AtomicU64::new(0);

/// Returned by [`Tensor::register_hook`]; [`HookHandle::remove`] unregisters
/// the hook (PyTorch's `RemovableHandle`). Dropping the handle keeps the
/// hook registered, as in PyTorch.
pub struct HookHandle {
    owner: HookOwner,
    id: u64,
}

enum HookOwner {
    Leaf(Weak<LeafState>),
    Node(Weak<Node>),
    PostAccumulate(Weak<LeafState>),
}

impl std::fmt::Debug for HookHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = match &self.owner {
            HookOwner::Leaf(_) => "leaf",
            HookOwner::Node(_) => "node",
            HookOwner::PostAccumulate(_) => "leaf, post-accumulate",
        };
        write!(f, "HookHandle({} on a {on})", self.id)
    }
}

impl HookHandle {
    pub(crate) fn register(autograd: &AutogradMeta, hook: Hook) -> Option<HookHandle> {
        let id = NEXT_HOOK_ID.fetch_add(1, Ordering::Relaxed);
        let owner = match autograd {
            AutogradMeta::Leaf(leaf) => {
                leaf.hooks.lock().push((id, hook));
                HookOwner::Leaf(Arc::downgrade(leaf))
            }
            AutogradMeta::Interior(node) => {
                node.pre_hooks.lock().push((id, hook));
                HookOwner::Node(Arc::downgrade(node))
            }
            AutogradMeta::None => return None,
        };
        Some(HookHandle { owner, id })
    }

    /// Registers `hook` to run after `leaf`'s `.grad` is updated.
    pub(crate) fn register_post_accumulate(tensor: &Tensor, hook: PostAccumulateHook) -> Option<HookHandle> {
        let AutogradMeta::Leaf(state) = &tensor.0.autograd else { return None };
        let id = NEXT_HOOK_ID.fetch_add(1, Ordering::Relaxed);
        state.post_hooks.lock().push(PostHookEntry { id, leaf: Arc::downgrade(&tensor.0), hook });
        Some(HookHandle { owner: HookOwner::PostAccumulate(Arc::downgrade(state)), id })
    }

    /// Unregisters the hook: no later backward runs it, eager or compiled
    /// (a compiled program's hook points call whatever hooks are registered
    /// when it replays, and the hook count is part of its signature).
    /// Removing twice, or after the tensor is gone, does nothing.
    pub fn remove(&self) {
        let keep = |hooks: &Mutex<Vec<HookEntry>>| hooks.lock().retain(|(id, _)| *id != self.id);
        match &self.owner {
            HookOwner::Leaf(leaf) => {
                if let Some(leaf) = leaf.upgrade() {
                    keep(&leaf.hooks);
                }
            }
            HookOwner::Node(node) => {
                if let Some(node) = node.upgrade() {
                    keep(&node.pre_hooks);
                }
            }
            HookOwner::PostAccumulate(leaf) => {
                if let Some(leaf) = leaf.upgrade() {
                    leaf.post_hooks.lock().retain(|entry| entry.id != self.id);
                }
            }
        }
    }
}

/// How a tensor takes part in autograd.
pub(crate) enum AutogradMeta {
    /// Not tracked.
    None,
    /// A leaf that requires grad; its gradient accumulates in the state.
    Leaf(Arc<LeafState>),
    /// The output of a recorded op.
    Interior(Arc<Node>),
}

/// A leaf's `.grad`, hooks and (weakly) its accumulator node, shared by
/// every handle to the leaf.
pub(crate) struct LeafState {
    pub metadata: InputMetadata,
    pub grad: Mutex<Option<Tensor>>,
    pub hooks: Mutex<Vec<HookEntry>>,
    /// Hooks run once a backward has published the new `.grad`.
    pub post_hooks: Mutex<Vec<PostHookEntry>>,
    accumulator: Mutex<Weak<Node>>,
}

impl LeafState {
    /// The `.grad` now (noted by a step trace: the program depends on it).
    pub fn current_grad(self: &Arc<Self>) -> Option<Tensor> {
        let g = self.grad.lock().clone();
        crate::compiler::trace::note_grad_read(self, &g);
        g
    }

    /// Sets the `.grad` (noted by a step trace, which puts it back at the
    /// end: the program's replay makes the change).
    pub fn replace_grad(self: &Arc<Self>, grad: Option<Tensor>) {
        crate::compiler::trace::note_grad_write(self);
        *self.grad.lock() = grad;
    }

    pub fn new(metadata: InputMetadata) -> LeafState {
        LeafState {
            metadata,
            grad: Mutex::new(None),
            hooks: Mutex::new(Vec::new()),
            post_hooks: Mutex::new(Vec::new()),
            accumulator: Mutex::new(Weak::new()),
        }
    }

    /// The leaf's accumulator node, shared by all ops that use the leaf so
    /// their contributions are summed before hooks and accumulation run.
    pub fn accumulator(self: &Arc<LeafState>) -> Arc<Node> {
        let mut slot = self.accumulator.lock();
        if let Some(node) = slot.upgrade() {
            return node;
        }
        let node =
            Arc::new(Node::new(NodeKind::AccumulateGrad(self.clone()), Vec::new(), self.metadata.clone(), Vec::new()));
        *slot = Arc::downgrade(&node);
        node
    }
}

pub(crate) enum NodeKind {
    /// The backward of a recorded op.
    Op(Op),
    /// Accumulates into a leaf's `.grad`.
    AccumulateGrad(Arc<LeafState>),
}

/// A node of the backward graph: computes the gradients of an op's inputs
/// from the gradient of its output.
pub struct Node {
    /// Creation order; a node is always created after the nodes it points
    /// to, so walking in decreasing `seq` is a topological order.
    pub(crate) seq: u64,
    pub(crate) kind: NodeKind,
    /// Where each input's gradient goes (one per op input).
    pub(crate) edges: Vec<Edge>,
    /// What the gradient flowing into this node must look like.
    pub(crate) metadata: InputMetadata,
    /// Tensors the backward formula needs; `None` once released.
    pub(crate) saved: Mutex<Option<Vec<Tensor>>>,
    /// The storage version of each saved tensor when it was saved: a
    /// backward refuses to use one that was modified in place since.
    pub(crate) saved_versions: Vec<u64>,
    /// Hooks on the op's output tensor, run before the formula.
    pub(crate) pre_hooks: Mutex<Vec<HookEntry>>,
    /// Whether the gradient of the op's output is kept in `retained_grad`
    /// (PyTorch's `retain_grad()` on a non-leaf).
    pub(crate) retains_grad: AtomicBool,
    /// The retained gradient, summed over backward calls as a leaf's is.
    pub(crate) retained_grad: Mutex<Option<Tensor>>,
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

impl Node {
    pub(crate) fn new(kind: NodeKind, edges: Vec<Edge>, metadata: InputMetadata, saved: Vec<Tensor>) -> Node {
        Node {
            seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
            kind,
            edges,
            metadata,
            saved_versions: saved.iter().map(Tensor::version).collect(),
            saved: Mutex::new(Some(saved)),
            pre_hooks: Mutex::new(Vec::new()),
            retains_grad: AtomicBool::new(false),
            retained_grad: Mutex::new(None),
        }
    }

    /// Whether `retain_grad()` was called on the op's output.
    pub(crate) fn retains_grad(&self) -> bool {
        self.retains_grad.load(Ordering::Relaxed)
    }

    /// Whether hooks are registered on the gradient this node receives.
    pub(crate) fn has_hooks(&self) -> bool {
        match &self.kind {
            NodeKind::AccumulateGrad(leaf) => !leaf.hooks.lock().is_empty(),
            NodeKind::Op(_) => !self.pre_hooks.lock().is_empty(),
        }
    }

    /// How many hooks are registered on the gradient this node receives.
    pub(crate) fn hook_count(&self) -> usize {
        match &self.kind {
            NodeKind::AccumulateGrad(leaf) => leaf.hooks.lock().len(),
            NodeKind::Op(_) => self.pre_hooks.lock().len(),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Op(op) => op.name(),
            NodeKind::AccumulateGrad(_) => "AccumulateGrad",
        }
    }
}

/// Dropping a node drops its edges, which may drop the nodes they point to,
/// and so on: a recursive drop as deep as the graph, which overflows the
/// stack for chains of some tens of thousands of ops. Instead, a node hands
/// its children (through edges and saved tensors) to an explicit stack, and
/// a child is taken apart here only when this was its last handle.
impl Drop for Node {
    fn drop(&mut self) {
        let mut stack = Vec::new();
        self.take_children(&mut stack);
        while let Some(node) = stack.pop() {
            if let Some(mut node) = Arc::into_inner(node) {
                node.take_children(&mut stack);
                // `node` drops here with no children left: no recursion.
            }
        }
    }
}

impl Node {
    fn take_children(&mut self, stack: &mut Vec<Arc<Node>>) {
        stack.extend(self.edges.drain(..).filter_map(|e| e.node));
        if let Some(saved) = self.saved.get_mut().take() {
            stack.extend(saved.into_iter().filter_map(Tensor::into_last_grad_fn));
        }
        stack.extend(self.retained_grad.get_mut().take().and_then(Tensor::into_last_grad_fn));
    }
}

/// An edge of the backward graph: where the gradient of one op input goes.
/// An edge with no node carries no gradient (the input does not require grad).
#[derive(Clone)]
pub struct Edge {
    pub(crate) node: Option<Arc<Node>>,
}

impl Edge {
    /// The metadata of the gradient this edge carries, `None` if it carries none.
    pub fn metadata(&self) -> Option<InputMetadata> {
        self.node.as_ref().map(|n| n.metadata.clone())
    }

    /// Whether a gradient flows along this edge.
    pub fn is_valid(&self) -> bool {
        self.node.is_some()
    }
}

impl Tensor {
    /// The edge a gradient of this tensor flows along.
    pub(crate) fn gradient_edge(&self) -> Edge {
        let node = match &self.0.autograd {
            AutogradMeta::None => None,
            AutogradMeta::Leaf(leaf) => Some(leaf.accumulator()),
            AutogradMeta::Interior(node) => Some(node.clone()),
        };
        Edge { node }
    }

    /// The edges of the op that produced this tensor (empty for leaves).
    pub fn next_edges(&self) -> Vec<Edge> {
        self.grad_fn().map(|n| n.edges.clone()).unwrap_or_default()
    }
}

/// Attaches a backward node for `op` to `out` when grad mode is on and some
/// input requires grad; otherwise returns `out` untouched.
pub(crate) fn record(op: Op, inputs: &[&Tensor], saved: Vec<Tensor>, out: Tensor) -> Tensor {
    if !is_grad_enabled() || !inputs.iter().any(|t| t.needs_grad()) {
        return out;
    }
    let edges = inputs.iter().map(|t| t.gradient_edge()).collect();
    let node = Node::new(NodeKind::Op(op), edges, out.metadata(), saved);
    out.with_autograd(AutogradMeta::Interior(Arc::new(node)))
}
