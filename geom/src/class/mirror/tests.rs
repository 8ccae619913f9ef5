//! Host tests of the mirror class: fake disks that complete out of order
//! and fail on demand, a model-based property test through a member
//! failure and a resync, and restarts that reassemble from metadata.

use super::*;
use crate::bio::{Bio, BioError, ConsumerId};
use crate::config::parse_line;
use crate::ctl::{self, CtlError};
use crate::disk::DiskGeom;
use crate::meta::MetaRepr;
use crate::stack::Stack;
use crate::testing::{self, FakeDisk, FakeDiskHandle, Op};
use alloc::boxed::Box;
use alloc::vec;
use proptest::prelude::*;

const SECTOR: u64 = 512;

fn apply(s: &mut Stack, line: &str) -> Result<(), CtlError> {
    ctl::apply(s, &parse_line(line, 1).unwrap().unwrap())
}

#[test]
fn statements_parse() {
    use crate::class::parse_test::{cmd, err};
    assert_eq!(
        cmd::<MirrorCreate>("mirror label -b round-robin gm0 vtbd2.nop vtbd3"),
        MirrorCreate {
            name: "gm0".into(),
            providers: vec!["vtbd2.nop".into(), "vtbd3".into()],
            balance: Some(MirrorBalance::RoundRobin),
            label: true
        }
    );
    assert_eq!(
        cmd::<MirrorInsert>("mirror insert gm0 vtbd4"),
        MirrorInsert {
            name: "gm0".into(),
            providers: vec!["vtbd4".into()]
        }
    );
    assert_eq!(
        cmd::<MirrorRebuild>("mirror rebuild gm0 vtbd4"),
        MirrorRebuild {
            name: "gm0".into(),
            provider: "vtbd4".into()
        }
    );
    assert_eq!(
        cmd::<MirrorForget>("mirror forget gm0"),
        MirrorForget { name: "gm0".into() }
    );
    assert_eq!(err("mirror label -b fastest gm0 vtbd0").0, 17);
    assert_eq!(err("mirror forget gm0 extra").0, 19);
}

fn st(s: &mut Stack) -> MirrorStatus {
    status(s, "gm0").expect("mirror gm0 is live")
}

/// The record in a disk's last sector.
fn meta_of(bytes: &[u8]) -> Option<MetaRepr> {
    MetaRepr::from_bytes(&bytes[bytes.len() - SECTOR as usize..]).ok()
}

/// Asserts the mirror's provider never mapped or copied data.
fn assert_zero_maps(s: &Stack, provider: &str) {
    let p = s.find_provider(provider).unwrap();
    let d = &s.provider(p).stats.data;
    assert_eq!(
        (d.bytes_mapped(), d.bytes_copied()),
        (0, 0),
        "{provider} touched data"
    );
}

/// Runs the stack with the clock ticking until no member synchronizes.
fn finish_resync(s: &mut Stack, clock: &mut u64) {
    for _ in 0..100_000 {
        *clock += 1;
        s.set_now_ns(*clock);
        s.run();
        if status(s, "gm0").is_none_or(|m| m.resync().is_none()) {
            return;
        }
    }
    panic!("resync does not end");
}

#[test]
fn label_writes_generation_one_to_every_member() {
    let size = 256 << 10;
    let (mut s, disks) = testing::stack_with_disks(2, size, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let m = st(&mut s);
    assert_eq!(m.state, MirrorState::Complete);
    assert_eq!(m.media_size, size - SECTOR);
    assert_eq!(m.balance, MirrorBalance::Load);
    assert_eq!(m.generation, 1);
    for (i, d) in disks.iter().enumerate() {
        let r = meta_of(&d.contents()).unwrap();
        assert_eq!((r.class.as_str(), r.name.as_str()), ("mirror", "gm0"));
        assert_eq!((r.generation, r.flags, r.member_count), (1, 0, 2));
        assert_eq!(r.member_index, i as u32);
        assert_eq!(
            (r.params[0], r.params[2], r.params[3]),
            (2, m.media_size, 512)
        );
        // Nothing was copied: label trusts every member, as gmirror does.
        assert_eq!(d.stats().writes, 1);
    }
    assert_zero_maps(&s, "mirror/gm0");
    let json = ctl::topology_json(&s);
    assert!(json.contains("\"generation\":1"), "{json}");
    assert!(json.contains("\"resync\":null"), "{json}");
}

#[test]
fn rebuild_copies_onto_a_member_that_differs() {
    let size = 256 << 10;
    let images = vec![testing::pattern(1, 0, size), testing::pattern(2, 0, size)];
    let (mut s, disks) = testing::stack_from_images(&images, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    apply(&mut s, "mirror rebuild gm0 vtbd1").unwrap();
    let m = st(&mut s);
    assert_eq!((m.state, m.generation), (MirrorState::Complete, 3));
    let media = m.media_size as usize;
    assert!(disks[1].contents()[..media] == images[0][..media]);
    assert_zero_maps(&s, "mirror/gm0");
}

#[test]
fn create_writes_no_metadata() {
    let (mut s, disks) = testing::stack_with_disks(2, 64 << 10, 512);
    apply(&mut s, "mirror create -b round-robin gm0 vtbd0 vtbd1").unwrap();
    let m = st(&mut s);
    assert_eq!(m.media_size, 64 << 10);
    assert_eq!(m.state, MirrorState::Complete);
    for d in &disks {
        assert!(meta_of(&d.contents()).is_none());
    }
}

#[test]
fn writes_reach_every_member_and_flush_every_disk() {
    let (mut s, disks) = testing::stack_with_disks(3, 128 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1 vtbd2").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let data = testing::pattern(9, 4096, 20_480);
    testing::write(&mut s, c, 4096, &data).unwrap();
    for d in &disks {
        assert!(d.contents()[4096..4096 + data.len()] == data[..]);
    }
    testing::flush(&mut s, c).unwrap();
    for d in &disks {
        assert!(d.durable() == d.contents(), "flush missed a member");
    }
    // FUA passes down: the disk class makes it stable on every member.
    let mut bio = testing::write_bio(0, &testing::pattern(3, 0, 4096));
    bio.fua = true;
    testing::io(&mut s, c, bio).1.unwrap();
    for d in &disks {
        assert!(d.durable()[..4096] == testing::pattern(3, 0, 4096)[..]);
    }
    assert_eq!(testing::read(&mut s, c, 4096, data.len()).unwrap(), data);
    assert_zero_maps(&s, "mirror/gm0");
}

/// Reads completed by each disk while `f` runs.
fn reads_during(disks: &[FakeDiskHandle], f: impl FnOnce()) -> Vec<u64> {
    let before: Vec<u64> = disks.iter().map(|d| d.stats().reads).collect();
    f();
    disks
        .iter()
        .zip(before)
        .map(|(d, b)| d.stats().reads - b)
        .collect()
}

#[test]
fn reads_follow_the_balance() {
    for (balance, expect) in [
        ("round-robin", vec![4, 4]),
        ("prefer", vec![8, 0]),
        ("split", vec![8, 8]),
    ] {
        let (mut s, disks) = testing::stack_with_disks(2, 128 << 10, 512);
        apply(
            &mut s,
            &alloc::format!("mirror label -b {balance} gm0 vtbd0 vtbd1"),
        )
        .unwrap();
        let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
        let got = reads_during(&disks, || {
            for _ in 0..8 {
                testing::read(&mut s, c, 0, 16384).unwrap();
            }
        });
        assert_eq!(got, expect, "balance {balance}");
    }
}

#[test]
fn load_balance_avoids_a_busy_member() {
    let (mut s, disks) = testing::stack_with_disks(2, 128 << 10, 512);
    apply(&mut s, "mirror label -b load gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    // Whichever member gets the first read is held busy; the others go to
    // the idle one.
    let idle_before: Vec<u64> = disks.iter().map(|d| d.stats().reads).collect();
    disks[0].hold(true);
    disks[1].hold(true);
    s.submit(c, Bio::read(0, 4096), 1);
    s.run();
    let busy = if disks[0].queued() == 1 { 0 } else { 1 };
    disks[1 - busy].hold(false);
    for t in 2..6 {
        s.submit(c, Bio::read(0, 4096), t);
        let (tag, _, r) = testing::wait(&mut s);
        assert_eq!((tag, r), (t, Ok(())));
    }
    assert_eq!(disks[busy].queued(), 1);
    assert_eq!(disks[1 - busy].stats().reads - idle_before[1 - busy], 4);
    disks[busy].hold(false);
    assert_eq!(testing::wait(&mut s).2, Ok(()));
}

#[test]
fn a_failed_write_drops_the_member_and_the_write_succeeds() {
    let (mut s, disks) = testing::stack_with_disks(2, 128 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let gen = st(&mut s).generation;
    disks[1].set_fail_writes(true);
    let data = testing::pattern(5, 0, 8192);
    assert_eq!(testing::write(&mut s, c, 8192, &data), Ok(()));
    let m = st(&mut s);
    assert_eq!(m.state, MirrorState::Degraded);
    assert_eq!(m.members.len(), 1);
    assert_eq!(m.dropped, vec![(String::from("vtbd1"), "write error")]);
    assert_eq!(m.generation, gen + 1);
    // The survivor records the new generation; the dropped member keeps
    // the old one and will be seen as stale.
    assert_eq!(meta_of(&disks[0].contents()).unwrap().generation, gen + 1);
    assert_eq!(meta_of(&disks[1].contents()).unwrap().generation, gen);
    assert_eq!(testing::read(&mut s, c, 8192, 8192).unwrap(), data);
    // Its consumer is closed, so the disk can be used again.
    let v1 = s.find_provider("vtbd1").unwrap();
    assert!(s.provider(v1).access.is_zero());
}

#[test]
fn a_write_is_acknowledged_only_once_the_new_generation_is_stable() {
    // Were the write acknowledged before the survivor recorded the new
    // generation, a power cut could bring back the dropped member as
    // current, without the write.
    let (mut s, disks) = testing::stack_with_disks(2, 128 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let gen = st(&mut s).generation;
    // vtbd0 takes the write; vtbd1 holds it, then fails it.
    disks[1].hold(true);
    s.submit(c, testing::write_bio(0, &[7; 4096]), 1);
    s.run();
    assert_eq!((disks[0].queued(), disks[1].queued()), (0, 1));
    disks[0].hold(true);
    disks[1].set_fail_writes(true);
    disks[1].hold(false);
    s.run();
    assert_eq!(st(&mut s).generation, gen + 1);
    assert!(
        s.take_completed().is_none(),
        "acknowledged before the generation was stable"
    );
    disks[0].hold(false);
    let (_, _, r) = testing::wait(&mut s);
    assert_eq!(r, Ok(()));
    let stable = meta_of(&disks[0].durable()).unwrap();
    assert_eq!(stable.generation, gen + 1);
}

#[test]
fn a_failed_read_is_retried_on_another_member() {
    let (mut s, disks) = testing::stack_with_disks(2, 128 << 10, 512);
    apply(&mut s, "mirror label -b prefer gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let data = testing::pattern(6, 0, 4096);
    testing::write(&mut s, c, 0, &data).unwrap();
    disks[0].fail_next(1);
    assert_eq!(testing::read(&mut s, c, 0, 4096).unwrap(), data);
    let m = st(&mut s);
    assert_eq!(m.dropped, vec![(String::from("vtbd0"), "read error")]);
    assert_eq!(m.members[0].provider, "vtbd1");
}

#[test]
fn orphaned_members_degrade_then_the_mirror_dies_without_panic() {
    let (mut s, disks) = testing::stack_with_disks(3, 128 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1 vtbd2").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let data = testing::pattern(7, 0, 4096);
    testing::write(&mut s, c, 0, &data).unwrap();
    let v0 = s.find_provider("vtbd0").unwrap();
    s.orphan(v0);
    s.run();
    let m = st(&mut s);
    assert_eq!(m.state, MirrorState::Degraded);
    assert_eq!(m.dropped, vec![(String::from("vtbd0"), "orphaned")]);
    assert_eq!(testing::read(&mut s, c, 0, 4096).unwrap(), data);
    // Both remaining members die at once, with requests in flight.
    disks[1].set_dead(true);
    disks[2].set_dead(true);
    s.submit(c, testing::write_bio(0, &data), 1);
    s.submit(c, Bio::read(4096, 4096), 2);
    for (_, _, r) in testing::wait_all(&mut s, 2) {
        assert_eq!(r, Err(BioError::Io));
    }
    // The mirror withered: its provider is orphaned and the class gone.
    assert!(status(&mut s, "gm0").is_none());
    let p = s.consumer_provider(c);
    assert!(s.provider(p).orphaned);
    assert_eq!(testing::read(&mut s, c, 0, 4096), Err(BioError::Orphaned));
    assert_eq!(testing::flush(&mut s, c), Err(BioError::Orphaned));
    s.close(c).unwrap();
    s.run();
    assert!(s.find_provider("mirror/gm0").is_none());
}

#[test]
fn insert_resyncs_while_io_goes_on() {
    let size = 1 << 20;
    let (mut s, disks) = testing::stack_with_disks(3, size, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let media = st(&mut s).media_size;
    let mut model = testing::pattern(1, 0, media as usize);
    testing::write(&mut s, c, 0, &model).unwrap();
    disks[1].set_dead(true);
    testing::write(&mut s, c, 0, &[0x11; 512]).unwrap();
    model[..512].fill(0x11);
    assert_eq!(st(&mut s).state, MirrorState::Degraded);
    // With a clock each run copies a bounded share, so writes land on
    // both sides of the sync point while it moves.
    let mut clock = 1;
    s.set_now_ns(clock);
    apply(&mut s, "mirror insert gm0 vtbd2").unwrap();
    let mut saw_partial = false;
    for k in 0..64u64 {
        clock += 1;
        s.set_now_ns(clock);
        let m = st(&mut s);
        if let Some((done, total)) = m.resync() {
            saw_partial |= done > 0 && done < total;
        }
        let at = (k * 37 % (media / SECTOR - 16)) * SECTOR;
        let bytes = testing::pattern(k as u8, at, 8192);
        testing::write(&mut s, c, at, &bytes).unwrap();
        model[at as usize..at as usize + 8192].copy_from_slice(&bytes);
    }
    assert!(saw_partial, "the resync never showed partial progress");
    finish_resync(&mut s, &mut clock);
    let m = st(&mut s);
    assert_eq!(m.state, MirrorState::Complete);
    assert_eq!(m.members.len(), 2);
    // The new member alone holds the mirror's data.
    assert!(disks[2].contents()[..media as usize] == model[..]);
    assert!(disks[0].contents()[..media as usize] == model[..]);
    assert_eq!(
        meta_of(&disks[2].contents()).unwrap().generation,
        m.generation
    );
    assert_eq!(meta_of(&disks[2].contents()).unwrap().member_index, 1);
    assert_zero_maps(&s, "mirror/gm0");
}

#[test]
fn remove_rebuild_and_forget() {
    let (mut s, disks) = testing::stack_with_disks(3, 128 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1 vtbd2").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    apply(&mut s, "mirror remove gm0 vtbd2").unwrap();
    assert!(
        meta_of(&disks[2].contents()).is_none(),
        "metadata not cleared"
    );
    let m = st(&mut s);
    assert_eq!((m.members.len(), m.state), (2, MirrorState::Complete));
    let v2 = s.find_provider("vtbd2").unwrap();
    assert!(s.provider(v2).access.is_zero());
    // Rebuild copies again; the data survives.
    let data = testing::pattern(8, 0, 65536);
    testing::write(&mut s, c, 0, &data).unwrap();
    disks[1].write_at(0, &[0u8; 65536]);
    apply(&mut s, "mirror rebuild gm0 vtbd1").unwrap();
    assert!(disks[1].contents()[..65536] == data[..]);
    assert!(apply(&mut s, "mirror remove gm0 vtbd2").is_err());
    // The last active member stays.
    apply(&mut s, "mirror remove gm0 vtbd1").unwrap();
    assert!(apply(&mut s, "mirror remove gm0 vtbd0").is_err());
    assert!(apply(&mut s, "mirror rebuild gm0 vtbd0").is_err());
    // A lost member leaves the mirror degraded until it is forgotten.
    apply(&mut s, "mirror insert gm0 vtbd1").unwrap();
    disks[1].set_dead(true);
    testing::write(&mut s, c, 0, &data).unwrap();
    assert_eq!(st(&mut s).state, MirrorState::Degraded);
    apply(&mut s, "mirror forget gm0").unwrap();
    let m = st(&mut s);
    assert_eq!((m.state, m.members.len()), (MirrorState::Complete, 1));
    assert_eq!(meta_of(&disks[0].contents()).unwrap().member_count, 1);
}

#[test]
fn insert_refuses_what_cannot_join() {
    let mut s = Stack::new();
    for (name, size, sector) in [
        ("vtbd0", 128u64 << 10, 512u32),
        ("vtbd1", 128 << 10, 512),
        ("small", 64 << 10, 512),
        ("big4k", 256 << 10, 4096),
    ] {
        let (d, _) = FakeDisk::new(size, sector, 1);
        DiskGeom::create(&mut s, name, Box::new(d)).unwrap();
    }
    apply(&mut s, "mirror label gm0 vtbd0").unwrap();
    assert!(matches!(
        insert(&mut s, "gm0", "small"),
        Err(MirrorError::TooSmall(_))
    ));
    assert!(matches!(
        insert(&mut s, "gm0", "big4k"),
        Err(MirrorError::SectorSize(_))
    ));
    assert!(matches!(
        insert(&mut s, "gm0", "vtbd0"),
        Err(MirrorError::AlreadyMember(_))
    ));
    assert!(matches!(
        insert(&mut s, "gm1", "vtbd1"),
        Err(MirrorError::NoMirror(_))
    ));
    assert!(apply(&mut s, "mirror label gm0 vtbd1").is_err());
    assert!(matches!(
        create(&mut s, "gm1", &["vtbd1", "vtbd1"], DEFAULT_BALANCE, true),
        Err(MirrorError::Duplicate(_))
    ));
    // A member is held exclusively.
    assert!(apply(&mut s, "mirror label gm1 vtbd0").is_err());
    assert!(s.open("vtbd0", crate::stack::Access::READ_WRITE).is_err());
    insert(&mut s, "gm0", "vtbd1").unwrap();
    s.run();
    assert_eq!(st(&mut s).state, MirrorState::Complete);
}

#[test]
fn destroy_stops_the_mirror() {
    let (mut s, _disks) = testing::stack_with_disks(2, 128 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    assert!(apply(&mut s, "mirror destroy gm0").is_err());
    apply(&mut s, "mirror destroy -f gm0").unwrap();
    assert_eq!(testing::read(&mut s, c, 0, 512), Err(BioError::Orphaned));
    s.close(c).unwrap();
    s.run();
    for v in ["vtbd0", "vtbd1"] {
        let p = s.find_provider(v).unwrap();
        assert!(s.provider(p).access.is_zero());
    }
    // Clearing its members' metadata keeps it from coming back.
    apply(&mut s, "mirror clear vtbd0 vtbd1").unwrap();
}

/// Disk images after a flush, as a power cut would leave them.
fn durable(disks: &[FakeDiskHandle]) -> Vec<Vec<u8>> {
    disks.iter().map(|d| d.durable()).collect()
}

/// A new stack over `images` with the standard classes, settled.
fn restart(images: &[Vec<u8>]) -> (Stack, Vec<FakeDiskHandle>) {
    let (mut s, disks) = testing::stack_from_images(images, 512);
    assert!(s.settle(1 << 20));
    (s, disks)
}

#[test]
fn restart_trusts_the_newest_generation_and_resyncs_a_stale_member() {
    let (mut s, disks) = testing::stack_with_disks(2, 256 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let a = testing::pattern(1, 0, 65536);
    testing::write(&mut s, c, 0, &a).unwrap();
    // vtbd1 misses a write and is dropped.
    disks[1].set_fail_writes(true);
    let b = testing::pattern(2, 4096, 8192);
    testing::write(&mut s, c, 4096, &b).unwrap();
    testing::flush(&mut s, c).unwrap();
    let gen = st(&mut s).generation;
    let mut img = durable(&disks);
    assert!(img[1][4096..4096 + 8192] != b[..]);
    let mut expect = a.clone();
    expect[4096..4096 + 8192].copy_from_slice(&b);
    // Whatever order the disks come in, the stale one is not trusted.
    for round in 0..2 {
        let (mut s2, d2) = restart(&img);
        let m = st(&mut s2);
        assert_eq!(m.state, MirrorState::Complete, "round {round}");
        assert!(m.generation > gen);
        let c2 = s2.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
        for _ in 0..4 {
            assert_eq!(testing::read(&mut s2, c2, 0, 65536).unwrap(), expect);
        }
        for d in &d2 {
            assert!(d.contents()[..65536] == expect[..], "round {round}");
        }
        assert_zero_maps(&s2, "mirror/gm0");
        img.reverse();
    }
}

#[test]
fn restart_with_a_member_missing_runs_degraded_and_takes_it_back() {
    let (mut s, disks) = testing::stack_with_disks(2, 256 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    testing::write(&mut s, c, 0, &testing::pattern(1, 0, 8192)).unwrap();
    testing::flush(&mut s, c).unwrap();
    let img = durable(&disks);
    // Only vtbd0 is there at boot: the mirror starts degraded and records
    // a new generation, so vtbd1 is stale when it turns up.
    let (mut s2, _d2) = restart(&img[..1]);
    assert_eq!(st(&mut s2).state, MirrorState::Degraded);
    let c2 = s2.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let newer = testing::pattern(2, 0, 8192);
    testing::write(&mut s2, c2, 0, &newer).unwrap();
    let (d, h) = FakeDisk::new(256 << 10, 512, 9);
    h.write_at(0, &img[1]);
    DiskGeom::create(&mut s2, "vtbd1", Box::new(d)).unwrap();
    assert!(s2.settle(1 << 20));
    s2.run();
    let m = st(&mut s2);
    assert_eq!((m.state, m.members.len()), (MirrorState::Complete, 2));
    assert!(h.contents()[..8192] == newer[..]);
}

#[test]
fn restart_resumes_an_interrupted_resync_at_its_recorded_offset() {
    let size = 3 * SYNC_PERSIST_BYTES;
    let (mut s, disks) = testing::stack_with_disks(3, size, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let data = testing::pattern(4, 0, 65536);
    testing::write(&mut s, c, SYNC_PERSIST_BYTES + 4096, &data).unwrap();
    let mut clock = 1;
    s.set_now_ns(clock);
    apply(&mut s, "mirror insert gm0 vtbd2").unwrap();
    // Copy until the first checkpoint is on vtbd2.
    for _ in 0..100_000 {
        clock += 1;
        s.set_now_ns(clock);
        s.run();
        let r = meta_of(&disks[2].contents()).unwrap();
        if r.params[1] >= SYNC_PERSIST_BYTES {
            break;
        }
    }
    testing::flush(&mut s, c).unwrap();
    let img = durable(&disks);
    let r = meta_of(&img[2]).unwrap();
    assert_eq!(r.flags & FLAG_SYNCHRONIZING, FLAG_SYNCHRONIZING);
    let resume_at = r.params[1];
    assert!(resume_at >= SYNC_PERSIST_BYTES && resume_at < size);
    // After the restart the copy goes on from there, not from zero.
    let (mut s2, d2) = testing::stack_from_images(&img, 512);
    let source_reads: u64;
    {
        assert!(s2.settle(1 << 20));
        source_reads = d2[0].stats().reads + d2[1].stats().reads;
    }
    let media = st(&mut s2).media_size;
    assert_eq!(st(&mut s2).state, MirrorState::Complete);
    let full = media.div_ceil(SYNC_CHUNK_BYTES);
    assert!(
        source_reads < full,
        "copied {source_reads} chunks of {full}: restarted from zero"
    );
    assert!(d2[2].contents()[..media as usize] == d2[0].contents()[..media as usize]);
}

#[test]
fn assembly_plan_follows_generations() {
    use crate::taste::Member as Tasted;
    let rec = |index: u32, generation: u64, flags: u32, sync: u64| Tasted {
        provider: crate::bio::ProviderId(index),
        meta: MetaRepr {
            class: "mirror".into(),
            name: "gm0".into(),
            id: 7,
            generation,
            member_index: index,
            member_count: 3,
            member_size: 1 << 20,
            sector_size: 512,
            flags,
            params: [2, sync, (1 << 20) - 512, 512, 0, 0, 0, 0],
            tail: [0; crate::meta::TAIL_LEN],
        },
    };
    let p = label::plan(&[rec(0, 5, 0, 0), rec(1, 4, 0, 0), rec(2, 5, 1, 8192 + 100)], None).unwrap();
    assert_eq!(p.sync_from, vec![None, Some(0), Some(8192)]);
    assert_eq!((p.generation, p.wanted, p.bump), (5, 3, true));
    let p = label::plan(&[rec(0, 5, 0, 0), rec(2, 5, 0, 0)], None).unwrap();
    assert_eq!(p.sync_from, vec![None, None]);
    assert!(p.bump, "a missing member changes the member set");
    assert!(label::plan(&[rec(0, 3, 0, 0), rec(1, 5, 1, 0)], None).is_err());
    assert!(label::complete_set(&[
        rec(0, 5, 0, 0),
        rec(1, 5, 0, 0),
        rec(2, 5, 0, 0)
    ]));
    assert!(!label::complete_set(&[
        rec(0, 5, 0, 0),
        rec(1, 4, 0, 0),
        rec(2, 5, 0, 0)
    ]));
    assert!(!label::complete_set(&[rec(0, 5, 0, 0), rec(1, 5, 0, 0)]));
}

/// Runs `ops` in batches of up to four requests against the mirror and
/// `model`, ticking the clock between batches (so a resync advances by a
/// bounded share), and checks every read, and that a flush made every
/// active member's contents stable. Writes of a batch may overlap: the
/// mirror applies overlapping writes in arrival order (the model's);
/// reads overlap no write of their batch. A racing flush goes with the
/// other requests of its batch.
fn run_ops(
    s: &mut Stack,
    c: ConsumerId,
    model: &mut [u8],
    ops: &[Op],
    clock: &mut u64,
    disks: &[FakeDiskHandle],
) {
    let sectors = model.len() as u64 / SECTOR;
    let ops: Vec<Op> = ops.iter().map(|op| op.clip(sectors)).collect();
    let mut i = 0;
    while i < ops.len() {
        let mut batch: Vec<&Op> = Vec::new();
        while i < ops.len() && batch.len() < 4 {
            let op = &ops[i];
            let clash = match op.range(SECTOR) {
                None => matches!(op, Op::Flush) || batch.iter().any(|b| matches!(b, Op::Flush)),
                Some((s0, e0)) => batch.iter().any(|b| match b.range(SECTOR) {
                    Some((bs, be)) => b.is_write() != op.is_write() && s0 < be && bs < e0,
                    None => matches!(b, Op::Flush),
                }),
            };
            if clash && !batch.is_empty() {
                break;
            }
            batch.push(op);
            i += 1;
        }
        *clock += 1;
        s.set_now_ns(*clock);
        for (tag, op) in batch.iter().enumerate() {
            s.submit(c, op.bio(SECTOR), tag as u64);
        }
        for (tag, bio, r) in testing::wait_all(s, batch.len()) {
            let op = batch[tag as usize];
            assert_eq!(r, Ok(()), "{op:?} failed");
            match *op {
                Op::Read { at, len } => {
                    let (a, e) = ((at * SECTOR) as usize, ((at + len) * SECTOR) as usize);
                    assert!(
                        testing::bio_bytes(&bio) == model[a..e],
                        "read {at}+{len} differs"
                    );
                }
                Op::Flush => {
                    for m in st(s).members {
                        let d = &disks[m.provider[4..].parse::<usize>().unwrap()];
                        if m.state == MemberState::Active {
                            assert!(d.durable() == d.contents(), "flush missed {}", m.provider);
                        }
                    }
                }
                // Writes are applied in tag (arrival) order.
                _ => op.apply(model, SECTOR),
            }
        }
    }
}

/// How a member is lost in the property test.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// Its next few requests fail.
    Errors(u32),
    /// Every write fails.
    Writes,
    /// Everything fails.
    Dead,
    /// Its provider is orphaned.
    Orphan,
}

fn loss() -> impl Strategy<Value = Loss> {
    prop_oneof![
        (1u32..4).prop_map(Loss::Errors),
        Just(Loss::Writes),
        Just(Loss::Dead),
        Just(Loss::Orphan),
    ]
}

fn balance() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("load"),
        Just("round-robin"),
        Just("prefer"),
        Just("split")
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random reads, writes (overlapping ones in flight together),
    /// discards, write-zeroes, flushes and flushes racing writes in
    /// flight, checked against a flat byte array: first on a whole
    /// mirror, then after a member was lost in the middle of the run,
    /// then while a new member is copied onto.
    /// At the end the new member alone holds the model's bytes, and the
    /// mirror never mapped or copied data.
    #[test]
    fn model_through_a_failure_and_a_resync(
        balance in balance(),
        victim in 0usize..2,
        how in loss(),
        before in testing::ops_all(2048, 64, 24),
        during in testing::ops_all(2048, 64, 24),
        resync in testing::ops_all(2048, 64, 48),
        depth in 1usize..8,
    ) {
        let (mut s, disks) = testing::stack_with_disks(3, 1 << 20, 512);
        for d in &disks {
            d.set_depth(depth);
        }
        apply(&mut s, &alloc::format!("mirror label -b {balance} gm0 vtbd0 vtbd1")).unwrap();
        let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
        let media = st(&mut s).media_size as usize;
        let mut model = vec![0u8; media];
        let mut clock = 0;
        run_ops(&mut s, c, &mut model, &before, &mut clock, &disks);
        match how {
            Loss::Errors(n) => disks[victim].fail_next(n),
            Loss::Writes => disks[victim].set_fail_writes(true),
            Loss::Dead => disks[victim].set_dead(true),
            Loss::Orphan => {
                let p = s.find_provider(&alloc::format!("vtbd{victim}")).unwrap();
                s.orphan(p);
            }
        }
        run_ops(&mut s, c, &mut model, &during, &mut clock, &disks);
        // Make sure the loss showed (a few failing requests may all have
        // missed the victim): a write covering everything.
        disks[victim].set_dead(true);
        testing::write(&mut s, c, 0, &model).unwrap();
        let m = st(&mut s);
        prop_assert_eq!(m.state, MirrorState::Degraded);
        prop_assert_eq!(m.members.len(), 1);
        apply(&mut s, "mirror insert gm0 vtbd2").unwrap();
        run_ops(&mut s, c, &mut model, &resync, &mut clock, &disks);
        finish_resync(&mut s, &mut clock);
        let m = st(&mut s);
        prop_assert_eq!(m.state, MirrorState::Complete);
        prop_assert!(disks[2].contents()[..media] == model[..], "the new member differs from the model");
        // Take the old survivor away: the new member serves alone.
        let survivor = 1 - victim;
        disks[survivor].set_dead(true);
        let got = testing::read(&mut s, c, 0, media).unwrap();
        prop_assert!(got == model, "reads from the new member differ");
        assert_zero_maps(&s, "mirror/gm0");
    }
}

#[test]
fn after_a_remove_the_members_left_reassemble_complete() {
    let (mut s, disks) = testing::stack_with_disks(3, 128 << 10, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1 vtbd2").unwrap();
    apply(&mut s, "mirror remove gm0 vtbd0").unwrap();
    assert!(
        meta_of(&disks[0].contents()).is_none(),
        "metadata not cleared"
    );
    // The members left take places 0 and 1 of 2.
    let left: Vec<(u32, u32)> = disks[1..]
        .iter()
        .map(|d| {
            let r = meta_of(&d.contents()).unwrap();
            (r.member_index, r.member_count)
        })
        .collect();
    assert_eq!(left, vec![(0, 2), (1, 2)]);
    let (mut s2, _) = restart(&durable(&disks));
    let m = st(&mut s2);
    assert_eq!((m.state, m.members.len()), (MirrorState::Complete, 2));
    assert!(s2
        .find_provider("vtbd0")
        .is_some_and(|p| s2.provider(p).access.is_zero()));
}

/// Images of `disks` after a boot that wrote nothing but metadata: runs
/// the stack until it is idle first.
fn settled_images(s: &mut Stack, disks: &[FakeDiskHandle]) -> Vec<Vec<u8>> {
    while s.run() {}
    durable(disks)
}

#[test]
fn a_member_that_booted_alone_without_writing_does_not_pass_for_current() {
    // Boot 1: both disks; A written and flushed.
    let size = 256 << 10;
    let (mut s, disks) = testing::stack_with_disks(2, size, 512);
    apply(&mut s, "mirror label -b round-robin gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let a = testing::pattern(1, 0, 65536);
    testing::write(&mut s, c, 0, &a).unwrap();
    testing::flush(&mut s, c).unwrap();
    let img = settled_images(&mut s, &disks);
    // Boot 2: disk 2 missing; B written over A and flushed.
    let (mut s, d) = restart(&img[..1]);
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let b = testing::pattern(2, 0, 65536);
    testing::write(&mut s, c, 0, &b).unwrap();
    testing::flush(&mut s, c).unwrap();
    let disk1 = settled_images(&mut s, &d).remove(0);
    // Boot 3: disk 1 missing; nothing written.
    let (mut s, d) = restart(&img[1..]);
    assert_eq!(st(&mut s).state, MirrorState::Degraded);
    let disk2 = settled_images(&mut s, &d).remove(0);
    // Boot 4: both. Disk 2's history is an ancestor of disk 1's: it is
    // resynchronized from disk 1, and every read sees B.
    for order in [[&disk1, &disk2], [&disk2, &disk1]] {
        let images = vec![order[0].clone(), order[1].clone()];
        let (mut s, d) = restart(&images);
        let m = st(&mut s);
        assert_eq!(m.state, MirrorState::Complete);
        let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
        for _ in 0..8 {
            assert!(testing::read(&mut s, c, 0, 65536).unwrap() == b, "a read saw A");
        }
        let media = m.media_size as usize;
        for h in &d {
            assert!(h.contents()[..media] == disk1[..media], "members differ");
        }
    }
}

/// Boots `image` alone, writes `data` at 0 (unless `None`) and flushes;
/// returns the disk's image afterwards.
fn boot_alone(image: &[u8], data: Option<&[u8]>) -> Vec<u8> {
    let (mut s, d) = restart(&[image.to_vec()]);
    assert_eq!(st(&mut s).state, MirrorState::Degraded);
    if let Some(data) = data {
        let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
        testing::write(&mut s, c, 0, data).unwrap();
        testing::flush(&mut s, c).unwrap();
    }
    settled_images(&mut s, &d).remove(0)
}

/// Two disks labelled as gm0 (round-robin reads), A written over the
/// first 64 KiB and flushed: their images.
fn labelled_pair(size: u64) -> (Vec<Vec<u8>>, Vec<u8>) {
    let (mut s, disks) = testing::stack_with_disks(2, size, 512);
    apply(&mut s, "mirror label -b round-robin gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let a = testing::pattern(1, 0, 65536);
    testing::write(&mut s, c, 0, &a).unwrap();
    testing::flush(&mut s, c).unwrap();
    (settled_images(&mut s, &disks), a)
}

/// The class's `/status` section, as text.
fn class_status(s: &Stack) -> String {
    use crate::class::Class;
    use alloc::string::ToString;
    CLASS.status(s).map(|(_, v)| v.to_string()).unwrap_or_default()
}

#[test]
fn members_with_conflicting_histories_are_refused_and_left_untouched() {
    let size = 256 << 10;
    let (img, _a) = labelled_pair(size);
    let b = testing::pattern(2, 0, 65536);
    let c_data = testing::pattern(3, 0, 65536);
    // Each disk boots alone and takes writes the other never sees.
    let disk1 = boot_alone(&img[0], Some(&b));
    let disk2 = boot_alone(&img[1], Some(&c_data));
    let images = vec![disk1.clone(), disk2.clone()];
    let (mut s, d) = restart(&images);
    // Nothing assembled, nothing mixed: no provider, and the reason is in
    // the class's status, in /geom and in the taste log.
    assert!(s.find_provider("mirror/gm0").is_none());
    let text = class_status(&s);
    assert!(text.contains("\"state\":\"refused\""), "{text}");
    assert!(text.contains("conflicting histories"), "{text}");
    assert!(ctl::topology_json(&s).contains("conflicting histories"));
    assert!(
        s.taste_log()
            .any(|l| l.starts_with("cannot assemble mirror/gm0: conflicting histories")),
        "{:?}",
        s.taste_log().collect::<Vec<_>>()
    );
    // The members are exactly as they were, and nobody holds them.
    for (h, image) in d.iter().zip(&images) {
        assert!(h.contents() == *image, "a member was touched");
        assert_eq!(h.stats().writes, 0);
    }
    for p in ["vtbd0", "vtbd1"] {
        let p = s.find_provider(p).unwrap();
        assert!(s.provider(p).access.is_zero());
    }
    // A member that turns up later does not assemble on its own either.
    let (dk, h) = FakeDisk::new(size, 512, 77);
    h.write_at(0, &img[1]);
    DiskGeom::create(&mut s, "vtbd2", Box::new(dk)).unwrap();
    assert!(s.settle(1 << 20));
    assert!(s.find_provider("mirror/gm0").is_none());
    assert!(h.stats().writes == 0);
    // The operator keeps disk 1's side: disk 2 is copied over from it.
    apply(&mut s, "mirror rebuild gm0 vtbd1").unwrap();
    s.run();
    let m = st(&mut s);
    assert_eq!(m.state, MirrorState::Complete);
    let media = m.media_size as usize;
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    for _ in 0..4 {
        assert!(testing::read(&mut s, c, 0, 65536).unwrap() == b);
    }
    assert!(d[1].contents()[..media] == disk1[..media]);
}

#[test]
fn a_history_several_epochs_ahead_still_knows_its_ancestor() {
    let size = 256 << 10;
    let (img, _a) = labelled_pair(size);
    // Disk 1 boots alone three times, writing each time: three epochs.
    let mut disk1 = img[0].clone();
    let mut last = Vec::new();
    for k in 0..3u8 {
        last = testing::pattern(10 + k, 0, 65536);
        disk1 = boot_alone(&disk1, Some(&last));
    }
    // Disk 2 boots alone five times and writes nothing: its generation
    // passes disk 1's, its history stays where it was.
    let mut disk2 = img[1].clone();
    for _ in 0..5 {
        disk2 = boot_alone(&disk2, None);
    }
    let g1 = meta_of(&disk1).unwrap().generation;
    let g2 = meta_of(&disk2).unwrap().generation;
    assert!(g2 > g1, "generations {g1} and {g2}");
    let head2 = Tail::parse(&meta_of(&disk2).unwrap().tail).unwrap().unwrap();
    let head0 = Tail::parse(&meta_of(&img[1]).unwrap().tail).unwrap().unwrap();
    assert_eq!(head2.history, head0.history, "a boot without writes began an epoch");
    let (mut s, d) = restart(&[disk1.clone(), disk2.clone()]);
    let m = st(&mut s);
    assert_eq!(m.state, MirrorState::Complete);
    assert_eq!(m.history.past().count(), 3);
    assert!(m.history.knows(head0.history.head.id));
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    for _ in 0..4 {
        assert!(testing::read(&mut s, c, 0, 65536).unwrap() == last);
    }
    let media = m.media_size as usize;
    assert!(d[1].contents()[..media] == disk1[..media]);
    // Had disk 2 written on its own, three epochs back are still enough
    // to see the conflict.
    let disk2c = boot_alone(&disk2, Some(&testing::pattern(99, 0, 65536)));
    let (s, _) = restart(&[disk1, disk2c]);
    assert!(s.find_provider("mirror/gm0").is_none());
    assert!(class_status(&s).contains("conflicting histories"));
}

#[test]
fn a_returning_member_is_taken_only_when_its_history_is_behind() {
    let size = 256 << 10;
    let (img, a) = labelled_pair(size);
    let b = testing::pattern(2, 0, 65536);
    let disk1 = boot_alone(&img[0], Some(&b));
    let disk2c = boot_alone(&img[1], Some(&testing::pattern(3, 0, 65536)));
    let hot_add = |s: &mut Stack, name: &str, image: &[u8]| {
        let (dk, h) = FakeDisk::new(size, 512, 55);
        h.write_at(0, image);
        DiskGeom::create(s, name, Box::new(dk)).unwrap();
        assert!(s.settle(1 << 20));
        s.run();
        h
    };
    // Running from disk 1: disk 2 with writes of its own is refused and
    // left alone.
    let (mut s, _d) = restart(core::slice::from_ref(&disk1));
    let h = hot_add(&mut s, "vtbd1", &disk2c);
    let m = st(&mut s);
    assert_eq!((m.state, m.members.len()), (MirrorState::Degraded, 1));
    assert_eq!(m.refused.len(), 1, "{:?}", m.refused);
    assert!(m.refused[0].1.contains("in conflict with"), "{:?}", m.refused);
    assert!(class_status(&s).contains("\"refused\":[{"));
    assert!(h.contents() == disk2c && h.stats().writes == 0);
    // A disk of another mirror that happens to be called gm0 too.
    let other = {
        let (mut s, disks) = testing::stack_with_disks(1, size, 512);
        s.seed_random(99);
        apply(&mut s, "mirror label gm0 vtbd0").unwrap();
        settled_images(&mut s, &disks).remove(0)
    };
    let h = hot_add(&mut s, "vtbd3", &other);
    let m = st(&mut s);
    assert_eq!(m.members.len(), 1);
    let why = m.refused.iter().find(|(p, _)| p == "vtbd3");
    assert!(
        why.is_some_and(|(_, w)| w.contains("another mirror")),
        "{:?}",
        m.refused
    );
    assert!(h.stats().writes == 0);
    // Disk 2 as it was before (an ancestor) joins and is copied over.
    let h = hot_add(&mut s, "vtbd2", &img[1]);
    let m = st(&mut s);
    assert_eq!((m.state, m.members.len()), (MirrorState::Complete, 2));
    assert!(h.contents()[..65536] == b[..]);
    // Running from stale disk 2 (booted alone, nothing written): disk 1,
    // whose history is newer, is refused rather than overwritten.
    let (mut s, _d) = restart(&[boot_alone(&img[1], None)]);
    let h = hot_add(&mut s, "vtbd1", &disk1);
    let m = st(&mut s);
    assert_eq!(m.members.len(), 1);
    assert!(m.refused[0].1.contains("newer than"), "{:?}", m.refused);
    assert!(h.contents() == disk1 && h.stats().writes == 0);
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    assert!(testing::read(&mut s, c, 0, 65536).unwrap() == a);
}

#[test]
fn the_write_after_a_degraded_boot_begins_an_epoch_before_it_is_acknowledged() {
    let (img, _a) = labelled_pair(256 << 10);
    let (mut s, d) = restart(&img[..1]);
    let before = st(&mut s);
    assert!(before.epoch_due);
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    // Region 0 is dirty already: only the epoch holds the write back.
    d[0].hold(true);
    s.submit(c, testing::write_bio(0, &[5; 4096]), 1);
    s.run();
    assert!(s.take_completed().is_none());
    assert_eq!(d[0].queued(), 1, "the write went before its epoch was stable");
    d[0].hold(false);
    assert_eq!(testing::wait(&mut s).2, Ok(()));
    let after = st(&mut s);
    assert!(!after.epoch_due);
    assert_eq!(after.history.lineage[0], before.history.head);
    let rec = Tail::parse(&meta_of(&d[0].durable()).unwrap().tail).unwrap().unwrap();
    assert_eq!(rec.history, after.history);
}

/// Region `r` of 64 KiB.
fn region(r: u64) -> u64 {
    r << 16
}

/// A 4 MiB pair labelled as gm0 (64 KiB regions), written all over with
/// P0 and flushed until its bitmap is clean; the stack, its disks and P0.
fn clean_pair() -> (Stack, Vec<FakeDiskHandle>, ConsumerId, Vec<u8>) {
    let (mut s, disks) = testing::stack_with_disks(2, 4 << 20, 512);
    apply(&mut s, "mirror label -b round-robin gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let media = st(&mut s).media_size as usize;
    let p0 = testing::pattern(40, 0, media);
    testing::write(&mut s, c, 0, &p0).unwrap();
    assert_eq!(st(&mut s).dirty_regions, 64);
    testing::flush(&mut s, c).unwrap();
    // With nothing else in flight, the flush cleans the bitmap, and the
    // clean record is stable by the time the flush is answered.
    assert_eq!(st(&mut s).dirty_regions, 0);
    for d in &disks {
        let t = Tail::parse(&meta_of(&d.durable()).unwrap().tail).unwrap().unwrap();
        assert!(t.bitmap.iter().all(|&b| b == 0));
    }
    (s, disks, c, p0)
}

#[test]
fn after_a_power_cut_only_dirty_regions_are_copied_and_members_agree() {
    let (mut s, disks, c, mut model) = clean_pair();
    assert_eq!(st(&mut s).region_bytes, 65536);
    // Acknowledged and flushed: must survive.
    let wa = testing::pattern(41, region(3), 65536);
    testing::write(&mut s, c, region(3), &wa).unwrap();
    model[region(3) as usize..region(4) as usize].copy_from_slice(&wa);
    testing::flush(&mut s, c).unwrap();
    // A burst: regions 20, 21 and 30 written (their bits set everywhere),
    // then written again while vtbd1 holds everything: only vtbd0 has the
    // second burst, made stable by the record write of region 40.
    let spans = [(region(20), 2 * 65536), (region(30), 4096)];
    for (at, len) in spans {
        testing::write(&mut s, c, at, &testing::pattern(42, at, len as usize)).unwrap();
    }
    disks[1].hold(true);
    for (k, (at, len)) in spans.iter().enumerate() {
        s.submit(c, testing::write_bio(*at, &testing::pattern(43, *at, *len as usize)), k as u64);
    }
    s.submit(c, testing::write_bio(region(40), &[9; 512]), 9);
    for _ in 0..16 {
        s.run();
    }
    assert!(s.take_completed().is_none(), "acknowledged with vtbd1 holding it");
    let images = durable(&disks);
    assert!(images[0] != images[1]);
    // Power back.
    let (mut s2, d2) = restart(&images);
    let m = st(&mut s2);
    assert_eq!(m.state, MirrorState::Complete);
    assert_eq!(m.recovered_regions, 4, "regions 20, 21, 30 and 40 only");
    // Both members got the same record writes; beyond those, vtbd1 got
    // one copy per dirty region from the source (vtbd0, the lowest
    // place): nothing else was copied.
    assert_eq!(d2[1].stats().writes - d2[0].stats().writes, 4);
    let media = m.media_size as usize;
    assert!(d2[0].contents()[..media] == d2[1].contents()[..media], "members differ");
    let c2 = s2.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    for r in (0..64).filter(|r| ![20, 21, 30, 40].contains(r)) {
        let (a, e) = (region(r) as usize, region(r + 1) as usize);
        let e = e.min(media);
        for _ in 0..2 {
            let got = testing::read(&mut s2, c2, a as u64, e - a).unwrap();
            assert!(got == model[a..e], "region {r} lost acknowledged data");
        }
    }
    assert_zero_maps(&s2, "mirror/gm0");
}

#[test]
fn reads_of_a_region_still_being_recovered_go_to_the_source() {
    let (mut s, disks, c, _p0) = clean_pair();
    // Twelve regions dirty everywhere, then rewritten on vtbd0 only.
    let (at, len) = (region(8), 12 * 65536);
    testing::write(&mut s, c, at, &testing::pattern(50, at, len)).unwrap();
    disks[1].hold(true);
    let newer = testing::pattern(51, at, len);
    s.submit(c, testing::write_bio(at, &newer), 1);
    s.submit(c, testing::write_bio(region(50), &[1; 512]), 2);
    for _ in 0..16 {
        s.run();
    }
    let images = durable(&disks);
    // With the clock standing still, recovery copies one share (512 KiB)
    // and waits: some dirty regions are still to copy.
    let (mut s2, d2) = testing::stack_from_images(&images, 512);
    s2.set_now_ns(1);
    assert!(s2.settle(1 << 20));
    let m = st(&mut s2);
    let rec = m.recovery.clone().expect("recovery in progress");
    assert_eq!(rec.source, "vtbd0");
    assert!(rec.copied < rec.regions, "{rec:?}");
    let c2 = s2.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    for _ in 0..4 {
        for k in 0..12 {
            let a = at + k * 65536;
            let got = testing::read(&mut s2, c2, a, 65536).unwrap();
            let o = (k * 65536) as usize;
            assert!(got == newer[o..o + 65536], "region {} read from a stale member", 8 + k);
        }
    }
    let mut clock = 1;
    finish_recovery(&mut s2, &mut clock);
    let media = st(&mut s2).media_size as usize;
    assert!(d2[0].contents()[..media] == d2[1].contents()[..media]);
}

/// Runs the stack with the clock ticking until the recovery is over.
fn finish_recovery(s: &mut Stack, clock: &mut u64) {
    for _ in 0..100_000 {
        *clock += 1;
        s.set_now_ns(*clock);
        s.run();
        if st(s).recovery.is_none() {
            return;
        }
    }
    panic!("recovery does not end");
}

#[test]
fn overlapping_writes_in_flight_end_the_same_on_every_member() {
    let (mut s, disks) = testing::stack_with_disks(2, 1 << 20, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    let media = st(&mut s).media_size as usize;
    let mut model = vec![0u8; media];
    for round in 0..24u64 {
        // Eight writes over one 8 KiB window, each shifted by a sector,
        // plus a discard and a write-zeroes over part of it, all at once;
        // the disks complete them in any order.
        let base = (round % 8) * 65536;
        let mut ops = Vec::new();
        for k in 0..8u64 {
            ops.push(Op::Write {
                at: base / SECTOR + k,
                len: 8,
                seed: (round * 8 + k) as u8,
            });
        }
        ops.insert(3, Op::Discard { at: base / SECTOR + 2, len: 3 });
        ops.insert(6, Op::WriteZeroes { at: base / SECTOR + 9, len: 2 });
        for (tag, op) in ops.iter().enumerate() {
            s.submit(c, op.bio(SECTOR), tag as u64);
        }
        for (_, _, r) in testing::wait_all(&mut s, ops.len()) {
            assert_eq!(r, Ok(()));
        }
        for op in &ops {
            op.apply(&mut model, SECTOR);
        }
        let (a, b) = (disks[0].contents(), disks[1].contents());
        assert!(a[..media] == b[..media], "members differ after round {round}");
        assert!(a[..media] == model[..], "not applied in arrival order (round {round})");
    }
}

#[test]
fn writes_that_do_not_overlap_go_on_in_parallel() {
    let (mut s, disks) = testing::stack_with_disks(2, 1 << 20, 512);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    // Dirty the regions first, so no record write stands in between.
    testing::write(&mut s, c, 0, &[0; 8192]).unwrap();
    for d in &disks {
        d.hold(true);
    }
    s.submit(c, testing::write_bio(0, &[1; 4096]), 1);
    s.submit(c, testing::write_bio(4096, &[2; 4096]), 2);
    s.submit(c, testing::write_bio(2048, &[3; 4096]), 3);
    s.run();
    // Two writes at each disk; the overlapping one waits at the mirror.
    assert_eq!((disks[0].queued(), disks[1].queued()), (2, 2));
    for d in &disks {
        d.hold(false);
    }
    let done = testing::wait_all(&mut s, 3);
    assert!(done.iter().all(|(_, _, r)| r.is_ok()));
    let mut want = vec![1u8; 4096];
    want.extend_from_slice(&[2; 4096]);
    want[2048..6144].fill(3);
    for d in &disks {
        assert!(d.contents()[..8192] == want[..]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random requests, a flush, more random requests, then a burst of
    /// writes while one member holds everything, and a power cut: after
    /// the restart the members agree byte for byte, and every byte not
    /// written since the flush reads back as it was.
    #[test]
    fn a_power_cut_during_a_burst_leaves_members_that_agree(
        before in testing::ops_all(2048, 64, 24),
        during in testing::ops_all(2048, 64, 24),
        burst in testing::ops_all(2048, 64, 12),
        holder in 0usize..2,
        depth in 1usize..8,
    ) {
        let (mut s, disks) = testing::stack_with_disks(2, 1 << 20, 512);
        for d in &disks {
            d.set_depth(depth);
        }
        apply(&mut s, "mirror label -b round-robin gm0 vtbd0 vtbd1").unwrap();
        let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
        let media = st(&mut s).media_size as usize;
        let sectors = media as u64 / SECTOR;
        let mut model = vec![0u8; media];
        let mut clock = 0;
        run_ops(&mut s, c, &mut model, &before, &mut clock, &disks);
        testing::flush(&mut s, c).unwrap();
        let stable = model.clone();
        let mut touched = vec![false; media];
        let mut touch = |op: &Op| {
            if let (true, Some((a, e))) = (op.is_write(), op.clip(sectors).range(SECTOR)) {
                touched[a as usize..e as usize].fill(true);
            }
        };
        during.iter().for_each(&mut touch);
        burst.iter().for_each(&mut touch);
        run_ops(&mut s, c, &mut model, &during, &mut clock, &disks);
        disks[holder].hold(true);
        for (tag, op) in burst.iter().enumerate() {
            if op.is_write() {
                s.submit(c, op.clip(sectors).bio(SECTOR), tag as u64);
            }
        }
        for _ in 0..8 {
            s.run();
        }
        let (mut s2, d2) = restart(&durable(&disks));
        prop_assert_eq!(st(&mut s2).state, MirrorState::Complete);
        let (a, b) = (d2[0].contents(), d2[1].contents());
        prop_assert!(a[..media] == b[..media], "members differ after the restart");
        let c2 = s2.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
        let got = testing::read(&mut s2, c2, 0, media).unwrap();
        let lost = (0..media).find(|&i| !touched[i] && got[i] != stable[i]);
        prop_assert!(lost.is_none(), "byte {:?} lost its flushed value", lost);
    }
}

#[test]
fn a_member_whose_history_record_is_damaged_is_copied_over_never_trusted() {
    let size = 256 << 10;
    let (img, a) = labelled_pair(size);
    let mut bad = img[1].clone();
    // One bit of the tail (the record's own checksum does not cover it).
    let at = bad.len() - 512 + crate::meta::META_LEN + 40;
    bad[at] ^= 0x04;
    let r = meta_of(&bad).unwrap();
    assert_eq!(Tail::parse(&r.tail), Err(TailError::Checksum));
    // Beside a sound member it is resynchronized from it.
    let d1 = testing::pattern(7, 0, 65536);
    let mut skewed = bad.clone();
    skewed[..65536].copy_from_slice(&d1);
    let (mut s, d) = restart(&[img[0].clone(), skewed]);
    let m = st(&mut s);
    assert_eq!(m.state, MirrorState::Complete);
    let media = m.media_size as usize;
    assert!(d[1].contents()[..media] == img[0][..media]);
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    for _ in 0..4 {
        assert!(testing::read(&mut s, c, 0, 65536).unwrap() == a);
    }
    // Alone, it serves nothing.
    let (s, _) = restart(&[bad]);
    assert!(s.find_provider("mirror/gm0").is_none());
    assert!(s
        .taste_log()
        .any(|l| l.contains("no member holds the current data")));
}

#[test]
fn a_member_that_hangs_is_dropped_at_its_deadline_and_the_mirror_serves_on() {
    let size = 1 << 20;
    let (mut s, disks) = testing::stack_with_disks(2, size, 512);
    s.set_bio_deadline_ms(3000);
    let mut now_ms = 1;
    s.set_now_ns(now_ms * 1_000_000);
    apply(&mut s, "mirror label gm0 vtbd0 vtbd1").unwrap();
    let c = s.open("mirror/gm0", crate::stack::Access::READ_WRITE).unwrap();
    testing::write(&mut s, c, 0, &[1; 8192]).unwrap();
    disks[1].hold(true);
    // Writes and reads in flight when the member stops answering.
    for k in 0..4u64 {
        let bytes = testing::pattern(k as u8, k * 4096, 4096);
        s.submit(c, testing::write_bio(k * 4096, &bytes), k);
    }
    s.submit(c, Bio::read(0, 4096), 10);
    s.run();
    let mut done = Vec::new();
    while done.len() < 5 {
        now_ms += 100;
        assert!(now_ms < 10_000, "the mirror still waits for the hung member");
        s.set_now_ns(now_ms * 1_000_000);
        s.run();
        while let Some((tag, bio, r)) = s.take_completed() {
            done.push((tag, bio, r));
        }
    }
    assert!(now_ms > 3000, "nothing waited for the deadline");
    for (tag, bio, r) in &done {
        assert_eq!(*r, Ok(()), "request {tag} failed");
        if *tag == 10 {
            // The read went to the good member (or was retried on it).
            let got = testing::bio_bytes(bio);
            assert!(got == [1; 4096] || got == testing::pattern(0, 0, 4096));
        }
    }
    let m = st(&mut s);
    assert_eq!(m.state, MirrorState::Degraded);
    assert_eq!(m.members.len(), 1);
    // New writes and reads go on from the good member.
    let bytes = testing::pattern(9, 0, 8192);
    testing::write(&mut s, c, 65536, &bytes).unwrap();
    assert_eq!(testing::read(&mut s, c, 65536, 8192).unwrap(), bytes);
    for k in 0..4u64 {
        assert_eq!(
            testing::read(&mut s, c, k * 4096, 4096).unwrap(),
            testing::pattern(k as u8, k * 4096, 4096)
        );
    }
    let p = s.find_provider("vtbd1").unwrap();
    assert!(s.provider(p).orphaned);
}
