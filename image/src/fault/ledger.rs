//! What the campaign knows a disk must hold: every sector's history of
//! writes, as the client saw them issued, completed and made durable.
//!
//! Each 512-byte sector a write covers is stamped with the write's id and
//! the sector's own index, so a read tells which write it returns, or that
//! it returns none (garbage) or one meant for another sector.
//!
//! Order is the client's knowledge: write A is *before* write B when A's
//! reply arrived before B was sent. A successful FLUSH sent at time t
//! makes durable every write completed before t; a FUA write is durable
//! when it completes; a clean stop makes every completed write durable.
//!
//! ```text
//!  sector history:  floor {durable writes, none before another}
//!                   later [writes since, acked, failed or in flight]
//!
//!                   shadow [durable values a newer durable write
//!                          replaced, that reads in flight may return]
//!
//!  live read issued at t:  floor ∪ later ∪ shadow, minus every write
//!                          that is before a write completed OK before t
//!  after a power cut:      floor ∪ later (what was not flushed may or
//!                          may not have reached the medium)
//! ```
//!
//! A write that failed, or that was in flight at a cut, may have reached
//! any of its sectors, so it stays a possible value until a later write
//! supersedes it. Reading a sector after recovery collapses its history
//! to what was read: from then on the disk must keep returning it.

use std::collections::HashMap;
use std::fmt;

/// Bytes per stamped sector.
pub const SECTOR: u64 = 512;
/// The first word of every stamped sector.
const MAGIC: u64 = u64::from_le_bytes(*b"STRATAfc");
/// Id of the content every sector starts with: zeroes.
const BASELINE: u64 = 0;

/// One write as the client saw it.
#[derive(Clone, Copy, Debug)]
struct Write {
    /// Clock value when it was sent.
    issued: u64,
    /// Clock value when its reply arrived (`None`: in flight).
    done: Option<u64>,
    /// It completed successfully.
    ok: bool,
    /// It wrote zeroes (write-zeroes) rather than stamps.
    zero: bool,
}

impl Write {
    /// True when `self`'s reply arrived before `other` was sent.
    fn before(&self, other: &Write) -> bool {
        self.done.is_some_and(|d| d < other.issued)
    }
}

#[derive(Clone, Debug, Default)]
struct History {
    floor: Vec<u64>,
    later: Vec<u64>,
    /// Values a newer durable write pushed out of `floor` while a read
    /// that may still return them was in flight (live reads only).
    shadow: Vec<u64>,
}

/// What a sector read back as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// All zeroes.
    Zero,
    /// A valid stamp: write `id` for sector `sector`.
    Stamp {
        /// The sector the stamp was made for.
        sector: u64,
        /// The write that made it.
        id: u64,
    },
    /// Neither zeroes nor a valid stamp of this campaign.
    Junk,
}

/// A sector that does not hold what it must.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bad {
    /// Byte offset of the sector in the export.
    pub offset: u64,
    /// What it holds.
    pub found: Found,
    /// The writes it may hold.
    pub allowed: Vec<u64>,
    /// True when it holds an older value than a durable one (lost data);
    /// false for garbage (never written here, or damaged).
    pub lost: bool,
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.found {
            Found::Zero => "zeroes".to_string(),
            Found::Stamp { sector, id } if sector * SECTOR == self.offset => format!("write {id}"),
            Found::Stamp { sector, id } => {
                format!("write {id} meant for offset {}", sector * SECTOR)
            }
            Found::Junk => "bytes no write made".to_string(),
        };
        let allowed: Vec<String> = self
            .allowed
            .iter()
            .map(|&a| {
                if a == BASELINE {
                    "zeroes".into()
                } else {
                    format!("write {a}")
                }
            })
            .collect();
        write!(
            f,
            "offset {}: {what}, expected {} ({})",
            self.offset,
            allowed.join(" or "),
            if self.lost { "lost" } else { "garbage" }
        )
    }
}

/// The model of one export.
#[derive(Clone, Debug)]
pub struct Ledger {
    nonce: u64,
    clock: u64,
    next_id: u64,
    writes: HashMap<u64, Write>,
    sectors: Vec<History>,
    /// Sectors whose `later` is not empty.
    dirty: Vec<u32>,
    in_dirty: Vec<bool>,
}

impl Ledger {
    /// A ledger for an export of `size` bytes that reads as zeroes.
    /// `nonce` tells this campaign's stamps from any other's.
    pub fn new(size: u64, nonce: u64) -> Ledger {
        let n = usize::try_from(size / SECTOR).expect("export size fits in memory");
        let mut writes = HashMap::new();
        writes.insert(
            BASELINE,
            Write {
                issued: 0,
                done: Some(0),
                ok: true,
                zero: true,
            },
        );
        Ledger {
            nonce,
            clock: 1,
            next_id: 1,
            writes,
            sectors: vec![
                History {
                    floor: vec![BASELINE],
                    later: Vec::new(),
                    shadow: Vec::new(),
                };
                n
            ],
            dirty: Vec::new(),
            in_dirty: vec![false; n],
        }
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.sectors.len() as u64 * SECTOR
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The clock now: pass it to [`Ledger::check_live`] for a read sent now.
    pub fn now(&mut self) -> u64 {
        self.tick()
    }

    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        assert!(
            offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR),
            "unaligned range"
        );
        assert!(offset + len <= self.size(), "range past the end");
        (offset / SECTOR) as usize..((offset + len) / SECTOR) as usize
    }

    /// A write is about to be sent; returns its id. `zero` for
    /// write-zeroes, else the data must come from [`Ledger::stamp`].
    pub fn begin_write(&mut self, offset: u64, len: u64, zero: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let issued = self.tick();
        self.writes.insert(
            id,
            Write {
                issued,
                done: None,
                ok: false,
                zero,
            },
        );
        for s in self.range(offset, len) {
            self.sectors[s].later.push(id);
            if !self.in_dirty[s] {
                self.in_dirty[s] = true;
                self.dirty.push(s as u32);
            }
        }
        id
    }

    /// A write's reply arrived. A successful FUA write is durable now.
    pub fn end_write(&mut self, id: u64, offset: u64, len: u64, ok: bool, fua: bool) {
        let done = self.tick();
        let w = self.writes.get_mut(&id).expect("known write");
        w.done = Some(done);
        w.ok = ok;
        if ok && fua {
            for s in self.range(offset, len) {
                self.promote(s, &[id]);
            }
        }
    }

    /// Data for write `id` at `offset` (a whole number of sectors).
    pub fn stamp(&self, id: u64, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        for (i, chunk) in out.chunks_mut(SECTOR as usize).enumerate() {
            stamp_sector(chunk, self.nonce, offset / SECTOR + i as u64, id);
        }
        out
    }

    /// A flush is about to be sent; returns its clock value for
    /// [`Ledger::end_flush`].
    pub fn begin_flush(&mut self) -> u64 {
        self.tick()
    }

    /// A flush sent at `issued` succeeded: writes completed before then
    /// are durable. `horizon` is the clock value when the oldest read
    /// still in flight was sent (history it may still return is kept).
    pub fn end_flush(&mut self, issued: u64, horizon: u64) {
        self.tick();
        self.promote_completed_before(issued, horizon);
    }

    /// The appliance stopped cleanly (it flushes as it stops): every write
    /// completed so far is durable.
    pub fn clean_stop(&mut self) {
        let now = self.tick();
        self.promote_completed_before(now, now);
    }

    /// A power cut or a stop: writes still in flight will never complete.
    pub fn abandon_in_flight(&mut self) {
        let now = self.tick();
        for w in self.writes.values_mut() {
            if w.done.is_none() {
                w.done = Some(now);
            }
        }
    }

    fn promote_completed_before(&mut self, t: u64, horizon: u64) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut keep = Vec::with_capacity(dirty.len());
        for s in dirty {
            let s = s as usize;
            let ids: Vec<u64> = self.sectors[s]
                .later
                .iter()
                .copied()
                .filter(|id| {
                    let w = &self.writes[id];
                    w.ok && w.done.is_some_and(|d| d < t)
                })
                .collect();
            if !ids.is_empty() {
                self.promote(s, &ids);
            }
            self.prune(s, horizon);
            if self.sectors[s].later.is_empty() && self.sectors[s].shadow.is_empty() {
                self.in_dirty[s] = false;
            } else {
                keep.push(s as u32);
            }
        }
        self.dirty = keep;
    }

    /// Makes `ids` (writes to sector `s`) part of its durable floor.
    fn promote(&mut self, s: usize, ids: &[u64]) {
        let h = &mut self.sectors[s];
        let mut all: Vec<u64> = h.floor.iter().chain(ids).copied().collect();
        all.sort_unstable();
        all.dedup();
        let w = &self.writes;
        let maximal: Vec<u64> = all
            .iter()
            .copied()
            .filter(|a| !all.iter().any(|b| w[a].before(&w[b])))
            .collect();
        h.later.retain(|id| !maximal.contains(id));
        // A floor value a newer one replaces is still a right answer to a
        // read sent before that one completed: kept for live reads until
        // `prune` finds no such read left.
        for id in &h.floor {
            if !maximal.contains(id) && !h.shadow.contains(id) {
                h.shadow.push(*id);
            }
        }
        h.floor = maximal;
    }

    /// Forgets writes to `s` that can no longer be read: before a floor
    /// write that completed before `horizon`.
    fn prune(&mut self, s: usize, horizon: u64) {
        let w = &self.writes;
        let h = &mut self.sectors[s];
        let floor = &h.floor;
        let readable = |id: &u64| {
            !floor
                .iter()
                .any(|f| w[id].before(&w[f]) && w[f].done.is_some_and(|d| d < horizon))
        };
        h.later.retain(readable);
        h.shadow.retain(readable);
    }

    /// The writes sector `s` may return to a read sent at `issued`
    /// (`None`: after a power cut).
    fn allowed(&self, s: usize, issued: Option<u64>) -> Vec<u64> {
        let h = &self.sectors[s];
        let Some(t) = issued else {
            return h.floor.iter().chain(&h.later).copied().collect();
        };
        let all: Vec<u64> = h
            .floor
            .iter()
            .chain(&h.later)
            .chain(&h.shadow)
            .copied()
            .collect();
        let w = &self.writes;
        let known: Vec<&Write> = all
            .iter()
            .map(|id| &w[id])
            .filter(|x| x.ok && x.done.is_some_and(|d| d < t))
            .collect();
        all.iter()
            .copied()
            .filter(|a| !known.iter().any(|k| w[a].before(k)))
            .collect()
    }

    fn classify(&self, s: usize, data: &[u8], allowed: &[u64]) -> Result<u64, Bad> {
        self.classify_as(s, data, allowed, false)
    }

    /// [`Ledger::classify`]; with `torn`, a sector that is a byte-wise mix
    /// of values it may hold also passes (see [`Ledger::check_live`]).
    fn classify_as(&self, s: usize, data: &[u8], allowed: &[u64], torn: bool) -> Result<u64, Bad> {
        let found = decode(data, self.nonce);
        let hit = match found {
            Found::Junk if torn && allowed.len() > 1 && self.is_mix(s, data, allowed) => {
                allowed.iter().copied().max()
            }
            Found::Zero => allowed
                .iter()
                .copied()
                .filter(|a| self.writes[a].zero)
                .max(),
            Found::Stamp { sector, id } if sector == s as u64 => {
                allowed.contains(&id).then_some(id)
            }
            _ => None,
        };
        hit.ok_or_else(|| Bad {
            offset: s as u64 * SECTOR,
            found,
            allowed: allowed.to_vec(),
            // Zeroes or a stamp of this sector: a value it once held.
            lost: match found {
                Found::Zero => true,
                Found::Stamp { sector, id } => sector == s as u64 && id < self.next_id,
                Found::Junk => false,
            },
        })
    }

    /// True when every byte of `data` is the same byte of one of the
    /// values sector `s` may hold: what a read racing a write of the same
    /// sector may return (no block device, NBD included, makes a read
    /// atomic against a write in flight over the same bytes).
    fn is_mix(&self, s: usize, data: &[u8], allowed: &[u64]) -> bool {
        let values: Vec<Vec<u8>> = allowed
            .iter()
            .map(|&id| {
                if self.writes.get(&id).is_none_or(|w| w.zero) {
                    vec![0; SECTOR as usize]
                } else {
                    self.stamp(id, s as u64 * SECTOR, SECTOR)
                }
            })
            .collect();
        data.iter()
            .enumerate()
            .all(|(i, b)| values.iter().any(|v| v[i] == *b))
    }

    /// Checks `data`, read at `offset` by a read sent at clock `issued`,
    /// while the appliance runs. Returns the sectors that are wrong. A
    /// sector that mixes, byte by byte, values it may hold passes: the
    /// read raced a write of it.
    pub fn check_live(&self, offset: u64, data: &[u8], issued: u64) -> Vec<Bad> {
        let r = self.range(offset, data.len() as u64);
        let start = r.start;
        r.filter_map(|s| {
            let chunk = &data[(s - start) * SECTOR as usize..][..SECTOR as usize];
            self.classify_as(s, chunk, &self.allowed(s, Some(issued)), true)
                .err()
        })
        .collect()
    }

    /// Checks `data` read at `offset` after a restart, and makes what was
    /// read the sectors' durable content: the disk must keep returning it.
    /// A wrong sector becomes what was read too, so one loss is counted
    /// once.
    pub fn check_recovered(&mut self, offset: u64, data: &[u8]) -> Vec<Bad> {
        let r = self.range(offset, data.len() as u64);
        let start = r.start;
        let mut bad = Vec::new();
        for s in r {
            let chunk = &data[(s - start) * SECTOR as usize..][..SECTOR as usize];
            let allowed = self.allowed(s, None);
            let id = match self.classify(s, chunk, &allowed) {
                Ok(id) => Some(id),
                Err(b) => {
                    let id = match b.found {
                        Found::Zero => Some(BASELINE),
                        Found::Stamp { sector, id }
                            if sector == s as u64 && self.writes.contains_key(&id) =>
                        {
                            Some(id)
                        }
                        _ => None,
                    };
                    bad.push(b);
                    id
                }
            };
            let h = &mut self.sectors[s];
            h.later.clear();
            h.shadow.clear();
            // Garbage leaves nothing it may hold: it is reported again
            // until a write replaces it.
            h.floor = id.into_iter().collect();
            self.in_dirty[s] = false;
        }
        self.dirty.retain(|&s| {
            let h = &self.sectors[s as usize];
            !h.later.is_empty() || !h.shadow.is_empty()
        });
        bad
    }

    /// Writes the campaign has sent so far.
    pub fn writes_sent(&self) -> u64 {
        self.next_id - 1
    }
}

fn stamp_sector(out: &mut [u8], nonce: u64, sector: u64, id: u64) {
    out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&nonce.to_le_bytes());
    out[16..24].copy_from_slice(&sector.to_le_bytes());
    out[24..32].copy_from_slice(&id.to_le_bytes());
    // Filler that differs per write and per sector (xorshift64*).
    let mut x = nonce ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector.rotate_left(32) | 1;
    for c in out[32..508].chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    let crc = crc32fast::hash(&out[..508]);
    out[508..512].copy_from_slice(&crc.to_le_bytes());
}

/// What one 512-byte sector holds.
pub fn decode(data: &[u8], nonce: u64) -> Found {
    if data.iter().all(|&b| b == 0) {
        return Found::Zero;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(data[508..512].try_into().expect("4 bytes"));
    if word(0) != MAGIC || word(8) != nonce || crc32fast::hash(&data[..508]) != crc {
        return Found::Junk;
    }
    let (sector, id) = (word(16), word(24));
    let mut check = [0u8; SECTOR as usize];
    stamp_sector(&mut check, nonce, sector, id);
    if check[..] != data[..] {
        return Found::Junk;
    }
    Found::Stamp { sector, id }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 4096;

    fn write(l: &mut Ledger, off: u64, len: u64) -> (u64, Vec<u8>) {
        let id = l.begin_write(off, len, false);
        (id, l.stamp(id, off, len))
    }

    #[test]
    fn stamps_name_their_write_and_sector() {
        let l = Ledger::new(16 * K, 7);
        let d = l.stamp(3, K, K);
        assert_eq!(decode(&d[512..1024], 7), Found::Stamp { sector: 9, id: 3 });
        assert_eq!(decode(&d[..512], 8), Found::Junk);
        let mut torn = d[..512].to_vec();
        torn[100] ^= 1;
        assert_eq!(decode(&torn, 7), Found::Junk);
        assert_eq!(decode(&[0; 512], 7), Found::Zero);
    }

    #[test]
    fn live_reads_see_the_last_completed_write_or_one_in_flight() {
        let mut l = Ledger::new(16 * K, 1);
        let (a, da) = write(&mut l, 0, K);
        let t0 = l.now();
        // Before A completes, a read may return zeroes or A.
        assert!(l.check_live(0, &[0; K as usize], t0).is_empty());
        assert!(l.check_live(0, &da, t0).is_empty());
        l.end_write(a, 0, K, true, false);
        let t1 = l.now();
        let stale = l.check_live(0, &[0; K as usize], t1);
        assert_eq!(stale.len(), 8);
        assert!(stale[0].lost);
        // A read sent before A completed may still return zeroes.
        assert!(l.check_live(0, &[0; K as usize], t0).is_empty());
        let (b, db) = write(&mut l, 0, K);
        let t2 = l.now();
        assert!(l.check_live(0, &da, t2).is_empty());
        assert!(l.check_live(0, &db, t2).is_empty());
        l.end_write(b, 0, K, false, false);
        // B failed: A or B, in any mix of sectors.
        let mut mix = da.clone();
        mix[..512].copy_from_slice(&db[..512]);
        assert!(l.check_live(0, &mix, l.clock + 1).is_empty());
        // A read racing B may return a sector torn between A and B, but
        // not after recovery, and not torn with bytes neither wrote.
        let mut torn = da.clone();
        torn[100..300].copy_from_slice(&db[100..300]);
        assert!(l.check_live(0, &torn, l.clock + 1).is_empty());
        let mut junk = torn.clone();
        junk[200] ^= 0x5a;
        junk[201] ^= 0xa5;
        assert_eq!(l.check_live(0, &junk, l.clock + 1).len(), 1);
        assert_eq!(l.clone().check_recovered(0, &torn).len(), 1);
        // Someone else's sector is garbage.
        let other = l.stamp(a, K, K);
        let g = l.check_live(0, &other, l.clock + 1);
        assert_eq!(g.len(), 8);
        assert!(!g[0].lost);
    }

    /// A read sent while B (which replaces the durable A) is in flight
    /// may return A even after B completed and a flush made B durable:
    /// the flush pushes A out of the floor, not out of that read's
    /// answers. A read sent after B completed may not.
    #[test]
    fn a_read_in_flight_keeps_the_value_a_flushed_write_replaced() {
        let mut l = Ledger::new(16 * K, 1);
        let (a, da) = write(&mut l, 0, K);
        l.end_write(a, 0, K, true, false);
        let f = l.begin_flush();
        l.end_flush(f, u64::MAX);
        let (b, db) = write(&mut l, 0, K);
        let read = l.now();
        l.end_write(b, 0, K, true, false);
        let f = l.begin_flush();
        l.end_flush(f, read);
        assert!(
            l.check_live(0, &da, read).is_empty(),
            "the racing read may see A"
        );
        assert!(l.check_live(0, &db, read).is_empty());
        let after = l.now();
        assert_eq!(l.check_live(0, &da, after).len(), 8, "a later read may not");
        // Once no read from before B is in flight, A is forgotten.
        let f = l.begin_flush();
        l.end_flush(f, u64::MAX);
        assert!(l.sectors[0].shadow.is_empty());
        assert_eq!(l.check_live(0, &da, read).len(), 8);
        // A power cut never brings A back.
        assert_eq!(l.clone().check_recovered(0, &da).len(), 8);
    }

    #[test]
    fn a_flush_makes_completed_writes_durable_and_only_those() {
        let mut l = Ledger::new(16 * K, 1);
        let (a, da) = write(&mut l, 0, K);
        l.end_write(a, 0, K, true, false);
        let (b, db) = write(&mut l, K, K);
        let f = l.begin_flush();
        // C is sent after the flush: not covered by it.
        let (c, dc) = write(&mut l, 2 * K, K);
        l.end_write(b, K, K, true, false);
        l.end_write(c, 2 * K, K, true, false);
        l.end_flush(f, u64::MAX);
        l.abandon_in_flight();
        // A must survive; B (in flight at the flush) and C may be lost.
        assert!(l.check_recovered(K, &[0; K as usize]).is_empty());
        assert!(l.check_recovered(2 * K, &dc).is_empty());
        let lost = l.check_recovered(0, &[0; K as usize]);
        assert_eq!(lost.len(), 8);
        assert!(lost.iter().all(|b| b.lost));
        // What was read is what the disk must keep returning.
        let t = l.now();
        assert!(l.check_live(2 * K, &dc, t).is_empty());
        assert_eq!(l.check_live(K, &db, t).len(), 8);
        let _ = da;
    }

    #[test]
    fn fua_and_a_clean_stop_are_durable() {
        let mut l = Ledger::new(16 * K, 1);
        let z = [0u8; K as usize];
        let (a, _) = write(&mut l, 0, K);
        l.end_write(a, 0, K, true, true);
        let (b, _) = write(&mut l, K, K);
        l.end_write(b, K, K, true, false);
        // A was written with FUA; B was never flushed.
        assert_eq!(l.check_recovered(0, &z).len(), 8);
        assert!(l.check_recovered(K, &z).is_empty());
        let (c, _) = write(&mut l, 2 * K, K);
        l.end_write(c, 2 * K, K, true, false);
        l.clean_stop();
        assert_eq!(l.check_recovered(2 * K, &z).len(), 8);
    }

    #[test]
    fn overlapping_writes_in_flight_may_land_in_either_order() {
        let mut l = Ledger::new(16 * K, 1);
        let (a, da) = write(&mut l, 0, K);
        let (b, db) = write(&mut l, 0, K);
        l.end_write(a, 0, K, true, false);
        l.end_write(b, 0, K, true, false);
        let f = l.begin_flush();
        l.end_flush(f, u64::MAX);
        // Both are durable candidates; zeroes are not.
        let t = l.now();
        assert!(l.check_live(0, &da, t).is_empty());
        assert!(l.check_live(0, &db, t).is_empty());
        assert_eq!(l.check_live(0, &[0; K as usize], t).len(), 8);
        // Once one is read after a restart, it stays.
        assert!(l.check_recovered(0, &db).is_empty());
        assert_eq!(l.check_live(0, &da, l.clock + 1).len(), 8);
    }

    #[test]
    fn write_zeroes_are_a_value() {
        let mut l = Ledger::new(16 * K, 1);
        let (a, da) = write(&mut l, 0, K);
        l.end_write(a, 0, K, true, false);
        let z = l.begin_write(0, K, true);
        l.end_write(z, 0, K, true, false);
        let t = l.now();
        assert!(l.check_live(0, &[0; K as usize], t).is_empty());
        assert_eq!(l.check_live(0, &da, t).len(), 8);
    }
}
