//! Pages, page references and scatter-gather lists: the data a bio carries.
//!
//! A bio never holds a pointer into someone's buffer: it holds references
//! to whole 4 KiB pages (DragonFly's XIO). Platform code hands a page's
//! address to a device for DMA without touching the bytes. Code that must
//! read or write the bytes with the CPU goes through [`SgList::map`] or the
//! copy helpers built on it, and every such step is counted in a
//! [`DataCounters`] (the sf_buf idea: mapping is explicit and measured).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

/// Bytes in one page.
pub const PAGE_SIZE: usize = 4096;

/// The bytes of one page, aligned so that a page never straddles a frame.
#[repr(C, align(4096))]
pub struct PageData(pub [u8; PAGE_SIZE]);

struct PageInner {
    /// Address of the bytes; identical to the physical address in the
    /// appliance, whose memory is identity-mapped.
    addr: usize,
    data: spin::Mutex<Box<PageData>>,
}

/// A reference-counted 4 KiB page.
///
/// Cloning a `Page` shares the same bytes; that is how bios are cloned and
/// split without copying data.
#[derive(Clone)]
pub struct Page(Arc<PageInner>);

impl Page {
    /// Allocates a zero-filled page.
    pub fn new_zeroed() -> Page {
        let data = Box::new(PageData([0; PAGE_SIZE]));
        let addr = &*data as *const PageData as usize;
        Page(Arc::new(PageInner {
            addr,
            data: spin::Mutex::new(data),
        }))
    }

    /// Address of the page's first byte, for DMA descriptors and vectored
    /// system calls in platform code. The bytes behind it may only be
    /// accessed by a device (or the kernel on its behalf) while the bio
    /// that carries this page is in flight at that device.
    pub fn addr(&self) -> usize {
        self.0.addr
    }

    /// True when both handles share the same bytes.
    pub fn same(&self, other: &Page) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Number of handles sharing this page.
    pub fn share_count(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}

impl core::fmt::Debug for Page {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Page({:#x})", self.0.addr)
    }
}

/// Counts of data touches for one provider or engine: the figures behind
/// the "zero-copy" claim.
#[derive(Default, Debug)]
pub struct DataCounters {
    mapped: AtomicU64,
    copied: AtomicU64,
}

impl DataCounters {
    /// Creates zeroed counters.
    pub const fn new() -> DataCounters {
        DataCounters {
            mapped: AtomicU64::new(0),
            copied: AtomicU64::new(0),
        }
    }

    /// Bytes made visible to the CPU through a map step.
    pub fn bytes_mapped(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Bytes copied by the CPU between a bio's pages and other memory.
    pub fn bytes_copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    fn add_mapped(&self, n: usize) {
        self.mapped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records `n` bytes copied (used by code that copies through a map).
    pub fn add_copied(&self, n: usize) {
        self.copied.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A byte range within one page.
#[derive(Clone, Debug)]
pub struct PageRef {
    /// The page.
    pub page: Page,
    /// First byte of the range within the page.
    pub offset: u32,
    /// Length of the range in bytes; `offset + len <= PAGE_SIZE`.
    pub len: u32,
}

/// A scatter-gather list: the ordered page ranges that make up a bio's data.
#[derive(Clone, Debug, Default)]
pub struct SgList {
    segs: Vec<PageRef>,
    len_bytes: u64,
}

impl SgList {
    /// An empty list (for bios that carry no data).
    pub const fn new() -> SgList {
        SgList {
            segs: Vec::new(),
            len_bytes: 0,
        }
    }

    /// Allocates fresh zeroed pages covering `len_bytes`.
    pub fn alloc(len_bytes: usize) -> SgList {
        let mut sg = SgList::new();
        let mut left = len_bytes;
        while left > 0 {
            let n = left.min(PAGE_SIZE);
            sg.push(PageRef {
                page: Page::new_zeroed(),
                offset: 0,
                len: n as u32,
            });
            left -= n;
        }
        sg
    }

    /// Appends a page range.
    pub fn push(&mut self, r: PageRef) {
        debug_assert!(r.offset as usize + r.len as usize <= PAGE_SIZE);
        self.len_bytes += u64::from(r.len);
        self.segs.push(r);
    }

    /// Appends all ranges of `other` (pages are shared, not copied).
    pub fn append(&mut self, other: &SgList) {
        for r in &other.segs {
            self.push(r.clone());
        }
    }

    /// Total bytes described.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Number of page ranges.
    pub fn segments(&self) -> usize {
        self.segs.len()
    }

    /// The page ranges in order.
    pub fn iter(&self) -> core::slice::Iter<'_, PageRef> {
        self.segs.iter()
    }

    /// A new list sharing the pages of `[offset, offset + len)` of this one;
    /// no data is copied. Panics if the range is out of bounds (callers are
    /// the stack's own split code, which has checked it).
    pub fn slice(&self, offset: u64, len: u64) -> SgList {
        assert!(offset + len <= self.len_bytes, "sg slice out of range");
        let mut out = SgList::new();
        let mut skip = offset;
        let mut want = len;
        for r in &self.segs {
            if want == 0 {
                break;
            }
            let rlen = u64::from(r.len);
            if skip >= rlen {
                skip -= rlen;
                continue;
            }
            let take = (rlen - skip).min(want);
            out.push(PageRef {
                page: r.page.clone(),
                offset: r.offset + skip as u32,
                len: take as u32,
            });
            want -= take;
            skip = 0;
        }
        out
    }

    /// Maps each page range in turn and hands its bytes to `f` with the
    /// range's offset within the list. Counts the bytes as mapped.
    pub fn map(&self, counters: &DataCounters, mut f: impl FnMut(u64, &mut [u8])) {
        let mut pos = 0u64;
        for r in &self.segs {
            let mut guard = r.page.0.data.lock();
            let start = r.offset as usize;
            let bytes = &mut guard.0[start..start + r.len as usize];
            counters.add_mapped(bytes.len());
            f(pos, bytes);
            pos += u64::from(r.len);
        }
    }

    /// Maps only the ranges overlapping `[offset, offset + len)` and hands
    /// `f` each overlapping piece with its offset relative to `offset`.
    pub fn map_range(
        &self,
        offset: u64,
        len: u64,
        counters: &DataCounters,
        mut f: impl FnMut(u64, &mut [u8]),
    ) {
        let end = offset + len;
        let mut pos = 0u64;
        for r in &self.segs {
            let rend = pos + u64::from(r.len);
            if rend > offset && pos < end {
                let from = offset.max(pos) - pos;
                let to = end.min(rend) - pos;
                let mut guard = r.page.0.data.lock();
                let start = r.offset as usize;
                let bytes = &mut guard.0[start + from as usize..start + to as usize];
                counters.add_mapped(bytes.len());
                f(pos + from - offset, bytes);
            }
            pos = rend;
            if pos >= end {
                break;
            }
        }
    }

    /// Copies `src` into the list starting at byte `offset`.
    pub fn copy_from_slice(&self, offset: u64, src: &[u8], counters: &DataCounters) {
        self.map_range(offset, src.len() as u64, counters, |at, dst| {
            let at = at as usize;
            dst.copy_from_slice(&src[at..at + dst.len()]);
        });
        counters.add_copied(src.len());
    }

    /// Copies bytes starting at `offset` of the list into `dst`.
    pub fn copy_to_slice(&self, offset: u64, dst: &mut [u8], counters: &DataCounters) {
        let n = dst.len();
        self.map_range(offset, n as u64, counters, |at, src| {
            let at = at as usize;
            dst[at..at + src.len()].copy_from_slice(src);
        });
        counters.add_copied(n);
    }

    /// Fills the whole list with zeroes.
    pub fn zero(&self, counters: &DataCounters) {
        self.map(counters, |_, b| b.fill(0));
        counters.add_copied(self.len_bytes as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn alloc_covers_length_in_pages() {
        let sg = SgList::alloc(10_000);
        assert_eq!(sg.len_bytes(), 10_000);
        assert_eq!(sg.segments(), 3);
        assert!(sg.iter().all(|r| r.page.addr() % PAGE_SIZE == 0));
    }

    #[test]
    fn slice_shares_pages_and_copies_nothing() {
        let c = DataCounters::new();
        let sg = SgList::alloc(3 * PAGE_SIZE);
        let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        sg.copy_from_slice(0, &data, &c);
        let before = (c.bytes_mapped(), c.bytes_copied());
        let part = sg.slice(1000, 5000);
        assert_eq!(part.len_bytes(), 5000);
        assert_eq!(part.segments(), 2);
        assert!(part
            .iter()
            .next()
            .unwrap()
            .page
            .same(&sg.iter().next().unwrap().page));
        assert_eq!((c.bytes_mapped(), c.bytes_copied()), before);
        let mut out = alloc::vec![0u8; 5000];
        part.copy_to_slice(0, &mut out, &c);
        assert_eq!(&out[..], &data[1000..6000]);
    }

    #[test]
    fn map_range_counts_only_what_it_touches() {
        let c = DataCounters::new();
        let sg = SgList::alloc(2 * PAGE_SIZE);
        let mut seen = 0;
        sg.map_range(4000, 200, &c, |at, b| {
            assert_eq!(at as usize, seen);
            seen += b.len();
        });
        assert_eq!(seen, 200);
        assert_eq!(c.bytes_mapped(), 200);
        assert_eq!(c.bytes_copied(), 0);
    }

    #[test]
    fn copies_are_counted() {
        let c = DataCounters::new();
        let sg = SgList::alloc(100);
        sg.copy_from_slice(10, &[7; 50], &c);
        let mut out = [0u8; 100];
        sg.copy_to_slice(0, &mut out, &c);
        assert_eq!(&out[10..60], &[7; 50]);
        assert_eq!(out[9], 0);
        assert_eq!(c.bytes_copied(), 150);
        assert_eq!(c.bytes_mapped(), 150);
    }
}
