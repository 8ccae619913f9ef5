//! Byte sizes written the way people type them: `512`, `64K`, `256M`, `1G`.

use std::fmt;

/// Why a size string was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// The text is empty.
    Empty,
    /// The number part is missing or not a decimal number.
    NotANumber(String),
    /// The unit is not one of K, M, G, T (optionally followed by `iB` or `B`).
    BadUnit(String),
    /// The value does not fit in 64 bits.
    TooLarge(String),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Empty => write!(f, "empty size"),
            SizeError::NotANumber(s) => {
                write!(f, "'{s}' is not a size (use e.g. 512, 64K, 256M, 1G)")
            }
            SizeError::BadUnit(s) => {
                write!(f, "'{s}' has an unknown unit (use K, M, G or T)")
            }
            SizeError::TooLarge(s) => write!(f, "size '{s}' is too large"),
        }
    }
}

impl std::error::Error for SizeError {}

/// Parses a size in bytes: a decimal number with an optional binary unit
/// `K`, `M`, `G` or `T` (case-insensitive, 1K = 1024), which may be
/// followed by `iB` or `B` (`64MiB`, `64MB` and `64M` are the same).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NotANumber(text.to_string()));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::BadUnit(text.to_string())),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::TooLarge(text.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

/// Formats a byte count with the largest binary unit that divides it
/// exactly (`268435456` → `256M`), for messages.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4096B"), Ok(4096));
    }

    #[test]
    fn binary_units_any_case() {
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert_eq!(parse_size(" 1G "), Ok(1 << 30));
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("M"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::BadUnit(_))));
        assert!(matches!(parse_size("10X"), Err(SizeError::BadUnit(_))));
        assert!(matches!(parse_size("1 G"), Err(SizeError::BadUnit(_))));
    }

    #[test]
    fn refuses_overflow() {
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("16777216T"),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_exact_units() {
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
    }
}
