//! Trains a small convolutional network on the 8x8 digits in `data/`:
//! conv 3x3 (1→16) → ReLU → max-pool 2 → conv 3x3 (16→32) → ReLU →
//! max-pool 2 → linear (128→10), cross-entropy, Adam. `--compiled` trains
//! with the compiled backward, `--step` with the whole step (forward,
//! backward, Adam) compiled as one program; the report gives time per
//! epoch either way.
//!
//! ```sh
//! cargo run --release --example cnn_digits -- --epochs 15 [--compiled | --step]
//! ```

#[path = "digits/cnn.rs"]
mod cnn;
#[path = "digits/mod.rs"]
mod digits;

use cnn::Cnn;
use wgrad::nn::Module;
use wgrad::{Adam, ClassLoss, Device, Optimizer, Tensor, WgslCompiler};

fn main() {
    let defaults = digits::Args {
        epochs: 15,
        batch: 64,
        hidden: 0,
        lr: 0.01,
        momentum: 0.0,
        seed: 0,
        compiled: false,
        step: false,
    };
    if let Err(e) = digits::parse_args("cnn_digits", defaults).and_then(|a| run(&a).map_err(|e| e.to_string())) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &digits::Args) -> wgrad::Result<()> {
    let device = Device::new()?;
    println!("adapter: {}", device.info());
    let data = digits::load().map_err(|e| wgrad::Error::InvalidArgument { op: "load digits", message: e })?;
    let (train_rows, test_rows) = data.split();
    println!("digits: {} train / {} test images; {}", train_rows.len(), test_rows.len(), args.mode());
    let guard = if args.compiled { Some(WgslCompiler::install(&device)?) } else { None };

    let model = Cnn::new(args.seed * 100 + 1, &device)?;
    let mut opt = Adam::new(&model.parameters(), args.lr)?;
    // One training step; with --step it is traced once per batch shape and
    // replayed (the last, smaller batch is a second program).
    let mut train_step = |x: &[Tensor]| -> wgrad::Result<Vec<Tensor>> {
        opt.zero_grad();
        let loss = model.forward(&x[0])?.cross_entropy(&x[1], ClassLoss::default())?;
        loss.backward()?;
        opt.step()?;
        Ok(vec![loss])
    };
    let mut trainer = digits::Trainer::new(&device, args.step, &mut train_step);
    let (test_x, test_y) = data.batch(&test_rows);
    let test_x = Tensor::from_slice(&test_x, [test_rows.len(), 64], &device)?;

    let mut report = digits::Report::new();
    let mut order = train_rows.clone();
    let mut accuracy = 0.0;
    for epoch in 0..args.epochs {
        report.start_epoch();
        digits::shuffle(&mut order, args.seed.wrapping_add(epoch as u64));
        let mut loss_sum: Option<Tensor> = None;
        let steps = order.len().div_ceil(args.batch);
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
        }
        let mean_loss = loss_sum.map(|s| s.to_scalar::<f32>()).transpose()?.unwrap_or(0.0) / steps as f32;
        let logits = {
            let _no_grad = wgrad::no_grad();
            model.forward(&test_x)?.to_vec::<f32>()?
        };
        accuracy = digits::accuracy(&logits, &test_y);
        report.end_epoch(epoch, mean_loss, accuracy);
    }
    report.summary(accuracy, args.mode(), &device.info().name);
    if let Some(guard) = guard {
        digits::report_compiler(&guard.stats());
    }
    trainer.report();
    Ok(())
}
