//! WebGPU's default limits on a native adapter (`LimitsPreset::WebGpu`,
//! `WGRAD_LIMITS=webgpu`): the device really gets them, and work that fits
//! in them runs.

use wgrad::{DType, Device, DeviceOptions, LimitsPreset, Tensor};

fn webgpu() -> Device {
    Device::with_options(DeviceOptions { limits: LimitsPreset::WebGpu, ..Default::default() })
        .expect("a Vulkan adapter")
}

#[test]
fn the_webgpu_preset_yields_webgpus_default_limits() {
    let device = webgpu();
    let limits = device.limits();
    assert_eq!(limits.preset, LimitsPreset::WebGpu);
    assert_eq!(limits.storage_buffers_per_stage, 8);
    assert_eq!(limits.storage_binding_bytes, 128 << 20);
    assert_eq!(limits.buffer_bytes, 256 << 20);
    assert_eq!(limits.workgroup_storage_bytes, 16 << 10);
    assert_eq!(limits.invocations_per_workgroup, 256);
    assert!(!limits.f16 && !device.supports_f16(), "no shader-f16 under WebGPU's defaults");
    assert!(device.max_tensor_bytes() <= 128 << 20);
    let e = Tensor::zeros([4], DType::F16, &device).unwrap_err();
    assert!(e.to_string().contains("SHADER_F16"), "{e}");
}

#[test]
fn the_adapter_preset_gets_at_least_as_much() {
    let device = Device::with_options(DeviceOptions::default()).unwrap();
    let (adapter, web) = (device.limits(), webgpu().limits());
    assert_eq!(adapter.preset, LimitsPreset::Adapter);
    assert!(adapter.storage_buffers_per_stage >= web.storage_buffers_per_stage);
    assert!(adapter.storage_binding_bytes >= web.storage_binding_bytes);
    assert!(adapter.invocations_per_workgroup >= web.invocations_per_workgroup);
}

/// A tensor larger than one WebGPU binding keeps its clear error.
#[test]
fn a_tensor_beyond_the_binding_limit_is_a_clear_error() {
    let device = webgpu();
    let e = Tensor::zeros([(128 << 20) / 4 + 1], DType::F32, &device).unwrap_err();
    assert!(matches!(e, wgrad::Error::TensorTooLarge { .. }), "{e}");
}

/// A step with a matmul, reductions, an elementwise chain and an
/// optimizer runs and matches the same step on the adapter's limits.
#[test]
fn a_training_step_under_webgpu_limits_matches_the_adapters() {
    use wgrad::{Optimizer, Sgd};
    let run = |device: &Device| {
        let x = Tensor::randn([32, 48], 1, device).unwrap();
        let w = Tensor::randn([48, 16], 2, device).unwrap().requires_grad(true).unwrap();
        let b = Tensor::randn([16], 3, device).unwrap().requires_grad(true).unwrap();
        let loss = x.matmul(&w).unwrap().add(&b).unwrap().tanh().unwrap().square().unwrap().mean_all().unwrap();
        loss.backward().unwrap();
        let mut sgd = Sgd::new(&[w.clone(), b.clone()], 0.1, 0.9, 0.0).unwrap();
        sgd.step().unwrap();
        (w.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap())
    };
    let (web, adapter) = (run(&webgpu()), run(&Device::with_options(DeviceOptions::default()).unwrap()));
    for (a, b) in web.0.iter().chain(&web.1).zip(adapter.0.iter().chain(&adapter.1)) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}

/// Tensors sub-allocated in arenas at every kind of offset (classes of
/// 256 bytes and more, neighbours of other dtypes, views at offsets that
/// are and are not multiples of 4) read and compute exactly, on the
/// one-element and the vec4 kernels alike.
#[test]
fn arena_offsets_at_alignment_edges() {
    let device = webgpu();
    let sizes = [1usize, 3, 4, 63, 64, 65, 255, 256, 257, 1023, 4095, 4096, 4097, 8192, 12_289];
    let mut kept = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let f: Vec<f32> = (0..n).map(|j| (j as f32) * 0.5 - i as f32).collect();
        let k: Vec<i32> = (0..n as i32).map(|j| j - 7 * i as i32).collect();
        let u: Vec<u32> = (0..n as u32).map(|j| j * 3 + i as u32).collect();
        let (tf, ti, tu) = (
            Tensor::from_slice(&f, [n], &device).unwrap(),
            Tensor::from_slice(&k, [n], &device).unwrap(),
            Tensor::from_slice(&u, [n], &device).unwrap(),
        );
        // Elementwise over the whole tensor (vec4 from 4,096 elements on).
        let y = tf.mul(2.0).unwrap().add(&tf).unwrap();
        let want: Vec<f32> = f.iter().map(|v| v * 3.0).collect();
        assert_eq!(y.to_vec::<f32>().unwrap(), want, "f32 n={n}");
        assert_eq!(ti.add(1.0).unwrap().to_vec::<i32>().unwrap(), k.iter().map(|v| v + 1).collect::<Vec<_>>());
        assert_eq!(tu.to_vec::<u32>().unwrap(), u, "u32 n={n}");
        // Views at offsets 1 and 4 into the allocation.
        for start in [1usize, 4] {
            if n > start + 4 {
                let view = tf.narrow(0, start, n - start - 1).unwrap();
                let got = view.mul(2.0).unwrap().add(1.0).unwrap().to_vec::<f32>().unwrap();
                let want: Vec<f32> = f[start..n - 1].iter().map(|v| v * 2.0 + 1.0).collect();
                assert_eq!(got, want, "n={n} start={start}");
            }
        }
        kept.push((tf, ti, tu, f));
    }
    // Everything kept still reads back after all that allocation around it,
    // and a sum of tensors from all over the arena binds it once.
    let mut total = kept[0].0.narrow(0, 0, 1).unwrap();
    for (tf, _, _, f) in &kept {
        assert_eq!(&tf.to_vec::<f32>().unwrap(), f);
        total = total.add(tf.narrow(0, 0, 1).unwrap()).unwrap();
    }
    let want: f32 = kept.iter().map(|(_, _, _, f)| f[0]).sum();
    assert_eq!(total.to_vec::<f32>().unwrap(), vec![want]);
}

/// Work that reads more tensors than WebGPU's 8 storage bindings runs in
/// as many kernels as on the adapter's limits: tensors share arenas, and a
/// kernel binds each arena once (a 40-input sum and its backward; Adam
/// over 20 parameters, 80 tensors in one update).
#[test]
fn wide_kernels_are_not_split_under_webgpu_limits() {
    use wgrad::{Adam, Optimizer};
    let run = |device: &Device| {
        let xs: Vec<Tensor> =
            (0..40).map(|i| Tensor::rand([300], i, device).unwrap().requires_grad(true).unwrap()).collect();
        let ps: Vec<Tensor> = (0..20)
            .map(|i| Tensor::randn([64 * (i + 1)], 100 + i as u64, device).unwrap().requires_grad(true).unwrap())
            .collect();
        let mut adam = Adam::new(&ps, 1e-2).unwrap();
        device.synchronize().unwrap();
        let before = device.counters().dispatches;
        let mut total = xs[0].clone();
        for x in &xs[1..] {
            total = total.add(x).unwrap();
        }
        let loss = total.square().unwrap().sum_all().unwrap();
        loss.backward().unwrap();
        device.synchronize().unwrap();
        let sum_kernels = device.counters().dispatches - before;
        for p in &ps {
            p.square().unwrap().sum_all().unwrap().backward().unwrap();
        }
        device.synchronize().unwrap();
        let before = device.counters().dispatches;
        adam.step().unwrap();
        device.synchronize().unwrap();
        let adam_kernels = device.counters().dispatches - before;
        let grads: Vec<f32> = xs.iter().flat_map(|x| x.grad().unwrap().to_vec::<f32>().unwrap()).collect();
        let params: Vec<f32> = ps.iter().flat_map(|p| p.to_vec::<f32>().unwrap()).collect();
        (sum_kernels, adam_kernels, grads, params)
    };
    // Against the adapter's limits with arenas too (by default a device
    // with 32 bindings or more gives each tensor its own buffer, and then
    // splits the Adam group; see `ArenaPolicy`).
    let web = run(&webgpu());
    let shared = DeviceOptions { arenas: wgrad::ArenaPolicy::Always, ..Default::default() };
    let adapter = run(&Device::with_options(shared).unwrap());
    assert_eq!((web.0, web.1), (adapter.0, adapter.1), "kernels (sum with backward, adam step)");
    assert_eq!(web.1, 1, "one Adam kernel updates all 20 parameters");
    assert_eq!(web.2, adapter.2);
    assert_eq!(web.3, adapter.3);
}

/// A compiled program planned while its tensors shared one arena, replayed
/// on tensors of the same shapes spread over more arenas than a kernel may
/// bind (8): the replay sees it before recording anything and runs that
/// backward eagerly, with the right gradients (it used to be an `Err`).
#[test]
fn a_replay_over_too_many_arenas_falls_back_to_eager() {
    let device = webgpu();
    let n = 9;
    let len = 1 << 20; // 4 MiB of f32: the largest class kept in arenas
    let leaves = |seed: u64, spread: bool| -> Vec<Tensor> {
        (0..n)
            .map(|i| {
                if spread {
                    // Fill arenas with 4 MiB tensors until one opens a new
                    // arena; the leaf then lands in that fresh arena.
                    let mut fillers = Vec::new();
                    loop {
                        let before = device.memory_stats().buffers_created;
                        fillers.push(Tensor::zeros([len], DType::F32, &device).unwrap());
                        if device.memory_stats().buffers_created > before {
                            break;
                        }
                    }
                    std::mem::forget(fillers); // keep them live: the arena stays taken
                }
                let x = Tensor::rand([len], seed + i as u64, &device).unwrap();
                x.mul(0.2).unwrap().add(0.9).unwrap().requires_grad(true).unwrap()
            })
            .collect()
    };
    let loss = |xs: &[Tensor]| {
        let mut p = xs[0].clone();
        for x in &xs[1..] {
            p = p.mul(x).unwrap();
        }
        p.sum_all().unwrap()
    };
    let guard = wgrad::WgslCompiler::install(&device).unwrap();
    for seed in [1, 100] {
        let xs = leaves(seed, false);
        loss(&xs).backward().unwrap();
    }
    let planned = guard.stats();
    assert!(planned.replays >= 2, "{planned:?}");
    let xs = leaves(1000, true);
    loss(&xs).backward().unwrap();
    let after = guard.stats();
    drop(guard);
    assert!(after.fallbacks > planned.fallbacks, "the spread replay ran eagerly: {after:?}");
    // Each gradient is the product of the other leaves.
    let values: Vec<Vec<f32>> = xs.iter().map(|x| x.to_vec::<f32>().unwrap()).collect();
    for (i, x) in xs.iter().enumerate() {
        let g = x.grad().unwrap().to_vec::<f32>().unwrap();
        for e in (0..len).step_by(4099) {
            let want: f64 = (0..n).filter(|&j| j != i).map(|j| f64::from(values[j][e])).product();
            assert!((f64::from(g[e]) - want).abs() <= 1e-5 * want.abs(), "leaf {i} element {e}: {} vs {want}", g[e]);
        }
    }
}
