//! The flow table: which server each established flow is pinned to.
//!
//! A flow is keyed by its client→VIP 5-tuple. New flows pick a server from the VIP's Maglev
//! table by [`flow_hash`]; the pick is recorded so that the flow stays on its server when the
//! table changes (servers added, drained, reweighted). In NAT mode a second entry, keyed by the
//! server→client tuple, lets replies be rewritten back to the VIP.
//!
//! A flow is recorded there only once it has shown it is real: a TCP flow when the client's
//! handshake ACK arrives, a UDP flow on its second packet. Until then it is *embryonic*: one
//! entry in a table of its own ([`EmbryonicKey`] → [`Embryonic`]), with a short timeout. A
//! flood of spoofed first packets then churns only that table; it never evicts an
//! established flow (docs/datapath.md, "Embryonic flows and the flood guard").

use crate::l4::HashFields;

/// A flow as seen on the wire, in one direction. Same conventions as [`crate::l4::VipKey`]:
/// raw address words and network-order ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The same flow seen in the other direction.
    #[inline(always)]
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// [`FlowState::flags`]: a FIN or RST was seen; the flow is closing. Its entry still forwards
/// stragglers (retransmitted FINs, the last ACK) but no longer counts as active, and a SYN on
/// it starts a new connection that picks a server afresh.
pub const FLOW_CLOSING: u32 = 1;
/// [`FlowState::flags`] bits 8..16 hold the generation of the flow's server when the flow was
/// recorded (`crate::l4::SERVER_GENERATION_SHIFT`): the entry is used only while its server id
/// still has that generation.
pub const FLOW_GENERATION_SHIFT: u32 = 8;

impl FlowState {
    /// The generation of the server the flow was recorded with.
    #[inline(always)]
    pub const fn generation(&self) -> u8 {
        (self.flags >> FLOW_GENERATION_SHIFT) as u8
    }
}

/// Value of the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// The server id the flow is pinned to.
    pub server: u32,
    pub flags: u32,
    /// `bpf_ktime_get_coarse_ns` when the flow was last refreshed. Refreshed at most every
    /// [`FLOW_TOUCH_INTERVAL_NS`], so established flows do not write a shared cache line on
    /// every packet.
    pub last_seen_ns: u64,
}

/// How stale `last_seen_ns` may get before a packet refreshes it (and the NAT return entry).
pub const FLOW_TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// Value of the NAT return table, keyed by the server→client [`FlowKey`] of a NAT flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReturn {
    /// The VIP the client spoke to: the source replies must carry.
    pub vip: [u32; 4],
    /// Network byte order.
    pub vip_port: u16,
    /// The generation of `server` when the entry was written (see [`FlowState::generation`]).
    pub generation: u16,
    pub server: u32,
}

/// Key of the embryonic table: the client side of a flow, which both directions can name —
/// the client's packets carry it as their source, a server's replies as their destination.
/// Same conventions as [`FlowKey`]. Two embryonic flows from one client address and port (to
/// two VIPs at once) share an entry; the later one wins and the earlier one's next packet
/// picks from the Maglev table again, which gives the same server unless the table changed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EmbryonicKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

impl EmbryonicKey {
    /// The client side of the client→VIP flow `key`.
    #[inline(always)]
    pub const fn client_of(key: &FlowKey) -> EmbryonicKey {
        EmbryonicKey {
            addr: key.src,
            port: key.src_port,
            protocol: key.protocol,
            family: key.family,
        }
    }

    /// The client side of the server→client reply `key`.
    #[inline(always)]
    pub const fn client_of_reply(key: &FlowKey) -> EmbryonicKey {
        EmbryonicKey {
            addr: key.dst,
            port: key.dst_port,
            protocol: key.protocol,
            family: key.family,
        }
    }
}

/// Value of the embryonic table: the server a flow's first packet picked and the VIP it was
/// for. Replies of an embryonic NAT flow (a SYN-ACK) take their VIP from here, so a new NAT
/// flow costs one insert, as a DSR one does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Embryonic {
    /// The VIP, its port and the picked server, exactly as a NAT return entry holds them.
    pub nat: NatReturn,
    /// `bpf_ktime_get_coarse_ns` of the flow's last packet, refreshed like [`FlowState`]'s.
    pub last_seen_ns: u64,
}

/// The hash that places a new flow in its VIP's Maglev table.
///
/// Murmur3's 32-bit mixing over the key's words. It is part of the datapath's contract: the
/// same key and seed give the same hash on every node, in the kernel and in userspace (tests
/// predict the server a flow lands on with it).
#[inline(always)]
pub fn flow_hash(key: &FlowKey, fields: HashFields, seed: u32) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < 4 {
        h = mix(h, key.src[i]);
        i += 1;
    }
    if let HashFields::FiveTuple = fields {
        let mut i = 0;
        while i < 4 {
            h = mix(h, key.dst[i]);
            i += 1;
        }
        h = mix(h, (key.src_port as u32) << 16 | key.dst_port as u32);
        h = mix(h, key.protocol as u32);
    }
    finish(h)
}

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src_port: u16) -> FlowKey {
        FlowKey {
            src: [0x0100_12c6, 0, 0, 0],
            dst: [0x0a64_12c6, 0, 0, 0],
            src_port: src_port.to_be(),
            dst_port: 80u16.to_be(),
            protocol: 6,
            family: 4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn hash_depends_on_seed_ports_and_fields() {
        let a = flow_hash(&key(40000), HashFields::FiveTuple, 7);
        assert_eq!(a, flow_hash(&key(40000), HashFields::FiveTuple, 7));
        assert_ne!(a, flow_hash(&key(40001), HashFields::FiveTuple, 7));
        assert_ne!(a, flow_hash(&key(40000), HashFields::FiveTuple, 8));
        // Source-address hashing ignores ports.
        assert_eq!(
            flow_hash(&key(40000), HashFields::SourceIp, 7),
            flow_hash(&key(40001), HashFields::SourceIp, 7)
        );
    }

    #[test]
    fn hash_spreads_ports_evenly_over_a_table() {
        let size = 65537u32;
        let buckets = 16usize;
        let mut counts = [0u32; 16];
        for port in 0..20000u16 {
            let slot = flow_hash(&key(port), HashFields::FiveTuple, 1) % size;
            counts[slot as usize * buckets / size as usize] += 1;
        }
        let expected = 20000 / buckets as u32;
        for count in counts {
            assert!(count.abs_diff(expected) < expected / 8, "{counts:?}");
        }
    }
}
