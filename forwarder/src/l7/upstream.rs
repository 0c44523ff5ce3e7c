//! Each worker's idle connections to servers, kept for reuse (keep-alive to upstreams).
//!
//! Worker-local: only the worker's own tasks touch it, so it needs no lock. Connections go
//! back only after a complete exchange that left them clean; they are taken most recently
//! used first (the warmest, least likely to have been closed by the server), checked open
//! before reuse, and swept when idle too long or when their server leaves the rotation
//! (drained, disabled, removed), so a drain closes idle connections within one sweep.

use std::{
    cell::RefCell,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use super::{
    io::{Conn, turn_clock},
    snapshot::{L7Snapshot, ServerStats},
};

/// A connection to a server, counted in its server's open connections for as long as it
/// lives, in use or idle in the pool.
pub struct UpstreamConn {
    conn: Conn,
    stats: Arc<ServerStats>,
}

impl UpstreamConn {
    /// `conn`, just opened to the server `stats` counts.
    pub fn opened(conn: Conn, stats: &Arc<ServerStats>) -> UpstreamConn {
        stats.connections.fetch_add(1, Ordering::Relaxed);
        stats.open_connections.fetch_add(1, Ordering::Relaxed);
        UpstreamConn {
            conn,
            stats: Arc::clone(stats),
        }
    }
}

impl UpstreamConn {
    /// Closes the connection with a reset: the server had part of a request that will never
    /// be whole, and must not take a clean end for the end of it (a lenient server might act
    /// on a truncated body).
    pub fn abort(self) {
        self.conn.reset_on_close();
    }
}

impl std::ops::Deref for UpstreamConn {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl Drop for UpstreamConn {
    fn drop(&mut self) {
        self.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long an idle connection is reused for a retryable request without checking it first.
const TRUST_IDLE: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct UpstreamPool {
    /// By server address, with when each went idle (on the worker's turn clock). Hashed with
    /// foldhash, not SipHash: it is looked up twice per request, and its keys are the
    /// operator's server addresses, which no client chooses.
    idle: RefCell<foldhash::HashMap<SocketAddr, Vec<(UpstreamConn, Instant)>>>,
}

impl UpstreamPool {
    /// An idle connection to `server` that is still usable, if any.
    ///
    /// A connection idle longer than [`TRUST_IDLE`], or any connection when the request
    /// could not be retried, is first checked open (a `recv(MSG_PEEK)` syscall); a request
    /// that can be retried skips the check on a recently used connection, since a server
    /// closing it meanwhile costs only a retry.
    pub fn take(
        &self,
        server: SocketAddr,
        max_idle: Duration,
        retryable: bool,
    ) -> Option<UpstreamConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&server)?;
        let now = turn_clock();
        while let Some((conn, since)) = list.pop() {
            let age = now.saturating_duration_since(since);
            if age >= max_idle {
                continue;
            }
            if (retryable && age < TRUST_IDLE) || conn.is_idle_and_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for reuse, unless `server` already has `limit` idle connections.
    pub fn put(&self, server: SocketAddr, conn: UpstreamConn, limit: usize) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(server).or_default();
        if list.len() < limit {
            list.push((conn, turn_clock()));
        }
    }

    /// Closes connections idle longer than `max_idle` and those to servers that take no
    /// new requests in `snapshot`.
    pub fn sweep(&self, snapshot: &L7Snapshot, max_idle: Duration) {
        let mut idle = self.idle.borrow_mut();
        let now = turn_clock();
        idle.retain(|address, list| {
            if !snapshot.reusable.contains(address) {
                return false;
            }
            list.retain(|(_, since)| now.saturating_duration_since(*since) < max_idle);
            !list.is_empty()
        });
    }
}
