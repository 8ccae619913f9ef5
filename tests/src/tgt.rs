//! tgt, the Linux SCSI target framework's user-space daemon (`tgtd`), as a
//! reference iSCSI target: the harness is checked against it, and the
//! conformance run and the benchmark measure it beside Strata.
//!
//! Each [`Tgt`] is its own `tgtd -f` on a free 127.0.0.1 port with its
//! own control port (`-C N`: the socket `/var/run/tgtd/socket.N`), so two
//! of them, or one and a system tgt on 3260, do not clash. tgt's LUN 0 is
//! its controller; the disk of each target is LUN 1.

use crate::iscsi_clients::{Chap, Lun};
use crate::{free_port, TempDir};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `tgtd`, killed on drop.
pub struct Tgt {
    child: Option<Child>,
    /// Its iSCSI port on 127.0.0.1.
    pub port: u16,
    /// Its control port (`tgtadm -C`).
    pub control: u16,
    next_tid: u32,
    log: PathBuf,
    _dir: TempDir,
}

/// One target with one disk LUN, as [`Tgt::add`] sets it up.
#[derive(Clone, Debug)]
pub struct TgtLun {
    /// Target name.
    pub iqn: String,
    /// Backing file.
    pub file: PathBuf,
    /// Read-only (`--params readonly=1`).
    pub ro: bool,
    /// An incoming account: CHAP the initiator must pass.
    pub chap: Option<Chap>,
    /// An outgoing account: what the target proves (mutual CHAP).
    pub mutual: Option<Chap>,
    /// Initiator names allowed (empty: `-I ALL`).
    pub initiators: Vec<String>,
}

fn socket(control: u16) -> PathBuf {
    PathBuf::from(format!("/var/run/tgtd/socket.{control}"))
}

impl Tgt {
    /// Starts `tgtd -f -C CONTROL --iscsi portal=127.0.0.1:PORT` and waits
    /// until `tgtadm` reaches it and the port accepts connections.
    pub fn start() -> Result<Tgt, String> {
        let dir = TempDir::new("tgt");
        let port = free_port();
        let mut control = free_port();
        while socket(control).exists() {
            control = free_port();
        }
        let log = dir.path("tgtd.log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("run tgtd: {e} (is tgt installed? see tests/strata.sh)"))?;
        let mut t = Tgt {
            child: Some(child),
            port,
            control,
            next_tid: 1,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = t.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("tgtd exited ({st}): {}", t.log_text()));
            }
            if t.tgtadm(&["--mode", "sys", "--op", "show"]).is_ok()
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return Ok(t);
            }
            if Instant::now() > deadline {
                return Err(format!("tgtd not ready after 20 s: {}", t.log_text()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What tgtd printed.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `tgtadm -C CONTROL --lld iscsi ARGS` (30 s at most); its output.
    pub fn tgtadm(&self, args: &[&str]) -> Result<String, String> {
        let o = Command::new("timeout")
            .args(["30", "tgtadm", "-C", &self.control.to_string()])
            .args(["--lld", "iscsi"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run tgtadm: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if o.status.success() {
            Ok(text)
        } else {
            Err(format!("tgtadm {args:?}: {text}"))
        }
    }

    /// Adds a target serving `l.file` as LUN 1; returns the LUN.
    pub fn add(&mut self, l: &TgtLun) -> Result<Lun, String> {
        let tid = self.next_tid.to_string();
        self.next_tid += 1;
        let file = l.file.display().to_string();
        self.tgtadm(&[
            "--mode", "target", "--op", "new", "--tid", &tid, "-T", &l.iqn,
        ])?;
        self.tgtadm(&[
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            &tid,
            "--lun",
            "1",
            "-b",
            &file,
        ])?;
        if l.ro {
            self.tgtadm(&[
                "--mode",
                "logicalunit",
                "--op",
                "update",
                "--tid",
                &tid,
                "--lun",
                "1",
                "--params",
                "readonly=1",
            ])?;
        }
        for (c, outgoing) in [(&l.chap, false), (&l.mutual, true)] {
            let Some(c) = c else { continue };
            self.tgtadm(&[
                "--mode",
                "account",
                "--op",
                "new",
                "--user",
                &c.user,
                "--password",
                &c.secret,
            ])?;
            let mut bind = vec![
                "--mode", "account", "--op", "bind", "--tid", &tid, "--user", &c.user,
            ];
            if outgoing {
                bind.push("--outgoing");
            }
            self.tgtadm(&bind)?;
        }
        if l.initiators.is_empty() {
            self.tgtadm(&[
                "--mode", "target", "--op", "bind", "--tid", &tid, "-I", "ALL",
            ])?;
        }
        for i in &l.initiators {
            self.tgtadm(&[
                "--mode",
                "target",
                "--op",
                "bind",
                "--tid",
                &tid,
                "--initiator-name",
                i,
            ])?;
        }
        Ok(Lun::new(self.port, &l.iqn, 1))
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        // tgtd does not stop on SIGTERM while it has targets.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let s = socket(self.control);
        let _ = std::fs::remove_file(&s);
        let _ = std::fs::remove_file(s.with_extension(format!("{}.lock", self.control)));
    }
}
