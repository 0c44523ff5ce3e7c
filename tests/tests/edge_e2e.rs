//! End-to-end tests of the L4 edge policy: hostile traffic at the VIPs of a running `weir`,
//! with real clients, servers and the daemon in the lab's namespaces.

use std::{
    fs,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use weir_config::control::StatusReport;
use weir_tests::{
    client::{EchoConnection, http_get},
    flood::{self, ATTACK_LINK, FloodTarget, syn_flood},
    lab::Lab,
    netns::Netns,
    topology::{self, DSR_VIP, ECHO_PORT, L4_VIP, Topology, server_addr},
};

/// SYNs the flood sends (the acceptance asks for at least a million).
const FLOOD_SYNS: u64 = 1_200_000;
/// However fast the box is, the flood stops after this long.
const FLOOD_LIMIT: Duration = Duration::from_secs(90);
const LONG_LIVED_PER_VIP: usize = 15;

fn lab_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("weirt-{}-{tag}", std::process::id()))
}

/// The DSR VIPs this test adds to the lab's config: HTTP on port 80 and echo on port 7, which
/// the demo backends serve on every address (the DSR VIP is on their loopback).
fn dsr_vips(servers: usize) -> String {
    let pool = |port: u16| {
        (1..=servers)
            .map(|i| format!("{{ address = \"{}:{port}\" }}", server_addr(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "\n[[l4_vip]]\nname = \"dsr-http\"\naddress = \"{DSR_VIP}\"\nport = 80\nprotocol = \"tcp\"\n\
         mode = \"dsr\"\nservers = [{}]\n\n[[l4_vip]]\nname = \"dsr-echo\"\naddress = \
         \"{DSR_VIP}\"\nport = 7\nprotocol = \"tcp\"\nmode = \"dsr\"\nservers = [{}]\n",
        pool(80),
        pool(7)
    )
}

/// The MAC of `interface` in `ns`.
fn mac_of(ns: &Netns, interface: &str) -> [u8; 6] {
    let interface = interface.to_string();
    ns.run(move || {
        nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter(|i| i.interface_name == interface)
            .find_map(|i| i.address.and_then(|a| a.as_link_addr()?.addr()))
            .expect("the interface has a MAC")
    })
    .unwrap()
}

/// A flow event's count in a status report.
fn event(status: &StatusReport, name: &str) -> u64 {
    status
        .flows
        .events
        .iter()
        .find(|e| e.event == name)
        .map_or(0, |e| e.count)
}

/// A datapath counter's packets in a status report.
fn packets(status: &StatusReport, reason: &str) -> u64 {
    status
        .counters
        .iter()
        .find(|c| c.reason == reason)
        .map_or(0, |c| c.packets)
}

/// What the legitimate clients saw during the flood.
#[derive(Default)]
struct Clients {
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    long_rounds: AtomicU64,
    errors: Mutex<Vec<String>>,
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn a_spoofed_syn_flood_breaks_no_connection_and_blocks_no_removal() {
    let dir = lab_dir("flood");
    let prefix = format!("weirt-{}-flood-", std::process::id());
    // The attacker gets a link of its own to the balancer; the lab gets DSR VIPs and a flow
    // table of 64 Ki entries, which the flood outnumbers 18 times: were junk recorded there,
    // it would evict established flows.
    let topology = Topology::new(&prefix, 3).expect("topology");
    let attacker =
        flood::attacker(&format!("{prefix}attacker"), &topology.balancer).expect("attacker");
    let lab = Lab::start_in(topology, &dir, "native", |config| {
        config
            .replace(
                "interfaces = [",
                &format!("interfaces = [\"{ATTACK_LINK}\", "),
            )
            .replace("[datapath]\n", "[datapath]\nflow_table_size = 65536\n")
            + &dsr_vips(3)
    })
    .expect("lab starts");

    let client_ns = format!("/run/netns/{}", lab.topology.client.name());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = Arc::new(Clients::default());
    let mut threads = Vec::new();
    // 30 long-lived connections, 15 through the NAT echo VIP and 15 through the DSR one, each
    // exchanging verified data every 50 ms for the whole test.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    for i in 0..2 * LONG_LIVED_PER_VIP {
        let vip = if i < LONG_LIVED_PER_VIP {
            SocketAddr::new(L4_VIP.into(), ECHO_PORT)
        } else {
            SocketAddr::new(DSR_VIP.into(), 7)
        };
        let (stop, clients, client_ns, opened) = (
            stop.clone(),
            clients.clone(),
            client_ns.clone(),
            opened_tx.clone(),
        );
        threads.push(thread::spawn(move || {
            enter(&client_ns);
            let mut connection = EchoConnection::open(vip).expect("long-lived connection opens");
            opened.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Err(err) = connection.exchange() {
                    clients.errors.lock().unwrap().push(format!(
                        "long-lived connection {vip} → {} broke in round {}: {err}",
                        connection.server, connection.round
                    ));
                    return;
                }
                clients.long_rounds.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    for _ in 0..2 * LONG_LIVED_PER_VIP {
        opened_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every long-lived connection opens");
    }
    // Legitimate new connections, one request each, to both HTTP VIPs.
    for vip in [
        SocketAddr::new(L4_VIP.into(), 80),
        SocketAddr::new(DSR_VIP.into(), 80),
    ] {
        let (stop, clients, client_ns) = (stop.clone(), clients.clone(), client_ns.clone());
        threads.push(thread::spawn(move || {
            enter(&client_ns);
            while !stop.load(Ordering::Relaxed) {
                match http_get(vip) {
                    Ok(_) => clients.new_ok.fetch_add(1, Ordering::Relaxed),
                    Err(err) => {
                        clients
                            .errors
                            .lock()
                            .unwrap()
                            .push(format!("new {vip}: {err}"));
                        clients.new_failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    let before = lab.status().expect("status");

    // The flood: spoofed SYNs at the NAT and the DSR HTTP VIPs, from the attacker's link.
    let target = FloodTarget {
        interface: "eth0".into(),
        src_mac: mac_of(&attacker, "eth0"),
        dst_mac: mac_of(&lab.topology.balancer, ATTACK_LINK),
        destinations: vec![
            SocketAddrV4::new(L4_VIP, 80),
            SocketAddrV4::new(DSR_VIP, 80),
        ],
    };
    let flooder = {
        let attacker_ns = format!("/run/netns/{}", attacker.name());
        thread::spawn(move || {
            enter(&attacker_ns);
            syn_flood(&target, FLOOD_SYNS, FLOOD_LIMIT)
        })
    };
    // One pool change in the middle of it, and the embryonic table's size while it lasts.
    thread::sleep(Duration::from_secs(2));
    let during = lab.status().expect("status");
    let echo1 = format!("{}:{ECHO_PORT}", server_addr(1));
    lab.weirctl_ok(&["server", "drain", "demo-echo", &echo1]);
    thread::sleep(Duration::from_millis(300));
    lab.weirctl_ok(&["server", "enable", "demo-echo", &echo1]);
    let flood = flooder.join().expect("flood thread").expect("flood sends");
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("client thread");
    }

    // An idle server of the flooded NAT VIP goes with a plain remove: the junk SYNs it was
    // sent are embryonic flows, not active ones.
    let after = lab.status().expect("status");
    assert!(
        after.flows.embryonic > 0,
        "the junk must still be in the embryonic table for the removal to mean anything"
    );
    let idle = format!("{}", topology::server_socket(3));
    lab.weirctl_ok(&["server", "remove", "demo-l4", &idle]);

    let errors = clients.errors.lock().unwrap();
    let (ok, failed) = (
        clients.new_ok.load(Ordering::Relaxed),
        clients.new_failed.load(Ordering::Relaxed),
    );
    let created = event(&after, "embryonic_created") - event(&before, "embryonic_created");
    eprintln!(
        "flood: {} SYNs in {:.1} s ({:.0}/s, {} refused by the socket); {created} embryonic flows \
         created; embryonic table at {} during it; new connections {ok} ok, {failed} failed; \
         {} long-lived rounds",
        flood.sent,
        flood.elapsed.as_secs_f64(),
        flood.rate(),
        flood.refused,
        during.flows.embryonic,
        clients.long_rounds.load(Ordering::Relaxed),
    );
    assert!(flood.sent >= 1_000_000, "only {} SYNs sent", flood.sent);
    let long_broken: Vec<&String> = errors.iter().filter(|e| e.starts_with("long")).collect();
    assert!(
        long_broken.is_empty(),
        "long-lived connections broke: {long_broken:?}"
    );
    assert!(
        failed * 100 <= ok + failed,
        "{failed} of {} new connections failed: {:?}",
        ok + failed,
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 100, "too few new connections to mean anything: {ok}");
    // Bounded: the embryonic table is an LRU map of 64 Ki entries (its size is the bound, as
    // the kernel holds it), full while the flood lasts, and the junk is no server's active
    // flow: the flooded VIP's active flows are the legitimate clients' few.
    assert!(
        (60_000..=65_536).contains(&during.flows.embryonic),
        "embryonic table during the flood: {}",
        during.flows.embryonic
    );
    let pinned = dir.join("bpf/weir/maps/WEIR_EMBRYONIC");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&pinned)
        .output()
        .expect("bpftool runs");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    assert_eq!(map["max_entries"].as_u64(), Some(65_536), "{map}");
    let vips: serde_json::Value =
        serde_json::from_str(&lab.weirctl_ok(&["vip", "list", "--json"])).expect("JSON");
    let active: u64 = vips
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == "demo-l4" || v["name"] == "dsr-http")
        .map(|v| v["active_flows"].as_u64().unwrap_or(0))
        .sum();
    assert!(active < 1_000, "junk counted as active flows: {active}");
    // The counters show the flood: most SYNs became embryonic flows and were forwarded.
    assert!(
        created >= flood.sent / 2,
        "{created} embryonic flows for {} SYNs",
        flood.sent
    );
    let forwarded = packets(&after, "forward_nat") + packets(&after, "forward_dsr")
        - packets(&before, "forward_nat")
        - packets(&before, "forward_dsr");
    assert!(forwarded >= flood.sent / 2, "{forwarded} forwarded");
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &str) {
    let file = fs::File::open(path).expect("client netns");
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}
