//! Indexing, convolution, pooling, optimizers and layers.
//!
//! - Gradchecks (as in tests/gradcheck.rs): `index_select`, `gather`, `embedding`, `conv2d`,
//!   `max_pool2d` and `avg_pool2d` against a float64 CPU reference, and the gradient of
//!   `sum(op(inputs) * R)` (a fixed random `R`) against central finite differences of it.
//! - Repeated indices accumulate deterministically: bit-identical gradients run after run.
//! - Index and geometry validation: out-of-range indices, float indices, bad shapes, kernels
//!   that do not fit, zero strides, pooling padding; errors, never panics.
//! - Optimizers (SGD, SGD with momentum and weight decay, Adam, AdamW) against an f64
//!   reference of PyTorch's formulas; in-place updates; many parameters; `clip_grad_norm`.
//! - Layers (`Linear`, `Conv2d`, `LayerNorm`, `Embedding`) and the seeded initialisers.
//! - The compiled backward (a `WgslCompiler` installed) agrees with the eager one for a small
//!   CNN and for an embedding with repeats.
//!
//! The compiler is process-global, so every test takes `LOCK` first: one test installing a
//! compiler would otherwise compile the backward of the tests running beside it.

mod common;
use common::compiled_check::eager_vs_compiled;
use common::gradcheck::*;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, MutexGuard};

use common::reference::*;
use common::{device, upload};
use wgrad::nn::{
    Conv2d, Embedding, LayerNorm, Linear, Module, kaiming_uniform, uniform as init_uniform, xavier_uniform,
};
use wgrad::{Adam, AdamW, ClassLoss, Conv2dOptions, DType, Error, Optimizer, Sgd, Tensor};

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------ harness

/// Pairwise distinct values `step` apart, in a random order (no ties for max pooling).
fn distinct(seed: u64, shape: &[usize], step: f64) -> RefTensor {
    let n = shape_numel(shape);
    let keys = uniform(seed, n, 0.0, 1.0);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
    let mut data = vec![0.0; n];
    for (rank, &i) in order.iter().enumerate() {
        data[i] = (rank as f64 - n as f64 / 2.0) * step;
    }
    RefTensor::from_f32(&RefTensor::new(data, shape).to_f32(), shape)
}

/// Random integers in `0..bound` (repeats likely when the count exceeds `bound`).
fn rand_ints(seed: u64, n: usize, bound: usize) -> Vec<usize> {
    uniform(seed, n, 0.0, bound as f64).into_iter().map(|v| (v as usize).min(bound - 1)).collect()
}

fn i32_tensor(data: &[i32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape.to_vec(), &device()).unwrap()
}

fn u32_tensor(data: &[u32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape.to_vec(), &device()).unwrap()
}

fn f32_tensor(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape.to_vec(), &device()).unwrap()
}

fn as_i32(v: &[usize]) -> Vec<i32> {
    v.iter().map(|&i| i as i32).collect()
}

fn as_u32(v: &[usize]) -> Vec<u32> {
    v.iter().map(|&i| i as u32).collect()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn opts(stride: [usize; 2], padding: [usize; 2], dilation: [usize; 2]) -> Conv2dOptions {
    Conv2dOptions { stride, padding, dilation, ..Default::default() }
}

// ------------------------------------------------------------------ f64 references

fn index_select_ref(x: &RefTensor, dim: usize, idx: &[usize]) -> RefTensor {
    let mut shape = x.shape.clone();
    shape[dim] = idx.len();
    RefTensor::from_fn(&shape, |c| {
        let mut s = c.to_vec();
        s[dim] = idx[c[dim]];
        x.at(&s)
    })
}

fn gather_ref(x: &RefTensor, dim: usize, idx: &[usize], index_shape: &[usize]) -> RefTensor {
    RefTensor::from_fn(index_shape, |c| {
        let mut s = c.to_vec();
        s[dim] = idx[ravel_index(c, index_shape)];
        x.at(&s)
    })
}

fn embedding_ref(ids: &[usize], ids_shape: &[usize], weight: &RefTensor) -> RefTensor {
    let mut shape = ids_shape.to_vec();
    shape.push(weight.shape[1]);
    index_select_ref(weight, 0, ids).reshape(&shape)
}

/// Output size of a window geometry along one axis.
fn out_size(size: usize, kernel: usize, stride: usize, padding: usize, dilation: usize) -> usize {
    (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1
}

/// `input[b, ch, y, x]` with zero padding outside; `None` outside.
fn padded_at(x: &RefTensor, b: usize, ch: usize, iy: isize, ix: isize) -> Option<f64> {
    let (h, w) = (x.shape[2] as isize, x.shape[3] as isize);
    (iy >= 0 && ix >= 0 && iy < h && ix < w).then(|| x.at(&[b, ch, iy as usize, ix as usize]))
}

fn conv2d_ref(x: &RefTensor, w: &RefTensor, bias: Option<&RefTensor>, o: Conv2dOptions) -> RefTensor {
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (oc, kh, kw) = (w.shape[0], w.shape[2], w.shape[3]);
    assert_eq!(w.shape[1], c);
    let oh = out_size(h, kh, o.stride[0], o.padding[0], o.dilation[0]);
    let ow = out_size(wd, kw, o.stride[1], o.padding[1], o.dilation[1]);
    RefTensor::from_fn(&[n, oc, oh, ow], |i| {
        let (b, oc_, y, xx) = (i[0], i[1], i[2], i[3]);
        let mut acc = bias.map_or(0.0, |bias| bias.data[oc_]);
        for ch in 0..c {
            for ki in 0..kh {
                for kj in 0..kw {
                    let iy = (y * o.stride[0] + ki * o.dilation[0]) as isize - o.padding[0] as isize;
                    let ix = (xx * o.stride[1] + kj * o.dilation[1]) as isize - o.padding[1] as isize;
                    if let Some(v) = padded_at(x, b, ch, iy, ix) {
                        acc += v * w.at(&[oc_, ch, ki, kj]);
                    }
                }
            }
        }
        acc
    })
}

/// Max (padding never wins) or mean (padding counted as zeros) over each window.
fn pool_ref(x: &RefTensor, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2], max: bool) -> RefTensor {
    let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let oh = out_size(h, kernel[0], stride[0], padding[0], 1);
    let ow = out_size(w, kernel[1], stride[1], padding[1], 1);
    RefTensor::from_fn(&[n, c, oh, ow], |i| {
        let mut best = f64::NEG_INFINITY;
        let mut sum = 0.0;
        for ki in 0..kernel[0] {
            for kj in 0..kernel[1] {
                let iy = (i[2] * stride[0] + ki) as isize - padding[0] as isize;
                let ix = (i[3] * stride[1] + kj) as isize - padding[1] as isize;
                if let Some(v) = padded_at(x, i[0], i[1], iy, ix) {
                    best = best.max(v);
                    sum += v;
                }
            }
        }
        if max { best } else { sum / (kernel[0] * kernel[1]) as f64 }
    })
}

fn linear_ref(x: &RefTensor, w: &RefTensor, b: Option<&RefTensor>) -> RefTensor {
    let y = x.matmul(&w.transpose(0, 1));
    match b {
        Some(b) => y.add(b),
        None => y,
    }
}

fn layer_norm_ref(x: &RefTensor, k: usize, w: &RefTensor, b: &RefTensor, eps: f64) -> RefTensor {
    let axes: Vec<usize> = (x.ndim() - k..x.ndim()).collect();
    let centered = x.sub(&x.mean(&axes, true));
    let var = centered.map(|v| v * v).mean(&axes, true);
    centered.mul(&var.map(|v| 1.0 / (v + eps).sqrt())).mul(w).add(b)
}

fn to_ref(t: &Tensor) -> RefTensor {
    RefTensor::from_f32(&vals(t), t.dims())
}

// ------------------------------------------------------------------ 1. gradchecks: indexing

#[test]
fn index_select_gradcheck() {
    let _l = lock();
    let x = r32(100, &[4, 5], -1.0, 1.0);
    let rows = [3usize, 0, 3, 1, 3];
    let idx = i32_tensor(&as_i32(&rows), &[rows.len()]);
    gradcheck(
        "index_select dim 0 i32 repeats",
        std::slice::from_ref(&x),
        |t| t[0].index_select(0, &idx),
        |r| index_select_ref(&r[0], 0, &rows),
    );
    let cols = [4usize, 4, 0, 2, 4, 1];
    let idx = u32_tensor(&as_u32(&cols), &[cols.len()]);
    gradcheck(
        "index_select dim 1 u32 repeats",
        std::slice::from_ref(&x),
        |t| t[0].index_select(1, &idx),
        |r| index_select_ref(&r[0], 1, &cols),
    );
    let idx = i32_tensor(&as_i32(&cols), &[cols.len()]);
    gradcheck(
        "index_select dim -1 i32 repeats",
        std::slice::from_ref(&x),
        |t| t[0].index_select(-1, &idx),
        |r| index_select_ref(&r[0], 1, &cols),
    );
    // A 3-D source, the middle dim, and a non-contiguous (transposed) source.
    let y = r32(101, &[2, 3, 4], -1.0, 1.0);
    let mid = [2usize, 2, 0, 1, 2];
    let idx = u32_tensor(&as_u32(&mid), &[mid.len()]);
    gradcheck(
        "index_select 3-D dim 1 u32",
        std::slice::from_ref(&y),
        |t| t[0].index_select(1, &idx),
        |r| index_select_ref(&r[0], 1, &mid),
    );
    let idx = i32_tensor(&as_i32(&mid), &[mid.len()]);
    // A strided (non-contiguous) index view: column 0 of [[2, 9], [0, 9], [2, 9], [1, 9]].
    let view = i32_tensor(&[2, 9, 0, 9, 2, 9, 1, 9], &[4, 2]).narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    assert!(!view.is_contiguous());
    gradcheck(
        "index_select with a strided index view",
        std::slice::from_ref(&x),
        |t| t[0].index_select(0, &view),
        |r| index_select_ref(&r[0], 0, &[2, 0, 2, 1]),
    );
    gradcheck(
        "index_select of transposed",
        &[y],
        |t| t[0].transpose(0, 2)?.index_select(1, &idx),
        |r| index_select_ref(&r[0].transpose(0, 2), 1, &mid),
    );
}

#[test]
fn gather_gradcheck() {
    let _l = lock();
    let x = r32(200, &[3, 5], -1.0, 1.0);
    // dim 0: index [2, 4] (off-dim size 4 <= 5), values in 0..3 with repeats.
    let i0 = [2usize, 0, 2, 1, 2, 2, 0, 1];
    let idx = i32_tensor(&as_i32(&i0), &[2, 4]);
    gradcheck(
        "gather dim 0 i32 [2,4] from [3,5]",
        std::slice::from_ref(&x),
        |t| t[0].gather(0, &idx),
        |r| gather_ref(&r[0], 0, &i0, &[2, 4]),
    );
    // dim 1: index [3, 7] (more picks than columns), values in 0..5 with repeats.
    let i1 = rand_ints(201, 21, 5);
    let idx = u32_tensor(&as_u32(&i1), &[3, 7]);
    gradcheck(
        "gather dim 1 u32 [3,7] from [3,5]",
        std::slice::from_ref(&x),
        |t| t[0].gather(1, &idx),
        |r| gather_ref(&r[0], 1, &i1, &[3, 7]),
    );
    // dim 1 with fewer rows than the source.
    let i2 = [4usize, 4, 1, 0, 0, 4];
    let idx = i32_tensor(&as_i32(&i2), &[2, 3]);
    gradcheck(
        "gather dim -1 i32 [2,3] from [3,5]",
        std::slice::from_ref(&x),
        |t| t[0].gather(-1, &idx),
        |r| gather_ref(&r[0], 1, &i2, &[2, 3]),
    );
    // A transposed (non-contiguous) index: [[1, 2], [0, 1], [2, 0]].
    let tidx = i32_tensor(&[1, 0, 2, 2, 1, 0], &[2, 3]).t().unwrap();
    assert!(!tidx.is_contiguous());
    gradcheck(
        "gather dim 0 with a transposed index",
        std::slice::from_ref(&x),
        |t| t[0].gather(0, &tidx),
        |r| gather_ref(&r[0], 0, &[1, 2, 0, 1, 2, 0], &[3, 2]),
    );
    // 3-D, middle dim.
    let y = r32(202, &[2, 3, 4], -1.0, 1.0);
    let i3 = rand_ints(203, 2 * 5 * 3, 3);
    let idx = i32_tensor(&as_i32(&i3), &[2, 5, 3]);
    gradcheck("gather 3-D dim 1", &[y], |t| t[0].gather(1, &idx), |r| gather_ref(&r[0], 1, &i3, &[2, 5, 3]));
}

#[test]
fn embedding_gradcheck() {
    let _l = lock();
    let w = r32(300, &[6, 4], -1.0, 1.0);
    let ids = [1usize, 4, 1, 0, 4, 4];
    let ids_i32 = i32_tensor(&as_i32(&ids), &[2, 3]);
    gradcheck(
        "embedding i32 [2,3] repeats",
        std::slice::from_ref(&w),
        |t| wgrad::embedding(&ids_i32, &t[0]),
        |r| embedding_ref(&ids, &[2, 3], &r[0]),
    );
    let ids_u32 = u32_tensor(&as_u32(&ids), &[2, 3]);
    gradcheck(
        "embedding u32 [2,3] repeats",
        std::slice::from_ref(&w),
        |t| wgrad::embedding(&ids_u32, &t[0]),
        |r| embedding_ref(&ids, &[2, 3], &r[0]),
    );
    // 1-D and 3-D ids.
    let ids1 = [5usize, 5, 2];
    let t1 = i32_tensor(&as_i32(&ids1), &[3]);
    gradcheck(
        "embedding 1-D ids",
        std::slice::from_ref(&w),
        |t| wgrad::embedding(&t1, &t[0]),
        |r| embedding_ref(&ids1, &[3], &r[0]),
    );
    let ids3 = rand_ints(301, 12, 6);
    let t3 = u32_tensor(&as_u32(&ids3), &[2, 3, 2]);
    gradcheck("embedding 3-D ids", &[w], |t| wgrad::embedding(&t3, &t[0]), |r| embedding_ref(&ids3, &[2, 3, 2], &r[0]));
}

// ------------------------------------------------------------------ 1. gradchecks: conv and pooling

#[test]
fn conv2d_gradcheck() {
    let _l = lock();
    type Case = (&'static str, [usize; 4], [usize; 4], bool, Conv2dOptions);
    let cases: [Case; 6] = [
        ("stride 1 pad 0 bias", [2, 3, 5, 6], [4, 3, 3, 2], true, opts([1, 1], [0, 0], [1, 1])),
        ("stride 1 pad 0 no bias", [2, 3, 5, 6], [4, 3, 3, 2], false, opts([1, 1], [0, 0], [1, 1])),
        ("stride 2 pad 1 no bias", [2, 2, 7, 5], [3, 2, 3, 3], false, opts([2, 2], [1, 1], [1, 1])),
        ("stride 2 pad 1 bias", [2, 2, 6, 5], [3, 2, 2, 3], true, opts([2, 2], [1, 1], [1, 1])),
        ("dilation 2 bias", [2, 3, 6, 7], [2, 3, 2, 3], true, opts([1, 1], [1, 0], [2, 2])),
        ("mixed stride/pad/dilation", [2, 2, 6, 5], [3, 2, 2, 2], true, opts([2, 1], [0, 2], [1, 2])),
    ];
    for (i, (name, xs, ws, bias, o)) in cases.into_iter().enumerate() {
        let s = 400 + 10 * i as u64;
        let mut inputs = vec![r32(s, &xs, -1.0, 1.0), r32(s + 1, &ws, -1.0, 1.0)];
        if bias {
            inputs.push(r32(s + 2, &[ws[0]], -1.0, 1.0));
        }
        gradcheck(
            &format!("conv2d {name} x {xs:?} w {ws:?}"),
            &inputs,
            |t| t[0].conv2d(&t[1], t.get(2), o),
            |r| conv2d_ref(&r[0], &r[1], r.get(2), o),
        );
    }
    // Padding so wide that each image's padding element is read by more
    // than 4,096 taps: its scatter-add is cut into runs (per image, as the
    // map is one image's for the whole batch).
    let o = opts([1, 1], [35, 35], [1, 1]);
    gradcheck(
        "conv2d padding 35",
        &[r32(488, &[2, 1, 3, 3], -1.0, 1.0), r32(489, &[1, 1, 3, 3], -1.0, 1.0)],
        |t| t[0].conv2d(&t[1], None, o),
        |r| conv2d_ref(&r[0], &r[1], None, o),
    );
    // 1x1 kernel, one input channel; and a non-contiguous (permuted) input.
    let x = r32(490, &[2, 1, 3, 4], -1.0, 1.0);
    let w = r32(491, &[3, 1, 1, 1], -1.0, 1.0);
    gradcheck(
        "conv2d 1x1",
        &[x, w],
        |t| t[0].conv2d(&t[1], None, Conv2dOptions::default()),
        |r| conv2d_ref(&r[0], &r[1], None, Conv2dOptions::default()),
    );
    let x = r32(494, &[2, 3, 5, 4], -1.0, 1.0);
    let w = r32(495, &[2, 2, 2, 3], -1.0, 1.0); // permuted to [2, 3, 2, 2]
    gradcheck(
        "conv2d of permuted weight",
        &[x, w],
        |t| t[0].conv2d(&t[1].permute(&[0, 3, 1, 2])?, None, Conv2dOptions::default()),
        |r| conv2d_ref(&r[0], &r[1].permute(&[0, 3, 1, 2]), None, Conv2dOptions::default()),
    );
    let x = r32(492, &[5, 4, 2, 3], -1.0, 1.0); // permuted to [2, 3, 5, 4]
    let w = r32(493, &[2, 3, 2, 2], -1.0, 1.0);
    let o = opts([1, 2], [1, 1], [1, 1]);
    gradcheck(
        "conv2d of permuted input",
        &[x, w],
        |t| t[0].permute(&[2, 3, 0, 1])?.conv2d(&t[1], None, o),
        |r| conv2d_ref(&r[0].permute(&[2, 3, 0, 1]), &r[1], None, o),
    );
}

/// The analytic gradients of `sum(conv2d(x, w, b) * r)` in f64: (dx, dw, db).
fn conv2d_grads_ref(x: &RefTensor, w: &RefTensor, r: &RefTensor, o: Conv2dOptions) -> [RefTensor; 3] {
    let (mut dx, mut dw, mut db) =
        (RefTensor::zeros(&x.shape), RefTensor::zeros(&w.shape), RefTensor::zeros(&[w.shape[0]]));
    let [c, kh, kw] = [w.shape[1], w.shape[2], w.shape[3]];
    for e in 0..r.numel() {
        let i = unravel_index(e, &r.shape);
        let g = r.data[e];
        db.data[i[1]] += g;
        for ch in 0..c {
            for ki in 0..kh {
                for kj in 0..kw {
                    let iy = (i[2] * o.stride[0] + ki * o.dilation[0]) as isize - o.padding[0] as isize;
                    let ix = (i[3] * o.stride[1] + kj * o.dilation[1]) as isize - o.padding[1] as isize;
                    if let Some(v) = padded_at(x, i[0], ch, iy, ix) {
                        let xi = ravel_index(&[i[0], ch, iy as usize, ix as usize], &x.shape);
                        let wi = ravel_index(&[i[1], ch, ki, kj], &w.shape);
                        dx.data[xi] += g * w.data[wi];
                        dw.data[wi] += g * v;
                    }
                }
            }
        }
    }
    [dx, dw, db]
}

/// Shapes large enough for several matmul tiles, against analytic f64 gradients.
#[test]
fn conv2d_larger_shapes_match_analytic_gradients() {
    let _l = lock();
    let cases = [
        ([2usize, 8, 12, 11], [16usize, 8, 3, 3], opts([1, 1], [1, 1], [1, 1])),
        ([3, 5, 13, 9], [7, 5, 3, 2], opts([2, 1], [1, 0], [2, 1])),
    ];
    for (i, (xs, ws, o)) in cases.into_iter().enumerate() {
        let s = 1600 + 10 * i as u64;
        let (x, w, b) = (r32(s, &xs, -1.0, 1.0), r32(s + 1, &ws, -0.5, 0.5), r32(s + 2, &[ws[0]], -1.0, 1.0));
        let want = conv2d_ref(&x, &w, Some(&b), o);
        let r = r32(s + 3, &want.shape, -1.0, 1.0);
        let leaves = [upload(&x), upload(&w), upload(&b)].map(|t| t.requires_grad(true).unwrap());
        let y = leaves[0].conv2d(&leaves[1], Some(&leaves[2]), o).unwrap();
        let name = format!("conv2d x {xs:?} w {ws:?} {o:?}");
        assert_close_f32_shaped(&vals(&y), y.dims(), &want, 1e-4, 1e-4, &format!("{name}: forward"));
        y.mul(upload(&r)).unwrap().sum_all().unwrap().backward().unwrap();
        for (k, g) in conv2d_grads_ref(&x, &w, &r, o).iter().enumerate() {
            let got = leaves[k].grad().unwrap();
            assert_close_f32_shaped(&vals(&got), got.dims(), g, 1e-4, 1e-4, &format!("{name}: grad {k}"));
        }
    }
}

#[test]
fn pooling_gradcheck() {
    let _l = lock();
    type Case = ([usize; 4], [usize; 2], [usize; 2], [usize; 2]);
    let cases: [Case; 5] = [
        ([2, 3, 6, 7], [2, 2], [2, 2], [0, 0]),
        ([2, 3, 6, 7], [3, 3], [2, 2], [1, 1]),
        ([2, 2, 5, 5], [3, 3], [2, 2], [1, 1]),
        ([1, 2, 5, 6], [2, 3], [1, 2], [1, 1]),
        ([2, 1, 4, 4], [2, 2], [2, 2], [1, 1]),
    ];
    for (i, (xs, k, s, p)) in cases.into_iter().enumerate() {
        let x = distinct(500 + i as u64, &xs, 0.05);
        gradcheck(
            &format!("max_pool2d {xs:?} k {k:?} s {s:?} p {p:?}"),
            std::slice::from_ref(&x),
            |t| t[0].max_pool2d(k, s, p),
            |r| pool_ref(&r[0], k, s, p, true),
        );
        gradcheck(
            &format!("avg_pool2d {xs:?} k {k:?} s {s:?} p {p:?}"),
            &[x],
            |t| t[0].avg_pool2d(k, s, p),
            |r| pool_ref(&r[0], k, s, p, false),
        );
    }
}

// ------------------------------------------------------------------ 2. determinism

/// Gradient of `sum(f(leaf) * R)` for a fresh leaf holding `x`.
fn grad_bits(x: &RefTensor, r: &Tensor, f: &dyn Fn(&Tensor) -> wgrad::Result<Tensor>) -> (Vec<u32>, Vec<f32>) {
    let leaf = upload(x).requires_grad(true).unwrap();
    f(&leaf).unwrap().mul(r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = leaf.grad().expect("gradient");
    (bits(&g), vals(&g))
}

#[test]
fn repeated_index_gradients_are_deterministic() {
    let _l = lock();
    // Embedding: 3000 ids in 0..5, about 600 repeats per row.
    let (vocab, dim, n) = (5usize, 16usize, 3000usize);
    let ids = rand_ints(600, n, vocab);
    let ids_t = i32_tensor(&as_i32(&ids), &[n / 2, 2]);
    let w = r32(601, &[vocab, dim], -1.0, 1.0);
    let r = r32(602, &[n / 2, 2, dim], -1.0, 1.0);
    let r_t = upload(&r);
    let emb = |t: &Tensor| wgrad::embedding(&ids_t, t);
    let (first, g) = grad_bits(&w, &r_t, &emb);
    for run in 1..5 {
        assert_eq!(grad_bits(&w, &r_t, &emb).0, first, "embedding gradient bits differ in run {run}");
    }
    let mut want = RefTensor::zeros(&[vocab, dim]);
    for (e, &id) in ids.iter().enumerate() {
        for j in 0..dim {
            want.data[id * dim + j] += r.data[e * dim + j];
        }
    }
    assert_close_f32_shaped(&g, &[vocab, dim], &want, 1e-5, 1e-4, "embedding gradient vs f64 sum");

    // index_select along dim 1: 2000 picks of 4 columns.
    let cols = rand_ints(603, 2000, 4);
    let idx = u32_tensor(&as_u32(&cols), &[cols.len()]);
    let x = r32(604, &[3, 4], -1.0, 1.0);
    let r = r32(605, &[3, cols.len()], -1.0, 1.0);
    let r_t = upload(&r);
    let sel = |t: &Tensor| t.index_select(1, &idx);
    let (first, g) = grad_bits(&x, &r_t, &sel);
    for run in 1..5 {
        assert_eq!(grad_bits(&x, &r_t, &sel).0, first, "index_select gradient bits differ in run {run}");
    }
    let mut want = RefTensor::zeros(&[3, 4]);
    for row in 0..3 {
        for (e, &c) in cols.iter().enumerate() {
            want.data[row * 4 + c] += r.data[row * cols.len() + e];
        }
    }
    assert_close_f32_shaped(&g, &[3, 4], &want, 1e-5, 1e-4, "index_select gradient vs f64 sum");
}

// ------------------------------------------------------------------ 3. validation

/// Runs `f`, which must return an error without panicking.
fn expect_err<T>(what: &str, f: impl FnOnce() -> wgrad::Result<T>) -> Error {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => panic!("{what}: panicked instead of returning an error"),
        Ok(Ok(_)) => panic!("{what}: expected an error, got Ok"),
        Ok(Err(e)) => e,
    }
}

fn expect_invalid<T>(what: &str, needle: &str, f: impl FnOnce() -> wgrad::Result<T>) {
    match expect_err(what, f) {
        Error::InvalidArgument { message, .. } => {
            assert!(message.contains(needle), "{what}: message {message:?} does not mention {needle:?}")
        }
        e => panic!("{what}: expected InvalidArgument, got {e}"),
    }
}

fn expect_dtype<T>(what: &str, f: impl FnOnce() -> wgrad::Result<T>) {
    match expect_err(what, f) {
        Error::UnsupportedDType { .. } => {}
        e => panic!("{what}: expected UnsupportedDType, got {e}"),
    }
}

#[test]
fn out_of_range_and_malformed_indices_are_errors() {
    let _l = lock();
    let x = upload(&r32(700, &[3, 4], -1.0, 1.0)).requires_grad(true).unwrap();
    let w = upload(&r32(701, &[5, 2], -1.0, 1.0)).requires_grad(true).unwrap();

    // Out of range: negative, == size, > size, huge.
    let bad_rows: Vec<(&str, Tensor)> = vec![
        ("negative i32", i32_tensor(&[0, -1], &[2])),
        ("i32::MIN", i32_tensor(&[i32::MIN, 1], &[2])),
        ("i32 == size", i32_tensor(&[3, 0], &[2])),
        ("i32::MAX", i32_tensor(&[1, i32::MAX], &[2])),
        ("u32 == size", u32_tensor(&[0, 3], &[2])),
        ("u32::MAX", u32_tensor(&[u32::MAX, 0], &[2])),
        ("u32 2^31", u32_tensor(&[1 << 31, 0], &[2])),
    ];
    for (name, idx) in &bad_rows {
        expect_invalid(&format!("index_select dim 0 {name}"), "0..3", || x.index_select(0, idx));
        let idx2 = idx.reshape([1, 2]).unwrap();
        expect_invalid(&format!("gather dim 0 {name}"), "0..3", || x.gather(0, &idx2));
    }
    expect_invalid("index_select dim 1 i32 == 4", "0..4", || x.index_select(1, &i32_tensor(&[4], &[1])));
    expect_invalid("index_select dim -1 negative", "0..4", || x.index_select(-1, &i32_tensor(&[-4], &[1])));
    expect_invalid("gather dim 1 == 4", "0..4", || x.gather(1, &i32_tensor(&[0, 1, 4, 2, 3, 0], &[3, 2])));
    expect_invalid("gather dim 1 u32::MAX", "0..4", || x.gather(1, &u32_tensor(&[0, u32::MAX], &[1, 2])));
    expect_invalid("gather dim 1 negative", "0..4", || x.gather(-1, &i32_tensor(&[-1, 0], &[2, 1])));
    for (name, ids) in [
        ("negative", i32_tensor(&[0, 1, -1, 2], &[2, 2])),
        ("== vocabulary", i32_tensor(&[0, 5, 1, 2], &[2, 2])),
        ("u32::MAX", u32_tensor(&[0, 1, 2, u32::MAX], &[2, 2])),
        ("u32 == vocabulary", u32_tensor(&[5], &[1])),
    ] {
        expect_invalid(&format!("embedding {name}"), "0..5", || wgrad::embedding(&ids, &w));
    }

    // Float indices.
    let fidx = f32_tensor(&[0.0, 1.0], &[2]);
    expect_dtype("index_select f32 index", || x.index_select(0, &fidx));
    expect_dtype("gather f32 index", || x.gather(0, &fidx.reshape([1, 2]).unwrap()));
    expect_dtype("embedding f32 ids", || wgrad::embedding(&fidx, &w));

    // Wrong ranks and shapes.
    expect_err("index_select 2-D index", || x.index_select(0, &i32_tensor(&[0, 1], &[1, 2])));
    // A 0-d index selects one slice, keeping the dim (as in PyTorch).
    assert_eq!(x.index_select(0, &i32_tensor(&[0], &[])).unwrap().dims()[0], 1);
    expect_err("index_select dim 2 of rank 2", || x.index_select(2, &i32_tensor(&[0], &[1])));
    expect_err("index_select dim -3 of rank 2", || x.index_select(-3, &i32_tensor(&[0], &[1])));
    expect_err("gather index of lower rank", || x.gather(0, &i32_tensor(&[0, 1], &[2])));
    expect_err("gather index of higher rank", || x.gather(0, &i32_tensor(&[0, 1], &[1, 1, 2])));
    expect_err("gather index too large off dim", || x.gather(1, &i32_tensor(&[0; 16], &[4, 4])));
    expect_err("gather index too wide off dim", || x.gather(0, &i32_tensor(&[0; 5], &[1, 5])));
    expect_err("gather dim out of range", || x.gather(2, &i32_tensor(&[0, 1], &[1, 2])));
    expect_err("embedding 1-D weight", || wgrad::embedding(&i32_tensor(&[0], &[1]), &f32_tensor(&[1.0, 2.0], &[2])));
    expect_err("embedding 3-D weight", || {
        wgrad::embedding(&i32_tensor(&[0], &[1]), &f32_tensor(&[1.0; 8], &[2, 2, 2]))
    });

    // Everything still works after the errors.
    let idx = i32_tensor(&[2, 0, 2], &[3]);
    let y = x.index_select(0, &idx).unwrap();
    let xr = to_ref(&x);
    assert_close_f32_shaped(&vals(&y), y.dims(), &index_select_ref(&xr, 0, &[2, 0, 2]), 0.0, 0.0, "after errors");
    y.sum_all().unwrap().backward().unwrap();
    let g = vals(&x.grad().expect("gradient after errors"));
    assert_eq!(g, [vec![1.0f32; 4], vec![0.0; 4], vec![2.0; 4]].concat());
}

#[test]
fn bad_conv_and_pool_geometry_are_errors() {
    let _l = lock();
    let x = upload(&r32(800, &[1, 3, 5, 5], -1.0, 1.0));
    let w = |shape: &[usize]| upload(&r32(801, shape, -1.0, 1.0));
    let d = Conv2dOptions::default();

    expect_err("conv2d mismatched channels", || x.conv2d(&w(&[2, 4, 3, 3]), None, d));
    expect_invalid("conv2d kernel larger than input", "does not fit", || x.conv2d(&w(&[2, 3, 6, 6]), None, d));
    expect_invalid("conv2d kernel larger than padded input", "does not fit", || {
        x.conv2d(&w(&[2, 3, 8, 3]), None, opts([1, 1], [1, 1], [1, 1]))
    });
    expect_invalid("conv2d dilated kernel larger than input", "does not fit", || {
        x.conv2d(&w(&[2, 3, 3, 3]), None, opts([1, 1], [0, 0], [3, 3]))
    });
    expect_invalid("conv2d stride 0", "does not fit", || {
        x.conv2d(&w(&[2, 3, 3, 3]), None, opts([0, 1], [0, 0], [1, 1]))
    });
    expect_invalid("conv2d stride [1, 0]", "does not fit", || {
        x.conv2d(&w(&[2, 3, 3, 3]), None, opts([1, 0], [0, 0], [1, 1]))
    });
    expect_err("conv2d dilation 0", || x.conv2d(&w(&[2, 3, 3, 3]), None, opts([1, 1], [0, 0], [0, 1])));
    expect_err("conv2d 3-D weight", || x.conv2d(&w(&[2, 3, 3]), None, d));
    expect_err("conv2d 3-D input", || upload(&r32(802, &[3, 5, 5], -1.0, 1.0)).conv2d(&w(&[2, 3, 3, 3]), None, d));
    expect_err("conv2d bias of the wrong size", || x.conv2d(&w(&[2, 3, 3, 3]), Some(&w(&[3])), d));
    expect_err("conv2d i32 input", || {
        i32_tensor(&[1; 75], &[1, 3, 5, 5]).conv2d(&i32_tensor(&[1; 54], &[2, 3, 3, 3]), None, d)
    });
    // The padded input just fits: fine.
    let ok = x.conv2d(&w(&[2, 3, 7, 7]), None, opts([1, 1], [1, 1], [1, 1])).unwrap();
    assert_eq!(ok.dims(), &[1, 2, 1, 1]);

    for (name, pool) in [
        ("max_pool2d", Tensor::max_pool2d as fn(&Tensor, [usize; 2], [usize; 2], [usize; 2]) -> _),
        ("avg_pool2d", Tensor::avg_pool2d),
    ] {
        expect_invalid(&format!("{name} padding 2 > kernel 3 / 2"), "at most half", || {
            pool(&x, [3, 3], [1, 1], [2, 1])
        });
        expect_invalid(&format!("{name} padding 2 > kernel 2 / 2"), "at most half", || {
            pool(&x, [2, 2], [2, 2], [0, 2])
        });
        expect_invalid(&format!("{name} padding on kernel 1"), "at most half", || pool(&x, [1, 1], [1, 1], [1, 0]));
        expect_err(&format!("{name} stride 0"), || pool(&x, [2, 2], [0, 2], [0, 0]));
        expect_err(&format!("{name} kernel larger than input"), || pool(&x, [6, 2], [1, 1], [0, 0]));
        expect_err(&format!("{name} 3-D input"), || {
            pool(&upload(&r32(803, &[3, 5, 5], -1.0, 1.0)), [2, 2], [2, 2], [0, 0])
        });
        expect_err(&format!("{name} i32 input"), || pool(&i32_tensor(&[1; 75], &[1, 3, 5, 5]), [2, 2], [2, 2], [0, 0]));
        // Padding of exactly half the kernel is allowed.
        assert_eq!(pool(&x, [2, 2], [2, 2], [1, 1]).unwrap().dims(), &[1, 3, 3, 3], "{name} padding = kernel / 2");
    }
}

/// A zero-sized kernel is an error, not an arithmetic overflow.
#[test]
fn zero_sized_kernels_are_errors() {
    let _l = lock();
    let x = upload(&r32(850, &[1, 3, 5, 5], -1.0, 1.0));
    let d = Conv2dOptions::default();
    for kernel in [[0usize, 3], [3, 0], [0, 0]] {
        let w = || Tensor::from_slice::<f32>(&[], [2, 3, kernel[0], kernel[1]], &device());
        expect_err(&format!("conv2d kernel {kernel:?}"), || x.conv2d(&w()?, None, d));
        expect_err(&format!("max_pool2d kernel {kernel:?}"), || x.max_pool2d(kernel, [1, 1], [0, 0]));
        expect_err(&format!("avg_pool2d kernel {kernel:?}"), || x.avg_pool2d(kernel, [1, 1], [0, 0]));
    }
}

// ------------------------------------------------------------------ 4. optimizers

/// PyTorch's update rules in f64, with per-parameter step counts.
#[derive(Clone, Copy, Debug)]
enum Rule {
    Sgd { lr: f64, momentum: f64, wd: f64 },
    Adam { lr: f64, b1: f64, b2: f64, eps: f64, wd: f64, decoupled: bool },
}

struct RefOpt {
    rule: Rule,
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    t: Vec<i32>,
}

impl RefOpt {
    fn new(rule: Rule, params: &[Vec<f64>]) -> RefOpt {
        let zeros: Vec<Vec<f64>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
        RefOpt { rule, m: zeros.clone(), v: zeros, t: vec![0; params.len()] }
    }

    fn step(&mut self, params: &mut [Vec<f64>], grads: &[Option<Vec<f64>>]) {
        for (k, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            self.t[k] += 1;
            let t = self.t[k];
            for j in 0..p.len() {
                match self.rule {
                    Rule::Sgd { lr, momentum, wd } => {
                        let d = g[j] + wd * p[j];
                        let d = if momentum != 0.0 {
                            let b = if t == 1 { d } else { momentum * self.m[k][j] + d };
                            self.m[k][j] = b;
                            b
                        } else {
                            d
                        };
                        p[j] -= lr * d;
                    }
                    Rule::Adam { lr, b1, b2, eps, wd, decoupled } => {
                        let mut g = g[j];
                        if decoupled {
                            p[j] *= 1.0 - lr * wd;
                        } else {
                            g += wd * p[j];
                        }
                        let m = b1 * self.m[k][j] + (1.0 - b1) * g;
                        let v = b2 * self.v[k][j] + (1.0 - b2) * g * g;
                        self.m[k][j] = m;
                        self.v[k][j] = v;
                        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                        p[j] -= lr * (m / bc1) / ((v / bc2).sqrt() + eps);
                    }
                }
            }
        }
    }
}

fn make_opt(rule: Rule, params: &[Tensor]) -> Box<dyn Optimizer> {
    match rule {
        Rule::Sgd { lr, momentum, wd } => Box::new(Sgd::new(params, lr, momentum, wd).unwrap()),
        Rule::Adam { lr, b1, b2, eps, wd, decoupled: false } => {
            Box::new(Adam::with(params, lr, (b1, b2), eps, wd).unwrap())
        }
        Rule::Adam { lr, b1, b2, eps, wd, decoupled: true } => {
            Box::new(AdamW::with(params, lr, (b1, b2), eps, wd).unwrap())
        }
    }
}

fn assert_params(what: &str, got: &[Tensor], want: &[Vec<f64>]) {
    for (k, (p, w)) in got.iter().zip(want).enumerate() {
        let v = vals(p);
        assert_eq!(v.len(), w.len(), "{what}: param {k} length");
        for (j, (&a, &e)) in v.iter().zip(w).enumerate() {
            let a = f64::from(a);
            assert!((a - e).abs() <= 1e-5 * e.abs() + 1e-6, "{what}: param {k}[{j}] = {a}, reference {e}");
        }
    }
}

fn leaf_from(data: &[f64], shape: &[usize]) -> Tensor {
    upload(&RefTensor::new(data.to_vec(), shape)).requires_grad(true).unwrap()
}

/// Values away from zero with both signs, rounded to f32.
fn param_values(seed: u64, n: usize) -> Vec<f64> {
    let t = rand_tensor(seed, &[n], 0.5, 1.5);
    let s = rand_tensor(seed ^ 0x5555, &[n], -1.0, 1.0);
    let v: Vec<f64> = t.data.iter().zip(&s.data).map(|(&m, &s)| if s < 0.0 { -m } else { m }).collect();
    RefTensor::new(v, &[n]).to_f32().into_iter().map(f64::from).collect()
}

/// The coefficient of `sum(b)` in the loss at each step: it varies, so that Adam's normalised
/// update depends on the weight decay and the betas (with a constant gradient it is about ±lr
/// whatever they are).
const B_COEF: [f64; 4] = [3.0, -1.0, 2.0, 0.5];

/// sum(w²) + c sum(b): gradients 2w and c.
fn quad_loss(w: &Tensor, b: &Tensor, c: f64) -> Tensor {
    w.square().unwrap().sum_all().unwrap().add(b.sum_all().unwrap().mul(c).unwrap()).unwrap()
}

fn quad_grads(refs: &[Vec<f64>], c: f64) -> Vec<Option<Vec<f64>>> {
    vec![Some(refs[0].iter().map(|v| 2.0 * v).collect()), Some(vec![c; refs[1].len()])]
}

/// The reference parameters after each step of `quad_loss`.
fn quad_trajectory(rule: Rule, init: &[Vec<f64>]) -> Vec<Vec<Vec<f64>>> {
    let mut refs = init.to_vec();
    let mut opt = RefOpt::new(rule, &refs);
    B_COEF
        .iter()
        .map(|&c| {
            let grads = quad_grads(&refs, c);
            opt.step(&mut refs, &grads);
            refs.clone()
        })
        .collect()
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter().flatten().zip(b.iter().flatten()).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// The same rule with one hyperparameter changed: the test must tell each of them apart.
fn mutants(rule: Rule) -> Vec<(&'static str, Rule)> {
    let mut out = Vec::new();
    match rule {
        Rule::Sgd { lr, momentum, wd } => {
            out.push(("lr", Rule::Sgd { lr: lr * 1.01, momentum, wd }));
            if momentum != 0.0 {
                out.push(("momentum", Rule::Sgd { lr, momentum: 0.0, wd }));
            }
            if wd != 0.0 {
                out.push(("weight decay", Rule::Sgd { lr, momentum, wd: 0.0 }));
            }
        }
        Rule::Adam { lr, b1, b2, eps, wd, decoupled } => {
            out.push(("lr", Rule::Adam { lr: lr * 1.01, b1, b2, eps, wd, decoupled }));
            out.push(("beta1", Rule::Adam { lr, b1: 0.5, b2, eps, wd, decoupled }));
            out.push(("beta2", Rule::Adam { lr, b1, b2: 0.5, eps, wd, decoupled }));
            if wd != 0.0 {
                out.push(("weight decay", Rule::Adam { lr, b1, b2, eps, wd: 0.0, decoupled }));
                out.push(("decoupling", Rule::Adam { lr, b1, b2, eps, wd, decoupled: !decoupled }));
            }
        }
    }
    out
}

/// Builds an optimizer over the given parameters through the public constructors.
type MakeOpt = dyn Fn(&[Tensor]) -> wgrad::Result<Box<dyn Optimizer>>;

#[test]
fn optimizers_match_pytorch_formulas() {
    let _l = lock();
    let adam = |lr, (b1, b2), eps, wd| Rule::Adam { lr, b1, b2, eps, wd, decoupled: false };
    let adamw = |lr, (b1, b2), eps, wd| Rule::Adam { lr, b1, b2, eps, wd, decoupled: true };
    let cases: Vec<(&str, Rule, Box<MakeOpt>)> = vec![
        (
            "sgd",
            Rule::Sgd { lr: 0.1, momentum: 0.0, wd: 0.0 },
            Box::new(|p| Ok(Box::new(Sgd::new(p, 0.1, 0.0, 0.0)?) as Box<dyn Optimizer>)),
        ),
        (
            "sgd momentum 0.9 wd 0.01",
            Rule::Sgd { lr: 0.05, momentum: 0.9, wd: 0.01 },
            Box::new(|p| Ok(Box::new(Sgd::new(p, 0.05, 0.9, 0.01)?) as Box<dyn Optimizer>)),
        ),
        (
            "sgd wd 0.1",
            Rule::Sgd { lr: 0.05, momentum: 0.0, wd: 0.1 },
            Box::new(|p| Ok(Box::new(Sgd::new(p, 0.05, 0.0, 0.1)?) as Box<dyn Optimizer>)),
        ),
        (
            "Adam::new",
            adam(0.03, (0.9, 0.999), 1e-8, 0.0),
            Box::new(|p| Ok(Box::new(Adam::new(p, 0.03)?) as Box<dyn Optimizer>)),
        ),
        (
            "Adam::with wd 0.1",
            adam(0.02, (0.8, 0.99), 1e-6, 0.1),
            Box::new(|p| Ok(Box::new(Adam::with(p, 0.02, (0.8, 0.99), 1e-6, 0.1)?) as Box<dyn Optimizer>)),
        ),
        (
            "AdamW::new (wd 0.01)",
            adamw(0.03, (0.9, 0.999), 1e-8, 0.01),
            Box::new(|p| Ok(Box::new(AdamW::new(p, 0.03)?) as Box<dyn Optimizer>)),
        ),
        (
            "AdamW::with wd 0.1",
            adamw(0.05, (0.9, 0.95), 1e-8, 0.1),
            Box::new(|p| Ok(Box::new(AdamW::with(p, 0.05, (0.9, 0.95), 1e-8, 0.1)?) as Box<dyn Optimizer>)),
        ),
    ];
    for (name, rule, make) in &cases {
        let init = vec![param_values(900, 6), param_values(901, 4)];
        let want = quad_trajectory(*rule, &init);
        // The reference is sensitive to every hyperparameter, far beyond the tolerance.
        for (what, mutant) in mutants(*rule) {
            let d = max_diff(&quad_trajectory(mutant, &init)[3], &want[3]);
            assert!(d > 1e-4, "{name}: the test cannot tell a different {what} apart (max diff {d:e})");
        }
        let w = leaf_from(&init[0], &[2, 3]);
        let b = leaf_from(&init[1], &[4]);
        let mut opt = make(&[w.clone(), b.clone()]).unwrap();
        for (step, (&c, want)) in B_COEF.iter().zip(&want).enumerate() {
            opt.zero_grad();
            assert!(w.grad().is_none() && b.grad().is_none(), "{name}: zero_grad forgets the grads");
            quad_loss(&w, &b, c).backward().unwrap();
            opt.step().unwrap();
            assert_params(&format!("{name} step {}", step + 1), &[w.clone(), b.clone()], want);
            // The optimizer's own handles see the same values.
            assert_params(&format!("{name} step {} (opt.params())", step + 1), opt.params(), want);
        }
    }
}

/// PyTorch counts Adam's steps per parameter: a parameter that first receives a gradient at the
/// optimizer's third step gets the bias corrections of its own first step.
#[test]
fn adam_bias_correction_counts_steps_per_parameter() {
    let _l = lock();
    for decoupled in [false, true] {
        let rule = Rule::Adam { lr: 0.05, b1: 0.9, b2: 0.999, eps: 1e-8, wd: 0.01, decoupled };
        let mut refs = vec![param_values(950, 3), param_values(951, 2)];
        let w = leaf_from(&refs[0], &[3]);
        let b = leaf_from(&refs[1], &[2]);
        let mut opt = make_opt(rule, &[w.clone(), b.clone()]);
        let mut reference = RefOpt::new(rule, &refs);
        for step in 1..=4 {
            opt.zero_grad();
            let use_b = step >= 3;
            let mut loss = w.square().unwrap().sum_all().unwrap();
            if use_b {
                loss = loss.add(b.mul(3.0).unwrap().sum_all().unwrap()).unwrap();
            }
            loss.backward().unwrap();
            opt.step().unwrap();
            let grads = vec![Some(refs[0].iter().map(|v| 2.0 * v).collect()), use_b.then(|| vec![3.0; 2])];
            reference.step(&mut refs, &grads);
            assert_params(
                &format!("adam decoupled {decoupled}, b joins at step 3: step {step}"),
                &[w.clone(), b.clone()],
                &refs,
            );
        }
    }
}

#[test]
fn optimizer_skips_params_without_grad_and_updates_in_place() {
    let _l = lock();
    for rule in [
        Rule::Sgd { lr: 0.1, momentum: 0.9, wd: 0.01 },
        Rule::Adam { lr: 0.01, b1: 0.9, b2: 0.999, eps: 1e-8, wd: 0.01, decoupled: false },
        Rule::Adam { lr: 0.01, b1: 0.9, b2: 0.999, eps: 1e-8, wd: 0.01, decoupled: true },
    ] {
        let w = leaf_from(&param_values(960, 4), &[2, 2]);
        let frozen = leaf_from(&param_values(961, 3), &[3]);
        let frozen_bits = bits(&frozen);
        let w_before = vals(&w);
        let handle = w.clone();
        let detached = w.detach();
        let mut opt = make_opt(rule, &[w.clone(), frozen.clone()]);

        // No grads at all: a no-op.
        opt.step().unwrap();
        assert_eq!(vals(&w), w_before, "{rule:?}: step without grads changes nothing");
        assert_eq!(bits(&frozen), frozen_bits);

        w.square().unwrap().sum_all().unwrap().backward().unwrap();
        opt.step().unwrap();
        assert!(frozen.grad().is_none());
        assert_eq!(bits(&frozen), frozen_bits, "{rule:?}: a parameter without .grad is unchanged");
        let after = vals(&w);
        assert_ne!(after, w_before, "{rule:?}: w was updated");
        assert_eq!(vals(&handle), after, "{rule:?}: a cloned handle sees the update");
        assert_eq!(vals(&detached), after, "{rule:?}: a detached handle shares the data");
        assert_eq!(vals(&opt.params()[0]), after);
        // Still a leaf that requires grad, and usable in a new graph.
        assert!(w.is_leaf() && w.needs_grad());
        opt.zero_grad();
        w.sum_all().unwrap().backward().unwrap();
        assert_eq!(vals(&w.grad().unwrap()), vec![1.0; 4]);
    }
}

/// A `.grad` may share the parameter's storage (`p.set_grad(Some(p.detach()))`, PyTorch's
/// `p.grad = p.detach()`): the step computes `p - lr p`, or fails in `step()` itself; it must not
/// return Ok and leave a failure for the next, unrelated, call.
#[test]
fn optimizer_step_with_a_grad_sharing_the_parameter_storage() {
    let _l = lock();
    let p = leaf_from(&[1.0, -2.0], &[2]);
    p.set_grad(Some(p.detach())).unwrap();
    let mut opt = Sgd::new(std::slice::from_ref(&p), 0.5, 0.0, 0.0).unwrap();
    if opt.step().is_ok() {
        let after = p.to_vec::<f32>();
        assert!(matches!(&after, Ok(v) if v == &[0.5, -1.0]), "after step() returned Ok: {after:?}");
    }
    // The device is usable afterwards either way.
    assert_eq!(vals(&f32_tensor(&[1.0, 2.0], &[2]).mul(2.0).unwrap()), vec![2.0, 4.0]);
}

#[test]
fn optimizers_update_many_parameters() {
    let _l = lock();
    let shapes: [&[usize]; 11] =
        [&[1], &[3], &[2, 2], &[5], &[2, 3, 2], &[7], &[300], &[4, 4], &[1, 9], &[2, 2, 2, 2], &[513]];
    for rule in [
        Rule::Sgd { lr: 0.1, momentum: 0.0, wd: 0.0 },
        Rule::Sgd { lr: 0.05, momentum: 0.9, wd: 0.01 },
        Rule::Adam { lr: 0.01, b1: 0.9, b2: 0.999, eps: 1e-8, wd: 0.1, decoupled: false },
        Rule::Adam { lr: 0.01, b1: 0.9, b2: 0.999, eps: 1e-8, wd: 0.1, decoupled: true },
    ] {
        let mut refs: Vec<Vec<f64>> =
            shapes.iter().enumerate().map(|(k, s)| param_values(1000 + k as u64, shape_numel(s))).collect();
        let params: Vec<Tensor> = shapes.iter().zip(&refs).map(|(s, v)| leaf_from(v, s)).collect();
        let mut opt = make_opt(rule, &params);
        let mut reference = RefOpt::new(rule, &refs);
        for step in 1..=3 {
            opt.zero_grad();
            // loss = sum_k (c_k sum(p_k²) + d_k sum(p_k)): grads 2 c_k p_k + d_k, distinct per parameter.
            let coef = |k: usize| (0.1 * (k + 1) as f64, 0.3 * (k % 4) as f64 - 0.4 + 0.05 * step as f64);
            let mut loss = Tensor::zeros([], DType::F32, &device()).unwrap();
            for (k, p) in params.iter().enumerate() {
                let (c, d) = coef(k);
                let term = p.square().unwrap().sum_all().unwrap().mul(c).unwrap();
                loss = loss.add(term.add(p.sum_all().unwrap().mul(d).unwrap()).unwrap()).unwrap();
            }
            loss.backward().unwrap();
            opt.step().unwrap();
            let grads: Vec<Option<Vec<f64>>> = refs
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let (c, d) = coef(k);
                    Some(p.iter().map(|v| 2.0 * c * v + d).collect())
                })
                .collect();
            reference.step(&mut refs, &grads);
            assert_params(&format!("{rule:?} with {} params, step {step}", params.len()), &params, &refs);
        }
    }
}

#[test]
fn invalid_optimizer_parameters_are_errors() {
    let _l = lock();
    let dev = device();
    let good = leaf_from(&[1.0, 2.0], &[2]);
    let non_leaf = good.mul(2.0).unwrap();
    let plain = f32_tensor(&[1.0, 2.0], &[2]);
    let int = i32_tensor(&[1, 2], &[2]);
    let view = f32_tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).t().unwrap().requires_grad(true).unwrap();
    let cases: Vec<(&str, Vec<Tensor>)> = vec![
        ("no params", vec![]),
        ("non-leaf", vec![good.clone(), non_leaf]),
        ("no requires_grad", vec![plain]),
        ("i32", vec![int]),
        ("transposed view", vec![view]),
    ];
    for (name, params) in &cases {
        expect_err(&format!("Sgd {name}"), || Sgd::new(params, 0.1, 0.0, 0.0));
        expect_err(&format!("Sgd momentum {name}"), || Sgd::new(params, 0.1, 0.9, 0.0));
        expect_err(&format!("Adam {name}"), || Adam::new(params, 0.1));
        expect_err(&format!("AdamW {name}"), || AdamW::new(params, 0.1));
        expect_err(&format!("Adam::with {name}"), || Adam::with(params, 0.1, (0.9, 0.99), 1e-8, 0.0));
        expect_err(&format!("AdamW::with {name}"), || AdamW::with(params, 0.1, (0.9, 0.99), 1e-8, 0.1));
    }
    if dev.supports_f16() {
        let h = Tensor::zeros([2], DType::F16, &dev).unwrap().requires_grad(true).unwrap();
        expect_err("Sgd f16", || Sgd::new(&[h], 0.1, 0.0, 0.0));
    }
    assert!(Sgd::new(&[good], 0.1, 0.0, 0.0).is_ok());
}

#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let _l = lock();
    // One parameter with grad [3, 4].
    let p = leaf_from(&[0.0, 0.0], &[2]);
    p.set_grad(Some(f32_tensor(&[3.0, 4.0], &[2]))).unwrap();
    let norm = wgrad::clip_grad_norm(std::slice::from_ref(&p), 1.0).unwrap().expect("a norm");
    assert!((norm.to_scalar::<f32>().unwrap() - 5.0).abs() <= 1e-5, "norm {:?}", vals(&norm));
    assert_close_f32(&vals(&p.grad().unwrap()), &[0.6, 0.8], 0.0, 1e-5, "clipped to norm 1");

    // Two parameters with grads 3 and 4 from a backward, and one without a grad.
    let a = leaf_from(&[1.0], &[1]);
    let b = leaf_from(&[2.0], &[1]);
    let none = leaf_from(&[5.0], &[1]);
    a.mul(3.0).unwrap().add(b.mul(4.0).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    let params = [a.clone(), none.clone(), b.clone()];
    let norm = wgrad::clip_grad_norm(&params, 1.0).unwrap().expect("a norm");
    assert!((norm.to_scalar::<f32>().unwrap() - 5.0).abs() <= 1e-5);
    assert_close_f32(&vals(&a.grad().unwrap()), &[0.6], 0.0, 1e-5, "a clipped");
    assert_close_f32(&vals(&b.grad().unwrap()), &[0.8], 0.0, 1e-5, "b clipped");
    assert!(none.grad().is_none(), "a parameter without a grad keeps none");

    // max_norm above the norm: unchanged.
    p.set_grad(Some(f32_tensor(&[3.0, 4.0], &[2]))).unwrap();
    let norm = wgrad::clip_grad_norm(std::slice::from_ref(&p), 10.0).unwrap().expect("a norm");
    assert!((norm.to_scalar::<f32>().unwrap() - 5.0).abs() <= 1e-5);
    assert_eq!(vals(&p.grad().unwrap()), vec![3.0, 4.0], "no clipping below max_norm");

    // The clipped grads drive an optimizer step.
    p.set_grad(Some(f32_tensor(&[3.0, 4.0], &[2]))).unwrap();
    wgrad::clip_grad_norm(std::slice::from_ref(&p), 1.0).unwrap();
    Sgd::new(std::slice::from_ref(&p), 1.0, 0.0, 0.0).unwrap().step().unwrap();
    assert_close_f32(&vals(&p), &[-0.6, -0.8], 0.0, 1e-5, "step with clipped grads");

    // No grads: Ok(None).
    let fresh = [leaf_from(&[1.0], &[1]), leaf_from(&[1.0, 2.0], &[2])];
    assert!(wgrad::clip_grad_norm(&fresh, 1.0).unwrap().is_none());
    assert!(wgrad::clip_grad_norm(&[], 1.0).unwrap().is_none());
}

// ------------------------------------------------------------------ 5. layers and init

fn assert_trainable(what: &str, params: &[Tensor], expected: &[&Tensor]) {
    assert_eq!(params.len(), expected.len(), "{what}: number of parameters");
    for (i, (p, e)) in params.iter().zip(expected).enumerate() {
        assert!(p.is_leaf() && p.needs_grad(), "{what}: parameter {i} must be a leaf that requires grad");
        assert_eq!(p.dims(), e.dims(), "{what}: parameter {i} shape");
        assert_eq!(bits(p), bits(e), "{what}: parameter {i} values");
    }
}

fn assert_within(what: &str, t: &Tensor, bound: f64) {
    let v = vals(t);
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x as f64), h.max(x as f64)));
    assert!(lo >= -bound && hi <= bound, "{what}: values in [{lo}, {hi}], bound {bound}");
    if v.len() >= 200 {
        assert!(lo < -0.9 * bound && hi > 0.9 * bound, "{what}: values in [{lo}, {hi}] do not fill ±{bound}");
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.1 * bound, "{what}: mean {mean}");
    }
}

#[test]
fn linear_layer() {
    let _l = lock();
    let dev = device();
    let layer = Linear::new(4, 3, true, 7, &dev).unwrap();
    assert_eq!(layer.weight.dims(), &[3, 4]);
    assert_eq!(layer.bias.as_ref().unwrap().dims(), &[3]);
    assert_trainable("Linear", &layer.parameters(), &[&layer.weight, layer.bias.as_ref().unwrap()]);
    assert_within("Linear weight", &layer.weight, 0.5);
    assert_within("Linear bias", layer.bias.as_ref().unwrap(), 0.5);
    let x = r32(1100, &[2, 5, 4], -1.0, 1.0);
    let y = layer.forward(&upload(&x)).unwrap();
    let want = linear_ref(&x, &to_ref(&layer.weight), Some(&to_ref(layer.bias.as_ref().unwrap())));
    assert_close_f32_shaped(&vals(&y), y.dims(), &want, 1e-5, 1e-5, "Linear forward");
    // Same seed, same values; another seed, other values.
    let again = Linear::new(4, 3, true, 7, &dev).unwrap();
    assert_eq!(bits(&again.weight), bits(&layer.weight));
    assert_ne!(bits(&Linear::new(4, 3, true, 8, &dev).unwrap().weight), bits(&layer.weight));
    // The gradient reaches both parameters.
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(vals(&layer.bias.as_ref().unwrap().grad().unwrap()), vec![10.0; 3]);
    assert_eq!(layer.weight.grad().unwrap().dims(), &[3, 4]);

    // Without bias; a large layer fills its init bound.
    let nb = Linear::new(64, 50, false, 3, &dev).unwrap();
    assert!(nb.bias.is_none());
    assert_trainable("Linear without bias", &nb.parameters(), &[&nb.weight]);
    assert_within("Linear [50, 64] weight", &nb.weight, 1.0 / 8.0);
    let x = r32(1101, &[3, 64], -1.0, 1.0);
    let y = nb.forward(&upload(&x)).unwrap();
    let want = linear_ref(&x, &to_ref(&nb.weight), None);
    assert_close_f32_shaped(&vals(&y), y.dims(), &want, 1e-5, 1e-5, "Linear without bias forward");
}

#[test]
fn conv2d_layer() {
    let _l = lock();
    let dev = device();
    let o = opts([1, 2], [1, 1], [1, 1]);
    let layer = Conv2d::new(2, 3, [3, 2], o, true, 11, &dev).unwrap();
    assert_eq!(layer.weight.dims(), &[3, 2, 3, 2]);
    assert_eq!(layer.options, o);
    let bias = layer.bias.as_ref().unwrap();
    assert_trainable("Conv2d", &layer.parameters(), &[&layer.weight, bias]);
    let bound = 1.0 / 12f64.sqrt();
    assert_within("Conv2d weight", &layer.weight, bound);
    assert_within("Conv2d bias", bias, bound);
    let x = r32(1200, &[2, 2, 5, 4], -1.0, 1.0);
    let y = layer.forward(&upload(&x)).unwrap();
    let want = conv2d_ref(&x, &to_ref(&layer.weight), Some(&to_ref(bias)), o);
    assert_eq!(y.dims(), &[2, 3, 5, 3]);
    assert_close_f32_shaped(&vals(&y), y.dims(), &want, 1e-5, 1e-5, "Conv2d forward");
    assert_eq!(bits(&Conv2d::new(2, 3, [3, 2], o, true, 11, &dev).unwrap().weight), bits(&layer.weight));

    let nb = Conv2d::new(8, 16, [3, 3], Conv2dOptions::default(), false, 12, &dev).unwrap();
    assert!(nb.bias.is_none());
    assert_trainable("Conv2d without bias", &nb.parameters(), &[&nb.weight]);
    assert_within("Conv2d [16, 8, 3, 3] weight", &nb.weight, 1.0 / 72f64.sqrt());
}

#[test]
fn layer_norm_layer() {
    let _l = lock();
    let dev = device();
    let ln = LayerNorm::new(&[4], 1e-5, &dev).unwrap();
    assert_eq!(vals(&ln.weight), vec![1.0; 4]);
    assert_eq!(vals(&ln.bias), vec![0.0; 4]);
    assert_trainable("LayerNorm", &ln.parameters(), &[&ln.weight, &ln.bias]);
    let x = r32(1300, &[3, 4], -2.0, 2.0);
    let y = ln.forward(&upload(&x)).unwrap();
    let want = layer_norm_ref(&x, 1, &RefTensor::full(&[4], 1.0), &RefTensor::zeros(&[4]), 1e-5);
    assert_close_f32_shaped(&vals(&y), y.dims(), &want, 1e-4, 1e-5, "LayerNorm forward");

    // Over two trailing dims, with a learned scale and shift.
    let (w, b) = (r32(1301, &[2, 4], 0.5, 1.5), r32(1302, &[2, 4], -1.0, 1.0));
    let mut ln = LayerNorm::new(&[2, 4], 1e-3, &dev).unwrap();
    assert_eq!(ln.weight.dims(), &[2, 4]);
    ln.weight = upload(&w).requires_grad(true).unwrap();
    ln.bias = upload(&b).requires_grad(true).unwrap();
    let x = r32(1303, &[3, 2, 4], -2.0, 2.0);
    let y = ln.forward(&upload(&x)).unwrap();
    let want = layer_norm_ref(&x, 2, &w, &b, 1e-3);
    assert_close_f32_shaped(&vals(&y), y.dims(), &want, 1e-4, 1e-5, "LayerNorm [2, 4] forward");
    y.sum_all().unwrap().backward().unwrap();
    assert_close_f32(&vals(&ln.bias.grad().unwrap()), &[3.0; 8], 1e-6, 0.0, "LayerNorm bias grad");
}

#[test]
fn embedding_layer() {
    let _l = lock();
    let dev = device();
    let emb = Embedding::new(6, 4, 21, &dev).unwrap();
    assert_eq!(emb.weight.dims(), &[6, 4]);
    assert_trainable("Embedding", &emb.parameters(), &[&emb.weight]);
    let ids = [1usize, 5, 1, 0, 5, 5];
    let y = emb.forward(&i32_tensor(&as_i32(&ids), &[2, 3])).unwrap();
    let want = embedding_ref(&ids, &[2, 3], &to_ref(&emb.weight));
    assert_close_f32_shaped(&vals(&y), y.dims(), &want, 0.0, 0.0, "Embedding forward");
    assert_eq!(bits(&Embedding::new(6, 4, 21, &dev).unwrap().weight), bits(&emb.weight));
    assert_ne!(bits(&Embedding::new(6, 4, 22, &dev).unwrap().weight), bits(&emb.weight));
    // The gradient counts each id's uses.
    y.sum_all().unwrap().backward().unwrap();
    let g = vals(&emb.weight.grad().unwrap());
    let counts = [1.0f32, 2.0, 0.0, 0.0, 0.0, 3.0];
    assert_eq!(g, counts.iter().flat_map(|&c| [c; 4]).collect::<Vec<_>>());

    // N(0, 1) initialisation.
    let big = Embedding::new(100, 20, 5, &dev).unwrap();
    let v: Vec<f64> = vals(&big.weight).into_iter().map(f64::from).collect();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    assert!(mean.abs() < 0.1 && (std - 1.0).abs() < 0.1, "Embedding init mean {mean}, std {std}");
}

#[test]
fn initialisers_respect_bounds_and_seeds() {
    let _l = lock();
    let dev = device();
    let k = kaiming_uniform([50, 40], 40, 3, &dev).unwrap();
    assert_eq!(k.dims(), &[50, 40]);
    assert!(k.is_leaf() && k.needs_grad());
    assert_within("kaiming_uniform", &k, (6.0f64 / 40.0).sqrt());
    let x = xavier_uniform([30, 20], 20, 30, 4, &dev).unwrap();
    assert!(x.is_leaf() && x.needs_grad());
    assert_within("xavier_uniform", &x, (6.0f64 / 50.0).sqrt());
    let u = init_uniform([1000], 0.25, 5, &dev).unwrap();
    assert!(u.is_leaf() && u.needs_grad());
    assert_within("uniform", &u, 0.25);
    // Same seed, same values; different seeds, different values.
    assert_eq!(bits(&kaiming_uniform([50, 40], 40, 3, &dev).unwrap()), bits(&k));
    assert_eq!(bits(&xavier_uniform([30, 20], 20, 30, 4, &dev).unwrap()), bits(&x));
    assert_eq!(bits(&init_uniform([1000], 0.25, 5, &dev).unwrap()), bits(&u));
    assert_ne!(bits(&init_uniform([1000], 0.25, 6, &dev).unwrap()), bits(&u));
    // Kaiming and uniform with the same seed differ only by the bound.
    let scaled = init_uniform([50, 40], (6.0f64 / 40.0).sqrt(), 3, &dev).unwrap();
    assert_eq!(bits(&scaled), bits(&k));
}

// ------------------------------------------------------------------ 6. compiled backward

fn leaf(seed: u64, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    upload(&r32(seed, shape, lo, hi)).requires_grad(true).unwrap()
}

#[test]
fn compiled_backward_of_a_small_cnn_matches_eager() {
    let _l = lock();
    let leaves = [
        leaf(1400, &[2, 2, 6, 6], -1.0, 1.0), // x
        leaf(1401, &[3, 2, 3, 3], -0.5, 0.5), // conv weight
        leaf(1402, &[3], -0.1, 0.1),          // conv bias
        leaf(1403, &[4, 27], -0.3, 0.3),      // linear weight
        leaf(1404, &[4], -0.1, 0.1),          // linear bias
    ];
    let labels = i32_tensor(&[3, 1], &[2]);
    let o = opts([1, 1], [1, 1], [1, 1]);
    eager_vs_compiled("cnn", &leaves, |l| {
        let h = l[0].conv2d(&l[1], Some(&l[2]), o)?.relu()?.max_pool2d([2, 2], [2, 2], [0, 0])?;
        let h = h.reshape([2, 27])?;
        h.matmul(&l[3].t()?)?.add(&l[4])?.cross_entropy(&labels, ClassLoss::default())
    });
    // Strided, padded and dilated convolution into average pooling.
    let leaves = [leaf(1410, &[2, 2, 7, 6], -1.0, 1.0), leaf(1411, &[3, 2, 2, 3], -0.5, 0.5)];
    let r = upload(&r32(1412, &[2, 3, 2, 2], -1.0, 1.0));
    let o = opts([2, 1], [1, 1], [1, 2]);
    eager_vs_compiled("strided conv + avg_pool2d", &leaves, |l| {
        l[0].conv2d(&l[1], None, o)?.tanh()?.avg_pool2d([3, 3], [2, 2], [1, 1])?.mul(&r)?.sum_all()
    });
}

#[test]
fn compiled_backward_of_embedding_matches_eager() {
    let _l = lock();
    let w = [leaf(1500, &[5, 3], -1.0, 1.0)];
    let ids = i32_tensor(&[1, 4, 1, 1, 0, 4, 2, 1], &[2, 4]);
    let r = upload(&r32(1501, &[2, 4, 3], -1.0, 1.0));
    eager_vs_compiled("embedding", &w, |l| wgrad::embedding(&ids, &l[0])?.mul(&r)?.tanh()?.sum_all());
    // index_select and gather in one graph.
    let x = [leaf(1502, &[4, 3], -1.0, 1.0)];
    let idx = u32_tensor(&[3, 3, 0, 1, 3], &[5]);
    let gidx = i32_tensor(&[2, 2, 0, 1, 0, 2, 1, 1, 0, 2], &[5, 2]);
    eager_vs_compiled("index_select + gather", &x, |l| {
        let s = l[0].index_select(0, &idx)?;
        s.gather(1, &gidx)?.square()?.sum_all()?.add(&s.sum_all()?)
    });
}
