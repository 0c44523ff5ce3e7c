//! The standard weir topology: a client, a balancer and N servers, each in its own namespace.
//!
//! ```text
//!  client                       balancer                            server i (1-based)
//!  eth0 198.18.0.1/24     ───   eth0 198.18.0.2/24     (XDP)
//!       fd00::1/64                   fd00::2/64
//!                               s<i> 198.18.(10+i).1/24 (XDP) ───   eth0 198.18.(10+i).2/24
//!                                    fd00:(10+i)::1/64                   fd00:(10+i)::2/64
//!                               lo   198.18.100.11 (L7 VIP)         lo   DSR VIPs
//! ```
//! Each server has its own link to the balancer: XDP forwards by redirecting into a device,
//! which a bridge is not. The link is still L2, so direct server return works on it. The client
//! routes 198.18.0.0/15 and fd00::/8 via the balancer; servers use it as their default gateway
//! (NAT replies must come back through it). L4 VIPs live only in the XDP program's maps; the L7
//! VIP is on the balancer's loopback for its listeners. Servers carry the DSR VIPs on loopback
//! with `arp_ignore=1`/`arp_announce=2`, as a DSR server must. Only 198.18.0.0/15 and fd00::/8
//! are used and no namespace has a route anywhere else.
//!
//! Two veth details make the lab behave like a wire:
//! - a native-mode XDP redirect into a veth is delivered only if the far end has GRO on (or an
//!   XDP program): every far end here gets GRO on;
//! - a veth hands locally built packets over with the TCP/UDP checksum left to "offload"
//!   (only the pseudo-header sum is in the field), which no NIC ever receives from a wire and
//!   which a rewrite cannot patch incrementally. The client and the servers turn transmit
//!   checksum offload off, so their packets carry real checksums, as on a network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Result;

use crate::netns::{Netns, veth};

/// The client-facing interface of the balancer.
pub const BALANCER_UPLINK: &str = "eth0";
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
pub const BALANCER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const BALANCER_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// L4 VIPs (NAT mode) — in the XDP maps only.
pub const L4_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
pub const L4_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x10);
/// L7 VIP, on the balancer's loopback.
pub const L7_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
/// DSR VIPs — in the XDP maps, and on every server's loopback.
pub const DSR_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 20);
pub const DSR_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x20);
/// Port the demo backends serve HTTP on (NAT VIPs map to it).
pub const SERVER_PORT: u16 = 8080;

/// The namespaces of one topology, removed (with their processes) when dropped.
pub struct Topology {
    pub client: Netns,
    pub balancer: Netns,
    pub servers: Vec<Netns>,
}

impl Topology {
    /// Builds the topology with namespaces named `<prefix>client`, `<prefix>lb`, `<prefix>srv<i>`.
    pub fn new(prefix: &str, servers: usize) -> Result<Topology> {
        let client = Netns::new(&format!("{prefix}client"))?;
        let balancer = Netns::new(&format!("{prefix}lb"))?;
        veth(&client, "eth0", &balancer, BALANCER_UPLINK)?;
        address(&client, "eth0", &format!("{CLIENT_ADDR}/24"))?;
        address(&client, "eth0", &format!("{CLIENT_ADDR6}/64"))?;
        client.ip(&[
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            &BALANCER_ADDR.to_string(),
        ])?;
        client.ip(&[
            "-6",
            "route",
            "add",
            "fd00::/8",
            "via",
            &BALANCER_ADDR6.to_string(),
            // The IPv6 prefix route may not exist yet while the link comes up.
            "dev",
            "eth0",
            "onlink",
        ])?;
        gro_on(&client, "eth0")?;
        wire_checksums(&client, "eth0")?;
        address(&balancer, BALANCER_UPLINK, &format!("{BALANCER_ADDR}/24"))?;
        address(&balancer, BALANCER_UPLINK, &format!("{BALANCER_ADDR6}/64"))?;
        balancer.ip(&["addr", "add", &format!("{L7_VIP}/32"), "dev", "lo"])?;
        balancer.sysctl("net.ipv4.ip_forward", "1")?;
        balancer.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // DSR replies come back through the balancer as plain routed traffic with a VIP as
        // their source; the balancer has no route to that source, so strict reverse-path
        // filtering would drop them.
        balancer.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        balancer.sysctl("net.ipv4.conf.default.rp_filter", "0")?;

        let mut namespaces = Vec::with_capacity(servers);
        for i in 1..=servers {
            let server = Netns::new(&format!("{prefix}srv{i}"))?;
            let port = server_link(i);
            veth(&server, "eth0", &balancer, &port)?;
            address(&balancer, &port, &format!("198.18.{}.1/24", 10 + i))?;
            address(&balancer, &port, &format!("fd00:{}::1/64", 10 + i))?;
            address(&server, "eth0", &format!("{}/24", server_addr(i)))?;
            address(&server, "eth0", &format!("{}/64", server_addr6(i)))?;
            server.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{}.1", 10 + i),
            ])?;
            server.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:{}::1", 10 + i),
                "dev",
                "eth0",
                "onlink",
            ])?;
            for vip in [DSR_VIP.to_string() + "/32", DSR_VIP6.to_string() + "/128"] {
                server.ip(&["addr", "add", &vip, "dev", "lo"])?;
            }
            server.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            server.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            gro_on(&server, "eth0")?;
            wire_checksums(&server, "eth0")?;
            gro_on(&balancer, &port)?;
            namespaces.push(server);
        }
        gro_on(&balancer, BALANCER_UPLINK)?;
        Ok(Topology {
            client,
            balancer,
            servers: namespaces,
        })
    }

    /// The balancer's interfaces weir attaches to: the uplink and every server link.
    pub fn balancer_interfaces(&self) -> Vec<String> {
        let mut interfaces = vec![BALANCER_UPLINK.to_string()];
        interfaces.extend(self.server_links());
        interfaces
    }

    /// The balancer's links to the servers, in server order.
    pub fn server_links(&self) -> Vec<String> {
        (1..=self.servers.len()).map(server_link).collect()
    }

    /// Whether the kernel reports an XDP program on the balancer's interface `dev` (asked
    /// with `ip link`, independently of what weir says it attached).
    pub fn balancer_has_xdp(&self, dev: &str) -> Result<bool> {
        let out = self
            .balancer
            .command("ip")
            .args(["-details", "link", "show", "dev", dev])
            .output()?;
        anyhow::ensure!(out.status.success(), "ip link show dev {dev} failed");
        Ok(String::from_utf8_lossy(&out.stdout).contains("prog/xdp"))
    }
}

/// Adds `cidr` to `dev` in `ns` (IPv6 without duplicate address detection, usable at once).
pub fn address(ns: &Netns, dev: &str, cidr: &str) -> Result<()> {
    if cidr.contains(':') {
        ns.ip(&["addr", "add", cidr, "dev", dev, "nodad"])
    } else {
        ns.ip(&["addr", "add", cidr, "dev", dev])
    }
}

/// Turns GRO on for `dev` in `ns` (see the module docs: native XDP redirects need it).
pub fn gro_on(ns: &Netns, dev: &str) -> Result<()> {
    crate::netns::run(ns.command("ethtool").args(["-K", dev, "gro", "on"]))
}

/// Makes `dev` in `ns` send real checksums, as a packet off a wire has (see the module docs).
pub fn wire_checksums(ns: &Netns, dev: &str) -> Result<()> {
    crate::netns::run(ns.command("ethtool").args(["-K", dev, "tx", "off"]))
}

/// The balancer's interface towards server `i`.
pub fn server_link(i: usize) -> String {
    format!("s{i}")
}

/// IPv4 address of server `i` (1-based).
pub fn server_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10 + i as u8, 2)
}

/// IPv6 address of server `i` (1-based).
pub fn server_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10 + i as u16, 0, 0, 0, 0, 0, 2)
}

/// Where server `i`'s demo backend serves HTTP (IPv4).
pub fn server_socket(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(server_addr(i)), SERVER_PORT)
}

/// Ports the demo backends serve besides HTTP on [`SERVER_PORT`]: HTTP on 80 and TCP echo on
/// 7 for the DSR VIPs (DSR keeps the VIP's port), TCP echo on [`ECHO_PORT`], UDP on
/// [`UDP_PORT`] and on the DSR VIPs' port 53.
pub const ECHO_PORT: u16 = 7000;
pub const UDP_PORT: u16 = 5353;

/// The arguments that make `weir-demo-backend` named `name` serve all of the above.
pub fn backend_args(name: &str) -> Vec<String> {
    let mut args = vec!["--name".to_string(), name.to_string()];
    for (flag, addr) in [
        ("--listen", format!("[::]:{SERVER_PORT}")),
        ("--listen", "[::]:80".to_string()),
        ("--echo", format!("[::]:{ECHO_PORT}")),
        ("--echo", "[::]:7".to_string()),
        ("--udp", format!("[::]:{UDP_PORT}")),
        // DSR replies must come from the VIP: bind it, not the wildcard.
        ("--udp", format!("{DSR_VIP}:53")),
        ("--udp", format!("[{DSR_VIP6}]:53")),
    ] {
        args.push(flag.to_string());
        args.push(addr);
    }
    args
}

/// A config for `weir` on this topology: XDP on every balancer interface, two NAT L4 VIPs over
/// the servers (HTTP on port 80, TCP echo on [`ECHO_PORT`]), one L7 virtual host. The daemon's socket, state file and pins go in `dir`
/// (pins in `dir/bpf`, which must be a bpffs mount: see [`crate::lab::Lab`]).
pub fn weir_config(topology: &Topology, dir: &std::path::Path, xdp_mode: &str) -> String {
    let pool: Vec<String> = (1..=topology.servers.len())
        .map(|i| format!("{{ address = \"{}\" }}", server_socket(i)))
        .collect();
    let pool = pool.join(", ");
    let echo_pool: Vec<String> = (1..=topology.servers.len())
        .map(|i| format!("{{ address = \"{}:{ECHO_PORT}\" }}", server_addr(i)))
        .collect();
    let echo_pool = echo_pool.join(", ");
    let interfaces: Vec<String> = topology
        .balancer_interfaces()
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect();
    format!(
        r#"# weir lab config: see README.md
[daemon]
control_socket = "{dir}/weir.sock"
state_file = "{dir}/state.json"
bpf_dir = "{dir}/bpf/weir"

[datapath]
interfaces = [{interfaces}]
xdp_mode = "{xdp_mode}"

[l7]
workers = 2
# Sized for a development box: two workers' descriptors (four per connection) stay within a
# usual hard limit of 20 000, so the daemon has nothing to warn about at every start.
max_connections_per_worker = 2000

[[l4_vip]]
name = "demo-l4"
address = "{L4_VIP}"
port = 80
protocol = "tcp"
mode = "nat"
servers = [{pool}]

[[l4_vip]]
name = "demo-echo"
address = "{L4_VIP}"
port = {ECHO_PORT}
protocol = "tcp"
mode = "nat"
servers = [{echo_pool}]

[[vhost]]
name = "demo-l7"
listen = "{L7_VIP}:80"
hosts = ["demo.weir.test"]
servers = [{pool}]
"#,
        dir = dir.display(),
        interfaces = interfaces.join(", "),
    )
}
