//! Maglev lookup tables (Eisenbud et al., NSDI 2016), with weights.
//!
//! A VIP's table has a prime number of slots `M` (65537 by default); the XDP program picks a new
//! flow's server as `table[hash(5-tuple) % M]`. The table is built here, in userspace, and
//! written to a kernel map whole.
//!
//! Properties the datapath relies on:
//! - **Deterministic across nodes**: the table depends only on the seed, `M` and the set of
//!   (server, weight) — not on the order servers were added — so every weir node with the same
//!   config builds the same table and any node can take any flow (scale-out with ECMP).
//! - **Minimal disruption**: adding or removing one of `N` servers changes about `1/N` of the
//!   slots, so only new flows hashing to those slots move; established flows are pinned by the
//!   flow table anyway.
//! - **Weights honoured**: each server's share of slots is proportional to its weight.
//!
//! Weights use the cumulative-credit scheme Katran uses: every round each server earns its
//! weight in credit and claims one slot (its next preferred free one) for each `max_weight` of
//! credit, so the heaviest server claims one slot per round and the others proportionally.

use std::net::SocketAddr;

use weir_config::is_prime;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Slots in a table unless the config says otherwise (prime, as Maglev requires).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// One entry of the pool a table is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevServer {
    /// What identifies the server in the hash: its address and port.
    pub address: SocketAddr,
    /// Relative weight; 0 means the server takes no new flows.
    pub weight: u32,
}

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("table size {0} is not a prime number")]
    SizeNotPrime(u32),
    #[error("table size {size} is smaller than the {servers} servers it must hold")]
    TooSmall { size: u32, servers: usize },
}

/// A built table: `slots[i]` is an index into the server list it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Vec<u32>,
}

impl MaglevTable {
    /// Builds the table of `size` slots for `servers`, hashing with `seed`.
    ///
    /// Returns `Ok(None)` when no server has a positive weight: there is nothing to send new
    /// flows to, and the caller decides what the VIP does then.
    pub fn build(
        servers: &[MaglevServer],
        size: u32,
        seed: u64,
    ) -> Result<Option<MaglevTable>, MaglevError> {
        if !is_prime(size) {
            return Err(MaglevError::SizeNotPrime(size));
        }
        if servers.len() > size as usize {
            return Err(MaglevError::TooSmall {
                size,
                servers: servers.len(),
            });
        }
        // Visit servers in a canonical order so the caller's order does not matter.
        let mut order: Vec<usize> = (0..servers.len())
            .filter(|&i| servers[i].weight > 0)
            .collect();
        if order.is_empty() {
            return Ok(None);
        }
        order.sort_by_key(|&i| key(&servers[i].address));
        let max_weight = order.iter().map(|&i| servers[i].weight).max().unwrap_or(1) as u64;

        let m = size as u64;
        let permutations: Vec<Permutation> = order
            .iter()
            .map(|&i| Permutation::new(&servers[i].address, m, seed))
            .collect();
        let mut next = vec![0u64; order.len()];
        let mut credit = vec![0u64; order.len()];
        const EMPTY: u32 = u32::MAX;
        let mut slots = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (k, &server) in order.iter().enumerate() {
                credit[k] += servers[server].weight as u64;
                while credit[k] >= max_weight {
                    credit[k] -= max_weight;
                    // The server's next preferred slot that is still free. Terminates: the
                    // permutation visits every slot and at least one is free.
                    let mut slot = permutations[k].at(next[k]);
                    while slots[slot as usize] != EMPTY {
                        next[k] += 1;
                        slot = permutations[k].at(next[k]);
                    }
                    slots[slot as usize] = server as u32;
                    next[k] += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Ok(Some(MaglevTable { slots }))
    }

    /// The slots, each an index into the server list the table was built from.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// How many slots point at server `index`.
    pub fn share(&self, index: u32) -> usize {
        self.slots.iter().filter(|&&s| s == index).count()
    }
}

/// A server's preference order over the slots: `offset + j * skip (mod M)`. With `M` prime and
/// `1 <= skip < M`, this visits every slot exactly once.
struct Permutation {
    offset: u64,
    skip: u64,
    m: u64,
}

impl Permutation {
    fn new(address: &SocketAddr, m: u64, seed: u64) -> Self {
        let key = key(address);
        Permutation {
            offset: xxh3_64_with_seed(&key, seed) % m,
            skip: xxh3_64_with_seed(&key, seed ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1,
            m,
        }
    }

    fn at(&self, j: u64) -> u64 {
        (self.offset + (j % self.m) * self.skip) % self.m
    }
}

/// The bytes that identify a server: family-independent (IPv4 as mapped IPv6) and stable.
fn key(address: &SocketAddr) -> [u8; 18] {
    let mut key = [0u8; 18];
    let ip = match address {
        SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
        SocketAddr::V6(v6) => *v6.ip(),
    };
    key[..16].copy_from_slice(&ip.octets());
    key[16..].copy_from_slice(&address.port().to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 0x7765_6972;

    fn pool(weights: &[u32]) -> Vec<MaglevServer> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| MaglevServer {
                address: SocketAddr::from((
                    [198, 18, 1 + (i / 200) as u8, (i % 200) as u8 + 10],
                    8080,
                )),
                weight,
            })
            .collect()
    }

    fn build(servers: &[MaglevServer]) -> MaglevTable {
        MaglevTable::build(servers, DEFAULT_TABLE_SIZE, SEED)
            .unwrap()
            .unwrap()
    }

    /// Asserts every server's share is within 1% (relative) of its weight share.
    fn assert_shares_follow_weights(servers: &[MaglevServer]) {
        let table = build(servers);
        let total: u64 = servers.iter().map(|s| s.weight as u64).sum();
        for (i, server) in servers.iter().enumerate() {
            let expected = DEFAULT_TABLE_SIZE as f64 * server.weight as f64 / total as f64;
            let got = table.share(i as u32) as f64;
            let error = (got - expected).abs() / expected;
            assert!(
                error <= 0.01,
                "server {i} (weight {}): {got} slots, expected {expected:.1} ({:.3}% off)",
                server.weight,
                error * 100.0
            );
        }
    }

    #[test]
    fn equal_weights_share_equally() {
        assert_shares_follow_weights(&pool(&[100; 10]));
        assert_shares_follow_weights(&pool(&[1; 3]));
    }

    #[test]
    fn unequal_weights_are_honoured() {
        assert_shares_follow_weights(&pool(&[100, 200, 300, 400]));
        assert_shares_follow_weights(&pool(&[1, 10, 100, 1000, 50, 7]));
    }

    #[test]
    fn every_slot_is_filled_with_a_weighted_server() {
        let servers = pool(&[5, 0, 5]);
        let table = build(&servers);
        assert_eq!(table.slots().len(), DEFAULT_TABLE_SIZE as usize);
        assert_eq!(table.share(1), 0, "a weight-0 server takes no slots");
        assert_eq!(table.share(0) + table.share(2), DEFAULT_TABLE_SIZE as usize);
    }

    #[test]
    fn identical_inputs_give_identical_tables_in_any_order() {
        let servers = pool(&[100, 50, 100, 25, 100]);
        let table = build(&servers);
        assert_eq!(table, build(&servers));
        // Reversed input: same server for every slot (indices differ, addresses must not).
        let reversed: Vec<_> = servers.iter().rev().copied().collect();
        let other = build(&reversed);
        let n = servers.len() as u32;
        for (a, b) in table.slots().iter().zip(other.slots()) {
            assert_eq!(*a, n - 1 - *b);
        }
        // A different seed gives a different table (the seed is really used).
        let reseeded = MaglevTable::build(&servers, DEFAULT_TABLE_SIZE, SEED + 1)
            .unwrap()
            .unwrap();
        assert_ne!(table, reseeded);
    }

    /// Fraction of slots whose server (by address) differs between two tables.
    fn moved(a: (&[MaglevServer], &MaglevTable), b: (&[MaglevServer], &MaglevTable)) -> f64 {
        let changed =
            a.1.slots()
                .iter()
                .zip(b.1.slots())
                .filter(|(x, y)| a.0[**x as usize].address != b.0[**y as usize].address)
                .count();
        changed as f64 / DEFAULT_TABLE_SIZE as f64
    }

    #[test]
    fn removing_or_adding_one_of_n_moves_about_one_nth() {
        for n in [5usize, 10, 50] {
            let all = pool(&vec![100; n + 1]);
            let (without, with) = (&all[..n], &all[..]);
            let (t_without, t_with) = (build(without), build(with));
            let fraction = moved((without, &t_without), (with, &t_with));
            let ideal = 1.0 / (n + 1) as f64;
            // Maglev trades a little extra movement for balance; the paper and our runs show
            // well under 1.5x the ideal at these sizes.
            assert!(
                fraction >= ideal * 0.9 && fraction <= ideal * 1.5,
                "n={n}: {:.4} of slots moved, ideal {:.4}",
                fraction,
                ideal
            );
        }
    }

    #[test]
    fn draining_a_server_to_weight_zero_moves_only_its_slots_and_a_few_more() {
        let servers = pool(&[100; 10]);
        let mut drained = servers.clone();
        drained[3].weight = 0;
        let (before, after) = (build(&servers), build(&drained));
        assert_eq!(after.share(3), 0);
        let fraction = moved((&servers, &before), (&drained, &after));
        assert!(fraction <= 0.1 * 1.5, "{fraction:.4} of slots moved");
    }

    #[test]
    fn bad_sizes_and_empty_pools() {
        assert_eq!(
            MaglevTable::build(&pool(&[1]), 65536, SEED),
            Err(MaglevError::SizeNotPrime(65536))
        );
        assert_eq!(
            MaglevTable::build(&pool(&[1; 4]), 3, SEED),
            Err(MaglevError::TooSmall {
                size: 3,
                servers: 4
            })
        );
        assert_eq!(MaglevTable::build(&[], 13, SEED), Ok(None));
        assert_eq!(MaglevTable::build(&pool(&[0, 0]), 13, SEED), Ok(None));
        // A tiny prime table still fills every slot.
        let table = MaglevTable::build(&pool(&[1, 1, 1]), 13, SEED)
            .unwrap()
            .unwrap();
        assert!(table.slots().iter().all(|&s| s < 3));
    }
}
