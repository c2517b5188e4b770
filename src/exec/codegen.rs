//! The one WGSL generator. It renders a [`MapKernel`] with a writer: one
//! `let` per node, sizes and scalars read from a uniform, so one pipeline
//! serves every size and every scalar value.
//!
//! Uniform layout (u32 words, packed in `array<vec4<u32>, N>`):
//! `[0]` element count, `[1]` rank, `[2..10]` output shape, then 9 words per
//! input and per output (offset, 8 strides), then one word per scalar. An
//! offset word is the element offset of the view in its *buffer*: the
//! view's own offset plus where its allocation starts in the arena.

use std::fmt::Write;

use crate::exec::ReduceKind;
use crate::exec::bind::Binds;
use crate::exec::kernel::{Access, MapKernel, Node, RandomKind};
use crate::layout::{Layout, MAX_RANK};
use crate::metadata::DType;

pub(crate) const HEADER_WORDS: usize = 2 + MAX_RANK;
pub(crate) const VIEW_WORDS: usize = 1 + MAX_RANK;
/// Words the reduce template reads after the elementwise words (from `R`):
/// see [`reduce_words`].
pub(crate) const REDUCE_WORDS: usize = 5;
/// Words the matmul templates read after the elementwise words (from `M`):
/// m, n, k, a's offset, batch stride and two strides, b's likewise, and
/// the grid base (x, y, z) of a split launch.
pub(crate) const MATMUL_WORDS: usize = 14;

/// Word index where the view of binding `slot` (inputs first, then outputs) starts.
pub(crate) fn view_base(slot: usize) -> usize {
    HEADER_WORDS + VIEW_WORDS * slot
}

pub(crate) fn param_words(k: &MapKernel) -> usize {
    view_base(k.inputs.len() + k.outputs.len()) + k.scalars.len()
}

/// Shared helpers of generated kernels (kept as WGSL text in one place).
const HELPERS: &str = include_str!("../../shaders/elementwise_helpers.wgsl");
const MATMUL_TEMPLATE: &str = include_str!("../../shaders/matmul.wgsl");
const MATMUL_DIRECT_TEMPLATE: &str = include_str!("../../shaders/matmul_direct.wgsl");

/// Which matmul template: 64x64 tiles staged in workgroup memory (GPUs), or
/// register blocks read straight from memory (CPU adapters such as lavapipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MatmulTemplate {
    Tiled,
    Direct,
}

impl MatmulTemplate {
    /// Rows and columns of C one workgroup computes.
    pub fn tile(self) -> (usize, usize) {
        match self {
            MatmulTemplate::Tiled => (64, 64),
            MatmulTemplate::Direct => (64, 64),
        }
    }
}
mod columns;
pub(crate) use columns::{ColumnRead, render_reduce_columns};

const REDUCE_TEMPLATE: &str = include_str!("../../shaders/reduce.wgsl");

/// How a kernel names its operands' storage: operand `o` (inputs, then
/// outputs, then a matmul's `a` and `b`) lives in binding `b{n}` with
/// `n = binds.slot[o]`, at the element offset its view word carries. A
/// binding is declared `array<vec4<T>>` when a vectorised kernel loads or
/// stores vec4s of one of its operands; the other operands in it are then
/// read per component (`b[e / 4u][e % 4u]`). Never when an operand in it is
/// *stored* per element: a store to one component of a vector may be
/// compiled as a read-modify-write of the whole vector, which would race
/// with the neighbouring invocations' stores. The vec4 operands of such a
/// binding are loaded and stored as four scalars instead.
pub(crate) struct Names<'a> {
    binds: &'a Binds,
    vec4: Vec<bool>,
}

impl<'a> Names<'a> {
    /// Names for `binds`, with the bindings of the operands in
    /// `vec4_operands` as vec4 arrays unless an operand in
    /// `scalar_stores` (stored per element) shares the binding.
    fn new(
        binds: &'a Binds,
        vec4_operands: impl IntoIterator<Item = usize>,
        scalar_stores: impl IntoIterator<Item = usize>,
    ) -> Names<'a> {
        let mut vec4 = vec![false; binds.bindings.len()];
        for o in vec4_operands {
            vec4[binds.slot[o]] = true;
        }
        for o in scalar_stores {
            vec4[binds.slot[o]] = false;
        }
        Names { binds, vec4 }
    }

    /// The storage declarations, bindings 1.. in order.
    fn declare(&self, s: &mut String) {
        for (n, &(dtype, written)) in self.binds.bindings.iter().enumerate() {
            let t = if self.vec4[n] { format!("vec4<{}>", dtype.wgsl()) } else { dtype.wgsl().to_string() };
            let access = if written { "read_write" } else { "read" };
            let _ = writeln!(s, "@group(0) @binding({}) var<storage, {access}> b{n}: array<{t}>;", n + 1);
        }
        // One function per vec4 binding for its per-component reads, so the
        // element index (often a `strided` loop) is computed once, not once
        // for the vector and again for the component.
        for (n, &(dtype, _)) in self.binds.bindings.iter().enumerate().filter(|(n, _)| self.vec4[*n]) {
            let t = dtype.wgsl();
            let _ = writeln!(s, "fn b{n}_at(e: u32) -> {t} {{ return b{n}[e / 4u][e % 4u]; }}");
        }
    }

    /// Element `index` of operand `o`'s buffer: a reference (loaded or
    /// stored) in a scalar binding, a value read per component in a vec4
    /// binding (never stored per element, see [`Names`]).
    fn at(&self, o: usize, index: &str) -> String {
        let b = self.binds.slot[o];
        match self.vec4[b] {
            true => format!("b{b}_at({index})"),
            false => format!("b{b}[{index}]"),
        }
    }

    /// The vec4 at `q` (in vec4s) of operand `o`'s buffer, loaded.
    fn vec_load(&self, o: usize, q: &str) -> String {
        let b = self.binds.slot[o];
        if self.vec4[b] {
            return format!("b{b}[{q}]");
        }
        let t = self.binds.bindings[b].0.wgsl();
        let lane = |c: u32| format!("b{b}[({q}) * 4u + {c}u]");
        format!("vec4<{t}>({}, {}, {}, {})", lane(0), lane(1), lane(2), lane(3))
    }

    /// Stores `value` (a vec4) at `q` (in vec4s) of operand `o`'s buffer.
    fn vec_store(&self, o: usize, q: &str, value: &str) -> String {
        let b = self.binds.slot[o];
        if self.vec4[b] {
            return format!("b{b}[{q}] = {value};");
        }
        let lanes = ["x", "y", "z", "w"];
        let mut s = format!("{{ let v4 = {value};");
        for (c, lane) in lanes.iter().enumerate() {
            s.push_str(&format!(" b{b}[({q}) * 4u + {c}u] = v4.{lane};"));
        }
        s.push_str(" }");
        s
    }
}

/// The uniform struct (with room for `template_words` after the
/// elementwise words), the storage bindings and the shared helpers.
fn declarations<'a>(k: &MapKernel, template_words: usize, binds: &'a Binds) -> (String, Names<'a>) {
    declarations_as(k, false, &|_| false, template_words, binds)
}

/// Bindings as `array<T>`; those of contiguous inputs as `array<vec4<T>>`
/// when `vec4`, of contiguous outputs `o` too when `vec4_outputs(o)`. The uniform
/// is declared as large as every word the kernel reads, so no read indexes
/// past it (which WGSL leaves to the bounds-check policy of each backend).
fn declarations_as<'a>(
    k: &MapKernel,
    vec4: bool,
    vec4_outputs: &dyn Fn(usize) -> bool,
    template_words: usize,
    binds: &'a Binds,
) -> (String, Names<'a>) {
    let n_in = k.inputs.len();
    let linear_inputs = k.inputs.iter().enumerate().filter(|(_, (_, a))| vec4 && *a == Access::Linear).map(|(j, _)| j);
    let linear_outputs = k
        .outputs
        .iter()
        .enumerate()
        .filter(|(o, (_, a))| vec4_outputs(*o) && *a == Access::Linear)
        .map(|(o, _)| n_in + o);
    let scalar_outputs = k
        .outputs
        .iter()
        .enumerate()
        .filter(|(o, (_, a))| !(vec4_outputs(*o) && *a == Access::Linear))
        .map(|(o, _)| n_in + o);
    let names = Names::new(binds, linear_inputs.chain(linear_outputs).collect::<Vec<_>>(), scalar_outputs);
    (declare(k, &names, template_words), names)
}

/// The uniform struct (with room for `template_words` after the
/// elementwise words), `names`' storage bindings and the shared helpers.
fn declare(k: &MapKernel, names: &Names<'_>, template_words: usize) -> String {
    let binds = names.binds;
    let mut s = String::new();
    if k.uses_f16() || binds.bindings.iter().any(|(d, _)| *d == DType::F16) {
        s.push_str("enable f16;\n\n");
    }
    let words = (param_words(k) + template_words).div_ceil(4).max(1);
    let _ = writeln!(s, "struct Params {{ v: array<vec4<u32>, {words}> }}");
    s.push_str("@group(0) @binding(0) var<uniform> params: Params;\n");
    names.declare(&mut s);
    s.push('\n');
    s.push_str(HELPERS);
    s
}

/// One `let` per node, evaluated at linear index `i` of the iteration shape.
fn body(k: &MapKernel, names: &Names<'_>) -> String {
    body_of_lane(k, names, None)
}

/// The kernel's `let`s for one element: element `i` (`lane` = None), or
/// component `lane` of the vec4 at `q` in a vectorised kernel, whose
/// inputs were loaded as `in{j}_q` and whose values are named `v{id}_{lane}`.
fn body_of_lane(k: &MapKernel, names: &Names<'_>, lane: Option<usize>) -> String {
    let suffix = lane.map(|c| format!("_{c}")).unwrap_or_default();
    let index = match lane {
        None => "i".to_string(),
        Some(c) => format!("(q * 4u + {c}u)"),
    };
    let read = |j: usize| match (lane, k.inputs[j].1) {
        (Some(c), Access::Linear) => format!("in{j}_q.{}", ["x", "y", "z", "w"][c]),
        (Some(_), Access::Strided) => names.at(j, &format!("strided({}u, {index})", view_base(j))),
        (Some(_), Access::Planar) => names.at(j, &planar_index(view_base(j), &index)),
        (Some(c), Access::Split) => names.at(j, &split_index(view_base(j), "a", &format!("(kk * 4u + {c}u)"))),
        (_, access) => names.at(j, &index_expr(access, view_base(j))),
    };
    let name = |n: usize| format!("v{n}{suffix}");
    (0..k.nodes.len()).map(|id| node_line(k, names, id, &index, &name, &read)).collect()
}

/// The `let` of node `id` (with any lines it needs first), at element
/// `index`, node `n`'s value named `name(n)`; `read(j)` is the read of input
/// `j` at that element. A [`Node::RowReduce`] names the accumulator of the
/// row kernel's loop (`r{id}`), which only [`render_rows`] declares.
fn node_line(
    k: &MapKernel,
    names: &Names<'_>,
    id: usize,
    index: &str,
    name: &dyn Fn(usize) -> String,
    read: &dyn Fn(usize) -> String,
) -> String {
    let mut s = String::new();
    let (node, dtype) = &k.nodes[id];
    let t = dtype.wgsl();
    let v = name;
    let scalar_base = view_base(k.inputs.len() + k.outputs.len());
    let expr = match *node {
        Node::Input(j) => read(j),
        Node::Scalar(j) => scalar_expr(*dtype, scalar_base + j),
        Node::Index => format!("{t}({index})"),
        Node::Random(kind, slot) => {
            let seed = format!("p({}u), p({}u)", scalar_base + slot, scalar_base + slot + 1);
            match kind {
                RandomKind::Uniform => format!("{t}(wgrad_uniform({index}, {seed}))"),
                RandomKind::Normal => format!("{t}(wgrad_normal({index}, {seed}))"),
            }
        }
        Node::RandomAt(kind, lo, hi) => {
            let seed = format!("{}, {}", v(lo), v(hi));
            match kind {
                RandomKind::Uniform => format!("{t}(wgrad_uniform({index}, {seed}))"),
                RandomKind::Normal => format!("{t}(wgrad_normal({index}, {seed}))"),
            }
        }
        Node::Unary(op, a) => op.wgsl(&v(a), *dtype),
        Node::Binary(op, a, b) => op.wgsl(&v(a), &v(b), *dtype),
        Node::Compare(op, a, b) => format!("select(0u, 1u, {})", op.wgsl(&v(a), &v(b), k.dtype(a))),
        Node::Select(c, a, b) => {
            // Non-zero is true, NaN included (`NaN != 0` may fold to false).
            let zero = zero_literal(k.dtype(c));
            match nan_test(&v(c), k.dtype(c)) {
                Some(nan) => format!("select({}, {}, {} != {zero} || {nan})", v(b), v(a), v(c)),
                None => format!("select({}, {}, {} != {zero})", v(b), v(a), v(c)),
            }
        }
        Node::Cast(a) => format!("{t}({})", v(a)),
        Node::Arg => "acc".to_string(),
        Node::Gather(j, off) => names.at(j, &format!("p({}u) + {}", view_base(j), v(off))),
        Node::SegmentSum { values, starts, positions, batched } => {
            let (bv, bs, bp) = (view_base(values), view_base(starts), view_base(positions));
            // f16 segments add in f32, as sums do (see `accumulator`).
            let wide = accumulator(*dtype, ReduceKind::Sum).wgsl();
            let _ = writeln!(s, "    var acc{id}: {wide} = {wide}(0);");
            // Batched: segment `i % S` of one image's map, over the values
            // of image `i / S` (S and E lead the starts).
            let (segment, values_at) = match batched {
                false => ("i".to_string(), format!("p({bv}u)")),
                true => {
                    let (segments, per_image) =
                        (names.at(starts, &format!("p({bs}u)")), names.at(starts, &format!("p({bs}u) + 1u")));
                    let _ = writeln!(s, "    let seg{id} = i % {segments} + 2u;");
                    let _ = writeln!(s, "    let vals{id} = p({bv}u) + (i / {segments}) * {per_image};");
                    (format!("seg{id}"), format!("vals{id}"))
                }
            };
            let (first, last) = (
                names.at(starts, &format!("p({bs}u) + {segment}")),
                names.at(starts, &format!("p({bs}u) + {segment} + 1u")),
            );
            let _ = writeln!(s, "    for (var k = {first}; k < {last}; k = k + 1u) {{");
            let position = names.at(positions, &format!("p({bp}u) + k"));
            let _ = writeln!(
                s,
                "        acc{id} = acc{id} + {wide}({});",
                names.at(values, &format!("{values_at} + {position}"))
            );
            s.push_str("    }\n");
            format!("{t}(acc{id})")
        }
        Node::RowReduce(..) => format!("{t}(r{id})"),
        // `render_rows` declares the sum before this line.
        Node::CheckedRowSum { .. } => format!("{t}(g{id})"),
    };
    let _ = writeln!(s, "    let {}: {t} = {expr};", name(id));
    s
}

/// An elementwise kernel: every invocation evaluates the graph at one
/// index and stores each output.
pub(crate) fn render(k: &MapKernel, binds: &Binds) -> String {
    let (mut s, names) = declarations(k, 0, binds);
    s.push_str(
        "\n@compute @workgroup_size(256)\n\
         fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {\n\
         \x20   let i = gid.x + gid.y * nwg.x * 256u;\n\
         \x20   if (i >= p(0u)) { return; }\n",
    );
    s.push_str(&body(k, &names));
    for (o, (node, access)) in k.outputs.iter().enumerate() {
        let slot = k.inputs.len() + o;
        let _ = writeln!(s, "    {} = v{node};", names.at(slot, &index_expr(*access, view_base(slot))));
    }
    s.push_str("}\n");
    s
}

/// Whether `k` can run four elements per invocation ([`render_x4`]): a
/// multiple of 4 elements, contiguous outputs, every contiguous binding
/// (`views`, inputs then outputs) at an element offset that is a multiple
/// of 4, no segment sums. Small kernels stay scalar: they gain nothing and
/// would cost a second pipeline.
pub(crate) fn vectorisable(k: &MapKernel, numel: usize, views: &[Layout]) -> bool {
    let accesses = k.inputs.iter().map(|(_, a)| *a).chain(k.outputs.iter().map(|(_, a)| *a));
    numel.is_multiple_of(4)
        && numel >= 4096
        && k.outputs.iter().all(|(_, a)| *a == Access::Linear)
        && !k.nodes.iter().any(|(n, _)| matches!(n, Node::SegmentSum { .. }))
        && accesses.zip(views).all(|(a, v)| a != Access::Linear || v.offset.is_multiple_of(4))
}

/// [`render`] for a [`vectorisable`] kernel: invocation `q` loads each
/// contiguous input as one vec4 (strided and gathered ones per element),
/// evaluates the nodes for its four elements and stores each output as
/// one vec4. llvmpipe loads storage one scalar per SIMD lane
/// in a loop; a vec4 load shares that loop four ways (about 2x faster for
/// memory-bound kernels on lavapipe). Same bindings and words as `render`.
pub(crate) fn render_x4(k: &MapKernel, binds: &Binds) -> String {
    let (mut s, names) = declarations_as(k, true, &|_| true, 0, binds);
    s.push_str(
        "\n@compute @workgroup_size(256)\n\
         fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {\n\
         \x20   let q = gid.x + gid.y * nwg.x * 256u;\n\
         \x20   if (q * 4u >= p(0u)) { return; }\n",
    );
    s.push_str(&body_x4(k, &names));
    for (o, (node, _)) in k.outputs.iter().enumerate() {
        let t = k.dtype(*node).wgsl();
        let slot = k.inputs.len() + o;
        let value = format!("vec4<{t}>(v{node}_0, v{node}_1, v{node}_2, v{node}_3)");
        let _ = writeln!(s, "    {}", names.vec_store(slot, &format!("p({}u) / 4u + q", view_base(slot)), &value));
    }
    s.push_str("}\n");
    s
}

/// The vec4 loads of `k`'s contiguous inputs at vec4 `q`, then its nodes
/// for the four elements.
fn body_x4(k: &MapKernel, names: &Names<'_>) -> String {
    let mut s = String::new();
    for (j, (_, access)) in k.inputs.iter().enumerate() {
        if *access == Access::Linear {
            let _ = writeln!(s, "    let in{j}_q = {};", names.vec_load(j, &format!("p({}u) / 4u + q", view_base(j))));
        }
    }
    for lane in 0..4 {
        s.push_str(&body_of_lane(k, names, Some(lane)));
    }
    s
}

/// [`render_reduce`] four elements per step (vec4 loads, as [`render_x4`]),
/// for a prologue that is [`vectorisable`] over a K that is a multiple of
/// 4; the template's K counts vec4s.
pub(crate) fn render_reduce_x4(k: &MapKernel, kind: ReduceKind, binds: &Binds) -> String {
    let (node, _) = k.outputs[0];
    let dtype = k.dtype(node);
    // The side outputs are stored a vec4 at a time, the results one by one.
    let (mut s, names) = declarations_as(k, true, &|o| o > 0, REDUCE_WORDS, binds);
    let t = dtype.wgsl();
    s.push_str(&reduce_functions(dtype, kind, param_words(k)));
    s.push_str(&store_out(k, &names));
    let _ = writeln!(
        s,
        "fn value4(a: u32, kk: u32) -> vec4<T> {{\n    let q = a * p(R + 1u) + kk;\n{}{}    return vec4<T>(vec4<{t}>(v{node}_0, v{node}_1, v{node}_2, v{node}_3));\n}}",
        body_x4(k, &names),
        side_stores(k, &names, 1, true)
    );
    s.push_str(
        "fn fold(acc: T, a: u32, kk: u32) -> T {\n    let v = value4(a, kk);\n    \
         return combine(combine(acc, v.x), combine(v.y, combine(v.z, v.w)));\n}\n",
    );
    s.push_str(REDUCE_TEMPLATE);
    s
}

/// Invocations per workgroup of a row kernel run one row per invocation
/// (the form CPU adapters get): one SIMD vector of llvmpipe's 8 lanes, so
/// that even 16 rows make two workgroups and keep two cores busy (lavapipe
/// runs a workgroup on one thread). With 16, a [16, 16384] softmax
/// backward ran on one core: 37 -> 27 ms end to end with 8, and no change
/// at [4, 16384], [64, 4096] or [256, 1024] (lavapipe, AMD EPYC, 2 cores).
pub(crate) const ROWS_PER_GROUP: u32 = 8;

/// The name of each node's value in one lane of a kernel.
type NodeName<'a> = &'a dyn Fn(usize) -> String;

/// How a row kernel spreads a row over invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RowForm {
    /// One invocation per row, looping over all of it: no barriers, but
    /// neighbouring invocations read a row apart.
    PerInvocation,
    /// [`RowForm::PerInvocation`] four elements per step: every
    /// element-varying operand is read and written as vec4s (rows of a
    /// multiple of 4 elements, contiguous along the row, vec4-aligned).
    /// llvmpipe loads storage one scalar per SIMD lane in a loop, which a
    /// vec4 shares four ways: W4's row kernel 5.4 -> 2.6 ms on lavapipe.
    PerInvocationVec4,
    /// A workgroup of `size` invocations per row, each taking every
    /// `size`-th element, combining partial results through workgroup
    /// memory (two barriers per row reduction): neighbouring invocations
    /// read neighbouring elements. With `subgroups` (the adapter has
    /// subgroup operations), each invocation folds the partials of its
    /// lane (`part[lane]`, `part[lane + subgroup_size]`, ...) and the
    /// subgroup combines them (`subgroupAdd`, `subgroupMax`, `subgroupMin`),
    /// `size / subgroup_size` steps instead of `size`. Subgroup sizes are
    /// powers of two (Vulkan, Metal and D3D say so), so each subgroup of
    /// a workgroup of 64 covers every partial, and every subgroup combines
    /// the same values the same way.
    Workgroup { size: u32, subgroups: bool },
}

/// A row kernel over an [A, K] iteration (words 2 and 3): a row per
/// invocation or per workgroup (`form`); `uniform_io` says, per input and
/// then per output, whether its view is the same along the row. Each [`Node::RowReduce`] is a loop
/// over the row that evaluates its operand's element-varying nodes at
/// every `k` and folds them; nodes that are the same along the row
/// (`uniform`: read from an input whose view does not move along k,
/// or computed from row reductions and scalars) are
/// evaluated once, between the loops. A last loop stores the
/// element-varying outputs; uniform outputs are stored once per row. Every
/// view is two-dimensional (offset, row stride, element stride), so no
/// read loops over the rank: the loops are K back-edges each (K / n plus n
/// in a workgroup of n), one per row reduction and one for the stores,
/// which the fusion keeps within [`crate::exec::LOOP_BUDGET`]. A softmax,
/// a layer_norm and their backward formulas become one kernel that reads
/// each row from memory a few times (from cache after the first) and
/// writes it once.
pub(crate) fn render_rows(k: &MapKernel, uniform_io: &[bool], form: RowForm, binds: &Binds) -> String {
    let uniform_inputs = &uniform_io[..k.inputs.len()];
    let uniform_outputs = &uniform_io[k.inputs.len()..];
    let n_in = k.inputs.len();
    let x4 = form == RowForm::PerInvocationVec4;
    // In the vec4 form the element-varying operands are vec4 bindings
    // (unless a per-row output shares one, see `Names`).
    let varying_io =
        (0..uniform_io.len()).filter(|&o| !uniform_io[o] && k.inputs.get(o).is_none_or(|i| i.1 != Access::Gathered));
    let names = match x4 {
        true => Names::new(
            binds,
            varying_io.collect::<Vec<_>>(),
            (0..k.outputs.len()).filter(|&o| uniform_outputs[o]).map(|o| n_in + o),
        ),
        false => Names::new(binds, [], 0..n_in + k.outputs.len()),
    };
    let mut s = declare(k, &names, 0);
    let uniform = row_uniform_nodes(k, uniform_inputs);
    // Each operand's row starts at `row{j}` (computed once per row).
    let at = |j: usize, uniform: bool| match uniform {
        true => format!("row{j}"),
        false => format!("row{j} + k * p({}u)", view_base(j) + 2),
    };
    let read = |j: usize| names.at(j, &at(j, uniform_inputs[j]));
    // The vec4 form evaluates the varying nodes once per lane (`v{n}_{c}`,
    // inputs from the vec4 loaded as `in{j}_q`); row-uniform ones once.
    let lanes: Vec<Option<usize>> = if x4 { (0..4).map(Some).collect() } else { vec![None] };
    let lane_name = |c: Option<usize>| {
        let uniform = &uniform;
        move |n: usize| match c {
            Some(c) if !uniform[n] => format!("v{n}_{c}"),
            _ => format!("v{n}"),
        }
    };
    let lane_read = |c: Option<usize>| {
        let read = &read;
        move |j: usize| match c {
            Some(c) if !uniform_inputs[j] => format!("in{j}_q.{}", ["x", "y", "z", "w"][c]),
            _ => read(j),
        }
    };
    let lane_index = |c: Option<usize>| c.map(|c| format!("(i + {c}u)")).unwrap_or_else(|| "i".into());
    // The element-varying nodes each loop needs: the cone of its values.
    let cone = |roots: &[usize]| {
        let mut need = vec![false; k.nodes.len()];
        for &r in roots {
            need[r] = !uniform[r];
        }
        for id in (0..k.nodes.len()).rev() {
            if need[id] {
                for o in node_operands(&k.nodes[id].0) {
                    need[o] |= !uniform[o];
                }
            }
        }
        need
    };
    let indent = |body: String| body.lines().map(|l| format!("    {l}\n")).collect::<String>();
    // A loop over the row evaluating the `need`ed nodes at each element
    // (each lane of each vec4 in the vec4 form), then `per_element` for
    // each, given the lane's naming of nodes.
    let row_loop = |need: &[bool], per_element: &dyn Fn(NodeName<'_>) -> String| {
        let mut s = String::new();
        match form {
            RowForm::PerInvocation => {
                s.push_str("    for (var k = 0u; k < row_len; k = k + 1u) {\n        let i = a * row_len + k;\n")
            }
            RowForm::PerInvocationVec4 => {
                s.push_str(
                    "    for (var k = 0u; k < row_len / 4u; k = k + 1u) {\n        let i = a * row_len + k * 4u;\n",
                );
                let mut loaded = vec![false; n_in];
                for n in (0..k.nodes.len()).filter(|&n| need[n]) {
                    if let Node::Input(j) = k.nodes[n].0
                        && !uniform_inputs[j]
                        && !std::mem::replace(&mut loaded[j], true)
                    {
                        let _ =
                            writeln!(s, "        let in{j}_q = {};", names.vec_load(j, &format!("row{j} / 4u + k")));
                    }
                }
            }
            RowForm::Workgroup { size: n, .. } => {
                let _ = write!(
                    s,
                    "    for (var k = lid; k < row_len; k = k + {n}u) {{\n        let i = a * row_len + k;\n"
                );
            }
        }
        for &c in &lanes {
            let (name, read) = (lane_name(c), lane_read(c));
            for n in (0..k.nodes.len()).filter(|&n| need[n]) {
                s.push_str(&indent(node_line(k, &names, n, &lane_index(c), &name, &read)));
            }
            s.push_str(&per_element(&name));
        }
        s.push_str("    }\n");
        s
    };
    let level = row_levels(k);
    match form {
        RowForm::PerInvocation | RowForm::PerInvocationVec4 => {
            let _ = writeln!(
                s,
                "\n@compute @workgroup_size({ROWS_PER_GROUP})\n\
                 fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{\n\
                 \x20   let a = gid.x + gid.y * nwg.x * {ROWS_PER_GROUP}u;"
            );
        }
        RowForm::Workgroup { size: n, subgroups } => {
            let mut dtypes: Vec<DType> = Vec::new();
            for (node, dtype) in &k.nodes {
                if let Node::RowReduce(kind, _) = node {
                    let acc = accumulator(*dtype, *kind);
                    if !dtypes.contains(&acc) {
                        dtypes.push(acc);
                    }
                }
            }
            let mut head = String::new();
            for d in dtypes {
                let _ = writeln!(head, "var<workgroup> part_{0}: array<{0}, {n}>;", d.wgsl());
            }
            let _ = writeln!(
                s,
                "{head}\n@compute @workgroup_size({n})\n\
                 fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, \
                 @builtin(local_invocation_index) lid: u32{}) {{\n\
                 \x20   let a = wid.x + wid.y * nwg.x;",
                match subgroups {
                    true => ", @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) lanes: u32",
                    false => "",
                }
            );
        }
    };
    s.push_str("    if (a >= p(2u)) { return; }\n    let row_len = p(3u);\n");
    for (j, &(_, access)) in k.inputs.iter().enumerate() {
        if access != Access::Gathered {
            let _ = writeln!(s, "    let row{j} = p({}u) + a * p({}u);", view_base(j), view_base(j) + 1);
        }
    }
    for o in n_in..n_in + k.outputs.len() {
        let _ = writeln!(s, "    let row{o} = p({}u) + a * p({}u);", view_base(o), view_base(o) + 1);
    }
    let plain = lane_name(None);
    let mut emitted = vec![false; k.nodes.len()];
    let levels = level.iter().copied().max().unwrap_or(0);
    for l in 1..=levels + 1 {
        // Row-uniform values the next loop (or the stores) may read.
        for id in 0..k.nodes.len() {
            if uniform[id] && level[id] < l && !emitted[id] && !matches!(k.nodes[id].0, Node::RowReduce(..)) {
                if let Node::CheckedRowSum { src, .. } = k.nodes[id].0 {
                    s.push_str(&checked_sum(k, &names, id, &cone(&[src]), &plain, &read));
                }
                s.push_str(&node_line(k, &names, id, "a", &plain, &read));
                emitted[id] = true;
            }
        }
        let reductions: Vec<(usize, ReduceKind, usize)> = (0..k.nodes.len())
            .filter_map(|id| match k.nodes[id].0 {
                Node::RowReduce(kind, src) if level[id] == l => Some((id, kind, src)),
                _ => None,
            })
            .collect();
        if reductions.is_empty() {
            continue;
        }
        let fold = |kind: ReduceKind, dtype: DType, acc: &str, v: &str| match kind {
            ReduceKind::Sum => format!("{acc} + {}({v})", accumulator(dtype, kind).wgsl()),
            ReduceKind::Max => nan_propagating("max", acc, v, dtype),
            ReduceKind::Min => nan_propagating("min", acc, v, dtype),
        };
        let identity = |kind: ReduceKind, dtype: DType| match kind {
            ReduceKind::Sum => format!("{}(0)", dtype.wgsl()),
            ReduceKind::Max => extreme_literal(dtype, false),
            ReduceKind::Min => extreme_literal(dtype, true),
        };
        for &(id, kind, _) in &reductions {
            let acc = accumulator(k.dtype(id), kind);
            let _ = writeln!(s, "    var r{id}: {} = {};", acc.wgsl(), identity(kind, acc));
        }
        let need = cone(&reductions.iter().map(|r| r.2).collect::<Vec<_>>());
        // Lanes fold in element order, so both forms sum a row alike.
        s.push_str(&row_loop(&need, &|name| {
            let mut s = String::new();
            for &(id, kind, src) in &reductions {
                let _ = writeln!(s, "        r{id} = {};", fold(kind, k.dtype(id), &format!("r{id}"), &name(src)));
            }
            s
        }));
        if let RowForm::Workgroup { size: n, subgroups } = form {
            // Every invocation folds the partials in the same order, so all
            // hold the same result.
            for &(id, kind, _) in &reductions {
                // The partials are the accumulator's type.
                let dtype = accumulator(k.dtype(id), kind);
                let t = dtype.wgsl();
                if subgroups && let Some(combine) = subgroup_combine(kind, dtype, &format!("r{id}")) {
                    let _ = writeln!(
                        s,
                        "    part_{t}[lid] = r{id};\n    workgroupBarrier();\n    r{id} = {};\n    \
                         for (var j = lane; j < {n}u; j = j + lanes) {{ r{id} = {}; }}\n    r{id} = {combine};\n    \
                         workgroupBarrier();",
                        identity(kind, dtype),
                        fold(kind, dtype, &format!("r{id}"), &format!("part_{t}[j]"))
                    );
                    continue;
                }
                let _ = writeln!(
                    s,
                    "    part_{t}[lid] = r{id};\n    workgroupBarrier();\n    r{id} = {};\n    \
                     for (var j = 0u; j < {n}u; j = j + 1u) {{ r{id} = {}; }}\n    workgroupBarrier();",
                    identity(kind, dtype),
                    fold(kind, dtype, &format!("r{id}"), &format!("part_{t}[j]"))
                );
            }
        }
        for &(id, _, _) in &reductions {
            s.push_str(&node_line(k, &names, id, "i", &plain, &read));
            emitted[id] = true;
        }
    }
    // Stored per element or once per row as the output's view says, not as
    // its node is: a value of a row's shape may be the same along the row.
    let varying: Vec<usize> = (0..k.outputs.len()).filter(|&o| !uniform_outputs[o]).collect();
    if !varying.is_empty() {
        let need = cone(&varying.iter().map(|&o| k.outputs[o].0).collect::<Vec<_>>());
        match x4 {
            false => s.push_str(&row_loop(&need, &|name| {
                let mut s = String::new();
                for &o in &varying {
                    let _ =
                        writeln!(s, "        {} = {};", names.at(n_in + o, &at(n_in + o, false)), name(k.outputs[o].0));
                }
                s
            })),
            true => {
                // Every lane's values first, then one vec4 store per output.
                let body = row_loop(&need, &|_| String::new());
                s.push_str(body.strip_suffix("    }\n").expect("a row loop ends with its brace"));
                for &o in &varying {
                    let node = k.outputs[o].0;
                    let value: Vec<String> = (0..4).map(|c| lane_name(Some(c))(node)).collect();
                    let value = format!("vec4<{}>({})", k.dtype(node).wgsl(), value.join(", "));
                    let _ = writeln!(
                        s,
                        "        {}",
                        names.vec_store(n_in + o, &format!("row{} / 4u + k", n_in + o), &value)
                    );
                }
                s.push_str("    }\n");
            }
        }
    }
    let once = match form {
        RowForm::PerInvocation | RowForm::PerInvocationVec4 => "",
        RowForm::Workgroup { .. } => "if (lid == 0u) ",
    };
    for (o, (node, _)) in k.outputs.iter().enumerate().filter(|(o, _)| uniform_outputs[*o]) {
        let _ = writeln!(s, "    {once}{{ {} = v{node}; }}", names.at(n_in + o, &at(n_in + o, true)));
    }
    s.push_str("}\n");
    s
}

/// The subgroup's combination of each lane's `acc` for a reduction of
/// `kind` over `dtype`, NaN propagating as [`nan_propagating`] does (a
/// NaN in any lane makes a max or min NaN); `None` for f16, whose
/// subgroup operations need an extension wgpu does not ask for.
fn subgroup_combine(kind: ReduceKind, dtype: DType, acc: &str) -> Option<String> {
    if dtype == DType::F16 {
        return None;
    }
    let op = match kind {
        ReduceKind::Sum => return Some(format!("subgroupAdd({acc})")),
        ReduceKind::Max => "subgroupMax",
        ReduceKind::Min => "subgroupMin",
    };
    Some(match nan_test(acc, dtype) {
        Some(nan) => format!("select({op}({acc}), bitcast<f32>(0x7fc00000u), subgroupAny({nan}))"),
        None => format!("{op}({acc})"),
    })
}

/// The sum `g{id}` of a [`Node::CheckedRowSum`]: its fast value, or where
/// that is not to be trusted (see the node), `src` summed over the row as
/// written (the `need`ed nodes evaluated at each element). The tests are on
/// bits and on finite values: WGSL may assume no float is NaN. The loop
/// runs one element at a time in every form, by every invocation alone: a
/// rare path, and one without barriers (this branch is not uniform control
/// flow to WGSL).
fn checked_sum(
    k: &MapKernel,
    names: &Names<'_>,
    id: usize,
    need: &[bool],
    name: &dyn Fn(usize) -> String,
    read: &dyn Fn(usize) -> String,
) -> String {
    let Node::CheckedRowSum { src, fast, addends, magnitude, smallest } = k.nodes[id].0 else {
        return String::new();
    };
    let mut s = String::new();
    let non_finite = |x: String| format!("(bitcast<u32>({x}) & 0x7f800000u) == 0x7f800000u");
    let _ = writeln!(s, "    var g{id}: f32 = f32({});", name(fast));
    let _ = writeln!(s, "    let d{id}: f32 = f32({});", name(addends));
    let _ = writeln!(s, "    let m{id}: f32 = f32({});", name(magnitude));
    let _ = writeln!(s, "    let t{id}: f32 = f32({});", name(smallest));
    // ε = 2^-24; the summation error of K addends about ε sqrt(K) each.
    let _ = writeln!(
        s,
        "    if ({} || {} || {} || {} || g{id} == 0.0 || t{id} < 7.7037198e-34 || \
         sqrt(f32(row_len)) * 5.9604645e-8 * d{id} > max(abs(g{id}) * 1.2207031e-4, m{id} * 2.3841858e-7)) {{",
        non_finite(format!("g{id}")),
        non_finite(format!("d{id}")),
        non_finite(format!("m{id}")),
        non_finite(format!("t{id}"))
    );
    let _ = writeln!(s, "        g{id} = 0.0;");
    let _ = writeln!(s, "        for (var k = 0u; k < row_len; k = k + 1u) {{");
    let _ = writeln!(s, "            let i = a * row_len + k;");
    for n in (0..k.nodes.len()).filter(|&n| need[n]) {
        for line in node_line(k, names, n, "i", name, read).lines() {
            let _ = writeln!(s, "        {line}");
        }
    }
    let _ = writeln!(s, "            g{id} = g{id} + f32({});", name(src));
    s.push_str("        }\n    }\n");
    s
}

/// Row reductions that depend on none of each other share a loop: the
/// level of a node is the number of row reductions it waits for (a row
/// kernel loops over its rows the highest level plus one times).
pub(crate) fn row_levels(k: &MapKernel) -> Vec<usize> {
    let mut level = Vec::with_capacity(k.nodes.len());
    for (node, _) in &k.nodes {
        let l = row_level(node, &level);
        level.push(l);
    }
    level
}

/// The level of `node` given the levels of earlier nodes (see [`row_levels`]).
pub(crate) fn row_level(node: &Node, level: &[usize]) -> usize {
    let below = node_operands(node).iter().map(|&o| level[o]).max().unwrap_or(0);
    below + usize::from(matches!(node, Node::RowReduce(..)))
}

/// Which nodes of a row kernel are the same at every element of a row.
pub(crate) fn row_uniform_nodes(k: &MapKernel, uniform_inputs: &[bool]) -> Vec<bool> {
    let mut uniform = Vec::with_capacity(k.nodes.len());
    for (node, _) in &k.nodes {
        let same = row_uniform(node, &uniform, uniform_inputs);
        uniform.push(same);
    }
    uniform
}

/// Whether `node` is the same at every element of a row, given which
/// earlier nodes are (`uniform`) and which inputs are.
pub(crate) fn row_uniform(node: &Node, uniform: &[bool], uniform_inputs: &[bool]) -> bool {
    match *node {
        Node::Input(j) => uniform_inputs[j],
        Node::Scalar(_) | Node::RowReduce(..) | Node::CheckedRowSum { .. } | Node::Arg => true,
        Node::Index | Node::Random(..) | Node::RandomAt(..) | Node::SegmentSum { .. } => false,
        _ => node_operands(node).iter().all(|&o| uniform[o]),
    }
}

/// The nodes a node reads.
pub(crate) fn node_operands(node: &Node) -> Vec<usize> {
    match *node {
        Node::Input(_) | Node::Scalar(_) | Node::Index | Node::Random(..) | Node::Arg | Node::SegmentSum { .. } => {
            Vec::new()
        }
        Node::Unary(_, a) | Node::Cast(a) | Node::RowReduce(_, a) | Node::Gather(_, a) => vec![a],
        Node::Binary(_, a, b) | Node::Compare(_, a, b) | Node::RandomAt(_, a, b) => vec![a, b],
        Node::Select(c, a, b) => vec![c, a, b],
        Node::CheckedRowSum { fast, src, addends, magnitude, smallest } => {
            vec![fast, src, addends, magnitude, smallest]
        }
    }
}

/// The stores of a reduction's (or an epilogue's) outputs after the first
/// `own` (elementwise values stored at the element being folded: `i`, or
/// the vec4 at `q`).
fn side_stores(k: &MapKernel, names: &Names<'_>, own: usize, x4: bool) -> String {
    let mut s = String::new();
    for (o, (node, access)) in k.outputs.iter().enumerate().skip(own) {
        let slot = k.inputs.len() + o;
        let _ = match x4 {
            true => {
                let t = k.dtype(*node).wgsl();
                let value = format!("vec4<{t}>(v{node}_0, v{node}_1, v{node}_2, v{node}_3)");
                writeln!(s, "    {}", names.vec_store(slot, &format!("p({}u) / 4u + q", view_base(slot)), &value))
            }
            false => writeln!(s, "    {} = v{node};", names.at(slot, &index_expr(*access, view_base(slot)))),
        };
    }
    s
}

/// The type a reduction of `dtype` accumulates in: f16 sums in f32 (as
/// PyTorch's do; in f16 a running sum stops growing at 2,048 when its
/// terms are 1), everything else in its own dtype.
pub(crate) fn accumulator(dtype: DType, kind: ReduceKind) -> DType {
    match (dtype, kind) {
        (DType::F16, ReduceKind::Sum) => DType::F32,
        _ => dtype,
    }
}

/// The element type, identity and combine of a reduction.
fn reduce_functions(dtype: DType, kind: ReduceKind, words: usize) -> String {
    let mut s = String::new();
    let t = accumulator(dtype, kind).wgsl();
    let _ = writeln!(s, "\nalias T = {t};\nconst R: u32 = {words}u;");
    let (identity, combine) = match kind {
        ReduceKind::Sum => ("T(0)".to_string(), "a + b".to_string()),
        ReduceKind::Max => (extreme_literal(dtype, false), nan_propagating("max", "a", "b", dtype)),
        ReduceKind::Min => (extreme_literal(dtype, true), nan_propagating("min", "a", "b", dtype)),
    };
    let _ = writeln!(s, "fn identity() -> T {{ return {identity}; }}");
    let _ = writeln!(s, "fn combine(a: T, b: T) -> T {{ return {combine}; }}");
    s
}

/// A reduction whose elements come from evaluating `k` (its one output
/// node is the value reduced) over an [A, K] iteration space: kept axes
/// first, reduced axes last. A plain reduction is the one-node case (read
/// the input through a permuted view); a fused one computes an elementwise
/// prologue on the fly and never stores it. The template's own words start
/// at `R`, after the elementwise words.
///
/// With `reduced` > 1 the first `reduced` outputs are sums over the same
/// iteration (sibling reductions: two column sums of one backward), folded
/// together as one vector (`T` is `vecN`) in one pass.
pub(crate) fn render_reduce(k: &MapKernel, kind: ReduceKind, reduced: usize, binds: &Binds) -> String {
    let (mut s, names) = declarations(k, REDUCE_WORDS, binds);
    s.push_str(&reduce_head(k, kind, reduced, &names));
    let parts: Vec<String> = k.outputs[..reduced].iter().map(|(n, _)| format!("v{n}")).collect();
    let _ = writeln!(
        s,
        "fn value(a: u32, kk: u32) -> T {{\n    let i = a * p(R + 1u) + kk;\n{}{}    return T({});\n}}",
        body(k, &names),
        side_stores(k, &names, reduced, false),
        reduced_parts(k, &parts)
    );
    s.push_str("fn fold(acc: T, a: u32, kk: u32) -> T { return combine(acc, value(a, kk)); }\n");
    s.push_str(REDUCE_TEMPLATE);
    s
}

/// A reduction's `T`, `R`, `identity()`, `combine(a, b)` and
/// `store_out(t, v)`; with `reduced` > 1 sibling sums as one `vecN`.
fn reduce_head(k: &MapKernel, kind: ReduceKind, reduced: usize, names: &Names<'_>) -> String {
    let dtype = k.dtype(k.outputs[0].0);
    if reduced == 1 {
        return reduce_functions(dtype, kind, param_words(k)) + &store_out(k, names);
    }
    let mut s = String::new();
    let acc = accumulator(dtype, kind).wgsl();
    let _ = writeln!(s, "\nalias T = vec{reduced}<{acc}>;\nconst R: u32 = {}u;", param_words(k));
    s.push_str("fn identity() -> T { return T(); }\nfn combine(a: T, b: T) -> T { return a + b; }\n");
    s.push_str("fn store_out(i: u32, v: T) {");
    for o in 0..reduced {
        let slot = k.inputs.len() + o;
        let at = names.at(slot, &format!("p({}u) + i", view_base(slot)));
        let _ = write!(s, " {at} = {}(v[{o}]);", dtype.wgsl());
    }
    s.push_str(" }\n");
    s
}

/// A tiled matmul whose result goes through `epilogue` (its one output
/// node; [`Node::Arg`] is the accumulated product) before it is stored at
/// its linear index of the contiguous result. The template's words start
/// at `M`, after the elementwise words of the epilogue.
pub(crate) fn render_matmul(epilogue: &MapKernel, dtype: DType, template: MatmulTemplate, binds: &Binds) -> String {
    let (node, _) = epilogue.outputs[0];
    let (mut s, names) = declarations(epilogue, MATMUL_WORDS, binds);
    let t = dtype.wgsl();
    let operands = epilogue.inputs.len() + epilogue.outputs.len();
    let (a, b) = (operands, operands + 1);
    // `A`, the accumulator: f16 products add in f32 (as PyTorch's do), or
    // a dot product of 4,096 f16 ones would stop at 2,048.
    let wide = accumulator(dtype, ReduceKind::Sum).wgsl();
    let _ = writeln!(s, "alias T = {t};\nalias A = {wide};\nconst M: u32 = {}u;", param_words(epilogue));
    let _ = writeln!(s, "fn load_a(i: u32) -> A {{ return A({}); }}", names.at(a, "i"));
    let _ = writeln!(s, "fn load_b(i: u32) -> A {{ return A({}); }}", names.at(b, "i"));
    let out = names.at(epilogue.inputs.len(), &format!("p({}u) + i", view_base(epilogue.inputs.len())));
    let _ = writeln!(s, "fn load_out(i: u32) -> T {{ return {out}; }}");
    s.push_str(&store_out(epilogue, &names));
    // The epilogue stores its other outputs itself (at the product's index).
    let _ = writeln!(
        s,
        "fn epilogue(wide: A, i: u32) -> T {{\n    let acc = T(wide);\n{}{}    return v{node};\n}}",
        body(epilogue, &names),
        side_stores(epilogue, &names, 1, false)
    );
    let fused = !matches!(epilogue.nodes[node].0, Node::Arg) || epilogue.outputs.len() > 1;
    s.push_str(match template {
        MatmulTemplate::Tiled => MATMUL_TEMPLATE,
        MatmulTemplate::Direct => direct_template(fused),
    });
    s
}

/// The direct template's pass of its stored block through a fused epilogue.
const DIRECT_EPILOGUE: &str = "    for (var q = 0u; q < 128u; q = q + 1u) {
        let row = row0 + q / 8u;
        let col = col0 + 8u * (q % 8u);
        if (row < m && col < n) {
            let at = c_base + row * n + col;
            store_out(at, epilogue(A(load_out(at)), at));
        }
    }
";

/// Rows and columns of C one invocation of the direct template computes.
const DIRECT_BLOCK: (usize, usize) = (16, 8);

/// `shaders/matmul_direct.wgsl` with its register block spelled out at the
/// `//!` markers (llvmpipe keeps loops this large rolled, which would put
/// the accumulators in memory).
fn direct_template(fused_epilogue: bool) -> &'static str {
    static PLAIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static FUSED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match fused_epilogue {
        false => PLAIN.get_or_init(|| spell_out_direct_template(false)),
        true => FUSED.get_or_init(|| spell_out_direct_template(true)),
    }
}

fn spell_out_direct_template(fused_epilogue: bool) -> String {
    let (rows, cols) = DIRECT_BLOCK;
    let mut declare = String::new();
    let mut step = String::new();
    let mut store = String::new();
    for i in 0..rows {
        let _ = writeln!(declare, "    let r{i} = a_base + min(row0 + {i}u, m - 1u) * a_row;");
    }
    for j in 0..cols {
        let _ = writeln!(declare, "    let c{j} = b_base + min(col0 + {}u, n - 1u) * b_col;", 8 * j);
        let _ = writeln!(step, "        let vb{j} = load_b(c{j} + b_off);");
    }
    for i in 0..rows {
        let _ = writeln!(step, "        let va{i} = load_a(r{i} + a_off);");
        for j in 0..cols {
            let _ = writeln!(declare, "    var acc{i}_{j} = A(0);");
            let _ = writeln!(step, "        acc{i}_{j} = acc{i}_{j} + va{i} * vb{j};");
            let _ = writeln!(
                store,
                "    if (row0 + {i}u < m && col0 + {c}u < n) {{ store_out(c_base + (row0 + {i}u) * n + col0 + {c}u, T(acc{i}_{j})); }}",
                c = 8 * j
            );
        }
    }
    let mut out = String::new();
    for line in MATMUL_DIRECT_TEMPLATE.lines() {
        match line.trim() {
            "//! declare" => out.push_str(&declare),
            "//! step" => out.push_str(&step),
            "//! store" => out.push_str(&store),
            "//! epilogue" if fused_epilogue => out.push_str(DIRECT_EPILOGUE),
            "//! epilogue" => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// `store_out(i, v)`: stores `v` at element `i` of the kernel's one
/// (contiguous) output, at the output's offset in its buffer.
fn store_out(k: &MapKernel, names: &Names<'_>) -> String {
    let t = k.dtype(k.outputs[0].0).wgsl();
    let slot = k.inputs.len();
    format!("fn store_out(i: u32, v: T) {{ {} = {t}(v); }}\n", names.at(slot, &format!("p({}u) + i", view_base(slot))))
}

/// The reduced values `parts` (of their own dtype) as one value for `T`
/// (a reduction's accumulator type: f16 sums add in f32): the value
/// itself, or with siblings a vector of them, converted.
fn reduced_parts(k: &MapKernel, parts: &[String]) -> String {
    match parts {
        [one] => one.clone(),
        _ => format!("vec{}<{}>({})", parts.len(), k.dtype(k.outputs[0].0).wgsl(), parts.join(", ")),
    }
}

/// The template words of a reduction launch (see `shaders/reduce.wgsl`).
pub(crate) fn reduce_words(a: usize, k: usize, n_chunks: usize) -> [u32; REDUCE_WORDS] {
    [a as u32, k as u32, n_chunks as u32, k.div_ceil(n_chunks) as u32, (a * n_chunks) as u32]
}

/// The lowest (`highest == false`) or highest value of a dtype, the
/// identity of max or min.
fn extreme_literal(dtype: DType, highest: bool) -> String {
    match (dtype, highest) {
        (DType::F32, false) => "bitcast<f32>(0xff800000u)".into(),
        (DType::F16, false) => "f16(bitcast<f32>(0xff800000u))".into(),
        (DType::I32, false) => "bitcast<i32>(0x80000000u)".into(),
        (DType::U32, false) => "0u".into(),
        (DType::F32, true) => "bitcast<f32>(0x7f800000u)".into(),
        (DType::F16, true) => "f16(bitcast<f32>(0x7f800000u))".into(),
        (DType::I32, true) => "bitcast<i32>(0x7fffffffu)".into(),
        (DType::U32, true) => "0xffffffffu".into(),
    }
}

fn index_expr(access: Access, base: usize) -> String {
    index_at(access, base, "i")
}

/// The element offset of element `i` (step (`a`, `kk`) of a reduction) of
/// the view at `base` read as `access`.
fn index_at(access: Access, base: usize, i: &str) -> String {
    match access {
        Access::Linear => format!("p({base}u) + {i}"),
        Access::Strided => format!("strided({base}u, {i})"),
        Access::Planar => planar_index(base, i),
        Access::Broadcast => format!("p({base}u)"),
        Access::Split => split_index(base, "a", "kk"),
        Access::Gathered => unreachable!("gathered bindings are read by Gather and SegmentSum nodes"),
    }
}

/// The element offset of index `index` in an [`Access::Planar`] view.
fn planar_index(base: usize, index: &str) -> String {
    format!(
        "p({base}u) + ({index} / p({}u)) * p({}u) + ({index} % p({}u)) * p({}u)",
        base + 3,
        base + 1,
        base + 3,
        base + 2
    )
}

/// The element offset of step (`a`, `kk`) of a reduction in an
/// [`Access::Split`] view.
fn split_index(base: usize, a: &str, kk: &str) -> String {
    format!("p({base}u) + {a} * p({}u) + {kk} * p({}u)", base + 1, base + 2)
}

fn scalar_expr(dtype: DType, word: usize) -> String {
    match dtype {
        DType::F32 => format!("bitcast<f32>(p({word}u))"),
        DType::F16 => format!("f16(bitcast<f32>(p({word}u)))"),
        DType::I32 => format!("bitcast<i32>(p({word}u))"),
        DType::U32 => format!("p({word}u)"),
    }
}

/// A WGSL test that `x` (of `dtype`) is NaN, on the bits (see
/// `wgrad_isnan`); `None` for integer dtypes, which have no NaN.
pub(crate) fn nan_test(x: &str, dtype: DType) -> Option<String> {
    match dtype {
        DType::F32 => Some(format!("wgrad_isnan({x})")),
        DType::F16 => Some(format!("wgrad_isnan(f32({x}))")),
        DType::I32 | DType::U32 => None,
    }
}

/// `max` or `min` of `a` and `b` that returns a NaN operand as it is, as
/// PyTorch's `maximum` / `amax` do (WGSL's `max` may drop NaN).
pub(crate) fn nan_propagating(f: &str, a: &str, b: &str, dtype: DType) -> String {
    match (nan_test(a, dtype), nan_test(b, dtype)) {
        (Some(nan_a), Some(nan_b)) => format!("select(select({f}({a}, {b}), {b}, {nan_b}), {a}, {nan_a})"),
        _ => format!("{f}({a}, {b})"),
    }
}

pub(crate) fn zero_literal(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "0.0f",
        DType::F16 => "0.0h",
        DType::I32 => "0i",
        DType::U32 => "0u",
    }
}

/// The 32-bit pattern a host scalar travels as, for a slot of `dtype`.
pub(crate) fn scalar_bits(dtype: DType, value: f64) -> u32 {
    match dtype {
        DType::F32 | DType::F16 => (value as f32).to_bits(),
        DType::I32 => (value as i32) as u32,
        DType::U32 => value as u32,
    }
}

/// The uniform words a generated module declares and the highest word it
/// reads, found in its source: `p(Nu)`, `p(R + Nu)` and `p(M + Nu)` read
/// word N (after the template's base), and `strided(Bu, ..)` reads words B
/// to B + MAX_RANK. The generator checks every module with this before it
/// is compiled (`Device::pipeline`), so a template that reads a word its
/// uniform does not declare is a clear error in every build, not a read
/// that each backend's bounds-check policy resolves its own way.
pub(crate) fn uniform_reads(source: &str) -> (usize, Option<usize>) {
    let number_after = |s: &str, prefix: &str| -> Option<usize> {
        let at = s.find(prefix)? + prefix.len();
        let digits: String = s[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let declared = number_after(source, "struct Params { v: array<vec4<u32>, ").map_or(0, |v| v * 4);
    let base_r = number_after(source, "const R: u32 = ");
    let base_m = number_after(source, "const M: u32 = ");
    let mut highest: Option<usize> = None;
    let mut note = |w: usize| highest = Some(highest.map_or(w, |h| h.max(w)));
    for (at, _) in source.match_indices("p(") {
        // Only calls of the word reader, not names that end in `p`.
        if source[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let arg = &source[at + 2..];
        let (base, rest) = match arg {
            a if a.starts_with("R + ") => (base_r, &a[4..]),
            a if a.starts_with("M + ") => (base_m, &a[4..]),
            a => (Some(0), a),
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let constant = rest[digits.len()..].starts_with("u)");
        if let (Some(base), true, Ok(n)) = (base, constant, digits.parse::<usize>()) {
            note(base + n);
        }
    }
    for (at, _) in source.match_indices("strided(") {
        if let Some(b) = number_after(&source[at..], "strided(") {
            if source[at + 8 + b.to_string().len()..].starts_with("u,") {
                note(b + MAX_RANK);
            }
        }
    }
    (declared, highest)
}

/// An error naming the kernel when it reads a uniform word past the ones
/// it declares (see [`uniform_reads`]).
pub(crate) fn check_uniform_reads(label: &str, source: &str) -> crate::Result<()> {
    match uniform_reads(source) {
        (declared, Some(highest)) if highest >= declared => Err(crate::Error::Shader {
            label: label.to_string(),
            message: format!(
                "internal: the kernel reads uniform word {highest} but declares {declared}; \
                 this is a wgrad bug, please report it"
            ),
        }),
        _ => Ok(()),
    }
}
