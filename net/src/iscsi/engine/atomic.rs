//! COMPARE AND WRITE as one uninterrupted operation (SBC-3 5.2) against
//! every other write to its blocks, from any session of any connection.
//!
//! Per logical unit, by export name, the table holds the ranges of the
//! COMPARE AND WRITEs under way and of the writes (Write, Discard,
//! WriteZeroes bios) in flight. A COMPARE AND WRITE starts only when no
//! other one and no write in flight overlaps it, and holds its range until
//! its task is gone; a write is sent only when no other task's COMPARE AND
//! WRITE holds a range it overlaps. So no write lands between a COMPARE
//! AND WRITE's read and its write, and each waits for the other only while
//! the other's bios are out: neither can wait for the first forever. A
//! waiting task is tried again when its connection sees a completion and
//! on every tick.
//!
//! NBD writes do not pass through this table: COMPARE AND WRITE is atomic
//! against iSCSI writes only.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

/// Who holds a range: the nexus and its task slot.
pub type Owner = (u64, u32);

#[derive(Clone, Copy, Debug)]
struct Hold {
    owner: Owner,
    /// The bio's cookie (writes), 0 for a COMPARE AND WRITE.
    cookie: u64,
    start: u64,
    end: u64,
}

impl Hold {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

#[derive(Default)]
struct Unit {
    caws: Vec<Hold>,
    writes: Vec<Hold>,
}

/// By export name; a unit's entry stays once made (one per export), so a
/// write allocates no key.
static UNITS: spin::Mutex<BTreeMap<String, Unit>> = spin::Mutex::new(BTreeMap::new());

fn unit<'a>(units: &'a mut BTreeMap<String, Unit>, lu: &str) -> &'a mut Unit {
    if !units.contains_key(lu) {
        units.insert(String::from(lu), Unit::default());
    }
    units.get_mut(lu).unwrap_or_else(|| unreachable!())
}

/// Takes `[off, off + len)` of unit `lu` for a COMPARE AND WRITE of
/// `owner`; false while another one or a write in flight overlaps it.
pub fn lock(lu: &str, owner: Owner, off: u64, len: u64) -> bool {
    let end = off.saturating_add(len);
    let mut units = UNITS.lock();
    let u = unit(&mut units, lu);
    if u.caws.iter().any(|h| h.owner == owner) {
        return true;
    }
    let busy = u
        .caws
        .iter()
        .any(|h| h.owner != owner && h.overlaps(off, end))
        || u.writes.iter().any(|h| h.overlaps(off, end));
    if !busy {
        u.caws.push(Hold {
            owner,
            cookie: 0,
            start: off,
            end,
        });
    }
    !busy
}

/// Gives back what `owner` holds on unit `lu`.
pub fn unlock(lu: &str, owner: Owner) {
    let mut units = UNITS.lock();
    if let Some(u) = units.get_mut(lu) {
        u.caws.retain(|h| h.owner != owner);
    }
}

/// Records a write bio of `owner` (its `cookie`) over `[off, off + len)`
/// about to be sent; false, recording nothing, while another task's
/// COMPARE AND WRITE holds an overlapping range.
pub fn start_write(lu: &str, owner: Owner, cookie: u64, off: u64, len: u64) -> bool {
    let end = off.saturating_add(len);
    let mut units = UNITS.lock();
    let u = unit(&mut units, lu);
    if u.caws
        .iter()
        .any(|h| h.owner != owner && h.overlaps(off, end))
    {
        return false;
    }
    u.writes.push(Hold {
        owner,
        cookie,
        start: off,
        end,
    });
    true
}

/// The write bio of nexus `nexus` with `cookie` is back (nothing if it was
/// not a recorded write).
pub fn write_done(lu: &str, nexus: u64, cookie: u64) {
    let mut units = UNITS.lock();
    if let Some(u) = units.get_mut(lu) {
        if let Some(i) = u
            .writes
            .iter()
            .position(|h| h.owner.0 == nexus && h.cookie == cookie)
        {
            u.writes.swap_remove(i);
        }
    }
}

/// The connection of `nexus` is gone: everything it held is given back.
pub fn forget(nexus: u64) {
    let mut units = UNITS.lock();
    for u in units.values_mut() {
        u.caws.retain(|h| h.owner.0 != nexus);
        u.writes.retain(|h| h.owner.0 != nexus);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caw_and_writes_exclude_each_other_where_they_overlap() {
        let lu = "atomic-test/0";
        assert!(start_write(lu, (1, 0), 7, 0, 4096));
        assert!(!lock(lu, (2, 0), 512, 512), "a write in flight overlaps");
        assert!(lock(lu, (2, 0), 4096, 512), "beside it is free");
        assert!(!start_write(lu, (1, 1), 8, 4096, 4096), "the CAW holds it");
        assert!(start_write(lu, (2, 0), 9, 4096, 512), "its own write goes");
        assert!(!lock(lu, (3, 0), 4096, 512), "another CAW waits");
        write_done(lu, 1, 7);
        assert!(lock(lu, (3, 1), 0, 512), "the write is back");
        write_done(lu, 2, 9);
        unlock(lu, (2, 0));
        assert!(start_write(lu, (1, 1), 8, 4096, 4096));
        forget(1);
        forget(3);
        let units = UNITS.lock();
        let u = &units[lu];
        assert!(
            u.caws.is_empty() && u.writes.is_empty(),
            "nothing left behind"
        );
    }
}
