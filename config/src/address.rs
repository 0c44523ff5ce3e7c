//! Which server addresses can work: the rules `config check`, a reload and `weirctl server
//! add` apply alike (the daemon adds one more that needs the host: an L4 server may not be one
//! of the balancer's own addresses).
//!
//! | address | L4 pool | L7 pool |
//! |---|---|---|
//! | port 0 | refused | refused |
//! | unspecified (`0.0.0.0`, `::`) | refused | refused |
//! | multicast (`224.0.0.0/4`, `ff00::/8`) | refused | refused |
//! | broadcast and reserved (`255.255.255.255`, `240.0.0.0/4`) | refused | refused |
//! | loopback (`127.0.0.0/8`, `::1`) | refused: XDP forwards to other hosts, never to this one | allowed: a local origin |
//! | an L4 VIP's address | refused: the balancer would forward to itself | allowed unless it is a listen address |
//! | an L7 listen address (address and port) | — | refused: the proxy would connect to itself |

use std::net::{IpAddr, SocketAddr};

/// The kind of pool a server is for, with what its rules need to know.
pub enum PoolKind<'a> {
    /// An L4 VIP's pool; `vips` are the addresses of every L4 VIP.
    L4 { vips: &'a [IpAddr] },
    /// A vhost's pool; `listen` are the L7 listen addresses.
    L7 { listen: &'a [SocketAddr] },
}

/// Why a server at `address` cannot work in a pool of `kind`, if it cannot.
pub fn server_address_problem(address: SocketAddr, kind: &PoolKind) -> Option<String> {
    let ip = address.ip();
    let reason = if address.port() == 0 {
        "port 0 is no port a server listens on".to_string()
    } else if ip.is_unspecified() {
        format!("{ip} is the unspecified address: no server has it")
    } else if ip.is_multicast() {
        format!("{ip} is a multicast address: no TCP or UDP server answers there")
    } else if let IpAddr::V4(v4) = ip
        && (v4.is_broadcast() || v4.octets()[0] >= 240)
    {
        format!("{ip} is a broadcast or reserved address")
    } else {
        match kind {
            PoolKind::L4 { .. } if ip.is_loopback() => format!(
                "{ip} is loopback: the XDP datapath forwards to other hosts, never to this one \
                 (a local service belongs in a vhost's pool)"
            ),
            PoolKind::L4 { vips } if vips.contains(&ip) => {
                format!("{ip} is an L4 VIP: the balancer would forward to itself")
            }
            PoolKind::L7 { listen } if listen.contains(&address) => {
                format!("{address} is an L7 listen address: the proxy would connect to itself")
            }
            _ => return None,
        }
    };
    Some(format!("server {address} cannot work: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_is_refused_where_it_cannot_work() {
        let vips: Vec<IpAddr> = vec!["198.18.100.10".parse().unwrap()];
        let listen: Vec<SocketAddr> = vec!["198.18.100.11:80".parse().unwrap()];
        let l4 = PoolKind::L4 { vips: &vips };
        let l7 = PoolKind::L7 { listen: &listen };
        for (address, in_l4, in_l7) in [
            ("198.18.11.2:8080", true, true),
            ("198.18.11.2:0", false, false),
            ("0.0.0.0:8080", false, false),
            ("[::]:8080", false, false),
            ("224.0.0.1:8080", false, false),
            ("[ff02::1]:8080", false, false),
            ("255.255.255.255:8080", false, false),
            ("240.0.0.1:8080", false, false),
            ("127.0.0.1:8080", false, true),
            ("[::1]:8080", false, true),
            ("198.18.100.10:80", false, true),
            ("198.18.100.11:80", true, false),
            ("198.18.100.11:8080", true, true),
        ] {
            let address: SocketAddr = address.parse().unwrap();
            assert_eq!(
                server_address_problem(address, &l4).is_none(),
                in_l4,
                "{address} in an L4 pool: {:?}",
                server_address_problem(address, &l4)
            );
            assert_eq!(
                server_address_problem(address, &l7).is_none(),
                in_l7,
                "{address} in an L7 pool: {:?}",
                server_address_problem(address, &l7)
            );
        }
    }
}
