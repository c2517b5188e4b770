//! Hostile and edge-case input: each case either gives PyTorch's answer or
//! a clear `Err`, and never panics, aborts or corrupts another tensor.

mod common;

use common::device;
use wgrad::{DType, Error, Tensor};

fn f32s(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &device()).unwrap()
}

fn scalar(v: f32) -> Tensor {
    Tensor::from_slice(&[v], [0usize; 0], &device()).unwrap()
}

// ------------------------------------------------------------------ deep graphs

/// Dropping a long chain frees it iteratively (recursion would overflow the stack).
#[test]
fn dropping_a_million_node_chain_does_not_overflow_the_stack() {
    let x = f32s(&[1.0], &[1]).requires_grad(true).unwrap();
    // Build under a small stack so a recursive drop would fail fast even for fewer nodes.
    let handle = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut y = x.clone();
            for _ in 0..1_000_000 {
                y = y.add(0.5).unwrap();
            }
            drop(y);
        })
        .unwrap();
    handle.join().expect("the chain dropped without overflowing the stack");
}

// ------------------------------------------------------------------ 0-d tensors

#[test]
fn zero_d_movement_and_indexing_match_pytorch_or_err() {
    let s = scalar(3.0);
    // transpose(0, 0) of a 0-d tensor is the tensor itself in PyTorch.
    let t = s.transpose(0, 0).unwrap();
    assert_eq!(t.dims(), &[] as &[usize]);
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![3.0]);
    assert_eq!(s.transpose(-1, 0).unwrap().to_vec::<f32>().unwrap(), vec![3.0]);
    // cat of 0-d tensors: PyTorch refuses ("zero-dimensional tensor cannot be concatenated").
    let err = wgrad::cat(&[&s, &s], 0).unwrap_err();
    assert!(err.to_string().contains("cat"), "{err}");
    // stack of 0-d tensors gives a vector.
    let st = wgrad::stack(&[&s, &scalar(4.0)], 0).unwrap();
    assert_eq!(st.dims(), &[2]);
    assert_eq!(st.to_vec::<f32>().unwrap(), vec![3.0, 4.0]);
    // index_select on a 0-d input with a 0-d or one-element index: PyTorch treats it as size 1.
    let idx0 = Tensor::from_slice(&[0i32], [1], &device()).unwrap();
    let r = s.index_select(0, &idx0).unwrap();
    assert_eq!(r.to_vec::<f32>().unwrap(), vec![3.0]);
    let bad = Tensor::from_slice(&[1i32], [1], &device()).unwrap();
    assert!(s.index_select(0, &bad).is_err());
    // gather on a 0-d input with a 0-d index.
    let idx_s = Tensor::from_slice(&[0i32], [0usize; 0], &device()).unwrap();
    let g = s.gather(0, &idx_s).unwrap();
    assert_eq!(g.dims(), &[] as &[usize]);
    assert_eq!(g.to_vec::<f32>().unwrap(), vec![3.0]);
    assert!(s.gather(0, &Tensor::from_slice(&[2i32], [0usize; 0], &device()).unwrap()).is_err());
}

// ------------------------------------------------------------------ shape arithmetic

#[test]
fn huge_shapes_are_errors_not_overflow() {
    let d = device();
    for shape in [vec![0, usize::MAX, 2], vec![usize::MAX, 2], vec![1 << 40, 1 << 40]] {
        let r = Tensor::zeros(shape.clone(), DType::F32, &d);
        // [0, MAX, 2] has no elements; PyTorch accepts it, and so may we, but
        // anything that reads its strides must not overflow.
        if let Ok(t) = r {
            assert_eq!(t.numel(), 0, "{shape:?}");
            let s = t.sum_all().unwrap();
            assert_eq!(s.to_vec::<f32>().unwrap(), vec![0.0]);
        }
    }
    let x = f32s(&[1.0; 4], &[4]);
    assert!(x.reshape([usize::MAX, 2, 2]).is_err());
    let e = Tensor::zeros([0, 2], DType::F32, &d).unwrap();
    assert!(e.reshape([0, usize::MAX, 2]).is_err() || e.reshape([0, usize::MAX, 2]).unwrap().numel() == 0);
    let img = Tensor::zeros([1, 1, 4, 4], DType::F32, &d).unwrap();
    let w = Tensor::zeros([1, 1, 3, 3], DType::F32, &d).unwrap();
    for options in [
        wgrad::Conv2dOptions { padding: [usize::MAX / 2, 0], ..Default::default() },
        wgrad::Conv2dOptions { dilation: [usize::MAX / 2, 1], ..Default::default() },
        wgrad::Conv2dOptions { stride: [usize::MAX, 1], padding: [usize::MAX, 0], ..Default::default() },
    ] {
        let err = img.conv2d(&w, None, options).unwrap_err();
        assert!(err.to_string().contains("conv2d"), "{err}");
    }
    assert!(img.max_pool2d([2, 2], [2, 2], [usize::MAX / 2, 0]).is_err());
}

// ------------------------------------------------------------------ empty reductions

#[test]
fn empty_reductions_give_pytorch_results() {
    let d = device();
    // Dirty the pool so that stale data would show.
    for _ in 0..3 {
        let junk = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[8]);
        junk.mul(2.0).unwrap().to_vec::<f32>().unwrap();
    }
    let e = Tensor::zeros([3, 0], DType::F32, &d).unwrap();
    assert_eq!(e.sum(&[1], false).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 3]);
    assert!(e.mean(&[1], false).unwrap().to_vec::<f32>().unwrap().iter().all(|v| v.is_nan()));
    assert_eq!(e.sum(&[0], false).unwrap().dims(), &[0]);
    assert_eq!(e.sum_all().unwrap().to_vec::<f32>().unwrap(), vec![0.0]);
    assert!(e.mean_all().unwrap().to_vec::<f32>().unwrap()[0].is_nan());
    assert!(e.max(&[1], false).is_err());
    assert!(e.max_all().is_err());
    assert!(e.min(&[1], false).is_err());
    // max over the non-empty axis of an empty tensor is an empty result.
    assert_eq!(e.max(&[0], false).unwrap().dims(), &[0]);
    let big = Tensor::zeros([1000, 0], DType::F32, &d).unwrap();
    assert_eq!(big.sum(&[1], false).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 1000]);
    // An unrelated op in the same batch is untouched.
    let x = f32s(&[1.0, 2.0], &[2]);
    let y = x.exp().unwrap();
    let s = big.sum(&[1], false).unwrap();
    let y = y.to_vec::<f32>().unwrap();
    assert!((y[0] - 1.0f32.exp()).abs() < 1e-6 && (y[1] - 2.0f32.exp()).abs() < 1e-5, "{y:?}");
    assert_eq!(s.to_vec::<f32>().unwrap(), vec![0.0; 1000]);
}

#[test]
fn empty_reduction_backward_gives_empty_or_zero_grads() {
    let d = device();
    for _ in 0..3 {
        f32s(&[2.0, 4.0, 6.0], &[3]).add(1.0).unwrap().to_vec::<f32>().unwrap();
    }
    let e = Tensor::zeros([3, 0], DType::F32, &d).unwrap().requires_grad(true).unwrap();
    e.sum_all().unwrap().backward().unwrap();
    let g = e.grad().unwrap();
    assert_eq!(g.dims(), &[3, 0]);
    assert!(g.to_vec::<f32>().unwrap().is_empty());
    // A bias that meets an empty batch gets a zero gradient, not pool data.
    let b = f32s(&[1.0, 2.0, 3.0], &[3]).requires_grad(true).unwrap();
    let x = Tensor::zeros([0, 3], DType::F32, &d).unwrap();
    x.add(&b).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(b.grad().unwrap().to_vec::<f32>().unwrap(), vec![0.0; 3]);
    // Cross-entropy over an empty batch: mean is NaN (0/0), sum is 0.
    let logits = Tensor::zeros([0, 4], DType::F32, &d).unwrap().requires_grad(true).unwrap();
    let labels = Tensor::from_slice(&[] as &[i32], [0], &d).unwrap();
    let mean = logits.cross_entropy(&labels, Default::default()).unwrap();
    assert!(mean.to_vec::<f32>().unwrap()[0].is_nan());
    let sum = logits
        .cross_entropy(&labels, wgrad::ClassLoss { reduction: wgrad::Reduction::Sum, ..Default::default() })
        .unwrap();
    assert_eq!(sum.to_vec::<f32>().unwrap(), vec![0.0]);
    sum.backward().unwrap();
    assert_eq!(logits.grad().unwrap().dims(), &[0, 4]);
}

// ------------------------------------------------------------------ ranks at the call

#[test]
fn rank_nine_is_refused_at_the_call_in_every_mode() {
    let d = device();
    for merge in [true, false] {
        d.set_merge_elementwise(merge);
        let err = Tensor::ones([1usize; 9], DType::F32, &d).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
        assert!(err.to_string().contains("rank 9"), "{err}");
        let x = f32s(&[1.0, 2.0], &[2]);
        assert!(x.reshape([1usize, 1, 1, 1, 1, 1, 1, 1, 2]).is_err());
        // The device is fine afterwards.
        assert_eq!(x.mul(2.0).unwrap().to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
    }
    d.set_merge_elementwise(true);
}

// ------------------------------------------------------------------ compiled mode

/// One compiler per process: the compiled cases here take turns.
static COMPILER: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn empty_reductions_in_the_compiled_backward_give_zero_grads() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let d = device();
    let guard = wgrad::WgslCompiler::install(&d).unwrap();
    for _ in 0..3 {
        f32s(&[2.0, 4.0, 6.0], &[3]).add(1.0).unwrap().to_vec::<f32>().unwrap();
    }
    let b = f32s(&[1.0, 2.0, 3.0], &[3]).requires_grad(true).unwrap();
    let w = f32s(&[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], &[3, 2]).requires_grad(true).unwrap();
    let x = Tensor::zeros([0, 3], DType::F32, &d).unwrap();
    for _ in 0..2 {
        let loss = x.add(&b).unwrap().tanh().unwrap().matmul(&w).unwrap().sum_all().unwrap();
        assert_eq!(loss.to_vec::<f32>().unwrap(), vec![0.0]);
        loss.backward().unwrap();
        assert_eq!(b.grad().unwrap().to_vec::<f32>().unwrap(), vec![0.0; 3]);
        assert_eq!(w.grad().unwrap().to_vec::<f32>().unwrap(), vec![0.0; 6]);
        b.zero_grad();
        w.zero_grad();
    }
    assert!(guard.stats().replays >= 1, "{:?}", guard.stats());
}

/// `.grad` after a backward whose hook changes a leaf's `.grad` mid-way,
/// with or without a compiler installed.
fn grad_after_hook_mutation(compiled: bool, set_to: Option<f32>) -> Vec<f32> {
    let d = device();
    let guard = compiled.then(|| wgrad::WgslCompiler::install(&d).unwrap());
    let x = f32s(&[1.0, 2.0], &[2]).requires_grad(true).unwrap();
    let mut result = Vec::new();
    // Twice, so the compiled run replays a cached program the second time.
    for _ in 0..2 {
        x.set_grad(Some(f32s(&[100.0, 100.0], &[2]))).unwrap();
        let h = x.mul(3.0).unwrap();
        let leaf = x.clone();
        let dev = d.clone();
        h.register_hook(move |_| {
            match set_to {
                None => leaf.zero_grad(),
                Some(v) => leaf.set_grad(Some(Tensor::full([2], v as f64, DType::F32, &dev).unwrap())).unwrap(),
            }
            None
        })
        .unwrap();
        h.sum_all().unwrap().backward().unwrap();
        result = x.grad().unwrap().to_vec::<f32>().unwrap();
    }
    if let Some(g) = guard {
        assert_eq!(g.stats().fallbacks, 0);
        assert!(g.stats().replays >= 2);
    }
    result
}

#[test]
fn compiled_reads_grad_after_hooks_like_eager() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    for set_to in [None, Some(50.0)] {
        let eager = grad_after_hook_mutation(false, set_to);
        let compiled = grad_after_hook_mutation(true, set_to);
        let expected = match set_to {
            None => vec![3.0, 3.0],
            Some(v) => vec![v + 3.0, v + 3.0],
        };
        assert_eq!(eager, expected);
        assert_eq!(compiled, expected);
    }
}

#[test]
fn a_panicking_hook_does_not_disable_replay() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let d = device();
    let guard = wgrad::WgslCompiler::install(&d).unwrap();
    let x = f32s(&[1.0, 2.0], &[2]).requires_grad(true).unwrap();
    let run = |panic: bool| {
        let h = x.mul(3.0).unwrap();
        h.register_hook(move |_| {
            if panic {
                panic!("hook panics on purpose");
            }
            None
        })
        .unwrap();
        h.sum_all().unwrap().backward()
    };
    run(false).unwrap(); // capture
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(true)));
    assert!(caught.is_err());
    let before = guard.stats();
    x.zero_grad();
    run(false).unwrap();
    let after = guard.stats();
    assert_eq!(after.replays, before.replays + 1, "{before:?} -> {after:?}");
    assert_eq!(after.fallbacks, before.fallbacks);
    assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), vec![3.0, 3.0]);
}

// ------------------------------------------------------------------ NaN propagation

fn is_nan_at(v: &[f32], i: usize) -> bool {
    v[i].is_nan()
}

/// Every op PyTorch propagates NaN through does here too, forward; the
/// non-NaN elements keep their values.
#[test]
fn nan_propagates_through_max_like_ops() {
    let nan = f32::NAN;
    let x = f32s(&[nan, -1.0, 2.0, nan], &[4]);
    let y = f32s(&[0.0, nan, 1.0, 5.0], &[4]);
    let relu = x.relu().unwrap().to_vec::<f32>().unwrap();
    assert!(is_nan_at(&relu, 0) && relu[1] == 0.0 && relu[2] == 2.0);
    for r in [x.maximum(&y).unwrap(), x.minimum(&y).unwrap()] {
        let r = r.to_vec::<f32>().unwrap();
        assert!(r[0].is_nan() && r[1].is_nan() && r[3].is_nan(), "{r:?}");
    }
    assert_eq!(x.maximum(&y).unwrap().to_vec::<f32>().unwrap()[2], 2.0);
    assert!(x.maximum(0.0).unwrap().to_vec::<f32>().unwrap()[0].is_nan());
    let c = x.clamp(-0.5, 0.5).unwrap().to_vec::<f32>().unwrap();
    assert!(c[0].is_nan() && c[1] == -0.5 && c[2] == 0.5 && c[3].is_nan(), "{c:?}");
    let t = x.tanh().unwrap().to_vec::<f32>().unwrap();
    assert!(t[0].is_nan(), "tanh(NaN) = {}", t[0]);
    let p = x.powf(2.0).unwrap().to_vec::<f32>().unwrap();
    assert!(p[0].is_nan() && p[1] == 1.0, "{p:?}");
    assert_eq!(x.powf(0.0).unwrap().to_vec::<f32>().unwrap(), vec![1.0; 4]);
    // Reductions: a NaN anywhere in the reduced slice wins, wherever it sits.
    let m = f32s(&[1.0, nan, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let rows = m.max(&[1], false).unwrap().to_vec::<f32>().unwrap();
    assert!(rows[0].is_nan() && rows[1] == 6.0, "{rows:?}");
    let cols = m.min(&[0], false).unwrap().to_vec::<f32>().unwrap();
    assert!(cols[0] == 1.0 && cols[1].is_nan() && cols[2] == 3.0, "{cols:?}");
    assert!(m.max_all().unwrap().to_scalar::<f32>().unwrap().is_nan());
    // Large enough to take the chunked and vectorised reduction paths.
    let mut big = vec![1.0f32; 1 << 16];
    big[40_000] = nan;
    let b = f32s(&big, &[1 << 16]);
    assert!(b.max_all().unwrap().to_scalar::<f32>().unwrap().is_nan());
    assert!(b.min(&[0], false).unwrap().to_scalar::<f32>().unwrap().is_nan());
    let img =
        f32s(&[1.0, 2.0, nan, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0], &[1, 1, 4, 4]);
    let pooled = img.max_pool2d([2, 2], [2, 2], [0, 0]).unwrap().to_vec::<f32>().unwrap();
    assert!(!pooled[0].is_nan() && pooled[1].is_nan(), "{pooled:?}");
    // where: a NaN condition is non-zero, so true, as the README says.
    let ones = f32s(&[1.0; 4], &[4]);
    let w = x.where_(&ones, 0.0).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(w, vec![1.0, 1.0, 1.0, 1.0]);
    let zero_cond = f32s(&[0.0, -0.0], &[2]).where_(ones.narrow(0, 0, 2).unwrap(), 0.0).unwrap();
    let zero_cond = zero_cond.to_vec::<f32>().unwrap();
    assert_eq!(zero_cond, vec![0.0, 0.0]);
}

/// Gradients through NaN follow PyTorch's formulas, eager and compiled alike.
#[test]
fn nan_gradients_follow_pytorch_eager_and_compiled() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let nan = f32::NAN;
    let run = |compiled: bool| -> Vec<Vec<f32>> {
        let d = device();
        let guard = compiled.then(|| wgrad::WgslCompiler::install(&d).unwrap());
        let x = f32s(&[nan, -1.0, 2.0, 0.5], &[4]).requires_grad(true).unwrap();
        let y = f32s(&[0.0, nan, 1.0, 0.5], &[4]).requires_grad(true).unwrap();
        let w = f32s(&[1.0, 2.0, 3.0, 4.0], &[4]);
        let mut out = Vec::new();
        for _ in 0..2 {
            x.zero_grad();
            y.zero_grad();
            let loss = x
                .relu()
                .unwrap()
                .add(x.maximum(&y).unwrap())
                .unwrap()
                .add(x.clamp(-0.5, 0.5).unwrap())
                .unwrap()
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap();
            assert!(loss.to_scalar::<f32>().unwrap().is_nan());
            loss.backward().unwrap();
            out = vec![x.grad().unwrap().to_vec::<f32>().unwrap(), y.grad().unwrap().to_vec::<f32>().unwrap()];
        }
        if let Some(g) = guard {
            assert_eq!(g.stats().fallbacks, 0);
        }
        out
    };
    let eager = run(false);
    // relu: w where x > 0 or NaN; maximum: both sides get w where a NaN is
    // compared, the winner elsewhere, half each on ties; clamp: w where
    // -0.5 <= x <= 0.5 only.
    let expect_x = [1.0 + 1.0 + 0.0, 0.0 + 2.0 + 0.0, 3.0 + 3.0 + 0.0, 4.0 + 2.0 + 4.0];
    let expect_y = [1.0, 2.0, 0.0, 2.0];
    assert_eq!(eager[0], expect_x, "x");
    assert_eq!(eager[1], expect_y, "y");
    let compiled = run(true);
    assert_eq!(compiled, eager);
}

// ------------------------------------------------------------------ the loop budget

/// A float64 dot product of two f32 slices.
fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

fn close(got: f32, want: f64, what: &str) {
    let tol = 1e-4 * want.abs().max(1.0);
    assert!((f64::from(got) - want).abs() <= tol, "{what}: got {got}, want {want}");
}

/// llvmpipe ends an invocation after 65,535 loop back-edges; long
/// contractions, long reductions and long scatter-add segments are split so
/// that every one gives the right answer.
#[test]
fn long_contractions_and_reductions_are_exact() {
    let d = device();
    for k in [65_536usize, 200_000] {
        let ones = Tensor::ones([1, k], DType::F32, &d).unwrap();
        let col = Tensor::ones([k, 1], DType::F32, &d).unwrap();
        assert_eq!(ones.matmul(&col).unwrap().to_vec::<f32>().unwrap(), vec![k as f32], "ones, k = {k}");
        let a = Tensor::rand([2, k], 1, &d).unwrap();
        let b = Tensor::rand([k, 3], 2, &d).unwrap();
        let (av, bv) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        let c = a.matmul(&b).unwrap().to_vec::<f32>().unwrap();
        for i in 0..2 {
            for j in 0..3 {
                let col: Vec<f32> = (0..k).map(|r| bv[r * 3 + j]).collect();
                close(c[i * 3 + j], dot64(&av[i * k..(i + 1) * k], &col), &format!("matmul k = {k} ({i}, {j})"));
            }
        }
    }
    // A strided reduction: the sum over the first axis of a [70000, 2] tensor
    // reads with stride 2, one output per invocation.
    let n = 70_000;
    let x = Tensor::rand([n, 2], 3, &d).unwrap();
    let xv = x.to_vec::<f32>().unwrap();
    let s = x.sum(&[0], false).unwrap().to_vec::<f32>().unwrap();
    for j in 0..2 {
        close(s[j], (0..n).map(|i| f64::from(xv[i * 2 + j])).sum(), "strided sum");
    }
    // A broadcast reduction: max over a broadcast view of 65,534 + 1 values.
    let v = Tensor::arange(0.0, 65_535.0, 1.0, &d).unwrap().reshape([65_535, 1]).unwrap();
    let wide = v.broadcast_to([65_535, 3]).unwrap();
    assert_eq!(wide.max(&[0], false).unwrap().to_vec::<f32>().unwrap(), vec![65_534.0; 3]);
    assert_eq!(wide.transpose(0, 1).unwrap().max(&[1], false).unwrap().to_vec::<f32>().unwrap(), vec![65_534.0; 3]);
    // Enough outputs that each gets one invocation (no chunks for
    // parallelism), each reading 66,000 elements of a broadcast row.
    let row = Tensor::ones([1, 66_000], DType::F32, &d).unwrap();
    let tall = row.broadcast_to([16_384, 66_000]).unwrap();
    let sums = tall.sum(&[1], false).unwrap().to_vec::<f32>().unwrap();
    let wrong = sums.iter().position(|&v| v != 66_000.0);
    assert!(sums.len() == 16_384 && wrong.is_none(), "sum {:?} at {wrong:?}, want 66000", wrong.map(|i| sums[i]));
}

#[test]
fn an_index_repeated_past_the_loop_budget_accumulates_exactly() {
    let d = device();
    let w = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]).requires_grad(true).unwrap();
    let mut ids = vec![0i32; 70_000];
    ids.extend([2, 2, 1]);
    let ids = Tensor::from_slice(&ids, [ids.len()], &d).unwrap();
    let rows = wgrad::embedding(&ids, &w).unwrap();
    rows.sum_all().unwrap().backward().unwrap();
    assert_eq!(w.grad().unwrap().to_vec::<f32>().unwrap(), vec![70_000.0, 70_000.0, 1.0, 1.0, 2.0, 2.0]);
}

#[test]
fn loop_budget_splits_hold_in_the_compiled_backward() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let d = device();
    let guard = wgrad::WgslCompiler::install(&d).unwrap();
    // The gradient of b is a^T @ (g * w3): a contraction over k = 70,000.
    let k = 70_000;
    let a = Tensor::rand([k, 2], 5, &d).unwrap().requires_grad(true).unwrap();
    let b = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).requires_grad(true).unwrap();
    let w3 = Tensor::rand([k, 3], 6, &d).unwrap();
    let w = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]).requires_grad(true).unwrap();
    let ids = Tensor::from_slice(&vec![1i32; 70_000], [70_000], &d).unwrap();
    let (av, wv) = (a.to_vec::<f32>().unwrap(), w3.to_vec::<f32>().unwrap());
    for _ in 0..2 {
        let y = a.matmul(&b).unwrap().mul(&w3).unwrap().sum_all().unwrap();
        let e = wgrad::embedding(&ids, &w).unwrap().sum_all().unwrap();
        y.add(&e).unwrap().backward().unwrap();
        let gb = b.grad().unwrap().to_vec::<f32>().unwrap();
        for i in 0..2 {
            for j in 0..3 {
                let want: f64 = (0..k).map(|r| f64::from(av[r * 2 + i]) * f64::from(wv[r * 3 + j])).sum();
                close(gb[i * 3 + j], want, "compiled a^T @ g");
            }
        }
        assert_eq!(w.grad().unwrap().to_vec::<f32>().unwrap(), vec![0.0, 0.0, 70_000.0, 70_000.0]);
        for t in [&a, &b, &w] {
            t.zero_grad();
        }
    }
    assert!(guard.stats().replays >= 2 && guard.stats().fallbacks == 0, "{:?}", guard.stats());
}

// ------------------------------------------------------------------ GPU errors in a batch

/// A `.grad` that shares another parameter's buffer is read before any
/// update (copied first), and nothing else in the batch is touched.
#[test]
fn a_grad_sharing_another_parameters_buffer_updates_correctly() {
    use wgrad::Optimizer;
    let p1 = f32s(&[1.0, 2.0, 3.0], &[3]).requires_grad(true).unwrap();
    let p2 = f32s(&[10.0, 20.0, 30.0], &[3]).requires_grad(true).unwrap();
    p1.set_grad(Some(f32s(&[1.0, 1.0, 1.0], &[3]))).unwrap();
    p2.set_grad(Some(p1.clone())).unwrap(); // p2's gradient is p1's storage
    let unrelated = f32s(&[0.0, 1.0], &[2]).exp().unwrap();
    let mut opt = wgrad::Sgd::new(&[p1.clone(), p2.clone()], 1.0, 0.0, 0.0).unwrap();
    opt.step().unwrap();
    assert_eq!(p1.to_vec::<f32>().unwrap(), vec![0.0, 1.0, 2.0]);
    assert_eq!(p2.to_vec::<f32>().unwrap(), vec![9.0, 18.0, 27.0]); // p2 -= p1 as it was before the step
    let u = unrelated.to_vec::<f32>().unwrap();
    assert!((u[0] - 1.0).abs() < 1e-6 && (u[1] - 1.0f32.exp()).abs() < 1e-5, "{u:?}");
    // The same parameter twice, or two handles to one buffer, is refused.
    let err = wgrad::Sgd::new(&[p1.clone(), p1.clone()], 0.1, 0.0, 0.0).err().expect("duplicate parameter");
    assert!(err.to_string().contains("share one buffer"), "{err}");
}

/// Cancelling arithmetic keeps IEEE's NaN: drivers may assume floats are
/// never NaN or infinite and fold `x - x` and `x + (-x)` to 0 (llvmpipe
/// does, in one kernel or across fused ops), and compile `!=` as an
/// ordered comparison (false with a NaN operand). PyTorch gives NaN for
/// `inf - inf`, `NaN - NaN` and `inf + (-inf)`, and `NaN != x` is true: so
/// does every mode here, f16 too.
#[test]
fn cancelling_arithmetic_and_not_equal_keep_nan() {
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let x = f32s(&[nan, inf, -inf, 1.5], &[4]);
    let cancel = |r: Tensor| {
        let r = r.to_vec::<f32>().unwrap();
        assert!(r[0].is_nan() && r[1].is_nan() && r[2].is_nan() && r[3] == 0.0, "{r:?}");
    };
    cancel(x.sub(&x).unwrap());
    cancel(x.add(x.neg().unwrap()).unwrap());
    // Fused: the pending group makes the two ops one kernel.
    let y = x.mul(2.0).unwrap();
    cancel(y.sub(&y).unwrap());
    cancel(y.add(y.neg().unwrap()).unwrap());
    let h = x.to_dtype(DType::F16);
    if let Ok(h) = h {
        let r = h.sub(&h).unwrap().to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap();
        assert!(r[0].is_nan() && r[1].is_nan() && r[2].is_nan() && r[3] == 0.0, "f16: {r:?}");
    }
    // A sum that does not cancel stays what it is.
    let s = x.add(f32s(&[1.0, inf, 1.0, -1.5], &[4])).unwrap().to_vec::<f32>().unwrap();
    assert!(s[0].is_nan() && s[1] == inf && s[2] == -inf && s[3] == 0.0, "{s:?}");
    let other = f32s(&[1.0, inf, nan, 1.5], &[4]);
    assert_eq!(x.ne(&x).unwrap().to_vec::<u32>().unwrap(), vec![1, 0, 0, 0]);
    assert_eq!(x.ne(&other).unwrap().to_vec::<u32>().unwrap(), vec![1, 0, 1, 0]);
    assert_eq!(x.eq(&x).unwrap().to_vec::<u32>().unwrap(), vec![0, 1, 1, 1]);
}

/// The centering backward over a batch of 1 cancels in one fused kernel
/// (`g + (-g)`): with an infinite scale (an unbiased variance's 1 / (B - 1)
/// at B = 1) eager mode's gradient is NaN, and so is the compiled one.
#[test]
fn the_compiled_backward_keeps_nan_where_a_fused_kernel_cancels() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let d = device();
    let w = Tensor::randn([6, 5], 1, &d).unwrap().detach().requires_grad(true).unwrap();
    let x = wgrad::nn::uniform([1, 6], 1.0, 3, &d).unwrap().detach();
    let grad = |compiled: bool| {
        let guard = compiled.then(|| wgrad::WgslCompiler::install(&d).unwrap());
        w.zero_grad();
        let h = x.matmul(&w).unwrap();
        let var = h.sub(h.mean(&[0], true).unwrap()).unwrap().square().unwrap().sum(&[0], false).unwrap();
        var.mul(f64::INFINITY).unwrap().sum_all().unwrap().backward().unwrap();
        drop(guard);
        w.grad().unwrap().to_vec::<f32>().unwrap()
    };
    for compiled in [false, true] {
        let g = grad(compiled);
        assert!(g.iter().all(|v| v.is_nan()), "compiled {compiled}: {g:?}");
    }
}
