//! The table of outstanding requests, one slot each, the budget of payload
//! bytes they hold, the admission of a request's pages into the service's
//! global budget, and the reuse of pages and page lists between requests.

use super::{Connection, Rx};
use crate::nbd::wire::{Command, RequestRepr};
use alloc::vec::Vec;
use core::mem;
use geom::bio::Bio;
use geom::page::{NoMemory, Page, PageRef, SgList, PAGE_SIZE};

/// A connection's pool of spare pages is dropped after this long without
/// traffic.
pub const POOL_IDLE_MS: u64 = 1_000;

/// Most bytes of spare pages a connection keeps (and never more than its
/// buffer limit): enough for eight 1 MiB requests in flight.
pub const POOL_MAX_BYTES: u64 = 8 << 20;

/// Times a bio that comes back `NoMemory` is submitted again before the
/// client gets `ENOMEM`.
pub const NO_MEMORY_RETRIES: u8 = 100;

/// Time between those attempts, in milliseconds (on the ticks' clock).
pub const NO_MEMORY_RETRY_MS: u64 = 50;

/// Most page lists a connection keeps for reuse (one per request in flight
/// at the depths clients use).
const SG_POOL_LISTS: usize = 16;

/// A finished request waiting to be sent.
#[derive(Debug, Default)]
pub(super) struct Reply {
    /// The read's pages, for a successful read.
    pub(super) bio: Option<Bio>,
    /// `NBD_E*` value, 0 for success.
    pub(super) error: u32,
    /// Text for a structured error chunk.
    pub(super) message: &'static str,
    /// Block status descriptors (`u32` length, `u32` flags, big-endian).
    pub(super) extents: Vec<u8>,
}

#[derive(Debug, Default)]
pub(super) enum SlotState {
    #[default]
    Free,
    /// A write whose payload is arriving.
    Receiving(SgList),
    /// A bio waiting for [`Connection::next_request`].
    Ready(Bio),
    /// The bio is in the stack.
    Submitted,
    /// Done; the reply is queued or being sent.
    Reply(Reply),
}

/// One outstanding request.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) cookie: u64,
    pub(super) command: Command,
    pub(super) offset: u64,
    pub(super) length: u32,
    /// The request's command flags.
    pub(super) flags: u16,
    /// Payload bytes held in pages for this request (counted in the budget).
    pub(super) held: u64,
    /// Times its bio came back `NoMemory` and was parked to go again.
    pub(super) retries: u8,
    pub(super) state: SlotState,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            cookie: 0,
            command: Command::Read,
            offset: 0,
            length: 0,
            flags: 0,
            held: 0,
            retries: 0,
            state: SlotState::Free,
        }
    }
}

impl Connection {
    pub(super) fn can_start_request(&self) -> bool {
        self.live < self.cfg.max_in_flight && self.held_bytes < self.buffer_limit
    }

    pub(super) fn alloc_slot(&mut self, r: &RequestRepr) -> u32 {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[idx as usize];
        *slot = Slot {
            cookie: r.cookie,
            command: r.command,
            offset: r.offset,
            length: r.length,
            flags: r.flags,
            held: 0,
            retries: 0,
            state: SlotState::Free,
        };
        self.live += 1;
        idx
    }

    pub(super) fn free_slot(&mut self, idx: usize) {
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        if matches!(slot.state, SlotState::Free) {
            return;
        }
        self.held_bytes -= mem::take(&mut slot.held);
        let state = mem::take(&mut slot.state);
        self.live -= 1;
        self.free.push(idx as u32);
        if let SlotState::Reply(Reply { bio: Some(bio), .. }) = state {
            if self.closing.is_none() {
                self.recycle(bio.sg);
            }
        }
    }

    /// Fresh pages for `len` bytes, from the pool where it has some, or
    /// [`NoMemory`] (the pages taken so far are freed). A reused page
    /// holds old data; every user overwrites it whole (a write's payload,
    /// a successful read's data).
    pub(super) fn alloc_sg(&mut self, len: usize) -> Result<SgList, NoMemory> {
        let pages = len.div_ceil(PAGE_SIZE);
        let mut sg = match self.sg_pool.iter().position(|s| s.capacity() >= pages) {
            Some(i) => self.sg_pool.swap_remove(i),
            None => SgList::try_with_capacity(pages)?,
        };
        let mut left = len;
        while left > 0 {
            let n = left.min(PAGE_SIZE);
            let page = match self.pool.pop() {
                Some(p) => p,
                None => Page::try_new_zeroed()?,
            };
            sg.push(PageRef {
                page,
                offset: 0,
                len: n as u32,
            });
            left -= n;
        }
        Ok(sg)
    }

    /// Bytes of spare pages kept for reuse.
    fn pool_bytes(&self) -> u64 {
        (self.pool.len() * PAGE_SIZE) as u64
    }

    /// Payload bytes held in memory: the requests' pages (and block
    /// status descriptors) and the spare pages.
    pub fn budget_held(&self) -> u64 {
        self.held_bytes + self.pool_bytes()
    }

    /// `Some(bytes)` while a checked read or write waits for
    /// [`Connection::grant`]: what its pages add to
    /// [`Connection::budget_held`] (spare pages count already).
    pub fn budget_wanted(&self) -> Option<u64> {
        match self.rx {
            Rx::Admit(r) if self.closing.is_none() => {
                Some(u64::from(r.length).saturating_sub(self.pool_bytes()))
            }
            _ => None,
        }
    }

    /// Admits the waiting read or write: allocates its pages and goes on
    /// with it. False, with the request still waiting and nothing more
    /// held, if the heap has no room for them.
    pub fn grant(&mut self) -> bool {
        let Rx::Admit(r) = self.rx else {
            return true;
        };
        if self.closing.is_some() {
            return true;
        }
        let Ok(sg) = self.alloc_sg(r.length as usize) else {
            return false;
        };
        self.rx = Rx::ReqHeader;
        self.start_admitted(&r, sg);
        true
    }

    /// Admits a waiting request without the service where that is the
    /// connection's to decide: always when it is not
    /// [`super::ServerConfig::budgeted`], else when spare pages cover it.
    pub(super) fn admit_self(&mut self) {
        if matches!(self.rx, Rx::Admit(_))
            && (!self.cfg.budgeted || self.budget_wanted() == Some(0))
        {
            self.grant();
        }
    }

    /// A bio came back `NoMemory`: true (and the bio parked, its pages
    /// still held, to be submitted again after [`NO_MEMORY_RETRY_MS`])
    /// unless it has been tried [`NO_MEMORY_RETRIES`] times; else false
    /// and the bio is handed back in `bio`.
    pub(super) fn park_for_retry(&mut self, idx: usize, bio: &mut Option<Bio>) -> bool {
        let Some(slot) = self.slots.get_mut(idx) else {
            return false;
        };
        if slot.retries >= NO_MEMORY_RETRIES {
            return false;
        }
        let Some(b) = bio.take() else {
            return false;
        };
        slot.retries += 1;
        slot.state = SlotState::Ready(b);
        self.retry
            .push_back((idx as u32, self.now_ms + NO_MEMORY_RETRY_MS));
        true
    }

    /// Parked bios whose time has come go back to be submitted.
    pub(super) fn retry_due(&mut self) {
        while let Some(&(idx, at)) = self.retry.front() {
            if at > self.now_ms {
                break;
            }
            self.retry.pop_front();
            self.ready.push_back(idx);
        }
    }

    /// Drops the spare pages and page lists (memory is short).
    pub fn trim(&mut self) {
        self.pool = Vec::new();
        self.sg_pool = Vec::new();
    }

    /// Keeps the pages of a finished request for later ones, when nothing
    /// else holds them and the pool has room; and the list itself, when it
    /// is a large one.
    pub(super) fn recycle(&mut self, mut sg: SgList) {
        let cap = (self.buffer_limit.min(POOL_MAX_BYTES) / PAGE_SIZE as u64) as usize;
        for r in sg.iter() {
            if self.pool.len() >= cap {
                break;
            }
            if r.page.share_count() == 1 {
                self.pool.push(r.page.clone());
            }
        }
        if sg.capacity() > 4 && self.sg_pool.len() < SG_POOL_LISTS {
            sg.clear();
            self.sg_pool.push(sg);
        }
    }
}
