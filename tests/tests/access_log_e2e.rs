//! End-to-end: the daemon's access log file. Requests through the lab's vhost are logged as
//! JSON lines; the file is moved away as logrotate would and reopened by `weirctl log
//! reopen` and by `SIGUSR1`; requests the proxy refuses are logged rate-limited and all
//! counted; a reload naming a path that cannot be opened is refused and changes nothing.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_config::control::ListenerStatus;
use weir_tests::{
    http_client::{Body, HttpConn, raw_exchange},
    lab::Lab,
    netns::wait_until,
    topology::{CLIENT_ADDR, L7_VIP, Topology, server_socket},
};

/// The JSON lines of `path` (none if it does not exist).
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Waits until `path` has a line for `target`, and returns it.
fn logged(path: &Path, target: &str) -> Value {
    let mut found = None;
    let _ = wait_until("the access log line", Duration::from_secs(5), || {
        found = lines(path).into_iter().find(|l| l["target"] == target);
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no line for {target} in {}", path.display()))
}

fn get(lab: &Lab, target: &str) {
    let l7 = SocketAddr::new(L7_VIP.into(), 80);
    let status = lab
        .topology
        .client
        .run(|| {
            HttpConn::connect(l7)
                .unwrap()
                .request("GET", target, "demo.weir.test", "", Body::None)
                .unwrap()
                .status
        })
        .unwrap();
    assert_eq!(status, 200, "{target}");
}

fn listener(lab: &Lab) -> ListenerStatus {
    lab.status().expect("status").listeners.remove(0)
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn requests_are_logged_to_a_file_reopened_for_logrotate_with_refusals_rate_limited() {
    let tag = format!("weirt-{}-access", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let log = dir.join("access.log");
    let topology = Topology::new(&format!("{tag}-"), 2).expect("topology");
    let lab = Lab::start_in(topology, &dir, "native", |config| {
        config + &format!("\n[access_log]\npath = \"{}\"\n", log.display())
    })
    .expect("lab starts");

    // Each request: one JSON line saying who asked what, where it went and how it ended.
    get(&lab, "/first");
    let line = logged(&log, "/first");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["vhost"], "demo-l7", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["host"], "demo.weir.test", "{line}");
    assert_eq!(line["listener"], format!("{L7_VIP}:80"), "{line}");
    assert!(
        line["client"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{CLIENT_ADDR}:")),
        "{line}"
    );
    let backends: Vec<String> = (1..=2).map(|i| server_socket(i).to_string()).collect();
    assert!(
        backends.iter().any(|b| line["server"] == b.as_str()),
        "{line} not from {backends:?}"
    );
    assert!(line["bytes"].as_u64().unwrap() > 0, "{line}");

    // logrotate moves the file, then asks for a reopen: later lines go to the new file.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    get(&lab, "/before-reopen");
    // Lines of the old descriptor land in the moved file.
    logged(&rotated, "/before-reopen");
    lab.weirctl_ok(&["log", "reopen"]);
    get(&lab, "/after-reopen");
    logged(&log, "/after-reopen");
    assert!(
        lines(&rotated)
            .iter()
            .all(|l| l["target"] != "/after-reopen"),
        "nothing after the reopen goes to the moved file"
    );

    // SIGUSR1 does the same.
    let rotated = dir.join("access.log.2");
    std::fs::rename(&log, &rotated).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.weir_pid() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let _ = wait_until("SIGUSR1's reopen", Duration::from_secs(5), || log.exists());
    get(&lab, "/after-signal");
    logged(&log, "/after-signal");
    assert!(
        lines(&rotated)
            .iter()
            .all(|l| l["target"] != "/after-signal")
    );

    // A burst of requests the proxy refuses: every one counted, at most ten lines a second
    // per worker logged, the next logged line saying how many were left out.
    let refused_before = listener(&lab).refusals.iter().map(|r| r.count).sum::<u64>();
    let l7 = SocketAddr::new(L7_VIP.into(), 80);
    let burst = 200;
    let started = Instant::now();
    lab.topology
        .client
        .run(|| {
            for _ in 0..burst {
                let (answer, _) =
                    raw_exchange(l7, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(5)).unwrap();
                assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
            }
        })
        .unwrap();
    let seconds = started.elapsed().as_secs() + 1;
    let counted = listener(&lab)
        .refusals
        .iter()
        .find(|r| r.status == 400 && r.reason == "missing Host header")
        .map_or(0, |r| r.count);
    assert_eq!(counted - refused_before, burst, "every refusal counted");
    let _ = wait_until("refusal lines", Duration::from_secs(5), || {
        lines(&log).iter().any(|l| l["status"] == 400)
    });
    let refusals: Vec<Value> = lines(&log)
        .into_iter()
        .filter(|l| l["status"] == 400)
        .collect();
    let workers = listener(&lab).workers as u64;
    assert!(!refusals.is_empty());
    assert!(
        (refusals.len() as u64) <= 10 * workers * (seconds + 1),
        "{} refusal lines in {seconds} s",
        refusals.len()
    );
    assert!(
        refusals
            .iter()
            .all(|l| l["reason"] == "missing Host header" && l["method"] == "-"),
        "{refusals:?}"
    );
    let left_out: u64 = refusals.iter().filter_map(|l| l["unlogged"].as_u64()).sum();
    assert!(refusals.len() as u64 + left_out <= burst);

    // A reload naming a path that cannot be opened is refused; the file in use stays.
    let config = std::fs::read_to_string(lab.config()).unwrap();
    std::fs::write(
        lab.config(),
        config.replace(&log.display().to_string(), "/nonexistent/weir/access.log"),
    )
    .unwrap();
    let out = lab.weirctl().arg("reload").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot open the access log /nonexistent/weir/access.log"),
        "{stderr}"
    );
    get(&lab, "/after-refused-reload");
    logged(&log, "/after-refused-reload");
}
