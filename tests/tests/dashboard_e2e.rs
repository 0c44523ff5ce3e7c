//! End-to-end: the dashboard in a real browser. Headless Chromium (Debian's package) loads
//! `/` from the daemon's metrics listener in the lab's balancer namespace while traffic flows;
//! the page must show every server of every pool with the admin and health state `weirctl`
//! reports, load nothing from anywhere but the daemon, and — without a reload — show a server
//! drained with `weirctl` as draining, with the event in its feed.
//!
//! Set `WEIR_DASHBOARD_SCREENSHOT=path.png` to keep the screenshot (how the one in
//! `docs/operations.md` was made).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_tests::{
    browser::Browser,
    client::http_get,
    http_client::{Body, HttpConn, raw_exchange},
    lab::Lab,
    topology::{L4_VIP, L7_VIP, Topology},
};

const LISTEN: &str = "127.0.0.1:9110";

/// Every server row on the page: [pool, address, admin, health].
const ROWS: &str = "JSON.stringify([...document.querySelectorAll('tr[data-server]')]\
    .map(r => [r.dataset.pool, r.dataset.server, r.dataset.admin, r.dataset.health]))";

fn rows(value: &Value) -> Vec<[String; 4]> {
    serde_json::from_str(value.as_str().unwrap_or("[]")).unwrap_or_default()
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn the_dashboard_shows_every_server_and_a_drain_without_a_reload() {
    let tag = format!("weirt-{}-dash", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let topology = Topology::new(&format!("{tag}-"), 3).expect("topology");
    let lab = Lab::start_in(topology, &dir, "native", |config| {
        config
            + "\n[vhost.health]\nkind = \"http\"\npath = \"/\"\ninterval_ms = 300\ntimeout_ms = 300\n"
            + &format!("\n[metrics]\nlisten = \"{LISTEN}\"\n")
    })
    .expect("lab starts");
    let balancer = &lab.topology.balancer;

    // The listener is read-only and says what it serves.
    let listen: SocketAddr = LISTEN.parse().unwrap();
    let (post, head_only, unknown) = balancer
        .run(|| {
            let wait = Duration::from_secs(5);
            (
                raw_exchange(listen, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", wait).unwrap(),
                raw_exchange(listen, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", wait).unwrap(),
                raw_exchange(listen, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", wait).unwrap(),
            )
        })
        .unwrap();
    assert!(post.0.starts_with("HTTP/1.1 405"), "{}", post.0);
    assert!(
        head_only.0.starts_with("HTTP/1.1 200") && head_only.0.ends_with("\r\n\r\n"),
        "{}",
        head_only.0
    );
    assert!(unknown.0.starts_with("HTTP/1.1 404"), "{}", unknown.0);

    // Traffic through the L4 VIP and the vhost, so the page has rates to draw.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = Arc::clone(&stop);
        let netns = format!("/run/netns/{}", lab.topology.client.name());
        std::thread::spawn(move || {
            let file = std::fs::File::open(&netns).expect("client netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = http_get(SocketAddr::new(L4_VIP.into(), 80));
                if let Ok(mut conn) = HttpConn::connect(SocketAddr::new(L7_VIP.into(), 80)) {
                    let _ = conn.request("GET", "/", "demo.weir.test", "", Body::None);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let mut browser = Browser::launch(balancer, &dir.join("chromium")).expect("chromium starts");
    browser.navigate(&format!("http://{LISTEN}/")).unwrap();

    // Every server weirctl knows, with its states, once the page has polled a few times.
    let servers: Vec<Value> =
        serde_json::from_str(&lab.weirctl_ok(&["--json", "server", "list"])).unwrap();
    assert!(servers.len() >= 9, "three pools of three: {servers:?}");
    let expected: Vec<[String; 4]> = servers
        .iter()
        .map(|s| {
            [
                s["vip"].as_str().unwrap().to_string(),
                s["address"].as_str().unwrap().to_string(),
                s["admin"].as_str().unwrap().to_string(),
                s["health"].as_str().unwrap().to_string(),
            ]
        })
        .collect();
    let mut sorted_expected = expected.clone();
    sorted_expected.sort();
    let shown = browser
        .wait_for(
            "every server on the page",
            Duration::from_secs(30),
            &format!("Number(document.body.dataset.polls || 0) >= 3 ? {ROWS} : '[]'"),
            |value| {
                let mut shown = rows(value);
                shown.sort();
                shown == sorted_expected
            },
        )
        .unwrap_or_else(|err| panic!("{err}\nexpected {sorted_expected:?}"));
    assert!(
        rows(&shown)
            .iter()
            .any(|r| r[0] == "demo-l7" && r[3] == "healthy"),
        "the vhost's servers are health-checked: {shown}"
    );

    // Nothing came from anywhere but the daemon: the assets are in the binary.
    let resources = browser
        .eval("JSON.stringify(performance.getEntriesByType('resource').map(r => r.name))")
        .unwrap();
    let resources: Vec<String> = serde_json::from_str(resources.as_str().unwrap()).unwrap();
    assert!(
        resources.len() >= 3,
        "script, style and data were loaded: {resources:?}"
    );
    assert!(
        resources
            .iter()
            .all(|r| r.starts_with(&format!("http://{LISTEN}/"))),
        "{resources:?}"
    );

    // The node's card: in service, BGP not configured here.
    let node = browser
        .eval("document.getElementById('node').innerText")
        .unwrap();
    let node = node.as_str().unwrap();
    assert!(
        node.contains("in service") && node.contains("BGP off"),
        "{node}"
    );

    // A drain through weirctl shows on the open page, and in its event feed.
    let drained = expected
        .iter()
        .find(|r| r[0] == "demo-l7")
        .expect("a vhost server")[1]
        .clone();
    lab.weirctl_ok(&["server", "drain", "demo-l7", &drained]);
    let after = browser
        .wait_for(
            "the drain on the page",
            Duration::from_secs(10),
            ROWS,
            |value| {
                rows(value)
                    .iter()
                    .any(|r| r[0] == "demo-l7" && r[1] == drained && r[2] == "draining")
            },
        )
        .unwrap();
    let still_ready = rows(&after)
        .iter()
        .filter(|r| r[0] == "demo-l7" && r[2] == "ready")
        .count();
    assert_eq!(still_ready, 2, "only the drained server changed: {after}");
    let feed = browser
        .eval("document.getElementById('events').innerText")
        .unwrap();
    assert!(
        feed.as_str().unwrap().contains(&drained),
        "the event feed names the drained server: {feed}"
    );

    // Rates are drawn once traffic has been seen over a few polls.
    browser
        .wait_for(
            "a non-zero rate on the page",
            Duration::from_secs(15),
            "[...document.querySelectorAll('tr[data-server] td.num')]\
             .some(td => parseFloat(td.innerText) > 0)",
            |value| value == &Value::Bool(true),
        )
        .unwrap();
    // A kept screenshot gets half a minute of charts.
    let keep = std::env::var_os("WEIR_DASHBOARD_SCREENSHOT");
    std::thread::sleep(Duration::from_secs(if keep.is_some() { 30 } else { 3 }));
    let screenshot = dir.join("dashboard.png");
    browser.screenshot(&screenshot).unwrap();
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(keep) = keep {
        std::fs::copy(&screenshot, keep).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
}
