//! The gbde class: an encrypted provider after FreeBSD's gbde(4), where
//! every write of a sector draws a fresh random sector key, kept
//! enciphered in its zone's key block; made crash-safe.
//!
//! ```text
//!   PROV.bde          a request is cut at zone boundaries; each piece
//!      │              holds its zone (pieces of one zone run in order)
//!  ┌───▼─────┐        read:  the key block (stripe of records) from the
//!  │GbdeGeom │               cache, the data into the reader's pages,
//!  └───┬─────┘               each sector deciphered with the key whose
//!     PROV                   hash matches its ciphertext
//!                     write: new keys into the slot the disk does not
//!                            hold, the key block written and flushed,
//!                            then the data from bounce pages
//! ```
//!
//! Crash atomicity (which FreeBSD's gbde lacks: it writes data and key
//! sector unordered): a record keeps two keys, each with a keyed hash of
//! the ciphertext it made. The record reaches the disk before the data
//! (key block written, then the provider flushed), and a write replaces
//! only the slot whose data is not the durable one, so after a cut at any
//! moment a sector's ciphertext matches the old slot or the new. Which
//! slot is durable is known when this boot wrote the zone and a flush
//! followed; a zone whose earlier writes are not flushed yet is flushed
//! before it is written again; a record left with two keys by an earlier
//! boot is settled by reading the sector's ciphertext first.
//!
//! ```text
//! gbde init [-f] [-i ITER_MS] (-p PASS | -k SECRET) PROV
//!        # header, lock sector 0 for the passphrase, every key block
//!        # emptied (the volume reads zeroes); a volume the passphrase
//!        # opens is left as it is, another is refused unless -f
//! gbde attach (-p PASS | -k SECRET) PROV           # PROV.bde
//! gbde detach [-f] PROV
//! gbde setkey [-n SLOT] [-i ITER_MS] (-p PASS | -k SECRET) PROV
//!        # attached: seals the master key in lock sector SLOT (default:
//!        # the first empty one) under a new passphrase
//! gbde nuke -n SLOT [-f] PROV      # empties a lock sector (the last: -f)
//! ```
//!
//! Passphrases are stretched with PBKDF2-HMAC-SHA512 (`-i`: milliseconds
//! per try, as `eli`); data sectors are AES-256-XTS under their own key.

pub mod format;

use super::eli::{bounce, iterations_for, options, parse_detach, random, Passphrase};
use super::{unknown_verb, Class, Command};
use crate::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId, ProviderId};
use crate::cachestore::{ConsumerStore, Submit};
use crate::config::{Args, ConfigError};
use crate::ctl::{self, CtlError};
use crate::page::{DataCounters, Page, PageRef, SgList, PAGE_SIZE};
use crate::slab::Slab;
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use bufcache::{Cache, Config, Handle, Lookup, Ready, Replacement, Tag};
use core::any::Any;
use crypt::kdf::Hash;
use crypt::rng::Csprng;
use format::{
    FormatError, Header, Keys, Lock, Record, Slot, DATA_START, KEY_BLOCK, MASTER_BYTES, PER_KEY_SECTOR, PER_ZONE,
    SALT_BYTES, SECTOR, SLOTS,
};
use serde_json::{json, Value};

const CLASS_NAME: &str = "gbde";
const VERBS: &str = "init, attach, detach, setkey, nuke";

/// Cookies: the kind in the top byte.
const K_META: u64 = 1 << 56;
const K_CACHE: u64 = 2 << 56;
const K_DATA: u64 = 3 << 56;
const K_RESOLVE: u64 = 4 << 56;
const KIND: u64 = 0xff << 56;

/// Cache waiters: the op in the high bits, what it waits for below.
const W_BLOCK: u64 = 0;
const W_KEYS: u64 = 1;
const W_SETTLE: u64 = 2;
const W_CLIENT: u64 = 3;

/// Slot hash meaning "the sector held zeroes before this key".
const ZEROES: u64 = 1;

/// Key blocks the cache keeps (4 KiB each).
const CACHE_BLOCKS: u64 = 256;

/// Key blocks `init` empties at once.
const INIT_BATCH: u64 = 32;

/// The cache's block number of zone `z`'s key block (blocks are 4 KiB
/// from the start of the provider below).
fn key_block_no(z: u64) -> u64 {
    Header::key_block_at(z) / PAGE_SIZE as u64
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpKind {
    Read,
    Write,
    Flush,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Queued,
    Settling,
    Block,
    Resolving,
    Keys,
    Data,
}

/// One zone's piece of a request (or a client flush).
struct Op {
    kind: OpKind,
    phase: Phase,
    parent: u32,
    /// Zone, first sector (of the volume) and sectors.
    zone: u64,
    first: u64,
    count: u64,
    /// The byte of the parent's pages where this piece starts.
    at: u64,
    block: Option<Handle>,
    /// Enciphered data of a write.
    bounce: Option<SgList>,
    /// A write's new slot per sector.
    slots: Vec<u8>,
}

/// A client request and the pieces it waits for.
struct Parent {
    bio: Bio,
    pending: u32,
    result: BioResult,
    /// A read's pieces back from the disk: first sector, byte in the
    /// pages, and the records of its sectors as they were when the
    /// ciphertext was read (deciphered once every piece is back: two
    /// pieces may share a page, which a device holds until its piece
    /// returns).
    read: Vec<(u64, u64, Vec<Record>)>,
}

/// What this boot knows of a zone it wrote.
#[derive(Clone, Copy, Default)]
struct ZoneState {
    /// Sectors written this boot (bit per sector of the zone): their
    /// record's `latest` slot is the one their last write made.
    written: u64,
    /// A flush started at or after this count makes those writes durable.
    need: u64,
}

/// What a geom is doing besides serving.
enum Job {
    /// Reading the header and lock sectors, then `then`.
    Read { then: AfterRead },
    /// `init`: emptying key blocks from zone `next`, then a flush
    /// (`flushing`), then the header.
    Empty { next: u64, inflight: u64, failed: bool, flushing: bool, image: Vec<u8> },
    /// Metadata writes; `label` says what for.
    Write { pending: u32, failed: bool, label: &'static str },
}

enum AfterRead {
    Init { pass: Vec<u8>, force: bool, fresh: Box<Fresh> },
    Attach { pass: Vec<u8> },
}

/// A new volume, made when `init` was applied.
pub struct Fresh {
    lock: Lock,
    id: [u8; 16],
}

/// One gbde geom over one provider.
pub struct GbdeGeom {
    below: String,
    consumer: ConsumerId,
    provider: Option<ProviderId>,
    media_below: u64,
    job: Option<Job>,
    header: Option<Header>,
    master: Option<[u8; MASTER_BYTES]>,
    keys: Option<Keys>,
    /// Which lock sectors hold a key.
    locks: [bool; SLOTS],
    opened_by: Option<usize>,
    found: bool,
    error: Option<String>,
    rng: Csprng,
    cache: Cache<ConsumerStore>,
    ops: Slab<Op>,
    parents: Slab<Parent>,
    zone_locks: BTreeMap<u64, VecDeque<u32>>,
    zones: BTreeMap<u64, ZoneState>,
    /// Flushes of the cache started, and the newest that came back whole.
    flushes_started: u64,
    flushed: u64,
    /// Per op waiting for a flush: the count it started as.
    flush_of: BTreeMap<u32, u64>,
    /// Writes whose records are in the cache, waiting for the next
    /// key-block flush.
    key_batch: Vec<u32>,
    /// Key-block flushes in flight: the count each started as, and its
    /// writes.
    key_groups: Slab<(u64, Vec<u32>)>,
    /// Sectors whose record had two keys and were read to settle which.
    resolved: u64,
}

impl GbdeGeom {
    fn create(stack: &mut Stack, below: &str, then: AfterRead) -> Result<(), CtlError> {
        let under = ctl::provider(stack, below)?;
        let spec = stack.provider(under).spec.clone();
        if stack.provider(under).orphaned {
            return Err(StackError::Orphaned(spec.name).into());
        }
        if stack.find_geom(CLASS_NAME, below).is_some() {
            return Err(CtlError::Invalid(format!("{below} is attached or busy in gbde already")));
        }
        if u64::from(spec.sector_size) != SECTOR {
            return Err(CtlError::Invalid(format!(
                "{below}: gbde needs 512-byte sectors, not {}",
                spec.sector_size
            )));
        }
        if Header::for_size(spec.media_size, [0; 16]).is_none() {
            return Err(CtlError::Invalid(format!("{below}: too small for one gbde zone")));
        }
        let mut seed = [0u8; 32];
        stack.random_bytes(&mut seed).map_err(|_| {
            CtlError::Invalid(String::from("no entropy source (RDRAND/RDSEED or virtio-rng): refusing to make keys"))
        })?;
        let mut rng = Csprng::unseeded();
        rng.mix(&seed);
        let g = stack.reserve_geom(CLASS_NAME, below);
        let consumer = stack.attach(Some(g), under);
        let write = matches!(then, AfterRead::Init { .. });
        if let Err(e) = stack.access(consumer, 1, i32::from(write), i32::from(write)) {
            let _ = stack.detach(consumer);
            stack.abandon(g);
            return Err(e.into());
        }
        let blocks = spec.media_size / PAGE_SIZE as u64 + 1;
        let cache = Cache::new(
            ConsumerStore::new(vec![Some(consumer)], blocks),
            Config {
                block_size: PAGE_SIZE,
                capacity_bytes: CACHE_BLOCKS * KEY_BLOCK,
                replacement: Replacement::Clock,
            },
        );
        stack.install(
            g,
            Box::new(GbdeGeom {
                below: String::from(below),
                consumer,
                provider: None,
                media_below: spec.media_size,
                job: None,
                header: None,
                master: None,
                keys: None,
                locks: [false; SLOTS],
                opened_by: None,
                found: false,
                error: None,
                rng,
                cache,
                ops: Slab::new(),
                parents: Slab::new(),
                zone_locks: BTreeMap::new(),
                zones: BTreeMap::new(),
                flushes_started: 0,
                flushed: 0,
                flush_of: BTreeMap::new(),
                key_batch: Vec::new(),
                key_groups: Slab::new(),
                resolved: 0,
            }),
        );
        stack.geom_as::<GbdeGeom, _>(g, |e, io| {
            e.job = Some(Job::Read { then });
            io.request(e.consumer, Bio::read(0, DATA_START), K_META);
        });
        Ok(())
    }

    fn fail(&mut self, io: &mut Io<'_>, why: String) {
        io.fail_statement(why.clone());
        self.error = Some(why);
        self.job = None;
        io.wither();
    }

    /// The header and lock sectors are read.
    fn head_read(&mut self, io: &mut Io<'_>, bio: &Bio, result: BioResult) {
        let Some(Job::Read { then }) = self.job.take() else {
            return;
        };
        let mut head = vec![0u8; DATA_START as usize];
        if result.is_err() || bio.sg.copy_to_slice(0, &mut head, io.meta_counters()).is_err() {
            return self.fail(io, format!("{}: reading the gbde header failed", self.below));
        }
        let parsed = Header::parse(&head, self.media_below);
        let locks = &head[SECTOR as usize..(1 + SLOTS) * SECTOR as usize];
        for (i, l) in self.locks.iter_mut().enumerate() {
            *l = Lock::parse(&locks[i * SECTOR as usize..]).is_some();
        }
        match then {
            AfterRead::Attach { pass } => match parsed {
                Ok(h) => match format::unlock(locks, &pass) {
                    Ok((m, slot)) => self.open(io, h, m, slot),
                    Err(e) => self.fail(io, format!("{}: {e}", self.below)),
                },
                Err(e) => self.fail(io, format!("{}: {e}", self.below)),
            },
            AfterRead::Init { pass, force, fresh } => {
                if !force {
                    match &parsed {
                        Ok(_) if format::unlock(locks, &pass).is_ok() => {
                            // Initialised already (a config file's second boot).
                            self.found = true;
                            let _ = io.access(self.consumer, -1, -1, -1);
                            return io.wither();
                        }
                        Ok(_) => {
                            return self.fail(
                                io,
                                format!(
                                    "{}: holds a gbde volume this passphrase does not open (gbde init -f overwrites it)",
                                    self.below
                                ),
                            )
                        }
                        Err(FormatError::Corrupt(why)) => {
                            return self.fail(
                                io,
                                format!("{}: a damaged gbde header ({why}); refusing to overwrite it (gbde init -f does)", self.below),
                            )
                        }
                        Err(_) => {}
                    }
                }
                self.write_fresh(io, *fresh);
            }
        }
    }

    fn open(&mut self, io: &mut Io<'_>, h: Header, master: [u8; MASTER_BYTES], slot: usize) {
        let below = io.consumer(self.consumer).provider;
        let sb = io.provider(below).spec.clone();
        let spec = ProviderSpec {
            name: format!("{}.bde", self.below),
            media_size: h.data_bytes(),
            sector_size: SECTOR as u32,
            stripe_size: 0,
            stripe_offset: 0,
            can_flush: sb.can_flush,
            can_discard: false,
            can_write_zeroes: false,
        };
        match io.add_provider(spec) {
            Ok(p) => self.provider = Some(p),
            Err(e) => return self.fail(io, format!("{}: {e}", self.below)),
        }
        let _ = io.access(self.consumer, -1, 0, 0);
        self.keys = Some(Keys::new(&master));
        self.master = Some(master);
        self.header = Some(h);
        self.opened_by = Some(slot);
    }

    /// `init`: every key block emptied, then header and lock sector 0.
    fn write_fresh(&mut self, io: &mut Io<'_>, fresh: Fresh) {
        let Some(h) = Header::for_size(self.media_below, fresh.id) else {
            return self.fail(io, format!("{}: too small for one gbde zone", self.below));
        };
        let mut image = vec![0u8; DATA_START as usize];
        image[..SECTOR as usize].copy_from_slice(&h.to_bytes());
        let mut locks: [Option<Lock>; SLOTS] = Default::default();
        locks[0] = Some(fresh.lock);
        let area = format::lock_area(&locks);
        image[SECTOR as usize..SECTOR as usize + area.len()].copy_from_slice(&area);
        self.header = Some(h);
        self.job = Some(Job::Empty { next: 0, inflight: 0, failed: false, flushing: false, image });
        self.empty_next(io);
    }

    fn empty_next(&mut self, io: &mut Io<'_>) {
        let zones = self.header.as_ref().map_or(0, |h| h.zones);
        let Some(Job::Empty { next, inflight, failed, flushing, .. }) = &mut self.job else {
            return;
        };
        if *failed {
            if *inflight == 0 {
                let _ = io.access(self.consumer, -1, -1, -1);
                return self.fail(io, format!("{}: emptying the key blocks failed", self.below));
            }
            return;
        }
        while *inflight < INIT_BATCH && *next < zones {
            let Ok(page) = Page::try_new_zeroed() else {
                *failed = true;
                break;
            };
            let mut sg = SgList::with_capacity(1);
            sg.push(PageRef { page, offset: 0, len: KEY_BLOCK as u32 });
            io.request(self.consumer, Bio::with_data(BioCmd::Write, Header::key_block_at(*next), sg), K_META | 1);
            *next += 1;
            *inflight += 1;
        }
        if *next >= zones && *inflight == 0 && !*failed && !*flushing {
            // The key blocks durable, then the header (FUA): a cut before
            // the end leaves no volume.
            *flushing = true;
            *inflight = 1;
            io.request(self.consumer, Bio::flush(), K_META | 2);
        }
    }

    fn meta_write_done(&mut self, io: &mut Io<'_>, cookie: u64, result: BioResult) {
        if let Some(Job::Empty { inflight, failed, flushing, image, .. }) = &mut self.job {
            *inflight -= 1;
            *failed |= result.is_err();
            if cookie & 3 == 2 && *flushing && !*failed {
                let image = core::mem::take(image);
                self.job = Some(Job::Write { pending: 1, failed: false, label: "init" });
                let mut bio = Bio::with_data(BioCmd::Write, 0, SgList::from_bytes(&image, io.meta_counters()));
                bio.fua = true;
                io.request(self.consumer, bio, K_META);
                return;
            }
            return self.empty_next(io);
        }
        let Some(Job::Write { pending, failed, label }) = &mut self.job else {
            return;
        };
        *pending -= 1;
        *failed |= result.is_err();
        if *pending > 0 {
            return;
        }
        let (failed, label) = (*failed, *label);
        self.job = None;
        if label == "init" {
            let _ = io.access(self.consumer, -1, -1, -1);
            if failed {
                return self.fail(io, format!("{}: writing the gbde header failed", self.below));
            }
            return io.wither();
        }
        let _ = io.access(self.consumer, 0, -1, 0);
        if failed {
            io.fail_statement(format!("{}: writing lock sector failed ({label})", self.below));
        }
    }

    /// Writes lock sector `slot` (FUA) as `bytes`.
    fn write_lock(&mut self, io: &mut Io<'_>, slot: usize, bytes: &[u8], label: &'static str) -> Result<(), CtlError> {
        if self.job.is_some() || self.provider.is_none() {
            return Err(CtlError::Invalid(format!("{} is busy", self.below)));
        }
        io.access(self.consumer, 0, 1, 0)?;
        self.job = Some(Job::Write { pending: 1, failed: false, label });
        let at = (1 + slot as u64) * SECTOR;
        let mut bio = Bio::with_data(BioCmd::Write, at, SgList::from_bytes(bytes, io.meta_counters()));
        bio.fua = true;
        io.request(self.consumer, bio, K_META);
        Ok(())
    }

    // ---- the I/O path ----

    fn waiter(op: u32, what: u64) -> u64 {
        u64::from(op) << 2 | what
    }

    fn start_io(&mut self, io: &mut Io<'_>, bio: Bio) {
        let kind = match bio.cmd {
            BioCmd::Read => OpKind::Read,
            BioCmd::Write => OpKind::Write,
            BioCmd::Flush => OpKind::Flush,
            BioCmd::GetAllocation => return io.deliver(bio, Ok(())),
            BioCmd::Discard | BioCmd::WriteZeroes => return io.deliver(bio, Err(BioError::NotSupported)),
        };
        let (first, count) = (bio.offset / SECTOR, bio.length / SECTOR);
        let parent = self.parents.insert(Parent { bio, pending: 1, result: Ok(()), read: Vec::new() });
        if kind == OpKind::Flush {
            let op = self.new_op(kind, parent, 0, 0, 0, 0);
            let n = self.start_flush();
            self.flush_of.insert(op, n);
            self.cache.flush(None, Self::waiter(op, W_CLIENT));
            return;
        }
        let mut s = first;
        while s < first + count {
            let zone = s / PER_ZONE;
            let end = ((zone + 1) * PER_ZONE).min(first + count);
            if let Some(p) = self.parents.get_mut(parent) {
                p.pending += 1;
            }
            let op = self.new_op(kind, parent, zone, s, end - s, (s - first) * SECTOR);
            self.lock(io, op);
            s = end;
        }
        self.piece_done(io, parent, Ok(()));
    }

    fn new_op(&mut self, kind: OpKind, parent: u32, zone: u64, first: u64, count: u64, at: u64) -> u32 {
        self.ops.insert(Op {
            kind,
            phase: Phase::Queued,
            parent,
            zone,
            first,
            count,
            at,
            block: None,
            bounce: None,
            slots: Vec::new(),
        })
    }

    /// Counts a cache flush about to start; its number.
    fn start_flush(&mut self) -> u64 {
        self.flushes_started += 1;
        self.flushes_started
    }

    fn lock(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(zone) = self.ops.get(op).map(|o| o.zone) else {
            return;
        };
        let q = self.zone_locks.entry(zone).or_default();
        q.push_back(op);
        if q.len() == 1 {
            self.run(io, op);
        }
    }

    fn unlock(&mut self, io: &mut Io<'_>, op: u32, zone: u64) {
        let next = match self.zone_locks.get_mut(&zone) {
            Some(q) => {
                if q.front() == Some(&op) {
                    q.pop_front();
                }
                let n = q.front().copied();
                if q.is_empty() {
                    self.zone_locks.remove(&zone);
                }
                n
            }
            None => None,
        };
        if let Some(n) = next {
            self.run(io, n);
        }
    }

    /// The op holds its zone: a write to a zone whose earlier writes are
    /// not flushed flushes first; then the key block.
    fn run(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(o) = self.ops.get(op) else {
            return;
        };
        let (kind, zone) = (o.kind, o.zone);
        if kind == OpKind::Write {
            if let Some(z) = self.zones.get(&zone) {
                if z.written != 0 && self.flushed < z.need {
                    let n = self.start_flush();
                    self.flush_of.insert(op, n);
                    if let Some(o) = self.ops.get_mut(op) {
                        o.phase = Phase::Settling;
                    }
                    self.cache.flush(Some(0..0), Self::waiter(op, W_SETTLE));
                    return;
                }
            }
        }
        self.get_block(io, op);
    }

    fn get_block(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        o.phase = Phase::Block;
        let zone = o.zone;
        match self.cache.get(key_block_no(zone), Self::waiter(op, W_BLOCK)) {
            Lookup::Hit(h) => self.block_ready(io, op, h),
            Lookup::Wait => {}
        }
    }

    /// The records of sectors `[first, first + count)` of the zone whose
    /// key block `h` holds, or `None` if a key sector is damaged.
    fn records(&self, h: Handle, zone: u64, first: u64, count: u64, counters: &DataCounters) -> Option<Vec<Record>> {
        let keys = self.keys.as_ref()?;
        let page = self.cache.try_buf(h)?;
        let mut out = Vec::with_capacity(count as usize);
        let mut raw = [0u8; SECTOR as usize];
        let mut sub = u64::MAX;
        let mut recs = [Record::default(); PER_KEY_SECTOR as usize];
        for s in first..first + count {
            let i = s % PER_ZONE;
            if i / PER_KEY_SECTOR != sub {
                sub = i / PER_KEY_SECTOR;
                page.copy_out((sub * SECTOR) as usize, &mut raw, counters).ok()?;
                let disk_sector = Header::key_block_at(zone) / SECTOR + sub;
                recs = format::read_key_sector(keys, disk_sector, &raw)?;
            }
            out.push(recs[(i % PER_KEY_SECTOR) as usize]);
        }
        Some(out)
    }

    fn block_ready(&mut self, io: &mut Io<'_>, op: u32, h: Handle) {
        let Some(o) = self.ops.get_mut(op) else {
            self.cache.unpin(h);
            return;
        };
        o.block = Some(h);
        let (kind, first, count, at, parent) = (o.kind, o.first, o.count, o.at, o.parent);
        match kind {
            OpKind::Read => {
                let Some(p) = self.parents.get(parent) else {
                    return self.finish(io, op, Err(BioError::Io));
                };
                let sg = p.bio.sg.slice(at, count * SECTOR);
                let child = p.bio.child(Header::data_at(first), count * SECTOR, sg);
                if let Some(o) = self.ops.get_mut(op) {
                    o.phase = Phase::Data;
                }
                io.request(self.consumer, child, K_DATA | u64::from(op));
            }
            OpKind::Write => {
                let recs = self.records(h, first / PER_ZONE, first, count, io.meta_counters());
                let Some(recs) = recs else {
                    return self.finish(io, op, Err(BioError::Io));
                };
                let zone = self.zones.get(&(first / PER_ZONE)).copied().unwrap_or_default();
                let unknown = recs
                    .iter()
                    .enumerate()
                    .any(|(k, r)| zone.written & 1 << ((first + k as u64) % PER_ZONE) == 0 && r.both());
                if unknown {
                    // Which key the disk holds: read its ciphertext.
                    if let Some(o) = self.ops.get_mut(op) {
                        o.phase = Phase::Resolving;
                    }
                    io.request(self.consumer, Bio::read(Header::data_at(first), count * SECTOR), K_RESOLVE | u64::from(op));
                } else {
                    self.write_keys(io, op, recs, None);
                }
            }
            OpKind::Flush => {}
        }
    }

    /// New keys for every sector of a write: records updated in the key
    /// block, the data enciphered into bounce pages, and the key block
    /// written and flushed before the data goes.
    fn write_keys(&mut self, io: &mut Io<'_>, op: u32, mut recs: Vec<Record>, disk: Option<&SgList>) {
        let Some(provider) = self.provider else {
            return self.finish(io, op, Err(BioError::Io));
        };
        let Some(o) = self.ops.get(op) else {
            return;
        };
        let (first, count, at, parent, zone_no) = (o.first, o.count, o.at, o.parent, o.zone);
        let Some(h) = o.block else {
            return self.finish(io, op, Err(BioError::Io));
        };
        let zone = self.zones.get(&zone_no).copied().unwrap_or_default();
        let counters = &io.stats(provider).data;
        let Some(bounce) = bounce(count * SECTOR) else {
            return self.finish(io, op, Err(BioError::NoMemory));
        };
        let (Some(keys), Some(p)) = (self.keys.as_ref(), self.parents.get(parent)) else {
            return self.finish(io, op, Err(BioError::Io));
        };
        let mut slots = Vec::with_capacity(count as usize);
        let mut buf = [0u8; SECTOR as usize];
        let mut resolved = 0;
        for (k, rec) in recs.iter_mut().enumerate() {
            let s = first + k as u64;
            let bit = 1u64 << (s % PER_ZONE);
            // The slot the disk holds durably.
            let durable = if zone.written & bit != 0 {
                Some(rec.latest)
            } else if rec.both() {
                resolved += 1;
                disk.and_then(|d| {
                    d.copy_to_slice(k as u64 * SECTOR, &mut buf, counters).ok()?;
                    rec.matching(keys.hash(s, &buf)).or_else(|| rec.matching(ZEROES))
                })
            } else {
                rec.single()
            };
            let new = durable.map_or(0, |d| 1 - d);
            if p.bio.sg.copy_to_slice(at + k as u64 * SECTOR, &mut buf, counters).is_err() {
                return self.finish(io, op, Err(BioError::Io));
            }
            let mut key = [0u8; 32];
            if self.rng.fill(&mut key).is_err() {
                return self.finish(io, op, Err(BioError::Io));
            }
            let Some(x) = keys.sector_cipher(&key) else {
                return self.finish(io, op, Err(BioError::Io));
            };
            x.encrypt(&mut buf, SECTOR as usize, s);
            counters.add_encrypted(SECTOR as usize);
            if bounce.copy_from_slice(k as u64 * SECTOR, &buf, counters).is_err() {
                return self.finish(io, op, Err(BioError::Io));
            }
            rec.slots[new as usize] = Slot { key, hash: keys.hash(s, &buf) };
            if durable.is_none() {
                // Never written (or unreadable): it read zeroes before.
                rec.slots[1 - new as usize] = Slot { key: [0; 32], hash: ZEROES };
            }
            rec.latest = new;
            slots.push(new);
        }
        self.resolved += resolved;
        // Back into the key block's key sectors.
        let Some(page) = self.cache.try_buf(h).cloned() else {
            return self.finish(io, op, Err(BioError::Io));
        };
        let mut raw = [0u8; SECTOR as usize];
        let (i0, i1) = (first % PER_ZONE, first % PER_ZONE + count);
        for sub in i0 / PER_KEY_SECTOR..i1.div_ceil(PER_KEY_SECTOR) {
            let disk_sector = Header::key_block_at(zone_no) / SECTOR + sub;
            if page.copy_out((sub * SECTOR) as usize, &mut raw, counters).is_err() {
                return self.finish(io, op, Err(BioError::Io));
            }
            let Some(mut all) = format::read_key_sector(keys, disk_sector, &raw) else {
                return self.finish(io, op, Err(BioError::Io));
            };
            for (j, r) in all.iter_mut().enumerate() {
                let i = sub * PER_KEY_SECTOR + j as u64;
                if (i0..i1).contains(&i) {
                    *r = recs[(i - i0) as usize];
                }
            }
            let enc = format::write_key_sector(keys, disk_sector, &all);
            if page.copy_in((sub * SECTOR) as usize, &enc, counters).is_err() {
                return self.finish(io, op, Err(BioError::Io));
            }
        }
        self.cache.mark_dirty(h);
        self.cache.unpin(h);
        if let Some(o) = self.ops.get_mut(op) {
            o.block = None;
            o.bounce = Some(bounce);
            o.slots = slots;
            o.phase = Phase::Keys;
        }
        // Flushed with the others that are ready in this event (one flush
        // for every zone a request spans).
        self.key_batch.push(op);
    }

    /// One flush of the key blocks (and the provider below) for every
    /// write whose records are in the cache, not yet durable.
    fn flush_key_batch(&mut self) {
        if self.key_batch.is_empty() {
            return;
        }
        let ops = core::mem::take(&mut self.key_batch);
        let n = self.start_flush();
        let g = self.key_groups.insert((n, ops));
        self.cache.flush(None, Self::waiter(g, W_KEYS));
    }

    /// The key block is durable: the data goes.
    fn keys_durable(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        o.phase = Phase::Data;
        let (first, count, parent) = (o.first, o.count, o.parent);
        let Some(sg) = o.bounce.take() else {
            return self.finish(io, op, Err(BioError::Io));
        };
        let Some(p) = self.parents.get(parent) else {
            return self.finish(io, op, Err(BioError::Io));
        };
        let child = p.bio.child(Header::data_at(first), count * SECTOR, sg);
        io.request(self.consumer, child, K_DATA | u64::from(op));
    }

    fn data_done(&mut self, io: &mut Io<'_>, op: u32, bio: Bio, result: BioResult) {
        let Some(o) = self.ops.get(op) else {
            return;
        };
        let (kind, first, count, zone_no) = (o.kind, o.first, o.count, o.zone);
        if result.is_err() {
            return self.finish(io, op, result);
        }
        match kind {
            OpKind::Write => {
                let mut bits = 0u64;
                for s in first..first + count {
                    bits |= 1 << (s % PER_ZONE);
                }
                let next = self.flushes_started + 1;
                let z = self.zones.entry(zone_no).or_default();
                z.written |= bits;
                z.need = next;
                self.finish(io, op, Ok(()))
            }
            OpKind::Read => {
                let _ = bio;
                let Some(h) = self.ops.get(op).and_then(|o| o.block) else {
                    return self.finish(io, op, Err(BioError::Io));
                };
                let recs = self.records(h, zone_no, first, count, io.meta_counters());
                let Some(recs) = recs else {
                    return self.finish(io, op, Err(BioError::Io));
                };
                let (parent, at) = self.ops.get(op).map_or((u32::MAX, 0), |o| (o.parent, o.at));
                if let Some(p) = self.parents.get_mut(parent) {
                    p.read.push((first, at, recs));
                }
                self.finish(io, op, Ok(()))
            }
            OpKind::Flush => {}
        }
    }

    /// Deciphers a read's sectors in the reader's pages, each with the
    /// key whose hash its ciphertext matches.
    fn decipher(&self, io: &Io<'_>, p: &Parent) -> BioResult {
        let (Some(keys), Some(provider)) = (self.keys.as_ref(), self.provider) else {
            return Err(BioError::Io);
        };
        let counters = &io.stats(provider).data;
        let mut buf = [0u8; SECTOR as usize];
        for (first, at, recs) in &p.read {
            for (k, rec) in recs.iter().enumerate() {
                let s = first + k as u64;
                let pos = at + k as u64 * SECTOR;
                if rec.empty() {
                    buf = [0; SECTOR as usize];
                } else {
                    p.bio.sg.copy_to_slice(pos, &mut buf, counters).map_err(|_| BioError::Io)?;
                    match rec.matching(keys.hash(s, &buf)) {
                        Some(i) => {
                            let x = keys.sector_cipher(&rec.slots[i as usize].key).ok_or(BioError::Io)?;
                            x.decrypt(&mut buf, SECTOR as usize, s);
                            counters.add_decrypted(SECTOR as usize);
                        }
                        None if rec.matching(ZEROES).is_some() => buf = [0; SECTOR as usize],
                        // Neither key made this ciphertext: damaged.
                        None => return Err(BioError::Io),
                    }
                }
                p.bio.sg.copy_from_slice(pos, &buf, counters).map_err(|_| BioError::Io)?;
            }
        }
        Ok(())
    }

    fn resolve_done(&mut self, io: &mut Io<'_>, op: u32, bio: Bio, result: BioResult) {
        if result.is_err() {
            return self.finish(io, op, result);
        }
        let Some(o) = self.ops.get(op) else {
            return;
        };
        let (first, count) = (o.first, o.count);
        let Some(h) = o.block else {
            return self.finish(io, op, Err(BioError::Io));
        };
        let recs = self.records(h, first / PER_ZONE, first, count, io.meta_counters());
        let Some(recs) = recs else {
            return self.finish(io, op, Err(BioError::Io));
        };
        self.write_keys(io, op, recs, Some(&bio.sg));
    }

    fn finish(&mut self, io: &mut Io<'_>, op: u32, result: BioResult) {
        let Some(o) = self.ops.remove(op) else {
            return;
        };
        if let Some(h) = o.block {
            self.cache.unpin(h);
        }
        self.flush_of.remove(&op);
        if o.kind != OpKind::Flush {
            self.unlock(io, op, o.zone);
        }
        self.piece_done(io, o.parent, result);
    }

    fn piece_done(&mut self, io: &mut Io<'_>, parent: u32, result: BioResult) {
        let Some(p) = self.parents.get_mut(parent) else {
            return;
        };
        if p.result.is_ok() {
            p.result = result;
        }
        p.pending -= 1;
        if p.pending == 0 {
            if let Some(mut p) = self.parents.remove(parent) {
                if p.bio.cmd == BioCmd::Read && p.result.is_ok() {
                    p.result = self.decipher(io, &p);
                }
                io.deliver(p.bio, p.result);
            }
        }
    }

    fn cache_ready(&mut self, io: &mut Io<'_>, r: Ready) {
        let (waiter, result) = match r {
            Ready::Block { waiter, result } => {
                let op = (waiter >> 2) as u32;
                match result {
                    Ok(h) => {
                        if self.ops.get(op).is_some_and(|o| o.phase == Phase::Block) {
                            self.block_ready(io, op, h);
                        } else {
                            self.cache.unpin(h);
                        }
                    }
                    Err(bufcache::Error::NoMemory) => self.finish(io, op, Err(BioError::NoMemory)),
                    Err(bufcache::Error::Io) => self.finish(io, op, Err(BioError::Io)),
                }
                return;
            }
            Ready::Flushed { waiter, result } => (waiter, result),
            Ready::Written { .. } => return,
        };
        let op = (waiter >> 2) as u32;
        let err = if result == Err(bufcache::Error::NoMemory) { BioError::NoMemory } else { BioError::Io };
        if waiter & 3 == W_KEYS {
            let Some((n, ops)) = self.key_groups.remove(op) else {
                return;
            };
            if result.is_ok() {
                self.flushed = self.flushed.max(n);
            }
            for op in ops {
                match result {
                    Ok(()) => self.keys_durable(io, op),
                    Err(_) => self.finish(io, op, Err(err)),
                }
            }
            return;
        }
        let n = self.flush_of.remove(&op).unwrap_or(0);
        if result.is_ok() {
            self.flushed = self.flushed.max(n);
        }
        match waiter & 3 {
            W_CLIENT => self.finish(io, op, result.map_err(|_| err)),
            W_SETTLE if result.is_ok() => self.get_block(io, op),
            _ => self.finish(io, op, Err(err)),
        }
    }

    fn pump(&mut self, io: &mut Io<'_>) {
        loop {
            let mut any = false;
            while let Some(s) = self.cache.store_mut().take() {
                any = true;
                match s {
                    Submit::Bio { consumer, bio, tag } => io.request(consumer, bio, K_CACHE | (tag.0 & 0xffff_ffff_ffff)),
                    Submit::Failed { tag, buf } => self.cache.complete(tag, buf, Err(bufcache::Error::Io)),
                }
            }
            while let Some(r) = self.cache.take_ready() {
                any = true;
                self.cache_ready(io, r);
            }
            if !self.key_batch.is_empty() {
                any = true;
                self.flush_key_batch();
            }
            if !any {
                break;
            }
        }
    }
}

impl Geom for GbdeGeom {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn start(&mut self, io: &mut Io<'_>, _provider: ProviderId, bio: Bio) {
        if self.keys.is_none() {
            return io.deliver(bio, Err(BioError::Io));
        }
        self.start_io(io, bio);
        self.pump(io);
    }

    fn done(&mut self, io: &mut Io<'_>, cookie: u64, bio: Bio, result: BioResult) {
        match cookie & KIND {
            K_META => {
                if bio.cmd == BioCmd::Read {
                    self.head_read(io, &bio, result);
                } else {
                    self.meta_write_done(io, cookie, result);
                }
            }
            K_CACHE => {
                let tag = Tag(cookie & 0xffff_ffff_ffff);
                if let Some((tag, buf, r)) = self.cache.store_mut().bio_done(tag, bio, result) {
                    self.cache.complete(tag, buf, r);
                }
            }
            K_DATA => self.data_done(io, (cookie & 0xffff_ffff) as u32, bio, result),
            K_RESOLVE => self.resolve_done(io, (cookie & 0xffff_ffff) as u32, bio, result),
            _ => {}
        }
        self.pump(io);
    }

    fn settling(&self) -> bool {
        self.job.is_some()
    }

    fn caches(&self) -> Vec<(String, bufcache::Stats, u64)> {
        if self.provider.is_none() {
            return Vec::new();
        }
        vec![(format!("{}.bde", self.below), self.cache.stats(), PAGE_SIZE as u64)]
    }

    fn dumpconf(&self) -> Value {
        json!({
            "provider": self.below,
            "state": if self.provider.is_some() { "attached" } else if self.error.is_some() { "failed" } else { "working" },
            "error": self.error,
            "cipher": "aes-256-xts, a random key per sector write",
            "kdf": "pbkdf2-sha512",
            "zones": self.header.as_ref().map(|h| h.zones),
            "data_sectors_per_zone": PER_ZONE,
            "slots": self.locks.iter().enumerate().filter(|(_, &l)| l).map(|(i, _)| i).collect::<Vec<_>>(),
            "opened_by_slot": self.opened_by,
            "engine": self.keys.as_ref().map(|k| k.engine()),
            "records_settled_by_reading": self.resolved,
            "found_initialised": self.found,
        })
    }

    fn as_any(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

/// The provider a `gbde` verb names: `PROV` or `PROV.bde`.
fn below_name(name: &str) -> String {
    String::from(name.strip_suffix(".bde").unwrap_or(name))
}

fn salt(stack: &mut Stack) -> Result<[u8; SALT_BYTES], CtlError> {
    Ok(random(stack, SALT_BYTES)?.try_into().expect("salt bytes"))
}

/// `gbde init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Init {
    /// The provider to format.
    pub provider: String,
    /// Passphrase of lock sector 0.
    pub pass: Passphrase,
    /// Overwrite a volume already there.
    pub force: bool,
    /// PBKDF2 time per passphrase try, ms.
    pub iter_ms: u32,
}

impl Command for Init {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let pass = self.pass.resolve(stack)?;
        let under = ctl::provider(stack, &self.provider)?;
        if !stack.provider(under).access.is_zero() {
            return Err(StackError::Busy(self.provider.clone()).into());
        }
        let master: [u8; MASTER_BYTES] = random(stack, MASTER_BYTES)?.try_into().expect("master bytes");
        let id: [u8; 16] = random(stack, 16)?.try_into().expect("id bytes");
        let iterations = iterations_for(stack, Hash::Sha512, self.iter_ms).clamp(format::MIN_ITERATIONS, format::MAX_ITERATIONS);
        let lock = Lock::seal(&master, &pass, salt(stack)?, iterations, 0);
        let fresh = Box::new(Fresh { lock, id });
        GbdeGeom::create(stack, &self.provider, AfterRead::Init { pass, force: self.force, fresh })
    }
}

/// `gbde attach`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attach {
    /// The provider holding the volume.
    pub provider: String,
    /// Its passphrase.
    pub pass: Passphrase,
}

impl Command for Attach {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let pass = self.pass.resolve(stack)?;
        GbdeGeom::create(stack, &self.provider, AfterRead::Attach { pass })
    }

    fn creates(&self) -> Option<(String, String)> {
        Some((format!("{}.bde", self.provider), self.provider.clone()))
    }
}

/// The attached geom of `provider`, its master key and used lock sectors.
fn attached(stack: &mut Stack, provider: &str) -> Result<(crate::bio::GeomId, [u8; MASTER_BYTES], [bool; SLOTS]), CtlError> {
    let not_attached = || CtlError::Invalid(format!("{provider} is not attached (gbde attach it first)"));
    let g = ctl::geom(stack, CLASS_NAME, provider).map_err(|_| not_attached())?;
    stack
        .geom_as::<GbdeGeom, _>(g, |e, _| match (e.master, e.provider) {
            (Some(m), Some(_)) => Some((m, e.locks)),
            _ => None,
        })
        .flatten()
        .map(|(m, l)| (g, m, l))
        .ok_or_else(not_attached)
}

/// `gbde setkey`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetKey {
    /// The attached provider.
    pub provider: String,
    /// The new passphrase.
    pub pass: Passphrase,
    /// PBKDF2 time per try, ms.
    pub iter_ms: u32,
    /// The lock sector (default: the first empty one).
    pub slot: Option<usize>,
}

impl Command for SetKey {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let pass = self.pass.resolve(stack)?;
        let (g, master, locks) = attached(stack, &self.provider)?;
        let slot = match self.slot {
            Some(s) => s,
            None => locks.iter().position(|&l| !l).ok_or_else(|| {
                CtlError::Invalid(format!("{}: all {SLOTS} lock sectors are in use (give -n SLOT to replace one)", self.provider))
            })?,
        };
        let iterations = iterations_for(stack, Hash::Sha512, self.iter_ms).clamp(format::MIN_ITERATIONS, format::MAX_ITERATIONS);
        let lock = Lock::seal(&master, &pass, salt(stack)?, iterations, slot);
        stack
            .geom_as::<GbdeGeom, _>(g, |e, io| {
                e.write_lock(io, slot, &lock.to_bytes(), "setkey")?;
                e.locks[slot] = true;
                Ok(())
            })
            .unwrap_or_else(|| Err(CtlError::Invalid(format!("{} is gone", self.provider))))
    }
}

/// `gbde nuke`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nuke {
    /// The attached provider.
    pub provider: String,
    /// The lock sector to empty.
    pub slot: usize,
    /// Also the last one (the volume never opens again).
    pub force: bool,
}

impl Command for Nuke {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let (g, _, locks) = attached(stack, &self.provider)?;
        if !locks[self.slot] {
            return Err(CtlError::Invalid(format!("{}: lock sector {} is not in use", self.provider, self.slot)));
        }
        if locks.iter().filter(|&&l| l).count() == 1 && !self.force {
            return Err(CtlError::Invalid(format!(
                "{}: lock sector {} is the last: without it the volume never opens again (-f to do it anyway)",
                self.provider, self.slot
            )));
        }
        let wipe = random(stack, SECTOR as usize)?;
        stack
            .geom_as::<GbdeGeom, _>(g, |e, io| {
                e.write_lock(io, self.slot, &wipe, "nuke")?;
                e.locks[self.slot] = false;
                Ok(())
            })
            .unwrap_or_else(|| Err(CtlError::Invalid(format!("{} is gone", self.provider))))
    }
}

/// The gbde class.
pub struct GbdeClass;

/// The registry's value.
pub static CLASS: GbdeClass = GbdeClass;

impl Class for GbdeClass {
    fn name(&self) -> &'static str {
        CLASS_NAME
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        let verb = args.next(&format!("a gbde verb ({VERBS})"))?;
        let need_pass = |args: &Args<'_>, p: Option<Passphrase>| {
            p.ok_or_else(|| args.err(verb.column, format!("gbde {}: give -p PASSPHRASE or -k SECRET", verb.text)))
        };
        let iter = |ms: Option<u32>| ms.unwrap_or(super::eli::DEFAULT_ITER_MS);
        Ok(match verb.text {
            "init" => {
                let o = options(args, &["-f", "-i", "-p", "-k"], SLOTS)?;
                let pass = need_pass(args, o.pass)?;
                let provider = args.name("a provider")?;
                args.finish()?;
                Arc::new(Init { provider, pass, force: o.force, iter_ms: iter(o.iter_ms) })
            }
            "attach" => {
                let o = options(args, &["-p", "-k"], SLOTS)?;
                let pass = need_pass(args, o.pass)?;
                let provider = args.name("a provider")?;
                args.finish()?;
                Arc::new(Attach { provider, pass })
            }
            "detach" => parse_detach(CLASS_NAME, ".bde", args)?,
            "setkey" => {
                let o = options(args, &["-i", "-n", "-p", "-k"], SLOTS)?;
                let pass = need_pass(args, o.pass)?;
                let provider = below_name(&args.name("a provider")?);
                args.finish()?;
                Arc::new(SetKey { provider, pass, iter_ms: iter(o.iter_ms), slot: o.slot })
            }
            "nuke" => {
                let o = options(args, &["-n", "-f"], SLOTS)?;
                let slot = o.slot.ok_or_else(|| args.err(verb.column, "gbde nuke: give -n SLOT"))?;
                let provider = below_name(&args.name("a provider")?);
                args.finish()?;
                Arc::new(Nuke { provider, slot, force: o.force })
            }
            _ => return Err(unknown_verb(args, CLASS_NAME, &verb, VERBS)),
        })
    }
}

#[cfg(test)]
mod tests;
