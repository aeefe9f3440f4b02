//! The shared state behind a [`DockerShimlet`](crate::DockerShimlet): the engine client, the
//! in-memory view, and the operations that keep that view true (inspect, forget, re-adopt).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerSummary;
use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::StreamExt as _;
use shim_core::shimlet::Failure;
use shim_core::{GpuAllocator, Notifier, ShimletError, WorkloadObservation};
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use crate::config::DockerConfig;
use crate::errors::{classify, is_not_found, status_of};
use crate::render::{LABEL_REPLICA, LABEL_SERVICE_ID, gpu_owner, managed_filter};
use crate::state::{ContainerFacts, Health, ProbeTask, ReplicaView, ServiceView, Status};

/// Log lines attached to an exit, crash-loop or start failure.
pub(crate) const FAILURE_LOG_LINES: usize = 20;
/// Longest wait for those log lines: a stuck logs call must not stall the event loop.
const FAILURE_LOG_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Inner {
    pub docker: Docker,
    pub config: DockerConfig,
    /// The engine endpoint, for messages.
    pub endpoint: String,
    pub notifier: Notifier,
    pub gpus: Arc<GpuAllocator>,
    /// For health probes; no proxy, probes go to local ports.
    pub http: reqwest::Client,
    /// Host in endpoint URLs.
    pub advertised_host: String,
    /// Service ids, as they change (for embedders and tests; the engine uses `notifier`).
    pub changes: broadcast::Sender<String>,
    /// What `observe` answers from.
    pub services: Mutex<HashMap<String, ServiceView>>,
    /// The event watcher, stopped when the shimlet goes away.
    pub watcher: Mutex<Option<AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.lock().expect("watcher lock").take() {
            watcher.abort();
        }
        // Probe tasks stop as their `ProbeTask`s drop with `services`.
    }
}

impl Inner {
    /// The observation for one service, from memory only.
    pub fn observation(&self, service_id: &str) -> WorkloadObservation {
        self.services
            .lock()
            .expect("services lock")
            .get(service_id)
            .map_or_else(WorkloadObservation::missing, |s| {
                s.observation(&self.advertised_host)
            })
    }

    /// Tells the engine (and subscribers) that a service's observation changed.
    pub fn notify(&self, service_id: &str) {
        self.notifier.changed(service_id);
        // No subscribers is fine.
        let _ = self.changes.send(service_id.to_string());
    }

    /// Runs `change` on a service's view (created when absent) and notifies when its
    /// observation changed.
    pub fn update_service<R>(
        &self,
        service_id: &str,
        change: impl FnOnce(&mut ServiceView) -> R,
    ) -> R {
        self.update(service_id, true, change)
            .expect("update creates the view")
    }

    /// Like [`Inner::update_service`], but only for a service still in the view: background
    /// tasks must not resurrect a deleted service (an empty view would read as "ready").
    pub fn update_existing<R>(
        &self,
        service_id: &str,
        change: impl FnOnce(&mut ServiceView) -> R,
    ) -> Option<R> {
        self.update(service_id, false, change)
    }

    fn update<R>(
        &self,
        service_id: &str,
        create: bool,
        change: impl FnOnce(&mut ServiceView) -> R,
    ) -> Option<R> {
        let (result, changed) = {
            let mut services = self.services.lock().expect("services lock");
            let view = if create {
                services.entry(service_id.to_string()).or_default()
            } else {
                services.get_mut(service_id)?
            };
            let before = view.observation(&self.advertised_host);
            let result = change(view);
            let after = view.observation(&self.advertised_host);
            (result, before != after)
        };
        if changed {
            self.notify(service_id);
        }
        Some(result)
    }

    /// Records an apply-level failure (image pull, no GPU, create error) for `observe`.
    pub fn set_failure(&self, service_id: &str, error: &ShimletError) {
        let failure = Failure {
            reason: error.reason,
            message: error.message.clone(),
        };
        self.update_service(service_id, |view| view.failure = Some(failure));
    }

    /// Containers matching a label filter, stopped ones included.
    pub async fn list(&self, label: String) -> Result<Vec<ContainerSummary>, ShimletError> {
        let filters = HashMap::from([("label", vec![label])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|e| classify("listing containers", e))
    }

    /// Inspects a container and brings the view in line with it: the one place where Docker's
    /// truth enters the view (events, apply and re-adoption all come through here).
    pub async fn refresh(self: &Arc<Self>, container_id: &str) -> Result<(), ShimletError> {
        self.refresh_with(container_id, false).await
    }

    /// [`Inner::refresh`]; `claim_gpus` also records the container's GPUs with the shared
    /// allocator (re-adoption: a container that already runs keeps its devices).
    async fn refresh_with(
        self: &Arc<Self>,
        container_id: &str,
        claim_gpus: bool,
    ) -> Result<(), ShimletError> {
        let info = match self
            .docker
            .inspect_container(container_id, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => info,
            Err(err) if is_not_found(&err) => {
                self.forget(container_id);
                return Ok(());
            }
            Err(err) => return Err(classify(&format!("inspecting {container_id}"), err)),
        };
        let Some(facts) = ContainerFacts::from_inspect(&info, self.config.host_network()) else {
            return Ok(());
        };
        // Names are unique, so two containers for one replica can only mean the one in the view
        // is gone and its destroy event is still on the way.
        let other = self
            .slot_container(&facts.service_id, facts.replica)
            .filter(|other| *other != facts.id);
        if let Some(other) = other {
            match self
                .docker
                .inspect_container(&other, None::<InspectContainerOptions>)
                .await
            {
                Err(err) if is_not_found(&err) => self.forget(&other),
                _ => return Ok(()),
            }
        }
        if claim_gpus && !facts.gpu_ids.is_empty() {
            self.gpus.claim(
                &gpu_owner(&facts.service_id, facts.replica),
                facts.gpu_ids.clone(),
            );
        }
        let failure = if facts.needs_logs() {
            let logs = self.tail_logs(&facts.id, FAILURE_LOG_LINES).await;
            facts.failure(&logs)
        } else {
            facts.failure("")
        };
        self.upsert(facts, failure);
        Ok(())
    }

    fn slot_container(&self, service_id: &str, replica: u32) -> Option<String> {
        self.services
            .lock()
            .expect("services lock")
            .get(service_id)?
            .replicas
            .get(&replica)
            .map(|r| r.container_id.clone())
    }

    /// Puts fresh inspect facts into the view, starting or stopping the health probe.
    fn upsert(self: &Arc<Self>, facts: ContainerFacts, failure: Option<Failure>) {
        let service_id = facts.service_id.clone();
        let adopted = ServiceView::adopted(&facts);
        let (changed, _stale_probe) = {
            let mut services = self.services.lock().expect("services lock");
            let view = services.entry(service_id.clone()).or_insert(adopted);
            let before = view.observation(&self.advertised_host);
            let replica = view
                .replicas
                .entry(facts.replica)
                .or_insert_with(|| ReplicaView {
                    container_id: facts.id.clone(),
                    facts: facts.clone(),
                    health: Health::Starting,
                    failure: None,
                    probe: None,
                });
            // A new start (by Docker's restart policy, or `docker start`) must prove health anew.
            if replica.facts.started_at != facts.started_at || facts.status != Status::Running {
                replica.health = Health::Starting;
            }
            replica.failure = failure;
            replica.facts = facts;
            let port = replica.facts.host_port;
            let running = replica.facts.status == Status::Running;
            let probing = replica.probe.as_ref().map(|p| p.host_port);
            let stale_probe = match (running, port) {
                (true, Some(port)) if probing != Some(port) => {
                    let handle = crate::watch::spawn_probe(self, &replica.facts, port);
                    replica.probe.replace(ProbeTask {
                        host_port: port,
                        handle,
                    })
                }
                (true, Some(_)) => None,
                _ => replica.probe.take(),
            };
            let after = view.observation(&self.advertised_host);
            (before != after, stale_probe)
        };
        if changed {
            self.notify(&service_id);
        }
    }

    /// Drops a container from the view (it was destroyed, or apply removed it).
    pub fn forget(&self, container_id: &str) {
        let service = {
            let services = self.services.lock().expect("services lock");
            services.iter().find_map(|(id, view)| {
                view.replicas
                    .iter()
                    .find(|(_, r)| r.container_id == container_id)
                    .map(|(index, _)| (id.clone(), *index))
            })
        };
        if let Some((service_id, index)) = service {
            self.update_existing(&service_id, |view| {
                view.replicas.remove(&index);
            });
        }
    }

    /// Rebuilds the view from every labelled container (start-up re-adoption, and after the
    /// event stream reconnects, when events may have been missed).
    pub async fn resync(self: &Arc<Self>) -> Result<(), ShimletError> {
        let containers = self.list(managed_filter()).await?;
        let mut present = HashSet::new();
        for container in &containers {
            let Some(id) = container.id.clone() else {
                continue;
            };
            if let Err(err) = self.refresh_with(&id, true).await {
                tracing::warn!(container = %id, error = %err, "could not inspect a managed container");
            }
            present.insert(id);
        }
        // Containers in the view that the listing no longer shows were removed while we were
        // not looking; refresh confirms (404) and forgets them.
        let known: Vec<String> = self
            .services
            .lock()
            .expect("services lock")
            .values()
            .flat_map(|v| v.replicas.values().map(|r| r.container_id.clone()))
            .filter(|id| !present.contains(id))
            .collect();
        for id in known {
            self.refresh(&id).await?;
        }
        Ok(())
    }

    /// The last `tail` log lines of a container (stdout and stderr, interleaved as written);
    /// empty when they cannot be read in time.
    pub async fn tail_logs(&self, container_id: &str, tail: usize) -> String {
        match tokio::time::timeout(FAILURE_LOG_TIMEOUT, self.logs(container_id, tail)).await {
            Ok(Ok(text)) => text,
            Ok(Err(err)) => {
                tracing::debug!(container = %container_id, error = %err, "could not read logs");
                String::new()
            }
            Err(_) => String::new(),
        }
    }

    /// The last `tail` log lines of a container.
    pub async fn logs(&self, container_id: &str, tail: usize) -> Result<String, ShimletError> {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(&tail.to_string())
            .build();
        let mut stream = self.docker.logs(container_id, Some(options));
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| classify(&format!("reading logs of {container_id}"), e))?;
            text.push_str(&String::from_utf8_lossy(chunk.as_ref()));
        }
        Ok(text)
    }

    /// Stops (gracefully, when asked) and removes a container. `Ok(false)`: Docker is already
    /// removing it; ask again.
    pub async fn remove(&self, container_id: &str, graceful: bool) -> Result<bool, ShimletError> {
        if graceful {
            let grace = i32::try_from(self.config.stop_grace_period_secs).unwrap_or(i32::MAX);
            let options = StopContainerOptionsBuilder::new().t(grace).build();
            match self
                .docker
                .stop_container(container_id, Some(options))
                .await
            {
                // 304: already stopped; 404: already gone.
                Ok(()) => {}
                Err(err) if matches!(status_of(&err), Some(304 | 404)) => {}
                // Removing with force kills it anyway.
                Err(err) => {
                    tracing::warn!(container = %container_id, error = %err, "stop failed; removing by force")
                }
            }
        }
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        let result = match self
            .docker
            .remove_container(container_id, Some(options))
            .await
        {
            Ok(()) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(true),
            Err(err)
                if status_of(&err) == Some(409)
                    && err.to_string().contains("already in progress") =>
            {
                Ok(false)
            }
            Err(err) => Err(classify(&format!("removing container {container_id}"), err)),
        };
        if matches!(result, Ok(true)) {
            self.forget(container_id);
        }
        result
    }
}

/// The service id and replica index a listed container is labelled with.
pub(crate) fn identity(container: &ContainerSummary) -> Option<(String, u32)> {
    let labels = container.labels.as_ref()?;
    Some((
        labels.get(LABEL_SERVICE_ID)?.clone(),
        labels.get(LABEL_REPLICA)?.parse().ok()?,
    ))
}
