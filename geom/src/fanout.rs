//! Fan-out and fan-in: a parent bio split into children sent to several
//! consumers, completed once the last child is back, with the first error
//! any child reported (FreeBSD's `g_std_done` with `bio_children` and
//! `bio_inbed`).
//!
//! ```text
//!  start(parent) ─▶ children (slices of parent's pages, no copy)
//!        │ park(parent, n) ─▶ cookie ─▶ io.request(consumer_i, child_i, cookie)
//!        ▼
//!  done(cookie, child, r) ─▶ child_done(cookie, r) ─▶ Some(parent, first error) on the nth
//! ```
//!
//! Cookies are below 2^32, so a class may keep other cookie spaces above.

use crate::bio::{Bio, BioError, BioResult, ConsumerId};
use crate::stack::Io;
use alloc::vec::Vec;

struct Pending {
    parent: Bio,
    left: u32,
    error: Option<BioError>,
}

/// Parents waiting for their children, keyed by cookie.
#[derive(Default)]
pub struct Fanout {
    slots: Vec<Option<Pending>>,
    free: Vec<u32>,
    parked: usize,
}

impl Fanout {
    /// No parent parked.
    pub fn new() -> Fanout {
        Fanout::default()
    }

    /// Parks `parent` until `children` completions came back; returns the
    /// cookie the children must carry. `children` must be at least 1.
    pub fn park(&mut self, parent: Bio, children: u32) -> u64 {
        let p = Pending {
            parent,
            left: children.max(1),
            error: None,
        };
        self.parked += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(p);
                u64::from(i)
            }
            None => {
                self.slots.push(Some(p));
                self.slots.len() as u64 - 1
            }
        }
    }

    /// Records one child's result. On the last child, hands back the parent
    /// with the first error seen (or success) and frees the cookie. An
    /// unknown cookie yields `None`.
    pub fn child_done(&mut self, cookie: u64, result: BioResult) -> Option<(Bio, BioResult)> {
        let i = usize::try_from(cookie).ok()?;
        let slot = self.slots.get_mut(i)?;
        let p = slot.as_mut()?;
        if let Err(e) = result {
            p.error.get_or_insert(e);
        }
        p.left -= 1;
        if p.left > 0 {
            return None;
        }
        let p = slot.take()?;
        self.free.push(i as u32);
        self.parked -= 1;
        Some((p.parent, p.error.map_or(Ok(()), Err)))
    }

    /// Sends `children` down and parks `parent` until they are all back;
    /// with no children the parent completes at once, successfully.
    pub fn start(&mut self, io: &mut Io<'_>, parent: Bio, children: Vec<(ConsumerId, Bio)>) {
        if children.is_empty() {
            io.deliver(parent, Ok(()));
            return;
        }
        let cookie = self.park(parent, children.len() as u32);
        for (c, child) in children {
            io.request(c, child, cookie);
        }
    }

    /// The [`crate::stack::Geom::done`] of a class that only fans out:
    /// records the child and delivers the parent when it is complete.
    pub fn done(&mut self, io: &mut Io<'_>, cookie: u64, result: BioResult) {
        if let Some((parent, r)) = self.child_done(cookie, result) {
            io.deliver(parent, r);
        }
    }

    /// Parents parked now.
    pub fn parked(&self) -> usize {
        self.parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bio::BioCmd;

    #[test]
    fn last_child_completes_the_parent_with_the_first_error() {
        let mut f = Fanout::new();
        let c = f.park(Bio::no_data(BioCmd::Flush, 0, 0), 3);
        assert!(f.child_done(c, Ok(())).is_none());
        assert!(f.child_done(c, Err(BioError::Orphaned)).is_none());
        let (_, r) = f.child_done(c, Err(BioError::Io)).unwrap();
        assert_eq!(r, Err(BioError::Orphaned));
        assert_eq!(f.parked(), 0);
        assert!(f.child_done(c, Ok(())).is_none(), "cookie is freed");
    }

    #[test]
    fn cookies_are_reused_and_independent() {
        let mut f = Fanout::new();
        let a = f.park(Bio::flush(), 1);
        let b = f.park(Bio::flush(), 2);
        assert_ne!(a, b);
        assert_eq!(f.child_done(a, Ok(())).unwrap().1, Ok(()));
        let c = f.park(Bio::flush(), 1);
        assert_eq!(c, a);
        assert!(f.child_done(b, Ok(())).is_none());
        assert_eq!(f.child_done(b, Ok(())).unwrap().1, Ok(()));
        assert_eq!(f.parked(), 1);
        assert!(f.child_done(99, Ok(())).is_none());
    }
}
