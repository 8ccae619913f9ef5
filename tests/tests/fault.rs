//! The short fault campaign: `strata fault` boots the appliance in QEMU
//! over disks with a volatile write cache, breaks them and cuts power on a
//! seeded schedule, and checks every sector against what was
//! acknowledged. One disk, a stripe, a mirror, an eli and a gbde volume and a
//! raid5 through power cuts pass (whole, degraded, and with a failing
//! member rebuilt), the raid5's parity scrubbed clean at the end; one disk
//! exported over iSCSI passes power cuts too; disks that drop their
//! flushes must make it fail.

use std::process::Command;
use strata_tests::{strata_bin, TempDir};

/// What one campaign printed and how it ended.
struct Campaign {
    passed: bool,
    out: String,
}

impl Campaign {
    /// The figure printed after `label` in the summary line.
    fn figure(&self, label: &str) -> u64 {
        let at = self
            .out
            .find(label)
            .unwrap_or_else(|| panic!("no '{label}' in:\n{}", self.out));
        self.out[at + label.len()..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no figure after '{label}' in:\n{}", self.out))
    }
}

fn campaign(
    tag: &str,
    config: &str,
    disks: u16,
    seed: u64,
    rounds: u32,
    faults: &str,
    extra: &[&str],
) -> Campaign {
    let dir = TempDir::new(tag);
    let conf = dir.path("strata.conf");
    std::fs::write(&conf, config).unwrap();
    let out = Command::new(strata_bin())
        .arg("fault")
        .arg("--config")
        .arg(&conf)
        .args(["--disks", &disks.to_string(), "--disk-size", "32M"])
        .args(["--seed", &seed.to_string(), "--rounds", &rounds.to_string()])
        .args(["--faults", faults, "--round-time", "4"])
        .arg("--dir")
        .arg(dir.path("run"))
        .args(extra)
        .output()
        .expect("run strata fault");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    Campaign {
        passed: out.status.success(),
        out: text,
    }
}

/// A campaign that must pass: exit 0, PASS, nothing lost, mixed or
/// damaged, every round run, and real work acknowledged.
fn must_pass(c: &Campaign, rounds: u32) {
    assert!(c.passed, "campaign failed:\n{}", c.out);
    assert!(
        c.out
            .contains("lost 0, garbage 0, replicas disagreeing 0, other failures 0"),
        "{}",
        c.out
    );
    assert!(c.out.lines().any(|l| l == "PASS"), "{}", c.out);
    assert_eq!(c.figure("\nrounds "), u64::from(rounds), "{}", c.out);
    // Real work was acknowledged: a floor well below what a slow,
    // loaded host still does (about 90 writes in a round cut at 1 s).
    let rounds = u64::from(rounds);
    assert!(c.figure("writes acknowledged") > 60 * rounds, "{}", c.out);
    assert!(c.figure(", flushes ") > 6 * rounds, "{}", c.out);
}

#[test]
fn one_disk_survives_power_cuts_and_errors() {
    let c = campaign(
        "fault-one",
        "export nbd vol vtbd0\n",
        1,
        11,
        3,
        "power-cut,write-errors,read-errors",
        &[],
    );
    must_pass(&c, 3);
}

#[test]
fn a_stripe_survives_power_cuts_hangs_and_errors() {
    let c = campaign(
        "fault-stripe",
        "stripe label -s 64k st vtbd0 vtbd1\nexport nbd vol stripe/st\n",
        2,
        12,
        3,
        "power-cut,disk-hangs,read-errors",
        &[],
    );
    must_pass(&c, 3);
}

#[test]
fn a_mirror_loses_and_mixes_nothing() {
    let c = campaign(
        "fault-mirror",
        "mirror label gm0 vtbd0 vtbd1\nexport nbd vol mirror/gm0\n",
        2,
        13,
        5,
        "power-cut,disk-fails,disk-gone,resync-cut,write-errors",
        &[],
    );
    must_pass(&c, 5);
    assert!(
        c.out
            .contains("mirror gm0: vtbd0 and vtbd1 differ in 0 bytes"),
        "the members were compared:\n{}",
        c.out
    );
}

/// A whole raid5 over three disks through power cuts (the write hole the
/// partial parity log closes): nothing lost or mixed, and the final
/// scrub finds every row's parity consistent.
#[test]
fn a_raid5_survives_power_cuts() {
    let c = campaign(
        "fault-raid5-cuts",
        "raid5 label -s 16k r0 vtbd0 vtbd1 vtbd2\nexport nbd vol raid5/r0\n",
        3,
        18,
        3,
        "power-cut",
        &[],
    );
    must_pass(&c, 3);
    assert!(
        c.out.contains("raid5 r0 (complete): scrub checked"),
        "the parity was scrubbed:\n{}",
        c.out
    );
    assert!(c.figure("scrub checked") > 0, "{}", c.out);
    assert_eq!(c.figure("parity mismatches"), 0, "{}", c.out);
}

/// A raid5 over three disks: power cuts, a member that fails (the array
/// goes on degraded and rebuilds it at the next boot) and a cut during
/// that rebuild; nothing is lost or mixed, and the final scrub finds the
/// parity of every row consistent.
#[test]
fn a_raid5_survives_power_cuts_and_a_failing_member() {
    let c = campaign(
        "fault-raid5",
        "raid5 label -s 16k r0 vtbd0 vtbd1 vtbd2\nexport nbd vol raid5/r0\n",
        3,
        16,
        4,
        "power-cut,disk-fails,resync-cut",
        &[],
    );
    must_pass(&c, 4);
    assert!(
        c.out.contains("raid5 r0 (complete): scrub checked"),
        "the parity was scrubbed:\n{}",
        c.out
    );
    assert!(c.figure("scrub checked") > 0, "{}", c.out);
    assert_eq!(c.figure("parity mismatches"), 0, "{}", c.out);
}

/// A raid5 that runs degraded (vtbd2 fails every request after the
/// first boot) through power cuts: with no redundancy left, the partial
/// parity log must still keep every acknowledged write.
#[test]
fn a_degraded_raid5_survives_power_cuts() {
    let c = campaign(
        "fault-raid5-degraded",
        "raid5 label -s 16k r0 vtbd0 vtbd1 vtbd2\nexport nbd vol raid5/r0\n",
        3,
        17,
        3,
        "power-cut",
        &["--dead-disk", "2"],
    );
    must_pass(&c, 3);
    assert!(
        c.out.contains("raid5 r0 (degraded)") || c.out.contains("not scrubbed: raid5 scrub r0"),
        "the array ran degraded to the end:\n{}",
        c.out
    );
}

/// An eli (LUKS1) volume through power cuts: every sector reads a
/// value some write left (never garbage: each sector is enciphered
/// alone, and `-z` made the unwritten ones read zeroes), and nothing
/// acknowledged before a flush is lost; the config's `eli init` finds
/// the volume at each boot and leaves it.
#[test]
fn an_eli_volume_survives_power_cuts() {
    let c = campaign(
        "fault-eli",
        "eli init -z -i 10 -p pw vtbd0\neli attach -p pw vtbd0\nexport nbd vol vtbd0.eli\n",
        1,
        21,
        3,
        "power-cut",
        &[],
    );
    must_pass(&c, 3);
}

/// A gbde volume through power cuts: every write draws a fresh sector
/// key whose record reaches the disk before the data, so after each cut
/// every sector reads the old contents or the new (never garbage) and
/// nothing acknowledged before a flush is lost; the config's `gbde init`
/// finds the volume at each boot and leaves it.
#[test]
fn a_gbde_volume_survives_power_cuts() {
    let c = campaign(
        "fault-gbde",
        "gbde init -i 10 -p pw vtbd0\ngbde attach -p pw vtbd0\nexport nbd vol vtbd0.bde\n",
        1,
        22,
        3,
        "power-cut",
        &[],
    );
    must_pass(&c, 3);
}

/// One disk exported over iSCSI through power cuts: the workload is an
/// iSCSI initiator on the forwarded iSCSI port (WRITE(16) with and
/// without FUA, SYNCHRONIZE CACHE(16), WRITE SAME(16), READ(16)), so
/// nothing the target acknowledged with FUA or before a SYNCHRONIZE CACHE
/// may be lost, and every sector reads a value some write left.
#[test]
fn an_iscsi_export_survives_power_cuts() {
    let c = campaign(
        "fault-iscsi",
        "export iscsi iqn.2026-12.org.strata:fault vtbd0\n",
        1,
        23,
        3,
        "power-cut",
        &["--protocol", "iscsi"],
    );
    must_pass(&c, 3);
    assert!(
        c.out
            .contains("iscsi export iqn.2026-12.org.strata:fault/0"),
        "the workload spoke iSCSI:\n{}",
        c.out
    );
}

/// The campaign's own check: disks that acknowledge flushes they drop
/// lose acknowledged writes at a power cut, and the campaign says so.
#[test]
fn disks_that_drop_flushes_fail_the_campaign() {
    let c = campaign(
        "fault-lying",
        "export nbd vol vtbd0\n",
        1,
        14,
        2,
        "power-cut",
        &["--lying-disks"],
    );
    assert!(!c.passed, "a lying disk passed:\n{}", c.out);
    assert!(c.out.lines().any(|l| l == "FAIL"), "{}", c.out);
    assert!(c.figure("\nlost ") > 0, "{}", c.out);
}
