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
use crate::compiler::rows::{RowGroup, RowRole, as_rows, row_broadcast};
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
    /// `kernel`'s first output over the [a, k] iteration `shape`, reduced
    /// over k; its other outputs are the elementwise values `stores`, stored
    /// at each element as it is read (the iteration walks their shape
    /// element for element).
    Reduce {
        value: ValueId,
        /// Further sums over the same iteration, in one pass (outputs 1..).
        siblings: Vec<ValueId>,
        stores: Vec<ValueId>,
        kind: ReduceKind,
        kernel: MapKernel,
        reads: Vec<Use>,
        scalars: Vec<f64>,
        shape: Shape,
        a: usize,
        k: usize,
        inlined: Vec<ValueId>,
    },
    /// `a @ b` through `epilogue` into `value` (the matmul's own value or its
    /// fused reader); the epilogue's other outputs are the elementwise
    /// values `stores` of the product's shape (a forward activation beside
    /// its pre-activation, a parameter update beside its gradient).
    Matmul {
        value: ValueId,
        stores: Vec<ValueId>,
        a: Use,
        b: Use,
        epilogue: MapKernel,
        reads: Vec<Use>,
        scalars: Vec<f64>,
        inlined: Vec<ValueId>,
    },
    /// A row kernel over `a` rows of `k` ([`crate::compiler::rows`]): reads
    /// through two-dimensional [a, k] views, stores each of `stores` (a
    /// value per element or, `uniform`, one per row).
    Rows {
        a: usize,
        k: usize,
        passes: usize,
        kernel: MapKernel,
        reads: Vec<Use>,
        scalars: Vec<f64>,
        stores: Vec<(ValueId, bool)>,
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
            Step::Elementwise { reads, .. } | Step::Reduce { reads, .. } | Step::Rows { reads, .. } => {
                reads.iter().collect()
            }
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
            Step::Elementwise { inlined, .. }
            | Step::Reduce { inlined, .. }
            | Step::Matmul { inlined, .. }
            | Step::Rows { inlined, .. } => inlined,
            Step::Assemble { .. } | Step::Hook { .. } => &[],
        }
    }

    /// A short name for logs and the DOT export.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Elementwise { .. } => "elementwise",
            Step::Reduce { .. } => "reduce",
            Step::Matmul { .. } => "matmul",
            Step::Rows { .. } => "rows",
            Step::Assemble { .. } => "assemble",
            Step::Hook { .. } => "hook (host)",
        }
    }

    /// The values the step stores.
    pub fn stores(&self) -> Vec<ValueId> {
        match self {
            Step::Elementwise { stores, .. } => stores.clone(),
            Step::Rows { stores, .. } => stores.iter().map(|(v, _)| *v).collect(),
            Step::Reduce { value, siblings, stores, .. } => {
                [*value].into_iter().chain(siblings.iter().copied()).chain(stores.iter().copied()).collect()
            }
            Step::Matmul { value, stores, .. } => [*value].into_iter().chain(stores.iter().copied()).collect(),
            Step::Assemble { value, .. } | Step::Hook { value, .. } => vec![*value],
        }
    }
}

/// A kernel being formed.
#[derive(Debug)]
enum Unit {
    Elementwise {
        members: Vec<ValueId>,
    },
    Matmul {
        value: ValueId,
        epilogue: Option<ValueId>,
        side: Vec<ValueId>,
    },
    /// The row kernel of row group `group`, storing `stores`.
    Rows {
        group: usize,
        stores: Vec<ValueId>,
    },
    /// A reduction (and sibling sums over the same iteration), storing the
    /// elementwise `stores` of its iteration's shape.
    Reduce {
        value: ValueId,
        siblings: Vec<ValueId>,
        stores: Vec<ValueId>,
    },
    Other {
        value: ValueId,
    },
}

/// Why a schedule is tried again.
pub(crate) enum Retry {
    /// This value cannot be inlined where it is read: store it.
    Store(ValueId),
    /// This row group cannot be one kernel: schedule its values as usual.
    Rows(usize),
}

impl From<Blocked> for Retry {
    fn from(b: Blocked) -> Retry {
        Retry::Store(b.0)
    }
}

struct Planner<'a> {
    values: &'a [Value],
    /// The same graph at another batch size, when the program serves a
    /// family of batch sizes: every fusion decided by sizes must hold at
    /// both, and so holds at every size (sizes are affine in the batch, so
    /// two that are equal at two sizes are equal at all). Without it, a
    /// batch of 10 beside 10 classes fuses a [B, 512] kernel with a
    /// [512, 10] one read transposed, which no other batch size allows.
    twin: Option<&'a [Value]>,
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
    /// Per value: its row group, whether it depends on a row group's member
    /// without being one, whether a row group reads it (or what it is
    /// computed from) without it being a member. Kernels never mix the
    /// last two (the kernel graph would have a cycle through the group).
    group_of: Vec<Option<usize>>,
    after_rows: Vec<bool>,
    feeds_rows: Vec<bool>,
    /// Row kernels waiting for the kernel of a value they read.
    waiting: HashMap<ValueId, Vec<usize>>,
    /// Whether reductions take elementwise values in ([`Passes::reduce_stores`]).
    reduce_stores: bool,
    /// Whether matmul epilogues store more than one value ([`Passes::epilogues`]).
    epilogues: bool,
}

impl Planner<'_> {
    fn new_unit(&mut self, unit: Unit, values: &[ValueId]) -> usize {
        self.units.push(unit);
        self.succ.push(BTreeSet::new());
        let id = self.units.len() - 1;
        for &v in values {
            self.assign(v, id);
        }
        id
    }

    /// Puts `v` in `unit`, after which the row kernels reading `v` run.
    fn assign(&mut self, v: ValueId, unit: usize) {
        self.unit_of.insert(v, unit);
        if let Some(rows) = self.waiting.remove(&v) {
            for r in rows {
                self.succ[unit].insert(r);
            }
        }
    }

    /// Puts `v` in kernel `g`, after the kernels producing what it reads
    /// (`producers`), noting which of `reads` are other kernels' members.
    fn admit(&mut self, v: ValueId, g: usize, producers: &BTreeSet<usize>, reads: &BTreeSet<ValueId>) {
        self.assign(v, g);
        self.link(producers, g);
        self.note_reads(reads, g);
    }

    /// How many of a kernel's `members` it must store for other kernels or
    /// as graph outputs (each a binding).
    fn stored_for_others(&self, members: &[ValueId]) -> usize {
        members.iter().filter(|m| self.outputs[**m] || self.external.contains(m)).count()
    }

    /// Whether `v` may share a kernel with `members` (see `feeds_rows`).
    fn mixes_rows(&self, v: ValueId, members: &[ValueId]) -> bool {
        (self.after_rows[v] && members.iter().any(|&m| self.feeds_rows[m]))
            || (self.feeds_rows[v] && members.iter().any(|&m| self.after_rows[m]))
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
        probe_in(self.values, self.inline, value, members, arg)
    }

    /// Whether `check` holds at the twin size too (true without a twin).
    fn at_twin(&self, check: impl FnOnce(&[Value]) -> bool) -> bool {
        self.twin.is_none_or(check)
    }

    fn place_elementwise(&mut self, v: ValueId) -> Result<(), Blocked> {
        let alone = self.probe(v, &[], None)?;
        if let Some(t) = self.twin {
            // What must be stored at the twin size is stored at this one too.
            probe_in(t, self.inline, v, &[], None)?;
        }
        self.too_wide(&alone, 1)?;
        let reads = alone.read_values();
        let shape = &self.values[v].meta.shape;

        // A matmul read once, element for element, takes v as its epilogue.
        for &r in reads.iter().filter(|_| self.epilogues) {
            let Some(&unit) = self.unit_of.get(&r) else { continue };
            let Unit::Matmul { value, epilogue: None, ref side } = self.units[unit] else { continue };
            if !side.is_empty() {
                continue;
            }
            let rv = &self.values[r];
            let direct_in = |e: &Emitter<'_>, values: &[Value]| {
                !e.gathers(r) && e.reads.iter().filter(|u| u.value == r).all(|u| u.is_identity(&values[r].meta))
            };
            let direct = direct_in(&alone, self.values)
                && self.at_twin(|t| {
                    probe_in(t, self.inline, v, &[], None).is_ok_and(|e| direct_in(&e, t))
                        && probe_in(t, self.inline, v, &[], Some(r)).is_ok()
                });
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
            if width > self.budget || others.iter().any(|&p| self.reaches(unit, p)) || self.mixes_rows(v, &[r]) {
                continue;
            }
            self.units[unit] = Unit::Matmul { value: r, epilogue: Some(v), side: Vec::new() };
            self.admit(v, unit, &others, &e_reads);
            return Ok(());
        }

        // Join the most recent compatible elementwise kernel, if any.
        let candidates: Vec<usize> = (0..self.units.len()).rev().take(16).collect();
        for g in candidates {
            if self.join_reduction(v, g)? || self.join_matmul(v, g)? {
                return Ok(());
            }
            let Unit::Elementwise { members } = &self.units[g] else { continue };
            if &self.values[members[0]].meta.shape != shape {
                continue;
            }
            let members = members.clone();
            let reads_members = |j: &Emitter<'_>| j.reads.iter().any(|u| members.contains(&u.value));
            let mut all = members.clone();
            all.push(v);
            let generic = self.at_twin(|t| {
                let mut group = Emitter::new(t, self.inline);
                t[members[0]].meta.shape == t[v].meta.shape
                    && probe_in(t, self.inline, v, &members, None).is_ok_and(|j| !reads_members(&j))
                    && group_emit(&mut group, &all).is_ok()
            });
            if !generic || self.mixes_rows(v, &members) {
                continue;
            }
            let joint = self.probe(v, &members, None)?;
            // A member read other than element for element needs the member finished: another kernel.
            if reads_members(&joint) {
                continue;
            }
            let joint_reads = joint.read_values();
            drop(joint);
            let producers = self.producers(&joint_reads, Some(g));
            if producers.iter().any(|&p| self.reaches(g, p)) {
                continue;
            }
            let mut group = Emitter::new(self.values, self.inline);
            // Stores: members already read elsewhere or outputs, and v.
            let stores = 1 + self.stored_for_others(&members);
            if group_emit(&mut group, &all).is_err() || group.reads.len() + stores > self.budget {
                continue;
            }
            if let Unit::Elementwise { members } = &mut self.units[g] {
                members.push(v);
            }
            self.admit(v, g, &producers, &joint_reads);
            return Ok(());
        }
        let unit = self.new_unit(Unit::Elementwise { members: vec![v] }, &[v]);
        let producers = self.producers(&reads, Some(unit));
        self.link(&producers, unit);
        self.note_reads(&reads, unit);
        Ok(())
    }
}

impl Planner<'_> {
    /// Turns the most recent elementwise kernel that the reduction `r`
    /// walks element for element into `r`'s kernel: the kernel's values
    /// become the reduction's registers (stored where read elsewhere), so
    /// a loss is summed as its terms are computed, not read back.
    fn absorb_elementwise(&mut self, r: ValueId) -> Result<bool, Blocked> {
        if !self.reduce_stores {
            return Ok(false);
        }
        let IrOp::Reduce { src, axes, .. } = &self.values[r].op else { return Ok(false) };
        let (it, _, _) = reduce_iteration(src, axes);
        let candidates: Vec<usize> = (0..self.units.len()).rev().take(16).collect();
        for g in candidates {
            let Unit::Elementwise { members } = &self.units[g] else { continue };
            if !it.layout.is_identity_of(&self.values[members[0]].meta.shape) || self.mixes_rows(r, members) {
                continue;
            }
            let members = members.clone();
            let generic = self.at_twin(|t| {
                let IrOp::Reduce { src, axes, .. } = &t[r].op else { return false };
                let (it, _, _) = reduce_iteration(src, axes);
                let mut e = Emitter::new(t, self.inline);
                it.layout.is_identity_of(&t[members[0]].meta.shape)
                    && group_emit(&mut e, &members).is_ok()
                    && e.emit(&it).is_ok()
                    && !e.reads.iter().any(|u| members.contains(&u.value))
            });
            let mut e = Emitter::new(self.values, self.inline);
            if !generic || group_emit(&mut e, &members).is_err() {
                continue;
            }
            let own = {
                let mut alone = Emitter::new(self.values, self.inline);
                for (i, &m) in members.iter().enumerate() {
                    alone.members.insert(m, usize::MAX - i);
                }
                alone.emit(&it)
            };
            let Ok(_) = own else { continue };
            if e.emit(&it).is_err() {
                continue;
            }
            // Members read other than element for element need them stored first.
            if e.reads.iter().any(|u| members.contains(&u.value)) {
                continue;
            }
            let reads = e.read_values();
            let stores = 1 + self.stored_for_others(&members);
            if reads.len() + stores > self.budget {
                continue;
            }
            drop(e);
            let producers = self.producers(&reads, Some(g));
            if producers.iter().any(|&p| self.reaches(g, p)) {
                continue;
            }
            self.units[g] = Unit::Reduce { value: r, siblings: Vec::new(), stores: members };
            self.admit(r, g, &producers, &reads);
            return Ok(true);
        }
        Ok(false)
    }

    /// Joins the sum `r` to a recent reduction unit over the same iteration
    /// (same [a, k] walk, one pass, float sums, no side stores) as a
    /// sibling: both fold in one kernel, sharing its loads and the values
    /// their prologues recompute (the column sums of an affine layer's
    /// weight and bias gradients).
    fn join_sibling(&mut self, r: ValueId) -> Result<bool, Blocked> {
        if !self.reduce_stores {
            return Ok(false);
        }
        let IrOp::Reduce { kind: ReduceKind::Sum, src, axes } = &self.values[r].op else { return Ok(false) };
        let dtype = self.values[r].meta.dtype;
        if !dtype.is_float() {
            return Ok(false);
        }
        let (it, a, k) = reduce_iteration(src, axes);
        let candidates: Vec<usize> = (0..self.units.len()).rev().take(16).collect();
        for g in candidates {
            let Unit::Reduce { value: r0, siblings, stores } = &self.units[g] else { continue };
            let (r0, siblings) = (*r0, siblings.clone());
            if !stores.is_empty() || siblings.len() >= 3 || self.values[r0].meta.dtype != dtype {
                continue;
            }
            let IrOp::Reduce { kind: ReduceKind::Sum, src: src0, axes: axes0 } = &self.values[r0].op else { continue };
            let (it0, a0, k0) = reduce_iteration(src0, axes0);
            let generic = self.at_twin(|t| {
                let (IrOp::Reduce { src, axes, .. }, IrOp::Reduce { src: src0, axes: axes0, .. }) =
                    (&t[r].op, &t[r0].op)
                else {
                    return false;
                };
                let ((it, a, k), (it0, a0, k0)) = (reduce_iteration(src, axes), reduce_iteration(src0, axes0));
                (a0, k0) == (a, k) && it0.layout.shape == it.layout.shape
            });
            if !generic || (a0, k0) != (a, k) || it0.layout.shape != it.layout.shape {
                continue;
            }
            let mut group: Vec<ValueId> = vec![r0];
            group.extend(&siblings);
            if self.mixes_rows(r, &group) {
                continue;
            }
            let mut e = Emitter::new(self.values, self.inline);
            e.emit(&it0)?;
            for &s in &siblings {
                let IrOp::Reduce { src, axes, .. } = &self.values[s].op else { continue };
                e.emit(&reduce_iteration(src, axes).0)?;
            }
            e.emit(&it)?;
            let reads = e.read_values();
            if reads.iter().any(|v| group.contains(v)) || reads.len() + group.len() + 1 > self.budget {
                continue;
            }
            let one_pass = |e: &Emitter<'_>, a: usize, k: usize| crate::exec::reduce_chunks(a, k, &e.kernel) == 1;
            let generic = self.at_twin(|t| {
                let mut te = Emitter::new(t, self.inline);
                let mut ok = true;
                for &m in group.iter().chain([&r]) {
                    let IrOp::Reduce { src, axes, .. } = &t[m].op else { return false };
                    ok &= te.emit(&reduce_iteration(src, axes).0).is_ok();
                }
                let IrOp::Reduce { src, axes, .. } = &t[r].op else { return false };
                let (_, ta, tk) = reduce_iteration(src, axes);
                ok && !te.read_values().iter().any(|v| group.contains(v)) && one_pass(&te, ta, tk)
            });
            if !generic || !one_pass(&e, a, k) {
                continue;
            }
            drop(e);
            let producers = self.producers(&reads, Some(g));
            if producers.iter().any(|&p| self.reaches(g, p)) {
                continue;
            }
            if let Unit::Reduce { siblings, .. } = &mut self.units[g] {
                siblings.push(r);
            }
            self.admit(r, g, &producers, &reads);
            return Ok(true);
        }
        Ok(false)
    }

    /// Joins `v` to matmul unit `g` as another output of its epilogue, when
    /// `v` has the product's shape and dtype and reads the product (or its
    /// epilogue's values) only element for element: `relu(x @ w + b)` beside
    /// `x @ w + b`, `p - lr * g` beside the gradient `g` it is computed from.
    fn join_matmul(&mut self, v: ValueId, g: usize) -> Result<bool, Blocked> {
        if !self.epilogues {
            return Ok(false);
        }
        let Unit::Matmul { value: r, epilogue, side } = &self.units[g] else { return Ok(false) };
        let (r, epilogue, side) = (*r, *epilogue, side.clone());
        let (rv, vv) = (&self.values[r].meta, &self.values[v].meta);
        if rv.shape != vv.shape || rv.dtype != vv.dtype || !self.at_twin(|t| t[r].meta.shape == t[v].meta.shape) {
            return Ok(false);
        }
        let members: Vec<ValueId> = epilogue.into_iter().chain(side.iter().copied()).collect();
        let mut all = members.clone();
        all.push(r);
        if self.mixes_rows(v, &all) {
            return Ok(false);
        }
        let reads_members = |j: &Emitter<'_>| j.reads.iter().any(|u| all.contains(&u.value)) || j.gathers(r);
        let joint = self.probe(v, &members, Some(r))?;
        let joint_reads = joint.read_values();
        let blocked = reads_members(&joint);
        drop(joint);
        if blocked
            || !self.at_twin(|t| probe_in(t, self.inline, v, &members, Some(r)).is_ok_and(|j| !reads_members(&j)))
        {
            return Ok(false);
        }
        let producers = self.producers(&joint_reads, Some(g));
        if producers.iter().any(|&p| self.reaches(g, p)) {
            return Ok(false);
        }
        // Bindings: the epilogue's reads, a, b, the product, v, and members
        // stored for others.
        let mut e = Emitter::new(self.values, self.inline);
        e.arg = Some(r);
        for (i, &m) in side.iter().enumerate() {
            e.members.insert(m, usize::MAX - i);
        }
        if let Some(ep) = epilogue {
            e.root(ep)?;
        }
        let kept = self.stored_for_others(&side);
        let mut reads = e.read_values();
        reads.extend(joint_reads.iter().copied());
        drop(e);
        if reads.len() + 4 + kept > self.budget {
            return Ok(false);
        }
        if let Unit::Matmul { side, .. } = &mut self.units[g] {
            side.push(v);
        }
        self.admit(v, g, &producers, &joint_reads);
        Ok(true)
    }

    /// Joins `v` to reduction unit `g` as a value stored as the reduction
    /// reads each element (a loss summed while its gradient is stored),
    /// when the reduction walks `v`'s shape element for element, `v` reads
    /// neither the reduction nor what follows it, and the kernel stays
    /// within the binding budget.
    fn join_reduction(&mut self, v: ValueId, g: usize) -> Result<bool, Blocked> {
        if !self.reduce_stores {
            return Ok(false);
        }
        // (Not beside sibling sums: they must stay one pass.)
        let Unit::Reduce { value: r, stores, siblings } = &self.units[g] else { return Ok(false) };
        if !siblings.is_empty() {
            return Ok(false);
        }
        let (r, stores) = (*r, stores.clone());
        let IrOp::Reduce { src, axes, .. } = &self.values[r].op else { return Ok(false) };
        let (it, _, _) = reduce_iteration(src, axes);
        let mut members = stores.clone();
        members.push(r);
        let mut all = stores.clone();
        all.push(v);
        let generic = self.at_twin(|t| {
            let IrOp::Reduce { src, axes, .. } = &t[r].op else { return false };
            let (it, _, _) = reduce_iteration(src, axes);
            let mut e = Emitter::new(t, self.inline);
            it.layout.is_identity_of(&t[v].meta.shape)
                && probe_in(t, self.inline, v, &stores, None)
                    .is_ok_and(|j| !j.reads.iter().any(|u| members.contains(&u.value)))
                && group_emit(&mut e, &all).is_ok()
                && e.emit(&it).is_ok()
                && !e.reads.iter().any(|u| u.value == r)
        });
        if !generic || !it.layout.is_identity_of(&self.values[v].meta.shape) {
            return Ok(false);
        }
        if self.mixes_rows(v, &members) {
            return Ok(false);
        }
        let joint = self.probe(v, &stores, None)?;
        let joint_reads = joint.read_values();
        let reads_members = joint.reads.iter().any(|u| members.contains(&u.value));
        drop(joint);
        let producers = self.producers(&joint_reads, Some(g));
        if reads_members || producers.iter().any(|&p| self.reaches(g, p)) {
            return Ok(false);
        }
        let mut e = Emitter::new(self.values, self.inline);
        if group_emit(&mut e, &all).is_err() || e.emit(&it).is_err() {
            return Ok(false);
        }
        // Bindings: its reads, its result, v and the members stored for others.
        let kept = self.stored_for_others(&stores);
        let width = e.read_values().len() + 2 + kept;
        if width > self.budget || e.reads.iter().any(|u| u.value == r) {
            return Ok(false);
        }
        drop(e);
        if let Unit::Reduce { stores, .. } = &mut self.units[g] {
            stores.push(v);
        }
        self.admit(v, g, &producers, &joint_reads);
        Ok(true)
    }
}

/// Dry run of the stored elementwise value `value` in `values`, beside
/// `members` (and as the epilogue of `arg`): its buffer reads.
fn probe_in<'a>(
    values: &'a [Value],
    inline: &'a [bool],
    value: ValueId,
    members: &[ValueId],
    arg: Option<ValueId>,
) -> Result<Emitter<'a>, Blocked> {
    let mut e = Emitter::new(values, inline);
    for (i, &m) in members.iter().enumerate() {
        e.members.insert(m, usize::MAX - i);
    }
    e.arg = arg;
    e.root(value)?;
    Ok(e)
}

/// The iteration view and sizes of a reduction of `src` over `axes`.
pub(crate) fn reduce_iteration(src: &Use, axes: &[usize]) -> (Use, usize, usize) {
    let (layout, a, k) = crate::exec::reduce_view(&src.layout, axes);
    (Use { value: src.value, layout }, a, k)
}

/// Who reads each value.
fn readers_of(g: &CapturedGraph) -> Vec<Vec<ValueId>> {
    let mut readers: Vec<Vec<ValueId>> = vec![Vec::new(); g.values.len()];
    for (id, v) in g.values.iter().enumerate() {
        for u in v.op.uses() {
            readers[u.value].push(id);
        }
    }
    readers
}

/// Which values are inlined into their one reader to start with; a
/// constant (an elementwise value that reads nothing, such as the `full 1`
/// seed of a backward) into every reader, since recomputing it is free and
/// storing it is a kernel. An element-varying member of a row group is
/// recomputed by every reader outside its row kernel (rematerialized: a
/// few operations on what that reader reads anyway, against a store and a
/// load of the whole tensor).
fn initial_inline(g: &CapturedGraph, uses: &[usize], outputs: &[bool], rows: &[RowGroup], remat: bool) -> Vec<bool> {
    let readers = readers_of(g);
    let fusable_reader = |r: &ValueId| matches!(g.values[*r].op, IrOp::Map { .. } | IrOp::Reduce { .. });
    let mut inline: Vec<bool> = g
        .values
        .iter()
        .enumerate()
        .map(|(id, v)| {
            let IrOp::Map { kernel, .. } = &v.op else { return false };
            let constant = kernel.inputs.is_empty() && !kernel.positional();
            (uses[id] == 1 || constant) && !outputs[id] && readers[id].iter().all(fusable_reader)
        })
        .collect();
    for group in rows {
        // Cost of recomputing each member outside: its ops and those of the
        // members it would recompute in turn (stored ones are loads).
        let mut cost = vec![0usize; g.values.len()];
        for &(m, role) in &group.members {
            let IrOp::Map { kernel, args, .. } = &g.values[m].op else { continue };
            let own: usize = kernel.nodes.iter().map(|(n, _)| op_cost(n)).sum();
            let nested: usize =
                args.iter().filter(|u| group.role(u.value).is_some() && inline[u.value]).map(|u| cost[u.value]).sum();
            cost[m] = own + nested;
            if remat && role == RowRole::Varying && !outputs[m] && readers[m].iter().all(fusable_reader) {
                inline[m] = cost[m] <= REMAT_COST;
            }
        }
    }
    inline
}

/// The most a row group's element-varying value may cost to be recomputed
/// by a reader outside the row kernel rather than stored by it (in
/// [`op_cost`] units): the centring and scaling of layer_norm, a product
/// with a stored gradient; not a whole softmax backward.
const REMAT_COST: usize = 8;

/// What evaluating a node costs, roughly: a transcendental unary op four
/// adds, other arithmetic one, reads and constants nothing.
fn op_cost(node: &Node) -> usize {
    use crate::ops::unary::UnaryOp;
    match node {
        Node::Input(_) | Node::Scalar(_) | Node::Index | Node::Arg => 0,
        Node::Unary(UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu, _) => 1,
        Node::Unary(..) | Node::Random(..) | Node::RandomAt(..) | Node::SegmentSum { .. } => 4,
        Node::RowReduce(..) | Node::CheckedRowSum { .. } => 4,
        Node::Binary(..) | Node::Compare(..) | Node::Select(..) | Node::Cast(_) | Node::Gather(..) => 1,
    }
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

/// Which optional fusion passes run (all by default; each can be turned
/// off to compare, and the differential tests run with each off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Passes {
    /// Row kernels: softmax, log_softmax, layer_norm, rms_norm and
    /// cross-entropy rows (forward and backward) as one kernel, their
    /// element-wise values recomputed by readers outside it.
    pub rows: bool,
    /// The fewest rows a row kernel is made for. A heuristic: with fewer
    /// rows than invocations a CPU adapter runs at once, the reduction
    /// template (which splits long rows) is faster. Tests set 1, to put
    /// small shapes through row kernels too.
    pub min_rows: usize,
    /// Rematerialization: an element-varying value of a row kernel that a
    /// kernel outside reads is recomputed there when cheap, not stored.
    pub remat: bool,
    /// A reduction stores the elementwise values of the shape it walks as
    /// it reads them (a loss and its gradients in one kernel).
    pub reduce_stores: bool,
    /// A matmul's epilogue computes the elementwise values of its shape that
    /// read it element for element: the bias add, and, stored beside it, a
    /// forward activation or an optimizer update of the gradient it
    /// computes. Off for the direct matmul template (CPU adapters), whose
    /// epilogue pass costs more there than separate kernels do.
    pub epilogues: bool,
    /// A row sum that reads earlier row sums only as per-row factors is
    /// distributed over them, so it joins an earlier loop over the row
    /// (see `compiler::row_sums`).
    pub row_sums: bool,
}

impl Default for Passes {
    fn default() -> Passes {
        Passes {
            rows: true,
            min_rows: crate::compiler::rows::MIN_ROWS,
            remat: true,
            reduce_stores: true,
            epilogues: true,
            row_sums: true,
        }
    }
}

impl Passes {
    /// The default passes changed by `WGRAD_PASSES`, a list: a pass named
    /// with a minus is off (`-rows`, `-remat`, `-reduce-stores`, `-epilogues`,
    /// `-row-sums`),
    /// `min-rows=N` sets [`Passes::min_rows`].
    pub fn from_env() -> Passes {
        let mut p = Passes::default();
        if let Ok(spec) = std::env::var("WGRAD_PASSES") {
            for item in spec.split(',').map(str::trim) {
                match item.split_once('=') {
                    Some(("min-rows", n)) => p.min_rows = n.parse().unwrap_or(p.min_rows),
                    _ if item == "-rows" => p.rows = false,
                    _ if item == "-remat" => p.remat = false,
                    _ if item == "-reduce-stores" => p.reduce_stores = false,
                    _ if item == "-epilogues" => p.epilogues = false,
                    _ if item == "-row-sums" => p.row_sums = false,
                    _ => {}
                }
            }
        }
        p
    }
}

/// The kernels of `g` in execution order, and how many IR values were
/// fused into another value's kernel.
/// With `twin` (the same graph at another batch size), a fusion that
/// depends on sizes is made only where it holds at both sizes.
pub(crate) fn schedule(
    g: &CapturedGraph,
    twin: Option<&CapturedGraph>,
    limits: BindingLimits,
    passes: Passes,
) -> (Vec<Step>, usize) {
    let max_bindings = limits.operands;
    let uses = g.use_counts();
    let mut outputs = vec![false; g.values.len()];
    for (v, _) in &g.outputs {
        outputs[*v] = true;
    }
    let mut rows = if passes.rows { crate::compiler::rows::row_groups(g, passes.min_rows) } else { Vec::new() };
    if let Some(t) = twin {
        // Row kernels the twin size makes too.
        let at_twin = crate::compiler::rows::row_groups(t, passes.min_rows);
        rows.retain(|r| at_twin.iter().any(|t| t.members == r.members));
    }
    let twin = twin.map(|t| t.values.as_slice());
    let mut stored: Vec<ValueId> = Vec::new();
    let mut store_all = false;
    let mut budget = max_bindings;
    loop {
        let mut inline = initial_inline(g, &uses, &outputs, &rows, passes.remat);
        for &v in &stored {
            inline[v] = false;
        }
        if store_all {
            inline.iter_mut().for_each(|i| *i = false);
        }
        match try_schedule(g, twin, &inline, &uses, &outputs, &rows, passes, max_bindings, budget) {
            Ok(steps) if budget > 2 && steps.iter().any(|s| too_wide(g, s, limits)) => budget -= 2,
            Ok(steps) => {
                let computed =
                    g.values.iter().filter(|v| !matches!(v.op, IrOp::Input { .. } | IrOp::Hook { .. })).count();
                let kernels = steps.iter().filter(|s| !matches!(s, Step::Hook { .. })).count();
                return (steps, computed.saturating_sub(kernels));
            }
            Err(Retry::Rows(group)) if group < rows.len() => {
                rows.remove(group);
            }
            Err(Retry::Rows(_)) => store_all = true,
            // Each retry stores one more value; should a value already stored
            // block again, inline nothing (always schedulable).
            Err(Retry::Store(v)) if inline[v] => stored.push(v),
            Err(Retry::Store(_)) => store_all = true,
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
        Step::Rows { reads, stores, .. } => reads.iter().map(|u| u.value).chain(stores.iter().map(|s| s.0)).collect(),
        Step::Reduce { value, reads, siblings, stores, .. } => reads
            .iter()
            .map(|u| u.value)
            .chain([*value])
            .chain(siblings.iter().copied())
            .chain(stores.iter().copied())
            .collect(),
        Step::Matmul { value, stores, a, b, reads, .. } => {
            reads.iter().map(|u| u.value).chain([*value, a.value, b.value]).chain(stores.iter().copied()).collect()
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

/// Per value: whether it depends on a member of a row group without being
/// one, and whether a row group reads it (or something computed from it)
/// without it being a member.
fn row_sides(g: &CapturedGraph, group_of: &[Option<usize>]) -> (Vec<bool>, Vec<bool>) {
    let n = g.values.len();
    let mut after = vec![false; n];
    for (id, v) in g.values.iter().enumerate() {
        after[id] = group_of[id].is_none() && v.op.uses().iter().any(|u| group_of[u.value].is_some() || after[u.value]);
    }
    let mut feeds = vec![false; n];
    for id in (0..n).rev() {
        let reader_wants = group_of[id].is_some() || feeds[id];
        if reader_wants {
            for u in g.values[id].op.uses() {
                if group_of[u.value].is_none() {
                    feeds[u.value] = true;
                }
            }
        }
    }
    (after, feeds)
}

/// The members of a row group that its kernel stores: graph outputs, and
/// those a kernel outside it reads from a buffer: read by one that cannot
/// recompute them, or needed to recompute a member it inlines (the row
/// reductions under a recomputed softmax). Unread ones are dropped once
/// every kernel is known.
fn row_stores(g: &CapturedGraph, group: &RowGroup, inline: &[bool], outputs: &[bool]) -> Vec<ValueId> {
    let readers = readers_of(g);
    let inside = |v: ValueId| group.role(v).is_some();
    let recomputed = |m: ValueId| inline[m] && matches!(g.values[m].op, IrOp::Map { .. });
    let mut store = vec![false; g.values.len()];
    let mut seen = vec![false; g.values.len()];
    // Members read from outside, then what recomputing them reads.
    let mut work: Vec<ValueId> = Vec::new();
    for &(m, _) in &group.members {
        if outputs[m] {
            store[m] = true;
        }
        for &r in &readers[m] {
            if !inside(r) {
                let fusable = matches!(g.values[r].op, IrOp::Map { .. } | IrOp::Reduce { .. });
                if fusable && recomputed(m) {
                    work.push(m);
                } else {
                    store[m] = true;
                }
            }
        }
    }
    while let Some(m) = work.pop() {
        if std::mem::replace(&mut seen[m], true) {
            continue;
        }
        for u in g.values[m].op.uses() {
            if !inside(u.value) {
                continue;
            }
            if recomputed(u.value) {
                work.push(u.value);
            } else {
                store[u.value] = true;
            }
        }
    }
    group.members.iter().map(|&(m, _)| m).filter(|&m| store[m]).collect()
}

#[allow(clippy::too_many_arguments)]
fn try_schedule(
    g: &CapturedGraph,
    twin: Option<&[Value]>,
    inline: &[bool],
    uses: &[usize],
    outputs: &[bool],
    rows: &[RowGroup],
    passes: Passes,
    max_bindings: usize,
    budget: usize,
) -> Result<Vec<Step>, Retry> {
    let mut group_of = vec![None; g.values.len()];
    for (i, group) in rows.iter().enumerate() {
        for &(m, _) in &group.members {
            group_of[m] = Some(i);
        }
    }
    let (after_rows, feeds_rows) = row_sides(g, &group_of);
    let mut p = Planner {
        values: &g.values,
        twin,
        inline,
        uses,
        outputs,
        units: Vec::new(),
        unit_of: HashMap::new(),
        succ: Vec::new(),
        max_bindings,
        budget,
        external: Default::default(),
        group_of,
        after_rows,
        feeds_rows,
        waiting: HashMap::new(),
        reduce_stores: passes.reduce_stores,
        epilogues: passes.epilogues,
    };
    let mut last_hook: Option<usize> = None;
    let mut row_unit: Vec<Option<usize>> = vec![None; rows.len()];
    for (id, v) in g.values.iter().enumerate() {
        if let Some(gi) = p.group_of[id] {
            if row_unit[gi].is_none() {
                // The whole group becomes one unit at its first member; what
                // it reads from kernels not placed yet links when they are.
                let stores = row_stores(g, &rows[gi], inline, outputs);
                let step = build_rows(g, inline, &rows[gi], gi, &stores, budget)?;
                let members: Vec<ValueId> = rows[gi].members.iter().map(|m| m.0).collect();
                let unit = p.new_unit(Unit::Rows { group: gi, stores }, &members);
                row_unit[gi] = Some(unit);
                let reads: BTreeSet<ValueId> = step.reads().iter().map(|u| u.value).collect();
                for &r in &reads {
                    match p.unit_of.get(&r) {
                        Some(&producer) if producer != unit => {
                            p.succ[producer].insert(unit);
                        }
                        Some(_) => {}
                        None if matches!(g.values[r].op, IrOp::Input { .. }) => {}
                        None => p.waiting.entry(r).or_default().push(unit),
                    }
                }
                p.note_reads(&reads, unit);
            }
            continue;
        }
        match &v.op {
            IrOp::Input { .. } => {}
            IrOp::Map { .. } if inline[id] => {}
            IrOp::Map { .. } => p.place_elementwise(id)?,
            IrOp::Reduce { src, axes, .. } => {
                let (it, _, _) = reduce_iteration(src, axes);
                let mut e = Emitter::new(&g.values, inline);
                e.emit(&it)?;
                p.too_wide(&e, 1)?;
                drop(e);
                if p.absorb_elementwise(id)? || p.join_sibling(id)? {
                    continue;
                }
                let mut e = Emitter::new(&g.values, inline);
                e.emit(&it)?;
                let unit = p.new_unit(Unit::Reduce { value: id, siblings: Vec::new(), stores: Vec::new() }, &[id]);
                let producers = p.producers(&e.read_values(), Some(unit));
                p.link(&producers, unit);
                p.note_reads(&e.read_values(), unit);
            }
            IrOp::Matmul { a, b } => {
                let unit = p.new_unit(Unit::Matmul { value: id, epilogue: None, side: Vec::new() }, &[id]);
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
        steps.push(build_step(g, inline, rows, budget, &p.units[u])?);
        for &t in &p.succ[u] {
            indegree[t] -= 1;
            if indegree[t] == 0 {
                ready.push(std::cmp::Reverse(t));
            }
        }
    }
    // A cycle through a row kernel (kernels merged around it) leaves units
    // unscheduled: that group's values are scheduled as usual instead.
    if steps.len() != n {
        let stuck = (0..n).find_map(|u| match &p.units[u] {
            Unit::Rows { group, .. } if indegree[u] > 0 => Some(*group),
            _ => None,
        });
        debug_assert!(stuck.is_some(), "only row kernels can close a cycle");
        return Err(Retry::Rows(stuck.unwrap_or(usize::MAX)));
    }
    drop_unread_stores(&mut steps, outputs);
    check_every_read_stored(g, &steps, rows)?;
    Ok(steps)
}

/// Every value a kernel reads from a buffer is an input or stored by an
/// earlier kernel (a row kernel's stores are chosen before the kernels
/// reading them are; a read it did not foresee sends that group back).
fn check_every_read_stored(g: &CapturedGraph, steps: &[Step], rows: &[RowGroup]) -> Result<(), Retry> {
    let mut stored = vec![false; g.values.len()];
    for step in steps {
        for u in step.reads() {
            let ok = stored[u.value] || matches!(g.values[u.value].op, IrOp::Input { .. });
            if !ok {
                let group = rows.iter().position(|r| r.role(u.value).is_some());
                return Err(match group {
                    Some(gi) => Retry::Rows(gi),
                    None => Retry::Store(u.value),
                });
            }
        }
        for v in step.stores() {
            stored[v] = true;
        }
    }
    Ok(())
}

/// A kernel member read only inside its own kernel (as a register) and
/// not a graph output needs no store.
fn drop_unread_stores(steps: &mut [Step], outputs: &[bool]) {
    let read: std::collections::HashSet<ValueId> = steps.iter().flat_map(|s| s.reads()).map(|u| u.value).collect();
    for step in steps {
        match step {
            Step::Elementwise { kernel, stores, .. } => {
                let keep: Vec<bool> = stores.iter().map(|&v| outputs[v] || read.contains(&v)).collect();
                let kept = |i: &usize| keep[*i];
                kernel.outputs = (0..keep.len()).filter(kept).map(|i| kernel.outputs[i]).collect();
                *stores = (0..keep.len()).filter(kept).map(|i| stores[i]).collect();
            }
            Step::Reduce { kernel, siblings, stores, .. } => {
                // Outputs 0..=siblings are the reductions' own.
                let own = 1 + siblings.len();
                drop_unread_side(kernel, stores, own, outputs, &read);
            }
            Step::Matmul { epilogue, stores, .. } => drop_unread_side(epilogue, stores, 1, outputs, &read),
            Step::Rows { kernel, stores, .. } => {
                let keep: Vec<bool> = stores.iter().map(|&(v, _)| outputs[v] || read.contains(&v)).collect();
                let kept = |i: &usize| keep[*i];
                kernel.outputs = (0..keep.len()).filter(kept).map(|i| kernel.outputs[i]).collect();
                *stores = (0..keep.len()).filter(kept).map(|i| stores[i]).collect();
            }
            _ => {}
        }
    }
}

/// Drops the side outputs (after the first `own`) nothing reads.
fn drop_unread_side(
    kernel: &mut MapKernel,
    stores: &mut Vec<ValueId>,
    own: usize,
    outputs: &[bool],
    read: &std::collections::HashSet<ValueId>,
) {
    let keep: Vec<bool> = stores.iter().map(|&v| outputs[v] || read.contains(&v)).collect();
    let kept = |i: &usize| keep[*i];
    let side: Vec<_> = (0..keep.len()).filter(kept).map(|i| kernel.outputs[i + own]).collect();
    kernel.outputs.truncate(own);
    kernel.outputs.extend(side);
    *stores = (0..keep.len()).filter(kept).map(|i| stores[i]).collect();
}

/// The row kernel of `group`, storing `stores`.
fn build_rows(
    g: &CapturedGraph,
    inline: &[bool],
    group: &RowGroup,
    index: usize,
    stores: &[ValueId],
    budget: usize,
) -> Result<Step, Retry> {
    let mut e = Emitter::new(&g.values, inline);
    e.rows = Some(group);
    let mut stored = Vec::with_capacity(stores.len());
    // A member that cannot be read as its row kernel needs sends the group
    // back; another value is stored instead of inlined, as anywhere.
    let blocked = |b: Blocked| if group.role(b.0).is_some() { Retry::Rows(index) } else { Retry::Store(b.0) };
    for &m in stores {
        let uniform = group.role(m) != Some(RowRole::Varying);
        let layout = if uniform { row_broadcast(&group.shape) } else { stored_layout(&group.shape) };
        let node = e.emit(&Use { value: m, layout }).map_err(blocked)?;
        e.kernel.output(node);
        stored.push((m, uniform));
    }
    // Too many buffers: store an inlined outside value instead, else give
    // the group up.
    if e.read_values().len() + stored.len() > budget {
        return Err(match e.inlined.iter().find(|&&v| group.role(v).is_none()) {
            Some(&v) => Retry::Store(v),
            None => Retry::Rows(index),
        });
    }
    let mut reads = Vec::with_capacity(e.reads.len());
    for (u, (_, access)) in e.reads.iter().zip(&e.kernel.inputs) {
        let layout = match access {
            crate::exec::kernel::Access::Gathered => u.layout.clone(),
            _ => as_rows(&u.layout).ok_or(Retry::Rows(index))?,
        };
        reads.push(Use { value: u.value, layout });
    }
    let (a, k) = group.rows();
    Ok(Step::Rows {
        a,
        k,
        passes: group.passes(),
        kernel: e.kernel,
        reads,
        scalars: e.scalars,
        stores: stored,
        inlined: e.inlined,
    })
}

fn build_step(
    g: &CapturedGraph,
    inline: &[bool],
    rows: &[RowGroup],
    budget: usize,
    unit: &Unit,
) -> Result<Step, Retry> {
    let mut e = Emitter::new(&g.values, inline);
    Ok(match unit {
        Unit::Rows { group, stores } => build_rows(g, inline, &rows[*group], *group, stores, budget)?,
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
        Unit::Matmul { value, epilogue, side } => {
            let IrOp::Matmul { a, b } = &g.values[*value].op else { unreachable!("matmul unit holds a matmul") };
            e.arg = Some(*value);
            let (stored, node) = match epilogue {
                Some(v) => (*v, e.root(*v)?),
                None => (*value, e.kernel.push(Node::Arg, g.values[*value].meta.dtype)),
            };
            e.members.insert(stored, node);
            e.kernel.output(node);
            for n in group_emit(&mut e, side)? {
                e.kernel.output(n);
            }
            Step::Matmul {
                value: stored,
                stores: side.clone(),
                a: a.clone(),
                b: b.clone(),
                epilogue: e.kernel,
                reads: e.reads,
                scalars: e.scalars,
                inlined: e.inlined,
            }
        }
        Unit::Reduce { value, siblings, stores } => {
            let IrOp::Reduce { kind, src, axes } = &g.values[*value].op else {
                unreachable!("a reduce unit holds a reduction")
            };
            let (it, a, k) = reduce_iteration(src, axes);
            let nodes = group_emit(&mut e, stores)?;
            let node = e.emit(&it)?;
            e.kernel.output(node);
            for &sib in siblings {
                let IrOp::Reduce { src, axes, .. } = &g.values[sib].op else { unreachable!("siblings are reductions") };
                let (it, _, _) = reduce_iteration(src, axes);
                let n = e.emit(&it)?;
                e.kernel.output(n);
            }
            for n in nodes {
                e.kernel.output(n);
            }
            let shape = it.layout.shape.clone();
            Step::Reduce {
                value: *value,
                siblings: siblings.clone(),
                stores: stores.clone(),
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
        Unit::Other { value } => match &g.values[*value].op {
            IrOp::Assemble { pieces, zero_fill } => {
                Step::Assemble { value: *value, pieces: pieces.clone(), zero_fill: *zero_fill }
            }
            IrOp::Hook { src, point } => Step::Hook { value: *value, src: src.clone(), point: *point },
            IrOp::Input { .. } | IrOp::Map { .. } | IrOp::Matmul { .. } | IrOp::Reduce { .. } => {
                unreachable!("not an `Other` unit")
            }
        },
    })
}

/// A contiguous view of `shape` at offset 0 (how kernels store values).
pub(crate) fn stored_layout(shape: &Shape) -> Layout {
    Layout::contiguous(shape.clone())
}
