//! Disk specs (`PATH[,size=SIZE]`) and the sparse files behind them.

use crate::size::{format_size, parse_size, SizeError};
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Size given to a disk file that does not exist and has no `size=`.
pub const DEFAULT_DISK_SIZE_BYTES: u64 = 256 << 20;

/// Sector size every new disk file is a multiple of (virtio 1.2 §5.2.4:
/// capacity is counted in 512-byte sectors).
pub const SECTOR_BYTES: u64 = 512;

/// One `--disk` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The file (or block device) that backs the disk.
    pub path: PathBuf,
    /// Size for the file if it has to be created.
    pub size_bytes: Option<u64>,
}

/// Why a disk spec or a disk file was refused.
#[derive(Debug)]
pub enum DiskError {
    /// The spec has no path.
    EmptyPath,
    /// An option other than `size=`.
    UnknownOption(String),
    /// `size=` given twice.
    DuplicateSize,
    /// The size does not parse.
    Size(SizeError),
    /// The size is zero or not a multiple of 512.
    BadSize(u64),
    /// The path exists but is neither a regular file nor a block device.
    NotAFile(PathBuf),
    /// Creating or inspecting the file failed.
    Io(PathBuf, io::Error),
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::EmptyPath => write!(f, "disk spec has no path (use PATH[,size=SIZE])"),
            DiskError::UnknownOption(o) => {
                write!(f, "unknown disk option '{o}' (only size=SIZE is known)")
            }
            DiskError::DuplicateSize => write!(f, "size= given twice"),
            DiskError::Size(e) => write!(f, "{e}"),
            DiskError::BadSize(n) => write!(
                f,
                "disk size {n} must be a non-zero multiple of {SECTOR_BYTES} bytes"
            ),
            DiskError::NotAFile(p) => {
                write!(f, "{}: not a regular file or block device", p.display())
            }
            DiskError::Io(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

impl std::error::Error for DiskError {}

impl DiskSpec {
    /// Parses `PATH[,size=SIZE]`. The path may not contain a comma.
    pub fn parse(text: &str) -> Result<DiskSpec, DiskError> {
        let mut parts = text.split(',');
        let path = parts.next().unwrap_or("");
        if path.is_empty() {
            return Err(DiskError::EmptyPath);
        }
        let mut size_bytes = None;
        for opt in parts {
            match opt.split_once('=') {
                Some(("size", v)) => {
                    if size_bytes.is_some() {
                        return Err(DiskError::DuplicateSize);
                    }
                    let n = parse_size(v).map_err(DiskError::Size)?;
                    check_size(n)?;
                    size_bytes = Some(n);
                }
                _ => return Err(DiskError::UnknownOption(opt.to_string())),
            }
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            size_bytes,
        })
    }
}

impl std::str::FromStr for DiskSpec {
    type Err = DiskError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskSpec::parse(s)
    }
}

fn check_size(n: u64) -> Result<(), DiskError> {
    if n == 0 || !n.is_multiple_of(SECTOR_BYTES) {
        return Err(DiskError::BadSize(n));
    }
    Ok(())
}

/// What [`ensure_disk`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskState {
    /// A new sparse file of this size was created.
    Created {
        /// Size of the new file.
        size_bytes: u64,
    },
    /// The file (or device) already existed and keeps its size.
    Existing {
        /// Its size (0 for a block device, whose size the guest finds).
        size_bytes: u64,
    },
}

impl DiskState {
    /// A one-line note for the user when something is worth saying:
    /// a file was created, or `size=` was ignored for an existing file.
    pub fn note(&self, spec: &DiskSpec) -> Option<String> {
        let p = spec.path.display();
        match (self, spec.size_bytes) {
            (DiskState::Created { size_bytes }, _) => Some(format!(
                "created {p} ({}, sparse)",
                format_size(*size_bytes)
            )),
            (DiskState::Existing { size_bytes }, Some(want))
                if *size_bytes != want && *size_bytes != 0 =>
            {
                Some(format!(
                    "{p} exists with {} bytes; size={} ignored",
                    size_bytes,
                    format_size(want)
                ))
            }
            _ => None,
        }
    }
}

/// Makes sure the disk's file exists: an existing file or block device is
/// left as it is; a missing file is created sparse with the spec's size or
/// `default_size_bytes`.
pub fn ensure_disk(spec: &DiskSpec, default_size_bytes: u64) -> Result<DiskState, DiskError> {
    let io_err = |e| DiskError::Io(spec.path.clone(), e);
    match std::fs::metadata(&spec.path) {
        Ok(meta) => {
            let ft = meta.file_type();
            if ft.is_file() {
                Ok(DiskState::Existing {
                    size_bytes: meta.len(),
                })
            } else if ft.is_block_device() {
                Ok(DiskState::Existing { size_bytes: 0 })
            } else {
                Err(DiskError::NotAFile(spec.path.clone()))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let size_bytes = spec.size_bytes.unwrap_or(default_size_bytes);
            check_size(size_bytes)?;
            create_sparse(&spec.path, size_bytes).map_err(io_err)?;
            Ok(DiskState::Created { size_bytes })
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Creates `path` (which must not exist) as a sparse file of `size_bytes`.
fn create_sparse(path: &Path, size_bytes: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).create_new(true).open(path)?;
    // set_len extends with a hole: no blocks are written.
    if let Err(e) = f.set_len(size_bytes) {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tempdir::TempDir;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn parses_path_alone() {
        let d = DiskSpec::parse("/tmp/a.img").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert_eq!(d.size_bytes, None);
    }

    #[test]
    fn parses_size_option() {
        let d = DiskSpec::parse("disk0.raw,size=64M").unwrap();
        assert_eq!(d.path, PathBuf::from("disk0.raw"));
        assert_eq!(d.size_bytes, Some(64 << 20));
        let d: DiskSpec = "x,size=1G".parse().unwrap();
        assert_eq!(d.size_bytes, Some(1 << 30));
    }

    #[test]
    fn refuses_bad_specs() {
        assert!(matches!(DiskSpec::parse(""), Err(DiskError::EmptyPath)));
        assert!(matches!(
            DiskSpec::parse(",size=1M"),
            Err(DiskError::EmptyPath)
        ));
        assert!(matches!(
            DiskSpec::parse("a,format=qcow2"),
            Err(DiskError::UnknownOption(o)) if o == "format=qcow2"
        ));
        assert!(matches!(
            DiskSpec::parse("a,size=1M,size=2M"),
            Err(DiskError::DuplicateSize)
        ));
        assert!(matches!(
            DiskSpec::parse("a,size=lots"),
            Err(DiskError::Size(_))
        ));
        assert!(matches!(
            DiskSpec::parse("a,size=1000"),
            Err(DiskError::BadSize(1000))
        ));
        assert!(matches!(
            DiskSpec::parse("a,size=0"),
            Err(DiskError::BadSize(0))
        ));
        assert!(matches!(
            DiskSpec::parse("a,"),
            Err(DiskError::UnknownOption(o)) if o.is_empty()
        ));
    }

    #[test]
    fn creates_sparse_file_and_keeps_existing_size() {
        let dir = TempDir::new().unwrap();
        let p = dir.join("new.img");
        let spec = DiskSpec {
            path: p.clone(),
            size_bytes: Some(64 << 20),
        };
        let st = ensure_disk(&spec, DEFAULT_DISK_SIZE_BYTES).unwrap();
        assert_eq!(
            st,
            DiskState::Created {
                size_bytes: 64 << 20
            }
        );
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        // Sparse: far fewer 512-byte blocks allocated than the length.
        assert!(meta.blocks() * 512 < 1 << 20, "blocks {}", meta.blocks());

        let bigger = DiskSpec {
            path: p.clone(),
            size_bytes: Some(1 << 30),
        };
        let st = ensure_disk(&bigger, DEFAULT_DISK_SIZE_BYTES).unwrap();
        assert_eq!(
            st,
            DiskState::Existing {
                size_bytes: 64 << 20
            }
        );
        assert!(st.note(&bigger).unwrap().contains("ignored"));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 64 << 20);
    }

    #[test]
    fn default_size_applies() {
        let dir = TempDir::new().unwrap();
        let p = dir.join("default.img");
        let spec = DiskSpec::parse(p.to_str().unwrap()).unwrap();
        let st = ensure_disk(&spec, DEFAULT_DISK_SIZE_BYTES).unwrap();
        assert_eq!(
            st,
            DiskState::Created {
                size_bytes: DEFAULT_DISK_SIZE_BYTES
            }
        );
        assert!(st.note(&spec).unwrap().contains("256M"));
    }

    #[test]
    fn refuses_directories_and_missing_parents() {
        let dir = std::env::temp_dir();
        let spec = DiskSpec {
            path: dir.clone(),
            size_bytes: None,
        };
        assert!(matches!(
            ensure_disk(&spec, DEFAULT_DISK_SIZE_BYTES),
            Err(DiskError::NotAFile(_))
        ));
        let spec = DiskSpec {
            path: dir.join("strata-no-such-dir/x.img"),
            size_bytes: None,
        };
        assert!(matches!(
            ensure_disk(&spec, DEFAULT_DISK_SIZE_BYTES),
            Err(DiskError::Io(_, _))
        ));
    }
}
