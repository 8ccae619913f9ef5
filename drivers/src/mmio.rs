//! virtio-mmio discovery (virtio 1.2 §4.2), for QEMU's `-machine microvm`.
//!
//! microvm has no PCI (unless `pcie=on`); it creates a row of virtio-mmio
//! transports at 0xfeb0_0000, 512 bytes apart (`VIRTIO_MMIO_BASE` in
//! QEMU's include/hw/i386/microvm.h). QEMU 7.2's hw/i386/microvm.c wires
//! them as follows: with the second I/O APIC (`ioapic2`, on by default)
//! there are 24 transports on GSI 24..47; without it 8, on GSI 16..23
//! when ACPI is on and on GSI 5..12 when it is off. Empty transports
//! answer with the magic value and device id 0. QEMU plugs
//! `-device virtio-*-device` into the highest free transport first, so
//! devices given in command-line order sit at descending addresses;
//! [`scan_microvm`] returns them in that (command-line) order so disk
//! names are stable. QEMU's virtio-mmio defaults to the legacy interface
//! (version 1, `force-legacy=on`); both versions work.

use alloc::vec::Vec;
use core::ptr::NonNull;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};

/// "virt" in little endian (virtio 1.2 §4.2.2).
pub const MAGIC: u32 = 0x7472_6976;
/// First virtio-mmio transport on microvm.
pub const MICROVM_BASE: usize = 0xfeb0_0000;
/// Spacing and size of the transports.
pub const MICROVM_STRIDE: usize = 0x200;
/// Most transports microvm creates (with the second IOAPIC).
pub const MICROVM_SLOTS: usize = 24;

/// One virtio-mmio device found by a probe.
pub struct MmioDevice {
    /// Physical base of its register block.
    pub base: usize,
    /// GSI its interrupt is wired to, when known.
    pub irq: Option<u32>,
    /// Device type.
    pub device_type: DeviceType,
    /// The transport.
    pub transport: MmioTransport<'static>,
}

fn read32(addr: usize) -> u32 {
    // SAFETY: callers of the probes promise `addr` is inside a mapped
    // virtio-mmio register block; register reads have no side effects.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Builds a transport for the virtio-mmio block at `base` of `size` bytes,
/// or `None` when there is no device there (bad magic, device id 0, or an
/// unsupported version).
///
/// # Safety
///
/// `[base, base + size)` must be mapped 1:1, be a virtio-mmio register
/// block (or read harmlessly), and be used by nothing else for the rest of
/// the program.
pub unsafe fn probe(base: usize, size: usize) -> Option<MmioTransport<'static>> {
    if read32(base) != MAGIC || read32(base + 8) == 0 {
        return None;
    }
    let header = NonNull::new(base as *mut VirtIOHeader)?;
    // SAFETY: the caller vouches for the region; magic and device id were
    // checked above.
    match unsafe { MmioTransport::new(header, size) } {
        Ok(t) => Some(t),
        Err(e) => {
            log::warn!("virtio-mmio at {base:#x}: {e}");
            None
        }
    }
}

/// GSI of transport `slot`, given how many transports the machine has
/// and whether it has ACPI tables (see the module doc).
pub fn microvm_irq(slot: usize, transports: usize, acpi: bool) -> u32 {
    let base = if transports > 8 {
        24
    } else if acpi {
        16
    } else {
        5
    };
    base + slot as u32
}

/// Finds the virtio-mmio devices of a microvm, in command-line order.
/// `acpi`: the machine has ACPI tables (decides the IRQ numbering).
///
/// # Safety
///
/// Must only run on a machine whose 0xfeb0_0000 window is identity-mapped
/// and holds virtio-mmio transports (QEMU microvm), once.
pub unsafe fn scan_microvm(acpi: bool) -> Vec<MmioDevice> {
    // How many transports exist: those answering with the magic value.
    let transports = (0..MICROVM_SLOTS)
        .take_while(|&n| read32(MICROVM_BASE + n * MICROVM_STRIDE) == MAGIC)
        .count();
    let mut out = Vec::new();
    for slot in (0..transports).rev() {
        let base = MICROVM_BASE + slot * MICROVM_STRIDE;
        // SAFETY: the caller vouches for the window; each slot is probed once.
        if let Some(transport) = unsafe { probe(base, MICROVM_STRIDE) } {
            out.push(MmioDevice {
                base,
                irq: Some(microvm_irq(slot, transports, acpi)),
                device_type: transport.device_type(),
                transport,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_numbering() {
        assert_eq!(microvm_irq(0, 8, false), 5);
        assert_eq!(microvm_irq(7, 8, true), 23);
        assert_eq!(microvm_irq(23, 24, true), 47);
    }

    #[test]
    fn probe_rejects_empty_slots() {
        // A fake register block: magic, version 2, device id 0.
        let mut regs = [0u32; 128];
        regs[0] = MAGIC;
        regs[1] = 2;
        // SAFETY: `regs` is a live local buffer of 512 bytes.
        assert!(unsafe { probe(regs.as_mut_ptr() as usize, 512) }.is_none());
        regs[0] = 0;
        regs[2] = 2;
        // SAFETY: as above.
        assert!(unsafe { probe(regs.as_mut_ptr() as usize, 512) }.is_none());
        regs[0] = MAGIC;
        // SAFETY: as above.
        let t = unsafe { probe(regs.as_mut_ptr() as usize, 512) }.expect("block device");
        assert_eq!(t.device_type(), DeviceType::Block);
    }
}
