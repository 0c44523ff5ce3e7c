//! Restarts and upgrades that refuse nothing: the L7 listening sockets pass from one daemon to
//! the next, with the connections waiting in their backlogs.
//!
//! A listening socket is a kernel object; whoever holds a descriptor of it keeps it — and its
//! backlog — alive. So the stopping daemon never closes the last descriptor of a socket the
//! next one will use, and the next one accepts from the very socket clients were already
//! connecting to: no moment without a listener, no connection refused or reset.
//!
//! Under systemd: the daemon puts its sockets in the service manager's file descriptor store
//! (`FDSTORE=1`, which the unit allows with `FileDescriptorStoreMax=`) as soon as they are
//! bound, and the service manager passes them to the next start as `LISTEN_FDS`, the
//! socket-activation protocol. Stored at start rather than at stop, they outlive a daemon that
//! dies without stopping (`kill -9`, a crash): under `Restart=on-failure` the next daemon
//! accepts what arrived meanwhile, as after `systemctl restart`. Between the two daemons,
//! connections wait in the backlogs (1024 each). The same protocol works under any supervisor
//! that implements it; the e2e tests run one of their own.
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

/// Makes `sockets` — every listening socket this daemon serves — the service manager's store
/// of L7 sockets, when one is listening (`NOTIFY_SOCKET`). A store that cannot be written is
/// logged: the next start then binds anew.
///
/// What the store held is dropped first (`FDSTOREREMOVE=1`): the previous daemon's sockets
/// came back to this one as `LISTEN_FDS`, and one for an address this config no longer has
/// was closed here, but the store's copy would keep it listening — its backlog completing
/// handshakes nobody answers — and pass it to every later start. Only a crash between the two
/// messages leaves the store empty, and then the next start binds anew.
pub fn store_with_service_manager(sockets: &[OwnedFd]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() || sockets.is_empty() {
        return;
    }
    let remove = [
        sd_notify::NotifyState::FdStoreRemove,
        sd_notify::NotifyState::FdName(FD_NAME),
    ];
    if let Err(err) = sd_notify::notify(&remove) {
        tracing::warn!(%err, "cannot clear the service manager's store of L7 sockets");
    }
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
    let store = [
        sd_notify::NotifyState::FdStore,
        sd_notify::NotifyState::FdName(FD_NAME),
    ];
    match sd_notify::notify_with_fds(&store, &fds) {
        Ok(()) => tracing::info!(
            sockets = fds.len(),
            "L7 listening sockets kept in the service manager's store"
        ),
        Err(err) => {
            tracing::warn!(%err, "cannot keep the L7 listening sockets in the service manager's store: the next start binds anew")
        }
    }
}

/// Whether `fd` is a TCP socket in the listening state.
fn is_listening_tcp(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
        && getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream)
}
