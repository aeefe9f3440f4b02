//! [`DockerShimlet`]: the [`Shimlet`] trait over the Docker Engine API.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{ContainerSummary, ContainerSummaryStateEnum};
use bollard::query_parameters::{CreateContainerOptionsBuilder, CreateImageOptionsBuilder};
use futures::StreamExt as _;
use shim_core::{
    FailureReason, GpuAllocator, ManagedWorkload, Notifier, Removal, Shimlet, ShimletContext,
    ShimletError, WorkloadObservation, WorkloadSpec,
};
use tokio::sync::broadcast;

use crate::config::DockerConfig;
use crate::errors::{classify, is_not_found};
use crate::render::{
    GpuRequest, LABEL_GENERATION, container_name, create_body, gpu_owner, managed_filter,
    service_filter,
};
use crate::runtime::{Inner, identity};
use crate::state::Health;
use crate::watch::{spawn_watcher, unix_now};

/// Longest wait for the engine to answer at start-up: an unreachable TCP endpoint must fail the
/// start, not hang it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs each replica of a workload as a Docker container, named `xmod-<service>-<replica>` and
/// labelled with its service id and generation. See the [crate docs](crate).
pub struct DockerShimlet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DockerShimlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerShimlet")
            .field("endpoint", &self.inner.endpoint)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl DockerShimlet {
    /// Connects with the `shimlets.docker` section of the context's configuration.
    ///
    /// # Errors
    /// [`FailureReason::InvalidSpec`] for a bad config section; [`FailureReason::RuntimeError`]
    /// when the engine cannot be reached (the message names the endpoint and how to change it).
    pub async fn connect(ctx: ShimletContext) -> Result<Self, ShimletError> {
        let config: DockerConfig = ctx
            .settings
            .section_as(&["shimlets", "docker"])
            .map_err(|e| ShimletError::permanent(FailureReason::InvalidSpec, e))?;
        Self::with_config(config, ctx.notifier, ctx.gpus).await
    }

    /// Connects with an explicit configuration: checks it, reaches the engine (negotiating the
    /// API version, so older engines work), re-adopts every labelled container, and starts
    /// watching the engine's events.
    ///
    /// # Errors
    /// As [`DockerShimlet::connect`].
    pub async fn with_config(
        config: DockerConfig,
        notifier: Notifier,
        gpus: Arc<GpuAllocator>,
    ) -> Result<Self, ShimletError> {
        config
            .validate()
            .map_err(|e| ShimletError::permanent(FailureReason::InvalidSpec, e))?;
        let endpoint = config.endpoint();
        let docker = connect(&endpoint).await?;
        let http = reqwest::Client::builder().no_proxy().build().map_err(|e| {
            ShimletError::permanent(
                FailureReason::Internal,
                format!("building the health-probe HTTP client: {e}"),
            )
        })?;
        let inner = Arc::new(Inner {
            docker,
            advertised_host: config.advertised_host(),
            config,
            endpoint,
            notifier,
            gpus,
            http,
            changes: broadcast::channel(256).0,
            services: Mutex::new(HashMap::new()),
            watcher: Mutex::new(None),
        });
        // Taken before listing, so the watcher replays whatever happens while we list.
        let since = unix_now();
        inner.resync().await?;
        let watcher = spawn_watcher(&inner, since);
        *inner.watcher.lock().expect("watcher lock") = Some(watcher);
        let adopted = inner.services.lock().expect("services lock").len();
        tracing::info!(endpoint = %inner.endpoint, adopted, "Docker shimlet connected");
        Ok(Self { inner })
    }

    /// The configuration in force.
    pub fn config(&self) -> &DockerConfig {
        &self.inner.config
    }

    /// Service ids whose observation changed (exit, readiness, removal), as they change. The
    /// engine learns the same through its [`Notifier`]; this is for embedders and tests.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.inner.changes.subscribe()
    }

    /// Makes sure `image` is present: used when local, pulled (progress into the logs) when
    /// not.
    async fn ensure_image(&self, image: &str) -> Result<(), ShimletError> {
        let docker = &self.inner.docker;
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(err) if is_not_found(&err) => {}
            Err(err) => return Err(classify(&format!("inspecting image {image}"), err)),
        }
        let pull_failed = |detail: String| {
            ShimletError::permanent(
                FailureReason::ImagePull,
                format!("image {image} not found locally and could not be pulled: {detail}"),
            )
        };
        tracing::info!(%image, "image not present locally; pulling");
        let (from_image, tag) = split_image(image);
        let options = CreateImageOptionsBuilder::new()
            .from_image(from_image)
            .tag(tag)
            .build();
        let mut progress = docker.create_image(Some(options), None, None);
        // Log each layer's status once per change; byte counts go to debug.
        let mut layers: HashMap<String, String> = HashMap::new();
        while let Some(item) = progress.next().await {
            let info = item.map_err(|e| pull_failed(e.to_string()).with_source(e))?;
            let status = info.status.unwrap_or_default();
            let layer = info.id.unwrap_or_default();
            if layers.get(&layer) != Some(&status) {
                tracing::info!(%image, %layer, %status, "pulling");
                layers.insert(layer, status);
            } else if let Some(detail) = info.progress_detail {
                tracing::debug!(%image, %layer, current = ?detail.current, total = ?detail.total, "pulling");
            }
        }
        match docker.inspect_image(image).await {
            Ok(_) => {
                tracing::info!(%image, "image pulled");
                Ok(())
            }
            Err(err) => Err(pull_failed(format!(
                "the pull finished but the image is absent ({err})"
            ))),
        }
    }

    /// Creates and starts replica `index`.
    async fn create_replica(
        &self,
        workload: &WorkloadSpec,
        index: u32,
    ) -> Result<(), ShimletError> {
        let inner = &self.inner;
        let owner = gpu_owner(&workload.service_id, index);
        let gpus = match workload.resources.accelerators {
            0 => GpuRequest::None,
            n => GpuRequest::Devices(inner.gpus.allocate(&owner, n).map_err(|e| {
                ShimletError::permanent(
                    FailureReason::Unschedulable,
                    format!("replica {index} needs {n} accelerator(s): {e}"),
                )
            })?),
        };
        let release = |err: ShimletError| {
            inner.gpus.release(&owner);
            err
        };
        let body = create_body(workload, index, &inner.config, &gpus).map_err(release)?;
        let name = container_name(&workload.service_id, index);
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = inner
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| release(classify(&format!("creating container {name}"), e)))?;
        for warning in &created.warnings {
            tracing::warn!(container = %name, %warning, "Docker warning");
        }
        inner.refresh(&created.id).await?;
        if let Err(err) = inner.docker.start_container(&created.id, None).await {
            // Keep the created container: its inspect shows the error; the next apply replaces it.
            let _ = inner.refresh(&created.id).await;
            return Err(release(classify(
                &format!("starting container {name}"),
                err,
            )));
        }
        tracing::info!(service_id = %workload.service_id, container = %name, "container started");
        inner.refresh(&created.id).await
    }

    /// Whether a listed container can stay as replica `index` of `workload`: running, from the
    /// same generation, and not known to be hung.
    fn keep(&self, container: &ContainerSummary, workload: &WorkloadSpec, index: u32) -> bool {
        let running = container.state == Some(ContainerSummaryStateEnum::RUNNING);
        let generation = container
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_GENERATION))
            .and_then(|g| g.parse::<u64>().ok());
        let healthy = self
            .inner
            .services
            .lock()
            .expect("services lock")
            .get(&workload.service_id)
            .and_then(|v| v.replicas.get(&index))
            .filter(|r| Some(&r.container_id) == container.id.as_ref())
            .is_none_or(|r| !matches!(r.health, Health::Unhealthy(_) | Health::TimedOut(_)));
        running && generation == Some(workload.generation) && healthy
    }

    async fn apply_inner(&self, workload: &WorkloadSpec) -> Result<(), ShimletError> {
        let inner = &self.inner;
        let service_id = &workload.service_id;
        if workload.image.trim().is_empty() {
            return Err(ShimletError::permanent(
                FailureReason::InvalidSpec,
                "the Docker shimlet needs an image",
            ));
        }
        let mut existing: BTreeMap<u32, Vec<ContainerSummary>> = BTreeMap::new();
        for container in inner.list(service_filter(service_id)).await? {
            if let Some((_, index)) = identity(&container) {
                existing.entry(index).or_default().push(container);
            }
        }
        // Scale down first, so the GPUs of removed replicas are free for the ones we create.
        for (index, containers) in existing.range(workload.replicas..) {
            for container in containers {
                if let Some(id) = &container.id {
                    inner.remove(id, true).await?;
                }
            }
            inner.gpus.release(&gpu_owner(service_id, *index));
        }
        let mut image_checked = false;
        for index in 0..workload.replicas {
            let mut keep = false;
            for container in existing.get(&index).into_iter().flatten() {
                let Some(id) = &container.id else { continue };
                if !keep && self.keep(container, workload, index) {
                    keep = true;
                    // Make sure it is in the view with a probe (it may predate this process).
                    inner.refresh(id).await?;
                } else {
                    let running = container.state == Some(ContainerSummaryStateEnum::RUNNING);
                    tracing::info!(%service_id, container = %id, "replacing container");
                    if !inner.remove(id, running).await? {
                        return Err(ShimletError::transient(
                            FailureReason::RuntimeError,
                            format!("container {id} is still being removed"),
                        ));
                    }
                }
            }
            if keep {
                continue;
            }
            if !image_checked {
                self.ensure_image(&workload.image).await?;
                image_checked = true;
            }
            self.create_replica(workload, index).await?;
        }
        Ok(())
    }
}

/// Connects to the engine at `endpoint`, negotiates the API version and pings it.
async fn connect(endpoint: &str) -> Result<Docker, ShimletError> {
    let unreachable = |detail: String| {
        ShimletError::permanent(
            FailureReason::RuntimeError,
            format!(
                "cannot reach the Docker Engine at {endpoint}: {detail} (is dockerd running? \
                 set shimlets.docker.socket or DOCKER_HOST to point elsewhere)"
            ),
        )
    };
    let docker = Docker::connect_with_host(endpoint).map_err(|e| unreachable(e.to_string()))?;
    let ready = async {
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, bollard::errors::Error>(docker)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, ready).await {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(err)) => Err(unreachable(err.to_string()).with_source(err)),
        Err(_) => Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

/// Splits `repo[:tag]` for the pull API, which pulls *every* tag when none is given.
/// Digests (`repo@sha256:…`) stay whole.
fn split_image(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    let name_start = image.rfind('/').map_or(0, |i| i + 1);
    match image[name_start..].rfind(':') {
        Some(colon) => (
            &image[..name_start + colon],
            &image[name_start + colon + 1..],
        ),
        None => (image, "latest"),
    }
}

#[async_trait]
impl Shimlet for DockerShimlet {
    async fn apply(&self, workload: &WorkloadSpec) -> Result<(), ShimletError> {
        let service_id = &workload.service_id;
        self.inner.update_service(service_id, |view| {
            view.desired_replicas = workload.replicas;
            view.generation = Some(workload.generation);
            view.failure = None;
        });
        let result = self.apply_inner(workload).await;
        if let Err(err) = &result {
            self.inner.set_failure(service_id, err);
        }
        result
    }

    async fn observe(&self, service_id: &str) -> Result<WorkloadObservation, ShimletError> {
        Ok(self.inner.observation(service_id))
    }

    async fn delete(&self, service_id: &str) -> Result<Removal, ShimletError> {
        let inner = &self.inner;
        let containers = inner.list(service_filter(service_id)).await?;
        let removals = containers
            .iter()
            .filter_map(|c| c.id.as_deref())
            .map(|id| inner.remove(id, true));
        let mut in_progress = false;
        for result in futures::future::join_all(removals).await {
            in_progress |= !result?;
        }
        if in_progress || !inner.list(service_filter(service_id)).await?.is_empty() {
            return Ok(Removal::InProgress);
        }
        inner.gpus.release_prefix(&format!("{service_id}/"));
        inner
            .services
            .lock()
            .expect("services lock")
            .remove(service_id);
        Ok(Removal::Gone)
    }

    async fn list(&self) -> Result<Vec<ManagedWorkload>, ShimletError> {
        let mut by_service: BTreeMap<String, Vec<(u32, ContainerSummary)>> = BTreeMap::new();
        for container in self.inner.list(managed_filter()).await? {
            if let Some((service, index)) = identity(&container) {
                by_service
                    .entry(service)
                    .or_default()
                    .push((index, container));
            }
        }
        Ok(by_service
            .into_iter()
            .map(|(service_id, mut containers)| {
                containers.sort_by_key(|(index, _)| *index);
                let generation = containers
                    .iter()
                    .filter_map(|(_, c)| c.labels.as_ref()?.get(LABEL_GENERATION)?.parse().ok())
                    .max();
                let name = containers
                    .iter()
                    .filter_map(|(_, c)| c.names.as_ref()?.first())
                    .map(|n| n.trim_start_matches('/'))
                    .collect::<Vec<_>>()
                    .join(",");
                ManagedWorkload {
                    service_id,
                    generation,
                    name,
                }
            })
            .collect())
    }

    async fn logs(&self, service_id: &str, tail: usize) -> Result<String, ShimletError> {
        let mut containers: Vec<(u32, String, String)> = self
            .inner
            .list(service_filter(service_id))
            .await?
            .into_iter()
            .filter_map(|c| {
                let (_, index) = identity(&c)?;
                let name = c
                    .names
                    .as_ref()?
                    .first()?
                    .trim_start_matches('/')
                    .to_string();
                Some((index, c.id?, name))
            })
            .collect();
        if containers.is_empty() {
            return Err(ShimletError::permanent(
                FailureReason::WorkloadMissing,
                format!("service {service_id} has no containers"),
            ));
        }
        containers.sort();
        if let [(_, id, _)] = containers.as_slice() {
            return self.inner.logs(id, tail).await;
        }
        // Several replicas: one section each, headed like `tail` does for several files.
        let mut text = String::new();
        for (_, id, name) in &containers {
            text.push_str(&format!("==> {name} <==\n"));
            text.push_str(&self.inner.logs(id, tail).await?);
        }
        Ok(text)
    }

    async fn render(&self, workload: &WorkloadSpec) -> Result<serde_json::Value, ShimletError> {
        // No GPU is allocated in a dry run, so the request asks for a count; `apply` names ids.
        let gpus = match workload.resources.accelerators {
            0 => GpuRequest::None,
            n => GpuRequest::Count(n),
        };
        let containers = (0..workload.replicas)
            .map(|index| {
                let body = create_body(workload, index, &self.inner.config, &gpus)?;
                Ok(serde_json::json!({
                    "name": container_name(&workload.service_id, index),
                    "body": body,
                }))
            })
            .collect::<Result<Vec<_>, ShimletError>>()?;
        Ok(serde_json::Value::Array(containers))
    }
}

#[cfg(test)]
mod tests {
    use super::split_image;

    #[test]
    fn images_split_into_name_and_tag_for_the_pull_api() {
        assert_eq!(
            split_image("vllm/vllm-openai"),
            ("vllm/vllm-openai", "latest")
        );
        assert_eq!(
            split_image("xmod-shim/mock-engine:latest"),
            ("xmod-shim/mock-engine", "latest")
        );
        assert_eq!(
            split_image("registry:5000/team/engine:v2"),
            ("registry:5000/team/engine", "v2")
        );
        assert_eq!(
            split_image("registry:5000/team/engine"),
            ("registry:5000/team/engine", "latest")
        );
        assert_eq!(split_image("img@sha256:abc"), ("img@sha256:abc", ""));
    }
}
