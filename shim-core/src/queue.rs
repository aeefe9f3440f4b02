//! The reconciler's keyed work queue: an id is queued at most once, handed to at most one worker
//! at a time, and re-queued after its worker finishes if it changed meanwhile.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// A deduplicating FIFO of service ids.
#[derive(Debug, Default)]
pub struct WorkQueue {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    active: HashSet<String>,
    dirty: HashSet<String>,
    closed: bool,
}

impl WorkQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `id` unless it is already queued; if a worker holds it, it is queued again when
    /// that worker is done.
    pub fn add(&self, id: &str) {
        let mut state = self.state.lock().expect("queue lock");
        if state.closed {
            return;
        }
        if state.active.contains(id) {
            state.dirty.insert(id.to_string());
        } else if state.queued.insert(id.to_string()) {
            state.ready.push_back(id.to_string());
            drop(state);
            self.notify.notify_one();
        }
    }

    /// Queues `id` after `delay` (backoff, polling a slow removal).
    pub fn add_after(self: &std::sync::Arc<Self>, id: &str, delay: Duration) {
        let queue = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.add(&id);
        });
    }

    /// Waits for the next id and marks it held; `None` once the queue is closed.
    pub async fn next(&self) -> Option<String> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register interest before looking, so an add between the look and the wait wakes us.
            notified.as_mut().enable();
            {
                let mut state = self.state.lock().expect("queue lock");
                if state.closed {
                    return None;
                }
                if let Some(id) = state.ready.pop_front() {
                    state.queued.remove(&id);
                    state.active.insert(id.clone());
                    let more = !state.ready.is_empty();
                    drop(state);
                    if more {
                        // Pass the baton so idle workers pick up the rest.
                        self.notify.notify_one();
                    }
                    return Some(id);
                }
            }
            notified.await;
        }
    }

    /// The worker holding `id` is done with it.
    pub fn done(&self, id: &str) {
        let requeue = {
            let mut state = self.state.lock().expect("queue lock");
            state.active.remove(id);
            state.dirty.remove(id)
        };
        if requeue {
            self.add(id);
        }
    }

    /// Ids waiting (not counting held ones).
    pub fn len(&self) -> usize {
        self.state.lock().expect("queue lock").ready.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops handing out work; waiting workers get `None`.
    pub fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn ids_are_deduplicated_while_queued() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.next().await.as_deref(), Some("a"));
        assert_eq!(q.next().await.as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn an_id_held_by_a_worker_is_not_handed_out_twice_but_requeued_after() {
        let q = WorkQueue::new();
        q.add("a");
        let held = q.next().await.unwrap();
        q.add("a"); // changed while the worker runs
        assert!(q.is_empty(), "must not be handed to a second worker");
        q.done(&held);
        assert_eq!(q.next().await.as_deref(), Some("a"));
        q.done("a");
        assert!(q.is_empty(), "no change meanwhile, no requeue");
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_adds_arrive_after_the_delay() {
        let q = Arc::new(WorkQueue::new());
        q.add_after("a", Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(q.is_empty());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(q.len(), 1);
    }

    #[tokio::test]
    async fn closing_releases_waiting_workers() {
        let q = Arc::new(WorkQueue::new());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
