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

/// A seeded xorshift64 generator for tests that draw random sizes and
/// programs: the same draws on every run and every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next draw, in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Uploads a reference tensor as f32.
pub fn upload(t: &reference::RefTensor) -> wgrad::Tensor {
    wgrad::Tensor::from_slice(&t.to_f32(), t.shape.clone(), &device()).expect("upload")
}
