//! Types shared by weir's eBPF programs (`ebpf` crate) and its userspace (`forwarder`).
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel maps store these bytes and
//! both sides read them, so there is exactly one definition of each layout. With the `user`
//! feature the types also implement [`aya::Pod`], which is what lets userspace put them in maps.
//!
//! Rules for this crate: `no_std`, no allocation, no padding holes left implicit (every field
//! is sized and ordered so the layout is the same on both sides), and every map name that
//! userspace looks up is a constant here rather than a string repeated in two crates.
#![no_std]

pub mod stats;

pub use stats::{Counter, Stat};

/// Names of the eBPF programs and maps, as the loader looks them up in the object file.
pub mod names {
    /// The XDP entry point: parse, classify, count, (later) balance.
    pub const XDP_PROGRAM: &str = "weir_xdp";
    /// Per-CPU array of [`crate::Counter`], indexed by [`crate::Stat`].
    pub const STATS_MAP: &str = "WEIR_STATS";
}
