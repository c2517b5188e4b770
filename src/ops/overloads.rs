//! Fallible operator overloads: `&a + &b`, `&a * 2.0`, `1.0 - &a` and
//! `-&a` return `Result<Tensor>`.

use std::ops::{Add, Div, Mul, Neg, Sub};

use crate::error::Result;
use crate::ops::Operand;
use crate::ops::binary::{BinaryOp, binary};
use crate::tensor::Tensor;

macro_rules! overload {
    ($trait:ident, $method:ident, $op:expr) => {
        impl<R: Into<Operand>> $trait<R> for &Tensor {
            type Output = Result<Tensor>;
            fn $method(self, rhs: R) -> Result<Tensor> {
                binary($op, self.into(), rhs.into())
            }
        }
        impl<R: Into<Operand>> $trait<R> for Tensor {
            type Output = Result<Tensor>;
            fn $method(self, rhs: R) -> Result<Tensor> {
                binary($op, self.into(), rhs.into())
            }
        }
        impl $trait<&Tensor> for f64 {
            type Output = Result<Tensor>;
            fn $method(self, rhs: &Tensor) -> Result<Tensor> {
                binary($op, Operand::Scalar(self), rhs.into())
            }
        }
        impl $trait<&Tensor> for f32 {
            type Output = Result<Tensor>;
            fn $method(self, rhs: &Tensor) -> Result<Tensor> {
                binary($op, Operand::Scalar(self as f64), rhs.into())
            }
        }
    };
}

overload!(Add, add, BinaryOp::Add);
overload!(Sub, sub, BinaryOp::Sub);
overload!(Mul, mul, BinaryOp::Mul);
overload!(Div, div, BinaryOp::Div);

impl Neg for &Tensor {
    type Output = Result<Tensor>;
    fn neg(self) -> Result<Tensor> {
        Tensor::neg(self)
    }
}
