//! Where the datapath lives while no daemon runs: its maps and program links pinned on bpffs.
//!
//! A pinned object outlives the process that created it, so a daemon that exits — cleanly, by
//! `kill -9`, or for an upgrade — leaves the program attached and forwarding from its maps.
//! The next daemon opens the same pins: it loads its program against the pinned maps and
//! swaps it into the pinned links with one `bpf_link_update` each, so no packet meets a
//! moment without a program. Layout under the configured directory:
//!
//! ```text
//! <bpf_dir>/maps/<MAP NAME>    every map of the object (names::ALL_MAPS)
//! <bpf_dir>/links/<interface>     the XDP link on that interface
//! <bpf_dir>/tc-links/<interface>  the TC (tcx ingress) link of the NAT return path there
//! ```
//!
//! Removing the directory ([`PinDir::remove`]) detaches the program and frees the maps once no
//! process holds them: that is `weir detach`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from `linux/magic.h`: the `f_type` statfs reports for a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where distributions (and systemd) mount bpffs.
const SYSTEM_BPFFS: &str = "/sys/fs/bpf";

/// Why the pin directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{0} is not on a bpf filesystem: mount one (`mount -t bpf bpf DIR`) or use a directory \
         under {SYSTEM_BPFFS}"
    )]
    NotBpffs(PathBuf),
    #[error("cannot mount bpffs on {SYSTEM_BPFFS}: {0}")]
    Mount(#[source] nix::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The directory the datapath is pinned in.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Makes sure `root` can hold pins: mounts bpffs on `/sys/fs/bpf` when `root` is below
    /// it and nothing is mounted there yet, then creates the directories.
    pub fn prepare(root: &Path) -> Result<PinDir, PinError> {
        let existing = root
            .ancestors()
            .find(|dir| dir.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(existing)? {
            if !root.starts_with(SYSTEM_BPFFS) || is_bpffs(Path::new(SYSTEM_BPFFS))? {
                return Err(PinError::NotBpffs(root.to_path_buf()));
            }
            fs::create_dir_all(SYSTEM_BPFFS).map_err(io_error(SYSTEM_BPFFS))?;
            nix::mount::mount(
                Some("bpf"),
                SYSTEM_BPFFS,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(PinError::Mount)?;
            tracing::info!("mounted bpffs on {SYSTEM_BPFFS}");
        }
        let dir = PinDir {
            root: root.to_path_buf(),
        };
        for sub in [dir.maps_dir(), dir.links_dir(), dir.tc_links_dir()] {
            fs::create_dir_all(&sub).map_err(io_error(&sub))?;
        }
        Ok(dir)
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Where the XDP link on `interface` is pinned.
    pub fn link(&self, interface: &str) -> PathBuf {
        self.links_dir().join(interface)
    }

    /// Where the TC link on `interface` is pinned.
    pub fn tc_link(&self, interface: &str) -> PathBuf {
        self.tc_links_dir().join(interface)
    }

    /// Interfaces that have a pinned XDP link.
    pub fn linked_interfaces(&self) -> Result<Vec<String>, PinError> {
        entries_of(&self.links_dir())
    }

    /// Interfaces that have a pinned TC link.
    pub fn tc_linked_interfaces(&self) -> Result<Vec<String>, PinError> {
        entries_of(&self.tc_links_dir())
    }

    /// Whether any map is pinned here (a previous daemon left a datapath to adopt).
    pub fn has_maps(&self) -> bool {
        fs::read_dir(self.maps_dir()).is_ok_and(|mut entries| entries.next().is_some())
    }

    /// Unpins everything: the links detach and the maps are freed once no process holds
    /// them. Removing a directory that does not exist is not an error.
    pub fn remove(root: &Path) -> Result<(), PinError> {
        match fs::remove_dir_all(root) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PinError::Io {
                path: root.to_path_buf(),
                source,
            }),
        }
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    fn tc_links_dir(&self) -> PathBuf {
        self.root.join("tc-links")
    }
}

/// The names in `dir`, sorted.
fn entries_of(dir: &Path) -> Result<Vec<String>, PinError> {
    let entries = fs::read_dir(dir).map_err(io_error(dir))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn is_bpffs(path: &Path) -> Result<bool, PinError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|errno| PinError::Io {
        path: path.to_path_buf(),
        source: errno.into(),
    })?;
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

fn io_error(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> PinError {
    let path = path.as_ref().to_path_buf();
    move |source| PinError::Io { path, source }
}
