//! Row fusion: which values become one row kernel
//! ([`crate::exec::codegen::render_rows`]), where an invocation owns a row
//! of an [A, K] iteration and runs every reduction over that row (softmax's
//! max and sum, layer_norm's mean and variance, their backward formulas'
//! row sums) and the elementwise work around them, storing only what other
//! kernels read.
//!
//! A group has one iteration shape `S = [.., K]` (A rows: the product of
//! the leading dims). Its members are
//! - *varying* values: elementwise, of shape `S`, read by members element
//!   for element;
//! - *uniform* values: elementwise, one per row (shape `S` without its last
//!   dim, or with it as 1), read by members broadcast along the row;
//! - *row reductions*: reductions of a varying value (or an outside
//!   tensor) over the last dim, read like uniform values.
//!
//! Values join in graph order when every read is one of those forms, or of
//! an outside value that depends on no member of the group (the kernel
//! graph stays acyclic) through a view two words describe per row (a row
//! stride and an element stride). A group needs a row reduction, enough
//! rows to keep invocations busy, and few enough loops of K per row for
//! the [`crate::exec::LOOP_BUDGET`].

use std::collections::BTreeSet;

use crate::compiler::ir::{CapturedGraph, IrOp, Use, ValueId};
use crate::exec::kernel::{Access, Node};
use crate::layout::Layout;
use crate::metadata::Shape;

/// The fewest rows a row kernel runs on: it has one invocation per row, so
/// fewer rows than this leave a CPU adapter's lanes idle (the reduction
/// template splits long rows across invocations instead).
pub(crate) const MIN_ROWS: usize = 32;
/// The longest row a row kernel loops over.
pub(crate) const MAX_ROW: usize = 16_384;

/// How a member takes part in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowRole {
    Varying,
    Uniform,
    Reduction,
}

/// One row kernel to be: its iteration shape and members in graph order.
#[derive(Debug, Clone)]
pub(crate) struct RowGroup {
    pub shape: Shape,
    pub members: Vec<(ValueId, RowRole)>,
}

impl RowGroup {
    /// Rows and the row length.
    pub fn rows(&self) -> (usize, usize) {
        let k = *self.shape.dims().last().unwrap_or(&1);
        (self.shape.numel() / k.max(1), k)
    }

    /// Loops of K per row: one per row reduction, one for the stores.
    pub fn passes(&self) -> usize {
        1 + self.members.iter().filter(|(_, r)| *r == RowRole::Reduction).count()
    }

    pub fn role(&self, v: ValueId) -> Option<RowRole> {
        self.members.iter().find(|(m, _)| *m == v).map(|(_, r)| *r)
    }
}

/// The view over `s` that reads element `a` of a one-per-row value at
/// every element `(a, k)`.
pub(crate) fn row_broadcast(s: &Shape) -> Layout {
    let dims = s.dims();
    let lead = Shape::new(&dims[..dims.len().saturating_sub(1)]);
    let mut strides = lead.contiguous_strides();
    strides.push(0);
    Layout { shape: s.clone(), strides, offset: 0 }
}

/// Whether `layout` (over `s`) reads element `a` at every `(a, k)`.
pub(crate) fn reads_row(layout: &Layout, s: &Shape) -> bool {
    layout.shape == *s && as_rows(layout).is_some_and(|l| l == as_rows(&row_broadcast(s)).expect("rows"))
}

/// `layout` as a two-dimensional [A, K] view (offset, row stride, element
/// stride), when the leading dims step through memory evenly.
pub(crate) fn as_rows(layout: &Layout) -> Option<Layout> {
    let dims = layout.shape.dims();
    let (k, sk) = match dims.len() {
        0 => (1, 0),
        n => (dims[n - 1], if dims[n - 1] == 1 { 0 } else { layout.strides[n - 1] }),
    };
    let lead = dims.len().saturating_sub(1);
    let a: usize = dims[..lead].iter().product();
    // The row stride: that of the innermost leading dim longer than 1; every
    // outer one must step by exactly its inner dims' span.
    let mut sa: Option<usize> = None;
    let mut span = 1;
    for d in (0..lead).rev() {
        if dims[d] == 1 {
            continue;
        }
        match sa {
            None => sa = Some(layout.strides[d]),
            Some(s) if layout.strides[d] != s * span => return None,
            Some(_) => {}
        }
        span *= dims[d];
    }
    Some(Layout { shape: Shape::new([a, k]), strides: vec![sa.unwrap_or(0), sk], offset: layout.offset })
}

/// The rows of `shape` when it is one value per row of `s`.
fn is_per_row(shape: &Shape, s: &Shape) -> bool {
    let dims = s.dims();
    let lead = &dims[..dims.len().saturating_sub(1)];
    let mut with_one = lead.to_vec();
    with_one.push(1);
    shape.dims() == lead || shape.dims() == with_one.as_slice()
}

struct Analysis<'a> {
    g: &'a CapturedGraph,
    parent: Vec<usize>,
    /// Per component (by root): iteration shape, row reductions, and the
    /// components its outside reads depend on.
    shape: Vec<Shape>,
    reductions: Vec<usize>,
    ext_dep: Vec<BTreeSet<usize>>,
    comp: Vec<Option<usize>>,
    role: Vec<Option<RowRole>>,
    /// Components each value depends on (raw ids; canonical via `find`).
    dep: Vec<BTreeSet<usize>>,
}

impl Analysis<'_> {
    fn find(&mut self, mut c: usize) -> usize {
        while self.parent[c] != c {
            self.parent[c] = self.parent[self.parent[c]];
            c = self.parent[c];
        }
        c
    }

    fn canonical(&mut self, set: &BTreeSet<usize>) -> BTreeSet<usize> {
        set.iter().map(|&c| self.find(c)).collect()
    }

    /// The role `v` would have in a group of shape `s`, if any.
    fn role_in(&self, v: ValueId, s: &Shape) -> Option<RowRole> {
        let value = &self.g.values[v];
        match &value.op {
            IrOp::Map { kernel, .. } => {
                if kernel.nodes.iter().any(|(n, _)| matches!(n, Node::SegmentSum { .. })) {
                    return None;
                }
                if value.meta.shape == *s {
                    Some(RowRole::Varying)
                } else if is_per_row(&value.meta.shape, s) && !kernel.positional() {
                    Some(RowRole::Uniform)
                } else {
                    None
                }
            }
            IrOp::Reduce { src, axes, .. } => {
                let rank = src.layout.shape.rank();
                (rank >= 1 && *axes == [rank - 1] && src.layout.shape == *s).then_some(RowRole::Reduction)
            }
            _ => None,
        }
    }

    /// The views `v` reads its operands through, over `s`: each operand
    /// with how the kernel reads it (gathered bindings at computed offsets).
    fn reads_over(&self, v: ValueId, s: &Shape, role: RowRole) -> Vec<(Use, bool)> {
        match &self.g.values[v].op {
            IrOp::Map { kernel, args, .. } => args
                .iter()
                .zip(&kernel.inputs)
                .map(|(u, (_, access))| {
                    let gathered = *access == Access::Gathered;
                    let layout = match role {
                        RowRole::Uniform if !gathered => row_broadcast(s).compose(&u.layout),
                        _ => Some(u.layout.clone()),
                    };
                    // An uncomposable view keeps its own (rejected below).
                    (Use { value: u.value, layout: layout.unwrap_or_else(|| u.layout.clone()) }, gathered)
                })
                .collect(),
            IrOp::Reduce { src, .. } => vec![(src.clone(), false)],
            _ => Vec::new(),
        }
    }

    /// Decides whether `v` joins a group; records its dependencies.
    fn visit(&mut self, v: ValueId, shapes: &[Shape]) {
        let operands: Vec<ValueId> = self.g.values[v].op.uses().iter().map(|u| u.value).collect();
        let mut all_dep = BTreeSet::new();
        for &o in &operands {
            all_dep.extend(self.dep[o].iter().copied());
        }
        let joined = self.try_join(v, shapes);
        if let Some(c) = joined {
            all_dep.insert(c);
        }
        self.dep[v] = all_dep;
    }

    fn try_join(&mut self, v: ValueId, shapes: &[Shape]) -> Option<usize> {
        // The shape: that of the components it reads, else its own.
        let mut member_comps = BTreeSet::new();
        for u in self.g.values[v].op.uses() {
            if let Some(c) = self.comp[u.value] {
                member_comps.insert(self.find(c));
            }
        }
        let s = match member_comps.iter().next() {
            Some(&c) => self.shape[c].clone(),
            None => shapes.iter().find(|s| self.role_in(v, s).is_some())?.clone(),
        };
        if member_comps.iter().any(|&c| self.shape[c] != s) {
            return None;
        }
        let role = self.role_in(v, &s)?;
        let mut outside_dep = BTreeSet::new();
        for (u, gathered) in self.reads_over(v, &s, role) {
            match self.comp[u.value] {
                Some(_) if gathered => return None,
                Some(_) => {
                    let ok = match self.role[u.value]? {
                        RowRole::Varying => u.layout.is_identity_of(&s),
                        RowRole::Uniform | RowRole::Reduction => reads_row(&u.layout, &s),
                    };
                    if !ok {
                        return None;
                    }
                }
                None => {
                    if !gathered && (u.layout.shape != s || as_rows(&u.layout).is_none()) {
                        return None;
                    }
                    outside_dep.extend(self.dep[u.value].iter().copied());
                }
            }
        }
        // No cycle: nothing read from outside depends on a component joined.
        let outside_dep = self.canonical(&outside_dep);
        let mut ext = outside_dep.clone();
        for &c in &member_comps {
            let e = self.ext_dep[c].clone();
            ext.extend(self.canonical(&e));
        }
        if member_comps.iter().any(|c| ext.contains(c)) {
            return None;
        }
        let id = self.parent.len();
        self.parent.push(id);
        self.shape.push(s);
        self.reductions.push(usize::from(role == RowRole::Reduction));
        for &c in &member_comps {
            self.parent[c] = id;
            self.reductions[id] += self.reductions[c];
        }
        self.ext_dep.push(ext);
        self.comp[v] = Some(id);
        self.role[v] = Some(role);
        Some(id)
    }
}

/// The row groups of `g`.
pub(crate) fn row_groups(g: &CapturedGraph, min_rows: usize) -> Vec<RowGroup> {
    let budget = crate::exec::LOOP_BUDGET;
    // Iteration shapes: those of row reductions with enough rows.
    let mut shapes: Vec<Shape> = Vec::new();
    for v in &g.values {
        if let IrOp::Reduce { src, axes, .. } = &v.op {
            let s = &src.layout.shape;
            let k = s.dims().last().copied().unwrap_or(0);
            let rows_ok = s.rank() >= 2 && *axes == [s.rank() - 1] && (2..=MAX_ROW).contains(&k);
            if rows_ok && s.numel() / k >= min_rows.max(1) && !shapes.contains(s) {
                shapes.push(s.clone());
            }
        }
    }
    if shapes.is_empty() {
        return Vec::new();
    }
    let n = g.values.len();
    let mut an = Analysis {
        g,
        parent: Vec::new(),
        shape: Vec::new(),
        reductions: Vec::new(),
        ext_dep: Vec::new(),
        comp: vec![None; n],
        role: vec![None; n],
        dep: vec![BTreeSet::new(); n],
    };
    for v in 0..n {
        an.visit(v, &shapes);
    }
    let mut groups: Vec<(usize, RowGroup)> = Vec::new();
    for v in 0..n {
        let Some(c) = an.comp[v] else { continue };
        let root = an.find(c);
        let role = an.role[v].expect("members have roles");
        match groups.iter_mut().find(|(r, _)| *r == root) {
            Some((_, group)) => group.members.push((v, role)),
            None => groups.push((root, RowGroup { shape: an.shape[root].clone(), members: vec![(v, role)] })),
        }
    }
    groups
        .into_iter()
        .map(|(_, group)| group)
        .filter(|group| {
            let (_, k) = group.rows();
            group.passes() > 1 && group.passes() * k <= budget
        })
        .collect()
}

/// Splits a reduction over the rows' dims and more (a loss summed over a
/// whole [A, K] tensor) into a row reduction, which joins the row kernel,
/// and a reduction of the A row results, when the graph has row reductions
/// of that shape already. The reduction of a long vector is then a short
/// one instead of a second pass over A x K elements.
pub(crate) fn split_reductions(g: CapturedGraph, min_rows: usize) -> (CapturedGraph, usize) {
    let row_shapes: Vec<Shape> = g
        .values
        .iter()
        .filter_map(|v| match &v.op {
            IrOp::Reduce { src, axes, .. }
                if src.layout.shape.rank() >= 2 && *axes == [src.layout.shape.rank() - 1] =>
            {
                Some(src.layout.shape.clone())
            }
            _ => None,
        })
        .filter(|s| {
            let k = s.dims()[s.rank() - 1];
            (2..=MAX_ROW).contains(&k) && s.numel() / k >= min_rows.max(1)
        })
        .collect();
    if row_shapes.is_empty() {
        return (g, 0);
    }
    let mut split = 0;
    let mut new_id = Vec::with_capacity(g.values.len());
    let mut values = Vec::with_capacity(g.values.len());
    for mut v in g.values {
        for u in v.op.uses_mut() {
            u.value = new_id[u.value];
        }
        if let IrOp::Reduce { kind, src, axes } = &v.op {
            let s = &src.layout.shape;
            let last = s.rank().saturating_sub(1);
            if axes.len() >= 2 && axes.contains(&last) && row_shapes.contains(s) {
                let lead = Shape::new(&s.dims()[..last]);
                let meta = crate::metadata::InputMetadata { shape: lead.clone(), ..v.meta.clone() };
                let rows = crate::compiler::ir::Value {
                    op: IrOp::Reduce { kind: *kind, src: src.clone(), axes: vec![last] },
                    meta,
                    phase: v.phase,
                };
                values.push(rows);
                let rest: Vec<usize> = axes.iter().copied().filter(|&a| a != last).collect();
                v.op = IrOp::Reduce {
                    kind: *kind,
                    src: Use { value: values.len() - 1, layout: Layout::contiguous(lead) },
                    axes: rest,
                };
                split += 1;
            }
        }
        new_id.push(values.len());
        values.push(v);
    }
    let outputs = g.outputs.into_iter().map(|(v, r)| (new_id[v], r)).collect();
    (CapturedGraph { values, inputs: g.inputs, outputs }, split)
}
