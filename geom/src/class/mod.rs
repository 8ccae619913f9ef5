//! The classes: one file each, readable in one sitting.
//!
//! To add a class, copy `nop.rs` (pass-through, no metadata) or
//! `concat.rs` (several members, metadata, tasting), add a `pub mod` line
//! here, its statements to `config.rs`, and one `register_class` line to
//! `ctl::register_classes`.

pub mod concat;
pub mod md;
pub mod mirror;
pub mod nop;
pub mod stripe;

use crate::bio::ProviderId;
use crate::meta::{MetaRepr, PARAMS};
use crate::stack::{ProviderSpec, Stack, StackError};
use alloc::string::String;
use alloc::vec::Vec;

/// Resolves member provider names for a geom over several providers:
/// each must exist, be alive, and be named once.
pub fn resolve_members(
    stack: &Stack,
    names: &[String],
) -> Result<Vec<(ProviderId, ProviderSpec)>, StackError> {
    let mut out: Vec<(ProviderId, ProviderSpec)> = Vec::new();
    for n in names {
        let p = stack
            .find_provider(n)
            .ok_or_else(|| StackError::NoSuchProvider(n.clone()))?;
        let prov = stack.provider(p);
        if prov.orphaned {
            return Err(StackError::Orphaned(n.clone()));
        }
        if out.iter().any(|(q, _)| *q == p) {
            return Err(StackError::Invalid(alloc::format!(
                "provider '{n}' is named twice"
            )));
        }
        out.push((p, prov.spec.clone()));
    }
    if out.is_empty() {
        return Err(StackError::Invalid(String::from("no member providers")));
    }
    Ok(out)
}

/// Bytes of a member a geom may use: all of it, or all but the last
/// sector when it holds metadata, rounded down to `unit`.
pub fn usable_bytes(spec: &ProviderSpec, labelled: bool, unit: u64) -> u64 {
    let meta = if labelled {
        u64::from(spec.sector_size)
    } else {
        0
    };
    let n = spec.media_size.saturating_sub(meta);
    n - n % unit.max(1)
}

/// Writes the metadata of geom `class`/`name` (unique `id`, class
/// `params`) to the last sector of every member, in member order.
pub fn write_labels(
    stack: &mut Stack,
    class: &str,
    name: &str,
    id: u64,
    params: [u64; PARAMS],
    members: &[(ProviderId, ProviderSpec)],
) -> Result<(), StackError> {
    for (i, (p, spec)) in members.iter().enumerate() {
        let m = MetaRepr {
            class: String::from(class),
            name: String::from(name),
            id,
            generation: 0,
            member_index: i as u32,
            member_count: members.len() as u32,
            member_size: spec.media_size,
            sector_size: spec.sector_size,
            flags: 0,
            params,
        };
        stack.write_meta(*p, Some(&m))?;
    }
    Ok(())
}

/// The members of a tasted group as (provider, spec), in member order.
pub fn tasted_members(
    stack: &Stack,
    members: &[crate::taste::Member],
) -> Vec<(ProviderId, ProviderSpec)> {
    members
        .iter()
        .map(|m| (m.provider, stack.provider(m.provider).spec.clone()))
        .collect()
}
