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
