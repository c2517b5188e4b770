//! Comparisons (masks, no gradient), `where` and dtype conversion.

use crate::autograd::record;
use crate::error::Result;
use crate::exec::kernel::{MapKernel, Node};
use crate::metadata::DType;
use crate::ops::{Op, Operand, OperandKernel, broadcast_shape, common_device, common_dtype};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Ne => "ne",
            CmpOp::Lt => "lt",
            CmpOp::Le => "le",
            CmpOp::Gt => "gt",
            CmpOp::Ge => "ge",
        }
    }

    /// The WGSL condition on `a` and `b` (of type `dtype`).
    pub(crate) fn wgsl(self, a: &str, b: &str, dtype: DType) -> String {
        // `!=` is true where an operand is NaN, as in IEEE and PyTorch;
        // llvmpipe compiles it as an ordered comparison (false there), so
        // NaN is tested on the bits. The other comparisons are false with a
        // NaN operand, as their WGSL forms are.
        if let (CmpOp::Ne, Some(nan_a), Some(nan_b)) =
            (self, crate::exec::codegen::nan_test(a, dtype), crate::exec::codegen::nan_test(b, dtype))
        {
            return format!("({a} != {b} || {nan_a} || {nan_b})");
        }
        let op = match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        };
        format!("{a} {op} {b}")
    }
}

/// A u32 mask (1 where the comparison holds). Masks carry no gradient.
pub(crate) fn compare(op: CmpOp, a: Operand, b: Operand) -> Result<Tensor> {
    let dtype = common_dtype(op.name(), &a, &b)?;
    let device = common_device(op.name(), &[&a, &b])?.clone();
    let shape = broadcast_shape(op.name(), &[&a, &b])?;
    let mut k = OperandKernel::default();
    let x = k.operand(&a, dtype);
    let y = k.operand(&b, dtype);
    let m = k.kernel.push(Node::Compare(op, x, y), DType::U32);
    Ok(k.run(op.name(), m, &shape, &device)?.0)
}

/// `mask ? on_true : on_false` elementwise, broadcasting all three; the
/// mask is any tensor, non-zero meaning true. Gradients flow to the chosen side.
pub fn where_(mask: &Tensor, on_true: impl Into<Operand>, on_false: impl Into<Operand>) -> Result<Tensor> {
    let (a, b) = (on_true.into(), on_false.into());
    let dtype = common_dtype("where", &a, &b)?;
    let mask = Operand::Tensor(mask.clone());
    let device = common_device("where", &[&mask, &a, &b])?.clone();
    let shape = broadcast_shape("where", &[&mask, &a, &b])?;
    let mut k = OperandKernel::default();
    let c = k.operand(&mask, mask.tensor().map_or(DType::U32, Tensor::dtype));
    let x = k.operand(&a, dtype);
    let y = k.operand(&b, dtype);
    let z = k.kernel.push(Node::Select(c, x, y), dtype);
    let (out, inputs) = k.run("where", z, &shape, &device)?;
    // Saved: the mask, then the tensor operands (which are also the edges).
    let refs: Vec<&Tensor> = inputs[1..].iter().collect();
    Ok(record(Op::Where { scalars: [a.scalar(), b.scalar()] }, &refs, inputs.clone(), out))
}

pub(crate) fn where_backward(
    scalars: &[Option<f64>; 2],
    saved: &[Tensor],
    g: &Tensor,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let mask = &saved[0];
    let mut tensors = saved[1..].iter();
    let mut out = Vec::new();
    for (side, s) in scalars.iter().enumerate() {
        if s.is_some() {
            continue;
        }
        let t = tensors.next().expect("saved tensor per operand");
        if !needs[out.len()] {
            out.push(None);
            continue;
        }
        let grad = if side == 0 { where_(mask, g, 0.0)? } else { where_(mask, 0.0, g)? };
        out.push(Some(grad.sum_to_shape(t.shape())?));
    }
    Ok(out)
}

/// Comparisons return u32 masks (1 where true, 0 elsewhere), with
/// broadcasting; scalars compare against every element.
impl Tensor {
    /// `self == rhs`.
    pub fn eq(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(CmpOp::Eq, self.into(), rhs.into())
    }
    /// `self != rhs`.
    pub fn ne(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(CmpOp::Ne, self.into(), rhs.into())
    }
    /// `self < rhs`.
    pub fn lt(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(CmpOp::Lt, self.into(), rhs.into())
    }
    /// `self <= rhs`.
    pub fn le(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(CmpOp::Le, self.into(), rhs.into())
    }
    /// `self > rhs`.
    pub fn gt(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(CmpOp::Gt, self.into(), rhs.into())
    }
    /// `self >= rhs`.
    pub fn ge(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        compare(CmpOp::Ge, self.into(), rhs.into())
    }
    /// Uses this tensor as a mask: `where_(self, on_true, on_false)`.
    pub fn where_(&self, on_true: impl Into<Operand>, on_false: impl Into<Operand>) -> Result<Tensor> {
        where_(self, on_true, on_false)
    }

    /// Converts to another dtype (floats truncate toward zero into integers).
    /// Float-to-float conversions pass gradients back; conversions to
    /// integers end the graph.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let mut k = MapKernel::default();
        let x = k.input(self.dtype());
        let y = k.push(Node::Cast(x), dtype);
        k.output(y);
        let out = crate::exec::map("to_dtype", k, &[self], &[], self.shape(), self.device())?.remove(0);
        if dtype.is_float() && self.dtype().is_float() {
            Ok(record(Op::Cast { from: self.dtype() }, &[self], Vec::new(), out))
        } else {
            Ok(out)
        }
    }
}
