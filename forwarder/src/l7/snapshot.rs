//! What the L7 workers route with: an immutable snapshot of listeners, virtual hosts and
//! pools, published by the daemon on every change and swapped in atomically (`arc-swap`), so
//! a worker reads it without a lock and a request sees one consistent version from routing
//! to server choice.
//!
//! Per-server counters live outside the snapshot's lifetime (shared `Arc`s carried from one
//! snapshot to the next for servers that stay), so a change neither resets them nor loses
//! the in-flight count a drain waits on.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use weir_config::{
    AllDown, Balance, Config, HashOn, L7Config, OutlierDetection,
    control::{AdminState, RESPONSE_TIME_BOUNDS_SECS, RESPONSE_TIME_BUCKETS},
};

use super::tls::TlsListeners;
use crate::{
    maglev::{DEFAULT_TABLE_SIZE, MaglevServer, MaglevTable},
    pool::{in_rotation, ramped_weight},
    vhosts::{Vhost, Vhosts},
};

/// Counters of one server of one vhost, shared by all workers.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests sent to the server and not yet answered in full.
    pub in_flight: AtomicU64,
    pub requests: AtomicU64,
    /// Responses by class: 1xx (final only: 101), 2xx, 3xx, 4xx, 5xx.
    pub responses: [AtomicU64; 5],
    /// Connection failures, resets and timeouts talking to the server.
    pub failures: AtomicU64,
    /// Connections opened to the server.
    pub connections: AtomicU64,
    /// Connections to the server open now, in use or idle for reuse.
    pub open_connections: AtomicU64,
    /// Connection attempts that failed or timed out (also counted in `failures`).
    pub connect_failures: AtomicU64,
    /// Requests sent again (to it or another server) after failing on it.
    pub retries: AtomicU64,
    /// Bytes written to the server: request heads as rewritten, and bodies.
    pub request_bytes: AtomicU64,
    /// Bytes of its responses relayed to clients: heads as rewritten, and bodies.
    pub response_bytes: AtomicU64,
    /// Failed requests in a row (outlier detection).
    pub consecutive_failures: AtomicU32,
    /// Until when ([`now_ms`]) outlier detection keeps the server out of selection.
    pub ejected_until_ms: AtomicU64,
    /// Times it was ejected (each ejection lasts longer).
    pub ejections: AtomicU32,
    /// Response times, bucketed as [`RESPONSE_TIME_BOUNDS_SECS`] says (not cumulative).
    pub response_time_buckets: [AtomicU64; RESPONSE_TIME_BUCKETS],
    pub response_time_sum_us: AtomicU64,
}

/// Milliseconds on a monotonic clock shared by all workers (since the first call).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl ServerStats {
    /// Whether outlier detection has it out of selection at `now` ([`now_ms`]).
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Counts a response head with `status` that took `elapsed` from choosing the server.
    pub fn response(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = RESPONSE_TIME_BOUNDS_SECS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(RESPONSE_TIME_BOUNDS_SECS.len());
        self.response_time_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.response_time_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}

/// A server as the workers see it.
#[derive(Debug, Clone)]
pub struct PoolServer {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// When it entered the rotation, for slow start.
    pub ramp_since: Option<Instant>,
    pub stats: Arc<ServerStats>,
}

/// A virtual host and its pool.
#[derive(Debug, Clone)]
pub struct VhostPool {
    pub name: String,
    pub balance: Balance,
    pub hash_on: Option<HashOn>,
    /// Every server of the pool, ready or not (so workers can close idle connections to the
    /// ones that left the rotation).
    pub servers: Vec<PoolServer>,
    /// Indexes into `servers` of those that take new requests.
    pub ready: Vec<usize>,
    /// Maglev table over `ready` (for `Balance::Hash`): slot → index into `servers`.
    pub hash_table: Vec<u32>,
    pub requests: Arc<AtomicU64>,
    pub outlier: Option<OutlierDetection>,
    pub slow_start_ms: u64,
    /// Requests get `308` to the same URL over HTTPS instead of reaching the pool.
    pub redirect_to_https: bool,
    /// Whole header lines added to every response it relays (HSTS), rendered once here.
    pub response_headers: Vec<u8>,
}

impl VhostPool {
    /// Server `index`'s weight at `now`, slow start applied.
    pub fn weight(&self, index: usize, now: Instant) -> u32 {
        let server = &self.servers[index];
        ramped_weight(server.weight, server.ramp_since, self.slow_start_ms, now)
    }

    /// Records how a request to server `index` ended, for outlier detection: a failure
    /// that completes a run of `consecutive_failures` ejects it, unless that would put more
    /// than `max_ejection_percent` of the ready servers out at once. Returns the ejection's
    /// length when it ejects.
    pub fn record_outcome(&self, index: usize, ok: bool) -> Option<u64> {
        let outlier = self.outlier.as_ref()?;
        let stats = &self.servers[index].stats;
        if ok {
            stats.consecutive_failures.store(0, Ordering::Relaxed);
            return None;
        }
        let failures = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        if failures < outlier.consecutive_failures || stats.is_ejected(now) {
            return None;
        }
        let ejected = self
            .ready
            .iter()
            .filter(|&&i| self.servers[i].stats.is_ejected(now))
            .count();
        let cap = self.ready.len() * outlier.max_ejection_percent as usize / 100;
        if ejected >= cap {
            return None;
        }
        let times = u64::from(stats.ejections.fetch_add(1, Ordering::Relaxed)) + 1;
        let length = (outlier.base_ejection_ms * times).min(outlier.max_ejection_ms);
        stats
            .ejected_until_ms
            .store(now + length, Ordering::Relaxed);
        stats.consecutive_failures.store(0, Ordering::Relaxed);
        Some(length)
    }
}

/// How one listener maps a Host to a vhost.
#[derive(Debug, Clone)]
pub struct ListenerRoutes {
    pub address: SocketAddr,
    exact: HashMap<String, usize>,
    /// (`.example.com`, vhost), longest suffix first.
    wildcards: Vec<(String, usize)>,
    default: Option<usize>,
}

impl ListenerRoutes {
    /// The routes of the listener on `address`, from every vhost as `(listen, hosts, default)`
    /// in config order (a route names a vhost by its position).
    fn new<'a, H: IntoIterator<Item = &'a str>>(
        address: SocketAddr,
        vhosts: impl IntoIterator<Item = (SocketAddr, H, bool)>,
    ) -> ListenerRoutes {
        let mut routes = ListenerRoutes {
            address,
            exact: HashMap::new(),
            wildcards: Vec::new(),
            default: None,
        };
        for (index, (listen, hosts, default)) in vhosts.into_iter().enumerate() {
            if listen != address {
                continue;
            }
            for host in hosts {
                match host.strip_prefix('*') {
                    Some(suffix) => routes.wildcards.push((suffix.to_string(), index)),
                    None => {
                        routes.exact.insert(host.to_string(), index);
                    }
                }
            }
            if default {
                routes.default = Some(index);
            }
        }
        routes
            .wildcards
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        routes
    }

    /// The routes of the listener on `address` as `config` has its vhosts (what TLS chooses
    /// certificates with before the pools exist).
    pub fn of_config(address: SocketAddr, config: &Config) -> ListenerRoutes {
        ListenerRoutes::new(
            address,
            config.vhosts.iter().map(|v| {
                let hosts = v.hosts.iter().map(|h| h.get_ref().as_str());
                (v.listen, hosts, v.default)
            }),
        )
    }

    /// The vhost serving `host` (normalised: lower case, no port): an exact name, else the
    /// longest matching wildcard, else the listener's default.
    pub fn route(&self, host: Option<&str>) -> Option<usize> {
        let Some(host) = host else {
            return self.default;
        };
        if let Some(&vhost) = self.exact.get(host) {
            return Some(vhost);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|&(_, vhost)| vhost)
            .or(self.default)
    }
}

/// Everything the workers need, as of one change.
#[derive(Debug, Clone)]
pub struct L7Snapshot {
    /// Increases with every published snapshot; workers reset their per-pool state on change.
    pub generation: u64,
    pub settings: L7Config,
    /// In the order of the workers' listening sockets.
    pub listeners: Vec<ListenerRoutes>,
    pub vhosts: Vec<VhostPool>,
    /// Servers some pool has in rotation (admin-ready and not unhealthy, as `ready` says):
    /// the ones whose idle connections are worth keeping. Precomputed, so a finished response
    /// asks one set instead of scanning every pool.
    pub reusable: HashSet<SocketAddr>,
    /// The TLS configs of the listeners that terminate TLS, and the certificates.
    pub tls: Arc<TlsListeners>,
}

impl L7Snapshot {
    /// What the workers route `vhosts` with under `config`'s `[l7]` settings and listeners,
    /// with the certificates `tls` loaded from it, carrying counters over from `previous` (and
    /// the generation, which `publish` steps).
    pub fn of(
        vhosts: &Vhosts,
        config: &Config,
        tls: Arc<TlsListeners>,
        previous: Option<&L7Snapshot>,
    ) -> L7Snapshot {
        let mut snapshot = L7Snapshot::build(
            previous.map_or(0, |p| p.generation),
            config.l7.clone(),
            &config.l7_listen_addresses(),
            vhosts.as_slice(),
            previous,
        );
        snapshot.tls = tls;
        snapshot
    }

    /// Builds the snapshot for `listeners` (fixed at start) and `vhosts`, carrying counters
    /// over from `previous`: each vhost as the control plane's model holds it, with its
    /// servers as they are there (one server type from control to L7).
    pub fn build(
        generation: u64,
        settings: L7Config,
        listeners: &[SocketAddr],
        vhosts: &[Vhost],
        previous: Option<&L7Snapshot>,
    ) -> L7Snapshot {
        let routes: Vec<ListenerRoutes> = listeners
            .iter()
            .map(|&address| {
                ListenerRoutes::new(
                    address,
                    vhosts.iter().map(|v| {
                        let hosts = v.hosts.iter().map(String::as_str);
                        (v.listen, hosts, v.default)
                    }),
                )
            })
            .collect();
        let previous_vhost =
            |name: &str| previous.and_then(|p| p.vhosts.iter().find(|v| v.name == name));
        let mut pools = Vec::with_capacity(vhosts.len());
        for spec in vhosts {
            let old = previous_vhost(&spec.name);
            let servers: Vec<PoolServer> = spec
                .servers
                .iter()
                .map(|server| PoolServer {
                    address: server.address,
                    weight: server.weight,
                    state: server.state,
                    ramp_since: server.ramp_since,
                    stats: old
                        .and_then(|o| o.servers.iter().find(|s| s.address == server.address))
                        .map_or_else(Arc::default, |s| Arc::clone(&s.stats)),
                })
                .collect();
            let states: Vec<_> = spec.servers.iter().map(|s| (s.state, s.health)).collect();
            let all_down = spec
                .health
                .as_ref()
                .map_or(AllDown::Refuse, |check| check.all_down);
            let ready = in_rotation(&states, all_down);
            let hash_table = if spec.balance == Balance::Hash {
                let members: Vec<MaglevServer> = ready
                    .iter()
                    .map(|&i| MaglevServer {
                        address: servers[i].address,
                        weight: servers[i].weight,
                    })
                    .collect();
                MaglevTable::build(&members, DEFAULT_TABLE_SIZE, 0)
                    .ok()
                    .flatten()
                    .map(|table| {
                        table
                            .slots()
                            .iter()
                            .map(|&k| ready[k as usize] as u32)
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            pools.push(VhostPool {
                name: spec.name.clone(),
                balance: spec.balance,
                hash_on: spec.hash_on.clone(),
                servers,
                ready,
                hash_table,
                requests: old.map_or_else(Arc::default, |o| Arc::clone(&o.requests)),
                outlier: spec.outlier.clone(),
                slow_start_ms: spec.slow_start_ms,
                redirect_to_https: spec.redirect_to_https,
                response_headers: spec
                    .hsts_max_age_secs
                    .map(|age| format!("Strict-Transport-Security: max-age={age}\r\n"))
                    .unwrap_or_default()
                    .into_bytes(),
            });
        }
        let reusable = pools
            .iter()
            .flat_map(|pool| pool.ready.iter().map(|&i| pool.servers[i].address))
            .collect();
        L7Snapshot {
            generation,
            settings,
            listeners: routes,
            vhosts: pools,
            reusable,
            tls: Arc::default(),
        }
    }

    /// The counters of server `address` in vhost `vhost`.
    pub fn server_stats(&self, vhost: &str, address: SocketAddr) -> Option<&Arc<ServerStats>> {
        self.vhosts
            .iter()
            .find(|v| v.name == vhost)?
            .servers
            .iter()
            .find(|s| s.address == address)
            .map(|s| &s.stats)
    }
}

#[cfg(test)]
mod tests {
    use weir_config::control::HealthState;

    use super::*;

    #[test]
    fn a_response_time_lands_in_the_first_bucket_that_holds_it() {
        let stats = ServerStats::default();
        for ms in [0, 1, 3, 20, 20_000] {
            stats.response(200, Duration::from_millis(ms));
        }
        let counts = stats
            .response_time_buckets
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed));
        // ≤ 1 ms twice, ≤ 5 ms, ≤ 25 ms, and past 10 s.
        assert_eq!(counts, [2, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            stats.response_time_sum_us.load(Ordering::Relaxed),
            20_024_000
        );
        assert_eq!(stats.responses[1].load(Ordering::Relaxed), 5);
    }
    use crate::vhosts::VhostServer;

    fn spec(name: &str, hosts: &[&str], default: bool) -> Vhost {
        Vhost {
            name: name.to_string(),
            listen: "127.0.0.1:80".parse().unwrap(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            default,
            balance: Balance::RoundRobin,
            hash_on: None,
            health: None,
            outlier: None,
            slow_start_ms: 0,
            redirect_to_https: false,
            hsts_max_age_secs: None,
            servers: vec![server(
                "127.0.0.2:80".parse().unwrap(),
                AdminState::Ready,
                HealthState::Unchecked,
            )],
            config_servers: Vec::new(),
        }
    }

    fn server(address: SocketAddr, state: AdminState, health: HealthState) -> VhostServer {
        VhostServer {
            address,
            weight: 1,
            state,
            health,
            ramp_since: None,
            id: (),
        }
    }

    #[test]
    fn idle_connections_are_kept_only_to_servers_in_rotation_health_included() {
        let address = |last: u8| SocketAddr::from(([127, 0, 0, last], 80));
        let mut pool = spec("a", &["a.test"], false);
        pool.servers = vec![
            server(address(10), AdminState::Ready, HealthState::Healthy),
            server(address(11), AdminState::Ready, HealthState::Unhealthy),
            server(address(12), AdminState::Draining, HealthState::Healthy),
            server(address(13), AdminState::Ready, HealthState::Unchecked),
        ];
        let snapshot = L7Snapshot::build(
            0,
            L7Config::default(),
            &["127.0.0.1:80".parse().unwrap()],
            &[pool],
            None,
        );
        let mut reusable: Vec<_> = snapshot.reusable.iter().copied().collect();
        reusable.sort();
        assert_eq!(reusable, [address(10), address(13)]);
    }

    #[test]
    fn exact_names_win_then_the_longest_wildcard_then_the_default() {
        let listen = ["127.0.0.1:80".parse().unwrap()];
        let vhosts = [
            spec("www", &["www.example.com"], false),
            spec("any", &["*.example.com"], false),
            spec("api", &["*.api.example.com"], false),
            spec("fallback", &[], true),
        ];
        let snapshot = L7Snapshot::build(1, L7Config::default(), &listen, &vhosts, None);
        let route = |host| {
            snapshot.listeners[0]
                .route(host)
                .map(|i| vhosts[i].name.as_str())
        };
        assert_eq!(route(Some("www.example.com")), Some("www"));
        assert_eq!(route(Some("img.example.com")), Some("any"));
        assert_eq!(route(Some("a.b.example.com")), Some("any"));
        assert_eq!(route(Some("v1.api.example.com")), Some("api"));
        // The wildcard needs at least one label before the suffix.
        assert_eq!(route(Some("example.com")), Some("fallback"));
        assert_eq!(route(Some("other.test")), Some("fallback"));
        assert_eq!(route(None), Some("fallback"));
    }

    #[test]
    fn counters_survive_a_new_snapshot() {
        let listen = ["127.0.0.1:80".parse().unwrap()];
        let first = L7Snapshot::build(
            1,
            L7Config::default(),
            &listen,
            &[spec("a", &["a"], false)],
            None,
        );
        let address = "127.0.0.2:80".parse().unwrap();
        first
            .server_stats("a", address)
            .unwrap()
            .requests
            .fetch_add(7, Ordering::Relaxed);
        let second = L7Snapshot::build(
            2,
            L7Config::default(),
            &listen,
            &[spec("a", &["a"], false)],
            Some(&first),
        );
        assert_eq!(
            second
                .server_stats("a", address)
                .unwrap()
                .requests
                .load(Ordering::Relaxed),
            7
        );
    }
}
