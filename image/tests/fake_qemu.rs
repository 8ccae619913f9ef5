//! `strata run` against a stand-in for QEMU: a Python script named
//! qemu-system-x86_64, first in `PATH`, that plays an appliance which
//! listens. It serves the NBD greeting and `POST /shutdown` on the host
//! ports from `hostfwd`, so the readiness probe, the ready lines and the
//! clean stop are exercised without a guest network stack. Skipped when
//! python3 is absent.

use image::tempdir::TempDir;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FAKE_QEMU: &str = r#"#!/usr/bin/env python3
import os, re, socket, sys, threading, time
args = sys.argv[1:]
netdev = args[args.index("-netdev") + 1]
fwd = dict((int(g), int(h)) for h, g in re.findall(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:(\d+)", netdev))
mode = os.environ.get("FAKE_MODE", "serve")
exports = os.environ.get("FAKE_EXPORTS", "").split()

def say(line):
    sys.stdout.write(line + "\r\n")
    sys.stdout.flush()

def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    return s

def nbd(s):
    while True:
        c, _ = s.accept()
        c.sendall(b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03")
        req = b""
        while len(req) < 20:
            d = c.recv(20 - len(req))
            if not d:
                break
            req += d
        if len(req) == 20 and req[12:16] == b"\x00\x00\x00\x02":
            say("probe aborted cleanly")
            c.sendall(bytes.fromhex("0003e889045565a9") + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x01" + b"\x00" * 4)
        c.close()

def http(s):
    while True:
        c, _ = s.accept()
        req = b""
        while b"\r\n\r\n" not in req:
            d = c.recv(1024)
            if not d:
                break
            req += d
        if req.startswith(b"POST /shutdown "):
            if mode == "refuse":
                c.sendall(b"HTTP/1.1 500 No\r\nContent-Length: 0\r\n\r\n")
                c.close()
                continue
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            c.close()
            say("strata: shutdown: disks flushed")
            os._exit(33)
        c.close()

n, h = listen(fwd[10809]), listen(fwd[8080])
say("strata: boot")
for e in exports:
    say("strata: export %s size 1048576" % e)
threading.Thread(target=nbd, args=(n,), daemon=True).start()
threading.Thread(target=http, args=(h,), daemon=True).start()
time.sleep(0.3)
say("strata: listening nbd 10809 http 8080")
while True:
    time.sleep(1)
"#;

fn have_python() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("python3 not installed: test skipped");
    }
    ok
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Fake {
    dir: TempDir,
    nbd_port: u16,
}

impl Fake {
    fn new() -> Fake {
        let dir = TempDir::new().unwrap();
        let q = dir.join("qemu-system-x86_64");
        std::fs::write(&q, FAKE_QEMU).unwrap();
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("kernel"), b"not used").unwrap();
        Fake {
            dir,
            nbd_port: free_port(),
        }
    }

    fn spawn(&self, mode: &str, exports: &str) -> Child {
        let path = format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["run", "--accel", "tcg", "--log"])
            .arg(self.dir.join("console.log"))
            .args(["--nbd-port", &self.nbd_port.to_string()])
            .args(["--http-port", &free_port().to_string()])
            .env("PATH", path)
            .env("STRATA_KERNEL", self.dir.join("kernel"))
            .env("FAKE_MODE", mode)
            .env("FAKE_EXPORTS", exports)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// The log once it contains `what`, or as it is after 10 s: the fake
    /// writes its lines on its own schedule, after the tool has moved on.
    fn log_with(&self, what: &str) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(what) || Instant::now() > until {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads `n` lines from the child's stdout (within 20 s).
fn ready_lines(child: &mut Child, n: usize) -> Vec<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let until = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => got.push(l),
            Err(_) => break,
        }
    }
    got
}

fn terminate(child: &mut Child) -> (Option<i32>, String) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = child.wait().unwrap();
    let mut e = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut e).unwrap();
    (st.code(), e)
}

#[test]
fn ready_lines_after_handshake_and_clean_stop() {
    if !have_python() {
        return;
    }
    let f = Fake::new();
    let mut child = f.spawn("serve", "vol scratch");
    let lines = ready_lines(&mut child, 2);
    let p = f.nbd_port;
    assert_eq!(
        lines,
        [
            format!("ready nbd://127.0.0.1:{p}/vol"),
            format!("ready nbd://127.0.0.1:{p}/scratch")
        ]
    );
    // The probe finished its negotiation with NBD_OPT_ABORT.
    let log = f.log_with("probe aborted cleanly");
    assert!(log.contains("probe aborted cleanly"), "{log}");
    let (code, e) = terminate(&mut child);
    assert_eq!(code, Some(0), "{e}");
    assert!(f
        .log_with("strata: shutdown: disks flushed")
        .contains("strata: shutdown: disks flushed"));
}

#[test]
fn ready_without_exports_names_no_export() {
    if !have_python() {
        return;
    }
    let f = Fake::new();
    let mut child = f.spawn("serve", "");
    let lines = ready_lines(&mut child, 1);
    assert_eq!(lines, [format!("ready nbd://127.0.0.1:{}", f.nbd_port)]);
    let (code, e) = terminate(&mut child);
    assert_eq!(code, Some(0), "{e}");
}

#[test]
fn refused_shutdown_is_not_a_clean_stop() {
    if !have_python() {
        return;
    }
    let f = Fake::new();
    let mut child = f.spawn("refuse", "vol");
    assert_eq!(ready_lines(&mut child, 1).len(), 1);
    let t = Instant::now();
    let (code, e) = terminate(&mut child);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("did not stop cleanly"), "{e}");
    assert!(e.contains("HTTP 500"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));
}
