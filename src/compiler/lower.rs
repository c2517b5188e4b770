//! Lowering: the memory plan (which buffer each value lives in) and the
//! launches of every step, with pipelines created and sizes packed into
//! one uniform buffer, ready to replay.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::alloc::size_class;
use crate::compiler::fusion::{Step, stored_layout};
use crate::compiler::ir::{CapturedGraph, IrOp, OutputRole, ValueId};
use crate::compiler::runtime::{Action, Buf, Dispatch, Program, ProgramReport};
use crate::device::Device;
use crate::error::Result;
use crate::exec::ReduceKind;
use crate::exec::kernel::{Access, MapKernel, Node};
use crate::exec::{self, Launch};
use crate::layout::Layout;
use crate::metadata::{DType, Shape};

/// What the plan places: a stored intermediate, or the partial results of
/// pass `p` of the chunked reduction at step `s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Need {
    Value(ValueId),
    Partial(usize, usize),
}

/// Buffers for the program's intermediates, planned for the whole program
/// at once from each one's interval of steps (stored at `start`, last read
/// at `end`), largest first: an intermediate borrows the buffer of an
/// output that is written only after it is dead (and that no other borrower
/// holds meanwhile), or gets the lowest offset in its dtype's arena where
/// it overlaps no intermediate live at the same time. A dtype's values
/// share one buffer of the program, or several where one would exceed what
/// a binding may span; offsets are 256-byte aligned.
#[derive(Default)]
struct BufferPlan {
    /// Per program buffer: its dtype and size in bytes, at most
    /// `max_bytes` (what one binding may span) unless one value is larger.
    arenas: Vec<(DType, u64)>,
    max_bytes: u64,
    /// Per slot: arena, byte offset, bytes, and its interval of steps.
    places: Vec<(usize, u64, u64, usize, usize)>,
    /// Per output buffer: size, dtype, the step that first writes it, shape.
    outputs: Vec<(u64, DType, usize)>,
    /// Per output buffer: its shape, and at the twin batch size.
    output_shapes: Vec<(Shape, Option<Shape>)>,
    borrowers: Vec<Vec<(usize, usize)>>,
}

/// Which outputs an intermediate may borrow. Which operands share a buffer
/// decides a kernel's bindings, and so its pipeline: borrowing must not
/// come and go with sizes (a new batch size would compile pipelines). A
/// value borrows an output of its own shape (at the twin batch size too,
/// for a program that serves a family of batch sizes: a [B, 512]
/// intermediate and a [10, 512] gradient have one shape only at B = 10);
/// a reduction's partial results (at most a few hundred KiB) an output of
/// at least [`LARGE_OUTPUT`].
enum Lend<'a> {
    Shape(&'a Shape, Option<&'a Shape>),
    Large,
}

const LARGE_OUTPUT: u64 = 1 << 20;

fn overlaps(busy: &[(usize, usize)], start: usize, end: usize) -> bool {
    busy.iter().any(|&(s, e)| s <= end && start <= e)
}

impl BufferPlan {
    fn place(&mut self, bytes: u64, dtype: DType, start: usize, end: usize, lend: Lend<'_>) -> Buf {
        let lendable = (0..self.outputs.len()).filter(|&f| {
            let (size, d, first) = self.outputs[f];
            let fits = match lend {
                Lend::Shape(shape, twin) => {
                    self.output_shapes[f].0 == *shape && self.output_shapes[f].1.as_ref() == twin
                }
                Lend::Large => size >= LARGE_OUTPUT,
            };
            first > end && d == dtype && size >= bytes && fits && !overlaps(&self.borrowers[f], start, end)
        });
        if let Some(f) = lendable.min_by_key(|&f| (self.outputs[f].0, f)) {
            self.borrowers[f].push((start, end));
            return Buf::Fresh(f);
        }
        self.slot(bytes, dtype, start, end)
    }

    fn slot(&mut self, bytes: u64, dtype: DType, start: usize, end: usize) -> Buf {
        let len = bytes.max(1).next_multiple_of(256);
        // The lowest free offset in the first of the dtype's buffers where
        // the value fits within the largest buffer one binding may span.
        let mut found = None;
        for arena in (0..self.arenas.len()).filter(|&a| self.arenas[a].0 == dtype) {
            let mut taken: Vec<(u64, u64)> =
                self.places.iter().filter(|p| p.0 == arena && p.3 <= end && start <= p.4).map(|p| (p.1, p.2)).collect();
            taken.sort_unstable();
            let mut offset = 0;
            for (o, l) in taken {
                if offset + len <= o {
                    break;
                }
                offset = offset.max(o + l);
            }
            if offset + len <= self.max_bytes || offset == 0 {
                found = Some((arena, offset));
                break;
            }
        }
        let (arena, offset) = found.unwrap_or_else(|| {
            self.arenas.push((dtype, 0));
            (self.arenas.len() - 1, 0)
        });
        self.arenas[arena].1 = self.arenas[arena].1.max(offset + len);
        self.places.push((arena, offset, len, start, end));
        Buf::Slot(self.places.len() - 1)
    }
}

/// The partial-result buffers a chunked reduction of `a` results over `k`
/// needs, pass by pass (the elements of each pass's output that is not
/// the reduction's own value, and for a widened f16 sum the `a` sums
/// before they are cast), and their dtype (the accumulator's when the
/// reduction is chunked).
fn reduce_partials(a: usize, k: usize, kernel: &MapKernel, kind: ReduceKind, dtype: DType) -> (Vec<usize>, DType) {
    let mut sizes = Vec::new();
    let mut chunks = exec::reduce_chunks(a, k, kernel);
    let partial = if chunks > 1 { exec::partial_dtype(dtype, kind) } else { dtype };
    while chunks > 1 {
        sizes.push(a * chunks);
        chunks = exec::reduce_chunks(a, chunks, &MapKernel::copy(partial));
    }
    if partial != dtype {
        // The sum in the partials' dtype, before it is rounded into the value.
        sizes.push(a);
    }
    (sizes, partial)
}

fn bytes_of(g: &CapturedGraph, v: ValueId) -> u64 {
    let m = &g.values[v].meta;
    (m.shape.numel() * m.dtype.size_in_bytes()) as u64
}

struct Lowering<'a> {
    device: &'a Device,
    g: &'a CapturedGraph,
    /// The graph at the family's other batch size (see [`lower`]).
    twin: Option<&'a CapturedGraph>,
    bufs: HashMap<ValueId, Buf>,
    plan: BufferPlan,
    partials: HashMap<Need, Buf>,
    fresh_bytes: Vec<(u64, DType)>,
    uniform: Vec<u8>,
    actions: Vec<Action>,
    sources: Vec<String>,
    hooks: usize,
    /// The step being lowered.
    at: usize,
}

impl Lowering<'_> {
    /// The planned buffer of pass `pass`'s partial results at this step
    /// (a buffer of its own should the plan not have foreseen it).
    fn partial(&mut self, pass: usize, bytes: u64, dtype: DType) -> Buf {
        match self.partials.get(&Need::Partial(self.at, pass)) {
            Some(&buf) => buf,
            None => {
                let at = self.at;
                self.plan.slot(bytes, dtype, at, at)
            }
        }
    }

    fn fresh(&mut self, bytes: u64, dtype: DType) -> Buf {
        self.fresh_bytes.push((bytes, dtype));
        Buf::Fresh(self.fresh_bytes.len() - 1)
    }

    fn buf(&self, v: ValueId) -> Buf {
        match self.g.values[v].op {
            IrOp::Input { slot } => Buf::Input(slot),
            _ => self.bufs[&v],
        }
    }

    fn push(&mut self, launch: Launch, bufs: Vec<Buf>) -> Result<()> {
        // The pipeline of the usual binding pattern is created now, so
        // shader errors surface when compiling: one arena per dtype, or,
        // without arenas, a buffer per program buffer. A replay whose
        // operands are spread otherwise renders its own.
        let source = if self.device.dedicated_bytes() > 0 {
            launch.typical_source()
        } else {
            // Slots in one arena are one buffer.
            let keys: Vec<Buf> = bufs
                .iter()
                .map(|b| match *b {
                    Buf::Slot(i) => Buf::Slot(usize::MAX - self.plan.places[i].0),
                    other => other,
                })
                .collect();
            launch.source(&crate::exec::bind::Binds::grouped(&keys, &launch.dtypes, &launch.written))
        };
        self.device.pipeline(launch.label, &source)?;
        let align = self.device.uniform_alignment();
        let offset = self.uniform.len().next_multiple_of(align);
        let bytes: &[u8] = bytemuck::cast_slice(&launch.words);
        let size = bytes.len().max(16).next_multiple_of(16);
        self.uniform.resize(offset, 0);
        self.uniform.extend_from_slice(bytes);
        self.uniform.resize(offset + size, 0);
        self.sources.push(source);
        self.actions.push(Action::Dispatch(Box::new(Dispatch {
            words: Mutex::new((self.device.failed_batches(), launch.words.clone())),
            launch,
            uniform_offset: offset as u64,
            uniform_size: size as u64,
            bufs,
            cached: Mutex::new(None),
        })));
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<()> {
        let device = self.device;
        match step {
            Step::Elementwise { shape, kernel, reads, scalars, stores, .. } => {
                if shape.numel() == 0 || stores.is_empty() {
                    return Ok(());
                }
                let layouts: Vec<Layout> = reads.iter().map(|u| u.layout.clone()).collect();
                let outs = vec![stored_layout(shape); stores.len()];
                let twin = self.twin.map(|t| stores.first().map_or(0, |&v| t.values[v].meta.shape.numel()));
                let mut launch =
                    exec::map_launch_sized(device, "fused", kernel.clone(), shape, &layouts, &outs, scalars, twin)?;
                let mut bufs: Vec<Buf> = reads.iter().map(|u| self.buf(u.value)).collect();
                bufs.extend(stores.iter().map(|&v| self.buf(v)));
                // A store into an input's buffer is an in-place update whose
                // reads of that input are at the stored element (see
                // `in_place_updates`).
                for w in reads.len()..bufs.len() {
                    if let Buf::Input(_) = bufs[w] {
                        launch.in_place.extend((0..reads.len()).filter(|&j| bufs[j] == bufs[w]).map(|j| (j, w)));
                    }
                }
                self.push(launch, bufs)
            }
            Step::Reduce { value, siblings, stores, kind, kernel, reads, scalars, shape, a, k, .. } => {
                let (a, k) = (*a, *k);
                if a == 0 {
                    return Ok(());
                }
                let layouts: Vec<Layout> = reads.iter().map(|u| u.layout.clone()).collect();
                let mut chunks = exec::reduce_chunks(a, k, kernel);
                let value_dtype = self.g.values[*value].meta.dtype;
                // Partials in the accumulator's dtype (f32 for an f16 sum),
                // the last pass's sum then rounded into the value.
                let dtype = if chunks > 1 { exec::partial_dtype(value_dtype, *kind) } else { value_dtype };
                let widened = dtype != value_dtype;
                let target = self.buf(*value);
                let elem = dtype.size_in_bytes() as u64;
                let mut pass = 0;
                let mut dst = if chunks == 1 { target } else { self.partial(pass, (a * chunks) as u64 * elem, dtype) };
                if !siblings.is_empty() && chunks != 1 {
                    return Err(crate::Error::InvalidArgument {
                        op: "compiled backward",
                        message: "internal: sibling reductions need one pass; this is a wgrad bug, please report it"
                            .into(),
                    });
                }
                let reduced = 1 + siblings.len();
                // The same reduction at the twin size: four-wide forms hold for both.
                let twin = self.twin.map(|t| match &t.values[*value].op {
                    IrOp::Reduce { src, axes, .. } => {
                        let (_, a, k) = crate::compiler::fusion::reduce_iteration(src, axes);
                        (a, k)
                    }
                    _ => (1, 1),
                });
                let first = match widened {
                    true => exec::with_partial_dtype(kernel.clone(), dtype),
                    false => kernel.clone(),
                };
                let launch =
                    exec::reduce_launch(device, *kind, first, shape, &layouts, scalars, a, k, chunks, reduced, twin)?;
                let mut bufs: Vec<Buf> = reads.iter().map(|u| self.buf(u.value)).collect();
                bufs.push(dst);
                bufs.extend(siblings.iter().map(|&v| self.buf(v)));
                bufs.extend(stores.iter().map(|&v| self.buf(v)));
                self.push(launch, bufs)?;
                while chunks > 1 {
                    let next = exec::reduce_chunks(a, chunks, &MapKernel::copy(dtype));
                    let src = dst;
                    pass += 1;
                    dst = match (next, widened) {
                        (1, false) => target,
                        (1, true) => self.partial(pass, a as u64 * elem, dtype),
                        _ => self.partial(pass, (a * next) as u64 * elem, dtype),
                    };
                    let partials = Layout::contiguous(Shape::new([a, chunks]));
                    let launch = exec::reduce_launch(
                        device,
                        *kind,
                        MapKernel::copy(dtype),
                        &partials.shape,
                        std::slice::from_ref(&partials),
                        &[],
                        a,
                        chunks,
                        next,
                        1,
                        // (Partial results: one element at a time in a family.)
                        self.twin.map(|_| (1, 1)),
                    )?;
                    self.push(launch, vec![src, dst])?;
                    chunks = next;
                }
                if widened {
                    let mut cast = MapKernel::default();
                    let x = cast.input(dtype);
                    let rounded = cast.push(Node::Cast(x), value_dtype);
                    cast.output(rounded);
                    let view = Layout::contiguous(Shape::new([a]));
                    let twin = self.twin.map(|_| 1);
                    let launch = exec::map_launch_sized(
                        device,
                        "cast",
                        cast,
                        &view.shape,
                        std::slice::from_ref(&view),
                        std::slice::from_ref(&view),
                        &[],
                        twin,
                    )?;
                    self.push(launch, vec![dst, target])?;
                }
                Ok(())
            }
            Step::Rows { a, k, passes, kernel, reads, scalars, stores, .. } => {
                if *a * *k == 0 || stores.is_empty() {
                    return Ok(());
                }
                let layouts: Vec<Layout> = reads.iter().map(|u| u.layout.clone()).collect();
                let outs: Vec<Layout> = stores
                    .iter()
                    .map(|&(_, uniform)| {
                        let strides = if uniform { vec![1, 0] } else { vec![*k, 1] };
                        Layout { shape: Shape::new([*a, *k]), strides, offset: 0 }
                    })
                    .collect();
                let launch = exec::rows_launch(device, kernel.clone(), *a, *k, *passes, &layouts, &outs, scalars)?;
                let mut bufs: Vec<Buf> = reads.iter().map(|u| self.buf(u.value)).collect();
                bufs.extend(stores.iter().map(|&(v, _)| self.buf(v)));
                self.push(launch, bufs)
            }
            Step::Matmul { value, stores, a, b, epilogue, reads, scalars, .. } => {
                let shape = &self.g.values[*value].meta.shape;
                if shape.numel() == 0 {
                    return Ok(());
                }
                let layouts: Vec<Layout> = reads.iter().map(|u| u.layout.clone()).collect();
                let launches =
                    exec::matmul_launches(device, epilogue.clone(), &layouts, scalars, &a.layout, &b.layout, shape)?;
                for mut launch in launches {
                    let mut bufs: Vec<Buf> = reads.iter().map(|u| self.buf(u.value)).collect();
                    bufs.push(self.buf(*value));
                    bufs.extend(stores.iter().map(|&v| self.buf(v)));
                    // An update stored into its parameter reads it only at
                    // the element it writes (see `in_place_updates`).
                    for w in reads.len()..bufs.len() {
                        if let Buf::Input(_) = bufs[w] {
                            launch.in_place.extend((0..reads.len()).filter(|&j| bufs[j] == bufs[w]).map(|j| (j, w)));
                        }
                    }
                    bufs.extend([self.buf(a.value), self.buf(b.value)]);
                    self.push(launch, bufs)?;
                }
                Ok(())
            }
            Step::Assemble { value, pieces, zero_fill } => {
                let meta = &self.g.values[*value].meta;
                let (shape, dtype) = (meta.shape.clone(), meta.dtype);
                let out = self.buf(*value);
                if *zero_fill && shape.numel() > 0 {
                    let mut k = MapKernel::default();
                    let zero = k.scalar(dtype);
                    k.output(zero);
                    let launch = exec::map_launch(device, "fill", k, &shape, &[], &[stored_layout(&shape)], &[0.0])?;
                    self.push(launch, vec![out])?;
                }
                for (u, dim, start) in pieces {
                    let window = stored_layout(&shape).narrow(*dim, *start, u.layout.shape.dims()[*dim]);
                    if window.numel() == 0 {
                        continue;
                    }
                    let launch = exec::map_launch(
                        device,
                        "copy",
                        MapKernel::copy(dtype),
                        &window.shape.clone(),
                        std::slice::from_ref(&u.layout),
                        &[window],
                        &[],
                    )?;
                    self.push(launch, vec![self.buf(u.value), out])?;
                }
                Ok(())
            }
            Step::Hook { value, src, point } => {
                let index = self.hooks;
                self.hooks += 1;
                self.bufs.insert(*value, Buf::Hooked(index));
                let meta = self.g.values[*value].meta.clone();
                let src_buf = self.buf(src.value);
                self.actions.push(Action::Hook {
                    point: *point,
                    src: src_buf,
                    layout: src.layout.clone(),
                    meta,
                    index,
                });
                Ok(())
            }
        }
    }
}

/// The in-place updates that can be stored straight into their input's
/// buffer instead of written back at the end: value -> input slot. An
/// update qualifies when an elementwise kernel computes it, nothing reads
/// the old contents after that kernel, and that kernel reads them only at
/// the element it writes (so each invocation reads before it overwrites).
/// The update's value is not a returned output (that would alias the
/// parameter). Later reads of the new value read the input's buffer.
fn in_place_updates(g: &CapturedGraph, steps: &[Step], escapes: &[bool]) -> HashMap<ValueId, usize> {
    let mut found = HashMap::new();
    for (v, role) in &g.outputs {
        let OutputRole::Assign(slot) = *role else { continue };
        if escapes[*v] {
            continue;
        }
        let Some(input) = g.values.iter().position(|x| matches!(x.op, IrOp::Input { slot: s } if s == slot)) else {
            continue;
        };
        let Some(at) = steps.iter().position(|s| s.stores().contains(v)) else { continue };
        let (shape, kernel, reads) = match &steps[at] {
            Step::Elementwise { shape, kernel, reads, .. } => (shape, kernel, reads),
            // A matmul epilogue's other output, when the product's operands
            // are not the parameter (each element is read and written by
            // one invocation, in whichever launch of a split grid).
            Step::Matmul { value, stores, epilogue, reads, a, b, .. }
                if stores.contains(v) && a.value != input && b.value != input =>
            {
                (&g.values[*value].meta.shape, epilogue, reads)
            }
            _ => continue,
        };
        let whole = Layout::contiguous(shape.clone());
        // In the storing kernel, every read of the old contents is at the
        // element being written: the whole view, and not a gathered binding
        // (which a `Gather` reads at computed offsets).
        let at_the_element = reads
            .iter()
            .zip(&kernel.inputs)
            .filter(|(u, _)| u.value == input)
            .all(|(u, (_, access))| u.layout == whole && *access != Access::Gathered);
        let safe = at_the_element
            && steps.iter().enumerate().all(|(i, s)| i <= at || s.reads().iter().all(|u| u.value != input));
        if safe && g.values[*v].meta.shape == *shape {
            found.insert(*v, slot);
        }
    }
    found
}

/// Plans memory for `steps` and builds the replayable program.
/// `twin` is the graph at another batch size when the program serves a
/// family of them (see [`Lend`]).
pub(crate) fn lower(
    device: &Device,
    g: &CapturedGraph,
    twin: Option<&CapturedGraph>,
    steps: &[Step],
    mut report: ProgramReport,
) -> Result<Program> {
    // Which values escape the program: outputs, and what hooks see. The
    // new contents of an input written back in place stay in program-owned
    // buffers until the write-back at the end.
    let mut escapes = vec![false; g.values.len()];
    let mut pinned = vec![false; g.values.len()];
    for (v, role) in &g.outputs {
        match role {
            OutputRole::Assign(_) => pinned[*v] = true,
            _ => escapes[*v] = true,
        }
    }
    for s in steps {
        if let Step::Hook { src, .. } = s {
            escapes[src.value] = true;
        }
    }
    let mut last_read = vec![0usize; g.values.len()];
    for (i, s) in steps.iter().enumerate() {
        for u in s.reads() {
            last_read[u.value] = i;
        }
    }
    for (v, &pin) in pinned.iter().enumerate() {
        if pin {
            last_read[v] = usize::MAX;
        }
    }
    let in_place = in_place_updates(g, steps, &escapes);
    let mut l = Lowering {
        device,
        g,
        twin,
        bufs: HashMap::new(),
        plan: BufferPlan { max_bytes: device.max_tensor_bytes(), ..BufferPlan::default() },
        partials: HashMap::new(),
        fresh_bytes: Vec::new(),
        uniform: Vec::new(),
        actions: Vec::new(),
        sources: Vec::new(),
        hooks: 0,
        at: 0,
    };
    // Every output the program hands back gets its buffer up front, with the
    // kernel that first writes it: until then an intermediate that is dead
    // by that kernel may borrow it (W3's forward product lives in a
    // gradient's buffer until the gradient is computed), so the program
    // holds no buffer of its own for it between calls.
    let mut fresh_of: HashMap<ValueId, Buf> = HashMap::new();
    let mut needs: Vec<(Need, usize, usize, u64, DType)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        if matches!(step, Step::Hook { .. }) {
            continue;
        }
        for v in step.stores() {
            let (bytes, dtype) = (bytes_of(g, v), g.values[v].meta.dtype);
            if in_place.contains_key(&v) || fresh_of.contains_key(&v) {
                continue;
            }
            if escapes[v] {
                fresh_of.insert(v, l.fresh(bytes, dtype));
                l.plan.outputs.push((bytes, dtype, i));
                let at_twin = twin.map(|t| t.values[v].meta.shape.clone());
                l.plan.output_shapes.push((g.values[v].meta.shape.clone(), at_twin));
                l.plan.borrowers.push(Vec::new());
            } else {
                needs.push((Need::Value(v), i, last_read[v].max(i), bytes, dtype));
            }
        }
        if let Step::Reduce { value, kernel, kind, a, k, .. } = step {
            let dtype = g.values[*value].meta.dtype;
            if *a > 0 {
                let (sizes, partial) = reduce_partials(*a, *k, kernel, *kind, dtype);
                for (pass, n) in sizes.into_iter().enumerate() {
                    needs.push((Need::Partial(i, pass), i, i, (n * partial.size_in_bytes()) as u64, partial));
                }
            }
        }
    }
    // The liveness bound: the most bytes live across any one step.
    let mut bound = 0u64;
    for i in 0..steps.len() {
        // (Intermediates at the 256-byte alignment any placement keeps.)
        let live: u64 = needs.iter().filter(|n| n.1 <= i && i <= n.2).map(|n| n.3.max(1).next_multiple_of(256)).sum();
        let escaped: u64 = l.plan.outputs.iter().filter(|o| o.2 <= i).map(|o| o.0).sum();
        bound = bound.max(live + escaped);
    }
    let unplanned: u64 = needs.iter().map(|n| size_class(n.3)).sum();
    needs.sort_by_key(|n| (std::cmp::Reverse(n.3), n.1));
    let mut placed: HashMap<Need, Buf> = HashMap::new();
    for &(need, start, end, bytes, dtype) in &needs {
        let lend = match need {
            Need::Value(v) => Lend::Shape(&g.values[v].meta.shape, twin.map(|t| &t.values[v].meta.shape)),
            Need::Partial(..) => Lend::Large,
        };
        placed.insert(need, l.plan.place(bytes, dtype, start, end, lend));
    }
    l.partials = placed.clone();
    for (i, step) in steps.iter().enumerate() {
        l.at = i;
        for v in step.stores() {
            if matches!(step, Step::Hook { .. }) {
                continue;
            }
            let buf = match (in_place.get(&v), fresh_of.get(&v), placed.get(&Need::Value(v))) {
                (Some(&slot), _, _) => Buf::Input(slot),
                (_, Some(&buf), _) | (_, _, Some(&buf)) => buf,
                (None, None, None) => unreachable!("every stored value is planned"),
            };
            l.bufs.insert(v, buf);
        }
        l.step(step)?;
    }
    // Write-backs, after every kernel: each reads its new contents from a
    // program buffer and stores them over the input's (whole) buffer.
    for (v, role) in &g.outputs {
        let OutputRole::Assign(slot) = *role else { continue };
        let meta = &g.values[*v].meta;
        if meta.shape.numel() == 0 || in_place.contains_key(v) {
            continue;
        }
        let layout = stored_layout(&meta.shape);
        let launch = exec::map_launch(
            device,
            "write back",
            MapKernel::copy(meta.dtype),
            &meta.shape,
            std::slice::from_ref(&layout),
            std::slice::from_ref(&layout),
            &[],
        )?;
        l.push(launch, vec![l.buf(*v), Buf::Input(slot)])?;
    }
    let returned = g.outputs.iter().filter(|(_, r)| !matches!(r, OutputRole::Assign(_)));
    let outputs = returned.clone().map(|(v, _)| (l.buf(*v), g.values[*v].meta.clone())).collect();
    let roles = returned.map(|(_, r)| *r).collect();
    report.kernels = l.sources;
    report.unplanned_bytes = unplanned;
    report.planned_bytes = l.plan.arenas.iter().map(|(_, b)| b).sum();
    report.program_bytes = report.planned_bytes + l.fresh_bytes.iter().map(|(b, _)| b).sum::<u64>();
    report.liveness_bound_bytes = bound;
    let uniform = device.create_uniform(&l.uniform);
    Ok(Program {
        device: device.clone(),
        actions: l.actions,
        uniform,
        inputs: g.inputs,
        slot_arenas: l.plan.arenas.iter().map(|&(d, b)| (b, d)).collect(),
        slot_places: l.plan.places.iter().map(|p| (p.0, p.1, p.2)).collect(),
        slots: Mutex::new(Vec::new()),
        fresh_bytes: l.fresh_bytes,
        outputs,
        roles,
        hooks: l.hooks,
        report,
        replay: Mutex::new(()),
        bind_groups_created: Default::default(),
        replaying: Mutex::new(None),
    })
}
