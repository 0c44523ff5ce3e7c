//! A namespace for `BPF_PROG_TEST_RUN` packet tests and benchmarks of the datapath's programs.
//!
//! `bpf_fib_lookup` answers from the routing and neighbour tables of the namespace the test
//! runs in, so packet tests need a real one: two veth links (`up0` towards clients, `dn0`
//! towards servers) with addresses, forwarding on, and permanent neighbour entries whose MACs
//! the tests know. Nothing is ever transmitted: test runs only report the action.
//!
//! ```text
//!   clients 198.18.0.0/24, fd00::/64        servers 198.18.1.0/24, fd00:1::/64
//!        (neighbour .1 / ::1)  ── up0 [weir] dn0 ──  (neighbours .10-.12 / ::10-::12)
//! ```

use anyhow::Result;

use crate::netns::Netns;

/// Client-facing interface of the bed.
pub const UPLINK: &str = "up0";
/// Server-facing interface of the bed.
pub const DOWNLINK: &str = "dn0";
/// MACs the bed gives its interfaces, and the neighbours it declares.
pub const UPLINK_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 1];
pub const DOWNLINK_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 2];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 1];

/// The MAC of server `i` (0-based), whose addresses are 198.18.1.(10+i) and fd00:1::(10+i).
pub fn server_mac(i: u8) -> [u8; 6] {
    [0x02, 0x5e, 0, 0, 0, i]
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The bed's namespace; deleted on drop.
pub struct PacketBed {
    pub ns: Netns,
}

impl PacketBed {
    /// Builds the bed in a namespace called `name`, with `servers` server neighbours.
    pub fn new(name: &str, servers: u8) -> Result<PacketBed> {
        let ns = Netns::new(name)?;
        for (dev, mac, v4, v6) in [
            (UPLINK, UPLINK_MAC, "198.18.0.2/24", "fd00::2/64"),
            (DOWNLINK, DOWNLINK_MAC, "198.18.1.1/24", "fd00:1::1/64"),
        ] {
            let peer = format!("{dev}p");
            ns.ip(&[
                "link", "add", "name", dev, "type", "veth", "peer", "name", &peer,
            ])?;
            ns.ip(&["link", "set", dev, "address", &mac_str(mac)])?;
            ns.ip(&["addr", "add", v4, "dev", dev])?;
            ns.ip(&["addr", "add", v6, "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
            ns.ip(&["link", "set", &peer, "up"])?;
        }
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let mut neighbours = vec![
            ("198.18.0.1".to_string(), CLIENT_MAC, UPLINK),
            ("fd00::1".to_string(), CLIENT_MAC, UPLINK),
        ];
        for i in 0..servers {
            neighbours.push((format!("198.18.1.{}", 10 + i), server_mac(i), DOWNLINK));
            neighbours.push((format!("fd00:1::{}", 10 + i), server_mac(i), DOWNLINK));
        }
        for (addr, mac, dev) in neighbours {
            ns.ip(&[
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac_str(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        Ok(PacketBed { ns })
    }
}

/// The `xdp_md` context a test run starts from: a packet of `len` bytes received on
/// `ifindex`, queue 0. (Its layout is the kernel's UAPI `struct xdp_md`.)
pub fn xdp_context(ifindex: u32, len: usize) -> [u8; 24] {
    let fields: [u32; 6] = [0, len as u32, 0, ifindex, 0, 0];
    let mut ctx = [0u8; 24];
    for (chunk, field) in ctx.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&field.to_ne_bytes());
    }
    ctx
}

/// The `__sk_buff` context a TC test run starts from: a buffer received on `ifindex` (the
/// kernel takes the device, and so the namespace its FIB lookups use, from it). Only the
/// leading fields up to `ifindex` are given; the kernel reads the rest as zero. (Offsets are
/// the kernel's UAPI `struct __sk_buff`: `ingress_ifindex` at 36, `ifindex` at 40.)
pub fn skb_context(ifindex: u32) -> [u8; 44] {
    let mut ctx = [0u8; 44];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}
