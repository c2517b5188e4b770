//! Indexing: one gather primitive and its transpose. A gather reads output
//! element `e` from source element `offsets[e]`; its gradient sums, for
//! every source element, the output gradients that read it, in increasing
//! output order (a CSR of the inverse map), so repeated indices accumulate
//! deterministically: the same inputs give bit-identical gradients.
//! `index_select`, `embedding`, `gather`, convolution (im2col) and pooling
//! are all this primitive with different maps, built on the host from the
//! indices (checked there, before any kernel reads with them) or from the
//! geometry alone.

use crate::autograd::record;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::SEGMENT_CHUNK;
use crate::exec::kernel::{MapKernel, Node};
use crate::metadata::{DType, Shape};
use crate::ops::Op;
use crate::tensor::Tensor;

/// A gather map on the device: `[offsets (u32, output shape), starts (u32,
/// source elements + 1), positions (u32, output elements)]`.
pub(crate) type IndexMap = [Tensor; 3];

/// Uploads a gather map from `offsets` (one source element per output
/// element, each below `source_numel`).
///
/// A source element read more than [`SEGMENT_CHUNK`] times (an embedding
/// row repeated in a large batch) would make its scatter-add loop past the
/// loop budget (see `exec::LOOP_BUDGET`), so the segments are cut into runs:
/// `starts` then describes `runs` consecutive runs per source element, and
/// [`scatter_add_flat`] sums the runs after.
pub(crate) fn index_map(device: &Device, source_numel: usize, out_shape: &Shape, offsets: &[u32]) -> Result<IndexMap> {
    let (starts, positions) = inverse_map(source_numel, offsets);
    Ok([
        Tensor::from_slice(offsets, out_shape.clone(), device)?,
        Tensor::from_slice(&starts, [starts.len()], device)?,
        Tensor::from_slice(&positions, [offsets.len()], device)?,
    ])
}

/// The map of a gather whose indices are argument `arg` of a compiled
/// step: built on the host from each call's indices (checked there, as
/// eager mode checks them) and read by the program as data. `offsets`
/// turns the checked indices into source offsets.
fn per_call_map(
    op: &'static str,
    arg: usize,
    size: usize,
    source_numel: usize,
    out_shape: &Shape,
    offsets: impl Fn(&[usize]) -> Vec<u32> + Send + Sync + 'static,
    device: &Device,
) -> Result<IndexMap> {
    let words = move |args: &[Tensor]| -> Result<Vec<u32>> {
        let offsets = offsets(&checked_indices(op, &args[arg], size)?);
        let (starts, positions) = inverse_map(source_numel, &offsets);
        Ok([offsets, starts, positions].concat())
    };
    crate::compiler::trace::note_arg_map();
    let map = crate::compiler::trace::host_input(Box::new(words), DType::U32, device)?;
    let n = out_shape.numel();
    let starts = map.numel() - 2 * n;
    Ok([map.narrow(0, 0, n)?.reshape(out_shape.clone())?, map.narrow(0, n, starts)?, map.narrow(0, n + starts, n)?])
}

/// `starts` and `positions` of a gather map (see [`IndexMap`]).
fn inverse_map(source_numel: usize, offsets: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut counts = vec![0u32; source_numel];
    for &o in offsets {
        counts[o as usize] += 1;
    }
    let longest = counts.iter().copied().max().unwrap_or(0) as usize;
    let runs = longest.div_ceil(SEGMENT_CHUNK).max(1);
    let mut starts = Vec::with_capacity(source_numel * runs + 1);
    let mut first = vec![0u32; source_numel];
    let mut at = 0u32;
    for (s, &count) in counts.iter().enumerate() {
        first[s] = at;
        for r in 0..runs {
            starts.push(at + (r * SEGMENT_CHUNK).min(count as usize) as u32);
        }
        at += count;
    }
    starts.push(at);
    let mut cursor = first;
    let mut positions = vec![0u32; offsets.len()];
    for (e, &o) in offsets.iter().enumerate() {
        positions[cursor[o as usize] as usize] = e as u32;
        cursor[o as usize] += 1;
    }
    (starts, positions)
}

/// `out[e] = source[offsets[e]]` over the contiguous elements of `source`.
pub(crate) fn gather_flat(source: &Tensor, map: &IndexMap) -> Result<Tensor> {
    let src = source.contiguous()?;
    let mut k = MapKernel::default();
    let values = k.gathered(src.dtype());
    let offset = k.input(DType::U32);
    let v = k.push(Node::Gather(values, offset), src.dtype());
    k.output(v);
    let out_shape = map[0].shape().clone();
    let out = crate::exec::map("gather", k, &[&src, &map[0]], &[], &out_shape, src.device())?.remove(0);
    let op = Op::Gather { source: source.shape().clone(), batched: false };
    Ok(record(op, &[source], map.to_vec(), out))
}

/// The transpose of [`gather_flat`]: a tensor of `target` shape whose
/// element t sums the elements of `g` that the map read from t.
pub(crate) fn scatter_add_flat(g: &Tensor, map: &IndexMap, target: &Shape) -> Result<Tensor> {
    scatter_add(g, map, target, false)
}

/// [`scatter_add_flat`] or, `batched`, [`scatter_add_batched`]: one
/// segment sum per target element, cut into runs when a segment is long
/// (see `index_map`), the runs summed after.
fn scatter_add(g: &Tensor, map: &IndexMap, target: &Shape, batched: bool) -> Result<Tensor> {
    let g_c = g.contiguous()?;
    let mut k = MapKernel::default();
    let values = k.gathered(g_c.dtype());
    let starts = k.gathered(DType::U32);
    let positions = k.gathered(DType::U32);
    let v = k.push(Node::SegmentSum { values, starts, positions, batched }, g_c.dtype());
    k.output(v);
    // Segments per map (one image's when batched, after a two-word header)
    // and runs per segment: 1 unless a segment is long.
    let (header, segments) = match batched {
        true => (3, target.dims()[1]),
        false => (1, target.numel()),
    };
    let runs = (map[1].numel() - header).checked_div(segments).unwrap_or(1);
    let inputs = [&g_c, &map[1], &map[2]];
    let out = if runs == 1 {
        crate::exec::map("scatter_add", k, &inputs, &[], target, g.device())?.remove(0)
    } else {
        let mut dims = target.dims().to_vec();
        dims.push(runs);
        let run_sums = crate::exec::map("scatter_add", k, &inputs, &[], &Shape::new(dims), g.device())?.remove(0);
        crate::exec::reduce(crate::exec::ReduceKind::Sum, &run_sums, &[target.rank()], false)?
    };
    let op = Op::ScatterAdd { target: target.clone(), batched };
    Ok(record(op, &[g], map.to_vec(), out))
}

/// A gather map for every image of a batch (convolution windows): offsets
/// (u32, one image's output shape) into one image of `image_numel`
/// elements; `starts` begins with the segments per image (`image_numel`
/// times the runs) and the outputs per image, then one image's inverse
/// map. Nothing in it depends on the batch size, so a compiled step reads
/// the same map at every batch size.
pub(crate) fn batched_index_map(
    device: &Device,
    image_numel: usize,
    image_out: &Shape,
    offsets: &[u32],
) -> Result<IndexMap> {
    let (starts, positions) = inverse_map(image_numel, offsets);
    let segments = (starts.len() - 1) as u32;
    let header = [segments, offsets.len() as u32];
    Ok([
        Tensor::from_slice(offsets, image_out.clone(), device)?,
        Tensor::from_slice(&[&header[..], &starts].concat(), [starts.len() + 2], device)?,
        Tensor::from_slice(&positions, [offsets.len()], device)?,
    ])
}

/// `out[b, e] = source[b, offsets[e]]` for a `[n, S]` source and a
/// [`batched_index_map`]: `[n]` followed by the map's output shape.
pub(crate) fn gather_batched(source: &Tensor, map: &IndexMap) -> Result<Tensor> {
    let src = source.contiguous()?;
    let (n, s, e) = (src.dims()[0], src.dims()[1], map[0].numel());
    let mut k = MapKernel::default();
    let values = k.gathered(src.dtype());
    let offset = k.input(DType::U32);
    let index = k.push(Node::Index, DType::U32);
    let (per_image, image) = (k.scalar(DType::U32), k.scalar(DType::U32));
    let b = k.push(Node::Binary(crate::ops::binary::BinaryOp::Div, index, per_image), DType::U32);
    let start = k.push(Node::Binary(crate::ops::binary::BinaryOp::Mul, b, image), DType::U32);
    let at = k.push(Node::Binary(crate::ops::binary::BinaryOp::Add, offset, start), DType::U32);
    let v = k.push(Node::Gather(values, at), src.dtype());
    k.output(v);
    let offsets = map[0].reshape([1, e])?.expand([n, e])?;
    let flat = Shape::new([n, e]);
    let out = crate::exec::map("gather", k, &[&src, &offsets], &[e as f64, s as f64], &flat, src.device())?.remove(0);
    let mut dims = vec![n];
    dims.extend_from_slice(map[0].dims());
    let out = out.reshape(Shape::new(dims))?;
    let op = Op::Gather { source: source.shape().clone(), batched: true };
    Ok(record(op, &[source], map.to_vec(), out))
}

/// The transpose of [`gather_batched`]: a `target` (`[n, S]`) tensor whose
/// element (b, t) sums the elements of image b of `g` that the map read
/// from t.
pub(crate) fn scatter_add_batched(g: &Tensor, map: &IndexMap, target: &Shape) -> Result<Tensor> {
    scatter_add(g, map, target, true)
}

/// The indices of an integer tensor, checked to lie in `0..size`: known on
/// the host when the tensor was made from host data, read back otherwise
/// (then the only sync of an indexing op).
fn host_indices(op: &'static str, source: &Tensor, index: &Tensor, size: usize) -> Result<Vec<usize>> {
    if index.device() != source.device() {
        return Err(Error::DeviceMismatch { op, lhs: source.device().id(), rhs: index.device().id() });
    }
    checked_indices(op, index, size)
}

/// [`host_indices`] without the device check.
fn checked_indices(op: &'static str, index: &Tensor, size: usize) -> Result<Vec<usize>> {
    let values = index.int_values(op, "indices must be an i32 or u32 tensor")?;
    if let Some(bad) = values.iter().find(|&&v| v < 0 || v >= size as i64) {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "index {bad} is out of range for a dimension of size {size}; indices must be in 0..{size}"
            ),
        });
    }
    Ok(values.into_iter().map(|v| v as usize).collect())
}

impl Tensor {
    /// The gather map of `op` reading this tensor at `offsets(indices)`
    /// (indices along `d`, checked): built on the host now, or, when the
    /// indices are an argument of a compiled step, at every call.
    fn gather_map(
        &self,
        op: &'static str,
        index: &Tensor,
        d: usize,
        out_shape: Shape,
        offsets: impl Fn(&[usize]) -> Vec<u32> + Send + Sync + 'static,
    ) -> Result<IndexMap> {
        let size = self.dims()[d];
        if index.device() != self.device() {
            return Err(Error::DeviceMismatch { op, lhs: self.device().id(), rhs: index.device().id() });
        }
        if let Some(arg) = crate::compiler::trace::arg_of(index) {
            return per_call_map(op, arg, size, self.numel(), &out_shape, offsets, self.device());
        }
        if crate::compiler::trace::views_arg(index) {
            // Part of an argument (a prefix, a row of an edge list): its
            // values are the call's, but only a whole argument gets a map
            // per call; one built now would be replayed with other indices.
            crate::compiler::trace::graph_break(
                op,
                "its indices are part of an argument (pass the indices as an argument of their own)",
            )?;
        }
        if crate::compiler::trace::is_step() && index.host_ints().is_none() {
            // Indices computed inside the step: their values are known
            // only on the device, and the map is built on the host.
            crate::compiler::trace::graph_break(
                op,
                "its index map is built on the host from indices computed in the step",
            )?;
        }
        let idx = host_indices(op, self, index, size)?;
        index_map(self.device(), self.numel(), &out_shape, &offsets(&idx))
    }

    /// The slices `index[0], index[1], ...` of dim `dim`, in that order
    /// (repeats allowed): `torch.index_select`. `index` is 1-D, i32 or u32.
    pub fn index_select(&self, dim: isize, index: &Tensor) -> Result<Tensor> {
        let d = crate::metadata::resolve_axis("index_select", dim, self.rank())?;
        if index.rank() > 1 {
            return Err(Error::InvalidArgument {
                op: "index_select",
                message: format!("index must be 1-D (or 0-d), got shape {}", index.shape()),
            });
        }
        if index.rank() == 0 {
            return self.index_select(dim, &index.reshape([1])?);
        }
        if self.rank() == 0 {
            // As in PyTorch, a 0-d tensor is indexed as one of size 1 and stays 0-d.
            if index.numel() != 1 {
                return Err(Error::InvalidArgument {
                    op: "index_select",
                    message: format!("the index into a 0-d tensor must hold exactly one value, got {}", index.numel()),
                });
            }
            return self.reshape([1])?.index_select(0, index)?.reshape([0usize; 0]);
        }
        let dims = self.dims().to_vec();
        let inner: usize = dims[d + 1..].iter().product();
        let outer: usize = dims[..d].iter().product();
        let size = dims[d];
        let mut out_dims = dims.clone();
        out_dims[d] = index.numel();
        let offsets = move |idx: &[usize]| {
            let mut offsets = Vec::with_capacity(outer * idx.len() * inner);
            for o in 0..outer {
                for &i in idx {
                    let base = (o * size + i) * inner;
                    offsets.extend((base..base + inner).map(|x| x as u32));
                }
            }
            offsets
        };
        let map = self.gather_map("index_select", index, d, Shape::new(out_dims), offsets)?;
        gather_flat(self, &map)
    }

    /// Picks along `dim`: `out[..., i, ...] = self[..., index[..., i, ...], ...]`
    /// (`torch.gather`); `index` has this tensor's rank, sizes no larger
    /// than this tensor's off `dim`, and gives the output shape.
    pub fn gather(&self, dim: isize, index: &Tensor) -> Result<Tensor> {
        let d = crate::metadata::resolve_axis("gather", dim, self.rank())?;
        if self.rank() == 0 && index.rank() == 0 {
            // As in PyTorch, a 0-d tensor is indexed as one of size 1.
            return self.reshape([1])?.gather(0, &index.reshape([1])?)?.reshape([0usize; 0]);
        }
        let fits = index.rank() == self.rank()
            && index.dims().iter().zip(self.dims()).enumerate().all(|(i, (a, b))| i == d || a <= b);
        if !fits {
            return Err(Error::IncompatibleShapes {
                op: "gather",
                lhs: self.shape().clone(),
                rhs: index.shape().clone(),
                rule: "the index must have the input's rank, and no dim larger than the input's except along `dim`",
            });
        }
        let strides = self.shape().contiguous_strides();
        let idims = index.dims().to_vec();
        let offsets = move |idx: &[usize]| {
            let mut offsets = Vec::with_capacity(idx.len());
            let mut coords = vec![0usize; idims.len()];
            for &i in idx {
                let off: usize =
                    coords.iter().zip(&strides).enumerate().map(|(a, (c, s))| if a == d { i * s } else { c * s }).sum();
                offsets.push(off as u32);
                for a in (0..idims.len()).rev() {
                    coords[a] += 1;
                    if coords[a] < idims[a] {
                        break;
                    }
                    coords[a] = 0;
                }
            }
            offsets
        };
        let map = self.gather_map("gather", index, d, index.shape().clone(), offsets)?;
        gather_flat(self, &map)
    }
}

/// Rows of `weight` [vocabulary, dim] for the integer `ids` (any shape):
/// the result has shape `ids.shape + [dim]`. Repeated ids accumulate their
/// gradients deterministically.
pub fn embedding(ids: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if weight.rank() != 2 {
        return Err(Error::InvalidArgument {
            op: "embedding",
            message: format!("weight must be [vocabulary, dim], got {}", weight.shape()),
        });
    }
    let flat = ids.reshape([ids.numel()])?;
    let rows = weight.index_select(0, &flat)?;
    let mut dims = ids.dims().to_vec();
    dims.push(weight.dims()[1]);
    rows.reshape(dims)
}
