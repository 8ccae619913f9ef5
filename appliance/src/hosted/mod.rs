//! The hosted platform: the same service as the appliance, run as a Linux
//! process with files as disks and std sockets as connections.
//!
//! One thread runs one event loop, as in the unikernel: `poll(2)` on the
//! listeners, the connections and the disks' eventfd is the hosted
//! stand-in for virtio interrupts and smoltcp readiness, and the loop
//! sleeps in it when there is nothing to do. The disks' I/O threads play
//! the part of the device (see [`disk`]); the stack itself only ever runs
//! on the loop.
//!
//! Connections go through the service's [`Link`], the same receive and
//! send path the unikernel uses; this platform's [`Transport`] moves data
//! by address, as a device would: `writev(2)` straight from the sessions'
//! headers and the bios' pages, `readv(2)` straight into the pages of the
//! write being received. The pages are lent to the socket for the call.
//! Only request headers and what follows a payload in the same read pass
//! through the link's receive buffer.

pub mod disk;

use crate::service::{
    protocols::ISCSI, Limits, Link, Phase, PlatformStatus, Recv, Sent, Service, Transport,
    PROTOCOLS,
};
use arrayvec::ArrayVec;
use geom::disk::BlockDevice;
use geom::page::{DataCounters, PageLease};
use net::session::{PageSlice, TxPiece, MAX_PIECES};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What `strata hosted` runs.
#[derive(Clone, Debug)]
pub struct HostedOptions {
    /// Configuration text (the built-in default when `None`).
    pub config_text: Option<String>,
    /// Files to serve as disks vtbd0, vtbd1, … (they must exist).
    pub disks: Vec<PathBuf>,
    /// TCP port on 127.0.0.1 per protocol name; a protocol not named
    /// listens on its guest port.
    pub ports: Vec<(String, u16)>,
    /// Limits given on the command line, as `(KEY, VALUE)` for
    /// [`crate::service::Limits::set`] (`payload_budget`, `http_timeout_ms`, …).
    pub limits: Vec<(String, String)>,
    /// The management token changes must present (none: every change
    /// through the management port is refused).
    pub token: Option<String>,
    /// Secrets for the config's `-k NAME`: name and bytes.
    pub secrets: Vec<(String, Vec<u8>)>,
}

impl HostedOptions {
    /// The port protocol `name` listens on.
    pub fn port(&self, name: &str, default: u16) -> u16 {
        self.ports
            .iter()
            .find(|(n, _)| n == name)
            .map_or(default, |(_, p)| *p)
    }
}

/// Fills `out` from the kernel's generator; false when it cannot.
fn getrandom(out: &mut [u8]) -> bool {
    let mut got = 0;
    while got < out.len() {
        // SAFETY: the pointer and length describe the unfilled tail of
        // `out`, which lives across the call; getrandom(2) writes at most
        // that many bytes.
        let n = unsafe { libc::getrandom(out[got..].as_mut_ptr().cast(), out.len() - got, 0) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        got += n as usize;
    }
    true
}

/// Nanoseconds on the monotonic clock since the first call.
fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// How long the loop sleeps in `poll(2)` at most when idle, in ms (the
/// sessions' timeouts are ticked at least this often).
const IDLE_POLL_MS: i32 = 200;

/// After activity, the loop keeps polling without sleeping this long
/// before it sleeps in `poll(2)`: a client waiting for each reply sends its
/// next request within microseconds, and waking from sleep costs more.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `signal` has no other preconditions.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    // SAFETY: ignoring SIGPIPE makes writes to closed sockets return EPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// What `readv`/`writev` returned.
fn io_result(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A std socket as the link's transport: vectored system calls on the
/// addresses of lent pages.
pub struct Socket {
    stream: TcpStream,
    /// `poll(2)` said the socket is readable (or closed or failed).
    readable: bool,
    /// I/O vectors, kept to save an allocation per call.
    iov: Vec<libc::iovec>,
}

impl Socket {
    /// Wraps a connected stream (made non-blocking, Nagle off).
    pub fn new(stream: TcpStream) -> io::Result<Socket> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(Socket {
            stream,
            readable: true,
            iov: Vec::with_capacity(MAX_PIECES + 1),
        })
    }

    /// The socket may have input (the loop's `poll(2)` said so): the next
    /// receive tries a read.
    pub fn set_readable(&mut self) {
        self.readable = true;
    }
}

impl Transport for Socket {
    fn recv(&mut self, pieces: &[PageSlice<'_>], buf: &mut [u8], counters: &DataCounters) -> Recv {
        if !self.readable {
            return Recv::WouldBlock;
        }
        self.iov.clear();
        // The socket writes into the pages as a device would: they are
        // lent to it for the call.
        let mut leases: ArrayVec<PageLease<'_>, MAX_PIECES> = ArrayVec::new();
        let mut room = 0;
        for p in pieces {
            let Ok(lease) = p.page.lend() else {
                return Recv::Broken;
            };
            self.iov.push(libc::iovec {
                iov_base: (lease.dma_addr() + p.offset) as *mut libc::c_void,
                iov_len: p.len,
            });
            room += p.len;
            leases.push(lease);
        }
        self.iov.push(libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        });
        // SAFETY: each iovec covers live memory we may write: a range of a
        // page of the write being received (lent to this socket by
        // `leases`, so nothing can map it during the call), or `buf`, which
        // we borrow mutably.
        let r = io_result(unsafe {
            libc::readv(
                self.stream.as_raw_fd(),
                self.iov.as_ptr(),
                self.iov.len() as libc::c_int,
            )
        });
        drop(leases);
        match r {
            Ok(0) => Recv::Closed,
            Ok(n) => {
                // The kernel's copy from the socket into the pages.
                counters.add_copied(n.min(room));
                // A short read drained the socket; poll says when more comes.
                self.readable = n == room + buf.len();
                Recv::Got(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                Recv::WouldBlock
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Recv::Got(0),
            Err(_) => Recv::Broken,
        }
    }

    fn send(&mut self, pieces: &[TxPiece<'_>], counters: &DataCounters) -> Sent {
        self.iov.clear();
        let mut leases: ArrayVec<PageLease<'_>, MAX_PIECES> = ArrayVec::new();
        let mut pages = 0;
        for p in pieces {
            let (base, len) = match p {
                TxPiece::Bytes(b) => (b.as_ptr() as usize, b.len()),
                TxPiece::Page(s) => {
                    let Ok(lease) = s.page.lend() else {
                        return Sent::Broken;
                    };
                    let base = lease.dma_addr() + s.offset;
                    leases.push(lease);
                    pages += s.len;
                    (base, s.len)
                }
            };
            self.iov.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            });
        }
        // SAFETY: every iovec points into memory the session keeps
        // unchanged until `tx_advance` (its header and control buffers,
        // borrowed through `pieces`, and the pages of bios holding read
        // data, lent to this socket by `leases` so that nothing maps them
        // meanwhile); the kernel only reads it.
        let r = io_result(unsafe {
            libc::writev(
                self.stream.as_raw_fd(),
                self.iov.as_ptr(),
                self.iov.len() as libc::c_int,
            )
        });
        drop(leases);
        match r {
            Ok(n) => {
                counters.add_copied(n.min(pages));
                Sent::Took(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Sent::Took(0),
            Err(_) => Sent::Broken,
        }
    }
}

/// One connection: its socket and its link.
struct Conn {
    socket: Socket,
    link: Link,
}

fn listen(port: u16) -> Result<TcpListener, String> {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}

/// Largest payload budget hosted sizes by itself.
const HOSTED_MAX_BUDGET: u64 = crate::service::DEFAULT_PAYLOAD_BUDGET;

/// The host's memory (`MemTotal` of `/proc/meminfo`), if it says.
fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The service's limits: sized from the host's memory (the payload
/// budget at most [`HOSTED_MAX_BUDGET`]), then the options given.
fn limits(opts: &HostedOptions) -> Result<Limits, String> {
    let mut l = match host_memory_bytes() {
        Some(m) => {
            let mut l = Limits::for_memory(m);
            l.payload_budget_bytes = l.payload_budget_bytes.min(HOSTED_MAX_BUDGET);
            l
        }
        None => Limits::default(),
    };
    for (k, v) in &opts.limits {
        if !l.set(k, v)? {
            return Err(format!("unknown limit '{k}'"));
        }
    }
    if l.iscsi_portal.is_none() {
        l.iscsi_portal = Some(([127, 0, 0, 1], opts.port("iscsi", ISCSI.guest_port)));
    }
    Ok(l)
}

fn memory_status() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let mut f = text.split_whitespace();
    let page = 4096u64;
    let total = f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * page;
    let rss = f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * page;
    (total, rss)
}

/// Runs the hosted appliance until SIGINT, SIGTERM or `POST /shutdown`;
/// returns after flushing every disk.
pub fn run(opts: &HostedOptions) -> Result<(), String> {
    let text = opts.config_text.as_deref().unwrap_or("");
    let config = crate::service::parse_config(text).map_err(|e| format!("config error: {e}"))?;
    let waker = Arc::new(disk::Waker::new().map_err(|e| format!("eventfd: {e}"))?);
    let mut disks: Vec<Box<dyn BlockDevice>> = Vec::new();
    for p in &opts.disks {
        let d = disk::FileDisk::open(p, Some(waker.clone()))
            .map_err(|e| format!("cannot open disk {}: {e}", p.display()))?;
        disks.push(Box::new(d));
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let config_error = |e| format!("config error: {}", crate::service::locate_error(text, e));
    let limits = limits(opts)?;
    let mut svc = Service::boot(&config, disks, seed).map_err(config_error)?;
    svc.set_limits(limits);
    svc.set_token(opts.token.clone());
    for (name, bytes) in &opts.secrets {
        svc.set_secret(name, bytes);
    }
    // The key generator's seed: the kernel's generator (getrandom(2)).
    let mut entropy = [0u8; 32];
    if getrandom(&mut entropy) {
        svc.add_entropy(&entropy);
    } else {
        log::warn!("no entropy from getrandom(2): creating keys is refused");
    }
    svc.set_live_clock(monotonic_ns);
    // STRATA_AES=soft: the aes crate for every key, to measure it.
    if std::env::var("STRATA_AES").is_ok_and(|v| v == "soft") {
        crypt::xts::soft_only(true);
        log::info!("aes: the aes crate (STRATA_AES=soft)");
    }
    let started = Instant::now();
    svc.set_platform(Box::new(move || {
        let (total, used) = memory_status();
        PlatformStatus {
            platform: "hosted",
            uptime_ms: started.elapsed().as_millis() as u64,
            memory_total_bytes: total,
            memory_used_bytes: used,
        }
    }));
    let ports: Vec<u16> = PROTOCOLS
        .iter()
        .map(|p| opts.port(p.name, p.guest_port))
        .collect();
    let listeners = ports
        .iter()
        .map(|&p| listen(p))
        .collect::<Result<Vec<_>, _>>()?;
    install_signal_handlers();
    let mut conns: Vec<Conn> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut idle = false;
    let mut last_progress = Instant::now();
    let mut announced = false;
    loop {
        if STOP.load(Ordering::SeqCst) {
            svc.begin_shutdown();
        }
        if svc.stopped() {
            let result = svc.shutdown_result();
            // The disks' I/O threads are joined here, before the answer.
            drop(svc);
            return match result {
                Ok(()) => {
                    eprintln!("strata: shutdown: disks flushed");
                    Ok(())
                }
                Err(why) => Err(format!("shutdown failed: {why}")),
            };
        }
        match svc.phase() {
            Phase::Failed(e) => return Err(config_error(e.clone())),
            Phase::Serving if !announced => {
                announced = true;
                announce(&svc, &ports);
            }
            _ => {}
        }
        let ready = wait(
            &listeners,
            &waker,
            &mut conns,
            &svc,
            &mut fds,
            if idle && last_progress.elapsed() > SPIN {
                idle_timeout_ms(&svc, &started)
            } else {
                0
            },
        );
        svc.set_now_ns(started.elapsed().as_nanos() as u64);
        svc.tick(started.elapsed().as_millis() as u64);
        let mut progress = false;
        for (p, l) in listeners.iter().enumerate() {
            if ready[p] {
                progress |= accept(l, p, &mut svc, &mut conns);
            }
        }
        for c in conns.iter_mut() {
            progress |= c.link.receive(&mut svc, &mut c.socket);
        }
        progress |= svc.poll();
        for c in conns.iter_mut() {
            progress |= c.link.send(&mut svc, &mut c.socket);
            // Input held back by backpressure may fit now.
            progress |= c.link.receive(&mut svc, &mut c.socket);
        }
        conns.retain(|c| {
            let fin = c.link.finished(&svc);
            if fin {
                svc.close(c.link.id());
            }
            !fin
        });
        idle = !progress;
        if progress {
            last_progress = Instant::now();
        }
    }
}

/// Says what is served: exports and listening ports on stderr, a ready
/// line per export on stdout.
fn announce(svc: &Service, ports: &[u16]) {
    for e in svc.exports() {
        eprintln!(
            "strata: export {} size {} protocol {}",
            e.info.name, e.info.size_bytes, PROTOCOLS[e.protocol].name
        );
    }
    let listening: Vec<String> = PROTOCOLS
        .iter()
        .zip(ports)
        .map(|(p, port)| format!("{} {port}", p.name))
        .collect();
    eprintln!("strata: listening {}", listening.join(" "));
    let mut out = io::stdout().lock();
    for e in svc.exports() {
        let p = PROTOCOLS[e.protocol];
        let at = format!("127.0.0.1:{}", ports[e.protocol]);
        let _ = writeln!(out, "ready {}", (p.uri)(&at, &e.info.name));
    }
    let _ = out.flush();
}

/// How long an idle loop may sleep: [`IDLE_POLL_MS`], or less when the
/// stack has a timer due sooner (a delayed request in a nop).
fn idle_timeout_ms(svc: &Service, started: &Instant) -> i32 {
    let now = started.elapsed().as_nanos() as u64;
    match svc.next_deadline_ns() {
        Some(d) => (d.saturating_sub(now).div_ceil(1_000_000)).min(IDLE_POLL_MS as u64) as i32,
        None => IDLE_POLL_MS,
    }
}

/// Accepts every connection waiting on listener `p`; one the service has
/// no room for is closed at once (a clean FIN before any byte is sent).
fn accept(l: &TcpListener, p: usize, svc: &mut Service, conns: &mut Vec<Conn>) -> bool {
    let mut any = false;
    loop {
        match l.accept() {
            Ok((stream, _)) => {
                any = true;
                let Some(id) = svc.open(p) else {
                    // Dropping the stream closes it.
                    continue;
                };
                match Socket::new(stream) {
                    Ok(socket) => conns.push(Conn {
                        socket,
                        link: Link::new(id),
                    }),
                    Err(_) => svc.close(id),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return any,
        }
    }
}

/// Polls the listeners, the disks' waker and the connections, sleeping up
/// to `timeout_ms` when nothing is ready, and records what is: sockets
/// learn whether they are readable and whether a blocked send may go on.
/// Returns whether each listener has a connection waiting.
fn wait(
    listeners: &[TcpListener],
    waker: &disk::Waker,
    conns: &mut [Conn],
    svc: &Service,
    fds: &mut Vec<libc::pollfd>,
    timeout_ms: i32,
) -> ArrayVec<bool, 8> {
    fds.clear();
    let fixed = listeners.iter().map(|l| l.as_raw_fd()).chain([waker.fd()]);
    for fd in fixed {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
    }
    for c in conns.iter() {
        let mut events = 0;
        if !c.socket.readable && c.link.wants_input() {
            events |= libc::POLLIN;
        }
        if c.link.wants_output(svc) {
            events |= libc::POLLOUT;
        }
        fds.push(libc::pollfd {
            fd: c.socket.stream.as_raw_fd(),
            events,
            revents: 0,
        });
    }
    // SAFETY: `fds` is a live, correctly sized array of pollfd for the
    // duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    let fixed = listeners.len() + 1;
    if n <= 0 {
        return listeners.iter().map(|_| false).collect();
    }
    if fds[listeners.len()].revents != 0 {
        // Disk completions are collected by the service's poll.
        waker.clear();
    }
    for (c, p) in conns.iter_mut().zip(&fds[fixed..]) {
        if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            c.socket.set_readable();
        }
        if p.revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0 {
            c.link.writable();
        }
    }
    fds[..listeners.len()]
        .iter()
        .map(|f| f.revents != 0)
        .collect()
}
