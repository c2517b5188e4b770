//! Fusion: decides which values get a kernel and which are computed inside
//! another value's kernel, and orders the kernels.
//!
//! - An elementwise value read once, by an elementwise op or a reduction,
//!   is *inlined*: its expression is spliced into the reader's kernel, read
//!   through whatever view the reader uses (composed with [`Layout::compose`]),
//!   so broadcasts, transposes and slices fuse too.
//! - Elementwise values that must be stored (read twice, graph outputs) are
//!   grouped into multi-output kernels of one iteration shape, as long as
//!   no kernel outside the group sits between two members.
//! - A reduction evaluates its (inlined) elementwise prologue as it reads.
//! - A matmul whose one reader is elementwise and of its shape stores the
//!   reader's value instead: the reader becomes the matmul's epilogue.

use std::collections::{BTreeSet, BinaryHeap, HashMap};

use crate::compiler::emit::{Blocked, Emitter, group_emit};
use crate::compiler::ir::{CapturedGraph, IrOp, Use, Value, ValueId};
use crate::exec::ReduceKind;
use crate::exec::kernel::{MapKernel, Node};
use crate::layout::Layout;
use crate::metadata::Shape;

/// A kernel (or host step) of the lowered program.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// One elementwise kernel over `shape`, storing each of `stores`.
    Elementwise {
        shape: Shape,
        kernel: MapKernel,
        reads: Vec<Use>,
        scalars: Vec<f64>,
        stores: Vec<ValueId>,
        inlined: Vec<ValueId>,
    },
    /// `kernel` (one output) over the [a, k] iteration `shape`, reduced over k.
    Reduce {
        value: ValueId,
        kind: ReduceKind,
        kernel: MapKernel,
        reads: Vec<Use>,
        scalars: Vec<f64>,
        shape: Shape,
        a: usize,
        k: usize,
        inlined: Vec<ValueId>,
    },
    /// `a @ b` through `epilogue` into `value` (the matmul's own value or its fused reader).
    Matmul {
        value: ValueId,
        a: Use,
        b: Use,
        epilogue: MapKernel,
        reads: Vec<Use>,
        scalars: Vec<f64>,
        inlined: Vec<ValueId>,
    },
    Assemble {
        value: ValueId,
        pieces: Vec<(Use, usize, usize)>,
        zero_fill: bool,
    },
    Hook {
        value: ValueId,
        src: Use,
        point: usize,
    },
}

impl Step {
    /// The values whose buffers the step reads.
    pub fn reads(&self) -> Vec<&Use> {
        match self {
            Step::Elementwise { reads, .. } | Step::Reduce { reads, .. } => reads.iter().collect(),
            Step::Matmul { a, b, reads, .. } => {
                let mut r: Vec<&Use> = reads.iter().collect();
                r.extend([a, b]);
                r
            }
            Step::Assemble { pieces, .. } => pieces.iter().map(|(u, _, _)| u).collect(),
            Step::Hook { src, .. } => vec![src],
        }
    }

    /// Values computed inside this step's kernel without being stored.
    pub fn inlined(&self) -> &[ValueId] {
        match self {
            Step::Elementwise { inlined, .. } | Step::Reduce { inlined, .. } | Step::Matmul { inlined, .. } => inlined,
            Step::Assemble { .. } | Step::Hook { .. } => &[],
        }
    }

    /// A short name for logs and the DOT export.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Elementwise { .. } => "elementwise",
            Step::Reduce { .. } => "reduce",
            Step::Matmul { .. } => "matmul",
            Step::Assemble { .. } => "assemble",
            Step::Hook { .. } => "hook (host)",
        }
    }

    /// The values the step stores.
    pub fn stores(&self) -> Vec<ValueId> {
        match self {
            Step::Elementwise { stores, .. } => stores.clone(),
            Step::Reduce { value, .. }
            | Step::Matmul { value, .. }
            | Step::Assemble { value, .. }
            | Step::Hook { value, .. } => vec![*value],
        }
    }
}

/// A kernel being formed.
#[derive(Debug)]
enum Unit {
    Elementwise { members: Vec<ValueId> },
    Matmul { value: ValueId, epilogue: Option<ValueId> },
    Other { value: ValueId },
}

struct Planner<'a> {
    values: &'a [Value],
    inline: &'a [bool],
    uses: &'a [usize],
    outputs: &'a [bool],
    units: Vec<Unit>,
    unit_of: HashMap<ValueId, usize>,
    succ: Vec<BTreeSet<usize>>,
    max_bindings: usize,
    /// Bindings a kernel may grow to by joining; below `max_bindings` when a
    /// first attempt produced a kernel whose members ended up stored for
    /// later readers and so exceeded the limit.
    budget: usize,
    /// Members of elementwise kernels read from a buffer by another kernel.
    external: std::collections::HashSet<ValueId>,
}

impl Planner<'_> {
    fn new_unit(&mut self, unit: Unit, values: &[ValueId]) -> usize {
        self.units.push(unit);
        self.succ.push(BTreeSet::new());
        let id = self.units.len() - 1;
        for &v in values {
            self.unit_of.insert(v, id);
        }
        id
    }

    /// Whether unit `to` depends (transitively) on unit `from`.
    fn reaches(&self, from: usize, to: usize) -> bool {
        let mut stack = vec![from];
        let mut seen = vec![false; self.units.len()];
        while let Some(u) = stack.pop() {
            if u == to {
                return true;
            }
            for &s in &self.succ[u] {
                if !seen[s] {
                    seen[s] = true;
                    stack.push(s);
                }
            }
        }
        false
    }

    /// Units producing `reads` (inputs have none), other than `except`.
    fn producers(&self, reads: &BTreeSet<ValueId>, except: Option<usize>) -> BTreeSet<usize> {
        reads.iter().filter_map(|v| self.unit_of.get(v).copied()).filter(|&u| Some(u) != except).collect()
    }

    fn link(&mut self, producers: &BTreeSet<usize>, unit: usize) {
        for &p in producers {
            self.succ[p].insert(unit);
        }
    }

    /// Records which members of other kernels `unit` reads from buffers.
    fn note_reads(&mut self, reads: &BTreeSet<ValueId>, unit: usize) {
        for &r in reads {
            if self.unit_of.get(&r).is_some_and(|&u| u != unit) {
                self.external.insert(r);
            }
        }
    }

    /// An inlined value to store instead, when a kernel reads more buffers
    /// than a kernel may bind.
    fn too_wide(&self, e: &Emitter<'_>, stores: usize) -> Result<(), Blocked> {
        if e.reads.len() + stores <= self.max_bindings {
            return Ok(());
        }
        match e.inlined.first() {
            Some(&v) => Err(Blocked(v)),
            None => Ok(()), // one op reads at most three buffers
        }
    }

    /// Dry run of a stored elementwise value: its buffer reads.
    fn probe(&self, value: ValueId, members: &[ValueId], arg: Option<ValueId>) -> Result<Emitter<'_>, Blocked> {
        let mut e = Emitter::new(self.values, self.inline);
        for (i, &m) in members.iter().enumerate() {
            e.members.insert(m, usize::MAX - i);
        }
        e.arg = arg;
        e.root(value)?;
        Ok(e)
    }

    fn place_elementwise(&mut self, v: ValueId) -> Result<(), Blocked> {
        let alone = self.probe(v, &[], None)?;
        self.too_wide(&alone, 1)?;
        let reads = alone.read_values();
        let shape = &self.values[v].meta.shape;

        // A matmul read once, element for element, takes v as its epilogue.
        for &r in &reads {
            let Some(&unit) = self.unit_of.get(&r) else { continue };
            let Unit::Matmul { value, epilogue: None } = self.units[unit] else { continue };
            let rv = &self.values[r];
            let direct =
                !alone.gathers(r) && alone.reads.iter().filter(|u| u.value == r).all(|u| u.is_identity(&rv.meta));
            if value != r
                || self.uses[r] != 1
                || self.outputs[r]
                || !direct
                || rv.meta.dtype != self.values[v].meta.dtype
            {
                continue;
            }
            let e = self.probe(v, &[], Some(r))?;
            let (e_reads, width) = (e.read_values(), e.reads.len() + 3);
            drop(e);
            let others = self.producers(&e_reads, Some(unit));
            if width > self.budget || others.iter().any(|&p| self.reaches(unit, p)) {
                continue;
            }
            self.units[unit] = Unit::Matmul { value: r, epilogue: Some(v) };
            self.unit_of.insert(v, unit);
            self.link(&others, unit);
            self.note_reads(&e_reads, unit);
            return Ok(());
        }

        // Join the most recent compatible elementwise kernel, if any.
        let candidates: Vec<usize> = (0..self.units.len()).rev().take(16).collect();
        for g in candidates {
            let Unit::Elementwise { members } = &self.units[g] else { continue };
            if &self.values[members[0]].meta.shape != shape {
                continue;
            }
            let members = members.clone();
            let joint = self.probe(v, &members, None)?;
            // A member read other than element for element needs the member finished: another kernel.
            if joint.reads.iter().any(|u| members.contains(&u.value)) {
                continue;
            }
            let joint_reads = joint.read_values();
            drop(joint);
            let producers = self.producers(&joint_reads, Some(g));
            if producers.iter().any(|&p| self.reaches(g, p)) {
                continue;
            }
            let mut group = Emitter::new(self.values, self.inline);
            let mut all = members.clone();
            all.push(v);
            // Stores: members already read elsewhere or outputs, and v.
            let stores = 1 + members.iter().filter(|m| self.outputs[**m] || self.external.contains(m)).count();
            if group_emit(&mut group, &all).is_err() || group.reads.len() + stores > self.budget {
                continue;
            }
            if let Unit::Elementwise { members } = &mut self.units[g] {
                members.push(v);
            }
            self.unit_of.insert(v, g);
            self.link(&producers, g);
            self.note_reads(&joint_reads, g);
            return Ok(());
        }
        let unit = self.new_unit(Unit::Elementwise { members: vec![v] }, &[v]);
        let producers = self.producers(&reads, Some(unit));
        self.link(&producers, unit);
        self.note_reads(&reads, unit);
        Ok(())
    }
}

/// The iteration view and sizes of a reduction of `src` over `axes`.
fn reduce_iteration(src: &Use, axes: &[usize]) -> (Use, usize, usize) {
    let (layout, a, k) = crate::exec::reduce_view(&src.layout, axes);
    (Use { value: src.value, layout }, a, k)
}

/// Which values are inlined into their one reader to start with; a
/// constant (an elementwise value that reads nothing, such as the `full 1`
/// seed of a backward) into every reader, since recomputing it is free and
/// storing it is a kernel.
fn initial_inline(g: &CapturedGraph, uses: &[usize], outputs: &[bool]) -> Vec<bool> {
    let mut readers: Vec<Vec<ValueId>> = vec![Vec::new(); g.values.len()];
    for (id, v) in g.values.iter().enumerate() {
        for u in v.op.uses() {
            readers[u.value].push(id);
        }
    }
    g.values
        .iter()
        .enumerate()
        .map(|(id, v)| {
            let IrOp::Map { kernel, .. } = &v.op else { return false };
            let constant = kernel.inputs.is_empty() && !kernel.positional();
            let fusable_reader = |r: &ValueId| matches!(g.values[*r].op, IrOp::Map { .. } | IrOp::Reduce { .. });
            (uses[id] == 1 || constant) && !outputs[id] && readers[id].iter().all(fusable_reader)
        })
        .collect()
}

/// How many storage bindings kernels may use: `operands` tensors read or
/// written (the size of the generated kernel), and `buffers` distinct
/// buffers (the device's limit). Tensors live in one arena per dtype,
/// except those above `dedicated_bytes`, which get a buffer of their own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BindingLimits {
    pub operands: usize,
    pub buffers: usize,
    pub dedicated_bytes: u64,
}

/// The kernels of `g` in execution order, and how many IR values were
/// fused into another value's kernel.
pub(crate) fn schedule(g: &CapturedGraph, limits: BindingLimits) -> (Vec<Step>, usize) {
    let max_bindings = limits.operands;
    let uses = g.use_counts();
    let mut outputs = vec![false; g.values.len()];
    for (v, _) in &g.outputs {
        outputs[*v] = true;
    }
    let mut inline = initial_inline(g, &uses, &outputs);
    let mut budget = max_bindings;
    loop {
        match try_schedule(g, &inline, &uses, &outputs, max_bindings, budget) {
            Ok(steps) if budget > 2 && steps.iter().any(|s| too_wide(g, s, limits)) => budget -= 2,
            Ok(steps) => {
                let computed =
                    g.values.iter().filter(|v| !matches!(v.op, IrOp::Input { .. } | IrOp::Hook { .. })).count();
                let kernels = steps.iter().filter(|s| !matches!(s, Step::Hook { .. })).count();
                return (steps, computed.saturating_sub(kernels));
            }
            // Each retry stores one more value; should a value already stored
            // block again, inline nothing (always schedulable).
            Err(Blocked(v)) if inline[v] => inline[v] = false,
            Err(Blocked(_)) => inline.iter_mut().for_each(|i| *i = false),
        }
    }
}

/// Whether a step has more operands, or is expected to bind more buffers
/// (one per dtype for arena tensors, one per large tensor), than allowed.
fn too_wide(g: &CapturedGraph, step: &Step, limits: BindingLimits) -> bool {
    let values: Vec<ValueId> = match step {
        Step::Elementwise { reads, stores, .. } => {
            reads.iter().map(|u| u.value).chain(stores.iter().copied()).collect()
        }
        Step::Reduce { value, reads, .. } => reads.iter().map(|u| u.value).chain([*value]).collect(),
        Step::Matmul { value, a, b, reads, .. } => {
            reads.iter().map(|u| u.value).chain([*value, a.value, b.value]).collect()
        }
        Step::Assemble { .. } | Step::Hook { .. } => return false,
    };
    let mut buffers: Vec<Result<crate::DType, ValueId>> = Vec::new();
    for v in &values {
        let meta = &g.values[*v].meta;
        let bytes = (meta.shape.numel() * meta.dtype.size_in_bytes()) as u64;
        let key = if bytes > limits.dedicated_bytes { Err(*v) } else { Ok(meta.dtype) };
        if !buffers.contains(&key) {
            buffers.push(key);
        }
    }
    values.len() > limits.operands || buffers.len() > limits.buffers
}

fn try_schedule(
    g: &CapturedGraph,
    inline: &[bool],
    uses: &[usize],
    outputs: &[bool],
    max_bindings: usize,
    budget: usize,
) -> Result<Vec<Step>, Blocked> {
    let mut p = Planner {
        values: &g.values,
        inline,
        uses,
        outputs,
        units: Vec::new(),
        unit_of: HashMap::new(),
        succ: Vec::new(),
        max_bindings,
        budget,
        external: Default::default(),
    };
    let mut last_hook: Option<usize> = None;
    for (id, v) in g.values.iter().enumerate() {
        match &v.op {
            IrOp::Input { .. } => {}
            IrOp::Map { .. } if inline[id] => {}
            IrOp::Map { .. } => p.place_elementwise(id)?,
            IrOp::Reduce { src, axes, .. } => {
                let (it, _, _) = reduce_iteration(src, axes);
                let mut e = Emitter::new(&g.values, inline);
                e.emit(&it)?;
                p.too_wide(&e, 1)?;
                let unit = p.new_unit(Unit::Other { value: id }, &[id]);
                let producers = p.producers(&e.read_values(), Some(unit));
                p.link(&producers, unit);
                p.note_reads(&e.read_values(), unit);
            }
            IrOp::Matmul { a, b } => {
                let unit = p.new_unit(Unit::Matmul { value: id, epilogue: None }, &[id]);
                let reads = [a.value, b.value].into();
                let producers = p.producers(&reads, Some(unit));
                p.link(&producers, unit);
                p.note_reads(&reads, unit);
            }
            IrOp::Assemble { pieces, .. } => {
                let unit = p.new_unit(Unit::Other { value: id }, &[id]);
                let reads = pieces.iter().map(|(u, _, _)| u.value).collect();
                let producers = p.producers(&reads, Some(unit));
                p.link(&producers, unit);
                p.note_reads(&reads, unit);
            }
            IrOp::Hook { src, .. } => {
                let unit = p.new_unit(Unit::Other { value: id }, &[id]);
                let reads = [src.value].into();
                let mut producers = p.producers(&reads, Some(unit));
                p.note_reads(&reads, unit);
                // Hooks run in eager order.
                producers.extend(last_hook);
                p.link(&producers, unit);
                last_hook = Some(unit);
            }
        }
    }

    // Kahn's algorithm, earliest-created unit first among the ready ones.
    let n = p.units.len();
    let mut indegree = vec![0; n];
    for s in &p.succ {
        for &t in s {
            indegree[t] += 1;
        }
    }
    let mut ready: BinaryHeap<std::cmp::Reverse<usize>> =
        (0..n).filter(|&u| indegree[u] == 0).map(std::cmp::Reverse).collect();
    let mut steps = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(u)) = ready.pop() {
        steps.push(build_step(g, inline, &p.units[u])?);
        for &t in &p.succ[u] {
            indegree[t] -= 1;
            if indegree[t] == 0 {
                ready.push(std::cmp::Reverse(t));
            }
        }
    }
    debug_assert_eq!(steps.len(), n, "the unit graph is acyclic");
    drop_unread_stores(&mut steps, outputs);
    Ok(steps)
}

/// A kernel member read only inside its own kernel (as a register) and
/// not a graph output needs no store.
fn drop_unread_stores(steps: &mut [Step], outputs: &[bool]) {
    let read: std::collections::HashSet<ValueId> = steps.iter().flat_map(|s| s.reads()).map(|u| u.value).collect();
    for step in steps {
        if let Step::Elementwise { kernel, stores, .. } = step {
            let keep: Vec<bool> = stores.iter().map(|&v| outputs[v] || read.contains(&v)).collect();
            let kept = |i: &usize| keep[*i];
            kernel.outputs = (0..keep.len()).filter(kept).map(|i| kernel.outputs[i]).collect();
            *stores = (0..keep.len()).filter(kept).map(|i| stores[i]).collect();
        }
    }
}

fn build_step(g: &CapturedGraph, inline: &[bool], unit: &Unit) -> Result<Step, Blocked> {
    let mut e = Emitter::new(&g.values, inline);
    Ok(match unit {
        Unit::Elementwise { members } => {
            let nodes = group_emit(&mut e, members)?;
            for n in nodes {
                e.kernel.output(n);
            }
            let shape = g.values[members[0]].meta.shape.clone();
            Step::Elementwise {
                shape,
                kernel: e.kernel,
                reads: e.reads,
                scalars: e.scalars,
                stores: members.clone(),
                inlined: e.inlined,
            }
        }
        Unit::Matmul { value, epilogue } => {
            let IrOp::Matmul { a, b } = &g.values[*value].op else { unreachable!("matmul unit holds a matmul") };
            let (stored, node) = match epilogue {
                Some(v) => {
                    e.arg = Some(*value);
                    (*v, e.root(*v)?)
                }
                None => (*value, e.kernel.push(Node::Arg, g.values[*value].meta.dtype)),
            };
            e.kernel.output(node);
            Step::Matmul {
                value: stored,
                a: a.clone(),
                b: b.clone(),
                epilogue: e.kernel,
                reads: e.reads,
                scalars: e.scalars,
                inlined: e.inlined,
            }
        }
        Unit::Other { value } => match &g.values[*value].op {
            IrOp::Reduce { kind, src, axes } => {
                let (it, a, k) = reduce_iteration(src, axes);
                let node = e.emit(&it)?;
                e.kernel.output(node);
                let shape = it.layout.shape.clone();
                Step::Reduce {
                    value: *value,
                    kind: *kind,
                    kernel: e.kernel,
                    reads: e.reads,
                    scalars: e.scalars,
                    shape,
                    a,
                    k,
                    inlined: e.inlined,
                }
            }
            IrOp::Assemble { pieces, zero_fill } => {
                Step::Assemble { value: *value, pieces: pieces.clone(), zero_fill: *zero_fill }
            }
            IrOp::Hook { src, point } => Step::Hook { value: *value, src: src.clone(), point: *point },
            IrOp::Input { .. } | IrOp::Map { .. } | IrOp::Matmul { .. } => unreachable!("not an `Other` unit"),
        },
    })
}

/// A contiguous view of `shape` at offset 0 (how kernels store values).
pub(crate) fn stored_layout(shape: &Shape) -> Layout {
    Layout::contiguous(shape.clone())
}
