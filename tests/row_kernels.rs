//! Row kernels and reductions with side stores (issue 15) against eager
//! mode: strided and stepped views as row operands, row groups wider than
//! the binding limit, NaN and infinities in rows, integer and f16 rows,
//! long and single rows, transposed and broadcast operands, reductions of
//! values constant along the row, and a reduction storing its elementwise
//! values while chunked into several passes. Run by `scripts/test.sh` also
//! with `WGRAD_PASSES=min-rows=1` (every small shape a row kernel) and with
//! `WGRAD_ROWS=workgroup`.

mod common;
use std::sync::{Mutex, MutexGuard};
use wgrad::{DType, Result, Tensor, WgslCompiler, compile_step};

static LOCK: Mutex<()> = Mutex::new(());
fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: len");
    let mut bad = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= 1e-4 * w.abs().max(1.0);
        if !ok {
            if bad < 5 {
                eprintln!("{name}[{i}]: compiled {g} vs eager {w}");
            }
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{name}: {bad} of {} elements differ", got.len());
}

/// Forward through compile_step vs eager.
fn fwd(name: &str, args: &[Tensor], f: fn(&[Tensor]) -> Result<Vec<Tensor>>) {
    let want: Vec<Vec<f32>> = f(args).unwrap().iter().map(|t| t.to_vec::<f32>().unwrap()).collect();
    let mut step = compile_step(&common::device(), f);
    let got: Vec<Vec<f32>> = step.call(args).unwrap().iter().map(|t| t.to_vec::<f32>().unwrap()).collect();
    eprintln!("{name}: stats {:?}", step.stats());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        close(&format!("{name} out {i}"), g, w);
    }
}

/// Backward compiled vs eager.
fn bwd(name: &str, leaves: &[Tensor], loss: impl Fn(&[Tensor]) -> Result<Tensor>) {
    loss(leaves).unwrap().backward().unwrap();
    let want: Vec<Vec<f32>> = leaves.iter().map(|l| l.grad().unwrap().to_vec::<f32>().unwrap()).collect();
    leaves.iter().for_each(Tensor::zero_grad);
    let guard = WgslCompiler::install(&common::device()).unwrap();
    loss(leaves).unwrap().backward().unwrap();
    eprintln!("{name}: {:?}", guard.stats());
    drop(guard);
    let got: Vec<Vec<f32>> = leaves.iter().map(|l| l.grad().unwrap().to_vec::<f32>().unwrap()).collect();
    leaves.iter().for_each(Tensor::zero_grad);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        close(&format!("{name} grad {i}"), g, w);
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), seed, &common::device()).unwrap()
}

#[test]
fn planar_strided_rows_forward() {
    let _l = serial();
    // [64, 32] sliced every other column: a [64, 16] view with strides [32, 2].
    fwd("softmax of slice_step", &[randn(&[64, 32], 1)], |a| Ok(vec![a[0].slice_step(1, None, None, 2)?.softmax(-1)?]));
}

#[test]
fn planar_strided_rows_sum() {
    let _l = serial();
    fwd("row sum of slice_step", &[randn(&[64, 32], 2)], |a| {
        Ok(vec![a[0].slice_step(1, None, None, 2)?.sum(&[-1], false)?])
    });
}

#[test]
fn planar_strided_rows_backward() {
    let _l = serial();
    let x = randn(&[64, 16], 3).requires_grad(true).unwrap();
    let w = randn(&[64, 32], 4);
    bwd("softmax backward, strided upstream", &[x], move |l| {
        l[0].softmax(-1)?.mul(&w.slice_step(1, None, None, 2)?)?.sum_all()
    });
}

#[test]
fn wide_row_kernel() {
    let _l = serial();
    let args: Vec<Tensor> = (0..40).map(|i| randn(&[64, 8], 100 + i)).collect();
    fwd("row sum of 40 inputs", &args, |a| {
        let mut s = a[0].clone();
        for t in &a[1..] {
            s = s.add(t)?;
        }
        Ok(vec![s.sum(&[-1], false)?])
    });
}

#[test]
fn wide_row_kernel_webgpu_sized() {
    let _l = serial();
    // 10 inputs [64, 8]: fine on lavapipe's own limits, more than 8 bindings under webgpu?
    let args: Vec<Tensor> = (0..10).map(|i| randn(&[64, 8], 200 + i)).collect();
    fwd("row sum of 10 inputs", &args, |a| {
        let mut s = a[0].clone();
        for t in &a[1..] {
            s = s.mul(t)?.add(t)?;
        }
        Ok(vec![s.softmax(-1)?])
    });
}

#[test]
fn wide_row_kernel_large_webgpu() {
    let _l = serial();
    // 9 inputs of 5 MiB (each a dedicated buffer under WGRAD_LIMITS=webgpu) + 1 output > 8 bindings.
    let args: Vec<Tensor> = (0..9).map(|i| randn(&[160, 8192], 300 + i)).collect();
    fwd("row sum of 9 large inputs", &args, |a| {
        let mut s = a[0].clone();
        for t in &a[1..] {
            s = s.add(t)?;
        }
        Ok(vec![s.sum(&[-1], false)?])
    });
}

fn t(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape.to_vec(), &common::device()).unwrap()
}

fn nan_rows() -> Tensor {
    let (a, k) = (40, 5);
    let mut d: Vec<f32> = (0..a * k).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
    d[3] = f32::NAN;
    d[k] = f32::NAN;
    d[2 * k + 4] = f32::NAN; // NaN last, first, middle
    for j in 0..k {
        d[3 * k + j] = f32::NEG_INFINITY;
    } // an all -inf row
    d[4 * k + 1] = f32::INFINITY;
    t(&d, &[a, k])
}

#[test]
fn nan_rows_forward() {
    let _l = serial();
    fwd("max/min/softmax with NaN", &[nan_rows()], |a| {
        Ok(vec![
            a[0].max(&[-1], false)?,
            a[0].min(&[-1], false)?,
            a[0].softmax(-1)?,
            a[0].log_softmax(-1)?,
            a[0].logsumexp(-1, false)?,
        ])
    });
}

#[test]
fn int_rows_forward() {
    let _l = serial();
    fwd("i32/u32 row reductions", &[randn(&[40, 7], 9).mul(10.0).unwrap()], |a| {
        let i = a[0].to_dtype(DType::I32)?;
        let u = a[0].abs()?.to_dtype(DType::U32)?;
        Ok(vec![
            i.sum(&[-1], false)?.to_dtype(DType::F32)?,
            i.max(&[-1], false)?.to_dtype(DType::F32)?,
            i.min(&[-1], false)?.to_dtype(DType::F32)?,
            u.max(&[-1], false)?.to_dtype(DType::F32)?,
            u.min(&[-1], false)?.to_dtype(DType::F32)?,
            u.sum(&[-1], false)?.to_dtype(DType::F32)?,
            i.sub(&i.max(&[-1], true)?)?.to_dtype(DType::F32)?,
        ])
    });
}

#[test]
fn f16_rows_forward() {
    let _l = serial();
    if !common::device().supports_f16() {
        eprintln!("no f16");
        return;
    }
    fwd("f16 softmax/max", &[randn(&[40, 9], 10)], |a| {
        let h = a[0].to_dtype(DType::F16)?;
        Ok(vec![
            h.softmax(-1)?.to_dtype(DType::F32)?,
            h.max(&[-1], false)?.to_dtype(DType::F32)?,
            h.sum(&[-1], false)?.to_dtype(DType::F32)?,
        ])
    });
}

#[test]
fn layer_norm_rows_forward_and_long() {
    let _l = serial();
    for (a, k) in [(33, 2), (40, 16384), (64, 3)] {
        fwd(&format!("layer_norm {a}x{k}"), &[randn(&[a, k], 11)], |x| {
            Ok(vec![x[0].layer_norm(&[x[0].dims()[1]], None, None, 1e-5)?, x[0].softmax(-1)?])
        });
    }
}

#[test]
fn transposed_and_broadcast_rows() {
    let _l = serial();
    fwd("softmax of transpose", &[randn(&[24, 48], 12)], |a| Ok(vec![a[0].t()?.softmax(-1)?]));
    fwd("softmax of 3-d permute", &[randn(&[6, 8, 10], 13)], |a| Ok(vec![a[0].permute(&[2, 0, 1])?.softmax(-1)?]));
    fwd("softmax of row broadcast", &[randn(&[1, 16], 14)], |a| Ok(vec![a[0].expand([64, 16])?.softmax(-1)?]));
    fwd("softmax of col broadcast", &[randn(&[64, 1], 15)], |a| {
        Ok(vec![a[0].expand([64, 16])?.softmax(-1)?.add(&a[0])?])
    });
    fwd("softmax of size-1 dims", &[randn(&[4, 1, 16, 1, 5], 16)], |a| {
        Ok(vec![a[0].softmax(-1)?.sum(&[0, 2, 4], false)?])
    });
}

type Body = fn(&[Tensor], &[Tensor]) -> Result<Tensor>;

fn step_vs_eager(name: &str, params: impl Fn() -> Vec<Tensor>, args: &[Tensor], body: Body) {
    let run = |p: &[Tensor], a: &[Tensor]| -> Result<Vec<Tensor>> {
        p.iter().for_each(Tensor::zero_grad);
        let loss = body(p, a)?;
        loss.backward()?;
        let mut out = vec![loss];
        out.extend(p.iter().map(|t| t.grad().unwrap()));
        Ok(out)
    };
    let pe = params();
    let want: Vec<Vec<f32>> = run(&pe, args).unwrap().iter().map(|t| t.to_vec::<f32>().unwrap()).collect();
    let pc = params();
    let pc2 = pc.clone();
    let mut step = compile_step(&common::device(), move |a: &[Tensor]| run(&pc2, a));
    let got: Vec<Vec<f32>> = step.call(args).unwrap().iter().map(|t| t.to_vec::<f32>().unwrap()).collect();
    eprintln!("{name}: {:?} kernels {:?}", step.stats(), step.kernel_count());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        close(&format!("{name} out {i}"), g, w);
    }
}

fn w2body(p: &[Tensor], a: &[Tensor]) -> Result<Tensor> {
    let x = &a[0];
    let left = x.mul(&p[0])?.add(&p[1])?.tanh()?.mul(&x.sigmoid()?)?;
    left.add(&x.mul(x)?.neg()?.exp()?)?.sum_all()
}

#[test]
fn side_stores_chunked() {
    let _l = serial();
    for n in [5usize, 300, 4096, (1 << 20) + 3, 1 << 20, 3_000_001] {
        let x = randn(&[n], 20).mul(0.5).unwrap();
        step_vs_eager(
            &format!("w2 n={n}"),
            || vec![randn(&[n], 21).requires_grad(true).unwrap(), randn(&[n], 22).requires_grad(true).unwrap()],
            &[x],
            w2body,
        );
    }
}

#[test]
fn side_stores_permuted_and_rows() {
    let _l = serial();
    for (a, k) in [(3usize, 100_000usize), (100_000, 3), (37, 1000), (1, 70_000)] {
        let x = randn(&[k, a], 30);
        step_vs_eager(
            &format!("colsum {k}x{a}"),
            || vec![randn(&[k, a], 31).requires_grad(true).unwrap()],
            std::slice::from_ref(&x),
            |p, a| {
                // reduction over dim 0 (a permuted iteration) and over dim 1.
                let y = p[0].mul(&a[0])?.tanh()?;
                y.sum(&[0], false)?.square()?.sum_all()?.add(&y.max(&[1], false)?.sum_all()?)
            },
        );
        step_vs_eager(
            &format!("rowmax {k}x{a}"),
            || vec![randn(&[k, a], 32).requires_grad(true).unwrap()],
            &[x],
            |p, a| {
                let y = p[0].mul(&a[0])?;
                y.max_all()?.add(&y.mul(&y)?.mean_all()?)
            },
        );
    }
}

#[test]
fn uniform_operand_reductions() {
    let _l = serial();
    fwd("sum/max of a column broadcast", &[randn(&[48, 1], 40), randn(&[48, 6], 41)], |a| {
        let e = a[0].expand([48, 6])?;
        Ok(vec![
            e.sum(&[-1], false)?,
            e.max(&[-1], false)?,
            e.add(&a[1])?.softmax(-1)?,
            e.mul(&a[1])?.sum(&[-1], true)?.add(&e)?,
        ])
    });
    fwd("softmax of a scalar broadcast", &[randn(&[], 42), randn(&[40, 7], 43)], |a| {
        let e = a[0].expand([40, 7])?;
        Ok(vec![e.softmax(-1)?, e.mul(&a[1])?.softmax(-1)?])
    });
}

#[test]
fn single_row_and_short_rows() {
    let _l = serial();
    for (a, k) in [(1usize, 2usize), (1, 1000), (2, 3), (33, 2)] {
        let x = randn(&[a, k], 50);
        step_vs_eager(
            &format!("layer_norm step {a}x{k}"),
            || vec![randn(&[k], 51).requires_grad(true).unwrap(), randn(&[k], 52).requires_grad(true).unwrap()],
            &[x],
            |p, a| {
                let k = a[0].dims()[1];
                let y = a[0].layer_norm(&[k], Some(&p[0]), Some(&p[1]), 1e-5)?;
                y.softmax(-1)?.mul(&y)?.sum_all()
            },
        );
    }
}

#[test]
fn rows_nan_step() {
    let _l = serial();
    let x = nan_rows();
    step_vs_eager(
        "nan rows step",
        || vec![randn(&[5], 53).requires_grad(true).unwrap()],
        &[x],
        |p, a| {
            let y = a[0].mul(&p[0])?;
            y.log_softmax(-1)?.sum_all()?.add(&y.max(&[-1], false)?.sum_all()?)
        },
    );
}

#[test]
fn empty_side_stores() {
    let _l = serial();
    let x = randn(&[0], 60);
    step_vs_eager(
        "w2 n=0",
        || vec![randn(&[0], 61).requires_grad(true).unwrap(), randn(&[0], 62).requires_grad(true).unwrap()],
        &[x],
        w2body,
    );
    let x = randn(&[3, 0], 63);
    step_vs_eager(
        "rows k=0",
        || vec![randn(&[3, 0], 64).requires_grad(true).unwrap()],
        &[x],
        |p, a| p[0].mul(&a[0])?.tanh()?.sum(&[-1], false)?.square()?.sum_all(),
    );
}

#[test]
fn many_rows_workgroup_grid() {
    let _l = serial();
    fwd("softmax 100000 rows", &[randn(&[100_000, 4], 70)], |a| Ok(vec![a[0].softmax(-1)?]));
}

#[test]
fn planar_eager_views_match_host() {
    let _l = serial();
    let d = common::device();
    let data: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| i as f32).collect();
    let x = Tensor::from_slice(&data, [2, 3, 4, 5], &d).unwrap();
    let host = |i: [usize; 4]| data[((i[0] * 3 + i[1]) * 4 + i[2]) * 5 + i[3]];
    // (view, host index map) pairs
    let v1 = x.permute(&[0, 1, 3, 2]).unwrap(); // [2,3,5,4]
    let got = v1.add(0.0).unwrap().to_vec::<f32>().unwrap();
    let mut want = vec![];
    for a in 0..2 {
        for b in 0..3 {
            for c in 0..5 {
                for e in 0..4 {
                    want.push(host([a, b, e, c]));
                }
            }
        }
    }
    close("permute last two", &got, &want);
    let v2 = x.narrow(1, 1, 1).unwrap().slice_step(3, None, None, 2).unwrap(); // [2,1,4,3]
    let got = v2.add(0.0).unwrap().to_vec::<f32>().unwrap();
    let mut want = vec![];
    for a in 0..2 {
        for c in 0..4 {
            for e in 0..3 {
                want.push(host([a, 1, c, 2 * e]));
            }
        }
    }
    close("narrow+step", &got, &want);
    let v3 = x.narrow(0, 1, 1).unwrap().permute(&[2, 0, 3, 1]).unwrap(); // [4,1,5,3]
    let got = v3.add(0.0).unwrap().to_vec::<f32>().unwrap();
    let mut want = vec![];
    for c in 0..4 {
        for e in 0..5 {
            for b in 0..3 {
                want.push(host([1, b, c, e]));
            }
        }
    }
    close("permute with size 1", &got, &want);
    let v4 = x.narrow(3, 0, 1).unwrap().expand([2, 3, 4, 6]).unwrap(); // zero stride inner
    let got = v4.add(0.0).unwrap().to_vec::<f32>().unwrap();
    let mut want = vec![];
    for a in 0..2 {
        for b in 0..3 {
            for c in 0..4 {
                for _ in 0..6 {
                    want.push(host([a, b, c, 0]));
                }
            }
        }
    }
    close("expand inner", &got, &want);
}

/// The vec4 row form (rows of a multiple of 4, contiguous along the row,
/// each row starting at a multiple of 4 elements) and its scalar fallback
/// on views that are not: a row offset of 1, a row stride of 66, rows of 62.
#[test]
fn vec4_and_scalar_row_forms() {
    let _l = serial();
    type View = fn(&Tensor) -> Result<Tensor>;
    let views: [(&str, [usize; 2], View); 5] = [
        ("contiguous [32, 64]", [32, 64], |x| Ok(x.clone())),
        ("rows from 1 of [33, 64]", [33, 64], |x| x.narrow(0, 1, 32)),
        ("columns from 1 of [32, 65]", [32, 65], |x| x.narrow(1, 1, 64)),
        ("64 of [32, 66]", [32, 66], |x| x.narrow(1, 0, 64)),
        ("rows of 62", [32, 62], |x| Ok(x.clone())),
    ];
    for (i, (name, dims, view)) in views.into_iter().enumerate() {
        let x = randn(&dims, 500 + i as u64).requires_grad(true).unwrap();
        let cols = view(&x).unwrap().dims()[1];
        let t = randn(&[32, cols], 600 + i as u64);
        let g = randn(&[cols], 700 + i as u64).requires_grad(true).unwrap();
        bwd(name, &[x, g], move |l| {
            let y = view(&l[0])?.layer_norm(&[cols], None, None, 1e-5)?.mul(&l[1])?;
            y.softmax(-1)?.mul(&t)?.add(&y.log_softmax(-1)?)?.sum_all()
        });
    }
}

/// Reductions over the outer axis run four results per invocation where
/// four neighbouring results read neighbouring, vec4-aligned elements:
/// sums, maxima and minima over axis 0 against a host reference, for
/// column counts that are and are not multiples of 4, column slices that
/// start aligned and not (read per result), long columns (several passes)
/// and a NaN in one column; and a fused column sum of a product with a
/// per-row factor (read once per step for the four).
#[test]
fn column_reductions_match_the_host() {
    let _l = serial();
    let d = common::device();
    for (rows, cols, start, width) in
        [(3, 8, 0, 8), (256, 1024, 0, 1024), (5, 12, 4, 8), (7, 13, 1, 12), (70_000, 8, 0, 8)]
    {
        let full = randn(&[rows, cols], (rows * cols + start) as u64);
        let mut host = full.to_vec::<f32>().unwrap();
        if rows == 7 {
            host[3 * cols + 2] = f32::NAN; // column 1 of the slice
        }
        let full = Tensor::from_slice(&host, vec![rows, cols], &d).unwrap();
        let x = full.narrow(1, start, width).unwrap();
        let column = |c: usize| (0..rows).map(|r| host[r * cols + start + c]).collect::<Vec<f32>>().into_iter();
        let sum: Vec<f32> = (0..width).map(|c| column(c).map(f64::from).sum::<f64>() as f32).collect();
        let fold = |c: usize, f: fn(f32, f32) -> f32, init: f32| {
            column(c).fold(init, |m, v| if m.is_nan() || v.is_nan() { f32::NAN } else { f(m, v) })
        };
        let max: Vec<f32> = (0..width).map(|c| fold(c, f32::max, f32::NEG_INFINITY)).collect();
        let min: Vec<f32> = (0..width).map(|c| fold(c, f32::min, f32::INFINITY)).collect();
        let name = format!("[{rows}, {cols}] columns {start}..{}", start + width);
        let tol = |want: &[f32], got: &[f32], what: &str| {
            for (c, (g, w)) in got.iter().zip(want).enumerate() {
                let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-3 * w.abs().max(1.0) * (rows as f32).sqrt();
                assert!(ok, "{name} {what}[{c}]: {g} vs {w}");
            }
        };
        tol(&sum, &x.sum(&[0], false).unwrap().to_vec::<f32>().unwrap(), "sum");
        tol(&max, &x.max(&[0], false).unwrap().to_vec::<f32>().unwrap(), "max");
        tol(&min, &x.min(&[0], false).unwrap().to_vec::<f32>().unwrap(), "min");
        // A fused column sum of x * (per-row factor), compiled.
        let f = randn(&[rows, 1], 900);
        let fh = f.to_vec::<f32>().unwrap();
        let want: Vec<f32> = (0..width)
            .map(|c| column(c).zip(&fh).map(|(v, s)| f64::from(v) * f64::from(*s)).sum::<f64>() as f32)
            .collect();
        let mut step =
            compile_step(&d, move |a: &[Tensor]| Ok(vec![a[0].narrow(1, start, width)?.mul(&a[1])?.sum(&[0], false)?]));
        let got = step.call(&[full.clone(), f]).unwrap()[0].to_vec::<f32>().unwrap();
        tol(&want, &got, "compiled sum of x * factor");
    }
}

/// f16 sums accumulate in f32, as PyTorch's do: in f16 a running sum of
/// ones stops at 2,048 (2,049 rounds back to it). A softmax of zeros over
/// rows of 4,096 is 1/4,096 everywhere (f16 accumulation gave 1/2,048),
/// a sum of 8 x 4,096 ones is 32,768 and a mean of 64 x 4,096 ones is 1
/// (summed and scaled in f32), in the compiled step's row kernel, its
/// reductions and eager mode.
#[test]
fn f16_long_rows_accumulate_in_f32() {
    let _l = serial();
    if !common::device().supports_f16() {
        eprintln!("no f16");
        return;
    }
    let body = |a: &[Tensor]| -> Result<Vec<Tensor>> {
        let h = a[0].to_dtype(DType::F16)?;
        Ok(vec![
            h.softmax(-1)?.to_dtype(DType::F32)?,
            h.add(1.0)?.sum(&[-1], false)?.to_dtype(DType::F32)?,
            h.narrow(0, 0, 8)?.add(1.0)?.sum_all()?.to_dtype(DType::F32)?,
            // Means sum and scale in f32: 262,144 ones sum past f16's 65,504.
            h.add(1.0)?.mean_all()?.to_dtype(DType::F32)?,
            h.add(1.0)?.mean(&[-1], false)?.to_dtype(DType::F32)?,
        ])
    };
    let x = Tensor::zeros([64, 4096], DType::F32, &common::device()).unwrap();
    let want = [1.0 / 4096.0, 4096.0, 32768.0, 1.0, 1.0];
    let eager = body(std::slice::from_ref(&x)).unwrap();
    let mut step = compile_step(&common::device(), body);
    let stepped = step.call(std::slice::from_ref(&x)).unwrap();
    for (mode, outs) in [("eager", eager), ("step", stepped)] {
        for (k, (t, w)) in outs.iter().zip(want).enumerate() {
            let v = t.to_vec::<f32>().unwrap();
            assert!(v.iter().all(|&g| g == w as f32), "{mode} output {k}: {:?} vs {w}", &v[..4.min(v.len())]);
        }
    }
}

/// A layer_norm + softmax step compiled with `passes` (eager with `None`):
/// the loss and every gradient, and the row loops the pass saved.
fn norm_softmax_step(passes: Option<wgrad::Passes>, x: &Tensor, t: &Tensor) -> (Vec<Vec<f32>>, usize) {
    let body = |p: &[Tensor], a: &[Tensor]| -> Result<Vec<Tensor>> {
        p.iter().for_each(Tensor::zero_grad);
        let k = a[0].dims()[1];
        let y = p[0].layer_norm(&[k], None, None, 1e-5)?.mul(&p[1])?.add(&p[2])?;
        let loss = y.softmax(-1)?.mul(&a[0])?.sum_all()?;
        loss.backward()?;
        let mut out = vec![loss];
        out.extend(p.iter().map(|t| t.grad().unwrap()));
        Ok(out)
    };
    let k = x.dims()[1];
    let params = || -> Vec<Tensor> {
        let p = vec![x.clone(), randn(&[k], 31), randn(&[k], 32)];
        p.into_iter().map(|t| t.detach().mul(1.0).unwrap().requires_grad(true).unwrap()).collect()
    };
    let read = |ts: Vec<Tensor>| -> Vec<Vec<f32>> { ts.iter().map(|t| t.to_vec::<f32>().unwrap()).collect() };
    match passes {
        None => (read(body(&params(), std::slice::from_ref(t)).unwrap()), 0),
        Some(p) => {
            let leaves = params();
            let mut step = compile_step(&common::device(), move |a: &[Tensor]| body(&leaves, a)).with_passes(p);
            let out = read(step.call(std::slice::from_ref(t)).unwrap());
            (out, step.reports().iter().map(|r| r.row_loops_saved).sum())
        }
    }
}

/// Row sums distributed over per-row factors (`Passes::row_sums`): the
/// layer_norm + softmax step (W4's graph) makes three fewer loops over
/// each row and equals eager, as it does with the pass off; rows whose
/// per-row factors are infinite or NaN (a constant row has no spread, so
/// layer_norm divides by sqrt(eps); a row holding inf gives inf and NaN
/// factors) take the checked sums' second loop and give eager's
/// infinities and NaN, element for element.
#[test]
fn row_sums_distribute_over_per_row_factors() {
    let _l = serial();
    let on = wgrad::Passes { min_rows: 1, ..wgrad::Passes::default() };
    let off = wgrad::Passes { row_sums: false, ..on };
    let mut data: Vec<f32> = randn(&[48, 64], 33).to_vec::<f32>().unwrap();
    data[5 * 64..6 * 64].iter_mut().for_each(|v| *v = 2.5); // a constant row
    data[7 * 64 + 3] = f32::INFINITY;
    data[9 * 64 + 60] = f32::NEG_INFINITY;
    data[11 * 64 + 10] = f32::NAN;
    data[13 * 64 + 1] = 3.0e38; // finite, but its square overflows
    let x = t(&data, &[48, 64]);
    let mut weights: Vec<f32> = randn(&[48, 64], 34).to_vec::<f32>().unwrap();
    weights[17 * 64 + 2] = f32::INFINITY; // an infinite upstream gradient
    weights[19 * 64..20 * 64].iter_mut().for_each(|v| *v *= 1e36); // large, finite
    let w = t(&weights, &[48, 64]);
    let (want, _) = norm_softmax_step(None, &x, &w);
    let (got_on, saved) = norm_softmax_step(Some(on), &x, &w);
    let (got_off, none) = norm_softmax_step(Some(off), &x, &w);
    assert!(saved >= 3 || !wgrad::Passes::from_env().rows, "{saved} row loops saved");
    assert_eq!(none, 0);
    for (mode, got) in [("row sums on", got_on), ("row sums off", got_off)] {
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            // The loss sums every row: the non-finite rows make it NaN.
            close(&format!("{mode} out {i}"), g, e);
        }
    }
}

/// A row sum over an infinite per-row factor: `Σ x2 / c` with `c` a row
/// sum of 0 is NaN where `x2` changes sign (`+inf + -inf`), though the
/// distributed `(Σ x2) / c` is an infinity, and likewise `Σ x2 · c` with
/// `c` infinite. The checked sum sums such rows again as written.
#[test]
fn distributed_row_sums_keep_eager_nan() {
    let _l = serial();
    let (a, k) = (48, 16);
    let mut x: Vec<f32> = (0..a * k).map(|i| ((i * 29 % 13) as f32) - 4.0).collect();
    for (j, v) in x[..k].iter_mut().enumerate() {
        *v = if j % 2 == 0 { 1.5 } else { -1.5 }; // row 0 sums to 0
    }
    x[3 * k + 2] = f32::INFINITY; // row 3 sums to inf
    let x2: Vec<f32> = (0..a * k).map(|i| if i % 3 == 0 { -2.0 } else { 1.25 }).collect();
    fwd("sums over infinite per-row factors", &[t(&x, &[a, k]), t(&x2, &[a, k])], |a| {
        let c = a[0].sum(&[-1], true)?;
        Ok(vec![a[1].div(&c)?.sum(&[-1], false)?, a[1].mul(&c)?.sum(&[-1], false)?])
    });
}

/// Where a distributed row sum would lose what the sum as written keeps,
/// the checked sum sums the row as written (found by a review, each
/// failing before): addends that cancel (`Σ (a·u - b·u)` with a ≈ b:
/// `u·Σa - u·Σb` was 300% off), a zero whose sign flips an infinity later
/// (`-0` where eager's sum is `+0`), and terms that underflow when the
/// distribution multiplies before it divides (`Σ (x / s)·w` as
/// `(Σ x·w) / s` with x, w near 1e-23). With the pass on, each equals the
/// program without it: bit for bit in the forms with a row per invocation
/// (the same loop), within 1e-6 in the workgroup forms (whose sums as
/// written fold strided partials), always with the same sign of zero; and
/// eager mode within 1e-4 where the sum does not cancel.
#[test]
fn distributed_row_sums_fall_back_where_they_would_lose_accuracy() {
    let _l = serial();
    type Body = fn(&[Tensor]) -> Result<Vec<Tensor>>;
    let check = |name: &str, args: &[Tensor], f: Body, cancels: bool| {
        let read = |ts: Vec<Tensor>| -> Vec<Vec<f32>> { ts.iter().map(|t| t.to_vec::<f32>().unwrap()).collect() };
        let want = read(f(args).unwrap());
        let on = wgrad::Passes { min_rows: 1, ..wgrad::Passes::default() };
        let mut step = compile_step(&common::device(), f).with_passes(on);
        let got = read(step.call(args).unwrap());
        let saved: usize = step.reports().iter().map(|r| r.row_loops_saved).sum();
        assert!(saved > 0 || !wgrad::Passes::from_env().rows, "{name}: the pass did not run");
        let off = wgrad::Passes { row_sums: false, ..on };
        let written = read(compile_step(&common::device(), f).with_passes(off).call(args).unwrap());
        for (o, ((g, s), w)) in got.iter().zip(&written).zip(&want).enumerate() {
            for (i, ((g, s), w)) in g.iter().zip(s).zip(w).enumerate() {
                let eager = cancels || (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= 1e-4 * w.abs();
                let workgroups = matches!(std::env::var("WGRAD_ROWS").as_deref(), Ok("workgroup" | "subgroups"));
                let as_written = g.to_bits() == s.to_bits()
                    || (workgroups && *g != 0.0 && (g - s).abs() <= 1e-6 * s.abs().max(f32::MIN_POSITIVE));
                assert!(as_written && eager, "{name} out {o}[{i}]: {g:e}, as written {s:e}, eager {w:e}");
            }
        }
    };
    let (a, k) = (48, 1024);
    let mut rng = common::Rng::new(999);
    let av: Vec<f32> = (0..a * k).map(|_| 1.0 + 1e-3 * (rng.below(2001) as f32 / 1000.0 - 1.0)).collect();
    let args = [t(&av, &[a, k]), t(&vec![1.0; a * k], &[a, k]), t(&vec![0.7 / k as f32; a * k], &[a, k])];
    check(
        "cancelling addends",
        &args,
        |a| {
            let u = a[2].sum(&[-1], true)?;
            Ok(vec![a[0].mul(&u)?.sub(&a[1].mul(&u)?)?.sum(&[-1], true)?])
        },
        true,
    );
    let (a, k) = (48, 64);
    let x: Vec<f32> = (0..a * k).map(|i| -1.0 - (i % 3) as f32).collect();
    let z: Vec<f32> = (0..a * k).map(|i| if i % 2 == 0 { 1.5 } else { -1.5 }).collect();
    check(
        "the sign of zero",
        &[t(&x, &[a, k]), t(&z, &[a, k])],
        |a| {
            let u = a[1].sum(&[-1], true)?; // 0
            let s = a[0].mul(&u)?.sum(&[-1], true)?; // +0 as written, -0 distributed
            Ok(vec![a[0].div(&s)?.sum(&[-1], true)?, s])
        },
        false,
    );
    let x: Vec<f32> = (0..a * k).map(|i| 1.0e-23 * (1.0 + (i % 7) as f32)).collect();
    let w: Vec<f32> = (0..a * k).map(|i| 1.0e-23 * (1.0 + (i % 5) as f32)).collect();
    check(
        "underflowing terms",
        &[t(&x, &[a, k]), t(&w, &[a, k])],
        |a| {
            let (s1, s2) = (a[0].sum(&[-1], true)?, a[1].sum(&[-1], true)?);
            Ok(vec![a[0].div(&s1)?.mul(&a[1])?.sum(&[-1], true)?.div(&s2)?])
        },
        false,
    );
}
