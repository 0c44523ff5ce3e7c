//! The runtime state file: the pools as operators changed them, kept across restarts.
//!
//! The config file says which VIPs exist and the pool each starts with; `weirctl` changes
//! pools at run time. Both must survive a restart and a reload, so the daemon keeps, per VIP,
//! the pool as it runs *and* the config's pool as it last applied it. A new config (reload or
//! restart) is then merged three ways ([`crate::l4::L4Services::plan`]): what the file changed
//! since it was last applied is applied; what operators changed at run time stays. This is
//! where weir differs from HAProxy, whose runtime-added servers vanish on reload.
//!
//! The file also records the ids that index the datapath's arrays, so a daemon that adopts a
//! pinned datapath keeps every established flow pointing at the server it was pinned to.
//!
//! Writes are atomic: a temporary file in the same directory, fsync, rename over the old
//! file, fsync of the directory. A crash leaves the old file or the new one, never a mix.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use weir_config::{ServerSpec, control::AdminState};

/// Format version of the file; a daemon refuses a file it does not understand.
pub const STATE_VERSION: u32 = 1;

/// Why the state file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {} is not valid: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {} has version {found}; this weir reads version {STATE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
}

/// Everything the daemon must remember across a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeState {
    pub version: u32,
    /// L4 VIPs by name.
    pub l4_vips: BTreeMap<String, VipState>,
    /// L7 virtual hosts' pools by vhost name (absent in files of weir before L7 pools).
    #[serde(default)]
    pub vhosts: BTreeMap<String, VhostState>,
    /// `weirctl node drain`: the node announces no VIP until `node undrain`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_drained: bool,
}

/// One virtual host's pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostState {
    /// The config file's pool when it was last applied.
    pub config_servers: Vec<ServerSpec>,
    /// The pool as it runs, runtime changes included.
    pub servers: Vec<VhostServerState>,
}

/// One server of a running L7 pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostServerState {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
}

/// One VIP's pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipState {
    /// Index of the VIP in the datapath's per-VIP arrays.
    pub id: u32,
    /// The config file's pool when it was last applied: what a new config is compared with.
    pub config_servers: Vec<ServerSpec>,
    /// The pool as it runs, runtime changes included.
    pub servers: Vec<ServerState>,
}

/// One server of a running pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerState {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// Index of the server in the datapath's server array (what flows point to).
    pub id: u32,
}

impl RuntimeState {
    /// Reads the state at `path`; `None` when there is no file yet (first start).
    pub fn load(path: &Path) -> Result<Option<RuntimeState>, StateError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let state: RuntimeState =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Version {
                path: path.to_path_buf(),
                found: state.version,
            });
        }
        Ok(Some(state))
    }

    /// Replaces the file at `path` with this state, atomically and durably.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io_error = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_error)?;
        let mut json = serde_json::to_vec_pretty(self).expect("runtime state serializes");
        json.push(b'\n');
        let temp = tempfile_path(path);
        let result = (|| {
            let mut file = fs::File::create(&temp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            fs::rename(&temp, path)?;
            // The rename is durable only once the directory entry is.
            fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map_err(io_error)
    }
}

/// `state.json` → `.state.json.tmp`, in the same directory so the rename stays atomic.
fn tempfile_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".to_string());
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RuntimeState {
        let address: SocketAddr = "198.18.11.2:80".parse().unwrap();
        RuntimeState {
            version: STATE_VERSION,
            vhosts: BTreeMap::new(),
            node_drained: true,
            l4_vips: BTreeMap::from([(
                "web".to_string(),
                VipState {
                    id: 3,
                    config_servers: vec![ServerSpec {
                        address,
                        weight: 100,
                    }],
                    servers: vec![ServerState {
                        address,
                        weight: 7,
                        state: AdminState::Draining,
                        id: 12,
                    }],
                },
            )]),
        }
    }

    #[test]
    fn saved_state_loads_back_equal_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(RuntimeState::load(&path).unwrap(), None);
        sample().save(&path).unwrap();
        assert_eq!(RuntimeState::load(&path).unwrap(), Some(sample()));
        let mut next = sample();
        next.l4_vips.get_mut("web").unwrap().servers[0].weight = 9;
        next.save(&path).unwrap();
        assert_eq!(RuntimeState::load(&path).unwrap(), Some(next));
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["state.json"]);
    }

    #[test]
    fn unreadable_or_foreign_state_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, "{\"version\":1,").unwrap();
        assert!(matches!(
            RuntimeState::load(&path),
            Err(StateError::Parse { .. })
        ));
        fs::write(&path, "{\"version\":2,\"l4_vips\":{}}").unwrap();
        let err = RuntimeState::load(&path).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn a_failed_save_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        sample().save(&path).unwrap();
        // A directory where the temporary file should go makes the write fail.
        fs::create_dir(dir.path().join(".state.json.tmp")).unwrap();
        let mut next = sample();
        next.l4_vips.clear();
        assert!(next.save(&path).is_err());
        assert_eq!(RuntimeState::load(&path).unwrap(), Some(sample()));
    }
}
