//! Behaviour of the eager autograd engine, each case against hand-computed values:
//! gradient accumulation, retain_graph, `wgrad::grad`, no_grad, hooks, higher-order
//! gradients, seeds, detach, edge metadata and thread safety.

mod common;

use std::sync::{Arc, Mutex};

use common::device;
use wgrad::{BackwardOptions, DType, Error, Tensor};

fn leaf(data: &[f32]) -> Tensor {
    Tensor::from_slice(data, [data.len()], &device()).unwrap().requires_grad(true).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

fn grad_of(t: &Tensor) -> Vec<f32> {
    vals(&t.grad().expect("the leaf has a .grad"))
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 + 1e-5 * w.abs();
        assert!((g as f64 - w).abs() <= tol, "element {i}: got {g}, want {w} (all: {got:?} vs {want:?})");
    }
}

/// What hooks record, shared with the test.
type Log<T> = Arc<Mutex<Vec<T>>>;

const RETAIN: BackwardOptions = BackwardOptions { retain_graph: true, create_graph: false, allow_unused: false };
const CREATE: BackwardOptions = BackwardOptions { retain_graph: false, create_graph: true, allow_unused: false };

// ------------------------------------------------------------------ accumulation in one graph

#[test]
fn tensor_used_three_times_sums_the_three_paths() {
    let xs = [0.5f64, -1.0, 2.0];
    let x = leaf(&xs.map(|v| v as f32));
    // y = x*x + x*3 + exp(x): x reaches the loss along four edges (x*x uses it twice).
    let y = x.mul(&x).unwrap().add(x.mul(3.0).unwrap()).unwrap().add(x.exp().unwrap()).unwrap();
    y.sum_all().unwrap().backward().unwrap();
    let want: Vec<f64> = xs.iter().map(|&v| 2.0 * v + 3.0 + v.exp()).collect();
    assert_close(&grad_of(&x), &want);
}

#[test]
fn gradients_accumulate_until_zero_grad() {
    let x = leaf(&[1.0, 2.0, -3.0]);
    let loss = |x: &Tensor| x.mul(x).unwrap().sum_all().unwrap(); // d/dx = 2x
    assert!(x.grad().is_none());
    loss(&x).backward().unwrap();
    assert_close(&grad_of(&x), &[2.0, 4.0, -6.0]);
    loss(&x).backward().unwrap();
    assert_close(&grad_of(&x), &[4.0, 8.0, -12.0]);

    x.zero_grad();
    assert!(x.grad().is_none(), "zero_grad forgets the gradient");
    loss(&x).backward().unwrap();
    assert_close(&grad_of(&x), &[2.0, 4.0, -6.0]);

    // A clone of the handle shares the same .grad.
    let alias = x.clone();
    alias.zero_grad();
    assert!(x.grad().is_none());
}

#[test]
fn retain_graph_allows_a_second_backward() {
    let x = leaf(&[1.0, 2.0]);
    let loss = x.mul(&x).unwrap().mul(&x).unwrap().sum_all().unwrap(); // d/dx = 3x²
    let seed = Tensor::ones([], DType::F32, &device()).unwrap();
    loss.backward_with(&seed, RETAIN).unwrap();
    assert_close(&grad_of(&x), &[3.0, 12.0]);
    // The second backward (default options) still finds the saved tensors, then releases them.
    loss.backward().unwrap();
    assert_close(&grad_of(&x), &[6.0, 24.0]);
    // A third one finds the graph released and changes nothing.
    let err = loss.backward().unwrap_err();
    assert!(matches!(err, Error::GraphReleased { .. }), "{err:?}");
    assert_close(&grad_of(&x), &[6.0, 24.0]);
}

#[test]
fn without_retain_graph_the_second_backward_fails_and_leaves_grad() {
    let x = leaf(&[1.0, 2.0]);
    let loss = x.exp().unwrap().mul(&x).unwrap().sum_all().unwrap(); // d/dx = e^x (1 + x)
    loss.backward().unwrap();
    let first = grad_of(&x);
    assert_close(&first, &[2.0 * 1f64.exp(), 3.0 * 2f64.exp()]);
    let err = loss.backward().unwrap_err();
    assert!(matches!(err, Error::GraphReleased { .. }), "{err:?}");
    assert!(err.to_string().contains("retain_graph"), "{err}");
    assert_eq!(grad_of(&x), first, ".grad is unchanged by the failed backward");
}

// ------------------------------------------------------------------ wgrad::grad

#[test]
fn grad_returns_gradients_without_touching_dot_grad() {
    let x = leaf(&[1.0, -2.0, 0.5]);
    let y = x.mul(&x).unwrap().sum_all().unwrap();
    assert!(x.grad().is_none());
    let g = wgrad::grad(&[&y], &[&x], None, BackwardOptions::default()).unwrap();
    assert_eq!(g.len(), 1);
    assert_close(&vals(g[0].as_ref().unwrap()), &[2.0, -4.0, 1.0]);
    assert!(x.grad().is_none(), "grad() must not accumulate into .grad");

    // With an explicit seed on a non-scalar output.
    let z = x.mul(&x).unwrap();
    let seed = Tensor::from_slice(&[1.0f32, 10.0, 100.0], [3], &device()).unwrap();
    let g = wgrad::grad(&[&z], &[&x], Some(&[seed]), BackwardOptions::default()).unwrap();
    assert_close(&vals(g[0].as_ref().unwrap()), &[2.0, -40.0, 100.0]);
    assert!(x.grad().is_none());
}

#[test]
fn grad_with_respect_to_an_intermediate() {
    let x = leaf(&[1.0, 2.0]);
    let h = x.mul(3.0).unwrap(); // h = 3x
    assert!(!h.is_leaf());
    let y = h.mul(&h).unwrap().sum_all().unwrap(); // dy/dh = 2h = 6x, dy/dx = 18x
    let g = wgrad::grad(&[&y], &[&h, &x], None, RETAIN).unwrap();
    assert_close(&vals(g[0].as_ref().unwrap()), &[6.0, 12.0]);
    assert_close(&vals(g[1].as_ref().unwrap()), &[18.0, 36.0]);
    assert!(x.grad().is_none());
    // Only the intermediate: the graph below it need not run.
    let g = wgrad::grad(&[&y], &[&h], None, BackwardOptions::default()).unwrap();
    assert_close(&vals(g[0].as_ref().unwrap()), &[6.0, 12.0]);
    assert!(x.grad().is_none());
}

#[test]
fn grad_gives_none_for_an_unused_input() {
    let x = leaf(&[1.0, 2.0]);
    let never_used = leaf(&[5.0, 6.0]);
    let used_elsewhere = leaf(&[7.0, 8.0]);
    let _other_graph = used_elsewhere.mul(2.0).unwrap(); // has an accumulator, not reachable from y
    let y = x.mul(2.0).unwrap().sum_all().unwrap();
    // As in PyTorch, an unused input is an error unless `allow_unused`; the
    // error comes before anything runs, so the graph is still there.
    let err = wgrad::grad(&[&y], &[&never_used, &x, &used_elsewhere], None, BackwardOptions::default()).unwrap_err();
    assert!(err.to_string().contains("input 0 was not used") && err.to_string().contains("allow_unused"), "{err}");
    let allow = BackwardOptions { allow_unused: true, ..Default::default() };
    let g = wgrad::grad(&[&y], &[&never_used, &x, &used_elsewhere], None, allow).unwrap();
    assert_eq!(g.len(), 3);
    assert!(g[0].is_none());
    assert_close(&vals(g[1].as_ref().unwrap()), &[2.0, 2.0]);
    assert!(g[2].is_none());
    for t in [&x, &never_used, &used_elsewhere] {
        assert!(t.grad().is_none());
    }
}

/// Regression: `grad(&[&x], &[&x])` of a leaf no live graph used came back `None` (the
/// accumulator was looked up before `run` created it), yet ones once any graph used `x`.
#[test]
fn grad_of_a_leaf_with_respect_to_itself() {
    let x = Tensor::from_slice(&[2.0f32], [], &device()).unwrap().requires_grad(true).unwrap();
    let g = wgrad::grad(&[&x], &[&x], None, BackwardOptions::default()).unwrap();
    assert_eq!(vals(g[0].as_ref().expect("dx/dx is defined")), vec![1.0]);
    let _graph = x.mul(2.0).unwrap(); // keeps an accumulator alive: same answer
    let g = wgrad::grad(&[&x], &[&x], None, BackwardOptions::default()).unwrap();
    assert_eq!(vals(g[0].as_ref().unwrap()), vec![1.0]);

    let v = leaf(&[1.0, 2.0]);
    let seed = Tensor::from_slice(&[3.0f32, 4.0], [2], &device()).unwrap();
    let g = wgrad::grad(&[&v], &[&v], Some(&[seed]), BackwardOptions::default()).unwrap();
    assert_eq!(vals(g[0].as_ref().unwrap()), vec![3.0, 4.0]);
    assert!(x.grad().is_none() && v.grad().is_none());
}

// ------------------------------------------------------------------ no_grad

#[test]
fn no_grad_records_nothing_and_restores_on_drop() {
    let x = leaf(&[1.0, 2.0]);
    assert!(wgrad::is_grad_enabled());
    {
        let _guard = wgrad::no_grad();
        assert!(!wgrad::is_grad_enabled());
        let y = x.mul(2.0).unwrap().exp().unwrap().sum_all().unwrap();
        assert!(!y.needs_grad());
        assert!(y.is_leaf());
        assert!(y.next_edges().is_empty());
        assert_close(&[y.to_scalar::<f32>().unwrap()], &[2f64.exp() + 4f64.exp()]);
        // backward of something built under no_grad has nothing to walk.
        assert!(matches!(y.backward(), Err(Error::NoGradFn { .. })));
        assert!(x.needs_grad(), "the leaf itself still requires grad");
    }
    assert!(wgrad::is_grad_enabled());
    let y = x.mul(2.0).unwrap();
    assert!(y.needs_grad());
    assert!(!y.is_leaf());
}

#[test]
fn nested_no_grad_guards() {
    let x = leaf(&[1.0]);
    assert!(wgrad::is_grad_enabled());
    let outer = wgrad::no_grad();
    {
        let _inner = wgrad::no_grad();
        assert!(!wgrad::is_grad_enabled());
        assert!(!x.exp().unwrap().needs_grad());
    }
    assert!(!wgrad::is_grad_enabled(), "dropping the inner guard restores the outer no_grad");
    assert!(!x.exp().unwrap().needs_grad());
    drop(outer);
    assert!(wgrad::is_grad_enabled());
    assert!(x.exp().unwrap().needs_grad());
}

#[test]
fn no_grad_is_per_thread() {
    let _guard = wgrad::no_grad();
    let other = std::thread::spawn(wgrad::is_grad_enabled).join().unwrap();
    assert!(other, "grad mode is thread-local");
    assert!(!wgrad::is_grad_enabled());
}

// ------------------------------------------------------------------ hooks

#[test]
fn hook_on_a_leaf_sees_the_gradient() {
    let x = leaf(&[1.0, 2.0, 3.0]);
    let seen: Log<Vec<f32>> = Arc::default();
    let s = seen.clone();
    x.register_hook(move |g| {
        s.lock().unwrap().push(g.to_vec::<f32>().unwrap());
        None
    })
    .unwrap();
    x.mul(&x).unwrap().sum_all().unwrap().backward().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "the hook runs once per backward");
    assert_close(&seen[0], &[2.0, 4.0, 6.0]);
    assert_close(&grad_of(&x), &[2.0, 4.0, 6.0]);
}

#[test]
fn hook_returning_a_gradient_replaces_it() {
    let x = leaf(&[1.0, 2.0, 3.0]);
    x.register_hook(|g| Some(g.mul(2.0).unwrap())).unwrap();
    x.mul(&x).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(&grad_of(&x), &[4.0, 8.0, 12.0]);
}

#[test]
fn hooks_run_in_registration_order_and_chain() {
    let x = leaf(&[1.0, 2.0]);
    let order: Log<(&'static str, Vec<f32>)> = Arc::default();
    let o = order.clone();
    x.register_hook(move |g| {
        o.lock().unwrap().push(("first", g.to_vec::<f32>().unwrap()));
        Some(g.mul(2.0).unwrap())
    })
    .unwrap();
    let o = order.clone();
    x.register_hook(move |g| {
        o.lock().unwrap().push(("second", g.to_vec::<f32>().unwrap()));
        Some(g.add(1.0).unwrap())
    })
    .unwrap();
    x.mul(5.0).unwrap().sum_all().unwrap().backward().unwrap();
    let order = order.lock().unwrap();
    let names: Vec<&str> = order.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["first", "second"]);
    assert_close(&order[0].1, &[5.0, 5.0]);
    assert_close(&order[1].1, &[10.0, 10.0]); // the second hook sees the first's output
    assert_close(&grad_of(&x), &[11.0, 11.0]);
}

#[test]
fn hook_on_an_intermediate_runs_before_the_gradient_flows_on() {
    let x = leaf(&[1.0, 2.0]);
    let h = x.mul(3.0).unwrap(); // h = 3x
    let order: Log<&'static str> = Arc::default();
    let o = order.clone();
    h.register_hook(move |g| {
        o.lock().unwrap().push("h");
        Some(g.mul(0.5).unwrap())
    })
    .unwrap();
    let o = order.clone();
    x.register_hook(move |_| {
        o.lock().unwrap().push("x");
        None
    })
    .unwrap();
    let y = h.mul(&h).unwrap().sum_all().unwrap();
    y.backward().unwrap();
    assert_eq!(*order.lock().unwrap(), ["h", "x"]);
    // dy/dh = 2h = 6x, halved by the hook = 3x, times dh/dx = 3 -> 9x (18x without the hook).
    assert_close(&grad_of(&x), &[9.0, 18.0]);
}

#[test]
fn hooks_on_different_tensors_run_closest_to_the_loss_first() {
    let x = leaf(&[1.0, 2.0]);
    let a = x.mul(2.0).unwrap();
    let b = a.exp().unwrap();
    let c = b.mul(&x).unwrap(); // x is used twice: its hook still runs once, last
    let loss = c.sum_all().unwrap();
    let order: Log<&'static str> = Arc::default();
    // Register far-from-the-loss first, so registration order cannot explain the result.
    for (t, name) in [(&x, "x"), (&a, "a"), (&b, "b"), (&c, "c")] {
        let o = order.clone();
        t.register_hook(move |_| {
            o.lock().unwrap().push(name);
            None
        })
        .unwrap();
    }
    loss.backward().unwrap();
    assert_eq!(*order.lock().unwrap(), ["c", "b", "a", "x"]);
    // d/dx (x e^{2x}) = e^{2x} (1 + 2x)
    let want: Vec<f64> = [1.0f64, 2.0].iter().map(|&v| (2.0 * v).exp() * (1.0 + 2.0 * v)).collect();
    let got = grad_of(&x);
    for (g, w) in got.iter().zip(&want) {
        assert!(((*g as f64) - w).abs() <= 1e-4 * w.abs(), "{got:?} vs {want:?}");
    }
}

#[test]
fn hooks_on_a_tensor_not_requiring_grad_are_refused() {
    let t = Tensor::from_slice(&[1.0f32], [1], &device()).unwrap();
    let err = t.register_hook(|_| None).unwrap_err();
    assert!(matches!(err, Error::NoGradFn { .. }), "{err:?}");
}

// ------------------------------------------------------------------ higher order

/// Successive derivatives of x³ at x = 2: 3x² = 12, 6x = 12, 6, then 0.
///
/// The third derivative (6) is computed only from the constant seeds of the earlier passes,
/// so the tensor that holds it has no path back to `x`: it does not require grad. Asking
/// `wgrad::grad` for its derivative is then `Err(NoGradFn)` (as PyTorch raises "does not
/// require grad"); the test accepts that, `None`, or zeros as the fourth derivative 0.
#[test]
fn higher_order_gradients_of_x_cubed() {
    let x = Tensor::from_slice(&[2.0f32], [1], &device()).unwrap().requires_grad(true).unwrap();
    let y = x.mul(&x).unwrap().mul(&x).unwrap().sum_all().unwrap();

    let d1 = wgrad::grad(&[&y], &[&x], None, CREATE).unwrap()[0].clone().unwrap();
    assert_close(&vals(&d1), &[12.0]);
    assert!(d1.needs_grad(), "create_graph records the backward");

    let d2 = wgrad::grad(&[&d1.sum_all().unwrap()], &[&x], None, CREATE).unwrap()[0].clone().unwrap();
    assert_close(&vals(&d2), &[12.0]);
    assert!(d2.needs_grad());

    let d3 = wgrad::grad(&[&d2.sum_all().unwrap()], &[&x], None, CREATE).unwrap()[0].clone().unwrap();
    assert_close(&vals(&d3), &[6.0]);

    let d3_sum = d3.sum_all().unwrap();
    let d4: f32 = match wgrad::grad(&[&d3_sum], &[&x], None, CREATE) {
        Ok(g) => match &g[0] {
            Some(t) => vals(t)[0],
            None => 0.0,
        },
        Err(Error::NoGradFn { .. }) => {
            assert!(!d3.needs_grad(), "NoGradFn only when d3 is a constant");
            0.0
        }
        Err(e) => panic!("unexpected error for the fourth derivative: {e:?}"),
    };
    assert_eq!(d4, 0.0);
    assert!(x.grad().is_none(), "grad() never touches .grad");
}

#[test]
fn create_graph_backward_accumulates_a_differentiable_grad() {
    let x = Tensor::from_slice(&[3.0f32], [1], &device()).unwrap().requires_grad(true).unwrap();
    let y = x.mul(&x).unwrap().mul(&x).unwrap().sum_all().unwrap();
    let seed = Tensor::ones([], DType::F32, &device()).unwrap();
    y.backward_with(&seed, CREATE).unwrap();
    let g = x.grad().unwrap(); // 3x² = 27
    assert_close(&vals(&g), &[27.0]);
    assert!(g.needs_grad(), "with create_graph the .grad is part of a graph");
    let h = wgrad::grad(&[&g.sum_all().unwrap()], &[&x], None, BackwardOptions::default()).unwrap()[0].clone().unwrap();
    assert_close(&vals(&h), &[18.0]); // 6x
}

// ------------------------------------------------------------------ seeds and leaves

#[test]
fn backward_with_a_seed_on_a_non_scalar_output() {
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], [2, 2], &device()).unwrap().requires_grad(true).unwrap();
    let y = x.mul(&x).unwrap(); // [2, 2]
    let seed = Tensor::from_slice(&[1.0f32, -1.0, 0.5, 2.0], [2, 2], &device()).unwrap();
    y.backward_with(&seed, BackwardOptions::default()).unwrap();
    // 2x * seed
    assert_close(&grad_of(&x), &[2.0, -4.0, 3.0, 16.0]);
    assert_eq!(x.grad().unwrap().dims(), &[2, 2]);
}

#[test]
fn backward_on_a_leaf() {
    // loss = sum(leaf): the gradient is ones.
    let x =
        Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &device()).unwrap().requires_grad(true).unwrap();
    x.sum_all().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![1.0; 6]);
    assert_eq!(x.grad().unwrap().dims(), &[2, 3]);

    // backward() on a one-element leaf itself: d x / d x = 1.
    let s = Tensor::from_slice(&[7.0f32], [], &device()).unwrap().requires_grad(true).unwrap();
    s.backward().unwrap();
    assert_eq!(grad_of(&s), vec![1.0]);
    s.backward().unwrap(); // a leaf has no saved tensors to release
    assert_eq!(grad_of(&s), vec![2.0]);
}

// ------------------------------------------------------------------ detach, requires_grad, is_leaf

#[test]
fn detach_stops_gradients() {
    let x = leaf(&[1.0, 2.0, 3.0]);
    let d = x.detach();
    assert!(!d.needs_grad());
    assert!(d.is_leaf());
    assert!(d.grad().is_none());
    assert_eq!(vals(&d), vals(&x), "detach shares the data");
    assert!(!d.mul(2.0).unwrap().needs_grad());

    // y = x*x + detach(x)*x: the detached factor is a constant, dy/dx = 2x + x = 3x.
    let y = x.mul(&x).unwrap().add(d.mul(&x).unwrap()).unwrap().sum_all().unwrap();
    y.backward().unwrap();
    assert_close(&grad_of(&x), &[3.0, 6.0, 9.0]);

    // Detaching an intermediate cuts the graph there: only the direct path counts.
    x.zero_grad();
    let h = x.exp().unwrap();
    let z = h.detach().mul(&x).unwrap().sum_all().unwrap(); // d/dx = e^x (constant)
    z.backward().unwrap();
    let want: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
    let got = grad_of(&x);
    for (g, w) in got.iter().zip(&want) {
        assert!(((*g as f64) - w).abs() <= 1e-5 * w, "{got:?} vs {want:?}");
    }
}

#[test]
fn requires_grad_false_detaches_and_is_leaf() {
    let plain = Tensor::from_slice(&[1.0f32, 2.0], [2], &device()).unwrap();
    assert!(!plain.needs_grad());
    assert!(plain.is_leaf(), "a tensor that does not require grad is a leaf");

    let x = plain.requires_grad(true).unwrap();
    assert!(x.needs_grad());
    assert!(x.is_leaf());
    assert!(!plain.needs_grad(), "requires_grad returns a new handle");
    assert!(x.requires_grad(true).unwrap().needs_grad());

    let off = x.requires_grad(false).unwrap();
    assert!(!off.needs_grad());
    assert!(off.is_leaf());
    assert!(x.needs_grad(), "the original handle still requires grad");
    assert!(!off.mul(&off).unwrap().needs_grad());

    let y = x.mul(2.0).unwrap();
    assert!(!y.is_leaf());
    assert!(y.needs_grad());
    assert!(y.grad().is_none(), "intermediates hold no .grad");
    // Only leaves can switch; an intermediate must be detached first.
    let err = y.requires_grad(false).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    let yd = y.detach().requires_grad(true).unwrap();
    assert!(yd.is_leaf());
    assert!(yd.needs_grad());
    yd.sum_all().unwrap().backward().unwrap();
    assert_eq!(grad_of(&yd), vec![1.0, 1.0]);
    assert!(x.grad().is_none(), "the gradient stops at the new leaf");
}

// ------------------------------------------------------------------ edges and metadata

#[test]
fn collect_input_metadata_of_next_edges() {
    let a =
        Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &device()).unwrap().requires_grad(true).unwrap();
    let b = Tensor::from_slice(&[1.0f32, 2.0, 3.0], [3], &device()).unwrap();
    let y = a.mul(&b).unwrap();
    let edges = y.next_edges();
    assert_eq!(edges.len(), 2);
    assert!(edges[0].is_valid());
    assert!(!edges[1].is_valid());
    let meta = wgrad::collect_input_metadata(&edges);
    assert_eq!(meta, vec![Some(a.metadata()), None]);
    let m = meta[0].as_ref().unwrap();
    assert_eq!(m.shape.dims(), &[2, 3]);
    assert_eq!(m.dtype, DType::F32);
    assert_eq!(m.device, device().id());

    // Leaves have no edges; an intermediate's edge carries the intermediate's metadata.
    assert!(a.next_edges().is_empty());
    let z = y.sum(&[0], false).unwrap();
    assert_eq!(wgrad::collect_input_metadata(&z.next_edges()), vec![Some(y.metadata())]);
}

// ------------------------------------------------------------------ threads

#[test]
fn device_and_tensor_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<wgrad::Device>();
    send_sync::<Tensor>();

    let dev = device();
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0], [3], &dev).unwrap().requires_grad(true).unwrap();
    let x2 = x.clone();
    let handle = std::thread::spawn(move || {
        // Build a graph on another thread and backward there.
        let y = x2.mul(&x2).unwrap().sum_all().unwrap();
        y.backward().unwrap();
        let t = Tensor::full([2], 4.0, DType::F32, &dev).unwrap().add(1.0).unwrap();
        (y.to_scalar::<f32>().unwrap(), t)
    });
    let (sum, t) = handle.join().unwrap();
    assert_eq!(sum, 14.0);
    assert_eq!(vals(&t), vec![5.0, 5.0], "a tensor made on another thread reads back here");
    assert_close(&grad_of(&x), &[2.0, 4.0, 6.0]);
}
