//! virtio-net driver for smoltcp (virtio 1.2 §5.1), with an RX buffer pool
//! that keeps the receive ring full and pipelined transmit.
//!
//! Built on `Transport` + two `VirtQueue`s (receiveq1 = 0, transmitq1 = 1)
//! rather than `VirtIONet`, whose `send` waits for every frame. Each
//! buffer is one descriptor holding the `virtio_net_hdr` followed by the
//! frame (VERSION_1 implies any layout, §2.7.4; legacy devices are asked
//! for ANY_LAYOUT). Transmit buffers are recycled when the device returns
//! them; receive buffers are given back to the ring as soon as smoltcp has
//! consumed the frame. No offloads are negotiated, so the header sent is
//! all zeroes and the one received is ignored.
//!
//! The device is polled. Transmit completions do not raise interrupts
//! (VIRTQ_AVAIL_F_NO_INTERRUPT on the transmit queue); receive ones do, so
//! an idle loop halted in `hlt` wakes when a frame arrives. As with the
//! disks, the loop acknowledges the interrupt after waking
//! ([`VirtioNet::ack_interrupt`] or the `IrqAck` from `probe_all`).

use crate::hal::IdentityHal;
use crate::virtio::{self, InitError, F_ANY_LAYOUT, F_VERSION_1};
use alloc::vec;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr::NonNull;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::Hal;

/// Descriptors per queue.
pub const QUEUE_SIZE: usize = 128;
const RX_Q: u16 = 0;
const TX_Q: u16 = 1;
/// Bytes per buffer: header + a 1514-byte frame, rounded up.
pub const BUF_SIZE: usize = 2048;
/// Largest Ethernet frame without FCS for a 1500-byte IP MTU.
pub const MAX_FRAME: usize = 1514;

/// VIRTIO_NET_F_MTU: `mtu` in config is valid.
pub const F_MTU: u64 = 1 << 3;
/// VIRTIO_NET_F_MAC: `mac` in config is valid.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS: `status` in config is valid.
pub const F_STATUS: u64 = 1 << 16;
/// Features this driver asks for.
pub const WANTED_FEATURES: u64 = F_MAC | F_STATUS | F_MTU | F_VERSION_1 | F_ANY_LAYOUT;

/// Length of `virtio_net_hdr`: 12 bytes for VERSION_1 (§5.1.6), 10 for a
/// legacy device without MRG_RXBUF (§5.1.6.1).
pub fn header_len(features: u64) -> usize {
    if features & F_VERSION_1 != 0 {
        12
    } else {
        10
    }
}

/// Settings of a virtio-net device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Receive buffers kept in the ring (at most [`QUEUE_SIZE`]).
    pub rx_buffers: usize,
    /// Transmit buffers (frames in flight; at most [`QUEUE_SIZE`]).
    pub tx_buffers: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            rx_buffers: QUEUE_SIZE,
            tx_buffers: QUEUE_SIZE,
        }
    }
}

/// Counters of one virtio-net device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames transmitted (handed to the device).
    pub tx_frames: u64,
    /// Frames dropped on transmit (too large, or no buffer).
    pub tx_dropped: u64,
    /// Receive buffers returned with a length shorter than the header.
    pub rx_errors: u64,
    /// Most transmit frames in flight at once.
    pub tx_max_in_flight: u32,
}

/// Fixed-size buffers in one page-aligned allocation; the memory the
/// device reads and writes frames in.
struct Pool {
    base: NonNull<u8>,
    count: usize,
}

impl Pool {
    fn new(count: usize) -> Option<Pool> {
        let layout = Layout::from_size_align(count.max(1) * BUF_SIZE, 4096).ok()?;
        // SAFETY: the layout has non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        Some(Pool {
            base: NonNull::new(p)?,
            count,
        })
    }

    fn layout(&self) -> Layout {
        Layout::from_size_align(self.count.max(1) * BUF_SIZE, 4096).expect("checked in new")
    }

    /// Buffer `i`.
    ///
    /// # Safety
    ///
    /// The device must not own buffer `i`, and no other reference to it
    /// may be alive.
    #[allow(
        clippy::mut_from_ref,
        reason = "buffers are disjoint; ownership is tracked by index"
    )]
    unsafe fn buf(&self, i: usize) -> &mut [u8] {
        assert!(i < self.count);
        // SAFETY: in bounds of the allocation; exclusivity per the caller.
        unsafe { core::slice::from_raw_parts_mut(self.base.as_ptr().add(i * BUF_SIZE), BUF_SIZE) }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::alloc::dealloc(self.base.as_ptr(), self.layout()) };
    }
}

const NONE: u16 = u16::MAX;

/// The receive side: queue, buffers, and which buffer each token holds.
pub struct RxRing<H: Hal> {
    queue: VirtQueue<H, QUEUE_SIZE>,
    pool: Pool,
    by_token: Vec<u16>,
    /// Buffers that could not be put back into the ring yet.
    spare: Vec<u16>,
    hdr_len: usize,
    kick: bool,
    stats_frames: u64,
    stats_errors: u64,
}

impl<H: Hal> RxRing<H> {
    /// Gives buffer `i` to the device.
    fn post(&mut self, i: u16) {
        // SAFETY: buffer `i` is ours (just returned by the device or never
        // given); it stays untouched until the device hands it back.
        let res = unsafe {
            let b = self.pool.buf(i as usize);
            self.queue.add(&[], &mut [b])
        };
        match res {
            Ok(token) => {
                self.by_token[token as usize] = i;
                self.kick = true;
            }
            Err(_) => self.spare.push(i),
        }
    }

    /// Takes the next received frame: (buffer, frame length).
    fn pop(&mut self) -> Option<(u16, usize)> {
        while let Some(token) = self.queue.peek_used() {
            let i = *self.by_token.get(token as usize)?;
            if i == NONE {
                log::error!("virtio-net: unknown receive chain {token}");
                return None;
            }
            // SAFETY: `token` is the next used chain and holds buffer `i`,
            // which we pass back exactly as it was added.
            let len = unsafe {
                let b = self.pool.buf(i as usize);
                self.queue.pop_used(token, &[], &mut [b])
            };
            self.by_token[token as usize] = NONE;
            match len {
                Ok(len) if (len as usize) >= self.hdr_len && len as usize <= BUF_SIZE => {
                    self.stats_frames += 1;
                    return Some((i, len as usize - self.hdr_len));
                }
                _ => {
                    self.stats_errors += 1;
                    self.post(i);
                }
            }
        }
        None
    }
}

/// The transmit side: queue, buffers, free list, in-flight map.
pub struct TxRing<H: Hal> {
    queue: VirtQueue<H, QUEUE_SIZE>,
    pool: Pool,
    free: Vec<u16>,
    /// (buffer, length added) per token.
    by_token: Vec<(u16, u16)>,
    hdr_len: usize,
    in_flight: u32,
    stats: NetStats,
}

impl<H: Hal> TxRing<H> {
    /// Takes back every buffer the device has finished sending.
    fn reclaim(&mut self) {
        while let Some(token) = self.queue.peek_used() {
            let Some(&(i, len)) = self.by_token.get(token as usize) else {
                return;
            };
            if i == NONE {
                log::error!("virtio-net: unknown transmit chain {token}");
                return;
            }
            // SAFETY: `token` is the next used chain; it holds the first
            // `len` bytes of buffer `i`, passed back as they were added.
            let r = unsafe {
                let b = self.pool.buf(i as usize);
                self.queue.pop_used(token, &[&b[..len as usize]], &mut [])
            };
            if r.is_err() {
                return;
            }
            self.by_token[token as usize] = (NONE, 0);
            self.free.push(i);
            self.in_flight -= 1;
        }
    }

    /// Builds a frame of `len` bytes with `f` and queues it.
    fn send<T: Transport, R>(
        &mut self,
        transport: &mut T,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        let hdr = self.hdr_len;
        let slot = if hdr + len <= BUF_SIZE {
            self.free.pop()
        } else {
            None
        };
        let Some(i) = slot else {
            self.stats.tx_dropped += 1;
            let mut scratch = vec![0u8; len];
            return f(&mut scratch);
        };
        // SAFETY: buffer `i` came off the free list, so the device does
        // not own it and nothing else refers to it.
        let b = unsafe { self.pool.buf(i as usize) };
        b[..hdr].fill(0);
        let r = f(&mut b[hdr..hdr + len]);
        let total = hdr + len;
        // SAFETY: the buffer is not touched again until `reclaim` pops it.
        match unsafe { self.queue.add(&[&b[..total]], &mut []) } {
            Ok(token) => {
                self.by_token[token as usize] = (i, total as u16);
                self.in_flight += 1;
                self.stats.tx_frames += 1;
                self.stats.tx_max_in_flight = self.stats.tx_max_in_flight.max(self.in_flight);
                if self.queue.should_notify() {
                    transport.notify(TX_Q);
                }
            }
            Err(_) => {
                self.free.push(i);
                self.stats.tx_dropped += 1;
            }
        }
        r
    }
}

/// A virtio-net device; implements [`smoltcp::phy::Device`].
pub struct VirtioNet<T: Transport, H: Hal = IdentityHal> {
    transport: T,
    rx: RxRing<H>,
    tx: TxRing<H>,
    mac: [u8; 6],
    mtu: usize,
    features: u64,
}

impl<T: Transport, H: Hal> VirtioNet<T, H> {
    /// Initialises the device (virtio 1.2 §3.1.1, §5.1.5), fills the
    /// receive ring and makes the device live.
    pub fn new(mut transport: T, config: NetConfig) -> Result<Self, InitError> {
        if transport.device_type() != DeviceType::Network {
            return Err(InitError::WrongDeviceType);
        }
        let features = virtio::negotiate(&mut transport, WANTED_FEATURES)?;
        let mac = if features & F_MAC != 0 {
            transport
                .read_consistent(|| {
                    let mut m = [0u8; 6];
                    for (i, b) in m.iter_mut().enumerate() {
                        *b = transport.read_config_space::<u8>(i)?;
                    }
                    Ok(m)
                })
                .map_err(InitError::Config)?
        } else {
            // A locally administered address (IEEE 802 §8.2.2).
            [0x02, 0x53, 0x54, 0x00, 0x00, 0x01]
        };
        let mut mtu = 1500;
        if features & F_MTU != 0 {
            if let Some(m) = virtio::config_u16(&transport, 10) {
                mtu = mtu.min(usize::from(m).max(576));
            }
        }
        let hdr_len = header_len(features);
        let rxq = VirtQueue::<H, QUEUE_SIZE>::new(&mut transport, RX_Q, false, false)
            .map_err(InitError::Queue)?;
        let mut txq = VirtQueue::<H, QUEUE_SIZE>::new(&mut transport, TX_Q, false, false)
            .map_err(InitError::Queue)?;
        // Transmit completions are reaped when sending; no interrupt needed.
        txq.set_dev_notify(false);
        let rx_n = config.rx_buffers.clamp(1, QUEUE_SIZE);
        let tx_n = config.tx_buffers.clamp(1, QUEUE_SIZE);
        let mut rx = RxRing {
            queue: rxq,
            pool: Pool::new(rx_n).ok_or(InitError::NoMemory)?,
            by_token: vec![NONE; QUEUE_SIZE],
            spare: Vec::new(),
            hdr_len,
            kick: false,
            stats_frames: 0,
            stats_errors: 0,
        };
        let tx = TxRing {
            queue: txq,
            pool: Pool::new(tx_n).ok_or(InitError::NoMemory)?,
            free: (0..tx_n as u16).rev().collect(),
            by_token: vec![(NONE, 0); QUEUE_SIZE],
            hdr_len,
            in_flight: 0,
            stats: NetStats::default(),
        };
        for i in 0..rx_n as u16 {
            rx.post(i);
        }
        // §3.1.1 step 7: buffers may be posted before DRIVER_OK; notify
        // after, once the device is live.
        transport.finish_init();
        rx.kick = false;
        transport.notify(RX_Q);
        log::info!(
            "virtio-net: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, mtu {mtu}, features {features:#x}",
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5]
        );
        Ok(VirtioNet {
            transport,
            rx,
            tx,
            mac,
            mtu,
            features,
        })
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Counters since start.
    pub fn stats(&self) -> NetStats {
        let mut s = self.tx.stats;
        s.rx_frames = self.rx.stats_frames;
        s.rx_errors = self.rx.stats_errors;
        s
    }

    /// Link state from the config `status` field (true when the device
    /// does not report it).
    pub fn link_up(&self) -> bool {
        if self.features & F_STATUS == 0 {
            return true;
        }
        virtio::config_u16(&self.transport, 6).is_none_or(|s| s & 1 != 0)
    }

    /// Acknowledges an interrupt (reads the ISR, deasserting INTx).
    /// Returns true when the device had raised one.
    pub fn ack_interrupt(&mut self) -> bool {
        !self.transport.ack_interrupt().is_empty()
    }

    /// True when a received frame is waiting.
    pub fn rx_ready(&self) -> bool {
        self.rx.queue.can_pop()
    }

    /// Housekeeping outside smoltcp's calls: reposts receive buffers,
    /// notifies the device of them, and reclaims sent buffers.
    pub fn service(&mut self) {
        let spare = core::mem::take(&mut self.rx.spare);
        for i in spare {
            self.rx.post(i);
        }
        if self.rx.kick {
            self.rx.kick = false;
            if self.rx.queue.should_notify() {
                self.transport.notify(RX_Q);
            }
        }
        self.tx.reclaim();
    }
}

/// A received frame, lent to smoltcp; its buffer goes back to the ring
/// when the token is consumed or dropped.
pub struct NetRxToken<'a, H: Hal> {
    rx: &'a mut RxRing<H>,
    buf: u16,
    len: usize,
}

impl<H: Hal> phy::RxToken for NetRxToken<'_, H> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let hdr = self.rx.hdr_len;
        // SAFETY: the device returned this buffer; it is not posted again
        // until this token is dropped (below).
        let b = unsafe { self.rx.pool.buf(self.buf as usize) };
        f(&b[hdr..hdr + self.len])
    }
}

impl<H: Hal> Drop for NetRxToken<'_, H> {
    fn drop(&mut self) {
        self.rx.post(self.buf);
    }
}

/// Permission to send one frame.
pub struct NetTxToken<'a, T: Transport, H: Hal> {
    tx: &'a mut TxRing<H>,
    transport: &'a mut T,
}

impl<T: Transport, H: Hal> phy::TxToken for NetTxToken<'_, T, H> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.tx.send(self.transport, len, f)
    }
}

impl<T: Transport, H: Hal> phy::Device for VirtioNet<T, H> {
    type RxToken<'a>
        = NetRxToken<'a, H>
    where
        Self: 'a;
    type TxToken<'a>
        = NetTxToken<'a, T, H>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.service();
        // A reply may be needed: only hand out a frame when a transmit
        // buffer is free, so none is dropped for want of one.
        if self.tx.free.is_empty() {
            return None;
        }
        let (buf, len) = self.rx.pop()?;
        Some((
            NetRxToken {
                rx: &mut self.rx,
                buf,
                len,
            },
            NetTxToken {
                tx: &mut self.tx,
                transport: &mut self.transport,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        Some(NetTxToken {
            tx: &mut self.tx,
            transport: &mut self.transport,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps
    }
}

#[cfg(test)]
mod tests;
