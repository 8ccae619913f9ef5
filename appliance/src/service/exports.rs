//! Exports: a provider served by a protocol under a name, whatever the
//! protocol. Each protocol's sessions see only its own exports, as the
//! slice of [`ExportInfo`] they index.

use super::protocols::{ExportOptions, Secret, CHAP_SECRET_MAX, CHAP_SECRET_MIN, PROTOCOLS};
use super::MAX_PAYLOAD;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use geom::bio::ConsumerId;
use geom::stack::{Access, Stack};
use net::session::{ExportAccess, ExportInfo};

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
    /// What its `export` line said (checked against later exports).
    pub options: ExportOptions,
    /// Requests its sessions made (an iSCSI LUN's, an NBD export's).
    pub stats: ExportStats,
}

/// Requests the sessions of one export handed to the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Discards, write-zeroes and allocation queries.
    pub others: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
}

impl ExportStats {
    /// Counts one bio.
    pub fn count(&mut self, bio: &geom::bio::Bio) {
        use geom::bio::BioCmd;
        match bio.cmd {
            BioCmd::Read => {
                self.reads += 1;
                self.read_bytes += bio.length;
            }
            BioCmd::Write => {
                self.writes += 1;
                self.written_bytes += bio.length;
            }
            BioCmd::Flush => self.flushes += 1,
            _ => self.others += 1,
        }
    }
}

/// A CHAP user and secret as the engine takes them, reading a `-k NAME`
/// secret from the stack's secrets.
fn chap_pair(
    stack: &Stack,
    pair: &Option<(String, Secret)>,
) -> Result<Option<(String, String)>, String> {
    let Some((user, secret)) = pair else {
        return Ok(None);
    };
    let name = match secret {
        Secret::Given(s) => return Ok(Some((user.clone(), s.clone()))),
        Secret::Named(name) => name,
    };
    let bytes = stack
        .secret(name)
        .ok_or_else(|| format!("no secret named '{name}' (give it with --secret {name}=FILE)"))?;
    let text = core::str::from_utf8(bytes)
        .map_err(|_| format!("secret '{name}' is not UTF-8 text (a CHAP secret must be)"))?;
    if !(CHAP_SECRET_MIN..=CHAP_SECRET_MAX).contains(&text.len()) {
        return Err(format!(
            "secret '{name}' is {} bytes; a CHAP secret is {CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} \
             (its file's bytes exactly: write it without a newline)",
            text.len()
        ));
    }
    Ok(Some((user.clone(), String::from(text))))
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

    /// The same, to count its requests.
    pub fn get_mut(&mut self, p: usize, index: usize) -> Option<&mut Export> {
        let i = *self.views[p].1.get(index)?;
        self.list.get_mut(i)
    }

    /// Opens `provider` and serves it over protocol `p` as `name`, or as
    /// the name in `o` when the protocol gave one.
    pub fn add(
        &mut self,
        stack: &mut Stack,
        p: usize,
        name: &str,
        provider: &str,
        o: ExportOptions,
    ) -> Result<(), String> {
        let name = o.name.as_deref().unwrap_or(name);
        if self.views[p].0.iter().any(|i| i.name == name) {
            return Err(format!("export '{name}' exists already"));
        }
        if let Some(conflict) = PROTOCOLS[p].export_conflict {
            let mine = self.list.iter().filter(|e| e.protocol == p);
            if let Some(why) = mine.into_iter().find_map(|e| conflict(&o, &e.options)) {
                return Err(format!("cannot export '{name}': {why}"));
            }
        }
        let access = ExportAccess {
            chap: chap_pair(stack, &o.access.chap)?,
            mutual: chap_pair(stack, &o.access.mutual)?,
            initiators: o.access.initiators.clone(),
        };
        if let (Some((_, a)), Some((_, b))) = (&access.chap, &access.mutual) {
            if a == b {
                return Err(format!(
                    "cannot export '{name}': the mutual secret must differ from the chap one"
                ));
            }
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
            access,
        };
        self.views[p].0.push(info.clone());
        self.views[p].1.push(self.list.len());
        self.list.push(Export {
            protocol: p,
            provider: String::from(provider),
            consumer,
            info,
            options: o,
            stats: ExportStats::default(),
        });
        Ok(())
    }

    /// True when the provider under `e` has gone away.
    pub fn orphaned(stack: &Stack, e: &Export) -> bool {
        let pid = stack.consumer_provider(e.consumer);
        stack.get_provider(pid).is_none_or(|p| p.orphaned)
    }
}
