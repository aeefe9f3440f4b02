//! Embeddable core of xmod-shim: service specs, the lifecycle state machine, pipelines, the
//! shimlet trait, plugin registries, the event bus, the store and the reconciler, behind the
//! [`Engine`] facade.
//!
//! Core knows nothing of Kubernetes, Docker or processes: a [`Shimlet`] realises a runtime-agnostic
//! [`WorkloadSpec`], and a [`Pipeline`] turns a user's [`DeploySpec`] into one.
//!
//! # Embedding
//! ```no_run
//! use std::sync::Arc;
//! use shim_core::{DeploySpec, Engine, EngineConfig, Pipeline, PipelineContext, StepError};
//! use shim_core::testing::InstantShimlet;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // A pipeline of one step; real pipelines render a WorkloadSpec and wait for readiness.
//! async fn apply(ctx: PipelineContext) -> Result<(), StepError> {
//!     let workload = shim_core::WorkloadSpec::new(ctx.service_id(), ctx.generation(), "demo-image");
//!     ctx.shimlet().apply(&workload).await?;
//!     ctx.set_endpoint("http://127.0.0.1:8000/v1/chat/completions");
//!     Ok(())
//! }
//! let engine = Engine::builder()
//!     .config(EngineConfig::default())
//!     .shimlet_instance(|_ctx| Arc::new(InstantShimlet::default()))
//!     .pipeline(Pipeline::new("demo").step("apply", apply).build())
//!     .build()
//!     .await?;
//! let id = engine.deploy(DeploySpec::named("qwen")).await?;
//! let mut events = engine.subscribe();
//! while let Ok(event) = events.recv().await {
//!     println!("{event:?}");
//!     if engine.get(&id).map(|s| s.phase.is_settled()).unwrap_or(true) { break; }
//! }
//! engine.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admission;
pub mod config;
pub mod dry_run;
pub mod engine;
pub mod error;
pub mod event;
pub mod gpu;
pub mod phase;
pub mod pipeline;
pub mod quantity;
pub mod queue;
pub mod record;
pub mod redact;
pub mod registry;
pub mod shimlet;
pub mod spec;
pub mod store;
pub mod testing;
pub mod workload;

pub use admission::{AdmissionRequest, Estimate, FitCheck, Verdict};
pub use config::{EngineConfig, PluginSettings};
pub use dry_run::DryRun;
pub use engine::{Engine, EngineBuilder, PluginInfo};
pub use error::{Error, Result};
pub use event::{Event, EventBus, EventKind, EventStream, Received};
pub use gpu::{ClusterGpus, GpuAllocator, GpuError, GpuNeed, GpuStatus, NodeGpus};
pub use phase::{Phase, Transition, TransitionError, Trigger};
pub use pipeline::{
    Pipeline, PipelineBuilder, PipelineContext, StepError, StepErrorKind, StepOptions,
    StepProgress, StepState,
};
pub use record::{Desired, ServiceRecord};
pub use registry::{PipelineEntry, ShimletEntry};
pub use shimlet::{
    ManagedWorkload, Notifier, Removal, Shimlet, ShimletContext, ShimletError, WorkloadObservation,
    WorkloadState,
};
pub use spec::{DeploySpec, EnvVar, FieldError, ResourceRequirements, ValidationPolicy};
pub use workload::{FailureReason, HealthProbe, ModelVolume, Resources, WorkloadSpec};

/// Re-exported so plugin crates use the same `inventory` as core when they `submit!`.
pub use inventory;
