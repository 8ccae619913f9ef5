//! Buffer cache as a library: instances over a backing-store trait.
//!
//! Each user (raid5 stripes, gbde key sectors, read caches) creates its own
//! [`Cache`] over its own [`Store`]; there is no global cache.
//!
//! **Split phase.** The cache never blocks and never calls back into its
//! user. A lookup answers at once ([`Lookup::Hit`]) or says the answer will
//! come later ([`Lookup::Wait`]); the store's operations are started with
//! [`Store::start`] and never complete inline: the user hands each
//! completion back through [`Cache::complete`], and finished waits come out
//! of [`Cache::take_ready`] in completion order.
//!
//! ```text
//!  get(block, waiter) ─▶ Hit(handle)                        (cached, valid)
//!                    └─▶ Wait ─▶ store.start(Read) ··· complete(tag) ─▶ take_ready: Block{waiter, handle}
//!  mark_dirty(h), unpin(h) ··· eviction or flush ─▶ store.start(Write) ··· complete(tag)
//!  flush(range, waiter) ─▶ Writes of the dirty blocks ··· all back ─▶ store Flush ··· ─▶ Flushed{waiter}
//! ```
//!
//! **Who owns a buffer.** The cache holds at most `capacity` buffers, made
//! lazily with [`Store::alloc`] and then reused; it never frees one. A
//! buffer is moved into the store with its [`Op`] and moved back with the
//! completion, so while the store holds it nobody else can touch it. The
//! user touches a buffer only through a pinned [`Handle`].
//!
//! **States of a slot.** A slot is free, or holds one block. A held block
//! is valid (the store's contents or newer) or not (being read, or pinned
//! blank by [`Cache::get_blank`]); a valid block is clean or dirty; and it
//! is idle, pinned (by any number of holders of one [`Handle`]), or busy
//! with one store operation. A block is held by at most one slot, and a
//! store operation on a block is always on the slot holding it, so a read
//! never overtakes a write of the same block. A pinned block is never
//! written (its buffer stays with its holders): a write that a flush or a
//! [`Cache::write_through`] asks for starts when the last pin goes, and
//! until that write ends, new lookups of the block wait.
//!
//! **Eviction.** When a miss needs a slot, it takes a free one, else a new
//! buffer (below capacity), else the victim that [`Replacement`] picks
//! among idle blocks: CLOCK (second chance, a pin sets the reference bit)
//! or LRU (least recently pinned or unpinned). A clean victim is dropped at
//! once. A dirty one is written back first (counted in
//! [`Stats::writebacks`]) and the miss takes a clean victim if there is
//! one, else waits for a slot; the write's end (like every unpin and I/O
//! end) serves the waiting misses in order. Pinned and busy blocks are
//! never victims.
//!
//! **Flush.** [`Cache::flush`] writes the dirty blocks in its range (a
//! pinned one when it is unpinned), waits for those writes and for any
//! write of a block in the range already in flight, then issues one store
//! [`Op::Flush`]. Its result is the first error among those writes and the
//! store flush. A failed write-back leaves the block dirty; a failed
//! write-through drops the block (see [`Cache::write_through`]).
//!
//! **Invalidate.** [`Cache::invalidate`] drops blocks and discards their
//! changes. A pinned or busy block stays in its slot, marked, until its
//! pins and I/O are gone; lookups of it wait until then and re-read.
//!
//! **Errors.** A failed read fails every lookup that waited for it and
//! drops the slot. Stale handles (a slot since given to another block) are
//! ignored, and [`Cache::try_buf`] answers None for them.
//!
//! ```
//! use bufcache::mem::MemStore;
//! use bufcache::{Cache, Config, Lookup, Ready, Replacement};
//!
//! let config = Config { block_size: 512, capacity_bytes: 4096, replacement: Replacement::Clock };
//! let mut cache = Cache::new(MemStore::new(16, 512), config);
//! assert_eq!(cache.get(3, 1), Lookup::Wait);
//! // The store's completions go back to the cache.
//! let (tag, buf, result) = cache.store_mut().complete_one(0);
//! cache.complete(tag, buf, result);
//! let Some(Ready::Block { waiter: 1, result: Ok(h) }) = cache.take_ready() else { panic!() };
//! cache.buf_mut(h).fill(7);
//! cache.mark_dirty(h);
//! cache.unpin(h);
//! cache.flush(None, 2);
//! bufcache::mem::complete_all(&mut cache);
//! assert_eq!(cache.take_ready(), Some(Ready::Flushed { waiter: 2, result: Ok(()) }));
//! assert_eq!(cache.store().durable_block(3), &[7; 512][..]);
//! ```

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod mem;

#[cfg(test)]
mod tests;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::ops::Range;

/// A block number in the backing store (the store decides what it means).
pub type BlockNo = u64;

/// Identifies one store operation; the store hands it back with the completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub u64);

/// Why a store operation failed (kept opaque: the user maps it to its own errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The store reported an I/O error (or lost the buffer it was given).
    Io,
    /// There was no memory for a buffer.
    NoMemory,
}

/// One operation the cache asks its backing store to carry out. Buffers
/// are moved to the store and come back with the completion (ownership
/// moves; no one else can touch a buffer while the store holds it).
#[derive(Debug)]
pub enum Op<B> {
    /// Read block `block` into `buf`.
    Read {
        /// Handed back with the completion.
        tag: Tag,
        /// The block to read.
        block: BlockNo,
        /// Where the block's contents go; comes back with the completion.
        buf: B,
    },
    /// Write `buf` to block `block`.
    Write {
        /// Handed back with the completion.
        tag: Tag,
        /// The block to write.
        block: BlockNo,
        /// The block's new contents; comes back with the completion.
        buf: B,
    },
    /// Make every completed write stable.
    Flush {
        /// Handed back with the completion.
        tag: Tag,
    },
}

/// The backing store of one cache instance.
pub trait Store {
    /// One block's buffer (for geom: pages; for the memory store: a boxed byte slice).
    type Buf;
    /// A new buffer for one block (contents unspecified/zero), or None when there is no memory.
    fn alloc(&mut self) -> Option<Self::Buf>;
    /// Starts `op`. Never completes it inline: the completion comes later through [`Cache::complete`].
    fn start(&mut self, op: Op<Self::Buf>);
}

impl<S: Store + ?Sized> Store for Box<S> {
    type Buf = S::Buf;
    fn alloc(&mut self) -> Option<S::Buf> {
        (**self).alloc()
    }
    fn start(&mut self, op: Op<S::Buf>) {
        (**self).start(op)
    }
}

/// How a victim is chosen among idle blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replacement {
    /// Second chance: the hand skips (and clears) blocks pinned since it last passed.
    Clock,
    /// The block pinned or unpinned longest ago.
    Lru,
}

/// The shape of one cache instance.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Bytes per block (informational: used for capacity).
    pub block_size: usize,
    /// Capacity in bytes: `capacity_bytes / block_size` blocks, at least 1.
    pub capacity_bytes: u64,
    /// The eviction policy.
    pub replacement: Replacement,
}

impl Config {
    /// The capacity in blocks: `capacity_bytes / block_size`, at least 1
    /// (and at most `u32::MAX`).
    pub fn capacity(&self) -> usize {
        let per = u64::try_from(self.block_size.max(1)).unwrap_or(u64::MAX);
        let blocks = (self.capacity_bytes / per).clamp(1, u64::from(u32::MAX));
        usize::try_from(blocks).unwrap_or(u32::MAX as usize)
    }
}

/// A pinned block of the cache. Copy; valid until unpinned.
///
/// Every holder of one block gets the same handle while the block stays
/// in its slot, so a handle kept after its own unpin cannot be told from
/// another holder's: it must not be used. A handle whose slot was since
/// given to another block is recognized and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handle {
    slot: u32,
    gen: u32,
}

/// The answer to a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The block is in the cache and valid; it is pinned (unpin when done).
    Hit(Handle),
    /// The caller's `waiter` will come out of `take_ready` later (after a
    /// read from the store, after a slot frees up, or after a write-back in
    /// progress on the block ends).
    Wait,
}

/// A finished wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// A `get`/`get_blank` that waited: the block pinned, or why it could
    /// not be had (read error: the slot is dropped; NoMemory: the store
    /// could not allocate and the cache holds no buffer).
    Block {
        /// The waiter given to the lookup.
        waiter: u64,
        /// The pinned block, or why there is none.
        result: Result<Handle, Error>,
    },
    /// A `write_through` finished.
    Written {
        /// The waiter given to `write_through`.
        waiter: u64,
        /// The store write's result.
        result: Result<(), Error>,
    },
    /// A `flush` finished: every dirty block in its range was written and
    /// then the store flushed. Err if any of those writes or the store
    /// flush failed.
    Flushed {
        /// The waiter given to `flush`.
        waiter: u64,
        /// The first error among the writes and the store flush.
        result: Result<(), Error>,
    },
}

/// Counters and gauges of one cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Lookups answered at once with a cached valid block.
    pub hits: u64,
    /// Every other lookup (hits + misses = lookups).
    pub misses: u64,
    /// Clean blocks dropped to make room.
    pub evictions: u64,
    /// Gauge: dirty blocks now.
    pub dirty: u64,
    /// Writes of dirty blocks started for eviction or flush (write-through not included).
    pub writebacks: u64,
    /// Store reads that failed.
    pub read_errors: u64,
    /// Store writes that failed.
    pub write_errors: u64,
    /// Gauge: blocks held now.
    pub blocks: u64,
    /// Capacity in blocks.
    pub capacity: u64,
}

/// One lookup, parked until it can be answered.
#[derive(Clone, Copy, Debug)]
struct Want {
    waiter: u64,
    block: BlockNo,
    blank: bool,
}

struct Slot<B> {
    /// None while the store holds it (or if the store lost it).
    buf: Option<B>,
    /// The block held; None when free.
    block: Option<BlockNo>,
    /// Bumped whenever the slot changes blocks: stale handles mismatch.
    gen: u32,
    pins: u32,
    valid: bool,
    dirty: bool,
    /// Invalidated while pinned or busy: dropped when neither.
    doomed: bool,
    /// The store operation in flight on this slot.
    io: Option<u64>,
    referenced: bool,
    stamp: u64,
    /// Lookups of this block waiting for the slot's read, write or pins to end.
    waiters: Vec<Want>,
    /// Flushes waiting for this (pinned, dirty) block's write.
    flushes: Vec<u64>,
    /// Write-through waiters whose write starts at the last unpin.
    through: Vec<u64>,
}

impl<B> Slot<B> {
    fn new(buf: B) -> Slot<B> {
        Slot {
            buf: Some(buf),
            block: None,
            gen: 0,
            pins: 0,
            valid: false,
            dirty: false,
            doomed: false,
            io: None,
            referenced: false,
            stamp: 0,
            waiters: Vec::new(),
            flushes: Vec::new(),
            through: Vec::new(),
        }
    }

    /// A candidate victim.
    fn idle(&self) -> bool {
        self.block.is_some()
            && self.pins == 0
            && self.io.is_none()
            && !self.doomed
            && self.buf.is_some()
            && self.through.is_empty()
            && self.flushes.is_empty()
    }

    /// New lookups of the block must wait.
    fn busy(&self) -> bool {
        self.doomed
            || self.io.is_some()
            || !self.through.is_empty()
            || !self.flushes.is_empty()
            || (!self.valid && self.pins > 0)
    }
}

enum Pending {
    Read {
        slot: usize,
    },
    Write {
        slot: usize,
        evict: bool,
        through: Vec<u64>,
        flushes: Vec<u64>,
    },
    Flush {
        flush: u64,
    },
}

struct FlushWait {
    waiter: u64,
    /// Writes still to end (plus one while the flush is being set up).
    left: usize,
    error: Option<Error>,
}

enum Acquire {
    Got(usize),
    Wait,
    NoMemory,
}

/// A buffer cache over the store `S` (see the crate documentation). The
/// user drives it: it calls [`Cache::complete`] for every operation the
/// store finishes and collects finished waits with [`Cache::take_ready`].
pub struct Cache<S: Store> {
    store: S,
    config: Config,
    capacity: usize,
    slots: Vec<Slot<S::Buf>>,
    map: BTreeMap<BlockNo, usize>,
    /// Slots with a buffer and no block.
    free: Vec<usize>,
    /// Slots whose buffer the store lost: refilled by alloc.
    husks: Vec<usize>,
    ops: BTreeMap<u64, Pending>,
    flushes: BTreeMap<u64, FlushWait>,
    /// Misses waiting for a slot.
    slot_wait: VecDeque<Want>,
    ready: VecDeque<Ready>,
    next_tag: u64,
    next_flush: u64,
    tick: u64,
    hand: usize,
    /// Eviction write-backs in flight.
    reclaiming: usize,
    stats: Stats,
}

impl<S: Store> Cache<S> {
    /// An empty cache over `store`.
    pub fn new(store: S, config: Config) -> Cache<S> {
        let capacity = config.capacity();
        Cache {
            store,
            config,
            capacity,
            slots: Vec::new(),
            map: BTreeMap::new(),
            free: Vec::new(),
            husks: Vec::new(),
            ops: BTreeMap::new(),
            flushes: BTreeMap::new(),
            slot_wait: VecDeque::new(),
            ready: VecDeque::new(),
            next_tag: 0,
            next_flush: 0,
            tick: 0,
            hand: 0,
            reclaiming: 0,
            stats: Stats {
                capacity: capacity as u64,
                ..Stats::default()
            },
        }
    }

    /// The configuration the cache was made with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The backing store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The backing store, mutably (to drive its completions).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Lookup and read: Hit if cached and valid (counts a hit), else Wait
    /// (counts a miss; starts a Read into a fresh or evicted slot; several
    /// getters of one block share one read).
    pub fn get(&mut self, block: BlockNo, waiter: u64) -> Lookup {
        self.lookup(Want {
            waiter,
            block,
            blank: false,
        })
    }

    /// Like get, but the caller will overwrite the whole block, so on a
    /// miss no read is issued: the block comes back pinned with unspecified
    /// contents (is_valid false), immediately as Hit when a slot is free,
    /// or later through take_ready. If the block is cached and valid it is
    /// a normal Hit (is_valid true). A blank pin is exclusive: other
    /// lookups of the block wait until it is unpinned; unpinned without
    /// [`Cache::set_valid`] or [`Cache::mark_dirty`], the block is dropped.
    pub fn get_blank(&mut self, block: BlockNo, waiter: u64) -> Lookup {
        self.lookup(Want {
            waiter,
            block,
            blank: true,
        })
    }

    /// Whether a pinned block holds the store's (or newer) contents. False
    /// for a stale handle.
    pub fn is_valid(&self, h: Handle) -> bool {
        self.pinned(h).is_some_and(|i| self.slots[i].valid)
    }

    /// The block a pinned handle holds (`BlockNo::MAX` for a stale handle).
    pub fn block(&self, h: Handle) -> BlockNo {
        self.pinned(h)
            .and_then(|i| self.slots[i].block)
            .unwrap_or(BlockNo::MAX)
    }

    /// The buffer of a pinned block, or None for a stale handle.
    pub fn try_buf(&self, h: Handle) -> Option<&S::Buf> {
        let i = self.pinned(h)?;
        self.slots[i].buf.as_ref()
    }

    /// The buffer of a pinned block, mutably, or None for a stale handle.
    pub fn try_buf_mut(&mut self, h: Handle) -> Option<&mut S::Buf> {
        let i = self.pinned(h)?;
        self.slots[i].buf.as_mut()
    }

    /// The buffer of a pinned block.
    ///
    /// # Panics
    ///
    /// If `h` is stale (see [`Cache::try_buf`]).
    pub fn buf(&self, h: Handle) -> &S::Buf {
        self.try_buf(h).expect("bufcache: stale handle")
    }

    /// The buffer of a pinned block, mutably.
    ///
    /// # Panics
    ///
    /// If `h` is stale (see [`Cache::try_buf_mut`]).
    pub fn buf_mut(&mut self, h: Handle) -> &mut S::Buf {
        self.try_buf_mut(h).expect("bufcache: stale handle")
    }

    /// The caller filled the block with contents equal to the store's
    /// (e.g. it wrote them to the store itself): it becomes valid and
    /// clean. Ignored on an invalidated block.
    pub fn set_valid(&mut self, h: Handle) {
        if let Some(i) = self.pinned(h) {
            let s = &mut self.slots[i];
            if !s.doomed {
                s.valid = true;
                s.dirty = false;
            }
        }
    }

    /// The caller changed the block (marks it valid and dirty; write-back:
    /// it is written on flush or eviction). Ignored on an invalidated
    /// block: its changes are discarded.
    pub fn mark_dirty(&mut self, h: Handle) {
        if let Some(i) = self.pinned(h) {
            let s = &mut self.slots[i];
            if !s.doomed {
                s.valid = true;
                s.dirty = true;
            }
        }
    }

    /// Write-through: marks the block valid, releases the caller's pin and
    /// writes the block as soon as no one else pins it (at once if the
    /// caller was the only holder); `Ready::Written{waiter}` when the store
    /// write completes. Until then the block cannot be pinned (a get
    /// waits). On write failure the block is dropped from the cache (its
    /// changes are lost; a later get re-reads the store), the error goes to
    /// the waiter and is counted in `write_errors`. A stale handle gets
    /// `Written` with `Err(Io)`. On an invalidated block the write is still
    /// made, and the block dropped after it.
    pub fn write_through(&mut self, h: Handle, waiter: u64) {
        let Some(i) = self.pinned(h) else {
            self.ready.push_back(Ready::Written {
                waiter,
                result: Err(Error::Io),
            });
            return;
        };
        let s = &mut self.slots[i];
        if !s.doomed {
            s.valid = true;
            s.dirty = true;
        }
        s.through.push(waiter);
        s.pins -= 1;
        if s.pins == 0 {
            self.settle(i);
            self.pump();
        }
    }

    /// Releases one pin. A stale handle is ignored.
    pub fn unpin(&mut self, h: Handle) {
        let Some(i) = self.pinned(h) else {
            return;
        };
        self.touch(i);
        let s = &mut self.slots[i];
        s.pins -= 1;
        if s.pins == 0 {
            self.settle(i);
            self.pump();
        }
    }

    /// Flushes the dirty blocks whose numbers are in `range` (None: all),
    /// then issues a store Flush; Ready::Flushed when done. A pinned dirty
    /// block is written when it is unpinned, and new lookups of it wait
    /// until then. Writes already in flight on blocks in the range are
    /// waited for. A write-back that fails leaves the block dirty and makes
    /// this flush's result Err.
    pub fn flush(&mut self, range: Option<Range<BlockNo>>, waiter: u64) {
        let id = self.next_flush;
        self.next_flush = self.next_flush.wrapping_add(1);
        let mut left = 1;
        let held: Vec<usize> = match range {
            None => self.map.values().copied().collect(),
            Some(r) if r.start < r.end => self.map.range(r).map(|(_, &i)| i).collect(),
            Some(_) => Vec::new(),
        };
        let mut now = Vec::new();
        for i in held {
            let s = &mut self.slots[i];
            if let Some(tag) = s.io {
                if let Some(Pending::Write { flushes, .. }) = self.ops.get_mut(&tag) {
                    flushes.push(id);
                    left += 1;
                }
            } else if s.dirty || !s.through.is_empty() {
                left += 1;
                if s.pins > 0 {
                    s.flushes.push(id);
                } else {
                    now.push(i);
                }
            }
        }
        self.flushes.insert(
            id,
            FlushWait {
                waiter,
                left,
                error: None,
            },
        );
        for i in now {
            self.stats.writebacks += 1;
            self.start_write(i, false, Vec::new(), alloc::vec![id]);
        }
        self.flush_step(id, Ok(()));
    }

    /// Drops blocks in `range` from the cache (dirty ones too: their
    /// changes are discarded). Pinned or busy blocks are marked so they are
    /// dropped when unpinned/when their I/O ends; until then lookups of
    /// them wait, and a later get re-reads.
    pub fn invalidate(&mut self, range: Range<BlockNo>) {
        if range.start >= range.end {
            return;
        }
        let held: Vec<usize> = self.map.range(range).map(|(_, &i)| i).collect();
        for i in held {
            let s = &mut self.slots[i];
            s.dirty = false;
            let flushes = core::mem::take(&mut s.flushes);
            if s.pins == 0 && s.io.is_none() {
                self.drop_slot(i);
            } else {
                s.doomed = true;
            }
            for f in flushes {
                self.flush_step(f, Ok(()));
            }
        }
        self.pump();
    }

    /// A store operation ended; `buf` is the buffer it was given (None for
    /// Flush). An unknown tag is ignored. A Read or Write that comes back
    /// without its buffer counts as failed and the block is dropped.
    pub fn complete(&mut self, tag: Tag, buf: Option<S::Buf>, result: Result<(), Error>) {
        let Some(op) = self.ops.remove(&tag.0) else {
            return;
        };
        match op {
            Pending::Read { slot } => self.read_done(slot, buf, result),
            Pending::Write {
                slot,
                evict,
                through,
                flushes,
            } => self.write_done(slot, evict, through, flushes, buf, result),
            Pending::Flush { flush } => {
                if let Some(f) = self.flushes.remove(&flush) {
                    self.ready.push_back(Ready::Flushed {
                        waiter: f.waiter,
                        result: f.error.map_or(result, Err),
                    });
                }
            }
        }
        self.pump();
    }

    /// The next finished wait, in completion order.
    pub fn take_ready(&mut self) -> Option<Ready> {
        self.ready.pop_front()
    }

    /// Counters and gauges now.
    pub fn stats(&self) -> Stats {
        let dirty = self
            .slots
            .iter()
            .filter(|s| s.dirty && s.block.is_some())
            .count();
        Stats {
            dirty: dirty as u64,
            blocks: self.map.len() as u64,
            ..self.stats
        }
    }

    /// Store operations started and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Lookups waiting for a free slot.
    pub fn waiting_for_slot(&self) -> usize {
        self.slot_wait.len()
    }

    fn pinned(&self, h: Handle) -> Option<usize> {
        let i = h.slot as usize;
        let s = self.slots.get(i)?;
        (s.gen == h.gen && s.pins > 0 && s.block.is_some() && s.buf.is_some()).then_some(i)
    }

    fn touch(&mut self, i: usize) {
        self.tick = self.tick.wrapping_add(1);
        let s = &mut self.slots[i];
        s.stamp = self.tick;
        s.referenced = true;
    }

    fn pin(&mut self, i: usize) -> Handle {
        self.touch(i);
        let s = &mut self.slots[i];
        s.pins = s.pins.saturating_add(1);
        Handle {
            slot: i as u32,
            gen: s.gen,
        }
    }

    fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        t
    }

    fn lookup(&mut self, want: Want) -> Lookup {
        let mut budget = self.reclaiming.saturating_sub(self.slot_wait.len());
        match self.serve(want, true, &mut budget) {
            Some(h) => Lookup::Hit(h),
            None => Lookup::Wait,
        }
    }

    /// Answers `want` with a pinned block, or parks it (on the block's
    /// slot, on a read, or for a free slot) or answers it with an error in
    /// `ready`, and returns None. `budget` is how many eviction write-backs
    /// in flight this miss may count on instead of starting one.
    fn serve(&mut self, want: Want, first: bool, budget: &mut usize) -> Option<Handle> {
        if let Some(&i) = self.map.get(&want.block) {
            let s = &mut self.slots[i];
            if s.busy() || (!s.valid && !want.blank) {
                if first {
                    self.stats.misses += 1;
                }
                let read = !s.busy() && s.io.is_none();
                s.waiters.push(want);
                if read {
                    self.start_read(i);
                }
                return None;
            }
            if first {
                if s.valid {
                    self.stats.hits += 1;
                } else {
                    self.stats.misses += 1;
                }
            }
            return Some(self.pin(i));
        }
        if first {
            self.stats.misses += 1;
        }
        match self.acquire(budget) {
            Acquire::Got(i) => {
                let s = &mut self.slots[i];
                s.block = Some(want.block);
                s.valid = false;
                s.dirty = false;
                s.doomed = false;
                self.map.insert(want.block, i);
                if want.blank {
                    Some(self.pin(i))
                } else {
                    self.slots[i].waiters.push(want);
                    self.start_read(i);
                    None
                }
            }
            Acquire::Wait => {
                self.slot_wait.push_back(want);
                None
            }
            Acquire::NoMemory => {
                self.ready.push_back(Ready::Block {
                    waiter: want.waiter,
                    result: Err(Error::NoMemory),
                });
                None
            }
        }
    }

    /// A slot with a buffer and no block, or why there is none now.
    fn acquire(&mut self, budget: &mut usize) -> Acquire {
        if let Some(i) = self.free.pop() {
            return Acquire::Got(i);
        }
        if !self.husks.is_empty() || self.slots.len() < self.capacity {
            if let Some(buf) = self.store.alloc() {
                if let Some(i) = self.husks.pop() {
                    self.slots[i].buf = Some(buf);
                    return Acquire::Got(i);
                }
                self.slots.push(Slot::new(buf));
                return Acquire::Got(self.slots.len() - 1);
            }
        }
        if let Some(v) = self.victim(false) {
            if !self.slots[v].dirty {
                self.evict(v);
                return Acquire::Got(v);
            }
            if *budget > 0 {
                *budget -= 1;
            } else {
                self.stats.writebacks += 1;
                self.start_write(v, true, Vec::new(), Vec::new());
            }
            if let Some(c) = self.victim(true) {
                self.evict(c);
                return Acquire::Got(c);
            }
            return Acquire::Wait;
        }
        if self.slots.len() == self.husks.len() {
            return Acquire::NoMemory;
        }
        Acquire::Wait
    }

    /// The idle block [`Replacement`] picks (a clean one if `clean_only`).
    fn victim(&mut self, clean_only: bool) -> Option<usize> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        match self.config.replacement {
            Replacement::Lru => self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.idle() && !(clean_only && s.dirty))
                .min_by_key(|(_, s)| s.stamp)
                .map(|(i, _)| i),
            Replacement::Clock => {
                for _ in 0..n.saturating_mul(2) {
                    let i = self.hand % n;
                    self.hand = (i + 1) % n;
                    let s = &mut self.slots[i];
                    if !s.idle() || (clean_only && s.dirty) {
                        continue;
                    }
                    if s.referenced {
                        s.referenced = false;
                        continue;
                    }
                    return Some(i);
                }
                None
            }
        }
    }

    /// Drops the idle clean block of slot `i` to reuse the slot.
    fn evict(&mut self, i: usize) {
        self.stats.evictions += 1;
        let waiters = self.unmap(i);
        self.slot_wait.extend(waiters);
    }

    /// Frees slot `i` of its block; returns the lookups parked on it.
    fn unmap(&mut self, i: usize) -> Vec<Want> {
        let s = &mut self.slots[i];
        let Some(block) = s.block.take() else {
            return Vec::new();
        };
        if self.map.get(&block) == Some(&i) {
            self.map.remove(&block);
        }
        s.gen = s.gen.wrapping_add(1);
        s.valid = false;
        s.dirty = false;
        s.doomed = false;
        s.referenced = false;
        s.pins = 0;
        let flushes = core::mem::take(&mut s.flushes);
        let through = core::mem::take(&mut s.through);
        let waiters = core::mem::take(&mut s.waiters);
        for w in through {
            self.ready.push_back(Ready::Written {
                waiter: w,
                result: Err(Error::Io),
            });
        }
        for f in flushes {
            self.flush_step(f, Ok(()));
        }
        waiters
    }

    /// Frees slot `i` and serves the lookups parked on it.
    fn drop_slot(&mut self, i: usize) {
        if self.slots[i].block.is_none() {
            return;
        }
        let waiters = self.unmap(i);
        if self.slots[i].buf.is_some() {
            self.free.push(i);
        } else {
            self.husks.push(i);
        }
        self.rerun(waiters);
    }

    /// Slot `i` lost its last pin.
    fn settle(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if !s.through.is_empty() || (!s.flushes.is_empty() && s.dirty) {
            let through = core::mem::take(&mut s.through);
            let flushes = core::mem::take(&mut s.flushes);
            if through.is_empty() {
                self.stats.writebacks += 1;
            }
            self.start_write(i, false, through, flushes);
            return;
        }
        let flushes = core::mem::take(&mut s.flushes);
        let gone = s.doomed || !s.valid;
        for f in flushes {
            self.flush_step(f, Ok(()));
        }
        if gone {
            self.drop_slot(i);
        } else {
            let waiters = core::mem::take(&mut self.slots[i].waiters);
            self.rerun(waiters);
        }
    }

    /// Serves parked lookups again (answers go to `ready`).
    fn rerun(&mut self, wants: Vec<Want>) {
        let mut budget = self.reclaiming.saturating_sub(self.slot_wait.len());
        for w in wants {
            if let Some(h) = self.serve(w, false, &mut budget) {
                self.ready.push_back(Ready::Block {
                    waiter: w.waiter,
                    result: Ok(h),
                });
            }
        }
    }

    /// Serves the lookups waiting for a slot, in order.
    fn pump(&mut self) {
        if self.slot_wait.is_empty() {
            return;
        }
        let queue = core::mem::take(&mut self.slot_wait);
        let mut budget = self.reclaiming;
        for w in queue {
            if let Some(h) = self.serve(w, false, &mut budget) {
                self.ready.push_back(Ready::Block {
                    waiter: w.waiter,
                    result: Ok(h),
                });
            }
        }
    }

    fn start_read(&mut self, i: usize) {
        let tag = self.tag();
        let s = &mut self.slots[i];
        let (Some(block), Some(buf)) = (s.block, s.buf.take()) else {
            // Not reached: a slot holding a block and no I/O has its buffer.
            debug_assert!(false, "read of a slot without block or buffer");
            self.read_done(i, None, Err(Error::Io));
            return;
        };
        s.io = Some(tag);
        self.ops.insert(tag, Pending::Read { slot: i });
        self.store.start(Op::Read {
            tag: Tag(tag),
            block,
            buf,
        });
    }

    fn start_write(&mut self, i: usize, evict: bool, through: Vec<u64>, flushes: Vec<u64>) {
        let tag = self.tag();
        let s = &mut self.slots[i];
        let block = s.block;
        let buf = s.buf.take();
        let (Some(block), Some(buf)) = (block, buf) else {
            // Not reached: only idle slots holding a block are written.
            debug_assert!(false, "write of a slot without block or buffer");
            self.write_done(i, false, through, flushes, None, Err(Error::Io));
            return;
        };
        s.io = Some(tag);
        s.dirty = false;
        if evict {
            self.reclaiming += 1;
        }
        self.ops.insert(
            tag,
            Pending::Write {
                slot: i,
                evict,
                through,
                flushes,
            },
        );
        self.store.start(Op::Write {
            tag: Tag(tag),
            block,
            buf,
        });
    }

    fn read_done(&mut self, i: usize, buf: Option<S::Buf>, result: Result<(), Error>) {
        let s = &mut self.slots[i];
        s.io = None;
        let result = match buf {
            Some(b) => {
                s.buf = Some(b);
                result
            }
            None => Err(Error::Io),
        };
        if let Err(e) = result {
            self.stats.read_errors += 1;
            let waiters = core::mem::take(&mut s.waiters);
            let (blank, failed): (Vec<Want>, Vec<Want>) =
                waiters.into_iter().partition(|w| w.blank);
            s.waiters = blank;
            for w in failed {
                self.ready.push_back(Ready::Block {
                    waiter: w.waiter,
                    result: Err(e),
                });
            }
            self.drop_slot(i);
        } else if s.doomed {
            self.drop_slot(i);
        } else {
            s.valid = true;
            let waiters = core::mem::take(&mut s.waiters);
            for w in waiters {
                let h = self.pin(i);
                self.ready.push_back(Ready::Block {
                    waiter: w.waiter,
                    result: Ok(h),
                });
            }
        }
    }

    fn write_done(
        &mut self,
        i: usize,
        evict: bool,
        through: Vec<u64>,
        flushes: Vec<u64>,
        buf: Option<S::Buf>,
        result: Result<(), Error>,
    ) {
        if evict {
            self.reclaiming = self.reclaiming.saturating_sub(1);
        }
        let s = &mut self.slots[i];
        s.io = None;
        let lost = buf.is_none();
        if let Some(b) = buf {
            s.buf = Some(b);
        }
        if result.is_err() {
            self.stats.write_errors += 1;
        }
        let gone = s.doomed || lost || (result.is_err() && !through.is_empty());
        if result.is_err() && !gone {
            s.dirty = true;
        }
        for w in through {
            self.ready.push_back(Ready::Written { waiter: w, result });
        }
        for f in flushes {
            self.flush_step(f, result);
        }
        if gone {
            self.drop_slot(i);
        } else {
            let waiters = core::mem::take(&mut self.slots[i].waiters);
            self.rerun(waiters);
        }
    }

    /// One write flush `id` waited for ended with `result`; on the last,
    /// the store flush starts.
    fn flush_step(&mut self, id: u64, result: Result<(), Error>) {
        let Some(f) = self.flushes.get_mut(&id) else {
            return;
        };
        if let Err(e) = result {
            f.error.get_or_insert(e);
        }
        f.left = f.left.saturating_sub(1);
        if f.left == 0 {
            let tag = self.tag();
            self.ops.insert(tag, Pending::Flush { flush: id });
            self.store.start(Op::Flush { tag: Tag(tag) });
        }
    }
}
