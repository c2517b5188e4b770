//! Tests of the f64 CPU reference itself, against hand-computed values and explicit loops.

mod common;
use common::reference::*;

fn t(data: &[f64], shape: &[usize]) -> RefTensor {
    RefTensor::new(data.to_vec(), shape)
}

fn arange(shape: &[usize]) -> RefTensor {
    let n: usize = shape.iter().product();
    RefTensor::new((0..n).map(|i| i as f64).collect(), shape)
}

// ------------------------------------------------------------------ construction & shapes

#[test]
fn construction() {
    let s = RefTensor::scalar(2.5);
    assert_eq!(s.shape, Vec::<usize>::new());
    assert_eq!(s.numel(), 1);
    assert_eq!(s.item(), 2.5);
    let z = RefTensor::zeros(&[2, 3]);
    assert_eq!(z.data, vec![0.0; 6]);
    assert_eq!(RefTensor::zeros(&[2, 0, 3]).numel(), 0);
    let a = arange(&[2, 3]);
    assert_eq!(a.at(&[1, 2]), 5.0);
    assert_eq!(a.at(&[0, 1]), 1.0);
    assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
    assert_eq!(unravel_index(17, &[2, 3, 4]), vec![1, 1, 1]);
    assert_eq!(ravel_index(&[1, 1, 1], &[2, 3, 4]), 17);
    assert_eq!(RefTensor::from_f32(&[1.5, -2.0], &[2]).data, vec![1.5, -2.0]);
    assert_eq!(t(&[1.5, 0.1], &[2]).to_f32(), vec![1.5f32, 0.1f32]);
}

#[test]
#[should_panic(expected = "do not fit shape")]
fn new_rejects_wrong_size() {
    let _ = RefTensor::new(vec![1.0, 2.0, 3.0], &[2, 2]);
}

#[test]
fn broadcasting_rules() {
    assert_eq!(broadcast_shapes(&[], &[]), Some(vec![]));
    assert_eq!(broadcast_shapes(&[3], &[]), Some(vec![3]));
    assert_eq!(broadcast_shapes(&[], &[2, 3]), Some(vec![2, 3]));
    assert_eq!(broadcast_shapes(&[2, 1], &[1, 3]), Some(vec![2, 3]));
    assert_eq!(broadcast_shapes(&[4, 1, 5], &[3, 1]), Some(vec![4, 3, 5]));
    assert_eq!(broadcast_shapes(&[8, 1, 6, 1], &[7, 1, 5]), Some(vec![8, 7, 6, 5]));
    assert_eq!(broadcast_shapes(&[0, 1], &[1, 4]), Some(vec![0, 4]));
    assert_eq!(broadcast_shapes(&[1], &[0]), Some(vec![0]));
    assert_eq!(broadcast_shapes(&[3], &[4]), None);
    assert_eq!(broadcast_shapes(&[2, 1], &[8, 4, 3]), None);
    assert_eq!(broadcast_shapes(&[0], &[2]), None);
}

#[test]
fn zip_broadcasts() {
    let a = t(&[1.0, 2.0], &[2, 1]);
    let b = t(&[10.0, 20.0, 30.0], &[3]);
    let c = a.zip(&b, |x, y| x + y);
    assert_eq!(c.shape, vec![2, 3]);
    assert_eq!(c.data, vec![11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
    let d = RefTensor::scalar(2.0).zip(&arange(&[2, 2]), |x, y| x * y);
    assert_eq!(d, t(&[0.0, 2.0, 4.0, 6.0], &[2, 2]));
    assert_eq!(a.sub(&b).data, vec![-9.0, -19.0, -29.0, -8.0, -18.0, -28.0]);
    assert_eq!(a.mul(&b).data, vec![10.0, 20.0, 30.0, 20.0, 40.0, 60.0]);
    assert_eq!(b.div(&a).data, vec![10.0, 20.0, 30.0, 5.0, 10.0, 15.0]);
    assert_eq!(arange(&[3]).map(|x| x * x).data, vec![0.0, 1.0, 4.0]);
}

#[test]
#[should_panic(expected = "do not broadcast")]
fn zip_rejects_incompatible() {
    let _ = arange(&[2, 3]).add(&arange(&[2]));
}

#[test]
fn where_three_way_broadcast() {
    let cond = t(&[1.0, 0.0, -0.5], &[3]);
    let a = t(&[1.0, 2.0], &[2, 1]);
    let b = RefTensor::scalar(-7.0);
    let r = RefTensor::where_(&cond, &a, &b);
    assert_eq!(r.shape, vec![2, 3]);
    assert_eq!(r.data, vec![1.0, -7.0, 1.0, 2.0, -7.0, 2.0]);
}

#[test]
fn broadcast_to_materializes() {
    let a = t(&[1.0, 2.0, 3.0], &[3, 1]);
    let b = a.broadcast_to(&[2, 3, 2]);
    assert_eq!(b.shape, vec![2, 3, 2]);
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..2 {
                assert_eq!(b.at(&[i, j, k]), (j + 1) as f64);
            }
        }
    }
    assert_eq!(RefTensor::scalar(4.0).broadcast_to(&[2]).data, vec![4.0, 4.0]);
}

#[test]
#[should_panic(expected = "cannot broadcast")]
fn broadcast_to_rejects_incompatible() {
    let _ = arange(&[2, 3]).broadcast_to(&[3, 3]);
}

// ------------------------------------------------------------------ reductions

#[test]
fn sum_over_axes() {
    let a = arange(&[2, 3, 4]);
    // Explicit loops for every subset of axes.
    let subsets: [&[usize]; 8] = [&[], &[0], &[1], &[2], &[0, 1], &[2, 0], &[1, 2], &[0, 1, 2]];
    for axes in subsets {
        for keepdim in [false, true] {
            let s = a.sum(axes, keepdim);
            let kept: Vec<usize> = (0..3).map(|d| if axes.contains(&d) { 1 } else { a.shape[d] }).collect();
            let expected_shape: Vec<usize> =
                if keepdim { kept.clone() } else { (0..3).filter(|d| !axes.contains(d)).map(|d| a.shape[d]).collect() };
            assert_eq!(s.shape, expected_shape, "axes {axes:?} keepdim {keepdim}");
            let mut expected = vec![0.0; kept.iter().product()];
            for i in 0..2 {
                for j in 0..3 {
                    for k in 0..4 {
                        let o = [i, j, k];
                        let oi: Vec<usize> = (0..3).map(|d| if axes.contains(&d) { 0 } else { o[d] }).collect();
                        expected[ravel_index(&oi, &kept)] += a.at(&o);
                    }
                }
            }
            assert_eq!(s.data, expected, "axes {axes:?} keepdim {keepdim}");
        }
    }
    // Hand-computed.
    let b = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    assert_eq!(b.sum(&[0], false), t(&[5.0, 7.0, 9.0], &[3]));
    assert_eq!(b.sum(&[1], true), t(&[6.0, 15.0], &[2, 1]));
    assert_eq!(b.sum(&[0, 1], false), RefTensor::scalar(21.0));
    assert_eq!(b.sum(&[1, 0], true), t(&[21.0], &[1, 1]));
    assert_eq!(b.sum(&[], false), b);
    assert_eq!(b.sum_all(), 21.0);
    assert_eq!(RefTensor::scalar(3.0).sum(&[], false), RefTensor::scalar(3.0));
}

#[test]
fn mean_over_axes() {
    let b = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    assert_eq!(b.mean(&[0], false), t(&[2.5, 3.5, 4.5], &[3]));
    assert_eq!(b.mean(&[1], true), t(&[2.0, 5.0], &[2, 1]));
    assert_eq!(b.mean(&[0, 1], false), RefTensor::scalar(3.5));
    assert_eq!(b.mean(&[], true), b);
    let a = arange(&[2, 3, 4]);
    let m = a.mean(&[2, 0], true);
    assert_eq!(m.shape, vec![1, 3, 1]);
    // mean over i,k of 12i + 4j + k = 6 + 4j + 1.5
    assert_eq!(m.data, vec![7.5, 11.5, 15.5]);
}

#[test]
fn max_over_axes() {
    let b = t(&[1.0, 7.0, -3.0, 4.0, -5.0, 6.0], &[2, 3]);
    assert_eq!(b.max(&[0], false), t(&[4.0, 7.0, 6.0], &[3]));
    assert_eq!(b.max(&[1], true), t(&[7.0, 6.0], &[2, 1]));
    assert_eq!(b.max(&[0, 1], false), RefTensor::scalar(7.0));
    assert_eq!(b.max(&[1, 0], true), t(&[7.0], &[1, 1]));
    assert_eq!(b.max(&[], false), b);
    let neg = t(&[-3.0, -1.0, -2.0], &[3]);
    assert_eq!(neg.max(&[0], false), RefTensor::scalar(-1.0));
    let a = arange(&[2, 3, 4]);
    assert_eq!(a.max(&[1], false).data, vec![8.0, 9.0, 10.0, 11.0, 20.0, 21.0, 22.0, 23.0]);
    assert_eq!(a.max(&[0, 2], false), t(&[15.0, 19.0, 23.0], &[3]));
    let n = t(&[1.0, f64::NAN, 3.0], &[3]);
    assert!(n.max(&[0], false).item().is_nan());
}

#[test]
#[should_panic(expected = "duplicate axis")]
fn reduction_rejects_duplicate_axes() {
    let _ = arange(&[2, 3]).sum(&[1, 1], false);
}

#[test]
#[should_panic(expected = "out of range")]
fn reduction_rejects_bad_axis() {
    let _ = arange(&[2, 3]).sum(&[2], false);
}

#[test]
fn softmax_rows() {
    let x = t(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &[2, 3]);
    let s = x.softmax(1);
    let d = 1.0 + 1f64.exp() + 2f64.exp();
    let e = [1.0 / d, 1f64.exp() / d, 2f64.exp() / d, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0];
    assert_close(&s.data, &e, 1e-14, 1e-15, "softmax");
    let ls = x.log_softmax(1);
    let le: Vec<f64> = e.iter().map(|v| v.ln()).collect();
    assert_close(&ls.data, &le, 1e-14, 1e-14, "log_softmax");
}

// ------------------------------------------------------------------ matmul

/// Explicit-loop 2-D matmul used as an oracle.
fn loop_matmul_2d(a: &RefTensor, b: &RefTensor) -> RefTensor {
    let (m, k, n) = (a.shape[0], a.shape[1], b.shape[1]);
    let mut out = RefTensor::zeros(&[m, n]);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                s += a.at(&[i, p]) * b.at(&[p, j]);
            }
            out.data[i * n + j] = s;
        }
    }
    out
}

#[test]
fn matmul_2d() {
    let a = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let b = t(&[7.0, 8.0, 9.0, 10.0, 11.0, 12.0], &[3, 2]);
    let c = a.matmul(&b);
    assert_eq!(c, t(&[58.0, 64.0, 139.0, 154.0], &[2, 2]));
    let x = rand_tensor(1, &[4, 5], -1.0, 1.0);
    let y = rand_tensor(2, &[5, 3], -1.0, 1.0);
    assert_eq!(x.matmul(&y), loop_matmul_2d(&x, &y));
}

#[test]
fn matmul_1d_cases() {
    let v = t(&[1.0, 2.0, 3.0], &[3]);
    let w = t(&[4.0, 5.0, 6.0], &[3]);
    // dot
    assert_eq!(v.matmul(&w), RefTensor::scalar(32.0));
    let m = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
    // [3] @ [3,2] -> [2]
    assert_eq!(v.matmul(&m), t(&[22.0, 28.0], &[2]));
    let mt = m.transpose(0, 1); // [2,3] = [[1,3,5],[2,4,6]]
    // [2,3] @ [3] -> [2]
    assert_eq!(mt.matmul(&v), t(&[22.0, 28.0], &[2]));
    // batched: [2,2,3] @ [3] -> [2,2]
    let bt = RefTensor::stack(&[&mt, &mt.map(|x| 2.0 * x)], 0);
    assert_eq!(bt.matmul(&v), t(&[22.0, 28.0, 44.0, 56.0], &[2, 2]));
    // [3] @ [2,3,2] -> [2,2]
    let bm = RefTensor::stack(&[&m, &m.map(|x| -x)], 0);
    assert_eq!(v.matmul(&bm), t(&[22.0, 28.0, -22.0, -28.0], &[2, 2]));
}

#[test]
fn matmul_batched_broadcast() {
    let a = rand_tensor(10, &[2, 1, 3, 4], -1.0, 1.0);
    let b = rand_tensor(11, &[5, 4, 2], -1.0, 1.0);
    let c = a.matmul(&b);
    assert_eq!(c.shape, vec![2, 5, 3, 2]);
    for i in 0..2 {
        for j in 0..5 {
            for r in 0..3 {
                for s in 0..2 {
                    let mut acc = 0.0;
                    for p in 0..4 {
                        acc += a.at(&[i, 0, r, p]) * b.at(&[j, p, s]);
                    }
                    assert_eq!(c.at(&[i, j, r, s]), acc, "at [{i},{j},{r},{s}]");
                }
            }
        }
    }
}

#[test]
#[should_panic(expected = "inner dims differ")]
fn matmul_rejects_inner_mismatch() {
    let _ = arange(&[2, 3]).matmul(&arange(&[2, 3]));
}

#[test]
#[should_panic(expected = "do not broadcast")]
fn matmul_rejects_batch_mismatch() {
    let _ = arange(&[2, 2, 3]).matmul(&arange(&[3, 3, 2]));
}

// ------------------------------------------------------------------ layout ops

#[test]
fn reshape_keeps_data() {
    let a = arange(&[2, 3]);
    let r = a.reshape(&[3, 1, 2]);
    assert_eq!(r.shape, vec![3, 1, 2]);
    assert_eq!(r.data, a.data);
}

#[test]
#[should_panic(expected = "cannot reshape")]
fn reshape_rejects_bad_size() {
    let _ = arange(&[2, 3]).reshape(&[4]);
}

#[test]
fn permute_and_transpose() {
    let a = arange(&[2, 3]);
    let at = a.transpose(0, 1);
    assert_eq!(at, t(&[0.0, 3.0, 1.0, 4.0, 2.0, 5.0], &[3, 2]));
    let b = arange(&[2, 3, 4]);
    let p = b.permute(&[2, 0, 1]);
    assert_eq!(p.shape, vec![4, 2, 3]);
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..4 {
                assert_eq!(p.at(&[k, i, j]), b.at(&[i, j, k]));
            }
        }
    }
    // Inverse permutation restores the original.
    assert_eq!(p.permute(&[1, 2, 0]), b);
    let tr = b.transpose(0, 2);
    assert_eq!(tr.shape, vec![4, 3, 2]);
    assert_eq!(tr.at(&[3, 1, 0]), b.at(&[0, 1, 3]));
    assert_eq!(b.transpose(1, 1), b);
}

#[test]
#[should_panic(expected = "not a permutation")]
fn permute_rejects_non_permutation() {
    let _ = arange(&[2, 3]).permute(&[0, 2]);
}

#[test]
#[should_panic(expected = "not a permutation")]
fn permute_rejects_repeated_dim() {
    let _ = arange(&[2, 3]).permute(&[1, 1]);
}

#[test]
fn narrow_slices() {
    let a = arange(&[3, 4]);
    assert_eq!(a.narrow(1, 1, 2), t(&[1.0, 2.0, 5.0, 6.0, 9.0, 10.0], &[3, 2]));
    assert_eq!(a.narrow(0, 2, 1), t(&[8.0, 9.0, 10.0, 11.0], &[1, 4]));
    assert_eq!(a.narrow(0, 1, 0).shape, vec![0, 4]);
    assert_eq!(a.narrow(1, 0, 4), a);
}

#[test]
#[should_panic(expected = "out of bounds")]
fn narrow_rejects_overrun() {
    let _ = arange(&[3, 4]).narrow(1, 3, 2);
}

#[test]
fn cat_and_stack() {
    let a = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let b = t(&[5.0, 6.0], &[1, 2]);
    assert_eq!(RefTensor::cat(&[&a, &b], 0), t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]));
    let c = t(&[7.0, 8.0], &[2, 1]);
    assert_eq!(RefTensor::cat(&[&a, &c, &a], 1), t(&[1.0, 2.0, 7.0, 1.0, 2.0, 3.0, 4.0, 8.0, 3.0, 4.0], &[2, 5]));
    let x = t(&[1.0, 2.0, 3.0], &[3]);
    let y = t(&[4.0, 5.0, 6.0], &[3]);
    assert_eq!(RefTensor::stack(&[&x, &y], 0), t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]));
    assert_eq!(RefTensor::stack(&[&x, &y], 1), t(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0], &[3, 2]));
    // narrow undoes cat
    let big = RefTensor::cat(&[&a, &c], 1);
    assert_eq!(big.narrow(1, 0, 2), a);
    assert_eq!(big.narrow(1, 2, 1), c);
    let s = RefTensor::stack(&[&a, &a.map(|v| -v)], 2);
    assert_eq!(s.shape, vec![2, 2, 2]);
    assert_eq!(s.at(&[1, 0, 1]), -3.0);
}

#[test]
#[should_panic(expected = "incompatible")]
fn cat_rejects_mismatch() {
    let _ = RefTensor::cat(&[&arange(&[2, 2]), &arange(&[2, 3])], 0);
}

#[test]
fn squeeze_unsqueeze() {
    let a = arange(&[2, 1, 3]);
    let s = a.squeeze(1);
    assert_eq!(s.shape, vec![2, 3]);
    assert_eq!(s.data, a.data);
    assert_eq!(s.unsqueeze(1), a);
    assert_eq!(s.unsqueeze(2).shape, vec![2, 3, 1]);
    assert_eq!(s.unsqueeze(0).shape, vec![1, 2, 3]);
    assert_eq!(RefTensor::scalar(1.0).unsqueeze(0).shape, vec![1]);
    assert_eq!(t(&[5.0], &[1]).squeeze(0), RefTensor::scalar(5.0));
}

#[test]
#[should_panic(expected = "is not 1")]
fn squeeze_rejects_non_unit() {
    let _ = arange(&[2, 3]).squeeze(0);
}

// ------------------------------------------------------------------ random data

#[test]
fn uniform_is_deterministic_and_in_range() {
    let a = uniform(42, 1000, -2.0, 3.0);
    let b = uniform(42, 1000, -2.0, 3.0);
    let c = uniform(43, 1000, -2.0, 3.0);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().all(|&x| (-2.0..3.0).contains(&x)));
    let mean = a.iter().sum::<f64>() / 1000.0;
    assert!((mean - 0.5).abs() < 0.2, "mean {mean}");
    // First splitmix64 outputs for seed 0 (reference values of the published algorithm).
    let mut s = 0u64;
    assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
    assert_eq!(splitmix64(&mut s), 0x6E78_9E6A_A1B9_65F4);
    let r = rand_tensor(7, &[2, 3], 0.0, 1.0);
    assert_eq!(r.shape, vec![2, 3]);
    assert_eq!(r.data, uniform(7, 6, 0.0, 1.0));
}

// ------------------------------------------------------------------ finite differences

#[test]
fn numeric_grad_cube() {
    let x = rand_tensor(3, &[2, 3], -2.0, 2.0);
    let g = numeric_grad(|xs| xs[0].map(|v| v * v * v).sum_all(), std::slice::from_ref(&x), 1e-5);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].shape, vec![2, 3]);
    let expected = x.map(|v| 3.0 * v * v);
    assert_close(&g[0].data, &expected.data, 1e-8, 1e-9, "d sum(x^3)/dx");
}

#[test]
fn numeric_grad_two_inputs() {
    // f(a, b) = sum(a * b) + sum_i (a @ b)_i^2 with a [2,3], b [3] (broadcast product).
    let a = rand_tensor(4, &[2, 3], -1.0, 1.0);
    let b = rand_tensor(5, &[3], -1.0, 1.0);
    let f = |xs: &[RefTensor]| {
        let p = xs[0].mul(&xs[1]).sum_all();
        let q = xs[0].matmul(&xs[1]).map(|v| v * v).sum_all();
        p + q
    };
    let g = numeric_grad(f, &[a.clone(), b.clone()], 1e-5);
    assert_eq!(g[0].shape, vec![2, 3]);
    assert_eq!(g[1].shape, vec![3]);
    // df/da[i,j] = b[j] + 2 (a@b)[i] b[j];  df/db[j] = sum_i a[i,j] + 2 sum_i (a@b)[i] a[i,j].
    let ab = a.matmul(&b);
    let ga = RefTensor::from_fn(&[2, 3], |ix| {
        let (i, j) = (ix[0], ix[1]);
        b.at(&[j]) + 2.0 * ab.at(&[i]) * b.at(&[j])
    });
    let gb = RefTensor::from_fn(&[3], |ix| {
        let j = ix[0];
        (0..2).map(|i| a.at(&[i, j]) + 2.0 * ab.at(&[i]) * a.at(&[i, j])).sum()
    });
    assert_close(&g[0].data, &ga.data, 1e-8, 1e-9, "df/da");
    assert_close(&g[1].data, &gb.data, 1e-8, 1e-9, "df/db");
}

// ------------------------------------------------------------------ scalar math

#[test]
fn erf_known_values() {
    let cases = [
        (0.0, 0.0),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (2.0, 0.9953222650189527),
        (-1.5, -0.9661051464753108),
        (0.1, 0.1124629160182849),
        (2.9, 0.9999589021219005),
        (3.0, 0.9999779095030014),
        (3.5, 0.9999992569016276),
        (-4.0, -0.9999999845827421),
        (6.0, 1.0),
    ];
    for (x, e) in cases {
        let v = erf(x);
        assert!((v - e).abs() <= 1e-15, "erf({x}) = {v:.17}, expected {e:.17}");
    }
    assert_eq!(erf(f64::INFINITY), 1.0);
    assert_eq!(erf(f64::NEG_INFINITY), -1.0);
    assert!(erf(f64::NAN).is_nan());
    // erfc keeps relative accuracy in the tail: erfc(5) = 1.5374597944280351e-12.
    let c = erfc(5.0);
    assert!((c / 1.5374597944280351e-12 - 1.0).abs() < 1e-12, "erfc(5) = {c:e}");
    // Continuity at the switch point between the series and the continued fraction.
    let below = erf(3.0f64.next_down());
    let above = erf(3.0);
    assert!((above - below).abs() < 1e-15);
}

#[test]
fn activations() {
    assert_eq!(sigmoid(0.0), 0.5);
    assert_close(&[sigmoid(2.0)], &[0.8807970779778823], 1e-15, 0.0, "sigmoid(2)");
    assert_close(&[sigmoid(-2.0)], &[0.11920292202211755], 1e-15, 0.0, "sigmoid(-2)");
    assert_eq!(sigmoid(-1000.0), 0.0);
    assert_eq!(sigmoid(1000.0), 1.0);
    // gelu_erf(1) = 0.5 (1 + erf(1/sqrt 2)) = 0.8413447460685429
    assert_close(&[gelu_erf(1.0)], &[0.8413447460685429], 1e-14, 0.0, "gelu_erf(1)");
    assert_close(&[gelu_erf(-1.0)], &[-0.15865525393145707], 1e-13, 0.0, "gelu_erf(-1)");
    // gelu_tanh(1) = 0.5 (1 + tanh(sqrt(2/pi) * 1.044715))
    let e = 0.5 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * 1.044715f64).tanh());
    assert_close(&[gelu_tanh(1.0)], &[e], 1e-15, 0.0, "gelu_tanh(1)");
    assert_close(&[gelu_tanh(1.0)], &[0.8411919906082768], 1e-14, 0.0, "gelu_tanh(1) value");
    assert_eq!(gelu_tanh(0.0), 0.0);
    assert_eq!(gelu_erf(0.0), 0.0);
    // The two GELU forms agree to about 1e-3.
    for x in uniform(9, 100, -4.0, 4.0) {
        assert!((gelu_tanh(x) - gelu_erf(x)).abs() < 1e-3);
    }
}

// ------------------------------------------------------------------ assert_close

#[test]
fn assert_close_accepts_within_tolerance() {
    assert_close(&[1.0, 2.0, f64::NAN, f64::INFINITY], &[1.0 + 1e-9, 2.0, f64::NAN, f64::INFINITY], 1e-8, 0.0, "ok");
    assert_close(&[0.0], &[1e-7], 0.0, 1e-6, "atol");
    assert_close_f32(&[0.1f32, 1.5], &[0.1, 1.5], 1e-6, 0.0, "f32");
    assert_close_f32_shaped(&[1.0, 2.0], &[2, 1], &t(&[1.0, 2.0], &[2, 1]), 0.0, 0.0, "shaped");
    assert_tensor_close(&arange(&[2]), &arange(&[2]), 0.0, 0.0, "tensor");
}

#[test]
#[should_panic(expected = "mismatch-label: 1 of 3 elements not close")]
fn assert_close_fails_on_mismatch() {
    assert_close(&[1.0, 2.0, 3.0], &[1.0, 2.1, 3.0], 1e-6, 1e-6, "mismatch-label");
}

#[test]
#[should_panic(expected = "worst at flat index 2: actual 9.0, expected 3.0")]
fn assert_close_reports_worst() {
    assert_close(&[1.0, 2.5, 9.0], &[1.0, 2.0, 3.0], 1e-6, 1e-6, "worst");
}

#[test]
#[should_panic(expected = "not close")]
fn assert_close_fails_on_nan() {
    assert_close(&[f64::NAN], &[1.0], 1.0, 1.0, "nan");
}

#[test]
#[should_panic(expected = "not close")]
fn assert_close_fails_on_missing_nan() {
    assert_close(&[1.0], &[f64::NAN], 1.0, 1.0, "nan expected");
}

#[test]
#[should_panic(expected = "length mismatch")]
fn assert_close_fails_on_length() {
    assert_close(&[1.0, 2.0], &[1.0], 1.0, 1.0, "len");
}

#[test]
#[should_panic(expected = "index [1, 0]")]
fn assert_close_shaped_reports_multi_index() {
    assert_close_f32_shaped(&[1.0, 2.0, 5.0, 4.0], &[2, 2], &t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]), 1e-6, 0.0, "shaped");
}

#[test]
#[should_panic(expected = "shape mismatch")]
fn assert_close_shaped_checks_shape() {
    assert_close_f32_shaped(&[1.0, 2.0], &[1, 2], &t(&[1.0, 2.0], &[2, 1]), 0.0, 0.0, "shape");
}
