//! Host tests of the virtio-net driver against a fake device.

use super::*;
use crate::fake::{read_mem, write_mem, FakeTransport};
use smoltcp::phy::{Device, RxToken, TxToken};
use std::vec::Vec;

fn net_config_space() -> Vec<u8> {
    let mut c = std::vec![0u8; 12];
    c[0..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    c[6] = 1; // link up
    c[10..12].copy_from_slice(&1500u16.to_le_bytes());
    c
}

fn dev(features: u64, cfg: NetConfig) -> (FakeTransport, VirtioNet<FakeTransport>) {
    let t = FakeTransport::new(DeviceType::Network, features, net_config_space(), 2);
    let n = VirtioNet::<FakeTransport>::new(t.clone(), cfg).expect("init");
    (t, n)
}

/// The device delivers `frames` into posted receive buffers; returns how
/// many fitted.
fn deliver(t: &FakeTransport, frames: &[Vec<u8>], hdr: usize) -> usize {
    let mut d = t.0.borrow_mut();
    let q = &mut d.queues[0];
    let chains = q.take_avail();
    // Put back what we do not use by only taking as many as needed: the
    // fake consumes all avail chains, so keep the rest for later.
    let mut n = 0;
    let mut rest = Vec::new();
    for c in chains {
        if n < frames.len() {
            let (a, l) = c.writable[0];
            assert!(l as usize >= hdr + frames[n].len());
            write_mem(a, &std::vec![0u8; hdr]);
            write_mem(a + hdr, &frames[n]);
            q.put_used(c.head, (hdr + frames[n].len()) as u32);
            n += 1;
        } else {
            rest.push(c);
        }
    }
    // Unused chains are remembered by rewinding the avail cursor.
    q.last_avail = q.last_avail.wrapping_sub(rest.len() as u16);
    n
}

/// The device sends everything queued on the transmit queue.
fn drain_tx(t: &FakeTransport, hdr: usize, complete: bool) -> Vec<Vec<u8>> {
    let mut d = t.0.borrow_mut();
    let q = &mut d.queues[1];
    let mut out = Vec::new();
    for c in q.take_avail() {
        assert_eq!(c.readable.len(), 1, "header and frame in one buffer");
        let (a, l) = c.readable[0];
        let b = read_mem(a, l as usize);
        assert!(b[..hdr].iter().all(|&x| x == 0));
        out.push(b[hdr..].to_vec());
        if complete {
            q.put_used(c.head, 0);
        }
    }
    out
}

fn frame(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8) ^ tag).collect()
}

#[test]
fn init_reads_mac_and_fills_rx_ring() {
    let (t, n) = dev(WANTED_FEATURES, NetConfig::default());
    assert_eq!(n.mac(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert!(n.link_up());
    let caps = n.capabilities();
    assert_eq!(caps.max_transmission_unit, 1514);
    let avail = t.0.borrow_mut().queues[0].take_avail();
    assert_eq!(avail.len(), QUEUE_SIZE);
    assert!(t.0.borrow().notifies[0] >= 1);
    assert_eq!(header_len(n.features()), 12);
}

#[test]
fn legacy_header_is_ten_bytes() {
    assert_eq!(header_len(F_MAC), 10);
}

#[test]
fn receive_many_frames_recycling_buffers() {
    let (t, mut n) = dev(WANTED_FEATURES, NetConfig::default());
    let mut got = 0usize;
    for round in 0..10u8 {
        let frames: Vec<Vec<u8>> = (0..100).map(|i| frame(60 + i * 14, round)).collect();
        assert_eq!(deliver(&t, &frames, 12), 100);
        for f in &frames {
            let (rx, _tx) = n.receive(Instant::ZERO).expect("frame");
            rx.consume(|b| assert_eq!(b, &f[..]));
            got += 1;
        }
        assert!(n.receive(Instant::ZERO).is_none());
    }
    assert_eq!(got, 1000);
    assert_eq!(n.stats().rx_frames, 1000);
}

#[test]
fn dropped_rx_token_returns_its_buffer() {
    let (t, mut n) = dev(
        WANTED_FEATURES,
        NetConfig {
            rx_buffers: 4,
            ..NetConfig::default()
        },
    );
    for _ in 0..20 {
        assert_eq!(deliver(&t, &[frame(64, 1)], 12), 1);
        let tokens = n.receive(Instant::ZERO);
        assert!(tokens.is_some());
        drop(tokens);
    }
}

#[test]
fn transmit_pipelines_and_recycles() {
    let (t, mut n) = dev(WANTED_FEATURES, NetConfig::default());
    // Fill every transmit buffer without the device sending anything.
    let mut sent = Vec::new();
    for i in 0..QUEUE_SIZE {
        let tx = n.transmit(Instant::ZERO).expect("free buffer");
        let f = frame(1514, i as u8);
        tx.consume(f.len(), |b| b.copy_from_slice(&f));
        sent.push(f);
    }
    assert!(n.transmit(Instant::ZERO).is_none(), "all in flight");
    assert_eq!(n.stats().tx_max_in_flight as usize, QUEUE_SIZE);
    let out = drain_tx(&t, 12, true);
    assert_eq!(out, sent);
    // Completed buffers come back.
    for _ in 0..3 * QUEUE_SIZE {
        let tx = n.transmit(Instant::ZERO).expect("recycled");
        tx.consume(100, |b| b.fill(7));
        assert_eq!(drain_tx(&t, 12, true).len(), 1);
    }
    assert_eq!(n.stats().tx_frames as usize, 4 * QUEUE_SIZE);
    assert_eq!(n.stats().tx_dropped, 0);
}

#[test]
fn oversized_frame_is_dropped_not_sent() {
    let (t, mut n) = dev(WANTED_FEATURES, NetConfig::default());
    let tx = n.transmit(Instant::ZERO).unwrap();
    tx.consume(BUF_SIZE, |b| b.fill(1));
    assert!(drain_tx(&t, 12, true).is_empty());
    assert_eq!(n.stats().tx_dropped, 1);
}

#[test]
fn receive_waits_for_a_free_transmit_buffer() {
    let (t, mut n) = dev(
        WANTED_FEATURES,
        NetConfig {
            tx_buffers: 1,
            ..NetConfig::default()
        },
    );
    n.transmit(Instant::ZERO)
        .unwrap()
        .consume(60, |b| b.fill(0));
    assert_eq!(deliver(&t, &[frame(60, 0)], 12), 1);
    assert!(n.receive(Instant::ZERO).is_none());
    drain_tx(&t, 12, true);
    assert!(n.receive(Instant::ZERO).is_some());
}
