//! The configuration language: geom(8)-style lines that build the stack
//! and name what is exported.
//!
//! ```text
//! # comment
//! md create -s 256m md0            # a 256 MiB memory disk, provider md0
//! nop create [-r PCT] [-w PCT] [-e ERR] [-c COUNT] [-d MS] [-q PCT] [-x PCT]
//!            [-o LBA] [-l LBAS] [-z PCT] [--seed N] PROVIDER   # PROVIDER.nop
//! nop configure [same flags] NAME.nop
//! concat create|label NAME PROVIDER...                # concat/NAME
//! stripe create|label -s SIZE NAME PROVIDER...        # stripe/NAME
//! mirror create|label [-b BALANCE] NAME PROVIDER...   # mirror/NAME
//! mirror insert|remove NAME PROVIDER...
//! mirror rebuild NAME PROVIDER
//! mirror forget NAME
//! CLASS destroy [-f] NAME          # md, nop, concat, stripe, mirror
//! CLASS clear PROVIDER...          # concat, stripe, mirror: wipe metadata
//! export nbd vol vtbd0             # serve vtbd0 over NBD as export "vol"
//! export nbd scratch md0 ro        # read-only export
//! net static 10.0.2.15/24 gw 10.0.2.2
//! net dhcp
//! ```
//!
//! Flags follow gnop(8), gstripe(8), gconcat(8) and gmirror(8) where they
//! exist. `label` writes metadata to the last sector of each member, so the
//! geom reassembles by tasting after a restart; `create` writes none.
//!
//! Parsing checks syntax and names that the file itself defines; whether a
//! provider such as `vtbd3` exists is known only when the stack is built,
//! and that error also carries the line it came from.

use crate::bio::BioError;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// A configuration error with the place it was found (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Line number, from 1.
    pub line: usize,
    /// Column number of the offending word, from 1.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// How the appliance gets its network address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetConfig {
    /// Ask a DHCP server.
    Dhcp,
    /// A fixed IPv4 address with prefix length and optional gateway.
    Static {
        /// Address octets.
        addr: [u8; 4],
        /// Prefix length (0–32).
        prefix: u8,
        /// Default gateway.
        gateway: Option<[u8; 4]>,
    },
}

/// Fault-injection knobs of a nop geom; `None` leaves a knob as it is
/// (on create: at its default, which injects nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NopOptions {
    /// `-r`: percent of reads that fail.
    pub read_fail_percent: Option<u8>,
    /// `-w`: percent of writes that fail.
    pub write_fail_percent: Option<u8>,
    /// `-e`: the error injected failures report (default EIO).
    pub error: Option<BioError>,
    /// `-c`: number of I/Os that succeed before failures start.
    pub count_until_fail: Option<u64>,
    /// `-d`: delay in milliseconds applied to delayed I/Os.
    pub delay_ms: Option<u32>,
    /// `-q`: percent of reads delayed.
    pub read_delay_percent: Option<u8>,
    /// `-x`: percent of writes delayed.
    pub write_delay_percent: Option<u8>,
    /// `-o`: first sector of the range failures are limited to.
    pub fail_offset_lba: Option<u64>,
    /// `-l`: length in sectors of that range (0: to the end).
    pub fail_len_lba: Option<u64>,
    /// `-z`: percent of successful reads whose data comes back corrupted.
    pub corrupt_percent: Option<u8>,
    /// `--seed`: seed of the nop's generator, so a run replays exactly.
    pub seed: Option<u64>,
}

/// How a mirror spreads reads over its members (gmirror's `-b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorBalance {
    /// Read from the member with the fewest requests in flight.
    Load,
    /// Read from the preferred (first active) member.
    Prefer,
    /// Read from each member in turn.
    RoundRobin,
    /// Split large reads over all members.
    Split,
}

impl MirrorBalance {
    /// The spelling used in config lines and JSON.
    pub fn name(self) -> &'static str {
        match self {
            MirrorBalance::Load => "load",
            MirrorBalance::Prefer => "prefer",
            MirrorBalance::RoundRobin => "round-robin",
            MirrorBalance::Split => "split",
        }
    }
}

/// One configuration statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Statement {
    /// `md create -s SIZE NAME`.
    MdCreate {
        /// Provider name.
        name: String,
        /// Size in bytes (a multiple of 512).
        size_bytes: u64,
    },
    /// `nop create [flags] PROVIDER`: provider `PROVIDER.nop`.
    NopCreate {
        /// The provider below.
        provider: String,
        /// Knobs.
        opts: NopOptions,
    },
    /// `nop configure [flags] NAME`: changes knobs of a live nop.
    NopConfigure {
        /// The nop's name (its provider name, `PROVIDER.nop`).
        name: String,
        /// Knobs to change.
        opts: NopOptions,
    },
    /// `concat create|label NAME PROVIDER...`: provider `concat/NAME`.
    ConcatCreate {
        /// Geom name.
        name: String,
        /// Members in order.
        providers: Vec<String>,
        /// Write metadata (`label`) or not (`create`).
        label: bool,
    },
    /// `stripe create|label -s SIZE NAME PROVIDER...`: provider `stripe/NAME`.
    StripeCreate {
        /// Geom name.
        name: String,
        /// Members in order.
        providers: Vec<String>,
        /// Stripe size in bytes (a power of two).
        stripe_size: u64,
        /// Write metadata (`label`) or not (`create`).
        label: bool,
    },
    /// `mirror create|label [-b BALANCE] NAME PROVIDER...`: provider `mirror/NAME`.
    MirrorCreate {
        /// Geom name.
        name: String,
        /// Members, all trusted as equal (as gmirror's label does); a disk
        /// with other contents joins with `mirror insert` instead.
        providers: Vec<String>,
        /// Read balancing, or the class default.
        balance: Option<MirrorBalance>,
        /// Write metadata (`label`) or not (`create`).
        label: bool,
    },
    /// `mirror insert NAME PROVIDER...`: adds members and resyncs them.
    MirrorInsert {
        /// Geom name.
        name: String,
        /// New members.
        providers: Vec<String>,
    },
    /// `mirror remove NAME PROVIDER...`: takes members out.
    MirrorRemove {
        /// Geom name.
        name: String,
        /// Members to remove.
        providers: Vec<String>,
    },
    /// `mirror rebuild NAME PROVIDER`: resyncs a member from the others.
    MirrorRebuild {
        /// Geom name.
        name: String,
        /// The member to rebuild.
        provider: String,
    },
    /// `mirror forget NAME`: forgets members that are gone.
    MirrorForget {
        /// Geom name.
        name: String,
    },
    /// `CLASS destroy [-f] NAME`: removes a geom; refused while its
    /// provider is open unless `-f`, which orphans it under its users.
    Destroy {
        /// Class name.
        class: String,
        /// Geom name (for md and nop: the provider name).
        name: String,
        /// `-f`.
        force: bool,
    },
    /// `CLASS clear PROVIDER...`: wipes the metadata sector of providers.
    Clear {
        /// Class name.
        class: String,
        /// Providers whose last sector is zeroed.
        providers: Vec<String>,
    },
    /// `export nbd NAME PROVIDER [ro]`.
    ExportNbd {
        /// Export name clients ask for.
        name: String,
        /// Provider served.
        provider: String,
        /// Serve read-only.
        read_only: bool,
    },
    /// `net dhcp` or `net static ADDR/PREFIX [gw ADDR]`.
    Net(NetConfig),
}

impl Statement {
    /// The class whose control code carries the statement out, or `None`
    /// for statements the service handles (export, net).
    pub fn class(&self) -> Option<&str> {
        Some(match self {
            Statement::MdCreate { .. } => "md",
            Statement::NopCreate { .. } | Statement::NopConfigure { .. } => "nop",
            Statement::ConcatCreate { .. } => "concat",
            Statement::StripeCreate { .. } => "stripe",
            Statement::MirrorCreate { .. }
            | Statement::MirrorInsert { .. }
            | Statement::MirrorRemove { .. }
            | Statement::MirrorRebuild { .. }
            | Statement::MirrorForget { .. } => "mirror",
            Statement::Destroy { class, .. } | Statement::Clear { class, .. } => class,
            Statement::ExportNbd { .. } | Statement::Net(_) => return None,
        })
    }

    /// The provider the statement creates, if any.
    pub fn creates(&self) -> Option<String> {
        match self {
            Statement::MdCreate { name, .. } => Some(name.clone()),
            Statement::NopCreate { provider, .. } => Some(format!("{provider}.nop")),
            Statement::ConcatCreate { name, .. } => Some(format!("concat/{name}")),
            Statement::StripeCreate { name, .. } => Some(format!("stripe/{name}")),
            Statement::MirrorCreate { name, .. } => Some(format!("mirror/{name}")),
            _ => None,
        }
    }

    /// The provider a destroy statement removes.
    fn destroys(&self) -> Option<String> {
        match self {
            Statement::Destroy { class, name, .. } => Some(match class.as_str() {
                "md" | "nop" => name.clone(),
                c => format!("{c}/{name}"),
            }),
            _ => None,
        }
    }
}

/// The classes whose geoms `destroy` knows.
pub const DESTROYABLE: [&str; 5] = ["md", "nop", "concat", "stripe", "mirror"];

/// Parses an error name (`EIO`, `ENXIO`, …) or errno number into a bio error.
pub fn parse_error(s: &str) -> Option<BioError> {
    Some(match s.to_ascii_uppercase().as_str() {
        "EIO" | "5" => BioError::Io,
        "ENXIO" | "6" => BioError::Orphaned,
        "EINVAL" | "22" => BioError::Invalid,
        "ENOSPC" | "28" => BioError::OutOfRange,
        "EPERM" | "1" => BioError::Access,
        "ENOMEM" | "12" => BioError::NoMemory,
        "EOPNOTSUPP" | "ENOTSUP" | "95" => BioError::NotSupported,
        _ => return None,
    })
}

/// A statement with the line it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Line number, from 1.
    pub line: usize,
    /// The statement.
    pub stmt: Statement,
}

/// A parsed configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The statements in file order.
    pub lines: Vec<Line>,
}

impl Config {
    /// The network setting, if the file has one (the last one wins).
    pub fn net(&self) -> Option<&NetConfig> {
        self.lines.iter().rev().find_map(|l| match &l.stmt {
            Statement::Net(n) => Some(n),
            _ => None,
        })
    }

    /// True when the file names no exports (the built-in default applies).
    pub fn has_exports(&self) -> bool {
        self.lines
            .iter()
            .any(|l| matches!(l.stmt, Statement::ExportNbd { .. }))
    }
}

/// A word of a line with its 1-based column.
#[derive(Clone, Copy)]
struct Word<'a> {
    text: &'a str,
    column: usize,
}

fn words(line: &str) -> Vec<Word<'_>> {
    let code = line.split('#').next().unwrap_or("");
    let mut out = Vec::new();
    let mut start = None;
    for (i, ch) in code.char_indices() {
        if ch.is_whitespace() {
            if let Some(s) = start.take() {
                out.push(Word {
                    text: &code[s..i],
                    column: code[..s].chars().count() + 1,
                });
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(Word {
            text: &code[s..],
            column: code[..s].chars().count() + 1,
        });
    }
    out
}

/// Parses a size such as `512`, `64k`, `256m`, `1g`, `2t` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let (digits, mult) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some(b'm') => (&lower[..lower.len() - 1], 1 << 20),
        Some(b'g') => (&lower[..lower.len() - 1], 1 << 30),
        Some(b't') => (&lower[..lower.len() - 1], 1 << 40),
        Some(b'0'..=b'9') => (&lower[..], 1),
        _ => return Err(format!("'{s}' is not a size (use e.g. 512, 64k, 256m, 1g)")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (use e.g. 512, 64k, 256m, 1g)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut out {
        *o = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

struct LineParser<'a> {
    line: usize,
    words: Vec<Word<'a>>,
    pos: usize,
    end_column: usize,
}

impl<'a> LineParser<'a> {
    fn err(&self, column: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            line: self.line,
            column,
            message: message.into(),
        }
    }

    fn next(&mut self, what: &str) -> Result<Word<'a>, ConfigError> {
        let w = self
            .words
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.err(self.end_column, format!("expected {what}")))?;
        self.pos += 1;
        Ok(w)
    }

    fn name(&mut self, what: &str) -> Result<String, ConfigError> {
        let w = self.next(what)?;
        if !is_name(w.text) {
            return Err(self.err(
                w.column,
                format!(
                    "'{}' is not a valid {what} (letters, digits, . _ - /)",
                    w.text
                ),
            ));
        }
        Ok(w.text.to_string())
    }

    fn finish(&self) -> Result<(), ConfigError> {
        match self.words.get(self.pos) {
            Some(w) => Err(self.err(w.column, format!("unexpected '{}'", w.text))),
            None => Ok(()),
        }
    }

    fn statement(&mut self) -> Result<Statement, ConfigError> {
        let verb = self.next("a statement")?;
        match verb.text {
            "md" => self.md(),
            "nop" => self.nop(),
            "concat" | "stripe" | "mirror" => self.multi(verb.text),
            "export" => self.export(),
            "net" => self.net(),
            other => Err(self.err(
                verb.column,
                format!(
                    "unknown statement '{other}' (expected md, nop, concat, stripe, mirror, export or net)"
                ),
            )),
        }
    }

    fn md(&mut self) -> Result<Statement, ConfigError> {
        let verb = self.next("'create' or 'destroy'")?;
        match verb.text {
            "create" => {}
            "destroy" => return self.destroy("md"),
            t => {
                return Err(self.err(
                    verb.column,
                    format!("unknown md verb '{t}' (expected create or destroy)"),
                ))
            }
        }
        let mut size = None;
        let mut name = None;
        while let Some(w) = self.words.get(self.pos).copied() {
            self.pos += 1;
            match w.text {
                "-s" => {
                    let v = self.next("a size after -s")?;
                    let bytes = parse_size(v.text).map_err(|m| self.err(v.column, m))?;
                    if bytes == 0 || bytes % 512 != 0 {
                        return Err(
                            self.err(v.column, "md size must be a non-zero multiple of 512 bytes")
                        );
                    }
                    size = Some(bytes);
                }
                t if t.starts_with('-') => {
                    return Err(self.err(w.column, format!("unknown md option '{t}'")));
                }
                _ if name.is_none() => {
                    self.pos -= 1;
                    name = Some(self.name("md name")?);
                }
                t => return Err(self.err(w.column, format!("unexpected '{t}'"))),
            }
        }
        let name = name.ok_or_else(|| self.err(self.end_column, "expected an md name"))?;
        let size_bytes =
            size.ok_or_else(|| self.err(self.end_column, "md create needs -s SIZE"))?;
        Ok(Statement::MdCreate { name, size_bytes })
    }

    /// `destroy [-f] NAME` after the class word.
    fn destroy(&mut self, class: &str) -> Result<Statement, ConfigError> {
        let mut force = false;
        if self.words.get(self.pos).is_some_and(|w| w.text == "-f") {
            force = true;
            self.pos += 1;
        }
        if let Some(w) = self.words.get(self.pos) {
            if w.text.starts_with('-') {
                return Err(self.err(
                    w.column,
                    format!("unknown destroy option '{}' (expected -f)", w.text),
                ));
            }
        }
        let name = self.name(&format!("{class} name"))?;
        self.finish()?;
        Ok(Statement::Destroy {
            class: String::from(class),
            name,
            force,
        })
    }

    /// The rest of the line as one or more provider names.
    fn providers(&mut self, at_least: usize) -> Result<Vec<String>, ConfigError> {
        let mut out = Vec::new();
        while self.pos < self.words.len() {
            let w = self.words[self.pos];
            if out.iter().any(|p: &String| p == w.text) {
                return Err(self.err(w.column, format!("provider '{}' is named twice", w.text)));
            }
            out.push(self.name("provider name")?);
        }
        if out.len() < at_least {
            return Err(self.err(
                self.end_column,
                format!(
                    "expected {at_least} provider name{}",
                    if at_least > 1 { "s or more" } else { "" }
                ),
            ));
        }
        Ok(out)
    }

    fn percent(&mut self, flag: &str) -> Result<u8, ConfigError> {
        let v = self.next(&format!("a percentage after {flag}"))?;
        v.text
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| self.err(v.column, format!("'{}' is not a percentage 0-100", v.text)))
    }

    fn number(&mut self, flag: &str) -> Result<u64, ConfigError> {
        let v = self.next(&format!("a number after {flag}"))?;
        let t = v.text;
        let parsed = match t.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => t.parse::<u64>().ok(),
        };
        parsed.ok_or_else(|| self.err(v.column, format!("'{t}' is not a number")))
    }

    fn nop(&mut self) -> Result<Statement, ConfigError> {
        let verb = self.next("'create', 'configure' or 'destroy'")?;
        let create = match verb.text {
            "create" => true,
            "configure" => false,
            "destroy" => return self.destroy("nop"),
            t => {
                return Err(self.err(
                    verb.column,
                    format!("unknown nop verb '{t}' (expected create, configure or destroy)"),
                ))
            }
        };
        let mut o = NopOptions::default();
        while let Some(w) = self.words.get(self.pos).copied() {
            if !w.text.starts_with('-') {
                break;
            }
            self.pos += 1;
            match w.text {
                "-r" => o.read_fail_percent = Some(self.percent("-r")?),
                "-w" => o.write_fail_percent = Some(self.percent("-w")?),
                "-q" => o.read_delay_percent = Some(self.percent("-q")?),
                "-x" => o.write_delay_percent = Some(self.percent("-x")?),
                "-z" => o.corrupt_percent = Some(self.percent("-z")?),
                "-e" => {
                    let v = self.next("an error after -e (EIO, ENXIO, ...)")?;
                    o.error = Some(parse_error(v.text).ok_or_else(|| {
                        self.err(
                            v.column,
                            format!(
                                "unknown error '{}' (expected EIO, ENXIO, EINVAL, ENOSPC, EPERM, ENOMEM or EOPNOTSUPP)",
                                v.text
                            ),
                        )
                    })?);
                }
                "-c" => o.count_until_fail = Some(self.number("-c")?),
                "-d" => {
                    let at = self.pos;
                    let n = self.number("-d")?;
                    o.delay_ms = Some(
                        u32::try_from(n)
                            .map_err(|_| self.err(self.words[at].column, "delay too long"))?,
                    );
                }
                "-o" => o.fail_offset_lba = Some(self.number("-o")?),
                "-l" => o.fail_len_lba = Some(self.number("-l")?),
                "--seed" => o.seed = Some(self.number("--seed")?),
                t => return Err(self.err(w.column, format!("unknown nop option '{t}'"))),
            }
        }
        let target = self.name(if create { "provider name" } else { "nop name" })?;
        self.finish()?;
        Ok(if create {
            Statement::NopCreate {
                provider: target,
                opts: o,
            }
        } else {
            Statement::NopConfigure {
                name: target,
                opts: o,
            }
        })
    }

    /// concat, stripe and mirror: geoms over several providers.
    fn multi(&mut self, class: &str) -> Result<Statement, ConfigError> {
        let verbs = match class {
            "mirror" => "create, label, insert, remove, rebuild, forget, destroy or clear",
            _ => "create, label, destroy or clear",
        };
        let verb = self.next(&format!("a {class} verb ({verbs})"))?;
        let label = match verb.text {
            "create" => false,
            "label" => true,
            "destroy" => return self.destroy(class),
            "clear" => {
                let providers = self.providers(1)?;
                return Ok(Statement::Clear {
                    class: String::from(class),
                    providers,
                });
            }
            "insert" | "remove" | "rebuild" | "forget" if class == "mirror" => {
                let name = self.name("mirror name")?;
                return Ok(match verb.text {
                    "insert" => Statement::MirrorInsert {
                        name,
                        providers: self.providers(1)?,
                    },
                    "remove" => Statement::MirrorRemove {
                        name,
                        providers: self.providers(1)?,
                    },
                    "rebuild" => {
                        let provider = self.name("provider name")?;
                        self.finish()?;
                        Statement::MirrorRebuild { name, provider }
                    }
                    _ => {
                        self.finish()?;
                        Statement::MirrorForget { name }
                    }
                });
            }
            t => {
                return Err(self.err(
                    verb.column,
                    format!("unknown {class} verb '{t}' (expected {verbs})"),
                ))
            }
        };
        let mut stripe_size = None;
        let mut balance = None;
        while let Some(w) = self.words.get(self.pos).copied() {
            if !w.text.starts_with('-') {
                break;
            }
            self.pos += 1;
            match (class, w.text) {
                ("stripe", "-s") => {
                    let v = self.next("a stripe size after -s")?;
                    let n = parse_size(v.text).map_err(|m| self.err(v.column, m))?;
                    if n < 512 || !n.is_power_of_two() || n > 1 << 30 {
                        return Err(self.err(
                            v.column,
                            "stripe size must be a power of two from 512 bytes to 1g",
                        ));
                    }
                    stripe_size = Some(n);
                }
                ("mirror", "-b") => {
                    let v = self.next("a balance algorithm after -b")?;
                    balance = Some(match v.text {
                        "load" => MirrorBalance::Load,
                        "prefer" => MirrorBalance::Prefer,
                        "round-robin" => MirrorBalance::RoundRobin,
                        "split" => MirrorBalance::Split,
                        t => {
                            return Err(self.err(
                                v.column,
                                format!(
                                    "unknown balance '{t}' (expected load, prefer, round-robin or split)"
                                ),
                            ))
                        }
                    });
                }
                (_, t) => return Err(self.err(w.column, format!("unknown {class} option '{t}'"))),
            }
        }
        let name = self.name(&format!("{class} name"))?;
        if name.contains('/') {
            let col = self.words[self.pos - 1].column;
            return Err(self.err(col, format!("a {class} name cannot contain '/'")));
        }
        let providers = self.providers(1)?;
        Ok(match class {
            "concat" => Statement::ConcatCreate {
                name,
                providers,
                label,
            },
            "stripe" => Statement::StripeCreate {
                name,
                providers,
                stripe_size: stripe_size
                    .ok_or_else(|| self.err(verb.column, "stripe create needs -s SIZE"))?,
                label,
            },
            _ => Statement::MirrorCreate {
                name,
                providers,
                balance,
                label,
            },
        })
    }

    fn export(&mut self) -> Result<Statement, ConfigError> {
        let proto = self.next("a protocol ('nbd')")?;
        if proto.text != "nbd" {
            return Err(self.err(
                proto.column,
                format!("unknown export protocol '{}' (expected nbd)", proto.text),
            ));
        }
        let name = self.name("export name")?;
        let provider = self.name("provider name")?;
        let mut read_only = false;
        if let Some(w) = self.words.get(self.pos).copied() {
            match w.text {
                "ro" => read_only = true,
                "rw" => {}
                t => {
                    return Err(self.err(w.column, format!("unexpected '{t}' (expected ro or rw)")))
                }
            }
            self.pos += 1;
        }
        self.finish()?;
        Ok(Statement::ExportNbd {
            name,
            provider,
            read_only,
        })
    }

    fn net(&mut self) -> Result<Statement, ConfigError> {
        let mode = self.next("'dhcp' or 'static'")?;
        let net = match mode.text {
            "dhcp" => NetConfig::Dhcp,
            "static" => {
                let a = self.next("ADDRESS/PREFIX")?;
                let (addr, prefix) = a
                    .text
                    .split_once('/')
                    .and_then(|(ip, p)| {
                        Some((parse_ipv4(ip)?, p.parse::<u8>().ok().filter(|p| *p <= 32)?))
                    })
                    .ok_or_else(|| {
                        self.err(
                            a.column,
                            format!("'{}' is not ADDRESS/PREFIX like 10.0.2.15/24", a.text),
                        )
                    })?;
                let mut gateway = None;
                if let Some(w) = self.words.get(self.pos).copied() {
                    if w.text != "gw" {
                        return Err(
                            self.err(w.column, format!("unexpected '{}' (expected gw)", w.text))
                        );
                    }
                    self.pos += 1;
                    let g = self.next("a gateway address")?;
                    gateway = Some(parse_ipv4(g.text).ok_or_else(|| {
                        self.err(g.column, format!("'{}' is not an IPv4 address", g.text))
                    })?);
                }
                NetConfig::Static {
                    addr,
                    prefix,
                    gateway,
                }
            }
            t => {
                return Err(self.err(
                    mode.column,
                    format!("unknown net mode '{t}' (expected dhcp or static)"),
                ))
            }
        };
        self.finish()?;
        Ok(Statement::Net(net))
    }
}

/// Parses one line (`line` is its number, from 1, for errors); `None`
/// for a blank or comment line. The management endpoint feeds live lines
/// through this.
pub fn parse_line(text: &str, line: usize) -> Result<Option<Statement>, ConfigError> {
    let ws = words(text);
    if ws.is_empty() {
        return Ok(None);
    }
    let end_column = text
        .split('#')
        .next()
        .unwrap_or("")
        .trim_end()
        .chars()
        .count()
        + 1;
    let mut p = LineParser {
        line,
        words: ws,
        pos: 0,
        end_column,
    };
    p.statement().map(Some)
}

/// Parses a configuration file. Besides syntax it checks that the file
/// does not define the same provider or export twice.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    let mut providers: Vec<(String, usize)> = Vec::new();
    let mut export_names: Vec<(String, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let Some(stmt) = parse_line(raw, i + 1)? else {
            continue;
        };
        if let Some(gone) = stmt.destroys() {
            providers.retain(|(n, _)| *n != gone);
        }
        let (names, name, what, word) = match &stmt {
            Statement::ExportNbd { name, .. } => {
                (&mut export_names, name.clone(), "export", name.clone())
            }
            s => match s.creates() {
                Some(p) => {
                    let word = match s {
                        Statement::NopCreate { provider, .. } => provider.clone(),
                        Statement::MdCreate { name, .. }
                        | Statement::ConcatCreate { name, .. }
                        | Statement::StripeCreate { name, .. }
                        | Statement::MirrorCreate { name, .. } => name.clone(),
                        _ => p.clone(),
                    };
                    (&mut providers, p, "provider", word)
                }
                None => {
                    cfg.lines.push(Line { line: i + 1, stmt });
                    continue;
                }
            },
        };
        if let Some((_, first)) = names.iter().find(|(n, _)| *n == name) {
            let column = words(raw)
                .iter()
                .skip(2)
                .find(|w| w.text == word)
                .map_or(1, |w| w.column);
            return Err(ConfigError {
                line: i + 1,
                column,
                message: format!("{what} '{name}' is already defined on line {first}"),
            });
        }
        names.push((name, i + 1));
        cfg.lines.push(Line { line: i + 1, stmt });
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn parses_every_statement() {
        let cfg = parse(
            "# test\n\nmd create -s 256m md0\nexport nbd vol vtbd0   # main\nexport nbd scratch md0 ro\nnet static 10.0.2.15/24 gw 10.0.2.2\n",
        )
        .unwrap();
        assert_eq!(cfg.lines.len(), 4);
        assert_eq!(
            cfg.lines[0],
            Line {
                line: 3,
                stmt: Statement::MdCreate {
                    name: "md0".into(),
                    size_bytes: 256 << 20
                }
            }
        );
        assert_eq!(
            cfg.lines[2].stmt,
            Statement::ExportNbd {
                name: "scratch".into(),
                provider: "md0".into(),
                read_only: true
            }
        );
        assert_eq!(
            cfg.net(),
            Some(&NetConfig::Static {
                addr: [10, 0, 2, 15],
                prefix: 24,
                gateway: Some([10, 0, 2, 2])
            })
        );
        assert!(cfg.has_exports());
    }

    fn err(text: &str) -> (usize, usize, String) {
        let e = parse(text).unwrap_err();
        (e.line, e.column, e.message)
    }

    #[test]
    fn errors_name_line_and_column() {
        assert_eq!(err("md create -s 256m md0\nfrobnicate x\n").0, 2);
        assert_eq!(err("md create -s 256m md0\nfrobnicate x\n").1, 1);
        let (l, c, m) = err("\n\nmd create -s 12q md0\n");
        assert_eq!((l, c), (3, 14));
        assert!(m.contains("12q"), "{m}");
        let (l, c, _) = err("md create -s 1000 md0");
        assert_eq!((l, c), (1, 14));
        let (l, c, m) = err("md create md0");
        assert_eq!((l, c), (1, 14));
        assert!(m.contains("-s"), "{m}");
        let (l, c, m) = err("export nbd vol vtbd0 rx");
        assert_eq!((l, c), (1, 22));
        assert!(m.contains("rx"));
        let (l, _, m) = err("export nbd a md0\nexport nbd a md1");
        assert_eq!(l, 2);
        assert!(m.contains("line 1"), "{m}");
        assert_eq!(err("net static 10.0.2/24").1, 12);
        assert_eq!(err("export iscsi a b").1, 8);
        assert_eq!(err("export nbd").1, 11);
    }

    #[test]
    fn display_has_line_and_column() {
        let e = parse("bogus").unwrap_err();
        assert_eq!(
            alloc::format!("{e}"),
            "line 1, column 1: unknown statement 'bogus' (expected md, nop, concat, stripe, mirror, export or net)"
        );
    }

    fn one(line: &str) -> Statement {
        parse_line(line, 1).unwrap().unwrap()
    }

    #[test]
    fn geom_statements() {
        assert_eq!(
            one("nop create -r 5 -w 6 -e ENXIO -c 10 -d 3 -q 7 -x 8 -o 100 -l 20 -z 1 --seed 7 vtbd2"),
            Statement::NopCreate {
                provider: "vtbd2".into(),
                opts: NopOptions {
                    read_fail_percent: Some(5),
                    write_fail_percent: Some(6),
                    error: Some(BioError::Orphaned),
                    count_until_fail: Some(10),
                    delay_ms: Some(3),
                    read_delay_percent: Some(7),
                    write_delay_percent: Some(8),
                    fail_offset_lba: Some(100),
                    fail_len_lba: Some(20),
                    corrupt_percent: Some(1),
                    seed: Some(7),
                }
            }
        );
        assert_eq!(
            one("nop configure -e 5 vtbd2.nop"),
            Statement::NopConfigure {
                name: "vtbd2.nop".into(),
                opts: NopOptions {
                    error: Some(BioError::Io),
                    ..Default::default()
                }
            }
        );
        assert_eq!(
            one("stripe label -s 64k st0 vtbd0 vtbd1"),
            Statement::StripeCreate {
                name: "st0".into(),
                providers: vec!["vtbd0".into(), "vtbd1".into()],
                stripe_size: 65536,
                label: true
            }
        );
        assert_eq!(
            one("concat create c0 md0 md1"),
            Statement::ConcatCreate {
                name: "c0".into(),
                providers: vec!["md0".into(), "md1".into()],
                label: false
            }
        );
        assert_eq!(
            one("mirror label -b round-robin gm0 vtbd2.nop vtbd3"),
            Statement::MirrorCreate {
                name: "gm0".into(),
                providers: vec!["vtbd2.nop".into(), "vtbd3".into()],
                balance: Some(MirrorBalance::RoundRobin),
                label: true
            }
        );
        assert_eq!(
            one("mirror insert gm0 vtbd4"),
            Statement::MirrorInsert {
                name: "gm0".into(),
                providers: vec!["vtbd4".into()]
            }
        );
        assert_eq!(
            one("mirror rebuild gm0 vtbd4"),
            Statement::MirrorRebuild {
                name: "gm0".into(),
                provider: "vtbd4".into()
            }
        );
        assert_eq!(
            one("mirror forget gm0"),
            Statement::MirrorForget { name: "gm0".into() }
        );
        assert_eq!(
            one("stripe destroy -f st0"),
            Statement::Destroy {
                class: "stripe".into(),
                name: "st0".into(),
                force: true
            }
        );
        assert_eq!(one("md destroy md0").class(), Some("md"));
        assert_eq!(
            one("concat clear vtbd0 vtbd1"),
            Statement::Clear {
                class: "concat".into(),
                providers: vec!["vtbd0".into(), "vtbd1".into()]
            }
        );
        assert_eq!(parse_line("  # nothing", 4), Ok(None));
        assert_eq!(one("export nbd a b").class(), None);
        assert_eq!(
            one("nop create vtbd2").creates().as_deref(),
            Some("vtbd2.nop")
        );
    }

    #[test]
    fn geom_statement_errors_name_the_column() {
        let e = |line: &str| {
            let e = parse_line(line, 3).unwrap_err();
            assert_eq!(e.line, 3);
            (e.column, e.message)
        };
        let (c, m) = e("nop create -r 101 vtbd0");
        assert_eq!(c, 15);
        assert!(m.contains("101"), "{m}");
        assert_eq!(e("nop create -e EWHAT vtbd0").0, 15);
        assert_eq!(e("nop create -k 1 vtbd0").0, 12);
        assert_eq!(e("nop create").0, 11);
        assert_eq!(e("nop create vtbd0 vtbd1").0, 18);
        let (c, m) = e("stripe label st0 vtbd0 vtbd1");
        assert_eq!(c, 8);
        assert!(m.contains("-s"), "{m}");
        assert_eq!(e("stripe create -s 3k st0 vtbd0").0, 18);
        assert_eq!(e("stripe create -s 64k st0").0, 25);
        let (c, m) = e("concat create c0 vtbd0 vtbd0");
        assert_eq!(c, 24);
        assert!(m.contains("twice"), "{m}");
        assert_eq!(e("concat create a/b vtbd0").0, 15);
        assert_eq!(e("concat frob c0").0, 8);
        assert_eq!(e("mirror label -b fastest gm0 vtbd0").0, 17);
        assert_eq!(e("concat insert c0 vtbd0").0, 8);
        assert_eq!(e("stripe destroy -x st0").0, 16);
        assert_eq!(e("mirror forget gm0 extra").0, 19);
    }

    #[test]
    fn a_file_cannot_define_a_provider_twice() {
        let (l, c, m) = err("nop create vtbd0\nconcat create c0 vtbd1\nnop create vtbd0\n");
        assert_eq!((l, c), (3, 12));
        assert!(m.contains("vtbd0.nop") && m.contains("line 1"), "{m}");
        assert!(
            err("stripe create -s 4k s vtbd0\nstripe label -s 4k s vtbd1")
                .2
                .contains("stripe/s")
        );
        // Destroying frees the name for a later line.
        assert!(
            parse("concat create c0 vtbd0\nconcat destroy c0\nconcat create c0 vtbd0\n").is_ok()
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999999t").is_err());
    }
}
