//! The L7 access log, in process: the real workers writing the file the daemon would give
//! them. Each request is logged once with its route and outcome, in either format; none
//! when no file is set. (The daemon's side — reopening, signals, rate-limited refusals — is
//! `access_log_e2e`.)

use std::{path::Path, time::Duration};

use serde_json::Value;
use weir_config::AccessLogFormat;
use weir_forwarder::l7::access_log::LogFile;
use weir_tests::{
    http_client::{Body, HttpConn},
    http_origin::HttpOrigin,
    netns::wait_until,
    proxy::Proxy,
};

/// The workers with one vhost `log.test` in front of `origin` (on the origin's loopback net).
fn start(origin: &HttpOrigin) -> Proxy {
    let vhost = "[[vhost]]\nname = \"logged\"\nlisten = \"LISTEN\"\nhosts = [\"log.test\"]\nservers = [{ address = \"SERVER1\" }]\n";
    Proxy::start("", vhost, &[origin])
}

fn read_lines(path: &Path, count: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let _ = wait_until("access log lines", Duration::from_secs(5), || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        lines.len() >= count
    });
    lines
}

#[test]
fn each_request_is_logged_once_with_its_route_and_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let origin = HttpOrigin::start("127.0.200.10:0".parse().unwrap(), "s1").unwrap();
    let proxy = start(&origin);
    let (workers, address) = (&proxy.workers, proxy.address);

    let mut conn = HttpConn::connect(address).unwrap();
    let get = |conn: &mut HttpConn, target: &str, host: &str| {
        conn.request("GET", target, host, "", Body::None)
            .unwrap()
            .status
    };
    assert_eq!(get(&mut conn, "/unlogged", "log.test"), 200);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!path.exists(), "no file set: nothing logged");

    workers.set_access_log(Some(LogFile::open(&path, AccessLogFormat::Json).unwrap()));
    assert_eq!(get(&mut conn, "/b?x=1", "log.test"), 200);
    assert_eq!(get(&mut conn, "/bytes/5000", "log.test"), 200);
    assert_eq!(get(&mut conn, "/", "nobody.test"), 404);
    let lines: Vec<Value> = read_lines(&path, 3)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let line = |target: &str| lines.iter().find(|l| l["target"] == target).unwrap();
    let ok = line("/b?x=1");
    assert_eq!(ok["vhost"], "logged");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["server"], origin.address.to_string());
    assert_eq!(ok["listener"], address.to_string());
    assert!(ok["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    // Head and body as sent to the client.
    let bytes = line("/bytes/5000")["bytes"].as_u64().unwrap();
    assert!((5000 + 40..5000 + 400).contains(&bytes), "{bytes}");
    let unrouted = &lines[2];
    assert_eq!(unrouted["vhost"], "-");
    assert_eq!(unrouted["status"], 404);
    assert_eq!(unrouted["host"], "nobody.test");
    assert_eq!(unrouted["reason"], "no virtual host serves this Host");
    assert!(unrouted["server"].is_null());

    // The common format, to another file.
    let common = dir.path().join("common.log");
    workers.set_access_log(Some(
        LogFile::open(&common, AccessLogFormat::Common).unwrap(),
    ));
    let mut conn = HttpConn::connect(address).unwrap();
    assert_eq!(get(&mut conn, "/c", "log.test"), 200);
    let lines = read_lines(&common, 1);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with("127.0.0.1 - - [")
            && lines[0].contains(&format!(
                "\"GET /c HTTP/1.1\" 200 {} vhost=logged server={} us=",
                lines[0].split(" ").nth(9).unwrap(),
                origin.address
            )),
        "{}",
        lines[0]
    );
    assert_eq!(read_lines(&path, 3).len(), 3, "the first file got no more");
}
