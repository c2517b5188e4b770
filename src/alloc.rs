//! Caching allocator: freed buffers go back to a pool keyed by size class
//! and are handed out again, so a training loop allocates nothing after its
//! first step. GPU work is ordered on one queue, so a buffer can be reused as
//! soon as its last handle drops, even if commands that read it are still
//! pending: later commands run after them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Memory accounting of one device, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by live tensors (their size classes).
    pub live_bytes: u64,
    /// The most `live_bytes` has been since the device was created or
    /// [`crate::Device::reset_peak_memory`] was called.
    pub peak_bytes: u64,
    /// Bytes of freed buffers kept for reuse.
    pub pooled_bytes: u64,
    /// Buffers created on the device so far (a steady-state loop adds none).
    pub buffers_created: u64,
}

/// Rounds a request up to its size class: powers of two split into four
/// steps (at most 25% waste), with a 256-byte floor.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let pow = 63 - (bytes - 1).leading_zeros() as u64; // 2^pow < bytes <= 2^(pow+1)
    let base = 1u64 << pow;
    let step = base / 4;
    bytes.div_ceil(step) * step
}

#[derive(Default)]
pub(crate) struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    pub(crate) stats: MemoryStats,
    /// Buffers whose contents a failed batch left stale (`crate::poison`).
    pub(crate) poison: crate::poison::Poison,
}

impl Pool {
    /// Takes a pooled buffer of this class, if any, and counts it live.
    pub(crate) fn take(&mut self, class: u64) -> Option<wgpu::Buffer> {
        let buf = self.free.get_mut(&class)?.pop()?;
        self.stats.pooled_bytes -= class;
        self.mark_live(class);
        Some(buf)
    }

    pub(crate) fn mark_live(&mut self, class: u64) {
        self.stats.live_bytes += class;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.live_bytes);
    }

    fn give_back(&mut self, class: u64, buffer: wgpu::Buffer) {
        self.poison.forget(&buffer);
        self.stats.live_bytes -= class;
        self.stats.pooled_bytes += class;
        self.free.entry(class).or_default().push(buffer);
    }

    /// Drops every pooled buffer, returning the memory to the driver.
    pub(crate) fn clear(&mut self) {
        self.free.clear();
        self.stats.pooled_bytes = 0;
    }
}

/// A device buffer on loan from the pool; dropping it returns it.
pub(crate) struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    class: u64,
    pool: Arc<Mutex<Pool>>,
    /// PyTorch's `VariableVersion`: bumped by every in-place write, so a
    /// backward can tell that a tensor it saved has changed since.
    version: AtomicU64,
}

impl PooledBuffer {
    pub(crate) fn new(buffer: wgpu::Buffer, class: u64, pool: Arc<Mutex<Pool>>) -> PooledBuffer {
        PooledBuffer { buffer: Some(buffer), class, pool, version: AtomicU64::new(0) }
    }

    /// How many in-place writes this storage has seen.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Records an in-place write (an optimizer update).
    pub(crate) fn bump_version(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer is present until drop")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.lock().give_back(self.class, buffer);
        }
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
