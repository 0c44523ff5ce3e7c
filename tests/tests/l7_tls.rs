//! TLS termination end to end on loopback: the real workers in this process, certificates
//! issued by a throwaway CA into files, and real clients — curl, `openssl s_client`, and a
//! rustls client that keeps its connection open. No privileges needed.
//!
//! Checked: SNI picks each vhost's certificate and pool; ALPN, protocol versions and session
//! resumption; a name no vhost serves, and the default vhost; 421 for a Host another
//! certificate serves; HSTS, forwarding headers, redirect to HTTPS; a certificate swapped by
//! a reload reaches new connections while an open one keeps working; bodies of every size in
//! both framings, both ways; a WebSocket tunnel; a client's key update; and bad input —
//! plain HTTP, a malformed or truncated ClientHello, a client that never finishes — is
//! closed, counted, and leaves the proxy serving; a forged record after the handshake ends
//! its session with an alert.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use weir_config::{AccessLogFormat, control::TlsHandshakes};
use weir_forwarder::l7::access_log::LogFile;
use weir_tests::{
    http_client::{Body, is_pattern},
    http_origin::{HttpOrigin, pattern_digest},
    netns::wait_until,
    proxy::{Proxy, origins},
    tls::{IssuedFiles, KeyKind, TestCa, TlsClient},
};

/// A test's directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("weir-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TLS vhost `name` for `hosts` presenting `files`, with servers `SERVER1..n`.
fn tls_vhost(
    name: &str,
    hosts: &[&str],
    files: &IssuedFiles,
    servers: &[usize],
    more: &str,
) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    let pool: Vec<String> = servers
        .iter()
        .map(|i| format!("{{ address = \"SERVER{i}\" }}"))
        .collect();
    format!(
        "[[vhost]]\nname = \"{name}\"\nlisten = \"LISTEN\"\nhosts = [{}]\n{more}tls = {{ certificate = \"{}\", key = \"{}\" }}\nservers = [{}]\n",
        hosts.join(", "),
        files.certificate.display(),
        files.key.display(),
        pool.join(", ")
    )
}

/// Two vhosts on one TLS listener, `a.test` (servers s1) and `b.test` (s2, with HSTS), each
/// with its own certificate.
struct TwoSites {
    scratch: Scratch,
    ca: TestCa,
    a: IssuedFiles,
    b: IssuedFiles,
    origins: Vec<HttpOrigin>,
    proxy: Proxy,
}

fn two_sites(name: &str, l7: &str, b_kind: KeyKind) -> TwoSites {
    let scratch = Scratch::new(name);
    let ca = TestCa::new(&scratch.0);
    let a = ca.issue(&scratch.0, "a", &["a.test"], KeyKind::EcdsaP256);
    let b = ca.issue(&scratch.0, "b", &["b.test", "*.b.test"], b_kind);
    let origins = origins(2);
    let config = tls_vhost("a", &["a.test"], &a, &[1], "")
        + &tls_vhost(
            "b",
            &["b.test", "*.b.test"],
            &b,
            &[2],
            "hsts_max_age_secs = 31536000\n",
        );
    let proxy = Proxy::start(l7, &config, &origins.iter().collect::<Vec<_>>());
    TwoSites {
        scratch,
        ca,
        a,
        b,
        origins,
        proxy,
    }
}

impl TwoSites {
    fn client(&self, name: &str) -> std::io::Result<TlsClient> {
        TlsClient::connect(self.proxy.address, name, self.ca.client_config())
    }

    /// `curl` to `https://host/path` at the proxy, trusting the test CA: its output.
    fn curl(&self, host: &str, path: &str, extra: &[&str]) -> Output {
        let port = self.proxy.address.port();
        Command::new("curl")
            .args(["-sS", "-i", "--max-time", "5", "--cacert"])
            .arg(&self.ca.path)
            .arg("--resolve")
            .arg(format!("{host}:{port}:{}", self.proxy.address.ip()))
            .args(extra)
            .arg(format!("https://{host}:{port}{path}"))
            .output()
            .expect("curl runs")
    }

    /// `openssl s_client` to the proxy with `args`, stdin empty: what it printed.
    fn s_client(&self, args: &[&str]) -> String {
        self.s_client_sending(args, b"")
    }

    /// [`TwoSites::s_client`] sending `input` once connected, then reading until the proxy
    /// closes (so a TLS 1.3 ticket sent after the handshake is read too).
    fn s_client_sending(&self, args: &[&str], input: &[u8]) -> String {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &self.proxy.address.to_string(),
                "-CAfile",
            ])
            .arg(&self.ca.path)
            .args(args)
            .args(if input.is_empty() {
                &[][..]
            } else {
                &["-ign_eof"][..]
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl runs");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    fn handshakes(&self) -> TlsHandshakes {
        self.proxy.workers.status()[0]
            .tls
            .clone()
            .expect("the listener reports TLS handshakes")
    }

    fn failures(&self, reason: &str) -> u64 {
        self.handshakes()
            .failures
            .iter()
            .find(|(r, _)| r == reason)
            .map_or(0, |&(_, n)| n)
    }

    /// Waits until `reason` has counted `n` failed handshakes (the count follows the close a
    /// client sees by a moment), and fails the test if it does not, or counts more.
    fn expect_failures(&self, reason: &str, n: u64) {
        let _ = wait_until(reason, Duration::from_secs(5), || {
            self.failures(reason) >= n
        });
        assert_eq!(
            self.failures(reason),
            n,
            "{reason}: {:?}",
            self.handshakes()
        );
    }
}

/// One TLS vhost `d.test` that is its listener's default (so it answers any name, and no
/// SNI), with one origin.
fn default_site(name: &str) -> (Scratch, TestCa, Vec<HttpOrigin>, Proxy) {
    let scratch = Scratch::new(name);
    let ca = TestCa::new(&scratch.0);
    let files = ca.issue(&scratch.0, "d", &["d.test"], KeyKind::EcdsaP256);
    let origins = origins(1);
    let vhost = tls_vhost("d", &["d.test"], &files, &[1], "default = true\n");
    let proxy = Proxy::start("", &vhost, &[&origins[0]]);
    (scratch, ca, origins, proxy)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn sni_picks_each_vhost_certificate_and_pool() {
    let sites = two_sites("sni", "", KeyKind::Rsa2048);
    let a = sites.curl("a.test", "/", &[]);
    assert!(a.status.success(), "{}", text(&a));
    let a = text(&a);
    assert!(a.starts_with("HTTP/1.1 200") && a.ends_with("s1\n"), "{a}");
    assert!(
        !a.to_ascii_lowercase().contains("strict-transport-security"),
        "{a}"
    );
    // b.test presents an RSA certificate that names it (curl verifies), reaches s2, HSTS on.
    let b = sites.curl("www.b.test", "/", &[]);
    assert!(b.status.success(), "{}", text(&b));
    let b = text(&b);
    assert!(b.ends_with("s2\n"), "{b}");
    assert!(
        b.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{b}"
    );
    let mut client = sites.client("a.test").unwrap();
    assert_eq!(client.peer_certificate(), sites.a.der);
    assert_eq!(client.alpn().as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(client.get("a.test", "/").unwrap().body, "s1\n");
    let client = sites.client("b.test").unwrap();
    assert_eq!(client.peer_certificate(), sites.b.der);
    // The servers hear that the client used HTTPS.
    let seen = sites.origins[0].requests();
    let last = seen.last().unwrap();
    assert_eq!(last.header("x-forwarded-proto"), Some("https"), "{last:?}");
    let _ = wait_until("handshakes", Duration::from_secs(5), || {
        sites.handshakes().full >= 4
    });
    assert_eq!(sites.handshakes().full, 4, "{:?}", sites.handshakes());
}

#[test]
fn openssl_sees_alpn_versions_and_resumed_sessions() {
    let sites = two_sites("openssl", "", KeyKind::EcdsaP256);
    let out = sites.s_client(&["-servername", "a.test", "-alpn", "http/1.1"]);
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
    assert!(out.contains("Verification: OK"), "{out}");
    for version in ["-tls1_2", "-tls1_3"] {
        let out = sites.s_client(&["-servername", "a.test", version, "-brief"]);
        // OpenSSL asks for AES-256 first; weir's own order puts AES-128 first.
        let (expected, suite) = if version == "-tls1_2" {
            ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
        } else {
            ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
        };
        assert!(
            out.contains(&format!("Protocol version: {expected}")),
            "{version}: {out}"
        );
        assert!(
            out.contains(&format!("Ciphersuite: {suite}")),
            "{version}: {out}"
        );
    }
    // TLS 1.1 and older are refused.
    let out = sites.s_client(&["-servername", "a.test", "-tls1_1", "-brief"]);
    assert!(!out.contains("Protocol version"), "{out}");
    // Resumption, with TLS 1.3 tickets and with TLS 1.2.
    for version in ["-tls1_3", "-tls1_2"] {
        let session = sites.scratch.0.join(format!("session{version}.pem"));
        let request = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
        let first = sites.s_client_sending(
            &[
                "-servername",
                "a.test",
                version,
                "-sess_out",
                session.to_str().unwrap(),
            ],
            request,
        );
        assert!(first.contains("New, TLSv1."), "{version}: {first}");
        let again = sites.s_client(&[
            "-servername",
            "a.test",
            version,
            "-sess_in",
            session.to_str().unwrap(),
        ]);
        assert!(again.contains("Reused, TLSv1."), "{version}: {again}");
    }
    let _ = wait_until("resumptions", Duration::from_secs(5), || {
        sites.handshakes().resumed >= 2
    });
    assert_eq!(sites.handshakes().resumed, 2, "{:?}", sites.handshakes());
}

#[test]
fn a_finished_connection_ends_with_close_notify_so_sessions_stay_resumable() {
    // `openssl s_time` sends HTTP/1.0 without SNI and reads until the close: the listener's
    // default vhost answers, and weir ends with `close_notify`. Without it OpenSSL forgets
    // the session (an unclean end could be a truncation), and `-reuse` would print no `r`
    // (a resumed connection) at all.
    let (_scratch, ca, _origins, proxy) = default_site("close-notify");
    let out = Command::new("openssl")
        .args([
            "s_time",
            "-connect",
            &proxy.address.to_string(),
            "-reuse",
            "-time",
            "1",
        ])
        .args(["-www", "/", "-CAfile"])
        .arg(&ca.path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let printed = text(&out);
    assert!(printed.contains("rrrr"), "{printed}");
}

#[test]
fn a_client_that_ends_its_session_before_the_response_still_gets_all_of_it() {
    // The client asks to close and sends `close_notify` while the server is still answering
    // (the TLS form of a half-close). Its alert is unread when weir closes, so the close is a
    // reset: a response held back to leave with the FIN (`Conn::send_last`) would go with it.
    let (_scratch, ca, _origins, proxy) = default_site("half-close");
    let mut client = TlsClient::connect(proxy.address, "d.test", ca.client_config()).unwrap();
    client
        .send_get("d.test", "/slow/300", "Connection: close\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    client.send_close_notify().unwrap();
    let response = client
        .read_response()
        .expect("the whole response reaches a client that ended its side");
    assert_eq!(response.status, 200, "{response:?}");
}

#[test]
fn bodies_of_every_size_cross_https_whole_in_both_framings() {
    // Sizes either side of what a response head carries with it (weir reads 16 KiB at a
    // time; 4 KiB and more of body read with the head is written beside it, decision 0034),
    // and bodies many TLS records and many reads long, on one kept-alive connection.
    let (_scratch, ca, origins, proxy) = default_site("bodies");
    let mut client = TlsClient::connect(proxy.address, "d.test", ca.client_config()).unwrap();
    for size in [
        0,
        5,
        4095,
        4096,
        5000,
        16_000,
        17_000,
        65_536,
        1 << 20,
        8 << 20,
    ] {
        for path in [format!("/bytes/{size}"), format!("/chunked/{size}")] {
            let response = client
                .request("GET", &path, "d.test", "", Body::None)
                .unwrap();
            assert_eq!(response.status, 200, "{path}");
            assert_eq!(
                (response.body_length, response.body_xxh3),
                pattern_digest(size),
                "{path}"
            );
            assert!(is_pattern(&response.body), "{path}");
        }
    }
    const UPLOAD: u64 = 8 << 20;
    let (_, digest) = pattern_digest(UPLOAD);
    for body in [Body::Fixed(UPLOAD), Body::Chunked(UPLOAD)] {
        let response = client
            .request("POST", "/upload", "d.test", "", body)
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.text(),
            format!("{UPLOAD} {digest:016x}\n"),
            "{body:?}"
        );
    }
    // A body sent in small records: rustls holds at most 16 KiB of decrypted plaintext, and
    // one read of ciphertext can hold more than that.
    let body: Vec<u8> = (0..UPLOAD).map(weir_tests::http_origin::pattern).collect();
    let mut upload =
        format!("POST /upload HTTP/1.1\r\nHost: d.test\r\nContent-Length: {UPLOAD}\r\n\r\n")
            .into_bytes();
    upload.extend_from_slice(&body);
    for record in [1000, 5000] {
        client.send_in_records(&upload, record).unwrap();
        let response = client.read_any_response().unwrap();
        assert_eq!(
            response.text(),
            format!("{UPLOAD} {digest:016x}\n"),
            "in records of {record} bytes"
        );
    }
    // Pipelined: three requests in one record, three responses in order.
    let three = "GET /bytes/20000 HTTP/1.1\r\nHost: d.test\r\n\r\n".repeat(3);
    client.send_in_records(three.as_bytes(), 16 * 1024).unwrap();
    for _ in 0..3 {
        let response = client.read_any_response().unwrap();
        assert_eq!(
            (response.body_length, response.body_xxh3),
            pattern_digest(20_000)
        );
    }
    assert_eq!(origins[0].connections(), 1);
    // The last response of a connection the client closes goes out with `close_notify`.
    let response = client
        .request(
            "GET",
            "/bytes/70000",
            "d.test",
            "Connection: close\r\n",
            Body::None,
        )
        .unwrap();
    assert_eq!(
        (response.body_length, response.body_xxh3),
        pattern_digest(70_000)
    );
    assert!(
        client.read_to_end().unwrap().is_empty(),
        "the session ends cleanly after the response"
    );
}

#[test]
fn a_websocket_upgrade_over_tls_is_tunnelled_both_ways() {
    // After the upgrade weir reads the client and writes it at once, through one rustls
    // session: what the client sends in many small records comes back from the origin's echo
    // byte for byte, round after round.
    let (_scratch, ca, origins, proxy) = default_site("websocket");
    let mut client = TlsClient::connect(proxy.address, "d.test", ca.client_config()).unwrap();
    client
        .send_get(
            "d.test",
            "/ws",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        )
        .unwrap();
    let response = client.read_any_response().unwrap();
    assert_eq!(response.status, 101);
    assert_eq!(response.header("upgrade"), Some("websocket"));
    assert_eq!(
        origins[0].requests()[0].header("upgrade"),
        Some("websocket")
    );
    for (round, record) in [(0u8, 16 * 1024), (1, 1000), (2, 100)] {
        let message: Vec<u8> = (0..100 * 1024u32)
            .map(|i| (i as u8).wrapping_add(round))
            .collect();
        client.send_in_records(&message, record).unwrap();
        let echoed = client.read_exact_bytes(message.len()).unwrap();
        assert!(echoed == message, "round {round}: the echo differs");
    }
}

#[test]
fn a_forged_record_ends_its_connection_with_an_alert_and_nothing_else() {
    // After the handshake, a record weir cannot authenticate (an attacker's bytes injected
    // into the stream, or corruption the TCP checksum missed) is fatal to the session:
    // `bad_record_mac`, sealed as TLS 1.3 seals alerts, then the close. Nothing reaches the
    // server, and other connections are served.
    let (_scratch, ca, origins, proxy) = default_site("forged");
    let mut client = TlsClient::connect(proxy.address, "d.test", ca.client_config()).unwrap();
    assert_eq!(client.get("d.test", "/").unwrap().status, 200);
    // An application-data record of 64 bytes that no key sealed.
    let mut forged = vec![23, 3, 3, 0, 64];
    forged.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    client.send_raw_ciphertext(&forged).unwrap();
    let err = client
        .read_to_end()
        .expect_err("the session ends in an alert, not a clean close");
    assert!(err.to_string().contains("BadRecordMac"), "{err}");
    assert_eq!(origins[0].requests().len(), 1);
    let mut other = TlsClient::connect(proxy.address, "d.test", ca.client_config()).unwrap();
    assert_eq!(other.get("d.test", "/").unwrap().status, 200);
}

#[test]
fn a_key_update_from_the_client_is_taken_and_the_session_carries_on() {
    // TLS 1.3 lets either side roll its keys at any time; a long-lived connection does. The
    // client's records after the update are sealed with new keys, which weir must follow, and
    // it asks weir to roll its own, which weir answers with its next response.
    let (_scratch, ca, _origins, proxy) = default_site("key-update");
    let mut client = TlsClient::connect(proxy.address, "d.test", ca.client_config()).unwrap();
    for round in 0..3 {
        client.update_keys().unwrap();
        for path in ["/", "/bytes/100000"] {
            let response = client
                .request("GET", path, "d.test", "", Body::None)
                .unwrap_or_else(|e| panic!("round {round}, {path}: {e}"));
            assert_eq!(response.status, 200, "round {round}, {path}");
        }
    }
}

#[test]
fn unknown_names_fail_cleanly_and_the_default_vhost_takes_them_when_there_is_one() {
    let sites = two_sites("unknown", "", KeyKind::EcdsaP256);
    let out = sites.curl("c.test", "/", &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = sites.s_client(&["-noservername", "-brief"]);
    assert!(
        !out.contains("Protocol version"),
        "no SNI, no default: {out}"
    );
    sites.expect_failures("unknown_name", 2);

    // With a default vhost, unknown names and no SNI get its certificate.
    let (_scratch, ca, _origins, proxy) = default_site("default");
    let mut client = TlsClient::connect(proxy.address, "d.test", ca.client_config()).unwrap();
    assert_eq!(client.get("other.test", "/").unwrap().body, "s1\n");
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &proxy.address.to_string(),
            "-noservername",
            "-brief",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(text(&out).contains("Protocol version"), "{}", text(&out));
}

#[test]
fn a_host_the_presented_certificate_does_not_serve_gets_421() {
    let sites = two_sites("misdirected", "", KeyKind::EcdsaP256);
    let mut client = sites.client("a.test").unwrap();
    assert_eq!(client.get("a.test", "/").unwrap().status, 200);
    let response = client.get("b.test", "/").unwrap();
    assert_eq!(response.status, 421, "{response:?}");
    assert!(sites.origins[1].requests().is_empty());
}

#[test]
fn a_plain_vhost_can_redirect_to_https() {
    let origins = origins(1);
    let proxy = Proxy::start(
        "",
        "[[vhost]]\nname = \"r\"\nlisten = \"LISTEN\"\nhosts = [\"r.test\"]\nredirect_to_https = true\nservers = [{ address = \"SERVER1\" }]\n",
        &[&origins[0]],
    );
    let mut conn = proxy.conn();
    let response = conn
        .request(
            "GET",
            "/a/b?c=d",
            "r.test",
            "",
            weir_tests::http_client::Body::None,
        )
        .unwrap();
    assert_eq!(response.status, 308);
    assert_eq!(response.header("location"), Some("https://r.test/a/b?c=d"));
    // Kept alive, and the pool never saw a request.
    let again = conn
        .request(
            "GET",
            "/",
            "r.test",
            "",
            weir_tests::http_client::Body::None,
        )
        .unwrap();
    assert_eq!(again.status, 308);
    assert!(origins[0].requests().is_empty());
}

#[test]
fn a_reloaded_certificate_reaches_new_connections_while_open_ones_keep_working() {
    let mut sites = two_sites("reload", "", KeyKind::EcdsaP256);
    let mut open = sites.client("a.test").unwrap();
    assert_eq!(open.get("a.test", "/").unwrap().status, 200);
    // The operator puts a renewed certificate (a new key too) in place and reloads.
    let renewed = sites.ca.issue(
        &sites.scratch.0,
        "a-renewed",
        &["a.test"],
        KeyKind::EcdsaP256,
    );
    std::fs::copy(&renewed.certificate, &sites.a.certificate).unwrap();
    std::fs::copy(&renewed.key, &sites.a.key).unwrap();
    sites.proxy.reload_tls();
    let fresh = sites.client("a.test").unwrap();
    assert_eq!(
        fresh.peer_certificate(),
        renewed.der,
        "new connections get the new one"
    );
    assert_eq!(open.peer_certificate(), sites.a.der);
    for _ in 0..3 {
        assert_eq!(open.get("a.test", "/").unwrap().body, "s1\n");
    }
}

/// Sends `bytes` on a new connection to the proxy, then what it answers until it closes.
fn raw(address: SocketAddr, bytes: &[u8], then_wait: Duration) -> (Vec<u8>, Duration) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    std::thread::sleep(then_wait);
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    (answer, started.elapsed())
}

#[test]
fn bad_handshakes_are_closed_counted_and_leave_the_proxy_serving() {
    let sites = two_sites(
        "bad",
        "tls_handshake_timeout_ms = 400\n",
        KeyKind::EcdsaP256,
    );
    let address = sites.proxy.address;

    // Plain HTTP to the TLS port: a 400 that says so.
    let (answer, _) = raw(
        address,
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Duration::ZERO,
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("HTTPS"),
        "{answer}"
    );
    sites.expect_failures("plaintext_http", 1);

    // A handshake record whose ClientHello is garbage: a fatal alert (content type 21).
    let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c];
    garbage.extend(std::iter::repeat_n(0xee, 0x3c));
    let (answer, _) = raw(address, &garbage, Duration::ZERO);
    assert_eq!(answer.first(), Some(&21), "{answer:?}");
    sites.expect_failures("protocol", 1);

    // A truncated ClientHello, then nothing: closed at the handshake timeout.
    let (_, waited) = raw(address, &garbage[..20], Duration::ZERO);
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // A client that connects and never speaks, and one that trickles its hello.
    let (_, waited) = raw(address, b"", Duration::ZERO);
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let mut slow = TcpStream::connect(address).unwrap();
    for byte in &garbage[..6] {
        if slow.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let mut rest = Vec::new();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = slow.read_to_end(&mut rest);
    sites.expect_failures("timeout", 3);

    // A client that gives up half way.
    let (_, _) = {
        let mut gone = TcpStream::connect(address).unwrap();
        gone.write_all(&garbage[..20]).unwrap();
        drop(gone);
        std::thread::sleep(Duration::from_millis(200));
        ((), ())
    };
    sites.expect_failures("closed", 1);

    // Through all of it, the proxy serves.
    let mut client = sites.client("a.test").unwrap();
    assert_eq!(client.get("a.test", "/").unwrap().status, 200);
}

#[test]
fn bad_certificate_files_are_refused_with_the_path_and_the_reason() {
    let scratch = Scratch::new("files");
    let ca = TestCa::new(&scratch.0);
    let a = ca.issue(&scratch.0, "a", &["a.test"], KeyKind::EcdsaP256);
    let other = ca.issue(&scratch.0, "other", &["other.test"], KeyKind::EcdsaP256);
    let not_pem = scratch.0.join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let missing = scratch.0.join("missing.pem");
    let cases: [(&Path, &Path, &Path, &str); 4] = [
        (&missing, &a.key, &missing, "cannot read"),
        (&not_pem, &a.key, &not_pem, "holds no certificate"),
        (&a.certificate, &not_pem, &not_pem, "no usable private key"),
        (
            &a.certificate,
            &other.key,
            &other.key,
            "does not belong to the certificate",
        ),
    ];
    for (certificate, key, blamed, reason) in cases {
        let text = format!(
            "[[vhost]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nhosts = [\"a.test\"]\ntls = {{ certificate = \"{}\", key = \"{}\" }}\nservers = [{{ address = \"127.0.0.1:2\" }}]\n",
            certificate.display(),
            key.display()
        );
        let config = weir_config::Config::parse(Path::new("t.toml"), &text).unwrap();
        let sessions = weir_forwarder::l7::tls::Sessions::new().unwrap();
        let err = weir_forwarder::l7::tls::TlsListeners::load(&config, &sessions).unwrap_err();
        assert_eq!(err.path, blamed, "{err}");
        assert!(err.to_string().contains(reason), "{err}");
    }
}

/// `openssl s_server` on `address` presenting `files`: a TLS origin weir never sees inside.
struct TlsOrigin(std::process::Child);

impl TlsOrigin {
    fn start(address: SocketAddr, files: &IssuedFiles) -> TlsOrigin {
        let child = Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &address.to_string(),
                "-cert",
            ])
            .arg(&files.certificate)
            .arg("-key")
            .arg(&files.key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server runs");
        wait_until("s_server listening", Duration::from_secs(5), || {
            TcpStream::connect(address).is_ok()
        })
        .unwrap();
        TlsOrigin(child)
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn passthrough_routes_by_sni_to_servers_that_terminate_tls_themselves() {
    let scratch = Scratch::new("passthrough");
    let ca = TestCa::new(&scratch.0);
    let p = ca.issue(&scratch.0, "p", &["p.test"], KeyKind::EcdsaP256);
    let q = ca.issue(&scratch.0, "q", &["q.test"], KeyKind::Rsa2048);
    let net = weir_tests::proxy::next_net();
    let p_addr: SocketAddr = format!("127.0.{net}.11:{}", weir_tests::proxy::free_port(net))
        .parse()
        .unwrap();
    let q_addr: SocketAddr = format!("127.0.{net}.12:{}", weir_tests::proxy::free_port(net))
        .parse()
        .unwrap();
    // Nothing listens here.
    let dead_addr: SocketAddr = format!("127.0.{net}.13:{}", weir_tests::proxy::free_port(net))
        .parse()
        .unwrap();
    let _p_origin = TlsOrigin::start(p_addr, &p);
    let _q_origin = TlsOrigin::start(q_addr, &q);
    // Placeholders: the proxy helper fills SERVERn from HTTP origins, so the TLS ones are
    // written in directly.
    let config = format!(
        "[[vhost]]\nname = \"p\"\nlisten = \"LISTEN\"\nhosts = [\"p.test\"]\ntls_passthrough = true\nservers = [{{ address = \"{p_addr}\" }}]\n\n[[vhost]]\nname = \"q\"\nlisten = \"LISTEN\"\nhosts = [\"*.q.test\", \"q.test\"]\ntls_passthrough = true\nservers = [{{ address = \"{q_addr}\" }}]\n\n[[vhost]]\nname = \"dead\"\nlisten = \"LISTEN\"\nhosts = [\"dead.test\"]\ntls_passthrough = true\nservers = [{{ address = \"{dead_addr}\" }}]\n"
    );
    let proxy = Proxy::start("tls_handshake_timeout_ms = 500\n", &config, &[]);
    let log_path = scratch.0.join("access.log");
    proxy.workers.set_access_log(Some(
        LogFile::open(&log_path, AccessLogFormat::Json).unwrap(),
    ));
    let port = proxy.address.port();
    let curl = |host: &str| {
        Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&ca.path)
            .arg("--resolve")
            .arg(format!("{host}:{port}:{}", proxy.address.ip()))
            .arg(format!("https://{host}:{port}/"))
            .output()
            .unwrap()
    };
    // Each name reaches the server holding its certificate (curl checks the name), and the
    // page is s_server's own.
    for host in ["p.test", "q.test"] {
        let out = curl(host);
        assert!(out.status.success(), "{host}: {}", text(&out));
        assert!(text(&out).contains("s_server"), "{}", text(&out));
    }
    // The certificate is the origin's: weir has none.
    let client = TlsClient::connect(proxy.address, "q.test", ca.client_config()).unwrap();
    assert_eq!(client.peer_certificate(), q.der);
    drop(client);
    // A vhost whose server cannot be reached: the connection is closed.
    assert!(!curl("dead.test").status.success());
    // A name no vhost serves: an alert, counted; plain HTTP: told to use HTTPS.
    assert!(!curl("r.test").status.success());
    let (answer, _) = raw(
        proxy.address,
        b"GET / HTTP/1.1\r\nHost: p.test\r\n\r\n",
        Duration::ZERO,
    );
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"));
    let handshakes = || proxy.workers.status()[0].tls.clone().unwrap();
    let _ = wait_until("counts", Duration::from_secs(5), || {
        handshakes().passed_through >= 4 && handshakes().failures.len() >= 2
    });
    let counted = handshakes();
    assert_eq!(counted.passed_through, 4, "{counted:?}");
    assert_eq!(counted.full, 0, "{counted:?}");
    assert!(
        counted.failures.contains(&("unknown_name".to_string(), 1))
            && counted
                .failures
                .contains(&("plaintext_http".to_string(), 1)),
        "{counted:?}"
    );
    // One access-log line per routed connection, when it ends; none for the failed
    // handshakes.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let _ = wait_until("access log lines", Duration::from_secs(5), || {
        lines = std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        lines.len() >= 4
    });
    std::thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    let mut seen: Vec<(String, String, serde_json::Value)> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["protocol"], "TLS", "{l}");
            assert_eq!(l["method"], "-", "{l}");
            assert_eq!(l["status"], 0, "{l}");
            assert_eq!(l["listener"], proxy.address.to_string(), "{l}");
            assert!(l["micros"].as_u64().is_some(), "{l}");
            let routed = (
                l["host"].as_str().unwrap().to_string(),
                l["vhost"].as_str().unwrap().to_string(),
                l["server"].clone(),
            );
            if l["server"].is_null() {
                assert_eq!(l["reason"], "no server reachable", "{l}");
                assert_eq!(l["bytes"], 0, "{l}");
            } else {
                assert!(l.get("reason").is_none(), "{l}");
                // At least the server's certificate went to the client.
                assert!(l["bytes"].as_u64().unwrap() > 500, "{l}");
            }
            routed
        })
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let server = |a: SocketAddr| serde_json::Value::String(a.to_string());
    assert_eq!(
        seen,
        vec![
            ("dead.test".into(), "dead".into(), serde_json::Value::Null),
            ("p.test".into(), "p".into(), server(p_addr)),
            ("q.test".into(), "q".into(), server(q_addr)),
            ("q.test".into(), "q".into(), server(q_addr)),
        ]
    );
}
