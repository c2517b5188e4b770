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
use crate::exec::kernel::{Access, MapKernel};
use crate::exec::{self, Launch};
use crate::layout::Layout;
use crate::metadata::{DType, Shape};

/// Intermediate buffers shared by liveness: a value takes the smallest
/// free buffer of its dtype that fits (growing one if none does) and frees
/// it after the last step that reads it. (Storage is typed: it lives in
/// its dtype's arena.)
#[derive(Default)]
struct SlotPlan {
    sizes: Vec<(u64, DType)>,
    free: Vec<usize>,
}

impl SlotPlan {
    fn take(&mut self, bytes: u64, dtype: DType) -> usize {
        let bytes = size_class(bytes);
        let free = self.free.iter().copied().filter(|&s| self.sizes[s].1 == dtype);
        let fit = free.clone().filter(|&s| self.sizes[s].0 >= bytes).min_by_key(|&s| self.sizes[s].0);
        match fit.or_else(|| free.max_by_key(|&s| self.sizes[s].0)) {
            Some(s) => {
                self.free.retain(|&f| f != s);
                self.sizes[s].0 = self.sizes[s].0.max(bytes);
                s
            }
            None => {
                self.sizes.push((bytes, dtype));
                self.sizes.len() - 1
            }
        }
    }

    fn give_back(&mut self, slot: usize) {
        self.free.push(slot);
    }
}

fn bytes_of(g: &CapturedGraph, v: ValueId) -> u64 {
    let m = &g.values[v].meta;
    (m.shape.numel() * m.dtype.size_in_bytes()) as u64
}

struct Lowering<'a> {
    device: &'a Device,
    g: &'a CapturedGraph,
    bufs: HashMap<ValueId, Buf>,
    slots: SlotPlan,
    fresh_bytes: Vec<(u64, DType)>,
    uniform: Vec<u8>,
    actions: Vec<Action>,
    sources: Vec<String>,
    hooks: usize,
}

impl Lowering<'_> {
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
            launch.source(&crate::exec::bind::Binds::grouped(&bufs, &launch.dtypes, &launch.written))
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
                let mut launch = exec::map_launch(device, "fused", kernel.clone(), shape, &layouts, &outs, scalars)?;
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
            Step::Reduce { value, stores, kind, kernel, reads, scalars, shape, a, k, .. } => {
                let (a, k) = (*a, *k);
                if a == 0 {
                    return Ok(());
                }
                let layouts: Vec<Layout> = reads.iter().map(|u| u.layout.clone()).collect();
                let mut chunks = exec::reduce_chunks(a, k, kernel);
                let dtype = self.g.values[*value].meta.dtype;
                let target = self.buf(*value);
                let elem = dtype.size_in_bytes() as u64;
                let mut dst =
                    if chunks == 1 { target } else { Buf::Slot(self.slots.take((a * chunks) as u64 * elem, dtype)) };
                let launch =
                    exec::reduce_launch(device, *kind, kernel.clone(), shape, &layouts, scalars, a, k, chunks)?;
                let mut bufs: Vec<Buf> = reads.iter().map(|u| self.buf(u.value)).collect();
                bufs.push(dst);
                bufs.extend(stores.iter().map(|&v| self.buf(v)));
                self.push(launch, bufs)?;
                while chunks > 1 {
                    let next = exec::reduce_chunks(a, chunks, &MapKernel::copy(dtype));
                    let src = dst;
                    dst = if next == 1 { target } else { Buf::Slot(self.slots.take((a * next) as u64 * elem, dtype)) };
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
                    )?;
                    self.push(launch, vec![src, dst])?;
                    if let Buf::Slot(s) = src {
                        self.slots.give_back(s);
                    }
                    chunks = next;
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
            Step::Matmul { value, a, b, epilogue, reads, scalars, .. } => {
                let shape = &self.g.values[*value].meta.shape;
                if shape.numel() == 0 {
                    return Ok(());
                }
                let layouts: Vec<Layout> = reads.iter().map(|u| u.layout.clone()).collect();
                let launches =
                    exec::matmul_launches(device, epilogue.clone(), &layouts, scalars, &a.layout, &b.layout, shape)?;
                for launch in launches {
                    let mut bufs: Vec<Buf> = reads.iter().map(|u| self.buf(u.value)).collect();
                    bufs.extend([self.buf(*value), self.buf(a.value), self.buf(b.value)]);
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
        let Step::Elementwise { shape, kernel, reads, .. } = &steps[at] else { continue };
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
pub(crate) fn lower(device: &Device, g: &CapturedGraph, steps: &[Step], mut report: ProgramReport) -> Result<Program> {
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
        bufs: HashMap::new(),
        slots: SlotPlan::default(),
        fresh_bytes: Vec::new(),
        uniform: Vec::new(),
        actions: Vec::new(),
        sources: Vec::new(),
        hooks: 0,
    };
    let mut unplanned = 0;
    let mut live: Vec<(ValueId, usize)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        // Buffers whose last reader has run can be reused from this step on.
        live.retain(|&(v, slot)| {
            if last_read[v] < i {
                l.slots.give_back(slot);
                false
            } else {
                true
            }
        });
        for v in step.stores() {
            if matches!(step, Step::Hook { .. }) {
                continue;
            }
            let bytes = bytes_of(g, v);
            let dtype = g.values[v].meta.dtype;
            let buf = if let Some(&slot) = in_place.get(&v) {
                Buf::Input(slot)
            } else if escapes[v] {
                l.fresh(bytes, dtype)
            } else {
                unplanned += size_class(bytes);
                let slot = l.slots.take(bytes, dtype);
                live.push((v, slot));
                Buf::Slot(slot)
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
    report.planned_bytes = l.slots.sizes.iter().map(|(b, _)| b).sum();
    let uniform = device.create_uniform(&l.uniform);
    Ok(Program {
        device: device.clone(),
        actions: l.actions,
        uniform,
        inputs: g.inputs,
        slot_bytes: l.slots.sizes,
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
