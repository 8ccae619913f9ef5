//! The appliance on the unikernel platform: config → devices → service,
//! then one event loop over the virtio queues, smoltcp and the timers.
//!
//! ```text
//!   wake (interrupt or timer) ─▶ ack virtio ISRs ─▶ NIC service (refill RX, reap TX)
//!        ▲                                             │
//!        │                                   smoltcp poll (frames ⇄ sockets)
//!   idle_wait(poll_delay)                              │
//!        ▲                              Link::receive (socket ring → pages, session)
//!        │                                             │
//!        └── no progress ◀── Link::send ◀── Service::poll (stack run, virtio-blk completions)
//! ```
//!
//! Connections go through the service's [`Link`], the same receive and
//! send path hosted uses; this platform's [`Transport`] copies between
//! smoltcp's socket rings and the sessions' pieces (write payload straight
//! into its pages, read data straight out of them). Every byte also
//! crossed smoltcp's own copy between frames and rings, and both copies
//! are counted.

use super::BootInfo;
use crate::service::{Limits, Link, Phase, PlatformStatus, Service, PROTOCOLS};
use crate::smol::{tcp_socket, Smol};
use alloc::boxed::Box;
use alloc::vec::Vec;
use geom::config::{Config, NetConfig};
use geom::disk::BlockDevice;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

/// TCP buffer per socket and direction, at least (a protocol asks for
/// more; see [`crate::service::Protocol::buffer_bytes`]).
const SOCKET_BYTES_MIN: usize = 16 * 1024;

/// The TCP buffer per socket and direction for protocol `p` in a guest
/// with `memory_bytes` of RAM: what it asks for, but so that the sockets
/// of a full connection limit take at most an eighth of the memory.
fn socket_bytes(p: &crate::service::Protocol, memory_bytes: u64) -> usize {
    let share = memory_bytes / 8 / (p.max_connections as u64 * 2);
    (share.min(p.buffer_bytes as u64) as usize).max(SOCKET_BYTES_MIN)
}

fn fatal(msg: &str) -> ! {
    log::error!("{msg}");
    super::console_write(&alloc::format!("strata: fatal: {msg}\n"));
    super::exit_qemu(false)
}

/// The config handed over as boot module 0, with its text (empty when there
/// is none); a config that does not parse stops the appliance here.
fn config_from_boot(boot: &BootInfo) -> (Config, &'static str) {
    let Some(bytes) = boot.config else {
        return (Config::default(), "");
    };
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = match core::str::from_utf8(&bytes[..end]) {
        Ok(t) => t,
        Err(e) => {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            super::console_write(&alloc::format!(
                "strata: config error: line {line}, column 1: the file is not UTF-8 text\n"
            ));
            super::exit_qemu(false)
        }
    };
    match crate::service::parse_config(text) {
        Ok(c) => (c, text),
        Err(e) => {
            super::console_write(&alloc::format!("strata: config error: {e}\n"));
            super::exit_qemu(false)
        }
    }
}

/// One TCP socket: listening for, or carrying, a connection of one
/// protocol.
struct Slot {
    /// Index in [`PROTOCOLS`].
    protocol: usize,
    handle: SocketHandle,
    /// The link, once the socket is established and the service took the
    /// connection.
    link: Option<Link>,
}

fn now() -> Instant {
    Instant::from_micros((super::now_ns() / 1000) as i64)
}

fn status() -> PlatformStatus {
    let m = super::memory_stats();
    PlatformStatus {
        platform: "unikernel",
        uptime_ms: super::uptime_ms(),
        memory_total_bytes: m.total_bytes,
        memory_used_bytes: m.used_bytes,
    }
}

/// The service's limits: sized from the heap's free memory now (devices
/// probed, nothing served yet), then any `strata.KEY=VALUE` word of the
/// command line that names a limit ([`Limits::set`]).
fn limits(cmdline: &str) -> Limits {
    let m = super::memory_stats();
    let mut l = Limits::for_memory(m.total_bytes.saturating_sub(m.used_bytes));
    for w in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = w.strip_prefix("strata.").and_then(|w| w.split_once('=')) else {
            continue;
        };
        if let Err(e) = l.set(key, value) {
            log::warn!("command line: {e}");
        }
    }
    log::info!(
        "memory: payload budget {} KiB, memory disks up to {} KiB",
        l.payload_budget_bytes >> 10,
        l.md_memory_bytes.unwrap_or(0) >> 10
    );
    l
}

/// Runs the appliance; never returns.
pub fn serve(boot: BootInfo) -> ! {
    let (config, config_text) = config_from_boot(&boot);
    let probe = drivers::ProbeConfig {
        acpi: boot.rsdp != 0,
        ..Default::default()
    };
    // SAFETY: the platform identity-maps RAM and low MMIO and maps more on
    // request; probing runs once, before anything else touches devices.
    let devs = unsafe { drivers::probe_all(&mut |p, l| super::map_mmio(p, l), &probe) };
    for f in &devs.failures {
        log::warn!(
            "device {} ({:?}) not started: {}",
            f.location,
            f.device_type,
            f.reason
        );
    }
    let mut irqs = Vec::new();
    let mut acks = Vec::new();
    let mut disks: Vec<Box<dyn BlockDevice>> = Vec::new();
    for b in devs.blks {
        log::info!("{}: {} {:?}", b.name, b.location, b.device.info());
        irqs.extend(b.location.irq());
        acks.extend(b.irq_ack);
        disks.push(Box::new(b.device));
    }
    super::entropy::keep(devs.rngs);
    let Some(mut nic) = devs.nets.into_iter().next() else {
        fatal("no virtio-net device: nothing to serve on")
    };
    irqs.extend(nic.location.irq());
    acks.extend(nic.irq_ack);
    if boot.machine == super::Machine::Microvm {
        for g in irqs {
            let _ = super::enable_irq(g, super::Trigger::Level, super::Polarity::High);
        }
    } else {
        super::enable_pci_intx();
    }

    // The TSC under the clock differs from boot to boot: good enough to
    // keep labelled geoms' ids apart.
    let seed = super::now_ns() ^ boot.tsc_hz.rotate_left(32);
    let config_error = |e| -> ! {
        let e = crate::service::locate_error(config_text, e);
        super::console_write(&alloc::format!("strata: config error: {e}\n"));
        super::exit_qemu(false)
    };
    let mut svc = match Service::boot(&config, disks, seed) {
        Ok(s) => s,
        Err(e) => config_error(e),
    };
    svc.set_platform(Box::new(status));
    svc.set_limits(limits(boot.cmdline));
    svc.set_token(super::fw_cfg::token());
    for (name, bytes) in super::fw_cfg::read_files("opt/strata/secret/") {
        svc.set_secret(&name, &bytes);
    }
    // The key generator's seed: the CPU's entropy instructions (and the
    // host's virtio-rng, below, when there is one).
    let mut entropy = [0u8; 32];
    if crypt::hw_entropy(&mut entropy) {
        svc.add_entropy(&entropy);
        log::info!("entropy: RDSEED/RDRAND");
    } else {
        log::warn!("entropy: the CPU has no RDSEED or RDRAND");
    }
    let mut e = [0u8; 32];
    let n = super::entropy::host_entropy(&mut e);
    if n > 0 {
        svc.add_entropy(&e[..n]);
        log::info!("entropy: virtio-rng gave {n} bytes");
    } else {
        log::info!("entropy: nothing from virtio-rng");
    }
    svc.set_live_clock(super::now_ns);
    // `strata.aes=soft`: the portable AES for every key, to measure it.
    if boot
        .cmdline
        .split_whitespace()
        .any(|w| w == "strata.aes=soft")
    {
        crypt::xts::soft_only(true);
        log::info!("aes: the portable implementation (strata.aes=soft)");
    }
    let buffers: Vec<usize> = PROTOCOLS
        .iter()
        .map(|p| socket_bytes(p, super::memory_stats().total_bytes))
        .collect();

    let mac = nic.device.mac();
    let mut icfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    icfg.random_seed = super::now_ns() ^ 0x9e37_79b9_7f4a_7c15;
    let mut iface = Interface::new(icfg, &mut nic.device, now());
    let mut sockets = SocketSet::new(Vec::new());
    let mut dhcp = None;
    let mut configured = false;
    match config.net() {
        Some(NetConfig::Dhcp) => dhcp = Some(sockets.add(dhcpv4::Socket::new())),
        Some(NetConfig::Static {
            addr,
            prefix,
            gateway,
        }) => {
            let [a, b, c, d] = *addr;
            let cidr = Ipv4Cidr::new(Ipv4Address::new(a, b, c, d), *prefix);
            iface.update_ip_addrs(|ips| {
                let _ = ips.push(IpCidr::Ipv4(cidr));
            });
            if let Some([a, b, c, d]) = *gateway {
                let _ = iface
                    .routes_mut()
                    .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
            }
            configured = true;
        }
        // QEMU user networking's guest address and gateway.
        None => {
            iface.update_ip_addrs(|ips| {
                let _ = ips.push(IpCidr::Ipv4(Ipv4Cidr::new(
                    Ipv4Address::new(10, 0, 2, 15),
                    24,
                )));
            });
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::new(10, 0, 2, 2));
            configured = true;
        }
    }

    let mut slots: Vec<Slot> = Vec::new();
    let mut announced = false;
    let mut stopping_since: Option<u64> = None;
    loop {
        let mut progress = false;
        if let Some(h) = dhcp {
            if let Some(ev) = sockets.get_mut::<dhcpv4::Socket<'_>>(h).poll() {
                progress = true;
                match ev {
                    dhcpv4::Event::Configured(c) => {
                        iface.update_ip_addrs(|a| {
                            a.clear();
                            let _ = a.push(IpCidr::Ipv4(c.address));
                        });
                        if let Some(r) = c.router {
                            let _ = iface.routes_mut().add_default_ipv4_route(r);
                        }
                        log::info!("dhcp: address {} router {:?}", c.address, c.router);
                        configured = true;
                    }
                    dhcpv4::Event::Deconfigured => {
                        iface.update_ip_addrs(|a| a.clear());
                        configured = false;
                    }
                }
            }
        }
        match svc.phase() {
            Phase::Failed(e) => config_error(e.clone()),
            Phase::Serving if configured && !svc.shutting_down() => {
                top_up_listeners(&mut sockets, &mut slots, &svc, &buffers);
                if !announced {
                    announced = true;
                    announce(&svc);
                }
            }
            _ => {}
        }

        svc.set_now_ns(super::now_ns());
        nic.device.service();
        progress |= iface.poll(now(), &mut nic.device, &mut sockets)
            == smoltcp::iface::PollResult::SocketStateChanged;
        svc.tick(super::uptime_ms());
        for s in slots.iter_mut() {
            progress |= receive(s, &mut sockets, &mut svc);
        }
        progress |= svc.poll();
        for s in slots.iter_mut() {
            progress |= send(s, &mut sockets, &mut svc);
            // Input held back by backpressure may fit now.
            progress |= receive(s, &mut sockets, &mut svc);
        }
        slots.retain(|s| {
            let sock = sockets.get::<tcp::Socket<'_>>(s.handle);
            let gone = match s.link {
                Some(_) => !sock.is_open(),
                None => !sock.is_open() && sock.state() != tcp::State::Listen,
            };
            if gone {
                if let Some(l) = &s.link {
                    svc.close(l.id());
                }
                sockets.remove(s.handle);
            }
            !gone
        });
        progress |= iface.poll(now(), &mut nic.device, &mut sockets)
            == smoltcp::iface::PollResult::SocketStateChanged;

        if svc.stopped() {
            let t = super::now_ns();
            let since = *stopping_since.get_or_insert(t);
            // Let the replies reach the host before stopping.
            let replies_out = slots
                .iter()
                .all(|s| sockets.get::<tcp::Socket<'_>>(s.handle).send_queue() == 0);
            if replies_out || t - since > crate::service::SHUTDOWN_GRACE_MS * 1_000_000 {
                match svc.shutdown_result() {
                    Ok(()) => {
                        log::info!("shutdown: disks flushed");
                        super::console_write("strata: shutdown: disks flushed\n");
                        super::exit_qemu(true);
                    }
                    Err(why) => {
                        log::error!("shutdown: {why}");
                        super::console_write(&alloc::format!("strata: shutdown failed: {why}\n"));
                        super::exit_qemu(false);
                    }
                }
            }
        }

        if !progress {
            let t = now();
            let delay = iface
                .poll_delay(t, &sockets)
                .unwrap_or(Duration::from_millis(100))
                .min(Duration::from_millis(100));
            let now_ns = super::now_ns();
            let mut wake = now_ns + delay.total_micros() * 1000;
            // A timer in the stack (a delayed request in a nop) wakes the
            // loop as well as the NIC and the disks do.
            if let Some(d) = svc.next_deadline_ns() {
                wake = wake.min(d.max(now_ns));
            }
            super::idle_wait(Some(wake));
            for a in &acks {
                a.ack();
            }
        }
    }
}

/// Says what is served on the console, for the host tool: an export line
/// each, then the listening line it waits for.
fn announce(svc: &Service) {
    for e in svc.exports() {
        super::console_write(&alloc::format!(
            "strata: export {} size {} protocol {}\n",
            e.info.name,
            e.info.size_bytes,
            PROTOCOLS[e.protocol].name
        ));
    }
    let mut line = alloc::string::String::from("strata: listening");
    for p in PROTOCOLS {
        line.push_str(&alloc::format!(" {} {}", p.name, p.guest_port));
    }
    line.push('\n');
    super::console_write(&line);
}

/// Keeps a socket listening on each protocol's port for every
/// connection its limit still allows. smoltcp has no accept backlog: a
/// connection attempt that finds no listening socket is reset, so every
/// attempt within the limit must find one however many arrive in the same
/// instant. An attempt beyond the limit is reset, which QEMU's user
/// networking passes on to the host client as a closed connection.
fn top_up_listeners(
    sockets: &mut SocketSet<'static>,
    slots: &mut Vec<Slot>,
    svc: &Service,
    buffers: &[usize],
) {
    for (i, p) in PROTOCOLS.iter().enumerate() {
        let listening = slots
            .iter()
            .filter(|s| s.protocol == i && s.link.is_none())
            .count();
        for _ in (svc.connections(i) + listening)..p.max_connections {
            let mut sock = tcp_socket(buffers[i]);
            if sock.listen(p.guest_port).is_ok() {
                let handle = sockets.add(sock);
                slots.push(Slot {
                    protocol: i,
                    handle,
                    link: None,
                });
            }
        }
    }
}

/// Receives on one socket: an established socket without a link yet
/// gets one (or is closed when the service has no room).
fn receive(s: &mut Slot, sockets: &mut SocketSet<'static>, svc: &mut Service) -> bool {
    let sock = sockets.get_mut::<tcp::Socket<'_>>(s.handle);
    if s.link.is_none() {
        if !sock.is_active()
            || sock.state() == tcp::State::Listen
            || sock.state() == tcp::State::SynReceived
        {
            return false;
        }
        match svc.open(s.protocol) {
            Some(id) => s.link = Some(Link::new(id)),
            None => {
                sock.close();
                return true;
            }
        }
    }
    let Some(link) = s.link.as_mut() else {
        return false;
    };
    link.receive(svc, &mut Smol(sock))
}

/// Sends on one socket, and closes it once its connection is over and
/// every byte is out.
fn send(s: &mut Slot, sockets: &mut SocketSet<'static>, svc: &mut Service) -> bool {
    let Some(link) = s.link.as_mut() else {
        return false;
    };
    let sock = sockets.get_mut::<tcp::Socket<'_>>(s.handle);
    if sock.can_send() {
        link.writable();
    }
    let mut progress = link.send(svc, &mut Smol(sock));
    if link.finished(svc) && sock.send_queue() == 0 && sock.state() != tcp::State::Closed {
        if sock.may_send() {
            sock.close();
        } else {
            sock.abort();
        }
        progress = true;
    }
    progress
}
