//! The stripe class (gstripe(8), RAID 0): members interleaved in stripes
//! of a fixed size into one provider, `stripe/NAME`.
//!
//! ```text
//!   stripe/NAME:  | s0 | s1 | s2 | s3 | s4 | s5 | …      (stripe size S)
//!                    │    │    │    │    │    │
//!   member 0:     | s0 | s2 | s4 |      stripe k lives on member k mod n,
//!   member 1:     | s1 | s3 | s5 |      at (k div n) × S on it
//! ```
//!
//! A request is cut at stripe boundaries; the pieces that fall on one
//! member are contiguous there, so each member gets at most one child,
//! whose page list is made of slices of the parent's (no copy, no map).
//! The parent completes when all children are back, with the first error
//! (fanout). FLUSH goes to every member.
//!
//! Each member contributes the same number of whole stripes (the smallest
//! member decides). `stripe label` keeps each member's last sector for
//! metadata, with the stripe size in `params[0]`; the geom reassembles by
//! tasting after a restart. If a member dies the stripe withers:
//! `stripe/NAME` is orphaned and its users get EIO.
//!
//! ```text
//! stripe create|label -s SIZE NAME PROVIDER...   # provider stripe/NAME
//! stripe destroy [-f] NAME
//! stripe clear PROVIDER...                       # wipe metadata sectors
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
use crate::page::SgList;
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use crate::taste::Member;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use serde_json::{json, Value};

/// One stripe geom.
pub struct StripeGeom {
    stripe_size: u64,
    members: Vec<(ConsumerId, String)>,
    member_bytes: u64,
    labelled: bool,
    id: u64,
    fan: Fanout,
}

/// A child being gathered for one member.
struct Piece {
    offset: u64,
    length: u64,
    sg: SgList,
}

impl StripeGeom {
    /// `stripe create|label -s SIZE NAME PROVIDER...`: builds
    /// `stripe/NAME`, and for `label` writes each member's metadata.
    pub fn create(
        stack: &mut Stack,
        name: &str,
        providers: &[String],
        stripe_size: u64,
        label: bool,
    ) -> Result<ProviderId, StackError> {
        let members = resolve_members(stack, providers)?;
        let id = if label { stack.random_u64() } else { 0 };
        let p = StripeGeom::build(stack, name, &members, stripe_size, label, id)?.1;
        if label {
            let mut params = [0; PARAMS];
            params[0] = stripe_size;
            write_labels(stack, "stripe", name, id, params, &members)?;
        }
        Ok(p)
    }

    /// Builds the geom over resolved members (create, label and assembly).
    fn build(
        stack: &mut Stack,
        name: &str,
        members: &[(ProviderId, ProviderSpec)],
        stripe_size: u64,
        labelled: bool,
        id: u64,
    ) -> Result<(GeomId, ProviderId), StackError> {
        let sector = members
            .iter()
            .map(|(_, s)| s.sector_size)
            .max()
            .unwrap_or(512);
        if !stripe_size.is_power_of_two()
            || !stripe_size.is_multiple_of(u64::from(sector))
            || stripe_size > u64::from(u32::MAX)
        {
            return Err(StackError::Invalid(format!(
                "stripe size {stripe_size} is not a power-of-two multiple of the {sector}-byte sector"
            )));
        }
        let member_bytes = members
            .iter()
            .map(|(_, spec)| usable_bytes(spec, labelled, stripe_size))
            .min()
            .unwrap_or(0);
        if member_bytes == 0 {
            return Err(StackError::Invalid(String::from(
                "a member is smaller than one stripe",
            )));
        }
        let g = stack.reserve_geom("stripe", name);
        let total = member_bytes * members.len() as u64;
        let mut spec = ProviderSpec::new(&format!("stripe/{name}"), total, sector);
        spec.stripe_size = stripe_size as u32;
        spec.can_discard = members.iter().all(|(_, s)| s.can_discard);
        spec.can_write_zeroes = members.iter().all(|(_, s)| s.can_write_zeroes);
        let p = match stack.add_provider(g, spec) {
            Ok(p) => p,
            Err(e) => {
                stack.abandon(g);
                return Err(e);
            }
        };
        let consumers = members
            .iter()
            .map(|(pid, spec)| (stack.attach(Some(g), *pid), spec.name.clone()))
            .collect();
        stack.install(
            g,
            Box::new(StripeGeom {
                stripe_size,
                members: consumers,
                member_bytes,
                labelled,
                id,
                fan: Fanout::new(),
            }),
        );
        Ok((g, p))
    }

    /// The children of a request: at most one per member, or a flush to
    /// every member.
    fn children(&self, bio: &Bio) -> Vec<(ConsumerId, Bio)> {
        if bio.cmd == BioCmd::Flush {
            return self
                .members
                .iter()
                .map(|(c, _)| (*c, Bio::flush()))
                .collect();
        }
        let s = self.stripe_size;
        let n = self.members.len() as u64;
        let mut pieces: Vec<Option<Piece>> = (0..n).map(|_| None).collect();
        let mut pos = 0;
        while pos < bio.length {
            let x = bio.offset + pos;
            let (k, within) = (x / s, x % s);
            let take = (s - within).min(bio.length - pos);
            let on_member = (k / n) * s + within;
            let piece = pieces[(k % n) as usize].get_or_insert_with(|| Piece {
                offset: on_member,
                length: 0,
                sg: SgList::new(),
            });
            debug_assert_eq!(piece.offset + piece.length, on_member);
            piece.length += take;
            if bio.cmd.has_data() {
                piece.sg.append(&bio.sg.slice(pos, take));
            }
            pos += take;
        }
        self.members
            .iter()
            .zip(pieces)
            .filter_map(|((c, _), p)| {
                let p = p?;
                Some((*c, bio.child(p.offset, p.length, p.sg)))
            })
            .collect()
    }
}

impl Geom for StripeGeom {
    fn class_name(&self) -> &'static str {
        "stripe"
    }

    fn start(&mut self, io: &mut Io<'_>, _provider: ProviderId, bio: Bio) {
        let children = self.children(&bio);
        self.fan.start(io, bio, children);
    }

    fn done(&mut self, io: &mut Io<'_>, cookie: u64, _child: Bio, result: BioResult) {
        self.fan.done(io, cookie, result);
    }

    fn dumpconf(&self) -> Value {
        let members: Vec<&str> = self.members.iter().map(|(_, n)| n.as_str()).collect();
        json!({
            "stripe_size": self.stripe_size,
            "member_bytes": self.member_bytes,
            "labelled": self.labelled,
            "id": self.id,
            "members": members,
        })
    }
}

/// The stripe class: `stripe create|label`, and assembly from metadata.
pub struct StripeClass;

/// The stripe class's registry entry.
pub static CLASS: StripeClass = StripeClass;

/// `stripe create|label -s SIZE NAME PROVIDER...`: provider `stripe/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeCreate {
    /// Geom name.
    pub name: String,
    /// Members in order.
    pub providers: Vec<String>,
    /// Stripe size in bytes (a power of two).
    pub stripe_size: u64,
    /// Write metadata (`label`) or not (`create`).
    pub label: bool,
}

impl Command for StripeCreate {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        StripeGeom::create(
            stack,
            &self.name,
            &self.providers,
            self.stripe_size,
            self.label,
        )?;
        Ok(())
    }

    fn creates(&self) -> Option<(String, String)> {
        Some((format!("stripe/{}", self.name), self.name.clone()))
    }

    fn on_disk(&self, stack: &mut Stack) -> bool {
        self.label && stack.find_geom("stripe", &self.name).is_some()
    }
}

impl Class for StripeClass {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        const VERBS: &str = "create, label, destroy or clear";
        let (label, verb) = match member_verb("stripe", args, VERBS)? {
            MemberVerb::Create { label, verb } => (label, verb),
            MemberVerb::Parsed(c) => return Ok(c),
            MemberVerb::Other(verb) => return Err(unknown_verb(args, "stripe", &verb, VERBS)),
        };
        let mut stripe_size = None;
        while let Some(w) = args.option() {
            if w.text != "-s" {
                return Err(args.err(w.column, format!("unknown stripe option '{}'", w.text)));
            }
            let (n, column) = args.size("a stripe size after -s")?;
            if n < 512 || !n.is_power_of_two() || n > 1 << 30 {
                return Err(args.err(
                    column,
                    "stripe size must be a power of two from 512 bytes to 1g",
                ));
            }
            stripe_size = Some(n);
        }
        let name = args.geom_name("stripe")?;
        let providers = args.providers(1)?;
        let stripe_size =
            stripe_size.ok_or_else(|| args.err(verb.column, "stripe create needs -s SIZE"))?;
        Ok(Arc::new(StripeCreate {
            name,
            providers,
            stripe_size,
            label,
        }))
    }

    fn assemble(&self, stack: &mut Stack, members: &[Member]) -> Result<GeomId, StackError> {
        let first = &members[0].meta;
        let (name, id, stripe_size) = (first.name.clone(), first.id, first.params[0]);
        if members.iter().any(|m| m.meta.params[0] != stripe_size) {
            return Err(StackError::Invalid(format!(
                "members of stripe '{name}' disagree on the stripe size"
            )));
        }
        let resolved = tasted_members(stack, members);
        Ok(StripeGeom::build(stack, &name, &resolved, stripe_size, true, id)?.0)
    }
}

#[cfg(test)]
mod tests {
    use crate::class::{parse_test, Destroy};

    #[test]
    fn statements_parse() {
        assert_eq!(
            parse_test::cmd::<StripeCreate>("stripe label -s 64k st0 vtbd0 vtbd1"),
            StripeCreate {
                name: "st0".into(),
                providers: vec!["vtbd0".into(), "vtbd1".into()],
                stripe_size: 65536,
                label: true
            }
        );
        assert_eq!(
            parse_test::cmd::<Destroy>("stripe destroy -f st0"),
            Destroy {
                class: "stripe",
                name: "st0".into(),
                force: true,
                provider: "stripe/st0".into(),
            }
        );
    }

    #[test]
    fn statement_errors_name_the_column() {
        let (c, m) = parse_test::err("stripe label st0 vtbd0 vtbd1");
        assert_eq!(c, 8);
        assert!(m.contains("-s"), "{m}");
        assert_eq!(parse_test::err("stripe create -s 3k st0 vtbd0").0, 18);
        assert_eq!(parse_test::err("stripe create -s 64k st0").0, 25);
        assert_eq!(parse_test::err("stripe destroy -x st0").0, 16);
    }

    use super::*;
    use crate::bio::BioError;
    use crate::config::parse_line;
    use crate::ctl;
    use crate::meta::MetaRepr;
    use crate::testing;
    use alloc::vec;
    use proptest::prelude::*;

    fn apply(s: &mut Stack, line: &str) -> Result<(), CtlError> {
        ctl::apply(s, &parse_line(line, 1).unwrap().unwrap())
    }

    #[test]
    fn stripes_land_round_robin() {
        let (mut s, disks) = testing::stack_with_disks(3, 64 << 10, 512);
        apply(&mut s, "stripe create -s 4k st0 vtbd0 vtbd1 vtbd2").unwrap();
        let c = s.open("stripe/st0", crate::stack::Access::READ_WRITE).unwrap();
        let p = s.consumer_provider(c);
        assert_eq!(s.provider(p).spec.media_size, 3 * (64 << 10));
        assert_eq!(s.provider(p).spec.stripe_size, 4096);
        // Seven stripes from the middle of stripe 0 to the middle of stripe 7.
        let data = testing::pattern(4, 0, 7 * 4096);
        testing::write(&mut s, c, 2048, &data).unwrap();
        let img: Vec<Vec<u8>> = disks.iter().map(|d| d.contents()).collect();
        for k in 0..8u64 {
            let (from, to) = ((k * 4096).max(2048), ((k + 1) * 4096).min(2048 + 7 * 4096));
            let (m, row) = ((k % 3) as usize, k / 3);
            let on = (row * 4096 + from % 4096) as usize;
            assert_eq!(
                &img[m][on..on + (to - from) as usize],
                &data[(from - 2048) as usize..(to - 2048) as usize],
                "stripe {k}"
            );
        }
        assert_eq!(testing::read(&mut s, c, 2048, data.len()).unwrap(), data);
        // One request per member, however many stripes it covered.
        assert_eq!(disks.iter().map(|d| d.stats().writes).sum::<u64>(), 3);
    }

    #[test]
    fn smallest_member_decides_and_label_keeps_a_sector() {
        let mut images = vec![vec![0u8; 64 << 10], vec![0u8; 40 << 10]];
        images[0][0] = 1;
        let (mut s, disks) = testing::stack_from_images(&images, 512);
        apply(&mut s, "stripe label -s 8k st0 vtbd0 vtbd1").unwrap();
        let p = s.find_provider("stripe/st0").unwrap();
        // 40k minus a sector holds four 8k stripes.
        assert_eq!(s.provider(p).spec.media_size, 64 << 10);
        for d in &disks {
            let img = d.contents();
            let m = MetaRepr::from_bytes(&img[img.len() - 512..]).unwrap();
            assert_eq!(m.params[0], 8192);
        }
    }

    #[test]
    fn tasting_reassembles_in_any_order() {
        let (mut s, disks) = testing::stack_with_disks(3, 48 << 10, 512);
        apply(&mut s, "stripe label -s 1k st0 vtbd0 vtbd1 vtbd2").unwrap();
        let c = s.open("stripe/st0", crate::stack::Access::READ_WRITE).unwrap();
        let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
        let data = testing::pattern(2, 0, size);
        testing::write(&mut s, c, 0, &data).unwrap();
        let images: Vec<Vec<u8>> = disks.iter().map(|d| d.contents()).collect();
        for order in [[2usize, 0, 1], [1, 0, 2]] {
            let imgs: Vec<Vec<u8>> = order.iter().map(|&i| images[i].clone()).collect();
            let (mut s, _) = testing::stack_from_images(&imgs, 512);
            assert!(s.settle(1000));
            let c = s.open("stripe/st0", crate::stack::Access::READ).unwrap();
            assert_eq!(testing::read(&mut s, c, 0, size).unwrap(), data);
            assert!(s.taste_log().any(|l| l == "assembled stripe/st0"));
        }
    }

    #[test]
    fn a_member_seen_again_through_a_nop_joins_the_live_geom() {
        let (mut s, _) = testing::stack_with_disks(2, 64 << 10, 512);
        apply(&mut s, "stripe label -s 4k st0 vtbd0 vtbd1").unwrap();
        apply(&mut s, "nop create vtbd0").unwrap();
        assert!(s.incomplete_geoms().is_empty());
        assert_eq!(
            s.geoms().filter(|&g| s.geom_class(g) == "stripe").count(),
            1
        );
    }

    #[test]
    fn refuses_bad_stripe_sizes() {
        let (mut s, _) = testing::stack_with_disks(2, 64 << 10, 4096);
        assert!(apply(&mut s, "stripe create -s 1k st0 vtbd0 vtbd1").is_err());
        assert!(apply(&mut s, "stripe create -s 128k st0 vtbd0 vtbd1").is_err());
        assert!(apply(&mut s, "stripe create -s 4k st0 vtbd0 vtbd1").is_ok());
    }

    #[test]
    fn member_error_fails_the_request_and_flush_reaches_all() {
        let (mut s, disks) = testing::stack_with_disks(2, 64 << 10, 512);
        apply(&mut s, "stripe create -s 4k st0 vtbd0 vtbd1").unwrap();
        let c = s.open("stripe/st0", crate::stack::Access::READ_WRITE).unwrap();
        disks[1].fail_next(1);
        assert_eq!(testing::read(&mut s, c, 0, 16384), Err(BioError::Io));
        assert!(testing::read(&mut s, c, 0, 16384).is_ok());
        testing::write(&mut s, c, 0, &[7; 16384]).unwrap();
        testing::flush(&mut s, c).unwrap();
        for d in &disks {
            assert_eq!(d.stats().flushes, 1);
            assert_eq!(d.durable(), d.contents());
        }
        // FUA passes down to every member's write.
        let mut w = testing::write_bio(0, &[8; 16384]);
        w.fua = true;
        testing::io(&mut s, c, w).1.unwrap();
        for d in &disks {
            assert_eq!(
                d.stats().flushes,
                2,
                "FUA became write + flush on each disk"
            );
            assert_eq!(d.durable(), d.contents());
        }
    }

    #[test]
    fn forced_destroy_under_an_open_consumer() {
        let (mut s, _) = testing::stack_with_disks(2, 64 << 10, 512);
        apply(&mut s, "stripe create -s 4k st0 vtbd0 vtbd1").unwrap();
        let c = s.open("stripe/st0", crate::stack::Access::READ_WRITE).unwrap();
        assert!(matches!(
            apply(&mut s, "stripe destroy st0"),
            Err(CtlError::Stack(StackError::Busy(_)))
        ));
        apply(&mut s, "stripe destroy -f st0").unwrap();
        assert_eq!(testing::read(&mut s, c, 0, 512), Err(BioError::Orphaned));
        let json = ctl::topology_json(&s);
        assert!(json.contains("\"state\":\"orphaned\""), "{json}");
        for d in ["vtbd0", "vtbd1"] {
            let p = s.find_provider(d).unwrap();
            assert!(s.provider(p).access.is_zero());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn behaves_like_a_flat_array(ops in testing::ops_all(400, 48, 40),
                                     shift in 9u32..14, n in 1usize..5, label in any::<bool>()) {
            let (mut s, disks) = testing::stack_with_disks(n, 64 << 10, 512);
            let names: Vec<String> = (0..n).map(crate::disk::vtbd_name).collect();
            let verb = if label { "label" } else { "create" };
            apply(&mut s, &format!("stripe {verb} -s {} st0 {}", 1u64 << shift, names.join(" "))).unwrap();
            let c = s.open("stripe/st0", crate::stack::Access::READ_WRITE).unwrap();
            testing::run_model(&mut s, c, &ops, &disks);
            let st = &s.provider(s.find_provider("stripe/st0").unwrap()).stats;
            prop_assert_eq!(st.data.bytes_mapped() + st.data.bytes_copied(), 0);
            for name in &names {
                let st = &s.provider(s.find_provider(name).unwrap()).stats;
                prop_assert_eq!(st.data.bytes_mapped() + st.data.bytes_copied(), 0);
            }
        }
    }
}
