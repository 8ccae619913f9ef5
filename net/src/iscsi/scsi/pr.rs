//! Reservations: persistent reservations (SPC-4 5.13, PERSISTENT RESERVE
//! IN/OUT), RESERVE(6)/RELEASE(6) (SPC-2), and which commands a nexus may
//! run under them (SPC-4 table "SPC commands that are allowed in the
//! presence of various reservations", SBC-3 table 13).

use super::{be, byte, sense, truncated, DataIn, Fail, Nexus, Res, Unit, UnitState};
use alloc::string::String;
use alloc::vec::Vec;

/// How a command stands with reservations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed under every reservation.
    Always,
    /// Reads the medium or the unit's state: allowed under Write
    /// Exclusive reservations, conflicts under Exclusive Access ones.
    Read,
    /// Changes the medium or the unit's state: conflicts unless the nexus
    /// holds the reservation.
    Write,
    /// PERSISTENT RESERVE IN/OUT: conflicts only with an SPC-2 reservation
    /// held by another nexus.
    Pr,
    /// RESERVE(6)/RELEASE(6): checked by the commands themselves.
    Spc2,
}

/// Write Exclusive.
pub const WE: u8 = 1;
/// Exclusive Access.
pub const EA: u8 = 3;
/// Write Exclusive, Registrants Only.
pub const WE_RO: u8 = 5;
/// Exclusive Access, Registrants Only.
pub const EA_RO: u8 = 6;
/// Write Exclusive, All Registrants.
pub const WE_AR: u8 = 7;
/// Exclusive Access, All Registrants.
pub const EA_AR: u8 = 8;

fn valid_type(t: u8) -> bool {
    matches!(t, WE | EA | WE_RO | EA_RO | WE_AR | EA_AR)
}

fn all_registrants(t: u8) -> bool {
    matches!(t, WE_AR | EA_AR)
}

/// An I_T nexus identity as reservations know it: the initiator port
/// (name and ISID) and the target portal group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    initiator: String,
    isid: [u8; 6],
    tpgt: u16,
}

impl Port {
    fn of(n: &Nexus<'_>) -> Port {
        Port {
            initiator: String::from(n.initiator),
            isid: n.isid,
            tpgt: n.tpgt,
        }
    }

    /// True when the identity is this one.
    pub fn is(&self, initiator: &str, isid: [u8; 6], tpgt: u16) -> bool {
        self.initiator == initiator && self.isid == isid && self.tpgt == tpgt
    }

    fn is_nexus(&self, n: &Nexus<'_>) -> bool {
        self.is(n.initiator, n.isid, n.tpgt)
    }

    /// The iSCSI initiator port TransportID (SPC-4 7.6.4.6, format 01b).
    fn transport_id(&self) -> Vec<u8> {
        let mut name = Vec::new();
        name.extend_from_slice(self.initiator.as_bytes());
        name.extend_from_slice(b",i,0x");
        for b in self.isid {
            name.extend_from_slice(&hex2(b));
        }
        name.push(0);
        while name.len() % 4 != 0 {
            name.push(0);
        }
        let mut v = alloc::vec![0x45, 0];
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(&name);
        v
    }
}

/// Two lowercase hex digits.
pub fn hex2(b: u8) -> [u8; 2] {
    const D: &[u8; 16] = b"0123456789abcdef";
    [D[usize::from(b >> 4)], D[usize::from(b & 15)]]
}

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reg {
    port: Port,
    key: u64,
}

/// The persistent reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Resv {
    /// The holder; for the All Registrants types, the registrant that
    /// took it (every registrant holds it).
    holder: Port,
    kind: u8,
}

/// Persistent reservation state of a unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrState {
    generation: u32,
    regs: Vec<Reg>,
    resv: Option<Resv>,
    aptpl: bool,
}

/// Most registrations one unit keeps.
const MAX_REGS: usize = 256;

impl PrState {
    /// The last registration set APTPL.
    pub fn aptpl(&self) -> bool {
        self.aptpl
    }

    fn key_of(&self, n: &Nexus<'_>) -> Option<u64> {
        self.regs.iter().find(|r| r.port.is_nexus(n)).map(|r| r.key)
    }

    fn holds(&self, n: &Nexus<'_>) -> bool {
        match &self.resv {
            None => false,
            Some(r) if all_registrants(r.kind) => self.key_of(n).is_some(),
            Some(r) => r.holder.is_nexus(n),
        }
    }

    /// The reservation key READ RESERVATION reports.
    fn resv_key(&self) -> u64 {
        match &self.resv {
            Some(r) if !all_registrants(r.kind) => self
                .regs
                .iter()
                .find(|g| g.port == r.holder)
                .map_or(0, |g| g.key),
            _ => 0,
        }
    }

    /// Serialized form: magic, version, APTPL, generation, the
    /// registrations and the reservation.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"SPR1");
        v.push(u8::from(self.aptpl));
        v.extend_from_slice(&self.generation.to_be_bytes());
        v.extend_from_slice(&(self.regs.len() as u32).to_be_bytes());
        for r in &self.regs {
            put_port(&mut v, &r.port);
            v.extend_from_slice(&r.key.to_be_bytes());
        }
        match &self.resv {
            None => v.push(0),
            Some(r) => {
                v.push(r.kind);
                put_port(&mut v, &r.holder);
            }
        }
        v
    }

    /// Parses [`PrState::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<PrState> {
        let mut r = Reader(b);
        if r.take(4)? != b"SPR1" {
            return None;
        }
        let aptpl = r.u8()? != 0;
        let generation = r.u32()?;
        let n = r.u32()? as usize;
        if n > MAX_REGS {
            return None;
        }
        let mut regs = Vec::new();
        for _ in 0..n {
            let port = r.port()?;
            let key = r.u64()?;
            regs.push(Reg { port, key });
        }
        let kind = r.u8()?;
        let resv = if kind == 0 {
            None
        } else {
            if !valid_type(kind) {
                return None;
            }
            Some(Resv {
                holder: r.port()?,
                kind,
            })
        };
        if !r.0.is_empty() {
            return None;
        }
        Some(PrState {
            generation,
            regs,
            resv,
            aptpl,
        })
    }
}

fn put_port(v: &mut Vec<u8>, p: &Port) {
    v.extend_from_slice(&(p.initiator.len() as u16).to_be_bytes());
    v.extend_from_slice(p.initiator.as_bytes());
    v.extend_from_slice(&p.isid);
    v.extend_from_slice(&p.tpgt.to_be_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn port(&mut self) -> Option<Port> {
        let n = u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize;
        let initiator = String::from(core::str::from_utf8(self.take(n)?).ok()?);
        let isid = self.take(6)?.try_into().ok()?;
        let tpgt = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
        Some(Port {
            initiator,
            isid,
            tpgt,
        })
    }
}

/// RESERVATION CONFLICT if the nexus may not run a command of this class
/// under the unit's reservations.
pub fn check_access(s: &UnitState, n: &Nexus<'_>, access: Access) -> Res<()> {
    if access == Access::Always || access == Access::Spc2 {
        return Ok(());
    }
    if let Some(holder) = s.spc2 {
        if holder != n.id {
            return Err(Fail::Conflict);
        }
    }
    let Some(r) = &s.pr.resv else {
        return Ok(());
    };
    if access == Access::Pr || s.pr.holds(n) {
        return Ok(());
    }
    let registered = s.pr.key_of(n).is_some();
    let ok = match (r.kind, access) {
        (WE, Access::Read) => true,
        (WE_RO | WE_AR, Access::Read) => true,
        (WE_RO | EA_RO, _) => registered,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Fail::Conflict)
    }
}

/// RESERVE(6) (SPC-2 7.21, with the SPC-4 5.13.3 rule that it conflicts
/// with any persistent registration).
pub fn reserve6(cdb: &[u8], s: &mut UnitState, n: &Nexus<'_>) -> Res<DataIn> {
    if byte(cdb, 1) & 0x01 != 0 {
        // Third-party and extent reservations are obsolete.
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    if !s.pr.regs.is_empty() || s.spc2.is_some_and(|h| h != n.id) {
        return Err(Fail::Conflict);
    }
    s.spc2 = Some(n.id);
    Ok(DataIn::None)
}

/// RELEASE(6): a nexus that does not hold the reservation releases
/// nothing and gets GOOD.
pub fn release6(cdb: &[u8], s: &mut UnitState, n: &Nexus<'_>) -> Res<DataIn> {
    if byte(cdb, 1) & 0x01 != 0 {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    if !s.pr.regs.is_empty() {
        return Err(Fail::Conflict);
    }
    if s.spc2 == Some(n.id) {
        s.spc2 = None;
    }
    Ok(DataIn::None)
}

/// PERSISTENT RESERVE IN; `keeps` when the unit's state is kept through
/// restarts (PTPL_C).
pub fn read(cdb: &[u8], s: &UnitState, n: &Nexus<'_>, keeps: bool) -> Res<DataIn> {
    let _ = n;
    let alloc = be(cdb, 7, 2);
    let pr = &s.pr;
    let mut v = Vec::new();
    v.extend_from_slice(&pr.generation.to_be_bytes());
    match byte(cdb, 1) & 0x1f {
        0 => {
            let len = (pr.regs.len() * 8) as u32;
            v.extend_from_slice(&len.to_be_bytes());
            for r in &pr.regs {
                v.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        1 => match &pr.resv {
            None => v.extend_from_slice(&0u32.to_be_bytes()),
            Some(r) => {
                v.extend_from_slice(&16u32.to_be_bytes());
                v.extend_from_slice(&pr.resv_key().to_be_bytes());
                v.extend_from_slice(&[0; 4]);
                v.push(0);
                v.push(r.kind & 0x0f);
                v.extend_from_slice(&[0; 2]);
            }
        },
        2 => {
            v.clear();
            v.extend_from_slice(&8u16.to_be_bytes());
            // PTPL_C: APTPL is accepted when the service keeps the state
            // through restarts.
            v.push(u8::from(keeps));
            // TMV, PTPL_A.
            v.push(0x80 | u8::from(pr.aptpl));
            // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
            v.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
            v.push(0x01);
            v.extend_from_slice(&[0; 2]);
        }
        3 => {
            v.extend_from_slice(&[0; 4]);
            for g in &pr.regs {
                let holder = match &pr.resv {
                    Some(r) if all_registrants(r.kind) => Some(r.kind),
                    Some(r) if r.holder == g.port => Some(r.kind),
                    _ => None,
                };
                v.extend_from_slice(&g.key.to_be_bytes());
                v.extend_from_slice(&[0; 4]);
                v.push(u8::from(holder.is_some()));
                v.push(holder.unwrap_or(0) & 0x0f);
                v.extend_from_slice(&[0; 4]);
                // Relative target port identifier: the portal group's.
                v.extend_from_slice(&1u16.to_be_bytes());
                let tid = g.port.transport_id();
                v.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                v.extend_from_slice(&tid);
            }
            let len = (v.len() - 8) as u32;
            v[4..8].copy_from_slice(&len.to_be_bytes());
        }
        _ => return Err(sense::INVALID_FIELD_IN_CDB.into()),
    }
    Ok(truncated(v, alloc))
}

/// Checks of a PERSISTENT RESERVE OUT CDB made before its parameter list
/// is taken.
pub fn out_checks(sa: u8, scope_type: u8, len: u64) -> Res<()> {
    if sa > 6 {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    if matches!(sa, 1 | 2 | 4 | 5) && scope_type >> 4 != 0 {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    if matches!(sa, 1 | 4 | 5) && !valid_type(scope_type & 0x0f) {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    if len != 24 {
        return Err(sense::PARAM_LIST_LENGTH.into());
    }
    Ok(())
}

/// PERSISTENT RESERVE OUT with its parameter list.
pub fn out(unit: &mut Unit<'_>, n: &Nexus<'_>, sa: u8, scope_type: u8, p: &[u8]) -> Res<()> {
    if p.len() != 24 {
        return Err(sense::PARAM_LIST_LENGTH.into());
    }
    let key = be(p, 0, 8);
    let sa_key = be(p, 8, 8);
    let flags = byte(p, 20);
    // SPEC_I_PT and ALL_TG_PT are not offered (REPORT CAPABILITIES).
    if flags & 0x0c != 0 {
        return Err(sense::INVALID_FIELD_IN_PARAM.into());
    }
    let aptpl = flags & 0x01 != 0;
    // SPC-4 6.16.3: APTPL set where persistence through power loss is
    // not offered (PTPL_C zero) is an invalid field.
    if aptpl && !unit.export.is_some_and(|e| e.keeps_state) {
        return Err(sense::INVALID_FIELD_IN_PARAM.into());
    }
    let kind = scope_type & 0x0f;
    let s = &mut *unit.state;
    let mine = s.pr.key_of(n);
    let me = Port::of(n);
    match sa {
        // REGISTER, REGISTER AND IGNORE EXISTING KEY.
        0 | 6 => {
            if sa == 0 && mine.unwrap_or(0) != key {
                return Err(Fail::Conflict);
            }
            if sa_key == 0 {
                if mine.is_some() {
                    unregister(s, &me);
                }
            } else if let Some(r) = s.pr.regs.iter_mut().find(|r| r.port == me) {
                r.key = sa_key;
            } else {
                if s.pr.regs.len() >= MAX_REGS {
                    return Err(sense::Sense::new(sense::ILLEGAL_REQUEST, 0x55, 0x04).into());
                }
                s.pr.regs.push(Reg {
                    port: me,
                    key: sa_key,
                });
            }
            // An unregistered nexus registering key 0 changes nothing.
            if mine.is_some() || sa_key != 0 {
                if sa_key != 0 {
                    s.pr.aptpl = aptpl;
                }
                s.pr.generation = s.pr.generation.wrapping_add(1);
            }
        }
        // RESERVE.
        1 => {
            if mine != Some(key) {
                return Err(Fail::Conflict);
            }
            match &s.pr.resv {
                None => {
                    s.pr.resv = Some(Resv { holder: me, kind });
                }
                Some(r) if s.pr.holds(n) && r.kind == kind => {}
                Some(_) => return Err(Fail::Conflict),
            }
        }
        // RELEASE.
        2 => {
            if mine != Some(key) {
                return Err(Fail::Conflict);
            }
            let Some(r) = s.pr.resv.clone() else {
                return Ok(());
            };
            if !s.pr.holds(n) {
                return Ok(());
            }
            if r.kind != kind {
                return Err(sense::INVALID_RELEASE.into());
            }
            s.pr.resv = None;
            if !matches!(r.kind, WE | EA) {
                ua_registrants(s, n, sense::UA_RESERVATIONS_RELEASED);
            }
        }
        // CLEAR.
        3 => {
            if mine != Some(key) {
                return Err(Fail::Conflict);
            }
            ua_registrants(s, n, sense::UA_RESERVATIONS_PREEMPTED);
            s.pr.regs.clear();
            s.pr.resv = None;
            s.pr.generation = s.pr.generation.wrapping_add(1);
        }
        // PREEMPT, PREEMPT AND ABORT.
        _ => {
            if mine != Some(key) {
                return Err(Fail::Conflict);
            }
            preempt(s, n, &me, sa_key, kind)?;
            s.pr.generation = s.pr.generation.wrapping_add(1);
        }
    }
    Ok(())
}

/// Removes a registration; the reservation goes with it when its holder
/// leaves (or with the last registrant, for the All Registrants types).
fn unregister(s: &mut UnitState, who: &Port) {
    s.pr.regs.retain(|r| &r.port != who);
    let released = match &s.pr.resv {
        Some(r) if all_registrants(r.kind) => s.pr.regs.is_empty(),
        Some(r) => &r.holder == who,
        None => false,
    };
    if released {
        let kind = s.pr.resv.take().map_or(0, |r| r.kind);
        if matches!(kind, WE_RO | EA_RO) {
            let ports: Vec<Port> = s.pr.regs.iter().map(|r| r.port.clone()).collect();
            for p in ports {
                s.ua_port(&p, sense::UA_RESERVATIONS_RELEASED);
            }
        }
    }
}

/// Queues a unit attention for every registrant but the nexus.
fn ua_registrants(s: &mut UnitState, n: &Nexus<'_>, ua: sense::Sense) {
    let ports: Vec<Port> =
        s.pr.regs
            .iter()
            .filter(|r| !r.port.is_nexus(n))
            .map(|r| r.port.clone())
            .collect();
    for p in ports {
        s.ua_port(&p, ua);
    }
}

/// Removes the registrations holding `sa_key` (all others than the
/// nexus's own when `all`), with their unit attention.
fn remove_key(s: &mut UnitState, me: &Port, sa_key: u64, all: bool) -> usize {
    let gone: Vec<Port> =
        s.pr.regs
            .iter()
            .filter(|r| &r.port != me && (all || r.key == sa_key))
            .map(|r| r.port.clone())
            .collect();
    s.pr.regs
        .retain(|r| &r.port == me || !(all || r.key == sa_key));
    for p in &gone {
        s.ua_port(p, sense::UA_REGISTRATIONS_PREEMPTED);
    }
    gone.len()
}

/// PREEMPT (SPC-4 5.13.11.4).
fn preempt(s: &mut UnitState, n: &Nexus<'_>, me: &Port, sa_key: u64, kind: u8) -> Res<()> {
    let resv = s.pr.resv.clone();
    match resv {
        None => {
            if sa_key == 0 {
                return Err(sense::INVALID_FIELD_IN_PARAM.into());
            }
            let own = s.pr.key_of(n) == Some(sa_key);
            if remove_key(s, me, sa_key, false) == 0 && !own {
                return Err(Fail::Conflict);
            }
        }
        Some(r) if all_registrants(r.kind) => {
            if sa_key == 0 {
                remove_key(s, me, 0, true);
                s.pr.resv = Some(Resv {
                    holder: me.clone(),
                    kind,
                });
            } else {
                let own = s.pr.key_of(n) == Some(sa_key);
                if remove_key(s, me, sa_key, false) == 0 && !own {
                    return Err(Fail::Conflict);
                }
            }
        }
        Some(r) => {
            let holder_key = s.pr.resv_key();
            if sa_key == holder_key {
                remove_key(s, me, sa_key, false);
                s.pr.resv = Some(Resv {
                    holder: me.clone(),
                    kind,
                });
                // A change of type: the remaining registrants hear of it.
                if r.kind != kind {
                    ua_registrants(s, n, sense::UA_RESERVATIONS_RELEASED);
                }
            } else {
                if sa_key == 0 {
                    return Err(sense::INVALID_FIELD_IN_PARAM.into());
                }
                let own = s.pr.key_of(n) == Some(sa_key);
                if remove_key(s, me, sa_key, false) == 0 && !own {
                    return Err(Fail::Conflict);
                }
            }
        }
    }
    Ok(())
}
