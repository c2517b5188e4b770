//! Criterion benches: the five workloads at small sizes (eager and
//! compiled), the matmul kernel at several sizes, and one fused
//! elementwise kernel. `cargo bench --bench workloads`; under `cargo test`
//! each runs once, as a smoke test.

#[path = "../src/bin/wgrad-bench/workloads.rs"]
mod workloads;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use wgrad::{Device, Tensor, WgslCompiler};

fn device() -> Device {
    Device::new().expect("a Vulkan adapter (run scripts/ensure-vulkan.sh)")
}

fn steps(c: &mut Criterion) {
    let device = device();
    let mut group = c.benchmark_group("step (small sizes)");
    group.sample_size(10);
    for id in workloads::ALL {
        for compiled in [false, true] {
            let guard = compiled.then(|| WgslCompiler::install(&device).expect("no compiler installed"));
            let mut w = workloads::Workload::new(id, &device, true).expect("workload");
            let mode = if compiled { "compiled" } else { "eager" };
            group.bench_function(BenchmarkId::new(id.name(), mode), |b| b.iter(|| w.step().expect("step")));
            drop(guard);
        }
    }
    group.finish();
}

fn matmul(c: &mut Criterion) {
    let device = device();
    let mut group = c.benchmark_group("matmul");
    group.sample_size(10);
    for n in [64usize, 128, 256] {
        let a = Tensor::rand([n, n], 1, &device).expect("a");
        let b = Tensor::rand([n, n], 2, &device).expect("b");
        group.throughput(criterion::Throughput::Elements((2 * n * n * n) as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |bench| {
            bench.iter(|| {
                a.matmul(&b).expect("matmul");
                device.synchronize().expect("sync")
            })
        });
    }
    group.finish();
}

/// W2's backward as one compiled kernel, replayed.
fn fused_elementwise(c: &mut Criterion) {
    let device = device();
    let _guard = WgslCompiler::install(&device).expect("no compiler installed");
    let n = 1 << 16;
    let leaf = |seed| Tensor::rand([n], seed, &device).and_then(|t| t.requires_grad(true)).expect("leaf");
    let (x, a, b) = (leaf(1), leaf(2), leaf(3));
    let loss = x.mul(&a).and_then(|t| t.add(&b)).and_then(|t| t.tanh()).expect("forward");
    let loss = loss.mul(x.sigmoid().expect("sigmoid")).and_then(|t| t.sum_all()).expect("loss");
    let seed = Tensor::ones([], wgrad::DType::F32, &device).expect("seed");
    let retain = wgrad::BackwardOptions { retain_graph: true, ..Default::default() };
    c.bench_function("fused elementwise backward (65536)", |bench| {
        bench.iter(|| {
            for t in [&x, &a, &b] {
                t.zero_grad();
            }
            loss.backward_with(&seed, retain).expect("backward");
            device.synchronize().expect("sync")
        })
    });
}

criterion_group!(benches, steps, matmul, fused_elementwise);
criterion_main!(benches);
