//! The md class: a memory disk of a given size.
//!
//! Storage is a sparse array of pages, allocated on first write and freed
//! by DISCARD and WRITE_ZEROES (unless the zeroing asks to keep the range
//! allocated), so an untouched md costs no memory and reads back zeroes.
//! GET_ALLOCATION reports unallocated pages as holes that read as zeroes.
//! A page that cannot be had (the heap is exhausted) fails the write with
//! `NoMemory`, never a panic; `md create` refuses a size that, with the
//! memory disks already there, is more than the stack's data memory limit
//! ([`Stack::data_memory_limit`], set by the platform from its memory).
//! md computes on data, so it maps: every byte it moves is counted as
//! mapped and copied on its provider.
//!
//! ```text
//! md create -s SIZE NAME       # provider NAME, SIZE a non-zero multiple of 512
//! md destroy [-f] NAME
//! ```

use super::{unknown_verb, Class, Command, Destroy};
use crate::bio::{Bio, BioCmd, Extent, ProviderId, MAX_EXTENTS};
use crate::config::{Args, ConfigError};
use crate::ctl::CtlError;
use crate::page::{NoMemory, PageBox, PAGE_SIZE};
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

/// The md class.
pub struct MdClass;

/// The md class's registry entry.
pub static CLASS: MdClass = MdClass;

/// `md create -s SIZE NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdCreate {
    /// Provider name.
    pub name: String,
    /// Size in bytes (a multiple of 512).
    pub size_bytes: u64,
}

impl Command for MdCreate {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        MdGeom::create(stack, &self.name, self.size_bytes)?;
        Ok(())
    }

    fn creates(&self) -> Option<(String, String)> {
        Some((self.name.clone(), self.name.clone()))
    }
}

impl Class for MdClass {
    fn name(&self) -> &'static str {
        "md"
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        let verb = args.next("'create' or 'destroy'")?;
        match verb.text {
            "create" => {}
            "destroy" => return Destroy::parse("md", args, |n| String::from(n)),
            _ => return Err(unknown_verb(args, "md", &verb, "create or destroy")),
        }
        let mut size = None;
        let mut name = None;
        while let Some(w) = args.peek() {
            match w.text {
                "-s" => {
                    args.next("-s")?;
                    let (bytes, column) = args.size("a size after -s")?;
                    if bytes == 0 || bytes % 512 != 0 {
                        return Err(
                            args.err(column, "md size must be a non-zero multiple of 512 bytes")
                        );
                    }
                    size = Some(bytes);
                }
                t if t.starts_with('-') => {
                    return Err(args.err(w.column, alloc::format!("unknown md option '{t}'")));
                }
                _ if name.is_none() => name = Some(args.name("md name")?),
                t => return Err(args.err(w.column, alloc::format!("unexpected '{t}'"))),
            }
        }
        let name = name.ok_or_else(|| args.err(args.end_column(), "expected an md name"))?;
        let size_bytes =
            size.ok_or_else(|| args.err(args.end_column(), "md create needs -s SIZE"))?;
        Ok(Arc::new(MdCreate { name, size_bytes }))
    }
}

/// Sector size of every md provider.
pub const MD_SECTOR_SIZE: u32 = 512;

/// One memory disk.
pub struct MdGeom {
    pages: Vec<Option<PageBox>>,
}

/// A size for an error message: whole GiB or MiB where it is one, else
/// bytes.
fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        alloc::format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 {
        alloc::format!("{} MiB", bytes >> 20)
    } else {
        alloc::format!("{bytes} bytes")
    }
}

/// Bytes committed to the memory disks of `stack`: the full size of each.
pub fn committed_bytes(stack: &Stack) -> u64 {
    stack
        .providers()
        .filter(|(_, p)| stack.geom_class(p.geom) == "md")
        .map(|(_, p)| p.spec.media_size)
        .sum()
}

/// Bytes committed to data held in memory: the memory disks' full sizes
/// and every buffer cache's capacity (a raid5's stripe cache).
pub fn committed_memory(stack: &Stack) -> u64 {
    committed_bytes(stack)
        + stack
            .caches()
            .iter()
            .map(|(_, s, block)| s.capacity * block)
            .sum::<u64>()
}

impl MdGeom {
    /// Creates the md geom and its provider `name` of `size_bytes` (rounded
    /// down to whole sectors) in `stack`.
    pub fn create(
        stack: &mut Stack,
        name: &str,
        size_bytes: u64,
    ) -> Result<ProviderId, StackError> {
        let size = size_bytes - size_bytes % u64::from(MD_SECTOR_SIZE);
        if let Some(limit) = stack.data_memory_limit() {
            let committed = committed_memory(stack);
            let left = limit.saturating_sub(committed);
            if size > left {
                return Err(StackError::Invalid(alloc::format!(
                    "md {name}: {} is more than the memory left for memory disks ({} of {}; {} taken by other memory disks)",
                    size_text(size),
                    size_text(left),
                    size_text(limit),
                    size_text(committed)
                )));
            }
        }
        let npages = size.div_ceil(PAGE_SIZE as u64) as usize;
        let mut pages = Vec::new();
        if pages.try_reserve_exact(npages).is_err() {
            return Err(StackError::Invalid(alloc::format!(
                "md {name}: no memory for the page table of {}",
                size_text(size)
            )));
        }
        pages.resize_with(npages, || None);
        let g = stack.reserve_geom("md", name);
        let mut spec = ProviderSpec::new(name, size, MD_SECTOR_SIZE);
        spec.can_flush = true;
        spec.can_discard = true;
        spec.can_write_zeroes = true;
        let p = match stack.add_provider(g, spec) {
            Ok(p) => p,
            Err(e) => {
                stack.abandon(g);
                return Err(e);
            }
        };
        stack.install(g, Box::new(MdGeom { pages }));
        Ok(p)
    }

    /// Bytes of memory currently allocated to hold data.
    pub fn resident_bytes(&self) -> u64 {
        self.pages.iter().filter(|p| p.is_some()).count() as u64 * PAGE_SIZE as u64
    }

    /// Calls `f(page index, byte offset within page, bio offset, length)`
    /// for each page-sized piece of `[offset, offset + len)`.
    fn pieces(offset: u64, len: u64, mut f: impl FnMut(usize, usize, u64, usize)) {
        let mut pos = 0u64;
        while pos < len {
            let abs = offset + pos;
            let idx = (abs / PAGE_SIZE as u64) as usize;
            let within = (abs % PAGE_SIZE as u64) as usize;
            let n = (PAGE_SIZE - within).min((len - pos) as usize);
            f(idx, within, pos, n);
            pos += n as u64;
        }
    }

    /// Allocates every page of `[offset, offset + len)` that has none
    /// yet. On [`NoMemory`] the pages allocated so far stay (they hold
    /// zeroes, as the holes they were did).
    fn populate(&mut self, offset: u64, len: u64) -> Result<(), NoMemory> {
        if len == 0 {
            return Ok(());
        }
        let first = (offset / PAGE_SIZE as u64) as usize;
        let last = ((offset + len - 1) / PAGE_SIZE as u64) as usize;
        for page in &mut self.pages[first..=last] {
            if page.is_none() {
                *page = Some(PageBox::try_zeroed()?);
            }
        }
        Ok(())
    }

    /// Zeroes a range keeping every page of it allocated (WRITE_ZEROES
    /// with `no_hole`).
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), NoMemory> {
        self.populate(offset, len)?;
        let pages = &mut self.pages;
        MdGeom::pieces(offset, len, |idx, within, _, n| {
            if let Some(page) = pages[idx].as_mut() {
                page.bytes_mut()[within..within + n].fill(0);
            }
        });
        Ok(())
    }

    /// Runs of allocated and unallocated pages over a range, merged, at
    /// most [`MAX_EXTENTS`] of them.
    fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        let mut full = false;
        MdGeom::pieces(offset, len, |idx, _, _, n| {
            if full {
                return;
            }
            let hole = self.pages[idx].is_none();
            let count = out.len();
            match out.last_mut() {
                Some(e) if e.hole == hole => e.length += n as u64,
                _ if count == MAX_EXTENTS => full = true,
                _ => out.push(Extent {
                    length: n as u64,
                    hole,
                    zero: hole,
                }),
            }
        });
        out
    }

    fn free_range(&mut self, offset: u64, len: u64) {
        let pages = &mut self.pages;
        MdGeom::pieces(offset, len, |idx, within, _, n| {
            if n == PAGE_SIZE {
                pages[idx] = None;
            } else if let Some(page) = pages[idx].as_mut() {
                page.bytes_mut()[within..within + n].fill(0);
            }
        });
    }
}

impl Geom for MdGeom {
    fn class_name(&self) -> &'static str {
        "md"
    }

    fn start(&mut self, io: &mut Io<'_>, provider: ProviderId, bio: Bio) {
        let counters = &io.stats(provider).data;
        match bio.cmd {
            BioCmd::Read => {
                let pages = &self.pages;
                let mapped = bio.sg.map(counters, |at, dst| {
                    MdGeom::pieces(bio.offset + at, dst.len() as u64, |idx, within, pos, n| {
                        let out = &mut dst[pos as usize..pos as usize + n];
                        match &pages[idx] {
                            Some(page) => out.copy_from_slice(&page.bytes()[within..within + n]),
                            None => out.fill(0),
                        }
                    });
                });
                if let Err(e) = mapped {
                    io.deliver(bio, Err(e.into()));
                    return;
                }
                counters.add_copied(bio.length as usize);
            }
            BioCmd::Write => {
                if let Err(e) = self.populate(bio.offset, bio.length) {
                    io.deliver(bio, Err(e.into()));
                    return;
                }
                let pages = &mut self.pages;
                let mapped = bio.sg.map(counters, |at, src| {
                    MdGeom::pieces(bio.offset + at, src.len() as u64, |idx, within, pos, n| {
                        if let Some(page) = pages[idx].as_mut() {
                            page.bytes_mut()[within..within + n]
                                .copy_from_slice(&src[pos as usize..pos as usize + n]);
                        }
                    });
                });
                if let Err(e) = mapped {
                    io.deliver(bio, Err(e.into()));
                    return;
                }
                counters.add_copied(bio.length as usize);
            }
            BioCmd::WriteZeroes if bio.no_hole => {
                if let Err(e) = self.zero_range(bio.offset, bio.length) {
                    io.deliver(bio, Err(e.into()));
                    return;
                }
            }
            BioCmd::Discard | BioCmd::WriteZeroes => self.free_range(bio.offset, bio.length),
            BioCmd::GetAllocation => {
                let extents = self.allocation(bio.offset, bio.length);
                let mut bio = bio;
                bio.extents = extents;
                io.deliver(bio, Ok(()));
                return;
            }
            BioCmd::Flush => {}
        }
        io.deliver(bio, Ok(()));
    }

    fn tasteable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use crate::class::parse_test;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// md behaves like a flat array under every op, discard,
        /// write-zeroes and racing flushes included.
        #[test]
        fn behaves_like_a_flat_array(ops in crate::testing::ops_all(1024, 64, 40)) {
            let mut s = Stack::new();
            MdGeom::create(&mut s, "md0", 1024 * 512).unwrap();
            let c = s.open("md0", crate::stack::Access::READ_WRITE).unwrap();
            crate::testing::run_model(&mut s, c, &ops, &[]);
        }
    }

    #[test]
    fn statements_parse() {
        assert_eq!(
            parse_test::cmd::<MdCreate>("md create -s 64k md0"),
            MdCreate {
                name: "md0".into(),
                size_bytes: 65536
            }
        );
        assert_eq!(parse_test::one("md destroy md0").class, "md");
        assert_eq!(parse_test::err("md frob md0").0, 4);
    }

    use super::*;
    use crate::bio::BioError;
    use crate::page::SgList;

    fn run_one(
        stack: &mut Stack,
        c: crate::bio::ConsumerId,
        bio: Bio,
    ) -> (Bio, crate::bio::BioResult) {
        stack.submit(c, bio, 7);
        stack.run();
        let (tag, bio, r) = stack.take_completed().expect("completion");
        assert_eq!(tag, 7);
        (bio, r)
    }

    fn write_bytes(offset: u64, data: &[u8]) -> Bio {
        let sg = SgList::from_bytes(data, &crate::page::DataCounters::new());
        Bio::with_data(BioCmd::Write, offset, sg)
    }

    fn read_bytes(
        stack: &mut Stack,
        c: crate::bio::ConsumerId,
        offset: u64,
        len: usize,
    ) -> Vec<u8> {
        let (bio, r) = run_one(stack, c, Bio::read(offset, len as u64));
        r.unwrap();
        let mut out = alloc::vec![0; len];
        bio.sg
            .copy_to_slice(0, &mut out, &crate::page::DataCounters::new())
            .unwrap();
        out
    }

    #[test]
    fn write_read_round_trip_across_pages() {
        let mut s = Stack::new();
        let p = MdGeom::create(&mut s, "md0", 1 << 20).unwrap();
        let c = s.open("md0", crate::stack::Access::READ_WRITE).unwrap();
        let data: Vec<u8> = (0..10_240).map(|i| (i * 7 % 256) as u8).collect();
        let (_, r) = run_one(&mut s, c, write_bytes(3584, &data));
        r.unwrap();
        assert_eq!(read_bytes(&mut s, c, 3584, data.len()), data);
        assert_eq!(read_bytes(&mut s, c, 0, 512), alloc::vec![0; 512]);
        let st = &s.provider(p).stats;
        assert_eq!(st.data.bytes_copied(), 2 * 10_240 + 512);
    }

    #[test]
    fn discard_frees_and_reads_zeroes() {
        let mut s = Stack::new();
        MdGeom::create(&mut s, "md0", 1 << 20).unwrap();
        let c = s.open("md0", crate::stack::Access::READ_WRITE).unwrap();
        run_one(&mut s, c, write_bytes(0, &[0xab; 16384]))
            .1
            .unwrap();
        run_one(&mut s, c, Bio::no_data(BioCmd::Discard, 4096, 8192))
            .1
            .unwrap();
        run_one(&mut s, c, Bio::no_data(BioCmd::WriteZeroes, 512, 512))
            .1
            .unwrap();
        let got = read_bytes(&mut s, c, 0, 16384);
        assert!(got[..512].iter().all(|&b| b == 0xab));
        assert!(got[512..1024].iter().all(|&b| b == 0));
        assert!(got[1024..4096].iter().all(|&b| b == 0xab));
        assert!(got[4096..12288].iter().all(|&b| b == 0));
        assert!(got[12288..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn allocation_reports_holes_and_no_hole_zeroing_keeps_pages() {
        let mut s = Stack::new();
        MdGeom::create(&mut s, "md0", 1 << 20).unwrap();
        let c = s.open("md0", crate::stack::Access::READ_WRITE).unwrap();
        run_one(&mut s, c, write_bytes(8192, &[1; 8192])).1.unwrap();
        let mut z = Bio::no_data(BioCmd::WriteZeroes, 32768, 4096);
        z.no_hole = true;
        run_one(&mut s, c, z).1.unwrap();
        run_one(&mut s, c, Bio::no_data(BioCmd::WriteZeroes, 12288, 4096))
            .1
            .unwrap();
        let (bio, r) = run_one(&mut s, c, Bio::no_data(BioCmd::GetAllocation, 4096, 40960));
        r.unwrap();
        let runs: Vec<(u64, bool)> = bio.extents.iter().map(|e| (e.length, e.hole)).collect();
        assert_eq!(
            runs,
            alloc::vec![
                (4096, true),
                (4096, false),
                (20480, true),
                (4096, false),
                (8192, true)
            ]
        );
        assert!(bio.extents.iter().all(|e| e.zero == e.hole));
        assert_eq!(read_bytes(&mut s, c, 32768, 4096), alloc::vec![0; 4096]);
    }

    #[test]
    fn central_check_refuses_bad_requests() {
        let mut s = Stack::new();
        MdGeom::create(&mut s, "md0", 1 << 20).unwrap();
        let ro = s.open("md0", crate::stack::Access::READ).unwrap();
        let rw = s.open("md0", crate::stack::Access::READ_WRITE).unwrap();
        assert_eq!(
            run_one(&mut s, ro, write_bytes(0, &[1; 512])).1,
            Err(BioError::Access)
        );
        assert_eq!(
            run_one(&mut s, rw, write_bytes(100, &[1; 512])).1,
            Err(BioError::Invalid)
        );
        assert_eq!(
            run_one(&mut s, rw, Bio::read(1 << 20, 512)).1,
            Err(BioError::OutOfRange)
        );
        assert_eq!(
            run_one(&mut s, rw, Bio::read(u64::MAX - 511, 512)).1,
            Err(BioError::OutOfRange)
        );
        assert_eq!(run_one(&mut s, rw, Bio::read(0, 0)).1, Ok(()));
    }

    #[test]
    fn create_refuses_more_than_the_data_memory_limit() {
        let mut s = Stack::new();
        s.set_data_memory_limit(Some(96 << 20));
        MdGeom::create(&mut s, "md0", 64 << 20).unwrap();
        let e = MdGeom::create(&mut s, "md1", 64 << 20).unwrap_err();
        let text = alloc::format!("{e}");
        assert!(
            text.contains("64 MiB is more than the memory left for memory disks (32 MiB of 96 MiB"),
            "{text}"
        );
        assert!(s.find_provider("md1").is_none(), "nothing was created");
        MdGeom::create(&mut s, "md1", 32 << 20).unwrap();
        assert_eq!(committed_bytes(&s), 96 << 20);
        // No limit known: any size the page table fits.
        let mut s = Stack::new();
        MdGeom::create(&mut s, "md0", 1 << 30).unwrap();
    }

    #[test]
    fn exclusive_open_keeps_writers_out() {
        let mut s = Stack::new();
        MdGeom::create(&mut s, "md0", 1 << 20).unwrap();
        let _e = s.open("md0", crate::stack::Access::EXCLUSIVE).unwrap();
        assert!(s.open("md0", crate::stack::Access::READ_WRITE).is_err());
        assert!(s.open("md0", crate::stack::Access::READ).is_ok());
    }
}
