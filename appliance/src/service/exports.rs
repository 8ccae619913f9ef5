//! Exports: a provider served by a protocol under a name, whatever the
//! protocol. Each protocol's sessions see only its own exports, as the
//! slice of [`ExportInfo`] they index.

use super::protocols::{ExportOptions, Secret, CHAP_SECRET_MAX, CHAP_SECRET_MIN, PROTOCOLS};
use super::state::{self, Store};
use super::{MAX_PAYLOAD, SERVICE_CONN};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use geom::bio::ConsumerId;
use geom::stack::{Access, Stack};
use net::session::{ExportAccess, ExportInfo};

/// One export.
#[derive(Debug)]
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
    /// Where it keeps its persistent state, if it does.
    pub store: Option<Store>,
}

/// The cookie bit of a state store's bios (with the service's connection
/// number above and the export's place in the list below).
pub const STORE_COOKIE: u64 = 1 << 31;

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

/// The cookie of the state store of the export at `i` in the list.
pub fn store_cookie(i: usize) -> u64 {
    (SERVICE_CONN << 32) | STORE_COOKIE | (i as u64 & 0x7fff_ffff)
}

/// Opens `provider` as a state store.
fn open_store(stack: &mut Stack, provider: &str) -> Result<Store, String> {
    let c = stack
        .open(provider, Access::READ_WRITE)
        .map_err(|e| format!("aptpl {provider}: {e}"))?;
    let spec = &stack.provider(stack.consumer_provider(c)).spec;
    let (size, sector) = (spec.media_size, spec.sector_size);
    if size < state::STORE_BYTES
        || sector == 0
        || !state::SLOT_BYTES.is_multiple_of(u64::from(sector))
    {
        let _ = stack.close(c);
        return Err(format!(
            "aptpl {provider}: a state store needs {} KiB or more in sectors of 64 KiB or less              ({provider} has {size} bytes in {sector}-byte sectors)",
            state::STORE_BYTES >> 10
        ));
    }
    Ok(Store::new(provider, c, sector))
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

    /// Where the export a session of protocol `p` calls `index` is in the
    /// list.
    pub fn list_index(&self, p: usize, index: usize) -> Option<usize> {
        self.views[p].1.get(index).copied()
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
        if let Some(why) = self.state_conflict(provider, o.state.as_deref()) {
            return Err(format!("cannot export '{name}': {why}"));
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
            keeps_state: o.state.is_some(),
        };
        let store = match &o.state {
            None => None,
            Some(sp) => match open_store(stack, sp) {
                Ok(s) => Some(s),
                Err(why) => {
                    let _ = stack.close(consumer);
                    return Err(format!("cannot export '{name}': {why}"));
                }
            },
        };
        if let Some(s) = &store {
            s.load(stack, store_cookie(self.list.len()));
        }
        self.views[p].0.push(info.clone());
        self.views[p].1.push(self.list.len());
        self.list.push(Export {
            protocol: p,
            provider: String::from(provider),
            consumer,
            info,
            options: o,
            stats: ExportStats::default(),
            store,
        });
        Ok(())
    }

    /// Why a new export of `provider` keeping its state on `store` cannot
    /// be: a provider may not both serve and keep state.
    fn state_conflict(&self, provider: &str, store: Option<&str>) -> Option<String> {
        if store == Some(provider) {
            return Some(format!("{provider} cannot keep its own state"));
        }
        for e in &self.list {
            let kept = e.store.as_ref().map(|s| s.provider.as_str());
            if kept == Some(provider) {
                return Some(format!(
                    "{provider} keeps the state of export '{}'",
                    e.info.name
                ));
            }
            if store.is_some() && (kept == store || Some(e.provider.as_str()) == store) {
                return Some(format!(
                    "{} is used by export '{}' already",
                    store.unwrap_or_default(),
                    e.info.name
                ));
            }
        }
        None
    }

    /// The store of the export at `i` in the list.
    pub fn store_mut(&mut self, i: usize) -> Option<&mut Store> {
        self.list.get_mut(i)?.store.as_mut()
    }

    /// A store still loading (`Ok(false)`), every one loaded (`Ok(true)`),
    /// or the first that failed, with why.
    pub fn stores_loaded(&self) -> Result<bool, String> {
        let mut all = true;
        for e in &self.list {
            match e.store.as_ref().map(|s| &s.phase) {
                Some(state::Phase::Loading) => all = false,
                Some(state::Phase::Failed(why)) => {
                    return Err(format!("cannot export '{}': {why}", e.info.name))
                }
                _ => {}
            }
        }
        Ok(all)
    }

    /// Takes back the last export made (its store failed to load).
    pub fn pop_failed(&mut self, stack: &mut Stack) {
        let failed = self.list.last().is_some_and(|e| {
            matches!(
                e.store.as_ref().map(|s| &s.phase),
                Some(state::Phase::Failed(_))
            )
        });
        if !failed {
            return;
        }
        let Some(e) = self.list.pop() else {
            return;
        };
        let (infos, at) = &mut self.views[e.protocol];
        infos.pop();
        at.pop();
        let _ = stack.close(e.consumer);
        if let Some(s) = e.store {
            let _ = stack.close(s.consumer);
        }
    }

    /// True when the provider under `e` has gone away.
    pub fn orphaned(stack: &Stack, e: &Export) -> bool {
        let pid = stack.consumer_provider(e.consumer);
        stack.get_provider(pid).is_none_or(|p| p.orphaned)
    }
}
