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
//! NBD data moves by address, as a device would move it: replies go out
//! with `writev(2)` straight from the engine's headers and the bios' pages,
//! and write payloads come in with `readv(2)` straight into the pages of
//! the request being received (the NBD engine hands out both as page
//! ranges). Only request headers and what follows a payload in the same
//! read pass through a connection's receive buffer.

pub mod disk;

use crate::service::{PlatformStatus, Service, MAX_HTTP_CONNECTIONS, MAX_NBD_CONNECTIONS};
use geom::disk::BlockDevice;
use net::nbd::TxPiece;
use std::io::{self, Read, Write};
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
    /// TCP port for NBD on 127.0.0.1.
    pub nbd_port: u16,
    /// TCP port for the management endpoint on 127.0.0.1.
    pub http_port: u16,
}

/// Receive buffer per connection: request headers, and whatever arrives
/// with them.
const RX_BUF: usize = 256 << 10;
/// Most bytes an NBD connection reads into its receive buffer at once: a
/// batch of request headers, or a few small writes. Kept small so that a
/// large write's payload mostly lands straight in its pages.
const NBD_RX_READ: usize = 16 << 10;
/// Send buffer per management connection (NBD output needs none).
const TX_BUF: usize = 64 << 10;
/// Most pieces in one `writev`/`readv` (Linux allows 1024).
const MAX_IOV: usize = 512;
/// Most bytes offered to one `writev`.
const MAX_WRITEV_BYTES: usize = 8 << 20;
/// How long the loop sleeps in `poll(2)` at most when idle, in ms (the
/// timeouts of the NBD engine are ticked at least this often).
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nbd,
    Http,
}

struct Conn {
    kind: Kind,
    id: u32,
    stream: TcpStream,
    /// Received bytes not yet taken by the service: `rx[rx_start..rx_end]`.
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// Management output waiting to be written: `tx[tx_start..tx_end]`.
    tx: Vec<u8>,
    tx_start: usize,
    tx_end: usize,
    /// I/O vectors, kept to save an allocation per call.
    iov: Vec<libc::iovec>,
    /// `poll(2)` said the socket is readable (or closed or failed).
    readable: bool,
    /// The last send filled the socket: wait for `POLLOUT`.
    blocked: bool,
    /// The peer shut its side: nothing more to read.
    eof: bool,
    /// The socket failed (reset, or a write to a closed peer).
    broken: bool,
}

/// What `readv`/`writev` returned.
fn io_result(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl Conn {
    fn new(kind: Kind, id: u32, stream: TcpStream) -> io::Result<Conn> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            kind,
            id,
            stream,
            rx: vec![0; RX_BUF],
            rx_start: 0,
            rx_end: 0,
            tx: if kind == Kind::Http {
                vec![0; TX_BUF]
            } else {
                Vec::new()
            },
            tx_start: 0,
            tx_end: 0,
            iov: Vec::with_capacity(MAX_IOV + 1),
            readable: true,
            blocked: false,
            eof: false,
            broken: false,
        })
    }

    /// Hands buffered input to the service; true if it took any.
    fn feed(&mut self, svc: &mut Service, st: &mut Status) -> bool {
        if self.rx_start == self.rx_end {
            return false;
        }
        let data = &self.rx[self.rx_start..self.rx_end];
        let used = match self.kind {
            Kind::Nbd => svc.nbd_recv(self.id, data),
            Kind::Http => svc.http_recv(self.id, data, st.get()),
        };
        self.rx_start += used;
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        used > 0
    }

    /// Receives and feeds until the socket is drained or the service stops
    /// taking input; true on progress.
    fn receive(&mut self, svc: &mut Service, st: &mut Status) -> bool {
        let mut progress = self.feed(svc, st);
        while self.readable && !self.eof && !self.broken {
            if self.rx_start != self.rx_end {
                // Held back by backpressure: the rest waits in the buffer.
                break;
            }
            let r = match self.kind {
                Kind::Nbd => self.read_nbd(svc),
                Kind::Http => self.stream.read(&mut self.rx).map(|n| {
                    self.rx_end = n;
                    (n, n == self.rx.len())
                }),
            };
            match r {
                Ok((0, _)) => self.eof = true,
                Ok((_, full)) => {
                    progress = true;
                    // A short read drained the socket; poll says when more comes.
                    self.readable = full;
                    self.feed(svc, st);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.broken = true,
            }
        }
        if self.eof && self.kind == Kind::Nbd && self.rx_start == self.rx_end {
            // Every byte the peer sent was fed: it still gets its replies.
            svc.nbd_input_closed(self.id);
        }
        progress
    }

    /// One `readv` for an NBD connection (whose receive buffer is empty):
    /// write payload straight into the bio's pages, anything after it
    /// into the buffer. Returns the bytes received, and whether every
    /// vector was filled (so more may be waiting).
    fn read_nbd(&mut self, svc: &mut Service) -> io::Result<(usize, bool)> {
        let mut pieces = Vec::new();
        let room = svc.nbd_rx_pieces(self.id, &mut pieces, MAX_IOV);
        self.iov.clear();
        // The socket writes into the pages as a device would: they are
        // lent to it for the call.
        let mut leases = Vec::with_capacity(pieces.len());
        for p in &pieces {
            let Ok(lease) = p.page.lend() else {
                return Err(io::Error::other("a page of the request is mapped"));
            };
            self.iov.push(libc::iovec {
                iov_base: (lease.dma_addr() + p.offset) as *mut libc::c_void,
                iov_len: p.len,
            });
            leases.push(lease);
        }
        let buffered = self.rx.len().min(NBD_RX_READ);
        self.iov.push(libc::iovec {
            iov_base: self.rx.as_mut_ptr() as *mut libc::c_void,
            iov_len: buffered,
        });
        // SAFETY: each iovec covers live memory we may write: a range of a
        // page of the write being received (lent to this socket by
        // `leases`, so nothing can map it during the call), or the whole
        // receive buffer, which is empty and borrowed by nothing.
        let n = io_result(unsafe {
            libc::readv(
                self.stream.as_raw_fd(),
                self.iov.as_ptr(),
                self.iov.len() as libc::c_int,
            )
        })?;
        drop(leases);
        drop(pieces);
        let direct = n.min(room);
        if direct > 0 {
            svc.nbd_rx_filled(self.id, direct);
        }
        self.rx_start = 0;
        self.rx_end = n - direct;
        Ok((n, n == room + buffered))
    }

    /// Sends what the service has for this connection; true on progress.
    fn send(&mut self, svc: &mut Service) -> bool {
        if self.blocked || self.broken {
            return false;
        }
        match self.kind {
            Kind::Nbd => self.send_nbd(svc),
            Kind::Http => self.send_http(svc),
        }
    }

    /// `writev` straight from the engine's headers and the bios' pages.
    fn send_nbd(&mut self, svc: &mut Service) -> bool {
        let mut progress = false;
        loop {
            let mut pieces = Vec::new();
            svc.nbd_tx_pieces(self.id, &mut pieces, MAX_IOV, MAX_WRITEV_BYTES);
            if pieces.is_empty() {
                return progress;
            }
            self.iov.clear();
            let mut total = 0;
            let mut leases = Vec::new();
            for p in &pieces {
                let (base, len) = match p {
                    TxPiece::Bytes(b) => (b.as_ptr() as usize, b.len()),
                    TxPiece::Page(s) => {
                        let Ok(lease) = s.page.lend() else {
                            self.broken = true;
                            return progress;
                        };
                        let base = lease.dma_addr() + s.offset;
                        leases.push(lease);
                        (base, s.len)
                    }
                };
                total += len;
                self.iov.push(libc::iovec {
                    iov_base: base as *mut libc::c_void,
                    iov_len: len,
                });
            }
            // SAFETY: every iovec points into memory the service owns and
            // keeps unchanged until `nbd_tx_advance` (the engine's header
            // and control buffers, and the pages of bios holding read data
            // waiting to be sent, lent to this socket by `leases` so that
            // nothing maps them meanwhile); the kernel only reads it.
            let r = io_result(unsafe {
                libc::writev(
                    self.stream.as_raw_fd(),
                    self.iov.as_ptr(),
                    self.iov.len() as libc::c_int,
                )
            });
            drop(leases);
            drop(pieces);
            match r {
                Ok(n) => {
                    svc.nbd_tx_advance(self.id, n);
                    progress |= n > 0;
                    if n < total {
                        self.blocked = true;
                        return progress;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return progress;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.broken = true;
                    return progress;
                }
            }
        }
    }

    fn send_http(&mut self, svc: &mut Service) -> bool {
        let mut progress = false;
        loop {
            if self.tx_start == self.tx_end {
                self.tx_start = 0;
                self.tx_end = 0;
            }
            if self.tx_end < self.tx.len() {
                self.tx_end += svc.http_fill_tx(self.id, &mut self.tx[self.tx_end..]);
            }
            if self.tx_start == self.tx_end {
                return progress;
            }
            match self.stream.write(&self.tx[self.tx_start..self.tx_end]) {
                Ok(n) => {
                    self.tx_start += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return progress;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.broken = true;
                    return progress;
                }
            }
        }
    }

    fn wants_out(&self, svc: &Service) -> bool {
        match self.kind {
            Kind::Nbd => svc.nbd_has_tx(self.id),
            Kind::Http => self.tx_start != self.tx_end,
        }
    }

    fn finished(&self, svc: &Service) -> bool {
        self.broken
            || match self.kind {
                Kind::Nbd => svc.nbd_finished(self.id),
                Kind::Http => {
                    self.eof || (svc.http_finished(self.id) && self.tx_start == self.tx_end)
                }
            }
    }
}

/// The platform facts for `/status`, read from `/proc` only when a
/// management request needs them.
struct Status {
    started: Instant,
    cached: Option<PlatformStatus>,
}

impl Status {
    fn get(&mut self) -> &PlatformStatus {
        let started = self.started;
        self.cached.get_or_insert_with(|| {
            let (total, used) = memory_status();
            PlatformStatus {
                platform: "hosted",
                uptime_ms: started.elapsed().as_millis() as u64,
                memory_total_bytes: total,
                memory_used_bytes: used,
            }
        })
    }
}

fn listen(port: u16) -> Result<TcpListener, String> {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
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
    let config = match &opts.config_text {
        Some(t) => geom::config::parse(t).map_err(|e| format!("config error: {e}"))?,
        None => geom::config::Config::default(),
    };
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
    let mut svc = Service::with_seed(&config, disks, seed).map_err(|e| {
        let e = crate::service::locate_error(opts.config_text.as_deref().unwrap_or(""), e);
        format!("config error: {e}")
    })?;
    let nbd_listener = listen(opts.nbd_port)?;
    let http_listener = listen(opts.http_port)?;
    install_signal_handlers();
    let started = Instant::now();
    for e in svc.exports() {
        eprintln!("strata: export {} size {}", e.name, e.size_bytes);
    }
    eprintln!(
        "strata: listening nbd {} http {}",
        opts.nbd_port, opts.http_port
    );
    {
        let mut out = io::stdout().lock();
        for e in svc.exports() {
            let _ = writeln!(out, "ready nbd://127.0.0.1:{}/{}", opts.nbd_port, e.name);
        }
        let _ = out.flush();
    }
    let mut conns: Vec<Conn> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut idle = false;
    let mut last_progress = Instant::now();
    loop {
        if STOP.load(Ordering::SeqCst) {
            svc.begin_shutdown();
        }
        if svc.shutdown_done() {
            eprintln!("strata: shutdown: disks flushed");
            return Ok(());
        }
        let (nbd_ready, http_ready) = wait(
            [&nbd_listener, &http_listener],
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
        let mut st = Status {
            started,
            cached: None,
        };
        svc.nbd_tick(started.elapsed().as_millis() as u64);
        let mut progress = false;
        if !svc.shutting_down() {
            if nbd_ready {
                progress |= accept(&nbd_listener, Kind::Nbd, &mut svc, &mut conns);
            }
            if http_ready {
                progress |= accept(&http_listener, Kind::Http, &mut svc, &mut conns);
            }
        }
        for c in conns.iter_mut() {
            progress |= c.receive(&mut svc, &mut st);
        }
        progress |= svc.poll();
        for c in conns.iter_mut() {
            progress |= c.send(&mut svc);
            // Input held back by backpressure may fit now.
            progress |= c.receive(&mut svc, &mut st);
        }
        conns.retain(|c| {
            let fin = c.finished(&svc);
            if fin {
                match c.kind {
                    Kind::Nbd => svc.nbd_close(c.id),
                    Kind::Http => svc.http_close(c.id),
                }
            }
            !fin
        });
        idle = !progress;
        if progress {
            last_progress = Instant::now();
        }
    }
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

fn accept(l: &TcpListener, kind: Kind, svc: &mut Service, conns: &mut Vec<Conn>) -> bool {
    let mut any = false;
    loop {
        match l.accept() {
            Ok((stream, _)) => {
                any = true;
                let full = match kind {
                    Kind::Nbd => svc.nbd_connections() >= MAX_NBD_CONNECTIONS,
                    Kind::Http => svc.http_connections() >= MAX_HTTP_CONNECTIONS,
                };
                if full {
                    // Beyond the limit: dropping the stream closes it with
                    // a clean FIN before any byte is sent.
                    continue;
                }
                let id = match kind {
                    Kind::Nbd => svc.nbd_open(),
                    Kind::Http => svc.http_open(),
                };
                match Conn::new(kind, id, stream) {
                    Ok(c) => conns.push(c),
                    Err(_) => match kind {
                        Kind::Nbd => svc.nbd_close(id),
                        Kind::Http => svc.http_close(id),
                    },
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return any,
        }
    }
}

/// Polls the listeners, the disks' waker and the connections, sleeping up
/// to `timeout_ms` when nothing is ready, and records what is: connections
/// learn whether they are readable and whether a blocked send may go on.
/// Returns whether each listener has a connection waiting.
fn wait(
    listeners: [&TcpListener; 2],
    waker: &disk::Waker,
    conns: &mut [Conn],
    svc: &Service,
    fds: &mut Vec<libc::pollfd>,
    timeout_ms: i32,
) -> (bool, bool) {
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
        if !c.readable && !c.eof && !c.broken && c.rx_start == c.rx_end {
            events |= libc::POLLIN;
        }
        if c.blocked || (c.wants_out(svc) && !c.broken) {
            events |= libc::POLLOUT;
        }
        fds.push(libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events,
            revents: 0,
        });
    }
    // SAFETY: `fds` is a live, correctly sized array of pollfd for the
    // duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return (false, false);
    }
    if fds[2].revents != 0 {
        // Disk completions are collected by the service's poll.
        waker.clear();
    }
    for (c, p) in conns.iter_mut().zip(&fds[3..]) {
        if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            c.readable = true;
        }
        if p.revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0 {
            c.blocked = false;
        }
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}
