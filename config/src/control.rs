//! The control API between `weirctl` and the `weir` daemon.
//!
//! Transport: a Unix stream socket. Framing: one JSON object per line, a request from the client
//! answered by exactly one response from the daemon; a connection may carry several exchanges.
//! Every message carries the protocol [`VERSION`]; the daemon refuses a version it does not
//! speak with an error instead of guessing, so old and new `weirctl` binaries fail clearly.
//! The types live here, in one crate used by both sides, so they cannot drift apart.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::XdpMode;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Longest request line the daemon reads; a longer one is refused without being parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request with its protocol version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub version: u32,
    pub request: Request,
}

/// What `weirctl` can ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon, its XDP attachments, datapath counters and L7 listeners.
    Status,
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
pub enum Response {
    Status(StatusReport),
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
    /// The request could not be parsed, or is too long.
    BadRequest,
    /// The request's protocol version is not [`VERSION`].
    UnsupportedVersion,
    /// Something failed inside the daemon.
    Internal,
}

/// Answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: DaemonStatus,
    pub xdp: Vec<XdpAttachment>,
    /// Datapath counters summed over CPUs, one per verdict reason.
    pub counters: Vec<DatapathCounter>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub config: String,
    pub uptime_secs: u64,
}

/// Where the XDP program is attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XdpAttachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: XdpMode,
    /// The kernel's id of the loaded program (as `bpftool prog` shows it).
    pub program_id: u32,
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
    pub requests: u64,
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
