//! A compiled backward program and its replay: every dispatch is prepared
//! (pipeline, uniform slice, which buffer each binding gets), so a replay
//! only resolves buffers, reuses the bind groups whose buffers did not
//! change, records the dispatches and submits once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::alloc::PooledBuffer;
use crate::compiler::ir::OutputRole;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::Launch;
use crate::exec::bind::{Binds, Operand};
use crate::layout::Layout;
use crate::metadata::{DType, InputMetadata};
use crate::tensor::{Storage, Tensor};

/// Where a binding's buffer comes from at replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buf {
    /// The tensor bound to input slot `i`.
    Input(usize),
    /// Intermediate `i` of the memory plan: a range of one of the
    /// program's own buffers (one per dtype).
    Slot(usize),
    /// Buffer `i` allocated fresh for each replay: outputs and what hooks see.
    Fresh(usize),
    /// The (contiguous) tensor returned by hook step `i`.
    Hooked(usize),
}

/// A dispatch's buffers, their sharing pattern, and the pipeline and bind
/// group made for them.
pub(crate) type Bound = (Vec<wgpu::Buffer>, Binds, wgpu::ComputePipeline, wgpu::BindGroup);

pub(crate) struct Dispatch {
    pub launch: Launch,
    pub uniform_offset: u64,
    pub uniform_size: u64,
    pub bufs: Vec<Buf>,
    /// The words the program's uniform holds for this launch now: its
    /// operands' offsets include where their allocations start, so a replay
    /// whose tensors sit elsewhere rewrites them (a recorded copy).
    /// With the device's count of failed batches when they were written:
    /// if a batch failed since, the write may not have run, so it is redone.
    pub words: Mutex<(u64, Vec<u32>)>,
    /// The buffers of the last replay, and its pipeline (rendered for how
    /// they share bindings) and bind group.
    /// The sharing pattern is kept too: the same buffers can be shared by
    /// the operands differently, which is another kernel source.
    pub cached: Mutex<Option<Bound>>,
}

pub(crate) enum Action {
    Dispatch(Box<Dispatch>),
    /// Run the hooks of hook point `point` on `src` (a view of a buffer);
    /// the result becomes [`Buf::Hooked`]`(index)`.
    Hook {
        point: usize,
        src: Buf,
        layout: Layout,
        meta: InputMetadata,
        index: usize,
    },
}

/// A lowered backward graph, cached by its signature and replayed on every
/// backward with that signature.
pub struct Program {
    pub(crate) device: Device,
    pub(crate) actions: Vec<Action>,
    pub(crate) uniform: wgpu::Buffer,
    pub(crate) inputs: usize,
    /// The program's intermediate buffers (bytes, dtype), and each slot's
    /// place in them: (buffer, byte offset, bytes).
    pub(crate) slot_arenas: Vec<(u64, DType)>,
    pub(crate) slot_places: Vec<(usize, u64, u64)>,
    pub(crate) slots: Mutex<Vec<Arc<PooledBuffer>>>,
    pub(crate) fresh_bytes: Vec<(u64, DType)>,
    pub(crate) outputs: Vec<(Buf, InputMetadata)>,
    pub(crate) roles: Vec<OutputRole>,
    pub(crate) hooks: usize,
    pub(crate) report: ProgramReport,
    /// One replay at a time: replays share the intermediate buffers.
    pub(crate) replay: Mutex<()>,
    pub(crate) bind_groups_created: AtomicU64,
    /// The thread replaying now, if any (a hook may start a backward that
    /// needs this very program; it must not wait for itself).
    pub(crate) replaying: Mutex<Option<std::thread::ThreadId>>,
}

/// What the compiler did with a graph, for logs, tests and the DOT export.
#[derive(Debug, Clone, Default)]
pub struct ProgramReport {
    /// The captured IR, as traced.
    pub ir_before: String,
    /// The IR after the graph passes.
    pub ir_after: String,
    /// WGSL source of each kernel, in dispatch order (one entry per kernel).
    pub kernels: Vec<String>,
    /// Reads redirected by algebraic simplification (`x * 1`, `x + 0`, copies, ...).
    pub simplified: usize,
    /// Values merged by common-subexpression elimination.
    pub merged: usize,
    /// Values removed by dead-code elimination.
    pub removed: usize,
    /// Values computed inside another value's kernel.
    pub ops_fused: usize,
    /// Loops over rows that row kernels no longer make: row sums
    /// distributed over the per-row factors they read
    /// ([`crate::Passes::row_sums`]).
    pub row_loops_saved: usize,
    /// Bytes of intermediates if each had its own buffer.
    pub unplanned_bytes: u64,
    /// Bytes of the intermediate buffers after sharing by liveness.
    pub planned_bytes: u64,
    /// Bytes of the buffers the program owns while it runs: the shared
    /// intermediates plus the outputs it hands back (`.grad`s, returned
    /// tensors), each allocated once.
    pub program_bytes: u64,
    /// The least any plan could hold at once: the largest total, over the
    /// kernels, of the sizes of the values live across that kernel (stored
    /// before it and read at or after it; outputs from their kernel on;
    /// intermediates at 256-byte alignment). `program_bytes /
    /// liveness_bound_bytes` is the plan's overhead.
    pub liveness_bound_bytes: u64,
    /// Graphviz DOT of the optimised graph, kernels as clusters.
    pub dot: String,
}

impl Program {
    /// Kernel dispatches per replay.
    pub fn kernel_count(&self) -> usize {
        self.actions.iter().filter(|a| matches!(a, Action::Dispatch(_))).count()
    }

    /// Bind groups created over all replays: a replay whose buffers are
    /// those of the previous one creates none.
    pub fn bind_groups_created(&self) -> u64 {
        self.bind_groups_created.load(Ordering::Relaxed)
    }

    /// What the compiler did.
    pub fn report(&self) -> &ProgramReport {
        &self.report
    }

    /// Whether this thread is inside a replay of this program (a hook of it
    /// started another backward).
    pub(crate) fn is_replaying_here(&self) -> bool {
        *self.replaying.lock() == Some(std::thread::current().id())
    }

    pub(crate) fn roles(&self) -> &[OutputRole] {
        &self.roles
    }

    /// Replays on `inputs` (in signature order); `hooks(point, g)` runs the
    /// user's hooks of a hook point. Returns the outputs in role order, or
    /// `Ok(None)`, having dispatched nothing, when this call's tensors are
    /// spread over more buffers than one of its kernels may bind (more
    /// arenas are in use than when it was planned): the caller runs the
    /// backward eagerly instead.
    pub(crate) fn run(
        &self,
        inputs: &[Tensor],
        hooks: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Option<Vec<Tensor>>> {
        if inputs.len() != self.inputs {
            return Err(Error::InvalidArgument {
                op: "compiled backward",
                message: format!("internal: program expects {} inputs, got {}", self.inputs, inputs.len()),
            });
        }
        self.run_into(inputs, hooks, Vec::new())
    }

    /// [`Self::run`], storing output `k` into `into[k]` where that is given
    /// (storage of the output's dtype and at least its size that nothing
    /// else reads: a compiled step's old `.grad`, overwritten by the new one)
    /// instead of a fresh buffer.
    pub(crate) fn run_into(
        &self,
        inputs: &[Tensor],
        hooks: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
        into: Vec<Option<Arc<PooledBuffer>>>,
    ) -> Result<Option<Vec<Tensor>>> {
        if inputs.len() != self.inputs {
            return Err(Error::InvalidArgument {
                op: "compiled backward",
                message: format!("internal: program expects {} inputs, got {}", self.inputs, inputs.len()),
            });
        }
        let mut given: Vec<Option<Arc<PooledBuffer>>> = vec![None; self.fresh_bytes.len()];
        for (k, buffer) in into.into_iter().enumerate() {
            let (Some(buffer), Some((Buf::Fresh(i), _))) = (buffer, self.outputs.get(k)) else { continue };
            let (bytes, _) = self.fresh_bytes[*i];
            if buffer.range().end - buffer.range().start >= bytes {
                given[*i] = Some(buffer);
            }
        }
        let _replay = self.replay.lock();
        let _here = ReplayingHere::mark(&self.replaying);
        self.replay_locked(inputs, hooks, given)
    }

    /// Makes sure dispatch `d` has a pipeline and bind group for these
    /// operands (reused when they are bound as last time).
    fn bind(&self, d: &Dispatch, operands: &[Operand]) -> Result<()> {
        let launch = &d.launch;
        let (binds, buffers) = Binds::of(operands, &launch.written);
        let mut cached = d.cached.lock();
        let reuse = cached.as_ref().is_some_and(|(bufs, b, _, _)| *bufs == buffers && *b == binds);
        if !reuse {
            let pipeline = self.device.pipeline(launch.label, &launch.source(&binds))?;
            let bg = self.device.bind_group(&pipeline, &self.uniform, d.uniform_offset, d.uniform_size, &buffers);
            *cached = Some((buffers, binds, pipeline, bg));
            self.bind_groups_created.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn replay_locked(
        &self,
        inputs: &[Tensor],
        hooks: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
        given: Vec<Option<Arc<PooledBuffer>>>,
    ) -> Result<Option<Vec<Tensor>>> {
        let device = &self.device;
        let mut slots = self.slots.lock();
        if slots.is_empty() && !self.slot_arenas.is_empty() {
            *slots = self.slot_arenas.iter().map(|&(b, d)| device.alloc(b, d)).collect::<Result<Vec<_>>>()?;
        }
        let fresh = self
            .fresh_bytes
            .iter()
            .zip(given)
            .map(|(&(b, d), given)| match given {
                Some(buffer) => Ok(buffer),
                None => device.alloc(b, d),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut hooked: Vec<Option<Tensor>> = vec![None; self.hooks];
        // One encoder, one submit: start a new batch if this one cannot hold
        // the whole program (each dispatch may come with a copy of its words).
        device.reserve(2 * self.kernel_count());
        let resolve = |b: Buf, dtype: DType, hooked: &[Option<Tensor>]| -> Result<Operand> {
            Ok(match b {
                Buf::Input(i) => inputs[i].operand()?,
                Buf::Slot(i) => {
                    let (arena, offset, bytes) = self.slot_places[i];
                    let whole = slots[arena].operand(dtype);
                    let start = whole.range.start + offset;
                    Operand { range: start..start + bytes, ..whole }
                }
                Buf::Fresh(i) => fresh[i].operand(dtype),
                Buf::Hooked(i) => hooked[i].as_ref().expect("hook ran before its readers").operand()?,
            })
        };
        // Before anything is recorded: every kernel's operands (but hook
        // results, made later) resolved once, and checked to fit the binding
        // limit (a hook's result counting as a buffer of its own).
        let max = device.max_storage_bindings();
        let mut resolved: Vec<Resolved> = Vec::new();
        for action in &self.actions {
            let Action::Dispatch(d) = action else { continue };
            let operands = d
                .bufs
                .iter()
                .zip(&d.launch.dtypes)
                .map(|(&b, &dtype)| match b {
                    Buf::Hooked(_) => Ok(None),
                    b => resolve(b, dtype, &[]).map(Some),
                })
                .collect::<Result<Vec<_>>>()?;
            if operands.len() > max {
                let mut distinct: Vec<(&wgpu::Buffer, DType)> = Vec::new();
                for o in operands.iter().flatten() {
                    if !distinct.iter().any(|(buf, d)| **buf == o.buffer && *d == o.dtype) {
                        distinct.push((&o.buffer, o.dtype));
                    }
                }
                if distinct.len() + operands.iter().filter(|o| o.is_none()).count() > max {
                    return Ok(None);
                }
            }
            // Everything that can fail before a kernel is recorded (its
            // pipeline, its bind group, the usage check) happens now, so a
            // failure records nothing: a program's in-place updates run all
            // or not at all.
            if operands.iter().all(Option::is_some) {
                let all: Vec<Operand> = operands.into_iter().flatten().collect();
                crate::poison::check_conflicts("compiled backward", &all, &d.launch.written, &d.launch.in_place)?;
                self.bind(d, &all)?;
                resolved.push(Resolved::All(all));
            } else {
                resolved.push(Resolved::BeforeHooks(operands));
            }
        }
        let mut resolved = resolved.into_iter();
        for action in &self.actions {
            match action {
                Action::Dispatch(d) => {
                    let launch = &d.launch;
                    let operands = match resolved.next().expect("one resolved list per dispatch") {
                        Resolved::All(all) => all,
                        Resolved::BeforeHooks(known) => {
                            // Reads a hook's result: checked and bound now.
                            let operands = known
                                .into_iter()
                                .zip(d.bufs.iter().zip(&launch.dtypes))
                                .map(|(o, (&b, &dtype))| match o {
                                    Some(o) => Ok(o),
                                    None => resolve(b, dtype, &hooked),
                                })
                                .collect::<Result<Vec<_>>>()?;
                            let (written, in_place) = (&launch.written, &launch.in_place);
                            crate::poison::check_conflicts("compiled backward", &operands, written, in_place)?;
                            self.bind(d, &operands)?;
                            operands
                        }
                    };
                    let cached = d.cached.lock();
                    let words = launch.words_for(&operands);
                    let mut current = d.words.lock();
                    let failed = device.failed_batches();
                    if current.0 != failed || current.1 != words {
                        device.record_uniform_write(&self.uniform, d.uniform_offset, &words);
                        *current = (failed, words);
                    }
                    let (bound, _, pipeline, bind_group) = cached.as_ref().expect("bind group is set");
                    let (info, written, grid) = (&launch.info, &launch.written, launch.grid);
                    let label = "compiled backward";
                    device.dispatch_bound(label, info, pipeline, bind_group, bound.len(), &operands, written, grid)?;
                }
                Action::Hook { point, src, layout, meta, index } => {
                    let storage = match *src {
                        Buf::Input(i) => inputs[i].storage().clone(),
                        Buf::Fresh(i) => Storage::Buffer(fresh[i].clone()),
                        Buf::Hooked(i) => hooked[i].as_ref().expect("hook ran before its readers").storage().clone(),
                        Buf::Slot(_) => unreachable!("hooks read fresh buffers"),
                    };
                    let g = Tensor::from_parts(storage, layout.clone(), meta.dtype, device.clone());
                    let out = hooks(*point, g)?;
                    let contiguous = out.is_contiguous() && out.layout().offset == 0;
                    hooked[*index] = Some(if contiguous { out.detach() } else { out.contiguous_copy()? });
                }
            }
        }
        // No submit here: the replay's dispatches sit in the pending batch
        // (whole, see `reserve` above) and go with the next sync point, so
        // the host can record the next step while the device runs this one.
        Ok(Some(
            self.outputs
                .iter()
                .map(|(b, meta)| {
                    let storage = match *b {
                        Buf::Fresh(i) => fresh[i].clone(),
                        _ => unreachable!("outputs are fresh buffers"),
                    };
                    Tensor::from_parts(
                        Storage::Buffer(storage),
                        Layout::contiguous(meta.shape.clone()),
                        meta.dtype,
                        device.clone(),
                    )
                })
                .collect(),
        ))
    }
}

/// A dispatch's operands before recording: all of them (checked and bound
/// before anything is recorded), or those known before the hooks run
/// (`None`: a hook's result, resolved, checked and bound when it is made).
enum Resolved {
    All(Vec<Operand>),
    BeforeHooks(Vec<Option<Operand>>),
}

/// Marks a program as replaying on this thread until dropped, also when a
/// hook panics: a mark left behind would make every later backward of the
/// program on this thread run eagerly.
struct ReplayingHere<'a>(&'a Mutex<Option<std::thread::ThreadId>>);

impl<'a> ReplayingHere<'a> {
    fn mark(slot: &'a Mutex<Option<std::thread::ThreadId>>) -> ReplayingHere<'a> {
        *slot.lock() = Some(std::thread::current().id());
        ReplayingHere(slot)
    }
}

impl Drop for ReplayingHere<'_> {
    fn drop(&mut self) {
        *self.0.lock() = None;
    }
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Program({} kernels, {} hooks, {} inputs)", self.kernel_count(), self.hooks, self.inputs)
    }
}
