//! Movement ops. Reshape (of contiguous data), permute, broadcast and narrow
//! are views: no kernel runs. `cat` and the padding that is narrow's
//! gradient copy through the elementwise generator's identity kernel.

use crate::autograd::record;
use crate::error::{Error, Result};
use crate::exec::kernel::MapKernel;
use crate::metadata::{Shape, resolve_axis};
use crate::ops::Op;
use crate::tensor::Tensor;

pub(crate) fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

impl Tensor {
    /// A contiguous copy of this view, not recorded.
    pub(crate) fn contiguous_copy(&self) -> Result<Tensor> {
        let out = crate::exec::map("copy", MapKernel::copy(self.dtype()), &[self], &[], self.shape(), self.device())?;
        Ok(out.into_iter().next().expect("one output"))
    }

    /// Permuted view, not recorded.
    pub(crate) fn permute_view(&self, perm: &[usize]) -> Tensor {
        self.with_layout(self.layout().permute(perm))
    }

    /// Reshaped view of contiguous data, not recorded.
    pub(crate) fn reshape_view(&self, shape: Shape) -> Tensor {
        self.with_layout(self.layout().reshape_contiguous(shape))
    }

    /// The same elements in a new shape with as many elements. A view when
    /// the data is contiguous, a copy otherwise.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        crate::layout::check_shape("reshape", &shape)?;
        if shape.numel() != self.numel() {
            return Err(Error::InvalidArgument {
                op: "reshape",
                message: format!(
                    "cannot reshape {} ({} elements) to {shape} ({} elements)",
                    self.shape(),
                    self.numel(),
                    shape.numel()
                ),
            });
        }
        if &shape == self.shape() {
            return Ok(self.clone());
        }
        let base = if self.is_contiguous() { self.detach() } else { self.contiguous_copy()? };
        let out = base.reshape_view(shape);
        Ok(record(Op::Reshape { input: self.shape().clone() }, &[self], Vec::new(), out))
    }

    /// [`Tensor::reshape`] where one dim may be `-1`, inferred from the
    /// element count (PyTorch's `reshape(2, -1)`).
    pub fn reshape_infer(&self, dims: &[isize]) -> Result<Tensor> {
        let bad = |message: String| Error::InvalidArgument { op: "reshape", message };
        if dims.iter().filter(|&&d| d == -1).count() > 1 {
            return Err(bad(format!("only one dim of {dims:?} can be -1")));
        }
        if let Some(d) = dims.iter().find(|&&d| d < -1) {
            return Err(bad(format!("dim {d} in {dims:?} is invalid; dims are >= 0, or -1 for one inferred dim")));
        }
        let known: usize = dims
            .iter()
            .filter(|&&d| d >= 0)
            .map(|&d| d as usize)
            .try_fold(1usize, |a, d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("the dims {dims:?} multiply past the largest size")))?;
        let inferred = match dims.iter().position(|&d| d == -1) {
            None => None,
            Some(_) if known == 0 => {
                return Err(bad(format!(
                    "cannot infer the -1 in {dims:?}: with a zero dim it could be any size; give every dim"
                )));
            }
            Some(_) if !self.numel().is_multiple_of(known) => {
                return Err(bad(format!(
                    "cannot reshape {} ({} elements) to {dims:?}: {} is not a multiple of {known}",
                    self.shape(),
                    self.numel(),
                    self.numel()
                )));
            }
            Some(_) => Some(self.numel() / known),
        };
        let resolved: Vec<usize> =
            dims.iter().map(|&d| if d == -1 { inferred.unwrap_or(0) } else { d as usize }).collect();
        self.reshape(resolved)
    }

    /// All elements as one dimension.
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape([self.numel()])
    }

    /// Reorders dimensions: output dim `i` is input dim `dims[i]` (a view);
    /// negative dims count from the end, as in PyTorch.
    pub fn permute(&self, dims: &[isize]) -> Result<Tensor> {
        let rank = self.rank() as isize;
        let perm: Vec<usize> = dims
            .iter()
            .map(|&d| {
                let a = if d < 0 { d + rank } else { d };
                // Out of range stays out of range, for the message below.
                usize::try_from(a).unwrap_or(usize::MAX)
            })
            .collect();
        self.permute_axes(&perm).map_err(|e| match e {
            Error::InvalidArgument { op, .. } => Error::InvalidArgument {
                op,
                message: format!("{dims:?} is not a permutation of the {} dims of {}", self.rank(), self.shape()),
            },
            other => other,
        })
    }

    /// [`Tensor::permute`] with resolved (non-negative) dims.
    pub(crate) fn permute_axes(&self, perm: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank() || perm.iter().any(|&p| p >= self.rank() || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::InvalidArgument {
                op: "permute",
                message: format!("{perm:?} is not a permutation of the {} dims of {}", self.rank(), self.shape()),
            });
        }
        let out = self.permute_view(perm);
        Ok(record(Op::Permute { perm: perm.to_vec() }, &[self], Vec::new(), out))
    }

    /// Swaps two dimensions (a view).
    pub fn transpose(&self, dim0: isize, dim1: isize) -> Result<Tensor> {
        let a = resolve_axis("transpose", dim0, self.rank())?;
        let b = resolve_axis("transpose", dim1, self.rank())?;
        if self.rank() == 0 {
            // Dims 0 and -1 name the one (virtual) dim of a 0-d tensor: nothing to swap.
            return self.permute_axes(&[]);
        }
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute_axes(&perm)
    }

    /// Transpose of a 2-D tensor.
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(Error::InvalidArgument {
                op: "t",
                message: format!("needs a 2-D tensor, got {}", self.shape()),
            });
        }
        self.transpose(0, 1)
    }

    /// Broadcasts to `shape` (NumPy rules) without copying.
    pub fn broadcast_to(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if &shape == self.shape() {
            return Ok(self.clone());
        }
        crate::layout::check_shape("broadcast_to", &shape)?;
        let layout = self.layout().broadcast_to("broadcast_to", &shape)?;
        let out = self.with_layout(layout);
        Ok(record(Op::Expand { input: self.shape().clone() }, &[self], Vec::new(), out))
    }

    /// Alias of [`Tensor::broadcast_to`] (PyTorch's `expand`).
    pub fn expand(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        self.broadcast_to(shape)
    }

    /// `len` elements of `dim` starting at `start` (a view).
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = resolve_axis("narrow", dim, self.rank())?;
        if self.rank() == 0 || start.checked_add(len).is_none_or(|end| end > self.dims()[d]) {
            return Err(Error::InvalidArgument {
                op: "narrow",
                message: format!("range {start}..{} is outside dim {d} of {}", start.saturating_add(len), self.shape()),
            });
        }
        let out = self.with_layout(self.layout().narrow(d, start, len));
        Ok(record(Op::Narrow { input: self.shape().clone(), dim: d, start }, &[self], Vec::new(), out))
    }

    /// Elements `range` of `dim` (a view); `x.slice(0, 2..5)` is `x[2:5]`.
    /// A range outside the dim is an `Err` (unlike Python's clamping; see
    /// [`Tensor::slice_step`] for steps, negative and clamped ends).
    pub fn slice(&self, dim: isize, range: std::ops::Range<usize>) -> Result<Tensor> {
        self.narrow(dim, range.start, range.end.saturating_sub(range.start))
    }

    /// Python's `x[start:end:step]` along `dim`, as a strided view (no
    /// copy). `None` is the beginning or end of the dim; negative `start`
    /// and `end` count from the end; out-of-range ones clamp to the dim,
    /// as Python and PyTorch do, so an empty range gives an empty dim
    /// rather than an error. `step` 0 is an `Err`; PyTorch refuses
    /// negative steps, hence the `usize`.
    ///
    /// The gradient is the output gradient at the selected positions and
    /// zeros between them.
    ///
    /// ```
    /// # fn main() -> wgrad::Result<()> {
    /// let device = wgrad::Device::new()?;
    /// let x = wgrad::Tensor::arange(0.0, 10.0, 1.0, &device)?;
    /// // x[-8::3] in Python
    /// assert_eq!(x.slice_step(0, Some(-8), None, 3)?.to_vec::<f32>()?, vec![2.0, 5.0, 8.0]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn slice_step(&self, dim: isize, start: Option<isize>, end: Option<isize>, step: usize) -> Result<Tensor> {
        let d = resolve_axis("slice_step", dim, self.rank())?;
        if self.rank() == 0 {
            return Err(Error::InvalidArgument {
                op: "slice_step",
                message: "cannot slice a 0-d tensor: it has no dim; reshape it to [1] first".into(),
            });
        }
        if step == 0 {
            return Err(Error::InvalidArgument {
                op: "slice_step",
                message: format!("step must be at least 1, got 0 (slicing dim {d} of {})", self.shape()),
            });
        }
        let n = self.dims()[d];
        // Python's clamping: negatives count from the end, then clamp to 0..=n.
        let resolve =
            |i: isize| -> usize { if i < 0 { n.saturating_sub(i.unsigned_abs()) } else { (i as usize).min(n) } };
        let clamps = |i: isize| if i < 0 { i.unsigned_abs() > n } else { i as usize > n };
        let (start_at, end_at) = (start, end);
        let start = start.map_or(0, resolve);
        let end = end.map_or(n, resolve);
        let len = if end > start { (end - start).div_ceil(step) } else { 0 };
        // A strided length ceil((end - start) / step) that follows the dim
        // (an open or negative end or start) may be the same at three
        // neighbouring sizes and differ beyond: not affine either.
        let follows_dim = |i: Option<isize>| i.is_none_or(|i| i < 0);
        let strided_follows = step > 1 && (follows_dim(end_at) || start_at.is_some_and(|i| i < 0));
        if start_at.is_some_and(clamps) || end_at.is_some_and(clamps) || end < start || strided_follows {
            // Sizes a compiled step must not extrapolate to other batches.
            crate::compiler::trace::note_clamped();
        }
        if step == 1 || len <= 1 {
            // The stride of a dim of at most one element is never used.
            return self.narrow(d as isize, start.min(n), len);
        }
        let out = self.with_layout(self.layout().strided_narrow(d, start, len, step));
        let op = Op::StridedNarrow { input: self.shape().clone(), dim: d, start, step };
        Ok(record(op, &[self], Vec::new(), out))
    }

    /// Places this tensor at `start, start + step, ...` along `dim` of a
    /// zero tensor of `shape` (the gradient of [`Tensor::slice_step`]).
    /// As `[outer, len, inner]`, each element is padded to `step` along a
    /// new dim after `len`, the two dims merged, and the result padded
    /// into place; so the gradient is made of recorded ops (double and
    /// compiled backward need nothing more), and the rank stays at most 4
    /// whatever the input's.
    pub(crate) fn pad_strided(&self, shape: &Shape, dim: usize, start: usize, step: usize) -> Result<Tensor> {
        let (len, n) = (self.dims()[dim], shape.dims()[dim]);
        let outer: usize = self.dims()[..dim].iter().product();
        let inner: usize = self.dims()[dim + 1..].iter().product();
        let spread =
            self.reshape([outer, len, 1, inner])?.pad_narrowed(&Shape::new([outer, len, step, inner]), 2, 0)?;
        // The gaps after the last element may run past the end of `dim`.
        let Some(room) = n.checked_sub(start) else {
            return Err(Error::InvalidArgument {
                op: "slice_step",
                message: format!("internal: its gradient starts at {start}, past dim {dim} of {shape}"),
            });
        };
        let fits = (len * step).min(room);
        let placed = spread.reshape([outer, len * step, inner])?.narrow(1, 0, fits)?;
        placed.pad_narrowed(&Shape::new([outer, n, inner]), 1, start)?.reshape(shape.clone())
    }

    /// Places this tensor at `start` along `dim` of a zero tensor of
    /// `shape` (the gradient of narrow).
    pub(crate) fn pad_narrowed(&self, shape: &Shape, dim: usize, start: usize) -> Result<Tensor> {
        let out = crate::exec::assemble("pad", shape, self.dtype(), self.device(), &[(self, dim, start)], true)?;
        Ok(record(Op::Pad { dim, start, len: self.dims()[dim] }, &[self], Vec::new(), out))
    }

    /// Removes a dimension of size 1.
    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        let d = resolve_axis("squeeze", dim, self.rank())?;
        if self.rank() == 0 || self.dims()[d] != 1 {
            return Err(Error::InvalidArgument {
                op: "squeeze",
                message: format!("dim {d} of {} is not of size 1", self.shape()),
            });
        }
        let mut dims = self.dims().to_vec();
        dims.remove(d);
        self.view_as_shape(Shape::new(dims))
    }

    /// Inserts a dimension of size 1 at `dim` (`-1` appends).
    pub fn unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let d = resolve_axis("unsqueeze", dim, self.rank() + 1)?;
        let mut dims = self.dims().to_vec();
        dims.insert(d, 1);
        self.view_as_shape(Shape::new(dims))
    }

    /// A reshape that only adds or removes size-1 dims: always a view.
    fn view_as_shape(&self, shape: Shape) -> Result<Tensor> {
        let mut strides = Vec::with_capacity(shape.rank());
        let mut src = self.dims().iter().zip(&self.layout().strides).filter(|(d, _)| **d != 1);
        for &d in shape.dims() {
            strides.push(if d == 1 { 0 } else { *src.next().map(|(_, s)| s).unwrap_or(&0) });
        }
        let layout = crate::layout::Layout { shape: shape.clone(), strides, offset: self.layout().offset };
        let out = self.with_layout(layout);
        Ok(record(Op::Reshape { input: self.shape().clone() }, &[self], Vec::new(), out))
    }

    /// This tensor with row-major contiguous data (a copy only if needed).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let out = self.contiguous_copy()?;
        Ok(record(Op::Copy, &[self], Vec::new(), out))
    }
}

/// Concatenates tensors along `dim`; all other dims must agree.
pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(Error::InvalidArgument { op: "cat", message: "needs at least one tensor".into() });
    };
    if let Some(scalar) = tensors.iter().find(|t| t.rank() == 0) {
        return Err(Error::InvalidArgument {
            op: "cat",
            message: format!(
                "cannot concatenate a 0-d tensor (shape {}): it has no dim to join along; \
                 use `stack` to make a vector of scalars, or `unsqueeze(0)` each one first",
                scalar.shape()
            ),
        });
    }
    let d = resolve_axis("cat", dim, first.rank())?;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let same_rest = t.rank() == first.rank()
            && t.dims().iter().zip(first.dims()).enumerate().all(|(i, (a, b))| i == d || a == b);
        if !same_rest {
            return Err(Error::IncompatibleShapes {
                op: "cat",
                lhs: first.shape().clone(),
                rhs: t.shape().clone(),
                rule: "every tensor must have the same rank and the same dims except the one joined along",
            });
        }
        if t.dtype() != first.dtype() {
            return Err(Error::DTypeMismatch { op: "cat", lhs: first.dtype(), rhs: t.dtype() });
        }
        if t.device() != first.device() {
            return Err(Error::DeviceMismatch { op: "cat", lhs: first.device().id(), rhs: t.device().id() });
        }
        sizes.push(t.dims()[d]);
    }
    let mut dims = first.dims().to_vec();
    dims[d] = sizes.iter().sum();
    let mut pieces = Vec::with_capacity(tensors.len());
    let mut start = 0;
    for (t, &len) in tensors.iter().zip(&sizes) {
        pieces.push((*t, d, start));
        start += len;
    }
    let out = crate::exec::assemble("cat", &Shape::new(dims), first.dtype(), first.device(), &pieces, false)?;
    Ok(record(Op::Cat { dim: d, sizes }, tensors, Vec::new(), out))
}

pub(crate) fn cat_backward(g: &Tensor, dim: usize, sizes: &[usize], needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let mut start = 0;
    let mut out = Vec::with_capacity(sizes.len());
    for (&len, &need) in sizes.iter().zip(needs) {
        out.push(if need { Some(g.narrow(dim as isize, start, len)?) } else { None });
        start += len;
    }
    Ok(out)
}

/// Stacks same-shaped tensors along a new dimension `dim`.
pub fn stack(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(Error::InvalidArgument { op: "stack", message: "needs at least one tensor".into() });
    };
    let d = resolve_axis("stack", dim, first.rank() + 1)? as isize;
    let expanded = tensors.iter().map(|t| t.unsqueeze(d)).collect::<Result<Vec<_>>>()?;
    cat(&expanded.iter().collect::<Vec<_>>(), d)
}
