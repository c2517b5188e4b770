//! Losses. Class labels are integer tensors (i32 or u32); they are checked
//! on the device (one small readback) before they select anything, so an
//! out-of-range label is an `Err`, never a wrong read.

use crate::error::{Error, Result};
use crate::metadata::DType;
use crate::tensor::Tensor;

/// How a loss combines its per-element values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reduction {
    /// The mean (over the elements that count, for class losses with an ignore index).
    #[default]
    Mean,
    /// The sum.
    Sum,
    /// No reduction: one loss per element (per sample for class losses).
    None,
}

/// Options of [`Tensor::cross_entropy`] and [`Tensor::nll_loss`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassLoss {
    /// How per-sample losses combine.
    pub reduction: Reduction,
    /// Samples whose label equals this contribute nothing (and do not count
    /// in the mean), as PyTorch's `ignore_index`.
    pub ignore_index: Option<i32>,
}

fn reduce(loss: Tensor, reduction: Reduction) -> Result<Tensor> {
    match reduction {
        Reduction::Mean => loss.mean_all(),
        Reduction::Sum => loss.sum_all(),
        Reduction::None => Ok(loss),
    }
}

impl Tensor {
    /// The one-hot rows of `labels` ([n] integers in 0..classes, or the
    /// ignore index) as a float mask [n, classes] of this tensor's dtype,
    /// and the per-sample weight (0 for ignored samples).
    fn class_mask(&self, op: &'static str, labels: &Tensor, options: ClassLoss) -> Result<(Tensor, Tensor)> {
        if self.rank() != 2 || labels.rank() != 1 || labels.dims()[0] != self.dims()[0] {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "needs scores [n, classes] and labels [n], got {} and {}",
                    self.shape(),
                    labels.shape()
                ),
            });
        }
        if !matches!(labels.dtype(), DType::I32 | DType::U32) {
            return Err(Error::UnsupportedDType {
                op,
                dtype: labels.dtype(),
                hint: "labels are class indices: pass an i32 or u32 tensor",
            });
        }
        let classes = self.dims()[1];
        let _no_grad = crate::no_grad();
        // Checks run in the labels' own integer dtype, so no label is
        // mistaken for the ignore index (or for a valid class) by rounding.
        let ignored = match (options.ignore_index, labels.dtype()) {
            (Some(i), DType::I32) => labels.eq(i as f64)?,
            (Some(i), _) if i >= 0 => labels.eq(i as f64)?,
            _ => labels.ne(labels)?, // no label is ignored
        };
        let ok = |v: i64| (0..classes as i64).contains(&v) || options.ignore_index.is_some_and(|i| i as i64 == v);
        let bad = match labels.host_ints() {
            // Labels made from host data are checked there: no sync.
            Some(values) => values.iter().filter(|&&v| !ok(v)).count() as u32,
            None => {
                let in_range = match labels.dtype() {
                    DType::I32 => labels.ge(0.0)?.mul(&labels.lt(classes as f64)?)?,
                    _ => labels.lt(classes as f64)?,
                };
                in_range.add(&ignored)?.eq(0.0)?.sum_all()?.to_scalar::<u32>()?
            }
        };
        if bad > 0 {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "{bad} label(s) outside 0..{classes}{}; check the labels or the number of classes",
                    options.ignore_index.map(|i| format!(" (ignore_index {i})")).unwrap_or_default()
                ),
            });
        }
        // Valid labels are below `classes`, so exact in f32.
        let l = labels.to_dtype(DType::F32)?;
        let dtype = self.dtype();
        let arange = Tensor::arange(0.0, classes as f64, 1.0, self.device())?;
        let onehot = l.unsqueeze(1)?.eq(&arange)?.to_dtype(dtype)?;
        let weight = ignored.eq(0.0)?.to_dtype(dtype)?;
        Ok((onehot, weight))
    }

    /// Negative log-likelihood of `labels` under log-probabilities `self`
    /// [n, classes].
    pub fn nll_loss(&self, labels: &Tensor, options: ClassLoss) -> Result<Tensor> {
        crate::ops::float_only("nll_loss", self.dtype())?;
        let (onehot, weight) = self.class_mask("nll_loss", labels, options)?;
        let per_sample = self.mul(&onehot)?.sum(&[1], false)?.neg()?.mul(&weight)?;
        match options.reduction {
            // Mean over the samples that count, as PyTorch (NaN if none does).
            Reduction::Mean => per_sample.sum_all()?.div(&weight.sum_all()?),
            r => reduce(per_sample, r),
        }
    }

    /// Cross-entropy of integer `labels` `[n]` under logits `self` `[n, classes]`:
    /// `nll_loss(log_softmax(logits))`, finite for any finite logits.
    pub fn cross_entropy(&self, labels: &Tensor, options: ClassLoss) -> Result<Tensor> {
        crate::ops::float_only("cross_entropy", self.dtype())?;
        self.log_softmax(1)?.nll_loss(labels, options)
    }

    /// Mean squared error `(self - target)²`.
    pub fn mse_loss(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        if self.shape() != target.shape() {
            return Err(Error::IncompatibleShapes {
                op: "mse_loss",
                lhs: self.shape().clone(),
                rhs: target.shape().clone(),
                rule: "the input and the target must have the same shape",
            });
        }
        reduce(self.sub(target)?.square()?, reduction)
    }

    /// Binary cross-entropy of targets in [0, 1] under logits `self`:
    /// `(1 - y) x + softplus(-x)`, stable for any x; its gradient is
    /// exactly `sigmoid(x) - y`.
    pub fn binary_cross_entropy_with_logits(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        if self.shape() != target.shape() {
            return Err(Error::IncompatibleShapes {
                op: "binary_cross_entropy_with_logits",
                lhs: self.shape().clone(),
                rhs: target.shape().clone(),
                rule: "the logits and the target must have the same shape",
            });
        }
        let loss = target.neg()?.add(1.0)?.mul(self)?.add(&self.neg()?.softplus()?)?;
        reduce(loss, reduction)
    }
}
