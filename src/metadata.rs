//! Dtypes, shapes and [`InputMetadata`]: what a gradient flowing into an
//! edge of the backward graph must look like.

use std::fmt;

use crate::autograd::Edge;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit float; needs an adapter with `SHADER_F16` (see [`crate::Device::supports_f16`]).
    F16,
    /// 32-bit signed integer.
    I32,
    /// 32-bit unsigned integer; also the dtype of comparison masks (0 or 1).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }

    /// Whether the dtype is a floating-point type (and so can carry gradients).
    pub fn is_float(self) -> bool {
        match self {
            DType::F32 | DType::F16 => true,
            DType::I32 | DType::U32 => false,
        }
    }

    /// The WGSL scalar type name.
    pub(crate) fn wgsl(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::U32 => "u32",
        }
    }
}

/// Identity of a [`crate::Device`]; small, `Copy` and hashable so it can key caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub(crate) u64);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gpu:{}", self.0)
    }
}

/// The dimensions of a tensor, outermost first. `[]` is a scalar.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape from its dimensions.
    pub fn new(dims: impl Into<Vec<usize>>) -> Shape {
        Shape(dims.into())
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a scalar). Saturates at `usize::MAX`
    /// for absurd shapes, which allocation then refuses as too large.
    pub fn numel(&self) -> usize {
        self.0.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }

    /// Row-major (C-contiguous) strides, in elements. Saturating: only a
    /// shape with a zero dim can get this far with dims whose product
    /// overflows (shapes are checked where users give them), and its strides are never used
    /// to address an element.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![0; self.0.len()];
        let mut acc = 1usize;
        for (s, d) in strides.iter_mut().zip(&self.0).rev() {
            *s = acc;
            acc = acc.saturating_mul(*d);
        }
        strides
    }

    /// An error unless the product of the non-zero dims fits in an `i64`
    /// (PyTorch's limit); called wherever a user gives a shape, so no later
    /// size or stride arithmetic can overflow.
    pub(crate) fn check_size(&self, op: &'static str) -> crate::Result<()> {
        let product = self.0.iter().filter(|&&d| d != 0).try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        match product {
            Some(p) if p <= i64::MAX as u64 => Ok(()),
            _ => Err(crate::Error::InvalidArgument {
                op,
                message: format!(
                    "shape {self} is too large: its dims multiply past 2^63; use smaller dims or split the tensor"
                ),
            }),
        }
    }

    /// NumPy broadcasting of two shapes, `None` when they are incompatible.
    pub fn broadcast(&self, other: &Shape) -> Option<Shape> {
        let rank = self.rank().max(other.rank());
        let mut out = vec![0; rank];
        for (i, o) in out.iter_mut().enumerate() {
            let a = dim_from_right(&self.0, rank - 1 - i);
            let b = dim_from_right(&other.0, rank - 1 - i);
            *o = match (a, b) {
                (a, b) if a == b => a,
                (1, b) => b,
                (a, 1) => a,
                _ => return None,
            };
        }
        Some(Shape(out))
    }
}

pub(crate) fn resolve_axis(op: &'static str, axis: isize, rank: usize) -> crate::Result<usize> {
    // As in PyTorch, a 0-d tensor has one virtual dim: 0 and -1 name it.
    let r = rank.max(1) as isize;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(crate::Error::InvalidArgument {
            op,
            message: format!("axis {axis} is out of range for a tensor of rank {rank} (valid: {} to {})", -r, r - 1),
        });
    }
    Ok(a as usize)
}

fn dim_from_right(dims: &[usize], k: usize) -> usize {
    if k < dims.len() { dims[dims.len() - 1 - k] } else { 1 }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Shape {
        Shape(v)
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Shape {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Shape {
        Shape(v.to_vec())
    }
}
impl From<&Shape> for Shape {
    fn from(v: &Shape) -> Shape {
        v.clone()
    }
}

/// What a gradient flowing into an edge of the backward graph must look like
/// (PyTorch's `InputMetadata`). The engine validates every gradient against
/// it; the compiled backward keys its cache on it and sizes buffers from it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct InputMetadata {
    /// Device the gradient must live on.
    pub device: DeviceId,
    /// Its dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Shape,
}

impl fmt::Debug for InputMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}{} on {}", self.dtype, self.shape, self.device)
    }
}

/// One entry per edge: the metadata of the gradient that flows along it, or
/// `None` where the edge carries no gradient (PyTorch's `collect_input_metadata`).
pub fn collect_input_metadata(edges: &[Edge]) -> Vec<Option<InputMetadata>> {
    edges.iter().map(Edge::metadata).collect()
}
