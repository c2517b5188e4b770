//! Launches: pack sizes into uniform words, render the kernel source and
//! pick the grid. The eager executor dispatches a [`Launch`] at once; the
//! compiled backward builds the same launches ahead of time and replays
//! them with its own buffers.

use crate::compiler::trace;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::ReduceKind;
use crate::exec::bind::{Binds, Operand};
use crate::exec::codegen::{self, scalar_bits, view_base};
use crate::exec::kernel::{Access, MapKernel, Node};
use crate::exec::merge::MapOp;
use crate::layout::{Layout, MAX_RANK};
use crate::metadata::{DType, Shape};
use crate::profile::KernelInfo;
use crate::tensor::Tensor;

/// Which generator renders a launch's kernel.
#[derive(Debug, Clone)]
pub(crate) enum Template {
    /// An elementwise kernel, four elements per invocation when `x4`.
    Map { kernel: MapKernel, x4: bool },
    /// The first pass of a reduction; its first `reduced` outputs are
    /// reduced (sibling sums folded as one vector), the rest stored as read.
    Reduce { kernel: MapKernel, kind: ReduceKind, form: ReduceForm, reduced: usize },
    /// A row kernel ([`codegen::render_rows`]); `uniform_io[j]` when the
    /// view of operand `j` (inputs, then outputs) does not move along the row.
    Rows { kernel: MapKernel, uniform_io: Vec<bool>, form: codegen::RowForm },
    /// A matmul with its epilogue.
    Matmul { epilogue: MapKernel, dtype: DType, template: codegen::MatmulTemplate },
}

/// How the first pass of a reduction walks its [A, K] iteration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReduceForm {
    /// An element per step, a result per invocation.
    Elements,
    /// Four neighbouring elements of the reduced axis per step (contiguous
    /// inputs as vec4s; [`codegen::render_reduce_x4`]).
    Vec4,
    /// Four neighbouring results per invocation, each input read as its
    /// [`codegen::ColumnRead`] says ([`codegen::render_reduce_columns`]).
    Columns(Vec<codegen::ColumnRead>),
}

/// One kernel dispatch, independent of the buffers it will be bound to:
/// its operands (inputs, outputs, then a matmul's `a` and `b`) get their
/// buffers, and their allocations' offsets, when it is dispatched.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub label: &'static str,
    pub template: Template,
    pub words: Vec<u32>,
    pub grid: [u32; 3],
    /// What it computes, for the profiler.
    pub info: KernelInfo,
    /// Each operand's dtype, whether the kernel writes it, and the word
    /// holding its element offset (to which its allocation's start is added).
    pub dtypes: Vec<DType>,
    pub written: Vec<bool>,
    pub offset_words: Vec<usize>,
    /// (read operand, written operand) pairs on one storage that do not
    /// race: an elementwise kernel reading the very element each
    /// invocation then overwrites (a compiled step's in-place update).
    pub in_place: Vec<(usize, usize)>,
}

impl Launch {
    /// The kernel source for operands bound as `binds`.
    pub fn source(&self, binds: &Binds) -> String {
        match &self.template {
            Template::Map { kernel, x4: false } => codegen::render(kernel, binds),
            Template::Map { kernel, x4: true } => codegen::render_x4(kernel, binds),
            Template::Reduce { kernel, kind, form, reduced } => match form {
                ReduceForm::Elements => codegen::render_reduce(kernel, *kind, *reduced, binds),
                ReduceForm::Vec4 => codegen::render_reduce_x4(kernel, *kind, binds),
                ReduceForm::Columns(reads) => codegen::render_reduce_columns(kernel, *kind, *reduced, reads, binds),
            },
            Template::Rows { kernel, uniform_io, form } => codegen::render_rows(kernel, uniform_io, *form, binds),
            Template::Matmul { epilogue, dtype, template } => {
                codegen::render_matmul(epilogue, *dtype, *template, binds)
            }
        }
    }

    /// The source when every operand of a dtype shares one arena, the
    /// usual case (for reports and validation before anything is bound).
    pub fn typical_source(&self) -> String {
        self.source(&Binds::by_dtype(&self.dtypes, &self.written))
    }

    /// The uniform words with each operand's allocation start added to its offset word.
    pub fn words_for(&self, operands: &[Operand]) -> Vec<u32> {
        let mut words = self.words.clone();
        for (o, &w) in operands.iter().zip(&self.offset_words) {
            words[w] += o.base();
        }
        words
    }

    /// Dispatches now on `operands`, each distinct buffer bound once.
    pub fn dispatch(&self, device: &Device, operands: &[Operand]) -> Result<()> {
        let (binds, buffers) = Binds::of(operands, &self.written);
        let pipeline = device.pipeline(self.label, &self.source(&binds))?;
        let words = self.words_for(operands);
        device.dispatch(self.label, &self.info, &pipeline, &words, &buffers, operands, &self.written, self.grid)
    }
}

/// The dtypes, writes and offset words of an elementwise-shaped kernel's
/// operands (inputs, then outputs).
fn map_operands(kernel: &MapKernel) -> (Vec<DType>, Vec<bool>, Vec<usize>) {
    let n = kernel.inputs.len() + kernel.outputs.len();
    let dtypes = kernel.inputs.iter().map(|(d, _)| *d).chain(kernel.outputs.iter().map(|(id, _)| kernel.dtype(*id)));
    let written = (0..n).map(|o| o >= kernel.inputs.len()).collect();
    (dtypes.collect(), written, (0..n).map(view_base).collect())
}

/// The bytes an elementwise-shaped kernel moves: each input and output
/// element of `elements` once (a broadcast input is counted whole, an
/// overestimate when it is read from cache).
fn map_bytes(kernel: &MapKernel, elements: usize) -> u64 {
    input_bytes(kernel, elements) + output_bytes(kernel, elements)
}

/// Gathered bindings are not counted: how much of them a kernel reads
/// depends on the indices.
fn input_bytes(kernel: &MapKernel, elements: usize) -> u64 {
    let per: usize = kernel.inputs.iter().filter(|(_, a)| *a != Access::Gathered).map(|(d, _)| d.size_in_bytes()).sum();
    (per as u64).saturating_mul(elements as u64)
}

fn output_bytes(kernel: &MapKernel, elements: usize) -> u64 {
    let per: usize = kernel.outputs.iter().map(|(id, _)| kernel.dtype(*id).size_in_bytes()).sum();
    (per as u64).saturating_mul(elements as u64)
}

/// What the profiler calls an elementwise kernel: its ops, or `copy`.
fn map_name(kernel: &MapKernel) -> String {
    let ops = kernel.describe();
    if ops.is_empty() { "copy".into() } else { ops }
}

/// A view's dims merged into at most two evenly strided runs, outer and
/// inner: `(outer stride, inner stride, inner length)`; `None` when it
/// takes more (see [`Access::Planar`]).
pub(crate) fn planar(view: &Layout) -> Option<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new(); // (length, stride), innermost first
    for (&d, &s) in view.shape.dims().iter().zip(&view.strides).rev() {
        if d == 1 {
            continue;
        }
        match runs.last_mut() {
            Some((len, stride)) if s == *stride * *len => *len *= d,
            _ => runs.push((d, s)),
        }
    }
    match runs.as_slice() {
        [] => Some((0, 0, 1)),
        [(n, s)] => Some((0, *s, (*n).max(1))),
        [(n, s), (_, outer)] => Some((*outer, *s, *n)),
        _ => None,
    }
}

fn push_view(words: &mut Vec<u32>, layout: &Layout) {
    words.push(layout.offset as u32);
    let mut strides = [0u32; MAX_RANK];
    for (s, &v) in strides.iter_mut().zip(&layout.strides) {
        *s = v as u32;
    }
    words.extend_from_slice(&strides);
}

fn check_same_device(op: &'static str, device: &Device, inputs: &[&Tensor]) -> Result<()> {
    for t in inputs {
        if t.device() != device {
            return Err(Error::DeviceMismatch { op, lhs: device.id(), rhs: t.device().id() });
        }
    }
    Ok(())
}

/// The uniform words of an elementwise kernel iterating over `shape`:
/// inputs are read through `inputs` (views already of `shape`), outputs
/// written through `outputs`. Sets each binding's access mode.
pub(crate) fn map_words(
    op: &'static str,
    kernel: &mut MapKernel,
    shape: &Shape,
    inputs: &[Layout],
    outputs: &[Layout],
    scalars: &[f64],
) -> Result<Vec<u32>> {
    Layout::contiguous(shape.clone()).check_rank(op)?;
    let mut words = vec![shape.numel() as u32, shape.rank() as u32];
    let mut dims = [0u32; MAX_RANK];
    for (d, &v) in dims.iter_mut().zip(shape.dims()) {
        *d = v as u32;
    }
    words.extend_from_slice(&dims);
    for (slot, view) in inputs.iter().enumerate() {
        let access = &mut kernel.inputs[slot].1;
        if *access != Access::Gathered {
            *access = if view.is_contiguous() {
                Access::Linear
            } else if view.strides.iter().all(|&s| s == 0) {
                Access::Broadcast
            } else if planar(view).is_some() {
                Access::Planar
            } else {
                Access::Strided
            };
        }
        match (kernel.inputs[slot].1, planar(view)) {
            (Access::Planar, Some((outer, inner, n))) => {
                let mut w = [0u32; 1 + MAX_RANK];
                w[..4].copy_from_slice(&[view.offset as u32, outer as u32, inner as u32, n as u32]);
                words.extend_from_slice(&w);
            }
            _ => push_view(&mut words, view),
        }
    }
    for (o, view) in outputs.iter().enumerate() {
        kernel.outputs[o].1 = if view.is_contiguous() { Access::Linear } else { Access::Strided };
        push_view(&mut words, view);
    }
    debug_assert_eq!(words.len(), view_base(inputs.len() + outputs.len()));
    for (dtype, value) in kernel.scalars.iter().zip(scalars) {
        words.push(scalar_bits(*dtype, *value));
    }
    Ok(words)
}

/// An elementwise launch over `shape`.
pub(crate) fn map_launch(
    device: &Device,
    op: &'static str,
    kernel: MapKernel,
    shape: &Shape,
    inputs: &[Layout],
    outputs: &[Layout],
    scalars: &[f64],
) -> Result<Launch> {
    map_launch_sized(device, op, kernel, shape, inputs, outputs, scalars, None)
}

/// [`map_launch`] for one of a program's family of batch sizes: `twin` is
/// the element count at the family's other size, and the four-wide form
/// (a multiple of 4 elements) is taken only where it is one too.
#[allow(clippy::too_many_arguments)]
pub(crate) fn map_launch_sized(
    device: &Device,
    op: &'static str,
    mut kernel: MapKernel,
    shape: &Shape,
    inputs: &[Layout],
    outputs: &[Layout],
    scalars: &[f64],
    twin: Option<usize>,
) -> Result<Launch> {
    let words = map_words(op, &mut kernel, shape, inputs, outputs, scalars)?;
    let views: Vec<Layout> = inputs.iter().chain(outputs).cloned().collect();
    let info = KernelInfo::new("map", map_name(&kernel), map_bytes(&kernel, shape.numel()), 0);
    let x4 = codegen::vectorisable(&kernel, shape.numel(), &views) && twin.is_none_or(|n| n.is_multiple_of(4));
    let grid = device.grid_1d(if x4 { shape.numel() as u64 / 4 } else { shape.numel() as u64 })?;
    let (dtypes, written, offset_words) = map_operands(&kernel);
    let template = Template::Map { kernel, x4 };
    Ok(Launch { label: op, template, words, grid, info, dtypes, written, offset_words, in_place: Vec::new() })
}

/// Runs an elementwise kernel over `out_shape`, broadcasting every input to
/// it, and returns one new contiguous tensor per kernel output.
pub(crate) fn map(
    op: &'static str,
    kernel: MapKernel,
    inputs: &[&Tensor],
    scalars: &[f64],
    out_shape: &Shape,
    device: &Device,
) -> Result<Vec<Tensor>> {
    crate::layout::check_shape(op, out_shape)?;
    if trace::is_active() {
        return trace::map(op, kernel, inputs, scalars, out_shape, device);
    }
    check_same_device(op, device, inputs)?;
    let outputs = kernel
        .outputs
        .iter()
        .map(|(node, _)| Tensor::empty(out_shape.clone(), kernel.dtype(*node), device))
        .collect::<Result<Vec<_>>>()?;
    let views = inputs
        .iter()
        .zip(&kernel.inputs)
        .map(|(t, (_, access))| match access {
            Access::Gathered => Ok(t.layout().clone()),
            _ => t.layout().broadcast_to(op, out_shape),
        })
        .collect::<Result<Vec<_>>>()?;
    if out_shape.numel() == 0 {
        return Ok(outputs);
    }
    // Deferred: the op joins the device's pending elementwise group.
    device.defer_map(MapOp {
        label: op,
        kernel: &kernel,
        inputs: inputs.iter().zip(views).map(|(t, v)| Ok((t.pooled()?.clone(), v))).collect::<Result<_>>()?,
        outputs: outputs.iter().map(|t| t.pooled().cloned()).collect::<Result<_>>()?,
        scalars,
        shape: out_shape,
    })?;
    Ok(outputs)
}

/// A new tensor of `shape` assembled from `pieces`, each copied into the
/// window `(dim, start)` of its own length; the rest is zero when `zero_fill`.
/// (`cat` and the gradient of `narrow`.)
pub(crate) fn assemble(
    op: &'static str,
    shape: &Shape,
    dtype: DType,
    device: &Device,
    pieces: &[(&Tensor, usize, usize)],
    zero_fill: bool,
) -> Result<Tensor> {
    if trace::is_active() {
        return trace::assemble(shape, dtype, device, pieces, zero_fill);
    }
    let out = if zero_fill {
        Tensor::zeros(shape.clone(), dtype, device)?
    } else {
        Tensor::empty(shape.clone(), dtype, device)?
    };
    for (t, dim, start) in pieces {
        check_same_device(op, device, &[t])?;
        let window = out.layout().narrow(*dim, *start, t.dims()[*dim]);
        if window.numel() == 0 {
            continue;
        }
        let launch = map_launch(
            device,
            op,
            MapKernel::copy(dtype),
            &window.shape,
            std::slice::from_ref(t.layout()),
            std::slice::from_ref(&window),
            &[],
        )?;
        launch.dispatch(device, &[t.operand()?, out.operand()?])?;
    }
    Ok(out)
}

/// How many chunks a reduction of `k` elements of `kernel` into `a`
/// results is split into: enough that invocations run in parallel, and
/// enough that no invocation loops past the [`super::LOOP_BUDGET`]. Each
/// step folds one element (one back-edge), and evaluating it may loop too:
/// up to `MAX_RANK` times per input read through a strided view (the rank
/// loop of `strided()`; any input may be), and the loop of each segment sum.
pub(crate) fn reduce_chunks(a: usize, k: usize, kernel: &MapKernel) -> usize {
    const TARGET_THREADS: usize = 1 << 14;
    const MIN_CHUNK: usize = 64;
    // A short reduction is one pass: a second kernel costs more than an
    // invocation folding a few hundred elements (a column sum over a
    // batch, a loss summed over rows), unless each element is much work
    // (a fused step's whole forward and backward) and few invocations run.
    const ONE_PASS: usize = 256;
    let cost = kernel.nodes.len().max(1);
    let min_chunk = (MIN_CHUNK * 8 / cost).clamp(4, MIN_CHUNK);
    let one_pass = k <= ONE_PASS && (a >= 64 || cost <= 16);
    // A costly element (a fused step's forward and backward) spreads over
    // more invocations, each folding fewer: W2's step (40 nodes, 2^20
    // elements) took 9.0 ms folding 16 vec4s per invocation and 4.8 ms
    // folding 3-4 (lavapipe on a Zen 5 EPYC, `scripts/bench-ab.sh`); the
    // cheap reductions of the other workloads did not move.
    let target = TARGET_THREADS * (cost / 8).clamp(1, 8);
    let parallel = if a >= TARGET_THREADS || k <= min_chunk || one_pass || a == 0 {
        1
    } else {
        k.div_ceil(min_chunk).min(target.div_ceil(a)).max(1)
    };
    let segments = kernel.nodes.iter().filter(|(n, _)| matches!(n, Node::SegmentSum { .. })).count();
    let per_step = 1 + kernel.inputs.len() * MAX_RANK + segments * (super::SEGMENT_CHUNK + 1);
    let max_steps = (super::LOOP_BUDGET / per_step).max(1);
    parallel.max(k.div_ceil(max_steps))
}

/// The iteration view of a reduction: `layout` permuted so the kept axes
/// come first and the reduced axes last, with the sizes `a` (kept) and `k`
/// (reduced).
pub(crate) fn reduce_view(layout: &Layout, axes: &[usize]) -> (Layout, usize, usize) {
    let dims = layout.shape.dims();
    let mut perm: Vec<usize> = (0..dims.len()).filter(|i| !axes.contains(i)).collect();
    perm.extend_from_slice(axes);
    // Both from the dims, not numel / k: with an empty reduced axis (k = 0)
    // the kept part still has `a` outputs, each the reduction's identity.
    let k: usize = axes.iter().map(|&i| dims[i]).product();
    let a: usize = (0..dims.len()).filter(|i| !axes.contains(i)).map(|i| dims[i]).product();
    (layout.permute(&perm), a, k)
}

/// The first pass of a reduction: `kernel` (one output node, the value
/// reduced) evaluated over the [a, k] iteration `shape`, reduced into
/// `a * n_chunks` partial results. `twin` is the [a, k] of the same
/// reduction at another batch size of a program's family: a four-wide
/// form that needs a multiple of 4 is taken only where both sizes are one,
/// so the family's sizes share one kernel (a compiled program).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reduce_launch(
    device: &Device,
    kind: ReduceKind,
    mut kernel: MapKernel,
    shape: &Shape,
    inputs: &[Layout],
    scalars: &[f64],
    a: usize,
    k: usize,
    n_chunks: usize,
    reduced: usize,
    twin: Option<(usize, usize)>,
) -> Result<Launch> {
    // Outputs 0..reduced are the reductions' (partial) results; any others
    // are values of the iteration's shape stored as it walks them.
    let outs = vec![Layout::contiguous(shape.clone()); kernel.outputs.len()];
    let mut words = map_words("reduce", &mut kernel, shape, inputs, &outs, scalars)?;
    split_planar_reads(&mut kernel, &mut words, inputs, a, k);
    let views: Vec<Layout> = inputs.iter().chain(&outs).cloned().collect();
    // Reads every element of the [a, k] iteration, writes a * n_chunks
    // results (and each side output whole).
    let fused = format!("{:?} of {}", kind, map_name(&kernel)).to_lowercase();
    let per: Vec<u64> = kernel.outputs.iter().map(|(n, _)| kernel.dtype(*n).size_in_bytes() as u64).collect();
    let own: u64 = per[..reduced].iter().map(|b| b * (a * n_chunks) as u64).sum();
    let side: u64 = per[reduced..].iter().map(|b| b * (a * k) as u64).sum();
    let fused = match reduced {
        1 => fused,
        n => format!("{n} {fused}"),
    };
    let info = KernelInfo::new("reduce", fused, input_bytes(&kernel, a * k) + own + side, 0);
    let k4 = k.is_multiple_of(4) && twin.is_none_or(|(_, tk)| tk.is_multiple_of(4));
    let a4 = twin.is_none_or(|(ta, _)| ta.is_multiple_of(4));
    let form = if reduced == 1 && k4 && codegen::vectorisable(&kernel, a * k, &views) {
        ReduceForm::Vec4
    } else if a4 {
        column_reads(&kernel, &words, a).map_or(ReduceForm::Elements, ReduceForm::Columns)
    } else {
        ReduceForm::Elements
    };
    let (grid, template_words) = match form {
        ReduceForm::Elements => (device.grid_1d((a * n_chunks) as u64)?, codegen::reduce_words(a, k, n_chunks)),
        ReduceForm::Vec4 => (device.grid_1d((a * n_chunks) as u64)?, codegen::reduce_words(a, k / 4, n_chunks)),
        ReduceForm::Columns(_) => {
            (device.grid_of((a / 4 * n_chunks) as u64, 64)?, codegen::reduce_words(a / 4, k, n_chunks))
        }
    };
    words.extend_from_slice(&template_words);
    let (dtypes, written, offset_words) = map_operands(&kernel);
    let template = Template::Reduce { kernel, kind, form, reduced };
    Ok(Launch { label: "reduce", template, words, grid, info, dtypes, written, offset_words, in_place: Vec::new() })
}

/// Reads a reduction's [`Access::Planar`] inputs as [`Access::Split`]
/// where the view is affine in (a, kk) over the [a, k] iteration: its
/// inner run is a row (`n == k`), or one run spans the whole iteration.
fn split_planar_reads(kernel: &mut MapKernel, words: &mut [u32], inputs: &[Layout], a: usize, k: usize) {
    for (j, view) in inputs.iter().enumerate() {
        if kernel.inputs[j].1 != Access::Planar {
            continue;
        }
        let split = match planar(view) {
            Some((outer, inner, n)) if n == k => Some((outer, inner)),
            Some((_, inner, n)) if n >= a * k => Some((k * inner, inner)),
            _ => None,
        };
        if let Some((sa, sk)) = split {
            let b = view_base(j);
            words[b + 1..b + 4].copy_from_slice(&[sa as u32, sk as u32, 0]);
            kernel.inputs[j].1 = Access::Split;
        }
    }
}

/// How a reduction over `a` results reads each input four results at a
/// time ([`ReduceForm::Columns`]), or `None` when no input has four
/// neighbouring results reading neighbouring, vec4-aligned elements (the
/// form would only cut parallelism). `words` are the elementwise words, with
/// [`Access::Split`] views as (offset, sa, sk).
fn column_reads(kernel: &MapKernel, words: &[u32], a: usize) -> Option<Vec<codegen::ColumnRead>> {
    use codegen::ColumnRead;
    // (A strided read loops over the rank, four times a step here, which
    // `reduce_chunks` budgets once.)
    let strided = kernel.inputs.iter().any(|(_, access)| *access == Access::Strided);
    if !a.is_multiple_of(4) || strided || kernel.nodes.iter().any(|(n, _)| matches!(n, Node::SegmentSum { .. })) {
        return None;
    }
    let reads: Vec<ColumnRead> = (0..kernel.inputs.len())
        .map(|j| {
            let b = view_base(j);
            match kernel.inputs[j].1 {
                Access::Broadcast => ColumnRead::Once,
                Access::Split if words[b + 1] == 0 => ColumnRead::Once,
                Access::Split if words[b + 1] == 1 && words[b].is_multiple_of(4) && words[b + 2].is_multiple_of(4) => {
                    ColumnRead::Vec4
                }
                _ => ColumnRead::PerResult,
            }
        })
        .collect();
    reads.contains(&ColumnRead::Vec4).then_some(reads)
}

/// A row kernel over `a` rows of `k` elements: `inputs` and `outputs` are
/// two-dimensional [a, k] views (a row stride and an element stride; a
/// row-uniform value has element stride 0), `passes` loops of `k` per row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_launch(
    device: &Device,
    mut kernel: MapKernel,
    a: usize,
    k: usize,
    passes: usize,
    inputs: &[Layout],
    outputs: &[Layout],
    scalars: &[f64],
) -> Result<Launch> {
    let shape = Shape::new([a, k]);
    let mut words = map_words("rows", &mut kernel, &shape, inputs, outputs, scalars)?;
    // The row template reads every (non-gathered) view as offset, row
    // stride, element stride, whatever access `map_words` chose.
    for (o, view) in inputs.iter().chain(outputs).enumerate() {
        let gathered = kernel.inputs.get(o).is_some_and(|(_, a)| *a == Access::Gathered);
        if !gathered {
            let b = view_base(o);
            words[b..b + 3].copy_from_slice(&[view.offset as u32, view.strides[0] as u32, view.strides[1] as u32]);
        }
    }
    let uniform_io = inputs.iter().chain(outputs).map(|l| l.strides.get(1) == Some(&0) || k == 1).collect::<Vec<_>>();
    let bytes = |views: &[Layout], dtypes: &mut dyn Iterator<Item = DType>| -> u64 {
        views
            .iter()
            .zip(dtypes)
            .map(|(l, d)| (if l.strides.get(1) == Some(&0) { a } else { a * k } * d.size_in_bytes()) as u64)
            .sum()
    };
    let read = bytes(inputs, &mut kernel.inputs.iter().map(|(d, _)| *d));
    let written = bytes(outputs, &mut kernel.outputs.iter().map(|(n, _)| kernel.dtype(*n)));
    let info = KernelInfo::new("rows", format!("{} ({passes} passes)", map_name(&kernel)), read + written, 0);
    let form = match device.row_form() {
        codegen::RowForm::PerInvocation if rows_of_vec4s(&kernel, &uniform_io, a, k, inputs, outputs) => {
            codegen::RowForm::PerInvocationVec4
        }
        form => form,
    };
    let grid = match form {
        codegen::RowForm::PerInvocation | codegen::RowForm::PerInvocationVec4 => {
            device.grid_of(a as u64, codegen::ROWS_PER_GROUP)?
        }
        codegen::RowForm::Workgroup { size: n, .. } => device.grid_of(a as u64 * n as u64, n)?,
    };
    let (dtypes, written, offset_words) = map_operands(&kernel);
    let template = Template::Rows { kernel, uniform_io, form };
    Ok(Launch { label: "rows", template, words, grid, info, dtypes, written, offset_words, in_place: Vec::new() })
}

/// Whether a row kernel can step four elements at a time
/// ([`codegen::RowForm::PerInvocationVec4`]): rows of a multiple of 4, and
/// every element-varying view contiguous along the row with each row's
/// start a multiple of 4 elements (allocations start at multiples of 4).
fn rows_of_vec4s(
    kernel: &MapKernel,
    uniform_io: &[bool],
    a: usize,
    k: usize,
    inputs: &[Layout],
    outputs: &[Layout],
) -> bool {
    let aligned = |view: &Layout| {
        view.strides[1] == 1 && view.offset.is_multiple_of(4) && (a == 1 || view.strides[0].is_multiple_of(4))
    };
    k.is_multiple_of(4)
        && !kernel.nodes.iter().any(|(n, _)| matches!(n, Node::SegmentSum { .. }))
        && inputs.iter().chain(outputs).enumerate().all(|(o, view)| {
            let gathered = kernel.inputs.get(o).is_some_and(|(_, a)| *a == Access::Gathered);
            gathered || uniform_io[o] || aligned(view)
        })
}

/// Reduces `x` over `axes` (sorted, distinct, in range).
pub(crate) fn reduce(kind: ReduceKind, x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    if trace::is_active() {
        return trace::reduce(kind, x, axes, keepdim);
    }
    let dims = x.shape().dims();
    let out_dims: Vec<usize> = if keepdim {
        dims.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect()
    } else {
        dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
    };
    let (view, a, k) = reduce_view(x.layout(), axes);
    let out = reduce_pass(kind, MapKernel::copy(x.dtype()), &[x], &view, &[], a, k)?;
    Ok(out.reshape_view(Shape::new(out_dims)))
}

/// The dtype a reduction of `dtype` keeps its partial results in between
/// passes: its accumulator's (f16 sums' partials are f32, so partials
/// that overflow f16 and cancel later still give PyTorch's sum).
pub(crate) fn partial_dtype(dtype: DType, kind: ReduceKind) -> DType {
    codegen::accumulator(dtype, kind)
}

/// `kernel` (a reduction's first pass) with its reduced value, output 0,
/// converted to `dtype` before it is stored (its partials' dtype).
pub(crate) fn with_partial_dtype(mut kernel: MapKernel, dtype: DType) -> MapKernel {
    let out = kernel.outputs[0].0;
    if kernel.dtype(out) != dtype {
        kernel.outputs[0].0 = kernel.push(Node::Cast(out), dtype);
    }
    kernel
}

/// Reduces `kernel` evaluated over the [a, k] iteration `view` (of which
/// `inputs[0]` supplies the layouts' buffer), in as many passes as needed.
fn reduce_pass(
    kind: ReduceKind,
    kernel: MapKernel,
    inputs: &[&Tensor],
    view: &Layout,
    scalars: &[f64],
    a: usize,
    k: usize,
) -> Result<Tensor> {
    let device = inputs[0].device();
    let dtype = kernel.dtype(kernel.outputs[0].0);
    let n_chunks = reduce_chunks(a, k, &kernel);
    if n_chunks > 1 && partial_dtype(dtype, kind) != dtype {
        // Partials in the accumulator's dtype, the result rounded once.
        let wide = partial_dtype(dtype, kind);
        let sum = reduce_pass(kind, with_partial_dtype(kernel, wide), inputs, view, scalars, a, k)?;
        return sum.to_dtype(dtype);
    }
    let out = Tensor::empty(Shape::new([a * n_chunks]), dtype, device)?;
    if a * n_chunks > 0 {
        let layouts = vec![view.clone(); inputs.len()];
        let launch = reduce_launch(device, kind, kernel, &view.shape, &layouts, scalars, a, k, n_chunks, 1, None)?;
        let mut operands = inputs.iter().map(|t| t.operand()).collect::<Result<Vec<_>>>()?;
        operands.push(out.operand()?);
        launch.dispatch(device, &operands)?;
    }
    if n_chunks == 1 {
        return Ok(out);
    }
    let partials = Layout::contiguous(Shape::new([a, n_chunks]));
    reduce_pass(kind, MapKernel::copy(dtype), &[&out], &partials, &[], a, n_chunks)
}

/// Collapses a batch of views into one stride, if the dims allow it.
pub(crate) fn batch_stride(layout: &Layout, batch_rank: usize) -> Option<usize> {
    let dims = &layout.shape.dims()[..batch_rank];
    let strides = &layout.strides[..batch_rank];
    let mut stride = None;
    for i in (0..batch_rank).rev() {
        if dims[i] == 1 {
            continue;
        }
        match stride {
            None => stride = Some((strides[i], strides[i] * dims[i])),
            Some((s, next)) => {
                if strides[i] != next && !(s == 0 && strides[i] == 0) {
                    return None;
                }
                stride = Some((s, strides[i] * dims[i]));
            }
        }
    }
    Some(stride.map_or(0, |(s, _)| s))
}

/// The plain epilogue: store the product as it is.
pub(crate) fn identity_epilogue(dtype: DType) -> MapKernel {
    let mut k = MapKernel::default();
    let acc = k.push(Node::Arg, dtype);
    k.output(acc);
    k
}

/// The launches (more than one only when the grid exceeds the dispatch
/// limit) of `a` [.., m, k] @ `b` [.., k, n] into a contiguous result of
/// `out_shape`, with `a` and `b` already broadcast to the batch and their
/// batch dims collapsible (see [`batch_stride`]). `epilogue` reads its
/// inputs through `epilogue_inputs` (views of `out_shape`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_launches(
    device: &Device,
    mut epilogue: MapKernel,
    epilogue_inputs: &[Layout],
    scalars: &[f64],
    la: &Layout,
    lb: &Layout,
    out_shape: &Shape,
) -> Result<Vec<Launch>> {
    let r = out_shape.rank() - 2;
    let (m, n) = (out_shape.dims()[r], out_shape.dims()[r + 1]);
    let k = la.shape.dims()[r + 1];
    let batch_count: usize = out_shape.dims()[..r].iter().product();
    let (a_batch, b_batch) = match (batch_stride(la, r), batch_stride(lb, r)) {
        (Some(x), Some(y)) => (x, y),
        _ => {
            return Err(Error::InvalidArgument {
                op: "matmul",
                message: "internal: operands must have collapsible batch dims".into(),
            });
        }
    };
    let dtype = epilogue.dtype(epilogue.outputs[0].0);
    // The product (through the epilogue's first output), then any other
    // values the epilogue stores, each contiguous of the product's shape.
    let outs = vec![Layout::contiguous(out_shape.clone()); epilogue.outputs.len()];
    let words = map_words("matmul", &mut epilogue, out_shape, epilogue_inputs, &outs, scalars)?;
    let template = device.matmul_template();
    let (mut dtypes, mut written, mut offset_words) = map_operands(&epilogue);
    let m_base = codegen::param_words(&epilogue);
    dtypes.extend([dtype, dtype]);
    written.extend([false, false]);
    offset_words.extend([m_base + 3, m_base + 7]);
    let max = device.inner.limits.max_compute_workgroups_per_dimension as usize;
    let (tile_m, tile_n) = template.tile();
    let (gx, gy, gz) = (n.div_ceil(tile_n), m.div_ceil(tile_m), batch_count);
    // A and B once each (a lower bound: tiles re-read them), the epilogue's
    // inputs and the result once.
    let size = dtype.size_in_bytes() as u64;
    let operands = (batch_count * (m * k + k * n)) as u64 * size;
    let fused = match epilogue.describe().as_str() {
        "" => "matmul".to_string(),
        epilogue => format!("matmul, then {epilogue}"),
    };
    let flops = 2 * (batch_count as u64) * (m as u64) * (n as u64) * (k as u64);
    let info = KernelInfo::new("matmul", fused, operands + map_bytes(&epilogue, out_shape.numel()), flops);
    let mut launches = Vec::new();
    for bz in (0..gz).step_by(max) {
        for by in (0..gy).step_by(max) {
            for bx in (0..gx).step_by(max) {
                let mut w = words.clone();
                let template_words: [u32; codegen::MATMUL_WORDS] = [
                    m as u32,
                    n as u32,
                    k as u32,
                    la.offset as u32,
                    a_batch as u32,
                    la.strides[r] as u32,
                    la.strides[r + 1] as u32,
                    lb.offset as u32,
                    b_batch as u32,
                    lb.strides[r] as u32,
                    lb.strides[r + 1] as u32,
                    bx as u32,
                    by as u32,
                    bz as u32,
                ];
                w.extend_from_slice(&template_words);
                let grid = [(gx - bx).min(max) as u32, (gy - by).min(max) as u32, (gz - bz).min(max) as u32];
                // Each launch of a split grid carries its share of the estimates.
                let share = |v: u64| {
                    let part = grid.iter().map(|&g| g as u64).product::<u64>();
                    let whole = (gx * gy * gz) as u64;
                    (v as u128 * part as u128 / whole.max(1) as u128) as u64
                };
                let info = KernelInfo { bytes: share(info.bytes), flops: share(info.flops), ..info.clone() };
                launches.push(Launch {
                    label: "matmul",
                    template: Template::Matmul { epilogue: epilogue.clone(), dtype, template },
                    words: w,
                    grid,
                    info,
                    dtypes: dtypes.clone(),
                    written: written.clone(),
                    offset_words: offset_words.clone(),
                    in_place: Vec::new(),
                });
            }
        }
    }
    Ok(launches)
}

/// `a @ b` for a contraction longer than [`super::MATMUL_K_CHUNK`]: the
/// product of each run of k, summed in order (split-K), so no kernel loops
/// past the loop budget. In a trace the partial products are ordinary
/// matmuls and adds, so fusion makes each add the next product's epilogue.
fn split_k_product(a: &Tensor, b: &Tensor, batch: &Shape) -> Result<Tensor> {
    let r = batch.rank();
    let k = a.dims()[r + 1];
    let mut total: Option<Tensor> = None;
    for start in (0..k).step_by(super::MATMUL_K_CHUNK) {
        let len = super::MATMUL_K_CHUNK.min(k - start);
        let a_run = a.with_layout(a.layout().narrow(r + 1, start, len));
        let b_run = b.with_layout(b.layout().narrow(r, start, len));
        let part = matmul(&a_run, &b_run, batch)?;
        // The runs carry no autograd history, so `add` records nothing.
        total = Some(match total {
            None => part,
            Some(sum) => sum.add(&part)?,
        });
    }
    Ok(total.expect("a split contraction has at least one run"))
}

/// The operands of `a` [..., m, k] @ `b` [..., k, n] broadcast to `batch`,
/// copied only when their batch dims cannot be walked with one stride.
pub(crate) fn matmul_operands(a: &Tensor, b: &Tensor, batch: &Shape) -> Result<(Tensor, Tensor)> {
    let operand = |t: &Tensor| -> Result<Tensor> {
        let r = t.rank();
        let mut dims = batch.dims().to_vec();
        dims.extend_from_slice(&t.dims()[r - 2..]);
        let view = t.with_layout(t.layout().broadcast_to("matmul", &Shape::new(dims))?);
        match batch_stride(view.layout(), batch.rank()) {
            Some(_) => Ok(view),
            None => view.contiguous_copy(),
        }
    };
    Ok((operand(a)?, operand(b)?))
}

/// `a @ b` as an outer product when one operand is constant along the
/// contraction dim (stride 0 over k, k > 1): `a[i, k] = u[i]` gives
/// `u[i] · Σ_k b[k, j]`, and likewise for `b`. This is what flows back
/// through a matmul whose output was summed or averaged (the gradient is a
/// broadcast), so those backward products cost a reduction, not m·n·k
/// multiply-adds. `None` when neither operand qualifies.
fn rank_one_product(a: &Tensor, b: &Tensor, r: usize) -> Result<Option<Tensor>> {
    let k = a.dims()[r + 1];
    if k <= 1 {
        return Ok(None);
    }
    // Internal arithmetic: nothing here is recorded for autograd.
    let _no_grad = crate::autograd::no_grad();
    if a.layout().strides[r + 1] == 0 {
        let u = a.narrow(-1, 0, 1)?;
        return Ok(Some(u.mul(&b.sum(&[-2], true)?)?));
    }
    if b.layout().strides[r] == 0 {
        let v = b.narrow(-2, 0, 1)?;
        return Ok(Some(a.sum(&[-1], true)?.mul(&v)?));
    }
    Ok(None)
}

/// `a` [..., m, k] @ `b` [..., k, n] with broadcast batch dims (the op layer
/// has promoted vectors to matrices and checked shapes).
pub(crate) fn matmul(a: &Tensor, b: &Tensor, batch: &Shape) -> Result<Tensor> {
    let device = a.device();
    check_same_device("matmul", device, &[b])?;
    let (a, b) = matmul_operands(a, b, batch)?;
    let mut out_dims = batch.dims().to_vec();
    out_dims.extend([a.dims()[batch.rank()], b.dims()[batch.rank() + 1]]);
    let out_shape = Shape::new(out_dims);
    if let Some(out) = rank_one_product(&a, &b, batch.rank())? {
        return Ok(out);
    }
    if a.dims()[batch.rank() + 1] > super::MATMUL_K_CHUNK {
        return split_k_product(&a, &b, batch);
    }
    if trace::is_active() {
        return trace::matmul(&a, &b, &out_shape);
    }
    let out = Tensor::empty(out_shape.clone(), a.dtype(), device)?;
    if out_shape.numel() == 0 {
        return Ok(out);
    }
    let epilogue = identity_epilogue(a.dtype());
    for launch in matmul_launches(device, epilogue, &[], &[], a.layout(), b.layout(), &out_shape)? {
        launch.dispatch(device, &[out.operand()?, a.operand()?, b.operand()?])?;
    }
    Ok(out)
}
