//! The configuration language: geom(8)-style lines that build the stack
//! and name what is served.
//!
//! ```text
//! # comment
//! CLASS VERB [OPTIONS] ARGUMENTS...      # e.g. md create -s 256m md0
//! export PROTOCOL NAME PROVIDER [OPTIONS...]
//! net static 10.0.2.15/24 gw 10.0.2.2
//! net dhcp
//! ```
//!
//! This module holds what every line shares: the tokenizer and the cursor
//! classes read their words with ([`args`]), the dispatch of a line to the
//! class it names, and the two statements that are not classes: `export`
//! (whose options each protocol checks for itself) and `net`. Each class
//! parses its own verbs ([`crate::class::Class::parse`]), so its grammar
//! lives beside the code that carries it out; see each class's module for
//! its lines. Every error carries the line and the column of the word at
//! fault.
//!
//! Parsing checks syntax and names that the file itself defines; whether a
//! provider such as `vtbd3` exists is known only when the stack is built,
//! and that error also carries the line it came from.

pub mod args;

pub use args::{is_name, parse_error, parse_size, Args, Word};

use crate::class::{self, Command};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
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

/// One word of an export's options, with its column for errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionWord {
    /// The word.
    pub text: String,
    /// Its column, from 1.
    pub column: usize,
}

/// `export PROTOCOL NAME PROVIDER [OPTIONS...]`: serve a provider. The
/// protocol and its options are checked by the protocol itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportStatement {
    /// Protocol name (`nbd`, …).
    pub protocol: String,
    /// Column of the protocol word.
    pub protocol_column: usize,
    /// Name clients ask for, as written: its protocol checks it (an NBD
    /// name is a [`is_name`] name, an iSCSI one a target name).
    pub name: String,
    /// Column of the name word.
    pub name_column: usize,
    /// Provider served.
    pub provider: String,
    /// The words after the provider.
    pub options: Vec<OptionWord>,
    /// The column just past the last word.
    pub end_column: usize,
}

/// A statement of a class: its name and the command its parser made.
#[derive(Clone, Debug)]
pub struct GeomStatement {
    /// The class that parsed it and carries it out.
    pub class: &'static str,
    /// What to do.
    pub command: Arc<dyn Command>,
}

impl PartialEq for GeomStatement {
    fn eq(&self, other: &GeomStatement) -> bool {
        self.class == other.class && self.command.eq_any(other.command.as_any())
    }
}

impl Eq for GeomStatement {}

impl GeomStatement {
    /// The command as its concrete type, if it is one.
    pub fn downcast<T: 'static>(&self) -> Option<&T> {
        self.command.as_any().downcast_ref()
    }
}

/// One configuration statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Statement {
    /// A class's statement (`md create …`, `mirror insert …`, …).
    Geom(GeomStatement),
    /// `export PROTOCOL NAME PROVIDER [OPTIONS...]`.
    Export(ExportStatement),
    /// `net dhcp` or `net static ADDR/PREFIX [gw ADDR]`.
    Net(NetConfig),
}

impl Statement {
    /// The class whose code carries the statement out, or `None` for
    /// statements the service handles (export, net).
    pub fn class(&self) -> Option<&'static str> {
        match self {
            Statement::Geom(g) => Some(g.class),
            _ => None,
        }
    }

    /// The provider the statement creates, if any.
    pub fn creates(&self) -> Option<String> {
        match self {
            Statement::Geom(g) => g.command.creates().map(|(p, _)| p),
            _ => None,
        }
    }
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
            .any(|l| matches!(l.stmt, Statement::Export(_)))
    }

    /// The export statements, in file order.
    pub fn exports(&self) -> impl Iterator<Item = (usize, &ExportStatement)> {
        self.lines.iter().filter_map(|l| match &l.stmt {
            Statement::Export(e) => Some((l.line, e)),
            _ => None,
        })
    }
}

fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut out {
        *o = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn export(args: &mut Args<'_>) -> Result<Statement, ConfigError> {
    let proto = args.next("a protocol ('nbd')")?;
    let name = args.next("export name")?;
    let provider = args.name("provider name")?;
    let options = args
        .rest()
        .into_iter()
        .map(|w| OptionWord {
            text: w.text.to_string(),
            column: w.column,
        })
        .collect();
    Ok(Statement::Export(ExportStatement {
        protocol: proto.text.to_string(),
        protocol_column: proto.column,
        name: name.text.to_string(),
        name_column: name.column,
        provider,
        options,
        end_column: args.end_column(),
    }))
}

fn net(args: &mut Args<'_>) -> Result<Statement, ConfigError> {
    let mode = args.next("'dhcp' or 'static'")?;
    let net = match mode.text {
        "dhcp" => NetConfig::Dhcp,
        "static" => {
            let a = args.next("ADDRESS/PREFIX")?;
            let (addr, prefix) = a
                .text
                .split_once('/')
                .and_then(|(ip, p)| {
                    Some((parse_ipv4(ip)?, p.parse::<u8>().ok().filter(|p| *p <= 32)?))
                })
                .ok_or_else(|| {
                    args.err(
                        a.column,
                        format!("'{}' is not ADDRESS/PREFIX like 10.0.2.15/24", a.text),
                    )
                })?;
            let mut gateway = None;
            if let Some(w) = args.peek() {
                if w.text != "gw" {
                    return Err(
                        args.err(w.column, format!("unexpected '{}' (expected gw)", w.text))
                    );
                }
                args.next("gw")?;
                let g = args.next("a gateway address")?;
                gateway = Some(parse_ipv4(g.text).ok_or_else(|| {
                    args.err(g.column, format!("'{}' is not an IPv4 address", g.text))
                })?);
            }
            NetConfig::Static {
                addr,
                prefix,
                gateway,
            }
        }
        t => {
            return Err(args.err(
                mode.column,
                format!("unknown net mode '{t}' (expected dhcp or static)"),
            ))
        }
    };
    args.finish()?;
    Ok(Statement::Net(net))
}

/// The statements a line may start with, for the error on an unknown one.
fn known_statements() -> String {
    let mut out = String::new();
    for c in class::CLASSES {
        out.push_str(c.name());
        out.push_str(", ");
    }
    out.push_str("export or net");
    out
}

/// Parses one line (`line` is its number, from 1, for errors); `None`
/// for a blank or comment line. The management endpoint feeds live lines
/// through this.
pub fn parse_line(text: &str, line: usize) -> Result<Option<Statement>, ConfigError> {
    let Some((first, mut args)) = Args::new(text, line) else {
        return Ok(None);
    };
    let stmt = match first.text {
        "export" => export(&mut args)?,
        "net" => net(&mut args)?,
        name => match class::find(name) {
            Some(c) => Statement::Geom(GeomStatement {
                class: c.name(),
                command: c.parse(&mut args)?,
            }),
            None => {
                return Err(args.err(
                    first.column,
                    format!(
                        "unknown statement '{name}' (expected {})",
                        known_statements()
                    ),
                ))
            }
        },
    };
    Ok(Some(stmt))
}

/// Parses a configuration file. Besides syntax it checks that the file
/// does not define the same provider twice (that two `export` lines do
/// not serve the same name is for the protocols to say: an iSCSI target
/// spans several lines, one per LUN).
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    let mut providers: Vec<(String, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let Some(stmt) = parse_line(raw, i + 1)? else {
            continue;
        };
        let defined = match &stmt {
            Statement::Export(_) | Statement::Net(_) => None,
            Statement::Geom(g) => {
                if let Some(gone) = g.command.destroys() {
                    providers.retain(|(n, _)| *n != gone);
                }
                g.command.creates()
            }
        };
        if let Some((name, word)) = defined {
            if let Some((_, first)) = providers.iter().find(|(n, _)| *n == name) {
                let column = args::words(raw)
                    .iter()
                    .skip(2)
                    .find(|w| w.text == word)
                    .map_or(1, |w| w.column);
                return Err(ConfigError {
                    line: i + 1,
                    column,
                    message: format!("provider '{name}' is already defined on line {first}"),
                });
            }
            providers.push((name, i + 1));
        }
        cfg.lines.push(Line { line: i + 1, stmt });
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_statement() {
        let cfg = parse(
            "# test\n\nmd create -s 256m md0\nexport nbd vol vtbd0   # main\nexport nbd scratch md0 ro\nnet static 10.0.2.15/24 gw 10.0.2.2\n",
        )
        .unwrap();
        assert_eq!(cfg.lines.len(), 4);
        assert_eq!(cfg.lines[0].line, 3);
        let Statement::Geom(md) = &cfg.lines[0].stmt else {
            panic!("{:?}", cfg.lines[0])
        };
        assert_eq!(
            md.downcast::<crate::class::md::MdCreate>(),
            Some(&crate::class::md::MdCreate {
                name: "md0".into(),
                size_bytes: 256 << 20
            })
        );
        let Statement::Export(e) = &cfg.lines[2].stmt else {
            panic!("{:?}", cfg.lines[2])
        };
        assert_eq!(
            (e.protocol.as_str(), e.name.as_str(), e.provider.as_str()),
            ("nbd", "scratch", "md0")
        );
        assert_eq!(
            e.options,
            [OptionWord {
                text: "ro".into(),
                column: 24
            }]
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
        // Export names are the protocols' to check (the service's
        // parse_config does).
        assert!(parse("export nbd a md0\nexport nbd a md1").is_ok());
        assert_eq!(err("net static 10.0.2/24").1, 12);
        assert_eq!(err("export nbd").1, 11);
    }

    #[test]
    fn display_has_line_and_column() {
        let e = parse("bogus").unwrap_err();
        assert_eq!(
            alloc::format!("{e}"),
            alloc::format!(
                "line 1, column 1: unknown statement 'bogus' (expected {})",
                known_statements()
            )
        );
        assert!(
            known_statements().starts_with("md, nop, concat, stripe, mirror"),
            "{}",
            known_statements()
        );
    }

    #[test]
    fn blank_and_comment_lines_are_nothing() {
        assert_eq!(parse_line("  # nothing", 4), Ok(None));
        assert_eq!(parse_line("", 1), Ok(None));
        let Some(Statement::Export(_)) = parse_line("export nbd a b", 1).unwrap() else {
            panic!()
        };
        assert_eq!(
            parse_line("export nbd a b", 1).unwrap().unwrap().class(),
            None
        );
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
