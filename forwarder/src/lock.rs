//! One daemon at a time: an exclusive `flock` on a file next to the state file, taken before
//! the daemon reads its state, touches a pin or binds a socket.
//!
//! Two daemons on one datapath would each believe they own the maps: the second would adopt
//! the pins, swap its programs into the live links and leave the first reporting programs the
//! kernel no longer runs. The lock makes the second one stop before it does anything. `flock`
//! is released by the kernel when the process ends, however it ends (`kill -9` included), so a
//! crashed daemon never leaves a stale lock behind; the file itself stays, holding the pid of
//! the daemon that last took it (for the error message only).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, Write},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another weir daemon{} is running with this state file (it holds {}): this one stops \
         without touching anything",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        path.display()
    )]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lock, held for as long as the value lives.
#[derive(Debug)]
pub struct InstanceLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl InstanceLock {
    /// The lock file of the daemon whose state lives in `state_file`.
    pub fn path_for(state_file: &Path) -> PathBuf {
        let mut name = state_file.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        state_file.with_file_name(name)
    }

    /// Takes the lock of `state_file`'s daemon, or says who holds it.
    pub fn acquire(state_file: &Path) -> Result<InstanceLock, LockError> {
        let path = InstanceLock::path_for(state_file);
        let io_error = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_error)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::Held {
                    path,
                    pid: pid.trim().parse().ok(),
                });
            }
            Err((_, errno)) => return Err(io_error(errno.into())),
        };
        file.set_len(0).map_err(io_error)?;
        file.rewind().map_err(io_error)?;
        write!(file, "{}", std::process::id()).map_err(io_error)?;
        Ok(InstanceLock { _file: file, path })
    }

    /// Like [`InstanceLock::acquire`], waiting up to `wait` for the holder to let go (a daemon
    /// handing over lets go once nothing writes its state any more).
    pub fn acquire_waiting(
        state_file: &Path,
        wait: std::time::Duration,
    ) -> Result<InstanceLock, LockError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match InstanceLock::acquire(state_file) {
                Err(LockError::Held { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_may_lock_once_it_is_gone() {
        let dir = std::env::temp_dir().join(format!("weir-lock-{}", std::process::id()));
        let state = dir.join("state.json");
        let first = InstanceLock::acquire(&state).expect("first lock");
        assert_eq!(first.path(), dir.join("state.json.lock"));
        // flock locks belong to the open file description: a second open is a second holder,
        // as another process would be.
        match InstanceLock::acquire(&state) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        InstanceLock::acquire(&state).expect("the lock is free once its holder is gone");
        let _ = fs::remove_dir_all(&dir);
    }
}
