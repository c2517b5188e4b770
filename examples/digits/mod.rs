//! Shared by the digits examples: the data set, a seeded shuffle, batches,
//! command-line options and the training report.

#![allow(dead_code)]

use std::time::Instant;

/// Options common to the examples (each sets its own defaults).
pub struct Args {
    pub epochs: usize,
    pub batch: usize,
    pub hidden: usize,
    pub lr: f64,
    pub momentum: f64,
    pub seed: u64,
    /// Train with the compiled backward (`--compiled`).
    pub compiled: bool,
    /// Train with the whole step compiled (`--step`: `wgrad::compile_step`).
    pub step: bool,
}

impl Args {
    /// How the examples train.
    pub fn mode(&self) -> &'static str {
        match (self.step, self.compiled) {
            (true, _) => "compiled step",
            (false, true) => "compiled backward",
            (false, false) => "eager backward",
        }
    }
}

/// A training step run eagerly or, with `--step`, as a compiled step.
pub enum Trainer<F> {
    Eager(F),
    Step(wgrad::CompiledStep<F>),
}

impl<F> Trainer<F>
where
    F: FnMut(&[wgrad::Tensor]) -> wgrad::Result<Vec<wgrad::Tensor>>,
{
    pub fn new(device: &wgrad::Device, compiled: bool, step: F) -> Trainer<F> {
        match compiled {
            true => Trainer::Step(wgrad::compile_step(device, step)),
            false => Trainer::Eager(step),
        }
    }

    /// One step on (inputs, labels); returns the loss.
    pub fn call(&mut self, x: wgrad::Tensor, y: wgrad::Tensor) -> wgrad::Result<wgrad::Tensor> {
        let returned = match self {
            Trainer::Eager(f) => f(&[x, y])?,
            Trainer::Step(s) => s.call(&[x, y])?,
        };
        returned
            .into_iter()
            .next()
            .ok_or(wgrad::Error::InvalidArgument { op: "training step", message: "the step returned no loss".into() })
    }

    /// What the compiled step did (`None` when eager).
    pub fn stats(&self) -> Option<wgrad::StepStats> {
        match self {
            Trainer::Step(s) => Some(s.stats()),
            Trainer::Eager(_) => None,
        }
    }

    /// Prints what the compiled step did (nothing when eager).
    pub fn report(&self) {
        if let Some(s) = self.stats() {
            println!(
                "compiled step: {} traces, {} replays ({} at a new batch size, not traced), {} graph breaks, {} \
                 kernels per replay",
                s.traces, s.replays, s.replans, s.graph_breaks, s.kernels_last_replay
            );
        }
    }
}

/// Prints what the compiled backward did.
pub fn report_compiler(s: &wgrad::CompilerStats) {
    println!(
        "compiler: {} captures, {} cache hits, {} misses ({} traced, {} re-planned from a batch family), {} kernels \
         per replay",
        s.captures,
        s.cache_hits,
        s.cache_misses,
        s.cache_misses - s.replans,
        s.replans,
        s.kernels_last_replay
    );
}

pub fn parse_args(name: &str, mut args: Args) -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--epochs" => args.epochs = value()?.parse().map_err(|e| format!("--epochs: {e}"))?,
            "--batch" => args.batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--hidden" => args.hidden = value()?.parse().map_err(|e| format!("--hidden: {e}"))?,
            "--lr" => args.lr = value()?.parse().map_err(|e| format!("--lr: {e}"))?,
            "--momentum" => args.momentum = value()?.parse().map_err(|e| format!("--momentum: {e}"))?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--compiled" => args.compiled = true,
            "--step" => args.step = true,
            "-h" | "--help" => {
                println!(
                    "usage: {name} [--epochs N] [--batch N] [--hidden N] [--lr F] [--momentum F] [--seed N] [--compiled | --step]\n\
                     defaults: --epochs {} --batch {} --hidden {} --lr {} --momentum {} --seed {}",
                    args.epochs, args.batch, args.hidden, args.lr, args.momentum, args.seed
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

/// The digits set: 64 pixels (0..16, scaled to 0..1) and a label per image.
pub struct Digits {
    pub pixels: Vec<f32>,
    pub labels: Vec<i32>,
}

pub fn load() -> Result<Digits, String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 65 {
            return Err(format!("{path}:{}: expected 65 fields, got {}", n + 1, fields.len()));
        }
        for f in &fields[..64] {
            let v: f32 = f.trim().parse().map_err(|e| format!("{path}:{}: {e}", n + 1))?;
            pixels.push(v / 16.0);
        }
        labels.push(fields[64].trim().parse().map_err(|e| format!("{path}:{}: {e}", n + 1))?);
    }
    Ok(Digits { pixels, labels })
}

impl Digits {
    /// A fixed split: a seeded shuffle, the first fifth for testing.
    pub fn split(&self) -> (Vec<usize>, Vec<usize>) {
        let mut order: Vec<usize> = (0..self.labels.len()).collect();
        shuffle(&mut order, 12345);
        let n_test = order.len() / 5;
        (order[n_test..].to_vec(), order[..n_test].to_vec())
    }

    /// Pixels and labels of `rows`, in that order.
    pub fn batch(&self, rows: &[usize]) -> (Vec<f32>, Vec<i32>) {
        let mut x = Vec::with_capacity(rows.len() * 64);
        let mut y = Vec::with_capacity(rows.len());
        for &r in rows {
            x.extend_from_slice(&self.pixels[r * 64..(r + 1) * 64]);
            y.push(self.labels[r]);
        }
        (x, y)
    }
}

/// A deterministic shuffle (splitmix64-driven Fisher–Yates).
pub fn shuffle(order: &mut [usize], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..order.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
}

/// The fraction of rows of `logits` [n, 10] whose arg-max is the label.
pub fn accuracy(logits: &[f32], labels: &[i32]) -> f64 {
    let correct = logits
        .chunks(10)
        .zip(labels)
        .filter(|(row, label)| {
            let best = row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
            best as i32 == **label
        })
        .count();
    correct as f64 / labels.len().max(1) as f64
}

/// Times epochs and prints one line per epoch and a summary.
pub struct Report {
    times: Vec<f64>,
    start: Instant,
}

impl Report {
    pub fn new() -> Report {
        Report { times: Vec::new(), start: Instant::now() }
    }

    pub fn start_epoch(&mut self) {
        self.start = Instant::now();
    }

    pub fn end_epoch(&mut self, epoch: usize, loss: f32, accuracy: f64) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.times.push(seconds);
        println!(
            "epoch {:>3}  loss {loss:.4}  test accuracy {:.2}%  {:.0} ms",
            epoch + 1,
            accuracy * 100.0,
            seconds * 1e3
        );
    }

    /// Median over epochs after the first (which pays pipeline creation
    /// and, compiled, the capture).
    pub fn summary(&self, accuracy: f64, mode: &str, adapter: &str) {
        let mut later: Vec<f64> = self.times.iter().skip(1).copied().collect();
        if later.is_empty() {
            later = self.times.clone();
        }
        later.sort_by(f64::total_cmp);
        let median = later.get(later.len() / 2).copied().unwrap_or(0.0);
        println!(
            "final test accuracy {:.2}% after {} epochs; {mode}: first epoch {:.0} ms, median later epoch {:.0} ms on {adapter}",
            accuracy * 100.0,
            self.times.len(),
            self.times.first().copied().unwrap_or(0.0) * 1e3,
            median * 1e3
        );
    }
}
