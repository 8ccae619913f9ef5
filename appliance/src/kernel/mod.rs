//! The unikernel platform for x86_64 (QEMU/KVM, PVH boot): boot, memory,
//! time, interrupts, console, boot-time self-tests ([`selftest`]), and the
//! appliance itself ([`serve::serve`]).
//!
//! All of the kernel's `unsafe` lives in this module tree. What the rest of
//! the appliance needs is re-exported here:
//!
//! - identity map: RAM and MMIO are mapped at virtual == physical, so a
//!   heap pointer is a DMA address; [`map_mmio`] maps more (64-bit BARs);
//! - memory: the global allocator (page-aligned DMA memory = an allocation
//!   with `Layout` alignment 4096), [`alloc_frames`], [`memory_stats`];
//! - time: [`now_ns`], [`uptime_ms`];
//! - the host's entropy (virtio-rng): [`entropy::host_entropy`];
//! - sleeping: [`idle_wait`], [`enable_irq`], [`enable_pci_intx`],
//!   [`take_pending_irqs`];
//! - console and exit: [`console_write`], [`exit_qemu`].

pub mod acpi;
pub mod apic;
pub mod boot;
pub mod entropy;
pub mod exit;
pub mod fw_cfg;
pub mod gdt;
pub mod interrupts;
pub mod logger;
pub mod mem;
pub mod paging;
pub mod selftest;
pub mod serial;
pub mod serve;
pub mod start_info;
pub mod time;

pub use apic::{IrqError, Polarity, Trigger};
pub use exit::{exit_qemu, EXIT_FAILURE_STATUS, EXIT_SUCCESS_STATUS};
pub use interrupts::{
    disable_irq, enable_irq, enable_pci_intx, idle_wait, irq_stats, take_pending_irqs, IrqStats,
};
pub use mem::{alloc_frames, free_frames, memory_stats, MemoryStats, PAGE_SIZE};
pub use paging::{map_mmio, try_map_mmio, MapError};
pub use serial::console_write;
pub use time::{now_ns, uptime_ms};

use x86_64::instructions::port::Port;

/// The QEMU machine type the kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// `-machine q35`: PCIe, ICH9; PCI INTx on GSI 16–23, ECAM at 0xB000_0000.
    Q35,
    /// `-machine pc` (i440FX) or another PC with a PCI host bridge at 0:0.0.
    Pc,
    /// `-machine microvm`: no PCI host bridge on ports 0xCF8/0xCFC
    /// (devices are virtio-mmio, listed on the command line, or PCIe via
    /// ECAM when `pcie=on`).
    Microvm,
}

impl Machine {
    /// Lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
            Machine::Microvm => "microvm",
        }
    }
}

/// Guesses the machine: `strata.machine=q35|pc|microvm` on the command
/// line wins; otherwise the PCI host bridge at 0:0.0 (read through the
/// configuration ports 0xCF8/0xCFC): 8086:29c0 is q35, any other is a PC,
/// none is microvm.
pub fn detect_machine(cmdline: &str) -> Machine {
    let forced = cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("strata.machine="));
    match forced {
        Some("q35") => return Machine::Q35,
        Some("pc") => return Machine::Pc,
        Some("microvm") => return Machine::Microvm,
        _ => {}
    }
    // SAFETY: the PCI configuration mechanism #1 ports; reading the vendor
    // and device ID of 0:0.0 has no side effect, and on machines without
    // the ports the read returns all ones.
    let id = unsafe {
        Port::<u32>::new(0xCF8).write(0x8000_0000);
        Port::<u32>::new(0xCFC).read()
    };
    match id {
        0x29C0_8086 => Machine::Q35,
        0xFFFF_FFFF | 0 => Machine::Microvm,
        _ => Machine::Pc,
    }
}

/// What the platform hands to [`serve::serve`].
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Kernel command line (QEMU `-append`), empty if none.
    pub cmdline: &'static str,
    /// The appliance configuration text: the bytes of boot module 0
    /// (QEMU `-initrd FILE`), if one was given.
    pub config: Option<&'static [u8]>,
    /// Physical address of the ACPI RSDP (0 if none was found).
    pub rsdp: u64,
    /// Which machine we run on (see [`detect_machine`]).
    pub machine: Machine,
    /// Calibrated TSC frequency in Hz.
    pub tsc_hz: u64,
    /// What the memory map held.
    pub memory: mem::MemorySummary,
}
