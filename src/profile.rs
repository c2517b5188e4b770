//! The kernel profiler: the GPU time of every dispatch, from timestamp
//! queries where the adapter has them, else the wall-clock time of each
//! submit. Off by default, when it costs an atomic load per dispatch and
//! per submit, and the short description each eager launch carries (a few
//! op names; `scripts/profile-overhead.sh` measures no difference against
//! the commit before the profiler). On (`Device::set_profiling`, or
//! `WGRAD_PROFILE=1` for every device), each submit waits for the GPU and
//! reads its timestamps back, so profiled runs are slower by that sync.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

/// What a dispatch computes, for the profiler: the kernel template, the
/// ops fused into it, and the bytes it moves and floating-point operations
/// it performs, estimated from shapes (each element of each binding read
/// or written once; 2·m·n·k for a matmul).
#[derive(Debug, Clone)]
pub(crate) struct KernelInfo {
    pub kernel: &'static str,
    pub fused: Arc<str>,
    pub bytes: u64,
    pub flops: u64,
}

impl KernelInfo {
    pub fn new(kernel: &'static str, fused: impl Into<Arc<str>>, bytes: u64, flops: u64) -> KernelInfo {
        KernelInfo { kernel, fused: fused.into(), bytes, flops }
    }
}

/// How a batch was timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// Each dispatch's GPU time, from timestamp queries.
    GpuTimestamps,
    /// The adapter has no timestamp queries: the batch's wall-clock time
    /// from submit to completion, with no per-kernel split.
    WallClock,
}

/// One profiled dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelRecord {
    /// The kernel template: `map`, `reduce`, `matmul`, `optimizer`, ...
    pub kernel: &'static str,
    /// The ops fused into it, in order.
    pub fused: String,
    /// The op (or `compiled backward`) that dispatched it.
    pub op: &'static str,
    /// Start, in ns since the device's first profiled batch (GPU clock with
    /// timestamps; `None` without).
    pub start_ns: Option<f64>,
    /// GPU time in ns (`None` without timestamps).
    pub ns: Option<f64>,
    /// Bytes read and written, estimated from shapes.
    pub bytes: u64,
    /// Floating-point operations (matmuls only; 0 elsewhere).
    pub flops: u64,
}

/// One submitted batch: an eager batch, or (part of) a compiled program's replay.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    /// Its number among the device's profiled batches.
    pub index: u64,
    /// `compiled backward` when a compiled program dispatched any of its
    /// kernels, `eager` otherwise (each kernel's `op` says which it was).
    pub scope: &'static str,
    /// How it was timed.
    pub timing: Timing,
    /// Host time from encoding the batch to its completion, ns.
    pub wall_ns: f64,
    /// Its dispatches, in order.
    pub kernels: Vec<KernelRecord>,
}

impl BatchRecord {
    /// The GPU time of its kernels (timestamps), else its wall-clock time.
    pub fn total_ns(&self) -> f64 {
        match self.timing {
            Timing::GpuTimestamps => self.kernels.iter().filter_map(|k| k.ns).sum(),
            Timing::WallClock => self.wall_ns,
        }
    }
}

/// What the profiler recorded since it was switched on (or last taken).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Profile {
    /// The batches, in submit order.
    pub batches: Vec<BatchRecord>,
}

fn rate(amount: u64, ns: Option<f64>, unit: f64) -> String {
    match ns {
        Some(ns) if ns > 0.0 && amount > 0 => format!("{:.1}", amount as f64 / ns / unit),
        _ => "-".into(),
    }
}

fn ms(ns: Option<f64>) -> String {
    ns.map_or("-".into(), |ns| format!("{:.4}", ns / 1e6))
}

fn share(ns: Option<f64>, total: f64) -> String {
    match ns {
        Some(ns) if total > 0.0 => format!("{:.1}%", 100.0 * ns / total),
        _ => "-".into(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.3}", bytes as f64 / (1024.0 * 1024.0))
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width { s.to_string() } else { s.chars().take(width - 1).collect::<String>() + "…" }
}

const HEADER: &str = "kernel     fused                                      time ms    MiB      GB/s  GFLOP/s  share";

/// Kernels summed into one table row: `count` of them.
struct Row {
    scope: &'static str,
    kernel: &'static str,
    fused: String,
    ns: Option<f64>,
    bytes: u64,
    flops: u64,
    count: usize,
}

impl Row {
    fn of(scope: &'static str, k: &KernelRecord) -> Row {
        Row { scope, kernel: k.kernel, fused: k.fused.clone(), ns: k.ns, bytes: k.bytes, flops: k.flops, count: 1 }
    }

    fn add(&mut self, k: &KernelRecord) {
        self.ns = self.ns.zip(k.ns).map(|(a, b)| a + b);
        self.bytes += k.bytes;
        self.flops += k.flops;
        self.count += 1;
    }

    fn write(&self, out: &mut String, total: f64) {
        let fused = match self.count {
            1 => self.fused.clone(),
            n => format!("{n}× {}", self.fused),
        };
        let _ = writeln!(
            out,
            "{:<10} {:<42} {:>8} {:>6} {:>9} {:>8} {:>6}",
            self.kernel,
            clip(&fused, 42),
            ms(self.ns),
            mib(self.bytes),
            rate(self.bytes, self.ns, 1.0),
            rate(self.flops, self.ns, 1.0),
            share(self.ns, total)
        );
    }
}

impl Profile {
    /// Whether every batch has per-kernel GPU times.
    pub fn has_timestamps(&self) -> bool {
        !self.batches.is_empty() && self.batches.iter().all(|b| b.timing == Timing::GpuTimestamps)
    }

    /// The total time: GPU time of every kernel, or wall-clock per batch
    /// where there are no timestamps.
    pub fn total_ns(&self) -> f64 {
        self.batches.iter().map(BatchRecord::total_ns).sum()
    }

    /// One table per batch: each kernel, what it fused, its time, bytes,
    /// achieved GB/s and GFLOP/s, and its share of the batch.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for b in &self.batches {
            let total = b.total_ns();
            let how = match b.timing {
                Timing::GpuTimestamps => "GPU timestamps",
                Timing::WallClock => "no timestamp queries on this adapter: wall-clock per submit",
            };
            let _ = writeln!(
                out,
                "batch {} ({}), {} kernels, {:.4} ms [{how}]",
                b.index,
                b.scope,
                b.kernels.len(),
                total / 1e6
            );
            let _ = writeln!(out, "{HEADER}");
            for k in &b.kernels {
                Row::of(b.scope, k).write(&mut out, total);
            }
        }
        out
    }

    /// The kernels of every batch summed by (scope, kernel, fused ops),
    /// largest first, with each one's share of the whole profile: where a
    /// step's time goes.
    pub fn summary(&self) -> String {
        let total = self.total_ns();
        let mut groups: Vec<Row> = Vec::new();
        for b in &self.batches {
            for k in &b.kernels {
                let scope = if k.op == "compiled backward" { "compiled" } else { "eager" };
                match groups.iter_mut().find(|g| g.scope == scope && g.kernel == k.kernel && g.fused == k.fused) {
                    Some(g) => g.add(k),
                    None => groups.push(Row::of(scope, k)),
                }
            }
        }
        groups.sort_by(|a, b| b.ns.unwrap_or(0.0).total_cmp(&a.ns.unwrap_or(0.0)));
        let kernels: usize = self.batches.iter().map(|b| b.kernels.len()).sum();
        let mut out = format!(
            "{} batches, {kernels} kernels, {:.4} ms{}\n",
            self.batches.len(),
            total / 1e6,
            if self.has_timestamps() { " of GPU time" } else { " (wall-clock per submit: no timestamp queries)" }
        );
        let _ = writeln!(out, "scope     {HEADER}");
        for g in groups {
            out.push_str(&format!("{:<9} ", g.scope));
            g.write(&mut out, total);
        }
        out
    }

    /// The profile as a Chrome trace (JSON), which Perfetto and
    /// `chrome://tracing` open: one track per scope, one slice per kernel
    /// (per batch where there are no timestamps).
    pub fn chrome_trace(&self) -> String {
        let mut events = Vec::new();
        let escape = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut clock = 0.0f64;
        for b in &self.batches {
            let tid = if b.scope == "compiled backward" { 2 } else { 1 };
            match b.timing {
                Timing::GpuTimestamps => {
                    for k in &b.kernels {
                        let tid = if k.op == "compiled backward" { 2 } else { 1 };
                        let (Some(start), Some(ns)) = (k.start_ns, k.ns) else { continue };
                        events.push(format!(
                            "{{\"name\":\"{} {}\",\"cat\":\"{}\",\"ph\":\"X\",\"ts\":{:.3},\"dur\":{:.3},\"pid\":1,\"tid\":{tid},\"args\":{{\"op\":\"{}\",\"bytes\":{},\"flops\":{},\"batch\":{}}}}}",
                            k.kernel,
                            escape(&k.fused),
                            b.scope,
                            start / 1e3,
                            ns / 1e3,
                            k.op,
                            k.bytes,
                            k.flops,
                            b.index
                        ));
                    }
                }
                Timing::WallClock => {
                    events.push(format!(
                        "{{\"name\":\"batch {} ({} kernels)\",\"cat\":\"{}\",\"ph\":\"X\",\"ts\":{:.3},\"dur\":{:.3},\"pid\":1,\"tid\":{tid}}}",
                        b.index,
                        b.kernels.len(),
                        b.scope,
                        clock / 1e3,
                        b.wall_ns / 1e3
                    ));
                    clock += b.wall_ns;
                }
            }
        }
        let names = "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":1,\"args\":{\"name\":\"eager\"}},\
                     {\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":2,\"args\":{\"name\":\"compiled backward\"}}";
        let sep = if events.is_empty() { "" } else { "," };
        format!("{{\"traceEvents\":[{names}{sep}{}],\"displayTimeUnit\":\"ms\"}}\n", events.join(","))
    }
}

/// The device's profiler state.
pub(crate) struct Profiler {
    on: AtomicBool,
    /// Print each batch's table to stderr (`WGRAD_PROFILE=1`).
    print: bool,
    /// Timestamp queries: none, per pass, or inside passes.
    pub support: TimestampSupport,
    /// ns per timestamp tick.
    period: f64,
    next_index: AtomicU64,
    /// The GPU clock of the first timed kernel: the trace's origin.
    origin: Mutex<Option<u64>>,
    log: Mutex<Vec<BatchRecord>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimestampSupport {
    None,
    /// At the beginning and end of compute passes: one pass per dispatch.
    PerPass,
    /// Anywhere in a pass: one pass for consecutive dispatches, as unprofiled.
    InsidePasses,
}

impl Profiler {
    pub fn new(support: TimestampSupport, period: f32) -> Profiler {
        let print = std::env::var("WGRAD_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
        Profiler {
            on: AtomicBool::new(print),
            print,
            support,
            period: f64::from(period),
            next_index: AtomicU64::new(0),
            origin: Mutex::new(None),
            log: Mutex::new(Vec::new()),
        }
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Profile {
        Profile { batches: self.log.lock().clone() }
    }

    pub fn take(&self) -> Profile {
        Profile { batches: std::mem::take(&mut *self.log.lock()) }
    }

    /// Records a finished batch: `ticks` are the (begin, end) timestamps of
    /// each dispatch, when the adapter has them.
    pub fn record(&self, dispatched: Vec<(&'static str, KernelInfo)>, ticks: Option<Vec<(u64, u64)>>, wall_ns: f64) {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let scope =
            if dispatched.iter().any(|(op, _)| *op == "compiled backward") { "compiled backward" } else { "eager" };
        let origin = match (&ticks, ticks.as_ref().and_then(|t| t.first())) {
            (Some(_), Some(&(first, _))) => Some(*self.origin.lock().get_or_insert(first)),
            _ => None,
        };
        let kernels = dispatched
            .into_iter()
            .enumerate()
            .map(|(i, (op, info))| {
                let tick = ticks.as_ref().and_then(|t| t.get(i).copied());
                let to_ns = |t: u64| t as f64 * self.period;
                KernelRecord {
                    kernel: info.kernel,
                    fused: info.fused.to_string(),
                    op,
                    start_ns: tick.zip(origin).map(|((b, _), o)| to_ns(b.saturating_sub(o))),
                    ns: tick.map(|(b, e)| to_ns(e.saturating_sub(b))),
                    bytes: info.bytes,
                    flops: info.flops,
                }
            })
            .collect();
        let timing = if ticks.is_some() { Timing::GpuTimestamps } else { Timing::WallClock };
        let record = BatchRecord { index, scope, timing, wall_ns, kernels };
        if self.print {
            eprint!("{}", Profile { batches: vec![record.clone()] }.table());
        }
        self.log.lock().push(record);
    }
}

/// The timestamp queries of one batch being encoded.
pub(crate) struct BatchTimer {
    pub support: TimestampSupport,
    queries: Option<wgpu::QuerySet>,
    count: u32,
    started: Instant,
}

impl BatchTimer {
    /// Timestamps for `dispatches` dispatches (two queries each).
    pub fn new(device: &wgpu::Device, support: TimestampSupport, dispatches: usize) -> BatchTimer {
        let count = (2 * dispatches).min(wgpu::QUERY_SET_MAX_QUERIES as usize) as u32;
        let queries = (support != TimestampSupport::None && count > 0).then(|| {
            device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("wgrad profiler"),
                ty: wgpu::QueryType::Timestamp,
                count,
            })
        });
        BatchTimer { support, queries, count, started: Instant::now() }
    }

    fn slot(&self, dispatch: usize, end: bool) -> Option<u32> {
        let q = 2 * dispatch as u32 + u32::from(end);
        (q < self.count).then_some(q)
    }

    /// The descriptor of dispatch `i`'s own pass (per-pass timestamps).
    pub fn pass_writes(&self, i: usize) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        let queries = self.queries.as_ref().filter(|_| self.support == TimestampSupport::PerPass)?;
        Some(wgpu::ComputePassTimestampWrites {
            query_set: queries,
            beginning_of_pass_write_index: self.slot(i, false),
            end_of_pass_write_index: self.slot(i, true),
        })
        .filter(|w| w.beginning_of_pass_write_index.is_some())
    }

    /// Writes dispatch `i`'s begin (`end == false`) or end timestamp inside the pass.
    pub fn write(&self, pass: &mut wgpu::ComputePass<'static>, i: usize, end: bool) {
        if let (Some(queries), TimestampSupport::InsidePasses, Some(q)) =
            (&self.queries, self.support, self.slot(i, end))
        {
            pass.write_timestamp(queries, q);
        }
    }

    /// Resolves the queries into a readable buffer, after the passes.
    pub fn resolve(&self, device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder) -> Option<wgpu::Buffer> {
        let queries = self.queries.as_ref()?;
        let bytes = u64::from(self.count) * wgpu::QUERY_SIZE as u64;
        let resolved = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgrad profiler resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgrad profiler readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        encoder.resolve_query_set(queries, 0..self.count, &resolved, 0);
        encoder.copy_buffer_to_buffer(&resolved, 0, &staging, 0, bytes);
        Some(staging)
    }

    /// Waits for the batch and returns (per-dispatch ticks, wall ns).
    pub fn finish(self, device: &wgpu::Device, staging: Option<wgpu::Buffer>) -> (Option<Vec<(u64, u64)>>, f64) {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(staging) = &staging {
            staging.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
        }
        let waited = device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
        let wall_ns = self.started.elapsed().as_nanos() as f64;
        let ticks = staging.filter(|_| waited.is_ok() && matches!(rx.recv(), Ok(Ok(())))).and_then(|staging| {
            let view = staging.get_mapped_range(..).ok()?;
            let words: &[u64] = bytemuck::cast_slice(&view);
            let pairs = words.chunks_exact(2).map(|p| (p[0], p[1])).collect();
            drop(view);
            staging.unmap();
            Some(pairs)
        });
        (ticks, wall_ns)
    }
}
