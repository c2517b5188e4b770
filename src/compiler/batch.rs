//! A compiled step's graph as a function of the batch size (issue 16).
//!
//! The step is traced at the call's batch size B and twice more, at B - 1
//! and B - 2 (the batch arguments narrowed to their first rows: no kernel
//! runs and nothing is committed). If the three graphs are the same but for their
//! numbers, every number is fitted as a function of the batch size: an
//! integer (a dim, a stride, an offset) as `a * B + c`, a scalar baked into
//! a kernel as a constant, `a * B + c` or `1 / (a * B + c)` (a mean's
//! `1 / (B * K)`). The third trace checks the fit of the first two, so a
//! size that is not affine in B (`B / 2`, `B * B`) is caught, and the step
//! stays one trace per size. A later call with another batch size then
//! instantiates the graph at its size and lowers it again, without
//! running the closure: what the closure computes from the batch size on
//! the host must follow these forms (a value affine on three neighbouring
//! sizes but not beyond, such as `min(B, 64)`, is the one thing this
//! cannot see; `CompiledStep::set_debug_retrace` traces every call and
//! reports it).

use std::fmt::Write;

use crate::compiler::ir::{CapturedGraph, IrOp, Use};
use crate::layout::Layout;
use crate::metadata::Shape;

/// An integer of the graph at batch size B: `a * B + c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Affine {
    a: i64,
    c: i64,
}

/// A scalar of the graph at batch size B.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scalar {
    /// The same at every size.
    Constant,
    /// `a * B + c`.
    Affine { a: f64, c: f64 },
    /// `1 / (a * B + c)`, `a` and `c` integers (a mean over the batch).
    Reciprocal { a: i64, c: i64 },
}

/// A traced step's graph as a function of its batch size.
#[derive(Debug, Clone)]
pub(crate) struct BatchModel {
    /// The graph traced at `base`.
    template: CapturedGraph,
    base: usize,
    ints: Vec<Affine>,
    scalars: Vec<Scalar>,
}

/// Every number of a graph, in one fixed order, and a description of the
/// rest (ops, kernels, dtypes, roles): two graphs with the same description
/// differ only in their numbers.
struct Numbers {
    ints: Vec<usize>,
    scalars: Vec<f64>,
    shape: String,
}

/// Calls `int` on every integer of `graph` and `scalar` on every scalar,
/// in a fixed order, and writes everything else into `rest`.
fn walk(
    graph: &mut CapturedGraph,
    int: &mut dyn FnMut(&mut usize),
    scalar: &mut dyn FnMut(&mut f64),
    rest: &mut String,
) {
    fn dims(shape: &mut Shape, int: &mut dyn FnMut(&mut usize)) {
        let mut d = shape.dims().to_vec();
        d.iter_mut().for_each(&mut *int);
        *shape = Shape::new(d);
    }
    fn uses(us: Vec<&mut Use>, int: &mut dyn FnMut(&mut usize), rest: &mut String) {
        for u in us {
            let _ = write!(rest, " %{} rank {}", u.value, u.layout.shape.rank());
            let l: &mut Layout = &mut u.layout;
            dims(&mut l.shape, int);
            l.strides.iter_mut().for_each(&mut *int);
            int(&mut l.offset);
        }
    }
    let _ = write!(rest, "{} inputs; outputs {:?};", graph.inputs, graph.outputs);
    for v in &mut graph.values {
        let _ = write!(rest, "\n{:?} {:?} rank {}:", v.phase, v.meta.dtype, v.meta.shape.rank());
        dims(&mut v.meta.shape, int);
        match &mut v.op {
            IrOp::Input { slot } => {
                let _ = write!(rest, " input {slot}");
            }
            IrOp::Map { label, kernel, args, scalars } => {
                let _ = write!(rest, " map {label} {kernel:?} {} scalars", scalars.len());
                scalars.iter_mut().for_each(&mut *scalar);
                uses(args.iter_mut().collect(), int, rest);
            }
            IrOp::Reduce { kind, src, axes } => {
                let _ = write!(rest, " reduce {kind:?} axes {axes:?}");
                uses(vec![src], int, rest);
            }
            IrOp::Matmul { a, b } => {
                rest.push_str(" matmul");
                uses(vec![a, b], int, rest);
            }
            IrOp::Assemble { pieces, zero_fill } => {
                let _ = write!(rest, " assemble zero_fill {zero_fill}");
                for (u, dim, start) in pieces {
                    let _ = write!(rest, " dim {dim}");
                    int(start);
                    uses(vec![u], int, rest);
                }
            }
            IrOp::Hook { src, point } => {
                let _ = write!(rest, " hook {point}");
                uses(vec![src], int, rest);
            }
        }
    }
}

/// Whether two graphs are the same but for their numbers (dims, strides,
/// offsets, scalars).
pub(crate) fn same_but_numbers(a: &CapturedGraph, b: &CapturedGraph) -> bool {
    numbers(a).shape == numbers(b).shape
}

fn numbers(graph: &CapturedGraph) -> Numbers {
    let mut g = graph.clone();
    let (mut ints, mut scalars, mut shape) = (Vec::new(), Vec::new(), String::new());
    walk(&mut g, &mut |x| ints.push(*x), &mut |s| scalars.push(*s), &mut shape);
    Numbers { ints, scalars, shape }
}

impl BatchModel {
    /// Fits the graphs traced at batch sizes `b`, `b - 1` and `b - 2`
    /// (`graphs` in that order), or says why they do not fit.
    pub fn fit(graphs: [&CapturedGraph; 3], b: usize) -> Result<BatchModel, String> {
        let [n0, n1, n2] = graphs.map(numbers);
        if n0.shape != n1.shape || n0.shape != n2.shape {
            return Err("the step traces to a different graph at another batch size".into());
        }
        let mut ints = Vec::with_capacity(n0.ints.len());
        for ((&x0, &x1), &x2) in n0.ints.iter().zip(&n1.ints).zip(&n2.ints) {
            let (x0, x1, x2) = (x0 as i64, x1 as i64, x2 as i64);
            let a = x0 - x1;
            if x1 - x2 != a {
                return Err(format!(
                    "a size ({x2}, {x1}, {x0} at batch sizes {}, {}, {b}) is not affine in the batch size",
                    b - 2,
                    b - 1
                ));
            }
            ints.push(Affine { a, c: x0 - a * b as i64 });
        }
        let mut scalars = Vec::with_capacity(n0.scalars.len());
        for ((&s0, &s1), &s2) in n0.scalars.iter().zip(&n1.scalars).zip(&n2.scalars) {
            scalars.push(fit_scalar([s0, s1, s2], b).ok_or_else(|| {
                format!("a scalar ({s2}, {s1}, {s0} at batch sizes {}, {}, {b}) depends on the batch size in a way wgrad does not model (constant, a B + c, 1 / (a B + c))", b - 2, b - 1)
            })?);
        }
        Ok(BatchModel { template: graphs[0].clone(), base: b, ints, scalars })
    }

    /// The batch size the template was traced at.
    pub fn base(&self) -> usize {
        self.base
    }

    /// The graph at batch size `b`, or `None` where a size would be
    /// negative (a batch too small for what the step slices).
    pub fn at(&self, b: usize) -> Option<CapturedGraph> {
        let mut g = self.template.clone();
        let (mut i, mut k, mut ok) = (0, 0, true);
        let b = b as i64;
        walk(
            &mut g,
            &mut |x| {
                let Affine { a, c } = self.ints[i];
                i += 1;
                let v = a * b + c;
                ok &= v >= 0;
                *x = v.max(0) as usize;
            },
            &mut |s| {
                *s = match self.scalars[k] {
                    Scalar::Constant => *s,
                    Scalar::Affine { a, c } => a * b as f64 + c,
                    Scalar::Reciprocal { a, c } => 1.0 / (a * b + c) as f64,
                };
                k += 1;
            },
            &mut String::new(),
        );
        ok.then_some(g)
    }
}

/// A scalar seen at batch sizes `b`, `b - 1`, `b - 2` as a function of
/// the batch size, one that gives the same f64 at the three sizes. At
/// other sizes it gives what eager mode computes for integer forms (a
/// mean's `1 / (B K)`), and may differ in the last bits of an f64 for a
/// fractional slope (`0.1 B`), which the f32 the kernel reads hides.
fn fit_scalar(s: [f64; 3], b: usize) -> Option<Scalar> {
    let sizes = [b as f64, (b - 1) as f64, (b - 2) as f64];
    if s[0].to_bits() == s[1].to_bits() && s[1].to_bits() == s[2].to_bits() {
        return Some(Scalar::Constant);
    }
    let a = s[0] - s[1];
    let c = s[0] - a * sizes[0];
    if (0..3).all(|i| (a * sizes[i] + c).to_bits() == s[i].to_bits()) {
        return Some(Scalar::Affine { a, c });
    }
    // 1 / (a B + c) with integer a and c: 1 / s is that integer.
    let r: Vec<f64> = s.iter().map(|v| (1.0 / v).round()).collect();
    let (ra, rc) = (r[0] - r[1], r[0] - (r[0] - r[1]) * sizes[0]);
    let (a, c) = (ra as i64, rc as i64);
    let fits = (0..3).all(|i| {
        let n = a * (b - i) as i64 + c;
        n != 0 && (1.0 / n as f64).to_bits() == s[i].to_bits()
    });
    fits.then_some(Scalar::Reciprocal { a, c })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_fit_constant_affine_and_reciprocal_forms() {
        assert_eq!(fit_scalar([0.5, 0.5, 0.5], 10), Some(Scalar::Constant));
        // A mean over [B, 7]: 1 / (7 B).
        let mean = |b: usize| 1.0 / (7 * b) as f64;
        assert_eq!(fit_scalar([mean(10), mean(9), mean(8)], 10), Some(Scalar::Reciprocal { a: 7, c: 0 }));
        // An unbiased variance over the batch: 1 / (B - 1).
        let var = |b: usize| 1.0 / (b - 1) as f64;
        assert_eq!(fit_scalar([var(10), var(9), var(8)], 10), Some(Scalar::Reciprocal { a: 1, c: -1 }));
        assert_eq!(fit_scalar([20.0, 18.0, 16.0], 10), Some(Scalar::Affine { a: 2.0, c: 0.0 }));
        // sqrt(B) is none of these.
        let root = |b: usize| (b as f64).sqrt();
        assert_eq!(fit_scalar([root(10), root(9), root(8)], 10), None);
    }
}
