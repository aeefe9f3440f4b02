//! Dry runs: the active pipeline runs against a recording stand-in for the runtime, which answers
//! `apply` with the runtime's own `render` instead of creating anything. Any pipeline gets a dry
//! run this way without knowing about it.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::Serialize;

use crate::event::EventKind;
use crate::pipeline::{PipelineObserver, StepProgress};
use crate::shimlet::{
    ManagedWorkload, Removal, Shimlet, ShimletError, WorkloadObservation, WorkloadState,
};
use crate::workload::WorkloadSpec;

/// What a deploy would create.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    /// The runtime-agnostic workloads the pipeline rendered.
    pub workloads: Vec<WorkloadSpec>,
    /// The runtime's objects for each workload, exactly as `apply` would create them.
    pub manifests: Vec<serde_json::Value>,
    /// The pipeline's steps as they ran.
    pub steps: Vec<StepProgress>,
    /// Memory per GPU and whether it fits; `null` when the model's metadata is unknown (or the
    /// pipeline makes no estimate).
    pub estimate: Option<crate::admission::Estimate>,
}

/// Records applies as renders; reports what it recorded as ready.
pub(crate) struct Recorder {
    runtime: Arc<dyn Shimlet>,
    pub(crate) workloads: Mutex<Vec<WorkloadSpec>>,
    pub(crate) manifests: Mutex<Vec<serde_json::Value>>,
}

impl Recorder {
    pub(crate) fn new(runtime: Arc<dyn Shimlet>) -> Self {
        Self {
            runtime,
            workloads: Mutex::default(),
            manifests: Mutex::default(),
        }
    }
}

#[async_trait]
impl Shimlet for Recorder {
    async fn apply(&self, workload: &WorkloadSpec) -> Result<(), ShimletError> {
        let manifest = self.runtime.render(workload).await?;
        self.manifests.lock().expect("dry-run lock").push(manifest);
        self.workloads
            .lock()
            .expect("dry-run lock")
            .push(workload.clone());
        Ok(())
    }

    async fn observe(&self, service_id: &str) -> Result<WorkloadObservation, ShimletError> {
        let workloads = self.workloads.lock().expect("dry-run lock");
        Ok(match workloads.last() {
            Some(w) => WorkloadObservation {
                state: WorkloadState::Ready,
                ready_replicas: w.replicas,
                desired_replicas: w.replicas,
                address: Some(format!("http://dry-run.invalid/{service_id}")),
                replica_addresses: vec![format!("http://dry-run.invalid/{service_id}")],
                generation: Some(w.generation),
                failure: None,
            },
            None => WorkloadObservation::missing(),
        })
    }

    async fn delete(&self, _service_id: &str) -> Result<Removal, ShimletError> {
        Ok(Removal::Gone)
    }

    async fn list(&self) -> Result<Vec<ManagedWorkload>, ShimletError> {
        Ok(Vec::new())
    }
}

/// Keeps the last step list of a dry run.
#[derive(Default)]
pub(crate) struct StepLog(pub(crate) Mutex<Vec<StepProgress>>);

impl PipelineObserver for StepLog {
    fn on_change(&self, steps: &[StepProgress], _event: EventKind) {
        steps.clone_into(&mut self.0.lock().expect("dry-run lock"));
    }
}
