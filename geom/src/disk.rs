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

    /// Which parts of `[offset, offset + length)` hold data, as consecutive
    /// runs from `offset` on (at most [`crate::bio::MAX_EXTENTS`]), for
    /// [`BioCmd::GetAllocation`]; answered at once. The default knows
    /// nothing: every byte counts as data.
    fn allocation(&mut self, offset: u64, length: u64) -> alloc::vec::Vec<crate::bio::Extent> {
        let _ = (offset, length);
        alloc::vec::Vec::new()
    }
}

/// Marks a flush the disk geom issued itself to make a FUA write stable;
/// the low bits hold the key of the parked write.
const FUA_FLUSH: u64 = 1 << 63;
/// Marks a write whose completion must be followed by a flush.
const FUA_WRITE: u64 = 1 << 62;

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
    next_key: u64,
    error_limit: u32,
    errors_in_a_row: u32,
    /// Write errors since the last successful write.
    write_errors_in_a_row: u32,
    /// A flush failed: every later flush fails.
    flush_failed: bool,
    errors_total: u64,
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
                next_key: 0,
                error_limit,
                errors_in_a_row: 0,
                write_errors_in_a_row: 0,
                flush_failed: false,
                errors_total: 0,
            }),
        );
        Ok(p)
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
        bio.scratch = if bio.fua && bio.cmd.is_write() && self.info.can_flush {
            FUA_WRITE
        } else {
            0
        };
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
        for (mut bio, mut result) in finished.drain(..) {
            self.note(io, bio.cmd, result);
            if bio.cmd == BioCmd::Flush && self.flush_failed {
                result = result.and(Err(BioError::Io));
            }
            if bio.scratch & FUA_FLUSH != 0 {
                let key = bio.scratch & !FUA_FLUSH;
                if let Some(mut write) = self.fua_parked.remove(&key) {
                    write.scratch = 0;
                    io.deliver(write, result);
                }
            } else if bio.scratch == FUA_WRITE && result.is_ok() {
                let key = self.next_key;
                self.next_key += 1;
                self.fua_parked.insert(key, bio);
                let mut flush = Bio::flush();
                flush.scratch = FUA_FLUSH | key;
                self.send(flush);
            } else {
                bio.scratch = 0;
                io.deliver(bio, result);
            }
        }
        self.finished = finished;
        self.retry_waiting();
        n > 0
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
}
