//! Host tests of the part class: tables written by `gpt::build` and by
//! sgdisk into fake disks that complete out of order, probed at boot;
//! partition I/O offset and bounded; a damaged primary; editing live.

use super::*;
use crate::bio::BioError;
use crate::config::parse_line;
use crate::stack::Access;
use crate::testing::{self, FakeDiskHandle, Op};
use proptest::prelude::*;

const SS: u32 = 512;
const DISK: u64 = 8 << 20;

fn part(index: u32, start_lba: u64, end_lba: u64, name: &str) -> Partition {
    Partition {
        index,
        type_guid: Guid::LINUX_FILESYSTEM,
        unique_guid: Guid::from_u128(u128::from(index) + 1),
        start_lba,
        end_lba,
        attributes: 0,
        name: String::from(name),
    }
}

/// An image of `DISK` bytes holding a GPT with `parts`.
fn image(parts: &[Partition]) -> Vec<u8> {
    let mut img = vec![0u8; DISK as usize];
    let sectors = gpt::build(DISK / u64::from(SS), SS, Guid::from_u128(7), parts).unwrap();
    for (lba, bytes) in sectors {
        let at = (lba * u64::from(SS)) as usize;
        img[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    img
}

/// A stack over the images, probed and settled.
fn boot(images: &[Vec<u8>]) -> (Stack, Vec<FakeDiskHandle>) {
    let (mut s, disks) = testing::stack_from_images(images, SS);
    assert!(s.settle(1 << 20));
    (s, disks)
}

fn size_of(s: &Stack, name: &str) -> u64 {
    let p = s.find_provider(name).unwrap_or_else(|| panic!("no {name}"));
    s.provider(p).spec.media_size
}

fn apply(s: &mut Stack, line: &str) -> Result<(), CtlError> {
    ctl::apply(s, &parse_line(line, 1).unwrap().unwrap())
}

fn three() -> Vec<Partition> {
    vec![
        part(0, 2048, 4095, "boot"),
        part(1, 4096, 8191, "data"),
        part(4, 8192, 12287, "five"),
    ]
}

#[test]
fn partitions_appear_named_as_freebsd_names_them() {
    let (s, _) = boot(&[image(&three())]);
    assert_eq!(size_of(&s, "vtbd0p1"), 2048 * 512);
    assert_eq!(size_of(&s, "vtbd0p2"), 4096 * 512);
    assert_eq!(size_of(&s, "vtbd0p5"), 4096 * 512);
    assert!(s.find_provider("vtbd0p3").is_none());
    let g = s.find_geom(CLASS_NAME, "vtbd0").unwrap();
    let conf = s.dumpconf(g);
    assert_eq!(conf["state"], "ok");
    assert_eq!(conf["read_from"], "primary");
    assert_eq!(conf["partitions"][1]["label"], "data");
    assert_eq!(conf["partitions"][2]["index"], 5);
    assert_eq!(conf["partitions"][0]["type"], "linux-data");
}

#[test]
fn io_is_offset_into_the_partition_and_bounded_by_it() {
    let (mut s, disks) = boot(&[image(&three())]);
    let c = s.open("vtbd0p2", Access::READ_WRITE).unwrap();
    let data = testing::pattern(3, 0, 8192);
    testing::write(&mut s, c, 4096, &data).unwrap();
    let at = (4096 * 512 + 4096) as usize;
    assert_eq!(&disks[0].contents()[at..at + 8192], &data[..]);
    assert_eq!(testing::read(&mut s, c, 4096, 8192).unwrap(), data);
    // The central check bounds I/O by the partition.
    let end = size_of(&s, "vtbd0p2");
    assert_eq!(
        testing::read(&mut s, c, end, 512).unwrap_err(),
        BioError::OutOfRange
    );
    assert!(testing::write(&mut s, c, end - 512, &[1; 1024]).is_err());
    assert!(testing::flush(&mut s, c).is_ok());
    // Routing, not computing: nothing was mapped.
    let p = s.find_provider("vtbd0p2").unwrap();
    assert_eq!(s.provider(p).stats.data.bytes_mapped(), 0);
}

#[test]
fn a_damaged_primary_falls_back_to_the_backup() {
    let mut img = image(&three());
    // Break the primary header's CRC.
    img[512 + 16] ^= 0xff;
    let (s, _) = boot(&[img]);
    assert_eq!(size_of(&s, "vtbd0p5"), 4096 * 512);
    let g = s.find_geom(CLASS_NAME, "vtbd0").unwrap();
    let conf = s.dumpconf(g);
    assert_eq!(conf["read_from"], "backup");
    assert!(conf["other_copy"].as_str().is_some(), "{conf}");
}

#[test]
fn both_copies_damaged_leaves_no_partition_and_says_why() {
    let mut img = image(&three());
    img[512 + 16] ^= 0xff;
    let last = DISK as usize - 512;
    img[last + 16] ^= 0xff;
    let (s, _) = boot(&[img]);
    assert!(s.find_provider("vtbd0p1").is_none());
    let g = s.find_geom(CLASS_NAME, "vtbd0").unwrap();
    let conf = s.dumpconf(g);
    assert_eq!(conf["state"], "corrupt");
    assert!(conf["problem"].as_str().unwrap().contains("CRC"), "{conf}");
}

#[test]
fn a_disk_without_a_table_keeps_no_part_geom() {
    let (mut s, _) = boot(&[vec![0u8; DISK as usize]]);
    for _ in 0..100 {
        s.run();
    }
    assert_eq!(s.find_geom(CLASS_NAME, "vtbd0"), None);
    // The disk itself serves on.
    let c = s.open("vtbd0", Access::READ_WRITE).unwrap();
    testing::write(&mut s, c, 0, &[9; 512]).unwrap();
}

#[test]
fn tables_are_made_and_edited_live_and_come_back_after_a_restart() {
    let (mut s, disks) = boot(&[vec![0u8; DISK as usize]]);
    apply(&mut s, "part create vtbd0").unwrap();
    apply(&mut s, "part add -t linux-data -s 2m -l one vtbd0").unwrap();
    apply(&mut s, "part add -t freebsd-ufs -i 3 vtbd0").unwrap();
    assert_eq!(size_of(&s, "vtbd0p1"), 2 << 20);
    // The second one fills what is left, from the next 1 MiB boundary.
    let rest = size_of(&s, "vtbd0p3");
    assert!(rest > 4 << 20 && rest < 6 << 20, "{rest}");
    assert!(apply(&mut s, "part add -t efi vtbd0").is_err(), "no space left");
    assert!(apply(&mut s, "part create vtbd0").is_err(), "a table already");
    // Delete is refused while the partition is open.
    let c = s.open("vtbd0p1", Access::READ).unwrap();
    assert!(apply(&mut s, "part delete -i 1 vtbd0").is_err());
    s.close(c).unwrap();
    apply(&mut s, "part delete -i 1 vtbd0").unwrap();
    for _ in 0..10 {
        s.run();
    }
    assert!(s.find_provider("vtbd0p1").is_none());
    // A new stack over the same disk finds the edited table.
    let (s2, _) = boot(&[disks[0].contents()]);
    assert!(s2.find_provider("vtbd0p1").is_none());
    assert_eq!(size_of(&s2, "vtbd0p3"), rest);
    let g = s2.find_geom(CLASS_NAME, "vtbd0").unwrap();
    assert_eq!(s2.dumpconf(g)["partitions"][0]["type"], "freebsd-ufs");
}

#[test]
fn verbs_parse_and_refuse_with_columns() {
    use crate::class::parse_test::{cmd, err};
    assert_eq!(
        cmd::<PartAdd>("part add -t efi -s 64m -b 2048 -i 2 -l esp vtbd1"),
        PartAdd {
            provider: "vtbd1".into(),
            type_guid: Guid::EFI_SYSTEM,
            size_bytes: Some(64 << 20),
            start_lba: Some(2048),
            index: Some(2),
            label: Some("esp".into()),
        }
    );
    assert_eq!(
        cmd::<PartDelete>("part delete -i 4 vtbd0"),
        PartDelete {
            provider: "vtbd0".into(),
            index: 4
        }
    );
    assert_eq!(err("part add -t bogus vtbd0").0, 13);
    assert_eq!(err("part add vtbd0").0, 6);
    assert_eq!(err("part delete vtbd0").0, 6);
    assert_eq!(err("part frob vtbd0").0, 6);
}

#[test]
fn a_table_made_by_sgdisk_is_served() {
    let dir = std::env::temp_dir().join(format!("strata-part-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sg.img");
    std::fs::write(&path, vec![0u8; DISK as usize]).unwrap();
    let st = std::process::Command::new("sgdisk")
        .args(["-n", "1:2048:+1M", "-c", "1:alpha", "-t", "1:8300"])
        .args(["-n", "3:0:+2M", "-c", "3:gamma", "-t", "3:a503"])
        .arg(&path)
        .output()
        .expect("sgdisk (Debian package gdisk)");
    assert!(st.status.success(), "{st:?}");
    let img = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let (s, _) = boot(&[img]);
    assert_eq!(size_of(&s, "vtbd0p1"), 1 << 20);
    assert_eq!(size_of(&s, "vtbd0p3"), 2 << 20);
    let g = s.find_geom(CLASS_NAME, "vtbd0").unwrap();
    let conf = s.dumpconf(g);
    assert_eq!(conf["partitions"][1]["label"], "gamma");
    assert_eq!(conf["partitions"][1]["type"], "freebsd-ufs");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// A partition behaves like a flat array through reads, writes,
    /// discards, zeroing and flushes, with the disk completing out of
    /// order; nothing outside the partition is touched.
    #[test]
    fn a_partition_behaves_like_a_flat_array(ops in testing::ops_all(4096, 64, 48)) {
        let (mut s, disks) = boot(&[image(&three())]);
        let before = disks[0].contents();
        let c = s.open("vtbd0p2", Access::READ_WRITE).unwrap();
        let ops: Vec<Op> = ops.iter().map(|o| o.clip(4096)).collect();
        testing::run_model(&mut s, c, &ops, &[]);
        let after = disks[0].contents();
        let (from, to) = (4096 * 512, 8192 * 512);
        prop_assert!(before[..from] == after[..from]);
        prop_assert!(before[to..] == after[to..]);
    }
}
