//! Memory accounting and the caching allocator, on a device of its own (so other tests do
//! not disturb the counters): a training loop reaches a steady state, dropped tensors go back
//! to the pool, and `empty_cache` empties it.
//!
//! Everything runs in one test function: the counters are per device and tests in one
//! binary run in parallel threads.

mod common;

use wgrad::{BackwardOptions, DType, Device, MemoryStats, Tensor};

/// One SGD step of a two-layer MLP; returns the loss (a detached scalar) and the new
/// parameters. `params` is consumed so the old leaves (and their `.grad`) drop here.
fn sgd_step(x: &Tensor, target: &Tensor, params: Vec<Tensor>, lr: f64) -> (Tensor, Vec<Tensor>) {
    let [w1, b1, w2] = <[Tensor; 3]>::try_from(params).unwrap();
    let hidden = x.matmul(&w1).unwrap().add(&b1).unwrap().relu().unwrap();
    let diff = hidden.matmul(&w2).unwrap().sub(target).unwrap();
    let loss = diff.mul(&diff).unwrap().mean_all().unwrap();
    loss.backward().unwrap();
    let _guard = wgrad::no_grad();
    let new = [&w1, &b1, &w2]
        .into_iter()
        .map(|p| {
            let g = p.grad().expect("every parameter gets a gradient");
            p.sub(g.mul(lr).unwrap()).unwrap().detach().requires_grad(true).unwrap()
        })
        .collect();
    (loss.detach(), new)
}

fn stats(device: &Device) -> MemoryStats {
    device.memory_stats()
}

#[test]
fn memory_reaches_a_steady_state_and_the_pool_works() {
    let device = Device::new().unwrap();
    let fresh = stats(&device);
    assert_eq!(fresh.live_bytes, 0);
    assert_eq!(fresh.pooled_bytes, 0);

    // ---------------------------------------------------------------- training loop
    let x = Tensor::rand([32, 16], 1, &device).unwrap();
    let target = Tensor::rand([32, 4], 2, &device).unwrap();
    let init = |shape: &[usize], seed: u64, scale: f64| {
        Tensor::randn(shape, seed, &device).unwrap().mul(scale).unwrap().requires_grad(true).unwrap()
    };
    let mut params = vec![
        init(&[16, 32], 3, 0.25),
        Tensor::zeros([32], DType::F32, &device).unwrap().requires_grad(true).unwrap(),
        init(&[32, 4], 4, 0.25),
    ];
    // Expected steady state: x, target and the three parameters, each in its size class
    // (everything here is at most 2 KiB, so one 256-byte step class or a power of two).
    let class = |bytes: u64| bytes.max(256).next_power_of_two();
    let resident: u64 = [32 * 16, 32 * 4, 16 * 32, 32, 32 * 4].iter().map(|&n| class(n * 4)).sum();

    let mut losses = Vec::new();
    let mut live_after_1 = 0;
    let mut created_after_warmup = 0;
    let mut created_per_step = Vec::new();
    for step in 1..=200 {
        let (loss, new) = sgd_step(&x, &target, params, 0.5);
        params = new;
        if step == 1 || step % 50 == 0 {
            losses.push(loss.to_scalar::<f32>().unwrap());
        }
        drop(loss);
        let s = stats(&device);
        created_per_step.push(s.buffers_created);
        if step == 1 {
            live_after_1 = s.live_bytes;
            assert_eq!(live_after_1, resident, "after a step only the data and parameters stay live");
        }
        if step == 3 {
            created_after_warmup = s.buffers_created;
        }
        assert!(s.peak_bytes >= s.live_bytes);
    }
    device.synchronize().unwrap();
    let end = stats(&device);
    assert_eq!(end.live_bytes, live_after_1, "live bytes after 200 steps equal those after step 1");
    assert!(end.reserved_bytes >= end.live_bytes + end.pooled_bytes, "{end:?}");
    assert_eq!(end.buffers_created, created_after_warmup, "buffers created per step: {created_per_step:?}");
    assert!(end.pooled_bytes > 0, "the intermediates of the last step are pooled");
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "the loss decreases: {losses:?}");
    for p in &params {
        assert!(p.grad().is_none(), "the new parameters have no .grad yet");
        assert!(p.is_leaf() && p.needs_grad());
    }

    // ---------------------------------------------------------------- drop -> pool
    device.synchronize().unwrap();
    let before = stats(&device);
    let big = Tensor::zeros([64, 64], DType::F32, &device).unwrap(); // 16 KiB, a new class
    let after_alloc = stats(&device);
    assert_eq!(after_alloc.live_bytes, before.live_bytes + 16384);
    if device.limits().arenas {
        // Sub-allocated in the f32 arena the step's tensors already use,
        // maybe from a freed range there.
        assert!(after_alloc.pooled_bytes <= before.pooled_bytes);
        assert_eq!(after_alloc.buffers_created, before.buffers_created);
    } else {
        // A buffer of its own, of a class the pool holds none of.
        assert_eq!(after_alloc.pooled_bytes, before.pooled_bytes);
        assert_eq!(after_alloc.buffers_created, before.buffers_created + 1);
    }
    assert!(after_alloc.peak_bytes >= after_alloc.live_bytes);

    // A second handle to the same storage keeps it live.
    let alias = big.reshape([4096]).unwrap();
    drop(big);
    assert_eq!(stats(&device).live_bytes, after_alloc.live_bytes);
    drop(alias);
    let after_drop = stats(&device);
    assert_eq!(after_drop.live_bytes, before.live_bytes, "dropping returns the bytes");
    assert_eq!(after_drop.pooled_bytes, after_alloc.pooled_bytes + 16384, "... to the pool");

    // The same size is served from the pool: no new buffer.
    let again = Tensor::ones([4096], DType::F32, &device).unwrap();
    let s = stats(&device);
    assert_eq!(s.buffers_created, after_alloc.buffers_created);
    assert_eq!(s.pooled_bytes, after_drop.pooled_bytes - 16384);
    assert_eq!(again.to_vec::<f32>().unwrap(), vec![1.0; 4096]);
    drop(again);

    // Peak tracking.
    device.reset_peak_memory();
    let s = stats(&device);
    assert_eq!(s.peak_bytes, s.live_bytes);
    let tmp = Tensor::zeros([1024], DType::F32, &device).unwrap();
    assert_eq!(stats(&device).peak_bytes, s.live_bytes + 4096);
    drop(tmp);
    assert_eq!(stats(&device).peak_bytes, s.live_bytes + 4096);

    // ---------------------------------------------------------------- empty_cache
    // A freed tensor larger than a quarter of an arena has a buffer of its
    // own, which `empty_cache` returns to the driver; freed ranges of an
    // arena that still holds live tensors stay pooled.
    let created = stats(&device).buffers_created;
    let large = Tensor::zeros([(32 << 20) / 4], DType::F32, &device).unwrap();
    assert_eq!(stats(&device).buffers_created, created + 1);
    drop(large);
    device.synchronize().unwrap();
    let before = stats(&device);
    assert!(before.pooled_bytes >= 32 << 20);
    device.empty_cache();
    let s = stats(&device);
    assert!(s.pooled_bytes <= before.pooled_bytes - (32 << 20), "{s:?}");
    assert_eq!(s.live_bytes, before.live_bytes, "live tensors are untouched");
    // After emptying, that allocation creates a new buffer again, and live tensors still work.
    let t = Tensor::zeros([(32 << 20) / 4], DType::F32, &device).unwrap();
    assert_eq!(stats(&device).buffers_created, before.buffers_created + 1);
    drop(t);
    let y = params[0].sum_all().unwrap();
    assert!(y.to_scalar::<f32>().unwrap().is_finite());

    // Dropping everything returns every byte, and then every arena.
    drop((y, params, x, target));
    let s = stats(&device);
    assert_eq!(s.live_bytes, 0);
    assert!(s.reserved_bytes >= s.pooled_bytes && s.reserved_bytes > 0, "{s:?}");
    device.empty_cache();
    let s = stats(&device);
    assert_eq!((s.pooled_bytes, s.reserved_bytes), (0, 0), "every buffer went back to the driver: {s:?}");

    // ---------------------------------------------------------------- higher-order graphs
    let opts = BackwardOptions { create_graph: true, ..Default::default() };
    let cube = || {
        let x = Tensor::full([100], 2.0, DType::F32, &device).unwrap().requires_grad(true).unwrap();
        let y = x.mul(&x).unwrap().mul(&x).unwrap().sum_all().unwrap();
        (x, y)
    };
    // grad() with create_graph: the returned gradient owns its graph; dropping it frees all.
    {
        let (x, y) = cube();
        let g = wgrad::grad(&[&y], &[&x], None, opts).unwrap()[0].clone().unwrap();
        let gg = wgrad::grad(&[&g.sum_all().unwrap()], &[&x], None, opts).unwrap();
        assert_eq!(gg[0].as_ref().unwrap().to_vec::<f32>().unwrap(), vec![12.0; 100]);
    }
    assert_eq!(stats(&device).live_bytes, 0, "grad(create_graph) frees its graphs");
    // backward(create_graph) makes the leaf's .grad hold a graph that points back at the
    // leaf (a reference cycle, as in PyTorch); zero_grad breaks it.
    {
        let (x, y) = cube();
        y.backward_with(&Tensor::ones([], DType::F32, &device).unwrap(), opts).unwrap();
        assert!(x.grad().unwrap().needs_grad());
        x.zero_grad();
    }
    assert_eq!(stats(&device).live_bytes, 0, "after zero_grad a create_graph backward frees everything");
}
