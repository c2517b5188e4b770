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
