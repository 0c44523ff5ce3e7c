//! End-to-end: a real Prometheus (Debian's package) scrapes the daemon's `/metrics` in the
//! lab's balancer namespace while traffic goes through an L4 VIP and an L7 vhost (and requests
//! the proxy refuses); the series
//! are checked through Prometheus's own HTTP query API, and the live exposition with
//! `promtool check metrics`.

use std::{
    io::Write,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_tests::{
    client::http_get,
    http_client::{Body, HttpConn, exposition_value, get_body, raw_exchange},
    lab::Lab,
    netns::{Process, wait_until},
    topology::{L4_VIP, L7_VIP, Topology},
};

const METRICS: &str = "127.0.0.1:9110";
const PROMETHEUS: &str = "127.0.0.1:9190";

/// The result vector of a Prometheus instant query: (labels, value).
fn query(expr: &str) -> Vec<(Value, f64)> {
    let encoded: String = expr
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Ok(body) = get_body(PROMETHEUS, &format!("/api/v1/query?query={encoded}")) else {
        return Vec::new();
    };
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    json["data"]["result"]
        .as_array()
        .map(|results| {
            results
                .iter()
                .map(|r| {
                    let value = r["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0.0);
                    (r["metric"].clone(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn prometheus_scrapes_per_server_rates_and_promtool_accepts_the_exposition() {
    let tag = format!("weirt-{}-metrics", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let topology = Topology::new(&format!("{tag}-"), 2).expect("topology");
    // The vhost's servers are health-checked, so a stopped one makes a transition.
    let mut lab = Lab::start_in(topology, &dir, "native", |config| {
        config
            + "\n[vhost.health]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 200\nrise = 1\nfall = 1\n"
            + &format!("\n[metrics]\nlisten = \"{METRICS}\"\n")
    })
    .expect("lab starts");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: weir\n    \
             static_configs:\n      - targets: [\"{METRICS}\"]\n"
        ),
    )
    .unwrap();
    let mut prometheus_command = lab.topology.balancer.command("prometheus");
    prometheus_command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _prometheus = Process::spawn("prometheus", &mut prometheus_command).expect("prometheus");
    let balancer = &lab.topology.balancer;
    balancer
        .run(|| {
            wait_until("Prometheus to be ready", Duration::from_secs(30), || {
                get_body(PROMETHEUS, "/-/ready").is_ok()
            })
        })
        .unwrap()
        .expect("Prometheus is ready");

    // Traffic through the L4 VIP (new connections) and the vhost while Prometheus is asked.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = std::sync::Arc::clone(&stop);
        let netns = format!("/run/netns/{}", lab.topology.client.name());
        std::thread::spawn(move || {
            let file = std::fs::File::open(&netns).expect("client netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                http_get(SocketAddr::new(L4_VIP.into(), 80)).expect("through the L4 VIP");
                let mut conn = HttpConn::connect(SocketAddr::new(L7_VIP.into(), 80)).unwrap();
                let response = conn
                    .request("GET", "/", "demo.weir.test", "", Body::None)
                    .unwrap();
                assert_eq!(response.status, 200);
                // A request weir refuses itself: HTTP/1.1 without a Host header.
                let (answer, _) = raw_exchange(
                    SocketAddr::new(L7_VIP.into(), 80),
                    b"GET / HTTP/1.1\r\n\r\n",
                    Duration::from_secs(5),
                )
                .unwrap();
                assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Prometheus has the per-server rates of both planes, and the scrape is healthy.
    let (rates, requests, up, refusals, latency) = balancer
        .run(|| {
            let mut found = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let _ = wait_until("the series in Prometheus", Duration::from_secs(30), || {
                found = (
                    query("rate(weir_server_packets_total{vip=\"demo-l4\"}[10s]) > 0"),
                    query("weir_vhost_server_requests_total > 0"),
                    query("up{job=\"weir\"} == 1"),
                    query("rate(weir_l7_refusals_total[10s]) > 0"),
                    query(
                        "histogram_quantile(0.9, sum by (le, vhost) \
                         (rate(weir_vhost_server_response_seconds_bucket[10s]))) > 0",
                    ),
                );
                found.0.len() == 2
                    && found.1.len() == 2
                    && found.2.len() == 1
                    && found.3.len() == 1
                    && found.4.len() == 1
            });
            found
        })
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().expect("traffic thread");
    assert_eq!(
        rates.len(),
        2,
        "a packet rate per server of the L4 VIP: {rates:?}"
    );
    assert!(
        rates.iter().all(|(labels, _)| labels["vip"] == "demo-l4"),
        "{rates:?}"
    );
    assert_eq!(requests.len(), 2, "requests per vhost server: {requests:?}");
    assert_eq!(up.len(), 1, "the scrape target is up: {up:?}");
    assert_eq!(refusals.len(), 1, "one refusal series: {refusals:?}");
    assert_eq!(latency.len(), 1, "a response-time quantile: {latency:?}");
    assert!(latency[0].1 < 10.0, "{latency:?}");
    let refusal = &refusals[0].0;
    assert_eq!(
        (
            refusal["code"].as_str(),
            refusal["reason"].as_str(),
            refusal["listener"].as_str()
        ),
        (
            Some("400"),
            Some("missing Host header"),
            Some(&*SocketAddr::new(L7_VIP.into(), 80).to_string())
        ),
        "{refusals:?}"
    );

    // A health transition, an applied reload and a refused one are counted.
    lab.stop_backend(2);
    lab.weirctl_ok(&["reload"]);
    let config = std::fs::read_to_string(lab.config()).unwrap();
    std::fs::write(lab.config(), config.replace("[metrics]", "[metrics")).unwrap();
    let refused = lab.weirctl().arg("reload").output().unwrap();
    assert!(!refused.status.success(), "a broken config is refused");
    std::fs::write(lab.config(), &config).unwrap();
    let balancer = &lab.topology.balancer;
    let (transitions, applied, failed, last_ok) = balancer
        .run(|| {
            let mut found = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let _ = wait_until(
                "the counters in Prometheus",
                Duration::from_secs(30),
                || {
                    found = (
                        query("weir_server_health_transitions_total{pool=\"demo-l7\"} > 0"),
                        query("weir_config_reloads_total{result=\"success\"} == 1"),
                        query("weir_config_reloads_total{result=\"failure\"} == 1"),
                        query("weir_config_last_reload_successful == 0"),
                    );
                    found.0.len() == 1
                        && found.1.len() == 1
                        && found.2.len() == 1
                        && found.3.len() == 1
                },
            );
            found
        })
        .unwrap();
    assert_eq!(
        transitions.len(),
        1,
        "one server went down: {transitions:?}"
    );
    assert_eq!(
        transitions[0].0["server"].as_str(),
        Some(&*weir_tests::topology::server_socket(2).to_string()),
        "{transitions:?}"
    );
    assert_eq!(
        (applied.len(), failed.len()),
        (1, 1),
        "{applied:?} {failed:?}"
    );
    assert_eq!(last_ok.len(), 1, "the last reload was refused: {last_ok:?}");

    // Refusals are logged too, with status and reason.
    let log = lab.log();
    let refused_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    assert!(
        refused_lines
            .iter()
            .any(|l| l.contains("status=400") && l.contains("missing Host header")),
        "no refusal in the daemon's log:\n{log}"
    );

    // promtool accepts what the daemon serves.
    let exposition = balancer
        .run(|| get_body(METRICS, "/metrics"))
        .unwrap()
        .expect("/metrics answers");
    // The flow table's occupancy: the L4 traffic left entries in it (closing ones stay until
    // evicted or overwritten), out of the default size.
    let gauge = |name: &str| -> f64 {
        exposition_value(&exposition, name).unwrap_or_else(|| panic!("no {name} in the exposition"))
    };
    assert!(gauge("weir_flow_table_entries") > 0.0);
    // Each VIP's Maglev table digest is the one its pool gives: what another node with the
    // same config computes (the ids of its servers may differ; the digest does not).
    let planned = weir_forwarder::l4::L4Services::plan(
        &weir_config::Config::load(&lab.config()).unwrap(),
        None,
    )
    .unwrap();
    let vips: Vec<Value> =
        serde_json::from_str(&lab.weirctl_ok(&["--json", "vip", "list"])).unwrap();
    assert!(!vips.is_empty());
    for vip in &vips {
        let name = vip["name"].as_str().unwrap();
        let digest = format!("{:016x}", planned.service(name).unwrap().table_digest());
        assert_eq!(vip["table_digest"], digest.as_str(), "{name}");
        let series = format!("weir_vip_maglev_table_info{{digest=\"{digest}\",vip=\"{name}\"}} 1");
        assert!(exposition.contains(&series), "no `{series}`");
    }
    assert_eq!(
        gauge("weir_flow_table_capacity"),
        f64::from(weir_config::DEFAULT_FLOW_TABLE_SIZE)
    );
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
