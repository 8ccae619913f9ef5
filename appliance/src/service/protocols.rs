//! The protocols the service speaks: one entry each, with its engine, its
//! limits and what its `export` lines may say. A new protocol is its
//! engine (a [`net::session::Session`]) and one entry here; nothing else
//! in the service or the platforms names it.

use super::{Limits, MAX_PAYLOAD};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use geom::config::{is_name, ConfigError, ExportStatement, OptionWord};
use net::session::Session;
use net::{http, iscsi, nbd};

/// What an `export` line says beyond its provider, checked by the
/// protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Serve read-only.
    pub read_only: bool,
    /// The name its protocol's sessions see and clients ask for, when it
    /// is not the line's name word as written (iSCSI: `IQN/LUN`).
    pub name: Option<String>,
    /// Who may use it; open unless the protocol has access control.
    pub access: AccessOptions,
    /// The provider that keeps the export's persistent state through
    /// restarts (iSCSI `aptpl PROVIDER`), if any.
    pub state: Option<String>,
}

/// Who may use an export, as the config says it: the secrets may still
/// be names of `--secret` files, read when the export is made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessOptions {
    /// CHAP the initiator must pass: user name and secret.
    pub chap: Option<(String, Secret)>,
    /// Mutual CHAP: the user name and secret the target answers with.
    pub mutual: Option<(String, Secret)>,
    /// Initiator names allowed (empty: any), sorted, without duplicates.
    pub initiators: Vec<String>,
}

/// A CHAP secret in the config.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// Written on the line.
    Given(String),
    /// `-k NAME`: the bytes of the file given with `--secret NAME=FILE`.
    Named(String),
}

impl core::fmt::Debug for Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Secret::Given(_) => f.write_str("Given(..)"),
            Secret::Named(n) => write!(f, "Named({n:?})"),
        }
    }
}

/// Checks the options of one `export` line (its number, the statement).
pub type ExportCheck = fn(usize, &ExportStatement) -> Result<ExportOptions, ConfigError>;

/// Whether a new export (first) can be served beside one its protocol
/// serves already (second): `Some(why not)`.
pub type ExportConflict = fn(&ExportOptions, &ExportOptions) -> Option<String>;

/// One protocol the appliance serves.
pub struct Protocol {
    /// The name in `export` lines, `/status` and `/metrics`.
    pub name: &'static str,
    /// Port it listens on in the unikernel (the host tool forwards to it).
    pub guest_port: u16,
    /// Most connections served at once, on either platform. An attempt
    /// within the limit is accepted however many arrive together; one
    /// beyond it is closed at once, before any byte is sent.
    pub max_connections: usize,
    /// TCP buffer per direction it wants (a platform may give less).
    pub buffer_bytes: usize,
    /// A new engine for one connection, with the service's limits and 32
    /// bytes from the key generator for what it must draw at random (CHAP
    /// challenges); `None` when the generator has no entropy.
    pub new_session: fn(&Limits, Option<[u8; 32]>) -> Box<dyn Session>,
    /// Checks the options of an `export` line for this protocol; `None`
    /// for a protocol that serves no exports.
    pub export_options: Option<ExportCheck>,
    /// Checks a new export against each one the protocol serves already
    /// (at boot, against the earlier lines); `None`: any may sit together
    /// (names aside, which are always unique per protocol).
    pub export_conflict: Option<ExportConflict>,
    /// The address a client uses for an export, from `host:port`.
    pub uri: fn(host_port: &str, export: &str) -> alloc::string::String,
    /// Takes the persistent state an export kept ([`net::session::Work::Save`])
    /// before its sessions start, by export name; false when the bytes are
    /// not the protocol's. `None` for a protocol that keeps none.
    pub restore_state: Option<fn(&str, &[u8]) -> bool>,
}

/// NBD (the NBD project's doc/proto.md).
pub const NBD: Protocol = Protocol {
    name: "nbd",
    guest_port: 10809,
    max_connections: 32,
    buffer_bytes: 512 * 1024,
    new_session: |limits, _| {
        Box::new(nbd::Connection::new(nbd::ServerConfig {
            max_in_flight: 64,
            max_payload: MAX_PAYLOAD,
            stall_timeout_ms: limits.nbd_stall_timeout_ms,
            budgeted: true,
            ..nbd::ServerConfig::default()
        }))
    },
    export_options: Some(nbd_options),
    export_conflict: None,
    uri: |hp, name| format!("nbd://{hp}/{name}"),
    restore_state: None,
};

/// iSCSI (RFC 7143): one target per IQN, one LUN per `export` line.
pub const ISCSI: Protocol = Protocol {
    name: "iscsi",
    guest_port: 3260,
    max_connections: 32,
    buffer_bytes: 512 * 1024,
    new_session: |limits, seed| {
        Box::new(iscsi::Connection::new(iscsi::Config {
            budgeted: true,
            stall_timeout_ms: limits.nbd_stall_timeout_ms,
            portal: limits.iscsi_portal,
            seed,
            ..Default::default()
        }))
    },
    export_options: Some(iscsi_options),
    export_conflict: Some(iscsi_conflict),
    uri: |hp, name| format!("iscsi://{hp}/{name}"),
    restore_state: Some(iscsi::restore_unit),
};

/// The management endpoint (HTTP/1.1).
pub const HTTP: Protocol = Protocol {
    name: "http",
    guest_port: 8080,
    max_connections: 16,
    buffer_bytes: 16 * 1024,
    new_session: |limits, _| Box::new(http::Connection::with_timeout(limits.http_timeout_ms)),
    export_options: None,
    export_conflict: None,
    uri: |hp, _| format!("http://{hp}/"),
    restore_state: None,
};

/// Every protocol, in the order `/status` lists them.
pub static PROTOCOLS: &[&Protocol] = &[&NBD, &HTTP, &ISCSI];

/// The protocol called `name`, with its index in [`PROTOCOLS`].
pub fn find(name: &str) -> Option<(usize, &'static Protocol)> {
    PROTOCOLS
        .iter()
        .enumerate()
        .find(|(_, p)| p.name == name)
        .map(|(i, p)| (i, *p))
}

/// `export nbd NAME PROVIDER [ro|rw]`.
fn nbd_options(line: usize, e: &ExportStatement) -> Result<ExportOptions, ConfigError> {
    let err = |column, message| ConfigError {
        line,
        column,
        message,
    };
    if !is_name(&e.name) {
        return Err(err(
            e.name_column,
            format!(
                "'{}' is not a valid export name (letters, digits, . _ - /)",
                e.name
            ),
        ));
    }
    let mut o = ExportOptions::default();
    match e.options.as_slice() {
        [] => {}
        [w, rest @ ..] => {
            match w.text.as_str() {
                "ro" => o.read_only = true,
                "rw" => {}
                t => {
                    return Err(err(
                        w.column,
                        format!("unexpected '{t}' (expected ro or rw)"),
                    ))
                }
            }
            if let Some(w) = rest.first() {
                return Err(err(w.column, format!("unexpected '{}'", w.text)));
            }
        }
    }
    Ok(o)
}

/// Longest iSCSI name (RFC 7143 §4.2.7.1), in bytes.
pub const ISCSI_NAME_MAX: usize = 223;
/// Highest LUN an `export iscsi` line may give (SAM's flat space
/// addressing: 14 bits).
pub const ISCSI_LUN_MAX: u16 = 16383;
/// Shortest CHAP secret accepted, in bytes: RFC 7143 §12.1.3 wants at
/// least 96 bits.
pub const CHAP_SECRET_MIN: usize = 12;
/// Longest CHAP secret accepted, in bytes: what open-iscsi and libiscsi
/// initiators (and tgt) take, so a secret that works here works there.
pub const CHAP_SECRET_MAX: usize = 16;

/// Why `name` is not an iSCSI name (RFC 7143 §4.2.7): `iqn.YYYY-MM.` and
/// a reversed domain name, optionally `:` and anything; `eui.` and 16 hex
/// digits; `naa.` and 16 or 32 hex digits. Names are compared after
/// RFC 3722's stringprep, which folds case, so an `iqn.` name must be
/// written in lowercase.
pub fn iscsi_name_error(name: &str) -> Option<String> {
    let hex = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    if name.len() > ISCSI_NAME_MAX {
        return Some(format!("longer than {ISCSI_NAME_MAX} bytes"));
    }
    if let Some(h) = name.strip_prefix("eui.") {
        return (!hex(h, &[16])).then(|| String::from("eui. needs 16 hex digits"));
    }
    if let Some(h) = name.strip_prefix("naa.") {
        return (!hex(h, &[16, 32])).then(|| String::from("naa. needs 16 or 32 hex digits"));
    }
    let Some(rest) = name.strip_prefix("iqn.") else {
        return Some(String::from(
            "expected iqn.YYYY-MM.DOMAIN[:NAME], eui.HEX16 or naa.HEX",
        ));
    };
    let b = rest.as_bytes();
    let date_ok = b.len() >= 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && matches!(
            &rest[5..7],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        )
        && b[7] == b'.';
    if !date_ok {
        return Some(String::from(
            "iqn. needs a date YYYY-MM and '.' next (iqn.2026-12.org.example)",
        ));
    }
    let (authority, _unique) = rest[8..].split_once(':').unwrap_or((&rest[8..], ""));
    if authority.is_empty()
        || authority
            .split('.')
            .any(|l| l.is_empty() || l.starts_with('-') || l.ends_with('-'))
    {
        return Some(String::from(
            "iqn. needs a reversed domain name after the date",
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | ':')))
    {
        return Some(if c.is_ascii_uppercase() {
            String::from("iqn. names are lowercase (initiators fold case)")
        } else {
            format!("'{c}' is not allowed (letters, digits, - . :)")
        });
    }
    None
}

/// The `IQN` of an `IQN/LUN` export name.
fn iscsi_target(name: &str) -> &str {
    name.rsplit_once('/').map_or(name, |(t, _)| t)
}

/// `export iscsi IQN PROVIDER [lun N] [ro|rw] [chap USER SECRET|-k NAME]
/// [mutual USER SECRET|-k NAME] [initiator IQN...]`, the words after the
/// provider in any order.
fn iscsi_options(line: usize, e: &ExportStatement) -> Result<ExportOptions, ConfigError> {
    let err = |column, message: String| ConfigError {
        line,
        column,
        message,
    };
    if let Some(why) = iscsi_name_error(&e.name) {
        return Err(err(
            e.name_column,
            format!("'{}' is not an iSCSI target name: {why}", e.name),
        ));
    }
    const KEYWORDS: &[&str] = &["lun", "ro", "rw", "chap", "mutual", "initiator", "aptpl"];
    let words = e.options.as_slice();
    let mut o = ExportOptions::default();
    let mut lun: Option<u16> = None;
    let mut mode_given = false;
    let mut mutual_column = 0;
    let mut i = 0;
    // The word after words[i] (the keyword `key`), described as `what`.
    let arg = |i: usize, key: &str, what: &str| -> Result<&OptionWord, ConfigError> {
        words
            .get(i + 1)
            .ok_or_else(|| err(e.end_column, format!("'{key}' needs {what}")))
    };
    let once = |given: bool, w: &OptionWord| {
        if given {
            Err(err(w.column, format!("'{}' given twice", w.text)))
        } else {
            Ok(())
        }
    };
    while let Some(w) = words.get(i) {
        match w.text.as_str() {
            "lun" => {
                once(lun.is_some(), w)?;
                let n = arg(i, "lun", "a number")?;
                let v =
                    n.text.parse::<u16>().ok().filter(|v| {
                        *v <= ISCSI_LUN_MAX && (n.text == "0" || !n.text.starts_with('0'))
                    });
                let Some(v) = v else {
                    return Err(err(
                        n.column,
                        format!("'{}' is not a LUN (0 to {ISCSI_LUN_MAX})", n.text),
                    ));
                };
                lun = Some(v);
                i += 2;
            }
            "aptpl" => {
                once(o.state.is_some(), w)?;
                let p = arg(i, "aptpl", "the provider that keeps the reservations")?;
                if !geom::config::is_name(&p.text) || KEYWORDS.contains(&p.text.as_str()) {
                    return Err(err(
                        p.column,
                        format!("'aptpl' needs a provider name, not '{}'", p.text),
                    ));
                }
                o.state = Some(p.text.clone());
                i += 2;
            }
            "ro" | "rw" => {
                once(mode_given, w)?;
                mode_given = true;
                o.read_only = w.text == "ro";
                i += 1;
            }
            "chap" | "mutual" => {
                let key = w.text.as_str();
                let slot_given = if key == "chap" {
                    o.access.chap.is_some()
                } else {
                    o.access.mutual.is_some()
                };
                once(slot_given, w)?;
                let user = arg(i, key, "a user name and a secret")?;
                if KEYWORDS.contains(&user.text.as_str()) || user.text == "-k" {
                    return Err(err(user.column, format!("'{key}' needs a user name first")));
                }
                let s = arg(i + 1, key, "a secret after the user name")?;
                let secret = if s.text == "-k" {
                    let n = arg(i + 2, key, "a secret name after -k")?;
                    if !is_name(&n.text) {
                        return Err(err(n.column, format!("'{}' is not a secret name", n.text)));
                    }
                    i += 4;
                    Secret::Named(n.text.clone())
                } else {
                    let len = s.text.len();
                    if !(CHAP_SECRET_MIN..=CHAP_SECRET_MAX).contains(&len) {
                        return Err(err(
                            s.column,
                            format!(
                                "a CHAP secret is {CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} bytes, not {len}"
                            ),
                        ));
                    }
                    i += 3;
                    Secret::Given(s.text.clone())
                };
                let pair = Some((user.text.clone(), secret));
                if key == "chap" {
                    o.access.chap = pair;
                } else {
                    mutual_column = w.column;
                    o.access.mutual = pair;
                }
            }
            "initiator" => {
                let start = i;
                i += 1;
                while let Some(n) = words
                    .get(i)
                    .filter(|n| !KEYWORDS.contains(&n.text.as_str()))
                {
                    if let Some(why) = iscsi_name_error(&n.text) {
                        return Err(err(
                            n.column,
                            format!("'{}' is not an initiator name: {why}", n.text),
                        ));
                    }
                    o.access.initiators.push(n.text.clone());
                    i += 1;
                }
                if i == start + 1 {
                    arg(start, "initiator", "one initiator name or more")?;
                    return Err(err(
                        words[i].column,
                        String::from("'initiator' needs one initiator name or more"),
                    ));
                }
            }
            t => {
                return Err(err(
                    w.column,
                    format!(
                        "unexpected '{t}' (expected lun, ro, rw, chap, mutual, initiator or aptpl)"
                    ),
                ))
            }
        }
    }
    if o.access.mutual.is_some() && o.access.chap.is_none() {
        return Err(err(
            mutual_column,
            String::from("'mutual' needs 'chap' too (the initiator authenticates first)"),
        ));
    }
    if let (Some((_, Secret::Given(a))), Some((_, Secret::Given(b)))) =
        (&o.access.chap, &o.access.mutual)
    {
        if a == b {
            return Err(err(
                mutual_column,
                String::from("the mutual secret must differ from the chap one (RFC 7143 §12.1.3)"),
            ));
        }
    }
    o.access.initiators.sort();
    o.access.initiators.dedup();
    o.name = Some(format!("{}/{}", e.name, lun.unwrap_or(0)));
    Ok(o)
}

/// Two iSCSI exports conflict when they are the same LUN of a target, or
/// LUNs of one target that disagree on who may log in to it.
fn iscsi_conflict(new: &ExportOptions, old: &ExportOptions) -> Option<String> {
    let (Some(n), Some(o)) = (&new.name, &old.name) else {
        return None;
    };
    if let (Some(a), Some(b)) = (&new.state, &old.state) {
        if a == b {
            return Some(format!("{a} keeps the state of {o} already (aptpl)"));
        }
    }
    let target = iscsi_target(n);
    if target != iscsi_target(o) {
        return None;
    }
    if n == o {
        let lun = n.rsplit_once('/').map_or("0", |(_, l)| l);
        return Some(format!("target {target} has a LUN {lun} already"));
    }
    let a = (&new.access, &old.access);
    let differ = if a.0.chap != a.1.chap {
        Some("chap")
    } else if a.0.mutual != a.1.mutual {
        Some("mutual")
    } else if a.0.initiators != a.1.initiators {
        Some("initiator")
    } else {
        None
    };
    differ.map(|what| {
        format!(
            "target {target}: every line for it must give the same {what} (LUN {} differs)",
            o.rsplit_once('/').map_or("0", |(_, l)| l)
        )
    })
}

/// Checks every `export` line of a config in order (their numbers and
/// statements): each as [`check_export`] does, and each against the
/// earlier ones of its protocol: no name twice, and no conflict.
pub fn check_exports<'a>(
    exports: impl Iterator<Item = (usize, &'a ExportStatement)>,
) -> Result<(), ConfigError> {
    let mut seen: Vec<(usize, usize, ExportOptions, String)> = Vec::new();
    for (line, e) in exports {
        let (p, o) = check_export(line, e)?;
        let name = o.name.as_deref().unwrap_or(&e.name);
        let twice = seen
            .iter()
            .find(|(q, _, old, n)| *q == p && old.name.is_none() && n == name);
        if let Some((_, l, ..)) = twice {
            return Err(ConfigError {
                line,
                column: e.name_column,
                message: format!("export '{name}' is already defined on line {l}"),
            });
        }
        if let Some(conflict) = PROTOCOLS[p].export_conflict {
            for (q, l, old, _) in &seen {
                if let Some(why) = (*q == p).then(|| conflict(&o, old)).flatten() {
                    return Err(ConfigError {
                        line,
                        column: e.name_column,
                        message: format!("{why} (line {l})"),
                    });
                }
            }
        }
        let name = String::from(name);
        seen.push((p, line, o, name));
    }
    Ok(())
}

/// Checks an `export` line: a protocol that serves exports, and options
/// it accepts.
pub fn check_export(
    line: usize,
    e: &ExportStatement,
) -> Result<(usize, ExportOptions), ConfigError> {
    let known = || {
        PROTOCOLS
            .iter()
            .filter(|p| p.export_options.is_some())
            .map(|p| p.name)
            .collect::<alloc::vec::Vec<_>>()
            .join(", ")
    };
    let found = find(&e.protocol).and_then(|(i, p)| p.export_options.map(|f| (i, f)));
    let Some((index, options)) = found else {
        return Err(ConfigError {
            line,
            column: e.protocol_column,
            message: format!(
                "unknown export protocol '{}' (expected {})",
                e.protocol,
                known()
            ),
        });
    };
    Ok((index, options(line, e)?))
}
