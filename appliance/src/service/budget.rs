//! The global budget of payload bytes: every session of every protocol
//! draws the pages of its requests from it, so the sum cannot outgrow the
//! memory the platform set aside, however many clients pipeline large
//! requests at once.
//!
//! ```text
//!  session: header read ─▶ budget_wanted() = Some(n)
//!  service: admit(id, n, in use) ── fits, and first in line ─▶ budget_grant() ─▶ pages
//!                                └─ else: queued (FIFO); the session reads
//!                                   nothing more, its socket fills (backpressure)
//!  completions release pages ─▶ the service admits the head of the queue again
//! ```
//!
//! Rules:
//!
//! - **Fits**: a request is admitted when the bytes held by every session
//!   plus its own stay within the limit.
//! - **Larger than the whole budget**: admitted alone, when nothing else
//!   is held (so every request the protocol accepts makes progress; NBD
//!   advertises its maximum payload and refuses larger ones itself).
//! - **Fair**: waiting connections are served in the order they first
//!   waited; while one waits, no later connection is admitted, so a large
//!   request is not starved by a stream of small ones.
//! - **No memory**: an admitted request whose pages the heap could not
//!   give goes back to the head of the line, and nothing is admitted until
//!   held bytes fall below what they were, or [`NO_MEMORY_RETRY_MS`]
//!   passes.

use super::ConnId;
use alloc::collections::VecDeque;

/// After an admitted request met an exhausted heap, admissions pause
/// this long at most (unless completions release memory sooner).
pub const NO_MEMORY_RETRY_MS: u64 = 50;

/// What happened to the budget since the service started, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetCounters {
    /// Requests admitted.
    pub grants: u64,
    /// Requests that had to wait before they were admitted.
    pub waits: u64,
    /// Requests larger than the whole budget, admitted alone.
    pub oversized: u64,
    /// Admitted requests whose pages the heap could not give.
    pub no_memory: u64,
    /// Most bytes held at once, as seen when admitting.
    pub peak_bytes: u64,
}

/// The global payload budget: its limit, the connections waiting in line,
/// and its counters. Bytes in use are the sessions' own figures
/// ([`net::session::Session::budget_held`]), summed by the caller.
#[derive(Debug)]
pub struct Budget {
    limit_bytes: u64,
    waiting: VecDeque<ConnId>,
    /// Bytes held, and the time, when an admitted request last met an
    /// exhausted heap.
    starved: Option<(u64, u64)>,
    counters: BudgetCounters,
}

impl Budget {
    /// A budget of `limit_bytes` (at least 1).
    pub fn new(limit_bytes: u64) -> Budget {
        Budget {
            limit_bytes: limit_bytes.max(1),
            waiting: VecDeque::new(),
            starved: None,
            counters: BudgetCounters::default(),
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit_bytes
    }

    /// Changes the limit (at boot, before anything is held).
    pub fn set_limit(&mut self, bytes: u64) {
        self.limit_bytes = bytes.max(1);
    }

    /// The counters.
    pub fn counters(&self) -> BudgetCounters {
        self.counters
    }

    /// Connections waiting to be admitted.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The connection first in line.
    pub fn head(&self) -> Option<ConnId> {
        self.waiting.front().copied()
    }

    /// Connection `id` wants `bytes` more while `in_use` bytes are held by
    /// every session together, at `now_ms`: true if it is admitted now;
    /// else it waits in line (once) and is asked again later.
    pub fn admit(&mut self, id: ConnId, bytes: u64, in_use: u64, now_ms: u64) -> bool {
        self.counters.peak_bytes = self.counters.peak_bytes.max(in_use);
        if let Some((held, at)) = self.starved {
            if in_use < held || now_ms.saturating_sub(at) >= NO_MEMORY_RETRY_MS {
                self.starved = None;
            }
        }
        let first = self.waiting.front().is_none_or(|&h| h == id);
        let fits = in_use.saturating_add(bytes) <= self.limit_bytes || in_use == 0;
        if first && fits && self.starved.is_none() {
            if self.waiting.front() == Some(&id) {
                self.waiting.pop_front();
            }
            self.counters.grants += 1;
            if bytes > self.limit_bytes {
                self.counters.oversized += 1;
            }
            self.counters.peak_bytes = self.counters.peak_bytes.max(in_use + bytes);
            return true;
        }
        if !self.waiting.contains(&id) {
            self.waiting.push_back(id);
            self.counters.waits += 1;
        }
        false
    }

    /// Connection `id` was admitted but the heap could not give its pages
    /// (with `in_use` bytes held, at `now_ms`): it goes back to the head
    /// of the line and admissions pause.
    pub fn no_memory(&mut self, id: ConnId, in_use: u64, now_ms: u64) {
        self.counters.no_memory += 1;
        self.forget(id);
        self.waiting.push_front(id);
        self.starved = Some((in_use, now_ms));
    }

    /// Connection `id` waits no more (it was closed, or wants nothing).
    pub fn forget(&mut self, id: ConnId) {
        self.waiting.retain(|&w| w != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn admits_what_fits_and_queues_the_rest() {
        let mut b = Budget::new(100 * MIB);
        assert!(b.admit(1, 40 * MIB, 0, 0));
        assert!(b.admit(2, 40 * MIB, 40 * MIB, 0));
        assert!(b.admit(3, 20 * MIB, 80 * MIB, 0), "exactly the limit");
        assert!(!b.admit(4, 1, 100 * MIB, 0));
        assert_eq!((b.waiting(), b.head()), (1, Some(4)));
        // Asking again does not queue twice.
        assert!(!b.admit(4, 1, 100 * MIB, 0));
        assert_eq!(b.waiting(), 1);
        assert!(b.admit(4, 1, 99 * MIB, 0));
        assert_eq!(b.waiting(), 0);
        let c = b.counters();
        assert_eq!((c.grants, c.waits, c.oversized), (4, 1, 0));
        assert_eq!(c.peak_bytes, 100 * MIB);
    }

    #[test]
    fn waiting_connections_are_served_in_order() {
        let mut b = Budget::new(64 * MIB);
        assert!(b.admit(1, 64 * MIB, 0, 0));
        // A large request waits first; small ones that would fit wait
        // behind it instead of overtaking it.
        assert!(!b.admit(2, 32 * MIB, 64 * MIB, 0));
        assert!(!b.admit(3, 4096, 60 * MIB, 0));
        assert!(!b.admit(4, 4096, 40 * MIB, 0));
        assert!(!b.admit(3, 4096, 40 * MIB, 0), "3 still behind 2");
        assert!(b.admit(2, 32 * MIB, 32 * MIB, 0));
        assert!(!b.admit(4, 4096, 64 * MIB, 0), "4 is behind 3");
        assert!(b.admit(3, 4096, 32 * MIB, 0));
        assert!(b.admit(4, 4096, 32 * MIB, 0));
        assert_eq!(b.waiting(), 0);
        // A connection that leaves gives up its place.
        assert!(!b.admit(5, MIB, 64 * MIB, 0));
        assert!(!b.admit(6, MIB, 64 * MIB, 0));
        b.forget(5);
        assert_eq!(b.head(), Some(6));
    }

    #[test]
    fn a_request_larger_than_the_budget_is_admitted_alone() {
        let mut b = Budget::new(16 * MIB);
        assert!(!b.admit(1, 32 * MIB, 4096, 0), "not while anything is held");
        assert!(!b.admit(2, 4096, 4096, 0), "others wait behind it");
        assert!(b.admit(1, 32 * MIB, 0, 0), "alone");
        assert!(!b.admit(2, 4096, 32 * MIB, 0));
        assert!(b.admit(2, 4096, 0, 0));
        assert_eq!(b.counters().oversized, 1);
        assert_eq!(b.counters().peak_bytes, 32 * MIB);
    }

    #[test]
    fn no_memory_pauses_admissions_until_memory_comes_back() {
        let mut b = Budget::new(100 * MIB);
        assert!(b.admit(1, MIB, 10 * MIB, 0));
        b.no_memory(1, 10 * MIB, 1000);
        assert_eq!(b.head(), Some(1));
        assert!(!b.admit(1, MIB, 10 * MIB, 1010), "paused");
        assert!(!b.admit(2, MIB, 10 * MIB, 1010));
        assert!(b.admit(1, MIB, 9 * MIB, 1020), "memory was released");
        b.no_memory(1, 10 * MIB, 2000);
        assert!(!b.admit(1, MIB, 10 * MIB, 2000 + NO_MEMORY_RETRY_MS - 1));
        assert!(
            b.admit(1, MIB, 10 * MIB, 2000 + NO_MEMORY_RETRY_MS),
            "retry time"
        );
        assert_eq!(b.head(), Some(2));
        assert_eq!(b.counters().no_memory, 2);
    }
}
