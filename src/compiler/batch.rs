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

/// Why [`BatchModel::at`] gives no graph at a size, for the logs of both
/// compilers.
pub(crate) const DOES_NOT_CARRY_OVER: &str = "does not carry over (a size would be negative, 0 or 1, a matmul would \
     contract past the split length, or a piece would overrun its window)";

/// An integer of the graph at batch size B: `a * B + c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Affine {
    a: i64,
    c: i64,
}

/// A scalar of the graph at batch size B.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar {
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
        BatchModel::fit_at([(graphs[0], b), (graphs[1], b - 1), (graphs[2], b - 2)])
    }

    /// Fits graphs traced at three distinct batch sizes, the template being
    /// the first, or says why they do not fit.
    pub fn fit_at(graphs: [(&CapturedGraph, usize); 3]) -> Result<BatchModel, String> {
        let sizes = graphs.map(|(_, b)| b);
        let [n0, n1, n2] = graphs.map(|(g, _)| numbers(g));
        if n0.shape != n1.shape || n0.shape != n2.shape {
            return Err("the graph is another at another batch size".into());
        }
        let ints = fit_each(&n0.ints, &n1.ints, &n2.ints, |_, &[x0, x1, x2]| {
            fit_int([x0 as i64, x1 as i64, x2 as i64], sizes).ok_or_else(|| {
                format!("a size ({x0}, {x1}, {x2} at batch sizes {sizes:?}) is not affine in the batch size")
            })
        })?;
        let scalars = fit_each(&n0.scalars, &n1.scalars, &n2.scalars, |_, &[s0, s1, s2]| {
            fit_scalar([s0, s1, s2], sizes).ok_or_else(|| {
                format!("a scalar ({s0}, {s1}, {s2} at batch sizes {sizes:?}) depends on the batch size in a way wgrad does not model (constant, a B + c, 1 / (a B + c))")
            })
        })?;
        Ok(BatchModel { template: graphs[0].0.clone(), base: sizes[0], ints, scalars })
    }

    /// The batch size the template was traced at.
    pub fn base(&self) -> usize {
        self.base
    }

    /// The graph at batch size `b`, or `None` where the formulas would not
    /// trace to it there (see [`BatchModel::traces_to`]): the caller traces
    /// that size instead.
    pub fn at(&self, b: usize) -> Option<CapturedGraph> {
        let mut g = self.template.clone();
        let (mut i, mut k, mut ok) = (0, 0, true);
        let b = b as i64;
        walk(
            &mut g,
            &mut |x| {
                let v = self.ints[i].at(b);
                i += 1;
                ok &= v >= 0;
                *x = v.max(0) as usize;
            },
            &mut |s| {
                *s = self.scalars[k].at(b, *s);
                k += 1;
            },
            &mut String::new(),
        );
        (ok && self.traces_to(&g)).then_some(g)
    }

    /// Whether `g`, the template with every number at another batch size,
    /// is the graph tracing would give there. The numbers being affine in
    /// the batch size is not enough where the formulas or the executor
    /// decide on sizes while tracing:
    /// - a size that follows the batch is 0 or 1 there: an empty tensor or
    ///   a broadcast dim takes other paths (`sum_to_shape` returns early,
    ///   a reduction over nothing is an error), so such a size range is
    ///   traced on its own, as the batch of 1 is;
    /// - a matmul contracts over more than [`crate::exec::MATMUL_K_CHUNK`]:
    ///   eager mode splits it into runs (one kernel would loop past
    ///   lavapipe's 65,535 iterations and be silently cut short), so a
    ///   weight gradient over a large batch is another graph;
    /// - a piece of an `Assemble` overruns its window, or a view reads past
    ///   the value it reads: a formula's `min` (the gradient of a strided
    ///   slice cut at the end of the dim) held at the traced sizes only.
    fn traces_to(&self, g: &CapturedGraph) -> bool {
        let small = |now: &Shape, traced: &Shape| now.dims().iter().zip(traced.dims()).any(|(&n, &t)| n != t && n < 2);
        let within = |u: &Use| {
            let source = &g.values[u.value];
            let end =
                u.layout.shape.dims().iter().zip(&u.layout.strides).map(|(&d, &s)| (d.max(1) - 1) * s).sum::<usize>();
            matches!(source.op, IrOp::Input { .. })
                || u.layout.shape.numel() == 0
                || u.layout.offset + end < source.meta.shape.numel()
        };
        g.values.iter().zip(&self.template.values).all(|(v, t)| {
            let uses_fit =
                v.op.uses()
                    .into_iter()
                    .zip(t.op.uses())
                    .all(|(u, tu)| !small(&u.layout.shape, &tu.layout.shape) && within(u));
            let op_fits = match &v.op {
                IrOp::Matmul { a, .. } => {
                    a.layout.shape.dims().last().is_none_or(|&k| k <= crate::exec::MATMUL_K_CHUNK)
                }
                IrOp::Assemble { pieces, .. } => pieces.iter().all(|(u, dim, start)| {
                    match (u.layout.shape.dims().get(*dim), v.meta.shape.dims().get(*dim)) {
                        (Some(len), Some(n)) => start + len <= *n,
                        _ => false,
                    }
                }),
                _ => true,
            };
            !small(&v.meta.shape, &t.meta.shape) && uses_fit && op_fits
        })
    }
}

impl Affine {
    pub(crate) fn at(self, b: i64) -> i64 {
        self.a * b + self.c
    }
}

impl Scalar {
    /// The scalar at batch size `b`; `traced` is its value at the traced size.
    pub(crate) fn at(self, b: i64, traced: f64) -> f64 {
        match self {
            Scalar::Constant => traced,
            Scalar::Affine { a, c } => a * b as f64 + c,
            Scalar::Reciprocal { a, c } => 1.0 / (a * b + c) as f64,
        }
    }
}

/// Fits each number seen at three batch sizes (the same position of
/// `a`, `b` and `c`, and its position) with `fit`; the first that fits no
/// form is the error.
/// Shared by a graph's numbers and a signature's ([`crate::compiler::family`]).
pub(crate) fn fit_each<T: Copy, F, E>(
    a: &[T],
    b: &[T],
    c: &[T],
    fit: impl Fn(usize, &[T; 3]) -> Result<F, E>,
) -> Result<Vec<F>, E> {
    a.iter().zip(b).zip(c).enumerate().map(|(k, ((&x, &y), &z))| fit(k, &[x, y, z])).collect()
}

/// An integer seen at three distinct batch sizes as `a B + c` with integer
/// `a` and `c`, if it is one.
pub(crate) fn fit_int(x: [i64; 3], sizes: [usize; 3]) -> Option<Affine> {
    let b = sizes.map(|s| s as i64);
    let (dx, db) = (x[0] - x[1], b[0] - b[1]);
    if db == 0 || dx % db != 0 {
        return None;
    }
    let a = dx / db;
    let fit = Affine { a, c: x[0] - a * b[0] };
    (0..3).all(|i| fit.at(b[i]) == x[i]).then_some(fit)
}

/// A scalar seen at three distinct batch sizes as a function of the batch
/// size, one that gives the same f64 at the three sizes. At other sizes it
/// gives what eager mode computes for integer forms (a mean's `1 / (B K)`),
/// and may differ in the last bits of an f64 for a fractional slope
/// (`0.1 B`), which the f32 the kernel reads hides.
pub(crate) fn fit_scalar(s: [f64; 3], sizes: [usize; 3]) -> Option<Scalar> {
    let b = sizes.map(|s| s as i64);
    if s[0].to_bits() == s[1].to_bits() && s[1].to_bits() == s[2].to_bits() {
        return Some(Scalar::Constant);
    }
    if b[0] == b[1] {
        return None;
    }
    let a = (s[0] - s[1]) / (b[0] - b[1]) as f64;
    let affine = Scalar::Affine { a, c: s[0] - a * b[0] as f64 };
    if (0..3).all(|i| affine.at(b[i], s[i]).to_bits() == s[i].to_bits()) {
        return Some(affine);
    }
    // 1 / (a B + c) with integer a and c: 1 / s is that integer.
    let r = s.map(|v| (1.0 / v).round());
    if !r.iter().all(|v| v.is_finite() && v.abs() < 1e15) {
        return None;
    }
    let Affine { a, c } = fit_int(r.map(|v| v as i64), sizes)?;
    let reciprocal = Scalar::Reciprocal { a, c };
    let fits = (0..3).all(|i| a * b[i] + c != 0 && reciprocal.at(b[i], s[i]).to_bits() == s[i].to_bits());
    fits.then_some(reciprocal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_fit_constant_affine_and_reciprocal_forms() {
        let near = [10, 9, 8];
        assert_eq!(fit_scalar([0.5, 0.5, 0.5], near), Some(Scalar::Constant));
        // A mean over [B, 7]: 1 / (7 B).
        let mean = |b: usize| 1.0 / (7 * b) as f64;
        assert_eq!(fit_scalar([mean(10), mean(9), mean(8)], near), Some(Scalar::Reciprocal { a: 7, c: 0 }));
        // The same seen at sizes far apart, in any order.
        assert_eq!(fit_scalar([mean(10), mean(40), mean(20)], [10, 40, 20]), Some(Scalar::Reciprocal { a: 7, c: 0 }));
        // An unbiased variance over the batch: 1 / (B - 1).
        let var = |b: usize| 1.0 / (b - 1) as f64;
        assert_eq!(fit_scalar([var(10), var(9), var(8)], near), Some(Scalar::Reciprocal { a: 1, c: -1 }));
        assert_eq!(fit_scalar([20.0, 18.0, 16.0], near), Some(Scalar::Affine { a: 2.0, c: 0.0 }));
        assert_eq!(fit_scalar([20.0, 80.0, 40.0], [10, 40, 20]), Some(Scalar::Affine { a: 2.0, c: 0.0 }));
        // sqrt(B) and 1 / B^2 are none of these, near or far.
        let root = |b: usize| (b as f64).sqrt();
        assert_eq!(fit_scalar([root(10), root(9), root(8)], near), None);
        let square = |b: usize| 1.0 / (b * b) as f64;
        assert_eq!(fit_scalar([square(10), square(30), square(20)], [10, 30, 20]), None);
    }

    #[test]
    fn integers_fit_only_exact_integer_lines() {
        assert_eq!(fit_int([30, 90, 60], [10, 30, 20]), Some(Affine { a: 3, c: 0 }));
        assert_eq!(fit_int([11, 31, 21], [10, 30, 20]), Some(Affine { a: 1, c: 1 }));
        // B / 2 is affine with a fractional slope; B * B is not affine.
        assert_eq!(fit_int([5, 15, 10], [10, 30, 20]), None);
        assert_eq!(fit_int([100, 900, 400], [10, 30, 20]), None);
        assert_eq!(fit_int([1, 2, 3], [10, 10, 20]), None);
    }
}
