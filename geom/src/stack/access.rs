//! Access counts and the life of providers and geoms: the exclusive rule,
//! orphaning, withering and reaping.

use super::dispatch::Event;
use super::topology::Core;
use super::{Stack, StackError};
use crate::bio::{ConsumerId, GeomId, ProviderId};
use alloc::vec::Vec;

/// Access counts: readers, writers, exclusive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Open for reading.
    pub r: i32,
    /// Open for writing.
    pub w: i32,
    /// Open exclusively.
    pub e: i32,
}

impl Access {
    /// Open for reading.
    pub const READ: Access = Access { r: 1, w: 0, e: 0 };
    /// Open for reading and writing.
    pub const READ_WRITE: Access = Access { r: 1, w: 1, e: 0 };
    /// Open for reading and writing, and keep other writers out.
    pub const EXCLUSIVE: Access = Access { r: 1, w: 1, e: 1 };

    /// True when nobody has it open.
    pub fn is_zero(&self) -> bool {
        self.r == 0 && self.w == 0 && self.e == 0
    }
}

/// Where a geom is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeomState {
    /// Serving.
    Live,
    /// Destroyed or lost a member: its providers are orphaned; it goes
    /// away once no bio is in flight through it.
    Withering,
    /// Dropped; the id is not reused.
    Gone,
}

impl GeomState {
    /// A lowercase name for JSON.
    pub fn name(self) -> &'static str {
        match self {
            GeomState::Live => "ok",
            GeomState::Withering => "withering",
            GeomState::Gone => "gone",
        }
    }
}

impl Core {
    /// FreeBSD's `g_access`: see [`Stack::access`].
    pub(crate) fn access(
        &mut self,
        c: ConsumerId,
        dr: i32,
        dw: i32,
        de: i32,
    ) -> Result<(), StackError> {
        let (pid, mine) = {
            let con = self.consumer(c);
            (con.provider, con.access)
        };
        let p = self.provider(pid);
        let new = Access {
            r: mine.r + dr,
            w: mine.w + dw,
            e: mine.e + de,
        };
        if new.r < 0 || new.w < 0 || new.e < 0 {
            return Err(StackError::BadAccess);
        }
        if p.orphaned && (dr > 0 || dw > 0 || de > 0) {
            return Err(StackError::Orphaned(p.spec.name.clone()));
        }
        let others = Access {
            r: p.access.r - mine.r,
            w: p.access.w - mine.w,
            e: p.access.e - mine.e,
        };
        let growing = dr > 0 || dw > 0 || de > 0;
        if growing && ((others.e > 0 && (new.w > 0 || new.e > 0)) || (new.e > 0 && others.w > 0)) {
            return Err(StackError::Busy(p.spec.name.clone()));
        }
        // Propagate down first, so a refusal below leaves nothing changed.
        // A withering geom's consumers are closed by the stack itself.
        let g = p.geom;
        let below: Vec<ConsumerId> = if self.geoms[g.0 as usize].state == GeomState::Live {
            self.consumers_of(g)
        } else {
            Vec::new()
        };
        let mut done: Vec<ConsumerId> = Vec::new();
        for &bc in &below {
            if let Err(e) = self.access(bc, dr, dw, de) {
                for &u in &done {
                    let _ = self.access(u, -dr, -dw, -de);
                }
                return Err(e);
            }
            done.push(bc);
        }
        let p = self.provider_mut(pid);
        p.access.r += dr;
        p.access.w += dw;
        p.access.e += de;
        if p.orphaned && p.access.is_zero() {
            self.reap_pending = true;
        }
        self.consumer_mut(c).access = new;
        Ok(())
    }

    pub(crate) fn orphan_provider(&mut self, p: ProviderId) {
        let prov = self.provider_mut(p);
        if prov.orphaned {
            return;
        }
        prov.orphaned = true;
        for (i, c) in self.consumers.iter().enumerate() {
            if let Some(c) = c {
                if c.provider == p && c.geom.is_some() {
                    self.events.push_back(Event::Orphan {
                        consumer: ConsumerId(i as u32),
                    });
                }
            }
        }
        self.reap_pending = true;
    }

    pub(crate) fn wither(&mut self, g: GeomId) {
        if self.geoms[g.0 as usize].state != GeomState::Live {
            return;
        }
        self.geoms[g.0 as usize].state = GeomState::Withering;
        let mine: Vec<ProviderId> = self
            .providers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_ref().is_some_and(|p| p.geom == g))
            .map(|(i, _)| ProviderId(i as u32))
            .collect();
        for p in mine {
            self.orphan_provider(p);
        }
        self.reap_pending = true;
    }
}

impl Stack {
    /// Changes a consumer's access by the given deltas (FreeBSD's
    /// `g_access`). Exclusive access keeps every other writer out, and is
    /// refused while another consumer writes. A provider's geom sees the
    /// same deltas on all of its own consumers, so opening a stack opens
    /// every disk below it. Closing (negative deltas) always succeeds, also
    /// on orphaned providers.
    pub fn access(&mut self, c: ConsumerId, dr: i32, dw: i32, de: i32) -> Result<(), StackError> {
        let r = self.core.access(c, dr, dw, de);
        self.reap();
        r
    }

    /// Marks a provider dead: I/O to it fails with [`BioError::Orphaned`]
    /// from now on and each geom consuming it is told (on the next run).
    ///
    /// [`BioError::Orphaned`]: crate::bio::BioError::Orphaned
    pub fn orphan(&mut self, p: ProviderId) {
        self.core.orphan_provider(p);
    }

    /// Destroys a geom (`<class> destroy [-f] NAME`). Refused with
    /// [`StackError::Busy`] while any of its providers is open, unless
    /// `force`: then its providers are orphaned under their consumers,
    /// whose I/O fails from then on. The geom goes away once no bio is in
    /// flight through it.
    pub fn destroy_geom(&mut self, g: GeomId, force: bool) -> Result<(), StackError> {
        if self.geom_state(g) != GeomState::Live {
            return Err(StackError::Invalid(alloc::format!(
                "geom '{}' is already being destroyed",
                self.geom_name(g)
            )));
        }
        if !force {
            if let Some((_, p)) = self
                .providers()
                .find(|(_, p)| p.geom == g && !p.access.is_zero())
            {
                return Err(StackError::Busy(p.spec.name.clone()));
            }
        }
        self.core.wither(g);
        self.reap();
        Ok(())
    }

    /// Drops withering geoms that have nothing in flight, and removes
    /// orphaned providers nobody holds open. Returns true if anything went.
    pub(super) fn reap(&mut self) -> bool {
        if !self.core.reap_pending {
            return false;
        }
        self.core.reap_pending = false;
        let mut any = false;
        for i in 0..self.core.geoms.len() {
            if self.core.geoms[i].state != GeomState::Withering {
                continue;
            }
            let g = GeomId(i as u32);
            let busy_p = self
                .core
                .providers
                .iter()
                .flatten()
                .any(|p| p.geom == g && p.in_flight > 0);
            let mine = self.core.consumers_of(g);
            let busy_c = mine.iter().any(|&c| self.core.consumer(c).in_flight > 0);
            if busy_p || busy_c {
                // Checked again when the last bio comes back.
                self.core.reap_pending = true;
                continue;
            }
            for c in mine {
                let _ = self.core.detach(c);
            }
            self.geoms[i] = None;
            self.core.geoms[i].state = GeomState::Gone;
            any = true;
        }
        for i in 0..self.core.providers.len() {
            let remove = self.core.providers[i].as_ref().is_some_and(|p| {
                p.orphaned
                    && p.access.is_zero()
                    && p.in_flight == 0
                    && (p.retired || self.core.geoms[p.geom.0 as usize].state == GeomState::Gone)
            });
            let held = self
                .core
                .consumers
                .iter()
                .flatten()
                .any(|c| c.provider.0 as usize == i);
            if remove && !held {
                self.core.providers[i] = None;
                any = true;
            }
        }
        any
    }
}
