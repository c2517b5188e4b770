//! Eager vs compiled backward on W2 (elementwise) and W5 (tiny chain) of
//! `../shared/WORKLOADS.md`, side by side in one run: median backward time
//! (finished on the device), the first compiled backward (capture, passes
//! and pipeline creation), and kernel dispatches per backward. Eager runs
//! twice: one dispatch per op (elementwise merging off, the classic eager
//! executor) and merged (the library's default, see `exec::merge`).
//!
//! `cargo run --release --example compiled_backward [-- --iters N]`

use std::time::Instant;

use wgrad::{Device, Tensor, WgslCompiler};

type Build = fn(&Device) -> wgrad::Result<(Tensor, Vec<Tensor>)>;

/// W2: sum(tanh(x*a + b) * sigmoid(x) + exp(-x*x)), x, a, b of 1,048,576.
fn w2(device: &Device) -> wgrad::Result<(Tensor, Vec<Tensor>)> {
    let n = 1 << 20;
    let input = |seed| Tensor::rand([n], seed, device)?.mul(2.0)?.sub(1.0)?.requires_grad(true);
    let (x, a, b) = (input(1)?, input(2)?, input(3)?);
    let loss = x.mul(&a)?.add(&b)?.tanh()?.mul(&x.sigmoid()?)?.add(&x.mul(&x)?.neg()?.exp()?)?.sum_all()?;
    Ok((loss, vec![x, a, b]))
}

/// W5: x of 16; 50 times x = sin(x) * 0.9 + x * 0.1; sum.
fn w5(device: &Device) -> wgrad::Result<(Tensor, Vec<Tensor>)> {
    let x0 = Tensor::rand([16], 4, device)?.mul(2.0)?.sub(1.0)?.requires_grad(true)?;
    let mut x = x0.clone();
    for _ in 0..50 {
        x = x.sin()?.mul(0.9)?.add(&x.mul(0.1)?)?;
    }
    Ok((x.sum_all()?, vec![x0]))
}

struct Row {
    first_ms: f64,
    median_ms: f64,
    kernels: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `iters` backward passes (each on a freshly built forward).
fn measure(device: &Device, build: Build, iters: usize) -> wgrad::Result<(Row, Vec<f32>)> {
    let mut times = Vec::new();
    let mut kernels = 0;
    let mut grad = Vec::new();
    for i in 0..iters + 1 {
        let (loss, leaves) = build(device)?;
        device.synchronize()?;
        let before = device.counters().dispatches;
        let start = Instant::now();
        loss.backward()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        kernels = device.counters().dispatches - before - 1; // minus the seed fill
        if i == iters {
            grad = leaves[0].grad().expect("gradient").to_vec::<f32>()?;
        }
    }
    let first_ms = times[0];
    let median_ms = median(times[4.min(iters)..].to_vec());
    Ok((Row { first_ms, median_ms, kernels }, grad))
}

fn main() -> wgrad::Result<()> {
    let iters =
        std::env::args().skip_while(|a| a != "--iters").nth(1).and_then(|v| v.parse().ok()).unwrap_or(20usize).max(5);
    let device = Device::new()?;
    println!("adapter: {}", device.info());
    let mut table = Vec::new();
    for (name, build) in [("W2 elementwise", w2 as Build), ("W5 tiny-chain", w5 as Build)] {
        device.set_merge_elementwise(false);
        let (eager, eager_grad) = measure(&device, build, iters)?;
        device.set_merge_elementwise(true);
        let (merged, _) = measure(&device, build, iters)?;
        let guard = WgslCompiler::install(&device)?;
        let (compiled, compiled_grad) = measure(&device, build, iters)?;
        let stats = guard.stats();
        drop(guard);
        let max_diff = eager_grad.iter().zip(&compiled_grad).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        table.push((name, eager, merged, compiled, stats.ops_fused, max_diff));
    }
    println!("\nbackward only, median of {iters} after warm-up (ms); kernels = dispatches per backward");
    println!(
        "| workload | eager ms | merged ms | compiled ms | compiled vs eager | compiled vs merged | first compiled ms | kernels eager / merged / compiled | max |Δgrad| |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, e, m, c, _, diff) in &table {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.2}x | {:.1} | {} / {} / {} | {diff:.1e} |",
            e.median_ms,
            m.median_ms,
            c.median_ms,
            e.median_ms / c.median_ms,
            m.median_ms / c.median_ms,
            c.first_ms,
            e.kernels,
            m.kernels,
            c.kernels
        );
    }
    Ok(())
}
