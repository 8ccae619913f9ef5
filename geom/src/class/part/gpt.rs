//! The GUID Partition Table on disk (UEFI 2.10 §5): the protective MBR,
//! the header and the partition entry array, read with fallback to the
//! backup copy, and written whole by [`build`].
//!
//! ```text
//! LBA 0                  protective MBR (§5.2.3)
//! LBA 1                  primary header (§5.3.2)
//! LBA 2 ..               primary entry array (§5.3.3)
//! FirstUsableLBA ..= LastUsableLBA   partitions
//! LastUsableLBA + 1 ..   backup entry array
//! last LBA               backup header
//! ```
//!
//! The header (Table 5.5) and an entry (Table 5.6) are little-endian; their
//! fields and offsets are listed where the views are defined ([`Header`],
//! [`Entry`]). A GUID is stored with its first three fields little-endian
//! (Appendix A).
//!
//! Each structure has a view that reads and writes fields in place after
//! one length check, an owned value ([`HeaderRepr`], [`Partition`]), and
//! `parse`/`emit` between them. Reading is pure: the class reads LBA 1 and
//! the last LBA, asks [`entries_extent`] where each copy's array lies,
//! reads those sectors, and hands everything to [`read_table`]. Past the
//! views' length checks, nothing here panics on any input.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// The header signature (§5.3.2).
pub const SIGNATURE: [u8; 8] = *b"EFI PART";
/// The header revision written; any 1.x is read.
pub const REVISION: u32 = 0x0001_0000;
/// Bytes of a revision 1.0 header.
pub const HEADER_LEN: usize = 92;
/// Bytes of the defined part of a partition entry.
pub const ENTRY_LEN: usize = 128;
/// UTF-16 code units of a partition name.
pub const NAME_UNITS: usize = 36;
/// Largest entry array read (count × size); anything bigger is damage.
pub const MAX_ENTRIES_BYTES: u64 = 1 << 20;
/// Entries written by [`build`]: 16 KiB, the least §5.3.2 lets a disk
/// reserve, as sgdisk writes.
pub const BUILD_ENTRY_COUNT: u32 = 128;
/// LBA of the primary header.
pub const PRIMARY_HEADER_LBA: u64 = 1;
/// LBA of the primary entry array written by [`build`].
pub const PRIMARY_ENTRIES_LBA: u64 = 2;
/// MBR partition type of the protective record (§5.2.3).
pub const MBR_TYPE_PROTECTIVE: u8 = 0xEE;

/// `N` bytes at `at`; the caller has checked the length.
fn bytes<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// A fixed-size little-endian field the views read and write in place.
trait Le: Sized {
    fn read(b: &[u8]) -> Self;
    fn write(&self, b: &mut [u8]);
}

/// [`Le`] for the unsigned integers.
macro_rules! le_int {
    ($($t:ty),*) => {$(
        impl Le for $t {
            fn read(b: &[u8]) -> $t {
                <$t>::from_le_bytes(bytes(b, 0))
            }
            fn write(&self, b: &mut [u8]) {
                b[..size_of::<$t>()].copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}

le_int!(u32, u64);

impl<const N: usize> Le for [u8; N] {
    fn read(b: &[u8]) -> [u8; N] {
        bytes(b, 0)
    }
    fn write(&self, b: &mut [u8]) {
        b[..N].copy_from_slice(self);
    }
}

impl Le for Guid {
    fn read(b: &[u8]) -> Guid {
        Guid(bytes(b, 0))
    }
    fn write(&self, b: &mut [u8]) {
        b[..16].copy_from_slice(&self.0);
    }
}

/// A getter and a setter for each fixed field of a view, one line each:
/// `getter / setter: type, at offset, "doc"`.
macro_rules! fields {
    ($view:ident: $($get:ident / $set:ident: $ty:ty, at $at:expr, $doc:literal;)*) => {
        impl<T: AsRef<[u8]>> $view<T> {
            $(#[doc = concat!($doc, " At byte ", stringify!($at), ".")]
            pub fn $get(&self) -> $ty {
                <$ty as Le>::read(&self.buffer.as_ref()[$at..])
            })*
        }
        impl<T: AsRef<[u8]> + AsMut<[u8]>> $view<T> {
            $(#[doc = concat!("Sets ", $doc)]
            pub fn $set(&mut self, v: $ty) {
                v.write(&mut self.buffer.as_mut()[$at..])
            })*
        }
    };
}

/// A GUID as stored on disk (Appendix A): the first three fields
/// little-endian, the last eight bytes in order.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID: the type of an unused entry.
    pub const ZERO: Guid = Guid([0; 16]);
    /// EFI System partition.
    pub const EFI_SYSTEM: Guid = Guid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B);
    /// Linux filesystem data.
    pub const LINUX_FILESYSTEM: Guid = Guid::from_u128(0x0FC63DAF_8483_4772_8E79_3D69D8477DE4);
    /// Linux swap.
    pub const LINUX_SWAP: Guid = Guid::from_u128(0x0657FD6D_A4AB_43C4_84E5_0933C84B4F4F);
    /// FreeBSD UFS.
    pub const FREEBSD_UFS: Guid = Guid::from_u128(0x516E7CB6_6ECF_11D6_8FF8_00022D09712B);

    /// The GUID whose text form is `n` in hex (`0x0FC63DAF_8483_…`).
    pub const fn from_u128(n: u128) -> Guid {
        let mut g = n.to_be_bytes();
        let [a0, a1, a2, a3, b0, b1, c0, c1, ..] = g;
        [g[0], g[1], g[2], g[3]] = [a3, a2, a1, a0];
        [g[4], g[5], g[6], g[7]] = [b1, b0, c1, c0];
        Guid(g)
    }

    /// The GUID as the number its text form shows.
    pub fn to_u128(self) -> u128 {
        let mut g = self.0;
        g[0..4].reverse();
        g[4..6].reverse();
        g[6..8].reverse();
        u128::from_be_bytes(g)
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        *self == Guid::ZERO
    }

    /// Reads the text form `0FC63DAF-8483-4772-8E79-3D69D8477DE4` (either
    /// case); `None` for anything else.
    pub fn parse(text: &str) -> Option<Guid> {
        let t = text.as_bytes();
        let dashes = t.len() == 36 && [8, 13, 18, 23].iter().all(|&i| t[i] == b'-');
        if !dashes {
            return None;
        }
        let mut digits = t.iter().filter(|&&c| c != b'-');
        let n = digits.try_fold(0u128, |n, &c| {
            Some((n << 4) | u128::from((c as char).to_digit(16)?))
        });
        Some(Guid::from_u128(n?))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.to_u128();
        let part = |shift: u32, mask: u128| (n >> shift) & mask;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:04X}-{:012X}",
            part(96, 0xFFFF_FFFF),
            part(80, 0xFFFF),
            part(64, 0xFFFF),
            part(48, 0xFFFF),
            part(0, 0xFFFF_FFFF_FFFF),
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// Which copy of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Header at LBA 1, array after it.
    Primary,
    /// Header at the last LBA, array before it.
    Backup,
}

impl Source {
    /// The LBA of this copy's header on a disk of `disk_sectors` sectors.
    pub fn header_lba(self, disk_sectors: u64) -> u64 {
        match self {
            Source::Primary => PRIMARY_HEADER_LBA,
            Source::Backup => disk_sectors.saturating_sub(1),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Primary => "primary",
            Source::Backup => "backup",
        })
    }
}

/// A header field, shown with its name in Table 5.5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// Signature.
    Signature,
    /// Revision.
    Revision,
    /// HeaderSize.
    HeaderSize,
    /// HeaderCRC32.
    HeaderCrc,
    /// Reserved.
    Reserved,
    /// MyLBA.
    MyLba,
    /// AlternateLBA.
    AlternateLba,
    /// FirstUsableLBA.
    FirstUsableLba,
    /// LastUsableLBA.
    LastUsableLba,
    /// DiskGUID.
    DiskGuid,
    /// PartitionEntryLBA.
    EntriesLba,
    /// NumberOfPartitionEntries.
    EntryCount,
    /// SizeOfPartitionEntry.
    EntrySize,
    /// PartitionEntryArrayCRC32.
    EntriesCrc,
}

impl Field {
    /// The field's name in Table 5.5 and what it must satisfy.
    fn describe(self) -> (&'static str, &'static str) {
        let usable = "the usable LBAs must lie between the headers' arrays, first <= last";
        match self {
            Field::Signature => ("Signature", "not \"EFI PART\": no GPT here"),
            Field::Revision => ("Revision", "only revision 1.x is read"),
            Field::HeaderSize => ("HeaderSize", "must be 92 up to the sector size"),
            Field::HeaderCrc => ("HeaderCRC32", "checksum mismatch: the header is damaged"),
            Field::Reserved => ("Reserved", "must be zero"),
            Field::MyLba => ("MyLBA", "must be the LBA the header was read from"),
            Field::AlternateLba => (
                "AlternateLBA",
                "must point at the other header (LBA 1 or the disk's last LBA; \
                 was the disk resized?)",
            ),
            Field::FirstUsableLba => ("FirstUsableLBA", usable),
            Field::LastUsableLba => ("LastUsableLBA", usable),
            Field::DiskGuid => ("DiskGUID", "must match the other copy"),
            Field::EntriesLba => (
                "PartitionEntryLBA",
                "the entry array must lie between its header and the usable LBAs",
            ),
            Field::EntryCount => (
                "NumberOfPartitionEntries",
                "must be at least 1, with at most 1 MiB of entries",
            ),
            Field::EntrySize => ("SizeOfPartitionEntry", "must be 128 x 2^n bytes"),
            Field::EntriesCrc => (
                "PartitionEntryArrayCRC32",
                "checksum mismatch: the entry array is damaged",
            ),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe().0)
    }
}

/// What is wrong with one copy of a table, or with a table to build.
/// Entries are named by their index in the array (partition number − 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Defect {
    /// A buffer is shorter than what it should hold.
    Truncated {
        /// Bytes needed.
        need_bytes: u64,
        /// Bytes given.
        have_bytes: u64,
    },
    /// A header field is invalid.
    Field {
        /// The field.
        field: Field,
        /// The value found (signatures and checksums as stored, little-endian).
        found: u64,
    },
    /// A field disagrees with the copy in use.
    Differs(Field),
    /// An entry ends before it starts.
    Inverted {
        /// Entry index.
        index: u32,
        /// Its StartingLBA.
        start_lba: u64,
        /// Its EndingLBA.
        end_lba: u64,
    },
    /// An entry reaches outside FirstUsableLBA ..= LastUsableLBA.
    OutsideUsable {
        /// Entry index.
        index: u32,
        /// Its StartingLBA.
        start_lba: u64,
        /// Its EndingLBA.
        end_lba: u64,
    },
    /// Two entries share sectors.
    Overlap {
        /// The lower entry index.
        index: u32,
        /// The higher one.
        other: u32,
    },
    /// (Building) an entry index is 128 or more, or given twice.
    Index(u32),
    /// (Building) a name is longer than 36 UTF-16 code units or holds a NUL.
    Name(u32),
    /// (Building) a partition has the all-zero type of an unused entry.
    ZeroType(u32),
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Defect::Truncated {
                need_bytes,
                have_bytes,
            } => write!(f, "{have_bytes} bytes given where {need_bytes} are needed"),
            Defect::Field { field, found } => {
                let (name, rule) = field.describe();
                match field {
                    Field::Signature | Field::Revision | Field::HeaderCrc | Field::EntriesCrc => {
                        write!(f, "bad {name} {found:#x} ({rule})")
                    }
                    _ => write!(f, "bad {name} {found} ({rule})"),
                }
            }
            Defect::Differs(field) => write!(f, "{field} differs from the copy in use"),
            Defect::Inverted {
                index,
                start_lba,
                end_lba,
            } => write!(
                f,
                "entry {index} ends at LBA {end_lba}, before its start {start_lba}"
            ),
            Defect::OutsideUsable {
                index,
                start_lba,
                end_lba,
            } => write!(
                f,
                "entry {index} (LBA {start_lba} ..= {end_lba}) is outside the usable LBAs"
            ),
            Defect::Overlap { index, other } => write!(f, "entries {index} and {other} overlap"),
            Defect::Index(i) => write!(f, "entry index {i} is not below 128 or is used twice"),
            Defect::Name(i) => write!(
                f,
                "the name of entry {i} is longer than 36 UTF-16 code units or holds a NUL"
            ),
            Defect::ZeroType(i) => write!(f, "entry {i} has the all-zero type of an unused entry"),
        }
    }
}

/// Why no table was read or built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GptError {
    /// The sector size is not a power of two from 512 to 65536 bytes, or
    /// the disk is too small for a GPT.
    Geometry {
        /// Sectors on the disk.
        disk_sectors: u64,
        /// Bytes per sector.
        sector_size: u32,
    },
    /// One copy is unusable (from [`entries_extent`]).
    Damaged {
        /// The copy.
        source: Source,
        /// What is wrong with it.
        defect: Defect,
    },
    /// Neither copy is usable.
    NoValidTable {
        /// What is wrong with the primary copy.
        primary: Box<Defect>,
        /// What is wrong with the backup copy.
        backup: Box<Defect>,
    },
    /// [`build`] refused its input.
    Refused(Defect),
}

impl fmt::Display for GptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GptError::Geometry {
                disk_sectors,
                sector_size,
            } => write!(
                f,
                "a disk of {disk_sectors} sectors of {sector_size} bytes cannot hold a GPT"
            ),
            GptError::Damaged { source, defect } => write!(f, "{source} GPT: {defect}"),
            GptError::NoValidTable { primary, backup } => {
                write!(f, "no valid GPT: primary: {primary}; backup: {backup}")
            }
            GptError::Refused(d) => write!(f, "GPT not written: {d}"),
        }
    }
}

fn truncated(have: usize, need: usize) -> Result<(), Defect> {
    if have < need {
        let (need_bytes, have_bytes) = (need as u64, have as u64);
        return Err(Defect::Truncated {
            need_bytes,
            have_bytes,
        });
    }
    Ok(())
}

/// A read/write view of a GPT header (§5.3.2, Table 5.5) at the start of a
/// buffer, normally its whole sector (the rest of which is reserved).
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

fields! { Header:
    signature / set_signature: [u8; 8], at 0, "Signature, `EFI PART`.";
    revision / set_revision: u32, at 8, "Revision.";
    header_size_bytes / set_header_size_bytes: u32, at 12, "HeaderSize, bytes.";
    header_crc32 / set_header_crc32: u32, at 16, "HeaderCRC32 as stored.";
    reserved / set_reserved: u32, at 20, "Reserved, zero.";
    my_lba / set_my_lba: u64, at 24, "MyLBA: where this header is.";
    alternate_lba / set_alternate_lba: u64, at 32, "AlternateLBA: where the other header is.";
    first_usable_lba / set_first_usable_lba: u64, at 40, "FirstUsableLBA.";
    last_usable_lba / set_last_usable_lba: u64, at 48, "LastUsableLBA (inclusive).";
    disk_guid / set_disk_guid: Guid, at 56, "DiskGUID.";
    entries_lba / set_entries_lba: u64, at 72, "PartitionEntryLBA: this copy's array.";
    entry_count / set_entry_count: u32, at 80, "NumberOfPartitionEntries.";
    entry_size_bytes / set_entry_size_bytes: u32, at 84, "SizeOfPartitionEntry, bytes.";
    entries_crc32 / set_entries_crc32: u32, at 88, "PartitionEntryArrayCRC32 as stored.";
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps a buffer; accessors may panic until [`Header::check_len`] passed.
    pub const fn new_unchecked(buffer: T) -> Header<T> {
        Header { buffer }
    }

    /// Wraps a buffer after checking it holds [`HEADER_LEN`] bytes.
    pub fn new_checked(buffer: T) -> Result<Header<T>, Defect> {
        let h = Header::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }

    /// Checks the buffer holds a whole header; after this no accessor panics.
    pub fn check_len(&self) -> Result<(), Defect> {
        truncated(self.buffer.as_ref().len(), HEADER_LEN)
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The CRC32 over HeaderSize bytes with the CRC field taken as zero
    /// (§5.3.2); `None` when HeaderSize is below 92 or beyond the buffer.
    pub fn compute_header_crc32(&self) -> Option<u32> {
        let b = self.buffer.as_ref();
        let len = usize::try_from(self.header_size_bytes()).ok()?;
        let rest = b.get(20..len).filter(|_| len >= HEADER_LEN)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..16]);
        h.update(&[0; 4]);
        h.update(rest);
        Some(h.finalize())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Stores the header CRC of the current contents (nothing when
    /// HeaderSize does not fit the buffer).
    pub fn fill_header_crc32(&mut self) {
        if let Some(c) = self.compute_header_crc32() {
            self.set_header_crc32(c);
        }
    }
}

/// A header's fields, owned. Revision and HeaderSize are not kept:
/// [`HeaderRepr::emit`] writes 1.0 and 92.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderRepr {
    /// Where this header is.
    pub my_lba: u64,
    /// Where the other header is.
    pub alternate_lba: u64,
    /// First LBA a partition may use.
    pub first_usable_lba: u64,
    /// Last LBA a partition may use (inclusive).
    pub last_usable_lba: u64,
    /// The disk's GUID.
    pub disk_guid: Guid,
    /// First LBA of this copy's entry array.
    pub entries_lba: u64,
    /// Entries in the array.
    pub entry_count: u32,
    /// Bytes per entry.
    pub entry_size_bytes: u32,
    /// CRC32 of the array's `entry_count × entry_size_bytes` bytes.
    pub entries_crc32: u32,
}

impl HeaderRepr {
    /// Reads a header and checks what it says about itself (§5.3.2):
    /// signature, revision, size (at most the buffer, normally the sector),
    /// CRC, reserved word, entry size and count. The reserved bytes after
    /// HeaderSize are not checked: the CRC does not cover them.
    pub fn parse<T: AsRef<[u8]>>(view: &Header<T>) -> Result<HeaderRepr, Defect> {
        view.check_len()?;
        let bad = |field, found: u64| Err(Defect::Field { field, found });
        if view.signature() != SIGNATURE {
            return bad(Field::Signature, u64::from_le_bytes(view.signature()));
        }
        if view.revision() >> 16 != 1 {
            return bad(Field::Revision, view.revision().into());
        }
        let header_size = view.header_size_bytes();
        let len = view.buffer.as_ref().len();
        if !usize::try_from(header_size).is_ok_and(|n| (HEADER_LEN..=len).contains(&n)) {
            return bad(Field::HeaderSize, header_size.into());
        }
        if view.compute_header_crc32() != Some(view.header_crc32()) {
            return bad(Field::HeaderCrc, view.header_crc32().into());
        }
        if view.reserved() != 0 {
            return bad(Field::Reserved, view.reserved().into());
        }
        let size = view.entry_size_bytes();
        if !size.is_multiple_of(128) || !(size / 128).is_power_of_two() {
            return bad(Field::EntrySize, size.into());
        }
        let count = view.entry_count();
        if count == 0 || u64::from(count) * u64::from(size) > MAX_ENTRIES_BYTES {
            return bad(Field::EntryCount, count.into());
        }
        Ok(HeaderRepr {
            my_lba: view.my_lba(),
            alternate_lba: view.alternate_lba(),
            first_usable_lba: view.first_usable_lba(),
            last_usable_lba: view.last_usable_lba(),
            disk_guid: view.disk_guid(),
            entries_lba: view.entries_lba(),
            entry_count: count,
            entry_size_bytes: size,
            entries_crc32: view.entries_crc32(),
        })
    }

    /// Checks the header fits where it was read (§5.3.2): MyLBA is its own
    /// LBA, AlternateLBA the other header's, the usable LBAs lie between
    /// the headers, and the entry array between its header and the usable
    /// LBAs.
    pub fn check(&self, source: Source, disk_sectors: u64, sector_size: u32) -> Result<(), Defect> {
        let last_lba = disk_sectors.saturating_sub(1);
        let bad = |field, found| Err(Defect::Field { field, found });
        let (my, alternate) = match source {
            Source::Primary => (PRIMARY_HEADER_LBA, last_lba),
            Source::Backup => (last_lba, PRIMARY_HEADER_LBA),
        };
        if self.my_lba != my {
            return bad(Field::MyLba, self.my_lba);
        }
        if self.alternate_lba != alternate {
            return bad(Field::AlternateLba, self.alternate_lba);
        }
        let (first, last) = (self.first_usable_lba, self.last_usable_lba);
        if first <= PRIMARY_HEADER_LBA || first > last {
            return bad(Field::FirstUsableLba, first);
        }
        if last >= last_lba {
            return bad(Field::LastUsableLba, last);
        }
        let sectors = self.entries_sectors(sector_size);
        let end = self.entries_lba.checked_add(sectors.saturating_sub(1));
        let inside = end.is_some_and(|end| match source {
            Source::Primary => self.entries_lba > PRIMARY_HEADER_LBA && end < first,
            Source::Backup => self.entries_lba > last && end < last_lba,
        });
        if sectors == 0 || !inside {
            return bad(Field::EntriesLba, self.entries_lba);
        }
        Ok(())
    }

    /// Bytes of the entry array.
    pub fn entries_bytes(&self) -> u64 {
        u64::from(self.entry_count) * u64::from(self.entry_size_bytes)
    }

    /// Sectors the entry array occupies.
    pub fn entries_sectors(&self, sector_size: u32) -> u64 {
        self.entries_bytes().div_ceil(sector_size.max(1).into())
    }

    /// Writes a revision 1.0 header of 92 bytes, CRC last; the rest of the
    /// buffer is left as it is (zero it first).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, view: &mut Header<T>) -> Result<(), Defect> {
        view.check_len()?;
        view.set_signature(SIGNATURE);
        view.set_revision(REVISION);
        view.set_header_size_bytes(HEADER_LEN as u32);
        view.set_reserved(0);
        view.set_my_lba(self.my_lba);
        view.set_alternate_lba(self.alternate_lba);
        view.set_first_usable_lba(self.first_usable_lba);
        view.set_last_usable_lba(self.last_usable_lba);
        view.set_disk_guid(self.disk_guid);
        view.set_entries_lba(self.entries_lba);
        view.set_entry_count(self.entry_count);
        view.set_entry_size_bytes(self.entry_size_bytes);
        view.set_entries_crc32(self.entries_crc32);
        view.fill_header_crc32();
        Ok(())
    }
}

/// A read/write view of a partition entry (§5.3.3, Table 5.6) at the start
/// of a buffer; bytes past the first 128 of a larger entry are ignored.
#[derive(Debug, Clone)]
pub struct Entry<T: AsRef<[u8]>> {
    buffer: T,
}

fields! { Entry:
    type_guid / set_type_guid: Guid, at 0, "PartitionTypeGUID (all zero: entry unused).";
    unique_guid / set_unique_guid: Guid, at 16, "UniquePartitionGUID.";
    start_lba / set_start_lba: u64, at 32, "StartingLBA.";
    end_lba / set_end_lba: u64, at 40, "EndingLBA (inclusive).";
    attributes / set_attributes: u64, at 48, "Attributes (Table 5.8).";
    name_bytes / set_name_bytes: [u8; 2 * NAME_UNITS], at 56, "PartitionName, UTF-16LE.";
}

impl<T: AsRef<[u8]>> Entry<T> {
    /// Wraps a buffer; accessors may panic until [`Entry::check_len`] passed.
    pub const fn new_unchecked(buffer: T) -> Entry<T> {
        Entry { buffer }
    }

    /// Wraps a buffer after checking it holds [`ENTRY_LEN`] bytes.
    pub fn new_checked(buffer: T) -> Result<Entry<T>, Defect> {
        let e = Entry::new_unchecked(buffer);
        e.check_len()?;
        Ok(e)
    }

    /// Checks the buffer holds a whole entry; after this no accessor panics.
    pub fn check_len(&self) -> Result<(), Defect> {
        truncated(self.buffer.as_ref().len(), ENTRY_LEN)
    }
}

/// One used partition entry, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Index in the entry array; sgdisk and gpart number it `index + 1`.
    pub index: u32,
    /// PartitionTypeGUID (never zero).
    pub type_guid: Guid,
    /// UniquePartitionGUID.
    pub unique_guid: Guid,
    /// First LBA.
    pub start_lba: u64,
    /// Last LBA (inclusive).
    pub end_lba: u64,
    /// Attribute bits (§5.3.3, Table 5.8).
    pub attributes: u64,
    /// The name; code units that are not valid UTF-16 read as U+FFFD.
    pub name: String,
}

impl Partition {
    /// Reads entry `index`; `None` when it is unused (zero type GUID).
    pub fn parse<T: AsRef<[u8]>>(view: &Entry<T>, index: u32) -> Result<Option<Partition>, Defect> {
        view.check_len()?;
        if view.type_guid().is_zero() {
            return Ok(None);
        }
        let raw = view.name_bytes();
        let units = raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]));
        let units: Vec<u16> = units.take_while(|&u| u != 0).collect();
        Ok(Some(Partition {
            index,
            type_guid: view.type_guid(),
            unique_guid: view.unique_guid(),
            start_lba: view.start_lba(),
            end_lba: view.end_lba(),
            attributes: view.attributes(),
            name: String::from_utf16_lossy(&units),
        }))
    }

    /// Writes the entry into `view` (its first 128 bytes).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, view: &mut Entry<T>) -> Result<(), Defect> {
        view.check_len()?;
        let mut name = [0u8; 2 * NAME_UNITS];
        let mut slots = name.chunks_exact_mut(2);
        for u in self.name.encode_utf16() {
            match slots.next() {
                Some(slot) if u != 0 => slot.copy_from_slice(&u.to_le_bytes()),
                _ => return Err(Defect::Name(self.index)),
            }
        }
        view.set_type_guid(self.type_guid);
        view.set_unique_guid(self.unique_guid);
        view.set_start_lba(self.start_lba);
        view.set_end_lba(self.end_lba);
        view.set_attributes(self.attributes);
        view.set_name_bytes(name);
        Ok(())
    }

    /// Sectors in the partition (0 for an inverted range).
    pub fn len_sectors(&self) -> u64 {
        let n = self.end_lba.checked_sub(self.start_lba);
        n.map_or(0, |n| n.saturating_add(1))
    }
}

/// A table as read: one copy's header and its used entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// DiskGUID.
    pub disk_guid: Guid,
    /// FirstUsableLBA.
    pub first_usable_lba: u64,
    /// LastUsableLBA (inclusive).
    pub last_usable_lba: u64,
    /// The copy read.
    pub source: Source,
    /// What is wrong with the other copy, if anything: damaged, or
    /// describing another table. The class should rewrite it.
    pub other_copy: Option<Defect>,
    /// The used entries, in table order.
    pub partitions: Vec<Partition>,
}

/// Sectors to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First LBA.
    pub lba: u64,
    /// Number of sectors.
    pub len_sectors: u64,
}

/// Where [`build`] puts things on a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Sectors in each entry array.
    pub entries_sectors: u64,
    /// FirstUsableLBA: just after the primary array.
    pub first_usable_lba: u64,
    /// LastUsableLBA: just before the backup array.
    pub last_usable_lba: u64,
    /// First LBA of the backup array.
    pub backup_entries_lba: u64,
    /// LBA of the backup header, the disk's last.
    pub backup_header_lba: u64,
}

impl Layout {
    /// The layout of [`BUILD_ENTRY_COUNT`] entries of 128 bytes; refused
    /// when no usable sector would be left.
    pub fn new(disk_sectors: u64, sector_size: u32) -> Result<Layout, GptError> {
        check_geometry(disk_sectors, sector_size)?;
        let entries_bytes = u64::from(BUILD_ENTRY_COUNT) * ENTRY_LEN as u64;
        let entries_sectors = entries_bytes.div_ceil(sector_size.into());
        let first_usable_lba = PRIMARY_ENTRIES_LBA + entries_sectors;
        let backup_header_lba = disk_sectors - 1;
        let backup_entries_lba = backup_header_lba.saturating_sub(entries_sectors);
        let last_usable_lba = backup_entries_lba.saturating_sub(1);
        if last_usable_lba < first_usable_lba {
            return Err(GptError::Geometry {
                disk_sectors,
                sector_size,
            });
        }
        Ok(Layout {
            entries_sectors,
            first_usable_lba,
            last_usable_lba,
            backup_entries_lba,
            backup_header_lba,
        })
    }
}

fn check_geometry(disk_sectors: u64, sector_size: u32) -> Result<(), GptError> {
    let ok = sector_size.is_power_of_two() && (512..=65536).contains(&sector_size);
    if !ok || disk_sectors < 3 {
        return Err(GptError::Geometry {
            disk_sectors,
            sector_size,
        });
    }
    Ok(())
}

/// Parses and checks the header of copy `source` in its sector's bytes.
fn read_header(
    sector: &[u8],
    source: Source,
    disk_sectors: u64,
    ss: u32,
) -> Result<HeaderRepr, Defect> {
    truncated(sector.len(), ss as usize)?;
    let h = HeaderRepr::parse(&Header::new_checked(&sector[..ss as usize])?)?;
    h.check(source, disk_sectors, ss)?;
    Ok(h)
}

/// The sectors holding the entry array of copy `source`, given its header
/// sector (read at [`Source::header_lba`]). An error means this copy is
/// unusable: pass an empty array for it to [`read_table`].
pub fn entries_extent(
    header_sector: &[u8],
    source: Source,
    disk_sectors: u64,
    sector_size: u32,
) -> Result<Extent, GptError> {
    check_geometry(disk_sectors, sector_size)?;
    let h = read_header(header_sector, source, disk_sectors, sector_size)
        .map_err(|defect| GptError::Damaged { source, defect })?;
    Ok(Extent {
        lba: h.entries_lba,
        len_sectors: h.entries_sectors(sector_size),
    })
}

/// Checks every partition has a forward range inside the usable LBAs and
/// that no two overlap.
fn check_partitions(parts: &[Partition], first_lba: u64, last_lba: u64) -> Result<(), Defect> {
    for p in parts {
        let (index, start_lba, end_lba) = (p.index, p.start_lba, p.end_lba);
        if start_lba > end_lba {
            return Err(Defect::Inverted {
                index,
                start_lba,
                end_lba,
            });
        }
        if start_lba < first_lba || end_lba > last_lba {
            return Err(Defect::OutsideUsable {
                index,
                start_lba,
                end_lba,
            });
        }
    }
    let mut by_start: Vec<&Partition> = parts.iter().collect();
    by_start.sort_by_key(|p| p.start_lba);
    for w in by_start.windows(2) {
        if w[1].start_lba <= w[0].end_lba {
            let (index, other) = (w[0].index.min(w[1].index), w[0].index.max(w[1].index));
            return Err(Defect::Overlap { index, other });
        }
    }
    Ok(())
}

/// Reads one copy: header, entry array CRC, used entries.
fn read_copy(
    header_sector: &[u8],
    entries: &[u8],
    source: Source,
    disk_sectors: u64,
    sector_size: u32,
) -> Result<(HeaderRepr, Vec<Partition>), Defect> {
    let h = read_header(header_sector, source, disk_sectors, sector_size)?;
    // At most MAX_ENTRIES_BYTES, checked in parse.
    let len = h.entries_bytes() as usize;
    truncated(entries.len(), len)?;
    let array = &entries[..len];
    if crc32fast::hash(array) != h.entries_crc32 {
        let found = h.entries_crc32.into();
        return Err(Defect::Field {
            field: Field::EntriesCrc,
            found,
        });
    }
    let mut parts = Vec::new();
    for (chunk, index) in array.chunks_exact(h.entry_size_bytes as usize).zip(0u32..) {
        parts.extend(Partition::parse(&Entry::new_checked(chunk)?, index)?);
    }
    check_partitions(&parts, h.first_usable_lba, h.last_usable_lba)?;
    Ok((h, parts))
}

/// The first field in which two valid copies describe different tables.
fn differs(a: &HeaderRepr, b: &HeaderRepr) -> Option<Defect> {
    [
        (Field::DiskGuid, a.disk_guid != b.disk_guid),
        (
            Field::FirstUsableLba,
            a.first_usable_lba != b.first_usable_lba,
        ),
        (Field::LastUsableLba, a.last_usable_lba != b.last_usable_lba),
        (Field::EntryCount, a.entry_count != b.entry_count),
        (Field::EntrySize, a.entry_size_bytes != b.entry_size_bytes),
        (Field::EntriesCrc, a.entries_crc32 != b.entries_crc32),
    ]
    .into_iter()
    .find_map(|(field, d)| d.then_some(Defect::Differs(field)))
}

/// Reads the table from both copies' header sectors and entry arrays (the
/// sectors [`entries_extent`] named; empty for a copy whose header is bad).
/// The primary is used when it is valid, else the backup (§5.3.2); what is
/// wrong with the other copy goes to [`Table::other_copy`].
pub fn read_table(
    primary_header_sector: &[u8],
    primary_entries: &[u8],
    backup_header_sector: &[u8],
    backup_entries: &[u8],
    disk_sectors: u64,
    sector_size: u32,
) -> Result<Table, GptError> {
    check_geometry(disk_sectors, sector_size)?;
    let read =
        |header, entries, source| read_copy(header, entries, source, disk_sectors, sector_size);
    let primary = read(primary_header_sector, primary_entries, Source::Primary);
    let backup = read(backup_header_sector, backup_entries, Source::Backup);
    let ((h, partitions), source, other_copy) = match (primary, backup) {
        (Ok(p), Ok(b)) => {
            let d = differs(&p.0, &b.0);
            (p, Source::Primary, d)
        }
        (Ok(p), Err(e)) => (p, Source::Primary, Some(e)),
        (Err(e), Ok(b)) => (b, Source::Backup, Some(e)),
        (Err(p), Err(b)) => {
            let (primary, backup) = (Box::new(p), Box::new(b));
            return Err(GptError::NoValidTable { primary, backup });
        }
    };
    Ok(Table {
        disk_guid: h.disk_guid,
        first_usable_lba: h.first_usable_lba,
        last_usable_lba: h.last_usable_lba,
        source,
        other_copy,
        partitions,
    })
}

/// What LBA 0 holds (§5.2): informative only, the GPT is read either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MbrKind {
    /// No 0x55AA signature.
    Absent,
    /// A protective MBR: a type 0xEE record and no other.
    Protective,
    /// A hybrid MBR: a type 0xEE record beside others.
    Hybrid,
    /// An MBR without a 0xEE record: a GPT beside it may be stale.
    Legacy,
}

/// Classifies the MBR in the first 512 bytes of LBA 0.
pub fn mbr_kind(sector0: &[u8]) -> MbrKind {
    let Some(mbr) = sector0.get(..512).filter(|m| m[510..] == [0x55, 0xAA]) else {
        return MbrKind::Absent;
    };
    let types = (0..4).map(|i| mbr[446 + 16 * i + 4]);
    let protective = types.clone().any(|t| t == MBR_TYPE_PROTECTIVE);
    let others = types
        .filter(|&t| t != 0 && t != MBR_TYPE_PROTECTIVE)
        .count();
    match (protective, others) {
        (false, _) => MbrKind::Legacy,
        (true, 0) => MbrKind::Protective,
        (true, _) => MbrKind::Hybrid,
    }
}

/// The CHS address of `lba` with 255 heads and 63 sectors per track, or
/// 0xFFFFFF beyond cylinder 1023 (§5.2.1).
fn chs(lba: u64) -> [u8; 3] {
    let cylinder = lba / (255 * 63);
    if cylinder > 1023 {
        return [0xFF; 3];
    }
    let (head, sector) = ((lba / 63) % 255, lba % 63 + 1);
    [
        head as u8,
        (sector as u8) | ((cylinder >> 2) as u8 & 0xC0),
        cylinder as u8,
    ]
}

/// A protective MBR sector (§5.2.3, Table 5.4): one 0xEE record from LBA 1
/// over the rest of the disk, its size capped at 0xFFFFFFFF.
fn protective_mbr(disk_sectors: u64, sector_size: u32) -> Vec<u8> {
    let mut s = vec![0u8; sector_size as usize];
    let last = disk_sectors - 1;
    let rec = &mut s[446..462];
    rec[1..4].copy_from_slice(&chs(1));
    rec[4] = MBR_TYPE_PROTECTIVE;
    rec[5..8].copy_from_slice(&chs(last));
    rec[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = u32::try_from(last).unwrap_or(u32::MAX);
    rec[12..16].copy_from_slice(&size.to_le_bytes());
    s[510..512].copy_from_slice(&[0x55, 0xAA]);
    s
}

/// Everything a new table writes, as (LBA, whole sectors of bytes): the
/// protective MBR, the primary header and array, the backup array and
/// header, placed as [`Layout::new`] says, 128 entries of 128 bytes.
/// Partitions go to their `index` (below 128); their ranges must lie in
/// the usable LBAs and not overlap.
pub fn build(
    disk_sectors: u64,
    sector_size: u32,
    disk_guid: Guid,
    partitions: &[Partition],
) -> Result<Vec<(u64, Vec<u8>)>, GptError> {
    let l = Layout::new(disk_sectors, sector_size)?;
    let ss = sector_size as usize;
    let refused = |d| Err(GptError::Refused(d));
    let array_bytes = BUILD_ENTRY_COUNT as usize * ENTRY_LEN;
    // Whole sectors; only the entries are in the CRC.
    let mut array = vec![0u8; l.entries_sectors as usize * ss];
    for p in partitions {
        if p.index >= BUILD_ENTRY_COUNT {
            return refused(Defect::Index(p.index));
        }
        let at = p.index as usize * ENTRY_LEN;
        let mut view = Entry::new_unchecked(&mut array[at..at + ENTRY_LEN]);
        if !view.type_guid().is_zero() {
            return refused(Defect::Index(p.index));
        }
        if p.type_guid.is_zero() {
            return refused(Defect::ZeroType(p.index));
        }
        p.emit(&mut view).map_err(GptError::Refused)?;
    }
    check_partitions(partitions, l.first_usable_lba, l.last_usable_lba)
        .map_err(GptError::Refused)?;
    let primary = HeaderRepr {
        my_lba: PRIMARY_HEADER_LBA,
        alternate_lba: l.backup_header_lba,
        first_usable_lba: l.first_usable_lba,
        last_usable_lba: l.last_usable_lba,
        disk_guid,
        entries_lba: PRIMARY_ENTRIES_LBA,
        entry_count: BUILD_ENTRY_COUNT,
        entry_size_bytes: ENTRY_LEN as u32,
        entries_crc32: crc32fast::hash(&array[..array_bytes]),
    };
    let backup = HeaderRepr {
        my_lba: l.backup_header_lba,
        alternate_lba: PRIMARY_HEADER_LBA,
        entries_lba: l.backup_entries_lba,
        ..primary.clone()
    };
    let sector = |h: &HeaderRepr| {
        let mut s = vec![0u8; ss];
        h.emit(&mut Header::new_unchecked(&mut s[..])).map(|()| s)
    };
    let (primary, backup) = (sector(&primary), sector(&backup));
    Ok(vec![
        (0, protective_mbr(disk_sectors, sector_size)),
        (PRIMARY_HEADER_LBA, primary.map_err(GptError::Refused)?),
        (PRIMARY_ENTRIES_LBA, array.clone()),
        (l.backup_entries_lba, array),
        (l.backup_header_lba, backup.map_err(GptError::Refused)?),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;
    use proptest::prelude::*;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    const DISK_GUID: Guid = Guid::from_u128(0x01234567_89AB_CDEF_0123_456789ABCDEF);

    fn guid(text: &str) -> Guid {
        Guid::parse(text).unwrap()
    }

    fn part(index: u32, type_guid: Guid, start_lba: u64, end_lba: u64, name: &str) -> Partition {
        Partition {
            index,
            type_guid,
            unique_guid: Guid::from_u128(
                0x1111_0000_2222_3333_4444_4444_4444_4444 ^ ((index as u128) << 96),
            ),
            start_lba,
            end_lba,
            attributes: 0,
            name: name.to_string(),
        }
    }

    /// Three partitions of different types, sizes and names, one of them
    /// not at the next free index.
    fn sample_parts() -> Vec<Partition> {
        let mut efi = part(0, Guid::EFI_SYSTEM, 2048, 4095, "EFI system");
        efi.attributes = 1;
        vec![
            efi,
            part(1, Guid::LINUX_FILESYSTEM, 4096, 12287, "root"),
            part(4, Guid::LINUX_SWAP, 12288, 14335, "swap é ☃"),
        ]
    }

    /// A disk image with `writes` applied.
    fn image(disk_sectors: u64, sector_size: u32, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let ss = sector_size as usize;
        let mut img = vec![0u8; disk_sectors as usize * ss];
        for (lba, b) in writes {
            img[*lba as usize * ss..][..b.len()].copy_from_slice(b);
        }
        img
    }

    fn sectors(img: &[u8], sector_size: u32, e: Extent) -> &[u8] {
        let ss = sector_size as u64;
        let (at, len) = (e.lba * ss, e.len_sectors * ss);
        img.get(at as usize..(at + len) as usize).unwrap_or(&[])
    }

    /// Reads an image the way the class will: both headers, then the
    /// arrays they point at.
    fn read_image(img: &[u8], sector_size: u32) -> Result<Table, GptError> {
        let ss = sector_size as u64;
        let ds = img.len() as u64 / ss;
        let header = |s: Source| {
            sectors(
                img,
                sector_size,
                Extent {
                    lba: s.header_lba(ds),
                    len_sectors: 1,
                },
            )
        };
        let entries = |s: Source| match entries_extent(header(s), s, ds, sector_size) {
            Ok(e) => sectors(img, sector_size, e),
            Err(_) => &[],
        };
        let (p, b) = (Source::Primary, Source::Backup);
        read_table(
            header(p),
            entries(p),
            header(b),
            entries(b),
            ds,
            sector_size,
        )
    }

    /// Sectors of the sample disks, whatever their sector size.
    const SAMPLE_SECTORS: u64 = 20480;

    fn sample_image(sector_size: u32) -> Vec<u8> {
        let ds = SAMPLE_SECTORS;
        let w = build(ds, sector_size, DISK_GUID, &sample_parts()).unwrap();
        image(ds, sector_size, &w)
    }

    fn header_mut(img: &mut [u8], sector_size: u32, s: Source) -> Header<&mut [u8]> {
        let ss = sector_size as usize;
        let lba = s.header_lba((img.len() / ss) as u64) as usize;
        Header::new_unchecked(&mut img[lba * ss..][..ss])
    }

    #[test]
    fn guid_text_is_mixed_endian() {
        let g = guid("0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(g, Guid::LINUX_FILESYSTEM);
        let disk = [
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ];
        assert_eq!(g.0, disk);
        assert_eq!(g.to_string(), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(
            guid("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"),
            Guid::EFI_SYSTEM
        );
        assert_eq!(
            format!("{:?}", Guid::ZERO),
            "Guid(00000000-0000-0000-0000-000000000000)"
        );
        for bad in [
            "",
            "0FC63DAF-8483-4772-8E79-3D69D8477DE",
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4F",
            "0FC63DAF+8483-4772-8E79-3D69D8477DE4",
            "0FC63DAF-8483-4772-8E793-D69D8477DE4",
            "0FC63DAG-8483-4772-8E79-3D69D8477DE4",
            "0FC63DAF-8483-4772-8E79-3D69D8477Dé",
        ] {
            assert_eq!(Guid::parse(bad), None, "{bad:?}");
        }
    }

    /// The primary header of [`sample_header`], written out by hand from
    /// Table 5.5.
    fn sample_header_bytes() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"EFI PART");
        b.extend_from_slice(&[0, 0, 1, 0]);
        b.extend_from_slice(&[92, 0, 0, 0]);
        b.extend_from_slice(&[0; 4]); // CRC, filled below
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0xFF, 0x0F, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[34, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0xDE, 0x0F, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[
            0x67, 0x45, 0x23, 0x01, 0xAB, 0x89, 0xEF, 0xCD, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB,
            0xCD, 0xEF,
        ]);
        b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[128, 0, 0, 0]);
        b.extend_from_slice(&[128, 0, 0, 0]);
        b.extend_from_slice(&[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(b.len(), HEADER_LEN);
        let crc = crc32fast::hash(&b);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn sample_header() -> HeaderRepr {
        HeaderRepr {
            my_lba: 1,
            alternate_lba: 4095,
            first_usable_lba: 34,
            last_usable_lba: 4062,
            disk_guid: DISK_GUID,
            entries_lba: 2,
            entry_count: 128,
            entry_size_bytes: 128,
            entries_crc32: 0x1234_5678,
        }
    }

    #[test]
    fn header_fields_match_the_layout_table() {
        let mut s = vec![0u8; 512];
        sample_header()
            .emit(&mut Header::new_unchecked(&mut s[..]))
            .unwrap();
        assert_eq!(&s[..HEADER_LEN], &sample_header_bytes()[..]);
        assert!(s[HEADER_LEN..].iter().all(|&b| b == 0));
        let view = Header::new_checked(&s[..]).unwrap();
        assert_eq!(HeaderRepr::parse(&view), Ok(sample_header()));
        assert_eq!(view.revision(), REVISION);
        assert_eq!(view.header_size_bytes(), 92);
        assert_eq!(view.compute_header_crc32(), Some(view.header_crc32()));
        assert_eq!(sample_header().check(Source::Primary, 4096, 512), Ok(()));
        assert_eq!(sample_header().entries_sectors(512), 32);
        assert_eq!(sample_header().entries_sectors(4096), 4);
        assert_eq!(
            HeaderRepr::parse(&Header::new_unchecked(&s[..91])),
            Err(Defect::Truncated {
                need_bytes: 92,
                have_bytes: 91
            })
        );
    }

    #[test]
    fn a_longer_header_is_read_and_its_crc_covers_header_size() {
        let mut s = vec![0u8; 512];
        sample_header()
            .emit(&mut Header::new_unchecked(&mut s[..]))
            .unwrap();
        let mut v = Header::new_unchecked(&mut s[..]);
        v.set_header_size_bytes(100);
        v.fill_header_crc32();
        assert_eq!(HeaderRepr::parse(&v), Ok(sample_header()));
        s[99] = 1; // inside HeaderSize: checked
        let v = Header::new_unchecked(&s[..]);
        assert!(matches!(
            HeaderRepr::parse(&v),
            Err(Defect::Field {
                field: Field::HeaderCrc,
                ..
            })
        ));
        let v = Header::new_unchecked(&s[..99]); // HeaderSize beyond the sector
        assert!(matches!(
            HeaderRepr::parse(&v),
            Err(Defect::Field {
                field: Field::HeaderSize,
                found: 100
            })
        ));
    }

    #[test]
    fn entry_fields_match_the_layout_table() {
        let mut b = Vec::new();
        b.extend_from_slice(&Guid::LINUX_FILESYSTEM.0);
        b.extend_from_slice(&[
            0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06,
            0x07, 0x08,
        ]);
        b.extend_from_slice(&[0x00, 0x08, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0xFF, 0x2F, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[4, 0, 0, 0, 0, 0, 0, 0x80]);
        for c in "root ☃".encode_utf16() {
            b.extend_from_slice(&c.to_le_bytes());
        }
        b.resize(ENTRY_LEN, 0);
        let p = Partition {
            index: 7,
            type_guid: Guid::LINUX_FILESYSTEM,
            unique_guid: guid("76543210-BA98-FEDC-0102-030405060708"),
            start_lba: 2048,
            end_lba: 12287,
            attributes: 0x8000_0000_0000_0004,
            name: "root ☃".to_string(),
        };
        assert_eq!(
            &b[56..68],
            &[b'r', 0, b'o', 0, b'o', 0, b't', 0, b' ', 0, 0x03, 0x26]
        );
        let mut e = vec![0u8; ENTRY_LEN];
        p.emit(&mut Entry::new_unchecked(&mut e[..])).unwrap();
        assert_eq!(e, b);
        assert_eq!(
            Partition::parse(&Entry::new_checked(&b[..]).unwrap(), 7),
            Ok(Some(p.clone()))
        );
        assert_eq!(p.len_sectors(), 10240);
        // Unused entry, and a name using all 36 units with no NUL.
        assert_eq!(
            Partition::parse(&Entry::new_checked(&[0u8; 128][..]).unwrap(), 0),
            Ok(None)
        );
        let mut full = p.clone();
        full.name = "x".repeat(36);
        full.emit(&mut Entry::new_unchecked(&mut e[..])).unwrap();
        assert_eq!(
            Partition::parse(&Entry::new_unchecked(&e[..]), 7),
            Ok(Some(full.clone()))
        );
        full.name.push('x');
        let err = full.emit(&mut Entry::new_unchecked(&mut e[..]));
        assert_eq!(err, Err(Defect::Name(7)));
        full.name = "a\0b".to_string();
        assert_eq!(
            full.emit(&mut Entry::new_unchecked(&mut e[..])),
            Err(Defect::Name(7))
        );
        // Unpaired surrogate: read, not refused.
        e[56..58].copy_from_slice(&0xD800u16.to_le_bytes());
        e[58..60].copy_from_slice(&0u16.to_le_bytes());
        let odd = Partition::parse(&Entry::new_unchecked(&e[..]), 7)
            .unwrap()
            .unwrap();
        assert_eq!(odd.name, "\u{FFFD}");
        assert_eq!(
            Entry::new_checked(&e[..127]).err(),
            Some(Defect::Truncated {
                need_bytes: 128,
                have_bytes: 127
            })
        );
    }

    #[test]
    fn build_writes_the_sgdisk_layout() {
        let w = build(65536, 512, DISK_GUID, &sample_parts()).unwrap();
        let lbas: Vec<(u64, usize)> = w.iter().map(|(l, b)| (*l, b.len())).collect();
        assert_eq!(
            lbas,
            [(0, 512), (1, 512), (2, 16384), (65503, 16384), (65535, 512)]
        );
        let l = Layout::new(65536, 512).unwrap();
        assert_eq!((l.first_usable_lba, l.last_usable_lba), (34, 65502));
        let w = build(20480, 4096, DISK_GUID, &sample_parts()).unwrap();
        let lbas: Vec<(u64, usize)> = w.iter().map(|(l, b)| (*l, b.len())).collect();
        assert_eq!(
            lbas,
            [
                (0, 4096),
                (1, 4096),
                (2, 16384),
                (20475, 16384),
                (20479, 4096)
            ]
        );
        let l = Layout::new(20480, 4096).unwrap();
        assert_eq!((l.first_usable_lba, l.last_usable_lba), (6, 20474));
        // The protective MBR: one 0xEE record from LBA 1, CHS as sgdisk writes it.
        let mbr = &build(65536, 512, DISK_GUID, &[]).unwrap()[0].1;
        assert_eq!(
            &mbr[446..462],
            &[0, 0, 2, 0, 0xEE, 0x14, 0x10, 0x04, 1, 0, 0, 0, 0xFF, 0xFF, 0, 0]
        );
        assert_eq!(&mbr[510..], &[0x55, 0xAA]);
        assert_eq!(mbr_kind(mbr), MbrKind::Protective);
    }

    #[test]
    fn mbr_kinds() {
        let mut mbr = build(1 << 40, 512, DISK_GUID, &[]).unwrap()[0].1.clone();
        assert_eq!(&mbr[451..454], &[0xFF; 3]);
        assert_eq!(&mbr[458..462], &[0xFF; 4]);
        assert_eq!(mbr_kind(&mbr), MbrKind::Protective);
        mbr[446 + 16 + 4] = 0x83;
        assert_eq!(mbr_kind(&mbr), MbrKind::Hybrid);
        mbr[446 + 4] = 0;
        assert_eq!(mbr_kind(&mbr), MbrKind::Legacy);
        mbr[511] = 0;
        assert_eq!(mbr_kind(&mbr), MbrKind::Absent);
        assert_eq!(mbr_kind(&mbr[..100]), MbrKind::Absent);
    }

    #[test]
    fn round_trip_at_512_and_4096() {
        for ss in [512, 4096] {
            let img = sample_image(ss);
            let t = read_image(&img, ss).unwrap();
            let l = Layout::new(img.len() as u64 / ss as u64, ss).unwrap();
            assert_eq!(
                t,
                Table {
                    disk_guid: DISK_GUID,
                    first_usable_lba: l.first_usable_lba,
                    last_usable_lba: l.last_usable_lba,
                    source: Source::Primary,
                    other_copy: None,
                    partitions: sample_parts(),
                }
            );
            assert_eq!(mbr_kind(&img), MbrKind::Protective);
        }
        // An empty table, and the smallest disk that holds one.
        let w = build(68, 512, DISK_GUID, &[]).unwrap();
        let t = read_image(&image(68, 512, &w), 512).unwrap();
        assert_eq!(
            (t.first_usable_lba, t.last_usable_lba, t.partitions.len()),
            (34, 34, 0)
        );
        assert!(Layout::new(67, 512).is_err());
    }

    #[test]
    fn every_bit_flip_in_the_primary_header_falls_back_to_the_backup() {
        for ss in [512, 4096] {
            let mut img = sample_image(ss);
            let at = ss as usize; // LBA 1
            for byte in at..at + HEADER_LEN {
                for bit in 0..8 {
                    img[byte] ^= 1 << bit;
                    let t = read_image(&img, ss).unwrap();
                    assert_eq!(t.source, Source::Backup, "byte {} bit {bit}", byte - at);
                    assert!(t.other_copy.is_some());
                    assert_eq!(t.partitions, sample_parts());
                    img[byte] ^= 1 << bit;
                }
            }
            assert_eq!(read_image(&img, ss).unwrap().source, Source::Primary);
        }
    }

    #[test]
    fn a_damaged_backup_is_reported_beside_the_primary() {
        let good = sample_image(512);
        let last = good.len() - 512;
        for byte in last..last + HEADER_LEN {
            let mut img = good.clone();
            img[byte] ^= 0x10;
            let t = read_image(&img, 512).unwrap();
            assert_eq!(t.source, Source::Primary);
            assert!(t.other_copy.is_some(), "byte {}", byte - last);
        }
        // The class may skip the backup: it shows as missing.
        let t = read_table(
            &good[512..1024],
            &good[1024..1024 + 16384],
            &[],
            &[],
            SAMPLE_SECTORS,
            512,
        );
        assert_eq!(
            t.unwrap().other_copy,
            Some(Defect::Truncated {
                need_bytes: 512,
                have_bytes: 0
            })
        );
    }

    #[test]
    fn damaged_entries_fall_back_and_two_damaged_copies_fail() {
        let good = sample_image(512);
        let (primary_entries, backup_entries) = (2 * 512, good.len() - 33 * 512);
        let mut img = good.clone();
        img[primary_entries + 128 + 40] ^= 1; // entry 1's EndingLBA
        let t = read_image(&img, 512).unwrap();
        assert_eq!(t.source, Source::Backup);
        assert!(matches!(
            t.other_copy,
            Some(Defect::Field {
                field: Field::EntriesCrc,
                ..
            })
        ));
        assert_eq!(t.partitions, sample_parts());
        // A byte in an unused entry is covered too.
        let mut img = good.clone();
        img[primary_entries + 16383] = 1;
        assert_eq!(read_image(&img, 512).unwrap().source, Source::Backup);
        // Both arrays damaged.
        img[backup_entries + 5] ^= 0x80;
        let e = read_image(&img, 512).unwrap_err();
        assert!(matches!(
            &e,
            GptError::NoValidTable { primary, backup }
                if matches!(**primary, Defect::Field { field: Field::EntriesCrc, .. })
                && matches!(**backup, Defect::Field { field: Field::EntriesCrc, .. })
        ));
        let msg = e.to_string();
        assert!(
            msg.contains("primary: bad PartitionEntryArrayCRC32"),
            "{msg}"
        );
        assert!(
            msg.contains("backup: bad PartitionEntryArrayCRC32"),
            "{msg}"
        );
        // One header and the other array.
        let mut img = good.clone();
        img[512 + 30] ^= 1;
        img[backup_entries] ^= 1;
        assert!(matches!(
            read_image(&img, 512),
            Err(GptError::NoValidTable { .. })
        ));
        // A blank disk.
        let e = read_image(&vec![0u8; 1 << 20], 512).unwrap_err();
        assert!(e.to_string().contains("no GPT here"), "{e}");
    }

    /// Rewrites a field of the primary header, CRC fixed, and returns what
    /// is said about the primary.
    fn primary_with(f: impl FnOnce(&mut Header<&mut [u8]>)) -> Option<Defect> {
        let mut img = sample_image(512);
        let mut h = header_mut(&mut img, 512, Source::Primary);
        f(&mut h);
        h.fill_header_crc32();
        let t = read_image(&img, 512).unwrap();
        assert_eq!(t.source, Source::Backup);
        t.other_copy
    }

    /// A change to a header, for tables of cases.
    type Edit<'a> = &'a dyn Fn(&mut Header<&mut [u8]>);

    fn field_of(d: Option<Defect>) -> Option<Field> {
        match d {
            Some(Defect::Field { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn inconsistent_fields_are_rejected_even_with_a_good_crc() {
        let ds = SAMPLE_SECTORS;
        let cases: [(Field, Edit<'_>); 15] = [
            (Field::Signature, &|h| h.buffer[0] = b'e'),
            (Field::Revision, &|h| h.set_revision(0x0002_0000)),
            (Field::HeaderSize, &|h| h.set_header_size_bytes(91)),
            (Field::HeaderSize, &|h| h.set_header_size_bytes(513)),
            (Field::Reserved, &|h| h.set_reserved(1)),
            (Field::MyLba, &|h| h.set_my_lba(2)),
            (Field::AlternateLba, &|h| h.set_alternate_lba(ds - 2)),
            (Field::FirstUsableLba, &|h| h.set_first_usable_lba(1)),
            (Field::FirstUsableLba, &|h| h.set_first_usable_lba(ds)),
            (Field::LastUsableLba, &|h| h.set_last_usable_lba(ds - 1)),
            (Field::EntriesLba, &|h| h.set_entries_lba(3)),
            (Field::EntriesLba, &|h| h.set_entries_lba(u64::MAX)),
            (Field::EntrySize, &|h| h.set_entry_size_bytes(384)),
            (Field::EntryCount, &|h| h.set_entry_count(0)),
            (Field::EntryCount, &|h| h.set_entry_count(8193)),
        ];
        for (want, f) in cases {
            assert_eq!(field_of(primary_with(f)), Some(want), "{want}");
        }
        // Entries in the usable space: also caught as the array running into
        // FirstUsableLBA.
        let d = primary_with(|h| h.set_first_usable_lba(20));
        assert_eq!(field_of(d), Some(Field::EntriesLba));
        // A larger entry size makes the array run into the usable LBAs.
        let d = primary_with(|h| h.set_entry_size_bytes(256));
        assert_eq!(field_of(d), Some(Field::EntriesLba));
        let d = primary_with(|h| h.set_entry_count(64));
        assert_eq!(field_of(d), Some(Field::EntriesCrc));
        // A valid primary describing another disk: the backup differs.
        let mut img = sample_image(512);
        let mut h = header_mut(&mut img, 512, Source::Backup);
        h.set_disk_guid(Guid::ZERO);
        h.fill_header_crc32();
        let t = read_image(&img, 512).unwrap();
        assert_eq!(t.source, Source::Primary);
        assert_eq!(t.other_copy, Some(Defect::Differs(Field::DiskGuid)));
    }

    /// Applies `f` to both entry arrays of the sample image and fixes every
    /// CRC, so only the entry checks can reject the table.
    fn entries_with(f: impl Fn(&mut [u8])) -> Result<Table, GptError> {
        let mut img = sample_image(512);
        let ds = img.len() / 512;
        for (entries, s) in [(2, Source::Primary), (ds - 33, Source::Backup)] {
            let array = &mut img[entries * 512..][..16384];
            f(array);
            let crc = crc32fast::hash(array);
            let mut h = header_mut(&mut img, 512, s);
            h.set_entries_crc32(crc);
            h.fill_header_crc32();
        }
        read_image(&img, 512)
    }

    fn both(e: Result<Table, GptError>) -> Defect {
        match e {
            Err(GptError::NoValidTable { primary, backup }) if primary == backup => *primary,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_entries_name_the_entry() {
        let set = |i: usize, at: usize, v: u64| {
            move |a: &mut [u8]| a[i * 128 + at..][..8].copy_from_slice(&v.to_le_bytes())
        };
        let d = both(entries_with(set(1, 40, 4000)));
        assert_eq!(
            d,
            Defect::Inverted {
                index: 1,
                start_lba: 4096,
                end_lba: 4000
            }
        );
        let d = both(entries_with(set(4, 40, 1 << 30)));
        assert_eq!(
            d,
            Defect::OutsideUsable {
                index: 4,
                start_lba: 12288,
                end_lba: 1 << 30
            }
        );
        let d = both(entries_with(set(0, 32, 33)));
        assert!(matches!(d, Defect::OutsideUsable { index: 0, .. }));
        let d = both(entries_with(set(4, 32, 12287)));
        assert_eq!(d, Defect::Overlap { index: 1, other: 4 });
        // An entry after a hole is still found; one inside another overlaps.
        let d = both(entries_with(|a| {
            a[100 * 128..][..16].copy_from_slice(&Guid::FREEBSD_UFS.0);
            a[100 * 128 + 32..][..8].copy_from_slice(&5000u64.to_le_bytes());
            a[100 * 128 + 40..][..8].copy_from_slice(&5000u64.to_le_bytes());
        }));
        assert_eq!(
            d,
            Defect::Overlap {
                index: 1,
                other: 100
            }
        );
        assert_eq!(
            GptError::NoValidTable {
                primary: Box::new(d.clone()),
                backup: Box::new(d)
            }
            .to_string(),
            "no valid GPT: primary: entries 1 and 100 overlap; backup: entries 1 and 100 overlap"
        );
    }

    #[test]
    fn error_messages_name_the_copy_and_field() {
        let e = entries_extent(&[0u8; 512], Source::Backup, 100, 512).unwrap_err();
        assert_eq!(
            e.to_string(),
            "backup GPT: bad Signature 0x0 (not \"EFI PART\": no GPT here)"
        );
        let img = sample_image(512);
        let e = entries_extent(&img[512..1024], Source::Primary, 9999, 512).unwrap_err();
        assert_eq!(
            e.to_string(),
            "primary GPT: bad AlternateLBA 20479 (must point at the other header \
             (LBA 1 or the disk's last LBA; was the disk resized?))"
        );
        let e = build(1000, 1000, DISK_GUID, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a disk of 1000 sectors of 1000 bytes cannot hold a GPT"
        );
        let e = read_table(&[], &[], &[], &[], 2, 512).unwrap_err();
        assert_eq!(
            e,
            GptError::Geometry {
                disk_sectors: 2,
                sector_size: 512
            }
        );
    }

    #[test]
    fn build_refuses_bad_partitions() {
        let refused = |parts: &[Partition]| match build(65536, 512, DISK_GUID, parts) {
            Err(GptError::Refused(d)) => d,
            other => panic!("{other:?}"),
        };
        let p = |i, s, e| part(i, Guid::LINUX_FILESYSTEM, s, e, "p");
        assert_eq!(refused(&[p(128, 2048, 4095)]), Defect::Index(128));
        assert_eq!(refused(&[p(u32::MAX, 2048, 4095)]), Defect::Index(u32::MAX));
        assert_eq!(
            refused(&[p(3, 2048, 4095), p(3, 8192, 9000)]),
            Defect::Index(3)
        );
        assert_eq!(
            refused(&[p(0, 2048, 4095), p(1, 4095, 9000)]),
            Defect::Overlap { index: 0, other: 1 }
        );
        assert!(matches!(
            refused(&[p(0, 33, 4095)]),
            Defect::OutsideUsable { index: 0, .. }
        ));
        assert!(matches!(
            refused(&[p(0, 2048, 65503)]),
            Defect::OutsideUsable { .. }
        ));
        assert!(matches!(
            refused(&[p(0, 2048, 2047)]),
            Defect::Inverted { .. }
        ));
        let mut z = p(2, 2048, 4095);
        z.type_guid = Guid::ZERO;
        assert_eq!(refused(&[z]), Defect::ZeroType(2));
        let mut n = p(5, 2048, 4095);
        n.name = "n".repeat(37);
        assert_eq!(refused(&[n]), Defect::Name(5));
        assert!(build(
            65536,
            512,
            DISK_GUID,
            &[p(0, 34, 65502), p(127, 65502, 65502)]
        )
        .is_err());
        assert!(build(
            65536,
            512,
            DISK_GUID,
            &[p(0, 34, 65501), p(127, 65502, 65502)]
        )
        .is_ok());
    }

    /// A fresh image file path, removed when dropped.
    struct TempImage(PathBuf);

    impl TempImage {
        fn new(name: &str, bytes: u64) -> TempImage {
            let p =
                std::env::temp_dir().join(format!("strata-gpt-{}-{name}.img", std::process::id()));
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(bytes).unwrap();
            TempImage(p)
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The path of `name`, or a failure naming the Debian package to install.
    fn tool(name: &str, package: &str) -> PathBuf {
        let path = std::env::var("PATH").unwrap_or_default();
        for dir in path.split(':').chain(["/usr/sbin", "/sbin"]) {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
        panic!(
            "`{name}` is not installed: install the Debian package `{package}` \
             (apt-get install -y {package}; tests/strata.sh test does it)"
        );
    }

    /// Runs `cmd` with `stdin`, checks it succeeded, and returns its
    /// standard output and error.
    fn run(cmd: &mut Command, stdin: &str) -> (String, String) {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{cmd:?} failed: {stdout}{stderr}");
        (stdout, stderr)
    }

    fn found(t: &Table) -> Vec<(u32, Guid, u64, u64, &str)> {
        let f = t.partitions.iter();
        f.map(|p| {
            (
                p.index,
                p.type_guid,
                p.start_lba,
                p.end_lba,
                p.name.as_str(),
            )
        })
        .collect()
    }

    #[test]
    fn reads_a_table_written_by_sfdisk() {
        let sfdisk = tool("sfdisk", "fdisk");
        let img = TempImage::new("sfdisk", 32 << 20);
        let script = "label: gpt\n\
            label-id: 01234567-89AB-CDEF-0123-456789ABCDEF\n\
            unit: sectors\n\
            start=2048, size=4096, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\", \
              uuid=11111111-2222-3333-4444-555555555555\n\
            start=6144, size=1024, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=\"swap space\"\n\
            start=8192, size=20480, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, \
              name=\"EFI système\"\n";
        run(
            Command::new(sfdisk)
                .args(["--no-reread", "--no-tell-kernel"])
                .arg(&img.0),
            script,
        );
        let bytes = std::fs::read(&img.0).unwrap();
        let t = read_image(&bytes, 512).unwrap();
        assert_eq!(
            (t.source, &t.other_copy, t.disk_guid),
            (Source::Primary, &None, DISK_GUID)
        );
        assert_eq!(
            found(&t),
            [
                (0, Guid::LINUX_FILESYSTEM, 2048, 6143, "root"),
                (1, Guid::LINUX_SWAP, 6144, 7167, "swap space"),
                (2, Guid::EFI_SYSTEM, 8192, 28671, "EFI système"),
            ]
        );
        assert_eq!(
            t.partitions[0].unique_guid,
            guid("11111111-2222-3333-4444-555555555555")
        );
        // sfdisk aligns FirstUsableLBA; the header's values are kept.
        assert_eq!((t.first_usable_lba, t.last_usable_lba), (2048, 65502));
        assert_eq!(mbr_kind(&bytes), MbrKind::Protective);
    }

    #[test]
    fn reads_a_table_written_by_sgdisk() {
        let sgdisk = tool("sgdisk", "gdisk");
        let img = TempImage::new("sgdisk", 32 << 20);
        run(
            Command::new(sgdisk)
                .args(["-o", "-U", "01234567-89AB-CDEF-0123-456789ABCDEF"])
                .args(["-n", "1:2048:6143", "-t", "1:8300", "-c", "1:root"])
                .args(["-n", "2:6144:8191", "-t", "2:8200", "-c", "2:swap"])
                .args(["-n", "5:8192:40959", "-t", "5:ef00", "-c", "5:EFI system"])
                .args(["-A", "5:set:0"])
                .arg(&img.0),
            "",
        );
        let bytes = std::fs::read(&img.0).unwrap();
        let t = read_image(&bytes, 512).unwrap();
        assert_eq!(
            (t.source, &t.other_copy, t.disk_guid),
            (Source::Primary, &None, DISK_GUID)
        );
        assert_eq!((t.first_usable_lba, t.last_usable_lba), (34, 65502));
        assert_eq!(
            found(&t),
            [
                (0, Guid::LINUX_FILESYSTEM, 2048, 6143, "root"),
                (1, Guid::LINUX_SWAP, 6144, 8191, "swap"),
                (4, Guid::EFI_SYSTEM, 8192, 40959, "EFI system"),
            ]
        );
        assert_eq!(t.partitions[2].attributes, 1);
        assert_eq!(mbr_kind(&bytes), MbrKind::Protective);
        // sgdisk's backup alone gives the same table.
        let mut damaged = bytes.clone();
        damaged[512..1024].fill(0);
        let b = read_image(&damaged, 512).unwrap();
        assert_eq!((b.source, &b.partitions), (Source::Backup, &t.partitions));
    }

    #[test]
    fn a_built_table_passes_sgdisk_verify_and_sfdisk_lists_it() {
        let (sgdisk, sfdisk) = (tool("sgdisk", "gdisk"), tool("sfdisk", "fdisk"));
        let disk_sectors = 65536;
        let img = TempImage::new("built", disk_sectors * 512);
        let mut bytes = image(
            disk_sectors,
            512,
            &build(disk_sectors, 512, DISK_GUID, &sample_parts()).unwrap(),
        );
        std::fs::write(&img.0, &bytes).unwrap();
        let (out, _) = run(Command::new(&sgdisk).arg("-v").arg(&img.0), "");
        assert!(out.contains("No problems found"), "{out}");
        assert!(
            !out.contains("Problem:") && !out.contains("Warning"),
            "{out}"
        );
        let (out, _) = run(Command::new(&sfdisk).arg("--json").arg(&img.0), "");
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        let pt = &json["partitiontable"];
        assert_eq!(pt["label"], "gpt");
        assert_eq!(pt["id"], DISK_GUID.to_string());
        assert_eq!(
            (pt["firstlba"].as_u64(), pt["lastlba"].as_u64()),
            (Some(34), Some(65502))
        );
        let listed: Vec<(u64, u64, String, String, String)> = pt["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let s = |k: &str| p[k].as_str().unwrap().to_string();
                (
                    p["start"].as_u64().unwrap(),
                    p["size"].as_u64().unwrap(),
                    s("type"),
                    s("uuid"),
                    s("name"),
                )
            })
            .collect();
        let want: Vec<_> = sample_parts()
            .iter()
            .map(|p| {
                (
                    p.start_lba,
                    p.len_sectors(),
                    p.type_guid.to_string(),
                    p.unique_guid.to_string(),
                    p.name.clone(),
                )
            })
            .collect();
        assert_eq!(listed, want);
        // With the primary header damaged, sgdisk reads our backup.
        bytes[512 + 24] ^= 1;
        std::fs::write(&img.0, &bytes).unwrap();
        let (out, err) = run(Command::new(&sgdisk).arg("-p").arg(&img.0), "");
        assert!(err.contains("Main header: ERROR"), "{err}");
        assert!(err.contains("Backup header: OK"), "{err}");
        assert!(err.contains("Backup partition table: OK"), "{err}");
        for p in sample_parts() {
            let row = format!("{:>4}  {:>14}  {:>14}", p.index + 1, p.start_lba, p.end_lba);
            assert!(
                out.contains(&row) && out.contains(&p.name),
                "{row} in {out}"
            );
        }
    }

    /// Rewrites both copies' CRCs for whatever their headers now say, so
    /// that mutations reach the checks behind the CRCs.
    fn fix_crcs(img: &mut [u8], ss: u32) {
        for s in [Source::Primary, Source::Backup] {
            let h = header_mut(img, ss, s);
            let at = h.entries_lba().saturating_mul(ss.into());
            let len = u64::from(h.entry_count()) * u64::from(h.entry_size_bytes());
            let array = img.get(at as usize..at.saturating_add(len) as usize);
            let crc = array.map(crc32fast::hash);
            let mut h = header_mut(img, ss, s);
            if let Some(crc) = crc {
                h.set_entries_crc32(crc);
            }
            h.fill_header_crc32();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Any bytes and geometry: an answer or an error, never a panic.
        #[test]
        fn random_bytes_never_panic(
            ph in proptest::collection::vec(any::<u8>(), 0..600),
            pe in proptest::collection::vec(any::<u8>(), 0..1200),
            bh in proptest::collection::vec(any::<u8>(), 0..600),
            be in proptest::collection::vec(any::<u8>(), 0..1200),
            ds in prop_oneof![Just(0u64), Just(3), 0u64..200, Just(u64::MAX)],
            ss in prop_oneof![Just(0u32), Just(512), Just(4096), Just(513), Just(u32::MAX)],
            text in "[0-9A-Fa-f-]{0,40}",
        ) {
            let _ = read_table(&ph, &pe, &bh, &be, ds, ss);
            let _ = entries_extent(&ph, Source::Primary, ds, ss);
            let _ = entries_extent(&bh, Source::Backup, ds, ss);
            let _ = mbr_kind(&ph);
            let _ = Guid::parse(&text);
            if let Ok(h) = Header::new_checked(&ph[..]) {
                if let Ok(r) = HeaderRepr::parse(&h) {
                    let _ = r.check(Source::Primary, ds, ss);
                    let _ = r.entries_sectors(ss);
                }
            }
        }

        /// Random byte changes to a valid table's metadata, mostly in the
        /// headers and often small values, with the CRCs fixed or not:
        /// never a panic, and a table that is accepted satisfies the checks.
        #[test]
        fn mutated_tables_never_panic(
            ss in prop_oneof![Just(512u32), Just(4096)],
            edits in proptest::collection::vec((any::<u32>(), any::<u8>(), 0u8..4), 1..12),
            fix in any::<bool>(),
        ) {
            let ds = 256 * 512 / u64::from(ss) + 96;
            let parts = [
                part(2, Guid::FREEBSD_UFS, 40, 79, "a"),
                part(9, Guid::LINUX_SWAP, 80, 95, "b"),
            ];
            let mut img = image(ds, ss, &build(ds, ss, DISK_GUID, &parts).unwrap());
            let (ss_bytes, last_lba) = (ss as usize, ds as usize - 1);
            let array_sectors = 16384 / ss_bytes;
            for (at, v, how) in edits {
                let off = match how {
                    0 | 1 => {
                        let lba = if at % 2 == 0 { 1 } else { last_lba };
                        lba * ss_bytes + (at as usize >> 1) % HEADER_LEN
                    }
                    _ if at % 2 == 0 => (at as usize >> 1) % ((2 + array_sectors) * ss_bytes),
                    _ => (last_lba - array_sectors) * ss_bytes
                        + (at as usize >> 1) % ((array_sectors + 1) * ss_bytes),
                };
                img[off] = if how == 1 { v % 4 } else { v };
            }
            if fix {
                fix_crcs(&mut img, ss);
            }
            if let Ok(t) = read_image(&img, ss) {
                prop_assert!(t.first_usable_lba >= 2 && t.last_usable_lba < ds - 1);
                prop_assert!(t.first_usable_lba <= t.last_usable_lba);
                for p in &t.partitions {
                    prop_assert!(t.first_usable_lba <= p.start_lba && p.start_lba <= p.end_lba);
                    prop_assert!(p.end_lba <= t.last_usable_lba);
                }
                // Writing it back may be refused, never panic.
                let _ = build(ds, ss, t.disk_guid, &t.partitions);
            }
        }

        /// Random non-overlapping partitions, with holes in the array and
        /// any names that fit, survive build and read.
        #[test]
        fn round_trip(
            ss in prop_oneof![Just(512u32), Just(4096)],
            specs in proptest::collection::vec(
                (0u64..50, 1u64..200, 0u32..128, "\\PC{0,20}"), 0..20),
            seed in any::<u64>(),
        ) {
            let ds = 10_000u64;
            let mut next_lba = Layout::new(ds, ss).unwrap().first_usable_lba;
            let mut parts: Vec<Partition> = Vec::new();
            for (i, (gap, len, index, name)) in specs.into_iter().enumerate() {
                if parts.iter().any(|p| p.index == index) || name.encode_utf16().count() > 36 {
                    continue;
                }
                let start = next_lba + gap;
                let type_guid = Guid::from_u128((u128::from(seed | 1) << 64) | i as u128);
                let mut p = part(index, type_guid, start, start + len - 1, &name);
                p.attributes = seed.rotate_left(i as u32);
                next_lba = start + len;
                parts.push(p);
            }
            let w = build(ds, ss, Guid::from_u128(seed.into()), &parts).unwrap();
            let t = read_image(&image(ds, ss, &w), ss).unwrap();
            parts.sort_by_key(|p| p.index);
            prop_assert_eq!(t.partitions, parts);
            prop_assert_eq!(t.other_copy, None);
        }
    }
}
