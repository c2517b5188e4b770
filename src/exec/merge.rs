//! Deferred elementwise kernels. An eager elementwise op does not dispatch
//! at once: its kernel joins the device's pending group, and consecutive
//! ops over the same shape become one kernel, dispatched just before the
//! next command of any other kind (a reduction, a matmul, a copy, a
//! readback, a submit). Values flow between the merged ops in registers;
//! an output is stored only if its tensor is still alive when the group is
//! dispatched, and work that only fed dead outputs is dropped.
//!
//! This is what makes an eager forward pass cheap on adapters with a high
//! per-dispatch cost (lavapipe wakes its thread pool for every dispatch):
//! W5's 200-op forward chain is a handful of kernels, W2's is one.
//!
//! Every tensor still gets its own storage when the op runs, so nothing
//! else changes: a merged op's result is bit-for-bit what its own kernel
//! would have computed, since each element is evaluated by the same
//! expressions in the same order.

use std::sync::{Arc, Weak};

use crate::alloc::PooledBuffer;
use crate::exec::bind::Operand;
use crate::exec::kernel::{Access, MapKernel, Node, NodeId};
use crate::layout::Layout;
use crate::metadata::{DType, Shape};

/// The most nodes a merged kernel holds: outputs that die do not count
/// against the binding limit, so without a cap a long loop of ops would
/// grow one kernel without end (and the shader compiler's time with it).
const MAX_NODES: usize = 192;

/// A buffer read by the group, through `view`.
struct GroupInput {
    buffer: Arc<PooledBuffer>,
    view: Layout,
    gathered: bool,
}

/// A buffer the group writes (contiguous over the group's shape). Weak:
/// if its tensor is dropped before the group runs, nothing can read it,
/// so it is not stored.
struct GroupOutput {
    buffer: Weak<PooledBuffer>,
    node: NodeId,
}

/// One elementwise op offered to the group: its kernel, each input's
/// buffer and view (broadcast to `shape`, or its own for gathered
/// bindings), its new output buffers, and its scalars.
pub(crate) struct MapOp<'a> {
    pub label: &'static str,
    pub kernel: &'a MapKernel,
    pub inputs: Vec<(Arc<PooledBuffer>, Layout)>,
    pub outputs: Vec<Arc<PooledBuffer>>,
    pub scalars: &'a [f64],
    pub shape: &'a Shape,
}

/// Elementwise ops waiting to run as one kernel.
pub(crate) struct PendingMaps {
    label: &'static str,
    shape: Shape,
    kernel: MapKernel,
    scalars: Vec<f64>,
    inputs: Vec<GroupInput>,
    outputs: Vec<GroupOutput>,
}

/// What a flushed group dispatches: the merged kernel over `shape`, with
/// its input views and bound buffers (inputs, then outputs).
pub(crate) struct MergedKernel {
    pub label: &'static str,
    pub shape: Shape,
    pub kernel: MapKernel,
    pub scalars: Vec<f64>,
    pub views: Vec<Layout>,
    pub out_views: Vec<Layout>,
    pub buffers: Vec<Arc<PooledBuffer>>,
}

impl MergedKernel {
    /// The bound storage as kernel operands (inputs, then outputs).
    pub fn operands(&self) -> Vec<Operand> {
        let k = &self.kernel;
        let dtypes = k.inputs.iter().map(|(d, _)| *d).chain(k.outputs.iter().map(|(id, _)| k.dtype(*id)));
        self.buffers.iter().zip(dtypes).map(|(b, d)| b.operand(d)).collect()
    }
}

impl PendingMaps {
    /// A group holding just `op`.
    pub fn new(op: &MapOp<'_>) -> PendingMaps {
        let mut group = PendingMaps {
            label: op.label,
            shape: op.shape.clone(),
            kernel: MapKernel::default(),
            scalars: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        let joined = group.join(op, (usize::MAX, usize::MAX));
        debug_assert!(joined, "an empty group takes any op of its shape");
        group
    }

    /// Adds `op` to the group if it can run in the same kernel: same shape,
    /// reads of the group's own outputs at the current element only, no
    /// buffer both read and written, at most `max.0` operands and
    /// `max.1` distinct buffers (storage bindings: tensors in one arena
    /// share one), and [`MAX_NODES`] nodes. `false` leaves the group
    /// unchanged.
    pub fn join(&mut self, op: &MapOp<'_>, max: (usize, usize)) -> bool {
        if op.shape != &self.shape {
            return false;
        }
        let own = Layout::contiguous(self.shape.clone());
        // Where each of the op's bindings comes from: a value already in
        // the group (an output of an earlier op) or a group input.
        enum Source {
            Value(NodeId),
            Binding(usize),
        }
        let mut sources = Vec::with_capacity(op.inputs.len());
        let mut new_inputs: Vec<(&Arc<PooledBuffer>, &Layout, bool, DType)> = Vec::new();
        for ((buffer, view), &(dtype, access)) in op.inputs.iter().zip(&op.kernel.inputs) {
            let gathered = access == Access::Gathered;
            let written = self.outputs.iter().rev().find(|o| std::ptr::eq(o.buffer.as_ptr(), Arc::as_ptr(buffer)));
            if let Some(o) = written {
                if gathered || *view != own {
                    return false;
                }
                sources.push(Source::Value(o.node));
                continue;
            }
            let same = |i: &GroupInput| Arc::ptr_eq(&i.buffer, buffer) && i.view == *view && i.gathered == gathered;
            let at = match self.inputs.iter().position(same) {
                Some(at) => at,
                None => match new_inputs
                    .iter()
                    .position(|&(b, v, g, _)| Arc::ptr_eq(b, buffer) && v == view && g == gathered)
                {
                    Some(at) => self.inputs.len() + at,
                    None => {
                        new_inputs.push((buffer, view, gathered, dtype));
                        self.inputs.len() + new_inputs.len() - 1
                    }
                },
            };
            sources.push(Source::Binding(at));
        }
        let read = |b: &Arc<PooledBuffer>| self.inputs.iter().any(|i| Arc::ptr_eq(&i.buffer, b));
        if op.outputs.iter().any(read) {
            return false;
        }
        if self.kernel.nodes.len() + op.kernel.nodes.len() > MAX_NODES {
            return false;
        }
        let live: Vec<Arc<PooledBuffer>> = self.outputs.iter().filter_map(|o| o.buffer.upgrade()).collect();
        let operands = self.inputs.len() + new_inputs.len() + live.len() + op.outputs.len();
        if operands > max.0 {
            return false;
        }
        // Distinct buffers are at most the operands: count them only when
        // that bound is over the limit (tensors sharing arenas), as this
        // runs for every op that joins.
        if operands > max.1 {
            let mut buffers: Vec<&wgpu::Buffer> = Vec::new();
            let all = self.inputs.iter().map(|i| &i.buffer).chain(new_inputs.iter().map(|n| n.0)).chain(&live);
            for b in all.chain(&op.outputs) {
                if !buffers.contains(&b.raw()) {
                    buffers.push(b.raw());
                }
            }
            if buffers.len() > max.1 {
                return false;
            }
        }

        // Commit: bindings, scalar slots, then the op's nodes in order.
        for (buffer, view, gathered, dtype) in new_inputs {
            self.inputs.push(GroupInput { buffer: buffer.clone(), view: view.clone(), gathered });
            self.kernel.inputs.push((dtype, if gathered { Access::Gathered } else { Access::Linear }));
        }
        let scalar_base = self.kernel.scalars.len();
        self.kernel.scalars.extend_from_slice(&op.kernel.scalars);
        self.scalars.extend_from_slice(op.scalars);
        let binding = |j: usize| match sources[j] {
            Source::Binding(at) => at,
            Source::Value(_) => unreachable!("a gathered binding is never a group value"),
        };
        let mut ids = Vec::with_capacity(op.kernel.nodes.len());
        for &(node, dtype) in &op.kernel.nodes {
            let id = match node {
                Node::Input(j) => match sources[j] {
                    Source::Value(v) => v,
                    Source::Binding(at) => self.kernel.push(Node::Input(at), dtype),
                },
                other => {
                    let mapped = other.remap(|n| ids[n], binding, |slot| scalar_base + slot);
                    self.kernel.push(mapped, dtype)
                }
            };
            ids.push(id);
        }
        for (&(node, _), buffer) in op.kernel.outputs.iter().zip(&op.outputs) {
            self.outputs.push(GroupOutput { buffer: Arc::downgrade(buffer), node: ids[node] });
        }
        true
    }

    /// The kernel to dispatch: only the outputs whose tensors are alive,
    /// only the nodes and bindings they need. `None` when every output
    /// has been dropped (nothing could observe the work).
    pub fn finish(self) -> Option<MergedKernel> {
        let live: Vec<(Arc<PooledBuffer>, NodeId)> =
            self.outputs.iter().filter_map(|o| o.buffer.upgrade().map(|b| (b, o.node))).collect();
        if live.is_empty() {
            return None;
        }
        let nodes = &self.kernel.nodes;
        let mut needed = vec![false; nodes.len()];
        for &(_, node) in &live {
            needed[node] = true;
        }
        let mut bindings_used = vec![false; self.inputs.len()];
        for id in (0..nodes.len()).rev() {
            if !needed[id] {
                continue;
            }
            let mut need = |n: NodeId| needed[n] = true;
            match nodes[id].0 {
                Node::Input(b) => bindings_used[b] = true,
                Node::Scalar(_) | Node::Index | Node::Random(..) | Node::Arg => {}
                Node::Unary(_, a) | Node::Cast(a) | Node::RowReduce(_, a) => need(a),
                Node::CheckedRowSum { fast, src, addends, magnitude, smallest } => {
                    need(fast);
                    need(src);
                    need(addends);
                    need(magnitude);
                    need(smallest);
                }
                Node::Binary(_, x, y) | Node::Compare(_, x, y) | Node::RandomAt(_, x, y) => {
                    need(x);
                    need(y);
                }
                Node::Select(c, x, y) => {
                    need(c);
                    need(x);
                    need(y);
                }
                Node::Gather(b, offset) => {
                    bindings_used[b] = true;
                    need(offset);
                }
                Node::SegmentSum { values, starts, positions, .. } => {
                    bindings_used[values] = true;
                    bindings_used[starts] = true;
                    bindings_used[positions] = true;
                }
            }
        }
        let mut binding_of = vec![usize::MAX; self.inputs.len()];
        let mut kernel = MapKernel { scalars: self.kernel.scalars.clone(), ..MapKernel::default() };
        let mut views = Vec::new();
        let mut buffers = Vec::new();
        for (b, input) in self.inputs.into_iter().enumerate() {
            if bindings_used[b] {
                binding_of[b] = kernel.inputs.len();
                kernel.inputs.push(self.kernel.inputs[b]);
                views.push(input.view);
                buffers.push(input.buffer);
            }
        }
        let mut ids = vec![usize::MAX; nodes.len()];
        for (id, &(node, dtype)) in nodes.iter().enumerate() {
            if !needed[id] {
                continue;
            }
            let mapped = node.remap(|n| ids[n], |b| binding_of[b], |slot| slot);
            ids[id] = kernel.push(mapped, dtype);
        }
        let own = Layout::contiguous(self.shape.clone());
        let mut out_views = Vec::new();
        for (buffer, node) in live {
            kernel.output(ids[node]);
            out_views.push(own.clone());
            buffers.push(buffer);
        }
        Some(MergedKernel {
            label: self.label,
            shape: self.shape,
            kernel,
            scalars: self.scalars,
            views,
            out_views,
            buffers,
        })
    }
}
