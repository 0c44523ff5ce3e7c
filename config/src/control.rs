//! The control API between `weirctl` and the `weir` daemon.
//!
//! Transport: a Unix stream socket. Framing: one JSON object per line, a request from the client
//! answered by exactly one response from the daemon; a connection may carry several exchanges.
//! Every message carries the protocol [`VERSION`]; the daemon refuses a version it does not
//! speak with an error instead of guessing, so old and new `weirctl` binaries fail clearly.
//! The types live here, in one crate used by both sides, so they cannot drift apart.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{ForwardingMode, HashFieldsConfig, Protocol, XdpMode};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Longest request line the daemon reads; a longer one is refused without being parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A Unix time in seconds as both sides show it: `2027-03-01 12:00:00 UTC` (the reports carry
/// Unix times; `weirctl` and the daemon's messages print them this way).
pub fn utc_date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("{unix} (Unix time)"))
}

/// A request with its protocol version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub version: u32,
    pub request: Request,
}

/// What `weirctl` can ask. Changes are applied one at a time, completely or not at all; the
/// answer comes once the change is in the datapath and in the state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon, its XDP attachments, datapath counters and L7 listeners.
    Status,
    /// Every L4 VIP with its pool's size and traffic.
    VipList,
    /// Servers of one VIP, or of all.
    ServerList { vip: Option<String> },
    /// Datapath counters by reason, and traffic per VIP.
    Stats,
    /// Adds a server, ready for new flows.
    ServerAdd {
        vip: String,
        address: SocketAddr,
        /// Defaults to [`crate::DEFAULT_WEIGHT`].
        weight: Option<u32>,
    },
    /// Removes a server. Refused while it still has active flows, or when it is the VIP's
    /// last server, unless `force`.
    ServerRemove {
        vip: String,
        address: SocketAddr,
        #[serde(default)]
        force: bool,
    },
    /// Sets a server's admin state (ready, draining, disabled).
    ServerSetState {
        vip: String,
        address: SocketAddr,
        state: AdminState,
    },
    /// Sets a server's weight.
    ServerWeight {
        vip: String,
        address: SocketAddr,
        weight: u32,
    },
    /// Re-reads the config file and applies all of it or none of it.
    Reload,
    /// Opens the access log file again at its configured path (after logrotate moved it).
    ReopenLogs,
    /// Takes the node out of service: it withdraws its VIPs from BGP (the datapath keeps
    /// forwarding what still arrives). Kept across restarts.
    NodeDrain,
    /// Puts the node back in service.
    NodeUndrain,
    /// State changes (admin and health) with a sequence number above `after`, oldest first.
    Events {
        #[serde(default)]
        after: u64,
    },
    /// `weir upgrade`: the daemon passes its L7 listening sockets with the answer
    /// ([`Response::HandedOver`], `SCM_RIGHTS`), then stops as on SIGTERM.
    HandOver,
}

/// A response with its protocol version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub version: u32,
    #[serde(flatten)]
    pub result: Response,
}

/// The daemon's answer: a result, or an error that changed nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One is made per control request and serialized at once: the size of the largest variant
// (the status report) on the stack costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Response {
    Status(StatusReport),
    Vips(Vec<VipReport>),
    Servers(Vec<ServerReport>),
    Stats(StatsReport),
    /// A change (or reload) took effect; what changed, one line each (empty: nothing to do).
    Changed(Vec<String>),
    Events(Vec<Event>),
    /// The L7 listening sockets came with this answer, this many; the daemon is stopping.
    HandedOver {
        sockets: usize,
    },
    Error(ControlError),
}

/// Why a request was refused. The daemon's state is unchanged when it answers with one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlError {
    pub kind: ControlErrorKind,
    pub message: String,
}

/// Error classes, which `weirctl` maps to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlErrorKind {
    /// The daemon could not be reached (set by the client, never sent by the daemon).
    Unreachable,
    /// The request could not be parsed, or is too long.
    BadRequest,
    /// The request's protocol version is not [`VERSION`].
    UnsupportedVersion,
    /// Something failed inside the daemon.
    Internal,
    /// No such VIP or server.
    NotFound,
    /// The request names something impossible: a weight out of range, a server of the wrong
    /// address family, a duplicate.
    Invalid,
    /// Allowed in general, refused now: a server that still has flows, a VIP's last server.
    Refused,
    /// The config file (on reload) has errors.
    Config,
}

/// An L4 VIP as `weirctl vip list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipReport {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
    pub mode: ForwardingMode,
    pub hash: HashFieldsConfig,
    pub table_size: u32,
    pub servers: usize,
    /// Servers taking new flows (admin-ready).
    pub ready: usize,
    pub active_flows: usize,
    pub traffic: Traffic,
    /// A digest of the Maglev table the datapath holds (16 hex digits), as servers' addresses
    /// slot by slot: every node balancing the VIP from the same pools shows the same one.
    #[serde(default)]
    pub table_digest: String,
}

/// A server of an L4 pool as `weirctl server list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerReport {
    pub vip: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub admin: AdminState,
    pub health: HealthState,
    /// Flows pinned to it that are neither closing nor idle past their timeout.
    pub active_flows: usize,
    /// Packets the datapath sent it (client to server direction).
    pub traffic: Traffic,
    /// The last health check's result and how long ago it ran, when the pool is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// Since when (Unix ms) and why the server has its current health, once it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_since_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// Times health checks changed its health since the daemon started (or since it was
    /// added, if later).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub health_transitions: u64,
    /// For a server of an L7 vhost: its requests (then `active_flows` counts requests in
    /// flight and `traffic` is zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Traffic>,
}

/// What the L7 proxy sent a server, summed over workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Traffic {
    pub requests: u64,
    pub in_flight: u64,
    /// Responses by class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub responses: [u64; 5],
    /// Connect failures, resets and timeouts.
    pub failures: u64,
    /// Connections opened to it.
    pub connections: u64,
    /// Connections to it open now, in use or idle for reuse.
    #[serde(default)]
    pub open_connections: u64,
    /// Connection attempts that failed or timed out (also in `failures`).
    #[serde(default)]
    pub connect_failures: u64,
    /// Requests sent again after failing on it.
    #[serde(default)]
    pub retries: u64,
    /// Bytes written to it (request heads and bodies).
    #[serde(default)]
    pub request_bytes: u64,
    /// Bytes of its responses relayed to clients (heads and bodies).
    #[serde(default)]
    pub response_bytes: u64,
    /// Milliseconds left of an outlier-detection ejection (0: not ejected).
    #[serde(default)]
    pub ejected_ms: u64,
    /// Time from choosing the server to its response head (connecting included): how many
    /// responses took at most each of [`RESPONSE_TIME_BOUNDS_SECS`], not cumulative, the
    /// last slot counting the slower ones.
    #[serde(default)]
    pub response_time_buckets: [u64; RESPONSE_TIME_BUCKETS],
    /// The sum of those times, in microseconds.
    #[serde(default)]
    pub response_time_sum_us: u64,
}

/// Upper bounds of the response-time buckets, in seconds (Prometheus's defaults, from 1 ms).
pub const RESPONSE_TIME_BOUNDS_SECS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of a response-time histogram: one per bound, and one past the last.
pub const RESPONSE_TIME_BUCKETS: usize = RESPONSE_TIME_BOUNDS_SECS.len() + 1;

/// One state change of a server or pool, as the daemon recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event; `weirctl events --follow` asks for those after the last.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// What changed and, for health, why.
    pub text: String,
}

/// A server's health as checks see it; independent of its admin state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// No health check is configured (or the server is disabled): it counts as healthy.
    Unchecked,
    /// Checked, and up since its last `rise` successes (a new server starts here).
    Healthy,
    /// Checked, and down since its last `fall` failures: it takes no new traffic.
    Unhealthy,
}

impl HealthState {
    /// Whether the server may take new traffic as far as health goes.
    pub fn is_up(self) -> bool {
        self != HealthState::Unhealthy
    }
}

/// Packets, bytes and new flows, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Answer to [`Request::Stats`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Datapath counters summed over CPUs, one per verdict reason.
    pub counters: Vec<DatapathCounter>,
    pub vips: Vec<VipReport>,
    /// Embryonic flows and flow events.
    #[serde(default)]
    pub flows: FlowTableReport,
}

/// What the flow tables hold beyond each server's active flows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowTableReport {
    /// Flows whose first packet was seen and that have not proven themselves yet (within the
    /// embryonic timeout): not counted as any server's active flows.
    pub embryonic: usize,
    /// Flow events summed over CPUs, by name (`embryonic_created`, `embryonic_promoted`,
    /// `flood_deferred`).
    pub events: Vec<FlowEvent>,
    /// Entries in the flow table (idle and closing ones until they are evicted or
    /// overwritten included), when the report walked it (`/metrics`, the dashboard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<usize>,
    /// The flow table's size (`flow_table_size`) and the embryonic table's.
    #[serde(default)]
    pub capacity: usize,
    #[serde(default)]
    pub embryonic_capacity: usize,
}

/// One flow-event counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowEvent {
    pub event: String,
    pub count: u64,
}

/// Answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: DaemonStatus,
    pub xdp: Vec<XdpAttachment>,
    /// Datapath counters summed over CPUs, one per verdict reason.
    pub counters: Vec<DatapathCounter>,
    /// Embryonic flows and flow events.
    #[serde(default)]
    pub flows: FlowTableReport,
    pub listeners: Vec<ListenerStatus>,
    /// The certificates TLS vhosts present.
    #[serde(default)]
    pub certificates: Vec<CertificateStatus>,
}

/// A TLS vhost's certificate as loaded (at start or by the last reload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub vhost: String,
    /// The PEM file it was read from.
    pub path: String,
    /// The end of its validity, in seconds since the Unix epoch.
    pub not_after_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub config: String,
    pub uptime_secs: u64,
    /// The state file the pools are kept in.
    pub state_file: String,
    /// Where maps and links are pinned.
    pub bpf_dir: String,
    /// Whether this daemon took over a datapath a previous one left pinned (flows kept).
    pub adopted_datapath: bool,
    /// Config reloads since the daemon started.
    #[serde(default)]
    pub reloads: ReloadReport,
    /// The node's service state and its BGP announcements.
    #[serde(default)]
    pub node: NodeStatus,
}

/// Whether this node takes traffic for its VIPs, and what it announces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// `weirctl node drain` took it out of service: it announces no VIP.
    pub drained: bool,
    /// The BGP speaker's control socket, when announcements are on (`[bgp] bird_socket`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
    /// The VIP addresses the speaker announces (as last confirmed).
    #[serde(default)]
    pub announced: Vec<std::net::IpAddr>,
    /// The speaker's BGP sessions.
    #[serde(default)]
    pub sessions: Vec<BgpSession>,
    /// Why the speaker could not be told or asked, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speaker_error: Option<String>,
}

/// One BGP session of the speaker, as BIRD reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSession {
    pub name: String,
    /// BIRD's protocol state (`up`, `start`, …).
    pub state: String,
    /// `Established`, or what it is doing instead (`Active`, `Connect`, an error).
    pub info: String,
}

/// Config reloads (`weirctl reload`, SIGHUP) since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub succeeded: u64,
    pub failed: u64,
    /// When the last one was asked for (Unix ms), and whether it was applied.
    pub last_unix_ms: Option<u64>,
    pub last_succeeded: Option<bool>,
    /// When the last applied one was (Unix ms).
    pub last_success_unix_ms: Option<u64>,
}

/// The datapath's programs on one interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XdpAttachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: XdpMode,
    /// The kernel's id of the XDP program (as `bpftool prog` shows it); `None` on a server
    /// interface (`datapath.server_interfaces`), which has the NAT return program only.
    #[serde(default)]
    pub program_id: Option<u32>,
    /// The id of the NAT return program attached at TC ingress of the same interface.
    #[serde(default)]
    pub tc_program_id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatapathCounter {
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

/// An L7 listener and what its workers have done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub address: SocketAddr,
    pub workers: usize,
    pub connections: u64,
    /// `connections`, worker by worker: how evenly the kernel spreads them.
    #[serde(default)]
    pub connections_by_worker: Vec<u64>,
    /// Client connections open now.
    #[serde(default)]
    pub open_connections: u64,
    pub requests: u64,
    /// Requests weir answered itself because of the client (400, 404, 408, 414, 431, 501…),
    /// by status and reason; servers' failures are counted on the servers.
    #[serde(default)]
    pub refusals: Vec<RefusalCount>,
    /// On a listener that terminates TLS: its handshakes.
    #[serde(default)]
    pub tls: Option<TlsHandshakes>,
}

/// The TLS handshakes of one listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsHandshakes {
    /// Completed with a full handshake.
    pub full: u64,
    /// Completed by resuming an earlier session (ticket or session id).
    pub resumed: u64,
    /// On a passthrough listener: ClientHellos routed to a vhost and relayed.
    #[serde(default)]
    pub passed_through: u64,
    /// Failed, by reason (`timeout`, `closed`, `plaintext_http`, `unknown_name`, `protocol`),
    /// only the reasons seen.
    pub failures: Vec<(String, u64)>,
}

/// How often an L7 listener refused requests for one reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusalCount {
    pub status: u16,
    pub reason: String,
    pub count: u64,
}

impl RequestEnvelope {
    pub fn new(request: Request) -> Self {
        RequestEnvelope {
            version: VERSION,
            request,
        }
    }
}

impl ResponseEnvelope {
    pub fn new(result: Response) -> Self {
        ResponseEnvelope {
            version: VERSION,
            result,
        }
    }

    pub fn error(kind: ControlErrorKind, message: impl Into<String>) -> Self {
        Self::new(Response::Error(ControlError::new(kind, message)))
    }
}

impl ControlError {
    pub fn new(kind: ControlErrorKind, message: impl Into<String>) -> Self {
        ControlError {
            kind,
            message: message.into(),
        }
    }
}

/// Parses one request line, or says why it is not acceptable.
pub fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ControlError::new(
            ControlErrorKind::BadRequest,
            format!("request longer than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    // Read the version on its own first, so a newer client gets "unsupported version" rather
    // than a confusing parse error about a command this daemon does not know.
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let version = serde_json::from_slice::<VersionOnly>(line)
        .map_err(|err| {
            ControlError::new(
                ControlErrorKind::BadRequest,
                format!("malformed request: {err}"),
            )
        })?
        .version;
    if version != VERSION {
        return Err(ControlError::new(
            ControlErrorKind::UnsupportedVersion,
            format!("protocol version {version} is not supported (this daemon speaks {VERSION})"),
        ));
    }
    serde_json::from_slice::<RequestEnvelope>(line)
        .map(|envelope| envelope.request)
        .map_err(|err| {
            ControlError::new(
                ControlErrorKind::BadRequest,
                format!("malformed request: {err}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(line: &str) -> ControlError {
        match parse_request(line.as_bytes()) {
            Err(err) => err,
            Ok(request) => panic!("expected a refusal, got {request:?}"),
        }
    }

    #[test]
    fn request_round_trips_through_json() {
        let line = serde_json::to_vec(&RequestEnvelope::new(Request::Status)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&line),
            r#"{"version":1,"request":{"command":"status"}}"#
        );
        assert_eq!(parse_request(&line).unwrap(), Request::Status);
    }

    #[test]
    fn server_requests_round_trip_with_typed_fields() {
        let request = Request::ServerRemove {
            vip: "web".into(),
            address: "[fd00:11::2]:80".parse().unwrap(),
            force: true,
        };
        let line = serde_json::to_vec(&RequestEnvelope::new(request.clone())).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&line),
            r#"{"version":1,"request":{"command":"server_remove","vip":"web","address":"[fd00:11::2]:80","force":true}}"#
        );
        assert_eq!(parse_request(&line).unwrap(), request);
        // An address that does not parse, or a state that does not exist, is refused whole.
        for line in [
            r#"{"version":1,"request":{"command":"server_add","vip":"web","address":"198.18.11.2","weight":null}}"#,
            r#"{"version":1,"request":{"command":"server_set_state","vip":"web","address":"198.18.11.2:80","state":"sleeping"}}"#,
        ] {
            assert_eq!(refused(line).kind, ControlErrorKind::BadRequest, "{line}");
        }
    }

    #[test]
    fn malformed_and_foreign_requests_are_refused_with_a_reason() {
        assert_eq!(refused("{not json").kind, ControlErrorKind::BadRequest);
        assert_eq!(
            refused(r#"{"version":1,"request":{"command":"launch"}}"#).kind,
            ControlErrorKind::BadRequest
        );
        let err = refused(r#"{"version":9,"request":{"command":"status"}}"#);
        assert_eq!(err.kind, ControlErrorKind::UnsupportedVersion);
        assert!(err.message.contains("version 9"), "{}", err.message);
        let long = format!(
            r#"{{"version":1,"pad":"{}"}}"#,
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(refused(&long).kind, ControlErrorKind::BadRequest);
    }

    #[test]
    fn error_response_serializes_flat() {
        let json =
            serde_json::to_string(&ResponseEnvelope::error(ControlErrorKind::Internal, "boom"))
                .unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"error":{"kind":"internal","message":"boom"}}"#
        );
    }
}

/// A server's administrative state, set by the operator (independent of its health).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Takes new flows and requests.
    #[default]
    Ready,
    /// Takes no new flows or requests; established ones finish.
    Draining,
    /// In maintenance: no new traffic (and, later, no health checks).
    Disabled,
}

impl AdminState {
    /// The state's name, as the JSON and the CLI spell it.
    pub const fn name(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
