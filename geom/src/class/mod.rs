//! The classes, and the registry that makes them known: each class is one
//! module (a file, or a folder for a big one) that owns its config verbs,
//! its `/geom` and `/status` sections, its tasting and its metadata. The
//! rest of the crate reaches a class only through [`Class`] and the
//! [`Command`]s it parses.
//!
//! To add a class, copy `nop.rs` (pass-through, no metadata) or
//! `concat.rs` (several members, metadata, tasting) and add its name to
//! the `classes!` line below; `docs/writing-a-class.md` walks through it.

use crate::bio::{GeomId, ProviderId};
use crate::config::{Args, ConfigError};
use crate::ctl::{self, CtlError};
use crate::meta::{MetaRepr, PARAMS, TAIL_LEN};
use crate::stack::{ProviderSpec, Stack, StackError};
use crate::taste::{all_present, Member, TasteAction};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt::Debug;

/// Declares the class modules and [`CLASSES`], in the order lists show
/// them: one name per class, each module holding a `pub static CLASS`.
macro_rules! classes {
    ($($name:ident),* $(,)?) => {
        $(pub mod $name;)*
        /// Every class, in the order `/geom` and error messages list them.
        pub static CLASSES: &[&dyn Class] = &[$(&$name::CLASS),*];
    };
}

classes!(md, nop, concat, stripe, mirror, raid5, part, eli, gbde);

/// The registered class called `name`.
pub fn find(name: &str) -> Option<&'static dyn Class> {
    CLASSES.iter().copied().find(|c| c.name() == name)
}

/// A GEOM class: its config verbs, how it tastes and assembles from
/// metadata, and what it adds to `/status`. Classes are stateless values
/// (their state lives in their geoms), one `static` each.
pub trait Class: Sync {
    /// The class name, as written in config lines and in metadata.
    fn name(&self) -> &'static str;

    /// Parses the rest of a `CLASS VERB ...` line (the cursor is after the
    /// class word) into the command that carries it out. Errors point at
    /// the word at fault; `args` has the helpers for the usual shapes.
    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError>;

    /// Decides whether `provider`, whose last sector holds `meta` naming
    /// this class, is a member. The default accepts it when the provider's
    /// size and sector size are the ones recorded at label time.
    fn taste(&self, stack: &Stack, provider: ProviderId, meta: &MetaRepr) -> TasteAction {
        let spec = &stack.provider(provider).spec;
        if spec.media_size == meta.member_size && spec.sector_size == meta.sector_size {
            TasteAction::Member
        } else {
            TasteAction::Ignore
        }
    }

    /// Whether the members gathered so far (one per index; of equal index
    /// the highest generation is kept) are enough to assemble. `settled`
    /// is true once no taste read is outstanding. The default wants all.
    fn ready(&self, members: &[Member], settled: bool) -> bool {
        let _ = settled;
        all_present(members)
    }

    /// Builds the geom from its members (sorted by member index). The
    /// default refuses: a class without metadata never gets here.
    fn assemble(&self, stack: &mut Stack, members: &[Member]) -> Result<GeomId, StackError> {
        let _ = (stack, members);
        Err(StackError::Invalid(format!(
            "class {} does not assemble from metadata",
            self.name()
        )))
    }

    /// A member of a geom that is already live (assembled, or labelled
    /// in this session: any live geom of this class with the record's
    /// name, so compare `member.meta.id` if it matters) has appeared. The
    /// default ignores it (the same disk seen through a pass-through geom,
    /// for instance).
    fn join(&self, stack: &mut Stack, geom: GeomId, member: Member) {
        let _ = (stack, geom, member);
    }

    /// A provider that may hold data appeared (at boot, or live; not a
    /// fresh md): a class that recognises
    /// providers by an on-disk format of its own (a partition table)
    /// starts probing it here, with a geom of its own that reads through
    /// its consumer and reports [`crate::stack::Geom::settling`] until it
    /// knows (then serves, or withers). The default does nothing.
    fn offer(&self, stack: &mut Stack, provider: ProviderId) {
        let _ = (stack, provider);
    }

    /// The class's section of `/status`, as `(key, value)` (mirror:
    /// `"mirrors"` and the state of each), or `None` for none.
    fn status(&self, stack: &Stack) -> Option<(&'static str, serde_json::Value)> {
        let _ = stack;
        None
    }
}

/// Comparison and downcasting for [`Command`] trait objects; implemented
/// for every `'static` type with `PartialEq`.
pub trait CommandAny {
    /// The command as `Any`, for downcasting.
    fn as_any(&self) -> &dyn Any;
    /// True when `other` is a command of the same type and value.
    fn eq_any(&self, other: &dyn Any) -> bool;
}

impl<T: Any + PartialEq> CommandAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn eq_any(&self, other: &dyn Any) -> bool {
        other.downcast_ref::<T>() == Some(self)
    }
}

/// A parsed class statement, ready to be carried out on a live stack (at
/// boot and from `POST /geom` alike).
pub trait Command: CommandAny + Debug + Send + Sync {
    /// Carries the statement out. Metadata I/O it starts (labels, tasting
    /// of new providers) completes later as events of the stack, which
    /// [`crate::ctl`] waits for without holding the loop.
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError>;

    /// The provider the statement creates and the word of the line that
    /// names it (so a file cannot define a provider twice).
    fn creates(&self) -> Option<(String, String)> {
        None
    }

    /// The provider the statement removes (freeing its name for a later
    /// line of the same file).
    fn destroys(&self) -> Option<String> {
        None
    }

    /// At boot: true when what the statement would write is on the disks
    /// already and tasting has found it (a `mirror label` line on the
    /// second boot), so the line is skipped instead of labelling again.
    /// A live change (`POST /geom`) never asks.
    fn on_disk(&self, _stack: &mut Stack) -> bool {
        false
    }

    /// Providers the statement consumes as they are, without metadata of
    /// its own on them (`nop create vtbd0` consumes vtbd0): at boot they
    /// are claimed ([`Stack::claim`]) so tasting builds nothing over them.
    /// A `label` line's members are not listed: tasting is what brings
    /// its geom back.
    fn consumes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// `CLASS destroy [-f] NAME`: removes a geom; refused while its provider
/// is open unless `-f`, which orphans it under its users (FreeBSD's
/// `geom CLASS destroy -f`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destroy {
    /// Class name.
    pub class: &'static str,
    /// Geom name (for md and nop: the provider name).
    pub name: String,
    /// `-f`.
    pub force: bool,
    /// The provider it removes.
    pub provider: String,
}

impl Destroy {
    /// Parses `[-f] NAME` after `destroy`; `provider` names the provider
    /// of the geom called NAME.
    pub fn parse(
        class: &'static str,
        args: &mut Args<'_>,
        provider: impl Fn(&str) -> String,
    ) -> Result<Arc<dyn Command>, ConfigError> {
        let mut force = false;
        if let Some(w) = args.option() {
            if w.text != "-f" {
                return Err(args.err(
                    w.column,
                    format!("unknown destroy option '{}' (expected -f)", w.text),
                ));
            }
            force = true;
        }
        let name = args.name(&format!("{class} name"))?;
        args.finish()?;
        Ok(Arc::new(Destroy {
            class,
            provider: provider(&name),
            name,
            force,
        }))
    }
}

impl Command for Destroy {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let g = ctl::geom(stack, self.class, &self.name)?;
        stack.destroy_geom(g, self.force)?;
        Ok(())
    }

    fn destroys(&self) -> Option<String> {
        Some(self.provider.clone())
    }
}

/// `CLASS clear PROVIDER...`: wipes the metadata sector of providers
/// (gstripe(8)'s `clear`), refused while one is open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clear {
    /// Class name.
    pub class: &'static str,
    /// Providers whose last sector is zeroed.
    pub providers: Vec<String>,
}

impl Clear {
    /// Parses `PROVIDER...` after `clear`.
    pub fn parse(
        class: &'static str,
        args: &mut Args<'_>,
    ) -> Result<Arc<dyn Command>, ConfigError> {
        Ok(Arc::new(Clear {
            class,
            providers: args.providers(1)?,
        }))
    }
}

impl Command for Clear {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let ids = self
            .providers
            .iter()
            .map(|p| ctl::provider(stack, p))
            .collect::<Result<Vec<_>, _>>()?;
        for (&p, name) in ids.iter().zip(&self.providers) {
            if !stack.provider(p).access.is_zero() {
                return Err(CtlError::Stack(StackError::Busy(name.clone())));
            }
        }
        for p in ids {
            stack.write_meta(p, None)?;
        }
        Ok(())
    }
}

/// What [`member_verb`] read.
pub enum MemberVerb<'a> {
    /// `create` (`label: false`) or `label`: the class reads its options,
    /// name and members next; `verb` is the word, for errors.
    Create {
        /// Write metadata (`label`) or not (`create`).
        label: bool,
        /// The verb word.
        verb: crate::config::Word<'a>,
    },
    /// `destroy` or `clear`, parsed.
    Parsed(Arc<dyn Command>),
    /// Another verb, for the class to handle or refuse with
    /// [`unknown_verb`].
    Other(crate::config::Word<'a>),
}

/// Reads the verb of a class over several members (concat, stripe,
/// mirror): `create|label`, `destroy [-f] NAME` (provider `CLASS/NAME`) and
/// `clear PROVIDER...` are common to them; `verbs` lists them all for the
/// error on a missing verb.
pub fn member_verb<'a>(
    class: &'static str,
    args: &mut Args<'a>,
    verbs: &str,
) -> Result<MemberVerb<'a>, ConfigError> {
    let verb = args.next(&format!("a {class} verb ({verbs})"))?;
    Ok(match verb.text {
        "create" => MemberVerb::Create { label: false, verb },
        "label" => MemberVerb::Create { label: true, verb },
        "destroy" => MemberVerb::Parsed(Destroy::parse(class, args, |n| format!("{class}/{n}"))?),
        "clear" => MemberVerb::Parsed(Clear::parse(class, args)?),
        _ => MemberVerb::Other(verb),
    })
}

/// The error for a verb a class does not have.
pub fn unknown_verb(
    args: &Args<'_>,
    class: &str,
    verb: &crate::config::Word<'_>,
    verbs: &str,
) -> ConfigError {
    args.err(
        verb.column,
        format!("unknown {class} verb '{}' (expected {verbs})", verb.text),
    )
}

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
            tail: [0; TAIL_LEN],
        };
        stack.write_meta(*p, Some(&m))?;
    }
    Ok(())
}

/// A class's `/status` list: for each of its geoms, `name` and the object
/// `section` picks out of the geom's dumpconf.
pub fn status_list(
    stack: &Stack,
    class: &str,
    section: impl Fn(serde_json::Value) -> Option<serde_json::Map<String, serde_json::Value>>,
) -> serde_json::Value {
    let list = stack
        .geoms()
        .filter(|&g| stack.geom_class(g) == class)
        .map(|g| {
            let mut v = serde_json::Map::new();
            v.insert("name".into(), stack.geom_name(g).into());
            if let Some(conf) = section(stack.dumpconf(g)) {
                v.extend(conf);
            }
            serde_json::Value::Object(v)
        })
        .collect();
    serde_json::Value::Array(list)
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

/// Helpers for the classes' parser tests.
#[cfg(test)]
pub(crate) mod parse_test {
    use crate::config::{parse_line, GeomStatement, Statement};
    use alloc::string::String;

    /// The class statement of `line`, which must parse.
    pub fn one(line: &str) -> GeomStatement {
        match parse_line(line, 1) {
            Ok(Some(Statement::Geom(g))) => g,
            other => panic!("{line}: {other:?}"),
        }
    }

    /// The command of `line` as a `T`.
    pub fn cmd<T: Clone + 'static>(line: &str) -> T {
        one(line)
            .downcast::<T>()
            .unwrap_or_else(|| panic!("{line}: another command"))
            .clone()
    }

    /// The column and message of the error on `line` (as line 3).
    pub fn err(line: &str) -> (usize, String) {
        let e = parse_line(line, 3).unwrap_err();
        assert_eq!(e.line, 3);
        (e.column, e.message)
    }
}
