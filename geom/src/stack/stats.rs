//! Statistics: the counters kept for each provider (requests, bytes,
//! errors, latency) and the stack's counters of metadata I/O.

use super::Stack;
use crate::bio::{Bio, BioCmd};
use crate::page::DataCounters;
use core::sync::atomic::{AtomicU64, Ordering};

/// Counters kept for each provider.
#[derive(Default, Debug)]
pub struct ProviderStats {
    /// Read requests started.
    pub reads: AtomicU64,
    /// Write requests started.
    pub writes: AtomicU64,
    /// Flush requests started.
    pub flushes: AtomicU64,
    /// Discard and write-zeroes requests started.
    pub frees: AtomicU64,
    /// Bytes requested by reads.
    pub bytes_read: AtomicU64,
    /// Bytes carried by writes.
    pub bytes_written: AtomicU64,
    /// Requests that completed with an error.
    pub errors: AtomicU64,
    /// Sum of read latencies in ns (start to completion on the stack's
    /// clock; zero while the platform gives no clock).
    pub read_ns: AtomicU64,
    /// Sum of write latencies in ns.
    pub write_ns: AtomicU64,
    /// Maps and copies done by this provider's geom on its data path.
    pub data: DataCounters,
}

impl ProviderStats {
    /// Counts a request that passed the central check.
    pub(super) fn count_start(&self, bio: &Bio) {
        let (ops, bytes) = match bio.cmd {
            BioCmd::Read => (&self.reads, Some(&self.bytes_read)),
            BioCmd::Write => (&self.writes, Some(&self.bytes_written)),
            BioCmd::Flush => (&self.flushes, None),
            BioCmd::Discard | BioCmd::WriteZeroes => (&self.frees, None),
            // A query: it moves no data and changes nothing.
            BioCmd::GetAllocation => return,
        };
        ops.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = bytes {
            b.fetch_add(bio.length, Ordering::Relaxed);
        }
    }

    /// Counts a completion: an error if it `failed`, and for a read or a
    /// write the time it took, when known.
    pub(super) fn count_done(&self, cmd: BioCmd, failed: bool, took_ns: Option<u64>) {
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let Some(took) = took_ns else {
            return;
        };
        let sum = match cmd {
            BioCmd::Read => &self.read_ns,
            BioCmd::Write => &self.write_ns,
            _ => return,
        };
        sum.fetch_add(took, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

impl Stack {
    /// Counters of metadata I/O (tasting and labelling).
    pub fn meta_counters(&self) -> &DataCounters {
        &self.core.meta_counters
    }
}
