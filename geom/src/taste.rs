//! Classes, tasting and assembly: how labelled geoms find their members
//! at boot, in whatever order disks appear, and whenever a provider appears
//! live.
//!
//! ```text
//!  add_provider ─▶ new_providers ─▶ run(): read last sector (async, through
//!                                   the stack's own consumer, read access)
//!                                          │ completion
//!                                          ▼
//!        MetaRepr::parse ─▶ class named in the record: Class::taste
//!                                          │ Member
//!                                          ▼
//!        group by (class, geom name, id) ─▶ Class::ready(members, settled)
//!                                          │ true
//!                                          ▼
//!                              Class::assemble(stack, members) ─▶ geom
//! ```
//!
//! `settled` is true once no taste read is outstanding: at boot every disk
//! has been read, so a class that can run degraded (mirror) waits for it
//! before assembling with members missing; stripe and concat need all
//! members and do not care. A member that appears after its geom was
//! assembled goes to [`crate::class::Class::join`] (mirror: a returning disk).
//!
//! Labelling is the other direction: [`Stack::write_meta`] writes a record
//! into a provider's last sector (FUA, so it is stable when it completes).
//!
//! A class with metadata implements [`crate::class::Class::assemble`] (and, when it can
//! run degraded, [`crate::class::Class::ready`] and [`crate::class::Class::join`]) and writes its
//! records with [`Stack::write_meta`] from its label command; every class
//! in [`crate::class::CLASSES`] is asked about the records naming it.

use crate::bio::{Bio, BioCmd, BioResult, ConsumerId, GeomId, Owner, ProviderId};
use crate::class;
use crate::meta::{MetaError, MetaRepr};
use crate::page::SgList;
use crate::stack::{GeomState, Stack, StackError};
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// What a class makes of a provider whose last sector names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TasteAction {
    /// Not a member (stale record, size changed since labelling, …).
    Ignore,
    /// A member: group it with the others of its geom.
    Member,
}

/// A tasted member: the provider and the record found on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member provider.
    pub provider: ProviderId,
    /// Its metadata.
    pub meta: MetaRepr,
}

/// True when `members` holds every index `0..member_count` of the first
/// member's count (the rule for classes that cannot run degraded).
pub fn all_present(members: &[Member]) -> bool {
    let Some(first) = members.first() else {
        return false;
    };
    let n = first.meta.member_count;
    (0..n).all(|i| members.iter().any(|m| m.meta.member_index == i))
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct GroupKey {
    class: String,
    name: String,
    id: u64,
}

struct Group {
    key: GroupKey,
    members: Vec<Member>,
}

enum StackIo {
    Taste(ProviderId, ConsumerId),
    Write(ProviderId, ConsumerId),
}

/// A taste refused because the provider is claimed ([`Stack::claim`]):
/// metadata or a partition table found on a provider the config uses as
/// it is (an export's provider, a nop's), which tasting leaves alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedTaste {
    /// The claimed provider.
    pub provider: String,
    /// The class the metadata names (`part` for a partition table).
    pub class: String,
    /// Why the provider is claimed.
    pub reason: String,
}

/// Most refused tastes kept.
const REFUSED_MAX: usize = 64;

/// Most lines kept in the taste log.
const LOG_LINES: usize = 64;

/// The stack's tasting state: registered classes, reads in flight, groups
/// waiting for members, and a short log.
#[derive(Default)]
pub(crate) struct TasteState {
    io: Vec<Option<StackIo>>,
    groups: Vec<Group>,
    assembled: Vec<(GroupKey, GeomId)>,
    log: VecDeque<String>,
    write_errors: u64,
    /// Claimed provider names and why.
    claims: Vec<(String, String)>,
    refused: Vec<RefusedTaste>,
}

impl TasteState {
    fn log(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    fn pending_reads(&self) -> bool {
        self.io
            .iter()
            .flatten()
            .any(|io| matches!(io, StackIo::Taste(..)))
    }
}

impl Stack {
    /// Claims the provider called `name` (present or yet to appear) for a
    /// use the config makes of it as it is (`reason`: "exported as 'raw'
    /// by line 3"): tasting never builds a geom over it. Its last sector
    /// is still read, and metadata found there is refused
    /// ([`Stack::refused_tastes`]) instead of assembled; no class is
    /// offered it (no partition table is probed). The boot config's
    /// claims are made before the first taste.
    pub fn claim(&mut self, name: &str, reason: &str) {
        if !self.taste.claims.iter().any(|(n, _)| n == name) {
            self.taste
                .claims
                .push((String::from(name), String::from(reason)));
        }
    }

    /// Why the provider called `name` is claimed, if it is.
    pub fn claimed(&self, name: &str) -> Option<&str> {
        self.taste
            .claims
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.as_str())
    }

    /// Tastes refused because their provider is claimed, oldest first.
    pub fn refused_tastes(&self) -> &[RefusedTaste] {
        &self.taste.refused
    }

    fn refuse_taste(&mut self, p: ProviderId, class: &str) {
        let provider = self.provider_name(p);
        let Some(reason) = self.claimed(&provider).map(String::from) else {
            return;
        };
        self.taste.log(format!(
            "{provider}: {class} metadata refused: the provider is {reason}"
        ));
        if self.taste.refused.len() < REFUSED_MAX
            && !self
                .taste
                .refused
                .iter()
                .any(|r| r.provider == provider && r.class == class)
        {
            self.taste.refused.push(RefusedTaste {
                provider,
                class: String::from(class),
                reason,
            });
        }
    }

    /// Recent tasting and labelling events, oldest first.
    pub fn taste_log(&self) -> impl Iterator<Item = &str> {
        self.taste.log.iter().map(|s| s.as_str())
    }

    /// Metadata writes that failed since boot.
    pub fn meta_write_errors(&self) -> u64 {
        self.taste.write_errors
    }

    /// True while the stack's own reads and writes (tasting, labelling)
    /// are outstanding, providers wait to be tasted, or a geom is still
    /// probing ([`crate::stack::Geom::settling`]).
    pub fn tasting(&self) -> bool {
        !self.core.new_providers.is_empty()
            || self.taste.io.iter().any(|s| s.is_some())
            || self.geoms.iter().flatten().any(|g| g.settling())
    }

    /// Runs the stack until tasting and labelling are done, at most
    /// `max_rounds` rounds of [`Stack::run`] (devices complete
    /// asynchronously, so this spins while they work). Returns false if
    /// they were not done by then.
    pub fn settle(&mut self, max_rounds: u32) -> bool {
        for _ in 0..max_rounds {
            self.run();
            if !self.tasting() {
                return true;
            }
        }
        false
    }

    fn stack_io(&mut self, io: StackIo) -> u64 {
        if let Some(i) = self.taste.io.iter().position(|s| s.is_none()) {
            self.taste.io[i] = Some(io);
            i as u64
        } else {
            self.taste.io.push(Some(io));
            self.taste.io.len() as u64 - 1
        }
    }

    /// Starts a taste read of every provider added since the last round.
    /// Returns true if any was started.
    pub(crate) fn taste_new_providers(&mut self) -> bool {
        if self.core.new_providers.is_empty() {
            return false;
        }
        let mut any = false;
        let mut offered = Vec::new();
        for p in core::mem::take(&mut self.core.new_providers) {
            let Some(prov) = self.get_provider(p) else {
                continue;
            };
            let sector = u64::from(prov.spec.sector_size);
            let tasteable = self.geoms[prov.geom.0 as usize]
                .as_ref()
                .is_some_and(|g| g.tasteable());
            if prov.orphaned || prov.spec.media_size < 2 * sector || !tasteable {
                continue;
            }
            if self.claimed(&prov.spec.name).is_none() {
                offered.push(p);
            }
            let at = prov.spec.media_size - sector;
            let c = self.core.attach(None, p);
            if self.core.access(c, 1, 0, 0).is_err() {
                let _ = self.core.detach(c);
                continue;
            }
            let cookie = self.stack_io(StackIo::Taste(p, c));
            self.core
                .push_start(c, Bio::read(at, sector), Owner::Stack, cookie);
            any = true;
        }
        // Classes that recognise providers by a format of their own (a
        // partition table) probe them with their own reads.
        for p in offered {
            for c in class::CLASSES {
                if self.get_provider(p).is_some_and(|p| !p.orphaned) {
                    c.offer(self, p);
                }
            }
        }
        any
    }

    /// Writes `meta` (or, for `None`, zeroes) into the last sector of
    /// `provider`, with FUA. The write completes on a later run; its
    /// failure is logged and counted ([`Stack::meta_write_errors`]). The
    /// stack holds write access on the provider until then.
    pub fn write_meta(
        &mut self,
        provider: ProviderId,
        meta: Option<&MetaRepr>,
    ) -> Result<(), StackError> {
        let prov = self.provider(provider);
        let sector = prov.spec.sector_size as usize;
        let name = prov.spec.name.clone();
        if prov.spec.media_size < 2 * sector as u64 {
            return Err(StackError::Invalid(format!(
                "provider '{name}' is too small to hold metadata"
            )));
        }
        let at = prov.spec.media_size - sector as u64;
        let bytes = match meta {
            Some(m) => m
                .to_sector(sector)
                .map_err(|e| StackError::Invalid(format!("metadata for '{name}': {e}")))?,
            None => vec![0u8; sector],
        };
        let c = self.core.attach(None, provider);
        if let Err(e) = self.core.access(c, 0, 1, 0) {
            let _ = self.core.detach(c);
            return Err(e);
        }
        let sg = SgList::from_bytes(&bytes[..sector], &self.core.meta_counters);
        let mut bio = Bio::with_data(BioCmd::Write, at, sg);
        bio.fua = true;
        let cookie = self.stack_io(StackIo::Write(provider, c));
        self.core.push_start(c, bio, Owner::Stack, cookie);
        Ok(())
    }

    /// A completion of the stack's own I/O.
    pub(crate) fn stack_io_done(&mut self, cookie: u64, bio: Bio, result: BioResult) {
        let Some(io) = self
            .taste
            .io
            .get_mut(cookie as usize)
            .and_then(|s| s.take())
        else {
            return;
        };
        match io {
            StackIo::Write(p, c) => {
                let _ = self.core.detach(c);
                if let Err(e) = result {
                    self.taste.write_errors += 1;
                    let name = self.provider_name(p);
                    self.taste
                        .log(format!("metadata write to {name} failed: {e:?}"));
                }
            }
            StackIo::Taste(p, c) => {
                let _ = self.core.detach(c);
                if result.is_err() {
                    return;
                }
                let mut buf = vec![0u8; bio.length as usize];
                if bio
                    .sg
                    .copy_to_slice(0, &mut buf, &self.core.meta_counters)
                    .is_err()
                {
                    return;
                }
                let claimed = self.claimed(&self.provider_name(p)).is_some();
                match MetaRepr::from_bytes(&buf) {
                    Ok(meta) if claimed => self.refuse_taste(p, &meta.class),
                    Err(_) if claimed && buf.starts_with(b"EFI PART") => {
                        // The backup header of a GPT.
                        self.refuse_taste(p, "part")
                    }
                    Ok(meta) => self.tasted(p, meta),
                    Err(MetaError::NoMagic) => {}
                    Err(e) => {
                        let name = self.provider_name(p);
                        self.taste.log(format!("{name}: metadata refused: {e}"));
                    }
                }
            }
        }
    }

    fn provider_name(&self, p: ProviderId) -> String {
        self.get_provider(p)
            .map_or_else(|| String::from("?"), |p| p.spec.name.clone())
    }

    fn tasted(&mut self, p: ProviderId, meta: MetaRepr) {
        let pname = self.provider_name(p);
        let class_name = meta.class.clone();
        let action = class::find(&class_name).map(|class| class.taste(self, p, &meta));
        match action {
            None => {
                self.taste
                    .log(format!("{pname}: metadata of unknown class '{class_name}'"));
                return;
            }
            Some(TasteAction::Ignore) => {
                self.taste.log(format!(
                    "{pname}: {class_name} metadata for '{}' ignored",
                    meta.name
                ));
                return;
            }
            Some(TasteAction::Member) => {}
        }
        let key = GroupKey {
            class: meta.class.clone(),
            name: meta.name.clone(),
            id: meta.id,
        };
        self.taste.log(format!(
            "{pname}: member {} of {} {}/{}",
            meta.member_index, meta.member_count, key.class, key.name
        ));
        let member = Member { provider: p, meta };
        // A geom of this name that is live already (assembled earlier, or
        // labelled in this session) gets the member through join.
        let live = self
            .taste
            .assembled
            .iter()
            .find(|(k, g)| *k == key && self.geom_state(*g) == GeomState::Live)
            .map(|(_, g)| *g)
            .or_else(|| self.find_geom(&key.class, &key.name));
        if let Some(g) = live {
            if let Some(class) = class::find(&class_name) {
                class.join(self, g, member);
            }
            return;
        }
        let gi = match self.taste.groups.iter().position(|g| g.key == key) {
            Some(i) => i,
            None => {
                self.taste.groups.push(Group {
                    key,
                    members: Vec::new(),
                });
                self.taste.groups.len() - 1
            }
        };
        let members = &mut self.taste.groups[gi].members;
        match members
            .iter()
            .position(|m| m.meta.member_index == member.meta.member_index)
        {
            Some(i) if members[i].meta.generation < member.meta.generation => members[i] = member,
            Some(_) => {}
            None => {
                members.push(member);
                members.sort_by_key(|m| m.meta.member_index);
            }
        }
        self.try_assemble(gi, false);
    }

    /// Assembles group `gi` if its class says it is ready.
    fn try_assemble(&mut self, gi: usize, settled: bool) -> bool {
        let class_name = self.taste.groups[gi].key.class.clone();
        let members = self.taste.groups[gi].members.clone();
        let ready = class::find(&class_name).is_some_and(|class| class.ready(&members, settled));
        if !ready {
            return false;
        }
        let group = self.taste.groups.remove(gi);
        let result = class::find(&class_name).map(|class| class.assemble(self, &group.members));
        match result {
            Some(Ok(g)) => {
                self.taste
                    .log(format!("assembled {}/{}", group.key.class, group.key.name));
                self.taste.assembled.push((group.key, g));
            }
            Some(Err(e)) => self.taste.log(format!(
                "cannot assemble {}/{}: {e}",
                group.key.class, group.key.name
            )),
            None => {}
        }
        true
    }

    /// Once no taste read is outstanding, offers every waiting group to
    /// its class with `settled` set. Returns true if any was assembled.
    pub(crate) fn taste_settle(&mut self) -> bool {
        if self.taste.groups.is_empty()
            || self.taste.pending_reads()
            || !self.core.new_providers.is_empty()
        {
            return false;
        }
        let mut any = false;
        let mut i = 0;
        while i < self.taste.groups.len() {
            if self.try_assemble(i, true) {
                any = true;
            } else {
                i += 1;
            }
        }
        any
    }

    /// Labelled geoms waiting for members: (class, name, members found,
    /// members wanted).
    pub fn incomplete_geoms(&self) -> Vec<(String, String, usize, u32)> {
        self.taste
            .groups
            .iter()
            .map(|g| {
                (
                    g.key.class.clone(),
                    g.key.name.clone(),
                    g.members.len(),
                    g.members.first().map_or(0, |m| m.meta.member_count),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::class::CLASSES;
    use crate::meta::{Meta, MetaRepr, META_LEN, PARAMS, TAIL_LEN};
    use crate::testing::stack_from_images;
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn image_with_last_sector(sector: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; SIZE as usize];
        img[SIZE as usize - sector.len()..].copy_from_slice(sector);
        img
    }

    #[test]
    fn a_claimed_provider_is_tasted_but_never_built_over() {
        for (class, line) in [
            ("mirror", "mirror label x vtbd0"),
            ("stripe", "stripe label -s 64k x vtbd0"),
            ("concat", "concat label x vtbd0"),
        ] {
            let label = crate::testing::label_sector(line, SIZE, 512);
            let img = image_with_last_sector(&label);
            let (mut s, _) = stack_from_images(&[img.clone(), img], 512);
            s.claim("vtbd0", "exported as 'raw' by config line 1");
            assert!(s.settle(10_000));
            let built: Vec<&str> = s
                .providers()
                .map(|(_, p)| p.spec.name.as_str())
                .filter(|n| n.contains('/'))
                .collect();
            // vtbd1, unclaimed, carries the same one-member record: its
            // geom assembles (the name is free because vtbd0's was
            // refused), vtbd0 stays bare.
            let log: Vec<&str> = s.taste_log().collect();
            assert_eq!(built.len(), 1, "{class}: {built:?} {log:?}");
            let refused = s.refused_tastes();
            assert_eq!(refused.len(), 1, "{class}");
            assert_eq!(refused[0].provider, "vtbd0");
            assert_eq!(refused[0].class, class);
            let (_, p0) = s.providers().find(|(_, p)| p.spec.name == "vtbd0").unwrap();
            assert_eq!(
                (p0.access.r, p0.access.w, p0.access.e),
                (0, 0, 0),
                "{class}"
            );
        }
    }

    #[test]
    fn a_claimed_provider_is_not_probed_for_a_partition_table() {
        let (mut s, h) = crate::testing::stack_with_disks(1, 4 << 20, 512);
        for line in ["part create vtbd0", "part add -t linux-data -s 1m vtbd0"] {
            let stmt = crate::config::parse_line(line, 1).unwrap().unwrap();
            crate::ctl::apply(&mut s, &stmt).unwrap();
            assert!(s.settle(10_000));
        }
        assert!(s.settle(10_000));
        let (mut s, _) = stack_from_images(&[h[0].contents()], 512);
        s.claim("vtbd0", "exported as 'raw' by config line 1");
        assert!(s.settle(10_000));
        assert_eq!(s.providers().count(), 1, "only vtbd0");
        assert_eq!(s.refused_tastes()[0].class, "part");
    }

    /// A sector holding a record with every field as given and a valid
    /// checksum (the view's setters do not validate).
    #[allow(clippy::too_many_arguments)]
    fn raw_record(
        class: &str,
        count: u32,
        index: u32,
        size: u64,
        sector: u32,
        flags: u32,
        generation: u64,
        params: &[u64; PARAMS],
        tail: &[u8; TAIL_LEN],
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 512];
        let mut m = Meta::new_checked(&mut buf[..]).unwrap();
        m.set_magic();
        m.set_version(1);
        m.set_flags(flags);
        m.set_class(class);
        m.set_name("g");
        m.set_id(1);
        m.set_generation(generation);
        m.set_member_index(index);
        m.set_member_count(count);
        m.set_member_size(size);
        m.set_sector_size(sector);
        m.clear_reserved();
        for (i, p) in params.iter().enumerate() {
            m.set_param(i, *p);
        }
        m.set_tail(tail);
        m.fill_checksum();
        buf
    }

    fn field_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(512),
            Just(4096),
            Just(65536),
            Just(SIZE),
            Just(SIZE - 512),
            Just(u64::MAX),
            Just(u64::MAX / 512),
            Just(1 << 63),
            any::<u64>(),
        ]
    }

    fn field_u32() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(2),
            Just(3),
            Just(512),
            Just(4096),
            Just(u32::MAX),
            any::<u32>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(192))]

        /// Arbitrary bytes decode to a record or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let _ = MetaRepr::from_bytes(&bytes);
            let mut b = bytes.clone();
            if b.len() >= META_LEN {
                b[..16].copy_from_slice(&crate::meta::MAGIC);
                let _ = MetaRepr::from_bytes(&b);
            }
        }

        /// Hostile records with a valid checksum (any class, member
        /// counts, sizes, offsets and parameters, overflowing fields) on
        /// up to three disks: tasting and assembly never panic and settle.
        #[test]
        fn hostile_records_never_panic_tasting(
            class in 0..CLASSES.len() + 1,
            disks in 1usize..4,
            fields in proptest::collection::vec(
                (field_u32(), field_u32(), field_u64(), field_u32(), any::<u32>(), field_u64()),
                3,
            ),
            params in proptest::array::uniform8(field_u64()),
            tail in proptest::collection::vec(any::<u8>(), TAIL_LEN),
        ) {
            let class = CLASSES.get(class).map_or("bogus", |c| c.name());
            let tail: [u8; TAIL_LEN] = tail.try_into().unwrap();
            let images: Vec<Vec<u8>> = fields[..disks]
                .iter()
                .map(|&(count, index, size, sector, flags, generation)| {
                    image_with_last_sector(&raw_record(
                        class, count, index, size, sector, flags, generation, &params, &tail,
                    ))
                })
                .collect();
            let (mut s, _) = stack_from_images(&images, 512);
            prop_assert!(s.settle(100_000));
            for c in CLASSES {
                let _ = c.status(&s);
            }
        }

        /// The same, with each record sane but for one field, so the
        /// classes' own checks (not the record's) are what refuse it.
        #[test]
        fn near_valid_records_never_panic_tasting(
            class in 0..CLASSES.len(),
            disks in 1usize..4,
            params in proptest::array::uniform8(field_u64()),
            flags in any::<u32>(),
            tail in proptest::collection::vec(any::<u8>(), TAIL_LEN),
        ) {
            let class = CLASSES[class].name();
            let tail: [u8; TAIL_LEN] = tail.try_into().unwrap();
            let images: Vec<Vec<u8>> = (0..disks)
                .map(|i| {
                    image_with_last_sector(&raw_record(
                        class, disks as u32, i as u32, SIZE, 512, flags, 1, &params, &tail,
                    ))
                })
                .collect();
            let (mut s, _) = stack_from_images(&images, 512);
            prop_assert!(s.settle(100_000));
            for c in CLASSES {
                let _ = c.status(&s);
            }
        }
    }
}
