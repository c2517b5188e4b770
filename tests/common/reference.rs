//! Independent float64 CPU reference used by the integration tests.
//!
//! Everything here is plain std-only Rust, written for clarity rather than speed: tensors are
//! small, row-major and contiguous. Nothing in this module depends on `wgrad`.
//!
//! Conventions: invalid arguments (bad axes, incompatible shapes, ...) panic with a message,
//! since this code only runs inside tests.

use std::f64::consts::PI;

// ---------------------------------------------------------------------------------------------
// Shape helpers
// ---------------------------------------------------------------------------------------------

/// Row-major contiguous strides (in elements) for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Number of elements of `shape` (1 for the scalar shape `[]`).
pub fn shape_numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Multi-index of the flat row-major offset `flat` within `shape`.
pub fn unravel_index(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0usize; shape.len()];
    for d in (0..shape.len()).rev() {
        if shape[d] > 0 {
            idx[d] = flat % shape[d];
            flat /= shape[d];
        }
    }
    idx
}

/// Flat row-major offset of the multi-index `idx` within `shape`.
pub fn ravel_index(idx: &[usize], shape: &[usize]) -> usize {
    assert_eq!(idx.len(), shape.len(), "ravel_index: rank mismatch");
    let mut flat = 0usize;
    for (d, (&i, &n)) in idx.iter().zip(shape).enumerate() {
        assert!(i < n, "ravel_index: index {i} out of range for dim {d} of size {n}");
        flat = flat * n + i;
    }
    flat
}

/// NumPy broadcasting of two shapes: align at the right, each pair of dims must be equal or
/// one of them must be 1. Returns `None` if the shapes are incompatible.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0usize; n];
    for i in 0..n {
        // i counts from the right.
        let da = if i < a.len() { a[a.len() - 1 - i] } else { 1 };
        let db = if i < b.len() { b[b.len() - 1 - i] } else { 1 };
        out[n - 1 - i] = if da == db {
            da
        } else if da == 1 {
            db
        } else if db == 1 {
            da
        } else {
            return None;
        };
    }
    Some(out)
}

/// Checks that `axes` are valid, distinct dims of a rank-`ndim` tensor; returns a membership mask.
fn axes_mask(axes: &[usize], ndim: usize, what: &str) -> Vec<bool> {
    let mut mask = vec![false; ndim];
    for &a in axes {
        assert!(a < ndim, "{what}: axis {a} out of range for rank {ndim}");
        assert!(!mask[a], "{what}: duplicate axis {a} in {axes:?}");
        mask[a] = true;
    }
    mask
}

// ---------------------------------------------------------------------------------------------
// RefTensor
// ---------------------------------------------------------------------------------------------

/// A small row-major contiguous f64 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl RefTensor {
    /// Panics if `data.len()` differs from the number of elements of `shape`.
    pub fn new(data: Vec<f64>, shape: &[usize]) -> Self {
        assert_eq!(data.len(), shape_numel(shape), "RefTensor::new: {} values do not fit shape {shape:?}", data.len());
        RefTensor { shape: shape.to_vec(), data }
    }

    /// A 0-d tensor (shape `[]`) holding `v`.
    pub fn scalar(v: f64) -> Self {
        RefTensor { shape: vec![], data: vec![v] }
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self::full(shape, 0.0)
    }

    pub fn full(shape: &[usize], v: f64) -> Self {
        RefTensor { shape: shape.to_vec(), data: vec![v; shape_numel(shape)] }
    }

    /// Builds a tensor of `shape` whose element at multi-index `idx` is `f(idx)`.
    pub fn from_fn(shape: &[usize], f: impl Fn(&[usize]) -> f64) -> Self {
        let n = shape_numel(shape);
        let data = (0..n).map(|i| f(&unravel_index(i, shape))).collect();
        RefTensor { shape: shape.to_vec(), data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Element at the multi-index `idx`.
    pub fn at(&self, idx: &[usize]) -> f64 {
        self.data[ravel_index(idx, &self.shape)]
    }

    /// The single value of a one-element tensor (any shape).
    pub fn item(&self) -> f64 {
        assert_eq!(self.numel(), 1, "item: tensor of shape {:?} is not a single value", self.shape);
        self.data[0]
    }

    pub fn map(&self, f: impl Fn(f64) -> f64) -> Self {
        RefTensor { shape: self.shape.clone(), data: self.data.iter().map(|&x| f(x)).collect() }
    }

    /// Elementwise binary op with NumPy broadcasting. Panics on incompatible shapes.
    pub fn zip(&self, other: &Self, f: impl Fn(f64, f64) -> f64) -> Self {
        let shape = broadcast_shapes(&self.shape, &other.shape)
            .unwrap_or_else(|| panic!("zip: shapes {:?} and {:?} do not broadcast", self.shape, other.shape));
        let a = self.broadcast_to(&shape);
        let b = other.broadcast_to(&shape);
        let data = a.data.iter().zip(&b.data).map(|(&x, &y)| f(x, y)).collect();
        RefTensor { shape, data }
    }

    pub fn add(&self, other: &Self) -> Self {
        self.zip(other, |x, y| x + y)
    }

    pub fn sub(&self, other: &Self) -> Self {
        self.zip(other, |x, y| x - y)
    }

    pub fn mul(&self, other: &Self) -> Self {
        self.zip(other, |x, y| x * y)
    }

    pub fn div(&self, other: &Self) -> Self {
        self.zip(other, |x, y| x / y)
    }

    /// `cond != 0.0` picks `a`, otherwise `b` (a NaN condition counts as true, like `NaN != 0`).
    /// The three shapes broadcast together.
    pub fn where_(cond: &Self, a: &Self, b: &Self) -> Self {
        let shape =
            broadcast_shapes(&cond.shape, &a.shape).and_then(|s| broadcast_shapes(&s, &b.shape)).unwrap_or_else(|| {
                panic!("where_: shapes {:?}, {:?}, {:?} do not broadcast", cond.shape, a.shape, b.shape)
            });
        let c = cond.broadcast_to(&shape);
        let a = a.broadcast_to(&shape);
        let b = b.broadcast_to(&shape);
        let data = (0..c.numel()).map(|i| if c.data[i] != 0.0 { a.data[i] } else { b.data[i] }).collect();
        RefTensor { shape, data }
    }

    /// Generic reduction over `axes` (distinct, any order). Each output element starts at `init`
    /// and folds in its inputs in increasing flat order.
    fn reduce(&self, axes: &[usize], keepdim: bool, init: f64, f: impl Fn(f64, f64) -> f64, what: &str) -> Self {
        let mask = axes_mask(axes, self.ndim(), what);
        // Output shape with reduced dims kept as 1; dropped at the end if !keepdim.
        let kept: Vec<usize> = self.shape.iter().zip(&mask).map(|(&n, &m)| if m { 1 } else { n }).collect();
        let mut out = vec![init; shape_numel(&kept)];
        for (i, &x) in self.data.iter().enumerate() {
            let mut idx = unravel_index(i, &self.shape);
            for (d, &m) in mask.iter().enumerate() {
                if m {
                    idx[d] = 0;
                }
            }
            let o = ravel_index(&idx, &kept);
            out[o] = f(out[o], x);
        }
        let shape =
            if keepdim { kept } else { self.shape.iter().zip(&mask).filter(|&(_, &m)| !m).map(|(&n, _)| n).collect() };
        RefTensor { shape, data: out }
    }

    /// Sum over `axes`; empty `axes` is an identity copy.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Self {
        self.reduce(axes, keepdim, 0.0, |acc, x| acc + x, "sum")
    }

    /// Mean over `axes` (an empty reduction gives NaN, as 0/0). Empty `axes` is an identity copy.
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Self {
        let count: usize = axes.iter().map(|&a| self.shape.get(a).copied().unwrap_or(1)).product();
        let s = self.sum(axes, keepdim);
        let c = count as f64;
        s.map(|x| x / c)
    }

    /// Max over `axes`; NaN propagates (like NumPy). Panics on reducing a zero-size dim.
    pub fn max(&self, axes: &[usize], keepdim: bool) -> Self {
        for &a in axes {
            if a < self.ndim() {
                assert!(self.shape[a] > 0, "max: cannot reduce over zero-size axis {a}");
            }
        }
        self.reduce(axes, keepdim, f64::NEG_INFINITY, |acc, x| if x.is_nan() || x > acc { x } else { acc }, "max")
    }

    pub fn sum_all(&self) -> f64 {
        self.data.iter().sum()
    }

    /// Exactly `numpy.matmul`: 1-D @ 1-D is a dot product (shape `[]`); a 1-D left operand is
    /// promoted to `[1, k]` and a 1-D right operand to `[k, 1]`, the added dim being removed from
    /// the result; leading (batch) dims broadcast. 0-d operands panic.
    pub fn matmul(&self, other: &Self) -> Self {
        assert!(
            self.ndim() >= 1 && other.ndim() >= 1,
            "matmul: 0-d operands are not allowed (shapes {:?} and {:?})",
            self.shape,
            other.shape
        );
        let a_vec = self.ndim() == 1;
        let b_vec = other.ndim() == 1;
        let a = if a_vec { self.unsqueeze(0) } else { self.clone() };
        let b = if b_vec { other.unsqueeze(1) } else { other.clone() };
        let (m, k) = (a.shape[a.ndim() - 2], a.shape[a.ndim() - 1]);
        let (k2, n) = (b.shape[b.ndim() - 2], b.shape[b.ndim() - 1]);
        assert_eq!(k, k2, "matmul: inner dims differ for shapes {:?} and {:?}", self.shape, other.shape);
        let batch = broadcast_shapes(&a.shape[..a.ndim() - 2], &b.shape[..b.ndim() - 2])
            .unwrap_or_else(|| panic!("matmul: batch dims of {:?} and {:?} do not broadcast", self.shape, other.shape));
        let nb = shape_numel(&batch);
        let a = a.broadcast_to(&[batch.clone(), vec![m, k]].concat());
        let b = b.broadcast_to(&[batch.clone(), vec![k, n]].concat());
        let mut out = vec![0.0; nb * m * n];
        for bi in 0..nb {
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for p in 0..k {
                        acc += a.data[bi * m * k + i * k + p] * b.data[bi * k * n + p * n + j];
                    }
                    out[bi * m * n + i * n + j] = acc;
                }
            }
        }
        let mut shape = batch;
        if !a_vec {
            shape.push(m);
        }
        if !b_vec {
            shape.push(n);
        }
        RefTensor { shape, data: out }
    }

    /// Same data, new shape; panics if the element counts differ.
    pub fn reshape(&self, shape: &[usize]) -> Self {
        assert_eq!(shape_numel(shape), self.numel(), "reshape: cannot reshape {:?} into {shape:?}", self.shape);
        RefTensor { shape: shape.to_vec(), data: self.data.clone() }
    }

    /// Output dim `i` is input dim `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Self {
        assert_eq!(perm.len(), self.ndim(), "permute: perm {perm:?} has wrong rank for {:?}", self.shape);
        let mut seen = vec![false; self.ndim()];
        for &p in perm {
            assert!(p < self.ndim() && !seen[p], "permute: {perm:?} is not a permutation of 0..{}", self.ndim());
            seen[p] = true;
        }
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let mut src_idx = vec![0usize; self.ndim()];
        let data = (0..self.numel())
            .map(|i| {
                let idx = unravel_index(i, &shape);
                for (d, &p) in perm.iter().enumerate() {
                    src_idx[p] = idx[d];
                }
                self.data[ravel_index(&src_idx, &self.shape)]
            })
            .collect();
        RefTensor { shape, data }
    }

    /// Swaps dims `a` and `b`.
    pub fn transpose(&self, a: usize, b: usize) -> Self {
        assert!(a < self.ndim() && b < self.ndim(), "transpose: dims ({a}, {b}) out of range for {:?}", self.shape);
        let mut perm: Vec<usize> = (0..self.ndim()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Materialises NumPy broadcasting of `self` to `shape` (right-aligned; each source dim must
    /// equal the target dim or be 1). Panics if not broadcastable.
    pub fn broadcast_to(&self, shape: &[usize]) -> Self {
        let nd = shape.len();
        assert!(self.ndim() <= nd, "broadcast_to: cannot broadcast {:?} to lower rank {shape:?}", self.shape);
        let off = nd - self.ndim();
        for (d, &n) in self.shape.iter().enumerate() {
            assert!(n == shape[off + d] || n == 1, "broadcast_to: cannot broadcast {:?} to {shape:?}", self.shape);
        }
        let mut src_idx = vec![0usize; self.ndim()];
        let data = (0..shape_numel(shape))
            .map(|i| {
                let idx = unravel_index(i, shape);
                for (d, &n) in self.shape.iter().enumerate() {
                    src_idx[d] = if n == 1 { 0 } else { idx[off + d] };
                }
                self.data[ravel_index(&src_idx, &self.shape)]
            })
            .collect();
        RefTensor { shape: shape.to_vec(), data }
    }

    /// Elements `start..start + len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Self {
        assert!(dim < self.ndim(), "narrow: dim {dim} out of range for {:?}", self.shape);
        assert!(
            start + len <= self.shape[dim],
            "narrow: range {start}..{} out of bounds for dim {dim} of {:?}",
            start + len,
            self.shape
        );
        let mut shape = self.shape.clone();
        shape[dim] = len;
        Self::from_fn(&shape, |idx| {
            let mut src = idx.to_vec();
            src[dim] += start;
            self.at(&src)
        })
    }

    /// Concatenation along `dim`; all other dims must agree. Panics on an empty list.
    pub fn cat(ts: &[&RefTensor], dim: usize) -> Self {
        assert!(!ts.is_empty(), "cat: empty tensor list");
        let first = &ts[0].shape;
        assert!(dim < first.len(), "cat: dim {dim} out of range for {first:?}");
        for t in ts {
            assert_eq!(t.ndim(), first.len(), "cat: rank mismatch {:?} vs {first:?}", t.shape);
            for d in 0..first.len() {
                assert!(
                    d == dim || t.shape[d] == first[d],
                    "cat: shape {:?} incompatible with {first:?} along dim {dim}",
                    t.shape
                );
            }
        }
        let mut shape = first.clone();
        shape[dim] = ts.iter().map(|t| t.shape[dim]).sum();
        Self::from_fn(&shape, |idx| {
            let mut src = idx.to_vec();
            for t in ts {
                if src[dim] < t.shape[dim] {
                    return t.at(&src);
                }
                src[dim] -= t.shape[dim];
            }
            unreachable!("cat: index past the end")
        })
    }

    /// Stacks equal-shape tensors along a new dim `dim` (0..=rank).
    pub fn stack(ts: &[&RefTensor], dim: usize) -> Self {
        assert!(!ts.is_empty(), "stack: empty tensor list");
        for t in ts {
            assert_eq!(t.shape, ts[0].shape, "stack: shapes differ");
        }
        let un: Vec<RefTensor> = ts.iter().map(|t| t.unsqueeze(dim)).collect();
        let refs: Vec<&RefTensor> = un.iter().collect();
        Self::cat(&refs, dim)
    }

    /// Removes dim `dim`, which must have size 1 (panics otherwise, unlike PyTorch's no-op).
    pub fn squeeze(&self, dim: usize) -> Self {
        assert!(dim < self.ndim(), "squeeze: dim {dim} out of range for {:?}", self.shape);
        assert_eq!(self.shape[dim], 1, "squeeze: dim {dim} of {:?} is not 1", self.shape);
        let mut shape = self.shape.clone();
        shape.remove(dim);
        self.reshape(&shape)
    }

    /// Inserts a size-1 dim at position `dim` (0..=rank).
    pub fn unsqueeze(&self, dim: usize) -> Self {
        assert!(dim <= self.ndim(), "unsqueeze: dim {dim} out of range for {:?}", self.shape);
        let mut shape = self.shape.clone();
        shape.insert(dim, 1);
        self.reshape(&shape)
    }

    /// Numerically stable softmax along `axis`.
    pub fn softmax(&self, axis: usize) -> Self {
        let m = self.max(&[axis], true);
        let e = self.sub(&m).map(f64::exp);
        let s = e.sum(&[axis], true);
        e.div(&s)
    }

    /// Numerically stable log-softmax along `axis`.
    pub fn log_softmax(&self, axis: usize) -> Self {
        let m = self.max(&[axis], true);
        let z = self.sub(&m);
        let lse = z.map(f64::exp).sum(&[axis], true).map(f64::ln);
        z.sub(&lse)
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }

    /// Tensor from f32 data (e.g. GPU inputs), widened exactly to f64.
    pub fn from_f32(data: &[f32], shape: &[usize]) -> Self {
        Self::new(data.iter().map(|&x| f64::from(x)).collect(), shape)
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// One step of splitmix64.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic data uniform in [lo, hi) from a seed (splitmix64, 53-bit mantissas).
pub fn uniform(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    assert!(lo < hi, "uniform: need lo < hi, got [{lo}, {hi})");
    let mut state = seed;
    (0..n)
        .map(|_| {
            let u = (splitmix64(&mut state) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            let v = lo + (hi - lo) * u;
            // Rounding can land exactly on `hi`; keep the interval half-open.
            if v >= hi { hi.next_down().max(lo) } else { v }
        })
        .collect()
}

pub fn rand_tensor(seed: u64, shape: &[usize], lo: f64, hi: f64) -> RefTensor {
    RefTensor::new(uniform(seed, shape_numel(shape), lo, hi), shape)
}

// ---------------------------------------------------------------------------------------------
// Finite differences
// ---------------------------------------------------------------------------------------------

/// Central finite differences of a scalar function: returns d f / d inputs[i] for every input,
/// same shapes, using (f(x+h) - f(x-h)) / (2h) per element, all in f64.
pub fn numeric_grad(f: impl Fn(&[RefTensor]) -> f64, inputs: &[RefTensor], h: f64) -> Vec<RefTensor> {
    assert!(h > 0.0, "numeric_grad: step must be positive, got {h}");
    let mut xs: Vec<RefTensor> = inputs.to_vec();
    let mut grads = Vec::with_capacity(inputs.len());
    for i in 0..inputs.len() {
        let mut g = RefTensor::zeros(&inputs[i].shape);
        for j in 0..inputs[i].numel() {
            let x0 = inputs[i].data[j];
            xs[i].data[j] = x0 + h;
            let fp = f(&xs);
            xs[i].data[j] = x0 - h;
            let fm = f(&xs);
            xs[i].data[j] = x0;
            g.data[j] = (fp - fm) / (2.0 * h);
        }
        grads.push(g);
    }
    grads
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

fn check_close(actual: &[f64], expected: &[f64], shape: Option<&[usize]>, rtol: f64, atol: f64, what: &str) {
    let shape_note = match shape {
        Some(s) => format!(" shape {s:?}"),
        None => String::new(),
    };
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length mismatch: actual has {} elements, expected {}{shape_note}",
        actual.len(),
        expected.len()
    );
    let mut n_bad = 0usize;
    // Worst failing element: largest excess of the error over its tolerance (NaN mismatches win).
    let mut worst: Option<(usize, f64)> = None;
    let mut max_abs = 0.0f64;
    let mut max_rel = 0.0f64;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok;
        let excess;
        if e.is_nan() || a.is_nan() {
            ok = e.is_nan() && a.is_nan();
            excess = f64::INFINITY;
        } else if a == e {
            ok = true; // also covers matching infinities
            excess = 0.0;
        } else if e.is_infinite() || a.is_infinite() {
            // The tolerance below would be infinite: infinities must match exactly.
            ok = false;
            excess = f64::INFINITY;
        } else {
            let err = (a - e).abs();
            let tol = atol + rtol * e.abs();
            ok = err <= tol;
            excess = err - tol;
            max_abs = max_abs.max(err);
            if e != 0.0 {
                max_rel = max_rel.max(err / e.abs());
            } else {
                max_rel = f64::INFINITY;
            }
        }
        if !ok {
            n_bad += 1;
            let replace = match worst {
                None => true,
                Some((_, w)) => excess > w || excess.is_nan(),
            };
            if replace {
                worst = Some((i, excess));
            }
        }
    }
    if let Some((i, _)) = worst {
        let at = match shape {
            Some(s) => format!("{i} (index {:?})", unravel_index(i, s)),
            None => i.to_string(),
        };
        panic!(
            "{what}: {n_bad} of {} elements not close (rtol {rtol:e}, atol {atol:e}){shape_note}; \
             worst at flat index {at}: actual {:?}, expected {:?}; \
             max abs err {max_abs:e}, max rel err {max_rel:e}",
            actual.len(),
            actual[i],
            expected[i]
        );
    }
}

/// Panics with a helpful message unless |a - e| <= atol + rtol * |e| for every element; NaN in
/// `actual` must be matched by NaN in `expected` (and vice versa); lengths must agree.
pub fn assert_close(actual: &[f64], expected: &[f64], rtol: f64, atol: f64, what: &str) {
    check_close(actual, expected, None, rtol, atol, what);
}

pub fn assert_close_f32(actual: &[f32], expected: &[f64], rtol: f64, atol: f64, what: &str) {
    let a: Vec<f64> = actual.iter().map(|&x| f64::from(x)).collect();
    check_close(&a, expected, None, rtol, atol, what);
}

/// Like [`assert_close_f32`], but also checks `actual_shape == expected.shape` and reports the
/// worst element's multi-index.
pub fn assert_close_f32_shaped(
    actual: &[f32],
    actual_shape: &[usize],
    expected: &RefTensor,
    rtol: f64,
    atol: f64,
    what: &str,
) {
    assert_eq!(
        actual_shape, expected.shape,
        "{what}: shape mismatch: actual {actual_shape:?}, expected {:?}",
        expected.shape
    );
    let a: Vec<f64> = actual.iter().map(|&x| f64::from(x)).collect();
    check_close(&a, &expected.data, Some(&expected.shape), rtol, atol, what);
}

/// Shape-checked comparison of two reference tensors.
pub fn assert_tensor_close(actual: &RefTensor, expected: &RefTensor, rtol: f64, atol: f64, what: &str) {
    assert_eq!(
        actual.shape, expected.shape,
        "{what}: shape mismatch: actual {:?}, expected {:?}",
        actual.shape, expected.shape
    );
    check_close(&actual.data, &expected.data, Some(&expected.shape), rtol, atol, what);
}

// ---------------------------------------------------------------------------------------------
// Scalar math
// ---------------------------------------------------------------------------------------------

/// Logistic sigmoid, evaluated without overflow for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
pub fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// 0.5 x (1 + erf(x / sqrt 2))
pub fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// Error function, accurate to about 1e-15 absolute.
///
/// |x| < 3: the all-positive series erf(x) = 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} / (2n+1)!!
/// (no cancellation). |x| >= 3: erf = 1 - erfc with the Laplace continued fraction
/// erfc(x) = e^{-x^2}/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))).
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let ax = x.abs();
    let r = if ax < 3.0 { erf_series(ax) } else { 1.0 - erfc_cf(ax) };
    if x < 0.0 { -r } else { r }
}

/// Complementary error function 1 - erf(x), keeping relative accuracy for large positive x.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else if x >= 3.0 {
        erfc_cf(x)
    } else {
        1.0 - erf(x)
    }
}

fn erf_series(x: f64) -> f64 {
    // term_n = 2^n x^{2n+1} / (1*3*...*(2n+1)); term_{n+1} = term_n * 2x^2 / (2n+3).
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0u32;
    while n < 1000 {
        term *= 2.0 * x2 / f64::from(2 * n + 3);
        sum += term;
        n += 1;
        if term <= sum * 1e-17 {
            break;
        }
    }
    2.0 / PI.sqrt() * (-x2).exp() * sum
}

fn erfc_cf(x: f64) -> f64 {
    if x.is_infinite() {
        return 0.0;
    }
    // Evaluate the continued fraction bottom-up; 200 levels is far more than needed for x >= 3.
    let mut t = x;
    for k in (1..=200u32).rev() {
        t = x + f64::from(k) * 0.5 / t;
    }
    (-x * x).exp() / (PI.sqrt() * t)
}
