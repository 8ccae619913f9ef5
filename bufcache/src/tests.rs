//! Unit tests of the cache over the memory store.

use super::*;
use crate::mem::{complete_all, MemStore};
use alloc::vec::Vec;

const BS: usize = 8;

fn cache(capacity: u64, replacement: Replacement) -> Cache<MemStore> {
    let mut store = MemStore::new(64, BS);
    for b in 0..64 {
        store.set_block(b, &[b as u8; BS]);
    }
    Cache::new(
        store,
        Config {
            block_size: BS,
            capacity_bytes: capacity * BS as u64,
            replacement,
        },
    )
}

fn ready(c: &mut Cache<MemStore>) -> Vec<Ready> {
    core::iter::from_fn(|| c.take_ready()).collect()
}

/// The block pinned, completing store operations as needed.
fn pin(c: &mut Cache<MemStore>, block: BlockNo, waiter: u64) -> Handle {
    if let Lookup::Hit(h) = c.get(block, waiter) {
        return h;
    }
    complete_all(c);
    let mut got = None;
    for r in ready(c) {
        if let Ready::Block { waiter: w, result } = r {
            if w == waiter {
                got = Some(result.unwrap());
            }
        }
    }
    got.expect("the block came")
}

fn blank(c: &mut Cache<MemStore>, block: BlockNo, byte: u8) {
    let Lookup::Hit(h) = c.get_blank(block, 0) else {
        panic!("no free slot");
    };
    c.buf_mut(h).fill(byte);
    c.mark_dirty(h);
    c.unpin(h);
}

fn is_write(op: &Op<Box<[u8]>>, block: BlockNo) -> bool {
    matches!(op, Op::Write { block: b, .. } if *b == block)
}

#[test]
fn miss_reads_then_hits() {
    let mut c = cache(4, Replacement::Lru);
    assert_eq!(c.get(3, 7), Lookup::Wait);
    assert_eq!(c.in_flight(), 1);
    assert!(c.take_ready().is_none(), "nothing completes inline");
    complete_all(&mut c);
    let Some(Ready::Block {
        waiter: 7,
        result: Ok(h),
    }) = c.take_ready()
    else {
        panic!("no block");
    };
    assert!(c.is_valid(h));
    assert_eq!(c.block(h), 3);
    assert_eq!(&c.buf(h)[..], &[3; BS]);
    c.unpin(h);
    let Lookup::Hit(h2) = c.get(3, 8) else {
        panic!("not cached");
    };
    assert_eq!(h, h2);
    c.unpin(h2);
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.blocks, s.capacity), (1, 1, 1, 4));
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn getters_of_one_block_share_one_read() {
    let mut c = cache(4, Replacement::Lru);
    assert_eq!(c.get(5, 1), Lookup::Wait);
    assert_eq!(c.get(5, 2), Lookup::Wait);
    assert_eq!(c.store().pending(), 1);
    complete_all(&mut c);
    let r = ready(&mut c);
    assert_eq!(r.len(), 2);
    let Ready::Block { result: Ok(h), .. } = r[0] else {
        panic!();
    };
    assert_eq!(
        r[1],
        Ready::Block {
            waiter: 2,
            result: Ok(h)
        }
    );
    c.unpin(h);
    assert!(c.is_valid(h), "still pinned once");
    c.unpin(h);
    assert!(!c.is_valid(h), "handle no longer pinned");
    assert_eq!(c.stats().misses, 2);
}

#[test]
fn lru_evicts_the_least_recently_used_clean_block() {
    let mut c = cache(2, Replacement::Lru);
    for b in [0, 1] {
        let h = pin(&mut c, b, b);
        c.unpin(h);
    }
    let h = pin(&mut c, 0, 10);
    c.unpin(h);
    let h = pin(&mut c, 2, 11);
    c.unpin(h);
    assert_eq!(c.stats().evictions, 1);
    assert!(matches!(c.get(0, 12), Lookup::Hit(_)), "0 was used last");
    assert_eq!(c.get(1, 13), Lookup::Wait, "1 was evicted");
    assert!(c.store().allocated() <= 2);
}

#[test]
fn clock_gives_referenced_blocks_a_second_chance() {
    let mut c = cache(2, Replacement::Clock);
    for b in [0, 1] {
        let h = pin(&mut c, b, b);
        c.unpin(h);
    }
    // The hand clears both reference bits and takes slot 0 (block 0).
    let h = pin(&mut c, 2, 2);
    c.unpin(h);
    assert_eq!(c.get(0, 3), Lookup::Wait);
    complete_all(&mut c);
    // Block 1 (slot 1, not referenced since) went for block 0.
    let r = ready(&mut c);
    let Ready::Block { result: Ok(h), .. } = r[0] else {
        panic!();
    };
    c.unpin(h);
    assert!(matches!(c.get(2, 4), Lookup::Hit(_)));
    assert_eq!(c.stats().evictions, 2);
}

#[test]
fn pinned_blocks_are_never_evicted_and_misses_wait_for_a_slot() {
    let mut c = cache(1, Replacement::Clock);
    let h = pin(&mut c, 0, 0);
    c.buf_mut(h).fill(0xEE);
    assert_eq!(c.get(1, 1), Lookup::Wait);
    assert_eq!(c.store().pending(), 0, "no slot, no read");
    assert_eq!(c.waiting_for_slot(), 1);
    assert_eq!(&c.buf(h)[..], &[0xEE; BS]);
    c.unpin(h);
    assert_eq!(c.store().pending(), 1, "unpin freed the slot");
    complete_all(&mut c);
    let r = ready(&mut c);
    assert!(matches!(
        r[..],
        [Ready::Block {
            waiter: 1,
            result: Ok(_)
        }]
    ));
    assert_eq!(c.store().allocated(), 1);
}

#[test]
fn a_dirty_victim_is_written_back_before_its_slot_is_reused() {
    let mut c = cache(1, Replacement::Lru);
    blank(&mut c, 0, 0xAA);
    assert_eq!(c.stats().dirty, 1);
    assert_eq!(c.get(1, 1), Lookup::Wait);
    assert!(is_write(&c.store().pending_ops()[0], 0));
    assert_eq!(c.store().pending(), 1);
    assert_eq!(c.stats().writebacks, 1);
    let (t, b, r) = c.store_mut().complete_one(0);
    c.complete(t, b, r);
    assert_eq!(c.store().block(0), &[0xAA; BS]);
    assert!(matches!(
        c.store().pending_ops()[0],
        Op::Read { block: 1, .. }
    ));
    complete_all(&mut c);
    assert!(matches!(
        ready(&mut c)[..],
        [Ready::Block {
            waiter: 1,
            result: Ok(_)
        }]
    ));
    let s = c.stats();
    assert_eq!((s.dirty, s.evictions, s.blocks), (0, 1, 1));
}

#[test]
fn flush_writes_dirty_blocks_in_range_then_flushes_the_store() {
    let mut c = cache(8, Replacement::Lru);
    blank(&mut c, 1, 0x11);
    blank(&mut c, 2, 0x22);
    blank(&mut c, 6, 0x66);
    c.flush(Some(0..4), 9);
    assert_eq!(c.store().pending(), 2);
    assert!(c.store().pending_ops().iter().all(|op| !is_write(op, 6)));
    let (t, b, r) = c.store_mut().complete_one(1);
    c.complete(t, b, r);
    assert_eq!(c.store().pending(), 1, "store flush waits for both writes");
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Flushed {
            waiter: 9,
            result: Ok(())
        }]
    );
    assert_eq!(c.store().durable_block(1), &[0x11; BS]);
    assert_eq!(c.store().durable_block(2), &[0x22; BS]);
    assert_eq!(c.store().durable_block(6), &[6; BS]);
    assert_eq!(c.stats().dirty, 1);
    c.flush(None, 10);
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Flushed {
            waiter: 10,
            result: Ok(())
        }]
    );
    assert_eq!(c.store().durable_block(6), &[0x66; BS]);
    assert_eq!(c.stats().writebacks, 3);
}

#[test]
fn flush_of_nothing_still_flushes_the_store() {
    let mut c = cache(2, Replacement::Lru);
    let (hi, lo) = (5, 3);
    c.flush(Some(hi..lo), 1);
    c.invalidate(hi..lo);
    assert!(matches!(c.store().pending_ops(), [Op::Flush { .. }]));
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Flushed {
            waiter: 1,
            result: Ok(())
        }]
    );
}

#[test]
fn flush_waits_for_a_pinned_dirty_block_to_be_unpinned() {
    let mut c = cache(4, Replacement::Lru);
    let h = pin(&mut c, 3, 0);
    c.buf_mut(h).fill(0x33);
    c.mark_dirty(h);
    c.flush(None, 1);
    assert_eq!(c.store().pending(), 0);
    assert_eq!(c.get(3, 2), Lookup::Wait, "new pins wait for the write");
    c.buf_mut(h).fill(0x34);
    c.unpin(h);
    assert!(is_write(&c.store().pending_ops()[0], 3));
    complete_all(&mut c);
    let r = ready(&mut c);
    assert!(r.contains(&Ready::Flushed {
        waiter: 1,
        result: Ok(())
    }));
    assert!(matches!(
        r[0],
        Ready::Block {
            waiter: 2,
            result: Ok(_)
        }
    ));
    assert_eq!(c.store().durable_block(3), &[0x34; BS]);
}

#[test]
fn a_failed_write_back_fails_the_flush_and_leaves_the_block_dirty() {
    let mut c = cache(4, Replacement::Lru);
    blank(&mut c, 0, 0xA0);
    c.store_mut().fail_writes(1);
    c.flush(None, 1);
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Flushed {
            waiter: 1,
            result: Err(Error::Io)
        }]
    );
    let s = c.stats();
    assert_eq!((s.dirty, s.write_errors), (1, 1));
    assert_eq!(c.store().durable_block(0), &[0; BS]);
    c.flush(None, 2);
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Flushed {
            waiter: 2,
            result: Ok(())
        }]
    );
    assert_eq!(c.store().durable_block(0), &[0xA0; BS]);
}

#[test]
fn a_failed_store_flush_fails_the_flush() {
    let mut c = cache(4, Replacement::Lru);
    blank(&mut c, 0, 0xA0);
    c.store_mut().fail_flush(1);
    c.flush(None, 1);
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Flushed {
            waiter: 1,
            result: Err(Error::Io)
        }]
    );
    assert_eq!(c.stats().dirty, 0, "the write itself went through");
    assert_eq!(c.store().durable_block(0), &[0; BS]);
}

#[test]
fn flush_waits_for_a_write_already_in_flight() {
    let mut c = cache(4, Replacement::Lru);
    let h = pin(&mut c, 2, 0);
    c.buf_mut(h).fill(0x22);
    c.write_through(h, 5);
    assert_eq!(c.store().pending(), 1);
    c.flush(Some(2..3), 6);
    assert_eq!(
        c.store().pending(),
        1,
        "no store flush before the write ends"
    );
    let (t, b, r) = c.store_mut().complete_one(0);
    c.complete(t, b, r);
    assert_eq!(
        ready(&mut c),
        [Ready::Written {
            waiter: 5,
            result: Ok(())
        }]
    );
    assert!(matches!(c.store().pending_ops(), [Op::Flush { .. }]));
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Flushed {
            waiter: 6,
            result: Ok(())
        }]
    );
    assert_eq!(c.store().durable_block(2), &[0x22; BS]);
    assert_eq!(c.stats().writebacks, 0);
}

#[test]
fn write_through_blocks_new_pins_until_the_write_ends() {
    let mut c = cache(4, Replacement::Lru);
    let h = pin(&mut c, 1, 0);
    c.buf_mut(h).fill(0x10);
    c.write_through(h, 1);
    assert!(!c.is_valid(h), "the pin is released");
    assert_eq!(c.get(1, 2), Lookup::Wait);
    complete_all(&mut c);
    let r = ready(&mut c);
    assert_eq!(
        r[0],
        Ready::Written {
            waiter: 1,
            result: Ok(())
        }
    );
    let Ready::Block {
        waiter: 2,
        result: Ok(h),
    } = r[1]
    else {
        panic!();
    };
    assert_eq!(&c.buf(h)[..], &[0x10; BS]);
    assert_eq!(c.store().block(1), &[0x10; BS]);
    assert_eq!(c.stats().dirty, 0);
}

#[test]
fn a_failed_write_through_drops_the_block() {
    let mut c = cache(4, Replacement::Lru);
    let h = pin(&mut c, 1, 0);
    c.buf_mut(h).fill(0x10);
    c.store_mut().fail_writes(1);
    c.write_through(h, 1);
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Written {
            waiter: 1,
            result: Err(Error::Io)
        }]
    );
    let s = c.stats();
    assert_eq!((s.write_errors, s.blocks, s.dirty), (1, 0, 0));
    let h = pin(&mut c, 1, 2);
    assert_eq!(&c.buf(h)[..], &[1; BS], "re-read from the store");
}

#[test]
fn write_through_waits_for_the_other_holders() {
    let mut c = cache(4, Replacement::Lru);
    let h = pin(&mut c, 1, 0);
    let Lookup::Hit(h2) = c.get(1, 1) else {
        panic!();
    };
    c.buf_mut(h).fill(0x19);
    c.write_through(h, 2);
    assert_eq!(
        c.store().pending(),
        0,
        "another holder still has the buffer"
    );
    assert_eq!(&c.buf(h2)[..], &[0x19; BS]);
    c.unpin(h2);
    assert!(is_write(&c.store().pending_ops()[0], 1));
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [Ready::Written {
            waiter: 2,
            result: Ok(())
        }]
    );
}

#[test]
fn invalidate_discards_dirty_blocks() {
    let mut c = cache(4, Replacement::Lru);
    blank(&mut c, 0, 0xA0);
    c.invalidate(0..1);
    let s = c.stats();
    assert_eq!((s.dirty, s.blocks), (0, 0));
    c.flush(None, 1);
    complete_all(&mut c);
    assert_eq!(c.store().durable_block(0), &[0; BS]);
    let h = pin(&mut c, 0, 2);
    assert_eq!(&c.buf(h)[..], &[0; BS]);
}

#[test]
fn invalidate_of_a_pinned_block_takes_effect_at_unpin() {
    let mut c = cache(4, Replacement::Lru);
    let h = pin(&mut c, 4, 0);
    c.invalidate(0..10);
    c.buf_mut(h).fill(0x44);
    c.mark_dirty(h);
    assert_eq!(c.stats().dirty, 0, "changes after invalidate are discarded");
    assert_eq!(c.get(4, 1), Lookup::Wait);
    assert_eq!(c.store().pending(), 0);
    c.unpin(h);
    complete_all(&mut c);
    let Some(Ready::Block {
        waiter: 1,
        result: Ok(h),
    }) = c.take_ready()
    else {
        panic!();
    };
    assert_eq!(&c.buf(h)[..], &[4; BS]);
}

#[test]
fn invalidate_during_a_read_rereads() {
    let mut c = cache(4, Replacement::Lru);
    assert_eq!(c.get(4, 1), Lookup::Wait);
    c.invalidate(4..5);
    c.store_mut().set_block(4, &[0x40; BS]);
    complete_all(&mut c);
    let Some(Ready::Block {
        waiter: 1,
        result: Ok(h),
    }) = c.take_ready()
    else {
        panic!();
    };
    assert_eq!(&c.buf(h)[..], &[0x40; BS]);
}

#[test]
fn a_read_error_fails_the_getters_and_drops_the_slot() {
    let mut c = cache(4, Replacement::Lru);
    c.store_mut().fail_reads(1);
    assert_eq!(c.get(2, 1), Lookup::Wait);
    assert_eq!(c.get(2, 2), Lookup::Wait);
    complete_all(&mut c);
    assert_eq!(
        ready(&mut c),
        [
            Ready::Block {
                waiter: 1,
                result: Err(Error::Io)
            },
            Ready::Block {
                waiter: 2,
                result: Err(Error::Io)
            },
        ]
    );
    let s = c.stats();
    assert_eq!((s.read_errors, s.blocks), (1, 0));
    pin(&mut c, 2, 3);
}

#[test]
fn no_memory_is_reported_through_take_ready() {
    let mut c = cache(4, Replacement::Lru);
    c.store_mut().fail_alloc(1);
    assert_eq!(c.get(2, 1), Lookup::Wait);
    assert_eq!(
        ready(&mut c),
        [Ready::Block {
            waiter: 1,
            result: Err(Error::NoMemory)
        }]
    );
    assert_eq!(c.in_flight(), 0);
    pin(&mut c, 2, 2);
}

#[test]
fn get_blank_pins_without_reading() {
    let mut c = cache(1, Replacement::Lru);
    let Lookup::Hit(h) = c.get_blank(9, 0) else {
        panic!();
    };
    assert!(!c.is_valid(h));
    assert_eq!(c.store().pending(), 0);
    assert_eq!(c.get(9, 1), Lookup::Wait, "a blank pin is exclusive");
    c.buf_mut(h).fill(9);
    c.set_valid(h);
    c.unpin(h);
    let r = ready(&mut c);
    let [Ready::Block {
        waiter: 1,
        result: Ok(h),
    }] = r[..]
    else {
        panic!("{r:?}");
    };
    assert!(c.is_valid(h));
    assert_eq!(c.stats().dirty, 0);
    // Full: a blank lookup of another block waits for the slot.
    assert_eq!(c.get_blank(10, 2), Lookup::Wait);
    c.unpin(h);
    let r = ready(&mut c);
    let [Ready::Block {
        waiter: 2,
        result: Ok(h),
    }] = r[..]
    else {
        panic!("{r:?}");
    };
    assert!(!c.is_valid(h));
    assert_eq!(c.block(h), 10);
    c.unpin(h);
    assert_eq!(
        c.stats().blocks,
        0,
        "a blank block unpinned unfilled is dropped"
    );
    let h = pin(&mut c, 9, 3);
    c.unpin(h);
    assert!(matches!(c.get_blank(9, 4), Lookup::Hit(h) if c.is_valid(h)));
}

#[test]
fn stale_handles_are_ignored() {
    let mut c = cache(1, Replacement::Lru);
    let h = pin(&mut c, 0, 0);
    c.unpin(h);
    let h1 = pin(&mut c, 1, 1);
    assert_ne!(h, h1);
    c.unpin(h);
    c.mark_dirty(h);
    c.set_valid(h);
    assert!(c.try_buf(h).is_none());
    assert!(c.try_buf_mut(h).is_none());
    assert_eq!(c.block(h), BlockNo::MAX);
    c.write_through(h, 7);
    assert_eq!(
        ready(&mut c),
        [Ready::Written {
            waiter: 7,
            result: Err(Error::Io)
        }]
    );
    assert!(c.is_valid(h1));
    c.complete(Tag(12345), None, Ok(()));
    c.unpin(h1);
    c.unpin(h1);
    assert_eq!(c.stats().dirty, 0);
}

#[test]
fn a_trait_object_store_works() {
    let store: Box<dyn Store<Buf = Box<[u8]>>> = Box::new(MemStore::new(4, BS));
    let mut c = Cache::new(
        store,
        Config {
            block_size: BS,
            capacity_bytes: 0,
            replacement: Replacement::Clock,
        },
    );
    assert_eq!(c.stats().capacity, 1);
    let Lookup::Hit(h) = c.get_blank(1, 0) else {
        panic!();
    };
    c.buf_mut(h).fill(1);
    c.write_through(h, 1);
    assert_eq!(c.in_flight(), 1);
}

#[test]
fn a_buffer_the_store_loses_is_replaced_within_capacity() {
    let mut c = cache(1, Replacement::Lru);
    assert_eq!(c.get(0, 1), Lookup::Wait);
    let (t, _buf, _) = c.store_mut().complete_one(0);
    c.complete(t, None, Ok(()));
    assert_eq!(
        ready(&mut c),
        [Ready::Block {
            waiter: 1,
            result: Err(Error::Io)
        }]
    );
    assert_eq!(c.stats().blocks, 0);
    let h = pin(&mut c, 1, 2);
    assert_eq!(&c.buf(h)[..], &[1; BS]);
    assert_eq!(c.store().allocated(), 2, "a new buffer for the lost one");
    c.buf_mut(h).fill(0x11);
    c.write_through(h, 3);
    let (t, _buf, r) = c.store_mut().complete_one(0);
    c.complete(t, None, r);
    assert_eq!(
        ready(&mut c),
        [Ready::Written {
            waiter: 3,
            result: Ok(())
        }]
    );
    assert_eq!(c.stats().blocks, 0, "the block went with its buffer");
    assert_eq!(c.get(2, 4), Lookup::Wait);
    assert_eq!(c.store().allocated(), 3);
    assert_eq!(c.stats().capacity, 1);
}

#[test]
fn a_miss_takes_a_clean_victim_while_a_dirty_one_is_written_back() {
    let mut c = cache(2, Replacement::Lru);
    blank(&mut c, 0, 0xA0);
    let h = pin(&mut c, 1, 1);
    c.unpin(h);
    // Block 0 is the least recently used, and dirty.
    assert_eq!(c.get(2, 2), Lookup::Wait);
    let ops = c.store().pending_ops();
    assert_eq!(ops.len(), 2);
    assert!(is_write(&ops[0], 0));
    assert!(matches!(ops[1], Op::Read { block: 2, .. }));
    complete_all(&mut c);
    assert!(matches!(
        ready(&mut c)[..],
        [Ready::Block {
            waiter: 2,
            result: Ok(_)
        }]
    ));
    let s = c.stats();
    assert_eq!((s.writebacks, s.evictions, s.dirty), (1, 1, 0));
    assert!(
        matches!(c.get(0, 3), Lookup::Hit(_)),
        "written back, still cached"
    );
}
