//! weir's benchmarks: criterion micro-benchmarks (Maglev table builds, HTTP parsing) and the
//! end-to-end comparison harness against HAProxy, nginx and nftables that `cargo xtask bench`
//! drives. They arrive with the L4 datapath, the L7 proxy and the bench harness; this crate
//! holds their place in the workspace layout.
