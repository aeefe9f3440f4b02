//! xmod-shim's Docker runtime (`--shimlet=docker`): each replica of a
//! [`WorkloadSpec`](shim_core::WorkloadSpec) runs as a container on a Docker Engine, reached
//! through [`bollard`] at `shimlets.docker.socket`, `DOCKER_HOST`, or the local socket.
//!
//! # What a replica becomes
//! One container per replica, named `xmod-<service_id>-<replica>` and labelled
//! `xmod-shim.managed-by=xmod-shim`, `xmod-shim.service-id`, `xmod-shim.generation` and
//! `xmod-shim.replica` (plus the workload's own labels, and the health-probe settings so a
//! restarted shim can probe what it re-adopts). The image's entrypoint runs unless the workload
//! overrides it; args get `{host}` = `0.0.0.0`, `{port}` = the workload's port and `{model_dir}` =
//! the mount path. The port is published on a free host port (Docker picks it) bound to
//! `hostIp`; the model directory is bind-mounted read-only; cpu and memory become `NanoCpus` and
//! `Memory`; accelerators become a GPU `DeviceRequest` naming the device ids that the shared
//! [`GpuAllocator`](shim_core::GpuAllocator) hands out. [`Shimlet::render`] shows the exact
//! create bodies (with a GPU count instead of ids, since a dry run allocates nothing).
//!
//! # How status is known
//! [`Shimlet::observe`] answers from memory. The view is kept current by the engine's event
//! stream (filtered to managed containers; each start, die, OOM or destroy is followed by an
//! inspect) and by one HTTP probe per running replica against
//! `http://<hostIp>:<published port><health path>`, so "ready" means the engine itself answers.
//! Failures are typed: exit code (with the last log lines), OOM kill, crash loop (Docker's
//! restart count, when a restart policy is configured), image missing, no free GPU, start-up
//! timeout, container gone.
//!
//! # Apply, delete, re-adoption
//! `apply` is idempotent: a running container of the same generation is left alone; an exited,
//! hung, or older one is replaced; a missing one is created (pulling the image first when it is
//! not local). Extra replicas are removed. Updates replace containers one replica at a time
//! without overlap, since a single host rarely has GPU memory for two copies of a model.
//! `delete` stops with the configured grace period, removes, and reports
//! [`Removal::Gone`](shim_core::Removal::Gone) only once no labelled container is left. On start
//! the shimlet lists the labelled containers, rebuilds its view from them (ports, GPUs re-claimed
//! in the allocator) and probes them, so a restarted shim adopts what is running instead of
//! recreating it.
//!
//! # Configuration
//! See [`DockerConfig`] for the `shimlets.docker` keys.
//!
//! # The mock engine's image
//! The `mock` engine preset runs `xmod-shim/mock-engine:latest`, which `cargo xtask docker-image`
//! builds locally without a registry (`FROM scratch` plus `model-serve-shim` and the shared
//! libraries it links). The integration tests in `tests/` build it the same way when it is
//! missing, then run against the real engine.

mod config;
mod errors;
mod render;
mod runtime;
mod shimlet;
mod state;
mod watch;

use std::sync::Arc;

use futures::future::BoxFuture;
use shim_core::{Shimlet, ShimletContext, ShimletEntry, ShimletError};

pub use config::{DockerConfig, RestartPolicySetting};
pub use render::{
    GpuRequest, LABEL_GENERATION, LABEL_MANAGED_BY, LABEL_REPLICA, LABEL_SERVICE_ID,
    MANAGED_BY_VALUE, container_name, create_body,
};
pub use shimlet::DockerShimlet;

/// Name this shimlet registers under (`--shimlet=docker`).
pub const NAME: &str = "docker";

fn factory(ctx: ShimletContext) -> BoxFuture<'static, Result<Arc<dyn Shimlet>, ShimletError>> {
    Box::pin(async move {
        let shimlet = DockerShimlet::connect(ctx).await?;
        Ok(Arc::new(shimlet) as Arc<dyn Shimlet>)
    })
}

shim_core::inventory::submit! {
    ShimletEntry::new(NAME, "Docker Engine containers (bollard)", factory)
}
