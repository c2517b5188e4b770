//! Layers with parameters, and seeded initialisation. A layer holds its
//! parameters as leaf tensors that require grad; [`Module::parameters`]
//! lists them for an optimizer, which updates them in place.

use crate::device::Device;
use crate::error::Result;
use crate::metadata::{DType, Shape};
use crate::ops::Conv2dOptions;
use crate::tensor::Tensor;

/// Something with parameters, and a training or evaluation mode.
///
/// Modules start in training mode, as in PyTorch. `train(false)` (or
/// `eval()`) switches a module and everything it contains to evaluation
/// mode; layers whose forward depends on the mode ([`Dropout`] today)
/// override [`Module::train`] and [`Module::is_training`], and a module
/// made of other modules forwards `train` to each of them.
pub trait Module {
    /// The parameters, in a fixed order.
    fn parameters(&self) -> Vec<Tensor>;

    /// Sets training (`true`) or evaluation (`false`) mode. Layers that
    /// behave the same in both keep the default, which does nothing.
    fn train(&mut self, _mode: bool) {}

    /// Evaluation mode: `train(false)`.
    fn eval(&mut self) {
        self.train(false);
    }

    /// Whether the module is in training mode. Layers that behave the same
    /// in both modes report `true`, the mode they start in.
    fn is_training(&self) -> bool {
        true
    }
}

/// Inverted dropout as a layer (PyTorch's `nn.Dropout`): in training mode
/// each forward zeroes elements with probability `p` and scales the rest by
/// `1 / (1 - p)`; in evaluation mode it is the identity. Each forward draws
/// a new mask from `seed` and a call counter, so a run is reproducible from
/// its seed.
pub struct Dropout {
    /// The probability of zeroing an element, in [0, 1].
    pub p: f64,
    seed: u64,
    /// Forward calls so far (shared with compiled steps, which advance it).
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    training: bool,
}

impl Dropout {
    /// A dropout layer in training mode; `p` outside [0, 1] is an `Err`.
    pub fn new(p: f64, seed: u64) -> Result<Dropout> {
        if !(0.0..=1.0).contains(&p) {
            return Err(crate::Error::InvalidArgument {
                op: "Dropout::new",
                message: format!("p must be in [0, 1], got {p}"),
            });
        }
        Ok(Dropout { p, seed, calls: Default::default(), training: true })
    }

    /// Applies dropout in training mode; returns `x` itself in evaluation mode.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.training {
            return x.dropout(self.p, 0, false);
        }
        use std::sync::atomic::Ordering;
        // Distinct, well-mixed seeds per call (splitmix64's increment).
        let seed_of = |base: u64, call: u64| base.wrapping_add(call.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if crate::compiler::trace::is_step() {
            // In a compiled step the seed is data: the host computes it from
            // the counter at every call (this forward being the `k`-th of
            // the step's), and the counter advances when the step runs.
            let (calls, base) = (self.calls.clone(), self.seed);
            let k = crate::compiler::trace::uses_of(std::sync::Arc::as_ptr(&self.calls) as usize);
            let words = move |_: &[Tensor]| {
                let seed = seed_of(base, calls.load(Ordering::Relaxed) + k);
                Ok(vec![seed as u32, (seed >> 32) as u32])
            };
            let seeds = crate::compiler::trace::host_input(Box::new(words), crate::DType::U32, x.device())?;
            let calls = self.calls.clone();
            crate::compiler::trace::on_commit(Box::new(move || {
                calls.fetch_add(1, Ordering::Relaxed);
            }));
            return x.dropout_seeded_by(self.p, &seeds);
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        x.dropout(self.p, seed_of(self.seed, call), true)
    }
}

impl Module for Dropout {
    fn parameters(&self) -> Vec<Tensor> {
        Vec::new()
    }
    fn train(&mut self, mode: bool) {
        self.training = mode;
    }
    fn is_training(&self) -> bool {
        self.training
    }
}

/// Uniform in `[-bound, bound)` from `seed`, requiring grad.
pub fn uniform(shape: impl Into<Shape>, bound: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let _no_grad = crate::no_grad();
    Tensor::rand(shape, seed, device)?.mul(2.0 * bound)?.sub(bound)?.requires_grad(true)
}

/// Kaiming (He) uniform for ReLU layers: bound `sqrt(6 / fan_in)`.
pub fn kaiming_uniform(shape: impl Into<Shape>, fan_in: usize, seed: u64, device: &Device) -> Result<Tensor> {
    uniform(shape, (6.0 / fan_in.max(1) as f64).sqrt(), seed, device)
}

/// Xavier (Glorot) uniform: bound `sqrt(6 / (fan_in + fan_out))`.
pub fn xavier_uniform(
    shape: impl Into<Shape>,
    fan_in: usize,
    fan_out: usize,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    uniform(shape, (6.0 / (fan_in + fan_out).max(1) as f64).sqrt(), seed, device)
}

/// `y = x Wᵀ + b`, W [out, in]; initialised as PyTorch's `nn.Linear`
/// (uniform in ±1/sqrt(in) for weight and bias).
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A layer from `inputs` to `outputs` features, seeded.
    pub fn new(inputs: usize, outputs: usize, bias: bool, seed: u64, device: &Device) -> Result<Linear> {
        let bound = 1.0 / (inputs.max(1) as f64).sqrt();
        let weight = uniform([outputs, inputs], bound, seed, device)?;
        let bias = if bias { Some(uniform([outputs], bound, seed.wrapping_add(1), device)?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// Applies the layer to `x` [..., in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn parameters(&self) -> Vec<Tensor> {
        std::iter::once(self.weight.clone()).chain(self.bias.clone()).collect()
    }
}

/// 2-D convolution layer, initialised as PyTorch's `nn.Conv2d`.
pub struct Conv2d {
    /// `[out_channels, in_channels / groups, kh, kw]`.
    pub weight: Tensor,
    /// `[out_channels]`.
    pub bias: Option<Tensor>,
    /// Stride, padding, dilation, groups.
    pub options: Conv2dOptions,
}

impl Conv2d {
    /// A layer from `inputs` to `outputs` channels with a `kernel` window;
    /// `options.groups` splits the channels as PyTorch's `groups` (it must
    /// divide both `inputs` and `outputs`, or this is an `Err`), and the
    /// initialisation bound is PyTorch's `1 / sqrt(fan_in)` with `fan_in =
    /// inputs / groups * kh * kw`.
    pub fn new(
        inputs: usize,
        outputs: usize,
        kernel: [usize; 2],
        options: Conv2dOptions,
        bias: bool,
        seed: u64,
        device: &Device,
    ) -> Result<Conv2d> {
        crate::ops::check_groups(inputs, outputs, options.groups)?;
        let per_group = inputs / options.groups;
        let fan_in = per_group * kernel[0] * kernel[1];
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let weight = uniform([outputs, per_group, kernel[0], kernel[1]], bound, seed, device)?;
        let bias = if bias { Some(uniform([outputs], bound, seed.wrapping_add(1), device)?) } else { None };
        Ok(Conv2d { weight, bias, options })
    }

    /// Applies the layer to `x` [n, c, h, w].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.bias.as_ref(), self.options)
    }
}

impl Module for Conv2d {
    fn parameters(&self) -> Vec<Tensor> {
        std::iter::once(self.weight.clone()).chain(self.bias.clone()).collect()
    }
}

/// Layer normalisation over the trailing `shape` dims, with a learned
/// scale (ones) and shift (zeros).
pub struct LayerNorm {
    /// Scale, of the normalised shape.
    pub weight: Tensor,
    /// Shift, of the normalised shape.
    pub bias: Tensor,
    /// The normalised trailing dims.
    pub shape: Vec<usize>,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// A layer normalising the trailing `shape` dims.
    pub fn new(shape: &[usize], eps: f64, device: &Device) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: Tensor::ones(shape.to_vec(), DType::F32, device)?.requires_grad(true)?,
            bias: Tensor::zeros(shape.to_vec(), DType::F32, device)?.requires_grad(true)?,
            shape: shape.to_vec(),
            eps,
        })
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(&self.shape, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

impl Module for LayerNorm {
    fn parameters(&self) -> Vec<Tensor> {
        vec![self.weight.clone(), self.bias.clone()]
    }
}

/// A lookup table of `vocabulary` vectors of `dim`, initialised N(0, 1)
/// as PyTorch's `nn.Embedding`.
pub struct Embedding {
    /// [vocabulary, dim].
    pub weight: Tensor,
}

impl Embedding {
    /// A table of `vocabulary` rows of `dim`, seeded.
    pub fn new(vocabulary: usize, dim: usize, seed: u64, device: &Device) -> Result<Embedding> {
        let weight = crate::no_grad_scope(|| Tensor::randn([vocabulary, dim], seed, device))?.requires_grad(true)?;
        Ok(Embedding { weight })
    }

    /// The rows for integer `ids` (any shape): `ids.shape + [dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        crate::ops::embedding(ids, &self.weight)
    }
}

impl Module for Embedding {
    fn parameters(&self) -> Vec<Tensor> {
        vec![self.weight.clone()]
    }
}
