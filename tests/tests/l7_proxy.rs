//! The L7 reverse proxy end to end on loopback: the real workers (io_uring, two threads) in
//! this process, real TCP clients, and mock origins that record what reached them. No
//! privileges needed.
//!
//! Each test takes its own loopback /24 (127.0.N.0), so tests run in parallel.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use weir_config::control::{AdminState, HealthState};
use weir_tests::{
    http_client::{Body, HttpConn, is_pattern, raw_exchange},
    http_origin::{HttpOrigin, pattern_digest},
    load::HttpLoad,
    proxy::{Proxy, free_port, next_net, origins, vhost},
};

fn refs(origins: &[HttpOrigin]) -> Vec<&HttpOrigin> {
    origins.iter().collect()
}

#[test]
fn requests_route_by_exact_wildcard_and_default_host() {
    let o = origins(3);
    let proxy = Proxy::start(
        "",
        r#"
[[vhost]]
name = "www"
listen = "LISTEN"
hosts = ["www.example.test"]
servers = [{ address = "SERVER1" }]

[[vhost]]
name = "any"
listen = "LISTEN"
hosts = ["*.example.test"]
servers = [{ address = "SERVER2" }]

[[vhost]]
name = "fallback"
listen = "LISTEN"
default = true
servers = [{ address = "SERVER3" }]
"#,
        &refs(&o),
    );
    for (host, expected) in [
        ("www.example.test", "s1\n"),
        ("WWW.Example.Test:8080", "s1\n"),
        ("www.example.test.", "s1\n"),
        ("img.example.test", "s2\n"),
        ("a.b.example.test", "s2\n"),
        ("example.test", "s3\n"),
        ("elsewhere.test", "s3\n"),
    ] {
        let response = proxy.get(host, "/");
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, expected),
            "Host {host}"
        );
    }
    // The absolute form's authority routes, and the server gets the origin form.
    let mut conn = proxy.conn();
    conn.send_raw(
        b"GET http://www.example.test/abs?q=1 HTTP/1.1\r\nHost: www.example.test\r\n\r\n",
    )
    .unwrap();
    let response = conn.read_response(false).unwrap();
    assert_eq!(response.text(), "s1\n");
    assert!(o[0].requests().iter().any(|r| r.target == "/abs?q=1"));
    // HTTP/1.0 without Host goes to the default.
    let (answer, _) = raw_exchange(
        proxy.address,
        b"GET / HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("s3\n"),
        "{answer}"
    );
}

#[test]
fn a_listener_without_a_default_answers_404_for_unknown_hosts() {
    let o = origins(1);
    let proxy = Proxy::start("", &vhost("only", 1, ""), &refs(&o));
    let mut conn = proxy.conn();
    let response = conn
        .request("GET", "/", "other.test", "", Body::None)
        .unwrap();
    assert_eq!(response.status, 404);
    assert!(o[0].requests().is_empty());
}

#[test]
fn round_robin_spreads_by_weight_and_reuses_server_connections() {
    let o = origins(3);
    let proxy = Proxy::start(
        "",
        r#"
[[vhost]]
name = "app"
listen = "LISTEN"
hosts = ["app.test"]
servers = [{ address = "SERVER1", weight = 100 }, { address = "SERVER2", weight = 200 }, { address = "SERVER3", weight = 300 }]
"#,
        &refs(&o),
    );
    // One keep-alive client connection, 600 requests: a single worker serves them all.
    let mut conn = proxy.conn();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..600 {
        let response = conn
            .request("GET", "/", "app.test", "", Body::None)
            .unwrap();
        assert_eq!(response.status, 200);
        *counts.entry(response.text()).or_default() += 1;
    }
    // Smooth weighted round robin on one worker is exact.
    assert_eq!(
        (counts["s1\n"], counts["s2\n"], counts["s3\n"]),
        (100, 200, 300),
        "{counts:?}"
    );
    // Keep-alive to the servers: each served its share over a single connection.
    for origin in &o {
        let seen = origin.requests();
        assert!(!seen.is_empty());
        assert_eq!(
            origin.connections(),
            1,
            "{} opened {} connections",
            origin.name,
            origin.connections()
        );
        assert!(
            seen.iter()
                .all(|r| r.connection == 1 && r.version == "HTTP/1.1")
        );
    }
}

#[test]
fn hash_and_least_connections_pools_pick_as_configured() {
    let o = origins(3);
    let proxy = Proxy::start(
        "",
        r#"
[[vhost]]
name = "sticky"
listen = "LISTEN"
hosts = ["sticky.test"]
balance = "hash"
hash_on = "cookie:sid"
servers = [{ address = "SERVER1" }, { address = "SERVER2" }, { address = "SERVER3" }]

[[vhost]]
name = "least"
listen = "LISTEN"
hosts = ["least.test"]
balance = "least_connections"
servers = [{ address = "SERVER1" }, { address = "SERVER2" }, { address = "SERVER3" }]
"#,
        &refs(&o),
    );
    let mut servers_seen = std::collections::HashSet::new();
    // Enough users that all three servers get some: with 20, one in a thousand tables (the
    // servers' ports are random) left a server without any.
    for user in 0..60 {
        let cookie = format!("Cookie: sid=user{user}\r\n");
        let first = proxy
            .conn()
            .request("GET", "/", "sticky.test", &cookie, Body::None)
            .unwrap()
            .text();
        for _ in 0..3 {
            assert_eq!(
                proxy
                    .conn()
                    .request("GET", "/", "sticky.test", &cookie, Body::None)
                    .unwrap()
                    .text(),
                first
            );
        }
        servers_seen.insert(first);
    }
    assert_eq!(servers_seen.len(), 3);
    // Least connections on an idle pool: ties go round, so every server gets requests.
    let mut least: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        *least
            .entry(proxy.get("least.test", "/").text())
            .or_default() += 1;
    }
    assert_eq!(least.len(), 3, "{least:?}");
}

#[test]
fn large_bodies_stream_both_ways_intact_in_both_framings() {
    let o = origins(1);
    let proxy = Proxy::start("", &vhost("files", 1, ""), &refs(&o));
    const SIZE: u64 = 100 * 1024 * 1024;
    let (_, digest) = pattern_digest(SIZE);
    let mut conn = proxy.conn();
    for body in [Body::Fixed(SIZE), Body::Chunked(SIZE)] {
        let response = conn
            .request("POST", "/upload", "files.test", "", body)
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.text(),
            format!("{SIZE} {digest:016x}\n"),
            "{body:?}"
        );
    }
    for path in [format!("/bytes/{SIZE}"), format!("/chunked/{SIZE}")] {
        let response = conn
            .request("GET", &path, "files.test", "", Body::None)
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            (response.body_length, response.body_xxh3),
            (SIZE, digest),
            "{path}"
        );
        assert!(is_pattern(&response.body));
    }
    // Both on one client connection and one server connection.
    assert_eq!(o[0].connections(), 1);
    // An HTTP/1.0 client gets a chunked response decoded, delimited by close.
    let mut old = proxy.conn();
    old.send_raw(b"GET /chunked/300000 HTTP/1.0\r\nHost: files.test\r\n\r\n")
        .unwrap();
    let response = old.read_response(false).unwrap();
    assert_eq!(response.header("transfer-encoding"), None);
    assert_eq!(
        (response.body_length, response.body_xxh3),
        pattern_digest(300_000)
    );
    // A response delimited by the server's close reaches the client whole.
    let response = proxy
        .conn()
        .request("GET", "/close/200000", "files.test", "", Body::None)
        .unwrap();
    assert_eq!(
        (response.body_length, response.body_xxh3),
        pattern_digest(200_000)
    );
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let o = origins(1);
    let proxy = Proxy::start("", &vhost("up", 1, ""), &refs(&o));
    let mut conn = proxy.conn();
    conn.send_raw(b"PUT /upload HTTP/1.1\r\nHost: up.test\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
        .unwrap();
    let interim = conn.read_response_raw_status().unwrap();
    assert_eq!(interim, 100);
    let body: Vec<u8> = (0..1000u64).map(weir_tests::http_origin::pattern).collect();
    conn.send_raw(&body).unwrap();
    let response = conn.read_response(false).unwrap();
    assert_eq!(response.status, 200);
    let (_, digest) = pattern_digest(1000);
    assert_eq!(response.text(), format!("1000 {digest:016x}\n"));
    // The expectation was met by weir, so the server did not see it.
    assert!(o[0].requests()[0].header("expect").is_none());
}

#[test]
fn a_websocket_upgrade_is_tunnelled_both_ways() {
    let o = origins(1);
    let proxy = Proxy::start("", &vhost("ws", 1, ""), &refs(&o));
    let mut conn = proxy.conn();
    conn.send_raw(
        b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let response = conn.read_response(false).unwrap();
    assert_eq!(response.status, 101);
    assert_eq!(response.header("upgrade"), Some("websocket"));
    // The origin saw the upgrade request with its handshake headers.
    let seen = &o[0].requests()[0];
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert!(
        seen.header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("upgrade"))
    );
    assert_eq!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    // A masked text frame "hello" and 100 KiB more, echoed back byte for byte.
    let frame = [
        0x81u8,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    for round in 0..3 {
        let mut message = frame.to_vec();
        message.extend((0..100 * 1024u32).map(|i| (i as u8).wrapping_add(round)));
        conn.send_raw(&message).unwrap();
        let echoed = conn.read_exact_bytes(message.len()).unwrap();
        assert_eq!(echoed, message, "round {round}");
    }
}

#[test]
fn forwarding_headers_are_added_and_hop_by_hop_headers_removed() {
    let o = origins(1);
    let proxy = Proxy::start(
        "[l7.forwarded]\nforwarded = true\n",
        &vhost("fw", 1, ""),
        &refs(&o),
    );
    let mut conn = proxy.conn();
    let response = conn
        .request(
            "GET",
            "/",
            "fw.test",
            "X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n",
            Body::None,
        )
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("via"), Some("1.1 weir"));
    let seen = &o[0].requests()[0];
    // The client connects from 127.0.0.1 (the kernel's choice for a loopback destination).
    let xff = seen.header("x-forwarded-for").unwrap();
    assert!(
        !xff.contains("6.6.6.6") && xff.parse::<std::net::IpAddr>().is_ok(),
        "{xff}"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header("forwarded"),
        Some(format!("for={xff};proto=http;host=fw.test").as_str())
    );
    assert_eq!(seen.header("via"), Some("1.1 weir"));
    assert_eq!(seen.header("x-kept"), Some("yes"));
    for gone in [
        "x-secret",
        "keep-alive",
        "te",
        "proxy-connection",
        "connection",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} reached the server");
    }
}

/// A bad request, its expected status, and what follows it on the wire (which must never
/// reach a server as a request).
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: victim.test\r\n\r\n";

#[test]
fn malformed_and_smuggling_requests_are_refused_and_closed() {
    let o = origins(1);
    let proxy = Proxy::start(
        "max_request_line = 200\nmax_header_bytes = 2048\nmax_headers = 20\n",
        r#"
[[vhost]]
name = "victim"
listen = "LISTEN"
hosts = ["victim.test", "other.test"]
servers = [{ address = "SERVER1" }]
"#,
        &refs(&o),
    );
    let h = "Host: victim.test\r\n";
    let long_target = format!("GET /{} HTTP/1.1\r\n{h}\r\n", "a".repeat(300));
    let big_header = format!("GET / HTTP/1.1\r\n{h}X-Big: {}\r\n\r\n", "b".repeat(3000));
    let many_headers = format!("GET / HTTP/1.1\r\n{h}{}\r\n", "X-A: 1\r\n".repeat(30));
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "CL then TE",
            format!(
                "POST / HTTP/1.1\r\n{h}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "TE then CL",
            format!(
                "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "two equal CL",
            format!("POST / HTTP/1.1\r\n{h}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
            400,
        ),
        (
            "two CL",
            format!("POST / HTTP/1.1\r\n{h}Content-Length: 5\r\nContent-Length: 50\r\n\r\nhello"),
            400,
        ),
        (
            "CL list",
            format!("POST / HTTP/1.1\r\n{h}Content-Length: 5, 5\r\n\r\nhello"),
            400,
        ),
        (
            "CL negative",
            format!("POST / HTTP/1.1\r\n{h}Content-Length: -1\r\n\r\n"),
            400,
        ),
        (
            "CL plus sign",
            format!("POST / HTTP/1.1\r\n{h}Content-Length: +5\r\n\r\nhello"),
            400,
        ),
        (
            "CL hex",
            format!("POST / HTTP/1.1\r\n{h}Content-Length: 0x5\r\n\r\nhello"),
            400,
        ),
        (
            "CL huge",
            format!("POST / HTTP/1.1\r\n{h}Content-Length: 99999999999999999999999\r\n\r\n"),
            400,
        ),
        (
            "TE xchunked",
            format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
            501,
        ),
        (
            "TE chunked, identity",
            format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
            501,
        ),
        (
            "TE gzip, chunked",
            format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
            501,
        ),
        (
            "TE twice",
            format!(
                "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "TE with vertical tab",
            format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
        (
            "TE space before colon",
            format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
        (
            "TE obs-fold",
            format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
        (
            "TE in HTTP/1.0",
            format!("POST / HTTP/1.0\r\n{h}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
        ("bare LF", format!("GET / HTTP/1.1\n{h}\n"), 400),
        (
            "bare LF between headers",
            format!("GET / HTTP/1.1\r\n{h}X-A: 1\nX-B: 2\r\n\r\n"),
            400,
        ),
        (
            "chunk size not hex",
            format!(
                "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "chunk size overflow",
            format!(
                "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "chunk longer than its size",
            format!(
                "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "chunk size with bare LF",
            format!(
                "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "space in header name",
            format!("GET / HTTP/1.1\r\n{h}Bad Header: x\r\n\r\n"),
            400,
        ),
        (
            "control byte in header name",
            format!("GET / HTTP/1.1\r\n{h}Bad\x01: x\r\n\r\n"),
            400,
        ),
        (
            "NUL in header value",
            format!("GET / HTTP/1.1\r\n{h}X-A: a\x00b\r\n\r\n"),
            400,
        ),
        ("request line too long", long_target, 414),
        ("head too large", big_header, 431),
        ("too many headers", many_headers, 431),
        (
            "no Host in HTTP/1.1",
            "GET / HTTP/1.1\r\n\r\n".to_string(),
            400,
        ),
        (
            "two Hosts",
            format!("GET / HTTP/1.1\r\n{h}Host: other.test\r\n\r\n"),
            400,
        ),
        (
            "Host and target disagree",
            format!("GET http://other.test/ HTTP/1.1\r\n{h}\r\n"),
            400,
        ),
        (
            "invalid Host",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_string(),
            400,
        ),
        ("HTTP/1.2", format!("GET / HTTP/1.2\r\n{h}\r\n"), 505),
        ("invalid method", format!("G@T / HTTP/1.1\r\n{h}\r\n"), 400),
        (
            "unknown expectation",
            format!("GET / HTTP/1.1\r\n{h}Expect: magic\r\n\r\n"),
            417,
        ),
        (
            "CONNECT",
            format!("CONNECT victim.test:443 HTTP/1.1\r\n{h}\r\n"),
            501,
        ),
        (
            "relative target",
            format!("GET foo HTTP/1.1\r\n{h}\r\n"),
            400,
        ),
    ];
    assert!(cases.len() >= 25);
    for (name, request, status) in &cases {
        let wire = format!("{request}{SMUGGLED}");
        let (answer, closed) =
            raw_exchange(proxy.address, wire.as_bytes(), Duration::from_secs(5)).unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{name}: expected {status}, got {answer:?}"
        );
        assert!(answer.contains("Connection: close"), "{name}: {answer:?}");
        assert_eq!(
            answer.matches("HTTP/1.1").count(),
            1,
            "{name}: one answer only: {answer:?}"
        );
        assert!(closed, "{name}: connection left open");
    }
    let seen = o[0].requests();
    assert!(
        seen.iter().all(|r| r.target != "/smuggled"),
        "a smuggled request reached the server: {seen:?}"
    );

    // What is well framed is not smuggling: a request whose body contains a request, and
    // two pipelined requests, are served exactly as framed.
    let wire = format!(
        "POST /upload HTTP/1.1\r\n{h}Content-Length: {}\r\n\r\n{SMUGGLED}GET /second HTTP/1.1\r\n{h}\r\n",
        SMUGGLED.len()
    );
    let mut conn = proxy.conn();
    conn.send_raw(wire.as_bytes()).unwrap();
    assert_eq!(conn.read_response(false).unwrap().status, 200);
    assert_eq!(conn.read_response(false).unwrap().status, 200);
    let targets: Vec<String> = o[0].requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/upload", "/second"]);
    assert_eq!(o[0].requests()[0].body_length, SMUGGLED.len() as u64);
}

#[test]
fn slow_clients_get_408_and_do_not_starve_others() {
    let o = origins(1);
    let proxy = Proxy::start(
        "header_timeout_ms = 1000\n",
        &vhost("app", 1, ""),
        &refs(&o),
    );
    // 200 clients each trickle a byte of their head every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let answered_408 = Arc::new(AtomicU64::new(0));
    let mut slow = Vec::new();
    for _ in 0..200 {
        let (stop, answered_408, address) =
            (Arc::clone(&stop), Arc::clone(&answered_408), proxy.address);
        slow.push(thread::spawn(move || {
            let Ok(mut conn) = HttpConn::connect(address) else {
                return;
            };
            for byte in b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: "
                .iter()
                .chain(std::iter::repeat(&b'z'))
            {
                if stop.load(Ordering::Relaxed) || conn.send_raw(&[*byte]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            if conn.read_response(false).is_ok_and(|r| r.status == 408) {
                answered_408.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    thread::sleep(Duration::from_millis(300));
    // Normal clients are served meanwhile.
    for _ in 0..50 {
        assert_eq!(proxy.get("app.test", "/").status, 200);
    }
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for handle in slow {
        handle.join().unwrap();
    }
    assert_eq!(
        answered_408.load(Ordering::Relaxed),
        200,
        "every slow client got 408 after the header timeout"
    );
    assert!(o[0].requests().iter().all(|r| r.header("x-slow").is_none()));
}

#[test]
fn a_server_that_breaks_off_its_response_head_is_retried_elsewhere() {
    // A server killed while it answers leaves part of a head and a reset: nothing reached the
    // client yet, so an idempotent request goes to the next server instead of failing.
    let o = origins(2);
    o[0].set_breaking(true);
    let proxy = Proxy::start("", &vhost("b", 2, ""), &refs(&o));
    for i in 0..20 {
        let response = proxy.get("b.test", "/");
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, "s2\n"),
            "request {i}"
        );
    }
    assert!(
        !o[0].requests().is_empty(),
        "the breaking server was tried (the test would mean nothing otherwise)"
    );
}

#[test]
fn server_failures_are_retried_elsewhere_or_answered_502_503_504() {
    let o = origins(2);
    // A port where nothing listens: connecting is refused.
    let dead = TcpListener::bind(SocketAddr::new(o[0].address.ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(
        "upstream_response_timeout_ms = 300\n",
        &format!(
            r#"
[[vhost]]
name = "mixed"
listen = "LISTEN"
hosts = ["mixed.test"]
servers = [{{ address = "{dead}" }}, {{ address = "SERVER1" }}]

[[vhost]]
name = "down"
listen = "LISTEN"
hosts = ["down.test"]
servers = [{{ address = "{dead}" }}]

[[vhost]]
name = "slow"
listen = "LISTEN"
hosts = ["slow.test"]
servers = [{{ address = "SERVER2" }}]
"#
        ),
        &refs(&o),
    );
    for _ in 0..20 {
        let response = proxy.get("mixed.test", "/");
        assert_eq!((response.status, response.text().as_str()), (200, "s1\n"));
    }
    let response = proxy.get("down.test", "/");
    assert_eq!(response.status, 502);
    assert!(
        response.text().contains("502"),
        "a small body says what happened"
    );
    assert_eq!(proxy.get("slow.test", "/slow/2000").status, 504);
    let mut proxy = proxy;
    proxy.change(|v| v.set_state("down", dead, AdminState::Disabled).unwrap());
    assert_eq!(proxy.get("down.test", "/").status, 503);
}

#[test]
fn fifty_pool_changes_under_load_cause_no_client_error() {
    let o = origins(8);
    let mut proxy = Proxy::start("", &vhost("live", 3, ""), &refs(&o));
    let load = HttpLoad::start(proxy.address, "live.test", 4, None);
    // 50 changes: cycle servers through add → drain → remove (the removed server then
    // stops, as in a real deploy), keeping at least two in rotation.
    let mut origins: Vec<Option<HttpOrigin>> = o.into_iter().map(Some).collect();
    let address =
        |origins: &Vec<Option<HttpOrigin>>, i: usize| origins[i].as_ref().unwrap().address;
    let mut in_pool: Vec<usize> = vec![0, 1, 2];
    let mut next_new = 3;
    let mut changes = 0;
    while changes < 50 {
        if next_new < origins.len() {
            let new = next_new;
            next_new += 1;
            let a = address(&origins, new);
            proxy.change(|v| v.add_server("live", a, 100).unwrap());
            in_pool.push(new);
            changes += 1;
        }
        let old = in_pool.remove(0);
        let a = address(&origins, old);
        proxy.change(|v| v.set_state("live", a, AdminState::Draining).unwrap());
        proxy.change(|v| {
            v.set_weight("live", address(&origins, in_pool[0]), 50 + changes as u32)
                .unwrap()
        });
        // Wait for requests in flight on it to finish, as `remove --wait` does.
        let stats = Arc::clone(proxy.workers.snapshot().server_stats("live", a).unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        proxy.change(|v| v.remove_server("live", a).unwrap());
        changes += 3;
        // The removed server goes away; recycle its slot for a fresh origin.
        drop(origins[old].take());
        origins[old] =
            Some(HttpOrigin::start(SocketAddr::new(a.ip(), 0), &format!("r{changes}")).unwrap());
        if next_new >= origins.len() {
            next_new = old;
        }
        // Let traffic flow between changes.
        load.wait_for(100);
    }
    let (served, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} client errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(served > 1000, "load ran: {served}");
}

#[test]
fn draining_a_server_closes_its_idle_connections_and_sends_it_nothing_new() {
    let o = origins(2);
    let mut proxy = Proxy::start("", &vhost("d", 2, ""), &refs(&o));
    for _ in 0..10 {
        assert_eq!(proxy.get("d.test", "/").status, 200);
    }
    assert!(o[0].open_connections() > 0, "pooled connections to s1");
    let before = o[0].requests().len();
    let a = o[0].address;
    proxy.change(|v| v.set_state("d", a, AdminState::Draining).unwrap());
    thread::sleep(Duration::from_millis(600));
    assert_eq!(
        o[0].open_connections(),
        0,
        "idle connections to the drained server closed"
    );
    for _ in 0..20 {
        assert_eq!(proxy.get("d.test", "/").text(), "s2\n");
    }
    assert_eq!(o[0].requests().len(), before);
}

#[test]
fn a_worker_at_its_connection_limit_answers_503_and_counts_it() {
    let o = origins(1);
    let proxy = Proxy::start(
        "workers = 1\nmax_connections_per_worker = 2\n",
        &vhost("app", 1, ""),
        &refs(&o),
    );
    let mut first = proxy.conn();
    let mut second = proxy.conn();
    for conn in [&mut first, &mut second] {
        assert_eq!(
            conn.request("GET", "/", "app.test", "", Body::None)
                .unwrap()
                .status,
            200
        );
    }
    // A third connection is told at once, not left waiting in the backlog.
    let mut third = proxy.conn();
    third
        .stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let started = Instant::now();
    third.send("GET", "/", "app.test", "", Body::None).unwrap();
    let refused = third
        .read_response(false)
        .expect("an answer past the limit");
    assert_eq!(refused.status, 503);
    assert!(
        refused.text().contains("connection limit reached"),
        "{}",
        refused.text()
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(third.closed_by_peer(Duration::from_secs(2)));
    let counted = proxy.workers.status()[0]
        .refusals
        .iter()
        .find(|r| r.status == 503 && r.reason == "connection limit reached")
        .map_or(0, |r| r.count);
    assert_eq!(counted, 1);
    // One closes: a new connection is served, and the others still are.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.workers.status()[0].open_connections > 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(proxy.get("app.test", "/").status, 200);
    assert_eq!(
        second
            .request("GET", "/", "app.test", "", Body::None)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn outlier_detection_ejects_a_failing_server_and_never_more_than_the_cap() {
    let o = origins(4);
    // Two of four servers break; the cap (25%) lets only one be ejected.
    o[0].set_failing(true);
    o[1].set_failing(true);
    let proxy = Proxy::start(
        "workers = 1\n",
        &vhost(
            "app",
            4,
            "[vhost.outlier]\nconsecutive_failures = 3\nbase_ejection_ms = 60000\nmax_ejection_percent = 25\n",
        ),
        &refs(&o),
    );
    let mut conn = proxy.conn();
    let mut failures: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        let response = conn
            .request("GET", "/", "app.test", "", Body::None)
            .unwrap();
        if response.status == 503 {
            *failures
                .entry(response.header("x-served-by").unwrap().to_string())
                .or_default() += 1;
        }
    }
    // Round robin over four servers: s1 fails requests 1, 5 and 9, and is then ejected for
    // the rest of the test. s2 reaches three failures next, but one of four is the cap.
    assert_eq!(failures.get("s1"), Some(&3), "{failures:?}");
    assert!(failures.get("s2").is_some_and(|&n| n > 25), "{failures:?}");
    assert_eq!(
        o[0].requests().len(),
        3,
        "the ejected server got no more requests"
    );
}

#[test]
fn when_every_server_is_down_the_pool_refuses_or_fails_open_as_configured() {
    let o = origins(2);
    let config = |policy: &str| {
        format!(
            r#"
[[vhost]]
name = "app"
listen = "LISTEN"
hosts = ["app.test"]
servers = [{{ address = "SERVER1" }}, {{ address = "SERVER2" }}]

[vhost.health]
all_down = "{policy}"
"#
        )
    };
    for (policy, status) in [("refuse", 503), ("fail_open", 200)] {
        let mut proxy = Proxy::start("", &config(policy), &refs(&o));
        assert_eq!(proxy.get("app.test", "/").status, 200);
        let (a, b) = (o[0].address, o[1].address);
        proxy.change(|v| v.set_health("app", a, HealthState::Unhealthy).unwrap());
        // One down: the other serves.
        for _ in 0..4 {
            assert_eq!(proxy.get("app.test", "/").text(), "s2\n");
        }
        proxy.change(|v| v.set_health("app", b, HealthState::Unhealthy).unwrap());
        assert_eq!(proxy.get("app.test", "/").status, status, "{policy}");
        // Admin state still wins when failing open.
        proxy.change(|v| v.set_state("app", a, AdminState::Disabled).unwrap());
        if policy == "fail_open" {
            for _ in 0..4 {
                assert_eq!(proxy.get("app.test", "/").text(), "s2\n");
            }
        }
    }
}

#[test]
fn a_server_joining_the_pool_ramps_up_over_its_slow_start() {
    let o = origins(2);
    let mut proxy = Proxy::start(
        "workers = 1\n",
        &vhost("app", 1, "slow_start_ms = 2000\n"),
        &refs(&o),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, address) = (Arc::clone(&stop), proxy.address);
        thread::spawn(move || {
            let mut conn = HttpConn::connect(address).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let response = conn
                    .request("GET", "/", "app.test", "", Body::None)
                    .unwrap();
                assert_eq!(response.status, 200);
            }
        })
    };
    thread::sleep(Duration::from_millis(200));
    let added = o[1].address;
    proxy.change(|v| v.add_server("app", added, 100).unwrap());
    let started = Instant::now();
    // Requests each server received, counted on the servers, at moments of the ramp.
    let counts_at = |ms: u64| {
        let at = started + Duration::from_millis(ms);
        thread::sleep(at.saturating_duration_since(Instant::now()));
        (o[0].requests().len() as f64, o[1].requests().len() as f64)
    };
    let marks: Vec<(f64, f64)> = [0, 500, 1500, 2000, 2500, 3500]
        .into_iter()
        .map(counts_at)
        .collect();
    // Down and healthy again (as health checks would report it): the ramp starts over.
    proxy.change(|v| v.set_health("app", added, HealthState::Unhealthy).unwrap());
    thread::sleep(Duration::from_millis(200));
    proxy.change(|v| v.set_health("app", added, HealthState::Healthy).unwrap());
    let recovered = Instant::now();
    let recovery_counts = |ms: u64| {
        let at = recovered + Duration::from_millis(ms);
        thread::sleep(at.saturating_duration_since(Instant::now()));
        (o[0].requests().len() as f64, o[1].requests().len() as f64)
    };
    let (r0, r1) = (recovery_counts(0), recovery_counts(500));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let recovery_share = (r1.1 - r0.1) / ((r1.0 - r0.0) + (r1.1 - r0.1));
    assert!(
        recovery_share < 0.15,
        "first 0.5 s after recovery: {recovery_share:.2}"
    );
    let share = |from: usize, to: usize| {
        let (a, b) = (marks[to].0 - marks[from].0, marks[to].1 - marks[from].1);
        b / (a + b)
    };
    let (early, late, after) = (share(0, 1), share(2, 3), share(4, 5));
    // Weight ramps 1 → 100 over 2 s against a peer at 100: about 6% of requests in the first
    // half second, about 46% in the last, half once it is over.
    assert!(early < 0.15, "first 0.5 s: {early:.2}");
    assert!(
        late > 0.35 && late > early * 3.0,
        "last 0.5 s: {late:.2}, first {early:.2}"
    );
    assert!((0.4..0.6).contains(&after), "after the ramp: {after:.2}");
}

#[test]
fn a_graceful_shutdown_finishes_exchanges_under_way_and_closes_idle_connections() {
    let o = origins(1);
    let mut proxy = Proxy::start("workers = 1", &vhost("g", 1, ""), &refs(&o));
    // A kept-alive connection between requests, and one that has sent nothing yet.
    let mut idle = proxy.conn();
    assert_eq!(
        idle.request("GET", "/", "g.test", "", Body::None)
            .unwrap()
            .status,
        200
    );
    let mut silent = proxy.conn();
    // A request under way: its server answers after 700 ms.
    let mut busy = proxy.conn();
    busy.send_raw(b"GET /slow/700 HTTP/1.1\r\nHost: g.test\r\n\r\n")
        .unwrap();
    wait_until_requests(&o[0], 2);
    let started = Instant::now();
    let open = proxy.workers.shut_down(Duration::from_secs(20));
    let took = started.elapsed();
    // The silent one is not among them: the kernel holds a connection back until its first
    // bytes arrive (TCP_DEFER_ACCEPT), so the workers never had it.
    assert_eq!(open, 2);
    // The exchange under way finished, and told its client the connection ends.
    let response = busy
        .read_response(false)
        .expect("the slow response arrives whole");
    assert_eq!(
        (response.status, response.text()),
        (200, "s1\n".to_string())
    );
    assert_eq!(response.header("connection"), Some("close"));
    // The idle ones were closed without waiting for their keep-alive timeout (60 s) or the
    // grace period: shutting down took about the slow response's time.
    assert!(took < Duration::from_secs(10), "{took:?}");
    for (name, conn) in [("idle", &mut idle), ("silent", &mut silent)] {
        assert!(
            conn.read_response(false).is_err(),
            "{name} connection still open"
        );
    }
    assert!(
        HttpConn::connect(proxy.address).is_err(),
        "a stopped proxy still accepts"
    );
}

#[test]
fn a_graceful_shutdown_cuts_what_outlasts_its_grace() {
    let o = origins(1);
    let mut proxy = Proxy::start("workers = 1", &vhost("c", 1, ""), &refs(&o));
    let mut busy = proxy.conn();
    busy.send_raw(b"GET /slow/5000 HTTP/1.1\r\nHost: c.test\r\n\r\n")
        .unwrap();
    wait_until_requests(&o[0], 1);
    let started = Instant::now();
    assert_eq!(proxy.workers.shut_down(Duration::from_millis(200)), 1);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(
        busy.read_response(false).is_err(),
        "the exchange was cut, not answered"
    );
}

/// Waits until `origin` has received `count` requests.
fn wait_until_requests(origin: &HttpOrigin, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.requests().len() < count {
        assert!(Instant::now() < deadline, "the origin got no request");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_client_that_sends_after_asking_to_close_still_gets_its_response() {
    // The client asks to close, then sends more while the server is still answering (it must
    // not, RFC 9112 §9.6). Those bytes are unread when weir closes, which makes the close a
    // reset: a response held back to leave with the FIN (`Conn::send_last`) would go with it.
    let o = origins(1);
    let proxy = Proxy::start("", &vhost("late", 1, ""), &refs(&o));
    let mut client = proxy.conn();
    client
        .send(
            "GET",
            "/slow/300",
            "late.test",
            "Connection: close\r\n",
            Body::None,
        )
        .unwrap();
    thread::sleep(Duration::from_millis(100));
    client
        .send_raw(b"GET / HTTP/1.1\r\nHost: late.test\r\n\r\n")
        .unwrap();
    let response = client
        .read_response(false)
        .expect("the whole response reaches a client that sent more");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("connection"), Some("close"));
}

#[test]
fn a_server_dying_mid_body_closes_the_client_connection_and_the_proxy_serves_on() {
    let o = origins(1);
    // One worker, lending a single pipe (a quarter of its connection limit): the cut relay's
    // pipe is closed, the next body gets a fresh one.
    let proxy = Proxy::start(
        "workers = 1\nmax_connections_per_worker = 4",
        &vhost("t", 1, ""),
        &refs(&o),
    );
    const SIZE: u64 = 4 << 20;
    for _ in 0..3 {
        // Long enough to be spliced after the head: the cut comes in the middle of it.
        let mut conn = proxy.conn();
        conn.send_raw(format!("GET /truncated/{SIZE} HTTP/1.1\r\nHost: t.test\r\n\r\n").as_bytes())
            .unwrap();
        let err = conn
            .read_response(false)
            .expect_err("a truncated body cannot complete");
        // Closed by the proxy (not left hanging until a timeout) after half the body.
        assert!(err.to_string().contains("body cut short"), "{err}");
        // Whole bodies still go through, spliced.
        let response = proxy
            .conn()
            .request("GET", &format!("/bytes/{SIZE}"), "t.test", "", Body::None)
            .unwrap();
        assert_eq!(
            (response.body_length, response.body_xxh3),
            pattern_digest(SIZE)
        );
    }
}

#[test]
fn a_client_that_stops_reading_a_body_is_cut_after_the_body_idle_timeout() {
    let o = origins(1);
    let proxy = Proxy::start("body_idle_timeout_ms = 300", &vhost("r", 1, ""), &refs(&o));
    // Far more than the socket buffers between the proxy and the client hold.
    const SIZE: u64 = 256 << 20;
    let mut conn = proxy.conn();
    conn.send_raw(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: r.test\r\n\r\n").as_bytes())
        .unwrap();
    // Not reading: the proxy's writes stall, and after 300 ms it gives up on the client.
    thread::sleep(Duration::from_millis(1500));
    let err = conn
        .read_response(false)
        .expect_err("a stalled client cannot get the whole body");
    assert!(
        err.to_string().contains("body cut short")
            || err.kind() == std::io::ErrorKind::ConnectionReset,
        "{err}"
    );
}

#[test]
fn server_counters_count_bytes_open_connections_retries_and_connect_failures() {
    let o = origins(1);
    // A port where nothing listens: connecting is refused, and the request goes on to s1.
    let dead = TcpListener::bind(SocketAddr::new(o[0].address.ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(
        "workers = 1\n",
        &format!(
            "[[vhost]]\nname = \"c\"\nlisten = \"LISTEN\"\nhosts = [\"c.test\"]\nservers = [{{ address = \"{dead}\" }}, {{ address = \"SERVER1\" }}]\n"
        ),
        &refs(&o),
    );
    let stats = |address| Arc::clone(proxy.workers.snapshot().server_stats("c", address).unwrap());
    let (live, down) = (stats(o[0].address), stats(dead));

    // Responses: exactly the bytes the client read (the connection closes after one).
    let mut client_read = 0;
    for size in [0usize, 1000, 200_000] {
        let request =
            format!("GET /bytes/{size} HTTP/1.1\r\nHost: c.test\r\nConnection: close\r\n\r\n");
        client_read += bytes_answered(proxy.address, request.as_bytes());
    }
    // A 300 kB upload: spliced past the first read, counted all the same.
    let mut upload = b"POST /upload HTTP/1.1\r\nHost: c.test\r\nConnection: close\r\nContent-Length: 300000\r\n\r\n".to_vec();
    upload.resize(upload.len() + 300_000, b'x');
    client_read += bytes_answered(proxy.address, &upload);
    let sent = live.request_bytes.load(Ordering::Relaxed);
    // Four heads of a few hundred bytes each as rewritten, and the body.
    assert!(
        (300_000 + 4 * 60..300_000 + 4 * 1024).contains(&sent),
        "request bytes {sent}"
    );
    assert_eq!(live.response_bytes.load(Ordering::Relaxed), client_read);

    // Every failed connection to the dead server was followed by a retry on s1.
    let failed = down.connect_failures.load(Ordering::Relaxed);
    assert!(failed > 0, "the dead server was tried");
    assert_eq!(down.failures.load(Ordering::Relaxed), failed);
    assert_eq!(down.retries.load(Ordering::Relaxed), failed);
    assert_eq!(live.retries.load(Ordering::Relaxed), 0);
    assert_eq!(down.open_connections.load(Ordering::Relaxed), 0);

    // Open connections: the proxy's count matches the origin's, and the listener counts
    // the clients holding connections open.
    let clients: Vec<HttpConn> = (0..3)
        .map(|_| {
            let mut conn = proxy.conn();
            assert_eq!(
                conn.request("GET", "/", "c.test", "", Body::None)
                    .unwrap()
                    .status,
                200
            );
            conn
        })
        .collect();
    let open = live.open_connections.load(Ordering::Relaxed);
    assert!(open >= 1, "pooled connections to s1 are open");
    assert_eq!(open as usize, o[0].open_connections());
    assert_eq!(proxy.workers.status()[0].open_connections, 3);
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.workers.status()[0].open_connections > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(proxy.workers.status()[0].open_connections, 0);
}

/// Sends `request` on a connection of its own and counts the bytes of the answer, which
/// must be a 200 followed by the proxy closing the connection.
fn bytes_answered(address: SocketAddr, request: &[u8]) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the proxy closes after the answer");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &answer[..answer.len().min(80)]
    );
    answer.len() as u64
}

/// A server that reads what it is sent and reports how each connection ended: `"reset"`
/// (the proxy aborted) or `"end"` (an orderly close), with the bytes it got. It answers
/// nothing, or `reply` once something arrived.
fn recording_server(
    address: SocketAddr,
    reply: &'static [u8],
) -> std::sync::mpsc::Receiver<(&'static str, Vec<u8>)> {
    use std::io::Write;
    let listener = TcpListener::bind(address).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { return };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let mut replied = false;
                let end = loop {
                    match weir_tests::read_some(&mut stream, &mut buf) {
                        Ok(0) => break "end",
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            if !reply.is_empty() && !replied {
                                replied = true;
                                let _ = stream.write_all(reply);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
                        Err(_) => break "error",
                    }
                };
                let _ = tx.send((end, got));
            });
        }
    });
    rx
}

#[test]
fn a_request_cut_mid_body_reaches_the_server_as_a_reset_never_as_its_end() {
    use std::io::Write;
    let net = next_net();
    let server: SocketAddr = format!("127.0.{net}.20:{}", free_port(net))
        .parse()
        .unwrap();
    let ended = recording_server(server, b"");
    let proxy = Proxy::start(
        "request_body_timeout_ms = 500\nrequest_body_min_rate = 100\n",
        &format!(
            "[[vhost]]\nname = \"r\"\nlisten = \"LISTEN\"\nhosts = [\"r.test\"]\nservers = [{{ address = \"{server}\" }}]\n"
        ),
        &[],
    );
    let wait = Duration::from_secs(5);
    let next_end = || {
        ended
            .recv_timeout(wait)
            .expect("the server saw the connection end")
    };

    // The client goes away after 100 of 1000 bytes.
    let mut client = std::net::TcpStream::connect(proxy.address).unwrap();
    client
        .write_all(b"POST /a HTTP/1.1\r\nHost: r.test\r\nContent-Length: 1000\r\n\r\n")
        .unwrap();
    client.write_all(&[b'x'; 100]).unwrap();
    thread::sleep(Duration::from_millis(200));
    drop(client);
    let (end, got) = next_end();
    assert_eq!(end, "reset", "got {} bytes", got.len());
    assert!(got.ends_with(&[b'x'; 100]), "the server had the part sent");

    // A chunked body whose trailer is not a field: 400 for the client, a reset for the server.
    let (answer, _) = raw_exchange(
        proxy.address,
        b"POST /b HTTP/1.1\r\nHost: r.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nnot a field\r\n\r\n",
        wait,
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid trailer field name"), "{answer}");
    let (end, got) = next_end();
    assert_eq!(end, "reset");
    assert!(
        !String::from_utf8_lossy(&got).contains("not a field"),
        "the bad trailer never reached the server"
    );

    // A body trickled a byte every 200 ms: 408 once it falls behind 0.5 s + 1 s per 100
    // bytes, long before the 30 s idle timeout, and a reset for the server.
    let mut client = std::net::TcpStream::connect(proxy.address).unwrap();
    client.set_read_timeout(Some(wait)).unwrap();
    client
        .write_all(b"POST /c HTTP/1.1\r\nHost: r.test\r\nContent-Length: 100\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    for _ in 0..50 {
        if client.write_all(b"x").is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(200));
        client.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1024];
        if let Ok(n) = std::io::Read::read(&mut client, &mut buf) {
            answer.extend_from_slice(&buf[..n]);
        }
        client.set_nonblocking(false).unwrap();
        if !answer.is_empty() {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("request body too slow"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(next_end().0, "reset");
}

#[test]
fn trace_h2c_upgrades_and_servers_answering_garbage_are_dealt_with_at_once() {
    let o = origins(1);
    let net = next_net();
    let garbage: SocketAddr = format!("127.0.{net}.20:{}", free_port(net))
        .parse()
        .unwrap();
    let _garbage = recording_server(garbage, b"SSH-2.0-OpenSSH_9.2\r\n");
    let proxy = Proxy::start(
        "",
        &format!(
            "{}\n[[vhost]]\nname = \"g\"\nlisten = \"LISTEN\"\nhosts = [\"g.test\"]\nservers = [{{ address = \"{garbage}\" }}]\n",
            vhost("h", 1, "")
        ),
        &refs(&o),
    );
    let wait = Duration::from_secs(5);

    // TRACE would echo cookies and credentials back (cross-site tracing): refused.
    let (answer, closed) = raw_exchange(
        proxy.address,
        b"TRACE / HTTP/1.1\r\nHost: h.test\r\nMax-Forwards: 0\r\n\r\n",
        wait,
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 501") && closed, "{answer}");
    assert!(o[0].requests().is_empty(), "nothing reached the server");

    // An h2c upgrade goes on as a plain HTTP/1.1 request.
    let (answer, _) = raw_exchange(
        proxy.address,
        b"GET /h2c HTTP/1.1\r\nHost: h.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Kept: 1\r\n\r\n",
        wait,
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = o[0]
        .requests()
        .pop()
        .expect("the request reached the server");
    assert_eq!(seen.target, "/h2c");
    assert!(seen.header("upgrade").is_none(), "{:?}", seen.headers);
    assert!(
        seen.header("http2-settings").is_none(),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.header("x-kept"), Some("1"));

    // A server answering another protocol: 502 at once, not 504 at the response timeout.
    let started = Instant::now();
    let (answer, _) = raw_exchange(
        proxy.address,
        b"GET / HTTP/1.1\r\nHost: g.test\r\n\r\n",
        wait,
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_connection_is_served_by_the_worker_on_the_cpu_that_received_it() {
    // One worker per CPU, the layout in which workers are pinned.
    let workers = thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = weir_forwarder::l7::cpus::worker_cpus(workers, true);
    let (Some(first), Some(second)) = (cpus[0], cpus.get(1).copied().flatten()) else {
        eprintln!("skipped: this thread may run on fewer than 2 CPUs ({workers})");
        return;
    };
    let o = origins(1);
    let proxy = Proxy::start(
        &format!("workers = {workers}\npin_workers = true"),
        &vhost("www", 1, ""),
        &refs(&o),
    );
    assert_eq!(
        proxy.workers.status()[0].connections_by_worker,
        vec![0; workers]
    );
    // On loopback the kernel handles a connection's handshake on the CPU of the thread that
    // connects, so the client thread moves from one worker's CPU to the other's. Spread by
    // hash instead, 12 connections would all land on the expected worker once in 4 096 runs.
    const CONNECTIONS: u64 = 12;
    for (worker, cpu) in [(0, first), (1, second), (0, first)] {
        weir_forwarder::l7::cpus::pin_current_thread(cpu).unwrap();
        let before = proxy.workers.status()[0].connections_by_worker.clone();
        for _ in 0..CONNECTIONS {
            let (answer, _) = raw_exchange(
                proxy.address,
                b"GET / HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n",
                Duration::from_secs(5),
            )
            .unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        let after = proxy.workers.status()[0].connections_by_worker.clone();
        let mut expected = before.clone();
        expected[worker] += CONNECTIONS;
        assert_eq!(after, expected, "client on CPU {cpu}, before: {before:?}");
    }
}
