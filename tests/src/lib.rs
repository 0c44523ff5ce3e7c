//! weir's shared test utility: a test-bed of network namespaces that always cleans up, the lab
//! topology used by both the e2e tests and `cargo xtask run`, mock origins, and helpers to find
//! and run the project's binaries.
//!
//! Privileged tests are marked `#[ignore = "needs root: ..."]`; `cargo xtask test` includes them
//! when it runs as root and reports them as skipped otherwise.

pub mod bird;
pub mod browser;
pub mod client;
pub mod fleet;
pub mod flood;
pub mod http_client;
pub mod http_origin;
pub mod lab;
pub mod load;
pub mod netns;
pub mod origin;
pub mod packet_bed;
#[cfg(feature = "in-process-proxy")]
pub mod proxy;
pub mod supervisor;
pub mod tls;
pub mod topology;

use std::{
    io::{self, Read},
    path::PathBuf,
};

/// One `read`, tried again while it is interrupted (EINTR), as `read_exact` and `io::copy` do
/// and a bare `read` does not. A socket with a receive timeout fails with EINTR when the process
/// is stopped and resumed (a stop signal, a cgroup freeze), even with no signal handler
/// installed (signal(7)); a test client or origin must not count that as the peer's failure.
pub fn read_some(from: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    retry_interrupted(|| from.read(buf))
}

/// `operation` (one receive, on any kind of socket), tried again while it fails with EINTR:
/// see [`read_some`].
pub fn retry_interrupted<T>(mut operation: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match operation() {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// A binary built by this workspace (`weir`, `weirctl`, `weir-demo-backend`), next to the test
/// executable's profile directory. `cargo xtask test` builds them before running tests.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

/// Whether this process may create namespaces and load eBPF programs.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
