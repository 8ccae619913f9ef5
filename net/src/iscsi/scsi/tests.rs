//! Byte-level tests of the SCSI layer: CDB checks, sense data, VPD and
//! mode pages, reservations, the command table, and a property test that
//! feeds arbitrary CDBs, parameter lists and bio results through tasks.
//! Bios run against a flat in-memory disk.

use super::sense::*;
use super::*;
use crate::session::ExportInfo;
use alloc::vec;
use alloc::vec::Vec;
use geom::bio::{BioError, Extent};
use geom::page::DataCounters;
use proptest::prelude::*;

const BS: usize = 512;
const BLOCKS: u64 = 8192;
const TARGET: &str = "iqn.2024-01.org.strata:disk";

fn export() -> ExportInfo {
    ExportInfo {
        description: String::new(),
        max_block: 0,
        keeps_state: true,
        ..ExportInfo::md("d", BLOCKS * BS as u64)
    }
}

/// A flat disk with per-sector allocation, executing bios.
struct Disk {
    data: Vec<u8>,
    mapped: Vec<bool>,
    log: Vec<(BioCmd, u64, u64, bool)>,
}

impl Disk {
    fn new(len: usize) -> Disk {
        Disk {
            data: vec![0; len],
            mapped: vec![true; len / BS],
            log: Vec::new(),
        }
    }

    fn exec(&mut self, bio: &mut Bio) -> BioResult {
        self.log.push((bio.cmd, bio.offset, bio.length, bio.fua));
        let c = DataCounters::new();
        let end = bio
            .offset
            .checked_add(bio.length)
            .ok_or(BioError::OutOfRange)?;
        if bio.cmd != BioCmd::Flush && end > self.data.len() as u64 {
            return Err(BioError::OutOfRange);
        }
        let (o, e) = (bio.offset as usize, end as usize);
        match bio.cmd {
            BioCmd::Read => bio.sg.copy_from_slice(0, &self.data[o..e], &c).unwrap(),
            BioCmd::Write => {
                bio.sg.copy_to_slice(0, &mut self.data[o..e], &c).unwrap();
                self.mapped[o / BS..e.div_ceil(BS)].fill(true);
            }
            BioCmd::Discard | BioCmd::WriteZeroes => {
                self.data[o..e].fill(0);
                if bio.cmd == BioCmd::Discard || !bio.no_hole {
                    self.mapped[o / BS..e / BS].fill(false);
                }
            }
            BioCmd::Flush => {}
            BioCmd::GetAllocation => {
                for s in o / BS..e.div_ceil(BS) {
                    let hole = !self.mapped[s];
                    match bio.extents.last_mut() {
                        Some(x) if x.hole == hole => x.length += BS as u64,
                        _ => bio.extents.push(Extent {
                            length: BS as u64,
                            hole,
                            zero: hole,
                        }),
                    }
                }
            }
        }
        Ok(())
    }
}

/// One logical unit with its disk, and the states it had kept.
struct Lu {
    export: Option<ExportInfo>,
    state: UnitState,
    disk: Disk,
    saved: Vec<Vec<u8>>,
    /// What keeping a state answers.
    save_result: BioResult,
}

struct Out {
    status: u8,
    sense: Vec<u8>,
    data: Vec<u8>,
}

impl Out {
    fn key(&self) -> (u8, u8, u8) {
        assert_eq!(self.status, CHECK_CONDITION, "status {:#x}", self.status);
        match self.sense[0] & 0x7f {
            0x70 => (self.sense[2] & 0x0f, self.sense[12], self.sense[13]),
            0x72 => (self.sense[1], self.sense[2], self.sense[3]),
            f => panic!("sense format {f:#x}"),
        }
    }
    fn good(&self) -> &Self {
        assert_eq!(self.status, GOOD, "sense {:02x?}", self.sense);
        self
    }
}

fn nx(id: u64) -> Nexus<'static> {
    const NAMES: [&str; 3] = ["iqn.a:init0", "iqn.a:init1", "iqn.a:init2"];
    Nexus {
        initiator: NAMES[(id % 3) as usize],
        isid: [0x80, 0, 0, 0, 0, id as u8],
        tpgt: 1,
        id,
    }
}

fn cdb16(b: &[u8]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..b.len()].copy_from_slice(b);
    c
}

impl Lu {
    fn new(e: ExportInfo) -> Lu {
        let len = e.size_bytes as usize;
        Lu {
            export: Some(e),
            state: UnitState::default(),
            disk: Disk::new(len),
            saved: Vec::new(),
            save_result: Ok(()),
        }
    }

    fn run(&mut self, n: u64, cdb: &[u8], out: &[u8], din: u32) -> Out {
        self.run_with(n, cdb, out, din, |_, _| Ok(()))
    }

    /// Runs one command; `hook` may fail a bio instead of the disk.
    fn run_with(
        &mut self,
        n: u64,
        cdb: &[u8],
        out: &[u8],
        din: u32,
        mut hook: impl FnMut(&Bio, usize) -> BioResult,
    ) -> Out {
        let c = cdb16(cdb);
        let nexus = nx(n);
        let luns = [0u64, 1];
        let cmd = Command {
            cdb: &c,
            data_out_len: out.len() as u32,
            data_in_len: din,
        };
        let mut unit = Unit {
            export: self.export.as_ref(),
            lun: 0,
            target: TARGET,
            luns: &luns,
            state: &mut self.state,
        };
        let mut t = Task::new(&cmd, &mut unit, &nexus);
        if t.pages_wanted() > 0 {
            t.alloc().unwrap();
        }
        let want = t.data_out_want();
        assert!(want as usize <= out.len());
        if want > 0 {
            let sg = t.data_out_sg().expect("data-out pages");
            assert_eq!(sg.len_bytes(), u64::from(want));
            sg.copy_from_slice(0, &out[..want as usize], &DataCounters::new())
                .unwrap();
            t.data_out_done(&mut unit, &nexus);
        }
        let mut count = 0;
        while !t.is_done() {
            if let Some(state) = t.take_save() {
                assert!(t.next_bio(&mut unit).is_none(), "bios beside a save");
                self.saved.push(state);
                t.saved(self.save_result);
                continue;
            }
            let mut bios = Vec::new();
            while let Some(b) = t.next_bio(&mut unit) {
                bios.push(b);
            }
            assert!(!bios.is_empty(), "task stalled");
            for (tag, mut bio) in bios {
                let r = hook(&bio, count).and_then(|()| self.disk.exec(&mut bio));
                count += 1;
                t.complete(&mut unit, tag, bio, r);
            }
        }
        let r = t.response();
        let data = match r.data_in {
            DataIn::None => Vec::new(),
            DataIn::Bytes(b) => b,
            DataIn::Pages(sg) => {
                let mut v = vec![0; sg.len_bytes() as usize];
                sg.copy_to_slice(0, &mut v, &DataCounters::new()).unwrap();
                v
            }
        };
        if r.status != CHECK_CONDITION {
            assert!(r.sense.is_empty());
        }
        Out {
            status: r.status,
            sense: r.sense,
            data,
        }
    }
}

fn lu() -> Lu {
    Lu::new(export())
}

fn rw10(op: u8, lba: u32, n: u16, flags: u8) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}

fn rw16(op: u8, lba: u64, n: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const IFC: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x24, 0);
const OOB: (u8, u8, u8) = (ILLEGAL_REQUEST, 0x21, 0);

// ---- sense ----

#[test]
fn fixed_and_descriptor_sense_bytes() {
    let s = MISCOMPARE_VERIFY.with_info(0x1234);
    let f = s.to_bytes(false);
    assert_eq!(f.len(), 18);
    assert_eq!(&f[..8], &[0xf0, 0, 0x0e, 0, 0, 0x12, 0x34, 10]);
    assert_eq!((f[12], f[13]), (0x1d, 0));
    let d = s.to_bytes(true);
    assert_eq!(&d[..8], &[0x72, 0x0e, 0x1d, 0, 0, 0, 0, 12]);
    assert_eq!(&d[8..12], &[0, 0x0a, 0x80, 0]);
    assert_eq!(&d[12..20], &0x1234u64.to_be_bytes());
    assert_eq!(
        INVALID_FIELD_IN_CDB.to_bytes(true),
        vec![0x72, 5, 0x24, 0, 0, 0, 0, 0]
    );
}

// ---- INQUIRY and VPD ----

#[test]
fn standard_inquiry() {
    let mut u = lu();
    let o = u.run(0, &[0x12, 0, 0, 1, 4, 0], &[], 260);
    o.good();
    let d = &o.data;
    assert_eq!(d.len(), 96);
    assert_eq!(d[0], 0);
    assert_eq!(d[2], 6);
    assert_eq!(d[3], 0x12);
    assert_eq!(usize::from(d[4]), d.len() - 5);
    assert_eq!(d[7] & 0x02, 0x02);
    assert_eq!(&d[8..16], b"STRATA  ");
    assert!(d[16..36].iter().all(|&c| (0x20..0x7f).contains(&c)));
    let descs: Vec<u16> = (0..8)
        .map(|i| u16::from_be_bytes([d[58 + 2 * i], d[59 + 2 * i]]))
        .collect();
    assert!(descs.contains(&0x0460) && descs.contains(&0x04c0));
    // Allocation length truncates.
    let o = u.run(0, &[0x12, 0, 0, 0, 36, 0], &[], 260);
    assert_eq!(o.data.len(), 36);
}

#[test]
fn inquiry_bad_fields() {
    let mut u = lu();
    assert_eq!(u.run(0, &[0x12, 0, 0x80, 0, 255, 0], &[], 255).key(), IFC);
    assert_eq!(u.run(0, &[0x12, 1, 0x55, 0, 255, 0], &[], 255).key(), IFC);
    assert_eq!(u.run(0, &[0x12, 2, 0, 0, 255, 0], &[], 255).key(), IFC);
}

#[test]
fn missing_lun() {
    let mut u = lu();
    u.export = None;
    let o = u.run(0, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(o.good().data[0], 0x7f);
    assert_eq!(
        u.run(0, &[0, 0, 0, 0, 0, 0], &[], 0).key(),
        (ILLEGAL_REQUEST, 0x25, 0)
    );
    assert_eq!(
        u.run(0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512)
            .key()
            .1,
        0x25
    );
    let o = u.run(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(&o.good().data[..4], &16u32.to_be_bytes());
    let o = u.run(0, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!((o.good().data[2], o.data[12]), (ILLEGAL_REQUEST, 0x25));
}

fn vpd(u: &mut Lu, page: u8) -> Vec<u8> {
    let o = u.run(0, &[0x12, 1, page, 0x10, 0, 0], &[], 4096);
    o.good();
    assert_eq!(o.data[1], page);
    let len = usize::from(u16::from_be_bytes([o.data[2], o.data[3]]));
    assert_eq!(len + 4, o.data.len());
    o.data
}

#[test]
fn vpd_pages() {
    let mut u = lu();
    assert_eq!(&vpd(&mut u, 0)[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let s = vpd(&mut u, 0x80);
    assert_eq!(s.len(), 20);
    assert_eq!(&s[4..], &inquiry::serial(TARGET, 0));
    assert_ne!(inquiry::serial(TARGET, 0), inquiry::serial(TARGET, 1));
    // Device identification: walk the designators.
    let d = vpd(&mut u, 0x83);
    let mut at = 4;
    let mut kinds = Vec::new();
    while at < d.len() {
        let len = usize::from(d[at + 3]);
        kinds.push((
            d[at] & 0x0f,
            (d[at + 1] >> 4) & 3,
            d[at + 1] & 0x0f,
            d[at + 4..at + 4 + len].to_vec(),
        ));
        at += 4 + len;
    }
    assert_eq!(at, d.len());
    assert!(kinds
        .iter()
        .any(|k| k.1 == 0 && k.2 == 3 && k.3[0] >> 4 == 3));
    let port = kinds.iter().find(|k| k.1 == 1 && k.2 == 8).unwrap();
    assert!(port
        .3
        .starts_with(b"iqn.2024-01.org.strata:disk,t,0x0001\0"));
    assert_eq!(port.3.len() % 4, 0);
    assert!(kinds
        .iter()
        .any(|k| k.1 == 1 && k.2 == 4 && k.3 == [0, 0, 0, 1]));
    // Block limits.
    let b = vpd(&mut u, 0xb0);
    assert_eq!(b.len(), 64);
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    assert_eq!(be32(8), MAX_TRANSFER_BYTES / 512);
    assert_eq!(b[5], 255);
    assert_eq!(be32(24), 256);
    assert_eq!(be32(20), u32::MAX);
    assert_eq!(be32(28), 8);
    assert_eq!(
        u64::from_be_bytes(b[36..44].try_into().unwrap()),
        (1 << 30) / 512
    );
    let r = vpd(&mut u, 0xb1);
    assert_eq!(&r[4..6], &[0, 1]);
    let p = vpd(&mut u, 0xb2);
    assert_eq!(p[5], 0xe0, "LBPU, LBPWS, LBPWS10 and no LBPRZ");
    assert_eq!(p[6] & 7, 2);
    let mut e = export();
    e.can_trim = false;
    let mut u = Lu::new(e);
    let p = vpd(&mut u, 0xb2);
    assert_eq!((p[5], p[6]), (0, 0));
    assert_eq!(
        u32::from_be_bytes(vpd(&mut u, 0xb0)[24..28].try_into().unwrap()),
        0
    );
}

// ---- capacity, reads and writes ----

#[test]
fn read_capacity() {
    let mut u = lu();
    let o = u.run(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(
        o.good().data,
        [
            &(BLOCKS as u32 - 1).to_be_bytes()[..],
            &512u32.to_be_bytes()
        ]
        .concat()
    );
    assert_eq!(
        u.run(0, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[], 8).key(),
        IFC
    );
    let o = u.run(
        0,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
        32,
    );
    let d = &o.good().data;
    assert_eq!(d.len(), 32);
    assert_eq!(&d[..8], &(BLOCKS - 1).to_be_bytes());
    assert_eq!(d[13], 0, "physical block exponent 0");
    assert_eq!(d[14], 0x80);
    let o = u.run(
        0,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0],
        &[],
        32,
    );
    assert_eq!(o.good().data.len(), 12);
}

#[test]
fn write_then_read_all_sizes() {
    let mut u = lu();
    let data = pattern(4 * BS, 7);
    u.run(0, &rw10(0x2a, 10, 4, 0), &data, 0).good();
    assert_eq!(&u.disk.data[10 * BS..14 * BS], &data[..]);
    assert_eq!(
        u.run(0, &rw10(0x28, 10, 4, 0), &[], 4 * 512).good().data,
        data
    );
    assert_eq!(
        u.run(0, &rw16(0x88, 10, 4, 0), &[], 4 * 512).good().data,
        data
    );
    let mut r12 = vec![0xa8, 0, 0, 0, 0, 10, 0, 0, 0, 4, 0, 0];
    assert_eq!(u.run(0, &r12, &[], 4 * 512).good().data, data);
    r12[0] = 0xaa;
    let d2 = pattern(4 * BS, 9);
    u.run(0, &r12, &d2, 0).good();
    assert_eq!(&u.disk.data[10 * BS..14 * BS], &d2[..]);
    // READ(6) with transfer length 0 reads 256 blocks.
    assert_eq!(
        u.run(0, &[0x08, 0, 0, 0, 0, 0], &[], 1 << 20)
            .good()
            .data
            .len(),
        256 * BS
    );
    let d6 = pattern(BS, 3);
    u.run(0, &[0x0a, 0, 0, 1, 1, 0], &d6, 0).good();
    assert_eq!(&u.disk.data[BS..2 * BS], &d6[..]);
    // FUA reaches the bio.
    u.disk.log.clear();
    u.run(0, &rw16(0x8a, 0, 1, 0x08), &d6, 0).good();
    assert_eq!(u.disk.log, vec![(BioCmd::Write, 0, 512, true)]);
    // Zero blocks: no bio.
    u.disk.log.clear();
    u.run(0, &rw10(0x28, 0, 0, 0), &[], 0).good();
    assert!(u.disk.log.is_empty());
}

#[test]
fn range_and_field_checks() {
    let mut u = lu();
    assert_eq!(
        u.run(0, &rw10(0x28, BLOCKS as u32, 1, 0), &[], 512).key(),
        OOB
    );
    assert_eq!(
        u.run(0, &rw10(0x28, BLOCKS as u32 - 1, 2, 0), &[], 1024)
            .key(),
        OOB
    );
    assert_eq!(
        u.run(0, &rw10(0x28, BLOCKS as u32 + 1, 0, 0), &[], 0).key(),
        OOB
    );
    assert_eq!(u.run(0, &rw16(0x88, u64::MAX, 1, 0), &[], 512).key(), OOB);
    assert_eq!(u.run(0, &rw16(0x88, u64::MAX, 0, 0), &[], 0).key(), OOB);
    assert_eq!(
        u.run(0, &rw10(0x28, 0, 1, 0x20), &[], 512).key(),
        IFC,
        "RDPROTECT"
    );
    assert_eq!(
        u.run(0, &rw10(0x2a, 0, 1, 0x40), &[0; 512], 0).key(),
        IFC,
        "WRPROTECT"
    );
    let mut big = export();
    big.size_bytes = 1 << 30;
    let mut u = Lu::new(big);
    let n = MAX_TRANSFER_BYTES / 512;
    assert_eq!(u.run(0, &rw16(0x88, 0, n + 1, 0), &[], 0).key(), IFC);
    // DPO and FUA are accepted.
    u.run(0, &rw10(0x28, 0, 1, 0x18), &[], 512).good();
}

#[test]
fn write_data_out_sizes() {
    let mut u = lu();
    // EDTL below the transfer length: INVALID FIELD IN COMMAND IU.
    assert_eq!(
        u.run(0, &rw10(0x2a, 0, 2, 0), &[1; 512], 0).key(),
        (ILLEGAL_REQUEST, 0x0e, 0x03)
    );
    assert_eq!(u.disk.data[0], 0);
    // EDTL above it: the task takes only what it writes.
    u.run(0, &rw10(0x2a, 0, 1, 0), &[2; 1000], 0).good();
    assert_eq!(u.disk.data[511], 2);
    assert_eq!(u.disk.data[512], 0);
}

#[test]
fn read_only_unit() {
    let mut e = export();
    e.read_only = true;
    let mut u = Lu::new(e);
    let wp = (DATA_PROTECT, 0x27, 0);
    assert_eq!(u.run(0, &rw10(0x2a, 0, 1, 0), &[1; 512], 0).key(), wp);
    assert_eq!(u.run(0, &rw10(0x41, 0, 1, 0), &[1; 512], 0).key(), wp);
    assert_eq!(
        u.run(0, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24], 0)
            .key(),
        wp
    );
    u.run(0, &rw10(0x28, 0, 1, 0), &[], 512).good();
    let o = u.run(0, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
    assert_eq!(o.good().data[2], 0x90, "WP and DPOFUA");
}

#[test]
fn bio_errors_become_sense() {
    let mut u = lu();
    let o = u.run_with(0, &rw10(0x28, 0, 1, 0), &[], 512, |_, _| Err(BioError::Io));
    assert_eq!(o.key(), (MEDIUM_ERROR, 0x11, 0));
    let o = u.run_with(0, &rw10(0x2a, 0, 1, 0), &[0; 512], 0, |_, _| {
        Err(BioError::Io)
    });
    assert_eq!(o.key(), (MEDIUM_ERROR, 0x0c, 0));
    let o = u.run_with(0, &rw10(0x28, 0, 1, 0), &[], 512, |_, _| {
        Err(BioError::Orphaned)
    });
    assert_eq!(o.key(), (NOT_READY, 0x04, 0));
    let o = u.run_with(0, &rw10(0x28, 0, 1, 0), &[], 512, |_, _| {
        Err(BioError::NoMemory)
    });
    assert_eq!(o.status, BUSY);
    let o = u.run_with(0, &rw10(0x2a, 0, 1, 0), &[0; 512], 0, |_, _| {
        Err(BioError::NoSpace)
    });
    assert_eq!(o.key(), (DATA_PROTECT, 0x27, 0x07));
}

#[test]
fn sync_cache_and_prefetch() {
    let mut u = lu();
    u.disk.log.clear();
    u.run(0, &rw10(0x35, 0, 0, 0), &[], 0).good();
    assert_eq!(u.disk.log[0].0, BioCmd::Flush);
    assert_eq!(u.run(0, &rw16(0x91, BLOCKS, 1, 0), &[], 0).key(), OOB);
    u.run(0, &rw10(0x34, 0, 16, 0), &[], 0).good();
    assert_eq!(u.run(0, &rw16(0x90, BLOCKS, 1, 0), &[], 0).key(), OOB);
    let mut e = export();
    e.can_flush = false;
    let mut u = Lu::new(e);
    u.run(0, &rw10(0x35, 0, 0, 0), &[], 0).good();
    assert!(u.disk.log.is_empty());
}

#[test]
fn start_stop_unit() {
    let mut u = lu();
    u.run(0, &[0x1b, 0, 0, 0, 1, 0], &[], 0).good();
    assert_eq!(u.run(0, &[0x1b, 0, 0, 0, 2, 0], &[], 0).key(), IFC);
    u.run(0, &[0x1b, 1, 0, 0, 0x12, 0], &[], 0).good();
}

// ---- verify, compare and write, write same, unmap, lba status ----

#[test]
fn verify_modes() {
    let mut u = lu();
    let data = pattern(2 * BS, 1);
    u.run(0, &rw10(0x2a, 4, 2, 0), &data, 0).good();
    u.run(0, &rw10(0x2f, 4, 2, 0), &[], 0).good();
    u.run(0, &rw10(0x2f, 4, 2, 0x02), &data, 0).good();
    let mut bad = data.clone();
    bad[700] ^= 1;
    let o = u.run(0, &rw16(0x8f, 4, 2, 0x02), &bad, 0);
    assert_eq!(o.key(), (MISCOMPARE, 0x1d, 0));
    assert_eq!(&o.sense[3..7], &700u32.to_be_bytes());
    assert_eq!(u.run(0, &rw10(0x2f, 4, 2, 0x04), &data, 0).key(), IFC);
    assert_eq!(u.run(0, &rw10(0x2f, 4, 2, 0x20), &[], 0).key(), IFC);
    // BYTCHK 11b: one block against each.
    u.run(0, &rw10(0x2a, 20, 2, 0), &[5; 1024], 0).good();
    u.run(0, &rw10(0x2f, 20, 2, 0x06), &[5; 512], 0).good();
    assert_eq!(
        u.run(0, &rw10(0x2f, 19, 2, 0x06), &[5; 512], 0).key().0,
        MISCOMPARE
    );
}

#[test]
fn write_and_verify() {
    let mut u = lu();
    let data = pattern(3 * BS, 4);
    u.disk.log.clear();
    u.run(0, &rw10(0x2e, 8, 3, 0), &data, 0).good();
    assert_eq!(&u.disk.data[8 * BS..11 * BS], &data[..]);
    assert_eq!(
        u.disk.log,
        vec![
            (BioCmd::Write, 8 * 512, 1536, true),
            (BioCmd::Read, 8 * 512, 1536, false)
        ]
    );
    let mut c = rw16(0x8e, 8, 3, 0);
    c[1] = 0x20;
    assert_eq!(u.run(0, &c, &data, 0).key(), IFC);
}

fn caw(lba: u64, n: u8) -> Vec<u8> {
    let mut c = rw16(0x89, lba, 0, 0);
    c[13] = n;
    c
}

#[test]
fn compare_and_write() {
    let mut u = lu();
    let old = pattern(2 * BS, 2);
    u.run(0, &rw10(0x2a, 100, 2, 0), &old, 0).good();
    let new = pattern(2 * BS, 77);
    u.run(0, &caw(100, 2), &[old.clone(), new.clone()].concat(), 0)
        .good();
    assert_eq!(&u.disk.data[100 * BS..102 * BS], &new[..]);
    // Now the old data miscompares at offset 0... make it differ later.
    let mut guess = new.clone();
    guess[513] ^= 0xff;
    let o = u.run(0, &caw(100, 2), &[guess, old.clone()].concat(), 0);
    assert_eq!(o.key(), (MISCOMPARE, 0x1d, 0));
    assert_eq!(o.sense[0], 0xf0);
    assert_eq!(&o.sense[3..7], &513u32.to_be_bytes());
    assert_eq!(&u.disk.data[100 * BS..102 * BS], &new[..], "unchanged");
    // Data-Out of the wrong size, too many blocks, out of range.
    assert_eq!(
        u.run(0, &caw(100, 1), &[0; 4 * BS], 0).key(),
        (ILLEGAL_REQUEST, 0x0e, 3)
    );
    assert_eq!(
        u.run(0, &caw(100, 3), &[0; 4 * BS], 0).key(),
        (ILLEGAL_REQUEST, 0x0e, 3)
    );
    u.run(0, &caw(1000, 255), &vec![0; 510 * BS], 0).good();
    let mut big = caw(0, 0);
    big[13] = 255;
    big[1] = 0x20;
    assert_eq!(u.run(0, &big, &vec![0; 510 * BS], 0).key(), IFC);
    assert_eq!(u.run(0, &caw(BLOCKS, 1), &[0; 2 * BS], 0).key(), OOB);
}

#[test]
fn write_same_replicates_in_chunks() {
    let mut e = export();
    e.can_write_zeroes = false;
    let mut u = Lu::new(e);
    let block = pattern(BS, 5);
    let n = 5000u32; // more than one 1 MiB chunk
    u.disk.log.clear();
    u.run(0, &rw16(0x93, 10, n, 0), &block, 0).good();
    for b in 10..10 + n as usize {
        assert_eq!(&u.disk.data[b * BS..(b + 1) * BS], &block[..], "block {b}");
    }
    assert_eq!(u.disk.data[(10 + n as usize) * BS], 0);
    assert_eq!(u.disk.log.len(), 3);
    assert!(u
        .disk
        .log
        .iter()
        .all(|l| l.0 == BioCmd::Write && l.2 <= 1 << 20));
    // A zero block without write-zeroes support is written too.
    u.disk.log.clear();
    u.run(0, &rw10(0x41, 10, 4, 0), &[0; BS], 0).good();
    assert_eq!(u.disk.log[0].0, BioCmd::Write);
    assert!(u.disk.data[10 * BS..14 * BS].iter().all(|&b| b == 0));
}

#[test]
fn write_same_variants() {
    let mut u = lu();
    u.disk.log.clear();
    u.run(0, &rw10(0x41, 0, 8, 0), &[0; BS], 0).good();
    assert_eq!(u.disk.log[0].0, BioCmd::WriteZeroes);
    u.disk.log.clear();
    u.run(0, &rw10(0x41, 0, 8, 0x08), &[0; BS], 0).good();
    assert_eq!(u.disk.log, vec![(BioCmd::Discard, 0, 8 * 512, false)]);
    // UNMAP with non-zero data writes the data.
    u.disk.log.clear();
    u.run(0, &rw10(0x41, 0, 2, 0x08), &[9; BS], 0).good();
    assert_eq!(u.disk.log[0].0, BioCmd::Write);
    assert_eq!(u.disk.data[1023], 9);
    // NDOB: no Data-Out.
    u.disk.log.clear();
    u.run(0, &rw16(0x93, 0, 2, 0x09), &[], 0).good();
    assert_eq!(u.disk.log[0].0, BioCmd::Discard);
    // Zero blocks: to the end of the unit.
    u.disk.log.clear();
    u.run(0, &rw10(0x41, BLOCKS as u32 - 3, 0, 0), &[0; BS], 0)
        .good();
    assert_eq!(u.disk.log[0].2, 3 * 512);
    assert_eq!(
        u.run(0, &rw10(0x41, BLOCKS as u32 + 1, 0, 0), &[0; BS], 0)
            .key(),
        OOB
    );
    // Wrong Data-Out sizes.
    assert_eq!(
        u.run(0, &rw10(0x41, 0, 1, 0), &[0; BS / 2], 0).status,
        CHECK_CONDITION
    );
    assert_eq!(
        u.run(0, &rw10(0x41, 0, 1, 0), &[0; 2 * BS], 0).status,
        CHECK_CONDITION
    );
    assert_eq!(
        u.run(0, &rw10(0x41, 0, 1, 0x10), &[0; BS], 0).key(),
        IFC,
        "ANCHOR"
    );
    let mut e = export();
    e.can_trim = false;
    let mut u = Lu::new(e);
    assert_eq!(u.run(0, &rw10(0x41, 0, 1, 0x08), &[0; BS], 0).key(), IFC);
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
    v.extend_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for &(l, n) in descs {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

fn unmap_cdb(len: u16) -> Vec<u8> {
    let mut c = vec![0x42, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&len.to_be_bytes());
    c.push(0);
    c
}

fn lba_status(u: &mut Lu, lba: u64) -> Vec<(u64, u32, u8)> {
    let o = u.run(
        0,
        &[&[0x9e, 0x12][..], &lba.to_be_bytes(), &[0, 0, 1, 0, 0, 0]].concat(),
        &[],
        256,
    );
    let d = &o.good().data;
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, d.len());
    d[8..]
        .chunks(16)
        .map(|c| {
            (
                u64::from_be_bytes(c[..8].try_into().unwrap()),
                u32::from_be_bytes(c[8..12].try_into().unwrap()),
                c[12],
            )
        })
        .collect()
}

#[test]
fn lba_status_rounds_partial_holes_to_mapped() {
    let mut u = lu();
    let mut e = export();
    e.min_block = 4096;
    let mut u4 = Lu::new(e);
    // Sectors 8..15 of 512 bytes hole = block 1 of 4096 wholly; sectors
    // 20..23 are half a block: mapped.
    u4.disk.mapped[8..16].fill(false);
    u4.disk.mapped[20..24].fill(false);
    assert_eq!(
        lba_status(&mut u4, 0)[..3],
        [(0, 1, 0), (1, 1, 1), (2, (BLOCKS / 8 - 2) as u32, 0)]
    );
    // A provider that cannot tell: all mapped.
    u.disk.mapped.fill(true);
    assert_eq!(lba_status(&mut u, 5), vec![(5, (BLOCKS - 5) as u32, 0)]);
}

#[test]
fn unmap_and_lba_status() {
    let mut u = lu();
    u.run(0, &rw10(0x2a, 0, 64, 0), &vec![0xaa; 64 * BS], 0)
        .good();
    let list = unmap_list(&[(8, 8), (32, 4), (40, 0)]);
    u.disk.log.clear();
    u.run(0, &unmap_cdb(list.len() as u16), &list, 0).good();
    assert_eq!(
        u.disk.log,
        vec![
            (BioCmd::Discard, 8 * 512, 8 * 512, false),
            (BioCmd::Discard, 32 * 512, 4 * 512, false)
        ]
    );
    assert!(u.disk.data[8 * BS..16 * BS].iter().all(|&b| b == 0));
    assert_eq!(u.disk.data[16 * BS], 0xaa);
    assert_eq!(
        lba_status(&mut u, 0)[..4],
        [(0, 8, 0), (8, 8, 1), (16, 16, 0), (32, 4, 1)]
    );
    assert_eq!(lba_status(&mut u, 10)[0], (10, 6, 1));
    assert_eq!(lba_status(&mut u, 16)[0], (16, 16, 0));
    let o = u.run(
        0,
        &[
            &[0x9e, 0x12][..],
            &BLOCKS.to_be_bytes(),
            &[0, 0, 1, 0, 0, 0],
        ]
        .concat(),
        &[],
        256,
    );
    assert_eq!(o.key(), OOB);
    // Parameter list errors.
    assert_eq!(
        u.run(0, &unmap_cdb(4), &[0; 4], 0).key(),
        (ILLEGAL_REQUEST, 0x1a, 0)
    );
    let mut bad = unmap_list(&[(0, 1)]);
    bad[3] = 15;
    assert_eq!(
        u.run(0, &unmap_cdb(bad.len() as u16), &bad, 0).key().0,
        ILLEGAL_REQUEST
    );
    let oob = unmap_list(&[(BLOCKS - 1, 2)]);
    assert_eq!(u.run(0, &unmap_cdb(oob.len() as u16), &oob, 0).key(), OOB);
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
    let many = unmap_list(&many);
    assert_eq!(
        u.run(0, &unmap_cdb(many.len() as u16), &many, 0).key(),
        (ILLEGAL_REQUEST, 0x26, 0)
    );
    u.run(0, &unmap_cdb(0), &[], 0).good();
    assert_eq!(
        u.run(0, &[0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0)
            .key(),
        IFC
    );
    // Without trim the command does not exist.
    let mut e = export();
    e.can_trim = false;
    let mut u = Lu::new(e);
    assert_eq!(
        u.run(0, &unmap_cdb(list.len() as u16), &list, 0).key(),
        (ILLEGAL_REQUEST, 0x20, 0)
    );
}

// ---- mode pages ----

fn pages_of(d: &[u8], hdr: usize, bd: usize) -> Vec<(u8, Vec<u8>)> {
    let mut at = hdr + bd;
    let mut v = Vec::new();
    while at < d.len() {
        let len = usize::from(d[at + 1]) + 2;
        v.push((d[at] & 0x3f, d[at..at + len].to_vec()));
        at += len;
    }
    assert_eq!(at, d.len());
    v
}

#[test]
fn mode_sense() {
    let mut u = lu();
    let o = u.run(0, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
    let d = &o.good().data;
    assert_eq!(usize::from(d[0]) + 1, d.len());
    assert_eq!(d[2], 0x10);
    assert_eq!(d[3], 8);
    assert_eq!(&d[4..8], &(BLOCKS as u32).to_be_bytes());
    assert_eq!(&d[9..12], &[0, 2, 0]);
    let p = pages_of(d, 4, 8);
    assert_eq!(
        p.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 8, 0x0a, 0x1c]
    );
    assert_eq!(p[1].1[2] & 0x04, 0x04, "WCE with a flushable provider");
    assert_eq!(p[2].1[2] & 0x04, 0, "D_SENSE off");
    // One page, DBD, and MODE SENSE(10) with a long descriptor.
    let o = u.run(0, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[], 255);
    assert_eq!(o.good().data[3], 0);
    assert_eq!(pages_of(&o.data, 4, 0).len(), 1);
    let o = u.run(0, &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], &[], 256);
    let d = &o.good().data;
    assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])) + 2, d.len());
    assert_eq!((d[4], d[7]), (1, 16));
    assert_eq!(&d[8..16], &BLOCKS.to_be_bytes());
    // Changeable: only D_SENSE and SWP.
    let o = u.run(0, &[0x1a, 0x08, 0x7f, 0, 255, 0], &[], 255);
    for (code, page) in pages_of(&o.good().data, 4, 0) {
        let mask: Vec<u8> = page[2..].to_vec();
        if code == 0x0a {
            assert_eq!(mask, [0x04, 0, 0x08, 0, 0, 0, 0, 0, 0, 0]);
        } else {
            assert!(mask.iter().all(|&b| b == 0), "page {code:#x}");
        }
    }
    assert_eq!(
        u.run(0, &[0x1a, 0, 0xff, 0, 255, 0], &[], 255).key(),
        (ILLEGAL_REQUEST, 0x39, 0)
    );
    assert_eq!(u.run(0, &[0x1a, 0, 0x05, 0, 255, 0], &[], 255).key(), IFC);
    assert_eq!(u.run(0, &[0x1a, 0, 0x0a, 1, 255, 0], &[], 255).key(), IFC);
}

fn control_page(u: &mut Lu) -> Vec<u8> {
    let o = u.run(0, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[], 255);
    pages_of(&o.good().data, 4, 0).remove(0).1
}

#[test]
fn mode_select_d_sense() {
    let mut u = lu();
    u.run(1, &[0, 0, 0, 0, 0, 0], &[], 0).good();
    let mut page = control_page(&mut u);
    page[2] |= 0x04;
    let list = [&[0u8, 0, 0, 0][..], &page].concat();
    u.run(0, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list, 0)
        .good();
    assert_eq!(control_page(&mut u)[2] & 0x04, 0x04);
    // Descriptor sense from now on.
    let o = u.run(0, &rw10(0x28, BLOCKS as u32, 1, 0), &[], 512);
    assert_eq!(o.sense[0], 0x72);
    assert_eq!(o.key(), OOB);
    // The other nexus hears of it.
    assert_eq!(
        u.run(1, &[0, 0, 0, 0, 0, 0], &[], 0).key(),
        (UNIT_ATTENTION, 0x2a, 0x01)
    );
    u.run(1, &[0, 0, 0, 0, 0, 0], &[], 0).good();
    // Back, with MODE SELECT(10).
    page[2] &= !0x04;
    let list = [&[0u8, 0, 0, 0, 0, 0, 0, 0][..], &page].concat();
    u.run(
        0,
        &[0x55, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0],
        &list,
        0,
    )
    .good();
    assert_eq!(
        u.run(0, &rw10(0x28, BLOCKS as u32, 1, 0), &[], 512).sense[0],
        0x70
    );
}

#[test]
fn mode_select_refuses_other_changes() {
    let mut u = lu();
    let o = u.run(0, &[0x1a, 0x08, 0x08, 0, 255, 0], &[], 255);
    let mut caching = pages_of(&o.good().data, 4, 0).remove(0).1;
    caching[2] &= !0x04; // WCE off: not changeable
    let list = [&[0u8, 0, 0, 0][..], &caching].concat();
    let ipl = (ILLEGAL_REQUEST, 0x26, 0);
    assert_eq!(
        u.run(0, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list, 0)
            .key(),
        ipl
    );
    let mut unknown = list.clone();
    unknown[4] = 0x05;
    assert_eq!(
        u.run(0, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &unknown, 0)
            .key(),
        ipl
    );
    let short = &list[..10];
    assert_eq!(
        u.run(0, &[0x15, 0x10, 0, 0, 10, 0], short, 0).key(),
        (ILLEGAL_REQUEST, 0x1a, 0)
    );
    assert_eq!(
        u.run(0, &[0x15, 0x11, 0, 0, list.len() as u8, 0], &list, 0)
            .key(),
        IFC,
        "SP"
    );
    // A block descriptor with our block size is accepted.
    let mut page = control_page(&mut u);
    page[2] &= !0x04;
    let list = [&[0u8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 2, 0][..], &page].concat();
    u.run(0, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list, 0)
        .good();
    let mut bad = list.clone();
    bad[10] = 0x10;
    assert_eq!(
        u.run(0, &[0x15, 0x10, 0, 0, bad.len() as u8, 0], &bad, 0)
            .key(),
        ipl
    );
}

// ---- software write protect ----

const SWP_WP: (u8, u8, u8) = (DATA_PROTECT, 0x27, 0x02);

/// The Control page as libiscsi's `set_swp`/`clear_swp` send it: MODE
/// SENSE(6) of the current page with DBD, PS cleared, SWP set or clear,
/// behind a zeroed MODE SELECT(6) header; sent from nexus `n` with PF.
fn set_swp(u: &mut Lu, n: u64, on: bool) -> Out {
    let o = u.run(n, &[0x1a, 0x08, 0x4a, 0, 255, 0], &[], 255);
    let chg = pages_of(&o.good().data, 4, 0).remove(0).1;
    assert_eq!(chg[4] & 0x08, 0x08, "SWP changeable");
    let o = u.run(n, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[], 255);
    let mut page = pages_of(&o.good().data, 4, 0).remove(0).1;
    page[0] &= 0x7f;
    if on {
        page[4] |= 0x08;
    } else {
        page[4] &= !0x08;
    }
    let list = [&[0u8, 0, 0, 0][..], &page].concat();
    u.run(n, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list, 0)
}

/// Every command that writes the medium, with its Data-Out.
fn medium_writes() -> Vec<(Vec<u8>, Vec<u8>)> {
    let block = vec![0x5a; BS];
    let mut w6 = vec![0x0a, 0, 0, 4, 1, 0];
    w6.truncate(6);
    let mut w12 = vec![0xaa, 0, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0];
    w12.truncate(12);
    let mut wv12 = w12.clone();
    wv12[0] = 0xae;
    let mut caw_out = vec![0; BS];
    caw_out.extend_from_slice(&block);
    vec![
        (w6, block.clone()),
        (rw10(0x2a, 4, 1, 0), block.clone()),
        (w12, block.clone()),
        (rw16(0x8a, 4, 1, 0), block.clone()),
        (rw10(0x2e, 4, 1, 0), block.clone()),
        (wv12, block.clone()),
        (rw16(0x8e, 4, 1, 0), block.clone()),
        (rw10(0x41, 4, 1, 0), block.clone()),
        (rw16(0x93, 4, 1, 0), block.clone()),
        (rw16(0x93, 4, 1, 0x01), Vec::new()),
        (rw10(0x41, 4, 1, 0x08), vec![0; BS]),
        (unmap_cdb(24), unmap_list(&[(4, 1)])),
        (caw(4, 1), caw_out),
    ]
}

#[test]
fn software_write_protect() {
    let mut u = lu();
    // Nexus 1 is seen before the change.
    u.run(1, &[0, 0, 0, 0, 0, 0], &[], 0).good();
    for (cdb, out) in medium_writes() {
        // Every one of them writes while SWP is clear.
        u.run(0, &cdb, &out, 0).good();
    }
    let before = u.disk.data.clone();
    u.disk.log.clear();
    set_swp(&mut u, 0, true).good();
    assert_eq!(control_page(&mut u)[4] & 0x08, 0x08, "SWP reads back");
    // WP in the device-specific parameter of MODE SENSE(6) and (10).
    let o = u.run(0, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
    assert_eq!(o.good().data[2], 0x90, "WP and DPOFUA");
    let o = u.run(0, &[0x5a, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0], &[], 256);
    assert_eq!(o.good().data[3], 0x90);
    // Defaults keep SWP clear.
    let o = u.run(0, &[0x1a, 0x08, 0x8a, 0, 255, 0], &[], 255);
    assert_eq!(pages_of(&o.good().data, 4, 0)[0].1[4], 0);
    for (cdb, out) in medium_writes() {
        let o = u.run(0, &cdb, &out, 0);
        assert_eq!(o.key(), SWP_WP, "opcode {:#x}", cdb[0]);
    }
    // Reads, verifies and flushes still run.
    let o = u.run(0, &rw10(0x28, 4, 1, 0), &[], 512);
    assert_eq!(o.good().data, vec![0x5a; BS]);
    u.run(0, &rw10(0x2f, 4, 1, 0), &[], 0).good();
    u.run(0, &rw10(0x35, 0, 0, 0), &[], 0).good();
    assert!(
        u.disk
            .log
            .iter()
            .all(|l| matches!(l.0, BioCmd::Read | BioCmd::Flush)),
        "{:?}",
        u.disk.log
    );
    assert!(u.disk.data == before, "medium unchanged");
    // The other nexus hears of the change, then is refused too.
    assert_eq!(
        u.run(1, &[0, 0, 0, 0, 0, 0], &[], 0).key(),
        (UNIT_ATTENTION, 0x2a, 0x01)
    );
    assert_eq!(u.run(1, &rw10(0x2a, 4, 1, 0), &[7; BS], 0).key(), SWP_WP);
    // Descriptor sense carries the same code.
    let mut page = control_page(&mut u);
    page[2] |= 0x04;
    let list = [&[0u8, 0, 0, 0][..], &page].concat();
    u.run(1, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list, 0)
        .good();
    let o = u.run(1, &rw10(0x2a, 4, 1, 0), &[7; BS], 0);
    assert_eq!((o.sense[0], o.key()), (0x72, SWP_WP));
    page[2] &= !0x04;
    let list = [&[0u8, 0, 0, 0][..], &page].concat();
    u.run(1, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list, 0)
        .good();
    // Nexus 0 heard of both D_SENSE changes; setting SWP again changes
    // nothing, so no unit attention comes of it.
    for _ in 0..2 {
        assert_eq!(
            u.run(0, &[0, 0, 0, 0, 0, 0], &[], 0).key(),
            (UNIT_ATTENTION, 0x2a, 0x01)
        );
    }
    set_swp(&mut u, 1, true).good();
    u.run(0, &[0, 0, 0, 0, 0, 0], &[], 0).good();
    // Cleared by nexus 1 with MODE SELECT(10): nexus 0 hears of it.
    let mut page = control_page(&mut u);
    page[4] &= !0x08;
    let list = [&[0u8; 8][..], &page].concat();
    u.run(
        1,
        &[0x55, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0],
        &list,
        0,
    )
    .good();
    assert_eq!(
        u.run(0, &rw10(0x2a, 4, 1, 0), &[7; BS], 0).key(),
        (UNIT_ATTENTION, 0x2a, 0x01)
    );
    assert_eq!(control_page(&mut u)[4] & 0x08, 0);
    let o = u.run(0, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
    assert_eq!(o.good().data[2], 0x10, "WP clear");
    for (cdb, out) in medium_writes() {
        u.run(0, &cdb, &out, 0).good();
    }
    assert_eq!(&u.disk.data[4 * BS..5 * BS], &[0x5a; BS][..]);
}

#[test]
fn software_write_protect_during_data_out() {
    // A medium write that SWP overtakes (set once the command is in,
    // before its Data-Out or first bio) writes nothing.
    for (cdb, out) in medium_writes() {
        let mut u = lu();
        let c = cdb16(&cdb);
        let cmd = Command {
            cdb: &c,
            data_out_len: out.len() as u32,
            data_in_len: 0,
        };
        let nexus = nx(0);
        let mut unit = Unit {
            export: u.export.as_ref(),
            lun: 0,
            target: TARGET,
            luns: &[0],
            state: &mut u.state,
        };
        let mut t = Task::new(&cmd, &mut unit, &nexus);
        assert!(!t.is_done(), "opcode {:#x}", cdb[0]);
        t.alloc().unwrap();
        unit.state.swp = true;
        let want = t.data_out_want() as usize;
        if want > 0 {
            let sg = t.data_out_sg().unwrap();
            sg.copy_from_slice(0, &out[..want], &DataCounters::new())
                .unwrap();
            t.data_out_done(&mut unit, &nexus);
        }
        assert!(t.next_bio(&mut unit).is_none(), "opcode {:#x}", cdb[0]);
        assert!(t.is_done());
        let r = t.response();
        assert_eq!(r.status, CHECK_CONDITION);
        let key = (r.sense[2] & 0x0f, r.sense[12], r.sense[13]);
        assert_eq!(key, SWP_WP, "opcode {:#x}", cdb[0]);
        assert!(u.disk.log.is_empty());
        // Once SWP is set, the command is refused before any Data-Out is
        // asked for.
        let mut unit = Unit {
            export: u.export.as_ref(),
            lun: 0,
            target: TARGET,
            luns: &[0],
            state: &mut u.state,
        };
        let t = Task::new(&cmd, &mut unit, &nexus);
        assert!(t.is_done());
        assert_eq!((t.pages_wanted(), t.data_out_want()), (0, 0));
    }
}

#[test]
fn software_write_protect_on_read_only_export() {
    // A read-only export keeps answering 27h/00h, SWP or not.
    let mut e = export();
    e.read_only = true;
    let mut u = Lu::new(e);
    set_swp(&mut u, 0, true).good();
    let o = u.run(0, &rw10(0x2a, 0, 1, 0), &[1; BS], 0);
    assert_eq!(o.key(), (DATA_PROTECT, 0x27, 0));
    set_swp(&mut u, 0, false).good();
    let o = u.run(0, &rw10(0x2a, 0, 1, 0), &[1; BS], 0);
    assert_eq!(o.key(), (DATA_PROTECT, 0x27, 0));
    let o = u.run(0, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
    assert_eq!(o.good().data[2], 0x90);
}

// ---- unit attention, request sense, report luns ----

#[test]
fn unit_attention_after_reset() {
    let mut u = lu();
    let tur = [0u8, 0, 0, 0, 0, 0];
    u.run(0, &tur, &[], 0).good();
    u.run(1, &tur, &[], 0).good();
    u.run(2, &tur, &[], 0).good();
    u.state.lun_reset(&nx(0));
    // The nexus that asked for the reset sees it too (SAM-5 6.3.3).
    assert_eq!(u.run(0, &tur, &[], 0).key(), (UNIT_ATTENTION, 0x29, 0x03));
    u.run(0, &tur, &[], 0).good();
    // INQUIRY leaves the UA pending; REQUEST SENSE returns and clears it.
    u.run(1, &[0x12, 0, 0, 0, 36, 0], &[], 36).good();
    let o = u.run(1, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!(
        (o.good().data[2], o.data[12], o.data[13]),
        (UNIT_ATTENTION, 0x29, 0x03)
    );
    let o = u.run(1, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!((o.good().data[2], o.data[12]), (0, 0));
    // Descriptor-format REQUEST SENSE.
    let o = u.run(1, &[0x03, 1, 0, 0, 18, 0], &[], 18);
    assert_eq!(o.good().data[0], 0x72);
    assert_eq!(
        u.run(2, &rw10(0x28, 0, 1, 0), &[], 512).key(),
        (UNIT_ATTENTION, 0x29, 0x03)
    );
    u.run(2, &rw10(0x28, 0, 1, 0), &[], 512).good();
    u.state.target_reset(&nx(0));
    assert_eq!(u.run(1, &tur, &[], 0).key(), (UNIT_ATTENTION, 0x29, 0x00));
}

#[test]
fn report_luns() {
    let mut u = lu();
    let o = u.run(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(
        o.good().data,
        vec![0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    let o = u.run(0, &[0xa0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(o.good().data, vec![0; 8]);
    assert_eq!(
        u.run(0, &[0xa0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256)
            .key(),
        IFC
    );
    assert_eq!(
        u.run(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &[], 256)
            .key(),
        IFC
    );
    assert_eq!(inquiry::encode_lun(300), [0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn unknown_opcodes_and_service_actions() {
    let mut u = lu();
    assert_eq!(u.run(0, &[0xc0], &[], 0).key(), (ILLEGAL_REQUEST, 0x20, 0));
    assert_eq!(u.run(0, &[0x9e, 0x11], &[], 0).key(), IFC);
    assert_eq!(u.run(0, &[0xa3, 0x05], &[], 0).key(), IFC);
    assert_eq!(
        u.run(0, &[0x5e, 0x07, 0, 0, 0, 0, 0, 1, 0, 0], &[], 256)
            .key(),
        IFC
    );
}

// ---- REPORT SUPPORTED OPERATION CODES ----

fn rsoc(u: &mut Lu, rctd: bool, options: u8, op: u8, sa: u16) -> Out {
    let mut c = vec![0xa3, 0x0c, u8::from(rctd) << 7 | options, op];
    c.extend_from_slice(&sa.to_be_bytes());
    c.extend_from_slice(&65535u32.to_be_bytes());
    u.run(0, &c, &[], 65535)
}

#[test]
fn rsoc_matches_the_table_and_dispatch() {
    let mut u = lu();
    let o = rsoc(&mut u, false, 0, 0, 0);
    let d = &o.good().data;
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, d.len());
    assert_eq!(len / 8, opcodes::TABLE.len());
    for c in d[4..].chunks(8) {
        let (op, sa, flags) = (c[0], u16::from_be_bytes([c[2], c[3]]), c[5]);
        assert_eq!(flags & 0x02, 0, "no CTDP without RCTD");
        if flags & 1 == 0 {
            assert_eq!(sa, 0);
        }
        let cdb_len = usize::from(u16::from_be_bytes([c[6], c[7]]));
        // Each listed command is dispatched (not an unknown opcode).
        let mut cdb = vec![0u8; 16];
        cdb[0] = op;
        if flags & 1 != 0 {
            cdb[1] = sa as u8;
        }
        let r = u.run(0, &cdb, &[], 0);
        if r.status == CHECK_CONDITION {
            assert_ne!(r.key().1, 0x20, "opcode {op:#x} listed but not run");
        }
        // One-command form agrees.
        let one = rsoc(&mut u, false, if flags & 1 != 0 { 2 } else { 1 }, op, sa);
        let od = &one.good().data;
        assert_eq!(od[1] & 7, 3);
        assert_eq!(usize::from(u16::from_be_bytes([od[2], od[3]])), cdb_len);
        assert_eq!(od[4], op);
        assert_eq!(od.len(), 4 + cdb_len);
        // The wrong option for it fails, pointing at the options byte
        // (SKSV, C/D, field pointer 2), which tells initiators RSOC is
        // there and the question was wrong.
        let wrong = rsoc(&mut u, false, if flags & 1 != 0 { 1 } else { 2 }, op, sa);
        assert_eq!(wrong.key(), IFC);
        assert_eq!(wrong.sense[15..18], [0xc0, 0, 2]);
    }
    // DPO and FUA in READ(10)'s usage data.
    let o = rsoc(&mut u, false, 1, 0x28, 0);
    assert_eq!(o.good().data[5] & 0x18, 0x18);
    // Timeouts descriptors with RCTD.
    let o = rsoc(&mut u, true, 0, 0, 0);
    let d = &o.good().data;
    assert_eq!(d.len(), 4 + 20 * opcodes::TABLE.len());
    for c in d[4..].chunks(20) {
        assert_eq!(c[5] & 0x02, 0x02);
        assert_eq!(&c[8..10], &[0, 0x0a]);
    }
    let o = rsoc(&mut u, true, 3, 0x9e, 0x10);
    assert_eq!(o.good().data[1], 0x83);
    assert_eq!(o.data.len(), 4 + 16 + 12);
    let o = rsoc(&mut u, false, 1, 0xc0, 0);
    assert_eq!(o.good().data, vec![0, 1, 0, 0]);
    assert_eq!(rsoc(&mut u, false, 4, 0, 0).key(), IFC);
    // A unit without trim does not list UNMAP.
    let mut e = export();
    e.can_trim = false;
    let mut u = Lu::new(e);
    let o = rsoc(&mut u, false, 0, 0, 0);
    assert!(o.good().data[4..].chunks(8).all(|c| c[0] != 0x42));
}

// ---- reservations ----

fn prout(u: &mut Lu, n: u64, sa: u8, kind: u8, key: u64, sa_key: u64, flags: u8) -> Out {
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    u.run(n, &[0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0], &p, 0)
}

fn prin(u: &mut Lu, n: u64, sa: u8) -> Vec<u8> {
    let o = u.run(n, &[0x5e, sa, 0, 0, 0, 0, 0, 0x10, 0, 0], &[], 4096);
    o.good().data.clone()
}

fn can_read(u: &mut Lu, n: u64) -> bool {
    let o = u.run(n, &rw10(0x28, 1, 1, 0), &[], 512);
    assert!(o.status == GOOD || o.status == RESERVATION_CONFLICT);
    o.status == GOOD
}

fn can_write(u: &mut Lu, n: u64) -> bool {
    let o = u.run(n, &rw10(0x2a, 1, 1, 0), &[7; 512], 0);
    assert!(o.status == GOOD || o.status == RESERVATION_CONFLICT);
    o.status == GOOD
}

#[test]
fn pr_register_and_read_keys() {
    let mut u = lu();
    prout(&mut u, 0, 6, 0, 0, 0xaa, 0).good();
    prout(&mut u, 1, 0, 0, 0, 0xbb, 0).good();
    // Wrong key: conflict.
    assert_eq!(
        prout(&mut u, 1, 0, 0, 0x99, 0xcc, 0).status,
        RESERVATION_CONFLICT
    );
    assert_eq!(
        prout(&mut u, 2, 0, 0, 0x99, 0xcc, 0).status,
        RESERVATION_CONFLICT
    );
    let k = prin(&mut u, 0, 0);
    assert_eq!(u32::from_be_bytes(k[0..4].try_into().unwrap()), 2);
    assert_eq!(&k[4..8], &16u32.to_be_bytes());
    assert_eq!(&k[8..16], &0xaau64.to_be_bytes());
    assert_eq!(&k[16..24], &0xbbu64.to_be_bytes());
    // Registering key 0 unregistered is a no-op, generation included.
    prout(&mut u, 2, 0, 0, 0, 0, 0).good();
    assert_eq!(
        u32::from_be_bytes(prin(&mut u, 0, 0)[0..4].try_into().unwrap()),
        2
    );
    // Change and drop.
    prout(&mut u, 1, 0, 0, 0xbb, 0xcc, 0).good();
    prout(&mut u, 0, 0, 0, 0xaa, 0, 0).good();
    assert_eq!(
        &prin(&mut u, 0, 0)[4..16],
        &[&8u32.to_be_bytes()[..], &0xccu64.to_be_bytes()].concat()[..]
    );
    // Parameter list length must be 24.
    let o = u.run(0, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 20, 0], &[0; 20], 0);
    assert_eq!(o.key(), (ILLEGAL_REQUEST, 0x1a, 0));
    assert_eq!(
        prout(&mut u, 0, 6, 0, 0, 1, 0x08).key(),
        (ILLEGAL_REQUEST, 0x26, 0),
        "SPEC_I_PT"
    );
    assert_eq!(
        u.run(0, &[0x5f, 7, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24], 0)
            .key(),
        IFC
    );
}

#[test]
fn pr_out_answers_once_the_state_is_kept() {
    let mut u = lu();
    prout(&mut u, 0, 6, 0, 0, 0x10, 1).good();
    assert_eq!(u.saved.len(), 1, "one save per PERSISTENT RESERVE OUT");
    let kept = UnitState::from_bytes(&u.saved[0]).expect("a state");
    assert!(kept.persists());
    assert_eq!(kept.pr, u.state.pr);
    // A conflict changes nothing and saves nothing.
    assert_eq!(
        prout(&mut u, 1, 0, 0, 0x99, 0x11, 0).status,
        RESERVATION_CONFLICT
    );
    assert_eq!(u.saved.len(), 1);
    // A store that fails: HARDWARE ERROR, INTERNAL TARGET FAILURE.
    u.save_result = Err(BioError::Io);
    assert_eq!(
        prout(&mut u, 0, 1, pr::WE, 0x10, 0, 0).key(),
        (HARDWARE_ERROR, 0x44, 0)
    );
    // Registering again without APTPL: the state kept no longer persists.
    u.save_result = Ok(());
    prout(&mut u, 0, 6, 0, 0, 0x12, 0).good();
    let kept = UnitState::from_bytes(u.saved.last().unwrap()).unwrap();
    assert!(!kept.persists());
}

#[test]
fn aptpl_is_refused_where_no_state_is_kept() {
    let mut u = Lu::new(ExportInfo {
        keeps_state: false,
        ..export()
    });
    assert_eq!(prin(&mut u, 0, 2)[2] & 1, 0, "PTPL_C clear");
    assert_eq!(
        prout(&mut u, 0, 6, 0, 0, 5, 0x01).key(),
        (ILLEGAL_REQUEST, 0x26, 0)
    );
    assert_eq!(prin(&mut u, 0, 0)[4..8], [0; 4], "nothing registered");
    prout(&mut u, 0, 6, 0, 0, 5, 0).good();
    assert!(u.saved.is_empty(), "no save where no state is kept");
}

#[test]
fn pr_report_capabilities() {
    let mut u = lu();
    let c = prin(&mut u, 0, 2);
    assert_eq!(c.len(), 8);
    assert_eq!(&c[0..2], &[0, 8]);
    assert_eq!((c[3] >> 4) & 7, 0);
    assert_eq!(c[3] & 0x80, 0x80);
    assert_eq!((c[4], c[5]), (0xea, 0x01));
    assert_eq!(c[2] & 1, 1, "PTPL_C where the state is kept");
    prout(&mut u, 0, 6, 0, 0, 5, 0x01).good();
    assert_eq!(prin(&mut u, 0, 2)[3] & 1, 1, "PTPL_A after APTPL");
}

/// (reg read, reg write, unreg read, unreg write) of a second nexus.
fn access(kind: u8) -> (bool, bool, bool, bool) {
    let mut u = lu();
    prout(&mut u, 0, 6, 0, 0, 0x11, 0).good();
    prout(&mut u, 1, 6, 0, 0, 0x22, 0).good();
    prout(&mut u, 0, 1, kind, 0x11, 0, 0).good();
    let r = prin(&mut u, 0, 1);
    assert_eq!(&r[4..8], &16u32.to_be_bytes());
    let want_key = if kind >= 7 { 0 } else { 0x11 };
    assert_eq!(&r[8..16], &(want_key as u64).to_be_bytes());
    assert_eq!(r[21], kind);
    assert!(can_read(&mut u, 0) && can_write(&mut u, 0));
    let rr = can_read(&mut u, 1);
    let rw = can_write(&mut u, 1);
    prout(&mut u, 1, 0, 0, 0x22, 0, 0).good();
    let ur = can_read(&mut u, 1);
    let uw = can_write(&mut u, 1);
    // INQUIRY, REPORT LUNS, TUR and READ CAPACITY are always allowed.
    u.run(1, &[0x12, 0, 0, 0, 36, 0], &[], 36).good();
    u.run(1, &[0, 0, 0, 0, 0, 0], &[], 0).good();
    u.run(1, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8).good();
    prout(&mut u, 0, 2, kind, 0x11, 0, 0).good();
    assert_eq!(&prin(&mut u, 0, 1)[4..8], &0u32.to_be_bytes());
    (rr, rw, ur, uw)
}

#[test]
fn pr_access_per_type() {
    assert_eq!(access(pr::EA), (false, false, false, false));
    assert_eq!(access(pr::WE), (true, false, true, false));
    assert_eq!(access(pr::EA_RO), (true, true, false, false));
    assert_eq!(access(pr::WE_RO), (true, true, true, false));
    assert_eq!(access(pr::EA_AR), (true, true, false, false));
    assert_eq!(access(pr::WE_AR), (true, true, true, false));
}

#[test]
fn pr_reserve_release_rules() {
    let mut u = lu();
    // Not registered: conflict.
    assert_eq!(
        prout(&mut u, 0, 1, pr::WE, 0x11, 0, 0).status,
        RESERVATION_CONFLICT
    );
    prout(&mut u, 0, 6, 0, 0, 0x11, 0).good();
    prout(&mut u, 1, 6, 0, 0, 0x22, 0).good();
    assert_eq!(prout(&mut u, 0, 1, 0x02, 0x11, 0, 0).key(), IFC, "bad type");
    assert_eq!(
        prout(&mut u, 0, 1, 0x11, 0x11, 0, 0).key(),
        IFC,
        "bad scope"
    );
    prout(&mut u, 0, 1, pr::WE, 0x11, 0, 0).good();
    prout(&mut u, 0, 1, pr::WE, 0x11, 0, 0).good();
    assert_eq!(
        prout(&mut u, 0, 1, pr::EA, 0x11, 0, 0).status,
        RESERVATION_CONFLICT
    );
    assert_eq!(
        prout(&mut u, 1, 1, pr::WE, 0x22, 0, 0).status,
        RESERVATION_CONFLICT
    );
    // A non-holder's release does nothing.
    prout(&mut u, 1, 2, pr::WE, 0x22, 0, 0).good();
    assert!(!can_write(&mut u, 1));
    assert_eq!(
        prout(&mut u, 0, 2, pr::EA, 0x11, 0, 0).key(),
        (ILLEGAL_REQUEST, 0x26, 0x04)
    );
    // Full status names both, the holder flagged, with TransportIDs.
    let f = prin(&mut u, 0, 3);
    let len = u32::from_be_bytes(f[4..8].try_into().unwrap()) as usize;
    assert_eq!(len + 8, f.len());
    let d = &f[8..];
    assert_eq!(&d[0..8], &0x11u64.to_be_bytes());
    assert_eq!((d[12], d[13]), (1, pr::WE));
    let tid_len = u32::from_be_bytes(d[20..24].try_into().unwrap()) as usize;
    let tid = &d[24..24 + tid_len];
    assert_eq!(tid[0], 0x45);
    assert_eq!(
        usize::from(u16::from_be_bytes([tid[2], tid[3]])) + 4,
        tid_len
    );
    assert!(tid[4..].starts_with(b"iqn.a:init0,i,0x800000000000\0"));
    assert_eq!(tid_len % 4, 0);
    let d2 = &d[24 + tid_len..];
    assert_eq!(&d2[0..8], &0x22u64.to_be_bytes());
    assert_eq!(d2[12], 0);
    // The holder unregistering releases the reservation.
    prout(&mut u, 0, 0, 0, 0x11, 0, 0).good();
    assert!(can_write(&mut u, 1));
}

#[test]
fn pr_preempt_and_clear() {
    let mut u = lu();
    for n in 0..3 {
        prout(&mut u, n, 6, 0, 0, 0x10 + n, 0).good();
    }
    prout(&mut u, 0, 1, pr::EA, 0x10, 0, 0).good();
    // Nexus 1 preempts the holder: it now holds EA, nexus 0 is gone.
    prout(&mut u, 1, 4, pr::EA, 0x11, 0x10, 0).good();
    let r = prin(&mut u, 1, 1);
    assert_eq!(&r[8..16], &0x11u64.to_be_bytes());
    assert_eq!(prin(&mut u, 1, 0)[4..8], 16u32.to_be_bytes());
    assert_eq!(
        u.run(0, &[0, 0, 0, 0, 0, 0], &[], 0).key(),
        (UNIT_ATTENTION, 0x2a, 0x05)
    );
    assert!(!can_read(&mut u, 0));
    // Preempting a key nobody has: conflict; zero key without reservation
    // holder match: invalid field.
    assert_eq!(
        prout(&mut u, 1, 4, pr::EA, 0x11, 0x99, 0).status,
        RESERVATION_CONFLICT
    );
    assert_eq!(
        prout(&mut u, 1, 5, pr::EA, 0x11, 0, 0).key(),
        (ILLEGAL_REQUEST, 0x26, 0)
    );
    // Preempt and abort a registrant without the reservation.
    prout(&mut u, 1, 5, pr::EA, 0x11, 0x12, 0).good();
    assert_eq!(prin(&mut u, 1, 0)[4..8], 8u32.to_be_bytes());
    // CLEAR drops everything.
    prout(&mut u, 0, 6, 0, 0, 0x10, 0).good();
    prout(&mut u, 1, 3, 0, 0x11, 0, 0).good();
    assert_eq!(prin(&mut u, 1, 0)[4..8], 0u32.to_be_bytes());
    assert_eq!(&prin(&mut u, 1, 1)[4..8], &0u32.to_be_bytes());
    assert_eq!(
        u.run(0, &[0, 0, 0, 0, 0, 0], &[], 0).key(),
        (UNIT_ATTENTION, 0x2a, 0x03)
    );
    assert!(can_write(&mut u, 0));
}

#[test]
fn pr_state_round_trip() {
    let mut u = lu();
    prout(&mut u, 0, 6, 0, 0, 0x10, 1).good();
    prout(&mut u, 1, 6, 0, 0, 0x11, 1).good();
    prout(&mut u, 1, 1, pr::WE_RO, 0x11, 0, 0).good();
    let b = u.state.to_bytes();
    let s = UnitState::from_bytes(&b).unwrap();
    assert_eq!(s.pr, u.state.pr);
    assert!(UnitState::from_bytes(&b[..b.len() - 1]).is_none());
    assert!(UnitState::from_bytes(b"junk").is_none());
    let mut extra = b.clone();
    extra.push(0);
    assert!(UnitState::from_bytes(&extra).is_none());
    u.state = s;
    assert!(!can_write(&mut u, 2));
    assert!(can_write(&mut u, 0));
}

#[test]
fn reserve6_release6() {
    let mut u = lu();
    let (res, rel) = ([0x16u8, 0, 0, 0, 0, 0], [0x17u8, 0, 0, 0, 0, 0]);
    u.run(0, &res, &[], 0).good();
    u.run(0, &res, &[], 0).good();
    assert_eq!(u.run(1, &res, &[], 0).status, RESERVATION_CONFLICT);
    u.run(1, &rel, &[], 0).good();
    u.run(0, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255).good();
    assert_eq!(
        u.run(1, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255).status,
        RESERVATION_CONFLICT
    );
    assert!(!can_read(&mut u, 1));
    u.run(1, &[0x12, 0, 0, 0, 36, 0], &[], 36).good();
    assert_eq!(prout(&mut u, 1, 6, 0, 0, 1, 0).status, RESERVATION_CONFLICT);
    u.run(0, &rel, &[], 0).good();
    u.run(1, &res, &[], 0).good();
    // The holder's session ends: released.
    u.state.nexus_gone(&nx(1));
    u.run(0, &res, &[], 0).good();
    // A LUN reset clears it too.
    u.state.lun_reset(&nx(1));
    // Nexus 2 was not seen before the reset: no unit attention.
    u.run(2, &[0, 0, 0, 0, 0, 0], &[], 0).good();
    assert_eq!(
        u.run(0, &[0, 0, 0, 0, 0, 0], &[], 0).key(),
        (UNIT_ATTENTION, 0x29, 3)
    );
    u.run(2, &res, &[], 0).good();
    u.run(2, &rel, &[], 0).good();
    // With a persistent registration both conflict.
    prout(&mut u, 0, 6, 0, 0, 1, 0).good();
    assert_eq!(u.run(0, &res, &[], 0).status, RESERVATION_CONFLICT);
    assert_eq!(u.run(0, &rel, &[], 0).status, RESERVATION_CONFLICT);
}

// ---- robustness ----

#[test]
fn response_before_done_is_aborted() {
    let mut u = lu();
    let nexus = nx(0);
    let c = cdb16(&rw10(0x28, 0, 1, 0));
    let cmd = Command {
        cdb: &c,
        data_out_len: 0,
        data_in_len: 512,
    };
    let mut unit = Unit {
        export: u.export.as_ref(),
        lun: 0,
        target: TARGET,
        luns: &[0],
        state: &mut u.state,
    };
    let t = Task::new(&cmd, &mut unit, &nexus);
    assert!(!t.is_done());
    assert_eq!(t.pages_wanted(), 4096);
    assert_eq!(t.response().status, CHECK_CONDITION);
}

fn check_sense(r: &Response) {
    match r.status {
        CHECK_CONDITION => {
            assert!(r.sense.len() >= 8);
            assert!(r.sense[0] & 0x7f == 0x70 || r.sense[0] == 0x72);
        }
        GOOD | BUSY | RESERVATION_CONFLICT => assert!(r.sense.is_empty()),
        s => panic!("status {s:#x}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn arbitrary_commands_never_panic(
        op in prop::sample::select(opcodes::TABLE.iter().map(|e| e.opcode).chain([0xc1, 0x04]).collect::<Vec<u8>>()),
        rest in prop::collection::vec(any::<u8>(), 15..20),
        small in any::<bool>(),
        out in prop::collection::vec(any::<u8>(), 0..1200),
        fails in prop::collection::vec(prop::option::of(0u8..8), 0..6),
        nexus in 0u64..3,
        ro in any::<bool>(),
        trim in any::<bool>(),
        d_sense in any::<bool>(),
        swp in any::<bool>(),
    ) {
        let mut e = export();
        e.read_only = ro;
        e.can_trim = trim;
        e.size_bytes = 64 * 512;
        let mut u = Lu::new(e);
        u.state.d_sense = d_sense;
        u.state.swp = swp;
        let mut cdb = vec![op];
        cdb.extend_from_slice(&rest);
        if small {
            // Keep LBAs and lengths small so that bios happen.
            for b in cdb.iter_mut().skip(2).take(7) {
                *b &= 0x01;
            }
            for b in cdb.iter_mut().skip(10).take(3) {
                *b = 0;
            }
        }
        // A prior registration makes PR paths reachable.
        let _ = prout(&mut u, 1, 6, 0, 0, 0x5, 0);
        let nx = nx(nexus);
        let cmd = Command { cdb: &cdb, data_out_len: out.len() as u32, data_in_len: 4096 };
        let mut unit = Unit { export: u.export.as_ref(), lun: 0, target: TARGET, luns: &[0], state: &mut u.state };
        let mut t = Task::new(&cmd, &mut unit, &nx);
        if t.is_done() {
            prop_assert_eq!(t.data_out_want(), 0);
        }
        if t.pages_wanted() > 0 {
            prop_assert!(t.pages_wanted() <= 64 << 20);
            t.alloc().unwrap();
        }
        let want = t.data_out_want();
        prop_assert!(want as usize <= out.len());
        if want > 0 {
            let sg = t.data_out_sg().unwrap();
            prop_assert_eq!(sg.len_bytes(), u64::from(want));
            sg.copy_from_slice(0, &out[..want as usize], &DataCounters::new()).unwrap();
            t.data_out_done(&mut unit, &nx);
        }
        let errs = [BioError::Io, BioError::Invalid, BioError::OutOfRange, BioError::Orphaned,
            BioError::Access, BioError::NotSupported, BioError::NoMemory, BioError::NoSpace];
        let mut i = 0;
        let mut rounds = 0;
        while !t.is_done() {
            rounds += 1;
            prop_assert!(rounds < 10_000, "no progress");
            let mut bios = Vec::new();
            while let Some(b) = t.next_bio(&mut unit) {
                bios.push(b);
            }
            prop_assert!(!bios.is_empty(), "stalled");
            for (tag, mut bio) in bios {
                let r = match fails.get(i).copied().flatten() {
                    Some(k) => Err(errs[usize::from(k)]),
                    None => u.disk.exec(&mut bio),
                };
                i += 1;
                t.complete(&mut unit, tag, bio, r);
            }
        }
        let r = t.response();
        check_sense(&r);
        if d_sense && r.status == CHECK_CONDITION && op != 0x15 && op != 0x55 {
            prop_assert_eq!(r.sense[0], 0x72);
        }
    }

    #[test]
    fn arbitrary_cdb_bytes_never_panic(cdb in prop::collection::vec(any::<u8>(), 16..17), out in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut u = lu();
        let nx = nx(0);
        let cmd = Command { cdb: &cdb, data_out_len: out.len() as u32, data_in_len: 512 };
        let mut unit = Unit { export: u.export.as_ref(), lun: 0, target: TARGET, luns: &[0], state: &mut u.state };
        let t = Task::new(&cmd, &mut unit, &nx);
        if t.is_done() {
            check_sense(&t.response());
        } else {
            prop_assert!(t.pages_wanted() <= 64 << 20);
        }
    }

    #[test]
    fn arbitrary_state_bytes(b in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Some(s) = UnitState::from_bytes(&b) {
            prop_assert_eq!(UnitState::from_bytes(&s.to_bytes()).map(|x| x.pr), Some(s.pr));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Random PERSISTENT RESERVE OUT sequences from three nexuses keep the
    /// state consistent: READ KEYS and READ RESERVATION stay well-formed,
    /// the holder is registered, and the state survives a round trip.
    #[test]
    fn pr_sequences_stay_consistent(
        ops in prop::collection::vec((0u64..3, 0u8..8, 0u8..9, 0u64..4, 0u64..4, any::<bool>()), 1..40),
    ) {
        let mut u = lu();
        for (n, sa, kind, key, sa_key, aptpl) in ops {
            let o = prout(&mut u, n, sa, kind, key, sa_key, u8::from(aptpl));
            prop_assert!(matches!(o.status, GOOD | CHECK_CONDITION | RESERVATION_CONFLICT));
            // Clear unit attentions so the next command runs.
            for m in 0..3 {
                while u.run(m, &[0, 0, 0, 0, 0, 0], &[], 0).status == CHECK_CONDITION {}
            }
            let k = prin(&mut u, 0, 0);
            let len = u32::from_be_bytes(k[4..8].try_into().unwrap()) as usize;
            prop_assert_eq!(len + 8, k.len());
            let keys: Vec<u64> = k[8..].chunks(8).map(|c| u64::from_be_bytes(c.try_into().unwrap())).collect();
            prop_assert!(keys.iter().all(|&x| x != 0));
            let r = prin(&mut u, 0, 1);
            let rlen = u32::from_be_bytes(r[4..8].try_into().unwrap());
            prop_assert!(rlen == 0 || rlen == 16);
            if rlen == 16 {
                let holder = u64::from_be_bytes(r[8..16].try_into().unwrap());
                let t = r[21];
                prop_assert!(matches!(t, 1 | 3 | 5 | 6 | 7 | 8));
                if t < 7 {
                    prop_assert!(keys.contains(&holder));
                } else {
                    prop_assert_eq!(holder, 0);
                    prop_assert!(!keys.is_empty());
                }
            }
            let b = u.state.to_bytes();
            prop_assert_eq!(UnitState::from_bytes(&b).map(|s| s.pr), Some(u.state.pr.clone()));
        }
    }
}
