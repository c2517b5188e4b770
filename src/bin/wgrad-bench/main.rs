//! `wgrad-bench`: the five workloads of WORKLOADS.md in eager and compiled
//! mode, side by side in one run.
//!
//! ```sh
//! cargo run --release --bin wgrad-bench -- [--workload W1,W3] [--mode eager|compiled|both]
//!     [--steps 20] [--small] [--json FILE] [--svg FILE]
//! ```
//!
//! A step is forward + backward (+ W1's SGD update) + the loss read back
//! once. Reported: the first step (pipeline creation, capture), then the
//! median / min / max over `--steps` steps after 3 warm-ups, with kernels,
//! submits and new pipelines per step from the device counters, peak
//! device memory, and GFLOP/s (W1, W3) or GB/s (W2).

mod matmul;
mod workloads;

use std::fmt::Write as _;
use std::time::Instant;

use wgrad::{Device, WgslCompiler};
use workloads::{ALL, Id, Workload};

struct Options {
    workloads: Vec<Id>,
    modes: Vec<bool>,
    steps: usize,
    small: bool,
    json: Option<String>,
    svg: Option<String>,
    matmul: Vec<usize>,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        workloads: ALL.to_vec(),
        modes: vec![false, true],
        steps: 20,
        small: false,
        json: None,
        svg: None,
        matmul: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--workload" => {
                o.workloads = value()?
                    .split(',')
                    .map(|s| Id::parse(s).ok_or(format!("unknown workload {s:?} (W1..W5)")))
                    .collect::<Result<_, _>>()?
            }
            "--mode" => {
                o.modes = match value()?.as_str() {
                    "eager" => vec![false],
                    "compiled" => vec![true],
                    "both" => vec![false, true],
                    m => return Err(format!("unknown mode {m:?} (eager, compiled, both)")),
                }
            }
            "--steps" => o.steps = value()?.parse::<usize>().map_err(|e| format!("--steps: {e}"))?.max(1),
            "--small" => o.small = true,
            "--json" => o.json = Some(value()?),
            "--svg" => o.svg = Some(value()?),
            "--matmul" => {
                o.matmul = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("--matmul {s:?}: {e}")))
                    .collect::<Result<_, _>>()?;
                o.workloads.clear();
            }
            "-h" | "--help" => {
                println!(
                    "usage: wgrad-bench [--workload W1,..] [--mode eager|compiled|both] [--steps N] [--small] [--json FILE] [--svg FILE] [--matmul 256,512]"
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
    compiled: bool,
    first_ms: f64,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    kernels: f64,
    submits: f64,
    new_pipelines: u64,
    peak_mb: f64,
    roofline: Option<(f64, &'static str)>,
    loss: f32,
}

fn measure(device: &Device, id: Id, compiled: bool, o: &Options) -> wgrad::Result<Row> {
    let guard = if compiled { Some(WgslCompiler::install(device)?) } else { None };
    let mut w = Workload::new(id, device, o.small)?;
    device.synchronize()?;
    let start = Instant::now();
    w.step()?;
    let first_ms = start.elapsed().as_secs_f64() * 1e3;
    for _ in 0..3 {
        w.step()?;
    }
    device.synchronize()?;
    device.reset_peak_memory();
    let before = device.counters();
    let mut times = Vec::with_capacity(o.steps);
    let mut loss = 0.0;
    for _ in 0..o.steps {
        let t = Instant::now();
        loss = w.step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let after = device.counters();
    drop(guard);
    let n = o.steps as f64;
    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2];
    let roofline = match (w.flops, w.bytes) {
        (Some(f), _) => Some((f / (median_ms * 1e-3) / 1e9, "GFLOP/s")),
        (None, Some(b)) => Some((b / (median_ms * 1e-3) / 1e9, "GB/s")),
        (None, None) => None,
    };
    Ok(Row {
        id,
        compiled,
        first_ms,
        median_ms,
        min_ms: times[0],
        max_ms: times[times.len() - 1],
        kernels: (after.dispatches - before.dispatches) as f64 / n,
        submits: (after.submits - before.submits) as f64 / n,
        new_pipelines: after.pipelines_created - before.pipelines_created,
        peak_mb: device.memory_stats().peak_bytes as f64 / (1 << 20) as f64,
        roofline,
        loss,
    })
}

fn mode(compiled: bool) -> &'static str {
    if compiled { "compiled" } else { "eager" }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| workload | mode | first ms | median ms | min ms | max ms | kernels/step | submits/step | new pipelines | peak MiB | roofline |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let roof = r.roofline.map(|(v, unit)| format!("{v:.2} {unit}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {} | {:.1} | {roof} |",
            r.id.name(),
            mode(r.compiled),
            r.first_ms,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.kernels,
            r.submits,
            r.new_pipelines,
            r.peak_mb
        );
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
             \"kernels_per_step\": {}, \"submits_per_step\": {}, \"new_pipelines\": {}, \"peak_mib\": {}, \"roofline\": {roof}, \"loss\": {}}}",
            format!("{:?}", r.id),
            mode(r.compiled),
            r.first_ms,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.kernels,
            r.submits,
            r.new_pipelines,
            r.peak_mb,
            r.loss
        );
        s.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ]\n}\n");
    s
}

/// Median step time per workload, eager and compiled bars side by side,
/// each workload scaled to its slower mode.
fn svg(rows: &[Row], adapter: &str) -> String {
    let ids: Vec<Id> = ALL.into_iter().filter(|id| rows.iter().any(|r| r.id == *id)).collect();
    let (w, row_h) = (720.0, 46.0);
    let h = 60.0 + row_h * ids.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">wgrad median step time (ms), eager vs compiled</text>\n\
         <text x=\"10\" y=\"38\" fill=\"#555\">{}</text>\n",
        adapter.replace('&', "&amp;").replace('<', "&lt;")
    );
    for (i, id) in ids.iter().enumerate() {
        let y = 50.0 + row_h * i as f64;
        let _ = writeln!(s, "<text x=\"10\" y=\"{}\">{}</text>", y + 22.0, id.name());
        let max = rows.iter().filter(|r| r.id == *id).map(|r| r.median_ms).fold(f64::MIN_POSITIVE, f64::max);
        for (j, r) in rows.iter().filter(|r| r.id == *id).enumerate() {
            let len = 420.0 * r.median_ms / max;
            let color = if r.compiled { "#2a7" } else { "#888" };
            let by = y + 4.0 + 18.0 * j as f64;
            let _ = writeln!(s, "<rect x=\"150\" y=\"{by}\" width=\"{len:.1}\" height=\"15\" fill=\"{color}\"/>");
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\">{} {:.2} ms</text>",
                155.0 + len,
                by + 12.0,
                mode(r.compiled),
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
    let device = Device::new().map_err(|e| e.to_string())?;
    let adapter = device.info().to_string();
    println!("adapter: {adapter}");
    println!("steps: {} after 3 warm-ups{}", o.steps, if o.small { " (small sizes)" } else { "" });
    let mut rows = Vec::new();
    for &id in &o.workloads {
        for &compiled in &o.modes {
            let row =
                measure(&device, id, compiled, o).map_err(|e| format!("{} {}: {e}", id.name(), mode(compiled)))?;
            eprintln!("{} {}: median {:.2} ms", id.name(), mode(compiled), row.median_ms);
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
