use super::luks::{self, Header, LuksError};
use super::*;
use crate::config::parse_line;
use crate::stack::Access;
use crate::testing::{self, FakeDiskHandle};
use alloc::string::ToString;
use alloc::vec;
use proptest::prelude::*;

fn apply(s: &mut Stack, line: &str) -> Result<(), CtlError> {
    ctl::apply(s, &parse_line(line, 1).unwrap().unwrap())
}

/// A stack over one 4 MiB disk with the generator seeded, and vtbd0
/// formatted with passphrase "pw".
fn formatted() -> (Stack, Vec<FakeDiskHandle>) {
    let (mut s, disks) = testing::stack_with_disks(1, 4 << 20, 512);
    s.add_entropy(b"tests");
    apply(&mut s, "eli init -i 1 -p pw vtbd0").unwrap();
    (s, disks)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_header_round_trips_and_opens_only_with_its_passphrase() {
    let mut h = Header::layout(Hash::Sha256, 64, [7; 32], String::from("0-1-2"));
    let key: Vec<u8> = (0..64).collect();
    h.set_key_digest(&key, 1000);
    let stripes = vec![9u8; 64 * 3999];
    let (slot, material) = h.add_slot(None, &key, b"secret", 1000, [3; 32], &stripes).unwrap();
    assert_eq!(slot, 0);
    let bytes = h.to_bytes();
    let back = Header::parse(&bytes, 1 << 20).unwrap();
    assert_eq!(back, h);
    assert_eq!(back.payload_offset, 4096, "slots at 4 KiB, payload at 1 MiB");
    let mut vol = vec![0u8; back.keys_end() as usize];
    vol[..bytes.len()].copy_from_slice(&bytes);
    let at = back.slots[0].offset as usize * 512;
    vol[at..at + material.len()].copy_from_slice(&material);
    assert_eq!(back.unlock(&vol, b"secret").unwrap(), (key.clone(), 0));
    assert_eq!(back.unlock(&vol, b"Secret"), Err(LuksError::WrongPassphrase));
    // The material on disk is not the split key in the clear.
    assert!(!contains(&vol, &key[..16]));
}

#[test]
fn damaged_or_foreign_headers_are_refused_with_their_cause() {
    let mut h = Header::layout(Hash::Sha256, 64, [7; 32], String::from("u"));
    h.set_key_digest(&[1; 64], 1000);
    let good = h.to_bytes();
    assert_eq!(Header::parse(&[0; 600], 1 << 20), Err(LuksError::NotLuks));
    let mut b = good;
    b[7] = 2;
    assert_eq!(Header::parse(&b, 1 << 20), Err(LuksError::Version(2)));
    let mut b = good;
    b[40..52].copy_from_slice(b"cbc-essiv:sh");
    assert!(matches!(Header::parse(&b, 1 << 20), Err(LuksError::Unsupported(_))));
    // A payload beyond the device.
    assert!(matches!(Header::parse(&good, 100), Err(LuksError::Corrupt(_))));
}

proptest! {
    /// Whatever the bytes, parsing answers (no panic), and what parses
    /// writes back to the same header.
    #[test]
    fn parsing_any_bytes_never_panics(mut b in proptest::collection::vec(any::<u8>(), 592..700), magic in any::<bool>(), sectors in 0u64..1 << 22) {
        if magic {
            b[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x01");
        }
        if let Ok(h) = Header::parse(&b, sectors) {
            prop_assert_eq!(Header::parse(&h.to_bytes(), sectors), Ok(h.clone()));
            let _ = h.keys_end();
        }
    }

    /// The splitter merges back what it split, for any key and stripes.
    #[test]
    fn af_merge_undoes_af_split(key in proptest::collection::vec(any::<u8>(), 32..=32), fill in any::<u8>(), hash in 0..3u8) {
        let hash = [Hash::Sha1, Hash::Sha256, Hash::Sha512][hash as usize];
        let random = vec![fill; 32 * 3999];
        let s = luks::af_split(hash, &key, &random);
        prop_assert_eq!(luks::af_merge(hash, &s, 32), key);
    }
}

#[test]
fn data_is_enciphered_on_disk_and_reads_back() {
    let (mut s, disks) = formatted();
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
    let c = s.open("vtbd0.eli", Access::READ_WRITE).unwrap();
    let p = s.consumer_provider(c);
    assert_eq!(s.provider(p).spec.media_size, (4 << 20) - (2 << 20));
    let data: Vec<u8> = b"PLAINTEXT-PATTERN-".iter().copied().cycle().take(65536).collect();
    let sent = testing::write_bio(4096, &data);
    let (back, r) = testing::io(&mut s, c, sent);
    assert_eq!(r, Ok(()));
    // The writer's pages are unchanged: the cipher wrote into bounce pages.
    assert!(testing::bio_bytes(&back) == data);
    testing::flush(&mut s, c).unwrap();
    // (Tasting read the new provider's first and last sectors.)
    let tasted = s.provider(p).stats.data.bytes_decrypted();
    assert!(testing::read(&mut s, c, 4096, 65536).unwrap() == data);
    let raw = disks[0].durable();
    assert!(!contains(&raw, b"PLAINTEXT-PATTERN-"), "plaintext on the disk");
    let st = &s.provider(p).stats.data;
    assert_eq!(st.bytes_encrypted(), 65536, "each byte written enciphered once");
    assert_eq!(st.bytes_decrypted() - tasted, 65536);
}

#[test]
fn init_z_makes_every_sector_read_zeroes() {
    let (mut s, _disks) = testing::stack_with_disks(1, 4 << 20, 512);
    s.add_entropy(b"tests");
    apply(&mut s, "eli init -z -i 1 -p pw vtbd0").unwrap();
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
    let c = s.open("vtbd0.eli", Access::READ).unwrap();
    let size = s.provider(s.consumer_provider(c)).spec.media_size as usize;
    assert!(testing::read(&mut s, c, 0, size).unwrap().iter().all(|&b| b == 0));
    // Without -z a fresh volume reads what the cipher makes of zeroes.
    let (mut s, _disks) = formatted();
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
    let c = s.open("vtbd0.eli", Access::READ).unwrap();
    assert!(testing::read(&mut s, c, 0, 4096).unwrap().iter().any(|&b| b != 0));
}

#[test]
fn a_wrong_passphrase_is_refused_names_the_provider_and_writes_nothing() {
    let (mut s, disks) = formatted();
    let before = disks[0].contents();
    let writes = disks[0].stats().writes;
    let e = apply(&mut s, "eli attach -p nope vtbd0").unwrap_err().to_string();
    assert!(e.contains("vtbd0") && e.contains("wrong passphrase"), "{e}");
    assert!(s.find_provider("vtbd0.eli").is_none());
    assert_eq!(disks[0].stats().writes, writes);
    assert!(disks[0].contents() == before);
    // The provider is free again: the right passphrase opens it.
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
    assert!(s.find_provider("vtbd0.eli").is_some());
}

#[test]
fn init_twice_keeps_the_volume_and_refuses_another_passphrase() {
    let (mut s, disks) = formatted();
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
    let c = s.open("vtbd0.eli", Access::READ_WRITE).unwrap();
    testing::write(&mut s, c, 0, &[0x42; 4096]).unwrap();
    testing::flush(&mut s, c).unwrap();
    s.close(c).unwrap();
    apply(&mut s, "eli detach vtbd0").unwrap();
    assert!(s.settle(1000));
    let before = disks[0].contents();
    // A config file's second boot: the same line finds the volume.
    apply(&mut s, "eli init -i 1 -p pw vtbd0").unwrap();
    assert!(s.settle(1000));
    let e = apply(&mut s, "eli init -i 1 -p other vtbd0").unwrap_err().to_string();
    assert!(e.contains("vtbd0") && e.contains("-f"), "{e}");
    assert!(s.settle(1000));
    assert!(disks[0].contents() == before, "nothing written");
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
    let c = s.open("vtbd0.eli", Access::READ).unwrap();
    assert_eq!(testing::read(&mut s, c, 0, 4096).unwrap(), vec![0x42; 4096]);
}

/// A header with the LUKS magic that Strata cannot open (here LUKS2) is
/// left alone by `init` without `-f`, and named in the refusal.
#[test]
fn init_refuses_to_overwrite_a_luks_volume_it_cannot_read() {
    let (mut s, disks) = testing::stack_with_disks(1, 4 << 20, 512);
    s.add_entropy(b"tests");
    let mut head = vec![0u8; 4096];
    head[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x02");
    disks[0].write_at(0, &head);
    let before = disks[0].contents();
    let e = apply(&mut s, "eli init -i 1 -p pw vtbd0").unwrap_err().to_string();
    assert!(e.contains("vtbd0") && e.contains("LUKS version 2") && e.contains("-f"), "{e}");
    assert!(s.settle(1000));
    assert!(disks[0].contents() == before, "a LUKS2 volume was overwritten");
    apply(&mut s, "eli init -f -i 1 -p pw vtbd0").unwrap();
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
}

#[test]
fn key_slots_are_added_and_removed() {
    let (mut s, _disks) = formatted();
    assert!(apply(&mut s, "eli addkey -i 1 -p two vtbd0").unwrap_err().to_string().contains("not attached"));
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
    apply(&mut s, "eli addkey -i 1 -p two vtbd0").unwrap();
    apply(&mut s, "eli addkey -i 1 -n 5 -k sec vtbd0.eli").unwrap_err();
    s.set_secret("sec", b"three");
    apply(&mut s, "eli addkey -i 1 -n 5 -k sec vtbd0.eli").unwrap();
    let e = apply(&mut s, "eli addkey -i 1 -n 5 -p four vtbd0").unwrap_err();
    assert!(e.to_string().contains("slots"), "{e}");
    apply(&mut s, "eli delkey -n 0 vtbd0").unwrap();
    apply(&mut s, "eli detach vtbd0").unwrap();
    assert!(s.settle(1000));
    assert!(apply(&mut s, "eli attach -p pw vtbd0").is_err(), "slot 0 is gone");
    assert!(s.settle(1000));
    apply(&mut s, "eli attach -p three vtbd0").unwrap();
    apply(&mut s, "eli delkey -n 1 vtbd0").unwrap();
    let e = apply(&mut s, "eli delkey -n 5 vtbd0").unwrap_err();
    assert!(e.to_string().contains("last key slot"), "{e}");
    apply(&mut s, "eli detach vtbd0").unwrap();
    assert!(s.settle(1000));
    assert!(apply(&mut s, "eli attach -p two vtbd0").is_err());
    assert!(s.settle(1000));
    apply(&mut s, "eli attach -k sec vtbd0").unwrap();
}

#[test]
fn keys_are_refused_without_entropy() {
    let (mut s, disks) = testing::stack_with_disks(1, 4 << 20, 512);
    let e = apply(&mut s, "eli init -i 1 -p pw vtbd0").unwrap_err().to_string();
    assert!(e.contains("entropy"), "{e}");
    assert_eq!(disks[0].stats().writes, 0);
}

#[test]
fn verbs_parse_and_errors_name_the_column() {
    use crate::class::parse_test::err;
    assert_eq!(err("eli init vtbd0").1, "eli init: give -p PASSPHRASE or -k SECRET");
    assert_eq!(err("eli attach -p a -k b vtbd0").0, 17);
    assert!(err("eli delkey vtbd0").1.contains("-n SLOT"));
    assert!(err("eli init -s 48 -p x vtbd0").1.contains("32"));
    assert!(err("eli frob vtbd0").1.contains("unknown eli verb"));
    // The passphrase never shows in a command's Debug text.
    let line = parse_line("eli attach -p hunter2 vtbd0", 1).unwrap().unwrap();
    assert!(!format!("{line:?}").contains("hunter2"));
}

/// A read whose page ranges split sectors (an NBD receive buffer can
/// look like this) is deciphered whole.
#[test]
fn reads_over_ranges_that_split_sectors_decipher() {
    let (mut s, _disks) = formatted();
    apply(&mut s, "eli attach -p pw vtbd0").unwrap();
    let c = s.open("vtbd0.eli", Access::READ_WRITE).unwrap();
    let data = testing::pattern(9, 0, 8192);
    testing::write(&mut s, c, 0, &data).unwrap();
    let mut sg = SgList::new();
    let mut left = 8192u32;
    for len in [700u32, 1, 511, 3000, 100] {
        sg.push(PageRef { page: Page::new_zeroed(), offset: 13, len });
        left -= len;
    }
    sg.push(PageRef { page: Page::new_zeroed(), offset: 0, len: left });
    let (bio, r) = testing::io(&mut s, c, Bio::with_data(BioCmd::Read, 0, sg));
    assert_eq!(r, Ok(()));
    assert!(testing::bio_bytes(&bio) == data);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// An eli provider behaves like a flat array through reads, writes
    /// and flushes completing out of order.
    #[test]
    fn behaves_like_a_flat_array(ops in testing::ops_rw(4096, 64, 60)) {
        let (mut s, disks) = formatted();
        apply(&mut s, "eli attach -p pw vtbd0").unwrap();
        let c = s.open("vtbd0.eli", Access::READ_WRITE).unwrap();
        testing::run_model(&mut s, c, &ops, &disks);
    }
}
