//! Eager elementwise ops of one shape are merged into one dispatch at the
//! next command of another kind (src/exec/merge.rs). Merging must be
//! invisible: the same bits as one kernel per op, hazards (a merged
//! output read through another view, a buffer read and later written)
//! handled by dispatching first, the binding limit respected.
//! Uses its own devices so counters are not disturbed by other tests.

use wgrad::{Device, Tensor};

fn host(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().expect("readback")
}

/// The W5 recurrence, `steps` times; `read_each` reads every
/// intermediate back, which dispatches each op on its own.
fn chain(x: &Tensor, steps: usize, read_each: bool) -> wgrad::Result<Tensor> {
    let mut y = x.clone();
    for _ in 0..steps {
        y = y.sin()?.mul(0.9)?.add(&y.mul(0.1)?)?;
        if read_each {
            host(&y);
        }
    }
    Ok(y)
}

#[test]
fn a_merged_chain_is_bit_identical_to_one_kernel_per_op() -> wgrad::Result<()> {
    let device = Device::new()?;
    let x = Tensor::rand([1000], 5, &device)?.mul(6.0)?.sub(3.0)?;
    host(&x);
    let one_by_one = host(&chain(&x, 50, true)?);
    let before = device.counters().dispatches;
    let merged = chain(&x, 50, false)?;
    let merged = host(&merged);
    let dispatches = device.counters().dispatches - before;
    assert_eq!(merged, one_by_one, "merging changes no bits");
    // 200 ops; the intermediates die as the loop goes, so only the node cap
    // splits the chain.
    assert!(dispatches <= 8, "200 elementwise ops took {dispatches} dispatches");
    // Against a float64 reference.
    let mut r: Vec<f64> = host(&x).iter().map(|&v| v as f64).collect();
    for _ in 0..50 {
        r = r.iter().map(|v| v.sin() * 0.9 + v * 0.1).collect();
    }
    for (i, (&m, &e)) in merged.iter().zip(&r).enumerate() {
        assert!((m as f64 - e).abs() <= 1e-5 * e.abs().max(1.0), "element {i}: {m} vs {e}");
    }
    Ok(())
}

#[test]
fn reading_a_pending_result_through_another_view_dispatches_it_first() -> wgrad::Result<()> {
    let device = Device::new()?;
    let x = Tensor::rand([4, 4], 7, &device)?;
    let xs = host(&x);
    // y is pending; y.t() reads it transposed, which one merged kernel
    // could not do (another invocation computes those elements).
    let y = x.exp()?;
    let z = y.t()?.add(&y)?;
    // A broadcast read of a pending result, likewise.
    let row = x.narrow(0, 0, 1)?.neg()?;
    let w = row.add(&x)?;
    let (zs, ws) = (host(&z), host(&w));
    for i in 0..4 {
        for j in 0..4 {
            let expect = (xs[j * 4 + i].exp() + xs[i * 4 + j].exp()) as f64;
            assert!((zs[i * 4 + j] as f64 - expect).abs() <= 1e-6 * expect, "z[{i}][{j}]");
            assert_eq!(ws[i * 4 + j], xs[i * 4 + j] - xs[j], "w[{i}][{j}]");
        }
    }
    Ok(())
}

#[test]
fn many_inputs_split_under_the_binding_limit() -> wgrad::Result<()> {
    let device = Device::new()?;
    let inputs: Vec<Tensor> = (0..70).map(|i| Tensor::rand([257], 100 + i, &device)).collect::<Result<_, _>>()?;
    let mut acc = inputs[0].clone();
    for t in &inputs[1..] {
        acc = acc.add(t)?;
    }
    let got = host(&acc);
    let mut expect = vec![0f32; 257];
    for t in &inputs {
        for (e, v) in expect.iter_mut().zip(host(t)) {
            *e += v;
        }
    }
    assert_eq!(got, expect, "same additions in the same order");
    Ok(())
}

#[test]
fn dropped_results_are_not_stored_and_pending_inputs_are_released() -> wgrad::Result<()> {
    let device = Device::new()?;
    let x = Tensor::rand([4096], 9, &device)?;
    host(&x);
    let live = device.memory_stats().live_bytes;
    // Nothing reads these: the pending group dies with them and nothing runs.
    let before = device.counters().dispatches;
    drop(x.exp()?.mul(2.0)?);
    device.synchronize()?;
    assert_eq!(device.counters().dispatches, before, "work nobody can observe is dropped");
    assert_eq!(device.memory_stats().live_bytes, live, "no buffer outlives its tensors");
    // An in-place-style pattern: y = f(x), then x is dropped and its buffer
    // reused by later outputs of the same group.
    let mut expect = host(&x);
    let mut y = x.clone();
    drop(x);
    for _ in 0..20 {
        y = y.mul(1.5)?.sub(0.25)?;
        expect.iter_mut().for_each(|v| *v = *v * 1.5 - 0.25);
    }
    assert_eq!(host(&y), expect);
    Ok(())
}

#[test]
fn vectorised_kernels_match_scalar_ones_at_every_alignment() -> wgrad::Result<()> {
    // Kernels over >= 4096 contiguous elements at offsets that are
    // multiples of 4 load and store vec4s (codegen::render_x4); other
    // offsets and strided views take the scalar kernel. Both must agree
    // with the host, bit for bit for these exactly rounded ops.
    let device = Device::new()?;
    let n = 8192 + 8;
    let x = Tensor::rand([n], 21, &device)?;
    let y = Tensor::rand([n], 22, &device)?;
    let (xs, ys) = (host(&x), host(&y));
    for start in [0usize, 1, 4, 6] {
        let len = 8192;
        let (a, b) = (x.narrow(0, start, len)?, y.narrow(0, 4, len)?);
        let got = host(&a.mul(&b)?.add(&a)?.sub(0.5)?);
        for i in 0..len {
            let e = xs[start + i] * ys[4 + i] + xs[start + i] - 0.5;
            assert_eq!(got[i], e, "offset {start}, element {i}");
        }
    }
    // Index-dependent kernels (arange, random) give the same values
    // whichever kernel runs them.
    let r = host(&Tensor::rand([4096 * 3], 77, &device)?);
    let r_odd = host(&Tensor::rand([4096 * 3 + 1], 77, &device)?);
    assert_eq!(r[..], r_odd[..4096 * 3], "random numbers depend only on (seed, index)");
    Ok(())
}
