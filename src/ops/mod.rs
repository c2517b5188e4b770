//! Ops, one family per file: each file holds the family's shape rule, its
//! forward (through the executor) and its backward formula written in tensor
//! ops, so double backward and the compiled backward reuse the same formulas.
//!
//! [`Op`] is the gradient table: one variant per recorded op, carrying the
//! attributes its backward needs.

pub(crate) mod binary;
pub(crate) mod compare;
mod composite;
mod conv;
pub(crate) mod index;
mod loss;
mod matmul;
mod movement;
mod nn;
mod overloads;
mod reduce;
pub(crate) mod unary;

use crate::error::{Error, Result};
use crate::metadata::{DType, Shape};
use crate::tensor::Tensor;

pub use compare::where_;
pub(crate) use conv::check_groups;
pub use conv::{Conv2dOptions, Pool2dOptions};
pub use index::embedding;
pub use loss::{ClassLoss, Reduction};
pub use movement::{cat, stack};

/// A tensor or a scalar operand of a binary op (`x.mul(2.0)`, `x.mul(&y)`).
/// Scalars travel to kernels as uniforms and take the tensor's dtype.
#[derive(Debug, Clone)]
pub enum Operand {
    /// A tensor (broadcast against the other side).
    Tensor(Tensor),
    /// A scalar.
    Scalar(f64),
}

impl From<&Tensor> for Operand {
    fn from(t: &Tensor) -> Operand {
        Operand::Tensor(t.clone())
    }
}
impl From<Tensor> for Operand {
    fn from(t: Tensor) -> Operand {
        Operand::Tensor(t)
    }
}
impl From<f64> for Operand {
    fn from(v: f64) -> Operand {
        Operand::Scalar(v)
    }
}
impl From<f32> for Operand {
    fn from(v: f32) -> Operand {
        Operand::Scalar(v as f64)
    }
}
impl From<i32> for Operand {
    fn from(v: i32) -> Operand {
        Operand::Scalar(v as f64)
    }
}

impl Operand {
    pub(crate) fn tensor(&self) -> Option<&Tensor> {
        match self {
            Operand::Tensor(t) => Some(t),
            Operand::Scalar(_) => None,
        }
    }

    pub(crate) fn scalar(&self) -> Option<f64> {
        match self {
            Operand::Tensor(_) => None,
            Operand::Scalar(v) => Some(*v),
        }
    }

    pub(crate) fn shape(&self) -> Shape {
        match self {
            Operand::Tensor(t) => t.shape().clone(),
            Operand::Scalar(_) => Shape::new([]),
        }
    }
}

/// A recorded op and the attributes its backward needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    Unary(unary::UnaryOp),
    /// Scalar operands are kept here; tensor operands are the saved tensors.
    Binary {
        op: binary::BinaryOp,
        scalars: [Option<f64>; 2],
    },
    /// `where(mask, a, b)`; saved: the mask, then the tensor operands.
    Where {
        scalars: [Option<f64>; 2],
    },
    Cast {
        from: DType,
    },
    Sum {
        input: Shape,
        axes: Vec<usize>,
        keepdim: bool,
    },
    /// Max or min over axes; saved: the input and the (keepdim) result.
    Extremum {
        axes: Vec<usize>,
    },
    Matmul,
    Reshape {
        input: Shape,
    },
    Permute {
        perm: Vec<usize>,
    },
    Expand {
        input: Shape,
    },
    Narrow {
        input: Shape,
        dim: usize,
        start: usize,
    },
    /// `x[start::step]` along `dim` (a strided view), step > 1.
    StridedNarrow {
        input: Shape,
        dim: usize,
        start: usize,
        step: usize,
    },
    /// The inverse of narrow: places the input (of length `len` along
    /// `dim`) at `start` in a zero tensor.
    Pad {
        dim: usize,
        start: usize,
        len: usize,
    },
    Cat {
        dim: usize,
        sizes: Vec<usize>,
    },
    Copy,
    /// A gather from a source of shape `source`; saved: its index map
    /// (one image's, for every image of the leading dim, when `batched`).
    Gather {
        source: Shape,
        batched: bool,
    },
    /// The transpose of a gather, into `target`; saved: the index map.
    ScatterAdd {
        target: Shape,
        batched: bool,
    },
}

impl Op {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Unary(op) => op.name(),
            Op::Binary { op, .. } => op.name(),
            Op::Where { .. } => "where",
            Op::Cast { .. } => "to_dtype",
            Op::Sum { .. } => "sum",
            Op::Extremum { .. } => "max/min",
            Op::Matmul => "matmul",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Expand { .. } => "broadcast_to",
            Op::Narrow { .. } => "narrow",
            Op::StridedNarrow { .. } => "slice_step",
            Op::Pad { .. } => "pad",
            Op::Cat { .. } => "cat",
            Op::Copy => "contiguous",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
        }
    }

    /// Gradients of the op's inputs (one per edge; `None` where not needed
    /// or identically zero) from the gradient `g` of its output.
    pub(crate) fn backward(&self, saved: &[Tensor], g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        match self {
            Op::Unary(op) => Ok(vec![Some(op.backward(&saved[0], g)?)]),
            Op::Binary { op, scalars } => binary::backward(*op, scalars, saved, g, needs),
            Op::Where { scalars } => compare::where_backward(scalars, saved, g, needs),
            Op::Cast { from } => Ok(vec![Some(g.to_dtype(*from)?)]),
            Op::Sum { input, axes, keepdim } => Ok(vec![Some(reduce::sum_backward(g, input, axes, *keepdim)?)]),
            Op::Extremum { axes } => Ok(vec![Some(reduce::extremum_backward(&saved[0], &saved[1], g, axes)?)]),
            Op::Matmul => matmul::backward(&saved[0], &saved[1], g, needs),
            Op::Reshape { input } => Ok(vec![Some(g.reshape(input.clone())?)]),
            Op::Permute { perm } => Ok(vec![Some(g.permute_axes(&movement::inverse_permutation(perm))?)]),
            Op::Expand { input } => Ok(vec![Some(g.sum_to_shape(input)?)]),
            Op::Narrow { input, dim, start } => Ok(vec![Some(g.pad_narrowed(input, *dim, *start)?)]),
            Op::StridedNarrow { input, dim, start, step } => Ok(vec![Some(g.pad_strided(input, *dim, *start, *step)?)]),
            Op::Pad { dim, start, len } => Ok(vec![Some(g.narrow(*dim as isize, *start, *len)?)]),
            Op::Cat { dim, sizes } => movement::cat_backward(g, *dim, sizes, needs),
            Op::Copy => Ok(vec![Some(g.clone())]),
            Op::Gather { source, batched: false } => Ok(vec![Some(index::scatter_add_flat(
                g,
                &[saved[0].clone(), saved[1].clone(), saved[2].clone()],
                source,
            )?)]),
            Op::Gather { source, batched: true } => Ok(vec![Some(index::scatter_add_batched(
                g,
                &[saved[0].clone(), saved[1].clone(), saved[2].clone()],
                source,
            )?)]),
            Op::ScatterAdd { batched: false, .. } => {
                Ok(vec![Some(index::gather_flat(g, &[saved[0].clone(), saved[1].clone(), saved[2].clone()])?)])
            }
            Op::ScatterAdd { batched: true, .. } => {
                Ok(vec![Some(index::gather_batched(g, &[saved[0].clone(), saved[1].clone(), saved[2].clone()])?)])
            }
        }
    }
}

/// A one-op kernel under construction: tensor operands become input
/// bindings, scalar operands become uniform slots.
#[derive(Default)]
pub(crate) struct OperandKernel {
    pub kernel: crate::exec::kernel::MapKernel,
    pub inputs: Vec<Tensor>,
    scalars: Vec<f64>,
}

impl OperandKernel {
    pub fn operand(&mut self, o: &Operand, dtype: DType) -> crate::exec::kernel::NodeId {
        match o {
            Operand::Tensor(t) => {
                self.inputs.push(t.clone());
                self.kernel.input(dtype)
            }
            Operand::Scalar(v) => {
                self.scalars.push(*v);
                self.kernel.scalar(dtype)
            }
        }
    }

    /// Runs the kernel with `output` as its single result; returns it and
    /// the tensor inputs in binding order.
    pub fn run(
        mut self,
        op: &'static str,
        output: usize,
        shape: &Shape,
        device: &crate::Device,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        self.kernel.output(output);
        let inputs: Vec<&Tensor> = self.inputs.iter().collect();
        let out = crate::exec::map(op, self.kernel, &inputs, &self.scalars, shape, device)?.remove(0);
        Ok((out, self.inputs))
    }
}

/// The NumPy broadcast of the operands' shapes; on failure the error names
/// the shape broadcast so far and the operand that does not fit it.
pub(crate) fn broadcast_shape(op: &'static str, operands: &[&Operand]) -> Result<Shape> {
    let mut shape = Shape::new([]);
    for o in operands {
        let next = o.shape();
        shape = shape.broadcast(&next).ok_or_else(|| Error::ShapeMismatch { op, lhs: shape.clone(), rhs: next })?;
    }
    Ok(shape)
}

/// The common dtype of two operands (a scalar takes the tensor's dtype).
pub(crate) fn common_dtype(op: &'static str, a: &Operand, b: &Operand) -> Result<DType> {
    match (a.tensor(), b.tensor()) {
        (Some(x), Some(y)) if x.dtype() != y.dtype() => {
            Err(Error::DTypeMismatch { op, lhs: x.dtype(), rhs: y.dtype() })
        }
        (Some(x), _) | (None, Some(x)) => Ok(x.dtype()),
        (None, None) => Err(Error::InvalidArgument { op, message: "needs at least one tensor operand".into() }),
    }
}

/// The device of the first tensor operand; all tensor operands must share it.
pub(crate) fn common_device<'a>(op: &'static str, operands: &[&'a Operand]) -> Result<&'a crate::Device> {
    let mut device: Option<&crate::Device> = None;
    for t in operands.iter().filter_map(|o| o.tensor()) {
        match device {
            None => device = Some(t.device()),
            Some(d) if d != t.device() => {
                return Err(Error::DeviceMismatch { op, lhs: d.id(), rhs: t.device().id() });
            }
            Some(_) => {}
        }
    }
    device.ok_or_else(|| Error::InvalidArgument { op, message: "needs at least one tensor operand".into() })
}

pub(crate) fn float_only(op: &'static str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType {
            op,
            dtype,
            hint: "this op needs a float tensor; convert with `.to_dtype(DType::F32)`",
        })
    }
}
