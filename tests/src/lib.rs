//! Helpers for the integration tests: build and start Strata (in QEMU or
//! hosted), wait for its ready lines, and run real clients against it.
//!
//! Every test that needs QEMU says so; they boot the real kernel image
//! under TCG, because only a booted appliance exercises its drivers,
//! network stack and event loop.

use std::io::{BufRead, BufReader, Read as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `strata` host tool, built once per test process.
pub fn strata_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"));
        let st = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "image", "--bin", "strata"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(root())
            .status()
            .expect("run cargo");
        assert!(st.success(), "building strata failed");
        target.join("release/strata")
    })
    .clone()
}

/// A free TCP port on 127.0.0.1, for a server the test starts right away.
///
/// Ports come from below Linux's ephemeral range (32768 up), so a client's
/// outgoing connection cannot take the port between this check and the
/// server's bind; each test process walks its own stretch of the range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "strata-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (free_port() as u128)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which platform a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// The unikernel in QEMU (TCG).
    Qemu,
    /// The same stack as a Linux process.
    Hosted,
}

/// Reads `r` to its end on a thread.
fn read_all(r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(r).read_to_string(&mut s);
        s
    })
}

/// How a run that ended by itself went ([`Start::run_to_exit`]).
#[derive(Debug)]
pub struct Exited {
    /// The tool's exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
    /// The guest console (QEMU: its `--log` file).
    pub console: String,
}

/// A running Strata and what it said when it became ready.
pub struct Appliance {
    child: Option<Child>,
    /// NBD port on 127.0.0.1.
    pub nbd_port: u16,
    /// Management port on 127.0.0.1.
    pub http_port: u16,
    /// iSCSI port on 127.0.0.1.
    pub iscsi_port: u16,
    /// The `nbd://` URIs from its ready lines.
    pub ready: Vec<String>,
    /// Where the console/log goes.
    pub log: PathBuf,
    _dir: Option<TempDir>,
}

/// How to start Strata.
pub struct Start<'a> {
    /// Platform.
    pub platform: Platform,
    /// Disk specs (`PATH[,size=SIZE]`).
    pub disks: Vec<String>,
    /// Config file contents, if any.
    pub config: Option<&'a str>,
    /// Extra arguments for `strata`.
    pub extra: Vec<String>,
    /// Another `strata` binary to run (a baseline build), and its kernel.
    pub binary: Option<PathBuf>,
    /// The kernel that binary boots (`STRATA_KERNEL`).
    pub kernel: Option<PathBuf>,
}

impl<'a> Start<'a> {
    /// Starts on `platform` with no disks and the default config.
    pub fn new(platform: Platform) -> Start<'a> {
        Start {
            platform,
            disks: Vec::new(),
            config: None,
            extra: Vec::new(),
            binary: None,
            kernel: None,
        }
    }

    /// Runs another build of Strata: `strata` and the kernel it boots.
    pub fn build(mut self, strata: PathBuf, kernel: PathBuf) -> Self {
        self.binary = Some(strata);
        self.kernel = Some(kernel);
        self
    }

    /// Adds a disk.
    pub fn disk(mut self, spec: impl Into<String>) -> Self {
        self.disks.push(spec.into());
        self
    }

    /// Uses a config text.
    pub fn config(mut self, text: &'a str) -> Self {
        self.config = Some(text);
        self
    }

    /// The iSCSI port `extra` asks for, or a free one.
    fn iscsi_port(&self) -> u16 {
        self.extra
            .iter()
            .position(|a| a == "--iscsi-port")
            .and_then(|i| self.extra.get(i + 1)?.parse().ok())
            .unwrap_or_else(free_port)
    }

    fn command(&self, dir: &TempDir, nbd: u16, http: u16, iscsi: u16, log: &Path) -> Command {
        let mut c = Command::new(self.binary.clone().unwrap_or_else(strata_bin));
        if let Some(k) = &self.kernel {
            c.env("STRATA_KERNEL", k);
        }
        c.arg(match self.platform {
            Platform::Qemu => "run",
            Platform::Hosted => "hosted",
        });
        if let Some(text) = self.config {
            let p = dir.path("strata.conf");
            std::fs::write(&p, text).unwrap();
            c.arg("--config").arg(p);
        }
        for d in &self.disks {
            c.arg("--disk").arg(d);
        }
        c.args([
            "--nbd-port",
            &nbd.to_string(),
            "--http-port",
            &http.to_string(),
        ]);
        if !self.extra.iter().any(|a| a == "--iscsi-port") {
            c.args(["--iscsi-port", &iscsi.to_string()]);
        }
        if self.platform == Platform::Qemu {
            c.args(["--accel", "tcg", "--log"]).arg(log);
        }
        c.args(&self.extra);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Adds a word to the kernel command line (`--kernel-arg WORD`).
    pub fn kernel_arg(mut self, word: impl Into<String>) -> Self {
        self.extra.push("--kernel-arg".into());
        self.extra.push(word.into());
        self
    }

    /// Runs it until the tool exits by itself, for boots that are meant to
    /// end (a failing self-test, a refused config); kills it after
    /// `limit`.
    pub fn run_to_exit(self, limit: Duration) -> Exited {
        let dir = TempDir::new("exit");
        let log = dir.path("console.log");
        let mut child = self
            .command(&dir, free_port(), free_port(), self.iscsi_port(), &log)
            .spawn()
            .expect("start strata");
        let out = read_all(child.stdout.take().unwrap());
        let err = read_all(child.stderr.take().unwrap());
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "strata did not exit within {limit:?}; console: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Exited {
            code: status.code(),
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
            console: std::fs::read_to_string(&log).unwrap_or_default(),
        }
    }

    /// Starts it and waits for its ready lines (or its failure). A port
    /// taken by someone else between the check and the bind is retried on
    /// fresh ports.
    pub fn spawn(self) -> Result<Appliance, String> {
        let mut tries = 0;
        loop {
            match self.try_spawn() {
                Err(e) if e.contains("Address already in use") && tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    fn try_spawn(&self) -> Result<Appliance, String> {
        let dir = TempDir::new("run");
        let (nbd, http, iscsi) = (free_port(), free_port(), self.iscsi_port());
        let log = dir.path("console.log");
        // The standard error goes to a file, complete once the process has
        // exited (a pipe's end can outlive it in a child another test
        // thread forked at the same moment).
        let errlog = log.with_extension("stderr");
        let errfile =
            std::fs::File::create(&errlog).map_err(|e| format!("{}: {e}", errlog.display()))?;
        let mut child = self
            .command(&dir, nbd, http, iscsi, &log)
            .stderr(errfile)
            .spawn()
            .map_err(|e| format!("start strata: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let want = if self.platform == Platform::Qemu {
            120
        } else {
            30
        };
        let deadline = Instant::now() + Duration::from_secs(want);
        let mut ready = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(300)) {
                Ok(line) => {
                    if let Some(uri) = line.strip_prefix("ready ") {
                        ready.push(uri.to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = child.wait().ok();
                    return Err(format!(
                        "strata exited ({st:?}) before ready: {}",
                        std::fs::read_to_string(&errlog).unwrap_or_default()
                    ));
                }
            }
            if !ready.is_empty() {
                // Ready lines come together; take any that follow at once.
                while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                    if let Some(uri) = line.strip_prefix("ready ") {
                        ready.push(uri.to_string());
                    }
                }
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("strata did not become ready in time".into());
            }
        }
        Ok(Appliance {
            child: Some(child),
            nbd_port: nbd,
            http_port: http,
            iscsi_port: iscsi,
            ready,
            log,
            _dir: Some(dir),
        })
    }
}

impl Appliance {
    /// The URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port, name)
    }

    /// `GET path` on the management endpoint; returns the body.
    pub fn http_get(&self, path: &str) -> String {
        http(self.http_port, "GET", path)
    }

    /// `POST path` with `body`; returns the status code and the body.
    pub fn http_post(&self, path: &str, body: &str) -> (u16, String) {
        http_request(self.http_port, "POST", path, body)
    }

    /// `GET /geom`, parsed.
    pub fn topology(&self) -> serde_json::Value {
        let body = self.http_get("/geom");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET /geom is not JSON ({e}): {body}"))
    }

    /// `GET /status`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let body = self.http_get("/status");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET /status is not JSON ({e}): {body}"))
    }

    /// Runs the host tool against this appliance: `strata CMD --http-port
    /// PORT ARGS...` (e.g. `geom`, `gstat`).
    pub fn strata(&self, cmd: &str, args: &[&str]) -> Output {
        let out = Command::new("timeout")
            .arg("60")
            .arg(strata_bin())
            .arg(cmd)
            .args(["--http-port", &self.http_port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run strata");
        Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `strata geom LINE...`, asserting it succeeded; returns its output.
    pub fn geom(&self, lines: &[&str]) -> String {
        let o = self.strata("geom", lines);
        assert!(
            o.ok,
            "strata geom {lines:?} failed: {}{}",
            o.stdout, o.stderr
        );
        o.stdout
    }

    /// Stops it with SIGTERM (a clean, flushing shutdown) and waits.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    /// [`Appliance::stop`], and what it printed: the guest console (QEMU)
    /// and the host tool's standard error.
    pub fn stop_with_output(mut self) -> (std::process::ExitStatus, String) {
        let st = self.terminate();
        let errlog = self.log.with_extension("stderr");
        let text = [&self.log, &errlog]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect::<Vec<_>>()
            .join("\n");
        (st, text)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Killed, the host tool could not remove its token file.
            let _ = std::fs::remove_file(image::token::default_path(self.http_port));
        }
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; returns the body.
pub fn http(port: u16, method: &str, path: &str) -> String {
    http_request(port, method, path, "").1
}

/// The management token `strata run` or `strata hosted` wrote for the
/// appliance on management port `port`, if there is one.
pub fn token_for(port: u16) -> Option<String> {
    image::token::find(None, port).ok().flatten()
}

/// One HTTP/1.1 request with a body to 127.0.0.1:`port`, presenting the
/// appliance's management token (as `strata geom` does); returns the
/// status code and the body.
pub fn http_request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    http_request_as(port, token_for(port).as_deref(), method, path, body)
}

/// [`http_request`] presenting `token` (none: no `Authorization`).
pub fn http_request_as(
    port: u16,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    use std::io::Write;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: strata\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => (status, body.to_string()),
        None => (status, out),
    }
}

/// The output of a client command.
pub struct Output {
    /// Exit status was success.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs a client program with a time limit.
pub fn client(program: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("120")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e} (is it installed? see tests/strata.sh)"));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `qemu-img create -f luks` on `path` with the secret object
/// `object` (id `s0`) and returns its output. QEMU times its PBKDF2 by
/// the thread's CPU time and refuses when a loaded host shows it none
/// ("Unable to get accurate CPU usage"); that refusal is QEMU's timing
/// check, not the volume's, so it is retried a few times.
pub fn qemu_img_create_luks(object: &str, path: &Path, size: &str) -> Output {
    let path = path.to_str().expect("a UTF-8 path");
    let args = [
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        object,
        "-o",
        "key-secret=s0,iter-time=10",
        path,
        size,
    ];
    let mut out = client("qemu-img", &args);
    for _ in 0..5 {
        if out.ok || !out.stderr.contains("Unable to get accurate CPU usage") {
            break;
        }
        let _ = std::fs::remove_file(path);
        std::thread::sleep(Duration::from_millis(200));
        out = client("qemu-img", &args);
    }
    out
}

/// Runs `qemu-io -f raw URI -c CMD…` and returns its output, whatever
/// happened (for requests that are meant to fail).
pub fn qemu_io_any(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    client("qemu-io", &args)
}

/// Polls `cond` every 100 ms until it returns `Some`, or panics with
/// `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `qemu-io -f raw URI -c CMD…` and asserts it succeeded and reported
/// no pattern mismatch.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let o = client("qemu-io", &args);
    assert!(o.ok, "qemu-io {cmds:?} failed: {}{}", o.stdout, o.stderr);
    assert!(
        !o.stdout.contains("Pattern verification failed")
            && !o.stderr.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {}{}",
        o.stdout,
        o.stderr
    );
    assert!(
        !o.stdout.contains("failed:"),
        "qemu-io {cmds:?}: {}",
        o.stdout
    );
    o.stdout
}
/// NBD protocol scenarios (real clients and a raw client) for both platforms.
pub mod nbd_clients;
/// Scenarios shared by the QEMU and hosted tests.
pub mod scenarios;

/// Helpers shared by the benchmark programs.
pub mod bench;
/// iSCSI through real clients (libiscsi's utilities, QEMU's iscsi
/// driver, `iscsi-test-cu`), and the iSCSI scenarios for Strata and tgt.
pub mod iscsi_clients;
/// Memory scenarios (floods of large writes, idle management clients,
/// memory disks larger than the memory) for both platforms.
pub mod memory;
/// tgt (`tgtd`) as a reference iSCSI target.
pub mod tgt;
