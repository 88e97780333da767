//! A bound on the agent calls in flight that serves calls which end or read
//! captures before calls which start them. A capture of a CIDR asks every
//! agent of the cluster at once; the bound keeps thousands of calls from
//! being open together, and the order keeps a deletion (its stops) from
//! waiting behind the starts of another capture.

use std::pin::pin;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// What a call does, for the order in which waiting calls get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Starting a capture: waits while any other call waits.
    Start,
    /// Stopping, listing, reading, opening a watch: first.
    Urgent,
}

pub struct CallSlots {
    state: Mutex<State>,
    freed: Notify,
}

struct State {
    free: usize,
    urgent_waiting: usize,
}

/// A slot, given back when dropped.
pub struct Slot<'a>(&'a CallSlots);

impl CallSlots {
    /// At most `limit` calls at once (at least one).
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                free: limit.max(1),
                urgent_waiting: 0,
            }),
            freed: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot: an urgent call as soon as one is free, a start
    /// once one is free and no urgent call waits.
    pub async fn acquire(&self, priority: Priority) -> Slot<'_> {
        let mut waiting = Waiting {
            slots: self,
            urgent: false,
        };
        loop {
            // Registered before the check, so that a slot freed in between
            // still wakes this call.
            let mut freed = pin!(self.freed.notified());
            freed.as_mut().enable();
            {
                let mut state = self.state();
                let first = priority == Priority::Urgent || state.urgent_waiting == 0;
                if state.free > 0 && first {
                    state.free -= 1;
                    if waiting.urgent {
                        state.urgent_waiting -= 1;
                        waiting.urgent = false;
                    }
                    return Slot(self);
                }
                if priority == Priority::Urgent && !waiting.urgent {
                    state.urgent_waiting += 1;
                    waiting.urgent = true;
                }
            }
            freed.await;
        }
    }
}

/// An urgent call counted as waiting; uncounted if the call is dropped
/// before it gets a slot, so that starts are not held up by a call that
/// no longer waits.
struct Waiting<'a> {
    slots: &'a CallSlots,
    urgent: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.urgent {
            self.slots.state().urgent_waiting -= 1;
            self.slots.freed.notify_waiters();
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.state().free += 1;
        self.0.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn no_more_calls_than_slots_run_at_once() {
        let slots = Arc::new(CallSlots::new(3));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let (slots, running, most) = (slots.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    let priority = if i % 3 == 0 {
                        Priority::Urgent
                    } else {
                        Priority::Start
                    };
                    let _slot = slots.acquire(priority).await;
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_waiting_stop_goes_before_waiting_starts() {
        let slots = Arc::new(CallSlots::new(1));
        let held = slots.acquire(Priority::Start).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiter = |name: &'static str, priority| {
            let (slots, order) = (slots.clone(), order.clone());
            tokio::spawn(async move {
                let _slot = slots.acquire(priority).await;
                order.lock().unwrap().push(name);
            })
        };
        let start = waiter("start", Priority::Start);
        // Each call is waiting before the next one comes.
        tokio::task::yield_now().await;
        let stop = waiter("stop", Priority::Urgent);
        tokio::task::yield_now().await;
        drop(held);
        start.await.unwrap();
        stop.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["stop", "start"]);
    }

    #[tokio::test]
    async fn a_stop_that_gives_up_waiting_holds_up_no_start() {
        let slots = Arc::new(CallSlots::new(1));
        let held = slots.acquire(Priority::Start).await;
        let abandoned = {
            let slots = slots.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire(Priority::Urgent).await;
            })
        };
        tokio::task::yield_now().await;
        abandoned.abort();
        let _ = abandoned.await;
        drop(held);
        // With the stop gone, a start gets the free slot at once.
        let _slot = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            slots.acquire(Priority::Start),
        )
        .await
        .expect("a start gets the free slot");
    }
}
