//! NAT rewrites in XDP: the destination (address and port) of a client's packet replaced,
//! checksums fixed incrementally.
//!
//! Only the fields that change are touched: the IPv4 header checksum covers the address; the
//! TCP/UDP checksum covers the address (through the pseudo-header) and the port. A UDP/IPv4
//! checksum of 0 means "none" and stays 0.

use aya_ebpf::programs::XdpContext;
use weir_common::{csum, l4::FAMILY_IPV4};

use crate::parse::{ETH_HLEN, Packet, read, write};

/// Replaces the destination of the TCP/UDP packet `packet` with `addr`:`port` (raw values).
/// Returns `None` if a field is out of bounds, which the parser's checks rule out; the caller
/// drops the packet then, so a half-rewritten packet never leaves.
///
/// In place, with checksum arithmetic of our own: an XDP frame is as it came off the wire,
/// its checksums complete. (The NAT return path, at TC, patches merged buffers through the
/// kernel's helpers instead: see `nat_return`.)
#[inline(always)]
pub fn destination(ctx: &XdpContext, packet: &Packet, addr: &[u32; 4], port: u16) -> Option<()> {
    let v4 = packet.family == FAMILY_IPV4;
    let l4 = packet.l4_offset();
    let check_at = if packet.is_tcp() { l4 + 16 } else { l4 + 6 };
    let check: u16 = read(ctx, check_at)?;
    if packet.is_tcp() || !v4 || check != 0 {
        // The pseudo-header sum over four words is right for IPv4 too: its unused words are
        // zero in both the old and the new address.
        let mut check = csum::replace128(check, &packet.dst, addr);
        check = csum::replace16(check, packet.dst_port, port);
        if !packet.is_tcp() {
            check = csum::udp_nonzero(check);
        }
        write(ctx, check_at, check)?;
    }
    write(ctx, l4 + 2, port)?;
    if v4 {
        write(ctx, ETH_HLEN + 16, addr[0])?;
        let ip_check: u16 = read(ctx, ETH_HLEN + 10)?;
        write(
            ctx,
            ETH_HLEN + 10,
            csum::replace32(ip_check, packet.dst[0], addr[0]),
        )?;
    } else {
        write(ctx, ETH_HLEN + 24, *addr)?;
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
