//! Typed events on a broadcast bus. Publishing never waits: a slow subscriber loses the oldest
//! events and is told how many it missed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::phase::{Phase, Trigger};

/// Something that happened to one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// When.
    pub time: DateTime<Utc>,
    /// Which service.
    pub service_id: String,
    /// Spec generation it concerns.
    pub generation: u64,
    /// What.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The kinds of event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
#[non_exhaustive]
pub enum EventKind {
    /// A deploy, update or delete request was accepted.
    Accepted {
        /// "deploy", "update" or "delete".
        action: String,
    },
    /// The phase changed.
    Transition {
        /// Phase before (`None` for a new service).
        from: Option<Phase>,
        /// Phase after.
        to: Phase,
        /// What caused it.
        trigger: Option<Trigger>,
        /// Typed reason, if any.
        reason: Option<String>,
        /// Detail.
        message: Option<String>,
    },
    /// A pipeline step started an attempt.
    StepStarted {
        /// Step name.
        step: String,
        /// 1-based attempt.
        attempt: u32,
    },
    /// A step reported progress (e.g. "2/3 replicas ready after 40 s").
    StepProgress {
        /// Step name.
        step: String,
        /// What it said.
        message: String,
    },
    /// A step failed and will be retried.
    StepRetrying {
        /// Step name.
        step: String,
        /// Attempt that failed.
        attempt: u32,
        /// Why.
        error: String,
        /// Delay before the next attempt.
        delay_ms: u64,
    },
    /// A step finished.
    StepSucceeded {
        /// Step name.
        step: String,
        /// How long it took.
        duration_ms: u64,
        /// Whether its goal already held and it was skipped.
        skipped: bool,
    },
    /// A step failed for good.
    StepFailed {
        /// Step name.
        step: String,
        /// Why.
        error: String,
    },
    /// The runtime reported a change (replicas ready, exit, drift).
    Observed {
        /// Replicas ready.
        ready: u32,
        /// Replicas wanted.
        desired: u32,
        /// What was seen.
        message: String,
    },
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// The next event.
    Event(Event),
    /// The subscriber fell behind and `n` events were dropped for it.
    Lagged(u64),
}

/// The broadcast bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
}

impl EventBus {
    /// A bus that buffers `capacity` events per subscriber before it starts dropping for it.
    pub fn new(capacity: usize) -> Self {
        Self {
            sender: broadcast::channel(capacity).0,
        }
    }

    /// Sends to every subscriber; never blocks, and is a no-op without subscribers.
    pub fn publish(&self, event: Event) {
        let _ = self.sender.send(event);
    }

    /// A new subscription, starting with the next event.
    pub fn subscribe(&self) -> EventStream {
        EventStream {
            receiver: self.sender.subscribe(),
        }
    }
}

/// A subscription.
#[derive(Debug)]
pub struct EventStream {
    receiver: broadcast::Receiver<Event>,
}

impl EventStream {
    /// The next event, or how many were lost; `Err` once the engine is gone.
    pub async fn next(&mut self) -> Result<Received, Closed> {
        match self.receiver.recv().await {
            Ok(event) => Ok(Received::Event(event)),
            Err(broadcast::error::RecvError::Lagged(n)) => Ok(Received::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => Err(Closed),
        }
    }

    /// The next event, skipping over lag notices.
    pub async fn recv(&mut self) -> Result<Event, Closed> {
        loop {
            if let Received::Event(event) = self.next().await? {
                return Ok(event);
            }
        }
    }
}

/// The bus is gone (the engine shut down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("event bus closed")]
pub struct Closed;

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> Event {
        Event {
            time: Utc::now(),
            service_id: "s".into(),
            generation: n,
            kind: EventKind::Accepted {
                action: "deploy".into(),
            },
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_told_it_lagged_and_never_blocks_the_publisher() {
        let bus = EventBus::new(4);
        let mut slow = bus.subscribe();
        for n in 0..10 {
            bus.publish(event(n)); // would block or fail if the bus waited for readers
        }
        assert_eq!(slow.next().await.unwrap(), Received::Lagged(6));
        assert_eq!(slow.recv().await.unwrap().generation, 6);
    }

    #[test]
    fn events_serialise_with_a_type_tag() {
        let json = serde_json::to_value(event(1)).unwrap();
        assert_eq!(json["type"], "accepted");
        assert_eq!(json["serviceId"], "s");
    }
}
