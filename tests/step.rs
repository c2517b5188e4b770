//! Whole-step compilation (`compile_step`): a training step run eagerly and
//! as a compiled step gives the same losses, parameters and `.grad`s, with
//! new data and labels every call and a learning rate changed mid-way; what
//! a replay cannot do runs eagerly; bad labels on a replay are an `Err`
//! that changes nothing.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::device;
use wgrad::nn::{Linear, Module};
use wgrad::{
    Adam, AdamW, ClassLoss, CosineWithWarmup, DType, LrScheduler, Optimizer, Result, Sgd, StepLr, Tensor, compile_step,
};

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * w.abs() + 1e-6;
        assert!((g - w).abs() <= tol, "{what}[{i}]: compiled {g} vs eager {w}");
    }
}

/// A two-layer MLP classifier, seeded.
struct Mlp {
    l1: Linear,
    l2: Linear,
}

impl Mlp {
    fn new(seed: u64) -> Mlp {
        let d = device();
        let l1 = Linear::new(12, 16, true, seed, &d).unwrap();
        let l2 = Linear::new(16, 5, true, seed + 7, &d).unwrap();
        let req = |t: Tensor| t.requires_grad(true).unwrap();
        Mlp {
            l1: Linear { weight: req(l1.weight), bias: l1.bias.map(req) },
            l2: Linear { weight: req(l2.weight), bias: l2.bias.map(req) },
        }
    }

    fn params(&self) -> Vec<Tensor> {
        self.l1.parameters().into_iter().chain(self.l2.parameters()).collect()
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let h = self.l1.forward(x)?.relu()?;
        self.l2.forward(&h)?.cross_entropy(y, ClassLoss::default())
    }
}

/// Batch `i`: 8 inputs and their labels (new every call).
fn batch(i: u64) -> (Tensor, Tensor) {
    let d = device();
    let x = wgrad::nn::uniform([8, 12], 1.0, 1000 + i, &d).unwrap().detach();
    let labels: Vec<i32> = (0..8).map(|j| (j * 3 + i as i32 * 7) % 5).collect();
    (x, Tensor::from_slice(&labels, [8], &d).unwrap())
}

fn values(ts: &[Tensor]) -> Vec<Vec<f32>> {
    ts.iter().map(|t| t.to_vec::<f32>().unwrap()).collect()
}

fn grads(ts: &[Tensor]) -> Vec<Option<Vec<f32>>> {
    ts.iter().map(|t| t.grad().map(|g| g.to_vec::<f32>().unwrap())).collect()
}

type MakeOpt = fn(&[Tensor]) -> Box<dyn Optimizer>;

/// Runs 5 steps of `order` eagerly and compiled, from the same start, and
/// compares everything after every step.
fn eager_against_compiled(name: &str, make: MakeOpt, zero_first: bool) {
    let (eager_model, compiled_model) = (Mlp::new(3), Mlp::new(3));
    let mut eager_opt = make(&eager_model.params());
    let opt = Rc::new(std::cell::RefCell::new(make(&compiled_model.params())));
    let step_body = |model: &Mlp, opt: &mut dyn Optimizer, x: &Tensor, y: &Tensor| -> Result<Vec<Tensor>> {
        if zero_first {
            opt.zero_grad();
        }
        let loss = model.loss(x, y)?;
        loss.backward()?;
        opt.step()?;
        if !zero_first {
            opt.zero_grad();
        }
        Ok(vec![loss])
    };
    let opt_in = opt.clone();
    let model = &compiled_model;
    let mut step = compile_step(&device(), move |args: &[Tensor]| {
        step_body(model, opt_in.borrow_mut().as_mut(), &args[0], &args[1])
    });
    for i in 0..5 {
        if i == 3 {
            let lr = eager_opt.lr() * 0.5;
            eager_opt.set_lr(lr).unwrap();
            opt.borrow_mut().set_lr(lr).unwrap();
        }
        let (x, y) = batch(i);
        let want = step_body(&eager_model, eager_opt.as_mut(), &x, &y).unwrap();
        let got = step.call(&[x, y]).unwrap();
        let what = |s: &str| format!("{name} step {i}: {s}");
        assert_close(&what("loss"), &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap());
        for (k, (g, w)) in values(&compiled_model.params()).iter().zip(values(&eager_model.params())).enumerate() {
            assert_close(&what(&format!("parameter {k}")), g, &w);
        }
        let (g, w) = (grads(&compiled_model.params()), grads(&eager_model.params()));
        for (k, (g, w)) in g.iter().zip(&w).enumerate() {
            match (g, w) {
                (Some(g), Some(w)) => assert_close(&what(&format!(".grad {k}")), g, w),
                (None, None) => {}
                _ => panic!("{}: .grad {k} exists in one mode only", what("")),
            }
        }
    }
    let stats = step.stats();
    assert_eq!(stats.traces, 1, "{name}: one trace, the learning rate change included: {stats:?}");
    assert_eq!((stats.replays, stats.graph_breaks, stats.eager_calls), (5, 0, 0), "{name}: {stats:?}");
}

#[test]
fn training_steps_match_eager_for_every_optimizer() {
    let sgd: MakeOpt = |p| Box::new(Sgd::new(p, 0.1, 0.9, 0.01).unwrap());
    let plain_sgd: MakeOpt = |p| Box::new(Sgd::new(p, 0.2, 0.0, 0.0).unwrap());
    let adam: MakeOpt = |p| Box::new(Adam::with(p, 0.01, (0.9, 0.999), 1e-8, 0.01).unwrap());
    let adamw: MakeOpt = |p| Box::new(AdamW::new(p, 0.01).unwrap());
    for (name, make) in [("sgd momentum", sgd), ("sgd", plain_sgd), ("adam", adam), ("adamw", adamw)] {
        eager_against_compiled(name, make, true);
        eager_against_compiled(&format!("{name}, zero_grad last"), make, false);
    }
}

/// Without `zero_grad`, `.grad`s accumulate across calls: the first call
/// (no `.grad`s yet) and the later ones (`.grad`s to add to) are two
/// programs, and both match eager mode.
#[test]
fn accumulating_grads_are_a_guard_and_match_eager() {
    let (eager_model, compiled_model) = (Mlp::new(5), Mlp::new(5));
    let model = &compiled_model;
    let mut step = compile_step(&device(), move |args: &[Tensor]| {
        let loss = model.loss(&args[0], &args[1])?;
        loss.backward()?;
        Ok(vec![loss])
    });
    for i in 0..4 {
        let (x, y) = batch(i);
        eager_model.loss(&x, &y).unwrap().backward().unwrap();
        step.call(&[x, y]).unwrap();
        for (k, (g, w)) in grads(&compiled_model.params()).iter().zip(grads(&eager_model.params())).enumerate() {
            assert_close(&format!("call {i} .grad {k}"), g.as_ref().unwrap(), w.as_ref().unwrap());
        }
    }
    let stats = step.stats();
    assert_eq!((stats.traces, stats.replays), (2, 4), "{stats:?}");
}

/// A readback inside the step is a graph break: the call runs eagerly,
/// with the right results, and so do later calls with its signature.
#[test]
fn a_readback_inside_the_step_runs_it_eagerly() {
    let (eager_model, compiled_model) = (Mlp::new(9), Mlp::new(9));
    let mut eager_opt = Sgd::new(&eager_model.params(), 0.1, 0.0, 0.0).unwrap();
    let mut opt = Sgd::new(&compiled_model.params(), 0.1, 0.0, 0.0).unwrap();
    let model = &compiled_model;
    let seen = Rc::new(Cell::new(0.0f32));
    let seen_in = seen.clone();
    let mut step = compile_step(&device(), move |args: &[Tensor]| {
        opt.zero_grad();
        let loss = model.loss(&args[0], &args[1])?;
        seen_in.set(loss.to_scalar::<f32>()?);
        loss.backward()?;
        opt.step()?;
        Ok(vec![])
    });
    for i in 0..3 {
        let (x, y) = batch(i);
        eager_opt.zero_grad();
        let loss = eager_model.loss(&x, &y).unwrap();
        let want = loss.to_scalar::<f32>().unwrap();
        loss.backward().unwrap();
        eager_opt.step().unwrap();
        step.call(&[x, y]).unwrap();
        assert_eq!(seen.get(), want, "call {i}: the eager run saw the same loss");
        assert_eq!(values(&compiled_model.params()), values(&eager_model.params()), "call {i}");
    }
    let stats = step.stats();
    assert_eq!((stats.traces, stats.graph_breaks, stats.eager_calls, stats.replays), (1, 1, 3, 0), "{stats:?}");
    assert!(step.last_graph_break().unwrap().contains("to_vec"), "{:?}", step.last_graph_break());
}

/// Hooks are host code: a step whose backward meets one runs eagerly.
#[test]
fn a_hook_makes_the_step_run_eagerly() {
    let model = Mlp::new(11);
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls_in = calls.clone();
    let _h = model.l2.weight.register_hook(move |_| {
        calls_in.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        None
    });
    let m = &model;
    let mut step = compile_step(&device(), move |args: &[Tensor]| {
        let loss = m.loss(&args[0], &args[1])?;
        loss.backward()?;
        Ok(vec![loss])
    });
    for i in 0..2 {
        let (x, y) = batch(i);
        step.call(&[x, y]).unwrap();
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2, "the hook ran once per call, eagerly");
    assert_eq!(step.stats().graph_breaks, 1);
    assert!(step.last_graph_break().unwrap().contains("hooks"));
}

/// Labels are checked on every call, as eager mode checks them: a bad
/// label on a replay is an `Err`, and parameters, `.grad`s and optimizer
/// state are as before the call (the next good call matches eager mode).
#[test]
fn bad_labels_on_a_replay_are_an_error_that_changes_nothing() {
    let (eager_model, compiled_model) = (Mlp::new(13), Mlp::new(13));
    let mut eager_opt = Adam::new(&eager_model.params(), 0.01).unwrap();
    let mut opt = Adam::new(&compiled_model.params(), 0.01).unwrap();
    let model = &compiled_model;
    let mut step = compile_step(&device(), move |args: &[Tensor]| {
        opt.zero_grad();
        let loss = model.loss(&args[0], &args[1])?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    });
    let run_eager = |x: &Tensor, y: &Tensor, opt: &mut Adam| {
        opt.zero_grad();
        eager_model.loss(x, y).unwrap().backward().unwrap();
        opt.step().unwrap();
    };
    let (x, y) = batch(0);
    run_eager(&x, &y, &mut eager_opt);
    step.call(&[x.clone(), y]).unwrap();
    let before = (values(&compiled_model.params()), grads(&compiled_model.params()));
    let bad = Tensor::from_slice(&[0i32, 1, 2, 3, 4, 5, 1, 2], [8], &device()).unwrap();
    let err = step.call(&[x.clone(), bad]).unwrap_err();
    assert!(err.to_string().contains("label(s) outside 0..5"), "{err}");
    assert_eq!((values(&compiled_model.params()), grads(&compiled_model.params())), before);
    let (x, y) = batch(1);
    run_eager(&x, &y, &mut eager_opt);
    step.call(&[x, y]).unwrap();
    for (k, (g, w)) in values(&compiled_model.params()).iter().zip(values(&eager_model.params())).enumerate() {
        assert_close(&format!("parameter {k}"), g, &w);
    }
    assert_eq!(step.stats().traces, 1);
}

/// A host value the closure bakes into the trace is not part of the
/// signature; `debug_retrace` traces every call again, notices the
/// difference, and runs the new program.
#[test]
fn debug_retrace_reports_a_baked_in_host_value() {
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0], [3], &device()).unwrap();
    let scale = Rc::new(Cell::new(2.0));
    let scale_in = scale.clone();
    let mut step = compile_step(&device(), move |args: &[Tensor]| Ok(vec![args[0].mul(scale_in.get())?]));
    step.set_debug_retrace(true);
    assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0]);
    assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0]);
    assert!(step.last_difference().is_none(), "the same trace twice");
    scale.set(3.0);
    assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![3.0, 6.0, 9.0]);
    assert!(step.last_difference().is_some(), "the changed scale was noticed");
}

/// An `Err` inside the traced step (here after `backward()`) is returned,
/// and no `.grad` or parameter has changed.
#[test]
fn an_error_inside_the_step_changes_nothing() {
    let model = Mlp::new(17);
    let mut opt = Sgd::new(&model.params(), 0.1, 0.0, 0.0).unwrap();
    let (x, y) = batch(0);
    model.loss(&x, &y).unwrap().backward().unwrap();
    let before = (values(&model.params()), grads(&model.params()));
    let m = &model;
    let mut step = compile_step(&device(), move |args: &[Tensor]| {
        opt.zero_grad();
        let loss = m.loss(&args[0], &args[1])?;
        loss.backward()?;
        opt.step()?;
        let _oops = args[0].matmul(&args[0])?; // [8, 12] @ [8, 12]: an error
        Ok(vec![loss])
    });
    let err = step.call(&[x, y]).unwrap_err();
    assert!(err.to_string().contains("matmul"), "{err}");
    assert_eq!((values(&model.params()), grads(&model.params())), before);
}

/// A cosine schedule with warm-up changes the rate every step; the compiled
/// step reads it at every call (one trace) and matches eager mode.
#[test]
fn a_schedule_needs_no_retrace_and_matches_eager() {
    let (eager_model, compiled_model) = (Mlp::new(19), Mlp::new(19));
    let mut eager_opt = AdamW::new(&eager_model.params(), 0.02).unwrap();
    let opt = Rc::new(std::cell::RefCell::new(AdamW::new(&compiled_model.params(), 0.02).unwrap()));
    let mut eager_schedule = CosineWithWarmup::new(&mut eager_opt, 2, 6, 0.001).unwrap();
    let mut schedule = CosineWithWarmup::new(&mut *opt.borrow_mut(), 2, 6, 0.001).unwrap();
    let (model, opt_in) = (&compiled_model, opt.clone());
    let mut step = compile_step(&device(), move |args: &[Tensor]| {
        let mut opt = opt_in.borrow_mut();
        opt.zero_grad();
        let loss = model.loss(&args[0], &args[1])?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    });
    let mut rates = Vec::new();
    for i in 0..8 {
        let (x, y) = batch(i);
        eager_opt.zero_grad();
        eager_model.loss(&x, &y).unwrap().backward().unwrap();
        eager_opt.step().unwrap();
        eager_schedule.step(&mut eager_opt).unwrap();
        step.call(&[x, y]).unwrap();
        schedule.step(&mut *opt.borrow_mut()).unwrap();
        rates.push(schedule.last_lr());
        for (k, (g, w)) in values(&compiled_model.params()).iter().zip(values(&eager_model.params())).enumerate() {
            assert_close(&format!("step {i} parameter {k}"), g, &w);
        }
    }
    assert_eq!(step.stats().traces, 1);
    // Warm-up 0.02 * 2/3 at step 1, then the cosine down to 0.001 at step 6.
    assert!((rates[0] - 0.02 * 2.0 / 3.0).abs() < 1e-12, "{rates:?}");
    assert!((rates[1] - 0.02).abs() < 1e-12, "{rates:?}");
    assert!((rates[3] - (0.001 + 0.019 * 0.5 * (1.0 + (std::f64::consts::PI * 0.5).cos()))).abs() < 1e-12);
    assert_eq!(rates[5..], [0.001, 0.001, 0.001]);
}

/// `StepLr` as PyTorch's `StepLR`; a bad schedule or a rate set inside a
/// compiled step is refused (the latter runs the step eagerly).
#[test]
fn step_lr_and_setting_the_rate_inside_a_step() {
    let w = Tensor::from_slice(&[1.0f32, 2.0], [2], &device()).unwrap().requires_grad(true).unwrap();
    let mut opt = Sgd::new(std::slice::from_ref(&w), 0.1, 0.0, 0.0).unwrap();
    let mut schedule = StepLr::new(&opt, 3, 0.1).unwrap();
    let mut rates = Vec::new();
    for _ in 0..7 {
        schedule.step(&mut opt).unwrap();
        rates.push(opt.lr());
    }
    let want = [0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001];
    for (got, want) in rates.iter().zip(want) {
        assert!((got - want).abs() < 1e-15, "{rates:?}");
    }
    assert!(StepLr::new(&opt, 0, 0.5).is_err());
    assert!(CosineWithWarmup::new(&mut opt, 5, 2, 0.0).is_err());
    let mut step = compile_step(&device(), move |_: &[Tensor]| {
        opt.set_lr(0.5)?;
        Ok(vec![])
    });
    step.call(&[]).unwrap();
    assert_eq!(step.stats().graph_breaks, 1);
    assert!(step.last_graph_break().unwrap().contains("set_lr"), "{:?}", step.last_graph_break());
}

/// A different argument dtype or shape is a new signature (a new trace);
/// the old one is still cached.
#[test]
fn a_new_dtype_or_shape_traces_again() {
    let mut step = compile_step(&device(), |args: &[Tensor]| Ok(vec![args[0].to_dtype(DType::F32)?.mul(2.0)?]));
    let f = Tensor::from_slice(&[1.0f32, 2.0], [2], &device()).unwrap();
    let i = Tensor::from_slice(&[3i32, 4], [2], &device()).unwrap();
    let g = Tensor::from_slice(&[1.0f32, 2.0, 3.0], [3], &device()).unwrap();
    for (t, want) in [(&f, vec![2.0, 4.0]), (&i, vec![6.0, 8.0]), (&g, vec![2.0, 4.0, 6.0]), (&f, vec![2.0, 4.0])] {
        assert_eq!(step.call(std::slice::from_ref(t)).unwrap()[0].to_vec::<f32>().unwrap(), want);
    }
    assert_eq!((step.stats().traces, step.stats().replays), (3, 4));
}

/// A parameter replaced behind the step's back is not in the signature
/// (tensors are bound by identity); `debug_retrace` notices it and runs
/// the new program.
#[test]
fn debug_retrace_reports_a_replaced_parameter() {
    let d = device();
    let w = Rc::new(std::cell::RefCell::new(Tensor::from_slice(&[1.0f32, 1.0], [2], &d).unwrap()));
    let w_in = w.clone();
    let mut step = compile_step(&d, move |args: &[Tensor]| Ok(vec![args[0].mul(&*w_in.borrow())?]));
    step.set_debug_retrace(true);
    let x = Tensor::from_slice(&[2.0f32, 3.0], [2], &d).unwrap();
    step.call(std::slice::from_ref(&x)).unwrap();
    *w.borrow_mut() = Tensor::from_slice(&[10.0f32, 10.0], [2], &d).unwrap();
    let y = step.call(std::slice::from_ref(&x)).unwrap();
    assert_eq!(y[0].to_vec::<f32>().unwrap(), vec![20.0, 30.0]);
    assert!(step.last_difference().unwrap().contains("tensor"), "{:?}", step.last_difference());
}

/// Dropout in a compiled step draws the masks eager mode draws: its seed
/// is a host input computed from the layer's counter at every call, and
/// the counter advances as in eager mode (twice per call for a layer used
/// twice).
#[test]
fn dropout_draws_the_eager_masks_in_a_compiled_step() {
    use wgrad::nn::Dropout;
    let (eager_model, compiled_model) = (Mlp::new(23), Mlp::new(23));
    let (eager_drop, drop) = (Dropout::new(0.3, 99).unwrap(), Dropout::new(0.3, 99).unwrap());
    let forward = |m: &Mlp, d: &Dropout, x: &Tensor, y: &Tensor| -> Result<Tensor> {
        let h = d.forward(&m.l1.forward(&d.forward(x)?)?.relu()?)?;
        m.l2.forward(&h)?.cross_entropy(y, ClassLoss::default())
    };
    let mut eager_opt = Sgd::new(&eager_model.params(), 0.1, 0.0, 0.0).unwrap();
    let mut opt = Sgd::new(&compiled_model.params(), 0.1, 0.0, 0.0).unwrap();
    let (model, d) = (&compiled_model, &drop);
    let mut step = compile_step(&device(), move |args: &[Tensor]| {
        opt.zero_grad();
        let loss = forward(model, d, &args[0], &args[1])?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    });
    for i in 0..4 {
        let (x, y) = batch(i);
        eager_opt.zero_grad();
        let want = forward(&eager_model, &eager_drop, &x, &y).unwrap();
        want.backward().unwrap();
        eager_opt.step().unwrap();
        let got = step.call(&[x, y]).unwrap();
        assert_close(&format!("step {i} loss"), &got[0].to_vec::<f32>().unwrap(), &want.to_vec::<f32>().unwrap());
        for (k, (g, w)) in values(&compiled_model.params()).iter().zip(values(&eager_model.params())).enumerate() {
            assert_close(&format!("step {i} parameter {k}"), g, &w);
        }
    }
    assert_eq!((step.stats().traces, step.stats().graph_breaks), (1, 0));
}

/// Indices passed to a compiled step (an embedding's ids, index_select,
/// gather) are data: each call's map is built on the host from that call's
/// indices and checked as eager mode checks them.
#[test]
fn indices_passed_in_are_data_and_checked_every_call() {
    let d = device();
    let table = |seed| wgrad::nn::uniform([7, 3], 1.0, seed, &d).unwrap();
    let (eager_w, w) = (table(31), table(31));
    let mut eager_opt = Adam::new(std::slice::from_ref(&eager_w), 0.05).unwrap();
    let mut opt = Adam::new(std::slice::from_ref(&w), 0.05).unwrap();
    let loss_of = |w: &Tensor, ids: &Tensor, pick: &Tensor, cols: &Tensor| -> Result<Tensor> {
        let rows = wgrad::embedding(ids, w)?; // [2, 3, 3]
        let picked = w.index_select(0, pick)?.gather(1, cols)?; // [4, 1]
        rows.sin()?.sum_all()?.add(&picked.square()?.sum_all()?)
    };
    let w_in = w.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| {
        opt.zero_grad();
        let loss = loss_of(&w_in, &a[0], &a[1], &a[2])?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    });
    let ints = |v: &[i32], shape: &[usize]| Tensor::from_slice(v, shape.to_vec(), &d).unwrap();
    for call in 0..4i32 {
        let c = call;
        let ids = ints(&[c, 1, (c * 3) % 7, 6, c % 2, 0], &[2, 3]);
        let pick = ints(&[(c + 1) % 7, c % 7, 5, 5], &[4]);
        let cols = ints(&[c % 3, 2, 0, (c + 1) % 3], &[4, 1]);
        eager_opt.zero_grad();
        let want = loss_of(&eager_w, &ids, &pick, &cols).unwrap();
        want.backward().unwrap();
        eager_opt.step().unwrap();
        let got = step.call(&[ids, pick, cols]).unwrap();
        assert_close(&format!("call {call} loss"), &got[0].to_vec::<f32>().unwrap(), &want.to_vec::<f32>().unwrap());
        assert_close(&format!("call {call} table"), &w.to_vec::<f32>().unwrap(), &eager_w.to_vec::<f32>().unwrap());
    }
    assert_eq!((step.stats().traces, step.stats().replays, step.stats().graph_breaks), (1, 4, 0));
    let before = (w.to_vec::<f32>().unwrap(), w.grad().map(|g| g.to_vec::<f32>().unwrap()));
    let bad = ints(&[0, 1, 7, 2, 3, 4], &[2, 3]);
    let err = step.call(&[bad, ints(&[0, 1, 2, 3], &[4]), ints(&[0, 0, 0, 0], &[4, 1])]).unwrap_err();
    assert!(err.to_string().contains("index 7 is out of range"), "{err}");
    assert_eq!((w.to_vec::<f32>().unwrap(), w.grad().map(|g| g.to_vec::<f32>().unwrap())), before);
}

/// A constant the step makes from host data each time is compared by its
/// contents: the same data is no difference, new data (a host value the
/// closure reads) is one.
#[test]
fn debug_retrace_compares_constants_made_in_the_step_by_contents() {
    let d = device();
    let offset = Rc::new(Cell::new(1.0f32));
    let offset_in = offset.clone();
    let dev = d.clone();
    let mut step = compile_step(&d, move |args: &[Tensor]| {
        let c = Tensor::from_slice(&[offset_in.get(), 2.0], [2], &dev)?;
        Ok(vec![args[0].add(&c)?])
    });
    step.set_debug_retrace(true);
    let x = Tensor::from_slice(&[10.0f32, 20.0], [2], &d).unwrap();
    for _ in 0..2 {
        assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![11.0, 22.0]);
    }
    assert!(step.last_difference().is_none(), "{:?}", step.last_difference());
    offset.set(5.0);
    assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![15.0, 22.0]);
    assert!(step.last_difference().unwrap().contains("constant made in the step"));
}

/// Runs `body` eagerly on `eager_w` and as a compiled step on `w` for each
/// argument list in `calls`, comparing the returned values and the
/// parameter after every call. Returns the step's stats.
fn eager_vs_step(
    w0: &[f32],
    calls: &[Vec<Tensor>],
    body: impl Fn(&Tensor, &mut Adam, &[Tensor]) -> Result<Vec<Tensor>> + Clone + 'static,
) -> wgrad::StepStats {
    let d = device();
    let n = w0.len();
    let make = || Tensor::from_slice(w0, [n], &d).unwrap().requires_grad(true).unwrap();
    let (eager_w, w) = (make(), make());
    let mut eager_opt = Adam::new(std::slice::from_ref(&eager_w), 0.1).unwrap();
    let mut opt = Adam::new(std::slice::from_ref(&w), 0.1).unwrap();
    let (w_in, body_in) = (w.clone(), body.clone());
    let mut step = compile_step(&d, move |a: &[Tensor]| body_in(&w_in, &mut opt, a));
    for (i, args) in calls.iter().enumerate() {
        let want = body(&eager_w, &mut eager_opt, args).unwrap();
        let got = step.call(args).unwrap();
        for (k, (g, e)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("call {i} returned {k}"), &g.to_vec::<f32>().unwrap(), &e.to_vec::<f32>().unwrap());
        }
        assert_close(&format!("call {i} parameter"), &w.to_vec::<f32>().unwrap(), &eager_w.to_vec::<f32>().unwrap());
    }
    step.stats()
}

fn vec_of(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, [v.len()], &device()).unwrap()
}

/// One argument passed twice, then two different ones: not one input.
#[test]
fn arguments_sharing_a_buffer_are_part_of_the_signature() {
    let x = vec_of(&[1.0, 2.0]);
    let calls = vec![vec![x.clone(), x], vec![vec_of(&[3.0, -1.0]), vec_of(&[5.0, 4.0])]];
    let stats = eager_vs_step(&[0.5, 1.5], &calls, |w, opt, a| {
        opt.zero_grad();
        let loss = w.mul(&a[0])?.sub(&a[1])?.square()?.sum_all()?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    });
    assert_eq!(stats.traces, 2, "{stats:?}");
}

/// An argument that is the parameter's own buffer when traced: the step
/// runs eagerly for that signature, and a later argument is left alone.
#[test]
fn an_argument_aliasing_a_parameter_runs_eagerly() {
    let d = device();
    let w = Tensor::from_slice(&[1.0f32, 2.0], [2], &d).unwrap().requires_grad(true).unwrap();
    let mut opt = Sgd::new(std::slice::from_ref(&w), 0.1, 0.0, 0.0).unwrap();
    let w_in = w.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| {
        opt.zero_grad();
        let loss = w_in.mul(&a[0])?.sum_all()?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    });
    step.call(&[w.detach()]).unwrap();
    let y = vec_of(&[10.0, 10.0]);
    step.call(std::slice::from_ref(&y)).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![10.0, 10.0], "the argument is not updated");
    assert_eq!(step.stats().graph_breaks, 1);
}

/// A gather of the parameter in the kernel that updates it in place would
/// read elements already overwritten: it is not stored in place.
#[test]
fn a_gather_of_an_updated_parameter_reads_the_old_values() {
    let n = 4096 * 4;
    let w0: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.4).collect();
    let perm: Vec<i32> = (0..n as i32).map(|i| (i * 7919 + 13) % n as i32).collect();
    let perm = Tensor::from_slice(&perm, [n], &device()).unwrap();
    let calls = vec![vec![perm.clone()], vec![perm]];
    eager_vs_step(&w0, &calls, |w, opt, a| {
        opt.zero_grad();
        w.square()?.sum_all()?.backward()?;
        // Read before the update, returned after it: the old values.
        let before = w.index_select(0, &a[0])?;
        opt.step()?;
        Ok(vec![before, w.index_select(0, &a[0])?])
    });
}

/// A per-call map larger than the uniform staging arena (an embedding of
/// 1,100 rows of 64 with its ids passed in) arrives whole.
#[test]
fn a_large_per_call_map_is_written_whole() {
    let (vocab, dim) = (1100usize, 64usize);
    let w0: Vec<f32> = (0..vocab * dim).map(|i| ((i * 31) % 101) as f32 * 0.01 - 0.5).collect();
    let ids = |k: i32| Tensor::from_slice(&[k, 7, 1099, k + 3, 500], [5], &device()).unwrap();
    let calls = vec![vec![ids(0)], vec![ids(40)], vec![ids(900)]];
    eager_vs_step(&w0, &calls, move |w, opt, a| {
        opt.zero_grad();
        let loss = wgrad::embedding(&a[0], &w.reshape([vocab, dim])?)?.sin()?.sum_all()?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    });
}

/// Two optimizer steps in one compiled step use Adam's corrections for
/// steps t + 1 and t + 2, as eager mode does.
#[test]
fn two_optimizer_steps_in_one_call_match_eager() {
    let calls = vec![vec![vec_of(&[1.0, 2.0])], vec![vec_of(&[0.5, -1.0])], vec![vec_of(&[2.0, 2.0])]];
    eager_vs_step(&[0.3, -0.7], &calls, |w, opt, a| {
        for _ in 0..2 {
            opt.zero_grad();
            w.mul(&a[0])?.square()?.sum_all()?.backward()?;
            opt.step()?;
        }
        Ok(vec![])
    });
}

/// Returning an argument (or a view of it) returns this call's.
#[test]
fn returned_arguments_are_this_calls() {
    let mut step = compile_step(&device(), |a: &[Tensor]| Ok(vec![a[0].clone(), a[0].reshape([2, 1])?]));
    step.call(&[vec_of(&[1.0, 7.0])]).unwrap();
    let got = step.call(&[vec_of(&[2.0, 7.0])]).unwrap();
    assert_eq!(got[0].to_vec::<f32>().unwrap(), vec![2.0, 7.0]);
    assert_eq!(got[1].to_vec::<f32>().unwrap(), vec![2.0, 7.0]);
    assert_eq!(got[1].dims(), &[2, 1]);
}

/// A traced tensor kept from an earlier trace is an `Err` in a later one,
/// not another value (nor a panic).
#[test]
fn a_tensor_kept_from_an_earlier_trace_is_an_error() {
    let kept: Rc<std::cell::RefCell<Option<Tensor>>> = Rc::default();
    let kept_in = kept.clone();
    let mut step = compile_step(&device(), move |a: &[Tensor]| {
        let y = a[0].mul(3.0)?;
        let out = match kept_in.borrow().as_ref() {
            Some(old) => y.add(old)?,
            None => y.clone(),
        };
        *kept_in.borrow_mut() = Some(y.exp()?.exp()?.exp()?);
        Ok(vec![out])
    });
    step.call(&[vec_of(&[1.0, 2.0])]).unwrap();
    // A view at another offset: a new signature, so a new trace.
    let err = step.call(&[vec_of(&[0.0, 1.0, 2.0]).narrow(0, 1, 2).unwrap()]).unwrap_err();
    assert!(err.to_string().contains("earlier trace"), "{err}");
}

/// A step writes the new `.grad` into the old one's storage when nothing
/// else holds it, so its peak holds one gradient per parameter (as the
/// eager step's `zero_grad()` first does); a `.grad` the caller still holds
/// keeps its values.
#[test]
fn new_grads_reuse_the_old_ones_unless_held() {
    let d = device();
    let n = 1 << 20; // 4 MiB of f32
    let w = wgrad::nn::uniform([n], 1.0, 5, &d).unwrap();
    let mut opt = Sgd::new(std::slice::from_ref(&w), 0.1, 0.0, 0.0).unwrap();
    let w_in = w.clone();
    let mut step = compile_step(&d, move |_: &[Tensor]| {
        opt.zero_grad();
        let loss = w_in.square()?.sum_all()?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    });
    for _ in 0..2 {
        step.call(&[]).unwrap();
    }
    d.synchronize().unwrap();
    let live = d.memory_stats().live_bytes;
    d.reset_peak_memory();
    step.call(&[]).unwrap();
    d.synchronize().unwrap();
    let grew = d.memory_stats().peak_bytes - live;
    assert!(grew < 1 << 20, "a call allocated {grew} bytes beyond what was live");
    // Held by the caller: the next call leaves it alone.
    let held = w.grad().unwrap();
    let before = held.to_vec::<f32>().unwrap();
    step.call(&[]).unwrap();
    assert_eq!(held.to_vec::<f32>().unwrap(), before);
    // The .grad is 2 w before the update, which scaled w by 0.8.
    let want: Vec<f32> = w.to_vec::<f32>().unwrap().iter().map(|v| 2.5 * v).collect();
    assert_close("the new .grad", &w.grad().unwrap().to_vec::<f32>().unwrap(), &want);
}

/// W5's step (a 50-step chain, its loss and its gradient) is two kernels:
/// the chain with its backward, and the loss's reduction; the backward's
/// `full 1` seed is a constant inlined into its readers, not a kernel.
#[test]
fn a_long_chain_step_is_two_kernels() {
    let d = device();
    let x = wgrad::nn::uniform([16], 1.0, 3, &d).unwrap();
    let x_in = x.clone();
    let mut step = compile_step(&d, move |_: &[Tensor]| {
        x_in.zero_grad();
        let mut y = x_in.clone();
        for _ in 0..50 {
            y = y.sin()?.mul(0.9)?.add(&y.mul(0.1)?)?;
        }
        let loss = y.sum_all()?;
        loss.backward()?;
        Ok(vec![loss])
    });
    step.call(&[]).unwrap();
    step.call(&[]).unwrap();
    assert_eq!(step.kernel_count(), Some(2));
    assert_eq!(step.stats().kernels_last_replay, 2);
    assert!(x.grad().is_some());
}

/// Edge cases through a compiled step, against eager: an empty parameter
/// beside a 0-d one, and NaN in the data (it propagates to the loss and the
/// parameters as in eager mode).
#[test]
fn empty_zero_d_and_nan_match_eager() {
    let d = device();
    let make = || {
        let e = Tensor::from_slice::<f32>(&[], [0], &d).unwrap().requires_grad(true).unwrap();
        let s = Tensor::from_slice(&[0.5f32], Vec::<usize>::new(), &d).unwrap().requires_grad(true).unwrap();
        (e, s)
    };
    let body = |e: &Tensor, s: &Tensor, opt: &mut Adam, x: &Tensor| -> Result<Vec<Tensor>> {
        opt.zero_grad();
        let loss = x.mul(s)?.square()?.sum_all()?.add(&e.sum_all()?)?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    };
    let ((ee, es), (ce, cs)) = (make(), make());
    let mut eager_opt = Adam::new(&[ee.clone(), es.clone()], 0.1).unwrap();
    let mut opt = Adam::new(&[ce.clone(), cs.clone()], 0.1).unwrap();
    let (ce_in, cs_in) = (ce.clone(), cs.clone());
    let mut step = compile_step(&d, move |a: &[Tensor]| body(&ce_in, &cs_in, &mut opt, &a[0]));
    for x in [[1.0f32, 2.0], [3.0, -1.0], [f32::NAN, 1.0], [1.0, 1.0]] {
        let x = vec_of(&x);
        let want = body(&ee, &es, &mut eager_opt, &x).unwrap()[0].to_vec::<f32>().unwrap();
        let got = step.call(&[x]).unwrap()[0].to_vec::<f32>().unwrap();
        let (ws, gs) = (es.to_vec::<f32>().unwrap(), cs.to_vec::<f32>().unwrap());
        assert_eq!((got[0].is_nan(), gs[0].is_nan()), (want[0].is_nan(), ws[0].is_nan()), "NaN as in eager mode");
        if !want[0].is_nan() {
            assert_close("loss", &got, &want);
            assert_close("0-d parameter", &gs, &ws);
        }
        assert_eq!(ce.to_vec::<f32>().unwrap(), Vec::<f32>::new());
    }
    assert_eq!((step.stats().traces, step.stats().graph_breaks), (1, 0));
}

/// A workload's step (zero the `.grad`s, the loss, backward) compiled,
/// against the same eagerly: the kernels a replay runs, and the loss and
/// `.grad`s agreeing within `tol` (relative to the largest magnitude).
fn workload_step_kernels(
    params: &[Tensor],
    data: &[Tensor],
    loss: fn(&[Tensor], &[Tensor]) -> Result<Tensor>,
    tol: f32,
) -> usize {
    let d = device();
    let copies = |ts: &[Tensor]| -> Vec<Tensor> {
        ts.iter().map(|t| Tensor::from_slice(&t.to_vec::<f32>().unwrap(), t.dims().to_vec(), &d).unwrap()).collect()
    };
    let eager: Vec<Tensor> = copies(params).into_iter().map(|t| t.requires_grad(true).unwrap()).collect();
    let compiled: Vec<Tensor> = copies(params).into_iter().map(|t| t.requires_grad(true).unwrap()).collect();
    let (ps, ds) = (compiled.clone(), data.to_vec());
    let mut step = compile_step(&d, move |_: &[Tensor]| {
        ps.iter().for_each(Tensor::zero_grad);
        let l = loss(&ps, &ds)?;
        l.backward()?;
        Ok(vec![l])
    });
    let mut got = Vec::new();
    for _ in 0..2 {
        got = step.call(&[]).unwrap();
    }
    let want = loss(&eager, data).unwrap();
    want.backward().unwrap();
    let scale = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let close = |what: &str, g: &[f32], w: &[f32]| {
        let s = scale(w);
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() <= tol * s, "{what}[{i}]: compiled {a} vs eager {b} (scale {s})");
        }
    };
    close("loss", &got[0].to_vec::<f32>().unwrap(), &want.to_vec::<f32>().unwrap());
    for (c, e) in compiled.iter().zip(&eager) {
        close("grad", &c.grad().unwrap().to_vec::<f32>().unwrap(), &e.grad().unwrap().to_vec::<f32>().unwrap());
    }
    assert_eq!(step.stats().kernels_last_replay as usize, step.kernel_count().unwrap());
    step.kernel_count().unwrap()
}

/// Issue 15's kernel budgets: W2 (a fused elementwise chain and its loss)
/// and W4 (layer_norm, affine, softmax, a weighted sum) in at most 4
/// kernels per step, at the benchmark's sizes.
#[test]
fn w2_and_w4_steps_are_at_most_four_kernels() {
    let d = device();
    let u = |dims: &[usize], seed: u64| wgrad::nn::uniform(dims.to_vec(), 1.0, seed, &d).unwrap().detach();
    let w2 = |p: &[Tensor], _: &[Tensor]| -> Result<Tensor> {
        let (x, a, b) = (&p[0], &p[1], &p[2]);
        x.mul(a)?.add(b)?.tanh()?.mul(&x.sigmoid()?)?.add(&x.mul(x)?.neg()?.exp()?)?.sum_all()
    };
    let n = 1 << 20;
    let kernels = workload_step_kernels(&[u(&[n], 1), u(&[n], 2), u(&[n], 3)], &[], w2, 1e-5);
    assert!(kernels <= 4 || !wgrad::Passes::from_env().reduce_stores, "W2: {kernels} kernels");
    let w4 = |p: &[Tensor], t: &[Tensor]| -> Result<Tensor> {
        let y = p[0].layer_norm(&[1024], None, None, 1e-5)?.mul(&p[1])?.add(&p[2])?;
        y.softmax(-1)?.mul(&t[0])?.sum_all()
    };
    let params = [u(&[256, 1024], 4), u(&[1024], 5), u(&[1024], 6)];
    let kernels = workload_step_kernels(&params, &[u(&[256, 1024], 7)], w4, 1e-4);
    // Without row kernels (WGRAD_PASSES=-rows) only the results are checked.
    assert!(kernels <= 4 || !wgrad::Passes::from_env().rows, "W4: {kernels} kernels");
}

/// With `zero_grad()` after `step()` the step leaves no `.grad`, so a
/// gradient consumed only by the update is an intermediate: computed where
/// the update reads it (elementwise, or in a matmul's epilogue with the
/// tiled template) or held in a slot shared with other intermediates. The
/// program owns less memory than the same step with `zero_grad()` first
/// (which leaves every `.grad`).
#[test]
fn gradients_left_to_none_are_never_stored() {
    let d = device();
    let program_bytes = |zero_grad_last: bool| -> u64 {
        let m = Mlp::new(41);
        let params = m.params();
        let mut opt = Sgd::new(&params, 0.1, 0.0, 0.0).unwrap();
        let mut step = compile_step(&d, move |args: &[Tensor]| {
            if !zero_grad_last {
                opt.zero_grad();
            }
            let loss = m.loss(&args[0], &args[1])?;
            loss.backward()?;
            opt.step()?;
            if zero_grad_last {
                opt.zero_grad();
            }
            Ok(vec![loss])
        });
        for i in 0..2 {
            let (x, y) = batch(i);
            step.call(&[x, y]).unwrap();
        }
        assert_eq!(params.iter().all(|p| p.grad().is_none()), zero_grad_last);
        step.reports().last().unwrap().program_bytes
    };
    let (first, last) = (program_bytes(false), program_bytes(true));
    assert!(last < first, "zero_grad last {last} B, first {first} B");
}

/// Batch `i` of `n` rows: inputs and labels.
fn batch_of(n: usize, i: u64) -> (Tensor, Tensor) {
    let d = device();
    let x = wgrad::nn::uniform([n, 12], 1.0, 2000 + i, &d).unwrap().detach();
    let labels: Vec<i32> = (0..n as i32).map(|j| (j * 3 + i as i32 * 7) % 5).collect();
    (x, Tensor::from_slice(&labels, [n], &d).unwrap())
}

/// Issue 16: a step traced at one batch size runs at others without
/// tracing again (its graph instantiated at the new size and lowered), and
/// matches eager mode at each, through Adam (host inputs) and a mean over
/// the batch (a scalar 1 / B baked into a kernel). Nine sizes from 10 to
/// 90, then sizes seen before (cache hits), a last partial batch of 3,
/// and 2 (the smallest a family covers).
#[test]
fn new_batch_sizes_replay_without_tracing_and_match_eager() {
    let (eager_model, compiled_model) = (Mlp::new(61), Mlp::new(61));
    let mut eager_opt = Adam::new(&eager_model.params(), 1e-2).unwrap();
    let opt = Rc::new(std::cell::RefCell::new(Adam::new(&compiled_model.params(), 1e-2).unwrap()));
    let body = |model: &Mlp, opt: &mut dyn Optimizer, x: &Tensor, y: &Tensor| -> Result<Vec<Tensor>> {
        opt.zero_grad();
        let h = model.l1.forward(x)?.relu()?;
        // A mean over the batch besides the loss's own.
        let penalty = h.square()?.mean(&[0], false)?.sum_all()?.mul(1e-3)?;
        let loss = model.l2.forward(&h)?.cross_entropy(y, ClassLoss::default())?.add(&penalty)?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    };
    let (opt_in, model) = (opt.clone(), &compiled_model);
    let mut step =
        compile_step(&device(), move |args: &[Tensor]| body(model, &mut *opt_in.borrow_mut(), &args[0], &args[1]));
    let pipelines = || device().counters().pipelines_created;
    let mut new_pipelines_after_first = 0;
    let sizes = [10, 20, 30, 40, 50, 60, 70, 80, 90, 30, 90, 3, 2];
    for (i, &n) in sizes.iter().enumerate() {
        let (x, y) = batch_of(n, i as u64);
        let want = body(&eager_model, &mut eager_opt, &x, &y).unwrap();
        let before = pipelines();
        let got = step.call(&[x, y]).unwrap();
        if i > 0 {
            new_pipelines_after_first += pipelines() - before;
        }
        let what = |s: &str| format!("batch {n} (call {i}): {s}");
        assert_close(&what("loss"), &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap());
        for (k, (g, w)) in values(&compiled_model.params()).iter().zip(values(&eager_model.params())).enumerate() {
            assert_close(&what(&format!("parameter {k}")), g, &w);
        }
    }
    let stats = step.stats();
    assert_eq!(stats.traces, 1, "one trace for every batch size: {stats:?}");
    assert_eq!(stats.replans, 10, "each new size lowered once: {stats:?}");
    assert_eq!((stats.replays, stats.eager_calls), (sizes.len() as u64, 0), "{stats:?}");
    eprintln!("new pipelines after the first call: {new_pipelines_after_first}");
}

/// Issue 16: kernel choices that depend on sizes are ranges of batch
/// sizes. A step over [B, 512] traced at 12 replays at 10, 9 and 8 with
/// the same kernels (four-wide from 4,096 elements), re-plans with other
/// kernels below 8 (under 4,096 elements: one element per invocation),
/// counted and logged, and a batch of 1 traces again; every size matches
/// eager mode.
#[test]
fn kernel_choices_hold_over_batch_size_ranges() {
    let d = device();
    let make = || wgrad::nn::uniform([512], 1.0, 81, &d).unwrap().detach().requires_grad(true).unwrap();
    let (w_eager, w_step) = (make(), make());
    let body = |w: &Tensor, opt: &mut Sgd, x: &Tensor| -> Result<Vec<Tensor>> {
        opt.zero_grad();
        let loss = x.mul(w)?.tanh()?.square()?.mean_all()?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    };
    let mut eager_opt = Sgd::new(std::slice::from_ref(&w_eager), 0.5, 0.0, 0.0).unwrap();
    let mut opt = Sgd::new(std::slice::from_ref(&w_step), 0.5, 0.0, 0.0).unwrap();
    let w_in = w_step.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| body(&w_in, &mut opt, &a[0]));
    let mut expected_boundaries = 0;
    for (i, n) in [12usize, 10, 9, 8, 16, 7, 6, 1].into_iter().enumerate() {
        let x = wgrad::nn::uniform([n, 512], 1.0, 300 + i as u64, &d).unwrap().detach();
        let want = body(&w_eager, &mut eager_opt, &x).unwrap();
        let got = step.call(&[x]).unwrap();
        assert_close(&format!("batch {n} loss"), &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap());
        assert_close(&format!("batch {n} w"), &w_step.to_vec::<f32>().unwrap(), &w_eager.to_vec::<f32>().unwrap());
        let s = step.stats();
        if (2..8).contains(&n) {
            expected_boundaries += 1;
        }
        assert_eq!(s.replans_across_boundaries, expected_boundaries, "after batch {n}: {s:?}");
    }
    let s = step.stats();
    assert_eq!((s.traces, s.replans, s.eager_calls), (2, 6, 0), "a batch of 1 traces again: {s:?}");
}

/// Issue 16: a gradient penalty (a gradient taken with `create_graph`
/// inside the step, then differentiated again by `backward()`) and a
/// Hessian-vector product are compiled into the step's one program and
/// match eager mode.
#[test]
fn higher_order_gradients_inside_a_step_match_eager() {
    use wgrad::BackwardOptions;
    let d = device();
    let make = |seed: u64| wgrad::nn::uniform([3, 4], 0.5, seed, &d).unwrap().detach().requires_grad(true).unwrap();
    let (w_eager, w_step) = (make(71), make(71));
    let body = |w: &Tensor, x: &Tensor, opt: &mut dyn Optimizer| -> Result<Vec<Tensor>> {
        opt.zero_grad();
        let y = x.matmul(w)?.tanh()?.sum_all()?;
        let create = BackwardOptions { create_graph: true, ..Default::default() };
        let g = wgrad::grad(&[&y], &[w], None, create)?[0].clone().expect("w reaches y");
        // A Hessian-vector product of y with v = 1, through g.
        let hv = wgrad::grad(&[&g.sum_all()?], &[w], None, create)?[0].clone().expect("g depends on w");
        let loss = y.add(&g.square()?.sum_all()?.mul(0.1)?)?.add(&hv.sum_all()?.mul(0.01)?)?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss, hv])
    };
    let mut eager_opt = Sgd::new(std::slice::from_ref(&w_eager), 0.1, 0.0, 0.0).unwrap();
    let mut opt = Sgd::new(std::slice::from_ref(&w_step), 0.1, 0.0, 0.0).unwrap();
    let w_in = w_step.clone();
    let mut step = compile_step(&d, move |args: &[Tensor]| body(&w_in, &args[0], &mut opt));
    for i in 0..4 {
        let x = wgrad::nn::uniform([5, 3], 1.0, 300 + i, &d).unwrap().detach();
        // The Hessian-vector product in f64 on the host: with t = tanh(x w),
        // hv[k][j] = sum_i -2 t (1 - t^2) x[i][k] (sum_k' x[i][k']).
        let (xh, wh) = (x.to_vec::<f32>().unwrap(), w_eager.to_vec::<f32>().unwrap());
        let mut hv_ref = vec![0.0f64; 12];
        for r in 0..5 {
            let row_sum: f64 = (0..3).map(|k| xh[r * 3 + k] as f64).sum();
            for j in 0..4 {
                let t = (0..3).map(|k| xh[r * 3 + k] as f64 * wh[k * 4 + j] as f64).sum::<f64>().tanh();
                for k in 0..3 {
                    hv_ref[k * 4 + j] += -2.0 * t * (1.0 - t * t) * xh[r * 3 + k] as f64 * row_sum;
                }
            }
        }
        let want = body(&w_eager, &x, &mut eager_opt).unwrap();
        let got = step.call(&[x]).unwrap();
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("step {i} output {k}"), &g.to_vec::<f32>().unwrap(), &w.to_vec::<f32>().unwrap());
        }
        assert_close(&format!("step {i} w"), &w_step.to_vec::<f32>().unwrap(), &w_eager.to_vec::<f32>().unwrap());
        for (k, (g, r)) in got[1].to_vec::<f32>().unwrap().iter().zip(&hv_ref).enumerate() {
            assert!((*g as f64 - r).abs() <= 1e-5 * r.abs().max(1.0), "step {i} hv[{k}]: compiled {g} vs f64 {r}");
        }
    }
    let stats = step.stats();
    assert_eq!((stats.traces, stats.graph_breaks, stats.eager_calls), (1, 0, 0), "{stats:?}");
}

/// The gradient of a loss with a gradient penalty and a Hessian-vector
/// product in it (a third derivative of the network) is compiled into one
/// step and equals eager mode and central finite differences of the loss
/// in f64, at batch sizes 5, 7 and 6 (7 and 6 replanned from 5's trace).
#[test]
fn gradient_penalty_gradients_match_f64_finite_differences() {
    use wgrad::BackwardOptions;
    let d = device();
    let w = wgrad::nn::uniform([3, 4], 0.5, 73, &d).unwrap().detach().requires_grad(true).unwrap();
    let body = |w: &Tensor, x: &Tensor| -> Result<Vec<Tensor>> {
        let create = BackwardOptions { create_graph: true, ..Default::default() };
        let y = x.matmul(w)?.tanh()?.sum_all()?;
        let g = wgrad::grad(&[&y], &[w], None, create)?[0].clone().expect("w reaches y");
        let hv = wgrad::grad(&[&g.sum_all()?], &[w], None, create)?[0].clone().expect("g depends on w");
        let loss = y.add(&g.square()?.sum_all()?.mul(0.1)?)?.add(&hv.sum_all()?.mul(0.01)?)?;
        let dw = wgrad::grad(&[&loss], &[w], None, BackwardOptions::default())?[0].clone().expect("loss depends on w");
        Ok(vec![loss, dw])
    };
    // The loss in f64: t = tanh(x w), g = x^T (1 - t^2),
    // hv[k][j] = sum_i -2 t (1 - t^2) x[i][k] (sum_k' x[i][k']).
    let loss_f64 = |x: &[f32], rows: usize, w: &[f64]| -> f64 {
        let (mut y, mut g, mut hv) = (0.0, [0.0f64; 12], [0.0f64; 12]);
        for r in 0..rows {
            let row_sum: f64 = (0..3).map(|k| x[r * 3 + k] as f64).sum();
            for j in 0..4 {
                let t = (0..3).map(|k| x[r * 3 + k] as f64 * w[k * 4 + j]).sum::<f64>().tanh();
                y += t;
                for k in 0..3 {
                    g[k * 4 + j] += x[r * 3 + k] as f64 * (1.0 - t * t);
                    hv[k * 4 + j] += -2.0 * t * (1.0 - t * t) * x[r * 3 + k] as f64 * row_sum;
                }
            }
        }
        y + 0.1 * g.iter().map(|v| v * v).sum::<f64>() + 0.01 * hv.iter().sum::<f64>()
    };
    let w_in = w.clone();
    let mut step = compile_step(&d, move |args: &[Tensor]| body(&w_in, &args[0]));
    let w_host: Vec<f64> = w.to_vec::<f32>().unwrap().into_iter().map(f64::from).collect();
    for (i, rows) in [5usize, 7, 6].into_iter().enumerate() {
        let x = wgrad::nn::uniform([rows, 3], 1.0, 400 + i as u64, &d).unwrap().detach();
        let xh = x.to_vec::<f32>().unwrap();
        let h = 1e-4;
        let fd: Vec<f64> = (0..12)
            .map(|k| {
                let (mut up, mut down) = (w_host.clone(), w_host.clone());
                up[k] += h;
                down[k] -= h;
                (loss_f64(&xh, rows, &up) - loss_f64(&xh, rows, &down)) / (2.0 * h)
            })
            .collect();
        let eager = body(&w, &x).unwrap();
        let got = step.call(&[x]).unwrap();
        let want_loss = loss_f64(&xh, rows, &w_host);
        for (mode, out) in [("eager", &eager), ("compiled step", &got)] {
            let loss = out[0].to_scalar::<f32>().unwrap() as f64;
            assert!(
                (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                "{mode} batch {rows}: loss {loss} vs f64 {want_loss}"
            );
            for (k, (g, r)) in out[1].to_vec::<f32>().unwrap().iter().zip(&fd).enumerate() {
                assert!(
                    (*g as f64 - r).abs() <= 1e-4 * r.abs().max(1.0),
                    "{mode} batch {rows}: dL/dw[{k}] {g} vs finite differences {r}"
                );
            }
        }
        assert_close(
            &format!("batch {rows} dL/dw"),
            &got[1].to_vec::<f32>().unwrap(),
            &eager[1].to_vec::<f32>().unwrap(),
        );
    }
    let stats = step.stats();
    assert_eq!((stats.traces, stats.replans, stats.graph_breaks, stats.eager_calls), (1, 2, 0, 0), "{stats:?}");
}

/// Issue 16's differential test: random small training programs (width,
/// activations, layer_norm or not, class or regression loss, SGD or Adam)
/// stepped at random batch sizes, a repeated size and a last partial batch
/// among them, eagerly and as a compiled step from the same start: every
/// loss and parameter equal after every step, one trace per program (a
/// first batch under 3 may cost one more: it has no batch family).
#[test]
fn random_programs_at_random_batch_sizes_match_eager() {
    let d = device();
    let mut rng = common::Rng::new(0x9e37_79b9_7f4a_7c15u64);
    let mut next = |n: u64| rng.below(n);
    for program in 0..12u64 {
        let width = 4 + next(12) as usize;
        let acts: Vec<u64> = (0..1 + next(3)).map(|_| next(4)).collect();
        let (norm, classes, adam) = (next(2) == 0, next(2) == 0, next(2) == 0);
        let sizes: Vec<usize> = (0..6).map(|_| 2 + next(40) as usize).chain([7]).collect();
        let make = || {
            let l1 = Linear::new(6, width, true, 500 + program, &d).unwrap();
            let l2 = Linear::new(width, 3, true, 600 + program, &d).unwrap();
            let req = |t: Tensor| t.requires_grad(true).unwrap();
            Mlp {
                l1: Linear { weight: req(l1.weight), bias: l1.bias.map(req) },
                l2: Linear { weight: req(l2.weight), bias: l2.bias.map(req) },
            }
        };
        let (eager_model, model) = (make(), make());
        let opt_of = |m: &Mlp| -> Box<dyn Optimizer> {
            match adam {
                true => Box::new(Adam::new(&m.params(), 1e-2).unwrap()),
                false => Box::new(Sgd::new(&m.params(), 0.05, 0.9, 0.0).unwrap()),
            }
        };
        let (mut eager_opt, mut opt) = (opt_of(&eager_model), opt_of(&model));
        let acts_in = acts.clone();
        let body = move |m: &Mlp, opt: &mut dyn Optimizer, x: &Tensor, y: &Tensor| -> Result<Vec<Tensor>> {
            opt.zero_grad();
            let mut h = m.l1.forward(x)?;
            for a in &acts_in {
                h = match a {
                    0 => h.relu()?,
                    1 => h.tanh()?,
                    2 => h.sigmoid()?,
                    _ => h.gelu()?,
                };
            }
            if norm {
                h = h.layer_norm(&[width], None, None, 1e-5)?;
            }
            let out = m.l2.forward(&h)?;
            let loss = match classes {
                true => out.cross_entropy(y, ClassLoss::default())?,
                false => out.mse_loss(y, wgrad::Reduction::Mean)?,
            };
            loss.backward()?;
            opt.step()?;
            Ok(vec![loss])
        };
        let model_in = &model;
        let body_in = body.clone();
        let mut step = compile_step(&d, move |a: &[Tensor]| body_in(model_in, opt.as_mut(), &a[0], &a[1]));
        for (i, &n) in sizes.iter().enumerate() {
            let x = wgrad::nn::uniform([n, 6], 1.0, 7000 + 31 * program + i as u64, &d).unwrap().detach();
            let y = match classes {
                true => Tensor::from_slice(&(0..n as i32).map(|j| (j * 7 + i as i32) % 3).collect::<Vec<_>>(), [n], &d),
                false => Ok(wgrad::nn::uniform([n, 3], 1.0, 8000 + 31 * program + i as u64, &d).unwrap().detach()),
            }
            .unwrap();
            let want = body(&eager_model, eager_opt.as_mut(), &x, &y).unwrap();
            let got = step.call(&[x, y]).unwrap();
            let what = |s: &str| {
                format!("program {program} (acts {acts:?}, norm {norm}, classes {classes}, adam {adam}) batch {n}: {s}")
            };
            assert_close(&what("loss"), &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap());
            for (k, (g, w)) in values(&model.params()).iter().zip(values(&eager_model.params())).enumerate() {
                assert_close(&what(&format!("parameter {k}")), g, &w);
            }
        }
        let stats = step.stats();
        let allowed = if sizes[0] < 3 { 2 } else { 1 };
        assert!(stats.traces <= allowed && stats.eager_calls == 0, "program {program} sizes {sizes:?}: {stats:?}");
    }
}

/// A step that slices a fixed tensor by the batch size: lowered at a
/// larger batch it would read past that tensor, so the call runs eagerly
/// and returns eager mode's error; at a batch that fits it replays. A
/// gather whose indices are an argument builds its map from the traced
/// sizes, so such a step traces per batch size (and stays right).
#[test]
fn batch_sizes_the_program_cannot_cover_run_eagerly_or_trace() {
    let d = device();
    let table = wgrad::nn::uniform([40, 3], 1.0, 77, &d).unwrap().detach();
    let t_in = table.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| {
        let n = a[0].dims()[0];
        Ok(vec![a[0].mul(&t_in.narrow(0, 0, n)?)?.sum_all()?])
    });
    let x = |n: usize| wgrad::nn::uniform([n, 3], 1.0, 78 + n as u64, &d).unwrap().detach();
    let want =
        |n: usize| x(n).mul(table.narrow(0, 0, n).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    for n in [10, 30, 40] {
        let got = step.call(&[x(n)]).unwrap()[0].to_scalar::<f32>().unwrap();
        assert!((got - want(n)).abs() <= 1e-5 * want(n).abs().max(1.0), "batch {n}: {got} vs {}", want(n));
    }
    let err = step.call(&[x(50)]).unwrap_err().to_string();
    assert!(err.contains("narrow"), "{err}");
    // 42 rows would read 126 of the table's 120 elements: inside its
    // 512-byte allocation (the pool's size class), past its end all the
    // same. Eager mode's error, not the pool's slack.
    let err = step.call(&[x(42)]).unwrap_err().to_string();
    assert!(err.contains("narrow"), "{err}");
    let s = step.stats();
    assert_eq!((s.traces, s.replans, s.eager_calls), (1, 4, 2), "{s:?}");

    // Indices passed in: a map per call, built from the traced sizes.
    let w = wgrad::nn::uniform([50, 4], 1.0, 79, &d).unwrap().detach();
    let w_in = w.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| Ok(vec![w_in.index_select(0, &a[0])?.square()?.sum_all()?]));
    for n in [5, 9, 40] {
        let idx = Tensor::from_slice(&(0..n as i32).map(|i| (i * 7) % 50).collect::<Vec<_>>(), [n], &d).unwrap();
        let want = w.index_select(0, &idx).unwrap().square().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let got = step.call(&[idx]).unwrap()[0].to_scalar::<f32>().unwrap();
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{n} indices: {got} vs {want}");
    }
    assert_eq!((step.stats().traces, step.stats().replans), (3, 0), "{:?}", step.stats());
}

/// W1's step (784 -> 512 -> 512 -> 10, SGD) at batch sizes 10, 20, ...,
/// 90: one trace, equal to eager at every size.
#[test]
fn w1_at_nine_batch_sizes_is_one_trace() {
    // A device of its own: its pipeline count is this test's alone (tests
    // run in parallel on the shared one).
    let d = wgrad::Device::new().unwrap();
    let layer = |i: usize, o: usize, seed: u64| {
        let l = Linear::new(i, o, true, seed, &d).unwrap();
        let req = |t: Tensor| t.requires_grad(true).unwrap();
        Linear { weight: req(l.weight), bias: l.bias.map(req) }
    };
    let make = || [layer(784, 512, 1), layer(512, 512, 2), layer(512, 10, 3)];
    let (eager, model) = (make(), make());
    let params = |m: &[Linear; 3]| m.iter().flat_map(|l| l.parameters()).collect::<Vec<_>>();
    let body = |m: &[Linear; 3], opt: &mut Sgd, x: &Tensor, y: &Tensor| -> Result<Vec<Tensor>> {
        opt.zero_grad();
        let h = m[1].forward(&m[0].forward(x)?.relu()?)?.relu()?;
        let loss = m[2].forward(&h)?.cross_entropy(y, ClassLoss::default())?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    };
    let mut eager_opt = Sgd::new(&params(&eager), 0.01, 0.0, 0.0).unwrap();
    let mut opt = Sgd::new(&params(&model), 0.01, 0.0, 0.0).unwrap();
    let model_in = &model;
    let mut step = compile_step(&d, move |a: &[Tensor]| body(model_in, &mut opt, &a[0], &a[1]));
    let mut new_pipelines = 0;
    for (i, n) in (10..=90).step_by(10).enumerate() {
        let x = wgrad::nn::uniform([n, 784], 1.0, 900 + i as u64, &d).unwrap().detach();
        let y =
            Tensor::from_slice(&(0..n as i32).map(|j| (j * 3 + i as i32) % 10).collect::<Vec<_>>(), [n], &d).unwrap();
        let want = body(&eager, &mut eager_opt, &x, &y).unwrap();
        let before = d.counters().pipelines_created;
        let got = step.call(&[x, y]).unwrap();
        if i > 0 {
            new_pipelines += d.counters().pipelines_created - before;
        }
        assert_close(&format!("batch {n} loss"), &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap());
    }
    for (k, (g, w)) in values(&params(&model)).iter().zip(values(&params(&eager))).enumerate() {
        assert_close(&format!("parameter {k}"), g, &w);
    }
    let s = step.stats();
    assert_eq!((s.traces, s.replans, s.eager_calls, s.replans_across_boundaries), (1, 8, 0, 0), "{s:?}");
    // At batch 10 (W1's class count) the relu mask [10, 512] and W3's
    // update [512, 10] could fuse through a transposed view, which no other
    // size allows; the family's fusion is checked at a second size, so it
    // does not.
    assert_eq!(new_pipelines, 0, "W1 at batch sizes 10..90: new pipelines after the first call");
}

/// Indices that are part of an argument (a prefix view) are the call's:
/// a map built from the traced call's values would replay them. The step
/// runs eagerly (a graph break) and every call equals eager mode.
#[test]
fn indices_viewing_part_of_an_argument_run_eagerly() {
    let d = device();
    let w = wgrad::nn::uniform([10, 3], 1.0, 81, &d).unwrap().detach();
    let w_in = w.clone();
    let mut step =
        compile_step(&d, move |a: &[Tensor]| Ok(vec![w_in.index_select(0, &a[0].narrow(0, 0, 4)?)?.sum_all()?]));
    for idx in [[0i32, 1, 2, 3, 4, 5], [9, 9, 9, 9, 9, 9], [2, 7, 1, 8, 0, 0]] {
        let idx = Tensor::from_slice(&idx, [6], &d).unwrap();
        let want =
            w.index_select(0, &idx.narrow(0, 0, 4).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let got = step.call(&[idx]).unwrap()[0].to_scalar::<f32>().unwrap();
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{got} vs {want}");
    }
    assert_eq!(step.stats().replays, 0, "{:?}", step.stats());
    let bad = Tensor::from_slice(&[0i32, 1, 2, 10, 0, 0], [6], &d).unwrap();
    assert!(step.call(&[bad]).unwrap_err().to_string().contains("index_select"));
}

/// `x[-64:]` clamps its start to 0 on 32 rows (and on 31 and 30, where
/// the step's family is fitted) but starts at 36 on 100 rows: a step whose
/// slices clamped is not extrapolated to other batch sizes (each traces),
/// and every size equals eager mode.
#[test]
fn clamped_slices_trace_each_batch_size() {
    let d = device();
    let mut step =
        compile_step(&d, |a: &[Tensor]| Ok(vec![a[0].slice_step(0, Some(-64), None, 1)?.square()?.sum_all()?]));
    for n in [32, 100, 40, 100] {
        let x = wgrad::nn::uniform([n, 3], 1.0, 90 + n as u64, &d).unwrap().detach();
        let want = x.narrow(0, n.saturating_sub(64), n.min(64)).unwrap().square().unwrap().sum_all().unwrap();
        let want = want.to_scalar::<f32>().unwrap();
        let got = step.call(&[x]).unwrap()[0].to_scalar::<f32>().unwrap();
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "batch {n}: {got} vs {want}");
    }
    let s = step.stats();
    assert_eq!((s.traces, s.replans), (3, 0), "{s:?}");
    // Clamps at the fit's smaller sizes only: `x[:10]` first called on 10
    // rows (9 and 8 clamp), and `x[::3]`, 3 rows at 9, 8 and 7.
    type Body = fn(&[Tensor]) -> wgrad::Result<Vec<Tensor>>;
    let cases: [(Body, usize, usize); 2] = [
        (|a| Ok(vec![a[0].slice_step(0, None, Some(10), 1)?.square()?.sum_all()?]), 10, 20),
        (|a| Ok(vec![a[0].slice_step(0, None, None, 3)?.square()?.sum_all()?]), 9, 30),
    ];
    for (body, first, later) in cases {
        let mut step = compile_step(&d, body);
        for n in [first, later] {
            let x = wgrad::nn::uniform([n, 3], 1.0, 190 + n as u64, &d).unwrap().detach();
            let want = body(std::slice::from_ref(&x)).unwrap()[0].to_scalar::<f32>().unwrap();
            let got = step.call(&[x]).unwrap()[0].to_scalar::<f32>().unwrap();
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "batch {n}: {got} vs {want}");
        }
        assert_eq!(step.stats().replans, 0, "{:?}", step.stats());
    }
}

/// A hook registered on a parameter between calls would not run in a
/// replay: the step traces again, the hook breaks that trace, and the call
/// runs eagerly with it, as eager mode would (the hook clamps the
/// gradient). As after any graph break, the step then stays eager for
/// these arguments, also once the hook is removed.
#[test]
fn hooks_registered_after_the_trace_run() {
    let d = device();
    let w = Tensor::from_slice(&[3.0f32], [1], &d).unwrap().requires_grad(true).unwrap();
    let w_in = w.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| {
        w_in.zero_grad();
        let loss = w_in.mul(&a[0])?.sum_all()?;
        loss.backward()?;
        Ok(vec![w_in.grad().expect("w has a gradient")])
    });
    let x = Tensor::from_slice(&[5.0f32], [1], &d).unwrap();
    assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![5.0]);
    assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![5.0]);
    let handle = w.register_hook(|g| g.clamp(-1.0, 1.0).ok()).unwrap();
    assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![1.0]);
    assert_eq!(step.stats().eager_calls, 1, "{:?}", step.stats());
    handle.remove();
    assert_eq!(step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap(), vec![5.0]);
    assert_eq!(step.stats().eager_calls, 2, "{:?}", step.stats());
}

type Kept = Rc<std::cell::RefCell<Option<Tensor>>>;

/// An FGSM step: the loss at `x` pushed along the sign of its gradient,
/// taken through a leaf made here (kept in `keep` when given), then an
/// SGD step on `w`.
fn fgsm(w: &Tensor, x: &Tensor, opt: &mut dyn Optimizer, keep: Option<&Kept>) -> Result<Vec<Tensor>> {
    opt.zero_grad();
    let x_adv = x.detach().requires_grad(true)?;
    x_adv.matmul(w)?.tanh()?.sum_all()?.backward()?;
    let push = x_adv.grad().expect("x_adv.grad").sign()?.mul(0.05)?;
    if let Some(slot) = keep {
        *slot.borrow_mut() = Some(x_adv);
    }
    opt.zero_grad();
    let loss = x.add(&push)?.matmul(w)?.tanh()?.sum_all()?;
    loss.backward()?;
    opt.step()?;
    Ok(vec![loss])
}

/// A leaf made inside the step every call (FGSM's perturbed input,
/// differentiated with `backward()` to read its `.grad`) is held weakly by
/// the program: gone after the call, it is neither guarded nor set, so the
/// step traces once and replays. (Before, the `.grad` the last replay set
/// failed the guard: a trace and one more cached program every call.)
/// Equals eager mode every call.
#[test]
fn a_leaf_made_inside_the_step_keeps_the_cache_bounded() {
    let d = device();
    let make = |seed: u64| wgrad::nn::uniform([3, 4], 0.5, seed, &d).unwrap().detach().requires_grad(true).unwrap();
    let (w_eager, w_step) = (make(81), make(81));
    let mut eager_opt = Sgd::new(std::slice::from_ref(&w_eager), 0.1, 0.0, 0.0).unwrap();
    let mut opt = Sgd::new(std::slice::from_ref(&w_step), 0.1, 0.0, 0.0).unwrap();
    let w_in = w_step.clone();
    let mut step = compile_step(&d, move |args: &[Tensor]| fgsm(&w_in, &args[0], &mut opt, None));
    for i in 0..20 {
        let x = wgrad::nn::uniform([5, 3], 1.0, 400 + i, &d).unwrap().detach();
        let want = fgsm(&w_eager, &x, &mut eager_opt, None).unwrap();
        let got = step.call(&[x]).unwrap();
        assert_close(&format!("call {i} loss"), &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap());
        assert_close(&format!("call {i} w"), &w_step.to_vec::<f32>().unwrap(), &w_eager.to_vec::<f32>().unwrap());
    }
    let s = step.stats();
    assert_eq!((s.traces, s.replays, s.eager_calls), (1, 20, 0), "{s:?}");
    assert_eq!(step.reports().len(), 1);
}

/// A `.grad` the step reads that moves (another view) before every call fails
/// every program's guards: past 8 programs for one argument signature the
/// step traces no more (as PyTorch past its recompile limit, run-only):
/// a call that matches a program replays it, any other runs eagerly, with
/// the right answer every call and at most 8 programs kept.
#[test]
fn state_that_changes_every_call_stops_tracing() {
    let d = device();
    let p = Tensor::zeros([2], DType::F32, &d).unwrap().requires_grad(true).unwrap();
    let p_in = p.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| {
        let g = p_in.grad().expect("a .grad is set before every call");
        Ok(vec![g.sum_all()?.add(&a[0].sum_all()?)?])
    });
    let x = Tensor::from_slice(&[1.0f32, 2.0], [2], &d).unwrap();
    // The same shape at another offset of a larger tensor each call, then
    // the first offsets again.
    for n in (1..=12usize).chain(1..=3) {
        let g = Tensor::ones([n + 2], DType::F32, &d).unwrap().mul(n as f64).unwrap().narrow(0, n, 2).unwrap();
        p.set_grad(Some(g)).unwrap();
        let got = step.call(std::slice::from_ref(&x)).unwrap()[0].to_vec::<f32>().unwrap();
        assert_eq!(got, vec![2.0 * n as f32 + 3.0], "call {n}");
        assert!(step.reports().len() <= 8, "call {n}: {} programs", step.reports().len());
    }
    let s = step.stats();
    assert_eq!((s.traces, s.replays, s.eager_calls), (8, 11, 4), "{s:?}");
}

/// Labels checked through a prefix view of an argument (the first rows of
/// a padded label buffer) are checked as eager mode checks them: only the
/// prefix. Before, a replay checked the whole argument and refused the
/// padding. A bad label inside the prefix is still an error, compiled as
/// eager.
#[test]
fn labels_checked_through_a_prefix_check_only_the_prefix() {
    let d = device();
    let logits = wgrad::nn::uniform([4, 3], 1.0, 5, &d).unwrap().detach();
    let body = |a: &[Tensor]| -> Result<Vec<Tensor>> {
        let y = a[1].narrow(0, 0, 4)?;
        Ok(vec![a[0].cross_entropy(&y, ClassLoss::default())?])
    };
    let mut step = compile_step(&d, body);
    for call in 0..3 {
        let padded = Tensor::from_slice(&[0i32, 2, 1, call % 3, -7, -7, 99, -7], [8], &d).unwrap();
        let args = [logits.clone(), padded];
        let want = body(&args).unwrap()[0].to_vec::<f32>().unwrap();
        let got = step.call(&args).unwrap()[0].to_vec::<f32>().unwrap();
        assert_close(&format!("call {call}"), &got, &want);
    }
    let bad = Tensor::from_slice(&[0i32, 5, 1, 0, -7, -7, 99, -7], [8], &d).unwrap();
    let args = [logits.clone(), bad];
    assert!(body(&args).is_err());
    let err = step.call(&args).unwrap_err();
    assert!(err.to_string().contains("cross_entropy"), "{err}");
    let s = step.stats();
    assert_eq!((s.traces, s.eager_calls), (1, 0), "{s:?}");
}

/// FGSM whose closure keeps each call's perturbed input (in a slot the
/// caller reads): a leaf the closure made and kept is guarded and set as
/// any other, so after every call the kept leaf's `.grad` is this call's,
/// as in eager mode (a review found it stale when the program held every
/// leaf made in a trace weakly).
#[test]
fn a_leaf_made_inside_the_step_and_kept_has_this_calls_grad() {
    let d = device();
    let make = |seed: u64| wgrad::nn::uniform([3, 4], 0.5, seed, &d).unwrap().detach().requires_grad(true).unwrap();
    let (w_eager, w_step) = (make(81), make(81));
    let mut eager_opt = Sgd::new(std::slice::from_ref(&w_eager), 0.1, 0.0, 0.0).unwrap();
    let mut opt = Sgd::new(std::slice::from_ref(&w_step), 0.1, 0.0, 0.0).unwrap();
    let (eager_slot, step_slot): (Kept, Kept) = (Rc::default(), Rc::default());
    let (w_in, slot_in) = (w_step.clone(), step_slot.clone());
    let mut step = compile_step(&d, move |args: &[Tensor]| fgsm(&w_in, &args[0], &mut opt, Some(&slot_in)));
    for (i, b) in [2usize, 2, 2, 3, 5, 2, 4].into_iter().enumerate() {
        let x = wgrad::nn::uniform([b, 3], 1.0, 400 + i as u64, &d).unwrap().detach();
        let want = fgsm(&w_eager, &x, &mut eager_opt, Some(&eager_slot)).unwrap();
        let got = step.call(&[x]).unwrap();
        assert_close(&format!("call {i} loss"), &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap());
        assert_close(&format!("call {i} w"), &w_step.to_vec::<f32>().unwrap(), &w_eager.to_vec::<f32>().unwrap());
        let kept = |s: &Kept| s.borrow().as_ref().unwrap().grad().unwrap().to_vec::<f32>().unwrap();
        assert_close(&format!("call {i} kept x_adv.grad"), &kept(&step_slot), &kept(&eager_slot));
    }
}

/// PGD-style: a perturbation made inside the step from host data and
/// updated in place by an optimizer made inside the step. Eager mode
/// starts every call from zeros; a replay would start from the buffer the
/// last replay updated, so the update is a graph break and every call
/// equals eager mode (a review found the replay silently off).
#[test]
fn an_in_place_update_of_a_tensor_made_from_host_data_runs_eagerly() {
    let d = device();
    let make = |seed: u64| wgrad::nn::uniform([3, 4], 0.5, seed, &d).unwrap().detach().requires_grad(true).unwrap();
    let (w_eager, w_step) = (make(81), make(81));
    let body = |w: &Tensor, x: &Tensor| -> Result<Vec<Tensor>> {
        let n = x.dims()[0] * 3;
        let delta = Tensor::from_slice(&vec![0.0f32; n], [x.dims()[0], 3], x.device())?.requires_grad(true)?;
        let mut dopt = Sgd::new(std::slice::from_ref(&delta), 0.5, 0.0, 0.0)?;
        for _ in 0..2 {
            dopt.zero_grad();
            x.add(&delta)?.matmul(w)?.tanh()?.sum_all()?.neg()?.backward()?;
            dopt.step()?;
        }
        w.zero_grad();
        let loss = x.add(&delta)?.matmul(w)?.tanh()?.sum_all()?;
        Ok(vec![loss, delta.mul(1.0)?])
    };
    let w_in = w_step.clone();
    let mut step = compile_step(&d, move |args: &[Tensor]| body(&w_in, &args[0]));
    let x = wgrad::nn::uniform([2, 3], 1.0, 400, &d).unwrap().detach();
    for i in 0..4 {
        let want = body(&w_eager, &x).unwrap();
        let got = step.call(std::slice::from_ref(&x)).unwrap();
        for (k, (g, e)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("call {i} output {k}"), &g.to_vec::<f32>().unwrap(), &e.to_vec::<f32>().unwrap());
        }
    }
    assert!(step.last_graph_break().is_some_and(|r| r.contains("host data")), "{:?}", step.last_graph_break());
    // The same made on the device (`zeros`): a graph break too, not an
    // internal error.
    let body = |w: &Tensor, x: &Tensor| -> Result<Vec<Tensor>> {
        let delta = Tensor::zeros([x.dims()[0], 3], DType::F32, x.device())?.requires_grad(true)?;
        let mut dopt = Sgd::new(std::slice::from_ref(&delta), 0.5, 0.0, 0.0)?;
        dopt.zero_grad();
        x.add(&delta)?.matmul(w)?.tanh()?.sum_all()?.neg()?.backward()?;
        dopt.step()?;
        w.zero_grad();
        Ok(vec![x.add(&delta)?.matmul(w)?.tanh()?.sum_all()?, delta.mul(1.0)?])
    };
    let w_in = w_step.clone();
    let mut step = compile_step(&d, move |args: &[Tensor]| body(&w_in, &args[0]));
    for i in 0..2 {
        let want = body(&w_eager, &x).unwrap();
        let got = step.call(std::slice::from_ref(&x)).unwrap();
        for (k, (g, e)) in got.iter().zip(&want).enumerate() {
            assert_close(
                &format!("zeros: call {i} output {k}"),
                &g.to_vec::<f32>().unwrap(),
                &e.to_vec::<f32>().unwrap(),
            );
        }
    }
    assert!(step.last_graph_break().is_some_and(|r| r.contains("made inside")), "{:?}", step.last_graph_break());
}
