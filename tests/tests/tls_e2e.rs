//! End-to-end: TLS termination in the daemon, operated as an operator would. A TLS vhost on
//! the lab's L7 VIP, certificates from a throwaway CA in files; a client in the client
//! namespace. Checked: HTTPS is served; `weirctl status` and `/metrics` show the
//! certificate's expiry and the handshakes; a renewed certificate is loaded by
//! `weirctl reload` and by SIGHUP while a connection stays open and keeps working; a reload
//! naming a bad key is refused with the path and the reason, and nothing changes.

use std::{net::SocketAddr, time::Duration};

use weir_tests::{
    http_client::get_body,
    lab::Lab,
    netns::wait_until,
    tls::{KeyKind, TestCa, TlsClient},
    topology::{L7_VIP, Topology, server_socket},
};

const METRICS: &str = "127.0.0.1:9113";

#[test]
#[ignore = "needs root: creates network namespaces, attaches XDP and runs the daemon"]
fn certificates_are_served_reported_and_reloaded_without_dropping_a_connection() {
    let tag = format!("weirt-{}-tls", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let topology = Topology::new(&format!("{tag}-"), 2).expect("topology");
    let certs = dir.join("certs");
    let ca = TestCa::new(&certs);
    let shop = ca.issue(&certs, "shop", &["shop.test"], KeyKind::EcdsaP256);
    let tls_vhost = format!(
        "\n[[vhost]]\nname = \"shop\"\nlisten = \"{L7_VIP}:443\"\nhosts = [\"shop.test\"]\ntls = {{ certificate = \"{}\", key = \"{}\" }}\nhsts_max_age_secs = 600\nservers = [{{ address = \"{}\" }}]\n\n[metrics]\nlisten = \"{METRICS}\"\n",
        shop.certificate.display(),
        shop.key.display(),
        server_socket(1)
    );
    let lab =
        Lab::start_in(topology, &dir, "native", |config| config + &tls_vhost).expect("lab starts");
    let vip = SocketAddr::new(L7_VIP.into(), 443);
    let client = |lab: &Lab| {
        lab.topology
            .client
            .run(|| TlsClient::connect(vip, "shop.test", ca.client_config()))
            .unwrap()
            .expect("TLS connection to the vhost")
    };

    let mut open = client(&lab);
    assert_eq!(open.peer_certificate(), shop.der);
    let response = open.get("shop.test", "/").unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.header("strict-transport-security"),
        Some("max-age=600")
    );

    // Reported: the certificate's expiry and the handshake, in status and in metrics.
    let status = lab.status().unwrap();
    let certificate = &status.certificates[0];
    assert_eq!(certificate.vhost, "shop");
    assert_eq!(certificate.path, shop.certificate.display().to_string());
    let in_a_year = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 365 * 86400;
    assert!(certificate.not_after_unix > in_a_year, "{certificate:?}");
    let text = lab.weirctl_ok(&["status"]);
    assert!(
        text.contains("CERTIFICATES") && text.contains("shop"),
        "{text}"
    );
    let metrics = || {
        lab.topology
            .balancer
            .run(|| get_body(METRICS, "/metrics"))
            .unwrap()
            .expect("/metrics answers")
    };
    let exposition = metrics();
    assert!(
        exposition.contains(&format!(
            "weir_tls_certificate_expiry_timestamp_seconds{{vhost=\"shop\"}} {}",
            certificate.not_after_unix
        )),
        "{exposition}"
    );
    assert!(
        exposition.contains(&format!(
            "weir_l7_tls_handshakes_total{{kind=\"full\",listener=\"{vip}\"}} 1"
        )),
        "{exposition}"
    );

    // Renewed by `weirctl reload`: new connections get it, the open one keeps working.
    let renewed = ca.issue(&certs, "renewed", &["shop.test"], KeyKind::EcdsaP256);
    std::fs::copy(&renewed.certificate, &shop.certificate).unwrap();
    std::fs::copy(&renewed.key, &shop.key).unwrap();
    let changes = lab.weirctl_ok(&["reload"]);
    assert!(changes.contains("vhost shop: certificate"), "{changes}");
    assert_eq!(client(&lab).peer_certificate(), renewed.der);
    assert_eq!(open.get("shop.test", "/").unwrap().status, 200);

    // A bad key: refused with the path and the reason; the renewed certificate stays.
    let other = ca.issue(&certs, "other", &["other.test"], KeyKind::EcdsaP256);
    std::fs::copy(&other.key, &shop.key).unwrap();
    let out = lab.weirctl().arg("reload").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&shop.key.display().to_string())
            && stderr.contains("does not belong to the certificate")
            && stderr.contains("nothing changed"),
        "{stderr}"
    );
    assert_eq!(client(&lab).peer_certificate(), renewed.der);

    // Fixed and renewed again, by SIGHUP this time.
    let third = ca.issue(&certs, "third", &["shop.test"], KeyKind::Rsa2048);
    std::fs::copy(&third.certificate, &shop.certificate).unwrap();
    std::fs::copy(&third.key, &shop.key).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.weir_pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until(
        "the certificate renewed by SIGHUP",
        Duration::from_secs(10),
        || client(&lab).peer_certificate() == third.der,
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(open.get("shop.test", "/").unwrap().status, 200);
    }
    assert_eq!(
        open.peer_certificate(),
        shop.der,
        "the open connection is the first one"
    );
}
