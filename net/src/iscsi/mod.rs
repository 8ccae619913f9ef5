//! A sans-I/O iSCSI target (RFC 7143) with its SCSI layer (SPC-4, SBC-3):
//! bytes in, bytes out, bios out to the caller, completions back in, as
//! [`crate::nbd`] does for NBD.
//!
//! - [`Connection`]: one connection's engine, a [`crate::session::Session`];
//! - [`pdu`]: the PDU formats;
//! - [`text`]: login and text keys, and the negotiated parameters;
//! - [`scsi`]: the SCSI command layer, one task per command, from the CDB
//!   to the status, sense and data it answers with.

mod engine;
#[cfg(test)]
mod fuzz_tests;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod pdu;
pub mod scsi;
pub mod text;

pub use engine::{restore_unit, Config, Connection, LOGIN_TIMEOUT_MS};
