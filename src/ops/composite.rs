//! Ops built from other ops: their gradients come for free.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

impl Tensor {
    /// GELU with the tanh approximation (PyTorch's
    /// `gelu(x, approximate='tanh')`).
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let inner = self.add(&self.mul(self)?.mul(self)?.mul(0.044715)?)?.mul(c)?;
        self.mul(0.5)?.mul(&inner.tanh()?.add(1.0)?)
    }

    /// GELU, `x Φ(x) = x/2 (1 + erf(x/√2))`: PyTorch's `gelu` (its exact
    /// form; see [`Tensor::gelu_tanh`] for the approximation).
    pub fn gelu(&self) -> Result<Tensor> {
        self.mul(0.5)?.mul(&self.mul(std::f64::consts::FRAC_1_SQRT_2)?.erf()?.add(1.0)?)
    }

    /// Clamps into `[min, max]`; the gradient passes where `min <= x <= max`.
    pub fn clamp(&self, min: f64, max: f64) -> Result<Tensor> {
        if min > max || min.is_nan() || max.is_nan() {
            return Err(Error::InvalidArgument {
                op: "clamp",
                message: format!("needs min <= max, got {min} > {max}"),
            });
        }
        // PyTorch's clamp: NaN stays NaN, and the gradient passes only
        // where min <= x <= max (so not to a NaN). The out-of-range value is
        // computed from a detached x, so no gradient reaches x through it.
        let x = self.detach();
        let outside = x.lt(min)?.where_(min, &x.gt(max)?.where_(max, &x)?)?;
        self.ge(min)?.mul(&self.le(max)?)?.where_(self, &outside)
    }

    /// `x * x`.
    pub fn square(&self) -> Result<Tensor> {
        self.mul(self)
    }
}
