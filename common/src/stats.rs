//! Datapath counters: why each packet got the verdict it got.
//!
//! The XDP program counts every packet exactly once, under the reason for its verdict, in a
//! per-CPU array so the hot path never contends on a shared cache line. Userspace sums the
//! CPUs when it reads.

/// Packets and bytes, as kept per CPU and summed in userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    /// Adds another counter (used to sum the per-CPU copies).
    pub fn merge(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

/// Packets, bytes and new flows of one VIP or one server, kept per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
    /// Flows that picked this server (or arrived at this VIP) from the Maglev table.
    pub new_flows: u64,
}

impl TrafficCounter {
    /// Adds another counter (used to sum the per-CPU copies).
    pub fn merge(&mut self, other: &TrafficCounter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
    }
}

macro_rules! stats {
    ($($(#[$doc:meta])* $variant:ident = $index:literal => $name:literal,)+) => {
        /// The reason a packet got its verdict; the index into the stats map.
        ///
        /// New reasons are appended (never renumbered) so that a daemon reading maps pinned by
        /// an older program still reads the right slots.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat {
            $($(#[$doc])* $variant = $index,)+
        }

        impl Stat {
            /// Every reason, in index order (what userspace iterates to print the table).
            pub const ALL: &'static [Stat] = &[$(Stat::$variant,)+];

            /// Stable, machine-friendly name (used in `weirctl status --json` and metrics).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Stat::$variant => $name,)+
                }
            }
        }
    };
}

stats! {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): handed to the kernel.
    PassNotIp = 0 => "pass_not_ip",
    /// IP, but neither for an L4 VIP nor a NAT reply: host traffic, handed to the kernel.
    PassNotVip = 1 => "pass_not_vip",
    /// Too short to hold the IP header it claims, or not a valid IP header: handed to the
    /// kernel, which drops it as it would without weir. Never forwarded by weir.
    PassMalformed = 2 => "pass_malformed",
    /// Client to server, NAT: destination rewritten, redirected to the server's next hop.
    ForwardNat = 3 => "forward_nat",
    /// Client to server, DSR: MACs rewritten, redirected to the server.
    ForwardDsr = 4 => "forward_dsr",
    /// Server to client, NAT: source restored to the VIP, redirected to the client's next hop.
    ReturnNat = 5 => "return_nat",
    /// NAT packet rewritten but its next hop is not resolved yet (or it needs fragmenting):
    /// handed to the kernel, which forwards it and resolves the neighbour for the next ones.
    PassSlowPath = 6 => "pass_slow_path",
    /// DSR packet whose server has no resolved MAC: dropped (the kernel would deliver it to
    /// the local VIP). The daemon keeps server neighbours resolved.
    DropNoNeighbor = 7 => "drop_no_neighbor",
    /// No route to the server or client (FIB lookup failed).
    DropNoRoute = 8 => "drop_no_route",
    /// New flow for a VIP whose table is empty (no server takes new flows).
    DropNoServer = 9 => "drop_no_server",
    /// IPv4 fragment or IPv6 fragment header addressed to a VIP: without reassembly the later
    /// fragments carry no ports, so they could not be kept with their flow.
    DropFragment = 10 => "drop_fragment",
    /// IPv4 packet with options addressed to a VIP.
    DropIpOptions = 11 => "drop_ip_options",
    /// IPv6 packet with extension headers addressed to a VIP.
    DropIpv6Extension = 12 => "drop_ipv6_extension",
    /// VIP traffic with a truncated or invalid L4 header or ICMP payload.
    DropMalformed = 13 => "drop_malformed",
    /// NAT packet whose TTL / hop limit would reach zero at this hop.
    DropTtlExceeded = 14 => "drop_ttl_exceeded",
    /// ICMP/ICMPv6 error about a VIP flow, sent on to the flow's server.
    IcmpToServer = 15 => "icmp_to_server",
    /// ICMP that is not an error about a VIP flow (echo to a VIP, errors about host traffic):
    /// handed to the kernel.
    PassIcmp = 16 => "pass_icmp",
    /// VIP whose forwarding mode this program does not know (a newer daemon's mode).
    DropUnsupportedMode = 17 => "drop_unsupported_mode",
    /// From a server, matching a NAT return entry whose client flow is idle past its timeout,
    /// pinned elsewhere, or closing while this is a SYN-ACK: not a reply through the VIP (e.g. a
    /// client reaching the server directly from a port a NAT flow used). The entry is
    /// forgotten and the packet handed to the kernel untouched.
    PassStaleReturn = 18 => "pass_stale_return",
    /// A new flow to a VIP from a source that cannot be a client: unspecified, loopback,
    /// multicast, limited broadcast or reserved (240.0.0.0/4); IPv6 `::`, `::1`, `ff00::/8`,
    /// IPv4-mapped.
    DropMartianSource = 19 => "drop_martian_source",
    /// A new flow to a VIP whose source is one of the balancer's own addresses (a VIP or an
    /// interface address): spoofed, and its server's answer would loop back.
    DropSpoofedSource = 20 => "drop_spoofed_source",
    /// VIP traffic whose IP length claims more than the frame holds, or whose TCP header is
    /// longer than the IP packet.
    DropBadLength = 21 => "drop_bad_length",
    /// IPv4 TCP/UDP to an L4 VIP whose header checksum is wrong.
    DropBadChecksum = 22 => "drop_bad_ip_checksum",
    /// TCP to a VIP with flags no connection sends: SYN with FIN or RST, or neither ACK, SYN
    /// nor RST (null, FIN-only and "Xmas" scans).
    DropBadTcpFlags = 23 => "drop_bad_tcp_flags",
}

impl Stat {
    /// Slots of the stats map: more than there are reasons, so that reasons appended later
    /// fit the map a running datapath has pinned.
    pub const SLOTS: u32 = 64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_indices_are_dense_and_in_order() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i, "{stat:?} is out of order");
        }
        assert!(Stat::ALL.len() as u32 <= Stat::SLOTS);
    }

    #[test]
    fn counter_layout_is_two_u64() {
        assert_eq!(core::mem::size_of::<Counter>(), 16);
        assert_eq!(core::mem::align_of::<Counter>(), 8);
    }
}
