//! The protocols the service speaks: one entry each, with its engine, its
//! limits and what its `export` lines may say. A new protocol is its
//! engine (a [`net::session::Session`]) and one entry here; nothing else
//! in the service or the platforms names it.

use super::{Limits, MAX_PAYLOAD};
use alloc::boxed::Box;
use alloc::format;
use geom::config::{ConfigError, ExportStatement};
use net::session::Session;
use net::{http, nbd};

/// What an `export` line says beyond its name and provider, checked by
/// the protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Serve read-only.
    pub read_only: bool,
}

/// Checks the options of one `export` line (its number, the statement).
pub type ExportCheck = fn(usize, &ExportStatement) -> Result<ExportOptions, ConfigError>;

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
    /// A new engine for one connection, with the service's limits.
    pub new_session: fn(&Limits) -> Box<dyn Session>,
    /// Checks the options of an `export` line for this protocol; `None`
    /// for a protocol that serves no exports.
    pub export_options: Option<ExportCheck>,
    /// The address a client uses for an export, from `host:port`.
    pub uri: fn(host_port: &str, export: &str) -> alloc::string::String,
}

/// NBD (the NBD project's doc/proto.md).
pub const NBD: Protocol = Protocol {
    name: "nbd",
    guest_port: 10809,
    max_connections: 32,
    buffer_bytes: 512 * 1024,
    new_session: |limits| {
        Box::new(nbd::Connection::new(nbd::ServerConfig {
            max_in_flight: 64,
            max_payload: MAX_PAYLOAD,
            stall_timeout_ms: limits.nbd_stall_timeout_ms,
            budgeted: true,
            ..nbd::ServerConfig::default()
        }))
    },
    export_options: Some(nbd_options),
    uri: |hp, name| format!("nbd://{hp}/{name}"),
};

/// The management endpoint (HTTP/1.1).
pub const HTTP: Protocol = Protocol {
    name: "http",
    guest_port: 8080,
    max_connections: 16,
    buffer_bytes: 16 * 1024,
    new_session: |limits| Box::new(http::Connection::with_timeout(limits.http_timeout_ms)),
    export_options: None,
    uri: |hp, _| format!("http://{hp}/"),
};

/// Every protocol, in the order `/status` lists them.
pub static PROTOCOLS: &[&Protocol] = &[&NBD, &HTTP];

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
