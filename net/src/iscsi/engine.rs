//! One iSCSI connection's state machine (RFC 7143), over byte slices.

use crate::session::{ExportInfo, Session, TxPieces, Work};
use geom::page::DataCounters;

/// Limits for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Most commands outstanding at once (the CmdSN window).
    pub max_in_flight: usize,
    /// A connection that holds payload pages and moves no byte for this
    /// many milliseconds is dropped (0: never).
    pub stall_timeout_ms: u64,
    /// A command's pages wait for the service's global budget.
    pub budgeted: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_in_flight: 64, stall_timeout_ms: 60_000, budgeted: false }
    }
}

/// One iSCSI connection (its session, since a session has one connection).
pub struct Connection {
    counters: DataCounters,
    closed: bool,
}

impl Connection {
    /// A connection waiting for its first login request.
    pub fn new(config: Config) -> Connection {
        let _ = config;
        Connection { counters: DataCounters::new(), closed: false }
    }
}

impl Session for Connection {
    fn recv(&mut self, _exports: &[ExportInfo], _data: &[u8]) -> usize {
        self.closed = true;
        0
    }
    fn tx_pieces<'a>(&'a mut self, _out: &mut TxPieces<'a>, _max_bytes: usize) {}
    fn tx_advance(&mut self, _n: usize) {}
    fn next_work(&mut self) -> Option<Work> {
        None
    }
    fn input_closed(&mut self) {
        self.closed = true;
    }
    fn shutdown(&mut self) {
        self.closed = true;
    }
    fn wants_recv(&self) -> bool {
        !self.closed
    }
    fn has_tx(&self) -> bool {
        false
    }
    fn is_finished(&self) -> bool {
        self.closed
    }
    fn counters(&self) -> &DataCounters {
        &self.counters
    }
}
