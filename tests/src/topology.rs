//! The standard weir topology: a client, a balancer and N servers, each in its own namespace.
//!
//! ```text
//!  client                 balancer                         server i
//!  eth0 198.18.0.1/24 ─── eth0 198.18.0.2/24  (XDP here)
//!                         br0  198.18.1.1/24 ─┬─ s<i> ─── eth0 198.18.1.(10+i)/24
//!                         lo   198.18.100.10  (L4 VIP)
//!                              198.18.100.11  (L7 VIP)
//! ```
//! Servers share one L2 segment (the bridge) so direct server return can be tested there; the
//! client routes 198.18.0.0/15 via the balancer, which forwards. Only 198.18.0.0/15 is used and
//! no namespace has a route anywhere else.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Result;

use crate::netns::{Netns, veth};

/// The client-facing interface of the balancer, where XDP is attached.
pub const BALANCER_UPLINK: &str = "eth0";
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BALANCER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const BALANCER_SERVER_SIDE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const L4_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
pub const L7_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
/// Port the demo backends listen on.
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
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])?;
        client.ip(&[
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            &BALANCER_ADDR.to_string(),
        ])?;
        balancer.ip(&[
            "addr",
            "add",
            &format!("{BALANCER_ADDR}/24"),
            "dev",
            BALANCER_UPLINK,
        ])?;
        balancer.ip(&["link", "add", "br0", "type", "bridge"])?;
        balancer.ip(&["link", "set", "br0", "up"])?;
        balancer.ip(&[
            "addr",
            "add",
            &format!("{BALANCER_SERVER_SIDE_ADDR}/24"),
            "dev",
            "br0",
        ])?;
        for vip in [L4_VIP, L7_VIP] {
            balancer.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        }
        balancer.sysctl("net.ipv4.ip_forward", "1")?;

        let mut namespaces = Vec::with_capacity(servers);
        for i in 1..=servers {
            let server = Netns::new(&format!("{prefix}srv{i}"))?;
            let port = format!("s{i}");
            veth(&server, "eth0", &balancer, &port)?;
            balancer.ip(&["link", "set", &port, "master", "br0"])?;
            server.ip(&[
                "addr",
                "add",
                &format!("{}/24", server_addr(i)),
                "dev",
                "eth0",
            ])?;
            server.ip(&[
                "route",
                "add",
                "default",
                "via",
                &BALANCER_SERVER_SIDE_ADDR.to_string(),
            ])?;
            namespaces.push(server);
        }
        Ok(Topology {
            client,
            balancer,
            servers: namespaces,
        })
    }
}

/// Address of server `i` (1-based).
pub fn server_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 10 + i as u8)
}

/// Where server `i`'s demo backend listens.
pub fn server_socket(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(server_addr(i)), SERVER_PORT)
}

/// A config for `weir` on this topology: XDP on the uplink, one L4 VIP over the servers, one
/// L7 virtual host. `control_socket` is where the daemon should listen.
pub fn weir_config(servers: usize, control_socket: &std::path::Path, xdp_mode: &str) -> String {
    let pool: Vec<String> = (1..=servers)
        .map(|i| format!("{{ address = \"{}\" }}", server_socket(i)))
        .collect();
    let pool = pool.join(", ");
    format!(
        r#"# weir lab config: see README.md
[daemon]
control_socket = "{socket}"

[datapath]
interfaces = ["{BALANCER_UPLINK}"]
xdp_mode = "{xdp_mode}"

[l7]
workers = 2

[[l4_vip]]
name = "demo-l4"
address = "{L4_VIP}"
port = 80
protocol = "tcp"
mode = "nat"
servers = [{pool}]

[[vhost]]
name = "demo-l7"
listen = "{L7_VIP}:80"
hosts = ["demo.weir.test"]
servers = [{pool}]
"#,
        socket = control_socket.display(),
    )
}
