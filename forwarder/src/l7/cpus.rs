//! Where the workers run: each pinned to a CPU of its own, and each taking the connections
//! the kernel received on that CPU (decision 0026).
//!
//! A NIC's receive queues (or, on loopback and veth, the sender) put every packet of a
//! connection on one CPU. When the worker that serves the connection runs there too, the
//! socket's wake-ups stay on that CPU and its state stays in that CPU's cache; when it runs on
//! another, every wake-up crosses CPUs. The kernel's `SO_REUSEPORT` group can prefer, for a
//! new connection, the listening socket whose `SO_INCOMING_CPU` is the CPU handling the
//! handshake (since Linux 6.2; earlier kernels ignore the preference and spread by hash).
//! This is the kernel's own form of the "BPF program that selects the socket by CPU": a
//! program returns an index into the group, and a group's indices move when a socket leaves
//! it (the last one takes its place) or a previous daemon's sockets are handed over in
//! another order; the CPU stays attached to the socket it was set on.
//!
//! It is off unless configured (`pin_workers`): it spreads connections only as well as the
//! NIC spreads packets. Where one CPU receives everything (a single-queue NIC, or clients on
//! the same host, as in the benchmark), every connection goes to that CPU's worker.

use std::{io, mem, net::TcpListener, os::fd::AsRawFd};

/// The CPU each of `workers` workers is pinned to: with `pin`, when there is one worker per
/// CPU this thread may run on (the default, `workers = 0`), the `i`-th of those CPUs for
/// worker `i`; otherwise none, and the scheduler places the workers. With fewer workers than
/// CPUs, the connections received on a CPU without a worker cross CPUs anyway, and pinned
/// workers could not move off a CPU that is busy with something else.
pub fn worker_cpus(workers: usize, pin: bool) -> Vec<Option<usize>> {
    if !pin {
        return vec![None; workers];
    }
    let allowed = allowed_cpus();
    if allowed.len() != workers {
        tracing::info!(
            workers,
            cpus = allowed.len(),
            "not one L7 worker per CPU: workers are not pinned"
        );
        return vec![None; workers];
    }
    allowed.into_iter().map(Some).collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: `cpu_set_t` is a plain bit array, valid all zeros; `CPU_SET` stays in bounds
    // for `cpu` below `CPU_SETSIZE` (it came from `allowed_cpus`), and the kernel reads the
    // set only during the call.
    let done = unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Has `socket`'s `SO_REUSEPORT` group give it the new connections handled on `cpu`, or, with
/// `None`, none in particular (what an inherited socket had set is cleared).
pub fn prefer_incoming_cpu(socket: &TcpListener, cpu: Option<usize>) -> io::Result<()> {
    let cpu: libc::c_int = cpu.map_or(-1, |cpu| cpu as libc::c_int);
    // SAFETY: a plain setsockopt on a descriptor `socket` owns, with an int option value that
    // outlives the call.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&raw const cpu).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs the calling thread may run on, in ascending order (none if the kernel won't say).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as in `pin_current_thread`; the kernel writes at most the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        if libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}
