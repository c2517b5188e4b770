//! Neural-network ops built from primitives, so their gradients (and their
//! compiled backward) come from the primitives' formulas. Each is written
//! in its numerically stable form.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

impl Tensor {
    /// The max over `dim` (kept), detached: softmax-style ops subtract it
    /// for stability, and their value does not depend on it, so neither
    /// does their gradient.
    /// The axis is resolved here, so an error names the op the user called.
    /// Over an empty axis there is nothing to shift (and no max): zeros.
    fn stable_shift(&self, op: &'static str, dim: isize) -> Result<Tensor> {
        crate::ops::float_only(op, self.dtype())?;
        let d = crate::metadata::resolve_axis(op, dim, self.rank())?;
        if self.rank() > 0 && self.dims()[d] == 0 {
            let mut dims = self.dims().to_vec();
            dims[d] = 1;
            return Tensor::zeros(dims, self.dtype(), self.device());
        }
        Ok(self.max(&[dim], true)?.detach())
    }

    /// `exp(x) / sum(exp(x))` over `dim`, computed as `exp(x - max)`.
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        let e = self.sub(&self.stable_shift("softmax", dim)?)?.exp()?;
        e.div(&e.sum(&[dim], true)?)
    }

    /// `log(softmax(x))` over `dim`, finite for any finite logits.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        let shifted = self.sub(&self.stable_shift("log_softmax", dim)?)?;
        shifted.sub(&shifted.exp()?.sum(&[dim], true)?.log()?)
    }

    /// `log(sum(exp(x)))` over `dim` (removed unless `keepdim`); `-inf`
    /// over an empty dim, as in PyTorch.
    pub fn logsumexp(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let m = self.stable_shift("logsumexp", dim)?;
        let out = self.sub(&m)?.exp()?.sum(&[dim], true)?.log()?.add(&m)?;
        // A 0-d tensor has no dim to remove.
        if keepdim || self.rank() == 0 { Ok(out) } else { out.squeeze(dim) }
    }

    /// The trailing axes named by `normalized_shape` (which must match them).
    fn trailing_axes(&self, op: &'static str, normalized_shape: &[usize]) -> Result<Vec<isize>> {
        let (n, k) = (self.rank(), normalized_shape.len());
        if k == 0 || k > n || self.dims()[n - k..] != *normalized_shape {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "normalized_shape {normalized_shape:?} must be the last dims of the input {}",
                    self.shape()
                ),
            });
        }
        Ok((n - k..n).map(|a| a as isize).collect())
    }

    /// Layer normalisation over the trailing `normalized_shape` dims:
    /// `(x - mean) / sqrt(var + eps) * weight + bias` (biased variance, as
    /// in PyTorch). `weight` and `bias`, when given, have `normalized_shape`.
    pub fn layer_norm(
        &self,
        normalized_shape: &[usize],
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        crate::ops::float_only("layer_norm", self.dtype())?;
        let axes = self.trailing_axes("layer_norm", normalized_shape)?;
        let centered = self.sub(&self.mean(&axes, true)?)?;
        let var = centered.square()?.mean(&axes, true)?;
        let mut y = centered.mul(&var.add(eps)?.rsqrt()?)?;
        if let Some(w) = weight {
            y = y.mul(w)?;
        }
        if let Some(b) = bias {
            y = y.add(b)?;
        }
        Ok(y)
    }

    /// RMS normalisation over the trailing `normalized_shape` dims:
    /// `x / sqrt(mean(x²) + eps) * weight`.
    pub fn rms_norm(&self, normalized_shape: &[usize], weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        crate::ops::float_only("rms_norm", self.dtype())?;
        let axes = self.trailing_axes("rms_norm", normalized_shape)?;
        let y = self.mul(&self.square()?.mean(&axes, true)?.add(eps)?.rsqrt()?)?;
        match weight {
            Some(w) => y.mul(w),
            None => Ok(y),
        }
    }

    /// Inverted dropout: while `training`, zeroes each element with
    /// probability `p` (from `seed`: the same seed drops the same elements)
    /// and scales the rest by `1 / (1 - p)`; the identity otherwise.
    pub fn dropout(&self, p: f64, seed: u64, training: bool) -> Result<Tensor> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::InvalidArgument { op: "dropout", message: format!("p must be in [0, 1], got {p}") });
        }
        crate::ops::float_only("dropout", self.dtype())?;
        if !training || p == 0.0 {
            return Ok(self.clone());
        }
        if p == 1.0 {
            return self.mul(0.0);
        }
        let keep = Tensor::rand(self.shape().clone(), seed, self.device())?.ge(p)?.to_dtype(self.dtype())?;
        self.mul(&keep)?.mul(1.0 / (1.0 - p))
    }

    /// [`Tensor::dropout`] in training mode with its seed read from
    /// `seeds` (u32 `[2]`, see `Tensor::random_from`): the same mask as
    /// `dropout(p, seed, true)` for the seed they hold.
    pub(crate) fn dropout_seeded_by(&self, p: f64, seeds: &Tensor) -> Result<Tensor> {
        if p == 0.0 || p == 1.0 {
            return self.dropout(p, 0, true);
        }
        let uniform = Tensor::random_from(crate::exec::kernel::RandomKind::Uniform, self.shape().clone(), seeds)?;
        let keep = uniform.ge(p)?.to_dtype(self.dtype())?;
        self.mul(&keep)?.mul(1.0 / (1.0 - p))
    }
}
