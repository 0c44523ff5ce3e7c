//! Header parsing with the bounds checks the verifier requires.
//!
//! The parser reads Ethernet, the IP header and the first bytes of TCP/UDP/ICMP into a
//! [`Packet`] of plain values (addresses, ports, flags), each header as aligned 16-bit words
//! behind one bounds check ([`Words`]). Later stages check again when they write (a `Words` of
//! their own, or [`ptr_at`]), because the verifier forgets a pointer's proven range once it is
//! spilled or recomputed.
//!
//! Only the common shape is balanced: an IPv4 header without options or an IPv6 header whose
//! next header is the transport. Everything else is classified so the caller can apply the
//! edge policy (docs/datapath.md) when it is VIP traffic, and leave it alone when it is not.
//!
//! Both programs parse with it: XDP reads the frame as the driver received it, TC the linear
//! head of a socket buffer (see [`Frame`]).

use aya_ebpf::programs::{TcContext, XdpContext};
use weir_common::{
    Stat, csum,
    flow::FlowKey,
    l4::{FAMILY_IPV4, FAMILY_IPV6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, VipKey},
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
/// Where the transport header starts in the packets weir balances.
pub const L4_OFFSET_V4: usize = ETH_HLEN + IPV4_HLEN;
pub const L4_OFFSET_V6: usize = ETH_HLEN + IPV6_HLEN;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 "more fragments" flag and fragment-offset mask, in the host-order `frag_off` word.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// IPv6 extension headers that may precede the transport (RFC 8200 §4, AH, shim6...).
const IPV6_FRAGMENT: u8 = 44;
const IPV6_EXTENSIONS: [u8; 7] = [0, 43, 50, 51, 60, 135, 139];

/// What the parser learned about an IP packet. Addresses and ports are raw (see
/// `weir_common::l4`); the transport fields are zero unless the packet is [`Parsed::Transport`].
#[derive(Clone, Copy)]
pub struct Packet {
    pub family: u8,
    pub protocol: u8,
    pub ttl: u8,
    pub tcp_flags: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

impl Packet {
    /// Offset of the transport header.
    #[inline(always)]
    pub fn l4_offset(&self) -> usize {
        if self.family == FAMILY_IPV4 {
            L4_OFFSET_V4
        } else {
            L4_OFFSET_V6
        }
    }

    /// The service this packet asks for.
    #[inline(always)]
    pub fn vip_key(&self) -> VipKey {
        VipKey {
            addr: self.dst,
            port: self.dst_port,
            protocol: self.protocol,
            family: self.family,
        }
    }

    /// The address-level VIP entry for the destination (see `VipKey`).
    #[inline(always)]
    pub fn vip_address_key(&self) -> VipKey {
        VipKey::address_only(self.dst, self.family)
    }

    /// The flow this packet belongs to, in its own direction.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            protocol: self.protocol,
            family: self.family,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.protocol == PROTO_TCP
    }
}

/// The classes of packet the entry point dispatches on.
pub enum Parsed {
    /// Not IPv4/IPv6.
    NotIp,
    /// Claims to be IP but its IP header is truncated or invalid.
    Malformed,
    /// TCP or UDP in the plain shape: can be balanced or NAT-returned.
    Transport(Packet),
    /// ICMP or ICMPv6 with at least its 8-byte header present.
    Icmp(Packet),
    /// An IP packet weir does not balance; the reason to drop it if it is VIP traffic.
    Unbalanced(Packet, Stat),
    /// Another transport protocol: never VIP traffic.
    OtherProtocol,
}

/// Packet bytes a program may read and write in place between two pointers: XDP's whole
/// frame, or the linear head of a TC socket buffer (which holds at least the headers once
/// the TC program pulled them in).
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length, Ethernet header included (for TC, beyond the linear head).
    fn frame_len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

/// Parses the packet in `ctx`.
#[inline(always)]
pub fn parse(ctx: &impl Frame) -> Parsed {
    let Some(ethernet) = Words::<ETH_HLEN>::of(ctx) else {
        return Parsed::Malformed;
    };
    match u16::from_be(ethernet.get(12)) {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &impl Frame) -> Parsed {
    let Some(header) = Words::<IPV4_HLEN>::at(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let [version_ihl, _] = header.get(0).to_ne_bytes();
    let ihl = (version_ihl & 0x0f) as usize * 4;
    let total_len = u16::from_be(header.get(2)) as usize;
    if version_ihl >> 4 != 4 || ihl < IPV4_HLEN || total_len < ihl {
        return Parsed::Malformed;
    }
    let [ttl, protocol] = header.get(8).to_ne_bytes();
    let packet = Packet {
        family: FAMILY_IPV4,
        protocol,
        ttl,
        tcp_flags: 0,
        src: [header.get32(12), 0, 0, 0],
        dst: [header.get32(16), 0, 0, 0],
        src_port: 0,
        dst_port: 0,
    };
    let frag_off = u16::from_be(header.get(6));
    if frag_off & (IP_MF | IP_OFFSET) != 0 {
        return Parsed::Unbalanced(packet, Stat::DropFragment);
    }
    if ihl != IPV4_HLEN {
        return Parsed::Unbalanced(packet, Stat::DropIpOptions);
    }
    // A frame may carry padding after the IP packet, never less than the packet claims.
    if total_len > ctx.frame_len().saturating_sub(ETH_HLEN) {
        return Parsed::Unbalanced(packet, Stat::DropBadLength);
    }
    parse_l4(ctx, packet, L4_OFFSET_V4, total_len - IPV4_HLEN)
}

#[inline(always)]
fn parse_ipv6(ctx: &impl Frame) -> Parsed {
    let Some(header) = Words::<IPV6_HLEN>::at(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let [version_class, _] = header.get(0).to_ne_bytes();
    if version_class >> 4 != 6 {
        return Parsed::Malformed;
    }
    let [next_header, hop_limit] = header.get(6).to_ne_bytes();
    let address = |at: usize| {
        [
            header.get32(at),
            header.get32(at + 4),
            header.get32(at + 8),
            header.get32(at + 12),
        ]
    };
    let packet = Packet {
        family: FAMILY_IPV6,
        protocol: next_header,
        ttl: hop_limit,
        tcp_flags: 0,
        src: address(8),
        dst: address(24),
        src_port: 0,
        dst_port: 0,
    };
    if packet.protocol == IPV6_FRAGMENT {
        return Parsed::Unbalanced(packet, Stat::DropFragment);
    }
    if IPV6_EXTENSIONS.contains(&packet.protocol) {
        return Parsed::Unbalanced(packet, Stat::DropIpv6Extension);
    }
    let in_frame = ctx.frame_len() - L4_OFFSET_V6.min(ctx.frame_len());
    let payload_len = match u16::from_be(header.get(4)) as usize {
        // Only a buffer merged beyond 64 KiB (BIG TCP, seen at TC) says 0: the frame knows.
        0 => in_frame,
        claimed if claimed > in_frame => {
            return Parsed::Unbalanced(packet, Stat::DropBadLength);
        }
        claimed => claimed,
    };
    parse_l4(ctx, packet, L4_OFFSET_V6, payload_len)
}

/// Parses the transport header at `l4`; `payload_len` is what the IP header says follows it
/// (already checked against the frame).
#[inline(always)]
fn parse_l4(ctx: &impl Frame, mut packet: Packet, l4: usize, payload_len: usize) -> Parsed {
    match packet.protocol {
        PROTO_TCP => {
            let Some(tcp) = Words::<20>::at(ctx, l4) else {
                return Parsed::Unbalanced(packet, Stat::DropMalformed);
            };
            let [data_offset, flags] = tcp.get(12).to_ne_bytes();
            let header_len = (data_offset >> 4) as usize * 4;
            if header_len < 20 {
                return Parsed::Unbalanced(packet, Stat::DropMalformed);
            }
            packet.src_port = tcp.get(0);
            packet.dst_port = tcp.get(2);
            packet.tcp_flags = flags;
            if header_len > payload_len {
                return Parsed::Unbalanced(packet, Stat::DropBadLength);
            }
            if !tcp_flags_legal(packet.tcp_flags) {
                return Parsed::Unbalanced(packet, Stat::DropBadTcpFlags);
            }
            Parsed::Transport(packet)
        }
        PROTO_UDP => {
            let Some(udp) = Words::<8>::at(ctx, l4) else {
                return Parsed::Unbalanced(packet, Stat::DropMalformed);
            };
            packet.src_port = udp.get(0);
            packet.dst_port = udp.get(2);
            let udp_len = u16::from_be(udp.get(4)) as usize;
            // A merged UDP buffer (GSO, seen at TC) may say 0 like BIG TCP; the rest must fit.
            if udp_len != 0 && (udp_len < 8 || udp_len > payload_len) {
                return Parsed::Unbalanced(packet, Stat::DropBadLength);
            }
            Parsed::Transport(packet)
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if Words::<8>::at(ctx, l4).is_none() {
                return Parsed::Unbalanced(packet, Stat::DropMalformed);
            }
            Parsed::Icmp(packet)
        }
        _ => Parsed::OtherProtocol,
    }
}

/// Whether the packet's options-free IPv4 header has the right checksum: its 16-bit words sum
/// to all ones. Checked for VIP traffic only, once it is known to be that (host traffic is the
/// kernel's to check): ten additions, against sending a corrupted header on to a server, which
/// DSR would deliver unchanged.
#[inline(always)]
pub fn ipv4_checksum_ok(ctx: &impl Frame) -> bool {
    let Some(headers) = Words::<L4_OFFSET_V4>::of(ctx) else {
        return false;
    };
    let mut sum = 0u32;
    let mut at = ETH_HLEN;
    while at < L4_OFFSET_V4 {
        sum += headers.get(at) as u32;
        at += 2;
    }
    csum::fold(sum) == 0xffff
}

/// Whether a TCP segment's flags are a combination a connection sends. Refused: SYN with FIN
/// or RST (no stack sends them; scanners and fingerprinting do), and a segment with none of
/// ACK, SYN and RST (null, FIN-only and "Xmas" scans: every segment after the first SYN
/// carries ACK, and a bare RST is the only other lone flag).
#[inline(always)]
pub fn tcp_flags_legal(flags: u8) -> bool {
    let syn = flags & TCP_SYN != 0;
    if syn && flags & (TCP_FIN | TCP_RST) != 0 {
        return false;
    }
    flags & (TCP_ACK | TCP_SYN | TCP_RST) != 0
}

/// The IPv4 address at `at` in `header`, in the datapath's four-word form.
#[inline(always)]
pub fn ipv4_addr(header: &[u8], at: usize) -> [u32; 4] {
    [word(header, at), 0, 0, 0]
}

/// The IPv6 address at `at` in `header`, in the datapath's four-word form.
#[inline(always)]
pub fn ipv6_addr(header: &[u8], at: usize) -> [u32; 4] {
    [
        word(header, at),
        word(header, at + 4),
        word(header, at + 8),
        word(header, at + 12),
    ]
}

/// The raw (network-order bytes, native load) 32-bit word at `at`.
#[inline(always)]
fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// `N` bytes of the frame (`N` even) from an even offset, bounds-checked once, as 16-bit
/// words: how the parser reads headers and the rewrites edit them in place. Every header
/// field weir reads at a fixed place or edits sits at an even offset, and a frame starts
/// 2-byte aligned (the kernel's headroom keeps it so, on every path), so each access is one
/// aligned 16-bit load or store. (The unaligned `read`/`write`, which the BPF backend must
/// split into single bytes, are for fields at variable offsets, such as an ICMP quote's.)
#[derive(Clone, Copy)]
pub struct Words<const N: usize> {
    base: *mut u16,
}

impl<const N: usize> Words<N> {
    /// The frame's first `N` bytes, if it holds them.
    #[inline(always)]
    pub fn of(ctx: &impl Frame) -> Option<Words<N>> {
        Self::at(ctx, 0)
    }

    /// The `N` bytes at `start` (even; a constant once inlined, as the verifier needs), if
    /// the frame holds them. Offsets passed to the accessors are then relative to `start`.
    #[inline(always)]
    pub fn at(ctx: &impl Frame, start: usize) -> Option<Words<N>> {
        ptr_at::<[u8; N]>(ctx, start).map(|base| Words {
            base: base as *mut u16,
        })
    }

    /// The raw 32-bit word (network bytes, native load) at byte `offset`: an IPv4 address or
    /// a quarter of an IPv6 one, in the datapath's form.
    #[inline(always)]
    pub fn get32(&self, offset: usize) -> u32 {
        let [a, b] = self.get(offset).to_ne_bytes();
        let [c, d] = self.get(offset + 2).to_ne_bytes();
        u32::from_ne_bytes([a, b, c, d])
    }

    /// The 16-bit word at byte `offset` (even, below `N`), in memory order.
    #[inline(always)]
    pub fn get(&self, offset: usize) -> u16 {
        debug_assert!(offset.is_multiple_of(2) && offset + 2 <= N);
        // SAFETY: `of` checked that the frame holds `N` bytes; the word is inside them and
        // aligned (see the type's docs).
        unsafe { self.base.add(offset / 2).read() }
    }

    /// Stores `value` (memory order) at byte `offset` (even, below `N`).
    #[inline(always)]
    pub fn set(&self, offset: usize, value: u16) {
        debug_assert!(offset.is_multiple_of(2) && offset + 2 <= N);
        // SAFETY: as in `get`; XDP and TC programs may write their packet.
        unsafe { self.base.add(offset / 2).write(value) }
    }

    /// Stores the raw 32-bit word `value` (network bytes, native load) at byte `offset`.
    #[inline(always)]
    pub fn set32(&self, offset: usize, value: u32) {
        let bytes = value.to_ne_bytes();
        self.set(offset, u16::from_ne_bytes([bytes[0], bytes[1]]));
        self.set(offset + 2, u16::from_ne_bytes([bytes[2], bytes[3]]));
    }
}

/// A pointer to a `T` at `offset` bytes into the packet, or `None` if it would run past the end.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A copy of the `T` at `offset`, if the packet holds it. `T` is a byte array or an
/// integer; the read is unaligned because IP fields sit 2 bytes off a word boundary behind
/// the 14-byte Ethernet header.
#[inline(always)]
pub fn read<T: Copy>(ctx: &impl Frame, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the `T` lies inside the packet.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

/// Writes `value` at `offset`; `None` (and nothing written) if it would run past the end.
#[inline(always)]
pub fn write<T: Copy>(ctx: &impl Frame, offset: usize, value: T) -> Option<()> {
    // SAFETY: `ptr_at` checked that the `T` lies inside the packet, which XDP may modify (and
    // TC too: the verifier makes a cloned buffer private before a program that writes runs).
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.write_unaligned(value) })
}
