//! Unary elementwise ops. Each op's row in [`UnaryOp::wgsl`] and
//! [`UnaryOp::backward`] is its whole definition.

use crate::autograd::record;
use crate::error::{Error, Result};
use crate::exec::kernel::{MapKernel, Node};
use crate::metadata::DType;
use crate::ops::Op;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Relu,
    Sin,
    Cos,
    Abs,
    Erf,
    Sign,
    Softplus,
}

impl UnaryOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Abs => "abs",
            UnaryOp::Erf => "erf",
            UnaryOp::Sign => "sign",
            UnaryOp::Softplus => "softplus",
        }
    }

    pub(crate) fn supports(self, dtype: DType) -> bool {
        match self {
            UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => dtype != DType::U32,
            _ => dtype.is_float(),
        }
    }

    /// The WGSL expression of the op applied to `x` (of type `dtype`).
    pub(crate) fn wgsl(self, x: &str, dtype: DType) -> String {
        let t = dtype.wgsl();
        // Ops whose WGSL form may drop a NaN (clamp, max) return it as it is.
        let keep_nan = |expr: String| match crate::exec::codegen::nan_test(x, dtype) {
            Some(nan) => format!("select({expr}, {x}, {nan})"),
            None => expr,
        };
        match self {
            UnaryOp::Neg => format!("-{x}"),
            UnaryOp::Exp => format!("exp({x})"),
            UnaryOp::Log => format!("log({x})"),
            UnaryOp::Sqrt => format!("sqrt({x})"),
            UnaryOp::Rsqrt => format!("inverseSqrt({x})"),
            // tanh(±15) is ±1 in f32; clamping avoids inf/inf in drivers
            // that compute tanh through exp.
            UnaryOp::Tanh => keep_nan(format!("tanh(clamp({x}, {t}(-15), {t}(15)))")),
            // One exp, stable for any x (f16 computed in f32).
            UnaryOp::Sigmoid => match dtype {
                DType::F32 => format!("wgrad_sigmoid({x})"),
                _ => format!("{t}(wgrad_sigmoid(f32({x})))"),
            },
            UnaryOp::Relu => keep_nan(format!("max({x}, {t}(0))")),
            UnaryOp::Sin => format!("sin({x})"),
            UnaryOp::Cos => format!("cos({x})"),
            UnaryOp::Abs => format!("abs({x})"),
            UnaryOp::Erf => format!("{t}(wgrad_erf(f32({x})))"),
            UnaryOp::Sign => format!("sign({x})"),
            // log(1 + e^x) without overflow or cancellation: max(x, 0) + log1p(e^-|x|).
            UnaryOp::Softplus => format!("max({x}, {t}(0)) + {t}(wgrad_log1p(exp(-abs(f32({x})))))"),
        }
    }

    /// d op(x) / dx times `g`, in tensor ops.
    pub(crate) fn backward(self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        match self {
            UnaryOp::Neg => g.neg(),
            UnaryOp::Exp => g.mul(&x.exp()?),
            UnaryOp::Log => g.div(x),
            UnaryOp::Sqrt => g.mul(&x.rsqrt()?.mul(0.5)?),
            UnaryOp::Rsqrt => g.mul(&x.rsqrt()?.div(x)?.mul(-0.5)?),
            UnaryOp::Tanh => {
                let t = x.tanh()?;
                g.mul(&t.mul(&t)?.neg()?.add(1.0)?)
            }
            UnaryOp::Sigmoid => {
                let s = x.sigmoid()?;
                g.mul(&s.mul(&s.neg()?.add(1.0)?)?)
            }
            // PyTorch's threshold_backward: zero where x <= 0, the gradient
            // elsewhere (NaN included, since NaN <= 0 is false).
            UnaryOp::Relu => crate::ops::where_(&x.le(0.0)?, 0.0, g),
            UnaryOp::Sin => g.mul(&x.cos()?),
            UnaryOp::Cos => g.mul(&x.sin()?.neg()?),
            UnaryOp::Abs => g.mul(&x.sign()?),
            UnaryOp::Erf => g.mul(&x.mul(x)?.neg()?.exp()?.mul(std::f64::consts::FRAC_2_SQRT_PI)?),
            UnaryOp::Sign => g.mul(0.0),
            UnaryOp::Softplus => g.mul(&x.sigmoid()?),
        }
    }
}

pub(crate) fn unary(op: UnaryOp, x: &Tensor) -> Result<Tensor> {
    if !op.supports(x.dtype()) {
        return Err(Error::UnsupportedDType { op: op.name(), dtype: x.dtype(), hint: "use a float tensor" });
    }
    let mut k = MapKernel::default();
    let a = k.input(x.dtype());
    let y = k.push(Node::Unary(op, a), x.dtype());
    k.output(y);
    let out = crate::exec::map(op.name(), k, &[x], &[], x.shape(), x.device())?.remove(0);
    Ok(record(Op::Unary(op), &[x], vec![x.clone()], out))
}

/// Elementwise math. Each returns a new tensor; gradients flow through all
/// of them except `sign` (zero almost everywhere).
impl Tensor {
    /// `-x`.
    pub fn neg(&self) -> Result<Tensor> {
        unary(UnaryOp::Neg, self)
    }
    /// `e^x`.
    pub fn exp(&self) -> Result<Tensor> {
        unary(UnaryOp::Exp, self)
    }
    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        unary(UnaryOp::Log, self)
    }
    /// Square root.
    pub fn sqrt(&self) -> Result<Tensor> {
        unary(UnaryOp::Sqrt, self)
    }
    /// `1 / sqrt(x)`.
    pub fn rsqrt(&self) -> Result<Tensor> {
        unary(UnaryOp::Rsqrt, self)
    }
    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        unary(UnaryOp::Tanh, self)
    }
    /// Logistic sigmoid `1 / (1 + e^-x)`, stable for large |x|.
    pub fn sigmoid(&self) -> Result<Tensor> {
        unary(UnaryOp::Sigmoid, self)
    }
    /// `max(x, 0)`; the gradient at 0 is 0, as in PyTorch.
    pub fn relu(&self) -> Result<Tensor> {
        unary(UnaryOp::Relu, self)
    }
    /// Sine.
    pub fn sin(&self) -> Result<Tensor> {
        unary(UnaryOp::Sin, self)
    }
    /// Cosine.
    pub fn cos(&self) -> Result<Tensor> {
        unary(UnaryOp::Cos, self)
    }
    /// Absolute value.
    pub fn abs(&self) -> Result<Tensor> {
        unary(UnaryOp::Abs, self)
    }
    /// The error function (absolute error below 1.5e-7).
    pub fn erf(&self) -> Result<Tensor> {
        unary(UnaryOp::Erf, self)
    }
    /// -1, 0 or 1 by the sign of x.
    pub fn sign(&self) -> Result<Tensor> {
        unary(UnaryOp::Sign, self)
    }
    /// `log(1 + e^x)`, stable for large |x|; its gradient is `sigmoid(x)`.
    pub fn softplus(&self) -> Result<Tensor> {
        unary(UnaryOp::Softplus, self)
    }
}
