//! The appliance's machine-readable console lines.
//!
//! ```text
//! strata: boot
//! strata: export NAME size BYTES
//! strata: listening nbd PORT http PORT
//! strata: config error: line L, column C: MESSAGE
//! strata: fatal: MESSAGE
//! ```
//!
//! Every other line is ordinary console output. A line may carry the
//! kernel logger's prefix, `[   0.012345] INFO strata: boot`; a panic line
//! `strata: PANIC at FILE:LINE:COL: MESSAGE` and an exception report's
//! first line `strata: EXCEPTION NAME (vector N) error_code=E` count as
//! fatal.

use std::collections::VecDeque;

/// One console line, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// The kernel is running (its first line).
    Boot,
    /// An export the appliance serves (`strata: export NAME size BYTES
    /// [protocol NAME]`).
    Export {
        /// Export name.
        name: String,
        /// Size in bytes.
        size_bytes: u64,
        /// The protocol serving it (`nbd` when the line does not say).
        protocol: String,
    },
    /// The servers accept connections on these guest ports
    /// (`strata: listening NAME PORT...`, NBD and HTTP always among them).
    Listening {
        /// Guest NBD port.
        nbd_port: u16,
        /// Guest HTTP port.
        http_port: u16,
        /// Every protocol and guest port, in the line's order.
        ports: Vec<(String, u16)>,
    },
    /// The configuration was refused; the text after `config error: `.
    ConfigError(String),
    /// The appliance failed; the text after `fatal: `.
    Fatal(String),
    /// Any other line.
    Other,
}

/// Log levels the kernel logger writes after its time stamp.
const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];

/// The line without a logger prefix (`[ time] LEVEL `), if it has one.
fn strip_log_prefix(line: &str) -> &str {
    let Some(after) = line
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map(|(_, r)| r.trim_start())
    else {
        return line;
    };
    LEVELS
        .iter()
        .find_map(|l| after.strip_prefix(l)?.strip_prefix(' '))
        .unwrap_or(after)
}

/// Classifies one console line (without its line ending).
pub fn parse_line(line: &str) -> ConsoleEvent {
    let Some(rest) = strip_log_prefix(line.trim_end()).strip_prefix("strata: ") else {
        return ConsoleEvent::Other;
    };
    if rest == "boot" || rest.starts_with("boot ") {
        return ConsoleEvent::Boot;
    }
    if let Some(msg) = rest.strip_prefix("config error: ") {
        return ConsoleEvent::ConfigError(msg.to_string());
    }
    if let Some(msg) = rest.strip_prefix("fatal: ") {
        return ConsoleEvent::Fatal(msg.to_string());
    }
    if rest.starts_with("PANIC") || rest.starts_with("EXCEPTION ") {
        return ConsoleEvent::Fatal(rest.to_string());
    }
    let w: Vec<&str> = rest.split_ascii_whitespace().collect();
    match w.as_slice() {
        ["export", name, "size", bytes, rest @ ..] => {
            let protocol = match rest {
                [] => "nbd",
                ["protocol", p] => p,
                _ => return ConsoleEvent::Other,
            };
            match bytes.parse() {
                Ok(size_bytes) => ConsoleEvent::Export {
                    name: name.to_string(),
                    size_bytes,
                    protocol: protocol.to_string(),
                },
                Err(_) => ConsoleEvent::Other,
            }
        }
        ["listening", pairs @ ..] if !pairs.is_empty() && pairs.len().is_multiple_of(2) => {
            let ports: Option<Vec<(String, u16)>> = pairs
                .chunks_exact(2)
                .map(|p| Some((p[0].to_string(), p[1].parse().ok()?)))
                .collect();
            let Some(ports) = ports else {
                return ConsoleEvent::Other;
            };
            let port = |name: &str| ports.iter().find(|(n, _)| n == name).map(|p| p.1);
            match (port("nbd"), port("http")) {
                (Some(nbd_port), Some(http_port)) => ConsoleEvent::Listening {
                    nbd_port,
                    http_port,
                    ports,
                },
                _ => ConsoleEvent::Other,
            }
        }
        _ => ConsoleEvent::Other,
    }
}

/// The last lines of the console, kept to explain a failure.
#[derive(Clone, Debug)]
pub struct Tail {
    lines: VecDeque<String>,
    keep: usize,
}

impl Tail {
    /// A tail that keeps the last `keep` lines.
    pub fn new(keep: usize) -> Tail {
        Tail {
            lines: VecDeque::with_capacity(keep),
            keep,
        }
    }

    /// Adds a line, dropping the oldest when full.
    pub fn push(&mut self, line: &str) {
        if self.lines.len() == self.keep {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_string());
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(String::as_str)
    }

    /// True when no line was kept.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// Splits raw console bytes into lines: `\n` ends a line, a `\r` before it
/// is dropped, and bytes that are not UTF-8 are replaced.
pub fn clean_line(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    String::from_utf8_lossy(raw).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_machine_lines() {
        assert_eq!(parse_line("strata: boot"), ConsoleEvent::Boot);
        assert_eq!(parse_line("strata: boot 0.1.0\r"), ConsoleEvent::Boot);
        assert_eq!(
            parse_line("strata: export vol size 268435456"),
            ConsoleEvent::Export {
                name: "vol".into(),
                size_bytes: 268435456,
                protocol: "nbd".into(),
            }
        );
        assert_eq!(
            parse_line("strata: export iqn.2026-12.org.strata:d/3 size 512 protocol iscsi"),
            ConsoleEvent::Export {
                name: "iqn.2026-12.org.strata:d/3".into(),
                size_bytes: 512,
                protocol: "iscsi".into(),
            }
        );
        assert_eq!(
            parse_line("strata: export vol size 512 protocol"),
            ConsoleEvent::Other
        );
        assert_eq!(
            parse_line("strata: listening nbd 10809 http 8080"),
            ConsoleEvent::Listening {
                nbd_port: 10809,
                http_port: 8080,
                ports: vec![("nbd".into(), 10809), ("http".into(), 8080)],
            }
        );
        assert_eq!(
            parse_line("strata: listening nbd 10809 http 8080 iscsi 3260"),
            ConsoleEvent::Listening {
                nbd_port: 10809,
                http_port: 8080,
                ports: vec![
                    ("nbd".into(), 10809),
                    ("http".into(), 8080),
                    ("iscsi".into(), 3260)
                ],
            }
        );
        // Any order; NBD and HTTP must be there, every port a number.
        assert!(matches!(
            parse_line("strata: listening iscsi 3260 http 8080 nbd 1"),
            ConsoleEvent::Listening {
                nbd_port: 1,
                http_port: 8080,
                ..
            }
        ));
        for bad in [
            "strata: listening",
            "strata: listening nbd 10809",
            "strata: listening nbd 10809 iscsi 3260",
            "strata: listening nbd 10809 http",
            "strata: listening nbd 10809 http 8080 iscsi x",
            "strata: listening nbd 10809 http 80800",
        ] {
            assert_eq!(parse_line(bad), ConsoleEvent::Other, "{bad}");
        }
        assert_eq!(
            parse_line("strata: config error: line 3, column 5: unknown word 'mdd'"),
            ConsoleEvent::ConfigError("line 3, column 5: unknown word 'mdd'".into())
        );
        assert_eq!(
            parse_line("strata: fatal: panicked at src/x.rs:1:1: oops"),
            ConsoleEvent::Fatal("panicked at src/x.rs:1:1: oops".into())
        );
    }

    #[test]
    fn accepts_logger_prefix() {
        assert_eq!(
            parse_line("[   0.000000] INFO strata: boot"),
            ConsoleEvent::Boot
        );
        assert_eq!(
            parse_line("[  12.345678] WARN strata: listening nbd 10809 http 8080"),
            ConsoleEvent::Listening {
                nbd_port: 10809,
                http_port: 8080,
                ports: vec![("nbd".into(), 10809), ("http".into(), 8080)],
            }
        );
        assert_eq!(
            parse_line("[   0.5] ERROR strata: config error: line 1, column 1: x"),
            ConsoleEvent::ConfigError("line 1, column 1: x".into())
        );
        assert_eq!(
            parse_line("[   0.000000] INFO memory: 511 MiB"),
            ConsoleEvent::Other
        );
        assert_eq!(parse_line("[ 0.1] strata: boot"), ConsoleEvent::Boot);
    }

    #[test]
    fn panic_is_fatal() {
        assert_eq!(
            parse_line("strata: PANIC at src/main.rs:3:5: oops"),
            ConsoleEvent::Fatal("PANIC at src/main.rs:3:5: oops".into())
        );
    }

    #[test]
    fn exception_is_fatal() {
        assert_eq!(
            parse_line("strata: EXCEPTION invalid opcode (#UD) (vector 6) error_code=0x0"),
            ConsoleEvent::Fatal("EXCEPTION invalid opcode (#UD) (vector 6) error_code=0x0".into())
        );
    }

    #[test]
    fn other_lines() {
        for l in [
            "",
            "hello",
            "strata: booting",
            "strata: export vol size many",
            "strata: listening nbd x http 8080",
            "strata: export vol",
            "xstrata: boot",
            "strata: EXCEPTIONAL",
        ] {
            assert_eq!(parse_line(l), ConsoleEvent::Other, "{l:?}");
        }
    }

    #[test]
    fn tail_keeps_last() {
        let mut t = Tail::new(2);
        assert!(t.is_empty());
        for l in ["a", "b", "c"] {
            t.push(l);
        }
        assert_eq!(t.lines().collect::<Vec<_>>(), ["b", "c"]);
    }

    #[test]
    fn cleans_line_endings() {
        assert_eq!(clean_line(b"abc\r\n"), "abc");
        assert_eq!(clean_line(b"abc\n"), "abc");
        assert_eq!(clean_line(b"abc"), "abc");
        assert_eq!(clean_line(b"a\xffb\n"), "a\u{fffd}b");
    }
}
