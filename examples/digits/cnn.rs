//! The digits CNN: conv 3x3 (1→16) → ReLU → max-pool 2 → conv 3x3
//! (16→32) → ReLU → max-pool 2 → linear (128→10). Shared by the example
//! and its test.

use wgrad::nn::{Conv2d, Linear, Module};
use wgrad::{Conv2dOptions, Device, Tensor};

pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    head: Linear,
}

impl Cnn {
    pub fn new(seed: u64, device: &Device) -> wgrad::Result<Cnn> {
        let same = Conv2dOptions { padding: [1, 1], ..Default::default() };
        Ok(Cnn {
            conv1: Conv2d::new(1, 16, [3, 3], same, true, seed, device)?,
            conv2: Conv2d::new(16, 32, [3, 3], same, true, seed + 10, device)?,
            head: Linear::new(32 * 2 * 2, 10, true, seed + 20, device)?,
        })
    }

    /// Logits [n, 10] of images `x` [n, 64].
    pub fn forward(&self, x: &Tensor) -> wgrad::Result<Tensor> {
        let n = x.dims()[0];
        let h = self.conv1.forward(&x.reshape([n, 1, 8, 8])?)?.relu()?.max_pool2d([2, 2], [2, 2], [0, 0])?;
        let h = self.conv2.forward(&h)?.relu()?.max_pool2d([2, 2], [2, 2], [0, 0])?;
        self.head.forward(&h.reshape([n, 32 * 2 * 2])?)
    }
}

impl Module for Cnn {
    fn parameters(&self) -> Vec<Tensor> {
        [self.conv1.parameters(), self.conv2.parameters(), self.head.parameters()].concat()
    }
}
