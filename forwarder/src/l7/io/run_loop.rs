//! The worker's run loop: compio's executor and io_uring driver turned by hand, so that woken
//! tasks run before the worker waits for completions (decision 0027), and the worker's own
//! deadlines ([`super::deadline`]) kept by the clock it reads once per turn (decision 0031).

use std::time::Duration;

use super::deadline;

/// Tick after tick of woken tasks the worker runs before it reaps completions anyway, so that
/// tasks that keep waking each other cannot hold back the I/O of the others.
const TICKS_BEFORE_REAPING: usize = 16;

/// Runs `future` on `runtime` until it completes, as `Runtime::block_on` does, except that the
/// tasks woken while tasks ran are run before the worker asks the kernel for completions.
///
/// compio's executor runs each woken task once per tick, and a task woken by the last one
/// run in a tick (the connection task the accept loop spawned, a handshake its read woke)
/// waits for the next. `block_on` then reaps completions with a zero timeout, which
/// compio-driver 0.12 makes a blocking `io_uring_enter` with a zero timespec: the kernel arms
/// a timer and puts the thread to sleep until it fires. That was half a sleep per TLS
/// connection and a tenth of its CPU (decision 0027). Here the driver is entered to wait only
/// when no task is left to run, and then no longer than the worker's next deadline.
pub fn run_to_completion<F: std::future::Future>(
    runtime: &compio::runtime::Runtime,
    future: F,
) -> F::Output {
    use std::task::{Context, Poll};
    runtime.enter(|| {
        let waker = runtime.waker();
        let mut context = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        deadline::expire();
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                runtime.run();
                return output;
            }
            let mut ticks = 1;
            let mut woken = runtime.run();
            while woken && ticks < TICKS_BEFORE_REAPING {
                woken = runtime.run();
                ticks += 1;
            }
            let wait = if woken {
                Some(Duration::ZERO)
            } else {
                match (runtime.current_timeout(), deadline::wait_limit()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            runtime.poll_with(wait);
            deadline::expire();
        }
    })
}
