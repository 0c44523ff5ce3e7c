//! Restarts and upgrades that refuse nothing: the L7 listening sockets pass from one daemon to
//! the next, with the connections waiting in their backlogs.
//!
//! A listening socket is a kernel object; whoever holds a descriptor of it keeps it — and its
//! backlog — alive. So the stopping daemon never closes the last descriptor of a socket the
//! next one will use, and the next one accepts from the very socket clients were already
//! connecting to: no moment without a listener, no connection refused or reset.
//!
//! Under systemd (`SIGTERM`, then start — `systemctl restart`, also for a new binary): the
//! stopping daemon hands its sockets to the service manager's file descriptor store
//! (`FDSTORE=1`, which the unit allows with `FileDescriptorStoreMax=`), and the service manager
//! passes them to the next start as `LISTEN_FDS`, the socket-activation protocol. Between the
//! two, connections wait in the backlogs (1024 each). The same protocol works under any
//! supervisor that implements it; the e2e tests run one of their own.
//!
//! The L4 datapath needs none of this: it is pinned and keeps forwarding while no daemon runs.

use std::{
    net::TcpListener,
    os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// The name the sockets carry in the service manager's store.
const FD_NAME: &str = "weir-l7";

/// The listening sockets the service manager passed to this process (`LISTEN_FDS`, for this
/// pid), taken over; none when it passed none. Descriptors that are not listening TCP sockets
/// are closed with a warning. The variables are removed, so no child inherits them.
pub fn from_service_manager() -> Vec<TcpListener> {
    let fds: Vec<RawFd> = match sd_notify::listen_fds() {
        Ok(fds) => fds.collect(),
        Err(err) => {
            tracing::warn!(%err, "LISTEN_FDS cannot be read: no socket taken over");
            Vec::new()
        }
    };
    // SAFETY: single-threaded start-up, before any thread that reads the environment.
    unsafe {
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(name);
        }
    }
    fds.into_iter()
        .filter_map(|fd| {
            // SAFETY: the service manager passed `fd` to this process to own (LISTEN_FDS),
            // and nothing else here took it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            if is_listening_tcp(owned.as_fd()) {
                Some(TcpListener::from(owned))
            } else {
                tracing::warn!(
                    fd,
                    "a passed descriptor is not a listening TCP socket: closed"
                );
                None
            }
        })
        .collect()
}

/// Hands `sockets` to the service manager's store, for the next start, when one is listening
/// (`NOTIFY_SOCKET`); says whether it did.
pub fn to_service_manager(sockets: &[OwnedFd]) -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() || sockets.is_empty() {
        return false;
    }
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
    let state = [
        sd_notify::NotifyState::FdStore,
        sd_notify::NotifyState::FdName(FD_NAME),
    ];
    match sd_notify::notify_with_fds(&state, &fds) {
        Ok(()) => {
            tracing::info!(
                sockets = fds.len(),
                "L7 listening sockets handed to the service manager"
            );
            true
        }
        Err(err) => {
            tracing::warn!(%err, "cannot hand the L7 listening sockets to the service manager: the next start binds anew");
            false
        }
    }
}

/// Whether `fd` is a TCP socket in the listening state.
fn is_listening_tcp(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
        && getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream)
}
