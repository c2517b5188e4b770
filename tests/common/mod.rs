#![allow(dead_code)]

pub mod compiled_check;
pub mod gradcheck;
pub mod reference;

use std::sync::OnceLock;

/// One device per test binary (creating a device costs ~100 ms on lavapipe).
pub fn device() -> wgrad::Device {
    static DEVICE: OnceLock<wgrad::Device> = OnceLock::new();
    DEVICE.get_or_init(|| wgrad::Device::new().expect("a Vulkan adapter (run scripts/ensure-vulkan.sh)")).clone()
}

/// Uploads a reference tensor as f32.
pub fn upload(t: &reference::RefTensor) -> wgrad::Tensor {
    wgrad::Tensor::from_slice(&t.to_f32(), t.shape.clone(), &device()).expect("upload")
}
