//! Issue 16's batch polymorphism for every workload: the forms of W1-W5,
//! W8 and the digits CNN with their data's leading dim as the batch (W2,
//! W5 and W8 element-wise over it, W3's left operand's rows, W4's rows),
//! run at random batch sizes with a repeated size, a last partial batch and
//! a batch of 1, three ways on the same tensors: eagerly, under the
//! compiled backward and as a compiled step. The loss and every gradient
//! (of parameters and of data) agree at every size, and neither compiler
//! traces every size: each traces the first size and the batch of 1 (the
//! compiled backward fits its batch family at the first size from the
//! graph's shadows at two smaller sizes, the compiled step from its
//! closure traced at two smaller sizes).

#[path = "../examples/digits/cnn.rs"]
mod cnn;
mod common;

use std::sync::{Arc, Mutex, MutexGuard};

use common::device;
use wgrad::nn::Module;
use wgrad::{BackwardOptions, ClassLoss, CompilerGuard, CompilerInterface, Device, Tensor, WgslCompiler, compile_step};

/// The compiler is process-global: a test that installs one holds this,
/// so that another test's eager reference is not compiled by it.
static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A workload's loss of its data (`args`) and parameters.
type LossFn = Arc<dyn Fn(&[Tensor], &[Tensor]) -> wgrad::Result<Tensor> + Send + Sync>;

struct Case {
    name: &'static str,
    /// The parameters (fixed across sizes).
    params: Vec<Tensor>,
    /// The data at batch size `b`, seeded by `seed`: which of it is
    /// differentiated is `data_grads`.
    data: Box<dyn Fn(usize, u64) -> wgrad::Result<Vec<Tensor>>>,
    /// How many leading data tensors the gradients are taken of.
    data_grads: usize,
    /// The data's leading dim per unit of batch size (W2 and W8 take
    /// several elements per unit).
    rows: usize,
    loss: LossFn,
}

fn uniform(shape: &[usize], seed: u64, d: &Device) -> wgrad::Result<Tensor> {
    Ok(wgrad::nn::uniform(shape.to_vec(), 1.0, seed, d)?.detach())
}

fn param(shape: &[usize], seed: u64, scale: f64, d: &Device) -> wgrad::Result<Tensor> {
    wgrad::nn::uniform(shape.to_vec(), scale, seed, d)?.detach().requires_grad(true)
}

fn labels(b: usize, seed: u64, classes: i32, d: &Device) -> wgrad::Result<Tensor> {
    let v: Vec<i32> = (0..b as i32).map(|j| (j * 7 + seed as i32 * 3) % classes).collect();
    Tensor::from_slice(&v, [b], d)
}

fn cases(d: &Device) -> wgrad::Result<Vec<Case>> {
    let dd = d.clone();
    let w1 = Case {
        name: "W1 mlp",
        params: vec![
            param(&[20, 16], 1, 0.2, d)?,
            param(&[16], 2, 1.0, d)?,
            param(&[16, 16], 3, 0.25, d)?,
            param(&[16], 4, 1.0, d)?,
            param(&[16, 10], 5, 0.25, d)?,
            param(&[10], 6, 1.0, d)?,
        ],
        data: Box::new(move |b, s| Ok(vec![uniform(&[b, 20], s, &dd)?, labels(b, s, 10, &dd)?])),
        data_grads: 0,
        rows: 1,
        loss: Arc::new(|a, p| {
            let h = a[0].matmul(&p[0])?.add(&p[1])?.relu()?;
            let h = h.matmul(&p[2])?.add(&p[3])?.relu()?;
            h.matmul(&p[4])?.add(&p[5])?.cross_entropy(&a[1], ClassLoss::default())
        }),
    };
    let dd = d.clone();
    let w2 = Case {
        name: "W2 elementwise",
        params: Vec::new(),
        data: Box::new(move |b, s| (0..3).map(|k| uniform(&[b * 8], s * 3 + k, &dd)).collect()),
        data_grads: 3,
        rows: 8,
        loss: Arc::new(|a, _| {
            let (x, w, c) = (&a[0], &a[1], &a[2]);
            let y = x.mul(w)?.add(c)?.tanh()?.mul(&x.sigmoid()?)?;
            y.add(&x.mul(x)?.neg()?.exp()?)?.sum_all()
        }),
    };
    let dd = d.clone();
    let w3 = Case {
        name: "W3 matmul",
        params: vec![param(&[24, 12], 7, 1.0, d)?],
        data: Box::new(move |b, s| Ok(vec![uniform(&[b, 24], s, &dd)?])),
        data_grads: 1,
        rows: 1,
        loss: Arc::new(|a, p| a[0].matmul(&p[0])?.sum_all()),
    };
    let dd = d.clone();
    let w4 = Case {
        name: "W4 norm-softmax",
        params: vec![param(&[32], 8, 1.0, d)?, param(&[32], 9, 1.0, d)?],
        data: Box::new(move |b, s| Ok(vec![uniform(&[b, 32], s, &dd)?, uniform(&[b, 32], s + 1, &dd)?])),
        data_grads: 1,
        rows: 1,
        loss: Arc::new(|a, p| {
            let y = a[0].layer_norm(&[32], None, None, 1e-5)?.mul(&p[0])?.add(&p[1])?;
            y.softmax(-1)?.mul(&a[1])?.sum_all()
        }),
    };
    let dd = d.clone();
    let w5 = Case {
        name: "W5 tiny-chain",
        params: Vec::new(),
        data: Box::new(move |b, s| Ok(vec![uniform(&[b], s, &dd)?])),
        data_grads: 1,
        rows: 1,
        loss: Arc::new(|a, _| {
            let mut x = a[0].clone();
            for _ in 0..50 {
                x = x.sin()?.mul(0.9)?.add(&x.mul(0.1)?)?;
            }
            x.sum_all()
        }),
    };
    let dd = d.clone();
    let w8 = Case {
        name: "W8 sum-40",
        params: Vec::new(),
        data: Box::new(move |b, s| (0..40).map(|k| uniform(&[b * 4], s * 40 + k, &dd)).collect()),
        data_grads: 40,
        rows: 4,
        loss: Arc::new(|a, _| {
            let mut total = a[0].clone();
            for t in &a[1..] {
                total = total.add(t)?;
            }
            total.square()?.sum_all()
        }),
    };
    let model = Arc::new(cnn::Cnn::new(5, d)?);
    let (m, dd) = (model.clone(), d.clone());
    let cnn = Case {
        name: "CNN digits",
        params: model.parameters(),
        data: Box::new(move |b, s| Ok(vec![Tensor::rand([b, 64], s, &dd)?, labels(b, s, 10, &dd)?])),
        data_grads: 0,
        rows: 1,
        loss: Arc::new(move |a, _| m.forward(&a[0])?.cross_entropy(&a[1], ClassLoss::default())),
    };
    Ok(vec![w1, w2, w3, w4, w5, w8, cnn])
}

/// The loss and the gradients of the parameters and the first
/// `data_grads` data tensors, with `grad()`.
fn loss_and_grads(
    name: &str,
    loss: &LossFn,
    params: &[Tensor],
    data: &[Tensor],
    data_grads: usize,
) -> wgrad::Result<Vec<Tensor>> {
    let data: Vec<Tensor> = data
        .iter()
        .enumerate()
        .map(|(k, t)| if k < data_grads { t.requires_grad(true) } else { Ok(t.clone()) })
        .collect::<wgrad::Result<_>>()?;
    let loss = loss(&data, params)?;
    let inputs: Vec<&Tensor> = params.iter().chain(&data[..data_grads]).collect();
    let grads = wgrad::grad(&[&loss], &inputs, None, BackwardOptions::default())?;
    let mut out = vec![loss];
    for (k, g) in grads.into_iter().enumerate() {
        out.push(g.unwrap_or_else(|| panic!("{name}: input {k} has no gradient")));
    }
    Ok(out)
}

fn read(ts: &[Tensor]) -> Vec<Vec<f32>> {
    ts.iter().map(|t| t.to_vec::<f32>().expect("readback")).collect()
}

fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what} output {k}: lengths");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() <= 2e-5 * b.abs().max(1.0), "{what} output {k}[{i}]: compiled {a} vs eager {b}");
        }
    }
}

/// Checks one mode's outputs (named by the text) of the given data.
type Check = dyn Fn(&str, &[Tensor], &[Vec<f32>]);

/// What the two compilers did over a run of sizes.
struct Counts {
    backward: wgrad::CompilerStats,
    step: wgrad::StepStats,
    /// The data's leading dims (what the compilers see as batch sizes).
    leading: Vec<usize>,
    /// Distinct leading dims of 2 or more.
    distinct_from_two: u64,
    /// Whether a leading dim of 1 came.
    ones: u64,
}

/// Runs `case` at each of `sizes` eagerly, under the compiled backward and
/// as a compiled step, on the same data; `check` sees every mode's outputs
/// (loss, then gradients) with the data; with `against_eager`, the two
/// compilers' outputs must equal eager mode's too (sums over thousands of
/// rows, added in another order, differ in more than the last bits: those
/// are checked against an f64 reference instead).
fn three_ways(d: &Device, case: &Case, sizes: &[usize], check: &Check, against_eager: bool) -> wgrad::Result<Counts> {
    let leading: Vec<usize> = sizes.iter().map(|b| b * case.rows).collect();
    let distinct_from_two = {
        let mut s: Vec<usize> = leading.iter().copied().filter(|&b| b >= 2).collect();
        s.sort_unstable();
        s.dedup();
        s.len() as u64
    };
    let ones = u64::from(leading.contains(&1));
    let compiler = Arc::new(WgslCompiler::new(d));
    let data_grads = case.data_grads;
    let (name, loss, params) = (case.name, case.loss.clone(), case.params.clone());
    let mut step = compile_step(d, move |args: &[Tensor]| loss_and_grads(name, &loss, &params, args, data_grads));
    for (i, &b) in sizes.iter().enumerate() {
        let data = (case.data)(b, 100 + i as u64)?;
        let eager = read(&loss_and_grads(case.name, &case.loss, &case.params, &data, data_grads)?);
        check(&format!("{} eager at batch {b}", case.name), &data, &eager);
        let guard = CompilerGuard::install_arc(compiler.clone())?;
        let compiled = read(&loss_and_grads(case.name, &case.loss, &case.params, &data, data_grads)?);
        drop(guard);
        let what = format!("{} compiled backward at batch {b}", case.name);
        check(&what, &data, &compiled);
        if against_eager {
            assert_close(&what, &compiled, &eager);
        }
        let stepped = read(&step.call(&data)?);
        let what = format!("{} compiled step at batch {b}", case.name);
        check(&what, &data, &stepped);
        if against_eager {
            assert_close(&what, &stepped, &eager);
        }
    }
    Ok(Counts { backward: compiler.stats(), step: step.stats(), leading, distinct_from_two, ones })
}

#[test]
fn every_workload_at_random_batch_sizes_matches_eager_in_both_compilers() -> wgrad::Result<()> {
    let _l = serial();
    let d = device();
    let mut rng = common::Rng::new(0x5851_f42d_4c95_7f2du64);
    let mut next = |n: u64| rng.below(n);
    for case in cases(&d)? {
        // Six random sizes of 2..34, one of them again, a last partial
        // batch and a batch of 1.
        let mut sizes: Vec<usize> = (0..6).map(|_| 2 + next(32) as usize).collect();
        sizes.extend([sizes[2], 1 + next(4) as usize, 1]);
        let n = three_ways(&d, &case, &sizes, &|_, _, _| {}, true)?;
        let (c, s, leading) = (&n.backward, &n.step, &n.leading);
        assert_eq!(c.fallbacks, 0, "{}: {c:?}", case.name);
        // The backward: the first size, fitted there from its shadows at
        // two smaller sizes (from a first size of 4 or more; from one
        // under 4, the first three distinct sizes of 2 or more), and the
        // batch of 1. The step: the first size (a first size of 2 has no
        // smaller sizes to fit with, and the second traces too), and the
        // batch of 1.
        let (name, first_two) = (case.name, u64::from(leading[0] == 2));
        let fitted_after = if leading[0] >= 4 { 1 } else { 3.min(n.distinct_from_two) };
        assert_eq!(c.cache_misses - c.replans, fitted_after + n.ones, "{name} at {leading:?}: {c:?}");
        assert_eq!(c.shadow_fits, u64::from(leading[0] >= 4), "{name} at {leading:?}: {c:?}");
        assert_eq!(
            (s.traces, s.eager_calls, s.graph_breaks),
            (1 + first_two + n.ones, 0, 0),
            "{name} at {leading:?}: {s:?}"
        );
        assert_eq!(s.replans, n.distinct_from_two - 1 - first_two, "{name} at {leading:?}: {s:?}");
    }
    Ok(())
}

/// The size thresholds kernel choices depend on, crossed by the batch
/// size of one program: four-wide kernels from 4,096 elements (B = 64),
/// a column reduction over the batch in one pass up to 256 rows and
/// chunked beyond, the memory plan's 1 MiB lending size (the [B, 64]
/// gradient from B = 4,096), a matmul contraction over the batch split
/// past 16,384 (lavapipe ends a shader loop after 65,535 iterations), and
/// a batch of 1. Both compilers trace only where the issue allows (the
/// first size and the batch of 1), re-plan every other size (the step counts those whose kernels
/// differ), and every mode's every output equals an f64 reference.
#[test]
fn size_range_boundaries_replan_and_match_f64() -> wgrad::Result<()> {
    let _l = serial();
    let d = device();
    let dd = d.clone();
    let case = Case {
        name: "boundaries",
        params: vec![param(&[64, 3], 21, 1.0, &d)?, param(&[64], 22, 1.0, &d)?],
        data: Box::new(move |b, s| Ok(vec![uniform(&[b, 64], s, &dd)?])),
        data_grads: 1,
        rows: 1,
        // sum(tanh(x * c) @ w) + sum(mean(x^2, over the batch))
        loss: Arc::new(|a, p| {
            let t = a[0].mul(&p[1])?.tanh()?;
            t.matmul(&p[0])?.sum_all()?.add(&a[0].square()?.mean(&[0], false)?.sum_all()?)
        }),
    };
    let (w, c) = (read(&case.params[..1]).remove(0), read(&case.params[1..]).remove(0));
    let check = move |what: &str, data: &[Tensor], got: &[Vec<f32>]| {
        let x = data[0].to_vec::<f32>().expect("readback");
        let b = x.len() / 64;
        let row_w: Vec<f64> = (0..64).map(|i| (0..3).map(|j| w[i * 3 + j] as f64).sum()).collect();
        // Each output with the sum of its terms' magnitudes (the scale of
        // its rounding error).
        let (mut loss, mut loss_scale) = (0.0f64, 0.0f64);
        let (mut gw, mut gw_scale) = (vec![0.0f64; 64], vec![0.0f64; 64]);
        let (mut gc, mut gc_scale) = (vec![0.0f64; 64], vec![0.0f64; 64]);
        let mut gx = vec![0.0f64; b * 64];
        for r in 0..b {
            for i in 0..64 {
                let xv = x[r * 64 + i] as f64;
                let t = (xv * c[i] as f64).tanh();
                let term = t * row_w[i] + xv * xv / b as f64;
                loss += term;
                loss_scale += term.abs();
                gw[i] += t;
                gw_scale[i] += t.abs();
                let dc = (1.0 - t * t) * xv * row_w[i];
                gc[i] += dc;
                gc_scale[i] += dc.abs();
                gx[r * 64 + i] = (1.0 - t * t) * c[i] as f64 * row_w[i] + 2.0 * xv / b as f64;
            }
        }
        let close = |name: &str, got: &[f32], want: &[f64], scale: &dyn Fn(usize) -> f64| {
            assert_eq!(got.len(), want.len(), "{what} {name}: lengths");
            for (k, (g, r)) in got.iter().zip(want).enumerate() {
                let tol = 2e-6 * scale(k) + 1e-6;
                assert!((*g as f64 - r).abs() <= tol, "{what} {name}[{k}]: {g} vs f64 {r}");
            }
        };
        close("loss", &got[0], &[loss], &|_| loss_scale);
        let gw3: Vec<f64> = (0..64 * 3).map(|k| gw[k / 3]).collect();
        close("grad w", &got[1], &gw3, &|k| gw_scale[k / 3]);
        close("grad c", &got[2], &gc, &|k| gc_scale[k]);
        close("grad x", &got[3], &gx, &|k| gx[k].abs() + 1.0);
    };
    let sizes = [40, 50, 60, 63, 64, 65, 200, 256, 257, 1000, 4095, 4096, 5000, 16_384, 16_385, 20_000, 60, 1];
    let n = three_ways(&d, &case, &sizes, &check, false)?;
    let (c, s) = (&n.backward, &n.step);
    // Traced: 40 (fitted there from its shadows at 39 and 38) and 1.
    assert_eq!((c.cache_misses - c.replans, c.replans, c.fallbacks), (2, 15, 0), "{c:?}");
    assert_eq!((s.traces, s.replans, s.eager_calls), (2, 15, 0), "{s:?}");
    assert!(s.replans_across_boundaries >= 3, "four-wide, chunked and split kernels differ from batch 40's: {s:?}");
    Ok(())
}

/// A weight gradient contracts over the batch (`x^T @ g`): past
/// `MATMUL_K_CHUNK` (16,384) rows eager mode splits the contraction into
/// runs (lavapipe ends a shader loop after 65,535 iterations, so one
/// matmul over 70,000 rows would be silently cut short). A family fitted
/// at small sizes must not be instantiated as one long matmul there: both
/// compilers trace that size, and every size equals eager mode.
#[test]
fn a_batch_past_the_contraction_limit_traces_and_matches_eager() -> wgrad::Result<()> {
    let _l = serial();
    let d = device();
    let dd = d.clone();
    let case = Case {
        name: "split contraction",
        params: vec![param(&[8, 4], 31, 0.5, &d)?],
        data: Box::new(move |b, s| Ok(vec![uniform(&[b, 8], s, &dd)?, labels(b, s, 4, &dd)?])),
        data_grads: 0,
        rows: 1,
        // mean cross-entropy: its gradient is no broadcast, so the weight
        // gradient is a real matmul over the batch.
        loss: Arc::new(|a, p| a[0].matmul(&p[0])?.cross_entropy(&a[1], ClassLoss::default())),
    };
    let n = three_ways(&d, &case, &[10, 20, 30, 40, 70_000, 40], &|_, _, _| {}, true)?;
    let (c, s) = (&n.backward, &n.step);
    // Traced: 10 (the fit, with its shadows at 9 and 8) and 70,000;
    // re-planned: 20, 30, 40; 40 again hits.
    assert_eq!((c.cache_misses - c.replans, c.replans, c.fallbacks), (2, 3, 0), "{c:?}");
    // Traced: 10 and 70,000; re-planned: 20, 30, 40.
    assert_eq!((s.traces, s.replans, s.eager_calls), (2, 3, 0), "{s:?}");
    Ok(())
}

/// The gradient of `x[0:10:3]` along the batch places 12 rows (4 taken,
/// each padded to the step), cut to what fits: at batch sizes 16, 32 and
/// 48 that is always 12, but at 10 or 11 only 10 or 11 (the formula's
/// `min`, which no signature number shows). A family fitted at 16, 32, 48
/// must not write 12 rows into a 10-row gradient there: both compilers
/// trace those sizes, and every size equals eager mode.
#[test]
fn a_strided_slice_past_the_end_of_a_small_batch_traces_and_matches_eager() -> wgrad::Result<()> {
    let _l = serial();
    let d = device();
    let dd = d.clone();
    let case = Case {
        name: "strided slice",
        params: vec![param(&[6, 5], 41, 0.5, &d)?],
        data: Box::new(move |b, s| Ok(vec![uniform(&[b, 6], s, &dd)?])),
        data_grads: 1,
        rows: 1,
        loss: Arc::new(|a, p| a[0].matmul(&p[0])?.tanh()?.slice_step(0, Some(0), Some(10), 3)?.sum_all()),
    };
    let n = three_ways(&d, &case, &[16, 32, 48, 40, 10, 11, 40], &|_, _, _| {}, true)?;
    let (c, s) = (&n.backward, &n.step);
    // The compiled backward traces 16 (fitted there from its shadows at 15
    // and 14), 10 and 11, and re-plans 32, 48 and 40.
    assert_eq!((c.cache_misses - c.replans, c.replans, c.fallbacks), (3, 3, 0), "{c:?}");
    assert_eq!(s.eager_calls, 0, "{s:?}");
    Ok(())
}

/// A first backward at batch 1 traces another graph than the sizes after
/// it (centering over a batch of 1 sums nothing: `sum_to_shape` returns
/// early). That graph is a family of its own, and the next size starts
/// another, fitted there from its shadows, instead of tracing every size.
#[test]
fn a_first_batch_of_one_does_not_keep_the_family_from_fitting() -> wgrad::Result<()> {
    let _l = serial();
    let d = device();
    let dd = d.clone();
    let case = Case {
        name: "batch of one first",
        params: vec![param(&[4, 3], 51, 0.5, &d)?],
        data: Box::new(move |b, s| Ok(vec![uniform(&[b, 4], s, &dd)?])),
        data_grads: 1,
        rows: 1,
        loss: Arc::new(|a, p| {
            let h = a[0].matmul(&p[0])?;
            h.sub(&h.mean(&[0], true)?)?.tanh()?.sum_all()
        }),
    };
    let n = three_ways(&d, &case, &[1, 10, 20, 30, 40, 50, 1], &|_, _, _| {}, true)?;
    let c = &n.backward;
    // Traced: 1 and 10 (fitted there); re-planned: 20 to 50; the last 1
    // hits.
    assert_eq!((c.cache_misses - c.replans, c.replans, c.shadow_fits, c.fallbacks), (2, 4, 1, 0), "{c:?}");
    Ok(())
}
