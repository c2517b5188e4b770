//! Forward results of every op against the independent f64 CPU reference.

mod common;
use common::reference::*;
use common::{device, upload};
use wgrad::{DType, Tensor};

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-5;
/// For transcendental functions (exp, log, sin, tanh, erf, ...).
const TRANS: f64 = 1e-4;

/// Random data in [lo, hi), rounded to f32 so the reference sees exactly the uploaded values.
fn r32(seed: u64, shape: &[usize], lo: f64, hi: f64) -> RefTensor {
    let t = rand_tensor(seed, shape, lo, hi);
    RefTensor::from_f32(&t.to_f32(), shape)
}

/// Small integers in [lo, hi] (exact in f32), so comparisons see ties.
fn ints(seed: u64, shape: &[usize], lo: i64, hi: i64) -> RefTensor {
    rand_tensor(seed, shape, lo as f64, (hi + 1) as f64).map(f64::floor)
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().expect("to_vec f32")
}

fn check(t: &Tensor, expected: &RefTensor, rtol: f64, atol: f64, what: &str) {
    assert_close_f32_shaped(&vals(t), t.dims(), expected, rtol, atol, what);
}

fn check_mask(t: &Tensor, expected: &RefTensor, what: &str) {
    assert_eq!(t.dtype(), DType::U32, "{what}: dtype");
    assert_eq!(t.dims(), expected.shape.as_slice(), "{what}: shape");
    let got: Vec<f64> = t.to_vec::<u32>().expect("to_vec u32").into_iter().map(f64::from).collect();
    assert_eq!(got, expected.data, "{what}");
}

fn ref_min(t: &RefTensor, axes: &[usize], keepdim: bool) -> RefTensor {
    t.map(|x| -x).max(axes, keepdim).map(|x| -x)
}

/// PyTorch's pow conventions in f64.
fn ref_pow(x: f64, y: f64) -> f64 {
    if y == 0.0 { 1.0 } else { x.powf(y) }
}

// ------------------------------------------------------------------ unary

#[test]
fn unary_ops() {
    let x = r32(1, &[3, 5, 7], -3.0, 3.0);
    let pos = r32(2, &[4, 9], 0.05, 5.0);
    let (gx, gp) = (upload(&x), upload(&pos));
    type Case<'a> = (&'a str, fn(&Tensor) -> wgrad::Result<Tensor>, fn(f64) -> f64, bool, f64);
    let cases: Vec<Case> = vec![
        ("neg", Tensor::neg, |v| -v, false, ATOL),
        ("exp", Tensor::exp, f64::exp, false, TRANS),
        ("log", Tensor::log, f64::ln, true, TRANS),
        ("sqrt", Tensor::sqrt, f64::sqrt, true, TRANS),
        ("rsqrt", Tensor::rsqrt, |v| 1.0 / v.sqrt(), true, TRANS),
        ("tanh", Tensor::tanh, f64::tanh, false, TRANS),
        ("sigmoid", Tensor::sigmoid, sigmoid, false, TRANS),
        ("relu", Tensor::relu, |v| v.max(0.0), false, ATOL),
        ("gelu_tanh", Tensor::gelu_tanh, gelu_tanh, false, TRANS),
        ("gelu", Tensor::gelu, gelu_erf, false, TRANS),
        ("sin", Tensor::sin, f64::sin, false, TRANS),
        ("cos", Tensor::cos, f64::cos, false, TRANS),
        ("abs", Tensor::abs, f64::abs, false, ATOL),
        ("erf", Tensor::erf, erf, false, TRANS),
        ("square", Tensor::square, |v| v * v, false, ATOL),
        (
            "sign",
            Tensor::sign,
            |v| {
                if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            },
            false,
            ATOL,
        ),
    ];
    for (name, op, f, positive, tol) in cases {
        let (g, r) = if positive { (&gp, &pos) } else { (&gx, &x) };
        let rtol = if tol == ATOL { RTOL } else { tol };
        check(&op(g).unwrap(), &r.map(f), rtol, tol, name);
    }
}

#[test]
fn unary_edge_values() {
    let d = [-50.0, -20.0, -15.5, -1.0, -0.0, 0.0, 0.5, 1.0, 15.5, 20.0, 50.0];
    let x = RefTensor::new(d.to_vec(), &[d.len()]);
    let g = upload(&x);
    // Saturating functions stay finite and exact at the extremes.
    check(&g.tanh().unwrap(), &x.map(f64::tanh), TRANS, TRANS, "tanh extremes");
    check(&g.sigmoid().unwrap(), &x.map(sigmoid), TRANS, TRANS, "sigmoid extremes");
    check(&g.erf().unwrap(), &x.map(erf), TRANS, TRANS, "erf extremes");
    check(&g.relu().unwrap(), &x.map(|v| v.max(0.0)), 0.0, 0.0, "relu extremes");
    let s = upload(&RefTensor::new(vec![-2.0, 0.0, 3.0], &[3]));
    assert_eq!(vals(&s.sign().unwrap()), vec![-1.0, 0.0, 1.0]);
}

#[test]
fn clamp_forward() {
    let x = r32(3, &[6, 7], -3.0, 3.0);
    let g = upload(&x);
    check(&g.clamp(-1.0, 0.5).unwrap(), &x.map(|v| v.clamp(-1.0, 0.5)), 0.0, 0.0, "clamp");
    check(&g.clamp(0.25, 0.25).unwrap(), &x.map(|_| 0.25), 0.0, 0.0, "clamp to a point");
    assert!(g.clamp(1.0, -1.0).is_err());
}

// ------------------------------------------------------------------ binary

type BinCase = (&'static str, fn(&Tensor, &Tensor) -> wgrad::Result<Tensor>, fn(f64, f64) -> f64);

fn binary_cases() -> Vec<BinCase> {
    vec![
        ("add", |a, b| a.add(b), |x, y| x + y),
        ("sub", |a, b| a.sub(b), |x, y| x - y),
        ("mul", |a, b| a.mul(b), |x, y| x * y),
        ("div", |a, b| a.div(b), |x, y| x / y),
        ("pow", |a, b| a.pow(b), ref_pow),
        ("maximum", |a, b| a.maximum(b), f64::max),
        ("minimum", |a, b| a.minimum(b), f64::min),
    ]
}

#[test]
fn binary_ops_same_and_broadcast_shapes() {
    let shapes: [(&[usize], &[usize]); 6] = [
        (&[4, 5], &[4, 5]),
        (&[3, 1, 4], &[5, 1]),
        (&[5, 1], &[3, 1, 4]),
        (&[4], &[2, 3, 4]),
        (&[2, 3, 4], &[4]),
        (&[], &[2, 3]),
    ];
    for (i, (sa, sb)) in shapes.iter().enumerate() {
        // Positive bases keep pow real; divisors stay away from zero.
        let a = r32(10 + i as u64, sa, 0.3, 2.0);
        let b = r32(20 + i as u64, sb, 0.5, 2.5);
        let (ga, gb) = (upload(&a), upload(&b));
        for (name, op, f) in binary_cases() {
            let tol = if name == "pow" { TRANS } else { ATOL };
            let rtol = if name == "pow" { TRANS } else { RTOL };
            check(&op(&ga, &gb).unwrap(), &a.zip(&b, f), rtol, tol, &format!("{name} {sa:?} vs {sb:?}"));
        }
    }
    // Mixed signs for everything but pow.
    let a = r32(30, &[3, 1, 4], -2.0, 2.0);
    let b = r32(31, &[5, 1], -2.0, 2.0);
    let (ga, gb) = (upload(&a), upload(&b));
    for (name, op, f) in binary_cases().into_iter().filter(|c| c.0 != "pow") {
        check(&op(&ga, &gb).unwrap(), &a.zip(&b, f), RTOL, 1e-4, &format!("{name} mixed signs"));
    }
    assert!(ga.add(upload(&r32(1, &[4, 2], 0.0, 1.0))).is_err());
}

#[test]
fn binary_ops_with_scalars() {
    let x = r32(40, &[3, 4], 0.5, 2.0);
    let g = upload(&x);
    let s = |t: wgrad::Result<Tensor>| t.unwrap();
    let cases: Vec<(&str, Tensor, RefTensor)> = vec![
        ("add 2.5", s(g.add(2.5)), x.map(|v| v + 2.5)),
        ("sub 1.5", s(g.sub(1.5)), x.map(|v| v - 1.5)),
        ("mul -3", s(g.mul(-3.0)), x.map(|v| v * -3.0)),
        ("div 4", s(g.div(4.0)), x.map(|v| v / 4.0)),
        ("pow 2.5", s(g.pow(2.5)), x.map(|v| v.powf(2.5))),
        ("powf -1.5", s(g.powf(-1.5)), x.map(|v| v.powf(-1.5))),
        ("maximum 1", s(g.maximum(1.0)), x.map(|v| v.max(1.0))),
        ("minimum 1", s(g.minimum(1.0)), x.map(|v| v.min(1.0))),
        ("rsub 2", s(g.rsub(2.0)), x.map(|v| 2.0 - v)),
        ("rdiv 3", s(g.rdiv(3.0)), x.map(|v| 3.0 / v)),
        ("f64 - tensor", s(2.0 - &g), x.map(|v| 2.0 - v)),
        ("f64 / tensor", s(3.0 / &g), x.map(|v| 3.0 / v)),
        ("f64 + tensor", s(1.25 + &g), x.map(|v| 1.25 + v)),
        ("f32 * tensor", s(2.0f32 * &g), x.map(|v| 2.0 * v)),
        ("f32 - tensor", s(0.5f32 - &g), x.map(|v| 0.5 - v)),
        ("tensor - f64", s(&g - 2.0), x.map(|v| v - 2.0)),
        ("tensor * i32", s(&g * 3), x.map(|v| v * 3.0)),
        ("tensor / f32", s(&g / 2.0f32), x.map(|v| v / 2.0)),
        ("-tensor", s(-&g), x.map(|v| -v)),
        ("tensor + tensor", s(&g + &g), x.map(|v| v + v)),
        ("owned tensor * tensor", s(g.clone() * &g), x.map(|v| v * v)),
    ];
    for (name, t, r) in cases {
        check(&t, &r, TRANS, TRANS, name);
    }
}

#[test]
fn pow_sign_conventions() {
    let base = [-2.0, -2.0, -3.0, -1.5, -2.0, 2.0, 0.0, -4.0, 5.0, -2.0];
    let expo = [3.0, 2.0, 3.0, 2.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.5];
    let b = upload(&RefTensor::new(base.to_vec(), &[10]));
    let e = upload(&RefTensor::new(expo.to_vec(), &[10]));
    let got = vals(&b.pow(&e).unwrap());
    let want = [-8.0, 4.0, -27.0, 2.25, -0.5, 2f64.sqrt(), 1.0, 1.0, 1.0, f64::NAN];
    assert_close_f32(&got, &want, 1e-6, 1e-6, "pow tensor exponent");
    let ints = upload(&RefTensor::new(vec![-2.0, -1.0, 0.0, 3.0], &[4]));
    assert_close_f32(&vals(&ints.powf(3.0).unwrap()), &[-8.0, -1.0, 0.0, 27.0], 1e-6, 1e-6, "powf 3");
    assert_close_f32(&vals(&ints.powf(2.0).unwrap()), &[4.0, 1.0, 0.0, 9.0], 1e-6, 1e-6, "powf 2");
    assert_close_f32(&vals(&ints.powf(0.0).unwrap()), &[1.0; 4], 0.0, 0.0, "x^0");
    let got = vals(&ints.powf(-1.0).unwrap());
    assert_close_f32(&got, &[-0.5, -1.0, f64::INFINITY, 1.0 / 3.0], 1e-6, 1e-6, "powf -1");
    // 0^y: 0 for y > 0, inf for y < 0, 1 for y = 0 (WGSL's pow leaves y <= 0 undefined).
    let zeros = upload(&RefTensor::zeros(&[6]));
    let e = upload(&RefTensor::new(vec![-1.0, -0.5, -2.0, 0.0, 0.5, 3.0], &[6]));
    let got = vals(&zeros.pow(&e).unwrap());
    let inf = f64::INFINITY;
    assert_close_f32(&got, &[inf, inf, inf, 1.0, 0.0, 0.0], 0.0, 0.0, "0^y, tensor exponent");
    assert_close_f32(&vals(&zeros.powf(-0.5).unwrap()), &[inf; 6], 0.0, 0.0, "0^-0.5");
    assert_close_f32(&vals(&zeros.powf(2.5).unwrap()), &[0.0; 6], 0.0, 0.0, "0^2.5");
}

// ------------------------------------------------------------------ comparisons, where, casts

#[test]
fn comparisons() {
    let a = ints(50, &[3, 1, 4], -2, 2);
    let b = ints(51, &[5, 1], -2, 2);
    let (ga, gb) = (upload(&a), upload(&b));
    let bool_f = |c: bool| if c { 1.0 } else { 0.0 };
    type Cmp = (&'static str, fn(&Tensor, &Tensor) -> wgrad::Result<Tensor>, fn(f64, f64) -> bool);
    let cases: [Cmp; 6] = [
        ("eq", |x, y| x.eq(y), |x, y| x == y),
        ("ne", |x, y| x.ne(y), |x, y| x != y),
        ("lt", |x, y| x.lt(y), |x, y| x < y),
        ("le", |x, y| x.le(y), |x, y| x <= y),
        ("gt", |x, y| x.gt(y), |x, y| x > y),
        ("ge", |x, y| x.ge(y), |x, y| x >= y),
    ];
    for (name, op, f) in cases {
        let want = a.zip(&b, |x, y| bool_f(f(x, y)));
        check_mask(&op(&ga, &gb).unwrap(), &want, name);
        let want = b.zip(&a, |x, y| bool_f(f(x, y)));
        check_mask(&op(&gb, &ga).unwrap(), &want, &format!("{name} swapped"));
    }
    check_mask(&ga.ge(0.0).unwrap(), &a.map(|x| bool_f(x >= 0.0)), "ge scalar");
    check_mask(&ga.eq(1).unwrap(), &a.map(|x| bool_f(x == 1.0)), "eq scalar");
    check_mask(&ga.lt(-1.0).unwrap(), &a.map(|x| bool_f(x < -1.0)), "lt scalar");
}

#[test]
fn where_with_broadcasting() {
    let c = ints(60, &[3, 1], 0, 1);
    let a = r32(61, &[1, 4], -1.0, 1.0);
    let b = r32(62, &[2, 3, 4], -1.0, 1.0);
    let mask = upload(&c).gt(0.5).unwrap();
    let (ga, gb) = (upload(&a), upload(&b));
    check(&wgrad::where_(&mask, &ga, &gb).unwrap(), &RefTensor::where_(&c, &a, &b), 0.0, 0.0, "where tensors");
    check(
        &wgrad::where_(&mask, 7.0, &gb).unwrap(),
        &RefTensor::where_(&c, &RefTensor::scalar(7.0), &b),
        0.0,
        0.0,
        "where scalar true",
    );
    check(
        &mask.where_(&ga, -3.0).unwrap(),
        &RefTensor::where_(&c, &a, &RefTensor::scalar(-3.0)),
        0.0,
        0.0,
        "where scalar false",
    );
    // A float mask: non-zero is true.
    let fm = RefTensor::new(vec![0.0, 2.5, -1.0, 0.0], &[4]);
    check(
        &wgrad::where_(&upload(&fm), &ga, 0.0).unwrap(),
        &RefTensor::where_(&fm, &a, &RefTensor::scalar(0.0)),
        0.0,
        0.0,
        "where float mask",
    );
}

#[test]
fn dtype_round_trip() {
    let x = RefTensor::from_f32(&[-2.7, -1.0, -0.5, 0.0, 0.5, 1.9, 3.0, 100.25], &[2, 4]);
    let g = upload(&x);
    let i = g.to_dtype(DType::I32).unwrap();
    assert_eq!(i.dtype(), DType::I32);
    assert_eq!(i.dims(), &[2, 4]);
    assert_eq!(i.to_vec::<i32>().unwrap(), vec![-2, -1, 0, 0, 0, 1, 3, 100]);
    let back = i.to_dtype(DType::F32).unwrap();
    check(&back, &x.map(f64::trunc), 0.0, 0.0, "f32 -> i32 -> f32");
    let same = g.to_dtype(DType::F32).unwrap();
    check(&same, &x, 0.0, 0.0, "f32 -> f32");
    let m = g.gt(0.0).unwrap().to_dtype(DType::F32).unwrap();
    check(&m, &x.map(|v| f64::from(u8::from(v > 0.0))), 0.0, 0.0, "mask -> f32");
    assert!(g.to_vec::<i32>().is_err());
}

// ------------------------------------------------------------------ reductions

#[test]
fn reductions_over_axes() {
    let x = r32(70, &[2, 3, 4, 5], -2.0, 2.0);
    let g = upload(&x);
    let axis_sets: [(&[isize], &[usize]); 7] = [
        (&[0], &[0]),
        (&[2], &[2]),
        (&[-1], &[3]),
        (&[0, 2], &[0, 2]),
        (&[-3, -1], &[1, 3]),
        (&[1, 2], &[1, 2]),
        (&[3, 0, 1], &[0, 1, 3]),
    ];
    for (axes, ref_axes) in axis_sets {
        for keepdim in [false, true] {
            let what = |op: &str| format!("{op} over {axes:?} keepdim {keepdim}");
            check(&g.sum(axes, keepdim).unwrap(), &x.sum(ref_axes, keepdim), RTOL, ATOL, &what("sum"));
            check(&g.mean(axes, keepdim).unwrap(), &x.mean(ref_axes, keepdim), RTOL, ATOL, &what("mean"));
            check(&g.max(axes, keepdim).unwrap(), &x.max(ref_axes, keepdim), 0.0, 0.0, &what("max"));
            check(&g.min(axes, keepdim).unwrap(), &ref_min(&x, ref_axes, keepdim), 0.0, 0.0, &what("min"));
        }
    }
    // No axes: an identity copy, as in NumPy.
    check(&g.sum(&[], false).unwrap(), &x, 0.0, 0.0, "sum over no axes");
    assert!(g.sum(&[4], false).is_err());
    assert!(g.sum(&[1, -3], false).is_err());
}

#[test]
fn reductions_of_non_contiguous_views() {
    let x = r32(71, &[6, 5], -2.0, 2.0);
    let g = upload(&x);
    let t = g.t().unwrap();
    let xt = x.transpose(0, 1);
    for (axes, ref_axes) in [(&[0isize][..], &[0usize][..]), (&[1], &[1]), (&[0, 1], &[0, 1])] {
        for keepdim in [false, true] {
            let what = format!("transposed, axes {axes:?} keepdim {keepdim}");
            check(&t.sum(axes, keepdim).unwrap(), &xt.sum(ref_axes, keepdim), RTOL, ATOL, &format!("sum {what}"));
            check(&t.mean(axes, keepdim).unwrap(), &xt.mean(ref_axes, keepdim), RTOL, ATOL, &format!("mean {what}"));
            check(&t.max(axes, keepdim).unwrap(), &xt.max(ref_axes, keepdim), 0.0, 0.0, &format!("max {what}"));
            check(&t.min(axes, keepdim).unwrap(), &ref_min(&xt, ref_axes, keepdim), 0.0, 0.0, &format!("min {what}"));
        }
    }
    // A narrowed view (non-zero offset) and a broadcast view.
    let n = g.narrow(0, 2, 3).unwrap();
    let xn = x.narrow(0, 2, 3);
    check(&n.sum(&[1], false).unwrap(), &xn.sum(&[1], false), RTOL, ATOL, "sum narrowed");
    check(&n.max(&[0], true).unwrap(), &xn.max(&[0], true), 0.0, 0.0, "max narrowed");
    let b = upload(&r32(72, &[1, 5], -1.0, 1.0));
    let rb = r32(72, &[1, 5], -1.0, 1.0).broadcast_to(&[4, 5]);
    check(
        &b.broadcast_to([4, 5]).unwrap().sum(&[0], false).unwrap(),
        &rb.sum(&[0], false),
        RTOL,
        ATOL,
        "sum of a broadcast view",
    );
}

#[test]
fn whole_tensor_reductions() {
    let x = r32(73, &[7, 9], -3.0, 3.0);
    let g = upload(&x);
    let s = g.sum_all().unwrap();
    assert_eq!(s.dims(), &[] as &[usize]);
    assert_close_f32(&vals(&s), &[x.sum_all()], RTOL, ATOL, "sum_all");
    let m = g.mean_all().unwrap();
    assert_close_f32(&vals(&m), &[x.sum_all() / 63.0], RTOL, ATOL, "mean_all");
    let mx = g.max_all().unwrap();
    assert_eq!(mx.dims(), &[] as &[usize]);
    assert_close_f32(&vals(&mx), &[x.max(&[0, 1], false).item()], 0.0, 0.0, "max_all");
    // Integer sums are exact.
    let i = Tensor::from_slice(&[1i32, -5, 7, 100, 3, 2], [2, 3], &device()).unwrap();
    assert_eq!(i.sum(&[1], false).unwrap().to_vec::<i32>().unwrap(), vec![3, 105]);
    assert_eq!(i.max(&[0], false).unwrap().to_vec::<i32>().unwrap(), vec![100, 3, 7]);
}

/// Long reductions go through several passes; integer-valued data keeps every partial sum exact.
#[test]
fn long_reductions_are_exact() {
    let dev = device();
    for n in [1usize << 18, 1 << 20] {
        let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let expected: f64 = data.iter().map(|&v| f64::from(v)).sum();
        let t = Tensor::from_slice(&data, [n], &dev).unwrap();
        assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64, expected, "sum_all of {n}");
        assert_eq!(t.max_all().unwrap().to_scalar::<f32>().unwrap(), 3.0);
        assert_eq!(t.min(&[0], false).unwrap().to_scalar::<f32>().unwrap(), -3.0);
    }
    // More than 65,535 workgroups of 256: the dispatch is split over two grid dimensions.
    let n = 65_535 * 256 + 17;
    let ones = Tensor::ones([n], DType::F32, &dev).unwrap();
    assert_eq!(ones.sum_all().unwrap().to_scalar::<f32>().unwrap(), n as f32, "sum_all of {n} ones");
    let data: Vec<f32> = (0..n).map(|i| (i % 3) as f32 - 1.0).collect();
    let expected: f64 = data.iter().map(|&v| f64::from(v)).sum();
    let t = Tensor::from_slice(&data, [n], &dev).unwrap();
    assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64, expected, "sum_all of {n} small ints");
    // Long reduced axes with several outputs, interleaved (b == 1) and blocked (b > 1).
    let (rows, cols) = (3usize, 70_001usize);
    let data: Vec<f32> = (0..rows * cols).map(|i| (i % 5) as f32 - 2.0).collect();
    let x = RefTensor::from_f32(&data, &[rows, cols]);
    let g = Tensor::from_slice(&data, [rows, cols], &dev).unwrap();
    check(&g.sum(&[1], false).unwrap(), &x.sum(&[1], false), 0.0, 0.0, "long rows");
    check(&g.t().unwrap().sum(&[0], false).unwrap(), &x.sum(&[1], false), 0.0, 0.0, "long cols, transposed");
    let xt = x.transpose(0, 1);
    let gt = g.t().unwrap().contiguous().unwrap();
    check(&gt.sum(&[0], true).unwrap(), &xt.sum(&[0], true), 0.0, 0.0, "long axis 0");
    check(&gt.max(&[0], false).unwrap(), &xt.max(&[0], false), 0.0, 0.0, "long max axis 0");
    // A long middle axis with outer and inner dims (three passes over [a, k, b]).
    let shape = [3usize, 20_001, 2];
    let data: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| (i % 9) as f32 - 4.0).collect();
    let x = RefTensor::from_f32(&data, &shape);
    let g = Tensor::from_slice(&data, shape, &dev).unwrap();
    check(&g.sum(&[1], false).unwrap(), &x.sum(&[1], false), 0.0, 0.0, "long middle axis");
    check(&g.min(&[1], true).unwrap(), &ref_min(&x, &[1], true), 0.0, 0.0, "long middle axis min");
}

// ------------------------------------------------------------------ matmul

#[test]
fn matmul_shapes() {
    let cases: [(&[usize], &[usize]); 9] = [
        (&[37, 53], &[53, 29]),
        (&[130, 20], &[20, 70]),
        (&[3, 7, 5], &[3, 5, 6]),
        (&[2, 1, 5, 4], &[3, 4, 6]),
        (&[4, 6], &[2, 6, 3]),
        (&[7, 5], &[5]),
        (&[5], &[5, 7]),
        (&[5], &[5]),
        (&[2, 3, 4], &[4]),
    ];
    for (i, (sa, sb)) in cases.iter().enumerate() {
        let a = r32(80 + i as u64, sa, -1.0, 1.0);
        let b = r32(90 + i as u64, sb, -1.0, 1.0);
        check(&upload(&a).matmul(&upload(&b)).unwrap(), &a.matmul(&b), RTOL, ATOL, &format!("matmul {sa:?} @ {sb:?}"));
    }
    let a = upload(&r32(1, &[3, 4], 0.0, 1.0));
    assert!(a.matmul(&a).is_err());
    assert!(a.matmul(&a.sum_all().unwrap()).is_err());
}

#[test]
fn matmul_of_views() {
    let a = r32(100, &[53, 37], -1.0, 1.0);
    let b = r32(101, &[29, 53], -1.0, 1.0);
    let (ga, gb) = (upload(&a), upload(&b));
    let (at, bt) = (a.transpose(0, 1), b.transpose(0, 1));
    check(&ga.t().unwrap().matmul(&gb.t().unwrap()).unwrap(), &at.matmul(&bt), RTOL, ATOL, "a^T @ b^T");
    let c = r32(102, &[37, 29], -1.0, 1.0);
    check(&ga.matmul(&upload(&c)).unwrap(), &a.matmul(&c), RTOL, ATOL, "a @ c");
    check(&ga.t().unwrap().matmul(&ga).unwrap(), &at.matmul(&a), RTOL, ATOL, "a^T @ a");
    // Batched, with a transposed last-two-dims view and a narrowed (offset) operand.
    let x = r32(103, &[3, 6, 5], -1.0, 1.0);
    let y = r32(104, &[3, 6, 4], -1.0, 1.0);
    let (gx, gy) = (upload(&x), upload(&y));
    check(
        &gx.transpose(-1, -2).unwrap().matmul(&gy).unwrap(),
        &x.transpose(1, 2).matmul(&y),
        RTOL,
        ATOL,
        "batched x^T @ y",
    );
    check(
        &gx.narrow(1, 2, 3).unwrap().matmul(&gy.narrow(1, 1, 5).unwrap()).unwrap(),
        &x.narrow(1, 2, 3).matmul(&y.narrow(1, 1, 5)),
        RTOL,
        ATOL,
        "narrowed operands",
    );
    // Row- and column-major A with dims that are multiples of 4 (and one
    // at an aligned offset), each with partial edge tiles of the 64x64
    // blocks both templates use.
    let a2 = r32(107, &[68, 36], -1.0, 1.0);
    let b2 = r32(108, &[68, 20], -1.0, 1.0);
    let c2 = r32(109, &[36, 76], -1.0, 1.0);
    let (ga2, gb2, gc2) = (upload(&a2), upload(&b2), upload(&c2));
    check(&ga2.t().unwrap().matmul(&gb2).unwrap(), &a2.transpose(0, 1).matmul(&b2), RTOL, ATOL, "a^T @ b, m % 4 == 0");
    check(&ga2.matmul(&gc2).unwrap(), &a2.matmul(&c2), RTOL, ATOL, "a @ c, k % 4 == 0");
    check(
        &ga2.narrow(0, 4, 60).unwrap().matmul(&gc2).unwrap(),
        &a2.narrow(0, 4, 60).matmul(&c2),
        RTOL,
        ATOL,
        "aligned offset, k % 4 == 0",
    );
    let x2 = r32(110, &[2, 8, 12], -1.0, 1.0);
    let y2 = r32(111, &[2, 8, 5], -1.0, 1.0);
    check(
        &upload(&x2).transpose(-1, -2).unwrap().matmul(&upload(&y2)).unwrap(),
        &x2.transpose(1, 2).matmul(&y2),
        RTOL,
        ATOL,
        "batched column-major A",
    );
    // A permuted batch (not collapsible to one batch stride).
    let p = r32(105, &[4, 2, 3, 5], -1.0, 1.0);
    let q = r32(106, &[2, 4, 5, 3], -1.0, 1.0);
    check(
        &upload(&p).permute(&[1, 0, 2, 3]).unwrap().matmul(&upload(&q)).unwrap(),
        &p.permute(&[1, 0, 2, 3]).matmul(&q),
        RTOL,
        ATOL,
        "permuted batch",
    );
}

// ------------------------------------------------------------------ movement

#[test]
fn movement_ops() {
    let x = r32(110, &[2, 3, 4], -1.0, 1.0);
    let g = upload(&x);
    let exact = |t: wgrad::Result<Tensor>, r: RefTensor, what: &str| check(&t.unwrap(), &r, 0.0, 0.0, what);
    exact(g.reshape([6, 4]), x.reshape(&[6, 4]), "reshape");
    exact(g.reshape([24]), x.reshape(&[24]), "reshape flat");
    exact(g.flatten_all(), x.reshape(&[24]), "flatten_all");
    exact(g.permute(&[2, 0, 1]), x.permute(&[2, 0, 1]), "permute");
    exact(g.transpose(0, 2), x.transpose(0, 2), "transpose");
    exact(g.transpose(-1, -2), x.transpose(1, 2), "transpose negative");
    // Reshape of non-contiguous views copies.
    exact(
        g.permute(&[2, 0, 1]).and_then(|t| t.reshape([4, 6])),
        x.permute(&[2, 0, 1]).reshape(&[4, 6]),
        "reshape of permuted",
    );
    exact(g.narrow(2, 1, 2).and_then(|t| t.reshape([12])), x.narrow(2, 1, 2).reshape(&[12]), "reshape of narrowed");
    let m = upload(&r32(111, &[4, 5], -1.0, 1.0));
    let rm = r32(111, &[4, 5], -1.0, 1.0);
    exact(m.t(), rm.transpose(0, 1), "t");
    exact(m.t().and_then(|t| t.contiguous()), rm.transpose(0, 1), "contiguous");
    assert!(m.t().unwrap().contiguous().unwrap().is_contiguous());
    // broadcast_to / expand.
    let c = r32(112, &[3, 1], -1.0, 1.0);
    let gc = upload(&c);
    exact(gc.broadcast_to([2, 3, 4]), c.broadcast_to(&[2, 3, 4]), "broadcast_to");
    exact(gc.expand([3, 5]), c.broadcast_to(&[3, 5]), "expand");
    assert!(gc.broadcast_to([2, 4]).is_err());
    // narrow / slice.
    exact(g.narrow(1, 1, 2), x.narrow(1, 1, 2), "narrow");
    exact(g.narrow(-1, 3, 1), x.narrow(2, 3, 1), "narrow last");
    exact(g.slice(0, 1..2), x.narrow(0, 1, 1), "slice");
    exact(g.slice(2, 1..4).and_then(|t| t.slice(1, 0..2)), x.narrow(2, 1, 3).narrow(1, 0, 2), "slice of slice");
    assert!(g.narrow(1, 2, 2).is_err());
    // squeeze / unsqueeze.
    let s = r32(113, &[3, 1, 4, 1], -1.0, 1.0);
    let gs = upload(&s);
    exact(gs.squeeze(1), s.squeeze(1), "squeeze 1");
    exact(gs.squeeze(-1), s.squeeze(3), "squeeze -1");
    assert!(gs.squeeze(0).is_err());
    exact(g.unsqueeze(0), x.unsqueeze(0), "unsqueeze 0");
    exact(g.unsqueeze(2), x.unsqueeze(2), "unsqueeze 2");
    exact(g.unsqueeze(-1), x.unsqueeze(3), "unsqueeze -1");
    exact(g.transpose(0, 2).and_then(|t| t.unsqueeze(1)), x.transpose(0, 2).unsqueeze(1), "unsqueeze of transposed");
    exact(
        m.t().and_then(|t| t.unsqueeze(0)).and_then(|t| t.squeeze(0)),
        rm.transpose(0, 1),
        "squeeze(unsqueeze(transposed))",
    );
    // Elementwise ops read views directly.
    check(
        &g.permute(&[2, 0, 1]).unwrap().exp().unwrap(),
        &x.permute(&[2, 0, 1]).map(f64::exp),
        TRANS,
        TRANS,
        "exp of permuted",
    );
    check(
        &g.narrow(1, 1, 2).unwrap().add(g.narrow(1, 0, 2).unwrap()).unwrap(),
        &x.narrow(1, 1, 2).add(&x.narrow(1, 0, 2)),
        RTOL,
        ATOL,
        "add of narrowed views",
    );
}

#[test]
fn cat_and_stack() {
    let a = r32(120, &[2, 3, 4], -1.0, 1.0);
    let b = r32(121, &[1, 3, 4], -1.0, 1.0);
    let c = r32(122, &[2, 5, 4], -1.0, 1.0);
    let (ga, gb, gc) = (upload(&a), upload(&b), upload(&c));
    let exact = |t: wgrad::Result<Tensor>, r: RefTensor, what: &str| check(&t.unwrap(), &r, 0.0, 0.0, what);
    exact(wgrad::cat(&[&ga, &gb], 0), RefTensor::cat(&[&a, &b], 0), "cat 0");
    exact(wgrad::cat(&[&ga, &gc, &ga], 1), RefTensor::cat(&[&a, &c, &a], 1), "cat middle");
    exact(wgrad::cat(&[&ga, &ga], -1), RefTensor::cat(&[&a, &a], 2), "cat last");
    exact(wgrad::cat(&[&ga], 0), a.clone(), "cat of one");
    // Non-contiguous inputs.
    let at = ga.transpose(0, 2).unwrap();
    exact(
        wgrad::cat(&[&at, &at.narrow(0, 1, 2).unwrap()], 0),
        RefTensor::cat(&[&a.transpose(0, 2), &a.transpose(0, 2).narrow(0, 1, 2)], 0),
        "cat of views",
    );
    assert!(wgrad::cat(&[&ga, &gc], 0).is_err());
    assert!(wgrad::cat(&[], 0).is_err());
    for dim in [0isize, 1, 2, 3, -1] {
        let rd = if dim < 0 { (dim + 4) as usize } else { dim as usize };
        exact(
            wgrad::stack(&[&ga, &ga.neg().unwrap(), &ga], dim),
            RefTensor::stack(&[&a, &a.map(|v| -v), &a], rd),
            &format!("stack {dim}"),
        );
    }
    assert!(wgrad::stack(&[&ga, &gb], 0).is_err());
}

/// More than 65,535 x 256 elements: the elementwise grid spills into a second dimension.
#[test]
fn huge_elementwise() {
    let n = 65_535 * 256 + 1000;
    let dev = device();
    let xs: Vec<f32> = uniform(130, n, -2.0, 2.0).iter().map(|&v| v as f32).collect();
    let ys: Vec<f32> = uniform(131, n, -2.0, 2.0).iter().map(|&v| v as f32).collect();
    let gx = Tensor::from_slice(&xs, [n], &dev).unwrap();
    let gy = Tensor::from_slice(&ys, [n], &dev).unwrap();
    let e: Vec<f64> = xs.iter().map(|&v| f64::from(v).exp()).collect();
    assert_close_f32(&vals(&gx.exp().unwrap()), &e, TRANS, TRANS, "huge exp");
    let s: Vec<f64> = xs.iter().zip(&ys).map(|(&a, &b)| f64::from(a) + f64::from(b)).collect();
    assert_close_f32(&vals(&gx.add(&gy).unwrap()), &s, RTOL, ATOL, "huge add");
    // A strided (broadcast) operand over the same grid.
    let row = Tensor::from_slice(&[0.5f32, -1.5], [2, 1], &dev).unwrap();
    let half = n / 2;
    let m = gx.narrow(0, 0, 2 * half).unwrap().reshape([2, half]).unwrap();
    let got = vals(&m.mul(&row).unwrap());
    let want: Vec<f64> = (0..2 * half).map(|i| f64::from(xs[i]) * if i < half { 0.5 } else { -1.5 }).collect();
    assert_close_f32(&got, &want, RTOL, ATOL, "huge broadcast mul");
}

// ------------------------------------------------------------------ creation

#[test]
fn creation_ops() {
    let dev = device();
    let a = Tensor::arange(0.0, 10.0, 1.0, &dev).unwrap();
    assert_eq!(a.dims(), &[10]);
    assert_eq!(vals(&a), (0..10).map(|i| i as f32).collect::<Vec<_>>());
    let a = Tensor::arange(1.5, 4.0, 0.5, &dev).unwrap();
    assert_close_f32(&vals(&a), &[1.5, 2.0, 2.5, 3.0, 3.5], 0.0, 0.0, "arange step 0.5");
    let a = Tensor::arange(5.0, 0.0, -1.5, &dev).unwrap();
    assert_close_f32(&vals(&a), &[5.0, 3.5, 2.0, 0.5], 0.0, 0.0, "arange negative step");
    assert_eq!(Tensor::arange(3.0, 3.0, 1.0, &dev).unwrap().numel(), 0);
    assert!(Tensor::arange(0.0, 1.0, 0.0, &dev).is_err());

    let f = Tensor::full([2, 3], 2.5, DType::F32, &dev).unwrap();
    assert_eq!(f.dims(), &[2, 3]);
    assert_eq!(vals(&f), vec![2.5; 6]);
    let z = Tensor::zeros([4], DType::F32, &dev).unwrap();
    assert_eq!(vals(&z), vec![0.0; 4]);
    let o = Tensor::ones([2, 2], DType::F32, &dev).unwrap();
    assert_eq!(vals(&o), vec![1.0; 4]);
    let i = Tensor::full([3], -7.0, DType::I32, &dev).unwrap();
    assert_eq!(i.to_vec::<i32>().unwrap(), vec![-7; 3]);
    let u = Tensor::ones([3], DType::U32, &dev).unwrap();
    assert_eq!(u.to_vec::<u32>().unwrap(), vec![1; 3]);
    let s = Tensor::full([], 4.0, DType::F32, &dev).unwrap();
    assert_eq!(s.to_scalar::<f32>().unwrap(), 4.0);
    assert_eq!(vals(&o.zeros_like().unwrap()), vec![0.0; 4]);
    assert_eq!(vals(&z.ones_like().unwrap()), vec![1.0; 4]);
    assert!(Tensor::from_slice(&[1.0f32, 2.0], [3], &dev).is_err());
}

#[test]
fn random_determinism_and_moments() {
    let dev = device();
    let n = 100_000;
    let u1 = vals(&Tensor::rand([n], 7, &dev).unwrap());
    let u2 = vals(&Tensor::rand([n], 7, &dev).unwrap());
    let u3 = vals(&Tensor::rand([n], 8, &dev).unwrap());
    assert_eq!(u1, u2, "rand: same seed, same values");
    assert_ne!(u1, u3, "rand: different seeds differ");
    let differing = u1.iter().zip(&u3).filter(|(a, b)| a != b).count();
    assert!(differing > n * 99 / 100, "rand seeds 7 and 8 share {} values", n - differing);
    assert!(u1.iter().all(|&v| (0.0..1.0).contains(&v)), "rand outside [0, 1)");
    let mean = u1.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    assert!((mean - 0.5).abs() < 0.01, "rand mean {mean}");
    // Seeds differing only in the high word differ too.
    let hi = vals(&Tensor::rand([1000], 7 | (1 << 40), &dev).unwrap());
    assert_ne!(&u1[..1000], hi.as_slice());
    // Counter-based: a shape's values don't depend on the size of the request.
    let small = vals(&Tensor::rand([2, 50], 7, &dev).unwrap());
    assert_eq!(small.as_slice(), &u1[..100]);

    let g1 = vals(&Tensor::randn([n], 3, &dev).unwrap());
    let g2 = vals(&Tensor::randn([n], 3, &dev).unwrap());
    let g3 = vals(&Tensor::randn([n], 4, &dev).unwrap());
    assert_eq!(g1, g2, "randn: same seed, same values");
    assert_ne!(g1, g3, "randn: different seeds differ");
    assert!(g1.iter().all(|v| v.is_finite()));
    let mean = g1.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let var = g1.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(mean.abs() < 0.02, "randn mean {mean}");
    assert!((var.sqrt() - 1.0).abs() < 0.02, "randn std {}", var.sqrt());
    let tails = g1.iter().filter(|v| v.abs() > 2.0).count() as f64 / n as f64;
    assert!((tails - 0.0455).abs() < 0.005, "randn P(|z| > 2) = {tails}");
    let r = Tensor::randn([3, 4], 1, &dev).unwrap();
    assert_eq!(r.dims(), &[3, 4]);
    assert_eq!(r.dtype(), DType::F32);
}
