//! A mirror member whose disk stops answering, under QEMU: each disk is
//! served by its own qemu-nbd over a Unix socket, and SIGSTOP on one
//! server makes that disk hang. With a 3 s bio deadline the appliance
//! (a) still becomes ready when the disk hangs before the boot tastes it,
//! and serves the mirror degraded; (b) completes writes that were in
//! flight, and new ones, from the good member once the deadline passed.
//!
//! Needs QEMU (TCG), qemu-nbd and the kernel (`strata build`). Run with
//! `cargo test --release -p image --test hang_qemu -- --test-threads=1`.

use image::fault::client::Client;
use image::fault::vm::Vm;
use image::qemu::{Accel, Drive, Machine, QemuConfig};
use net::nbd::wire::Command as NbdCmd;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE_MS: u64 = 3000;
const DISK_SIZE: u64 = 64 << 20;
const CONFIG: &str = "mirror label gm0 vtbd0 vtbd1\nexport nbd vol mirror/gm0\n";

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One disk: a raw file behind its own qemu-nbd.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(dir: &Path, name: &str) -> Server {
        let file = dir.join(format!("{name}.img"));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(DISK_SIZE)
            .unwrap();
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--socket={}", socket.display()))
            .args([
                "--persistent",
                "--shared=0",
                "--format=raw",
                "--cache=writeback",
            ])
            .arg(&file);
        Server::spawn(cmd, socket, "qemu-nbd (apt-get install -y qemu-utils)")
    }

    fn spawn(mut cmd: Command, socket: PathBuf, what: &str) -> Server {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(what);
        let until = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < until, "{what} did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// The disk stops answering.
    fn hang(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// It answers again.
    fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    dir: PathBuf,
    servers: Vec<Server>,
    kernel: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("strata-hang-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("strata.conf"), CONFIG).unwrap();
        let servers = vec![Server::start(&dir, "d0"), Server::start(&dir, "d1")];
        let kernel = image::kernel::ensure_kernel().expect("kernel (strata build)");
        Setup {
            dir,
            servers,
            kernel,
        }
    }

    fn boot(&self, n: u32, nbd: u16, http: u16) -> Vm {
        let cfg = self.qemu(nbd, http, None);
        Vm::boot(&cfg, self.dir.join(format!("console-{n}.log"))).expect("start QEMU")
    }

    fn qemu(&self, nbd: u16, http: u16, qmp: Option<PathBuf>) -> QemuConfig {
        let token = self.dir.join("http.token");
        if !token.exists() {
            image::token::write_new(&token).expect("token file");
        }
        QemuConfig {
            kernel: self.kernel.clone(),
            initrd: Some(self.dir.join("strata.conf")),
            kernel_args: vec![format!("strata.bio_deadline_ms={DEADLINE_MS}")],
            machine: Machine::Q35,
            accel: Accel::Tcg,
            memory_mib: 512,
            disks: self
                .servers
                .iter()
                .map(|s| Drive::NbdUnix(s.socket.clone()))
                .collect(),
            nbd_port: nbd,
            iscsi_port: None,
            http_port: http,
            qmp_socket: qmp,
            token_file: Some(token),
            secrets: Vec::new(),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.servers.clear();
        if std::thread::panicking() {
            // Keep the consoles of a failed run.
            eprintln!("consoles kept in {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Connects to the export once it is served; panics after `limit` or
/// when `exited` says the appliance is gone.
fn connect_when(
    mut exited: impl FnMut() -> bool,
    console: &Path,
    nbd: u16,
    limit: Duration,
) -> Client {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, nbd));
    let until = Instant::now() + limit;
    loop {
        assert!(!exited(), "the appliance exited");
        if let Ok(c) = Client::connect(addr, "vol", Duration::from_secs(5)) {
            return c;
        }
        assert!(
            Instant::now() < until,
            "export not served within {limit:?}; console: {}",
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connect(vm: &mut Vm, nbd: u16, limit: Duration) -> Client {
    let console = vm.console.clone();
    connect_when(|| vm.exited().is_some(), &console, nbd, limit)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// Waits for the reply to `cookie`; returns its error and data.
fn reply(c: &mut Client, cookie: u64, limit: Duration) -> (u32, Vec<u8>) {
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no reply within {limit:?}");
        if let Some(r) = c.recv(left).expect("connection") {
            assert_eq!(r.cookie, cookie, "replies come in order here");
            return (r.error, r.data);
        }
    }
}

fn write(c: &mut Client, offset: u64, data: &[u8]) {
    let k = c
        .send(NbdCmd::Write, 0, offset, data.len() as u32, data)
        .unwrap();
    assert_eq!(
        reply(c, k, Duration::from_secs(60)).0,
        0,
        "write at {offset}"
    );
}

fn read(c: &mut Client, offset: u64, len: u32) -> Vec<u8> {
    let k = c.send(NbdCmd::Read, 0, offset, len, &[]).unwrap();
    let (e, data) = reply(c, k, Duration::from_secs(60));
    assert_eq!(e, 0, "read at {offset}");
    data
}

fn status(http: u16) -> serde_json::Value {
    let r = image::http::request(
        SocketAddr::from((Ipv4Addr::LOCALHOST, http)),
        "GET",
        "/status",
        b"",
        &[],
        Duration::from_secs(10),
    )
    .expect("/status");
    serde_json::from_slice(&r.body).expect("/status is JSON")
}

/// Asserts `/status` shows vtbd1 failed on its deadline and the mirror
/// with vtbd0 alone.
fn assert_member_gone(http: u16) {
    let st = status(http);
    let d1 = &st["disks"][1];
    assert_eq!(d1["state"], "failed", "{st}");
    assert!(
        d1["failed"].as_str().unwrap_or("").contains("ms"),
        "vtbd1 says why: {d1}"
    );
    assert_eq!(st["disks"][0]["state"], "ok", "{st}");
    let text = st.to_string();
    assert!(text.contains("vtbd0"), "{text}");
}

#[test]
fn a_member_that_hangs_during_io_is_dropped_and_writes_complete_from_the_other() {
    let setup = Setup::new("io");
    let (nbd, http) = (free_port(), free_port());
    let mut vm = setup.boot(1, nbd, http);
    let mut c = connect(&mut vm, nbd, Duration::from_secs(120));
    let before = pattern(1, 1 << 20);
    write(&mut c, 0, &before);
    // Reads in flight when the member hangs go on a connection of their
    // own: whatever they get must not be wrong data.
    let mut r = connect(&mut vm, nbd, Duration::from_secs(10));
    // The second disk stops answering; writes go out at once.
    setup.servers[1].hang();
    let hung_at = Instant::now();
    let mut reads = Vec::new();
    for k in 0..4u64 {
        reads.push((r.send(NbdCmd::Read, 0, k * 65536, 65536, &[]).unwrap(), k));
    }
    let mut cookies = Vec::new();
    for k in 0..8u64 {
        let data = pattern(10 + k as u8, 65536);
        cookies.push(
            c.send(NbdCmd::Write, 0, (2 << 20) + k * 65536, 65536, &data)
                .unwrap(),
        );
    }
    // Replies may come in any order.
    let until = Instant::now() + Duration::from_secs(60);
    while !cookies.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "writes in flight never completed");
        if let Some(r) = c.recv(left).expect("connection") {
            assert!(cookies.contains(&r.cookie), "unknown cookie {}", r.cookie);
            assert_eq!(r.error, 0, "a write in flight when the member hung failed");
            cookies.retain(|&k| k != r.cookie);
        }
    }
    let took = hung_at.elapsed();
    let (mut good, mut failed, mut ended) = (0, 0, false);
    let until = Instant::now() + Duration::from_secs(30);
    while !reads.is_empty() && Instant::now() < until {
        match r.recv(Duration::from_secs(1)) {
            Ok(Some(rep)) => {
                let k = reads
                    .iter()
                    .find(|x| x.0 == rep.cookie)
                    .expect("known cookie")
                    .1;
                reads.retain(|x| x.0 != rep.cookie);
                if rep.error == 0 {
                    let at = (k * 65536) as usize;
                    assert!(
                        rep.data == before[at..at + 65536],
                        "a read in flight returned wrong data"
                    );
                    good += 1;
                } else {
                    failed += 1;
                }
            }
            Ok(None) => {}
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    eprintln!(
        "reads in flight at the hang: {good} good, {failed} failed, {} unanswered, connection ended: {ended}",
        reads.len()
    );
    assert!(
        reads.is_empty() || ended,
        "a read in flight on the hung member neither completed nor ended its connection"
    );
    eprintln!("writes in flight completed {took:?} after the hang");
    assert!(
        took >= Duration::from_millis(DEADLINE_MS - 500),
        "they waited for the deadline ({took:?})"
    );
    // New writes go to the good member.
    let after = pattern(99, 1 << 20);
    write(&mut c, 8 << 20, &after);
    assert_eq!(read(&mut c, 0, 1 << 20), before);
    assert_eq!(read(&mut c, 8 << 20, 1 << 20), after);
    for k in 0..8u64 {
        assert_eq!(
            read(&mut c, (2 << 20) + k * 65536, 65536),
            pattern(10 + k as u8, 65536)
        );
    }
    assert_member_gone(http);
    c.disconnect();
    setup.servers[1].resume();
    vm.stop(Duration::from_secs(30));
}

#[test]
fn a_member_that_hangs_before_boot_does_not_hold_the_boot() {
    let setup = Setup::new("boot");
    let (nbd, http) = (free_port(), free_port());
    // First boot: both disks answer; the mirror is labelled.
    let t0 = Instant::now();
    let mut vm = setup.boot(1, nbd, http);
    let mut c = connect(&mut vm, nbd, Duration::from_secs(120));
    let healthy = t0.elapsed();
    let data = pattern(7, 1 << 20);
    write(&mut c, 0, &data);
    c.disconnect();
    vm.stop(Duration::from_secs(30));
    // Second boot: the second disk stops answering before the guest runs.
    // QEMU reads the first sector itself when it creates the drive (and
    // would wait forever for a stopped server), so the machine starts
    // paused (-S) and runs on once the server is stopped.
    let (nbd, http) = (free_port(), free_port());
    let qmp = setup.dir.join("qmp.sock");
    let cfg = setup.qemu(nbd, http, Some(qmp.clone()));
    let console = setup.dir.join("console-2.log");
    let out = std::fs::File::create(&console).unwrap();
    let mut qemu = Command::new(image::qemu::QEMU_BINARY)
        .args(cfg.args())
        .arg("-S")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start QEMU");
    let until = Instant::now() + Duration::from_secs(30);
    let mut ctl = loop {
        if let Ok(q) = image::control::Qmp::connect(&qmp, Duration::from_secs(5)) {
            break q;
        }
        assert!(Instant::now() < until, "no QMP");
        std::thread::sleep(Duration::from_millis(50));
    };
    setup.servers[1].hang();
    let t0 = Instant::now();
    ctl.execute("cont").expect("cont");
    let mut c = connect_when(
        || qemu.try_wait().ok().flatten().is_some(),
        &console,
        nbd,
        healthy + Duration::from_millis(DEADLINE_MS) + Duration::from_secs(60),
    );
    let hung = t0.elapsed();
    eprintln!("ready after {healthy:?} with both disks, {hung:?} with one hung from the start");
    assert!(
        hung >= Duration::from_millis(DEADLINE_MS),
        "the boot waited for the taste deadline ({hung:?})"
    );
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("overdue"), "{text}");
    for l in text.lines() {
        if l.contains("overdue") || l.contains("listening") {
            eprintln!("console: {l}");
        }
    }
    assert_eq!(
        read(&mut c, 0, 1 << 20),
        data,
        "served from the good member"
    );
    let more = pattern(8, 65536);
    write(&mut c, 4 << 20, &more);
    assert_eq!(read(&mut c, 4 << 20, 65536), more);
    assert_member_gone(http);
    c.disconnect();
    setup.servers[1].resume();
    let token = image::token::read(&setup.dir.join("http.token")).ok();
    let _ = image::control::http_shutdown(
        SocketAddr::from((Ipv4Addr::LOCALHOST, http)),
        token.as_deref(),
        Duration::from_secs(10),
    );
    let until = Instant::now() + Duration::from_secs(30);
    while qemu.try_wait().ok().flatten().is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
}
