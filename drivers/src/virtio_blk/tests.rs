//! Host tests of the virtio-blk driver: pure planning helpers, and the
//! whole driver against a fake device that reads the real virtqueues.

use super::*;
use crate::fake::{read_mem, write_mem, Chain, FakeTransport};
use crate::virtio::F_VERSION_1;
use geom::page::{Page, SgList, PAGE_SIZE};
use std::vec::Vec;

// ---- pure helpers ----

/// A device shape with 512-byte blocks.
fn shape(max_descs: usize, max_desc_bytes: u32) -> Shape {
    Shape {
        max_descs,
        max_desc_bytes,
        align: 512,
    }
}

/// Page ranges of the given (offset, length), and a lease on them (the
/// planner needs one for their addresses).
fn page_refs(lens: &[(u32, u32)]) -> (Vec<PageRef>, Lease) {
    let refs: Vec<PageRef> = lens
        .iter()
        .map(|&(offset, len)| PageRef {
            page: Page::new_zeroed(),
            offset,
            len,
        })
        .collect();
    let mut sg = SgList::new();
    for r in &refs {
        sg.push(r.clone());
    }
    let lease = sg.lend().unwrap();
    (refs, lease)
}

#[test]
fn header_and_segment_layout() {
    let h = request_header(T_OUT, 0x0102_0304_0506_0708);
    assert_eq!(&h[0..4], &[1, 0, 0, 0]);
    assert_eq!(&h[4..8], &[0; 4]);
    assert_eq!(&h[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
    let s = range_segment(9, 16, WZ_FLAG_UNMAP);
    assert_eq!(u64::from_le_bytes(s[0..8].try_into().unwrap()), 9);
    assert_eq!(u32::from_le_bytes(s[8..12].try_into().unwrap()), 16);
    assert_eq!(u32::from_le_bytes(s[12..16].try_into().unwrap()), 1);
}

#[test]
fn ring_descriptor_counts() {
    assert_eq!(ring_descs(true, 100), 1);
    assert_eq!(ring_descs(false, 4), 6);
    assert_eq!(ring_descs(false, 0), 2);
}

#[test]
fn chunk_takes_one_descriptor_per_page_range() {
    let (segs, lease) = page_refs(&[(0, 4096), (512, 1024), (0, 4096)]);
    let c = plan_data_chunk(
        &segs,
        &lease,
        Cursor::default(),
        9216,
        shape(126, u32::MAX),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(c.bytes, 9216);
    assert_eq!(c.descs.len(), 3);
    assert_eq!(c.descs[1], (segs[1].dma_addr(&lease), 1024));
    assert_eq!(c.next, Cursor { seg: 3, off: 0 });
}

#[test]
fn chunk_respects_seg_max_and_block_alignment() {
    // Ranges of 1000/3096 bytes: a cut after 3 ranges (1000+3096+1000)
    // is not on a 512-byte block and must be pulled back.
    let (segs, lease) = page_refs(&[(0, 1000), (1000, 3096), (0, 1000), (1000, 3096)]);
    let c = plan_data_chunk(
        &segs,
        &lease,
        Cursor::default(),
        8192,
        shape(3, u32::MAX),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(c.bytes, 4608);
    assert_eq!(c.descs.len(), 3);
    assert_eq!(c.descs[2].1, 512);
    assert_eq!(c.next, Cursor { seg: 2, off: 512 });
    let d = plan_data_chunk(
        &segs,
        &lease,
        c.next,
        8192 - c.bytes,
        shape(3, u32::MAX),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(d.bytes, 3584);
    assert_eq!(d.descs[0], (segs[2].dma_addr(&lease) + 512, 488));
    assert_eq!(d.next, Cursor { seg: 4, off: 0 });
}

#[test]
fn chunk_splits_ranges_above_size_max() {
    let (segs, lease) = page_refs(&[(0, 4096)]);
    let c = plan_data_chunk(
        &segs,
        &lease,
        Cursor::default(),
        4096,
        shape(126, 1024),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(c.descs.len(), 4);
    assert!(c.descs.iter().all(|d| d.1 == 1024));
    // Only two descriptors allowed: half the page now, half later.
    let c = plan_data_chunk(
        &segs,
        &lease,
        Cursor::default(),
        4096,
        shape(2, 1024),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(c.bytes, 2048);
    assert_eq!(c.next, Cursor { seg: 0, off: 2048 });
}

#[test]
fn chunk_fails_when_no_whole_block_fits() {
    let (segs, lease) = page_refs(&[(0, 100), (0, 100), (0, 312)]);
    assert_eq!(
        plan_data_chunk(
            &segs,
            &lease,
            Cursor::default(),
            512,
            shape(2, u32::MAX),
            Vec::new()
        ),
        None
    );
}

#[test]
fn range_chunks_honour_max_and_alignment() {
    assert_eq!(plan_range_chunk(0, 100, 1000, 1, 1), 100);
    assert_eq!(plan_range_chunk(0, 100, 30, 1, 1), 30);
    // Aligned to 16 sectors when the range goes on.
    assert_eq!(plan_range_chunk(3, 100, 30, 16, 1), 29);
    // Alignment that would leave nothing is ignored.
    assert_eq!(plan_range_chunk(3, 100, 10, 16, 1), 10);
    // Whole 4 KiB blocks (8 sectors).
    assert_eq!(plan_range_chunk(0, 100, 30, 1, 8), 24);
}

fn config_bytes(c: &BlkConfig) -> Vec<u8> {
    let mut b = std::vec![0u8; 60];
    b[0..8].copy_from_slice(&c.capacity_sectors.to_le_bytes());
    b[8..12].copy_from_slice(&c.size_max.to_le_bytes());
    b[12..16].copy_from_slice(&c.seg_max.to_le_bytes());
    b[20..24].copy_from_slice(&c.blk_size.to_le_bytes());
    b[36..40].copy_from_slice(&c.max_discard_sectors.to_le_bytes());
    b[40..44].copy_from_slice(&c.max_discard_seg.to_le_bytes());
    b[44..48].copy_from_slice(&c.discard_sector_alignment.to_le_bytes());
    b[48..52].copy_from_slice(&c.max_write_zeroes_sectors.to_le_bytes());
    b[52..56].copy_from_slice(&c.max_write_zeroes_seg.to_le_bytes());
    b[56] = c.write_zeroes_may_unmap as u8;
    b
}

fn qemu_like_config(sectors: u64) -> BlkConfig {
    BlkConfig {
        capacity_sectors: sectors,
        size_max: 0,
        seg_max: 126,
        blk_size: 512,
        max_discard_sectors: 0x3f_ffff,
        max_discard_seg: 1,
        discard_sector_alignment: 1,
        max_write_zeroes_sectors: 0x3f_ffff,
        max_write_zeroes_seg: 1,
        write_zeroes_may_unmap: true,
    }
}

#[test]
fn limits_from_qemu_like_device() {
    let all = WANTED_FEATURES & !F_RO;
    let (info, l) = BlkLimits::derive(all, &qemu_like_config(2048));
    assert_eq!(info.size_bytes, 1 << 20);
    assert_eq!(info.sector_size, 512);
    assert!(info.can_flush && info.can_discard && info.can_write_zeroes && !info.read_only);
    assert_eq!(l.max_data_descs, 126);
    assert_eq!(l.max_requests, QUEUE_SIZE);
    assert!(l.write_zeroes_unmap);
    let (info, l) = BlkLimits::derive(F_VERSION_1 | F_RO, &qemu_like_config(2048));
    assert!(!info.can_flush && !info.can_discard && !info.can_write_zeroes && info.read_only);
    assert_eq!(l.max_requests, QUEUE_SIZE / 3);
    assert!(l.max_requests >= 32);
    assert_eq!(l.max_data_descs, QUEUE_SIZE - 2);
}

#[test]
fn odd_block_sizes_fall_back_to_512() {
    let mut c = qemu_like_config(64);
    c.blk_size = 1000;
    let (info, _) = BlkLimits::derive(F_BLK_SIZE, &c);
    assert_eq!(info.sector_size, 512);
    c.blk_size = 4096;
    let (info, l) = BlkLimits::derive(F_BLK_SIZE | F_DISCARD, &c);
    assert_eq!(info.sector_size, 4096);
    assert_eq!(l.max_discard_sectors % 8, 0);
}

// ---- the driver against a fake device ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Op {
    kind: u32,
    sector: u64,
    bytes: u64,
    data_descs: usize,
    flags: u32,
}

struct Dev {
    t: FakeTransport,
    disk: Vec<u8>,
    pending: Vec<Chain>,
    ops: Vec<Op>,
    max_pending: usize,
    /// Sectors whose access fails with IOERR.
    bad: core::ops::Range<u64>,
}

impl Dev {
    fn new(features: u64, config: &BlkConfig) -> Dev {
        let t = FakeTransport::new(DeviceType::Block, features, config_bytes(config), 1);
        let disk = std::vec![0u8; (config.capacity_sectors * 512) as usize];
        Dev {
            t,
            disk,
            pending: Vec::new(),
            ops: Vec::new(),
            max_pending: 0,
            bad: 0..0,
        }
    }

    /// Takes new chains into the pending set.
    fn fetch(&mut self) {
        let chains = self.t.0.borrow_mut().queues[0].take_avail();
        self.pending.extend(chains);
        self.max_pending = self.max_pending.max(self.pending.len());
    }

    /// Executes and completes every pending chain, optionally newest first.
    fn complete(&mut self, reverse: bool) {
        self.fetch();
        let mut chains = core::mem::take(&mut self.pending);
        if reverse {
            chains.reverse();
        }
        for c in chains {
            let written = self.execute(&c);
            self.t.0.borrow_mut().queues[0].put_used(c.head, written);
        }
    }

    fn execute(&mut self, c: &Chain) -> u32 {
        let hdr = read_mem(c.readable[0].0, c.readable[0].1 as usize);
        assert_eq!(hdr.len(), 16);
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let (st_addr, st_len) = *c.writable.last().unwrap();
        assert_eq!(st_len, 1);
        let mut status = S_OK;
        let mut written = 1;
        let mut op = Op {
            kind,
            sector,
            bytes: 0,
            data_descs: 0,
            flags: 0,
        };
        let overlaps =
            |s: u64, n: u64, bad: &core::ops::Range<u64>| s < bad.end && bad.start < s + n;
        match kind {
            T_IN => {
                let data = &c.writable[..c.writable.len() - 1];
                let mut pos = (sector * 512) as usize;
                op.data_descs = data.len();
                for &(a, l) in data {
                    write_mem(a, &self.disk[pos..pos + l as usize]);
                    pos += l as usize;
                    op.bytes += u64::from(l);
                    written += l;
                }
                if overlaps(sector, op.bytes / 512, &self.bad) {
                    status = 1;
                }
            }
            T_OUT => {
                let data = &c.readable[1..];
                let mut pos = (sector * 512) as usize;
                op.data_descs = data.len();
                let mut total = 0u64;
                for &(_, l) in data {
                    total += u64::from(l);
                }
                if overlaps(sector, total / 512, &self.bad) {
                    status = 1;
                } else {
                    for &(a, l) in data {
                        let b = read_mem(a, l as usize);
                        self.disk[pos..pos + l as usize].copy_from_slice(&b);
                        pos += l as usize;
                    }
                }
                op.bytes = total;
            }
            T_FLUSH => {
                assert_eq!(c.readable.len(), 1);
            }
            T_DISCARD | T_WRITE_ZEROES => {
                assert_eq!(c.readable.len(), 2);
                let s = read_mem(c.readable[1].0, 16);
                let start = u64::from_le_bytes(s[0..8].try_into().unwrap());
                let n = u32::from_le_bytes(s[8..12].try_into().unwrap());
                op.flags = u32::from_le_bytes(s[12..16].try_into().unwrap());
                op.sector = start;
                op.bytes = u64::from(n) * 512;
                let (a, b) = (
                    (start * 512) as usize,
                    ((start + u64::from(n)) * 512) as usize,
                );
                self.disk[a..b].fill(0);
            }
            _ => status = S_UNSUPP,
        }
        write_mem(st_addr, &[status]);
        self.ops.push(op);
        written
    }
}

fn blk(features: u64, config: &BlkConfig) -> (Dev, VirtioBlk<FakeTransport>) {
    let dev = Dev::new(features, config);
    let drv = VirtioBlk::<FakeTransport>::new(dev.t.clone()).expect("init");
    (dev, drv)
}

fn poll_all(drv: &mut VirtioBlk<FakeTransport>) -> Vec<(Bio, BioResult)> {
    let mut out = Vec::new();
    drv.poll(&mut |b, r| out.push((b, r)));
    out
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_bio(offset: u64, data: &[u8]) -> Bio {
    let sg = SgList::alloc(data.len());
    sg.copy_from_slice(0, data, &geom::page::DataCounters::new())
        .expect("pages not lent");
    Bio::with_data(BioCmd::Write, offset, sg)
}

fn bio_bytes(b: &Bio) -> Vec<u8> {
    let mut v = std::vec![0u8; b.length as usize];
    b.sg.copy_to_slice(0, &mut v, &geom::page::DataCounters::new())
        .expect("pages not lent");
    v
}

const ALL: u64 = WANTED_FEATURES & !F_RO;

#[test]
fn init_negotiates_and_reports() {
    let (dev, drv) = blk(ALL | (1 << 29), &qemu_like_config(4096));
    let d = dev.t.0.borrow();
    assert_eq!(d.accepted, ALL, "event idx is not taken");
    assert!(d.status & DeviceStatus::DRIVER_OK.bits() != 0);
    assert_eq!(drv.info().size_bytes, 4096 * 512);
}

#[test]
fn rejected_features_fail_init() {
    let dev = Dev::new(ALL, &qemu_like_config(64));
    dev.t.0.borrow_mut().reject_features = true;
    assert_eq!(
        VirtioBlk::<FakeTransport>::new(dev.t.clone()).err(),
        Some(InitError::FeaturesRejected)
    );
}

#[test]
fn thirty_two_writes_in_flight_then_read_back() {
    for indirect in [true, false] {
        let feats = if indirect {
            ALL
        } else {
            ALL & !F_RING_INDIRECT_DESC
        };
        let (mut dev, mut drv) = blk(feats, &qemu_like_config(8192));
        let data = pattern(32 * 16384, 7);
        for i in 0..32 {
            let b = write_bio(i as u64 * 16384, &data[i * 16384..(i + 1) * 16384]);
            assert!(drv.submit(b).is_ok());
        }
        // Indirect: one ring slot per request. Direct: 6 descriptors per
        // request (header, 4 pages, status), so 128 / 6 fit at once.
        let depth = if indirect { 32 } else { QUEUE_SIZE / 6 };
        assert_eq!(drv.in_flight(), depth);
        dev.fetch();
        assert_eq!(dev.max_pending, depth);
        let mut done = Vec::new();
        while done.len() < 32 {
            dev.complete(true);
            done.extend(poll_all(&mut drv));
        }
        assert!(done.iter().all(|(_, r)| r.is_ok()));
        assert_eq!(&dev.disk[..data.len()], &data[..]);
        assert!(dev.ops.iter().all(|o| o.data_descs == 4));

        for i in 0..32 {
            assert!(drv.submit(Bio::read(i as u64 * 16384, 16384)).is_ok());
        }
        let mut done = Vec::new();
        while done.len() < 32 {
            dev.complete(false);
            done.extend(poll_all(&mut drv));
        }
        done.sort_by_key(|(b, _)| b.offset);
        for (i, (b, r)) in done.iter().enumerate() {
            assert!(r.is_ok());
            assert_eq!(bio_bytes(b), &data[i * 16384..(i + 1) * 16384]);
        }
        assert_eq!(drv.stats().max_in_flight as usize, depth);
    }
}

#[test]
fn full_queue_hands_the_bio_back() {
    let (mut dev, mut drv) = blk(ALL & !F_RING_INDIRECT_DESC, &qemu_like_config(8192));
    let max = drv.limits().max_requests;
    for i in 0..max {
        assert!(drv.submit(Bio::read(i as u64 * 4096, 4096)).is_ok());
    }
    let b = drv.submit(Bio::read(0, 4096)).expect_err("queue full");
    assert_eq!(b.offset, 0);
    dev.complete(false);
    assert_eq!(poll_all(&mut drv).len(), max);
    assert!(drv.submit(b).is_ok());
}

#[test]
fn big_bio_is_split_by_seg_max_and_completes_once() {
    let mut c = qemu_like_config(8192);
    c.seg_max = 4;
    let (mut dev, mut drv) = blk(ALL, &c);
    // 10 ranges of 2048 bytes in the middle of 10 separate pages.
    let base = SgList::alloc(10 * PAGE_SIZE);
    let data = pattern(20480, 3);
    let mut sg = SgList::new();
    for i in 0..10u64 {
        for r in base.slice(i * 4096 + 1024, 2048).iter() {
            sg.push(r.clone());
        }
    }
    assert_eq!(sg.len_bytes(), 20480);
    sg.copy_from_slice(0, &data, &geom::page::DataCounters::new())
        .expect("pages not lent");
    assert!(drv.submit(Bio::with_data(BioCmd::Write, 4096, sg)).is_ok());
    dev.complete(false);
    let done = poll_all(&mut drv);
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_ok());
    assert_eq!(&dev.disk[4096..4096 + 20480], &data[..]);
    assert_eq!(dev.ops.len(), 3);
    assert!(dev.ops.iter().all(|o| o.data_descs <= 4));
    assert_eq!(dev.ops[1].sector, 8 + 16);
    assert_eq!(drv.stats().split_bios, 1);
}

#[test]
fn unaligned_ranges_split_on_block_boundaries() {
    let mut c = qemu_like_config(8192);
    c.seg_max = 3;
    let (mut dev, mut drv) = blk(ALL, &c);
    let pages = SgList::alloc(4 * PAGE_SIZE);
    let mut sg = SgList::new();
    for (i, (o, l)) in [(0u64, 1000u64), (1000, 3096), (0, 1000), (1000, 3096)]
        .iter()
        .enumerate()
    {
        for r in pages.slice(i as u64 * 4096 + o, *l).iter() {
            sg.push(r.clone());
        }
    }
    let data = pattern(8192, 9);
    sg.copy_from_slice(0, &data, &geom::page::DataCounters::new())
        .expect("pages not lent");
    assert!(drv.submit(Bio::with_data(BioCmd::Write, 0, sg)).is_ok());
    dev.complete(false);
    assert!(poll_all(&mut drv)[0].1.is_ok());
    assert_eq!(&dev.disk[..8192], &data[..]);
    assert!(dev.ops.iter().all(|o| o.bytes % 512 == 0));
}

#[test]
fn flush_discard_and_write_zeroes() {
    let mut c = qemu_like_config(8192);
    c.max_discard_sectors = 8;
    c.max_write_zeroes_sectors = 16;
    let (mut dev, mut drv) = blk(ALL, &c);
    dev.disk.fill(0xaa);
    assert!(drv.submit(Bio::flush()).is_ok());
    assert!(drv
        .submit(Bio::no_data(BioCmd::Discard, 4096, 8192))
        .is_ok());
    assert!(drv
        .submit(Bio::no_data(BioCmd::WriteZeroes, 65536, 16384))
        .is_ok());
    dev.complete(false);
    let done = poll_all(&mut drv);
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|(_, r)| r.is_ok()));
    let kinds: Vec<u32> = dev.ops.iter().map(|o| o.kind).collect();
    assert_eq!(
        kinds,
        [
            T_FLUSH,
            T_DISCARD,
            T_DISCARD,
            T_WRITE_ZEROES,
            T_WRITE_ZEROES
        ]
    );
    assert_eq!(dev.ops[1].sector, 8);
    assert_eq!(dev.ops[2].sector, 16);
    assert_eq!(dev.ops[3].flags, WZ_FLAG_UNMAP);
    assert!(dev.disk[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(dev.disk[12288], 0xaa);
    assert!(dev.disk[65536..81920].iter().all(|&b| b == 0));
    assert_eq!(dev.disk[4095], 0xaa);
}

#[test]
fn commands_the_device_lacks() {
    let (mut dev, mut drv) = blk(F_VERSION_1 | F_RING_INDIRECT_DESC, &qemu_like_config(64));
    assert!(drv.submit(Bio::flush()).is_ok());
    assert!(drv.submit(Bio::no_data(BioCmd::Discard, 0, 512)).is_ok());
    assert!(drv
        .submit(Bio::no_data(BioCmd::WriteZeroes, 0, 512))
        .is_ok());
    dev.complete(false);
    let r: Vec<BioResult> = poll_all(&mut drv).into_iter().map(|(_, r)| r).collect();
    assert_eq!(
        r,
        [
            Ok(()),
            Err(BioError::NotSupported),
            Err(BioError::NotSupported)
        ]
    );
    assert!(dev.ops.is_empty(), "no request reaches the device");
}

#[test]
fn invalid_bios_fail_without_reaching_the_device() {
    let (mut dev, mut drv) = blk(ALL | F_RO, &qemu_like_config(64));
    assert!(drv.submit(Bio::read(100, 512)).is_ok());
    assert!(drv.submit(Bio::read(64 * 512, 512)).is_ok());
    assert!(drv.submit(write_bio(0, &[0; 512])).is_ok());
    dev.complete(false);
    let r: Vec<BioResult> = poll_all(&mut drv).into_iter().map(|(_, r)| r).collect();
    assert_eq!(
        r,
        [
            Err(BioError::Invalid),
            Err(BioError::OutOfRange),
            Err(BioError::Access)
        ]
    );
    assert!(dev.ops.is_empty());
}

#[test]
fn device_error_becomes_io_error() {
    let mut c = qemu_like_config(8192);
    c.seg_max = 2;
    let (mut dev, mut drv) = blk(ALL, &c);
    dev.bad = 20..21;
    // Split into 4 requests of 2 pages; the second one fails.
    assert!(drv.submit(write_bio(0, &pattern(8 * 4096, 1))).is_ok());
    assert!(drv.submit(Bio::read(65536, 4096)).is_ok());
    dev.complete(true);
    let mut done = poll_all(&mut drv);
    done.sort_by_key(|(b, _)| b.offset);
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].1, Err(BioError::Io));
    assert_eq!(done[1].1, Ok(()));
    assert_eq!(drv.stats().errors, 1);
}

#[test]
fn unknown_token_resets_the_device_and_fails_bios() {
    let (mut dev, mut drv) = blk(ALL, &qemu_like_config(64));
    assert!(drv.submit(Bio::read(0, 512)).is_ok());
    dev.fetch();
    // The device returns a chain it never got.
    dev.t.0.borrow_mut().queues[0].put_used(77, 0);
    let done = poll_all(&mut drv);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1, Err(BioError::Io));
    assert!(drv.is_broken());
    assert_eq!(dev.t.0.borrow().status, 0, "device was reset");
    assert!(drv.submit(Bio::read(0, 512)).is_ok());
    assert_eq!(poll_all(&mut drv)[0].1, Err(BioError::Io));
}

#[test]
fn ring_is_reused_many_times() {
    let (mut dev, mut drv) = blk(ALL & !F_RING_INDIRECT_DESC, &qemu_like_config(8192));
    for round in 0..100u64 {
        for i in 0..8 {
            let off = ((round * 8 + i) % 1000) * 4096;
            assert!(drv.submit(Bio::read(off, 8192)).is_ok());
        }
        dev.complete(round % 2 == 0);
        assert_eq!(poll_all(&mut drv).len(), 8);
    }
    assert_eq!(drv.in_flight(), 0);
}

/// A flag for [`VirtioBlk::set_config_flag`], as `probe_all` makes one.
fn leaked_flag() -> ConfigFlag {
    std::boxed::Box::leak(std::boxed::Box::new(core::sync::atomic::AtomicBool::new(
        false,
    )))
}

const NEEDS_RESET: u32 = 0x40;

#[test]
fn needs_reset_seen_through_the_config_flag_fails_bios_and_the_device() {
    let (mut dev, mut drv) = blk(ALL, &qemu_like_config(64));
    let flag = leaked_flag();
    drv.set_config_flag(flag);
    assert!(drv.submit(Bio::read(0, 512)).is_ok());
    assert!(drv.submit(write_bio(4096, &pattern(4096, 3))).is_ok());
    dev.fetch();
    assert!(poll_all(&mut drv).is_empty(), "nothing completed yet");
    assert_eq!(drv.failed(), None);
    // The device sets DEVICE_NEEDS_RESET and raises a config interrupt;
    // the loop's IrqAck sets the flag.
    dev.t.0.borrow_mut().status |= NEEDS_RESET;
    flag.store(true, core::sync::atomic::Ordering::Release);
    let done = poll_all(&mut drv);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|(_, r)| *r == Err(BioError::Io)));
    // The pages are free for the CPU again: the device was reset.
    for (b, _) in &done {
        bio_bytes(b);
    }
    assert_eq!(dev.t.0.borrow().status, 0, "device was reset");
    assert!(drv.is_broken());
    assert!(drv.failed().unwrap().contains("needs a reset"));
    // A late completion from the old ring changes nothing.
    assert!(drv.submit(Bio::read(0, 512)).is_ok());
    assert_eq!(poll_all(&mut drv)[0].1, Err(BioError::Io));
}

#[test]
fn needs_reset_seen_on_an_interrupt_fails_the_device() {
    let (mut dev, mut drv) = blk(ALL, &qemu_like_config(64));
    assert!(drv.submit(Bio::read(0, 512)).is_ok());
    dev.fetch();
    {
        let mut d = dev.t.0.borrow_mut();
        d.status |= NEEDS_RESET;
        d.isr = 2;
    }
    assert!(drv.ack_interrupt());
    let done = poll_all(&mut drv);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1, Err(BioError::Io));
    assert!(drv.failed().is_some());
}

#[test]
fn a_config_change_without_needs_reset_reports_the_new_capacity() {
    let (mut dev, mut drv) = blk(ALL, &qemu_like_config(64));
    let flag = leaked_flag();
    drv.set_config_flag(flag);
    dev.t.0.borrow_mut().config[0..8].copy_from_slice(&128u64.to_le_bytes());
    flag.store(true, core::sync::atomic::Ordering::Release);
    assert!(poll_all(&mut drv).is_empty());
    assert_eq!(drv.stats().config_changes, 1);
    assert_eq!(drv.stats().new_capacity_bytes, Some(128 * 512));
    assert_eq!(drv.failed(), None, "a bigger disk is not a failed one");
    // The device still works.
    assert!(drv.submit(Bio::read(0, 512)).is_ok());
    dev.complete(false);
    assert_eq!(poll_all(&mut drv)[0].1, Ok(()));
}

#[test]
fn abort_hands_back_every_bio_and_keeps_the_pages_until_the_device_returns_them() {
    let (mut dev, mut drv) = blk(ALL, &qemu_like_config(64));
    assert!(drv.submit(Bio::read(0, 512)).is_ok());
    assert!(drv.submit(write_bio(4096, &pattern(8192, 5))).is_ok());
    dev.fetch();
    let mut back = Vec::new();
    drv.abort(&mut |b, r| back.push((b, r)));
    assert_eq!(back.len(), 2);
    assert!(back.iter().all(|(_, r)| *r == Err(BioError::Io)));
    assert!(drv.failed().unwrap().contains("deadline"));
    assert!(
        dev.t.0.borrow().status != 0,
        "no reset: QEMU would wait for the hung backend"
    );
    // The device may still write into them: they stay lent.
    let c = geom::page::DataCounters::new();
    let mut buf = [0u8; 512];
    for (b, _) in &back {
        assert!(b.sg.copy_to_slice(0, &mut buf[..1], &c).is_err());
    }
    assert_eq!(drv.pending_bios(), 2, "the stand-ins hold the slots");
    // A late completion frees them, and nothing comes back twice.
    dev.complete(false);
    assert!(poll_all(&mut drv).is_empty());
    assert_eq!(drv.pending_bios(), 0);
    for (b, _) in &back {
        b.sg.copy_to_slice(0, &mut buf[..1], &c)
            .expect("pages free again");
    }
    // New bios fail at once.
    assert!(drv.submit(Bio::read(0, 512)).is_ok());
    assert_eq!(poll_all(&mut drv)[0].1, Err(BioError::Io));
}
