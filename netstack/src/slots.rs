//! Memory for the flow engine's TCP socket buffers: fixed-size,
//! page-aligned slots carved out of large anonymous mappings.
//!
//! Why not `vec![0; n]` per buffer: the allocator zeroes (touches) every
//! page of a 64 KiB buffer up front, so 10,000 idle flows cost about a GiB,
//! and freed buffers stay with the allocator (fragmented heap) after the
//! flows close. A slot here is memory the kernel fills with zeros on first
//! touch: an idle flow costs the page or two its bytes touched, and a
//! released slot's pages go back to the kernel at once
//! (`MADV_DONTNEED`). Mappings are never huge-page backed, which would make
//! one touched byte cost 2 MiB.
//!
//! The engine hands a slot to smoltcp as a borrowed slice and must drop the
//! socket before it puts the slot back; [`Slots`] unmaps everything only
//! when it is dropped itself, after the engine's sockets.

use std::ptr::NonNull;

/// Slots per mapping: few mappings (the kernel limits their number), little
/// address space per idle pool.
const SLOTS_PER_MAPPING: usize = 64;

/// Released slots kept with their pages, for the next flows: a new
/// connection then costs no page faults and no `madvise` (with its TLB
/// shootdown), which was about 12 % of the gateway's work per short
/// connection. Bounded, so that at most this many slots' worth of memory
/// stays resident after the flows close.
const WARM_SLOTS: usize = 32;
/// Of a warm slot, at most this many first bytes stay resident (a page
/// multiple): what a short connection touches, not a bulk flow's window.
const WARM_BYTES: usize = 256 * 1024;

/// One slot: `len` bytes at `ptr`, owned by whoever holds the `Slot`.
#[derive(Debug)]
pub(crate) struct Slot {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Slot` is a unique handle to memory nothing else references
// until it is turned into a slice; it can move between threads like a Box.
unsafe impl Send for Slot {}

impl Slot {
    /// The slot's memory as a slice for smoltcp.
    ///
    /// # Safety
    /// Call once per slot lease; the slice must be dropped before the slot
    /// goes back with [`Slots::put`] (and the `Slots` must outlive it).
    pub(crate) unsafe fn as_static_slice(&self) -> &'static mut [u8] {
        // SAFETY: the caller upholds the lease rules above; the memory is
        // mapped, initialised (zero-filled by the kernel) and `len` long.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Give the slot's pages back to the kernel: they read as zeros and
    /// cost nothing until touched again.
    ///
    /// # Safety
    /// Whoever holds the slot's slice must not need its bytes (an empty
    /// ring buffer) and must not be using it meanwhile.
    pub(crate) unsafe fn give_back_pages(&self) {
        // SAFETY: the range is the slot's own, inside a live mapping; the
        // caller promises its contents are not needed. Failure only means
        // the pages stay resident.
        unsafe {
            libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED);
        }
    }
}

/// A pool of equally sized slots.
pub(crate) struct Slots {
    slot_len: usize,
    mappings: Vec<(NonNull<u8>, usize)>,
    /// Released with their pages still resident (stale bytes inside).
    warm: Vec<Slot>,
    warm_max: usize,
    /// Never touched, or given back to the kernel: zero-filled on touch.
    free: Vec<Slot>,
}

// SAFETY: the pool owns its mappings exclusively; raw pointers are only
// dereferenced through leases handed out by `take`.
unsafe impl Send for Slots {}

impl Slots {
    /// A pool of slots of at least `len` bytes (rounded up to pages).
    pub(crate) fn new(len: usize) -> Self {
        Self::with_warm(len, WARM_SLOTS)
    }

    /// As [`Slots::new`], keeping up to `warm` released slots resident.
    pub(crate) fn with_warm(len: usize, warm: usize) -> Self {
        let page = page_size();
        Self {
            slot_len: len.max(1).div_ceil(page) * page,
            mappings: Vec::new(),
            warm: Vec::new(),
            warm_max: warm,
            free: Vec::new(),
        }
    }

    /// A free slot (a recently released one first, its contents stale),
    /// mapping more memory when none is left. `None` when the kernel refuses
    /// the mapping.
    pub(crate) fn take(&mut self) -> Option<Slot> {
        if let Some(slot) = self.warm.pop() {
            return Some(slot);
        }
        if self.free.is_empty() {
            self.grow()?;
        }
        self.free.pop()
    }

    /// Give a slot back: kept resident for reuse while fewer than the warm
    /// limit are, otherwise its pages return to the kernel.
    ///
    /// # Safety
    /// No slice obtained from `slot` may be alive.
    pub(crate) unsafe fn put(&mut self, slot: Slot) {
        let len = slot.len;
        // SAFETY: the caller's promise.
        unsafe { self.put_touched(slot, len) }
    }

    /// [`Slots::put`] for a slot of which at most the first `touched` bytes
    /// were written since its pages were last given back (beyond the warm
    /// part a previous lease may have left): `madvise` covers only those,
    /// so a short connection's large slot costs no system call.
    ///
    /// # Safety
    /// As [`Slots::put`]; `touched` must not understate.
    pub(crate) unsafe fn put_touched(&mut self, slot: Slot, touched: usize) {
        let warm = self.warm.len() < self.warm_max;
        // Warm: the first pages, which a short connection touches, stay;
        // the rest of a large slot goes back to the kernel.
        let keep = if warm { WARM_BYTES.min(slot.len) } else { 0 };
        let end = touched.max(WARM_BYTES).min(slot.len).div_ceil(page_size()) * page_size();
        if end > keep {
            // SAFETY: inside the slot, unreferenced (the caller's
            // promise); failure only leaves the pages resident.
            unsafe {
                libc::madvise(
                    slot.ptr.as_ptr().add(keep).cast(),
                    end - keep,
                    libc::MADV_DONTNEED,
                );
            }
        }
        if warm {
            self.warm.push(slot);
        } else {
            self.free.push(slot);
        }
    }

    fn grow(&mut self) -> Option<()> {
        let len = self.slot_len * SLOTS_PER_MAPPING;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: advice on the mapping just made. With transparent huge
        // pages "always", one touched byte would otherwise cost 2 MiB.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE);
        }
        let base = NonNull::new(ptr.cast::<u8>())?;
        self.mappings.push((base, len));
        // Handed out lowest address first.
        for i in (0..SLOTS_PER_MAPPING).rev() {
            // SAFETY: `i * slot_len < len`: inside the mapping.
            let ptr = unsafe { base.add(i * self.slot_len) };
            self.free.push(Slot {
                ptr,
                len: self.slot_len,
            });
        }
        Some(())
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        for &(ptr, len) in &self.mappings {
            // SAFETY: our own mapping; every lease ended before the pool is
            // dropped (the engine drops its sockets first).
            unsafe {
                libc::munmap(ptr.as_ptr().cast(), len);
            }
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KiB of the pool's mappings resident now (`mincore`): what its slots
    /// cost, whatever else the test process holds.
    fn resident_kib(slots: &Slots) -> usize {
        let page = page_size();
        let mut pages = 0;
        for &(ptr, len) in &slots.mappings {
            let mut vec = vec![0u8; len.div_ceil(page)];
            // SAFETY: the range is one of the pool's live mappings and
            // `vec` holds one byte per page of it.
            let r = unsafe { libc::mincore(ptr.as_ptr().cast(), len, vec.as_mut_ptr()) };
            assert_eq!(r, 0, "mincore");
            pages += vec.iter().filter(|&&b| b & 1 == 1).count();
        }
        pages * page / 1024
    }

    #[test]
    fn slots_are_zeroed_distinct_and_come_back_zeroed() {
        let mut slots = Slots::with_warm(10_000, 0);
        let a = slots.take().expect("mapping");
        let b = slots.take().expect("mapping");
        assert!(a.len >= 10_000 && a.len.is_multiple_of(page_size()));
        // SAFETY: one lease each, dropped before `put`.
        unsafe {
            let (sa, sb) = (a.as_static_slice(), b.as_static_slice());
            assert!(sa.iter().all(|&x| x == 0));
            sa.fill(7);
            assert!(sb.iter().all(|&x| x == 0), "slots do not overlap");
            slots.put(a);
        }
        let again = slots.take().expect("reused");
        // SAFETY: as above.
        unsafe {
            assert!(again.as_static_slice().iter().all(|&x| x == 0));
            slots.put(again);
            slots.put(b);
        }
    }

    #[test]
    fn untouched_slots_cost_no_memory_and_put_returns_pages() {
        let mut slots = Slots::new(1024 * 1024);
        let taken: Vec<Slot> = (0..100).map(|_| slots.take().expect("mapping")).collect();
        // 100 × 1 MiB of slots; untouched they cost nothing.
        assert_eq!(resident_kib(&slots), 0);
        for s in &taken {
            // SAFETY: lease ends at the end of the statement.
            unsafe { s.as_static_slice().fill(1) };
        }
        assert_eq!(resident_kib(&slots), 100 * 1024);
        for s in taken {
            // SAFETY: no slice is alive.
            unsafe { slots.put(s) };
        }
        // All went back but the first WARM_BYTES of the warm slots.
        assert_eq!(resident_kib(&slots), WARM_SLOTS * WARM_BYTES / 1024);
        // A slot's pages given back while it is leased.
        let s = slots.take().expect("warm");
        // SAFETY: the lease ends with the statement; nothing reads it.
        unsafe {
            s.as_static_slice().fill(2);
            s.give_back_pages();
            assert!(s.as_static_slice().iter().all(|&b| b == 0), "zeros after");
        }
        assert_eq!(
            resident_kib(&slots),
            (WARM_SLOTS - 1) * WARM_BYTES / 1024 + 1024
        );
        // SAFETY: no slice is alive.
        unsafe { slots.put(s) };
    }

    #[test]
    fn released_slots_are_reused_warm_up_to_the_limit() {
        let mut slots = Slots::with_warm(4096, 2);
        let taken: Vec<Slot> = (0..3).map(|_| slots.take().expect("mapping")).collect();
        let addrs: Vec<*mut u8> = taken.iter().map(|s| s.ptr.as_ptr()).collect();
        for s in taken {
            // SAFETY: no slice is alive; the lease ends with the statement.
            unsafe {
                s.as_static_slice().fill(9);
                slots.put(s);
            }
        }
        // The first two released stay warm (bytes and all) and come back
        // last-in first-out; the third went back to the kernel.
        let a = slots.take().expect("warm");
        let b = slots.take().expect("warm");
        let c = slots.take().expect("cold");
        assert_eq!((a.ptr.as_ptr(), b.ptr.as_ptr()), (addrs[1], addrs[0]));
        // SAFETY: one lease each, dropped before `put`.
        unsafe {
            assert!(a.as_static_slice().iter().all(|&x| x == 9));
            let cold = c.as_static_slice();
            if c.ptr.as_ptr() == addrs[2] {
                assert!(cold.iter().all(|&x| x == 0), "a cold slot is zeroed");
            }
            slots.put(a);
            slots.put(b);
            slots.put(c);
        }
    }
}
