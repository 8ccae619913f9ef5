use super::layout::{xor, Layout};
use super::*;
use crate::bio::BioError;
use crate::class::Class;
use crate::config::parse_line;
use crate::ctl::{self, CtlError};
use crate::stack::{Access, Stack};
use crate::testing::{self, FakeDiskHandle};
use alloc::format;
use alloc::string::ToString;
use alloc::sync::Arc;
use alloc::vec;
use proptest::prelude::*;

fn apply(s: &mut Stack, line: &str) -> Result<(), CtlError> {
    ctl::apply(s, &parse_line(line, 1).unwrap().unwrap())
}

fn names(n: usize) -> String {
    (0..n).map(crate::disk::vtbd_name).collect::<Vec<_>>().join(" ")
}

fn status(s: &Stack) -> serde_json::Value {
    let (_, v) = CLASS.status(s).unwrap();
    v[0].clone()
}

/// The array's layout, from its record on disk 0.
fn layout_of(s: &Stack) -> Layout {
    let g = s.find_geom("raid5", "r0").unwrap();
    let c = s.dumpconf(g);
    let n = c["members"].as_array().unwrap().len();
    Layout {
        members: n,
        unit: c["stripe_unit"].as_u64().unwrap(),
        rows: c["rows"].as_u64().unwrap(),
        slots: c["log_slots"].as_u64().unwrap(),
    }
}

/// Every row's parity equals the XOR of its data, on the disks' images.
fn parity_mismatches(l: &Layout, images: &[Vec<u8>]) -> usize {
    let mut bad = 0;
    for row in 0..l.rows {
        let at = l.row_offset(row) as usize;
        let mut acc = vec![0u8; l.unit as usize];
        for img in images {
            xor(&mut acc, &img[at..at + l.unit as usize]);
        }
        bad += usize::from(acc.iter().any(|&b| b != 0));
    }
    bad
}

fn array(n: usize, size: u64, unit: &str) -> (Stack, Vec<FakeDiskHandle>, crate::bio::ConsumerId) {
    let (mut s, disks) = testing::stack_with_disks(n, size, 512);
    apply(&mut s, &format!("raid5 label -s {unit} r0 {}", names(n))).unwrap();
    let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
    (s, disks, c)
}

#[test]
fn statements_parse_and_errors_name_the_column() {
    use crate::class::parse_test;
    assert_eq!(
        parse_test::cmd::<Raid5Label>("raid5 label -s 16k r0 vtbd0 vtbd1 vtbd2"),
        Raid5Label {
            name: "r0".into(),
            providers: vec!["vtbd0".into(), "vtbd1".into(), "vtbd2".into()],
            unit: 16384,
            ppl: true,
        }
    );
    assert!(!parse_test::cmd::<Raid5Label>("raid5 label -n r0 a b c").ppl);
    assert_eq!(
        parse_test::cmd::<Raid5Member>("raid5 insert r0 vtbd3"),
        Raid5Member { name: "r0".into(), provider: "vtbd3".into(), insert: true }
    );
    let (c, m) = parse_test::err("raid5 label r0 vtbd0 vtbd1");
    assert_eq!(c, 16);
    assert!(m.contains("three"), "{m}");
    assert_eq!(parse_test::err("raid5 label -s 3k r0 a b c").0, 16);
    assert_eq!(parse_test::err("raid5 label -s 512k r0 a b c").0, 16);
    assert_eq!(parse_test::err("raid5 frob r0").0, 7);
}

#[test]
fn data_and_parity_land_left_symmetric() {
    let (mut s, disks, c) = array(3, 256 << 10, "4k");
    let l = layout_of(&s);
    let size = s.provider(s.consumer_provider(c)).spec.media_size;
    assert_eq!(size, l.rows * 2 * 4096);
    let data = testing::pattern(3, 0, size as usize);
    testing::write(&mut s, c, 0, &data).unwrap();
    testing::flush(&mut s, c).unwrap();
    let img: Vec<Vec<u8>> = disks.iter().map(|d| d.contents()).collect();
    for row in 0..l.rows {
        for k in 0..2 {
            let m = l.member(row, k);
            let on = l.row_offset(row) as usize;
            let at = ((row * 2 + k as u64) * 4096) as usize;
            assert_eq!(&img[m][on..on + 4096], &data[at..at + 4096], "row {row} chunk {k}");
        }
    }
    assert_eq!(parity_mismatches(&l, &img), 0);
    assert_eq!(testing::read(&mut s, c, 0, size as usize).unwrap(), data);
    assert_eq!(status(&s)["state"], "complete");
}

#[test]
fn a_full_row_write_reads_nothing_and_maps_each_byte_once() {
    let (mut s, disks, c) = array(4, 1 << 20, "16k");
    let p = s.consumer_provider(c);
    let reads0: u64 = disks.iter().map(|d| d.stats().reads).sum();
    let mapped0 = s.provider(p).stats.data.bytes_mapped();
    let row = 3 * 16384;
    testing::write(&mut s, c, 0, &testing::pattern(1, 0, 4 * row)).unwrap();
    let reads: u64 = disks.iter().map(|d| d.stats().reads).sum::<u64>() - reads0;
    assert_eq!(reads, 0, "a full-row write read something");
    // Each data byte once, each parity byte once.
    let mapped = s.provider(p).stats.data.bytes_mapped() - mapped0;
    assert_eq!(mapped, (4 * row + 4 * 16384) as u64);
}

#[test]
fn small_writes_read_modify_write_and_use_the_cache() {
    let (mut s, disks, c) = array(5, 1 << 20, "16k");
    let reads = |d: &[FakeDiskHandle]| d.iter().map(|d| d.stats().reads).sum::<u64>();
    let r0 = reads(&disks);
    // 4k into one chunk of a 4-data-chunk row: old data and old parity.
    testing::write(&mut s, c, 8192, &[7; 4096]).unwrap();
    assert_eq!(reads(&disks) - r0, 2);
    // The same block again: parity comes from the cache.
    testing::write(&mut s, c, 8192, &[8; 4096]).unwrap();
    assert_eq!(reads(&disks) - r0, 3);
    assert_eq!(testing::read(&mut s, c, 8192, 4096).unwrap(), vec![8; 4096]);
    let conf = s.dumpconf(s.find_geom("raid5", "r0").unwrap());
    assert!(conf["cache"]["hits"].as_u64().unwrap() >= 1, "{conf}");
}

#[test]
fn degraded_reads_and_writes_then_rebuild_onto_a_spare() {
    let (mut s, disks) = testing::stack_with_disks(4, 512 << 10, 512);
    apply(&mut s, "raid5 label -s 8k r0 vtbd0 vtbd1 vtbd2").unwrap();
    let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    let data = testing::pattern(9, 0, size);
    testing::write(&mut s, c, 0, &data).unwrap();
    disks[1].set_dead(true);
    // The first read that meets the dead member drops it and is served
    // from the rest of its rows.
    assert_eq!(testing::read(&mut s, c, 0, size).unwrap(), data);
    assert_eq!(status(&s)["state"], "degraded");
    let mut model = data.clone();
    let patch = testing::pattern(4, 0, 50_176);
    testing::write(&mut s, c, 10_240, &patch).unwrap();
    model[10_240..60_416].copy_from_slice(&patch);
    assert_eq!(testing::read(&mut s, c, 0, size).unwrap(), model);
    apply(&mut s, "raid5 insert r0 vtbd3").unwrap();
    assert!(s.settle(1000));
    let st = status(&s);
    assert_eq!(st["state"], "complete", "{st}");
    assert_eq!(st["members"][1]["provider"], "vtbd3");
    // Lose another original member: the rebuilt one must hold its part.
    disks[0].set_dead(true);
    assert_eq!(testing::read(&mut s, c, 0, size).unwrap(), model);
    assert_eq!(status(&s)["state"], "degraded");
}

#[test]
fn a_second_failure_fails_the_affected_io_without_panicking() {
    let (mut s, disks, c) = array(3, 256 << 10, "4k");
    testing::write(&mut s, c, 0, &[5; 65536]).unwrap();
    disks[0].set_dead(true);
    disks[1].set_dead(true);
    assert_eq!(testing::read(&mut s, c, 0, 65536), Err(BioError::Io));
    assert_eq!(testing::write(&mut s, c, 0, &[6; 8192]), Err(BioError::Io));
    assert_eq!(status(&s)["state"], "failed");
}

#[test]
fn tasting_reassembles_in_any_order_and_a_missing_disk_degrades() {
    let (mut s, disks, c) = array(3, 256 << 10, "4k");
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    let data = testing::pattern(2, 0, size);
    testing::write(&mut s, c, 0, &data).unwrap();
    testing::flush(&mut s, c).unwrap();
    // A flush with nothing in flight leaves the records clean: the next
    // assembly reads no log.
    assert_eq!(status(&s)["clean"], true);
    let images: Vec<Vec<u8>> = disks.iter().map(|d| d.durable()).collect();
    for m in &images {
        let rec = crate::meta::MetaRepr::from_bytes(&m[m.len() - 512..]).unwrap();
        assert_eq!(rec.flags & super::jobs::FLAG_CLEAN, super::jobs::FLAG_CLEAN);
    }
    testing::write(&mut s, c, 0, &[1; 4096]).unwrap();
    assert_eq!(status(&s)["clean"], false);
    for order in [vec![2usize, 0, 1], vec![1, 2]] {
        let imgs: Vec<Vec<u8>> = order.iter().map(|&i| images[i].clone()).collect();
        let (mut s, _) = testing::stack_from_images(&imgs, 512);
        assert!(s.settle(1000));
        let c = s.open("raid5/r0", Access::READ).unwrap();
        assert_eq!(testing::read(&mut s, c, 0, size).unwrap(), data);
        let want = if order.len() == 3 { "complete" } else { "degraded" };
        assert_eq!(status(&s)["state"], want);
    }
}

#[test]
fn a_member_that_missed_writes_is_rebuilt_when_it_returns() {
    let (mut s, disks, c) = array(3, 256 << 10, "4k");
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    testing::write(&mut s, c, 0, &testing::pattern(1, 0, size)).unwrap();
    testing::flush(&mut s, c).unwrap();
    let stale = disks[2].durable();
    disks[2].set_dead(true);
    let data = testing::pattern(7, 0, size);
    testing::write(&mut s, c, 0, &data).unwrap();
    testing::flush(&mut s, c).unwrap();
    assert!(testing::read(&mut s, c, 0, size).unwrap() == data);
    let images = vec![disks[0].durable(), disks[1].durable(), stale];
    let (mut s, d2) = testing::stack_from_images(&images, 512);
    assert!(s.settle(1000));
    assert_eq!(status(&s)["state"], "complete", "{}", status(&s));
    let c = s.open("raid5/r0", Access::READ).unwrap();
    let l = layout_of(&s);
    let img: Vec<Vec<u8>> = d2.iter().map(|d| d.contents()).collect();
    assert_eq!(parity_mismatches(&l, &img), 0);
    assert!(testing::read(&mut s, c, 0, size).unwrap() == data);
    // Lose a member that held the data all along: the rebuilt one serves.
    d2[0].set_dead(true);
    assert_eq!(testing::read(&mut s, c, 0, size).unwrap(), data);
}

#[test]
fn scrub_counts_parity_mismatches() {
    let (mut s, disks, c) = array(3, 256 << 10, "4k");
    testing::write(&mut s, c, 0, &[1; 65536]).unwrap();
    apply(&mut s, "raid5 scrub r0").unwrap();
    assert!(s.settle(1000));
    assert_eq!(status(&s)["scrub"]["mismatches"], 0);
    assert_eq!(status(&s)["scrub"]["state"], "done");
    disks[1].write_at(4096 * 3, &[0xee; 512]);
    apply(&mut s, "raid5 scrub r0").unwrap();
    assert!(s.settle(1000));
    assert_eq!(status(&s)["scrub"]["mismatches"], 1);
}

#[test]
fn the_initial_resync_makes_every_row_consistent() {
    let images: Vec<Vec<u8>> = (0..3).map(|i| testing::pattern(i, 0, 256 << 10)).collect();
    let (mut s, disks) = testing::stack_from_images(&images, 512);
    assert!(s.settle(1000));
    apply(&mut s, "raid5 label -s 4k r0 vtbd0 vtbd1 vtbd2").unwrap();
    assert!(s.settle(1000));
    let l = layout_of(&s);
    let img: Vec<Vec<u8>> = disks.iter().map(|d| d.contents()).collect();
    assert_eq!(parity_mismatches(&l, &img), 0);
    assert!(status(&s)["job"].is_null());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn behaves_like_a_flat_array(ops in testing::ops_all(600, 64, 40), n in 3usize..6,
                                 shift in 12u32..15, fail in proptest::option::of(0usize..5)) {
        let (mut s, disks) = testing::stack_with_disks(n + 1, 256 << 10, 512);
        let members = (0..n).map(crate::disk::vtbd_name).collect::<Vec<_>>().join(" ");
        apply(&mut s, &format!("raid5 label -s {} r0 {members}", 1u64 << shift)).unwrap();
        let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
        let half = ops.len() / 2;
        testing::run_model(&mut s, c, &ops[..half], &disks[..n]);
        if let Some(f) = fail {
            disks[f % n].set_dead(true);
        }
        testing::run_model(&mut s, c, &ops[half..], &[]);
        // A dead member leaves once a write or its disk's errors drop it
        // (reads alone are served from the rest of the row).
        if fail.is_some() && status(&s)["state"] == "degraded" {
            apply(&mut s, &format!("raid5 insert r0 {}", crate::disk::vtbd_name(n))).unwrap();
            prop_assert!(s.settle(1000));
            let st = status(&s);
            prop_assert_eq!(st["state"].as_str(), Some("complete"));
        }
        testing::flush(&mut s, c).unwrap();
        let l = layout_of(&s);
        let g = s.find_geom("raid5", "r0").unwrap();
        let members = s.dumpconf(g)["members"].clone();
        let imgs: Vec<Vec<u8>> = members.as_array().unwrap().iter().map(|m| {
            let name = m.as_str().unwrap().to_string();
            let i: usize = name[4..].parse().unwrap();
            disks[i].contents()
        }).collect();
        prop_assert_eq!(parity_mismatches(&l, &imgs), 0);
    }
}

/// One client step of the crash-point sequences.
use testing::{CrashStep as Step, Expect};

/// Runs `steps` one at a time on a fresh copy of `base` with `dead` failed
/// (see [`testing::run_to_cut`]).
fn run_to_cut(
    base: &[Vec<u8>],
    dead: Option<usize>,
    steps: &[Step],
    cut: usize,
    keep: bool,
) -> (Vec<Vec<u8>>, Expect, bool) {
    // With a clock that stands still, a job (a rebuild) moves its share
    // and waits; each step moves the clock on.
    let now = core::cell::Cell::new(1_000_000u64);
    testing::run_to_cut(
        base,
        &mut |s, disks| {
            s.set_now_ns(now.get());
            if !s.settle(1000) {
                let g = s.find_geom("raid5", "r0");
                panic!("not settled: {:?}", g.map(|g| s.dumpconf(g)));
            }
            let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
            let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
            let before = testing::read(s, c, 0, size).unwrap();
            if let Some(d) = dead {
                disks[d].set_dead(true);
            }
            (c, before)
        },
        &mut |s| {
            now.set(now.get() + 1);
            s.set_now_ns(now.get());
        },
        steps,
        cut,
        if keep { testing::Survivors::All } else { testing::Survivors::None },
    )
}

/// Labels a 3-disk array with 4 KiB units, writes a pattern, flushes, and
/// returns the disks' images.
fn crash_base() -> Vec<Vec<u8>> {
    let (mut s, disks, c) = array(3, 160 << 10, "4k");
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    testing::write(&mut s, c, 0, &testing::pattern(200, 0, size)).unwrap();
    testing::flush(&mut s, c).unwrap();
    disks.iter().map(|d| d.durable()).collect()
}

fn crash_steps() -> Vec<Step> {
    vec![
        // Part of one chunk (read-modify-write), across two chunks, a full
        // row, a FUA write, rewrites of the same blocks, flushes between.
        Step::Write { at: 4096 + 1024, len: 2048, seed: 1, fua: false },
        Step::Write { at: 2 * 8192 + 3072, len: 2048, seed: 2, fua: false },
        Step::Flush,
        Step::Write { at: 3 * 8192, len: 8192, seed: 3, fua: false },
        Step::Write { at: 4096 + 512, len: 4096, seed: 4, fua: true },
        Step::Write { at: 5 * 8192 + 512, len: 3 * 8192, seed: 5, fua: false },
        Step::Flush,
        Step::Write { at: 3 * 8192 + 4096, len: 512, seed: 6, fua: false },
    ]
}

/// Cuts the power after every device completion of a write sequence,
/// recovers, and checks: every row's parity matches, acknowledged and
/// flushed writes read back, every sector holds old or new data, also
/// with any one member lost after the cut (the write hole).
fn crash_points(dead: Option<usize>) {
    let lose = match dead {
        Some(d) => vec![Some(d)],
        None => vec![None, Some(0), Some(1), Some(2)],
    };
    crash_points_from(&crash_base(), dead, &crash_steps(), &lose);
}

/// [`crash_points`] from the images `base`, recovering with each member
/// of `lose` lost (`None`: all there).
fn crash_points_from(base: &[Vec<u8>], dead: Option<usize>, steps: &[Step], lose: &[Option<usize>]) {
    let mut cut = 0;
    loop {
        for keep in [false, true] {
            let (images, expect, _) = run_to_cut(base, dead, steps, cut, keep);
            for &lost in lose {
                let imgs: Vec<Vec<u8>> = images
                    .iter()
                    .enumerate()
                    .map(|(i, img)| if Some(i) == lost { vec![0; img.len()] } else { img.clone() })
                    .collect();
                let (mut s, d) = testing::stack_from_images(&imgs, 512);
                if !s.settle(1000) {
                    let g = s.find_geom("raid5", "r0");
                    panic!("cut {cut} keep {keep} lost {lost:?}: not settled: {:?} {:?}", g.map(|g| s.dumpconf(g)["status"].clone()), s.taste_log().collect::<Vec<_>>());
                }
                let what = format!("cut {cut} keep {keep} lost {lost:?}");
                if s.find_geom("raid5", "r0").is_none() {
                    let log: Vec<&str> = s.taste_log().collect();
                    panic!("cut {cut} keep {keep} lost {lost:?}: {log:?}");
                }
                if lost.is_none() {
                    let l = layout_of(&s);
                    let img: Vec<Vec<u8>> = d.iter().map(|x| x.contents()).collect();
                    assert_eq!(parity_mismatches(&l, &img), 0, "{what} {}", status(&s)["log"]);
                }
                let c = s.open("raid5/r0", Access::READ).unwrap_or_else(|e| {
                    let log: Vec<&str> = s.taste_log().collect();
                    panic!("{what}: {e:?}: {log:?}")
                });
                let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
                let got = testing::read(&mut s, c, 0, size).unwrap();
                expect.check(&got, &what);
            }
        }
        let (_, _, finished) = run_to_cut(base, dead, steps, cut, false);
        if finished {
            break;
        }
        // Every completion early on; later every few, so a long sequence
        // (a rebuild) stays quick.
        cut += 1 + cut / 48;
    }
    assert!(cut > 10, "the sequence took only {cut} device completions");
}

#[test]
fn every_power_cut_of_a_write_sequence_keeps_parity_and_acknowledged_data() {
    crash_points(None);
}

#[test]
fn every_power_cut_of_a_degraded_write_sequence_keeps_the_missing_chunks() {
    crash_points(Some(1));
}

#[test]
fn a_rebuild_cut_short_resumes_from_its_recorded_row() {
    use core::sync::atomic::{AtomicUsize, Ordering};
    let (mut s, disks) = testing::stack_with_disks(4, 512 << 10, 512);
    apply(&mut s, "raid5 label -s 4k r0 vtbd0 vtbd1 vtbd2").unwrap();
    let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    let data = testing::pattern(11, 0, size);
    testing::write(&mut s, c, 0, &data).unwrap();
    testing::flush(&mut s, c).unwrap();
    disks[1].set_dead(true);
    assert!(testing::read(&mut s, c, 0, size).unwrap() == data);
    let rows = layout_of(&s).rows;
    // Rebuild onto vtbd3, one device completion at a time, until its
    // record says more than half is done.
    let budget = Arc::new(AtomicUsize::new(0));
    for d in &disks {
        d.set_budget(Some(budget.clone()));
    }
    apply_start(&mut s, "raid5 insert r0 vtbd3");
    let recorded = |d: &FakeDiskHandle| {
        let img = d.durable();
        crate::meta::MetaRepr::from_bytes(&img[img.len() - 512..])
            .map(|m| m.params[super::jobs::P_JOB_ROW])
            .unwrap_or(0)
    };
    while recorded(&disks[3]) < rows / 2 {
        budget.store(1, Ordering::SeqCst);
        s.run();
    }
    let persisted = recorded(&disks[3]);
    assert!(persisted < rows, "the rebuild finished before the cut");
    let images: Vec<Vec<u8>> = [0, 2, 3].iter().map(|&i| disks[i].durable()).collect();
    let (mut s, d2) = testing::stack_from_images(&images, 512);
    let writes0 = d2[2].stats().writes;
    assert!(s.settle(10_000));
    let st = status(&s);
    assert_eq!(st["state"], "complete", "{st}");
    // Only the rows after the recorded one were copied again (plus records).
    let copied = d2[2].stats().writes - writes0;
    assert!(copied <= rows - persisted + 8, "copied {copied} rows of {rows}, {persisted} were done");
    let c = s.open("raid5/r0", Access::READ).unwrap();
    d2[0].set_dead(true);
    assert!(testing::read(&mut s, c, 0, size).unwrap() == data);
}

/// Starts a statement without waiting for its I/O.
fn apply_start(s: &mut Stack, line: &str) {
    let st = parse_line(line, 1).unwrap().unwrap();
    let _ = ctl::start(s, &st).unwrap();
}

#[test]
fn a_read_error_is_served_from_the_row_and_keeps_the_member() {
    let (mut s, disks, c) = array(3, 256 << 10, "4k");
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    let data = testing::pattern(5, 0, size);
    testing::write(&mut s, c, 0, &data).unwrap();
    disks[1].fail_next(2);
    assert!(testing::read(&mut s, c, 0, size).unwrap() == data);
    assert_eq!(disks[1].stats().failed, 2);
    assert_eq!(status(&s)["state"], "complete");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Requests interleaved with a rebuild (the clock moves a little per
    /// request, so the rebuild advances between them) read what a flat
    /// array would, and a member lost after the rebuild loses nothing.
    #[test]
    fn requests_during_a_rebuild_behave_like_a_flat_array(ops in testing::ops_all(4000, 96, 80), seed in any::<u8>()) {
        let (mut s, disks) = testing::stack_with_disks(4, 2 << 20, 512);
        apply(&mut s, "raid5 label -s 4k r0 vtbd0 vtbd1 vtbd2").unwrap();
        let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
        let size = s.provider(s.consumer_provider(c)).spec.media_size;
        let mut model = testing::pattern(seed, 0, size as usize);
        testing::write(&mut s, c, 0, &model).unwrap();
        disks[1].set_dead(true);
        testing::write(&mut s, c, 0, &model[..65536]).unwrap();
        prop_assert!(status(&s)["state"] == "degraded");
        let mut now = 1_000_000u64;
        s.set_now_ns(now);
        apply_start(&mut s, "raid5 insert r0 vtbd3");
        for op in &ops {
            let op = op.clip(size / 512);
            now += 1;
            s.set_now_ns(now);
            let (bio, r) = testing::io(&mut s, c, op.bio(512));
            prop_assert_eq!(r, Ok(()), "{:?}", op);
            if let testing::Op::Read { at, len } = op {
                let (a, b) = ((at * 512) as usize, ((at + len) * 512) as usize);
                prop_assert!(testing::bio_bytes(&bio) == model[a..b], "{:?} differs", op);
            } else {
                op.apply(&mut model, 512);
            }
        }
        for _ in 0..10_000 {
            now += 1;
            s.set_now_ns(now);
            s.run();
            if status(&s)["state"] == "complete" {
                break;
            }
        }
        prop_assert!(status(&s)["state"] == "complete");
        disks[0].set_dead(true);
        prop_assert!(testing::read(&mut s, c, 0, size as usize).unwrap() == model);
    }
}

#[test]
fn every_power_cut_during_a_rebuild_keeps_parity_and_acknowledged_data() {
    // A member misses writes, comes back stale and is rebuilt while the
    // sequence runs; the power is cut at every step of both.
    let (mut s, disks, c) = array(3, 512 << 10, "4k");
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    testing::write(&mut s, c, 0, &testing::pattern(200, 0, size)).unwrap();
    testing::flush(&mut s, c).unwrap();
    let stale = disks[2].durable();
    disks[2].set_dead(true);
    testing::write(&mut s, c, 0, &testing::pattern(201, 0, size / 2)).unwrap();
    testing::flush(&mut s, c).unwrap();
    let base = vec![disks[0].durable(), disks[1].durable(), stale];
    let steps: Vec<Step> = (0..12u64)
        .map(|i| match i % 4 {
            3 => Step::Flush,
            k => Step::Write {
                at: (i * 37 % 100) * 4096 + k * 512,
                len: 4096 + k * 2048,
                seed: i as u8 + 10,
                fua: k == 2,
            },
        })
        .collect();
    // Losing a source before the rebuild ends loses the array; losing
    // the member being rebuilt must lose nothing.
    crash_points_from(&base, None, &steps, &[None, Some(2)]);
}

/// Sixteen requests in flight at once (writes never overlapping another
/// request in flight), a member dying in the middle: every request
/// succeeds and every read returns what was written.
#[test]
fn a_deep_queue_through_a_member_dying_reads_what_it_wrote() {
    use rand_core::{Rng, SeedableRng};
    for seed in 0..4u64 {
        let mut rng = rand_xorshift::XorShiftRng::seed_from_u64(seed);
        let (mut s, disks) = testing::stack_with_disks(3, 1 << 20, 512);
        apply(&mut s, "raid5 label -s 16k r0 vtbd0 vtbd1 vtbd2").unwrap();
        let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
        let size = s.provider(s.consumer_provider(c)).spec.media_size;
        let sectors = size / 512;
        let mut model = vec![0u8; size as usize];
        let mut inflight: Vec<(u64, u64, u64, bool, Vec<u8>)> = Vec::new(); // tag, at, len, write, data
        let mut tag = 0u64;
        for step in 0..1500 {
            if step == 500 {
                disks[2].set_dead(true);
            }
            while inflight.len() < 16 {
                let at = rng.next_u64() % sectors;
                let len = (1 + rng.next_u64() % 64).min(sectors - at);
                let (a, b) = (at * 512, (at + len) * 512);
                if inflight.iter().any(|(_, x, l, _, _)| a < x + l && *x < b) {
                    break;
                }
                let write = rng.next_u32() % 2 == 0;
                tag += 1;
                if write {
                    let data = testing::pattern(tag as u8, a, (b - a) as usize);
                    s.submit(c, testing::write_bio(a, &data), tag);
                    inflight.push((tag, a, b - a, true, data));
                } else {
                    s.submit(c, crate::bio::Bio::read(a, b - a), tag);
                    inflight.push((tag, a, b - a, false, Vec::new()));
                }
            }
            s.run();
            while let Some((t, bio, r)) = s.take_completed() {
                let i = inflight.iter().position(|x| x.0 == t).unwrap();
                let (_, a, l, w, data) = inflight.remove(i);
                assert_eq!(r, Ok(()), "seed {seed} step {step} write {w} {a}+{l} {}", status(&s));
                if w {
                    model[a as usize..(a + l) as usize].copy_from_slice(&data);
                } else {
                    assert!(testing::bio_bytes(&bio) == model[a as usize..(a + l) as usize], "seed {seed} step {step}: read {a}+{l} differs; state {}", status(&s)["state"]);
                }
            }
        }
    }
}

/// A write that starts after a FLUSH was sent and ends before it is
/// answered is not covered by it: the records must not say clean, or a
/// cut would leave its row unreplayed.
#[test]
fn a_flush_with_a_write_racing_it_leaves_the_records_dirty() {
    let (mut s, disks, c) = array(5, 256 << 10, "4k");
    testing::write(&mut s, c, 0, &[1; 4096]).unwrap();
    testing::flush(&mut s, c).unwrap();
    testing::write(&mut s, c, 0, &[2; 4096]).unwrap();
    assert_eq!(status(&s)["clean"], false);
    // A full chunk of row 2: read-modify-write touches its data member
    // and its parity member only; a third member holds the flush back.
    let l = layout_of(&s);
    let row = 2;
    let (data, parity) = (l.member(row, 0), l.parity(row));
    let held = (0..5).find(|&m| m != data && m != parity).unwrap();
    disks[held].hold(true);
    s.submit(c, crate::bio::Bio::flush(), 1);
    s.run();
    s.submit(c, testing::write_bio(l.row_bytes() * row, &[3; 4096]), 2);
    let mut done = Vec::new();
    for _ in 0..1000 {
        s.run();
        while let Some((t, _, r)) = s.take_completed() {
            assert_eq!(r, Ok(()));
            done.push(t);
        }
        if !done.is_empty() {
            break;
        }
    }
    assert_eq!(done, vec![2], "the write ends while the flush waits");
    disks[held].hold(false);
    let (t, _, r) = testing::wait(&mut s);
    assert_eq!((t, r), (1, Ok(())));
    assert_eq!(status(&s)["clean"], false, "{}", status(&s));
    // A flush with nothing in flight does say clean.
    testing::flush(&mut s, c).unwrap();
    assert_eq!(status(&s)["clean"], true);
}

/// Writes queued behind a rebuild's row, on every kind of row (the
/// target holding its parity, or a data chunk), run once the row is
/// rebuilt: they must reach the target too. A member lost after the
/// rebuild then loses nothing, and every row's parity matches.
#[test]
fn a_write_queued_behind_the_rebuilds_row_reaches_the_rebuilt_member() {
    use core::sync::atomic::{AtomicUsize, Ordering};
    let (mut s, disks) = testing::stack_with_disks(4, 256 << 10, 512);
    apply(&mut s, "raid5 label -s 4k r0 vtbd0 vtbd1 vtbd2").unwrap();
    let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    let mut model = testing::pattern(31, 0, size);
    testing::write(&mut s, c, 0, &model).unwrap();
    testing::flush(&mut s, c).unwrap();
    disks[1].set_dead(true);
    testing::write(&mut s, c, 0, &model[..4096]).unwrap();
    let l = layout_of(&s);
    let budget = Arc::new(AtomicUsize::new(0));
    for d in &disks {
        d.set_budget(Some(budget.clone()));
    }
    apply_start(&mut s, "raid5 insert r0 vtbd3");
    let done = |s: &Stack| status(s)["rebuild"]["done_bytes"].as_u64().unwrap_or(u64::MAX);
    // For rows 1..4 (each parity placement): when the rebuild's op holds
    // the row, a write of the whole row's first chunk queues behind it.
    let mut tag = 0;
    for row in 1..4u64 {
        while done(&s) < row * l.unit {
            budget.store(1, Ordering::SeqCst);
            s.run();
        }
        assert_eq!(done(&s), row * l.unit, "the rebuild passed row {row}");
        let at = (row * l.row_bytes()) as usize;
        let data = testing::pattern(40 + row as u8, 0, l.row_bytes() as usize / 2);
        model[at..at + data.len()].copy_from_slice(&data);
        s.submit(c, testing::write_bio(at as u64, &data), tag);
        tag += 1;
        s.run();
    }
    for d in &disks {
        d.set_budget(None);
    }
    let back = testing::wait_all(&mut s, tag as usize);
    assert!(back.iter().all(|b| b.2.is_ok()));
    assert!(s.settle(10_000));
    assert_eq!(status(&s)["state"], "complete");
    let images: Vec<Vec<u8>> = [0, 3, 2].iter().map(|&i| disks[i].contents()).collect();
    assert_eq!(parity_mismatches(&l, &images), 0, "rows whose parity misses a write");
    disks[0].set_dead(true);
    assert!(testing::read(&mut s, c, 0, size).unwrap() == model);
}

/// A write bio whose pages do not start at a page boundary (as a
/// network engine's receive buffers are): `skew` bytes of the first page
/// are skipped.
fn skewed_write(offset: u64, data: &[u8], skew: usize) -> crate::bio::Bio {
    use crate::page::{Page, PageRef, SgList, PAGE_SIZE};
    let counters = crate::page::DataCounters::new();
    let mut sg = SgList::new();
    let mut at = 0;
    let mut off = skew;
    while at < data.len() {
        let page = Page::new_zeroed();
        let take = (PAGE_SIZE - off).min(data.len() - at);
        page.copy_in(off, &data[at..at + take], &counters).unwrap();
        sg.push(PageRef { page, offset: off as u32, len: take as u32 });
        at += take;
        off = 0;
    }
    crate::bio::Bio::with_data(crate::bio::BioCmd::Write, offset, sg)
}

/// A degraded array under a deep queue of reads, writes (their pages
/// skewed), write-zeroes and flushes, crowded into a few rows so that
/// row operations queue behind each other: every read returns what the
/// writes before it left, and so does the whole volume at the end.
#[test]
fn a_degraded_array_under_a_crowded_deep_queue_reads_what_it_wrote() {
    use rand_core::{Rng, SeedableRng};
    for seed in 0..3u64 {
        let mut rng = rand_xorshift::XorShiftRng::seed_from_u64(seed);
        let (mut s, disks) = testing::stack_with_disks(3, 1 << 20, 512);
        apply(&mut s, "raid5 label -s 16k r0 vtbd0 vtbd1 vtbd2").unwrap();
        let c = s.open("raid5/r0", Access::READ_WRITE).unwrap();
        let size = s.provider(s.consumer_provider(c)).spec.media_size;
        let mut model = testing::pattern(seed as u8, 0, size as usize);
        testing::write(&mut s, c, 0, &model).unwrap();
        disks[(seed % 3) as usize].set_dead(true);
        let blocks = size / 4096;
        // tag, at, len, write, data
        let mut inflight: Vec<(u64, u64, u64, bool, Vec<u8>)> = Vec::new();
        let mut tag = 0u64;
        for step in 0..1500 {
            while inflight.len() < 16 {
                let span = if rng.next_u32() % 3 == 0 { 48 } else { blocks };
                let len = 1 + rng.next_u64() % 16;
                let at = rng.next_u64() % (span - len + 1);
                let (a, b) = (at * 4096, (at + len) * 4096);
                if inflight.iter().any(|(_, x, l, _, _)| a < x + l && *x < b) {
                    break;
                }
                tag += 1;
                let roll = rng.next_u32() % 100;
                if roll < 8 {
                    s.submit(c, crate::bio::Bio::flush(), tag);
                    inflight.push((tag, 0, 0, false, Vec::new()));
                } else if roll < 14 {
                    let mut bio = crate::bio::Bio::no_data(crate::bio::BioCmd::WriteZeroes, a, b - a);
                    bio.fua = roll % 2 == 0;
                    s.submit(c, bio, tag);
                    inflight.push((tag, a, b - a, true, vec![0; (b - a) as usize]));
                } else if roll < 50 {
                    s.submit(c, crate::bio::Bio::read(a, b - a), tag);
                    inflight.push((tag, a, b - a, false, Vec::new()));
                } else {
                    let data = testing::pattern(tag as u8, a, (b - a) as usize);
                    let mut bio = skewed_write(a, &data, (rng.next_u32() % 8) as usize * 512);
                    bio.fua = roll >= 90;
                    s.submit(c, bio, tag);
                    inflight.push((tag, a, b - a, true, data));
                }
            }
            s.run();
            while let Some((t, bio, r)) = s.take_completed() {
                let i = inflight.iter().position(|x| x.0 == t).unwrap();
                let (_, a, l, w, data) = inflight.remove(i);
                assert_eq!(r, Ok(()), "seed {seed} step {step} write {w} {a}+{l} {}", status(&s));
                if l == 0 {
                    continue;
                }
                let (x, y) = (a as usize, (a + l) as usize);
                if w {
                    model[x..y].copy_from_slice(&data);
                } else {
                    assert!(testing::bio_bytes(&bio) == model[x..y], "seed {seed} step {step}: read {a}+{l} differs");
                }
            }
        }
        for (t, _, r) in testing::wait_all(&mut s, inflight.len()) {
            assert_eq!(r, Ok(()), "seed {seed}: request {t}");
            let i = inflight.iter().position(|x| x.0 == t).unwrap();
            let (_, a, l, w, data) = inflight.remove(i);
            if w && l > 0 {
                model[a as usize..(a + l) as usize].copy_from_slice(&data);
            }
        }
        assert!(testing::read(&mut s, c, 0, size as usize).unwrap() == model, "seed {seed}: the volume differs");
    }
}

/// Two writes to one row with no flush between: the second's partial
/// parity holds the first's new bytes, which a cut may lose while it
/// keeps the second's log entry (FUA). Replaying the second must leave
/// parity that matches the disks, or the chunk a missing member held
/// reconstructs from stale parity.
#[test]
fn every_power_cut_of_unflushed_writes_to_one_row_keeps_parity() {
    // 3 members, 4 KiB units: row r's chunks are bytes r·8192 + 0..4096
    // and + 4096..8192. Rows 0, 1 and 2 put their parity on different
    // members, so losing member 1 takes a data chunk of two of them.
    let steps: Vec<Step> = [0u64, 1, 2]
        .iter()
        .flat_map(|&r| {
            let base = r * 8192;
            [
                Step::Write { at: base, len: 1024, seed: 40 + r as u8, fua: false },
                Step::Write { at: base + 2048, len: 1024, seed: 50 + r as u8, fua: false },
                Step::Write { at: base + 4096 + 512, len: 512, seed: 60 + r as u8, fua: false },
            ]
        })
        .chain([Step::Flush, Step::Write { at: 4096, len: 4096, seed: 70, fua: false }])
        .chain([Step::Write { at: 1024, len: 512, seed: 71, fua: true }])
        .collect();
    crash_points_from(&crash_base(), None, &steps, &[None, Some(0), Some(1), Some(2)]);
    crash_points_from(&crash_base(), Some(1), &steps, &[Some(1)]);
}
