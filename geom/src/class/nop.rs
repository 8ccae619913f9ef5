//! The nop class (gnop(8)): a pass-through geom over one provider, with
//! knobs that inject faults, for testing everything above it.
//!
//! ```text
//!            PROVIDER.nop
//!                 │ start: count; maybe fail (-r/-w, after -c good I/Os,
//!                 │        only inside -o/-l); maybe hold for -d ms (-q/-x)
//!            ┌────▼────┐
//!            │ NopGeom │  the bio itself goes down: no clone, no map
//!            └────┬────┘
//!                 │ done: maybe flip one bit of a read's data (-z), the
//!                 ▼       only time nop maps (counted on PROVIDER.nop)
//!             PROVIDER
//! ```
//!
//! Every random choice comes from the nop's own generator, seeded with
//! `--seed`, so a run replays exactly. Knobs change live with
//! `nop configure`. When the provider below dies the nop withers and
//! orphans `PROVIDER.nop`; `nop destroy -f` does the same under an open
//! consumer.
//!
//! ```text
//! nop create [-r PCT] [-w PCT] [-e ERR] [-c COUNT] [-d MS] [-q PCT] [-x PCT]
//!            [-o LBA] [-l LBAS] [-z PCT] [--seed N] PROVIDER   # PROVIDER.nop
//! nop configure [same options] PROVIDER.nop
//! nop destroy [-f] PROVIDER.nop
//! ```

use super::{unknown_verb, Class, Command, Destroy};
use crate::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId, ProviderId};
use crate::config::{Args, ConfigError};
use crate::ctl::{self, CtlError};
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use serde_json::{json, Value};
use rand_core::{Rng, SeedableRng};
use rand_xorshift::XorShiftRng;

/// Fault-injection knobs as a statement gives them; `None` leaves a knob
/// as it is (on create: at its default, which injects nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NopOptions {
    /// `-r`: percent of reads that fail.
    pub read_fail_percent: Option<u8>,
    /// `-w`: percent of writes that fail.
    pub write_fail_percent: Option<u8>,
    /// `-e`: the error injected failures report (default EIO).
    pub error: Option<BioError>,
    /// `-c`: number of I/Os that succeed before failures start.
    pub count_until_fail: Option<u64>,
    /// `-d`: delay in milliseconds applied to delayed I/Os.
    pub delay_ms: Option<u32>,
    /// `-q`: percent of reads delayed.
    pub read_delay_percent: Option<u8>,
    /// `-x`: percent of writes delayed.
    pub write_delay_percent: Option<u8>,
    /// `-o`: first sector of the range failures are limited to.
    pub fail_offset_lba: Option<u64>,
    /// `-l`: length in sectors of that range (0: to the end).
    pub fail_len_lba: Option<u64>,
    /// `-z`: percent of successful reads whose data comes back corrupted.
    pub corrupt_percent: Option<u8>,
    /// `--seed`: seed of the nop's generator, so a run replays exactly.
    pub seed: Option<u64>,
}

impl NopOptions {
    /// Parses the options of `nop create` and `nop configure` (gnop(8)'s
    /// flags), up to the first word that is not one.
    fn parse(args: &mut Args<'_>) -> Result<NopOptions, ConfigError> {
        let mut o = NopOptions::default();
        while let Some(w) = args.option() {
            match w.text {
                "-r" => o.read_fail_percent = Some(args.percent("-r")?),
                "-w" => o.write_fail_percent = Some(args.percent("-w")?),
                "-q" => o.read_delay_percent = Some(args.percent("-q")?),
                "-x" => o.write_delay_percent = Some(args.percent("-x")?),
                "-z" => o.corrupt_percent = Some(args.percent("-z")?),
                "-e" => o.error = Some(args.error("-e")?),
                "-c" => o.count_until_fail = Some(args.number("-c")?),
                "-d" => {
                    let n = args.number("-d")?;
                    o.delay_ms = Some(
                        u32::try_from(n).map_err(|_| args.err(args.last_column(), "delay too long"))?,
                    );
                }
                "-o" => o.fail_offset_lba = Some(args.number("-o")?),
                "-l" => o.fail_len_lba = Some(args.number("-l")?),
                "--seed" => o.seed = Some(args.number("--seed")?),
                t => return Err(args.err(w.column, format!("unknown nop option '{t}'"))),
            }
        }
        Ok(o)
    }
}

/// Seed used when none is given.
pub const DEFAULT_SEED: u64 = 1;

/// The knobs of one nop geom (gnop's softc fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopKnobs {
    /// Percent of reads that fail.
    pub read_fail_percent: u8,
    /// Percent of writes (and discards, write-zeroes) that fail.
    pub write_fail_percent: u8,
    /// What injected failures report.
    pub error: BioError,
    /// Reads and writes still allowed before both failure rates become
    /// 100 (0: off), as gnop's `-c`.
    pub count_until_fail: u64,
    /// Delay of a delayed request, ms.
    pub delay_ms: u32,
    /// Percent of reads delayed.
    pub read_delay_percent: u8,
    /// Percent of writes delayed.
    pub write_delay_percent: u8,
    /// First sector of the range failures are limited to.
    pub fail_offset_lba: u64,
    /// Sectors in that range; 0 means "to the end" (with offset 0: the
    /// whole provider).
    pub fail_len_lba: u64,
    /// Percent of successful reads returned with one bit flipped.
    pub corrupt_percent: u8,
    /// The generator's seed.
    pub seed: u64,
}

impl Default for NopKnobs {
    fn default() -> NopKnobs {
        NopKnobs {
            read_fail_percent: 0,
            write_fail_percent: 0,
            error: BioError::Io,
            count_until_fail: 0,
            delay_ms: 0,
            read_delay_percent: 0,
            write_delay_percent: 0,
            fail_offset_lba: 0,
            fail_len_lba: 0,
            corrupt_percent: 0,
            seed: DEFAULT_SEED,
        }
    }
}

impl NopKnobs {
    /// Applies the knobs a statement sets; the others keep their value.
    pub fn apply(&mut self, o: &NopOptions) {
        let set = |dst: &mut u8, v: Option<u8>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut self.read_fail_percent, o.read_fail_percent);
        set(&mut self.write_fail_percent, o.write_fail_percent);
        set(&mut self.read_delay_percent, o.read_delay_percent);
        set(&mut self.write_delay_percent, o.write_delay_percent);
        set(&mut self.corrupt_percent, o.corrupt_percent);
        self.error = o.error.unwrap_or(self.error);
        self.count_until_fail = o.count_until_fail.unwrap_or(self.count_until_fail);
        self.delay_ms = o.delay_ms.unwrap_or(self.delay_ms);
        self.fail_offset_lba = o.fail_offset_lba.unwrap_or(self.fail_offset_lba);
        self.fail_len_lba = o.fail_len_lba.unwrap_or(self.fail_len_lba);
        self.seed = o.seed.unwrap_or(self.seed);
        // A delay given while no delay probability is set delays
        // everything (gnop would need -q and -x as well).
        if o.delay_ms.is_some() && self.read_delay_percent == 0 && self.write_delay_percent == 0 {
            self.read_delay_percent = 100;
            self.write_delay_percent = 100;
        }
    }
}

/// What a nop geom has done, for `/geom`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NopCounters {
    /// Reads started.
    pub reads: u64,
    /// Writes, discards and write-zeroes started.
    pub writes: u64,
    /// Flushes started.
    pub flushes: u64,
    /// Requests failed on purpose.
    pub failures: u64,
    /// Reads whose data was corrupted on purpose.
    pub corruptions: u64,
    /// Requests held back by the delay knob.
    pub delayed: u64,
}

/// One nop geom.
pub struct NopGeom {
    knobs: NopKnobs,
    counters: NopCounters,
    rng: XorShiftRng,
    consumer: ConsumerId,
    provider: ProviderId,
    sector_size: u64,
    /// Requests held back, with the time they may go.
    held: Vec<(u64, Bio)>,
}

/// The cookie of a request passed down (there is one kind).
const PASS: u64 = 0;

impl NopGeom {
    /// Creates `BELOW.nop` over provider `below` with the given knobs.
    pub fn create(
        stack: &mut Stack,
        below: &str,
        opts: &NopOptions,
    ) -> Result<ProviderId, StackError> {
        let under = stack
            .find_provider(below)
            .ok_or_else(|| StackError::NoSuchProvider(String::from(below)))?;
        let spec_below = stack.provider(under).spec.clone();
        if stack.provider(under).orphaned {
            return Err(StackError::Orphaned(spec_below.name));
        }
        let name = format!("{below}.nop");
        let g = stack.reserve_geom("nop", &name);
        let spec = ProviderSpec { name, ..spec_below };
        let provider = match stack.add_provider(g, spec) {
            Ok(p) => p,
            Err(e) => {
                stack.abandon(g);
                return Err(e);
            }
        };
        let consumer = stack.attach(Some(g), under);
        let mut knobs = NopKnobs::default();
        knobs.apply(opts);
        let rng = XorShiftRng::seed_from_u64(knobs.seed);
        stack.install(
            g,
            Box::new(NopGeom {
                knobs,
                counters: NopCounters::default(),
                rng,
                consumer,
                provider,
                sector_size: u64::from(stack.provider(under).spec.sector_size),
                held: Vec::new(),
            }),
        );
        Ok(provider)
    }

    /// Changes knobs live; a new seed restarts the generator.
    pub fn configure(&mut self, o: &NopOptions) {
        self.knobs.apply(o);
        if let Some(seed) = o.seed {
            self.rng = XorShiftRng::seed_from_u64(seed);
        }
    }

    /// The knobs now.
    pub fn knobs(&self) -> &NopKnobs {
        &self.knobs
    }

    /// The counters now.
    pub fn counters(&self) -> &NopCounters {
        &self.counters
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u8) -> bool {
        percent > 0 && (percent >= 100 || (self.rng.next_u32() % 100) < u32::from(percent))
    }

    /// True when the request overlaps the range failures are limited to.
    fn in_fail_range(&self, bio: &Bio) -> bool {
        let start = self.knobs.fail_offset_lba.saturating_mul(self.sector_size);
        let end = match self.knobs.fail_len_lba {
            0 => u64::MAX,
            n => start.saturating_add(n.saturating_mul(self.sector_size)),
        };
        bio.offset < end && bio.end() > start
    }

    /// Decides whether this request fails (gnop's start, first half).
    fn should_fail(&mut self, bio: &Bio) -> bool {
        let percent = match bio.cmd {
            BioCmd::Read => self.knobs.read_fail_percent,
            BioCmd::Write | BioCmd::Discard | BioCmd::WriteZeroes => self.knobs.write_fail_percent,
            BioCmd::Flush | BioCmd::GetAllocation => return false,
        };
        if self.knobs.count_until_fail > 0 {
            self.knobs.count_until_fail -= 1;
            if self.knobs.count_until_fail == 0 {
                self.knobs.read_fail_percent = 100;
                self.knobs.write_fail_percent = 100;
            }
            return false;
        }
        self.in_fail_range(bio) && self.chance(percent)
    }

    /// Decides whether this request waits (gnop's start, second half).
    fn should_delay(&mut self, bio: &Bio) -> bool {
        let percent = match bio.cmd {
            BioCmd::Read => self.knobs.read_delay_percent,
            BioCmd::Flush => 0,
            _ => self.knobs.write_delay_percent,
        };
        self.knobs.delay_ms > 0 && self.chance(percent)
    }
}

impl Geom for NopGeom {
    fn class_name(&self) -> &'static str {
        "nop"
    }

    fn start(&mut self, io: &mut Io<'_>, _provider: ProviderId, bio: Bio) {
        match bio.cmd {
            BioCmd::Read => self.counters.reads += 1,
            BioCmd::Flush => self.counters.flushes += 1,
            // A query, passed down uncounted.
            BioCmd::GetAllocation => {}
            _ => self.counters.writes += 1,
        }
        if self.should_fail(&bio) {
            self.counters.failures += 1;
            io.deliver(bio, Err(self.knobs.error));
            return;
        }
        if self.should_delay(&bio) && io.has_clock() {
            self.counters.delayed += 1;
            let due = io.now_ns() + u64::from(self.knobs.delay_ms) * 1_000_000;
            self.held.push((due, bio));
            return;
        }
        io.request(self.consumer, bio, PASS);
    }

    fn done(&mut self, io: &mut Io<'_>, _cookie: u64, bio: Bio, result: BioResult) {
        if result.is_ok()
            && bio.cmd == BioCmd::Read
            && bio.length > 0
            && self.chance(self.knobs.corrupt_percent)
        {
            let at = self.rng.next_u64() % bio.length;
            let bit = self.rng.next_u32() % 8;
            let counters = &io.stats(self.provider).data;
            if bio
                .sg
                .map_range(at, 1, counters, |_, b| b[0] ^= 1 << bit)
                .is_ok()
            {
                self.counters.corruptions += 1;
            }
        }
        io.deliver(bio, result);
    }

    fn wants_poll(&self) -> bool {
        !self.held.is_empty()
    }

    fn poll(&mut self, io: &mut Io<'_>) -> bool {
        let now = io.now_ns();
        let mut any = false;
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                let (_, bio) = self.held.remove(i);
                io.request(self.consumer, bio, PASS);
                any = true;
            } else {
                i += 1;
            }
        }
        any
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        self.held.iter().map(|(t, _)| *t).min()
    }

    fn dumpconf(&self) -> Value {
        let k = &self.knobs;
        let c = &self.counters;
        json!({
            "read_fail_percent": k.read_fail_percent,
            "write_fail_percent": k.write_fail_percent,
            "error": k.error.errno(),
            "count_until_fail": k.count_until_fail,
            "delay_ms": k.delay_ms,
            "read_delay_percent": k.read_delay_percent,
            "write_delay_percent": k.write_delay_percent,
            "fail_offset_lba": k.fail_offset_lba,
            "fail_len_lba": k.fail_len_lba,
            "corrupt_percent": k.corrupt_percent,
            "seed": k.seed,
            "reads": c.reads,
            "writes": c.writes,
            "flushes": c.flushes,
            "failures": c.failures,
            "corruptions": c.corruptions,
            "delayed": c.delayed,
            "held": self.held.len(),
        })
    }

    fn as_any(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

/// The nop class: `nop create` and `nop configure` (no metadata).
pub struct NopClass;

/// The nop class's registry entry.
pub static CLASS: NopClass = NopClass;

/// `nop create [options] PROVIDER`: provider `PROVIDER.nop`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopCreate {
    /// The provider below.
    pub provider: String,
    /// Knobs.
    pub opts: NopOptions,
}

/// `nop configure [options] NAME`: changes knobs of a live nop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopConfigure {
    /// The nop's name (its provider name, `PROVIDER.nop`).
    pub name: String,
    /// Knobs to change.
    pub opts: NopOptions,
}

impl Command for NopCreate {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        NopGeom::create(stack, &self.provider, &self.opts)?;
        Ok(())
    }

    fn creates(&self) -> Option<(String, String)> {
        Some((format!("{}.nop", self.provider), self.provider.clone()))
    }

    fn consumes(&self) -> Vec<String> {
        alloc::vec![self.provider.clone()]
    }
}

impl Command for NopConfigure {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let g = ctl::geom(stack, "nop", &self.name)?;
        stack
            .geom_as::<NopGeom, _>(g, |nop, _| nop.configure(&self.opts))
            .ok_or_else(|| CtlError::NoGeom {
                class: String::from("nop"),
                name: self.name.clone(),
            })
    }
}

impl Class for NopClass {
    fn name(&self) -> &'static str {
        "nop"
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        let verb = args.next("'create', 'configure' or 'destroy'")?;
        let create = match verb.text {
            "create" => true,
            "configure" => false,
            "destroy" => return Destroy::parse("nop", args, |n| String::from(n)),
            _ => {
                return Err(unknown_verb(
                    args,
                    "nop",
                    &verb,
                    "create, configure or destroy",
                ))
            }
        };
        let opts = NopOptions::parse(args)?;
        let target = args.name(if create { "provider name" } else { "nop name" })?;
        args.finish()?;
        Ok(if create {
            Arc::new(NopCreate {
                provider: target,
                opts,
            })
        } else {
            Arc::new(NopConfigure { name: target, opts })
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::class::parse_test;

    #[test]
    fn statements_parse() {
        assert_eq!(
            parse_test::cmd::<NopCreate>(
                "nop create -r 5 -w 6 -e ENXIO -c 10 -d 3 -q 7 -x 8 -o 100 -l 20 -z 1 --seed 7 vtbd2"
            ),
            NopCreate {
                provider: "vtbd2".into(),
                opts: NopOptions {
                    read_fail_percent: Some(5),
                    write_fail_percent: Some(6),
                    error: Some(BioError::Orphaned),
                    count_until_fail: Some(10),
                    delay_ms: Some(3),
                    read_delay_percent: Some(7),
                    write_delay_percent: Some(8),
                    fail_offset_lba: Some(100),
                    fail_len_lba: Some(20),
                    corrupt_percent: Some(1),
                    seed: Some(7),
                }
            }
        );
        assert_eq!(
            parse_test::cmd::<NopConfigure>("nop configure -e 5 vtbd2.nop"),
            NopConfigure {
                name: "vtbd2.nop".into(),
                opts: NopOptions {
                    error: Some(BioError::Io),
                    ..Default::default()
                }
            }
        );
        assert_eq!(
            parse_test::one("nop create vtbd2").command.creates(),
            Some(("vtbd2.nop".into(), "vtbd2".into()))
        );
    }

    #[test]
    fn statement_errors_name_the_column() {
        let (c, m) = parse_test::err("nop create -r 101 vtbd0");
        assert_eq!(c, 15);
        assert!(m.contains("101"), "{m}");
        assert_eq!(parse_test::err("nop create -e EWHAT vtbd0").0, 15);
        assert_eq!(parse_test::err("nop create -k 1 vtbd0").0, 12);
        assert_eq!(parse_test::err("nop create").0, 11);
        assert_eq!(parse_test::err("nop create vtbd0 vtbd1").0, 18);
    }

    use super::*;
    use crate::config::parse_line;
    use crate::testing;
    use alloc::vec;

    fn apply(s: &mut Stack, line: &str) -> Result<(), CtlError> {
        ctl::apply(s, &parse_line(line, 1).unwrap().unwrap())
    }

    /// A nop over a 1 MiB disk, created plain (so tasting its new
    /// provider meets no fault) and then given `flags`.
    fn nop_over_disk(flags: &str) -> (Stack, testing::FakeDiskHandle, ConsumerId) {
        let (mut s, disks) = testing::stack_with_disks(1, 1 << 20, 512);
        apply(&mut s, "nop create vtbd0").unwrap();
        if !flags.is_empty() {
            apply(&mut s, &format!("nop configure {flags} vtbd0.nop")).unwrap();
        }
        let g = s.find_geom("nop", "vtbd0.nop").unwrap();
        s.geom_as::<NopGeom, _>(g, |n, _| n.counters = NopCounters::default());
        let c = s.open("vtbd0.nop", crate::stack::Access::READ_WRITE).unwrap();
        (s, disks.into_iter().next().unwrap(), c)
    }

    #[test]
    fn passes_through_without_touching_data() {
        let (mut s, disk, c) = nop_over_disk("");
        let data: Vec<u8> = (0..8192).map(|i| (i % 253) as u8).collect();
        testing::write(&mut s, c, 4096, &data).unwrap();
        assert_eq!(testing::read(&mut s, c, 4096, 8192).unwrap(), data);
        assert_eq!(&disk.contents()[4096..4096 + 8192], &data[..]);
        testing::flush(&mut s, c).unwrap();
        assert_eq!(disk.stats().flushes, 1);
        let p = s.find_provider("vtbd0.nop").unwrap();
        assert_eq!(s.provider(p).stats.data.bytes_mapped(), 0);
        assert_eq!(s.provider(p).stats.data.bytes_copied(), 0);
        assert_eq!(s.provider(p).spec.media_size, 1 << 20);
    }

    #[test]
    fn read_failures_follow_the_probability_and_the_seed() {
        let run = |seed: u64| {
            let (mut s, _, c) = nop_over_disk(&format!("-r 30 --seed {seed}"));
            (0..200)
                .map(|i| testing::read(&mut s, c, (i % 100) * 512, 512).is_ok())
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same run");
        assert_ne!(a, run(8));
        let failed = a.iter().filter(|ok| !**ok).count();
        assert!((30..90).contains(&failed), "{failed} of 200 failed");
    }

    #[test]
    fn error_value_write_probability_and_counters() {
        let (mut s, _, c) = nop_over_disk("-w 100 -e ENXIO");
        assert_eq!(
            testing::write(&mut s, c, 0, &[1; 512]),
            Err(BioError::Orphaned)
        );
        assert!(testing::read(&mut s, c, 0, 512).is_ok());
        let g = s.find_geom("nop", "vtbd0.nop").unwrap();
        let k = s
            .geom_as::<NopGeom, _>(g, |n, _| n.counters().clone())
            .unwrap();
        assert_eq!((k.reads, k.writes, k.failures), (1, 1, 1));
        let json = ctl::topology_json(&s);
        assert!(json.contains("\"failures\":1"), "{json}");
    }

    #[test]
    fn count_until_fail_then_everything_fails() {
        let (mut s, _, c) = nop_over_disk("-c 3");
        for _ in 0..3 {
            testing::read(&mut s, c, 0, 512).unwrap();
        }
        assert_eq!(testing::read(&mut s, c, 0, 512), Err(BioError::Io));
        assert_eq!(testing::write(&mut s, c, 0, &[0; 512]), Err(BioError::Io));
    }

    #[test]
    fn failures_limited_to_an_lba_range() {
        let (mut s, _, c) = nop_over_disk("-r 100 -o 8 -l 8");
        assert!(testing::read(&mut s, c, 0, 4096).is_ok());
        assert!(testing::read(&mut s, c, 8 * 512, 512).is_err());
        assert!(testing::read(&mut s, c, 15 * 512, 1024).is_err());
        assert!(testing::read(&mut s, c, 16 * 512, 4096).is_ok());
    }

    #[test]
    fn configure_changes_knobs_live() {
        let (mut s, _, c) = nop_over_disk("");
        assert!(testing::read(&mut s, c, 0, 512).is_ok());
        apply(&mut s, "nop configure -r 100 vtbd0.nop").unwrap();
        assert!(testing::read(&mut s, c, 0, 512).is_err());
        apply(&mut s, "nop configure -r 0 vtbd0.nop").unwrap();
        assert!(testing::read(&mut s, c, 0, 512).is_ok());
        assert!(matches!(
            apply(&mut s, "nop configure -r 1 vtbd9.nop"),
            Err(CtlError::NoGeom { .. })
        ));
    }

    #[test]
    fn corruption_flips_one_bit_and_is_counted() {
        let (mut s, _, c) = nop_over_disk("-z 100");
        testing::write(&mut s, c, 0, &[0u8; 4096]).unwrap();
        let got = testing::read(&mut s, c, 0, 4096).unwrap();
        let ones: u32 = got.iter().map(|b| b.count_ones()).sum();
        assert_eq!(ones, 1);
        let p = s.find_provider("vtbd0.nop").unwrap();
        assert_eq!(s.provider(p).stats.data.bytes_mapped(), 1);
    }

    #[test]
    fn delay_holds_requests_until_the_clock_passes() {
        let (mut s, _, c) = nop_over_disk("-d 10");
        s.set_now_ns(1_000_000);
        s.submit(c, Bio::read(0, 512), 1);
        for _ in 0..10 {
            s.run();
        }
        assert!(s.take_completed().is_none());
        assert_eq!(s.next_deadline_ns(), Some(11_000_000));
        s.set_now_ns(11_000_000);
        let (tag, _, r) = testing::wait(&mut s);
        assert_eq!((tag, r), (1, Ok(())));
        // Without a clock a delay cannot be kept, so it is skipped.
        let (mut s, _, c) = nop_over_disk("-d 10");
        assert!(testing::read(&mut s, c, 0, 512).is_ok());
    }

    #[test]
    fn forced_destroy_orphans_the_provider_under_an_open_consumer() {
        let (mut s, disk, c) = nop_over_disk("");
        testing::write(&mut s, c, 0, &[9; 512]).unwrap();
        assert!(matches!(
            apply(&mut s, "nop destroy vtbd0.nop"),
            Err(CtlError::Stack(StackError::Busy(_)))
        ));
        // A bio in flight at the moment of destruction still completes.
        disk.hold(true);
        s.submit(c, Bio::read(0, 512), 5);
        s.run();
        assert_eq!(disk.queued(), 1);
        apply(&mut s, "nop destroy -f vtbd0.nop").unwrap();
        disk.hold(false);
        let (tag, _, r) = testing::wait(&mut s);
        assert_eq!(tag, 5);
        assert!(r.is_err());
        assert_eq!(testing::read(&mut s, c, 0, 512), Err(BioError::Orphaned));
        assert_eq!(testing::flush(&mut s, c), Err(BioError::Orphaned));
        let p = s.consumer_provider(c);
        assert!(s.provider(p).orphaned);
        // The disk below was let go and can be used again.
        assert!(s.geoms().any(|g| s.geom_class(g) == "disk"));
        assert_eq!(s.find_geom("nop", "vtbd0.nop"), None);
        let below = s.find_provider("vtbd0").unwrap();
        assert_eq!(s.provider(below).access, Default::default());
        apply(&mut s, "nop create vtbd0").unwrap();
        let c2 = s.open("vtbd0.nop", crate::stack::Access::READ_WRITE).unwrap();
        assert_eq!(testing::read(&mut s, c2, 0, 512).unwrap(), vec![9; 512]);
        // Closing the old consumer lets the dead provider go.
        s.close(c).unwrap();
        assert_eq!(
            s.providers()
                .filter(|(_, p)| p.spec.name == "vtbd0.nop")
                .count(),
            1
        );
        drop(disk);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// With no fault knob set, nop is invisible: the provider behaves
        /// like the disk below, and nothing is mapped or copied.
        #[test]
        fn pass_through_behaves_like_a_flat_array(ops in testing::ops_all(2048, 64, 40), depth in 1usize..8) {
            let (mut s, disk, c) = nop_over_disk("");
            disk.set_depth(depth);
            testing::run_model(&mut s, c, &ops, &[disk]);
            for name in ["vtbd0.nop", "vtbd0"] {
                let st = &s.provider(s.find_provider(name).unwrap()).stats;
                proptest::prop_assert_eq!(st.data.bytes_mapped() + st.data.bytes_copied(), 0);
            }
        }
    }

    #[test]
    fn a_dying_disk_orphans_the_nop_above() {
        let (mut s, disk, c) = nop_over_disk("");
        disk.set_dead(true);
        for _ in 0..crate::disk::DEFAULT_ERROR_LIMIT {
            assert!(testing::read(&mut s, c, 0, 512).is_err());
        }
        let below = s.find_provider("vtbd0").unwrap();
        assert!(s.provider(below).orphaned);
        assert_eq!(testing::read(&mut s, c, 0, 512), Err(BioError::Orphaned));
        let json = ctl::topology_json(&s);
        assert!(json.contains("\"name\":\"vtbd0.nop\""), "{json}");
        assert!(json.contains("\"state\":\"orphaned\""), "{json}");
    }
}
