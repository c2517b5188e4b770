//! Strided views. A tensor is a view (shape, strides, offset, in elements)
//! into a buffer; transpose, permute, broadcast and narrow only change the
//! view, and kernels read any view directly.

use crate::error::{Error, Result};
use crate::metadata::Shape;

/// The largest rank kernels index (sizes travel in a fixed-size uniform).
pub(crate) const MAX_RANK: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Layout {
    pub shape: Shape,
    pub strides: Vec<usize>,
    pub offset: usize,
}

impl Layout {
    pub fn contiguous(shape: Shape) -> Layout {
        let strides = shape.contiguous_strides();
        Layout { shape, strides, offset: 0 }
    }

    /// Row-major with no gaps (the offset may be non-zero).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.dims().iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// This view broadcast to `shape` (stride 0 on the new and size-1 dims).
    pub fn broadcast_to(&self, op: &'static str, shape: &Shape) -> Result<Layout> {
        let (r, n) = (self.shape.rank(), shape.rank());
        let bad =
            || Error::InvalidArgument { op, message: format!("cannot broadcast shape {} to {shape}", self.shape) };
        if r > n {
            return Err(bad());
        }
        let mut strides = vec![0; n];
        for i in 0..r {
            let (d, t) = (self.shape.dims()[r - 1 - i], shape.dims()[n - 1 - i]);
            strides[n - 1 - i] = if d == t {
                self.strides[r - 1 - i]
            } else if d == 1 {
                0
            } else {
                return Err(bad());
            };
        }
        Ok(Layout { shape: shape.clone(), strides, offset: self.offset })
    }

    pub fn permute(&self, perm: &[usize]) -> Layout {
        Layout {
            shape: Shape::new(perm.iter().map(|&p| self.shape.dims()[p]).collect::<Vec<_>>()),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        }
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Layout {
        let mut dims = self.shape.dims().to_vec();
        dims[dim] = len;
        Layout {
            shape: Shape::new(dims),
            strides: self.strides.clone(),
            offset: self.offset + start * self.strides[dim],
        }
    }

    /// `len` elements of `dim` taken every `step` from `start`: the stride
    /// along `dim` grows by `step` (a strided view, no copy).
    pub fn strided_narrow(&self, dim: usize, start: usize, len: usize, step: usize) -> Layout {
        let mut layout = self.narrow(dim, start, len);
        layout.strides[dim] *= step;
        layout
    }

    /// A reshape that keeps the data where it is; only for contiguous views.
    pub fn reshape_contiguous(&self, shape: Shape) -> Layout {
        let strides = shape.contiguous_strides();
        Layout { shape, strides, offset: self.offset }
    }

    pub fn check_rank(&self, op: &'static str) -> Result<()> {
        if self.shape.rank() > MAX_RANK {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "rank {} exceeds the supported maximum of {MAX_RANK}; reshape to fewer dims",
                    self.shape.rank()
                ),
            });
        }
        Ok(())
    }
}

/// Checks a shape an op is about to produce, at the call (so an error names
/// the op the user called, in every executor mode): dims whose product
/// overflows, ranks past [`MAX_RANK`], and element counts that kernels'
/// `u32` indices cannot address.
pub(crate) fn check_shape(op: &'static str, shape: &Shape) -> Result<()> {
    shape.check_size(op)?;
    Layout::contiguous(shape.clone()).check_rank(op)?;
    if shape.numel() > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "shape {shape} has {} elements; kernels index at most 2^32 - 1, so split the tensor",
                shape.numel()
            ),
        });
    }
    Ok(())
}

impl Layout {
    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// Whether this view reads a contiguous tensor of `shape` element for
    /// element (same dims, contiguous, offset 0).
    pub fn is_identity_of(&self, shape: &Shape) -> bool {
        &self.shape == shape && self.offset == 0 && self.is_contiguous()
    }

    /// `self` is a view of a contiguous tensor of shape `inner.shape`, whose
    /// elements sit in a buffer at `inner`. Returns the same view expressed
    /// directly against that buffer, when one strided layout can say it.
    /// This is what lets the compiler look through copies and fuse a
    /// producer into a consumer that reads it transposed, sliced or
    /// broadcast.
    pub fn compose(&self, inner: &Layout) -> Option<Layout> {
        let dims = inner.shape.dims();
        let numel = inner.shape.numel();
        if self.numel() == 0 {
            return Some(Layout { shape: self.shape.clone(), strides: vec![0; self.shape.rank()], offset: 0 });
        }
        if self.is_contiguous() && inner.is_contiguous() && self.offset + self.numel() <= numel {
            let strides = self.shape.contiguous_strides();
            return Some(Layout { shape: self.shape.clone(), strides, offset: inner.offset + self.offset });
        }
        if self.offset >= numel {
            return None;
        }
        let base_strides = inner.shape.contiguous_strides();
        let mut coords = vec![0; dims.len()];
        let mut rest = self.offset;
        for j in 0..dims.len() {
            coords[j] = rest / base_strides[j];
            rest %= base_strides[j];
        }
        let mut used = vec![false; dims.len()];
        let mut strides = Vec::with_capacity(self.shape.rank());
        for (&n, &s) in self.shape.dims().iter().zip(&self.strides) {
            if n == 1 || s == 0 {
                strides.push(0);
                continue;
            }
            let j = (0..dims.len()).find(|&j| !used[j] && dims[j] > 1 && base_strides[j] == s)?;
            if coords[j] + n > dims[j] {
                return None;
            }
            used[j] = true;
            strides.push(inner.strides[j]);
        }
        let offset = inner.offset + coords.iter().zip(&inner.strides).map(|(c, s)| c * s).sum::<usize>();
        Some(Layout { shape: self.shape.clone(), strides, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;
    use crate::metadata::Shape;

    /// The buffer index of every element of `l`, row-major.
    fn indices(l: &Layout) -> Vec<usize> {
        let dims = l.shape.dims();
        (0..l.numel())
            .map(|mut i| {
                let mut at = l.offset;
                for d in (0..dims.len()).rev() {
                    at += (i % dims[d]) * l.strides[d];
                    i /= dims[d];
                }
                at
            })
            .collect()
    }

    /// Composition agrees with reading through both layouts one after the other.
    fn check(view: &Layout, inner: &Layout) {
        let composed = view.compose(inner).expect("composable");
        let inner_idx = indices(inner);
        let expected: Vec<usize> = indices(view).into_iter().map(|i| inner_idx[i]).collect();
        assert_eq!(indices(&composed), expected, "{view:?} over {inner:?}");
    }

    #[test]
    fn compose_matches_two_step_indexing() {
        let base = Layout::contiguous(Shape::new([3, 4]));
        let transposed = base.permute(&[1, 0]);
        let inner_views = [
            base.clone(),
            transposed.clone(),
            base.narrow(1, 1, 2),
            base.broadcast_to("t", &Shape::new([2, 3, 4])).unwrap(),
        ];
        for inner in &inner_views {
            let own = Layout::contiguous(inner.shape.clone());
            let mut views = vec![own.clone(), own.permute(&(0..own.shape.rank()).rev().collect::<Vec<_>>())];
            views.push(own.narrow(0, 1, inner.shape.dims()[0] - 1));
            let mut bdims = vec![5];
            bdims.extend_from_slice(inner.shape.dims());
            views.push(own.broadcast_to("t", &Shape::new(bdims)).unwrap());
            for v in &views {
                check(v, inner);
            }
        }
        // A strided slice either composes correctly or not at all (a copy then).
        let wide = Layout::contiguous(Shape::new([4, 6]));
        for (dim, start, len, step) in [(1, 1, 3, 2), (0, 0, 2, 3), (1, 0, 2, 4)] {
            let view = wide.strided_narrow(dim, start, len, step);
            for inner in [wide.clone(), Layout::contiguous(Shape::new([6, 4])).permute(&[1, 0])] {
                if view.compose(&inner).is_some() {
                    check(&view, &inner);
                }
            }
        }
        // A reshape of contiguous data composes with contiguous data only.
        let flat = Layout::contiguous(Shape::new([12]));
        check(&flat, &base);
        assert!(flat.compose(&transposed).is_none());
    }
}
