//! iSCSI through real clients: libiscsi's utilities (`iscsi-ls`,
//! `iscsi-inq`, `iscsi-readcapacity16`, `iscsi-test-cu`) and QEMU's
//! iscsi block driver (`qemu-img`, `qemu-io`, which use libiscsi), with
//! parsers for what they print; and the scenarios shared by the hosted,
//! QEMU and tgt tests ([`Peer`]).
//!
//! Every client runs under `timeout`, so a target that stops answering
//! fails a test instead of hanging it.

use crate::tgt::{Tgt, TgtLun};
use crate::{Appliance, Output, Platform, Start, TempDir};
use std::process::{Command, Stdio};

/// Seconds a single client call may take.
pub const CLIENT_SECS: u64 = 60;

/// Seconds the whole `iscsi-test-cu -t ALL` run may take (about 5 s
/// against tgt here; the appliance under TCG is slower).
pub const CONFORMANCE_SECS: u64 = 900;

/// The initiator name the clients present unless told otherwise
/// (`iscsi-test-cu`'s first initiator name).
pub const INITIATOR: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";

/// The second initiator name `iscsi-test-cu` uses (`-I`), in its
/// reservation tests, on a second session.
pub const INITIATOR_2: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2";

/// Runs `program args` under `timeout secs`; a missing program panics
/// with a pointer to `tests/strata.sh`.
pub fn run(secs: u64, program: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .args(["-k", "5", &secs.to_string(), program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e} (is it installed? see tests/strata.sh)"));
    let mut o = Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if out.status.code() == Some(124) {
        o.stderr
            .push_str(&format!("\n[{program} killed after {secs} s]"));
    }
    o
}

/// A user name and secret for CHAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chap {
    /// CHAP name.
    pub user: String,
    /// CHAP secret.
    pub secret: String,
}

impl Chap {
    /// A name and secret.
    pub fn new(user: &str, secret: &str) -> Chap {
        Chap {
            user: user.into(),
            secret: secret.into(),
        }
    }
}

/// Where a LUN is, and the credentials a client presents: a libiscsi
/// URL (`iscsi://[USER%SECRET@]127.0.0.1:PORT/IQN/LUN[?target_user=U&target_password=S]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lun {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Target name.
    pub iqn: String,
    /// Logical unit number.
    pub lun: u32,
    /// The initiator's CHAP name and secret.
    pub chap: Option<Chap>,
    /// The name and secret the target must prove (mutual CHAP).
    pub mutual: Option<Chap>,
}

impl Lun {
    /// A LUN, no credentials.
    pub fn new(port: u16, iqn: &str, lun: u32) -> Lun {
        Lun {
            port,
            iqn: iqn.into(),
            lun,
            chap: None,
            mutual: None,
        }
    }

    /// Parses a ready line's URI, `iscsi://127.0.0.1:PORT/IQN/LUN`.
    pub fn parse(uri: &str) -> Option<Lun> {
        let rest = uri.strip_prefix("iscsi://")?;
        let (hostport, path) = rest.split_once('/')?;
        let port = hostport.rsplit_once(':')?.1.parse().ok()?;
        let (iqn, lun) = path.rsplit_once('/')?;
        Some(Lun::new(port, iqn, lun.parse().ok()?))
    }

    /// The same LUN with the initiator's CHAP credentials.
    pub fn with_chap(&self, user: &str, secret: &str) -> Lun {
        Lun {
            chap: Some(Chap::new(user, secret)),
            ..self.clone()
        }
    }

    /// The same LUN also asking the target to prove `user`/`secret`.
    pub fn with_mutual(&self, user: &str, secret: &str) -> Lun {
        Lun {
            mutual: Some(Chap::new(user, secret)),
            ..self.clone()
        }
    }

    fn userinfo(&self) -> String {
        self.chap
            .as_ref()
            .map_or(String::new(), |c| format!("{}%{}@", c.user, c.secret))
    }

    /// The portal's URL (discovery: `iscsi-ls`).
    pub fn portal_url(&self) -> String {
        format!("iscsi://{}127.0.0.1:{}", self.userinfo(), self.port)
    }

    /// The LUN's URL. Mutual CHAP goes in URL arguments, which libiscsi's
    /// utilities read but QEMU's driver does not.
    pub fn url(&self) -> String {
        let mut u = format!(
            "iscsi://{}127.0.0.1:{}/{}/{}",
            self.userinfo(),
            self.port,
            self.iqn,
            self.lun
        );
        if let Some(m) = &self.mutual {
            u.push_str(&format!(
                "?target_user={}&target_password={}",
                m.user, m.secret
            ));
        }
        u
    }
}

// ---- iscsi-ls ----

/// A target as `iscsi-ls -s` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Target name.
    pub iqn: String,
    /// `ADDRESS:PORT,TPGT`.
    pub portal: String,
    /// Its logical units.
    pub luns: Vec<ListedLun>,
}

/// A logical unit as `iscsi-ls -s` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedLun {
    /// Logical unit number.
    pub lun: u32,
    /// Peripheral device type (`DIRECT_ACCESS`, ...).
    pub kind: String,
    /// Size as printed (`63M`), for disks.
    pub size: Option<String>,
}

/// Parses `iscsi-ls -s` output: `Target:IQN Portal:ADDR,TPGT` lines, each
/// followed by `Lun:N    Type:TYPE (Size:63M)` lines.
pub fn parse_ls(text: &str) -> Vec<Listed> {
    let mut out: Vec<Listed> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Target:") {
            let (iqn, portal) = rest.split_once(" Portal:").unwrap_or((rest, ""));
            out.push(Listed {
                iqn: iqn.trim().into(),
                portal: portal.trim().into(),
                luns: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("Lun:") {
            let Some(t) = out.last_mut() else { continue };
            let (n, ty) = rest.split_once("Type:").unwrap_or((rest, ""));
            let (kind, size) = match ty.split_once("(Size:") {
                Some((k, s)) => (k, Some(s.trim_end_matches(')').trim().to_string())),
                None => (ty, None),
            };
            if let Ok(lun) = n.trim().parse() {
                t.luns.push(ListedLun {
                    lun,
                    kind: kind.trim().into(),
                    size,
                });
            }
        }
    }
    out
}

/// `iscsi-ls -s PORTAL` (a discovery session, then a login to each target
/// for its LUNs) as `initiator`; the targets, or the client's output.
pub fn iscsi_ls(lun: &Lun, initiator: &str) -> Result<Vec<Listed>, String> {
    let o = run(
        CLIENT_SECS,
        "iscsi-ls",
        &["-i", initiator, "-s", &lun.portal_url()],
    );
    if !o.ok {
        return Err(format!("iscsi-ls failed: {}{}", o.stdout, o.stderr));
    }
    Ok(parse_ls(&o.stdout))
}

// ---- iscsi-inq, iscsi-readcapacity16 ----

/// `Key:Value` lines as the libiscsi utilities print them, in order.
#[derive(Clone, Debug, Default)]
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    /// Parses `Key:Value` lines (lines without a colon are left out).
    pub fn parse(text: &str) -> Fields {
        Fields(
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// `iscsi-inq URL`: the standard INQUIRY data.
pub fn inquiry(lun: &Lun, initiator: &str) -> Result<Fields, String> {
    let o = run(CLIENT_SECS, "iscsi-inq", &["-i", initiator, &lun.url()]);
    if !o.ok {
        return Err(format!("iscsi-inq failed: {}{}", o.stdout, o.stderr));
    }
    Ok(Fields::parse(&o.stdout))
}

/// `iscsi-inq -e 1 -c PAGE URL`: a VPD page. The page goes in decimal:
/// the tool reads it with `atoi`, so `-c 0x80` asks for page 0.
pub fn inquiry_vpd(lun: &Lun, initiator: &str, page: u8) -> Result<Fields, String> {
    let o = run(
        CLIENT_SECS,
        "iscsi-inq",
        &[
            "-i",
            initiator,
            "-e",
            "1",
            "-c",
            &page.to_string(),
            &lun.url(),
        ],
    );
    if !o.ok {
        return Err(format!(
            "iscsi-inq -e 1 -c {page:#04x} failed: {}{}",
            o.stdout, o.stderr
        ));
    }
    Ok(Fields::parse(&o.stdout))
}

/// The supported VPD pages (page 0), from `Page:0x80 UNIT_SERIAL_NUMBER` lines.
pub fn vpd_pages(page0: &Fields) -> Vec<u8> {
    page0
        .all("Page")
        .iter()
        .filter_map(|v| {
            let hex = v.split_whitespace().next()?.strip_prefix("0x")?;
            u8::from_str_radix(hex, 16).ok()
        })
        .collect()
}

/// What READ CAPACITY (16) returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// RETURNED LOGICAL BLOCK ADDRESS (the last block).
    pub last_lba: u64,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub block_len: u32,
    /// The tool's `Total size`.
    pub size: u64,
    /// LBPME (thin provisioning).
    pub lbpme: bool,
}

/// `iscsi-readcapacity16 URL`.
pub fn read_capacity16(lun: &Lun, initiator: &str) -> Result<Capacity, String> {
    let o = run(
        CLIENT_SECS,
        "iscsi-readcapacity16",
        &["-i", initiator, &lun.url()],
    );
    let err = || format!("iscsi-readcapacity16 failed: {}{}", o.stdout, o.stderr);
    if !o.ok {
        return Err(err());
    }
    let f = Fields::parse(&o.stdout);
    let num = |k: &str| f.get(k).and_then(|v| v.trim().parse::<u64>().ok());
    let lbpme = f.get("LBPME").is_some_and(|v| v.trim().starts_with('1'));
    match (
        num("RETURNED LOGICAL BLOCK ADDRESS"),
        num("LOGICAL BLOCK LENGTH IN BYTES"),
        num("Total size"),
    ) {
        (Some(last_lba), Some(block_len), Some(size)) => Ok(Capacity {
            last_lba,
            block_len: block_len as u32,
            size,
            lbpme,
        }),
        _ => Err(err()),
    }
}

/// Whether logging in to `lun` succeeds (an `iscsi-readcapacity16 -s`),
/// with the client's output when it does not.
pub fn login(lun: &Lun, initiator: &str) -> Result<u64, String> {
    let o = run(
        CLIENT_SECS,
        "iscsi-readcapacity16",
        &["-i", initiator, "-s", &lun.url()],
    );
    match o.stdout.trim().parse() {
        Ok(size) if o.ok => Ok(size),
        _ => Err(format!("{}{}", o.stdout, o.stderr)),
    }
}

// ---- QEMU's iscsi driver ----

/// `qemu-img convert -n -f raw -O raw FILE URL`: the file into the LUN.
pub fn qemu_img_into(file: &str, lun: &Lun) -> Output {
    run(
        300,
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", file, &lun.url()],
    )
}

/// `qemu-img convert -f raw -O raw URL FILE`: the LUN out into a file.
pub fn qemu_img_out(lun: &Lun, file: &str) -> Output {
    run(
        300,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &lun.url(), file],
    )
}

/// `qemu-img compare -f raw -F raw FILE URL` (exit 0: identical).
pub fn qemu_img_compare(file: &str, lun: &Lun) -> Output {
    run(
        300,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", file, &lun.url()],
    )
}

/// `qemu-io -f raw [-r] URL -c CMD...`, whatever happened.
pub fn qemu_io(lun: &Lun, read_only: bool, cmds: &[&str]) -> Output {
    let url = lun.url();
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    args.push(&url);
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run(CLIENT_SECS, "qemu-io", &args)
}

/// Whether a `qemu-io` run did all it was asked without an error or a
/// pattern mismatch.
pub fn qemu_io_ok(o: &Output) -> bool {
    o.ok && !o.stdout.contains("failed")
        && !o.stderr.contains("failed")
        && !o.stdout.contains("Pattern verification")
}

// ---- iscsi-test-cu ----

/// How one `iscsi-test-cu` test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed, and logged no `[SKIPPED]`.
    Passed,
    /// CUnit counted a pass, but the test logged `[SKIPPED]` (libiscsi's
    /// tests skip with `CU_PASS("[SKIPPED] ...")` or a `[SKIPPED]` log
    /// line and a `CU_PASS`).
    Skipped,
    /// Failed (one assertion or more).
    Failed,
}

/// One test of an `iscsi-test-cu` run.
#[derive(Clone, Debug)]
pub struct CuTest {
    /// `Suite.Test`.
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// What it printed, its failed assertions included.
    pub log: String,
}

/// CUnit's run summary (`Run Summary:` table), the tests row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CuSummary {
    /// Tests registered.
    pub total: usize,
    /// Tests run.
    pub ran: usize,
    /// Tests CUnit counts as passed (skips included).
    pub passed: usize,
    /// Tests failed.
    pub failed: usize,
    /// Suites whose set-up (a login) or clean-up failed.
    pub suites_failed: usize,
}

/// A parsed `iscsi-test-cu` run.
#[derive(Clone, Debug, Default)]
pub struct Conformance {
    /// Every test, in order.
    pub tests: Vec<CuTest>,
    /// The summary, if the run got that far.
    pub summary: Option<CuSummary>,
    /// Suites CUnit reported as failing to set up or clean up.
    pub suite_failures: Vec<String>,
    /// The command line.
    pub command: String,
    /// Everything it printed.
    pub output: String,
}

/// Parses `iscsi-test-cu` output in its default (verbose) mode.
///
/// CUnit prints `Suite: NAME`, then per test `  Test: NAME ...`, what the
/// test logs, and `passed` or `FAILED` (then `    1. file.c:N  - ASSERT`
/// lines) at the end of a line.
pub fn parse_cu(text: &str) -> (Vec<CuTest>, Option<CuSummary>, Vec<String>) {
    let mut tests = Vec::new();
    let mut suite = String::new();
    let mut summary: Option<CuSummary> = None;
    let mut suite_failures = Vec::new();
    // The test in progress: its name and log so far.
    let mut cur: Option<(String, String)> = None;
    let finish = |cur: &mut Option<(String, String)>, tests: &mut Vec<CuTest>, failed: bool| {
        if let Some((name, log)) = cur.take() {
            let skipped = log.contains("[SKIPPED]") || log.contains("[SKIPPING]");
            tests.push(CuTest {
                name,
                outcome: if failed {
                    Outcome::Failed
                } else if skipped {
                    Outcome::Skipped
                } else {
                    Outcome::Passed
                },
                log,
            });
        }
    };
    let mut in_failed = false;
    for line in text.lines() {
        let body = if let Some(rest) = line.strip_prefix("  Test: ") {
            finish(&mut cur, &mut tests, in_failed);
            in_failed = false;
            let (name, rest) = rest.split_once(" ...").unwrap_or((rest, ""));
            cur = Some((format!("{suite}.{}", name.trim()), String::new()));
            rest
        } else if let Some(name) = line.strip_prefix("Suite: ") {
            finish(&mut cur, &mut tests, in_failed);
            in_failed = false;
            suite = name.trim().to_string();
            continue;
        } else if line.starts_with("Run Summary:") {
            finish(&mut cur, &mut tests, in_failed);
            in_failed = false;
            summary = Some(CuSummary::default());
            continue;
        } else {
            line
        };
        if let Some(s) = summary.as_mut() {
            let w: Vec<&str> = body.split_whitespace().collect();
            let n = |i: usize| w.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            match w.first() {
                Some(&"tests") => {
                    s.total = n(1);
                    s.ran = n(2);
                    s.passed = n(3);
                    s.failed = n(4);
                }
                Some(&"suites") => s.suites_failed = n(4),
                _ => {}
            }
            continue;
        }
        if body.contains("Suite initialization failed") || body.contains("Suite cleanup failed") {
            suite_failures.push(body.trim().to_string());
        }
        if in_failed {
            // The failed assertions that follow FAILED.
            if let Some((_, log)) = cur.as_mut() {
                log.push_str(body);
                log.push('\n');
            }
            continue;
        }
        let Some((_, log)) = cur.as_mut() else {
            continue;
        };
        let t = body.trim_end();
        if let Some(before) = t.strip_suffix("passed") {
            log.push_str(before);
            finish(&mut cur, &mut tests, false);
        } else if let Some(before) = t.strip_suffix("FAILED") {
            log.push_str(before);
            log.push('\n');
            in_failed = true;
        } else {
            log.push_str(body);
            log.push('\n');
        }
    }
    finish(&mut cur, &mut tests, in_failed);
    (tests, summary, suite_failures)
}

impl Conformance {
    /// Names of the tests that ended `o`.
    pub fn named(&self, o: Outcome) -> Vec<&str> {
        self.tests
            .iter()
            .filter(|t| t.outcome == o)
            .map(|t| t.name.as_str())
            .collect()
    }

    /// (real passes, skips, failures).
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.named(Outcome::Passed).len(),
            self.named(Outcome::Skipped).len(),
            self.named(Outcome::Failed).len(),
        )
    }

    /// The test called `name` (`Suite.Test`).
    pub fn test(&self, name: &str) -> Option<&CuTest> {
        self.tests.iter().find(|t| t.name == name)
    }

    /// Whether the run reached CUnit's summary and ran every test.
    pub fn completed(&self) -> bool {
        self.summary
            .is_some_and(|s| s.total > 0 && s.ran == s.total && s.ran == self.tests.len())
    }

    /// A few lines for the test log: counts and the failing and skipped
    /// tests' names, the failures with what they printed.
    pub fn report(&self, who: &str) -> String {
        let (p, s, f) = self.counts();
        let mut r = format!(
            "{who}: {p} passed, {s} skipped, {f} failed of {} ({})\n  {}\n",
            self.tests.len(),
            if self.completed() {
                "run complete".to_string()
            } else {
                format!("run INCOMPLETE, summary {:?}", self.summary)
            },
            self.command
        );
        for sf in &self.suite_failures {
            r.push_str(&format!("  suite: {sf}\n"));
        }
        r.push_str(&format!(
            "  skipped: {}\n",
            self.named(Outcome::Skipped).join(" ")
        ));
        for t in self.tests.iter().filter(|t| t.outcome == Outcome::Failed) {
            r.push_str(&format!("  FAILED {}\n", t.name));
            for l in t.log.lines().filter(|l| !l.trim().is_empty()).take(6) {
                r.push_str(&format!("      {}\n", l.trim()));
            }
        }
        r
    }
}

/// Runs `iscsi-test-cu -i INITIATOR -I INITIATOR_2 -d -S -t TESTS URL`
/// (`-d` allows the tests that write, `-S` the SANITIZE ones) within
/// `secs` seconds, and parses what it printed.
pub fn iscsi_test_cu(lun: &Lun, tests: &str, secs: u64) -> Conformance {
    let url = lun.url();
    let args = [
        "-i",
        INITIATOR,
        "-I",
        INITIATOR_2,
        "-d",
        "-S",
        "-t",
        tests,
        url.as_str(),
        // A second path to the same LUN (its own session), for the
        // MultipathIO suite.
        url.as_str(),
    ];
    let o = run(secs, "iscsi-test-cu", &args);
    let output = format!("{}{}", o.stdout, o.stderr);
    let (tests, summary, suite_failures) = parse_cu(&o.stdout);
    Conformance {
        tests,
        summary,
        suite_failures,
        command: format!("iscsi-test-cu {}", args.join(" ")),
        output,
    }
}

// ---- targets for the scenarios: Strata or tgt ----

/// A target the scenarios run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Strata on a platform.
    Strata(Platform),
    /// tgt (`tgtd`), the reference the harness is checked against.
    Tgt,
}

/// One LUN a scenario asks for.
#[derive(Clone, Debug)]
pub struct Want {
    /// Target name.
    pub iqn: String,
    /// Size in MiB.
    pub mb: u64,
    /// Read-only.
    pub ro: bool,
    /// CHAP the initiator must pass.
    pub chap: Option<Chap>,
    /// CHAP the target proves when asked (mutual).
    pub mutual: Option<Chap>,
    /// Initiators allowed in (empty: any).
    pub initiators: Vec<String>,
}

impl Want {
    /// A writable LUN of `mb` MiB, open to anyone.
    pub fn new(iqn: &str, mb: u64) -> Want {
        Want {
            iqn: iqn.into(),
            mb,
            ro: false,
            chap: None,
            mutual: None,
            initiators: Vec::new(),
        }
    }

    /// Read-only.
    pub fn ro(mut self) -> Want {
        self.ro = true;
        self
    }

    /// Requires CHAP.
    pub fn chap(mut self, user: &str, secret: &str) -> Want {
        self.chap = Some(Chap::new(user, secret));
        self
    }

    /// Proves itself with mutual CHAP.
    pub fn mutual(mut self, user: &str, secret: &str) -> Want {
        self.mutual = Some(Chap::new(user, secret));
        self
    }

    /// Admits only `iqn` (and others added).
    pub fn initiator(mut self, iqn: &str) -> Want {
        self.initiators.push(iqn.into());
        self
    }
}

/// A running target and its LUNs, in the order asked for.
pub struct Served {
    /// The LUNs (no credentials filled in).
    pub luns: Vec<Lun>,
    /// Strata, when the peer is Strata (for NBD on the same provider).
    pub strata: Option<Appliance>,
    /// tgt, when the peer is tgt.
    pub tgt: Option<Tgt>,
    /// Scratch files (tgt's backing files).
    pub dir: TempDir,
}

/// The config lines serving `wants` from memory disks `md0`, `md1`, ...
/// (`extra` appended), as Strata reads them.
pub fn strata_config(wants: &[Want], extra: &str) -> String {
    let mut c = String::new();
    for (i, w) in wants.iter().enumerate() {
        c.push_str(&format!("md create -s {}m md{i}\n", w.mb));
        c.push_str(&format!("export iscsi {} md{i}", w.iqn));
        if w.ro {
            c.push_str(" ro");
        }
        if let Some(ch) = &w.chap {
            c.push_str(&format!(" chap {} {}", ch.user, ch.secret));
        }
        if let Some(m) = &w.mutual {
            c.push_str(&format!(" mutual {} {}", m.user, m.secret));
        }
        if !w.initiators.is_empty() {
            c.push_str(" initiator ");
            c.push_str(&w.initiators.join(" "));
        }
        c.push('\n');
    }
    c.push_str(extra);
    c
}

/// Starts Strata on `platform` with `config` and `--iscsi-port`; returns
/// it and the LUNs of its `ready iscsi://...` lines.
pub fn start_strata(platform: Platform, config: &str) -> Result<(Appliance, Vec<Lun>), String> {
    let mut s = Start::new(platform).config(config);
    s.extra = vec!["--iscsi-port".into(), crate::free_port().to_string()];
    let a = s.spawn()?;
    let luns = a.ready.iter().filter_map(|u| Lun::parse(u)).collect();
    Ok((a, luns))
}

/// Serves `wants` on `peer` (`extra`: more Strata config lines).
pub fn serve(peer: Peer, wants: &[Want], extra: &str) -> Served {
    let dir = TempDir::new("iscsi");
    match peer {
        Peer::Strata(p) => {
            let config = strata_config(wants, extra);
            let (a, ready) = start_strata(p, &config)
                .unwrap_or_else(|e| panic!("start Strata ({p:?}) with\n{config}: {e}"));
            let luns = wants
                .iter()
                .map(|w| {
                    ready
                        .iter()
                        .find(|l| l.iqn == w.iqn)
                        .cloned()
                        .unwrap_or_else(|| {
                            panic!(
                                "no `ready iscsi://.../{}/LUN` line; ready lines: {:?}",
                                w.iqn, a.ready
                            )
                        })
                })
                .collect();
            Served {
                luns,
                strata: Some(a),
                tgt: None,
                dir,
            }
        }
        Peer::Tgt => {
            let mut t = Tgt::start().unwrap_or_else(|e| panic!("start tgtd: {e}"));
            let luns = wants
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let file = dir.path(&format!("lun{i}.img"));
                    let f = std::fs::File::create(&file).unwrap();
                    f.set_len(w.mb << 20).unwrap();
                    t.add(&TgtLun {
                        iqn: w.iqn.clone(),
                        file,
                        ro: w.ro,
                        chap: w.chap.clone(),
                        mutual: w.mutual.clone(),
                        initiators: w.initiators.clone(),
                    })
                    .unwrap_or_else(|e| panic!("tgtadm: {e}"))
                })
                .collect();
            Served {
                luns,
                strata: None,
                tgt: Some(t),
                dir,
            }
        }
    }
}

/// Writes `mb` MiB of random bytes to `path`.
pub fn random_file(path: &std::path::Path, mb: u64) {
    let st = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", path.display()),
            "bs=1M",
            &format!("count={mb}"),
            "status=none",
        ])
        .status()
        .expect("run dd");
    assert!(st.success(), "dd of random data failed");
}

// ---- scenarios ----

const IQN_A: &str = "iqn.2024-01.org.strata.test:disk-a";
const IQN_B: &str = "iqn.2024-01.org.strata.test:disk-b";

/// Discovery (`iscsi-ls -s`) lists every configured target on the portal
/// asked, with a DIRECT_ACCESS LUN of the configured size at the LUN
/// number the target announced.
pub fn discovery(peer: Peer) {
    let s = serve(peer, &[Want::new(IQN_A, 16), Want::new(IQN_B, 32)], "");
    let listed = iscsi_ls(&s.luns[0], INITIATOR).unwrap();
    for (lun, mb) in s.luns.iter().zip([16, 32]) {
        let t = listed
            .iter()
            .find(|t| t.iqn == lun.iqn)
            .unwrap_or_else(|| panic!("{} not discovered: {listed:?}", lun.iqn));
        assert!(
            t.portal.starts_with(&format!("127.0.0.1:{},", lun.port)),
            "portal of {}: {:?}",
            lun.iqn,
            t.portal
        );
        let l = t
            .luns
            .iter()
            .find(|l| l.lun == lun.lun)
            .unwrap_or_else(|| panic!("LUN {} of {} not listed: {t:?}", lun.lun, lun.iqn));
        assert_eq!(l.kind, "DIRECT_ACCESS", "{t:?}");
        // iscsi-ls prints whole MiB, rounding the last block down.
        let size = l.size.as_deref().unwrap_or("");
        assert!(
            size == format!("{mb}M") || size == format!("{}M", mb - 1),
            "size of {}: {size:?} for {mb} MiB",
            lun.iqn
        );
    }
    assert_eq!(listed.len(), 2, "only the two targets: {listed:?}");
}

/// Standard INQUIRY and the mandatory VPD pages (0x00, 0x80, 0x83) through
/// `iscsi-inq`; the two LUNs' serial numbers differ.
pub fn inquiry_pages(peer: Peer) {
    let s = serve(peer, &[Want::new(IQN_A, 16), Want::new(IQN_B, 16)], "");
    let mut serials = Vec::new();
    for lun in &s.luns {
        let std = inquiry(lun, INITIATOR).unwrap();
        assert_eq!(
            std.get("Peripheral Qualifier"),
            Some("CONNECTED"),
            "{std:?}"
        );
        assert_eq!(
            std.get("Peripheral Device Type"),
            Some("DIRECT_ACCESS"),
            "{std:?}"
        );
        assert_eq!(std.get("Removable"), Some("0"), "{std:?}");
        let version: u32 = std
            .get("Version")
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        assert!(version >= 5, "SPC-3 or later: {std:?}");
        assert_eq!(std.get("ReponseDataFormat"), Some("2"), "{std:?}");
        assert!(
            std.get("Vendor").is_some_and(|v| !v.trim().is_empty()),
            "{std:?}"
        );
        assert!(
            std.get("Product").is_some_and(|v| !v.trim().is_empty()),
            "{std:?}"
        );
        let pages = vpd_pages(&inquiry_vpd(lun, INITIATOR, 0).unwrap());
        for p in [0x00, 0x80, 0x83] {
            assert!(pages.contains(&p), "VPD page {p:#04x} not in {pages:x?}");
        }
        let sn = inquiry_vpd(lun, INITIATOR, 0x80).unwrap();
        let serial = sn
            .get("Unit Serial Number")
            .map(|v| v.trim().trim_matches(['[', ']']).trim().to_string())
            .unwrap_or_default();
        assert!(!serial.is_empty(), "serial number: {sn:?}");
        serials.push(serial);
        let id = inquiry_vpd(lun, INITIATOR, 0x83).unwrap();
        assert_eq!(
            id.get("Page Code").map(str::trim),
            Some("(0x83) DEVICE_IDENTIFICATION"),
            "{id:?}"
        );
        assert!(
            !id.all("Designator Type").is_empty(),
            "no designator: {id:?}"
        );
        if pages.contains(&0xb0) {
            inquiry_vpd(lun, INITIATOR, 0xb0).unwrap();
        }
    }
    assert_ne!(serials[0], serials[1], "two LUNs, one serial number");
}

/// READ CAPACITY (16) through `iscsi-readcapacity16` gives the configured
/// size: (last LBA + 1) × block length.
pub fn read_capacity(peer: Peer) {
    let s = serve(peer, &[Want::new(IQN_A, 48)], "");
    let c = read_capacity16(&s.luns[0], INITIATOR).unwrap();
    assert_eq!(c.size, 48 << 20, "{c:?}");
    assert_eq!((c.last_lba + 1) * u64::from(c.block_len), 48 << 20, "{c:?}");
    assert!([512, 4096].contains(&c.block_len), "block length: {c:?}");
}

/// Random data in with `qemu-img convert`, out again the same way, and
/// `qemu-img compare` of the file with the LUN: equal, byte for byte.
pub fn qemu_img_roundtrip(peer: Peer) {
    let s = serve(peer, &[Want::new(IQN_A, 24)], "");
    let lun = &s.luns[0];
    let src = s.dir.path("src.bin");
    random_file(&src, 24);
    let src = src.display().to_string();
    let o = qemu_img_into(&src, lun);
    assert!(o.ok, "qemu-img convert into {}: {}", lun.url(), o.stderr);
    let back = s.dir.path("back.bin").display().to_string();
    let o = qemu_img_out(lun, &back);
    assert!(o.ok, "qemu-img convert out of {}: {}", lun.url(), o.stderr);
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&back).unwrap());
    assert_eq!(a.len(), b.len(), "size read back");
    assert!(a == b, "data read back differs from what was written");
    let o = qemu_img_compare(&src, lun);
    assert!(o.ok, "qemu-img compare: {}{}", o.stdout, o.stderr);
    // A write at an odd offset and length, read back through a new session.
    let o = qemu_io(lun, false, &["write -P 0xa5 1536 70656"]);
    assert!(qemu_io_ok(&o), "qemu-io write: {}{}", o.stdout, o.stderr);
    let o = qemu_io(lun, true, &["read -P 0xa5 1536 70656", "read -v 1024 512"]);
    assert!(
        qemu_io_ok(&o),
        "qemu-io read back: {}{}",
        o.stdout,
        o.stderr
    );
}

/// A read-only LUN: it reads, but QEMU refuses to open it for writing
/// (it saw the write-protect bit), libiscsi's ReadOnly suite sends every
/// write command and finds them refused, and the data is unchanged.
/// Strata must fail none of that suite; tgt is let off (it answers
/// WRITE SAME with the wrong sense).
pub fn read_only(peer: Peer) {
    let s = serve(peer, &[Want::new(IQN_A, 16).ro()], "");
    let lun = &s.luns[0];
    let o = qemu_io(lun, true, &["read -P 0 0 64k"]);
    assert!(
        qemu_io_ok(&o),
        "read of the read-only LUN: {}{}",
        o.stdout,
        o.stderr
    );
    let o = qemu_io(lun, false, &["write -P 0x5a 0 4k"]);
    assert!(!o.ok, "a write to a read-only LUN succeeded: {}", o.stdout);
    assert!(
        o.stderr.contains("write protected") || o.stdout.contains("write failed"),
        "the write must fail as a write, not at login: {}{}",
        o.stdout,
        o.stderr
    );
    let c = iscsi_test_cu(lun, "ALL.ReadOnly", CLIENT_SECS * 2);
    eprintln!("{}", c.report("ReadOnly suite"));
    assert!(c.completed(), "ReadOnly suite did not run: {}", c.output);
    assert!(
        !c.output.contains("not write-protected"),
        "the suite did not see the LUN as write-protected: {}",
        c.output
    );
    assert!(
        c.test("ReadOnly.ReadOnlySBC").is_some(),
        "no ReadOnly.ReadOnlySBC test: {}",
        c.output
    );
    if matches!(peer, Peer::Strata(_)) {
        assert_eq!(c.counts().2, 0, "{}", c.report("ReadOnly suite"));
    }
    let o = qemu_io(lun, true, &["read -P 0 0 16M"]);
    assert!(
        qemu_io_ok(&o),
        "the read-only LUN changed: {}{}",
        o.stdout,
        o.stderr
    );
}

/// CHAP: the right name and secret log in (libiscsi and QEMU); a wrong
/// secret, a wrong name and no credentials at all are refused at login.
pub fn chap(peer: Peer) {
    let s = serve(
        peer,
        &[Want::new(IQN_A, 16).chap("alice", "alicesecret1")],
        "",
    );
    let lun = &s.luns[0];
    let right = lun.with_chap("alice", "alicesecret1");
    assert_eq!(login(&right, INITIATOR), Ok(16 << 20));
    let o = qemu_io(&right, false, &["write -P 0x11 0 4k", "read -P 0x11 0 4k"]);
    assert!(
        qemu_io_ok(&o),
        "qemu-io with CHAP: {}{}",
        o.stdout,
        o.stderr
    );
    for (what, bad) in [
        ("a wrong secret", lun.with_chap("alice", "wrongsecret1")),
        ("a wrong name", lun.with_chap("mallory", "alicesecret1")),
        ("no credentials", lun.clone()),
    ] {
        let e = login(&bad, INITIATOR).expect_err(&format!("login with {what} succeeded"));
        assert!(
            e.contains("Login Failed") || e.contains("Failed to log in"),
            "login with {what}: {e}"
        );
        let o = qemu_io(&bad, true, &["read 0 4k"]);
        assert!(!o.ok, "qemu-io with {what} read: {}", o.stdout);
    }
}

/// Mutual CHAP: the target proves the secret the initiator expects;
/// expecting another secret, the initiator ends the login.
pub fn mutual_chap(peer: Peer) {
    let s = serve(
        peer,
        &[Want::new(IQN_A, 16)
            .chap("alice", "alicesecret1")
            .mutual("target-a", "targetsecret1")],
        "",
    );
    let lun = s.luns[0].with_chap("alice", "alicesecret1");
    assert_eq!(
        login(&lun.with_mutual("target-a", "targetsecret1"), INITIATOR),
        Ok(16 << 20)
    );
    let e = login(&lun.with_mutual("target-a", "othersecret12"), INITIATOR)
        .expect_err("the initiator accepted a target proving another secret");
    assert!(e.contains("CHAP_R") || e.contains("Login Failed"), "{e}");
    let e = login(
        &s.luns[0]
            .with_chap("alice", "wrongsecret1")
            .with_mutual("target-a", "targetsecret1"),
        INITIATOR,
    )
    .expect_err("a wrong initiator secret logged in with mutual CHAP");
    assert!(e.contains("Login Failed"), "{e}");
}

/// An initiator list: the listed initiator logs in, another is refused.
pub fn initiator_list(peer: Peer) {
    let allowed = "iqn.2024-01.org.strata.test:allowed";
    let s = serve(peer, &[Want::new(IQN_A, 16).initiator(allowed)], "");
    let lun = &s.luns[0];
    assert_eq!(login(lun, allowed), Ok(16 << 20));
    let e = login(lun, "iqn.2024-01.org.strata.test:other")
        .expect_err("an initiator not in the list logged in");
    assert!(e.contains("Login Failed"), "{e}");
}

/// NBD and iSCSI on one provider: random data in through iSCSI reads back
/// through NBD; a pattern written and flushed through NBD reads back
/// through iSCSI; a flush through iSCSI covers what NBD then reads.
pub fn nbd_and_iscsi(platform: Platform) {
    let s = serve(
        Peer::Strata(platform),
        &[Want::new(IQN_A, 16)],
        "export nbd vol md0\n",
    );
    let a = s.strata.as_ref().unwrap();
    let lun = &s.luns[0];
    let nbd = a.uri("vol");
    let src = s.dir.path("src.bin");
    random_file(&src, 16);
    let src = src.display().to_string();
    let o = qemu_img_into(&src, lun);
    assert!(o.ok, "qemu-img convert into iSCSI: {}", o.stderr);
    let o = run(
        CLIENT_SECS,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &src, &nbd],
    );
    assert!(o.ok, "NBD reads what iSCSI wrote: {}{}", o.stdout, o.stderr);
    crate::qemu_io(&nbd, &["write -P 0x77 1M 256k", "flush"]);
    let o = qemu_io(lun, true, &["read -P 0x77 1M 256k"]);
    assert!(
        qemu_io_ok(&o),
        "iSCSI reads what NBD wrote: {}{}",
        o.stdout,
        o.stderr
    );
    let o = qemu_io(lun, false, &["write -P 0x3c 4M 1M", "flush"]);
    assert!(
        qemu_io_ok(&o),
        "iSCSI write and flush: {}{}",
        o.stdout,
        o.stderr
    );
    crate::qemu_io(&nbd, &["read -P 0x3c 4M 1M", "read -P 0x77 1M 256k"]);
}

/// Runs libiscsi's whole suite against `lun` and returns it (printed).
pub fn conformance_run(who: &str, lun: &Lun) -> Conformance {
    let c = iscsi_test_cu(lun, "ALL", CONFORMANCE_SECS);
    eprintln!("{}", c.report(who));
    c
}

/// The conformance run against Strata on `platform` and against tgt on
/// the same size of LUN, one after the other; both counts printed, and
/// Strata must fail none (tgt's figures are for comparison only, but its
/// run must complete: that checks the harness).
pub fn conformance(platform: Platform) {
    let t = serve(Peer::Tgt, &[Want::new(IQN_A, 64)], "");
    let tgt = conformance_run("tgt", &t.luns[0]);
    drop(t);
    let s = serve(Peer::Strata(platform), &[Want::new(IQN_A, 64)], "");
    let strata = conformance_run(&format!("strata {platform:?}"), &s.luns[0]);
    let (tp, ts, tf) = tgt.counts();
    let (sp, ss, sf) = strata.counts();
    eprintln!("conformance: tgt {tp}/{ts}/{tf}, strata {platform:?} {sp}/{ss}/{sf} (passed/skipped/failed)");
    assert!(
        tgt.completed(),
        "tgt's run did not complete: {}",
        tgt.output
    );
    assert!(
        strata.completed(),
        "Strata's run did not complete:\n{}",
        strata.output
    );
    assert!(
        strata.suite_failures.is_empty(),
        "{}",
        strata.report("strata")
    );
    assert_eq!(sf, 0, "{}", strata.report("strata"));
    assert!(sp > 0, "nothing really passed: {}", strata.report("strata"));
}

/// `iscsi-pr` (tests/c/iscsi-pr.c), built once with gcc against libiscsi
/// (libiscsi-bin has no persistent-reservation tool).
pub fn pr_tool() -> std::path::PathBuf {
    static TOOL: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    TOOL.get_or_init(|| {
        let src = crate::root().join("tests/c/iscsi-pr.c");
        let dir = std::env::temp_dir().join(format!("strata-iscsi-pr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("iscsi-pr");
        let r = Command::new("gcc")
            .args(["-Wall", "-Werror", "-O1", "-o"])
            .arg(&out)
            .arg(&src)
            .arg("-liscsi")
            .output()
            .expect("run gcc (Debian: gcc)");
        assert!(
            r.status.success(),
            "gcc {}: {} (libiscsi's headers come with Debian's libiscsi-dev)",
            src.display(),
            String::from_utf8_lossy(&r.stderr)
        );
        out
    })
    .clone()
}

/// Runs `iscsi-pr URL ARGS...`: its output lines, or `Err` with the
/// refusal (`status S sense K/ASCQ`) when the target refused.
pub fn pr(url: &str, args: &[&str]) -> Result<Vec<String>, String> {
    let r = Command::new(pr_tool())
        .arg(url)
        .args(args)
        .output()
        .expect("run iscsi-pr");
    let out = String::from_utf8_lossy(&r.stdout).trim().to_string();
    match r.status.code() {
        Some(0) => Ok(out.lines().map(String::from).collect()),
        Some(2) => Err(out),
        _ => panic!(
            "iscsi-pr {url} {args:?}: {}{}",
            out,
            String::from_utf8_lossy(&r.stderr)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CU: &str = "\nSuite: CompareAndWrite\n  Test: Simple ...    [SKIPPED] COMPAREANDWRITE is not implemented.\n    [SKIPPED] COMPAREANDWRITE is not implemented.\npassed\n  Test: DpoFua ...passed\nSuite: GetLBAStatus\n  Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful\nFAILED\n    1. test_get_lba_status_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)\n  Test: Simple ...passed\n\nRun Summary:    Type  Total    Ran Passed Failed Inactive\n              suites      2      2    n/a      0        0\n               tests      4      4      3      1        0\n             asserts     40     40     39      1      n/a\n";

    #[test]
    fn cu_output_parses_into_passes_skips_and_failures() {
        let (tests, summary, suites) = parse_cu(CU);
        let names: Vec<(&str, Outcome)> =
            tests.iter().map(|t| (t.name.as_str(), t.outcome)).collect();
        assert_eq!(
            names,
            [
                ("CompareAndWrite.Simple", Outcome::Skipped),
                ("CompareAndWrite.DpoFua", Outcome::Passed),
                ("GetLBAStatus.BeyondEol", Outcome::Failed),
                ("GetLBAStatus.Simple", Outcome::Passed),
            ]
        );
        assert!(tests[2].log.contains("beyond_eol.c:38"), "{:?}", tests[2]);
        let s = summary.unwrap();
        assert_eq!(
            (s.total, s.ran, s.passed, s.failed, s.suites_failed),
            (4, 4, 3, 1, 0)
        );
        assert!(suites.is_empty());
    }

    #[test]
    fn ls_output_parses() {
        let t = parse_ls("Target:iqn.x:a Portal:127.0.0.1:3260,1\nLun:0    Type:STORAGE_ARRAY_CONTROLLER\nLun:1    Type:DIRECT_ACCESS (Size:63M)\n");
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].iqn, "iqn.x:a");
        assert_eq!(t[0].portal, "127.0.0.1:3260,1");
        assert_eq!(t[0].luns[1].kind, "DIRECT_ACCESS");
        assert_eq!(t[0].luns[1].size.as_deref(), Some("63M"));
        assert_eq!(t[0].luns[0].size, None);
    }

    #[test]
    fn urls_carry_credentials() {
        let l = Lun::parse("iscsi://127.0.0.1:3260/iqn.x:a/0").unwrap();
        assert_eq!(l, Lun::new(3260, "iqn.x:a", 0));
        assert_eq!(
            l.with_chap("u", "s").with_mutual("t", "p").url(),
            "iscsi://u%s@127.0.0.1:3260/iqn.x:a/0?target_user=t&target_password=p"
        );
        assert_eq!(l.portal_url(), "iscsi://127.0.0.1:3260");
    }
}
