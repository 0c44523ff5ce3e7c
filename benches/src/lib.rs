//! weir's benchmarks.
//!
//! - `cargo bench -p weir-benches --bench maglev`: building a Maglev table (65537 slots) for
//!   10, 100 and 1000 servers — what a server change costs the control plane.
//! - `cargo xtask bench` (root; runs the `weir-bench` binary of this crate): the L4 datapath in
//!   ns/packet through `BPF_PROG_TEST_RUN` next to trivial programs ([`xdp`]), and end to end
//!   through the VIP against direct-to-server and nftables DNAT on the same namespaces
//!   ([`l4`], HTTP with wrk and UDP request/response with [`udp`]), interleaved, repeated, as
//!   Markdown and JSON ([`report`]); and the L7 runtime
//!   choice, one minimal proxy on tokio-uring and on compio ([`l7_runtime`]); and the L7
//!   proxy against HAProxy http mode and nginx ([`l7`]); and a Prometheus scrape of the
//!   daemon with 1 000 servers ([`scrape`]); and HTTPS termination against HAProxy and nginx
//!   ([`tls`]), and ring against aws-lc-rs under rustls ([`tls_providers`]).

pub mod chart;
pub mod l4;
pub mod l7;
pub mod l7_runtime;
pub mod nginx;
pub mod report;
pub mod scrape;
pub mod soak;
pub mod stats;
pub mod tls;
pub mod tls_providers;
pub mod udp;
pub mod wrk;
pub mod xdp;
