//! A service manager of our own, with as much of systemd as a restart needs: `Type=notify`
//! (`NOTIFY_SOCKET`), the file descriptor store (`FDSTORE=1`, `FDSTOREREMOVE=1`, `FDNAME=`)
//! and socket activation (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`). The e2e tests restart
//! `weir` under it exactly as `systemctl restart` would — SIGTERM, wait for the exit, start
//! with the stored descriptors — or as `Restart=on-failure` does after a crash.

use std::{
    collections::HashSet,
    io::IoSliceMut,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{net::UnixDatagram, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::netns::Netns;

pub struct Supervisor {
    socket: UnixDatagram,
    path: PathBuf,
    /// The descriptor store, with each descriptor's name: one descriptor per distinct file,
    /// as systemd keeps it.
    store: Vec<(String, OwnedFd)>,
    /// Every message received, in order.
    pub messages: Vec<String>,
}

impl Supervisor {
    /// Listens for notifications on a datagram socket at `path`.
    pub fn new(path: &Path) -> Result<Supervisor> {
        let socket = UnixDatagram::bind(path)?;
        socket.set_nonblocking(true)?;
        Ok(Supervisor {
            socket,
            path: path.to_path_buf(),
            store: Vec::new(),
            messages: Vec::new(),
        })
    }

    /// Reads every notification waiting, as systemd handles them: `FDSTOREREMOVE=1` closes
    /// the stored descriptors named `FDNAME=`, then `FDSTORE=1` stores the descriptors the
    /// message carries under that name (a file already stored is not stored twice).
    pub fn collect(&mut self) -> Result<()> {
        loop {
            let mut buf = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 64]);
            let message = match recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(message) => message,
                Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(err) => return Err(err.into()),
            };
            let mut fds = Vec::new();
            for cmsg in message.cmsgs()? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    // SAFETY: the kernel installed these descriptors for this process.
                    fds.extend(
                        received
                            .into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let text = String::from_utf8_lossy(message.iovs().next().unwrap_or(&[])).into_owned();
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                self.store.retain(|(stored, _)| *stored != name);
            }
            if text.lines().any(|l| l == "FDSTORE=1") {
                let mut stored: HashSet<(u64, u64)> =
                    self.store.iter().map(|(_, fd)| identity(fd)).collect();
                for fd in fds {
                    if stored.insert(identity(&fd)) {
                        self.store.push((name.clone(), fd));
                    }
                }
            }
            self.messages.push(text);
        }
    }

    /// Descriptors in the store.
    pub fn stored(&self) -> usize {
        self.store.len()
    }

    /// A command that runs `program ARGS` in `ns` as the service: `NOTIFY_SOCKET` set, the
    /// store passed from descriptor 3 on with `LISTEN_FDS`, and `LISTEN_PID` the service's
    /// pid (the shell's, which `exec` keeps through `ip netns exec` and into `program`).
    pub fn command(&self, ns: &Netns, program: &Path, args: &[&str]) -> Command {
        let names: Vec<&str> = self.store.iter().map(|(name, _)| name.as_str()).collect();
        let mut command = ns.command("sh");
        command
            .arg("-c")
            .arg(format!(
                "LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={} exec \"$0\" \"$@\"",
                self.store.len(),
                names.join(":")
            ))
            .arg(program)
            .args(args)
            .env("NOTIFY_SOCKET", &self.path);
        let fds: Vec<RawFd> = self.store.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2, close).
        unsafe {
            command.pre_exec(move || {
                // Out of the way first, so no target overwrites a source still to be moved.
                let mut moved = Vec::with_capacity(fds.len());
                for &fd in &fds {
                    let high = libc::fcntl(fd, libc::F_DUPFD, 512);
                    if high < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    moved.push(high);
                }
                for (i, &high) in moved.iter().enumerate() {
                    if libc::dup2(high, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(high);
                }
                Ok(())
            });
        }
        command
    }
}

/// The (device, inode) of the file `fd` refers to.
fn identity(fd: &OwnedFd) -> (u64, u64) {
    let stat = nix::sys::stat::fstat(fd).expect("fstat");
    (stat.st_dev, stat.st_ino)
}
