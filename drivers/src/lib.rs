//! Device drivers over virtio-drivers: PCI discovery, virtio-blk with
//! scatter-gather and queue depth, virtio-net for smoltcp, virtio-mmio
//! discovery for `-machine microvm`.
//!
//! - [`hal`]: the `Hal` for the identity-mapped kernel;
//! - [`pci`]: configuration ports, bus scan, virtio PCI transports;
//! - [`mmio`]: virtio-mmio probing and the microvm window;
//! - [`virtio`]: feature negotiation shared by the drivers;
//! - [`virtio_blk`]: the block driver (implements `geom::disk::BlockDevice`);
//! - [`virtio_net`]: the network driver (implements `smoltcp::phy::Device`);
//! - [`virtio_rng`]: the entropy driver (a bounded, polled read at boot);
//! - [`probe`] ([`probe_all`]): finds and starts every disk, NIC and
//!   entropy device, in stable order.
//!
//! `unsafe` is denied at the root and allowed only in the modules that
//! touch hardware or hand memory to devices: `hal`, `pci`, `mmio`,
//! `probe`, and the queue glue of `virtio_blk`, `virtio_net` and
//! `virtio_rng`.
#![no_std]
#![deny(unsafe_code)]
extern crate alloc;
#[cfg(test)]
extern crate std;

#[cfg(any(test, feature = "fake"))]
#[allow(
    unsafe_code,
    reason = "the fake device reads and writes guest memory by address"
)]
pub mod fake;
#[allow(unsafe_code, reason = "DMA addresses for virtio-drivers")]
pub mod hal;
#[allow(unsafe_code, reason = "MMIO register access")]
pub mod mmio;
#[allow(unsafe_code, reason = "configuration port I/O and BAR mapping")]
pub mod pci;
#[allow(unsafe_code, reason = "probing hardware and acknowledging interrupts")]
pub mod probe;
pub mod virtio;
#[allow(unsafe_code, reason = "descriptor chains over lent pages")]
pub mod virtio_blk;
#[allow(unsafe_code, reason = "descriptor chains over the NIC's buffers")]
pub mod virtio_net;
#[allow(unsafe_code, reason = "a descriptor over the entropy buffer")]
pub mod virtio_rng;

pub use probe::*;
