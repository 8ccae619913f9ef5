//! The disk class: one provider per block device (vtbd0, vtbd1, …).
//!
//! A [`BlockDevice`] is what platform code implements: the virtio-blk
//! driver in the appliance, a file in the hosted build, a fake in tests.
//! The disk geom passes bios to it untouched (it never maps data), parks
//! them when the device queue is full, and turns a write with FUA into a
//! write followed by a flush, since virtio-blk has no FUA bit. It answers
//! GET_ALLOCATION itself from [`BlockDevice::allocation`].
//!
//! A device that fails [`DEFAULT_ERROR_LIMIT`] requests in a row, or as
//! many writes in a row whatever its reads do, is taken for dead: the disk
//! geom orphans its provider, and the failure travels up the stack as
//! orphan events (bios in flight still complete).
//!
//! **Deadlines.** Every bio that reaches the disk geom has a deadline on
//! the stack's clock ([`crate::stack::Stack::set_bio_deadline_ms`],
//! default [`DEFAULT_BIO_DEADLINE_MS`]; until the device has answered once,
//! at most [`TASTE_DEADLINE_MS`], so tasting a hung disk at boot gives up
//! sooner). When one passes, the disk gives up on the device: it asks the
//! device to stop ([`BlockDevice::abort`]), fails that bio and every other
//! outstanding one with EIO, and orphans its provider, so a mirror drops
//! the member and goes on with the others. Pages the device may still
//! write into stay lent to it (so nothing maps, reuses or frees them)
//! until it really returns them; a bio the device keeps after `abort`
//! goes up with EIO when it does hand it back.
//! A device that reports itself failed ([`BlockDevice::failed`]: a virtio
//! device that needs a reset) is orphaned the same way.
//!
//! A failed FLUSH stays failed: the data it was to make stable may be gone
//! (a host file system that failed `fdatasync` has dropped the dirty pages),
//! so every later FLUSH on the disk fails too, until the disk is orphaned
//! or attached anew. A later success must never tell a client that writes
//! acknowledged before the failure are safe.

use crate::bio::{Bio, BioCmd, BioError, BioResult, ProviderId};
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use hashbrown::HashMap;

/// What a block device reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Capacity in bytes.
    pub size_bytes: u64,
    /// Logical sector size in bytes.
    pub sector_size: u32,
    /// The device has a volatile cache that FLUSH makes stable.
    pub can_flush: bool,
    /// The device accepts DISCARD.
    pub can_discard: bool,
    /// The device accepts WRITE_ZEROES.
    pub can_write_zeroes: bool,
    /// The device refuses writes.
    pub read_only: bool,
}

/// A device that executes bios asynchronously.
///
/// `submit` never completes a bio itself: every accepted bio, even one that
/// fails at once, comes back through a later [`BlockDevice::poll`].
pub trait BlockDevice {
    /// The device's geometry and abilities.
    fn info(&self) -> DiskInfo;

    /// Queues a bio. When the device queue is full the bio is handed back
    /// in `Err` and the caller retries after the next completion.
    #[allow(
        clippy::result_large_err,
        reason = "a refused bio comes back whole, by value, to be retried"
    )]
    fn submit(&mut self, bio: Bio) -> Result<(), Bio>;

    /// Hands every completed bio to `done`; returns how many there were.
    fn poll(&mut self, done: &mut dyn FnMut(Bio, BioResult)) -> usize;

    /// The disk gave up on the device (a bio passed its deadline): hand
    /// bios back to `done`, each only once the device can no longer touch
    /// its pages, or with those pages kept lent by the device until it
    /// really returns them (a driver that cannot reset without waiting for
    /// the hung backend). A bio not handed back here stays the device's
    /// and comes back through [`BlockDevice::poll`] when it really
    /// completes. The default gives nothing back.
    fn abort(&mut self, done: &mut dyn FnMut(Bio, BioResult)) {
        let _ = done;
    }

    /// Why the device can no longer be used (it asked for a reset), once
    /// it has failed: the disk then orphans its provider. The default
    /// never fails.
    fn failed(&self) -> Option<&str> {
        None
    }

    /// Which parts of `[offset, offset + length)` hold data, as consecutive
    /// runs from `offset` on (at most [`crate::bio::MAX_EXTENTS`]), for
    /// [`BioCmd::GetAllocation`]; answered at once. The default knows
    /// nothing: every byte counts as data.
    fn allocation(&mut self, offset: u64, length: u64) -> alloc::vec::Vec<crate::bio::Extent> {
        let _ = (offset, length);
        alloc::vec::Vec::new()
    }
}

/// Marks a flush the disk geom issued itself to make a FUA write stable
/// (the parked write is keyed by the flush's sequence number).
const FUA_FLUSH: u64 = 1 << 63;
/// Marks a write whose completion must be followed by a flush.
const FUA_WRITE: u64 = 1 << 62;
/// The low bits of a bio's scratch word: its sequence number on the disk.
const SEQ_MASK: u64 = (1 << 48) - 1;

/// How long a bio may stay at a disk when the platform sets nothing.
pub const DEFAULT_BIO_DEADLINE_MS: u64 = 30_000;

/// The most a bio may take before the device has answered anything (the
/// boot's taste reads): a disk that hangs from the start holds the boot
/// no longer than this.
pub const TASTE_DEADLINE_MS: u64 = 10_000;

/// Consecutive I/O errors after which a disk's provider is orphaned.
pub const DEFAULT_ERROR_LIMIT: u32 = 8;

/// The geom of one block device.
pub struct DiskGeom {
    dev: Box<dyn BlockDevice>,
    info: DiskInfo,
    provider: ProviderId,
    waiting: VecDeque<Bio>,
    /// Completions taken from the device, kept to save an allocation per
    /// poll.
    finished: alloc::vec::Vec<(Bio, BioResult)>,
    fua_parked: HashMap<u64, Bio>,
    error_limit: u32,
    errors_in_a_row: u32,
    /// Write errors since the last successful write.
    write_errors_in_a_row: u32,
    /// A flush failed: every later flush fails.
    flush_failed: bool,
    errors_total: u64,
    /// Deadlines of outstanding bios, by sequence number from `first_seq`
    /// on (`None`: completed). Deadlines grow with the sequence number, so
    /// the first entry is the earliest.
    deadlines: VecDeque<Option<u64>>,
    first_seq: u64,
    /// The device completed a bio at least once.
    answered: bool,
    /// Why the disk gave up on its device.
    failure: Option<String>,
}

impl DiskGeom {
    /// Creates the disk geom and its provider `name` in `stack`.
    pub fn create(
        stack: &mut Stack,
        name: &str,
        dev: Box<dyn BlockDevice>,
    ) -> Result<ProviderId, StackError> {
        DiskGeom::create_with_limit(stack, name, dev, DEFAULT_ERROR_LIMIT)
    }

    /// [`DiskGeom::create`] with the number of consecutive I/O errors after
    /// which the provider is orphaned (0: never).
    pub fn create_with_limit(
        stack: &mut Stack,
        name: &str,
        dev: Box<dyn BlockDevice>,
        error_limit: u32,
    ) -> Result<ProviderId, StackError> {
        let info = dev.info();
        let g = stack.reserve_geom("disk", name);
        let mut spec = ProviderSpec::new(name, info.size_bytes, info.sector_size);
        // A device without a volatile cache needs no flush: it is accepted
        // and completed at once.
        spec.can_flush = true;
        spec.can_discard = info.can_discard;
        spec.can_write_zeroes = info.can_write_zeroes;
        let p = match stack.add_provider(g, spec) {
            Ok(p) => p,
            Err(e) => {
                stack.abandon(g);
                return Err(e);
            }
        };
        stack.install(
            g,
            Box::new(DiskGeom {
                dev,
                info,
                provider: p,
                waiting: VecDeque::new(),
                finished: alloc::vec::Vec::new(),
                fua_parked: HashMap::new(),
                error_limit,
                errors_in_a_row: 0,
                write_errors_in_a_row: 0,
                flush_failed: false,
                errors_total: 0,
                deadlines: VecDeque::new(),
                first_seq: 0,
                answered: false,
                failure: None,
            }),
        );
        Ok(p)
    }

    /// Gives `bio` the next sequence number and a deadline, keeping its
    /// flag bits.
    fn track(&mut self, io: &Io<'_>, bio: &mut Bio) {
        let seq = self.first_seq + self.deadlines.len() as u64;
        let mut limit = io.bio_deadline_ns();
        if !self.answered && limit > 0 {
            limit = limit.min(TASTE_DEADLINE_MS * 1_000_000);
        }
        let deadline = (io.has_clock() && limit > 0).then(|| io.now_ns().saturating_add(limit));
        // A bio without a deadline still takes a slot (as completed), so
        // sequence numbers stay consecutive.
        self.deadlines.push_back(deadline);
        bio.scratch = (bio.scratch & !SEQ_MASK) | (seq & SEQ_MASK);
    }

    /// Marks the bio with sequence bits `seq` as no longer outstanding.
    fn untrack(&mut self, seq: u64) {
        let base = self.first_seq & SEQ_MASK;
        let i = seq.wrapping_sub(base) & SEQ_MASK;
        if let Some(slot) = self.deadlines.get_mut(i as usize) {
            *slot = None;
        }
        while let Some(None) = self.deadlines.front() {
            self.deadlines.pop_front();
            self.first_seq += 1;
        }
    }

    /// The earliest deadline of a bio still outstanding.
    fn earliest(&self) -> Option<u64> {
        // Leading `None`s are bios tracked before the stack had a clock.
        self.deadlines.iter().flatten().next().copied()
    }

    /// Gives up on the device: stops it, fails every outstanding bio with
    /// EIO and orphans the provider.
    fn give_up(&mut self, io: &mut Io<'_>, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
        let mut back = alloc::vec::Vec::new();
        self.dev.abort(&mut |bio, _| back.push(bio));
        back.extend(self.waiting.drain(..));
        for bio in back {
            self.finish(io, bio, Err(BioError::Io));
        }
        // Bios the device kept are forgotten here; they go up with EIO if
        // the device ever hands them back.
        self.first_seq += self.deadlines.len() as u64;
        self.deadlines.clear();
        io.orphan_provider(self.provider);
    }

    /// Sends a completed bio up, or on to its FUA flush.
    fn finish(&mut self, io: &mut Io<'_>, mut bio: Bio, result: BioResult) {
        if bio.scratch & FUA_FLUSH != 0 {
            let key = bio.scratch & SEQ_MASK;
            if let Some(mut write) = self.fua_parked.remove(&key) {
                write.scratch = 0;
                io.deliver(write, result);
            }
        } else if bio.scratch & FUA_WRITE != 0 && result.is_ok() {
            let mut flush = Bio::flush();
            flush.scratch = FUA_FLUSH;
            self.track(io, &mut flush);
            self.fua_parked.insert(flush.scratch & SEQ_MASK, bio);
            self.send(flush);
        } else {
            bio.scratch = 0;
            io.deliver(bio, result);
        }
    }

    fn send(&mut self, bio: Bio) {
        if !self.waiting.is_empty() {
            self.waiting.push_back(bio);
            return;
        }
        if let Err(bio) = self.dev.submit(bio) {
            self.waiting.push_back(bio);
        }
    }

    /// Counts device errors; too many in a row (or too many writes in a
    /// row) orphan the provider. A failed flush is remembered.
    fn note(&mut self, io: &mut Io<'_>, cmd: BioCmd, result: BioResult) {
        if cmd == BioCmd::Flush && result.is_err() {
            self.flush_failed = true;
        }
        match result {
            Ok(()) => {
                self.errors_in_a_row = 0;
                if cmd.is_write() {
                    self.write_errors_in_a_row = 0;
                }
            }
            Err(BioError::Io | BioError::NoSpace) => {
                self.errors_in_a_row += 1;
                self.errors_total += 1;
                if cmd.is_write() {
                    self.write_errors_in_a_row += 1;
                }
                let limit = self.error_limit;
                if limit > 0
                    && (self.errors_in_a_row >= limit || self.write_errors_in_a_row >= limit)
                {
                    io.orphan_provider(self.provider);
                }
            }
            Err(_) => {}
        }
    }

    fn retry_waiting(&mut self) {
        while let Some(bio) = self.waiting.pop_front() {
            if let Err(bio) = self.dev.submit(bio) {
                self.waiting.push_front(bio);
                break;
            }
        }
    }
}

impl Geom for DiskGeom {
    fn class_name(&self) -> &'static str {
        "disk"
    }

    fn start(&mut self, io: &mut Io<'_>, _provider: ProviderId, mut bio: Bio) {
        if bio.cmd.is_write() && self.info.read_only {
            io.deliver(bio, Err(BioError::Access));
            return;
        }
        if bio.cmd == BioCmd::Flush && !self.info.can_flush {
            io.deliver(bio, Ok(()));
            return;
        }
        if self.flush_failed && (bio.cmd == BioCmd::Flush || (bio.fua && bio.cmd.is_write())) {
            // What an earlier flush lost cannot be made stable now.
            io.deliver(bio, Err(BioError::Io));
            return;
        }
        if bio.cmd == BioCmd::GetAllocation {
            bio.extents = self.dev.allocation(bio.offset, bio.length);
            io.deliver(bio, Ok(()));
            return;
        }
        if self.failure.is_some() {
            io.deliver(bio, Err(BioError::Io));
            return;
        }
        bio.scratch = if bio.fua && bio.cmd.is_write() && self.info.can_flush {
            FUA_WRITE
        } else {
            0
        };
        self.track(io, &mut bio);
        self.send(bio);
    }

    fn wants_poll(&self) -> bool {
        true
    }

    fn poll(&mut self, io: &mut Io<'_>) -> bool {
        let mut finished = core::mem::take(&mut self.finished);
        let n = self
            .dev
            .poll(&mut |bio, result| finished.push((bio, result)));
        for (bio, mut result) in finished.drain(..) {
            if self.failure.is_some() {
                // The disk gave up on the device: whatever comes back now
                // has been counted as failed.
                result = Err(BioError::Io);
            } else {
                self.answered = true;
                self.untrack(bio.scratch & SEQ_MASK);
                self.note(io, bio.cmd, result);
            }
            if bio.cmd == BioCmd::Flush && self.flush_failed {
                result = result.and(Err(BioError::Io));
            }
            self.finish(io, bio, result);
        }
        self.finished = finished;
        if self.failure.is_none() {
            if let Some(why) = self.dev.failed() {
                let why = String::from(why);
                self.give_up(io, why);
            } else if let Some(d) = self.earliest() {
                if io.has_clock() && io.now_ns() >= d {
                    let ms = io.bio_deadline_ns() / 1_000_000;
                    let why = if self.answered {
                        alloc::format!("a request took longer than {ms} ms")
                    } else {
                        alloc::format!(
                            "a request took longer than {} ms before the device ever answered",
                            ms.min(TASTE_DEADLINE_MS)
                        )
                    };
                    self.give_up(io, why);
                    return true;
                }
            }
        }
        self.retry_waiting();
        n > 0
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        self.earliest()
    }

    fn dumpconf(&self) -> serde_json::Value {
        serde_json::json!({
            "read_only": self.info.read_only,
            "errors": self.errors_total,
            "errors_in_a_row": self.errors_in_a_row,
            "write_errors_in_a_row": self.write_errors_in_a_row,
            "flush_failed": self.flush_failed,
            "error_limit": self.error_limit,
            "queued": self.waiting.len(),
            "outstanding": self.deadlines.iter().filter(|d| d.is_some()).count(),
            "failed": self.failure,
        })
    }
}

/// A device name for the n-th virtio disk, as FreeBSD names them.
pub fn vtbd_name(n: usize) -> String {
    alloc::format!("vtbd{n}")
}

#[cfg(test)]
mod tests {
    use crate::bio::{Bio, BioError};
    use crate::stack::Access;
    use crate::testing::{self, write_bio};

    #[test]
    fn a_failed_flush_stays_failed() {
        let (mut s, disks) = testing::stack_with_disks(1, 1 << 20, 512);
        let c = s.open("vtbd0", Access::READ_WRITE).unwrap();
        testing::write(&mut s, c, 0, &[1; 4096]).unwrap();
        disks[0].fail_next(1);
        assert_eq!(testing::flush(&mut s, c), Err(BioError::Io));
        // The device works again, but what the failed flush was to make
        // stable may be gone: later flushes, and FUA writes, fail too.
        testing::write(&mut s, c, 4096, &[2; 4096]).unwrap();
        assert_eq!(testing::flush(&mut s, c), Err(BioError::Io));
        let mut fua = write_bio(8192, &[3; 4096]);
        fua.fua = true;
        assert_eq!(testing::io(&mut s, c, fua).1, Err(BioError::Io));
        // Reads and plain writes still work.
        assert_eq!(testing::read(&mut s, c, 0, 4096).unwrap(), [1; 4096]);
        let g = s.find_geom("disk", "vtbd0").unwrap();
        assert_eq!(s.dumpconf(g)["flush_failed"], true);
    }

    #[test]
    fn a_disk_that_fails_writes_but_serves_reads_is_dropped() {
        let (mut s, disks) = testing::stack_with_disks(1, 1 << 20, 512);
        let c = s.open("vtbd0", Access::READ_WRITE).unwrap();
        disks[0].set_fail_writes(true);
        for i in 0..crate::disk::DEFAULT_ERROR_LIMIT {
            let p = s.find_provider("vtbd0").unwrap();
            assert!(!s.provider(p).orphaned, "after {i} write errors");
            assert!(testing::read(&mut s, c, 0, 512).is_ok(), "reads still work");
            assert!(testing::write(&mut s, c, 0, &[1; 512]).is_err());
        }
        let (_, r) = testing::io(&mut s, c, Bio::read(0, 512));
        assert_eq!(r, Err(BioError::Orphaned));
    }

    /// Runs the stack with the clock at `now_ms` until it settles.
    fn run_at(s: &mut crate::stack::Stack, now_ms: u64) {
        s.set_now_ns(now_ms * 1_000_000);
        for _ in 0..100 {
            s.run();
        }
    }

    #[test]
    fn a_bio_past_its_deadline_fails_with_eio_and_the_disk_is_orphaned() {
        let (mut s, disks) = testing::stack_with_disks(1, 1 << 20, 512);
        s.set_bio_deadline_ms(1000);
        run_at(&mut s, 1);
        let c = s.open("vtbd0", Access::READ_WRITE).unwrap();
        // The device answered once: the full deadline applies.
        testing::write(&mut s, c, 0, &[1; 4096]).unwrap();
        disks[0].hold(true);
        s.submit(c, Bio::read(0, 4096), 1);
        s.submit(c, write_bio(4096, &[2; 4096]), 2);
        s.run();
        run_at(&mut s, 500);
        assert!(s.take_completed().is_none(), "nothing is due yet");
        assert_eq!(
            s.next_deadline_ns(),
            Some(1_001_000_000),
            "the loop is woken for the deadline"
        );
        run_at(&mut s, 1001);
        let mut got = alloc::vec::Vec::new();
        while let Some((tag, _, r)) = s.take_completed() {
            got.push((tag, r));
        }
        got.sort_by_key(|g| g.0);
        assert_eq!(got, [(1, Err(BioError::Io)), (2, Err(BioError::Io))]);
        let p = s.find_provider("vtbd0").unwrap();
        assert!(s.provider(p).orphaned);
        assert_eq!(disks[0].stats().aborts, 1);
        assert_eq!(disks[0].queued(), 0, "the reset took every bio back");
        let g = s.find_geom("disk", "vtbd0").unwrap();
        let why = alloc::string::String::from(s.dumpconf(g)["failed"].as_str().unwrap());
        assert!(why.contains("1000 ms"), "{why}");
        // A late completion changes nothing.
        disks[0].hold(false);
        run_at(&mut s, 2000);
        assert!(s.take_completed().is_none());
    }

    #[test]
    fn a_device_that_cannot_be_stopped_keeps_its_bios_until_they_come_back() {
        let (mut s, disks) = testing::stack_with_disks(1, 1 << 20, 512);
        s.set_bio_deadline_ms(1000);
        run_at(&mut s, 1);
        let c = s.open("vtbd0", Access::READ_WRITE).unwrap();
        disks[0].hold(true);
        disks[0].set_stoppable(false);
        s.submit(c, Bio::read(0, 4096), 1);
        s.run();
        run_at(&mut s, 5000);
        let p = s.find_provider("vtbd0").unwrap();
        assert!(s.provider(p).orphaned, "given up on");
        assert!(s.take_completed().is_none(), "the device still holds it");
        assert_eq!(disks[0].queued(), 1);
        // When it does come back, it comes back failed.
        disks[0].hold(false);
        run_at(&mut s, 6000);
        let (tag, _, r) = s.take_completed().expect("the late completion");
        assert_eq!((tag, r), (1, Err(BioError::Io)));
    }

    #[test]
    fn a_disk_that_never_answers_gives_up_at_the_taste_deadline() {
        let (mut s, disks) = testing::stack_with_disks(1, 1 << 20, 512);
        disks[0].hold(true);
        run_at(&mut s, 1);
        let c = s.open("vtbd0", Access::READ).unwrap();
        s.submit(c, Bio::read(0, 512), 7);
        run_at(&mut s, crate::disk::TASTE_DEADLINE_MS);
        assert!(s.take_completed().is_none());
        run_at(&mut s, crate::disk::TASTE_DEADLINE_MS + 1);
        let (tag, _, r) = s.take_completed().expect("failed at the taste deadline");
        assert_eq!((tag, r), (7, Err(BioError::Io)));
    }

    #[test]
    fn a_device_that_needs_a_reset_is_orphaned() {
        let (mut s, disks) = testing::stack_with_disks(1, 1 << 20, 512);
        let c = s.open("vtbd0", Access::READ_WRITE).unwrap();
        disks[0].hold(true);
        s.submit(c, Bio::read(0, 4096), 1);
        s.run();
        disks[0].set_needs_reset(true);
        let (tag, _, r) = testing::wait(&mut s);
        assert_eq!((tag, r), (1, Err(BioError::Io)));
        let p = s.find_provider("vtbd0").unwrap();
        assert!(s.provider(p).orphaned);
        let g = s.find_geom("disk", "vtbd0").unwrap();
        assert_eq!(s.dumpconf(g)["failed"], "the device needs a reset");
    }
}
