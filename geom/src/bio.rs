//! The bio: one block I/O request travelling down the stack and back up.
//!
//! A bio carries its data as a [`SgList`] of page references. On its way
//! down each geom that wants to see the completion pushes a frame; on the
//! way up the stack pops them in reverse order and hands the bio (with its
//! pages) back to each geom's `done`. A bio is owned by exactly one party
//! at a time, so it cannot complete twice.

use crate::page::SgList;
use alloc::vec::Vec;
use smallvec::SmallVec;

/// What a bio asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BioCmd {
    /// Read `length` bytes at `offset` into the pages.
    Read,
    /// Write the pages' bytes at `offset`.
    Write,
    /// Make every completed write stable (a cache flush).
    Flush,
    /// The range's contents are no longer needed (TRIM).
    Discard,
    /// The range must read back as zeroes.
    WriteZeroes,
    /// Report which parts of the range hold data, in [`Bio::extents`];
    /// changes nothing (NBD's `base:allocation` block status). A provider
    /// that cannot tell leaves `extents` empty: every byte counts as data.
    GetAllocation,
}

impl BioCmd {
    /// True for commands that change the medium.
    pub fn is_write(self) -> bool {
        matches!(self, BioCmd::Write | BioCmd::Discard | BioCmd::WriteZeroes)
    }

    /// True for commands that carry a data payload.
    pub fn has_data(self) -> bool {
        matches!(self, BioCmd::Read | BioCmd::Write)
    }

    /// A short lowercase name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            BioCmd::Read => "read",
            BioCmd::Write => "write",
            BioCmd::Flush => "flush",
            BioCmd::Discard => "discard",
            BioCmd::WriteZeroes => "write_zeroes",
            BioCmd::GetAllocation => "get_allocation",
        }
    }
}

/// Why a bio failed. The protocol engines turn these into NBD errno values
/// or SCSI sense data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BioError {
    /// The medium or device reported an error (EIO).
    Io,
    /// Offset, length or alignment is invalid (EINVAL).
    Invalid,
    /// The request ends past the end of the provider (EINVAL; NBD
    /// answers a write past the end with ENOSPC, as proto.md asks).
    OutOfRange,
    /// The provider is gone (ENXIO): its device died or its geom was destroyed.
    Orphaned,
    /// The consumer lacks the access this request needs (EPERM).
    Access,
    /// The provider cannot do this command (EOPNOTSUPP).
    NotSupported,
    /// No memory or queue space; the request may be retried (ENOMEM).
    NoMemory,
    /// The medium has no room left (ENOSPC): a host file system that is
    /// full, a thin device out of space.
    NoSpace,
}

impl BioError {
    /// The POSIX errno this error is reported as.
    pub fn errno(self) -> i32 {
        match self {
            BioError::Io => 5,
            BioError::Invalid => 22,
            BioError::OutOfRange => 22,
            BioError::Orphaned => 6,
            BioError::Access => 1,
            BioError::NotSupported => 95,
            BioError::NoMemory => 12,
            BioError::NoSpace => 28,
        }
    }
}

impl From<crate::page::PageBusy> for BioError {
    /// A class that finds a page it must map still held by a device has
    /// met a bug below it; the request fails rather than touch the bytes.
    fn from(_: crate::page::PageBusy) -> BioError {
        BioError::Io
    }
}

impl From<crate::page::NoMemory> for BioError {
    /// No memory for the pages a request needs: the request may be retried.
    fn from(_: crate::page::NoMemory) -> BioError {
        BioError::NoMemory
    }
}

/// Result of a bio.
pub type BioResult = Result<(), BioError>;

/// Most runs a provider reports for one [`BioCmd::GetAllocation`]; the
/// answer then covers less than the whole range.
pub const MAX_EXTENTS: usize = 16384;

/// One run of bytes as a [`BioCmd::GetAllocation`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes.
    pub length: u64,
    /// No storage is allocated to the run (a hole).
    pub hole: bool,
    /// The run reads back as zeroes.
    pub zero: bool,
}

/// Identifies a geom within a [`crate::stack::Stack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GeomId(pub u32);

/// Identifies a provider within a [`crate::stack::Stack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderId(pub u32);

/// Identifies a consumer (a geom's or an external user's attachment to a
/// provider) within a [`crate::stack::Stack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u32);

/// Who gets a bio back when it completes on one hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The stack's external user ([`crate::stack::Stack::take_completed`]).
    User,
    /// A geom's `done`.
    Geom(GeomId),
    /// The stack itself (tasting and metadata writes).
    Stack,
}

/// A completion frame: who gets the bio back, and their cookie.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Frame {
    pub(crate) owner: Owner,
    /// The provider the bio was sent to on this hop (for statistics).
    pub(crate) provider: ProviderId,
    /// The consumer it was sent through (for in-flight counts).
    pub(crate) consumer: ConsumerId,
    pub(crate) cookie: u64,
    /// When the provider's geom got it, on the stack's clock.
    pub(crate) start_ns: u64,
    /// It passed the central check and counts as in flight on `provider`.
    pub(crate) started: bool,
}

/// One block I/O request.
#[derive(Debug)]
pub struct Bio {
    /// What to do.
    pub cmd: BioCmd,
    /// Byte offset on the provider it is sent to.
    pub offset: u64,
    /// Length in bytes (equals `sg.len_bytes()` for reads and writes).
    pub length: u64,
    /// Force unit access: complete a write only once it is on stable storage.
    pub fua: bool,
    /// For WRITE_ZEROES: keep the range allocated (do not punch a hole).
    pub no_hole: bool,
    /// The data pages (empty for flush, discard and write-zeroes).
    pub sg: SgList,
    /// Scratch word for whoever holds the bio now (FreeBSD's
    /// `bio_driver1`): a geom may set it before handing the bio to a
    /// device and read it back on completion. Drivers leave it alone.
    pub scratch: u64,
    /// The answer to a [`BioCmd::GetAllocation`]: consecutive runs from
    /// `offset` on, covering at most `length` bytes (empty otherwise).
    pub extents: Vec<Extent>,
    /// One completion frame per hop it has taken, inline for up to four
    /// hops (a disk under three layers) so passing a bio down allocates
    /// nothing.
    pub(crate) frames: SmallVec<[Frame; 4]>,
}

impl Bio {
    /// A read of `length` bytes at `offset` into freshly allocated pages.
    pub fn read(offset: u64, length: u64) -> Bio {
        Bio::with_data(BioCmd::Read, offset, SgList::alloc(length as usize))
    }

    /// A read or write carrying the given pages.
    pub fn with_data(cmd: BioCmd, offset: u64, sg: SgList) -> Bio {
        Bio {
            cmd,
            offset,
            length: sg.len_bytes(),
            fua: false,
            no_hole: false,
            sg,
            scratch: 0,
            extents: Vec::new(),
            frames: SmallVec::new(),
        }
    }

    /// A command without data (flush, discard, write-zeroes).
    pub fn no_data(cmd: BioCmd, offset: u64, length: u64) -> Bio {
        Bio {
            cmd,
            offset,
            length,
            fua: false,
            no_hole: false,
            sg: SgList::new(),
            scratch: 0,
            extents: Vec::new(),
            frames: SmallVec::new(),
        }
    }

    /// A flush.
    pub fn flush() -> Bio {
        Bio::no_data(BioCmd::Flush, 0, 0)
    }

    /// A child for the byte range `[at, at + len)` of this bio, sent to
    /// `offset` below. The child shares this bio's pages; nothing is copied.
    pub fn split(&self, at: u64, len: u64, offset: u64) -> Bio {
        let sg = if self.cmd.has_data() {
            self.sg.slice(at, len)
        } else {
            SgList::new()
        };
        Bio {
            cmd: self.cmd,
            offset,
            length: len,
            fua: self.fua,
            no_hole: self.no_hole,
            sg,
            scratch: 0,
            extents: Vec::new(),
            frames: SmallVec::new(),
        }
    }

    /// A child of the same command and FUA bit sent to `offset` below
    /// with the given pages (for reads and writes, `sg` is built from
    /// slices of this bio's list; for other commands it is empty).
    pub fn child(&self, offset: u64, length: u64, sg: SgList) -> Bio {
        Bio {
            cmd: self.cmd,
            offset,
            length,
            fua: self.fua,
            no_hole: self.no_hole,
            sg,
            scratch: 0,
            extents: Vec::new(),
            frames: SmallVec::new(),
        }
    }

    /// A child covering the whole bio at the same offset (for mirrors and
    /// pass-through classes that keep the parent).
    pub fn clone_request(&self) -> Bio {
        self.split(0, self.length, self.offset)
    }

    /// End of the range, in bytes.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_shares_pages() {
        let b = Bio::read(0, 16384);
        let c = b.split(4096, 8192, 100 * 512);
        assert_eq!(c.offset, 51200);
        assert_eq!(c.length, 8192);
        assert_eq!(c.sg.segments(), 2);
        let first = c.sg.iter().next().unwrap();
        assert!(first.page.same(&b.sg.iter().nth(1).unwrap().page));
    }

    #[test]
    fn no_data_split_has_no_pages() {
        let b = Bio::no_data(BioCmd::Discard, 0, 1 << 20);
        let c = b.split(4096, 4096, 0);
        assert_eq!(c.sg.segments(), 0);
        assert_eq!(c.length, 4096);
    }

    #[test]
    fn errnos_match_posix() {
        assert_eq!(BioError::Io.errno(), 5);
        assert_eq!(BioError::Invalid.errno(), 22);
        assert_eq!(BioError::NotSupported.errno(), 95);
    }
}
