//! Control: config statements carried out on a live stack (at boot and
//! from the management endpoint alike), and the topology as JSON.
//!
//! ```text
//!  config line ─▶ config::parse_line ─▶ Statement ─▶ ctl::apply(stack, stmt)
//!                                                     │ md create, CLASS destroy, CLASS clear: here
//!                                                     │ anything else: the registered Class::ctl
//!                                                     ▼
//!                                   stack.settle(): new providers tasted,
//!                                   metadata written, before apply returns
//! ```
//!
//! Export and net statements belong to the service; [`apply`] refuses them
//! with [`CtlError::NotGeom`].

use crate::bio::GeomId;
use crate::class::{concat::ConcatClass, md::MdGeom, nop::NopClass, stripe::StripeClass};
use crate::config::{ConfigError, Line, Statement};
use crate::meta::MetaError;
use crate::stack::{ProviderStats, Stack, StackError};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

/// Rounds of [`Stack::run`] [`apply`] waits for tasting and metadata
/// writes before it gives up (devices complete asynchronously; a round
/// with nothing to do is a few microseconds).
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

/// Registers the standard classes (nop, concat, stripe) in `stack`, so
/// they taste and take their statements. Safe to call more than once.
pub fn register_classes(stack: &mut Stack) {
    stack.register_class(Box::new(NopClass));
    stack.register_class(Box::new(ConcatClass));
    stack.register_class(Box::new(StripeClass));
    stack.register_class(Box::new(crate::class::mirror::MirrorClass));
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

/// Carries out one statement on the stack, then runs the stack until new
/// providers are tasted and metadata is written.
pub fn apply(stack: &mut Stack, stmt: &Statement) -> Result<(), CtlError> {
    register_classes(stack);
    let class = stmt.class().ok_or(CtlError::NotGeom)?;
    let write_errors = stack.meta_write_errors();
    match stmt {
        Statement::MdCreate { name, size_bytes } => {
            MdGeom::create(stack, name, *size_bytes)?;
        }
        Statement::Destroy { class, name, force } => {
            let g = geom(stack, class, name)?;
            stack.destroy_geom(g, *force)?;
        }
        Statement::Clear { providers, .. } => {
            let ids = providers
                .iter()
                .map(|p| provider(stack, p))
                .collect::<Result<Vec<_>, _>>()?;
            for (&p, name) in ids.iter().zip(providers) {
                if !stack.provider(p).access.is_zero() {
                    return Err(CtlError::Stack(StackError::Busy(name.clone())));
                }
            }
            for p in ids {
                stack.write_meta(p, None)?;
            }
        }
        _ => {
            let r = stack.with_class(class, |c, s| c.ctl(s, stmt));
            r.ok_or_else(|| CtlError::NoClass(String::from(class)))??;
        }
    }
    if !stack.settle(SETTLE_ROUNDS) {
        return Err(CtlError::Invalid(String::from(
            "metadata I/O did not complete (a device is not answering)",
        )));
    }
    if stack.meta_write_errors() > write_errors {
        return Err(CtlError::Invalid(String::from(
            "writing metadata failed (see the taste log)",
        )));
    }
    Ok(())
}

/// [`apply`] for a config line: the error carries the line number.
pub fn apply_line(stack: &mut Stack, line: &Line) -> Result<(), ConfigError> {
    apply(stack, &line.stmt).map_err(|e| ConfigError {
        line: line.line,
        column: 1,
        message: format!("{e}"),
    })
}

/// Escapes a string for a JSON string literal.
pub fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn access_json(out: &mut String, a: crate::stack::Access) {
    let _ = write!(out, "{{\"r\":{},\"w\":{},\"e\":{}}}", a.r, a.w, a.e);
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
pub fn topology_json(stack: &Stack) -> String {
    let mut classes: Vec<&'static str> = Vec::new();
    for g in stack.geoms() {
        let c = stack.geom_class(g);
        if !classes.contains(&c) {
            classes.push(c);
        }
    }
    for c in stack.class_names() {
        if !classes.contains(&c) {
            classes.push(c);
        }
    }
    let mut s = String::from("{\"classes\":[");
    for (ci, class) in classes.iter().enumerate() {
        if ci > 0 {
            s.push(',');
        }
        let _ = write!(s, "{{\"name\":\"{}\",\"geoms\":[", json_escape(class));
        let geoms: Vec<GeomId> = stack
            .geoms()
            .filter(|&g| stack.geom_class(g) == *class)
            .collect();
        for (gi, &g) in geoms.iter().enumerate() {
            if gi > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"name\":\"{}\",\"state\":\"{}\",\"config\":{{",
                json_escape(stack.geom_name(g)),
                stack.geom_state(g).name()
            );
            stack.dumpconf(g, &mut s);
            s.push_str("},\"providers\":[");
            for (pi, p) in stack.geom_providers(g).into_iter().enumerate() {
                if pi > 0 {
                    s.push(',');
                }
                let p = stack.provider(p);
                let _ = write!(
                    s,
                    "{{\"name\":\"{}\",\"media_size\":{},\"sector_size\":{},\"stripe_size\":{},\"stripe_offset\":{},\"access\":",
                    json_escape(&p.spec.name),
                    p.spec.media_size,
                    p.spec.sector_size,
                    p.spec.stripe_size,
                    p.spec.stripe_offset
                );
                access_json(&mut s, p.access);
                let st = &p.stats;
                let g = ProviderStats::get;
                let _ = write!(
                    s,
                    ",\"state\":\"{}\",\"in_flight\":{},\"stats\":{{\"reads\":{},\"writes\":{},\"flushes\":{},\"frees\":{},\"bytes_read\":{},\"bytes_written\":{},\"errors\":{},\"read_ns\":{},\"write_ns\":{},\"bytes_mapped\":{},\"bytes_copied\":{}}}}}",
                    if p.orphaned { "orphaned" } else { "ok" },
                    p.in_flight,
                    g(&st.reads),
                    g(&st.writes),
                    g(&st.flushes),
                    g(&st.frees),
                    g(&st.bytes_read),
                    g(&st.bytes_written),
                    g(&st.errors),
                    g(&st.read_ns),
                    g(&st.write_ns),
                    st.data.bytes_mapped(),
                    st.data.bytes_copied()
                );
            }
            s.push_str("],\"consumers\":[");
            for (ki, c) in stack.geom_consumers(g).into_iter().enumerate() {
                if ki > 0 {
                    s.push(',');
                }
                let c = stack.consumer(c);
                let pname = stack
                    .get_provider(c.provider)
                    .map_or("", |p| p.spec.name.as_str());
                let _ = write!(s, "{{\"provider\":\"{}\",\"access\":", json_escape(pname));
                access_json(&mut s, c.access);
                let _ = write!(s, ",\"in_flight\":{}}}", c.in_flight);
            }
            s.push_str("]}");
        }
        s.push_str("]}");
    }
    s.push_str("],\"waiting\":[");
    for (i, (class, name, have, want)) in stack.incomplete_geoms().into_iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{{\"class\":\"{}\",\"name\":\"{}\",\"members\":{have},\"of\":{want}}}",
            json_escape(&class),
            json_escape(&name)
        );
    }
    s.push_str("],\"taste_log\":[");
    for (i, line) in stack.taste_log().enumerate() {
        let sep = if i > 0 { "," } else { "" };
        let _ = write!(s, "{sep}\"{}\"", json_escape(line));
    }
    let _ = write!(s, "],\"now_ns\":{}}}", stack.now_ns());
    s
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
        let c = s.open("concat/c0", true, true, false).unwrap();
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
        let c = s.open("stripe/st0", true, true, false).unwrap();
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
        let c = s.open("concat/c0", true, false, false).unwrap();
        assert!(apply(&mut s, &parse("md destroy md0").unwrap().lines[0].stmt).is_err());
        s.close(c).unwrap();
        apply_all(&mut s, "md destroy md0\nmd create -s 32k md0\n");
        assert_eq!(s.find_geom("concat", "c0"), None);
        assert_eq!(s.find_provider("concat/c0"), None);
        let p = s.find_provider("md0").unwrap();
        assert_eq!(s.provider(p).spec.media_size, 32 << 10);
    }
}
