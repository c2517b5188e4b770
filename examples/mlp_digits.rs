//! Trains a two-layer MLP on the 8x8 handwritten digits shipped in `data/`
//! with wgrad's eager autograd, and reports per-epoch loss, test accuracy
//! and time per epoch.
//!
//! ```sh
//! cargo run --release --example mlp_digits -- --epochs 30 --hidden 128 --lr 0.05
//! ```

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use wgrad::{DType, Device, Tensor};

struct Args {
    epochs: usize,
    batch: usize,
    hidden: usize,
    lr: f64,
    momentum: f64,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { epochs: 30, batch: 64, hidden: 128, lr: 0.05, momentum: 0.9, seed: 0 };
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
            "-h" | "--help" => {
                println!("usage: mlp_digits [--epochs N] [--batch N] [--hidden N] [--lr F] [--momentum F] [--seed N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.batch == 0 || args.hidden == 0 {
        return Err("--batch and --hidden must be positive".into());
    }
    Ok(args)
}

/// The digits set: 64 pixels (0..16) then the label, one image per line.
fn load_digits() -> Result<(Vec<f32>, Vec<u32>), String> {
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
    Ok((pixels, labels))
}

/// A deterministic shuffle (splitmix64-driven Fisher–Yates).
fn shuffle(order: &mut [usize], seed: u64) {
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

fn gather(pixels: &[f32], labels: &[u32], rows: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let mut x = Vec::with_capacity(rows.len() * 64);
    let mut y = Vec::with_capacity(rows.len());
    for &r in rows {
        x.extend_from_slice(&pixels[r * 64..(r + 1) * 64]);
        y.push(labels[r] as f32);
    }
    (x, y)
}

/// A linear layer's weight and bias, initialised like PyTorch's `nn.Linear`
/// (uniform in ±1/sqrt(fan_in)).
fn linear(fan_in: usize, fan_out: usize, seed: u64, device: &Device) -> wgrad::Result<[Tensor; 2]> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let w = Tensor::rand([fan_in, fan_out], seed, device)?.mul(2.0 * bound)?.sub(bound)?;
    let b = Tensor::rand([fan_out], seed + 1, device)?.mul(2.0 * bound)?.sub(bound)?;
    Ok([w.requires_grad(true)?, b.requires_grad(true)?])
}

fn forward(params: &[Tensor], x: &Tensor) -> wgrad::Result<Tensor> {
    let h = x.matmul(&params[0])?.add(&params[1])?.relu()?;
    h.matmul(&params[2])?.add(&params[3])
}

/// Mean cross-entropy of `logits` [B, 10] against integer labels (as f32
/// [B, 1]), via a numerically stable log-softmax.
fn cross_entropy(logits: &Tensor, labels: &Tensor, classes: &Tensor) -> wgrad::Result<Tensor> {
    let m = logits.max(&[-1], true)?.detach();
    let shifted = logits.sub(&m)?;
    let log_probs = shifted.sub(&shifted.exp()?.sum(&[-1], true)?.log()?)?;
    let one_hot = classes.eq(labels)?.to_dtype(DType::F32)?;
    log_probs.mul(&one_hot)?.sum_all()?.mul(-1.0 / logits.dims()[0] as f64)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let device = Device::new().map_err(|e| e.to_string())?;
    println!("adapter: {}", device.info());
    let (pixels, labels) = load_digits()?;
    let n = labels.len();
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, 12345);
    let n_test = n / 5;
    let (test_rows, train_rows) = order.split_at(n_test);
    println!("digits: {} train / {} test images, 8x8 pixels, 10 classes", train_rows.len(), test_rows.len());
    train(&args, &device, &pixels, &labels, train_rows, test_rows).map_err(|e| e.to_string())
}

fn train(
    args: &Args,
    device: &Device,
    pixels: &[f32],
    labels: &[u32],
    train_rows: &[usize],
    test_rows: &[usize],
) -> wgrad::Result<()> {
    let [w1, b1] = linear(64, args.hidden, args.seed * 10 + 1, device)?;
    let [w2, b2] = linear(args.hidden, 10, args.seed * 10 + 3, device)?;
    let mut params = vec![w1, b1, w2, b2];
    let mut velocity: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect::<wgrad::Result<_>>()?;
    let classes = Tensor::arange(0.0, 10.0, 1.0, device)?.reshape([1, 10])?;

    let (test_x, test_y) = gather(pixels, labels, test_rows);
    let test_x = Tensor::from_slice(&test_x, [test_rows.len(), 64], device)?;

    let steps = train_rows.len().div_ceil(args.batch);
    let bar = ProgressBar::new((args.epochs * steps) as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").expect("valid progress template"));
    let mut order = train_rows.to_vec();
    let mut epoch_times = Vec::new();
    let mut accuracy = 0.0;
    for epoch in 0..args.epochs {
        let start = Instant::now();
        shuffle(&mut order, args.seed.wrapping_add(epoch as u64));
        let (x, y) = gather(pixels, labels, &order);
        let x = Tensor::from_slice(&x, [order.len(), 64], device)?;
        let y = Tensor::from_slice(&y, [order.len(), 1], device)?;
        let mut loss_sum: Option<Tensor> = None;
        for step in 0..steps {
            let lo = step * args.batch;
            let len = args.batch.min(order.len() - lo);
            let logits = forward(&params, &x.narrow(0, lo, len)?)?;
            let loss = cross_entropy(&logits, &y.narrow(0, lo, len)?, &classes)?;
            loss.backward()?;
            let _no_grad = wgrad::no_grad();
            for (p, v) in params.iter_mut().zip(velocity.iter_mut()) {
                let g = p.grad().expect("every parameter receives a gradient");
                *v = v.mul(args.momentum)?.add(&g)?;
                *p = p.sub(&v.mul(args.lr)?)?.requires_grad(true)?;
            }
            let l = loss.detach();
            loss_sum = Some(match loss_sum {
                Some(s) => s.add(&l)?,
                None => l,
            });
            bar.inc(1);
        }
        let mean_loss = loss_sum.map(|s| s.to_scalar::<f32>()).transpose()?.unwrap_or(0.0) / steps as f32;
        let seconds = start.elapsed().as_secs_f64();
        epoch_times.push(seconds);

        let logits = {
            let _no_grad = wgrad::no_grad();
            forward(&params, &test_x)?.to_vec::<f32>()?
        };
        let correct = logits
            .chunks(10)
            .zip(&test_y)
            .filter(|(row, label)| {
                let best = row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
                best == **label as usize
            })
            .count();
        accuracy = correct as f64 / test_rows.len() as f64;
        let line = format!(
            "epoch {:>3}  loss {mean_loss:.4}  test accuracy {:.2}%  {:.0} ms",
            epoch + 1,
            accuracy * 100.0,
            seconds * 1e3
        );
        // A hidden bar (output not a terminal) swallows println: print directly.
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    }
    bar.finish_and_clear();
    let mut sorted = epoch_times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    println!(
        "final test accuracy {:.2}% after {} epochs; median {:.0} ms per epoch on {}",
        accuracy * 100.0,
        args.epochs,
        median * 1e3,
        device.info().name
    );
    Ok(())
}
