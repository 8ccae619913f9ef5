//! A disk's volatile write cache, modelled after the fact: QEMU's
//! `blklogwrites` driver records every write and flush the disk received,
//! in order, in the dm-log-writes format (Linux
//! `drivers/md/dm-log-writes.c`); a power cut is then replayed onto the
//! image as it was before the run, keeping everything up to the last
//! flush and only a seeded random part of what came after it.
//!
//! ```text
//!  log file:  super (1 sector) │ entry │ entry │ … │ zero header = end
//!  entry:     header sector {sector, nr_sectors, flags, data_len}
//!             + nr_sectors of data (none for a flush or a discard)
//! ```
//!
//! Writes after the last flush are each kept or lost, and a kept one may
//! be torn: only a prefix of its sectors reaches the medium. Sector
//! writes are atomic, as on a real disk.

use rand_core::Rng;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// `WRITE_LOG_MAGIC` of the super block.
pub const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
/// Entry flag: a flush (everything logged before it is stable).
pub const FLAG_FLUSH: u64 = 1 << 0;
/// Entry flag: a write with forced unit access (stable on its own).
pub const FLAG_FUA: u64 = 1 << 1;
/// Entry flag: a discard (no data follows).
pub const FLAG_DISCARD: u64 = 1 << 2;
/// Entry flag: a mark (no data follows).
pub const FLAG_MARK: u64 = 1 << 3;

/// One logged request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// First sector written (in log sectors).
    pub sector: u64,
    /// Number of sectors.
    pub nr_sectors: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// Where the data starts in the log file (meaningless without data).
    pub data_offset: u64,
}

impl Entry {
    /// True for a write whose data follows in the log.
    pub fn has_data(&self) -> bool {
        self.flags & (FLAG_DISCARD | FLAG_MARK | FLAG_FLUSH) == 0 && self.nr_sectors > 0
    }
}

/// A parsed log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    /// The log's sector size in bytes.
    pub sector_size: u64,
    /// Entries in log order.
    pub entries: Vec<Entry>,
}

impl Log {
    /// Index of the last flush, if any.
    pub fn last_flush(&self) -> Option<usize> {
        self.entries.iter().rposition(|e| e.flags & FLAG_FLUSH != 0)
    }
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads a log. An empty file is an empty log (the disk got no write);
/// the entries end at the first all-zero header or at the end of file.
/// The super block's entry count is only brought up to date at each
/// flush, so the scan reads past it.
pub fn read_log(path: &Path) -> io::Result<Log> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    if len == 0 {
        return Ok(Log {
            sector_size: 512,
            entries: Vec::new(),
        });
    }
    let mut head = [0u8; 28];
    r.read_exact(&mut head)?;
    // A log whose first flush never came has a zero super block.
    let magic = le64(&head[0..]);
    let sector_size = match magic {
        LOG_MAGIC => u64::from(u32::from_le_bytes(head[24..28].try_into().expect("4"))),
        0 => 512,
        m => return Err(bad(format!("not a write log (magic {m:#x})"))),
    };
    if !sector_size.is_power_of_two() || !(512..=1 << 23).contains(&sector_size) {
        return Err(bad(format!("write log sector size {sector_size}")));
    }
    let mut sector = vec![0u8; sector_size as usize];
    let mut pos = sector_size;
    let mut entries = Vec::new();
    let mut skip = sector_size - 28;
    loop {
        io::copy(&mut (&mut r).take(skip), &mut io::sink())?;
        if pos + sector_size > len {
            break;
        }
        r.read_exact(&mut sector)?;
        if sector.iter().all(|&b| b == 0) {
            break;
        }
        let e = Entry {
            sector: le64(&sector[0..]),
            nr_sectors: le64(&sector[8..]),
            flags: le64(&sector[16..]),
            data_offset: pos + sector_size,
        };
        let data = if e.has_data() {
            e.nr_sectors
                .checked_mul(sector_size)
                .ok_or_else(|| bad("write log entry too long"))?
        } else {
            0
        };
        pos = e
            .data_offset
            .checked_add(data)
            .ok_or_else(|| bad("write log entry too long"))?;
        if pos > len {
            // The data of the last entry never reached the log: the
            // request never completed, so the entry is dropped.
            break;
        }
        entries.push(e);
        skip = data;
    }
    Ok(Log {
        sector_size,
        entries,
    })
}

/// What a replay kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Entries applied in full.
    pub applied: usize,
    /// Writes after the last flush that were lost entirely.
    pub lost: usize,
    /// Writes after the last flush of which only a prefix was kept.
    pub torn: usize,
}

/// How a replay treats what came after the last flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Everything reached the medium (a clean stop).
    KeepAll,
    /// A power cut: each unflushed write is kept, lost or torn at random.
    Random,
    /// A power cut that loses every unflushed write.
    LoseAll,
}

/// Applies `log` onto `image` (the disk as it was when the log began).
pub fn replay(
    log: &Log,
    log_path: &Path,
    image: &Path,
    cut: Cut,
    rng: &mut impl Rng,
) -> io::Result<Replay> {
    let logf = File::open(log_path)?;
    let img = std::fs::OpenOptions::new().write(true).open(image)?;
    let stable = log.last_flush().map_or(0, |i| i + 1);
    let ss = log.sector_size;
    let mut out = Replay::default();
    let mut buf = Vec::new();
    for (i, e) in log.entries.iter().enumerate() {
        let mut sectors = e.nr_sectors;
        if i >= stable && e.flags & FLAG_FUA == 0 && (e.has_data() || e.flags & FLAG_DISCARD != 0) {
            match cut {
                Cut::KeepAll => {}
                Cut::LoseAll => {
                    out.lost += 1;
                    continue;
                }
                Cut::Random => match rng.next_u32() % 4 {
                    0 => {
                        out.lost += 1;
                        continue;
                    }
                    1 if sectors > 1 => {
                        sectors = 1 + u64::from(rng.next_u32()) % (sectors - 1);
                        out.torn += 1;
                    }
                    _ => {}
                },
            }
        }
        let at = e.sector * ss;
        if e.flags & FLAG_DISCARD != 0 {
            // The image's discard reads back as zeroes.
            buf.clear();
            buf.resize((sectors * ss) as usize, 0);
            img.write_all_at(&buf, at)?;
        } else if e.has_data() {
            buf.resize((sectors * ss) as usize, 0);
            logf.read_exact_at(&mut buf, e.data_offset)?;
            img.write_all_at(&buf, at)?;
        }
        out.applied += 1;
    }
    img.sync_data()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;
    use rand_xorshift::XorShiftRng;
    use std::io::Write;

    /// Writes a log the way QEMU's driver does.
    struct Writer {
        f: File,
        n: u64,
    }

    impl Writer {
        fn new(path: &Path, flushed: bool) -> Writer {
            let mut f = File::create(path).unwrap();
            let mut sup = vec![0u8; 512];
            if flushed {
                sup[0..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
                sup[8..16].copy_from_slice(&1u64.to_le_bytes());
                sup[24..28].copy_from_slice(&512u32.to_le_bytes());
            }
            f.write_all(&sup).unwrap();
            Writer { f, n: 0 }
        }
        fn entry(&mut self, sector: u64, data: &[u8], flags: u64) {
            let mut h = vec![0u8; 512];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&(data.len() as u64 / 512).to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            self.f.write_all(&h).unwrap();
            self.f.write_all(data).unwrap();
            self.n += 1;
        }
        fn flush(&mut self) {
            let mut h = vec![0u8; 512];
            h[16..24].copy_from_slice(&FLAG_FLUSH.to_le_bytes());
            self.f.write_all(&h).unwrap();
        }
    }

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "strata-logwrites-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn image(d: &Path) -> std::path::PathBuf {
        let p = d.join("img");
        File::create(&p).unwrap().set_len(8 * 512).unwrap();
        p
    }

    fn sectors(p: &Path) -> Vec<u8> {
        std::fs::read(p)
            .unwrap()
            .chunks(512)
            .map(|c| c[0])
            .collect()
    }

    #[test]
    fn flushed_writes_always_survive_and_later_ones_may_not() {
        let d = dir();
        let log = d.join("log");
        let mut w = Writer::new(&log, true);
        w.entry(0, &[1; 1024], 0);
        w.entry(1, &[2; 512], 0);
        w.flush();
        w.entry(4, &[3; 2048], 0);
        w.entry(2, &[4; 512], FLAG_FUA);
        drop(w);
        let l = read_log(&log).unwrap();
        assert_eq!(l.entries.len(), 5);
        assert_eq!(l.last_flush(), Some(2));
        let mut rng = XorShiftRng::seed_from_u64(1);

        let img = image(&d);
        let r = replay(&l, &log, &img, Cut::LoseAll, &mut rng).unwrap();
        assert_eq!(r.lost, 1);
        // Overlapping writes keep their order; the FUA write survives.
        assert_eq!(sectors(&img), [1, 2, 4, 0, 0, 0, 0, 0]);

        let img = image(&d);
        replay(&l, &log, &img, Cut::KeepAll, &mut rng).unwrap();
        assert_eq!(sectors(&img), [1, 2, 4, 0, 3, 3, 3, 3]);

        // A random cut keeps a prefix of the unflushed write, or none,
        // or all of it; never anything else.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let img = image(&d);
            replay(&l, &log, &img, Cut::Random, &mut rng).unwrap();
            let s = sectors(&img);
            assert_eq!(s[..4], [1, 2, 4, 0]);
            let kept = s[4..].iter().take_while(|&&b| b == 3).count();
            assert!(s[4 + kept..].iter().all(|&b| b == 0), "{s:?}");
            seen.insert(kept);
        }
        assert!(seen.len() >= 3, "{seen:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unflushed_log_and_a_truncated_entry() {
        let d = dir();
        let log = d.join("log");
        let mut w = Writer::new(&log, false);
        w.entry(0, &[7; 512], 0);
        w.entry(1, &[8; 1024], 0);
        drop(w);
        // The second entry's data is cut short: it never completed.
        let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
        f.set_len(512 * 4).unwrap();
        let l = read_log(&log).unwrap();
        assert_eq!(l.entries.len(), 1);
        assert_eq!(l.last_flush(), None);
        assert!(read_log(&d.join("missing")).is_err());
        File::create(d.join("empty")).unwrap();
        assert!(read_log(&d.join("empty")).unwrap().entries.is_empty());
        std::fs::write(d.join("junk"), [0xffu8; 1024]).unwrap();
        assert!(read_log(&d.join("junk")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
