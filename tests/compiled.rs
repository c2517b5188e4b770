//! The compiled backward: the guard, the signature cache, shape
//! polymorphism, fusion, execution in one submit, and semantics equal to
//! eager mode (hooks, retain_graph, grad(), accumulation, create_graph).
//!
//! The compiler is process-global, so every test here takes `LOCK` first.

mod common;

use std::sync::{Arc, Barrier, Mutex, MutexGuard};

use wgrad::{BackwardOptions, CompilerGuard, CompilerInterface, DType, Device, Error, Tensor, WgslCompiler};

static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn install(device: &Device) -> (Arc<WgslCompiler>, CompilerGuard) {
    let compiler = Arc::new(WgslCompiler::new(device));
    let guard = CompilerGuard::install_arc(compiler.clone()).expect("no compiler is installed");
    (compiler, guard)
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().expect("readback")
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}[{i}]: compiled {g} vs eager {w}");
    }
}

fn validate_wgsl(source: &str) {
    let module =
        naga::front::wgsl::parse_str(source).unwrap_or_else(|e| panic!("{}\n{source}", e.emit_to_string(source)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{e:?}\n{source}"));
}

/// W2 of WORKLOADS.md: sum(tanh(x*a + b) * sigmoid(x) + exp(-x*x)).
fn w2(x: &Tensor, a: &Tensor, b: &Tensor) -> wgrad::Result<Tensor> {
    let left = x.mul(a)?.add(b)?.tanh()?.mul(&x.sigmoid()?)?;
    left.add(&x.mul(x)?.neg()?.exp()?)?.sum_all()
}

/// W5 of WORKLOADS.md: 50 times x = sin(x) * 0.9 + x * 0.1, then sum.
fn w5(x: &Tensor) -> wgrad::Result<Tensor> {
    let mut y = x.clone();
    for _ in 0..50 {
        y = y.sin()?.mul(0.9)?.add(&y.mul(0.1)?)?;
    }
    y.sum_all()
}

/// A small MLP with a bias broadcast, a reduction and a reused intermediate.
fn mlp(x: &Tensor, w1: &Tensor, b1: &Tensor, w2: &Tensor) -> wgrad::Result<Tensor> {
    let h = x.matmul(w1)?.add(b1)?.tanh()?;
    let out = h.matmul(w2)?;
    out.square()?.mean_all()?.add(&h.sum_all()?.mul(0.01)?)
}

fn params(device: &Device, seed: u64, batch: usize) -> wgrad::Result<[Tensor; 4]> {
    Ok([
        Tensor::rand([batch, 8], seed, device)?.sub(0.5)?,
        Tensor::randn([8, 16], seed + 1, device)?.mul(0.3)?.requires_grad(true)?,
        Tensor::rand([16], seed + 2, device)?.requires_grad(true)?,
        Tensor::randn([16, 4], seed + 3, device)?.mul(0.3)?.requires_grad(true)?,
    ])
}

#[test]
fn second_install_is_an_error_and_drop_uninstalls() {
    let _l = serial();
    let device = common::device();
    assert!(matches!(CompilerGuard::active(), Err(Error::NoActiveCompiler)));
    let guard = WgslCompiler::install(&device).expect("first install");
    assert!(CompilerGuard::active().is_ok());
    let second = WgslCompiler::install(&device);
    assert!(matches!(second, Err(Error::CompilerAlreadyActive)), "second install must fail");
    let message = second.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("CompilerGuard"), "the error says what to do: {message}");
    drop(guard);
    assert!(matches!(CompilerGuard::active(), Err(Error::NoActiveCompiler)));
    let again = WgslCompiler::install(&device).expect("install after drop");
    drop(again);
}

#[test]
fn racing_installs_have_exactly_one_winner() {
    let _l = serial();
    let device = common::device();
    for _ in 0..5 {
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (barrier, device) = (barrier.clone(), device.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    WgslCompiler::install(&device)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("no panic")).collect();
        let winners = results.iter().filter(|r| r.is_ok()).count();
        let losers = results.iter().filter(|r| matches!(r, Err(Error::CompilerAlreadyActive))).count();
        assert_eq!((winners, losers), (1, 7));
        drop(results);
        assert!(CompilerGuard::active().is_err(), "dropping the winner uninstalls it");
    }
}

#[test]
fn without_a_guard_backward_is_eager() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let (compiler, guard) = install(&device);
    drop(guard);
    let [x, w1, b1, w2] = params(&device, 1, 4)?;
    mlp(&x, &w1, &b1, &w2)?.backward()?;
    assert_eq!(compiler.stats().captures, 0, "an uninstalled compiler sees nothing");
    assert!(w1.grad().is_some());
    Ok(())
}

#[test]
fn a_backward_running_when_the_guard_drops_finishes() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let [x, w1, b1, w2] = params(&device, 2, 4)?;
    mlp(&x, &w1, &b1, &w2)?.backward()?;
    let eager = vec(&w1.grad().expect("grad"));
    w1.zero_grad();
    b1.zero_grad();
    w2.zero_grad();

    let (compiler, guard) = install(&device);
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let h = x.matmul(&w1)?;
    h.register_hook(move |_| {
        let _ = entered_tx.send(());
        let _ = release_rx.lock().map(|rx| rx.recv());
        None
    })?;
    let loss =
        h.add(&b1)?.tanh()?.matmul(&w2)?.square()?.mean_all()?.add(&h.add(&b1)?.tanh()?.sum_all()?.mul(0.01)?)?;
    let worker = std::thread::spawn(move || loss.backward());
    entered_rx.recv().expect("the hook runs");
    drop(guard); // uninstall while the compiled backward is inside a hook
    release_tx.send(()).expect("worker waits");
    worker.join().expect("no panic")?;
    assert_close("w1", &vec(&w1.grad().expect("grad")), &eager);
    assert_eq!(compiler.stats().replays, 1, "the running backward finished compiled");
    assert!(CompilerGuard::active().is_err());
    Ok(())
}

#[test]
fn same_model_built_three_times_compiles_once() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let (compiler, _guard) = install(&device);
    let mut results = Vec::new();
    let mut pipelines = Vec::new();
    for _ in 0..3 {
        let [x, w1, b1, w2] = params(&device, 3, 4)?;
        mlp(&x, &w1, &b1, &w2)?.backward()?;
        results.push(vec(&w1.grad().expect("grad")));
        pipelines.push(device.counters().pipelines_created);
    }
    assert_eq!(pipelines[1], pipelines[2], "a cache hit creates no pipeline");
    let s = compiler.stats();
    assert_eq!((s.captures, s.cache_misses, s.cache_hits), (3, 1, 2), "{s:?}");
    assert_eq!(results[0], results[1]);
    assert_eq!(results[1], results[2]);

    // A different set of leaves wanting gradients is a different program.
    let [x, w1, b1, w2] = params(&device, 3, 4)?;
    let b1 = b1.detach();
    mlp(&x, &w1, &b1, &w2)?.backward()?;
    assert_eq!(compiler.stats().cache_misses, 2, "a new leaf set recompiles");
    let reason = compiler.last_miss_reason().unwrap_or_default();
    assert!(reason.contains("leaf") || reason.starts_with("new node"), "{reason}");
    Ok(())
}

#[test]
fn new_batch_sizes_trace_once_and_create_no_pipelines() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let (compiler, _guard) = install(&device);
    let mut pipelines_after_first = None;
    for batch in (10..=90).step_by(10) {
        let [x, w1, b1, w2] = params(&device, 4, batch)?;
        let loss = mlp(&x, &w1, &b1, &w2)?;
        loss.backward()?;
        w1.grad().expect("grad").to_vec::<f32>()?;
        let created = device.counters().pipelines_created;
        match pipelines_after_first {
            None => pipelines_after_first = Some(created),
            Some(first) => assert_eq!(created, first, "batch {batch} created pipelines"),
        }
    }
    let s = compiler.stats();
    assert_eq!(s.cache_misses, 9, "each new batch size is a new signature: {s:?}");
    assert_eq!(s.new_sizes, 8, "sizes after the first are the first's graph at another size: {s:?}");
    assert_eq!(s.shadow_fits, 1, "the family is fitted at the first size, from its shadows: {s:?}");
    assert_eq!(s.replans, 8, "sizes after the first are instantiated, not traced: {s:?}");
    let reason = compiler.last_miss_reason().unwrap_or_default();
    assert!(reason.starts_with("changed shape"), "{reason}");
    Ok(())
}

/// W1's backward (784-512-512-10, cross-entropy) compiled at batch sizes
/// 10 to 90 against eager mode: one trace (at 10, with its shadows at 9
/// and 8 the family is fitted there, although batch 10 equals the class
/// count), and one set of kernels. The first size is fused against the
/// graph at 11 and every later size against the first, so the coincidence
/// of batch 10 and 10 classes fuses no kernel other sizes cannot have, and
/// every size is lowered with row kernels for any number of rows (batch 10
/// is under `MIN_ROWS`). No pipeline after the first size.
#[test]
fn w1_backward_at_nine_batch_sizes_shares_its_kernels() -> wgrad::Result<()> {
    use wgrad::ClassLoss;
    use wgrad::nn::{Linear, Module};
    let _l = serial();
    // A device of its own: its pipeline count is this test's alone.
    let device = Device::new()?;
    let compiler = Arc::new(WgslCompiler::new(&device));
    let layer = |i: usize, o: usize, seed: u64| -> wgrad::Result<Linear> {
        let l = Linear::new(i, o, true, seed, &device)?;
        Ok(Linear { weight: l.weight.requires_grad(true)?, bias: l.bias.map(|b| b.requires_grad(true)).transpose()? })
    };
    let model = [layer(784, 512, 1)?, layer(512, 512, 2)?, layer(512, 10, 3)?];
    let params: Vec<Tensor> = model.iter().flat_map(|l| l.parameters()).collect();
    let loss_of = |x: &Tensor, y: &Tensor| -> wgrad::Result<Tensor> {
        let h = model[1].forward(&model[0].forward(x)?.relu()?)?.relu()?;
        model[2].forward(&h)?.cross_entropy(y, ClassLoss::default())
    };
    let mut kernels_of_first: Option<Vec<String>> = None;
    let mut pipelines_after_first = 0;
    for (i, n) in (10..=90).step_by(10).enumerate() {
        let x = wgrad::nn::uniform([n, 784], 1.0, 700 + i as u64, &device)?.detach();
        let labels: Vec<i32> = (0..n as i32).map(|j| (j * 7 + i as i32) % 10).collect();
        let y = Tensor::from_slice(&labels, [n], &device)?;
        params.iter().for_each(Tensor::zero_grad);
        loss_of(&x, &y)?.backward()?;
        let eager: Vec<Vec<f32>> = params.iter().map(|p| vec(&p.grad().expect("grad"))).collect();
        params.iter().for_each(Tensor::zero_grad);
        let guard = CompilerGuard::install_arc(compiler.clone())?;
        loss_of(&x, &y)?.backward()?;
        drop(guard);
        for (k, (p, want)) in params.iter().zip(&eager).enumerate() {
            assert_close(&format!("batch {n} parameter {k}"), &vec(&p.grad().expect("grad")), want);
        }
        let sizes = compiler.programs();
        let program = sizes.iter().find(|p| p.report().ir_before.contains(&format!("[{n}, 784]")));
        let kernels = program.map(|p| p.report().kernels.clone()).unwrap_or_default();
        if i == 0 {
            kernels_of_first = Some(kernels);
        } else {
            let then = kernels_of_first.clone().unwrap_or_default();
            let differing: Vec<usize> =
                (0..kernels.len().max(then.len())).filter(|&k| kernels.get(k) != then.get(k)).collect();
            assert!(
                differing.is_empty() && !kernels.is_empty(),
                "batch {n}: kernels {differing:?} of {} differ from batch 10's ({} kernels)",
                kernels.len(),
                then.len()
            );
        }
        if i == 0 {
            pipelines_after_first = compiler.stats().pipelines_created;
        }
    }
    assert_eq!(
        compiler.stats().pipelines_created,
        pipelines_after_first,
        "the compiled backward at batch sizes 20..90 creates no pipeline"
    );
    let s = compiler.stats();
    assert_eq!(
        (s.cache_misses, s.new_sizes, s.replans, s.shadow_fits, s.fallbacks),
        (9, 8, 8, 1, 0),
        "one trace: {s:?}"
    );
    Ok(())
}

/// A batch family's fit is a guard, not a guess: a size whose signature
/// the fit of three traced sizes does not predict (a scalar `min(B, 5)`
/// that was affine on 2, 3, 4) traces, and a family with a number that is
/// no form of the batch size (a reshape to `B * B`) traces every size, and
/// a batch of 1 traces and is not fitted. Every result equals the closed
/// form.
#[test]
fn batch_families_replan_only_the_sizes_their_fit_predicts() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let (compiler, _guard) = install(&device);
    // d/dx sum(x * s) = s, with s = min(B, 5) at batch B.
    let mut traces = Vec::new();
    for b in [2usize, 3, 4, 7, 6, 5, 9] {
        let x = Tensor::from_slice(&(0..b * 3).map(|i| i as f32).collect::<Vec<_>>(), [b, 3], &device)?
            .requires_grad(true)?;
        let s = b.min(5) as f64;
        x.mul(s)?.tanh()?.sum_all()?.backward()?;
        let want: Vec<f32> = (0..b * 3).map(|i| (s * (1.0 - ((i as f64 * s).tanh()).powi(2))) as f32).collect();
        assert_close(&format!("min(B, 5) at batch {b}"), &vec(&x.grad().expect("grad")), &want);
        let st = compiler.stats();
        traces.push(st.cache_misses - st.replans);
    }
    // 2, 3, 4 traced (fitted: s = B); 7, 6 and 5 have s = 5, not predicted: traced; 5 is
    // the fit's own prediction (s = 5 at B = 5) and 9 is not.
    assert_eq!(traces, vec![1, 2, 3, 4, 5, 5, 6], "{:?}", compiler.stats());

    // A reshape to B * B: not affine in B, every size traces.
    let before = compiler.stats();
    for b in 2..7usize {
        let x = Tensor::from_slice(&(0..b * b).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), [b, b], &device)?
            .requires_grad(true)?;
        x.reshape([b * b])?.square()?.sum_all()?.backward()?;
        let want: Vec<f32> = (0..b * b).map(|i| 2.0 * (i as f32 * 0.1)).collect();
        assert_close(&format!("B * B at batch {b}"), &vec(&x.grad().expect("grad")), &want);
    }
    let after = compiler.stats();
    assert_eq!((after.cache_misses - before.cache_misses, after.replans - before.replans), (5, 0), "{after:?}");

    // A batch of 1 is traced and left out of the fit: 1, 4, 6 and 8 trace
    // (the fit is of 4, 6 and 8), 5 and 1 again do not.
    let mut traces = Vec::new();
    let before = compiler.stats();
    for b in [1usize, 4, 6, 8, 5, 1] {
        let x = Tensor::from_slice(&(0..b * 2).map(|i| i as f32 * 0.3).collect::<Vec<_>>(), [b, 2], &device)?
            .requires_grad(true)?;
        x.tanh()?.mean(&[0], false)?.sum_all()?.backward()?;
        let want: Vec<f32> = (0..b * 2).map(|i| ((1.0 - (i as f64 * 0.3).tanh().powi(2)) / b as f64) as f32).collect();
        assert_close(&format!("mean over batch {b}"), &vec(&x.grad().expect("grad")), &want);
        let st = compiler.stats();
        traces.push((st.cache_misses - st.replans) - (before.cache_misses - before.replans));
    }
    assert_eq!(traces, vec![1, 2, 3, 4, 4, 4], "{:?}", compiler.stats());
    Ok(())
}

/// A shadow is a guess of which numbers follow the batch size: a model
/// dim equal to the first batch size (the first 8 rows of a batch of 8)
/// is taken for it, and the shadows at 7 and 6 fit a narrow to all rows.
/// The next size's signature shows rows 8, not 12: the guess is taken
/// back, that size and the one after are traced, the family is fitted
/// from the three traced sizes, and every size equals eager mode.
#[test]
fn a_wrong_guess_from_shadows_is_taken_back_at_the_next_size() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let compiler = Arc::new(WgslCompiler::new(&device));
    let w = Tensor::randn([5, 3], 61, &device)?.requires_grad(true)?;
    let loss_of = |x: &Tensor| -> wgrad::Result<Tensor> { x.matmul(&w)?.narrow(0, 0, 8)?.tanh()?.sum_all() };
    let mut stats = Vec::new();
    for (i, b) in [8usize, 12, 16, 20, 24].into_iter().enumerate() {
        let x = wgrad::nn::uniform([b, 5], 1.0, 600 + i as u64, &device)?.detach();
        w.zero_grad();
        loss_of(&x)?.backward()?;
        let eager = vec(&w.grad().expect("grad"));
        w.zero_grad();
        let guard = CompilerGuard::install_arc(compiler.clone())?;
        loss_of(&x)?.backward()?;
        drop(guard);
        assert_close(&format!("batch {b}"), &vec(&w.grad().expect("grad")), &eager);
        let s = compiler.stats();
        stats.push((s.cache_misses - s.replans, s.replans, s.shadow_fits));
    }
    // (traces, replans, shadow fits) after each size.
    assert_eq!(stats, vec![(1, 0, 1), (2, 0, 1), (3, 0, 1), (3, 1, 1), (3, 2, 1)], "{:?}", compiler.stats());
    Ok(())
}

/// Two graphs whose signatures differ only in a number (a hook on an
/// intermediate or not: the hook count) are two batch families under one
/// key: each is fitted at its first size, and neither takes back the
/// other's fit. Alternating them over six sizes traces each once.
#[test]
fn graphs_that_differ_in_a_hook_count_keep_their_own_families() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let compiler = Arc::new(WgslCompiler::new(&device));
    let w = Tensor::randn([6, 5], 91, &device)?.mul(0.4)?.detach().requires_grad(true)?;
    let c = Tensor::randn([5], 92, &device)?.detach().requires_grad(true)?;
    for (i, b) in [4usize, 12, 40, 5, 9, 20].into_iter().enumerate() {
        let x = wgrad::nn::uniform([b, 6], 1.0, 950 + i as u64, &device)?.detach();
        for hooked in [false, true] {
            let grads = |compiled: bool| -> wgrad::Result<Vec<Vec<f32>>> {
                let guard = if compiled { Some(CompilerGuard::install_arc(compiler.clone())?) } else { None };
                let h = x.matmul(&w)?.add(&c)?;
                if hooked {
                    h.register_hook(|g| Some(g.mul(2.0).expect("scale")))?;
                }
                let loss = h.tanh()?.mean_all()?;
                let g = wgrad::grad(&[&loss], &[&w, &c], None, wgrad::BackwardOptions::default())?;
                drop(guard);
                g.iter().map(|t| vec(t.as_ref().expect("grad"))).map(Ok).collect()
            };
            let (eager, compiled) = (grads(false)?, grads(true)?);
            for (k, (got, want)) in compiled.iter().zip(&eager).enumerate() {
                assert_close(&format!("batch {b} hooked {hooked} gradient {k}"), got, want);
            }
        }
    }
    let s = compiler.stats();
    assert_eq!((s.cache_misses - s.replans, s.replans, s.shadow_fits), (2, 10, 2), "{s:?}");
    Ok(())
}

/// A first size where the data and a parameter have the same shape (x
/// [8, 8] @ w [8, 8], both wanting gradients): which leaf follows the
/// batch is found by walking the shadow with each flipped (a guess that
/// resizes both fails in the matmul's formula). One trace, and every size
/// equals eager mode for both gradients.
#[test]
fn a_square_first_size_finds_which_leaf_is_data() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let compiler = Arc::new(WgslCompiler::new(&device));
    let w = Tensor::randn([8, 8], 81, &device)?.mul(0.3)?.detach().requires_grad(true)?;
    for (i, b) in [8usize, 12, 30, 5, 64].into_iter().enumerate() {
        let x = wgrad::nn::uniform([b, 8], 1.0, 900 + i as u64, &device)?.detach().requires_grad(true)?;
        let grads = |compiled: bool| -> wgrad::Result<Vec<Vec<f32>>> {
            let guard = if compiled { Some(CompilerGuard::install_arc(compiler.clone())?) } else { None };
            let loss = x.matmul(&w)?.tanh()?.sum_all()?;
            let g = wgrad::grad(&[&loss], &[&x, &w], None, wgrad::BackwardOptions::default())?;
            drop(guard);
            g.iter().map(|t| vec(t.as_ref().expect("grad"))).map(Ok).collect()
        };
        let (eager, compiled) = (grads(false)?, grads(true)?);
        for (k, (c, e)) in compiled.iter().zip(&eager).enumerate() {
            assert_close(&format!("batch {b} gradient {k}"), c, e);
        }
    }
    let s = compiler.stats();
    assert_eq!((s.cache_misses - s.replans, s.replans, s.shadow_fits), (1, 4, 1), "{s:?}");
    Ok(())
}

/// Shadows whose ops would contradict their shapes are not made: the tail
/// of a flattened batch (`x.flatten()[-3::2]`, at first size 4) or of a
/// batch concatenated to itself starts at a number that follows the batch
/// but is not a multiple of it, so at smaller sizes the slice would start
/// past the end of its resized input (a formula then underflowed, in a
/// debug build a panic). Such a graph is fitted from traced sizes, and
/// every size equals eager mode.
#[test]
fn shadows_that_contradict_their_shapes_are_not_made() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let w = Tensor::randn([5, 3], 71, &device)?.requires_grad(true)?;
    let flatten_tail = |x: &Tensor, b: usize| -> wgrad::Result<Tensor> {
        x.matmul(&w)?.tanh()?.reshape([b * 3])?.slice_step(0, Some(-3), None, 2)?.sum_all()
    };
    let doubled_tail = |x: &Tensor, b: usize| -> wgrad::Result<Tensor> {
        let h = x.matmul(&w)?.tanh()?.sigmoid()?;
        let c = wgrad::cat(&[&h, &h], 0)?;
        c.slice_step(0, Some(2 * b as isize - 3), None, 2)?.square()?.sum_all()
    };
    type Loss<'a> = &'a dyn Fn(&Tensor, usize) -> wgrad::Result<Tensor>;
    let cases: [(&str, Loss, &[usize]); 2] =
        [("flatten tail", &flatten_tail, &[4, 9, 12, 20, 5]), ("doubled tail", &doubled_tail, &[8, 9, 12, 20, 5, 4])];
    for (name, loss_of, sizes) in cases {
        let compiler = Arc::new(WgslCompiler::new(&device));
        for (i, &b) in sizes.iter().enumerate() {
            let x = wgrad::nn::uniform([b, 5], 1.0, 800 + i as u64, &device)?.detach();
            w.zero_grad();
            loss_of(&x, b)?.backward()?;
            let eager = vec(&w.grad().expect("grad"));
            w.zero_grad();
            let guard = CompilerGuard::install_arc(compiler.clone())?;
            loss_of(&x, b)?.backward()?;
            drop(guard);
            assert_close(&format!("{name} at batch {b}"), &vec(&w.grad().expect("grad")), &eager);
        }
        assert_eq!(compiler.stats().fallbacks, 0, "{name}: {:?}", compiler.stats());
    }
    Ok(())
}

/// Issue 16's differential test for the compiled backward: random small
/// programs (width, activations, centering over the batch, layer_norm, a hook,
/// class or regression loss with mean or sum reduction) at random batch
/// sizes, a repeated size, a last partial batch and a batch of 1, eagerly
/// and compiled on the same inputs: every gradient equal, whether the size
/// was traced, replanned from the program's batch family or replayed; the
/// first size and the batch of 1 traced per program, hooks or not.
#[test]
fn random_programs_at_random_batch_sizes_backward_matches_eager() -> wgrad::Result<()> {
    use wgrad::nn::{Linear, Module};
    use wgrad::{ClassLoss, Reduction};
    let _l = serial();
    let device = common::device();
    let mut rng = common::Rng::new(0x2545_f491_4f6c_dd1du64);
    let mut next = |n: u64| rng.below(n);
    for program in 0..8u64 {
        let width = 3 + next(10) as usize;
        let acts: Vec<u64> = (0..1 + next(3)).map(|_| next(4)).collect();
        let (center, norm, classes, mean) = (next(2) == 0, next(2) == 0, next(2) == 0, next(3) != 0);
        let hooked = next(2) == 0;
        let mut sizes: Vec<usize> = (0..6).map(|_| 2 + next(30) as usize).collect();
        sizes.extend([sizes[1], 1 + next(5) as usize, 1]);
        let req = |t: Tensor| t.requires_grad(true);
        let l1 = Linear::new(5, width, true, 900 + program, &device)?;
        let l2 = Linear::new(width, 3, true, 950 + program, &device)?;
        let (l1, l2) = (
            Linear { weight: req(l1.weight)?, bias: l1.bias.map(req).transpose()? },
            Linear { weight: req(l2.weight)?, bias: l2.bias.map(req).transpose()? },
        );
        let params: Vec<Tensor> = l1.parameters().into_iter().chain(l2.parameters()).collect();
        let loss_of = |x: &Tensor, y: &Tensor| -> wgrad::Result<Tensor> {
            let mut h = l1.forward(x)?;
            for a in &acts {
                h = match a {
                    0 => h.relu()?,
                    1 => h.tanh()?,
                    2 => h.sigmoid()?,
                    _ => h.gelu()?,
                };
            }
            if center {
                // A batch statistic: its backward carries 1 / B.
                h = h.sub(&h.mean(&[0], true)?)?;
            }
            if norm {
                h = h.layer_norm(&[width], None, None, 1e-5)?;
            }
            if hooked {
                // A hook on an intermediate of the batch's size, run at
                // replay between kernels: it reads its gradient and
                // replaces it.
                h.register_hook(|g| {
                    let rows = g.dims()[0] as f64;
                    assert_eq!(g.to_vec::<f32>().expect("readback").len(), g.numel(), "hook sees its whole gradient");
                    Some(g.mul(0.5 + 1.0 / rows).expect("scale"))
                })?;
            }
            let out = l2.forward(&h)?;
            let reduction = if mean { Reduction::Mean } else { Reduction::Sum };
            match classes {
                true => out.cross_entropy(y, ClassLoss { reduction, ..ClassLoss::default() }),
                false => out.mse_loss(y, reduction),
            }
        };
        let compiler = Arc::new(WgslCompiler::new(&device));
        for (i, &b) in sizes.iter().enumerate() {
            let seed = program * 100 + i as u64;
            let x = wgrad::nn::uniform([b, 5], 1.0, seed, &device)?.detach();
            let y = match classes {
                true => Tensor::from_slice(
                    &(0..b as i32).map(|j| (j * 5 + i as i32) % 3).collect::<Vec<_>>(),
                    [b],
                    &device,
                )?,
                false => wgrad::nn::uniform([b, 3], 1.0, seed + 50, &device)?.detach(),
            };
            params.iter().for_each(Tensor::zero_grad);
            loss_of(&x, &y)?.backward()?;
            let eager: Vec<Vec<f32>> = params.iter().map(|p| vec(&p.grad().expect("grad"))).collect();
            params.iter().for_each(Tensor::zero_grad);
            let guard = CompilerGuard::install_arc(compiler.clone())?;
            loss_of(&x, &y)?.backward()?;
            drop(guard);
            for (k, (p, want)) in params.iter().zip(&eager).enumerate() {
                let what = format!(
                    "program {program} (acts {acts:?}, center {center}, norm {norm}, hooked {hooked}, classes {classes}, mean {mean}) batch {b} parameter {k}"
                );
                assert_close(&what, &vec(&p.grad().expect("grad")), want);
            }
        }
        let s = compiler.stats();
        assert_eq!(s.fallbacks, 0, "program {program}: {s:?}");
        // The first size (its family fitted there from its shadows, which
        // take a size of 4 or more) and the batch of 1 (a size range of its
        // own); from a smaller first size, three sizes to fit and the 1.
        let traces = if sizes[0] >= 4 { 2 } else { 4 };
        assert_eq!(s.cache_misses - s.replans, traces, "program {program} at {sizes:?}: traces: {s:?}");
    }
    Ok(())
}

type Grads = Vec<Vec<f32>>;

/// Runs `f` eagerly and compiled on identical fresh inputs; returns both
/// sets of gradients.
fn eager_and_compiled(
    f: impl Fn(&Device) -> wgrad::Result<Grads>,
) -> wgrad::Result<(Grads, Grads, wgrad::CompilerStats)> {
    let device = common::device();
    let eager = f(&device)?;
    let (compiler, guard) = install(&device);
    let compiled = f(&device)?;
    drop(guard);
    Ok((eager, compiled, compiler.stats()))
}

#[test]
fn accumulation_without_zeroing_matches_eager() -> wgrad::Result<()> {
    let _l = serial();
    let (eager, compiled, stats) = eager_and_compiled(|device| {
        let [x, w1, b1, w2] = params(device, 5, 6)?;
        let mut out = Vec::new();
        for _ in 0..3 {
            mlp(&x, &w1, &b1, &w2)?.backward()?;
            out.push(vec(&w1.grad().expect("grad")));
            out.push(vec(&b1.grad().expect("grad")));
        }
        Ok(out)
    })?;
    for (i, (c, e)) in compiled.iter().zip(&eager).enumerate() {
        assert_close(&format!("accumulated grad {i}"), c, e);
    }
    // The first call has no .grad, the later ones accumulate: two programs.
    assert_eq!((stats.cache_misses, stats.cache_hits), (2, 1), "{stats:?}");
    Ok(())
}

#[test]
fn retain_graph_and_grad_with_inputs_match_eager() -> wgrad::Result<()> {
    let _l = serial();
    let (eager, compiled, stats) = eager_and_compiled(|device| {
        let [x, w1, b1, w2] = params(device, 6, 5)?;
        let loss = mlp(&x, &w1, &b1, &w2)?;
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        let seed = Tensor::full([], 2.0, DType::F32, device)?;
        loss.backward_with(&seed, retain)?;
        let mut out = vec![vec(&w2.grad().expect("grad"))];
        for p in [&w1, &b1, &w2] {
            p.zero_grad();
        }
        loss.backward_with(&seed, retain)?; // same signature: replays
        out.push(vec(&w2.grad().expect("grad")));
        loss.backward()?; // the last one releases the graph
        out.push(vec(&w2.grad().expect("grad")));
        let again = loss.backward();
        assert!(matches!(again, Err(Error::GraphReleased { .. })), "{again:?}");

        // grad() with chosen inputs returns gradients and leaves .grad alone.
        let before = vec(&w1.grad().expect("grad"));
        let loss = mlp(&x, &w1, &b1, &w2)?;
        let grads = wgrad::grad(&[&loss], &[&b1, &w1], None, BackwardOptions::default())?;
        assert_eq!(vec(&w1.grad().expect("grad")), before, "grad() must not touch .grad");
        out.push(vec(grads[0].as_ref().expect("b1 grad")));
        out.push(vec(grads[1].as_ref().expect("w1 grad")));
        Ok(out)
    })?;
    for (i, (c, e)) in compiled.iter().zip(&eager).enumerate() {
        assert_close(&format!("result {i}"), c, e);
    }
    assert!(stats.cache_hits >= 1, "the retained graph replays: {stats:?}");
    Ok(())
}

#[test]
fn higher_order_gradients_fall_back_to_eager_with_equal_results() -> wgrad::Result<()> {
    let _l = serial();
    let (eager, compiled, stats) = eager_and_compiled(|device| {
        let x = Tensor::from_slice(&[0.3f32, -0.7, 1.1], [3], device)?.requires_grad(true)?;
        let y = x.tanh()?.mul(&x)?.sum_all()?;
        let opts = BackwardOptions { create_graph: true, ..Default::default() };
        let dx = wgrad::grad(&[&y], &[&x], None, opts)?[0].clone().expect("dx");
        let ddx = wgrad::grad(&[&dx.sum_all()?], &[&x], None, BackwardOptions::default())?[0].clone().expect("ddx");
        Ok(vec![vec(&dx), vec(&ddx)])
    })?;
    for (i, (c, e)) in compiled.iter().zip(&eager).enumerate() {
        assert_close(&format!("order {}", i + 1), c, e);
    }
    assert_eq!(stats.fallbacks, 1, "create_graph runs eagerly: {stats:?}");
    assert_eq!(stats.replays, 1, "the second-order grad() (no create_graph) is compiled");
    Ok(())
}

#[test]
fn hooks_run_on_every_backward_in_eager_order() -> wgrad::Result<()> {
    let _l = serial();
    let run = |device: &Device| -> wgrad::Result<(Vec<Vec<f32>>, Vec<String>)> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let x = Tensor::rand([6], 7, device)?.requires_grad(true)?;
        let w = Tensor::rand([6], 8, device)?.requires_grad(true)?;
        let l = log.clone();
        x.register_hook(move |g| {
            l.lock().expect("log").push(format!("x {:?}", g.to_vec::<f32>().expect("readback")));
            None
        })?;
        let mut out = Vec::new();
        for step in 0..3 {
            let h = x.mul(&w)?.sin()?;
            let l = log.clone();
            h.register_hook(move |g| {
                l.lock().expect("log").push(format!("h {:?}", g.to_vec::<f32>().expect("readback")));
                Some(g.mul(2.0).expect("double"))
            })?;
            let loss = h.mul(&x)?.sum_all()?.add(&h.exp()?.sum_all()?)?;
            loss.backward()?;
            out.push(vec(&x.grad().expect("x grad")));
            out.push(vec(&w.grad().expect("w grad")));
            log.lock().expect("log").push(format!("step {step} done"));
        }
        let log = log.lock().expect("log").clone();
        Ok((out, log))
    };
    let device = common::device();
    let (eager, eager_log) = run(&device)?;
    let (compiler, guard) = install(&device);
    let (compiled, compiled_log) = run(&device)?;
    drop(guard);
    for (i, (c, e)) in compiled.iter().zip(&eager).enumerate() {
        assert_close(&format!("grad {i}"), c, e);
    }
    assert_eq!(compiled_log.len(), eager_log.len(), "{compiled_log:?}");
    for (c, e) in compiled_log.iter().zip(&eager_log) {
        assert_eq!(c.split(' ').next(), e.split(' ').next(), "hook order: {compiled_log:?} vs {eager_log:?}");
    }
    let s = compiler.stats();
    assert_eq!((s.cache_misses, s.cache_hits), (2, 1), "{s:?}");
    Ok(())
}

#[test]
fn a_failing_compiled_backward_leaves_grads_untouched() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let (_compiler, _guard) = install(&device);
    let x = Tensor::rand([4], 9, &device)?.requires_grad(true)?;
    x.sin()?.sum_all()?.backward()?;
    let before = vec(&x.grad().expect("grad"));
    let h = x.sin()?;
    let d = device.clone();
    h.register_hook(move |_| Some(Tensor::zeros([5], DType::F32, &d).expect("zeros")))?;
    let result = h.sum_all()?.backward();
    assert!(matches!(result, Err(Error::GradientMismatch { op: "hook", .. })), "{result:?}");
    assert_eq!(vec(&x.grad().expect("grad")), before);
    Ok(())
}

#[test]
fn w2_backward_fuses_into_at_most_three_kernels() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let n = 4096;
    let inputs = |device: &Device| -> wgrad::Result<[Tensor; 3]> {
        Ok([
            Tensor::rand([n], 10, device)?.mul(2.0)?.sub(1.0)?.requires_grad(true)?,
            Tensor::rand([n], 11, device)?.mul(2.0)?.sub(1.0)?.requires_grad(true)?,
            Tensor::rand([n], 12, device)?.mul(2.0)?.sub(1.0)?.requires_grad(true)?,
        ])
    };
    let [x, a, b] = inputs(&device)?;
    let loss = w2(&x, &a, &b)?;
    device.synchronize()?;
    loss.backward()?;
    let eager: Vec<Vec<f32>> = [&x, &a, &b].iter().map(|t| vec(&t.grad().expect("grad"))).collect();

    let (compiler, _guard) = install(&device);
    let [x, a, b] = inputs(&device)?;
    let loss = w2(&x, &a, &b)?;
    device.synchronize()?;
    let before = device.counters();
    loss.backward()?;
    device.synchronize()?;
    let after = device.counters();
    // One dispatch is the eager fill of the seed (ones) that backward() makes.
    let compiled_kernels = after.dispatches - before.dispatches - 1;
    assert_eq!(after.submits - before.submits, 1, "a compiled backward is one submit");
    for (t, e) in [&x, &a, &b].iter().zip(&eager) {
        assert_close("w2 grad", &vec(&t.grad().expect("grad")), e);
    }
    assert!(compiled_kernels <= 3, "compiled W2 backward used {compiled_kernels} kernels");
    // (Eager elementwise ops of one shape are merged into one dispatch as
    // well, see exec::merge, so eager W2 is no longer 22 kernels either.)
    let stats = compiler.stats();
    assert_eq!(stats.kernels_last_replay, compiled_kernels);
    assert!(stats.ops_fused >= 15, "{stats:?}");
    for program in compiler.programs() {
        assert!(program.report().dot.contains("subgraph cluster_0"), "DOT has kernel clusters");
        for source in &program.report().kernels {
            validate_wgsl(source);
        }
    }
    Ok(())
}

#[test]
fn w5_chain_fuses_and_replays_reuse_bind_groups() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let x = Tensor::rand([16], 13, &device)?.requires_grad(true)?;
    let loss = w5(&x)?;
    device.synchronize()?;
    let before = device.counters().dispatches;
    loss.backward()?;
    let eager_kernels = device.counters().dispatches - before - 1;
    let eager = vec(&x.grad().expect("grad"));

    let (compiler, _guard) = install(&device);
    let loss = w5(&x)?;
    let retain = BackwardOptions { retain_graph: true, ..Default::default() };
    let seed = Tensor::ones([], DType::F32, &device)?;
    let mut grads = Vec::new();
    for _ in 0..3 {
        x.zero_grad();
        loss.backward_with(&seed, retain)?;
        grads.push(x.grad().expect("grad"));
    }
    assert_close("w5", &vec(&grads[2]), &eager);
    let s = compiler.stats();
    // The 50 saved activations are 50 tensors to read, but they share one
    // arena, so the chain fits one kernel's bindings even under WebGPU's 8.
    assert!(s.kernels_last_replay <= 2 && eager_kernels >= 1, "{s:?}, eager {eager_kernels} kernels");
    let program = compiler.programs().pop().expect("one program");
    // Outputs are fresh each replay (the caller keeps each .grad), but they
    // are sub-allocated in the arena the program already binds, so no bind
    // group changes; the words carrying their offsets may.
    let first = program.bind_groups_created();
    x.zero_grad();
    loss.backward_with(&seed, retain)?;
    let per_replay = program.bind_groups_created() - first;
    eprintln!("kernels {} first {first} per replay {per_replay}", program.kernel_count());
    // Without arenas (a buffer per tensor) the kernel writing the fresh
    // output needs a new bind group; with them it does not.
    let expected = if device.limits().arenas { 0 } else { 1 };
    assert_eq!(per_replay, expected, "bind groups per replay (arenas: {})", device.limits().arenas);
    for source in &program.report().kernels {
        validate_wgsl(source);
    }
    Ok(())
}

#[test]
fn intermediates_share_buffers_by_liveness() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let (compiler, _guard) = install(&device);
    let x = Tensor::rand([32, 32], 14, &device)?;
    let ws: Vec<Tensor> = (0..4)
        .map(|i| Tensor::randn([32, 32], 20 + i, &device).and_then(|w| w.mul(0.2)?.requires_grad(true)))
        .collect::<wgrad::Result<_>>()?;
    let mut h = x.clone();
    for w in &ws {
        h = h.matmul(w)?.tanh()?;
    }
    h.sum_all()?.backward()?;
    let program = compiler.programs().pop().expect("one program");
    let report = program.report();
    assert!(
        report.planned_bytes < report.unplanned_bytes,
        "planned {} B vs {} B unshared",
        report.planned_bytes,
        report.unplanned_bytes
    );
    Ok(())
}

#[test]
fn passes_simplify_merge_and_fuse_prologues_and_epilogues() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let (compiler, _guard) = install(&device);

    // `* 1` and `+ 0` pass their gradient through as `g * 1` and `g`; the
    // transposes compose into the identity; `x * x` binds x once, so its
    // two gradient terms are one expression.
    let x = Tensor::rand([4, 3], 30, &device)?.requires_grad(true)?;
    let y = x.t()?.t()?.mul(1.0)?.add(0.0)?;
    y.mul(&y)?.exp()?.sum_all()?.backward()?;
    let program = compiler.programs().pop().expect("a program");
    let r = program.report();
    assert!(r.simplified >= 1 && r.merged >= 1 && r.removed >= 1, "{r:?}");
    assert_eq!(program.kernel_count(), 1);
    compiler.clear_cache();

    // The gradient of a broadcast operand is a sum whose elementwise
    // prologue (g * x) is computed inside the reduction.
    let x = Tensor::rand([64, 8], 31, &device)?;
    let b = Tensor::rand([8], 32, &device)?.requires_grad(true)?;
    x.mul(&b)?.sum_all()?.backward()?;
    let program = compiler.programs().pop().expect("a program");
    assert_eq!(program.kernel_count(), 1, "one reduction with a fused prologue");
    let source = &program.report().kernels[0];
    // (Four columns per invocation: the column form's `fold4`.)
    assert!((source.contains("fn value") || source.contains("fn fold4")) && source.contains(" * "), "{source}");
    compiler.clear_cache();

    // relu's mask multiplies a matmul result: the matmul stores acc * mask.
    // (Weighted, so the gradient is not a broadcast: a matmul with a
    // broadcast operand becomes a reduction.)
    let [x, w1, b1, w2] = params(&device, 33, 8)?;
    let weights = Tensor::rand([8, 4], 34, &device)?;
    x.matmul(&w1)?.add(&b1)?.relu()?.matmul(&w2)?.mul(&weights)?.sum_all()?.backward()?;
    let program = compiler.programs().pop().expect("a program");
    // The epilogue reads the mask from a binding.
    let reads_a_binding = |k: &str| k.split("fn epilogue").nth(1).is_some_and(|e| e.contains("= b"));
    let fused_epilogue = program.report().kernels.iter().any(|k| reads_a_binding(k));
    assert!(fused_epilogue, "a matmul has a fused epilogue:\n{}", program.report().ir_after);
    for source in &program.report().kernels {
        validate_wgsl(source);
    }
    Ok(())
}

#[test]
fn compiled_training_reaches_a_memory_steady_state() -> wgrad::Result<()> {
    let _l = serial();
    let device = Device::new()?; // its own device, so other tests' buffers do not count
    let (compiler, _guard) = install(&device);
    let [x, mut w1, mut b1, mut w2] = params(&device, 40, 16)?;
    let mut created = Vec::new();
    let mut live = Vec::new();
    for _ in 0..12 {
        let loss = mlp(&x, &w1, &b1, &w2)?;
        loss.backward()?;
        let _no_grad = wgrad::no_grad();
        let update = |p: &Tensor| p.sub(&p.grad().expect("grad").mul(0.1)?)?.requires_grad(true);
        (w1, b1, w2) = (update(&w1)?, update(&b1)?, update(&w2)?);
        loss.to_scalar::<f32>()?;
        created.push(device.memory_stats().buffers_created);
        live.push(device.memory_stats().live_bytes);
    }
    assert_eq!(compiler.stats().cache_misses, 1, "every step replays one program");
    assert!(created[3..].iter().all(|&c| c == created[3]), "no new buffers after warm-up: {created:?}");
    assert!(live[3..].iter().all(|&l| l == live[3]), "live bytes steady: {live:?}");
    Ok(())
}

#[test]
fn wide_graphs_split_to_respect_the_binding_limit() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let consts: Vec<Tensor> = (0..40).map(|i| Tensor::rand([8], 50 + i, &device)).collect::<wgrad::Result<_>>()?;
    let run = || -> wgrad::Result<Vec<f32>> {
        let x = Tensor::rand([8], 49, &device)?.requires_grad(true)?;
        let mut loss = x.mul(&consts[0])?.sum_all()?;
        for c in &consts[1..] {
            loss = loss.add(&x.mul(c)?.sin()?.sum_all()?)?;
        }
        loss.backward()?;
        Ok(vec(&x.grad().expect("grad")))
    };
    let eager = run()?;
    let (compiler, guard) = install(&device);
    let compiled = run()?;
    drop(guard);
    assert_close("wide", &compiled, &eager);
    let program = compiler.programs().pop().expect("a program");
    for source in &program.report().kernels {
        let bindings = source.matches("var<storage").count();
        assert!(bindings <= 32, "a kernel binds {bindings} storage buffers");
        validate_wgsl(source);
    }
    Ok(())
}

type Nested = Arc<Mutex<Option<wgrad::Result<Vec<f32>>>>>;

/// x -> sum(exp(sin(x))) with one hook on x; with `nested`, the hook runs
/// the same model again (same signature) and stores its gradient there.
fn hooked_model(device: &Device, nested: Option<Nested>) -> wgrad::Result<(Tensor, Tensor)> {
    let x = Tensor::rand([5], 60, device)?.requires_grad(true)?;
    let d = device.clone();
    x.register_hook(move |_| {
        if let Some(slot) = &nested {
            let inner = hooked_model(&d, None).and_then(|(x2, loss2)| {
                loss2.backward()?;
                Ok(vec(&x2.grad().expect("grad")))
            });
            *slot.lock().expect("slot") = Some(inner);
        }
        None
    })?;
    let loss = x.sin()?.exp()?.sum_all()?;
    Ok((x, loss))
}

#[test]
fn a_hook_may_run_a_backward_that_needs_the_running_program() -> wgrad::Result<()> {
    let _l = serial();
    let device = common::device();
    let (x, loss) = hooked_model(&device, None)?;
    loss.backward()?;
    let expected = vec(&x.grad().expect("grad"));

    let (compiler, _guard) = install(&device);
    let slot: Nested = Arc::new(Mutex::new(None));
    let (x, loss) = hooked_model(&device, Some(slot.clone()))?;
    loss.backward()?;
    assert_close("outer", &vec(&x.grad().expect("grad")), &expected);
    let nested = slot.lock().expect("slot").take().expect("the hook ran")?;
    assert_close("nested", &nested, &expected);
    let s = compiler.stats();
    assert_eq!((s.replays, s.fallbacks), (1, 1), "the nested backward ran eagerly: {s:?}");
    Ok(())
}
