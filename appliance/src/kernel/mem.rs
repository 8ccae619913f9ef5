//! Physical memory: the usable regions from the PVH memory map, the kernel
//! heap (the `#[global_allocator]`) that grows into them, page-frame
//! allocation on top of it, and memory totals.
//!
//! Identity map: every byte of RAM is mapped at virtual address ==
//! physical address (see [`super::paging`]), so a pointer from the heap *is*
//! the address a device must be given for DMA. Page-aligned DMA memory is
//! an ordinary allocation with `Layout` alignment 4096 (or
//! [`alloc_frames`]).
//!
//! The heap is [`talc`] behind a spin lock. Its memory source hands it the
//! usable ranges one at a time, lowest first, when it runs out
//! ([`talc::source::Source::acquire`]), so the heap grows over all of RAM
//! without a fixed arena. Usable = type-1 (RAM) entries minus the low
//! 1 MiB, the kernel image (with `.bss` and the boot stack) and the
//! loader's data (start info, command lines, module list, modules, memory
//! map). A wrapper counts bytes in use for [`memory_stats`].

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use talc::base::binning::Binning;
use talc::base::Talc;
use talc::source::Source;

use super::start_info::{StartInfo, MEMMAP_TYPE_RAM};

/// Size of a page frame.
pub const PAGE_SIZE: usize = 4096;
/// Most usable ranges tracked (after the reserved ranges are cut out).
const MAX_REGIONS: usize = 128;
/// Ranges smaller than this are not worth a heap.
const MIN_REGION: u64 = 64 * 1024;
/// Physical memory below this is left alone (real-mode structures, BIOS).
const LOW_MEMORY_END: u64 = 1 << 20;

/// A half-open physical range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Range {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True if the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Fixed-capacity list of ranges (no allocation: it exists before the heap).
#[derive(Clone, Copy, Debug)]
pub struct RangeList {
    items: [Range; MAX_REGIONS],
    len: usize,
}

impl RangeList {
    const fn new() -> Self {
        RangeList {
            items: [Range { start: 0, end: 0 }; MAX_REGIONS],
            len: 0,
        }
    }

    fn push(&mut self, r: Range) -> bool {
        if r.is_empty() {
            return true;
        }
        if self.len == MAX_REGIONS {
            return false;
        }
        self.items[self.len] = r;
        self.len += 1;
        true
    }

    fn remove(&mut self, i: usize) -> Range {
        let r = self.items[i];
        self.items.copy_within(i + 1..self.len, i);
        self.len -= 1;
        r
    }

    /// The ranges, in order.
    pub fn as_slice(&self) -> &[Range] {
        &self.items[..self.len]
    }

    /// Removes `[cut.start, cut.end)` from every range, splitting as needed.
    fn subtract(&mut self, cut: Range) {
        let mut i = 0;
        while i < self.len {
            let r = self.items[i];
            if cut.end <= r.start || cut.start >= r.end {
                i += 1;
                continue;
            }
            self.remove(i);
            let below = Range {
                start: r.start,
                end: cut.start.max(r.start),
            };
            let above = Range {
                start: cut.end.min(r.end),
                end: r.end,
            };
            // Re-inserting at most two pieces where one was removed; if the
            // list is full the piece is lost (memory unused, never unsafe).
            if !above.is_empty() {
                self.insert(i, above);
            }
            if !below.is_empty() {
                self.insert(i, below);
                i += 1;
            }
            if !above.is_empty() {
                i += 1;
            }
        }
    }

    fn insert(&mut self, i: usize, r: Range) {
        if self.len == MAX_REGIONS {
            return;
        }
        self.items.copy_within(i..self.len, i + 1);
        self.items[i] = r;
        self.len += 1;
    }

    fn sort(&mut self) {
        self.items[..self.len].sort_unstable_by_key(|r| r.start);
    }
}

/// The heap's memory source: usable ranges not yet given to the allocator.
#[derive(Debug)]
pub struct MemMapSource {
    pending: RangeList,
    claimed_bytes: u64,
}

// SAFETY: `acquire` only calls `claim` on the given `Talc` with ranges
// of identity-mapped RAM that nothing else uses, and never allocates.
unsafe impl Source for MemMapSource {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        // Room for the request plus alignment slack and allocator metadata.
        let need = layout.size() as u64 + layout.align() as u64 + 4096;
        loop {
            let src = &mut talc.source;
            let Some(i) = src.pending.as_slice().iter().position(|r| r.len() >= need) else {
                return Err(());
            };
            let r = src.pending.remove(i);
            // SAFETY: `r` is usable RAM (type 1, outside every reserved
            // range), identity-mapped writable before it was queued, and
            // handed to the allocator exactly once.
            let claimed = unsafe { talc.claim(r.start as *mut u8, r.len() as usize) };
            if claimed.is_some() {
                talc.source.claimed_bytes += r.len();
                return Ok(());
            }
        }
    }
}

type Heap = talc::TalcLock<spin::Mutex<()>, MemMapSource>;

/// The kernel heap: talc plus byte counters.
pub struct KernelHeap {
    inner: Heap,
    used: AtomicUsize,
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap {
    inner: Heap::new(MemMapSource {
        pending: RangeList::new(),
        claimed_bytes: 0,
    }),
    used: AtomicUsize::new(0),
};

// SAFETY: every method forwards to talc's `GlobalAlloc`, which upholds the
// contract; the counters are bookkeeping only.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees (non-zero size).
        let p = unsafe { self.inner.alloc(layout) };
        if !p.is_null() {
            self.used.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees (ptr from this
        // allocator with this layout).
        unsafe { self.inner.dealloc(ptr, layout) };
        self.used.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { self.inner.alloc_zeroed(layout) };
        if !p.is_null() {
            self.used.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.used.fetch_add(new_size, Ordering::Relaxed);
            self.used.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

/// Type-1 RAM as the memory map reported it (for cache attributes and
/// totals).
static RAM: spin::Mutex<RangeList> = spin::Mutex::new(RangeList::new());
static RAM_BYTES: AtomicU64 = AtomicU64::new(0);
static USABLE_BYTES: AtomicU64 = AtomicU64::new(0);
static KERNEL_BYTES: AtomicU64 = AtomicU64::new(0);

/// What [`init`] found, for the boot log.
#[derive(Clone, Copy, Debug)]
pub struct MemorySummary {
    /// Bytes of type-1 RAM in the memory map.
    pub ram_bytes: u64,
    /// Bytes the heap may use (RAM minus everything reserved).
    pub usable_bytes: u64,
    /// Number of usable ranges.
    pub regions: usize,
    /// Highest RAM address + 1.
    pub ram_end: u64,
}

/// Builds the usable ranges from the memory map and hands them to the
/// heap. RAM above 4 GiB is identity-mapped first (page tables come from
/// the low ranges, which the heap claims first).
///
/// Call once, single-threaded, before anything allocates.
pub fn init(info: &StartInfo) -> MemorySummary {
    let mut ram = RangeList::new();
    for e in info.memory_map() {
        if e.kind == MEMMAP_TYPE_RAM && e.size != 0 {
            ram.push(Range {
                start: e.addr,
                end: e.addr.saturating_add(e.size),
            });
        }
    }
    if ram.len == 0 {
        // No memory map (start info version 0): fall back to 16 MiB above
        // the kernel image, which every machine we boot on has.
        let (_, kend) = super::boot::kernel_image_range();
        ram.push(Range {
            start: LOW_MEMORY_END,
            end: kend + (16 << 20),
        });
    }
    ram.sort();
    let ram_bytes: u64 = ram.as_slice().iter().map(Range::len).sum();
    let ram_end = ram.as_slice().iter().map(|r| r.end).max().unwrap_or(0);

    let mut usable = ram;
    usable.subtract(Range {
        start: 0,
        end: LOW_MEMORY_END,
    });
    let (kstart, kend) = super::boot::kernel_image_range();
    KERNEL_BYTES.store(kend - kstart, Ordering::Relaxed);
    usable.subtract(Range {
        start: kstart,
        end: kend,
    });
    for (s, e) in info.reserved_ranges().into_iter().flatten() {
        usable.subtract(Range { start: s, end: e });
    }
    // Page-align, drop crumbs.
    let mut aligned = RangeList::new();
    for r in usable.as_slice() {
        let a = Range {
            start: r.start.next_multiple_of(PAGE_SIZE as u64),
            end: r.end & !(PAGE_SIZE as u64 - 1),
        };
        if a.len() >= MIN_REGION {
            aligned.push(a);
        }
    }
    let usable_bytes: u64 = aligned.as_slice().iter().map(Range::len).sum();

    *RAM.lock() = ram;
    RAM_BYTES.store(ram_bytes, Ordering::Relaxed);
    USABLE_BYTES.store(usable_bytes, Ordering::Relaxed);

    // Queue the ranges below 4 GiB (already mapped by the boot tables)...
    let four_g = 1u64 << 32;
    {
        let mut heap = HEAP.inner.lock();
        for r in aligned.as_slice() {
            let low = Range {
                start: r.start,
                end: r.end.min(four_g),
            };
            heap.source.pending.push(low);
        }
    }
    // ...then map what lies above (allocating page tables from the low
    // ranges) and queue it too.
    for r in aligned.as_slice() {
        let high = Range {
            start: r.start.max(four_g),
            end: r.end,
        };
        if high.is_empty() {
            continue;
        }
        if super::paging::map_ram(high.start, high.len()).is_ok() {
            HEAP.inner.lock().source.pending.push(high);
        } else {
            USABLE_BYTES.fetch_sub(high.len(), Ordering::Relaxed);
        }
    }

    MemorySummary {
        ram_bytes,
        usable_bytes: USABLE_BYTES.load(Ordering::Relaxed),
        regions: aligned.len,
        ram_end,
    }
}

/// True if any byte of `[start, end)` is type-1 RAM in the memory map.
pub fn overlaps_ram(start: u64, end: u64) -> bool {
    RAM.lock()
        .as_slice()
        .iter()
        .any(|r| start < r.end && r.start < end)
}

/// The memory map's RAM ranges (sorted).
pub fn ram_ranges() -> RangeList {
    *RAM.lock()
}

/// Memory totals for a status endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStats {
    /// Type-1 RAM the memory map reported.
    pub ram_bytes: u64,
    /// Bytes the heap may grow into (RAM minus kernel, loader data, low 1 MiB).
    pub total_bytes: u64,
    /// Bytes currently allocated (sum of live allocation sizes).
    pub used_bytes: u64,
    /// Bytes the heap has claimed so far from the usable ranges.
    pub heap_claimed_bytes: u64,
    /// Size of the kernel image (code, data, bss, boot stack).
    pub kernel_bytes: u64,
}

/// Current memory totals.
pub fn memory_stats() -> MemoryStats {
    let claimed = HEAP.inner.lock().source.claimed_bytes;
    MemoryStats {
        ram_bytes: RAM_BYTES.load(Ordering::Relaxed),
        total_bytes: USABLE_BYTES.load(Ordering::Relaxed),
        used_bytes: HEAP.used.load(Ordering::Relaxed) as u64,
        heap_claimed_bytes: claimed,
        kernel_bytes: KERNEL_BYTES.load(Ordering::Relaxed),
    }
}

fn frames_layout(count: usize) -> Option<Layout> {
    let size = count.checked_mul(PAGE_SIZE)?;
    if size == 0 {
        return None;
    }
    Layout::from_size_align(size, PAGE_SIZE).ok()
}

/// Allocates `count` contiguous, zeroed, 4 KiB-aligned page frames and
/// returns their physical address (== virtual address), or `None` when out
/// of memory. Free with [`free_frames`].
pub fn alloc_frames(count: usize) -> Option<u64> {
    let layout = frames_layout(count)?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
    (!p.is_null()).then_some(p as u64)
}

/// Frees frames from [`alloc_frames`].
///
/// # Safety
///
/// `paddr` must come from `alloc_frames(count)` with the same `count`, and
/// nothing (CPU or device) may use the frames afterwards.
pub unsafe fn free_frames(paddr: u64, count: usize) {
    if let Some(layout) = frames_layout(count) {
        // SAFETY: per the contract, the pointer was allocated with this
        // layout by the global allocator.
        unsafe { alloc::alloc::dealloc(paddr as *mut u8, layout) };
    }
}
