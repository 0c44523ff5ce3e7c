//! The weir daemon's parts and the `weirctl` client.
//!
//! - [`datapath`]: loads the XDP program built from the `ebpf` crate, attaches it, reads its maps.
//! - [`l4`]: the L4 services model (VIPs, pools, server states) and how changes reach the maps.
//! - [`l7`]: the HTTP/1.1 reverse proxy: io_uring workers (one thread per core), Host routing.
//! - [`vhosts`]: the L7 virtual hosts and pools model, and the snapshot the workers route with.
//! - [`health`]: active health checks on a thread of their own, reporting transitions.
//! - [`pool`]: what L4 and L7 pools share (config merge, change lines).
//! - [`maglev`]: Maglev lookup-table builder (weights, deterministic across nodes).
//! - [`pins`]: the bpffs directory that keeps the datapath running between daemons.
//! - [`state`]: the durable runtime state file, and how it combines with the config.
//! - [`control`]: the Unix-socket control server and its client, speaking
//!   [`weir_config::control`].
//! - [`daemon`]: wires them together; the `weir` binary is a thin shell around it.

/// The control socket lives in its own crate, which `weirctl` builds without the eBPF toolchain.
pub use weir_control as control;
pub mod bgp;
pub mod daemon;
pub mod datapath;
pub mod handover;
pub mod health;
pub mod l4;
pub mod l7;
pub mod lock;
pub mod maglev;
mod map_batch;
pub mod pins;
pub mod pool;
pub mod state;
pub mod vhosts;
