//! Test support: a fake block device that completes out of order and
//! fails on demand (the SPDK raid5f unit-test pattern), and helpers that
//! drive a stack synchronously. Built for this crate's tests and, with
//! the `testing` feature, for other crates' tests.
//!
//! ```text
//!  test ─▶ FakeDiskHandle ─(shared state)─ FakeDisk ◀─ DiskGeom ◀─ stack
//!          contents, faults, hold            submit: queue
//!                                            poll: run a random subset
//!                                                  of the queue, in
//!                                                  random order
//! ```
//!
//! The fake has a volatile cache: `contents()` is what reads see,
//! `durable()` is what survived the last FLUSH.

use crate::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId};
use crate::disk::{vtbd_name, BlockDevice, DiskGeom, DiskInfo};
use crate::page::{DataCounters, Lease, PageBusy, SgList};
use crate::stack::Stack;
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use rand_core::{Rng, SeedableRng};
use rand_xorshift::XorShiftRng;

/// Rounds of [`Stack::run`] a helper waits for a completion before it
/// declares the stack hung.
pub const MAX_ROUNDS: usize = 100_000;

/// What a fake disk has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Reads executed.
    pub reads: u64,
    /// Writes executed.
    pub writes: u64,
    /// Flushes executed.
    pub flushes: u64,
    /// Discards and write-zeroes executed.
    pub frees: u64,
    /// Requests failed.
    pub failed: u64,
    /// Most requests queued at once.
    pub max_queued: usize,
    /// Times the disk geom gave up on the device ([`BlockDevice::abort`]).
    pub aborts: u64,
}

struct State {
    info: DiskInfo,
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Bios at the "device", each with the lease on its pages (the device
    /// holds them as a DMA engine would, so a class that maps a page of a
    /// bio still in flight gets `PageBusy` and the model tests see it).
    queue: Vec<(Bio, Result<Lease, PageBusy>)>,
    rng: XorShiftRng,
    reorder: bool,
    depth: usize,
    hold: bool,
    /// Completions the device may still make, shared between disks (a
    /// test steps a whole stack one completion at a time).
    budget: Option<Arc<core::sync::atomic::AtomicUsize>>,
    /// `abort` stops the device and hands back what it holds (a reset);
    /// false: it keeps its bios, as a device that cannot be stopped.
    stoppable: bool,
    /// The device asks for a reset ([`BlockDevice::failed`]).
    needs_reset: bool,
    dead: bool,
    fail_next: u32,
    fail_writes: bool,
    stats: FakeStats,
    /// The device's own view of data (a DMA engine, not a map on the path).
    dma: DataCounters,
    /// With [`FakeDiskHandle::log_unflushed`]: each write completed since
    /// the last flush, as (offset, bytes), for [`FakeDiskHandle::cut`].
    unflushed: Option<Vec<(usize, Vec<u8>)>>,
}

impl State {
    fn execute(&mut self, bio: &Bio, lease: &Lease) -> BioResult {
        if self.dead || (self.fail_writes && bio.cmd.is_write()) {
            self.stats.failed += 1;
            return Err(BioError::Io);
        }
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.stats.failed += 1;
            return Err(BioError::Io);
        }
        let (o, n) = (bio.offset as usize, bio.length as usize);
        if bio.cmd != BioCmd::Flush && o + n > self.data.len() {
            return Err(BioError::OutOfRange);
        }
        match bio.cmd {
            BioCmd::Read => {
                self.stats.reads += 1;
                let data = &self.data[o..o + n];
                bio.sg.device_access(lease, &self.dma, |at, dst| {
                    dst.copy_from_slice(&data[at as usize..at as usize + dst.len()]);
                });
            }
            BioCmd::Write => {
                self.stats.writes += 1;
                let data = &mut self.data[o..o + n];
                bio.sg.device_access(lease, &self.dma, |at, src| {
                    data[at as usize..at as usize + src.len()].copy_from_slice(src);
                });
                if let Some(log) = &mut self.unflushed {
                    log.push((o, self.data[o..o + n].to_vec()));
                }
            }
            BioCmd::Flush => {
                self.stats.flushes += 1;
                self.durable.copy_from_slice(&self.data);
                if let Some(log) = &mut self.unflushed {
                    log.clear();
                }
            }
            BioCmd::Discard | BioCmd::WriteZeroes => {
                self.stats.frees += 1;
                self.data[o..o + n].fill(0);
                if let Some(log) = &mut self.unflushed {
                    log.push((o, vec![0; n]));
                }
            }
            // The disk geom answers it; a device never sees it.
            BioCmd::GetAllocation => {}
        }
        Ok(())
    }
}

/// A memory-backed [`BlockDevice`] that completes requests later, out of
/// order, and fails them when told to.
pub struct FakeDisk {
    state: Arc<spin::Mutex<State>>,
}

/// The test's handle on a [`FakeDisk`] that was handed to the stack.
#[derive(Clone)]
pub struct FakeDiskHandle {
    state: Arc<spin::Mutex<State>>,
}

impl FakeDisk {
    /// A zeroed disk of `size_bytes` with `sector_size` sectors, flush and
    /// discard support, completing out of order with generator `seed`.
    pub fn new(size_bytes: u64, sector_size: u32, seed: u64) -> (FakeDisk, FakeDiskHandle) {
        let state = Arc::new(spin::Mutex::new(State {
            info: DiskInfo {
                size_bytes,
                sector_size,
                can_flush: true,
                can_discard: true,
                can_write_zeroes: true,
                read_only: false,
            },
            data: vec![0; size_bytes as usize],
            durable: vec![0; size_bytes as usize],
            unflushed: None,
            queue: Vec::new(),
            rng: XorShiftRng::seed_from_u64(seed),
            reorder: true,
            depth: 16,
            hold: false,
            budget: None,
            stoppable: true,
            needs_reset: false,
            dead: false,
            fail_next: 0,
            fail_writes: false,
            stats: FakeStats::default(),
            dma: DataCounters::new(),
        }));
        (
            FakeDisk {
                state: state.clone(),
            },
            FakeDiskHandle { state },
        )
    }
}

impl BlockDevice for FakeDisk {
    fn info(&self) -> DiskInfo {
        self.state.lock().info.clone()
    }

    fn submit(&mut self, bio: Bio) -> Result<(), Bio> {
        let mut st = self.state.lock();
        if st.queue.len() >= st.depth {
            return Err(bio);
        }
        let lease = bio.sg.lend();
        st.queue.push((bio, lease));
        st.stats.max_queued = st.stats.max_queued.max(st.queue.len());
        Ok(())
    }

    fn abort(&mut self, done: &mut dyn FnMut(Bio, BioResult)) {
        let back: Vec<(Bio, Result<Lease, PageBusy>)> = {
            let mut st = self.state.lock();
            st.stats.aborts += 1;
            if !st.stoppable {
                return;
            }
            st.queue.drain(..).collect()
        };
        for (bio, lease) in back {
            // Reset: the device touches the pages no more.
            if let Ok(lease) = lease {
                bio.sg.give_back(lease);
            }
            done(bio, Err(BioError::Io));
        }
    }

    fn failed(&self) -> Option<&str> {
        self.state
            .lock()
            .needs_reset
            .then_some("the device needs a reset")
    }

    fn poll(&mut self, done: &mut dyn FnMut(Bio, BioResult)) -> usize {
        let mut finished = Vec::new();
        {
            let mut st = self.state.lock();
            if st.hold || st.queue.is_empty() {
                return 0;
            }
            let n = if st.reorder {
                1 + (st.rng.next_u32() as usize) % st.queue.len()
            } else {
                st.queue.len()
            };
            for _ in 0..n {
                if let Some(b) = &st.budget {
                    use core::sync::atomic::Ordering::SeqCst;
                    if b.fetch_update(SeqCst, SeqCst, |v| v.checked_sub(1))
                        .is_err()
                    {
                        break;
                    }
                }
                let i = if st.reorder {
                    (st.rng.next_u32() as usize) % st.queue.len()
                } else {
                    0
                };
                let (bio, lease) = st.queue.remove(i);
                let r = match lease {
                    Ok(lease) => {
                        let r = st.execute(&bio, &lease);
                        bio.sg.give_back(lease);
                        r
                    }
                    // Pages the CPU had mapped when they were submitted.
                    Err(e) => Err(e.into()),
                };
                finished.push((bio, r));
            }
        }
        let n = finished.len();
        for (bio, r) in finished {
            done(bio, r);
        }
        n
    }
}

impl FakeDiskHandle {
    /// What reads see now.
    pub fn contents(&self) -> Vec<u8> {
        self.state.lock().data.clone()
    }

    /// What the last FLUSH made stable.
    pub fn durable(&self) -> Vec<u8> {
        self.state.lock().durable.clone()
    }

    /// Writes bytes straight onto the medium, stable at once (setting up
    /// a test).
    pub fn write_at(&self, offset: u64, bytes: &[u8]) {
        let mut st = self.state.lock();
        let o = offset as usize;
        st.data[o..o + bytes.len()].copy_from_slice(bytes);
        st.durable[o..o + bytes.len()].copy_from_slice(bytes);
    }

    /// Records each write completed after the last flush, for
    /// [`FakeDiskHandle::cut`].
    pub fn log_unflushed(&self) {
        self.state.lock().unflushed = Some(Vec::new());
    }

    /// The medium after a power cut that kept, of the writes completed
    /// since the last flush (with [`FakeDiskHandle::log_unflushed`]), those
    /// `keep` picks by their order: a cache that writes back in any order.
    pub fn cut(&self, keep: &dyn Fn(usize) -> bool) -> Vec<u8> {
        let st = self.state.lock();
        let mut img = st.durable.clone();
        for (i, (o, bytes)) in st.unflushed.iter().flatten().enumerate() {
            if keep(i) {
                img[*o..*o + bytes.len()].copy_from_slice(bytes);
            }
        }
        img
    }

    /// What the disk has done.
    pub fn stats(&self) -> FakeStats {
        self.state.lock().stats.clone()
    }

    /// Requests waiting in the device.
    pub fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Makes every request fail with EIO (true) or work again (false).
    pub fn set_dead(&self, dead: bool) {
        self.state.lock().dead = dead;
    }

    /// Makes every write fail with EIO (true) or work again (false).
    pub fn set_fail_writes(&self, fail: bool) {
        self.state.lock().fail_writes = fail;
    }

    /// Fails the next `n` requests with EIO.
    pub fn fail_next(&self, n: u32) {
        self.state.lock().fail_next = n;
    }

    /// Lets the device complete only as many requests as `budget` holds
    /// (shared by every disk given the same counter; each completion takes
    /// one), or any number (`None`).
    pub fn set_budget(&self, budget: Option<Arc<core::sync::atomic::AtomicUsize>>) {
        self.state.lock().budget = budget;
    }

    /// Holds completions back (true) until released (false).
    pub fn hold(&self, hold: bool) {
        self.state.lock().hold = hold;
    }

    /// Lets `abort` stop the device and take back its bios (true, the
    /// default) or not (false: it keeps them until it completes them).
    pub fn set_stoppable(&self, stoppable: bool) {
        self.state.lock().stoppable = stoppable;
    }

    /// Makes the device report that it needs a reset.
    pub fn set_needs_reset(&self, needs: bool) {
        self.state.lock().needs_reset = needs;
    }

    /// Completes in submission order (false) or out of order (true).
    pub fn set_reorder(&self, reorder: bool) {
        self.state.lock().reorder = reorder;
    }

    /// Sets the device queue depth (the disk geom parks what does not fit).
    pub fn set_depth(&self, depth: usize) {
        self.state.lock().depth = depth.max(1);
    }

    /// Bytes the fake itself mapped (its stand-in for DMA).
    pub fn dma_bytes(&self) -> u64 {
        self.state.lock().dma.bytes_mapped()
    }
}

/// A stack with `n` fake disks vtbd0… of `size_bytes` and `sector_size`.
pub fn stack_with_disks(
    n: usize,
    size_bytes: u64,
    sector_size: u32,
) -> (Stack, Vec<FakeDiskHandle>) {
    let mut s = Stack::new();
    let mut handles = Vec::new();
    for i in 0..n {
        let (d, h) = FakeDisk::new(size_bytes, sector_size, 0x1000 + i as u64);
        DiskGeom::create(&mut s, &vtbd_name(i), Box::new(d)).expect("fresh disk name");
        handles.push(h);
    }
    (s, handles)
}

/// The last sector a config `line` (`mirror label x vtbd0`) writes on
/// vtbd0 of `size_bytes`: a genuine label, as a client of a raw export
/// could forge one.
pub fn label_sector(line: &str, size_bytes: u64, sector_size: u32) -> Vec<u8> {
    let (mut s, h) = stack_with_disks(1, size_bytes, sector_size);
    let stmt = crate::config::parse_line(line, 1)
        .expect("a valid line")
        .expect("a statement");
    crate::ctl::apply(&mut s, &stmt).expect("the line applies");
    assert!(s.settle(MAX_ROUNDS as u32), "labelling settles");
    let img = h[0].contents();
    img[img.len() - sector_size as usize..].to_vec()
}

/// A stack whose disks vtbd0… start with the given images.
pub fn stack_from_images(images: &[Vec<u8>], sector_size: u32) -> (Stack, Vec<FakeDiskHandle>) {
    let mut s = Stack::new();
    let mut handles = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let (d, h) = FakeDisk::new(img.len() as u64, sector_size, 0x2000 + i as u64);
        h.write_at(0, img);
        DiskGeom::create(&mut s, &vtbd_name(i), Box::new(d)).expect("fresh disk name");
        handles.push(h);
    }
    (s, handles)
}

/// Runs the stack until an external completion appears; panics if none
/// does within [`MAX_ROUNDS`] rounds and 10 s (a hang is a bug; a device
/// that completes on threads of its own may need the time on a loaded
/// machine).
pub fn wait(stack: &mut Stack) -> (u64, Bio, BioResult) {
    let start = std::time::Instant::now();
    let mut rounds = 0usize;
    loop {
        if let Some(c) = stack.take_completed() {
            return c;
        }
        if !stack.run() {
            std::thread::yield_now();
        }
        rounds += 1;
        if rounds >= MAX_ROUNDS && start.elapsed() > std::time::Duration::from_secs(10) {
            panic!("no completion after {rounds} rounds and 10 s: the stack hangs");
        }
    }
}

/// Runs the stack until `n` completions came back; returns them by tag.
pub fn wait_all(stack: &mut Stack, n: usize) -> Vec<(u64, Bio, BioResult)> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(wait(stack));
    }
    out.sort_by_key(|c| c.0);
    out
}

/// Client-side counters for test data (kept apart from the stack's).
fn client() -> DataCounters {
    DataCounters::new()
}

/// A write bio carrying `data`.
pub fn write_bio(offset: u64, data: &[u8]) -> Bio {
    Bio::with_data(BioCmd::Write, offset, SgList::from_bytes(data, &client()))
}

/// The bytes a completed read carries.
pub fn bio_bytes(bio: &Bio) -> Vec<u8> {
    let mut out = vec![0; bio.length as usize];
    bio.sg
        .copy_to_slice(0, &mut out, &client())
        .expect("a completed bio's pages are free");
    out
}

/// Runs one bio to completion.
pub fn io(stack: &mut Stack, c: ConsumerId, bio: Bio) -> (Bio, BioResult) {
    stack.submit(c, bio, u64::MAX);
    let (tag, bio, r) = wait(stack);
    assert_eq!(tag, u64::MAX, "a completion of another request came back");
    (bio, r)
}

/// Writes `data` at `offset` and waits.
pub fn write(stack: &mut Stack, c: ConsumerId, offset: u64, data: &[u8]) -> BioResult {
    io(stack, c, write_bio(offset, data)).1
}

/// Reads `len` bytes at `offset` and waits.
pub fn read(
    stack: &mut Stack,
    c: ConsumerId,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, BioError> {
    let (bio, r) = io(stack, c, Bio::read(offset, len as u64));
    r.map(|_| bio_bytes(&bio))
}

/// Flushes and waits.
pub fn flush(stack: &mut Stack, c: ConsumerId) -> BioResult {
    io(stack, c, Bio::flush()).1
}

/// One step of a model-based test, in sectors.
#[derive(Clone, Debug)]
pub enum Op {
    /// Read `len` sectors at `at`.
    Read {
        /// First sector.
        at: u64,
        /// Sectors.
        len: u64,
    },
    /// Write `len` sectors at `at` with a pattern made from `seed`.
    Write {
        /// First sector.
        at: u64,
        /// Sectors.
        len: u64,
        /// Pattern seed.
        seed: u8,
    },
    /// Flush.
    Flush,
    /// Discard `len` sectors at `at` (the fake disks and md then read
    /// zeroes there).
    Discard {
        /// First sector.
        at: u64,
        /// Sectors.
        len: u64,
    },
    /// Write zeroes over `len` sectors at `at`.
    WriteZeroes {
        /// First sector.
        at: u64,
        /// Sectors.
        len: u64,
    },
    /// A flush sent in the same batch as other requests, so it races the
    /// writes still in flight (it promises nothing about them).
    RacingFlush,
}

impl Op {
    /// The same step moved inside a device of `sectors` sectors (at least
    /// one sector long), so random steps always hit the device.
    pub fn clip(&self, sectors: u64) -> Op {
        match *self {
            Op::Read { at, len } => {
                let at = at % sectors;
                Op::Read {
                    at,
                    len: len.clamp(1, sectors - at),
                }
            }
            Op::Write { at, len, seed } => {
                let at = at % sectors;
                Op::Write {
                    at,
                    len: len.clamp(1, sectors - at),
                    seed,
                }
            }
            Op::Flush => Op::Flush,
            Op::Discard { at, len } => {
                let at = at % sectors;
                Op::Discard {
                    at,
                    len: len.clamp(1, sectors - at),
                }
            }
            Op::WriteZeroes { at, len } => {
                let at = at % sectors;
                Op::WriteZeroes {
                    at,
                    len: len.clamp(1, sectors - at),
                }
            }
            Op::RacingFlush => Op::RacingFlush,
        }
    }

    /// The byte range the step touches, for a device of `sector`-byte
    /// sectors (`None` for flushes).
    pub fn range(&self, sector: u64) -> Option<(u64, u64)> {
        match *self {
            Op::Read { at, len }
            | Op::Write { at, len, .. }
            | Op::Discard { at, len }
            | Op::WriteZeroes { at, len } => Some((at * sector, (at + len) * sector)),
            Op::Flush | Op::RacingFlush => None,
        }
    }

    /// True for steps that change data (writes, discards, write-zeroes).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. }
        )
    }

    /// The bio for the step on a device of `sector`-byte sectors.
    pub fn bio(&self, sector: u64) -> Bio {
        match *self {
            Op::Read { at, len } => Bio::read(at * sector, len * sector),
            Op::Write { at, len, seed } => write_bio(
                at * sector,
                &pattern(seed, at * sector, (len * sector) as usize),
            ),
            Op::Discard { at, len } => Bio::no_data(BioCmd::Discard, at * sector, len * sector),
            Op::WriteZeroes { at, len } => {
                Bio::no_data(BioCmd::WriteZeroes, at * sector, len * sector)
            }
            Op::Flush | Op::RacingFlush => Bio::flush(),
        }
    }

    /// What a step that changes data leaves in `[s, e)` of the model.
    pub fn apply(&self, model: &mut [u8], sector: u64) {
        let Some((s, e)) = self.range(sector) else {
            return;
        };
        let (s, e) = (s as usize, e as usize);
        match *self {
            Op::Write { seed, .. } => {
                model[s..e].copy_from_slice(&pattern(seed, s as u64, e - s));
            }
            Op::Discard { .. } | Op::WriteZeroes { .. } => model[s..e].fill(0),
            _ => {}
        }
    }
}

/// The bytes a [`Op::Write`] carries.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x =
                (offset + i).wrapping_mul(0x9e37_79b9) ^ u64::from(seed).wrapping_mul(0x85eb_ca6b);
            (x >> 7) as u8
        })
        .collect()
}

/// Runs `ops` against the provider behind `c` and against a flat byte
/// array, and checks every read against the array. Ops are issued in
/// batches of up to four at once; a batch never holds a write that
/// overlaps another op of the batch, so the model's order is the only
/// possible one. After each flush every disk in `disks` must have made
/// everything it holds durable (the flush reached them all); a racing
/// flush (sent with the other requests of its batch) must succeed.
pub fn run_model(stack: &mut Stack, c: ConsumerId, ops: &[Op], disks: &[FakeDiskHandle]) {
    let p = stack.consumer_provider(c);
    let size = stack.provider(p).spec.media_size;
    let sector = u64::from(stack.provider(p).spec.sector_size);
    let mut model = vec![0u8; size as usize];
    // Start from what the provider holds.
    let mut at = 0;
    while at < size {
        let n = (size - at).min(1 << 20);
        let got = read(stack, c, at, n as usize).expect("initial read");
        model[at as usize..(at + n) as usize].copy_from_slice(&got);
        at += n;
    }
    let ops: Vec<Op> = ops.iter().map(|op| op.clip(size / sector)).collect();
    let mut i = 0;
    while i < ops.len() {
        let mut batch: Vec<&Op> = Vec::new();
        while i < ops.len() && batch.len() < 4 {
            let op = &ops[i];
            if matches!(op, Op::Flush) {
                if batch.is_empty() {
                    batch.push(op);
                    i += 1;
                }
                break;
            }
            if matches!(op, Op::RacingFlush) {
                batch.push(op);
                i += 1;
                continue;
            }
            let (s, e) = op.range(sector).expect("data op");
            let clash = batch.iter().any(|b| {
                b.range(sector)
                    .is_some_and(|(bs, be)| (b.is_write() || op.is_write()) && s < be && bs < e)
            });
            if clash {
                break;
            }
            batch.push(op);
            i += 1;
        }
        for (tag, op) in batch.iter().enumerate() {
            stack.submit(c, op.bio(sector), tag as u64);
        }
        for (tag, bio, r) in wait_all(stack, batch.len()) {
            let op = batch[tag as usize];
            assert_eq!(r, Ok(()), "{op:?} failed");
            match *op {
                Op::Read { at, len } => {
                    let (s, e) = ((at * sector) as usize, ((at + len) * sector) as usize);
                    assert!(
                        bio_bytes(&bio) == model[s..e],
                        "read {at}+{len} differs from the model"
                    );
                }
                Op::Flush => {
                    for d in disks {
                        assert!(d.durable() == d.contents(), "a flush did not reach a disk");
                    }
                }
                _ => op.apply(&mut model, sector),
            }
        }
    }
}

/// A proptest strategy of reads, writes, flushes and racing flushes over
/// `sectors` sectors, each op at most `max_len` sectors (for classes that
/// do not discard: eli, gbde).
#[cfg(test)]
pub fn ops_rw(
    sectors: u64,
    max_len: u64,
    n: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        4 => (0..sectors, 1..=max_len).prop_map(|(at, len)| Op::Read { at, len }),
        4 => (0..sectors, 1..=max_len, any::<u8>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        1 => Just(Op::Flush),
        1 => Just(Op::RacingFlush),
    ];
    proptest::collection::vec(op, 1..n)
}

/// A proptest strategy for ops over a provider of up to `sectors` sectors,
/// each op at most `max_len` sectors: reads, writes, flushes, discards,
/// write-zeroes and flushes racing the requests of their batch (every
/// class's model test uses it; the fake disks and md read zeroes after a
/// discard).
#[cfg(test)]
pub fn ops_all(
    sectors: u64,
    max_len: u64,
    n: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        4 => (0..sectors, 1..=max_len).prop_map(|(at, len)| Op::Read { at, len }),
        4 => (0..sectors, 1..=max_len, any::<u8>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        1 => (0..sectors, 1..=max_len).prop_map(|(at, len)| Op::Discard { at, len }),
        1 => (0..sectors, 1..=max_len).prop_map(|(at, len)| Op::WriteZeroes { at, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::RacingFlush),
    ];
    proptest::collection::vec(op, 1..n)
}

/// One step of a crash-point sequence (see [`run_to_cut`]).
#[derive(Clone, Copy, Debug)]
pub enum CrashStep {
    /// Write `len` bytes of [`pattern`]`(seed, at, len)` at `at`.
    Write {
        /// Byte offset.
        at: u64,
        /// Bytes.
        len: u64,
        /// Pattern seed.
        seed: u8,
        /// Forced unit access.
        fua: bool,
    },
    /// A flush.
    Flush,
}

/// What each sector may hold after a cut, from what was acknowledged.
pub struct Expect {
    /// Per sector: every value a write could have left (the first is the
    /// value before the sequence).
    pub may: Vec<Vec<Vec<u8>>>,
    /// Per sector: the oldest entry of `may` it may hold: that of a write
    /// acknowledged and made stable by a later acknowledged flush (or by
    /// FUA); a later write may have replaced it.
    pub must: Vec<usize>,
}

impl Expect {
    /// Panics, naming `what`, if a sector of `got` holds what nobody
    /// wrote or lost an acknowledged write.
    pub fn check(&self, got: &[u8], what: &str) {
        for (i, may) in self.may.iter().enumerate() {
            let s = &got[i * 512..(i + 1) * 512];
            assert!(
                may.iter().any(|v| v == s),
                "{what}: sector {i} holds what nobody wrote"
            );
            assert!(
                may[self.must[i]..].iter().any(|v| v == s),
                "{what}: sector {i} lost an acknowledged write"
            );
        }
    }
}

/// The provider under test, opened: its consumer and every byte it held
/// before the sequence.
pub type Opened = (ConsumerId, Vec<u8>);

/// Which of the writes a disk had not flushed survive a power cut.
#[derive(Clone, Copy, Debug)]
pub enum Survivors {
    /// None of them.
    None,
    /// All of them.
    All,
    /// Each kept or lost by a generator seeded with this.
    Some(u64),
}

/// Runs `steps` one at a time on a fresh copy of the disk images `base`,
/// letting the disks complete only `cut` requests in all, and returns the
/// disks' images as a power cut leaves them (`keep`: which of the writes
/// they had not flushed survive), what the sectors may hold, and whether
/// the sequence finished. `open` assembles the stack and opens the provider
/// under test; `tick` runs before each step.
pub fn run_to_cut(
    base: &[Vec<u8>],
    open: &mut dyn FnMut(&mut Stack, &[FakeDiskHandle]) -> Opened,
    tick: &mut dyn FnMut(&mut Stack),
    steps: &[CrashStep],
    cut: usize,
    keep: Survivors,
) -> (Vec<Vec<u8>>, Expect, bool) {
    use core::sync::atomic::{AtomicUsize, Ordering};
    let (mut s, disks) = stack_from_images(base, 512);
    let (c, before) = open(&mut s, &disks);
    for d in &disks {
        d.log_unflushed();
    }
    let budget = Arc::new(AtomicUsize::new(cut));
    for d in &disks {
        d.set_budget(Some(budget.clone()));
    }
    let sectors = before.len() / 512;
    let mut may: Vec<Vec<Vec<u8>>> = (0..sectors)
        .map(|i| vec![before[i * 512..(i + 1) * 512].to_vec()])
        .collect();
    let mut acked: Vec<Option<usize>> = vec![None; sectors];
    let mut must: Vec<usize> = vec![0; sectors];
    let mut finished = true;
    for step in steps {
        let bio = match *step {
            CrashStep::Write { at, len, seed, fua } => {
                let data = pattern(seed, at, len as usize);
                for i in (at / 512) as usize..((at + len) / 512) as usize {
                    let o = i * 512 - at as usize;
                    may[i].push(data[o..o + 512].to_vec());
                    // Not acknowledged yet: the sector may hold either.
                    acked[i] = None;
                }
                let mut b = write_bio(at, &data);
                b.fua = fua;
                b
            }
            CrashStep::Flush => Bio::flush(),
        };
        tick(&mut s);
        s.submit(c, bio, 0);
        let done = loop {
            s.run();
            if let Some((_, bio, r)) = s.take_completed() {
                break Some((bio, r));
            }
            if budget.load(Ordering::SeqCst) == 0 {
                break None;
            }
        };
        let Some((bio, r)) = done else {
            finished = false;
            break;
        };
        assert_eq!(r, Ok(()), "{step:?}");
        match *step {
            CrashStep::Write { at, len, fua, .. } => {
                for i in (at / 512) as usize..((at + len) / 512) as usize {
                    let v = &bio_bytes(&bio)[i * 512 - at as usize..][..512];
                    let j = may[i].iter().rposition(|x| x == v).expect("written");
                    if fua {
                        must[i] = j;
                    }
                    acked[i] = Some(j);
                }
            }
            CrashStep::Flush => {
                for i in 0..sectors {
                    if let Some(j) = acked[i].take() {
                        must[i] = j;
                    }
                }
            }
        }
    }
    let images = disks
        .iter()
        .enumerate()
        .map(|(n, d)| match keep {
            Survivors::None => d.durable(),
            Survivors::All => d.contents(),
            Survivors::Some(seed) => {
                let salt = seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                d.cut(&|i| {
                    (salt ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9))
                        .wrapping_mul(0x94d0_49bb_1331_11eb)
                        >> 63
                        == 1
                })
            }
        })
        .collect();
    (images, Expect { may, must }, finished)
}
