//! The daemon's management HTTP listener (`[metrics] listen`): the Prometheus exposition at
//! `/metrics`, the dashboard at `/` and the JSON it polls at `/api/dashboard`. Read-only:
//! `GET` (and `HEAD`) only; every change goes through `weirctl`, the one writer.
//!
//! One request per connection, answered and closed — what Prometheus and a polling page
//! need, and nothing a slow or hostile client can hold open: a head must arrive whole within
//! [`HEAD_TIMEOUT`] and within [`MAX_HEAD`] bytes. The dashboard's files are compiled into
//! the binary (`include_str!`), so it works on a host without internet; its scripts load
//! from this listener only (`Content-Security-Policy`).

use std::{borrow::Cow, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::State;

const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 8192;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// Serves the listener until the task is dropped.
pub(super) async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(answer(stream, Arc::clone(&state)));
    }
}

/// An answer: status line, content type and body.
struct Answer {
    status: &'static str,
    content_type: &'static str,
    /// The dashboard's files are served from the binary as they are, without a copy.
    body: Cow<'static, str>,
}

impl Answer {
    fn text(status: &'static str, body: impl Into<Cow<'static, str>>) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

async fn answer(mut stream: TcpStream, state: Arc<State>) {
    let Some((method, path)) = read_head(&mut stream).await else {
        return;
    };
    let answer = match (method.as_str(), path.as_str()) {
        ("GET" | "HEAD", path) => route(path, &state),
        _ => Answer::text("405 Method Not Allowed", "read-only: GET only\n"),
    };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'self'\r\n\
         Connection: close\r\n\r\n",
        answer.status,
        answer.content_type,
        answer.body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let _ = stream.write_all(answer.body.as_bytes()).await;
    }
}

fn route(path: &str, state: &State) -> Answer {
    // The query string (a cache-buster, say) does not change the answer.
    let path = path.split('?').next().unwrap_or(path);
    let asset = |content_type, body: &'static str| Answer {
        status: "200 OK",
        content_type,
        body: Cow::Borrowed(body),
    };
    match path {
        "/metrics" => match state.metrics() {
            Ok(body) => Answer {
                status: "200 OK",
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: body.into(),
            },
            Err(err) => Answer::text("500 Internal Server Error", err.message + "\n"),
        },
        "/api/dashboard" => match state.dashboard() {
            Ok(body) => Answer {
                status: "200 OK",
                content_type: "application/json",
                body: body.into(),
            },
            Err(err) => Answer::text("500 Internal Server Error", err.message + "\n"),
        },
        "/" | "/index.html" => asset("text/html; charset=utf-8", INDEX_HTML),
        "/dashboard.js" => asset("text/javascript; charset=utf-8", DASHBOARD_JS),
        "/dashboard.css" => asset("text/css; charset=utf-8", DASHBOARD_CSS),
        _ => Answer::text(
            "404 Not Found",
            "/ (dashboard), /metrics (Prometheus), /api/dashboard (JSON)\n",
        ),
    }
}

/// Reads a request head and returns its method and path; `None` (the connection is closed)
/// when it is malformed, too long or too slow.
async fn read_head(stream: &mut TcpStream) -> Option<(String, String)> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&head) {
                Ok(httparse::Status::Complete(_)) => {
                    return Some((request.method?.to_string(), request.path?.to_string()));
                }
                Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
                _ => return None,
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .flatten()
}
