//! End-to-end: weir drives a real BGP speaker. BIRD 2 runs in the lab's balancer namespace,
//! told by weir what to announce (`[bgp]`), and peers with another BIRD in the client
//! namespace, which plays the router. Checked on the router's own table: the L4 VIP is
//! announced while the node is in service and the VIP has a server taking new flows; it is
//! withdrawn on `weirctl node drain` (kept across a restart), when every server of the VIP's
//! address is drained, and when the daemon stops; the session shows in `weirctl status`.
//! (Several nodes behind an ECMP router: `fleet_e2e`.)

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_tests::{
    bird::{Bird, FAST_TIMERS, birdc},
    lab::Lab,
    netns::wait_until,
    topology::{L4_VIP, Topology, server_socket},
};

/// The routes the router learned from the balancer, as `birdc` prints them.
fn router_routes(router: &Path) -> String {
    birdc(router, &["show", "route", "protocol", "lb"])
}

/// Whether the router's table holds the VIP's /32, learned from the balancer.
fn router_has_vip(router: &Path) -> bool {
    router_routes(router).contains(&format!("{L4_VIP}/32"))
}

/// Where the daemon serves `/metrics` (in the balancer's namespace).
const METRICS: &str = "127.0.0.1:9113";

/// The daemon's exposition.
fn exposition(lab: &Lab) -> String {
    lab.topology
        .balancer
        .run(|| weir_tests::http_client::get_body(METRICS, "/metrics"))
        .unwrap()
        .expect("/metrics answers")
}

/// Two more VIPs: one announced whatever its servers, one never.
const ALWAYS: &str = "198.18.100.40";
const NEVER: &str = "198.18.100.41";

/// Waits until the router has (or has not) the VIP; how long that took.
fn until_router(router: &Path, has: bool, what: &str) -> Duration {
    let started = Instant::now();
    wait_until(what, Duration::from_secs(20), || {
        router_has_vip(router) == has
    })
    .unwrap_or_else(|err| {
        panic!(
            "{err}\nrouter protocols:\n{}\nroutes:\n{}",
            birdc(router, &["show", "protocols", "all", "lb"]),
            birdc(router, &["show", "route", "all"])
        )
    });
    started.elapsed()
}

fn node(lab: &Lab) -> Value {
    let status: Value = serde_json::from_str(&lab.weirctl_ok(&["--json", "status"])).unwrap();
    status["daemon"]["node"].clone()
}

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon and BIRD"]
fn the_vip_is_announced_in_service_and_withdrawn_on_drain_when_serverless_and_on_stop() {
    let tag = format!("weirt-{}-bgp", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let topology = Topology::new(&format!("{tag}-"), 2).expect("topology");
    let routes = dir.join("bgp-vips.conf");
    let lb_socket = dir.join("bird-lb.ctl");
    let mut lab = Lab::start_in(topology, &dir, "native", |config| {
        let extra = |name: &str, address: &str, announce: &str| {
            format!(
                "\n[[l4_vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = 80\nprotocol = \"tcp\"\nannounce = \"{announce}\"\nservers = [{{ address = \"{}\" }}]\n",
                server_socket(1)
            )
        };
        config
            + &extra("always-on", ALWAYS, "always")
            + &extra("never-on", NEVER, "never")
            + &format!(
                "\n[metrics]\nlisten = \"{METRICS}\"\n\n[bgp]\nbird_socket = \"{}\"\nroutes_file = \"{}\"\n",
                lb_socket.display(),
                routes.display()
            )
    })
    .expect("lab starts");
    // weir wrote the routes file at start, though no speaker answered yet.
    assert!(routes.exists(), "the routes file is written at start");
    assert!(node(&lab)["speaker_error"].is_string(), "{}", node(&lab));

    let timers = FAST_TIMERS;
    let lb_bird = Bird::start(
        &lab.topology.balancer,
        &dir,
        "lb",
        &format!(
            "router id 198.18.0.2;\nprotocol device {{}}\nprotocol static weir_vips {{\n  ipv4;\n  include \"{}\";\n}}\nprotocol bgp uplink {{\n  local 198.18.0.2 as 65001;\n  neighbor 198.18.0.1 as 65000;\n  {timers}\n  ipv4 {{ import none; export where proto = \"weir_vips\"; }};\n}}\n",
            routes.display()
        ),
    )
    .expect("BIRD starts on the balancer");
    assert_eq!(lb_bird.socket, lb_socket);
    let router_bird = Bird::start(
        &lab.topology.client,
        &dir,
        "router",
        &format!(
            "router id 198.18.0.1;\nprotocol device {{}}\nprotocol bgp lb {{\n  local 198.18.0.1 as 65000;\n  neighbor 198.18.0.2 as 65001;\n  {timers}\n  ipv4 {{ import all; export none; }};\n}}\n"
        ),
    )
    .expect("BIRD starts as the router");
    let router = router_bird.socket.as_path();

    // In service, with servers: announced, and the session shows in weirctl status.
    let took = until_router(router, true, "the VIP on the router");
    println!("announced {took:?} after the speakers started");
    let _ = wait_until(
        "the session in weirctl status",
        Duration::from_secs(10),
        || node(&lab)["sessions"][0]["info"] == "Established",
    );
    let status = node(&lab);
    assert_eq!(status["sessions"][0]["info"], "Established", "{status}");
    assert_eq!(status["announced"][0], L4_VIP.to_string(), "{status}");
    assert!(status["speaker_error"].is_null(), "{status}");
    let text = lab.weirctl_ok(&["status"]);
    assert!(text.contains("session uplink: up Established"), "{text}");
    let metrics = exposition(&lab);
    assert!(
        metrics.contains("weir_bgp_session_established{session=\"uplink\"} 1")
            && metrics.contains("weir_node_drained 0"),
        "{metrics}"
    );
    // Per VIP: `always` is announced without a ready server, `never` not even with one.
    lab.weirctl_ok(&[
        "server",
        "disable",
        "always-on",
        &server_socket(1).to_string(),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let routes = router_routes(router);
    assert!(routes.contains(&format!("{ALWAYS}/32")), "{routes}");
    assert!(!routes.contains(&format!("{NEVER}/32")), "{routes}");

    // Drained: withdrawn, and drained it stays across a restart.
    lab.weirctl_ok(&["node", "drain"]);
    let took = until_router(router, false, "the withdrawal after node drain");
    println!("withdrawn {took:?} after node drain");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let routes = router_routes(router);
    assert!(
        !routes.contains(&format!("{ALWAYS}/32")),
        "a drained node announces nothing: {routes}"
    );
    lab.restart_weir().expect("weir restarts");
    assert_eq!(node(&lab)["drained"], true);
    assert!(exposition(&lab).contains("weir_node_drained 1"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !router_has_vip(router),
        "a drained node announces nothing after a restart"
    );
    lab.weirctl_ok(&["node", "undrain"]);
    until_router(router, true, "the VIP back after node undrain");

    // Every server of the VIP's address drained (both VIPs there): withdrawn; one back: announced.
    let servers = [server_socket(1), server_socket(2)];
    let echo = |i: usize| {
        let mut s = server_socket(i);
        s.set_port(weir_tests::topology::ECHO_PORT);
        s.to_string()
    };
    for (i, server) in servers.iter().enumerate() {
        lab.weirctl_ok(&["server", "drain", "demo-l4", &server.to_string()]);
        lab.weirctl_ok(&["server", "drain", "demo-echo", &echo(i + 1)]);
    }
    until_router(
        router,
        false,
        "the withdrawal once no server takes new flows",
    );
    lab.weirctl_ok(&["server", "enable", "demo-l4", &servers[0].to_string()]);
    until_router(router, true, "the VIP back with a server");
    let events = lab.weirctl_ok(&["events"]);
    assert!(
        events.contains(&format!("bgp: withdrawing {L4_VIP}"))
            && events.contains(&format!("bgp: announcing {L4_VIP}")),
        "{events}"
    );

    // The daemon stops: withdrawn (the pinned datapath still forwards what arrives).
    lab.terminate_weir().expect("weir stops");
    let took = until_router(router, false, "the withdrawal on stop");
    println!("withdrawn {took:?} after SIGTERM");
    // Restarted for the lab's own clean-up.
    lab.restart_weir().expect("weir restarts");
}
