//! A fake virtio transport for host tests: it keeps the status, features
//! and config space of a device and reads the split virtqueues the driver
//! set up (virtio 1.2 §2.7) straight from memory, which works on the host
//! because `IdentityHal` hands out process addresses as "physical" ones.
//! Device behaviour (what a request does) is written by each test.
//!
//! Host programs outside this crate (the allocation benchmark in
//! `tests/`) get it with the `fake` feature. It is for the host only:
//! [`read_mem`] and [`write_mem`] trust their address to be a buffer the
//! driver shared with the device, as a device would.

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// One descriptor chain taken from the available ring.
#[derive(Clone, Debug)]
pub struct Chain {
    /// Head descriptor index (the token).
    pub head: u16,
    /// Device-readable buffers in order.
    pub readable: Vec<(usize, u32)>,
    /// Device-writable buffers in order.
    pub writable: Vec<(usize, u32)>,
    /// Whether the chain was given through an indirect table.
    pub indirect: bool,
}

/// The device side of one split virtqueue.
#[derive(Clone, Debug, Default)]
pub struct FakeQueue {
    /// Queue size.
    pub size: u32,
    desc: usize,
    driver: usize,
    device: usize,
    /// Next available-ring index the device will read.
    pub last_avail: u16,
    /// Next used-ring index the device will write.
    pub used_idx: u16,
    /// Queue set up by the driver.
    pub ready: bool,
}

fn rd16(a: usize) -> u16 {
    // SAFETY: test-only; `a` is inside a ring the driver allocated.
    unsafe { core::ptr::read_volatile(a as *const u16) }
}

fn desc_at(table: usize, i: usize) -> (u64, u32, u16, u16) {
    let p = table + 16 * i;
    // SAFETY: test-only; `p` is inside a descriptor table the driver owns.
    unsafe {
        (
            core::ptr::read_volatile(p as *const u64),
            core::ptr::read_volatile((p + 8) as *const u32),
            core::ptr::read_volatile((p + 12) as *const u16),
            core::ptr::read_volatile((p + 14) as *const u16),
        )
    }
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

impl FakeQueue {
    /// Takes every chain the driver made available since the last call.
    pub fn take_avail(&mut self) -> Vec<Chain> {
        let mut out = Vec::new();
        if !self.ready {
            return out;
        }
        let avail_idx = rd16(self.driver + 2);
        while self.last_avail != avail_idx {
            let slot = (self.last_avail as u32 % self.size) as usize;
            let head = rd16(self.driver + 4 + 2 * slot);
            let mut chain = Chain {
                head,
                readable: Vec::new(),
                writable: Vec::new(),
                indirect: false,
            };
            let (addr, len, flags, _) = desc_at(self.desc, head as usize);
            let (table, mut i, count) = if flags & F_INDIRECT != 0 {
                chain.indirect = true;
                (addr as usize, 0usize, (len / 16) as usize)
            } else {
                (self.desc, head as usize, self.size as usize)
            };
            let mut steps = 0;
            loop {
                let (a, l, f, n) = desc_at(table, i);
                assert!(l > 0, "empty descriptor");
                if f & F_WRITE != 0 {
                    chain.writable.push((a as usize, l));
                } else {
                    assert!(chain.writable.is_empty(), "readable after writable");
                    chain.readable.push((a as usize, l));
                }
                steps += 1;
                assert!(steps <= count, "descriptor loop");
                if f & F_NEXT == 0 {
                    break;
                }
                i = n as usize;
            }
            out.push(chain);
            self.last_avail = self.last_avail.wrapping_add(1);
        }
        out
    }

    /// Returns a chain to the driver through the used ring.
    pub fn put_used(&mut self, head: u16, len: u32) {
        let slot = (self.used_idx as u32 % self.size) as usize;
        let e = self.device + 4 + 8 * slot;
        // SAFETY: test-only; the used ring belongs to the fake device.
        unsafe {
            core::ptr::write_volatile(e as *mut u32, u32::from(head));
            core::ptr::write_volatile((e + 4) as *mut u32, len);
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.used_idx = self.used_idx.wrapping_add(1);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile((self.device + 2) as *mut u16, self.used_idx) };
    }
}

/// Reads `len` bytes at `addr` (test-only device access).
pub fn read_mem(addr: usize, len: usize) -> Vec<u8> {
    // SAFETY: test-only; the range is a buffer the driver shared.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}

/// Writes `data` at `addr` (test-only device access).
pub fn write_mem(addr: usize, data: &[u8]) {
    // SAFETY: test-only; the range is a writable buffer the driver shared.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

/// State of the fake device, shared between the transport (owned by the
/// driver) and the test.
#[derive(Debug)]
pub struct FakeDevice {
    /// Device type reported.
    pub device_type: DeviceType,
    /// Features offered.
    pub offered: u64,
    /// Features the driver wrote.
    pub accepted: u64,
    /// Device status register.
    pub status: u32,
    /// Refuse FEATURES_OK.
    pub reject_features: bool,
    /// Config space bytes.
    pub config: Vec<u8>,
    /// Queues.
    pub queues: Vec<FakeQueue>,
    /// Largest queue size offered.
    pub max_queue: u32,
    /// Notifications received, per queue.
    pub notifies: Vec<u32>,
    /// Pending ISR bits.
    pub isr: u32,
}

/// A transport over a shared [`FakeDevice`].
#[derive(Clone, Debug)]
pub struct FakeTransport(pub Rc<RefCell<FakeDevice>>);

impl FakeTransport {
    /// A device of `device_type` offering `offered`, with `config` bytes.
    pub fn new(device_type: DeviceType, offered: u64, config: Vec<u8>, queues: usize) -> Self {
        FakeTransport(Rc::new(RefCell::new(FakeDevice {
            device_type,
            offered,
            accepted: 0,
            status: 0,
            reject_features: false,
            config,
            queues: vec![FakeQueue::default(); queues],
            max_queue: 256,
            notifies: vec![0; queues],
            isr: 0,
        })))
    }
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        self.0.borrow().device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.0.borrow().offered
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.borrow_mut().accepted = driver_features;
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.0.borrow().max_queue
    }

    fn notify(&mut self, queue: u16) {
        self.0.borrow_mut().notifies[queue as usize] += 1;
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.0.borrow().status)
    }

    fn set_status(&mut self, status: DeviceStatus) {
        let mut d = self.0.borrow_mut();
        let mut bits = status.bits();
        if d.reject_features {
            bits &= !DeviceStatus::FEATURES_OK.bits();
        }
        d.status = bits;
        if bits == 0 {
            for q in d.queues.iter_mut() {
                *q = FakeQueue::default();
            }
        }
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.0.borrow_mut().queues[queue as usize] = FakeQueue {
            size,
            desc: descriptors as usize,
            driver: driver_area as usize,
            device: device_area as usize,
            last_avail: 0,
            used_idx: 0,
            ready: true,
        };
    }

    fn queue_unset(&mut self, queue: u16) {
        self.0.borrow_mut().queues[queue as usize] = FakeQueue::default();
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.borrow().queues[queue as usize].ready
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let mut d = self.0.borrow_mut();
        let isr = d.isr;
        d.isr = 0;
        InterruptStatus::from_bits_retain(isr)
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let d = self.0.borrow();
        let n = core::mem::size_of::<T>();
        let bytes = d
            .config
            .get(offset..offset + n)
            .ok_or(Error::ConfigSpaceTooSmall)?;
        Ok(T::read_from_bytes(bytes).expect("size checked"))
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), Error> {
        let mut d = self.0.borrow_mut();
        let src = value.as_bytes();
        let dst = d
            .config
            .get_mut(offset..offset + src.len())
            .ok_or(Error::ConfigSpaceTooSmall)?;
        dst.copy_from_slice(src);
        Ok(())
    }
}
