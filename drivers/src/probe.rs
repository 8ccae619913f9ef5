//! Finding and starting devices: the PCI bus scan and the microvm
//! window, each device's transport and driver, and its interrupt
//! acknowledgement, in stable order (vtbd0, vtbd1, …). An entropy device
//! (virtio-rng) is optional: found ones are started, none is no error.

use crate::hal::IdentityHal;
use crate::virtio::InitError;
use crate::{mmio, pci, virtio_blk, virtio_net, virtio_rng};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};
use virtio_drivers::transport::{DeviceType, SomeTransport};

/// A disk on either transport.
pub type BlkDevice = virtio_blk::VirtioBlk<SomeTransport<'static>>;
/// A NIC on either transport.
pub type NetDevice = virtio_net::VirtioNet<SomeTransport<'static>>;
/// An entropy device on either transport.
pub type RngDevice = virtio_rng::VirtioRng<SomeTransport<'static>>;

/// Where a device was found and how it interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// A PCI function.
    Pci {
        /// Bus, device, function.
        bdf: DeviceFunction,
        /// Interrupt line firmware routed INTx to (0xff: none).
        irq_line: u8,
        /// Interrupt pin (1 = INTA# … 4 = INTD#; 0: none).
        irq_pin: u8,
    },
    /// A virtio-mmio register block.
    Mmio {
        /// Physical base address.
        base: usize,
        /// GSI, when known.
        irq: Option<u32>,
    },
}

impl Location {
    /// The legacy IRQ / GSI the device interrupts on, if any.
    pub fn irq(&self) -> Option<u32> {
        match *self {
            Location::Pci {
                irq_line, irq_pin, ..
            } if irq_pin != 0 && irq_line != 0xff => Some(u32::from(irq_line)),
            Location::Pci { .. } => None,
            Location::Mmio { irq, .. } => irq,
        }
    }
}

impl core::fmt::Display for Location {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Location::Pci {
                bdf,
                irq_line,
                irq_pin,
            } => write!(f, "pci {bdf} irq {irq_line} pin {irq_pin}"),
            Location::Mmio { base, irq } => match irq {
                Some(i) => write!(f, "mmio {base:#x} irq {i}"),
                None => write!(f, "mmio {base:#x}"),
            },
        }
    }
}

/// Acknowledges a virtio device's interrupt without going through its
/// driver, so the event loop can deassert INTx after a wake-up even when
/// the driver is owned elsewhere (a disk driver lives inside its geom).
///
/// Reading the ISR status clears it (virtio 1.2 §4.1.4.5.1); on
/// virtio-mmio the bits read from InterruptStatus are written back to
/// InterruptACK (§4.2.2). Acknowledging loses nothing: the loop polls the
/// devices after acknowledging, and anything the device adds later raises
/// a new interrupt. Call it for every device on each wake-up, then poll.
#[derive(Clone, Copy, Debug)]
pub struct IrqAck(AckKind, Option<virtio_blk::ConfigFlag>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AckKind {
    /// Address of the ISR status byte in a PCI BAR.
    PciIsr(usize),
    /// Base of a virtio-mmio register block.
    Mmio(usize),
}

impl IrqAck {
    /// Reads and clears the device's interrupt status. Bit 0: the device
    /// used buffers; bit 1: its configuration changed (a disk's driver
    /// is told through its [`virtio_blk::ConfigFlag`]).
    pub fn ack(&self) -> u32 {
        let isr = self.read_isr();
        if isr & 2 != 0 {
            if let Some(flag) = self.1 {
                flag.store(true, core::sync::atomic::Ordering::Release);
            }
        }
        isr
    }

    fn read_isr(&self) -> u32 {
        match self.0 {
            // SAFETY: built by `probe_all` from the device's ISR capability
            // inside an identity-mapped BAR; reading it only clears the
            // device's interrupt status.
            AckKind::PciIsr(a) => u32::from(unsafe { core::ptr::read_volatile(a as *const u8) }),
            AckKind::Mmio(base) => {
                // SAFETY: built by `probe_all` for a virtio-mmio block that
                // is identity-mapped; InterruptStatus (0x60) is read-only
                // and InterruptACK (0x64) only clears the given bits.
                unsafe {
                    let st = core::ptr::read_volatile((base + 0x60) as *const u32);
                    if st != 0 {
                        core::ptr::write_volatile((base + 0x64) as *mut u32, st);
                    }
                    st
                }
            }
        }
    }
}

/// A started device with its name and location.
pub struct Probed<D> {
    /// Stable name: vtbd0, vtbd1, … for disks, vtnet0, … for NICs,
    /// vtrng0, … for entropy devices.
    pub name: String,
    /// Where it was found.
    pub location: Location,
    /// Acknowledges its interrupt (see [`IrqAck`]).
    pub irq_ack: Option<IrqAck>,
    /// The driver.
    pub device: D,
}

/// A device that was found but could not be started.
#[derive(Clone, Debug)]
pub struct ProbeFailure {
    /// Where it was found.
    pub location: Location,
    /// What kind of device it is, if known.
    pub device_type: Option<DeviceType>,
    /// What went wrong.
    pub reason: String,
}

/// Everything [`probe_all`] found.
#[derive(Default)]
pub struct Devices {
    /// Disks, in bus order (PCI: bus/device/function; microvm:
    /// command-line order).
    pub blks: Vec<Probed<BlkDevice>>,
    /// NICs, in the same order.
    pub nets: Vec<Probed<NetDevice>>,
    /// Entropy devices (virtio-rng), in the same order; often none.
    pub rngs: Vec<Probed<RngDevice>>,
    /// Every PCI function seen (for the log).
    pub pci: Vec<pci::PciFunction>,
    /// Devices that failed to start.
    pub failures: Vec<ProbeFailure>,
}

/// Which buses [`probe_all`] looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Buses {
    /// PCI through ports 0xCF8/0xCFC; the microvm virtio-mmio window only
    /// when there is no PCI host bridge at 00:00.0.
    #[default]
    Auto,
    /// PCI only.
    Pci,
    /// The microvm virtio-mmio window only.
    MicrovmMmio,
}

/// Settings for [`probe_all`].
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    /// Buses to scan.
    pub buses: Buses,
    /// The machine has ACPI tables (QEMU's default); decides how microvm
    /// wires virtio-mmio interrupts when it has no second I/O APIC.
    pub acpi: bool,
    /// Settings for every NIC.
    pub net: virtio_net::NetConfig,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            buses: Buses::Auto,
            acpi: true,
            net: virtio_net::NetConfig::default(),
        }
    }
}

/// Starts the device behind `transport` and files it in `out`.
fn start(
    out: &mut Devices,
    location: Location,
    irq_ack: Option<IrqAck>,
    transport: SomeTransport<'static>,
    cfg: &ProbeConfig,
) {
    use virtio_drivers::transport::Transport;
    let device_type = transport.device_type();
    let result: Result<(), InitError> = match device_type {
        DeviceType::Block => virtio_blk::VirtioBlk::new(transport).map(|mut device| {
            let name = format!("vtbd{}", out.blks.len());
            // One flag per disk for the life of the appliance.
            let flag: virtio_blk::ConfigFlag = alloc::boxed::Box::leak(alloc::boxed::Box::new(
                core::sync::atomic::AtomicBool::new(false),
            ));
            device.set_config_flag(flag);
            let irq_ack = irq_ack.map(|a| IrqAck(a.0, Some(flag)));
            out.blks.push(Probed {
                name,
                location,
                irq_ack,
                device,
            });
        }),
        DeviceType::Network => virtio_net::VirtioNet::new(transport, cfg.net).map(|device| {
            let name = format!("vtnet{}", out.nets.len());
            out.nets.push(Probed {
                name,
                location,
                irq_ack,
                device,
            });
        }),
        DeviceType::EntropySource => virtio_rng::VirtioRng::new(transport).map(|device| {
            let name = format!("vtrng{}", out.rngs.len());
            out.rngs.push(Probed {
                name,
                location,
                irq_ack,
                device,
            });
        }),
        _ => return,
    };
    if let Err(e) = result {
        log::warn!("virtio {device_type:?} at {location}: {e:?}");
        out.failures.push(ProbeFailure {
            location,
            device_type: Some(device_type),
            reason: format!("{e:?}"),
        });
    }
}

/// Finds every virtio disk, NIC and entropy device, starts them, and names
/// them in stable order (vtbd0, vtbd1, …, vtnet0, … and vtrng0, …).
///
/// `map_mmio(phys, len)` must map a physical range 1:1 (uncached); it is
/// called for PCI BARs above 4 GiB, which the platform's boot map does not
/// cover. Lower MMIO must already be identity-mapped.
///
/// # Safety
///
/// Only for the appliance kernel: memory and MMIO below 4 GiB identity-
/// mapped, nothing else driving PCI configuration or the devices, and
/// called once.
pub unsafe fn probe_all(map_mmio: &mut dyn FnMut(u64, u64), cfg: &ProbeConfig) -> Devices {
    let mut out = Devices::default();
    let mut have_pci = false;
    if cfg.buses != Buses::MicrovmMmio {
        out.pci = pci::scan(&pci::PortCam);
        have_pci = out.pci.iter().any(|f| {
            f.bdf
                == DeviceFunction {
                    bus: 0,
                    device: 0,
                    function: 0,
                }
        });
        let mut root = PciRoot::new(pci::PortCam);
        let virtio_fns: Vec<pci::PciFunction> = out
            .pci
            .iter()
            .filter(|f| f.virtio.is_some())
            .cloned()
            .collect();
        for f in virtio_fns {
            let location = Location::Pci {
                bdf: f.bdf,
                irq_line: f.irq_line,
                irq_pin: f.irq_pin,
            };
            if !matches!(
                f.virtio,
                Some(DeviceType::Block | DeviceType::Network | DeviceType::EntropySource)
            ) {
                continue;
            }
            match pci::virtio_transport::<IdentityHal, _>(&pci::PortCam, &mut root, f.bdf, map_mmio)
            {
                Ok(t) => {
                    log::debug!("virtio transport at {location}");
                    let ack = pci::isr_address(&pci::PortCam, f.bdf)
                        .map(|a| IrqAck(AckKind::PciIsr(a as usize), None));
                    start(&mut out, location, ack, SomeTransport::Pci(t), cfg)
                }
                Err(e) => {
                    log::warn!("virtio at {location}: {e}");
                    out.failures.push(ProbeFailure {
                        location,
                        device_type: f.virtio,
                        reason: format!("{e}"),
                    });
                }
            }
        }
    }
    let want_mmio = match cfg.buses {
        Buses::Auto => !have_pci,
        Buses::Pci => false,
        Buses::MicrovmMmio => true,
    };
    if want_mmio {
        // SAFETY: the caller promises the identity map and exclusive use;
        // on a machine without PCI the window is the microvm's.
        for d in unsafe { mmio::scan_microvm(cfg.acpi) } {
            let location = Location::Mmio {
                base: d.base,
                irq: d.irq,
            };
            let ack = Some(IrqAck(AckKind::Mmio(d.base), None));
            start(
                &mut out,
                location,
                ack,
                SomeTransport::Mmio(d.transport),
                cfg,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_irq() {
        let bdf = DeviceFunction {
            bus: 0,
            device: 3,
            function: 0,
        };
        let l = Location::Pci {
            bdf,
            irq_line: 11,
            irq_pin: 1,
        };
        assert_eq!(l.irq(), Some(11));
        assert_eq!(alloc::format!("{l}"), "pci 00:03.0 irq 11 pin 1");
        let l = Location::Pci {
            bdf,
            irq_line: 0xff,
            irq_pin: 1,
        };
        assert_eq!(l.irq(), None);
        let l = Location::Mmio {
            base: 0xfeb0_0000,
            irq: Some(5),
        };
        assert_eq!(l.irq(), Some(5));
    }
}
