//! Reductions over a list of axes (with `keepdim`) or over everything.

use crate::autograd::record;
use crate::error::{Error, Result};
use crate::exec::ReduceKind;
use crate::metadata::{DType, Shape, resolve_axis};
use crate::ops::{Op, float_only};
use crate::tensor::Tensor;

/// Sorted, distinct axes in range.
fn normalize_axes(op: &'static str, x: &Tensor, axes: &[isize]) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let a = resolve_axis(op, a, x.rank())?;
        if out.contains(&a) {
            return Err(Error::InvalidArgument { op, message: format!("axis {a} is listed twice") });
        }
        out.push(a);
    }
    out.sort_unstable();
    // A scalar has no axes to reduce; axis 0 / -1 of a scalar means "all".
    if x.rank() == 0 {
        out.clear();
    }
    Ok(out)
}

fn keepdim_shape(input: &Shape, axes: &[usize]) -> Shape {
    Shape::new(input.dims().iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect::<Vec<_>>())
}

pub(crate) fn sum_backward(g: &Tensor, input: &Shape, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let g = if keepdim { g.clone() } else { g.reshape(keepdim_shape(input, axes))? };
    g.broadcast_to(input.clone())
}

/// The gradient goes to the positions that hold the extremum, split evenly
/// between ties (PyTorch's `amax` / `amin`).
pub(crate) fn extremum_backward(x: &Tensor, out_keep: &Tensor, g: &Tensor, axes: &[usize]) -> Result<Tensor> {
    let mask = x.eq(out_keep)?.to_dtype(x.dtype())?;
    let count = mask.sum_axes(axes, true)?;
    let g = g.reshape(out_keep.shape().clone())?;
    mask.div(&count)?.mul(&g)
}

impl Tensor {
    fn sum_axes(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        let out = crate::exec::reduce(ReduceKind::Sum, self, axes, keepdim)?;
        let op = Op::Sum { input: self.shape().clone(), axes: axes.to_vec(), keepdim };
        Ok(record(op, &[self], Vec::new(), out))
    }

    fn extremum(&self, kind: ReduceKind, op: &'static str, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let axes = normalize_axes(op, self, axes)?;
        if axes.iter().any(|&a| self.dims()[a] == 0) {
            return Err(Error::InvalidArgument { op, message: "cannot take the max/min over an empty axis".into() });
        }
        let kept = crate::exec::reduce(kind, self, &axes, true)?;
        let out = if keepdim { kept.clone() } else { kept.reshape_view(reduced_shape(self.shape(), &axes)) };
        Ok(record(Op::Extremum { axes }, &[self], vec![self.clone(), kept.detach()], out))
    }

    /// Sum over `axes` (negative counts from the end); `keepdim` keeps them
    /// as size 1. An empty list reduces nothing, as in NumPy.
    pub fn sum(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let axes = normalize_axes("sum", self, axes)?;
        self.sum_axes(&axes, keepdim)
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        float_only("mean", self.dtype())?;
        let norm = normalize_axes("mean", self, axes)?;
        let count: usize = norm.iter().map(|&a| self.dims()[a]).product();
        self.scaled_sum(&norm, keepdim, count)
    }

    /// The sum over `axes` times `1 / count`. f16 is summed and scaled in
    /// f32 and rounded once, as PyTorch's mean is: an f16 sum of 100,000
    /// ones is inf (past 65,504), their mean 1.
    fn scaled_sum(&self, axes: &[usize], keepdim: bool, count: usize) -> Result<Tensor> {
        if self.dtype() == DType::F16 {
            let wide = self.to_dtype(DType::F32)?.sum_axes(axes, keepdim)?.mul(1.0 / count as f64)?;
            return wide.to_dtype(DType::F16);
        }
        self.sum_axes(axes, keepdim)?.mul(1.0 / count as f64)
    }

    /// Maximum over `axes`; the gradient goes to the arg-max (split between ties).
    pub fn max(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        self.extremum(ReduceKind::Max, "max", axes, keepdim)
    }

    /// Minimum over `axes`; the gradient goes to the arg-min (split between ties).
    pub fn min(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        self.extremum(ReduceKind::Min, "min", axes, keepdim)
    }

    /// Sum of all elements, as a scalar (shape `[]`).
    pub fn sum_all(&self) -> Result<Tensor> {
        let axes: Vec<usize> = (0..self.rank()).collect();
        self.sum_axes(&axes, false)
    }

    /// Mean of all elements, as a scalar.
    pub fn mean_all(&self) -> Result<Tensor> {
        float_only("mean_all", self.dtype())?;
        // The mean of no elements is 0/0 = NaN, as in PyTorch.
        let axes: Vec<usize> = (0..self.rank()).collect();
        self.scaled_sum(&axes, false, self.numel())
    }

    /// Maximum of all elements, as a scalar.
    pub fn max_all(&self) -> Result<Tensor> {
        let axes: Vec<isize> = (0..self.rank() as isize).collect();
        self.max(&axes, false)
    }

    /// Sums broadcast dimensions away so the result has `shape` (the
    /// gradient of broadcasting to this tensor's shape).
    pub fn sum_to_shape(&self, shape: &Shape) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let (n, r) = (self.rank(), shape.rank());
        if r > n {
            return Err(Error::InvalidArgument {
                op: "sum_to_shape",
                message: format!("cannot sum {} to {shape}", self.shape()),
            });
        }
        let lead = n - r;
        let axes: Vec<usize> =
            (0..n).filter(|&i| i < lead || (shape.dims()[i - lead] == 1 && self.dims()[i] != 1)).collect();
        let summed = self.sum_axes(&axes, true)?;
        summed.reshape(shape.clone())
    }
}

fn reduced_shape(input: &Shape, axes: &[usize]) -> Shape {
    Shape::new(input.dims().iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect::<Vec<_>>())
}
