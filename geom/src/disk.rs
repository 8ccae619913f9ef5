//! The disk class: one provider per block device (vtbd0, vtbd1, …).
//!
//! A [`BlockDevice`] is what platform code implements: the virtio-blk
//! driver in the appliance, a file in the hosted build, a fake in tests.
//! The disk geom passes bios to it untouched (it never maps data), parks
//! them when the device queue is full, and turns a write with FUA into a
//! write followed by a flush, since virtio-blk has no FUA bit. It answers
//! GET_ALLOCATION itself from [`BlockDevice::allocation`].
//!
//! A device that fails [`DEFAULT_ERROR_LIMIT`] requests in a row is taken
//! for dead: the disk geom orphans its provider, and the failure travels
//! up the stack as orphan events (bios in flight still complete).

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

    /// Counts device errors; too many in a row orphan the provider.
    fn note(&mut self, io: &mut Io<'_>, result: BioResult) {
        match result {
            Ok(()) => self.errors_in_a_row = 0,
            Err(BioError::Io) => {
                self.errors_in_a_row += 1;
                self.errors_total += 1;
                if self.error_limit > 0 && self.errors_in_a_row >= self.error_limit {
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
        for (mut bio, result) in finished.drain(..) {
            self.note(io, result);
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
            "error_limit": self.error_limit,
            "queued": self.waiting.len(),
        })
    }
}

/// A device name for the n-th virtio disk, as FreeBSD names them.
pub fn vtbd_name(n: usize) -> String {
    alloc::format!("vtbd{n}")
}
