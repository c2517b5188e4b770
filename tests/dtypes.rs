//! Non-f32 dtypes: integer arithmetic and masks, casts, and f16 where the
//! adapter supports it (skipped, with a note, where it does not).

mod common;

use common::device;
use wgrad::{DType, Error, Tensor};

#[test]
fn integer_arithmetic_and_reductions() -> wgrad::Result<()> {
    let d = device();
    let a = Tensor::from_slice(&[7i32, -3, 10, 4], [2, 2], &d)?;
    let b = Tensor::from_slice(&[2i32, 2, -3, 1], [2, 2], &d)?;
    assert_eq!(a.add(&b)?.to_vec::<i32>()?, vec![9, -1, 7, 5]);
    assert_eq!(a.mul(&b)?.to_vec::<i32>()?, vec![14, -6, -30, 4]);
    // As in PyTorch: `div` is true division (f32), `floor_divide` rounds toward -inf.
    let c = Tensor::from_slice(&[2i32, 2, -4, 1], [2, 2], &d)?;
    assert_eq!(a.div(&c)?.to_vec::<f32>()?, vec![3.5, -1.5, -2.5, 4.0]);
    assert_eq!(a.floor_divide(&c)?.to_vec::<i32>()?, vec![3, -2, -3, 4]);
    assert_eq!(a.neg()?.abs()?.to_vec::<i32>()?, vec![7, 3, 10, 4]);
    assert_eq!(a.sum(&[0], false)?.to_vec::<i32>()?, vec![17, 1]);
    assert_eq!(a.max(&[1], false)?.to_vec::<i32>()?, vec![7, 10]);
    assert_eq!(a.min_all_i32()?, -3);
    let u = Tensor::from_slice(&[1u32, 2, 3], [3], &d)?;
    assert_eq!(u.mul(4)?.sum_all()?.to_scalar::<u32>()?, 24);
    Ok(())
}

trait MinAll {
    fn min_all_i32(&self) -> wgrad::Result<i32>;
}
impl MinAll for Tensor {
    fn min_all_i32(&self) -> wgrad::Result<i32> {
        self.min(&[0, 1], false)?.to_scalar::<i32>()
    }
}

#[test]
fn masks_and_casts() -> wgrad::Result<()> {
    let d = device();
    let x = Tensor::from_slice(&[-1.5f32, 0.0, 2.7, 3.0], [4], &d)?;
    let mask = x.gt(0.0)?;
    assert_eq!(mask.dtype(), DType::U32);
    assert_eq!(mask.to_vec::<u32>()?, vec![0, 0, 1, 1]);
    assert_eq!(x.to_dtype(DType::I32)?.to_vec::<i32>()?, vec![-1, 0, 2, 3], "f32 -> i32 truncates toward zero");
    assert_eq!(mask.to_dtype(DType::F32)?.to_vec::<f32>()?, vec![0.0, 0.0, 1.0, 1.0]);
    assert_eq!(wgrad::where_(&mask, &x, -1.0)?.to_vec::<f32>()?, vec![-1.0, -1.0, 2.7, 3.0]);
    // Casting to an integer ends the graph; float-to-float keeps it.
    let leaf = x.requires_grad(true)?;
    assert!(!leaf.to_dtype(DType::I32)?.needs_grad());
    assert!(leaf.to_dtype(DType::F32)?.needs_grad());
    Ok(())
}

#[test]
fn integer_only_limits_are_errors() {
    let d = device();
    let i = Tensor::from_slice(&[1i32, 2], [2], &d).unwrap();
    assert!(matches!(i.exp(), Err(Error::UnsupportedDType { op: "exp", .. })));
    assert!(matches!(i.pow(2.0), Err(Error::UnsupportedDType { op: "pow", .. })));
    assert!(matches!(i.mean_all(), Err(Error::UnsupportedDType { .. })));
    let u = Tensor::from_slice(&[1u32, 2], [2], &d).unwrap();
    assert!(matches!(u.neg(), Err(Error::UnsupportedDType { op: "neg", .. })));
}

#[test]
fn f16_when_supported() -> wgrad::Result<()> {
    use half::f16;
    let d = device();
    let data: Vec<f16> = [0.5f32, -1.0, 2.0, 0.25].iter().map(|&v| f16::from_f32(v)).collect();
    if !d.supports_f16() {
        let err = Tensor::from_slice(&data, [4], &d).unwrap_err();
        assert!(matches!(err, Error::UnsupportedDType { dtype: DType::F16, .. }), "{err}");
        eprintln!("note: {} has no SHADER_F16; checked that f16 is refused cleanly", d.info().name);
        return Ok(());
    }
    let x = Tensor::from_slice(&data, [4], &d)?;
    assert_eq!(x.dtype(), DType::F16);
    let y = x.mul(&x)?.add(1.0)?.to_vec::<f16>()?;
    let expected = [1.25f32, 2.0, 5.0, 1.0625];
    for (got, want) in y.iter().zip(expected) {
        assert!((got.to_f32() - want).abs() < 1e-3, "{got} vs {want}");
    }
    let back = x.to_dtype(DType::F32)?.to_vec::<f32>()?;
    assert_eq!(back, vec![0.5, -1.0, 2.0, 0.25]);
    let g = x.requires_grad(true)?;
    let loss = g.mul(&g)?.sum_all()?;
    loss.backward()?;
    let grad: Vec<f32> = g.grad().expect("grad").to_vec::<f16>()?.iter().map(|v| v.to_f32()).collect();
    assert_eq!(grad, vec![1.0, -2.0, 4.0, 0.5]);
    Ok(())
}

/// f16 products and scatter-adds accumulate in f32 and round once, as
/// PyTorch's do: in f16 a running sum of ones stops at 2,048, so a dot
/// product of 4,096 ones gave 2,048 and so did the gradient of a row
/// selected 4,096 times. Both matmul forms (the vector and the batched
/// product) and the compiled backward's fused epilogue are checked.
#[test]
fn f16_long_contractions_accumulate_in_f32() -> wgrad::Result<()> {
    use half::f16;
    let d = device();
    if !d.supports_f16() {
        eprintln!("no f16");
        return Ok(());
    }
    let ones = |shape: &[usize]| Tensor::ones(shape.to_vec(), DType::F16, &d);
    let read = |t: &Tensor| -> wgrad::Result<Vec<f32>> { Ok(t.to_vec::<f16>()?.iter().map(|v| v.to_f32()).collect()) };
    let dot = ones(&[1, 4096])?.matmul(&ones(&[4096, 1])?)?;
    assert_eq!(read(&dot)?, vec![4096.0]);
    let batched = ones(&[3, 70, 4096])?.matmul(&ones(&[4096, 66])?)?;
    assert!(read(&batched)?.iter().all(|&v| v == 4096.0), "batched f16 matmul");
    // Through a fused epilogue: relu(a @ b) and its backward.
    let a = ones(&[65, 4096])?.requires_grad(true)?;
    let b = ones(&[4096, 65])?.requires_grad(true)?;
    let y = a.matmul(&b)?.relu()?;
    assert!(read(&y)?.iter().all(|&v| v == 4096.0), "f16 matmul + relu");
    y.sum_all()?.backward()?;
    assert!(read(&a.grad().expect("a.grad"))?.iter().all(|&v| v == 65.0));
    // Row 0 selected 4,096 times: its gradient sums 4,096 ones.
    let w = ones(&[2, 8])?.requires_grad(true)?;
    let ids = Tensor::zeros([4096], DType::U32, &d)?;
    w.index_select(0, &ids)?.sum_all()?.backward()?;
    let g = read(&w.grad().expect("w.grad"))?;
    assert_eq!(&g[..8], &[4096.0; 8]);
    assert_eq!(&g[8..], &[0.0; 8]);
    Ok(())
}

/// A long f16 sum is split into chunks whose partial sums are kept in f32:
/// here every chunk's partial is ±3,840,000 (past f16's 65,504) and they
/// cancel, so the sum is 0, as PyTorch's; with f16 partials it was inf -
/// inf = NaN. Eager and as a compiled step.
#[test]
fn f16_partial_sums_are_kept_in_f32() -> wgrad::Result<()> {
    use half::f16;
    let d = device();
    if !d.supports_f16() {
        eprintln!("no f16");
        return Ok(());
    }
    // Signs alternate by element and by groups of 4, 8, ... 128: whatever
    // stride the chunks take, some chunk holds one sign only.
    for block in [1usize, 4, 16, 128] {
        let data: Vec<f16> =
            (0..1usize << 16).map(|i| f16::from_f32(if (i / block) % 2 == 0 { 60000.0 } else { -60000.0 })).collect();
        let x = Tensor::from_slice(&data, [1 << 16], &d)?;
        let eager = x.sum_all()?.to_dtype(DType::F32)?.to_vec::<f32>()?;
        assert_eq!(eager, vec![0.0], "eager, signs alternating every {block}");
        let mut step = wgrad::compile_step(&d, |a: &[Tensor]| Ok(vec![a[0].sum_all()?.to_dtype(DType::F32)?]));
        let stepped = step.call(std::slice::from_ref(&x))?[0].to_vec::<f32>()?;
        assert_eq!(stepped, vec![0.0], "step, signs alternating every {block}");
        // A row sum over [4, 16384] too (the partials of four rows).
        let rows = x.reshape([4, 1 << 14])?.sum(&[-1], false)?.to_dtype(DType::F32)?.to_vec::<f32>()?;
        assert_eq!(rows, vec![0.0; 4], "rows, signs alternating every {block}");
    }
    Ok(())
}
