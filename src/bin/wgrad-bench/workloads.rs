//! The five benchmark workloads of the project's WORKLOADS.md, exactly as
//! written (or scaled down for smoke runs), two more that need more than
//! WebGPU's 8 storage bindings per kernel unless tensors share buffers
//! (W7: Adam over 20 parameters; W8: a sum of 40 inputs and its backward),
//! and the digits CNN of the examples on one batch of 64 (CNN). Shared by
//! `wgrad-bench` and the criterion benches.

#![allow(dead_code)]

#[path = "../../../examples/digits/cnn.rs"]
mod cnn;

use std::sync::Arc;

use wgrad::nn::Module;
use wgrad::{Adam, ClassLoss, Device, Optimizer, Sgd, Tensor};

/// Which workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Id {
    W1,
    W2,
    W3,
    W4,
    W5,
    W7,
    W8,
    Cnn,
}

/// WORKLOADS.md's workloads.
pub const ALL: [Id; 5] = [Id::W1, Id::W2, Id::W3, Id::W4, Id::W5];
/// The binding-limit workloads and the digits CNN (not in WORKLOADS.md).
pub const WIDE: [Id; 3] = [Id::W7, Id::W8, Id::Cnn];

impl Id {
    pub fn name(self) -> &'static str {
        match self {
            Id::W1 => "W1 mlp",
            Id::W2 => "W2 elementwise",
            Id::W3 => "W3 matmul",
            Id::W4 => "W4 norm-softmax",
            Id::W5 => "W5 tiny-chain",
            Id::W7 => "W7 adam-20",
            Id::W8 => "W8 sum-40",
            Id::Cnn => "CNN digits",
        }
    }

    pub fn parse(s: &str) -> Option<Id> {
        ALL.into_iter().chain(WIDE).find(|id| format!("{id:?}").eq_ignore_ascii_case(s.trim()))
    }
}

/// Uniform in [-1, 1) from a seed, as WORKLOADS.md fills inputs.
fn uniform(shape: &[usize], seed: u64, scale: f64, device: &Device) -> wgrad::Result<Tensor> {
    Tensor::rand(shape.to_vec(), seed, device)?.mul(2.0 * scale)?.sub(scale)
}

/// A workload's tensors, ready to step.
pub struct Workload {
    pub id: Id,
    leaves: Vec<Tensor>,
    data: Vec<Tensor>,
    optimizer: Option<Box<dyn Optimizer>>,
    /// The digits CNN (its parameters are `leaves`).
    model: Option<Arc<cnn::Cnn>>,
    /// Floating-point operations of one step (forward + backward), if the
    /// workload is compute-bound.
    pub flops: Option<f64>,
    /// Bytes one step must move at least (inputs read, gradients written),
    /// if the workload is memory-bound.
    pub bytes: Option<f64>,
}

impl Workload {
    /// Builds workload `id`; `small` shrinks sizes for smoke runs.
    pub fn new(id: Id, device: &Device, small: bool) -> wgrad::Result<Workload> {
        let leaf = |shape: &[usize], seed: u64, scale: f64| uniform(shape, seed, scale, device)?.requires_grad(true);
        let mut w = Workload {
            id,
            leaves: Vec::new(),
            data: Vec::new(),
            optimizer: None,
            model: None,
            flops: None,
            bytes: None,
        };
        match id {
            Id::W1 => {
                let (batch, inp, hidden) = if small { (16, 64, 32) } else { (64, 784, 512) };
                let labels: Vec<i32> = (0..batch as u64).map(|i| (splitmix(i + 7) % 10) as i32).collect();
                w.data = vec![uniform(&[batch, inp], 1, 1.0, device)?, Tensor::from_slice(&labels, [batch], device)?];
                w.leaves = vec![
                    leaf(&[inp, hidden], 2, 1.0 / (inp as f64).sqrt())?,
                    leaf(&[hidden], 3, 1.0)?,
                    leaf(&[hidden, hidden], 4, 1.0 / (hidden as f64).sqrt())?,
                    leaf(&[hidden], 5, 1.0)?,
                    leaf(&[hidden, 10], 6, 1.0 / (hidden as f64).sqrt())?,
                    leaf(&[10], 7, 1.0)?,
                ];
                w.optimizer = Some(Box::new(Sgd::new(&w.leaves, 0.01, 0.0, 0.0)?));
                let mm = (batch * inp * hidden + batch * hidden * hidden + batch * hidden * 10) as f64;
                w.flops = Some(6.0 * mm);
            }
            Id::W2 => {
                let n = if small { 1 << 12 } else { 1 << 20 };
                w.leaves = vec![leaf(&[n], 1, 1.0)?, leaf(&[n], 2, 1.0)?, leaf(&[n], 3, 1.0)?];
                w.bytes = Some(9.0 * 4.0 * n as f64); // read x, a, b twice; write three gradients
            }
            Id::W3 => {
                let n = if small { 64 } else { 1024 };
                w.leaves = vec![leaf(&[n, n], 1, 1.0)?, leaf(&[n, n], 2, 1.0)?];
                w.flops = Some(6.0 * (n as f64).powi(3)); // forward and two gradient products
            }
            Id::W4 => {
                let (rows, cols) = if small { (16, 64) } else { (256, 1024) };
                w.leaves = vec![leaf(&[rows, cols], 1, 1.0)?, leaf(&[cols], 2, 1.0)?, leaf(&[cols], 3, 1.0)?];
                w.data = vec![uniform(&[rows, cols], 4, 1.0, device)?];
            }
            Id::W5 => {
                w.leaves = vec![leaf(&[16], 1, 1.0)?];
            }
            Id::W7 => {
                // 20 parameters of 64..1,280 elements; loss = sum of each
                // one's squares, then Adam (parameter, gradient and two
                // moments per parameter: 80 tensors in one update).
                w.leaves = (0..20u64).map(|i| leaf(&[64 * (1 + i as usize)], 10 + i, 1.0)).collect::<Result<_, _>>()?;
                w.optimizer = Some(Box::new(Adam::new(&w.leaves, 1e-3)?));
            }
            Id::W8 => {
                // 40 inputs of 4,096 elements, summed elementwise (one
                // merged kernel reading 40 tensors), then squared and summed.
                let n = if small { 256 } else { 4096 };
                w.leaves = (0..40u64).map(|i| leaf(&[n], 100 + i, 1.0)).collect::<Result<_, _>>()?;
            }
            Id::Cnn => {
                // The digits CNN (conv 16, pool, conv 32, pool, linear) on one
                // batch of 64 8x8 images, cross-entropy, Adam: the examples' step.
                let batch = if small { 8 } else { 64 };
                let model = cnn::Cnn::new(1, device)?;
                w.leaves = model.parameters();
                let labels: Vec<i32> = (0..batch as u64).map(|i| (splitmix(i + 11) % 10) as i32).collect();
                let pixels = Tensor::rand([batch, 64], 12, device)?;
                w.data = vec![pixels, Tensor::from_slice(&labels, [batch], device)?];
                w.optimizer = Some(Box::new(Adam::new(&w.leaves, 0.01)?));
                w.model = Some(Arc::new(model));
            }
        }
        Ok(w)
    }

    /// The loss (recorded graph) of one forward pass.
    fn loss(&self) -> wgrad::Result<Tensor> {
        loss_of(self.id, &self.leaves, &self.data, self.model.as_deref())
    }

    /// One step: forward, backward (and W1's SGD update), loss read back once.
    pub fn step(&mut self) -> wgrad::Result<f32> {
        self.step_observed(|| {})
    }

    /// [`Self::step`], calling `before_backward` between forward and backward.
    pub fn step_observed(&mut self, before_backward: impl FnOnce()) -> wgrad::Result<f32> {
        for p in &self.leaves {
            p.zero_grad();
        }
        let loss = self.loss()?;
        before_backward();
        loss.backward()?;
        if let Some(opt) = &mut self.optimizer {
            opt.step()?;
        }
        loss.to_scalar::<f32>()
    }

    /// The same step (zero_grad, forward, backward, update) as a compiled
    /// step (`wgrad::compile_step`), its data passed as arguments; each call
    /// replays it and reads the loss back once. Takes the optimizer.
    /// The step compiled, and where each call leaves the bytes its program
    /// owns and the liveness bound of its plan (see `ProgramReport`).
    pub fn compiled_step(&mut self, device: &Device) -> (Box<dyn FnMut() -> wgrad::Result<f32>>, PlanBytes) {
        let (id, leaves, data, model) = (self.id, self.leaves.clone(), self.data.clone(), self.model.clone());
        let mut optimizer = self.optimizer.take();
        let mut step = wgrad::compile_step(device, move |args: &[Tensor]| {
            for p in &leaves {
                p.zero_grad();
            }
            let loss = loss_of(id, &leaves, args, model.as_deref())?;
            loss.backward()?;
            if let Some(opt) = &mut optimizer {
                opt.step()?;
            }
            Ok(vec![loss])
        });
        let plan = PlanBytes::default();
        let seen = plan.clone();
        let run = move || {
            let loss = step.call(&data)?[0].to_scalar::<f32>();
            if let Some(r) = step.reports().last() {
                seen.set((r.program_bytes, r.liveness_bound_bytes));
            }
            loss
        };
        (Box::new(run), plan)
    }
}

/// A compiled step's program bytes and liveness bound, after its last call.
pub type PlanBytes = std::rc::Rc<std::cell::Cell<(u64, u64)>>;

/// The loss of workload `id` on parameters `p` and data `data` (the CNN's
/// parameters are its model's).
fn loss_of(id: Id, p: &[Tensor], data: &[Tensor], model: Option<&cnn::Cnn>) -> wgrad::Result<Tensor> {
    {
        match id {
            Id::W1 => {
                let h1 = data[0].matmul(&p[0])?.add(&p[1])?.relu()?;
                let h2 = h1.matmul(&p[2])?.add(&p[3])?.relu()?;
                h2.matmul(&p[4])?.add(&p[5])?.cross_entropy(&data[1], ClassLoss::default())
            }
            Id::W2 => {
                let (x, a, b) = (&p[0], &p[1], &p[2]);
                x.mul(a)?.add(b)?.tanh()?.mul(&x.sigmoid()?)?.add(&x.mul(x)?.neg()?.exp()?)?.sum_all()
            }
            Id::W3 => p[0].matmul(&p[1])?.sum_all(),
            Id::W4 => {
                let cols = p[0].dims()[1];
                let y = p[0].layer_norm(&[cols], None, None, 1e-5)?.mul(&p[1])?.add(&p[2])?;
                y.softmax(-1)?.mul(&data[0])?.sum_all()
            }
            Id::W5 => {
                let mut x = p[0].clone();
                for _ in 0..50 {
                    x = x.sin()?.mul(0.9)?.add(&x.mul(0.1)?)?;
                }
                x.sum_all()
            }
            Id::W7 => {
                let mut total = p[0].square()?.sum_all()?;
                for q in &p[1..] {
                    total = total.add(&q.square()?.sum_all()?)?;
                }
                Ok(total)
            }
            Id::W8 => {
                let mut total = p[0].clone();
                for q in &p[1..] {
                    total = total.add(q)?;
                }
                total.square()?.sum_all()
            }
            Id::Cnn => {
                let model = model.ok_or(wgrad::Error::InvalidArgument {
                    op: "CNN workload",
                    message: "the model is missing".into(),
                })?;
                model.forward(&data[0])?.cross_entropy(&data[1], ClassLoss::default())
            }
        }
    }
}

impl Workload {
    /// Bytes of the parameters' gradients (one f32 per parameter element).
    pub fn gradient_bytes(&self) -> u64 {
        self.leaves.iter().map(|p| 4 * p.numel() as u64).sum()
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
