//! Analytic gradients (GPU, f32, `backward()`) against central finite differences of the f64
//! CPU reference, for every differentiable op.
//!
//! Each check builds `loss = sum(op(inputs) * R)` for a fixed random `R` of the output's shape,
//! so every output element contributes a different weight to the gradient.

mod common;
use common::gradcheck::*;
use common::reference::*;
use common::upload;
use wgrad::{BackwardOptions, DType, Tensor};

/// Magnitudes in [lo, hi) with random signs: data away from zero (for kinks at 0).
fn signed(seed: u64, shape: &[usize], lo: f64, hi: f64) -> RefTensor {
    let mag = rand_tensor(seed, shape, lo, hi);
    let sign = rand_tensor(seed ^ 0x5555, shape, -1.0, 1.0);
    let t = mag.zip(&sign, |m, s| if s < 0.0 { -m } else { m });
    RefTensor::from_f32(&t.to_f32(), shape)
}

/// Moves values within `gap` of any of `points` away from them (kinks of clamp, maximum, ...).
fn avoid(t: &RefTensor, points: &[f64], gap: f64) -> RefTensor {
    let moved = t.map(|v| {
        let mut v = v;
        for &p in points {
            if (v - p).abs() < gap {
                v = if v >= p { p + gap } else { p - gap };
            }
        }
        v
    });
    RefTensor::from_f32(&moved.to_f32(), &t.shape)
}

fn ref_min(t: &RefTensor, axes: &[usize], keepdim: bool) -> RefTensor {
    t.map(|x| -x).max(axes, keepdim).map(|x| -x)
}

fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

// ------------------------------------------------------------------ unary

#[test]
fn unary_ops() {
    type Case = (&'static str, fn(&Tensor) -> wgrad::Result<Tensor>, fn(f64) -> f64);
    let any: Vec<Case> = vec![
        ("neg", Tensor::neg, |v| -v),
        ("exp", Tensor::exp, f64::exp),
        ("tanh", Tensor::tanh, f64::tanh),
        ("sigmoid", Tensor::sigmoid, sigmoid),
        ("sin", Tensor::sin, f64::sin),
        ("cos", Tensor::cos, f64::cos),
        ("erf", Tensor::erf, erf),
        ("gelu_tanh", Tensor::gelu_tanh, gelu_tanh),
        ("gelu", Tensor::gelu, gelu_erf),
        ("square", Tensor::square, |v| v * v),
    ];
    let positive: Vec<Case> = vec![
        ("log", Tensor::log, f64::ln),
        ("sqrt", Tensor::sqrt, f64::sqrt),
        ("rsqrt", Tensor::rsqrt, |v| 1.0 / v.sqrt()),
    ];
    let kinked: Vec<Case> =
        vec![("relu", Tensor::relu, |v| v.max(0.0)), ("abs", Tensor::abs, f64::abs), ("sign", Tensor::sign, sign)];
    for (i, shape) in [&[3usize, 4][..], &[2, 3, 4]].into_iter().enumerate() {
        let s = i as u64;
        for (name, op, f) in &any {
            let x = r32(100 + s, shape, -2.5, 2.5);
            gradcheck(&format!("{name} {shape:?}"), &[x], |t| op(&t[0]), |r| r[0].map(f));
        }
        for (name, op, f) in &positive {
            let x = r32(200 + s, shape, 0.2, 3.0);
            gradcheck(&format!("{name} {shape:?}"), &[x], |t| op(&t[0]), |r| r[0].map(f));
        }
        for (name, op, f) in &kinked {
            let x = signed(300 + s, shape, 0.1, 2.0);
            gradcheck(&format!("{name} {shape:?}"), &[x], |t| op(&t[0]), |r| r[0].map(f));
        }
    }
}

#[test]
fn clamp() {
    let x = avoid(&r32(400, &[4, 5], -2.0, 2.0), &[-0.7, 0.4], 0.02);
    gradcheck("clamp", std::slice::from_ref(&x), |t| t[0].clamp(-0.7, 0.4), |r| r[0].map(|v| v.clamp(-0.7, 0.4)));
    // A non-contiguous input.
    gradcheck(
        "clamp of transposed",
        &[x],
        |t| t[0].t()?.clamp(-0.7, 0.4),
        |r| r[0].transpose(0, 1).map(|v| v.clamp(-0.7, 0.4)),
    );
}

// ------------------------------------------------------------------ binary

type BinCase = (&'static str, fn(&Tensor, &Tensor) -> wgrad::Result<Tensor>, fn(f64, f64) -> f64);

#[test]
fn binary_ops_with_broadcasting() {
    let cases: [BinCase; 7] = [
        ("add", |a, b| a.add(b), |x, y| x + y),
        ("sub", |a, b| a.sub(b), |x, y| x - y),
        ("mul", |a, b| a.mul(b), |x, y| x * y),
        ("div", |a, b| a.div(b), |x, y| x / y),
        ("pow", |a, b| a.pow(b), f64::powf),
        ("maximum", |a, b| a.maximum(b), f64::max),
        ("minimum", |a, b| a.minimum(b), f64::min),
    ];
    let shapes: [(&[usize], &[usize]); 5] =
        [(&[3, 4], &[3, 4]), (&[3, 1, 4], &[5, 1]), (&[4], &[2, 3, 4]), (&[2, 3, 4], &[3, 1]), (&[2, 1], &[])];
    for (i, (sa, sb)) in shapes.into_iter().enumerate() {
        let s = i as u64;
        for (name, op, f) in cases {
            // pow: positive base; div: divisor away from zero.
            let (a, b) = match name {
                "pow" => (r32(500 + s, sa, 0.3, 2.0), r32(510 + s, sb, -1.5, 1.5)),
                "div" => (r32(520 + s, sa, -2.0, 2.0), signed(530 + s, sb, 0.5, 2.0)),
                _ => (r32(540 + s, sa, -2.0, 2.0), r32(550 + s, sb, -2.0, 2.0)),
            };
            gradcheck(&format!("{name} {sa:?} vs {sb:?}"), &[a, b], |t| op(&t[0], &t[1]), |r| r[0].zip(&r[1], f));
        }
    }
}

#[test]
fn binary_ops_with_scalars() {
    type Case = (&'static str, fn(&Tensor) -> wgrad::Result<Tensor>, fn(f64) -> f64);
    let cases: [Case; 16] = [
        ("add 2.5", |t| t.add(2.5), |v| v + 2.5),
        ("sub 1.5", |t| t.sub(1.5), |v| v - 1.5),
        ("mul -3", |t| t.mul(-3.0), |v| v * -3.0),
        ("div 4", |t| t.div(4.0), |v| v / 4.0),
        ("powf 3", |t| t.powf(3.0), |v| v.powi(3)),
        ("pow 2 (i32)", |t| t.pow(2), |v| v * v),
        ("maximum 0.3", |t| t.maximum(0.3), |v| v.max(0.3)),
        ("minimum 0.3", |t| t.minimum(0.3), |v| v.min(0.3)),
        ("rsub 2", |t| t.rsub(2.0), |v| 2.0 - v),
        ("rdiv 3", |t| t.rdiv(3.0), |v| 3.0 / v),
        ("f64 - tensor", |t| 2.0 - t, |v| 2.0 - v),
        ("f64 / tensor", |t| 3.0 / t, |v| 3.0 / v),
        ("f32 * tensor", |t| 1.5f32 * t, |v| 1.5 * v),
        ("f64 + tensor", |t| 0.5 + t, |v| 0.5 + v),
        ("tensor / f64", |t| t / 2.0, |v| v / 2.0),
        ("-tensor", |t| -t, |v| -v),
    ];
    for (name, op, f) in cases {
        // Away from 0 (rdiv) and from the 0.3 kink (maximum / minimum); both signs (powf 3).
        let x = avoid(&signed(600, &[3, 4], 0.2, 2.0), &[0.3], 0.05);
        gradcheck(name, &[x], |t| op(&t[0]), |r| r[0].map(f));
    }
    let x = r32(601, &[2, 5], 0.3, 2.0);
    gradcheck("powf 2.5", std::slice::from_ref(&x), |t| t[0].powf(2.5), |r| r[0].map(|v| v.powf(2.5)));
    gradcheck("powf -1.5", &[x], |t| t[0].powf(-1.5), |r| r[0].map(|v| v.powf(-1.5)));
}

#[test]
fn pow_with_tensor_exponent() {
    let base = r32(700, &[3, 4], 0.3, 2.5);
    let expo = r32(701, &[3, 4], -2.0, 2.0);
    gradcheck("pow tensor^tensor", &[base.clone(), expo], |t| t[0].pow(&t[1]), |r| r[0].zip(&r[1], f64::powf));
    // Exponent broadcast against the base.
    let e = r32(702, &[4], -1.0, 3.0);
    gradcheck("pow broadcast exponent", &[base, e], |t| t[0].pow(&t[1]), |r| r[0].zip(&r[1], f64::powf));
}

// ------------------------------------------------------------------ where, casts

#[test]
fn where_to_both_branches() {
    let c = rand_tensor(800, &[3, 1], 0.0, 2.0).map(f64::floor);
    let c = if c.data.iter().all(|&v| v == c.data[0]) { RefTensor::new(vec![1.0, 0.0, 1.0], &[3, 1]) } else { c };
    let mask = upload(&c).gt(0.5).unwrap();
    let a = r32(801, &[1, 4], -1.0, 1.0);
    let b = r32(802, &[2, 3, 4], -1.0, 1.0);
    gradcheck(
        "where broadcast",
        &[a.clone(), b.clone()],
        |t| wgrad::where_(&mask, &t[0], &t[1]),
        |r| RefTensor::where_(&c, &r[0], &r[1]),
    );
    gradcheck(
        "where scalar false",
        std::slice::from_ref(&a),
        |t| wgrad::where_(&mask, &t[0], -2.0),
        |r| RefTensor::where_(&c, &r[0], &RefTensor::scalar(-2.0)),
    );
    gradcheck(
        "where scalar true",
        std::slice::from_ref(&b),
        |t| mask.where_(3.0, &t[0]),
        |r| RefTensor::where_(&c, &RefTensor::scalar(3.0), &r[0]),
    );
    // The mask computed from a differentiable tensor carries no gradient itself.
    let x = signed(803, &[3, 4], 0.1, 1.0);
    gradcheck(
        "where(x > 0, x, 2x)",
        &[x],
        |t| wgrad::where_(&t[0].gt(0.0)?, &t[0], &t[0].mul(2.0)?),
        |r| r[0].map(|v| if v > 0.0 { v } else { 2.0 * v }),
    );
}

#[test]
fn to_dtype_identity() {
    let x = r32(900, &[3, 4], -1.0, 1.0);
    gradcheck("to_dtype f32 -> f32", std::slice::from_ref(&x), |t| t[0].to_dtype(DType::F32), |r| r[0].clone());
    gradcheck(
        "to_dtype inside a graph",
        &[x],
        |t| t[0].mul(2.0)?.to_dtype(DType::F32)?.exp(),
        |r| r[0].map(|v| (2.0 * v).exp()),
    );
}

// ------------------------------------------------------------------ reductions

#[test]
fn reductions() {
    let x = r32(1000, &[2, 3, 4], -2.0, 2.0);
    let axis_sets: [(&[isize], &[usize]); 5] =
        [(&[0], &[0]), (&[1, 2], &[1, 2]), (&[-1], &[2]), (&[0, 2], &[0, 2]), (&[0, 1, 2], &[0, 1, 2])];
    for (axes, ra) in axis_sets {
        for keepdim in [false, true] {
            let what = |op: &str| format!("{op} {axes:?} keepdim {keepdim}");
            gradcheck(&what("sum"), std::slice::from_ref(&x), |t| t[0].sum(axes, keepdim), |r| r[0].sum(ra, keepdim));
            gradcheck(
                &what("mean"),
                std::slice::from_ref(&x),
                |t| t[0].mean(axes, keepdim),
                |r| r[0].mean(ra, keepdim),
            );
            gradcheck(&what("max"), std::slice::from_ref(&x), |t| t[0].max(axes, keepdim), |r| r[0].max(ra, keepdim));
            gradcheck(
                &what("min"),
                std::slice::from_ref(&x),
                |t| t[0].min(axes, keepdim),
                |r| ref_min(&r[0], ra, keepdim),
            );
        }
    }
    gradcheck("sum_all", std::slice::from_ref(&x), |t| t[0].sum_all(), |r| RefTensor::scalar(r[0].sum_all()));
    gradcheck("mean_all", std::slice::from_ref(&x), |t| t[0].mean_all(), |r| RefTensor::scalar(r[0].sum_all() / 24.0));
    gradcheck("max_all", std::slice::from_ref(&x), |t| t[0].max_all(), |r| r[0].max(&[0, 1, 2], false));
    // Reductions of a non-contiguous view.
    gradcheck(
        "sum of permuted",
        std::slice::from_ref(&x),
        |t| t[0].permute(&[2, 0, 1])?.sum(&[1], false),
        |r| r[0].permute(&[2, 0, 1]).sum(&[1], false),
    );
    gradcheck(
        "max of transposed",
        &[x],
        |t| t[0].transpose(0, 2)?.max(&[0], true),
        |r| r[0].transpose(0, 2).max(&[0], true),
    );
}

// ------------------------------------------------------------------ matmul

#[test]
fn matmul() {
    let cases: [(&[usize], &[usize]); 7] = [
        (&[4, 5], &[5, 3]),
        (&[3, 4, 5], &[3, 5, 2]),
        (&[2, 1, 3, 4], &[3, 4, 2]),
        (&[4, 5], &[2, 5, 3]),
        (&[4, 5], &[5]),
        (&[5], &[5, 3]),
        (&[5], &[5]),
    ];
    for (i, (sa, sb)) in cases.into_iter().enumerate() {
        let s = i as u64;
        let (a, b) = (r32(1100 + s, sa, -1.0, 1.0), r32(1110 + s, sb, -1.0, 1.0));
        gradcheck(&format!("matmul {sa:?} @ {sb:?}"), &[a, b], |t| t[0].matmul(&t[1]), |r| r[0].matmul(&r[1]));
    }
    let a = r32(1120, &[5, 4], -1.0, 1.0);
    let b = r32(1121, &[3, 5], -1.0, 1.0);
    gradcheck(
        "matmul of transposed views",
        &[a, b],
        |t| t[0].t()?.matmul(&t[1].t()?),
        |r| r[0].transpose(0, 1).matmul(&r[1].transpose(0, 1)),
    );
}

// ------------------------------------------------------------------ movement

#[test]
fn movement_ops() {
    let x = r32(1200, &[2, 3, 4], -1.0, 1.0);
    let one = |name: &str, g: &dyn Fn(&Tensor) -> wgrad::Result<Tensor>, r: &dyn Fn(&RefTensor) -> RefTensor| {
        gradcheck(name, std::slice::from_ref(&x), |t| g(&t[0]), |rs| r(&rs[0]))
    };
    one("reshape", &|t| t.reshape([6, 4]), &|r| r.reshape(&[6, 4]));
    one("reshape of permuted", &|t| t.permute(&[2, 0, 1])?.reshape([4, 6]), &|r| {
        r.permute(&[2, 0, 1]).reshape(&[4, 6])
    });
    one("permute", &|t| t.permute(&[1, 2, 0]), &|r| r.permute(&[1, 2, 0]));
    one("transpose", &|t| t.transpose(0, -1), &|r| r.transpose(0, 2));
    one("narrow", &|t| t.narrow(2, 1, 2), &|r| r.narrow(2, 1, 2));
    one("slice", &|t| t.slice(1, 1..3), &|r| r.narrow(1, 1, 2));
    one("narrow of narrow", &|t| t.narrow(0, 1, 1)?.narrow(-1, 0, 3), &|r| r.narrow(0, 1, 1).narrow(2, 0, 3));
    one("unsqueeze", &|t| t.unsqueeze(1), &|r| r.unsqueeze(1));
    one("squeeze", &|t| t.narrow(1, 2, 1)?.squeeze(1), &|r| r.narrow(1, 2, 1).squeeze(1));
    one("contiguous of transposed", &|t| t.transpose(0, 2)?.contiguous(), &|r| r.transpose(0, 2));
    one("flatten_all", &|t| t.flatten_all(), &|r| r.reshape(&[24]));

    let c = r32(1201, &[3, 1], -1.0, 1.0);
    gradcheck(
        "broadcast_to",
        std::slice::from_ref(&c),
        |t| t[0].broadcast_to([2, 3, 4]),
        |r| r[0].broadcast_to(&[2, 3, 4]),
    );
    gradcheck("expand", &[c], |t| t[0].expand([3, 5]), |r| r[0].broadcast_to(&[3, 5]));
    let s = r32(1202, &[3, 1, 4], -1.0, 1.0);
    gradcheck("squeeze middle", &[s], |t| t[0].squeeze(-2), |r| r[0].squeeze(1));
}

#[test]
fn cat_and_stack() {
    let a = r32(1300, &[2, 3, 4], -1.0, 1.0);
    let b = r32(1301, &[1, 3, 4], -1.0, 1.0);
    let c = r32(1302, &[2, 2, 4], -1.0, 1.0);
    gradcheck(
        "cat 0",
        &[a.clone(), b.clone()],
        |t| wgrad::cat(&[&t[0], &t[1]], 0),
        |r| RefTensor::cat(&[&r[0], &r[1]], 0),
    );
    gradcheck(
        "cat middle, three inputs",
        &[a.clone(), c.clone(), a.narrow(1, 0, 1)],
        |t| wgrad::cat(&[&t[0], &t[1], &t[2]], 1),
        |r| RefTensor::cat(&[&r[0], &r[1], &r[2]], 1),
    );
    gradcheck(
        "cat of the same tensor twice",
        std::slice::from_ref(&c),
        |t| wgrad::cat(&[&t[0], &t[0].transpose(0, 1)?], -1),
        |r| RefTensor::cat(&[&r[0], &r[0].transpose(0, 1)], 2),
    );
    for dim in [0isize, 2, -1] {
        let rd = if dim < 0 { (dim + 4) as usize } else { dim as usize };
        gradcheck(
            &format!("stack {dim}"),
            &[a.clone(), a.map(|v| v * 0.5 + 0.1)],
            |t| wgrad::stack(&[&t[0], &t[1]], dim),
            |r| RefTensor::stack(&[&r[0], &r[1]], rd),
        );
    }
}

// ------------------------------------------------------------------ composite graphs

#[test]
fn composite_graphs() {
    // x used three times in one expression.
    let x = r32(1400, &[3, 4], -1.5, 1.5);
    gradcheck(
        "x*x + exp(x)*sin(x)",
        std::slice::from_ref(&x),
        |t| {
            let x = &t[0];
            x.mul(x)?.add(&x.exp()?.mul(&x.sin()?)?)
        },
        |r| r[0].map(|v| v * v + v.exp() * v.sin()),
    );
    // x used through matmul, a transpose and a broadcast reduction.
    gradcheck(
        "x @ x^T + sum(x, 1)",
        std::slice::from_ref(&x),
        |t| {
            let x = &t[0];
            x.matmul(&x.t()?)?.add(&x.sum(&[1], true)?)
        },
        |r| r[0].matmul(&r[0].transpose(0, 1)).add(&r[0].sum(&[1], true)),
    );
    // Layer norm without affine: x - mean(x) appears in numerator and variance.
    gradcheck(
        "layer norm",
        std::slice::from_ref(&x),
        |t| {
            let x = &t[0];
            let centered = x.sub(&x.mean(&[-1], true)?)?;
            let var = centered.square()?.mean(&[-1], true)?;
            centered.mul(&var.add(1e-5)?.rsqrt()?)
        },
        |r| {
            let x = &r[0];
            let centered = x.sub(&x.mean(&[1], true));
            let var = centered.map(|v| v * v).mean(&[1], true);
            centered.mul(&var.map(|v| 1.0 / (v + 1e-5).sqrt()))
        },
    );
    // Numerically stable softmax through max, exp, sum and div.
    gradcheck(
        "softmax",
        std::slice::from_ref(&x),
        |t| {
            let x = &t[0];
            let e = x.sub(&x.max(&[1], true)?)?.exp()?;
            e.div(&e.sum(&[1], true)?)
        },
        |r| r[0].softmax(1),
    );
    // Two inputs with broadcasting, each used several times.
    let w = r32(1401, &[4], 0.5, 1.5);
    gradcheck(
        "tanh(x*w) * w + x / w",
        &[x, w],
        |t| {
            let (x, w) = (&t[0], &t[1]);
            x.mul(w)?.tanh()?.mul(w)?.add(&x.div(w)?)
        },
        |r| r[0].mul(&r[1]).map(f64::tanh).mul(&r[1]).add(&r[0].div(&r[1])),
    );
}

/// `wgrad::grad` returns the same gradients as `backward()`, without touching `.grad`.
#[test]
fn functional_grad_matches_numeric() {
    let x = r32(1500, &[3, 4], -1.0, 1.0);
    let y = r32(1501, &[4, 2], -1.0, 1.0);
    let r = r32(1502, &[3, 2], -1.0, 1.0);
    let f = |xs: &[RefTensor]| xs[0].matmul(&xs[1]).map(f64::tanh).mul(&r).sum_all();
    let numeric = numeric_grad(f, &[x.clone(), y.clone()], H);
    let gx = upload(&x).requires_grad(true).unwrap();
    let gy = upload(&y).requires_grad(true).unwrap();
    let loss = gx.matmul(&gy).unwrap().tanh().unwrap().mul(upload(&r)).unwrap().sum_all().unwrap();
    let grads = wgrad::grad(&[&loss], &[&gx, &gy], None, BackwardOptions::default()).unwrap();
    for (i, (g, want)) in grads.iter().zip(&numeric).enumerate() {
        let g = g.as_ref().unwrap_or_else(|| panic!("grad() returned no gradient for input {i}"));
        assert_close_f32_shaped(&g.to_vec::<f32>().unwrap(), g.dims(), want, RTOL, ATOL, &format!("grad() input {i}"));
    }
    assert!(gx.grad().is_none() && gy.grad().is_none(), "grad() must not accumulate into .grad");
}

/// Gradient of `sum(f(x))` for exact inputs (conventions at kinks and edges, not finite differences).
fn grad_of(f: impl Fn(&Tensor) -> wgrad::Result<Tensor>, data: &[f32]) -> Vec<f32> {
    let x = Tensor::from_slice(data, [data.len()], &common::device()).unwrap().requires_grad(true).unwrap();
    f(&x).unwrap().sum_all().unwrap().backward().unwrap();
    x.grad().unwrap().to_vec::<f32>().unwrap()
}

/// PyTorch's conventions where finite differences can't be used.
#[test]
fn gradient_conventions_at_kinks_and_edges() {
    // Ties split evenly (amax / maximum), relu and abs have gradient 0 at 0, clamp passes at its bounds.
    assert_eq!(grad_of(|x| x.max(&[0], false), &[1.0, 3.0, 3.0]), vec![0.0, 0.5, 0.5]);
    assert_eq!(grad_of(|x| x.min(&[0], false), &[1.0, 1.0, 3.0, 1.0]), vec![1.0 / 3.0, 1.0 / 3.0, 0.0, 1.0 / 3.0]);
    assert_eq!(grad_of(|x| x.maximum(1.0), &[1.0, 3.0, 0.0]), vec![0.5, 1.0, 0.0]);
    assert_eq!(grad_of(|x| x.minimum(1.0), &[1.0, 3.0, 0.0]), vec![0.5, 0.0, 1.0]);
    assert_eq!(grad_of(|x| x.relu(), &[0.0, 1.0, -1.0]), vec![0.0, 1.0, 0.0]);
    assert_eq!(grad_of(|x| x.abs(), &[0.0, -2.0, 2.0]), vec![0.0, -1.0, 1.0]);
    assert_eq!(grad_of(|x| x.clamp(-1.0, 1.0), &[-1.0, 1.0, 2.0, -2.0, 0.5]), vec![1.0, 1.0, 0.0, 0.0, 1.0]);
    // pow at a zero base: d/dx x^0 = 0, d/dx x^1 = 1, d/dx x^2 = 0 at x = 0; d/dx x^3 = 3x^2 for x < 0.
    assert_eq!(grad_of(|x| x.powf(0.0), &[0.0, 2.0, -1.0]), vec![0.0, 0.0, 0.0]);
    assert_eq!(grad_of(|x| x.powf(1.0), &[0.0, 2.0]), vec![1.0, 1.0]);
    assert_eq!(grad_of(|x| x.powf(2.0), &[0.0, -2.0]), vec![0.0, -4.0]);
    assert_eq!(grad_of(|x| x.powf(3.0), &[0.0, -2.0]), vec![0.0, 12.0]);
    assert_eq!(grad_of(|x| x.powf(0.5), &[0.0, 4.0]), vec![f32::INFINITY, 0.25]);
    // Tensor exponent at a zero base (PyTorch): d/db 0^b = 0 for b >= 0, d/da 0^0 = 0.
    let dev = common::device();
    let a = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 2.0], [4], &dev).unwrap().requires_grad(true).unwrap();
    let b = Tensor::from_slice(&[0.0f32, 2.0, 0.5, 0.0], [4], &dev).unwrap().requires_grad(true).unwrap();
    a.pow(&b).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(a.grad().unwrap().to_vec::<f32>().unwrap(), vec![0.0, 0.0, f32::INFINITY, 0.0]);
    let db = b.grad().unwrap().to_vec::<f32>().unwrap();
    assert_eq!(&db[..3], &[0.0, 0.0, 0.0]);
    assert!((db[3] - 2f32.ln()).abs() < 1e-6, "d/db 2^b at b = 0: {}", db[3]);
}
