//! Userspace-only glue (feature `user`): `aya::Pod` for every map type, and conversions
//! between `std::net` addresses and the raw words the maps hold.

use std::net::{IpAddr, SocketAddr};

use crate::{
    Counter, TrafficCounter,
    flow::{FlowKey, FlowState, NatReturn},
    l4::{DatapathSettings, FAMILY_IPV4, FAMILY_IPV6, ServerInfo, VipInfo, VipKey},
};

// SAFETY (all impls): each type is `#[repr(C)]`, built only from integers and integer
// arrays with explicit padding fields, so it has no implicit padding and every bit pattern is
// a valid value — what the kernel may hand back from a map.
unsafe impl aya::Pod for Counter {}
unsafe impl aya::Pod for TrafficCounter {}
unsafe impl aya::Pod for VipKey {}
unsafe impl aya::Pod for VipInfo {}
unsafe impl aya::Pod for ServerInfo {}
unsafe impl aya::Pod for DatapathSettings {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for FlowState {}
unsafe impl aya::Pod for NatReturn {}
unsafe impl aya::Pod for crate::l4::NextHop {}
unsafe impl aya::Pod for crate::flow::EmbryonicKey {}
unsafe impl aya::Pod for crate::flow::Embryonic {}
unsafe impl aya::Pod for crate::edge::AddressKey {}
unsafe impl aya::Pod for crate::edge::EdgeSettings {}
unsafe impl aya::Pod for crate::edge::FloodWindow {}
unsafe impl aya::Pod for crate::l4::VipSlot {}
unsafe impl aya::Pod for crate::l4::ClockCache {}

impl crate::edge::AddressKey {
    /// The key of `ip` in the self-address set.
    pub fn of(ip: IpAddr) -> crate::edge::AddressKey {
        let (addr, family) = addr_words(ip);
        crate::edge::AddressKey {
            addr,
            family,
            _pad: [0; 3],
        }
    }
}

/// The raw words and family tag of an address, as the datapath stores it.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_IPV4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_IPV6)
        }
    }
}

/// The address stored as `words` with `family`.
pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(octets)
    }
}

impl ServerInfo {
    /// A present server at `addr`, of generation 0.
    pub fn new(addr: SocketAddr) -> ServerInfo {
        ServerInfo::with_generation(addr, 0)
    }

    /// A present server at `addr` of `generation`.
    pub fn with_generation(addr: SocketAddr, generation: u8) -> ServerInfo {
        let (words, family) = addr_words(addr.ip());
        ServerInfo {
            addr: words,
            port: addr.port().to_be(),
            family,
            flags: crate::l4::SERVER_PRESENT | generation << crate::l4::SERVER_GENERATION_SHIFT,
        }
    }

    /// An empty slot that remembers `generation`, so the id's next holder gets the one after.
    pub fn emptied(generation: u8) -> ServerInfo {
        ServerInfo {
            flags: generation << crate::l4::SERVER_GENERATION_SHIFT,
            ..ServerInfo::default()
        }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(words_addr(self.addr, self.family), u16::from_be(self.port))
    }
}

impl VipKey {
    pub fn new(addr: SocketAddr, protocol: u8) -> VipKey {
        let (words, family) = addr_words(addr.ip());
        VipKey {
            addr: words,
            port: addr.port().to_be(),
            protocol,
            family,
        }
    }
}

impl FlowKey {
    /// The key of a flow from `src` to `dst` (client→VIP, or server→client for NAT returns).
    pub fn new(src: SocketAddr, dst: SocketAddr, protocol: u8) -> FlowKey {
        let (src_words, family) = addr_words(src.ip());
        let (dst_words, _) = addr_words(dst.ip());
        FlowKey {
            src: src_words,
            dst: dst_words,
            src_port: src.port().to_be(),
            dst_port: dst.port().to_be(),
            protocol,
            family,
            _pad: [0; 2],
        }
    }

    pub fn src_addr(&self) -> SocketAddr {
        SocketAddr::new(
            words_addr(self.src, self.family),
            u16::from_be(self.src_port),
        )
    }

    pub fn dst_addr(&self) -> SocketAddr {
        SocketAddr::new(
            words_addr(self.dst, self.family),
            u16::from_be(self.dst_port),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_words() {
        for ip in ["198.18.0.1", "fd00::1:2", "::ffff:198.18.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (words, family) = addr_words(ip);
            assert_eq!(words_addr(words, family), ip);
        }
        let server: SocketAddr = "198.18.11.2:8080".parse().unwrap();
        assert_eq!(ServerInfo::new(server).socket_addr(), server);
    }
}
