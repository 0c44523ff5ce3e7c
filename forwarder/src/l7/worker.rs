//! What one worker thread keeps between its connections: the snapshot it routes with, its
//! balancer and idle server connections, and the resources it lends to one request at a time
//! — buffers, pipes for spliced bodies — with the guards that give them back. Single-threaded
//! (`Rc`, `RefCell`): nothing here is shared with another worker.

use std::{
    cell::RefCell,
    os::fd::RawFd,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;

use super::{
    access_log::{AccessLog, WorkerLog},
    balance::Balancer,
    http::{RequestHead, ResponseHead},
    io::{Conn, Pipe},
    snapshot::L7Snapshot,
    upstream::UpstreamPool,
};

/// A snapshot shared among one worker's requests: the `Rc` around the published `Arc` is
/// the point (see [`Worker::current_snapshot`]), its count is the worker's own.
#[allow(clippy::redundant_allocation)]
pub(super) type SharedSnapshot = Rc<Arc<L7Snapshot>>;

/// What one worker thread shares between its connections (single-threaded: `Rc`/`RefCell`).
pub struct Worker {
    pub index: usize,
    pub snapshot: Arc<ArcSwap<L7Snapshot>>,
    /// The last snapshot [`Worker::current_snapshot`] handed out.
    current: RefCell<SharedSnapshot>,
    pub balancer: RefCell<Balancer>,
    pub upstreams: UpstreamPool,
    /// Client connections open on this worker.
    pub connections: std::cell::Cell<usize>,
    /// Connections past the limit being answered 503 (`proxy::refuse_over_limit`).
    pub refusing: std::cell::Cell<usize>,
    /// Spare I/O buffers, so a request does not allocate its own.
    buffers: Spares<Vec<u8>>,
    /// Spare request and response heads, parsed into again with their allocations.
    request_heads: Spares<RequestHead>,
    response_heads: Spares<ResponseHead>,
    /// Client connections waiting for their next request read into the runtime's
    /// provided-buffer ring ([`Conn::read_idle`]); false where the kernel has none (before
    /// Linux 5.19).
    pub ring_reads: bool,
    /// Spare (empty) pipes for spliced bodies.
    pub pipes: RefCell<Vec<Pipe>>,
    /// Pipes lent to bodies being spliced.
    pub pipes_lent: std::cell::Cell<usize>,
    /// Set when the workers stop: connections take no new request.
    pub stopping: Arc<AtomicBool>,
    /// Client connections waiting for a request to begin (see [`IdleClient`]). Hashed with
    /// foldhash, not SipHash: an entry comes and goes with every request, and descriptors
    /// are numbers the kernel hands out, which no client chooses.
    pub idle_clients: RefCell<foldhash::HashSet<RawFd>>,
    /// Refusals logged in the current second, and those left unlogged since the last line.
    refusal_log: std::cell::Cell<RefusalLog>,
    /// The access log file (shared by the workers) and this worker's buffered lines.
    pub access_log: Arc<AccessLog>,
    pub log: WorkerLog,
}

#[derive(Clone, Copy, Default)]
struct RefusalLog {
    second: u64,
    logged: u32,
    unlogged: u64,
}

impl RefusalLog {
    /// Whether one more line may be written in `second`; if so, how many were not before it.
    fn admit(&mut self, second: u64) -> Option<u64> {
        if self.second != second {
            self.second = second;
            self.logged = 0;
        }
        if self.logged < REFUSALS_LOGGED_PER_SEC {
            self.logged += 1;
            Some(std::mem::take(&mut self.unlogged))
        } else {
            self.unlogged += 1;
            None
        }
    }
}

/// Refusal log lines a worker writes per second at most: a client sending garbage must not
/// turn the daemon's log into its amplifier. The counters count every refusal.
const REFUSALS_LOGGED_PER_SEC: u32 = 10;

/// Buffers (and heads of each kind) a worker keeps for reuse, and the largest buffer it
/// keeps.
const SPARES: usize = 256;
const MAX_SPARE_CAPACITY: usize = 256 * 1024;
/// The largest head (its fields' bytes) a worker keeps for reuse: most are well under it.
const MAX_SPARE_HEAD: usize = 16 * 1024;
/// Pipes a worker keeps for reuse (two descriptors each).
const SPARE_PIPES: usize = 64;

/// Things a worker lends to one request at a time and takes back, so that the next request
/// reuses their allocations: at most [`SPARES`] of them. Buffers come back cleared; a head
/// is overwritten by the next parse into it.
struct Spares<T>(RefCell<Vec<T>>);

impl<T> Default for Spares<T> {
    fn default() -> Self {
        Spares(RefCell::new(Vec::new()))
    }
}

impl<T: Default> Spares<T> {
    /// A spare, or a new (empty) one.
    fn take(&self) -> T {
        self.0.borrow_mut().pop().unwrap_or_default()
    }

    /// Keeps `value` for reuse if there is room.
    fn give(&self, value: T) {
        let mut spares = self.0.borrow_mut();
        if spares.len() < SPARES {
            spares.push(value);
        }
    }
}

impl Worker {
    /// Worker `index`'s state, routing with `snapshot`, stopping when `stopping` is set.
    pub fn new(
        index: usize,
        snapshot: Arc<ArcSwap<L7Snapshot>>,
        stopping: Arc<AtomicBool>,
    ) -> Worker {
        Worker {
            index,
            current: RefCell::new(Rc::new(snapshot.load_full())),
            snapshot,
            balancer: Default::default(),
            upstreams: Default::default(),
            connections: Default::default(),
            refusing: Default::default(),
            buffers: Default::default(),
            request_heads: Default::default(),
            response_heads: Default::default(),
            ring_reads: false,
            pipes: Default::default(),
            pipes_lent: Default::default(),
            stopping,
            idle_clients: Default::default(),
            refusal_log: Default::default(),
            access_log: Default::default(),
            log: Default::default(),
        }
    }

    /// The snapshot as of now, for a request to hold while it is served. Shared through an
    /// `Rc` among this worker's requests: cloning the published `Arc` instead would write its
    /// count, which every worker shares, twice per request, and pull that cache line from CPU
    /// to CPU. The `Arc` is taken once per snapshot the control plane publishes.
    pub(super) fn current_snapshot(&self) -> SharedSnapshot {
        let published = self.snapshot.load();
        let mut current = self.current.borrow_mut();
        if !Arc::ptr_eq(&current, &published) {
            *current = Rc::new(arc_swap::Guard::into_inner(published));
        }
        Rc::clone(&current)
    }

    /// The worker, logging requests to `access_log`.
    pub fn with_access_log(self, access_log: Arc<AccessLog>) -> Worker {
        Worker { access_log, ..self }
    }

    /// The worker, its idle client connections reading into its runtime's ring.
    pub fn with_read_ring(self) -> Worker {
        Worker {
            ring_reads: true,
            ..self
        }
    }

    /// Whether a refusal may be logged now (at most [`REFUSALS_LOGGED_PER_SEC`] per second);
    /// if so, how many went unlogged before it, for the line to say.
    pub(super) fn may_log_refusal(&self) -> Option<u64> {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut log = self.refusal_log.get();
        let answer = log.admit(second);
        self.refusal_log.set(log);
        answer
    }

    /// An empty buffer, reused when one is spare.
    pub(super) fn buffer(&self) -> Vec<u8> {
        self.buffers.take()
    }

    /// Gives a buffer back for reuse.
    pub(super) fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() <= MAX_SPARE_CAPACITY && buf.capacity() > 0 {
            buf.clear();
            self.buffers.give(buf);
        }
    }

    /// A request head to parse into (a spare one keeps its allocations).
    pub(super) fn request_head(&self) -> RequestHead {
        self.request_heads.take()
    }

    /// Gives a request head back for reuse.
    pub(super) fn recycle_request_head(&self, head: RequestHead) {
        if head.headers.capacity() <= MAX_SPARE_HEAD {
            self.request_heads.give(head);
        }
    }

    /// A response head to parse into (a spare one keeps its allocations).
    pub(super) fn response_head(&self) -> ResponseHead {
        self.response_heads.take()
    }

    /// Gives a response head back for reuse.
    pub(super) fn recycle_response_head(&self, head: ResponseHead) {
        if head.headers.capacity() <= MAX_SPARE_HEAD {
            self.response_heads.give(head);
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Shuts the receiving side of every client connection that is waiting for a request to
    /// begin: its read ends with end of file and the connection closes. For a stopping
    /// worker, on its own thread (so each descriptor is still the connection's).
    pub fn close_idle_clients(&self) {
        for &fd in self.idle_clients.borrow().iter() {
            // SAFETY: the fd belongs to a connection that is open: it leaves the set (its
            // `IdleClient` drops) before its socket can close.
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        }
    }

    /// An empty pipe for one body, reused when one is spare; `None` when the worker already
    /// lends a quarter of its connection limit (each pipe holds up to 64 KiB of a body in
    /// flight, HAProxy's `maxpipes` default bound) or none can be made (descriptors
    /// exhausted): the body is then copied.
    pub(super) fn lend_pipe(&self, max_connections: usize) -> Option<LentPipe<'_>> {
        if self.pipes_lent.get() >= (max_connections / 4).max(1) {
            return None;
        }
        let pipe = match self.pipes.borrow_mut().pop() {
            Some(pipe) => pipe,
            None => Pipe::new()
                .inspect_err(|err| tracing::debug!(%err, "no pipe for splicing; copying instead"))
                .ok()?,
        };
        self.pipes_lent.set(self.pipes_lent.get() + 1);
        Some(LentPipe {
            worker: self,
            pipe: Some(pipe),
            emptied: false,
        })
    }
}

/// Marks a client connection idle (waiting for a request to begin) for as long as it lives,
/// so a stopping worker can close it.
pub(super) struct IdleClient<'a> {
    worker: &'a Worker,
    fd: RawFd,
}

impl<'a> IdleClient<'a> {
    pub(super) fn new(worker: &'a Worker, client: &Conn) -> Self {
        let fd = client.raw_fd();
        worker.idle_clients.borrow_mut().insert(fd);
        IdleClient { worker, fd }
    }
}

impl Drop for IdleClient<'_> {
    fn drop(&mut self) {
        self.worker.idle_clients.borrow_mut().remove(&self.fd);
    }
}

/// A pipe lent to one body relay. It goes back to the worker's spares if the relay marked
/// it emptied; one that may hold bytes (a failed relay) is closed.
pub(super) struct LentPipe<'a> {
    worker: &'a Worker,
    pipe: Option<Pipe>,
    pub(super) emptied: bool,
}

impl std::ops::Deref for LentPipe<'_> {
    type Target = Pipe;

    fn deref(&self) -> &Pipe {
        self.pipe
            .as_ref()
            .expect("a lent pipe is there until dropped")
    }
}

impl Drop for LentPipe<'_> {
    fn drop(&mut self) {
        let worker = self.worker;
        worker.pipes_lent.set(worker.pipes_lent.get() - 1);
        let mut spare = worker.pipes.borrow_mut();
        if self.emptied && spare.len() < SPARE_PIPES {
            spare.extend(self.pipe.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_config::L7Config;

    use super::*;

    fn worker() -> Worker {
        let snapshot = L7Snapshot {
            generation: 0,
            settings: L7Config::default(),
            listeners: Vec::new(),
            vhosts: Vec::new(),
            reusable: Default::default(),
            tls: Default::default(),
        };
        Worker::new(
            0,
            Arc::new(ArcSwap::from_pointee(snapshot)),
            Default::default(),
        )
    }

    #[test]
    fn pipes_are_lent_within_a_quarter_of_the_connection_limit_and_reused_only_when_emptied() {
        let worker = worker();
        let max_connections = 8;
        let failed = worker.lend_pipe(max_connections).unwrap();
        let in_use = worker.lend_pipe(max_connections).unwrap();
        assert!(worker.lend_pipe(max_connections).is_none(), "two at most");
        // A relay that failed may have left bytes in its pipe: closed, not kept.
        drop(failed);
        assert_eq!(worker.pipes.borrow().len(), 0);
        // Its loan is over all the same.
        let mut emptied = worker
            .lend_pipe(max_connections)
            .expect("the failed loan ended");
        emptied.emptied = true;
        drop(emptied);
        assert_eq!(worker.pipes.borrow().len(), 1, "an emptied pipe is kept");
        drop(in_use);
        assert_eq!(worker.pipes_lent.get(), 0);
        // The kept one is lent again rather than a new one made.
        let again = worker.lend_pipe(max_connections).unwrap();
        assert_eq!(worker.pipes.borrow().len(), 0);
        drop(again);
    }

    #[test]
    fn refusals_are_logged_ten_a_second_and_the_next_line_says_how_many_were_not() {
        let mut log = RefusalLog::default();
        let first: Vec<_> = (0..15).map(|_| log.admit(100)).collect();
        assert_eq!(&first[..10], &[Some(0); 10]);
        assert_eq!(&first[10..], &[None; 5]);
        assert_eq!(
            log.admit(101),
            Some(5),
            "the next second's first line counts them"
        );
        assert_eq!(log.admit(101), Some(0));
    }
}
