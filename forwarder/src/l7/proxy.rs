//! One client connection through the reverse proxy, request after request:
//! read a head → route by Host → pick a server → send head and body → relay the response →
//! keep the server connection for reuse → next request (or close).
//!
//! Bodies are streamed in both directions and never held whole (`relay`). Errors before any
//! response byte reached the client become a small local response (400/404/408/414/431/501
//! for the client's fault, 502/503/504 for the server's); after that, the connection is
//! closed.
//! A request that was refused closes its connection after the answer, so bytes the client
//! sent after it are never read as a request ("close after error" defeats smuggling).
//!
//! Retries: [`exchange`] is the whole policy — attempts on servers the balancer picks, for as
//! long as the failed attempt's [`ProxyError`] says a retry is safe, and where. A request goes
//! to another server when connecting fails (nothing was sent yet). When a connection fails
//! before its response head is whole, a request that is safe to repeat (idempotent, without
//! a body) is sent again: on a fresh connection to the same server if the one that failed was
//! a reused keep-alive connection (the race every keep-alive pool has with servers closing
//! idle connections), else to another server.

use std::{
    io::Write,
    net::SocketAddr,
    rc::Rc,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use compio::BufResult;
use weir_config::L7Config;

pub use super::worker::Worker;
use super::{
    WorkerCounters,
    access_log::Entry,
    error::{ProxyError, Retry, Side},
    http::{
        BodyLength, ClientInfo, HeadLimits, RequestHead, local_response, parse_request_into,
        parse_response_into, write_client_head, write_server_head,
    },
    io::{Conn, turn_clock},
    relay::{Relay, RelayError, relay_body, tunnel},
    snapshot::{L7Snapshot, PoolServer, VhostPool},
    tls::{same_certificate, sni_vhost},
    upstream::UpstreamConn,
    worker::IdleClient,
};

/// Bytes read from a socket at a time. 16 KiB (HAProxy's buffer size too): against 32 and
/// 64 KiB it relayed 64 KiB keep-alive responses faster (18.7k vs 15.3k/15.8k req/s), with a
/// lower p99 (7 vs 10/9 ms) and less CPU per request (37 vs 44/40 µs), and was level
/// elsewhere; smaller reads keep each connection's turn on the worker short and its buffers
/// in cache (decision 0009).
pub(super) const READ_CHUNK: usize = 16 * 1024;

/// Servers tried for one request at most.
const MAX_ATTEMPTS: usize = 3;
/// How long a refused client may keep sending before its connection is closed, so the
/// answer is read rather than lost to a reset.
const LINGER: Duration = Duration::from_millis(500);

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

/// Serves one client connection until it closes, fails or stays idle too long.
pub async fn serve_client(
    worker: Rc<Worker>,
    listener: usize,
    client: Conn,
    peer: SocketAddr,
    counters: &WorkerCounters,
) {
    // Empty: the first request is read into the worker's ring (see `read_idle`).
    let mut buf = Vec::new();
    let mut first = true;
    // On TLS, the vhost whose certificate the handshake presented (by SNI).
    let presented = client.server_name().map(|name| {
        let snapshot = worker.snapshot.load();
        sni_vhost(&snapshot.listeners[listener], Some(&name))
    });
    loop {
        // A stopping worker still answers the request a client is sending (with
        // `Connection: close`): closing a connection that may carry one would reset it. One
        // that stays idle is closed by the drain (`l7::drain`).
        let head_snapshot = worker.current_snapshot();
        let request =
            match read_request(&worker, &client, buf, &head_snapshot.settings, first).await {
                Ok((Some(request), rest)) => {
                    buf = rest;
                    request
                }
                Ok((None, _)) => return client.finish().await,
                Err(err) => {
                    refuse_unread(&worker, listener, &client, peer, counters, err).await;
                    return;
                }
            };
        first = false;
        counters.requests.fetch_add(1, Ordering::Relaxed);
        // Routing uses the snapshot as of now, not as of when the client went quiet: a
        // server drained meanwhile gets no new request. From here to the server's in-flight
        // count going up nothing awaits, so a drain that waits for that count to reach zero
        // cannot miss a request that chose the server.
        let snapshot = worker.current_snapshot();
        let started = Instant::now();
        let routed = snapshot.listeners[listener].route(request.host.as_deref());
        let outcome = match routed {
            None => Err(ProxyError::client(404, "no virtual host serves this Host")),
            Some(vhost) if misdirected(&snapshot, presented, vhost) => Err(ProxyError::client(
                421,
                "this connection's certificate does not serve this Host",
            )),
            Some(vhost) if snapshot.vhosts[vhost].redirect_to_https => {
                redirect_to_https(&worker, &request, &client, buf.is_empty()).await
            }
            Some(vhost) => {
                exchange(&worker, &snapshot, vhost, &request, &client, &mut buf, peer).await
            }
        };
        let address = snapshot.listeners[listener].address;
        log_exchange(
            &worker,
            &snapshot,
            address,
            peer,
            Some(&request),
            routed,
            &outcome,
            Some(started),
        );
        worker.recycle_request_head(request);
        match outcome {
            Ok(exchange) if exchange.keep_alive => continue,
            Ok(_) => return client.finish().await,
            Err(err) => {
                answer_error(&client, counters, err).await;
                return;
            }
        }
    }
}

/// Whether a request for `vhost` came on a TLS connection whose handshake presented another
/// vhost's certificate (`presented`: the SNI's vhost, `Some(None)` for a name none serves).
/// Such a request is refused with 421 (RFC 9110 §15.5.20) rather than served under a
/// certificate that does not name its host.
fn misdirected(snapshot: &L7Snapshot, presented: Option<Option<usize>>, vhost: usize) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    presented.is_none_or(|by_sni| {
        let names = |v: usize| snapshot.vhosts[v].name.as_str();
        !same_certificate(&snapshot.tls, names(by_sni), names(vhost))
    })
}

/// Answers `request` with `308 Permanent Redirect` to the same URL over HTTPS. Its body, if
/// any, is not read: the connection closes after the answer.
/// Answers a request to a plain vhost that redirects to HTTPS. `nothing_unread`: no bytes past
/// the request were read, so when the client asked to close, the redirect is the last thing
/// on the connection and leaves with its FIN, as a relayed response does.
async fn redirect_to_https(
    worker: &Worker,
    request: &RequestHead,
    client: &Conn,
    nothing_unread: bool,
) -> Result<Exchanged, ProxyError> {
    let authority = request.authority.as_deref().unwrap_or_default();
    let keep_alive = request.keep_alive && request.body == BodyLength::Empty && !worker.stopping();
    let mut out = worker.buffer();
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 308 Permanent Redirect\r\nServer: weir\r\nLocation: https://{authority}{}\r\nContent-Length: 0\r\nConnection: {}\r\n\r\n",
        if request.target == "*" {
            "/"
        } else {
            request.target.as_str()
        },
        if keep_alive { "keep-alive" } else { "close" },
    );
    let bytes = out.len() as u64;
    if !request.keep_alive && request.body == BodyLength::Empty && nothing_unread {
        client.send_last(&mut out);
    }
    let written = if out.is_empty() {
        Ok(())
    } else {
        let timeout = ms(worker.snapshot.load().settings.body_idle_timeout_ms);
        let BufResult(written, back) = client.write_all(out, timeout).await;
        out = back;
        written
    };
    worker.recycle(out);
    written.map_err(|_| ProxyError::client_gone())?;
    Ok(Exchanged {
        status: 308,
        server: None,
        keep_alive,
        bytes,
    })
}

/// Answers a connection accepted past the worker's connection limit: 503 and close, counted
/// and logged (rate-limited) as a refusal, so an overloaded proxy is seen and its clients
/// told rather than left waiting in the listen backlog.
pub async fn refuse_over_limit(
    worker: Rc<Worker>,
    listener: usize,
    client: Conn,
    peer: SocketAddr,
    counters: &WorkerCounters,
) {
    let err = ProxyError::client(503, "connection limit reached");
    refuse_unread(&worker, listener, &client, peer, counters, err).await;
}

/// Ends a connection on which no request could be read (or none was let in): logged and
/// answered as `err` says.
async fn refuse_unread(
    worker: &Worker,
    listener: usize,
    client: &Conn,
    peer: SocketAddr,
    counters: &WorkerCounters,
    err: ProxyError,
) {
    let snapshot = worker.current_snapshot();
    let address = snapshot.listeners[listener].address;
    log_exchange(
        worker,
        &snapshot,
        address,
        peer,
        None,
        None,
        &Err(err),
        None,
    );
    answer_error(client, counters, err).await;
}

/// A finished exchange.
#[derive(Debug)]
struct Exchanged {
    status: u16,
    /// The server that answered; `None` when weir did (a redirect).
    server: Option<SocketAddr>,
    keep_alive: bool,
    /// Bytes sent to the client: head and body.
    bytes: u64,
}

/// Logs how a request ended (`request` is `None` when its head could not be read). Lines go
/// to the access log; a refusal — the client's doing, answered by weir — is rate-limited
/// ([`Worker::may_log_refusal`]) and goes to the daemon's log when there is no access log,
/// so refusals are never invisible.
#[allow(clippy::too_many_arguments)]
fn log_exchange(
    worker: &Worker,
    snapshot: &L7Snapshot,
    listener: SocketAddr,
    peer: SocketAddr,
    request: Option<&RequestHead>,
    vhost: Option<usize>,
    outcome: &Result<Exchanged, ProxyError>,
    started: Option<Instant>,
) {
    let refusal = match outcome {
        Err(err) if err.side == Side::Client => err.answer,
        _ => None,
    };
    let unlogged = match refusal {
        Some(_) => match worker.may_log_refusal() {
            Some(unlogged) => Some(unlogged),
            None => return,
        },
        None => None,
    };
    if !worker.access_log.is_set() {
        if let (Some((status, reason)), Some(unlogged)) = (refusal, unlogged) {
            tracing::warn!(
                target: "weir::refused",
                client = %peer,
                status,
                reason,
                unlogged,
                "request refused"
            );
        }
        return;
    }
    let (status, server, bytes, reason) = match outcome {
        Ok(e) => (e.status, e.server, e.bytes, None),
        Err(err) => match err.answer {
            Some((status, reason)) => (
                status,
                None,
                local_response(status, reason, false).len() as u64,
                Some(reason),
            ),
            None => (0, None, 0, None),
        },
    };
    worker.log.record(
        &worker.access_log,
        Entry {
            unix_ms: 0,
            client: peer,
            listener,
            vhost: vhost.map_or("-", |v| snapshot.vhosts[v].name.as_str()),
            method: request.map_or("-", |r| r.method.as_ref()),
            target: request.map_or("-", |r| r.target.as_str()),
            protocol: match request.map(|r| r.minor_version) {
                Some(0) => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            host: request.and_then(|r| r.host.as_deref()).unwrap_or("-"),
            status,
            server,
            bytes,
            micros: started.map_or(0, |s| s.elapsed().as_micros() as u64),
            reason,
            unlogged: unlogged.filter(|&n| n > 0),
        },
    );
}

/// Ends a client connection after `err`: answers it when something is to be answered, and
/// counts a refusal that is the client's doing — a server's failure is counted on the server
/// instead.
async fn answer_error(client: &Conn, counters: &WorkerCounters, err: ProxyError) {
    let Some((status, reason)) = err.answer else {
        return;
    };
    if err.side == Side::Client {
        counters.refused(status, reason);
    }
    refuse(client, status, reason).await;
}

/// Sends a local error response, then closes once the client stops sending (briefly).
async fn refuse(client: &Conn, status: u16, reason: &str) {
    let BufResult(written, _) = client
        .write_all(local_response(status, reason, false), LINGER)
        .await;
    if written.is_err() {
        return;
    }
    client.shutdown_write().await;
    let deadline = Instant::now() + LINGER;
    let mut sink = Vec::with_capacity(READ_CHUNK);
    let mut drained = 0;
    while drained < 1 << 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        sink.clear();
        let BufResult(read, back) = client.read_more(sink, READ_CHUNK, left).await;
        sink = back;
        match read {
            Ok(n) if n > 0 => drained += n,
            _ => return,
        }
    }
}

/// Reads the next request head into `buf`. `Ok(None)` when the client closed or went idle
/// between requests; `Err(Some(status))` when it must be refused; `Err(None)` when it
/// failed mid-head in a way not worth answering.
async fn read_request(
    worker: &Worker,
    client: &Conn,
    mut buf: Vec<u8>,
    settings: &L7Config,
    first: bool,
) -> Result<(Option<RequestHead>, Vec<u8>), ProxyError> {
    let limits = HeadLimits {
        max_request_line: settings.max_request_line,
        max_header_bytes: settings.max_header_bytes,
        max_headers: settings.max_headers,
    };
    // The header deadline runs from the connection's start, or from the first byte of a
    // later request; the wait before that byte is the keep-alive timeout. Read off the
    // worker's turn clock, as the deadlines that enforce it are.
    let mut deadline =
        (first || !buf.is_empty()).then(|| turn_clock() + ms(settings.header_timeout_ms));
    // Taken from the worker's spares once there is something to parse, so a client that
    // closes while idle takes none.
    let mut request = None;
    loop {
        if !buf.is_empty() {
            let head = request.get_or_insert_with(|| worker.request_head());
            match parse_request_into(&buf, &limits, head) {
                Ok(true) => {
                    buf.drain(..head.head_len);
                    return Ok((request, buf));
                }
                Ok(false) => {}
                Err(err) => return Err(ProxyError::client(err.status, err.reason)),
            }
        }
        let wait = match deadline {
            Some(deadline) => deadline.saturating_duration_since(turn_clock()),
            None => ms(settings.keepalive_timeout_ms),
        };
        let had = buf.len();
        let BufResult(read, back) = if had == 0 {
            let _idle = IdleClient::new(worker, client);
            read_idle(worker, client, buf, wait).await
        } else {
            client.read_more(buf, READ_CHUNK, wait).await
        };
        buf = back;
        match read {
            Ok(0) => return Ok((None, buf)),
            Ok(_) => {
                if had == 0 && deadline.is_none() {
                    deadline = Some(turn_clock() + ms(settings.header_timeout_ms));
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                // Idle between requests: close quietly. Mid-head: 408.
                return if had == 0 && !first {
                    Ok((None, Vec::new()))
                } else if had == 0 {
                    Err(ProxyError::client_gone())
                } else {
                    Err(ProxyError::client(408, "request head not received in time"))
                };
            }
            Err(_) => return Err(ProxyError::client_gone()),
        }
    }
}

/// Waits for a client's next request (or its first) without holding a buffer: `buf` goes back
/// to the worker's spares, the kernel picks a buffer of the worker's ring when bytes arrive,
/// and they are copied into a spare, so an idle kept-alive connection costs no read buffer
/// (decision 0023). Where the ring cannot serve (see [`Conn::read_idle`]) the read is made
/// into a buffer of the connection's own, as every other read is.
async fn read_idle(
    worker: &Worker,
    client: &Conn,
    buf: Vec<u8>,
    wait: Duration,
) -> BufResult<usize, Vec<u8>> {
    if !worker.ring_reads {
        return client.read_more(buf, READ_CHUNK, wait).await;
    }
    worker.recycle(buf);
    match client.read_idle(wait).await {
        Ok(Some(bytes)) => {
            let mut buf = worker.buffer();
            buf.extend_from_slice(&bytes);
            BufResult(Ok(bytes.len()), buf)
        }
        Ok(None) => client.read_more(worker.buffer(), READ_CHUNK, wait).await,
        Err(err) => BufResult(Err(err), Vec::new()),
    }
}

/// Counts a failed request to server `index` of `pool`, for its counters and for outlier
/// detection.
fn server_failed(pool: &VhostPool, index: usize) {
    pool.servers[index]
        .stats
        .failures
        .fetch_add(1, Ordering::Relaxed);
    note_outcome(pool, index, false);
}

/// Feeds outlier detection with how a request to server `index` ended.
fn note_outcome(pool: &VhostPool, index: usize, ok: bool) {
    if let Some(ms) = pool.record_outcome(index, ok) {
        tracing::warn!(
            vhost = pool.name,
            server = %pool.servers[index].address,
            ms,
            "server ejected by outlier detection"
        );
    }
}

/// A request on its way to a server: counted in flight for as long as it lives, and timed
/// from when the server was chosen (its response time).
pub(super) struct InFlight<'a> {
    server: &'a PoolServer,
    started: Instant,
    /// Header lines the vhost adds to every response (`VhostPool::response_headers`).
    added_headers: &'a [u8],
}

impl<'a> InFlight<'a> {
    pub(super) fn new(server: &'a PoolServer, added_headers: &'a [u8]) -> Self {
        server.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        server.stats.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            server,
            started: Instant::now(),
            added_headers,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.server.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends `request` to a server of `vhost` and relays the response: up to [`MAX_ATTEMPTS`]
/// attempts, each on the server the balancer picks, for as long as the failed attempt says a
/// retry is safe ([`Retry`]). This is the proxy's whole retry policy; what each attempt may
/// retry is decided where it fails, in [`attempt`].
async fn exchange(
    worker: &Worker,
    snapshot: &L7Snapshot,
    vhost: usize,
    request: &RequestHead,
    client: &Conn,
    buf: &mut Vec<u8>,
    peer: SocketAddr,
) -> Result<Exchanged, ProxyError> {
    let pool = &snapshot.vhosts[vhost];
    pool.requests.fetch_add(1, Ordering::Relaxed);
    let mut state = Attempts {
        head: worker.buffer(),
        tried: Vec::new(),
        sent_continue: false,
    };
    write_server_head(
        request,
        ClientInfo {
            peer,
            tls: client.is_tls(),
        },
        &snapshot.settings.forwarded,
        &mut state.head,
    );
    let mut failed = ProxyError::server(503, "no server available", Retry::No);
    // The server whose attempt failed and may be retried: counted when the retry starts.
    let mut retried_from: Option<usize> = None;
    for _ in 0..MAX_ATTEMPTS {
        let picked =
            worker
                .balancer
                .borrow_mut()
                .pick(snapshot, vhost, Some(request), peer, &state.tried);
        let Some(index) = picked else { break };
        if let Some(from) = retried_from.take() {
            pool.servers[from]
                .stats
                .retries
                .fetch_add(1, Ordering::Relaxed);
        }
        match attempt(
            worker, snapshot, vhost, index, request, client, buf, &mut state,
        )
        .await
        {
            Ok(exchanged) => {
                worker.recycle(state.head);
                return Ok(exchanged);
            }
            Err(err) => {
                if err.counts_against_server() {
                    server_failed(pool, index);
                }
                match err.retry {
                    Retry::No => return Err(err),
                    Retry::SameServer => {}
                    Retry::OtherServer => state.tried.push(index),
                }
                retried_from = Some(index);
                failed = err;
            }
        }
    }
    Err(failed)
}

/// What the attempts of one exchange share.
struct Attempts {
    /// The request head as servers get it, written once.
    head: Vec<u8>,
    /// Servers not to pick again.
    tried: Vec<usize>,
    /// `100 Continue` went to the client: its body is on its way, and cannot be sent twice.
    sent_continue: bool,
}

/// One attempt of an exchange on server `index` of `vhost`. A failure says whether the
/// request may go again, and where: before a byte of it left for the server (connecting
/// failed, or writing the head on a connection that turned out closed), anywhere; after, only
/// if it is safe to repeat (idempotent, no body) and nothing of a response reached the client.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    worker: &Worker,
    snapshot: &L7Snapshot,
    vhost: usize,
    index: usize,
    request: &RequestHead,
    client: &Conn,
    buf: &mut Vec<u8>,
    state: &mut Attempts,
) -> Result<Exchanged, ProxyError> {
    let settings = &snapshot.settings;
    let pool = &snapshot.vhosts[vhost];
    let server = &pool.servers[index];
    let in_flight = InFlight::new(server, &pool.response_headers);
    let pooled = worker.upstreams.take(
        server.address,
        ms(settings.upstream_idle_timeout_ms),
        request.retryable(),
    );
    let reused = pooled.is_some();
    let upstream = match pooled {
        Some(conn) => conn,
        None => {
            let connect_timeout = ms(settings.upstream_connect_timeout_ms);
            let conn = Conn::connect(server.address, connect_timeout)
                .await
                .map_err(|err| {
                    tracing::debug!(server = %server.address, %err, "cannot connect");
                    server
                        .stats
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    if err.kind() == std::io::ErrorKind::TimedOut {
                        ProxyError::server(504, "server connect timed out", Retry::OtherServer)
                    } else {
                        ProxyError::server(502, "cannot connect to a server", Retry::OtherServer)
                    }
                })?;
            UpstreamConn::opened(conn, &server.stats)
        }
    };
    // A retry of a request that is safe to repeat goes to the same server when the
    // connection that failed was a reused one it had closed; otherwise to another.
    let again = if reused && request.retryable() {
        Retry::SameServer
    } else {
        Retry::OtherServer
    };
    if request.expect_continue && !state.sent_continue && request.body != BodyLength::Empty {
        // weir answers the expectation itself once it holds a server connection: the
        // client sends its body only when there is somewhere to send it.
        let BufResult(written, _) = client
            .write_all(
                b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
                ms(settings.body_idle_timeout_ms),
            )
            .await;
        written.map_err(|_| ProxyError::client_gone())?;
        state.sent_continue = true;
    }
    let head = std::mem::take(&mut state.head);
    let BufResult(written, head) = upstream
        .write_all(head, ms(settings.body_idle_timeout_ms))
        .await;
    state.head = head;
    if written.is_ok() {
        let stats = &server.stats;
        stats
            .request_bytes
            .fetch_add(state.head.len() as u64, Ordering::Relaxed);
    }
    if written.is_err() {
        // Nothing reached the server's application; the client's body is still unread
        // unless it was asked for.
        let body_unread = request.body == BodyLength::Empty || !state.sent_continue;
        let retry = if body_unread { again } else { Retry::No };
        return Err(ProxyError::server(502, "server connection failed", retry));
    }
    let relayed = {
        let bytes = &server.stats.request_bytes;
        let relay = Relay::new(client, &upstream, worker, settings, bytes).paced(settings);
        relay_body(&relay, request.body, buf, Vec::new(), false).await
    };
    let failed = match relayed {
        Ok(spare) => {
            worker.recycle(spare);
            None
        }
        Err(RelayError::To) => {
            return Err(ProxyError::server(
                502,
                "server connection failed",
                Retry::No,
            ));
        }
        Err(RelayError::From) => Some(ProxyError::client_gone()),
        Err(RelayError::TooSlow) => Some(ProxyError::client(408, "request body too slow")),
        Err(RelayError::Malformed(err)) => Some(ProxyError::client(400, err.0)),
    };
    if let Some(err) = failed {
        // The client's side failed mid-body: the server has the head, perhaps part of the
        // body, and must not mistake the end of the connection for the end of the request.
        upstream.abort();
        return Err(err);
    }
    match relay_response(worker, snapshot, request, client, buf, upstream, &in_flight).await {
        Ok((status, keep_alive, bytes)) => {
            note_outcome(pool, index, status < 500);
            Ok(Exchanged {
                status,
                server: Some(server.address),
                keep_alive,
                bytes,
            })
        }
        Err(ResponseFailure::Nothing(err)) => {
            tracing::debug!(server = %server.address, %err, reused, "no response");
            if err.kind() == std::io::ErrorKind::TimedOut {
                // A slow server is not helped by sending it (or another) the work twice.
                return Err(ProxyError::server(
                    504,
                    "server response timed out",
                    Retry::No,
                ));
            }
            let retry = if request.retryable() {
                again
            } else {
                Retry::No
            };
            let reason = "server closed the connection without answering";
            Err(ProxyError::server(502, reason, retry))
        }
        Err(ResponseFailure::Invalid(reason)) => Err(ProxyError::server(502, reason, Retry::No)),
        Err(ResponseFailure::Cut(side)) => Err(ProxyError::cut(side)),
    }
}

/// What the response stage of an attempt can tell it.
enum ResponseFailure {
    /// No response head, or part of one, and nothing relayed to the client: may be retried.
    Nothing(std::io::Error),
    /// The server answered something that cannot be relayed.
    Invalid(&'static str),
    /// The response started reaching the client and then broke off, on this side.
    Cut(Side),
}

/// Reads the server's response and relays it to the client. Returns its status, whether
/// the client connection stays open, and the bytes the client was sent.
async fn relay_response(
    worker: &Worker,
    snapshot: &L7Snapshot,
    request: &RequestHead,
    client: &Conn,
    client_buf: &mut Vec<u8>,
    upstream: UpstreamConn,
    in_flight: &InFlight<'_>,
) -> Result<(u16, bool, u64), ResponseFailure> {
    let server = in_flight.server;
    let stats = &server.stats;
    let settings = &snapshot.settings;
    let mut rbuf = worker.buffer();
    let mut relayed_interim = false;
    let mut interim_bytes = 0;
    let mut response = worker.response_head();
    loop {
        match parse_response_into(&rbuf, &request.method, &mut response) {
            Ok(true) if (100..200).contains(&response.status) && response.status != 101 => {
                // Interim responses pass through to HTTP/1.1 clients.
                let length = response.head_len;
                if request.minor_version == 1 {
                    let interim = rbuf[..length].to_vec();
                    let BufResult(written, _) = client
                        .write_all(interim, ms(settings.body_idle_timeout_ms))
                        .await;
                    written.map_err(|_| ResponseFailure::Cut(Side::Client))?;
                    stats
                        .response_bytes
                        .fetch_add(length as u64, Ordering::Relaxed);
                    interim_bytes += length as u64;
                    relayed_interim = true;
                }
                rbuf.drain(..length);
                continue;
            }
            Ok(true) => break,
            Ok(false) => {}
            Err(err) => return Err(ResponseFailure::Invalid(err.0)),
        }
        let BufResult(read, back) = upstream
            .read_more(rbuf, READ_CHUNK, ms(settings.upstream_response_timeout_ms))
            .await;
        rbuf = back;
        match read {
            Ok(n) if n > 0 => {}
            // The server closed or reset before its head was whole: nothing has reached the
            // client, so the request may go again as if the server had not answered at all
            // (a server killed while it answers sends part of a head and a reset).
            Ok(_) if !relayed_interim => {
                return Err(ResponseFailure::Nothing(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Err(err) if !relayed_interim => return Err(ResponseFailure::Nothing(err)),
            _ => return Err(ResponseFailure::Invalid("server closed mid-response")),
        }
    }
    stats.response(response.status, in_flight.started.elapsed());
    rbuf.drain(..response.head_len);
    let mut out = worker.buffer();

    if response.status == 101 {
        if request.upgrade.is_none() || response.upgrade.is_none() {
            return Err(ResponseFailure::Invalid(
                "switching protocols without an upgrade",
            ));
        }
        write_client_head(
            &response,
            request.minor_version,
            false,
            false,
            settings.forwarded.via,
            in_flight.added_headers,
            &mut out,
        );
        let head_len = out.len() as u64;
        let BufResult(written, _) = client
            .write_all(out, ms(settings.body_idle_timeout_ms))
            .await;
        written.map_err(|_| ResponseFailure::Cut(Side::Client))?;
        stats.response_bytes.fetch_add(head_len, Ordering::Relaxed);
        let (to_server, to_client) = tunnel(
            client,
            &upstream,
            std::mem::take(client_buf),
            rbuf,
            ms(settings.tunnel_idle_timeout_ms),
        )
        .await;
        stats.request_bytes.fetch_add(to_server, Ordering::Relaxed);
        stats.response_bytes.fetch_add(to_client, Ordering::Relaxed);
        return Ok((101, false, interim_bytes + head_len + to_client));
    }

    let dechunk = request.minor_version == 0 && response.body == BodyLength::Chunked;
    let close = !request.keep_alive
        || response.body == BodyLength::UntilClose
        || dechunk
        || worker.stopping();
    write_client_head(
        &response,
        request.minor_version,
        close,
        dechunk,
        settings.forwarded.via,
        in_flight.added_headers,
        &mut out,
    );
    // The client asked to close and sent nothing past its request: the response is the last
    // thing on the connection, and its tail may wait in the kernel for the FIN. (Bytes the
    // client sent after all — it must not — would make the close a reset, and a held tail
    // would be lost with it: then it goes out at once, as any other response. Those read
    // with the request are in `client_buf`; `Conn::send_last` peeks for any that came since.)
    let last = !request.keep_alive && client_buf.is_empty();
    let (relayed, relayed_bytes) = {
        let relay =
            Relay::new(&upstream, client, worker, settings, &stats.response_bytes).closing(last);
        let relayed = relay_body(&relay, response.body, &mut rbuf, out, dechunk).await;
        (relayed, relay.moved())
    };
    match relayed {
        Ok(spare) => worker.recycle(spare),
        Err(RelayError::To) => return Err(ResponseFailure::Cut(Side::Client)),
        Err(RelayError::From | RelayError::TooSlow | RelayError::Malformed(_)) => {
            return Err(ResponseFailure::Cut(Side::Server));
        }
    }
    if response.keep_alive && rbuf.is_empty() {
        // Clean: the whole response was read and nothing more came. Back to the pool if the
        // server still takes requests (a drain may have happened meanwhile).
        if worker.snapshot.load().reusable.contains(&server.address) {
            worker.upstreams.put(
                server.address,
                upstream,
                settings.upstream_max_idle_per_server,
            );
        }
    }
    worker.recycle(rbuf);
    let status = response.status;
    worker.recycle_response_head(response);
    Ok((status, !close, interim_bytes + relayed_bytes))
}
