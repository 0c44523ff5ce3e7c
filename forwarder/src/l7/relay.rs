//! A body on its way from one end of an exchange to the other: streamed as it comes, never
//! held whole; de-chunked for HTTP/1.0 clients; what is left of a long fixed-length body
//! spliced through a pipe (decision 0012); held to the pace a request body must keep; and,
//! after `101 Switching Protocols` or for a TLS passthrough, both directions relayed as a
//! tunnel.
//!
//! A relay reports its failure by side ([`RelayError`]); the exchange in `proxy` turns that
//! into what the client is told and whether a retry is safe.

use std::{
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use compio::BufResult;
use weir_config::L7Config;

use super::{
    chunked::{ChunkError, ChunkedDecoder},
    http::BodyLength,
    io::Conn,
    proxy::READ_CHUNK,
    worker::{LentPipe, Worker},
};

/// Bodies with at least this much left after the bytes read with the head are spliced
/// (decision 0012); below it a pipe costs more system calls than the copy it saves.
const SPLICE_MIN: u64 = READ_CHUNK as u64;

/// Bytes read at a time for a body whose receiver cannot take spliced bytes (a TLS client):
/// all of it crosses user space, and rustls seals a 64 KiB write into four records that
/// leave in one send, where 16 KiB reads took four reads, four seals and four sends: about a
/// quarter less CPU per request with 64 KiB HTTPS responses (decision 0035). Plain receivers keep
/// [`READ_CHUNK`] (decision 0009), their long bodies spliced.
const UNSPLICED_READ_CHUNK: usize = 64 * 1024;

/// Body bytes read with a head, at least this many, are written beside the head (two iovecs
/// of one send) rather than copied after it; fewer cost less to copy than the second iovec.
const WRITE_APART_MIN: usize = 4 * 1024;

/// How a body relay failed, by side.
pub(super) enum RelayError {
    /// Reading the sender failed, timed out, or it closed early.
    From,
    /// A request body came slower than `request_body_min_rate` allows.
    TooSlow,
    /// Writing to the receiver failed.
    To,
    Malformed(ChunkError),
}

/// The two ends of a body relay.
pub(super) struct Relay<'a> {
    from: &'a Conn,
    to: &'a Conn,
    /// How long either end may stall the body.
    idle: Duration,
    worker: &'a Worker,
    /// The worker's connection limit, which bounds the pipes it lends.
    max_connections: usize,
    /// The server's counter of bytes written in this direction.
    written: &'a AtomicU64,
    /// Bytes this relay wrote.
    moved: Cell<u64>,
    /// The pace a request body must keep, if any.
    pace: Option<BodyPace>,
    /// `to` is closed once the body is through, and nothing comes from it meanwhile: the
    /// last write goes out with the FIN ([`Conn::send_last`]).
    closes: bool,
}

/// The pace a request body must keep: whole within `initial`, plus one second per
/// `min_rate` bytes (0: no extension).
struct BodyPace {
    started: Instant,
    initial: Duration,
    min_rate: u64,
}

impl<'a> Relay<'a> {
    /// A relay from `from` to `to` under `settings`' idle timeout, adding what it writes to
    /// `written`. Neither closing nor paced until said so.
    pub(super) fn new(
        from: &'a Conn,
        to: &'a Conn,
        worker: &'a Worker,
        settings: &L7Config,
        written: &'a AtomicU64,
    ) -> Self {
        Relay {
            from,
            to,
            idle: Duration::from_millis(settings.body_idle_timeout_ms),
            worker,
            max_connections: settings.max_connections_per_worker,
            written,
            moved: Cell::new(0),
            pace: None,
            closes: false,
        }
    }

    /// Says whether `to` is closed once the body is through (see `closes`).
    pub(super) fn closing(self, closes: bool) -> Self {
        Relay { closes, ..self }
    }

    /// Holds a request body to `request_body_timeout_ms` and `request_body_min_rate`.
    pub(super) fn paced(self, settings: &L7Config) -> Self {
        let pace = (settings.request_body_timeout_ms > 0).then(|| BodyPace {
            started: Instant::now(),
            initial: Duration::from_millis(settings.request_body_timeout_ms),
            min_rate: settings.request_body_min_rate,
        });
        Relay { pace, ..self }
    }

    /// How long the next read may wait, and whether it is the pace (not the idle timeout)
    /// that sets it.
    fn read_wait(&self) -> (Duration, bool) {
        let Some(pace) = &self.pace else {
            return (self.idle, false);
        };
        let earned = match pace.min_rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(self.moved.get() as f64 / rate as f64),
        };
        let left = (pace.initial + earned).saturating_sub(pace.started.elapsed());
        if left < self.idle {
            (left, true)
        } else {
            (self.idle, false)
        }
    }

    /// The bytes this relay wrote.
    pub(super) fn moved(&self) -> u64 {
        self.moved.get()
    }

    /// Counts `bytes` written to `to`.
    fn count(&self, bytes: usize) {
        self.written.fetch_add(bytes as u64, Ordering::Relaxed);
        self.moved.set(self.moved.get() + bytes as u64);
    }
}

/// Relays a body of `length` from `relay.from` to `relay.to`, after writing `prefix` (a
/// response head, sent in the same write as the first body bytes). `pending` holds bytes
/// already read from `from`; on return it holds those read past the body (the next
/// pipelined request). What is left of a long fixed-length body is spliced.
pub(super) async fn relay_body(
    relay: &Relay<'_>,
    length: BodyLength,
    pending: &mut Vec<u8>,
    prefix: Vec<u8>,
    dechunk: bool,
) -> Result<Vec<u8>, RelayError> {
    let Relay { from, to, idle, .. } = *relay;
    let mut out = prefix;
    let mut remaining = match length {
        BodyLength::Fixed(n) => n,
        _ => 0,
    };
    let mut decoder = ChunkedDecoder::default();
    let mut closed = false;
    loop {
        // All of `pending` is body and goes out beside `out` (the head), not copied into it.
        let mut apart = false;
        let done = match length {
            BodyLength::Empty => true,
            BodyLength::Fixed(_) => {
                let take = remaining.min(pending.len() as u64) as usize;
                remaining -= take as u64;
                let done = remaining == 0;
                if take == pending.len() && out.is_empty() {
                    std::mem::swap(&mut out, pending);
                } else if take == pending.len()
                    && take >= WRITE_APART_MIN
                    && !(done && relay.closes)
                {
                    apart = true;
                } else {
                    out.extend_from_slice(&pending[..take]);
                    pending.drain(..take);
                }
                done
            }
            BodyLength::Chunked => {
                let used = if dechunk {
                    decoder.feed(pending, Some(&mut out))
                } else {
                    decoder.feed(pending, None)
                }
                .map_err(RelayError::Malformed)?;
                if !dechunk {
                    out.extend_from_slice(&pending[..used]);
                }
                pending.drain(..used);
                decoder.is_done()
            }
            BodyLength::UntilClose => {
                out.append(pending);
                closed
            }
        };
        if apart {
            let len = out.len() + pending.len();
            let parts = [std::mem::take(&mut out), std::mem::take(pending)];
            let BufResult(written, [head, body]) = to.write_all_parts(parts, idle).await;
            (out, *pending) = (head, body);
            pending.clear();
            written.map_err(|_| RelayError::To)?;
            relay.count(len);
            out.clear();
        } else if !out.is_empty() {
            let len = out.len();
            if done && relay.closes {
                to.send_last(&mut out);
            }
            if !out.is_empty() {
                let BufResult(written, back) = to.write_all(out, idle).await;
                out = back;
                written.map_err(|_| RelayError::To)?;
            }
            relay.count(len);
            out.clear();
        }
        if done {
            return Ok(out);
        }
        if matches!(length, BodyLength::Fixed(_))
            && remaining >= SPLICE_MIN
            && from.spliceable()
            && to.spliceable()
            && let Some(pipe) = relay.worker.lend_pipe(relay.max_connections)
        {
            splice_body(relay, remaining, pipe).await?;
            return Ok(out);
        }
        let (wait, paced) = relay.read_wait();
        let chunk = if to.spliceable() {
            READ_CHUNK
        } else {
            UNSPLICED_READ_CHUNK
        };
        let BufResult(read, back) = from.read_more(std::mem::take(pending), chunk, wait).await;
        *pending = back;
        match read {
            Ok(0) if length == BodyLength::UntilClose => closed = true,
            Err(err) if paced && err.kind() == std::io::ErrorKind::TimedOut => {
                return Err(RelayError::TooSlow);
            }
            Ok(0) | Err(_) => return Err(RelayError::From),
            Ok(_) => {}
        }
    }
}

/// Moves the last `remaining` bytes of a fixed-length body through `pipe`, never copying
/// them into user space.
async fn splice_body(
    relay: &Relay<'_>,
    mut remaining: u64,
    mut pipe: LentPipe<'_>,
) -> Result<(), RelayError> {
    while remaining > 0 {
        let want = usize::try_from(remaining).unwrap_or(usize::MAX);
        let (wait, paced) = relay.read_wait();
        let moved = match relay.from.splice_into(&pipe, want, wait).await {
            Err(err) if paced && err.kind() == std::io::ErrorKind::TimedOut => {
                return Err(RelayError::TooSlow);
            }
            Ok(0) | Err(_) => return Err(RelayError::From),
            Ok(n) => n,
        };
        relay
            .to
            .splice_from(&pipe, moved, relay.idle)
            .await
            .map_err(|_| RelayError::To)?;
        relay.count(moved);
        remaining -= moved as u64;
    }
    pipe.emptied = true;
    Ok(())
}

/// Relays bytes both ways after `101 Switching Protocols` (WebSocket and other upgrades)
/// until both sides have closed, or nothing moved for `idle`. Returns the bytes written to
/// the server and to the client.
pub(super) async fn tunnel(
    client: &Conn,
    upstream: &Conn,
    from_client: Vec<u8>,
    from_upstream: Vec<u8>,
    idle: Duration,
) -> (u64, u64) {
    futures_util::future::join(
        pipe(client, upstream, from_client, idle),
        pipe(upstream, client, from_upstream, idle),
    )
    .await
}

/// One direction of a tunnel: copies until end of file, then passes the end on. Returns the
/// bytes written.
async fn pipe(from: &Conn, to: &Conn, mut buf: Vec<u8>, idle: Duration) -> u64 {
    let mut moved = 0;
    loop {
        if !buf.is_empty() {
            let BufResult(written, back) = to.write_all(buf, idle).await;
            buf = back;
            if written.is_err() {
                return moved;
            }
            moved += buf.len() as u64;
            buf.clear();
        }
        let BufResult(read, back) = from.read_more(buf, READ_CHUNK, idle).await;
        buf = back;
        match read {
            Ok(n) if n > 0 => {}
            _ => {
                to.shutdown_write().await;
                return moved;
            }
        }
    }
}
