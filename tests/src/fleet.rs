//! Several weir nodes behind one router: the scale-out lab (BGP ECMP, direct server return).
//!
//! ```text
//!  client               router (BIRD, ECMP)                  node k (weir + BIRD)
//!  eth0 198.18.0.1 ──── client 198.18.0.2
//!                       nodes: a bridge, 198.18.20.254/24 ── eth0 198.18.20.k/24 (XDP)
//!                       lan:   a bridge, 198.18.50.254/24 ── lan  198.18.50.k/24
//!                         │                                                   server i
//!                         └──────────────────────────────────────────────── eth0 198.18.50.(10+i)/24
//!                                                                             lo   the VIP
//! ```
//! The two bridges are the switches of a rack: a node that dies (or whose link goes down)
//! leaves the router's side up, so the router learns of it only from BGP, after the hold time,
//! as it would through a real switch.
//! Every node runs weir with the same VIP and pool (one config, [`node_config`]) and its own
//! BIRD, which announces what weir tells it to the router over eBGP (nodes AS 65001, router
//! AS 65000). The router's BIRD merges the equal routes into one multipath route in the
//! kernel, which hashes flows over the nodes by their 5-tuple (`fib_multipath_hash_policy=1`),
//! as an ECMP router in front of a balancer fleet does. The VIP is in DSR mode: a node
//! forwards a client's packets at L2 over the shared server LAN, and servers answer the client
//! directly through the router, their default gateway. So a flow the router moves to another
//! node reaches the same server as long as every node builds the same Maglev table.
//!
//! Nodes are built stopped; a test starts, drains and kills them. Only 198.18.0.0/15 is used
//! and no namespace has a route anywhere else.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    bird::{Bird, FAST_TIMERS},
    lab::{self, mount_bpffs, unmount_bpffs},
    netns::{Netns, Process, veth},
    topology::{DSR_VIP, DSR_VIP6, address, backend_args, gro_on, wire_checksums},
    workspace_bin,
};

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ROUTER_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 254);
/// The fleet's VIP: TCP echo on port 7 of the lab's DSR VIP, balanced in DSR mode.
pub const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(DSR_VIP), 7);
/// The VIP's name in every node's config.
pub const VIP_NAME: &str = "echo";
const NODE_AS: u32 = 65001;
const ROUTER_AS: u32 = 65000;

/// The router's address on the nodes' segment.
pub const ROUTER_NODES_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 254);

/// Node `k`'s (1-based) address on the segment it shares with the router.
pub fn node_uplink_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 20, k as u8)
}

/// Server `i`'s (1-based) address on the server LAN.
pub fn server_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 50, 10 + i as u8)
}

/// One balancer node: its namespace, and weir and BIRD in it while started.
pub struct Node {
    /// 1-based, as in the addresses.
    pub index: usize,
    pub weir: Option<Process>,
    pub bird: Option<Bird>,
    pub netns: Netns,
    /// The node's config, control socket, log, pins (a bpffs in `bpf/`) and BIRD files.
    pub dir: PathBuf,
}

impl Node {
    /// Starts weir, then its BIRD (which includes the routes file weir writes at start);
    /// returns once weir answers.
    pub fn start(&mut self) -> Result<()> {
        let mut weir = lab::spawn_weir(&self.netns, &self.dir, &[], None)?;
        lab::wait_for_weir(&mut weir, &self.dir)?;
        self.weir = Some(weir);
        let k = self.index;
        let config = format!(
            "router id {uplink};\nprotocol device {{}}\nprotocol static weir_vips {{\n  ipv4;\n  include \"{routes}\";\n}}\nprotocol bgp uplink {{\n  local {uplink} as {NODE_AS};\n  neighbor {router} as {ROUTER_AS};\n  {FAST_TIMERS}\n  ipv4 {{ import none; export where proto = \"weir_vips\"; }};\n}}\n",
            uplink = node_uplink_addr(k),
            router = ROUTER_NODES_ADDR,
            routes = self.dir.join("bgp-vips.conf").display(),
        );
        self.bird = Some(Bird::start(&self.netns, &self.dir, "node", &config)?);
        Ok(())
    }

    /// Kills weir and BIRD outright (SIGKILL: no withdrawal, no clean-up). The pinned
    /// datapath keeps forwarding what still arrives.
    pub fn kill(&mut self) {
        if let Some(mut bird) = self.bird.take() {
            bird.process.kill();
        }
        if let Some(mut weir) = self.weir.take() {
            weir.kill();
        }
    }

    /// Runs `weirctl ARGS` against this node's daemon, failing the test unless it succeeds.
    pub fn weirctl_ok(&self, args: &[&str]) -> String {
        lab::weirctl_ok(&self.dir.join("weir.sock"), args)
    }

    /// The node's report of the fleet's VIP (`weirctl --json vip show`).
    pub fn vip(&self) -> serde_json::Value {
        let out = self.weirctl_ok(&["--json", "vip", "show", VIP_NAME]);
        let show: serde_json::Value = serde_json::from_str(&out).expect("vip show --json is JSON");
        show["vip"].clone()
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self) -> String {
        lab::log(&self.dir)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        unmount_bpffs(&self.dir.join("bpf"));
    }
}

/// The whole lab; dropping it stops every process and removes the namespaces and `dir`.
pub struct Fleet {
    // Field order is drop order: processes stop before their namespaces go.
    pub nodes: Vec<Node>,
    pub backends: Vec<Process>,
    pub router_bird: Bird,
    pub client: Netns,
    pub router: Netns,
    pub servers: Vec<Netns>,
    pub dir: PathBuf,
}

impl Fleet {
    /// Builds the namespaces named `<prefix>client`, `<prefix>router`, `<prefix>node<k>` and
    /// `<prefix>srv<i>`, starts the router's BIRD and a demo backend on every server, and
    /// writes every node's config into `dir/node<k>`. No node is started.
    pub fn new(prefix: &str, dir: &Path, nodes: usize, servers: usize) -> Result<Fleet> {
        std::fs::create_dir_all(dir)?;
        let client = Netns::new(&format!("{prefix}client"))?;
        let router = Netns::new(&format!("{prefix}router"))?;
        veth(&client, "eth0", &router, "client")?;
        address(&client, "eth0", &format!("{CLIENT_ADDR}/24"))?;
        client.ip(&[
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            &ROUTER_ADDR.to_string(),
        ])?;
        wire_checksums(&client, "eth0")?;
        address(&router, "client", &format!("{ROUTER_ADDR}/24"))?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        // Hash on the 5-tuple, as an ECMP router in front of balancers is set to.
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        // Servers answer from the VIP, which the router routes towards the nodes.
        router.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        router.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        for (bridge, addr) in [("nodes", ROUTER_NODES_ADDR), ("lan", ROUTER_LAN_ADDR)] {
            router.ip(&["link", "add", bridge, "type", "bridge"])?;
            router.ip(&["link", "set", bridge, "up"])?;
            address(&router, bridge, &format!("{addr}/24"))?;
        }

        let mut server_namespaces = Vec::with_capacity(servers);
        let mut backends = Vec::with_capacity(servers);
        for i in 1..=servers {
            let server = Netns::new(&format!("{prefix}srv{i}"))?;
            let port = format!("s{i}");
            veth(&server, "eth0", &router, &port)?;
            router.ip(&["link", "set", &port, "master", "lan"])?;
            address(&server, "eth0", &format!("{}/24", server_addr(i)))?;
            server.ip(&[
                "route",
                "add",
                "default",
                "via",
                &ROUTER_LAN_ADDR.to_string(),
            ])?;
            // The demo backend also binds the IPv6 DSR VIP (this lab routes IPv4 only).
            for vip in [format!("{DSR_VIP}/32"), format!("{DSR_VIP6}/128")] {
                server.ip(&["addr", "add", &vip, "dev", "lo"])?;
            }
            server.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            server.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            gro_on(&server, "eth0")?;
            wire_checksums(&server, "eth0")?;
            let name = format!("srv{i}");
            backends.push(Process::spawn(
                &name,
                server
                    .command(workspace_bin("weir-demo-backend"))
                    .args(backend_args(&name))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null()),
            )?);
            server_namespaces.push(server);
        }

        let mut node_list = Vec::with_capacity(nodes);
        let mut sessions = String::new();
        for k in 1..=nodes {
            let netns = Netns::new(&format!("{prefix}node{k}"))?;
            let uplink_port = format!("n{k}");
            veth(&router, &uplink_port, &netns, "eth0")?;
            router.ip(&["link", "set", &uplink_port, "master", "nodes"])?;
            address(&netns, "eth0", &format!("{}/24", node_uplink_addr(k)))?;
            netns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &ROUTER_NODES_ADDR.to_string(),
            ])?;
            let lan_port = format!("l{k}");
            veth(&netns, "lan", &router, &lan_port)?;
            router.ip(&["link", "set", &lan_port, "master", "lan"])?;
            address(&netns, "lan", &format!("198.18.50.{k}/24"))?;
            // The XDP program asks the FIB for next hops, which needs forwarding on.
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            netns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            netns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            // Native XDP redirects into a veth are delivered only if its far end has GRO on.
            gro_on(&router, &lan_port)?;
            gro_on(&netns, "eth0")?;
            let dir = dir.join(format!("node{k}"));
            std::fs::create_dir_all(&dir)?;
            mount_bpffs(&dir.join("bpf"))?;
            std::fs::write(dir.join("weir.toml"), node_config(&dir, servers))?;
            node_list.push(Node {
                index: k,
                weir: None,
                bird: None,
                netns,
                dir,
            });
            sessions += &format!(
                "protocol bgp node{k} {{\n  local {} as {ROUTER_AS};\n  neighbor {} as {NODE_AS};\n  {FAST_TIMERS}\n  ipv4 {{ import all; export none; }};\n}}\n",
                ROUTER_NODES_ADDR,
                node_uplink_addr(k),
            );
        }
        for i in 1..=servers {
            gro_on(&router, &format!("s{i}"))?;
        }
        let router_bird = Bird::start(
            &router,
            dir,
            "router",
            &format!(
                "router id {ROUTER_ADDR};\nprotocol device {{}}\n# Equal routes from several nodes become one multipath route.\nprotocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n{sessions}"
            ),
        )?;
        let fleet = Fleet {
            nodes: node_list,
            backends,
            router_bird,
            client,
            router,
            servers: server_namespaces,
            dir: dir.to_path_buf(),
        };
        for (i, server) in fleet.servers.iter().enumerate() {
            server.wait_for_listener(
                SocketAddr::new(server_addr(i + 1).into(), VIP.port()),
                Duration::from_secs(5),
            )?;
        }
        Ok(fleet)
    }

    /// The nodes the router's kernel forwards the VIP to (its multipath next hops), by index.
    pub fn router_next_hops(&self) -> Result<Vec<usize>> {
        let out = self
            .router
            .command("ip")
            .args(["-j", "route", "show", &format!("{DSR_VIP}/32")])
            .output()?;
        let routes: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("ip -j route output")?;
        let mut hops: Vec<usize> = Vec::new();
        for route in routes.as_array().into_iter().flatten() {
            let gateways = match route["nexthops"].as_array() {
                Some(list) => list.iter().map(|hop| &hop["gateway"]).collect(),
                None => vec![&route["gateway"]],
            };
            for gateway in gateways {
                if let Some(k) = (1..=self.nodes.len())
                    .find(|&k| gateway.as_str() == Some(&node_uplink_addr(k).to_string()))
                {
                    hops.push(k);
                }
            }
        }
        hops.sort_unstable();
        Ok(hops)
    }

    /// Runs `f` in the client's namespace.
    pub fn from_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.client.run(f).expect("enter the client namespace")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.nodes.clear();
        self.backends.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Node config: XDP on the uplink and the server LAN, the VIP in DSR mode over every server,
/// announced through the node's BIRD. Only the paths differ between nodes.
pub fn node_config(dir: &Path, servers: usize) -> String {
    let pool: Vec<String> = (1..=servers)
        .map(|i| format!("{{ address = \"{}:{}\" }}", server_addr(i), VIP.port()))
        .collect();
    format!(
        r#"[daemon]
control_socket = "{dir}/weir.sock"
state_file = "{dir}/state.json"
bpf_dir = "{dir}/bpf/weir"

[datapath]
interfaces = ["eth0"]
server_interfaces = ["lan"]
xdp_mode = "native"
hash_seed = 7

[bgp]
bird_socket = "{dir}/bird-node.ctl"
routes_file = "{dir}/bgp-vips.conf"

[[l4_vip]]
name = "{VIP_NAME}"
address = "{vip}"
port = {port}
protocol = "tcp"
mode = "dsr"
servers = [{pool}]
"#,
        dir = dir.display(),
        vip = VIP.ip(),
        port = VIP.port(),
        pool = pool.join(", "),
    )
}
