//! The newest events of each service, kept in memory by the stores that do not keep them on disk.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::event::Event;

/// Room added to a service's list when it is full. Lists grow a few events at a time instead of
/// doubling: a service deployed once has about 20 events, and a doubling list would hold room
/// for 32 (1.3 KiB wasted per service, 1.3 MB at 1,000 services).
const GROW_BY: usize = 4;

/// Up to `bound` events per service, oldest first.
#[derive(Debug)]
pub struct EventHistory {
    bound: usize,
    lists: Mutex<HashMap<String, Vec<Event>>>,
}

impl EventHistory {
    /// A history keeping the newest `bound` events of each service.
    pub fn new(bound: usize) -> Self {
        Self {
            bound,
            lists: Mutex::default(),
        }
    }

    /// Appends `event` to its service's list, dropping the oldest beyond the bound.
    pub fn push(&self, event: &Event) {
        if self.bound == 0 {
            return;
        }
        // A panic elsewhere cannot leave a list half-written: pushes and drains complete.
        let mut lists = self.lists.lock().unwrap_or_else(PoisonError::into_inner);
        let list = match lists.get_mut(&event.service_id) {
            Some(list) => list,
            None => lists.entry(event.service_id.clone()).or_default(),
        };
        if list.len() == list.capacity() {
            list.reserve_exact(GROW_BY.min(self.bound + 1 - list.len()).max(1));
        }
        list.push(event.clone());
        if list.len() > self.bound {
            let excess = list.len() - self.bound;
            list.drain(..excess);
        }
    }

    /// The newest `limit` events of service `id`, oldest first.
    pub fn newest(&self, id: &str, limit: usize) -> Vec<Event> {
        let lists = self.lists.lock().unwrap_or_else(PoisonError::into_inner);
        let list = lists.get(id).map(Vec::as_slice).unwrap_or_default();
        list[list.len().saturating_sub(limit)..].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::event::EventKind;

    fn event(id: &str, step: usize) -> Event {
        Event {
            time: Utc::now(),
            service_id: id.to_string(),
            generation: 1,
            kind: EventKind::StepStarted {
                step: format!("step-{step}"),
                attempt: 1,
            },
        }
    }

    fn steps(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match &e.kind {
                EventKind::StepStarted { step, .. } => step.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn keeps_the_newest_events_per_service_in_order() {
        let history = EventHistory::new(3);
        for i in 0..5 {
            history.push(&event("aaaa0001", i));
        }
        history.push(&event("bbbb0002", 9));
        assert_eq!(
            steps(&history.newest("aaaa0001", 10)),
            ["step-2", "step-3", "step-4"]
        );
        assert_eq!(steps(&history.newest("aaaa0001", 2)), ["step-3", "step-4"]);
        assert_eq!(steps(&history.newest("bbbb0002", 10)), ["step-9"]);
        assert!(history.newest("cccc0003", 10).is_empty());
    }

    #[test]
    fn lists_grow_a_few_events_at_a_time_and_never_past_the_bound() {
        let history = EventHistory::new(6);
        for i in 0..21 {
            history.push(&event("aaaa0001", i));
            let lists = history.lists.lock().unwrap();
            let list = &lists["aaaa0001"];
            assert!(
                list.capacity() - list.len() < GROW_BY && list.capacity() <= 7,
                "{} events in room for {}",
                list.len(),
                list.capacity()
            );
        }
        assert_eq!(history.newest("aaaa0001", 100).len(), 6);
    }

    #[test]
    fn a_zero_bound_keeps_nothing() {
        let history = EventHistory::new(0);
        history.push(&event("aaaa0001", 1));
        assert!(history.newest("aaaa0001", 10).is_empty());
    }
}
