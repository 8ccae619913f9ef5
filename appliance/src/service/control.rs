//! Config lines as jobs of the loop: the boot config, and the lines of
//! each `POST /geom`, one job at a time in arrival order.
//!
//! ```text
//!  job: [line 1] [line 2] …      each line: start (geom: ctl::start; export;
//!          │                       net) ─▶ Settling: its metadata I/O and
//!          ▼                       tasting go on as events; poll checks it
//!   poll ─▶ line done? ─▶ next line … ─▶ job done: boot → serving,
//!                                        POST /geom → its JSON answer
//! ```
//!
//! Nothing waits by spinning: while a mirror is labelled, every other
//! connection keeps being served, and the `POST /geom` that asked for it
//! gets its answer once the labels are on the disks.

use super::protocols::{self, PROTOCOLS};
use super::{ConnId, Phase, Service, DEFAULT_MD_BYTES};
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use geom::class::md::MdGeom;
use geom::config::{Config, ConfigError, Line, Statement};
use geom::ctl::{self, Settling};
use net::session::ControlResponse;
use serde_json::{json, Value};

/// Why a live change (`POST /geom`) stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveError {
    /// The line and column at fault, and what is wrong.
    pub error: ConfigError,
    /// How many statements before it were applied.
    pub applied: usize,
}

/// The 1-based column an error on line `line` of `text` points at: the
/// last word the message quotes that the line has (`cannot export 'x': no
/// provider named 'vtbd9'` points at `vtbd9`), else the line's first word.
fn error_column(text: &str, line: usize, message: &str) -> usize {
    let Some(l) = text.lines().nth(line.saturating_sub(1)) else {
        return 1;
    };
    let words = geom::config::args::words(l);
    let quoted: Vec<&str> = message.split('\'').skip(1).step_by(2).collect();
    quoted
        .iter()
        .rev()
        .find_map(|q| words.iter().find(|w| w.text == *q).map(|w| w.column))
        .or(words.first().map(|w| w.column))
        .unwrap_or(1)
}

/// Points a configuration error found while running the config (whose
/// column is 1) at the word of `text` it is about.
pub fn locate_error(text: &str, e: ConfigError) -> ConfigError {
    let column = error_column(text, e.line, &e.message);
    ConfigError { column, ..e }
}

/// Who asked for a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// The boot config.
    Boot,
    /// A `POST /geom` on this connection.
    Live(ConnId),
}

/// A line started, waiting for its I/O.
struct Running {
    settling: Settling,
    before: Vec<(String, bool)>,
}

/// One job: config lines carried out in order.
struct Job {
    origin: Origin,
    /// The request body (for error columns); empty at boot.
    text: String,
    lines: Vec<Line>,
    /// Index of the line being carried out.
    next: usize,
    running: Option<Running>,
    /// Boot: the disks' tasting has settled.
    tasted: bool,
    results: Vec<Value>,
    /// The boot config names exports (else the defaults apply).
    has_exports: bool,
}

/// The queue of jobs.
#[derive(Default)]
pub struct Control {
    jobs: VecDeque<Job>,
}

impl Control {
    /// Queues the boot config.
    pub fn boot(&mut self, config: Config) {
        self.jobs.push_back(Job {
            origin: Origin::Boot,
            text: String::new(),
            has_exports: config.has_exports(),
            lines: config.lines,
            next: 0,
            running: None,
            tasted: false,
            results: Vec::new(),
        });
    }

    /// Queues the lines of a `POST /geom` from connection `conn`.
    fn live(&mut self, conn: ConnId, text: String, config: Config) {
        self.jobs.push_back(Job {
            origin: Origin::Live(conn),
            text,
            has_exports: true,
            lines: config.lines,
            next: 0,
            running: None,
            tasted: true,
            results: Vec::new(),
        });
    }
}

/// Every provider's name and whether it is alive (not orphaned).
fn provider_states(svc: &Service) -> Vec<(String, bool)> {
    svc.stack
        .providers()
        .map(|(_, p)| (p.spec.name.clone(), !p.orphaned))
        .collect()
}

/// What one applied line did, for the `POST /geom` answer.
fn line_result(line: &Line, before: &[(String, bool)], after: &[(String, bool)]) -> Value {
    let was_alive = |n: &str| before.iter().any(|(m, ok)| m == n && *ok);
    let created: Vec<&str> = after
        .iter()
        .filter(|(n, ok)| *ok && !was_alive(n))
        .map(|(n, _)| n.as_str())
        .collect();
    let orphaned: Vec<&str> = after
        .iter()
        .filter(|(n, ok)| !*ok && was_alive(n))
        .map(|(n, _)| n.as_str())
        .collect();
    let removed: Vec<&str> = before
        .iter()
        .filter(|(n, _)| !after.iter().any(|(m, _)| m == n))
        .map(|(n, _)| n.as_str())
        .collect();
    let mut v = json!({
        "line": line.line,
        "created": created,
        "orphaned": orphaned,
        "removed": removed,
    });
    if let (Statement::Export(e), Value::Object(m)) = (&line.stmt, &mut v) {
        m.insert("exported".into(), e.name.clone().into());
    }
    v
}

impl Service {
    /// Parses a `POST /geom` body and queues it; a syntax error applies
    /// nothing and is answered at once.
    pub(super) fn start_live(&mut self, conn: ConnId, body: &[u8]) -> Option<ControlResponse> {
        let parsed = core::str::from_utf8(body)
            .map_err(|e| ConfigError {
                line: body[..e.valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1,
                column: 1,
                message: String::from("the request body is not UTF-8 text"),
            })
            .and_then(|text| {
                let config = super::parse_config(text)?;
                if config.lines.is_empty() {
                    return Err(ConfigError {
                        line: 1,
                        column: 1,
                        message: String::from("no statement given"),
                    });
                }
                Ok((String::from(text), config))
            });
        match parsed {
            Ok((text, config)) => {
                self.control.live(conn, text, config);
                None
            }
            Err(error) => Some(live_error(&LiveError { error, applied: 0 })),
        }
    }

    /// Carries out one line of the job at the head of the queue (or checks
    /// the one running); true on progress.
    pub(super) fn run_control(&mut self) -> bool {
        let mut progress = false;
        loop {
            let Some(job) = self.control.jobs.front_mut() else {
                return progress;
            };
            if !job.tasted {
                match Settling::now(&self.stack).check(&self.stack) {
                    None => return progress,
                    Some(_) => job.tasted = true,
                }
            }
            if job.running.is_some() {
                // An export's state store loads before the line is done.
                let i = job.next;
                match self.exports.stores_loaded() {
                    Ok(true) => {}
                    Ok(false) => return progress,
                    Err(why) => {
                        self.exports.pop_failed(&mut self.stack);
                        self.end_job(Err(LiveError {
                            error: self.line_error(i, &why),
                            applied: i,
                        }));
                        return true;
                    }
                }
            }
            let Some(job) = self.control.jobs.front_mut() else {
                return progress;
            };
            if let Some(run) = &job.running {
                let Some(r) = run.settling.check(&self.stack) else {
                    return progress;
                };
                let run = job.running.take().expect("running line");
                let i = job.next;
                if let Err(e) = r {
                    self.end_job(Err(LiveError {
                        error: self.line_error(i, &e.to_string()),
                        applied: i,
                    }));
                    return true;
                }
                let after = provider_states(self);
                let job = self.control.jobs.front_mut().expect("job");
                let v = line_result(&job.lines[i], &run.before, &after);
                job.results.push(v);
                job.next += 1;
                progress = true;
                continue;
            }
            if job.next == job.lines.len() {
                self.end_job(Ok(()));
                return true;
            }
            progress = true;
            let i = job.next;
            let line = job.lines[i].clone();
            let origin = job.origin;
            let before = provider_states(self);
            let started = match &line.stmt {
                Statement::Export(e) => protocols::check_export(line.line, e)
                    .map_err(|e| e.message)
                    .and_then(|(p, o)| {
                        self.exports
                            .add(&mut self.stack, p, &e.name, &e.provider, o)
                    })
                    .map(|()| Settling::now(&self.stack)),
                Statement::Net(_) if origin == Origin::Boot => Ok(Settling::now(&self.stack)),
                Statement::Net(_) => Err(String::from(
                    "network settings apply at boot only (put them in the config file)",
                )),
                stmt if origin == Origin::Boot && ctl::on_disk(&mut self.stack, stmt) => {
                    log::info!(
                        "config line {}: on disk already (found by tasting), skipped",
                        line.line
                    );
                    Ok(Settling::now(&self.stack))
                }
                stmt => ctl::start(&mut self.stack, stmt).map_err(|e| e.to_string()),
            };
            match started {
                Ok(settling) => {
                    let job = self.control.jobs.front_mut().expect("job");
                    job.running = Some(Running { settling, before });
                }
                Err(message) => {
                    self.end_job(Err(LiveError {
                        error: self.line_error(i, &message),
                        applied: i,
                    }));
                    return true;
                }
            }
        }
    }

    /// The error for line `i` of the current job, pointed at its word.
    fn line_error(&self, i: usize, message: &str) -> ConfigError {
        let job = self.control.jobs.front().expect("job");
        let line = job.lines[i].line;
        ConfigError {
            line,
            column: if job.text.is_empty() {
                1
            } else {
                error_column(&job.text, line, message)
            },
            message: String::from(message),
        }
    }

    /// Ends the job at the head of the queue with `result`.
    fn end_job(&mut self, result: Result<(), LiveError>) {
        let Some(job) = self.control.jobs.pop_front() else {
            return;
        };
        match job.origin {
            Origin::Boot => {
                self.phase = match result.and_then(|()| {
                    self.default_exports(job.has_exports)
                        .map_err(|error| LiveError { error, applied: 0 })
                }) {
                    Ok(()) => Phase::Serving,
                    Err(e) => Phase::Failed(e.error),
                };
            }
            Origin::Live(conn) => {
                let resp = match result {
                    Ok(()) => {
                        let mut body = json!({
                            "applied": job.lines.len(),
                            "results": job.results,
                        })
                        .to_string();
                        body.push('\n');
                        ControlResponse::new(200, "application/json", body)
                    }
                    Err(e) => live_error(&e),
                };
                if let Some(s) = self.session_mut(conn) {
                    s.respond(resp);
                }
            }
        }
    }

    /// With no export in the boot config: every disk under its own name
    /// over the first protocol that serves exports, or a 256 MiB md0 when
    /// there is no disk (less, to the MiB, where memory disks may not
    /// have that much).
    fn default_exports(&mut self, has_exports: bool) -> Result<(), ConfigError> {
        if has_exports {
            return Ok(());
        }
        let err = |message: String| ConfigError {
            line: 0,
            column: 1,
            message,
        };
        let Some(p) = PROTOCOLS.iter().position(|p| p.export_options.is_some()) else {
            return Ok(());
        };
        let names: Vec<String> = if self.disks.is_empty() {
            let room = self.stack.data_memory_limit().unwrap_or(u64::MAX);
            let size = DEFAULT_MD_BYTES.min(room & !((1 << 20) - 1)).max(1 << 20);
            MdGeom::create(&mut self.stack, "md0", size).map_err(|e| err(format!("{e}")))?;
            alloc::vec![String::from("md0")]
        } else {
            self.disks.iter().map(|d| d.0.clone()).collect()
        };
        for n in names {
            self.exports
                .add(&mut self.stack, p, &n, &n, Default::default())
                .map_err(err)?;
        }
        Ok(())
    }
}

/// The 400 answer to a refused `POST /geom`.
fn live_error(e: &LiveError) -> ControlResponse {
    let mut body = json!({
        "error": e.error.to_string(),
        "line": e.error.line,
        "column": e.error.column,
        "applied": e.applied,
    })
    .to_string();
    body.push('\n');
    ControlResponse::new(400, "application/json", body)
}
