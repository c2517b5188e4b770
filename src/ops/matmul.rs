//! Matrix multiplication: 2-D, batched with broadcast batch dims, and
//! matrix-vector, on the tiled kernel in `shaders/matmul.wgsl`.

use crate::autograd::record;
use crate::error::{Error, Result};
use crate::metadata::Shape;
use crate::ops::{Op, common_dtype};
use crate::tensor::Tensor;

const MATMUL_RULE: &str = "the left operand's last dim must equal the right operand's second-to-last ([.., m, k] @ [.., k, n]), and their batch dims must broadcast";

/// Both operands at least 2-D; records the op.
fn matmul_nd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ra, rb) = (a.rank(), b.rank());
    let (k1, k2) = (a.dims()[ra - 1], b.dims()[rb - 2]);
    let batch_a = Shape::new(&a.dims()[..ra - 2]);
    let batch_b = Shape::new(&b.dims()[..rb - 2]);
    let batch = batch_a.broadcast(&batch_b);
    let (Some(batch), true) = (batch, k1 == k2) else {
        return Err(Error::IncompatibleShapes {
            op: "matmul",
            lhs: a.shape().clone(),
            rhs: b.shape().clone(),
            rule: MATMUL_RULE,
        });
    };
    let out = crate::exec::matmul(a, b, &batch)?;
    Ok(record(Op::Matmul, &[a, b], vec![a.clone(), b.clone()], out))
}

pub(crate) fn backward(a: &Tensor, b: &Tensor, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let ga = if needs[0] { Some(g.matmul(&b.transpose(-1, -2)?)?.sum_to_shape(a.shape())?) } else { None };
    let gb = if needs[1] { Some(a.transpose(-1, -2)?.matmul(g)?.sum_to_shape(b.shape())?) } else { None };
    Ok(vec![ga, gb])
}

impl Tensor {
    /// Matrix product with `numpy.matmul` semantics: `[.., m, k] @ [.., k, n]`
    /// with broadcast batch dims; a 1-D operand is a vector (matrix-vector,
    /// vector-matrix, or a dot product for two vectors).
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        common_dtype("matmul", &self.into(), &rhs.into())?;
        let (ra, rb) = (self.rank(), rhs.rank());
        if ra == 0 || rb == 0 {
            return Err(Error::InvalidArgument {
                op: "matmul",
                message: format!(
                    "needs tensors of rank >= 1, got {} and {}; use mul for scalars",
                    self.shape(),
                    rhs.shape()
                ),
            });
        }
        let a = if ra == 1 { self.unsqueeze(0)? } else { self.clone() };
        let b = if rb == 1 { rhs.unsqueeze(1)? } else { rhs.clone() };
        let mut out = matmul_nd(&a, &b).map_err(|e| match e {
            Error::IncompatibleShapes { op, rule, .. } => {
                Error::IncompatibleShapes { op, lhs: self.shape().clone(), rhs: rhs.shape().clone(), rule }
            }
            other => other,
        })?;
        if rb == 1 {
            out = out.squeeze(-1)?;
        }
        if ra == 1 {
            out = out.squeeze(if rb == 1 { -1 } else { -2 })?;
        }
        Ok(out)
    }
}
