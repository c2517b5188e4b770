//! PyTorch's autograd calls, against the semantics of PyTorch's own tests:
//! `backward(inputs=)`, `retain_grad()`, post-accumulate-grad hooks, and
//! module modes. Each autograd case runs eagerly and with the compiler
//! installed (twice, so the second call replays the cached program), and
//! both must give the same `.grad`s.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::device;
use wgrad::nn::{Dropout, Module};
use wgrad::{BackwardOptions, DType, Error, Tensor, WgslCompiler};

fn f32s(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &device()).unwrap()
}

fn leaf(data: &[f32]) -> Tensor {
    f32s(data, &[data.len()]).requires_grad(true).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

fn grad_of(t: &Tensor) -> Option<Vec<f32>> {
    t.grad().map(|g| values(&g))
}

/// One compiler per process, and while one is installed every backward of
/// the process goes through it: every case here takes its turn.
static COMPILER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `case` eagerly, then compiled; returns each run's result and
/// checks that the compiled runs never fell back to eager.
fn eager_and_compiled<T: PartialEq + std::fmt::Debug>(case: impl Fn() -> T) {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let eager = case();
    let guard = WgslCompiler::install(&device()).unwrap();
    let compiled = case();
    let stats = guard.stats();
    assert_eq!(stats.fallbacks, 0, "{stats:?}");
    assert!(stats.replays > 0, "the compiled case ran no program: {stats:?}");
    assert_eq!(eager, compiled, "eager and compiled differ");
}

fn counter() -> (Arc<AtomicUsize>, impl Fn(&Tensor) -> Option<Tensor> + Send + Sync + 'static) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    (count, move |_: &Tensor| {
        c.fetch_add(1, Ordering::SeqCst);
        None
    })
}

// ------------------------------------------------------------------ backward(inputs=)

/// PyTorch's `test_backward_with_inputs`: only the chosen leaves' `.grad`
/// change; another leaf keeps the `.grad` it had, and the hooks of the part
/// of the graph that leads only to it do not run.
#[test]
fn backward_with_inputs_touches_only_those_leaves() {
    eager_and_compiled(|| {
        let x = leaf(&[1.0, 2.0]);
        let w = leaf(&[3.0, 4.0]);
        x.set_grad(Some(f32s(&[10.0, 10.0], &[2]))).unwrap();
        let (x_hooks, x_hook) = counter();
        let (branch_hooks, branch_hook) = counter();
        x.register_hook(x_hook).unwrap();
        let only_x = x.mul(&x).unwrap(); // leads to x alone
        only_x.register_hook(branch_hook).unwrap();
        let loss = only_x.add(x.mul(&w).unwrap()).unwrap().sum_all().unwrap();
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        for _ in 0..2 {
            wgrad::backward(&[&loss], None, Some(&[&w]), retain).unwrap();
        }
        assert_eq!(grad_of(&w), Some(vec![2.0, 4.0]), "dloss/dw = x, twice");
        assert_eq!(grad_of(&x), Some(vec![10.0, 10.0]), "x kept its .grad");
        assert_eq!((x_hooks.load(Ordering::SeqCst), branch_hooks.load(Ordering::SeqCst)), (0, 0));

        // Now x alone, then both: the restriction is part of the compiled
        // signature, so each set gets its own program.
        wgrad::backward(&[&loss], None, Some(&[&x]), retain).unwrap();
        assert_eq!(grad_of(&x), Some(vec![10.0 + 2.0 + 3.0, 10.0 + 4.0 + 4.0]));
        assert_eq!(grad_of(&w), Some(vec![2.0, 4.0]));
        wgrad::backward(&[&loss], None, Some(&[&x, &w]), BackwardOptions::default()).unwrap();
        (grad_of(&x), grad_of(&w), x_hooks.load(Ordering::SeqCst), branch_hooks.load(Ordering::SeqCst))
    });
}

/// Each distinct `inputs` set is its own compiled program; the same set
/// again replays it.
#[test]
fn inputs_are_part_of_the_compiled_signature() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let guard = WgslCompiler::install(&device()).unwrap();
    let x = leaf(&[1.0, 2.0]);
    let w = leaf(&[3.0, 4.0]);
    let loss = x.mul(&w).unwrap().sum_all().unwrap();
    let retain = BackwardOptions { retain_graph: true, ..Default::default() };
    for inputs in [&[&w][..], &[&x], &[&w], &[&x], &[&x, &w]] {
        // Whether a `.grad` is defined is part of the signature too.
        x.zero_grad();
        w.zero_grad();
        wgrad::backward(&[&loss], None, Some(inputs), retain).unwrap();
    }
    let stats = guard.stats();
    assert_eq!((stats.cache_misses, stats.cache_hits, stats.fallbacks), (3, 2, 0), "{stats:?}");
    assert_eq!(grad_of(&x), Some(vec![3.0, 4.0]));
    assert_eq!(grad_of(&w), Some(vec![1.0, 2.0]));
}

/// A non-leaf among `inputs` gets its gradient in `.grad`, and nothing
/// below it is computed (PyTorch's `test_backward_with_nonleaf_inputs`).
#[test]
fn backward_with_a_non_leaf_input_accumulates_into_its_grad() {
    eager_and_compiled(|| {
        let x = leaf(&[1.0, -2.0]);
        let (x_hooks, x_hook) = counter();
        x.register_hook(x_hook).unwrap();
        let y = x.mul(3.0).unwrap();
        let loss = y.mul(&y).unwrap().sum_all().unwrap();
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        wgrad::backward(&[&loss], None, Some(&[&y]), retain).unwrap();
        wgrad::backward(&[&loss], None, Some(&[&y]), retain).unwrap();
        assert_eq!(grad_of(&y), Some(vec![12.0, -24.0]), "2y, twice");
        assert_eq!(grad_of(&x), None);
        assert_eq!(x_hooks.load(Ordering::SeqCst), 0);
        // As PyTorch, y retains its gradient from then on.
        assert!(y.retains_grad());
        loss.backward_with(&Tensor::ones([], DType::F32, &device()).unwrap(), retain).unwrap();
        assert_eq!(grad_of(&y), Some(vec![18.0, -36.0]));
        assert_eq!(x_hooks.load(Ordering::SeqCst), 1);
        y.zero_grad();
        assert_eq!(grad_of(&y), None);
        (grad_of(&x), x_hooks.load(Ordering::SeqCst))
    });
}

/// An input the outputs do not depend on keeps its `.grad`, as in PyTorch;
/// an empty `inputs` and an input that does not require grad are errors.
#[test]
fn backward_inputs_edge_cases() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let x = leaf(&[1.0]);
    let unused = leaf(&[5.0]);
    let loss = x.mul(&x).unwrap().sum_all().unwrap();
    let retain = BackwardOptions { retain_graph: true, ..Default::default() };
    wgrad::backward(&[&loss], None, Some(&[&x, &unused]), retain).unwrap();
    assert_eq!((grad_of(&x), grad_of(&unused)), (Some(vec![2.0]), None));

    let e = wgrad::backward(&[&loss], None, Some(&[]), retain).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument { op: "backward", .. }), "{e}");
    assert!(e.to_string().contains("inputs"), "{e}");
    let plain = f32s(&[1.0], &[1]);
    let e = wgrad::backward(&[&loss], None, Some(&[&plain]), retain).unwrap_err();
    assert!(e.to_string().contains("input 0 of backward()"), "{e}");
    let e = wgrad::backward(&[], None, None, retain).unwrap_err();
    assert!(e.to_string().contains("no outputs"), "{e}");
    assert_eq!(grad_of(&x), Some(vec![2.0]), "errors changed nothing");
}

/// Two outputs with seeds, as `torch.autograd.backward(tensors, grad_tensors)`.
#[test]
fn backward_of_several_outputs_with_seeds() {
    eager_and_compiled(|| {
        let x = leaf(&[1.0, 2.0]);
        let a = x.mul(2.0).unwrap();
        let b = x.mul(&x).unwrap();
        let seeds = [f32s(&[1.0, 1.0], &[2]), f32s(&[0.5, 2.0], &[2])];
        wgrad::backward(&[&a, &b], Some(&seeds), None, BackwardOptions::default()).unwrap();
        assert_eq!(grad_of(&x), Some(vec![2.0 + 0.5 * 2.0, 2.0 + 2.0 * 4.0]));
        grad_of(&x)
    });
}

// ------------------------------------------------------------------ retain_grad

/// PyTorch's `test_retain_grad`: a retained tensor used twice gets the sum
/// of both uses, and its `.grad` accumulates over backward calls.
#[test]
fn retain_grad_on_a_tensor_used_twice_accumulates() {
    eager_and_compiled(|| {
        let x = leaf(&[1.0, 2.0]);
        let y = x.mul(3.0).unwrap();
        y.retain_grad().unwrap();
        assert!(y.retains_grad() && !x.retains_grad(), "as PyTorch: false for leaves");
        let loss = y.mul(&y).unwrap().add(&y).unwrap().sum_all().unwrap(); // y² + y
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        loss.backward_with(&Tensor::ones([], DType::F32, &device()).unwrap(), retain).unwrap();
        assert_eq!(grad_of(&y), Some(vec![7.0, 13.0]), "2y + 1");
        loss.backward().unwrap();
        assert_eq!(grad_of(&y), Some(vec![14.0, 26.0]), "accumulated");
        assert_eq!(grad_of(&x), Some(vec![42.0, 78.0]));
        (grad_of(&y), grad_of(&x))
    });
}

/// The root itself can retain its gradient (the seed), and a retained
/// tensor's hooks run before its gradient is kept: the kept value is the
/// hooked one, as in PyTorch.
#[test]
fn retain_grad_sees_hooks_and_works_on_the_root() {
    eager_and_compiled(|| {
        let x = leaf(&[1.0, 2.0]);
        let y = x.mul(2.0).unwrap();
        y.retain_grad().unwrap();
        y.register_hook(|g| Some(g.mul(10.0).unwrap())).unwrap();
        let loss = y.sum_all().unwrap();
        loss.retain_grad().unwrap();
        loss.backward().unwrap();
        assert_eq!(grad_of(&loss), Some(vec![1.0]));
        assert_eq!(grad_of(&y), Some(vec![10.0, 10.0]));
        assert_eq!(grad_of(&x), Some(vec![20.0, 20.0]));
        (grad_of(&loss), grad_of(&y), grad_of(&x))
    });
}

/// A backward that fails after a retained tensor's gradient was computed
/// changes neither it nor any leaf's `.grad`.
#[test]
fn a_failed_backward_leaves_retained_grads_as_they_were() {
    eager_and_compiled(|| {
        let x = leaf(&[1.0, 2.0]);
        let y = x.mul(2.0).unwrap();
        y.retain_grad().unwrap();
        let z = y.mul(&y).unwrap();
        let loss = z.sum_all().unwrap();
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        let one = Tensor::ones([], DType::F32, &device()).unwrap();
        loss.backward_with(&one, retain).unwrap();
        let before = (grad_of(&y), grad_of(&x));
        // A hook below y returns a gradient of the wrong shape.
        let handle = x.register_hook(|_| Some(Tensor::zeros([3], DType::F32, &device()).unwrap())).unwrap();
        let e = loss.backward_with(&one, retain).unwrap_err();
        assert!(matches!(e, Error::GradientMismatch { .. }), "{e}");
        assert_eq!((grad_of(&y), grad_of(&x)), before);
        handle.remove();
        before
    });
}

/// `grad()` leaves every leaf's `.grad` alone but, as in PyTorch, a
/// retained non-leaf it passes through keeps its gradient.
#[test]
fn grad_fills_retained_grads_but_no_leaf_grad() {
    eager_and_compiled(|| {
        let x = leaf(&[1.0, 2.0]);
        let y = x.mul(2.0).unwrap();
        y.retain_grad().unwrap();
        let loss = y.mul(&y).unwrap().sum_all().unwrap();
        let dx = wgrad::grad(&[&loss], &[&x], None, BackwardOptions::default()).unwrap();
        assert_eq!(values(dx[0].as_ref().unwrap()), vec![8.0, 16.0]);
        assert_eq!((grad_of(&x), grad_of(&y)), (None, Some(vec![4.0, 8.0])));
        grad_of(&y)
    });
}

/// After a `create_graph` backward (eager) left a differentiable retained
/// gradient, a compiled backward adds to it without recording anything.
#[test]
fn a_compiled_backward_adds_to_retained_grads_without_recording() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let guard = WgslCompiler::install(&device()).unwrap();
    let x = leaf(&[1.0, 2.0]);
    let y = x.mul(&x).unwrap();
    y.retain_grad().unwrap();
    let loss = y.mul(&y).unwrap().sum_all().unwrap();
    let one = Tensor::ones([], DType::F32, &device()).unwrap();
    loss.backward_with(&one, BackwardOptions { create_graph: true, ..Default::default() }).unwrap();
    assert!(y.grad().unwrap().needs_grad(), "create_graph keeps the retained gradient differentiable");
    loss.backward_with(&one, BackwardOptions { retain_graph: true, ..Default::default() }).unwrap();
    assert_eq!(guard.stats().fallbacks, 1, "only the create_graph backward ran eagerly");
    let g = y.grad().unwrap();
    assert!(!g.needs_grad(), "a compiled backward records no graph");
    assert_eq!(values(&g), vec![2.0 + 2.0, 8.0 + 8.0]);
}

/// `retain_grad` on a tensor that does not require grad is an error; on a
/// leaf it does nothing.
#[test]
fn retain_grad_arguments() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let plain = f32s(&[1.0], &[1]);
    let e = plain.retain_grad().unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { op: "retain_grad", .. }), "{e}");
    assert!(!plain.retains_grad());
    let x = leaf(&[1.0]);
    x.retain_grad().unwrap();
    let y = x.mul(2.0).unwrap();
    assert!(!y.retains_grad());
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!((grad_of(&x), grad_of(&y)), (Some(vec![2.0]), None), "not retained: no .grad");
}

// ------------------------------------------------------------------ post-accumulate hooks

/// Post-accumulate hooks run after every `.grad` of the backward is
/// published, see the new `.grad`, run again on a replayed program, and
/// stop once removed; a leaf outside `inputs=` does not run its hooks.
#[test]
fn post_accumulate_hooks_see_the_new_grad() {
    eager_and_compiled(|| {
        let x = leaf(&[1.0, 2.0]);
        let w = leaf(&[3.0, 4.0]);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = |name: &'static str| {
            let seen = seen.clone();
            move |t: &Tensor| {
                // Both leaves' .grads are already published when either hook runs.
                let g = t.grad().expect("a .grad after accumulation");
                seen.lock().unwrap().push((name, values(&g)));
                Ok(())
            }
        };
        let hx = x.register_post_accumulate_grad_hook(log("x")).unwrap();
        w.register_post_accumulate_grad_hook(log("w")).unwrap();
        let loss = x.mul(&w).unwrap().sum_all().unwrap();
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        let one = Tensor::ones([], DType::F32, &device()).unwrap();
        loss.backward_with(&one, retain).unwrap();
        loss.backward_with(&one, retain).unwrap();
        hx.remove();
        loss.backward_with(&one, retain).unwrap();
        wgrad::backward(&[&loss], None, Some(&[&x]), retain).unwrap();
        let mut seen = seen.lock().unwrap().clone();
        // The order between leaves follows the walk; compare as sets per call.
        for call in seen.chunks_mut(2).take(2) {
            call.sort_by_key(|(n, _)| *n);
        }
        assert_eq!(
            seen,
            vec![
                ("w", vec![1.0, 2.0]),
                ("x", vec![3.0, 4.0]),
                ("w", vec![2.0, 4.0]),
                ("x", vec![6.0, 8.0]),
                ("w", vec![3.0, 6.0]),
            ]
        );
        seen
    });
}

/// Optimizer in backward: the hook steps the parameter and frees its
/// `.grad`; the result equals a step after the backward.
#[test]
fn optimizer_in_backward_matches_a_step_after_backward() {
    use wgrad::{Optimizer, Sgd};
    eager_and_compiled(|| {
        let w = leaf(&[1.0, -2.0, 3.0]);
        let reference = leaf(&[1.0, -2.0, 3.0]);
        let sgd = std::sync::Mutex::new(Sgd::new(std::slice::from_ref(&w), 0.1, 0.9, 0.0).unwrap());
        let handle = w
            .register_post_accumulate_grad_hook(move |w| {
                sgd.lock().unwrap().step()?;
                w.set_grad(None)
            })
            .unwrap();
        let mut after = Sgd::new(std::slice::from_ref(&reference), 0.1, 0.9, 0.0).unwrap();
        for _ in 0..3 {
            w.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(w.grad().is_none());
            reference.mul(&reference).unwrap().sum_all().unwrap().backward().unwrap();
            after.step().unwrap();
            after.zero_grad();
        }
        handle.remove();
        assert_eq!(values(&w), values(&reference));
        values(&w)
    });
}

/// A hook's error is the backward's result; the `.grad`s stay published.
/// Registering on a non-leaf is an error.
#[test]
fn post_accumulate_hook_errors() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let x = leaf(&[1.0]);
    x.register_post_accumulate_grad_hook(|_| Err(Error::InvalidArgument { op: "my hook", message: "refused".into() }))
        .unwrap();
    let e = x.mul(2.0).unwrap().sum_all().unwrap().backward().unwrap_err();
    assert!(e.to_string().contains("my hook"), "{e}");
    assert_eq!(grad_of(&x), Some(vec![2.0]));
    let y = x.mul(2.0).unwrap();
    let e = y.register_post_accumulate_grad_hook(|_| Ok(())).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { op: "register_post_accumulate_grad_hook", .. }), "{e}");
}

// ------------------------------------------------------------------ module modes

/// `Dropout` drops in training mode (a new mask each call) and is the
/// identity after `eval()`; `train(true)` switches it back.
#[test]
fn dropout_honours_train_and_eval() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    let x = Tensor::ones([4096], DType::F32, &device()).unwrap();
    let mut drop = Dropout::new(0.5, 7).unwrap();
    assert!(drop.is_training());
    let a = values(&drop.forward(&x).unwrap());
    let b = values(&drop.forward(&x).unwrap());
    let zeros = a.iter().filter(|&&v| v == 0.0).count();
    assert!((1600..2500).contains(&zeros), "{zeros} of 4096 dropped at p = 0.5");
    assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
    assert_ne!(a, b, "each call draws a new mask");

    drop.eval();
    assert!(!drop.is_training());
    assert_eq!(values(&drop.forward(&x).unwrap()), vec![1.0; 4096]);
    drop.train(true);
    assert!(values(&drop.forward(&x).unwrap()).contains(&0.0));

    // The same seed replays the same masks.
    let again = Dropout::new(0.5, 7).unwrap();
    assert_eq!(values(&again.forward(&x).unwrap()), a);
    assert!(matches!(Dropout::new(1.5, 0), Err(Error::InvalidArgument { .. })));
}

/// A model made of layers forwards `train` to each; layers without a mode
/// accept it and report training.
#[test]
fn a_model_forwards_its_mode_to_its_layers() {
    let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
    struct Model {
        linear: wgrad::nn::Linear,
        drop: Dropout,
    }
    impl Module for Model {
        fn parameters(&self) -> Vec<Tensor> {
            self.linear.parameters()
        }
        fn train(&mut self, mode: bool) {
            self.linear.train(mode);
            self.drop.train(mode);
        }
        fn is_training(&self) -> bool {
            self.drop.is_training()
        }
    }
    let mut model = Model {
        linear: wgrad::nn::Linear::new(3, 2, true, 1, &device()).unwrap(),
        drop: Dropout::new(0.9, 3).unwrap(),
    };
    let x = Tensor::ones([5, 3], DType::F32, &device()).unwrap();
    let eval_out = |m: &Model| values(&m.drop.forward(&m.linear.forward(&x).unwrap()).unwrap());
    model.eval();
    assert!(!model.is_training() && !model.drop.is_training());
    assert_eq!(eval_out(&model), values(&model.linear.forward(&x).unwrap()));
    model.train(true);
    assert!(model.is_training());
    assert!(eval_out(&model).contains(&0.0));
}
