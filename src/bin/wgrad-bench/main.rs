//! `wgrad-bench`: the five workloads of WORKLOADS.md side by side in one
//! run, in four modes: `eager` (one dispatch per op, the classic eager
//! executor), `merged` (eager, with elementwise ops of one shape merged
//! into one dispatch: the library's default), `compiled` (merged
//! forward, compiled backward) and `step` (forward, backward and update
//! compiled as one program, `wgrad::compile_step`).
//!
//! ```sh
//! cargo run --release --bin wgrad-bench -- [--workload W1,W3] [--mode eager,merged,compiled,step]
//!     [--steps 20] [--small] [--json FILE] [--svg FILE] [--matmul 256,512] [--memory-steps 1000]
//!     [--profile] [--trace DIR] [--limits webgpu|adapter]
//! ```
//!
//! A step is forward + backward (+ W1's SGD update) + the loss read back
//! once. Reported: the first step (pipeline creation, capture), then the
//! median / min / max over `--steps` steps after 3 warm-ups, the modes'
//! steps interleaved so that a busy machine slows them alike; kernels and
//! submits per step, new pipelines and driver buffers over the measured
//! steps, peak device memory, and GFLOP/s (W1, W3) or GB/s (W2).
//! `--batch-sizes 10,20,..` runs W1 at each batch size in turn, compiled
//! backward and compiled step, and times each size's first call (see
//! `batches.rs`). `--rows 4x16384,..` times W4's backward eager and
//! compiled at those [rows, cols] (row kernels at few long rows, see
//! `rows.rs`). `--matmul` times the matmul kernel alone; `--memory-steps` runs W1
//! compiled that long and checks memory (see `memory.rs`). `--profile`
//! runs one more step of each (workload, mode) with the kernel profiler on
//! and prints where its GPU time went; `--trace DIR` also writes each of
//! those steps as a Chrome trace (`W1-compiled.json`, for Perfetto).
//! `--limits webgpu` runs on a device with exactly WebGPU's default limits
//! (8 storage bindings per kernel, ...; `DeviceOptions`); `--arenas
//! auto|always|never` chooses whether tensors share buffers
//! (`ArenaPolicy`; auto: only under tight limits). Besides W1-W5,
//! `--workload` takes W7 (Adam over 20 parameters) and W8 (a 40-input
//! sum), which need more than 8 bindings unless tensors share arenas, and
//! CNN (the digits examples' CNN and Adam on a batch of 64).

mod batches;
mod matmul;
mod memory;
mod rows;
mod workloads;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use wgrad::{ArenaPolicy, CompilerGuard, Device, DeviceOptions, LimitsPreset, WgslCompiler};
use workloads::{ALL, Id, WIDE, Workload};

struct Options {
    workloads: Vec<Id>,
    modes: Vec<Mode>,
    steps: usize,
    small: bool,
    json: Option<String>,
    svg: Option<String>,
    matmul: Vec<usize>,
    rows: Vec<(usize, usize)>,
    batch_sizes: Vec<usize>,
    memory_steps: Option<usize>,
    profile: bool,
    trace: Option<String>,
    limits: LimitsPreset,
    arenas: ArenaPolicy,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        workloads: ALL.into_iter().chain(WIDE).collect(),
        modes: Mode::ALL.to_vec(),
        steps: 20,
        small: false,
        json: None,
        svg: None,
        matmul: Vec::new(),
        rows: Vec::new(),
        batch_sizes: Vec::new(),
        memory_steps: None,
        profile: false,
        trace: None,
        limits: LimitsPreset::Adapter,
        arenas: ArenaPolicy::Auto,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--workload" => {
                o.workloads = value()?
                    .split(',')
                    .map(|s| Id::parse(s).ok_or(format!("unknown workload {s:?} (W1..W5, W7, W8, CNN)")))
                    .collect::<Result<_, _>>()?
            }
            "--mode" => {
                o.modes = value()?
                    .split(',')
                    .map(|m| match m.trim() {
                        "both" => Ok(vec![Mode::Eager, Mode::Compiled]),
                        "all" => Ok(Mode::ALL.to_vec()),
                        m => Mode::ALL
                            .into_iter()
                            .find(|x| x.name() == m)
                            .map(|x| vec![x])
                            .ok_or(format!("unknown mode {m:?} (eager, merged, compiled, step, all)")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat()
            }
            "--steps" => o.steps = value()?.parse::<usize>().map_err(|e| format!("--steps: {e}"))?.max(1),
            "--small" => o.small = true,
            "--profile" => o.profile = true,
            "--trace" => {
                o.trace = Some(value()?);
                o.profile = true;
            }
            "--arenas" => {
                o.arenas = match value()?.as_str() {
                    "auto" => ArenaPolicy::Auto,
                    "always" => ArenaPolicy::Always,
                    "never" => ArenaPolicy::Never,
                    other => return Err(format!("--arenas {other:?}: use auto, always or never")),
                }
            }
            "--limits" => {
                o.limits = match value()?.as_str() {
                    "webgpu" => LimitsPreset::WebGpu,
                    "adapter" => LimitsPreset::Adapter,
                    other => return Err(format!("--limits {other:?}: use webgpu or adapter")),
                }
            }
            "--json" => o.json = Some(value()?),
            "--svg" => o.svg = Some(value()?),
            "--memory-steps" => {
                o.memory_steps = Some(value()?.parse::<usize>().map_err(|e| format!("--memory-steps: {e}"))?.max(5));
                o.workloads.clear();
            }
            "--batch-sizes" => {
                o.batch_sizes = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("--batch-sizes {s:?}: {e}")))
                    .collect::<Result<_, _>>()?;
                o.workloads.clear();
            }
            "--matmul" => {
                o.matmul = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("--matmul {s:?}: {e}")))
                    .collect::<Result<_, _>>()?;
                o.workloads.clear();
            }
            "--rows" => {
                o.rows = value()?.split(',').map(rows::parse_shape).collect::<Result<_, _>>()?;
                o.workloads.clear();
            }
            "-h" | "--help" => {
                println!(
                    "usage: wgrad-bench [--workload W1,..] [--mode eager,merged,compiled,step] [--steps N] [--small] [--json FILE] [--svg FILE] [--matmul 256,512] [--memory-steps 1000] [--batch-sizes 10,20] [--rows 4x16384,256x1024] [--profile] [--trace DIR] [--limits webgpu|adapter] [--arenas auto|always|never]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(o)
}

/// One measured (workload, mode).
struct Row {
    id: Id,
    mode: Mode,
    first_ms: f64,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    kernels: f64,
    submits: f64,
    new_pipelines: u64,
    new_buffers: u64,
    peak_mb: f64,
    roofline: Option<(f64, &'static str)>,
    loss: f32,
    /// A compiled step's program bytes and its plan's liveness bound.
    plan: Option<(u64, u64)>,
}

/// One mode's side of a workload: its own copy of the workload and, when
/// compiled, its own compiler, installed only around its own steps.
struct Runner {
    mode: Mode,
    w: Workload,
    compiler: Option<Arc<WgslCompiler>>,
    /// The compiled step of `step` mode.
    compiled_step: Option<Box<dyn FnMut() -> wgrad::Result<f32>>>,
    plan: Option<workloads::PlanBytes>,
    first_ms: f64,
    /// Live bytes the workload holds between steps (weights, data,
    /// gradients, a compiled program's buffers).
    resident: u64,
    times: Vec<f64>,
    /// The most a step allocated above what was live when it started.
    step_peak: u64,
    counters: [u64; 4],
    loss: f32,
}

impl Runner {
    fn new(device: &Device, id: Id, mode: Mode, o: &Options) -> wgrad::Result<Runner> {
        device.synchronize()?;
        let live = device.memory_stats().live_bytes;
        let compiler = (mode == Mode::Compiled).then(|| Arc::new(WgslCompiler::new(device)));
        let mut w = Workload::new(id, device, o.small)?;
        let (compiled_step, plan) = match mode {
            Mode::Step => {
                let (step, plan) = w.compiled_step(device);
                (Some(step), Some(plan))
            }
            _ => (None, None),
        };
        let mut r = Runner {
            mode,
            w,
            compiler,
            compiled_step,
            plan,
            first_ms: 0.0,
            resident: 0,
            times: Vec::with_capacity(o.steps),
            step_peak: 0,
            counters: [0; 4],
            loss: 0.0,
        };
        device.synchronize()?;
        r.first_ms = r.step(device)?;
        for _ in 0..3 {
            r.step(device)?;
        }
        r.resident = device.memory_stats().live_bytes.saturating_sub(live);
        Ok(r)
    }

    /// One step in this runner's mode; its wall time in ms.
    fn step(&mut self, device: &Device) -> wgrad::Result<f64> {
        device.set_merge_elementwise(self.mode != Mode::Eager);
        let _guard = self.compiler.as_ref().map(|c| CompilerGuard::install_arc(c.clone())).transpose()?;
        device.synchronize()?;
        let live = device.memory_stats().live_bytes;
        device.reset_peak_memory();
        let before = device.counters();
        let t = Instant::now();
        self.loss = match &mut self.compiled_step {
            Some(step) => step()?,
            None => self.w.step()?,
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let after = device.counters();
        self.step_peak = self.step_peak.max(device.memory_stats().peak_bytes - live);
        let deltas = [
            after.dispatches - before.dispatches,
            after.submits - before.submits,
            after.pipelines_created - before.pipelines_created,
            after.buffers_created - before.buffers_created,
        ];
        for (c, d) in self.counters.iter_mut().zip(deltas) {
            *c += d;
        }
        Ok(ms)
    }

    fn row(mut self, id: Id) -> Row {
        let n = self.times.len() as f64;
        self.times.sort_by(f64::total_cmp);
        let median_ms = self.times[self.times.len() / 2];
        let roofline = match (self.w.flops, self.w.bytes) {
            (Some(f), _) => Some((f / (median_ms * 1e-3) / 1e9, "GFLOP/s")),
            (None, Some(b)) => Some((b / (median_ms * 1e-3) / 1e9, "GB/s")),
            (None, None) => None,
        };
        Row {
            id,
            mode: self.mode,
            first_ms: self.first_ms,
            median_ms,
            min_ms: self.times[0],
            max_ms: self.times[self.times.len() - 1],
            kernels: self.counters[0] as f64 / n,
            submits: self.counters[1] as f64 / n,
            new_pipelines: self.counters[2],
            new_buffers: self.counters[3],
            peak_mb: (self.resident + self.step_peak) as f64 / (1 << 20) as f64,
            roofline,
            loss: self.loss,
            plan: self.plan.as_ref().map(|p| p.get()),
        }
    }
}

/// Every mode of one workload: first steps and warm-ups mode by mode, then
/// the measured steps interleaved (eager, merged, compiled, eager, ...), so
/// that a busy machine slows every mode alike.
fn measure(device: &Device, id: Id, o: &Options) -> wgrad::Result<Vec<Row>> {
    let mut runners = Vec::new();
    for &mode in &o.modes {
        runners.push(Runner::new(device, id, mode, o)?);
    }
    // Counters from here on count the measured steps only.
    for r in &mut runners {
        r.counters = [0; 4];
        r.step_peak = 0;
    }
    for _ in 0..o.steps {
        for r in &mut runners {
            let ms = r.step(device)?;
            r.times.push(ms);
        }
    }
    if o.profile {
        for r in &mut runners {
            // The profiled step is not one of the measured ones.
            let (counters, peak) = (r.counters, r.step_peak);
            device.synchronize()?;
            device.set_profiling(true);
            let result = r.step(device);
            device.set_profiling(false);
            let ms = result?;
            (r.counters, r.step_peak) = (counters, peak);
            let profile = device.take_profile();
            let median = {
                let mut t = r.times.clone();
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            };
            println!(
                "\n{} {}: one step profiled, {ms:.2} ms wall (unprofiled median {median:.2} ms)\n{}",
                id.name(),
                r.mode.name(),
                profile.summary()
            );
            if let Some(dir) = &o.trace {
                let path = std::path::Path::new(dir).join(format!("{id:?}-{}.json", r.mode.name()));
                std::fs::write(&path, profile.chrome_trace()).map_err(|e| wgrad::Error::InvalidArgument {
                    op: "wgrad-bench --trace",
                    message: format!("writing {}: {e}", path.display()),
                })?;
            }
        }
    }
    device.set_merge_elementwise(true);
    Ok(runners.into_iter().map(|r| r.row(id)).collect())
}

/// How a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One dispatch per op (elementwise merging off), eager backward.
    Eager,
    /// Elementwise ops of one shape merged into one dispatch, eager backward.
    Merged,
    /// Merged forward, compiled backward.
    Compiled,
    /// The whole step (forward, backward, update) compiled as one program
    /// (`wgrad::compile_step`).
    Step,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Eager, Mode::Merged, Mode::Compiled, Mode::Step];

    fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Merged => "merged",
            Mode::Compiled => "compiled",
            Mode::Step => "step",
        }
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| workload | mode | first ms | median ms | min ms | max ms | kernels/step | submits/step | new pipelines / buffers | peak MiB | roofline |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let roof = r.roofline.map(|(v, unit)| format!("{v:.2} {unit}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {} / {} | {:.1} | {roof} |",
            r.id.name(),
            r.mode.name(),
            r.first_ms,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.kernels,
            r.submits,
            r.new_pipelines,
            r.new_buffers,
            r.peak_mb
        );
    }
    let plans: Vec<&Row> = rows.iter().filter(|r| r.plan.is_some()).collect();
    if !plans.is_empty() {
        s.push_str(
            "\nCompiled step memory: the program's own buffers against the liveness bound of its plan, and the step's peak against eager's\n\n\
             | workload | program MiB | liveness bound MiB | program / bound | step peak MiB | eager peak MiB |\n\
             |---|---:|---:|---:|---:|---:|\n",
        );
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        for r in plans {
            let (program, bound) = r.plan.unwrap_or((0, 0));
            let eager =
                rows.iter().find(|e| e.id == r.id && e.mode == Mode::Eager).map(|e| format!("{:.1}", e.peak_mb));
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {} |",
                r.id.name(),
                mib(program),
                mib(bound),
                program as f64 / bound.max(1) as f64,
                r.peak_mb,
                eager.unwrap_or_else(|| "-".into())
            );
        }
    }
    s
}

fn json(rows: &[Row], adapter: &str) -> String {
    let mut s = format!("{{\n  \"adapter\": {adapter:?},\n  \"results\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let roof =
            r.roofline.map(|(v, unit)| format!("{{\"value\": {v}, \"unit\": {unit:?}}}")).unwrap_or("null".into());
        let _ = write!(
            s,
            "    {{\"workload\": {:?}, \"mode\": {:?}, \"first_ms\": {}, \"median_ms\": {}, \"min_ms\": {}, \"max_ms\": {}, \
             \"kernels_per_step\": {}, \"submits_per_step\": {}, \"new_pipelines\": {}, \"new_buffers\": {}, \"peak_mib\": {}, \"roofline\": {roof}, \"loss\": {}}}",
            format!("{:?}", r.id),
            r.mode.name(),
            r.first_ms,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.kernels,
            r.submits,
            r.new_pipelines,
            r.new_buffers,
            r.peak_mb,
            r.loss
        );
        s.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ]\n}\n");
    s
}

/// Median step time per workload, one bar per mode,
/// each workload scaled to its slower mode.
fn svg(rows: &[Row], adapter: &str) -> String {
    let ids: Vec<Id> = ALL.into_iter().filter(|id| rows.iter().any(|r| r.id == *id)).collect();
    let (w, row_h) = (720.0, 64.0);
    let h = 60.0 + row_h * ids.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">wgrad median step time (ms), eager, merged, compiled</text>\n\
         <text x=\"10\" y=\"38\" fill=\"#555\">{}</text>\n",
        adapter.replace('&', "&amp;").replace('<', "&lt;")
    );
    for (i, id) in ids.iter().enumerate() {
        let y = 50.0 + row_h * i as f64;
        let _ = writeln!(s, "<text x=\"10\" y=\"{}\">{}</text>", y + 22.0, id.name());
        let max = rows.iter().filter(|r| r.id == *id).map(|r| r.median_ms).fold(f64::MIN_POSITIVE, f64::max);
        for (j, r) in rows.iter().filter(|r| r.id == *id).enumerate() {
            let len = 420.0 * r.median_ms / max;
            let color = match r.mode {
                Mode::Eager => "#888",
                Mode::Merged => "#58c",
                Mode::Compiled => "#2a7",
                Mode::Step => "#c62",
            };
            let by = y + 4.0 + 18.0 * j as f64;
            let _ = writeln!(s, "<rect x=\"150\" y=\"{by}\" width=\"{len:.1}\" height=\"15\" fill=\"{color}\"/>");
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\">{} {:.2} ms</text>",
                155.0 + len,
                by + 12.0,
                r.mode.name(),
                r.median_ms
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(o: &Options) -> Result<(), String> {
    let device =
        Device::with_options(DeviceOptions { limits: o.limits, arenas: o.arenas }).map_err(|e| e.to_string())?;
    let adapter = device.info().to_string();
    println!("adapter: {adapter}");
    let limits = device.limits();
    println!(
        "limits: {:?} ({} storage bindings per kernel; arenas {})",
        limits.preset,
        limits.storage_buffers_per_stage,
        if limits.arenas { "on" } else { "off" }
    );
    println!("steps: {} after 3 warm-ups{}", o.steps, if o.small { " (small sizes)" } else { "" });
    let mut rows = Vec::new();
    for &id in &o.workloads {
        for row in measure(&device, id, o).map_err(|e| format!("{}: {e}", id.name()))? {
            eprintln!("{} {}: median {:.2} ms", id.name(), row.mode.name(), row.median_ms);
            rows.push(row);
        }
    }
    if let Some(path) = &o.json {
        std::fs::write(path, json(&rows, &adapter)).map_err(|e| format!("writing {path}: {e}"))?;
    }
    if let Some(path) = &o.svg {
        std::fs::write(path, svg(&rows, &adapter)).map_err(|e| format!("writing {path}: {e}"))?;
    }
    if !rows.is_empty() {
        println!("\n{}", table(&rows));
    }
    if let Some(steps) = o.memory_steps {
        let report = memory::check(&device, steps).map_err(|e| format!("memory check: {e}"))?;
        println!("\n{report}");
    }
    if !o.batch_sizes.is_empty() {
        let report = batches::measure(&device, &o.batch_sizes).map_err(|e| format!("batch sizes: {e}"))?;
        println!("\n{report}");
    }
    if !o.rows.is_empty() {
        let mut measured = Vec::new();
        for &(r, c) in &o.rows {
            measured.push(rows::measure(&device, r, c, o.steps).map_err(|e| format!("rows {r}x{c}: {e}"))?);
        }
        println!("\n{}", rows::table(&measured));
    }
    if !o.matmul.is_empty() {
        let mut mm = Vec::new();
        for &n in &o.matmul {
            let row = matmul::measure(&device, n, o.steps).map_err(|e| format!("matmul {n}: {e}"))?;
            eprintln!("matmul {n}: {:.1} GFLOP/s", row.gflops);
            mm.push(row);
        }
        println!("\n{}", matmul::table(&mm));
    }
    Ok(())
}
