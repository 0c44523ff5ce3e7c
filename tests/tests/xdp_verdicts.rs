//! Packet tests of the XDP program through BPF_PROG_TEST_RUN, in the style of Katran's
//! fixtures: a table of input packet → expected action → expected output packet, plus the
//! counter each packet must be accounted under. Packets are built with `etherparse`, an
//! implementation independent of the program under test.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use weir_common::{Counter, Stat, names};
use weir_forwarder::datapath::EBPF_OBJECT;

const XDP_PASS: u32 = 2;

struct Case {
    name: &'static str,
    packet: Vec<u8>,
    action: u32,
    /// `None`: the packet must come out unchanged.
    output: Option<Vec<u8>>,
    stat: Stat,
}

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const BALANCER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

fn ipv4_tcp() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, BALANCER_MAC)
        .ipv4([198, 18, 0, 1], [198, 18, 1, 11], 64)
        .tcp(40000, 8080, 1, 64240)
        .syn();
    let mut packet = Vec::new();
    builder.write(&mut packet, b"").unwrap();
    packet
}

fn ipv6_udp() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, BALANCER_MAC)
        .ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
        .udp(40000, 53);
    let mut packet = Vec::new();
    builder.write(&mut packet, b"query").unwrap();
    packet
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

fn cases() -> Vec<Case> {
    let pass = |name, packet, stat| Case {
        name,
        packet,
        action: XDP_PASS,
        output: None,
        stat,
    };
    vec![
        pass("arp is not ip", arp_request(), Stat::PassNotIp),
        pass("ipv4 tcp to a non-vip", ipv4_tcp(), Stat::PassNotVip),
        pass("ipv6 udp to a non-vip", ipv6_udp(), Stat::PassNotVip),
        pass(
            "ipv4 header cut short",
            ipv4_tcp()[..14 + 19].to_vec(),
            Stat::PassMalformed,
        ),
        pass(
            "ipv6 header cut short",
            ipv6_udp()[..14 + 39].to_vec(),
            Stat::PassMalformed,
        ),
        pass(
            "ethernet header only",
            ipv4_tcp()[..14].to_vec(),
            Stat::PassMalformed,
        ),
    ]
}

fn totals(stats: &PerCpuArray<&aya::maps::MapData, Counter>) -> Vec<Counter> {
    Stat::ALL
        .iter()
        .map(|&stat| {
            let mut total = Counter::default();
            for counter in stats.get(&(stat as u32), 0).unwrap().iter() {
                total.merge(counter);
            }
            total
        })
        .collect()
}

#[test]
#[ignore = "needs root: loads an eBPF program (BPF_PROG_TEST_RUN)"]
fn verdicts_outputs_and_counters_match_the_table() {
    let mut ebpf = Ebpf::load(EBPF_OBJECT).expect("load object");
    let program: &mut Xdp = ebpf
        .program_mut(names::XDP_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    program.load().expect("verifier accepts the program");
    let program: &Xdp = ebpf
        .program(names::XDP_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let stats: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(ebpf.map(names::STATS_MAP).unwrap()).unwrap();

    for case in cases() {
        let before = totals(&stats);
        let mut out = vec![0u8; case.packet.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&case.packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{}: test_run: {e}", case.name));
        assert_eq!(result.return_value, case.action, "{}: action", case.name);
        let out = &out[..result.data_size_out as usize];
        let expected = case.output.as_deref().unwrap_or(&case.packet);
        assert_eq!(out, expected, "{}: output packet", case.name);

        let after = totals(&stats);
        for stat in Stat::ALL {
            let i = stat as usize;
            let (packets, bytes) = if stat == case.stat {
                (1, case.packet.len() as u64)
            } else {
                (0, 0)
            };
            assert_eq!(
                after[i].packets - before[i].packets,
                packets,
                "{}: {} packets",
                case.name,
                stat.name()
            );
            assert_eq!(
                after[i].bytes - before[i].bytes,
                bytes,
                "{}: {} bytes",
                case.name,
                stat.name()
            );
        }
    }
}
