//! Exports: a provider served by a protocol under a name, whatever the
//! protocol. Each protocol's sessions see only its own exports, as the
//! slice of [`ExportInfo`] they index.

use super::protocols::{ExportOptions, PROTOCOLS};
use super::MAX_PAYLOAD;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use geom::bio::ConsumerId;
use geom::stack::{Access, Stack};
use net::session::ExportInfo;

/// One export.
#[derive(Clone, Debug)]
pub struct Export {
    /// Index of its protocol in [`PROTOCOLS`].
    pub protocol: usize,
    /// The provider served.
    pub provider: String,
    /// The service's consumer of that provider.
    pub consumer: ConsumerId,
    /// What its protocol's sessions are told about it.
    pub info: ExportInfo,
}

/// Every export, and each protocol's view of them.
#[derive(Default)]
pub struct Exports {
    list: Vec<Export>,
    /// Per protocol: the infos its sessions index, and where each is in
    /// `list`.
    views: Vec<(Vec<ExportInfo>, Vec<usize>)>,
}

impl Exports {
    /// No export yet.
    pub fn new() -> Exports {
        Exports {
            list: Vec::new(),
            views: PROTOCOLS.iter().map(|_| (Vec::new(), Vec::new())).collect(),
        }
    }

    /// Every export, in the order they were made.
    pub fn all(&self) -> &[Export] {
        &self.list
    }

    /// The exports of protocol `p`, as its sessions index them.
    pub fn view(&self, p: usize) -> &[ExportInfo] {
        &self.views[p].0
    }

    /// The export a session of protocol `p` calls `index`.
    pub fn get(&self, p: usize, index: usize) -> Option<&Export> {
        self.views[p].1.get(index).map(|&i| &self.list[i])
    }

    /// Opens `provider` and serves it as `name` over protocol `p`.
    pub fn add(
        &mut self,
        stack: &mut Stack,
        p: usize,
        name: &str,
        provider: &str,
        o: ExportOptions,
    ) -> Result<(), String> {
        if self.views[p].0.iter().any(|i| i.name == name) {
            return Err(format!("export '{name}' exists already"));
        }
        let mode = if o.read_only {
            Access::READ
        } else {
            Access::READ_WRITE
        };
        let consumer = stack
            .open(provider, mode)
            .map_err(|e| format!("cannot export '{name}': {e}"))?;
        let pid = stack.consumer_provider(consumer);
        let spec = &stack.provider(pid).spec;
        let preferred = if spec.stripe_size > 0 {
            spec.stripe_size
        } else {
            4096
        };
        let info = ExportInfo {
            name: String::from(name),
            description: format!(
                "{} ({})",
                provider,
                stack.geom_class(stack.provider(pid).geom)
            ),
            size_bytes: spec.media_size,
            read_only: o.read_only,
            can_flush: spec.can_flush,
            can_trim: spec.can_discard && !o.read_only,
            can_write_zeroes: spec.can_write_zeroes && !o.read_only,
            min_block: spec.sector_size,
            preferred_block: preferred.max(spec.sector_size),
            max_block: MAX_PAYLOAD,
        };
        self.views[p].0.push(info.clone());
        self.views[p].1.push(self.list.len());
        self.list.push(Export {
            protocol: p,
            provider: String::from(provider),
            consumer,
            info,
        });
        Ok(())
    }

    /// True when the provider under `e` has gone away.
    pub fn orphaned(stack: &Stack, e: &Export) -> bool {
        let pid = stack.consumer_provider(e.consumer);
        stack.get_provider(pid).is_none_or(|p| p.orphaned)
    }
}
