//! `strata fault`: a fault campaign. It boots the appliance in QEMU over
//! disks that can lose power, fail, hang and vanish, drives a verifying
//! workload through NBD, injects faults on a seeded schedule, restarts,
//! checks every sector against what was acknowledged, and reports.
//!
//! ```text
//!  round:  boot ─▶ verify every sector (two passes) ─▶ workload ─▶ end
//!                                                        │ fault at t   │ cut or clean stop
//!                                                        ▼              ▼
//!                                       media: errors / hang / vanish   replay each disk's
//!                                                                       write log as a power
//!                                                                       cut leaves it
//!  last:   boot ─▶ verify ─▶ wait for resyncs ─▶ clean stop ─▶ compare mirror members
//! ```
//!
//! - [`media`]: a disk with a volatile cache and failure controls;
//! - [`logwrites`]: the write log and its replay after a cut;
//! - [`ledger`]: what each sector may hold, from what was acknowledged;
//! - [`client`]: the pipelined NBD client of the workload;
//! - [`vm`]: one boot of the appliance.
//!
//! The same seed replays the same schedule: which fault, on which disk,
//! when, and what a cut keeps. The appliance's own timing still varies
//! from run to run, so the writes in flight at a cut do too.

pub mod client;
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

/// What the campaign runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The kernel to boot.
    pub kernel: PathBuf,
    /// The configuration (the appliance's built-in one when `None`).
    pub config: Option<String>,
    /// The export the workload uses.
    pub export: String,
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
    /// Requests that failed, by NBD error.
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
    /// True when nothing was lost, mixed or broken.
    pub fn passed(&self) -> bool {
        self.lost() == 0 && self.garbage() == 0 && self.disagreeing() == 0 && self.failures() == 0
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
            "lost {}, garbage {}, replicas disagreeing {}, other failures {}",
            self.lost(),
            self.garbage(),
            self.disagreeing(),
            self.failures()
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
}

struct Campaign<'a> {
    o: &'a Options,
    media: Vec<Media>,
    ledger: Option<Ledger>,
    rng: XorShiftRng,
    nbd_port: u16,
    http_port: u16,
    boots: u32,
    log: &'a mut dyn io::Write,
}

/// The workload's connection and what is in flight on it.
struct Conn {
    client: Option<Client>,
    pending: HashMap<u64, Pending>,
}

impl Campaign<'_> {
    fn boot(&mut self) -> Result<Vm, String> {
        for (i, m) in self.media.iter_mut().enumerate() {
            m.start().map_err(|e| format!("disk {i}: {e}"))?;
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
            qmp_socket: None,
            token_file: Some(token_file),
        };
        let console = self.o.dir.join(format!("console-{:03}.log", self.boots));
        Vm::boot(&cfg, console).map_err(|e| format!("cannot start QEMU: {e}"))
    }

    fn connect(&mut self, vm: &mut Vm) -> Result<Client, String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.nbd_port));
        let until = Instant::now() + self.o.ready_timeout;
        let mut last = String::new();
        while Instant::now() < until {
            if let Some(st) = vm.exited() {
                return Err(format!("the appliance exited during boot ({st})"));
            }
            match Client::connect(addr, &self.o.export, Duration::from_secs(5)) {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "export {} not served within {:?}: {last}",
            self.o.export, self.o.ready_timeout
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
                        "reading offset {offset} after the restart failed (NBD error {})",
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
        let flags = d.client.as_ref().map_or(0, |c| c.flags);
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
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.nbd_port));
                d.client = Client::connect(addr, &self.o.export, Duration::from_secs(2)).ok();
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
        if client.flags & TFLAG_READ_ONLY != 0 {
            return Err(format!("export {} is read-only", self.o.export));
        }
        if self.ledger.is_none() {
            self.ledger = Some(Ledger::new(
                client.size / ledger::SECTOR * ledger::SECTOR,
                self.rng.next_u64(),
            ));
        } else if self.ledger().size() != client.size {
            return Err(format!("export size changed to {}", client.size));
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
        let disk = sched.next_u32() as usize % self.media.len();
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
            };
            let first = round.end.clone();
            self.run_boot(&mut round, &again)?;
            round.end = format!("{first}; resync cut after {:.1}s", after.as_secs_f64());
        }
        Ok(round)
    }

    /// The final boot: verify, let resyncs finish, stop cleanly, compare
    /// mirror members.
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
        let mirrors = self.wait_resynced(&mut round);
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
        for (name, members) in mirrors {
            self.compare(report, &name, &members);
        }
        report.rounds.push(round);
        Ok(())
    }

    /// Waits until no mirror resyncs; returns each mirror's members and
    /// size.
    fn wait_resynced(&mut self, round: &mut Round) -> Vec<(String, (u64, Vec<String>))> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            let status =
                crate::http::request(addr, "GET", "/status", b"", &[], Duration::from_secs(5))
                    .ok()
                    .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok());
            let Some(status) = status else {
                round.failures.push("GET /status failed at the end".into());
                return Vec::new();
            };
            let mirrors = status["mirrors"].as_array().cloned().unwrap_or_default();
            let busy = mirrors
                .iter()
                .any(|m| !m["resync"].is_null() || !m["recovery"].is_null());
            if !busy || Instant::now() > until {
                if busy {
                    round
                        .failures
                        .push("a mirror was still resyncing after 300 s".into());
                }
                return mirrors
                    .iter()
                    .map(|m| {
                        let members = m["members"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|x| x["provider"].as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default();
                        (
                            m["name"].as_str().unwrap_or("?").to_string(),
                            (m["media_size"].as_u64().unwrap_or(0), members),
                        )
                    })
                    .collect();
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
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let mut media = Vec::new();
    for i in 0..o.disks {
        media.push(
            Media::create(o.dir.join(format!("vtbd{i}")), o.disk_size, o.lying_disks)
                .map_err(|e| format!("disk {i}: {e}"))?,
        );
    }
    let ports = (free_port(), free_port());
    let (Ok(nbd_port), Ok(http_port)) = ports else {
        return Err("no free TCP port on 127.0.0.1".into());
    };
    let mut c = Campaign {
        o,
        media,
        ledger: None,
        rng: XorShiftRng::seed_from_u64(o.seed),
        nbd_port,
        http_port,
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
