//! virtio-blk driver with scatter-gather and queue depth (virtio 1.2 §5.2).
//!
//! Built on virtio-drivers' `Transport` and `VirtQueue` rather than its
//! `VirtIOBlk`. Each virtio request is one descriptor chain (§5.2.6):
//!
//! ```text
//!   header (device-readable, 16 bytes: type, reserved, sector)
//!   data   one descriptor per page range of the bio: device-readable for
//!          writes, device-writable for reads; the bio's own pages, no copy
//!   or     one discard / write-zeroes segment (device-readable, 16 bytes)
//!   status (device-writable, 1 byte)
//! ```
//!
//! With VIRTIO_F_RING_INDIRECT_DESC a chain takes one ring slot, so up to
//! [`QUEUE_SIZE`] requests are in flight; without it each request takes
//! `2 + segments` descriptors and at most `QUEUE_SIZE / 3` are in flight.
//!
//! A bio that has more page ranges than the device accepts in one request
//! (SEG_MAX, SIZE_MAX, or the queue size) is split into several requests
//! at logical-block boundaries, issued in order, and completed once when
//! all parts are done (the first error wins). Discard and write-zeroes are
//! split the same way by `max_discard_sectors` / `max_write_zeroes_sectors`.
//!
//! FUA: virtio-blk has no FUA bit; the geom disk class turns a FUA write
//! into write + FLUSH (see `geom::disk`), so this driver ignores `bio.fua`.
//! FLUSH on a device that did not offer VIRTIO_BLK_F_FLUSH completes at
//! once: such a device has no volatile cache to flush.
//!
//! Interrupts: the driver never reads the ISR by itself (that is an exit
//! per poll). After each wake-up the event loop acknowledges the device,
//! with [`VirtioBlk::ack_interrupt`] or the `IrqAck` handle `probe_all`
//! returns (usable once the driver is boxed inside its geom), then polls.
//!
//! VIRTIO_F_EVENT_IDX is not negotiated: virtio-drivers 0.13 compares the
//! avail event index without wrap-around (`VirtQueue::should_notify`), which
//! would lose notifications after 65536 requests; the used-ring flag is
//! enough for a polled driver.
//!
//! Completion is polled: `peek_used` gives the head token of the next used
//! chain, which maps to a request slot and its bio. A non-OK status becomes
//! `BioError::Io` (or `NotSupported` for UNSUPP); a device that returns a
//! token it was never given is reset and all its bios fail with `Io`.
//!
//! Configuration changes (§5.2.2, §2.1.1): whoever reads the ISR records
//! a configuration-change interrupt in the driver's [`ConfigFlag`] (the
//! `IrqAck` handle does it for the driver inside its geom), and the next
//! poll reads the device status. DEVICE_NEEDS_RESET resets the device,
//! fails every bio it held with `Io` and reports the device failed
//! ([`BlockDevice::failed`]), so the disk geom orphans it; a new capacity
//! is reported in the log and [`BlkStats`] (the provider keeps its size).
//!
//! When the disk geom gives up on the device (a bio past its deadline,
//! [`BlockDevice::abort`]), every bio goes back up with `Io` at once, but
//! the device is not reset: QEMU's virtio-blk reset waits for the
//! backend's requests to finish, so resetting a device whose backend hangs
//! hangs the guest. A bio whose requests are still at the device leaves a
//! stand-in behind that shares its pages and keeps them lent, so no one
//! maps, reuses or frees them while the device may still write into them;
//! when the device returns the last chain of it (or is reset because it
//! asked to be), the pages come free. The rule is in docs/architecture.md,
//! "Disks that hang".

use crate::hal::IdentityHal;
use crate::virtio::{self, InitError, F_RING_INDIRECT_DESC, F_VERSION_1};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use core::sync::atomic::{AtomicBool, Ordering};
use geom::bio::{Bio, BioCmd, BioError, BioResult};
use geom::disk::{BlockDevice, DiskInfo};
use geom::page::{Lease, PageRef};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::Hal;

/// Descriptors in the request queue (queue 0).
pub const QUEUE_SIZE: usize = 128;
const QUEUE_IDX: u16 = 0;
/// Sector unit of virtio-blk headers and segments, whatever the block size.
const SECTOR: u64 = 512;

/// VIRTIO_BLK_F_SIZE_MAX: `size_max` bounds one data segment.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// VIRTIO_BLK_F_SEG_MAX: `seg_max` bounds data segments per request.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO: the device is read-only.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE: `blk_size` is the logical block size.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH: the device has a cache and takes FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_DISCARD: the device takes DISCARD.
pub const F_DISCARD: u64 = 1 << 13;
/// VIRTIO_BLK_F_WRITE_ZEROES: the device takes WRITE_ZEROES.
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Features this driver asks for (virtio 1.2 §5.2.3).
pub const WANTED_FEATURES: u64 = F_SIZE_MAX
    | F_SEG_MAX
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH
    | F_DISCARD
    | F_WRITE_ZEROES
    | F_RING_INDIRECT_DESC
    | F_VERSION_1;

/// Request types (virtio 1.2 §5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// Status values (virtio 1.2 §5.2.6).
const S_OK: u8 = 0;
const S_UNSUPP: u8 = 2;
/// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP (virtio 1.2 §5.2.6).
const WZ_FLAG_UNMAP: u32 = 1;

/// Config space offsets (virtio 1.2 §5.2.4, `struct virtio_blk_config`).
mod cfg {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// The virtio-blk config fields this driver uses (virtio 1.2 §5.2.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Largest data segment in bytes (valid with SIZE_MAX).
    pub size_max: u32,
    /// Most data segments per request (valid with SEG_MAX).
    pub seg_max: u32,
    /// Logical block size in bytes (valid with BLK_SIZE).
    pub blk_size: u32,
    /// Largest discard segment in sectors (valid with DISCARD).
    pub max_discard_sectors: u32,
    /// Most discard segments per request (valid with DISCARD).
    pub max_discard_seg: u32,
    /// Discard split alignment in sectors (valid with DISCARD).
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes segment in sectors (valid with WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request (valid with WRITE_ZEROES).
    pub max_write_zeroes_seg: u32,
    /// The device may unmap on write-zeroes (valid with WRITE_ZEROES).
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// Reads the config space; fields past the end of the space read as 0.
    pub fn read<T: Transport>(t: &T) -> Result<BlkConfig, InitError> {
        t.read_consistent(|| {
            // Capacity is a le64 but config space is only 4-byte aligned.
            let lo = t.read_config_space::<u32>(cfg::CAPACITY)?;
            let hi = t.read_config_space::<u32>(cfg::CAPACITY + 4)?;
            let u32_at = |o| virtio::config_u32(t, o).unwrap_or(0);
            Ok(BlkConfig {
                capacity_sectors: u64::from(lo) | (u64::from(hi) << 32),
                size_max: u32_at(cfg::SIZE_MAX),
                seg_max: u32_at(cfg::SEG_MAX),
                blk_size: u32_at(cfg::BLK_SIZE),
                max_discard_sectors: u32_at(cfg::MAX_DISCARD_SECTORS),
                max_discard_seg: u32_at(cfg::MAX_DISCARD_SEG),
                discard_sector_alignment: u32_at(cfg::DISCARD_SECTOR_ALIGNMENT),
                max_write_zeroes_sectors: u32_at(cfg::MAX_WRITE_ZEROES_SECTORS),
                max_write_zeroes_seg: u32_at(cfg::MAX_WRITE_ZEROES_SEG),
                write_zeroes_may_unmap: virtio::config_u8(t, cfg::WRITE_ZEROES_MAY_UNMAP)
                    .unwrap_or(0)
                    != 0,
            })
        })
        .map_err(InitError::Config)
    }
}

/// How requests must be shaped for one device, derived from its features
/// and config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkLimits {
    /// Logical block size in bytes: offsets, lengths and split points are
    /// multiples of it.
    pub sector_size: u32,
    /// Most data descriptors in one request.
    pub max_data_descs: usize,
    /// Largest single data descriptor in bytes.
    pub max_desc_bytes: u32,
    /// Largest discard request in 512-byte sectors (0: no discard).
    pub max_discard_sectors: u32,
    /// Discard split alignment in 512-byte sectors (1: none).
    pub discard_align_sectors: u32,
    /// Largest write-zeroes request in 512-byte sectors (0: none).
    pub max_write_zeroes_sectors: u32,
    /// Set VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP on write-zeroes.
    pub write_zeroes_unmap: bool,
    /// Indirect descriptor tables are in use.
    pub indirect: bool,
    /// Most requests in flight at once.
    pub max_requests: usize,
}

impl BlkLimits {
    /// Derives the limits and the disk description from negotiated
    /// features and config (virtio 1.2 §5.2.5, §5.2.6.2).
    pub fn derive(features: u64, c: &BlkConfig) -> (DiskInfo, BlkLimits) {
        let has = |f: u64| features & f != 0;
        let indirect = has(F_RING_INDIRECT_DESC);
        let sector_size = if has(F_BLK_SIZE)
            && c.blk_size.is_power_of_two()
            && (512..=65536).contains(&c.blk_size)
        {
            c.blk_size
        } else {
            512
        };
        // A chain may not be longer than the queue (virtio 1.2 §2.7.5.3.1),
        // and needs room for the header and the status byte.
        let mut max_data_descs = QUEUE_SIZE - 2;
        if has(F_SEG_MAX) && c.seg_max > 0 {
            max_data_descs = max_data_descs.min(c.seg_max as usize);
        }
        let max_desc_bytes = if has(F_SIZE_MAX) && c.size_max >= 512 {
            c.size_max
        } else {
            u32::MAX
        };
        let can_discard = has(F_DISCARD) && c.max_discard_seg > 0;
        let can_wz = has(F_WRITE_ZEROES) && c.max_write_zeroes_seg > 0;
        let lbs = sector_size / 512;
        let clamp = |n: u32| -> u32 {
            // 0 means "no limit given"; keep within u32 and whole blocks.
            let n = if n == 0 { u32::MAX } else { n };
            let n = n - n % lbs;
            if n == 0 {
                lbs
            } else {
                n
            }
        };
        let limits = BlkLimits {
            sector_size,
            max_data_descs,
            max_desc_bytes,
            max_discard_sectors: if can_discard {
                clamp(c.max_discard_sectors)
            } else {
                0
            },
            discard_align_sectors: c.discard_sector_alignment.max(1),
            max_write_zeroes_sectors: if can_wz {
                clamp(c.max_write_zeroes_sectors)
            } else {
                0
            },
            write_zeroes_unmap: can_wz && c.write_zeroes_may_unmap && can_discard,
            indirect,
            max_requests: if indirect { QUEUE_SIZE } else { QUEUE_SIZE / 3 },
        };
        let info = DiskInfo {
            size_bytes: c.capacity_sectors.saturating_mul(SECTOR),
            sector_size,
            can_flush: has(F_FLUSH),
            can_discard,
            can_write_zeroes: can_wz,
            read_only: has(F_RO),
        };
        (info, limits)
    }
}

/// A position inside a scatter-gather list: page range index and byte
/// offset within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Index of the page range.
    pub seg: usize,
    /// Byte offset within that range.
    pub off: u32,
}

/// The data descriptors of one request, as planned by [`plan_data_chunk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataChunk {
    /// (address, length) of each data descriptor.
    pub descs: Vec<(usize, u32)>,
    /// Total bytes.
    pub bytes: u64,
    /// Where the next chunk starts.
    pub next: Cursor,
}

/// How a device wants a request's data cut (from its [`BlkLimits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Most data descriptors in one request.
    pub max_descs: usize,
    /// Most bytes in one descriptor.
    pub max_desc_bytes: u32,
    /// The logical block size: a request that does not reach the end is
    /// cut back to a multiple of it.
    pub align: u32,
}

/// Plans the data descriptors of the next request of a read or write,
/// into `descs` (cleared first; its room is reused).
///
/// Takes page ranges from `start` until `max_descs` descriptors are used
/// or `remaining` bytes are covered, cutting ranges longer than
/// `max_desc_bytes`. A chunk that does not reach the end is cut back to a
/// multiple of `align` bytes (the logical block size) so every request
/// starts on a block. Returns `None` when no whole block fits. `lease`
/// proves the pages are lent to the device (it gives their addresses).
pub fn plan_data_chunk(
    segs: &[PageRef],
    lease: &Lease,
    start: Cursor,
    remaining: u64,
    shape: Shape,
    mut descs: Vec<(usize, u32)>,
) -> Option<DataChunk> {
    let Shape {
        max_descs,
        max_desc_bytes,
        align,
    } = shape;
    descs.clear();
    let mut bytes = 0u64;
    let mut cur = start;
    while descs.len() < max_descs && bytes < remaining && cur.seg < segs.len() {
        let r = &segs[cur.seg];
        let left_in_seg = r.len.saturating_sub(cur.off);
        if left_in_seg == 0 {
            cur = Cursor {
                seg: cur.seg + 1,
                off: 0,
            };
            continue;
        }
        let take = u64::from(left_in_seg.min(max_desc_bytes)).min(remaining - bytes) as u32;
        descs.push((r.dma_addr(lease) + cur.off as usize, take));
        bytes += u64::from(take);
        cur.off += take;
        if cur.off == r.len {
            cur = Cursor {
                seg: cur.seg + 1,
                off: 0,
            };
        }
    }
    if bytes < remaining {
        // Not the last chunk: give back the partial block at the end.
        let mut excess = bytes % u64::from(align);
        bytes -= excess;
        while excess > 0 {
            let last = descs.last_mut()?;
            let cut = u64::from(last.1).min(excess) as u32;
            last.1 -= cut;
            if last.1 == 0 {
                descs.pop();
            }
            excess -= u64::from(cut);
            // Move the cursor back by `cut` bytes.
            let mut back = cut;
            while back > 0 {
                if cur.off == 0 {
                    cur.seg -= 1;
                    cur.off = segs[cur.seg].len;
                    continue;
                }
                let step = back.min(cur.off);
                cur.off -= step;
                back -= step;
            }
        }
    }
    if bytes == 0 {
        return None;
    }
    Some(DataChunk {
        descs,
        bytes,
        next: cur,
    })
}

/// Sectors for the next discard or write-zeroes request: at most `max`,
/// and, when the range goes on, ending on a multiple of `align` (in
/// sectors, from `discard_sector_alignment`) and of `lbs` (sectors per
/// logical block) where that leaves something.
pub fn plan_range_chunk(start: u64, remaining: u64, max: u32, align: u32, lbs: u32) -> u64 {
    let mut n = remaining.min(u64::from(max));
    if n < remaining {
        for a in [u64::from(align), u64::from(lbs)] {
            if a > 1 {
                let end = start + n;
                let aligned = end - end % a;
                if aligned > start {
                    n = aligned - start;
                }
            }
        }
    }
    n
}

/// Bytes of a virtio-blk request header (virtio 1.2 §5.2.6).
pub fn request_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Bytes of a discard / write-zeroes segment (virtio 1.2 §5.2.6,
/// `struct virtio_blk_discard_write_zeroes`).
pub fn range_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// Descriptors a request takes in the ring: with indirect tables one,
/// otherwise header + payload + status.
pub fn ring_descs(indirect: bool, payload_descs: usize) -> usize {
    if indirect {
        1
    } else {
        2 + payload_descs
    }
}

/// Memory the device reads the header and segment from and writes the
/// status into; one per request slot, at a fixed address.
#[repr(C, align(64))]
struct ReqMem {
    hdr: [u8; 16],
    seg: [u8; 16],
    status: [u8; 1],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqKind {
    /// Read (device writes data) or write (device reads data).
    Data { write: bool },
    /// Header + status only.
    Flush,
    /// Header + segment + status.
    Range,
}

struct Req {
    bio_slot: u16,
    kind: ReqKind,
    data: Vec<(usize, u32)>,
}

struct BioSlot {
    bio: Bio,
    /// Bytes (read/write) or sectors (discard/write-zeroes) issued so far.
    issued: u64,
    cursor: Cursor,
    outstanding: u32,
    /// Requests issued for this bio.
    requests: u32,
    error: Option<BioError>,
    /// Still in the issue queue (not everything issued yet).
    queued: bool,
    /// The bio's pages, lent to the device until the bio is handed back.
    lease: Lease,
    /// The bio itself went back up (the disk gave up on the device, which
    /// was not reset); `bio` is a stand-in that shares its pages and keeps
    /// them lent until the device returns every chain of it.
    quarantined: bool,
}

/// Counters of one virtio-blk device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Bios accepted by `submit`.
    pub bios: u64,
    /// Virtio requests issued.
    pub requests: u64,
    /// Bios that needed more than one request.
    pub split_bios: u64,
    /// Requests that completed with a non-OK status.
    pub errors: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u32,
    /// Configuration-change interrupts seen.
    pub config_changes: u64,
    /// The capacity in bytes the device last reported, when it differs
    /// from the one it started with.
    pub new_capacity_bytes: Option<u64>,
}

/// Set by whoever reads the device's ISR when it shows a configuration
/// change; the driver looks at the device status on its next poll. One
/// per device, for the device's lifetime.
pub type ConfigFlag = &'static AtomicBool;

/// What happened when the issue loop looked at the head bio.
enum Step {
    /// Something was queued to the device.
    Issued,
    /// The head bio needs no more requests.
    Done,
    /// Out of request slots or descriptors.
    Blocked,
}

/// A virtio-blk device driven by polling; implements [`BlockDevice`].
pub struct VirtioBlk<T: Transport, H: Hal = IdentityHal> {
    transport: T,
    queue: VirtQueue<H, QUEUE_SIZE>,
    features: u64,
    info: DiskInfo,
    limits: BlkLimits,
    reqs: Vec<Option<Req>>,
    mem: Box<[ReqMem]>,
    free_reqs: Vec<u16>,
    /// Request slot of each in-flight chain, by head descriptor (token).
    by_token: Vec<u16>,
    /// Descriptor lists of finished requests, kept for the next ones (one
    /// per request slot, sized for the device's limit).
    spare_descs: Vec<Vec<(usize, u32)>>,
    bios: Vec<Option<BioSlot>>,
    free_bios: Vec<u16>,
    issue_q: VecDeque<u16>,
    done: VecDeque<(Bio, BioResult)>,
    in_flight: u32,
    broken: bool,
    /// Bios given up on whose pages the device still holds.
    quarantined: u32,
    /// Why the device was reset, if it was.
    failure: Option<&'static str>,
    config_flag: Option<ConfigFlag>,
    stats: BlkStats,
}

const NO_REQ: u16 = u16::MAX;

impl<T: Transport, H: Hal> VirtioBlk<T, H> {
    /// Initialises the device (virtio 1.2 §3.1.1, §5.2.5) and its queue.
    pub fn new(mut transport: T) -> Result<Self, InitError> {
        if transport.device_type() != DeviceType::Block {
            return Err(InitError::WrongDeviceType);
        }
        let features = virtio::negotiate(&mut transport, WANTED_FEATURES)?;
        let config = BlkConfig::read(&transport)?;
        let (info, limits) = BlkLimits::derive(features, &config);
        let queue =
            VirtQueue::<H, QUEUE_SIZE>::new(&mut transport, QUEUE_IDX, limits.indirect, false)
                .map_err(InitError::Queue)?;
        transport.finish_init();
        log::info!(
            "virtio-blk: {} bytes, block {}, features {:#x}, {} data segs/request, {} requests in flight",
            info.size_bytes,
            info.sector_size,
            features,
            limits.max_data_descs,
            limits.max_requests
        );
        let n = limits.max_requests;
        let descs = limits.max_data_descs;
        let mem: Box<[ReqMem]> = (0..n)
            .map(|_| ReqMem {
                hdr: [0; 16],
                seg: [0; 16],
                status: [0xff],
            })
            .collect();
        Ok(VirtioBlk {
            transport,
            queue,
            features,
            info,
            limits,
            reqs: (0..n).map(|_| None).collect(),
            mem,
            free_reqs: (0..n as u16).rev().collect(),
            by_token: vec![NO_REQ; QUEUE_SIZE],
            spare_descs: (0..n).map(|_| Vec::with_capacity(descs)).collect(),
            bios: (0..n).map(|_| None).collect(),
            free_bios: (0..n as u16).rev().collect(),
            issue_q: VecDeque::new(),
            done: VecDeque::new(),
            in_flight: 0,
            broken: false,
            quarantined: 0,
            failure: None,
            config_flag: None,
            stats: BlkStats::default(),
        })
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// How requests are shaped for this device.
    pub fn limits(&self) -> &BlkLimits {
        &self.limits
    }

    /// Counters since start.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// Virtio requests now at the device.
    pub fn in_flight(&self) -> usize {
        self.in_flight as usize
    }

    /// Bios accepted and not yet handed back by `poll`.
    pub fn pending_bios(&self) -> usize {
        self.bios.len() - self.free_bios.len() + self.done.len()
    }

    /// True once the device misbehaved and was reset; every bio now fails.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Acknowledges an interrupt by reading the ISR (virtio 1.2 §4.1.4.5),
    /// which also deasserts INTx. Returns true when the device had raised
    /// one. A configuration-change interrupt is handled at once (see
    /// [`VirtioBlk::config_changed`]).
    pub fn ack_interrupt(&mut self) -> bool {
        let isr = self.transport.ack_interrupt();
        if isr.contains(InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT) {
            self.config_changed();
        }
        !isr.is_empty()
    }

    /// Gives the driver the flag that its `IrqAck` sets on a
    /// configuration-change interrupt; each poll checks it.
    pub fn set_config_flag(&mut self, flag: ConfigFlag) {
        self.config_flag = Some(flag);
    }

    /// The device signalled a configuration change: DEVICE_NEEDS_RESET
    /// (§2.1.1) fails the device; otherwise a new capacity is reported.
    pub fn config_changed(&mut self) {
        self.stats.config_changes += 1;
        if self.broken {
            return;
        }
        if self
            .transport
            .get_status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
        {
            log::error!("virtio-blk: device needs reset; failing its I/O");
            self.fail_device("the device needs a reset (DEVICE_NEEDS_RESET)");
            return;
        }
        match BlkConfig::read(&self.transport) {
            Ok(c) => {
                let bytes = c.capacity_sectors.saturating_mul(SECTOR);
                if bytes != self.info.size_bytes {
                    log::warn!(
                        "virtio-blk: capacity changed from {} to {bytes} bytes; the disk keeps its size until it is attached anew",
                        self.info.size_bytes
                    );
                    self.stats.new_capacity_bytes = Some(bytes);
                } else {
                    self.stats.new_capacity_bytes = None;
                }
            }
            Err(e) => log::warn!("virtio-blk: config change, config unreadable: {e:?}"),
        }
    }

    /// Why the device was reset, if it was.
    pub fn failure(&self) -> Option<&'static str> {
        self.failure
    }

    /// Mutable access to the transport (for platform code).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    fn check(&self, bio: &Bio) -> Result<(), BioError> {
        if self.broken {
            return Err(BioError::Io);
        }
        match bio.cmd {
            BioCmd::Flush => return Ok(()),
            BioCmd::Read | BioCmd::Write => {
                if bio.sg.len_bytes() != bio.length {
                    return Err(BioError::Invalid);
                }
            }
            BioCmd::Discard if !self.info.can_discard => return Err(BioError::NotSupported),
            BioCmd::WriteZeroes if !self.info.can_write_zeroes => {
                return Err(BioError::NotSupported)
            }
            BioCmd::Discard | BioCmd::WriteZeroes => {}
            // Answered by the disk geom (virtio-blk has no such request).
            BioCmd::GetAllocation => return Err(BioError::NotSupported),
        }
        if bio.cmd.is_write() && self.info.read_only {
            return Err(BioError::Access);
        }
        let ss = u64::from(self.info.sector_size);
        if bio.length == 0 || !bio.offset.is_multiple_of(ss) || !bio.length.is_multiple_of(ss) {
            return Err(BioError::Invalid);
        }
        match bio.offset.checked_add(bio.length) {
            Some(end) if end <= self.info.size_bytes => Ok(()),
            _ => Err(BioError::OutOfRange),
        }
    }

    /// Issues as many requests as slots and descriptors allow, in bio
    /// order, then notifies the device once.
    fn pump(&mut self) {
        let mut issued = false;
        while let Some(&slot) = self.issue_q.front() {
            match self.step(slot) {
                Step::Issued => issued = true,
                Step::Done => {
                    self.issue_q.pop_front();
                    if let Some(b) = self.bios[slot as usize].as_mut() {
                        b.queued = false;
                    }
                    self.maybe_finish(slot);
                }
                Step::Blocked => break,
            }
        }
        if issued && self.queue.should_notify() {
            self.transport.notify(QUEUE_IDX);
        }
    }

    /// Issues the next request of the bio in `slot`, if it needs one.
    fn step(&mut self, slot: u16) -> Step {
        let limits = &self.limits;
        let Some(b) = self.bios[slot as usize].as_ref() else {
            return Step::Done;
        };
        if b.error.is_some() {
            return Step::Done;
        }
        let avail = self.queue.available_desc();
        let Some(&ridx) = self.free_reqs.last() else {
            return Step::Blocked;
        };
        let sector0 = b.bio.offset / SECTOR;
        let (kind, hdr, seg, data, advance, next_cursor) = match b.bio.cmd {
            BioCmd::Read | BioCmd::Write => {
                if b.issued >= b.bio.length {
                    return Step::Done;
                }
                let segs = b.bio.sg.iter().as_slice();
                let scratch = self.spare_descs.pop().unwrap_or_default();
                let Some(chunk) = plan_data_chunk(
                    segs,
                    &b.lease,
                    b.cursor,
                    b.bio.length - b.issued,
                    Shape {
                        max_descs: limits.max_data_descs,
                        max_desc_bytes: limits.max_desc_bytes,
                        align: limits.sector_size,
                    },
                    scratch,
                ) else {
                    // A block cannot be described within the limits: the
                    // device's limits are smaller than one block.
                    let b = self.bios[slot as usize].as_mut().expect("bio slot");
                    b.error = Some(BioError::Invalid);
                    return Step::Done;
                };
                if avail < ring_descs(limits.indirect, chunk.descs.len()) {
                    return Step::Blocked;
                }
                let write = b.bio.cmd == BioCmd::Write;
                let t = if write { T_OUT } else { T_IN };
                let hdr = request_header(t, sector0 + b.issued / SECTOR);
                (
                    ReqKind::Data { write },
                    hdr,
                    None,
                    chunk.descs,
                    chunk.bytes,
                    chunk.next,
                )
            }
            // Refused by `check` before it gets here.
            BioCmd::GetAllocation => return Step::Done,
            BioCmd::Flush => {
                if b.issued > 0 {
                    return Step::Done;
                }
                if !self.info.can_flush {
                    // No volatile cache: nothing to make stable.
                    return Step::Done;
                }
                if avail < ring_descs(limits.indirect, 0) {
                    return Step::Blocked;
                }
                (
                    ReqKind::Flush,
                    request_header(T_FLUSH, 0),
                    None,
                    Vec::new(),
                    1,
                    b.cursor,
                )
            }
            BioCmd::Discard | BioCmd::WriteZeroes => {
                let total = b.bio.length / SECTOR;
                if b.issued >= total {
                    return Step::Done;
                }
                if avail < ring_descs(limits.indirect, 1) {
                    return Step::Blocked;
                }
                let discard = b.bio.cmd == BioCmd::Discard;
                let (t, max, align, flags) = if discard {
                    (
                        T_DISCARD,
                        limits.max_discard_sectors,
                        limits.discard_align_sectors,
                        0,
                    )
                } else {
                    // A zeroing that must stay allocated never unmaps.
                    let f = if limits.write_zeroes_unmap && !b.bio.no_hole {
                        WZ_FLAG_UNMAP
                    } else {
                        0
                    };
                    (T_WRITE_ZEROES, limits.max_write_zeroes_sectors, 1, f)
                };
                let start = sector0 + b.issued;
                let n = plan_range_chunk(
                    start,
                    total - b.issued,
                    max,
                    align,
                    limits.sector_size / 512,
                );
                (
                    ReqKind::Range,
                    request_header(t, 0),
                    Some(range_segment(start, n as u32, flags)),
                    Vec::new(),
                    n,
                    b.cursor,
                )
            }
        };

        let m = &mut self.mem[ridx as usize];
        m.hdr = hdr;
        if let Some(s) = seg {
            m.seg = s;
        }
        m.status = [0xff];
        let req = Req {
            bio_slot: slot,
            kind,
            data,
        };
        // SAFETY: the header, segment and status live in `self.mem`, which
        // is never moved or freed while the device is set up, and this slot
        // is not touched again until its token is popped; the data
        // addresses are the bio's pages, which the bio (kept in
        // `self.bios`) holds until completion, and which are lent to this
        // device (`BioSlot::lease`), so nothing can map them meanwhile.
        let token = unsafe { self.add_chain(ridx, &req) };
        let token = match token {
            Ok(t) => t,
            Err(e) => {
                // Our descriptor accounting said it would fit. With
                // requests in flight, retry after the next completion;
                // with none, nothing will change: fail the bio.
                log::warn!("virtio-blk: queue add failed: {e:?}");
                if self.in_flight > 0 {
                    return Step::Blocked;
                }
                if let Some(b) = self.bios[slot as usize].as_mut() {
                    b.error = Some(BioError::Io);
                }
                return Step::Done;
            }
        };
        self.free_reqs.pop();
        self.by_token[token as usize] = ridx;
        self.reqs[ridx as usize] = Some(req);
        self.in_flight += 1;
        self.stats.requests += 1;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.in_flight);
        let b = self.bios[slot as usize].as_mut().expect("bio slot");
        b.requests += 1;
        if b.requests == 2 {
            self.stats.split_bios += 1;
        }
        b.issued += advance;
        b.cursor = next_cursor;
        b.outstanding += 1;
        Step::Issued
    }

    /// Adds the chain for request slot `ridx` to the queue.
    ///
    /// # Safety
    ///
    /// The memory behind `req.data` and slot `ridx` of `self.mem` must stay
    /// valid and untouched until the chain is popped.
    unsafe fn add_chain(&mut self, ridx: u16, req: &Req) -> virtio_drivers::Result<u16> {
        let m: *mut ReqMem = &mut self.mem[ridx as usize];
        // SAFETY: `m` is a live slot of `self.mem`; the caller vouches for
        // the data ranges.
        let (inputs, mut outputs) = unsafe { chain_buffers(m, req) };
        // SAFETY: forwarded from the caller.
        unsafe { self.queue.add(&inputs, &mut outputs) }
    }

    /// Pops the chain with head `token` (request slot `ridx`).
    ///
    /// # Safety
    ///
    /// `token` must be the head of the next used chain and belong to `req`.
    unsafe fn pop_chain(
        &mut self,
        token: u16,
        ridx: u16,
        req: &Req,
    ) -> virtio_drivers::Result<u32> {
        let m: *mut ReqMem = &mut self.mem[ridx as usize];
        // SAFETY: the same buffers as were added; the device is done.
        let (inputs, mut outputs) = unsafe { chain_buffers(m, req) };
        // SAFETY: the buffers are exactly those passed to `add` for `token`.
        unsafe { self.queue.pop_used(token, &inputs, &mut outputs) }
    }

    /// Takes every used chain off the ring and credits its bio.
    fn reap(&mut self) {
        while let Some(token) = self.queue.peek_used() {
            let ridx = self.by_token.get(token as usize).copied().unwrap_or(NO_REQ);
            let Some(req) = self.reqs.get_mut(ridx as usize).and_then(Option::take) else {
                log::error!("virtio-blk: device returned unknown chain {token}; resetting it");
                self.fail_device("the device returned a request it was never given");
                return;
            };
            // SAFETY: `token` is the head of the next used chain (peeked
            // above) and `by_token` says it was added for `req`.
            if let Err(e) = unsafe { self.pop_chain(token, ridx, &req) } {
                log::error!("virtio-blk: pop_used failed: {e:?}; resetting device");
                self.reqs[ridx as usize] = Some(req);
                self.fail_device("the device broke the ring protocol");
                return;
            }
            self.by_token[token as usize] = NO_REQ;
            self.free_reqs.push(ridx);
            if req.data.capacity() > 0 && self.spare_descs.len() < self.reqs.len() {
                self.spare_descs.push(req.data);
            }
            self.in_flight -= 1;
            let status = self.mem[ridx as usize].status[0];
            let slot = req.bio_slot;
            if let Some(b) = self.bios[slot as usize].as_mut() {
                b.outstanding -= 1;
                if status != S_OK {
                    self.stats.errors += 1;
                    let e = if status == S_UNSUPP {
                        BioError::NotSupported
                    } else {
                        BioError::Io
                    };
                    log::warn!(
                        "virtio-blk: {} at {} failed, status {status}",
                        b.bio.cmd.name(),
                        b.bio.offset
                    );
                    b.error.get_or_insert(e);
                }
            }
            self.maybe_finish(slot);
        }
    }

    /// Moves the bio in `slot` to the done list once nothing of it is at
    /// the device and nothing more will be issued.
    fn maybe_finish(&mut self, slot: u16) {
        let ready = match self.bios[slot as usize].as_ref() {
            Some(b) => b.outstanding == 0 && !b.queued,
            None => false,
        };
        if !ready {
            // An errored bio still at the head of the issue queue is
            // dropped from it by the next `pump`.
            return;
        }
        let b = self.bios[slot as usize].take().expect("bio slot");
        self.free_bios.push(slot);
        if b.quarantined {
            // The device is done with the pages at last; the bio went up
            // long ago.
            self.quarantined -= 1;
            b.bio.sg.give_back(b.lease);
            return;
        }
        let result = match b.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        b.bio.sg.give_back(b.lease);
        self.done.push_back((b.bio, result));
    }

    /// Resets a misbehaving device (so it stops touching memory) and fails
    /// every bio it held.
    fn fail_device(&mut self, why: &'static str) {
        self.broken = true;
        self.failure.get_or_insert(why);
        self.transport.set_status(DeviceStatus::empty());
        self.issue_q.clear();
        for slot in 0..self.bios.len() {
            if let Some(b) = self.bios[slot].take() {
                self.free_bios.push(slot as u16);
                // The device is reset: it touches the pages no more.
                b.bio.sg.give_back(b.lease);
                if !b.quarantined {
                    self.done.push_back((b.bio, Err(BioError::Io)));
                }
            }
        }
        self.quarantined = 0;
        self.in_flight = 0;
    }
}

/// The buffers of one side of a chain, on the stack: header, segment or
/// status plus every data descriptor a request may have. `ManuallyDrop`
/// because virtio-drivers ties the borrow of the list to the lifetime of
/// its elements, so the list must not be dropped after them; it holds
/// only references and never allocates, so not dropping it frees nothing.
type Chain<T> = core::mem::ManuallyDrop<ArrayVec<T, MAX_CHAIN>>;

/// Room in a [`Chain`]: more than the most data descriptors a request
/// takes (`QUEUE_SIZE - 2`, see [`BlkLimits::derive`]) plus header,
/// segment and status.
const MAX_CHAIN: usize = QUEUE_SIZE + 2;

/// The device-readable and device-writable buffers of one request chain,
/// in chain order (virtio 1.2 §5.2.6).
///
/// # Safety
///
/// `m` must point to a live `ReqMem`, and every `(address, length)` in
/// `req.data` must be memory that may be handed to the device.
unsafe fn chain_buffers<'a>(m: *mut ReqMem, req: &Req) -> (Chain<&'a [u8]>, Chain<&'a mut [u8]>) {
    let mut inputs: Chain<&'a [u8]> = Chain::new(ArrayVec::new());
    let mut outputs: Chain<&'a mut [u8]> = Chain::new(ArrayVec::new());
    // SAFETY: `m` is live (caller); the three fields are disjoint.
    let (hdr, seg, status): (&'a [u8; 16], &'a [u8; 16], &'a mut [u8; 1]) =
        unsafe { (&(*m).hdr, &(*m).seg, &mut (*m).status) };
    inputs.push(hdr);
    match req.kind {
        ReqKind::Data { write: true } => {
            for &(a, l) in &req.data {
                // SAFETY: the caller vouches for the range.
                inputs.push(unsafe { core::slice::from_raw_parts(a as *const u8, l as usize) });
            }
        }
        ReqKind::Data { write: false } => {
            for &(a, l) in &req.data {
                // SAFETY: the caller vouches for the range; nothing else
                // touches a bio's pages while it is at the device.
                outputs.push(unsafe { core::slice::from_raw_parts_mut(a as *mut u8, l as usize) });
            }
        }
        ReqKind::Range => inputs.push(seg),
        ReqKind::Flush => {}
    }
    outputs.push(status);
    (inputs, outputs)
}

impl<T: Transport, H: Hal> BlockDevice for VirtioBlk<T, H> {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    fn submit(&mut self, bio: Bio) -> Result<(), Bio> {
        if let Err(e) = self.check(&bio) {
            self.done.push_back((bio, Err(e)));
            return Ok(());
        }
        let Some(&slot) = self.free_bios.last() else {
            return Err(bio);
        };
        let Ok(lease) = bio.sg.lend() else {
            // The CPU has one of its pages mapped: a bug above the driver.
            self.done.push_back((bio, Err(BioError::Io)));
            return Ok(());
        };
        self.free_bios.pop();
        self.stats.bios += 1;
        self.bios[slot as usize] = Some(BioSlot {
            bio,
            issued: 0,
            cursor: Cursor::default(),
            outstanding: 0,
            requests: 0,
            error: None,
            queued: true,
            lease,
            quarantined: false,
        });
        self.issue_q.push_back(slot);
        self.pump();
        Ok(())
    }

    fn abort(&mut self, done: &mut dyn FnMut(Bio, BioResult)) {
        if !self.broken {
            log::error!(
                "virtio-blk: {} requests overdue; giving up on the device",
                self.in_flight
            );
            // No reset: QEMU's reset waits for the backend's requests to
            // finish, so resetting a device whose backend hangs would hang
            // the guest. The device may still write into the pages of the
            // requests it holds; they stay lent to it (quarantined) until it
            // returns them, and every bio goes back up now.
            self.broken = true;
            self.failure.get_or_insert("a request passed its deadline");
            self.issue_q.clear();
            for slot in 0..self.bios.len() {
                let Some(b) = self.bios[slot].as_mut() else {
                    continue;
                };
                if b.outstanding == 0 {
                    // Nothing of it is at the device.
                    let b = self.bios[slot].take().expect("bio slot");
                    self.free_bios.push(slot as u16);
                    b.bio.sg.give_back(b.lease);
                    self.done.push_back((b.bio, Err(BioError::Io)));
                    continue;
                }
                let stand_in = Bio::with_data(
                    b.bio.cmd,
                    b.bio.offset,
                    b.bio.sg.slice(0, b.bio.sg.len_bytes()),
                );
                let bio = core::mem::replace(&mut b.bio, stand_in);
                b.quarantined = true;
                b.queued = false;
                self.quarantined += 1;
                self.done.push_back((bio, Err(BioError::Io)));
            }
        }
        while let Some((bio, _)) = self.done.pop_front() {
            done(bio, Err(BioError::Io));
        }
    }

    fn failed(&self) -> Option<&str> {
        self.failure
    }

    fn poll(&mut self, done: &mut dyn FnMut(Bio, BioResult)) -> usize {
        if let Some(flag) = self.config_flag {
            if flag.swap(false, Ordering::AcqRel) {
                self.config_changed();
            }
        }
        if !self.broken {
            self.reap();
            self.pump();
        } else if self.quarantined > 0 {
            // Chains of bios given up on: their pages come free.
            self.reap();
        }
        let n = self.done.len();
        while let Some((bio, result)) = self.done.pop_front() {
            done(bio, result);
        }
        n
    }
}

#[cfg(test)]
mod tests;
