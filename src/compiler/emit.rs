//! The kernel builder of fusion: splices the expressions of inlined
//! values into one [`MapKernel`], reading them through the view their
//! reader uses, and turns every other read into an input binding.

use std::collections::{BTreeSet, HashMap};

use crate::compiler::fusion::reduce_iteration;
use crate::compiler::ir::{IrOp, Use, Value, ValueId};
use crate::compiler::rows::{RowGroup, RowRole, reads_row};
use crate::exec::kernel::{Access, MapKernel, Node, NodeId};

/// Builds one fused kernel: splices the expressions of inlined values into
/// a [`MapKernel`], turning every other read into an input binding.
pub(crate) struct Emitter<'a> {
    values: &'a [Value],
    inline: &'a [bool],
    /// Values stored by this kernel, readable element for element as SSA.
    pub members: HashMap<ValueId, NodeId>,
    /// A matmul value this kernel is the epilogue of ([`Node::Arg`]).
    pub arg: Option<ValueId>,
    pub kernel: MapKernel,
    pub reads: Vec<Use>,
    pub scalars: Vec<f64>,
    memo: HashMap<Use, NodeId>,
    gathered_memo: HashMap<Use, usize>,
    /// Values spliced in (computed here, never stored).
    pub inlined: Vec<ValueId>,
    /// The row group this emitter builds the row kernel of: its members
    /// are computed here whatever their uses (see [`crate::compiler::rows`]).
    pub rows: Option<&'a RowGroup>,
}

/// How a spliced kernel's input is provided: as a node (read at the
/// current index) or as a binding (read at computed offsets).
#[derive(Clone, Copy)]
enum ArgRef {
    Node(NodeId),
    Binding(usize),
}

/// Why a kernel could not be built: this inlined value cannot be read
/// through the view its reader uses; it must be stored instead.
pub(crate) struct Blocked(pub ValueId);

impl<'a> Emitter<'a> {
    pub fn new(values: &'a [Value], inline: &'a [bool]) -> Emitter<'a> {
        Emitter {
            values,
            inline,
            members: HashMap::new(),
            arg: None,
            kernel: MapKernel::default(),
            reads: Vec::new(),
            scalars: Vec::new(),
            memo: HashMap::new(),
            gathered_memo: HashMap::new(),
            inlined: Vec::new(),
            rows: None,
        }
    }

    /// The node holding `u` at the kernel's current index.
    pub fn emit(&mut self, u: &Use) -> Result<NodeId, Blocked> {
        if let Some(&n) = self.memo.get(u) {
            return Ok(n);
        }
        let v = &self.values[u.value];
        let identity = u.is_identity(&v.meta);
        let role = self.rows.and_then(|group| group.role(u.value).map(|role| (group, role)));
        let node = if let Some((group, role)) = role {
            self.row_member(u, group, role)?
        } else if identity && self.members.contains_key(&u.value) {
            self.members[&u.value]
        } else if identity && self.arg == Some(u.value) {
            self.kernel.push(Node::Arg, v.meta.dtype)
        } else if self.inline[u.value] {
            self.inline_through(u)?
        } else {
            self.reads.push(u.clone());
            self.kernel.input(v.meta.dtype)
        };
        self.memo.insert(u.clone(), node);
        Ok(node)
    }

    /// A member of the row group, in its row kernel: a row reduction read
    /// once per row becomes a [`Node::RowReduce`] of its operand; an
    /// elementwise member is computed here, element for element (varying)
    /// or once per row (uniform).
    fn row_member(&mut self, u: &Use, group: &RowGroup, role: RowRole) -> Result<NodeId, Blocked> {
        let fits = match role {
            RowRole::Varying => u.layout.is_identity_of(&group.shape),
            RowRole::Uniform | RowRole::Reduction => reads_row(&u.layout, &group.shape),
        };
        if !fits {
            return Err(Blocked(u.value));
        }
        match &self.values[u.value].op {
            IrOp::Reduce { kind, src, axes } => {
                let (it, _, _) = reduce_iteration(src, axes);
                let operand = self.emit(&it)?;
                Ok(self.kernel.push(Node::RowReduce(*kind, operand), self.values[u.value].meta.dtype))
            }
            _ => self.expand(u),
        }
    }

    /// The expression of the elementwise value `u.value`, read through `u`.
    fn inline_through(&mut self, u: &Use) -> Result<NodeId, Blocked> {
        let IrOp::Map { kernel, .. } = &self.values[u.value].op else {
            return Err(Blocked(u.value));
        };
        if kernel.positional() && !u.is_identity(&self.values[u.value].meta) {
            return Err(Blocked(u.value));
        }
        // A segment sum loops; in a row kernel's loops it would run once per
        // element of the row, past the loop budget: stored instead.
        let loops = kernel.nodes.iter().any(|(n, _)| matches!(n, Node::SegmentSum { .. }));
        if loops && self.rows.is_some() {
            return Err(Blocked(u.value));
        }
        self.expand(u)
    }

    /// [`Emitter::inline_through`] without its checks.
    fn expand(&mut self, u: &Use) -> Result<NodeId, Blocked> {
        let IrOp::Map { kernel, args, scalars, .. } = &self.values[u.value].op else {
            return Err(Blocked(u.value));
        };
        if !self.inlined.contains(&u.value) {
            self.inlined.push(u.value);
        }
        let mut arg_refs = Vec::with_capacity(args.len());
        for (a, (_, access)) in args.iter().zip(&kernel.inputs) {
            arg_refs.push(if *access == Access::Gathered {
                ArgRef::Binding(self.gathered(a)?)
            } else {
                let layout = u.layout.compose(&a.layout).ok_or(Blocked(u.value))?;
                ArgRef::Node(self.emit(&Use { value: a.value, layout })?)
            });
        }
        Ok(self.splice(kernel, scalars, &arg_refs))
    }

    /// A binding read at computed offsets: its value must be in a buffer.
    fn gathered(&mut self, u: &Use) -> Result<usize, Blocked> {
        if let Some(&b) = self.gathered_memo.get(u) {
            return Ok(b);
        }
        if self.inline[u.value] {
            return Err(Blocked(u.value));
        }
        self.reads.push(u.clone());
        let b = self.kernel.gathered(self.values[u.value].meta.dtype);
        self.gathered_memo.insert(u.clone(), b);
        Ok(b)
    }

    /// The own expression of a stored elementwise value (its args emitted).
    pub fn root(&mut self, value: ValueId) -> Result<NodeId, Blocked> {
        let IrOp::Map { kernel, args, scalars, .. } = &self.values[value].op else {
            return Err(Blocked(value));
        };
        let mut arg_refs = Vec::with_capacity(args.len());
        for (a, (_, access)) in args.iter().zip(&kernel.inputs) {
            arg_refs.push(if *access == Access::Gathered {
                ArgRef::Binding(self.gathered(a)?)
            } else {
                ArgRef::Node(self.emit(a)?)
            });
        }
        Ok(self.splice(kernel, scalars, &arg_refs))
    }

    /// Copies `k`'s nodes into the kernel with its inputs bound to `args`.
    fn splice(&mut self, k: &MapKernel, scalars: &[f64], args: &[ArgRef]) -> NodeId {
        let binding = |j: usize| match args[j] {
            ArgRef::Binding(b) => b,
            ArgRef::Node(_) => unreachable!("gathered inputs are bound as bindings"),
        };
        let mut map = vec![0; k.nodes.len()];
        for (id, (node, dtype)) in k.nodes.iter().enumerate() {
            let new = match *node {
                Node::Input(j) => {
                    map[id] = match args[j] {
                        ArgRef::Node(n) => n,
                        ArgRef::Binding(_) => unreachable!("read inputs are nodes"),
                    };
                    continue;
                }
                Node::Gather(j, off) => Node::Gather(binding(j), map[off]),
                Node::SegmentSum { values, starts, positions, batched } => Node::SegmentSum {
                    values: binding(values),
                    starts: binding(starts),
                    positions: binding(positions),
                    batched,
                },
                Node::Scalar(j) => Node::Scalar(self.slot(k, scalars, j)),
                Node::Random(kind, j) => {
                    let first = self.slot(k, scalars, j);
                    self.slot(k, scalars, j + 1);
                    Node::Random(kind, first)
                }
                Node::Index => Node::Index,
                Node::Arg => Node::Arg,
                Node::Unary(op, a) => Node::Unary(op, map[a]),
                Node::Binary(op, a, b) => Node::Binary(op, map[a], map[b]),
                Node::RandomAt(kind, lo, hi) => Node::RandomAt(kind, map[lo], map[hi]),
                Node::Compare(op, a, b) => Node::Compare(op, map[a], map[b]),
                Node::Select(c, a, b) => Node::Select(map[c], map[a], map[b]),
                Node::Cast(a) => Node::Cast(map[a]),
                Node::RowReduce(kind, a) => Node::RowReduce(kind, map[a]),
                Node::CheckedRowSum { fast, src, addends, magnitude, smallest } => Node::CheckedRowSum {
                    fast: map[fast],
                    src: map[src],
                    addends: map[addends],
                    magnitude: map[magnitude],
                    smallest: map[smallest],
                },
            };
            map[id] = self.kernel.push(new, *dtype);
        }
        map[k.outputs[0].0]
    }

    fn slot(&mut self, k: &MapKernel, scalars: &[f64], j: usize) -> usize {
        self.scalars.push(scalars.get(j).copied().unwrap_or(0.0));
        self.kernel.scalar_slot(k.scalars[j])
    }

    /// Whether `value` is read at computed offsets (so it must be stored
    /// before this kernel runs).
    pub fn gathers(&self, value: ValueId) -> bool {
        self.gathered_memo.keys().any(|u| u.value == value)
    }

    /// Distinct values read from buffers.
    pub fn read_values(&self) -> BTreeSet<ValueId> {
        self.reads.iter().map(|u| u.value).collect()
    }
}

pub(crate) fn group_emit(e: &mut Emitter<'_>, members: &[ValueId]) -> Result<Vec<NodeId>, Blocked> {
    let mut nodes = Vec::new();
    for &m in members {
        let n = e.root(m)?;
        e.members.insert(m, n);
        nodes.push(n);
    }
    Ok(nodes)
}
