//! The configuration language: geom(8)-style lines that build the stack
//! and name what is exported.
//!
//! ```text
//! # comment
//! md create -s 256m md0            # a 256 MiB memory disk, provider md0
//! export nbd vol vtbd0             # serve vtbd0 over NBD as export "vol"
//! export nbd scratch md0 ro        # read-only export
//! net static 10.0.2.15/24 gw 10.0.2.2
//! net dhcp
//! ```
//!
//! Parsing checks syntax and names that the file itself defines; whether a
//! provider such as `vtbd3` exists is known only when the stack is built,
//! and that error also carries the line it came from.

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
            "export" => self.export(),
            "net" => self.net(),
            other => Err(self.err(
                verb.column,
                format!("unknown statement '{other}' (expected md, export or net)"),
            )),
        }
    }

    fn md(&mut self) -> Result<Statement, ConfigError> {
        let verb = self.next("'create'")?;
        if verb.text != "create" {
            return Err(self.err(
                verb.column,
                format!("unknown md verb '{}' (expected create)", verb.text),
            ));
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

/// Parses a configuration file.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    let mut md_names: Vec<(String, usize)> = Vec::new();
    let mut export_names: Vec<(String, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let ws = words(raw);
        if ws.is_empty() {
            continue;
        }
        let end_column = raw
            .split('#')
            .next()
            .unwrap_or("")
            .trim_end()
            .chars()
            .count()
            + 1;
        let mut p = LineParser {
            line: i + 1,
            words: ws,
            pos: 0,
            end_column,
        };
        let stmt = p.statement()?;
        let (names, name, what) = match &stmt {
            Statement::MdCreate { name, .. } => (&mut md_names, name, "provider"),
            Statement::ExportNbd { name, .. } => (&mut export_names, name, "export"),
            Statement::Net(_) => {
                cfg.lines.push(Line { line: i + 1, stmt });
                continue;
            }
        };
        if let Some((_, first)) = names.iter().find(|(n, _)| n == name) {
            let column = p
                .words
                .iter()
                .find(|w| w.text == name)
                .map_or(1, |w| w.column);
            return Err(p.err(
                column,
                format!("{what} '{name}' is already defined on line {first}"),
            ));
        }
        names.push((name.clone(), i + 1));
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
            "line 1, column 1: unknown statement 'bogus' (expected md, export or net)"
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
