//! A file as a block device for the hosted platform.
//!
//! The file plays the part of a virtio disk: bios move between the file
//! and their pages with vectored system calls on the pages' addresses (the
//! hosted analogue of DMA descriptors), so the disk class still never maps.
//! Each bio is executed when submitted and completed on the next poll, so
//! the stack sees the same split-phase behaviour as with a real device.

use geom::bio::{Bio, BioCmd, BioError, BioResult};
use geom::disk::{BlockDevice, DiskInfo};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Sector size the hosted disks report.
pub const FILE_SECTOR_SIZE: u32 = 512;

/// A block device backed by a regular file.
pub struct FileDisk {
    file: File,
    size_bytes: u64,
    done: VecDeque<(Bio, BioResult)>,
}

impl FileDisk {
    /// Opens `path` for reading and writing; its size is rounded down to
    /// whole sectors.
    pub fn open(path: &Path) -> io::Result<FileDisk> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(FileDisk {
            file,
            size_bytes: len - len % u64::from(FILE_SECTOR_SIZE),
            done: VecDeque::new(),
        })
    }

    fn iovecs(bio: &Bio) -> Vec<libc::iovec> {
        bio.sg
            .iter()
            .map(|r| libc::iovec {
                iov_base: (r.page.addr() + r.offset as usize) as *mut libc::c_void,
                iov_len: r.len as usize,
            })
            .collect()
    }

    /// Moves the bio's data between the file and its pages.
    fn transfer(&self, bio: &Bio) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut iov = FileDisk::iovecs(bio);
        let mut at = 0usize;
        let mut offset = bio.offset;
        let mut left = bio.length as usize;
        while left > 0 {
            let cnt = (iov.len() - at).min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: every iovec points into a live page owned by the bio
            // (the bio, and so its pages, outlive this call), within the
            // page's bounds as the sg list guarantees; no Rust reference to
            // those bytes exists while the bio is at this device.
            let n = unsafe {
                match bio.cmd {
                    BioCmd::Read => {
                        libc::preadv(fd, iov[at..].as_ptr(), cnt, offset as libc::off_t)
                    }
                    _ => libc::pwritev(fd, iov[at..].as_ptr(), cnt, offset as libc::off_t),
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                // Reading past the end of a file that shrank under us.
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let mut n = n as usize;
            left -= n;
            offset += n as u64;
            while n > 0 {
                let v = &mut iov[at];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    at += 1;
                } else {
                    v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64, mode: libc::c_int) -> io::Result<()> {
        // SAFETY: fallocate takes plain integers and a descriptor we own.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn execute(&self, bio: &Bio) -> BioResult {
        let r = match bio.cmd {
            // FUA arrives as a write followed by a flush from the disk class.
            BioCmd::Read | BioCmd::Write => self.transfer(bio),
            BioCmd::Flush => self.file.sync_data(),
            BioCmd::Discard => self.punch(
                bio.offset,
                bio.length,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            BioCmd::WriteZeroes => self
                .punch(
                    bio.offset,
                    bio.length,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                )
                .or_else(|_| {
                    self.punch(
                        bio.offset,
                        bio.length,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    )
                }),
        };
        r.map_err(|e| {
            log::warn!(
                "hosted disk: {} at {} failed: {e}",
                bio.cmd.name(),
                bio.offset
            );
            match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => BioError::NotSupported,
                Some(libc::ENOSPC) => BioError::OutOfRange,
                _ => BioError::Io,
            }
        })
    }
}

impl BlockDevice for FileDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            size_bytes: self.size_bytes,
            sector_size: FILE_SECTOR_SIZE,
            can_flush: true,
            can_discard: true,
            can_write_zeroes: true,
            read_only: false,
        }
    }

    fn submit(&mut self, bio: Bio) -> Result<(), Bio> {
        let r = self.execute(&bio);
        self.done.push_back((bio, r));
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(Bio, BioResult)) -> usize {
        let n = self.done.len();
        while let Some((bio, r)) = self.done.pop_front() {
            done(bio, r);
        }
        n
    }
}
