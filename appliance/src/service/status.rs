//! The `/status` document: what is served and how it is doing, for
//! operators and monitoring. Each class may add its own section (mirror:
//! `"mirrors"`), through [`geom::class::Class::status`].

use super::exports::Exports;
use super::{Service, PROTOCOLS, VERSION};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::{json, Map, Value};

impl Service {
    /// The `/status` document.
    pub fn status_json(&self) -> String {
        let st = (self.platform)();
        let mut doc = Map::new();
        doc.insert("version".into(), VERSION.into());
        doc.insert("platform".into(), st.platform.into());
        doc.insert("uptime_ms".into(), st.uptime_ms.into());
        doc.insert(
            "memory".into(),
            json!({
                "total_bytes": st.memory_total_bytes,
                "used_bytes": st.memory_used_bytes,
                "payload_budget_bytes": self.budget.limit(),
                "payload_in_use_bytes": self.payload_in_use(),
                "payload_waiting": self.budget.waiting(),
                "md_limit_bytes": self.limits.md_memory_bytes,
                "md_committed_bytes": geom::class::md::committed_bytes(&self.stack),
            }),
        );
        let disks: Vec<Value> = self
            .disks
            .iter()
            .map(|(name, size)| {
                // A disk the stack gave up on says why (its device hung
                // past the bio deadline, or asked for a reset).
                let failed = self
                    .stack
                    .find_geom("disk", name)
                    .map(|g| self.stack.dumpconf(g)["failed"].clone())
                    .unwrap_or(Value::Null);
                let orphaned = self
                    .stack
                    .find_provider(name)
                    .is_none_or(|p| self.stack.provider(p).orphaned);
                json!({
                    "name": name,
                    "size_bytes": size,
                    "state": if orphaned { "failed" } else { "ok" },
                    "failed": failed,
                })
            })
            .collect();
        doc.insert("disks".into(), disks.into());
        let providers: Vec<Value> = self
            .stack
            .providers()
            .map(|(_, p)| {
                json!({
                    "name": p.spec.name,
                    "class": self.stack.geom_class(p.geom),
                    "size_bytes": p.spec.media_size,
                    "sector_size": p.spec.sector_size,
                    "access": alloc::format!("r{}w{}e{}", p.access.r, p.access.w, p.access.e),
                    "state": if p.orphaned { "orphaned" } else { "ok" },
                })
            })
            .collect();
        doc.insert("providers".into(), providers.into());
        let exports: Vec<Value> = self
            .exports
            .all()
            .iter()
            .map(|e| {
                json!({
                    "name": e.info.name,
                    "provider": e.provider,
                    "size_bytes": e.info.size_bytes,
                    "read_only": e.info.read_only,
                    "state": if Exports::orphaned(&self.stack, e) { "orphaned" } else { "ok" },
                    "protocol": PROTOCOLS[e.protocol].name,
                })
            })
            .collect();
        doc.insert("exports".into(), exports.into());
        let dead_providers: Vec<&str> = self
            .stack
            .providers()
            .filter(|(_, p)| p.orphaned)
            .map(|(_, p)| p.spec.name.as_str())
            .collect();
        let dead_exports: Vec<&str> = self
            .exports
            .all()
            .iter()
            .filter(|e| Exports::orphaned(&self.stack, e))
            .map(|e| e.info.name.as_str())
            .collect();
        doc.insert(
            "orphaned".into(),
            json!({"providers": dead_providers, "exports": dead_exports}),
        );
        for class in geom::class::CLASSES {
            if let Some((key, v)) = class.status(&self.stack) {
                doc.insert(key.into(), v);
            }
        }
        let waiting: Vec<Value> = self
            .stack
            .incomplete_geoms()
            .into_iter()
            .map(|(class, name, have, want)| {
                json!({"class": class, "name": name, "members": have, "of": want})
            })
            .collect();
        doc.insert("waiting".into(), waiting.into());
        let refused: Vec<Value> = self
            .stack
            .refused_tastes()
            .iter()
            .map(|r| json!({"provider": r.provider, "class": r.class, "reason": r.reason}))
            .collect();
        doc.insert("taste".into(), refused.into());
        let mut conns = Map::new();
        for (i, p) in PROTOCOLS.iter().enumerate() {
            conns.insert(p.name.into(), self.connections(i).into());
        }
        doc.insert("connections".into(), conns.into());
        let sessions: Vec<Value> = self
            .sessions
            .values()
            .filter_map(|s| {
                let p = s.session.peer()?;
                Some(json!({
                    "protocol": PROTOCOLS[s.protocol].name,
                    "client": p.client,
                    "export": p.export,
                    "session": p.session,
                }))
            })
            .collect();
        doc.insert("sessions".into(), sessions.into());
        let mut s = Value::Object(doc).to_string();
        s.push('\n');
        s
    }
}
