//! The control socket: the daemon's server side and the client `weirctl` (and tests) use.
//!
//! One JSON line per request, one per response ([`weir_config::control`]). The daemon handles
//! requests one at a time, in arrival order, which is what makes it the single writer of its
//! state; a request that fails changes nothing.

use std::{
    fs,
    io::{self, BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
};
use weir_config::control::{
    self, ControlErrorKind, Request, RequestEnvelope, Response, ResponseEnvelope,
};

/// Creates the control socket at `path`, mode 0600 in a directory only root can enter.
///
/// A socket file left by a daemon that died is replaced; one that still answers means another
/// daemon is running, which is refused rather than stolen.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: another weir daemon is listening there", path.display()),
            ));
        }
        fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests on `listener` with `handle` until the task is dropped.
pub async fn serve<H>(listener: UnixListener, handle: Arc<H>)
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "control socket accept failed");
                continue;
            }
        };
        let handle = Arc::clone(&handle);
        tokio::spawn(async move {
            if let Err(err) = serve_connection(stream, handle).await {
                tracing::debug!(%err, "control connection ended with an error");
            }
        });
    }
}

async fn serve_connection<H>(stream: tokio::net::UnixStream, handle: Arc<H>) -> io::Result<()>
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let (read, mut write) = stream.into_split();
    // `take` bounds how much one line can make us buffer; the limit is renewed per line.
    let mut lines = tokio::io::BufReader::new(read.take(0));
    let mut line = Vec::new();
    loop {
        line.clear();
        lines
            .get_mut()
            .set_limit(control::MAX_REQUEST_BYTES as u64 + 1);
        if lines.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let too_long = line.len() > control::MAX_REQUEST_BYTES;
        let response = if too_long {
            ResponseEnvelope::error(
                ControlErrorKind::BadRequest,
                format!("request longer than {} bytes", control::MAX_REQUEST_BYTES),
            )
        } else {
            match control::parse_request(line.trim_ascii_end()) {
                Ok(request) => ResponseEnvelope::new(handle(request)),
                Err(refusal) => ResponseEnvelope::new(Response::Error(refusal)),
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            // The rest of that line cannot be told apart from a next request: stop here.
            return Ok(());
        }
    }
}

/// Why `weirctl` could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the weir daemon is not running (nothing listens on {})", path.display())]
    NotRunning { path: PathBuf },
    #[error("permission denied on {}: the control socket is for root", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("talking to the weir daemon on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the weir daemon sent an unreadable answer: {0}")]
    BadResponse(#[from] serde_json::Error),
}

/// A connection to the daemon's control socket.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                path: path.to_path_buf(),
            },
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                path: path.to_path_buf(),
            },
            _ => ClientError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request and waits for its response.
    pub fn request(&mut self, request: Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(&RequestEnvelope::new(request))?;
        line.push(b'\n');
        let io_error = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        self.reader.get_mut().write_all(&line).map_err(io_error)?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(io_error)?;
        if n == 0 {
            return Err(io_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without answering",
            )));
        }
        Ok(serde_json::from_str::<ResponseEnvelope>(&answer)?.result)
    }
}
