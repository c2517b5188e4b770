//! `--rows 4x16384,256x1024`: row kernels at few long rows and many short
//! ones. For each `[rows, cols]`, W4's loss (`sum(softmax(layer_norm(x) *
//! gamma + beta) * t)`) with its backward run eagerly and compiled, steps
//! interleaved; only the backward is timed (from a synchronized forward to
//! the gradients written). The compiled backward lowers the row
//! reductions to row kernels at any number of rows: this shows what that
//! costs where rows are few and long, and eager mode is the reference.

use std::sync::Arc;
use std::time::Instant;

use wgrad::{CompilerGuard, CompilerInterface, Device, Tensor, WgslCompiler};

/// One measured shape.
pub struct RowsRow {
    pub rows: usize,
    pub cols: usize,
    pub eager_ms: f64,
    pub compiled_ms: f64,
    pub compiled_kernels: u64,
}

/// Parses `4x16384`.
pub fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (r, c) = s.trim().split_once('x').ok_or_else(|| format!("--rows {s:?}: write ROWSxCOLS, e.g. 4x16384"))?;
    let n = |v: &str| v.parse::<usize>().map_err(|e| format!("--rows {s:?}: {e}"));
    Ok((n(r)?, n(c)?))
}

/// Times `runs` backwards in each mode after 3 warm-ups (the compiled
/// backward's first captures and builds its pipelines).
pub fn measure(device: &Device, rows: usize, cols: usize, runs: usize) -> wgrad::Result<RowsRow> {
    let x = Tensor::rand([rows, cols], 1, device)?.requires_grad(true)?;
    let t = Tensor::rand([rows, cols], 2, device)?;
    let gamma = Tensor::rand([cols], 3, device)?.requires_grad(true)?;
    let beta = Tensor::rand([cols], 4, device)?.requires_grad(true)?;
    let compiler = Arc::new(WgslCompiler::new(device));
    let backward = |compiled: bool| -> wgrad::Result<f64> {
        for p in [&x, &gamma, &beta] {
            p.zero_grad();
        }
        let guard = if compiled { Some(CompilerGuard::install_arc(compiler.clone())?) } else { None };
        let normed = x.layer_norm(&[cols], Some(&gamma), Some(&beta), 1e-5)?;
        let loss = normed.softmax(-1)?.mul(&t)?.sum_all()?;
        device.synchronize()?;
        let start = Instant::now();
        loss.backward()?;
        device.synchronize()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        drop(guard);
        Ok(ms)
    };
    let (mut eager, mut compiled) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for step in 0..runs + 3 {
        let (e, c) = (backward(false)?, backward(true)?);
        if step >= 3 {
            eager.push(e);
            compiled.push(c);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(RowsRow {
        rows,
        cols,
        eager_ms: median(eager),
        compiled_ms: median(compiled),
        compiled_kernels: compiler.stats().kernels_last_replay,
    })
}

pub fn table(rows: &[RowsRow]) -> String {
    let mut s = String::from(
        "| W4's loss at [rows, cols] | eager backward ms | compiled backward ms | eager / compiled | compiled kernels |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| [{}, {}] | {:.2} | {:.2} | {:.2} | {} |\n",
            r.rows,
            r.cols,
            r.eager_ms,
            r.compiled_ms,
            r.eager_ms / r.compiled_ms,
            r.compiled_kernels
        ));
    }
    s
}
