//! Test doubles for embedders and core's own tests. They stand in for a runtime only where no
//! real one is wanted (unit tests, benchmarks of the engine itself), and say so.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::shimlet::{
    Failure, ManagedWorkload, Notifier, Removal, Shimlet, ShimletError, WorkloadObservation,
    WorkloadState,
};
use crate::workload::{FailureReason, WorkloadSpec};

/// An in-memory runtime whose workloads are ready the moment they are applied. It runs nothing;
/// tests use [`InstantShimlet::crash`] and [`InstantShimlet::vanish`] to simulate drift.
#[derive(Default)]
pub struct InstantShimlet {
    workloads: Mutex<HashMap<String, WorkloadObservation>>,
    notifier: Mutex<Option<Notifier>>,
    applies: Mutex<HashMap<String, u32>>,
    unavailable: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for InstantShimlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InstantShimlet")
    }
}

impl InstantShimlet {
    /// A shimlet that tells `notifier` when tests change a workload.
    pub fn with_notifier(notifier: Notifier) -> Self {
        let shimlet = Self::default();
        *shimlet.notifier.lock().expect("lock") = Some(notifier);
        shimlet
    }

    /// Sends later change notifications to `notifier` (an engine built again over this same
    /// runtime, as after a restart).
    pub fn set_notifier(&self, notifier: Notifier) {
        *self.notifier.lock().expect("lock") = Some(notifier);
    }

    /// Marks a workload as exited with `message`.
    pub fn crash(&self, service_id: &str, message: &str) {
        if let Some(w) = self.workloads.lock().expect("lock").get_mut(service_id) {
            w.state = WorkloadState::Failed;
            w.ready_replicas = 0;
            w.failure = Some(Failure {
                reason: FailureReason::Exited,
                message: message.into(),
            });
        }
        self.notify(service_id);
    }

    /// Removes a workload behind the engine's back.
    pub fn vanish(&self, service_id: &str) {
        self.workloads.lock().expect("lock").remove(service_id);
        self.notify(service_id);
    }

    /// Simulates an outage of the runtime (API server down, daemon restarting): while `down`,
    /// every call fails with [`ShimletError::unavailable`] and changes nothing.
    pub fn set_unavailable(&self, down: bool) {
        self.unavailable
            .store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn reachable(&self) -> Result<(), ShimletError> {
        if self.unavailable.load(std::sync::atomic::Ordering::SeqCst) {
            Err(ShimletError::unavailable(
                "connection refused (simulated runtime outage)",
            ))
        } else {
            Ok(())
        }
    }

    /// How often `apply` ran for a service.
    pub fn applies(&self, service_id: &str) -> u32 {
        self.applies
            .lock()
            .expect("lock")
            .get(service_id)
            .copied()
            .unwrap_or(0)
    }

    fn notify(&self, service_id: &str) {
        if let Some(n) = &*self.notifier.lock().expect("lock") {
            n.changed(service_id);
        }
    }
}

#[async_trait]
impl Shimlet for InstantShimlet {
    async fn apply(&self, workload: &WorkloadSpec) -> Result<(), ShimletError> {
        self.reachable()?;
        *self
            .applies
            .lock()
            .expect("lock")
            .entry(workload.service_id.clone())
            .or_default() += 1;
        let observation = WorkloadObservation {
            state: WorkloadState::Ready,
            ready_replicas: workload.replicas,
            desired_replicas: workload.replicas,
            address: Some(format!("http://instant.invalid/{}", workload.service_id)),
            replica_addresses: (0..workload.replicas)
                .map(|i| format!("http://instant.invalid/{}/{i}", workload.service_id))
                .collect(),
            generation: Some(workload.generation),
            failure: None,
        };
        self.workloads
            .lock()
            .expect("lock")
            .insert(workload.service_id.clone(), observation);
        Ok(())
    }

    async fn observe(&self, service_id: &str) -> Result<WorkloadObservation, ShimletError> {
        self.reachable()?;
        Ok(self
            .workloads
            .lock()
            .expect("lock")
            .get(service_id)
            .cloned()
            .unwrap_or_else(WorkloadObservation::missing))
    }

    async fn delete(&self, service_id: &str) -> Result<Removal, ShimletError> {
        self.reachable()?;
        self.workloads.lock().expect("lock").remove(service_id);
        Ok(Removal::Gone)
    }

    /// What `apply` would record: the workload itself (this runtime has no objects of its own).
    async fn render(&self, workload: &WorkloadSpec) -> Result<serde_json::Value, ShimletError> {
        Ok(serde_json::json!({ "instant": workload }))
    }

    async fn list(&self) -> Result<Vec<ManagedWorkload>, ShimletError> {
        self.reachable()?;
        Ok(self
            .workloads
            .lock()
            .expect("lock")
            .iter()
            .map(|(id, w)| ManagedWorkload {
                service_id: id.clone(),
                generation: w.generation,
                name: id.clone(),
            })
            .collect())
    }
}

/// Polls `shimlet.observe(service_id)` until `done` holds and returns that observation; panics
/// with the last observation after `timeout`. For shimlet tests, whatever the runtime.
pub async fn observe_until(
    shimlet: &dyn Shimlet,
    service_id: &str,
    timeout: Duration,
    done: impl Fn(&WorkloadObservation) -> bool,
) -> WorkloadObservation {
    let deadline = Instant::now() + timeout;
    loop {
        let observed = shimlet.observe(service_id).await.expect("observe");
        if done(&observed) {
            return observed;
        }
        assert!(
            Instant::now() < deadline,
            "{service_id}: gave up after {timeout:?}; last observation: {observed:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
