//! Health checks end to end: the daemon in the lab checks its pools; a server that dies or
//! black-holes packets leaves the pool within the bound its check settings give, clients see
//! no error (L7) or only the connections that were on it break (L4), and it comes back after
//! `rise` good checks.

use std::{
    fs,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_tests::{
    client::{EchoConnection, http_get},
    lab::Lab,
    load::HttpLoad,
    topology::{ECHO_PORT, L4_VIP, L7_VIP, SERVER_PORT, server_addr},
};

const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 200;
const FALL: u64 = 2;
const RISE: u64 = 2;
const JITTER_PERCENT: u64 = 10;

fn prefix(tag: &str) -> String {
    format!("weirt-{}-{tag}-", std::process::id())
}

fn health_table(kind: &str, table: &str, rise: u64, fall: u64) -> String {
    format!(
        "[{table}.health]\nkind = \"{kind}\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nfall = {fall}\nrise = {rise}\njitter_percent = {JITTER_PERCENT}\n\n"
    )
}

/// The longest a transition may take: `fall` (or `rise`) checks, each up to interval +
/// jitter apart, the last taking up to the timeout, plus time to apply and to observe it.
fn bound(checks: u64) -> Duration {
    Duration::from_millis(checks * INTERVAL_MS * (100 + JITTER_PERCENT) / 100 + TIMEOUT_MS + 400)
}

/// Starts a lab whose `demo-echo` VIP (TCP checks) and `demo-l7` vhost (HTTP checks) are
/// checked, applied by a reload.
fn checked_lab(tag: &str) -> Lab {
    checked_lab_with(tag, RISE, FALL)
}

fn checked_lab_with(tag: &str, rise: u64, fall: u64) -> Lab {
    let dir = std::env::temp_dir().join(format!("weirt-{}-{tag}", std::process::id()));
    let lab = Lab::start(&prefix(tag), 3, &dir, "native").expect("lab starts");
    let config = fs::read_to_string(lab.config()).unwrap();
    let checked = config.replace(
        "[[vhost]]",
        &format!("{}[[vhost]]", health_table("tcp", "l4_vip", rise, fall)),
    ) + "\n"
        + &health_table("http", "vhost", rise, fall);
    fs::write(lab.config(), checked).unwrap();
    lab.weirctl_ok(&["reload"]);
    lab
}

/// `server`'s entry in `weirctl server list POOL --json`.
fn server_entry(lab: &Lab, pool: &str, server: SocketAddr) -> Value {
    let json: Value =
        serde_json::from_str(&lab.weirctl_ok(&["server", "list", pool, "--json"])).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"].as_str() == Some(&server.to_string()))
        .unwrap_or_else(|| panic!("{server} not in {pool}"))
        .clone()
}

/// (health, last check, requests sent to it by L7) of `server` in `pool`.
fn server_state(lab: &Lab, pool: &str, server: SocketAddr) -> (String, String, u64) {
    let s = server_entry(lab, pool, server);
    (
        s["health"].as_str().unwrap().to_string(),
        s["last_check"].as_str().unwrap_or_default().to_string(),
        s["l7"]["requests"].as_u64().unwrap_or(0),
    )
}

/// Waits until `server`'s health in `pool` is `health`; returns how long that took.
fn wait_for_health(
    lab: &Lab,
    pool: &str,
    server: SocketAddr,
    health: &str,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    while server_state(lab, pool, server).0 != health {
        assert!(
            started.elapsed() < limit * 3,
            "{server} in {pool} not {health} after {:?}",
            started.elapsed()
        );
        thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

fn http_server(i: usize) -> SocketAddr {
    SocketAddr::new(server_addr(i).into(), SERVER_PORT)
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_stopped_server_leaves_the_pool_in_bound_with_no_client_error_and_returns_after_rise() {
    let mut lab = checked_lab("hstop");
    let l7_server = http_server(2);
    let echo_server = SocketAddr::new(server_addr(2).into(), ECHO_PORT);
    // Checks run and pass.
    thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    let (health, last, _) = server_state(&lab, "demo-l7", l7_server);
    assert_eq!(health, "healthy");
    assert!(last.starts_with("ok: status 200"), "{last}");
    assert!(
        server_state(&lab, "demo-echo", echo_server)
            .1
            .starts_with("ok: connected")
    );

    // GET load through the L7 VIP, keep-alive and new connections.
    let vip = SocketAddr::new(L7_VIP.into(), 80);
    let load = HttpLoad::start(vip, "demo.weir.test", 4, Some(lab.topology.client.name()));
    thread::sleep(Duration::from_millis(300));

    lab.stop_backend(2);
    let l7_took = wait_for_health(&lab, "demo-l7", l7_server, "unhealthy", bound(FALL));
    let l4_took = wait_for_health(&lab, "demo-echo", echo_server, "unhealthy", bound(FALL));
    assert!(
        l7_took <= bound(FALL),
        "L7 exclusion took {l7_took:?}, bound {:?}",
        bound(FALL)
    );
    assert!(
        l4_took <= bound(FALL),
        "L4 exclusion took {l4_took:?}, bound {:?}",
        bound(FALL)
    );
    // New L4 connections all reach a live server.
    for _ in 0..20 {
        let name = lab
            .topology
            .client
            .run(|| {
                EchoConnection::open(SocketAddr::new(L4_VIP.into(), ECHO_PORT)).map(|c| c.server)
            })
            .unwrap();
        assert_ne!(name.expect("a new echo connection succeeds"), "srv2");
    }
    let (_, _, requests_down) = server_state(&lab, "demo-l7", l7_server);

    lab.start_backend(2).unwrap();
    let back = wait_for_health(&lab, "demo-l7", l7_server, "healthy", bound(RISE));
    assert!(back <= bound(RISE), "recovery took {back:?}");
    load.wait_for(200);
    assert!(
        server_state(&lab, "demo-l7", l7_server).2 > requests_down,
        "the recovered server gets requests again"
    );

    // Admin state wins over health: disabled and healthy gets nothing.
    lab.weirctl_ok(&["server", "disable", "demo-l7", &l7_server.to_string()]);
    let (_, _, at_disable) = server_state(&lab, "demo-l7", l7_server);
    load.wait_for(200);
    assert_eq!(server_state(&lab, "demo-l7", l7_server).2, at_disable);

    let (_, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} client errors, first {:?}",
        errors.len(),
        errors.first()
    );
    let events = lab.weirctl_ok(&["events"]);
    for wanted in [
        format!(
            "vhost demo-l7: server {l7_server} healthy -> unhealthy: {FALL} failed checks in a row, last: connect:"
        ),
        format!(
            "vhost demo-l7: server {l7_server} unhealthy -> healthy: {RISE} good checks in a row, last: status 200"
        ),
        format!("vip demo-echo: server {echo_server} healthy -> unhealthy: "),
        format!("vhost demo-l7: server {l7_server} ready -> disabled"),
    ] {
        assert!(
            events.contains(&wanted),
            "no {wanted:?} in events:\n{events}"
        );
    }
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_black_holed_server_is_excluded_and_only_its_connections_break() {
    let lab = checked_lab("hhole");
    let echo_vip = SocketAddr::new(L4_VIP.into(), ECHO_PORT);
    let hole = SocketAddr::new(server_addr(3).into(), ECHO_PORT);
    thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    // Long-lived connections spread over the three servers.
    let mut connections: Vec<EchoConnection> = (0..24)
        .map(|_| {
            lab.topology
                .client
                .run(|| EchoConnection::open(echo_vip))
                .unwrap()
                .unwrap()
        })
        .collect();
    let on_hole = connections.iter().filter(|c| c.server == "srv3").count();
    assert!(on_hole > 0, "some connections are on srv3");
    // srv3 stops answering on the echo port: packets vanish.
    let ns = &lab.topology.servers[2];
    for rule in [
        "add table inet weirt",
        "add chain inet weirt input { type filter hook input priority 0; }",
        &format!("add rule inet weirt input tcp dport {ECHO_PORT} drop"),
    ] {
        let status = ns.command("nft").args(rule.split(' ')).status().unwrap();
        assert!(status.success(), "nft {rule}");
    }
    let took = wait_for_health(&lab, "demo-echo", hole, "unhealthy", bound(FALL));
    assert!(took <= bound(FALL), "exclusion took {took:?}");
    // With down_flows = "repick", a connection that was on srv3 now reaches another server,
    // which resets it at once; every other connection goes on.
    let mut broken = Vec::new();
    for connection in &mut connections {
        let result = lab.topology.client.run(|| connection.exchange()).unwrap();
        if result.is_err() {
            broken.push(connection.server.clone());
        }
    }
    assert_eq!(broken.len(), on_hole, "broken: {broken:?}");
    assert!(broken.iter().all(|s| s == "srv3"));
    // New connections avoid it; HTTP on srv3 still works (the hole is the echo port only).
    for _ in 0..20 {
        let server = lab
            .topology
            .client
            .run(|| EchoConnection::open(echo_vip).map(|c| c.server))
            .unwrap()
            .unwrap();
        assert_ne!(server, "srv3");
    }
    assert!(
        lab.topology
            .client
            .run(|| http_get(SocketAddr::new(L4_VIP.into(), 80)))
            .unwrap()
            .is_ok()
    );
}

/// Health transitions of `server` in `pool` recorded in `weirctl events`.
fn transitions(lab: &Lab, pool: &str, server: SocketAddr) -> usize {
    lab.weirctl_ok(&["events"])
        .lines()
        .filter(|l| {
            l.contains(&format!("{pool}: server {server} healthy -> unhealthy"))
                || l.contains(&format!("{pool}: server {server} unhealthy -> healthy"))
        })
        .count()
}

/// Makes `server`'s echo port drop packets and let them through again, every 300 ms, for
/// `duration`; returns the transitions recorded meanwhile.
fn flap(lab: &Lab, duration: Duration) -> usize {
    let server = SocketAddr::new(server_addr(1).into(), ECHO_PORT);
    let ns = &lab.topology.servers[0];
    let nft = |rule: &str| {
        let status = ns.command("nft").args(rule.split(' ')).status().unwrap();
        assert!(status.success(), "nft {rule}");
    };
    nft("add table inet weirt");
    nft("add chain inet weirt input { type filter hook input priority 0; }");
    let before = transitions(lab, "demo-echo", server);
    let started = Instant::now();
    let mut down = false;
    while started.elapsed() < duration {
        if down {
            nft("flush chain inet weirt input");
        } else {
            nft(&format!(
                "add rule inet weirt input tcp dport {ECHO_PORT} drop"
            ));
        }
        down = !down;
        thread::sleep(Duration::from_millis(300));
    }
    nft("delete table inet weirt");
    transitions(lab, "demo-echo", server) - before
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_flapping_server_does_not_flap_the_pool_beyond_what_rise_and_fall_allow() {
    // The same flapping server, checked without hysteresis and with rise = fall = 3.
    let eager = checked_lab_with("hflap1", 1, 1);
    thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    let eager_transitions = flap(&eager, Duration::from_secs(6));
    drop(eager);
    let steady = checked_lab_with("hflap3", 3, 3);
    thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    let steady_transitions = flap(&steady, Duration::from_secs(6));
    eprintln!("transitions: eager {eager_transitions}, steady {steady_transitions}");
    // Each up or down phase lasts 300 ms, shorter than 3 checks: a transition needs three
    // results alike in a row, which the phases do not give (edges of timing aside).
    assert!(
        eager_transitions >= 6,
        "rise = fall = 1 follows the flaps: {eager_transitions}"
    );
    assert!(
        steady_transitions <= 2,
        "rise = fall = 3: {steady_transitions} transitions"
    );
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_draining_server_that_fails_its_checks_is_reported_unhealthy() {
    let mut lab = checked_lab("hdrain");
    let server = http_server(3);
    thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    // `weirctl events --follow` streams the changes as they happen.
    let mut follow = lab
        .weirctl()
        .args(["events", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = {
        let stdout = follow.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    };
    lab.weirctl_ok(&["server", "drain", "demo-l7", &server.to_string()]);
    lab.stop_backend(3);
    wait_for_health(&lab, "demo-l7", server, "unhealthy", bound(FALL));
    // The backend also serves the echo VIP, whose transition may stream first.
    let wanted = format!("demo-l7: server {server} healthy -> unhealthy: ");
    let mut streamed = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        streamed.push(line);
        if streamed.iter().any(|l| l.contains(&wanted)) {
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        streamed
            .iter()
            .any(|l| l.contains(&format!("vhost demo-l7: server {server} ready -> draining"))),
        "{streamed:#?}"
    );
    assert!(
        streamed.iter().any(|l| l.contains(&wanted)),
        "{streamed:#?}"
    );
    let entry = server_entry(&lab, "demo-l7", server);
    assert_eq!(entry["admin"], "draining");
    assert_eq!(entry["health"], "unhealthy");
    assert!(
        entry["health_reason"]
            .as_str()
            .unwrap()
            .contains("failed checks in a row")
    );
    assert!(entry["health_since_unix_ms"].as_u64().unwrap() > 0);

    // Health checks taken off the vhost by a reload: the server is unchecked, and neither
    // the last check nor the reason of a health it no longer has stays on it.
    let config = fs::read_to_string(lab.config()).unwrap();
    let unchecked = config.replace(&health_table("http", "vhost", RISE, FALL), "");
    assert_ne!(config, unchecked);
    fs::write(lab.config(), unchecked).unwrap();
    lab.weirctl_ok(&["reload"]);
    let entry = server_entry(&lab, "demo-l7", server);
    assert_eq!(entry["health"], "unchecked", "{entry}");
    assert!(entry.get("health_reason").is_none(), "{entry}");
    assert!(entry.get("last_check").is_none(), "{entry}");
    assert!(entry.get("health_since_unix_ms").is_none(), "{entry}");
}
