//! Writing many elements of a map in one `bpf(2)` call (`BPF_MAP_UPDATE_BATCH`, Linux 5.6),
//! which aya 0.14 does not wrap.
//!
//! Why: a Maglev table is 65 537 slots by default, and writing it one element per syscall
//! made a table switch take 78 ms; with one batch call it takes 23 ms (decision 0011). The
//! kernel copies and stores the elements in order; on failure part of the batch may have
//! been written, which is harmless for the two uses: a table that is not installed yet, and
//! the VIP index rebuilt at start (rewritten whole the next time).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{Array, IterableMap, MapData};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Writes `values[i]` at index `i` of `array`, for every `i`, in one call. The typed handle
/// guarantees the kernel's value size is `V`'s (aya checks it when the handle is made), so the
/// kernel reads exactly `values`.
pub fn fill_array<V: aya::Pod>(array: &Array<MapData, V>, values: &[V]) -> io::Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(values.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "batch too large"))?;
    let keys: Vec<u32> = (0..count).collect();
    // SAFETY: an all-zero `bpf_attr` is valid (a union of plain integers); unused fields must
    // be zero for the kernel to accept the command.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain integers into the `batch` member of the union.
    unsafe {
        let batch = &mut attr.batch;
        batch.map_fd = array.map().fd().as_fd().as_raw_fd() as u32;
        batch.keys = keys.as_ptr() as u64;
        batch.values = values.as_ptr() as u64;
        batch.count = count;
    }
    // SAFETY: `attr` is a valid `bpf_attr` of the size passed; `keys` and `values` are live,
    // `count` elements long, and of the map's key (u32) and value (`V`) sizes, so the kernel
    // reads only them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
            &raw mut attr,
            std::mem::size_of::<bpf_attr>() as libc::c_long,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
