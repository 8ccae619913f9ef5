//! The backing store a class gives its [`bufcache`] instance: blocks on
//! the class's own consumers.
//!
//! Block `b` lives on consumer `b / blocks_per_member`, at byte
//! `(b % blocks_per_member) * block_size`; one consumer is the plain case
//! of a store over a single provider. The cache hands its operations to
//! [`Store::start`], which only queues them: the class, which alone may
//! send bios, takes them with [`ConsumerStore::take`] from inside its
//! `start`, `done` or `poll` and sends them down, and gives each
//! completed bio back through [`ConsumerStore::bio_done`], whose answer
//! goes to [`bufcache::Cache::complete`]. A block's buffer is one
//! [`Page`], lent to the device for the I/O and nobody else's meanwhile.

use crate::bio::{Bio, BioCmd, BioResult, ConsumerId};
use crate::page::{Page, PageRef, SgList, PAGE_SIZE};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use bufcache::{Error, Op, Store, Tag};

/// Blocks on a class's consumers, one [`Page`] each.
pub struct ConsumerStore {
    members: Vec<Option<ConsumerId>>,
    blocks_per_member: u64,
    queue: VecDeque<Op<Page>>,
    /// Flushes sent to several members: tag, members left, first error.
    flushes: Vec<(Tag, u32, Result<(), Error>)>,
    /// Member flushes still to send.
    flush_sends: VecDeque<(ConsumerId, Tag)>,
}

/// What the class does with the next queued operation.
#[allow(clippy::large_enum_variant)]
pub enum Submit {
    /// Send `bio` through `consumer`; give it back with its `tag`.
    Bio {
        /// Where.
        consumer: ConsumerId,
        /// What.
        bio: Bio,
        /// The cache's tag for it.
        tag: Tag,
    },
    /// The operation cannot be sent (its member is gone): complete it at
    /// once with this.
    Failed {
        /// The cache's tag.
        tag: Tag,
        /// The buffer it carried.
        buf: Option<Page>,
    },
}

fn to_error(r: BioResult) -> Result<(), Error> {
    match r {
        Ok(()) => Ok(()),
        Err(crate::bio::BioError::NoMemory) => Err(Error::NoMemory),
        Err(_) => Err(Error::Io),
    }
}

impl ConsumerStore {
    /// A store over `members` (an absent one fails its blocks' I/O), each
    /// holding `blocks_per_member` page-sized blocks.
    pub fn new(members: Vec<Option<ConsumerId>>, blocks_per_member: u64) -> ConsumerStore {
        ConsumerStore {
            members,
            blocks_per_member,
            queue: VecDeque::new(),
            flushes: Vec::new(),
            flush_sends: VecDeque::new(),
        }
    }

    /// Changes the consumer behind member `i` (a member replaced or gone).
    pub fn set_member(&mut self, i: usize, consumer: Option<ConsumerId>) {
        if let Some(m) = self.members.get_mut(i) {
            *m = consumer;
        }
    }

    /// The next queued operation as a bio to send, if any.
    pub fn take(&mut self) -> Option<Submit> {
        if let Some((consumer, tag)) = self.flush_sends.pop_front() {
            return Some(Submit::Bio {
                consumer,
                bio: Bio::flush(),
                tag,
            });
        }
        let op = self.queue.pop_front()?;
        let (tag, block, buf, cmd) = match op {
            Op::Read { tag, block, buf } => (tag, block, buf, BioCmd::Read),
            Op::Write { tag, block, buf } => (tag, block, buf, BioCmd::Write),
            Op::Flush { tag } => {
                // One flush per member; the store answers once all are back.
                let live: Vec<ConsumerId> = self.members.iter().flatten().copied().collect();
                if live.is_empty() {
                    return Some(Submit::Failed { tag, buf: None });
                }
                self.flushes.push((tag, live.len() as u32, Ok(())));
                self.flush_sends.extend(live.into_iter().map(|c| (c, tag)));
                return self.take();
            }
        };
        let member = (block / self.blocks_per_member) as usize;
        let Some(Some(consumer)) = self.members.get(member).copied() else {
            return Some(Submit::Failed {
                tag,
                buf: Some(buf),
            });
        };
        let offset = (block % self.blocks_per_member) * PAGE_SIZE as u64;
        let mut sg = SgList::with_capacity(1);
        sg.push(PageRef {
            page: buf,
            offset: 0,
            len: PAGE_SIZE as u32,
        });
        Some(Submit::Bio {
            consumer,
            bio: Bio::with_data(cmd, offset, sg),
            tag,
        })
    }

    /// A bio from [`ConsumerStore::take`] came back: what to hand to the
    /// cache's `complete`, or `None` while a multi-member flush waits for
    /// the rest.
    #[allow(clippy::type_complexity)]
    pub fn bio_done(
        &mut self,
        tag: Tag,
        bio: Bio,
        result: BioResult,
    ) -> Option<(Tag, Option<Page>, Result<(), Error>)> {
        if bio.cmd == BioCmd::Flush {
            let i = self.flushes.iter().position(|f| f.0 == tag)?;
            let f = &mut self.flushes[i];
            if f.2.is_ok() {
                f.2 = to_error(result);
            }
            f.1 -= 1;
            if f.1 > 0 {
                return None;
            }
            let (tag, _, r) = self.flushes.remove(i);
            return Some((tag, None, r));
        }
        let page = bio.sg.iter().next().map(|r| r.page.clone());
        Some((tag, page, to_error(result)))
    }
}

impl Store for ConsumerStore {
    type Buf = Page;

    fn alloc(&mut self) -> Option<Page> {
        Page::try_new_zeroed().ok()
    }

    fn start(&mut self, op: Op<Page>) {
        self.queue.push_back(op);
    }
}
