//! A sealed in-memory file that a child process can open by path
//! (`/proc/self/fd/N`): how the configuration reaches QEMU's `-initrd`
//! without a temporary file that a killed tool would leave behind.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

/// Bytes in a memfd (memfd_create(2)) that is inherited across exec and
/// sealed against any change.
#[derive(Debug)]
pub struct MemFile {
    file: File,
}

impl MemFile {
    /// Creates the file with `contents` and seals it.
    pub fn new(name: &CStr, contents: &[u8]) -> io::Result<MemFile> {
        // No MFD_CLOEXEC: the child must inherit the descriptor to open
        // it through /proc/self/fd.
        // SAFETY: `name` is a valid NUL-terminated string for the call's
        // duration; memfd_create has no other preconditions.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by
        // nothing else.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(contents)?;
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl(F_ADD_SEALS) on a descriptor this value owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(MemFile { file })
    }

    /// A path under which this process's children can open the file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn child_reads_it_by_path() {
        let m = MemFile::new(c"strata.conf", b"md create -s 1m md0\n").unwrap();
        let out = Command::new("cat").arg(m.path()).output().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"md create -s 1m md0\n");
    }

    #[test]
    fn sealed_against_writes() {
        let m = MemFile::new(c"x", b"abc").unwrap();
        let mut f = &m.file;
        assert!(f.write_all(b"more").is_err());
        assert_eq!(std::fs::read(m.path()).unwrap(), b"abc");
    }

    #[test]
    fn empty_contents() {
        let m = MemFile::new(c"empty", b"").unwrap();
        assert_eq!(std::fs::metadata(m.path()).unwrap().len(), 0);
    }
}
