//! The config schema, its defaults, and the rules that span fields.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    ConfigError, Diagnostic,
    address::{PoolKind, server_address_problem},
};

/// Where `weir` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/weir/weir.toml";
/// Where the control socket lives unless the config says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/weir/weir.sock";
/// Where the daemon pins its maps and XDP links unless the config says otherwise.
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/weir";
/// Where the daemon keeps its runtime state unless the config says otherwise.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/weir/state.json";

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub l7: L7Config,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub access_log: AccessLogConfig,
    #[serde(default)]
    pub bgp: BgpConfig,
    /// L4 virtual services, balanced in XDP.
    #[serde(default, rename = "l4_vip")]
    pub l4_vips: Vec<L4Vip>,
    /// L7 virtual hosts, served by the userspace workers.
    #[serde(default, rename = "vhost")]
    pub vhosts: Vec<VirtualHost>,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served (Prometheus text exposition). Off unless set: a metrics
    /// port is something an operator opens on purpose (the usual choice is a loopback or
    /// management address, e.g. `127.0.0.1:9110`).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// Announcing the L4 VIPs to routers through a BGP speaker (BIRD 2), for several nodes
/// behind ECMP.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    /// BIRD's control socket (what `birdc -s` takes). Off unless set: then weir announces
    /// nothing and the routes file is not written.
    #[serde(default)]
    pub bird_socket: Option<PathBuf>,
    /// The file weir writes the routes it announces to, one `route <vip>/32 blackhole;` line
    /// each, for bird.conf to `include` in a static protocol that its BGP sessions export.
    #[serde(default = "default_bgp_routes_file")]
    pub routes_file: PathBuf,
}

impl Default for BgpConfig {
    fn default() -> Self {
        BgpConfig {
            bird_socket: None,
            routes_file: default_bgp_routes_file(),
        }
    }
}

fn default_bgp_routes_file() -> PathBuf {
    PathBuf::from("/run/weir/bgp-vips.conf")
}

/// The L7 access log.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// The file every L7 request (and refused request, rate-limited) is logged to, appended
    /// and created mode 0640. Off unless set. Reopened by `weirctl log reopen` or `SIGUSR1`
    /// (for logrotate); a reload that changes it opens the new path.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub format: AccessLogFormat,
}

/// How access log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Common-log-like text: `client - - [time] "request" status bytes`, then
    /// `vhost= server= us=` (and `reason=` for weir's own answers).
    Common,
}

/// The daemon's own settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Unix socket `weirctl` talks to (created mode 0600).
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Directory on a bpf filesystem where maps and XDP links are pinned, so the datapath keeps
    /// forwarding while the daemon restarts. Under `/sys/fs/bpf` the daemon mounts bpffs
    /// there if it is missing; elsewhere it must already be a bpffs mount.
    #[serde(default = "default_bpf_dir")]
    pub bpf_dir: PathBuf,
    /// File holding the runtime state (pools as changed by `weirctl`), rewritten atomically
    /// after every change so a restarted daemon comes back with the pools it had.
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            control_socket: default_control_socket(),
            bpf_dir: default_bpf_dir(),
            state_file: default_state_file(),
        }
    }
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}
fn default_bpf_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BPF_DIR)
}
fn default_state_file() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_FILE)
}

/// The XDP datapath.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// Interfaces where client traffic arrives (and, in a one-armed setup, servers' too): the
    /// XDP balancer and the NAT return program are attached to each.
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
    /// Interfaces where only servers' traffic arrives — the server side of a two-armed
    /// balancer. Only the NAT return program is attached there: XDP would cost every reply
    /// frame a pass through the balancer for nothing (and on veth, its peer's TSO). Traffic
    /// to a VIP arriving on one of them is not balanced.
    #[serde(default)]
    pub server_interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Entries in the flow table (and in the NAT return table): how many concurrent L4 flows
    /// stay pinned to their server. Least recently used flows are evicted beyond it.
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: Spanned<u32>,
    /// Seed of the flow hash and of the Maglev tables. Nodes sharing VIPs must share it.
    #[serde(default)]
    pub hash_seed: u32,
    /// Seconds a TCP flow may be idle before it is forgotten (as IPVS: 15 minutes).
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_timeout_secs: u64,
    /// Seconds a UDP flow may be idle before it is forgotten.
    #[serde(default = "default_udp_idle")]
    pub udp_idle_timeout_secs: u64,
    /// Seconds a TCP flow that saw FIN or RST lingers for stragglers.
    #[serde(default = "default_closing_idle")]
    pub closing_timeout_secs: u64,
    /// Entries in the embryonic table: flows whose first packet was seen and that have not
    /// proven themselves yet (TCP: the handshake's ACK; UDP: a second packet). A flood of
    /// spoofed SYNs churns this table, never the flow table.
    #[serde(default = "default_embryonic_table_size")]
    pub embryonic_table_size: Spanned<u32>,
    /// Seconds an embryonic flow may be idle before it is forgotten.
    #[serde(default = "default_embryonic_idle")]
    pub embryonic_timeout_secs: Spanned<u64>,
    /// The flood guard: flows one CPU may record in the flow table per second. Past it, new
    /// flows stay embryonic (still forwarded) until the next second. 0 turns the guard off.
    #[serde(default = "default_flows_per_cpu_per_sec")]
    pub new_flows_per_cpu_per_sec: u32,
}

impl DatapathConfig {
    /// `interfaces`, without their places in the file.
    pub fn interface_names(&self) -> Vec<String> {
        names_of(&self.interfaces)
    }

    /// `server_interfaces`, without their places in the file.
    pub fn server_interface_names(&self) -> Vec<String> {
        names_of(&self.server_interfaces)
    }
}

fn names_of(interfaces: &[Spanned<String>]) -> Vec<String> {
    interfaces.iter().map(|i| i.get_ref().clone()).collect()
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            interfaces: Vec::new(),
            server_interfaces: Vec::new(),
            xdp_mode: XdpMode::default(),
            flow_table_size: Spanned::new(0..0, DEFAULT_FLOW_TABLE_SIZE),
            hash_seed: 0,
            tcp_idle_timeout_secs: default_tcp_idle(),
            udp_idle_timeout_secs: default_udp_idle(),
            closing_timeout_secs: default_closing_idle(),
            embryonic_table_size: default_embryonic_table_size(),
            embryonic_timeout_secs: default_embryonic_idle(),
            new_flows_per_cpu_per_sec: default_flows_per_cpu_per_sec(),
        }
    }
}

/// Flow-table entries unless configured: about 100 MB of kernel memory for both tables.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// Bounds on `flow_table_size`.
pub const FLOW_TABLE_SIZE_RANGE: std::ops::RangeInclusive<u32> = 1024..=(1 << 26);

fn default_flow_table_size() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_FLOW_TABLE_SIZE)
}
/// Embryonic-table entries unless configured (about 7 MB of kernel memory).
pub const DEFAULT_EMBRYONIC_TABLE_SIZE: u32 = 1 << 16;
/// Bounds on `embryonic_table_size`.
pub const EMBRYONIC_TABLE_SIZE_RANGE: std::ops::RangeInclusive<u32> = 1024..=(1 << 24);
/// Bounds on `embryonic_timeout_secs`: a SYN retransmitted after 1 s and 3 s still finds it.
pub const EMBRYONIC_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=60;

fn default_embryonic_table_size() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_EMBRYONIC_TABLE_SIZE)
}
fn default_embryonic_idle() -> Spanned<u64> {
    Spanned::new(0..0, 5)
}
fn default_flows_per_cpu_per_sec() -> u32 {
    50_000
}
fn default_tcp_idle() -> u64 {
    900
}
fn default_udp_idle() -> u64 {
    30
}
fn default_closing_idle() -> u64 {
    10
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (fastest; on veth, redirect targets need XDP or GRO on their peer).
    #[default]
    Native,
    /// In the generic network stack path: works on every interface, slower.
    Generic,
}

/// The L7 workers and the limits of the HTTP/1.1 reverse proxy they run.
///
/// Defaults are those of an edge proxy facing the internet: bounded heads, a short deadline
/// to send one (slowloris), and no trust in forwarding headers clients send.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct L7Config {
    /// Worker threads, each with its own io_uring; 0 means one per CPU.
    pub workers: usize,
    /// With one worker per CPU (`workers = 0`, or as many as the daemon may run on): pin
    /// worker `i` to the `i`-th CPU, and have each worker's listening sockets take the
    /// connections whose handshake arrived on its CPU (`SO_INCOMING_CPU`), so a connection
    /// is served where the kernel received it. Off by default: it pays only where the NIC
    /// spreads flows over every CPU (RSS); where one CPU receives everything (a single-queue
    /// NIC, or clients on the same host), every connection goes to one worker. With any
    /// other worker count the scheduler places the workers and the kernel spreads
    /// connections by hash. Decision 0026.
    pub pin_workers: bool,
    /// Client connections one worker holds at most; beyond it new connections wait in the
    /// listen backlog.
    pub max_connections_per_worker: usize,
    /// Longest request line (method, target, version) accepted; longer gets 414.
    pub max_request_line: usize,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request head; more gets 431.
    pub max_headers: usize,
    /// Milliseconds a client has to send a whole request head once it started one (or
    /// connected); slower gets 408 and the connection closes.
    pub header_timeout_ms: u64,
    /// Milliseconds a kept-alive client connection may wait idle for its next request.
    pub keepalive_timeout_ms: u64,
    /// Milliseconds a body (request or response) may stall before the exchange is cut.
    pub body_idle_timeout_ms: u64,
    /// Milliseconds a request body has to arrive in full, extended by one second for every
    /// `request_body_min_rate` bytes received: a body trickled slower is cut with 408
    /// (Apache's `mod_reqtimeout` `body=20,MinRate=500`). 0 turns the limit off.
    pub request_body_timeout_ms: u64,
    /// Bytes per second that extend `request_body_timeout_ms` (0: a fixed deadline).
    pub request_body_min_rate: u64,
    /// Milliseconds to connect to a server before trying another one.
    pub upstream_connect_timeout_ms: u64,
    /// Milliseconds a server has to start its response once the request is sent; slower gets
    /// 504.
    pub upstream_response_timeout_ms: u64,
    /// Milliseconds an idle pooled server connection is kept for reuse. Keep it below the
    /// servers' own keep-alive timeout, so weir closes idle connections before they do.
    pub upstream_idle_timeout_ms: u64,
    /// Idle connections a worker keeps per server.
    pub upstream_max_idle_per_server: usize,
    /// Milliseconds an upgraded connection (WebSocket) may carry nothing either way before
    /// it is closed.
    pub tunnel_idle_timeout_ms: u64,
    /// Milliseconds a stopping daemon gives client connections to finish the exchange under
    /// way (idle kept-alive connections close at once, responses carry `Connection: close`);
    /// what is still open then is cut. 0 cuts at once.
    pub shutdown_grace_ms: u64,
    /// Milliseconds a client has to complete a TLS handshake once connected; slower is
    /// closed (and counted as `timeout`).
    pub tls_handshake_timeout_ms: u64,
    /// Headers added to requests sent to servers.
    pub forwarded: ForwardedHeaders,
}

impl L7Config {
    /// What differs from `old`, one `key old -> new` per setting, named as in the file (what a
    /// reload reports).
    pub fn changes_from(&self, old: &L7Config) -> Vec<String> {
        let mut changes = Vec::new();
        macro_rules! compare {
            ($($field:ident),+ $(,)?) => {
                $(if self.$field != old.$field {
                    changes.push(format!(
                        "{} {:?} -> {:?}",
                        stringify!($field),
                        old.$field,
                        self.$field
                    ));
                })+
            };
        }
        compare!(
            workers,
            pin_workers,
            max_connections_per_worker,
            max_request_line,
            max_header_bytes,
            max_headers,
            header_timeout_ms,
            keepalive_timeout_ms,
            body_idle_timeout_ms,
            request_body_timeout_ms,
            request_body_min_rate,
            upstream_connect_timeout_ms,
            upstream_response_timeout_ms,
            upstream_idle_timeout_ms,
            upstream_max_idle_per_server,
            tunnel_idle_timeout_ms,
            shutdown_grace_ms,
            tls_handshake_timeout_ms,
        );
        if self.forwarded != old.forwarded {
            changes.push(format!(
                "forwarded {:?} -> {:?}",
                old.forwarded, self.forwarded
            ));
        }
        changes
    }
}

impl Default for L7Config {
    fn default() -> Self {
        L7Config {
            workers: 0,
            pin_workers: false,
            max_connections_per_worker: 10_000,
            max_request_line: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            header_timeout_ms: 10_000,
            keepalive_timeout_ms: 60_000,
            body_idle_timeout_ms: 30_000,
            request_body_timeout_ms: 20_000,
            request_body_min_rate: 500,
            upstream_connect_timeout_ms: 2_000,
            upstream_response_timeout_ms: 30_000,
            upstream_idle_timeout_ms: 10_000,
            upstream_max_idle_per_server: 64,
            tunnel_idle_timeout_ms: 600_000,
            shutdown_grace_ms: 30_000,
            tls_handshake_timeout_ms: 10_000,
            forwarded: ForwardedHeaders::default(),
        }
    }
}

/// Which forwarding headers requests to servers carry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardedHeaders {
    /// `X-Forwarded-For: <client address>`.
    pub x_forwarded_for: bool,
    /// `X-Forwarded-Proto: http`.
    pub x_forwarded_proto: bool,
    /// RFC 7239 `Forwarded: for=...;proto=...;host=...`.
    pub forwarded: bool,
    /// `Via: 1.1 weir`.
    pub via: bool,
    /// Keep the forwarding headers clients send and append to them. Off by default: at the
    /// edge a client can write any `X-Forwarded-For` it likes, so weir replaces them. Turn
    /// on only when weir sits behind a proxy you trust.
    pub trust_incoming: bool,
}

impl Default for ForwardedHeaders {
    fn default() -> Self {
        ForwardedHeaders {
            x_forwarded_for: true,
            x_forwarded_proto: true,
            forwarded: false,
            via: true,
            trust_incoming: false,
        }
    }
}

/// An L4 virtual service: an address, port and protocol balanced over a pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L4Vip {
    pub name: Spanned<String>,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: ForwardingMode,
    /// Which fields place a new flow in the Maglev table.
    #[serde(default)]
    pub hash: HashFieldsConfig,
    /// Slots in the Maglev table: a prime, larger than the pool (100× the pool or more keeps
    /// the weight error under 1%).
    #[serde(default = "default_table_size")]
    pub table_size: Spanned<u32>,
    /// Active health checks of the pool (none without this table).
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Milliseconds over which a server entering the rotation (added, enabled, healthy
    /// again) ramps from a sliver to its full weight; 0 = at once. L4 tables step once a
    /// second.
    #[serde(default)]
    pub slow_start_ms: u64,
    /// When the node announces the VIP's address by BGP (`[bgp]`).
    #[serde(default)]
    pub announce: Announce,
    pub servers: Spanned<Vec<ServerSpec>>,
}

/// When a node announces an L4 VIP's address by BGP. An address with several VIPs (ports) is
/// announced when any of them says so; a drained node announces none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Announce {
    /// While a server of the VIP takes new flows (admin-ready, not unhealthy).
    #[default]
    WhenReady,
    /// Whenever the node is in service, servers or not.
    Always,
    /// Never: another VIP at the address, or something else, announces it.
    Never,
}

/// Maglev table size unless configured (prime).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
/// Largest accepted Maglev table.
pub const MAX_TABLE_SIZE: u32 = 1 << 20;

fn default_table_size() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_TABLE_SIZE)
}

/// Which fields of a new flow pick its server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashFieldsConfig {
    /// Addresses, ports and protocol: connections spread evenly.
    #[default]
    FiveTuple,
    /// Client address only: a client's flows all reach the same server.
    SourceIp,
}

/// Transport protocol of an L4 VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// How packets reach the servers of an L4 VIP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// Destination rewritten to the server; replies come back through weir.
    #[default]
    Nat,
    /// Direct server return on the same L2: MAC rewrite only, servers reply to clients directly.
    Dsr,
}

/// The names the config file spells these with, for messages: `tcp nat`, not `Tcp Nat`.
macro_rules! display_as_in_config {
    ($type:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl std::fmt::Display for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $(<$type>::$variant => $name,)+
                })
            }
        }
    };
}

display_as_in_config!(Protocol { Tcp => "tcp", Udp => "udp" });
display_as_in_config!(ForwardingMode { Nat => "nat", Dsr => "dsr" });
display_as_in_config!(HashFieldsConfig { FiveTuple => "five_tuple", SourceIp => "source_ip" });
display_as_in_config!(Balance {
    RoundRobin => "round_robin",
    LeastConnections => "least_connections",
    Hash => "hash",
});

/// An L7 virtual host: names it answers for, the listener it is reached on, its pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    pub name: Spanned<String>,
    /// Address the L7 listener binds (several vhosts may share one).
    pub listen: SocketAddr,
    /// Host names: exact (`www.example.com`) or wildcard (`*.example.com`, any depth of
    /// sub-domain; the longest matching suffix wins).
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// Serves requests on its listener whose Host no vhost names (otherwise they get 404).
    #[serde(default)]
    pub default: bool,
    /// How a request picks its server.
    #[serde(default)]
    pub balance: Balance,
    /// What `balance = "hash"` hashes: `source_ip`, `header:<name>` or `cookie:<name>`.
    #[serde(default)]
    pub hash_on: Option<Spanned<String>>,
    /// Active health checks of the pool (none without this table).
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Passive checks: servers failing requests are ejected for a while (none without).
    #[serde(default)]
    pub outlier: Option<OutlierDetection>,
    /// Milliseconds over which a server entering the rotation ramps to its full weight (round
    /// robin and least connections; hash pools keep full weights); 0 = at once.
    #[serde(default)]
    pub slow_start_ms: u64,
    /// Terminates TLS on the listener with this certificate, presented to clients whose SNI
    /// names one of `hosts` (or to any name, for the listener's default vhost). Every vhost
    /// of a listener has one, or none does.
    #[serde(default)]
    pub tls: Option<VhostTls>,
    /// Passes TLS through without terminating it: the listener reads the ClientHello's SNI,
    /// routes it as a Host (`hosts`, `default`), and relays the bytes both ways to a server
    /// of the pool, which terminates TLS itself. Every vhost of a listener passes TLS
    /// through, or none does.
    #[serde(default)]
    pub tls_passthrough: bool,
    /// On a plain-HTTP listener: every request gets `308 Permanent Redirect` to the same URL
    /// over HTTPS instead of reaching the pool.
    #[serde(default)]
    pub redirect_to_https: bool,
    /// On a TLS vhost: `Strict-Transport-Security: max-age=<this>` on every response.
    #[serde(default)]
    pub hsts_max_age_secs: Option<u64>,
    pub servers: Spanned<Vec<ServerSpec>>,
}

impl VirtualHost {
    /// What its listener speaks, as errors name it.
    fn protocol(&self) -> &'static str {
        match (&self.tls, self.tls_passthrough) {
            (_, true) => "TLS passthrough",
            (Some(_), false) => "TLS",
            (None, false) => "plain HTTP",
        }
    }
}

/// A vhost's certificate: PEM files, read at start and on every reload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostTls {
    /// The certificate chain, the vhost's own certificate first, then intermediates.
    pub certificate: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
}

/// Passive health checking in the L7 workers (outlier detection, as Envoy calls it): a
/// server whose requests fail `consecutive_failures` times in a row — connect failures,
/// resets, timeouts, invalid responses or 5xx — is ejected from selection for a while; each
/// further ejection lasts longer. No more than `max_ejection_percent` of the pool's ready
/// servers is ejected at once, so a bad deploy of half the pool cannot empty it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times this, up to `max_ejection_ms`.
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_ms: 10_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 50,
        }
    }
}

/// How an L7 pool picks a server for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// The ready server with the fewest requests in flight relative to its weight.
    LeastConnections,
    /// Consistent hash (Maglev) of `hash_on`: the same key reaches the same server while the
    /// pool is unchanged, and a change moves only about 1/N of keys.
    Hash,
}

/// What a consistent-hash pool hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    SourceIp,
    /// A request header (lower-case name).
    Header(String),
    /// A cookie, by name.
    Cookie(String),
}

impl HashOn {
    /// Parses `source_ip`, `header:<name>` or `cookie:<name>`.
    pub fn parse(text: &str) -> Result<HashOn, String> {
        let token = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        match text.split_once(':') {
            None if text == "source_ip" => Ok(HashOn::SourceIp),
            Some(("header", name)) if token(name) => Ok(HashOn::Header(name.to_ascii_lowercase())),
            Some(("cookie", name)) if token(name) => Ok(HashOn::Cookie(name.to_string())),
            _ => Err(format!(
                "hash_on `{text}`: expected `source_ip`, `header:<name>` or `cookie:<name>`"
            )),
        }
    }
}

impl VirtualHost {
    /// What the pool hashes, when it balances by hash (checked at load).
    pub fn hash_key(&self) -> Option<HashOn> {
        self.hash_on
            .as_ref()
            .and_then(|text| HashOn::parse(text.get_ref()).ok())
    }
}

/// How a pool's servers are checked. With the defaults a dead server is out within
/// `fall × interval × (1 + jitter) + timeout` = 3 × 550 + 300 = 1.95 s, and back after 2
/// good checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// `tcp` (connect) or `http` (a request, its status and optionally its body).
    pub kind: CheckKind,
    /// HTTP: method and path of the request.
    pub method: String,
    pub path: String,
    /// HTTP: the `Host` sent (default: the server's address).
    pub host: Option<String>,
    /// HTTP: statuses that count as up, inclusive.
    pub expect_status: (u16, u16),
    /// HTTP: text the response body must contain (within its first 64 KiB).
    pub body_contains: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Successes in a row that bring a down server up.
    pub rise: u32,
    /// Failures in a row that take an up server down.
    pub fall: u32,
    /// Each wait is the interval ± this share, so 1000 servers do not fire together.
    pub jitter_percent: u32,
    /// What L4 does with established flows of a server that goes down: `repick` (their next
    /// packet picks another server, which resets them: clients fail fast) or `keep` (they
    /// stay, and hang if the server is really gone).
    pub down_flows: DownFlows,
    /// When every server is down: `refuse` (L7 answers 503, L4 drops new flows) or
    /// `fail_open` (health is ignored and all admin-ready servers take traffic).
    pub all_down: AllDown,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: CheckKind::Tcp,
            method: "GET".to_string(),
            path: "/".to_string(),
            host: None,
            expect_status: (200, 399),
            body_contains: None,
            interval_ms: 500,
            timeout_ms: 300,
            rise: 2,
            fall: 3,
            jitter_percent: 10,
            down_flows: DownFlows::Repick,
            all_down: AllDown::Refuse,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    #[default]
    Tcp,
    Http,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DownFlows {
    #[default]
    Repick,
    Keep,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllDown {
    #[default]
    Refuse,
    FailOpen,
}

impl HealthCheck {
    /// What is wrong with these settings, if anything.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.interval_ms < 50 || self.timeout_ms == 0 || self.timeout_ms > self.interval_ms * 10
        {
            problems.push("health: interval_ms must be at least 50 and timeout_ms between 1 and 10 × interval_ms".to_string());
        }
        if self.rise == 0 || self.fall == 0 {
            problems.push("health: rise and fall must be at least 1".to_string());
        }
        if self.jitter_percent > 50 {
            problems.push("health: jitter_percent is at most 50".to_string());
        }
        if self.expect_status.0 > self.expect_status.1
            || self.expect_status.0 < 100
            || self.expect_status.1 > 599
        {
            problems.push(
                "health: expect_status is an inclusive range within 100..599, low first"
                    .to_string(),
            );
        }
        if !self.path.starts_with('/') || self.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            problems.push(format!(
                "health: path `{}` must start with `/` and contain no spaces or controls",
                self.path
            ));
        }
        if self.method.is_empty() || !self.method.bytes().all(|b| b.is_ascii_uppercase()) {
            problems.push(format!(
                "health: method `{}` must be upper-case letters",
                self.method
            ));
        }
        problems
    }
}

/// A server in a pool.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    pub address: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Weight a server gets when none is given.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest weight accepted: keeps weight sums far from overflow in table builders.
pub const MAX_WEIGHT: u32 = 10_000;

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Config::parse(path, &source)
    }

    /// Validates `source` as the contents of `file` (named in the errors).
    pub fn parse(file: &Path, source: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(source).map_err(|err| {
            let offset = err.span().map_or(0, |span| span.start);
            let message = err.message().trim().to_string();
            ConfigError::Invalid(vec![Diagnostic::at(
                file.to_path_buf(),
                source,
                offset,
                message,
            )])
        })?;
        let problems = config.check();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(
                problems
                    .into_iter()
                    .map(|(offset, message)| {
                        Diagnostic::at(file.to_path_buf(), source, offset, message)
                    })
                    .collect(),
            ))
        }
    }

    /// The distinct addresses L7 listeners bind, in config order.
    pub fn l7_listen_addresses(&self) -> Vec<SocketAddr> {
        let mut seen = HashSet::new();
        self.vhosts
            .iter()
            .map(|vhost| vhost.listen)
            .filter(|addr| seen.insert(*addr))
            .collect()
    }

    /// Rules the schema cannot express, as (byte offset, message), in file order.
    fn check(&self) -> Vec<(usize, String)> {
        let mut problems = Vec::new();
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        let l4_vips: Vec<IpAddr> = self.l4_vips.iter().map(|vip| vip.address).collect();
        let listen = self.l7_listen_addresses();
        for vip in &self.l4_vips {
            if !names.insert(vip.name.get_ref().as_str()) {
                problems.push((
                    vip.name.span().start,
                    format!("duplicate name `{}`", vip.name.get_ref()),
                ));
            }
            if !vips.insert((vip.address, vip.port, vip.protocol)) {
                problems.push((
                    vip.name.span().start,
                    format!(
                        "another l4_vip already serves {} {}",
                        vip.protocol,
                        SocketAddr::new(vip.address, vip.port)
                    ),
                ));
            }
            check_pool(&vip.servers, &mut problems);
            check_l4_pool(vip, &mut problems);
            let kind = PoolKind::L4 { vips: &l4_vips };
            check_addresses(&vip.servers, &kind, &mut problems);
            if let Some(health) = &vip.health {
                let at = vip.name.span().start;
                problems.extend(health.problems().into_iter().map(|p| (at, p)));
                if vip.protocol == Protocol::Udp {
                    problems.push((
                        at,
                        format!(
                            "l4_vip `{}` is UDP: health checks (TCP or HTTP) cannot check it",
                            vip.name.get_ref()
                        ),
                    ));
                }
            }
        }
        let size = &self.datapath.flow_table_size;
        if !FLOW_TABLE_SIZE_RANGE.contains(size.get_ref()) {
            problems.push((
                size.span().start,
                format!(
                    "flow_table_size {} is out of range: expected {} to {}",
                    size.get_ref(),
                    FLOW_TABLE_SIZE_RANGE.start(),
                    FLOW_TABLE_SIZE_RANGE.end()
                ),
            ));
        }
        let size = &self.datapath.embryonic_table_size;
        if !EMBRYONIC_TABLE_SIZE_RANGE.contains(size.get_ref()) {
            problems.push((
                size.span().start,
                format!(
                    "embryonic_table_size {} is out of range: expected {} to {}",
                    size.get_ref(),
                    EMBRYONIC_TABLE_SIZE_RANGE.start(),
                    EMBRYONIC_TABLE_SIZE_RANGE.end()
                ),
            ));
        }
        let timeout = &self.datapath.embryonic_timeout_secs;
        if !EMBRYONIC_TIMEOUT_RANGE.contains(timeout.get_ref()) {
            problems.push((
                timeout.span().start,
                format!(
                    "embryonic_timeout_secs {} is out of range: expected {} to {}",
                    timeout.get_ref(),
                    EMBRYONIC_TIMEOUT_RANGE.start(),
                    EMBRYONIC_TIMEOUT_RANGE.end()
                ),
            ));
        }
        for vhost in &self.vhosts {
            if !names.insert(vhost.name.get_ref().as_str()) {
                problems.push((
                    vhost.name.span().start,
                    format!("duplicate name `{}`", vhost.name.get_ref()),
                ));
            }
            check_pool(&vhost.servers, &mut problems);
            check_vhost(vhost, &mut problems);
            let kind = PoolKind::L7 { listen: &listen };
            check_addresses(&vhost.servers, &kind, &mut problems);
            if let Some(health) = &vhost.health {
                let at = vhost.name.span().start;
                problems.extend(health.problems().into_iter().map(|p| (at, p)));
            }
            if let Some(outlier) = &vhost.outlier
                && (outlier.consecutive_failures == 0
                    || outlier.base_ejection_ms == 0
                    || outlier.max_ejection_ms < outlier.base_ejection_ms
                    || outlier.max_ejection_percent > 100)
            {
                problems.push((
                    vhost.name.span().start,
                    "outlier: consecutive_failures and base_ejection_ms must be positive, max_ejection_ms at least base_ejection_ms, max_ejection_percent at most 100".to_string(),
                ));
            }
        }
        check_listeners(&self.vhosts, &mut problems);
        let l7 = &self.l7;
        if l7.max_connections_per_worker == 0
            || l7.max_request_line < 64
            || l7.max_header_bytes < l7.max_request_line
            || l7.max_headers == 0
        {
            problems.push((
                0,
                "[l7] limits: max_connections_per_worker and max_headers must be positive, \
                 max_request_line at least 64, max_header_bytes at least max_request_line"
                    .to_string(),
            ));
        }
        let mut interfaces = HashSet::new();
        let datapath = &self.datapath;
        if datapath.interfaces.is_empty()
            && let Some(first) = datapath.server_interfaces.first()
        {
            problems.push((
                first.span().start,
                "`server_interfaces` without `interfaces`: nothing would balance the clients' \
                 traffic (list the client-facing interfaces in `interfaces`)"
                    .to_string(),
            ));
        }
        for interface in datapath
            .interfaces
            .iter()
            .chain(&datapath.server_interfaces)
        {
            let name = interface.get_ref();
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                problems.push((
                    interface.span().start,
                    format!("`{name}` is not a valid interface name (1 to 15 characters, no `/` or space)"),
                ));
            } else if !interfaces.insert(name.as_str()) {
                problems.push((
                    interface.span().start,
                    format!(
                        "interface `{name}` listed twice (in `interfaces` or `server_interfaces`)"
                    ),
                ));
            }
        }
        problems.sort_by_key(|(offset, _)| *offset);
        problems
    }
}

/// The address rules (`crate::address`) for every server of a pool.
fn check_addresses(
    servers: &Spanned<Vec<ServerSpec>>,
    kind: &PoolKind,
    problems: &mut Vec<(usize, String)>,
) {
    for server in servers.get_ref() {
        if let Some(problem) = server_address_problem(server.address, kind) {
            problems.push((servers.span().start, problem));
        }
    }
}

fn check_pool(servers: &Spanned<Vec<ServerSpec>>, problems: &mut Vec<(usize, String)>) {
    let at = servers.span().start;
    if servers.get_ref().is_empty() {
        problems.push((at, "a pool needs at least one server".to_string()));
    }
    let mut seen = HashSet::new();
    for server in servers.get_ref() {
        if !seen.insert(server.address) {
            problems.push((at, format!("server {} listed twice", server.address)));
        }
        if !(1..=MAX_WEIGHT).contains(&server.weight) {
            problems.push((
                at,
                format!(
                    "server {} has weight {}: expected 1 to {MAX_WEIGHT}",
                    server.address, server.weight
                ),
            ));
        }
    }
}

fn check_vhost(vhost: &VirtualHost, problems: &mut Vec<(usize, String)>) {
    for host in &vhost.hosts {
        if let Err(message) = check_host_name(host.get_ref()) {
            problems.push((host.span().start, message));
        }
    }
    if vhost.tls_passthrough && (vhost.tls.is_some() || vhost.redirect_to_https) {
        problems.push((
            vhost.name.span().start,
            format!(
                "vhost `{}` passes TLS through: its servers terminate TLS, so tls and redirect_to_https do not apply",
                vhost.name.get_ref()
            ),
        ));
    }
    if vhost.redirect_to_https && vhost.tls.is_some() {
        problems.push((
            vhost.name.span().start,
            format!(
                "vhost `{}` terminates TLS: redirect_to_https is for plain-HTTP vhosts",
                vhost.name.get_ref()
            ),
        ));
    }
    if vhost.hsts_max_age_secs.is_some() && vhost.tls.is_none() {
        problems.push((
            vhost.name.span().start,
            format!(
                "vhost `{}` has no tls: browsers ignore hsts_max_age_secs over plain HTTP",
                vhost.name.get_ref()
            ),
        ));
    }
    if vhost.hosts.is_empty() && !vhost.default {
        problems.push((
            vhost.name.span().start,
            format!(
                "vhost `{}` has no hosts and is not the default: no request can reach it",
                vhost.name.get_ref()
            ),
        ));
    }
    match (&vhost.balance, &vhost.hash_on) {
        (Balance::Hash, None) => problems.push((
            vhost.name.span().start,
            format!(
                "vhost `{}` balances by hash: set hash_on (`source_ip`, `header:<name>` or `cookie:<name>`)",
                vhost.name.get_ref()
            ),
        )),
        (Balance::Hash, Some(on)) => {
            if let Err(message) = HashOn::parse(on.get_ref()) {
                problems.push((on.span().start, message));
            }
        }
        (_, Some(on)) => problems.push((
            on.span().start,
            "hash_on is only used with balance = \"hash\"".to_string(),
        )),
        (_, None) => {}
    }
}

/// A host name as the `Host` header carries it (without port): labels of letters, digits and
/// hyphens, or `*.` followed by such a name.
fn check_host_name(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253
        || !name.split('.').all(label_ok)
        || host.bytes().any(|b| b.is_ascii_uppercase())
    {
        return Err(format!(
            "host `{host}` is not a lower-case host name or `*.` wildcard (letters, digits, `-`, dots)"
        ));
    }
    Ok(())
}

/// On one listener, a host name belongs to one vhost, at most one vhost is the default, and
/// every vhost speaks the same protocol: plain HTTP, TLS terminated, or TLS passed through.
fn check_listeners(vhosts: &[VirtualHost], problems: &mut Vec<(usize, String)>) {
    let mut hosts = HashSet::new();
    let mut defaults = HashSet::new();
    let mut first_of_listener: HashMap<SocketAddr, &VirtualHost> = HashMap::new();
    for vhost in vhosts {
        let first = *first_of_listener.entry(vhost.listen).or_insert(vhost);
        if first.protocol() != vhost.protocol() {
            problems.push((
                vhost.name.span().start,
                format!(
                    "vhost `{}` is {} on {} but vhost `{}` there is {}: a listener speaks one protocol",
                    vhost.name.get_ref(),
                    vhost.protocol(),
                    vhost.listen,
                    first.name.get_ref(),
                    first.protocol()
                ),
            ));
        }
        for host in &vhost.hosts {
            if !hosts.insert((vhost.listen, host.get_ref().as_str())) {
                problems.push((
                    host.span().start,
                    format!(
                        "host `{}` is already served on {}",
                        host.get_ref(),
                        vhost.listen
                    ),
                ));
            }
        }
        if vhost.default && !defaults.insert(vhost.listen) {
            problems.push((
                vhost.name.span().start,
                format!("another vhost is already the default on {}", vhost.listen),
            ));
        }
    }
}

fn check_l4_pool(vip: &L4Vip, problems: &mut Vec<(usize, String)>) {
    let size = *vip.table_size.get_ref();
    if !is_prime(size) || size > MAX_TABLE_SIZE {
        problems.push((
            vip.table_size.span().start,
            format!("table_size {size} must be a prime no larger than {MAX_TABLE_SIZE} (65537 is the usual choice)"),
        ));
    } else if vip.servers.get_ref().len() > size as usize {
        problems.push((
            vip.table_size.span().start,
            format!(
                "table_size {size} is smaller than the pool ({} servers)",
                vip.servers.get_ref().len()
            ),
        ));
    }
    for server in vip.servers.get_ref() {
        if server.address.is_ipv4() != vip.address.is_ipv4() {
            problems.push((
                vip.servers.span().start,
                format!(
                    "server {} is not of the VIP's address family ({})",
                    server.address, vip.address
                ),
            ));
        }
        if vip.mode == ForwardingMode::Dsr && server.address.port() != vip.port {
            problems.push((
                vip.servers.span().start,
                format!(
                    "server {}: in DSR mode packets keep the VIP's port, so servers must use port {}",
                    server.address, vip.port
                ),
            ));
        }
    }
}

/// Trial division: table sizes are at most `MAX_TABLE_SIZE`, so this is instant.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    (2..)
        .take_while(|d| d * d <= n)
        .all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
control_socket = "/tmp/weir.sock"

[datapath]
interfaces = ["eth0"]
xdp_mode = "generic"

[[l4_vip]]
name = "web"
address = "198.18.100.10"
port = 80
protocol = "tcp"
servers = [{ address = "198.18.1.11:8080" }, { address = "198.18.1.12:8080", weight = 50 }]

[[vhost]]
name = "demo"
listen = "198.18.100.11:80"
hosts = ["demo.test"]
servers = [{ address = "198.18.1.11:8080" }]
"#;

    fn parse(source: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("weir.toml"), source)
    }

    fn errors(source: &str) -> Vec<String> {
        match parse(source) {
            Err(ConfigError::Invalid(diagnostics)) => {
                diagnostics.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.datapath.xdp_mode, XdpMode::Generic);
        assert_eq!(config.l4_vips[0].mode, ForwardingMode::Nat);
        assert_eq!(
            config.l4_vips[0].servers.get_ref()[0].weight,
            DEFAULT_WEIGHT
        );
        assert_eq!(config.l4_vips[0].servers.get_ref()[1].weight, 50);
        assert_eq!(
            config.l7_listen_addresses(),
            vec!["198.18.100.11:80".parse().unwrap()]
        );
    }

    #[test]
    fn empty_file_is_a_valid_config_with_defaults() {
        let config = parse("").unwrap();
        assert_eq!(
            config.daemon.control_socket,
            Path::new(DEFAULT_CONTROL_SOCKET)
        );
        assert!(config.l4_vips.is_empty());
    }

    #[test]
    fn syntax_error_names_file_line_and_column() {
        let errs = errors("[daemon]\ncontrol_socket = \n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("weir.toml:2:"), "{}", errs[0]);
    }

    #[test]
    fn unknown_key_is_an_error_not_a_default() {
        let errs = errors("[datapath]\ninterface = [\"eth0\"]\n");
        assert!(errs[0].starts_with("weir.toml:2:1:"), "{}", errs[0]);
        assert!(errs[0].contains("unknown field `interface`"), "{}", errs[0]);
    }

    #[test]
    fn bad_enum_value_says_what_was_expected() {
        let errs = errors("[datapath]\nxdp_mode = \"fast\"\n");
        assert!(errs[0].starts_with("weir.toml:2:12:"), "{}", errs[0]);
        assert!(
            errs[0].contains("native") && errs[0].contains("generic"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn every_semantic_problem_is_reported_in_file_order() {
        let source = GOOD
            .replace("weight = 50", "weight = 0")
            .replace("\"demo\"", "\"web\"")
            + "[[l4_vip]]\nname = \"empty\"\naddress = \"198.18.100.12\"\nport = 53\nprotocol = \"udp\"\nservers = []\n";
        let errs = errors(&source);
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(
            errs[0].contains("weight 0: expected 1 to 10000"),
            "{}",
            errs[0]
        );
        assert!(errs[1].contains("duplicate name `web`"), "{}", errs[1]);
        assert!(errs[2].contains("at least one server"), "{}", errs[2]);
        let line_of = |e: &str| e.split(':').nth(1).unwrap().parse::<usize>().unwrap();
        assert_eq!(line_of(&errs[1]), 17);
    }

    #[test]
    fn server_interfaces_parse_and_an_interface_has_one_role() {
        let config =
            parse("[datapath]\ninterfaces = [\"eth0\"]\nserver_interfaces = [\"eth1\"]\n").unwrap();
        let names = |list: &[Spanned<String>]| -> Vec<String> {
            list.iter().map(|i| i.get_ref().clone()).collect()
        };
        assert_eq!(names(&config.datapath.interfaces), ["eth0"]);
        assert_eq!(names(&config.datapath.server_interfaces), ["eth1"]);

        let errs = errors(
            "[datapath]\ninterfaces = [\"eth0\", \"eth1\"]\nserver_interfaces = [\"eth2\", \"eth1\", \"a/b\"]\n",
        );
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(
            errs[0].starts_with("weir.toml:3:30:")
                && errs[0].contains("interface `eth1` listed twice"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].starts_with("weir.toml:3:38:")
                && errs[1].contains("`a/b` is not a valid interface name"),
            "{}",
            errs[1]
        );

        let errs = errors("[datapath]\nserver_interfaces = [\"eth1\"]\n");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("weir.toml:2:22:") && errs[0].contains("without `interfaces`"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn l4_pool_rules_name_table_size_family_and_dsr_port() {
        let source = "[datapath]\nflow_table_size = 10\n\n[[l4_vip]]\nname = \"d\"\naddress = \"198.18.100.20\"\nport = 80\nprotocol = \"tcp\"\nmode = \"dsr\"\ntable_size = 65536\nservers = [{ address = \"198.18.1.10:8080\" }, { address = \"[fd00::10]:80\" }]\n";
        let errs = errors(source);
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(
            errs[0].starts_with("weir.toml:2:") && errs[0].contains("flow_table_size 10"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].contains("table_size 65536 must be a prime"),
            "{}",
            errs[1]
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("DSR mode") && e.contains("198.18.1.10:8080")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("[fd00::10]:80 is not of the VIP's address family")),
            "{errs:#?}"
        );
    }

    #[test]
    fn tls_rules_keep_a_listener_one_protocol_and_options_where_they_mean_something() {
        let source = r#"
[[vhost]]
name = "secure"
listen = "127.0.0.1:443"
hosts = ["a.test"]
tls = { certificate = "/etc/weir/a.pem", key = "/etc/weir/a.key" }
redirect_to_https = true
servers = [{ address = "127.0.0.2:80" }]

[[vhost]]
name = "plain"
listen = "127.0.0.1:443"
hosts = ["b.test"]
hsts_max_age_secs = 600
servers = [{ address = "127.0.0.2:80" }]

[[vhost]]
name = "typo"
listen = "127.0.0.1:8443"
hosts = ["c.test"]
tls = { certificate = "/etc/weir/c.pem", key = "/etc/weir/c.key", chain = "x" }
servers = [{ address = "127.0.0.2:80" }]
"#;
        let errs = errors(source);
        let expect = [
            "vhost `secure` terminates TLS: redirect_to_https is for plain-HTTP vhosts",
            "vhost `plain` has no tls: browsers ignore hsts_max_age_secs",
            "vhost `plain` is plain HTTP on 127.0.0.1:443 but vhost `secure` there is TLS",
        ];
        // An unknown key in `tls` is a parse error of its own, reported alone.
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].contains("unknown field `chain`"), "{errs:#?}");
        let errs = errors(&source.replace(", chain = \"x\"", ""));
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
        for wanted in expect {
            assert!(
                errs.iter().any(|e| e.contains(wanted)),
                "no `{wanted}` in {errs:#?}"
            );
        }
        let good = parse(
            &source
                .replace(", chain = \"x\"", "")
                .replace("redirect_to_https = true\n", "")
                .replace("hsts_max_age_secs = 600\n", "")
                .replace(
                    "listen = \"127.0.0.1:443\"\nhosts = [\"b.test\"]",
                    "listen = \"127.0.0.1:80\"\nhosts = [\"b.test\"]",
                ),
        )
        .unwrap();
        assert_eq!(
            good.vhosts[0].tls.as_ref().unwrap().key,
            PathBuf::from("/etc/weir/a.key")
        );
        assert_eq!(good.l7.tls_handshake_timeout_ms, 10_000);
    }

    #[test]
    fn vhost_rules_name_hosts_defaults_and_hashing() {
        let source = r#"
[[vhost]]
name = "a"
listen = "127.0.0.1:80"
hosts = ["a.test", "Bad.Test", "*.ok.test"]
balance = "hash"
servers = [{ address = "127.0.0.2:80" }]

[[vhost]]
name = "b"
listen = "127.0.0.1:80"
hosts = ["a.test"]
default = true
hash_on = "source_ip"
servers = [{ address = "127.0.0.2:80" }]

[[vhost]]
name = "c"
listen = "127.0.0.1:80"
default = true
balance = "hash"
hash_on = "query:x"
servers = [{ address = "127.0.0.2:80" }]

[[vhost]]
name = "d"
listen = "127.0.0.1:81"
servers = [{ address = "127.0.0.2:80" }]
"#;
        let errs = errors(source);
        let expect = [
            "vhost `a` balances by hash: set hash_on",
            "host `Bad.Test` is not a lower-case host name",
            "host `a.test` is already served on 127.0.0.1:80",
            "hash_on is only used with balance = \"hash\"",
            "another vhost is already the default on 127.0.0.1:80",
            "hash_on `query:x`: expected",
            "vhost `d` has no hosts and is not the default",
        ];
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
        for wanted in expect {
            assert!(
                errs.iter().any(|e| e.contains(wanted)),
                "no `{wanted}` in {errs:#?}"
            );
        }
        assert_eq!(
            HashOn::parse("header:X-User"),
            Ok(HashOn::Header("x-user".into()))
        );
        assert_eq!(
            HashOn::parse("cookie:sid"),
            Ok(HashOn::Cookie("sid".into()))
        );
    }

    #[test]
    fn servers_that_cannot_work_are_refused_with_their_place_and_reason() {
        let source = r#"
[[l4_vip]]
name = "web"
address = "198.18.100.10"
port = 80
protocol = "tcp"
servers = [
  { address = "0.0.0.0:8080" },
  { address = "255.255.255.255:8080" },
  { address = "127.0.0.1:8080" },
  { address = "198.18.11.2:0" },
  { address = "198.18.100.10:80" },
  { address = "224.0.0.1:8080" },
  { address = "198.18.11.2:8080" },
]

[[vhost]]
name = "site"
listen = "198.18.100.11:80"
hosts = ["site.test"]
servers = [
  { address = "198.18.100.11:80" },
  { address = "[::]:8080" },
  { address = "127.0.0.1:8080" },
]
"#;
        let errs = errors(source);
        let expect = [
            "weir.toml:7:11: server 0.0.0.0:8080 cannot work: 0.0.0.0 is the unspecified address",
            "server 255.255.255.255:8080 cannot work: 255.255.255.255 is a broadcast or reserved",
            "server 127.0.0.1:8080 cannot work: 127.0.0.1 is loopback",
            "server 198.18.11.2:0 cannot work: port 0",
            "server 198.18.100.10:80 cannot work: 198.18.100.10 is an L4 VIP",
            "server 224.0.0.1:8080 cannot work: 224.0.0.1 is a multicast address",
            "server 198.18.100.11:80 cannot work: 198.18.100.11:80 is an L7 listen address",
            "server [::]:8080 cannot work: :: is the unspecified address",
        ];
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
        for wanted in expect {
            assert!(
                errs.iter().any(|e| e.contains(wanted)),
                "no `{wanted}` in {errs:#?}"
            );
        }
    }

    #[test]
    fn an_l7_change_names_each_setting_with_its_old_and_new_value() {
        let old = L7Config::default();
        let new = L7Config {
            max_connections_per_worker: 2000,
            shutdown_grace_ms: 5,
            ..L7Config::default()
        };
        assert_eq!(
            new.changes_from(&old),
            [
                "max_connections_per_worker 10000 -> 2000",
                "shutdown_grace_ms 30000 -> 5"
            ]
        );
        assert!(old.changes_from(&old).is_empty());
    }
}
