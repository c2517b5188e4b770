//! `--memory-steps N`: W1 compiled for N steps. Checks that memory reaches
//! a steady state (live and pooled bytes, driver buffers after step 1) and
//! compares the peak of a step with what the compiled backward's liveness
//! plan needs at its peak: everything alive when backward starts (weights,
//! data, the saved activations), the program's planned intermediates and
//! the gradients it writes.

use std::fmt::Write as _;

use crate::workloads::{Id, Workload};
use wgrad::{Device, WgslCompiler};

pub fn check(device: &Device, steps: usize) -> wgrad::Result<String> {
    let compiler = std::sync::Arc::new(WgslCompiler::new(device));
    let _guard = wgrad::CompilerGuard::install_arc(compiler.clone())?;
    let mut w = Workload::new(Id::W1, device, false)?;
    w.step()?;
    w.step()?;
    // One observed step: live bytes as backward starts, then the peak.
    // (Reading the stats dispatches pending elementwise work early, which
    // splits this step's kernels differently: it comes before the window.)
    device.synchronize()?;
    device.reset_peak_memory();
    let mut at_backward = 0;
    w.step_observed(|| at_backward = device.memory_stats().live_bytes)?;
    let peak = device.memory_stats().peak_bytes;
    let planned: u64 = compiler.programs().iter().map(|p| p.report().planned_bytes).sum();
    let plan = at_backward + planned + w.gradient_bytes();

    w.step()?;
    device.synchronize()?;
    let start = (device.memory_stats(), device.counters());
    for _ in 4..steps {
        w.step()?;
    }
    device.synchronize()?;
    let end = (device.memory_stats(), device.counters());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut s = String::new();
    let _ = writeln!(s, "W1 compiled, {steps} steps: memory");
    let _ = writeln!(s, "| measure | after step 4 | after step {steps} |\n|---|---:|---:|");
    let _ = writeln!(s, "| live bytes | {} | {} |", start.0.live_bytes, end.0.live_bytes);
    let _ = writeln!(s, "| pooled (free) bytes | {} | {} |", start.0.pooled_bytes, end.0.pooled_bytes);
    let _ = writeln!(s, "| driver buffers created | {} | {} |", start.1.buffers_created, end.1.buffers_created);
    let _ = writeln!(s, "| pipelines created | {} | {} |", start.1.pipelines_created, end.1.pipelines_created);
    let _ = writeln!(
        s,
        "\npeak of a step {:.2} MiB; plan {:.2} MiB (live at backward {:.2} + planned intermediates {:.2} + gradients {:.2}); ratio {:.3}",
        mib(peak),
        mib(plan),
        mib(at_backward),
        mib(planned),
        mib(w.gradient_bytes()),
        peak as f64 / plan as f64
    );
    Ok(s)
}
