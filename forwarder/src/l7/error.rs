//! Why an exchange, or one attempt of it, ended early — one type for the whole proxy.
//!
//! Three things decide what happens next, and [`ProxyError`] records each: which side failed
//! ([`Side`]: counted against the server only when it was the server), what the client is
//! answered (a local status while nothing of a response has reached it; nothing after, when
//! the connection is simply closed), and whether and where the request may go again
//! ([`Retry`]). After Pingora's error source and retry type, scaled down to what an HTTP/1.1
//! proxy needs.

/// Which side of the exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: it went away, stalled, or sent something that cannot be relayed.
    Client,
    /// The server: it could not be reached, broke off, or answered something invalid.
    Server,
}

/// Whether, and where, a request whose attempt failed may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Not at all: the server may have acted on it, or the client already has part of a
    /// response (or is gone).
    No,
    /// To the same server on a fresh connection: a kept-alive connection it had closed.
    SameServer,
    /// To another server: this one could not be reached, or closed before answering.
    OtherServer,
}

/// Why an exchange, or one attempt of it, ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyError {
    pub side: Side,
    /// The local response for the client (status, reason), if nothing of a response has
    /// reached it; `None`: close the connection.
    pub answer: Option<(u16, &'static str)>,
    pub retry: Retry,
}

impl ProxyError {
    /// The client is gone, or stalled beyond its deadline: close.
    pub const fn client_gone() -> ProxyError {
        ProxyError {
            side: Side::Client,
            answer: None,
            retry: Retry::No,
        }
    }

    /// The client's request is refused with `status` (400, 404, 408, …).
    pub const fn client(status: u16, reason: &'static str) -> ProxyError {
        ProxyError {
            side: Side::Client,
            answer: Some((status, reason)),
            retry: Retry::No,
        }
    }

    /// The server failed before anything of a response reached the client: `status`
    /// (502/503/504) unless `retry` finds another way.
    pub const fn server(status: u16, reason: &'static str, retry: Retry) -> ProxyError {
        ProxyError {
            side: Side::Server,
            answer: Some((status, reason)),
            retry,
        }
    }

    /// A response was under way and broke off (either side): close the client connection.
    pub const fn cut(side: Side) -> ProxyError {
        ProxyError {
            side,
            answer: None,
            retry: Retry::No,
        }
    }

    /// Whether it counts as the server's failure (its counters, outlier detection): the
    /// server's fault, before a response was under way.
    pub fn counts_against_server(&self) -> bool {
        self.side == Side::Server && self.answer.is_some()
    }
}
