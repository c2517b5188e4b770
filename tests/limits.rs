//! WebGPU's default limits on a native adapter (`LimitsPreset::WebGpu`,
//! `WGRAD_LIMITS=webgpu`): the device really gets them, and work that fits
//! in them runs.

use wgrad::{DType, Device, DeviceOptions, LimitsPreset, Tensor};

fn webgpu() -> Device {
    Device::with_options(DeviceOptions { limits: LimitsPreset::WebGpu }).expect("a Vulkan adapter")
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
