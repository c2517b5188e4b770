//! Options of existing ops, with PyTorch's semantics (issue 12): `slice_step` (Python's
//! `x[start:end:step]` on one dim, a strided view), pooling with `ceil_mode` and
//! `count_include_pad`, grouped (and depthwise) `conv2d`, and class losses over `[N, C, d1, ...]`
//! with `label_smoothing` and the default `ignore_index` of -100.
//!
//! For every option: a gradcheck (forward against an f64 reference written here as a direct loop,
//! gradient against central finite differences of it), eager against compiled backward, the
//! errors its bad arguments give (and that they change nothing), and spot checks of PyTorch's
//! numbers.
//!
//! The compiler is process-global, so every test takes `LOCK` first.

mod common;
use common::compiled_check::eager_vs_compiled;
use common::gradcheck::*;
use common::reference::*;
use common::{device, upload};

use std::sync::{Mutex, MutexGuard};

use wgrad::{Error, Tensor};

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `result` is an `InvalidArgument` of `op` whose message mentions every one of `needles`.
fn expect_invalid(result: wgrad::Result<Tensor>, op: &str, needles: &[&str]) {
    match result {
        Err(Error::InvalidArgument { op: got, message }) => {
            assert_eq!(got, op, "error names the wrong op: {message}");
            for n in needles {
                assert!(message.contains(n), "{op}: message {message:?} does not mention {n:?}");
            }
        }
        Err(e) => panic!("{op}: expected InvalidArgument, got {e}"),
        Ok(t) => panic!("{op}: expected an error, got a tensor of shape {:?}", t.dims()),
    }
}

// ------------------------------------------------------------------ slice_step

/// Python's slice indices of a dim of `n` elements: `range(n)[start:end:step]`.
fn python_slice(n: usize, start: Option<isize>, end: Option<isize>, step: usize) -> Vec<usize> {
    let n = n as isize;
    let clamp = |i: isize| if i < 0 { (i + n).max(0) } else { i.min(n) };
    let (s, e) = (start.map_or(0, clamp), end.map_or(n, clamp));
    (s..e.max(s)).step_by(step).map(|i| i as usize).collect()
}

/// `t[.., idx, ..]` along `dim`: the f64 reference of a slice.
fn ref_select(t: &RefTensor, dim: usize, idx: &[usize]) -> RefTensor {
    let mut shape = t.shape.clone();
    shape[dim] = idx.len();
    RefTensor::from_fn(&shape, |at| {
        let mut src = at.to_vec();
        src[dim] = idx[at[dim]];
        t.at(&src)
    })
}

#[test]
fn slice_step_matches_python_and_its_gradient_scatters() {
    let _l = lock();
    let x = r32(1, &[5, 7, 3], -2.0, 2.0);
    let cases: [(isize, Option<isize>, Option<isize>, usize); 10] = [
        (1, None, None, 2),
        (1, Some(1), Some(6), 3),
        (1, Some(-6), Some(-1), 2),
        (0, Some(-100), Some(100), 2),
        (-1, None, None, 2),
        (0, Some(4), None, 3),     // one element
        (1, Some(5), Some(2), 2),  // empty
        (1, Some(2), Some(7), 1),  // step 1 is narrow
        (-2, Some(0), Some(7), 3), // the last step overhangs the end
        (1, Some(10), None, 2),    // start past the end: empty
    ];
    for (dim, start, end, step) in cases {
        let d = if dim < 0 { (dim + 3) as usize } else { dim as usize };
        let idx = python_slice(x.shape[d], start, end, step);
        let name = format!("slice_step dim {dim} [{start:?}:{end:?}:{step}]");
        let xt = upload(&x);
        let view = xt.slice_step(dim, start, end, step).unwrap();
        assert_eq!(view.dims()[d], idx.len(), "{name}: length");
        if idx.is_empty() {
            continue;
        }
        // A view: no copy, so the storage is shared.
        if step > 1 && idx.len() > 1 {
            assert!(!view.is_contiguous(), "{name}: expected a strided view");
        }
        gradcheck(
            &name,
            std::slice::from_ref(&x),
            |t| t[0].slice_step(dim, start, end, step),
            |r| ref_select(&r[0], d, &idx),
        );
    }
    // A slice of a slice, of a transposed tensor, and an op on the strided view.
    gradcheck(
        "slice_step of a transposed slice_step",
        std::slice::from_ref(&x),
        |t| t[0].transpose(0, 2)?.slice_step(2, Some(1), None, 2)?.slice_step(1, Some(-5), None, 2)?.mul(2.0),
        |r| {
            let t = r[0].transpose(0, 2);
            let t = ref_select(&t, 2, &python_slice(5, Some(1), None, 2));
            ref_select(&t, 1, &python_slice(7, Some(-5), None, 2)).map(|v| v * 2.0)
        },
    );
}

#[test]
fn slice_step_spot_values_and_double_backward() {
    let _l = lock();
    let x = Tensor::arange(0.0, 10.0, 1.0, &device()).unwrap();
    let get = |s: Option<isize>, e: Option<isize>, step| x.slice_step(0, s, e, step).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(get(None, None, 3), vec![0.0, 3.0, 6.0, 9.0]);
    assert_eq!(get(Some(-3), None, 1), vec![7.0, 8.0, 9.0]);
    assert_eq!(get(Some(1), Some(-1), 4), vec![1.0, 5.0]);
    assert_eq!(get(Some(-20), Some(3), 2), vec![0.0, 2.0]);
    assert!(get(Some(8), Some(2), 1).is_empty());
    // The gradient of the view: ones at the selected positions, zeros elsewhere.
    let leaf = x.detach().requires_grad(true).unwrap();
    leaf.slice_step(0, Some(1), None, 3).unwrap().sum_all().unwrap().backward().unwrap();
    let g = leaf.grad().unwrap().to_vec::<f32>().unwrap();
    assert_eq!(g, vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    // Double backward through the scatter: d/dx of sum(grad(sum(y^2))) = 2 at the selected positions.
    let leaf = x.detach().requires_grad(true).unwrap();
    let y = leaf.slice_step(0, Some(0), Some(9), 4).unwrap().square().unwrap().sum_all().unwrap();
    let opts = wgrad::BackwardOptions { create_graph: true, ..Default::default() };
    let gx = wgrad::grad(&[&y], &[&leaf], None, opts).unwrap().remove(0).unwrap();
    let want: Vec<f32> = (0..10).map(|i| if i % 4 == 0 && i < 9 { 2.0 * i as f32 } else { 0.0 }).collect();
    assert_eq!(gx.to_vec::<f32>().unwrap(), want);
    gx.sum_all().unwrap().backward().unwrap();
    let gg = leaf.grad().unwrap().to_vec::<f32>().unwrap();
    let want: Vec<f32> = (0..10).map(|i| if i % 4 == 0 && i < 9 { 2.0 } else { 0.0 }).collect();
    assert_eq!(gg, want);
}

#[test]
fn slice_step_bad_arguments() {
    let _l = lock();
    let x = upload(&r32(3, &[4, 6], -1.0, 1.0)).requires_grad(true).unwrap();
    let before = x.to_vec::<f32>().unwrap();
    expect_invalid(x.slice_step(1, None, None, 0), "slice_step", &["step", "at least 1", "got 0"]);
    assert!(x.slice_step(2, None, None, 1).is_err(), "dim out of range");
    let scalar = Tensor::full([], 1.0, wgrad::DType::F32, &device()).unwrap();
    expect_invalid(scalar.slice_step(0, None, None, 1), "slice_step", &["0-d"]);
    // Nothing changed: same values, no gradient, and the tensor still slices.
    assert_eq!(x.to_vec::<f32>().unwrap(), before);
    assert!(x.grad().is_none());
    assert_eq!(x.slice_step(1, None, None, 5).unwrap().dims(), [4, 2]);
}

// ------------------------------------------------------------------ grouped conv2d

/// Grouped 2-D cross-correlation as a direct loop: output channel `o` of group `o / (oc / groups)`
/// sees input channels `g * c/groups .. (g + 1) * c/groups`.
fn ref_conv_grouped(x: &RefTensor, w: &RefTensor, bias: Option<&RefTensor>, o: wgrad::Conv2dOptions) -> RefTensor {
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2] as isize, x.shape[3] as isize);
    let (oc, cg, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    assert_eq!(cg * o.groups, c, "reference: weight channels");
    let out = |a: usize, size: isize, k: usize| {
        ((size + 2 * o.padding[a] as isize - (o.dilation[a] * (k - 1)) as isize - 1) / o.stride[a] as isize + 1)
            as usize
    };
    let (oh, ow) = (out(0, h, kh), out(1, wd, kw));
    RefTensor::from_fn(&[n, oc, oh, ow], |at| {
        let (b, ch, y, xx) = (at[0], at[1], at[2], at[3]);
        let group = ch / (oc / o.groups);
        let mut acc = bias.map_or(0.0, |bias| bias.data[ch]);
        for j in 0..cg {
            for ki in 0..kh {
                for kj in 0..kw {
                    let iy = (y * o.stride[0] + ki * o.dilation[0]) as isize - o.padding[0] as isize;
                    let ix = (xx * o.stride[1] + kj * o.dilation[1]) as isize - o.padding[1] as isize;
                    if iy >= 0 && ix >= 0 && iy < h && ix < wd {
                        acc += x.at(&[b, group * cg + j, iy as usize, ix as usize]) * w.at(&[ch, j, ki, kj]);
                    }
                }
            }
        }
        acc
    })
}

#[test]
fn grouped_conv2d_gradcheck() {
    let _l = lock();
    let opts = |groups, stride, padding, dilation| wgrad::Conv2dOptions { stride, padding, dilation, groups };
    type Case = (&'static str, [usize; 4], [usize; 4], bool, wgrad::Conv2dOptions);
    let cases: [Case; 6] = [
        ("2 groups", [2, 4, 5, 6], [6, 2, 3, 2], true, opts(2, [1, 1], [0, 0], [1, 1])),
        ("3 groups, stride 2, padding 1", [1, 6, 6, 5], [3, 2, 3, 3], false, opts(3, [2, 2], [1, 1], [1, 1])),
        ("depthwise", [2, 3, 5, 5], [3, 1, 3, 3], true, opts(3, [1, 1], [1, 1], [1, 1])),
        ("depthwise, multiplier 2, dilation 2", [1, 2, 6, 7], [4, 1, 2, 3], true, opts(2, [1, 2], [1, 0], [2, 2])),
        ("groups = out_channels < in_channels", [2, 4, 4, 4], [2, 2, 2, 2], false, opts(2, [1, 1], [0, 0], [1, 1])),
        ("groups 1 (ordinary)", [1, 3, 4, 5], [2, 3, 2, 2], true, opts(1, [1, 1], [1, 0], [1, 1])),
    ];
    for (i, (name, xs, ws, bias, o)) in cases.into_iter().enumerate() {
        let seed = 30 + 10 * i as u64;
        let mut inputs = vec![r32(seed, &xs, -1.0, 1.0), r32(seed + 1, &ws, -1.0, 1.0)];
        if bias {
            inputs.push(r32(seed + 2, &[ws[0]], -1.0, 1.0));
        }
        gradcheck(
            &format!("conv2d {name} x {xs:?} w {ws:?}"),
            &inputs,
            |t| t[0].conv2d(&t[1], t.get(2), o),
            |r| ref_conv_grouped(&r[0], &r[1], r.get(2), o),
        );
    }
    // A grouped convolution is the per-group convolutions concatenated.
    let x = upload(&r32(100, &[2, 4, 5, 5], -1.0, 1.0));
    let w = upload(&r32(101, &[6, 2, 3, 3], -1.0, 1.0));
    let grouped = x.conv2d(&w, None, opts(2, [1, 1], [1, 1], [1, 1])).unwrap();
    let parts: Vec<Tensor> = (0..2)
        .map(|g| x.narrow(1, 2 * g, 2)?.conv2d(&w.narrow(0, 3 * g, 3)?, None, opts(1, [1, 1], [1, 1], [1, 1])))
        .collect::<wgrad::Result<_>>()
        .unwrap();
    let cat = wgrad::cat(&[&parts[0], &parts[1]], 1).unwrap();
    assert_close_f32(
        &grouped.to_vec::<f32>().unwrap(),
        &cat.to_vec::<f32>().unwrap().iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        1e-6,
        1e-6,
        "grouped = cat of per-group convolutions",
    );
}

#[test]
fn grouped_conv2d_bad_arguments_and_layer() {
    let _l = lock();
    let d = device();
    let x = upload(&r32(110, &[1, 6, 5, 5], -1.0, 1.0)).requires_grad(true).unwrap();
    let before = x.to_vec::<f32>().unwrap();
    let w = |shape: [usize; 4]| upload(&r32(111, &shape, -1.0, 1.0));
    let groups = |groups| wgrad::Conv2dOptions { groups, ..Default::default() };
    expect_invalid(x.conv2d(&w([4, 6, 3, 3]), None, groups(0)), "conv2d", &["groups 0", "at least 1"]);
    expect_invalid(x.conv2d(&w([4, 1, 3, 3]), None, groups(4)), "conv2d", &["groups 4", "in_channels 6"]);
    expect_invalid(x.conv2d(&w([4, 2, 3, 3]), None, groups(3)), "conv2d", &["groups 3", "out_channels 4"]);
    // Groups that divide, but a weight whose channels are not in_channels / groups.
    match x.conv2d(&w([6, 3, 3, 3]), None, groups(3)) {
        Err(Error::IncompatibleShapes { op, lhs, rhs, rule }) => {
            assert_eq!(op, "conv2d");
            assert_eq!((lhs.dims(), rhs.dims()), (&[1, 6, 5, 5][..], &[6, 3, 3, 3][..]));
            assert!(rule.contains("c / groups"), "{rule}");
        }
        other => panic!("expected IncompatibleShapes, got {other:?}"),
    }
    assert_eq!(x.to_vec::<f32>().unwrap(), before);
    assert!(x.grad().is_none());

    // The layer: weight [out, in / groups, kh, kw], PyTorch's bound 1 / sqrt(in / groups * kh * kw).
    let options = wgrad::Conv2dOptions { padding: [1, 1], groups: 6, ..Default::default() };
    let layer = wgrad::nn::Conv2d::new(6, 12, [3, 3], options, true, 7, &d).unwrap();
    assert_eq!(layer.weight.dims(), [12, 1, 3, 3]);
    let bound = 1.0 / 9f32.sqrt();
    let values = layer.weight.to_vec::<f32>().unwrap();
    assert!(values.iter().all(|v| v.abs() <= bound), "weights outside ±{bound}: {values:?}");
    assert!(values.iter().any(|v| v.abs() > 0.5 * bound), "bound looks like in_channels * kh * kw: {values:?}");
    assert_eq!(layer.forward(&x).unwrap().dims(), [1, 12, 5, 5]);
    let bad =
        wgrad::nn::Conv2d::new(6, 4, [3, 3], wgrad::Conv2dOptions { groups: 4, ..Default::default() }, true, 7, &d);
    match bad {
        Err(Error::InvalidArgument { op, message }) => {
            assert!(op == "conv2d" && message.contains("groups 4"), "{message}")
        }
        Err(e) => panic!("expected InvalidArgument, got {e}"),
        Ok(_) => panic!("Conv2d::new accepted groups 4 for 6 -> 4 channels"),
    }
}

// ------------------------------------------------------------------ class losses

/// PyTorch's smoothed class loss of `labels` (one per position, row-major over `[n, d1, ...]`)
/// under log-probabilities `logp` `[n, classes, d1, ...]` (or `[classes]` and one label), as a
/// loop: `(1 - ε) (-log p_label) + ε mean_c(-log p_c)` per position, ignored positions 0 and not
/// counted in the mean.
fn ref_class_loss(logp: &RefTensor, labels: &[i64], options: wgrad::ClassLoss) -> RefTensor {
    let one_position = logp.shape.len() == 1;
    let logp = if one_position { logp.unsqueeze(0) } else { logp.clone() };
    let classes = logp.shape[1];
    let mut position_shape = logp.shape.clone();
    position_shape.remove(1);
    let positions = shape_numel(&position_shape);
    assert_eq!(labels.len(), positions, "reference: one label per position");
    let eps = options.label_smoothing;
    let (mut losses, mut counted) = (vec![0.0; positions], 0.0);
    for (p, &label) in labels.iter().enumerate() {
        if options.ignore_index.map(i64::from) == Some(label) {
            continue;
        }
        let mut at = unravel_index(p, &position_shape);
        at.insert(1, 0);
        let mut log_of = |c: usize| {
            at[1] = c;
            logp.at(&at)
        };
        let nll = -log_of(label as usize);
        let smooth = -(0..classes).map(log_of).sum::<f64>() / classes as f64;
        losses[p] = (1.0 - eps) * nll + eps * smooth;
        counted += 1.0;
    }
    // One position of [classes] scores has a 0-d loss.
    let out_shape = if one_position { vec![] } else { position_shape };
    let per = RefTensor::new(losses, &out_shape);
    match options.reduction {
        wgrad::Reduction::Mean => RefTensor::scalar(per.sum_all() / counted),
        wgrad::Reduction::Sum => RefTensor::scalar(per.sum_all()),
        wgrad::Reduction::None => per,
    }
}

fn labels_tensor(labels: &[i64], shape: &[usize]) -> Tensor {
    let v: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
    Tensor::from_slice(&v, shape.to_vec(), &device()).unwrap()
}

const REDUCTIONS: [wgrad::Reduction; 3] = [wgrad::Reduction::Mean, wgrad::Reduction::Sum, wgrad::Reduction::None];

#[test]
fn class_losses_over_positions_with_smoothing_gradcheck() {
    let _l = lock();
    // (scores shape, labels, ignore_index, label_smoothing)
    type Case = (&'static [usize], &'static [i64], Option<i32>, f64);
    let cases: [Case; 7] = [
        (&[4, 5], &[0, 4, -100, 2], Some(-100), 0.2),
        (&[2, 3, 4], &[0, 2, 1, -100, 2, 2, 0, 1], Some(-100), 0.0),
        (&[2, 3, 4], &[0, 2, 1, -100, 2, 2, -100, 1], Some(-100), 0.15),
        (&[2, 4, 3, 2], &[0, 1, 2, 3, 1, 1, 3, 2, 0, 1, 2, 3], Some(1), 0.3),
        (&[1, 3, 2, 2, 2], &[0, 1, 2, 0, 1, 2, 2, 1], None, 1.0),
        (&[5], &[3], Some(-100), 0.25),
        (&[3, 4], &[1, 3, 0], None, 0.05),
    ];
    for (i, (shape, labels, ignore_index, label_smoothing)) in cases.into_iter().enumerate() {
        let mut label_shape = shape.to_vec();
        label_shape.remove(usize::from(shape.len() > 1));
        let lt = labels_tensor(labels, &label_shape);
        let x = r32(200 + i as u64, shape, -2.0, 2.0);
        let axis = usize::from(shape.len() > 1);
        for reduction in REDUCTIONS {
            let options = wgrad::ClassLoss { reduction, ignore_index, label_smoothing };
            let name = format!("cross_entropy {shape:?} {options:?}");
            gradcheck(
                &name,
                std::slice::from_ref(&x),
                |t| t[0].cross_entropy(&lt, options),
                |r| ref_class_loss(&r[0].log_softmax(axis), labels, options),
            );
            // nll_loss on log-probabilities taken as given (any tensor).
            let name = format!("nll_loss {shape:?} {options:?}");
            gradcheck(
                &name,
                std::slice::from_ref(&x),
                |t| t[0].nll_loss(&lt, options),
                |r| ref_class_loss(&r[0], labels, options),
            );
        }
    }
}

#[test]
fn class_loss_spot_values() {
    let _l = lock();
    let d = device();
    // logits [0, 0, ln 2]: p = [1/4, 1/4, 1/2]; label 2 with ε = 0.3:
    // 0.7 ln 2 + 0.3 (ln 4 + ln 4 + ln 2) / 3 = 1.2 ln 2.
    let logits = Tensor::from_slice(&[0.0f32, 0.0, 2f32.ln()], [1, 3], &d).unwrap();
    let smoothed = wgrad::ClassLoss { label_smoothing: 0.3, ..Default::default() };
    let loss = logits.cross_entropy(&labels_tensor(&[2], &[1]), smoothed).unwrap().to_scalar::<f32>().unwrap();
    assert!((f64::from(loss) - 1.2 * 2f64.ln()).abs() < 1e-6, "{loss}");
    // The default ignores -100 (PyTorch's default), in both terms and in the mean's count.
    let logits = upload(&r32(300, &[2, 3, 2], -1.0, 1.0));
    let labels = labels_tensor(&[-100, 1, 2, -100], &[2, 2]);
    let none = wgrad::ClassLoss { reduction: wgrad::Reduction::None, label_smoothing: 0.2, ..Default::default() };
    let per = logits.cross_entropy(&labels, none).unwrap();
    assert_eq!(per.dims(), [2, 2]);
    let per = per.to_vec::<f32>().unwrap();
    assert_eq!((per[0], per[3]), (0.0, 0.0));
    let mean = logits.cross_entropy(&labels, smoothed_with(0.2)).unwrap().to_scalar::<f32>().unwrap();
    assert!((mean - (per[1] + per[2]) / 2.0).abs() < 1e-6, "mean {mean} of {per:?}");
    // Every position ignored: the mean is 0/0 = NaN, as PyTorch.
    let all = labels_tensor(&[-100; 4], &[2, 2]);
    assert!(logits.cross_entropy(&all, smoothed_with(0.2)).unwrap().to_scalar::<f32>().unwrap().is_nan());
    // [classes] with a 0-d label is one position; Reduction::None gives a 0-d loss.
    let x = upload(&r32(301, &[4], -1.0, 1.0));
    let label = Tensor::from_slice(&[3i32], [], &d).unwrap();
    let one = x.cross_entropy(&label, none).unwrap();
    assert_eq!(one.dims(), [] as [usize; 0]);
    let batched = x.unsqueeze(0).unwrap().cross_entropy(&labels_tensor(&[3], &[1]), none).unwrap();
    assert_eq!(one.to_vec::<f32>().unwrap(), batched.to_vec::<f32>().unwrap());
}

fn smoothed_with(label_smoothing: f64) -> wgrad::ClassLoss {
    wgrad::ClassLoss { label_smoothing, ..Default::default() }
}

#[test]
fn class_loss_bad_arguments() {
    let _l = lock();
    let logits = upload(&r32(310, &[2, 3, 4], -1.0, 1.0)).requires_grad(true).unwrap();
    let logp = logits.log_softmax(1).unwrap();
    let before = logits.to_vec::<f32>().unwrap();
    let good = labels_tensor(&[0, 1, 2, -100, 2, 1, 0, 0], &[2, 4]);
    for eps in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        let o = smoothed_with(eps);
        expect_invalid(logits.cross_entropy(&good, o), "cross_entropy", &["label_smoothing", "[0, 1]"]);
        expect_invalid(logp.nll_loss(&good, o), "nll_loss", &["label_smoothing", "[0, 1]"]);
    }
    // Out-of-range labels at positions past the first dims, not the ignore index.
    for (labels, ignore_index) in [(&[0, 1, 2, 3, 0, 0, 0, 0], Some(-100)), (&[0, 1, 2, -100, 0, 0, 0, 0], None)] {
        let o = wgrad::ClassLoss { ignore_index, ..Default::default() };
        let lt = labels_tensor(labels, &[2, 4]);
        expect_invalid(logits.cross_entropy(&lt, o), "cross_entropy", &["1 label(s) outside 0..3"]);
        expect_invalid(logp.nll_loss(&lt, o), "nll_loss", &["1 label(s) outside 0..3"]);
    }
    // Labels whose shape is not the scores' without the class dim.
    for shape in [&[2, 3][..], &[2, 4, 1], &[8], &[4, 2]] {
        let lt = labels_tensor(&[0; 8][..shape.iter().product()], shape);
        expect_invalid(logits.cross_entropy(&lt, Default::default()), "cross_entropy", &["[n, d1, ...]", "[2, 3, 4]"]);
    }
    let scalar = Tensor::full([], 1.0, wgrad::DType::F32, &device()).unwrap();
    expect_invalid(scalar.cross_entropy(&labels_tensor(&[0], &[]), Default::default()), "cross_entropy", &["[]"]);
    assert_eq!(logits.to_vec::<f32>().unwrap(), before);
    assert!(logits.grad().is_none());
    logits.cross_entropy(&good, smoothed_with(0.1)).unwrap().backward().unwrap();
    assert!(logits.grad().is_some());
}

// ------------------------------------------------------------------ compiled backward

#[test]
fn compiled_backward_matches_eager_slice_step() {
    let _l = lock();
    let x = upload(&r32(4, &[6, 9], -2.0, 2.0)).requires_grad(true).unwrap();
    let r = upload(&r32(5, &[3, 4], -1.0, 1.0));
    eager_vs_compiled("slice_step", std::slice::from_ref(&x), |l| {
        l[0].slice_step(0, Some(-5), None, 2)?.slice_step(1, Some(1), Some(-1), 2)?.tanh()?.mul(&r)?.sum_all()
    });
}

// ------------------------------------------------------------------ pooling

/// One pooling configuration: kernel, stride, padding, ceil_mode, count_include_pad.
#[derive(Debug, Clone, Copy)]
struct Pool {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
}

impl Pool {
    fn options(&self) -> wgrad::Pool2dOptions {
        wgrad::Pool2dOptions {
            stride: Some(self.stride),
            padding: self.padding,
            ceil_mode: self.ceil_mode,
            count_include_pad: self.count_include_pad,
        }
    }

    /// PyTorch's `pooling_output_shape` along axis `a` for an input of `size`.
    fn out(&self, a: usize, size: usize) -> usize {
        let (k, s, p) = (self.kernel[a] as isize, self.stride[a] as isize, self.padding[a] as isize);
        let num = size as isize + 2 * p - k + if self.ceil_mode { s - 1 } else { 0 };
        let mut out = num.div_euclid(s) + 1;
        if self.ceil_mode && (out - 1) * s >= size as isize + p {
            out -= 1;
        }
        out as usize
    }
}

/// Max or average pooling of `x` [n, c, h, w] as a direct loop, PyTorch's kernels transcribed
/// (`AvgPool2d`'s `hstart`/`hend`/`pool_size`).
fn ref_pool(x: &RefTensor, p: Pool, max: bool) -> RefTensor {
    let (h, w) = (x.shape[2] as isize, x.shape[3] as isize);
    let (oh, ow) = (p.out(0, x.shape[2]), p.out(1, x.shape[3]));
    let [kh, kw] = p.kernel.map(|k| k as isize);
    let [sh, sw] = p.stride.map(|s| s as isize);
    let [ph, pw] = p.padding.map(|v| v as isize);
    RefTensor::from_fn(&[x.shape[0], x.shape[1], oh, ow], |at| {
        let (hs, ws) = (at[2] as isize * sh - ph, at[3] as isize * sw - pw);
        let (he, we) = ((hs + kh).min(h + ph), (ws + kw).min(w + pw));
        let pool_size = (he - hs) * (we - ws);
        let (hs, ws, he, we) = (hs.max(0), ws.max(0), he.min(h), we.min(w));
        let mut acc = if max { f64::NEG_INFINITY } else { 0.0 };
        for i in hs..he {
            for j in ws..we {
                let v = x.at(&[at[0], at[1], i as usize, j as usize]);
                acc = if max { acc.max(v) } else { acc + v };
            }
        }
        if max {
            acc
        } else {
            let divisor = if p.count_include_pad { pool_size } else { (he - hs) * (we - ws) };
            acc / divisor as f64
        }
    })
}

const POOLS: [([usize; 4], Pool); 7] = [
    ([1, 2, 5, 5], Pool { kernel: [2, 2], stride: [2, 2], padding: [0, 0], ceil_mode: true, count_include_pad: true }),
    ([2, 1, 6, 7], Pool { kernel: [3, 3], stride: [2, 2], padding: [1, 1], ceil_mode: true, count_include_pad: true }),
    ([2, 1, 6, 7], Pool { kernel: [3, 3], stride: [2, 2], padding: [1, 1], ceil_mode: true, count_include_pad: false }),
    ([1, 2, 6, 5], Pool { kernel: [3, 2], stride: [2, 3], padding: [1, 1], ceil_mode: true, count_include_pad: false }),
    ([1, 1, 5, 5], Pool { kernel: [2, 2], stride: [2, 2], padding: [1, 1], ceil_mode: true, count_include_pad: true }),
    (
        [1, 1, 4, 4],
        Pool { kernel: [3, 3], stride: [1, 1], padding: [1, 1], ceil_mode: false, count_include_pad: false },
    ),
    ([1, 2, 7, 6], Pool { kernel: [3, 3], stride: [2, 2], padding: [0, 1], ceil_mode: false, count_include_pad: true }),
];

#[test]
fn pooling_options_gradcheck() {
    let _l = lock();
    for (i, (shape, p)) in POOLS.into_iter().enumerate() {
        let x = r32(10 + i as u64, &shape, -2.0, 2.0);
        let o = p.options();
        gradcheck(
            &format!("avg_pool2d {shape:?} {p:?}"),
            std::slice::from_ref(&x),
            |t| t[0].avg_pool2d_with(p.kernel, o),
            |r| ref_pool(&r[0], p, false),
        );
        gradcheck(
            &format!("max_pool2d {shape:?} {p:?}"),
            std::slice::from_ref(&x),
            |t| t[0].max_pool2d_with(p.kernel, o),
            |r| ref_pool(&r[0], p, true),
        );
    }
}

#[test]
fn pooling_matches_pytorch_spot_values() {
    let _l = lock();
    let x = Tensor::arange(0.0, 25.0, 1.0, &device()).unwrap().reshape([1, 1, 5, 5]).unwrap();
    // avg_pool2d(arange(25).view(1, 1, 5, 5), 2, 2, ceil_mode=True): 3x3, the last row and column
    // windows hold 2 elements and the corner 1, each divided by its own count.
    let ceil = wgrad::Pool2dOptions { ceil_mode: true, ..Default::default() };
    let avg = x.avg_pool2d_with([2, 2], ceil).unwrap();
    assert_eq!(avg.dims(), [1, 1, 3, 3]);
    assert_eq!(avg.to_vec::<f32>().unwrap(), vec![3.0, 5.0, 6.5, 13.0, 15.0, 16.5, 20.5, 22.5, 24.0]);
    // Floor mode (the default) keeps the 2x2 of whole windows.
    assert_eq!(x.avg_pool2d([2, 2], [2, 2], [0, 0]).unwrap().to_vec::<f32>().unwrap(), vec![3.0, 5.0, 13.0, 15.0]);
    // With padding 1, ceil mode would give 4 windows per axis, but the 4th starts in the trailing
    // padding and is dropped: 3x3, as PyTorch.
    let padded = wgrad::Pool2dOptions { padding: [1, 1], ceil_mode: true, ..Default::default() };
    let max = x.max_pool2d_with([2, 2], padded).unwrap();
    assert_eq!(max.dims(), [1, 1, 3, 3]);
    assert_eq!(max.to_vec::<f32>().unwrap(), vec![0.0, 2.0, 4.0, 10.0, 12.0, 14.0, 20.0, 22.0, 24.0]);
    // avg with padding: the edge windows hold 2 elements and 2 padding zeros, counted or not.
    let avg = x.avg_pool2d_with([2, 2], padded).unwrap().to_vec::<f32>().unwrap();
    assert_eq!((avg[1], avg[6], avg[8]), ((1.0 + 2.0) / 4.0, (15.0 + 20.0) / 4.0, 84.0 / 4.0));
    let real = wgrad::Pool2dOptions { count_include_pad: false, ..padded };
    let avg = x.avg_pool2d_with([2, 2], real).unwrap().to_vec::<f32>().unwrap();
    assert_eq!((avg[1], avg[6], avg[8]), ((1.0 + 2.0) / 2.0, (15.0 + 20.0) / 2.0, 84.0 / 4.0));
    // The 3-argument forms are the defaults of the options.
    let y = upload(&r32(20, &[2, 3, 6, 6], -1.0, 1.0));
    let a = y.max_pool2d([3, 3], [2, 2], [1, 1]).unwrap().to_vec::<f32>().unwrap();
    let b =
        y.max_pool2d_with([3, 3], wgrad::Pool2dOptions { stride: Some([2, 2]), padding: [1, 1], ..Default::default() });
    assert_eq!(a, b.unwrap().to_vec::<f32>().unwrap());
    // stride None is the kernel.
    let c = y.avg_pool2d_with([2, 3], Default::default()).unwrap();
    assert_eq!(c.dims(), [2, 3, 3, 2]);
    assert_eq!(c.to_vec::<f32>().unwrap(), y.avg_pool2d([2, 3], [2, 3], [0, 0]).unwrap().to_vec::<f32>().unwrap());
}

#[test]
fn pooling_bad_arguments() {
    let _l = lock();
    let x = upload(&r32(21, &[1, 1, 5, 5], -1.0, 1.0)).requires_grad(true).unwrap();
    let before = x.to_vec::<f32>().unwrap();
    for ceil_mode in [false, true] {
        let base = wgrad::Pool2dOptions { ceil_mode, ..Default::default() };
        let too_much_padding = wgrad::Pool2dOptions { padding: [2, 0], ..base };
        expect_invalid(x.avg_pool2d_with([3, 3], too_much_padding), "avg_pool2d", &["padding", "half the kernel"]);
        expect_invalid(x.max_pool2d_with([3, 3], too_much_padding), "max_pool2d", &["padding", "half the kernel"]);
        let zero_stride = wgrad::Pool2dOptions { stride: Some([0, 1]), ..base };
        expect_invalid(x.avg_pool2d_with([2, 2], zero_stride), "avg_pool2d", &["stride", "at least 1"]);
        expect_invalid(x.max_pool2d_with([0, 2], base), "max_pool2d", &["kernel", "at least 1"]);
        expect_invalid(x.max_pool2d_with([6, 2], base), "max_pool2d", &["does not fit"]);
    }
    assert_eq!(x.to_vec::<f32>().unwrap(), before);
    assert!(x.grad().is_none());
    assert_eq!(x.avg_pool2d_with([2, 2], Default::default()).unwrap().dims(), [1, 1, 2, 2]);
}

#[test]
fn compiled_backward_matches_eager_pooling() {
    let _l = lock();
    let x = upload(&r32(22, &[2, 2, 7, 6], -2.0, 2.0)).requires_grad(true).unwrap();
    let p = POOLS[3].1;
    let r = upload(&r32(23, &[2, 2, p.out(0, 7), p.out(1, 6)], -1.0, 1.0));
    eager_vs_compiled("avg_pool2d ceil_mode, count_include_pad=false", std::slice::from_ref(&x), |l| {
        l[0].avg_pool2d_with(p.kernel, p.options())?.mul(&r)?.sum_all()
    });
    let p = POOLS[4].1;
    let r = upload(&r32(24, &[2, 2, p.out(0, 7), p.out(1, 6)], -1.0, 1.0));
    eager_vs_compiled("max_pool2d ceil_mode", std::slice::from_ref(&x), |l| {
        l[0].max_pool2d_with(p.kernel, p.options())?.mul(&r)?.sum_all()
    });
}

#[test]
fn compiled_backward_matches_eager_grouped_conv2d() {
    let _l = lock();
    let x = upload(&r32(120, &[2, 4, 6, 6], -1.0, 1.0)).requires_grad(true).unwrap();
    let w = upload(&r32(121, &[8, 1, 3, 3], -1.0, 1.0)).requires_grad(true).unwrap();
    let b = upload(&r32(122, &[8], -1.0, 1.0)).requires_grad(true).unwrap();
    let o = wgrad::Conv2dOptions { stride: [2, 1], padding: [1, 1], groups: 4, ..Default::default() };
    let r = upload(&r32(123, &[2, 8, 3, 6], -1.0, 1.0));
    eager_vs_compiled("depthwise conv2d", &[x, w, b], |l| {
        l[0].conv2d(&l[1], Some(&l[2]), o)?.tanh()?.mul(&r)?.sum_all()
    });
}

#[test]
fn compiled_backward_matches_eager_class_losses() {
    let _l = lock();
    let x = upload(&r32(320, &[2, 4, 3, 3], -2.0, 2.0)).requires_grad(true).unwrap();
    let labels = labels_tensor(&[0, 1, 2, 3, -100, 1, 2, 3, 0, 3, 2, 1, -100, -100, 0, 1, 2, 3], &[2, 3, 3]);
    for reduction in REDUCTIONS {
        let options = wgrad::ClassLoss { reduction, label_smoothing: 0.1, ..Default::default() };
        let r = upload(&r32(321, if reduction == wgrad::Reduction::None { &[2, 3, 3] } else { &[] }, 0.5, 1.5));
        eager_vs_compiled(&format!("cross_entropy [n, c, h, w] {options:?}"), std::slice::from_ref(&x), |l| {
            l[0].cross_entropy(&labels, options)?.mul(&r)?.sum_all()
        });
    }
}

/// The gradient of a strided slice of a rank-8 tensor (the most kernels index) stays within rank 8.
#[test]
fn slice_step_of_a_rank_8_tensor() {
    let _l = lock();
    let shape = [2, 1, 2, 1, 5, 1, 2, 1];
    let x = r32(7, &shape, -1.0, 1.0);
    let idx = python_slice(5, Some(-4), None, 2);
    gradcheck(
        "slice_step rank 8",
        std::slice::from_ref(&x),
        |t| t[0].slice_step(4, Some(-4), None, 2),
        |r| ref_select(&r[0], 4, &idx),
    );
}

/// Values printed by PyTorch 2 (CPU, float64) for the same inputs: an
/// independent check of the semantics, not only of our own reference.
#[test]
fn options_match_values_computed_by_pytorch() {
    let _l = lock();
    let d = device();
    let close = |got: &[f32], want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}: {got:?} vs {want:?}");
        }
    };
    // F.cross_entropy(x [2,3,2], y [[0,-100],[2,1]], label_smoothing=0.1)
    let data = [0.5f32, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0, 0.0, 0.75];
    let x = Tensor::from_slice(&data, [2, 3, 2], &d).unwrap().requires_grad(true).unwrap();
    let y = labels_tensor(&[0, -100, 2, 1], &[2, 2]);
    let with = |reduction| wgrad::ClassLoss { reduction, label_smoothing: 0.1, ..Default::default() };
    let none = x.cross_entropy(&y, with(wgrad::Reduction::None)).unwrap().to_vec::<f32>().unwrap();
    close(&none, &[2.0207972720033953, 0.0, 0.9418366650169626, 2.157370215915334], "none");
    let sum = x.cross_entropy(&y, with(wgrad::Reduction::Sum)).unwrap().to_vec::<f32>().unwrap();
    close(&sum, &[5.1200041529356906], "sum");
    let mean = x.cross_entropy(&y, with(wgrad::Reduction::Mean)).unwrap();
    close(&mean.to_vec::<f32>().unwrap(), &[1.7066680509785639], "mean");
    mean.backward().unwrap();
    let grad = [
        -0.2704605603412015,
        0.0,
        0.17107201797761545,
        0.0,
        0.09938854236358606,
        0.0,
        0.16579862882251253,
        0.2575469549281661,
        0.007535038295333907,
        -0.27475219564988496,
        -0.17333366711784642,
        0.017205240721718848,
    ];
    close(&x.grad().unwrap().to_vec::<f32>().unwrap(), &grad, "grad");

    // F.avg_pool2d(arange(25).view(1,1,5,5), 3, 2, 1, ceil_mode=True, count_include_pad=...)
    let a = Tensor::arange(0.0, 25.0, 1.0, &d).unwrap().reshape([1, 1, 5, 5]).unwrap();
    let o = wgrad::Pool2dOptions { stride: Some([2, 2]), padding: [1, 1], ceil_mode: true, count_include_pad: true };
    let cip = [1.3333333333333333, 3.0, 2.6666666666666665, 7.0, 12.0, 9.0, 8.0, 13.0, 9.333333333333334];
    close(&a.avg_pool2d_with([3, 3], o).unwrap().to_vec::<f32>().unwrap(), &cip, "avg cip");
    let o = wgrad::Pool2dOptions { count_include_pad: false, ..o };
    let real = [3.0, 4.5, 6.0, 10.5, 12.0, 13.5, 18.0, 19.5, 21.0];
    close(&a.avg_pool2d_with([3, 3], o).unwrap().to_vec::<f32>().unwrap(), &real, "avg no cip");
    // 6x6, kernel 2, stride 2, padding 1, ceil_mode: 4x4 with overhanging last windows.
    let b = Tensor::arange(0.0, 36.0, 1.0, &d).unwrap().reshape([1, 1, 6, 6]).unwrap();
    let o = wgrad::Pool2dOptions { stride: Some([2, 2]), padding: [1, 1], ceil_mode: true, count_include_pad: true };
    let avg = [0.0, 0.75, 1.75, 1.25, 4.5, 10.5, 12.5, 7.0, 10.5, 22.5, 24.5, 13.0, 7.5, 15.75, 16.75, 8.75];
    close(&b.avg_pool2d_with([2, 2], o).unwrap().to_vec::<f32>().unwrap(), &avg, "avg 6x6");
    let max = [0.0, 2.0, 4.0, 5.0, 12.0, 14.0, 16.0, 17.0, 24.0, 26.0, 28.0, 29.0, 30.0, 32.0, 34.0, 35.0];
    close(&b.max_pool2d_with([2, 2], o).unwrap().to_vec::<f32>().unwrap(), &max, "max 6x6");

    // F.conv2d(arange(72).view(2,4,3,3)/10, arange(48).view(6,2,2,2)/20 - 1, padding=1, groups=2)
    let xi = Tensor::arange(0.0, 72.0, 1.0, &d).unwrap().reshape([2, 4, 3, 3]).unwrap().div(10.0).unwrap();
    let w =
        Tensor::arange(0.0, 48.0, 1.0, &d).unwrap().reshape([6, 2, 2, 2]).unwrap().div(20.0).unwrap().sub(1.0).unwrap();
    let options = wgrad::Conv2dOptions { padding: [1, 1], groups: 2, ..Default::default() };
    let out = xi.conv2d(&w, None, options).unwrap();
    assert_eq!(out.dims(), [2, 6, 4, 4]);
    let first = [-0.585, -1.365, -1.675, -0.95, -1.71, -3.86, -4.52, -2.51, -2.67, -5.84, -6.5, -3.53];
    close(&out.to_vec::<f32>().unwrap()[..12], &first, "conv groups 2");
}
