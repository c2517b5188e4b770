//! Property tests: random shapes (0 and 1 dims and 0-d tensors included),
//! random values (NaN, ±inf, ±0 and huge ones included) and random op
//! sequences, each checked against what PyTorch does, computed on the host
//! in f64: where the reference is defined, wgrad returns `Ok` with the same
//! values (NaN where the reference is NaN); where PyTorch raises, wgrad
//! returns `Err`; after any error the device still computes correctly; a
//! failed backward leaves every `.grad` as it was.
//!
//! CI runs 64 cases per property from a fixed seed (`config`, about 5 s on
//! lavapipe); `PROPTEST_CASES=10000 PROPTEST_RNG_SEED=$RANDOM cargo test
//! --test properties` runs a longer, new sweep (1,500 cases take 90 s).
//!
//! Domains follow WGSL's accuracy rules, which PyTorch on a GPU shares:
//! `sin` and `cos` are only accurate for moderate arguments, so they get
//! finite inputs up to 100 in magnitude (plus NaN and ±inf, where the
//! answer is exact); `pow` is left to the op tests (`tests/gradcheck.rs`,
//! `tests/ops_forward.rs`), whose special cases differ by backend.

mod common;

use common::device;
use proptest::prelude::*;
use wgrad::{BackwardOptions, DType, Tensor};

/// 64 cases from a fixed seed, so CI sees the same cases every run;
/// `PROPTEST_CASES` and `PROPTEST_RNG_SEED` in the environment override both.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig { failure_persistence: None, ..ProptestConfig::default() };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 64;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = proptest::test_runner::RngSeed::Fixed(0x2026_1130);
    }
    config
}

// ------------------------------------------------------------------ generators

/// A shape of rank 0 to 3 with dims 0 to 4 (1 and 0 are common).
fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![Just(0usize), Just(1), 2usize..5], 0..4)
}

/// A shape with no zero dim (for ops whose empty case is tested apart).
fn nonempty_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![Just(1usize), 2usize..5], 0..4)
}

/// A value: mostly moderate, sometimes special.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -5.0f32..5.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => prop_oneof![Just(1e30f32), Just(-1e30f32)],
    ]
}

fn tensor_data(shape: Vec<usize>) -> impl Strategy<Value = (Vec<usize>, Vec<f32>)> {
    let n: usize = shape.iter().product();
    prop::collection::vec(value(), n).prop_map(move |v| (shape.clone(), v))
}

fn upload(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_slice(data, shape, &device()).expect("upload")
}

// ------------------------------------------------------------------ comparison

/// Same value up to f32 rounding of the computation: NaN exactly where the
/// reference is NaN, infinities equal, finite values within `rtol` of the
/// reference plus `atol`.
fn same(got: f32, want: f64, rtol: f64, atol: f64) -> bool {
    let g = f64::from(got);
    if want.is_nan() || g.is_nan() {
        return want.is_nan() && g.is_nan();
    }
    if want.is_infinite() || g.is_infinite() {
        // The f32 result may overflow where f64 does not.
        return g == want
            || (g.is_infinite() && want.abs() > f64::from(f32::MAX) * 0.99 && g.signum() == want.signum());
    }
    (g - want).abs() <= rtol * want.abs() + atol
}

fn check_all(got: &[f32], want: &[f64], rtol: f64, atol: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        prop_assert!(same(g, w, rtol, atol), "element {}: got {}, want {}", i, g, w);
    }
    Ok(())
}

/// After an error, the device still computes correctly.
fn device_still_works() -> Result<(), TestCaseError> {
    let x = upload(&[3], &[1.0, 2.0, 3.0]);
    let y = x.mul(2.0).and_then(|t| t.add(1.0)).and_then(|t| t.to_vec::<f32>());
    prop_assert_eq!(y.ok(), Some(vec![3.0, 5.0, 7.0]));
    Ok(())
}

// ------------------------------------------------------------------ references

#[derive(Debug, Clone, Copy)]
enum Unary {
    Neg,
    Exp,
    Log,
    Sqrt,
    Tanh,
    Sigmoid,
    Relu,
    Sin,
    Cos,
    Abs,
    Erf,
    Softplus,
}

const UNARY: [Unary; 12] = [
    Unary::Neg,
    Unary::Exp,
    Unary::Log,
    Unary::Sqrt,
    Unary::Tanh,
    Unary::Sigmoid,
    Unary::Relu,
    Unary::Sin,
    Unary::Cos,
    Unary::Abs,
    Unary::Erf,
    Unary::Softplus,
];

impl Unary {
    fn run(self, t: &Tensor) -> wgrad::Result<Tensor> {
        match self {
            Unary::Neg => t.neg(),
            Unary::Exp => t.exp(),
            Unary::Log => t.log(),
            Unary::Sqrt => t.sqrt(),
            Unary::Tanh => t.tanh(),
            Unary::Sigmoid => t.sigmoid(),
            Unary::Relu => t.relu(),
            Unary::Sin => t.sin(),
            Unary::Cos => t.cos(),
            Unary::Abs => t.abs(),
            Unary::Erf => t.erf(),
            Unary::Softplus => t.softplus(),
        }
    }

    /// PyTorch's value at `x`, in f64.
    fn reference(self, x: f64) -> f64 {
        match self {
            Unary::Neg => -x,
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Sqrt => x.sqrt(),
            Unary::Tanh => x.tanh(),
            Unary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Unary::Relu if x.is_nan() => x,
            Unary::Relu => x.max(0.0),
            Unary::Sin => x.sin(),
            Unary::Cos => x.cos(),
            Unary::Abs => x.abs(),
            Unary::Erf => common::reference::erf(x),
            Unary::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
        }
    }

    /// The inputs the op is accurate for in WGSL (see the module doc).
    fn input(self, x: f32) -> f32 {
        match self {
            Unary::Sin | Unary::Cos if x.is_finite() && x.abs() > 100.0 => x.signum() * 100.0,
            _ => x,
        }
    }

    /// Tolerances: WGSL's exp/log/tanh are accurate to a few ulps relative;
    /// erf is a polynomial approximation (absolute error 1.5e-7), and the
    /// trigonometric functions have an absolute error bound.
    fn tolerance(self) -> (f64, f64) {
        match self {
            Unary::Erf => (1e-5, 5e-7),
            Unary::Sin | Unary::Cos => (1e-4, 1e-5),
            _ => (2e-5, 1e-6),
        }
    }
}

// ------------------------------------------------------------------ properties

proptest! {
    #![proptest_config(config())]

    /// Every unary op, on any shape and any values, matches PyTorch.
    #[test]
    fn unary_ops_match_the_reference(
        (shape, data) in shape().prop_flat_map(tensor_data),
        which in 0..UNARY.len(),
    ) {
        let op = UNARY[which];
        let data: Vec<f32> = data.into_iter().map(|x| op.input(x)).collect();
        let t = upload(&shape, &data);
        let out = op.run(&t);
        prop_assert!(out.is_ok(), "{:?} on {:?}: {:?}", op, shape, out.err());
        let out = out.unwrap();
        prop_assert_eq!(out.dims(), &shape[..]);
        let got = out.to_vec::<f32>().unwrap();
        let want: Vec<f64> = data.iter().map(|&x| op.reference(f64::from(x))).collect();
        let (rtol, atol) = op.tolerance();
        check_all(&got, &want, rtol, atol)?;
    }

    /// Binary ops broadcast as NumPy does, or refuse shapes that do not.
    #[test]
    fn binary_ops_broadcast_or_refuse(
        (sa, da) in shape().prop_flat_map(tensor_data),
        (sb, db) in shape().prop_flat_map(tensor_data),
        which in 0usize..6,
    ) {
        let (a, b) = (upload(&sa, &da), upload(&sb, &db));
        let out = match which {
            0 => a.add(&b),
            1 => a.sub(&b),
            2 => a.mul(&b),
            3 => a.div(&b),
            4 => a.maximum(&b),
            _ => a.minimum(&b),
        };
        let ra = common::reference::RefTensor::from_f32(&da, &sa);
        let rb = common::reference::RefTensor::from_f32(&db, &sb);
        match common::reference::broadcast_shapes(&sa, &sb) {
            None => {
                prop_assert!(out.is_err(), "{:?} and {:?} do not broadcast", sa, sb);
                device_still_works()?;
            }
            Some(shape) => {
                prop_assert!(out.is_ok(), "{:?} and {:?}: {:?}", sa, sb, out.err());
                let out = out.unwrap();
                prop_assert_eq!(out.dims(), &shape[..]);
                let f = |x: f64, y: f64| match which {
                    0 => x + y,
                    1 => x - y,
                    2 => x * y,
                    3 => x / y,
                    4 if x.is_nan() || y.is_nan() => f64::NAN,
                    4 => x.max(y),
                    _ if x.is_nan() || y.is_nan() => f64::NAN,
                    _ => x.min(y),
                };
                let want = ra.zip(&rb, f);
                check_all(&out.to_vec::<f32>().unwrap(), &want.data, 1e-6, 0.0)?;
            }
        }
    }

    /// Reductions over random axes: PyTorch's values, NaN propagated; the
    /// max and min of an empty slice are errors.
    #[test]
    fn reductions_match_the_reference(
        (shape, data) in shape().prop_flat_map(tensor_data),
        axes_mask in 0u8..16,
        keepdim in any::<bool>(),
        which in 0usize..4,
    ) {
        let rank = shape.len();
        let axes: Vec<usize> = (0..rank).filter(|a| axes_mask & (1 << a) != 0).collect();
        let axes_i: Vec<isize> = axes.iter().map(|&a| a as isize).collect();
        let t = upload(&shape, &data);
        let out = match which {
            0 => t.sum(&axes_i, keepdim),
            1 => t.mean(&axes_i, keepdim),
            2 => t.max(&axes_i, keepdim),
            _ => t.min(&axes_i, keepdim),
        };
        let empty_slice = axes.iter().any(|&a| shape[a] == 0);
        if which >= 2 && empty_slice {
            prop_assert!(out.is_err(), "max/min over an empty axis must be an error");
            device_still_works()?;
            return Ok(());
        }
        prop_assert!(out.is_ok(), "{:?} over {:?}: {:?}", shape, axes, out.err());
        let out = out.unwrap();
        // The reference: fold each output's slice in f64.
        let reference = common::reference::RefTensor::from_f32(&data, &shape);
        let kept: Vec<usize> = (0..rank).filter(|a| !axes.contains(a)).collect();
        let out_dims: Vec<usize> = if keepdim {
            (0..rank).map(|a| if axes.contains(&a) { 1 } else { shape[a] }).collect()
        } else {
            kept.iter().map(|&a| shape[a]).collect()
        };
        prop_assert_eq!(out.dims(), &out_dims[..]);
        let kept_dims: Vec<usize> = kept.iter().map(|&a| shape[a]).collect();
        let n_out: usize = kept_dims.iter().product();
        let mut slices: Vec<Vec<f64>> = vec![Vec::new(); n_out];
        for flat in 0..reference.numel() {
            let idx = common::reference::unravel_index(flat, &shape);
            let k: Vec<usize> = kept.iter().map(|&a| idx[a]).collect();
            slices[common::reference::ravel_index(&k, &kept_dims)].push(reference.data[flat]);
        }
        let want: Vec<f64> = slices.iter().map(|s| {
            let nan = s.iter().any(|v| v.is_nan());
            match which {
                0 => s.iter().sum(),
                1 => s.iter().sum::<f64>() / s.len() as f64,
                2 if nan => f64::NAN,
                2 => s.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                _ if nan => f64::NAN,
                _ => s.iter().cloned().fold(f64::INFINITY, f64::min),
            }
        }).collect();
        let scale: Vec<f64> = slices.iter().map(|s| s.iter().map(|v| v.abs()).filter(|v| v.is_finite()).sum()).collect();
        let got = out.to_vec::<f32>().unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            // Summation order differs: allow f32 rounding of the terms' magnitude.
            let atol = 1e-6 * scale[i].max(1.0);
            prop_assert!(same(g, w, 1e-6, atol), "output {}: got {}, want {} (slice {:?})", i, g, w, slices[i]);
        }
    }

    /// Matmul of random shapes: the product, or an error when the inner
    /// dims differ; an empty inner dim gives zeros.
    #[test]
    fn matmul_matches_or_refuses(m in 0usize..4, k1 in 0usize..4, k2 in 0usize..4, n in 0usize..4, seed in any::<u64>()) {
        let a = common::reference::rand_tensor(seed, &[m, k1], -2.0, 2.0);
        let b = common::reference::rand_tensor(seed ^ 1, &[k2, n], -2.0, 2.0);
        let out = common::upload(&a).matmul(&common::upload(&b));
        if k1 != k2 {
            prop_assert!(out.is_err());
            device_still_works()?;
            return Ok(());
        }
        let out = out.unwrap();
        prop_assert_eq!(out.dims(), &[m, n][..]);
        let a32 = common::reference::RefTensor::from_f32(&a.to_f32(), &[m, k1]);
        let b32 = common::reference::RefTensor::from_f32(&b.to_f32(), &[k2, n]);
        check_all(&out.to_vec::<f32>().unwrap(), &a32.matmul(&b32).data, 1e-5, 1e-5)?;
    }

    /// A random chain of differentiable ops on random (finite) values:
    /// eager and compiled gradients agree, and both match the chain rule
    /// computed in f64 on the host.
    #[test]
    fn random_chains_backward_eager_and_compiled(
        shape in nonempty_shape(),
        ops in prop::collection::vec(0usize..6, 1..6),
        seed in any::<u64>(),
    ) {
        let n: usize = shape.iter().product();
        let x0 = common::reference::uniform(seed, n, -2.0, 2.0);
        let x32: Vec<f32> = x0.iter().map(|&v| v as f32).collect();
        // Forward and derivative of each op, in f64.
        let step = |op: usize, x: f64| -> (f64, f64) {
            match op {
                0 => (x.tanh(), 1.0 - x.tanh().powi(2)),
                1 => { let s = 1.0 / (1.0 + (-x).exp()); (s, s * (1.0 - s)) }
                // Halved so every intermediate stays in [-2, 2]: squaring
                // alone grows x^(2^n), where f32 rounding of the argument
                // of a following sin dominates any derivative.
                2 => (x * x * 0.5, x),
                3 => (x.sin(), x.cos()),
                4 => (x * 0.5 + 1.0, 0.5),
                _ => (if x > 0.0 { x } else { 0.0 }, if x > 0.0 { 1.0 } else { 0.0 }),
            }
        };
        let want: Vec<f64> = x32.iter().map(|&v| {
            let (mut x, mut d) = (f64::from(v), 1.0);
            for &op in &ops {
                let (y, dy) = step(op, x);
                d *= dy;
                x = y;
            }
            d
        }).collect();
        let run = |compiled: bool| -> wgrad::Result<Vec<f32>> {
            let _guard = if compiled { Some(wgrad::WgslCompiler::install(&device())?) } else { None };
            let x = upload(&shape, &x32).requires_grad(true)?;
            let mut y = x.clone();
            for &op in &ops {
                y = match op {
                    0 => y.tanh()?,
                    1 => y.sigmoid()?,
                    2 => y.mul(&y)?.mul(0.5)?,
                    3 => y.sin()?,
                    4 => y.mul(0.5)?.add(1.0)?,
                    _ => y.relu()?,
                };
            }
            y.sum_all()?.backward()?;
            x.grad().expect("a gradient").to_vec::<f32>()
        };
        let _turn = COMPILER.lock().unwrap_or_else(|e| e.into_inner());
        let eager = run(false);
        let compiled = run(true);
        prop_assert!(eager.is_ok() && compiled.is_ok(), "{:?} {:?}", eager.err(), compiled.err());
        let (eager, compiled) = (eager.unwrap(), compiled.unwrap());
        check_all(&eager, &want, 1e-4, 1e-5)?;
        let compiled_f64: Vec<f64> = compiled.iter().map(|&v| f64::from(v)).collect();
        check_all(&eager, &compiled_f64, 1e-5, 1e-6)?;
    }

    /// A backward that fails part-way (a hook returns a gradient of the
    /// wrong shape) leaves every `.grad` as it was, and the device works.
    #[test]
    fn a_failed_backward_changes_no_grad(shape in nonempty_shape(), seed in any::<u64>(), fail_at in 0usize..3) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = common::reference::uniform(seed, n, -1.0, 1.0).iter().map(|&v| v as f32).collect();
        let a = upload(&shape, &data).requires_grad(true).unwrap();
        let b = upload(&shape, &data).requires_grad(true).unwrap();
        a.set_grad(Some(upload(&shape, &vec![7.0; n]))).unwrap();
        let h1 = a.mul(&b).unwrap();
        let h2 = h1.tanh().unwrap();
        let h3 = h2.add(&a).unwrap();
        let target = [&h1, &h2, &h3][fail_at];
        let wrong = Tensor::zeros([n + 1], DType::F32, &device()).unwrap();
        target.register_hook(move |_| Some(wrong.clone())).unwrap();
        let retain = BackwardOptions { retain_graph: true, ..Default::default() };
        let seed_grad = Tensor::ones([], DType::F32, &device()).unwrap();
        let err = h3.sum_all().unwrap().backward_with(&seed_grad, retain);
        prop_assert!(err.is_err());
        prop_assert_eq!(a.grad().unwrap().to_vec::<f32>().unwrap(), vec![7.0; n]);
        prop_assert!(b.grad().is_none());
        device_still_works()?;
    }
}

/// One compiler per process: the compiled cases take turns.
static COMPILER: std::sync::Mutex<()> = std::sync::Mutex::new(());
