//! End-to-end tests of the control plane: the `weir` daemon in the lab's balancer namespace,
//! driven by the `weirctl` binary exactly as an operator would, under real client load.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::{net::UnixStream, process::CommandExt},
    path::PathBuf,
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use serde_json::Value;
use weir_tests::{
    client::{EchoConnection, http_get},
    lab::Lab,
    netns::{Netns, wait_until},
    topology::{self, ECHO_PORT, L4_VIP, SERVER_PORT, server_addr},
};

const HTTP_VIP: &str = "demo-l4";
const ECHO_VIP: &str = "demo-echo";

fn prefix(tag: &str) -> String {
    format!("weirt-{}-{tag}-", std::process::id())
}

fn lab_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("weirt-{}-{tag}", std::process::id()))
}

fn http_server(i: usize) -> SocketAddr {
    SocketAddr::new(server_addr(i).into(), SERVER_PORT)
}

fn echo_server(i: usize) -> SocketAddr {
    SocketAddr::new(server_addr(i).into(), ECHO_PORT)
}

/// Runs `weirctl` against the lab's daemon.
fn weirctl(lab: &Lab, args: &[&str]) -> Output {
    lab.weirctl().args(args).output().expect("weirctl runs")
}

/// The pools as `weirctl server list --json` shows them, without the live figures (flows,
/// counters) that move with traffic: (vip, server) → (weight, admin, health).
fn pools(lab: &Lab) -> BTreeMap<(String, String), (u64, String, String)> {
    let json: Value = serde_json::from_str(&lab.weirctl_ok(&["server", "list", "--json"]))
        .expect("server list --json is JSON");
    json.as_array()
        .expect("a list of servers")
        .iter()
        .map(|s| {
            (
                (
                    s["vip"].as_str().unwrap().into(),
                    s["address"].as_str().unwrap().into(),
                ),
                (
                    s["weight"].as_u64().unwrap(),
                    s["admin"].as_str().unwrap().into(),
                    s["health"].as_str().unwrap().into(),
                ),
            )
        })
        .collect()
}

/// Active flows of one server, from `weirctl server list VIP --json`.
fn active_flows(lab: &Lab, vip: &str, server: SocketAddr) -> u64 {
    let json: Value =
        serde_json::from_str(&lab.weirctl_ok(&["server", "list", vip, "--json"])).expect("JSON");
    json.as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"].as_str() == Some(&server.to_string()))
        .map_or(0, |s| s["active_flows"].as_u64().unwrap())
}

/// What client load saw.
#[derive(Default)]
struct LoadReport {
    short_ok: AtomicU64,
    short_failed: AtomicU64,
    long_rounds: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Client load through the VIPs from the client namespace: `short` threads opening a new
/// HTTP connection per request, and `long` echo connections that keep exchanging verified
/// data, each checking it stays with the server that greeted it.
struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<LoadReport>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Netns, short: usize, long: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(LoadReport::default());
        let http = SocketAddr::new(L4_VIP.into(), 80);
        let echo = SocketAddr::new(L4_VIP.into(), ECHO_PORT);
        let mut threads = Vec::new();
        let netns = format!("/run/netns/{}", client.name());
        for i in 0..short + long {
            let (stop, report, netns) = (stop.clone(), report.clone(), netns.clone());
            threads.push(thread::spawn(move || {
                let file = fs::File::open(&netns).expect("client netns");
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                if i < short {
                    while !stop.load(Ordering::Relaxed) {
                        match http_get(http) {
                            Ok(_) => report.short_ok.fetch_add(1, Ordering::Relaxed),
                            Err(err) => {
                                report.errors.lock().unwrap().push(format!("short: {err}"));
                                report.short_failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                } else {
                    let mut connection = match EchoConnection::open(echo) {
                        Ok(c) => c,
                        Err(err) => {
                            report
                                .errors
                                .lock()
                                .unwrap()
                                .push(format!("long open: {err}"));
                            return;
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(err) = connection.exchange() {
                            report.errors.lock().unwrap().push(format!(
                                "long-lived connection to {} broke in round {}: {err}",
                                connection.server, connection.round
                            ));
                            return;
                        }
                        report.long_rounds.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(Duration::from_millis(20));
                    }
                }
            }));
        }
        Load {
            stop,
            report,
            threads,
        }
    }

    fn finish(self) -> Arc<LoadReport> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("load thread");
        }
        self.report
    }
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn server_churn_and_a_daemon_kill_under_load_drop_no_connection() {
    let dir = lab_dir("churn");
    let mut lab = Lab::start(&prefix("churn"), 4, &dir, "native").expect("lab starts");
    let load = Load::start(&lab.topology.client, 3, 6);
    thread::sleep(Duration::from_millis(300));

    let mut changes = 0;
    let mut change = |lab: &Lab, args: &[&str]| {
        lab.weirctl_ok(args);
        changes += 1;
    };
    let mut restart_checked = false;
    for cycle in 0..18 {
        // One HTTP server goes through a whole maintenance: drain, reweight, removal once
        // drained, back in, disabled, enabled.
        let i = cycle % 4 + 1;
        let http = http_server(i).to_string();
        change(&lab, &["server", "drain", HTTP_VIP, &http]);
        change(
            &lab,
            &[
                "server",
                "weight",
                HTTP_VIP,
                &http,
                &(50 + cycle).to_string(),
            ],
        );
        change(
            &lab,
            &[
                "server",
                "remove",
                HTTP_VIP,
                &http,
                "--wait",
                "--timeout",
                "20",
            ],
        );
        change(&lab, &["server", "add", HTTP_VIP, &http, "--weight", "100"]);
        change(&lab, &["server", "disable", HTTP_VIP, &http]);
        change(&lab, &["server", "enable", HTTP_VIP, &http]);
        // The echo pool's tables switch under the long-lived connections.
        let echo = echo_server(i).to_string();
        change(&lab, &["server", "drain", ECHO_VIP, &echo]);
        change(&lab, &["server", "enable", ECHO_VIP, &echo]);

        if cycle == 8 {
            // Mid-churn, with one server disabled, the daemon dies without any clean-up.
            lab.weirctl_ok(&["server", "disable", HTTP_VIP, &http]);
            lab.weirctl_ok(&["server", "weight", ECHO_VIP, &echo, "300"]);
            let before = pools(&lab);
            lab.kill_weir();
            let served = load.report.short_ok.load(Ordering::Relaxed);
            thread::sleep(Duration::from_millis(1500));
            let served_while_down = load.report.short_ok.load(Ordering::Relaxed) - served;
            lab.restart_weir().expect("weir restarts");
            assert!(
                served_while_down > 0,
                "no connection completed while the daemon was down"
            );
            assert_eq!(pools(&lab), before, "state after restart differs");
            let status = lab.status().expect("status");
            assert!(
                status.daemon.adopted_datapath,
                "the pinned datapath was not adopted"
            );
            lab.weirctl_ok(&["server", "enable", HTTP_VIP, &http]);
            restart_checked = true;
        }
    }
    thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    let errors = report.errors.lock().unwrap();
    assert!(restart_checked);
    assert!(changes >= 100, "only {changes} changes");
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}\nweir.log:\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        lab.log()
    );
    assert_eq!(report.short_failed.load(Ordering::Relaxed), 0);
    assert!(
        report.short_ok.load(Ordering::Relaxed) > 300,
        "too little load to mean anything"
    );
    assert!(report.long_rounds.load(Ordering::Relaxed) > 6 * 50);
}

/// `PassiveOpens` of the TCP MIB in a namespace: connections its servers accepted.
fn passive_opens(ns: &Netns) -> u64 {
    let out = ns
        .command("cat")
        .arg("/proc/net/snmp")
        .output()
        .expect("cat");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let index = names
        .split_whitespace()
        .position(|n| n == "PassiveOpens")
        .unwrap();
    values
        .split_whitespace()
        .nth(index)
        .unwrap()
        .parse()
        .unwrap()
}

/// An operator turns the lab's server links into `server_interfaces` (TC only) with a
/// restart: their pinned XDP links are detached, the TC links stay, and an echo connection
/// opened before the restart goes on through its NAT flow, whose replies now meet only TC.
#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn server_links_moved_to_server_interfaces_lose_xdp_and_keep_their_flows() {
    let dir = lab_dir("tconly");
    let mut lab = Lab::start(&prefix("tconly"), 3, &dir, "native").expect("lab starts");
    let xdp_on = |lab: &Lab, link: &str| lab.topology.balancer_has_xdp(link).unwrap();
    let links = lab.topology.server_links();
    assert!(links.iter().all(|link| xdp_on(&lab, link)));
    let echo_vip = SocketAddr::new(L4_VIP.into(), ECHO_PORT);
    let mut connection = lab
        .topology
        .client
        .run(|| EchoConnection::open(echo_vip))
        .unwrap()
        .expect("echo connection");

    lab.kill_weir();
    let config = fs::read_to_string(lab.config()).unwrap();
    let quoted: Vec<String> = links.iter().map(|l| format!("\"{l}\"")).collect();
    let two_armed = config.replace(
        &format!(
            "interfaces = [\"{}\", {}]",
            topology::BALANCER_UPLINK,
            quoted.join(", ")
        ),
        &format!(
            "interfaces = [\"{}\"]\nserver_interfaces = [{}]",
            topology::BALANCER_UPLINK,
            quoted.join(", ")
        ),
    );
    assert_ne!(two_armed, config);
    fs::write(lab.config(), two_armed).unwrap();
    lab.restart_weir().expect("weir restarts");

    let status = lab.status().unwrap();
    for link in &links {
        assert!(!xdp_on(&lab, link), "{link} still has an XDP program");
        let attachment = status.xdp.iter().find(|x| &x.interface == link).unwrap();
        assert_eq!(attachment.program_id, None, "{attachment:?}");
        assert!(attachment.tc_program_id > 0, "{attachment:?}");
    }
    assert!(xdp_on(&lab, topology::BALANCER_UPLINK));
    let table = lab.weirctl_ok(&["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("s1 ") && l.contains(" - ")),
        "{table}"
    );
    lab.topology
        .client
        .run(|| connection.exchange())
        .unwrap()
        .expect("the connection opened before the restart goes on");
    assert_eq!(
        lab.topology
            .client
            .run(|| http_get(SocketAddr::new(L4_VIP.into(), 80)))
            .unwrap()
            .map(|server| server.starts_with("srv"))
            .ok(),
        Some(true)
    );
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_drained_server_accepts_no_new_connection_and_its_own_finish() {
    let dir = lab_dir("drain");
    let lab = Lab::start(&prefix("drain"), 3, &dir, "native").expect("lab starts");
    let echo = SocketAddr::new(L4_VIP.into(), ECHO_PORT);
    let client = &lab.topology.client;
    let mut existing = client
        .run(|| EchoConnection::open(echo))
        .unwrap()
        .expect("connect");
    let owner: usize = existing.server.trim_start_matches("srv").parse().unwrap();
    let owner_ns = &lab.topology.servers[owner - 1];
    client
        .run(|| existing.exchange())
        .unwrap()
        .expect("exchange");

    lab.weirctl_ok(&["server", "drain", ECHO_VIP, &echo_server(owner).to_string()]);
    // weirctl has returned: the drain is live, so from here on the owner accepts nothing.
    let accepted_before = passive_opens(owner_ns);
    let servers: Vec<String> = client
        .run(|| {
            (0..60)
                .map(|_| EchoConnection::open(echo).expect("new connection").server)
                .collect()
        })
        .unwrap();
    assert_eq!(
        passive_opens(owner_ns),
        accepted_before,
        "the draining server accepted connections"
    );
    assert!(!servers.contains(&existing.server), "{servers:?}");

    // Its established connection keeps working, then ends; the server then has no flow and
    // `remove` (without --force) goes through.
    assert!(active_flows(&lab, ECHO_VIP, echo_server(owner)) >= 1);
    client
        .run(|| (0..20).try_for_each(|_| existing.exchange()))
        .unwrap()
        .expect("the draining server's connection keeps working");
    drop(existing);
    wait_until(
        "the drained server's flows to end",
        Duration::from_secs(5),
        || active_flows(&lab, ECHO_VIP, echo_server(owner)) == 0,
    )
    .unwrap();
    lab.weirctl_ok(&[
        "server",
        "remove",
        ECHO_VIP,
        &echo_server(owner).to_string(),
    ]);
}

/// What must not change when a request is refused: the state file's bytes and the contents of
/// every map the daemon writes, as bpftool dumps them. Maglev tables are compared by contents
/// and by inner map id: an untouched table keeps its id.
#[derive(Debug, PartialEq)]
struct Snapshot {
    state: Vec<u8>,
    maps: Vec<Value>,
    table_ids: Value,
    tables: Vec<Value>,
}

impl Snapshot {
    fn take(lab: &Lab) -> Snapshot {
        let dump = |target: &[&str]| -> Value {
            let out = Command::new("bpftool")
                .args(["-j", "map", "dump"])
                .args(target)
                .output()
                .expect("bpftool runs");
            assert!(
                out.status.success(),
                "bpftool {target:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).expect("bpftool JSON")
        };
        let pinned = |name: &str| {
            let pin = lab.dir.join("bpf/weir/maps").join(name);
            dump(&["pinned", pin.to_str().unwrap()])
        };
        let table_ids = pinned("WEIR_MAGLEV");
        let tables = table_ids
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                let bytes: Vec<u8> = entry["value"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| {
                        u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16)
                            .unwrap()
                    })
                    .collect();
                let id = u32::from_le_bytes(bytes[..4].try_into().unwrap());
                dump(&["id", &id.to_string()])
            })
            .collect();
        Snapshot {
            state: fs::read(lab.state_file()).expect("state file"),
            maps: [
                "WEIR_VIPS",
                "WEIR_SERVERS",
                "WEIR_SETTINGS",
                "WEIR_TX_PORTS",
            ]
            .map(pinned)
            .to_vec(),
            table_ids,
            tables,
        }
    }

    /// Equal but for which inner maps hold the (equal) tables.
    fn same_contents(&self, other: &Snapshot) -> bool {
        (&self.state, &self.maps, &self.tables) == (&other.state, &other.maps, &other.tables)
    }
}

/// Sends raw `line` on the control socket and returns the daemon's answer.
fn raw_request(lab: &Lab, line: &str) -> Value {
    let mut stream = UnixStream::connect(lab.socket()).expect("connect");
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).expect("a JSON answer")
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn bad_requests_and_bad_configs_change_nothing() {
    let dir = lab_dir("bad");
    let lab = Lab::start(&prefix("bad"), 1, &dir, "native").expect("lab starts");
    // A flow on the echo server, and a second echo server so that one is not the last.
    let echo = SocketAddr::new(L4_VIP.into(), ECHO_PORT);
    let mut connection = lab
        .topology
        .client
        .run(|| EchoConnection::open(echo))
        .unwrap()
        .unwrap();
    lab.weirctl_ok(&["server", "add", ECHO_VIP, "198.18.11.2:7001"]);
    let before = Snapshot::take(&lab);
    let pools_before = pools(&lab);

    let http = http_server(1).to_string();
    let echo1 = echo_server(1).to_string();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["server", "add", "nope", "198.18.11.2:80"],
            4,
            "no L4 VIP or vhost named `nope` (L4 VIPs: demo-echo, demo-l4; vhosts: demo-l7)",
        ),
        (
            &["server", "drain", HTTP_VIP, "198.18.11.9:8080"],
            4,
            "has no server 198.18.11.9:8080",
        ),
        (
            &["server", "remove", "--wait", "demo-l7", "198.18.11.9:8080"],
            4,
            "pool `demo-l7` has no server 198.18.11.9:8080",
        ),
        (
            &["server", "add", HTTP_VIP, "198.18.11.2"],
            2,
            "invalid socket address",
        ),
        // Weights are checked by weirctl itself: usage errors, nothing sent.
        (
            &["server", "weight", HTTP_VIP, &http, "0"],
            2,
            "0 is not in 1..=10000",
        ),
        (
            &["server", "weight", HTTP_VIP, &http, "10001"],
            2,
            "10001 is not in 1..=10000",
        ),
        (&["server", "add", HTTP_VIP, &http], 1, "already has server"),
        (
            &["server", "add", HTTP_VIP, "[fd00:11::2]:8080"],
            1,
            "address family",
        ),
        (&["server", "remove", HTTP_VIP, &http], 1, "last server"),
        (
            &["server", "remove", ECHO_VIP, &echo1],
            1,
            "1 active flow(s)",
        ),
    ];
    for (args, code, message) in cases {
        let out = weirctl(&lab, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "weirctl {args:?}: {stderr}");
        assert!(stderr.contains(message), "weirctl {args:?}: {stderr}");
        assert_eq!(
            Snapshot::take(&lab),
            before,
            "weirctl {args:?} changed something"
        );
    }

    for (line, kind) in [
        ("{garbage", "bad_request"),
        (
            r#"{"version":1,"request":{"command":"server_launch"}}"#,
            "bad_request",
        ),
        (
            r#"{"version":1,"request":{"command":"server_weight","vip":"demo-l4","address":"198.18.11.2:8080","weight":"x"}}"#,
            "bad_request",
        ),
        (
            r#"{"version":7,"request":{"command":"status"}}"#,
            "unsupported_version",
        ),
    ] {
        let answer = raw_request(&lab, line);
        assert_eq!(answer["error"]["kind"], kind, "{line}: {answer}");
        assert_eq!(Snapshot::take(&lab), before, "{line} changed something");
    }

    // Reloads of broken configs, and of one changing what only a restart can change.
    let config = fs::read_to_string(lab.config()).unwrap();
    for (broken, message) in [
        (
            config.replace("port = 80\n", "port = 80\nweight = 3\n"),
            "weir.toml:",
        ),
        (
            config.replace("mode = \"nat\"", "mode = \"tunnel\""),
            "unknown variant `tunnel`",
        ),
        (
            config.replace("xdp_mode = \"native\"", "xdp_mode = \"generic\""),
            "datapath.xdp_mode needs a restart",
        ),
        (
            config.replace(", \"s1\"]", "]\nserver_interfaces = [\"s1\"]"),
            "datapath.server_interfaces needs a restart",
        ),
        (
            config.replace(
                "[l7]\nworkers = 2\n",
                "[l7]\nworkers = 2\npin_workers = true\n",
            ),
            "l7.pin_workers needs a restart",
        ),
    ] {
        assert_ne!(broken, config);
        fs::write(lab.config(), &broken).unwrap();
        let out = weirctl(&lab, &["reload"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
        assert_eq!(
            Snapshot::take(&lab),
            before,
            "a refused reload changed something"
        );
    }
    fs::write(lab.config(), &config).unwrap();

    // A change the daemon cannot make durable is undone: a directory where the state file's
    // temporary copy goes makes the write fail after the maps were written.
    let blocker = lab.dir.join(".state.json.tmp");
    fs::create_dir(&blocker).unwrap();
    let out = weirctl(&lab, &["server", "weight", ECHO_VIP, &echo1, "7"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    let after = Snapshot::take(&lab);
    assert_ne!(
        after.table_ids, before.table_ids,
        "the change should have reached the maps before it was undone"
    );
    assert!(
        after.same_contents(&before),
        "a change that could not be saved stayed in the maps"
    );
    fs::remove_dir(&blocker).unwrap();

    assert_eq!(lab.weirctl_ok(&["reload"]).trim(), "no change");
    assert!(Snapshot::take(&lab).same_contents(&before));
    assert_eq!(pools(&lab), pools_before);
    // Throughout, the established connection kept working.
    lab.topology
        .client
        .run(|| connection.exchange())
        .unwrap()
        .expect("connection intact");
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn concurrent_weirctl_changes_lose_no_update() {
    let dir = lab_dir("conc");
    let lab = Lab::start(&prefix("conc"), 1, &dir, "native").expect("lab starts");
    const N: u32 = 20;
    let spawn_all = |args: &dyn Fn(u32) -> Vec<String>| {
        let children: Vec<_> = (1..=N)
            .map(|k| {
                lab.weirctl()
                    .args(args(k))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("weirctl")
            })
            .collect();
        for mut child in children {
            assert!(child.wait().unwrap().success());
        }
    };
    let server = |k: u32| format!("198.18.60.{k}:8080");
    spawn_all(&|k| {
        [
            "server",
            "add",
            HTTP_VIP,
            &server(k),
            "--weight",
            &k.to_string(),
        ]
        .map(String::from)
        .to_vec()
    });
    spawn_all(&|k| {
        [
            "server",
            "weight",
            HTTP_VIP,
            &server(k),
            &(1000 + k).to_string(),
        ]
        .map(String::from)
        .to_vec()
    });
    let pools = pools(&lab);
    let state: Value = serde_json::from_slice(&fs::read(lab.state_file()).unwrap()).unwrap();
    let stored = state["l4_vips"][HTTP_VIP]["servers"].as_array().unwrap();
    for k in 1..=N {
        let key = (HTTP_VIP.to_string(), server(k));
        assert_eq!(
            pools.get(&key).map(|p| p.0),
            Some(1000 + k as u64),
            "{key:?}"
        );
        let saved = stored
            .iter()
            .find(|s| s["address"] == server(k))
            .expect("in the state file");
        assert_eq!(saved["weight"], 1000 + k);
    }
    assert_eq!(stored.len(), N as usize + 1);
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn the_control_socket_is_for_root_only() {
    let dir = lab_dir("perm");
    let lab = Lab::start(&prefix("perm"), 1, &dir, "generic").expect("lab starts");
    let meta = fs::metadata(lab.socket()).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    // `nobody` may reach the socket file (the lab's directory is world-readable) but not use it.
    fs::set_permissions(&lab.dir, fs::Permissions::from_mode(0o755)).unwrap();
    let out = lab
        .weirctl()
        .args(["server", "list"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("weirctl as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    // Root, on the same socket, is served.
    lab.weirctl_ok(&["server", "list"]);
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn reload_applies_config_edits_and_keeps_runtime_changes() {
    let dir = lab_dir("reload");
    let mut lab = Lab::start(&prefix("reload"), 3, &dir, "native").expect("lab starts");
    // Runtime changes: a server added by hand, another drained.
    lab.weirctl_ok(&[
        "server",
        "add",
        HTTP_VIP,
        "198.18.13.2:9999",
        "--weight",
        "5",
    ]);
    lab.weirctl_ok(&["server", "drain", HTTP_VIP, &http_server(1).to_string()]);
    // Config edits: srv2 leaves the HTTP pool, srv3 weighs 250, a new VIP appears. The lab's
    // vhost has the same pool in the file, so the edit changes it too.
    let config = fs::read_to_string(lab.config()).unwrap();
    let edited = config
        .replace(&format!("{{ address = \"{}\" }}, ", http_server(2)), "")
        .replace(
            &format!("{{ address = \"{}\" }}", http_server(3)),
            &format!("{{ address = \"{}\", weight = 250 }}", http_server(3)),
        )
        + "\n[[l4_vip]]\nname = \"extra\"\naddress = \"198.18.100.12\"\nport = 80\nprotocol = \"tcp\"\nservers = [{ address = \"198.18.11.2:8080\" }]\n";
    fs::write(lab.config(), &edited).unwrap();
    let diff = lab.weirctl_ok(&["reload"]);
    for line in [
        "vip extra: added",
        &format!("vip {HTTP_VIP}: server {} removed", http_server(2)),
        &format!(
            "vip {HTTP_VIP}: server {} weight 100 -> 250",
            http_server(3)
        ),
        &format!("vhost demo-l7: server {} removed", http_server(2)),
        &format!("vhost demo-l7: server {} weight 100 -> 250", http_server(3)),
    ] {
        assert!(diff.contains(line), "{line:?} not in:\n{diff}");
    }
    assert_eq!(diff.lines().count(), 5, "{diff}");
    let key = |vip: &str, server: &str| (vip.to_string(), server.to_string());
    let expected = |pools: &BTreeMap<_, _>| {
        assert_eq!(
            pools
                .get(&key(HTTP_VIP, "198.18.13.2:9999"))
                .map(|p: &(u64, String, String)| p.0),
            Some(5)
        );
        assert_eq!(
            pools
                .get(&key(HTTP_VIP, &http_server(1).to_string()))
                .map(|p| p.1.as_str()),
            Some("draining")
        );
        assert!(!pools.contains_key(&key(HTTP_VIP, &http_server(2).to_string())));
        assert_eq!(
            pools
                .get(&key(HTTP_VIP, &http_server(3).to_string()))
                .map(|p| p.0),
            Some(250)
        );
        assert!(pools.contains_key(&key("extra", "198.18.11.2:8080")));
    };
    expected(&pools(&lab));
    // The new VIP serves.
    let extra = SocketAddr::new("198.18.100.12".parse().unwrap(), 80);
    assert_eq!(
        lab.topology
            .client
            .run(|| http_get(extra))
            .unwrap()
            .unwrap(),
        "srv1"
    );

    // A restart with a config edited meanwhile: the same merge. srv2 comes back in the file.
    lab.kill_weir();
    fs::write(
        lab.config(),
        edited.replace(
            &format!("{{ address = \"{}\" }}", http_server(1)),
            &format!(
                "{{ address = \"{}\" }}, {{ address = \"{}\" }}",
                http_server(1),
                http_server(2)
            ),
        ),
    )
    .unwrap();
    lab.restart_weir().unwrap();
    let after = pools(&lab);
    expected(&BTreeMap::from_iter(
        after
            .clone()
            .into_iter()
            .filter(|(k, _)| k.1 != http_server(2).to_string()),
    ));
    assert_eq!(
        after
            .get(&key(HTTP_VIP, &http_server(2).to_string()))
            .map(|p| p.1.as_str()),
        Some("ready")
    );

    // SIGHUP reloads too: the new VIP leaves with the file.
    fs::write(lab.config(), &config).unwrap();
    let pid = lab.status().unwrap().daemon.pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until("SIGHUP reload", Duration::from_secs(5), || {
        !pools(&lab).keys().any(|(vip, _)| vip == "extra")
    })
    .unwrap();
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn the_daemon_tells_systemd_it_is_ready_once_it_serves() {
    let dir = lab_dir("notify");
    let mut lab = Lab::start(&prefix("notify"), 1, &dir, "generic").expect("lab starts");
    lab.kill_weir();
    // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
    let path = dir.join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    lab.restart_weir_with_env(&[("NOTIFY_SOCKET", &path)])
        .expect("weir restarts");
    // Every notification up to READY=1 (bounded: each waits at most the read timeout).
    let mut messages = Vec::new();
    for _ in 0..8 {
        let mut message = [0u8; 256];
        let n =
            weir_tests::retry_interrupted(|| systemd.recv(&mut message)).expect("a notification");
        messages.push(String::from_utf8_lossy(&message[..n]).into_owned());
        if messages.last().unwrap().lines().any(|l| l == "READY=1") {
            break;
        }
    }
    let has = |m: &String, line: &str| m.lines().any(|l| l == line);
    let ready = messages.iter().position(|m| has(m, "READY=1"));
    assert!(ready.is_some(), "no READY=1: {messages:?}");
    // The L7 sockets were in the store before: a crash right after READY refuses nothing.
    let stored = messages.iter().position(|m| has(m, "FDSTORE=1"));
    assert!(stored < ready && stored.is_some(), "{messages:?}");
    // READY came after the control socket: weirctl is served at once.
    lab.weirctl_ok(&["status"]);
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn the_daemon_raises_its_descriptor_limit_and_warns_when_it_is_short() {
    let dir = lab_dir("nofile");
    let mut lab = Lab::start(&prefix("nofile"), 1, &dir, "generic").expect("lab starts");
    lab.kill_weir();
    // A service manager's usual soft limit under a hard limit too low for the L7 defaults
    // (10 000 connections per worker, four descriptors each).
    lab.restart_weir_with_descriptor_limit((1024, 4096))
        .expect("weir restarts");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", lab.weir_pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(open_files[3..5], ["4096", "4096"], "{limits}");
    assert!(
        lab.log()
            .contains("the descriptor limit is below what the L7 connection limits"),
        "{}",
        lab.log()
    );
}

/// What the kernel has attached in the balancer namespace (the XDP program of each interface,
/// by id), as `bpftool net show` reports it: independent of what weir says.
fn kernel_attachments(lab: &Lab) -> Value {
    let out = lab
        .topology
        .balancer
        .command("bpftool")
        .args(["-j", "net", "show"])
        .output()
        .expect("bpftool runs");
    assert!(out.status.success(), "bpftool net show failed");
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// The kernel's id of every object pinned in the lab's pin directory (maps, and the XDP and
/// TC links with the program each runs), by path.
fn pinned_ids(lab: &Lab) -> BTreeMap<String, (u64, u64)> {
    let root = lab.dir.join("bpf/weir");
    ["maps", "links", "tc-links"]
        .iter()
        .flat_map(|kind| fs::read_dir(root.join(kind)).expect("pin directory"))
        .map(|entry| {
            let path = entry.unwrap().path();
            let what = if path.parent().unwrap().ends_with("maps") {
                "map"
            } else {
                "link"
            };
            let out = Command::new("bpftool")
                .args(["-j", what, "show", "pinned"])
                .arg(&path)
                .output()
                .expect("bpftool runs");
            let object: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
            (
                path.strip_prefix(&root).unwrap().display().to_string(),
                (
                    object["id"].as_u64().expect("an id"),
                    object["prog_id"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_second_daemon_stops_before_it_touches_anything() {
    let dir = lab_dir("twice");
    let lab = Lab::start(&prefix("twice"), 2, &dir, "native").expect("lab starts");
    // The lab's own config fits a usual descriptor limit: nothing to warn about at start.
    assert!(
        !lab.log().contains("descriptor limit"),
        "the lab config makes weir warn:\n{}",
        lab.log()
    );
    let attachments = kernel_attachments(&lab);
    let pinned = pinned_ids(&lab);
    let status = lab.status().expect("status");
    let pools_before = pools(&lab);
    let state = fs::read(lab.state_file()).unwrap();
    assert_eq!(
        attachments[0]["xdp"].as_array().map(Vec::len),
        Some(3),
        "{attachments}"
    );
    assert!(
        pinned.keys().filter(|k| k.starts_with("tc-links/")).count() == 3
            && pinned.keys().filter(|k| k.starts_with("maps/")).count() >= 16,
        "{pinned:?}"
    );

    let out = lab
        .topology
        .balancer
        .command(weir_tests::workspace_bin("weir"))
        .arg("--config")
        .arg(lab.config())
        .output()
        .expect("weir runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon started: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one clear line, not: {stderr}");
    assert!(
        lines[0].contains("another weir daemon")
            && lines[0].contains(&format!("pid {}", lab.weir_pid())),
        "{}",
        lines[0]
    );

    // Nothing changed: the kernel's programs, the pinned maps, the running daemon's view, the
    // pools and the state file.
    assert_eq!(kernel_attachments(&lab), attachments);
    assert_eq!(pinned_ids(&lab), pinned);
    let after = lab.status().expect("the first daemon still answers");
    assert_eq!(after.daemon.pid, status.daemon.pid);
    assert_eq!(after.xdp, status.xdp);
    assert_eq!(pools(&lab), pools_before);
    assert_eq!(fs::read(lab.state_file()).unwrap(), state);
    // And the datapath still serves through the first daemon's programs.
    let served = lab
        .topology
        .client
        .run(|| http_get(SocketAddr::new(L4_VIP.into(), 80)))
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn remove_wait_that_times_out_says_the_server_stays_draining() {
    let dir = lab_dir("waitout");
    let lab = Lab::start(&prefix("waitout"), 2, &dir, "native").expect("lab starts");
    let echo = SocketAddr::new(L4_VIP.into(), ECHO_PORT);
    let (connection, server) = lab
        .topology
        .client
        .run(move || {
            let mut connection = EchoConnection::open(echo).expect("echo connection");
            connection.exchange().expect("exchange");
            let server = connection.server.clone();
            (connection, server)
        })
        .unwrap();
    let i: usize = server.trim_start_matches("srv").parse().unwrap();
    let address = echo_server(i).to_string();
    let out = weirctl(
        &lab,
        &[
            "server",
            "remove",
            ECHO_VIP,
            &address,
            "--wait",
            "--timeout",
            "1",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("nothing removed") && stderr.contains("stays draining"),
        "{stderr}"
    );
    let key = (ECHO_VIP.to_string(), address);
    assert_eq!(pools(&lab)[&key].1, "draining", "as the message says");
    drop(connection);
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn servers_that_cannot_work_are_refused_by_add_and_reload() {
    let dir = lab_dir("addrs");
    let lab = Lab::start(&prefix("addrs"), 2, &dir, "native").expect("lab starts");
    // A local origin is a fine vhost server (the proxy connects to it on this host).
    lab.weirctl_ok(&["server", "add", "demo-l7", "127.0.0.1:8080"]);
    lab.weirctl_ok(&["server", "remove", "demo-l7", "127.0.0.1:8080"]);
    let before = Snapshot::take(&lab);
    let refused = |pool: &str, address: &str, reason: &str| {
        let out = weirctl(&lab, &["server", "add", pool, address]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{pool} {address}: {stderr}");
        assert!(
            stderr.contains(&format!("server {address} cannot work")) && stderr.contains(reason),
            "{pool} {address}: {stderr}"
        );
    };
    refused(HTTP_VIP, "0.0.0.0:8080", "unspecified");
    refused(HTTP_VIP, "255.255.255.255:8080", "broadcast");
    refused(HTTP_VIP, "224.0.0.9:8080", "multicast");
    refused(HTTP_VIP, "127.0.0.1:8080", "loopback");
    refused(HTTP_VIP, "198.18.11.2:0", "port 0");
    refused(HTTP_VIP, "198.18.100.10:80", "is an L4 VIP");
    refused(HTTP_VIP, "198.18.100.10:8080", "is an L4 VIP");
    refused(HTTP_VIP, "198.18.0.2:8080", "an address of this balancer");
    refused("demo-l7", "198.18.100.11:80", "L7 listen address");
    refused("demo-l7", "0.0.0.0:8080", "unspecified");
    assert!(
        before.same_contents(&Snapshot::take(&lab)),
        "a refused add changed something"
    );

    // A reload that brings one in is refused whole, whichever class it is.
    let config = fs::read_to_string(lab.config()).unwrap();
    let pool = format!("{{ address = \"{}\" }}", http_server(1));
    for (address, reason) in [
        ("198.18.0.2:8080", "of this balancer"),
        ("0.0.0.0:8080", "unspecified"),
        ("255.255.255.255:8080", "broadcast"),
        ("224.0.0.9:8080", "multicast"),
        ("127.0.0.1:8080", "loopback"),
        ("198.18.11.2:0", "port 0"),
        ("198.18.100.10:8080", "is an L4 VIP"),
    ] {
        let edited = config.replacen(&pool, &format!("{pool}, {{ address = \"{address}\" }}"), 1);
        assert_ne!(edited, config);
        fs::write(lab.config(), edited).unwrap();
        let out = weirctl(&lab, &["reload"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{address}: {stderr}");
        assert!(
            stderr.contains(&format!("{address} cannot work")) && stderr.contains(reason),
            "{address}: {stderr}"
        );
        assert!(
            before.same_contents(&Snapshot::take(&lab)),
            "a refused reload ({address}) changed something"
        );
    }
}
