//! The management credential: a random token per appliance, kept by the
//! host tool in a file only its user can read, and sent as
//! `Authorization: Bearer TOKEN` with every request that changes the
//! appliance (`POST /geom`, `POST /shutdown`).
//!
//! `strata run` and `strata hosted` write it, unless `--token-file` names
//! a file that exists already, to a place found again from the management
//! port alone: `${XDG_RUNTIME_DIR:-/tmp}/strata-UID/http-PORT.token`
//! (directory 0700, file 0600), removed when they exit. `strata geom`,
//! `strata gstat` and the campaign find it there, or take `--token-file`.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Random bytes in a token (printed as twice as many hex digits).
const TOKEN_BYTES: usize = 32;

/// The directory the tokens of this user's appliances live in.
fn token_dir() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join(format!("strata-{}", rustix::process::getuid().as_raw()))
}

/// Where the token of the appliance whose management port is `http_port`
/// is kept by default.
pub fn default_path(http_port: u16) -> PathBuf {
    token_dir().join(format!("http-{http_port}.token"))
}

/// A new random token, as lowercase hex.
pub fn generate() -> io::Result<String> {
    let mut b = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut b).map_err(|e| io::Error::other(format!("no random numbers: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Reads a token file: its first line, which must be a non-empty word of
/// printable ASCII.
pub fn read(path: &Path) -> io::Result<String> {
    let text = fs::read_to_string(path)?;
    let t = text.lines().next().unwrap_or("").trim();
    if t.is_empty() || !t.chars().all(|c| c.is_ascii_graphic()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: not a token (one word of printable ASCII)",
                path.display()
            ),
        ));
    }
    Ok(t.to_string())
}

/// The token to send to the appliance on `http_port`: the one in `file`
/// when given, else the one in the default place, if any.
pub fn find(file: Option<&Path>, http_port: u16) -> io::Result<Option<String>> {
    match file {
        Some(f) => read(f).map(Some),
        None => match read(&default_path(http_port)) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        },
    }
}

/// Writes a new token to `path` (mode 0600; a file there is replaced,
/// as one an appliance that did not exit cleanly left) and returns it.
pub fn write_new(path: &Path) -> io::Result<String> {
    let token = generate()?;
    let tmp = path.with_extension(format!("new.{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(token)
}

/// The token of a running appliance, and the file that holds it.
#[derive(Debug)]
pub struct TokenFile {
    /// The token.
    pub token: String,
    /// The file it is kept in.
    pub path: PathBuf,
    /// The file was written here (and is removed on drop).
    created: bool,
}

impl TokenFile {
    /// The token for an appliance on `http_port`: read from `file` when it
    /// names one that exists, else generated and written to `file` (or the
    /// default place) with mode 0600.
    pub fn create(file: Option<&Path>, http_port: u16) -> io::Result<TokenFile> {
        if let Some(f) = file.filter(|f| f.exists()) {
            return Ok(TokenFile {
                token: read(f)?,
                path: f.to_path_buf(),
                created: false,
            });
        }
        let path = match file {
            Some(f) => f.to_path_buf(),
            None => {
                let dir = token_dir();
                DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
                let m = fs::symlink_metadata(&dir)?;
                if !m.is_dir()
                    || m.uid() != rustix::process::getuid().as_raw()
                    || m.permissions().mode() & 0o077 != 0
                {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{} is not a directory of this user's alone (mode 0700)",
                            dir.display()
                        ),
                    ));
                }
                default_path(http_port)
            }
        };
        let token = write_new(&path)?;
        Ok(TokenFile {
            token,
            path,
            created: true,
        })
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        if self.created {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_is_private_random_and_removed_on_drop() {
        let dir = crate::tempdir::TempDir::new().unwrap();
        let path = dir.path().join("t");
        let a = TokenFile::create(Some(&path), 1).unwrap();
        assert_eq!(a.token.len(), 2 * TOKEN_BYTES);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            find(Some(&path), 1).unwrap().as_deref(),
            Some(a.token.as_str())
        );
        // An existing file is used as it is, and kept.
        let b = TokenFile::create(Some(&path), 1).unwrap();
        assert_eq!(b.token, a.token);
        drop(b);
        assert!(path.exists());
        drop(a);
        assert!(!path.exists());
        let c = TokenFile::create(Some(&path), 1).unwrap();
        assert_ne!(c.token, generate().unwrap());
    }

    #[test]
    fn a_file_that_is_not_a_token_is_refused() {
        let dir = crate::tempdir::TempDir::new().unwrap();
        let path = dir.path().join("t");
        fs::write(&path, "\n").unwrap();
        assert!(read(&path).is_err());
    }
}
