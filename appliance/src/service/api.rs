//! The management API: what each request of the management endpoint does.
//!
//! | request | answer |
//! |---|---|
//! | `GET /status` | [`Service::status_json`] |
//! | `GET /metrics` | [`Service::metrics`] |
//! | `GET /geom` | the topology ([`geom::ctl::topology`]) |
//! | `POST /geom` | config lines, run as a job ([`super::control`]) |
//! | `POST /shutdown` | flush every writable export, answer, stop |
//!
//! Every request but a read needs the management token ([`super::auth`]):
//! without it the answer is 401 and nothing changes.

use super::{ConnId, Service};
use alloc::string::ToString;
use net::session::{ControlRequest, ControlResponse};

impl Service {
    /// Answers a management request, or returns `None` when the answer
    /// comes later (a `POST /geom` whose lines are running).
    pub(super) fn handle_control(
        &mut self,
        conn: ConnId,
        req: ControlRequest,
    ) -> Option<ControlResponse> {
        let json =
            |body: alloc::string::String| ControlResponse::new(200, "application/json", body);
        if let Err(why) = self.auth.check(&req.method, req.bearer.as_deref()) {
            return Some(ControlResponse::error(401, why));
        }
        Some(match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/status") => json(self.status_json()),
            ("GET", "/metrics") => {
                ControlResponse::new(200, "text/plain; version=0.0.4", self.metrics())
            }
            ("POST", "/shutdown") => {
                self.begin_shutdown();
                let mut body = serde_json::json!({"shutdown": true}).to_string();
                body.push('\n');
                json(body)
            }
            ("GET", "/geom") => {
                let mut body = geom::ctl::topology(&self.stack).to_string();
                body.push('\n');
                json(body)
            }
            ("POST", "/geom") => return self.start_live(conn, &req.body),
            (_, "/status" | "/metrics" | "/shutdown" | "/geom") => {
                ControlResponse::error(405, "method not allowed")
            }
            _ => ControlResponse::error(404, "not found"),
        })
    }
}
