use super::format::{self as fmt, Header, DATA_START, PER_ZONE, ZONE};
use super::*;
use crate::config::parse_line;
use crate::stack::Access;
use crate::testing::{self, FakeDiskHandle, Survivors};
use alloc::string::ToString;
use alloc::vec;
use proptest::prelude::*;

fn apply(s: &mut Stack, line: &str) -> Result<(), CtlError> {
    ctl::apply(s, &parse_line(line, 1).unwrap().unwrap())
}

const DISK: u64 = 2 << 20;

/// A stack over one 2 MiB disk with the generator seeded, and vtbd0
/// formatted with passphrase "pw".
fn formatted() -> (Stack, Vec<FakeDiskHandle>) {
    let (mut s, disks) = testing::stack_with_disks(1, DISK, 512);
    s.add_entropy(b"tests");
    apply(&mut s, "gbde init -i 1 -p pw vtbd0").unwrap();
    (s, disks)
}

fn attached(s: &mut Stack) -> ConsumerId {
    apply(s, "gbde attach -p pw vtbd0").unwrap();
    s.open("vtbd0.bde", Access::READ_WRITE).unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn data_is_enciphered_with_a_new_key_per_write_and_reads_back() {
    let (mut s, disks) = formatted();
    let c = attached(&mut s);
    let p = s.consumer_provider(c);
    let zones = (DISK - DATA_START) / ZONE;
    assert_eq!(s.provider(p).spec.media_size, zones * PER_ZONE * 512);
    // A fresh volume reads zeroes.
    assert!(testing::read(&mut s, c, 0, 65536).unwrap().iter().all(|&b| b == 0));
    let data: Vec<u8> = b"PLAINTEXT-PATTERN-".iter().copied().cycle().take(65536).collect();
    let (back, r) = testing::io(&mut s, c, testing::write_bio(4096, &data));
    assert_eq!(r, Ok(()));
    assert!(testing::bio_bytes(&back) == data, "the writer's pages are unchanged");
    testing::flush(&mut s, c).unwrap();
    assert!(testing::read(&mut s, c, 4096, 65536).unwrap() == data);
    let raw = disks[0].durable();
    assert!(!contains(&raw, b"PLAINTEXT-PATTERN-"), "plaintext on the disk");
    // The same bytes written again are enciphered anew (a fresh key).
    let at = Header::data_at(4096 / 512) as usize;
    let before = raw[at..at + 512].to_vec();
    testing::write(&mut s, c, 4096, &data[..512]).unwrap();
    testing::flush(&mut s, c).unwrap();
    assert_ne!(disks[0].durable()[at..at + 512], before[..]);
    assert!(testing::read(&mut s, c, 4096, 512).unwrap() == data[..512]);
    // Encryption counted once per byte written.
    let st = &s.provider(p).stats.data;
    assert_eq!(st.bytes_encrypted(), 65536 + 512);
}

#[test]
fn a_volume_reopens_after_detach_with_its_data() {
    let (mut s, disks) = formatted();
    let c = attached(&mut s);
    let data = testing::pattern(3, 0, 3 * 24576);
    testing::write(&mut s, c, 512, &data).unwrap();
    testing::flush(&mut s, c).unwrap();
    s.close(c).unwrap();
    apply(&mut s, "gbde detach vtbd0").unwrap();
    let (mut s2, _) = testing::stack_from_images(&[disks[0].durable()], 512);
    s2.add_entropy(b"again");
    apply(&mut s2, "gbde attach -p pw vtbd0").unwrap();
    let c2 = s2.open("vtbd0.bde", Access::READ).unwrap();
    assert!(testing::read(&mut s2, c2, 512, data.len()).unwrap() == data);
}

#[test]
fn a_wrong_passphrase_is_refused_names_the_provider_and_writes_nothing() {
    let (mut s, disks) = formatted();
    let before = disks[0].contents();
    let e = apply(&mut s, "gbde attach -p nope vtbd0").unwrap_err().to_string();
    assert!(e.contains("vtbd0") && e.contains("wrong passphrase"), "{e}");
    assert!(s.find_provider("vtbd0.bde").is_none());
    assert!(disks[0].contents() == before);
    // And the volume still opens with the right one.
    attached(&mut s);
}

#[test]
fn init_twice_keeps_the_volume_and_refuses_another_passphrase() {
    let (mut s, disks) = formatted();
    let c = attached(&mut s);
    testing::write(&mut s, c, 0, &[0x42; 4096]).unwrap();
    testing::flush(&mut s, c).unwrap();
    s.close(c).unwrap();
    apply(&mut s, "gbde detach vtbd0").unwrap();
    let before = disks[0].contents();
    apply(&mut s, "gbde init -i 1 -p pw vtbd0").unwrap();
    assert!(disks[0].contents() == before, "init of an initialised volume wrote");
    let e = apply(&mut s, "gbde init -i 1 -p other vtbd0").unwrap_err().to_string();
    assert!(e.contains("does not open"), "{e}");
    assert!(disks[0].contents() == before);
    let c = attached(&mut s);
    assert_eq!(testing::read(&mut s, c, 0, 4096).unwrap(), vec![0x42; 4096]);
}

#[test]
fn lock_sectors_are_set_and_nuked() {
    let (mut s, disks) = formatted();
    attached(&mut s);
    apply(&mut s, "gbde setkey -i 1 -p second vtbd0").unwrap();
    apply(&mut s, "gbde setkey -i 1 -n 3 -p third vtbd0.bde").unwrap();
    let e = apply(&mut s, "gbde nuke -n 2 vtbd0").unwrap_err().to_string();
    assert!(e.contains("not in use"), "{e}");
    apply(&mut s, "gbde nuke -n 0 vtbd0").unwrap();
    apply(&mut s, "gbde nuke -n 1 vtbd0").unwrap();
    let e = apply(&mut s, "gbde nuke -n 3 vtbd0").unwrap_err().to_string();
    assert!(e.contains("last"), "{e}");
    let img = disks[0].durable();
    let locks = &img[512..512 * 5];
    assert_eq!(fmt::unlock(locks, b"pw"), Err(fmt::FormatError::WrongPassphrase));
    assert_eq!(fmt::unlock(locks, b"second"), Err(fmt::FormatError::WrongPassphrase));
    assert!(matches!(fmt::unlock(locks, b"third"), Ok((_, 3))));
    let (mut s2, _) = testing::stack_from_images(&[img], 512);
    s2.add_entropy(b"x");
    assert!(apply(&mut s2, "gbde attach -p pw vtbd0").is_err());
    apply(&mut s2, "gbde attach -p third vtbd0").unwrap();
}

#[test]
fn keys_are_refused_without_entropy() {
    let (mut s, disks) = testing::stack_with_disks(1, DISK, 512);
    let e = apply(&mut s, "gbde init -i 1 -p pw vtbd0").unwrap_err().to_string();
    assert!(e.contains("entropy"), "{e}");
    assert!(disks[0].contents().iter().all(|&b| b == 0));
}

#[test]
fn verbs_parse_and_refuse_what_they_do_not_take() {
    for bad in ["gbde init vtbd0", "gbde init -s 32 -p x vtbd0", "gbde nuke vtbd0", "gbde setkey -n 4 -p x vtbd0", "gbde frob vtbd0"] {
        assert!(parse_line(bad, 1).is_err(), "{bad}");
    }
    assert!(parse_line("gbde attach -k disk vtbd0", 1).is_ok());
}

#[test]
fn a_damaged_key_sector_fails_its_sectors_and_only_them() {
    let (mut s, disks) = formatted();
    let c = attached(&mut s);
    testing::write(&mut s, c, 0, &testing::pattern(1, 0, 2 * 24576)).unwrap();
    testing::flush(&mut s, c).unwrap();
    s.close(c).unwrap();
    apply(&mut s, "gbde detach vtbd0").unwrap();
    let mut img = disks[0].durable();
    // Zone 0's first key sector (data sectors 0..6).
    img[DATA_START as usize + 7] ^= 0x10;
    let (mut s2, _) = testing::stack_from_images(&[img], 512);
    s2.add_entropy(b"x");
    let c = attached(&mut s2);
    assert!(testing::read(&mut s2, c, 0, 512).is_err());
    let zone1 = testing::read(&mut s2, c, 24576, 24576).unwrap();
    assert!(zone1 == testing::pattern(1, 0, 2 * 24576)[24576..]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// A gbde provider behaves like a flat array through reads, writes
    /// (rewrites of the same sectors, across zones) and flushes, with the
    /// disk completing out of order.
    #[test]
    fn behaves_like_a_flat_array(ops in testing::ops_rw(400, 120, 60)) {
        let (mut s, disks) = formatted();
        let c = attached(&mut s);
        testing::run_model(&mut s, c, &ops, &disks);
    }
}


/// Attaches vtbd0.bde over the stack's disk and opens it.
fn open_bde(s: &mut Stack, _disks: &[FakeDiskHandle]) -> testing::Opened {
    s.add_entropy(b"after the cut");
    apply(s, "gbde attach -p pw vtbd0").unwrap();
    let c = s.open("vtbd0.bde", Access::READ_WRITE).unwrap();
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    let before = testing::read(s, c, 0, size).unwrap();
    (c, before)
}

/// Cuts the power after every device completion of a write sequence
/// (writes within a zone, across zones, rewrites of the same sectors with
/// and without a flush between, FUA), with the unflushed writes lost or
/// kept, reattaches, and checks that every sector reads its old or new
/// contents and that nothing acknowledged and flushed (or FUA) is lost;
/// then does the same from the disk a first cut left, where records hold
/// two keys (the next boot reads the sectors to settle them).
#[test]
fn every_power_cut_of_a_write_sequence_reads_old_or_new() {
    use testing::CrashStep as Step;
    let (mut s, disks) = formatted();
    let c = attached(&mut s);
    testing::write(&mut s, c, 0, &testing::pattern(200, 0, 8 * 24576)).unwrap();
    testing::flush(&mut s, c).unwrap();
    s.close(c).unwrap();
    apply(&mut s, "gbde detach vtbd0").unwrap();
    let base = vec![disks[0].durable()];
    let z = 24576u64;
    let steps = [
        Step::Write { at: 1024, len: 2048, seed: 1, fua: false },
        Step::Write { at: 1024, len: 1024, seed: 8, fua: false },
        Step::Write { at: z - 1024, len: 4096, seed: 2, fua: false },
        Step::Write { at: 1536, len: 512, seed: 3, fua: false },
        Step::Flush,
        Step::Write { at: 2 * z, len: z, seed: 4, fua: false },
        Step::Write { at: 1024, len: 8192, seed: 5, fua: true },
        Step::Write { at: 2 * z + 4096, len: 512, seed: 6, fua: false },
        Step::Flush,
        Step::Write { at: 5 * z + 512, len: 1024, seed: 7, fua: false },
    ];
    let mut firsts = Vec::new();
    let mut cut = 0;
    loop {
        let seeds = (0..6u64).map(|k| Survivors::Some(k << 32 | cut as u64));
        for keep in [Survivors::None, Survivors::All].into_iter().chain(seeds) {
            let (images, expect, _) = testing::run_to_cut(&base, &mut open_bde, &mut |_| {}, &steps, cut, keep);
            let (mut s, _) = testing::stack_from_images(&images, 512);
            let (c, got) = open_bde(&mut s, &[]);
            expect.check(&got, &format!("cut {cut} keep {keep:?}"));
            // A second sequence over what the cut left: rewrites of the
            // records the cut left with two keys.
            if cut % 5 == 0 && matches!(keep, Survivors::Some(_)) {
                firsts.push(images.clone());
            }
            let _ = c;
        }
        let (_, _, finished) = testing::run_to_cut(&base, &mut open_bde, &mut |_| {}, &steps, cut, Survivors::None);
        if finished {
            break;
        }
        cut += 1;
    }
    assert!(cut > 20, "the sequence took only {cut} device completions");
    for (n, imgs) in firsts.iter().enumerate() {
        for cut in [0, 3, 7, 12, 20, 40] {
            let (images, expect, _) = testing::run_to_cut(imgs, &mut open_bde, &mut |_| {}, &steps, cut, Survivors::Some(cut as u64));
            let (mut s, _) = testing::stack_from_images(&images, 512);
            let (_, got) = open_bde(&mut s, &[]);
            expect.check(&got, &format!("second run from image {n}, cut {cut}"));
        }
    }
}
