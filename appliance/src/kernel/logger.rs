//! The `log` crate's backend: lines on the serial console, stamped with
//! the time since boot, `[   0.012345] INFO message`.
//!
//! The level comes from the command line (`loglevel=error|warn|info|debug|
//! trace`, default `info`).

use core::fmt::Write;
use log::{LevelFilter, Log, Metadata, Record};

use super::serial::console_write;
use super::time;

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = time::now_ns();
        let secs = ns / 1_000_000_000;
        let micros = (ns % 1_000_000_000) / 1000;
        // Format into a buffer first: one console write per line keeps
        // lines whole.
        let mut line = LineBuf::new();
        let _ = writeln!(
            line,
            "[{secs:4}.{micros:06}] {} {}",
            record.level(),
            record.args()
        );
        console_write(line.as_str());
    }

    fn flush(&self) {}
}

/// A stack buffer for one log line; longer lines are cut at 1 KiB.
struct LineBuf {
    buf: [u8; 1024],
    len: usize,
}

impl LineBuf {
    fn new() -> Self {
        LineBuf {
            buf: [0; 1024],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s (or a cut at a char boundary) are copied in.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() && self.len > 0 {
            // Keep the newline of a cut line.
            self.buf[self.len - 1] = b'\n';
        }
        Ok(())
    }
}

/// The level asked for on the command line (`loglevel=...`), or `Info`.
pub fn level_from_cmdline(cmdline: &str) -> LevelFilter {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("loglevel="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(LevelFilter::Info)
}

/// Installs the logger with `level`. Later calls only change the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
