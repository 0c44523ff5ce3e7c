//! weir's benchmarks.
//!
//! - `cargo bench -p weir-benches --bench maglev`: building a Maglev table (65537 slots) for
//!   10, 100 and 1000 servers — what a server change costs the control plane.
//!
//! The end-to-end comparison against HAProxy, nginx and nftables (`cargo xtask bench`) and the
//! BPF_PROG_TEST_RUN ns/packet figures arrive with the bench harness and the L4 datapath.
