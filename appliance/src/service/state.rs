//! State an export keeps through restarts (iSCSI: persistent
//! reservations with APTPL) on a small provider of its own, named by the
//! export line (`aptpl PROVIDER`).
//!
//! The provider holds two slots of [`SLOT_BYTES`]; each save writes the
//! whole state with FUA into the slot its generation picks (odd, even),
//! so a power cut during a save leaves the previous slot whole and the
//! load takes the valid slot with the higher generation. The session
//! that asked for the save is answered only once its write is stable.
//! Saves arriving while one is being written are gathered, and the
//! newest of them goes out next (its waiters answered together).
//!
//! ```text
//! offset  size  field (each slot; little-endian)
//!      0     8  magic "STRATAKS"
//!      8     4  version (1)
//!     12     4  payload length in bytes
//!     16     8  generation (the first save writes 1)
//!     24     4  crc32c of bytes 0..24 and of the payload
//!     28     4  reserved, zero
//!     32     …  payload: the protocol's serialized state
//! ```
//!
//! A provider that is blank (zeros) or holds these slots is taken; one
//! holding anything else is refused, so pointing the option at a data
//! disk loses nothing.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use geom::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId};
use geom::page::{DataCounters, SgList};
use geom::stack::Stack;

/// Bytes of one slot.
pub const SLOT_BYTES: u64 = 64 << 10;
/// Bytes the provider must have: both slots.
pub const STORE_BYTES: u64 = 2 * SLOT_BYTES;
/// Bytes of a slot's header.
const HEADER: usize = 32;
/// Longest payload a slot holds.
pub const MAX_STATE_BYTES: usize = SLOT_BYTES as usize - HEADER;
const MAGIC: &[u8; 8] = b"STRATAKS";
const VERSION: u32 = 1;

/// A session waiting for a save: its connection and cookie.
pub type Waiter = (u32, u64);

/// Where a store is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Its slots are being read.
    Loading,
    /// Loaded: saves are taken.
    Ready,
    /// The provider could not be taken (why).
    Failed(String),
}

/// One export's state store.
#[derive(Debug)]
pub struct Store {
    /// The provider holding it.
    pub provider: String,
    /// The service's consumer of it.
    pub consumer: ConsumerId,
    sector: u64,
    /// Where it is.
    pub phase: Phase,
    /// The state found by the load (`None`: nothing kept yet).
    pub loaded: Option<Vec<u8>>,
    generation: u64,
    /// Waiters of the write in flight (`None`: no write out).
    writing: Option<Vec<Waiter>>,
    /// The newest state asked for while a write was out, and its waiters.
    queued: Option<(Vec<u8>, Vec<Waiter>)>,
    /// Saves written, for `/metrics`.
    pub saves: u64,
}

/// Encodes a slot holding `payload` at `generation`, padded to `sector`.
pub fn encode(payload: &[u8], generation: u64, sector: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + payload.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(&generation.to_le_bytes());
    let mut crc = crypt::crc32c::Crc32c::new();
    crc.update(&v);
    crc.update(payload);
    v.extend_from_slice(&crc.finish().to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(payload);
    let len = (v.len() as u64).div_ceil(sector.max(1)) * sector.max(1);
    v.resize(len as usize, 0);
    v
}

/// What one slot holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Slot {
    /// A whole record: its generation and payload.
    Valid(u64, Vec<u8>),
    /// Zeros, or a record cut short by a power cut (its magic is there
    /// but not all of it): nothing acknowledged.
    Empty,
    /// Something that is not a slot of a store.
    Foreign,
}

/// Parses one slot.
pub fn decode(b: &[u8]) -> Slot {
    if b.len() < HEADER {
        return Slot::Foreign;
    }
    let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if &b[..8] != MAGIC {
        return if b.iter().all(|&x| x == 0) {
            Slot::Empty
        } else {
            Slot::Foreign
        };
    }
    let len = le32(12) as usize;
    if le32(8) != VERSION || len > b.len() - HEADER {
        return Slot::Empty;
    }
    let mut crc = crypt::crc32c::Crc32c::new();
    crc.update(&b[..24]);
    crc.update(&b[HEADER..HEADER + len]);
    if crc.finish() != le32(24) {
        return Slot::Empty;
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&b[16..24]);
    Slot::Valid(u64::from_le_bytes(g), b[HEADER..HEADER + len].to_vec())
}

/// The newest state of a store's two slots and its generation, or why
/// the bytes are not a store.
pub fn choose(slots: &[u8]) -> Result<(u64, Option<Vec<u8>>), &'static str> {
    let a = decode(slots.get(..SLOT_BYTES as usize).unwrap_or(&[]));
    let b = decode(slots.get(SLOT_BYTES as usize..).unwrap_or(&[]));
    match (a, b) {
        (Slot::Valid(ga, pa), Slot::Valid(gb, pb)) => Ok(if ga >= gb {
            (ga, Some(pa))
        } else {
            (gb, Some(pb))
        }),
        (Slot::Valid(g, p), _) | (_, Slot::Valid(g, p)) => Ok((g, Some(p))),
        (Slot::Empty, Slot::Empty) => Ok((0, None)),
        _ => Err("holds data that is not a Strata state store (give a blank provider)"),
    }
}

impl Store {
    /// A store on the provider `consumer` opens, of `sector`-byte
    /// sectors; it must be loaded ([`Store::load`]) before use.
    pub fn new(provider: &str, consumer: ConsumerId, sector: u32) -> Store {
        Store {
            provider: String::from(provider),
            consumer,
            sector: u64::from(sector.max(1)),
            phase: Phase::Loading,
            loaded: None,
            generation: 0,
            writing: None,
            queued: None,
            saves: 0,
        }
    }

    /// Sends the read of both slots, with `cookie`.
    pub fn load(&self, stack: &mut Stack, cookie: u64) {
        stack.submit(self.consumer, Bio::read(0, STORE_BYTES), cookie);
    }

    /// A bio of the store is back: the load's read, or a save's write;
    /// returns the waiters to answer.
    pub fn done(
        &mut self,
        stack: &mut Stack,
        cookie: u64,
        bio: Bio,
        r: BioResult,
    ) -> Vec<(Waiter, BioResult)> {
        if self.phase == Phase::Loading {
            self.loaded(bio, r);
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(waiters) = self.writing.take() {
            if r.is_ok() {
                self.saves += 1;
            } else {
                // The next save goes to the slot that failed, never over
                // the newest whole one.
                self.generation -= 1;
            }
            out.extend(waiters.into_iter().map(|w| (w, r)));
        }
        if let Some((state, waiters)) = self.queued.take() {
            self.write(stack, state, waiters, cookie);
        }
        out
    }

    fn loaded(&mut self, bio: Bio, r: BioResult) {
        if let Err(e) = r {
            self.phase = Phase::Failed(format!("cannot read {}: {e:?}", self.provider));
            return;
        }
        let mut b = vec![0u8; STORE_BYTES as usize];
        if bio
            .sg
            .copy_to_slice(0, &mut b, &DataCounters::new())
            .is_err()
        {
            self.phase = Phase::Failed(format!("cannot read {}", self.provider));
            return;
        }
        match choose(&b) {
            Ok((generation, state)) => {
                self.generation = generation;
                self.loaded = state;
                self.phase = Phase::Ready;
            }
            Err(why) => self.phase = Phase::Failed(format!("{} {why}", self.provider)),
        }
    }

    /// Keeps `state` for `waiter`: written now, or after the write out.
    /// `Err` answers at once (a state too big for a slot, a store not
    /// loaded).
    pub fn save(
        &mut self,
        stack: &mut Stack,
        state: Vec<u8>,
        waiter: Waiter,
        cookie: u64,
    ) -> BioResult {
        if self.phase != Phase::Ready {
            return Err(BioError::Invalid);
        }
        if state.len() > MAX_STATE_BYTES {
            return Err(BioError::NoSpace);
        }
        if self.writing.is_none() {
            self.write(stack, state, vec![waiter], cookie);
        } else {
            let mut waiters = self.queued.take().map(|(_, w)| w).unwrap_or_default();
            waiters.push(waiter);
            self.queued = Some((state, waiters));
        }
        Ok(())
    }

    /// Saves in flight or queued.
    pub fn busy(&self) -> bool {
        self.writing.is_some() || self.queued.is_some()
    }

    fn write(&mut self, stack: &mut Stack, state: Vec<u8>, waiters: Vec<Waiter>, cookie: u64) {
        self.generation += 1;
        let slot = if self.generation % 2 == 1 {
            SLOT_BYTES
        } else {
            0
        };
        let bytes = encode(&state, self.generation, self.sector);
        let mut bio = Bio::with_data(
            BioCmd::Write,
            slot,
            SgList::from_bytes(&bytes, &DataCounters::new()),
        );
        bio.fua = true;
        self.writing = Some(waiters);
        stack.submit(self.consumer, bio, cookie);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geom::stack::Access;
    use geom::testing::{self, FakeDiskHandle};

    #[test]
    fn slots_round_trip_and_damage_is_caught() {
        let s = encode(b"hello", 7, 512);
        assert_eq!(s.len(), 512);
        assert_eq!(decode(&s), Slot::Valid(7, b"hello".to_vec()));
        for at in [0usize, 9, 13, 17, 25, 33] {
            let mut bad = s.clone();
            bad[at] ^= 1;
            let d = decode(&bad);
            assert!(d == Slot::Empty || d == Slot::Foreign, "byte {at}: {d:?}");
            assert_ne!(d, Slot::Valid(7, b"hello".to_vec()));
        }
        assert_eq!(decode(&[0; 512]), Slot::Empty);
        assert_eq!(decode(&[1; 512]), Slot::Foreign);
    }

    #[test]
    fn the_newest_whole_slot_is_chosen() {
        let slot = |g: u64, p: &[u8]| {
            let mut v = encode(p, g, 512);
            v.resize(SLOT_BYTES as usize, 0);
            v
        };
        let blank = vec![0u8; SLOT_BYTES as usize];
        let two = |a: &[u8], b: &[u8]| [a, b].concat();
        assert_eq!(choose(&two(&blank, &blank)), Ok((0, None)));
        let (a, b) = (slot(2, b"two"), slot(3, b"three"));
        assert_eq!(choose(&two(&a, &b)), Ok((3, Some(b"three".to_vec()))));
        assert_eq!(choose(&two(&b, &a)), Ok((3, Some(b"three".to_vec()))));
        // The newer slot torn by a power cut: the older one stands.
        let mut torn = b.clone();
        torn[34] ^= 0xff;
        assert_eq!(choose(&two(&a, &torn)), Ok((2, Some(b"two".to_vec()))));
        // A first save torn: nothing kept yet.
        assert_eq!(choose(&two(&blank, &torn)), Ok((0, None)));
        assert!(choose(&two(&vec![9u8; SLOT_BYTES as usize], &blank)).is_err());
    }

    /// A store on vtbd0 of a fresh fake disk (volatile cache modelled).
    fn store(image: Option<Vec<u8>>) -> (Stack, Store, FakeDiskHandle) {
        let (mut s, mut h) = match image {
            Some(img) => testing::stack_from_images(&[img], 512),
            None => testing::stack_with_disks(1, STORE_BYTES, 512),
        };
        let c = s.open("vtbd0", Access::READ_WRITE).unwrap();
        let mut st = Store::new("vtbd0", c, 512);
        st.load(&mut s, 1);
        let (_, bio, r) = testing::wait(&mut s);
        assert!(st.done(&mut s, 1, bio, r).is_empty());
        (s, st, h.remove(0))
    }

    /// Runs the stack until the store's bio is back; returns the answers.
    fn settle(s: &mut Stack, st: &mut Store) -> Vec<(Waiter, BioResult)> {
        let (c, bio, r) = testing::wait(s);
        st.done(s, c, bio, r)
    }

    #[test]
    fn saves_are_stable_when_answered_and_load_back_after_a_cut() {
        let (mut s, mut st, h) = store(None);
        assert_eq!(st.phase, Phase::Ready);
        assert_eq!(st.loaded, None);
        for (i, state) in [&b"first"[..], b"second", b"third"].iter().enumerate() {
            st.save(&mut s, state.to_vec(), (1, i as u64), 1).unwrap();
            assert_eq!(settle(&mut s, &mut st), [((1, i as u64), Ok(()))]);
            // What a power cut now leaves (no flush was sent: FUA).
            let (_, again, _) = store(Some(h.durable()));
            assert_eq!(again.loaded.as_deref(), Some(*state), "after save {i}");
        }
        assert_eq!(st.saves, 3);
    }

    #[test]
    fn saves_during_a_write_are_gathered_and_the_newest_goes_out() {
        let (mut s, mut st, h) = store(None);
        st.save(&mut s, b"a".to_vec(), (1, 1), 1).unwrap();
        st.save(&mut s, b"b".to_vec(), (2, 2), 1).unwrap();
        st.save(&mut s, b"c".to_vec(), (3, 3), 1).unwrap();
        assert!(st.busy());
        assert_eq!(settle(&mut s, &mut st), [((1, 1), Ok(()))]);
        assert_eq!(
            settle(&mut s, &mut st),
            [((2, 2), Ok(())), ((3, 3), Ok(()))]
        );
        assert!(!st.busy());
        let (_, again, _) = store(Some(h.durable()));
        assert_eq!(again.loaded.as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn a_failed_save_never_costs_the_newest_whole_slot() {
        let (mut s, mut st, h) = store(None);
        st.save(&mut s, b"one".to_vec(), (1, 1), 1).unwrap();
        settle(&mut s, &mut st);
        st.save(&mut s, b"two".to_vec(), (1, 2), 1).unwrap();
        settle(&mut s, &mut st);
        h.set_fail_writes(true);
        st.save(&mut s, b"three".to_vec(), (1, 3), 1).unwrap();
        assert!(settle(&mut s, &mut st)[0].1.is_err());
        h.set_fail_writes(false);
        // The retry goes where the failure was, not over "two".
        let img = h.durable();
        st.save(&mut s, b"four".to_vec(), (1, 4), 1).unwrap();
        settle(&mut s, &mut st);
        let now = h.durable();
        assert_eq!(img[..SLOT_BYTES as usize], now[..SLOT_BYTES as usize]);
        let (_, again, _) = store(Some(now));
        assert_eq!(again.loaded.as_deref(), Some(&b"four"[..]));
        // Too big a state is refused at once.
        assert_eq!(
            st.save(&mut s, vec![0; MAX_STATE_BYTES + 1], (1, 5), 1),
            Err(BioError::NoSpace)
        );
    }

    #[test]
    fn a_provider_with_data_is_refused() {
        let (mut s, mut st, _) = store(Some(vec![0x5a; STORE_BYTES as usize]));
        assert!(
            matches!(&st.phase, Phase::Failed(w) if w.contains("not a Strata state store")),
            "{:?}",
            st.phase
        );
        assert_eq!(
            st.save(&mut s, b"x".to_vec(), (1, 1), 1),
            Err(BioError::Invalid),
            "a failed store takes no save"
        );
    }
}
