//! 2-D convolution and pooling (NCHW) as a gather and a matmul / reduction.
//! im2col is a gather whose map depends only on the geometry (cached on
//! the host); padding reads a sentinel element appended to the input (zero,
//! or -inf for max pooling). The convolution itself is one tiled matmul,
//! and every gradient, col2im included, is the transpose of a primitive.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::metadata::DeviceId;
use crate::metadata::Shape;
use crate::ops::index::{IndexMap, batched_index_map, gather_batched};
use crate::tensor::Tensor;

/// Stride, padding and dilation of a convolution, per spatial dim (h, w),
/// and its channel groups. Build it with `..Default::default()` so that
/// fields added later keep PyTorch's defaults:
///
/// ```
/// let depthwise = wgrad::Conv2dOptions { padding: [1, 1], groups: 8, ..Default::default() };
/// # assert_eq!(depthwise.stride, [1, 1]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dOptions {
    /// Step between windows.
    pub stride: [usize; 2],
    /// Zeros added on each side.
    pub padding: [usize; 2],
    /// Spacing between kernel taps.
    pub dilation: [usize; 2],
    /// Channel groups, as PyTorch's `groups` (default 1): the input
    /// channels and the output channels are split into `groups` equal
    /// parts and output part `g` sees only input part `g`, so the weight
    /// is `[out_channels, in_channels / groups, kh, kw]`. `groups ==
    /// in_channels` is a depthwise convolution.
    pub groups: usize,
}

impl Default for Conv2dOptions {
    fn default() -> Conv2dOptions {
        Conv2dOptions { stride: [1, 1], padding: [0, 0], dilation: [1, 1], groups: 1 }
    }
}

/// Checks that `groups` splits `in_channels` and `out_channels` evenly
/// (PyTorch's rule for grouped convolution).
pub(crate) fn check_groups(in_channels: usize, out_channels: usize, groups: usize) -> Result<()> {
    if groups == 0 || !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
        return Err(Error::InvalidArgument {
            op: "conv2d",
            message: format!(
                "groups {groups} must be at least 1 and divide both in_channels {in_channels} and \
                 out_channels {out_channels}; pick a common divisor (1 for an ordinary convolution)"
            ),
        });
    }
    Ok(())
}

/// Options of [`Tensor::max_pool2d_with`] and [`Tensor::avg_pool2d_with`],
/// as PyTorch's `max_pool2d` / `avg_pool2d` arguments; the default is
/// PyTorch's (stride = kernel, no padding, floor mode, padding counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pool2dOptions {
    /// Step between windows; `None` is the kernel size (PyTorch's default).
    pub stride: Option<[usize; 2]>,
    /// Implicit padding on each side (-inf for max, zeros for avg); at most
    /// half the kernel, as in PyTorch.
    pub padding: [usize; 2],
    /// Round the output size up instead of down: a last, partial window
    /// is kept if it starts inside the input or the leading padding
    /// (PyTorch drops one that would start in the trailing padding).
    pub ceil_mode: bool,
    /// Average pooling divides by the window's extent inside the padded
    /// input (true, PyTorch's default) or by its input elements only
    /// (false). Max pooling ignores it.
    pub count_include_pad: bool,
}

impl Default for Pool2dOptions {
    fn default() -> Pool2dOptions {
        Pool2dOptions { stride: None, padding: [0, 0], ceil_mode: false, count_include_pad: true }
    }
}

/// Window geometry: input [n, c, h, w], kernel [kh, kw], and options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Windows {
    input: [usize; 4],
    kernel: [usize; 2],
    options: Conv2dOptions,
    /// Channel-major windows [n, c, oh, ow, kh, kw] (pooling) instead of
    /// [n, oh, ow, c, kh, kw] (im2col rows for the matmul).
    channel_major: bool,
    /// Pooling's `ceil_mode`: the output size rounds up, so a last window
    /// may overhang the padded input (its taps past the end read the
    /// sentinel).
    ceil_mode: bool,
}

impl Windows {
    /// The output size (oh, ow), checked: every product here is of user
    /// numbers, so overflow is an error rather than a wrapped size.
    fn output(&self, op: &'static str) -> Result<[usize; 2]> {
        let mut out = [0; 2];
        for (a, slot) in out.iter_mut().enumerate() {
            let (pad, dil, k) = (self.options.padding[a], self.options.dilation[a], self.kernel[a]);
            let size = pad.checked_mul(2).and_then(|p| p.checked_add(self.input[2 + a]));
            let span = dil.checked_mul(k.saturating_sub(1)).and_then(|s| s.checked_add(1));
            let (Some(size), Some(span)) = (size, span) else {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "padding {:?} or dilation {:?} is too large (the window arithmetic overflows); \
                         use sizes on the order of the input",
                        self.options.padding, self.options.dilation
                    ),
                });
            };
            if self.options.stride[a] == 0 || dil == 0 || k == 0 || span > size {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "a {:?} kernel (dilation {:?}, padding {:?}, stride {:?}) does not fit input {:?}",
                        self.kernel, self.options.dilation, self.options.padding, self.options.stride, self.input
                    ),
                });
            }
            let stride = self.options.stride[a];
            *slot = if self.ceil_mode { (size - span).div_ceil(stride) } else { (size - span) / stride } + 1;
            // PyTorch's rule: a last window that would start in the trailing
            // padding is dropped, so every window holds an input element.
            if self.ceil_mode && (*slot - 1).saturating_mul(stride) >= self.input[2 + a] + pad {
                *slot -= 1;
            }
        }
        // The gather map addresses the padded input and the windows with u32
        // offsets, and is built on the host: refuse sizes it cannot hold.
        // (Each image with its own padding element: n (c h w + 1) in all.)
        let [n, c, h, w] = self.input;
        let taps = [n, c, out[0], out[1], self.kernel[0], self.kernel[1]];
        let windows = taps.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let image = [c, h, w].iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).and_then(|x| x.checked_add(1));
        let padded = image.and_then(|i| i.checked_mul(n));
        match (windows, padded) {
            (Some(windows), Some(padded)) if windows <= u32::MAX as usize && padded <= u32::MAX as usize => Ok(out),
            _ => Err(Error::InvalidArgument {
                op,
                message: format!(
                    "input {:?} with a {:?} kernel and options {:?} makes more than 2^32 window elements; \
                     use a smaller input, padding or dilation",
                    self.input, self.kernel, self.options
                ),
            }),
        }
    }

    /// Source element (in the flattened input, or the sentinel one past
    /// its end) of every window tap, in output order.
    fn offsets(&self, out: [usize; 2]) -> Vec<u32> {
        let [n, c, h, w] = self.input;
        let [kh, kw] = self.kernel;
        let o = self.options;
        let sentinel = (n * c * h * w) as u32;
        let mut offsets = Vec::with_capacity(n * c * out[0] * out[1] * kh * kw);
        let tap = |b: usize, ch: usize, y: usize, x: usize, i: usize, j: usize| -> u32 {
            let iy = (y * o.stride[0] + i * o.dilation[0]) as isize - o.padding[0] as isize;
            let ix = (x * o.stride[1] + j * o.dilation[1]) as isize - o.padding[1] as isize;
            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                sentinel
            } else {
                (((b * c + ch) * h + iy as usize) * w + ix as usize) as u32
            }
        };
        for b in 0..n {
            if self.channel_major {
                for ch in 0..c {
                    for y in 0..out[0] {
                        for x in 0..out[1] {
                            for i in 0..kh {
                                offsets.extend((0..kw).map(|j| tap(b, ch, y, x, i, j)));
                            }
                        }
                    }
                }
            } else {
                for y in 0..out[0] {
                    for x in 0..out[1] {
                        for ch in 0..c {
                            for i in 0..kh {
                                offsets.extend((0..kw).map(|j| tap(b, ch, y, x, i, j)));
                            }
                        }
                    }
                }
            }
        }
        offsets
    }
}

/// One image's window map by geometry (`windows` of one image), on the
/// device: a training loop asks for the same one every step, at every batch
/// size, and a compiled step then binds the same tensors at every size.
fn cached_map(device: &Device, windows: Windows, out: [usize; 2]) -> Result<IndexMap> {
    static CACHE: OnceLock<Mutex<HashMap<(DeviceId, Windows), IndexMap>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (device.id(), windows);
    if let Some(map) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(map.clone());
    }
    let [_, c, h, w] = windows.input;
    let [kh, kw] = windows.kernel;
    let dims = match windows.channel_major {
        true => [c, out[0], out[1], kh, kw],
        false => [out[0], out[1], c, kh, kw],
    };
    let map = batched_index_map(device, c * h * w + 1, &Shape::new(dims), &windows.offsets(out))?;
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, map.clone());
    Ok(map)
}

impl Tensor {
    /// Every window of this [n, c, h, w] tensor, gathered as
    /// [n, oh, ow, c, kh, kw] (or [n, c, oh, ow, kh, kw]); padding reads `pad`.
    fn windows(
        &self,
        op: &'static str,
        kernel: [usize; 2],
        options: Conv2dOptions,
        (channel_major, ceil_mode): (bool, bool),
        pad: f64,
    ) -> Result<(Tensor, [usize; 2])> {
        crate::ops::float_only(op, self.dtype())?;
        if self.rank() != 4 {
            return Err(Error::InvalidArgument {
                op,
                message: format!("needs an [n, c, h, w] input, got {}", self.shape()),
            });
        }
        let d = self.dims();
        let w = Windows { input: [d[0], d[1], d[2], d[3]], kernel, options, channel_major, ceil_mode };
        let out = w.output(op)?;
        // One image's map, for every image: each image [c h w] followed by
        // its padding element.
        let map = cached_map(self.device(), Windows { input: [1, d[1], d[2], d[3]], ..w }, out)?;
        let (n, image) = (d[0], d[1] * d[2] * d[3]);
        let pad = Tensor::full([n, 1], pad, self.dtype(), self.device())?;
        let extended = crate::ops::cat(&[&self.reshape([n, image])?, &pad], 1)?;
        Ok((gather_batched(&extended, &map)?, out))
    }

    /// 2-D convolution (cross-correlation, as in PyTorch) of this
    /// `[n, c, h, w]` input with `weight` `[out_channels, c / groups, kh,
    /// kw]`, plus `bias` `[out_channels]`: im2col (a gather) and one tiled
    /// matmul, batched over the groups when `options.groups > 1`.
    ///
    /// Groups reuse the one im2col gather and a batched matmul, so their
    /// gradients are the transposes of those two primitives and need no
    /// code of their own. The price is im2col's: every input element is
    /// copied `kh * kw` times, which a depthwise convolution (one input
    /// channel per group, a contraction of only `kh * kw`) feels the most;
    /// a dedicated depthwise kernel would read the input in place.
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, options: Conv2dOptions) -> Result<Tensor> {
        let groups = options.groups;
        if weight.rank() == 4 && self.rank() == 4 {
            check_groups(self.dims()[1], weight.dims()[0], groups)?;
        }
        if weight.rank() != 4 || self.rank() != 4 || weight.dims()[1].checked_mul(groups) != Some(self.dims()[1]) {
            return Err(Error::IncompatibleShapes {
                op: "conv2d",
                lhs: self.shape().clone(),
                rhs: weight.shape().clone(),
                rule: "the input must be [n, c, h, w] and the weight [out_channels, c / groups, kh, kw] \
                       (the same c when groups is 1)",
            });
        }
        let (oc, cg, kh, kw) = (weight.dims()[0], weight.dims()[1], weight.dims()[2], weight.dims()[3]);
        if let Some(b) = bias.filter(|b| b.dims() != [oc]) {
            return Err(Error::IncompatibleShapes {
                op: "conv2d",
                lhs: weight.shape().clone(),
                rhs: b.shape().clone(),
                rule: "the bias must be [out_channels], out_channels being the weight's first dim",
            });
        }
        let n = self.dims()[0];
        // im2col does not depend on the groups: one cached map serves all.
        let geometry = Conv2dOptions { groups: 1, ..options };
        let (cols, [oh, ow]) = self.windows("conv2d", [kh, kw], geometry, (false, false), 0.0)?;
        let k = cg * kh * kw;
        let out = if groups == 1 {
            cols.reshape([n * oh * ow, k])?.matmul(&weight.reshape([oc, k])?.t()?)?
        } else {
            // Rows [n*oh*ow, groups, k] as groups batches (a permuted view),
            // against the weight as [groups, k, oc / groups].
            let rows = cols.reshape([n * oh * ow, groups, k])?.permute(&[1, 0, 2])?;
            let w = weight.reshape([groups, oc / groups, k])?.transpose(1, 2)?;
            rows.matmul(&w)?.permute(&[1, 0, 2])?
        };
        let out = out.reshape([n, oh, ow, oc])?.permute(&[0, 3, 1, 2])?;
        match bias {
            Some(b) => out.add(&b.reshape([oc, 1, 1])?),
            None => Ok(out),
        }
    }

    /// Max over each `kernel` window, `stride` apart, the input padded
    /// by `padding` on each side (padding never wins); ties share the
    /// gradient evenly (PyTorch gives it to one of them). Shorthand for
    /// [`Tensor::max_pool2d_with`].
    pub fn max_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Tensor> {
        self.max_pool2d_with(kernel, Pool2dOptions { stride: Some(stride), padding, ..Default::default() })
    }

    /// Max pooling of this `[n, c, h, w]` tensor with PyTorch's options
    /// (`ceil_mode` included; `count_include_pad` means nothing to a max
    /// and is ignored). Ties share the gradient evenly (PyTorch gives it to
    /// one of them).
    ///
    /// ```
    /// # fn main() -> wgrad::Result<()> {
    /// use wgrad::{Pool2dOptions, Tensor};
    /// let device = wgrad::Device::new()?;
    /// let x = Tensor::arange(0.0, 25.0, 1.0, &device)?.reshape([1, 1, 5, 5])?;
    /// let ceil = Pool2dOptions { ceil_mode: true, ..Default::default() };
    /// assert_eq!(x.max_pool2d_with([2, 2], ceil)?.dims(), [1, 1, 3, 3]);
    /// assert_eq!(x.max_pool2d_with([2, 2], Pool2dOptions::default())?.dims(), [1, 1, 2, 2]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_pool2d_with(&self, kernel: [usize; 2], options: Pool2dOptions) -> Result<Tensor> {
        let (win, [oh, ow]) = self.pool_windows("max_pool2d", kernel, options, f64::NEG_INFINITY)?;
        let d = self.dims();
        win.reshape([d[0], d[1], oh, ow, kernel[0] * kernel[1]])?.max(&[4], false)
    }

    /// Mean over each `kernel` window, padding counted as zeros (PyTorch's
    /// default `count_include_pad=True`). Shorthand for
    /// [`Tensor::avg_pool2d_with`].
    pub fn avg_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Tensor> {
        self.avg_pool2d_with(kernel, Pool2dOptions { stride: Some(stride), padding, ..Default::default() })
    }

    /// Average pooling of this `[n, c, h, w]` tensor with PyTorch's
    /// options. Each window's sum is divided by the part of the window
    /// inside the padded input (`count_include_pad`, the default; a window
    /// that `ceil_mode` lets overhang the padded input counts only what is
    /// inside it) or by the number of input elements in it (not
    /// `count_include_pad`). The divisors depend only on the geometry, so
    /// they are computed on the host and multiply the window sums as a
    /// constant: the gradient is that of a sum times a constant.
    ///
    /// ```
    /// # fn main() -> wgrad::Result<()> {
    /// use wgrad::{Pool2dOptions, Tensor};
    /// let device = wgrad::Device::new()?;
    /// let x = Tensor::ones([1, 1, 3, 3], wgrad::DType::F32, &device)?;
    /// let padded = Pool2dOptions { stride: Some([1, 1]), padding: [1, 1], ..Default::default() };
    /// // The corner window holds 4 ones and 5 padding zeros.
    /// assert_eq!(x.avg_pool2d_with([3, 3], padded)?.to_vec::<f32>()?[0], 4.0 / 9.0);
    /// let real_only = Pool2dOptions { count_include_pad: false, ..padded };
    /// assert_eq!(x.avg_pool2d_with([3, 3], real_only)?.to_vec::<f32>()?[0], 1.0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn avg_pool2d_with(&self, kernel: [usize; 2], options: Pool2dOptions) -> Result<Tensor> {
        let (win, [oh, ow]) = self.pool_windows("avg_pool2d", kernel, options, 0.0)?;
        let d = self.dims();
        let win = win.reshape([d[0], d[1], oh, ow, kernel[0] * kernel[1]])?;
        let (stride, padding) = (options.stride.unwrap_or(kernel), options.padding);
        let per_axis = |a: usize, out: usize| -> Vec<usize> {
            (0..out)
                .map(|o| {
                    // In padded coordinates: the input is padding..padding + size.
                    let (size, pad) = (d[2 + a], padding[a]);
                    let start = o * stride[a];
                    let end = (start + kernel[a]).min(size + 2 * pad);
                    if options.count_include_pad {
                        end - start
                    } else {
                        // Never empty: padding is at most half the kernel, and
                        // no window starts in the trailing padding.
                        end.min(size + pad).saturating_sub(start.max(pad))
                    }
                })
                .collect()
        };
        let (rows, cols) = (per_axis(0, oh), per_axis(1, ow));
        if rows.iter().all(|&r| r == kernel[0]) && cols.iter().all(|&c| c == kernel[1]) {
            return win.mean(&[4], false);
        }
        let scale: Vec<f32> = rows.iter().flat_map(|&r| cols.iter().map(move |&c| 1.0 / (r * c) as f32)).collect();
        let scale = Tensor::from_slice(&scale, [oh, ow], self.device())?.to_dtype(self.dtype())?;
        win.sum(&[4], false)?.mul(&scale)
    }

    /// The pooling windows [n, c, oh, ow, kh, kw] for `options`, checked.
    fn pool_windows(
        &self,
        op: &'static str,
        kernel: [usize; 2],
        options: Pool2dOptions,
        pad: f64,
    ) -> Result<(Tensor, [usize; 2])> {
        let stride = options.stride.unwrap_or(kernel);
        if kernel.contains(&0) || stride.contains(&0) {
            return Err(Error::InvalidArgument {
                op,
                message: format!("kernel {kernel:?} and stride {stride:?} must be at least 1 in both dims"),
            });
        }
        check_pool_padding(op, kernel, options.padding)?;
        let conv = Conv2dOptions { stride, padding: options.padding, ..Default::default() };
        self.windows(op, kernel, conv, (true, options.ceil_mode), pad)
    }
}

fn check_pool_padding(op: &'static str, kernel: [usize; 2], padding: [usize; 2]) -> Result<()> {
    if padding[0] > kernel[0] / 2 || padding[1] > kernel[1] / 2 {
        return Err(Error::InvalidArgument {
            op,
            message: format!("padding {padding:?} must be at most half the kernel {kernel:?}"),
        });
    }
    Ok(())
}
