//! A custom shimlet in one file: implement `Shimlet`, `submit!` an entry, link the crate.
//! Run with `cargo run -p shim-core --example custom_shimlet`.
//!
//! This "runtime" only records what it was asked to run (an in-memory ledger), so the example
//! runs anywhere; a real one would talk to its scheduler in `apply`, `observe` and `delete`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::future::BoxFuture;
use shim_core::{
    DeploySpec, Engine, EngineConfig, ManagedWorkload, Phase, Pipeline, PipelineContext, Removal,
    Shimlet, ShimletContext, ShimletEntry, ShimletError, StepError, WorkloadObservation,
    WorkloadSpec, WorkloadState,
};

/// Keeps the workloads it was given in memory and reports them ready at once.
#[derive(Default)]
struct LedgerShimlet {
    workloads: Mutex<HashMap<String, WorkloadSpec>>,
}

#[async_trait]
impl Shimlet for LedgerShimlet {
    async fn apply(&self, workload: &WorkloadSpec) -> Result<(), ShimletError> {
        self.workloads
            .lock()
            .unwrap()
            .insert(workload.service_id.clone(), workload.clone());
        Ok(())
    }

    async fn observe(&self, service_id: &str) -> Result<WorkloadObservation, ShimletError> {
        let workloads = self.workloads.lock().unwrap();
        Ok(match workloads.get(service_id) {
            Some(w) => WorkloadObservation {
                state: WorkloadState::Ready,
                ready_replicas: w.replicas,
                desired_replicas: w.replicas,
                address: Some(format!("http://ledger.invalid:{}", w.port)),
                replica_addresses: vec![format!("http://ledger.invalid:{}", w.port)],
                generation: Some(w.generation),
                failure: None,
            },
            None => WorkloadObservation::missing(),
        })
    }

    async fn delete(&self, service_id: &str) -> Result<Removal, ShimletError> {
        self.workloads.lock().unwrap().remove(service_id);
        Ok(Removal::Gone)
    }

    async fn list(&self) -> Result<Vec<ManagedWorkload>, ShimletError> {
        Ok(self
            .workloads
            .lock()
            .unwrap()
            .values()
            .map(|w| ManagedWorkload {
                service_id: w.service_id.clone(),
                generation: Some(w.generation),
                name: w.model_name.clone(),
            })
            .collect())
    }
}

fn build(_ctx: ShimletContext) -> BoxFuture<'static, Result<Arc<dyn Shimlet>, ShimletError>> {
    Box::pin(async { Ok(Arc::new(LedgerShimlet::default()) as Arc<dyn Shimlet>) })
}

// The registration: after this, `--shimlet=ledger` (or `.shimlet("ledger")`) picks it.
shim_core::inventory::submit! { ShimletEntry::new("ledger", "in-memory ledger (example)", build) }

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pipeline = Pipeline::new("example")
        .step("apply", |ctx: PipelineContext| async move {
            let mut workload =
                WorkloadSpec::new(ctx.service_id(), ctx.generation(), "example/engine:latest");
            workload.model_name = ctx.spec().model_name.clone();
            ctx.shimlet()
                .apply(&workload)
                .await
                .map_err(StepError::from)
        })
        .step("expose", |ctx: PipelineContext| async move {
            let seen = ctx.shimlet().observe(ctx.service_id()).await?;
            ctx.set_endpoint(format!(
                "{}/v1/chat/completions",
                seen.address.unwrap_or_default()
            ));
            Ok(())
        })
        .build();
    let engine = Engine::builder()
        .config(EngineConfig {
            gpus: Some(Vec::new()),
            ..EngineConfig::default()
        })
        .shimlet("ledger")
        .pipeline(pipeline)
        .build()
        .await?;
    let id = engine.deploy(DeploySpec::named("qwen")).await?;
    let mut events = engine.subscribe();
    while engine.get(&id).map(|s| s.phase) != Some(Phase::Running) {
        events.recv().await?;
    }
    let service = engine.get(&id).expect("deployed");
    println!(
        "{id} is {} at {}",
        service.phase.wire_word(),
        service.endpoint
    );
    engine.shutdown().await;
    Ok(())
}
