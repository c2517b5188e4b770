//! Layers with parameters, and seeded initialisation. A layer holds its
//! parameters as leaf tensors that require grad; [`Module::parameters`]
//! lists them for an optimizer, which updates them in place.

use crate::device::Device;
use crate::error::Result;
use crate::metadata::{DType, Shape};
use crate::ops::Conv2dOptions;
use crate::tensor::Tensor;

/// Something with parameters.
pub trait Module {
    /// The parameters, in a fixed order.
    fn parameters(&self) -> Vec<Tensor>;
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
