//! Writing many elements of a map in one `bpf(2)` call (`BPF_MAP_UPDATE_BATCH`, Linux 5.6),
//! which aya 0.14 does not wrap.
//!
//! Why: a Maglev table is 65 537 slots by default, and writing it one element per syscall
//! took 78 ms per table switch; one batch call writes it in a few (decision 0011). The
//! kernel copies and stores the elements in order; on failure part of the batch may have
//! been written, which is harmless for a table that is not installed yet (the only use).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::MapData;
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Writes `values[i]` at key `keys[i]` for every `i`, in one call. `K` and `V` must be the
/// map's key and value types (their sizes are what the kernel reads per element).
pub fn update<K: aya::Pod, V: aya::Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "batch too large"))?;
    // SAFETY: an all-zero `bpf_attr` is valid (a union of plain integers); unused fields must
    // be zero for the kernel to accept the command.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain integers into the `batch` member of the union.
    unsafe {
        let batch = &mut attr.batch;
        batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
        batch.keys = keys.as_ptr() as u64;
        batch.values = values.as_ptr() as u64;
        batch.count = count;
    }
    // SAFETY: `attr` is a valid `bpf_attr` of the size passed; `keys` and `values` are live,
    // `count` elements long, and of the map's element sizes, so the kernel reads only them.
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
