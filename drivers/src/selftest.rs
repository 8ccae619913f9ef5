//! Bring-up checks and measurements for the drivers, run inside the
//! appliance (they need a real device): a block check that writes a
//! pattern with many requests in flight, reads it back, flushes, discards
//! and writes zeroes; a block throughput run; and a TCP service over
//! smoltcp that sinks, sources or echoes data for throughput runs from the
//! host.
//!
//! The pattern is a function of the byte offset on the disk, so the host
//! can check the image afterwards: every 8-byte word at offset `o` holds
//! `o ^ PATTERN_KEY` in little endian ([`pattern_word`]).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use geom::bio::{Bio, BioCmd, BioResult};
use geom::disk::BlockDevice;
use geom::page::{DataCounters, SgList};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

/// What the checks need from the platform.
pub trait Env {
    /// Monotonic time in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Sleeps until an interrupt or `deadline_ns`; may return early.
    fn idle(&mut self, deadline_ns: Option<u64>);
}

/// Key of the on-disk test pattern.
pub const PATTERN_KEY: u64 = 0x5354_5241_5441_0000;

/// The pattern word at byte offset `offset` (a multiple of 8).
pub fn pattern_word(offset: u64) -> u64 {
    offset ^ PATTERN_KEY
}

fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(offset + 8 * i as u64).to_le_bytes());
    }
}

/// Submits `bios` keeping as many in flight as the device takes, and
/// waits for all of them. Returns results in completion order and the
/// most bios seen in flight.
pub fn run_bios(
    dev: &mut dyn BlockDevice,
    bios: Vec<Bio>,
    env: &mut dyn Env,
) -> (Vec<(Bio, BioResult)>, usize) {
    let total = bios.len();
    let mut waiting: alloc::collections::VecDeque<Bio> = bios.into();
    let mut done = Vec::with_capacity(total);
    let mut in_flight = 0usize;
    let mut max_in_flight = 0usize;
    while done.len() < total {
        while let Some(b) = waiting.pop_front() {
            match dev.submit(b) {
                Ok(()) => {
                    in_flight += 1;
                    max_in_flight = max_in_flight.max(in_flight);
                }
                Err(b) => {
                    waiting.push_front(b);
                    break;
                }
            }
        }
        let n = dev.poll(&mut |b, r| done.push((b, r)));
        in_flight -= n;
        if n == 0 {
            let now = env.now_ns();
            env.idle(Some(now + 1_000_000));
        }
    }
    (done, max_in_flight)
}

/// What [`blk_check`] did.
#[derive(Clone, Debug, Default)]
pub struct BlkCheckReport {
    /// Bytes written and read back.
    pub bytes: u64,
    /// Most bios in flight while writing.
    pub max_in_flight: usize,
    /// Flush was issued (the device has a cache).
    pub flushed: bool,
    /// Discard was issued on `[discard.0, discard.0 + discard.1)`.
    pub discard: Option<(u64, u64)>,
    /// Write-zeroes was issued on that range and read back as zeroes.
    pub write_zeroes: Option<(u64, u64)>,
}

/// Writes the pattern to `[0, count * bio_bytes)` with `count` bios in
/// flight at once, flushes, reads it back and compares; then discards the
/// third quarter and write-zeroes the last quarter of that range, and
/// reads the last quarter back as zeroes. Leaves the image so the host can
/// check: pattern in the first half, zeroes (or the old pattern where
/// discard kept data) after.
pub fn blk_check(
    dev: &mut dyn BlockDevice,
    count: usize,
    bio_bytes: usize,
    env: &mut dyn Env,
) -> Result<BlkCheckReport, String> {
    let c = DataCounters::new();
    let info = dev.info();
    let total = (count * bio_bytes) as u64;
    if total > info.size_bytes {
        return Err(format!("disk too small: {} < {total}", info.size_bytes));
    }
    let mut report = BlkCheckReport {
        bytes: total,
        ..Default::default()
    };
    let mut buf = vec![0u8; bio_bytes];
    let writes: Vec<Bio> = (0..count)
        .map(|i| {
            let off = (i * bio_bytes) as u64;
            fill_pattern(&mut buf, off);
            let sg = SgList::alloc(bio_bytes);
            sg.copy_from_slice(0, &buf, &c).expect("pages not lent");
            Bio::with_data(BioCmd::Write, off, sg)
        })
        .collect();
    let (done, max) = run_bios(dev, writes, env);
    report.max_in_flight = max;
    if let Some((b, r)) = done.iter().find(|(_, r)| r.is_err()) {
        return Err(format!("write at {} failed: {r:?}", b.offset));
    }
    if info.can_flush {
        let (done, _) = run_bios(dev, vec![Bio::flush()], env);
        done[0].1.map_err(|e| format!("flush failed: {e:?}"))?;
        report.flushed = true;
    }
    let reads: Vec<Bio> = (0..count)
        .map(|i| Bio::read((i * bio_bytes) as u64, bio_bytes as u64))
        .collect();
    let (done, _) = run_bios(dev, reads, env);
    for (b, r) in &done {
        r.map_err(|e| format!("read at {} failed: {e:?}", b.offset))?;
        fill_pattern(&mut buf, b.offset);
        let mut got = vec![0u8; bio_bytes];
        b.sg.copy_to_slice(0, &mut got, &c).expect("pages not lent");
        if got != buf {
            let at = got.iter().zip(&buf).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("read back mismatch at {}", b.offset + at as u64));
        }
    }
    let quarter = (total / 4) / u64::from(info.sector_size) * u64::from(info.sector_size);
    if info.can_discard && quarter > 0 {
        let (done, _) = run_bios(
            dev,
            vec![Bio::no_data(BioCmd::Discard, 2 * quarter, quarter)],
            env,
        );
        done[0].1.map_err(|e| format!("discard failed: {e:?}"))?;
        report.discard = Some((2 * quarter, quarter));
    }
    if info.can_write_zeroes && quarter > 0 {
        let (done, _) = run_bios(
            dev,
            vec![Bio::no_data(BioCmd::WriteZeroes, 3 * quarter, quarter)],
            env,
        );
        done[0]
            .1
            .map_err(|e| format!("write-zeroes failed: {e:?}"))?;
        let (done, _) = run_bios(dev, vec![Bio::read(3 * quarter, quarter)], env);
        done[0]
            .1
            .map_err(|e| format!("read after write-zeroes failed: {e:?}"))?;
        let mut got = vec![0u8; quarter as usize];
        done[0]
            .0
            .sg
            .copy_to_slice(0, &mut got, &c)
            .expect("pages not lent");
        if got.iter().any(|&b| b != 0) {
            return Err(String::from("write-zeroes range does not read as zeroes"));
        }
        report.write_zeroes = Some((3 * quarter, quarter));
    }
    if info.can_flush {
        let (done, _) = run_bios(dev, vec![Bio::flush()], env);
        done[0].1.map_err(|e| format!("flush failed: {e:?}"))?;
    }
    Ok(report)
}

/// Runs `n` sequential `cmd` bios of `bio_bytes` from offset 0 with up to
/// `depth` in flight, recycling their pages. Returns the elapsed time.
fn stream(
    dev: &mut dyn BlockDevice,
    cmd: BioCmd,
    n: usize,
    bio_bytes: usize,
    depth: usize,
    env: &mut dyn Env,
) -> Result<u64, String> {
    let mut free: Vec<SgList> = (0..depth).map(|_| SgList::alloc(bio_bytes)).collect();
    let mut parked: Option<Bio> = None;
    let (mut next, mut done) = (0usize, 0usize);
    let mut failed = None;
    let t0 = env.now_ns();
    while done < n {
        loop {
            let bio = match parked.take() {
                Some(b) => b,
                None if next < n => match free.pop() {
                    Some(sg) => {
                        next += 1;
                        Bio::with_data(cmd, ((next - 1) * bio_bytes) as u64, sg)
                    }
                    None => break,
                },
                None => break,
            };
            if let Err(b) = dev.submit(bio) {
                parked = Some(b);
                break;
            }
        }
        let k = dev.poll(&mut |b, r| {
            if let Err(e) = r {
                failed.get_or_insert(format!("{} at {}: {e:?}", cmd.name(), b.offset));
            }
            free.push(b.sg);
        });
        done += k;
        if k == 0 {
            let now = env.now_ns();
            env.idle(Some(now + 1_000_000));
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(env.now_ns() - t0),
    }
}

/// Sequential throughput in bytes per second, (write, read), over the
/// first `bytes` of the disk with bios of `bio_bytes` and `depth` in
/// flight.
pub fn blk_bench(
    dev: &mut dyn BlockDevice,
    bytes: u64,
    bio_bytes: usize,
    depth: usize,
    env: &mut dyn Env,
) -> Result<(u64, u64), String> {
    let n = (bytes / bio_bytes as u64) as usize;
    let w = stream(dev, BioCmd::Write, n, bio_bytes, depth, env)?;
    let r = stream(dev, BioCmd::Read, n, bio_bytes, depth, env)?;
    let bytes = (n * bio_bytes) as u64;
    let rate = |ns: u64| bytes * 1_000_000_000 / ns.max(1);
    Ok((rate(w), rate(r)))
}

/// How the TCP service gets its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// A static address with a gateway.
    Static {
        /// Address and prefix.
        cidr: Ipv4Cidr,
        /// Default gateway.
        gateway: Ipv4Address,
    },
    /// DHCPv4 (RFC 2131) through smoltcp's client.
    Dhcp,
}

/// Settings of [`tcp_service`].
#[derive(Clone, Copy, Debug)]
pub struct TcpServiceConfig {
    /// Address setup.
    pub addressing: Addressing,
    /// Port where everything received is discarded (host → guest).
    pub sink_port: u16,
    /// Port that sends `source_bytes` to whoever connects, then closes
    /// (guest → host).
    pub source_port: u16,
    /// Port that echoes what it receives.
    pub echo_port: u16,
    /// Bytes the source port sends per connection.
    pub source_bytes: u64,
    /// Socket buffer size in bytes, each direction.
    pub buffer_bytes: usize,
    /// Connections to serve (over all ports) before returning.
    pub connections: usize,
}

/// One connection served by [`tcp_service`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnReport {
    /// Local port.
    pub port: u16,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// From establishment to close, in nanoseconds.
    pub ns: u64,
}

struct Server {
    handle: SocketHandle,
    port: u16,
    started_ns: Option<u64>,
    rx: u64,
    tx: u64,
}

fn tcp_socket(bytes: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; bytes]),
        tcp::SocketBuffer::new(vec![0u8; bytes]),
    );
    // Delayed ACKs with few segments in flight stall the sender; Nagle
    // would hold back small echo replies.
    s.set_ack_delay(None);
    s.set_nagle_enabled(false);
    s
}

/// Serves the sink, source and echo ports over `dev` with smoltcp until
/// `cfg.connections` connections have closed. `log` gets progress lines
/// (address acquired, listening, each connection's figures). `after_wake`
/// runs each time the loop wakes from [`Env::idle`] (the NIC's interrupt
/// is acknowledged by the `Env`, e.g. through [`crate::IrqAck`]).
pub fn tcp_service<D: Device>(
    dev: &mut D,
    mac: [u8; 6],
    cfg: &TcpServiceConfig,
    env: &mut dyn Env,
    log: &mut dyn FnMut(&str),
    mut after_wake: impl FnMut(&mut D),
) -> Vec<ConnReport> {
    let now = |env: &dyn Env| Instant::from_micros((env.now_ns() / 1000) as i64);
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = env.now_ns() ^ 0x9e37_79b9_7f4a_7c15;
    let mut iface = Interface::new(config, dev, now(env));
    let mut sockets = SocketSet::new(Vec::new());
    let mut dhcp = None;
    match cfg.addressing {
        Addressing::Static { cidr, gateway } => {
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::Ipv4(cidr));
            });
            let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        }
        Addressing::Dhcp => {
            dhcp = Some(sockets.add(dhcpv4::Socket::new()));
        }
    }
    let mut configured = matches!(cfg.addressing, Addressing::Static { .. });
    let mut servers: Vec<Server> = Vec::new();
    let mut reports = Vec::new();
    let ports = [cfg.sink_port, cfg.source_port, cfg.echo_port];
    let mut scratch = vec![0u8; 65536];
    let mut listening = false;
    while reports.len() < cfg.connections {
        let t = now(env);
        let changed =
            iface.poll(t, dev, &mut sockets) == smoltcp::iface::PollResult::SocketStateChanged;
        let mut progress = changed;
        if let Some(h) = dhcp {
            if let Some(ev) = sockets.get_mut::<dhcpv4::Socket<'_>>(h).poll() {
                match ev {
                    dhcpv4::Event::Configured(c) => {
                        iface.update_ip_addrs(|a| {
                            a.clear();
                            let _ = a.push(IpCidr::Ipv4(c.address));
                        });
                        if let Some(r) = c.router {
                            let _ = iface.routes_mut().add_default_ipv4_route(r);
                        }
                        log(&format!(
                            "dhcp: address {} router {:?}",
                            c.address, c.router
                        ));
                        configured = true;
                    }
                    dhcpv4::Event::Deconfigured => {
                        iface.update_ip_addrs(|a| a.clear());
                        configured = false;
                    }
                }
                progress = true;
            }
        }
        if configured && !listening {
            for port in ports {
                let handle = sockets.add(tcp_socket(cfg.buffer_bytes));
                let _ = sockets.get_mut::<tcp::Socket<'_>>(handle).listen(port);
                servers.push(Server {
                    handle,
                    port,
                    started_ns: None,
                    rx: 0,
                    tx: 0,
                });
            }
            listening = true;
            log(&format!(
                "tcp: listening sink {} source {} echo {}",
                cfg.sink_port, cfg.source_port, cfg.echo_port
            ));
        }
        for s in servers.iter_mut() {
            let sock = sockets.get_mut::<tcp::Socket<'_>>(s.handle);
            if sock.is_active() && s.started_ns.is_none() && sock.state() == tcp::State::Established
            {
                s.started_ns = Some(env.now_ns());
            }
            if s.port == cfg.sink_port || s.port == cfg.echo_port {
                while sock.can_recv() {
                    let n = if s.port == cfg.echo_port {
                        let room = sock.send_capacity() - sock.send_queue();
                        let want = room.min(scratch.len());
                        if want == 0 {
                            break;
                        }
                        let n = sock.recv_slice(&mut scratch[..want]).unwrap_or(0);
                        let _ = sock.send_slice(&scratch[..n]);
                        s.tx += n as u64;
                        n
                    } else {
                        sock.recv(|b| (b.len(), b.len())).unwrap_or(0)
                    };
                    if n == 0 {
                        break;
                    }
                    s.rx += n as u64;
                    progress = true;
                }
                if !sock.may_recv() && sock.state() == tcp::State::CloseWait {
                    sock.close();
                }
            }
            if s.port == cfg.source_port && s.started_ns.is_some() {
                while s.tx < cfg.source_bytes && sock.can_send() {
                    let left = cfg.source_bytes - s.tx;
                    let n = sock
                        .send(|b| {
                            let n = b.len().min(left as usize);
                            (n, n)
                        })
                        .unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    s.tx += n as u64;
                    progress = true;
                }
                if s.tx >= cfg.source_bytes && sock.state() == tcp::State::Established {
                    sock.close();
                }
            }
            if s.started_ns.is_some() && !sock.is_open() {
                let ns = env.now_ns() - s.started_ns.unwrap_or(0);
                let r = ConnReport {
                    port: s.port,
                    rx_bytes: s.rx,
                    tx_bytes: s.tx,
                    ns,
                };
                log(&format!(
                    "tcp: port {} rx {} tx {} bytes in {} ms ({} KB/s)",
                    r.port,
                    r.rx_bytes,
                    r.tx_bytes,
                    r.ns / 1_000_000,
                    (r.rx_bytes + r.tx_bytes) * 1_000_000 / r.ns.max(1)
                ));
                reports.push(r);
                *s = Server {
                    handle: s.handle,
                    port: s.port,
                    started_ns: None,
                    rx: 0,
                    tx: 0,
                };
                let _ = sock.listen(s.port);
            }
        }
        if !progress {
            let t = now(env);
            let delay = iface
                .poll_delay(t, &sockets)
                .unwrap_or(Duration::from_millis(100));
            let deadline = env.now_ns() + delay.total_micros() * 1000;
            env.idle(Some(deadline));
            after_wake(dev);
        }
    }
    reports
}

/// Default socket settings for measurements from the host.
pub fn default_tcp_config() -> TcpServiceConfig {
    TcpServiceConfig {
        addressing: Addressing::Static {
            cidr: Ipv4Cidr::new(Ipv4Address::new(10, 0, 2, 15), 24),
            gateway: Ipv4Address::new(10, 0, 2, 2),
        },
        sink_port: 5001,
        source_port: 5002,
        echo_port: 5003,
        source_bytes: 64 << 20,
        buffer_bytes: 512 << 10,
        connections: 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_offset_keyed() {
        let mut b = [0u8; 16];
        fill_pattern(&mut b, 4096);
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            4096 ^ PATTERN_KEY
        );
        assert_eq!(
            u64::from_le_bytes(b[8..16].try_into().unwrap()),
            4104 ^ PATTERN_KEY
        );
    }
}
