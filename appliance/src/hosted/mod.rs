//! The hosted platform: the same service as the appliance, run as a Linux
//! process with files as disks and std sockets as connections.
//!
//! One thread runs one event loop, as in the unikernel: `poll(2)` on the
//! listeners and connections is the hosted stand-in for virtio interrupts
//! and smoltcp readiness, and the loop sleeps in it when there is nothing
//! to do.

pub mod disk;

use crate::service::{PlatformStatus, Service};
use geom::disk::BlockDevice;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Receive buffer per connection: enough for a few large requests.
const RX_BUF: usize = 1 << 20;
/// Send buffer per connection.
const TX_BUF: usize = 1 << 20;

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
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    tx_start: usize,
    tx_end: usize,
    peer_closed: bool,
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
            rx_len: 0,
            tx: vec![0; TX_BUF],
            tx_start: 0,
            tx_end: 0,
            peer_closed: false,
        })
    }

    /// Reads what the socket has; returns true on progress.
    fn read(&mut self) -> bool {
        let mut progress = false;
        while self.rx_len < self.rx.len() && !self.peer_closed {
            match self.stream.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => self.peer_closed = true,
                Ok(n) => {
                    self.rx_len += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.peer_closed = true,
            }
        }
        progress
    }

    /// Hands buffered input to the service.
    fn feed(&mut self, svc: &mut Service, st: &PlatformStatus) -> bool {
        if self.rx_len == 0 {
            return false;
        }
        let used = match self.kind {
            Kind::Nbd => svc.nbd_recv(self.id, &self.rx[..self.rx_len]),
            Kind::Http => svc.http_recv(self.id, &self.rx[..self.rx_len], st),
        };
        if used > 0 {
            self.rx.copy_within(used..self.rx_len, 0);
            self.rx_len -= used;
        }
        used > 0
    }

    /// Takes output from the service and writes what the socket accepts.
    fn write(&mut self, svc: &mut Service) -> bool {
        let mut progress = false;
        loop {
            if self.tx_start == self.tx_end {
                self.tx_start = 0;
                self.tx_end = 0;
            }
            if self.tx_end < self.tx.len() {
                let n = match self.kind {
                    Kind::Nbd => svc.nbd_fill_tx(self.id, &mut self.tx[self.tx_end..]),
                    Kind::Http => svc.http_fill_tx(self.id, &mut self.tx[self.tx_end..]),
                };
                self.tx_end += n;
            }
            if self.tx_start == self.tx_end {
                return progress;
            }
            match self.stream.write(&self.tx[self.tx_start..self.tx_end]) {
                Ok(n) => {
                    self.tx_start += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return progress,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.peer_closed = true;
                    return progress;
                }
            }
        }
    }

    fn finished(&self, svc: &Service) -> bool {
        let done = match self.kind {
            Kind::Nbd => svc.nbd_finished(self.id),
            Kind::Http => svc.http_finished(self.id),
        };
        self.peer_closed || (done && self.tx_start == self.tx_end)
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
    let mut disks: Vec<Box<dyn BlockDevice>> = Vec::new();
    for p in &opts.disks {
        let d = disk::FileDisk::open(p)
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
    let mut idle = false;
    loop {
        if STOP.load(Ordering::SeqCst) {
            svc.begin_shutdown();
        }
        if svc.shutdown_done() {
            eprintln!("strata: shutdown: disks flushed");
            return Ok(());
        }
        let timeout = if idle {
            idle_timeout_ms(&svc, &started)
        } else {
            0
        };
        wait(&nbd_listener, &http_listener, &conns, &svc, timeout);
        svc.set_now_ns(started.elapsed().as_nanos() as u64);
        let (total, used) = memory_status();
        let st = PlatformStatus {
            platform: "hosted",
            uptime_ms: started.elapsed().as_millis() as u64,
            memory_total_bytes: total,
            memory_used_bytes: used,
        };
        let mut progress = false;
        if !svc.shutting_down() {
            progress |= accept(&nbd_listener, Kind::Nbd, &mut svc, &mut conns);
            progress |= accept(&http_listener, Kind::Http, &mut svc, &mut conns);
        }
        for c in conns.iter_mut() {
            progress |= c.read();
            progress |= c.feed(&mut svc, &st);
        }
        progress |= svc.poll();
        for c in conns.iter_mut() {
            progress |= c.write(&mut svc);
            // Input held back by backpressure may fit now.
            progress |= c.feed(&mut svc, &st);
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
    }
}

/// How long an idle loop may sleep: 200 ms, or less when the stack has a
/// timer due sooner (a delayed request in a nop).
fn idle_timeout_ms(svc: &Service, started: &Instant) -> i32 {
    let now = started.elapsed().as_nanos() as u64;
    match svc.next_deadline_ns() {
        Some(d) => (d.saturating_sub(now).div_ceil(1_000_000)).min(200) as i32,
        None => 200,
    }
}

fn accept(l: &TcpListener, kind: Kind, svc: &mut Service, conns: &mut Vec<Conn>) -> bool {
    let mut any = false;
    loop {
        match l.accept() {
            Ok((stream, _)) => {
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
                any = true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return any,
        }
    }
}

/// Sleeps until a socket is ready or `timeout_ms` passes.
fn wait(nbd: &TcpListener, http: &TcpListener, conns: &[Conn], svc: &Service, timeout_ms: i32) {
    if timeout_ms == 0 {
        return;
    }
    let mut fds = vec![
        libc::pollfd {
            fd: nbd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: http.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    for c in conns {
        let mut events = 0;
        if c.rx_len < c.rx.len() && !c.peer_closed {
            events |= libc::POLLIN;
        }
        if c.tx_start != c.tx_end || (c.kind == Kind::Nbd && svc.nbd_has_tx(c.id)) {
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
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms);
    }
}
