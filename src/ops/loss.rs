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

/// Options of [`Tensor::cross_entropy`] and [`Tensor::nll_loss`]; the
/// default is PyTorch's (mean, `ignore_index` -100, no label smoothing).
/// Build it with `..Default::default()`:
///
/// ```
/// use wgrad::{ClassLoss, Reduction};
/// let options = ClassLoss { reduction: Reduction::Sum, label_smoothing: 0.1, ..Default::default() };
/// assert_eq!(options.ignore_index, Some(-100));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassLoss {
    /// How per-position losses combine.
    pub reduction: Reduction,
    /// Positions whose label equals this contribute nothing (to either
    /// term of a smoothed loss) and do not count in the mean, as PyTorch's
    /// `ignore_index`; `Some(-100)` by default, as there. `None` ignores
    /// nothing.
    pub ignore_index: Option<i32>,
    /// PyTorch's `label_smoothing` ε in [0, 1]: the target is the one-hot
    /// label mixed with the uniform distribution, so each position's loss
    /// is `(1 - ε) * nll + ε * mean_c(-log p_c)`. PyTorch has it on
    /// `cross_entropy` only; here `nll_loss` takes it too, applied to its
    /// log-probabilities, so `cross_entropy(x)` stays
    /// `nll_loss(log_softmax(x))`.
    pub label_smoothing: f64,
}

impl Default for ClassLoss {
    fn default() -> ClassLoss {
        ClassLoss { reduction: Reduction::Mean, ignore_index: Some(-100), label_smoothing: 0.0 }
    }
}

fn reduce(loss: Tensor, reduction: Reduction) -> Result<Tensor> {
    match reduction {
        Reduction::Mean => loss.mean_all(),
        Reduction::Sum => loss.sum_all(),
        Reduction::None => Ok(loss),
    }
}

/// The class dim of scores of rank `rank`: PyTorch's `[classes]` (one
/// position, a 0-d label) or `[n, classes, d1, ...]`.
fn class_dim(rank: usize) -> usize {
    usize::from(rank > 1)
}

impl Tensor {
    /// Checks the options and the shapes of scores and labels: `[classes]`
    /// with a 0-d label, or `[n, classes, d1, ...]` with `[n, d1, ...]`.
    fn check_class_loss(&self, op: &'static str, labels: &Tensor, options: ClassLoss) -> Result<()> {
        crate::ops::float_only(op, self.dtype())?;
        let eps = options.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            return Err(Error::InvalidArgument {
                op,
                message: format!("label_smoothing {eps} is outside [0, 1]; 0 turns it off"),
            });
        }
        let mut expected = self.dims().to_vec();
        if !expected.is_empty() {
            expected.remove(class_dim(self.rank()));
        }
        if self.rank() == 0 || labels.dims() != expected {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "needs scores [n, classes, d1, ...] and labels [n, d1, ...] (or scores [classes] and a 0-d \
                     label), got {} and {}",
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
        Ok(())
    }

    /// The one-hot targets of `labels` (integers in 0..classes, or the
    /// ignore index) as a float mask shaped like these scores, of their
    /// dtype, and the per-position weight (0 where ignored). Shapes are
    /// already checked.
    fn class_mask(&self, op: &'static str, labels: &Tensor, options: ClassLoss) -> Result<(Tensor, Tensor)> {
        let axis = class_dim(self.rank());
        let classes = self.dims()[axis];
        let _no_grad = crate::no_grad();
        // Checks run in the labels' own integer dtype, so no label is
        // mistaken for the ignore index (or for a valid class) by rounding.
        let ignored = match (options.ignore_index, labels.dtype()) {
            (Some(i), DType::I32) => labels.eq(i as f64)?,
            (Some(i), _) if i >= 0 => labels.eq(i as f64)?,
            _ => labels.ne(labels)?, // no label is ignored
        };
        let ignore_index = options.ignore_index;
        // The check of host-known labels; a compiled step makes it again on
        // every call's labels.
        let check = move |values: &[i64]| -> Result<()> {
            let ok = |v: i64| (0..classes as i64).contains(&v) || ignore_index.is_some_and(|i| i as i64 == v);
            match values.iter().filter(|&&v| !ok(v)).count() {
                0 => Ok(()),
                bad => Err(bad_labels(op, bad as u32, classes, ignore_index)),
            }
        };
        match labels.host_ints() {
            // Labels made from host data are checked there: no sync.
            Some(values) => {
                check(values)?;
                crate::compiler::trace::check_arg(labels, std::sync::Arc::new(check));
            }
            None => {
                let in_range = match labels.dtype() {
                    DType::I32 => labels.ge(0.0)?.mul(&labels.lt(classes as f64)?)?,
                    _ => labels.lt(classes as f64)?,
                };
                let bad = in_range.add(&ignored)?.eq(0.0)?.sum_all()?.to_scalar::<u32>()?;
                if bad > 0 {
                    return Err(bad_labels(op, bad, classes, ignore_index));
                }
            }
        }
        // Valid labels are below `classes`, so exact in f32.
        let l = labels.to_dtype(DType::F32)?;
        let dtype = self.dtype();
        // The classes along `axis`, against the labels with a size-1 class dim.
        let mut class_shape = vec![1; self.rank() - axis];
        class_shape[0] = classes;
        let arange = Tensor::arange(0.0, classes as f64, 1.0, self.device())?.reshape(class_shape)?;
        let onehot = l.unsqueeze(axis as isize)?.eq(&arange)?.to_dtype(dtype)?;
        let weight = ignored.eq(0.0)?.to_dtype(dtype)?;
        Ok((onehot, weight))
    }

    /// The class loss of `labels` under log-probabilities `self`, checked.
    fn class_loss(&self, op: &'static str, labels: &Tensor, options: ClassLoss) -> Result<Tensor> {
        let axis = class_dim(self.rank());
        let classes = self.dims()[axis];
        let (onehot, weight) = self.class_mask(op, labels, options)?;
        let eps = options.label_smoothing;
        // (1 - ε) nll + ε mean_c(-log p_c) is the cross-entropy against
        // this mixed target; ignored positions are zeroed by the weight.
        let target = if eps == 0.0 { onehot } else { onehot.mul(1.0 - eps)?.add(eps / classes as f64)? };
        let per_position = self.mul(&target)?.sum(&[axis as isize], false)?.neg()?.mul(&weight)?;
        match options.reduction {
            // Mean over the positions that count, as PyTorch (NaN if none does).
            Reduction::Mean => per_position.sum_all()?.div(&weight.sum_all()?),
            r => reduce(per_position, r),
        }
    }

    /// Negative log-likelihood of integer `labels` under log-probabilities
    /// `self`: PyTorch's `nll_loss`, over `[n, classes]` with labels `[n]`,
    /// `[n, classes, d1, ...]` with labels `[n, d1, ...]` (one loss per
    /// position; `Reduction::None` gives them in that shape), or
    /// `[classes]` with a 0-d label. Labels outside `0..classes` that are
    /// not the ignore index are an `Err`.
    pub fn nll_loss(&self, labels: &Tensor, options: ClassLoss) -> Result<Tensor> {
        self.check_class_loss("nll_loss", labels, options)?;
        self.class_loss("nll_loss", labels, options)
    }

    /// Cross-entropy of integer `labels` under logits `self`:
    /// `nll_loss(log_softmax(logits))` over the class dim (dim 1, or 0 for
    /// `[classes]` scores), finite for any finite logits; shapes, label
    /// smoothing and ignore index as [`Tensor::nll_loss`] and
    /// [`ClassLoss`]. Class-probability targets are not supported.
    ///
    /// ```
    /// # fn main() -> wgrad::Result<()> {
    /// use wgrad::{ClassLoss, DType, Tensor};
    /// let device = wgrad::Device::new()?;
    /// // A segmentation-shaped batch: 2 images, 3 classes, 4x4 pixels; -100 is ignored.
    /// let logits = Tensor::zeros([2, 3, 4, 4], DType::F32, &device)?;
    /// let mut labels = vec![1i32; 32];
    /// labels[0] = -100;
    /// let labels = Tensor::from_slice(&labels, [2, 4, 4], &device)?;
    /// let smoothed = ClassLoss { label_smoothing: 0.1, ..Default::default() };
    /// let loss = logits.cross_entropy(&labels, smoothed)?.to_scalar::<f32>()?;
    /// assert!((loss - 3f32.ln()).abs() < 1e-6); // uniform predictions
    /// # Ok(())
    /// # }
    /// ```
    pub fn cross_entropy(&self, labels: &Tensor, options: ClassLoss) -> Result<Tensor> {
        self.check_class_loss("cross_entropy", labels, options)?;
        let axis = class_dim(self.rank()) as isize;
        self.log_softmax(axis)?.class_loss("cross_entropy", labels, options)
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

/// The error for `bad` labels outside `0..classes` (and not the ignore index).
fn bad_labels(op: &'static str, bad: u32, classes: usize, ignore_index: Option<i32>) -> Error {
    Error::InvalidArgument {
        op,
        message: format!(
            "{bad} label(s) outside 0..{classes}{}; check the labels or the number of classes",
            ignore_index.map(|i| format!(" (ignore_index {i})")).unwrap_or_default()
        ),
    }
}
