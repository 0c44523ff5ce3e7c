//! TLS passthrough: a listener that routes TLS without terminating it, for servers that hold
//! their own certificates.
//!
//! The ClientHello is read (rustls's `Acceptor` parses it, nothing is answered), its SNI is
//! routed as a Host would be — exact name, longest wildcard, the listener's default vhost —
//! and a server of that vhost's pool is picked and connected (another one if connecting
//! fails). The bytes read so far go to it first, then bytes are relayed both ways until both
//! sides have closed, as an upgraded connection is. weir sees no HTTP here: the servers'
//! counters show connections (as requests) and bytes, and failures before a server was
//! reached count as handshake failures of the listener (`closed`, `timeout`, `plaintext_http`,
//! `unknown_name`, `protocol`). A routed connection gets one access-log line when it ends
//! (protocol `TLS`, the SNI as host, no HTTP status): what an operator greps for when a
//! site's clients complain, as HAProxy's TCP log line is. Handshake failures are counted but
//! not logged, as a terminating listener's are, so a scanner cannot fill the log.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use compio::{BufResult, net::TcpStream};

use super::{
    WorkerCounters,
    access_log::Entry,
    io::{Conn, HandshakeFailure, PLAINTEXT_ANSWER},
    proxy::InFlight,
    relay::tunnel,
    tls::sni_vhost,
    upstream::UpstreamConn,
    worker::Worker,
};

/// Bytes of ClientHello read at a time, and at most in all: a ClientHello is a few hundred
/// bytes, large ones (post-quantum key shares) a few KiB.
const READ_CHUNK: usize = 4 * 1024;
const MAX_HELLO: usize = 64 * 1024;
/// Servers tried for one connection at most.
const MAX_ATTEMPTS: usize = 3;
/// The fatal `unrecognized_name` alert (TLS 1.2 record framing, as every version accepts
/// before a version is agreed): a name no vhost of the listener serves.
const UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// Serves one client connection of passthrough listener `listener`.
pub async fn serve(
    worker: &Worker,
    listener: usize,
    stream: TcpStream,
    peer: SocketAddr,
    counters: &WorkerCounters,
) {
    let client = Conn::accepted(stream);
    let timeout = Duration::from_millis(worker.snapshot.load().settings.tls_handshake_timeout_ms);
    let hello = match super::io::timeout(timeout, read_client_hello(&client, timeout)).await {
        Ok(hello) => hello,
        Err(_) => Err(HandshakeFailure::Timeout),
    };
    let (hello, name) = match hello {
        Ok(hello) => hello,
        Err(failure) => return counters.tls_failed(failure),
    };
    // Routed with the snapshot as of now, not as of the accept (as a request is).
    let snapshot = worker.snapshot.load_full();
    let settings = &snapshot.settings;
    let Some(vhost) = sni_vhost(&snapshot.listeners[listener], name.as_deref()) else {
        let idle = Duration::from_millis(settings.body_idle_timeout_ms);
        let _ = client.write_all(UNRECOGNIZED_NAME.to_vec(), idle).await;
        return counters.tls_failed(HandshakeFailure::UnknownName);
    };
    counters.tls_passed.fetch_add(1, Ordering::Relaxed);
    let pool = &snapshot.vhosts[vhost];
    let routed = Routed {
        client: peer,
        listener: snapshot.listeners[listener].address,
        vhost: &pool.name,
        name: name.as_deref(),
        at: Instant::now(),
    };
    pool.requests.fetch_add(1, Ordering::Relaxed);
    let mut tried = Vec::new();
    let connect_timeout = Duration::from_millis(settings.upstream_connect_timeout_ms);
    while tried.len() < MAX_ATTEMPTS {
        let picked = worker
            .balancer
            .borrow_mut()
            .pick(&snapshot, vhost, None, peer, &tried);
        let Some(index) = picked else { break };
        tried.push(index);
        let server = &pool.servers[index];
        let in_flight = InFlight::new(server, b"");
        let upstream = match Conn::connect(server.address, connect_timeout).await {
            Ok(conn) => UpstreamConn::opened(conn, &server.stats),
            Err(err) => {
                tracing::debug!(server = %server.address, %err, "cannot connect (passthrough)");
                server
                    .stats
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                server.stats.failures.fetch_add(1, Ordering::Relaxed);
                drop(in_flight);
                continue;
            }
        };
        let sent = hello.len() as u64;
        let idle = Duration::from_millis(settings.tunnel_idle_timeout_ms);
        let (to_server, to_client) = tunnel(&client, &upstream, hello, Vec::new(), idle).await;
        let stats = &server.stats;
        stats
            .request_bytes
            .fetch_add(to_server.max(sent), Ordering::Relaxed);
        stats.response_bytes.fetch_add(to_client, Ordering::Relaxed);
        return routed.log(worker, Some(server.address), to_client, None);
    }
    // No server could be reached: the client sees the connection close.
    client.reset_on_close();
    routed.log(worker, None, 0, Some("no server reachable"));
}

/// A connection whose ClientHello was routed to a vhost, as its access-log line names it.
struct Routed<'a> {
    client: SocketAddr,
    listener: SocketAddr,
    vhost: &'a str,
    /// The SNI, if the client sent one (the listener's default vhost took it otherwise).
    name: Option<&'a str>,
    at: Instant,
}

impl Routed<'_> {
    /// Writes the connection's line, when a log is set: relayed to `server` (`None`: no server
    /// could be reached, `reason` says so), `bytes` sent to the client.
    fn log(&self, worker: &Worker, server: Option<SocketAddr>, bytes: u64, reason: Option<&str>) {
        if !worker.access_log.is_set() {
            return;
        }
        worker.log.record(
            &worker.access_log,
            Entry {
                unix_ms: 0,
                client: self.client,
                listener: self.listener,
                vhost: self.vhost,
                method: "-",
                target: "-",
                protocol: "TLS",
                host: self.name.unwrap_or("-"),
                status: 0,
                server,
                bytes,
                micros: self.at.elapsed().as_micros() as u64,
                reason,
                unlogged: None,
            },
        );
    }
}

/// Reads the client's first flight up to a whole ClientHello; the bytes read (to be replayed
/// to the server) and the name it asks for.
async fn read_client_hello(
    client: &Conn,
    timeout: Duration,
) -> Result<(Vec<u8>, Option<String>), HandshakeFailure> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut raw = Vec::with_capacity(READ_CHUNK);
    loop {
        let start = raw.len();
        let BufResult(read, buf) = client.read_more(raw, READ_CHUNK, timeout).await;
        raw = buf;
        match read {
            Ok(0) | Err(_) => return Err(HandshakeFailure::Closed),
            Ok(_) => {}
        }
        // A TLS connection starts with a handshake record (22); an HTTP method is letters.
        if start == 0 && raw[0].is_ascii_uppercase() {
            let _ = client
                .write_all(PLAINTEXT_ANSWER.to_vec(), Duration::from_secs(1))
                .await;
            return Err(HandshakeFailure::Plaintext);
        }
        let mut fresh = &raw[start..];
        while !fresh.is_empty() {
            if acceptor.read_tls(&mut fresh).is_err() {
                return Err(HandshakeFailure::Protocol);
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let name = accepted.client_hello().server_name().map(str::to_string);
                return Ok((raw, name));
            }
            Ok(None) if raw.len() < MAX_HELLO => {}
            Ok(None) => return Err(HandshakeFailure::Protocol),
            Err((_, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = client.write_all(out, Duration::from_secs(1)).await;
                return Err(HandshakeFailure::Protocol);
            }
        }
    }
}
