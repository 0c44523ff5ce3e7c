//! The L7 access log: one structured line per request when `[l7] access_log = true`, none
//! otherwise. In a test binary of its own, because it installs the process's global tracing
//! subscriber (the workers log from their own threads).

use std::{
    io::Write,
    net::TcpListener,
    sync::{Arc, Mutex},
};

use serde_json::Value;
use weir_config::Config;
use weir_forwarder::{
    l7::{L7Snapshot, L7Workers},
    vhosts::Vhosts,
};
use weir_tests::{
    http_client::{Body, HttpConn},
    http_origin::HttpOrigin,
};

/// Collects everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn start(access_log: bool, origin: &HttpOrigin, net: u8) -> (L7Workers, std::net::SocketAddr) {
    let port = TcpListener::bind(format!("127.0.{net}.1:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.{net}.1:{port}");
    let text = format!(
        "[l7]\nworkers = 1\naccess_log = {access_log}\n\n[[vhost]]\nname = \"logged\"\nlisten = \"{listen}\"\nhosts = [\"log.test\"]\nservers = [{{ address = \"{}\" }}]\n",
        origin.address
    );
    let config = Config::parse(std::path::Path::new("test.toml"), &text).unwrap();
    let vhosts = Vhosts::plan(&config, None).unwrap();
    let workers = L7Workers::start(L7Snapshot::of(&vhosts, &config, None), 1).unwrap();
    (workers, listen.parse().unwrap())
}

#[test]
fn each_request_is_logged_once_with_its_route_and_outcome_when_enabled() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .with_env_filter("weir::access=info")
        .init();
    let origin = HttpOrigin::start("127.0.200.10:0".parse().unwrap(), "s1").unwrap();

    let (quiet, address) = start(false, &origin, 200);
    let mut conn = HttpConn::connect(address).unwrap();
    assert_eq!(
        conn.request("GET", "/a", "log.test", "", Body::None)
            .unwrap()
            .status,
        200
    );
    drop(quiet);
    assert!(
        captured.0.lock().unwrap().is_empty(),
        "no log when access_log is off"
    );

    let (_logged, address) = start(true, &origin, 201);
    let mut conn = HttpConn::connect(address).unwrap();
    assert_eq!(
        conn.request("GET", "/b?x=1", "log.test", "", Body::None)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        conn.request("GET", "/", "nobody.test", "", Body::None)
            .unwrap()
            .status,
        404
    );
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let fields = |i: usize| &lines[i]["fields"];
    assert_eq!(lines[0]["target"], "weir::access");
    assert_eq!(fields(0)["vhost"], "logged");
    assert_eq!(fields(0)["method"], "GET");
    assert_eq!(fields(0)["target"], "/b?x=1");
    assert_eq!(fields(0)["status"], 200);
    assert_eq!(fields(0)["server"], origin.address.to_string());
    assert!(
        fields(0)["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(fields(1)["vhost"], "-");
    assert_eq!(fields(1)["status"], 404);
    assert_eq!(fields(1)["host"], "nobody.test");
}
