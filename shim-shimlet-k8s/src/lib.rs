//! xmod-shim's Kubernetes runtime (`--shimlet=k8s`): each
//! [`WorkloadSpec`](shim_core::WorkloadSpec) becomes a Deployment plus a Service in one namespace,
//! through [`kube`].
//!
//! # What a workload becomes
//! [`Renderer::render`] maps the workload: image, entrypoint (`command`) and args (with
//! `{host}` = `0.0.0.0`, `{port}` = the workload's port, `{model_dir}` = the mount path), env,
//! the container port (named `http`), cpu and memory requests and limits, accelerators as a limit
//! of the configured extended resource (default `nvidia.com/gpu`), the model directory (a
//! read-only hostPath under `modelVolume.hostRoot`, or a sub-path of a PersistentVolumeClaim), node
//! selector and tolerations from the configuration, a readiness probe on the engine's health path,
//! and a start-up probe whose `failureThreshold × periodSeconds` covers the workload's start-up
//! budget (large models load for many minutes; until then the pod is starting, never failed).
//! Both objects are named `xmod-<model>-<id>` ([`object_name`]: DNS-1123, at most 57 characters),
//! labelled `app.kubernetes.io/managed-by=xmod-shim` and `xmod-shim/service-id=<id>`, and
//! annotated with the model name and spec generation. [`Shimlet::render`] returns them as a
//! Kubernetes `List` (the dry run shows exactly what `apply` sends).
//!
//! # Apply, delete, list
//! `apply` is server-side apply with one field manager (`xmod-shim`) and `force`, so applying the
//! same workload twice changes nothing and a re-apply takes back fields someone else changed.
//! `delete` removes the Deployment and the Service with foreground propagation and reports
//! [`Removal::Gone`](shim_core::Removal::Gone) only when the API server no longer has either
//! (the Deployment outlives its pods, so "gone" means the GPUs are free). `list` lists the managed
//! Deployments (and stray Services) by label, for re-adoption and orphan reports.
//!
//! # How status is known
//! kube-runtime watchers (Deployments, Services, Pods, and with `replicaAddresses: pods` the
//! EndpointSlices, all filtered by the managed-by label; Nodes for their GPUs) feed an in-memory view indexed by service id; each change tells the engine through its
//! [`Notifier`](shim_core::Notifier). [`Shimlet::observe`] reads the view only: a status read
//! never calls the API server. The phase comes from the Deployment's rollout state and the pods'
//! own words ([`status`] has the rules): image pull errors, crash loops with the last exit (an
//! OOM kill is `OutOfMemory`; the service keeps starting with that reason until the container
//! has restarted more than `engine.maxRestarts` times), unschedulable pods with the scheduler's
//! message, a passed progress deadline. The address follows `endpointMode`: in-cluster DNS, node
//! address and node port, the load balancer, or an external base URL. A Deployment deleted or
//! edited behind the shim's back reads as missing or changed, so the engine re-applies it.
//!
//! # The cluster's GPUs
//! [`nodes`] watches the Nodes (a small projection of each: allocatable `acceleratorResource`,
//! the `nvidia.com/gpu.memory` label, the product) and offers them as the shimlet's
//! [`cluster_gpus`](shim_core::Shimlet::cluster_gpus): the fit check compares a request with
//! them (a replica's GPUs must all be on one node), and `GET /api/v1/gpus` lists them.
//!
//! # Desired state in the cluster
//! [`crd`] defines the `ModelService` resource (`deploy/crds/modelservices.yaml` is generated
//! from it); [`store::KubeStore`] is the engine's store on those resources (`--store
//! kubernetes`), and reports what kubectl users and the other shim replicas do to them for the
//! engine to follow; [`lease`] elects the one replica that reconciles.
//!
//! # Configuration and deployment
//! See [`K8sConfig`] for the `shimlets.k8s` keys, `deploy/` at the repository root for RBAC and
//! manifests that run the shim in a cluster, and `docs/kubernetes.md` for the opt-in test
//! against a real cluster (kind, k3s).

mod client;
mod config;
pub mod crd;
mod errors;
mod kept;
pub mod lease;
mod names;
pub mod nodes;
mod ratelimit;
mod render;
mod shimlet;
pub mod status;
pub mod store;
mod view;

use std::sync::Arc;

use futures::future::BoxFuture;
use shim_core::{Shimlet, ShimletContext, ShimletEntry, ShimletError};

pub use client::{check_access, connect};
pub use config::{
    EndpointMode, K8sConfig, ModelVolumeConfig, PullPolicy, ReplicaAddresses, ServiceType,
};
pub use names::{
    ANNOTATION_GENERATION, ANNOTATION_MODEL, CONTAINER_NAME, FIELD_MANAGER, LABEL_MANAGED_BY,
    LABEL_SERVICE_ID, MANAGED_BY_VALUE, MANAGED_SELECTOR, MAX_OBJECT_NAME, PORT_NAME, object_name,
};
pub use ratelimit::{RateLimit, RateLimitLayer};
pub use render::{Manifests, Renderer};
pub use shimlet::K8sShimlet;

/// Name this shimlet registers under (`--shimlet=k8s`).
pub const NAME: &str = "k8s";

fn factory(ctx: ShimletContext) -> BoxFuture<'static, Result<Arc<dyn Shimlet>, ShimletError>> {
    Box::pin(async move {
        let shimlet = K8sShimlet::connect(ctx).await?;
        Ok(Arc::new(shimlet) as Arc<dyn Shimlet>)
    })
}

shim_core::inventory::submit! {
    ShimletEntry::new(NAME, "Kubernetes Deployments and Services (kube-rs)", factory)
}
