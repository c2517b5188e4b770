//! Trains a two-layer MLP on the 8x8 handwritten digits shipped in `data/`
//! (64 → hidden → 10, ReLU, cross-entropy, SGD with momentum) and reports
//! per-epoch loss, test accuracy and time per epoch. `--compiled` trains
//! with the compiled backward, `--step` with the whole step (forward,
//! backward, SGD) compiled as one program.
//!
//! ```sh
//! cargo run --release --example mlp_digits -- --epochs 30 --hidden 128 --lr 0.05 [--compiled | --step]
//! ```

#[path = "digits/mod.rs"]
mod digits;

use indicatif::{ProgressBar, ProgressStyle};
use wgrad::nn::{Linear, Module};
use wgrad::{ClassLoss, Device, Optimizer, Sgd, Tensor, WgslCompiler};

fn main() {
    let defaults = digits::Args {
        epochs: 30,
        batch: 64,
        hidden: 128,
        lr: 0.05,
        momentum: 0.9,
        seed: 0,
        compiled: false,
        step: false,
    };
    if let Err(e) = digits::parse_args("mlp_digits", defaults).and_then(|a| run(&a).map_err(|e| e.to_string())) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &digits::Args) -> wgrad::Result<()> {
    let device = Device::new()?;
    println!("adapter: {}", device.info());
    let data = digits::load().map_err(|e| wgrad::Error::InvalidArgument { op: "load digits", message: e })?;
    let (train_rows, test_rows) = data.split();
    let mode = args.mode();
    println!("digits: {} train / {} test images, 8x8 pixels, 10 classes; {mode}", train_rows.len(), test_rows.len());
    let guard = if args.compiled { Some(WgslCompiler::install(&device)?) } else { None };

    let l1 = Linear::new(64, args.hidden, true, args.seed * 10 + 1, &device)?;
    let l2 = Linear::new(args.hidden, 10, true, args.seed * 10 + 3, &device)?;
    let forward = |x: &Tensor| l2.forward(&l1.forward(x)?.relu()?);
    let params = [l1.parameters(), l2.parameters()].concat();
    let mut opt = Sgd::new(&params, args.lr, args.momentum, 0.0)?;
    // One training step; with --step it is traced at the first batch size
    // and replayed; the last, smaller batch is the same program lowered at
    // its size, not traced again.
    let mut train_step = |xy: &[Tensor]| -> wgrad::Result<Vec<Tensor>> {
        opt.zero_grad();
        let loss = forward(&xy[0])?.cross_entropy(&xy[1], ClassLoss::default())?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    };
    let mut trainer = digits::Trainer::new(&device, args.step, &mut train_step);
    let (test_x, test_y) = data.batch(&test_rows);
    let test_x = Tensor::from_slice(&test_x, [test_rows.len(), 64], &device)?;

    let steps = train_rows.len().div_ceil(args.batch);
    let bar = ProgressBar::new((args.epochs * steps) as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").expect("valid progress template"));
    let mut report = digits::Report::new();
    let mut order = train_rows.clone();
    let mut accuracy = 0.0;
    for epoch in 0..args.epochs {
        report.start_epoch();
        digits::shuffle(&mut order, args.seed.wrapping_add(epoch as u64));
        let mut loss_sum: Option<Tensor> = None;
        for rows in order.chunks(args.batch) {
            let (x, y) = data.batch(rows);
            let x = Tensor::from_slice(&x, [rows.len(), 64], &device)?;
            let y = Tensor::from_slice(&y, [rows.len()], &device)?;
            let loss = trainer.call(x, y)?;
            let l = loss.detach();
            loss_sum = Some(match loss_sum {
                Some(s) => s.add(&l)?,
                None => l,
            });
            bar.inc(1);
        }
        let mean_loss = loss_sum.map(|s| s.to_scalar::<f32>()).transpose()?.unwrap_or(0.0) / steps as f32;
        let logits = {
            let _no_grad = wgrad::no_grad();
            forward(&test_x)?.to_vec::<f32>()?
        };
        accuracy = digits::accuracy(&logits, &test_y);
        bar.suspend(|| report.end_epoch(epoch, mean_loss, accuracy));
    }
    bar.finish_and_clear();
    report.summary(accuracy, mode, &device.info().name);
    if let Some(guard) = guard {
        digits::report_compiler(&guard.stats());
    }
    trainer.report();
    Ok(())
}
