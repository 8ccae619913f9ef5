//! Strata's platforms and the service they share.
//!
//! - [`service`]: config → stack → exports, and the connections' engines;
//!   the same on every platform;
//! - `kernel` (x86_64-unknown-none): the unikernel platform — PVH boot,
//!   memory, time, interrupts, the event loop over virtio and smoltcp;
//! - `hosted` (Linux): the same service as a process, files as disks.
#![cfg_attr(target_os = "none", no_std)]
extern crate alloc;

pub mod service;

#[cfg(not(target_os = "none"))]
pub mod hosted;

#[cfg(target_os = "none")]
pub mod kernel;
