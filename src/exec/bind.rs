//! Which buffer each of a kernel's operands is bound through.
//!
//! Tensors live in arenas (`alloc.rs`), so several operands of a kernel
//! often sit in one buffer. A kernel binds each distinct buffer once (a
//! buffer bound twice where one binding writes it is a usage conflict, and
//! WebGPU allows only 8 storage bindings), and reads each operand at its
//! element offset, which the uniform carries. The renderers take a
//! [`Binds`]: for each operand, the binding it goes through; the source
//! text depends on it, so pipelines are cached per sharing pattern.

use std::ops::Range;

use crate::metadata::DType;

/// One tensor's storage as a kernel sees it: its buffer, the byte range of
/// its allocation in that buffer, and the dtype the kernel reads it as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Operand {
    pub buffer: wgpu::Buffer,
    pub range: Range<u64>,
    pub dtype: DType,
}

impl Operand {
    /// The element index of the allocation's start in its buffer, which
    /// the kernel adds to the operand's offset word.
    pub fn base(&self) -> u32 {
        (self.range.start / self.dtype.size_in_bytes() as u64) as u32
    }

    /// Whether two operands' allocations overlap (same buffer, shared bytes).
    pub fn overlaps(&self, other: &Operand) -> bool {
        self.buffer == other.buffer && self.range.start < other.range.end && other.range.start < self.range.end
    }
}

/// The sharing pattern of a kernel's bindings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Binds {
    /// The binding of each operand (0 is the first storage binding).
    pub slot: Vec<usize>,
    /// Each binding's element type and whether the kernel writes it.
    pub bindings: Vec<(DType, bool)>,
}

impl Binds {
    /// Operands that share a buffer (and dtype) share a binding; a binding
    /// is written if any of its operands is. Also returns the buffers in
    /// binding order.
    pub fn of(operands: &[Operand], written: &[bool]) -> (Binds, Vec<wgpu::Buffer>) {
        let mut binds = Binds { slot: Vec::with_capacity(operands.len()), bindings: Vec::new() };
        let mut buffers: Vec<wgpu::Buffer> = Vec::new();
        for (o, w) in operands.iter().zip(written) {
            let at = (0..buffers.len()).find(|&b| buffers[b] == o.buffer && binds.bindings[b].0 == o.dtype);
            let at = at.unwrap_or_else(|| {
                buffers.push(o.buffer.clone());
                binds.bindings.push((o.dtype, false));
                buffers.len() - 1
            });
            binds.bindings[at].1 |= *w;
            binds.slot.push(at);
        }
        (binds, buffers)
    }

    /// One binding per operand (no two operands share a buffer).
    #[cfg(test)]
    pub fn separate(dtypes: &[DType], written: &[bool]) -> Binds {
        Binds {
            slot: (0..dtypes.len()).collect(),
            bindings: dtypes.iter().copied().zip(written.iter().copied()).collect(),
        }
    }

    /// Operands with equal `keys` (and dtype) share a binding: the pattern
    /// of a kernel whose operands are known to be the same buffer when
    /// they have the same key.
    pub fn grouped<K: PartialEq>(keys: &[K], dtypes: &[DType], written: &[bool]) -> Binds {
        let mut binds = Binds { slot: Vec::new(), bindings: Vec::new() };
        let mut seen: Vec<(&K, DType)> = Vec::new();
        for ((k, &d), &w) in keys.iter().zip(dtypes).zip(written) {
            let at = seen.iter().position(|(sk, sd)| *sk == k && *sd == d).unwrap_or_else(|| {
                seen.push((k, d));
                binds.bindings.push((d, false));
                binds.bindings.len() - 1
            });
            binds.bindings[at].1 |= w;
            binds.slot.push(at);
        }
        binds
    }

    /// The pattern when every operand of a dtype lives in that dtype's one
    /// arena: the usual case, used to show and validate kernels before
    /// they are bound.
    pub fn by_dtype(dtypes: &[DType], written: &[bool]) -> Binds {
        let mut binds = Binds { slot: Vec::new(), bindings: Vec::new() };
        for (&d, &w) in dtypes.iter().zip(written) {
            let at = binds.bindings.iter().position(|b| b.0 == d).unwrap_or_else(|| {
                binds.bindings.push((d, false));
                binds.bindings.len() - 1
            });
            binds.bindings[at].1 |= w;
            binds.slot.push(at);
        }
        binds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_dtype_shares_one_binding_per_dtype_and_marks_writes() {
        let b = Binds::by_dtype(&[DType::F32, DType::U32, DType::F32, DType::F32], &[false, false, false, true]);
        assert_eq!(b.slot, vec![0, 1, 0, 0]);
        assert_eq!(b.bindings, vec![(DType::F32, true), (DType::U32, false)]);
        let s = Binds::separate(&[DType::F32, DType::F32], &[false, true]);
        assert_eq!(s.slot, vec![0, 1]);
    }
}
