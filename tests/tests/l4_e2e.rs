//! End-to-end tests of the L4 datapath on the real kernel: the XDP program attached in native
//! mode in the balancer namespace of the standard topology, real TCP and UDP clients in the
//! client namespace, the demo backends in the server namespaces. Pool changes go through the
//! same `L4Services` API the daemon uses.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use weir_config::{Config, control::AdminState};
use weir_forwarder::{
    datapath::{Datapath, DatapathOptions},
    l4::{self, L4Services},
};
use weir_tests::{
    client::{EchoConnection, TIMEOUT, http_get},
    netns::{Process, wait_until},
    topology::{
        self, DSR_VIP, DSR_VIP6, ECHO_PORT, L4_VIP, L4_VIP6, SERVER_PORT, Topology, UDP_PORT,
        server_addr, server_addr6,
    },
    workspace_bin,
};

/// The topology with backends running and weir's datapath attached in the balancer.
struct L4Lab {
    // Field order is drop order: detach, stop backends, remove namespaces.
    datapath: Datapath,
    services: L4Services,
    _backends: Vec<Process>,
    topology: Topology,
}

/// What weir attaches to the balancer's links to the servers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ServerLinks {
    /// Both programs, as on the uplink (`datapath.interfaces`).
    BothPrograms,
    /// The NAT return program only (`datapath.server_interfaces`).
    NatReturnOnly,
}

/// `[[l4_vip]]` of `name` on `vip` over the servers' `port`, with weights 100, 200, 300.
fn vip_toml(
    name: &str,
    vip: SocketAddr,
    protocol: &str,
    mode: &str,
    servers: &[SocketAddr],
) -> String {
    let pool: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{{ address = \"{s}\", weight = {} }}", 100 * (i + 1)))
        .collect();
    format!(
        "[[l4_vip]]\nname = \"{name}\"\naddress = \"{}\"\nport = {}\nprotocol = \"{protocol}\"\nmode = \"{mode}\"\nservers = [{}]\n\n",
        vip.ip(),
        vip.port(),
        pool.join(", ")
    )
}

fn pool(v6: bool, port: u16) -> Vec<SocketAddr> {
    (1..=3)
        .map(|i| {
            if v6 {
                SocketAddr::new(server_addr6(i).into(), port)
            } else {
                SocketAddr::new(server_addr(i).into(), port)
            }
        })
        .collect()
}

fn sock(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

impl L4Lab {
    fn start(tag: &str) -> L4Lab {
        L4Lab::start_with(tag, ServerLinks::BothPrograms)
    }

    fn start_with(tag: &str, server_links: ServerLinks) -> L4Lab {
        let prefix = format!("weirt-{}-{tag}-", std::process::id());
        let topology = Topology::new(&prefix, 3).expect("topology");
        let backends: Vec<Process> = topology
            .servers
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let name = format!("srv{}", i + 1);
                Process::spawn(
                    &name,
                    ns.command(workspace_bin("weir-demo-backend"))
                        .args(topology::backend_args(&name))
                        .stdout(std::process::Stdio::null()),
                )
                .expect("backend")
            })
            .collect();
        for (i, ns) in topology.servers.iter().enumerate() {
            let addr = topology::server_socket(i + 1);
            wait_until(&format!("backend {addr}"), Duration::from_secs(5), || {
                ns.run(|| TcpStream::connect(addr).is_ok()).unwrap_or(false)
            })
            .unwrap();
        }
        let quoted = |names: Vec<String>| {
            names
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (interfaces, server_interfaces) = match server_links {
            ServerLinks::BothPrograms => (topology.balancer_interfaces(), Vec::new()),
            ServerLinks::NatReturnOnly => (
                vec![topology::BALANCER_UPLINK.to_string()],
                topology.server_links(),
            ),
        };
        let mut toml = format!(
            "[datapath]\ninterfaces = [{}]\nserver_interfaces = [{}]\nxdp_mode = \"native\"\nflow_table_size = 65536\n\n",
            quoted(interfaces),
            quoted(server_interfaces)
        );
        for (name, vip, protocol, mode, servers) in [
            (
                "nat4-http",
                sock(L4_VIP, 80),
                "tcp",
                "nat",
                pool(false, SERVER_PORT),
            ),
            (
                "nat4-echo",
                sock(L4_VIP, ECHO_PORT),
                "tcp",
                "nat",
                pool(false, ECHO_PORT)[..2].to_vec(),
            ),
            (
                "nat4-udp",
                sock(L4_VIP, 53),
                "udp",
                "nat",
                pool(false, UDP_PORT),
            ),
            (
                "nat6-http",
                sock(L4_VIP6, 80),
                "tcp",
                "nat",
                pool(true, SERVER_PORT),
            ),
            (
                "nat6-echo",
                sock(L4_VIP6, ECHO_PORT),
                "tcp",
                "nat",
                pool(true, ECHO_PORT)[..2].to_vec(),
            ),
            (
                "nat6-udp",
                sock(L4_VIP6, 53),
                "udp",
                "nat",
                pool(true, UDP_PORT),
            ),
            (
                "dsr4-http",
                sock(DSR_VIP, 80),
                "tcp",
                "dsr",
                pool(false, 80),
            ),
            (
                "dsr4-echo",
                sock(DSR_VIP, 7),
                "tcp",
                "dsr",
                pool(false, 7)[..2].to_vec(),
            ),
            ("dsr4-udp", sock(DSR_VIP, 53), "udp", "dsr", pool(false, 53)),
            (
                "dsr6-http",
                sock(DSR_VIP6, 80),
                "tcp",
                "dsr",
                pool(true, 80),
            ),
            ("dsr6-udp", sock(DSR_VIP6, 53), "udp", "dsr", pool(true, 53)),
        ] {
            toml += &vip_toml(name, vip, protocol, mode, &servers);
        }
        let config = Config::parse("l4-e2e.toml".as_ref(), &toml).expect("test config");
        let (datapath, services) = topology
            .balancer
            .run(|| {
                let mut datapath = Datapath::load(DatapathOptions::from_config(&config, None))
                    .expect("datapath loads");
                let services =
                    L4Services::from_config(&config, datapath.maps_mut()).expect("services");
                datapath.attach().expect("XDP attaches in native mode");
                (datapath, services)
            })
            .expect("balancer namespace");
        L4Lab {
            datapath,
            services,
            _backends: backends,
            topology,
        }
    }

    /// Applies one change to the services and the maps; the test fails if it is refused.
    fn change(&mut self, f: impl FnOnce(&mut L4Services) -> Result<(), l4::L4Error>) {
        self.services
            .apply(self.datapath.maps_mut(), f)
            .expect("change applied");
    }

    /// Runs `f` on a thread in the client namespace.
    fn client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.topology.client.run(f).expect("client namespace")
    }
}

/// One datagram from a fresh socket (a new flow); the name of the server that answered.
fn udp_query(vip: SocketAddr) -> std::io::Result<String> {
    let bind: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let socket = UdpSocket::bind(bind)?;
    socket.connect(vip)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send(b"q")?;
    let mut buf = [0u8; 256];
    let n = weir_tests::retry_interrupted(|| socket.recv(&mut buf))?;
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    reply
        .strip_suffix(" q")
        .map(str::to_string)
        .ok_or_else(|| std::io::Error::other(format!("bad reply {reply:?}")))
}

/// Checks `counts` against weights 1:2:3 of srv1..3 within `tolerance` of the total.
fn assert_spread(what: &str, counts: &HashMap<String, usize>, total: usize, tolerance: f64) {
    for (i, weight) in [(1, 1.0), (2, 2.0), (3, 3.0)] {
        let share = *counts.get(&format!("srv{i}")).unwrap_or(&0) as f64 / total as f64;
        let expected = weight / 6.0;
        assert!(
            (share - expected).abs() <= tolerance,
            "{what}: srv{i} took {share:.3} of {total}, expected {expected:.3} ± {tolerance} ({counts:?})"
        );
    }
}

#[test]
#[ignore = "needs root: creates network namespaces and attaches XDP"]
fn tcp_and_udp_spread_by_weight_in_nat_and_dsr() {
    let lab = L4Lab::start("spread");
    const N: usize = 600;
    let cases: [(&str, SocketAddr, bool); 8] = [
        ("NAT IPv4 TCP", sock(L4_VIP, 80), false),
        ("DSR IPv4 TCP", sock(DSR_VIP, 80), false),
        ("NAT IPv4 UDP", sock(L4_VIP, 53), true),
        ("DSR IPv4 UDP", sock(DSR_VIP, 53), true),
        ("NAT IPv6 TCP", sock(L4_VIP6, 80), false),
        ("DSR IPv6 TCP", sock(DSR_VIP6, 80), false),
        ("NAT IPv6 UDP", sock(L4_VIP6, 53), true),
        ("DSR IPv6 UDP", sock(DSR_VIP6, 53), true),
    ];
    for (what, vip, udp) in cases {
        let counts = lab.client(|| {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for i in 0..N {
                let server = if udp { udp_query(vip) } else { http_get(vip) }
                    .unwrap_or_else(|e| panic!("{what}: request {i} to {vip} failed: {e}"));
                *counts.entry(server).or_default() += 1;
            }
            counts
        });
        // 600 flows: a share's standard deviation is at most 0.02; 0.08 is 4σ.
        assert_spread(what, &counts, N, 0.08);
    }
    let report = lab.datapath.maps().counters().unwrap();
    let count = |name: &str| {
        report
            .iter()
            .find(|(s, _)| s.name() == name)
            .unwrap()
            .1
            .packets
    };
    assert!(count("forward_nat") > 0 && count("return_nat") > 0 && count("forward_dsr") > 0);
    assert_eq!(
        count("drop_no_route") + count("drop_no_neighbor") + count("drop_malformed"),
        0
    );
}

/// Bulk data both ways through NAT, IPv4 and IPv6. The servers' replies reach the NAT return
/// program merged by GRO (buffers of up to 64 KiB whose TCP checksum holds only the
/// pseudo-header sum). Here the balancer's uplink computes checksums in software (`tx off`)
/// when it splits them again, so a buffer whose pseudo-header sum the rewrite got wrong leaves
/// with bad checksums, the client drops it, and the transfer stalls.
#[test]
#[ignore = "needs root: creates network namespaces and attaches XDP"]
fn bulk_transfers_through_nat_arrive_intact_both_ways() {
    stream_both_ways_through_nat(&L4Lab::start("bulk"));
}

/// A two-armed balancer whose server links are `server_interfaces`: no XDP program there, only
/// the NAT return program, which then meets the servers' replies as the server side sent them
/// (no XDP pass, no GRO on the way). NAT carries bulk data intact both ways, and DSR and NAT
/// still forward into those links.
#[test]
#[ignore = "needs root: creates network namespaces and attaches XDP"]
fn server_interfaces_run_the_nat_return_program_alone() {
    let lab = L4Lab::start_with("tconly", ServerLinks::NatReturnOnly);
    let xdp_attached = |link: &str| lab.topology.balancer_has_xdp(link).unwrap();
    assert!(xdp_attached(topology::BALANCER_UPLINK));
    for link in lab.topology.server_links() {
        assert!(!xdp_attached(&link), "{link} has an XDP program");
        let attachment = lab
            .datapath
            .attachments()
            .iter()
            .find(|a| a.interface == link)
            .unwrap_or_else(|| panic!("{link} is not reported"));
        assert_eq!(attachment.program_id, None);
        assert!(attachment.tc_program_id > 0);
    }
    stream_both_ways_through_nat(&lab);
    for vip in [sock(DSR_VIP, 80), sock(DSR_VIP6, 80)] {
        lab.client(|| http_get(vip))
            .unwrap_or_else(|e| panic!("GET through {vip}: {e}"));
    }
    assert!(counted(&lab, "forward_dsr").packets > 0);
}

/// Streams 16 MiB through the NAT echo VIP and back, IPv4 then IPv6, and checks that the NAT
/// return path carried them and nothing was dropped as malformed.
fn stream_both_ways_through_nat(lab: &L4Lab) {
    weir_tests::netns::run(lab.topology.balancer.command("ethtool").args([
        "-K",
        topology::BALANCER_UPLINK,
        "tx",
        "off",
    ]))
    .expect("ethtool");
    const BYTES: usize = 16 << 20;
    for vip in [sock(L4_VIP, ECHO_PORT), sock(L4_VIP6, ECHO_PORT)] {
        lab.client(|| {
            let mut connection = EchoConnection::open(vip)?;
            connection.stream_through(BYTES)
        })
        .unwrap_or_else(|e| panic!("{BYTES} bytes through {vip} and back: {e}"));
    }
    let returned = counted(lab, "return_nat");
    assert!(
        returned.bytes >= 2 * BYTES as u64,
        "the NAT return path carried {} bytes of the {} echoed",
        returned.bytes,
        2 * BYTES
    );
    assert_eq!(counted(lab, "drop_malformed").packets, 0);
}

/// The datapath counter `name`, summed over CPUs.
fn counted(lab: &L4Lab, name: &str) -> weir_common::Counter {
    let report = lab.datapath.maps().counters().unwrap();
    report.iter().find(|(s, _)| s.name() == name).unwrap().1
}

#[test]
#[ignore = "needs root: creates network namespaces and attaches XDP"]
fn established_connections_survive_adds_removes_and_their_own_drain() {
    let mut lab = L4Lab::start("pinned");
    for (vip_name, vip, port) in [
        ("nat4-echo", sock(L4_VIP, ECHO_PORT), ECHO_PORT),
        ("dsr4-echo", sock(DSR_VIP, 7), 7),
    ] {
        // Pool: srv1, srv2. One connection per server, so both an owner and a bystander exist.
        let mut connections: Vec<EchoConnection> = lab.client(|| {
            let mut by_server: HashMap<String, EchoConnection> = HashMap::new();
            for _ in 0..50 {
                let c = EchoConnection::open(vip).expect("connect");
                by_server.entry(c.server.clone()).or_insert(c);
            }
            by_server.into_values().collect()
        });
        assert_eq!(
            connections.len(),
            2,
            "{vip_name}: both servers take connections"
        );
        let check = |connections: &mut Vec<EchoConnection>, step: &str| {
            for c in connections.iter_mut() {
                c.exchange().unwrap_or_else(|e| {
                    panic!(
                        "{vip_name}: connection to {} broke after {step}: {e}",
                        c.server
                    )
                });
            }
        };
        check(&mut connections, "opening");
        let srv = |i: usize| sock(server_addr(i), port);
        lab.change(|s| s.add_server(vip_name, srv(3), 100));
        check(&mut connections, "adding srv3");
        lab.change(|s| s.set_weight(vip_name, srv(1), 5000));
        check(&mut connections, "reweighting srv1");
        lab.change(|s| s.remove_server(vip_name, srv(3)));
        check(&mut connections, "removing srv3");
        // Drain the first connection's own server: it keeps working, new flows avoid it.
        let owner = connections[0].server.clone();
        let owner_index: usize = owner.trim_start_matches("srv").parse().unwrap();
        lab.change(|s| s.set_state(vip_name, srv(owner_index), AdminState::Draining));
        check(&mut connections, "draining the connection's own server");
        let new_servers: Vec<String> = lab.client(|| {
            (0..30)
                .map(|_| EchoConnection::open(vip).expect("connect").server)
                .collect()
        });
        assert!(
            !new_servers.contains(&owner),
            "{vip_name}: a new connection reached draining {owner}"
        );
        check(&mut connections, "new connections elsewhere");
        lab.change(|s| s.set_state(vip_name, srv(owner_index), AdminState::Ready));
    }
}

#[test]
#[ignore = "needs root: creates network namespaces and attaches XDP"]
fn table_switches_under_continuous_traffic_break_no_connection() {
    let mut lab = L4Lab::start("churn");
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let exchanges = Arc::new(AtomicU64::new(0));
    let client = lab.topology.client.name().to_string();
    let path = format!("/run/netns/{client}");
    let mut workers = Vec::new();
    // Short connections through NAT and DSR, and long-lived echo connections.
    for (vip, long) in [
        (sock(L4_VIP, 80), false),
        (sock(DSR_VIP, 80), false),
        (sock(L4_VIP, ECHO_PORT), true),
        (sock(L4_VIP, ECHO_PORT), true),
        (sock(DSR_VIP, 7), true),
    ] {
        let (stop, requests, exchanges, path) = (
            stop.clone(),
            requests.clone(),
            exchanges.clone(),
            path.clone(),
        );
        workers.push(thread::spawn(move || -> Result<(), String> {
            let ns = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| e.to_string())?;
            if long {
                let mut c = EchoConnection::open(vip).map_err(|e| format!("{vip}: {e}"))?;
                while !stop.load(Ordering::Relaxed) {
                    c.exchange()
                        .map_err(|e| format!("long-lived {vip} to {}: {e}", c.server))?;
                    exchanges.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                while !stop.load(Ordering::Relaxed) {
                    http_get(vip).map_err(|e| format!("short {vip}: {e}"))?;
                    requests.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    // 60 table switches on the two NAT/DSR HTTP pools: weights, drains and re-enables. Each
    // server goes through all four steps in turn, so at most one is out of the pool at a time
    // (a pool with every server drained rightly refuses new connections).
    let started = Instant::now();
    for round in 0..60u32 {
        let i = (round / 4 % 3) as usize + 1;
        for (vip, port) in [("nat4-http", SERVER_PORT), ("dsr4-http", 80)] {
            let server = sock(server_addr(i), port);
            lab.change(|s| match round % 4 {
                0 => s.set_weight(vip, server, 50 + round),
                1 => s.set_state(vip, server, AdminState::Draining),
                2 => s.set_state(vip, server, AdminState::Ready),
                _ => s.set_weight(vip, server, 100),
            });
        }
        thread::sleep(Duration::from_millis(40));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker
            .join()
            .expect("worker thread")
            .expect("no connection failed");
    }
    let (requests, exchanges) = (
        requests.load(Ordering::Relaxed),
        exchanges.load(Ordering::Relaxed),
    );
    eprintln!(
        "{requests} requests and {exchanges} echo rounds in {:?} of churn",
        started.elapsed()
    );
    assert!(
        requests > 100 && exchanges > 100,
        "too little traffic flowed: {requests} / {exchanges}"
    );
}

/// A TCP connection from `client`'s address and `port` to `to` (the port reused at once).
fn connect_from(port: u16, to: SocketAddr) -> std::io::Result<EchoConnection> {
    let from = SocketAddr::new(topology::CLIENT_ADDR.into(), port);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&from.into())?;
    socket.connect_timeout(&to.into(), TIMEOUT)?;
    EchoConnection::from_stream(socket.into())
}

#[test]
#[ignore = "needs root: creates network namespaces and attaches XDP"]
fn a_direct_connection_from_a_port_a_nat_flow_used_is_left_alone() {
    let lab = L4Lab::start("stale");
    let vip = sock(L4_VIP, ECHO_PORT);
    lab.client(|| {
        for port in 42000..42010 {
            // Through the VIP, closed by the client...
            let mut through_vip = connect_from(port, vip).expect("connect through the VIP");
            through_vip.exchange().expect("exchange through the VIP");
            let server: usize = through_vip
                .server
                .trim_start_matches("srv")
                .parse()
                .unwrap();
            drop(through_vip);
            // ...then straight to the server that had it, from the same port: its replies
            // match the old NAT return entry and must still not be turned into the VIP's.
            let direct = sock(server_addr(server), ECHO_PORT);
            let mut direct = connect_from(port, direct).expect("direct connection");
            assert_eq!(direct.server, format!("srv{server}"));
            direct
                .exchange()
                .expect("exchange on the direct connection");
        }
    });
    let stale = lab
        .datapath
        .maps()
        .counters()
        .unwrap()
        .into_iter()
        .find(|(s, _)| s.name() == "pass_stale_return")
        .unwrap()
        .1
        .packets;
    assert!(
        stale >= 10,
        "the replies were not recognised as stale ({stale})"
    );
}
