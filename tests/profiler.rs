//! The kernel profiler on the CI adapter: what it records for eager,
//! merged and compiled work, its table and Chrome trace, and that it
//! records nothing while off. Each test makes its own device, as profiling
//! is per device.

use wgrad::{BackwardOptions, DType, Device, Optimizer, Sgd, Tensor, Timing, WgslCompiler};

fn device() -> Device {
    Device::new().expect("a Vulkan adapter (run scripts/ensure-vulkan.sh)")
}

/// One compiler per process.
static COMPILER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn step(device: &Device) -> (Tensor, Tensor) {
    let x = Tensor::randn([64, 32], 1, device).unwrap();
    let w = Tensor::randn([32, 16], 2, device).unwrap().requires_grad(true).unwrap();
    let loss = x.matmul(&w).unwrap().relu().unwrap().sum_all().unwrap();
    (w, loss)
}

#[test]
fn records_nothing_while_off() {
    let device = device();
    assert!(!device.is_profiling());
    let (_, loss) = step(&device);
    loss.backward().unwrap();
    device.synchronize().unwrap();
    assert_eq!(device.profile().batches.len(), 0);
}

#[test]
fn eager_kernels_are_timed_and_described() {
    let device = device();
    device.set_profiling(true);
    let (w, loss) = step(&device);
    loss.backward().unwrap();
    let mut sgd = Sgd::new(std::slice::from_ref(&w), 0.1, 0.0, 0.0).unwrap();
    sgd.step().unwrap();
    let _ = w.to_vec::<f32>().unwrap();
    let profile = device.take_profile();
    let kernels: Vec<_> = profile.batches.iter().flat_map(|b| &b.kernels).collect();
    assert!(!kernels.is_empty());
    assert!(profile.batches.iter().all(|b| b.scope == "eager"));

    // The adapter's timestamps, or the documented fallback.
    let timed = device.has_timestamps();
    assert_eq!(profile.has_timestamps(), timed);
    for b in &profile.batches {
        assert_eq!(b.timing, if timed { Timing::GpuTimestamps } else { Timing::WallClock });
        assert!(b.wall_ns > 0.0);
        for k in &b.kernels {
            assert_eq!(k.ns.is_some(), timed, "{k:?}");
            assert!(k.ns.is_none_or(|ns| ns >= 0.0));
        }
    }
    let matmul = kernels.iter().find(|k| k.kernel == "matmul").expect("a matmul kernel");
    assert!(matmul.flops >= 2 * 64 * 32 * 16, "{matmul:?}");
    assert!(matmul.bytes >= 4 * (64 * 32 + 32 * 16), "{matmul:?}");
    assert!(kernels.iter().any(|k| k.kernel == "optimizer" && k.fused.contains("sgd over 1 parameters")));
    assert!(kernels.iter().any(|k| k.kernel == "reduce" && k.fused.starts_with("sum of")), "{kernels:?}");

    let table = profile.table();
    assert!(table.contains("matmul") && table.contains("GB/s") && table.contains("share"), "{table}");
    let summary = profile.summary();
    assert!(summary.contains("kernels") && summary.contains("optimizer"), "{summary}");
    // Taking the profile cleared it.
    assert!(device.profile().batches.is_empty());
}

#[test]
fn compiled_programs_are_profiled_as_such() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let device = device();
    let guard = WgslCompiler::install(&device).unwrap();
    for _ in 0..2 {
        let (_, loss) = step(&device);
        loss.backward().unwrap();
    }
    device.set_profiling(true);
    let (w, loss) = step(&device);
    loss.backward_with(&Tensor::ones([], DType::F32, &device).unwrap(), BackwardOptions::default()).unwrap();
    let _ = w.grad().unwrap().to_vec::<f32>().unwrap();
    let stats = guard.stats();
    drop(guard);
    let profile = device.take_profile();
    let compiled: Vec<_> = profile.batches.iter().filter(|b| b.scope == "compiled backward").collect();
    assert!(!compiled.is_empty(), "{}", profile.table());
    let kernels: usize =
        compiled.iter().map(|b| b.kernels.iter().filter(|k| k.op == "compiled backward").count()).sum();
    assert_eq!(kernels as u64, stats.kernels_last_replay, "{}", profile.table());
    // The backward's matmul fuses relu's backward as its prologue or epilogue somewhere.
    assert!(compiled.iter().flat_map(|b| &b.kernels).any(|k| k.kernel == "matmul"));
}

#[test]
fn the_chrome_trace_is_json_with_one_slice_per_kernel() {
    let device = device();
    device.set_profiling(true);
    let (_, loss) = step(&device);
    loss.backward().unwrap();
    let profile = device.take_profile();
    let trace = profile.chrome_trace();
    let slices = trace.matches("\"ph\":\"X\"").count();
    let expected = if profile.has_timestamps() {
        profile.batches.iter().map(|b| b.kernels.len()).sum()
    } else {
        profile.batches.len()
    };
    assert_eq!(slices, expected);
    assert!(trace.starts_with("{\"traceEvents\":[") && trace.trim_end().ends_with('}'));
    // Balanced braces and brackets, and no stray quote: well-formed enough
    // for Perfetto (a full parse needs a JSON crate the project does not use).
    assert_eq!(trace.matches('{').count(), trace.matches('}').count());
    assert_eq!(trace.matches('[').count(), trace.matches(']').count());
    assert_eq!(trace.matches('"').count() % 2, 0);
}

#[test]
fn switching_on_mid_batch_keeps_results_right() {
    let device = device();
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0], [3], &device).unwrap();
    let b = a.mul(2.0).unwrap().add(1.0).unwrap(); // pending, recorded unprofiled
    device.set_profiling(true);
    let c = b.exp().unwrap().sum_all().unwrap();
    let expected: f32 = [3.0f32, 5.0, 7.0].iter().map(|v| v.exp()).sum();
    let got = c.to_scalar::<f32>().unwrap();
    assert!((got - expected).abs() <= 1e-4 * expected, "{got} vs {expected}");
    device.set_profiling(false);
    let before = device.profile().batches.len();
    let _ = a.mul(3.0).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(device.profile().batches.len(), before, "nothing recorded once off");
}

/// A batch of copies alone (an upload, a readback) has no kernel: it is
/// not recorded, so it cannot pass for a batch timed by the wall clock.
#[test]
fn batches_of_copies_alone_are_not_recorded() {
    let device = device();
    device.set_profiling(true);
    let a = Tensor::from_slice(&[1.0f32, 2.0], [2], &device).unwrap();
    let _ = a.to_vec::<f32>().unwrap();
    let b = a.mul(2.0).unwrap();
    let _ = b.to_vec::<f32>().unwrap();
    let _ = b.to_vec::<f32>().unwrap();
    let profile = device.take_profile();
    assert_eq!(profile.batches.len(), 1, "{}", profile.table());
    assert!(profile.batches.iter().all(|b| !b.kernels.is_empty()));
    assert_eq!(profile.has_timestamps(), device.has_timestamps());
}
