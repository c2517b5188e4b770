//! `--batch-sizes 10,20,...`: W1 at each batch size in turn, as a compiled
//! backward (`WgslCompiler`) and as a compiled step (`compile_step`), each
//! size's first call timed, with the pipelines it created and what the
//! compiler did (a new program, a known graph at a new size, a trace or a
//! replan). Issue 16's measure: a new batch size should cost a re-plan,
//! not a trace, and no pipeline.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use wgrad::{ClassLoss, CompilerInterface, Device, Optimizer, Sgd, Tensor, WgslCompiler};

/// One batch size's first call in each compiler.
struct Row {
    batch: usize,
    backward_ms: f64,
    backward_pipelines: u64,
    /// Pipelines the eager forward and update made beside the compiler's.
    eager_pipelines: u64,
    backward_did: &'static str,
    backward_again_ms: f64,
    step_ms: f64,
    step_pipelines: u64,
    step_did: &'static str,
    step_again_ms: f64,
}

fn w1_params(device: &Device) -> wgrad::Result<Vec<Tensor>> {
    let leaf = |shape: &[usize], seed: u64, scale: f64| {
        wgrad::nn::uniform(shape.to_vec(), scale, seed, device)?.detach().requires_grad(true)
    };
    Ok(vec![
        leaf(&[784, 512], 2, 1.0 / 28.0)?,
        leaf(&[512], 3, 1.0)?,
        leaf(&[512, 512], 4, 1.0 / 512f64.sqrt())?,
        leaf(&[512], 5, 1.0)?,
        leaf(&[512, 10], 6, 1.0 / 512f64.sqrt())?,
        leaf(&[10], 7, 1.0)?,
    ])
}

fn w1_loss(p: &[Tensor], x: &Tensor, y: &Tensor) -> wgrad::Result<Tensor> {
    let h1 = x.matmul(&p[0])?.add(&p[1])?.relu()?;
    let h2 = h1.matmul(&p[2])?.add(&p[3])?.relu()?;
    h2.matmul(&p[4])?.add(&p[5])?.cross_entropy(y, ClassLoss::default())
}

fn batch(device: &Device, n: usize, seed: u64) -> wgrad::Result<(Tensor, Tensor)> {
    let x = wgrad::nn::uniform([n, 784], 1.0, 100 + seed, device)?.detach();
    let labels: Vec<i32> = (0..n as i32).map(|j| (j * 7 + seed as i32) % 10).collect();
    Ok((x, Tensor::from_slice(&labels, [n], device)?))
}

pub fn measure(device: &Device, sizes: &[usize]) -> wgrad::Result<String> {
    let compiler = Arc::new(WgslCompiler::new(device));
    let eager_params = w1_params(device)?;
    let mut backward_opt = Sgd::new(&eager_params, 0.01, 0.0, 0.0)?;
    let step_params = w1_params(device)?;
    let mut step_opt = Sgd::new(&step_params, 0.01, 0.0, 0.0)?;
    let in_step = step_params.clone();
    let mut step = wgrad::compile_step(device, move |a: &[Tensor]| {
        step_opt.zero_grad();
        let loss = w1_loss(&in_step, &a[0], &a[1])?;
        loss.backward()?;
        step_opt.step()?;
        Ok(vec![loss])
    });
    let mut rows = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let (x, y) = batch(device, n, i as u64)?;
        device.synchronize()?;
        // Compiled backward: eager forward, compiled backward, SGD; twice,
        // the second a replay (what the first costs beyond it is the
        // capture and lowering).
        let guard = wgrad::CompilerGuard::install_arc(compiler.clone())?;
        let (before, stats) = (device.counters().pipelines_created, compiler.stats());
        let mut backward_step = || -> wgrad::Result<f64> {
            let start = Instant::now();
            backward_opt.zero_grad();
            w1_loss(&eager_params, &x, &y)?.backward()?;
            backward_opt.step()?;
            device.synchronize()?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        let backward_ms = backward_step()?;
        let all_pipelines = device.counters().pipelines_created - before;
        let backward_pipelines = compiler.stats().pipelines_created - stats.pipelines_created;
        let backward_again_ms = backward_step()?;
        drop(guard);
        let now = compiler.stats();
        let shadows = now.shadow_fits > stats.shadow_fits;
        let backward_did =
            match (now.cache_misses - stats.cache_misses, now.replans - stats.replans, now.new_sizes - stats.new_sizes)
            {
                (0, _, _) => "replay",
                (_, 0, 0) if shadows => "trace, new program, family fitted from its shadows",
                (_, 0, 0) => "trace, new program",
                (_, 0, _) => "trace, a known graph at a new size",
                _ => "replan (no trace)",
            };
        // Compiled step.
        let (before, stats) = (device.counters().pipelines_created, step.stats());
        let mut step_call = || -> wgrad::Result<f64> {
            let start = Instant::now();
            step.call(&[x.clone(), y.clone()])?[0].to_scalar::<f32>()?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        let step_ms = step_call()?;
        let step_pipelines = device.counters().pipelines_created - before;
        let step_again_ms = step_call()?;
        let now = step.stats();
        let step_did = match (now.traces - stats.traces, now.replans - stats.replans) {
            (0, 0) => "replay",
            (0, _) if now.replans_across_boundaries > stats.replans_across_boundaries => "replan, other kernels",
            (0, _) => "replan",
            _ => "trace",
        };
        rows.push(Row {
            batch: n,
            backward_ms,
            backward_pipelines,
            eager_pipelines: all_pipelines - backward_pipelines,
            backward_did,
            backward_again_ms,
            step_ms,
            step_pipelines,
            step_did,
            step_again_ms,
        });
    }
    let mut out = String::new();
    let _ = writeln!(out, "W1 at batch sizes {sizes:?}: the first call of each size, and the second (a replay)");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| batch | compiled backward: first ms | replay ms | new pipelines: compiler (eager forward, update) | what it did | compiled step: first ms | replay ms | new pipelines | what it did |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---|---:|---:|---:|---|");
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {} ({}) | {} | {:.1} | {:.1} | {} | {} |",
            r.batch,
            r.backward_ms,
            r.backward_again_ms,
            r.backward_pipelines,
            r.eager_pipelines,
            r.backward_did,
            r.step_ms,
            r.step_again_ms,
            r.step_pipelines,
            r.step_did
        );
    }
    let (c, s) = (compiler.stats(), step.stats());
    let _ = writeln!(
        out,
        "\ncompiled backward: {} programs, {} traced and {} replanned from a fitted batch family ({} a known graph at a new size, {} families fitted from shadows); compiled step: {} traces, {} replans ({} with other kernels)",
        c.cache_misses,
        c.cache_misses - c.replans,
        c.replans,
        c.new_sizes,
        c.shadow_fits,
        s.traces,
        s.replans,
        s.replans_across_boundaries
    );
    Ok(out)
}
