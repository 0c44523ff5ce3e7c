//! The Maglev builder on any pool: it never panics; a table has every slot on a server with
//! a positive weight; and it is the same table whatever order the servers come in (what lets
//! several nodes agree without coordinating).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use weir_forwarder::maglev::{MaglevServer, MaglevTable};

#[derive(Debug, Arbitrary)]
struct Pool {
    servers: Vec<(u8, u8, u16, u16)>,
    size: u8,
    seed: u64,
}

/// Primes a table may have (the builder refuses others, which is checked too).
const SIZES: [u32; 6] = [1, 7, 13, 251, 1009, 4099];

fuzz_target!(|pool: Pool| {
    let mut servers: Vec<MaglevServer> = pool
        .servers
        .iter()
        .take(300)
        .map(|&(a, b, port, weight)| MaglevServer {
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, a, b)), port),
            weight: u32::from(weight % 10_001),
        })
        .collect();
    servers.sort_by_key(|s| s.address);
    servers.dedup_by_key(|s| s.address);
    let size = SIZES[usize::from(pool.size) % SIZES.len()];
    let Ok(built) = MaglevTable::build(&servers, size, pool.seed) else {
        assert!(size == 1 || servers.len() > size as usize);
        return;
    };
    let Some(table) = built else {
        assert!(servers.iter().all(|s| s.weight == 0));
        return;
    };
    assert_eq!(table.slots().len(), size as usize);
    for &slot in table.slots() {
        assert!(servers[slot as usize].weight > 0);
    }
    let reversed: Vec<MaglevServer> = servers.iter().rev().cloned().collect();
    let again = MaglevTable::build(&reversed, size, pool.seed).unwrap().unwrap();
    let addresses = |t: &MaglevTable, list: &[MaglevServer]| -> Vec<SocketAddr> {
        t.slots().iter().map(|&i| list[i as usize].address).collect()
    };
    assert_eq!(addresses(&table, &servers), addresses(&again, &reversed));
});
