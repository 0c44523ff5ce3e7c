//! Sources that cannot open a flow to a VIP. Checked once per new flow (a packet that finds
//! its flow recorded passed this when the flow began), so established traffic pays nothing.
//!
//! - **Martian**: an address no client can have — unspecified (`0.0.0.0/8`, `::`), loopback
//!   (`127.0.0.0/8`, `::1`), multicast (`224.0.0.0/4`, `ff00::/8`), reserved and limited
//!   broadcast (`240.0.0.0/4`), IPv4-mapped IPv6 (`::ffff:0:0/96`, which no host sends on
//!   the wire). The kernel would drop these as martians; a balancer that forwards them makes
//!   its servers answer into the void, or onto their own loopback.
//! - **Spoofed**: one of the balancer's own addresses — a VIP, or an address of one of its
//!   interfaces (`WEIR_SELF_ADDRESSES`, kept by the daemon). A SYN "from the VIP" makes the
//!   NAT server answer to the VIP, which weir maps back to the server: a reflection loop.

use weir_common::{Stat, edge::AddressKey, l4::FAMILY_IPV4};

use crate::{maps::WEIR_SELF_ADDRESSES, parse::Packet};

/// `Err` with the reason when `packet`'s source cannot open a flow.
#[inline(always)]
pub fn check(packet: &Packet) -> Result<(), Stat> {
    if is_martian(packet) {
        return Err(Stat::DropMartianSource);
    }
    let key = AddressKey {
        addr: packet.src,
        family: packet.family,
        _pad: [0; 3],
    };
    // SAFETY: only whether the entry exists is read.
    if unsafe { WEIR_SELF_ADDRESSES.get(key) }.is_some() {
        return Err(Stat::DropSpoofedSource);
    }
    Ok(())
}

/// The source classes above, from the address bytes (raw words: byte 0 of the address is
/// byte 0 of word 0 in memory, whatever the host's byte order).
#[inline(always)]
fn is_martian(packet: &Packet) -> bool {
    let src = packet.src;
    if packet.family == FAMILY_IPV4 {
        let first = src[0].to_ne_bytes()[0];
        return first == 0 || first == 127 || first >= 224;
    }
    let leading_zero = src[0] == 0 && src[1] == 0;
    let unspecified = leading_zero && src[2] == 0 && src[3] == 0;
    let loopback = leading_zero && src[2] == 0 && src[3] == u32::from_ne_bytes([0, 0, 0, 1]);
    let v4_mapped = leading_zero && src[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    let multicast = src[0].to_ne_bytes()[0] == 0xff;
    unspecified || loopback || v4_mapped || multicast
}
