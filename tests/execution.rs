//! Execution properties: sizes travel in uniforms (one pipeline serves every
//! size), and ops batch into one pending encoder submitted at sync points.
//! Uses its own device so counters are not disturbed by other tests.

use wgrad::{DType, Device, Tensor};

#[test]
fn one_pipeline_serves_every_size_and_a_step_is_one_submit() -> wgrad::Result<()> {
    let device = Device::new()?;

    // Warm up: build the fill, exp and sum kernels once in each of their
    // two forms: one element per invocation, and four (vec4) for large
    // contiguous tensors at aligned offsets; and for each way their
    // operands share buffers: all in the f32 arena, or (tensors above a
    // quarter of an arena) in buffers of their own.
    for n in [3, 8192, 65_536 * 256, 65_535 * 256 + 3] {
        Tensor::ones([n], DType::F32, &device)?.exp()?.sum_all()?.to_vec::<f32>()?;
    }
    let before = device.counters();
    for shape in [vec![10], vec![1000], vec![7, 9], vec![2, 3, 4, 5], vec![65_535 * 256 + 3], vec![8192], vec![64, 256]]
    {
        let x = Tensor::ones(shape.clone(), DType::F32, &device)?;
        let y = x.exp()?.sum_all()?.to_scalar::<f32>()?;
        let n: usize = shape.iter().product();
        assert!((y - n as f32 * std::f32::consts::E).abs() <= 1e-4 * n as f32, "{shape:?}: {y}");
    }
    let after = device.counters();
    assert_eq!(after.pipelines_created, before.pipelines_created, "new sizes must reuse the pipelines");

    // A training step (forward, backward, update) records several
    // dispatches (fewer than ops: elementwise ops of one shape merge) but
    // submits once, when the loss is read back.
    let x = Tensor::rand([32, 16], 1, &device)?;
    let w = Tensor::randn([16, 4], 2, &device)?.requires_grad(true)?;
    let step = |w: &Tensor| -> wgrad::Result<(Tensor, f32)> {
        let loss = x.matmul(w)?.tanh()?.square()?.mean_all()?;
        loss.backward()?;
        let _guard = wgrad::no_grad();
        let next = w.sub(&w.grad().expect("w has a gradient").mul(0.1)?)?.requires_grad(true)?;
        Ok((next, loss.to_scalar::<f32>()?))
    };
    let (w, _) = step(&w)?; // first step builds the pipelines
    let before = device.counters();
    let (_, loss) = step(&w)?;
    let after = device.counters();
    assert!(loss.is_finite());
    let dispatches = after.dispatches - before.dispatches;
    assert!(dispatches >= 4, "a step records several dispatches, got {dispatches}");
    assert_eq!(after.submits - before.submits, 1, "one submit per step ({dispatches} dispatches)");
    assert_eq!(after.pipelines_created, before.pipelines_created, "steady state creates no pipelines");
    Ok(())
}
