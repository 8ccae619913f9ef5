//! Running the appliance in QEMU: choosing the accelerator, following the
//! console, proving readiness, stopping cleanly and mapping exit codes.
//!
//! ```text
//!  spawn QEMU ──▶ console lines ──▶ log / stderr, tail, events
//!      │              │ "strata: listening …"
//!      │              ▼
//!      │        NBD handshake probe (thread) ──▶ "ready nbd://…" on stdout
//!      │
//!      └─ SIGINT/SIGTERM ──▶ POST /shutdown ─(no)─▶ QMP quit ─(no)─▶ kill
//! ```

use crate::console::{clean_line, parse_line, ConsoleEvent, Tail};
use crate::control::{http_shutdown, Qmp};
use crate::probe::{iscsi_login, nbd_handshake};
use crate::qemu::{Accel, QemuConfig, QemuExit, QEMU_BINARY};
use crate::tempdir::TempDir;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

/// Exit code: the appliance or QEMU failed, or was not ready in time.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: bad command line or configuration.
pub const EXIT_CONFIG: i32 = 2;
/// Exit code: the host lacks something (QEMU, the kernel, a disk file).
pub const EXIT_HOST: i32 = 3;

/// Each readiness probe's bound (connect, greeting, abort).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long the iSCSI login probe keeps trying after the appliance
/// listens, before it gives up and says so on stderr.
const ISCSI_PROBE_WINDOW: Duration = Duration::from_secs(30);
/// Bound on `POST /shutdown`.
const HTTP_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the appliance may take to flush and exit after accepting
/// `POST /shutdown`.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on each QMP exchange and on QEMU's exit after `quit`.
const QMP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a starting QEMU may take to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Console lines kept to explain a failure.
const TAIL_LINES: usize = 12;

/// A failure with the tool's exit code and what to tell the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Process exit code ([`EXIT_FAILURE`], [`EXIT_CONFIG`], [`EXIT_HOST`]).
    pub code: i32,
    /// Message, possibly several lines, without the `strata: ` prefix.
    pub message: String,
}

impl Failure {
    /// A failure of the appliance or of QEMU.
    pub fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }

    /// A configuration or usage error.
    pub fn config(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }

    /// Something missing on the host.
    pub fn host(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_HOST,
            message: message.into(),
        }
    }
}

/// How to pick the accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if it boots the kernel quickly, else TCG.
    Auto,
    /// KVM, whatever happens.
    Kvm,
    /// TCG, whatever happens.
    Tcg,
}

/// Everything `strata run` decided before starting QEMU.
#[derive(Clone, Debug)]
pub struct RunPlan {
    /// The QEMU command line (its `accel` and `qmp_socket` are set per
    /// attempt).
    pub qemu: QemuConfig,
    /// How to pick the accelerator.
    pub accel: AccelChoice,
    /// Console log file (appended); the console goes to stderr without one.
    pub log: Option<PathBuf>,
    /// How to name the configuration in error messages (its file name).
    pub config_label: String,
    /// How long the appliance may take to become ready.
    pub ready_timeout: Duration,
    /// How long KVM may take to print the boot line before TCG is used.
    pub kvm_probe: Duration,
    /// The KVM device (`/dev/kvm`).
    pub kvm_device: PathBuf,
}

/// Present when the host's KVM is the nested "kvm-pvm" flavour, which
/// boots a small kernel but makes every VM exit so slow that TCG is faster.
pub const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Whether KVM is worth trying: the device exists and opens read-write,
/// and it is not the PVM flavour.
pub fn kvm_usable(dev: &Path) -> Result<(), String> {
    match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) if Path::new(KVM_PVM_MODULE).exists() => {
            Err("KVM here is the nested kvm-pvm flavour, slower than TCG".into())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!("{} absent", dev.display())),
        Err(e) => Err(format!("cannot open {}: {e}", dev.display())),
    }
}

/// Sends each line QEMU writes on `pipe` to the supervisor as `line(..)`,
/// then `closed` once the pipe ends.
fn forward_lines(
    pipe: impl io::Read + Send + 'static,
    tx: Sender<Msg>,
    line: fn(String) -> Msg,
    closed: Msg,
) {
    thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(line(clean_line(&buf))).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(closed);
    });
}

/// What the threads around a QEMU process report.
enum Msg {
    /// A console line.
    Console(String),
    /// A line QEMU wrote on its stderr.
    Stderr(String),
    /// The console pipe closed (QEMU is exiting).
    ConsoleClosed,
    /// QEMU's stderr closed.
    StderrClosed,
    /// The readiness probe's verdict.
    Probe(Result<(), String>),
    /// The iSCSI login probe's verdict.
    IscsiProbe(Result<(), String>),
    /// The QMP connection, once QEMU listens on its socket.
    Qmp(Qmp),
}

/// One QEMU process and its reports.
struct Vm {
    child: Child,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    accel: Accel,
    started: Instant,
    /// The QMP connection, held from the start so that its socket can be
    /// unlinked at once.
    qmp: Option<Qmp>,
    /// The socket's directory, kept only until the connection is made.
    qmp_dir: Option<TempDir>,
}

impl Vm {
    /// Starts QEMU with `cfg`.
    ///
    /// QEMU gets its own process group, so a terminal's Ctrl-C reaches only
    /// this tool, which then stops the appliance in order; and it gets
    /// SIGTERM if this tool dies, so no QEMU is left behind.
    ///
    /// QMP goes through a socket in a private directory; once a thread has
    /// connected, the directory is removed, so a tool killed later leaves
    /// no files.
    fn spawn(cfg: &QemuConfig) -> Result<Vm, Failure> {
        let dir = TempDir::new().map_err(|e| Failure::host(format!("scratch directory: {e}")))?;
        let sock = dir.join("qmp.sock");
        let cfg = QemuConfig {
            qmp_socket: Some(sock.clone()),
            ..cfg.clone()
        };
        let mut cmd = Command::new(QEMU_BINARY);
        cmd.args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Failure::host(format!(
                    "{QEMU_BINARY} not found in PATH; install it with:\n    apt-get install -y qemu-system-x86"
                ))
            } else {
                Failure::host(format!("cannot start {QEMU_BINARY}: {e}"))
            }
        })?;
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        forward_lines(stdout, tx.clone(), Msg::Console, Msg::ConsoleClosed);
        forward_lines(stderr, tx.clone(), Msg::Stderr, Msg::StderrClosed);
        // Connect to QMP as soon as QEMU listens (QEMU opens the socket
        // before the machine starts).
        let t = tx.clone();
        thread::spawn(move || {
            let until = Instant::now() + QMP_CONNECT_TIMEOUT;
            while Instant::now() < until {
                if let Ok(q) = Qmp::connect(&sock, QMP_TIMEOUT) {
                    let _ = t.send(Msg::Qmp(q));
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        Ok(Vm {
            child,
            rx,
            tx,
            accel: cfg.accel,
            started: Instant::now(),
            qmp: None,
            qmp_dir: Some(dir),
        })
    }

    /// Keeps the QMP connection and removes its socket and directory.
    fn take_qmp(&mut self, q: Qmp) {
        self.qmp = Some(q);
        self.qmp_dir = None;
    }

    /// Kills QEMU and reaps it (so its disk locks and ports are free).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes the child `cmd` starts get SIGTERM when this process dies, so
/// no QEMU or disk server is left behind. The death signal is tied to the
/// forking thread: spawn from a thread that lives until the tool exits.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only prctl(2) and getppid(2), which are async-signal-safe,
    // and builds errors from raw errno values without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Where console lines go.
enum Sink {
    Stderr,
    File(File),
}

impl Sink {
    fn write_line(&mut self, line: &str) {
        // A console that cannot be written must not stop the appliance.
        let _ = match self {
            Sink::Stderr => writeln!(io::stderr().lock(), "{line}"),
            Sink::File(f) => writeln!(f, "{line}"),
        };
    }
}

/// Starts the VM the plan asks for; with `Auto`, runs the KVM boot
/// handshake first. Returns the VM and the reports already read from it.
fn start(plan: &RunPlan, stop: &AtomicBool) -> Result<(Vm, Vec<Msg>), Failure> {
    let with = |accel| QemuConfig {
        accel,
        ..plan.qemu.clone()
    };
    match plan.accel {
        AccelChoice::Tcg => Ok((Vm::spawn(&with(Accel::Tcg))?, Vec::new())),
        AccelChoice::Kvm => Ok((Vm::spawn(&with(Accel::Kvm))?, Vec::new())),
        AccelChoice::Auto => {
            let why = match kvm_usable(&plan.kvm_device) {
                Err(why) => why,
                Ok(()) => match kvm_handshake(&with(Accel::Kvm), plan.kvm_probe, stop)? {
                    Ok((vm, seen)) => {
                        eprintln!(
                            "strata: accel kvm (boot line after {} ms)",
                            vm.started.elapsed().as_millis()
                        );
                        return Ok((vm, seen));
                    }
                    Err(why) => why,
                },
            };
            eprintln!("strata: accel tcg ({why})");
            Ok((Vm::spawn(&with(Accel::Tcg))?, Vec::new()))
        }
    }
}

/// Starts QEMU under KVM and waits for the kernel's `strata: boot` line.
/// Ok(Ok) keeps that VM; Ok(Err(reason)) means KVM was given up.
#[allow(clippy::type_complexity, reason = "a local two-level result")]
fn kvm_handshake(
    cfg: &QemuConfig,
    within: Duration,
    stop: &AtomicBool,
) -> Result<Result<(Vm, Vec<Msg>), String>, Failure> {
    let mut vm = Vm::spawn(cfg)?;
    let deadline = vm.started + within;
    let mut seen = Vec::new();
    let mut qemu_said = None;
    let why = loop {
        if stop.load(Ordering::SeqCst) {
            vm.kill();
            return Err(Failure::runtime("interrupted while starting"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break format!("KVM gave no boot line within {} ms", within.as_millis());
        }
        match vm.rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(Msg::Console(line)) => {
                let boot = parse_line(&line) == ConsoleEvent::Boot;
                seen.push(Msg::Console(line));
                if boot {
                    return Ok(Ok((vm, seen)));
                }
            }
            Ok(Msg::Stderr(line)) => {
                qemu_said.get_or_insert_with(|| line.clone());
                seen.push(Msg::Stderr(line));
            }
            Ok(Msg::ConsoleClosed) => {
                // Let QEMU's last words arrive.
                while let Ok(m) = vm.rx.recv_timeout(Duration::from_millis(200)) {
                    if let Msg::Stderr(l) = m {
                        qemu_said.get_or_insert(l);
                    }
                }
                break format!(
                    "QEMU with KVM stopped: {}",
                    qemu_said.unwrap_or_else(|| "no message".into())
                );
            }
            Ok(Msg::Qmp(q)) => vm.take_qmp(q),
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => unreachable!("the VM holds a sender"),
        }
    };
    vm.kill();
    Ok(Err(why))
}

/// The state of one supervised run.
struct Session<'a> {
    plan: &'a RunPlan,
    vm: Vm,
    sink: Sink,
    stop: &'a AtomicBool,
    tail: Tail,
    /// Name, size and protocol of each export.
    exports: Vec<(String, u64, String)>,
    listening: bool,
    ready: bool,
    config_error: Option<String>,
    fatal: Option<String>,
    probe_error: Option<String>,
    console_closed: bool,
    stderr_closed: bool,
    /// A second signal came while stopping: kill without further asking.
    hurry: bool,
}

impl Session<'_> {
    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Console(line) => {
                self.sink.write_line(&line);
                self.tail.push(&line);
                match parse_line(&line) {
                    ConsoleEvent::Export {
                        name,
                        size_bytes,
                        protocol,
                    } if !self.ready => {
                        self.exports.push((name, size_bytes, protocol));
                    }
                    ConsoleEvent::Listening { .. } if !self.listening => {
                        self.listening = true;
                        self.deepen_backlog();
                        self.start_probe();
                        self.start_iscsi_probe();
                    }
                    ConsoleEvent::ConfigError(m) => self.config_error = Some(m),
                    ConsoleEvent::Fatal(m) => self.fatal = Some(m),
                    _ => {}
                }
            }
            Msg::Stderr(line) => eprintln!("{line}"),
            Msg::ConsoleClosed => self.console_closed = true,
            Msg::StderrClosed => self.stderr_closed = true,
            Msg::Probe(Ok(())) => {
                self.ready = true;
                self.announce();
            }
            Msg::Probe(Err(e)) => {
                self.probe_error = Some(e);
            }
            Msg::IscsiProbe(Ok(())) => self.announce_iscsi(),
            Msg::IscsiProbe(Err(e)) => {
                eprintln!("strata: warning: {e}: no iSCSI ready lines");
            }
            Msg::Qmp(q) => self.vm.take_qmp(q),
        }
    }

    /// Gives QEMU's forwarded ports a deep accept queue (see
    /// [`crate::backlog`]) before any client is told to connect; warns when
    /// that is not possible.
    fn deepen_backlog(&self) {
        let mut ports = vec![self.plan.qemu.nbd_port, self.plan.qemu.http_port];
        ports.extend(self.plan.qemu.iscsi_port);
        let why = match crate::backlog::deepen(self.vm.child.id(), &ports) {
            Ok(done) if done.len() == ports.len() => return,
            Ok(done) => format!("found only {done:?} of {ports:?}"),
            Err(e) => e,
        };
        eprintln!(
            "strata: warning: cannot deepen QEMU's accept queue ({why}): clients that connect in the same instant may hang"
        );
    }

    /// Probes the NBD port from the host until a handshake completes or
    /// the ready deadline passes.
    fn start_probe(&mut self) {
        let tx = self.vm.tx.clone();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.plan.qemu.nbd_port));
        let deadline = self.vm.started + self.plan.ready_timeout;
        thread::spawn(move || loop {
            match nbd_handshake(addr, PROBE_TIMEOUT) {
                Ok(_) => {
                    let _ = tx.send(Msg::Probe(Ok(())));
                    return;
                }
                Err(e) if Instant::now() >= deadline => {
                    let _ = tx.send(Msg::Probe(Err(format!(
                        "NBD handshake on {addr} failed: {e}"
                    ))));
                    return;
                }
                Err(_) => thread::sleep(PROBE_INTERVAL),
            }
        });
    }

    /// Logs in to the forwarded iSCSI port from the host, when there are
    /// iSCSI exports and the port is forwarded, until a login succeeds or
    /// [`ISCSI_PROBE_WINDOW`] passes; apart from the NBD probe, so an
    /// iSCSI target that does not answer holds no NBD ready line back.
    fn start_iscsi_probe(&self) {
        let Some(port) = self.plan.qemu.iscsi_port else {
            return;
        };
        if !self.exports.iter().any(|e| e.2 == "iscsi") {
            return;
        }
        let tx = self.vm.tx.clone();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + ISCSI_PROBE_WINDOW;
        thread::spawn(move || loop {
            match iscsi_login(addr, PROBE_TIMEOUT) {
                Ok(()) => {
                    let _ = tx.send(Msg::IscsiProbe(Ok(())));
                    return;
                }
                Err(e) if Instant::now() >= deadline => {
                    let _ = tx.send(Msg::IscsiProbe(Err(format!(
                        "iSCSI login probe on {addr} failed: {e}"
                    ))));
                    return;
                }
                Err(_) => thread::sleep(PROBE_INTERVAL),
            }
        });
    }

    /// Prints the NBD ready lines on stdout.
    fn announce(&self) {
        let port = self.plan.qemu.nbd_port;
        let mut out = io::stdout().lock();
        if self.exports.is_empty() {
            let _ = writeln!(out, "ready nbd://127.0.0.1:{port}");
        }
        for (name, ..) in self.exports.iter().filter(|e| e.2 == "nbd") {
            let _ = writeln!(out, "ready nbd://127.0.0.1:{port}/{name}");
        }
        let _ = out.flush();
    }

    /// Prints the iSCSI ready lines on stdout (`iscsi://HOST:PORT/IQN/LUN`).
    fn announce_iscsi(&self) {
        let Some(port) = self.plan.qemu.iscsi_port else {
            return;
        };
        let mut out = io::stdout().lock();
        for (name, ..) in self.exports.iter().filter(|e| e.2 == "iscsi") {
            let _ = writeln!(out, "ready iscsi://127.0.0.1:{port}/{name}");
        }
        let _ = out.flush();
    }

    /// Handles reports for up to `wait`.
    fn pump(&mut self, wait: Duration) {
        match self.vm.rx.recv_timeout(wait) {
            Ok(m) => self.handle(m),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => unreachable!("the session holds a sender"),
        }
    }

    /// QEMU's exit status, once it has exited; the console is read to its
    /// end first so that the last lines are in the log.
    fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.vm.child.try_wait().ok().flatten()?;
        let until = Instant::now() + Duration::from_secs(1);
        while !(self.console_closed && self.stderr_closed) && Instant::now() < until {
            self.pump(Duration::from_millis(50));
        }
        while let Ok(m) = self.vm.rx.try_recv() {
            self.handle(m);
        }
        Some(st)
    }

    /// Waits up to `d` for QEMU to exit, following the console; gives up
    /// early on a second signal.
    fn wait_exit(&mut self, d: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if self.stop.swap(false, Ordering::SeqCst) {
                eprintln!("strata: second signal: killing QEMU");
                self.hurry = true;
                return None;
            }
            self.pump(Duration::from_millis(50));
        }
        None
    }

    /// Stops the appliance after a signal: `POST /shutdown` (flushes every
    /// disk), then QMP `quit`, then kill. Returns QEMU's status and, when
    /// the appliance did not stop by itself, why.
    fn stop_gracefully(&mut self) -> (ExitStatus, Option<String>) {
        let why = if self.listening {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.plan.qemu.http_port));
            let token = self
                .plan
                .qemu
                .token_file
                .as_deref()
                .and_then(|f| crate::token::read(f).ok());
            match http_shutdown(addr, token.as_deref(), HTTP_SHUTDOWN_TIMEOUT) {
                Ok(code) if (200..300).contains(&code) => {
                    if let Some(st) = self.wait_exit(FLUSH_TIMEOUT) {
                        return (st, None);
                    }
                    format!(
                        "the appliance accepted POST /shutdown but did not exit within {} s",
                        FLUSH_TIMEOUT.as_secs()
                    )
                }
                Ok(code) => format!("POST /shutdown answered HTTP {code}"),
                Err(e) => format!("POST /shutdown failed: {e}"),
            }
        } else {
            "the appliance was not ready".into()
        };
        let why = Some(why);
        if let Some(q) = self.vm.qmp.as_mut().filter(|_| !self.hurry) {
            if q.quit(QMP_TIMEOUT).is_ok() {
                if let Some(st) = self.wait_exit(QMP_TIMEOUT) {
                    return (st, why);
                }
            }
        }
        self.vm.kill();
        let st = loop {
            if let Some(st) = self.exited() {
                break st;
            }
            self.pump(Duration::from_millis(20));
        };
        (st, why)
    }

    /// Explains a failed run: config error, fatal line, or exit status,
    /// with the last console lines when they went to a file.
    fn failure(&self, exit: QemuExit) -> Failure {
        if let Some(m) = &self.config_error {
            return Failure::config(format!("{}: {m}", self.plan.config_label));
        }
        let msg = match &self.fatal {
            Some(f) => format!("appliance failed: {f} ({exit})"),
            None => exit.to_string(),
        };
        Failure::runtime(self.with_tail(msg))
    }

    /// `msg` followed by the last console lines when they went to a file
    /// (on stderr they have been seen already).
    fn with_tail(&self, mut msg: String) -> String {
        if matches!(self.sink, Sink::File(_)) && !self.tail.is_empty() {
            msg.push_str("\nlast console lines:");
            for l in self.tail.lines() {
                msg.push_str("\n    ");
                msg.push_str(l);
            }
        }
        msg
    }

    /// Runs until QEMU exits, the appliance fails to become ready, or a
    /// signal stops it.
    fn supervise(&mut self) -> Result<(), Failure> {
        loop {
            if let Some(st) = self.exited() {
                return match QemuExit::from_status(st) {
                    QemuExit::GuestSuccess => Ok(()),
                    e => Err(self.failure(e)),
                };
            }
            if self.stop.swap(false, Ordering::SeqCst) {
                let was_ready = self.ready;
                let (st, why) = self.stop_gracefully();
                return match QemuExit::from_status(st) {
                    QemuExit::GuestSuccess => Ok(()),
                    e if self.config_error.is_some() || self.fatal.is_some() => {
                        Err(self.failure(e))
                    }
                    _ if !was_ready => Err(Failure::runtime(
                        "interrupted before the appliance was ready",
                    )),
                    e => Err(Failure::runtime(self.with_tail(format!(
                        "the appliance did not stop cleanly ({}): {e}",
                        why.as_deref().unwrap_or("it stopped with a failure code")
                    )))),
                };
            }
            if let Some(e) = self.probe_error.take() {
                self.vm.kill();
                let _ = self.exited();
                return Err(Failure::runtime(self.with_tail(format!(
                    "the appliance said it listens but is not reachable: {e}"
                ))));
            }
            if !self.ready && self.vm.started.elapsed() > self.plan.ready_timeout {
                self.vm.kill();
                let _ = self.exited();
                return Err(Failure::runtime(self.with_tail(format!(
                    "the appliance was not ready within {} s under {}; QEMU was killed (set STRATA_READY_TIMEOUT to wait longer)",
                    self.plan.ready_timeout.as_secs_f64(),
                    self.vm.accel.name(),
                ))));
            }
            self.pump(Duration::from_millis(100));
        }
    }
}

/// Runs the plan until QEMU exits or `stop` is raised (by SIGINT/SIGTERM).
/// `Ok` means the appliance stopped with its success code.
pub fn run(plan: &RunPlan, stop: &AtomicBool) -> Result<(), Failure> {
    let sink = match &plan.log {
        None => Sink::Stderr,
        Some(p) => Sink::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Failure::host(format!("{}: {e}", p.display())))?,
        ),
    };
    let (vm, seen) = start(plan, stop)?;
    let mut s = Session {
        plan,
        vm,
        sink,
        stop,
        tail: Tail::new(TAIL_LINES),
        exports: Vec::new(),
        listening: false,
        ready: false,
        config_error: None,
        fatal: None,
        probe_error: None,
        console_closed: false,
        stderr_closed: false,
        hurry: false,
    };
    for m in seen {
        s.handle(m);
    }
    let r = s.supervise();
    // Never leave QEMU behind, whatever happened.
    if s.vm.child.try_wait().ok().flatten().is_none() {
        s.vm.kill();
    }
    r
}
