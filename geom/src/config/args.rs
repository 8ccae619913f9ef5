//! The shared tokenizer of config lines, and the cursor every class reads
//! its words with, so that every error names its line and column the same
//! way.

use super::ConfigError;
use crate::bio::BioError;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// A word of a line with its 1-based column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Word<'a> {
    /// The word.
    pub text: &'a str,
    /// Its first character's column, from 1.
    pub column: usize,
}

/// The words of a line, up to a `#` comment.
pub fn words(line: &str) -> Vec<Word<'_>> {
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

/// Parses an error name (`EIO`, `ENXIO`, …) or errno number into a bio error.
pub fn parse_error(s: &str) -> Option<BioError> {
    Some(match s.to_ascii_uppercase().as_str() {
        "EIO" | "5" => BioError::Io,
        "ENXIO" | "6" => BioError::Orphaned,
        "EINVAL" | "22" => BioError::Invalid,
        "ENOSPC" | "28" => BioError::NoSpace,
        "EPERM" | "1" => BioError::Access,
        "ENOMEM" | "12" => BioError::NoMemory,
        "EOPNOTSUPP" | "ENOTSUP" | "95" => BioError::NotSupported,
        _ => return None,
    })
}

/// True for a valid geom, provider or export name: 1 to 64 of
/// `[A-Za-z0-9._/-]`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

/// The words of one line after its first, as a cursor with helpers for
/// the shapes config lines take (names, sizes, percentages, provider
/// lists); every error carries the line and the column of the word at
/// fault, or of the end of the line when a word is missing.
pub struct Args<'a> {
    line: usize,
    words: Vec<Word<'a>>,
    pos: usize,
    end_column: usize,
}

impl<'a> Args<'a> {
    /// The cursor over `text`, line number `line`, positioned after the
    /// first word; `None` for a blank or comment line.
    pub(crate) fn new(text: &'a str, line: usize) -> Option<(Word<'a>, Args<'a>)> {
        let ws = words(text);
        let first = *ws.first()?;
        let end_column = text
            .split('#')
            .next()
            .unwrap_or("")
            .trim_end()
            .chars()
            .count()
            + 1;
        Some((
            first,
            Args {
                line,
                words: ws,
                pos: 1,
                end_column,
            },
        ))
    }

    /// An error at `column` of this line.
    pub fn err(&self, column: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            line: self.line,
            column,
            message: message.into(),
        }
    }

    /// The column just past the last word (where a missing word goes).
    pub fn end_column(&self) -> usize {
        self.end_column
    }

    /// The column of the word read last.
    pub fn last_column(&self) -> usize {
        self.words
            .get(self.pos.saturating_sub(1))
            .map_or(self.end_column, |w| w.column)
    }

    /// The next word, without taking it.
    pub fn peek(&self) -> Option<Word<'a>> {
        self.words.get(self.pos).copied()
    }

    /// Takes the next word if it is an option (starts with `-`).
    pub fn option(&mut self) -> Option<Word<'a>> {
        let w = self.peek().filter(|w| w.text.starts_with('-'))?;
        self.pos += 1;
        Some(w)
    }

    /// Takes the next word, or fails with "expected `what`".
    pub fn next(&mut self, what: &str) -> Result<Word<'a>, ConfigError> {
        let w = self
            .peek()
            .ok_or_else(|| self.err(self.end_column, format!("expected {what}")))?;
        self.pos += 1;
        Ok(w)
    }

    /// Puts the word taken last back.
    pub fn back(&mut self) {
        self.pos = self.pos.saturating_sub(1).max(1);
    }

    /// Takes a name (see [`is_name`]); `what` says what it names.
    pub fn name(&mut self, what: &str) -> Result<String, ConfigError> {
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

    /// A name that also cannot contain `/` (a geom of `class`, whose
    /// provider is `class/NAME`).
    pub fn geom_name(&mut self, class: &str) -> Result<String, ConfigError> {
        let name = self.name(&format!("{class} name"))?;
        if name.contains('/') {
            return Err(self.err(
                self.last_column(),
                format!("a {class} name cannot contain '/'"),
            ));
        }
        Ok(name)
    }

    /// Fails on any word left.
    pub fn finish(&self) -> Result<(), ConfigError> {
        match self.peek() {
            Some(w) => Err(self.err(w.column, format!("unexpected '{}'", w.text))),
            None => Ok(()),
        }
    }

    /// The rest of the line as `at_least` or more provider names, each
    /// named once.
    pub fn providers(&mut self, at_least: usize) -> Result<Vec<String>, ConfigError> {
        let mut out: Vec<String> = Vec::new();
        while let Some(w) = self.peek() {
            if out.iter().any(|p| p == w.text) {
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

    /// The value of option `flag` as a percentage, 0 to 100.
    pub fn percent(&mut self, flag: &str) -> Result<u8, ConfigError> {
        let v = self.next(&format!("a percentage after {flag}"))?;
        v.text
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| self.err(v.column, format!("'{}' is not a percentage 0-100", v.text)))
    }

    /// The value of option `flag` as a number (decimal, or hex with `0x`).
    pub fn number(&mut self, flag: &str) -> Result<u64, ConfigError> {
        let v = self.next(&format!("a number after {flag}"))?;
        let t = v.text;
        let parsed = match t.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => t.parse::<u64>().ok(),
        };
        parsed.ok_or_else(|| self.err(v.column, format!("'{t}' is not a number")))
    }

    /// The value of option `flag` as a size (see [`parse_size`]); `what`
    /// says what it sizes.
    pub fn size(&mut self, what: &str) -> Result<(u64, usize), ConfigError> {
        let v = self.next(what)?;
        let n = parse_size(v.text).map_err(|m| self.err(v.column, m))?;
        Ok((n, v.column))
    }

    /// The value of option `flag` as an error name or number.
    pub fn error(&mut self, flag: &str) -> Result<BioError, ConfigError> {
        let v = self.next(&format!("an error after {flag} (EIO, ENXIO, ...)"))?;
        parse_error(v.text).ok_or_else(|| {
            self.err(
                v.column,
                format!(
                    "unknown error '{}' (expected EIO, ENXIO, EINVAL, ENOSPC, EPERM, ENOMEM or EOPNOTSUPP)",
                    v.text
                ),
            )
        })
    }

    /// The rest of the line's words, taken.
    pub fn rest(&mut self) -> Vec<Word<'a>> {
        let out = self.words[self.pos.min(self.words.len())..].to_vec();
        self.pos = self.words.len();
        out
    }
}
