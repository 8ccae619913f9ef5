//! A file as a block device for the hosted platform.
//!
//! The file plays the part of a virtio disk: bios move between the file
//! and their pages with vectored system calls on the pages' addresses (the
//! hosted analogue of DMA descriptors), so the disk class still never maps.
//! Like a device, the file works beside the event loop: large transfers,
//! flushes and deallocation run on a few I/O threads, which hand the bio
//! back and wake the loop through a [`Waker`]; small transfers (at most
//! [`INLINE_MAX`] bytes, typically served from the page cache) run at once
//! on the loop, where a thread hand-off would cost more than the copy.
//! Either way a bio completes on a later poll, so the stack sees the same
//! split-phase behaviour as with a real device.
//!
//! DISCARD punches a hole; WRITE_ZEROES punches one too unless the bio asks
//! to stay allocated (`no_hole`), when it zeroes the range in place
//! (`FALLOC_FL_ZERO_RANGE`, or plain writes of zeroes where the file
//! system has no such call). Allocation queries use `SEEK_DATA` /
//! `SEEK_HOLE`, so a sparse file reports its holes.

use geom::bio::{Bio, BioCmd, BioError, BioResult, Extent, MAX_EXTENTS};
use geom::disk::{BlockDevice, DiskInfo};
use geom::page::Lease;
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

/// Sector size the hosted disks report.
pub const FILE_SECTOR_SIZE: u32 = 512;

/// Largest read or write done on the event loop itself; larger ones, and
/// every flush, discard and write-zeroes, go to the I/O threads.
pub const INLINE_MAX: u64 = 32 << 10;

/// I/O threads per disk.
const IO_THREADS: usize = 2;

/// Wakes the event loop from an I/O thread: an `eventfd(2)` the loop
/// includes in its `poll(2)`.
pub struct Waker(OwnedFd);

impl Waker {
    /// A new waker.
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd takes plain integers and returns a new descriptor
        // (or -1), which we own from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The descriptor to poll for `POLLIN`.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Makes the descriptor readable.
    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to our eventfd.
        unsafe {
            libc::write(self.fd(), one.as_ptr() as *const libc::c_void, 8);
        }
    }

    /// Makes the descriptor unreadable again (after a wake-up).
    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer from our
        // non-blocking eventfd.
        unsafe {
            libc::read(self.fd(), buf.as_mut_ptr() as *mut libc::c_void, 8);
        }
    }
}

/// The open file, shared with the I/O threads.
struct Backing {
    file: File,
}

/// A block device backed by a regular file.
pub struct FileDisk {
    backing: Arc<Backing>,
    size_bytes: u64,
    /// Bios done on the loop, delivered on the next poll.
    done: VecDeque<(Bio, BioResult)>,
    /// Work for the I/O threads (`None` without them: all inline).
    jobs: Option<mpsc::Sender<(Bio, Option<Lease>)>>,
    finished: mpsc::Receiver<(Bio, BioResult)>,
    /// The I/O threads, joined when the disk is dropped.
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for FileDisk {
    /// Closes the queue and waits for the I/O threads: each finishes the
    /// request it holds, so nothing writes to the file after the disk is
    /// gone (a clean stop returns only then).
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl FileDisk {
    /// Opens `path` for reading and writing; its size is rounded down to
    /// whole sectors. With a `waker`, large requests run on I/O threads
    /// that wake the loop through it; without, everything runs inline.
    pub fn open(path: &Path, waker: Option<Arc<Waker>>) -> io::Result<FileDisk> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        let backing = Arc::new(Backing { file });
        let (done_tx, finished) = mpsc::channel();
        let mut threads = Vec::new();
        let jobs = match waker {
            Some(waker) => {
                let (jobs, queue) = mpsc::channel::<(Bio, Option<Lease>)>();
                let queue = Arc::new(Mutex::new(queue));
                for i in 0..IO_THREADS {
                    let (queue, backing, done_tx, waker) = (
                        queue.clone(),
                        backing.clone(),
                        done_tx.clone(),
                        waker.clone(),
                    );
                    let t = std::thread::Builder::new()
                        .name(format!("strata-io{i}"))
                        .spawn(move || loop {
                            // Ends when the disk (the sender) is dropped.
                            let Ok((bio, lease)) = queue
                                .lock()
                                .map_err(|_| ())
                                .and_then(|q| q.recv().map_err(|_| ()))
                            else {
                                return;
                            };
                            let r = backing.execute(&bio, lease);
                            if done_tx.send((bio, r)).is_err() {
                                return;
                            }
                            waker.wake();
                        })?;
                    threads.push(t);
                }
                Some(jobs)
            }
            None => None,
        };
        Ok(FileDisk {
            backing,
            size_bytes: len - len % u64::from(FILE_SECTOR_SIZE),
            done: VecDeque::new(),
            jobs,
            finished,
            threads,
        })
    }
}

impl Backing {
    /// The bio's pages as I/O vectors: on the stack up to 1 MiB of pages.
    fn iovecs(bio: &Bio, lease: &Lease) -> SmallVec<[libc::iovec; 256]> {
        bio.sg
            .iter()
            .map(|r| libc::iovec {
                iov_base: r.dma_addr(lease) as *mut libc::c_void,
                iov_len: r.len as usize,
            })
            .collect()
    }

    /// Moves the bio's data between the file and its pages, which are
    /// lent to this device by `lease`.
    fn transfer(&self, bio: &Bio, lease: &Lease) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut iov = Backing::iovecs(bio, lease);
        let mut at = 0usize;
        let mut offset = bio.offset;
        let mut left = bio.length as usize;
        while left > 0 {
            let cnt = (iov.len() - at).min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: every iovec points into a live page owned by the bio
            // (the bio, and so its pages, outlive this call), within the
            // page's bounds as the sg list guarantees; the pages are lent
            // to this device (`lease`), so no Rust reference to those
            // bytes can be made until they are given back.
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

    /// Writes zeroes over a range with ordinary writes (the fallback when
    /// the file system cannot zero a range itself).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let zeroes = vec![0u8; (len as usize).min(1 << 20)];
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(zeroes.len());
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn zero(&self, bio: &Bio) -> io::Result<()> {
        const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let (o, l) = (bio.offset, bio.length);
        if bio.no_hole {
            self.punch(o, l, ZERO).or_else(|_| self.write_zeroes(o, l))
        } else {
            self.punch(o, l, PUNCH)
                .or_else(|_| self.punch(o, l, ZERO))
                .or_else(|_| self.write_zeroes(o, l))
        }
    }

    /// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE`.
    fn seek(&self, pos: u64, whence: libc::c_int) -> io::Result<u64> {
        // SAFETY: lseek takes plain integers and a descriptor we own; it
        // touches no memory of ours.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos as libc::off_t, whence) };
        u64::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    /// Carries out `bio`, whose pages `lease` lends to this device (for
    /// reads and writes), and gives them back.
    fn execute(&self, bio: &Bio, lease: Option<Lease>) -> BioResult {
        let r = match (bio.cmd, lease) {
            // FUA arrives as a write followed by a flush from the disk class.
            (BioCmd::Read | BioCmd::Write, Some(lease)) => {
                let r = self.transfer(bio, &lease);
                bio.sg.give_back(lease);
                r
            }
            // Pages the CPU had mapped when the bio came.
            (BioCmd::Read | BioCmd::Write, None) => return Err(BioError::Io),
            (_, lease) => {
                if let Some(l) = lease {
                    bio.sg.give_back(l);
                }
                self.execute_other(bio)
            }
        };
        r.map_err(|e| Backing::error(bio, e))
    }

    /// What a failed system call means for the bio.
    fn error(bio: &Bio, e: io::Error) -> BioError {
        log::warn!(
            "hosted disk: {} at {} failed: {e}",
            bio.cmd.name(),
            bio.offset
        );
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => BioError::NotSupported,
            Some(libc::ENOSPC) => BioError::NoSpace,
            _ => BioError::Io,
        }
    }

    /// Commands without data.
    fn execute_other(&self, bio: &Bio) -> io::Result<()> {
        match bio.cmd {
            BioCmd::Read | BioCmd::Write => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            BioCmd::Flush => self.file.sync_data(),
            // TRIM is advisory: a file system that cannot punch holes
            // keeps the data, which is allowed (NBD proto.md NBD_CMD_TRIM).
            BioCmd::Discard => self
                .punch(
                    bio.offset,
                    bio.length,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                )
                .or_else(|e| match e.raw_os_error() {
                    Some(libc::EOPNOTSUPP) => Ok(()),
                    _ => Err(e),
                }),
            BioCmd::WriteZeroes => self.zero(bio),
            // Answered by the disk geom through `allocation`.
            BioCmd::GetAllocation => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
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
        // The disk class checks ranges already; the file would grow under
        // a write past its end, so the device refuses one too.
        let ranged = matches!(
            bio.cmd,
            BioCmd::Read | BioCmd::Write | BioCmd::Discard | BioCmd::WriteZeroes
        );
        let end = bio.offset.checked_add(bio.length);
        if ranged && end.is_none_or(|e| e > self.size_bytes) {
            self.done.push_back((bio, Err(BioError::Invalid)));
            return Ok(());
        }
        let inline = bio.cmd.has_data() && bio.length <= INLINE_MAX;
        // The pages belong to this device until the bio completes.
        let lease = bio.sg.lend().ok();
        let (bio, lease) = match &self.jobs {
            Some(jobs) if !inline => match jobs.send((bio, lease)) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(job)) => job,
            },
            _ => (bio, lease),
        };
        let r = self.backing.execute(&bio, lease);
        self.done.push_back((bio, r));
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(Bio, BioResult)) -> usize {
        let mut n = 0;
        while let Some((bio, r)) = self.done.pop_front() {
            done(bio, r);
            n += 1;
        }
        while let Ok((bio, r)) = self.finished.try_recv() {
            done(bio, r);
            n += 1;
        }
        n
    }

    fn allocation(&mut self, offset: u64, length: u64) -> Vec<Extent> {
        let end = offset.saturating_add(length).min(self.size_bytes);
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, length: u64, hole: bool| {
            if length == 0 {
                return;
            }
            match out.last_mut() {
                Some(e) if e.hole == hole => e.length += length,
                _ => out.push(Extent {
                    length,
                    hole,
                    zero: hole,
                }),
            }
        };
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS - 1 {
            let data = match self.backing.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d.max(pos).min(end),
                // No data from `pos` to the end of the file.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                // The file system cannot tell: the rest counts as data.
                Err(_) => break,
            };
            push(&mut out, data - pos, true);
            if data >= end {
                break;
            }
            let hole = self
                .backing
                .seek(data, libc::SEEK_HOLE)
                .map_or(end, |h| h.max(data).min(end));
            push(&mut out, hole - data, false);
            pos = hole;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geom::disk::DiskGeom;
    use geom::stack::{Access, Stack};
    use geom::testing;
    use std::path::PathBuf;

    /// A scratch file of `len` bytes, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str, len: u64) -> Scratch {
            let path =
                std::env::temp_dir().join(format!("strata-filedisk-{tag}-{}", std::process::id()));
            let f = File::create(&path).unwrap();
            f.set_len(len).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A stack over the file as vtbd0, with or without I/O threads, and a
    /// read-write consumer of it.
    fn stack_over(path: &Path, threads: bool) -> (Stack, geom::bio::ConsumerId) {
        let waker = threads.then(|| Arc::new(Waker::new().unwrap()));
        let disk = FileDisk::open(path, waker).unwrap();
        let mut s = Stack::new();
        DiskGeom::create(&mut s, "vtbd0", Box::new(disk)).unwrap();
        let c = s.open("vtbd0", Access::READ_WRITE).unwrap();
        (s, c)
    }

    /// Submits `bio` straight to the device and waits for it.
    fn direct(disk: &mut FileDisk, bio: Bio) -> BioResult {
        disk.submit(bio).map_err(|_| ()).expect("accepted");
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(10) {
            let mut out = None;
            disk.poll(&mut |_, r| out = Some(r));
            if let Some(r) = out {
                return r;
            }
            std::thread::yield_now();
        }
        panic!("no completion in 10 s");
    }

    #[test]
    fn round_trips_inline_and_on_threads() {
        for threads in [false, true] {
            let f = Scratch::new(&format!("rt{threads}"), 4 << 20);
            let (mut s, c) = stack_over(&f.0, threads);
            // Small (inline) and large (I/O thread) transfers.
            for (at, len, seed) in [(0u64, 4096usize, 1u8), (1 << 20, 256 << 10, 2)] {
                let data = testing::pattern(seed, at, len);
                assert_eq!(testing::write(&mut s, c, at, &data), Ok(()));
                assert_eq!(testing::read(&mut s, c, at, len), Ok(data));
            }
            assert_eq!(testing::flush(&mut s, c), Ok(()));
            // TRIM and WRITE_ZEROES read back zeroes; WRITE_ZEROES that
            // keeps the allocation too.
            let zero = |s: &mut Stack, cmd, at, no_hole| {
                let mut bio = Bio::no_data(cmd, at, 64 << 10);
                bio.no_hole = no_hole;
                let r = testing::io(s, c, bio).1;
                (r, testing::read(s, c, at, 64 << 10))
            };
            let zeroes = Ok(vec![0u8; 64 << 10]);
            assert_eq!(
                zero(&mut s, BioCmd::WriteZeroes, 1 << 20, false),
                (Ok(()), zeroes.clone())
            );
            let data = testing::pattern(3, 2 << 20, 64 << 10);
            assert_eq!(testing::write(&mut s, c, 2 << 20, &data), Ok(()));
            assert_eq!(
                zero(&mut s, BioCmd::WriteZeroes, 2 << 20, true),
                (Ok(()), zeroes.clone())
            );
            let r = zero(&mut s, BioCmd::Discard, 0, false);
            assert_eq!(r.0, Ok(()));
            // TRIM may keep the data (a file system without holes).
            let after = r.1.unwrap();
            assert!(
                after == vec![0u8; 64 << 10] || after[..4096] == testing::pattern(1, 0, 4096)[..]
            );
            drop(s);
            // The bytes are in the file.
            let bytes = std::fs::read(&f.0).unwrap();
            assert_eq!(bytes.len(), 4 << 20, "the file keeps its size");
            assert_eq!(
                &bytes[(1 << 20) + (64 << 10)..(1 << 20) + (256 << 10)],
                &testing::pattern(2, 1 << 20, 256 << 10)[64 << 10..]
            );
        }
    }

    #[test]
    fn out_of_range_is_refused_and_the_file_does_not_grow() {
        let f = Scratch::new("range", 1 << 20);
        let mut disk = FileDisk::open(&f.0, None).unwrap();
        let size = disk.info().size_bytes;
        for bio in [
            Bio::read(size, 512),
            Bio::read(size - 512, 1024),
            testing::write_bio(size, &[1u8; 512]),
            testing::write_bio(u64::MAX - 511, &[1u8; 512]),
            Bio::no_data(BioCmd::Discard, size - 512, 4096),
            Bio::no_data(BioCmd::WriteZeroes, u64::MAX, 512),
        ] {
            assert_eq!(direct(&mut disk, bio), Err(BioError::Invalid));
        }
        assert_eq!(std::fs::metadata(&f.0).unwrap().len(), 1 << 20);
        // The last sector itself is in range.
        assert_eq!(
            direct(&mut disk, testing::write_bio(size - 512, &[7u8; 512])),
            Ok(())
        );
    }

    #[test]
    fn a_short_file_is_whole_sectors_and_a_shrunk_one_fails_reads() {
        let f = Scratch::new("short", 1000);
        let disk = FileDisk::open(&f.0, None).unwrap();
        assert_eq!(disk.info().size_bytes, 512, "rounded down to a sector");
        let f = Scratch::new("tiny", 100);
        assert_eq!(FileDisk::open(&f.0, None).unwrap().info().size_bytes, 0);
        // A file cut short under the disk: the read past its new end fails.
        let f = Scratch::new("shrunk", 1 << 20);
        let (mut s, c) = stack_over(&f.0, false);
        File::options()
            .write(true)
            .open(&f.0)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert!(testing::read(&mut s, c, 8192, 4096).is_err());
        assert!(testing::read(&mut s, c, 0, 4096).is_ok());
    }

    #[test]
    fn opening_what_is_not_a_writable_file_fails() {
        assert!(FileDisk::open(Path::new("/nonexistent/strata-disk"), None).is_err());
        assert!(
            FileDisk::open(&std::env::temp_dir(), None).is_err(),
            "a directory"
        );
        let disk = FileDisk::open(&Scratch::new("info", 4096).0, None).unwrap();
        let info = disk.info();
        assert!(!info.read_only && info.can_flush && info.can_discard && info.can_write_zeroes);
    }
}
