//! NAT rewrites in XDP: the destination (address and port) of a client's packet replaced,
//! checksums fixed incrementally.
//!
//! Only the fields that change are touched: the IPv4 header checksum covers the address; the
//! TCP/UDP checksum covers the address (through the pseudo-header) and the port. A UDP/IPv4
//! checksum of 0 means "none" and stays 0.

use aya_ebpf::programs::XdpContext;
use weir_common::{csum, l4::FAMILY_IPV4};

use crate::parse::{ETH_HLEN, L4_OFFSET_V4, L4_OFFSET_V6, Packet, Words};

/// Where the TCP and UDP checksums sit in their headers, and where the headers end for a
/// rewrite (the checksum is the last field it touches).
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;
const TCP_REWRITTEN: usize = TCP_CHECK + 2;
const UDP_REWRITTEN: usize = 8;

/// Replaces the destination of the TCP/UDP packet `packet` with `addr`:`port` (raw values)
/// and decrements its TTL (the caller checked it is above 1), as the router NAT makes weir
/// is; [`set_ttl`] puts the TTL back if the packet goes to the kernel, which decrements it
/// itself. Returns `None` if the headers are not all in the frame, which the parser's checks
/// rule out; the caller drops the packet then, and nothing was written.
///
/// In place, with checksum arithmetic of our own: an XDP frame is as it came off the wire,
/// its checksums complete. (The NAT return path, at TC, patches merged buffers through the
/// kernel's helpers instead: see `nat_return`.) One bounds check covers every field, sized by
/// family and protocol so that each arm's offsets are constants the verifier can check.
#[inline(always)]
pub fn destination(ctx: &XdpContext, packet: &Packet, addr: &[u32; 4], port: u16) -> Option<()> {
    // The headers up to the end of the transport checksum, as one bounds check.
    macro_rules! through {
        ($end:expr) => {
            rewrite_destination(Words::<{ $end }>::of(ctx)?, packet, addr, port)
        };
    }
    match (packet.family == FAMILY_IPV4, packet.is_tcp()) {
        (true, true) => through!(L4_OFFSET_V4 + TCP_REWRITTEN),
        (true, false) => through!(L4_OFFSET_V4 + UDP_REWRITTEN),
        (false, true) => through!(L4_OFFSET_V6 + TCP_REWRITTEN),
        (false, false) => through!(L4_OFFSET_V6 + UDP_REWRITTEN),
    }
    Some(())
}

/// The rewrite itself: the TCP/UDP checksum covers the address (through the pseudo-header)
/// and the port, the IPv4 header checksum the address and the TTL (one update for both). A
/// UDP/IPv4 checksum of 0 means "none" and stays 0.
#[inline(always)]
fn rewrite_destination<const N: usize>(
    headers: Words<N>,
    packet: &Packet,
    addr: &[u32; 4],
    port: u16,
) {
    let v4 = packet.family == FAMILY_IPV4;
    let l4 = packet.l4_offset();
    let check_at = l4
        + if packet.is_tcp() {
            TCP_CHECK
        } else {
            UDP_CHECK
        };
    let check = headers.get(check_at);
    if packet.is_tcp() || !v4 || check != 0 {
        // The pseudo-header sum over four words is right for IPv4 too: its unused words are
        // zero in both the old and the new address.
        let words = if v4 { 1 } else { 4 };
        let mut check = csum::rewrite(
            check,
            &packet.dst[..words],
            packet.dst_port,
            &addr[..words],
            port,
        );
        if !packet.is_tcp() {
            check = csum::udp_nonzero(check);
        }
        headers.set(check_at, check);
    }
    headers.set(l4 + 2, port);
    let ttl = ttl_word(packet, packet.ttl - 1);
    if v4 {
        headers.set32(ETH_HLEN + 16, addr[0]);
        let old_ttl = ttl_word(packet, packet.ttl);
        headers.set(ETH_HLEN + 8, ttl);
        // The TTL word stands in for the port.
        let ip_check = headers.get(ETH_HLEN + 10);
        let ip_check = csum::rewrite(ip_check, &packet.dst[..1], old_ttl, &addr[..1], ttl);
        headers.set(ETH_HLEN + 10, ip_check);
    } else {
        for (i, word) in addr.iter().enumerate() {
            headers.set32(ETH_HLEN + 24 + 4 * i, *word);
        }
        headers.set(ETH_HLEN + 6, ttl);
    }
}

/// The 16-bit header word that holds the TTL, as it reads with TTL `ttl`: IPv4's (TTL,
/// protocol), which its header checksum covers, or IPv6's (next header, hop limit).
#[inline(always)]
fn ttl_word(packet: &Packet, ttl: u8) -> u16 {
    if packet.family == FAMILY_IPV4 {
        u16::from_ne_bytes([ttl, packet.protocol])
    } else {
        u16::from_ne_bytes([packet.protocol, ttl])
    }
}

/// Sets the TTL (IPv4, fixing the header checksum) or hop limit (IPv6) to `ttl`, from what
/// the packet holds now.
#[inline(always)]
pub fn set_ttl(ctx: &XdpContext, packet: &Packet, ttl: u8) -> Option<()> {
    // Both fields lie within an IPv4 header's span, which any parsed packet holds.
    let headers = Words::<L4_OFFSET_V4>::of(ctx)?;
    let new = ttl_word(packet, ttl);
    if packet.family == FAMILY_IPV4 {
        let old = headers.get(ETH_HLEN + 8);
        headers.set(ETH_HLEN + 8, new);
        let check = headers.get(ETH_HLEN + 10);
        headers.set(ETH_HLEN + 10, csum::replace16(check, old, new));
    } else {
        headers.set(ETH_HLEN + 6, new);
    }
    Some(())
}
