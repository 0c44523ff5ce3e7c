//! ns/packet of the XDP program through `BPF_PROG_TEST_RUN`, next to trivial programs.
//!
//! Runs in a [`PacketBed`] namespace (the FIB lookups need its routes and neighbours), with the
//! real program and maps loaded by [`Datapath`] and the services written by [`L4Services`].
//! The kernel times `repeat` runs of the program on one packet and reports the mean.
//!
//! Two ways to run, because the program rewrites packets:
//! - **repeated**: the kernel runs the program `repeat` times on one buffer and reports the
//!   mean. Each run sees what the previous one wrote, so this is valid only for paths that
//!   leave the addresses alone: the floor, a passed packet, DSR (only MACs change, so every
//!   run is the same established flow).
//! - **per call**: one run per `BPF_PROG_TEST_RUN` call, each on a fresh packet, averaged over
//!   many calls. The kernel times the run itself (not the syscall), so the figure compares
//!   with a trivial program measured the same way. NAT needs this (it rewrites the
//!   destination), and so do new flows, which need a different 5-tuple every time.
//!   (Live-frames mode does not help: it reuses frames without restoring their bytes.)
//!
//! Each case checks that the counter of its verdict moved once per run: a benchmark of the
//! wrong path fails instead of reporting. Repetitions are rounds of every case in turn, so a
//! case and the reference it is divided by are measured side by side.
//!
//! The bed is two-armed (clients on the uplink, servers on the downlink), so a forwarded
//! packet is redirected through the device map; the "one-armed" cases send the same packets
//! in on the downlink, as a balancer with clients and servers behind one interface sees them,
//! and they leave with XDP_TX — the action the reference programs return.

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::{PacketBuilder, TcpHeader};
use serde::Serialize;
use weir_common::{Stat, names};
use weir_config::Config;
use weir_forwarder::{
    datapath::{self, Datapath, DatapathOptions},
    l4::L4Services,
};
use weir_tests::packet_bed::{CLIENT_MAC, DOWNLINK, PacketBed, UPLINK, UPLINK_MAC, xdp_context};

use crate::stats::Sample;

/// The services the cases hit: a NAT and a DSR VIP per family, two servers each.
const CONFIG: &str = r#"
[datapath]
hash_seed = 7

[[l4_vip]]
name = "nat4"
address = "198.18.100.10"
port = 80
protocol = "tcp"
servers = [{ address = "198.18.1.10:8080" }, { address = "198.18.1.11:8080" }]

[[l4_vip]]
name = "dsr4"
address = "198.18.100.20"
port = 80
protocol = "tcp"
mode = "dsr"
servers = [{ address = "198.18.1.10:80" }, { address = "198.18.1.11:80" }]

[[l4_vip]]
name = "nat6"
address = "fd00:100::10"
port = 80
protocol = "tcp"
servers = [{ address = "[fd00:1::10]:8080" }, { address = "[fd00:1::11]:8080" }]

[[l4_vip]]
name = "dsr6"
address = "fd00:100::20"
port = 80
protocol = "tcp"
mode = "dsr"
servers = [{ address = "[fd00:1::10]:80" }, { address = "[fd00:1::11]:80" }]
"#;

/// How a case is run (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Repeated,
    PerCall,
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct XdpResult {
    pub case: String,
    pub mode: Mode,
    /// The floor case this one is compared with (its own name for a floor).
    pub floor: String,
    /// The "parse + one flow lookup" reference this case is also compared with, measured the
    /// same way (established hits: the issue's target is ≤ 1.3× of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// For a hit that leaves through the device map (two-armed): the same reference ending in
    /// that redirect, the like-for-like comparison next to the one above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_reference: Option<String>,
    /// ns/packet, one value per repetition.
    pub ns_per_packet: Sample,
}

/// What an operator's weight change costs the datapath: the Maglev table rebuilt and switched
/// in (`L4Services::set_weight` then `sync`), in ms, one value per change.
#[derive(Debug, Clone, Serialize)]
pub struct TableSwitch {
    pub slots: u32,
    pub ms: Sample,
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct XdpBench {
    /// Program runs per measurement.
    pub runs: u32,
    /// Measurements per case.
    pub repetitions: usize,
}

/// `xdp_action::XDP_TX` and `XDP_REDIRECT` (uapi `linux/bpf.h`).
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// Which program a case runs.
enum Program {
    Balancer,
    FloorPass,
    FloorTx,
    /// Parse and one flow-table lookup (`weir_floor_flow_lookup`).
    FlowLookup,
    /// The same ending in a device-map redirect (`weir_floor_flow_lookup_redirect`).
    FlowLookupRedirect,
}

/// Where a case's packets arrive. The bed is two-armed (clients on the uplink, servers on the
/// downlink), so a forwarded packet is redirected to the other interface. A packet arriving
/// on the downlink is what a one-armed balancer sees — clients and servers behind one
/// interface — and leaves with XDP_TX, the action the reference programs return.
#[derive(Clone, Copy)]
enum Ingress {
    Uplink,
    Downlink,
}

/// Which packets a case sends.
enum Packets {
    /// The same packet every run.
    Same(Vec<u8>),
    /// A new client port (and address, every 60000) every run: a new flow each time.
    NewFlows { dst: SocketAddr },
    /// A new flow's SYN (not measured), then its handshake ACK (measured): what promoting an
    /// embryonic flow to the flow table costs.
    Handshakes { dst: SocketAddr },
}

struct Case {
    name: &'static str,
    program: Program,
    mode: Mode,
    packets: Packets,
    /// The interface the packets arrive on.
    ingress: Ingress,
    /// Counter that must move once per measured packet (`None` for the trivial programs).
    stat: Option<Stat>,
    floor: &'static str,
    reference: Option<&'static str>,
    redirect_reference: Option<&'static str>,
}

impl XdpBench {
    /// Builds the bed, loads the program and runs every case, then times table switches; the
    /// bed is removed on return.
    pub fn run(&self, bed_name: &str) -> Result<(Vec<XdpResult>, TableSwitch)> {
        let bed = PacketBed::new(bed_name, 2)?;
        bed.ns
            .run(|| {
                pin_to_last_cpu()?;
                let mut balancer = Balancer::load()?;
                let packets = self.packet_cases(&mut balancer)?;
                Ok((packets, self.table_switches(&mut balancer)?))
            })
            .context("the packet bed's namespace")?
    }

    /// Changes a server's weight back and forth, timing each rebuild and switch of the VIP's
    /// table (the default 65 537 slots).
    fn table_switches(&self, balancer: &mut Balancer) -> Result<TableSwitch> {
        let server: SocketAddr = "198.18.1.10:8080".parse()?;
        let mut values = Vec::with_capacity(self.repetitions);
        for weight in (0..self.repetitions).map(|i| 2 + (i % 2) as u32) {
            let before = balancer.services.clone();
            balancer.services.set_weight("nat4", server, weight)?;
            let started = Instant::now();
            balancer
                .services
                .sync(balancer.datapath.maps_mut(), Some(&before))?;
            values.push(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(TableSwitch {
            slots: balancer.services.service("nat4")?.table_size,
            ms: Sample::new(values),
        })
    }

    fn packet_cases(&self, balancer: &mut Balancer) -> Result<Vec<XdpResult>> {
        let client = |port| SocketAddr::new(IpAddr::from([198, 18, 0, 1]), port);
        let client6 = |port| SocketAddr::new("fd00::1".parse().unwrap(), port);
        let vip4 = |last: u8| SocketAddr::new(IpAddr::from([198, 18, 100, last]), 80);
        let vip6 = |s: &str| SocketAddr::new(s.parse().unwrap(), 80);
        let same = |src, dst| Packets::Same(segment(src, dst, false));
        let new = |dst| Packets::NewFlows { dst };
        let handshakes = |dst| Packets::Handshakes { dst };
        use Mode::{PerCall, Repeated};
        use Program::{Balancer as Weir, FloorPass, FloorTx, FlowLookup, FlowLookupRedirect};
        let pass = "floor: XDP_PASS, repeated";
        let pass_per_call = "floor: XDP_PASS, per call";
        let tx = "floor: XDP_TX, per call";
        let lookup4 = Some("reference: parse + one flow lookup, IPv4");
        let lookup6 = Some("reference: parse + one flow lookup, IPv6");
        let lookup4_per_call = Some("reference: parse + one flow lookup, IPv4, per call");
        let lookup6_per_call = Some("reference: parse + one flow lookup, IPv6, per call");
        let redirect4 = Some("reference: parse + one flow lookup + redirect, IPv4, per call");
        let redirect6 = Some("reference: parse + one flow lookup + redirect, IPv6, per call");
        let case = |name, program, mode, packets, stat, floor| Case {
            name,
            program,
            mode,
            packets,
            ingress: Ingress::Uplink,
            stat,
            floor,
            reference: None,
            redirect_reference: None,
        };
        let hit = |name, mode, packets, stat, floor, reference| Case {
            name,
            program: Weir,
            mode,
            packets,
            ingress: Ingress::Uplink,
            stat,
            floor,
            reference,
            redirect_reference: None,
        };
        // Two-armed, per call: compared with both references, the plain one and the one that
        // redirects.
        let two_armed = |name, packets, stat, reference, redirect_reference| Case {
            redirect_reference,
            ..hit(name, PerCall, packets, stat, tx, reference)
        };
        let one_armed = |name, mode, packets, stat, floor, reference| Case {
            ingress: Ingress::Downlink,
            ..hit(name, mode, packets, stat, floor, reference)
        };
        let cases = vec![
            case(
                pass,
                FloorPass,
                Repeated,
                same(client(1), vip4(10)),
                None,
                pass,
            ),
            case(
                "not a VIP, IPv4",
                Weir,
                Repeated,
                same(client(1), vip4(99)),
                Some(Stat::PassNotVip),
                pass,
            ),
            case(
                "not a VIP, IPv6",
                Weir,
                Repeated,
                same(client6(1), vip6("fd00:9::9")),
                Some(Stat::PassNotVip),
                pass,
            ),
            hit(
                "DSR established flow, IPv4",
                Repeated,
                same(client(2), vip4(20)),
                Some(Stat::ForwardDsr),
                pass,
                lookup4,
            ),
            hit(
                "DSR established flow, IPv6",
                Repeated,
                same(client6(2), vip6("fd00:100::20")),
                Some(Stat::ForwardDsr),
                pass,
                lookup6,
            ),
            // The flows the two cases above recorded, looked up once and nothing else.
            case(
                "reference: parse + one flow lookup, IPv4",
                FlowLookup,
                Repeated,
                same(client(2), vip4(20)),
                None,
                pass,
            ),
            case(
                "reference: parse + one flow lookup, IPv6",
                FlowLookup,
                Repeated,
                same(client6(2), vip6("fd00:100::20")),
                None,
                pass,
            ),
            case(
                pass_per_call,
                FloorPass,
                PerCall,
                same(client(1), vip4(10)),
                None,
                pass_per_call,
            ),
            case(
                "not a VIP, IPv4, per call",
                Weir,
                PerCall,
                same(client(1), vip4(99)),
                Some(Stat::PassNotVip),
                pass_per_call,
            ),
            case(tx, FloorTx, PerCall, same(client(1), vip4(10)), None, tx),
            // The DSR flows recorded above, looked up once per call.
            case(
                "reference: parse + one flow lookup, IPv4, per call",
                FlowLookup,
                PerCall,
                same(client(2), vip4(20)),
                None,
                tx,
            ),
            case(
                "reference: parse + one flow lookup, IPv6, per call",
                FlowLookup,
                PerCall,
                same(client6(2), vip6("fd00:100::20")),
                None,
                tx,
            ),
            case(
                "reference: parse + one flow lookup + redirect, IPv4, per call",
                FlowLookupRedirect,
                PerCall,
                same(client(2), vip4(20)),
                None,
                tx,
            ),
            case(
                "reference: parse + one flow lookup + redirect, IPv6, per call",
                FlowLookupRedirect,
                PerCall,
                same(client6(2), vip6("fd00:100::20")),
                None,
                tx,
            ),
            two_armed(
                "DSR established flow, IPv4, per call",
                same(client(2), vip4(20)),
                Some(Stat::ForwardDsr),
                lookup4_per_call,
                redirect4,
            ),
            two_armed(
                "DSR established flow, IPv6, per call",
                same(client6(2), vip6("fd00:100::20")),
                Some(Stat::ForwardDsr),
                lookup6_per_call,
                redirect6,
            ),
            two_armed(
                "NAT established flow, IPv4",
                same(client(3), vip4(10)),
                Some(Stat::ForwardNat),
                lookup4_per_call,
                redirect4,
            ),
            two_armed(
                "NAT established flow, IPv6",
                same(client6(3), vip6("fd00:100::10")),
                Some(Stat::ForwardNat),
                lookup6_per_call,
                redirect6,
            ),
            // The same flows on a one-armed balancer: out of the interface they came in on.
            one_armed(
                "DSR established flow, IPv4, one-armed",
                Repeated,
                same(client(2), vip4(20)),
                Some(Stat::ForwardDsr),
                pass,
                lookup4,
            ),
            one_armed(
                "DSR established flow, IPv6, one-armed",
                Repeated,
                same(client6(2), vip6("fd00:100::20")),
                Some(Stat::ForwardDsr),
                pass,
                lookup6,
            ),
            one_armed(
                "DSR established flow, IPv4, one-armed, per call",
                PerCall,
                same(client(2), vip4(20)),
                Some(Stat::ForwardDsr),
                tx,
                lookup4_per_call,
            ),
            one_armed(
                "DSR established flow, IPv6, one-armed, per call",
                PerCall,
                same(client6(2), vip6("fd00:100::20")),
                Some(Stat::ForwardDsr),
                tx,
                lookup6_per_call,
            ),
            one_armed(
                "NAT established flow, IPv4, one-armed",
                PerCall,
                same(client(3), vip4(10)),
                Some(Stat::ForwardNat),
                tx,
                lookup4_per_call,
            ),
            one_armed(
                "NAT established flow, IPv6, one-armed",
                PerCall,
                same(client6(3), vip6("fd00:100::10")),
                Some(Stat::ForwardNat),
                tx,
                lookup6_per_call,
            ),
            case(
                "NAT new flow, IPv4",
                Weir,
                PerCall,
                new(vip4(10)),
                Some(Stat::ForwardNat),
                tx,
            ),
            case(
                "NAT new flow, IPv6",
                Weir,
                PerCall,
                new(vip6("fd00:100::10")),
                Some(Stat::ForwardNat),
                tx,
            ),
            case(
                "DSR new flow, IPv4",
                Weir,
                PerCall,
                new(vip4(20)),
                Some(Stat::ForwardDsr),
                tx,
            ),
            case(
                "DSR new flow, IPv6",
                Weir,
                PerCall,
                new(vip6("fd00:100::20")),
                Some(Stat::ForwardDsr),
                tx,
            ),
            case(
                "NAT handshake ACK (embryonic → flow table), IPv4",
                Weir,
                PerCall,
                handshakes(vip4(10)),
                Some(Stat::ForwardNat),
                tx,
            ),
            case(
                "DSR handshake ACK (embryonic → flow table), IPv4",
                Weir,
                PerCall,
                handshakes(vip4(20)),
                Some(Stat::ForwardDsr),
                tx,
            ),
        ];
        // An established case's first packet creates its flow, unmeasured.
        for case in &cases {
            if let Packets::Same(packet) = &case.packets {
                balancer.run(&case.program, case.ingress, packet, 1)?;
            }
        }
        // Rounds of every case in turn, so that a slower phase of the shared machine falls on
        // all of them alike, and each ratio compares figures taken side by side.
        let mut values = vec![Vec::with_capacity(self.repetitions); cases.len()];
        let mut flows = 0u64;
        for _ in 0..self.repetitions {
            for (case, values) in cases.iter().zip(&mut values) {
                values.push(self.measure(balancer, case, &mut flows)?);
            }
        }
        Ok(cases
            .iter()
            .zip(values)
            .map(|(case, values)| XdpResult {
                case: case.name.to_string(),
                mode: case.mode,
                floor: case.floor.to_string(),
                reference: case.reference.map(str::to_string),
                redirect_reference: case.redirect_reference.map(str::to_string),
                ns_per_packet: Sample::new(values),
            })
            .collect())
    }

    /// One measurement of `case`: the mean ns per run over `runs` runs, after checking that
    /// every run took the case's path. `flows` numbers the new flows made so far.
    fn measure(&self, balancer: &mut Balancer, case: &Case, flows: &mut u64) -> Result<f64> {
        let before = balancer.count(case.stat)?;
        let mean = match (&case.packets, case.mode) {
            (Packets::Same(packet), Mode::Repeated) => {
                balancer.run(&case.program, case.ingress, packet, self.runs)?
            }
            // Per call: one run per syscall, on the same packet or a new flow's.
            (packets, _) => {
                let mut total = 0.0;
                for _ in 0..self.runs {
                    total += match packets {
                        Packets::Same(packet) => {
                            balancer.run(&case.program, case.ingress, packet, 1)?
                        }
                        Packets::NewFlows { dst } => {
                            let src = new_client(*flows, dst.is_ipv6());
                            *flows += 1;
                            let syn = segment(src, *dst, true);
                            balancer.run(&case.program, case.ingress, &syn, 1)?
                        }
                        Packets::Handshakes { dst } => {
                            let src = new_client(*flows, dst.is_ipv6());
                            *flows += 1;
                            let (syn, ack) = (segment(src, *dst, true), segment(src, *dst, false));
                            balancer.run(&case.program, case.ingress, &syn, 1)?;
                            balancer.run(&case.program, case.ingress, &ack, 1)?
                        }
                    };
                }
                total / f64::from(self.runs)
            }
        };
        if case.stat.is_some() {
            let moved = balancer.count(case.stat)? - before;
            // A handshake case forwards its unmeasured SYN too.
            let per_run = match case.packets {
                Packets::Handshakes { .. } => 2,
                _ => 1,
            };
            ensure!(
                moved == per_run * u64::from(self.runs),
                "`{}`: {moved} of {} runs took the expected path ({:?})",
                case.name,
                self.runs,
                case.stat
            );
        }
        Ok(mean)
    }
}

/// Keeps the measuring thread (and so every program run, which the kernel does on the
/// caller's CPU) on one CPU: runs that hop between CPUs spread the figures more.
fn pin_to_last_cpu() -> Result<()> {
    let cpus = std::thread::available_parallelism()?.get();
    let mut set = nix::sched::CpuSet::new();
    set.set(cpus - 1)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// The client of new flow number `n`: a new port each time, a new address every 60000.
/// Clients come from 198.19.0.0/16 and fd00::1:0/112: never one of the bed's own addresses,
/// whose new flows the program drops as spoofed.
fn new_client(n: u64, ipv6: bool) -> SocketAddr {
    let port = 1024 + (n % 60000) as u16;
    let host = (n / 60000) as u16 + 1;
    let ip = if ipv6 {
        IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 1, host])
    } else {
        IpAddr::from([198, 19, (host >> 8) as u8, host as u8])
    };
    SocketAddr::new(ip, port)
}

/// The datapath loaded in the bed (not attached: test runs do not need it).
struct Balancer {
    datapath: Datapath,
    services: L4Services,
    uplink: u32,
    downlink: u32,
}

impl Balancer {
    fn load() -> Result<Balancer> {
        let config = Config::parse("bench.toml".as_ref(), CONFIG)?;
        let mut datapath = Datapath::load(DatapathOptions {
            interfaces: vec![UPLINK.into(), DOWNLINK.into()],
            server_interfaces: Vec::new(),
            xdp_mode: config.datapath.xdp_mode,
            flow_table_size: 1 << 20,
            embryonic_table_size: 1 << 16,
            settings: datapath::settings(&config),
            edge: datapath::edge_settings(&config),
            pins: None,
        })?;
        let services = L4Services::from_config(&config, datapath.maps_mut())?;
        Ok(Balancer {
            datapath,
            services,
            uplink: nix::net::if_::if_nametoindex(UPLINK)?,
            downlink: nix::net::if_::if_nametoindex(DOWNLINK)?,
        })
    }

    /// Runs `program` `repeat` times on `packet` arriving on `ingress`; the kernel's mean ns
    /// per run.
    fn run(
        &mut self,
        program: &Program,
        ingress: Ingress,
        packet: &[u8],
        repeat: u32,
    ) -> Result<f64> {
        let ifindex = match ingress {
            Ingress::Uplink => self.uplink,
            Ingress::Downlink => self.downlink,
        };
        let ctx = xdp_context(ifindex, packet.len());
        let program_kind = program;
        let (program, must_hit): (&Xdp, bool) = match program {
            Program::Balancer => (self.datapath.program()?, false),
            Program::FloorPass => (
                self.datapath.floor_program(names::FLOOR_PASS_PROGRAM)?,
                false,
            ),
            Program::FloorTx => (self.datapath.floor_program(names::FLOOR_TX_PROGRAM)?, false),
            Program::FlowLookup => (
                self.datapath
                    .floor_program(names::FLOOR_FLOW_LOOKUP_PROGRAM)?,
                true,
            ),
            Program::FlowLookupRedirect => (
                self.datapath
                    .floor_program(names::FLOOR_FLOW_LOOKUP_REDIRECT_PROGRAM)?,
                true,
            ),
        };
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        // The lookup references answer XDP_TX or XDP_REDIRECT on a hit: a run that missed (or
        // found no device to redirect to) measured nothing.
        let hit = match program_kind {
            Program::FlowLookupRedirect => XDP_REDIRECT,
            _ => XDP_TX,
        };
        ensure!(
            !must_hit || result.return_value == hit,
            "the flow lookup reference missed its flow"
        );
        // Anything weir forwards from the downlink goes back out of it.
        ensure!(
            !matches!(
                (program_kind, ingress),
                (Program::Balancer, Ingress::Downlink)
            ) || result.return_value == XDP_TX,
            "a one-armed case left with action {} instead of XDP_TX",
            result.return_value
        );
        Ok(result.duration.as_nanos() as f64)
    }

    fn count(&self, stat: Option<Stat>) -> Result<u64> {
        let Some(stat) = stat else { return Ok(0) };
        let counters = self.datapath.maps().counters()?;
        Ok(counters
            .iter()
            .find(|(s, _)| *s == stat)
            .map_or(0, |(_, c)| c.packets))
    }
}

fn segment(src: SocketAddr, dst: SocketAddr, syn: bool) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, UPLINK_MAC);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family per packet"),
    };
    let mut tcp = TcpHeader::new(src.port(), dst.port(), 1000, 64240);
    if syn {
        tcp.syn = true;
    } else {
        tcp.ack = true;
        tcp.acknowledgment_number = 1;
    }
    let mut packet = Vec::new();
    ip.tcp_header(tcp)
        .write(&mut packet, &[0u8; 64])
        .expect("packet builds");
    packet
}
