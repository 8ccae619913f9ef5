//! A store in memory, for tests: a flat array of blocks behind a queue of
//! pending operations that the test completes in any order it likes.
//!
//! Writes land in a volatile image when they are completed; a completed
//! Flush copies the volatile image to the durable one (what survives a
//! power cut). Failures are injected by count: the next `n` reads, writes
//! or flushes completed fail with [`Error::Io`] and change nothing, and the
//! next `n` allocations return None.

use crate::{BlockNo, Cache, Error, Op, Store, Tag};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

/// One completion, as [`Cache::complete`] takes it.
pub type Completion = (Tag, Option<Box<[u8]>>, Result<(), Error>);

/// A flat array of `blocks` blocks of `block_size` bytes in memory.
pub struct MemStore {
    block_size: usize,
    blocks: u64,
    volatile: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Op<Box<[u8]>>>,
    fail_reads: u64,
    fail_writes: u64,
    fail_flush: u64,
    fail_alloc: u64,
    allocated: u64,
}

impl MemStore {
    /// `blocks` zero-filled blocks of `block_size` bytes.
    pub fn new(blocks: u64, block_size: usize) -> MemStore {
        let bytes = usize::try_from(blocks)
            .ok()
            .and_then(|b| b.checked_mul(block_size))
            .expect("MemStore too large");
        MemStore {
            block_size,
            blocks,
            volatile: vec![0; bytes],
            durable: vec![0; bytes],
            pending: Vec::new(),
            fail_reads: 0,
            fail_writes: 0,
            fail_flush: 0,
            fail_alloc: 0,
            allocated: 0,
        }
    }

    /// Bytes per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the store.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Operations started and not completed yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The pending operations, oldest first.
    pub fn pending_ops(&self) -> &[Op<Box<[u8]>>] {
        &self.pending
    }

    /// The next `n` reads completed fail.
    pub fn fail_reads(&mut self, n: u64) {
        self.fail_reads = n;
    }

    /// The next `n` writes completed fail.
    pub fn fail_writes(&mut self, n: u64) {
        self.fail_writes = n;
    }

    /// The next `n` flushes completed fail.
    pub fn fail_flush(&mut self, n: u64) {
        self.fail_flush = n;
    }

    /// The next `n` allocations return None.
    pub fn fail_alloc(&mut self, n: u64) {
        self.fail_alloc = n;
    }

    /// Buffers handed out so far.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// The volatile image: every completed write.
    pub fn contents(&self) -> &[u8] {
        &self.volatile
    }

    /// The durable image: the writes completed before the last completed flush.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// One block of the volatile image (empty if out of range).
    pub fn block(&self, block: BlockNo) -> &[u8] {
        self.range(block)
            .map_or(&[][..], |r| &self.volatile[r.start..r.end])
    }

    /// One block of the durable image (empty if out of range).
    pub fn durable_block(&self, block: BlockNo) -> &[u8] {
        self.range(block)
            .map_or(&[][..], |r| &self.durable[r.start..r.end])
    }

    /// Sets one block in both images, as if written and flushed long ago.
    pub fn set_block(&mut self, block: BlockNo, data: &[u8]) {
        if let Some(r) = self.range(block) {
            let n = data.len().min(self.block_size);
            self.volatile[r.start..r.start + n].copy_from_slice(&data[..n]);
            self.durable[r.start..r.start + n].copy_from_slice(&data[..n]);
        }
    }

    /// Loses the writes not flushed yet (the volatile image becomes the durable one).
    pub fn power_cut(&mut self) {
        self.volatile.copy_from_slice(&self.durable);
    }

    /// Completes the pending operation at `index` (0 is the oldest): applies
    /// it to the images and returns what to pass to [`Cache::complete`].
    /// Reads and writes of blocks out of range fail.
    ///
    /// # Panics
    ///
    /// If `index >= self.pending()`.
    pub fn complete_one(&mut self, index: usize) -> Completion {
        match self.pending.remove(index) {
            Op::Read {
                tag,
                block,
                mut buf,
            } => {
                let r = match self.range(block) {
                    Some(_) if take(&mut self.fail_reads) => Err(Error::Io),
                    Some(r) => {
                        let n = buf.len().min(self.block_size);
                        buf[..n].copy_from_slice(&self.volatile[r.start..r.start + n]);
                        Ok(())
                    }
                    None => Err(Error::Io),
                };
                (tag, Some(buf), r)
            }
            Op::Write { tag, block, buf } => {
                let r = match self.range(block) {
                    Some(_) if take(&mut self.fail_writes) => Err(Error::Io),
                    Some(r) => {
                        let n = buf.len().min(self.block_size);
                        self.volatile[r.start..r.start + n].copy_from_slice(&buf[..n]);
                        Ok(())
                    }
                    None => Err(Error::Io),
                };
                (tag, Some(buf), r)
            }
            Op::Flush { tag } => {
                if take(&mut self.fail_flush) {
                    return (tag, None, Err(Error::Io));
                }
                self.durable.copy_from_slice(&self.volatile);
                (tag, None, Ok(()))
            }
        }
    }

    fn range(&self, block: BlockNo) -> Option<core::ops::Range<usize>> {
        if block >= self.blocks {
            return None;
        }
        let start = usize::try_from(block).ok()?.checked_mul(self.block_size)?;
        Some(start..start + self.block_size)
    }
}

/// Counts one injected failure down; true if this operation fails.
fn take(left: &mut u64) -> bool {
    if *left == 0 {
        return false;
    }
    *left -= 1;
    true
}

impl Store for MemStore {
    type Buf = Box<[u8]>;

    fn alloc(&mut self) -> Option<Box<[u8]>> {
        if take(&mut self.fail_alloc) {
            return None;
        }
        self.allocated += 1;
        Some(vec![0; self.block_size].into_boxed_slice())
    }

    fn start(&mut self, op: Op<Box<[u8]>>) {
        self.pending.push(op);
    }
}

/// Completes the pending operations of `cache`'s store, oldest first,
/// until none is left (operations started by completions included).
pub fn complete_all(cache: &mut Cache<MemStore>) {
    while cache.store().pending() > 0 {
        let (tag, buf, r) = cache.store_mut().complete_one(0);
        cache.complete(tag, buf, r);
    }
}
