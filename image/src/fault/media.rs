//! One disk of the campaign: an image with a volatile write cache that
//! can fail, hang or vanish on command.
//!
//! ```text
//!  guest virtio-blk ─ QEMU nbd client ─▶ nbdkit (error filter) ─▶ qemu-nbd
//!                                         │  trigger files:        │
//!                                         │  read, write, all      blklogwrites
//!                                         │  SIGSTOP: hangs        ├─ work image
//!                                         │  SIGKILL: gone         └─ write log
//! ```
//!
//! Each boot serves a copy of the disk's durable image (`base`); the log
//! records every write and flush that reached the medium. When the boot
//! ends, the log is replayed onto `base` as a power cut would leave it
//! ([`super::logwrites`]), whatever the way it ended: a clean stop had
//! flushed, so it loses nothing. Errors are injected above the log, so a
//! failed write never reaches the medium.
//!
//! Everything is stopped with SIGKILL: a server that closes cleanly
//! flushes, and that flush would hide what the appliance did not flush.

use super::logwrites::{self, Cut, Replay};
use crate::runner::die_with_parent;
use rand_core::Rng;
use std::fs::{self, File};
use std::io;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which requests an injected error hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Errors {
    /// Reads.
    Reads,
    /// Writes, write-zeroes and trims.
    Writes,
    /// Every request nbdkit can fail (all but flush).
    All,
}

impl Errors {
    fn trigger(self) -> &'static str {
        match self {
            Errors::Reads => "read",
            Errors::Writes => "write",
            Errors::All => "all",
        }
    }
}

/// One campaign disk.
pub struct Media {
    dir: PathBuf,
    /// The disk as the last boot left it on its medium.
    pub base: PathBuf,
    size: u64,
    lying: bool,
    nbdkit: Option<Child>,
    qemu_nbd: Option<Child>,
}

fn spawn(mut cmd: Command, what: &str, log: &Path) -> io::Result<Child> {
    let out = File::options().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    die_with_parent(&mut cmd);
    cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(e.kind(), format!("{what} not found in PATH"))
        } else {
            io::Error::new(e.kind(), format!("cannot start {what}: {e}"))
        }
    })
}

/// Waits until a server listens on `sock`, or its process exits.
fn wait_socket(sock: &Path, child: &mut Child, what: &str, log: &Path) -> io::Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if UnixStream::connect(sock).is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            let tail = fs::read_to_string(log).unwrap_or_default();
            return Err(io::Error::other(format!(
                "{what} exited ({st}): {}",
                tail.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::other(format!(
        "{what} did not listen on {}",
        sock.display()
    )))
}

fn signal(child: &Option<Child>, sig: rustix::process::Signal) {
    if let Some(c) = child {
        if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }
}

fn reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Media {
    /// A zeroed disk of `size` bytes in `dir` (created). `lying`: the disk
    /// drops every flush (a self-check: the campaign must see losses).
    pub fn create(dir: PathBuf, size: u64, lying: bool) -> io::Result<Media> {
        fs::create_dir_all(&dir)?;
        let base = dir.join("base.img");
        File::create(&base)?.set_len(size)?;
        Ok(Media {
            dir,
            base,
            size,
            lying,
            nbdkit: None,
            qemu_nbd: None,
        })
    }

    /// The socket the guest's drive connects to.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("disk.sock")
    }

    fn work(&self) -> PathBuf {
        self.dir.join("work.img")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("writes.log")
    }

    fn trigger(&self, e: Errors) -> PathBuf {
        self.dir.join(format!("fail-{}", e.trigger()))
    }

    /// Starts the servers over a fresh copy of `base` and an empty log.
    pub fn start(&mut self) -> io::Result<()> {
        self.stop();
        for e in [Errors::Reads, Errors::Writes, Errors::All] {
            let _ = fs::remove_file(self.trigger(e));
        }
        fs::copy(&self.base, self.work())?;
        File::create(self.log())?;
        let inner = self.dir.join("medium.sock");
        let _ = fs::remove_file(&inner);
        let _ = fs::remove_file(self.socket());
        let servers_log = self.dir.join("servers.log");
        let mut q = Command::new("qemu-nbd");
        q.arg(format!("--socket={}", inner.display()))
            .args(["--persistent", "--shared=0", "--cache=writeback", "--aio=threads"])
            .args(["--discard=unmap", "--image-opts"])
            .arg(format!(
                "driver=blklogwrites,log-sector-size=512,file.driver=file,file.filename={},log.driver=file,log.filename={}",
                self.work().display(),
                self.log().display()
            ));
        let mut child = spawn(q, "qemu-nbd (apt-get install -y qemu-utils)", &servers_log)?;
        wait_socket(&inner, &mut child, "qemu-nbd", &servers_log)?;
        self.qemu_nbd = Some(child);
        let mut k = Command::new("nbdkit");
        k.args(["--foreground", "--exit-with-parent", "--unix"])
            .arg(self.socket())
            .arg("--filter=error");
        if self.lying {
            k.arg("--filter=fua");
        }
        k.arg("nbd")
            .arg(format!("socket={}", inner.display()))
            .args(["error=EIO", "error-rate=100%"])
            .arg(format!(
                "error-file={}",
                self.trigger(Errors::All).display()
            ))
            .arg(format!(
                "error-pread-file={}",
                self.trigger(Errors::Reads).display()
            ));
        for op in ["pwrite", "zero", "trim"] {
            k.arg(format!(
                "error-{op}-file={}",
                self.trigger(Errors::Writes).display()
            ));
        }
        if self.lying {
            k.arg("fuamode=discard");
        }
        let mut child = spawn(k, "nbdkit (apt-get install -y nbdkit)", &servers_log)?;
        wait_socket(&self.socket(), &mut child, "nbdkit", &servers_log)?;
        self.nbdkit = Some(child);
        Ok(())
    }

    /// Starts failing `e` requests with EIO.
    pub fn fail(&self, e: Errors) -> io::Result<()> {
        // Per-request triggers override the general one, so "all" sets
        // every trigger.
        let all: &[Errors] = match e {
            Errors::All => &[Errors::Reads, Errors::Writes, Errors::All],
            _ => std::slice::from_ref(&e),
        };
        for &t in all {
            File::create(self.trigger(t))?;
        }
        Ok(())
    }

    /// Stops failing requests.
    pub fn heal(&self) {
        for e in [Errors::Reads, Errors::Writes, Errors::All] {
            let _ = fs::remove_file(self.trigger(e));
        }
    }

    /// The disk stops answering (its server is stopped).
    pub fn hang(&self) {
        signal(&self.nbdkit, rustix::process::Signal::STOP);
    }

    /// The disk vanishes: its server is killed, every request fails.
    pub fn vanish(&mut self) {
        reap(&mut self.nbdkit);
    }

    /// Kills the servers (the guest must be gone already).
    pub fn stop(&mut self) {
        reap(&mut self.nbdkit);
        reap(&mut self.qemu_nbd);
    }

    /// Stops the servers and writes what the medium kept onto `base`.
    pub fn settle(&mut self, cut: Cut, rng: &mut impl Rng) -> io::Result<Replay> {
        self.stop();
        let log = logwrites::read_log(&self.log())?;
        let r = logwrites::replay(&log, &self.log(), &self.base, cut, rng)?;
        let _ = fs::remove_file(self.work());
        let _ = fs::remove_file(self.log());
        let len = fs::metadata(&self.base)?.len();
        if len != self.size {
            return Err(io::Error::other(format!(
                "{}: size changed to {len}",
                self.base.display()
            )));
        }
        Ok(r)
    }
}

impl Drop for Media {
    fn drop(&mut self) {
        self.stop();
    }
}
