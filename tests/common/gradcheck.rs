//! The finite-difference gradient check shared by the gradient tests:
//! forward against the f64 reference, and the gradient of
//! `sum(op(inputs) * R)` (a fixed random `R`, so every output element
//! weighs differently) against central differences of the reference.

use crate::common::reference::*;
use crate::common::upload;
use wgrad::{DType, Tensor};

pub const RTOL: f64 = 1e-3;
pub const ATOL: f64 = 1e-3;
pub const H: f64 = 1e-6;

/// FNV-1a, to derive a per-check seed for `R` from the check's name.
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Random data in [lo, hi), rounded to f32 so GPU and reference see the same values.
pub fn r32(seed: u64, shape: &[usize], lo: f64, hi: f64) -> RefTensor {
    let t = rand_tensor(seed, shape, lo, hi);
    RefTensor::from_f32(&t.to_f32(), shape)
}

/// Checks the forward value and the gradient of `sum(gpu(inputs) * R)` w.r.t. every input
/// against the reference computation `reference` (f64, finite differences).
pub fn gradcheck(
    name: &str,
    inputs: &[RefTensor],
    gpu: impl Fn(&[Tensor]) -> wgrad::Result<Tensor>,
    reference: impl Fn(&[RefTensor]) -> RefTensor,
) {
    let leaves: Vec<Tensor> = inputs.iter().map(|x| upload(x).requires_grad(true).unwrap()).collect();
    let out = gpu(&leaves).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let expected = reference(inputs);
    let got = out.to_vec::<f32>().unwrap();
    assert_close_f32_shaped(&got, out.dims(), &expected, 1e-4, 1e-4, &format!("{name}: forward"));

    let r = r32(seed_of(name), &expected.shape, -1.0, 1.0);
    let loss = out.mul(upload(&r)).unwrap().sum_all().unwrap();
    loss.backward().unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));

    let numeric = numeric_grad(|xs| reference(xs).mul(&r).sum_all(), inputs, H);
    for (i, (leaf, want)) in leaves.iter().zip(&numeric).enumerate() {
        let g = leaf.grad().unwrap_or_else(|| panic!("{name}: input {i} received no gradient"));
        assert_eq!(g.dtype(), DType::F32, "{name}: grad {i} dtype");
        let vals = g.to_vec::<f32>().unwrap();
        assert_close_f32_shaped(&vals, g.dims(), want, RTOL, ATOL, &format!("{name}: d loss / d input {i}"));
    }
}
