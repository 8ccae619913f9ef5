//! The appliance program on the unikernel platform: wires drivers, the
//! block stack and the servers, then runs the event loop. Called by the
//! kernel entry once the platform is up; never returns.
//!
//! Temporary body: probes and logs the devices; driver bring-up checks on
//! request (`drv=blk`, `drv=bench`, `drv=net` with `drv.dhcp`,
//! `drv.conns=N`, `drv.buf=KiB`, `drv.burst=N`).

use super::BootInfo;
use drivers::selftest::{self, Env};
use geom::disk::BlockDevice;

struct KernelEnv {
    acks: alloc::vec::Vec<drivers::IrqAck>,
    wakes: u64,
}

impl Env for KernelEnv {
    fn now_ns(&self) -> u64 {
        super::now_ns()
    }
    fn idle(&mut self, deadline_ns: Option<u64>) {
        super::idle_wait(deadline_ns);
        self.wakes += 1;
        for a in &self.acks {
            a.ack();
        }
    }
}

/// Runs the appliance.
pub fn main(boot: BootInfo) -> ! {
    if !boot.cmdline.contains("drv=") {
        super::serve::serve(boot)
    }
    let words: alloc::vec::Vec<&str> = boot.cmdline.split_ascii_whitespace().collect();
    let has = |w: &str| words.contains(&w);
    let mut cfg = drivers::ProbeConfig {
        acpi: boot.rsdp != 0,
        ..Default::default()
    };
    if let Some(b) = words.iter().find_map(|w| w.strip_prefix("drv.burst=")) {
        cfg.net.max_burst_size = b.parse().ok();
    }
    let t0 = super::now_ns();
    // SAFETY: the platform identity-maps RAM and low MMIO; probing runs once.
    let mut devs = unsafe { drivers::probe_all(&mut |p, l| super::map_mmio(p, l), &cfg) };
    log::info!("probe took {} us", (super::now_ns() - t0) / 1000);
    for f in &devs.pci {
        log::info!(
            "pci {} {:04x}:{:04x} class {:02x}.{:02x} irq {} pin {} {:?}",
            f.bdf,
            f.vendor_id,
            f.device_id,
            f.class,
            f.subclass,
            f.irq_line,
            f.irq_pin,
            f.virtio
        );
    }
    let mut irqs = alloc::vec::Vec::new();
    for b in &devs.blks {
        log::info!(
            "{}: {} {:?} limits {:?}",
            b.name,
            b.location,
            b.device.info(),
            b.device.limits()
        );
        irqs.extend(b.location.irq());
    }
    for n in &devs.nets {
        log::info!("{}: {} mac {:02x?}", n.name, n.location, n.device.mac());
        irqs.extend(n.location.irq());
    }
    for f in &devs.failures {
        log::warn!("failed: {} {:?} {}", f.location, f.device_type, f.reason);
    }
    if boot.machine == super::Machine::Microvm {
        for g in irqs {
            let _ = super::enable_irq(g, super::Trigger::Level, super::Polarity::High);
        }
    } else {
        super::enable_pci_intx();
    }
    let acks = devs
        .blks
        .iter()
        .filter_map(|b| b.irq_ack)
        .chain(devs.nets.iter().filter_map(|n| n.irq_ack))
        .collect();
    let mut env = KernelEnv { acks, wakes: 0 };
    let mut ok = true;
    if has("drv=blk") {
        if let Some(b) = devs.blks.first_mut() {
            match selftest::blk_check(&mut b.device, 32, 65536, &mut env) {
                Ok(r) => log::info!("blk check ok: {r:?} stats {:?}", b.device.stats()),
                Err(e) => {
                    log::error!("blk check FAILED: {e}");
                    ok = false;
                }
            }
        }
    }
    if has("drv=bench") {
        if let Some(b) = devs.blks.last_mut() {
            for bio in [65536usize, 131072, 4096] {
                let bytes = if bio == 4096 { 16u64 << 20 } else { 64 << 20 };
                match selftest::blk_bench(&mut b.device, bytes, bio, 32, &mut env) {
                    Ok((w, r)) => log::info!(
                        "blk bench {} KiB bios: write {} KB/s read {} KB/s, stats {:?}",
                        bio / 1024,
                        w / 1000,
                        r / 1000,
                        b.device.stats()
                    ),
                    Err(e) => log::error!("blk bench: {e}"),
                }
            }
        }
    }
    if has("drv=net") {
        if let Some(n) = devs.nets.first_mut() {
            let mut tcfg = selftest::default_tcp_config();
            if has("drv.dhcp") {
                tcfg.addressing = selftest::Addressing::Dhcp;
            }
            if let Some(c) = words.iter().find_map(|w| w.strip_prefix("drv.conns=")) {
                tcfg.connections = c.parse().unwrap_or(2);
            }
            if let Some(c) = words.iter().find_map(|w| w.strip_prefix("drv.buf=")) {
                tcfg.buffer_bytes = c.parse::<usize>().unwrap_or(512) << 10;
            }
            let mac = n.device.mac();
            let reports = selftest::tcp_service(
                &mut n.device,
                mac,
                &tcfg,
                &mut env,
                &mut |s| log::info!("{s}"),
                |d| d.service(),
            );
            log::info!(
                "net done: {reports:?} stats {:?} irqs {:?}",
                n.device.stats(),
                super::irq_stats()
            );
        }
    }
    log::info!("wakes {} irqs {:?}", env.wakes, super::irq_stats());
    super::exit::exit_qemu(ok)
}
