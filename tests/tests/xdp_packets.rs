//! Packet tests of the L4 datapath through BPF_PROG_TEST_RUN, in the style of Katran's
//! fixtures: a table of input packet → expected fate → expected output packet, and the one
//! counter each packet must be accounted under. Each packet goes through the ingress pipeline
//! as the kernel runs it: the XDP balancer, then, for what XDP passes, the NAT return program
//! at TC.
//!
//! The program runs with its real maps, written by the real userspace (`Datapath`,
//! `L4Services`) from a config, in a namespace whose routes and neighbours its FIB lookups
//! use (`weir_tests::packet_bed`). Expected packets are built with `etherparse`, which computes
//! every checksum from scratch: an independent recomputation of every field the program
//! rewrites. Which server a new flow must reach is predicted from the Maglev table and the
//! flow hash, the datapath's contract.

use std::net::{IpAddr, SocketAddr};

use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use etherparse::{
    Icmpv4Type, Icmpv6Type, IpHeaders, PacketBuilder, PacketBuilderStep, TcpHeader,
    icmpv4::DestUnreachableHeader,
};
use weir_common::{
    Counter, Stat, TrafficCounter,
    edge::{EdgeSettings, Event},
    flow::flow_hash,
    l4::{HashFields, PROTO_TCP, VIP_INDEX_EMPTY, VIP_INDEX_SHARED, VipKey},
};
use weir_config::{Config, control::AdminState};
use weir_forwarder::{
    datapath::{self, Datapath, DatapathOptions},
    l4::{self, L4Service, L4Services},
    maglev::{MaglevServer, MaglevTable},
};
use weir_tests::packet_bed::{
    CLIENT_MAC, DOWNLINK, DOWNLINK_MAC, PacketBed, UPLINK, UPLINK_MAC, server_mac, skb_context,
    xdp_context,
};

const ETH_HLEN: usize = 14;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// What becomes of a packet after the ingress pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// To the kernel stack, as the host's own traffic.
    Pass,
    Drop,
    /// Out of the interface it came in on (XDP_TX).
    Bounce,
    /// Out of another interface, rewritten (an XDP or a TC redirect).
    Redirect,
}

const CONFIG: &str = r#"
[datapath]
hash_seed = 7
udp_idle_timeout_secs = 1

[[l4_vip]]
name = "web4"
address = "198.18.100.10"
port = 80
protocol = "tcp"
servers = [{ address = "198.18.1.10:8080" }, { address = "198.18.1.11:8080", weight = 200 }]

[[l4_vip]]
name = "dns4"
address = "198.18.100.10"
port = 53
protocol = "udp"
servers = [{ address = "198.18.1.12:5353" }]

[[l4_vip]]
name = "web6"
address = "fd00:100::10"
port = 80
protocol = "tcp"
servers = [{ address = "[fd00:1::10]:8080" }, { address = "[fd00:1::11]:8080" }]

[[l4_vip]]
name = "dns6"
address = "fd00:100::10"
port = 53
protocol = "udp"
servers = [{ address = "[fd00:1::12]:5353" }]

[[l4_vip]]
name = "dsr4"
address = "198.18.100.20"
port = 80
protocol = "tcp"
mode = "dsr"
servers = [{ address = "198.18.1.10:80" }, { address = "198.18.1.11:80" }]

[[l4_vip]]
name = "dsr6"
address = "fd00:100::20"
port = 53
protocol = "udp"
mode = "dsr"
servers = [{ address = "[fd00:1::10]:53" }]

[[l4_vip]]
name = "unroutable"
address = "198.18.100.30"
port = 80
protocol = "tcp"
servers = [{ address = "198.18.77.1:80" }]

[[l4_vip]]
name = "unresolved"
address = "198.18.100.31"
port = 80
protocol = "tcp"
servers = [{ address = "198.18.1.99:80" }]

[[l4_vip]]
name = "unresolved6"
address = "fd00:100::31"
port = 80
protocol = "tcp"
servers = [{ address = "[fd00:1::99]:80" }]

[[l4_vip]]
name = "unresolved_dsr"
address = "198.18.100.32"
port = 80
protocol = "tcp"
mode = "dsr"
servers = [{ address = "198.18.1.99:80" }]

[[l4_vip]]
name = "emptied"
address = "198.18.100.33"
port = 80
protocol = "tcp"
servers = [{ address = "198.18.1.10:8080" }]

[[l4_vip]]
name = "churn"
address = "198.18.100.35"
port = 80
protocol = "tcp"
table_size = 251
servers = [{ address = "198.18.1.12:80" }]
"#;

/// The bed, the datapath loaded in it (not attached: test runs do not need it), the services.
struct Balancer {
    datapath: Datapath,
    services: L4Services,
    up: u32,
    down: u32,
    seed: u32,
}

impl Balancer {
    /// Must be called on a thread inside the bed's namespace.
    fn new() -> Balancer {
        let config = Config::parse("packets.toml".as_ref(), CONFIG).expect("test config is valid");
        let mut datapath = Datapath::load(DatapathOptions {
            interfaces: vec![UPLINK.into(), DOWNLINK.into()],
            server_interfaces: Vec::new(),
            xdp_mode: config.datapath.xdp_mode,
            flow_table_size: 4096,
            embryonic_table_size: 4096,
            settings: datapath::settings(&config),
            edge: datapath::edge_settings(&config),
            pins: None,
        })
        .expect("verifier accepts the program and maps load");
        let services = L4Services::from_config(&config, datapath.maps_mut()).expect("services");
        let index = |name: &str| nix::net::if_::if_nametoindex(name).expect("bed interface");
        Balancer {
            datapath,
            services,
            up: index(UPLINK),
            down: index(DOWNLINK),
            seed: config.datapath.hash_seed,
        }
    }

    /// Runs `packet` as received on `ifindex` through XDP and, if XDP passes it, TC; returns
    /// its fate and the packet as it leaves.
    fn run(&self, ifindex: u32, packet: &[u8]) -> (Fate, Vec<u8>) {
        let xdp = self.datapath.program().expect("XDP program");
        let (action, out) = test_run(xdp, packet, &xdp_context(ifindex, packet.len()));
        let fate = match action {
            XDP_DROP => Fate::Drop,
            XDP_TX => Fate::Bounce,
            XDP_REDIRECT => Fate::Redirect,
            // The kernel's skb test run refuses a frame shorter than its IP header (or with
            // nothing after its Ethernet header); the TC program's parser leaves those alone.
            XDP_PASS if !holds_ip_header(&out) => Fate::Pass,
            XDP_PASS => {
                let tc = self.datapath.nat_return_program().expect("TC program");
                let (action, out) = test_run(tc, &out, &skb_context(ifindex));
                let fate = match action {
                    TC_ACT_OK => Fate::Pass,
                    TC_ACT_SHOT => Fate::Drop,
                    TC_ACT_REDIRECT => Fate::Redirect,
                    other => panic!("TC program returned {other}"),
                };
                return (fate, out);
            }
            other => panic!("XDP program returned {other}"),
        };
        (fate, out)
    }

    fn counters(&self) -> Vec<Counter> {
        let counters = self.datapath.maps().counters().expect("counters");
        counters.into_iter().map(|(_, c)| c).collect()
    }

    /// Runs a case and checks action, output and that exactly its counter moved.
    fn check(&self, case: &Case) {
        let before = self.counters();
        let (action, out) = self.run(case.ifindex, &case.packet);
        assert_eq!(action, case.action, "{}: action", case.name);
        let expected = case.output.as_deref().unwrap_or(&case.packet);
        assert_eq!(hex(&out), hex(expected), "{}: output packet", case.name);
        let after = self.counters();
        for stat in Stat::ALL {
            let i = *stat as usize;
            let moved = (
                after[i].packets - before[i].packets,
                after[i].bytes - before[i].bytes,
            );
            let want = if *stat == case.stat {
                (1, case.packet.len() as u64)
            } else {
                (0, 0)
            };
            assert_eq!(moved, want, "{}: counter {}", case.name, stat.name());
        }
    }

    /// Applies one change to the services and the maps; the test fails if it is refused.
    fn change(&mut self, f: impl FnOnce(&mut L4Services) -> Result<(), l4::L4Error>) {
        self.services
            .apply(self.datapath.maps_mut(), f)
            .expect("change applied");
    }

    fn service(&self, name: &str) -> &L4Service {
        self.services.service(name).expect("service")
    }

    /// VIP `name`'s traffic as the daemon reports it.
    fn vip_traffic(&self, name: &str) -> TrafficCounter {
        vip_traffic(&self.datapath, &self.services, name)
    }

    /// The server a new flow from `client` to `vip` must land on: the Maglev table over the
    /// ready servers, at slot `flow_hash % size`.
    fn predicted_server(&self, vip: &str, client: SocketAddr) -> SocketAddr {
        let service = self.service(vip);
        let ready: Vec<MaglevServer> = service
            .servers
            .iter()
            .filter(|s| s.state == AdminState::Ready)
            .map(|s| MaglevServer {
                address: s.address,
                weight: s.weight,
            })
            .collect();
        let table = MaglevTable::build(&ready, service.table_size, self.seed as u64)
            .unwrap()
            .expect("pool has ready servers");
        let hash = flow_hash(&service.flow_key(client), HashFields::FiveTuple, self.seed);
        ready[table.slots()[(hash % service.table_size) as usize] as usize].address
    }
}

/// VIP `name` of `services`' traffic in `datapath`, as the daemon reports it.
fn vip_traffic(datapath: &Datapath, services: &L4Services, name: &str) -> TrafficCounter {
    let service = services.service(name).expect("service");
    let servers = service.servers.iter().map(|s| s.id);
    datapath.maps().vip_traffic(service.id, servers).unwrap()
}

struct Case {
    name: String,
    ifindex: u32,
    packet: Vec<u8>,
    action: Fate,
    /// `None`: the packet must come out unchanged.
    output: Option<Vec<u8>>,
    stat: Stat,
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The neighbour MAC the bed declares for server address `ip` (198.18.1.(10+i), or
/// fd00:1::(10+i) where the decimal `10+i` is read as hex in the literal).
fn mac_of(ip: IpAddr) -> [u8; 6] {
    match ip {
        IpAddr::V4(v4) => server_mac(v4.octets()[3] - 10),
        IpAddr::V6(v6) => server_mac(v6.octets()[15] - 0x10),
    }
}

/// Ethernet + IP header builder for either family.
fn ip(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
) -> PacketBuilderStep<IpHeaders> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => panic!("mixed families"),
    }
}

/// TCP flags of a test segment.
#[derive(Clone, Copy)]
enum Flags {
    Syn,
    SynAck,
    Ack,
    Fin,
}

fn tcp_header(src: u16, dst: u16, flags: Flags) -> TcpHeader {
    let mut tcp = TcpHeader::new(src, dst, 1000, 64240);
    match flags {
        Flags::Syn => tcp.syn = true,
        Flags::SynAck => {
            tcp.syn = true;
            tcp.ack = true;
            tcp.acknowledgment_number = 1001;
        }
        Flags::Ack => {
            tcp.ack = true;
            tcp.acknowledgment_number = 1;
        }
        Flags::Fin => {
            tcp.fin = true;
            tcp.ack = true;
        }
    }
    tcp
}

/// A TCP segment `src` → `dst` with MACs and TTL, carrying a small payload.
fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddr,
    dst: SocketAddr,
    ttl: u8,
    flags: Flags,
) -> Vec<u8> {
    let mut packet = Vec::new();
    ip(macs.0, macs.1, src.ip(), dst.ip(), ttl)
        .tcp_header(tcp_header(src.port(), dst.port(), flags))
        .write(&mut packet, b"hello")
        .unwrap();
    packet
}

fn udp(macs: ([u8; 6], [u8; 6]), src: SocketAddr, dst: SocketAddr, ttl: u8) -> Vec<u8> {
    let mut packet = Vec::new();
    ip(macs.0, macs.1, src.ip(), dst.ip(), ttl)
        .udp(src.port(), dst.port())
        .write(&mut packet, b"query")
        .unwrap();
    packet
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Client-side frame (client → balancer MACs).
const IN: ([u8; 6], [u8; 6]) = (CLIENT_MAC, UPLINK_MAC);

/// The quote an ICMP error carries: the IP and TCP headers of a VIP → client segment.
fn quote(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let builder = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let mut packet = Vec::new();
    builder
        .tcp_header(tcp_header(src.port(), dst.port(), Flags::Ack))
        .write(&mut packet, b"")
        .unwrap();
    packet
}

/// An ICMP "fragmentation needed" / ICMPv6 "packet too big" from `router` to `to`, quoting `quoted`.
fn too_big(
    macs: ([u8; 6], [u8; 6]),
    router: IpAddr,
    to: IpAddr,
    ttl: u8,
    quoted: &[u8],
) -> Vec<u8> {
    let step = ip(macs.0, macs.1, router, to, ttl);
    let mut packet = Vec::new();
    if router.is_ipv4() {
        step.icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut packet, quoted)
        .unwrap();
    } else {
        step.icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut packet, quoted)
            .unwrap();
    }
    packet
}

fn in_bed<T: Send>(tag: &str, f: impl FnOnce() -> T + Send) -> T {
    let name = format!("weirt-{}-{tag}", std::process::id());
    let bed = PacketBed::new(&name, 3).expect("packet bed");
    bed.ns.run(f).expect("run in bed")
}

/// NAT, both directions, for one service: a SYN from `client` is rewritten to the predicted
/// server, and the server's SYN-ACK is rewritten back to the VIP.
fn nat_round_trip(lb: &Balancer, vip: &str, client: SocketAddr, udp_proto: bool) -> Vec<Case> {
    let service = lb.service(vip);
    let server = lb.predicted_server(vip, client);
    let out_macs = (DOWNLINK_MAC, mac_of(server.ip()));
    let back_macs = (UPLINK_MAC, CLIENT_MAC);
    let (forward_in, forward_out, reply_in, reply_out) = if udp_proto {
        (
            udp(IN, client, service.address, 64),
            udp(out_macs, client, server, 63),
            udp((mac_of(server.ip()), DOWNLINK_MAC), server, client, 64),
            udp(back_macs, service.address, client, 63),
        )
    } else {
        (
            tcp(IN, client, service.address, 64, Flags::Syn),
            tcp(out_macs, client, server, 63, Flags::Syn),
            tcp(
                (mac_of(server.ip()), DOWNLINK_MAC),
                server,
                client,
                64,
                Flags::SynAck,
            ),
            tcp(back_macs, service.address, client, 63, Flags::SynAck),
        )
    };
    let mut cases = vec![
        Case {
            name: format!("{vip}: client → server {server}, NAT"),
            ifindex: lb.up,
            packet: forward_in,
            action: Fate::Redirect,
            output: Some(forward_out),
            stat: Stat::ForwardNat,
        },
        Case {
            name: format!("{vip}: server {server} → client, NAT return"),
            ifindex: lb.down,
            packet: reply_in.clone(),
            action: Fate::Redirect,
            output: Some(reply_out),
            stat: Stat::ReturnNat,
        },
    ];
    if !udp_proto {
        // The client closes; then the server answers a SYN the client sent it directly from
        // the same port. The return entry is still there, but its flow is closing and this is
        // a SYN-ACK: not a reply through the VIP, so it must keep the server's address.
        cases.push(Case {
            name: format!("{vip}: client FIN → server {server}, NAT"),
            ifindex: lb.up,
            packet: tcp(IN, client, service.address, 64, Flags::Fin),
            action: Fate::Redirect,
            output: Some(tcp(out_macs, client, server, 63, Flags::Fin)),
            stat: Stat::ForwardNat,
        });
        cases.push(Case {
            name: format!("{vip}: server {server} SYN-ACK to a direct connection after a NAT flow"),
            ifindex: lb.down,
            packet: reply_in.clone(),
            action: Fate::Pass,
            output: None,
            stat: Stat::PassStaleReturn,
        });
        // The stale entry is gone: the rest of that direct connection is host traffic.
        cases.push(Case {
            name: format!("{vip}: server {server} data on the direct connection"),
            ifindex: lb.down,
            packet: tcp(
                (mac_of(server.ip()), DOWNLINK_MAC),
                server,
                client,
                64,
                Flags::Ack,
            ),
            action: Fate::Pass,
            output: None,
            stat: Stat::PassNotVip,
        });
    }
    cases
}

fn dsr(lb: &Balancer, vip: &str, client: SocketAddr, udp_proto: bool) -> Case {
    let service = lb.service(vip);
    let server = lb.predicted_server(vip, client);
    let out_macs = (DOWNLINK_MAC, mac_of(server.ip()));
    let (packet, output) = if udp_proto {
        (
            udp(IN, client, service.address, 64),
            udp(out_macs, client, service.address, 64),
        )
    } else {
        (
            tcp(IN, client, service.address, 64, Flags::Syn),
            tcp(out_macs, client, service.address, 64, Flags::Syn),
        )
    };
    Case {
        name: format!("{vip}: client → server {server}, DSR (MACs only)"),
        ifindex: lb.up,
        packet,
        action: Fate::Redirect,
        output: Some(output),
        stat: Stat::ForwardDsr,
    }
}

/// An ICMP error about the flow `client` ↔ `vip`, which must reach the flow's server with the
/// outer destination and the quoted source rewritten (NAT).
fn icmp_error(lb: &Balancer, vip: &str, client: SocketAddr, router: IpAddr) -> Case {
    let service = lb.service(vip);
    let server = lb.predicted_server(vip, client);
    let original = quote(service.address, client);
    let mut rewritten = quote(server, client);
    // The program leaves the quoted TCP checksum alone (see ebpf/src/icmp.rs): copy it over.
    let tcp_check_at = if server.is_ipv4() { 20 + 16 } else { 40 + 16 };
    rewritten[tcp_check_at..tcp_check_at + 2]
        .copy_from_slice(&original[tcp_check_at..tcp_check_at + 2]);
    Case {
        name: format!("{vip}: ICMP error about a flow → its server {server}"),
        ifindex: lb.up,
        packet: too_big(IN, router, service.address.ip(), 64, &original),
        action: Fate::Redirect,
        output: Some(too_big(
            (DOWNLINK_MAC, mac_of(server.ip())),
            router,
            server.ip(),
            63,
            &rewritten,
        )),
        stat: Stat::IcmpToServer,
    }
}

fn untouched(name: &str, ifindex: u32, packet: Vec<u8>, action: Fate, stat: Stat) -> Case {
    Case {
        name: name.to_string(),
        ifindex,
        packet,
        action,
        output: None,
        stat,
    }
}

fn arp_request() -> Vec<u8> {
    let mut packet = Vec::new();
    packet.extend_from_slice(&[0xff; 6]);
    packet.extend_from_slice(&CLIENT_MAC);
    packet.extend_from_slice(&0x0806u16.to_be_bytes());
    // htype 1, ptype IPv4, hlen 6, plen 4, op request, sender, target.
    packet.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    packet.extend_from_slice(&CLIENT_MAC);
    packet.extend_from_slice(&[198, 18, 0, 1]);
    packet.extend_from_slice(&[0; 6]);
    packet.extend_from_slice(&[198, 18, 0, 2]);
    packet
}

/// Sets the IPv4 header's flags/fragment word and fixes its checksum.
fn ipv4_fragment(mut packet: Vec<u8>, frag_word: u16) -> Vec<u8> {
    packet[14 + 6..14 + 8].copy_from_slice(&frag_word.to_be_bytes());
    fix_ipv4_checksum(&mut packet);
    packet
}

fn fix_ipv4_checksum(packet: &mut [u8]) {
    let ihl = (packet[14] & 0x0f) as usize * 4;
    packet[24..26].copy_from_slice(&[0, 0]);
    let header = etherparse::Ipv4HeaderSlice::from_slice(&packet[14..14 + ihl]).unwrap();
    let check = header.to_header().calc_header_checksum();
    packet[24..26].copy_from_slice(&check.to_be_bytes());
}

/// Inserts 4 bytes of IPv4 options (NOP ×3, EOL) and fixes lengths and checksum.
fn ipv4_with_options(packet: Vec<u8>) -> Vec<u8> {
    let mut out = packet[..34].to_vec();
    out.extend_from_slice(&[1, 1, 1, 0]);
    out.extend_from_slice(&packet[34..]);
    out[14] = 0x46;
    let total = u16::from_be_bytes([out[16], out[17]]) + 4;
    out[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut out);
    out
}

/// Inserts an 8-byte IPv6 extension header of type `kind` before the transport header.
fn ipv6_with_extension(packet: Vec<u8>, kind: u8) -> Vec<u8> {
    let transport = packet[14 + 6];
    let mut out = packet[..54].to_vec();
    out[14 + 6] = kind;
    let extension = if kind == 44 {
        // Fragment header: offset 0, more fragments.
        [transport, 0, 0, 1, 0, 0, 0, 42]
    } else {
        // Hop-by-hop / destination options: PadN to 8 bytes.
        [transport, 0, 1, 4, 0, 0, 0, 0]
    };
    out.extend_from_slice(&extension);
    out.extend_from_slice(&packet[54..]);
    let payload = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&payload.to_be_bytes());
    out
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn packet_table() {
    in_bed("pkt", || {
        let mut lb = Balancer::new();
        let vip4 = addr("198.18.100.10:80");
        let vip6 = addr("[fd00:100::10]:80");
        let client4 = |port| SocketAddr::new("198.18.0.1".parse().unwrap(), port);
        let client6 = |port| SocketAddr::new("fd00::1".parse().unwrap(), port);
        // A VIP whose every server is disabled, and one with a mode from the future.
        lb.change(|s| s.set_state("emptied", addr("198.18.1.10:8080"), AdminState::Disabled));
        let future = weir_common::l4::VipKey::new(addr("198.18.100.34:80"), 6);
        let info = weir_common::l4::VipInfo {
            id: 200,
            mode: 9,
            hash_fields: 0,
            _pad: [0; 2],
        };
        lb.datapath.maps_mut().set_vip(future, info).unwrap();

        let mut cases = vec![
            untouched(
                "arp is not IP",
                lb.up,
                arp_request(),
                Fate::Pass,
                Stat::PassNotIp,
            ),
            untouched(
                "IPv4 TCP to a host address",
                lb.up,
                tcp(IN, client4(40000), addr("198.18.0.2:22"), 64, Flags::Syn),
                Fate::Pass,
                Stat::PassNotVip,
            ),
            untouched(
                "IPv4 TCP to a VIP address on a port that is not an L4 VIP (an L7 listener)",
                lb.up,
                tcp(
                    IN,
                    client4(40000),
                    addr("198.18.100.10:443"),
                    64,
                    Flags::Syn,
                ),
                Fate::Pass,
                Stat::PassNotVip,
            ),
            untouched(
                "IPv6 UDP to a host address",
                lb.up,
                udp(IN, client6(40000), addr("[fd00::2]:53"), 64),
                Fate::Pass,
                Stat::PassNotVip,
            ),
            untouched(
                "IPv4 header cut short",
                lb.up,
                tcp(IN, client4(40000), vip4, 64, Flags::Syn)[..14 + 19].to_vec(),
                Fate::Pass,
                Stat::PassMalformed,
            ),
            untouched(
                "IPv6 header cut short",
                lb.up,
                tcp(IN, client6(40000), vip6, 64, Flags::Syn)[..14 + 39].to_vec(),
                Fate::Pass,
                Stat::PassMalformed,
            ),
            untouched(
                "only an Ethernet header",
                lb.up,
                arp_request()[..14].to_vec(),
                Fate::Pass,
                Stat::PassNotIp,
            ),
            untouched(
                "TCP header cut short (IP length consistent), to a VIP",
                lb.up,
                ipv4_total_len(
                    tcp(IN, client4(40000), vip4, 64, Flags::Syn)[..34 + 10].to_vec(),
                    30,
                ),
                Fate::Drop,
                Stat::DropMalformed,
            ),
            untouched(
                "IPv4 first fragment to a VIP",
                lb.up,
                ipv4_fragment(tcp(IN, client4(40001), vip4, 64, Flags::Syn), 0x2000),
                Fate::Drop,
                Stat::DropFragment,
            ),
            untouched(
                "IPv4 later fragment to a VIP (no ports)",
                lb.up,
                ipv4_fragment(
                    udp(IN, client4(40001), addr("198.18.100.10:53"), 64),
                    0x0010,
                ),
                Fate::Drop,
                Stat::DropFragment,
            ),
            untouched(
                "IPv4 fragment to a host address",
                lb.up,
                ipv4_fragment(udp(IN, client4(40001), addr("198.18.0.2:53"), 64), 0x2000),
                Fate::Pass,
                Stat::PassNotVip,
            ),
            untouched(
                "IPv4 options to a VIP",
                lb.up,
                ipv4_with_options(tcp(IN, client4(40002), vip4, 64, Flags::Syn)),
                Fate::Drop,
                Stat::DropIpOptions,
            ),
            untouched(
                "IPv4 options to a host address",
                lb.up,
                ipv4_with_options(tcp(
                    IN,
                    client4(40002),
                    addr("198.18.0.2:22"),
                    64,
                    Flags::Syn,
                )),
                Fate::Pass,
                Stat::PassNotVip,
            ),
            untouched(
                "IPv6 fragment header to a VIP",
                lb.up,
                ipv6_with_extension(udp(IN, client6(40003), addr("[fd00:100::10]:53"), 64), 44),
                Fate::Drop,
                Stat::DropFragment,
            ),
            untouched(
                "IPv6 hop-by-hop options to a VIP",
                lb.up,
                ipv6_with_extension(tcp(IN, client6(40003), vip6, 64, Flags::Syn), 0),
                Fate::Drop,
                Stat::DropIpv6Extension,
            ),
            untouched(
                "IPv6 destination options to a host address",
                lb.up,
                ipv6_with_extension(
                    tcp(IN, client6(40003), addr("[fd00::2]:22"), 64, Flags::Syn),
                    60,
                ),
                Fate::Pass,
                Stat::PassNotVip,
            ),
            untouched(
                "TTL 1 to a NAT VIP",
                lb.up,
                tcp(IN, client4(40004), vip4, 1, Flags::Syn),
                Fate::Drop,
                Stat::DropTtlExceeded,
            ),
            untouched(
                "VIP whose servers are all disabled",
                lb.up,
                tcp(IN, client4(40005), addr("198.18.100.33:80"), 64, Flags::Syn),
                Fate::Drop,
                Stat::DropNoServer,
            ),
            untouched(
                "VIP with a forwarding mode this program does not know",
                lb.up,
                tcp(IN, client4(40005), addr("198.18.100.34:80"), 64, Flags::Syn),
                Fate::Drop,
                Stat::DropUnsupportedMode,
            ),
            untouched(
                "NAT to a server with no route",
                lb.up,
                // The destination is rewritten (and the TTL decremented, as a router does)
                // before the route lookup fails; the packet is dropped, so its bytes do not
                // matter, only that it never leaves.
                tcp(IN, client4(40006), addr("198.18.100.30:80"), 64, Flags::Syn),
                Fate::Drop,
                Stat::DropNoRoute,
            ),
            untouched(
                "DSR to a server whose MAC is unresolved",
                lb.up,
                tcp(IN, client4(40007), addr("198.18.100.32:80"), 64, Flags::Syn),
                Fate::Drop,
                Stat::DropNoNeighbor,
            ),
            untouched(
                "ICMP echo to a VIP goes to the host",
                lb.up,
                {
                    let mut packet = Vec::new();
                    ip(CLIENT_MAC, UPLINK_MAC, client4(0).ip(), vip4.ip(), 64)
                        .icmpv4_echo_request(1, 1)
                        .write(&mut packet, b"ping")
                        .unwrap();
                    packet
                },
                Fate::Pass,
                Stat::PassIcmp,
            ),
            untouched(
                "reply from a server for a flow weir never saw",
                lb.down,
                tcp(
                    (server_mac(0), DOWNLINK_MAC),
                    addr("198.18.1.10:8080"),
                    client4(49999),
                    64,
                    Flags::Ack,
                ),
                Fate::Pass,
                Stat::PassNotVip,
            ),
        ];
        // Rewritten cases. The packet-dependent outputs need their own handling below.
        for case in &mut cases {
            if case.stat == Stat::DropNoRoute {
                case.output = Some(nat_rewritten(&case.packet, addr("198.18.77.1:80")));
            }
        }
        cases.push(Case {
            name: "NAT to a server whose MAC is unresolved: rewritten, then the kernel forwards it"
                .into(),
            ifindex: lb.up,
            packet: tcp(IN, client4(40008), addr("198.18.100.31:80"), 64, Flags::Syn),
            action: Fate::Pass,
            output: Some(tcp(
                IN,
                client4(40008),
                addr("198.18.1.99:80"),
                64,
                Flags::Syn,
            )),
            stat: Stat::PassSlowPath,
        });
        cases.push(Case {
            name: "IPv6 NAT to a server whose MAC is unresolved: rewritten, then the kernel forwards it".into(),
            ifindex: lb.up,
            packet: tcp(IN, client6(40008), addr("[fd00:100::31]:80"), 64, Flags::Syn),
            action: Fate::Pass,
            output: Some(tcp(IN, client6(40008), addr("[fd00:1::99]:80"), 64, Flags::Syn)),
            stat: Stat::PassSlowPath,
        });
        for port in [41000, 41001, 41002, 41003] {
            cases.extend(nat_round_trip(&lb, "web4", client4(port), false));
            cases.extend(nat_round_trip(&lb, "web6", client6(port), false));
        }
        cases.extend(nat_round_trip(&lb, "dns4", client4(41000), true));
        cases.extend(nat_round_trip(&lb, "dns6", client6(41000), true));
        for port in [42000, 42001, 42002, 42003] {
            cases.push(dsr(&lb, "dsr4", client4(port), false));
        }
        cases.push(dsr(&lb, "dsr6", client6(42000), true));
        cases.push(icmp_error(
            &lb,
            "web4",
            client4(41000),
            "198.18.0.254".parse().unwrap(),
        ));
        cases.push(icmp_error(
            &lb,
            "web6",
            client6(41000),
            "fd00::fe".parse().unwrap(),
        ));
        cases.push(icmp_error(
            &lb,
            "web4",
            client4(43000),
            "198.18.0.254".parse().unwrap(),
        ));

        for case in &cases {
            lb.check(case);
        }
        // Both servers of the weighted pools were reached, so the rewrites above covered both.
        let reached: std::collections::HashSet<String> =
            cases.iter().map(|c| c.name.clone()).collect();
        for server in [
            "198.18.1.10:8080",
            "198.18.1.11:8080",
            "[fd00:1::10]:8080",
            "[fd00:1::11]:8080",
        ] {
            assert!(
                reached
                    .iter()
                    .any(|n| n.contains(&format!("server {server}"))),
                "no case reached {server}: pick other client ports"
            );
        }
    });
}

/// `packet` (IPv4 TCP) as the NAT rewrite leaves it before it looks for a route: addressed to
/// `to`, its TTL decremented, checksums recomputed.
fn nat_rewritten(packet: &[u8], to: SocketAddr) -> Vec<u8> {
    let sliced = etherparse::SlicedPacket::from_ethernet(packet).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ipv4)) = sliced.net else {
        panic!("IPv4")
    };
    let Some(etherparse::TransportSlice::Tcp(tcp_slice)) = sliced.transport else {
        panic!("TCP")
    };
    let eth = etherparse::Ethernet2HeaderSlice::from_slice(packet)
        .unwrap()
        .to_header();
    let IpAddr::V4(to_ip) = to.ip() else {
        panic!("IPv4")
    };
    let header = ipv4.header().to_header();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(eth.source, eth.destination)
        .ipv4(header.source, to_ip.octets(), header.time_to_live - 1)
        .tcp_header({
            let mut tcp = tcp_slice.to_header();
            tcp.destination_port = to.port();
            tcp
        })
        .write(&mut out, tcp_slice.payload())
        .unwrap();
    out
}

/// Where a rewritten packet is addressed (destination address and port).
fn destination(packet: &[u8]) -> SocketAddr {
    let sliced = etherparse::SlicedPacket::from_ethernet(packet).unwrap();
    let ip: IpAddr = match sliced.net {
        Some(etherparse::NetSlice::Ipv4(v4)) => v4.header().destination_addr().into(),
        Some(etherparse::NetSlice::Ipv6(v6)) => v6.header().destination_addr().into(),
        _ => panic!("not IP"),
    };
    let port = match sliced.transport {
        Some(etherparse::TransportSlice::Tcp(tcp)) => tcp.destination_port(),
        Some(etherparse::TransportSlice::Udp(udp)) => udp.destination_port(),
        _ => panic!("not TCP/UDP"),
    };
    SocketAddr::new(ip, port)
}

impl Balancer {
    /// Sends a client → VIP packet and returns the server it was sent to.
    fn send(&self, packet: Vec<u8>) -> SocketAddr {
        let (action, out) = self.run(self.up, &packet);
        assert_eq!(action, Fate::Redirect, "packet was not forwarded");
        destination(&out)
    }

    fn tcp_to(&self, vip: &str, client: SocketAddr, flags: Flags) -> SocketAddr {
        self.send(tcp(IN, client, self.service(vip).address, 64, flags))
    }

    /// A client port whose new flow the table currently sends to `server`.
    fn port_for(&self, vip: &str, server: SocketAddr, from: u16) -> u16 {
        (from..)
            .find(|&port| self.predicted_server(vip, client(port)) == server)
            .expect("some port maps to every server")
    }
}

fn client(port: u16) -> SocketAddr {
    SocketAddr::new("198.18.0.1".parse().unwrap(), port)
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn flows_stay_pinned_through_pool_changes() {
    in_bed("flow", || {
        let mut lb = Balancer::new();
        let a = addr("198.18.1.10:8080");
        let b = addr("198.18.1.11:8080");
        let c = addr("198.18.1.12:8080");
        let pinned = client(lb.port_for("web4", a, 40000));
        assert_eq!(lb.tcp_to("web4", pinned, Flags::Syn), a);

        // 200 other established flows, remembered with their server.
        let established: Vec<(SocketAddr, SocketAddr)> = (50000..50200)
            .map(|port| (client(port), lb.tcp_to("web4", client(port), Flags::Syn)))
            .collect();
        assert!(
            established.iter().any(|(_, s)| *s == a) && established.iter().any(|(_, s)| *s == b)
        );

        // Draining A: its flows stay, new flows avoid it (even those whose slot was A's).
        lb.change(|s| s.set_state("web4", a, AdminState::Draining));
        assert_eq!(
            lb.tcp_to("web4", pinned, Flags::Ack),
            a,
            "drained server lost its flow"
        );
        assert_eq!(
            lb.tcp_to("web4", pinned, Flags::Syn),
            a,
            "SYN retransmit moved"
        );
        for (client, server) in &established {
            assert_eq!(lb.tcp_to("web4", *client, Flags::Ack), *server);
        }
        for port in 60000..60100 {
            assert_eq!(
                lb.tcp_to("web4", client(port), Flags::Syn),
                b,
                "new flow sent to a draining server"
            );
        }

        // Adding C moves only new flows: every established flow keeps its server.
        lb.change(|s| s.add_server("web4", c, 100));
        for (client, server) in &established {
            assert_eq!(
                lb.tcp_to("web4", *client, Flags::Ack),
                *server,
                "established flow moved on add"
            );
        }
        let to_c = (61000..61100)
            .filter(|&port| lb.tcp_to("web4", client(port), Flags::Syn) == c)
            .count();
        assert!(to_c > 10, "the new server takes new flows ({to_c} of 100)");

        // A FIN marks the flow closing; the client reusing the port with a SYN picks afresh,
        // and can no longer reach the draining server.
        assert_eq!(lb.tcp_to("web4", pinned, Flags::Fin), a);
        assert_ne!(
            lb.tcp_to("web4", pinned, Flags::Syn),
            a,
            "reconnect stuck to a draining server"
        );

        // Removing a server re-picks its flows on their next packet.
        let on_b: Vec<SocketAddr> = established
            .iter()
            .filter(|(_, s)| *s == b)
            .map(|(c, _)| *c)
            .collect();
        let before = lb.vip_traffic("web4");
        lb.change(|s| s.remove_server("web4", b));
        for client in &on_b {
            assert_eq!(
                lb.tcp_to("web4", *client, Flags::Ack),
                c,
                "flow of a removed server"
            );
        }

        // Counters: every new flow was counted once at the VIP, and what the removed server
        // carried is still in the VIP's traffic (the program counts per server only).
        let traffic = lb.vip_traffic("web4");
        assert!(traffic.new_flows > 200 + 100 + 100 + 1, "{traffic:?}");
        assert_eq!(
            traffic.packets,
            before.packets + on_b.len() as u64,
            "the VIP's traffic went down with a removed server"
        );
    });
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn idle_udp_flows_expire_and_re_pick() {
    in_bed("udp", || {
        let mut lb = Balancer::new();
        let first = addr("198.18.1.12:5353");
        let second = addr("198.18.1.11:5353");
        lb.change(|s| s.add_server("dns4", second, 100));
        let vip = lb.service("dns4").address;
        let port = lb.port_for("dns4", first, 40000);
        let query = || udp(IN, client(port), vip, 64);
        assert_eq!(lb.send(query()), first);
        lb.change(|s| s.set_state("dns4", first, AdminState::Draining));
        assert_eq!(
            lb.send(query()),
            first,
            "within the idle timeout the flow stays"
        );
        // The bed's UDP idle timeout is 1 s; the flow clock is coarse (a few ms).
        std::thread::sleep(std::time::Duration::from_millis(2200));
        assert_eq!(
            lb.send(query()),
            second,
            "an idle UDP flow must be forgotten"
        );
    });
}

/// A TCP ACK `src` → `dst` from the client side carrying `payload` bytes.
fn tcp_with_payload(src: SocketAddr, dst: SocketAddr, payload: usize) -> Vec<u8> {
    let mut packet = Vec::new();
    ip(IN.0, IN.1, src.ip(), dst.ip(), 64)
        .tcp_header(tcp_header(src.port(), dst.port(), Flags::Ack))
        .write(&mut packet, &vec![0x5a; payload])
        .unwrap();
    packet
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn cached_next_hops_follow_the_server_address_and_the_mtu() {
    in_bed("hops", || {
        let mut lb = Balancer::new();
        // DSR: the first packet fills the next-hop cache for its server's id.
        let vip = lb.service("dsr4").address;
        let flow = client(43000);
        let (action, out) = lb.run(lb.up, &tcp(IN, flow, vip, 64, Flags::Syn));
        assert_eq!(action, Fate::Redirect);
        let first = lb.predicted_server("dsr4", flow);
        assert_eq!(
            out[..6],
            mac_of(first.ip()),
            "first packet to the server's MAC"
        );
        // The id now names another address (as a reused id would): the cached hop of the old
        // address must not be used.
        let id = lb.service("dsr4").find_server(first).unwrap().id;
        let other = addr("198.18.1.12:80");
        lb.datapath
            .maps_mut()
            .set_server(id, weir_common::l4::ServerInfo::new(other))
            .unwrap();
        let (action, out) = lb.run(lb.up, &tcp(IN, flow, vip, 64, Flags::Ack));
        assert_eq!(action, Fate::Redirect);
        assert_eq!(
            out[..6],
            mac_of(other.ip()),
            "stale next hop used for a new address"
        );

        // NAT: a small packet caches the hop; after the egress MTU shrinks, a packet too big
        // for it must not be sent from the cache but handed to the kernel (which answers
        // "fragmentation needed"), while small ones still go out.
        let web = lb.service("web4").address;
        let flow = client(43001);
        let (action, _) = lb.run(lb.up, &tcp(IN, flow, web, 64, Flags::Syn));
        assert_eq!(action, Fate::Redirect);
        weir_tests::netns::run(
            std::process::Command::new("ip").args(["link", "set", "dn0", "mtu", "1000"]),
        )
        .unwrap();
        let (action, _) = lb.run(lb.up, &tcp_with_payload(flow, web, 1200));
        assert_eq!(
            action,
            Fate::Pass,
            "an oversized packet went out from the cache"
        );
        let (action, _) = lb.run(lb.up, &tcp_with_payload(flow, web, 100));
        assert_eq!(action, Fate::Redirect);
    });
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn replies_of_a_flow_evicted_under_pressure_still_take_the_vip() {
    in_bed("evict", || {
        let mut lb = Balancer::new();
        let service = lb.service("web4").clone();
        let flow = client(43100);
        let server = lb.predicted_server("web4", flow);
        for flags in [Flags::Syn, Flags::Ack] {
            let (action, _) = lb.run(lb.up, &tcp(IN, flow, service.address, 64, flags));
            assert_eq!(action, Fate::Redirect);
        }
        assert!(
            lb.datapath.maps().flow(&service.flow_key(flow)).is_some(),
            "the handshake's ACK records the flow"
        );
        // The client flow leaves the table as the LRU evicts it; its return entry stays.
        lb.datapath
            .maps_mut()
            .forget_flow(&service.flow_key(flow))
            .unwrap();
        let reply = tcp(
            (mac_of(server.ip()), DOWNLINK_MAC),
            server,
            flow,
            64,
            Flags::Ack,
        );
        let (action, out) = lb.run(lb.down, &reply);
        assert_eq!(
            action,
            Fate::Redirect,
            "a reply of an evicted flow was not un-NATed"
        );
        assert_eq!(
            hex(&out),
            hex(&tcp(
                (UPLINK_MAC, CLIENT_MAC),
                service.address,
                flow,
                63,
                Flags::Ack
            ))
        );
    });
}

/// `packet` (IPv4) with its total length set to `len`, the header checksum fixed.
fn ipv4_total_len(mut packet: Vec<u8>, len: u16) -> Vec<u8> {
    packet[14 + 2..14 + 4].copy_from_slice(&len.to_be_bytes());
    fix_ipv4_checksum(&mut packet);
    packet
}

/// `packet` (IPv6) with its payload length set to `len`.
fn ipv6_payload_len(mut packet: Vec<u8>, len: u16) -> Vec<u8> {
    packet[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
    packet
}

/// `packet` (IPv4) with its header checksum off by one.
fn bad_ipv4_checksum(mut packet: Vec<u8>) -> Vec<u8> {
    packet[14 + 11] ^= 1;
    packet
}

/// `packet` (IPv4 TCP) with the TCP header's data offset (in 32-bit words) set to `words`.
fn tcp_data_offset(mut packet: Vec<u8>, words: u8) -> Vec<u8> {
    packet[34 + 12] = (words << 4) | (packet[34 + 12] & 0x0f);
    packet
}

/// `packet` (IPv4 TCP) with its TCP flags byte set to `flags`.
fn tcp_flags(mut packet: Vec<u8>, flags: u8) -> Vec<u8> {
    packet[34 + 13] = flags;
    packet
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn hostile_packets_to_a_vip_are_dropped_and_counted() {
    in_bed("hostile", || {
        let lb = Balancer::new();
        let nat4 = addr("198.18.100.10:80");
        let dsr4 = addr("198.18.100.20:80");
        let nat6 = addr("[fd00:100::10]:80");
        let host4 = addr("198.18.0.2:22");
        let from = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap(), port);
        let client = from("198.18.0.1", 44000);
        let client6 = from("fd00::1", 44000);
        let syn = |src, dst| tcp(IN, src, dst, 64, Flags::Syn);
        let drop = |name: &str, packet, stat| untouched(name, lb.up, packet, Fate::Drop, stat);
        let mut cases = Vec::new();
        // Lengths that do not match the frame.
        for (vip, name) in [(nat4, "NAT"), (dsr4, "DSR")] {
            cases.push(drop(
                &format!("IPv4 total length 1400 in a short frame, {name} VIP"),
                ipv4_total_len(syn(client, vip), 1400),
                Stat::DropBadLength,
            ));
            cases.push(drop(
                &format!("TCP data offset 15 with a 20-byte header, {name} VIP"),
                tcp_data_offset(syn(client, vip), 15),
                Stat::DropBadLength,
            ));
            cases.push(drop(
                &format!("IPv4 header checksum wrong, {name} VIP"),
                bad_ipv4_checksum(syn(client, vip)),
                Stat::DropBadChecksum,
            ));
        }
        cases.push(drop(
            "IPv6 payload length 3000 in a short frame",
            ipv6_payload_len(syn(client6, nat6), 3000),
            Stat::DropBadLength,
        ));
        // Flags no connection sends: SYN+FIN, SYN+RST, none, FIN alone, Xmas, all.
        for (flags, what) in [
            (0x03, "SYN+FIN"),
            (0x06, "SYN+RST"),
            (0x00, "no flag"),
            (0x01, "FIN alone"),
            (0x29, "FIN+PSH+URG (Xmas)"),
            (0x3f, "every flag"),
            (0xff, "every flag and ECN bits"),
        ] {
            for (vip, name) in [(nat4, "NAT"), (dsr4, "DSR")] {
                cases.push(drop(
                    &format!("TCP {what}, {name} VIP"),
                    tcp_flags(syn(client, vip), flags),
                    Stat::DropBadTcpFlags,
                ));
            }
        }
        // Sources no client can have.
        for source in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            cases.push(drop(
                &format!("SYN from {source}"),
                syn(from(source, 44001), nat4),
                Stat::DropMartianSource,
            ));
        }
        for source in ["::", "::1", "ff02::1", "::ffff:198.18.0.1"] {
            cases.push(drop(
                &format!("SYN from {source}"),
                syn(from(source, 44001), nat6),
                Stat::DropMartianSource,
            ));
        }
        // Sources that are the balancer itself: a VIP (its own or another), an interface.
        for (source, vip) in [
            ("198.18.100.10", nat4),
            ("198.18.100.20", nat4),
            ("198.18.0.2", dsr4),
            ("198.18.1.1", nat4),
            ("fd00:100::10", nat6),
            ("fd00::2", nat6),
        ] {
            cases.push(drop(
                &format!("SYN from the balancer's own {source} to {vip}"),
                syn(from(source, 80), vip),
                Stat::DropSpoofedSource,
            ));
        }
        // The policy is for VIPs: the same packets to the host are the kernel's business.
        for (packet, what) in [
            (ipv4_total_len(syn(client, host4), 1400), "a bad length"),
            (bad_ipv4_checksum(syn(client, host4)), "a bad checksum"),
            (tcp_flags(syn(client, host4), 0x03), "SYN+FIN"),
            (
                syn(from("255.255.255.255", 44001), host4),
                "a martian source",
            ),
        ] {
            cases.push(untouched(
                &format!("{what} to a host address"),
                lb.up,
                packet,
                Fate::Pass,
                Stat::PassNotVip,
            ));
        }
        // Legal combinations still pass the policy: SYN with ECN bits, RST alone, RST+ACK.
        let service = lb.service("web4");
        for (flags, what) in [(0xc2u8, "SYN+ECE+CWR"), (0x04, "RST"), (0x14, "RST+ACK")] {
            let port = 44100 + u16::from(flags);
            let server = lb.predicted_server("web4", from("198.18.0.1", port));
            let mut packet = tcp_flags(syn(from("198.18.0.1", port), service.address), flags);
            fix_tcp_checksum(&mut packet);
            let mut output = tcp_flags(
                tcp(
                    (DOWNLINK_MAC, mac_of(server.ip())),
                    from("198.18.0.1", port),
                    server,
                    63,
                    Flags::Syn,
                ),
                flags,
            );
            // The flags byte is covered by the TCP checksum: recompute it on the output.
            fix_tcp_checksum(&mut output);
            cases.push(Case {
                name: format!("TCP {what} to a NAT VIP is forwarded"),
                ifindex: lb.up,
                packet,
                action: Fate::Redirect,
                output: Some(output),
                stat: Stat::ForwardNat,
            });
        }
        // Found by the fuzz test: an ICMP error whose IP length ends inside its quote. The
        // quoted ports lie in padding past the packet, outside what the ICMP checksum covers:
        // weir must not read (or rewrite) them there.
        let mut cut_quote = icmp_error(&lb, "web4", client, "198.18.0.254".parse().unwrap()).packet;
        cut_quote[16..18].copy_from_slice(&45u16.to_be_bytes());
        fix_checksums(&mut cut_quote);
        cases.push(drop(
            "ICMP error to a VIP whose quote runs past its IP length",
            cut_quote,
            Stat::DropMalformed,
        ));
        let before = flow_tables(&lb);
        for case in &cases {
            lb.check(case);
        }
        assert_eq!(
            flow_tables(&lb),
            (before.0, before.1 + 1),
            "of all these, only the legal SYN may leave a flow (an embryonic one); a RST \
             without a flow records nothing"
        );
    });
}

/// Found by the fuzz test: a server refusing an embryonic NAT flow with RST+ACK (a closed
/// port) was counted twice, `pass_not_vip` by XDP and `return_nat` by TC. It is counted
/// once, as its SYN-ACK is.
#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn a_server_refusing_an_embryonic_flow_is_counted_once() {
    in_bed("refuse", || {
        let lb = Balancer::new();
        let vip = lb.service("web4").address;
        for (i, flags) in [0x14u8, 0x04, 0x12].into_iter().enumerate() {
            let flow = client(47000 + i as u16);
            let server = lb.tcp_to("web4", flow, Flags::Syn);
            let mut reply = tcp_flags(
                tcp(
                    (mac_of(server.ip()), DOWNLINK_MAC),
                    server,
                    flow,
                    64,
                    Flags::SynAck,
                ),
                flags,
            );
            fix_tcp_checksum(&mut reply);
            let before = lb.counters();
            let (fate, out) = lb.run(lb.down, &reply);
            assert_eq!(fate, Fate::Redirect, "flags {flags:#04x}");
            assert_eq!(destination(&out), flow);
            assert_eq!(
                (out[26..30].to_vec(), u16::from_be_bytes([out[34], out[35]])),
                (vec![198, 18, 100, 10], vip.port()),
                "the reply comes from the VIP"
            );
            let after = lb.counters();
            let moved: Vec<&str> = Stat::ALL
                .iter()
                .filter(|stat| after[**stat as usize].packets != before[**stat as usize].packets)
                .map(|stat| stat.name())
                .collect();
            assert_eq!(moved, ["return_nat"], "flags {flags:#04x}");
        }
    });
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn a_reused_server_id_never_receives_an_old_flow() {
    in_bed("reuse", || {
        let mut lb = Balancer::new();
        let vip = lb.service("web4").address;
        let old = addr("198.18.1.11:8080");
        // An established flow, and an embryonic one, on `old`.
        let flow = client(lb.port_for("web4", old, 48000));
        let embryo = client(lb.port_for("web4", old, flow.port() + 1));
        assert_eq!(lb.tcp_to("web4", flow, Flags::Syn), old);
        assert_eq!(lb.tcp_to("web4", flow, Flags::Ack), old);
        assert_eq!(lb.tcp_to("web4", embryo, Flags::Syn), old);
        let id = lb.service("web4").find_server(old).unwrap().id;
        lb.change(|s| s.remove_server("web4", old));

        // Servers come and go on another VIP, in batches (each change waits for an RCU grace
        // period), until every other id of the 4096 has been handed out once; then ids come
        // back first-freed first, so the next server added gets the freed one. (The churn uses
        // addresses with no route, whose neighbour warm-up fails at once.)
        let mut next_fresh = 0;
        while next_fresh < weir_common::l4::MAX_SERVERS {
            let batch = (weir_common::l4::MAX_SERVERS - next_fresh).min(250);
            let passers: Vec<SocketAddr> = (1..=batch)
                .map(|i| SocketAddr::new(IpAddr::from([198, 19, 0, i as u8]), 80))
                .collect();
            lb.change(|s| {
                passers
                    .iter()
                    .try_for_each(|&p| s.add_server("churn", p, 100))
            });
            let churn = lb.service("churn");
            let ids = passers.iter().map(|&p| churn.find_server(p).unwrap().id);
            next_fresh = ids.max().unwrap() + 1;
            lb.change(|s| {
                passers
                    .iter()
                    .try_for_each(|&p| s.remove_server("churn", p))
            });
        }
        let newcomer = addr("198.18.1.10:80");
        lb.change(|s| s.add_server("churn", newcomer, 100));
        assert_eq!(lb.service("churn").find_server(newcomer).unwrap().id, id);
        let slot = lb.datapath.maps().server(id).unwrap();
        assert_eq!(
            slot.socket_addr(),
            newcomer,
            "the newcomer holds the old id"
        );
        // ... and starts with zero counters, not the three packets its predecessor was sent.
        assert_eq!(
            lb.datapath.maps().server_traffic(id).unwrap(),
            Default::default(),
            "the newcomer inherited its predecessor's counters"
        );

        // The old flows' next packets pick afresh among web4's servers: neither reaches the
        // newcomer that holds their server's id now.
        for client in [flow, embryo] {
            let (action, out) = lb.run(lb.up, &tcp(IN, client, vip, 64, Flags::Ack));
            assert_eq!(action, Fate::Redirect);
            let to = destination(&out);
            assert_ne!(to, newcomer, "{client}'s flow went to the id's new holder");
            assert_eq!(to, addr("198.18.1.10:8080"), "re-picked in web4's pool");
        }
    });
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn a_reused_vip_id_starts_from_zero_and_live_ones_keep_their_counters() {
    in_bed("vipid", || {
        let mut lb = Balancer::new();
        // Traffic through the last VIP of the config, whose id is the highest.
        let churn = lb.service("churn").clone();
        lb.tcp_to("churn", client(49000), Flags::Syn);
        lb.tcp_to("web4", client(49001), Flags::Syn);
        let counted = |lb: &Balancer, services: &L4Services, name: &str| {
            vip_traffic(&lb.datapath, services, name).packets
        };
        assert_eq!(counted(&lb, &lb.services, "churn"), 1);
        // A reload that drops it and brings in another VIP, which gets the freed id.
        let source = CONFIG
            .replace("name = \"churn\"", "name = \"fresh\"")
            .replace("198.18.100.35", "198.18.100.36");
        let config = Config::parse("packets.toml".as_ref(), &source).unwrap();
        let state = lb.services.runtime_state();
        let next = L4Services::plan(&config, Some(&state)).unwrap();
        next.sync(lb.datapath.maps_mut(), Some(&lb.services))
            .unwrap();
        let fresh = next.service("fresh").unwrap().id;
        assert_eq!(fresh, churn.id, "the new VIP holds the freed id");
        assert_eq!(
            counted(&lb, &next, "fresh"),
            0,
            "the new VIP inherited the old one's counters"
        );
        assert_eq!(
            counted(&lb, &next, "web4"),
            1,
            "a VIP that stays keeps its counters"
        );
        // A restarted daemon (no previous model: it reads what the maps hold) keeps them too.
        let restarted = L4Services::plan(&config, Some(&next.runtime_state())).unwrap();
        restarted.sync(lb.datapath.maps_mut(), None).unwrap();
        assert_eq!(
            counted(&lb, &restarted, "web4"),
            1,
            "a restart cleared a live VIP's counters"
        );
    });
}

/// The flow events (`weir_common::edge::Event`) so far, by event.
fn events(lb: &Balancer) -> std::collections::HashMap<Event, u64> {
    lb.datapath.maps().events().unwrap().into_iter().collect()
}

/// How much each event moved between two readings.
fn moved(before: &std::collections::HashMap<Event, u64>, lb: &Balancer, event: Event) -> u64 {
    events(lb)[&event] - before[&event]
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn embryonic_flows_are_promoted_by_the_handshake_and_a_syn_flood_evicts_no_flow() {
    in_bed("embryo", || {
        let mut lb = Balancer::new();
        let service = lb.service("web4").clone();
        let flow = client(45000);
        let server = lb.predicted_server("web4", flow);
        let before = events(&lb);

        // A SYN leaves an embryonic flow only: its server has no active flow yet.
        assert_eq!(lb.tcp_to("web4", flow, Flags::Syn), server);
        assert!(lb.datapath.maps().flow(&service.flow_key(flow)).is_none());
        assert_eq!(flow_tables(&lb), (0, 1));
        assert_eq!(moved(&before, &lb, Event::EmbryonicCreated), 1);
        // Its retransmit and the handshake's ACK follow it, even to a server drained since.
        lb.change(|s| s.set_state("web4", server, AdminState::Draining));
        assert_eq!(lb.tcp_to("web4", flow, Flags::Syn), server);
        assert_eq!(
            flow_tables(&lb),
            (0, 1),
            "a retransmitted SYN proves nothing"
        );
        assert_eq!(lb.tcp_to("web4", flow, Flags::Ack), server);
        assert_eq!(
            lb.datapath
                .maps()
                .flow(&service.flow_key(flow))
                .map(|f| f.server),
            service.find_server(server).map(|s| s.id),
            "the ACK promotes the flow, pinned to the SYN's server"
        );
        assert_eq!(flow_tables(&lb), (1, 0));
        assert_eq!(moved(&before, &lb, Event::EmbryonicPromoted), 1);
        lb.change(|s| s.set_state("web4", server, AdminState::Ready));

        // 200 established flows, then a flood of 20 000 spoofed SYNs from 20 000 sources: five
        // times the embryonic table (4096 here). Every SYN is forwarded; no established flow
        // is evicted, and the embryonic table stays within its size.
        let established: Vec<(SocketAddr, SocketAddr)> = (46000..46200)
            .map(|port| {
                let to = lb.tcp_to("web4", client(port), Flags::Syn);
                assert_eq!(lb.tcp_to("web4", client(port), Flags::Ack), to);
                (client(port), to)
            })
            .collect();
        for i in 0..20_000u32 {
            let source = SocketAddr::new(
                IpAddr::from([198, 18, 2 + (i / 250 % 200) as u8, 1 + (i % 250) as u8]),
                1024 + (i % 60_000) as u16,
            );
            let (action, _) = lb.run(lb.up, &tcp(IN, source, service.address, 64, Flags::Syn));
            assert_eq!(action, Fate::Redirect, "flood SYN {i}");
        }
        let (flows, embryonic) = flow_tables(&lb);
        assert_eq!(flows, 201, "established flows after the flood");
        assert!(embryonic <= 4096, "{embryonic} embryonic entries");
        for (client, server) in &established {
            let state = lb.datapath.maps().flow(&service.flow_key(*client));
            assert_eq!(
                state.map(|f| f.server),
                service.find_server(*server).map(|s| s.id),
                "established flow {client} evicted by the flood"
            );
            assert_eq!(lb.tcp_to("web4", *client, Flags::Ack), *server);
        }
    });
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn the_flood_guard_keeps_flows_embryonic_past_its_budget() {
    in_bed("guard", || {
        // One CPU, so one per-CPU window counts every packet of the test.
        let mut cpus = nix::sched::CpuSet::new();
        cpus.set(0).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
        let mut lb = Balancer::new();
        lb.datapath
            .maps_mut()
            .set_edge_settings(EdgeSettings {
                embryonic_idle_ns: 0,
                flows_per_cpu_per_sec: 3,
                _pad: 0,
            })
            .unwrap();
        let service = lb.service("web4").clone();
        let before = events(&lb);
        // Ten ACKs of flows the table does not have (picked up mid-stream): each is forwarded
        // to the server Maglev gives it, three are recorded, seven stay embryonic.
        let clients: Vec<SocketAddr> = (47000..47010).map(client).collect();
        for flow in &clients {
            let expected = lb.predicted_server("web4", *flow);
            assert_eq!(lb.tcp_to("web4", *flow, Flags::Ack), expected);
        }
        assert_eq!(flow_tables(&lb), (3, 7));
        assert_eq!(moved(&before, &lb, Event::FloodDeferred), 7);
        // The next second has room again: a deferred flow's next packet promotes it.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let deferred = clients
            .iter()
            .find(|c| lb.datapath.maps().flow(&service.flow_key(**c)).is_none())
            .unwrap();
        lb.tcp_to("web4", *deferred, Flags::Ack);
        assert_eq!(flow_tables(&lb), (4, 6));
        assert_eq!(moved(&before, &lb, Event::EmbryonicPromoted), 1);
    });
}

/// (flow-table entries, embryonic entries) of the datapath: what hostile packets must not add.
fn flow_tables(lb: &Balancer) -> (usize, usize) {
    let flows = lb
        .datapath
        .maps()
        .active_flows(|_| u64::MAX)
        .unwrap()
        .per_server
        .values()
        .sum();
    (flows, lb.datapath.maps().embryonic_flows(u64::MAX))
}

/// Recomputes the TCP checksum of an IPv4 frame.
fn fix_tcp_checksum(packet: &mut [u8]) {
    let check = {
        let sliced = etherparse::SlicedPacket::from_ethernet(packet).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ipv4)) = &sliced.net else {
            panic!("IPv4")
        };
        let Some(etherparse::TransportSlice::Tcp(tcp_slice)) = &sliced.transport else {
            panic!("TCP")
        };
        tcp_slice
            .to_header()
            .calc_checksum_ipv4(&ipv4.header().to_header(), tcp_slice.payload())
            .unwrap()
    };
    packet[34 + 16..34 + 18].copy_from_slice(&check.to_be_bytes());
}

/// One `BPF_PROG_TEST_RUN` of `program` on `packet` with context `ctx`: its return value and
/// the packet after it.
fn test_run<P>(program: &P, packet: &[u8], ctx: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(ctx),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test_run of {} bytes: {e}", packet.len()));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Whether `frame` is long enough for the IP header its ethertype announces (any length
/// beyond Ethernet for other ethertypes).
fn holds_ip_header(frame: &[u8]) -> bool {
    let needed = match frame.get(12..14) {
        Some([0x08, 0x00]) => ETH_HLEN + 20,
        Some([0x86, 0xdd]) => ETH_HLEN + 40,
        _ => ETH_HLEN + 1,
    };
    frame.len() >= needed
}

/// The ingress pipeline on mutated frames — fuzzing through `BPF_PROG_TEST_RUN` — for
/// `WEIR_XDP_FUZZ_SECONDS` (3 s by default; `cargo xtask fuzz` gives it longer), from a seed
/// that is printed and can be replayed with `WEIR_XDP_FUZZ_SEED`. Valid frames of every kind
/// the table above uses are mutated (bits, bytes, lengths, addresses, flags; half of them
/// with their checksums made right again, to reach past the checks). Whatever comes in:
/// - exactly one verdict counter moves, by one packet and the frame's length — but for the
///   one documented exception (`ebpf/src/flow.rs`, `may_answer_embryonic`): a server's
///   segment other than a SYN-ACK or RST that an embryonic NAT flow answers for, counted
///   `pass_not_vip` by XDP and under its verdict (`return_nat`, or a drop) by TC;
/// - only a frame for a VIP, or from a server, leaves rewritten (XDP_TX or a redirect);
/// - what leaves has its lengths within the frame, MACs the bed knows, and valid IP and
///   transport checksums where the frame that came in had them (DSR forwards a segment
///   untouched, and a NAT rewrite updates a checksum incrementally, so a wrong one stays
///   wrong, which is right).
#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn mutated_frames_keep_the_datapath_invariants() {
    let seconds: u64 = std::env::var("WEIR_XDP_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("WEIR_XDP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("XDP fuzz: seed {seed} (WEIR_XDP_FUZZ_SEED replays it), {seconds} s");
    in_bed("xfuzz", || {
        let lb = Balancer::new();
        let seeds = fuzz_seeds(&lb);
        let vips: Vec<IpAddr> = lb.services.services().map(|s| s.address.ip()).collect();
        let servers: Vec<IpAddr> = lb
            .services
            .services()
            .flat_map(|s| s.servers.iter().map(|server| server.address.ip()))
            .collect();
        let mut rng = fastrand::Rng::with_seed(seed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        let (mut runs, mut forwarded) = (0u64, 0u64);
        while std::time::Instant::now() < deadline && runs < 10_000_000 {
            let frame = mutate(&mut rng, &seeds, &vips, &servers);
            let ifindex = if rng.bool() { lb.up } else { lb.down };
            let before = lb.counters();
            let (fate, out) = lb.run(ifindex, &frame);
            let after = lb.counters();
            let failed = |what: String| -> ! {
                panic!(
                    "seed {seed}, run {runs}: {what}\n  in  ({} on {}): {}\n  out ({fate:?}): {}",
                    frame.len(),
                    if ifindex == lb.up { UPLINK } else { DOWNLINK },
                    hex(&frame),
                    hex(&out)
                )
            };
            let moved: Vec<(&str, u64, u64)> = Stat::ALL
                .iter()
                .map(|stat| {
                    let i = *stat as usize;
                    (
                        stat.name(),
                        after[i].packets - before[i].packets,
                        after[i].bytes - before[i].bytes,
                    )
                })
                .filter(|&(_, packets, bytes)| packets > 0 || bytes > 0)
                .collect();
            let documented_double = moved.len() == 2
                && moved.iter().any(|m| m.0 == "pass_not_vip" && m.1 == 1)
                && tcp_flags_of(&frame).is_some_and(|f| f & 0x12 != 0x12 && f & 0x04 == 0);
            let once = moved.len() == 1 && moved[0].1 == 1 && moved[0].2 == frame.len() as u64;
            if !once && !documented_double {
                failed(format!("counters moved: {moved:?}"));
            }
            if matches!(fate, Fate::Bounce | Fate::Redirect) {
                forwarded += 1;
                let (src, dst) = ip_addresses(&frame)
                    .unwrap_or_else(|| failed("forwarded a frame without IP".into()));
                if !vips.contains(&dst) && !servers.contains(&src) {
                    failed(format!(
                        "forwarded {src} → {dst}: neither for a VIP nor from a server"
                    ));
                }
                if let Err(why) = well_formed(&frame, &out) {
                    failed(format!("forwarded frame: {why}"));
                }
            }
            runs += 1;
        }
        println!("XDP fuzz: {runs} frames, {forwarded} forwarded, every invariant held");
        assert!(runs >= 100, "only {runs} frames in {seconds} s");
    });
}

/// Valid frames of every kind the datapath handles, to mutate.
fn fuzz_seeds(lb: &Balancer) -> Vec<Vec<u8>> {
    let client4 = addr("198.18.0.1:40000");
    let client6 = addr("[fd00::1]:40000");
    let mut seeds = vec![arp_request()];
    for (vip, client) in [("web4", client4), ("web6", client6)] {
        seeds.extend(
            nat_round_trip(lb, vip, client, false)
                .into_iter()
                .map(|c| c.packet),
        );
    }
    for (vip, client) in [("dns4", client4), ("dns6", client6)] {
        seeds.extend(
            nat_round_trip(lb, vip, client, true)
                .into_iter()
                .map(|c| c.packet),
        );
    }
    seeds.push(dsr(lb, "dsr4", client4, false).packet);
    seeds.push(dsr(lb, "dsr6", client6, true).packet);
    seeds.push(icmp_error(lb, "web4", client4, "198.18.0.254".parse().unwrap()).packet);
    seeds.push(icmp_error(lb, "web6", client6, "fd00::fe".parse().unwrap()).packet);
    seeds.push(tcp(IN, client4, addr("198.18.0.2:22"), 64, Flags::Syn));
    seeds
}

/// One mutated frame: a seed with one to four changes, and half the time its checksums
/// recomputed so the frame gets past them.
fn mutate(
    rng: &mut fastrand::Rng,
    seeds: &[Vec<u8>],
    vips: &[IpAddr],
    servers: &[IpAddr],
) -> Vec<u8> {
    let mut frame = seeds[rng.usize(..seeds.len())].clone();
    let ip_at = ETH_HLEN;
    for _ in 0..rng.usize(1..=4) {
        match rng.u8(..8) {
            0 if !frame.is_empty() => {
                let at = rng.usize(..frame.len());
                frame[at] ^= 1 << rng.u8(..8);
            }
            1 if !frame.is_empty() => {
                let at = rng.usize(..frame.len());
                frame[at] = [0, 0xff, 0x7f, 0x80, rng.u8(..)][rng.usize(..5)];
            }
            // Never below an Ethernet header: no NIC delivers less, and the kernel's test
            // run refuses it.
            2 => frame.truncate(rng.usize(ETH_HLEN.min(frame.len())..=frame.len())),
            3 => frame.extend((0..rng.usize(1..64)).map(|_| rng.u8(..))),
            4 | 5 if frame.len() > ip_at + 40 => {
                // An address: a VIP, a server, the bed's own, a martian or random.
                let v4 = frame[12..14] == [0x08, 0x00];
                let candidates: Vec<IpAddr> = vips
                    .iter()
                    .chain(servers)
                    .copied()
                    .chain(
                        [
                            "198.18.0.2",
                            "127.0.0.1",
                            "255.255.255.255",
                            "0.0.0.0",
                            "224.0.0.1",
                            "fd00::2",
                            "::1",
                            "ff02::1",
                        ]
                        .map(|a| a.parse().unwrap()),
                    )
                    .collect();
                let pick = candidates[rng.usize(..candidates.len())];
                let (offset, bytes) = match (v4, pick) {
                    (true, IpAddr::V4(a)) => {
                        (if rng.bool() { 12 } else { 16 }, a.octets().to_vec())
                    }
                    (false, IpAddr::V6(a)) => {
                        (if rng.bool() { 8 } else { 24 }, a.octets().to_vec())
                    }
                    _ => continue,
                };
                frame[ip_at + offset..ip_at + offset + bytes.len()].copy_from_slice(&bytes);
            }
            6 if frame.len() > ip_at + 40 => {
                // Transport flags and ports (past a 20- or 40-byte IP header).
                let l4 = ip_at
                    + if frame[12..14] == [0x08, 0x00] {
                        20
                    } else {
                        40
                    };
                if let Some(byte) = frame.get_mut(l4 + 13) {
                    *byte = rng.u8(..);
                }
                if rng.bool() && frame.len() > l4 + 4 {
                    let port = [53u16, 80, 8080, 5353, 0, rng.u16(..)][rng.usize(..6)];
                    let at = l4 + if rng.bool() { 0 } else { 2 };
                    frame[at..at + 2].copy_from_slice(&port.to_be_bytes());
                }
            }
            _ => {
                // The IP length field or TTL/hop limit.
                if frame.len() > ip_at + 9 {
                    if frame[12..14] == [0x08, 0x00] {
                        if rng.bool() {
                            frame[ip_at + 8] = rng.u8(..3);
                        } else {
                            frame[ip_at + 2..ip_at + 4].copy_from_slice(&rng.u16(..).to_be_bytes());
                        }
                    } else if rng.bool() {
                        frame[ip_at + 7] = rng.u8(..3);
                    } else {
                        frame[ip_at + 4..ip_at + 6].copy_from_slice(&rng.u16(..).to_be_bytes());
                    }
                }
            }
        }
    }
    if rng.bool() {
        fix_checksums(&mut frame);
    }
    frame
}

/// The TCP flags of a frame with a plain IPv4 or IPv6 header, if it is TCP.
fn tcp_flags_of(frame: &[u8]) -> Option<u8> {
    let (_, protocol, range, _) = segment(frame)?;
    (protocol == 6).then(|| frame.get(range.start + 13).copied())?
}

/// The IP source and destination of a frame, if it holds an IP header.
fn ip_addresses(frame: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let ip = frame.get(ETH_HLEN..)?;
    match frame.get(12..14)? {
        [0x08, 0x00] if ip.len() >= 20 => {
            let a = |at: usize| IpAddr::from(<[u8; 4]>::try_from(&ip[at..at + 4]).unwrap());
            Some((a(12), a(16)))
        }
        [0x86, 0xdd] if ip.len() >= 40 => {
            let a = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap());
            Some((a(8), a(24)))
        }
        _ => None,
    }
}

/// The ones'-complement sum of `bytes` (RFC 1071), folded, starting from `sum`.
fn ones_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Where a frame's IP header and transport segment are: (IP header length, protocol, segment,
/// pseudo-header sum), when both fit in the frame as its IP lengths say and it is no fragment.
fn segment(frame: &[u8]) -> Option<(usize, u8, std::ops::Range<usize>, u32)> {
    let ip = frame.get(ETH_HLEN..)?;
    match frame.get(12..14)? {
        [0x08, 0x00] if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            if ihl < 20 || total < ihl || total > ip.len() || fragment {
                return None;
            }
            let length = (total - ihl) as u32;
            let pseudo = ones_sum(u32::from(ip[9]) + length, &ip[12..20]);
            Some((ihl, ip[9], ETH_HLEN + ihl..ETH_HLEN + total, pseudo))
        }
        [0x86, 0xdd] if ip.len() >= 40 => {
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + payload > ip.len() {
                return None;
            }
            let pseudo = ones_sum(u32::from(ip[6]) + payload as u32, &ip[8..40]);
            Some((40, ip[6], ETH_HLEN + 40..ETH_HLEN + 40 + payload, pseudo))
        }
        _ => None,
    }
}

/// The checksum field's offset in a segment of `protocol`, and whether the pseudo-header
/// counts.
fn checksum_field(protocol: u8, v4: bool) -> Option<(usize, bool)> {
    match protocol {
        6 => Some((16, true)),
        17 => Some((6, true)),
        1 if v4 => Some((2, false)),
        58 if !v4 => Some((2, true)),
        _ => None,
    }
}

/// Makes a frame's IPv4 header checksum and transport checksum right, where they fit.
fn fix_checksums(frame: &mut [u8]) {
    let v4 = frame.get(12..14) == Some(&[0x08, 0x00]);
    if v4 && frame.len() >= ETH_HLEN + 20 {
        let ihl = (usize::from(frame[ETH_HLEN] & 0x0f) * 4).max(20);
        if frame.len() >= ETH_HLEN + ihl {
            frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
            let sum = !(ones_sum(0, &frame[ETH_HLEN..ETH_HLEN + ihl]) as u16);
            frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
        }
    }
    let Some((_, protocol, range, pseudo)) = segment(frame) else {
        return;
    };
    let Some((at, with_pseudo)) = checksum_field(protocol, v4) else {
        return;
    };
    if range.len() < at + 2 {
        return;
    }
    frame[range.start + at..range.start + at + 2].fill(0);
    let start = if with_pseudo { pseudo } else { 0 };
    let sum = !(ones_sum(start, &frame[range.clone()]) as u16);
    frame[range.start + at..range.start + at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Whether the IPv4 header checksum and the transport checksum of a frame are valid (`None`
/// where the frame has no such checksum, or it does not fit).
fn checksums_valid(frame: &[u8]) -> (Option<bool>, Option<bool>) {
    let v4 = frame.get(12..14) == Some(&[0x08, 0x00]);
    let Some((ihl, protocol, range, pseudo)) = segment(frame) else {
        return (None, None);
    };
    let ip = v4.then(|| ones_sum(0, &frame[ETH_HLEN..ETH_HLEN + ihl]) == 0xffff);
    let transport = checksum_field(protocol, v4).and_then(|(at, with_pseudo)| {
        let unset =
            protocol == 17 && v4 && frame.get(range.start + 6..range.start + 8) == Some(&[0, 0]);
        let start = if with_pseudo { pseudo } else { 0 };
        (range.len() >= at + 2 && !unset).then(|| ones_sum(start, &frame[range]) == 0xffff)
    });
    (ip, transport)
}

/// Whether a frame that leaves (`out`, from `frame`) is sound: MACs the bed knows, IP
/// lengths within the frame, and every checksum that was valid coming in valid going out.
fn well_formed(frame: &[u8], out: &[u8]) -> Result<(), String> {
    let known_dst = [CLIENT_MAC, server_mac(0), server_mac(1), server_mac(2)];
    if !known_dst.iter().any(|mac| out.get(..6) == Some(mac)) {
        return Err("destination MAC not a neighbour of the bed".into());
    }
    if ![UPLINK_MAC, DOWNLINK_MAC]
        .iter()
        .any(|mac| out.get(6..12) == Some(mac))
    {
        return Err("source MAC not the bed's".into());
    }
    if segment(out).is_none() {
        return Err("IP lengths beyond the frame".into());
    }
    let (ip_in, transport_in) = checksums_valid(frame);
    let (ip_out, transport_out) = checksums_valid(out);
    if ip_in == Some(true) && ip_out != Some(true) {
        return Err("IPv4 header checksum broken".into());
    }
    if transport_in == Some(true) && transport_out != Some(true) {
        return Err("transport checksum broken".into());
    }
    Ok(())
}

/// Three TCP service keys on 198.18.100.40–42 whose VIP index slots are the same.
fn keys_sharing_an_index_slot() -> [SocketAddr; 3] {
    let key = |host: u8, port: u16| {
        let address = SocketAddr::new(IpAddr::from([198, 18, 100, host]), port);
        (address, VipKey::new(address, PROTO_TCP).index_slot())
    };
    let (first, slot) = key(40, 80);
    let sharing = |host| {
        (1..=u16::MAX)
            .map(|port| key(host, port))
            .find(|&(_, other)| other == slot)
            .expect("a 16-bit slot is shared by some port of every address")
            .0
    };
    [first, sharing(41), sharing(42)]
}

#[test]
#[ignore = "needs root: loads the XDP program and creates a network namespace"]
fn vips_sharing_an_index_slot_are_all_found_and_other_keys_there_are_not() {
    in_bed("vipindex", || {
        let mut lb = Balancer::new();
        let [a, b, host] = keys_sharing_an_index_slot();
        let vip = |name: &str, address: SocketAddr| {
            format!(
                "\n[[l4_vip]]\nname = \"{name}\"\naddress = \"{}\"\nport = {}\nprotocol = \"tcp\"\n\
                 servers = [{{ address = \"198.18.1.10:8080\" }}]\n",
                address.ip(),
                address.port()
            )
        };
        let reload = |lb: &mut Balancer, source: String, restart: bool| {
            let config = Config::parse("packets.toml".as_ref(), &source).unwrap();
            let state = lb.services.runtime_state();
            let next = L4Services::plan(&config, Some(&state)).unwrap();
            let old = (!restart).then_some(&lb.services);
            next.sync(lb.datapath.maps_mut(), old).unwrap();
            lb.services = next;
        };
        let to = |lb: &Balancer, address: SocketAddr, port: u16| {
            lb.run(lb.up, &tcp(IN, client(port), address, 64, Flags::Syn))
        };
        let forwarded = |lb: &Balancer, address: SocketAddr, port: u16| {
            let (fate, out) = to(lb, address, port);
            assert_eq!(fate, Fate::Redirect, "{address} is a VIP: forwarded");
            assert_eq!(destination(&out), addr("198.18.1.10:8080"));
        };
        let passed = |lb: &Balancer, address: SocketAddr, port: u16| {
            let packet = tcp(IN, client(port), address, 64, Flags::Syn);
            lb.check(&untouched(
                &format!("{address} is not a VIP, though its index slot holds one"),
                lb.up,
                packet,
                Fate::Pass,
                Stat::PassNotVip,
            ));
        };

        // Two VIPs in one slot: both balanced; a third key there is host traffic.
        reload(
            &mut lb,
            format!("{CONFIG}{}{}", vip("a", a), vip("b", b)),
            false,
        );
        forwarded(&lb, a, 50000);
        forwarded(&lb, b, 50001);
        passed(&lb, host, 50002);
        let slot = VipKey::new(a, PROTO_TCP).index_slot();
        let index = |lb: &Balancer| lb.datapath.maps().vip_index_entry(slot).unwrap();
        assert_eq!(index(&lb), VIP_INDEX_SHARED);
        // One of them removed: the other is still found, the removed one no longer, and the
        // slot names the one left again (no hash lookup for it).
        reload(&mut lb, format!("{CONFIG}{}", vip("b", b)), false);
        forwarded(&lb, b, 50003);
        passed(&lb, a, 50004);
        passed(&lb, host, 50005);
        let b_id = lb
            .datapath
            .maps()
            .vip(&VipKey::new(b, PROTO_TCP))
            .unwrap()
            .unwrap()
            .id;
        assert_eq!(u32::from(index(&lb)), b_id + 1, "the slot is b's alone");
        // A restarted daemon rebuilds the index from the VIP map: the same answers.
        reload(&mut lb, format!("{CONFIG}{}", vip("b", b)), true);
        forwarded(&lb, b, 50006);
        passed(&lb, a, 50007);
        // The slot held by one VIP alone, then by none.
        reload(&mut lb, format!("{CONFIG}{}", vip("a", a)), false);
        forwarded(&lb, a, 50008);
        passed(&lb, b, 50009);
        reload(&mut lb, CONFIG.to_string(), false);
        passed(&lb, a, 50010);
        assert_eq!(index(&lb), VIP_INDEX_EMPTY);
        // Three in the slot, one removed: still shared by the two left.
        let three = format!("{CONFIG}{}{}{}", vip("a", a), vip("b", b), vip("c", host));
        reload(&mut lb, three, false);
        reload(
            &mut lb,
            format!("{CONFIG}{}{}", vip("a", a), vip("c", host)),
            false,
        );
        assert_eq!(index(&lb), VIP_INDEX_SHARED);
        forwarded(&lb, a, 50011);
        forwarded(&lb, host, 50012);
        passed(&lb, b, 50013);
    });
}
