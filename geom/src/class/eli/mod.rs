//! The eli class: an encrypted provider whose on-disk format is LUKS1
//! (aes-xts-plain64), so a volume moves between Strata, QEMU's LUKS driver
//! and cryptsetup.
//!
//! ```text
//!    PROV.eli         read:  the bio goes down as it is (offset moved past
//!       │                    the LUKS header), its pages are deciphered in
//!   ┌───▼────┐               place when it is back (they are the reader's)
//!   │EliGeom │        write: a child over fresh bounce pages enciphered
//!   └───┬────┘               from the writer's: its pages are never changed
//!      PROV           one AES-XTS pass per byte each way, counted on
//!                     PROV.eli as encrypted and decrypted bytes
//! ```
//!
//! ```text
//! eli init [-f] [-z] [-i ITER_MS] [-s 32|64] (-p PASS | -k SECRET) PROV
//!        # a LUKS1 header, a fresh master key, key slot 0 for the passphrase;
//!        # -z: the payload written as enciphered zeroes first (every sector
//!        # then reads zeroes until written; without it, garbage);
//!        # nothing written if PROV holds a LUKS volume already (that this
//!        # passphrase opens: done; another: refused unless -f)
//! eli attach (-p PASS | -k SECRET) PROV        # PROV.eli
//! eli detach [-f] PROV                         # refused while open unless -f
//! eli addkey [-i ITER_MS] [-n SLOT] (-p PASS | -k SECRET) PROV   # attached
//! eli delkey -n SLOT [-f] PROV    # the last slot only with -f
//! ```
//!
//! `-k SECRET` names a secret given to `strata run|hosted --secret
//! SECRET=FILE` (the file's bytes are the passphrase, a newline
//! included, as QEMU and `cryptsetup --key-file` read it); `-p` puts the passphrase in the config text, for tests
//! and scripts. Keys and salts come from the stack's generator: without
//! an entropy source `init` and `addkey` are refused. A wrong passphrase
//! fails the statement with the provider and the cause and writes
//! nothing.

pub mod luks;

use super::{unknown_verb, Class, Command, Destroy};
use crate::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId, ProviderId};
use crate::config::{Args, ConfigError};
use crate::ctl::{self, CtlError};
use crate::page::{DataCounters, Page, PageRef, SgList, PAGE_SIZE};
use crate::slab::Slab;
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::any::Any;
use crypt::kdf::{self, Hash};
use crypt::Xts;
use luks::{Header, SALT_BYTES, SECTOR, SLOTS, STRIPES};
use serde_json::{json, Value};

const CLASS_NAME: &str = "eli";
const VERBS: &str = "init, attach, detach, addkey, delkey";

/// Cookies: the kind in the top bits, a slab index below.
const DATA: u64 = 0;
const META: u64 = 1 << 40;
const KIND: u64 = 0xff << 40;

/// Where a passphrase comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Passphrase {
    /// `-p`: in the config text.
    Inline(String),
    /// `-k`: a secret handed to the appliance.
    Secret(String),
}

impl core::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Passphrase::Inline(_) => write!(f, "-p <passphrase>"),
            Passphrase::Secret(n) => write!(f, "-k {n}"),
        }
    }
}

impl Passphrase {
    /// The passphrase's bytes: a secret's file as it is, byte for byte
    /// (as QEMU's `secret` object and `cryptsetup --key-file` read it).
    pub fn resolve(&self, stack: &Stack) -> Result<Vec<u8>, CtlError> {
        match self {
            Passphrase::Inline(p) => Ok(p.as_bytes().to_vec()),
            Passphrase::Secret(name) => stack.secret(name).map(<[u8]>::to_vec).ok_or_else(|| {
                CtlError::Invalid(format!("no secret named '{name}' (give it with --secret {name}=FILE)"))
            }),
        }
    }
}

/// Reads `-p PASS` or `-k SECRET` from an option word already taken.
fn pass_option(args: &mut Args<'_>, flag: &str) -> Result<Passphrase, ConfigError> {
    let w = args.next(&format!("a value after {flag}"))?;
    Ok(match flag {
        "-p" => Passphrase::Inline(String::from(w.text)),
        _ => {
            if !crate::config::is_name(w.text) {
                return Err(args.err(w.column, format!("'{}' is not a secret name", w.text)));
            }
            Passphrase::Secret(String::from(w.text))
        }
    })
}

/// Options common to the verbs (eli's and gbde's): what each verb accepts
/// is checked by it.
#[derive(Default)]
pub(crate) struct Opts {
    pub(crate) pass: Option<Passphrase>,
    pub(crate) force: bool,
    pub(crate) iter_ms: Option<u32>,
    pub(crate) key_bytes: Option<u32>,
    pub(crate) slot: Option<usize>,
    pub(crate) zero: bool,
}

/// Reads the options of `allowed`; `-n` takes a key slot below `slots`.
pub(crate) fn options(args: &mut Args<'_>, allowed: &[&str], slots: usize) -> Result<Opts, ConfigError> {
    let mut o = Opts::default();
    while let Some(w) = args.option() {
        if !allowed.contains(&w.text) {
            return Err(args.err(
                w.column,
                format!("unknown option '{}' (expected {})", w.text, allowed.join(", ")),
            ));
        }
        match w.text {
            "-p" | "-k" => {
                if o.pass.is_some() {
                    return Err(args.err(w.column, "give one of -p and -k, once"));
                }
                o.pass = Some(pass_option(args, w.text)?);
            }
            "-f" => o.force = true,
            "-z" => o.zero = true,
            "-i" => {
                let n = args.number("-i")?;
                o.iter_ms = Some(u32::try_from(n.clamp(1, 60_000)).unwrap_or(60_000));
            }
            "-s" => {
                let n = args.number("-s")?;
                if n != 32 && n != 64 {
                    return Err(args.err(args.last_column(), "-s: key bytes are 32 (AES-128-XTS) or 64 (AES-256-XTS)"));
                }
                o.key_bytes = Some(n as u32);
            }
            _ => {
                let n = args.number("-n")?;
                if n >= slots as u64 {
                    return Err(args.err(args.last_column(), format!("-n: a key slot from 0 to {}", slots - 1)));
                }
                o.slot = Some(n as usize);
            }
        }
    }
    Ok(o)
}

/// Bounce pages for `len` bytes (whole pages, so no sector straddles
/// two), or `None` when memory is short: where a cipher writes what a
/// writer's pages hold enciphered (eli, gbde).
pub(crate) fn bounce(len: u64) -> Option<SgList> {
    let pages = len.div_ceil(PAGE_SIZE as u64) as usize;
    let mut sg = SgList::try_with_capacity(pages).ok()?;
    let mut left = len;
    while left > 0 {
        let n = left.min(PAGE_SIZE as u64);
        sg.push(PageRef { page: Page::try_new_zeroed().ok()?, offset: 0, len: n as u32 });
        left -= n;
    }
    Some(sg)
}

/// `CLASS detach [-f] PROV` for a class whose provider is `PROV` with
/// `suffix` (`PROV.suffix` is taken too): a destroy of the geom named
/// after the provider below.
pub(crate) fn parse_detach(
    class: &'static str,
    suffix: &'static str,
    args: &mut Args<'_>,
) -> Result<Arc<dyn Command>, ConfigError> {
    let below = |n: &str| String::from(n.strip_suffix(suffix).unwrap_or(n));
    let mut d = Destroy::parse(class, args, |n| format!("{}{suffix}", below(n)))?;
    if let Some(x) = d.as_any().downcast_ref::<Destroy>() {
        let mut x = x.clone();
        x.name = below(&x.name);
        d = Arc::new(x);
    }
    Ok(d)
}

/// The provider an `eli` verb names: `PROV` or `PROV.eli`.
fn below_name(name: &str) -> String {
    String::from(name.strip_suffix(".eli").unwrap_or(name))
}

/// PBKDF2 iterations that take about `ms` milliseconds here (timed with
/// the stack's live clock; without one, the floor).
pub(crate) fn iterations_for(stack: &Stack, hash: Hash, ms: u32) -> u32 {
    let Some(clock) = stack.live_clock() else {
        return luks::MIN_ITERATIONS;
    };
    let mut out = [0u8; 32];
    let mut n = 1000u32;
    loop {
        let t0 = clock();
        kdf::pbkdf2(hash, b"strata-bench", b"salt", n, &mut out);
        let spent = clock().saturating_sub(t0).max(1);
        if spent >= 20_000_000 || n >= 1 << 24 {
            let want = u128::from(n) * u128::from(ms) * 1_000_000 / u128::from(spent);
            return u32::try_from(want).unwrap_or(u32::MAX).max(luks::MIN_ITERATIONS);
        }
        n *= 2;
    }
}

/// `n` bytes from the stack's generator, or the refusal naming why.
pub(crate) fn random(stack: &mut Stack, n: usize) -> Result<Vec<u8>, CtlError> {
    let mut v = vec![0u8; n];
    stack.random_bytes(&mut v).map_err(|_| {
        CtlError::Invalid(String::from(
            "no entropy source (RDRAND/RDSEED or virtio-rng): refusing to make keys",
        ))
    })?;
    Ok(v)
}

fn salt(stack: &mut Stack) -> Result<[u8; SALT_BYTES], CtlError> {
    Ok(random(stack, SALT_BYTES)?.try_into().expect("salt bytes"))
}

/// A UUID (version 4) as LUKS stores it.
fn uuid(stack: &mut Stack) -> Result<String, CtlError> {
    let mut b = random(stack, 16)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// What a geom is doing besides serving.
enum Job {
    /// Read the header, then `then`.
    Read { then: AfterRead, step: u8 },
    /// Writes out; `label` says what for; `next` goes once they are back.
    Write {
        pending: u32,
        failed: bool,
        label: &'static str,
        next: Option<(u64, Vec<u8>)>,
    },
    /// `init -z`: enciphered zeroes over the payload, one chunk at a
    /// time from `at` (payload bytes), then the header `image`.
    Zero {
        at: u64,
        end: u64,
        xts: Box<Xts>,
        image: Vec<u8>,
    },
}

/// Bytes of payload one `init -z` write covers.
const ZERO_CHUNK: u64 = 1 << 20;

/// What a read header is for.
enum AfterRead {
    /// `init`: write `fresh` unless a LUKS volume is there.
    Init { pass: Vec<u8>, force: bool, fresh: Box<Fresh> },
    /// `attach`: open with `pass`.
    Attach { pass: Vec<u8> },
}

/// A new volume's header and slot 0, made when `init` was applied.
pub struct Fresh {
    header: Header,
    /// The sectors before the payload: header, slot 0's material, zeroes.
    image: Vec<u8>,
    /// `-z`: the master key's cipher, to write the payload as enciphered
    /// zeroes before the header.
    zero: Option<Xts>,
}

/// One client write in flight: the bio to answer once its enciphered
/// child is back.
struct Pending {
    parent: Bio,
}

/// One eli geom over one provider.
pub struct EliGeom {
    below: String,
    consumer: ConsumerId,
    provider: Option<ProviderId>,
    sectors_below: u64,
    job: Option<Job>,
    /// The volume's first bytes as last read or written (the header's
    /// sectors are written back whole).
    head: Vec<u8>,
    header: Option<Header>,
    master: Option<Vec<u8>>,
    xts: Option<Xts>,
    payload: u64,
    writes: Slab<Pending>,
    /// The slot that opened the volume.
    opened_by: Option<usize>,
    /// `init` found the volume there already.
    found: bool,
    error: Option<String>,
}

impl EliGeom {
    /// A geom over `below` that starts by reading its header.
    fn create(stack: &mut Stack, below: &str, then: AfterRead) -> Result<(), CtlError> {
        let under = ctl::provider(stack, below)?;
        let spec = stack.provider(under).spec.clone();
        if stack.provider(under).orphaned {
            return Err(StackError::Orphaned(spec.name).into());
        }
        if stack.find_geom(CLASS_NAME, below).is_some() {
            return Err(CtlError::Invalid(format!("{below} is attached or busy in eli already")));
        }
        if spec.sector_size as u64 > PAGE_SIZE as u64 || spec.sector_size < 512 {
            return Err(CtlError::Invalid(format!("{below}: sector size {} not supported", spec.sector_size)));
        }
        let g = stack.reserve_geom(CLASS_NAME, below);
        let consumer = stack.attach(Some(g), under);
        let write = matches!(then, AfterRead::Init { .. });
        if let Err(e) = stack.access(consumer, 1, i32::from(write), i32::from(write)) {
            let _ = stack.detach(consumer);
            stack.abandon(g);
            return Err(e.into());
        }
        stack.install(
            g,
            Box::new(EliGeom {
                below: String::from(below),
                consumer,
                provider: None,
                sectors_below: spec.media_size / SECTOR,
                job: None,
                head: Vec::new(),
                header: None,
                master: None,
                xts: None,
                payload: 0,
                writes: Slab::new(),
                opened_by: None,
                found: false,
                error: None,
            }),
        );
        stack.geom_as::<EliGeom, _>(g, |e, io| {
            e.job = Some(Job::Read { then, step: 0 });
            e.send_read(io, 0, 4096.min(spec.media_size));
        });
        Ok(())
    }

    fn send_read(&mut self, io: &mut Io<'_>, at: u64, len: u64) {
        io.request(self.consumer, Bio::read(at, len), META);
    }

    /// The statement failed: say why, and go.
    fn fail(&mut self, io: &mut Io<'_>, why: String) {
        io.fail_statement(why.clone());
        self.error = Some(why);
        self.job = None;
        io.wither();
    }

    fn read_done(&mut self, io: &mut Io<'_>, bio: &Bio, result: BioResult) {
        let Some(Job::Read { then, step }) = self.job.take() else {
            return;
        };
        if let Err(e) = result {
            return self.fail(io, format!("{}: reading the LUKS header failed: {e:?}", self.below));
        }
        let mut bytes = vec![0u8; bio.length as usize];
        if bio.sg.copy_to_slice(0, &mut bytes, io.meta_counters()).is_err() {
            return self.fail(io, format!("{}: reading the LUKS header failed", self.below));
        }
        let parsed = Header::parse(&bytes, self.sectors_below);
        if step == 0 {
            if let Ok(h) = &parsed {
                // The slots' material too, then decide.
                let end = h.keys_end().min(self.sectors_below * SECTOR);
                if end > bytes.len() as u64 && !matches!(&then, AfterRead::Init { force: true, .. }) {
                    self.job = Some(Job::Read { then, step: 1 });
                    return self.send_read(io, 0, end);
                }
            }
        }
        self.head = bytes;
        match then {
            AfterRead::Attach { pass } => match parsed {
                Ok(h) => self.open(io, h, &pass),
                Err(e) => self.fail(io, format!("{}: {e}", self.below)),
            },
            AfterRead::Init { pass, force, fresh } => {
                // A LUKS magic Strata cannot open (LUKS2, another cipher, a
                // damaged header) is somebody's volume all the same.
                if let (Err(e), false) = (&parsed, force) {
                    if *e != luks::LuksError::NotLuks {
                        return self.fail(
                            io,
                            format!("{}: {e}; refusing to overwrite it (eli init -f does)", self.below),
                        );
                    }
                }
                if let (Ok(h), false) = (&parsed, force) {
                    if h.unlock(&self.head, &pass).is_err() {
                        return self.fail(
                            io,
                            format!(
                                "{}: holds a LUKS volume this passphrase does not open (eli init -f overwrites it)",
                                self.below
                            ),
                        );
                    }
                    // Initialised already (a config file's second boot).
                    self.found = true;
                    let _ = io.access(self.consumer, -1, -1, -1);
                    return io.wither();
                }
                self.write_fresh(io, fresh);
            }
        }
    }

    /// Opens the volume with `pass` and serves `PROV.eli`.
    fn open(&mut self, io: &mut Io<'_>, h: Header, pass: &[u8]) {
        let (key, slot) = match h.unlock(&self.head, pass) {
            Ok(k) => k,
            Err(e) => return self.fail(io, format!("{}: {e}", self.below)),
        };
        let xts = match Xts::new(&key) {
            Ok(x) => x,
            Err(_) => return self.fail(io, format!("{}: bad master key size", self.below)),
        };
        self.payload = u64::from(h.payload_offset) * SECTOR;
        let below = io.consumer(self.consumer).provider;
        let spec_below = io.provider(below).spec.clone();
        let spec = ProviderSpec {
            name: format!("{}.eli", self.below),
            media_size: spec_below.media_size - self.payload,
            sector_size: spec_below.sector_size,
            stripe_size: spec_below.stripe_size,
            stripe_offset: 0,
            can_flush: spec_below.can_flush,
            can_discard: false,
            can_write_zeroes: false,
        };
        match io.add_provider(spec) {
            Ok(p) => self.provider = Some(p),
            Err(e) => return self.fail(io, format!("{}: {e}", self.below)),
        }
        // Reading is over: the provider's opens pass their access down.
        let _ = io.access(self.consumer, -1, 0, 0);
        self.header = Some(h);
        self.master = Some(key);
        self.xts = Some(xts);
        self.opened_by = Some(slot);
    }

    fn write_fresh(&mut self, io: &mut Io<'_>, fresh: Box<Fresh>) {
        let Fresh { header, image, zero } = *fresh;
        if image.len() as u64 > self.sectors_below * SECTOR {
            return self.fail(io, format!("{}: too small for a LUKS header and key slots", self.below));
        }
        self.head = image[..1024].to_vec();
        self.payload = u64::from(header.payload_offset) * SECTOR;
        self.header = Some(header);
        match zero {
            // The payload first, the header last: a cut before the end
            // leaves no volume, and the next init starts over.
            Some(xts) => {
                let end = self.sectors_below * SECTOR - self.payload;
                self.job = Some(Job::Zero { at: 0, end, xts: Box::new(xts), image });
                self.zero_next(io);
            }
            None => {
                self.job = Some(Job::Write { pending: 0, failed: false, label: "init", next: None });
                self.send_write(io, 0, &image);
            }
        }
    }

    /// Sends the next chunk of enciphered zeroes, or the header after the
    /// last.
    fn zero_next(&mut self, io: &mut Io<'_>) {
        let Some(Job::Zero { at, end, xts, image }) = &mut self.job else {
            return;
        };
        if *at >= *end {
            let image = core::mem::take(image);
            self.job = Some(Job::Write { pending: 0, failed: false, label: "init", next: None });
            return self.send_write(io, 0, &image);
        }
        let len = ZERO_CHUNK.min(*end - *at);
        let mut chunk = vec![0u8; len as usize];
        xts.encrypt(&mut chunk, SECTOR as usize, *at / SECTOR);
        let offset = self.payload + *at;
        *at += len;
        let sg = SgList::from_bytes(&chunk, io.meta_counters());
        let mut bio = Bio::with_data(BioCmd::Write, offset, sg);
        bio.fua = true;
        io.request(self.consumer, bio, META);
    }

    /// Writes `bytes` at `at` below, with FUA, as part of the current job.
    fn send_write(&mut self, io: &mut Io<'_>, at: u64, bytes: &[u8]) {
        if let Some(Job::Write { pending, .. }) = &mut self.job {
            *pending += 1;
        }
        let sg = SgList::from_bytes(bytes, io.meta_counters());
        let mut bio = Bio::with_data(BioCmd::Write, at, sg);
        bio.fua = true;
        io.request(self.consumer, bio, META);
    }

    fn write_done(&mut self, io: &mut Io<'_>, result: BioResult) {
        if let Some(Job::Zero { .. }) = &self.job {
            if result.is_err() {
                self.job = None;
                let _ = io.access(self.consumer, -1, -1, -1);
                return self.fail(io, format!("{}: writing zeroes over the payload failed", self.below));
            }
            return self.zero_next(io);
        }
        let Some(Job::Write { pending, failed, label, next }) = &mut self.job else {
            return;
        };
        *pending -= 1;
        *failed |= result.is_err();
        if *pending > 0 {
            return;
        }
        if !*failed {
            if let Some((at, bytes)) = next.take() {
                return self.send_write(io, at, &bytes);
            }
        }
        let (failed, label) = (*failed, *label);
        self.job = None;
        if label == "init" {
            let _ = io.access(self.consumer, -1, -1, -1);
            if failed {
                return self.fail(io, format!("{}: writing the LUKS header failed", self.below));
            }
            return io.wither();
        }
        let _ = io.access(self.consumer, 0, -1, 0);
        if failed {
            io.fail_statement(format!("{}: writing the LUKS header failed ({label})", self.below));
        }
    }

    /// Starts a header change (addkey, delkey): two FUA writes, the second
    /// sent once the first is back, so a cut leaves the old header or the
    /// new: addkey writes the slot's material, then the header naming it;
    /// delkey the header without the slot, then wipes its material.
    fn change_header(
        &mut self,
        io: &mut Io<'_>,
        h: Header,
        material: (u64, Vec<u8>),
        label: &'static str,
    ) -> Result<(), CtlError> {
        if self.job.is_some() || self.provider.is_none() {
            return Err(CtlError::Invalid(format!("{} is busy", self.below)));
        }
        io.access(self.consumer, 0, 1, 0)?;
        let mut head = self.head.clone();
        head.resize(1024, 0);
        head[..luks::HEADER_BYTES].copy_from_slice(&h.to_bytes());
        let header = (0, head.clone());
        let (first, next) = if label == "addkey" {
            (material, header)
        } else {
            (header, material)
        };
        self.job = Some(Job::Write { pending: 0, failed: false, label, next: Some(next) });
        self.head = head;
        self.header = Some(h);
        self.send_write(io, first.0, &first.1);
        Ok(())
    }

    /// Enciphers the writer's pages into bounce pages.
    fn encipher(&self, xts: &Xts, bio: &Bio, counters: &DataCounters) -> Result<SgList, BioError> {
        let out = bounce(bio.length).ok_or(BioError::NoMemory)?;
        let first = bio.offset / SECTOR;
        let mut copied = Ok(());
        out.map(counters, |pos, bytes| {
            if copied.is_ok() {
                copied = bio.sg.copy_to_slice(pos, bytes, counters);
                // Bounce pages are whole pages: their sectors never straddle.
                xts.encrypt(bytes, SECTOR as usize, first + pos / SECTOR);
            }
        })
        .map_err(|_| BioError::Io)?;
        copied.map_err(|_| BioError::Io)?;
        counters.add_encrypted(bio.length as usize);
        Ok(out)
    }

    /// Deciphers a read's pages in place (they are the reader's).
    fn decipher(xts: &Xts, bio: &Bio, counters: &DataCounters) -> Result<(), BioError> {
        let first = bio.offset / SECTOR;
        // Sectors split over two page ranges, done apart afterwards.
        let mut straddling: Vec<u64> = Vec::new();
        let mut note = |k: u64| {
            if straddling.last() != Some(&k) {
                straddling.push(k);
            }
        };
        bio.sg
            .map(counters, |pos, bytes| {
                let end = pos + bytes.len() as u64;
                let (k0, k1) = (pos.div_ceil(SECTOR), end / SECTOR);
                if !pos.is_multiple_of(SECTOR) {
                    note(pos / SECTOR);
                }
                if k1 > k0 {
                    let (from, to) = ((k0 * SECTOR - pos) as usize, (k1 * SECTOR - pos) as usize);
                    xts.decrypt(&mut bytes[from..to], SECTOR as usize, first + k0);
                }
                if !end.is_multiple_of(SECTOR) {
                    note(end / SECTOR);
                }
            })
            .map_err(|_| BioError::Io)?;
        let mut tmp = [0u8; SECTOR as usize];
        for k in straddling {
            bio.sg.copy_to_slice(k * SECTOR, &mut tmp, counters).map_err(|_| BioError::Io)?;
            xts.decrypt(&mut tmp, SECTOR as usize, first + k);
            bio.sg.copy_from_slice(k * SECTOR, &tmp, counters).map_err(|_| BioError::Io)?;
        }
        counters.add_decrypted(bio.length as usize);
        Ok(())
    }
}

impl Geom for EliGeom {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn start(&mut self, io: &mut Io<'_>, provider: ProviderId, mut bio: Bio) {
        let Some(xts) = &self.xts else {
            return io.deliver(bio, Err(BioError::Io));
        };
        match bio.cmd {
            BioCmd::Read => {
                bio.offset += self.payload;
                io.request(self.consumer, bio, DATA);
            }
            BioCmd::Write => match self.encipher(xts, &bio, &io.stats(provider).data) {
                Ok(sg) => {
                    let child = bio.child(bio.offset + self.payload, bio.length, sg);
                    let id = self.writes.insert(Pending { parent: bio });
                    io.request(self.consumer, child, DATA | 1 << 32 | u64::from(id));
                }
                Err(e) => io.deliver(bio, Err(e)),
            },
            BioCmd::Flush => io.request(self.consumer, bio, DATA),
            // Every sector holds data as far as anyone can tell.
            BioCmd::GetAllocation => io.deliver(bio, Ok(())),
            BioCmd::Discard | BioCmd::WriteZeroes => io.deliver(bio, Err(BioError::NotSupported)),
        }
    }

    fn done(&mut self, io: &mut Io<'_>, cookie: u64, mut bio: Bio, result: BioResult) {
        if cookie & KIND == META {
            return match bio.cmd {
                BioCmd::Read => self.read_done(io, &bio, result),
                _ => self.write_done(io, result),
            };
        }
        if cookie & (1 << 32) != 0 {
            let Some(p) = self.writes.remove((cookie & 0xffff_ffff) as u32) else {
                return;
            };
            return io.deliver(p.parent, result);
        }
        if bio.cmd == BioCmd::Read {
            bio.offset -= self.payload;
            let result = match (&self.xts, self.provider) {
                (Some(xts), Some(p)) if result.is_ok() => Self::decipher(xts, &bio, &io.stats(p).data),
                _ => result,
            };
            return io.deliver(bio, result);
        }
        io.deliver(bio, result);
    }

    fn settling(&self) -> bool {
        self.job.is_some()
    }

    fn dumpconf(&self) -> Value {
        let h = self.header.as_ref();
        json!({
            "provider": self.below,
            "state": if self.provider.is_some() { "attached" } else if self.error.is_some() { "failed" } else { "working" },
            "error": self.error,
            "cipher": h.map(|h| format!("{}-{}", h.cipher, h.mode)),
            "hash": h.map(|h| h.hash.name()),
            "key_bits": h.map(|h| h.key_bytes * 8 / 2),
            "payload_offset": self.payload,
            "uuid": h.map(|h| h.uuid.clone()),
            "slots": h.map(|h| h.slots.iter().enumerate().filter(|(_, s)| s.active).map(|(i, s)| json!({"slot": i, "iterations": s.iterations})).collect::<Vec<_>>()),
            "opened_by_slot": self.opened_by,
            "engine": self.xts.as_ref().map(|x| x.engine()),
            "found_initialised": self.found,
        })
    }

    fn as_any(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

/// `eli init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Init {
    /// The provider to format.
    pub provider: String,
    /// Passphrase of slot 0.
    pub pass: Passphrase,
    /// Overwrite a LUKS volume already there.
    pub force: bool,
    /// PBKDF2 time per passphrase try, ms.
    pub iter_ms: u32,
    /// Master key bytes.
    pub key_bytes: u32,
    /// `-z`: write the payload as enciphered zeroes first, so every
    /// sector reads zeroes until written.
    pub zero: bool,
}

impl Command for Init {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let pass = self.pass.resolve(stack)?;
        let under = ctl::provider(stack, &self.provider)?;
        if !stack.provider(under).access.is_zero() {
            return Err(StackError::Busy(self.provider.clone()).into());
        }
        let hash = Hash::Sha256;
        let kb = self.key_bytes as usize;
        let mut h = Header::layout(hash, self.key_bytes, salt(stack)?, uuid(stack)?);
        let key = random(stack, kb)?;
        let iterations = iterations_for(stack, hash, self.iter_ms);
        // The master key digest costs an eighth of a passphrase try, as
        // cryptsetup makes it.
        h.set_key_digest(&key, iterations / 8);
        let stripes = random(stack, kb * (STRIPES as usize - 1))?;
        let slot_salt = salt(stack)?;
        let (slot, material) = h
            .add_slot(Some(0), &key, &pass, iterations, slot_salt, &stripes)
            .map_err(|e| CtlError::Invalid(format!("{}: {e}", self.provider)))?;
        let mut image = vec![0u8; h.payload_offset as usize * SECTOR as usize];
        image[..luks::HEADER_BYTES].copy_from_slice(&h.to_bytes());
        let at = h.slots[slot].offset as usize * SECTOR as usize;
        image[at..at + material.len()].copy_from_slice(&material);
        let zero = if self.zero {
            Some(Xts::new(&key).map_err(|_| CtlError::Invalid(String::from("bad master key size")))?)
        } else {
            None
        };
        let fresh = Box::new(Fresh { header: h, image, zero });
        EliGeom::create(stack, &self.provider, AfterRead::Init { pass, force: self.force, fresh })
    }
}

/// `eli attach`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attach {
    /// The provider holding the volume.
    pub provider: String,
    /// Its passphrase.
    pub pass: Passphrase,
}

impl Command for Attach {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let pass = self.pass.resolve(stack)?;
        EliGeom::create(stack, &self.provider, AfterRead::Attach { pass })
    }

    fn creates(&self) -> Option<(String, String)> {
        Some((format!("{}.eli", self.provider), self.provider.clone()))
    }
}

/// `eli addkey`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddKey {
    /// The attached provider.
    pub provider: String,
    /// The new passphrase.
    pub pass: Passphrase,
    /// PBKDF2 time per try, ms.
    pub iter_ms: u32,
    /// The slot to fill (default: the first free one).
    pub slot: Option<usize>,
}

fn attached(stack: &mut Stack, provider: &str) -> Result<(crate::bio::GeomId, Header, Vec<u8>), CtlError> {
    let not_attached = || CtlError::Invalid(format!("{provider} is not attached (eli attach it first)"));
    let g = ctl::geom(stack, CLASS_NAME, provider).map_err(|_| not_attached())?;
    stack
        .geom_as::<EliGeom, _>(g, |e, _| match (&e.header, &e.master, e.provider) {
            (Some(h), Some(k), Some(_)) => Some((h.clone(), k.clone())),
            _ => None,
        })
        .flatten()
        .map(|(h, k)| (g, h, k))
        .ok_or_else(not_attached)
}

impl Command for AddKey {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let pass = self.pass.resolve(stack)?;
        let (g, mut h, key) = attached(stack, &self.provider)?;
        let iterations = iterations_for(stack, h.hash, self.iter_ms);
        let stripes = random(stack, key.len() * (STRIPES as usize - 1))?;
        let slot_salt = salt(stack)?;
        let (slot, material) = h
            .add_slot(self.slot, &key, &pass, iterations, slot_salt, &stripes)
            .map_err(|e| CtlError::Invalid(format!("{}: {e}", self.provider)))?;
        let at = u64::from(h.slots[slot].offset) * SECTOR;
        stack
            .geom_as::<EliGeom, _>(g, |e, io| e.change_header(io, h, (at, material), "addkey"))
            .unwrap_or_else(|| Err(CtlError::Invalid(format!("{} is gone", self.provider))))
    }
}

/// `eli delkey`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelKey {
    /// The attached provider.
    pub provider: String,
    /// The slot to clear.
    pub slot: usize,
    /// Also the last slot (the volume can never be opened again).
    pub force: bool,
}

impl Command for DelKey {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let (g, mut h, _) = attached(stack, &self.provider)?;
        if !h.slots[self.slot].active {
            return Err(CtlError::Invalid(format!("{}: key slot {} is not in use", self.provider, self.slot)));
        }
        if h.active_slots() == 1 && !self.force {
            return Err(CtlError::Invalid(format!(
                "{}: slot {} is the last key slot: without it the volume never opens again (-f to do it anyway)",
                self.provider, self.slot
            )));
        }
        h.slots[self.slot].active = false;
        let at = u64::from(h.slots[self.slot].offset) * SECTOR;
        let wipe = random(stack, (h.area_sectors() * SECTOR) as usize)?;
        stack
            .geom_as::<EliGeom, _>(g, |e, io| e.change_header(io, h, (at, wipe), "delkey"))
            .unwrap_or_else(|| Err(CtlError::Invalid(format!("{} is gone", self.provider))))
    }
}

/// The eli class.
pub struct EliClass;

/// The registry's value.
pub static CLASS: EliClass = EliClass;

/// The default PBKDF2 time per passphrase try, ms (cryptsetup's is 2000;
/// an appliance that boots under emulation opens in about one second).
pub const DEFAULT_ITER_MS: u32 = 1000;

impl Class for EliClass {
    fn name(&self) -> &'static str {
        CLASS_NAME
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        let verb = args.next(&format!("an eli verb ({VERBS})"))?;
        let need_pass = |args: &Args<'_>, o: &Opts| {
            o.pass.clone().ok_or_else(|| args.err(verb.column, format!("eli {}: give -p PASSPHRASE or -k SECRET", verb.text)))
        };
        Ok(match verb.text {
            "init" => {
                let o = options(args, &["-f", "-i", "-s", "-z", "-p", "-k"], SLOTS)?;
                let pass = need_pass(args, &o)?;
                let provider = args.name("a provider")?;
                args.finish()?;
                Arc::new(Init {
                    provider,
                    pass,
                    force: o.force,
                    iter_ms: o.iter_ms.unwrap_or(DEFAULT_ITER_MS),
                    key_bytes: o.key_bytes.unwrap_or(64),
                    zero: o.zero,
                })
            }
            "attach" => {
                let o = options(args, &["-p", "-k"], SLOTS)?;
                let pass = need_pass(args, &o)?;
                let provider = args.name("a provider")?;
                args.finish()?;
                Arc::new(Attach { provider, pass })
            }
            "detach" => parse_detach(CLASS_NAME, ".eli", args)?,
            "addkey" => {
                let o = options(args, &["-i", "-n", "-p", "-k"], SLOTS)?;
                let pass = need_pass(args, &o)?;
                let provider = below_name(&args.name("a provider")?);
                args.finish()?;
                Arc::new(AddKey { provider, pass, iter_ms: o.iter_ms.unwrap_or(DEFAULT_ITER_MS), slot: o.slot })
            }
            "delkey" => {
                let o = options(args, &["-n", "-f"], SLOTS)?;
                let slot = o.slot.ok_or_else(|| args.err(verb.column, "eli delkey: give -n SLOT"))?;
                let provider = below_name(&args.name("a provider")?);
                args.finish()?;
                Arc::new(DelKey { provider, slot, force: o.force })
            }
            _ => return Err(unknown_verb(args, CLASS_NAME, &verb, VERBS)),
        })
    }
}

#[cfg(test)]
mod tests;
