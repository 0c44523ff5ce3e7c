//! ICMP and ICMPv6 errors about VIP flows.
//!
//! A router between weir and a client reports trouble with a packet the client was sent —
//! "fragmentation needed", "packet too big", "unreachable" — to that packet's source: the VIP.
//! Only the server that owns the flow can act on it (lower its path MTU, abort the
//! connection), so the error goes to that server, found from the header the error quotes.
//! In NAT mode the server knows the flow by its own address, so the outer destination and the
//! quoted source are rewritten to it; the quoted transport checksum is left as is (receivers do
//! not verify it, and a quote is usually too short to recompute it).
//!
//! Echo requests to a VIP and errors about host traffic go to the kernel.

use aya_ebpf::programs::XdpContext;
use weir_common::{
    Stat, csum,
    l4::{FAMILY_IPV4, ForwardMode, PROTO_TCP, PROTO_UDP, ServerInfo, VipKey},
};

use crate::{
    flow,
    forward::{self, Hop, Route},
    maps::{self, WEIR_VIPS},
    parse::{ETH_HLEN, IPV4_HLEN, IPV6_HLEN, Packet, ipv4_addr, ipv6_addr, read, write},
    rewrite, verdict,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// The quoted packet starts after the 8-byte ICMP header.
const ICMP_HLEN: usize = 8;

/// Handles an ICMP/ICMPv6 packet (its 8-byte header is known to be present).
#[inline(always)]
pub fn handle(ctx: &XdpContext, packet: &Packet, len: u64, now: u64) -> u32 {
    let v4 = packet.family == FAMILY_IPV4;
    let Some(icmp_type) = read::<u8>(ctx, packet.l4_offset()) else {
        return verdict::drop(Stat::DropMalformed, len);
    };
    let is_error = if v4 {
        matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
    } else {
        matches!(
            icmp_type,
            ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
        )
    };
    if !is_error {
        return verdict::pass(Stat::PassIcmp, len);
    }
    let Some(quoted) = quoted_packet(ctx, packet) else {
        // A quote weir cannot read: police it only if it is addressed to a VIP.
        // SAFETY: read-only lookup.
        let for_vip = unsafe { WEIR_VIPS.get(packet.vip_address_key()) }.is_some();
        let stat = if for_vip {
            Stat::DropMalformed
        } else {
            Stat::PassIcmp
        };
        return if for_vip {
            verdict::drop(stat, len)
        } else {
            verdict::pass(stat, len)
        };
    };
    // The quoted packet went VIP → client; it must be from the VIP this error is sent to.
    let vip_key = VipKey {
        addr: quoted.src,
        port: quoted.src_port,
        protocol: quoted.protocol,
        family: quoted.family,
    };
    let vip = match maps::vip(&vip_key) {
        Some(vip) if quoted.src == packet.dst => vip,
        _ => return verdict::pass(Stat::PassIcmp, len),
    };
    // The quote went VIP → client; the flow table holds the client → VIP direction.
    let key = quoted.flow_key().reversed();
    let Some(server) = flow::peek(&vip, &key).and_then(maps::server) else {
        return verdict::drop(Stat::DropNoServer, len);
    };
    if vip.mode == ForwardMode::Dsr as u8 {
        return forward::to_next_hop(
            ctx,
            packet,
            Route {
                src: &packet.src,
                dst: &server.addr,
                hop: Hop::Bridged,
                server: None,
                now,
            },
            Stat::IcmpToServer,
            len,
        );
    }
    if vip.mode != ForwardMode::Nat as u8 {
        return verdict::drop(Stat::DropUnsupportedMode, len);
    }
    if packet.ttl <= 1 {
        return verdict::drop(Stat::DropTtlExceeded, len);
    }
    if rewrite_for_server(ctx, packet, &quoted, &server).is_none()
        || rewrite::set_ttl(ctx, packet, packet.ttl - 1).is_none()
    {
        return verdict::drop(Stat::DropMalformed, len);
    }
    forward::to_next_hop(
        ctx,
        packet,
        Route {
            src: &packet.src,
            dst: &server.addr,
            hop: Hop::Routed,
            server: None,
            now,
        },
        Stat::IcmpToServer,
        len,
    )
}

/// Offset of the quoted IP header.
#[inline(always)]
fn quoted_offset(packet: &Packet) -> usize {
    packet.l4_offset() + ICMP_HLEN
}

/// The quoted packet's addresses and ports, if it is a plain TCP/UDP header of the outer
/// packet's family (IPv4 without options) with its ports present.
#[inline(always)]
fn quoted_packet(ctx: &XdpContext, packet: &Packet) -> Option<Packet> {
    let at = quoted_offset(packet);
    let mut quoted = *packet;
    let ports_at = if packet.family == FAMILY_IPV4 {
        let header = read::<[u8; IPV4_HLEN]>(ctx, at)?;
        if header[0] != 0x45 {
            return None;
        }
        quoted.protocol = header[9];
        quoted.src = ipv4_addr(&header, 12);
        quoted.dst = ipv4_addr(&header, 16);
        at + IPV4_HLEN
    } else {
        let header = read::<[u8; IPV6_HLEN]>(ctx, at)?;
        if header[0] >> 4 != 6 {
            return None;
        }
        quoted.protocol = header[6];
        quoted.src = ipv6_addr(&header, 8);
        quoted.dst = ipv6_addr(&header, 24);
        at + IPV6_HLEN
    };
    if quoted.protocol != PROTO_TCP && quoted.protocol != PROTO_UDP {
        return None;
    }
    // The quote must lie within the error's IP packet, not in padding after it: what weir
    // rewrites there would be outside what the ICMP checksum covers.
    let ip_end = if packet.family == FAMILY_IPV4 {
        ETH_HLEN + usize::from(u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?))
    } else {
        ETH_HLEN + IPV6_HLEN + usize::from(u16::from_be(read::<u16>(ctx, ETH_HLEN + 4)?))
    };
    if ports_at + 4 > ip_end {
        return None;
    }
    let ports = read::<[u8; 4]>(ctx, ports_at)?;
    quoted.src_port = u16::from_ne_bytes([ports[0], ports[1]]);
    quoted.dst_port = u16::from_ne_bytes([ports[2], ports[3]]);
    Some(quoted)
}

/// NAT: the outer destination and the quoted source (address and port) become the server's,
/// with the outer IPv4 checksum, the quoted IPv4 checksum and the ICMP checksum updated.
#[inline(always)]
fn rewrite_for_server(
    ctx: &XdpContext,
    packet: &Packet,
    quoted: &Packet,
    server: &ServerInfo,
) -> Option<()> {
    let check_at = packet.l4_offset() + 2;
    let inner = quoted_offset(packet);
    let mut icmp_check: u16 = read(ctx, check_at)?;
    if packet.family == FAMILY_IPV4 {
        write(ctx, ETH_HLEN + 16, server.addr[0])?;
        let ip_check: u16 = read(ctx, ETH_HLEN + 10)?;
        write(
            ctx,
            ETH_HLEN + 10,
            csum::replace32(ip_check, packet.dst[0], server.addr[0]),
        )?;

        write(ctx, inner + 12, server.addr[0])?;
        let old_inner_check: u16 = read(ctx, inner + 10)?;
        let new_inner_check = csum::replace32(old_inner_check, quoted.src[0], server.addr[0]);
        write(ctx, inner + 10, new_inner_check)?;
        // The ICMP checksum covers the quote: both the address and its checksum changed.
        icmp_check = csum::replace32(icmp_check, quoted.src[0], server.addr[0]);
        icmp_check = csum::replace16(icmp_check, old_inner_check, new_inner_check);
        write(ctx, inner + IPV4_HLEN, server.port)?;
        icmp_check = csum::replace16(icmp_check, quoted.src_port, server.port);
    } else {
        // ICMPv6's checksum covers a pseudo-header with the outer destination as well.
        write(ctx, ETH_HLEN + 24, server.addr)?;
        icmp_check = csum::replace128(icmp_check, &packet.dst, &server.addr);
        write(ctx, inner + 8, server.addr)?;
        icmp_check = csum::replace128(icmp_check, &quoted.src, &server.addr);
        write(ctx, inner + IPV6_HLEN, server.port)?;
        icmp_check = csum::replace16(icmp_check, quoted.src_port, server.port);
    }
    write(ctx, check_at, icmp_check)
}
