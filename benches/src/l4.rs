//! End to end through an L4 VIP, against the same server reached directly and through
//! nftables DNAT, on the same namespaces, interleaved.
//!
//! The lab topology with one server running nginx (one worker, a 5-byte answer, keep-alive):
//! every system forwards to that one server, so the comparison isolates what the balancer
//! costs. `wrk` runs in the client namespace. For each repetition the systems run in turn:
//!
//! - **direct**: the server's address, routed by the balancer namespace's kernel (no XDP);
//! - **weir NAT** / **weir DSR**: the VIP, with weir's XDP program attached (loaded
//!   in-process with the daemon's own `Datapath` and `L4Services`, detached again after);
//! - **nftables DNAT**: the same VIP address, DNAT to the server in the balancer's
//!   `prerouting` hook, conntrack un-NATs the replies (ruleset removed after);
//! - **HAProxy TCP mode**: the VIP address on the balancer's loopback, HAProxy (one thread per
//!   CPU, as XDP runs on every CPU) terminating TCP and opening its own connection to the
//!   server (stopped and the address removed after).
//!
//! Cases: keep-alive and a new connection per request; IPv4 and IPv6. And UDP request/response
//! (`crate::udp`: a closed loop of clients against echo servers on the server), one flow per
//! client or a new flow per request, for every system but HAProxy, whose TCP mode has no UDP.

use std::{
    fs,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Serialize;
use weir_config::Config;
use weir_forwarder::{
    datapath::{Datapath, DatapathOptions},
    l4::L4Services,
};
use weir_tests::{
    netns::{Netns, Process, run},
    topology::{DSR_VIP, DSR_VIP6, Topology, server_addr, server_addr6},
};

use crate::{
    stats::Sample,
    udp::{UdpEcho, UdpLoad},
    wrk,
};

/// Where nginx listens on the server for NAT (DSR uses port 80 on the VIP).
const NGINX_PORT: u16 = 8081;
/// The UDP VIPs' port (and the DSR echo's: DSR keeps the port).
const UDP_VIP_PORT: u16 = 5300;
/// Where the UDP echo listens on the server for direct and NAT.
const UDP_SERVER_PORT: u16 = 5301;
/// Clients of a UDP run, each with one request in flight.
const UDP_CLIENTS: u32 = 16;
const NAT_VIP: &str = "198.18.100.12";
const NAT_VIP6: &str = "fd00:100::12";

/// The systems compared, in the order each repetition runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum System {
    Direct,
    WeirNat,
    WeirDsr,
    NftablesDnat,
    HaproxyTcp,
}

impl System {
    pub const ALL: [System; 5] = [
        System::Direct,
        System::WeirNat,
        System::WeirDsr,
        System::NftablesDnat,
        System::HaproxyTcp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Direct => "direct to server",
            System::WeirNat => "weir NAT (XDP)",
            System::WeirDsr => "weir DSR (XDP)",
            System::NftablesDnat => "nftables DNAT",
            System::HaproxyTcp => "HAProxy TCP mode",
        }
    }
}

/// One case: a family and a connection behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct L4Case {
    pub ipv6: bool,
    /// A new connection per request (`Connection: close`).
    pub close: bool,
    /// 64 KiB responses instead of 5 bytes.
    pub large: bool,
    /// UDP request/response (32-byte datagrams) instead of HTTP over TCP; `close` then means
    /// a new flow (source port) per request.
    pub udp: bool,
}

impl L4Case {
    pub fn name(self) -> String {
        let family = if self.ipv6 { "IPv6" } else { "IPv4" };
        if self.udp {
            let flows = if self.close {
                "a new flow per request"
            } else {
                "one flow per client"
            };
            return format!("{family}, UDP, {flows}, 32-byte datagrams");
        }
        format!(
            "{family}, {}, {} responses",
            if self.close {
                "new connection per request"
            } else {
                "keep-alive"
            },
            if self.large { "64 KiB" } else { "5-byte" }
        )
    }
}

/// Results of one system in one case.
#[derive(Debug, Clone, Serialize)]
pub struct L4Result {
    pub case: L4Case,
    pub system: System,
    pub requests_per_sec: Sample,
    pub p50_us: Sample,
    pub p99_us: Sample,
    pub p999_us: Sample,
    /// CPU time of the whole machine (wrk, nginx, the kernel, the balancer) per request, µs:
    /// the balancer's own cost is the difference to the direct row (XDP and nftables work
    /// in softirq context, where no process owns it).
    pub machine_cpu_us_per_request: Sample,
    pub errors: u64,
    /// SYNs the client had to send again (a lost first packet costs a connection 1 s).
    pub syn_retransmits: u64,
}

/// One repetition: the load's report (wrk's or the UDP load's), SYN retransmits, machine CPU
/// µs per request.
type Run = (wrk::LoadReport, u64, f64);

/// What to run.
#[derive(Debug, Clone)]
pub struct L4Bench {
    pub cases: Vec<L4Case>,
    pub repetitions: usize,
    pub seconds: u32,
    pub connections: u32,
}

impl L4Bench {
    /// Builds the topology named by `prefix`, runs everything, removes it all.
    pub fn run(&self, prefix: &str, dir: &Path) -> Result<Vec<L4Result>> {
        let topology = Topology::new(prefix, 1)?;
        fs::create_dir_all(dir)?;
        let _nginx = start_nginx(&topology.servers[0], dir)?;
        let _udp_echo = UdpEcho::start(
            &topology.servers[0],
            &[
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), UDP_SERVER_PORT),
                SocketAddr::new(DSR_VIP.into(), UDP_VIP_PORT),
                SocketAddr::new(DSR_VIP6.into(), UDP_VIP_PORT),
            ],
        )?;
        // Per (case, system): each repetition's report and its SYN retransmits.
        let mut raw: Vec<(L4Case, System, Vec<Run>)> = Vec::new();
        for case in &self.cases {
            for system in System::ALL {
                if !(case.udp && system == System::HaproxyTcp) {
                    raw.push((*case, system, Vec::new()));
                }
            }
        }
        let mut run_index = 0;
        for repetition in 0..self.repetitions {
            for (case, system, reports) in raw.iter_mut() {
                fresh_client_address(&topology.client, run_index)?;
                run_index += 1;
                let mut haproxy = None;
                let attached = match system {
                    System::WeirNat | System::WeirDsr => Some(attach_weir(&topology)?),
                    System::NftablesDnat => {
                        nft_dnat(&topology.balancer, true)?;
                        None
                    }
                    System::HaproxyTcp => {
                        haproxy = Some(start_haproxy(&topology.balancer, dir)?);
                        None
                    }
                    System::Direct => None,
                };
                syn_retransmits(&topology.client)?;
                let busy_before = crate::stats::machine_busy_seconds()?;
                let report = if case.udp {
                    UdpLoad {
                        target: udp_target(*case, *system),
                        clients: UDP_CLIENTS,
                        seconds: self.seconds,
                        new_flow_per_request: case.close,
                    }
                    .run(&topology.client)
                } else {
                    let url = url(*case, *system);
                    let args = wrk::args(&url, self.connections, self.seconds, case.close);
                    wrk::run(wrk::command(Some(topology.client.name())).args(&args))
                }
                .with_context(|| format!("{} / {}", case.name(), system.name()));
                let busy = crate::stats::machine_busy_seconds()? - busy_before;
                let retransmits = syn_retransmits(&topology.client)?;
                if *system == System::NftablesDnat {
                    nft_dnat(&topology.balancer, false)?;
                }
                if let Some(haproxy) = haproxy {
                    stop_haproxy(&topology.balancer, haproxy)?;
                }
                drop(attached);
                let report = report?;
                eprintln!(
                    "  [{}/{}] {:<32} {:<18} {:>10.0} req/s  p99 {:>7.0} µs  errors {}  SYN retransmits {}",
                    repetition + 1,
                    self.repetitions,
                    case.name(),
                    system.name(),
                    report.requests_per_sec,
                    report.p99_us,
                    report.errors,
                    retransmits
                );
                let cpu = busy * 1e6 / report.requests.max(1) as f64;
                reports.push((report, retransmits, cpu));
            }
        }
        Ok(raw
            .into_iter()
            .map(|(case, system, reports)| L4Result {
                case,
                system,
                requests_per_sec: Sample::new(
                    reports.iter().map(|(r, _, _)| r.requests_per_sec).collect(),
                ),
                p50_us: Sample::new(reports.iter().map(|(r, _, _)| r.p50_us).collect()),
                p99_us: Sample::new(reports.iter().map(|(r, _, _)| r.p99_us).collect()),
                p999_us: Sample::new(reports.iter().map(|(r, _, _)| r.p999_us).collect()),
                errors: reports.iter().map(|(r, _, _)| r.errors).sum(),
                syn_retransmits: reports.iter().map(|(_, s, _)| s).sum(),
                machine_cpu_us_per_request: Sample::new(
                    reports.iter().map(|(_, _, cpu)| *cpu).collect(),
                ),
            })
            .collect())
    }
}

fn url(case: L4Case, system: System) -> String {
    let host = |v4: String, v6: String| if case.ipv6 { format!("[{v6}]") } else { v4 };
    let path = if case.large { "/64k" } else { "/" };
    match system {
        System::Direct => format!(
            "http://{}:{NGINX_PORT}{path}",
            host(server_addr(1).to_string(), server_addr6(1).to_string())
        ),
        System::WeirNat | System::NftablesDnat | System::HaproxyTcp => {
            format!("http://{}{path}", host(NAT_VIP.into(), NAT_VIP6.into()))
        }
        System::WeirDsr => format!(
            "http://{}{path}",
            host(
                weir_tests::topology::DSR_VIP.to_string(),
                weir_tests::topology::DSR_VIP6.to_string()
            )
        ),
    }
}

/// Where a UDP run sends its requests.
fn udp_target(case: L4Case, system: System) -> SocketAddr {
    let pick = |v4: IpAddr, v6: IpAddr| if case.ipv6 { v6 } else { v4 };
    match system {
        System::Direct => SocketAddr::new(
            pick(server_addr(1).into(), server_addr6(1).into()),
            UDP_SERVER_PORT,
        ),
        System::WeirNat | System::NftablesDnat | System::HaproxyTcp => SocketAddr::new(
            pick(
                NAT_VIP.parse().expect("NAT_VIP"),
                NAT_VIP6.parse().expect("NAT_VIP6"),
            ),
            UDP_VIP_PORT,
        ),
        System::WeirDsr => SocketAddr::new(pick(DSR_VIP.into(), DSR_VIP6.into()), UDP_VIP_PORT),
    }
}

/// The weir config of the benchmark: a NAT and a DSR VIP per family and protocol, the one
/// server each.
fn weir_config(topology: &Topology) -> Result<Config> {
    let (server4, server6) = (server_addr(1), server_addr6(1));
    let vips = [
        (
            "nat4",
            NAT_VIP.to_string(),
            80,
            "tcp",
            "nat",
            format!("{server4}:{NGINX_PORT}"),
        ),
        (
            "nat6",
            NAT_VIP6.to_string(),
            80,
            "tcp",
            "nat",
            format!("[{server6}]:{NGINX_PORT}"),
        ),
        (
            "dsr4",
            DSR_VIP.to_string(),
            80,
            "tcp",
            "dsr",
            format!("{server4}:80"),
        ),
        (
            "dsr6",
            DSR_VIP6.to_string(),
            80,
            "tcp",
            "dsr",
            format!("[{server6}]:80"),
        ),
        (
            "nat4-udp",
            NAT_VIP.to_string(),
            UDP_VIP_PORT,
            "udp",
            "nat",
            format!("{server4}:{UDP_SERVER_PORT}"),
        ),
        (
            "nat6-udp",
            NAT_VIP6.to_string(),
            UDP_VIP_PORT,
            "udp",
            "nat",
            format!("[{server6}]:{UDP_SERVER_PORT}"),
        ),
        (
            "dsr4-udp",
            DSR_VIP.to_string(),
            UDP_VIP_PORT,
            "udp",
            "dsr",
            format!("{server4}:{UDP_VIP_PORT}"),
        ),
        (
            "dsr6-udp",
            DSR_VIP6.to_string(),
            UDP_VIP_PORT,
            "udp",
            "dsr",
            format!("[{server6}]:{UDP_VIP_PORT}"),
        ),
    ];
    let source: String = vips
        .iter()
        .map(|(name, address, port, protocol, mode, server)| {
            format!(
                "[[l4_vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\nprotocol = \"{protocol}\"\nmode = \"{mode}\"\nservers = [{{ address = \"{server}\" }}]\n\n"
            )
        })
        .collect();
    // Two-armed, as an operator would set this topology up: the balancer on the uplink, the
    // NAT return program alone on the server links (decision 0014).
    let server_links: Vec<String> = topology
        .server_links()
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect();
    let source = format!(
        "[datapath]\ninterfaces = [\"{}\"]\nserver_interfaces = [{}]\nxdp_mode = \"native\"\n\n{source}",
        weir_tests::topology::BALANCER_UPLINK,
        server_links.join(", ")
    );
    Ok(Config::parse("bench.toml".as_ref(), &source)?)
}

/// weir's datapath attached in the balancer namespace; detached when dropped.
struct Attached {
    _datapath: Datapath,
    _services: L4Services,
}

fn attach_weir(topology: &Topology) -> Result<Attached> {
    let config = weir_config(topology)?;
    topology.balancer.run(|| -> Result<Attached> {
        let mut datapath = Datapath::load(DatapathOptions::from_config(&config, None))?;
        let services = L4Services::from_config(&config, datapath.maps_mut())?;
        datapath.attach()?;
        Ok(Attached {
            _datapath: datapath,
            _services: services,
        })
    })?
}

/// Gives the client a source address of its own for run `n`, so that no run meets the
/// TIME_WAIT (or conntrack) state an earlier run of another system left on the same
/// 4-tuples — that would measure the leftovers, not the system. Within a run, port reuse and
/// TIME_WAIT happen as in real life, alike for every system.
fn fresh_client_address(client: &Netns, n: usize) -> Result<()> {
    let v4 = format!("198.18.0.{}", 20 + n);
    let v6 = format!("fd00::{:x}", 0x20 + n);
    client.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
    client.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    client.ip(&[
        "route",
        "replace",
        "198.18.0.0/15",
        "via",
        "198.18.0.2",
        "src",
        &v4,
    ])?;
    client.ip(&[
        "-6", "route", "replace", "fd00::/8", "via", "fd00::2", "dev", "eth0", "onlink", "src", &v6,
    ])
}

/// SYN retransmits in `client` since the previous call (`nstat` keeps the history).
fn syn_retransmits(client: &Netns) -> Result<u64> {
    let out = client
        .command("nstat")
        .arg("TcpExtTCPSynRetrans")
        .output()
        .context("nstat")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("TcpExtTCPSynRetrans"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0))
}

/// Adds (or removes) the nftables DNAT of the NAT VIPs to the server, in the balancer.
fn nft_dnat(balancer: &Netns, on: bool) -> Result<()> {
    let ruleset = if on {
        format!(
            "table inet weirbench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat;\n    ip daddr {NAT_VIP} tcp dport 80 dnat ip to {s4}:{NGINX_PORT}\n    ip6 daddr {NAT_VIP6} tcp dport 80 dnat ip6 to [{s6}]:{NGINX_PORT}\n    ip daddr {NAT_VIP} udp dport {UDP_VIP_PORT} dnat ip to {s4}:{UDP_SERVER_PORT}\n    ip6 daddr {NAT_VIP6} udp dport {UDP_VIP_PORT} dnat ip6 to [{s6}]:{UDP_SERVER_PORT}\n  }}\n}}\n",
            s4 = server_addr(1),
            s6 = server_addr6(1)
        )
    } else {
        "delete table inet weirbench\n".to_string()
    };
    let path = std::env::temp_dir().join(format!("weir-bench-{}.nft", std::process::id()));
    fs::write(&path, ruleset)?;
    let result = run(balancer.command("nft").arg("-f").arg(&path));
    let _ = fs::remove_file(&path);
    result
}

/// HAProxy in TCP mode in the balancer, on the NAT VIPs (put on its loopback for the run).
fn start_haproxy(balancer: &Netns, dir: &Path) -> Result<Process> {
    balancer.ip(&["addr", "add", &format!("{NAT_VIP}/32"), "dev", "lo"])?;
    balancer.ip(&[
        "addr",
        "add",
        &format!("{NAT_VIP6}/128"),
        "dev",
        "lo",
        "nodad",
    ])?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let conf = dir.join("haproxy.cfg");
    fs::write(
        &conf,
        format!(
            r#"global
  nbthread {threads}
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend vip4
  bind {NAT_VIP}:80
  default_backend server4
frontend vip6
  bind [{NAT_VIP6}]:80
  default_backend server6
backend server4
  server srv1 {}:{NGINX_PORT}
backend server6
  server srv1 [{}]:{NGINX_PORT}
"#,
            server_addr(1),
            server_addr6(1)
        ),
    )?;
    let haproxy = Process::spawn(
        "haproxy",
        balancer
            .command("haproxy")
            .args(["-db", "-q", "-f"])
            .arg(&conf)
            .stdout(Stdio::null()),
    )?;
    balancer.wait_for_listener(
        SocketAddr::new(NAT_VIP.parse()?, 80),
        Duration::from_secs(5),
    )?;
    Ok(haproxy)
}

fn stop_haproxy(balancer: &Netns, haproxy: Process) -> Result<()> {
    drop(haproxy);
    balancer.ip(&["addr", "del", &format!("{NAT_VIP}/32"), "dev", "lo"])?;
    balancer.ip(&["addr", "del", &format!("{NAT_VIP6}/128"), "dev", "lo"])
}

/// nginx in the server namespace: the fixed answer on the NAT port and, for DSR, on port 80
/// (where the VIP on the server's loopback is reached).
fn start_nginx(server: &Netns, dir: &Path) -> Result<Process> {
    let listen = [NGINX_PORT, 80]
        .iter()
        .flat_map(|port| [port.to_string(), format!("[::]:{port}")])
        .collect::<Vec<_>>();
    let nginx = crate::nginx::start(server.command("nginx"), &listen, dir)?;
    server.wait_for_listener(
        SocketAddr::new(server_addr(1).into(), NGINX_PORT),
        Duration::from_secs(5),
    )?;
    Ok(nginx)
}
