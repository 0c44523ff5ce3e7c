//! Server choice for one request, per worker and without locks.
//!
//! Each worker keeps its own round-robin state, reset when a new snapshot arrives; with
//! several workers each spreads its own requests by weight, so the sum does too.
//! Least-connections reads the shared in-flight counters, so it sees every worker's load.
//! Hashing uses the pool's Maglev table: a key keeps its server while the pool is unchanged
//! and a change moves about 1/N of keys.

use std::{net::SocketAddr, sync::atomic::Ordering, time::Instant};

use weir_config::{Balance, HashOn};
use xxhash_rust::xxh3::xxh3_64;

use super::{
    http::RequestHead,
    snapshot::{L7Snapshot, now_ms},
};

/// A worker's selection state.
#[derive(Debug, Default)]
pub struct Balancer {
    /// The snapshot generation `current` was sized for (`None` before the first pick).
    generation: Option<u64>,
    /// Smooth weighted round robin (as nginx): current weight per server, per vhost.
    current: Vec<Vec<i64>>,
    /// Where least-connections starts looking, advanced per pick.
    cursor: usize,
}

impl Balancer {
    /// The index (in the vhost's `servers`) of the server for `request` (`None` for a TLS
    /// connection passed through, which has no request to hash), skipping those in `exclude`
    /// (already tried for this request); `None` when no ready server is left.
    pub fn pick(
        &mut self,
        snapshot: &L7Snapshot,
        vhost: usize,
        request: Option<&RequestHead>,
        peer: SocketAddr,
        exclude: &[usize],
    ) -> Option<usize> {
        if self.generation != Some(snapshot.generation) {
            self.generation = Some(snapshot.generation);
            self.current = snapshot
                .vhosts
                .iter()
                .map(|v| vec![0; v.servers.len()])
                .collect();
        }
        let pool = &snapshot.vhosts[vhost];
        // Servers ejected by outlier detection are skipped while another choice remains.
        let now = now_ms();
        let ejected = |i: usize| pool.servers[i].stats.is_ejected(now);
        let any_left = pool
            .ready
            .iter()
            .any(|&i| !exclude.contains(&i) && !ejected(i));
        let skip = |i: usize| exclude.contains(&i) || (any_left && ejected(i));
        match pool.balance {
            Balance::Hash => {
                let key = pool
                    .hash_on
                    .as_ref()
                    .and_then(|on| hash_key(on, request, peer));
                if let Some(key) = key
                    && !pool.hash_table.is_empty()
                {
                    let slot = (xxh3_64(&key) % pool.hash_table.len() as u64) as usize;
                    let server = pool.hash_table[slot] as usize;
                    if !skip(server) {
                        return Some(server);
                    }
                }
                self.round_robin(snapshot, vhost, &skip)
            }
            Balance::LeastConnections => {
                // Ties go round the pool, so an idle pool is not all sent to its first server.
                self.cursor = self.cursor.wrapping_add(1);
                let n = pool.ready.len();
                let instant = Instant::now();
                let load = |i: usize| {
                    let server = &pool.servers[i];
                    (
                        u128::from(server.stats.in_flight.load(Ordering::Relaxed)),
                        u128::from(pool.weight(i, instant).max(1)),
                    )
                };
                (0..n)
                    .map(|k| pool.ready[(self.cursor + k) % n])
                    .filter(|&i| !skip(i))
                    // Fewest in flight per unit of weight: a/wa < b/wb as a·wb < b·wa.
                    .min_by(|&a, &b| {
                        let ((la, wa), (lb, wb)) = (load(a), load(b));
                        (la * wb).cmp(&(lb * wa))
                    })
            }
            Balance::RoundRobin => self.round_robin(snapshot, vhost, &skip),
        }
    }

    /// Smooth weighted round robin over the ready servers not excluded.
    fn round_robin(
        &mut self,
        snapshot: &L7Snapshot,
        vhost: usize,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let pool = &snapshot.vhosts[vhost];
        let current = &mut self.current[vhost];
        let now = Instant::now();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for &i in &pool.ready {
            if skip(i) {
                continue;
            }
            let weight = i64::from(pool.weight(i, now));
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

/// The bytes a hash pool hashes for `request`, if it carries them.
fn hash_key(on: &HashOn, request: Option<&RequestHead>, peer: SocketAddr) -> Option<Vec<u8>> {
    match on {
        HashOn::SourceIp => Some(peer.ip().to_string().into_bytes()),
        HashOn::Header(name) => request?.header(name).map(<[u8]>::to_vec),
        HashOn::Cookie(name) => request?.cookie(name).map(<[u8]>::to_vec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        l7::http::{HeadLimits, parse_request},
        vhosts::{Vhost, VhostServer},
    };
    use weir_config::{L7Config, control::AdminState};

    fn request(extra: &str) -> RequestHead {
        let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{extra}\r\n");
        let limits = HeadLimits {
            max_request_line: 8192,
            max_header_bytes: 65536,
            max_headers: 100,
        };
        parse_request(text.as_bytes(), &limits).unwrap().unwrap()
    }

    fn snapshot(
        balance: Balance,
        hash_on: Option<HashOn>,
        weights: &[(u32, AdminState)],
    ) -> L7Snapshot {
        let servers: Vec<_> = weights.iter().map(|&(w, s)| (w, s, None)).collect();
        snapshot_ramping(balance, hash_on, 0, &servers)
    }

    /// One vhost `a` with servers 127.0.0.10, .11, … of (weight, state, in rotation since).
    fn snapshot_ramping(
        balance: Balance,
        hash_on: Option<HashOn>,
        slow_start_ms: u64,
        servers: &[(u32, AdminState, Option<Instant>)],
    ) -> L7Snapshot {
        let listen = ["127.0.0.1:80".parse().unwrap()];
        let spec = Vhost {
            name: "a".into(),
            listen: listen[0],
            hosts: vec!["a".into()],
            default: false,
            balance,
            hash_on,
            health: None,
            outlier: None,
            slow_start_ms,
            redirect_to_https: false,
            hsts_max_age_secs: None,
            servers: servers
                .iter()
                .enumerate()
                .map(|(i, &(weight, state, ramp_since))| VhostServer {
                    address: SocketAddr::from(([127, 0, 0, 10 + i as u8], 80)),
                    weight,
                    state,
                    health: weir_config::control::HealthState::Unchecked,
                    ramp_since,
                    id: (),
                })
                .collect(),
            config_servers: Vec::new(),
        };
        L7Snapshot::build(1, L7Config::default(), &listen, &[spec], None)
    }

    const PEER: ([u8; 4], u16) = ([127, 0, 0, 1], 5000);

    #[test]
    fn round_robin_follows_weights_and_skips_servers_out_of_rotation() {
        let snapshot = snapshot(
            Balance::RoundRobin,
            None,
            &[
                (300, AdminState::Ready),
                (100, AdminState::Ready),
                (500, AdminState::Draining),
            ],
        );
        let mut balancer = Balancer::default();
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[balancer
                .pick(&snapshot, 0, Some(&request("")), PEER.into(), &[])
                .unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100, 0]);
        assert_eq!(
            balancer.pick(&snapshot, 0, Some(&request("")), PEER.into(), &[0]),
            Some(1)
        );
        assert_eq!(
            balancer.pick(&snapshot, 0, Some(&request("")), PEER.into(), &[0, 1]),
            None
        );
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_per_weight() {
        let snapshot = snapshot(
            Balance::LeastConnections,
            None,
            &[(100, AdminState::Ready), (200, AdminState::Ready)],
        );
        snapshot.vhosts[0].servers[0]
            .stats
            .in_flight
            .store(2, Ordering::Relaxed);
        snapshot.vhosts[0].servers[1]
            .stats
            .in_flight
            .store(3, Ordering::Relaxed);
        let mut balancer = Balancer::default();
        // 3/200 < 2/100
        assert_eq!(
            balancer.pick(&snapshot, 0, Some(&request("")), PEER.into(), &[]),
            Some(1)
        );
    }

    #[test]
    fn a_hash_key_keeps_its_server_and_falls_back_without_a_key() {
        let snapshot = snapshot(
            Balance::Hash,
            Some(HashOn::Cookie("sid".into())),
            &[
                (100, AdminState::Ready),
                (100, AdminState::Ready),
                (100, AdminState::Ready),
            ],
        );
        let mut balancer = Balancer::default();
        let mut seen = std::collections::HashSet::new();
        for user in 0..30 {
            let req = request(&format!("Cookie: a=b; sid=user{user}\r\n"));
            let first = balancer
                .pick(&snapshot, 0, Some(&req), PEER.into(), &[])
                .unwrap();
            for _ in 0..5 {
                assert_eq!(
                    balancer.pick(&snapshot, 0, Some(&req), PEER.into(), &[]),
                    Some(first)
                );
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3, "30 keys spread over all three servers");
        assert!(
            balancer
                .pick(&snapshot, 0, Some(&request("")), PEER.into(), &[])
                .is_some()
        );
    }

    #[test]
    fn a_ramping_server_gets_its_ramped_share() {
        let snapshot = snapshot_ramping(
            Balance::RoundRobin,
            None,
            100_000,
            &[
                (100, AdminState::Ready, None),
                (100, AdminState::Ready, Some(Instant::now())),
            ],
        );
        let mut balancer = Balancer::default();
        let mut counts = [0; 2];
        for _ in 0..1010 {
            counts[balancer
                .pick(&snapshot, 0, Some(&request("")), PEER.into(), &[])
                .unwrap()] += 1;
        }
        // Weight 1 (of 100) at the start of a 100 s ramp: about 1 in 101.
        assert!(counts[1] <= 15, "{counts:?}");
    }
}
