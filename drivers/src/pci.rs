//! PCI bus enumeration over the legacy configuration ports and virtio PCI
//! transports (virtio 1.2 §4.1).
//!
//! [`PortCam`] implements virtio-drivers' `ConfigurationAccess` with
//! configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2): write the
//! function's address to port 0xCF8, then read or write the dword at
//! 0xCFC. [`scan`] walks bus 0 and every bus behind a PCI-to-PCI bridge
//! and lists functions in bus/device/function order, which is the order
//! disks are named in (vtbd0, vtbd1, …).

use alloc::vec::Vec;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, HeaderType, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport, VirtioPciError};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::Hal;

/// The virtio PCI vendor id (virtio 1.2 §4.1.2).
pub const VIRTIO_VENDOR: u16 = 0x1af4;
const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Serialises the address/data port pair.
static PORT_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Configuration space access through ports 0xCF8/0xCFC.
#[derive(Debug, Default)]
pub struct PortCam;

/// The CONFIG_ADDRESS value for one dword of a function's config space.
pub fn config_address(df: DeviceFunction, register: u8) -> u32 {
    0x8000_0000
        | (u32::from(df.bus) << 16)
        | (u32::from(df.device & 0x1f) << 11)
        | (u32::from(df.function & 0x7) << 8)
        | u32::from(register & 0xfc)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, register_offset: u8) -> u32 {
        let _g = PORT_LOCK.lock();
        let mut addr = x86_64::instructions::port::Port::<u32>::new(CONFIG_ADDRESS);
        let mut data = x86_64::instructions::port::Port::<u32>::new(CONFIG_DATA);
        // SAFETY: ports 0xCF8/0xCFC are the PCI configuration mechanism;
        // the lock keeps the address/data pair together. Reading a
        // configuration dword has no side effects on memory.
        unsafe {
            addr.write(config_address(df, register_offset));
            data.read()
        }
    }

    fn write_word(&mut self, df: DeviceFunction, register_offset: u8, value: u32) {
        let _g = PORT_LOCK.lock();
        let mut addr = x86_64::instructions::port::Port::<u32>::new(CONFIG_ADDRESS);
        let mut data = x86_64::instructions::port::Port::<u32>::new(CONFIG_DATA);
        // SAFETY: as in `read_word`; callers (virtio-drivers and this
        // module) only write command and BAR registers.
        unsafe {
            addr.write(config_address(df, register_offset));
            data.write(value);
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// One PCI function found by [`scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Bus, device, function.
    pub bdf: DeviceFunction,
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Header type (0 device, 1 PCI bridge).
    pub header_type: u8,
    /// Interrupt line (the IRQ firmware routed INTx to; 0xff: none).
    pub irq_line: u8,
    /// Interrupt pin (1 = INTA# … 4 = INTD#; 0: none).
    pub irq_pin: u8,
    /// The virtio device type, for vendor 0x1af4 functions.
    pub virtio: Option<DeviceType>,
}

/// Reads the fields of one function, or `None` when nothing answers.
pub fn read_function<C: ConfigurationAccess>(cam: &C, bdf: DeviceFunction) -> Option<PciFunction> {
    let id = cam.read_word(bdf, 0x00);
    let vendor_id = id as u16;
    if vendor_id == 0xffff || vendor_id == 0 {
        return None;
    }
    let device_id = (id >> 16) as u16;
    let class_rev = cam.read_word(bdf, 0x08);
    let hdr = cam.read_word(bdf, 0x0c);
    let intr = cam.read_word(bdf, 0x3c);
    let info = virtio_drivers::transport::pci::bus::DeviceFunctionInfo {
        vendor_id,
        device_id,
        class: (class_rev >> 24) as u8,
        subclass: (class_rev >> 16) as u8,
        prog_if: (class_rev >> 8) as u8,
        revision: class_rev as u8,
        header_type: HeaderType::from(((hdr >> 16) as u8) & 0x7f),
    };
    Some(PciFunction {
        bdf,
        vendor_id,
        device_id,
        class: info.class,
        subclass: info.subclass,
        header_type: (hdr >> 16) as u8,
        irq_line: intr as u8,
        irq_pin: (intr >> 8) as u8,
        virtio: virtio_device_type(&info),
    })
}

/// Lists every function on bus 0 and on buses behind PCI-to-PCI bridges,
/// in bus/device/function order.
pub fn scan<C: ConfigurationAccess>(cam: &C) -> Vec<PciFunction> {
    let mut out = Vec::new();
    let mut buses = Vec::from([0u8]);
    let mut seen = [false; 256];
    while let Some(bus) = buses.pop() {
        if core::mem::replace(&mut seen[bus as usize], true) {
            continue;
        }
        for device in 0..32u8 {
            let f0 = DeviceFunction {
                bus,
                device,
                function: 0,
            };
            let Some(first) = read_function(cam, f0) else {
                continue;
            };
            let functions = if first.header_type & 0x80 != 0 { 8 } else { 1 };
            for function in 0..functions {
                let bdf = DeviceFunction {
                    bus,
                    device,
                    function,
                };
                let Some(f) = read_function(cam, bdf) else {
                    continue;
                };
                if f.header_type & 0x7f == 0x01 {
                    // Secondary bus number (PCI-to-PCI Bridge 1.2 §3.2.5.3).
                    let secondary = (cam.read_word(bdf, 0x18) >> 8) as u8;
                    if secondary != 0 {
                        buses.push(secondary);
                    }
                }
                out.push(f);
            }
        }
    }
    out.sort_by_key(|f| f.bdf);
    out
}

/// Indices of the 64-bit memory BARs of `bdf` that the firmware placed
/// above 4 GiB, read without sizing (sizing toggles decoding, which QEMU
/// answers with a costly memory-map rebuild).
pub fn high_bars<C: ConfigurationAccess>(cam: &C, bdf: DeviceFunction) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u8;
    while i < 6 {
        let lo = cam.read_word(bdf, 0x10 + 4 * i);
        // Memory BAR (bit 0 clear) of type 64-bit (bits 2:1 = 10b).
        if lo & 1 == 0 && (lo >> 1) & 3 == 2 && i < 5 {
            if cam.read_word(bdf, 0x14 + 4 * i) != 0 {
                out.push(i);
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    out
}

/// Physical address of the ISR status byte of a virtio PCI function
/// (the VIRTIO_PCI_CAP_ISR_CFG structure, virtio 1.2 §4.1.4.5), found by
/// walking its capability list and reading the BAR without sizing it.
pub fn isr_address<C: ConfigurationAccess>(cam: &C, bdf: DeviceFunction) -> Option<u64> {
    // Capabilities List bit in the status register (PCI 3.0 §6.2.3).
    if cam.read_word(bdf, 0x04) & (1 << 20) == 0 {
        return None;
    }
    let mut at = (cam.read_word(bdf, 0x34) & 0xfc) as u8;
    let mut hops = 0;
    while at >= 0x40 && hops < 48 {
        let head = cam.read_word(bdf, at);
        let (id, next, cfg_type) = (head as u8, (head >> 8) as u8, (head >> 24) as u8);
        // Vendor-specific capability of type ISR (virtio 1.2 §4.1.4).
        if id == 0x09 && cfg_type == 3 {
            let bar = (cam.read_word(bdf, at + 4) & 0xff) as u8;
            let offset = u64::from(cam.read_word(bdf, at + 8));
            if bar > 5 {
                return None;
            }
            let lo = cam.read_word(bdf, 0x10 + 4 * bar);
            if lo & 1 != 0 {
                return None;
            }
            let mut base = u64::from(lo & !0xf);
            if (lo >> 1) & 3 == 2 && bar < 5 {
                base |= u64::from(cam.read_word(bdf, 0x14 + 4 * bar)) << 32;
            }
            return (base != 0).then_some(base + offset);
        }
        at = next & 0xfc;
        hops += 1;
    }
    None
}

/// Makes a virtio PCI function usable: maps memory BARs that lie above
/// 4 GiB through `map_mmio(phys, len)` (lower MMIO is identity-mapped by
/// the platform), enables memory decoding and bus mastering, and builds
/// the transport from its virtio capabilities (virtio 1.2 §4.1.4).
/// `cam` reads the same configuration space as `root`.
pub fn virtio_transport<H: Hal, C: ConfigurationAccess>(
    cam: &C,
    root: &mut PciRoot<C>,
    bdf: DeviceFunction,
    map_mmio: &mut dyn FnMut(u64, u64),
) -> Result<PciTransport, VirtioPciError> {
    for i in high_bars(cam, bdf) {
        if let Some(BarInfo::Memory { address, size, .. }) = root.bar_info(bdf, i)? {
            map_mmio(address, size);
        }
    }
    let (_, cmd) = root.get_status_command(bdf);
    let want = (cmd | Command::MEMORY_SPACE | Command::BUS_MASTER) & !Command::INTERRUPT_DISABLE;
    if want != cmd {
        root.set_command(bdf, want);
    }
    PciTransport::new::<H, C>(root, bdf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Config space of a few fake functions.
    struct FakeCam(BTreeMap<(u8, u8, u8), [u32; 64]>);

    impl ConfigurationAccess for FakeCam {
        fn read_word(&self, df: DeviceFunction, reg: u8) -> u32 {
            self.0
                .get(&(df.bus, df.device, df.function))
                .map(|s| s[reg as usize / 4])
                .unwrap_or(0xffff_ffff)
        }
        fn write_word(&mut self, _: DeviceFunction, _: u8, _: u32) {}
        unsafe fn unsafe_clone(&self) -> Self {
            FakeCam(self.0.clone())
        }
    }

    fn func(vendor: u16, device: u16, header: u8, irq: (u8, u8)) -> [u32; 64] {
        let mut s = [0u32; 64];
        s[0] = u32::from(vendor) | (u32::from(device) << 16);
        s[2] = 0x0100_0000;
        s[3] = u32::from(header) << 16;
        s[15] = u32::from(irq.0) | (u32::from(irq.1) << 8);
        s
    }

    #[test]
    fn high_bars_are_found_without_sizing() {
        let mut f = func(0x1af4, 0x1042, 0, (11, 1));
        f[4] = 0xfebd_1000; // BAR0: 32-bit memory
        f[5] = 0xc041; // BAR1: I/O
        f[8] = 0x0000_000c; // BAR4: 64-bit prefetchable ...
        f[9] = 0x0000_0080; // ... at 0x80_0000_0000
        let mut m = BTreeMap::new();
        m.insert((0, 1, 0), f);
        let bdf = DeviceFunction {
            bus: 0,
            device: 1,
            function: 0,
        };
        assert_eq!(high_bars(&FakeCam(m.clone()), bdf), [4]);
        m.get_mut(&(0, 1, 0)).unwrap()[9] = 0;
        assert!(high_bars(&FakeCam(m), bdf).is_empty());
    }

    #[test]
    fn isr_is_found_through_the_capability_list() {
        let mut f = func(0x1af4, 0x1042, 0, (11, 1));
        f[1] = 1 << 20; // capability list present
        f[13] = 0x40; // first capability
        f[8] = 0xfe00_000c; // BAR4: 64-bit memory at 0x1_fe00_0000
        f[9] = 0x1;
        // 0x40: MSI-X (id 0x11) -> 0x50
        f[0x40 / 4] = 0x11 | (0x50 << 8);
        // 0x50: vendor, common cfg (type 1) -> 0x60
        f[0x50 / 4] = 0x09 | (0x60 << 8) | (16 << 16) | (1 << 24);
        // 0x60: vendor, ISR cfg (type 3) in BAR4 at 0x1000
        f[0x60 / 4] = 0x09 | (16 << 16) | (3 << 24);
        f[0x64 / 4] = 4;
        f[0x68 / 4] = 0x1000;
        let mut m = BTreeMap::new();
        m.insert((0, 1, 0), f);
        let bdf = DeviceFunction {
            bus: 0,
            device: 1,
            function: 0,
        };
        assert_eq!(isr_address(&FakeCam(m), bdf), Some(0x1_fe00_1000));
    }

    #[test]
    fn address_encoding() {
        let df = DeviceFunction {
            bus: 1,
            device: 2,
            function: 3,
        };
        assert_eq!(config_address(df, 0x3e), 0x8001_133c);
    }

    #[test]
    fn scan_orders_and_follows_bridges() {
        let mut m = BTreeMap::new();
        m.insert((0, 0, 0), func(0x8086, 0x29c0, 0, (0, 0)));
        m.insert((0, 5, 0), func(0x1af4, 0x1042, 0, (11, 1)));
        m.insert((0, 3, 0), func(0x1af4, 0x1001, 0, (10, 1)));
        // A bridge to bus 1 holding one more disk.
        let mut br = func(0x1b36, 0x000c, 1, (0, 0));
        br[6] = 1 << 8;
        m.insert((0, 7, 0), br);
        m.insert((1, 0, 0), func(0x1af4, 0x1041, 0, (11, 1)));
        // Function 1 of a single-function device is ignored.
        m.insert((0, 5, 1), func(0x1af4, 0x1042, 0, (11, 2)));
        let found = scan(&FakeCam(m));
        let bdfs: Vec<(u8, u8, u8)> = found
            .iter()
            .map(|f| (f.bdf.bus, f.bdf.device, f.bdf.function))
            .collect();
        assert_eq!(
            bdfs,
            [(0, 0, 0), (0, 3, 0), (0, 5, 0), (0, 7, 0), (1, 0, 0)]
        );
        assert_eq!(found[1].virtio, Some(DeviceType::Block));
        assert_eq!(found[2].virtio, Some(DeviceType::Block));
        assert_eq!(found[4].virtio, Some(DeviceType::Network));
        assert_eq!((found[2].irq_line, found[2].irq_pin), (11, 1));
        assert_eq!(found[0].virtio, None);
    }
}
