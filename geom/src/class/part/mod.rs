//! The part class, after FreeBSD's gpart: the partitions of a provider's
//! GUID Partition Table as providers of their own, named as FreeBSD names
//! them (`vtbd0p1`, `vtbd0p2`, … after the table's entry numbers).
//!
//! ```text
//!   vtbd0p1     vtbd0p2          a partition's bio: offset moved by the
//!      └──┬─────────┘            partition's start and passed down as it
//!     ┌───▼────┐                 is (no clone, no map); the central check
//!     │PartGeom│                 has bounded it to the partition
//!     └───┬────┘
//!       vtbd0       probe: LBA 1 and the last LBA, then each copy's entry
//!                   array (gpt::entries_extent); gpt::read_table falls
//!                   back to the backup when the primary is damaged
//! ```
//!
//! The class offers itself to every provider that appears ([`Class::offer`]):
//! a geom reads the table through its consumer, and either serves the
//! partitions, withers (no GPT on either copy), or stays without
//! partitions as `corrupt` with the reason in `/geom`.
//!
//! ```text
//! part create PROVIDER                      # an empty GPT (128 entries)
//! part add -t TYPE [-s SIZE] [-b LBA] [-i N] [-l LABEL] PROVIDER
//!        # TYPE: linux-data, linux-swap, efi, freebsd-ufs, or a GUID;
//!        # default: the first free space, aligned to 1 MiB, all of it
//! part delete -i N PROVIDER                 # refused while PROVIDERpN is open
//! part destroy [-f] PROVIDER                # the geom (the table stays on disk)
//! ```
//!
//! The table is written whole (protective MBR, both headers and arrays,
//! with FUA) and the partitions change once every write is back.

pub mod gpt;

use super::{unknown_verb, Class, Command, Destroy};
use crate::bio::{Bio, BioCmd, BioResult, ConsumerId, ProviderId};
use crate::config::{Args, ConfigError};
use crate::ctl::{self, CtlError};
use crate::page::SgList;
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::any::Any;
use gpt::{Guid, Partition, Source};
use serde_json::{json, Value};

/// The class name.
const CLASS_NAME: &str = "part";

/// Cookie of a partition's bio: its place in `parts` (low bits).
const PASS: u64 = 0;
/// Cookie of a probe read: which of the four reads (low bits).
const PROBE: u64 = 1 << 40;
/// Cookie of a table write.
const WRITE: u64 = 2 << 40;
const KIND: u64 = 0xff << 40;

/// Partitions start on this boundary unless `-b` says otherwise.
const ALIGN_BYTES: u64 = 1 << 20;

/// The four probe reads, by index.
const PRIMARY_HEADER: usize = 0;
const BACKUP_HEADER: usize = 1;
const PRIMARY_ENTRIES: usize = 2;
const BACKUP_ENTRIES: usize = 3;

/// Type aliases for `part add -t` (gpart(8)'s names).
const TYPES: [(&str, Guid); 4] = [
    ("linux-data", Guid::LINUX_FILESYSTEM),
    ("linux-swap", Guid::LINUX_SWAP),
    ("efi", Guid::EFI_SYSTEM),
    ("freebsd-ufs", Guid::FREEBSD_UFS),
];

/// The name of a type, or its GUID.
fn type_name(g: Guid) -> String {
    TYPES
        .iter()
        .find(|(_, t)| *t == g)
        .map_or_else(|| g.to_string(), |(n, _)| String::from(*n))
}

/// Where the geom is.
enum State {
    /// Reading the table: the four sectors' bytes as they come.
    Probing {
        reads: [Option<Vec<u8>>; 4],
        /// Reads issued so far and not back.
        outstanding: u32,
        /// 0: headers not yet asked for; 1: headers asked; 2: arrays asked.
        step: u8,
    },
    /// Serving the table's partitions.
    Live,
    /// Neither copy could be used: no partitions, and why.
    Corrupt(String),
}

/// One partition being served.
struct Part {
    provider: ProviderId,
    start_bytes: u64,
    entry: Partition,
}

/// A change to the table waiting for its writes.
struct Pending {
    writes_left: u32,
    failed: bool,
    /// The entries the table will hold.
    partitions: Vec<Partition>,
}

/// The geom over one partitioned provider.
pub struct PartGeom {
    /// The provider below (also the geom's name).
    below: String,
    consumer: ConsumerId,
    sector_size: u32,
    disk_sectors: u64,
    state: State,
    disk_guid: Guid,
    /// The copy the table was read from, and what is wrong with the other.
    source: Option<Source>,
    other_copy: Option<String>,
    parts: Vec<Part>,
    pending: Option<Pending>,
    /// Writes not yet started (the stack calls poll to send them).
    to_write: Vec<(u64, Vec<u8>)>,
    /// Why the last table write failed, for `/geom`.
    write_error: Option<String>,
}

impl PartGeom {
    /// Starts a geom over `provider`: probing its table, or (with
    /// `table`) writing that one. The geom is the class's, named after
    /// the provider.
    fn start_geom(
        stack: &mut Stack,
        provider: ProviderId,
        table: Option<Vec<Partition>>,
        disk_guid: Guid,
    ) -> Result<(), StackError> {
        let spec = stack.provider(provider).spec.clone();
        let ss = spec.sector_size;
        let g = stack.reserve_geom(CLASS_NAME, &spec.name);
        let consumer = stack.attach(Some(g), provider);
        if let Err(e) = stack.access(consumer, 1, 0, 0) {
            let _ = stack.detach(consumer);
            stack.abandon(g);
            return Err(e);
        }
        let mut geom = PartGeom {
            below: spec.name.clone(),
            consumer,
            sector_size: ss,
            disk_sectors: spec.media_size / u64::from(ss),
            state: State::Probing {
                reads: [None, None, None, None],
                outstanding: 0,
                step: 0,
            },
            disk_guid,
            source: None,
            other_copy: None,
            parts: Vec::new(),
            pending: None,
            to_write: Vec::new(),
            write_error: None,
        };
        if let Some(partitions) = table {
            // A new table: nothing to read.
            geom.state = State::Live;
            let written = geom.write_table(partitions).and_then(|()| {
                stack
                    .access(consumer, -1, 0, 0)
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = written {
                let _ = stack.detach(consumer);
                stack.abandon(g);
                return Err(StackError::Invalid(e));
            }
        }
        stack.install(g, Box::new(geom));
        Ok(())
    }

    fn sector_bytes(&self, lba: u64) -> u64 {
        lba * u64::from(self.sector_size)
    }

    /// Queues the writes of a table holding `partitions`.
    fn write_table(&mut self, partitions: Vec<Partition>) -> Result<(), String> {
        if self.pending.is_some() {
            return Err(format!("a table write on {} is in progress", self.below));
        }
        let sectors = gpt::build(
            self.disk_sectors,
            self.sector_size,
            self.disk_guid,
            &partitions,
        )
        .map_err(|e| e.to_string())?;
        self.pending = Some(Pending {
            writes_left: sectors.len() as u32,
            failed: false,
            partitions,
        });
        self.to_write = sectors;
        Ok(())
    }

    /// Sends what poll has to send: the table's writes, or the first two
    /// probe reads (the headers).
    fn issue(&mut self, io: &mut Io<'_>) -> bool {
        let mut any = false;
        if !self.to_write.is_empty() {
            // Writing needs write access while the writes are out.
            if io.access(self.consumer, 0, 1, 0).is_err() {
                self.to_write.clear();
                self.pending = None;
                self.write_error = Some(format!("{} cannot be opened for writing", self.below));
                return true;
            }
            for (i, (lba, bytes)) in core::mem::take(&mut self.to_write).into_iter().enumerate() {
                let sg = SgList::from_bytes(&bytes, io.meta_counters());
                let mut bio = Bio::with_data(BioCmd::Write, self.sector_bytes(lba), sg);
                bio.fua = true;
                io.request(self.consumer, bio, WRITE | i as u64);
            }
            any = true;
        }
        let last = self.disk_sectors - 1;
        if let State::Probing {
            outstanding, step, ..
        } = &mut self.state
        {
            if *step == 0 {
                *step = 1;
                *outstanding = 2;
                for (slot, lba) in [
                    (PRIMARY_HEADER, gpt::PRIMARY_HEADER_LBA),
                    (BACKUP_HEADER, last),
                ] {
                    let at = lba * u64::from(self.sector_size);
                    let bio = Bio::read(at, u64::from(self.sector_size));
                    io.request(self.consumer, bio, PROBE | slot as u64);
                }
                any = true;
            }
        }
        any
    }

    /// A probe read came back: once both headers are in, the entry arrays
    /// they name are read; once those are in, the table is read.
    fn probed(&mut self, io: &mut Io<'_>, slot: usize, bio: &Bio, result: BioResult) {
        let (ss, disk_sectors) = (self.sector_size, self.disk_sectors);
        let State::Probing {
            reads,
            outstanding,
            step,
        } = &mut self.state
        else {
            return;
        };
        *outstanding -= 1;
        let mut bytes = vec![0u8; bio.length as usize];
        let ok = result.is_ok() && bio.sg.copy_to_slice(0, &mut bytes, io.meta_counters()).is_ok();
        reads[slot] = Some(if ok { bytes } else { Vec::new() });
        if *outstanding > 0 {
            return;
        }
        if *step == 1 {
            *step = 2;
            for (slot, header, source) in [
                (PRIMARY_ENTRIES, PRIMARY_HEADER, Source::Primary),
                (BACKUP_ENTRIES, BACKUP_HEADER, Source::Backup),
            ] {
                let sector = reads[header].as_deref().unwrap_or(&[]);
                match gpt::entries_extent(sector, source, disk_sectors, ss) {
                    Ok(e) => {
                        *outstanding += 1;
                        let bio = Bio::read(e.lba * u64::from(ss), e.len_sectors * u64::from(ss));
                        io.request(self.consumer, bio, PROBE | slot as u64);
                    }
                    // This copy is unusable: read_table says why.
                    Err(_) => reads[slot] = Some(Vec::new()),
                }
            }
            if *outstanding > 0 {
                return;
            }
        }
        let mut get = |i: usize| reads[i].take().unwrap_or_default();
        let (ph, pe, bh, be) = (
            get(PRIMARY_HEADER),
            get(PRIMARY_ENTRIES),
            get(BACKUP_HEADER),
            get(BACKUP_ENTRIES),
        );
        let r = gpt::read_table(&ph, &pe, &bh, &be, disk_sectors, ss);
        // Done with reading: partitions pass their own access down.
        let _ = io.access(self.consumer, -1, 0, 0);
        match r {
            Ok(table) => {
                self.state = State::Live;
                self.disk_guid = table.disk_guid;
                self.source = Some(table.source);
                self.other_copy = table.other_copy.map(|d| d.to_string());
                self.serve(io, table.partitions);
            }
            Err(gpt::GptError::NoValidTable { primary, backup })
                if no_signature(&primary) && no_signature(&backup) =>
            {
                // Not a GPT: nothing for this class here.
                io.wither();
            }
            Err(e) => self.state = State::Corrupt(e.to_string()),
        }
    }

    /// Makes the providers match `partitions`: new ones added, gone ones
    /// retired.
    fn serve(&mut self, io: &mut Io<'_>, mut partitions: Vec<Partition>) {
        partitions.sort_by_key(|p| p.index);
        let below = io.provider(io.consumer(self.consumer).provider).spec.clone();
        let mut i = 0;
        while i < self.parts.len() {
            if partitions.iter().any(|p| *p == self.parts[i].entry) {
                i += 1;
            } else {
                io.retire_provider(self.parts[i].provider);
                self.parts.remove(i);
            }
        }
        for p in partitions {
            if self.parts.iter().any(|q| q.entry == p) {
                continue;
            }
            let ss = u64::from(self.sector_size);
            let spec = ProviderSpec {
                name: format!("{}p{}", self.below, p.index + 1),
                media_size: p.len_sectors() * ss,
                stripe_size: below.stripe_size,
                stripe_offset: if below.stripe_size > 0 {
                    let stripe = u64::from(below.stripe_size);
                    ((p.start_lba * ss + u64::from(below.stripe_offset)) % stripe) as u32
                } else {
                    0
                },
                ..below.clone()
            };
            match io.add_provider(spec) {
                Ok(provider) => self.parts.push(Part {
                    provider,
                    start_bytes: p.start_lba * ss,
                    entry: p,
                }),
                Err(e) => {
                    self.write_error = Some(format!("partition {}: {e}", p.index + 1));
                }
            }
        }
        self.parts.sort_by_key(|p| p.entry.index);
    }

    /// The entries of the table as it is served.
    fn entries(&self) -> Vec<Partition> {
        self.parts.iter().map(|p| p.entry.clone()).collect()
    }

    /// Adds a partition (`part add`).
    fn add(&mut self, io: &mut Io<'_>, a: &PartAdd) -> Result<(), String> {
        if !matches!(self.state, State::Live) {
            return Err(format!("{} has no usable partition table", self.below));
        }
        let mut parts = self.entries();
        let layout =
            gpt::Layout::new(self.disk_sectors, self.sector_size).map_err(|e| e.to_string())?;
        let ss = u64::from(self.sector_size);
        let index = match a.index {
            Some(n) if n == 0 || n > gpt::BUILD_ENTRY_COUNT => {
                return Err(format!("partition index {n} is not 1 to {}", gpt::BUILD_ENTRY_COUNT))
            }
            Some(n) if parts.iter().any(|p| p.index + 1 == n) => {
                return Err(format!("{}p{n} exists already", self.below))
            }
            Some(n) => n - 1,
            None => (0..gpt::BUILD_ENTRY_COUNT)
                .find(|i| !parts.iter().any(|p| p.index == *i))
                .ok_or("the table is full")?,
        };
        let align = (ALIGN_BYTES / ss).max(1);
        let free = free_ranges(&parts, layout.first_usable_lba, layout.last_usable_lba);
        let (start, room_end) = match a.start_lba {
            Some(b) => {
                let Some(&(_, end)) = free.iter().find(|(s, e)| *s <= b && b <= *e) else {
                    return Err(format!("LBA {b} is not in free space"));
                };
                (b, end)
            }
            None => {
                let want = a.size_bytes.map_or(1, |s| s.div_ceil(ss));
                free.iter()
                    .find_map(|&(s, e)| {
                        let s = s.div_ceil(align) * align;
                        (s <= e && e - s + 1 >= want).then_some((s, e))
                    })
                    .ok_or("no free space large enough")?
            }
        };
        let len = match a.size_bytes {
            Some(bytes) => {
                if bytes % ss != 0 || bytes == 0 {
                    return Err(format!("size {bytes} is not a whole number of {ss}-byte sectors"));
                }
                bytes / ss
            }
            None => room_end - start + 1,
        };
        if start + len - 1 > room_end {
            return Err(String::from("the partition does not fit in that free space"));
        }
        let unique = Guid(
            [io.random_u64().to_le_bytes(), io.random_u64().to_le_bytes()]
                .concat()
                .try_into()
                .unwrap_or([0; 16]),
        );
        parts.push(Partition {
            index,
            type_guid: a.type_guid,
            unique_guid: unique,
            start_lba: start,
            end_lba: start + len - 1,
            attributes: 0,
            name: a.label.clone().unwrap_or_default(),
        });
        self.write_table(parts)
    }

    /// Deletes a partition (`part delete`).
    fn delete(&mut self, io: &Io<'_>, index: u32) -> Result<(), String> {
        let Some(part) = self.parts.iter().find(|p| p.entry.index + 1 == index) else {
            return Err(format!("{} has no partition {index}", self.below));
        };
        if !io.provider(part.provider).access.is_zero() {
            return Err(format!("{}p{index} is open", self.below));
        }
        let parts = self
            .entries()
            .into_iter()
            .filter(|p| p.index + 1 != index)
            .collect();
        self.write_table(parts)
    }
}

/// True when a copy's defect is a missing signature (no GPT there at all).
fn no_signature(d: &gpt::Defect) -> bool {
    matches!(
        d,
        gpt::Defect::Field {
            field: gpt::Field::Signature,
            ..
        } | gpt::Defect::Truncated { .. }
    )
}

/// The free LBA ranges (inclusive) between `first` and `last` not taken by
/// `parts`.
fn free_ranges(parts: &[Partition], first: u64, last: u64) -> Vec<(u64, u64)> {
    let mut used: Vec<(u64, u64)> = parts.iter().map(|p| (p.start_lba, p.end_lba)).collect();
    used.sort_unstable();
    let mut out = Vec::new();
    let mut at = first;
    for (s, e) in used {
        if s > at {
            out.push((at, s - 1));
        }
        at = at.max(e + 1);
    }
    if at <= last {
        out.push((at, last));
    }
    out
}

impl Geom for PartGeom {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn start(&mut self, io: &mut Io<'_>, provider: ProviderId, mut bio: Bio) {
        let Some(i) = self.parts.iter().position(|p| p.provider == provider) else {
            io.deliver(bio, Err(crate::bio::BioError::Orphaned));
            return;
        };
        if bio.cmd != BioCmd::Flush {
            bio.offset += self.parts[i].start_bytes;
        }
        io.request(self.consumer, bio, PASS | i as u64);
    }

    fn done(&mut self, io: &mut Io<'_>, cookie: u64, mut bio: Bio, result: BioResult) {
        match cookie & KIND {
            PASS => {
                let start = self
                    .parts
                    .get((cookie & !KIND) as usize)
                    .map_or(0, |p| p.start_bytes);
                if bio.cmd != BioCmd::Flush {
                    bio.offset -= start;
                }
                io.deliver(bio, result);
            }
            PROBE => self.probed(io, (cookie & !KIND) as usize, &bio, result),
            _ => {
                let Some(p) = self.pending.as_mut() else {
                    return;
                };
                p.writes_left -= 1;
                p.failed |= result.is_err();
                if p.writes_left > 0 {
                    return;
                }
                let p = self.pending.take().expect("pending table");
                let _ = io.access(self.consumer, 0, -1, 0);
                if p.failed {
                    self.write_error = Some(format!("writing the table to {} failed", self.below));
                } else {
                    self.write_error = None;
                    self.source = Some(Source::Primary);
                    self.other_copy = None;
                    self.serve(io, p.partitions);
                }
            }
        }
    }

    fn poll(&mut self, io: &mut Io<'_>) -> bool {
        self.issue(io)
    }

    fn wants_poll(&self) -> bool {
        !self.to_write.is_empty() || matches!(self.state, State::Probing { step: 0, .. })
    }

    fn settling(&self) -> bool {
        matches!(self.state, State::Probing { .. }) || self.pending.is_some()
    }

    fn dumpconf(&self) -> Value {
        let state = match &self.state {
            State::Probing { .. } => "probing",
            State::Live => "ok",
            State::Corrupt(_) => "corrupt",
        };
        let partitions: Vec<Value> = self
            .parts
            .iter()
            .map(|p| {
                json!({
                    "index": p.entry.index + 1,
                    "type": type_name(p.entry.type_guid),
                    "start_lba": p.entry.start_lba,
                    "end_lba": p.entry.end_lba,
                    "label": p.entry.name,
                })
            })
            .collect();
        json!({
            "scheme": "GPT",
            "state": state,
            "entries": gpt::BUILD_ENTRY_COUNT,
            "read_from": self.source.map(|s| s.to_string()),
            "other_copy": self.other_copy,
            "problem": match &self.state {
                State::Corrupt(why) => Some(why.clone()),
                _ => self.write_error.clone(),
            },
            "partitions": partitions,
        })
    }

    fn as_any(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

/// The part class.
pub struct PartClass;

/// The part class's registry entry.
pub static CLASS: PartClass = PartClass;

/// `part create PROVIDER`: writes an empty GPT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartCreate {
    /// The provider to partition.
    pub provider: String,
}

/// `part add -t TYPE [-s SIZE] [-b LBA] [-i N] [-l LABEL] PROVIDER`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartAdd {
    /// The partitioned provider.
    pub provider: String,
    /// Partition type.
    pub type_guid: Guid,
    /// Size in bytes (default: the rest of the free space).
    pub size_bytes: Option<u64>,
    /// First LBA (default: the first free one, aligned to 1 MiB).
    pub start_lba: Option<u64>,
    /// Entry number, from 1 (default: the lowest free).
    pub index: Option<u32>,
    /// The partition's name in the table.
    pub label: Option<String>,
}

/// `part delete -i N PROVIDER`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartDelete {
    /// The partitioned provider.
    pub provider: String,
    /// Entry number, from 1.
    pub index: u32,
}

/// Runs `f` on the part geom over `provider`.
fn with_part(
    stack: &mut Stack,
    provider: &str,
    f: impl FnOnce(&mut PartGeom, &mut Io<'_>) -> Result<(), String>,
) -> Result<(), CtlError> {
    let g = ctl::geom(stack, CLASS_NAME, provider)?;
    stack
        .geom_as::<PartGeom, _>(g, f)
        .ok_or_else(|| CtlError::NoGeom {
            class: String::from(CLASS_NAME),
            name: String::from(provider),
        })?
        .map_err(CtlError::Invalid)
}

impl Command for PartCreate {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        if stack.find_geom(CLASS_NAME, &self.provider).is_some() {
            return Err(CtlError::Invalid(format!(
                "{} has a partition table already",
                self.provider
            )));
        }
        let p = ctl::provider(stack, &self.provider)?;
        let guid = Guid(
            [stack.random_u64().to_le_bytes(), stack.random_u64().to_le_bytes()]
                .concat()
                .try_into()
                .unwrap_or([0; 16]),
        );
        PartGeom::start_geom(stack, p, Some(Vec::new()), guid)?;
        Ok(())
    }

    /// A table that tasting found is never replaced by an empty one.
    fn on_disk(&self, stack: &mut Stack) -> bool {
        stack.find_geom(CLASS_NAME, &self.provider).is_some()
    }
}

/// The entries of the table on `provider`, if it has one.
fn entries(stack: &mut Stack, provider: &str) -> Option<Vec<Partition>> {
    let g = stack.find_geom(CLASS_NAME, provider)?;
    stack.geom_as::<PartGeom, _>(g, |g, _| g.parts.iter().map(|p| p.entry.clone()).collect())
}

impl Command for PartAdd {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        with_part(stack, &self.provider, |g, io| g.add(io, self))
    }

    /// The entry the line names (by `-i`, else by `-l`) is in the table
    /// already; a line naming neither adds a partition at every boot, so
    /// a config that is booted again names its partitions.
    fn on_disk(&self, stack: &mut Stack) -> bool {
        let Some(parts) = entries(stack, &self.provider) else {
            return false;
        };
        match (self.index, &self.label) {
            (Some(i), _) => parts.iter().any(|p| p.index + 1 == i),
            (None, Some(l)) => parts.iter().any(|p| &p.name == l),
            (None, None) => false,
        }
    }
}

impl Command for PartDelete {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        with_part(stack, &self.provider, |g, io| g.delete(io, self.index))
    }

    /// The entry is gone from the table already.
    fn on_disk(&self, stack: &mut Stack) -> bool {
        entries(stack, &self.provider)
            .is_some_and(|parts| !parts.iter().any(|p| p.index + 1 == self.index))
    }
}

impl Class for PartClass {
    fn name(&self) -> &'static str {
        CLASS_NAME
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        const VERBS: &str = "create, add, delete or destroy";
        let verb = args.next(&format!("a part verb ({VERBS})"))?;
        match verb.text {
            "destroy" => return Destroy::parse(CLASS_NAME, args, |n| format!("{n}p*")),
            "create" => {
                let provider = args.name("provider name")?;
                args.finish()?;
                return Ok(Arc::new(PartCreate { provider }));
            }
            "add" | "delete" => {}
            _ => return Err(unknown_verb(args, CLASS_NAME, &verb, VERBS)),
        }
        let add = verb.text == "add";
        let mut a = PartAdd {
            provider: String::new(),
            type_guid: Guid::ZERO,
            size_bytes: None,
            start_lba: None,
            index: None,
            label: None,
        };
        while let Some(w) = args.option() {
            match (add, w.text) {
                (true, "-t") => {
                    let t = args.next("a partition type after -t")?;
                    a.type_guid = TYPES
                        .iter()
                        .find(|(n, _)| *n == t.text)
                        .map(|(_, g)| *g)
                        .or_else(|| Guid::parse(t.text))
                        .filter(|g| !g.is_zero())
                        .ok_or_else(|| {
                            args.err(
                                t.column,
                                format!(
                                    "unknown partition type '{}' (expected linux-data, linux-swap, efi, freebsd-ufs or a GUID)",
                                    t.text
                                ),
                            )
                        })?;
                }
                (true, "-s") => a.size_bytes = Some(args.size("a size after -s")?.0),
                (true, "-b") => a.start_lba = Some(args.number("-b")?),
                (true, "-l") => a.label = Some(args.next("a label after -l")?.text.to_string()),
                (_, "-i") => {
                    let n = args.number("-i")?;
                    a.index = Some(u32::try_from(n).map_err(|_| {
                        args.err(args.last_column(), "partition index too large")
                    })?);
                }
                (_, t) => return Err(args.err(w.column, format!("unknown part {} option '{t}'", verb.text))),
            }
        }
        a.provider = args.name("provider name")?;
        args.finish()?;
        if add {
            if a.type_guid.is_zero() {
                return Err(args.err(verb.column, "part add needs -t TYPE"));
            }
            Ok(Arc::new(a))
        } else {
            let index = a
                .index
                .ok_or_else(|| args.err(verb.column, "part delete needs -i INDEX"))?;
            Ok(Arc::new(PartDelete {
                provider: a.provider,
                index,
            }))
        }
    }

    /// Every provider that may hold a table is probed for one.
    fn offer(&self, stack: &mut Stack, provider: ProviderId) {
        let spec = &stack.provider(provider).spec;
        let ss = u64::from(spec.sector_size);
        if spec.media_size / ss < 3 || stack.find_geom(CLASS_NAME, &spec.name).is_some() {
            return;
        }
        let _ = PartGeom::start_geom(stack, provider, None, Guid::ZERO);
    }
}

#[cfg(test)]
mod tests;
