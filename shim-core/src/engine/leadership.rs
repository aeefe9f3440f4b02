//! Several engines on one store: one leads (runs pipelines), the others follow.
//!
//! Core knows no Lease: the embedder hands [`EngineBuilder::leadership`](super::EngineBuilder::leadership)
//! a `watch` channel that says whether this engine may reconcile now. Every engine answers reads
//! from memory and accepts deploy, update and delete into the store; the store tells each engine
//! what the others wrote, through [`Engine::mirror`]:
//!
//! * a follower takes every newer record as it is (the leader's progress, another replica's
//!   requests), so its reads and its event stream follow the leader's;
//! * the leader takes only new desired state (a higher generation, or another spec at the same
//!   generation) and reconciles it; the rest is the echo of its own writes.
//!
//! On taking the lead an engine reloads the store (what the old leader wrote last) and queues
//! every service; on losing it, it cancels its pipeline runs at once, since another engine may
//! already be running them.

use std::sync::Arc;

use chrono::Utc;

use super::Engine;
use crate::event::{Event, EventKind};
use crate::phase::Phase;
use crate::record::ServiceRecord;

impl Engine {
    /// Whether this engine may run pipelines now (always, without a leader election).
    pub fn is_leader(&self) -> bool {
        self.inner.leading.as_ref().is_none_or(|rx| *rx.borrow())
    }

    /// Follows the leader election: reload and queue everything on taking the lead, cancel the
    /// runs in flight on losing it.
    pub(super) fn follow_leadership(&self) {
        let Some(mut leading) = self.inner.leading.clone() else {
            return;
        };
        let engine = self.clone();
        let task = tokio::spawn(async move {
            let mut was = *leading.borrow_and_update();
            loop {
                tokio::select! {
                    _ = engine.inner.shutdown.cancelled() => return,
                    changed = leading.changed() => if changed.is_err() { return },
                }
                let now = *leading.borrow_and_update();
                if now == was {
                    continue;
                }
                was = now;
                if now {
                    tracing::info!("leading: reconciling every service");
                    engine.take_lead().await;
                } else {
                    tracing::warn!(
                        "no longer leading: pipeline runs stopped, another replica takes over"
                    );
                    engine.step_down();
                }
            }
        });
        self.inner.tasks.lock().expect("tasks lock").push(task);
    }

    async fn take_lead(&self) {
        match self.inner.store.load_live().await {
            Ok(stored) => {
                for record in stored {
                    self.mirror(record);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot reload the store on taking the lead; using what this replica saw");
            }
        }
        self.report_orphans().await;
        self.enqueue_all();
    }

    fn step_down(&self) {
        let runs: Vec<_> = self
            .inner
            .in_flight
            .lock()
            .expect("in-flight lock")
            .drain()
            .collect();
        for (_, token) in runs {
            token.cancel();
        }
    }

    /// Takes a record another engine on the same store wrote (the store's watch saw it). Returns
    /// whether it changed what this engine holds. See the module docs for who takes what.
    pub fn mirror(&self, theirs: impl Into<Arc<ServiceRecord>>) -> bool {
        let theirs: Arc<ServiceRecord> = theirs.into();
        let leader = self.is_leader();
        let mut services = self.inner.services.write().expect("services lock");
        let mine = services.get(&theirs.id);
        let take = match mine {
            None => theirs.is_live(),
            Some(mine) if theirs.generation != mine.generation => {
                theirs.generation > mine.generation
            }
            Some(mine) if leader => theirs.spec != mine.spec || theirs.desired != mine.desired,
            Some(mine) => theirs != *mine,
        };
        if !take {
            return false;
        }
        let before = mine.map(|m| (m.phase, m.generation));
        let new_desired = mine.is_none_or(|m| {
            theirs.generation != m.generation
                || theirs.spec != m.spec
                || theirs.desired != m.desired
        });
        if leader
            && new_desired
            && let Some(token) = self
                .inner
                .in_flight
                .lock()
                .expect("in-flight lock")
                .remove(&theirs.id)
        {
            token.cancel();
        }
        let id = theirs.id.clone();
        let changed_phase = before != Some((theirs.phase, theirs.generation));
        if changed_phase {
            // On the bus only: the history and the runtime's own record of it (Kubernetes
            // Events) were written by the engine that made the change.
            let event = Event {
                time: Utc::now(),
                service_id: id.clone(),
                generation: theirs.generation,
                kind: EventKind::Transition {
                    from: before.map(|(phase, _)| phase),
                    to: theirs.phase,
                    trigger: None,
                    reason: theirs.reason.clone(),
                    message: theirs.message.clone(),
                },
            };
            super::log_event(&id, theirs.generation, &event.kind);
            self.inner.bus.publish(event);
        }
        if theirs.phase == Phase::Deleted {
            services.remove(&id);
        } else {
            services.insert(id.clone(), theirs);
        }
        drop(services);
        if leader && new_desired {
            self.inner.queue.add(&id);
        }
        true
    }
}
