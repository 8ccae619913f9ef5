//! Allocation benchmark: heap allocations per NBD request on the product's
//! I/O path in steady state. Prints a table, asserts nothing.
//!
//! Run with `cargo run --release -p strata-tests --bin alloc_bench`.
//!
//! **What is counted.** A counting global allocator wraps
//! `std::alloc::System` and counts every `alloc`, `alloc_zeroed` and
//! `realloc` call (frees are not counted), on every thread, except while
//! the calling thread runs client or device work (`uncounted`): building
//! and checking NBD messages, moving bytes through the stand-in sockets,
//! and the fake virtio device's side. Each figure is the count over N
//! requests divided by N (2000 requests of 4 KiB, 200 of 1 MiB), after a
//! warm-up of 500 / 50 requests so that the NBD engine's page pool and
//! every reused buffer have grown. Requests go one at a time (queue depth
//! 1: send one, run the loop until its reply is in, send the next), in a
//! session that negotiated structured replies with `NBD_OPT_GO`, as libnbd
//! and QEMU do. Each path × layer row is a fresh service whose export sits
//! on 0, 1 or 3 pass-through `nop` layers over `vtbd0`.
//!
//! **The two paths.** Both drive the real `appliance::service::Service`
//! in-process, feeding it the way a platform does; the platforms' own loop
//! code is private, so it is mimicked here call for call:
//!
//! - `hosted`, as `appliance::hosted` feeds it: one loop turn is
//!   `set_now_ns`, `nbd_tick`, receive, `poll`, send, receive. Receiving
//!   is `Conn::receive`/`read_nbd`: buffered input goes to `nbd_recv`;
//!   with the buffer empty, a fresh `Vec` gets `nbd_rx_pieces`, a
//!   `readv(2)` fills those pages and then up to 16 KiB of the 256 KiB
//!   receive buffer, and `nbd_rx_filled` records the direct part. Sending
//!   is `send_nbd`: a fresh `Vec` per round gets `nbd_tx_pieces`, one
//!   `writev(2)` sends them, then `nbd_tx_advance`. Those fresh `Vec`s are
//!   allocated here exactly as the platform does, so they are counted;
//!   the platform's iovec vector keeps its capacity and never allocates,
//!   so it has no stand-in. `readv`/`writev` become copies between an
//!   in-memory socket and the pages, through `geom`'s own `SgList` copy
//!   helpers (uncounted). The in-memory socket takes and delivers whole
//!   messages at once, the fewest calls a real socket could need: over
//!   TCP a 1 MiB write may arrive in several reads, each with its own
//!   pieces `Vec`. The disk is the hosted `FileDisk` over a temporary file
//!   with its I/O threads (transfers above 32 KiB run there; their
//!   allocations are counted too).
//! - `kernel`, as `appliance::kernel::serve` feeds it: one loop turn is
//!   `set_now_ns`, `nbd_tick`, `pump_rx`, `poll`, `pump_tx`, `pump_rx`,
//!   with the socket rings being smoltcp's own `RingBuffer` (what
//!   `tcp::SocketBuffer` is) of 512 KiB per direction: `nbd_recv` on each
//!   contiguous part of the receive ring, `nbd_fill_tx` into each
//!   contiguous free part of the send ring. The disk is the real
//!   virtio-blk driver (`drivers::virtio_blk`, indirect descriptors,
//!   `seg_max` 126 like QEMU's) over the fake virtio transport of
//!   `drivers::fake`; between loop turns the benchmark plays the device:
//!   it takes the available chains, does the read or write on a memory
//!   array at the descriptors' addresses and puts them in the used ring.
//!   During setup (tasting and config lines, which wait for the disk) the
//!   device answers at once on each notification instead.
//!
//! Not measured: the NIC driver and smoltcp's interface (kernel), `poll(2)`
//! and accepting connections (hosted), the management endpoint. Below the
//! table, the allocations of one idle loop turn (no request outstanding)
//! show that spinning while a disk works adds nothing.
//!
//! **Where they come from.** `ALLOC_BENCH_TRACE=1` (or `all`) also records
//! a backtrace of every counted allocation during more steady-state
//! requests of each cell (100 of 4 KiB, 40 of 1 MiB) and prints them
//! grouped by call site, per request: the innermost frame of the product
//! with its location, up to two callers, and the allocating call. Frames
//! of `alloc_bench::Hosted` and `alloc_bench::Kernel` stand for the
//! platform loop code they mimic. A comma-separated list of patterns instead of `1` picks
//! the cells whose label (`hosted/1/4K write`, `kernel/0/1M read`, …)
//! contains one of them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use appliance::hosted::disk::{FileDisk, Waker};
use appliance::service::Service;
use drivers::fake::{read_mem, write_mem, Chain, FakeTransport};
use drivers::virtio_blk::{VirtioBlk, F_RO, WANTED_FEATURES};
use geom::disk::BlockDevice;
use geom::page::{DataCounters, PageRef, SgList};
use net::nbd::{PageSlice, TxPiece};
use smoltcp::storage::RingBuffer;
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

use counting::{allocs, uncounted};

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
    /// One turn of the platform's loop; device work inside is uncounted.
    fn turn(&mut self);
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
    p.client_send(&hello);
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

// ---- hosted ----

/// `appliance::hosted`'s receive buffer per connection.
const RX_BUF: usize = 256 << 10;
/// `appliance::hosted`'s most bytes read into the receive buffer at once.
const NBD_RX_READ: usize = 16 << 10;
/// `appliance::hosted`'s most pieces in one `readv`/`writev`.
const MAX_IOV: usize = 512;
/// `appliance::hosted`'s most bytes offered to one `writev`.
const MAX_WRITEV_BYTES: usize = 8 << 20;

/// The service fed as `appliance::hosted` feeds it, over an in-memory
/// socket.
struct Hosted {
    svc: Service,
    id: u32,
    started: Instant,
    waker: Arc<Waker>,
    /// Client → server bytes in the socket.
    sock_in: ByteQueue,
    /// Server → client bytes in the socket.
    sock_out: ByteQueue,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    readable: bool,
    _dir: TempDir,
}

/// A list over the pages of `pieces`, to reach their bytes through
/// `SgList`'s copy helpers.
fn sg_of<'a>(pieces: impl Iterator<Item = PageSlice<'a>>) -> SgList {
    let mut sg = SgList::new();
    for p in pieces {
        sg.push(PageRef {
            page: p.page.clone(),
            offset: p.offset as u32,
            len: p.len as u32,
        });
    }
    sg
}

/// The stand-in for `readv(2)`: socket bytes into the pages, then into
/// `buf`. Returns the bytes moved.
fn readv(sock: &mut ByteQueue, pieces: &[PageSlice<'_>], room: usize, buf: &mut [u8]) -> usize {
    let src = sock.pending();
    let direct = src.len().min(room);
    if direct > 0 {
        sg_of(pieces.iter().copied())
            .copy_from_slice(0, &src[..direct], &DataCounters::new())
            .expect("the request's pages are free");
    }
    let k = (src.len() - direct).min(buf.len());
    buf[..k].copy_from_slice(&src[direct..direct + k]);
    sock.consume(direct + k);
    direct + k
}

/// The stand-in for `writev(2)`: every piece into the socket. Returns the
/// bytes moved.
fn writev(sock: &mut ByteQueue, pieces: &[TxPiece<'_>]) -> usize {
    let mut n = 0;
    for p in pieces {
        match p {
            TxPiece::Bytes(b) => sock.push(b),
            TxPiece::Page(s) => {
                let at = sock.buf.len();
                sock.buf.resize(at + s.len, 0);
                sg_of(std::iter::once(*s))
                    .copy_to_slice(0, &mut sock.buf[at..], &DataCounters::new())
                    .expect("the reply's pages are free");
            }
        }
        n += p.len();
    }
    n
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
        let id = svc.nbd_open();
        Hosted {
            svc,
            id,
            started: Instant::now(),
            waker,
            sock_in: ByteQueue::new(),
            sock_out: ByteQueue::new(),
            rx: vec![0; RX_BUF],
            rx_start: 0,
            rx_end: 0,
            readable: true,
            _dir: dir,
        }
    }

    /// `Conn::feed`.
    fn feed(&mut self) -> bool {
        if self.rx_start == self.rx_end {
            return false;
        }
        let used = self
            .svc
            .nbd_recv(self.id, &self.rx[self.rx_start..self.rx_end]);
        self.rx_start += used;
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        used > 0
    }

    /// `Conn::receive` (the connection never sees EOF here).
    fn receive(&mut self) {
        self.feed();
        while self.readable {
            if self.rx_start != self.rx_end {
                break;
            }
            match self.read_nbd() {
                Some((_, full)) => {
                    self.readable = full;
                    self.feed();
                }
                // EAGAIN
                None => self.readable = false,
            }
        }
    }

    /// `Conn::read_nbd`; `None` when the socket is empty (EAGAIN).
    fn read_nbd(&mut self) -> Option<(usize, bool)> {
        let mut pieces = Vec::new();
        let room = self.svc.nbd_rx_pieces(self.id, &mut pieces, MAX_IOV);
        let buffered = self.rx.len().min(NBD_RX_READ);
        let (sock, rx) = (&mut self.sock_in, &mut self.rx);
        let n = uncounted(|| readv(sock, &pieces, room, &mut rx[..buffered]));
        drop(pieces);
        if n == 0 {
            return None;
        }
        let direct = n.min(room);
        if direct > 0 {
            self.svc.nbd_rx_filled(self.id, direct);
        }
        self.rx_start = 0;
        self.rx_end = n - direct;
        Some((n, n == room + buffered))
    }

    /// `Conn::send_nbd` (the in-memory socket takes everything).
    fn send_nbd(&mut self) {
        loop {
            let mut pieces = Vec::new();
            self.svc
                .nbd_tx_pieces(self.id, &mut pieces, MAX_IOV, MAX_WRITEV_BYTES);
            if pieces.is_empty() {
                return;
            }
            let sock = &mut self.sock_out;
            let n = uncounted(|| writev(sock, &pieces));
            drop(pieces);
            self.svc.nbd_tx_advance(self.id, n);
        }
    }
}

impl Platform for Hosted {
    fn client_send(&mut self, bytes: &[u8]) {
        self.sock_in.push(bytes);
    }

    fn client_rx(&mut self) -> &mut ByteQueue {
        &mut self.sock_out
    }

    /// One turn of `appliance::hosted::run`'s loop.
    fn turn(&mut self) {
        // `wait`: poll(2) reports the socket readable when it holds data,
        // and the disks' eventfd is cleared.
        if !self.readable && self.rx_start == self.rx_end && !self.sock_in.is_empty() {
            self.readable = true;
        }
        let _ = self.svc.nbd_has_tx(self.id);
        self.waker.clear();
        self.svc
            .set_now_ns(self.started.elapsed().as_nanos() as u64);
        self.svc.nbd_tick(self.started.elapsed().as_millis() as u64);
        self.receive();
        self.svc.poll();
        self.send_nbd();
        self.receive();
        let _ = self.svc.nbd_finished(self.id);
    }
}

// ---- kernel path ----

/// `appliance::kernel::serve`'s NBD socket buffer per direction.
const NBD_SOCKET_BYTES: usize = 512 * 1024;

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

/// The service fed as `appliance::kernel::serve` feeds it, over
/// smoltcp-style socket rings, with virtio-blk on a fake device.
struct Kernel {
    svc: Service,
    id: u32,
    started: Instant,
    /// The socket's receive and send rings.
    rx: RingBuffer<'static, u8>,
    tx: RingBuffer<'static, u8>,
    /// Client bytes not yet in the receive ring.
    outbox: ByteQueue,
    /// What the client received.
    inbox: ByteQueue,
    fake: FakeTransport,
    state: Rc<RefCell<DeviceState>>,
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
        let id = svc.nbd_open();
        Kernel {
            svc,
            id,
            started: Instant::now(),
            rx: RingBuffer::new(vec![0u8; NBD_SOCKET_BYTES]),
            tx: RingBuffer::new(vec![0u8; NBD_SOCKET_BYTES]),
            outbox: ByteQueue::new(),
            inbox: ByteQueue::new(),
            fake,
            state,
        }
    }

    /// `serve::pump_rx` (the connection is established).
    fn pump_rx(&mut self) {
        while !self.rx.is_empty() {
            let (used, _) = self.rx.dequeue_many_with(|buf| {
                let n = self.svc.nbd_recv(self.id, buf);
                (n, n)
            });
            if used == 0 {
                break;
            }
        }
    }

    /// `serve::pump_tx` (the peer never closes).
    fn pump_tx(&mut self) {
        while !self.tx.is_full() {
            let (n, _) = self.tx.enqueue_many_with(|buf| {
                let n = self.svc.nbd_fill_tx(self.id, buf);
                (n, n)
            });
            if n == 0 {
                break;
            }
        }
        let _ = self.svc.nbd_finished(self.id);
    }
}

impl Platform for Kernel {
    fn client_send(&mut self, bytes: &[u8]) {
        self.outbox.push(bytes);
    }

    fn client_rx(&mut self) -> &mut ByteQueue {
        &mut self.inbox
    }

    /// One turn of `serve`'s loop; the network and the device move bytes
    /// at its end.
    fn turn(&mut self) {
        // smoltcp's poll: segments from the client land in the ring.
        uncounted(|| {
            let n = self.rx.enqueue_slice(self.outbox.pending());
            self.outbox.consume(n);
        });
        let now = self.started.elapsed();
        self.svc.set_now_ns(now.as_nanos() as u64);
        self.svc.nbd_tick(now.as_millis() as u64);
        self.pump_rx();
        self.svc.poll();
        self.pump_tx();
        self.pump_rx();
        // smoltcp's poll sends (and the client acknowledges at once); the
        // disk does its work.
        uncounted(|| {
            while !self.tx.is_empty() {
                let (_, ()) = self.tx.dequeue_many_with(|b| {
                    self.inbox.push(b);
                    (b.len(), ())
                });
            }
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

/// Allocations per request of `w` on `p`, then its trace if asked for.
fn measure(p: &mut dyn Platform, w: &Workload, label: &str, trace: &TraceFilter) -> f64 {
    let mut req = request(w.cmd, w.len);
    let read_len = if w.cmd == NBD_READ { w.len as usize } else { 0 };
    let offset = |i: usize| (i as u64 * u64::from(w.len)) % REGION_BYTES;
    for i in 0..w.warmup {
        call(p, &mut req, offset(i), read_len);
    }
    let before = allocs();
    for i in 0..w.count {
        call(p, &mut req, offset(w.warmup + i), read_len);
    }
    let per_request = (allocs() - before) as f64 / w.count as f64;
    if trace.wants(label) {
        counting::TRACES.lock().expect("traces").clear();
        let before = allocs();
        counting::TRACING.store(true, Ordering::SeqCst);
        for i in 0..w.traced {
            call(p, &mut req, offset(w.warmup + w.count + i), read_len);
        }
        counting::TRACING.store(false, Ordering::SeqCst);
        let counted = allocs() - before;
        let traces = std::mem::take(&mut *counting::TRACES.lock().expect("traces"));
        print_trace(label, per_request, counted, w.traced, &traces);
    }
    per_request
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

/// Crates of the product (and this program's platform stand-ins).
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

fn main() {
    let trace = TraceFilter::from_env();
    println!(
        "Heap allocations (alloc + realloc) per NBD request in steady state, queue depth 1,\n\
         structured replies; {} / {} requests counted per 4K / 1M cell after {} / {} warm-up.\n\
         hosted: appliance::hosted's loop, disk = hosted FileDisk over a temporary file\n\
         \x20       (I/O threads for transfers above 32 KiB);\n\
         kernel: appliance::kernel::serve's loop over smoltcp socket rings, disk = virtio-blk\n\
         \x20       driver over the fake virtio transport (indirect descriptors, seg_max 126).",
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
            let mut cells = [0.0f64; 4];
            for &w in &RUN_ORDER {
                let label = format!("{path}/{layers}/{}", WORKLOADS[w].name);
                cells[w] = measure(p.as_mut(), &WORKLOADS[w], &label, &trace);
            }
            idle.push((path, layers, idle_turn(p.as_mut())));
            rows.push((path, layers, cells));
        }
    }
    println!();
    print!("{:<8} {:>6}", "path", "layers");
    for w in &WORKLOADS {
        print!(" {:>9}", w.name);
    }
    println!();
    for (path, layers, cells) in &rows {
        print!("{path:<8} {layers:>6}");
        for c in cells {
            print!(" {c:>9.1}");
        }
        println!();
    }
    let idle: Vec<String> = idle
        .iter()
        .map(|(p, l, n)| format!("{p}/{l} {n:.1}"))
        .collect();
    println!(
        "\nAllocations per idle loop turn (no request outstanding): {}",
        idle.join(", ")
    );
}
