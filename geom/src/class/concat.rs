//! The concat class (gconcat(8)): members joined end to end into one
//! provider, `concat/NAME`.
//!
//! ```text
//!   concat/NAME:  [ member 0          | member 1     | member 2        ]
//!                          └─ a bio crossing a boundary is split: one
//!                             child per member it touches, sharing the
//!                             parent's pages (no copy, no map); the
//!                             parent completes when all are back, with
//!                             the first error (fanout)
//!   FLUSH: one child to every member.
//! ```
//!
//! `concat create` uses every byte of each member; `concat label` keeps
//! each member's last sector for metadata (member index, count, size),
//! so the geom reassembles by tasting after a restart whatever order the
//! disks come in. If a member dies the concat withers: `concat/NAME` is
//! orphaned and its users get EIO.
//!
//! ```text
//! concat create|label NAME PROVIDER...   # provider concat/NAME
//! concat destroy [-f] NAME
//! concat clear PROVIDER...               # wipe metadata sectors
//! ```

use super::{
    member_verb, resolve_members, tasted_members, unknown_verb, usable_bytes, write_labels, Class,
    Command, MemberVerb,
};
use crate::bio::{Bio, BioCmd, BioResult, ConsumerId, GeomId, ProviderId};
use crate::config::{Args, ConfigError};
use crate::ctl::CtlError;
use crate::fanout::Fanout;
use crate::meta::PARAMS;
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use crate::taste::Member;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use serde_json::{json, Value};

/// One member: where it sits in the concat.
struct Part {
    consumer: ConsumerId,
    name: String,
    start: u64,
    size: u64,
}

/// One concat geom.
pub struct ConcatGeom {
    parts: Vec<Part>,
    labelled: bool,
    id: u64,
    fan: Fanout,
}

impl ConcatGeom {
    /// `concat create|label NAME PROVIDER...`: builds `concat/NAME`, and
    /// for `label` writes each member's metadata.
    pub fn create(
        stack: &mut Stack,
        name: &str,
        providers: &[String],
        label: bool,
    ) -> Result<ProviderId, StackError> {
        let members = resolve_members(stack, providers)?;
        let id = if label { stack.random_u64() } else { 0 };
        let p = ConcatGeom::build(stack, name, &members, label, id)?.1;
        if label {
            write_labels(stack, "concat", name, id, [0; PARAMS], &members)?;
        }
        Ok(p)
    }

    /// Builds the geom over resolved members (create, label and assembly).
    fn build(
        stack: &mut Stack,
        name: &str,
        members: &[(ProviderId, ProviderSpec)],
        labelled: bool,
        id: u64,
    ) -> Result<(GeomId, ProviderId), StackError> {
        let sector = members
            .iter()
            .map(|(_, s)| s.sector_size)
            .max()
            .unwrap_or(512);
        let mut start = 0;
        let mut sizes = Vec::new();
        for (_, spec) in members {
            let size = usable_bytes(spec, labelled, u64::from(sector));
            if size == 0 {
                return Err(StackError::Invalid(format!(
                    "provider '{}' is too small for concat",
                    spec.name
                )));
            }
            sizes.push((start, size));
            start += size;
        }
        let g = stack.reserve_geom("concat", name);
        let mut spec = ProviderSpec::new(&format!("concat/{name}"), start, sector);
        spec.can_discard = members.iter().all(|(_, s)| s.can_discard);
        spec.can_write_zeroes = members.iter().all(|(_, s)| s.can_write_zeroes);
        let p = match stack.add_provider(g, spec) {
            Ok(p) => p,
            Err(e) => {
                stack.abandon(g);
                return Err(e);
            }
        };
        let parts = members
            .iter()
            .zip(sizes)
            .map(|((pid, spec), (start, size))| Part {
                consumer: stack.attach(Some(g), *pid),
                name: spec.name.clone(),
                start,
                size,
            })
            .collect();
        stack.install(
            g,
            Box::new(ConcatGeom {
                parts,
                labelled,
                id,
                fan: Fanout::new(),
            }),
        );
        Ok((g, p))
    }

    /// The children of a request: one per member its range touches, or
    /// a flush to every member.
    fn children(&self, bio: &Bio) -> Vec<(ConsumerId, Bio)> {
        if bio.cmd == BioCmd::Flush {
            return self
                .parts
                .iter()
                .map(|p| (p.consumer, Bio::flush()))
                .collect();
        }
        let mut out = Vec::new();
        for p in &self.parts {
            let from = bio.offset.max(p.start);
            let to = bio.end().min(p.start + p.size);
            if from >= to {
                continue;
            }
            let at = from - bio.offset;
            out.push((p.consumer, bio.split(at, to - from, from - p.start)));
        }
        out
    }
}

impl Geom for ConcatGeom {
    fn class_name(&self) -> &'static str {
        "concat"
    }

    fn start(&mut self, io: &mut Io<'_>, _provider: ProviderId, bio: Bio) {
        let children = self.children(&bio);
        self.fan.start(io, bio, children);
    }

    fn done(&mut self, io: &mut Io<'_>, cookie: u64, _child: Bio, result: BioResult) {
        self.fan.done(io, cookie, result);
    }

    fn dumpconf(&self) -> Value {
        let members: Vec<Value> = self
            .parts
            .iter()
            .map(|p| json!({"provider": p.name, "start": p.start, "size": p.size}))
            .collect();
        json!({"labelled": self.labelled, "id": self.id, "members": members})
    }
}

/// The concat class: `concat create|label`, and assembly from metadata.
pub struct ConcatClass;

/// The concat class's registry entry.
pub static CLASS: ConcatClass = ConcatClass;

/// `concat create|label NAME PROVIDER...`: provider `concat/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcatCreate {
    /// Geom name.
    pub name: String,
    /// Members in order.
    pub providers: Vec<String>,
    /// Write metadata (`label`) or not (`create`).
    pub label: bool,
}

impl Command for ConcatCreate {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        ConcatGeom::create(stack, &self.name, &self.providers, self.label)?;
        Ok(())
    }

    fn creates(&self) -> Option<(String, String)> {
        Some((format!("concat/{}", self.name), self.name.clone()))
    }

    fn on_disk(&self, stack: &mut Stack) -> bool {
        self.label && stack.find_geom("concat", &self.name).is_some()
    }
}

impl Class for ConcatClass {
    fn name(&self) -> &'static str {
        "concat"
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        const VERBS: &str = "create, label, destroy or clear";
        let label = match member_verb("concat", args, VERBS)? {
            MemberVerb::Create { label, .. } => label,
            MemberVerb::Parsed(c) => return Ok(c),
            MemberVerb::Other(verb) => return Err(unknown_verb(args, "concat", &verb, VERBS)),
        };
        if let Some(w) = args.option() {
            return Err(args.err(w.column, format!("unknown concat option '{}'", w.text)));
        }
        let name = args.geom_name("concat")?;
        let providers = args.providers(1)?;
        Ok(Arc::new(ConcatCreate {
            name,
            providers,
            label,
        }))
    }

    fn assemble(&self, stack: &mut Stack, members: &[Member]) -> Result<GeomId, StackError> {
        let first = &members[0].meta;
        let (name, id) = (first.name.clone(), first.id);
        let resolved = tasted_members(stack, members);
        Ok(ConcatGeom::build(stack, &name, &resolved, true, id)?.0)
    }
}

#[cfg(test)]
mod tests {
    use crate::class::{parse_test, Clear};

    #[test]
    fn statements_parse() {
        assert_eq!(
            parse_test::cmd::<ConcatCreate>("concat create c0 md0 md1"),
            ConcatCreate {
                name: "c0".into(),
                providers: vec!["md0".into(), "md1".into()],
                label: false
            }
        );
        assert_eq!(
            parse_test::cmd::<Clear>("concat clear vtbd0 vtbd1"),
            Clear {
                class: "concat",
                providers: vec!["vtbd0".into(), "vtbd1".into()]
            }
        );
    }

    #[test]
    fn statement_errors_name_the_column() {
        let (c, m) = parse_test::err("concat create c0 vtbd0 vtbd0");
        assert_eq!(c, 24);
        assert!(m.contains("twice"), "{m}");
        assert_eq!(parse_test::err("concat create a/b vtbd0").0, 15);
        assert_eq!(parse_test::err("concat frob c0").0, 8);
        assert_eq!(parse_test::err("concat insert c0 vtbd0").0, 8);
    }

    use super::*;
    use crate::bio::BioError;
    use crate::config::parse_line;
    use crate::ctl;
    use crate::disk::DiskGeom;
    use crate::meta::MetaRepr;
    use crate::testing::{self, FakeDisk, FakeDiskHandle};
    use alloc::vec;
    use proptest::prelude::*;

    fn apply(s: &mut Stack, line: &str) -> Result<(), CtlError> {
        ctl::apply(s, &parse_line(line, 1).unwrap().unwrap())
    }

    /// Three disks of different sizes (64, 96 and 32 KiB).
    fn three() -> (Stack, Vec<FakeDiskHandle>) {
        let mut s = Stack::new();
        let mut hs = Vec::new();
        for (i, kib) in [64u64, 96, 32].into_iter().enumerate() {
            let (d, h) = FakeDisk::new(kib << 10, 512, 77 + i as u64);
            DiskGeom::create(&mut s, &crate::disk::vtbd_name(i), Box::new(d)).unwrap();
            hs.push(h);
        }
        (s, hs)
    }

    #[test]
    fn create_joins_members_end_to_end() {
        let (mut s, disks) = three();
        apply(&mut s, "concat create c0 vtbd0 vtbd1 vtbd2").unwrap();
        let c = s.open("concat/c0", crate::stack::Access::READ_WRITE).unwrap();
        assert_eq!(
            s.provider(s.consumer_provider(c)).spec.media_size,
            192 << 10
        );
        // A write across the first boundary lands on two disks.
        let data = testing::pattern(1, 0, 8192);
        testing::write(&mut s, c, (64 << 10) - 4096, &data).unwrap();
        assert_eq!(&disks[0].contents()[(64 << 10) - 4096..], &data[..4096]);
        assert_eq!(&disks[1].contents()[..4096], &data[4096..]);
        assert_eq!(
            testing::read(&mut s, c, (64 << 10) - 4096, 8192).unwrap(),
            data
        );
        assert_eq!(
            testing::read(&mut s, c, 192 << 10, 512),
            Err(BioError::OutOfRange)
        );
        testing::flush(&mut s, c).unwrap();
        assert!(disks.iter().all(|d| d.stats().flushes == 1));
    }

    #[test]
    fn label_keeps_a_sector_per_member_for_metadata() {
        let (mut s, disks) = three();
        apply(&mut s, "concat label c0 vtbd0 vtbd1 vtbd2").unwrap();
        let p = s.find_provider("concat/c0").unwrap();
        assert_eq!(s.provider(p).spec.media_size, (192 << 10) - 3 * 512);
        let mut ids = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let img = d.contents();
            let m = MetaRepr::from_bytes(&img[img.len() - 512..]).unwrap();
            assert_eq!((m.class.as_str(), m.name.as_str()), ("concat", "c0"));
            assert_eq!((m.member_index, m.member_count), (i as u32, 3));
            assert_eq!(m.member_size, img.len() as u64);
            ids.push(m.id);
            assert_eq!(d.durable(), img, "metadata written with FUA");
        }
        assert!(ids.iter().all(|&id| id == ids[0]));
    }

    /// Disk images of a labelled concat holding a pattern.
    fn labelled_images() -> (Vec<Vec<u8>>, Vec<u8>) {
        let (mut s, disks) = three();
        apply(&mut s, "concat label c0 vtbd0 vtbd1 vtbd2").unwrap();
        let c = s.open("concat/c0", crate::stack::Access::READ_WRITE).unwrap();
        let size = s.provider(s.consumer_provider(c)).spec.media_size;
        let data = testing::pattern(9, 0, size as usize);
        testing::write(&mut s, c, 0, &data).unwrap();
        (disks.iter().map(|d| d.contents()).collect(), data)
    }

    #[test]
    fn tasting_assembles_in_any_disk_order() {
        let (images, data) = labelled_images();
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let imgs: Vec<Vec<u8>> = order.iter().map(|&i| images[i].clone()).collect();
            let (mut s, _) = testing::stack_from_images(&imgs, 512);
            assert!(s.settle(1000));
            let c = s.open("concat/c0", crate::stack::Access::READ_WRITE).unwrap();
            assert_eq!(testing::read(&mut s, c, 0, data.len()).unwrap(), data);
        }
    }

    #[test]
    fn a_missing_member_keeps_the_geom_waiting_until_it_appears() {
        let (images, data) = labelled_images();
        let (mut s, _) = testing::stack_from_images(&images[..2], 512);
        assert!(s.settle(1000));
        assert_eq!(s.find_provider("concat/c0"), None);
        let json = ctl::topology_json(&s);
        assert!(
            json.contains(
                "\"waiting\":[{\"class\":\"concat\",\"name\":\"c0\",\"members\":2,\"of\":3}]"
            ),
            "{json}"
        );
        // The last disk appears live.
        let (d, h) = FakeDisk::new(images[2].len() as u64, 512, 5);
        h.write_at(0, &images[2]);
        DiskGeom::create(&mut s, "vtbd7", Box::new(d)).unwrap();
        assert!(s.settle(1000));
        let c = s.open("concat/c0", crate::stack::Access::READ_WRITE).unwrap();
        assert_eq!(testing::read(&mut s, c, 0, data.len()).unwrap(), data);
    }

    #[test]
    fn a_stale_member_is_ignored() {
        let (mut images, _) = labelled_images();
        // Member 1 grew since it was labelled: not trusted.
        let meta = images[1][images[1].len() - 512..].to_vec();
        images[1].extend_from_slice(&meta);
        let (mut s, _) = testing::stack_from_images(&images, 512);
        assert!(s.settle(1000));
        assert_eq!(s.find_provider("concat/c0"), None);
        assert!(s.taste_log().any(|l| l.contains("ignored")));
    }

    #[test]
    fn destroy_and_member_loss() {
        let (mut s, disks) = three();
        apply(&mut s, "concat create c0 vtbd0 vtbd1 vtbd2").unwrap();
        let c = s.open("concat/c0", crate::stack::Access::READ_WRITE).unwrap();
        assert!(apply(&mut s, "concat destroy c0").is_err());
        disks[2].set_dead(true);
        let last = (192 << 10) - 512;
        for _ in 0..crate::disk::DEFAULT_ERROR_LIMIT {
            assert_eq!(testing::read(&mut s, c, last, 512), Err(BioError::Io));
        }
        // vtbd2 is orphaned, so the concat withered: everything fails now.
        assert_eq!(testing::read(&mut s, c, 0, 512), Err(BioError::Orphaned));
        assert_eq!(s.find_geom("concat", "c0"), None);
        s.close(c).unwrap();
        assert_eq!(s.find_provider("concat/c0"), None);
        // vtbd0 and vtbd1 are free again.
        apply(&mut s, "concat create c1 vtbd0 vtbd1").unwrap();
        let c = s.open("concat/c1", crate::stack::Access::READ_WRITE).unwrap();
        testing::write(&mut s, c, 0, &[1; 512]).unwrap();
        s.close(c).unwrap();
        apply(&mut s, "concat destroy c1").unwrap();
        assert_eq!(s.find_provider("concat/c1"), None);
    }

    #[test]
    fn refuses_bad_members() {
        let (mut s, _) = three();
        assert!(matches!(
            apply(&mut s, "concat create c0 vtbd0 vtbd9"),
            Err(CtlError::Stack(StackError::NoSuchProvider(_)))
        ));
        assert!(apply(&mut s, "concat create c0 vtbd0").is_ok());
        assert!(matches!(
            apply(&mut s, "concat create c0 vtbd1"),
            Err(CtlError::Stack(StackError::NameInUse(_)))
        ));
        assert_eq!(
            s.geoms().filter(|&g| s.geom_class(g) == "concat").count(),
            1
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn behaves_like_a_flat_array(ops in testing::ops_all(384, 40, 40), label in any::<bool>()) {
            let (mut s, disks) = three();
            let verb = if label { "label" } else { "create" };
            apply(&mut s, &format!("concat {verb} c0 vtbd0 vtbd1 vtbd2")).unwrap();
            let c = s.open("concat/c0", crate::stack::Access::READ_WRITE).unwrap();
            testing::run_model(&mut s, c, &ops, &disks);
            for name in ["concat/c0", "vtbd0", "vtbd1", "vtbd2"] {
                let st = &s.provider(s.find_provider(name).unwrap()).stats;
                prop_assert_eq!(st.data.bytes_mapped(), 0);
                prop_assert_eq!(st.data.bytes_copied(), 0);
            }
        }
    }

    #[test]
    fn four_k_sectors() {
        let (mut s, disks) = testing::stack_with_disks(2, 64 << 10, 4096);
        apply(&mut s, "concat label c0 vtbd0 vtbd1").unwrap();
        let c = s.open("concat/c0", crate::stack::Access::READ_WRITE).unwrap();
        assert_eq!(
            s.provider(s.consumer_provider(c)).spec.media_size,
            120 << 10
        );
        assert_eq!(testing::read(&mut s, c, 512, 512), Err(BioError::Invalid));
        let ops = vec![
            testing::Op::Write {
                at: 10,
                len: 10,
                seed: 3,
            },
            testing::Op::Read { at: 12, len: 4 },
            testing::Op::Flush,
        ];
        testing::run_model(&mut s, c, &ops, &disks);
    }
}
