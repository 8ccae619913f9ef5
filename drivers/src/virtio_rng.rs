//! virtio-rng driver (virtio 1.2 §5.4): the host's entropy, read
//! synchronously at boot to seed the key generator.
//!
//! Built on `Transport` + one `VirtQueue` (requestq = 0) rather than
//! virtio-drivers' `VirtIORng`, whose `request_entropy` spins until the
//! device answers, without bound. Each request is one device-writable
//! buffer; the device fills some or all of it and returns how many bytes
//! it wrote (§5.4.6). [`VirtioRng::read`] posts requests and polls the
//! used ring until the caller's buffer is full or a deadline passes.
//!
//! Used-buffer interrupts are suppressed (VIRTQ_AVAIL_F_NO_INTERRUPT):
//! the driver polls, and nothing acknowledges the device's interrupt in
//! the event loop. A request still at the device when a read gives up
//! stays posted and is taken by the next read; dropping the driver
//! resets the device before its buffer is freed.

use crate::hal::IdentityHal;
use crate::virtio::{self, InitError, F_VERSION_1};
use core::alloc::Layout;
use core::ptr::NonNull;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::Hal;

/// Descriptors in the request queue (one request is in flight at a time).
pub const QUEUE_SIZE: usize = 8;
const REQ_Q: u16 = 0;
/// Largest request, in bytes.
pub const BUF_SIZE: usize = 64;
/// Features this driver asks for (the device type has none of its own).
pub const WANTED_FEATURES: u64 = F_VERSION_1;

/// The buffer the device writes entropy into.
struct Buf(NonNull<u8>);

impl Buf {
    const LAYOUT: Layout = match Layout::from_size_align(BUF_SIZE, BUF_SIZE) {
        Ok(l) => l,
        Err(_) => panic!("bad layout"),
    };

    fn new() -> Option<Buf> {
        // SAFETY: the layout has non-zero size.
        NonNull::new(unsafe { alloc::alloc::alloc_zeroed(Self::LAYOUT) }).map(Buf)
    }

    /// The first `len` bytes.
    ///
    /// # Safety
    ///
    /// The device must not own the buffer, or the slice must be used only
    /// to hand it to the device, and no other reference may be alive.
    #[allow(
        clippy::mut_from_ref,
        reason = "one buffer, ownership tracked by `in_flight`"
    )]
    unsafe fn get(&self, len: usize) -> &mut [u8] {
        assert!(len <= BUF_SIZE);
        // SAFETY: in bounds of the allocation; exclusivity per the caller.
        unsafe { core::slice::from_raw_parts_mut(self.0.as_ptr(), len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::alloc::dealloc(self.0.as_ptr(), Self::LAYOUT) };
    }
}

/// Counters of one virtio-rng device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngStats {
    /// Requests the device completed.
    pub requests: u64,
    /// Bytes the device returned (including any the caller did not need).
    pub bytes: u64,
    /// Reads that gave up before their buffer was full.
    pub timeouts: u64,
}

/// A virtio entropy device.
pub struct VirtioRng<T: Transport, H: Hal = IdentityHal> {
    transport: T,
    queue: VirtQueue<H, QUEUE_SIZE>,
    buf: Buf,
    /// The request at the device: (token, bytes asked for).
    in_flight: Option<(u16, usize)>,
    stats: RngStats,
}

impl<T: Transport, H: Hal> VirtioRng<T, H> {
    /// Initialises the device (virtio 1.2 §3.1.1, §5.4.5) and makes it
    /// live; no request is posted until the first [`VirtioRng::read`].
    pub fn new(mut transport: T) -> Result<Self, InitError> {
        if transport.device_type() != DeviceType::EntropySource {
            return Err(InitError::WrongDeviceType);
        }
        let features = virtio::negotiate(&mut transport, WANTED_FEATURES)?;
        let mut queue = VirtQueue::<H, QUEUE_SIZE>::new(&mut transport, REQ_Q, false, false)
            .map_err(InitError::Queue)?;
        // Polled: no used-buffer interrupts (the flag, as EVENT_IDX is off).
        queue.set_dev_notify(false);
        let buf = Buf::new().ok_or(InitError::NoMemory)?;
        transport.finish_init();
        log::info!("virtio-rng: features {features:#x}");
        Ok(VirtioRng {
            transport,
            queue,
            buf,
            in_flight: None,
            stats: RngStats::default(),
        })
    }

    /// Counters since start.
    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// Fills `out` with entropy from the device, waiting at most
    /// `timeout_ns` as measured by `clock` (nanoseconds, monotonic).
    /// Returns how many bytes were written to the front of `out`: all of
    /// them, or fewer when the device was slower than the deadline.
    pub fn read(
        &mut self,
        out: &mut [u8],
        timeout_ns: u64,
        clock: &mut dyn FnMut() -> u64,
    ) -> usize {
        let start = clock();
        let mut n = 0;
        while n < out.len() {
            if self.in_flight.is_none() && !self.post(out.len() - n) {
                break;
            }
            if let Some(got) = self.take() {
                let k = got.len().min(out.len() - n);
                out[n..n + k].copy_from_slice(&got[..k]);
                n += k;
                if k > 0 {
                    continue;
                }
            }
            if clock().saturating_sub(start) >= timeout_ns {
                self.stats.timeouts += 1;
                break;
            }
            core::hint::spin_loop();
        }
        // Nothing should have been raised; clear it if it was.
        let _ = self.transport.ack_interrupt();
        n
    }

    /// Asks the device for up to `want` bytes. False when the queue
    /// refused the request.
    fn post(&mut self, want: usize) -> bool {
        let len = want.clamp(1, BUF_SIZE);
        // SAFETY: no request is in flight, so the device does not own the
        // buffer; it is not touched again until `take` pops the request.
        let res = unsafe {
            let b = self.buf.get(len);
            self.queue.add(&[], &mut [b])
        };
        match res {
            Ok(token) => {
                self.in_flight = Some((token, len));
                if self.queue.should_notify() {
                    self.transport.notify(REQ_Q);
                }
                true
            }
            Err(e) => {
                log::warn!("virtio-rng: request not queued: {e:?}");
                false
            }
        }
    }

    /// The bytes of the request in flight, once the device has returned it.
    fn take(&mut self) -> Option<&[u8]> {
        let (token, len) = self.in_flight?;
        let used = self.queue.peek_used()?;
        if used != token {
            log::error!("virtio-rng: unknown request {used} (expected {token})");
            return None;
        }
        // SAFETY: `token` is the next used chain and holds the first `len`
        // bytes of the buffer, passed back exactly as they were added.
        let r = unsafe {
            let b = self.buf.get(len);
            self.queue.pop_used(token, &[], &mut [b])
        };
        self.in_flight = None;
        let got = (r.ok()? as usize).min(len);
        self.stats.requests += 1;
        self.stats.bytes += got as u64;
        // SAFETY: the device returned the buffer; nothing else refers to it.
        Some(unsafe { &*self.buf.get(got) })
    }
}

impl<T: Transport, H: Hal> Drop for VirtioRng<T, H> {
    fn drop(&mut self) {
        // Reset (§2.4) so the device lets go of a request still in flight
        // before the buffer and the rings are freed.
        self.transport.set_status(DeviceStatus::empty());
        let mut spins = 0u32;
        while self.transport.get_status() != DeviceStatus::empty() && spins < 1_000_000 {
            core::hint::spin_loop();
            spins += 1;
        }
        self.transport.queue_unset(REQ_Q);
    }
}

#[cfg(test)]
mod tests;
