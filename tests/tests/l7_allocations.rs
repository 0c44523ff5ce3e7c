//! Heap allocations the L7 workers make per request on the common path: a kept-alive client
//! sending GETs, answered by a kept-alive server connection. Counted by a global allocator
//! that counts only on the workers' threads (`weir-l7-*`), so the client and the origin in
//! this process do not count. In a binary of its own, because it installs the allocator.
//!
//! Every allocation on this path is work per request (and cache misses): the proxy's CPU per
//! request. The bound below is what the path costs today; a change that adds allocations
//! fails here and says how many. Today's 4 are all compio's, one per I/O operation (two
//! reads, two writes): the operation's state (128 bytes, 144 for a read into the worker's
//! ring, under compio 0.19), which the runtime does not pool. The proxy's own are gone:
//! request and response heads are parsed into heads the worker keeps and reuses (17 before
//! that; writing the forwarding headers, `Via` and the status line in place had taken it
//! from 27 to 19, static method names and borrowed `Connection` tokens to 17), and the
//! operations' timeouts are slots in the worker's own table (8 before that: compio's timers
//! made a 456-byte leaf of their B-tree whenever a timeout went into an empty tree, which
//! with this test's one connection was every operation; decision 0031).
//!
//! The same binary measures what an idle kept-alive connection holds on its worker.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use weir_tests::{
    http_client::{Body, HttpConn},
    http_origin::HttpOrigin,
    proxy::Proxy,
    tls::{KeyKind, TestCa, TlsClient},
};

/// Allocations (and moving reallocations) on L7 worker threads while counting is on.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Bytes the L7 worker threads hold: what they allocated less what they freed, always kept.
static WORKER_BYTES: AtomicI64 = AtomicI64::new(0);
/// Held by each test: the counters see every worker thread in this process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct CountingAllocator;

/// Whether this thread is an L7 worker (by its name, read without allocating).
fn on_worker() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: a 16-byte buffer, the size the call writes at most (with its NUL).
    let rc = unsafe {
        libc::pthread_getname_np(libc::pthread_self(), name.as_mut_ptr().cast(), name.len())
    };
    rc == 0 && name.starts_with(b"weir-l7-")
}

/// Notes an allocation of `size` bytes, and that `freed` bytes were given back.
fn count(size: usize, freed: usize) {
    if on_worker() {
        WORKER_BYTES.fetch_add(size as i64 - freed as i64, Ordering::Relaxed);
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is passed to the system allocator unchanged; counting touches only
// atomics and a stack buffer, never the heap.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 0);
        // SAFETY: as the caller's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if on_worker() {
            WORKER_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: as the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 0);
        // SAFETY: as the caller's contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size, layout.size());
        // SAFETY: as the caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Allocations per request the common path may make (see the module docs): 4, and room for
/// the rare one a worker makes now and then (a timer or a table growing), not for one more per
/// request.
const MAX_PER_REQUEST: f64 = 4.5;

/// An origin on loopback network `net` and a proxy in front of it with one worker (so every
/// request is served on the one thread counted): vhost `a.test`, with `more` (`tls = …`).
fn one_worker_proxy(net: u8, more: &str) -> (HttpOrigin, Proxy) {
    let origin = HttpOrigin::start(format!("127.0.{net}.10:0").parse().unwrap(), "s1").unwrap();
    let vhost = format!(
        "[[vhost]]\nname = \"a\"\nlisten = \"LISTEN\"\nhosts = [\"a.test\"]\n{more}servers = [{{ address = \"SERVER1\" }}]\n"
    );
    let proxy = Proxy::start("workers = 1", &vhost, &[&origin]);
    (origin, proxy)
}

/// A GET through a kept-alive `conn`, answered 200.
fn get(conn: &mut HttpConn) {
    let response = conn
        .request("GET", "/items?id=7", "a.test", "", Body::None)
        .unwrap();
    assert_eq!(response.status, 200);
}

/// Requests sent before measuring: buffers, the server connection and the worker's spares
/// are then in place.
const WARM_UP: usize = 200;

/// A kept-alive connection to `proxy` that has sent [`WARM_UP`] requests.
fn warmed_up(proxy: &Proxy) -> HttpConn {
    let mut conn = HttpConn::connect(proxy.address).unwrap();
    for _ in 0..WARM_UP {
        get(&mut conn);
    }
    conn
}

#[test]
fn a_kept_alive_get_allocates_within_its_budget() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_origin, proxy) = one_worker_proxy(210, "");
    let mut conn = warmed_up(&proxy);
    let requests = 2000;
    COUNTING.store(true, Ordering::Relaxed);
    for _ in 0..requests {
        get(&mut conn);
    }
    COUNTING.store(false, Ordering::Relaxed);
    let per_request = ALLOCATIONS.load(Ordering::Relaxed) as f64 / f64::from(requests);
    println!("L7 worker allocations per kept-alive GET: {per_request:.4}");
    assert!(
        per_request <= MAX_PER_REQUEST,
        "{per_request:.2} allocations per request, budget {MAX_PER_REQUEST}"
    );
}

/// What an idle kept-alive client connection may hold on its worker, at most: its task and
/// socket state (about 5 KiB), no I/O buffer. A connection that kept a 16 KiB read buffer
/// while it waited for its next request, as weir's did before, fails here.
const MAX_IDLE_CONNECTION_BYTES: i64 = 8 * 1024;
/// The same over TLS, with rustls's state besides (about 7 KiB: its record buffer shrinks to
/// 4 KiB when empty). Holding the 16 KiB ciphertext buffer while idle, as before, fails here.
const MAX_IDLE_TLS_CONNECTION_BYTES: i64 = 16 * 1024;
/// Idle connections opened to measure one's share.
const IDLE_CONNECTIONS: usize = 256;

/// The bytes the workers hold once they have settled: a worker finishes a response's
/// bookkeeping after the client has it.
fn settled() -> i64 {
    std::thread::sleep(Duration::from_millis(200));
    WORKER_BYTES.load(Ordering::Relaxed)
}

#[test]
fn an_idle_kept_alive_connection_holds_no_read_buffer() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_origin, proxy) = one_worker_proxy(211, "");
    let _warm = warmed_up(&proxy);
    let before = settled();
    let count = IDLE_CONNECTIONS;
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        let mut conn = HttpConn::connect(proxy.address).unwrap();
        get(&mut conn);
        idle.push(conn);
    }
    let held = settled() - before;
    let per_connection = held / count as i64;
    println!("an idle kept-alive client connection holds {per_connection} bytes on its worker");
    assert!(
        per_connection <= MAX_IDLE_CONNECTION_BYTES,
        "an idle connection holds {per_connection} bytes, at most {MAX_IDLE_CONNECTION_BYTES} expected"
    );
    // Every one of them is still served, from its first byte.
    for conn in &mut idle {
        get(conn);
    }
}

#[test]
fn an_idle_kept_alive_tls_connection_holds_no_read_buffer() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("weir-alloc-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new(&dir);
    let files = ca.issue(&dir, "a", &["a.test"], KeyKind::EcdsaP256);
    let tls = format!(
        "tls = {{ certificate = \"{}\", key = \"{}\" }}\n",
        files.certificate.display(),
        files.key.display()
    );
    let (_origin, proxy) = one_worker_proxy(212, &tls);
    let connect = || TlsClient::connect(proxy.address, "a.test", ca.client_config()).unwrap();
    let get = |client: &mut TlsClient| {
        assert_eq!(client.get("a.test", "/items?id=7").unwrap().status, 200);
    };
    let mut warm = connect();
    for _ in 0..WARM_UP {
        get(&mut warm);
    }
    let before = settled();
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut client = connect();
        get(&mut client);
        idle.push(client);
    }
    let per_connection = (settled() - before) / IDLE_CONNECTIONS as i64;
    println!("an idle kept-alive TLS connection holds {per_connection} bytes on its worker");
    for client in &mut idle {
        get(client);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        per_connection <= MAX_IDLE_TLS_CONNECTION_BYTES,
        "an idle TLS connection holds {per_connection} bytes, at most {MAX_IDLE_TLS_CONNECTION_BYTES} expected"
    );
}
