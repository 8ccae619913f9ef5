//! Host tests of the virtio-rng driver against a fake device. The clock
//! the driver polls with is where the fake device does its work.

use super::*;
use crate::fake::{write_mem, FakeTransport};
use std::vec::Vec;

fn dev() -> (FakeTransport, VirtioRng<FakeTransport>) {
    let t = FakeTransport::new(DeviceType::EntropySource, F_VERSION_1, Vec::new(), 1);
    let r = VirtioRng::<FakeTransport>::new(t.clone()).expect("init");
    (t, r)
}

/// A clock that advances 1 µs per call and, from call `answer_from` on,
/// answers every posted request with up to `chunk` bytes counting up
/// from 1.
fn device_clock(t: &FakeTransport, chunk: usize, answer_from: u64) -> impl FnMut() -> u64 + '_ {
    let mut now = 0u64;
    let mut next = 0u8;
    move || {
        now += 1000;
        if now / 1000 >= answer_from {
            let mut d = t.0.borrow_mut();
            let q = &mut d.queues[0];
            for c in q.take_avail() {
                assert!(c.readable.is_empty());
                assert_eq!(c.writable.len(), 1);
                let (a, l) = c.writable[0];
                let k = chunk.min(l as usize);
                let bytes: Vec<u8> = (0..k)
                    .map(|_| {
                        next = next.wrapping_add(1);
                        next
                    })
                    .collect();
                write_mem(a, &bytes);
                q.put_used(c.head, k as u32);
            }
        }
        now
    }
}

#[test]
fn init_takes_version_1_and_refuses_other_devices() {
    let (t, r) = dev();
    assert_eq!(t.0.borrow().accepted, F_VERSION_1);
    assert!(t.0.borrow().queues[0].ready);
    assert!(DeviceStatus::from_bits_truncate(t.0.borrow().status).contains(DeviceStatus::DRIVER_OK));
    // Nothing is asked for before the first read.
    assert!(t.0.borrow_mut().queues[0].take_avail().is_empty());
    assert_eq!(r.stats(), RngStats::default());
    let blk = FakeTransport::new(DeviceType::Block, F_VERSION_1, Vec::new(), 1);
    assert_eq!(
        VirtioRng::<FakeTransport>::new(blk).err(),
        Some(InitError::WrongDeviceType)
    );
}

#[test]
fn read_fills_the_buffer_from_several_requests() {
    let (t, mut r) = dev();
    let mut clock = device_clock(&t, 7, 0);
    let mut out = [0u8; 32];
    assert_eq!(r.read(&mut out, 1_000_000_000, &mut clock), 32);
    let want: Vec<u8> = (1..=32).collect();
    assert_eq!(&out[..], &want[..]);
    let s = r.stats();
    assert_eq!(s.requests, 5);
    assert_eq!(s.bytes, 32);
    assert_eq!(s.timeouts, 0);
    assert!(t.0.borrow().notifies[0] >= 1);
}

#[test]
fn requests_are_no_larger_than_needed() {
    let (t, mut r) = dev();
    let mut clock = device_clock(&t, usize::MAX, 0);
    let mut out = [0u8; 100];
    assert_eq!(r.read(&mut out[..3], 1_000_000_000, &mut clock), 3);
    assert_eq!(r.stats().bytes, 3);
    assert_eq!(r.read(&mut out, 1_000_000_000, &mut clock), 100);
    // 64 + 36.
    assert_eq!(r.stats().requests, 3);
    assert_eq!(r.stats().bytes, 103);
}

#[test]
fn a_silent_device_times_out_and_a_late_answer_is_kept() {
    let (t, mut r) = dev();
    // The device answers only from the 2000th clock reading on.
    let mut clock = device_clock(&t, 16, 2000);
    let mut out = [0u8; 32];
    // 1 ms at 1 µs per reading: gives up long before.
    assert_eq!(r.read(&mut out, 1_000_000, &mut clock), 0);
    assert_eq!(r.stats().timeouts, 1);
    // The request stays posted; the next read takes it rather than
    // posting another while the device holds the buffer.
    assert_eq!(r.read(&mut out, 1_000_000_000, &mut clock), 32);
    assert_eq!(r.stats().requests, 2);
    assert_eq!(&out[..4], &[1, 2, 3, 4]);
}

#[test]
fn a_device_that_returns_nothing_does_not_hang() {
    let (t, mut r) = dev();
    let mut clock = device_clock(&t, 0, 0);
    let mut out = [0u8; 8];
    assert_eq!(r.read(&mut out, 50_000, &mut clock), 0);
    assert_eq!(r.stats().timeouts, 1);
    assert!(r.stats().requests >= 1);
    assert_eq!(r.stats().bytes, 0);
}

#[test]
fn an_empty_read_asks_for_nothing() {
    let (t, mut r) = dev();
    let mut clock = device_clock(&t, 8, 0);
    assert_eq!(r.read(&mut [], 1_000_000, &mut clock), 0);
    assert_eq!(t.0.borrow().notifies[0], 0);
}

#[test]
fn drop_resets_the_device() {
    let (t, r) = dev();
    drop(r);
    assert_eq!(t.0.borrow().status, 0);
    assert!(!t.0.borrow().queues[0].ready);
}
