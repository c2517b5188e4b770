//! Eager launches: validate, pick access modes, pack sizes into the
//! uniform, fetch (or build) the pipeline and append the dispatch.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::ReduceKind;
use crate::exec::codegen::{self, scalar_bits, view_base};
use crate::exec::kernel::{Access, MapKernel};
use crate::layout::{Layout, MAX_RANK};
use crate::metadata::{DType, Shape};
use crate::tensor::Tensor;

const REDUCE_TEMPLATE: &str = include_str!("../../shaders/reduce.wgsl");
const MATMUL_TEMPLATE: &str = include_str!("../../shaders/matmul.wgsl");

fn push_view(words: &mut Vec<u32>, layout: &Layout) {
    words.push(layout.offset as u32);
    let mut strides = [0u32; MAX_RANK];
    for (s, &v) in strides.iter_mut().zip(&layout.strides) {
        *s = v as u32;
    }
    words.extend_from_slice(&strides);
}

fn check_same_device(op: &'static str, device: &Device, inputs: &[&Tensor]) -> Result<()> {
    for t in inputs {
        if t.device() != device {
            return Err(Error::DeviceMismatch { op, lhs: device.id(), rhs: t.device().id() });
        }
    }
    Ok(())
}

/// Runs an elementwise kernel over `out_shape`, broadcasting every input to
/// it, and returns one new contiguous tensor per kernel output.
pub(crate) fn map(
    op: &'static str,
    kernel: MapKernel,
    inputs: &[&Tensor],
    scalars: &[f64],
    out_shape: &Shape,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let outputs = kernel
        .outputs
        .iter()
        .map(|(node, _)| Tensor::empty(out_shape.clone(), kernel.dtype(*node), device))
        .collect::<Result<Vec<_>>>()?;
    map_into(op, kernel, inputs, scalars, &outputs.iter().collect::<Vec<_>>())?;
    Ok(outputs)
}

/// Like [`map`], but writes into existing views (used to assemble `cat`
/// and padded gradients). The outputs must not alias any input.
pub(crate) fn map_into(
    op: &'static str,
    mut kernel: MapKernel,
    inputs: &[&Tensor],
    scalars: &[f64],
    outputs: &[&Tensor],
) -> Result<()> {
    let Some(first) = outputs.first() else { return Ok(()) };
    let device = first.device().clone();
    check_same_device(op, &device, inputs)?;
    let out_shape = first.shape().clone();
    let numel = out_shape.numel();
    let out_layout = first.layout();
    out_layout.check_rank(op)?;

    let mut words = vec![numel as u32, out_shape.rank() as u32];
    let mut dims = [0u32; MAX_RANK];
    for (d, &v) in dims.iter_mut().zip(out_shape.dims()) {
        *d = v as u32;
    }
    words.extend_from_slice(&dims);
    for (slot, t) in inputs.iter().enumerate() {
        let view = t.layout().broadcast_to(op, &out_shape)?;
        kernel.inputs[slot].1 = if view.is_contiguous() { Access::Linear } else { Access::Strided };
        push_view(&mut words, &view);
    }
    for (o, t) in outputs.iter().enumerate() {
        kernel.outputs[o].1 = if t.layout().is_contiguous() { Access::Linear } else { Access::Strided };
        push_view(&mut words, t.layout());
    }
    debug_assert_eq!(words.len(), view_base(inputs.len() + outputs.len()));
    for (dtype, value) in kernel.scalars.iter().zip(scalars) {
        words.push(scalar_bits(*dtype, *value));
    }
    if numel == 0 {
        return Ok(());
    }
    let source = codegen::render(&kernel);
    let pipeline = device.pipeline(op, &source)?;
    let mut buffers: Vec<&wgpu::Buffer> = inputs.iter().map(|t| t.buffer()).collect();
    buffers.extend(outputs.iter().map(|t| t.buffer()));
    let grid = device.grid_1d(numel as u64)?;
    device.dispatch(&pipeline, &words, &buffers, grid)
}

fn prelude(dtype: DType) -> String {
    let enable = if dtype == DType::F16 { "enable f16;\n" } else { "" };
    format!("{enable}alias T = {};\n", dtype.wgsl())
}

fn reduce_prelude(kind: ReduceKind, dtype: DType) -> String {
    let lowest = match dtype {
        DType::F32 => "bitcast<f32>(0xff800000u)",
        DType::F16 => "f16(bitcast<f32>(0xff800000u))",
        DType::I32 => "bitcast<i32>(0x80000000u)",
        DType::U32 => "0u",
    };
    let highest = match dtype {
        DType::F32 => "bitcast<f32>(0x7f800000u)",
        DType::F16 => "f16(bitcast<f32>(0x7f800000u))",
        DType::I32 => "bitcast<i32>(0x7fffffffu)",
        DType::U32 => "0xffffffffu",
    };
    let (identity, combine) = match kind {
        ReduceKind::Sum => ("T(0)", "a + b"),
        ReduceKind::Max => (lowest, "max(a, b)"),
        ReduceKind::Min => (highest, "min(a, b)"),
    };
    format!(
        "{}fn identity() -> T {{ return {identity}; }}\nfn combine(a: T, b: T) -> T {{ return {combine}; }}\n",
        prelude(dtype)
    )
}

/// The reduce template specialised for a reduction and dtype.
pub(crate) fn reduce_source(kind: ReduceKind, dtype: DType) -> String {
    format!("{}{REDUCE_TEMPLATE}", reduce_prelude(kind, dtype))
}

/// The matmul template specialised for a dtype.
pub(crate) fn matmul_source(dtype: DType) -> String {
    format!("{}{MATMUL_TEMPLATE}", prelude(dtype))
}

/// Reduces `x` over `axes` (sorted, distinct, in range).
pub(crate) fn reduce(kind: ReduceKind, x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let dims = x.shape().dims();
    let out_dims: Vec<usize> = if keepdim {
        dims.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect()
    } else {
        dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
    };
    let out_shape = Shape::new(out_dims);
    // A contiguous view whose reduced axes form one block is [A, K, B]
    // as it is; anything else is permuted (reduced axes last) and copied.
    let block = axes.is_empty() || axes.windows(2).all(|w| w[1] == w[0] + 1);
    let (src, a, k, b) = if block && x.layout().is_contiguous() && !axes.is_empty() {
        let (lo, hi) = (axes[0], axes[axes.len() - 1]);
        let a: usize = dims[..lo].iter().product();
        let k: usize = dims[lo..=hi].iter().product();
        let b: usize = dims[hi + 1..].iter().product();
        (x.clone(), a, k, b)
    } else {
        let mut perm: Vec<usize> = (0..dims.len()).filter(|i| !axes.contains(i)).collect();
        perm.extend_from_slice(axes);
        let moved = x.permute_view(&perm).contiguous_copy()?;
        let k: usize = axes.iter().map(|&i| dims[i]).product();
        let a = x.shape().numel().checked_div(k).unwrap_or(0);
        (moved, a, k, 1)
    };
    let out = reduce_abk(kind, &src, a, k, b)?;
    Ok(out.reshape_view(out_shape))
}

/// Reduces the middle axis of `src` viewed as contiguous [a, k, b] into a
/// new contiguous [a, b] tensor, in several passes when k is large.
fn reduce_abk(kind: ReduceKind, src: &Tensor, a: usize, k: usize, b: usize) -> Result<Tensor> {
    const TARGET_THREADS: usize = 1 << 14;
    const MIN_CHUNK: usize = 64;
    let device = src.device();
    let dtype = src.dtype();
    let outputs = a * b;
    let n_chunks = if outputs >= TARGET_THREADS || k <= MIN_CHUNK || outputs == 0 {
        1
    } else {
        k.div_ceil(MIN_CHUNK).min(TARGET_THREADS.div_ceil(outputs)).max(1)
    };
    let out = Tensor::empty(Shape::new([a * n_chunks * b]), dtype, device)?;
    let (c_stride, j_stride, j_count) = if b == 1 {
        (1, n_chunks, k.div_ceil(n_chunks))
    } else {
        let chunk = k.div_ceil(n_chunks);
        (chunk, 1, chunk)
    };
    let n_out = a * n_chunks * b;
    let words = [
        a as u32,
        k as u32,
        b as u32,
        n_chunks as u32,
        c_stride as u32,
        j_stride as u32,
        j_count as u32,
        src.layout().offset as u32,
        n_out as u32,
    ];
    if n_out > 0 {
        let source = reduce_source(kind, dtype);
        let pipeline = device.pipeline("reduce", &source)?;
        let grid = device.grid_1d(n_out as u64)?;
        device.dispatch(&pipeline, &words, &[src.buffer(), out.buffer()], grid)?;
    }
    if n_chunks == 1 {
        return Ok(out);
    }
    reduce_abk(kind, &out, a, n_chunks, b)
}

/// Collapses a batch of views into one stride, if the dims allow it.
fn batch_stride(layout: &Layout, batch_rank: usize) -> Option<usize> {
    let dims = &layout.shape.dims()[..batch_rank];
    let strides = &layout.strides[..batch_rank];
    let mut stride = None;
    for i in (0..batch_rank).rev() {
        if dims[i] == 1 {
            continue;
        }
        match stride {
            None => stride = Some((strides[i], strides[i] * dims[i])),
            Some((s, next)) => {
                if strides[i] != next && !(s == 0 && strides[i] == 0) {
                    return None;
                }
                stride = Some((s, strides[i] * dims[i]));
            }
        }
    }
    Some(stride.map_or(0, |(s, _)| s))
}

/// `a` [..., m, k] @ `b` [..., k, n] with broadcast batch dims (the op layer
/// has promoted vectors to matrices and checked shapes).
pub(crate) fn matmul(a: &Tensor, b: &Tensor, batch: &Shape) -> Result<Tensor> {
    let device = a.device();
    check_same_device("matmul", device, &[b])?;
    let (ra, rb) = (a.shape().rank(), b.shape().rank());
    let (m, k) = (a.shape().dims()[ra - 2], a.shape().dims()[ra - 1]);
    let n = b.shape().dims()[rb - 1];
    let mut out_dims = batch.dims().to_vec();
    out_dims.extend([m, n]);
    let out = Tensor::empty(Shape::new(out_dims), a.dtype(), device)?;
    let batch_count = batch.numel();
    if batch_count == 0 || m == 0 || n == 0 {
        return Ok(out);
    }
    let operand = |t: &Tensor, rows: usize, cols: usize| -> Result<(Tensor, usize)> {
        let mut dims = batch.dims().to_vec();
        dims.extend([rows, cols]);
        let view = t.layout().broadcast_to("matmul", &Shape::new(dims.clone()))?;
        match batch_stride(&view, batch.rank()) {
            Some(s) => Ok((t.with_layout(view), s)),
            None => {
                let copy = t.with_layout(view).contiguous_copy()?;
                Ok((copy, rows * cols))
            }
        }
    };
    let (a, a_batch) = operand(a, m, k)?;
    let (b, b_batch) = operand(b, k, n)?;
    let (la, lb) = (a.layout().clone(), b.layout().clone());
    let r = batch.rank();
    let source = matmul_source(a.dtype());
    let pipeline = device.pipeline("matmul", &source)?;
    let max = device.inner.limits.max_compute_workgroups_per_dimension as usize;
    let (gx, gy, gz) = (n.div_ceil(64), m.div_ceil(64), batch_count);
    for bz in (0..gz).step_by(max) {
        for by in (0..gy).step_by(max) {
            for bx in (0..gx).step_by(max) {
                let words = [
                    m as u32,
                    n as u32,
                    k as u32,
                    la.offset as u32,
                    a_batch as u32,
                    la.strides[r] as u32,
                    la.strides[r + 1] as u32,
                    lb.offset as u32,
                    b_batch as u32,
                    lb.strides[r] as u32,
                    lb.strides[r + 1] as u32,
                    bx as u32,
                    by as u32,
                    bz as u32,
                ];
                let grid = [(gx - bx).min(max) as u32, (gy - by).min(max) as u32, (gz - bz).min(max) as u32];
                device.dispatch(&pipeline, &words, &[a.buffer(), b.buffer(), out.buffer()], grid)?;
            }
        }
    }
    Ok(out)
}
