//! Misuse that must be an error, and valid input (as PyTorch accepts it)
//! that must not be: version counters, optimizer hyper-parameters, devices,
//! integer division, and edge cases of softmax, reshape and 0-d tensors.

mod common;

use common::device;
use wgrad::{BackwardOptions, DType, Error, Optimizer, Tensor};

fn f32s(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &device()).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

/// One compiler per process: the compiled cases here take turns.
static COMPILER: std::sync::Mutex<()> = std::sync::Mutex::new(());

// ------------------------------------------------------------------ version counters

/// A backward through a retained graph after `opt.step()` changed a saved
/// tensor is an error naming the op, eager and compiled; `.grad` is unchanged.
#[test]
fn backward_after_an_in_place_update_of_a_saved_tensor_is_an_error() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    for compiled in [false, true] {
        let guard = compiled.then(|| wgrad::WgslCompiler::install(&device()).unwrap());
        let w = f32s(&[1.0, 2.0], &[2]).requires_grad(true).unwrap();
        let x = f32s(&[3.0, 4.0], &[2]);
        let loss = w.mul(&x).unwrap().mul(&w).unwrap().sum_all().unwrap(); // saves w
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        let seed = Tensor::ones([], DType::F32, &device()).unwrap();
        assert_eq!(w.version(), 0);
        loss.backward_with(&seed, retain).unwrap();
        let before = values(&w.grad().unwrap());
        let mut opt = wgrad::Sgd::new(std::slice::from_ref(&w), 0.1, 0.0, 0.0).unwrap();
        opt.step().unwrap();
        assert_eq!(w.version(), 1);
        let err = loss.backward_with(&seed, retain).unwrap_err();
        match &err {
            Error::ModifiedInPlace { op, expected, found, .. } => {
                assert_eq!(*op, "mul", "compiled: {compiled}");
                assert_eq!((*expected, *found), (0, 1));
            }
            other => panic!("compiled {compiled}: expected ModifiedInPlace, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("in-place") && msg.contains("optimizer.step()"), "{msg}");
        assert_eq!(values(&w.grad().unwrap()), before, "a failed backward leaves .grad alone");
        // A fresh forward after the step is fine.
        w.zero_grad();
        w.mul(&x).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(values(&w.grad().unwrap()), vec![3.0, 4.0]);
        drop(guard);
    }
}

// ------------------------------------------------------------------ optimizer hyper-parameters

#[test]
fn invalid_hyper_parameters_are_refused() {
    let p = f32s(&[1.0], &[1]).requires_grad(true).unwrap();
    let ps = std::slice::from_ref(&p);
    let bad_sgd =
        [(f64::NAN, 0.0, 0.0), (f64::INFINITY, 0.0, 0.0), (-0.1, 0.0, 0.0), (0.1, -0.9, 0.0), (0.1, 0.0, -1e-4)];
    for (lr, momentum, wd) in bad_sgd {
        let err = wgrad::Sgd::new(ps, lr, momentum, wd).err().expect("refused");
        assert!(err.to_string().contains("Sgd::new") && err.to_string().contains("invalid"), "{err}");
    }
    let bad_adam =
        [(0.1, (1.0, 0.999), 1e-8), (0.1, (0.9, -0.1), 1e-8), (0.1, (0.9, 0.999), -1.0), (-1.0, (0.9, 0.99), 1e-8)];
    for (lr, betas, eps) in bad_adam {
        assert!(wgrad::Adam::with(ps, lr, betas, eps, 0.0).is_err(), "{lr} {betas:?} {eps}");
        assert!(wgrad::AdamW::with(ps, lr, betas, eps, 0.01).is_err(), "{lr} {betas:?} {eps}");
    }
    assert!(wgrad::AdamW::with(ps, 0.1, (0.9, 0.999), 1e-8, f64::NAN).is_err());
    // Zero is valid everywhere (PyTorch accepts lr = 0).
    assert!(wgrad::Sgd::new(ps, 0.0, 0.0, 0.0).is_ok());
    assert!(wgrad::Adam::with(ps, 0.0, (0.0, 0.0), 0.0, 0.0).is_ok());
}

// ------------------------------------------------------------------ devices and grad()

#[test]
fn an_index_on_another_device_is_refused() {
    let other = wgrad::Device::new().unwrap();
    let x = f32s(&[1.0, 2.0, 3.0], &[3]);
    let idx = Tensor::from_slice(&[0i32, 2], [2], &other).unwrap();
    assert!(matches!(x.index_select(0, &idx), Err(Error::DeviceMismatch { op: "index_select", .. })));
    let idx = Tensor::from_slice(&[0i32, 2, 1], [3], &other).unwrap();
    assert!(matches!(x.gather(0, &idx), Err(Error::DeviceMismatch { op: "gather", .. })));
}

#[test]
fn extra_grad_outputs_are_refused() {
    let x = f32s(&[1.0, 2.0], &[2]).requires_grad(true).unwrap();
    let y = x.mul(2.0).unwrap();
    let seeds = [f32s(&[1.0, 1.0], &[2]), f32s(&[1.0, 1.0], &[2])];
    let err = wgrad::grad(&[&y], &[&x], Some(&seeds), Default::default()).unwrap_err();
    assert!(err.to_string().contains("1 outputs but 2 grad_outputs"), "{err}");
}

// ------------------------------------------------------------------ integer division

#[test]
fn integer_division_follows_pytorch() {
    let d = device();
    let a = Tensor::from_slice(&[7i32, -7, 7, -7, 6, 5], [6], &d).unwrap();
    let b = Tensor::from_slice(&[2i32, 2, -2, -2, 3, 0], [6], &d).unwrap();
    // div is true division, as f32.
    let q = a.div(&b).unwrap();
    assert_eq!(q.dtype(), DType::F32);
    assert_eq!(values(&q), vec![3.5, -3.5, -3.5, 3.5, 2.0, f32::INFINITY]);
    assert_eq!((&a / &b).unwrap().dtype(), DType::F32);
    // floor_divide rounds toward -inf; an integer zero divisor gives 0.
    let f = a.floor_divide(&b).unwrap();
    assert_eq!(f.dtype(), DType::I32);
    assert_eq!(f.to_vec::<i32>().unwrap(), vec![3, -4, -4, 3, 2, 0]);
    let u = Tensor::from_slice(&[7u32, 9, 1], [3], &d).unwrap();
    assert_eq!(
        u.floor_divide(Tensor::from_slice(&[2u32, 3, 0], [3], &d).unwrap()).unwrap().to_vec::<u32>().unwrap(),
        vec![3, 3, 0]
    );
    let x = f32s(&[7.0, -7.0, 1.0], &[3]);
    let fx = x.floor_divide(2.0).unwrap();
    assert_eq!(values(&fx), vec![3.0, -4.0, 0.0]);
}

// ------------------------------------------------------------------ valid input PyTorch accepts

#[test]
fn valid_edge_cases_are_accepted() {
    let d = device();
    // softmax, log_softmax and logsumexp over a size-0 dim.
    let e = Tensor::zeros([2, 0], DType::F32, &d).unwrap();
    assert_eq!(e.softmax(1).unwrap().dims(), &[2, 0]);
    assert_eq!(e.log_softmax(-1).unwrap().dims(), &[2, 0]);
    assert_eq!(values(&e.logsumexp(1, false).unwrap()), vec![f32::NEG_INFINITY; 2]);
    // 0-d tensors: axis -1 and 0 name their one virtual dim.
    let s = f32s(&[2.0], &[]);
    assert_eq!(values(&s.sum(&[-1], false).unwrap()), vec![2.0]);
    assert_eq!(values(&s.logsumexp(0, false).unwrap()), vec![2.0]);
    assert_eq!(s.logsumexp(-1, true).unwrap().dims(), &[] as &[usize]);
    assert_eq!(values(&s.softmax(0).unwrap()), vec![1.0]);
    // reshape with an inferred dim.
    let x = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    assert_eq!(x.reshape_infer(&[-1, 2]).unwrap().dims(), &[3, 2]);
    assert_eq!(x.reshape_infer(&[6, -1]).unwrap().dims(), &[6, 1]);
    assert!(x.reshape_infer(&[-1, -1]).is_err());
    assert!(x.reshape_infer(&[4, -1]).is_err());
    assert!(x.reshape_infer(&[-2, 3]).is_err());
    assert!(Tensor::zeros([0, 4], DType::F32, &d).unwrap().reshape_infer(&[0, -1]).is_err());
    // A second backward through a transpose-only graph with retain_graph.
    let w = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]).requires_grad(true).unwrap();
    let t = w.transpose(0, 1).unwrap();
    let seed = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let retain = BackwardOptions { retain_graph: true, ..Default::default() };
    t.backward_with(&seed, retain).unwrap();
    t.backward_with(&seed, retain).unwrap();
    assert_eq!(values(&w.grad().unwrap()), vec![2.0, 6.0, 4.0, 8.0]);
}

/// The same, compiled: a graph of views only (no kernel in its backward but
/// the accumulation) replays, and a second backward with `retain_graph` works.
#[test]
fn view_only_graphs_backward_twice_compiled() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let guard = wgrad::WgslCompiler::install(&device()).unwrap();
    let w = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]).requires_grad(true).unwrap();
    let retain = BackwardOptions { retain_graph: true, ..Default::default() };
    let seed = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let t = w.transpose(0, 1).unwrap();
    t.backward_with(&seed, retain).unwrap();
    t.backward_with(&seed, retain).unwrap();
    assert_eq!(values(&w.grad().unwrap()), vec![2.0, 6.0, 4.0, 8.0]);
    let s = w.t().unwrap().sum_all().unwrap();
    let one = Tensor::ones([], DType::F32, &device()).unwrap();
    w.zero_grad();
    s.backward_with(&one, retain).unwrap();
    s.backward_with(&one, retain).unwrap();
    assert_eq!(values(&w.grad().unwrap()), vec![2.0; 4]);
    assert_eq!(guard.stats().fallbacks, 0, "{:?}", guard.stats());
}

// ------------------------------------------------------------------ removable hooks (issue 12)

/// A removed hook never runs again, eager or compiled, also after its
/// program has been cached and replayed; the other hooks keep running.
#[test]
fn a_removed_hook_never_runs_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    for compiled in [false, true] {
        let guard = compiled.then(|| wgrad::WgslCompiler::install(&device()).unwrap());
        let x = f32s(&[1.0, 2.0], &[2]).requires_grad(true).unwrap();
        let (on_leaf, on_node, kept) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let count = |c: &Arc<AtomicUsize>| {
            let c = c.clone();
            move |_: &Tensor| {
                c.fetch_add(1, Ordering::SeqCst);
                None
            }
        };
        let leaf_handle = x.register_hook(count(&on_leaf)).unwrap();
        x.register_hook(count(&kept)).unwrap();
        let h = x.mul(3.0).unwrap();
        let node_handle = h.register_hook(count(&on_node)).unwrap();
        let loss = h.sum_all().unwrap();
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        let one = Tensor::ones([], DType::F32, &device()).unwrap();
        for _ in 0..2 {
            loss.backward_with(&one, retain).unwrap(); // the second one replays when compiled
        }
        assert_eq!((on_leaf.load(Ordering::SeqCst), on_node.load(Ordering::SeqCst)), (2, 2));
        leaf_handle.remove();
        node_handle.remove();
        leaf_handle.remove(); // twice is harmless
        for _ in 0..2 {
            loss.backward_with(&one, retain).unwrap();
        }
        assert_eq!((on_leaf.load(Ordering::SeqCst), on_node.load(Ordering::SeqCst)), (2, 2), "compiled {compiled}");
        assert_eq!(kept.load(Ordering::SeqCst), 4, "the other hook still runs");
        assert_eq!(values(&x.grad().unwrap()), vec![12.0, 12.0]);
        if let Some(g) = guard {
            assert_eq!(g.stats().fallbacks, 0);
            assert!(g.stats().replays >= 4, "{:?}", g.stats());
        }
    }
}
