//! The walking skeleton end to end, on a real kernel: XDP attached in a namespace counts real
//! traffic, the io_uring L7 proxy answers, and `weirctl status` reports both.

use std::process::Command;

use weir_tests::{
    lab::Lab,
    topology::{self, L7_VIP},
};

fn prefix(test: &str) -> String {
    format!("weirt-{}-{test}-", std::process::id())
}

fn counter(report: &weir_config::control::StatusReport, reason: &str) -> u64 {
    report
        .counters
        .iter()
        .find(|c| c.reason == reason)
        .unwrap_or_else(|| panic!("no counter {reason} in {report:?}"))
        .packets
}

fn curl(lab: &Lab, url: &str, extra: &[&str]) -> String {
    let out = lab
        .topology
        .client
        .command("curl")
        .args(["-sS", "--max-time", "5"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
#[ignore = "needs root: creates network namespaces and attaches XDP"]
fn traffic_through_the_balancer_moves_xdp_counters_and_l7_answers() {
    let dir = std::env::temp_dir().join(prefix("skeleton"));
    let lab = Lab::start(&prefix("skel"), 3, &dir, "native").expect("lab starts");

    let before = lab.status().unwrap();
    assert_eq!(before.xdp.len(), 4, "uplink and three server links");
    assert_eq!(before.xdp[0].interface, topology::BALANCER_UPLINK);
    assert!(before.xdp.iter().all(|x| x.program_id.is_some()));
    assert!(
        before.xdp.iter().all(|x| x.tc_program_id > 0),
        "the NAT return program is attached at TC on every interface: {:?}",
        before.xdp
    );
    assert_eq!(before.listeners.len(), 1);
    assert_eq!(
        before.listeners[0].address,
        format!("{L7_VIP}:80").parse().unwrap()
    );
    assert_eq!(before.listeners[0].requests, 0);

    // 20 ICMP echo requests routed through the balancer to a server: each request crosses the
    // uplink and each reply the server link, where XDP must pass them as ICMP that is not
    // about a VIP flow.
    let pings = 20;
    let status = lab
        .topology
        .client
        .command("ping")
        .args(["-q", "-c", &pings.to_string(), "-i", "0.01", "-W", "2"])
        .arg(topology::server_addr(2).to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ping through the balancer failed");

    // A demo backend answers through the balancer (routed, XDP passes).
    let body = curl(
        &lab,
        &format!("http://{}/", topology::server_socket(1)),
        &[],
    );
    assert_eq!(body, "srv1\n");

    // The L7 proxy on the L7 VIP routes `demo.weir.test` to a demo backend; an unknown
    // Host gets 404 from weir itself.
    let body = curl(
        &lab,
        &format!("http://{L7_VIP}/"),
        &["-H", "Host: demo.weir.test"],
    );
    assert!(
        ["srv1\n", "srv2\n", "srv3\n"].contains(&body.as_str()),
        "{body:?}"
    );
    let status = curl(
        &lab,
        &format!("http://{L7_VIP}/"),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: nobody.test",
        ],
    );
    assert_eq!(status, "404");

    let after = lab.status().unwrap();
    let moved = |name| counter(&after, name) - counter(&before, name);
    assert!(
        moved("pass_icmp") >= 2 * pings,
        "pass_icmp moved by {}, expected at least {}",
        moved("pass_icmp"),
        2 * pings
    );
    // The two HTTP exchanges (to a server, to the L7 VIP) are IP traffic for no L4 VIP.
    assert!(
        moved("pass_not_vip") >= 10,
        "pass_not_vip moved by {}",
        moved("pass_not_vip")
    );
    assert_eq!(after.listeners[0].requests, 2);
    assert_eq!(after.listeners[0].connections, 2);
    assert_eq!(after.xdp, before.xdp);

    // The human table shows the same attach point and counters.
    let table = lab.weirctl().arg("status").output().unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("pass_not_vip"), "{table}");
    assert!(table.contains(&format!("{L7_VIP}:80")), "{table}");
}

#[test]
#[ignore = "needs root: creates network namespaces and attaches XDP"]
fn daemon_stops_on_sigterm_and_removes_its_socket() {
    let dir = std::env::temp_dir().join(prefix("sigterm"));
    let mut lab = Lab::start(&prefix("term"), 1, &dir, "generic").expect("lab starts");
    let status = lab.weir.terminate().unwrap();
    assert!(status.success(), "weir exited with {status}");
    assert!(!lab.socket().exists(), "socket left behind");
    // The L7 workers were shut down gracefully (nothing open here, so at once).
    let log = lab.log();
    assert!(
        log.contains("L7 workers stopped") && log.contains("open=0"),
        "{log}"
    );
}

#[test]
#[ignore = "needs root: creates network namespaces"]
fn namespaces_are_removed_even_when_the_test_panics() {
    let name = prefix("panic");
    let result = std::panic::catch_unwind(|| {
        let _ns = weir_tests::netns::Netns::new(&name).unwrap();
        panic!("test failure inside a namespace");
    });
    assert!(result.is_err());
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.contains(&name), "{name} left behind: {listed}");
}
