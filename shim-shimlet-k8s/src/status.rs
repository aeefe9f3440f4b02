//! From cluster objects to a [`WorkloadObservation`]: a pure function of what the watches last
//! delivered (the Deployment, its Service and its pods, as the view keeps them: the few facts of
//! each that these rules read, [`DeploymentFacts`], [`ServiceFacts`] and [`PodFacts`]) and of what
//! this shimlet last applied. It never calls the API server, which is why `observe` is cheap
//! enough for every status read.
//!
//! The rules, in order:
//! 1. No Deployment: `Missing` (or `Starting` when our own apply has not reached the watch yet).
//! 2. The Deployment is behind our last apply (`metadata.generation` lower): `Starting`; ahead of
//!    it: changed behind the shim's back, `Starting` with a reason, so the engine re-applies.
//! 3. Rollout complete (the controller saw the newest spec, every wanted replica runs it and is
//!    ready, no old replica is left) and the Service exists: `Ready` with the address.
//! 4. Otherwise the pods explain why: image pull errors (`Failed`, `ImagePull`), missing
//!    programs (`BinaryNotFound`), unschedulable pods (`Pending`, `Unschedulable`, with the
//!    scheduler's own message), crash loops (`CrashLoop`, or `OutOfMemory` when the last exit was
//!    an OOM kill): `Starting` with that reason while the kubelet restarts the container, and
//!    `Failed` once its `restartCount` exceeds `engine.maxRestarts`. A crash or an OOM kill while
//!    loading may be the node's or a neighbour's doing; only one that keeps coming back is the
//!    model's (the rule of `FailureReason::RuntimeUnavailable`: only the spec or the model fails
//!    a service). `restartCount` counts over the pod's life, so a pod that crashed now and then
//!    over weeks fails at its next crash loop once the sum exceeds the limit.
//! 5. Then the Deployment's conditions: `ProgressDeadlineExceeded` (`Failed`, `StartupTimeout`),
//!    `ReplicaFailure` (quota: `Pending`; anything else, e.g. an admission denial: `Failed`).
//! 6. Else `Starting`: scheduled, pulling, or loading the model.

use k8s_openapi::api::apps::v1::Deployment;
use shim_core::shimlet::Failure;
use shim_core::{FailureReason, WorkloadObservation, WorkloadState};

use crate::config::{EndpointMode, K8sConfig};
pub use crate::kept::{
    ByName, ContainerFacts, DeploymentFacts, LastExit, Named, PodFacts, ReplicaFailure, Rollout,
    ServiceFacts, ServicePort,
};
use crate::names::ANNOTATION_GENERATION;

/// Waiting reasons that mean the image cannot be pulled.
const IMAGE_PULL_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RegistryUnavailable",
    "SignatureValidationFailed",
];
/// Waiting reasons that mean the container cannot be created or started as specified.
const CREATE_REASONS: &[&str] = &[
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "PreCreateHookError",
    "PreStartHookError",
];
/// The waiting reason of a crash loop.
const CRASH_LOOP: &str = "CrashLoopBackOff";

/// Whether a rule reads a container that waits for `reason`: the view keeps no other container.
pub(crate) fn reason_read(reason: &str) -> bool {
    reason == CRASH_LOOP || IMAGE_PULL_REASONS.contains(&reason) || CREATE_REASONS.contains(&reason)
}

/// What this shimlet knows of its own last apply of a service (nothing the cluster holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyMark {
    /// The Deployment's `metadata.generation` in the apply's answer.
    pub object_generation: i64,
    /// Spec generation that was applied.
    pub spec_generation: u64,
    /// Replicas that were applied.
    pub replicas: u32,
    /// Whether the watch has delivered the Deployment at `object_generation` (or later) since.
    pub seen: bool,
    /// An apply is under way: the view may show its effect before its answer arrives.
    pub in_flight: bool,
}

impl ApplyMark {
    /// A mark for a Deployment first seen in the cluster (re-adopted after a restart): later
    /// changes to it are compared with this generation.
    pub fn adopted(object_generation: i64, spec_generation: u64, replicas: u32) -> Self {
        Self {
            object_generation,
            spec_generation,
            replicas,
            seen: true,
            in_flight: false,
        }
    }
}

/// The objects of one service, as the watches last delivered them (what the view keeps of
/// them), by name.
#[derive(Debug, Clone, Default)]
pub struct ServiceObjects {
    /// Deployments labelled with the service id (one, or two briefly after a model rename).
    pub deployments: ByName<DeploymentFacts>,
    /// Services labelled with the service id.
    pub services: ByName<ServiceFacts>,
    /// Pods labelled with the service id.
    pub pods: ByName<PodFacts>,
}

impl ServiceObjects {
    /// Whether no object is left.
    pub fn is_empty(&self) -> bool {
        self.deployments.is_empty() && self.services.is_empty() && self.pods.is_empty()
    }

    /// The service's Deployment: the live one applied from the newest spec generation (another
    /// one is left over from a renamed model and about to be deleted).
    pub fn deployment(&self) -> Option<&DeploymentFacts> {
        self.deployments
            .iter()
            .filter(|d| !d.deleting)
            .max_by_key(|d| d.spec_generation.unwrap_or(0))
    }

    /// The live Service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceFacts> {
        self.services.get(name).filter(|s| !s.deleting)
    }

    /// Live pods of the Deployment called `name` (pod names are `<deployment>-<hash>-<suffix>`):
    /// neither being deleted nor finished.
    pub fn pods_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a PodFacts> + 'a {
        let prefix = format!("{name}-");
        self.pods
            .iter()
            .filter(move |pod| pod.name.starts_with(&prefix))
            .filter(|pod| !pod.deleting && !pod.finished)
    }
}

/// The spec generation a managed object was applied from (its annotation).
pub fn spec_generation(deployment: &Deployment) -> Option<u64> {
    deployment
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_GENERATION)?
        .parse()
        .ok()
}

/// Builds the base URL of a ready workload, following `endpointMode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointResolver {
    mode: EndpointMode,
    namespace: String,
    cluster_domain: String,
    external_base_url: Option<String>,
    node_address: Option<String>,
}

impl EndpointResolver {
    /// The resolver for `config`, with objects in `namespace`.
    pub fn new(config: &K8sConfig, namespace: &str) -> Self {
        Self {
            mode: config.effective_endpoint_mode(),
            namespace: namespace.to_string(),
            cluster_domain: config.cluster_domain.clone(),
            external_base_url: config.external_base_url.clone(),
            node_address: config.node_address.clone(),
        }
    }

    /// The base URL for `service` (whose live pods are `pods`), or why there is none yet.
    pub fn address(
        &self,
        service: &ServiceFacts,
        pods: &[&PodFacts],
        service_id: &str,
    ) -> Result<String, String> {
        let name = &*service.name;
        let Some(port) = service.port else {
            return Err(format!("Service {name} has no port"));
        };
        match self.mode {
            EndpointMode::ClusterDns => Ok(format!(
                "http://{name}.{}.svc.{}:{}",
                self.namespace, self.cluster_domain, port.port
            )),
            EndpointMode::NodePort => {
                let Some(node_port) = port.node_port else {
                    return Err(format!("Service {name} has no node port yet"));
                };
                let host = match &self.node_address {
                    Some(host) => host.clone(),
                    None => pods
                        .iter()
                        .filter(|p| pod_ready(p))
                        .find_map(|p| p.host_ip.as_deref().map(str::to_string))
                        .ok_or_else(|| "no ready pod to take a node address from".to_string())?,
                };
                Ok(http_url(&host, node_port))
            }
            EndpointMode::LoadBalancer => match &service.ingress {
                Some(host) => Ok(http_url(host, port.port)),
                None => Err(format!(
                    "waiting for the load balancer of Service {name} to get an address"
                )),
            },
            EndpointMode::External => {
                let base = self.external_base_url.as_deref().unwrap_or_default();
                Ok(base
                    .replace("{name}", name)
                    .replace("{serviceId}", service_id)
                    .replace("{namespace}", &self.namespace)
                    .trim_end_matches('/')
                    .to_string())
            }
        }
    }
}

/// `http://host:port`, with brackets around IPv6 literals.
fn http_url(host: &str, port: i32) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

/// What the cluster shows for one service; a container may restart `max_restarts` times
/// (`engine.maxRestarts`) before its crash loop fails the service. See the
/// [module docs](self) for the rules.
pub fn observe(
    objects: &ServiceObjects,
    mark: Option<&ApplyMark>,
    endpoints: &EndpointResolver,
    service_id: &str,
    max_restarts: u32,
) -> WorkloadObservation {
    let Some(deployment) = objects.deployment() else {
        return match mark {
            // Applied, but the watch has not delivered it yet.
            Some(m) if m.in_flight || !m.seen => WorkloadObservation {
                state: WorkloadState::Starting,
                ready_replicas: 0,
                desired_replicas: m.replicas,
                address: None,
                replica_addresses: Vec::new(),
                generation: Some(m.spec_generation),
                failure: None,
            },
            _ => WorkloadObservation::missing(),
        };
    };
    let name = &*deployment.name;
    let desired = count(deployment.replicas);
    let ready = deployment.rollout.map_or(0, |r| r.ready_replicas);
    let mut seen = WorkloadObservation {
        state: WorkloadState::Starting,
        ready_replicas: count(ready),
        desired_replicas: desired,
        address: None,
        replica_addresses: Vec::new(),
        generation: deployment.spec_generation,
        failure: None,
    };
    let object_generation = deployment.generation.unwrap_or(0);
    if let Some(m) = mark {
        if m.in_flight || (!m.seen && object_generation < m.object_generation) {
            // The view still shows the spec before our apply.
            seen.generation = Some(m.spec_generation);
            seen.desired_replicas = m.replicas;
            return seen;
        }
        if object_generation > m.object_generation {
            seen.failure = Some(Failure {
                reason: FailureReason::RuntimeError,
                message: format!(
                    "Deployment {name} was changed outside xmod-shim (generation {object_generation}, \
                     last applied {}); applying again restores it",
                    m.object_generation
                ),
            });
            return seen;
        }
    }
    if rollout_complete(deployment, desired) {
        let Some(service) = objects.service(name) else {
            seen.failure = Some(Failure {
                reason: FailureReason::WorkloadMissing,
                message: format!("Service {name} is missing; applying again restores it"),
            });
            return seen;
        };
        if desired == 0 {
            seen.state = WorkloadState::Ready;
            return seen;
        }
        let pods: Vec<&PodFacts> = objects.pods_of(name).collect();
        if let Ok(address) = endpoints.address(service, &pods, service_id) {
            seen.state = WorkloadState::Ready;
            // The Service balances over the pods; the gateway sees it as one replica.
            seen.replica_addresses = vec![address.clone()];
            seen.address = Some(address);
        }
        return seen;
    }
    let pods: Vec<&PodFacts> = objects.pods_of(name).collect();
    let said = pods_failure(&pods, max_restarts);
    if let Some((state @ (WorkloadState::Failed | WorkloadState::Pending), failure)) = said {
        seen.state = state;
        seen.failure = Some(failure);
        return seen;
    }
    if let Some((state, failure)) = deployment_failure(deployment) {
        seen.state = state;
        seen.failure = Some(failure);
        return seen;
    }
    // Still starting, perhaps with a crash loop the kubelet keeps restarting.
    seen.failure = said.map(|(_, failure)| failure);
    seen
}

fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// `kubectl rollout status`'s test, plus readiness: the controller has seen the newest spec,
/// every wanted replica runs it and is ready, and no replica of an older spec is left.
fn rollout_complete(deployment: &DeploymentFacts, desired: u32) -> bool {
    let Some(status) = &deployment.rollout else {
        return false;
    };
    let observed = status.observed_generation >= deployment.generation.unwrap_or(0);
    let updated = count(status.updated_replicas);
    let total = count(status.replicas);
    let ready = count(status.ready_replicas);
    observed && updated >= desired && total <= updated && ready >= desired
}

/// The most serious thing the pods report: a failure, then a pending pod, then a crash loop
/// still within `max_restarts` (`Starting`).
fn pods_failure(pods: &[&PodFacts], max_restarts: u32) -> Option<(WorkloadState, Failure)> {
    let rank = |state: WorkloadState| match state {
        WorkloadState::Failed => 0,
        WorkloadState::Pending => 1,
        _ => 2,
    };
    // The first pod of the most serious kind.
    pods.iter()
        .filter_map(|pod| pod_failure(pod, max_restarts))
        .min_by_key(|(state, _)| rank(*state))
}

/// Why one pod cannot run, if it says: `Failed`, `Pending` (unschedulable), or `Starting` for a
/// container in a crash loop that has restarted no more than `max_restarts` times.
pub fn pod_failure(pod: &PodFacts, max_restarts: u32) -> Option<(WorkloadState, Failure)> {
    let pod_name = &*pod.name;
    let mut retrying = None;
    for container in &pod.waiting {
        match container_failure(pod_name, container, max_restarts) {
            Some((WorkloadState::Starting, failure)) => {
                retrying.get_or_insert((WorkloadState::Starting, failure));
            }
            Some(found) => return Some(found),
            None => {}
        }
    }
    if retrying.is_some() {
        return retrying;
    }
    Some((
        WorkloadState::Pending,
        Failure {
            reason: FailureReason::Unschedulable,
            message: pod.unschedulable.as_deref()?.to_string(),
        },
    ))
}

fn container_failure(
    pod: &str,
    container: &ContainerFacts,
    max_restarts: u32,
) -> Option<(WorkloadState, Failure)> {
    let reason = &*container.reason;
    let said = container.message.trim();
    let name = &container.name;
    let failed = |reason, message| Some((WorkloadState::Failed, Failure { reason, message }));
    if IMAGE_PULL_REASONS.contains(&reason) {
        return failed(
            FailureReason::ImagePull,
            join(
                format!(
                    "pod {pod}: container {name} cannot pull image {:?}: {reason}",
                    container.image
                ),
                said,
            ),
        );
    }
    if reason == CRASH_LOOP {
        let restarts = container.restart_count;
        // Past the limit the crash is the model's (or the spec's): fail. Within it the kubelet
        // keeps restarting the container, and the service keeps starting with the reason.
        let over = i64::from(restarts) > i64::from(max_restarts);
        let state = if over {
            WorkloadState::Failed
        } else {
            WorkloadState::Starting
        };
        let count = if over {
            format!("{restarts} restarts, more than the {max_restarts} engine.maxRestarts allows")
        } else {
            format!("{restarts} restarts of the {max_restarts} engine.maxRestarts allows")
        };
        let Some(last) = &container.last_exit else {
            return Some((
                state,
                Failure {
                    reason: FailureReason::CrashLoop,
                    message: join(
                        format!("pod {pod}: container {name} keeps crashing ({count})"),
                        said,
                    ),
                },
            ));
        };
        let exit = &*last.reason;
        let output = last.message.trim();
        if looks_like_missing_binary(output) {
            // Restarting will not put the program into the image.
            return failed(
                FailureReason::BinaryNotFound,
                join(
                    format!("pod {pod}: container {name} cannot start its program ({exit})"),
                    output,
                ),
            );
        }
        let (reason, what) = if exit == "OOMKilled" {
            (
                FailureReason::OutOfMemory,
                format!(
                    "pod {pod}: container {name} was killed for running out of memory (OOMKilled, \
                     exit code {}) and keeps restarting ({count})",
                    last.exit_code
                ),
            )
        } else {
            (
                FailureReason::CrashLoop,
                format!(
                    "pod {pod}: container {name} keeps crashing ({count}); last exit code {} \
                     ({exit})",
                    last.exit_code
                ),
            )
        };
        return Some((
            state,
            Failure {
                reason,
                message: join(what, output),
            },
        ));
    }
    if CREATE_REASONS.contains(&reason) {
        let reason_type = if looks_like_missing_binary(said) {
            FailureReason::BinaryNotFound
        } else {
            FailureReason::RuntimeError
        };
        return failed(
            reason_type,
            join(format!("pod {pod}: container {name}: {reason}"), said),
        );
    }
    None
}

fn join(what: String, detail: &str) -> String {
    if detail.is_empty() {
        what
    } else {
        format!("{what}: {detail}")
    }
}

/// Container runtimes' words for "the program is not in the image".
fn looks_like_missing_binary(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("executable file not found") || lower.contains("no such file or directory")
}

/// Whether a pod's `Ready` condition is true.
pub fn pod_ready(pod: &PodFacts) -> bool {
    pod.ready
}

/// What the Deployment's own conditions say when its pods say nothing.
fn deployment_failure(deployment: &DeploymentFacts) -> Option<(WorkloadState, Failure)> {
    let name = &*deployment.name;
    if let Some(said) = &deployment.deadline_exceeded {
        return Some((
            WorkloadState::Failed,
            Failure {
                reason: FailureReason::StartupTimeout,
                message: join(format!("Deployment {name}: ProgressDeadlineExceeded"), said),
            },
        ));
    }
    let c = deployment.replica_failure.as_ref()?;
    let message = join(format!("Deployment {name}: {}", c.reason), &c.message);
    // A full quota frees up when other workloads go; anything else (an admission webhook or a
    // pod security policy refusing the pod) will not change by waiting.
    if message.contains("exceeded quota") {
        Some((
            WorkloadState::Pending,
            Failure {
                reason: FailureReason::Unschedulable,
                message,
            },
        ))
    } else {
        Some((
            WorkloadState::Failed,
            Failure {
                reason: FailureReason::RuntimeError,
                message,
            },
        ))
    }
}

#[cfg(test)]
mod tests;
