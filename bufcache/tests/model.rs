//! Model-based test: random sequences of cache calls and store completions
//! (in random order, with injected failures) against a flat-array model.
//!
//! The model keeps, per block, the last value written through the cache
//! (`expect`), or None when the store's volatile image is the truth
//! (never written, invalidated, or a failed write-through). Every value is
//! a unique stamp in the block's 8 bytes; stamps only grow, so "this write
//! or a later one" is `>=`.

use bufcache::mem::MemStore;
use bufcache::{BlockNo, Cache, Config, Error, Handle, Lookup, Ready, Replacement};
use proptest::prelude::*;
use std::collections::BTreeMap;

const NB: u64 = 8;
const BS: usize = 8;

#[derive(Clone, Debug)]
enum Step {
    Get(u64),
    /// get_blank; a blank block is filled with a new value (dirty) or with
    /// the store's contents (set_valid).
    Blank(u64, bool),
    Write(usize),
    Through(usize),
    Unpin(usize),
    Flush(Option<(u64, u64)>),
    Invalidate(u64, u64),
    Complete(usize),
    FailReads(u64),
    FailWrites(u64),
    FailFlush(u64),
    FailAlloc(u64),
    Stale,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..NB).prop_map(Step::Get),
        3 => (0..NB, any::<bool>()).prop_map(|(b, f)| Step::Blank(b, f)),
        3 => any::<usize>().prop_map(Step::Write),
        2 => any::<usize>().prop_map(Step::Through),
        5 => any::<usize>().prop_map(Step::Unpin),
        2 => proptest::option::of((0..NB, 0..NB)).prop_map(Step::Flush),
        1 => (0..NB, 0..4u64).prop_map(|(b, n)| Step::Invalidate(b, n)),
        12 => any::<usize>().prop_map(Step::Complete),
        1 => (0..3u64).prop_map(Step::FailReads),
        1 => (0..3u64).prop_map(Step::FailWrites),
        1 => (0..2u64).prop_map(Step::FailFlush),
        1 => (0..2u64).prop_map(Step::FailAlloc),
        1 => Just(Step::Stale),
    ]
}

#[derive(Clone, Copy, Debug)]
struct Pin {
    h: Handle,
    block: BlockNo,
    /// What the buffer holds (the pin's holders share it).
    content: u64,
    /// Invalidated while pinned: changes are discarded.
    doomed: bool,
}

#[derive(Debug)]
enum Wait {
    Block {
        block: BlockNo,
        blank: bool,
        fill: bool,
    },
    Written {
        block: BlockNo,
        doomed: bool,
    },
    Flushed {
        required: Vec<(BlockNo, u64)>,
    },
}

struct Model {
    c: Cache<MemStore>,
    capacity: u64,
    expect: Vec<Option<u64>>,
    pins: Vec<Pin>,
    waits: BTreeMap<u64, Wait>,
    next_waiter: u64,
    next_stamp: u64,
    lookups: u64,
    last_unpinned: Option<Handle>,
}

fn stamp_of(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

impl Model {
    fn new(capacity: u64, replacement: Replacement) -> Model {
        let mut store = MemStore::new(NB, BS);
        for b in 0..NB {
            store.set_block(b, &(b + 1).to_le_bytes());
        }
        let c = Cache::new(
            store,
            Config {
                block_size: BS,
                capacity_bytes: capacity * BS as u64,
                replacement,
            },
        );
        Model {
            c,
            capacity,
            expect: vec![None; NB as usize],
            pins: Vec::new(),
            waits: BTreeMap::new(),
            next_waiter: 0,
            next_stamp: 1000,
            lookups: 0,
            last_unpinned: None,
        }
    }

    fn waiter(&mut self) -> u64 {
        self.next_waiter += 1;
        self.next_waiter
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// What a valid block must hold now.
    fn truth(&self, block: BlockNo) -> u64 {
        self.expect[block as usize].unwrap_or_else(|| stamp_of(self.c.store().block(block)))
    }

    fn set_buf(&mut self, h: Handle, v: u64) {
        self.c.buf_mut(h).copy_from_slice(&v.to_le_bytes());
        for p in self.pins.iter_mut().filter(|p| p.h == h) {
            p.content = v;
        }
    }

    /// A lookup answered with `h` pinned.
    fn got(&mut self, h: Handle, block: BlockNo, blank: bool, fill: bool) {
        assert_eq!(self.c.block(h), block);
        let doomed = false;
        if self.c.is_valid(h) {
            let v = stamp_of(self.c.buf(h));
            assert_eq!(v, self.truth(block), "block {block} read through the cache");
            self.pins.push(Pin {
                h,
                block,
                content: v,
                doomed,
            });
            return;
        }
        assert!(blank, "only a blank lookup gets an invalid block");
        assert!(
            !self.pins.iter().any(|p| p.h == h),
            "a blank pin is exclusive"
        );
        self.pins.push(Pin {
            h,
            block,
            content: 0,
            doomed,
        });
        if fill {
            let v = self.stamp();
            self.set_buf(h, v);
            self.c.mark_dirty(h);
            self.expect[block as usize] = Some(v);
        } else {
            let v = stamp_of(self.c.store().block(block));
            if let Some(e) = self.expect[block as usize] {
                assert_eq!(v, e, "block {block} left the cache before the store had it");
            }
            self.set_buf(h, v);
            self.c.set_valid(h);
        }
        assert!(self.c.is_valid(h));
    }

    fn lookup(&mut self, block: BlockNo, blank: bool, fill: bool) {
        let w = self.waiter();
        self.lookups += 1;
        let r = if blank {
            self.c.get_blank(block, w)
        } else {
            self.c.get(block, w)
        };
        match r {
            Lookup::Hit(h) => self.got(h, block, blank, fill),
            Lookup::Wait => {
                self.waits.insert(w, Wait::Block { block, blank, fill });
            }
        }
    }

    fn drain_ready(&mut self) {
        while let Some(r) = self.c.take_ready() {
            match r {
                Ready::Block { waiter, result } => {
                    let Some(Wait::Block { block, blank, fill }) = self.waits.remove(&waiter)
                    else {
                        panic!("unexpected {r:?}");
                    };
                    match result {
                        Ok(h) => self.got(h, block, blank, fill),
                        Err(Error::Io) => assert!(!blank, "blank lookups issue no read"),
                        Err(Error::NoMemory) => {}
                    }
                }
                Ready::Written { waiter, result } => {
                    let Some(Wait::Written { block, doomed }) = self.waits.remove(&waiter) else {
                        panic!("unexpected {r:?}");
                    };
                    if result.is_err() && !doomed {
                        // The block was dropped; the store holds what it held.
                        self.expect[block as usize] = None;
                    }
                }
                Ready::Flushed { waiter, result } => {
                    let Some(Wait::Flushed { required }) = self.waits.remove(&waiter) else {
                        panic!("unexpected {r:?}");
                    };
                    if result.is_ok() {
                        for (b, v) in required {
                            let d = stamp_of(self.c.store().durable_block(b));
                            assert!(d >= v, "flushed block {b} holds {d}, not {v} or later");
                        }
                    }
                }
            }
        }
    }

    fn check(&self) {
        let s = self.c.stats();
        assert_eq!(s.hits + s.misses, self.lookups);
        assert!(s.blocks <= self.capacity);
        assert!(self.c.store().allocated() <= self.capacity);
        assert_eq!(s.capacity, self.capacity);
        assert_eq!(self.c.in_flight(), self.c.store().pending());
        for p in &self.pins {
            let buf = self
                .c
                .try_buf(p.h)
                .expect("a pinned block keeps its buffer");
            assert_eq!(stamp_of(buf), p.content, "a pinned buffer changed");
            assert_eq!(self.c.block(p.h), p.block);
        }
    }

    fn pick(&self, i: usize) -> Option<usize> {
        (!self.pins.is_empty()).then(|| i % self.pins.len())
    }

    fn run(&mut self, s: &Step) {
        match *s {
            Step::Get(b) => self.lookup(b, false, false),
            Step::Blank(b, fill) => self.lookup(b, true, fill),
            Step::Write(i) => {
                if let Some(i) = self.pick(i) {
                    let p = self.pins[i];
                    let v = self.stamp();
                    self.set_buf(p.h, v);
                    self.c.mark_dirty(p.h);
                    if !p.doomed {
                        self.expect[p.block as usize] = Some(v);
                    }
                }
            }
            Step::Through(i) => {
                if let Some(i) = self.pick(i) {
                    let p = self.pins[i];
                    let v = self.stamp();
                    self.set_buf(p.h, v);
                    self.pins.remove(i);
                    let w = self.waiter();
                    self.waits.insert(
                        w,
                        Wait::Written {
                            block: p.block,
                            doomed: p.doomed,
                        },
                    );
                    if !p.doomed {
                        self.expect[p.block as usize] = Some(v);
                    }
                    self.c.write_through(p.h, w);
                }
            }
            Step::Unpin(i) => {
                if let Some(i) = self.pick(i) {
                    let p = self.pins.remove(i);
                    self.c.unpin(p.h);
                    self.last_unpinned = Some(p.h);
                }
            }
            Step::Flush(range) => {
                let range = range.map(|(a, n)| a..a + n);
                let required = (0..NB)
                    .filter(|b| range.as_ref().is_none_or(|r| r.contains(b)))
                    .filter_map(|b| self.expect[b as usize].map(|v| (b, v)))
                    .collect();
                let w = self.waiter();
                self.waits.insert(w, Wait::Flushed { required });
                self.c.flush(range, w);
            }
            Step::Invalidate(a, n) => {
                let r = a..a + n;
                for b in r.clone() {
                    if b < NB {
                        self.expect[b as usize] = None;
                    }
                }
                for p in self.pins.iter_mut().filter(|p| r.contains(&p.block)) {
                    p.doomed = true;
                }
                for w in self.waits.values_mut() {
                    if let Wait::Flushed { required } = w {
                        required.retain(|(b, _)| !r.contains(b));
                    }
                }
                self.c.invalidate(r);
            }
            Step::Complete(i) => {
                let n = self.c.store().pending();
                if n > 0 {
                    let (t, b, r) = self.c.store_mut().complete_one(i % n);
                    self.c.complete(t, b, r);
                }
            }
            Step::FailReads(n) => self.c.store_mut().fail_reads(n),
            Step::FailWrites(n) => self.c.store_mut().fail_writes(n),
            Step::FailFlush(n) => self.c.store_mut().fail_flush(n),
            Step::FailAlloc(n) => self.c.store_mut().fail_alloc(n),
            Step::Stale => {
                if let Some(h) = self.last_unpinned {
                    if !self.pins.iter().any(|p| p.h == h) {
                        assert!(self.c.try_buf(h).is_none());
                        assert!(!self.c.is_valid(h));
                        self.c.mark_dirty(h);
                        self.c.set_valid(h);
                        self.c.unpin(h);
                    }
                }
            }
        }
        self.drain_ready();
        self.check();
    }

    /// Ends every wait: no failures, every pin released, every operation
    /// completed; then a full flush, and every block read back.
    fn finish(&mut self) {
        let st = self.c.store_mut();
        st.fail_reads(0);
        st.fail_writes(0);
        st.fail_flush(0);
        st.fail_alloc(0);
        loop {
            let mut moved = false;
            while let Some(p) = self.pins.pop() {
                self.c.unpin(p.h);
                moved = true;
            }
            while self.c.store().pending() > 0 {
                let (t, b, r) = self.c.store_mut().complete_one(0);
                self.c.complete(t, b, r);
                moved = true;
            }
            self.drain_ready();
            self.check();
            if !moved {
                break;
            }
        }
        assert!(
            self.waits.is_empty(),
            "waits never answered: {:?}",
            self.waits
        );
        assert_eq!(self.c.in_flight(), 0);
        let w = self.waiter();
        self.waits.insert(
            w,
            Wait::Flushed {
                required: Vec::new(),
            },
        );
        self.c.flush(None, w);
        bufcache::mem::complete_all(&mut self.c);
        assert_eq!(
            self.c.take_ready(),
            Some(Ready::Flushed {
                waiter: w,
                result: Ok(())
            })
        );
        self.waits.clear();
        assert_eq!(self.c.stats().dirty, 0);
        for b in 0..NB {
            let d = stamp_of(self.c.store().durable_block(b));
            assert_eq!(d, self.truth(b), "block {b} after the last flush");
            self.lookup(b, false, false);
            bufcache::mem::complete_all(&mut self.c);
            self.drain_ready();
            let p = self.pins.pop().expect("block read back");
            self.c.unpin(p.h);
            self.check();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn cache_matches_a_flat_array(
        capacity in 1..6u64,
        lru in any::<bool>(),
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let replacement = if lru { Replacement::Lru } else { Replacement::Clock };
        let mut m = Model::new(capacity, replacement);
        for s in &steps {
            m.run(s);
        }
        m.finish();
    }
}
