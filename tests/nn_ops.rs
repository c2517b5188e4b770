//! Neural-network ops and losses: softmax, log_softmax, logsumexp, softplus, layer_norm,
//! rms_norm, dropout, cross_entropy, nll_loss, mse_loss and binary_cross_entropy_with_logits.
//!
//! - Gradchecks (as in tests/gradcheck.rs): the forward against a float64 CPU reference, and
//!   the gradient of `sum(op(inputs) * R)` (a fixed random `R`) against central finite
//!   differences of that reference.
//! - Stability with logits of ±1e4 (forward and backward finite and matching the reference).
//! - Label validation (out of range, ignore_index, dtypes, shapes) and use after an error.
//! - Dropout statistics, determinism by seed and its gradient.
//! - The compiled backward (a `WgslCompiler` installed) agrees with the eager one.
//!
//! The compiler is process-global, so every test takes `LOCK` first: one test installing a
//! compiler would otherwise compile the backward of the tests running beside it.

mod common;
use common::compiled_check::eager_vs_compiled;
use common::gradcheck::*;

use std::sync::{Mutex, MutexGuard};

use common::reference::*;
use common::{device, upload};
use wgrad::{ClassLoss, DType, Error, Reduction, Tensor};

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------ harness

/// `dim` (possibly negative) as an axis of a rank-`rank` tensor.
fn axis(dim: isize, rank: usize) -> usize {
    if dim < 0 { (dim + rank as isize) as usize } else { dim as usize }
}

fn i32_labels(labels: &[i32]) -> Tensor {
    Tensor::from_slice(labels, [labels.len()], &device()).unwrap()
}

fn u32_labels(labels: &[u32]) -> Tensor {
    Tensor::from_slice(labels, [labels.len()], &device()).unwrap()
}

fn f32_tensor(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape.to_vec(), &device()).unwrap()
}

fn all_finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

// ------------------------------------------------------------------ f64 references

fn softplus_ref(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn logsumexp_ref(t: &RefTensor, axis: usize, keepdim: bool) -> RefTensor {
    let m = t.max(&[axis], true);
    let out = t.sub(&m).map(f64::exp).sum(&[axis], true).map(f64::ln).add(&m);
    if keepdim { out } else { out.squeeze(axis) }
}

/// Layer norm over the last `k` dims (biased variance).
fn layer_norm_ref(x: &RefTensor, k: usize, w: Option<&RefTensor>, b: Option<&RefTensor>, eps: f64) -> RefTensor {
    let axes: Vec<usize> = (x.ndim() - k..x.ndim()).collect();
    let centered = x.sub(&x.mean(&axes, true));
    let var = centered.map(|v| v * v).mean(&axes, true);
    let mut y = centered.mul(&var.map(|v| 1.0 / (v + eps).sqrt()));
    if let Some(w) = w {
        y = y.mul(w);
    }
    if let Some(b) = b {
        y = y.add(b);
    }
    y
}

/// RMS norm over the last `k` dims.
fn rms_norm_ref(x: &RefTensor, k: usize, w: Option<&RefTensor>, eps: f64) -> RefTensor {
    let axes: Vec<usize> = (x.ndim() - k..x.ndim()).collect();
    let ms = x.map(|v| v * v).mean(&axes, true);
    let y = x.mul(&ms.map(|v| 1.0 / (v + eps).sqrt()));
    match w {
        Some(w) => y.mul(w),
        None => y,
    }
}

fn reduce_ref(t: RefTensor, reduction: Reduction) -> RefTensor {
    match reduction {
        Reduction::Mean => RefTensor::scalar(t.sum_all() / t.numel() as f64),
        Reduction::Sum => RefTensor::scalar(t.sum_all()),
        Reduction::None => t,
    }
}

/// Negative log-likelihood of `labels` under log-probabilities `logp` [n, classes].
fn nll_ref(logp: &RefTensor, labels: &[i64], options: ClassLoss) -> RefTensor {
    let (n, classes) = (logp.shape[0], logp.shape[1]);
    assert_eq!(labels.len(), n);
    let mut per_sample = vec![0.0; n];
    let mut counted = 0.0;
    for (i, &l) in labels.iter().enumerate() {
        if options.ignore_index.map(i64::from) == Some(l) {
            continue;
        }
        assert!((0..classes as i64).contains(&l), "reference: label {l} out of range");
        per_sample[i] = -logp.at(&[i, l as usize]);
        counted += 1.0;
    }
    let per_sample = RefTensor::new(per_sample, &[n]);
    match options.reduction {
        Reduction::Mean => RefTensor::scalar(per_sample.sum_all() / counted),
        r => reduce_ref(per_sample, r),
    }
}

fn cross_entropy_ref(logits: &RefTensor, labels: &[i64], options: ClassLoss) -> RefTensor {
    nll_ref(&logits.log_softmax(1), labels, options)
}

fn mse_ref(a: &RefTensor, b: &RefTensor, reduction: Reduction) -> RefTensor {
    reduce_ref(a.zip(b, |x, y| (x - y) * (x - y)), reduction)
}

fn bce_ref(x: &RefTensor, y: &RefTensor, reduction: Reduction) -> RefTensor {
    reduce_ref(x.zip(y, |x, y| (1.0 - y) * x + softplus_ref(-x)), reduction)
}

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

// ------------------------------------------------------------------ 1. gradchecks

#[test]
fn softmax_and_log_softmax() {
    let _l = lock();
    let cases: [(&[usize], &[isize]); 2] = [(&[3, 5], &[0, 1, -1]), (&[2, 3, 4], &[0, 1, 2, -1, -2])];
    for (i, (shape, dims)) in cases.into_iter().enumerate() {
        let x = r32(100 + i as u64, shape, -3.0, 3.0);
        for &dim in dims {
            let a = axis(dim, shape.len());
            gradcheck(
                &format!("softmax {shape:?} dim {dim}"),
                std::slice::from_ref(&x),
                |t| t[0].softmax(dim),
                |r| r[0].softmax(a),
            );
            gradcheck(
                &format!("log_softmax {shape:?} dim {dim}"),
                std::slice::from_ref(&x),
                |t| t[0].log_softmax(dim),
                |r| r[0].log_softmax(a),
            );
        }
    }
    // A non-contiguous input.
    let x = r32(110, &[5, 3], -3.0, 3.0);
    gradcheck(
        "softmax of transposed",
        std::slice::from_ref(&x),
        |t| t[0].t()?.softmax(-1),
        |r| r[0].transpose(0, 1).softmax(1),
    );
    gradcheck("log_softmax of transposed", &[x], |t| t[0].t()?.log_softmax(0), |r| r[0].transpose(0, 1).log_softmax(0));
}

#[test]
fn logsumexp() {
    let _l = lock();
    let cases: [(&[usize], &[isize]); 2] = [(&[3, 5], &[0, 1, -1]), (&[2, 3, 4], &[0, 1, -1])];
    for (i, (shape, dims)) in cases.into_iter().enumerate() {
        let x = r32(200 + i as u64, shape, -3.0, 3.0);
        for &dim in dims {
            let a = axis(dim, shape.len());
            for keepdim in [false, true] {
                gradcheck(
                    &format!("logsumexp {shape:?} dim {dim} keepdim {keepdim}"),
                    std::slice::from_ref(&x),
                    |t| t[0].logsumexp(dim, keepdim),
                    |r| logsumexp_ref(&r[0], a, keepdim),
                );
            }
        }
    }
}

#[test]
fn softplus() {
    let _l = lock();
    let fixed = [-30.0f32, -20.0, -10.0, -1.0, -0.1, 0.0, 0.1, 1.0, 10.0, 20.0, 30.0, 88.0];
    let x = RefTensor::from_f32(&fixed, &[3, 4]);
    gradcheck("softplus incl. large |x|", &[x], |t| t[0].softplus(), |r| r[0].map(softplus_ref));
    let x = r32(300, &[2, 3, 4], -5.0, 5.0);
    gradcheck("softplus random", &[x], |t| t[0].softplus(), |r| r[0].map(softplus_ref));
    // Values at large |x|: finite, no overflow (absolute accuracy; relative accuracy for x << 0 is
    // checked by `softplus_relative_precision_for_negative_x`).
    let xs = [30.0f32, -30.0, 0.0, -100.0, 100.0, 1e4, -1e4];
    let v = f32_tensor(&xs, &[xs.len()]).softplus().unwrap().to_vec::<f32>().unwrap();
    let want: Vec<f64> = xs.iter().map(|&x| softplus_ref(f64::from(x))).collect();
    assert_close_f32(&v, &want, 1e-6, 1e-7, "softplus at large |x|");
    // The gradient sigmoid(x) at large |x|.
    let x = f32_tensor(&xs, &[xs.len()]).requires_grad(true).unwrap();
    x.softplus().unwrap().sum_all().unwrap().backward().unwrap();
    let g = x.grad().unwrap().to_vec::<f32>().unwrap();
    let want: Vec<f64> = xs.iter().map(|&x| sigmoid(f64::from(x))).collect();
    assert_close_f32(&g, &want, 1e-5, 1e-30, "softplus gradient at large |x|");
}

/// softplus(x) = log1p(e^x) keeps its relative precision for x << 0 (PyTorch: log1p(exp(x))
/// gives 9.36e-14 at -30); `log(1 + e^-|x|)` rounds 1 + e^-|x| to 1 in f32 for x < -16.6.
#[test]
fn softplus_relative_precision_for_negative_x() {
    let _l = lock();
    let xs = [-1.0f32, -3.0, -5.0, -8.0, -10.0, -12.0, -15.0, -17.0, -20.0, -30.0, -80.0];
    let v = f32_tensor(&xs, &[xs.len()]).softplus().unwrap().to_vec::<f32>().unwrap();
    let want: Vec<f64> = xs.iter().map(|&x| softplus_ref(f64::from(x))).collect();
    assert_close_f32(&v, &want, 1e-5, 0.0, "softplus relative precision for x << 0");
}

#[test]
fn layer_norm() {
    let eps = 1e-5;
    let _l = lock();
    // Over the last dim of [3, 5] and the last 1 and 2 dims of [2, 3, 4].
    let cases: [(&[usize], usize); 3] = [(&[3, 5], 1), (&[2, 3, 4], 1), (&[2, 3, 4], 2)];
    for (i, (shape, k)) in cases.into_iter().enumerate() {
        let s = i as u64;
        let norm = &shape[shape.len() - k..];
        let x = r32(400 + s, shape, -2.0, 2.0);
        let w = r32(410 + s, norm, 0.5, 1.5);
        let b = r32(420 + s, norm, -1.0, 1.0);
        gradcheck(
            &format!("layer_norm {shape:?} over {norm:?}"),
            std::slice::from_ref(&x),
            |t| t[0].layer_norm(norm, None, None, eps),
            |r| layer_norm_ref(&r[0], k, None, None, eps),
        );
        gradcheck(
            &format!("layer_norm {shape:?} over {norm:?} with weight and bias"),
            &[x.clone(), w.clone(), b.clone()],
            |t| t[0].layer_norm(norm, Some(&t[1]), Some(&t[2]), eps),
            |r| layer_norm_ref(&r[0], k, Some(&r[1]), Some(&r[2]), eps),
        );
        gradcheck(
            &format!("layer_norm {shape:?} over {norm:?} with weight"),
            &[x.clone(), w],
            |t| t[0].layer_norm(norm, Some(&t[1]), None, eps),
            |r| layer_norm_ref(&r[0], k, Some(&r[1]), None, eps),
        );
        gradcheck(
            &format!("layer_norm {shape:?} over {norm:?} with bias"),
            &[x, b],
            |t| t[0].layer_norm(norm, None, Some(&t[1]), eps),
            |r| layer_norm_ref(&r[0], k, None, Some(&r[1]), eps),
        );
    }
    // A larger eps matters (and is used).
    let x = r32(430, &[3, 4], -0.3, 0.3);
    gradcheck(
        "layer_norm eps 0.1",
        &[x],
        |t| t[0].layer_norm(&[4], None, None, 0.1),
        |r| layer_norm_ref(&r[0], 1, None, None, 0.1),
    );
    // normalized_shape must be the trailing dims.
    let x = upload(&r32(431, &[2, 3, 4], -1.0, 1.0));
    for bad in [&[3][..], &[2, 3], &[], &[1, 2, 3, 4]] {
        let err = x.layer_norm(bad, None, None, eps).expect_err("bad normalized_shape");
        assert!(matches!(err, Error::InvalidArgument { .. }), "layer_norm {bad:?}: {err}");
        let err = x.rms_norm(bad, None, eps).expect_err("bad normalized_shape");
        assert!(matches!(err, Error::InvalidArgument { .. }), "rms_norm {bad:?}: {err}");
    }
}

#[test]
fn rms_norm() {
    let eps = 1e-6;
    let _l = lock();
    let cases: [(&[usize], usize); 3] = [(&[3, 5], 1), (&[2, 3, 4], 1), (&[2, 3, 4], 2)];
    for (i, (shape, k)) in cases.into_iter().enumerate() {
        let s = i as u64;
        let norm = &shape[shape.len() - k..];
        let x = r32(500 + s, shape, -2.0, 2.0);
        let w = r32(510 + s, norm, 0.5, 1.5);
        gradcheck(
            &format!("rms_norm {shape:?} over {norm:?}"),
            std::slice::from_ref(&x),
            |t| t[0].rms_norm(norm, None, eps),
            |r| rms_norm_ref(&r[0], k, None, eps),
        );
        gradcheck(
            &format!("rms_norm {shape:?} over {norm:?} with weight"),
            &[x, w],
            |t| t[0].rms_norm(norm, Some(&t[1]), eps),
            |r| rms_norm_ref(&r[0], k, Some(&r[1]), eps),
        );
    }
}

#[test]
fn cross_entropy() {
    let _l = lock();
    let logits = r32(600, &[6, 5], -3.0, 3.0);
    let labels: [i32; 6] = [0, 4, 2, 2, 1, 3];
    let wide: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    for reduction in REDUCTIONS {
        let options = ClassLoss { reduction, ignore_index: None, ..Default::default() };
        let lt = i32_labels(&labels);
        gradcheck(
            &format!("cross_entropy {reduction:?}"),
            std::slice::from_ref(&logits),
            |t| t[0].cross_entropy(&lt, options),
            |r| cross_entropy_ref(&r[0], &wide, options),
        );
        // The same with u32 labels.
        let lu = u32_labels(&labels.map(|l| l as u32));
        gradcheck(
            &format!("cross_entropy {reduction:?} u32 labels"),
            std::slice::from_ref(&logits),
            |t| t[0].cross_entropy(&lu, options),
            |r| cross_entropy_ref(&r[0], &wide, options),
        );
    }
    // ignore_index outside the class range (PyTorch's -100), and inside it.
    let ignore_cases: [([i32; 6], i32); 2] = [([-100, 4, 2, -100, 1, 3], -100), ([0, 4, 2, 2, 1, 2], 2)];
    for (labels, ignore) in ignore_cases {
        let wide: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
        for reduction in REDUCTIONS {
            let options = ClassLoss { reduction, ignore_index: Some(ignore), ..Default::default() };
            let lt = i32_labels(&labels);
            gradcheck(
                &format!("cross_entropy {reduction:?} ignore_index {ignore}"),
                std::slice::from_ref(&logits),
                |t| t[0].cross_entropy(&lt, options),
                |r| cross_entropy_ref(&r[0], &wide, options),
            );
        }
    }
    // An ignore_index that no label uses changes nothing.
    let options = ClassLoss { reduction: Reduction::Mean, ignore_index: Some(-1), ..Default::default() };
    let lt = i32_labels(&labels);
    gradcheck(
        "cross_entropy unused ignore_index",
        &[logits],
        |t| t[0].cross_entropy(&lt, options),
        |r| cross_entropy_ref(&r[0], &wide, ClassLoss::default()),
    );
}

#[test]
fn nll_loss() {
    let _l = lock();
    let logp = r32(700, &[5, 4], -3.0, 3.0).log_softmax(1);
    let logp = RefTensor::from_f32(&logp.to_f32(), &logp.shape);
    let labels: [u32; 5] = [3, 0, 1, 3, 2];
    let wide: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    for reduction in REDUCTIONS {
        for ignore_index in [None, Some(3)] {
            let options = ClassLoss { reduction, ignore_index, ..Default::default() };
            let lu = u32_labels(&labels);
            gradcheck(
                &format!("nll_loss {reduction:?} ignore {ignore_index:?}"),
                std::slice::from_ref(&logp),
                |t| t[0].nll_loss(&lu, options),
                |r| nll_ref(&r[0], &wide, options),
            );
        }
    }
    // nll_loss(log_softmax(x)) is cross_entropy(x), with the gradient through log_softmax.
    let x = r32(701, &[5, 4], -3.0, 3.0);
    let lt = i32_labels(&labels.map(|l| l as i32));
    gradcheck(
        "nll_loss of log_softmax",
        &[x],
        |t| t[0].log_softmax(1)?.nll_loss(&lt, ClassLoss::default()),
        |r| cross_entropy_ref(&r[0], &wide, ClassLoss::default()),
    );
}

#[test]
fn mse_loss() {
    let _l = lock();
    let a = r32(800, &[3, 4], -2.0, 2.0);
    let b = r32(801, &[3, 4], -2.0, 2.0);
    for reduction in REDUCTIONS {
        gradcheck(
            &format!("mse_loss {reduction:?}"),
            &[a.clone(), b.clone()],
            |t| t[0].mse_loss(&t[1], reduction),
            |r| mse_ref(&r[0], &r[1], reduction),
        );
    }
    let a = r32(802, &[2, 3, 2], -2.0, 2.0);
    let b = r32(803, &[2, 3, 2], -2.0, 2.0);
    gradcheck(
        "mse_loss rank 3",
        &[a, b],
        |t| t[0].mse_loss(&t[1], Reduction::Mean),
        |r| mse_ref(&r[0], &r[1], Reduction::Mean),
    );
}

#[test]
fn binary_cross_entropy_with_logits() {
    let _l = lock();
    // Logits include exact zeros and large magnitudes; targets in [0, 1] including both ends.
    let mut xv = r32(900, &[3, 4], -4.0, 4.0).to_f32();
    xv[0] = 0.0;
    xv[5] = 0.0;
    xv[7] = 12.0;
    xv[10] = -12.0;
    let x = RefTensor::from_f32(&xv, &[3, 4]);
    let mut yv = r32(901, &[3, 4], 0.0, 1.0).to_f32();
    yv[1] = 0.0;
    yv[2] = 1.0;
    yv[5] = 1.0;
    let y = RefTensor::from_f32(&yv, &[3, 4]);
    let yt = upload(&y);
    for reduction in REDUCTIONS {
        gradcheck(
            &format!("bce_with_logits {reduction:?}"),
            std::slice::from_ref(&x),
            |t| t[0].binary_cross_entropy_with_logits(&yt, reduction),
            |r| bce_ref(&r[0], &y, reduction),
        );
    }
    // The gradient w.r.t. the target (-x / n for the mean) too.
    gradcheck(
        "bce_with_logits d/d target",
        &[x, y],
        |t| t[0].binary_cross_entropy_with_logits(&t[1], Reduction::Mean),
        |r| bce_ref(&r[0], &r[1], Reduction::Mean),
    );

    // At logits exactly 0 the gradient is sigmoid(0) - y = 0.5 - y.
    let targets = [0.0f32, 0.25, 0.5, 0.75, 1.0, 0.3];
    let n = targets.len();
    for (reduction, scale) in [(Reduction::Sum, 1.0), (Reduction::Mean, 1.0 / n as f64), (Reduction::None, 1.0)] {
        let x = f32_tensor(&[0.0; 6], &[n]).requires_grad(true).unwrap();
        let loss = x.binary_cross_entropy_with_logits(&f32_tensor(&targets, &[n]), reduction).unwrap();
        loss.sum_all().unwrap().backward().unwrap();
        let g = x.grad().unwrap().to_vec::<f32>().unwrap();
        let want: Vec<f64> = targets.iter().map(|&y| (0.5 - f64::from(y)) * scale).collect();
        assert_close_f32(&g, &want, 1e-6, 1e-7, &format!("bce gradient at logits 0 ({reduction:?})"));
        // The loss at 0 is ln 2 per element whatever the target.
        let v = loss.to_vec::<f32>().unwrap();
        let per = std::f64::consts::LN_2;
        let want = match reduction {
            Reduction::Sum => vec![per * n as f64],
            Reduction::Mean => vec![per],
            Reduction::None => vec![per; n],
        };
        assert_close_f32(&v, &want, 1e-6, 0.0, &format!("bce at logits 0 ({reduction:?})"));
    }
}

// ------------------------------------------------------------------ 2. stability

const EXTREME: [f32; 6] = [1e4, -1e4, 0.0, -1e4, 1e4, 1e4];

#[test]
fn extreme_logits_stay_finite() {
    let _l = lock();
    let x = RefTensor::from_f32(&EXTREME, &[2, 3]);

    // Forward + backward through the gradcheck harness (values vs the f64 reference).
    for dim in [0isize, 1, -1] {
        let a = axis(dim, 2);
        gradcheck(
            &format!("softmax ±1e4 dim {dim}"),
            std::slice::from_ref(&x),
            |t| t[0].softmax(dim),
            |r| r[0].softmax(a),
        );
        gradcheck(
            &format!("log_softmax ±1e4 dim {dim}"),
            std::slice::from_ref(&x),
            |t| t[0].log_softmax(dim),
            |r| r[0].log_softmax(a),
        );
        for keepdim in [false, true] {
            gradcheck(
                &format!("logsumexp ±1e4 dim {dim} keepdim {keepdim}"),
                std::slice::from_ref(&x),
                |t| t[0].logsumexp(dim, keepdim),
                |r| logsumexp_ref(&r[0], a, keepdim),
            );
        }
    }
    let labels = i32_labels(&[0, 1]);
    for reduction in REDUCTIONS {
        let options = ClassLoss { reduction, ignore_index: None, ..Default::default() };
        gradcheck(
            &format!("cross_entropy ±1e4 {reduction:?}"),
            std::slice::from_ref(&x),
            |t| t[0].cross_entropy(&labels, options),
            |r| cross_entropy_ref(&r[0], &[0, 1], options),
        );
    }

    // Explicit values and finiteness, forward and backward.
    type Op = fn(&Tensor, &Tensor) -> wgrad::Result<Tensor>;
    let ops: [(&str, Op); 5] = [
        ("softmax", |x, _| x.softmax(1)),
        ("log_softmax", |x, _| x.log_softmax(1)),
        ("logsumexp", |x, _| x.logsumexp(1, false)),
        ("cross_entropy none", |x, l| {
            x.cross_entropy(l, ClassLoss { reduction: Reduction::None, ignore_index: None, ..Default::default() })
        }),
        ("cross_entropy mean", |x, l| x.cross_entropy(l, ClassLoss::default())),
    ];
    let ln2 = std::f64::consts::LN_2;
    let expected: [Vec<f64>; 5] = [
        vec![1.0, 0.0, 0.0, 0.0, 0.5, 0.5],
        vec![0.0, -2e4, -1e4, -2e4 - ln2, -ln2, -ln2],
        vec![1e4, 1e4 + ln2],
        vec![0.0, ln2],
        vec![ln2 / 2.0],
    ];
    for ((name, op), want) in ops.into_iter().zip(expected) {
        let xt = f32_tensor(&EXTREME, &[2, 3]).requires_grad(true).unwrap();
        let out = op(&xt, &labels).unwrap();
        let v = out.to_vec::<f32>().unwrap();
        assert!(all_finite(&v), "{name} of ±1e4: non-finite forward {v:?}");
        assert_close_f32(&v, &want, 1e-6, 1e-6, &format!("{name} of ±1e4"));
        out.sum_all().unwrap().backward().unwrap();
        let g = xt.grad().unwrap().to_vec::<f32>().unwrap();
        assert!(all_finite(&g), "{name} of ±1e4: non-finite gradient {g:?}");
    }
    // Cross-entropy gradient is softmax - onehot (over n for the mean).
    let xt = f32_tensor(&EXTREME, &[2, 3]).requires_grad(true).unwrap();
    xt.cross_entropy(&labels, ClassLoss { reduction: Reduction::Sum, ignore_index: None, ..Default::default() })
        .unwrap()
        .backward()
        .unwrap();
    let g = xt.grad().unwrap().to_vec::<f32>().unwrap();
    assert_close_f32(&g, &[0.0, 0.0, 0.0, 0.0, -0.5, 0.5], 1e-6, 1e-6, "cross_entropy gradient at ±1e4");

    // BCE with logits ±1e4: finite, and exact where the target agrees or disagrees.
    let xv = [1e4f32, -1e4, 1e4, -1e4, 0.0, 1e4];
    let yv = [1.0f32, 0.0, 0.0, 1.0, 0.5, 0.5];
    let xr = RefTensor::from_f32(&xv, &[6]);
    let yr = RefTensor::from_f32(&yv, &[6]);
    let xt = f32_tensor(&xv, &[6]).requires_grad(true).unwrap();
    let out = xt.binary_cross_entropy_with_logits(&f32_tensor(&yv, &[6]), Reduction::None).unwrap();
    let v = out.to_vec::<f32>().unwrap();
    assert!(all_finite(&v), "bce of ±1e4: non-finite forward {v:?}");
    assert_close_f32(&v, &bce_ref(&xr, &yr, Reduction::None).data, 1e-6, 1e-6, "bce of ±1e4");
    out.sum_all().unwrap().backward().unwrap();
    let g = xt.grad().unwrap().to_vec::<f32>().unwrap();
    assert!(all_finite(&g), "bce of ±1e4: non-finite gradient {g:?}");
    let want: Vec<f64> = xv.iter().zip(&yv).map(|(&x, &y)| sigmoid(f64::from(x)) - f64::from(y)).collect();
    assert_close_f32(&g, &want, 1e-6, 1e-6, "bce gradient at ±1e4");
    gradcheck(
        "bce ±1e4 mean",
        &[xr],
        |t| t[0].binary_cross_entropy_with_logits(&upload(&yr), Reduction::Mean),
        |r| bce_ref(&r[0], &yr, Reduction::Mean),
    );
}

// ------------------------------------------------------------------ 3. label errors

fn expect_invalid(result: wgrad::Result<Tensor>, what: &str, needle: &str) {
    match result {
        Err(Error::InvalidArgument { message, .. }) => {
            assert!(message.contains(needle), "{what}: message {message:?} does not mention {needle:?}")
        }
        Err(e) => panic!("{what}: expected InvalidArgument, got {e}"),
        Ok(t) => panic!("{what}: expected an error, got a tensor {:?}", t.to_vec::<f32>()),
    }
}

#[test]
fn out_of_range_labels_are_errors() {
    let _l = lock();
    let logits = upload(&r32(1000, &[3, 4], -1.0, 1.0)).requires_grad(true).unwrap();
    let logp = logits.log_softmax(1).unwrap();
    let cases: Vec<(&str, Tensor)> = vec![
        ("negative i32", i32_labels(&[0, -1, 2])),
        ("i32 == classes", i32_labels(&[0, 4, 2])),
        ("i32 > classes", i32_labels(&[7, 1, 2])),
        ("i32::MAX", i32_labels(&[0, i32::MAX, 2])),
        ("i32::MIN", i32_labels(&[i32::MIN, 1, 2])),
        ("u32 == classes", u32_labels(&[0, 1, 4])),
        ("u32 too large", u32_labels(&[0, u32::MAX, 2])),
        ("u32 2^31", u32_labels(&[1 << 31, 1, 2])),
    ];
    for (name, labels) in &cases {
        for reduction in REDUCTIONS {
            let options = ClassLoss { reduction, ignore_index: None, ..Default::default() };
            expect_invalid(logits.cross_entropy(labels, options), &format!("cross_entropy {name}"), "0..4");
            expect_invalid(logp.nll_loss(labels, options), &format!("nll_loss {name}"), "0..4");
        }
        // An ignore_index that the bad label does not equal does not excuse it.
        let options = ClassLoss { reduction: Reduction::Mean, ignore_index: Some(-100), ..Default::default() };
        expect_invalid(logits.cross_entropy(labels, options), &format!("cross_entropy {name} (ignore -100)"), "0..4");
    }

    // Still usable after the errors: labels readable, loss and backward fine.
    let labels = i32_labels(&[3, 0, 1]);
    assert_eq!(cases[1].1.to_vec::<i32>().unwrap(), vec![0, 4, 2]);
    let loss = logits.cross_entropy(&labels, ClassLoss::default()).unwrap();
    let logits_ref = RefTensor::from_f32(&logits.to_vec::<f32>().unwrap(), &[3, 4]);
    let want = cross_entropy_ref(&logits_ref, &[3, 0, 1], ClassLoss::default());
    assert_close_f32(&loss.to_vec::<f32>().unwrap(), &want.data, 1e-5, 1e-6, "cross_entropy after errors");
    loss.backward().unwrap();
    let g = logits.grad().expect("gradient after errors").to_vec::<f32>().unwrap();
    assert!(all_finite(&g) && g.iter().any(|&v| v != 0.0), "gradient after errors: {g:?}");
}

/// A label is ignored only if it equals `ignore_index` exactly: labels and the ignore index are
/// integers, and must not be compared after rounding to f32 (2^24 and 2^24 + 1 both become 2^24).
#[test]
fn ignore_index_is_compared_exactly() {
    let _l = lock();
    let logits = upload(&r32(1050, &[3, 4], -1.0, 1.0));
    let logp = logits.log_softmax(1).unwrap();
    let cases =
        [(1 << 24, (1 << 24) + 1), (-(1 << 24) - 1, -(1 << 24)), (i32::MAX - 1, i32::MAX), (1 << 30, (1 << 30) + 1)];
    let mut accepted = Vec::new();
    for (label, ignore) in cases {
        let labels = i32_labels(&[0, label, 2]);
        let options = ClassLoss { reduction: Reduction::Mean, ignore_index: Some(ignore), ..Default::default() };
        let results =
            [("cross_entropy", logits.cross_entropy(&labels, options)), ("nll_loss", logp.nll_loss(&labels, options))];
        for (op, result) in results {
            match result {
                Err(Error::InvalidArgument { message, .. }) => assert!(message.contains("0..4"), "{message}"),
                Err(e) => panic!("{op} label {label} ignore_index {ignore}: expected InvalidArgument, got {e}"),
                Ok(t) => accepted.push(format!(
                    "{op}: label {label} (out of range) with ignore_index {ignore} was accepted as ignored: {:?}",
                    t.to_vec::<f32>().unwrap()
                )),
            }
        }
    }
    assert!(accepted.is_empty(), "{}", accepted.join("\n"));
    // u32 labels near 2^32 against a negative ignore_index are out of range as well.
    let options = ClassLoss { reduction: Reduction::Sum, ignore_index: Some(-1), ..Default::default() };
    expect_invalid(logits.cross_entropy(&u32_labels(&[0, u32::MAX, 1]), options), "u32::MAX, ignore -1", "0..4");
}

#[test]
fn ignore_index_outside_the_range_is_accepted() {
    let _l = lock();
    let logits = r32(1100, &[4, 3], -2.0, 2.0);
    let lt = upload(&logits);
    for (labels, ignore) in [([-100, 2, -100, 0], -100), ([5, 2, 1, 5], 5), ([3, 3, 0, 1], 3), ([-1, 0, 1, 2], -1)] {
        let wide: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
        for reduction in REDUCTIONS {
            let options = ClassLoss { reduction, ignore_index: Some(ignore), ..Default::default() };
            let got = lt
                .cross_entropy(&i32_labels(&labels), options)
                .unwrap_or_else(|e| panic!("labels {labels:?} ignore {ignore}: {e}"));
            let want = cross_entropy_ref(&logits, &wide, options);
            assert_close_f32_shaped(
                &got.to_vec::<f32>().unwrap(),
                got.dims(),
                &want,
                1e-5,
                1e-6,
                &format!("cross_entropy labels {labels:?} ignore {ignore} {reduction:?}"),
            );
        }
    }
    // u32 labels with an ignore index beyond the classes.
    let options = ClassLoss { reduction: Reduction::Sum, ignore_index: Some(7), ..Default::default() };
    let got = lt.cross_entropy(&u32_labels(&[7, 1, 7, 2]), options).unwrap().to_vec::<f32>().unwrap();
    let want = cross_entropy_ref(&logits, &[7, 1, 7, 2], options);
    assert_close_f32(&got, &want.data, 1e-5, 1e-6, "u32 labels with ignore_index 7");
}

#[test]
fn label_shape_and_dtype_errors() {
    let _l = lock();
    let logits = upload(&r32(1200, &[3, 4], -1.0, 1.0)).requires_grad(true).unwrap();
    let options = ClassLoss::default();
    let f32_labels = f32_tensor(&[0.0, 1.0, 2.0], &[3]);
    let cases: Vec<(&str, Tensor, Tensor)> = vec![
        ("f32 labels", logits.clone(), f32_labels.clone()),
        ("labels too short", logits.clone(), i32_labels(&[0, 1])),
        ("labels too long", logits.clone(), i32_labels(&[0, 1, 2, 3])),
        ("labels 2-d", logits.clone(), Tensor::from_slice(&[0i32, 1, 2], [3, 1], &device()).unwrap()),
        ("labels 0-d", logits.clone(), Tensor::from_slice(&[1i32], Vec::<usize>::new(), &device()).unwrap()),
        ("logits 1-d", logits.flatten_all().unwrap(), i32_labels(&[0, 1, 2])),
        ("logits 3-d", logits.reshape([3, 2, 2]).unwrap(), i32_labels(&[0, 1, 2])),
    ];
    for (name, x, labels) in &cases {
        assert!(x.cross_entropy(labels, options).is_err(), "cross_entropy {name}: expected an error");
        assert!(x.nll_loss(labels, options).is_err(), "nll_loss {name}: expected an error");
    }
    // The dtype error says what to pass.
    match logits.cross_entropy(&f32_labels, options) {
        Err(Error::UnsupportedDType { dtype: DType::F32, .. }) => {}
        other => panic!("f32 labels: expected UnsupportedDType(F32), got {:?}", other.map(|t| t.dims().to_vec())),
    }
    // Integer scores are rejected, not silently converted.
    let int_scores = Tensor::from_slice(&[1i32, 2, 3, 4, 5, 6], [2, 3], &device()).unwrap();
    assert!(int_scores.cross_entropy(&i32_labels(&[0, 1]), options).is_err());
    assert!(int_scores.softmax(1).is_err());
    assert!(int_scores.log_softmax(1).is_err());
    assert!(int_scores.logsumexp(1, false).is_err());
    // Mismatched shapes for the elementwise losses (no broadcasting).
    let a = upload(&r32(1201, &[3, 4], -1.0, 1.0));
    for other in [upload(&r32(1202, &[4], 0.0, 1.0)), upload(&r32(1203, &[4, 3], 0.0, 1.0))] {
        for reduction in REDUCTIONS {
            assert!(matches!(a.mse_loss(&other, reduction), Err(Error::IncompatibleShapes { .. })), "mse {other:?}");
            assert!(
                matches!(a.binary_cross_entropy_with_logits(&other, reduction), Err(Error::IncompatibleShapes { .. })),
                "bce {other:?}"
            );
        }
    }
    // Bad dims for softmax-style ops.
    assert!(a.softmax(2).is_err() && a.log_softmax(-3).is_err() && a.logsumexp(5, true).is_err());

    // Everything is still usable.
    let labels = i32_labels(&[1, 2, 3]);
    let loss = logits.cross_entropy(&labels, options).unwrap();
    loss.backward().unwrap();
    assert!(all_finite(&logits.grad().unwrap().to_vec::<f32>().unwrap()));
    assert_eq!(f32_labels.to_vec::<f32>().unwrap(), vec![0.0, 1.0, 2.0]);
    assert!(all_finite(&a.mse_loss(&a.mul(2.0).unwrap(), Reduction::Sum).unwrap().to_vec::<f32>().unwrap()));
}

// ------------------------------------------------------------------ 4. dropout

#[test]
fn dropout_identity_cases() {
    let _l = lock();
    let x = r32(1300, &[4, 5], -2.0, 2.0);
    let xv = x.to_f32();
    let xt = upload(&x);
    for (p, training) in [(0.5, false), (0.0, true), (0.0, false), (1.0, false), (0.3, false)] {
        let y = xt.dropout(p, 7, training).unwrap();
        assert_eq!(y.dims(), &[4, 5]);
        assert_eq!(y.to_vec::<f32>().unwrap(), xv, "dropout p {p} training {training} is the identity");
    }
    // p = 1 drops everything; the gradient is zero too.
    let leaf = upload(&x).requires_grad(true).unwrap();
    let y = leaf.dropout(1.0, 7, true).unwrap();
    assert!(y.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0), "p = 1 zeroes everything");
    y.sum_all().unwrap().backward().unwrap();
    assert!(leaf.grad().unwrap().to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0));
    // Identity gradient when not training.
    let leaf = upload(&x).requires_grad(true).unwrap();
    leaf.dropout(0.4, 7, false).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(leaf.grad().unwrap().to_vec::<f32>().unwrap().iter().all(|&v| v == 1.0));
    // p outside [0, 1] is an error, training or not.
    for p in [-0.1, 1.1, -1e-9, f64::NAN, f64::INFINITY] {
        for training in [true, false] {
            match xt.dropout(p, 1, training) {
                Err(Error::InvalidArgument { .. }) => {}
                other => panic!("dropout p {p}: expected InvalidArgument, got {:?}", other.map(|t| t.dims().to_vec())),
            }
        }
    }
}

#[test]
fn dropout_statistics_seed_and_gradient() {
    let _l = lock();
    let p = 0.3;
    let n = 100_000;
    let x = r32(1400, &[n / 100, 100], 0.5, 1.5);
    let xv = x.to_f32();
    let leaf = upload(&x).requires_grad(true).unwrap();
    let y = leaf.dropout(p, 42, true).unwrap();
    let yv = y.to_vec::<f32>().unwrap();
    let mut kept = 0usize;
    for (i, (&a, &b)) in xv.iter().zip(&yv).enumerate() {
        if b != 0.0 {
            kept += 1;
            let want = f64::from(a) / (1.0 - p);
            assert!((f64::from(b) - want).abs() <= 1e-6 * want, "element {i}: kept value {b}, want x/(1-p) = {want}");
        }
    }
    let frac = kept as f64 / n as f64;
    assert!((frac - (1.0 - p)).abs() < 0.01, "kept fraction {frac}, want {} ± 0.01", 1.0 - p);

    // Same seed, same mask; different seeds, different masks.
    let mask = |v: &[f32]| v.iter().map(|&b| b != 0.0).collect::<Vec<bool>>();
    let again = leaf.detach().dropout(p, 42, true).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(again, yv, "same seed gives the same output");
    let m42 = mask(&yv);
    for seed in [43u64, 0, 1 << 40] {
        let other = mask(&leaf.detach().dropout(p, seed, true).unwrap().to_vec::<f32>().unwrap());
        let differ = m42.iter().zip(&other).filter(|(a, b)| a != b).count();
        // Independent masks differ in 2 p (1 - p) = 42% of the elements.
        assert!(differ > n / 4, "seed {seed} vs 42: masks differ in only {differ} of {n} elements");
    }

    // The gradient is mask / (1 - p).
    y.sum_all().unwrap().backward().unwrap();
    let g = leaf.grad().unwrap().to_vec::<f32>().unwrap();
    let scale = 1.0 / (1.0 - p);
    for (i, (&gi, &k)) in g.iter().zip(&m42).enumerate() {
        let want = if k { scale } else { 0.0 };
        assert!((f64::from(gi) - want).abs() <= 1e-6 * scale, "gradient element {i}: {gi}, want {want}");
    }
    // Upstream gradients are masked and scaled too.
    let small = upload(&r32(1401, &[6, 7], 0.5, 1.5)).requires_grad(true).unwrap();
    let w = r32(1402, &[6, 7], -1.0, 1.0);
    let ys = small.dropout(0.5, 9, true).unwrap();
    let ysv = ys.to_vec::<f32>().unwrap();
    ys.mul(upload(&w)).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = small.grad().unwrap().to_vec::<f32>().unwrap();
    let want: Vec<f64> = ysv.iter().zip(&w.data).map(|(&v, &wi)| if v != 0.0 { 2.0 * wi } else { 0.0 }).collect();
    assert_close_f32(&gs, &want, 1e-6, 1e-7, "dropout gradient with upstream weights");
}

// ------------------------------------------------------------------ 5. compiled backward

fn leaf(seed: u64, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    upload(&r32(seed, shape, lo, hi)).requires_grad(true).unwrap()
}

#[test]
fn compiled_backward_matches_eager() {
    let _l = lock();
    let w = |seed: u64, shape: &[usize]| upload(&r32(seed, shape, -1.0, 1.0));

    let labels = i32_labels(&[2, -100, 0, 4, -100, 1]);
    for reduction in REDUCTIONS {
        let options = ClassLoss { reduction, ignore_index: Some(-100), ..Default::default() };
        let r = w(1501, if reduction == Reduction::None { &[6] } else { &[] });
        eager_vs_compiled(
            &format!("cross_entropy ignore_index {reduction:?}"),
            &[leaf(1500, &[6, 5], -3.0, 3.0)],
            |x| x[0].cross_entropy(&labels, options)?.mul(&r)?.sum_all(),
        );
    }
    let in_range_ignore = ClassLoss { reduction: Reduction::Mean, ignore_index: Some(1), ..Default::default() };
    let labels2 = u32_labels(&[1, 0, 2, 1]);
    eager_vs_compiled("cross_entropy ignore_index 1, u32", &[leaf(1502, &[4, 3], -3.0, 3.0)], |x| {
        x[0].cross_entropy(&labels2, in_range_ignore)
    });

    let r = w(1511, &[2, 3, 4]);
    eager_vs_compiled(
        "layer_norm weight+bias",
        &[leaf(1510, &[2, 3, 4], -2.0, 2.0), leaf(1512, &[4], 0.5, 1.5), leaf(1513, &[4], -1.0, 1.0)],
        |x| x[0].layer_norm(&[4], Some(&x[1]), Some(&x[2]), 1e-5)?.mul(&r)?.sum_all(),
    );
    eager_vs_compiled(
        "layer_norm over 2 dims weight+bias",
        &[leaf(1514, &[2, 3, 4], -2.0, 2.0), leaf(1515, &[3, 4], 0.5, 1.5), leaf(1516, &[3, 4], -1.0, 1.0)],
        |x| x[0].layer_norm(&[3, 4], Some(&x[1]), Some(&x[2]), 1e-5)?.mul(&r)?.sum_all(),
    );

    for dim in [0isize, 1, -1] {
        let r = w(1521, &[3, 5]);
        eager_vs_compiled(&format!("log_softmax dim {dim}"), &[leaf(1520, &[3, 5], -3.0, 3.0)], |x| {
            x[0].log_softmax(dim)?.mul(&r)?.sum_all()
        });
        eager_vs_compiled(&format!("softmax dim {dim}"), &[leaf(1522, &[3, 5], -3.0, 3.0)], |x| {
            x[0].softmax(dim)?.mul(&r)?.sum_all()
        });
    }
    let r = w(1531, &[2, 3, 4]);
    eager_vs_compiled("rms_norm weight", &[leaf(1530, &[2, 3, 4], -2.0, 2.0), leaf(1532, &[3, 4], 0.5, 1.5)], |x| {
        x[0].rms_norm(&[3, 4], Some(&x[1]), 1e-6)?.mul(&r)?.sum_all()
    });
    let y = upload(&r32(1541, &[3, 4], 0.0, 1.0));
    eager_vs_compiled("bce_with_logits", &[leaf(1540, &[3, 4], -4.0, 4.0)], |x| {
        x[0].binary_cross_entropy_with_logits(&y, Reduction::Mean)
    });
    eager_vs_compiled("logsumexp + softplus", &[leaf(1550, &[3, 5], -3.0, 3.0)], |x| {
        x[0].logsumexp(1, false)?.softplus()?.sum_all()
    });
    // The extreme logits too.
    let ext = i32_labels(&[0, 2]);
    eager_vs_compiled("cross_entropy ±1e4", &[f32_tensor(&EXTREME, &[2, 3]).requires_grad(true).unwrap()], |x| {
        x[0].cross_entropy(&ext, ClassLoss { reduction: Reduction::Sum, ignore_index: None, ..Default::default() })
    });
}
