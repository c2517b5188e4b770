//! Caching allocator. Tensors are sub-allocated in a few large buffers per
//! dtype (*arenas*), so a kernel binds each arena once however many tensors
//! it reads (WebGPU gives a shader 8 storage bindings), and finds each
//! tensor by its element offset in the uniform. A tensor above 4 MiB gets
//! a buffer of its own. Freed ranges go back to their arena's free map
//! (merged with free neighbours; best fit, first arena first), freed
//! dedicated buffers to a free list per size class, and both are handed
//! out again, so a training loop allocates nothing after its first step.
//! GPU work is ordered on one queue, so a range can be reused as soon as
//! its last handle drops, even if commands that read it are still pending:
//! later commands run after them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::metadata::DType;

/// Memory accounting of one device, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by live tensors (their size classes).
    pub live_bytes: u64,
    /// The most `live_bytes` has been since the device was created or
    /// [`crate::Device::reset_peak_memory`] was called.
    pub peak_bytes: u64,
    /// Bytes of freed allocations kept for reuse.
    pub pooled_bytes: u64,
    /// Device buffers created for tensors so far: arenas and dedicated
    /// buffers (a steady-state loop adds none).
    pub buffers_created: u64,
    /// Bytes of device memory the pool holds now: every arena whole (live,
    /// free and never-used parts), and dedicated buffers live or free. At
    /// least `live_bytes + pooled_bytes`; what `empty_cache` can shrink.
    pub reserved_bytes: u64,
}

/// Every allocation starts at a multiple of this many bytes (WebGPU's
/// `min_storage_buffer_offset_alignment`): element offsets of every dtype
/// are then multiples of 4, so the vec4 kernels stay aligned, and no two
/// tensors share a 32-bit word (f16 stores never race across tensors).
pub(crate) const ALLOC_ALIGN: u64 = 256;

/// The largest arena: arenas are also bounded by the storage binding size,
/// as a kernel binds an arena whole.
pub(crate) const MAX_ARENA_BYTES: u64 = 64 << 20;

/// Tensors above this size (or a quarter of an arena) get a buffer of
/// their own (see [`Pool::dedicated_above`]).
pub(crate) const DEDICATED_ABOVE: u64 = 4 << 20;

/// Rounds a request up to its size class: powers of two split into four
/// steps (at most 25% waste), with a 256-byte floor. Every class is a
/// multiple of [`ALLOC_ALIGN`].
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let pow = 63 - (bytes - 1).leading_zeros() as u64; // 2^pow < bytes <= 2^(pow+1)
    let base = 1u64 << pow;
    let step = base / 4;
    bytes.div_ceil(step) * step
}

/// Where an allocation lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    /// Arena `index` of its dtype.
    Arena(DType, usize),
    /// A buffer of its own.
    Dedicated,
}

struct Arena {
    buffer: wgpu::Buffer,
    /// Bytes handed out from the start (the rest has never been used).
    used: u64,
    /// Freed ranges below `used` (offset -> length), adjacent ones merged.
    free: BTreeMap<u64, u64>,
    /// Live allocations in it.
    live: usize,
}

impl Arena {
    /// The smallest freed range that holds `bytes`: (offset, length).
    fn best_fit(&self, bytes: u64) -> Option<(u64, u64)> {
        self.free.iter().filter(|(_, len)| **len >= bytes).min_by_key(|(_, len)| **len).map(|(&o, &l)| (o, l))
    }

    /// Returns a range to the free map, merged with its neighbours.
    fn release(&mut self, offset: u64, bytes: u64) {
        let (mut start, mut len) = (offset, bytes);
        if let Some((&before, &before_len)) = self.free.range(..offset).next_back() {
            if before + before_len == offset {
                self.free.remove(&before);
                start = before;
                len += before_len;
            }
        }
        if let Some(after_len) = self.free.remove(&(offset + bytes)) {
            len += after_len;
        }
        self.free.insert(start, len);
    }
}

#[derive(Default)]
pub(crate) struct Pool {
    /// Bytes of one arena.
    pub(crate) arena_bytes: u64,
    /// The arenas of each dtype; `None` once released by `clear`.
    arenas: HashMap<DType, Vec<Option<Arena>>>,
    /// Freed dedicated buffers by class.
    free_buffers: HashMap<u64, Vec<wgpu::Buffer>>,
    pub(crate) stats: MemoryStats,
    /// Ranges whose contents a failed batch left stale (`crate::poison`).
    pub(crate) poison: crate::poison::Poison,
}

/// What [`Pool::take`] found: a buffer, the byte offset in it, and where
/// it goes back to.
pub(crate) struct Taken {
    buffer: wgpu::Buffer,
    offset: u64,
    home: Home,
}

impl Pool {
    /// A pool whose arenas are `arena_bytes` each.
    pub(crate) fn new(arena_bytes: u64) -> Pool {
        Pool { arena_bytes, ..Pool::default() }
    }

    /// Whether a class is served from an arena (rather than a dedicated buffer).
    pub(crate) fn in_arena(&self, class: u64) -> bool {
        class <= self.dedicated_above()
    }

    /// Classes above this many bytes get buffers of their own: large
    /// tensors gain little from sharing a binding (their kernels are long),
    /// and in arenas they would fill them, and more arenas mean more ways
    /// for a kernel's operands to share bindings, each its own pipeline.
    pub(crate) fn dedicated_above(&self) -> u64 {
        if self.arena_bytes == 0 {
            return 0; // arenas off: every tensor has a buffer of its own
        }
        DEDICATED_ABOVE.min(self.arena_bytes / 4)
    }

    /// A free range or buffer of this class, if any, counted live.
    pub(crate) fn take(&mut self, dtype: DType, class: u64) -> Option<Taken> {
        let taken = if self.in_arena(class) { self.take_range(dtype, class)? } else { self.take_buffer(class)? };
        self.mark_live(class);
        Some(taken)
    }

    /// A range of the first arena that has one: the best-fitting freed
    /// range, else fresh space at its end. (First arena first, so tensors
    /// gather in as few arenas, and so bindings, as possible.)
    fn take_range(&mut self, dtype: DType, class: u64) -> Option<Taken> {
        let arena_bytes = self.arena_bytes;
        let arenas = self.arenas.entry(dtype).or_default();
        for (index, slot) in arenas.iter_mut().enumerate() {
            let Some(arena) = slot.as_mut() else { continue };
            let offset = if let Some((offset, len)) = arena.best_fit(class) {
                arena.free.remove(&offset);
                if len > class {
                    arena.free.insert(offset + class, len - class);
                }
                self.stats.pooled_bytes -= class;
                offset
            } else if arena.used + class <= arena_bytes {
                arena.used += class;
                arena.used - class
            } else {
                continue;
            };
            arena.live += 1;
            return Some(Taken { buffer: arena.buffer.clone(), offset, home: Home::Arena(dtype, index) });
        }
        None
    }

    fn take_buffer(&mut self, class: u64) -> Option<Taken> {
        let buffer = self.free_buffers.get_mut(&class)?.pop()?;
        self.stats.pooled_bytes -= class;
        Some(Taken { buffer, offset: 0, home: Home::Dedicated })
    }

    /// Adds a new arena of `dtype` (created by the device).
    pub(crate) fn add_arena(&mut self, dtype: DType, buffer: wgpu::Buffer) {
        self.stats.buffers_created += 1;
        self.stats.reserved_bytes += buffer.size();
        let arenas = self.arenas.entry(dtype).or_default();
        match arenas.iter().position(Option::is_none) {
            Some(i) => arenas[i] = Some(Arena { buffer, used: 0, free: BTreeMap::new(), live: 0 }),
            None => arenas.push(Some(Arena { buffer, used: 0, free: BTreeMap::new(), live: 0 })),
        }
    }

    /// A dedicated buffer the device just created, counted live.
    pub(crate) fn dedicated(&mut self, class: u64, buffer: wgpu::Buffer) -> Taken {
        self.stats.buffers_created += 1;
        self.stats.reserved_bytes += buffer.size();
        self.mark_live(class);
        Taken { buffer, offset: 0, home: Home::Dedicated }
    }

    fn mark_live(&mut self, class: u64) {
        self.stats.live_bytes += class;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.live_bytes);
    }

    fn give_back(&mut self, home: Home, buffer: wgpu::Buffer, offset: u64, class: u64) {
        self.poison.forget(&buffer, offset..offset + class);
        self.stats.live_bytes -= class;
        self.stats.pooled_bytes += class;
        match home {
            Home::Arena(dtype, index) => {
                let arena = self.arenas.get_mut(&dtype).and_then(|a| a[index].as_mut());
                let arena = arena.expect("an arena with live tensors is kept");
                arena.live -= 1;
                arena.release(offset, class);
            }
            Home::Dedicated => self.free_buffers.entry(class).or_default().push(buffer),
        }
    }

    /// Returns memory to the driver: every freed dedicated buffer, and every
    /// arena no live tensor uses. Freed ranges of arenas that still hold
    /// live tensors stay pooled (an arena is one buffer).
    pub(crate) fn clear(&mut self) {
        for (class, buffers) in self.free_buffers.drain() {
            self.stats.pooled_bytes -= class * buffers.len() as u64;
            self.stats.reserved_bytes -= buffers.iter().map(wgpu::Buffer::size).sum::<u64>();
        }
        for arenas in self.arenas.values_mut() {
            for slot in arenas.iter_mut() {
                if let Some(arena) = slot.as_ref().filter(|a| a.live == 0) {
                    self.stats.pooled_bytes -= arena.free.values().sum::<u64>();
                    self.stats.reserved_bytes -= arena.buffer.size();
                    *slot = None;
                }
            }
        }
    }
}

/// A tensor's storage on loan from the pool: `class` bytes at `offset` of
/// an arena or of a buffer of its own. Dropping it returns it.
pub(crate) struct PooledBuffer {
    buffer: wgpu::Buffer,
    offset: u64,
    class: u64,
    /// The bytes asked for (at most `class`): what the tensor may read;
    /// the rest of the class is pool slack.
    bytes: u64,
    home: Home,
    pool: Arc<Mutex<Pool>>,
    /// PyTorch's `VariableVersion`: bumped by every in-place write, so a
    /// backward can tell that a tensor it saved has changed since.
    version: AtomicU64,
}

impl PooledBuffer {
    pub(crate) fn new(taken: Taken, class: u64, bytes: u64, pool: Arc<Mutex<Pool>>) -> PooledBuffer {
        let Taken { buffer, offset, home } = taken;
        PooledBuffer { buffer, offset, class, bytes: bytes.min(class), home, pool, version: AtomicU64::new(0) }
    }

    /// The bytes the storage was asked for: reads past them are reads of
    /// pool slack, not of the tensor.
    pub(crate) fn requested_bytes(&self) -> u64 {
        self.bytes
    }

    /// How many in-place writes this storage has seen.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Records an in-place write (an optimizer update).
    pub(crate) fn bump_version(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    /// The buffer (arena or dedicated) the storage lives in.
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The storage's byte range in [`Self::raw`].
    pub(crate) fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.class
    }

    /// The storage as a kernel operand of `dtype`.
    pub(crate) fn operand(&self, dtype: DType) -> crate::exec::bind::Operand {
        crate::exec::bind::Operand { buffer: self.buffer.clone(), range: self.range(), dtype }
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool.lock().give_back(self.home, self.buffer.clone(), self.offset, self.class);
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_waste_at_most_a_quarter() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(257), 320);
        assert_eq!(size_class(1024), 1024);
        assert_eq!(size_class(1025), 1280);
        for bytes in [300u64, 5000, 65_537, 1 << 20, 3_000_001] {
            let c = size_class(bytes);
            assert!(c >= bytes && c * 4 <= bytes * 5 + 1024, "{bytes} -> {c}");
        }
    }
}
