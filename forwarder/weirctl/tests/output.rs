//! What `weirctl` prints for each verb, text and JSON, checked against snapshots
//! (`tests/snapshots/`): the JSON shapes are the stable interface scripts use, and the tables
//! are what operators read. A fake daemon on a real control socket answers with fixed reports,
//! so the output depends on nothing but `weirctl`.

use std::{path::Path, process::Command, sync::Arc};

use weir_config::control::{ControlError, ControlErrorKind, Request, Response};
use weir_control::{HandOver, bind, serve};

/// The reports the fake daemon answers with.
const STATUS: &str = r#"{
  "daemon": { "pid": 4242, "version": "0.1.0", "config": "/etc/weir/weir.toml",
              "uptime_secs": 3600, "state_file": "/var/lib/weir/state.json",
              "bpf_dir": "/sys/fs/bpf/weir", "adopted_datapath": true,
              "reloads": { "succeeded": 4, "failed": 1, "last_unix_ms": 1764201600000, "last_succeeded": true, "last_success_unix_ms": 1764201600000 } },
  "xdp": [
    { "interface": "eth0", "ifindex": 2, "mode": "native", "program_id": 41, "tc_program_id": 42 },
    { "interface": "eth1", "ifindex": 3, "mode": "native", "program_id": null, "tc_program_id": 42 }
  ],
  "counters": [
    { "reason": "pass_not_vip", "packets": 1200, "bytes": 96000 },
    { "reason": "forward_nat", "packets": 5400, "bytes": 4320000 },
    { "reason": "drop_unsupported_mode", "packets": 0, "bytes": 0 }
  ],
  "flows": { "embryonic": 12, "events": [
    { "event": "embryonic_created", "count": 310 },
    { "event": "embryonic_promoted", "count": 298 },
    { "event": "flood_deferred", "count": 0 } ] },
  "listeners": [ { "address": "198.18.100.11:80", "workers": 2, "connections": 77, "connections_by_worker": [40, 37], "requests": 901,
                  "refusals": [ { "status": 400, "reason": "missing Host header", "count": 3 },
                                { "status": 408, "reason": "request head not received in time", "count": 1 } ] },
                 { "address": "198.18.100.11:443", "workers": 2, "connections": 12, "connections_by_worker": [5, 7], "requests": 40,
                  "tls": { "full": 9, "resumed": 3, "failures": [ ["timeout", 1], ["unknown_name", 2] ] } } ],
  "certificates": [ { "vhost": "shop", "path": "/etc/weir/shop.pem", "not_after_unix": 4000000000 },
                    { "vhost": "old", "path": "/etc/weir/old.pem", "not_after_unix": 1600000000 } ]
}"#;

const VIPS: &str = r#"[
  { "name": "web", "address": "198.18.100.10:80", "protocol": "tcp", "mode": "nat",
    "hash": "five_tuple", "table_size": 65537, "servers": 2, "ready": 1, "active_flows": 5,
    "traffic": { "packets": 5400, "bytes": 4320000, "new_flows": 300 },
    "table_digest": "5d1c0e6a7f3b2a91" }
]"#;

const WEB_SERVERS: &str = r#"[
  { "vip": "web", "address": "198.18.11.2:8080", "weight": 100, "admin": "ready",
    "health": "healthy", "active_flows": 5,
    "traffic": { "packets": 5000, "bytes": 4000000, "new_flows": 280 },
    "last_check": "ok 0.4 s ago" },
  { "vip": "web", "address": "198.18.12.2:8080", "weight": 50, "admin": "draining",
    "health": "unhealthy", "active_flows": 0,
    "traffic": { "packets": 400, "bytes": 320000, "new_flows": 20 },
    "health_since_unix_ms": 1764201600000, "health_reason": "connect refused" }
]"#;

const SITE_SERVERS: &str = r#"[
  { "vip": "site", "address": "127.0.0.1:8081", "weight": 100, "admin": "ready",
    "health": "unchecked", "active_flows": 1,
    "traffic": { "packets": 0, "bytes": 0, "new_flows": 0 },
    "l7": { "requests": 900, "in_flight": 1, "responses": [0, 880, 0, 15, 5],
            "failures": 2, "connections": 40, "ejected_ms": 0 } }
]"#;

const EVENTS: &str = r#"[
  { "seq": 1, "unix_ms": 1764201600000, "text": "vip web: server 198.18.12.2:8080 draining" },
  { "seq": 2, "unix_ms": 1764201601500, "text": "vip web: server 198.18.12.2:8080 unhealthy: connect refused" }
]"#;

fn parse<T: serde::de::DeserializeOwned>(json: &str) -> T {
    serde_json::from_str(json).expect("fixture")
}

fn answer(request: Request) -> Response {
    match request {
        Request::Status => Response::Status(parse(STATUS)),
        Request::VipList => Response::Vips(parse(VIPS)),
        Request::ServerList { vip } => match vip.as_deref() {
            Some("web") => Response::Servers(parse(WEB_SERVERS)),
            Some("site") => Response::Servers(parse(SITE_SERVERS)),
            None => {
                let mut all: Vec<serde_json::Value> = parse(WEB_SERVERS);
                all.extend(parse::<Vec<serde_json::Value>>(SITE_SERVERS));
                Response::Servers(serde_json::from_value(all.into()).unwrap())
            }
            Some(other) => not_found(other),
        },
        Request::Stats => {
            let status: serde_json::Value = parse(STATUS);
            Response::Stats(
                serde_json::from_value(serde_json::json!({
                    "counters": status["counters"],
                    "vips": parse::<serde_json::Value>(VIPS),
                    "flows": status["flows"],
                }))
                .unwrap(),
            )
        }
        Request::ServerAdd { vip, address, .. } if vip == "web" => {
            Response::Changed(vec![format!(
                "vip web: server {address} added (weight 100, ready)"
            )])
        }
        Request::ServerAdd { vip, .. } => not_found(&vip),
        Request::Reload => Response::Changed(Vec::new()),
        Request::Events { after } => {
            let events: Vec<weir_config::control::Event> = parse(EVENTS);
            Response::Events(events.into_iter().filter(|e| e.seq > after).collect())
        }
        _ => Response::Changed(vec!["done".to_string()]),
    }
}

fn not_found(name: &str) -> Response {
    Response::Error(ControlError::new(
        ControlErrorKind::NotFound,
        format!("no L4 VIP or vhost named `{name}` (L4 VIPs: web; vhosts: site)"),
    ))
}

/// Serves the fake daemon on `path` from a background thread.
fn fake_daemon(path: &Path) {
    let path = path.to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = bind(&path).unwrap();
            ready_tx.send(()).unwrap();
            serve(
                listener,
                Arc::new(answer),
                Arc::new(HandOver {
                    sockets: Box::new(|| Ok(Vec::new())),
                    sent: Box::new(|| {}),
                }),
            )
            .await;
        });
    });
    ready_rx.recv().unwrap();
}

/// `weirctl ARGS` against `socket`: exit code, stdout and stderr, as one text.
fn run(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_weirctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    // The socket is a fresh temporary path: the snapshots say SOCKET.
    let text = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes).replace(&socket.display().to_string(), "SOCKET")
    };
    format!(
        "$ weirctl {}\nexit: {:?}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn every_verb_prints_what_its_snapshot_shows() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("weir.sock");
    fake_daemon(&socket);
    let verbs: &[(&str, &[&str])] = &[
        ("status", &["status"]),
        ("vip_list", &["vip", "list"]),
        ("vip_show", &["vip", "show", "web"]),
        ("vip_show_a_vhost", &["vip", "show", "site"]),
        ("server_list", &["server", "list"]),
        ("server_list_vhost", &["server", "list", "site"]),
        ("stats", &["stats"]),
        ("events", &["events"]),
        ("server_add", &["server", "add", "web", "198.18.13.2:8080"]),
        (
            "server_add_unknown",
            &["server", "add", "nope", "198.18.13.2:8080"],
        ),
        ("reload_nothing", &["reload"]),
    ];
    for (name, args) in verbs {
        insta::assert_snapshot!(format!("{name}_text"), run(&socket, args));
        let json: Vec<&str> = std::iter::once("--json")
            .chain(args.iter().copied())
            .collect();
        insta::assert_snapshot!(format!("{name}_json"), run(&socket, &json));
    }
    // Not running: a JSON error too, for scripts.
    let gone = dir.path().join("gone.sock");
    insta::assert_snapshot!("not_running_json", run(&gone, &["--json", "status"]));
}

/// `weirctl top` in a pseudo-terminal, as an operator runs it: it draws every server of the
/// fake daemon, and `q` ends it with success (and the terminal restored).
#[test]
fn top_shows_every_server_and_quits_on_q() {
    use std::{
        io::{Read, Write},
        os::fd::AsRawFd,
        sync::Mutex,
        time::{Duration, Instant},
    };

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("weir.sock");
    fake_daemon(&socket);
    let size = nix::pty::Winsize {
        ws_row: 30,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let terminal = pty.slave.as_raw_fd();
    let mut command = Command::new(env!("CARGO_BIN_EXE_weirctl"));
    command
        .arg("--socket")
        .arg(&socket)
        .arg("top")
        .stdin(pty.slave.try_clone().unwrap())
        .stdout(pty.slave.try_clone().unwrap())
        .stderr(pty.slave.try_clone().unwrap());
    // SAFETY: only setsid and ioctl, async-signal-safe, between fork and exec: the pty
    // becomes the child's controlling terminal, as a login shell's is.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            libc::setsid();
            libc::ioctl(terminal, libc::TIOCSCTTY as _, 0);
            Ok(())
        });
    }
    /// Kills `weirctl top` if the test fails before it quits.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(command.spawn().unwrap());
    drop(pty.slave);

    let screen = Arc::new(Mutex::new(String::new()));
    let mut master = std::fs::File::from(pty.master);
    let mut reader = master.try_clone().unwrap();
    let seen = Arc::clone(&screen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let servers = ["198.18.11.2:8080", "198.18.12.2:8080", "127.0.0.1:8081"];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let shown = screen.lock().unwrap().clone();
        if servers.iter().all(|s| shown.contains(s)) && shown.contains("draining") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let shown = screen.lock().unwrap().clone();
    for server in servers {
        assert!(shown.contains(server), "{server} not drawn:\n{shown}");
    }
    assert!(shown.contains("req/s") || shown.contains("…"), "{shown}");

    master.write_all(b"q").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            panic!("weirctl top did not quit on q:\n{}", screen.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
