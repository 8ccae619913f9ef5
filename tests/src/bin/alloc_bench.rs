//! Allocation benchmark: heap allocations per NBD request on the product's
//! I/O path in steady state. Prints a table, asserts nothing.
//!
//! Run with `cargo run --release -p strata-tests --bin alloc_bench`.
//!
//! **What is counted.** A counting global allocator wraps
//! `std::alloc::System` and counts every `alloc`, `alloc_zeroed` and
//! `realloc` call (frees are not counted), on every thread, except while
//! the calling thread runs client or device work (`uncounted`): building
//! and checking NBD messages and the client's socket calls, the fake
//! virtio device's side, and the loopback NIC's own buffers. Each figure
//! is the count over N requests divided by N (2000 requests of 4 KiB, 200
//! of 1 MiB), after a warm-up of 500 / 50 requests so that the NBD
//! engine's page pool and every reused buffer have grown. Requests go one
//! at a time (queue depth 1: send one, run the loop until its reply is in,
//! send the next), in a session that negotiated structured replies with
//! `NBD_OPT_GO`, as libnbd and QEMU do. Each path × layer row is a fresh
//! service whose export sits on 0, 1 or 3 pass-through `nop` layers over
//! `vtbd0`.
//!
//! **The two paths.** Both drive the real `appliance::service::Service`
//! in-process, with a connection opened by `Service::open` on the `nbd`
//! protocol, through the service's `Link` over the platform's real
//! transport. Only the platforms' loops are private; each turn of them is
//! written out here call for call:
//!
//! - `hosted`, as `appliance::hosted::run` does it. The transport is
//!   `appliance::hosted::Socket` (`readv(2)`/`writev(2)` on lent pages)
//!   over the server end of a real loopback TCP connection: the benchmark
//!   listens on 127.0.0.1:0 and its client is a plain non-blocking
//!   `TcpStream`, written to and read from between loop turns. One turn
//!   is `wait`'s part for this connection (`Socket::set_readable` when
//!   the socket holds input, which a `peek` on a clone of its descriptor
//!   finds out in place of `poll(2)`; `Link::writable` when output waits;
//!   clearing the disks' eventfd; all uncounted), then `set_now_ns`,
//!   `tick`, `Link::receive`, `poll`, `Link::send`, `Link::receive`. The
//!   disk is the hosted `FileDisk` over a temporary file with its I/O
//!   threads (transfers above 32 KiB run there; their allocations are
//!   counted too).
//! - `kernel`, as `appliance::kernel::serve` does it. The network is
//!   smoltcp: an `Interface` over `smoltcp::phy::Loopback` (Ethernet, with
//!   the 1514-byte frames of the unikernel's virtio-net at QEMU's default
//!   MTU) holding two TCP sockets, the server's, made by
//!   `appliance::smol::tcp_socket` with NBD's buffer size and listening on
//!   NBD's port, and the client's, connected to it. The transport is
//!   `appliance::smol::Smol` over the server socket. One turn is
//!   `set_now_ns`, `iface.poll`, `tick`, `Link::receive`, `poll`,
//!   `Link::writable` if the socket can send, `Link::send`,
//!   `Link::receive`, `iface.poll`; then, uncounted, the client's socket
//!   calls and the disk's work. The disk is the real virtio-blk driver
//!   (`drivers::virtio_blk`, indirect descriptors, `seg_max` 126 like
//!   QEMU's) over the fake virtio transport of `drivers::fake`; between
//!   loop turns the benchmark plays the device: it takes the available
//!   chains, does the read or write on a memory array at the descriptors'
//!   addresses and puts them in the used ring. During setup (tasting and
//!   config lines, which wait for the disk) the device answers at once on
//!   each notification instead.
//!
//!   smoltcp's `iface.poll` is counted, as part of the unikernel's cost
//!   per request; as both sockets share the interface, it includes
//!   smoltcp's processing of the client's segments too. The loopback
//!   device's own work (a fresh `Vec` per frame and its queue, which the
//!   unikernel's NIC driver does not have) is not: a wrapper around its
//!   tokens leaves it uncounted and counts smoltcp's work inside them. A
//!   second table gives the kernel figures without what `iface.poll`
//!   allocates.
//!
//! Not measured: the NIC driver (kernel), `poll(2)` and accepting
//! connections (hosted), the management endpoint. Below the tables, the
//! loop turns per request, and the allocations of one idle loop turn (no
//! request outstanding), which show what spinning while a disk works adds.
//!
//! **Where they come from.** `ALLOC_BENCH_TRACE=1` (or `all`) also records
//! a backtrace of every counted allocation during more steady-state
//! requests of each cell (100 of 4 KiB, 40 of 1 MiB) and prints them
//! grouped by call site, per request: the innermost frame of the product
//! with its location, up to two callers, and the allocating call. Frames
//! of `alloc_bench::Hosted` and `alloc_bench::Kernel` stand for the
//! platform loop code they write out. A comma-separated list of patterns
//! instead of `1` picks the cells whose label (`hosted/1/4K write`,
//! `kernel/0/1M read`, …) contains one of them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use appliance::hosted::disk::{FileDisk, Waker};
use appliance::hosted::Socket;
use appliance::service::{protocols, Link, Service};
use appliance::smol::{tcp_socket, Smol};
use drivers::fake::{read_mem, write_mem, Chain, FakeTransport};
use drivers::virtio_blk::{VirtioBlk, F_RO, WANTED_FEATURES};
use geom::disk::BlockDevice;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Loopback, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use strata_tests::TempDir;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The counting allocator and the switches around it.
mod counting {
    use super::*;

    /// Allocations counted so far.
    pub static ALLOCS: AtomicU64 = AtomicU64::new(0);
    /// Record a backtrace of every counted allocation.
    pub static TRACING: AtomicBool = AtomicBool::new(false);
    /// The recorded backtraces (unresolved until printed).
    pub static TRACES: Mutex<Vec<Backtrace>> = Mutex::new(Vec::new());

    thread_local! {
        /// This thread runs client or device work, or records a backtrace:
        /// its allocations are not counted.
        static PAUSED: Cell<bool> = const { Cell::new(false) };
    }

    /// Counts one allocation of the calling thread, unless it is paused.
    fn note() {
        // A thread being torn down has no thread-locals left: not ours.
        if PAUSED.try_with(|p| p.get()).unwrap_or(true) {
            return;
        }
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        if TRACING.load(Ordering::Relaxed) {
            PAUSED.with(|p| p.set(true));
            let bt = Backtrace::force_capture();
            if let Ok(mut t) = TRACES.lock() {
                t.push(bt);
            }
            PAUSED.with(|p| p.set(false));
        }
    }

    /// Runs `f` with the calling thread's allocations left uncounted.
    pub fn uncounted<R>(f: impl FnOnce() -> R) -> R {
        let was = PAUSED.with(|p| p.replace(true));
        let r = f();
        PAUSED.with(|p| p.set(was));
        r
    }

    /// Runs `f` with the calling thread's allocations counted (smoltcp's
    /// work inside the loopback device's tokens).
    pub fn counted<R>(f: impl FnOnce() -> R) -> R {
        let was = PAUSED.with(|p| p.replace(false));
        let r = f();
        PAUSED.with(|p| p.set(was));
        r
    }

    /// Allocations counted so far.
    pub fn allocs() -> u64 {
        ALLOCS.load(Ordering::Relaxed)
    }

    /// `System`, counting allocations.
    pub struct Counting;

    // SAFETY: every method forwards its arguments unchanged to `System`
    // and returns what `System` returned, so `System`'s guarantees hold as
    // they are; the only addition, `note`, bumps a counter (and may record
    // a backtrace through allocations that are themselves forwarded) and
    // never touches the memory being allocated or freed.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note();
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract,
            // which is `System`'s.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note();
            // SAFETY: as for `alloc`.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from this allocator, that is from
            // `System`, with `layout`.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note();
            // SAFETY: `ptr` came from `System` with `layout`; the caller
            // upholds the rest of `realloc`'s contract.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

use counting::{allocs, counted, uncounted};

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

// ---- NBD client side (uncounted) ----

const NBD_READ: u16 = 0;
const NBD_WRITE: u16 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const EXPORT: &str = "vol";

/// Size of the disk under each service.
const DISK_BYTES: u64 = 64 << 20;
/// Requests cycle over the first this many bytes.
const REGION_BYTES: u64 = 32 << 20;
/// Loop turns after which a request without its reply is a bug.
const MAX_TURNS: usize = 10_000_000;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

/// An option in the fixed newstyle format.
fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Client flags, `NBD_OPT_STRUCTURED_REPLY`, then `NBD_OPT_GO` on the
/// export.
fn handshake_bytes() -> Vec<u8> {
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend(option(OPT_STRUCTURED_REPLY, &[]));
    let mut go = (EXPORT.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(EXPORT.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    v.extend(option(OPT_GO, &go));
    v
}

/// If `buf` holds the greeting and every option reply up to the
/// `NBD_OPT_GO` acknowledgement, its length.
fn handshake_done(buf: &[u8]) -> Option<usize> {
    let mut pos = 18;
    if buf.len() < pos {
        return None;
    }
    assert_eq!(&buf[..16], b"NBDMAGICIHAVEOPT", "greeting");
    while buf.len() >= pos + 20 {
        let (opt, kind, len) = (
            be32(&buf[pos + 8..]),
            be32(&buf[pos + 12..]),
            be32(&buf[pos + 16..]) as usize,
        );
        if buf.len() < pos + 20 + len {
            return None;
        }
        assert_eq!(kind & 0x8000_0000, 0, "option {opt} refused: {kind:#x}");
        pos += 20 + len;
        if opt == OPT_GO && kind == 1 {
            return Some(pos);
        }
    }
    None
}

/// If `buf` starts with a whole reply, its length (a failed request
/// panics). `read_len` is the data a simple reply to a read carries.
fn reply_done(buf: &[u8], read_len: usize) -> Option<usize> {
    if buf.len() < 4 {
        return None;
    }
    match be32(buf) {
        SIMPLE_MAGIC => {
            if buf.len() < 16 {
                return None;
            }
            assert_eq!(be32(&buf[4..]), 0, "request failed");
            let n = 16 + read_len;
            (buf.len() >= n).then_some(n)
        }
        STRUCTURED_MAGIC => {
            let mut pos = 0;
            loop {
                if buf.len() < pos + 20 {
                    return None;
                }
                assert_eq!(be32(&buf[pos..]), STRUCTURED_MAGIC, "chunk magic");
                let flags = u16::from_be_bytes([buf[pos + 4], buf[pos + 5]]);
                let kind = u16::from_be_bytes([buf[pos + 6], buf[pos + 7]]);
                assert_eq!(kind & 0x8000, 0, "request failed: chunk {kind:#x}");
                pos += 20 + be32(&buf[pos + 16..]) as usize;
                if buf.len() < pos {
                    return None;
                }
                if flags & 1 != 0 {
                    return Some(pos);
                }
            }
        }
        m => panic!("reply magic {m:#x}"),
    }
}

/// A request header followed by its payload, if any.
fn request(cmd: u16, len: u32) -> Vec<u8> {
    let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&0x5eed_u64.to_be_bytes());
    r.extend_from_slice(&0u64.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    if cmd == NBD_WRITE {
        r.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)));
    }
    r
}

/// Bytes in flight between a client and a server: written at the end,
/// taken from `pos` on. Its capacity is reserved up front.
struct ByteQueue {
    buf: Vec<u8>,
    pos: usize,
}

impl ByteQueue {
    fn new() -> ByteQueue {
        ByteQueue {
            buf: Vec::with_capacity(4 << 20),
            pos: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }
}

/// A platform's event loop around a service, with one NBD client.
trait Platform {
    /// The client writes `bytes` (called uncounted).
    fn client_send(&mut self, bytes: &[u8]);
    /// What the client has received and not yet consumed (called
    /// uncounted).
    fn client_rx(&mut self) -> &mut ByteQueue;
    /// One turn of the platform's loop; client and device work inside is
    /// uncounted.
    fn turn(&mut self);
    /// Loop turns so far.
    fn turns(&self) -> u64;
    /// Counted allocations so far inside smoltcp's `iface.poll` (none on
    /// hosted).
    fn poll_allocs(&self) -> u64 {
        0
    }
}

/// Runs the loop until the client has whatever `done` recognises; then
/// consumes it.
fn run_until(p: &mut dyn Platform, done: impl Fn(&[u8]) -> Option<usize>) {
    for _ in 0..MAX_TURNS {
        p.turn();
        let got = uncounted(|| {
            let rx = p.client_rx();
            let n = done(rx.pending());
            if let Some(n) = n {
                rx.consume(n);
            }
            n.is_some()
        });
        if got {
            return;
        }
    }
    panic!("no reply after {MAX_TURNS} loop turns");
}

fn handshake(p: &mut dyn Platform) {
    let hello = handshake_bytes();
    uncounted(|| p.client_send(&hello));
    run_until(p, handshake_done);
}

/// Sends `req` (a prebuilt request) at `offset` and waits for its reply.
fn call(p: &mut dyn Platform, req: &mut [u8], offset: u64, read_len: usize) {
    uncounted(|| {
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        p.client_send(req);
    });
    run_until(p, |b| reply_done(b, read_len));
}

/// The index of the `nbd` protocol in `appliance::service::PROTOCOLS`,
/// and the protocol.
fn nbd() -> (usize, &'static protocols::Protocol) {
    protocols::find("nbd").expect("the nbd protocol")
}

// ---- hosted ----

/// The service as `appliance::hosted::run` drives it, over a loopback TCP
/// connection.
struct Hosted {
    svc: Service,
    link: Link,
    /// The hosted transport over the server end.
    socket: Socket,
    /// The server end's descriptor again, to learn what `poll(2)` would
    /// report.
    probe: TcpStream,
    /// The client end.
    client: TcpStream,
    /// Client bytes not yet written to the socket.
    outbox: ByteQueue,
    /// What the client received.
    inbox: ByteQueue,
    /// The client's read buffer.
    scratch: Vec<u8>,
    started: Instant,
    waker: Arc<Waker>,
    turns: u64,
    _dir: TempDir,
}

impl Hosted {
    fn new(layers: usize) -> Hosted {
        let dir = TempDir::new("alloc-bench");
        let path = dir.path("vtbd0.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(DISK_BYTES))
            .expect("create the disk file");
        let waker = Arc::new(Waker::new().expect("eventfd"));
        let disk = FileDisk::open(&path, Some(waker.clone())).expect("open the disk file");
        let cfg = geom::config::parse(&config(layers)).expect("config");
        let disks: Vec<Box<dyn BlockDevice>> = vec![Box::new(disk)];
        let mut svc = Service::new(&cfg, disks).expect("service");

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        client.set_nonblocking(true).expect("non-blocking client");
        client.set_nodelay(true).expect("TCP_NODELAY");
        let probe = server.try_clone().expect("dup");
        let socket = Socket::new(server).expect("socket");
        let id = svc.open(nbd().0).expect("a connection");
        Hosted {
            svc,
            link: Link::new(id),
            socket,
            probe,
            client,
            outbox: ByteQueue::new(),
            inbox: ByteQueue::new(),
            scratch: vec![0; 1 << 20],
            started: Instant::now(),
            waker,
            turns: 0,
            _dir: dir,
        }
    }

    /// True if the server end holds input (or is closed or failed): what
    /// `poll(2)` reports as `POLLIN` (`POLLHUP`, `POLLERR`).
    fn has_input(&self) -> bool {
        // `Socket::new` made the shared file description non-blocking.
        match self.probe.peek(&mut [0u8; 1]) {
            Ok(_) => true,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// The client writes what the socket takes and reads what came.
    fn client_io(&mut self) {
        while !self.outbox.is_empty() {
            match self.client.write(self.outbox.pending()) {
                Ok(n) => self.outbox.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("client write: {e}"),
            }
        }
        loop {
            match self.client.read(&mut self.scratch) {
                Ok(0) => panic!("the server closed the connection"),
                Ok(n) => self.inbox.push(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("client read: {e}"),
            }
        }
    }
}

impl Platform for Hosted {
    fn client_send(&mut self, bytes: &[u8]) {
        self.outbox.push(bytes);
        self.client_io();
    }

    fn client_rx(&mut self) -> &mut ByteQueue {
        &mut self.inbox
    }

    fn turns(&self) -> u64 {
        self.turns
    }

    /// One turn of `appliance::hosted::run`'s loop.
    fn turn(&mut self) {
        self.turns += 1;
        // `wait`: poll(2) on the socket and the disks' eventfd.
        uncounted(|| {
            if self.link.wants_input() && self.has_input() {
                self.socket.set_readable();
            }
            if self.link.wants_output(&self.svc) {
                self.link.writable();
            }
            self.waker.clear();
        });
        let now = self.started.elapsed();
        self.svc.set_now_ns(now.as_nanos() as u64);
        self.svc.tick(now.as_millis() as u64);
        self.link.receive(&mut self.svc, &mut self.socket);
        self.svc.poll();
        self.link.send(&mut self.svc, &mut self.socket);
        // Input held back by backpressure may fit now.
        self.link.receive(&mut self.svc, &mut self.socket);
        assert!(!self.link.finished(&self.svc), "the connection ended");
        uncounted(|| self.client_io());
    }
}

// ---- kernel ----

/// The unikernel's virtio-net MTU under QEMU (its default).
const NIC_MTU: usize = 1500;

/// The unikernel's address when the config has no `net` line.
const GUEST_ADDR: IpAddress = IpAddress::v4(10, 0, 2, 15);

/// smoltcp's loopback device in place of the unikernel's NIC: its frames
/// are Ethernet frames of virtio-net's size, and its own work (a fresh
/// `Vec` per frame, the queue) is device work, uncounted.
struct Nic(Loopback);

/// A token of the loopback device: the device's work in it is uncounted,
/// smoltcp's (reading or building the frame) is counted.
struct DeviceWork<T>(T);

impl<T: RxToken> RxToken for DeviceWork<T> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        uncounted(|| self.0.consume(|frame| counted(|| f(frame))))
    }
}

impl<T: TxToken> TxToken for DeviceWork<T> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        uncounted(|| self.0.consume(len, |frame| counted(|| f(frame))))
    }
}

impl Device for Nic {
    type RxToken<'a>
        = DeviceWork<<Loopback as Device>::RxToken<'a>>
    where
        Self: 'a;
    type TxToken<'a>
        = DeviceWork<<Loopback as Device>::TxToken<'a>>
    where
        Self: 'a;

    fn receive(
        &mut self,
        timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.0
            .receive(timestamp)
            .map(|(rx, tx)| (DeviceWork(rx), DeviceWork(tx)))
    }

    fn transmit(&mut self, timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        self.0.transmit(timestamp).map(DeviceWork)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = self.0.capabilities();
        // As `drivers::virtio_net` reports it: the MTU plus the Ethernet
        // header.
        caps.max_transmission_unit = NIC_MTU + 14;
        caps
    }
}

/// virtio-blk request types and status (virtio 1.2 §5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
const S_UNSUPP: u8 = 2;

/// The memory behind the fake disk, and whether it answers at once.
struct DeviceState {
    disk: Vec<u8>,
    /// Complete requests when notified (during setup), rather than when
    /// the benchmark loop gets to it.
    inline: bool,
}

/// The fake virtio transport, with a device that can answer on
/// notification.
struct BenchTransport {
    fake: FakeTransport,
    state: Rc<RefCell<DeviceState>>,
}

/// Does one request on `disk`; returns the bytes written into the chain.
fn execute(c: &Chain, disk: &mut [u8]) -> u32 {
    let hdr = read_mem(c.readable[0].0, c.readable[0].1 as usize);
    let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let (status_addr, _) = *c.writable.last().expect("status descriptor");
    let mut pos = (sector * 512) as usize;
    let mut written = 1;
    let status = match kind {
        T_IN => {
            for &(a, l) in &c.writable[..c.writable.len() - 1] {
                write_mem(a, &disk[pos..pos + l as usize]);
                pos += l as usize;
                written += l;
            }
            S_OK
        }
        T_OUT => {
            for &(a, l) in &c.readable[1..] {
                disk[pos..pos + l as usize].copy_from_slice(&read_mem(a, l as usize));
                pos += l as usize;
            }
            S_OK
        }
        T_FLUSH => S_OK,
        _ => S_UNSUPP,
    };
    write_mem(status_addr, &[status]);
    written
}

/// The device's side: every available chain done and put in the used
/// ring. Returns how many.
fn run_device(fake: &FakeTransport, disk: &mut [u8]) -> usize {
    let chains = fake.0.borrow_mut().queues[0].take_avail();
    for c in &chains {
        let written = execute(c, disk);
        fake.0.borrow_mut().queues[0].put_used(c.head, written);
    }
    chains.len()
}

impl Transport for BenchTransport {
    fn device_type(&self) -> DeviceType {
        self.fake.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.fake.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.fake.write_driver_features(driver_features)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.fake.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.fake.notify(queue);
        let mut st = self.state.borrow_mut();
        if st.inline {
            uncounted(|| run_device(&self.fake, &mut st.disk));
        }
    }
    fn get_status(&self) -> DeviceStatus {
        self.fake.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.fake.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.fake.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.fake.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.fake
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.fake.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.fake.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.fake.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.fake.read_config_generation()
    }
    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> Result<T, virtio_drivers::Error> {
        self.fake.read_config_space(offset)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), virtio_drivers::Error> {
        self.fake.write_config_space(offset, value)
    }
}

/// Config space of a QEMU-like virtio-blk disk of `bytes` (virtio 1.2
/// §5.2.4): `seg_max` 126, 512-byte blocks, discard and write-zeroes.
fn blk_config(bytes: u64) -> Vec<u8> {
    let mut b = vec![0u8; 60];
    b[0..8].copy_from_slice(&(bytes / 512).to_le_bytes());
    b[12..16].copy_from_slice(&126u32.to_le_bytes());
    b[20..24].copy_from_slice(&512u32.to_le_bytes());
    b[36..40].copy_from_slice(&0x3f_ffffu32.to_le_bytes());
    b[40..44].copy_from_slice(&1u32.to_le_bytes());
    b[44..48].copy_from_slice(&1u32.to_le_bytes());
    b[48..52].copy_from_slice(&0x3f_ffffu32.to_le_bytes());
    b[52..56].copy_from_slice(&1u32.to_le_bytes());
    b[56] = 1;
    b
}

/// The service as `appliance::kernel::serve` drives it, over smoltcp on a
/// loopback device, with virtio-blk on a fake device.
struct Kernel {
    svc: Service,
    link: Link,
    iface: Interface,
    nic: Nic,
    sockets: SocketSet<'static>,
    /// The server's socket, under the link.
    server: SocketHandle,
    /// The client's socket.
    client: SocketHandle,
    started: Instant,
    /// Client bytes not yet in its socket.
    outbox: ByteQueue,
    /// What the client received.
    inbox: ByteQueue,
    fake: FakeTransport,
    state: Rc<RefCell<DeviceState>>,
    turns: u64,
    /// Counted allocations inside `iface.poll`.
    poll_allocs: u64,
}

impl Kernel {
    fn new(layers: usize) -> Kernel {
        let features = WANTED_FEATURES & !F_RO;
        let fake = FakeTransport::new(DeviceType::Block, features, blk_config(DISK_BYTES), 1);
        let state = Rc::new(RefCell::new(DeviceState {
            disk: vec![0; DISK_BYTES as usize],
            inline: true,
        }));
        let t = BenchTransport {
            fake: fake.clone(),
            state: state.clone(),
        };
        let drv = VirtioBlk::<BenchTransport>::new(t).expect("virtio-blk init");
        let cfg = geom::config::parse(&config(layers)).expect("config");
        let disks: Vec<Box<dyn BlockDevice>> = vec![Box::new(drv)];
        let mut svc = Service::new(&cfg, disks).expect("service");
        state.borrow_mut().inline = false;

        let started = Instant::now();
        let mut nic = Nic(Loopback::new(Medium::Ethernet));
        let mut icfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress([
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
        ])));
        icfg.random_seed = 0x9e37_79b9_7f4a_7c15;
        let mut iface = Interface::new(icfg, &mut nic, smol_now(&started));
        iface.update_ip_addrs(|ips| {
            ips.push(IpCidr::new(GUEST_ADDR, 24)).expect("an address");
        });
        let mut sockets = SocketSet::new(Vec::new());
        let (p, proto) = nbd();
        let mut server = tcp_socket(proto.buffer_bytes);
        server.listen(proto.guest_port).expect("listen");
        let server = sockets.add(server);
        let mut client = tcp_socket(proto.buffer_bytes);
        client
            .connect(iface.context(), (GUEST_ADDR, proto.guest_port), 49152)
            .expect("connect");
        let client = sockets.add(client);
        let established =
            |s: &SocketSet<'_>, h| s.get::<tcp::Socket<'_>>(h).state() == tcp::State::Established;
        for _ in 0..100 {
            if established(&sockets, server) && established(&sockets, client) {
                break;
            }
            iface.poll(smol_now(&started), &mut nic, &mut sockets);
        }
        assert!(
            established(&sockets, server) && established(&sockets, client),
            "the loopback connection did not come up"
        );
        // `serve::receive` opens the connection once its socket is
        // established.
        let id = svc.open(p).expect("a connection");
        Kernel {
            svc,
            link: Link::new(id),
            iface,
            nic,
            sockets,
            server,
            client,
            started,
            outbox: ByteQueue::new(),
            inbox: ByteQueue::new(),
            fake,
            state,
            turns: 0,
            poll_allocs: 0,
        }
    }

    /// `iface.poll`, its allocations noted apart.
    fn iface_poll(&mut self) {
        let before = allocs();
        self.iface
            .poll(smol_now(&self.started), &mut self.nic, &mut self.sockets);
        self.poll_allocs += allocs() - before;
    }

    /// `serve::receive` (the link exists).
    fn receive(&mut self) {
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(self.server);
        self.link.receive(&mut self.svc, &mut Smol(sock));
    }

    /// `serve::send` (the connection goes on).
    fn send(&mut self) {
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(self.server);
        if sock.can_send() {
            self.link.writable();
        }
        self.link.send(&mut self.svc, &mut Smol(sock));
        assert!(!self.link.finished(&self.svc), "the connection ended");
    }

    /// The client puts what its socket takes in it and reads what came.
    fn client_io(&mut self) {
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(self.client);
        assert!(sock.is_open(), "the client's socket closed");
        if !self.outbox.is_empty() && sock.can_send() {
            let n = sock.send_slice(self.outbox.pending()).expect("client send");
            self.outbox.consume(n);
        }
        while sock.can_recv() {
            let inbox = &mut self.inbox;
            let n = sock
                .recv(|b| {
                    inbox.push(b);
                    (b.len(), b.len())
                })
                .expect("client receive");
            if n == 0 {
                break;
            }
        }
    }
}

/// smoltcp's clock: time since `started`.
fn smol_now(started: &Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(started.elapsed().as_micros() as i64)
}

impl Platform for Kernel {
    fn client_send(&mut self, bytes: &[u8]) {
        self.outbox.push(bytes);
        self.client_io();
    }

    fn client_rx(&mut self) -> &mut ByteQueue {
        &mut self.inbox
    }

    fn turns(&self) -> u64 {
        self.turns
    }

    fn poll_allocs(&self) -> u64 {
        self.poll_allocs
    }

    /// One turn of `serve`'s loop; then the client and the disk do their
    /// part.
    fn turn(&mut self) {
        self.turns += 1;
        let now = self.started.elapsed();
        self.svc.set_now_ns(now.as_nanos() as u64);
        self.iface_poll();
        self.svc.tick(now.as_millis() as u64);
        self.receive();
        self.svc.poll();
        self.send();
        // Input held back by backpressure may fit now.
        self.receive();
        self.iface_poll();
        uncounted(|| {
            self.client_io();
            run_device(&self.fake, &mut self.state.borrow_mut().disk);
        });
    }
}

// ---- the benchmark ----

/// The config for `layers` nop layers over vtbd0, exported as `vol`.
fn config(layers: usize) -> String {
    let mut cfg = String::new();
    let mut top = String::from("vtbd0");
    for _ in 0..layers {
        cfg.push_str(&format!("nop create {top}\n"));
        top.push_str(".nop");
    }
    cfg.push_str(&format!("export nbd {EXPORT} {top}\n"));
    cfg
}

struct Workload {
    name: &'static str,
    cmd: u16,
    len: u32,
    warmup: usize,
    count: usize,
    /// Requests recorded in trace mode.
    traced: usize,
}

/// Column order of the table; they run writes first, so reads find data.
const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4K read",
        cmd: NBD_READ,
        len: 4096,
        warmup: 500,
        count: 2000,
        traced: 100,
    },
    Workload {
        name: "4K write",
        cmd: NBD_WRITE,
        len: 4096,
        warmup: 500,
        count: 2000,
        traced: 100,
    },
    Workload {
        name: "1M read",
        cmd: NBD_READ,
        len: 1 << 20,
        warmup: 50,
        count: 200,
        traced: 40,
    },
    Workload {
        name: "1M write",
        cmd: NBD_WRITE,
        len: 1 << 20,
        warmup: 50,
        count: 200,
        traced: 40,
    },
];
const RUN_ORDER: [usize; 4] = [1, 0, 3, 2];
const LAYERS: [usize; 3] = [0, 1, 3];

/// Which cells to trace (`ALLOC_BENCH_TRACE`).
struct TraceFilter(Option<Vec<String>>);

impl TraceFilter {
    fn from_env() -> TraceFilter {
        TraceFilter(std::env::var("ALLOC_BENCH_TRACE").ok().and_then(|v| {
            let v = v.trim();
            match v {
                "" | "0" => None,
                "1" | "all" => Some(Vec::new()),
                _ => Some(v.split(',').map(|s| s.trim().to_string()).collect()),
            }
        }))
    }

    fn wants(&self, label: &str) -> bool {
        match &self.0 {
            None => false,
            Some(p) => p.is_empty() || p.iter().any(|p| label.contains(p.as_str())),
        }
    }
}

/// What one cell measured, per request.
#[derive(Clone, Copy, Default)]
struct Figures {
    /// Counted allocations.
    allocs: f64,
    /// Of which inside smoltcp's `iface.poll`.
    in_poll: f64,
    /// Loop turns.
    turns: f64,
}

/// Allocations per request of `w` on `p`, then its trace if asked for.
fn measure(p: &mut dyn Platform, w: &Workload, label: &str, trace: &TraceFilter) -> Figures {
    let mut req = request(w.cmd, w.len);
    let read_len = if w.cmd == NBD_READ { w.len as usize } else { 0 };
    let offset = |i: usize| (i as u64 * u64::from(w.len)) % REGION_BYTES;
    for i in 0..w.warmup {
        call(p, &mut req, offset(i), read_len);
    }
    let (before, poll_before, turns_before) = (allocs(), p.poll_allocs(), p.turns());
    for i in 0..w.count {
        call(p, &mut req, offset(w.warmup + i), read_len);
    }
    let n = w.count as f64;
    let figures = Figures {
        allocs: (allocs() - before) as f64 / n,
        in_poll: (p.poll_allocs() - poll_before) as f64 / n,
        turns: (p.turns() - turns_before) as f64 / n,
    };
    if trace.wants(label) {
        counting::TRACES.lock().expect("traces").clear();
        let before = allocs();
        counting::TRACING.store(true, Ordering::SeqCst);
        for i in 0..w.traced {
            call(p, &mut req, offset(w.warmup + w.count + i), read_len);
        }
        counting::TRACING.store(false, Ordering::SeqCst);
        let traced = allocs() - before;
        let traces = std::mem::take(&mut *counting::TRACES.lock().expect("traces"));
        print_trace(label, figures.allocs, traced, w.traced, &traces);
    }
    figures
}

/// Allocations of one idle loop turn.
fn idle_turn(p: &mut dyn Platform) -> f64 {
    const TURNS: usize = 1000;
    let before = allocs();
    for _ in 0..TURNS {
        p.turn();
    }
    (allocs() - before) as f64 / TURNS as f64
}

// ---- trace reports ----

/// One symbol of a resolved backtrace.
struct Sym {
    name: String,
    at: Option<String>,
}

/// Crates of the product (and this program, whose loops are the platforms').
const OURS: [&str; 7] = [
    "geom::",
    "net::",
    "appliance::",
    "drivers::",
    "virtio_drivers::",
    "smoltcp::",
    "alloc_bench::",
];

fn is_ours(name: &str) -> bool {
    let n = name.trim_start_matches('<');
    OURS.iter().any(|c| n.starts_with(c)) && !n.starts_with("alloc_bench::counting")
}

/// Drops a trailing `::h0123456789abcdef` symbol hash.
fn strip_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((head, h)) if h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()) => head,
        _ => name,
    }
}

/// A source location without the workspace or registry prefix.
fn short_path(at: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../");
    let at = at.strip_prefix(root).unwrap_or(at);
    let at = at.strip_prefix("./").unwrap_or(at);
    match at.find("/registry/src/") {
        Some(i) => {
            let rest = &at[i + "/registry/src/".len()..];
            rest.split_once('/').map_or(rest, |(_, r)| r).to_string()
        }
        None => at.to_string(),
    }
}

/// The symbols of `bt`, innermost first, from its printed form.
fn symbols(bt: &Backtrace) -> Vec<Sym> {
    let text = bt.to_string();
    let mut out: Vec<Sym> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(at) = t.strip_prefix("at ") {
            if let Some(last) = out.last_mut() {
                last.at = Some(short_path(at));
            }
            continue;
        }
        let name = match t.split_once(": ") {
            Some((i, rest)) if !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()) => rest,
            _ => t,
        };
        out.push(Sym {
            name: strip_hash(name).to_string(),
            at: None,
        });
    }
    out
}

/// (allocating call, product frames from the innermost outwards) of one
/// allocation.
fn site(bt: &Backtrace) -> (String, String) {
    let syms = symbols(bt);
    let Some(first) = syms.iter().position(|s| is_ours(&s.name)) else {
        let s = syms
            .iter()
            .find(|s| !s.name.contains("alloc_bench::counting") && !s.name.contains("alloc::"))
            .map_or_else(|| String::from("?"), |s| s.name.clone());
        return (String::from("?"), format!("(no product frame) {s}"));
    };
    let via = if first > 0 {
        syms[first - 1].name.clone()
    } else {
        String::from("?")
    };
    let chain: Vec<String> = syms[first..]
        .iter()
        .filter(|s| is_ours(&s.name))
        .take(3)
        .enumerate()
        .map(|(i, s)| match (&s.at, i) {
            (Some(at), 0) => format!("{} ({at})", s.name),
            _ => s.name.clone(),
        })
        .collect();
    (via, chain.join("\n             <- "))
}

fn print_trace(label: &str, per_request: f64, counted: u64, requests: usize, traces: &[Backtrace]) {
    let mut sites: BTreeMap<(String, String), usize> = BTreeMap::new();
    for bt in traces {
        *sites.entry(site(bt)).or_default() += 1;
    }
    let mut sites: Vec<_> = sites.into_iter().collect();
    sites.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    println!(
        "\n== {label}: {per_request:.1} per request measured; {counted} allocations in {requests} traced requests"
    );
    for ((via, chain), n) in sites {
        println!(
            "  {:6.2}/req  {chain}\n             via {via}",
            n as f64 / requests as f64
        );
    }
}

/// Prints one table: a row per path and layer count, a column per
/// workload.
fn print_table(title: &str, rows: &[(&str, usize, [Figures; 4])], cell: impl Fn(&Figures) -> f64) {
    println!("\n{title}");
    print!("{:<8} {:>6}", "path", "layers");
    for w in &WORKLOADS {
        print!(" {:>9}", w.name);
    }
    println!();
    for (path, layers, cells) in rows {
        print!("{path:<8} {layers:>6}");
        for c in cells {
            print!(" {:>9.1}", cell(c));
        }
        println!();
    }
}

fn main() {
    let trace = TraceFilter::from_env();
    println!(
        "Heap allocations (alloc + realloc) per NBD request in steady state, queue depth 1,\n\
         structured replies; {} / {} requests counted per 4K / 1M cell after {} / {} warm-up.\n\
         hosted: appliance::hosted's loop, Link over hosted::Socket on a loopback TCP\n\
         \x20       connection; disk = hosted FileDisk over a temporary file (I/O threads\n\
         \x20       for transfers above 32 KiB);\n\
         kernel: appliance::kernel::serve's loop, Link over smol::Smol on a smoltcp socket,\n\
         \x20       smoltcp Interface over phy::Loopback (1514-byte frames), iface.poll\n\
         \x20       counted; disk = virtio-blk driver over the fake virtio transport\n\
         \x20       (indirect descriptors, seg_max 126).",
        WORKLOADS[0].count, WORKLOADS[2].count, WORKLOADS[0].warmup, WORKLOADS[2].warmup
    );
    let mut rows = Vec::new();
    let mut idle = Vec::new();
    for path in ["hosted", "kernel"] {
        for layers in LAYERS {
            let mut p: Box<dyn Platform> = match path {
                "hosted" => Box::new(Hosted::new(layers)),
                _ => Box::new(Kernel::new(layers)),
            };
            handshake(p.as_mut());
            let mut cells = [Figures::default(); 4];
            for &w in &RUN_ORDER {
                let label = format!("{path}/{layers}/{}", WORKLOADS[w].name);
                cells[w] = measure(p.as_mut(), &WORKLOADS[w], &label, &trace);
            }
            idle.push((path, layers, idle_turn(p.as_mut())));
            rows.push((path, layers, cells));
        }
    }
    print_table(
        "Allocations per request (kernel: smoltcp's iface.poll included):",
        &rows,
        |f| f.allocs,
    );
    let kernel: Vec<_> = rows.iter().filter(|r| r.0 == "kernel").cloned().collect();
    print_table(
        "Allocations per request, kernel, without those inside iface.poll:",
        &kernel,
        |f| f.allocs - f.in_poll,
    );
    print_table("Loop turns per request:", &rows, |f| f.turns);
    let idle: Vec<String> = idle
        .iter()
        .map(|(p, l, n)| format!("{p}/{l} {n:.1}"))
        .collect();
    println!(
        "\nAllocations per idle loop turn (no request outstanding): {}",
        idle.join(", ")
    );
}
