//! The appliance on the unikernel platform: config → devices → service,
//! then one event loop over the virtio queues, smoltcp and the timers.
//!
//! ```text
//!   wake (interrupt or timer) ─▶ ack virtio ISRs ─▶ NIC service (refill RX, reap TX)
//!        ▲                                             │
//!        │                                   smoltcp poll (frames ⇄ sockets)
//!   idle_wait(poll_delay)                              │
//!        ▲                              socket rx ─▶ Service::nbd_recv (bytes → bios)
//!        │                                             │
//!        └── no progress ◀── socket tx ◀── Service::poll (stack run, virtio-blk completions)
//! ```
//!
//! Data moves between smoltcp's socket buffers and bio pages inside the
//! NBD engine (`recv`/`send` closures hand it the socket's own ring), so
//! there is no intermediate buffer on either side.

use super::BootInfo;
use crate::service::{PlatformStatus, Service, MAX_HTTP_CONNECTIONS, MAX_NBD_CONNECTIONS};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use geom::config::{Config, NetConfig};
use geom::disk::BlockDevice;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

/// Guest port of the NBD server (the host tool forwards to it).
pub const NBD_PORT: u16 = 10809;
/// Guest port of the management endpoint.
pub const HTTP_PORT: u16 = 8080;
/// TCP buffer per NBD socket and direction, at most. Large windows matter
/// under QEMU user networking; see docs/architecture.md for the measured
/// effect.
const NBD_SOCKET_BYTES_MAX: usize = 512 * 1024;
/// TCP buffer per NBD socket and direction, at least.
const NBD_SOCKET_BYTES_MIN: usize = 64 * 1024;
/// TCP buffer per management socket and direction.
const HTTP_SOCKET_BYTES: usize = 16 * 1024;

/// The TCP buffer per NBD socket and direction for a guest with
/// `memory_bytes` of RAM: the sockets of a full connection limit take at
/// most an eighth of it, within the bounds above.
fn nbd_socket_bytes(memory_bytes: u64) -> usize {
    let share = memory_bytes / 8 / (MAX_NBD_CONNECTIONS as u64 * 2);
    (share.min(NBD_SOCKET_BYTES_MAX as u64) as usize).max(NBD_SOCKET_BYTES_MIN)
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
    match geom::config::parse(text) {
        Ok(c) => (c, text),
        Err(e) => {
            super::console_write(&alloc::format!("strata: config error: {e}\n"));
            super::exit_qemu(false)
        }
    }
}

fn tcp_socket(bytes: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; bytes]),
        tcp::SocketBuffer::new(vec![0u8; bytes]),
    );
    // Delayed ACKs with few segments in flight stall the sender, and Nagle
    // would hold small replies back behind unacknowledged data.
    s.set_ack_delay(None);
    s.set_nagle_enabled(false);
    s
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nbd,
    Http,
}

struct Slot {
    kind: Kind,
    handle: SocketHandle,
    /// The service's connection id once the socket is established.
    conn: Option<u32>,
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
    let mut svc = match Service::with_seed(&config, disks, seed) {
        Ok(s) => s,
        Err(e) => {
            let e = crate::service::locate_error(config_text, e);
            super::console_write(&alloc::format!("strata: config error: {e}\n"));
            super::exit_qemu(false)
        }
    };
    for e in svc.exports() {
        super::console_write(&alloc::format!(
            "strata: export {} size {}\n",
            e.name,
            e.size_bytes
        ));
    }

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

    let nbd_bytes = nbd_socket_bytes(super::memory_stats().total_bytes);
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
        if configured && !svc.shutting_down() {
            top_up_listeners(&mut sockets, &mut slots, &svc, nbd_bytes);
            if !announced {
                announced = true;
                super::console_write(&alloc::format!(
                    "strata: listening nbd {NBD_PORT} http {HTTP_PORT}\n"
                ));
            }
        }

        svc.set_now_ns(super::now_ns());
        nic.device.service();
        progress |= iface.poll(now(), &mut nic.device, &mut sockets)
            == smoltcp::iface::PollResult::SocketStateChanged;
        let st = status();
        svc.nbd_tick(st.uptime_ms);
        for s in slots.iter_mut() {
            progress |= pump_rx(s, &mut sockets, &mut svc, &st);
        }
        progress |= svc.poll();
        for s in slots.iter_mut() {
            progress |= pump_tx(s, &mut sockets, &mut svc);
            // Input held back by backpressure may fit now.
            progress |= pump_rx(s, &mut sockets, &mut svc, &st);
        }
        slots.retain(|s| {
            let sock = sockets.get::<tcp::Socket<'_>>(s.handle);
            let gone = match s.conn {
                Some(_) => !sock.is_open(),
                None => !sock.is_open() && sock.state() != tcp::State::Listen,
            };
            if gone {
                if let Some(id) = s.conn {
                    match s.kind {
                        Kind::Nbd => svc.nbd_close(id),
                        Kind::Http => svc.http_close(id),
                    }
                }
                sockets.remove(s.handle);
            }
            !gone
        });
        progress |= iface.poll(now(), &mut nic.device, &mut sockets)
            == smoltcp::iface::PollResult::SocketStateChanged;

        if svc.shutting_down() {
            let t = super::now_ns();
            let since = *stopping_since.get_or_insert(t);
            // Let the management reply reach the host before stopping.
            let replies_out = slots.iter().all(|s| {
                s.kind != Kind::Http || sockets.get::<tcp::Socket<'_>>(s.handle).send_queue() == 0
            });
            if svc.shutdown_done() && (replies_out || t - since > 2_000_000_000) {
                log::info!("shutdown: disks flushed");
                super::console_write("strata: shutdown: disks flushed\n");
                super::exit_qemu(true);
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

/// Keeps a socket listening on each port for every connection the limit
/// still allows. smoltcp has no accept backlog: a connection attempt that
/// finds no listening socket is reset, so every attempt within the limit
/// must find one however many arrive in the same instant. An attempt
/// beyond the limit is reset, which QEMU's user networking passes on to
/// the host client as a closed connection.
fn top_up_listeners(
    sockets: &mut SocketSet<'static>,
    slots: &mut Vec<Slot>,
    svc: &Service,
    nbd_bytes: usize,
) {
    for (kind, port, limit, open, bytes) in [
        (
            Kind::Nbd,
            NBD_PORT,
            MAX_NBD_CONNECTIONS,
            svc.nbd_connections(),
            nbd_bytes,
        ),
        (
            Kind::Http,
            HTTP_PORT,
            MAX_HTTP_CONNECTIONS,
            svc.http_connections(),
            HTTP_SOCKET_BYTES,
        ),
    ] {
        let listening = slots
            .iter()
            .filter(|s| s.kind == kind && s.conn.is_none())
            .count();
        for _ in (open + listening)..limit {
            let mut sock = tcp_socket(bytes);
            if sock.listen(port).is_ok() {
                let handle = sockets.add(sock);
                slots.push(Slot {
                    kind,
                    handle,
                    conn: None,
                });
            }
        }
    }
}

fn pump_rx(
    s: &mut Slot,
    sockets: &mut SocketSet<'static>,
    svc: &mut Service,
    st: &PlatformStatus,
) -> bool {
    let sock = sockets.get_mut::<tcp::Socket<'_>>(s.handle);
    if s.conn.is_none() {
        if !sock.is_active()
            || sock.state() == tcp::State::Listen
            || sock.state() == tcp::State::SynReceived
        {
            return false;
        }
        s.conn = Some(match s.kind {
            Kind::Nbd => svc.nbd_open(),
            Kind::Http => svc.http_open(),
        });
    }
    let id = s.conn.unwrap_or(0);
    let mut progress = false;
    while sock.can_recv() {
        let used = sock
            .recv(|buf| {
                let n = match s.kind {
                    Kind::Nbd => svc.nbd_recv(id, buf),
                    Kind::Http => svc.http_recv(id, buf, st),
                };
                (n, n)
            })
            .unwrap_or(0);
        if used == 0 {
            break;
        }
        progress = true;
    }
    progress
}

fn pump_tx(s: &mut Slot, sockets: &mut SocketSet<'static>, svc: &mut Service) -> bool {
    let Some(id) = s.conn else { return false };
    let sock = sockets.get_mut::<tcp::Socket<'_>>(s.handle);
    let mut progress = false;
    while sock.can_send() {
        let n = sock
            .send(|buf| {
                let n = match s.kind {
                    Kind::Nbd => svc.nbd_fill_tx(id, buf),
                    Kind::Http => svc.http_fill_tx(id, buf),
                };
                (n, n)
            })
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        progress = true;
    }
    let finished = match s.kind {
        Kind::Nbd => {
            // The peer's FIN, with every byte before it fed: requests cut
            // short are dropped, replies owed still go out.
            if !sock.may_recv() && sock.recv_queue() == 0 {
                svc.nbd_input_closed(id);
            }
            svc.nbd_finished(id)
        }
        // A peer that closed before its request was whole gets nothing:
        // its connection must not hold a place under the limit.
        Kind::Http => svc.http_finished(id) || (!sock.may_recv() && !svc.http_has_tx(id)),
    };
    if finished && sock.send_queue() == 0 && sock.state() != tcp::State::Closed {
        if sock.may_send() {
            sock.close();
        } else {
            sock.abort();
        }
        progress = true;
    }
    progress
}
