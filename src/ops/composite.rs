//! Ops built from other ops: their gradients come for free.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

impl Tensor {
    /// GELU with the tanh approximation (PyTorch's `approximate='tanh'`).
    pub fn gelu(&self) -> Result<Tensor> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let inner = self.add(&self.mul(self)?.mul(self)?.mul(0.044715)?)?.mul(c)?;
        self.mul(0.5)?.mul(&inner.tanh()?.add(1.0)?)
    }

    /// Exact GELU, `x Φ(x) = x/2 (1 + erf(x/√2))`.
    pub fn gelu_erf(&self) -> Result<Tensor> {
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
        let upper = self.gt(max)?.where_(max, self)?;
        self.lt(min)?.where_(min, &upper)
    }

    /// `x * x`.
    pub fn square(&self) -> Result<Tensor> {
        self.mul(self)
    }
}
