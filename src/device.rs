//! Adapter selection, the queue, the pending command batch, uploads and
//! readback. Ops never submit on their own: they append dispatches to a batch
//! that is submitted at sync points (readback, [`Device::synchronize`]) or
//! when it grows large, so a step costs a handful of submits, not one per op.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::alloc::{ALLOC_ALIGN, MAX_ARENA_BYTES, MemoryStats, Pool, PooledBuffer, size_class};
use crate::error::{Error, Result};
use crate::exec::bind::Operand;
use crate::exec::merge::{MapOp, PendingMaps};
use crate::metadata::DType;
use crate::metadata::DeviceId;
use crate::profile::{BatchTimer, KernelInfo, Profile, Profiler, TimestampSupport};

/// Threads per workgroup of the 1-D kernels (elementwise, reductions).
pub(crate) const WORKGROUP_SIZE: u32 = 256;
/// Bytes of the uniform arena that holds every pending dispatch's sizes.
const ARENA_BYTES: u64 = 256 * 1024;
/// A batch is submitted once it holds this many commands.
const MAX_BATCH: usize = 2048;
// The profiler times each dispatch of a batch with two queries of one set.
const _: () = assert!(2 * MAX_BATCH <= wgpu::QUERY_SET_MAX_QUERIES as usize);

/// What adapter a [`Device`] runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)` or `NVIDIA H200`.
    pub name: String,
    /// Backend: Vulkan, Metal, DX12 or GL.
    pub backend: String,
    /// Discrete GPU, integrated GPU, CPU (software), ...
    pub device_type: String,
    /// Driver name and version as reported by the adapter.
    pub driver: String,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {}, {})", self.name, self.backend, self.device_type, self.driver)
    }
}

/// Which limits a device requests from its adapter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LimitsPreset {
    /// Everything the adapter offers: its full storage binding size,
    /// buffer size and binding counts (the default).
    #[default]
    Adapter,
    /// Exactly WebGPU's default limits (8 storage buffers per shader stage,
    /// 128 MiB per binding, 256 MiB per buffer, 16 KiB of workgroup
    /// storage, 256 invocations per workgroup), and no `shader-f16`: what a
    /// page can count on in any browser, checked on a native adapter.
    WebGpu,
}

/// Whether tensors are sub-allocated in shared buffers (arenas).
///
/// Arenas let a kernel bind any number of tensors through a few bindings,
/// which WebGPU's 8 storage bindings need. They cost speed where a kernel
/// writes the buffer it reads (measured on lavapipe: elementwise kernels
/// 1.2-1.7x slower; the binding is then `read_write`, so the driver likely
/// cannot treat its loads as read-only). So by default they are used only
/// where the binding limit is tight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ArenaPolicy {
    /// Arenas when the device allows fewer than 32 storage bindings per
    /// kernel (the width fused kernels are planned for), e.g. under
    /// [`LimitsPreset::WebGpu`]; a buffer per tensor otherwise.
    #[default]
    Auto,
    /// Always sub-allocate (tensors above 4 MiB still get their own buffer).
    Always,
    /// A buffer per tensor.
    Never,
}

/// How [`Device::with_options`] sets up a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceOptions {
    /// The limits to request.
    pub limits: LimitsPreset,
    /// Whether tensors share buffers.
    pub arenas: ArenaPolicy,
}

impl DeviceOptions {
    /// The options [`Device::new`] uses: `WGRAD_LIMITS=webgpu` requests
    /// WebGPU's default limits, `adapter` (or unset) the adapter's own.
    pub fn from_env() -> Result<DeviceOptions> {
        let limits = match std::env::var("WGRAD_LIMITS").as_deref() {
            Err(_) | Ok("") | Ok("adapter") => LimitsPreset::Adapter,
            Ok("webgpu") => LimitsPreset::WebGpu,
            Ok(other) => {
                return Err(Error::InvalidArgument {
                    op: "Device::new",
                    message: format!("WGRAD_LIMITS={other:?} is not a limits preset; use `webgpu` or `adapter`"),
                });
            }
        };
        let arenas = match std::env::var("WGRAD_ARENAS").as_deref() {
            Err(_) | Ok("") | Ok("auto") => ArenaPolicy::Auto,
            Ok("always") => ArenaPolicy::Always,
            Ok("never") => ArenaPolicy::Never,
            Ok(other) => {
                return Err(Error::InvalidArgument {
                    op: "Device::new",
                    message: format!("WGRAD_ARENAS={other:?} is not an arena policy; use `auto`, `always` or `never`"),
                });
            }
        };
        Ok(DeviceOptions { limits, arenas })
    }
}

/// The limits a device got (see [`LimitsPreset`]), as the runtime uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// The preset requested.
    pub preset: LimitsPreset,
    /// Storage buffers one kernel may bind.
    pub storage_buffers_per_stage: u32,
    /// Bytes one storage binding may span.
    pub storage_binding_bytes: u64,
    /// Bytes of one buffer.
    pub buffer_bytes: u64,
    /// Bytes of workgroup storage per workgroup.
    pub workgroup_storage_bytes: u32,
    /// Invocations per workgroup.
    pub invocations_per_workgroup: u32,
    /// Whether `shader-f16` (and so `DType::F16`) is available.
    pub f16: bool,
    /// Whether tensors are sub-allocated in arenas (see [`ArenaPolicy`]).
    pub arenas: bool,
}

/// Running totals of what the device did; cheap to read, useful in tests
/// and benchmarks (a steady-state loop creates no pipelines or buffers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Compute dispatches recorded.
    pub dispatches: u64,
    /// Queue submits.
    pub submits: u64,
    /// Compute pipelines created (each distinct kernel source once).
    pub pipelines_created: u64,
    /// Host-to-device uploads.
    pub uploads: u64,
    /// Device-to-host readbacks.
    pub readbacks: u64,
    /// Buffers allocated from the driver: tensor storage the pool could not
    /// serve, staging for uploads and readbacks (beyond the reused one),
    /// compiled programs' uniforms.
    pub buffers_created: u64,
}

/// A GPU device: cheap to clone, `Send + Sync`. Tensors remember the device
/// they live on; ops on tensors of two devices are an error.
///
/// ```
/// let device = wgrad::Device::new()?;
/// println!("running on {}", device.info());
/// # Ok::<(), wgrad::Error>(())
/// ```
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<DeviceInner>,
}

pub(crate) struct DeviceInner {
    id: DeviceId,
    info: DeviceInfo,
    matmul: crate::exec::codegen::MatmulTemplate,
    rows: crate::exec::codegen::RowForm,
    /// Whether eager elementwise ops merge into one dispatch (`exec::merge`).
    merge: std::sync::atomic::AtomicBool,
    pub(crate) device: wgpu::Device,
    queue: wgpu::Queue,
    pub(crate) limits: wgpu::Limits,
    preset: LimitsPreset,
    f16: bool,
    pool: Arc<Mutex<Pool>>,
    batch: Mutex<Batch>,
    pipelines: Mutex<HashMap<String, wgpu::ComputePipeline>>,
    /// How many errors wgpu has reported outside an error scope, so a
    /// submit can tell whether it failed.
    errors: Arc<AtomicU64>,
    /// Batches wgpu rejected so far: what they recorded never ran.
    failed_batches: AtomicU64,
    /// Why the device was lost, once it is: every later sync reports it.
    lost: Arc<Mutex<Option<String>>>,
    counters: Mutex<DeviceCounters>,
    /// Errors wgpu reported outside an error scope; surfaced at the next sync.
    uncaptured: Arc<Mutex<Option<String>>>,
    arena: wgpu::Buffer,
    /// The staging buffer of the last small readback, reused by the next.
    readback: Mutex<Option<wgpu::Buffer>>,
    profiler: Profiler,
}

/// Readback staging buffers up to this size are kept for reuse.
const KEPT_READBACK_BYTES: u64 = 1 << 20;

enum Command {
    /// `writes`: the storage the kernel writes, spoiled if the batch
    /// fails (see `poison`); `op` names the op that recorded it.
    Dispatch {
        op: &'static str,
        pipeline: wgpu::ComputePipeline,
        bind_group: wgpu::BindGroup,
        grid: [u32; 3],
        writes: Vec<Operand>,
        /// What it computes, kept only while profiling.
        info: Option<KernelInfo>,
    },
    /// `spoils_dst`: whether `dst` is a tensor's storage (an upload), as
    /// opposed to a readback's staging buffer.
    Copy { src: wgpu::Buffer, src_offset: u64, dst: wgpu::Buffer, dst_offset: u64, size: u64, spoils_dst: bool },
}

#[derive(Default)]
struct Batch {
    commands: Vec<Command>,
    uniforms: Vec<u8>,
    /// Elementwise ops not yet dispatched (see `exec::merge`): they run,
    /// as one kernel, before any other command joins the batch.
    pending: Option<PendingMaps>,
}

/// The most operands (tensors read or written) a merged elementwise kernel
/// has, as the compiled backward's kernels; distinct buffers are bounded
/// by the device's storage-binding limit as well.
const MAX_MERGED_BINDINGS: usize = 32;

static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(0);

fn rank_adapter(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    // GL's compute support is the weakest of the backends: prefer the others.
    let backend = u8::from(info.backend == wgpu::Backend::Gl);
    (kind, backend)
}

impl Device {
    /// Picks an adapter and creates a device on it.
    ///
    /// `WGRAD_ADAPTER` (a case-insensitive substring of the adapter name)
    /// chooses one explicitly; wgpu's own `WGPU_BACKEND` restricts the
    /// backends. Otherwise a discrete GPU is preferred over an integrated one,
    /// and either over a software adapter such as lavapipe.
    pub fn new() -> Result<Device> {
        Device::with_options(DeviceOptions::from_env()?)
    }

    /// [`Device::new`] with explicit options (the environment's
    /// `WGRAD_LIMITS` is not read).
    pub fn with_options(options: DeviceOptions) -> Result<Device> {
        // WGPU_BACKEND restricts the search; otherwise Vulkan/Metal/DX12
        // first, and GL (weakest compute support, noisy to probe) only if
        // they find nothing.
        let enumerate = |backends: wgpu::Backends| {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
            desc.backends = backends;
            pollster::block_on(wgpu::Instance::new(desc).enumerate_adapters(backends))
        };
        let adapters = match wgpu::Backends::from_env() {
            Some(backends) => enumerate(backends),
            None => {
                let primary = enumerate(wgpu::Backends::PRIMARY);
                if primary.is_empty() { enumerate(wgpu::Backends::SECONDARY) } else { primary }
            }
        };
        let seen: Vec<String> =
            adapters.iter().map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend)).collect();
        let filter = std::env::var("WGRAD_ADAPTER").ok().filter(|f| !f.is_empty());
        let mut candidates: Vec<wgpu::Adapter> = adapters
            .into_iter()
            .filter(|a| match &filter {
                Some(f) => a.get_info().name.to_lowercase().contains(&f.to_lowercase()),
                None => true,
            })
            .collect();
        candidates.sort_by_key(|a| rank_adapter(&a.get_info()));
        let Some(adapter) = candidates.into_iter().next() else {
            let detail = match filter {
                Some(f) => format!(" matching WGRAD_ADAPTER={f:?} (adapters present: {seen:?})"),
                None => String::new(),
            };
            return Err(Error::NoAdapter { detail });
        };
        Device::from_adapter(adapter, options)
    }

    fn from_adapter(adapter: wgpu::Adapter, options: DeviceOptions) -> Result<Device> {
        let ainfo = adapter.get_info();
        let f16 = options.limits == LimitsPreset::Adapter && adapter.features().contains(wgpu::Features::SHADER_F16);
        let mut required_features = if f16 { wgpu::Features::SHADER_F16 } else { wgpu::Features::empty() };
        // Subgroup operations for row kernels' workgroup form, where the
        // adapter has them (not under WebGPU's limits: a browser may not).
        let subgroups =
            options.limits == LimitsPreset::Adapter && adapter.features().contains(wgpu::Features::SUBGROUP);
        if subgroups {
            required_features |= wgpu::Features::SUBGROUP;
        }
        // Timestamps for the profiler, where the adapter has them; unused
        // (and free) while it is off.
        let offered = adapter.features();
        // Under WebGPU's limits only what a browser offers: timestamps at pass boundaries.
        let native = options.limits == LimitsPreset::Adapter;
        let timestamps = if native
            && offered.contains(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
        {
            required_features |= wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
            TimestampSupport::InsidePasses
        } else if offered.contains(wgpu::Features::TIMESTAMP_QUERY) {
            required_features |= wgpu::Features::TIMESTAMP_QUERY;
            TimestampSupport::PerPass
        } else {
            TimestampSupport::None
        };
        // By default everything the adapter offers: the runtime wants its
        // full storage binding size, buffer size and binding counts.
        let limits = match options.limits {
            LimitsPreset::Adapter => adapter.limits(),
            LimitsPreset::WebGpu => wgpu::Limits::default(),
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgrad"),
            required_features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice { adapter: ainfo.name.clone(), message: e.to_string() })?;

        let queue_period = queue.get_timestamp_period();
        let uncaptured = Arc::new(Mutex::new(None));
        let sink = uncaptured.clone();
        let errors = Arc::new(AtomicU64::new(0));
        let counted = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut slot = sink.lock();
            if slot.is_none() {
                *slot = Some(describe_gpu_error(&e));
            }
        }));
        let lost = Arc::new(Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            lost_sink.lock().get_or_insert(format!("{reason:?}: {message}"));
        });
        let arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgrad uniform arena"),
            size: ARENA_BYTES,
            // COPY_SRC: a compiled program's changed words are copied from here.
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let info = DeviceInfo {
            name: ainfo.name.clone(),
            backend: format!("{:?}", ainfo.backend),
            device_type: format!("{:?}", ainfo.device_type),
            driver: format!("{} {}", ainfo.driver, ainfo.driver_info).trim().to_string(),
        };
        // CPU adapters get the matmul without workgroup memory;
        // `WGRAD_MATMUL=tiled|direct` overrides (for benchmarking).
        let matmul = {
            use crate::exec::codegen::MatmulTemplate;
            match std::env::var("WGRAD_MATMUL").as_deref() {
                Ok("tiled") => MatmulTemplate::Tiled,
                Ok("direct") => MatmulTemplate::Direct,
                _ if ainfo.device_type == wgpu::DeviceType::Cpu => MatmulTemplate::Direct,
                _ => MatmulTemplate::Tiled,
            }
        };
        // Row kernels: a workgroup per row on GPUs, its partials combined
        // by subgroup operations where the adapter has them;
        // `WGRAD_ROWS=invocation|workgroup|subgroups` overrides (for
        // benchmarking the forms on an adapter).
        let rows = {
            use crate::exec::codegen::RowForm;
            match std::env::var("WGRAD_ROWS").as_deref() {
                Ok("invocation") => RowForm::PerInvocation,
                Ok("workgroup") => RowForm::Workgroup { size: 64, subgroups: false },
                Ok("subgroups") => RowForm::Workgroup { size: 64, subgroups },
                _ if ainfo.device_type == wgpu::DeviceType::Cpu => RowForm::PerInvocation,
                _ => RowForm::Workgroup { size: 64, subgroups },
            }
        };
        // Arenas as large as one binding may span, up to MAX_ARENA_BYTES.
        let binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let arenas = match options.arenas {
            ArenaPolicy::Auto => limits.max_storage_buffers_per_shader_stage < 32,
            ArenaPolicy::Always => true,
            ArenaPolicy::Never => false,
        };
        let arena_bytes = if arenas { MAX_ARENA_BYTES.min(binding / ALLOC_ALIGN * ALLOC_ALIGN) } else { 0 };
        let pool = Pool::new(arena_bytes);
        Ok(Device {
            inner: Arc::new(DeviceInner {
                id: DeviceId(NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed)),
                info,
                matmul,
                rows,
                merge: std::sync::atomic::AtomicBool::new(std::env::var("WGRAD_MERGE").as_deref() != Ok("0")),
                device,
                queue,
                limits,
                preset: options.limits,
                f16,
                pool: Arc::new(Mutex::new(pool)),
                batch: Mutex::new(Batch::default()),
                pipelines: Mutex::new(HashMap::new()),
                errors,
                failed_batches: AtomicU64::new(0),
                lost,
                counters: Mutex::new(DeviceCounters::default()),
                uncaptured,
                arena,
                readback: Mutex::new(None),
                profiler: Profiler::new(timestamps, queue_period),
            }),
        })
    }

    /// The limits this device got from its adapter.
    pub fn limits(&self) -> DeviceLimits {
        let l = &self.inner.limits;
        DeviceLimits {
            preset: self.inner.preset,
            storage_buffers_per_stage: l.max_storage_buffers_per_shader_stage,
            storage_binding_bytes: l.max_storage_buffer_binding_size,
            buffer_bytes: l.max_buffer_size,
            workgroup_storage_bytes: l.max_compute_workgroup_storage_size,
            invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            f16: self.inner.f16,
            arenas: self.inner.pool.lock().arena_bytes > 0,
        }
    }

    /// Switches the kernel profiler on or off (`WGRAD_PROFILE=1` starts
    /// every device with it on, printing each batch's table to stderr).
    /// While on, every submit waits for the GPU and records each dispatch's
    /// GPU time (timestamp queries; without them, the batch's wall-clock
    /// time), what it fused, and the bytes and FLOPs it moved; read them
    /// with [`Device::profile`].
    pub fn set_profiling(&self, on: bool) {
        self.flush();
        self.inner.profiler.set(on);
    }

    /// Whether the profiler is on.
    pub fn is_profiling(&self) -> bool {
        self.inner.profiler.is_on()
    }

    /// What the profiler recorded so far (submitting what is pending first).
    pub fn profile(&self) -> Profile {
        self.flush();
        self.inner.profiler.snapshot()
    }

    /// What the profiler recorded so far, clearing its log.
    pub fn take_profile(&self) -> Profile {
        self.flush();
        self.inner.profiler.take()
    }

    /// Whether the adapter has timestamp queries, so the profiler times
    /// each kernel rather than each submit.
    pub fn has_timestamps(&self) -> bool {
        self.inner.profiler.support != TimestampSupport::None
    }

    /// Whether eager elementwise ops over the same shape are merged into one
    /// dispatch, run at the next command of another kind (on by default;
    /// `WGRAD_MERGE=0` starts a device with it off). Results are the same
    /// bits either way; off gives one dispatch per op, the classic eager
    /// executor, which benchmarks use as their baseline.
    pub fn set_merge_elementwise(&self, on: bool) {
        drop(self.lock_batch());
        self.inner.merge.store(on, Ordering::Relaxed);
    }

    /// See [`Self::set_merge_elementwise`].
    pub fn merges_elementwise(&self) -> bool {
        self.inner.merge.load(Ordering::Relaxed)
    }

    /// The adapter this device runs on.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// This device's identity.
    pub fn id(&self) -> DeviceId {
        self.inner.id
    }

    /// Whether `DType::F16` tensors can be used (the adapter has `SHADER_F16`).
    pub fn supports_f16(&self) -> bool {
        self.inner.f16
    }

    /// The largest tensor, in bytes, that fits one storage binding.
    pub fn max_tensor_bytes(&self) -> u64 {
        self.inner.limits.max_storage_buffer_binding_size.min(self.inner.limits.max_buffer_size)
    }

    /// Bytes live, peak and pooled.
    pub fn memory_stats(&self) -> MemoryStats {
        // Pending elementwise ops hold their inputs until they are
        // dispatched; do that first, so live bytes are what tensors hold.
        drop(self.lock_batch());
        self.inner.pool.lock().stats
    }

    /// Restarts peak tracking from the current live bytes.
    pub fn reset_peak_memory(&self) {
        let mut pool = self.inner.pool.lock();
        pool.stats.peak_bytes = pool.stats.live_bytes;
    }

    /// Releases every pooled (free) buffer back to the driver.
    pub fn empty_cache(&self) {
        drop(self.lock_batch());
        self.inner.pool.lock().clear();
    }

    /// Dispatch, submit, pipeline and transfer counts so far.
    pub fn counters(&self) -> DeviceCounters {
        *self.inner.counters.lock()
    }

    /// Submits pending work and waits until the device has finished it.
    pub fn synchronize(&self) -> Result<()> {
        self.flush();
        self.wait()?;
        self.take_uncaptured()
    }

    fn wait(&self) -> Result<()> {
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        self.inner
            .device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map(|_| ())
            .map_err(|e| self.gpu_error(e.to_string()))
    }

    /// An error wgpu reported: `DeviceLost` once the device is lost (every
    /// later failure follows from that), else `Gpu` with wgpu's text.
    fn gpu_error(&self, message: String) -> Error {
        self.lost().unwrap_or(Error::Gpu(message))
    }

    /// `DeviceLost` once the device is lost.
    fn lost(&self) -> Option<Error> {
        self.inner.lost.lock().clone().map(|reason| Error::DeviceLost { reason })
    }

    fn take_uncaptured(&self) -> Result<()> {
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        match self.inner.uncaptured.lock().take() {
            Some(message) => Err(self.gpu_error(message)),
            None => Ok(()),
        }
    }

    /// Storage for at least `bytes` of `dtype`: a range of an arena of
    /// that dtype, or for a large tensor a buffer of its own, from the pool
    /// or newly created.
    pub(crate) fn alloc(&self, bytes: u64, dtype: DType) -> Result<Arc<PooledBuffer>> {
        let limit = self.max_tensor_bytes();
        if bytes > limit {
            return Err(Error::TensorTooLarge { bytes, limit });
        }
        let class = size_class(bytes).next_multiple_of(ALLOC_ALIGN).min(limit.max(256));
        let pool = &self.inner.pool;
        if let Some(taken) = pool.lock().take(dtype, class) {
            return Ok(Arc::new(PooledBuffer::new(taken, class, bytes, pool.clone())));
        }
        let in_arena = pool.lock().in_arena(class);
        let size = if in_arena { pool.lock().arena_bytes } else { class };
        let buffer = match self.create_storage_buffer(size) {
            Some(buffer) => buffer,
            None => {
                // Give the pooled memory back to the driver and try once more.
                pool.lock().clear();
                self.create_storage_buffer(size)
                    .ok_or_else(|| Error::OutOfMemory { bytes: size, live: pool.lock().stats.live_bytes })?
            }
        };
        let mut p = pool.lock();
        let taken = if in_arena {
            p.add_arena(dtype, buffer);
            p.take(dtype, class).expect("a new arena has room for a quarter of itself")
        } else {
            p.dedicated(class, buffer)
        };
        drop(p);
        Ok(Arc::new(PooledBuffer::new(taken, class, bytes, pool.clone())))
    }

    /// A new storage buffer, or `None` if the device is out of memory.
    fn create_storage_buffer(&self, bytes: u64) -> Option<wgpu::Buffer> {
        let scope = self.inner.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        self.inner.counters.lock().buffers_created += 1;
        let buffer = self.inner.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgrad tensor"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        pollster::block_on(scope.pop()).is_none().then_some(buffer)
    }

    /// The compute pipeline for a WGSL source, created once and cached by
    /// its text. Compile errors come back as [`Error::Shader`].
    pub(crate) fn pipeline(&self, label: &str, source: &str) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.inner.pipelines.lock().get(source) {
            return Ok(p.clone());
        }
        crate::exec::codegen::check_uniform_reads(label, source)?;
        let device = &self.inner.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader { label: label.to_string(), message: e.to_string() });
        }
        if std::env::var_os("WGRAD_LOG_WGSL").is_some() {
            eprintln!("wgrad: new pipeline `{label}`:\n{source}");
        }
        self.inner.counters.lock().pipelines_created += 1;
        self.inner.pipelines.lock().insert(source.to_string(), pipeline.clone());
        Ok(pipeline)
    }

    /// Checks a dispatch of `op` on `operands` on the host (usage
    /// conflicts, the binding limit) and carries spoiled inputs over to its
    /// outputs; returns the operands it writes.
    fn checked_writes(
        &self,
        op: &'static str,
        buffers: usize,
        operands: &[Operand],
        written: &[bool],
    ) -> Result<Vec<Operand>> {
        if buffers > self.max_storage_bindings() {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "a kernel would bind {buffers} storage buffers, more than the device's {}; its operands \
                     are spread over more arenas than that (see `Device::limits`)",
                    self.max_storage_bindings()
                ),
            });
        }
        let writes: Vec<&Operand> = operands.iter().zip(written).filter(|(_, w)| **w).map(|(o, _)| o).collect();
        let bound: Vec<&Operand> = operands.iter().collect();
        self.inner.pool.lock().poison.record(&bound, &writes);
        Ok(writes.into_iter().cloned().collect())
    }

    /// Appends a dispatch: binding 0 is a uniform holding `params`, bindings
    /// 1.. are `buffers` in order; `operands` (with which of them are
    /// `written`) are the tensors' storage the kernel reaches through them,
    /// for the host checks. `threads` is split into a grid that respects
    /// the per-dimension workgroup limit (see [`Self::grid_1d`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        op: &'static str,
        info: &KernelInfo,
        pipeline: &wgpu::ComputePipeline,
        params: &[u32],
        buffers: &[wgpu::Buffer],
        operands: &[Operand],
        written: &[bool],
        grid: [u32; 3],
    ) -> Result<()> {
        let mut batch = self.lock_batch();
        self.push_dispatch(&mut batch, op, info, pipeline, params, buffers, operands, written, grid)
    }

    #[allow(clippy::too_many_arguments)]
    fn push_dispatch(
        &self,
        batch: &mut Batch,
        op: &'static str,
        info: &KernelInfo,
        pipeline: &wgpu::ComputePipeline,
        params: &[u32],
        buffers: &[wgpu::Buffer],
        operands: &[Operand],
        written: &[bool],
        grid: [u32; 3],
    ) -> Result<()> {
        if grid.contains(&0) {
            return Ok(());
        }
        if !(cfg!(test) && op == crate::poison::INJECTED_FAULT) {
            crate::poison::check_conflicts(op, operands, written, &[])?;
        }
        let writes = self.checked_writes(op, buffers.len(), operands, written)?;
        let align = self.inner.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let bytes: &[u8] = bytemuck::cast_slice(params);
        let size = bytes.len().max(16).next_multiple_of(16);
        let mut offset = batch.uniforms.len().next_multiple_of(align);
        if offset + size > ARENA_BYTES as usize || batch.commands.len() >= MAX_BATCH {
            self.submit_batch(batch);
            offset = 0;
        }
        batch.uniforms.resize(offset, 0);
        batch.uniforms.extend_from_slice(bytes);
        batch.uniforms.resize(offset + size, 0);

        let layout = pipeline.get_bind_group_layout(0);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.inner.arena,
                offset: offset as u64,
                size: wgpu::BufferSize::new(size as u64),
            }),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() });
        }
        let errors = self.inner.errors.load(Ordering::SeqCst);
        let bind_group = self.inner.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        });
        if self.inner.errors.load(Ordering::SeqCst) != errors {
            // wgpu rejected the bind group: this op's own error, at its call.
            let message = self.inner.uncaptured.lock().take().unwrap_or_default();
            return Err(Error::GpuFailed { op, message });
        }
        let info = self.inner.profiler.is_on().then(|| info.clone());
        batch.commands.push(Command::Dispatch { op, pipeline: pipeline.clone(), bind_group, grid, writes, info });
        self.inner.counters.lock().dispatches += 1;
        Ok(())
    }

    /// Records, in queue order with the pending commands, a write of
    /// `words` at `offset` of `uniform` (a compiled program's uniform, whose
    /// earlier dispatches in the batch keep reading the old words).
    /// How many batches wgpu has rejected: a write recorded before the
    /// count changed may never have run (compiled programs re-record theirs).
    pub(crate) fn failed_batches(&self) -> u64 {
        self.inner.failed_batches.load(Ordering::SeqCst)
    }

    /// Records a copy of `words` into `uniform` at `offset`, in queue order
    /// with the pending work (staged in the batch's uniform arena; a write
    /// larger than a quarter of the arena goes in pieces, so any size fits).
    pub(crate) fn record_uniform_write(&self, uniform: &wgpu::Buffer, offset: u64, words: &[u32]) {
        const PIECE_WORDS: usize = ARENA_BYTES as usize / 16;
        if words.len() > PIECE_WORDS {
            for (k, piece) in words.chunks(PIECE_WORDS).enumerate() {
                self.record_uniform_write(uniform, offset + (k * PIECE_WORDS * 4) as u64, piece);
            }
            return;
        }
        let mut batch = self.lock_batch();
        let bytes: &[u8] = bytemuck::cast_slice(words);
        let size = bytes.len().max(16).next_multiple_of(16);
        let align = self.uniform_alignment();
        let mut at = batch.uniforms.len().next_multiple_of(align);
        if at + size > ARENA_BYTES as usize || batch.commands.len() >= MAX_BATCH {
            self.submit_batch(&mut batch);
            at = 0;
        }
        batch.uniforms.resize(at, 0);
        batch.uniforms.extend_from_slice(bytes);
        batch.uniforms.resize(at + size, 0);
        let (src, src_offset) = (self.inner.arena.clone(), at as u64);
        batch.commands.push(Command::Copy {
            src,
            src_offset,
            dst: uniform.clone(),
            dst_offset: offset,
            size: size as u64,
            spoils_dst: false,
        });
    }

    /// A uniform buffer holding `bytes` (a compiled program's sizes).
    pub(crate) fn create_uniform(&self, bytes: &[u8]) -> wgpu::Buffer {
        self.inner.counters.lock().buffers_created += 1;
        let buffer = self.inner.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgrad program uniforms"),
            size: (bytes.len().max(16) as u64).next_multiple_of(16),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.inner.queue.write_buffer(&buffer, 0, bytes);
        buffer
    }

    /// The alignment of uniform offsets in one buffer.
    pub(crate) fn uniform_alignment(&self) -> usize {
        self.inner.limits.min_uniform_buffer_offset_alignment.max(16) as usize
    }

    /// The matmul template for this adapter, chosen when the device was made.
    pub(crate) fn matmul_template(&self) -> crate::exec::codegen::MatmulTemplate {
        self.inner.matmul
    }

    /// How row kernels spread a row, chosen when the device was made.
    pub(crate) fn row_form(&self) -> crate::exec::codegen::RowForm {
        self.inner.rows
    }

    /// Tensors larger than this many bytes get a buffer of their own
    /// rather than a range of an arena.
    pub(crate) fn dedicated_bytes(&self) -> u64 {
        self.inner.pool.lock().dedicated_above()
    }

    /// The most storage buffers one kernel may bind.
    pub(crate) fn max_storage_bindings(&self) -> usize {
        self.inner.limits.max_storage_buffers_per_shader_stage as usize
    }

    /// A bind group: the uniform slice, then `buffers` whole, in order.
    pub(crate) fn bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        uniform: &wgpu::Buffer,
        offset: u64,
        size: u64,
        buffers: &[wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let layout = pipeline.get_bind_group_layout(0);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: uniform,
                offset,
                size: wgpu::BufferSize::new(size),
            }),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() });
        }
        self.inner.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        })
    }

    /// Submits the pending batch now if `commands` more would not fit in it,
    /// so that they are recorded into one encoder.
    pub(crate) fn reserve(&self, commands: usize) {
        let mut batch = self.lock_batch();
        if batch.commands.len() + commands > MAX_BATCH {
            self.submit_batch(&mut batch);
        }
    }

    /// Appends a dispatch with a ready bind group to the pending batch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch_bound(
        &self,
        op: &'static str,
        info: &KernelInfo,
        pipeline: &wgpu::ComputePipeline,
        bind_group: &wgpu::BindGroup,
        buffers: usize,
        operands: &[Operand],
        written: &[bool],
        grid: [u32; 3],
    ) -> Result<()> {
        if grid.contains(&0) {
            return Ok(());
        }
        let writes = self.checked_writes(op, buffers, operands, written)?;
        let mut batch = self.lock_batch();
        if batch.commands.len() >= MAX_BATCH {
            self.submit_batch(&mut batch);
        }
        let (pipeline, bind_group) = (pipeline.clone(), bind_group.clone());
        let info = self.inner.profiler.is_on().then(|| info.clone());
        batch.commands.push(Command::Dispatch { op, pipeline, bind_group, grid, writes, info });
        self.inner.counters.lock().dispatches += 1;
        Ok(())
    }

    /// A grid of `WORKGROUP_SIZE`-thread workgroups covering `threads`
    /// invocations. Kernels recover the linear id as
    /// `gid.x + gid.y * num_workgroups.x * WORKGROUP_SIZE`, so grids wider
    /// than the per-dimension limit fold into a second dimension.
    pub(crate) fn grid_1d(&self, threads: u64) -> Result<[u32; 3]> {
        self.grid_of(threads, WORKGROUP_SIZE)
    }

    /// [`Device::grid_1d`] for kernels of `group`-thread workgroups.
    pub(crate) fn grid_of(&self, threads: u64, group: u32) -> Result<[u32; 3]> {
        let groups = threads.div_ceil(group as u64);
        let max = self.inner.limits.max_compute_workgroups_per_dimension as u64;
        if groups <= max {
            return Ok([groups as u32, 1, 1]);
        }
        let y = groups.div_ceil(max);
        if y > max {
            return Err(Error::TensorTooLarge { bytes: threads * 4, limit: max * max * group as u64 * 4 });
        }
        Ok([max as u32, y as u32, 1])
    }

    /// Copies host bytes into a new pooled buffer, in queue order with the
    /// pending dispatches (a staging buffer and a recorded copy, so a pooled
    /// buffer that pending commands still read is never overwritten early).
    pub(crate) fn upload(&self, bytes: &[u8], dtype: DType) -> Result<Arc<PooledBuffer>> {
        let buffer = self.alloc(bytes.len() as u64, dtype)?;
        if bytes.is_empty() {
            return Ok(buffer);
        }
        let padded = (bytes.len() as u64).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        self.inner.counters.lock().buffers_created += 1;
        let staging = self.inner.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgrad upload"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        {
            let mut view = staging.get_mapped_range_mut(..).map_err(|e| self.gpu_error(e.to_string()))?;
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        staging.unmap();
        let mut batch = self.lock_batch();
        // A new tensor's storage: whatever the pooled range held before is gone.
        self.inner.pool.lock().poison.forget(buffer.raw(), buffer.range());
        batch.commands.push(Command::Copy {
            src: staging,
            src_offset: 0,
            dst: buffer.raw().clone(),
            dst_offset: buffer.range().start,
            size: padded,
            spoils_dst: true,
        });
        self.inner.counters.lock().uploads += 1;
        Ok(buffer)
    }

    /// Reads `size` bytes at `offset` of a tensor's storage back to the
    /// host, after all pending work.
    pub(crate) fn read(&self, storage: &Operand, offset: u64, size: u64) -> Result<Vec<u8>> {
        if size == 0 {
            return Ok(Vec::new());
        }
        let buffer = &storage.buffer;
        let offset = storage.range.start + offset;
        let start = offset - offset % wgpu::COPY_BUFFER_ALIGNMENT;
        let end = (offset + size).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        // One staging buffer is kept and reused while large enough, so a
        // training loop's per-step loss readback allocates nothing.
        let reused = self.inner.readback.lock().take().filter(|b| b.size() >= end - start);
        let staging = match reused {
            Some(b) => b,
            None => {
                self.inner.counters.lock().buffers_created += 1;
                self.inner.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wgrad readback"),
                    size: match end - start {
                        small if small <= KEPT_READBACK_BYTES => small.next_power_of_two().max(256),
                        large => large,
                    },
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }
        };
        {
            let mut batch = self.lock_batch();
            batch.commands.push(Command::Copy {
                src: buffer.clone(),
                src_offset: start,
                dst: staging.clone(),
                dst_offset: 0,
                size: end - start,
                spoils_dst: false,
            });
            self.submit_batch(&mut batch);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        self.take_uncaptured()?;
        // The batch that computed this buffer failed: its bytes are stale.
        if let Some(spoiled) = self.inner.pool.lock().poison.get(buffer, &storage.range) {
            return Err(spoiled.error());
        }
        let readback = |e: String| match self.gpu_error(e) {
            Error::Gpu(message) => Error::Readback(message),
            lost => lost,
        };
        rx.recv().map_err(|e| readback(e.to_string()))?.map_err(|e| readback(e.to_string()))?;
        let view = staging.get_mapped_range(..).map_err(|e| readback(e.to_string()))?;
        let lo = (offset - start) as usize;
        let out = view[lo..lo + size as usize].to_vec();
        drop(view);
        staging.unmap();
        if staging.size() <= KEPT_READBACK_BYTES {
            *self.inner.readback.lock() = Some(staging);
        }
        self.inner.counters.lock().readbacks += 1;
        Ok(out)
    }

    /// Appends an elementwise op to the pending group, dispatching the group
    /// first if the op cannot join it (`exec::merge`).
    pub(crate) fn defer_map(&self, op: MapOp<'_>) -> Result<()> {
        let mut batch = self.inner.batch.lock();
        let max = (MAX_MERGED_BINDINGS, self.max_storage_bindings());
        if !self.merges_elementwise() {
            // One op alone is a group of one, dispatched at once.
            self.dispatch_pending(&mut batch)?;
            batch.pending = Some(PendingMaps::new(&op));
            return self.dispatch_pending(&mut batch);
        }
        if let Some(group) = batch.pending.as_mut() {
            if group.join(&op, max) {
                return Ok(());
            }
        }
        self.dispatch_pending(&mut batch)?;
        batch.pending = Some(PendingMaps::new(&op));
        Ok(())
    }

    /// The batch, with the pending elementwise group dispatched into it so
    /// that what comes next sees its results. A failure to build that
    /// kernel is reported at the next sync.
    fn lock_batch(&self) -> parking_lot::MutexGuard<'_, Batch> {
        let mut batch = self.inner.batch.lock();
        // On failure the group's outputs are spoiled (see `dispatch_pending`):
        // their readers get the error, not whoever syncs next.
        let _ = self.dispatch_pending(&mut batch);
        batch
    }

    fn dispatch_pending(&self, batch: &mut Batch) -> Result<()> {
        let Some(merged) = batch.pending.take().and_then(PendingMaps::finish) else {
            return Ok(());
        };
        let label = merged.label;
        let operands: Vec<Operand> = merged.operands();
        let outputs: Vec<Operand> = operands[merged.views.len()..].to_vec();
        let result = (|| {
            let launch = crate::exec::map_launch(
                self,
                merged.label,
                merged.kernel,
                &merged.shape,
                &merged.views,
                &merged.out_views,
                &merged.scalars,
            )?;
            let (binds, buffers) = crate::exec::bind::Binds::of(&operands, &launch.written);
            let pipeline = self.pipeline(launch.label, &launch.source(&binds))?;
            let words = launch.words_for(&operands);
            let written = &launch.written;
            self.push_dispatch(batch, label, &launch.info, &pipeline, &words, &buffers, &operands, written, launch.grid)
        })();
        if let Err(e) = &result {
            // The group's ops returned Ok when they joined it; their outputs
            // will never be written, so they report this error when read.
            let written = outputs.into_iter().map(|o| (label, o.buffer, o.range)).collect();
            self.inner.pool.lock().poison.spoil(written, &e.to_string());
        }
        result
    }

    /// Submits the pending batch without waiting.
    pub(crate) fn flush(&self) {
        let mut batch = self.lock_batch();
        self.submit_batch(&mut batch);
    }

    fn submit_batch(&self, batch: &mut Batch) {
        if batch.commands.is_empty() {
            return;
        }
        let inner = &self.inner;
        if !batch.uniforms.is_empty() {
            inner.queue.write_buffer(&inner.arena, 0, &batch.uniforms);
        }
        let mut encoder =
            inner.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("wgrad batch") });
        // Consecutive dispatches share one compute pass (wgpu still inserts
        // the barriers between them); a copy ends the pass.
        let mut pass: Option<wgpu::ComputePass<'static>> = None;
        let errors = inner.errors.load(Ordering::SeqCst);
        let mut written: Vec<(&'static str, wgpu::Buffer, std::ops::Range<u64>)> = Vec::new();
        // While profiling: what each dispatch computes, and its timestamps.
        let timer = inner.profiler.is_on().then(|| {
            let dispatches = batch.commands.iter().filter(|c| matches!(c, Command::Dispatch { .. })).count();
            BatchTimer::new(&inner.device, inner.profiler.support, dispatches)
        });
        let mut profiled: Vec<(&'static str, KernelInfo)> = Vec::new();
        for cmd in batch.commands.drain(..) {
            match cmd {
                Command::Dispatch { op, pipeline, bind_group, grid, writes, info } => {
                    written.extend(writes.into_iter().map(|w| (op, w.buffer, w.range)));
                    let i = profiled.len();
                    let own_pass = timer.as_ref().and_then(|t| t.pass_writes(i));
                    if own_pass.is_some() {
                        pass = None;
                    }
                    let pass = pass.get_or_insert_with(|| {
                        let descriptor = wgpu::ComputePassDescriptor { label: None, timestamp_writes: own_pass };
                        encoder.begin_compute_pass(&descriptor).forget_lifetime()
                    });
                    if let Some(t) = &timer {
                        t.write(pass, i, false);
                    }
                    pass.set_pipeline(&pipeline);
                    pass.set_bind_group(0, &bind_group, &[]);
                    pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                    if let Some(t) = &timer {
                        t.write(pass, i, true);
                        // A dispatch recorded before profiling was switched on has no info.
                        profiled.push((op, info.unwrap_or_else(|| KernelInfo::new(op, "", 0, 0))));
                    }
                }
                Command::Copy { src, src_offset, dst, dst_offset, size, spoils_dst } => {
                    pass = None;
                    encoder.copy_buffer_to_buffer(&src, src_offset, &dst, dst_offset, size);
                    if spoils_dst {
                        written.push(("from_slice", dst, dst_offset..dst_offset + size));
                    }
                }
            }
        }
        drop(pass);
        batch.uniforms.clear();
        let staging = timer.as_ref().and_then(|t| t.resolve(&inner.device, &mut encoder));
        inner.queue.submit([encoder.finish()]);
        inner.counters.lock().submits += 1;
        let failed = inner.errors.load(Ordering::SeqCst) != errors;
        // Batches of copies only have no kernel to time; a rejected batch ran nothing.
        if let Some(timer) = timer.filter(|_| !profiled.is_empty() && !failed) {
            let (ticks, wall_ns) = timer.finish(&inner.device, staging);
            inner.profiler.record(profiled, ticks, wall_ns);
        }
        if failed {
            inner.failed_batches.fetch_add(1, Ordering::SeqCst);
            // wgpu rejected the batch, so none of it ran: every buffer it
            // writes is stale, and reports this error when read (`poison`).
            let message = inner.uncaptured.lock().take().unwrap_or_default();
            inner.pool.lock().poison.spoil(written, &message);
        }
    }
}

/// wgpu's own text of an error: its `Display` is only the kind
/// ("Validation Error"); the description says what was wrong.
fn describe_gpu_error(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::Validation { description, .. } | wgpu::Error::Internal { description, .. } => {
            // One line: the kind, then each cause.
            description.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
        }
        wgpu::Error::OutOfMemory { .. } => "out of device memory".to_string(),
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({}, {})", self.inner.id, self.inner.info)
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Device) -> bool {
        self.inner.id == other.inner.id
    }
}
