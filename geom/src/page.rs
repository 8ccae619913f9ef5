//! Pages, page references and scatter-gather lists: the data a bio carries.
//!
//! A bio never holds a pointer into someone's buffer: it holds references
//! to whole 4 KiB pages (DragonFly's XIO). Platform code hands a page's
//! address to a device for DMA without touching the bytes. Code that must
//! read or write the bytes with the CPU goes through [`SgList::map`] or the
//! copy helpers built on it, and every such step is counted in a
//! [`DataCounters`] (the sf_buf idea: mapping is explicit and measured).
//!
//! **Who may touch a page.** A page is either free, mapped by the CPU
//! (inside one `map` call), or lent to one or more devices (from
//! [`SgList::lend`] until [`SgList::give_back`]). The two exclude each
//! other: a map of a page that a device holds fails with [`PageBusy`], and
//! so does lending a page that is mapped. Addresses exist only for lent
//! pages ([`PageRef::dma_addr`]), so safe code never gets a slice of
//! memory a device may be writing. Several devices may hold one page at
//! once: the children of a split bio share pages, each child on its own
//! byte range.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use smallvec::SmallVec;

/// Bytes in one page.
pub const PAGE_SIZE: usize = 4096;

/// The bytes of one page, aligned so that a page never straddles a frame.
#[repr(C, align(4096))]
pub struct PageData(pub [u8; PAGE_SIZE]);

/// The heap had no room for a page (or a page list): the caller waits
/// for memory to come back and tries again, or fails the request with
/// [`crate::bio::BioError::NoMemory`]. Never a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoMemory;

impl core::fmt::Display for NoMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "out of memory")
    }
}

/// The bytes of one page on the heap, allocated fallibly: an exhausted
/// heap is an error value ([`NoMemory`]), not a panic.
pub struct PageBox(Box<[PageData]>);

impl PageBox {
    /// A zero-filled page, or [`NoMemory`].
    pub fn try_zeroed() -> Result<PageBox, NoMemory> {
        let mut v: Vec<PageData> = Vec::new();
        v.try_reserve_exact(1).map_err(|_| NoMemory)?;
        v.push(PageData([0; PAGE_SIZE]));
        // Length equals capacity: no reallocation.
        Ok(PageBox(v.into_boxed_slice()))
    }

    /// The page's bytes.
    pub fn bytes(&self) -> &[u8; PAGE_SIZE] {
        &self.0[0].0
    }

    /// The page's bytes, to change them.
    pub fn bytes_mut(&mut self) -> &mut [u8; PAGE_SIZE] {
        &mut self.0[0].0
    }
}

/// [`PageInner::state`]: the CPU has the page mapped.
const MAPPED: u32 = 1 << 31;

struct PageInner {
    /// Address of the bytes; identical to the physical address in the
    /// appliance, whose memory is identity-mapped.
    addr: usize,
    /// [`MAPPED`], or the number of devices the page is lent to.
    state: AtomicU32,
    data: spin::Mutex<PageBox>,
}

/// A page was asked for by the CPU while a device holds it, or by a
/// device while the CPU has it mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageBusy;

impl core::fmt::Display for PageBusy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "page in use by a device")
    }
}

/// A reference-counted 4 KiB page.
///
/// Cloning a `Page` shares the same bytes; that is how bios are cloned and
/// split without copying data.
#[derive(Clone)]
pub struct Page(Arc<PageInner>);

impl Page {
    /// Allocates a zero-filled page. An exhausted heap is the allocation
    /// error (a panic): the I/O path uses [`Page::try_new_zeroed`].
    pub fn new_zeroed() -> Page {
        match Page::try_new_zeroed() {
            Ok(p) => p,
            Err(NoMemory) => {
                alloc::alloc::handle_alloc_error(core::alloc::Layout::new::<PageData>())
            }
        }
    }

    /// Allocates a zero-filled page, or says there is no memory for one.
    pub fn try_new_zeroed() -> Result<Page, NoMemory> {
        let data = PageBox::try_zeroed()?;
        let addr = data.bytes().as_ptr() as usize;
        Ok(Page(Arc::new(PageInner {
            addr,
            state: AtomicU32::new(0),
            data: spin::Mutex::new(data),
        })))
    }

    /// True when both handles share the same bytes.
    pub fn same(&self, other: &Page) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Number of handles sharing this page.
    pub fn share_count(&self) -> usize {
        Arc::strong_count(&self.0)
    }

    /// True while a device holds the page.
    pub fn is_lent(&self) -> bool {
        let s = self.0.state.load(Ordering::Acquire);
        s != 0 && s & MAPPED == 0
    }

    /// Lends the page to a device (a socket being read into or written
    /// from, in hosted) for as long as the guard lives; its address is
    /// [`PageLease::dma_addr`]. Fails while the CPU has the page mapped.
    pub fn lend(&self) -> Result<PageLease<'_>, PageBusy> {
        self.lend_raw()?;
        Ok(PageLease(self))
    }

    /// Marks the page as held by one more device.
    fn lend_raw(&self) -> Result<(), PageBusy> {
        self.0
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & MAPPED == 0 && s < MAPPED - 1).then_some(s + 1)
            })
            .map(|_| ())
            .map_err(|_| PageBusy)
    }

    /// A device gave the page back.
    fn give_back(&self) {
        let before = self.0.state.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before != 0 && before & MAPPED == 0, "page given back twice");
    }

    /// Copies `dst.len()` bytes from `offset` of the page into `dst` (a
    /// counted map and copy). Fails while a device holds the page.
    pub fn copy_out(
        &self,
        offset: usize,
        dst: &mut [u8],
        counters: &DataCounters,
    ) -> Result<(), PageBusy> {
        self.with_bytes(|page| dst.copy_from_slice(&page[offset..offset + dst.len()]))?;
        counters.add_mapped(dst.len());
        counters.add_copied(dst.len());
        Ok(())
    }

    /// Copies `src` into the page at `offset` (a counted map and copy).
    /// Fails while a device holds the page.
    pub fn copy_in(
        &self,
        offset: usize,
        src: &[u8],
        counters: &DataCounters,
    ) -> Result<(), PageBusy> {
        self.with_bytes(|page| page[offset..offset + src.len()].copy_from_slice(src))?;
        counters.add_mapped(src.len());
        counters.add_copied(src.len());
        Ok(())
    }

    /// Runs `f` on the page's bytes, unless a device holds the page.
    fn with_bytes<R>(&self, f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R) -> Result<R, PageBusy> {
        self.0
            .state
            .compare_exchange(0, MAPPED, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| PageBusy)?;
        let r = f(self.0.data.lock().bytes_mut());
        self.0.state.store(0, Ordering::Release);
        Ok(r)
    }
}

/// One page lent to a device while the guard lives (see [`Page::lend`]).
#[derive(Debug)]
pub struct PageLease<'a>(&'a Page);

impl PageLease<'_> {
    /// The address of the page's first byte, for platform code.
    pub fn dma_addr(&self) -> usize {
        self.0 .0.addr
    }
}

impl Drop for PageLease<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// Proof that the pages of an [`SgList`] are lent to a device: returned
/// by [`SgList::lend`], it must go back through [`SgList::give_back`] on
/// the same list once the device is done. A lease that is dropped instead
/// leaves the pages held, which is safe: they can no longer be mapped.
#[must_use = "give the pages back with SgList::give_back"]
#[derive(Debug)]
pub struct Lease {
    segments: usize,
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
    encrypted: AtomicU64,
    decrypted: AtomicU64,
}

impl DataCounters {
    /// Creates zeroed counters.
    pub const fn new() -> DataCounters {
        DataCounters {
            mapped: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            encrypted: AtomicU64::new(0),
            decrypted: AtomicU64::new(0),
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

    /// Bytes an encrypting class enciphered on their way down.
    pub fn bytes_encrypted(&self) -> u64 {
        self.encrypted.load(Ordering::Relaxed)
    }

    /// Bytes an encrypting class deciphered on their way up.
    pub fn bytes_decrypted(&self) -> u64 {
        self.decrypted.load(Ordering::Relaxed)
    }

    /// Records `n` bytes enciphered.
    pub fn add_encrypted(&self, n: usize) {
        self.encrypted.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records `n` bytes deciphered.
    pub fn add_decrypted(&self, n: usize) {
        self.decrypted.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records `n` bytes mapped (used by code that maps through its own
    /// means, or moves counts from one set of counters to another).
    pub fn add_mapped(&self, n: usize) {
        self.mapped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records `n` bytes copied (used by code that copies through a map).
    pub fn add_copied(&self, n: usize) {
        self.copied.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Adds every count of `other` to these.
    pub fn add(&self, other: &DataCounters) {
        self.add_mapped(other.bytes_mapped() as usize);
        self.add_copied(other.bytes_copied() as usize);
        self.add_encrypted(other.bytes_encrypted() as usize);
        self.add_decrypted(other.bytes_decrypted() as usize);
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

impl PageRef {
    /// The address of the range's first byte, for a DMA descriptor or a
    /// vectored system call in platform code. Only a lent page has one:
    /// `lease` is the proof, from [`SgList::lend`] on the list holding
    /// this range (or on a list sharing its page).
    pub fn dma_addr(&self, lease: &Lease) -> usize {
        let _ = lease;
        debug_assert!(self.page.is_lent(), "dma_addr of a page not lent");
        self.page.0.addr + self.offset as usize
    }
}

/// Page ranges kept inline in a list (16 KiB of whole pages); longer
/// lists go to the heap, once, sized by [`SgList::with_capacity`].
const INLINE_SEGMENTS: usize = 4;

/// A scatter-gather list: the ordered page ranges that make up a bio's data.
#[derive(Clone, Debug, Default)]
pub struct SgList {
    segs: SmallVec<[PageRef; INLINE_SEGMENTS]>,
    len_bytes: u64,
}

impl SgList {
    /// An empty list (for bios that carry no data).
    pub const fn new() -> SgList {
        SgList {
            segs: SmallVec::new_const(),
            len_bytes: 0,
        }
    }

    /// An empty list with room for `segments` page ranges (one allocation
    /// at most, none for a few).
    pub fn with_capacity(segments: usize) -> SgList {
        SgList {
            segs: SmallVec::with_capacity(segments),
            len_bytes: 0,
        }
    }

    /// Drops every page range, keeping the room (for a list reused by the
    /// next request).
    pub fn clear(&mut self) {
        self.segs.clear();
        self.len_bytes = 0;
    }

    /// How many page ranges fit without growing.
    pub fn capacity(&self) -> usize {
        self.segs.capacity()
    }

    /// An empty list with room for `segments` page ranges, or
    /// [`NoMemory`] when the heap has no room for a long list.
    pub fn try_with_capacity(segments: usize) -> Result<SgList, NoMemory> {
        let mut segs = SmallVec::new();
        segs.try_reserve_exact(segments).map_err(|_| NoMemory)?;
        Ok(SgList { segs, len_bytes: 0 })
    }

    /// Allocates fresh zeroed pages covering `len_bytes`.
    pub fn alloc(len_bytes: usize) -> SgList {
        let mut sg = SgList::with_capacity(len_bytes.div_ceil(PAGE_SIZE));
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

    /// Fresh pages holding a copy of `bytes` (metadata sectors, test
    /// data); the copy is counted. Cannot fail: nobody else holds the
    /// pages yet.
    pub fn from_bytes(bytes: &[u8], counters: &DataCounters) -> SgList {
        let mut sg = SgList::new();
        for chunk in bytes.chunks(PAGE_SIZE) {
            let page = Page::new_zeroed();
            page.0.data.lock().bytes_mut()[..chunk.len()].copy_from_slice(chunk);
            counters.add_mapped(chunk.len());
            sg.push(PageRef {
                page,
                offset: 0,
                len: chunk.len() as u32,
            });
        }
        counters.add_copied(bytes.len());
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
        let mut out = SgList::with_capacity(len.div_ceil(PAGE_SIZE as u64) as usize + 1);
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

    /// Lends every page of the list to a device: until [`SgList::give_back`]
    /// no page of it can be mapped, and [`PageRef::dma_addr`] gives the
    /// addresses. Fails, lending nothing, if the CPU has one of them mapped.
    pub fn lend(&self) -> Result<Lease, PageBusy> {
        for (i, r) in self.segs.iter().enumerate() {
            if let Err(e) = r.page.lend_raw() {
                for r in &self.segs[..i] {
                    r.page.give_back();
                }
                return Err(e);
            }
        }
        Ok(Lease {
            segments: self.segs.len(),
        })
    }

    /// What a device does with the pages it holds, for the fake devices of
    /// tests: runs `f` on each page range (with its offset in the list)
    /// while the pages stay lent. Counted as mapped in `counters` (the
    /// device's own, not a provider's).
    #[cfg(any(test, feature = "testing"))]
    pub fn device_access(
        &self,
        lease: &Lease,
        counters: &DataCounters,
        mut f: impl FnMut(u64, &mut [u8]),
    ) {
        let _ = lease;
        let mut pos = 0u64;
        for r in &self.segs {
            debug_assert!(r.page.is_lent());
            let start = r.offset as usize;
            let mut data = r.page.0.data.lock();
            let bytes = &mut data.bytes_mut()[start..start + r.len as usize];
            counters.add_mapped(bytes.len());
            f(pos, bytes);
            pos += u64::from(r.len);
        }
    }

    /// The device is done with the pages lent by `lease`.
    pub fn give_back(&self, lease: Lease) {
        debug_assert_eq!(lease.segments, self.segs.len(), "lease of another list");
        for r in &self.segs {
            r.page.give_back();
        }
    }

    /// Maps each page range in turn and hands its bytes to `f` with the
    /// range's offset within the list. Counts the bytes as mapped. Fails,
    /// at the first such page, when a device holds one of them.
    pub fn map(
        &self,
        counters: &DataCounters,
        mut f: impl FnMut(u64, &mut [u8]),
    ) -> Result<(), PageBusy> {
        let mut pos = 0u64;
        for r in &self.segs {
            let start = r.offset as usize;
            r.page.with_bytes(|page| {
                let bytes = &mut page[start..start + r.len as usize];
                counters.add_mapped(bytes.len());
                f(pos, bytes);
            })?;
            pos += u64::from(r.len);
        }
        Ok(())
    }

    /// Maps only the ranges overlapping `[offset, offset + len)` and hands
    /// `f` each overlapping piece with its offset relative to `offset`.
    /// Fails as [`SgList::map`] does.
    pub fn map_range(
        &self,
        offset: u64,
        len: u64,
        counters: &DataCounters,
        mut f: impl FnMut(u64, &mut [u8]),
    ) -> Result<(), PageBusy> {
        let end = offset + len;
        let mut pos = 0u64;
        for r in &self.segs {
            let rend = pos + u64::from(r.len);
            if rend > offset && pos < end {
                let from = offset.max(pos) - pos;
                let to = end.min(rend) - pos;
                let start = r.offset as usize;
                r.page.with_bytes(|page| {
                    let bytes = &mut page[start + from as usize..start + to as usize];
                    counters.add_mapped(bytes.len());
                    f(pos + from - offset, bytes);
                })?;
            }
            pos = rend;
            if pos >= end {
                break;
            }
        }
        Ok(())
    }

    /// Copies `src` into the list starting at byte `offset`.
    pub fn copy_from_slice(
        &self,
        offset: u64,
        src: &[u8],
        counters: &DataCounters,
    ) -> Result<(), PageBusy> {
        self.map_range(offset, src.len() as u64, counters, |at, dst| {
            let at = at as usize;
            dst.copy_from_slice(&src[at..at + dst.len()]);
        })?;
        counters.add_copied(src.len());
        Ok(())
    }

    /// Copies bytes starting at `offset` of the list into `dst`.
    pub fn copy_to_slice(
        &self,
        offset: u64,
        dst: &mut [u8],
        counters: &DataCounters,
    ) -> Result<(), PageBusy> {
        let n = dst.len();
        self.map_range(offset, n as u64, counters, |at, src| {
            let at = at as usize;
            dst[at..at + src.len()].copy_from_slice(src);
        })?;
        counters.add_copied(n);
        Ok(())
    }

    /// Fills the whole list with zeroes.
    pub fn zero(&self, counters: &DataCounters) -> Result<(), PageBusy> {
        self.map(counters, |_, b| b.fill(0))?;
        counters.add_copied(self.len_bytes as usize);
        Ok(())
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
        let lease = sg.lend().unwrap();
        assert!(sg.iter().all(|r| r.dma_addr(&lease) % PAGE_SIZE == 0));
        sg.give_back(lease);
    }

    #[test]
    fn slice_shares_pages_and_copies_nothing() {
        let c = DataCounters::new();
        let sg = SgList::alloc(3 * PAGE_SIZE);
        let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        sg.copy_from_slice(0, &data, &c).unwrap();
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
        part.copy_to_slice(0, &mut out, &c).unwrap();
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
        })
        .unwrap();
        assert_eq!(seen, 200);
        assert_eq!(c.bytes_mapped(), 200);
        assert_eq!(c.bytes_copied(), 0);
    }

    #[test]
    fn copies_are_counted() {
        let c = DataCounters::new();
        let sg = SgList::alloc(100);
        sg.copy_from_slice(10, &[7; 50], &c).unwrap();
        let mut out = [0u8; 100];
        sg.copy_to_slice(0, &mut out, &c).unwrap();
        assert_eq!(&out[10..60], &[7; 50]);
        assert_eq!(out[9], 0);
        assert_eq!(c.bytes_copied(), 150);
        assert_eq!(c.bytes_mapped(), 150);
    }

    #[test]
    fn a_lent_page_cannot_be_mapped_and_a_mapped_one_cannot_be_lent() {
        let c = DataCounters::new();
        let sg = SgList::alloc(2 * PAGE_SIZE);
        // A child sharing the second page, as a split bio's would.
        let child = sg.slice(PAGE_SIZE as u64, 512);
        let lease = child.lend().unwrap();
        // The first page is free; the second is at the "device".
        assert_eq!(sg.map_range(0, 512, &c, |_, b| b[0] = 1), Ok(()));
        assert_eq!(sg.copy_from_slice(0, &[0; 8192], &c), Err(PageBusy));
        assert_eq!(sg.zero(&c), Err(PageBusy));
        // A second device may hold it too (another child's range).
        let other = sg.slice(PAGE_SIZE as u64 + 512, 512).lend().unwrap();
        child.give_back(lease);
        assert_eq!(sg.zero(&c), Err(PageBusy), "still lent once");
        sg.slice(PAGE_SIZE as u64 + 512, 512).give_back(other);
        assert_eq!(sg.zero(&c), Ok(()));
        // Mapped: lending fails and lends nothing.
        let mut nested = None;
        sg.map_range(0, 1, &c, |_, _| {
            nested = Some(sg.lend().map(|l| l.segments))
        })
        .unwrap();
        assert_eq!(nested, Some(Err(PageBusy)));
        let lease = sg.lend().unwrap();
        sg.give_back(lease);
        assert_eq!(sg.zero(&c), Ok(()));
    }
}
