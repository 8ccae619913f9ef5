//! Control: config statements carried out on a live stack (at boot and
//! from the management endpoint alike), and the topology as JSON.
//!
//! ```text
//!  config line ─▶ config::parse_line ─▶ Statement::Geom ─▶ ctl::start(stack, stmt)
//!                                                           │ the class's Command::apply
//!                                                           ▼
//!                          Settling: tasting of new providers and metadata
//!                          writes go on as events of the stack; the caller
//!                          checks Settling::check on each turn of its loop
//! ```
//!
//! Nothing here waits by spinning the stack: the service keeps running
//! every other client while a statement's metadata I/O completes, and
//! answers the statement (or goes on to the next config line) once
//! [`Settling::check`] says it is done. [`apply`] runs the stack itself
//! until then, for tests and tools that have no loop of their own.
//!
//! Export and net statements belong to the service; [`start`] refuses
//! them with [`CtlError::NotGeom`].

use crate::bio::GeomId;
use crate::config::{ConfigError, Line, Statement};
use crate::meta::MetaError;
use crate::stack::{Access, ProviderStats, Stack, StackError};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::{json, Value};

/// Rounds of [`Stack::run`] [`apply`] runs while waiting for tasting and
/// metadata writes before it gives up (a round with nothing to do is a few
/// microseconds).
pub const SETTLE_ROUNDS: u32 = 1 << 22;

/// Why a statement could not be carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtlError {
    /// Export and net statements are the service's, not the stack's.
    NotGeom,
    /// No class of that name is registered.
    NoClass(String),
    /// The class has no such command.
    NotSupported(String),
    /// No live geom of that class and name.
    NoGeom {
        /// Class name.
        class: String,
        /// Geom name.
        name: String,
    },
    /// The stack refused (missing provider, name in use, busy, …).
    Stack(StackError),
    /// Metadata could not be built.
    Meta(MetaError),
    /// The command's arguments do not fit the providers.
    Invalid(String),
}

impl From<StackError> for CtlError {
    fn from(e: StackError) -> CtlError {
        CtlError::Stack(e)
    }
}

impl From<MetaError> for CtlError {
    fn from(e: MetaError) -> CtlError {
        CtlError::Meta(e)
    }
}

impl core::fmt::Display for CtlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CtlError::NotGeom => write!(f, "not a geom statement"),
            CtlError::NoClass(c) => write!(f, "no class named '{c}'"),
            CtlError::NotSupported(c) => write!(f, "class '{c}' has no such command"),
            CtlError::NoGeom { class, name } => write!(f, "no {class} geom named '{name}'"),
            CtlError::Stack(e) => write!(f, "{e}"),
            CtlError::Meta(e) => write!(f, "{e}"),
            CtlError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

/// Looks up a provider by name, as a control error when it is missing.
pub fn provider(stack: &Stack, name: &str) -> Result<crate::bio::ProviderId, CtlError> {
    stack
        .find_provider(name)
        .ok_or_else(|| CtlError::Stack(StackError::NoSuchProvider(String::from(name))))
}

/// Looks up a live geom, as a control error when it is missing.
pub fn geom(stack: &Stack, class: &str, name: &str) -> Result<GeomId, CtlError> {
    stack
        .find_geom(class, name)
        .ok_or_else(|| CtlError::NoGeom {
            class: String::from(class),
            name: String::from(name),
        })
}

/// A statement carried out, whose metadata I/O may still be running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "check it until the statement's I/O is done"]
pub struct Settling {
    write_errors: u64,
    statement_errors: u64,
}

impl Settling {
    /// Waiting for whatever tasting and metadata I/O the stack has going
    /// now (at boot: the disks' taste reads, so labelled geoms assemble
    /// before the first config line).
    pub fn now(stack: &Stack) -> Settling {
        Settling {
            write_errors: stack.meta_write_errors(),
            statement_errors: stack.core.statement_errors.0,
        }
    }

    /// `None` while the stack still tastes new providers or writes
    /// metadata; then whether every metadata write succeeded.
    pub fn check(&self, stack: &Stack) -> Option<Result<(), CtlError>> {
        if stack.tasting() {
            return None;
        }
        let (count, recent) = &stack.core.statement_errors;
        if *count > self.statement_errors {
            // The first failure since the statement started (or the
            // oldest kept).
            let new = (*count - self.statement_errors) as usize;
            let at = recent.len().saturating_sub(new);
            let message = recent.get(at).cloned().unwrap_or_default();
            return Some(Err(CtlError::Invalid(message)));
        }
        Some(if stack.meta_write_errors() > self.write_errors {
            Err(CtlError::Invalid(String::from(
                "writing metadata failed (see the taste log)",
            )))
        } else {
            Ok(())
        })
    }
}

/// Carries out one geom statement on the stack. Tasting and metadata I/O
/// it starts go on as events; [`Settling::check`] says when they are done.
pub fn start(stack: &mut Stack, stmt: &Statement) -> Result<Settling, CtlError> {
    let Statement::Geom(g) = stmt else {
        return Err(CtlError::NotGeom);
    };
    let settling = Settling::now(stack);
    g.command.apply(stack)?;
    Ok(settling)
}

/// At boot: true when tasting found on the disks what `stmt` would write
/// (see [`crate::class::Command::on_disk`]), so the line is skipped.
pub fn on_disk(stack: &mut Stack, stmt: &Statement) -> bool {
    matches!(stmt, Statement::Geom(g) if g.command.on_disk(stack))
}

/// [`start`], then runs the stack until the statement's I/O is done (for
/// tests and tools without a loop of their own).
pub fn apply(stack: &mut Stack, stmt: &Statement) -> Result<(), CtlError> {
    let settling = start(stack, stmt)?;
    for _ in 0..SETTLE_ROUNDS {
        stack.run();
        if let Some(r) = settling.check(stack) {
            return r;
        }
    }
    Err(CtlError::Invalid(String::from(
        "metadata I/O did not complete (a device is not answering)",
    )))
}

/// [`apply`] for a config line: the error carries the line number.
pub fn apply_line(stack: &mut Stack, line: &Line) -> Result<(), ConfigError> {
    apply(stack, &line.stmt).map_err(|e| ConfigError {
        line: line.line,
        column: 1,
        message: format!("{e}"),
    })
}

fn access_json(a: Access) -> Value {
    json!({"r": a.r, "w": a.w, "e": a.e})
}

/// The topology as JSON, like `geom list` (FreeBSD's confxml):
///
/// ```text
/// {"classes":[{"name":"stripe","geoms":[{"name":"st0","state":"ok",
///   "config":{...class-specific...},
///   "providers":[{"name":"stripe/st0","media_size":..,"sector_size":..,
///     "stripe_size":..,"stripe_offset":..,"access":{"r":1,"w":1,"e":0},
///     "state":"ok","in_flight":0,"stats":{"reads":..,"writes":..,
///     "flushes":..,"frees":..,"bytes_read":..,"bytes_written":..,
///     "errors":..,"read_ns":..,"write_ns":..,"bytes_mapped":..,"bytes_copied":..}}],
///   "consumers":[{"provider":"vtbd0","access":{..},"in_flight":0}]}]}],
///  "waiting":[{"class":"stripe","name":"st1","members":1,"of":2}],
///  "taste_log":["vtbd0: member 0 of 2 stripe/st1", …],
///  "now_ns":..}
/// ```
pub fn topology(stack: &Stack) -> Value {
    let mut classes: Vec<&'static str> = Vec::new();
    let registered = crate::class::CLASSES.iter().map(|c| c.name());
    for c in stack.geoms().map(|g| stack.geom_class(g)).chain(registered) {
        if !classes.contains(&c) {
            classes.push(c);
        }
    }
    let provider = |p: crate::bio::ProviderId| {
        let p = stack.provider(p);
        let st = &p.stats;
        let g = ProviderStats::get;
        json!({
            "name": p.spec.name,
            "media_size": p.spec.media_size,
            "sector_size": p.spec.sector_size,
            "stripe_size": p.spec.stripe_size,
            "stripe_offset": p.spec.stripe_offset,
            "access": access_json(p.access),
            "state": if p.orphaned { "orphaned" } else { "ok" },
            "in_flight": p.in_flight,
            "stats": {
                "reads": g(&st.reads),
                "writes": g(&st.writes),
                "flushes": g(&st.flushes),
                "frees": g(&st.frees),
                "bytes_read": g(&st.bytes_read),
                "bytes_written": g(&st.bytes_written),
                "errors": g(&st.errors),
                "read_ns": g(&st.read_ns),
                "write_ns": g(&st.write_ns),
                "bytes_mapped": st.data.bytes_mapped(),
                "bytes_copied": st.data.bytes_copied(),
            },
        })
    };
    let consumer = |c: crate::bio::ConsumerId| {
        let c = stack.consumer(c);
        let pname = stack
            .get_provider(c.provider)
            .map_or("", |p| p.spec.name.as_str());
        json!({"provider": pname, "access": access_json(c.access), "in_flight": c.in_flight})
    };
    let classes: Vec<Value> = classes
        .iter()
        .map(|&class| {
            let geoms: Vec<Value> = stack
                .geoms()
                .filter(|&g| stack.geom_class(g) == class)
                .map(|g| {
                    json!({
                        "name": stack.geom_name(g),
                        "state": stack.geom_state(g).name(),
                        "config": stack.dumpconf(g),
                        "providers": stack.geom_providers(g).into_iter().map(provider).collect::<Vec<_>>(),
                        "consumers": stack.geom_consumers(g).into_iter().map(consumer).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({"name": class, "geoms": geoms})
        })
        .collect();
    let waiting: Vec<Value> = stack
        .incomplete_geoms()
        .into_iter()
        .map(|(class, name, have, want)| {
            json!({"class": class, "name": name, "members": have, "of": want})
        })
        .collect();
    json!({
        "classes": classes,
        "waiting": waiting,
        "taste_log": stack.taste_log().collect::<Vec<_>>(),
        "now_ns": stack.now_ns(),
    })
}

/// [`topology`] as text.
pub fn topology_json(stack: &Stack) -> String {
    topology(stack).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::testing;

    fn apply_all(s: &mut Stack, text: &str) {
        for l in parse(text).unwrap().lines {
            apply_line(s, &l).unwrap();
        }
    }

    #[test]
    fn topology_is_json_with_every_layer() {
        let (mut s, _) = testing::stack_with_disks(3, 1 << 20, 512);
        apply_all(
            &mut s,
            "md create -s 1m md0\nnop create -r 5 --seed 3 vtbd0\nstripe label -s 64k st0 vtbd0.nop vtbd1\nconcat create c0 stripe/st0 vtbd2\n",
        );
        let c = s
            .open("concat/c0", crate::stack::Access::READ_WRITE)
            .unwrap();
        testing::write(&mut s, c, 0, &[1; 4096]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&topology_json(&s)).unwrap();
        let classes = v["classes"].as_array().unwrap();
        let class = |n: &str| classes.iter().find(|c| c["name"] == n).unwrap();
        assert_eq!(class("disk")["geoms"].as_array().unwrap().len(), 3);
        let st0 = &class("stripe")["geoms"][0];
        assert_eq!(st0["name"], "st0");
        assert_eq!(st0["config"]["stripe_size"], 65536);
        assert_eq!(st0["config"]["members"][0], "vtbd0.nop");
        assert_eq!(st0["consumers"][1]["provider"], "vtbd1");
        assert_eq!(st0["consumers"][1]["access"]["w"], 1);
        let c0 = &class("concat")["geoms"][0]["providers"][0];
        assert_eq!(c0["name"], "concat/c0");
        assert_eq!(c0["access"], serde_json::json!({"r": 1, "w": 1, "e": 0}));
        assert_eq!(c0["stats"]["writes"], 1);
        assert_eq!(c0["stats"]["bytes_mapped"], 0);
        assert_eq!(class("nop")["geoms"][0]["config"]["read_fail_percent"], 5);
        assert_eq!(class("md")["geoms"][0]["providers"][0]["state"], "ok");
    }

    #[test]
    fn errors_are_typed_and_carry_the_line() {
        let (mut s, _) = testing::stack_with_disks(1, 1 << 20, 512);
        let cfg = parse("nop create vtbd0\nnop create vtbd0\n").unwrap_err();
        assert_eq!(cfg.line, 2);
        let cfg = parse("\n\nstripe create -s 4k st0 vtbd0 vtbd7\n").unwrap();
        let e = apply_line(&mut s, &cfg.lines[0]).unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(e.message, "no provider named 'vtbd7'");
        let export = parse("export nbd a vtbd0").unwrap();
        assert_eq!(apply(&mut s, &export.lines[0].stmt), Err(CtlError::NotGeom));
        let md = parse("md destroy md9").unwrap();
        assert!(matches!(
            apply(&mut s, &md.lines[0].stmt),
            Err(CtlError::NoGeom { .. })
        ));
        assert_eq!(
            format!(
                "{}",
                CtlError::NoGeom {
                    class: "md".into(),
                    name: "md9".into()
                }
            ),
            "no md geom named 'md9'"
        );
    }

    #[test]
    fn clear_wipes_metadata_and_refuses_open_providers() {
        let (mut s, disks) = testing::stack_with_disks(2, 1 << 20, 512);
        apply_all(&mut s, "stripe label -s 4k st0 vtbd0 vtbd1\n");
        let c = s
            .open("stripe/st0", crate::stack::Access::READ_WRITE)
            .unwrap();
        let cl = &parse("stripe clear vtbd0 vtbd1").unwrap().lines[0];
        assert!(apply_line(&mut s, cl).is_err());
        s.close(c).unwrap();
        apply_all(&mut s, "stripe destroy st0\n");
        apply_line(&mut s, cl).unwrap();
        for d in &disks {
            let img = d.contents();
            assert!(img[img.len() - 512..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn md_lines_and_destroy() {
        let mut s = Stack::new();
        apply_all(
            &mut s,
            "md create -s 64k md0\nmd create -s 64k md1\nconcat label c0 md0 md1\n",
        );
        let p = s.find_provider("concat/c0").unwrap();
        assert_eq!(s.provider(p).spec.media_size, 2 * (64 << 10) - 1024);
        // Destroy is refused only while open: a geom merely consuming
        // md0 is told it is gone (FreeBSD's orphan), and withers.
        let c = s.open("concat/c0", crate::stack::Access::READ).unwrap();
        assert!(apply(&mut s, &parse("md destroy md0").unwrap().lines[0].stmt).is_err());
        s.close(c).unwrap();
        apply_all(&mut s, "md destroy md0\nmd create -s 32k md0\n");
        assert_eq!(s.find_geom("concat", "c0"), None);
        assert_eq!(s.find_provider("concat/c0"), None);
        let p = s.find_provider("md0").unwrap();
        assert_eq!(s.provider(p).spec.media_size, 32 << 10);
    }
}
