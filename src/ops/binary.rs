//! Binary elementwise ops with NumPy broadcasting and scalar operands.

use crate::autograd::record;
use crate::error::{Error, Result};
use crate::exec::kernel::Node;
use crate::metadata::DType;
use crate::ops::{Op, Operand, OperandKernel, broadcast_shape, common_device, common_dtype};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `floor(a / b)`; for integers, division rounding toward -inf.
    FloorDiv,
    Pow,
    Maximum,
    Minimum,
}

impl BinaryOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::FloorDiv => "floor_divide",
            BinaryOp::Pow => "pow",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
        }
    }

    pub(crate) fn supports(self, dtype: DType) -> bool {
        match self {
            BinaryOp::Pow => dtype.is_float(),
            _ => true,
        }
    }

    /// The WGSL expression of the op on `a` and `b` (of type `dtype`).
    pub(crate) fn wgsl(self, a: &str, b: &str, dtype: DType) -> String {
        let t = dtype.wgsl();
        match self {
            BinaryOp::Add => nan_exact("+", "wgrad_sum_is_nan", a, b, dtype),
            BinaryOp::Sub => nan_exact("-", "wgrad_difference_is_nan", a, b, dtype),
            BinaryOp::Mul => format!("{a} * {b}"),
            BinaryOp::Div => format!("{a} / {b}"),
            // Integers: WGSL truncates and defines x / 0 = x; floor instead,
            // and give 0 for a zero divisor (documented on `floor_divide`).
            BinaryOp::FloorDiv => match dtype {
                DType::F32 | DType::F16 => format!("floor({a} / {b})"),
                DType::U32 => format!("select({a} / {b}, 0u, {b} == 0u)"),
                DType::I32 => format!(
                    "select({a} / {b} - select(0i, 1i, {a} % {b} != 0i && (({a} < 0i) != ({b} < 0i))), 0i, {b} == 0i)"
                ),
            },
            BinaryOp::Pow => format!("{t}(wgrad_pow(f32({a}), f32({b})))"),
            BinaryOp::Maximum => crate::exec::codegen::nan_propagating("max", a, b, dtype),
            BinaryOp::Minimum => crate::exec::codegen::nan_propagating("min", a, b, dtype),
        }
    }

    /// Gradients w.r.t. `a` and `b` at the output shape (broadcast dims are
    /// summed away by the caller); only the wanted sides are computed.
    fn grads(self, a: &Operand, b: &Operand, g: &Tensor, want: [bool; 2]) -> Result<[Option<Tensor>; 2]> {
        let side = |want: bool, f: &dyn Fn() -> Result<Tensor>| if want { f().map(Some) } else { Ok(None) };
        Ok(match self {
            BinaryOp::Add => [side(want[0], &|| Ok(g.clone()))?, side(want[1], &|| Ok(g.clone()))?],
            BinaryOp::Sub => [side(want[0], &|| Ok(g.clone()))?, side(want[1], &|| g.neg())?],
            BinaryOp::Mul => [side(want[0], &|| g.mul(b.clone()))?, side(want[1], &|| g.mul(a.clone()))?],
            BinaryOp::Div => [
                side(want[0], &|| g.div(b.clone()))?,
                // -g a / b²
                side(want[1], &|| g.mul(a.clone())?.div(b.clone())?.div(b.clone())?.neg())?,
            ],
            // Piecewise constant: zero almost everywhere (PyTorch's gradient too).
            BinaryOp::FloorDiv => [side(want[0], &|| g.mul(0.0))?, side(want[1], &|| g.mul(0.0))?],
            BinaryOp::Pow => [
                // g b a^(b-1)
                side(want[0], &|| {
                    let exponent = match b {
                        Operand::Scalar(v) => Operand::Scalar(v - 1.0),
                        Operand::Tensor(t) => Operand::Tensor(t.sub(1.0)?),
                    };
                    // x^0 is constant: its gradient is 0 (PyTorch), not 0 * 0^-1 = NaN at x = 0.
                    if matches!(b, Operand::Scalar(v) if *v == 0.0) {
                        return g.mul(0.0);
                    }
                    let power = binary(BinaryOp::Pow, a.clone(), exponent)?;
                    let grad = g.mul(b.clone())?.mul(&power)?;
                    match b {
                        Operand::Tensor(t) => crate::ops::where_(&t.eq(0.0)?, 0.0, &grad),
                        Operand::Scalar(_) => Ok(grad),
                    }
                })?,
                // g a^b ln a
                side(want[1], &|| {
                    let power = binary(BinaryOp::Pow, a.clone(), b.clone())?;
                    let log_a = match a {
                        Operand::Scalar(v) => Operand::Scalar(v.ln()),
                        Operand::Tensor(t) => Operand::Tensor(t.log()?),
                    };
                    let grad = g.mul(&power)?.mul(log_a)?;
                    // At a = 0, a^b ln a is 0 * -inf = NaN; PyTorch defines it as 0 where b >= 0.
                    match (a, b) {
                        (Operand::Tensor(t), Operand::Tensor(e)) => {
                            crate::ops::where_(&t.eq(0.0)?.mul(&e.ge(0.0)?)?, 0.0, &grad)
                        }
                        _ => Ok(grad),
                    }
                })?,
            ],
            // PyTorch's formula: a side loses the gradient where the other
            // side wins, ties split it evenly, and where a NaN is compared
            // (no side wins, no tie) both sides get all of it.
            BinaryOp::Maximum | BinaryOp::Minimum => {
                use crate::ops::compare::CmpOp;
                let (at, _) = operand_tensors(a, b)?;
                let (a_loses, b_loses) =
                    if self == BinaryOp::Maximum { (CmpOp::Lt, CmpOp::Gt) } else { (CmpOp::Gt, CmpOp::Lt) };
                let dtype = at.dtype();
                let half_tie = compare_operands(CmpOp::Eq, a, b)?.to_dtype(dtype)?.mul(0.5)?;
                let weight =
                    |loses: CmpOp| compare_operands(loses, a, b)?.to_dtype(dtype)?.add(&half_tie)?.neg()?.add(1.0);
                [side(want[0], &|| g.mul(&weight(a_loses)?))?, side(want[1], &|| g.mul(&weight(b_loses)?))?]
            }
        })
    }
}

fn operand_tensors<'a>(a: &'a Operand, b: &'a Operand) -> Result<(&'a Tensor, Option<&'a Tensor>)> {
    match (a.tensor(), b.tensor()) {
        (Some(x), other) => Ok((x, other)),
        (None, Some(y)) => Ok((y, None)),
        (None, None) => Err(Error::InvalidArgument { op: "binary", message: "needs a tensor operand".into() }),
    }
}

/// `a / b` of integer operands as PyTorch's `div`: converted to f32 first.
fn true_div(a: Operand, b: Operand) -> Result<Tensor> {
    let as_float = |o: Operand| -> Result<Operand> {
        Ok(match o {
            Operand::Tensor(t) => Operand::Tensor(t.to_dtype(DType::F32)?),
            scalar => scalar,
        })
    };
    binary(BinaryOp::Div, as_float(a)?, as_float(b)?)
}

fn compare_operands(op: crate::ops::compare::CmpOp, a: &Operand, b: &Operand) -> Result<Tensor> {
    crate::ops::compare::compare(op, a.clone(), b.clone())
}

/// Builds the one-op kernel for `op` over two operands (tensor inputs,
/// scalars as uniforms) and runs it at the broadcast shape.
pub(crate) fn binary(op: BinaryOp, a: Operand, b: Operand) -> Result<Tensor> {
    let dtype = common_dtype(op.name(), &a, &b)?;
    if op == BinaryOp::Div && !dtype.is_float() {
        // `div` and `/` on integers are true division, as in PyTorch.
        return true_div(a, b);
    }
    let device = common_device(op.name(), &[&a, &b])?.clone();
    if !op.supports(dtype) {
        return Err(Error::UnsupportedDType { op: op.name(), dtype, hint: "this op needs a float tensor" });
    }
    let shape = broadcast_shape(op.name(), &[&a, &b])?;
    let mut k = OperandKernel::default();
    let x = k.operand(&a, dtype);
    let y = k.operand(&b, dtype);
    let z = k.kernel.push(Node::Binary(op, x, y), dtype);
    let (out, inputs) = k.run(op.name(), z, &shape, &device)?;
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let op = Op::Binary { op, scalars: [a.scalar(), b.scalar()] };
    Ok(record(op, &refs, inputs.clone(), out))
}

pub(crate) fn backward(
    op: BinaryOp,
    scalars: &[Option<f64>; 2],
    saved: &[Tensor],
    g: &Tensor,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let mut tensors = saved.iter();
    let mut operands = Vec::with_capacity(2);
    let mut want = [false; 2];
    let mut edge = 0;
    for (side, s) in scalars.iter().enumerate() {
        match s {
            Some(v) => operands.push(Operand::Scalar(*v)),
            None => {
                operands.push(Operand::Tensor(tensors.next().expect("saved tensor per operand").clone()));
                want[side] = needs[edge];
                edge += 1;
            }
        }
    }
    let grads = op.grads(&operands[0], &operands[1], g, want)?;
    let mut out = Vec::new();
    for (side, grad) in grads.into_iter().enumerate() {
        if let Operand::Tensor(t) = &operands[side] {
            out.push(match grad {
                Some(grad) => Some(grad.sum_to_shape(t.shape())?),
                None => None,
            });
        }
    }
    Ok(out)
}

/// Arithmetic with broadcasting; the right side may be a tensor or a scalar.
impl Tensor {
    /// `self + rhs`.
    pub fn add(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        binary(BinaryOp::Add, self.into(), rhs.into())
    }
    /// `self - rhs`.
    pub fn sub(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        binary(BinaryOp::Sub, self.into(), rhs.into())
    }
    /// `self * rhs`.
    pub fn mul(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        binary(BinaryOp::Mul, self.into(), rhs.into())
    }
    /// `self / rhs`, true division as in PyTorch: integer operands are
    /// divided as f32 and give an f32 result (use [`Tensor::floor_divide`]
    /// for integer division). Division by zero follows IEEE: ±inf, or NaN
    /// for 0 / 0.
    pub fn div(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        binary(BinaryOp::Div, self.into(), rhs.into())
    }
    /// `floor(self / rhs)` (PyTorch's `floor_divide` / `//`): integers are
    /// divided rounding toward -inf. An integer division by zero gives 0
    /// (PyTorch raises on the CPU; a GPU cannot report it per element);
    /// a float one gives ±inf or NaN. No gradient flows (it is zero almost
    /// everywhere).
    pub fn floor_divide(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        binary(BinaryOp::FloorDiv, self.into(), rhs.into())
    }
    /// `self ^ exponent` for a tensor or scalar exponent; negative bases
    /// with integral exponents work as in PyTorch.
    pub fn pow(&self, exponent: impl Into<Operand>) -> Result<Tensor> {
        binary(BinaryOp::Pow, self.into(), exponent.into())
    }
    /// `self ^ exponent` for a scalar exponent.
    pub fn powf(&self, exponent: f64) -> Result<Tensor> {
        self.pow(exponent)
    }
    /// Elementwise maximum (ties split the gradient).
    pub fn maximum(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        binary(BinaryOp::Maximum, self.into(), rhs.into())
    }
    /// Elementwise minimum (ties split the gradient).
    pub fn minimum(&self, rhs: impl Into<Operand>) -> Result<Tensor> {
        binary(BinaryOp::Minimum, self.into(), rhs.into())
    }
    /// `scalar - self`.
    pub fn rsub(&self, scalar: f64) -> Result<Tensor> {
        binary(BinaryOp::Sub, Operand::Scalar(scalar), self.into())
    }
    /// `scalar / self` (true division, as [`Tensor::div`]).
    pub fn rdiv(&self, scalar: f64) -> Result<Tensor> {
        binary(BinaryOp::Div, Operand::Scalar(scalar), self.into())
    }
}

/// `a op b` for a float sum or difference, NaN exactly where IEEE's is
/// (`is_nan` names the helper that says where; see
/// `shaders/elementwise_helpers.wgsl`): drivers may assume floats are
/// never NaN or infinite and fold `x - x` to 0, which is NaN for an
/// infinite x in PyTorch. Integers as they are.
fn nan_exact(op: &str, is_nan: &str, a: &str, b: &str, dtype: DType) -> String {
    match dtype {
        DType::F32 => format!("select({a} {op} {b}, bitcast<f32>(0x7fc00000u), {is_nan}({a}, {b}))"),
        DType::F16 => format!("select({a} {op} {b}, f16(bitcast<f32>(0x7fc00000u)), {is_nan}(f32({a}), f32({b})))"),
        DType::I32 | DType::U32 => format!("{a} {op} {b}"),
    }
}
