//! Strata's platforms and the service they share.
//!
//! - [`service`]: config → stack → exports, and the connections' engines;
//!   the same on every platform;
//! - [`smol`]: smoltcp sockets as the connections' transport (the
//!   unikernel's, and host-side benchmarks');
//! - `kernel` (x86_64-unknown-none): the unikernel platform — PVH boot,
//!   memory, time, interrupts, the event loop over virtio and smoltcp;
//! - `hosted` (Linux): the same service as a process, files as disks.
//!
//! `unsafe` is denied at the root and allowed only in the two platform
//! modules; the service, which both platforms run, forbids it, and so
//! does [`smol`].
#![cfg_attr(target_os = "none", no_std)]
#![deny(unsafe_code)]
extern crate alloc;

pub mod service;
pub mod smol;

#[cfg(not(target_os = "none"))]
#[allow(
    unsafe_code,
    reason = "system calls on page addresses, signals, poll(2)"
)]
pub mod hosted;

#[cfg(target_os = "none")]
#[allow(
    unsafe_code,
    reason = "the unikernel platform: boot, memory, interrupts, devices"
)]
pub mod kernel;
