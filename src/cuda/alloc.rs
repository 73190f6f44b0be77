//! A caching allocator for device memory, so that a training step does not call cuMemAlloc
//! per op: freed blocks go to per-size free lists and are handed out again.
//!
//! Sizes are rounded up to a size class (multiples of 512 B up to 1 MiB, then steps of 1/8
//! of the power of two below), so tensors of one shape reuse each other's blocks exactly.
//! Every kernel runs on the device's single stream, so a block released by the host while
//! kernels that read it are still queued can be handed to the next op safely: stream order
//! puts that op's kernels after them.
//!
//! When cuMemAlloc fails, the cached free blocks are returned to the driver and the
//! allocation is retried once.

use std::collections::HashMap;

/// Usage counters, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolStats {
    /// Bytes in blocks held by live buffers.
    pub in_use: usize,
    /// The largest `in_use` since the last `reset_peak`.
    pub peak_in_use: usize,
    /// Bytes obtained from the driver and not given back (in use + cached).
    pub reserved: usize,
    /// The largest `reserved` since the last `reset_peak`.
    pub peak_reserved: usize,
    /// cuMemAlloc calls so far.
    pub driver_allocs: u64,
    /// The largest block (size class) requested since the last `reset_peak`.
    pub largest_alloc: usize,
}

/// Free lists by size class.
#[derive(Default)]
pub struct Pool {
    free: HashMap<usize, Vec<u64>>,
    pub stats: PoolStats,
}

/// The size class that a request of `bytes` is served from.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= 1 << 20 {
        return bytes.div_ceil(512) * 512;
    }
    let step = (1usize << (usize::BITS - 1 - bytes.leading_zeros())) / 8;
    bytes.div_ceil(step) * step
}

impl Pool {
    /// Note a request for a block of class `class` (for `largest_alloc`).
    pub fn note_request(&mut self, class: usize) {
        self.stats.largest_alloc = self.stats.largest_alloc.max(class);
    }

    /// A cached block of class `class`, if any.
    pub fn take(&mut self, class: usize) -> Option<u64> {
        let ptr = self.free.get_mut(&class)?.pop()?;
        self.note_in_use(class);
        Some(ptr)
    }

    /// The cached block at `ptr` of class `class`, if it is free (a step graph asks for the
    /// blocks its earlier steps had, so that its pointers repeat).
    pub fn take_exact(&mut self, ptr: u64, class: usize) -> bool {
        let Some(list) = self.free.get_mut(&class) else { return false };
        let Some(i) = list.iter().rposition(|&p| p == ptr) else { return false };
        list.swap_remove(i);
        self.note_in_use(class);
        true
    }

    /// Record a fresh driver allocation of `class` bytes, now in use.
    pub fn note_driver_alloc(&mut self, class: usize) {
        self.stats.driver_allocs += 1;
        self.stats.reserved += class;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
        self.note_in_use(class);
    }

    fn note_in_use(&mut self, class: usize) {
        self.stats.in_use += class;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
    }

    /// A block comes back from a dropped buffer.
    pub fn give_back(&mut self, ptr: u64, class: usize) {
        self.stats.in_use -= class;
        self.free.entry(class).or_default().push(ptr);
    }

    /// A block in use goes straight back to the driver (`VOX2VEC_EXACT_ALLOC`).
    pub fn note_driver_free(&mut self, class: usize) {
        self.stats.in_use -= class;
        self.stats.reserved -= class;
    }

    /// Empties the free lists; returns the blocks (pointer, class) for the driver to free.
    pub fn drain(&mut self) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        for (class, ptrs) in self.free.drain() {
            self.stats.reserved -= class * ptrs.len();
            out.extend(ptrs.into_iter().map(|p| (p, class)));
        }
        out
    }

    pub fn reset_peak(&mut self) {
        self.stats.peak_in_use = self.stats.in_use;
        self.stats.peak_reserved = self.stats.reserved;
        self.stats.largest_alloc = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_cover_requests_with_little_waste() {
        for &b in &[1usize, 511, 512, 513, 4096, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 << 22, 123_456_789] {
            let c = size_class(b);
            assert!(c >= b, "{b} -> {c}");
            assert!(c - b <= (b / 8).max(511), "{b} -> {c} wastes too much");
            assert_eq!(size_class(c), c, "a class is its own class");
        }
    }

    #[test]
    fn pool_reuses_blocks_and_counts_bytes() {
        let mut p = Pool::default();
        assert_eq!(p.take(512), None);
        p.note_driver_alloc(512);
        p.give_back(0xABC, 512);
        assert_eq!(p.stats.in_use, 0);
        assert_eq!(p.take(512), Some(0xABC));
        assert_eq!(p.stats.in_use, 512);
        assert_eq!(p.stats.peak_in_use, 512);
        p.give_back(0xABC, 512);
        assert!(!p.take_exact(0xABC, 1024) && !p.take_exact(0xDEF, 512));
        assert!(p.take_exact(0xABC, 512));
        assert_eq!((p.take(512), p.stats.in_use), (None, 512));
        p.give_back(0xABC, 512);
        assert_eq!(p.drain(), vec![(0xABC, 512)]);
        assert_eq!(p.stats.reserved, 0);
    }
}
