//! The control socket: the daemon's server side and the client `weirctl` (and tests) use.
//!
//! One JSON line per request, one per response ([`weir_config::control`]). The daemon handles
//! requests one at a time, in arrival order, which is what makes it the single writer of its
//! state; a request that fails changes nothing.

use std::{
    fs,
    io::{self, BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{fs::PermissionsExt, net::UnixStream},
    },
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

/// What the daemon gives on [`Request::HandOver`]: its listening sockets, and a way to stop
/// once they have been sent.
pub struct HandOver {
    /// Second descriptors of the L7 listening sockets.
    pub sockets: Box<dyn Fn() -> io::Result<Vec<OwnedFd>> + Send + Sync>,
    /// Called once the sockets are on their way: the daemon stops as on SIGTERM.
    pub sent: Box<dyn Fn() + Send + Sync>,
}

/// Answers requests on `listener` with `handle` (and `hand_over` for [`Request::HandOver`])
/// until the task is dropped.
pub async fn serve<H>(listener: UnixListener, handle: Arc<H>, hand_over: Arc<HandOver>)
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
        let hand_over = Arc::clone(&hand_over);
        tokio::spawn(async move {
            if let Err(err) = serve_connection(stream, handle, hand_over).await {
                tracing::debug!(%err, "control connection ended with an error");
            }
        });
    }
}

async fn serve_connection<H>(
    stream: tokio::net::UnixStream,
    handle: Arc<H>,
    hand_over: Arc<HandOver>,
) -> io::Result<()>
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
                Ok(Request::HandOver) => {
                    let sockets = (hand_over.sockets)()?;
                    let answer = ResponseEnvelope::new(Response::HandedOver {
                        sockets: sockets.len(),
                    });
                    let mut out = serde_json::to_vec(&answer).map_err(io::Error::other)?;
                    out.push(b'\n');
                    send_with_fds(lines.get_ref().get_ref().as_ref(), &out, &sockets).await?;
                    (hand_over.sent)();
                    return Ok(());
                }
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

/// Writes `bytes` on `stream` with `fds` attached (`SCM_RIGHTS`), waiting while it is full.
async fn send_with_fds(
    stream: &tokio::net::UnixStream,
    bytes: &[u8],
    fds: &[OwnedFd],
) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [io::IoSlice::new(bytes)];
            let rights = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(stream.as_raw_fd(), &iov, &rights, MsgFlags::empty(), None)
                .map_err(io::Error::from)
        });
        match sent {
            // The answer is one short line: a datagram-sized write goes whole or not at all.
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(io::Error::other("the hand-over answer was cut short")),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Asks the daemon on `path` to hand over ([`Request::HandOver`]); its listening sockets.
pub fn take_over(path: &Path) -> Result<Vec<OwnedFd>, ClientError> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let client = Client::connect(path)?;
    let io_error = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = client.reader.into_inner();
    let mut line = serde_json::to_vec(&RequestEnvelope::new(Request::HandOver))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_error)?;
    let mut buf = vec![0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 256]);
    let message = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|errno| io_error(errno.into()))?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs().map_err(|errno| io_error(errno.into()))? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel installed these descriptors for this process.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = message.bytes;
    let answer: ResponseEnvelope = serde_json::from_slice(buf[..n].trim_ascii_end())?;
    match answer.result {
        Response::HandedOver { .. } => Ok(fds),
        Response::Error(error) => Err(ClientError::Refused(error)),
        other => Err(ClientError::Io {
            path: path.to_path_buf(),
            source: io::Error::other(format!("unexpected answer {other:?}")),
        }),
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
    #[error("the weir daemon refused: {}", .0.message)]
    Refused(control::ControlError),
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
