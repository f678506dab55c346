//! The hook binary's global allocator: a bump arena for a process that lives a millisecond.
//!
//! Measured (perf, musl static build): a third of the hook's kernel time went to musl's
//! malloc mapping and unmapping small groups of pages (dozens of `mmap`/`munmap` per run)
//! and to the page faults on each fresh page. One pre-faulted arena (`MAP_POPULATE`: one
//! system call instead of a fault per page) serves small allocations by bumping a pointer;
//! a free gives memory back only when it is the newest allocation (the common pattern of
//! temporaries), and otherwise leaves it for the process exit. Large allocations, and
//! everything once the arena is full, go to the system allocator, so memory stays bounded
//! by what the input needs. Lock-free (compare-and-swap on one pointer), so it stays
//! correct if a thread ever appears.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A registration with a realistic containerd spec uses ~130 KiB; twice that pre-faulted,
/// and anything beyond spills over to the system allocator.
pub const ARENA_BYTES: usize = 256 << 10;
/// Larger blocks are rare and may be freed for real: the system allocator handles them.
const SMALL: usize = 32 << 10;

/// See the module documentation. `const`-constructible for `#[global_allocator]`.
pub struct OneShotAlloc {
    /// Arena start; 0 before the first allocation, 1 while it is being mapped, `usize::MAX`
    /// if mapping failed (everything then goes to the system allocator).
    start: AtomicUsize,
    /// Next free byte (0 until the arena is ready).
    top: AtomicUsize,
    size: usize,
}

impl Default for OneShotAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl OneShotAlloc {
    pub const fn new() -> Self {
        Self::with_size(ARENA_BYTES)
    }

    pub const fn with_size(size: usize) -> Self {
        OneShotAlloc {
            start: AtomicUsize::new(0),
            top: AtomicUsize::new(0),
            size,
        }
    }

    /// The arena's bounds once it exists.
    fn arena(&self) -> Option<(usize, usize)> {
        let s = self.start.load(Ordering::Acquire);
        (s > 1 && s != usize::MAX).then(|| (s, s + self.size))
    }

    fn init(&self) {
        if self
            .start
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // another thread maps it (or did); meanwhile the system serves
        }
        use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
        // SAFETY: a new anonymous private mapping at an address the kernel picks; no
        // existing memory is affected. (nix's wrapper allocates nothing, as an allocator
        // must not.)
        let mapped = std::num::NonZeroUsize::new(self.size).and_then(|size| unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_POPULATE,
            )
            .ok()
        });
        let Some(p) = mapped else {
            self.start.store(usize::MAX, Ordering::Release);
            return;
        };
        let p = p.as_ptr() as usize;
        self.top.store(p, Ordering::Release);
        self.start.store(p, Ordering::Release);
    }

    fn contains(&self, ptr: *mut u8) -> bool {
        self.arena()
            .is_some_and(|(s, e)| (s..e).contains(&(ptr as usize)))
    }

    /// Bumps the pointer; None when the arena is not ready or too full.
    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        let (_, end) = self.arena()?;
        let mut top = self.top.load(Ordering::Relaxed);
        loop {
            let at = top.checked_add(layout.align() - 1)? & !(layout.align() - 1);
            let new_top = at.checked_add(layout.size())?;
            if new_top > end {
                return None;
            }
            match self
                .top
                .compare_exchange_weak(top, new_top, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(at as *mut u8),
                Err(t) => top = t,
            }
        }
    }
}

// The methods are not inlined: with LTO, inlining them into every allocation site grew the
// binary by 0.5 MB, which costs more page faults at start than the calls cost.
//
// SAFETY: every block handed out is either a fresh, aligned, non-overlapping range of the
// arena (reserved by a successful compare-and-swap of `top`) or comes from `System`;
// `dealloc`/`realloc` tell the two apart by address and give arena memory back only by
// moving `top` down from exactly the block's end.
unsafe impl GlobalAlloc for OneShotAlloc {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() <= SMALL {
            if self.start.load(Ordering::Relaxed) == 0 {
                self.init();
            }
            if let Some(p) = self.bump(layout) {
                return p;
            }
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.contains(ptr) {
            // The newest block goes back; any other stays until exit.
            let end = ptr as usize + layout.size();
            let _ =
                self.top
                    .compare_exchange(end, ptr as usize, Ordering::Relaxed, Ordering::Relaxed);
            return;
        }
        // SAFETY: not an arena block, so System allocated it with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.contains(ptr) {
            // SAFETY: System allocated it with this layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let (_, end) = self.arena().expect("contains() saw the arena");
        let old_end = ptr as usize + layout.size();
        let new_end = ptr as usize + new_size;
        // The newest block grows or shrinks in place (a Vec being filled).
        if new_end <= end
            && self
                .top
                .compare_exchange(old_end, new_end, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return ptr;
        }
        if new_size <= layout.size() {
            return ptr; // shrinking an older block: keep it where it is
        }
        // SAFETY: the alignment is unchanged and valid; the size is non-zero (it grew).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for `alloc`.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct and at least `layout.size()` long.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size());
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn bump_free_newest_and_spill() {
        let a = OneShotAlloc::with_size(64 << 10);
        unsafe {
            let p = a.alloc(layout(100, 8));
            assert!(a.contains(p) && (p as usize).is_multiple_of(8));
            let q = a.alloc(layout(10, 64));
            assert!((q as usize).is_multiple_of(64));
            assert!(q as usize >= p as usize + 100);
            // Freeing the newest gives it back; the next allocation reuses it.
            a.dealloc(q, layout(10, 64));
            let q2 = a.alloc(layout(10, 64));
            assert_eq!(q, q2);
            // Growing the newest block stays in place and keeps its bytes.
            q2.write_bytes(7, 10);
            let g = a.realloc(q2, layout(10, 64), 5000);
            assert_eq!(g, q2);
            assert_eq!(*g.add(9), 7);
            // Growing an older block moves it and keeps its bytes.
            p.write_bytes(3, 100);
            let p2 = a.realloc(p, layout(100, 8), 200);
            assert_ne!(p2, p);
            assert_eq!(*p2.add(99), 3);
            // Large requests and a full arena go to the system allocator.
            let big = a.alloc(layout(SMALL + 1, 8));
            assert!(!a.contains(big));
            big.write_bytes(1, SMALL + 1);
            let big2 = a.realloc(big, layout(SMALL + 1, 8), 3 * SMALL);
            assert_eq!(*big2.add(SMALL), 1);
            a.dealloc(big2, layout(3 * SMALL, 8));
            let mut spilled = 0;
            for _ in 0..100 {
                let x = a.alloc(layout(2000, 8));
                x.write_bytes(9, 2000);
                spilled += usize::from(!a.contains(x));
            }
            assert!(spilled > 60, "{spilled}");
        }
    }

    #[test]
    fn threads_get_disjoint_blocks() {
        static A: OneShotAlloc = OneShotAlloc::with_size(1 << 20);
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    for i in 0..2000usize {
                        let l = layout(8 + i % 40, 8);
                        unsafe {
                            let p = A.alloc(l);
                            p.write_bytes(t, l.size());
                            v.push((p as usize, l));
                        }
                    }
                    for &(p, l) in &v {
                        let s = unsafe { std::slice::from_raw_parts(p as *const u8, l.size()) };
                        assert!(s.iter().all(|&b| b == t), "block overwritten");
                    }
                    for (p, l) in v.into_iter().rev() {
                        unsafe { A.dealloc(p as *mut u8, l) };
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
