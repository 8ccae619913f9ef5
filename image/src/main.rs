//! `strata`: builds the appliance kernel, creates disks, and runs the
//! appliance in QEMU or as a hosted Linux process.

use clap::{Args, Parser, Subcommand, ValueEnum};
use image::disk::{ensure_disk, DiskSpec, DEFAULT_DISK_SIZE_BYTES};
use image::http;
use image::kernel::{build_kernel, ensure_kernel};
use image::memfile::MemFile;
use image::mgmt;
use image::qemu::{Accel, Drive, Machine, QemuConfig, QEMU_BINARY};
use image::runner::{self, AccelChoice, Failure, RunPlan};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

const AFTER_HELP: &str = "\
Environment:
  STRATA_ROOT            workspace to build the kernel in (default: where strata was built)
  STRATA_KERNEL          boot this kernel file instead of building one
  STRATA_READY_TIMEOUT   seconds the appliance may take to become ready (default 60)
  STRATA_KVM_PROBE_MS    --accel auto: how long KVM may take to print its boot line (default 3000)

Exit status:
  0  the appliance stopped cleanly (its success code, or after SIGINT/SIGTERM a flushed shutdown)
  1  the appliance or QEMU failed, or it was not ready in time
  2  bad command line or configuration (checked here, or refused by the appliance)
  3  something is missing on the host (QEMU, the kernel build, a disk file)";

/// Build and run the Strata storage appliance.
#[derive(Parser, Debug)]
#[command(name = "strata", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot the appliance in QEMU and serve its exports until it stops.
    ///
    /// Prints `ready nbd://127.0.0.1:PORT/NAME` on stdout for each export once
    /// an NBD handshake succeeds; stops cleanly on SIGINT/SIGTERM.
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
    /// Run the same appliance as a Linux process, with files as disks.
    Hosted(CommonArgs),
    /// Build the appliance kernel and print its path.
    Build,
    /// Change the running appliance's stack with config lines, or list it.
    ///
    /// Each LINE is one config line (`'nop configure -w 100 vtbd0.nop'`);
    /// unquoted single words make up one line together
    /// (`strata geom mirror insert gm0 vtbd4`). The lines go to
    /// `POST /geom` on 127.0.0.1:PORT; `strata geom list` prints
    /// `GET /geom` like FreeBSD's `geom list`.
    Geom(GeomArgs),
    /// Print per-provider I/O rates of the running appliance, like gstat(8).
    Gstat(GstatArgs),
    /// Run a fault campaign: boot the appliance in QEMU over disks that
    /// lose power, fail, hang and vanish, drive a verifying workload, and
    /// check that no acknowledged write is lost.
    ///
    /// Each round boots, verifies every sector, runs the workload and
    /// injects one fault drawn by the seed; the power is cut or the
    /// appliance stopped cleanly, and each disk keeps only what it had
    /// flushed (and a random part of the rest). A last boot verifies,
    /// lets mirrors resync, and compares their members. Exits 0 when
    /// nothing was lost, 1 otherwise.
    Fault(FaultArgs),
}

/// Options of `fault`.
#[derive(Args, Debug)]
struct FaultArgs {
    /// Configuration file (default: the built-in one, which exports each
    /// disk whole).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The export the workload writes (default: the config's first of
    /// the protocol). iSCSI: IQN, or IQN/LUN.
    #[arg(long, value_name = "NAME")]
    export: Option<String>,
    /// The protocol the workload speaks: nbd, or iscsi (to the forwarded
    /// iSCSI port; without --config the appliance then serves vtbd0 as
    /// LUN 0 of `export iscsi iqn.2026-12.org.strata:fault vtbd0`).
    #[arg(long, value_name = "PROTO", default_value = "nbd", value_parser = parse_protocol)]
    protocol: image::fault::Protocol,
    /// Number of disks: vtbd0, vtbd1, …
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    disks: u16,
    /// Size of each disk (512, 64K, 256M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    disk_size: u64,
    /// Seed of the schedule; the same seed draws the same faults.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Rounds, each one boot with one fault.
    #[arg(long, value_name = "N", default_value_t = 10)]
    rounds: u32,
    /// Fault kinds to draw from, comma-separated (default: all):
    /// power-cut, write-errors, read-errors, disk-fails, disk-hangs,
    /// disk-gone, resync-cut.
    #[arg(long, value_name = "KIND,...", value_delimiter = ',', value_parser = parse_fault)]
    faults: Vec<image::fault::Fault>,
    /// Seconds of workload per round.
    #[arg(long, value_name = "SECS", default_value_t = 6.0)]
    round_time: f64,
    /// Requests the workload keeps in flight.
    #[arg(long, value_name = "N", default_value_t = 16)]
    depth: usize,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    memory: u32,
    /// Accelerator (TCG unless told: nested KVM can hang guests).
    #[arg(long, value_enum, default_value_t = AccelArg::Tcg)]
    accel: AccelArg,
    /// Working directory for disks, write logs and consoles (default: a
    /// new one under the temp dir, removed when the campaign passes).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Self-check: the disks drop every flush, so the campaign must
    /// report lost writes.
    #[arg(long)]
    lying_disks: bool,
    /// A disk (0 for vtbd0, …) that fails every request once the first
    /// boot serves: a member gone for good, so arrays over it run
    /// degraded (repeatable).
    #[arg(long = "dead-disk", value_name = "N")]
    dead_disks: Vec<usize>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    image::size::parse_size(s).map_err(|e| e.to_string())
}

fn parse_fault(s: &str) -> Result<image::fault::Fault, String> {
    image::fault::Fault::parse(s)
}

fn parse_protocol(s: &str) -> Result<image::fault::Protocol, String> {
    image::fault::Protocol::parse(s)
}

/// Options of `geom`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct GeomArgs {
    /// Host port on 127.0.0.1 of the HTTP management endpoint.
    #[arg(long, value_name = "PORT", default_value_t = 8080, global = true)]
    http_port: u16,
    /// File holding the management token (default: the one `strata run`
    /// or `strata hosted` wrote for this management port).
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    sub: Option<GeomSub>,
    /// Config lines to apply, in order.
    #[arg(
        value_name = "LINE",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    lines: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum GeomSub {
    /// Print every geom with its providers and consumers.
    List {
        /// Print the topology JSON as the appliance sent it.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `gstat`.
#[derive(Args, Debug)]
struct GstatArgs {
    /// Host port on 127.0.0.1 of the HTTP management endpoint.
    #[arg(long, value_name = "PORT", default_value_t = 8080)]
    http_port: u16,
    /// Time between screens: seconds, or with a suffix (500ms, 2s).
    #[arg(short = 'I', value_name = "INTERVAL", default_value = "1", value_parser = image::mgmt::parse_interval)]
    interval: Duration,
    /// Number of screens to print (default: until interrupted).
    #[arg(short = 'n', value_name = "COUNT")]
    count: Option<u64>,
}

/// Options shared by `run` and `hosted`.
#[derive(Args, Debug)]
struct CommonArgs {
    /// Configuration file, checked here before starting (default: the
    /// appliance's built-in configuration).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A disk: vtbd0, vtbd1, … in order (repeatable). A missing file is
    /// created sparse with SIZE (512, 64K, 256M, 1G; default 256M); an
    /// existing file keeps its size. The path may not contain a comma.
    #[arg(long = "disk", value_name = "PATH[,size=SIZE]", value_parser = parse_disk)]
    disks: Vec<DiskSpec>,
    /// Host port on 127.0.0.1 for NBD.
    #[arg(long, value_name = "PORT", default_value_t = 10809)]
    nbd_port: u16,
    /// Host port on 127.0.0.1 for the HTTP management endpoint.
    #[arg(long, value_name = "PORT", default_value_t = 8080)]
    http_port: u16,
    /// Host port on 127.0.0.1 for iSCSI (default 3260). `run` forwards it
    /// when it is given or the config exports over iSCSI.
    #[arg(long, value_name = "PORT")]
    iscsi_port: Option<u16>,
    /// Most payload bytes all connections may hold in memory together
    /// (default: a quarter of the memory; hosted at most 1G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    payload_budget: Option<String>,
    /// Time a management request has to arrive, in milliseconds (0:
    /// none; default 30000).
    #[arg(long, value_name = "MS")]
    http_timeout_ms: Option<u64>,
    /// Time an NBD client that holds payload pages may move no byte
    /// before it is dropped, in milliseconds (0: none; default 60000).
    #[arg(long, value_name = "MS")]
    nbd_stall_timeout_ms: Option<u64>,
    /// Time a disk may keep a request before it is given up on: the
    /// request fails with EIO and the disk is dropped (a mirror goes on
    /// with its other members), in milliseconds (0: never; default 30000).
    #[arg(long, value_name = "MS")]
    bio_deadline_ms: Option<u64>,
    /// File holding the management token changes must present: used as it
    /// is when it exists, else written (mode 0600) with a new random one
    /// (default: ${XDG_RUNTIME_DIR:-/tmp}/strata-UID/http-PORT.token,
    /// removed on exit).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A secret the config names with `-k NAME` (an eli or gbde
    /// passphrase), read from FILE and handed to the appliance outside
    /// the config text (repeatable).
    #[arg(long = "secret", value_name = "NAME=FILE", value_parser = parse_secret)]
    secrets: Vec<(String, PathBuf)>,
}

/// `NAME=FILE` of `--secret`: the name as config lines write it, and a
/// file that can be read.
fn parse_secret(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=FILE"))?;
    if !geom::config::is_name(name) || name.contains('/') || name.len() > 40 {
        return Err(format!(
            "'{name}': a secret name is letters, digits, '_', '-' and '.', at most 40"
        ));
    }
    let file = PathBuf::from(file);
    let len = std::fs::metadata(&file)
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    if len > 4096 {
        return Err(format!(
            "{}: a secret is at most 4096 bytes",
            file.display()
        ));
    }
    Ok((name.to_string(), file))
}

impl CommonArgs {
    /// The secrets' bytes, read now.
    fn secret_bytes(&self) -> Result<Vec<(String, Vec<u8>)>, Failure> {
        self.secrets
            .iter()
            .map(|(n, f)| {
                std::fs::read(f)
                    .map(|b| (n.clone(), b))
                    .map_err(|e| Failure::host(format!("--secret {n}: {}: {e}", f.display())))
            })
            .collect()
    }

    /// The management token for this appliance, in its file.
    fn token(&self) -> Result<image::token::TokenFile, Failure> {
        image::token::TokenFile::create(self.token_file.as_deref(), self.http_port).map_err(|e| {
            Failure::host(format!(
                "management token file {}: {e}",
                self.token_file
                    .clone()
                    .unwrap_or_else(|| image::token::default_path(self.http_port))
                    .display()
            ))
        })
    }
}

impl CommonArgs {
    /// The limits given, as `(KEY, VALUE)` for the appliance's
    /// `Limits::set`.
    fn limits(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(b) = &self.payload_budget {
            out.push(("payload_budget".into(), b.clone()));
        }
        if let Some(t) = self.http_timeout_ms {
            out.push(("http_timeout_ms".into(), t.to_string()));
        }
        if let Some(t) = self.nbd_stall_timeout_ms {
            out.push(("nbd_stall_timeout_ms".into(), t.to_string()));
        }
        if let Some(t) = self.bio_deadline_ms {
            out.push(("bio_deadline_ms".into(), t.to_string()));
        }
        out
    }
}

/// A size (`512`, `64k`, `256m`, `1g`), kept as written.
fn parse_size_arg(s: &str) -> Result<String, String> {
    geom::config::parse_size(s)?;
    Ok(s.to_string())
}

/// Options of `run`.
#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(32..=1 << 20))]
    memory: u32,
    /// Accelerator: auto uses TCG when /dev/kvm is missing or is the slow
    /// nested kvm-pvm flavour, else tries KVM and falls back to TCG when the
    /// kernel's boot line does not come within STRATA_KVM_PROBE_MS.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// Machine type: q35 (virtio-pci) or microvm (virtio-mmio).
    #[arg(long, value_enum, default_value_t = MachineArg::Q35)]
    machine: MachineArg,
    /// Append the guest console to FILE instead of writing it on stderr.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Add WORD to the kernel command line (repeatable): loglevel=debug,
    /// strata.tsc=cpuid|pit2|pm|pit0, strata.selftest=NAME[,NAME...]
    /// (idle, heap, pagefault, ud, stackoverflow, panic), strata.aes=soft
    /// (the portable AES instead of AES-NI, to measure it).
    #[arg(long = "kernel-arg", value_name = "WORD", value_parser = parse_kernel_arg)]
    kernel_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MachineArg {
    Q35,
    Microvm,
}

fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    DiskSpec::parse(s).map_err(|e| e.to_string())
}

/// One word of the kernel command line: printable, no spaces.
fn parse_kernel_arg(s: &str) -> Result<String, String> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_graphic()) {
        return Err("expected one word of printable ASCII without spaces".into());
    }
    Ok(s.to_string())
}

/// Reads the config file and checks it with the appliance's own parser.
fn load_config(path: Option<&Path>) -> Result<Option<String>, Failure> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::config(format!("{}: {e}", path.display())))?;
    validate_config(&text).map_err(|e| Failure::config(format!("{}: {e}", path.display())))?;
    Ok(Some(text))
}

/// Checks a configuration text; the error reads `line L, column C: message`.
fn validate_config(text: &str) -> Result<(), String> {
    appliance::service::parse_config(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Creates missing disk files and says what was done.
fn prepare_disks(disks: &[DiskSpec]) -> Result<Vec<PathBuf>, Failure> {
    let mut out = Vec::new();
    for d in disks {
        let st =
            ensure_disk(d, DEFAULT_DISK_SIZE_BYTES).map_err(|e| Failure::host(e.to_string()))?;
        if let Some(note) = st.note(d) {
            eprintln!("strata: {note}");
        }
        out.push(d.path.clone());
    }
    Ok(out)
}

/// True when `prog` is an executable file in some `PATH` directory.
fn in_path(prog: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(prog))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn env_duration(name: &str, default: Duration, unit_ms: bool) -> Result<Duration, Failure> {
    let Some(v) = std::env::var_os(name) else {
        return Ok(default);
    };
    let v = v.to_string_lossy();
    let bad = || {
        let unit = if unit_ms { "milliseconds" } else { "seconds" };
        Failure::config(format!("{name}={v}: not a number of {unit}"))
    };
    let n: f64 = v.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(if unit_ms {
        n / 1000.0
    } else {
        n
    }))
}

/// True when the config has an `export iscsi` line.
fn exports_iscsi(config: Option<&str>) -> bool {
    config
        .and_then(|t| appliance::service::parse_config(t).ok())
        .is_some_and(|c| c.exports().any(|(_, e)| e.protocol == "iscsi"))
}

fn cmd_run(a: RunArgs) -> Result<(), Failure> {
    let config = load_config(a.common.config.as_deref())?;
    let ready_timeout = env_duration("STRATA_READY_TIMEOUT", Duration::from_secs(60), false)?;
    let kvm_probe = env_duration("STRATA_KVM_PROBE_MS", Duration::from_millis(3000), true)?;
    if !in_path(QEMU_BINARY) {
        return Err(Failure::host(format!(
            "{QEMU_BINARY} not found in PATH; install it with:\n    apt-get install -y qemu-system-x86"
        )));
    }
    let disks = prepare_disks(&a.common.disks)?;
    let kernel = ensure_kernel().map_err(|e| Failure::host(e.to_string()))?;
    let token = a.common.token()?;
    // The config reaches QEMU as a sealed in-memory file: nothing on disk
    // to clean up, whatever ends this process.
    let config_file = match &config {
        Some(text) => Some(
            MemFile::new(c"strata.conf", text.as_bytes())
                .map_err(|e| Failure::host(format!("config image: {e}")))?,
        ),
        None => None,
    };
    let plan = RunPlan {
        qemu: QemuConfig {
            kernel,
            initrd: config_file.as_ref().map(MemFile::path),
            kernel_args: a
                .common
                .limits()
                .into_iter()
                .map(|(k, v)| format!("strata.{k}={v}"))
                .chain(a.kernel_args)
                .collect(),
            machine: match a.machine {
                MachineArg::Q35 => Machine::Q35,
                MachineArg::Microvm => Machine::Microvm,
            },
            accel: Accel::Tcg,
            memory_mib: a.memory,
            disks: disks.into_iter().map(Drive::from).collect(),
            nbd_port: a.common.nbd_port,
            http_port: a.common.http_port,
            iscsi_port: a.common.iscsi_port.or_else(|| {
                exports_iscsi(config.as_deref()).then_some(image::qemu::GUEST_ISCSI_PORT)
            }),
            qmp_socket: None,
            token_file: Some(token.path.clone()),
            secrets: a.common.secrets.clone(),
        },
        accel: match a.accel {
            AccelArg::Auto => AccelChoice::Auto,
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
        },
        log: a.log,
        config_label: a.common.config.as_ref().map_or_else(
            || "built-in config".to_string(),
            |p| p.display().to_string(),
        ),
        ready_timeout,
        kvm_probe,
        kvm_device: PathBuf::from("/dev/kvm"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .map_err(|e| Failure::host(format!("signal handler: {e}")))?;
    }
    let r = runner::run(&plan, &stop);
    drop(config_file);
    drop(token);
    r
}

fn cmd_hosted(a: CommonArgs) -> Result<(), Failure> {
    let config_text = load_config(a.config.as_deref())?;
    let disks = prepare_disks(&a.disks)?;
    let token = a.token()?;
    let opts = appliance::hosted::HostedOptions {
        config_text,
        disks,
        ports: vec![
            ("nbd".into(), a.nbd_port),
            ("http".into(), a.http_port),
            (
                "iscsi".into(),
                a.iscsi_port.unwrap_or(image::qemu::GUEST_ISCSI_PORT),
            ),
        ],
        limits: a.limits(),
        token: Some(token.token.clone()),
        secrets: a.secret_bytes()?,
    };
    let r = appliance::hosted::run(&opts).map_err(Failure::runtime);
    drop(token);
    r
}

fn cmd_build() -> Result<(), Failure> {
    let k = build_kernel().map_err(|e| Failure::host(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", k.display());
    Ok(())
}

/// How long one management request may take.
const MGMT_TIMEOUT: Duration = Duration::from_secs(30);

fn mgmt_addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))
}

fn mgmt_request(
    port: u16,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> Result<http::Reply, Failure> {
    mgmt::request(mgmt_addr(port), method, path, body, token, MGMT_TIMEOUT).map_err(|e| {
        Failure::runtime(format!(
            "cannot reach the appliance at 127.0.0.1:{port} ({method} {path}): {e}"
        ))
    })
}

fn cmd_geom(a: GeomArgs) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    // `strata geom --http-port P list`: after an option clap takes `list`
    // for a LINE; it is the subcommand all the same.
    let sub = match (a.sub, a.lines.as_slice()) {
        (Some(s), _) => Some(s),
        (None, [l]) if l == "list" => Some(GeomSub::List { json: false }),
        (None, [l, j]) if l == "list" && j == "--json" => Some(GeomSub::List { json: true }),
        (None, _) => None,
    };
    match sub {
        Some(GeomSub::List { json }) => {
            let r = mgmt_request(a.http_port, None, "GET", "/geom", "")?;
            if r.status != 200 {
                return Err(Failure::runtime(format!(
                    "GET /geom: HTTP {}: {}",
                    r.status,
                    r.text().trim()
                )));
            }
            if json {
                let _ = write!(out, "{}", r.text());
                return Ok(());
            }
            let v: serde_json::Value = serde_json::from_str(&r.text())
                .map_err(|e| Failure::runtime(format!("GET /geom: not JSON: {e}")))?;
            let text = mgmt::format_geom_list(&v)
                .map_err(|e| Failure::runtime(format!("GET /geom: {e}")))?;
            let _ = write!(out, "{text}");
            Ok(())
        }
        None => {
            let body = mgmt::lines_from_args(&a.lines);
            let token = image::token::find(a.token_file.as_deref(), a.http_port)
                .map_err(|e| Failure::config(format!("management token: {e}")))?;
            let r = mgmt_request(a.http_port, token.as_deref(), "POST", "/geom", &body)?;
            match mgmt::geom_result(&r) {
                Ok(text) => {
                    let _ = write!(out, "{text}");
                    Ok(())
                }
                Err(msg) if r.status == 400 => Err(Failure::config(msg)),
                Err(msg) => Err(Failure::runtime(msg)),
            }
        }
    }
}

fn cmd_gstat(a: GstatArgs) -> Result<(), Failure> {
    let sample = || -> Result<(std::time::Instant, Vec<(String, mgmt::Counters)>), Failure> {
        let r = mgmt_request(a.http_port, None, "GET", "/metrics", "")?;
        if r.status != 200 {
            return Err(Failure::runtime(format!("GET /metrics: HTTP {}", r.status)));
        }
        Ok((std::time::Instant::now(), mgmt::parse_metrics(&r.text())))
    };
    let mut prev = sample()?;
    let mut shown = 0u64;
    while a.count.is_none_or(|n| shown < n) {
        std::thread::sleep(a.interval);
        let cur = sample()?;
        let text = mgmt::format_gstat(&prev.1, &cur.1, cur.0 - prev.0, a.interval);
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{text}");
        let _ = out.flush();
        prev = cur;
        shown += 1;
    }
    Ok(())
}

fn cmd_fault(a: FaultArgs) -> Result<(), Failure> {
    use image::fault::{self, Fault, Protocol};
    let mut config = load_config(a.config.as_deref())?;
    if a.protocol == Protocol::Iscsi && config.is_none() {
        config = Some(fault::default_iscsi_config());
    }
    let proto = a.protocol.name();
    let first = |text: &str| {
        let c = appliance::service::parse_config(text).ok()?;
        let (_, e) = c.exports().find(|(_, e)| e.protocol == proto)?;
        if a.protocol == Protocol::Nbd {
            return Some(e.name.clone());
        }
        // An iSCSI export is IQN/LUN, the LUN from its `lun N` (else 0).
        let w = &e.options;
        let lun = w
            .iter()
            .position(|o| o.text == "lun")
            .and_then(|i| w.get(i + 1))
            .map_or("0", |o| o.text.as_str());
        Some(format!("{}/{lun}", e.name))
    };
    let export = match (&a.export, &config) {
        (Some(e), _) => e.clone(),
        (None, Some(text)) => first(text).unwrap_or_else(|| "vtbd0".into()),
        (None, None) => "vtbd0".into(),
    };
    for prog in [QEMU_BINARY, "qemu-nbd", "nbdkit"] {
        if !in_path(prog) {
            return Err(Failure::host(format!(
                "{prog} not found in PATH; install it with:\n    apt-get install -y qemu-system-x86 qemu-utils nbdkit"
            )));
        }
    }
    if !(a.round_time.is_finite() && a.round_time > 0.0) {
        return Err(Failure::config(
            "--round-time: expected a positive number of seconds",
        ));
    }
    let kernel = ensure_kernel().map_err(|e| Failure::host(e.to_string()))?;
    let temp = match &a.dir {
        Some(_) => None,
        None => Some(
            image::tempdir::TempDir::new()
                .map_err(|e| Failure::host(format!("scratch directory: {e}")))?,
        ),
    };
    let dir = a.dir.clone().unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    });
    // The disks' sockets live there and qemu-nbd takes absolute paths only.
    let dir = std::path::absolute(&dir)
        .map_err(|e| Failure::host(format!("--dir {}: {e}", dir.display())))?;
    let ready_timeout = env_duration("STRATA_READY_TIMEOUT", Duration::from_secs(60), false)?;
    let opts = fault::Options {
        kernel,
        config,
        export,
        protocol: a.protocol,
        disks: usize::from(a.disks),
        disk_size: a.disk_size,
        seed: a.seed,
        rounds: a.rounds,
        faults: if a.faults.is_empty() {
            Fault::ALL.to_vec()
        } else {
            a.faults.clone()
        },
        round_time: Duration::from_secs_f64(a.round_time),
        depth: a.depth.max(1),
        memory_mib: a.memory,
        machine: Machine::Q35,
        accel: match a.accel {
            AccelArg::Kvm => Accel::Kvm,
            _ => Accel::Tcg,
        },
        dir: dir.clone(),
        ready_timeout,
        lying_disks: a.lying_disks,
        dead_disks: a.dead_disks.clone(),
    };
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "fault campaign: seed {}, {} rounds, {} disks of {} bytes, {} export {}, faults {}",
        opts.seed,
        opts.rounds,
        opts.disks,
        opts.disk_size,
        opts.protocol.name(),
        opts.export,
        opts.faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    let report = fault::run(&opts, &mut out).map_err(Failure::runtime)?;
    let _ = writeln!(out, "{report}");
    if report.passed() {
        drop(temp);
        Ok(())
    } else {
        // Keep the evidence: disks, write logs, consoles.
        let kept = temp.map(|t| {
            let p = t.path().to_path_buf();
            std::mem::forget(t);
            p
        });
        let dir = kept.unwrap_or(dir);
        Err(Failure::runtime(format!(
            "the campaign found failures; disks and consoles are in {}",
            dir.display()
        )))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Hosted(a) => cmd_hosted(a),
        Cmd::Build => cmd_build(),
        Cmd::Geom(a) => cmd_geom(a),
        Cmd::Gstat(a) => cmd_gstat(a),
        Cmd::Fault(a) => cmd_fault(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("strata: {}", f.message);
            ExitCode::from(u8::try_from(f.code).unwrap_or(1))
        }
    }
}
