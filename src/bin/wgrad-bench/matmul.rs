//! `--matmul SIZES`: the matmul kernel alone, C = A @ B for square f32
//! matrices, reported as GFLOP/s (2·n³ per product) over the median run.

use std::time::Instant;

use wgrad::{Device, Tensor};

/// One measured size.
pub struct MatmulRow {
    pub n: usize,
    pub median_ms: f64,
    pub gflops: f64,
}

/// Times `runs` products after one warm-up (which pays pipeline creation).
pub fn measure(device: &Device, n: usize, runs: usize) -> wgrad::Result<MatmulRow> {
    let a = Tensor::rand(vec![n, n], 1, device)?;
    let b = Tensor::rand(vec![n, n], 2, device)?;
    a.matmul(&b)?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        drop(c);
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2];
    Ok(MatmulRow { n, median_ms, gflops: 2.0 * (n as f64).powi(3) / (median_ms * 1e-3) / 1e9 })
}

pub fn table(rows: &[MatmulRow]) -> String {
    let mut s = String::from("| matmul n×n @ n×n | median ms | GFLOP/s |\n|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&format!("| {} | {:.2} | {:.1} |\n", r.n, r.median_ms, r.gflops));
    }
    s
}
