//! The host tool's library: sizes, disk specs, QEMU command lines, the
//! NBD readiness probe, console lines, and the supervised QEMU run.
//!
//! - [`backlog`]: a deeper accept queue for QEMU's forwarded ports;
//! - [`size`]: `64M`, `1G`, … as bytes;
//! - [`disk`]: `PATH[,size=SIZE]` and sparse disk files;
//! - [`qemu`]: the QEMU command line as a typed value; exit statuses;
//! - [`probe`]: the NBD handshake that proves the appliance listens;
//! - [`console`]: the appliance's machine-readable console lines;
//! - [`http`]: the HTTP/1.1 client for the management endpoint;
//! - [`control`]: `POST /shutdown` and QMP `quit`;
//! - [`mgmt`]: `strata geom`, `geom list` and `gstat` over the management endpoint;
//! - [`fault`]: `strata fault`, the fault campaign;
//! - [`kernel`]: building the appliance kernel;
//! - [`memfile`]: the configuration as a sealed in-memory file;
//! - [`runner`]: starting, following and stopping QEMU;
//! - [`tempdir`]: a scratch directory per run.

pub mod backlog;
pub mod console;
pub mod control;
pub mod disk;
pub mod fault;
pub mod http;
pub mod kernel;
pub mod memfile;
pub mod mgmt;
pub mod probe;
pub mod qemu;
pub mod runner;
pub mod size;
pub mod tempdir;
pub mod token;
