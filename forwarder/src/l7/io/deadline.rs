//! Deadlines for a worker's reads, writes and sleeps, kept by the worker itself: what compio's
//! `time::timeout` does, at a fraction of its cost on the path every request takes.
//!
//! Every read and write of a connection runs under a timeout, four or more per proxied
//! request. compio's timeout reads the clock twice, inserts a timer into a B-tree and removes
//! it, and polls its two futures in random order, which draws a random number; its runtime
//! reads the clock twice more on every turn. Measured with perf, that was 5.5% of a worker's
//! CPU (decision 0031). Here:
//!
//! - the clock is read once per turn of the run loop ([`expire`], called after the worker has
//!   waited for completions), and a deadline is that reading plus its timeout. A turn takes
//!   microseconds to a few milliseconds, so a deadline may fall due that much early or late,
//!   against timeouts of a second or more;
//! - a deadline is a slot in a slab (a `Vec` and a free list): taken when its operation
//!   first waits, given back when the operation ends, either way with no ordering kept;
//! - expiry is a scan of the slab, run only once the clock has passed the earliest deadline
//!   it may hold. That bound is exact after a scan and lowered by each new deadline, never
//!   raised by a removal, so a scan can find nothing due (the earliest one ended meanwhile)
//!   and then sets the bound again. Deadlines are seconds long and most operations end long
//!   before theirs, so a scan runs about once per shortest timeout, over the operations in
//!   flight then.
//!
//! The table is the worker thread's own (a thread local): a worker's tasks and its run loop
//! share one thread, and nothing else touches it.

use std::{
    cell::RefCell,
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use slab::Slab;

/// A deadline's slot: when it falls due, and who to wake then.
struct Slot {
    due: Instant,
    /// The task waiting on the operation; `None` once the deadline has passed (it was woken).
    waker: Option<Waker>,
}

/// A worker's deadlines (see the module docs).
struct Deadlines {
    /// The clock as read at the last turn of the run loop.
    now: Instant,
    /// A run loop keeps `now` (it has called [`expire`]).
    kept_by_loop: bool,
    slots: Slab<Slot>,
    /// No live deadline falls due before this (`None`: there is none).
    earliest: Option<Instant>,
}

thread_local! {
    static DEADLINES: RefCell<Deadlines> = RefCell::new(Deadlines {
        now: Instant::now(),
        kept_by_loop: false,
        slots: Slab::new(),
        earliest: None,
    });
}

impl Deadlines {
    fn insert(&mut self, after: Duration, waker: &Waker) -> usize {
        let due = self
            .now
            .checked_add(after)
            .unwrap_or_else(|| far_future(self.now));
        self.earliest = Some(self.earliest.map_or(due, |earliest| earliest.min(due)));
        self.slots.insert(Slot {
            due,
            waker: Some(waker.clone()),
        })
    }

    /// Takes the wakers of the deadlines that have passed at `now` (the caller wakes them,
    /// once the table is no longer borrowed); sets `earliest` to the next deadline.
    fn expire(&mut self, now: Instant) -> Vec<Waker> {
        self.now = now;
        self.kept_by_loop = true;
        if self.earliest.is_none_or(|earliest| earliest > now) {
            return Vec::new();
        }
        let mut due = Vec::new();
        let mut earliest = None::<Instant>;
        for (_, slot) in self.slots.iter_mut() {
            if slot.waker.is_none() {
                continue;
            }
            if slot.due <= now {
                due.extend(slot.waker.take());
            } else {
                earliest = Some(earliest.map_or(slot.due, |e| e.min(slot.due)));
            }
        }
        self.earliest = earliest;
        due
    }
}

/// A time far enough ahead to stand for "never" where `now + after` would overflow.
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// Reads the clock and wakes the tasks whose deadlines it has passed. The run loop calls it
/// after each wait for completions, and once before its first turn.
pub(super) fn expire() {
    let now = Instant::now();
    for waker in DEADLINES.with_borrow_mut(|deadlines| deadlines.expire(now)) {
        waker.wake();
    }
}

/// The clock as the run loop read it at the start of this turn, for times that may be a turn
/// old (a header deadline, the age of an idle connection): one clock read fewer each. On a
/// thread that runs no worker loop, the clock as read now.
pub(crate) fn turn_clock() -> Instant {
    DEADLINES
        .with_borrow(|deadlines| deadlines.kept_by_loop.then_some(deadlines.now))
        .unwrap_or_else(Instant::now)
}

/// How long the run loop may wait for completions before a deadline falls due (`None`:
/// there is none), counted from the turn's clock reading: the tasks run since then make a
/// deadline that much late, as the reading makes it early.
pub(super) fn wait_limit() -> Option<Duration> {
    DEADLINES.with_borrow(|deadlines| {
        let earliest = deadlines.earliest?;
        Some(earliest.saturating_duration_since(deadlines.now))
    })
}

/// Deadlines still held, for tests: every operation gives its slot back when it ends.
#[cfg(test)]
fn held() -> usize {
    DEADLINES.with_borrow(|deadlines| deadlines.slots.len())
}

/// An operation that is abandoned (dropped, which cancels it) once `after` has passed.
#[must_use = "a future does nothing unless awaited"]
pub(crate) struct Timeout<F> {
    operation: F,
    after: Duration,
    /// The deadline's slot, taken when the operation first waits.
    slot: Option<usize>,
}

/// `operation`, given up after `after`: `Err(Elapsed)` then.
pub(crate) fn timeout<F: Future>(after: Duration, operation: F) -> Timeout<F> {
    Timeout {
        operation,
        after,
        slot: None,
    }
}

/// A sleep of `after` on the worker's deadlines.
pub(crate) async fn sleep(after: Duration) {
    let _ = timeout(after, std::future::pending::<()>()).await;
}

/// The operation's deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `operation` is structurally pinned: it is never moved out of `self` (only
        // dropped in place with it); the other fields are plain data, not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let operation = unsafe { Pin::new_unchecked(&mut this.operation) };
        // The operation first: one that finished as its deadline passed counts as finished.
        if let Poll::Ready(output) = operation.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        DEADLINES.with_borrow_mut(|deadlines| match this.slot {
            None => {
                this.slot = Some(deadlines.insert(this.after, cx.waker()));
                Poll::Pending
            }
            Some(key) => match &mut deadlines.slots[key].waker {
                None => Poll::Ready(Err(Elapsed)),
                Some(waker) => {
                    if !waker.will_wake(cx.waker()) {
                        waker.clone_from(cx.waker());
                    }
                    Poll::Pending
                }
            },
        })
    }
}

impl<F> Drop for Timeout<F> {
    fn drop(&mut self) {
        if let Some(key) = self.slot {
            // `try_with`: a worker thread that is ending may have dropped its table first.
            let _ = DEADLINES.try_with(|deadlines| deadlines.borrow_mut().slots.remove(key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::io::tests::on_a_worker;

    #[test]
    fn the_turn_clock_holds_within_a_turn_and_moves_with_the_next() {
        on_a_worker(async {
            let first = turn_clock();
            // Busy, not waiting: still the same turn.
            std::thread::sleep(ms(20));
            assert_eq!(turn_clock(), first);
            // Waiting lets the loop turn, and read the clock again.
            sleep(ms(30)).await;
            let moved = turn_clock() - first;
            assert!(moved >= ms(30), "moved {moved:?}");
        });
    }

    #[test]
    fn off_a_worker_the_turn_clock_is_the_clock() {
        std::thread::spawn(|| {
            let before = Instant::now();
            std::thread::sleep(ms(20));
            let read = turn_clock();
            assert!(read >= before + ms(20), "read {:?} after", read - before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_operation_that_ends_in_time_keeps_its_result_and_gives_its_slot_back() {
        on_a_worker(async {
            let quick = timeout(Duration::from_secs(5), compio::time::sleep(ms(10)));
            assert_eq!(quick.await, Ok(()));
            assert_eq!(held(), 0);
        });
    }

    #[test]
    fn an_operation_past_its_deadline_is_given_up_and_dropped() {
        on_a_worker(async {
            let started = Instant::now();
            let slow = timeout(ms(50), std::future::pending::<()>());
            assert_eq!(slow.await, Err(Elapsed));
            let took = started.elapsed();
            assert!(took >= ms(45), "gave up after {took:?}");
            assert!(took < Duration::from_secs(5), "gave up after {took:?}");
            assert_eq!(held(), 0);
        });
    }

    #[test]
    fn deadlines_fall_due_in_their_own_order_whatever_the_order_they_were_set_in() {
        on_a_worker(async {
            let order = std::rc::Rc::new(RefCell::new(Vec::new()));
            let tasks: Vec<_> = [300, 100, 200]
                .into_iter()
                .map(|after| {
                    let order = order.clone();
                    compio::runtime::spawn(async move {
                        sleep(ms(after)).await;
                        order.borrow_mut().push(after);
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            assert_eq!(*order.borrow(), [100, 200, 300]);
            assert_eq!(held(), 0);
        });
    }

    #[test]
    fn a_dropped_operation_gives_its_slot_back_and_wakes_no_one_later() {
        on_a_worker(async {
            {
                let mut abandoned = std::pin::pin!(timeout(ms(30), std::future::pending::<()>()));
                let waker = std::task::Waker::noop();
                let mut cx = Context::from_waker(waker);
                assert!(abandoned.as_mut().poll(&mut cx).is_pending());
                assert_eq!(held(), 1);
            }
            assert_eq!(held(), 0);
            // The expiry that would have been its deadline's finds nothing to wake.
            sleep(ms(60)).await;
            assert_eq!(held(), 0);
        });
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
}
