//! NAT rewrites: one end (address and port) of a packet replaced, checksums fixed
//! incrementally.
//!
//! Only the fields that change are touched: the IPv4 header checksum covers the address; the
//! TCP/UDP checksum covers the address (through the pseudo-header) and the port. A UDP/IPv4
//! checksum of 0 means "none" and stays 0.

use aya_ebpf::programs::XdpContext;
use weir_common::{csum, l4::FAMILY_IPV4};

use crate::parse::{ETH_HLEN, Packet, read, write};

/// Which end of the packet a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Replaces `end` of the TCP/UDP packet `packet` with `addr`:`port` (raw values). Returns
/// `None` if a field is out of bounds, which the parser's checks rule out; the caller drops
/// the packet then, so a half-rewritten packet never leaves.
#[inline(always)]
pub fn endpoint(
    ctx: &XdpContext,
    packet: &Packet,
    end: End,
    addr: &[u32; 4],
    port: u16,
) -> Option<()> {
    let v4 = packet.family == FAMILY_IPV4;
    let l4 = packet.l4_offset();
    let (old_addr, old_port, port_at) = match end {
        End::Source => (&packet.src, packet.src_port, l4),
        End::Destination => (&packet.dst, packet.dst_port, l4 + 2),
    };
    let check_at = if packet.is_tcp() { l4 + 16 } else { l4 + 6 };
    let check: u16 = read(ctx, check_at)?;
    if packet.is_tcp() || !v4 || check != 0 {
        // The pseudo-header sum over four words is right for IPv4 too: its unused words are
        // zero in both the old and the new address.
        let mut check = csum::replace128(check, old_addr, addr);
        check = csum::replace16(check, old_port, port);
        if !packet.is_tcp() {
            check = csum::udp_nonzero(check);
        }
        write(ctx, check_at, check)?;
    }
    write(ctx, port_at, port)?;
    if v4 {
        let addr_at = ETH_HLEN + if end == End::Source { 12 } else { 16 };
        write(ctx, addr_at, addr[0])?;
        let ip_check: u16 = read(ctx, ETH_HLEN + 10)?;
        write(
            ctx,
            ETH_HLEN + 10,
            csum::replace32(ip_check, old_addr[0], addr[0]),
        )?;
    } else {
        let addr_at = ETH_HLEN + if end == End::Source { 8 } else { 24 };
        write(ctx, addr_at, *addr)?;
    }
    Some(())
}

/// Decrements the IPv4 TTL (fixing the header checksum) or the IPv6 hop limit. The caller has
/// checked that it is above 1.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, packet: &Packet) -> Option<()> {
    if packet.family == FAMILY_IPV4 {
        // TTL is the high byte of the (TTL, protocol) word that the checksum covers.
        let old: u16 = read(ctx, ETH_HLEN + 8)?;
        let new = u16::from_ne_bytes([packet.ttl - 1, packet.protocol]);
        write(ctx, ETH_HLEN + 8, new)?;
        let check: u16 = read(ctx, ETH_HLEN + 10)?;
        write(ctx, ETH_HLEN + 10, csum::replace16(check, old, new))
    } else {
        write(ctx, ETH_HLEN + 7, packet.ttl - 1)
    }
}
