//! `strata fault`: a fault campaign. It boots the appliance in QEMU over
//! disks that can lose power, fail, hang and vanish, drives a verifying
//! workload through NBD or iSCSI ([`Protocol`]), injects faults on a seeded schedule, restarts,
//! checks every sector against what was acknowledged, and reports.
//!
//! ```text
//!  round:  boot ─▶ verify every sector (two passes) ─▶ workload ─▶ end
//!                                                        │ fault at t   │ cut or clean stop
//!                                                        ▼              ▼
//!                                       media: errors / hang / vanish   replay each disk's
//!                                                                       write log as a power
//!                                                                       cut leaves it
//!  last:   boot ─▶ verify ─▶ wait for resyncs and rebuilds ─▶ scrub parity ─▶ clean stop
//!                                                                      ─▶ compare mirror members
//! ```
//!
//! The final check reads the redundant arrays from `/status`: every class
//! section that lists entries with a `name` and a list of `members`
//! (`"mirrors"`, `"raid5"`). An entry is still copying while its
//! `resync`, `recovery`, `rebuild` or `job` is set or its `state` is
//! `rebuilding`; an entry with a `scrub` object is scrubbed (`CLASS scrub
//! NAME` through `POST /geom`, the class being the section's name less a
//! plural `s`) and its `mismatches` are counted against the campaign.
//!
//! - [`media`]: a disk with a volatile cache and failure controls;
//! - [`logwrites`]: the write log and its replay after a cut;
//! - [`ledger`]: what each sector may hold, from what was acknowledged;
//! - [`client`]: the pipelined NBD client of the workload;
//! - [`iscsi`]: the pipelined iSCSI initiator of the workload, with the
//!   NBD client's operations and replies ([`Link`] is either);
//! - [`vm`]: one boot of the appliance.
//!
//! The same seed replays the same schedule: which fault, on which disk,
//! when, and what a cut keeps. The appliance's own timing still varies
//! from run to run, so the writes in flight at a cut do too.

pub mod client;
pub mod iscsi;
pub mod ledger;
pub mod logwrites;
pub mod media;
pub mod vm;

use client::Client;
use ledger::{Bad, Ledger};
use logwrites::Cut;
use media::{Errors, Media};
use net::nbd::wire::{
    Command, CMD_FLAG_FUA, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA,
    TFLAG_SEND_WRITE_ZEROES,
};
use rand_core::{Rng, SeedableRng};
use rand_xorshift::XorShiftRng;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vm::{End, Vm};

use crate::qemu::{Accel, Drive, Machine, QemuConfig};

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// The power is cut: every write the disks had not flushed may be lost.
    PowerCut,
    /// A disk fails writes for a moment, then works again.
    WriteErrors,
    /// A disk fails reads for a moment, then works again.
    ReadErrors,
    /// A disk fails every read and write until the end of the boot.
    DiskFails,
    /// A disk stops answering.
    DiskHangs,
    /// A disk vanishes: its server is killed, every request fails.
    DiskGone,
    /// A disk fails and the boot ends cleanly; the next boot resyncs it
    /// and the power is cut during the resync.
    ResyncCut,
}

impl Fault {
    /// Every kind, in report order.
    pub const ALL: [Fault; 7] = [
        Fault::PowerCut,
        Fault::WriteErrors,
        Fault::ReadErrors,
        Fault::DiskFails,
        Fault::DiskHangs,
        Fault::DiskGone,
        Fault::ResyncCut,
    ];

    /// The kind's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::PowerCut => "power-cut",
            Fault::WriteErrors => "write-errors",
            Fault::ReadErrors => "read-errors",
            Fault::DiskFails => "disk-fails",
            Fault::DiskHangs => "disk-hangs",
            Fault::DiskGone => "disk-gone",
            Fault::ResyncCut => "resync-cut",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Result<Fault, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault {s:?} (one of {})", names.join(", "))
            })
    }
}

/// The protocol the workload speaks to the export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// NBD, to the forwarded NBD port; the export is an NBD export name.
    #[default]
    Nbd,
    /// iSCSI, to the forwarded iSCSI port; the export is `IQN` (LUN 0)
    /// or `IQN/LUN` of an `export iscsi` line.
    Iscsi,
}

impl Protocol {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Nbd => "nbd",
            Protocol::Iscsi => "iscsi",
        }
    }

    /// Parses a name (`nbd`, `iscsi`).
    pub fn parse(s: &str) -> Result<Protocol, String> {
        [Protocol::Nbd, Protocol::Iscsi]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown protocol {s:?} (nbd or iscsi)"))
    }
}

/// The target name of the configuration [`default_iscsi_config`] makes.
pub const DEFAULT_IQN: &str = "iqn.2026-12.org.strata:fault";

/// The configuration of an iSCSI campaign given none: vtbd0 whole as
/// LUN 0 of [`DEFAULT_IQN`].
pub fn default_iscsi_config() -> String {
    format!("export iscsi {DEFAULT_IQN} vtbd0\n")
}

/// The workload's connection to the export, over either protocol: the
/// same requests (NBD's commands and flags), the same [`client::Reply`].
pub enum Link {
    /// An NBD connection.
    Nbd(Client),
    /// An iSCSI session.
    Iscsi(iscsi::Initiator),
}

impl Link {
    /// Connects with `protocol` to `addr` and opens `export`; every step
    /// is bounded by `timeout`.
    pub fn connect(
        protocol: Protocol,
        addr: SocketAddr,
        export: &str,
        timeout: Duration,
    ) -> io::Result<Link> {
        Ok(match protocol {
            Protocol::Nbd => Link::Nbd(Client::connect(addr, export, timeout)?),
            Protocol::Iscsi => Link::Iscsi(iscsi::Initiator::connect(addr, export, timeout)?),
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Link::Nbd(c) => c.size,
            Link::Iscsi(c) => c.size,
        }
    }

    /// NBD transmission flags: what the export takes.
    pub fn flags(&self) -> u16 {
        match self {
            Link::Nbd(c) => c.flags,
            Link::Iscsi(c) => c.flags,
        }
    }

    /// Sends one request; returns its cookie.
    pub fn send(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        match self {
            Link::Nbd(c) => c.send(cmd, flags, offset, len, data),
            Link::Iscsi(c) => c.send(cmd, flags, offset, len, data),
        }
    }

    /// The next reply, waiting at most `wait` (`Ok(None)`: none yet).
    pub fn recv(&mut self, wait: Duration) -> io::Result<Option<client::Reply>> {
        match self {
            Link::Nbd(c) => c.recv(wait),
            Link::Iscsi(c) => c.recv(wait),
        }
    }

    /// Ends the session politely (best effort) and closes.
    pub fn disconnect(self) {
        match self {
            Link::Nbd(c) => c.disconnect(),
            Link::Iscsi(c) => c.disconnect(),
        }
    }
}

/// What the campaign runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The kernel to boot.
    pub kernel: PathBuf,
    /// The configuration (the appliance's built-in one when `None`).
    pub config: Option<String>,
    /// The export the workload uses.
    pub export: String,
    /// The protocol the workload speaks.
    pub protocol: Protocol,
    /// Number of disks (vtbd0, vtbd1, …).
    pub disks: usize,
    /// Size of each disk in bytes.
    pub disk_size: u64,
    /// Seed of the schedule.
    pub seed: u64,
    /// Rounds (boots with a fault), not counting the final check.
    pub rounds: u32,
    /// The fault kinds to draw from.
    pub faults: Vec<Fault>,
    /// How long the workload runs in each round.
    pub round_time: Duration,
    /// Requests the workload keeps in flight.
    pub depth: usize,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Machine type.
    pub machine: Machine,
    /// Accelerator.
    pub accel: Accel,
    /// Working directory (disks, logs, consoles).
    pub dir: PathBuf,
    /// How long a boot may take to serve the export.
    pub ready_timeout: Duration,
    /// Self-check: the disks drop every flush, so the campaign must
    /// report losses.
    pub lying_disks: bool,
    /// Disks that fail every request once the first boot serves, and
    /// from the start of every later boot: members gone for good, so
    /// arrays run degraded. Faults are drawn on the other disks.
    pub dead_disks: Vec<usize>,
}

/// What one round saw.
#[derive(Clone, Debug, Default)]
pub struct Round {
    /// Round number (1-based; 0 for the final check).
    pub n: u32,
    /// The fault (none for the final check).
    pub fault: Option<Fault>,
    /// The disk it hit.
    pub disk: usize,
    /// Seconds into the workload it came.
    pub at: f64,
    /// How the boot ended.
    pub end: String,
    /// Sectors checked after the restart.
    pub sectors_checked: u64,
    /// Writes acknowledged as successful.
    pub writes_acked: u64,
    /// Flushes acknowledged as successful.
    pub flushes_acked: u64,
    /// Requests that failed (NBD errors; iSCSI's mapped to them).
    pub errors: u64,
    /// Reads checked while the appliance ran.
    pub reads_checked: u64,
    /// Sectors that had lost acknowledged data.
    pub lost: u64,
    /// Sectors holding what nobody wrote there.
    pub garbage: u64,
    /// The first few bad sectors.
    pub examples: Vec<String>,
    /// Other failures: the appliance crashed, did not serve, …
    pub failures: Vec<String>,
    /// Writes a cut lost or tore on the media (the model, not a fault).
    pub cut_lost: usize,
    /// What was copying (resync, rebuild) when the boot that is cut
    /// during one began serving; `None` when not asked.
    pub copying: Option<Vec<String>>,
}

/// The campaign's result.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Every round, the final check last.
    pub rounds: Vec<Round>,
    /// Mirror members compared at the end, and how many bytes differed.
    pub replicas: Vec<(String, String, String, u64)>,
    /// Mirrors whose members could not be compared, and why.
    pub replicas_skipped: Vec<String>,
    /// Arrays whose parity was scrubbed at the end.
    pub scrubs: Vec<Scrub>,
    /// Arrays that could not be scrubbed (degraded, …), and why.
    pub scrubs_skipped: Vec<String>,
}

/// One array's scrub at the end of the campaign.
#[derive(Clone, Debug, Default)]
pub struct Scrub {
    /// The class (`raid5`).
    pub class: String,
    /// The array.
    pub name: String,
    /// Its state when the scrub began (`complete`, `degraded`).
    pub state: String,
    /// Rows whose parity was checked.
    pub rows_checked: u64,
    /// Rows whose parity did not match their data.
    pub mismatches: u64,
}

impl Report {
    /// Sectors with lost data, over all rounds.
    pub fn lost(&self) -> u64 {
        self.rounds.iter().map(|r| r.lost).sum()
    }
    /// Sectors with garbage, over all rounds.
    pub fn garbage(&self) -> u64 {
        self.rounds.iter().map(|r| r.garbage).sum()
    }
    /// Mirror member pairs that differ.
    pub fn disagreeing(&self) -> usize {
        self.replicas.iter().filter(|r| r.3 > 0).count()
    }
    /// Other failures, over all rounds.
    pub fn failures(&self) -> usize {
        self.rounds.iter().map(|r| r.failures.len()).sum()
    }
    /// Parity rows that did not match their data, over every scrub.
    pub fn parity_mismatches(&self) -> u64 {
        self.scrubs.iter().map(|s| s.mismatches).sum()
    }
    /// True when nothing was lost, mixed or broken.
    pub fn passed(&self) -> bool {
        self.lost() == 0
            && self.garbage() == 0
            && self.disagreeing() == 0
            && self.failures() == 0
            && self.parity_mismatches() == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let acked: u64 = self.rounds.iter().map(|r| r.writes_acked).sum();
        let flushes: u64 = self.rounds.iter().map(|r| r.flushes_acked).sum();
        let checked: u64 = self.rounds.iter().map(|r| r.sectors_checked).sum();
        let reads: u64 = self.rounds.iter().map(|r| r.reads_checked).sum();
        let mut kinds: Vec<&str> = self
            .rounds
            .iter()
            .filter_map(|r| r.fault.map(Fault::name))
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        let rounds = self.rounds.iter().filter(|r| r.fault.is_some()).count();
        writeln!(
            f,
            "rounds {rounds} ({}), writes acknowledged {acked}, flushes {flushes}, sectors verified {checked}, reads checked live {reads}",
            kinds.join(", ")
        )?;
        writeln!(
            f,
            "lost {}, garbage {}, replicas disagreeing {}, other failures {}, parity mismatches {}",
            self.lost(),
            self.garbage(),
            self.disagreeing(),
            self.failures(),
            self.parity_mismatches()
        )?;
        write!(f, "{}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A request in flight.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Read {
        offset: u64,
        issued: u64,
        verify: bool,
    },
    Write {
        id: u64,
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush {
        issued: u64,
    },
}

/// A request: command, flags, offset, length.
type Req = (Command, u16, u64, u64);

/// An action at a time into the workload.
#[derive(Clone, Copy, Debug)]
enum Action {
    Fail(usize, Errors),
    Heal(usize),
    Hang(usize),
    Vanish(usize),
    Cut,
}

/// One boot's plan.
#[derive(Clone, Debug)]
struct Script {
    verify: bool,
    work: Duration,
    actions: Vec<(Duration, Action)>,
    /// Cut the power this long after the connection, wherever it is.
    cut_after: Option<Duration>,
    /// End with a clean stop (else a cut).
    clean: bool,
    /// Note what is copying (resyncs, rebuilds) once the export serves.
    watch_copy: bool,
    /// The fault takes a disk: first let every array finish copying
    /// (one redundant copy protects against one failure at a time).
    spare_copy: bool,
}

/// A redundant array listed in `/status`: an entry with a `name` and a
/// list of `members` in a class's section (`"mirrors"`, `"raid5"`).
#[derive(Clone, Debug)]
struct Array {
    /// The section it is listed in.
    section: String,
    /// Its name.
    name: String,
    /// Its entry.
    doc: serde_json::Value,
}

impl Array {
    /// Its class: the section's name, less a plural `s`.
    fn class(&self) -> &str {
        self.section.strip_suffix('s').unwrap_or(&self.section)
    }

    /// Its state (`complete`, `degraded`, `rebuilding`, …).
    fn state(&self) -> &str {
        self.doc["state"].as_str().unwrap_or("")
    }

    /// What it is copying, if anything: a resync or recovery (mirror), a
    /// rebuild, or a background job such as a parity resync (raid5).
    fn copying(&self) -> Option<String> {
        for key in ["resync", "recovery", "rebuild", "job"] {
            let v = &self.doc[key];
            if !v.is_null() {
                let what = v["kind"].as_str().unwrap_or(key);
                return Some(match v["member"].as_u64() {
                    Some(m) => format!("{what} of member {m}"),
                    None => what.to_string(),
                });
            }
        }
        matches!(self.state(), "rebuilding" | "resyncing").then(|| self.state().to_string())
    }

    /// Its members' providers (members without one left out).
    fn providers(&self) -> Vec<String> {
        self.doc["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["provider"].as_str().map(str::to_string))
            .collect()
    }

    /// Its scrub's progress, when it is a class that scrubs.
    fn scrub(&self) -> Option<&serde_json::Value> {
        self.doc.get("scrub").filter(|v| v.is_object())
    }
}

/// The redundant arrays in a `/status` document.
fn arrays(status: &serde_json::Value) -> Vec<Array> {
    let mut out = Vec::new();
    for (section, list) in status.as_object().into_iter().flatten() {
        for e in list.as_array().into_iter().flatten() {
            if let (Some(name), true) = (e["name"].as_str(), e["members"].is_array()) {
                out.push(Array {
                    section: section.clone(),
                    name: name.to_string(),
                    doc: e.clone(),
                });
            }
        }
    }
    out
}

struct Campaign<'a> {
    o: &'a Options,
    media: Vec<Media>,
    ledger: Option<Ledger>,
    rng: XorShiftRng,
    nbd_port: u16,
    http_port: u16,
    iscsi_port: u16,
    boots: u32,
    log: &'a mut dyn io::Write,
}

/// The workload's connection and what is in flight on it.
struct Conn {
    client: Option<Link>,
    pending: HashMap<u64, Pending>,
}

impl Campaign<'_> {
    fn boot(&mut self) -> Result<Vm, String> {
        for (i, m) in self.media.iter_mut().enumerate() {
            m.start().map_err(|e| format!("disk {i}: {e}"))?;
        }
        if self.boots > 0 {
            self.kill_dead_disks()?;
        }
        self.boots += 1;
        let initrd = match &self.o.config {
            Some(text) => {
                let p = self.o.dir.join("strata.conf");
                std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
                Some(p)
            }
            None => None,
        };
        let token_file = self.o.dir.join("http.token");
        if !token_file.exists() {
            crate::token::write_new(&token_file)
                .map_err(|e| format!("{}: {e}", token_file.display()))?;
        }
        let cfg = QemuConfig {
            kernel: self.o.kernel.clone(),
            initrd,
            kernel_args: Vec::new(),
            machine: self.o.machine,
            accel: self.o.accel,
            memory_mib: self.o.memory_mib,
            disks: self
                .media
                .iter()
                .map(|m| Drive::NbdUnix(m.socket()))
                .collect(),
            nbd_port: self.nbd_port,
            http_port: self.http_port,
            iscsi_port: Some(self.iscsi_port),
            qmp_socket: None,
            token_file: Some(token_file),
            secrets: Vec::new(),
        };
        let console = self.o.dir.join(format!("console-{:03}.log", self.boots));
        Vm::boot(&cfg, console).map_err(|e| format!("cannot start QEMU: {e}"))
    }

    /// The dead disks fail every request from now on.
    fn kill_dead_disks(&self) -> Result<(), String> {
        for &i in &self.o.dead_disks {
            self.media[i]
                .fail(Errors::All)
                .map_err(|e| format!("disk {i}: {e}"))?;
        }
        Ok(())
    }

    /// Where the workload's protocol is served.
    fn addr(&self) -> SocketAddr {
        let port = match self.o.protocol {
            Protocol::Nbd => self.nbd_port,
            Protocol::Iscsi => self.iscsi_port,
        };
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    fn connect(&mut self, vm: &mut Vm) -> Result<Link, String> {
        let addr = self.addr();
        let until = Instant::now() + self.o.ready_timeout;
        let mut last = String::new();
        while Instant::now() < until {
            if let Some(st) = vm.exited() {
                return Err(format!("the appliance exited during boot ({st})"));
            }
            match Link::connect(
                self.o.protocol,
                addr,
                &self.o.export,
                Duration::from_secs(5),
            ) {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "{} export {} not served within {:?}: {last}",
            self.o.protocol.name(),
            self.o.export,
            self.o.ready_timeout
        ))
    }

    fn ledger(&mut self) -> &mut Ledger {
        self.ledger
            .as_mut()
            .expect("ledger made at first connection")
    }

    /// Records a bad sector.
    fn bad(round: &mut Round, bad: Vec<Bad>, when: &str) {
        for b in bad {
            if b.lost {
                round.lost += 1;
            } else {
                round.garbage += 1;
            }
            if round.examples.len() < 8 {
                round.examples.push(format!("{when}: {b}"));
            }
        }
    }

    /// Takes one reply and updates the ledger.
    fn complete(&mut self, d: &mut Conn, round: &mut Round, r: client::Reply) {
        let Some(p) = d.pending.remove(&r.cookie) else {
            round
                .failures
                .push(format!("reply for an unknown cookie {:#x}", r.cookie));
            return;
        };
        let ok = r.error == 0;
        if !ok {
            round.errors += 1;
        }
        let horizon = d
            .pending
            .values()
            .filter_map(|p| match p {
                Pending::Read { issued, .. } => Some(*issued),
                _ => None,
            })
            .min()
            .unwrap_or(u64::MAX);
        let l = self.ledger();
        match p {
            Pending::Write {
                id,
                offset,
                len,
                fua,
            } => {
                l.end_write(id, offset, len, ok, fua);
                if ok {
                    round.writes_acked += 1;
                }
            }
            Pending::Flush { issued } => {
                if ok {
                    l.end_flush(issued, horizon);
                    round.flushes_acked += 1;
                }
            }
            Pending::Read {
                offset,
                issued,
                verify,
            } if ok => {
                if verify {
                    let bad = l.check_recovered(offset, &r.data);
                    round.sectors_checked += r.data.len() as u64 / ledger::SECTOR;
                    Self::bad(round, bad, "after restart");
                } else {
                    let bad = l.check_live(offset, &r.data, issued);
                    round.reads_checked += 1;
                    Self::bad(round, bad, "while serving");
                }
            }
            Pending::Read { verify, offset, .. } => {
                if verify {
                    round.failures.push(format!(
                        "reading offset {offset} after the restart failed (error {})",
                        r.error
                    ));
                }
            }
        }
    }

    /// The connection is gone: what was in flight never completes.
    fn drop_connection(&mut self, d: &mut Conn) {
        d.client = None;
        let l = self.ledger.as_mut().expect("ledger");
        for (_, p) in d.pending.drain() {
            if let Pending::Write {
                id, offset, len, ..
            } = p
            {
                l.end_write(id, offset, len, false, false);
            }
        }
    }

    /// Waits for one reply (up to `wait`); false if the connection is gone.
    fn pump(&mut self, d: &mut Conn, round: &mut Round, wait: Duration) -> bool {
        let Some(c) = d.client.as_mut() else {
            return false;
        };
        match c.recv(wait) {
            Ok(Some(r)) => {
                self.complete(d, round, r);
                true
            }
            Ok(None) => true,
            Err(_) => {
                self.drop_connection(d);
                false
            }
        }
    }

    fn send(
        &mut self,
        d: &mut Conn,
        (cmd, flags, offset, len): Req,
        p: Pending,
        data: &[u8],
    ) -> bool {
        let Some(c) = d.client.as_mut() else {
            return false;
        };
        match c.send(cmd, flags, offset, len as u32, data) {
            Ok(cookie) => {
                d.pending.insert(cookie, p);
                true
            }
            Err(_) => {
                if let Pending::Write {
                    id, offset, len, ..
                } = p
                {
                    self.ledger().end_write(id, offset, len, false, false);
                }
                self.drop_connection(d);
                false
            }
        }
    }

    /// Reads the whole export and checks it against the ledger; `chunk`
    /// varies between passes so a mirror's members both serve each part.
    fn verify(
        &mut self,
        d: &mut Conn,
        round: &mut Round,
        chunk: u64,
        recovered: bool,
        cut_at: Option<Instant>,
    ) -> bool {
        let size = self.ledger().size();
        let mut off = 0;
        while off < size || !d.pending.is_empty() {
            if cut_at.is_some_and(|t| Instant::now() >= t) {
                return false;
            }
            if off < size && d.pending.len() < self.o.depth {
                let len = chunk.min(size - off);
                let issued = self.ledger().now();
                let p = Pending::Read {
                    offset: off,
                    issued,
                    verify: recovered,
                };
                if !self.send(d, (Command::Read, 0, off, len), p, &[]) {
                    round
                        .failures
                        .push("the connection closed while verifying".into());
                    return false;
                }
                off += len;
                continue;
            }
            if !self.pump(d, round, Duration::from_millis(100)) {
                round
                    .failures
                    .push("the connection closed while verifying".into());
                return false;
            }
        }
        true
    }

    fn pick_range(&mut self, size: u64) -> (u64, u64) {
        let blocks = size / 4096;
        let len = 1 + u64::from(self.rng.next_u32()) % 16;
        let len = len.min(blocks);
        // A third of the requests go to the first MiB, so writes overlap
        // and race each other there.
        let span = if self.rng.next_u32().is_multiple_of(3) {
            (1 << 20) / 4096
        } else {
            blocks
        }
        .max(len);
        let start = u64::from(self.rng.next_u32()) % (span - len + 1);
        (start * 4096, len * 4096)
    }

    /// The workload: writes (some FUA), write-zeroes, flushes and checked
    /// reads, `depth` in flight, with the script's actions on time.
    fn work(
        &mut self,
        d: &mut Conn,
        round: &mut Round,
        vm: &mut Vm,
        s: &Script,
        cut_at: Option<Instant>,
    ) -> bool {
        let start = Instant::now();
        let mut actions = s.actions.clone();
        let size = self.ledger().size();
        let flags = d.client.as_ref().map_or(0, Link::flags);
        loop {
            let now = Instant::now();
            if cut_at.is_some_and(|t| now >= t) {
                return false;
            }
            while let Some(&(t, a)) = actions.first() {
                if now - start < t {
                    break;
                }
                actions.remove(0);
                match a {
                    Action::Fail(i, e) => {
                        let _ = self.media[i].fail(e);
                    }
                    Action::Heal(i) => self.media[i].heal(),
                    Action::Hang(i) => self.media[i].hang(),
                    Action::Vanish(i) => self.media[i].vanish(),
                    Action::Cut => return false,
                }
            }
            if now - start >= s.work {
                return true;
            }
            if vm.exited().is_some() {
                round
                    .failures
                    .push("the appliance stopped during the workload".into());
                return false;
            }
            if d.client.is_none() {
                // The export went away (a disk under a plain export
                // failed); try again now and then.
                std::thread::sleep(Duration::from_millis(250));
                let (p, addr) = (self.o.protocol, self.addr());
                d.client = Link::connect(p, addr, &self.o.export, Duration::from_secs(2)).ok();
                continue;
            }
            if d.pending.len() >= self.o.depth {
                self.pump(d, round, Duration::from_millis(50));
                continue;
            }
            let roll = self.rng.next_u32() % 100;
            let (off, len) = self.pick_range(size);
            let ok = match roll {
                0..=9 if flags & TFLAG_SEND_FLUSH != 0 => {
                    let issued = self.ledger().begin_flush();
                    self.send(d, (Command::Flush, 0, 0, 0), Pending::Flush { issued }, &[])
                }
                10..=14 if flags & TFLAG_SEND_WRITE_ZEROES != 0 => {
                    let id = self.ledger().begin_write(off, len, true);
                    let p = Pending::Write {
                        id,
                        offset: off,
                        len,
                        fua: false,
                    };
                    self.send(d, (Command::WriteZeroes, 0, off, len), p, &[])
                }
                15..=34 => {
                    let issued = self.ledger().now();
                    let p = Pending::Read {
                        offset: off,
                        issued,
                        verify: false,
                    };
                    self.send(d, (Command::Read, 0, off, len), p, &[])
                }
                _ => {
                    let fua = roll >= 90 && flags & TFLAG_SEND_FUA != 0;
                    let id = self.ledger().begin_write(off, len, false);
                    let data = self.ledger().stamp(id, off, len);
                    let p = Pending::Write {
                        id,
                        offset: off,
                        len,
                        fua,
                    };
                    let f = if fua { CMD_FLAG_FUA } else { 0 };
                    self.send(d, (Command::Write, f, off, len), p, &data)
                }
            };
            let _ = ok;
            // Take whatever replies are ready without waiting.
            while d.client.is_some() && !d.pending.is_empty() {
                let before = d.pending.len();
                self.pump(d, round, Duration::ZERO);
                if d.pending.len() == before {
                    break;
                }
            }
        }
    }

    /// Waits for what is in flight (bounded); false if it did not finish.
    fn drain(&mut self, d: &mut Conn, round: &mut Round, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while !d.pending.is_empty() && Instant::now() < until {
            if !self.pump(d, round, Duration::from_millis(100)) {
                return false;
            }
        }
        d.pending.is_empty()
    }

    /// One boot, driven by `s`.
    fn run_boot(&mut self, round: &mut Round, s: &Script) -> Result<(), String> {
        let mut vm = self.boot()?;
        let client = match self.connect(&mut vm) {
            Ok(c) => c,
            Err(e) => {
                round.failures.push(e);
                round.failures.extend(vm.crash_lines());
                vm.cut();
                self.settle(Cut::Random)?;
                round.end = "not served".into();
                return Ok(());
            }
        };
        if client.flags() & TFLAG_READ_ONLY != 0 {
            return Err(format!("export {} is read-only", self.o.export));
        }
        if self.boots == 1 {
            // The first boot has labelled the dead disks; now they go.
            self.kill_dead_disks()?;
        }
        if s.watch_copy {
            round.copying = Some(
                self.status()
                    .map(|st| {
                        arrays(&st)
                            .iter()
                            .filter_map(|a| {
                                a.copying().map(|c| format!("{} {} {c}", a.class(), a.name))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            );
        }
        if self.ledger.is_none() {
            self.ledger = Some(Ledger::new(
                client.size() / ledger::SECTOR * ledger::SECTOR,
                self.rng.next_u64(),
            ));
        } else if self.ledger().size() != client.size() {
            return Err(format!("export size changed to {}", client.size()));
        }
        let mut d = Conn {
            client: Some(client),
            pending: HashMap::new(),
        };
        let cut_at = s.cut_after.map(|t| Instant::now() + t);
        let mut going = true;
        if s.verify {
            going = self.verify(&mut d, round, 256 << 10, true, cut_at)
                && self.verify(&mut d, round, 188 << 10, false, cut_at);
        }
        if going && s.spare_copy {
            // A disk fault while an array rebuilds would be a second
            // failure, which no single-parity array survives.
            let _ = self.wait_resynced(round);
        }
        if going {
            going = self.work(&mut d, round, &mut vm, s, cut_at);
        }
        let end = if going && s.clean && self.drain(&mut d, round, Duration::from_secs(30)) {
            if let Some(c) = d.client.take() {
                c.disconnect();
            }
            vm.stop(Duration::from_secs(60))
        } else {
            vm.cut();
            End::Cut
        };
        let crash = vm.crash_lines();
        if !crash.is_empty() {
            round
                .failures
                .push(format!("the appliance crashed: {}", crash.join(" | ")));
        }
        self.drop_connection(&mut d);
        let l = self.ledger();
        l.abandon_in_flight();
        round.end = match &end {
            End::Cut => "cut".into(),
            End::Clean => {
                l.clean_stop();
                "clean stop".into()
            }
            End::Failed(why) => format!("stop failed: {why}"),
            End::NoStop => "did not stop; cut".into(),
        };
        let lost = self.settle(Cut::Random)?;
        round.cut_lost += lost;
        Ok(())
    }

    /// Replays every disk's log onto its image.
    fn settle(&mut self, cut: Cut) -> Result<usize, String> {
        let mut lost = 0;
        for (i, m) in self.media.iter_mut().enumerate() {
            let r = m
                .settle(cut, &mut self.rng)
                .map_err(|e| format!("disk {i}: write log: {e}"))?;
            lost += r.lost + r.torn;
        }
        Ok(lost)
    }

    fn script(&self, sched: &mut XorShiftRng, fault: Fault, disk: usize, at: Duration) -> Script {
        let work = self.o.round_time;
        let clean = sched.next_u32().is_multiple_of(2);
        let pulse = Duration::from_millis(300 + u64::from(sched.next_u32() % 1200));
        let mut s = Script {
            verify: true,
            work,
            actions: Vec::new(),
            cut_after: None,
            clean,
            watch_copy: false,
            spare_copy: fault != Fault::PowerCut,
        };
        match fault {
            Fault::PowerCut => s.actions.push((at, Action::Cut)),
            Fault::WriteErrors | Fault::ReadErrors => {
                let e = if fault == Fault::WriteErrors {
                    Errors::Writes
                } else {
                    Errors::Reads
                };
                s.actions.push((at, Action::Fail(disk, e)));
                s.actions.push((at + pulse, Action::Heal(disk)));
            }
            Fault::DiskFails | Fault::ResyncCut => {
                s.actions.push((at, Action::Fail(disk, Errors::All)));
                if fault == Fault::ResyncCut {
                    s.clean = true;
                }
            }
            Fault::DiskHangs => {
                s.actions.push((at, Action::Hang(disk)));
                s.clean = false;
            }
            Fault::DiskGone => s.actions.push((at, Action::Vanish(disk))),
        }
        s
    }

    fn round(&mut self, n: u32) -> Result<Round, String> {
        // The schedule has a generator of its own per round, so it does
        // not depend on how much the workload drew before.
        let mut sched = XorShiftRng::seed_from_u64(
            self.o.seed ^ u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let fault = self.o.faults[sched.next_u32() as usize % self.o.faults.len()];
        let live: Vec<usize> = (0..self.media.len())
            .filter(|i| !self.o.dead_disks.contains(i))
            .collect();
        let disk = live[sched.next_u32() as usize % live.len()];
        let frac = 0.2 + f64::from(sched.next_u32() % 600) / 1000.0;
        let at = self.o.round_time.mul_f64(frac);
        let mut round = Round {
            n,
            fault: Some(fault),
            disk,
            at: at.as_secs_f64(),
            ..Round::default()
        };
        let s = self.script(&mut sched, fault, disk, at);
        self.run_boot(&mut round, &s)?;
        if fault == Fault::ResyncCut {
            // The failed disk comes back and resyncs; cut during it.
            let after = Duration::from_millis(300 + u64::from(sched.next_u32() % 2500));
            let again = Script {
                verify: true,
                work: self.o.round_time,
                actions: Vec::new(),
                cut_after: Some(after),
                clean: false,
                watch_copy: true,
                spare_copy: false,
            };
            let first = round.end.clone();
            self.run_boot(&mut round, &again)?;
            let copying = match round.copying.as_deref() {
                None => String::new(),
                Some([]) => " (nothing copying when it served)".into(),
                Some(c) => format!(" ({} when it served)", c.join(", ")),
            };
            round.end = format!(
                "{first}; resync cut after {:.1}s{copying}",
                after.as_secs_f64()
            );
        }
        Ok(round)
    }

    /// The final boot: verify, let resyncs and rebuilds finish, scrub
    /// the arrays that can, stop cleanly, compare mirror members.
    fn last(&mut self, report: &mut Report) -> Result<(), String> {
        let mut round = Round::default();
        let mut vm = self.boot()?;
        let client = match self.connect(&mut vm) {
            Ok(c) => c,
            Err(e) => {
                round.failures.push(e);
                round.end = "not served".into();
                vm.cut();
                report.rounds.push(round);
                return Ok(());
            }
        };
        let mut d = Conn {
            client: Some(client),
            pending: HashMap::new(),
        };
        if self.verify(&mut d, &mut round, 256 << 10, true, None) {
            self.verify(&mut d, &mut round, 188 << 10, false, None);
        }
        if let Some(c) = d.client.take() {
            c.disconnect();
        }
        let arrays = self.wait_resynced(&mut round);
        for a in arrays.iter().filter(|a| a.scrub().is_some()) {
            self.scrub(report, &mut round, a);
        }
        round.end = match vm.stop(Duration::from_secs(60)) {
            End::Clean => "clean stop".into(),
            End::Failed(w) => {
                round.failures.push(format!("the final stop failed: {w}"));
                w
            }
            other => {
                round.failures.push("the final stop did not finish".into());
                format!("{other:?}")
            }
        };
        round.failures.extend(vm.crash_lines());
        self.settle(Cut::Random)?;
        for a in arrays.iter().filter(|a| a.section == "mirrors") {
            let size = a.doc["media_size"].as_u64().unwrap_or(0);
            self.compare(report, &a.name, &(size, a.providers()));
        }
        report.rounds.push(round);
        Ok(())
    }

    /// `GET /status`, parsed; `None` if it failed.
    fn status(&self) -> Option<serde_json::Value> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        crate::http::request(addr, "GET", "/status", b"", &[], Duration::from_secs(5))
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| serde_json::from_slice(&r.body).ok())
    }

    /// Waits (up to 300 s) until no array in `/status` is copying;
    /// returns the arrays as they are then.
    fn wait_resynced(&mut self, round: &mut Round) -> Vec<Array> {
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            let Some(status) = self.status() else {
                round.failures.push("GET /status failed at the end".into());
                return Vec::new();
            };
            let found = arrays(&status);
            let busy: Vec<String> = found
                .iter()
                .filter_map(|a| {
                    a.copying()
                        .map(|c| format!("{} {} ({c})", a.class(), a.name))
                })
                .collect();
            if busy.is_empty() || Instant::now() > until {
                if !busy.is_empty() {
                    round
                        .failures
                        .push(format!("still copying after 300 s: {}", busy.join(", ")));
                }
                return found;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Scrubs array `a` (`CLASS scrub NAME` through `POST /geom`) and
    /// waits (up to 300 s) for the result in `/status`.
    fn scrub(&mut self, report: &mut Report, round: &mut Round, a: &Array) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        let token = crate::token::read(&self.o.dir.join("http.token")).ok();
        let (class, name, state) = (a.class(), a.name.as_str(), a.state());
        let line = format!("{class} scrub {name}\n");
        let asked = crate::mgmt::request(
            addr,
            "POST",
            "/geom",
            &line,
            token.as_deref(),
            Duration::from_secs(10),
        );
        match asked {
            Ok(r) if r.status == 200 => {}
            Ok(r) => {
                let why = crate::mgmt::geom_result(&r).err().unwrap_or_default();
                let why = format!("{class} scrub {name}: HTTP {}: {why}", r.status);
                if state == "complete" {
                    round.failures.push(why);
                } else {
                    // A degraded array has no redundancy left to check.
                    report
                        .scrubs_skipped
                        .push(format!("{why} (the array is {state})"));
                }
                return;
            }
            Err(e) => {
                round.failures.push(format!("{class} scrub {name}: {e}"));
                return;
            }
        }
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            let now = self.status().and_then(|st| {
                arrays(&st)
                    .into_iter()
                    .find(|b| b.section == a.section && b.name == name)
            });
            let Some(now) = now else {
                round.failures.push(format!(
                    "{class} {name} is gone from /status during its scrub"
                ));
                return;
            };
            let sc = now.scrub().cloned().unwrap_or_default();
            if sc["state"] == "done" {
                report.scrubs.push(Scrub {
                    class: class.to_string(),
                    name: name.to_string(),
                    state: state.to_string(),
                    rows_checked: sc["rows_checked"].as_u64().unwrap_or(0),
                    mismatches: sc["mismatches"].as_u64().unwrap_or(0),
                });
                return;
            }
            if Instant::now() > until {
                round.failures.push(format!(
                    "{class} {name}: the scrub did not finish in 300 s ({sc})"
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Compares the data of a mirror's members that are whole disks.
    fn compare(&self, report: &mut Report, name: &str, (size, members): &(u64, Vec<String>)) {
        let disk = |p: &str| -> Option<usize> { p.strip_prefix("vtbd")?.parse().ok() };
        let idx: Vec<Option<usize>> = members.iter().map(|m| disk(m)).collect();
        if idx.len() < 2 || idx.iter().any(|i| i.is_none_or(|i| i >= self.media.len())) {
            report.replicas_skipped.push(format!(
                "{name}: members {members:?} are not all whole disks"
            ));
            return;
        }
        let read = |i: usize| {
            std::fs::read(&self.media[i].base).map(|mut v| {
                v.truncate(*size as usize);
                v
            })
        };
        let Ok(first) = read(idx[0].unwrap_or(0)) else {
            return;
        };
        for (m, i) in members.iter().zip(&idx).skip(1) {
            let other = read(i.unwrap_or(0)).unwrap_or_default();
            let differ = first
                .chunks(4096)
                .zip(other.chunks(4096))
                .filter(|(a, b)| a != b)
                .count() as u64
                * 4096;
            report
                .replicas
                .push((name.to_string(), members[0].clone(), m.clone(), differ));
        }
    }
}

/// Runs the campaign; progress lines go to `log`.
pub fn run(o: &Options, log: &mut dyn io::Write) -> Result<Report, String> {
    if o.disks == 0 || o.faults.is_empty() {
        return Err("a campaign needs at least one disk and one fault kind".into());
    }
    if let Some(i) = o.dead_disks.iter().find(|&&i| i >= o.disks) {
        return Err(format!("dead disk {i}: there are {} disks", o.disks));
    }
    if (0..o.disks).all(|i| o.dead_disks.contains(&i)) {
        return Err("a campaign needs at least one disk that is not dead".into());
    }
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let mut media = Vec::new();
    for i in 0..o.disks {
        media.push(
            Media::create(o.dir.join(format!("vtbd{i}")), o.disk_size, o.lying_disks)
                .map_err(|e| format!("disk {i}: {e}"))?,
        );
    }
    let ports = (free_port(), free_port(), free_port());
    let (Ok(nbd_port), Ok(http_port), Ok(iscsi_port)) = ports else {
        return Err("no free TCP port on 127.0.0.1".into());
    };
    let mut c = Campaign {
        o,
        media,
        ledger: None,
        rng: XorShiftRng::seed_from_u64(o.seed),
        nbd_port,
        http_port,
        iscsi_port,
        boots: 0,
        log,
    };
    let mut report = Report::default();
    for n in 1..=o.rounds {
        let r = c.round(n)?;
        let _ = writeln!(c.log, "{}", line(&r));
        report.rounds.push(r);
    }
    c.last(&mut report)?;
    if let Some(r) = report.rounds.last() {
        let _ = writeln!(c.log, "{}", line(r));
    }
    for (name, a, b, differ) in &report.replicas {
        let _ = writeln!(c.log, "mirror {name}: {a} and {b} differ in {differ} bytes");
    }
    for s in &report.replicas_skipped {
        let _ = writeln!(c.log, "mirror {s}: not compared");
    }
    for s in &report.scrubs {
        let _ = writeln!(
            c.log,
            "{} {} ({}): scrub checked {} rows, parity mismatches {}",
            s.class, s.name, s.state, s.rows_checked, s.mismatches
        );
    }
    for s in &report.scrubs_skipped {
        let _ = writeln!(c.log, "not scrubbed: {s}");
    }
    Ok(report)
}

/// One report line for a round.
fn line(r: &Round) -> String {
    let what = match r.fault {
        Some(f) => format!(
            "round {:>3} {:<12} vtbd{} at {:>4.1}s",
            r.n,
            f.name(),
            r.disk,
            r.at
        ),
        None => "final     check".to_string(),
    };
    let mut s = format!(
        "{what}: {}; verified {} sectors, acked {} writes {} flushes, {} errors, {} live reads; lost {} garbage {}",
        r.end, r.sectors_checked, r.writes_acked, r.flushes_acked, r.errors, r.reads_checked, r.lost, r.garbage
    );
    for e in &r.examples {
        s.push_str(&format!("\n    {e}"));
    }
    for f in &r.failures {
        s.push_str(&format!("\n    FAILURE: {f}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The arrays are every class section's entries with a name and a
    /// list of members, whatever the section; copying and scrubbing are
    /// read from the entry's shape.
    #[test]
    fn arrays_are_found_by_their_shape() {
        let st = json!({
            "version": "x",
            "disks": [{"name": "vtbd0", "size_bytes": 1}],
            "waiting": [{"class": "stripe", "name": "st1", "members": 1, "of": 2}],
            "mirrors": [
                {"name": "gm0", "state": "complete", "media_size": 4096,
                 "members": [{"provider": "vtbd0"}, {"provider": "vtbd1"}],
                 "resync": null, "recovery": null},
                {"name": "gm1", "state": "degraded",
                 "members": [{"provider": "vtbd2"}],
                 "resync": {"synced_bytes": 1, "total_bytes": 2}, "recovery": null}
            ],
            "raid5": [
                {"name": "r0", "state": "rebuilding", "stripe_unit": 65536, "ppl": true,
                 "members": [{"index": 0, "provider": "vtbd3", "state": "active"},
                             {"index": 1, "provider": null, "state": "missing"},
                             {"index": 2, "provider": "vtbd5", "state": "rebuilding"}],
                 "rebuild": {"member": 2, "done_bytes": 1, "total_bytes": 9},
                 "scrub": {"state": "idle", "rows_checked": 0, "mismatches": 0}},
                {"name": "r1", "state": "complete", "members": [], "rebuild": null,
                 "scrub": {"state": "done", "rows_checked": 7, "mismatches": 0}}
            ]
        });
        let a = arrays(&st);
        let names: Vec<(&str, &str)> = a.iter().map(|a| (a.class(), a.name.as_str())).collect();
        assert_eq!(
            names,
            [
                ("mirror", "gm0"),
                ("mirror", "gm1"),
                ("raid5", "r0"),
                ("raid5", "r1")
            ]
        );
        let copying: Vec<Option<String>> = a.iter().map(Array::copying).collect();
        assert_eq!(
            copying,
            [
                None,
                Some("resync".into()),
                Some("rebuild of member 2".into()),
                None
            ]
        );
        assert_eq!(a[0].providers(), ["vtbd0", "vtbd1"]);
        assert_eq!(a[2].providers(), ["vtbd3", "vtbd5"]);
        assert!(a[0].scrub().is_none() && a[2].scrub().is_some());
        // A raid5's parity resync is a job.
        let st = json!({"raid5": [{"name": "r0", "state": "complete", "members": [],
                                  "rebuild": null, "job": {"kind": "resync"}}]});
        assert_eq!(arrays(&st)[0].copying().as_deref(), Some("resync"));
        // A rebuild that has not posted its progress yet still counts.
        let st = json!({"raid5": [{"name": "r0", "state": "rebuilding", "members": [],
                                  "rebuild": null}]});
        assert_eq!(arrays(&st)[0].copying().as_deref(), Some("rebuilding"));
    }

    #[test]
    fn parity_mismatches_fail_the_report() {
        let mut r = Report::default();
        r.rounds.push(Round::default());
        r.scrubs.push(Scrub {
            class: "raid5".into(),
            name: "r0".into(),
            state: "complete".into(),
            rows_checked: 10,
            mismatches: 0,
        });
        assert!(r.passed());
        assert!(r
            .to_string()
            .contains("other failures 0, parity mismatches 0\nPASS"));
        r.scrubs[0].mismatches = 3;
        assert!(!r.passed());
        assert!(r.to_string().contains("parity mismatches 3\nFAIL"), "{r}");
    }
}
