//! [`K8sShimlet`]: the [`Shimlet`] trait over the Kubernetes API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams};
use kube::{Client, Resource};
use shim_core::{
    ClusterGpus, FailureReason, ManagedWorkload, Notifier, Removal, Shimlet, ShimletContext,
    ShimletError, WorkloadObservation, WorkloadSpec,
};
use tokio::task::AbortHandle;

use crate::client::{check_access, connect};
use crate::config::K8sConfig;
use crate::errors::{classify, is_not_found, timed};
use crate::names::{
    CONTAINER_NAME, FIELD_MANAGER, MANAGED_SELECTOR, service_id_of, service_selector,
};
use crate::nodes::Nodes;
use crate::render::{Manifests, Renderer};
use crate::status::{EndpointResolver, spec_generation};
use crate::view::{View, spawn_watches};

/// Shortest wait for the first list of every watched kind at start-up.
const MIN_SYNC_WAIT: Duration = Duration::from_secs(10);

/// Runs each workload as a Deployment plus a Service in one namespace, observed through watches.
/// See the [crate docs](crate).
pub struct K8sShimlet {
    inner: Arc<Inner>,
    watches: Vec<AbortHandle>,
}

struct Inner {
    namespace: String,
    origin: String,
    timeout: Duration,
    renderer: Renderer,
    view: Arc<View>,
    /// The nodes' GPUs; `None` with `watchNodes: false`.
    nodes: Option<Arc<Nodes>>,
    deployments: Api<Deployment>,
    services: Api<Service>,
    pods: Api<Pod>,
}

impl std::fmt::Debug for K8sShimlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sShimlet")
            .field("cluster", &self.inner.origin)
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

impl Drop for K8sShimlet {
    fn drop(&mut self) {
        for watch in &self.watches {
            watch.abort();
        }
    }
}

impl K8sShimlet {
    /// Connects with the `shimlets.k8s` section of the context's configuration.
    ///
    /// # Errors
    /// [`FailureReason::InvalidSpec`] for a bad config section or a missing namespace;
    /// [`FailureReason::RuntimeError`] when no configuration is found, the API server does not
    /// answer, or the shim may not list what it manages. Each message says what to change.
    pub async fn connect(ctx: ShimletContext) -> Result<Self, ShimletError> {
        let config: K8sConfig = ctx
            .settings
            .section_as(&["shimlets", "k8s"])
            .map_err(|e| ShimletError::permanent(FailureReason::InvalidSpec, e))?;
        config
            .validate()
            .map_err(|e| ShimletError::permanent(FailureReason::InvalidSpec, e))?;
        let (client, origin) = connect(&config).await?;
        let shimlet = Self::start(
            client,
            origin,
            config,
            ctx.settings.policy.model_root.clone(),
            ctx.notifier,
        )
        .await?;
        shimlet.set_max_restarts(ctx.settings.max_restarts);
        Ok(shimlet)
    }

    /// Starts on a client built by the caller (a custom service stack, or a mock API server in
    /// tests): checks access, starts the watches and waits for their first list.
    ///
    /// # Errors
    /// As [`K8sShimlet::connect`].
    pub async fn with_client(
        client: Client,
        config: K8sConfig,
        model_root: PathBuf,
        notifier: Notifier,
    ) -> Result<Self, ShimletError> {
        config
            .validate()
            .map_err(|e| ShimletError::permanent(FailureReason::InvalidSpec, e))?;
        Self::start(
            client,
            "the Kubernetes API server".into(),
            config,
            model_root,
            notifier,
        )
        .await
    }

    async fn start(
        client: Client,
        origin: String,
        config: K8sConfig,
        model_root: PathBuf,
        notifier: Notifier,
    ) -> Result<Self, ShimletError> {
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let timeout = Duration::from_secs(config.timeout_secs);
        check_access(&client, &namespace, &origin, timeout).await?;
        let replicas = config.effective_replica_addresses();
        let view = Arc::new(View::new(
            EndpointResolver::new(&config, &namespace),
            replicas,
            notifier,
        ));
        let deployments = Api::namespaced(client.clone(), &namespace);
        let services = Api::namespaced(client.clone(), &namespace);
        let pods = Api::namespaced(client.clone(), &namespace);
        let mut watches = spawn_watches(
            &view,
            Api::clone(&deployments),
            Api::clone(&services),
            Api::clone(&pods),
            Api::namespaced(client.clone(), &namespace),
        );
        let nodes = config.watch_nodes.then(|| {
            let nodes = Arc::new(Nodes::new(config.accelerator_resource.clone()));
            watches.push(crate::nodes::spawn_watch(&nodes, Api::all(client)));
            nodes
        });
        let shimlet = Self {
            inner: Arc::new(Inner {
                renderer: Renderer::new(config, namespace.clone(), model_root),
                namespace,
                origin,
                timeout,
                view,
                nodes,
                deployments,
                services,
                pods,
            }),
            watches,
        };
        let inner = &shimlet.inner;
        // Until the first lists are in, every service would read as missing and be re-applied.
        inner
            .view
            .wait_synced(timeout.max(MIN_SYNC_WAIT))
            .await
            .map_err(|e| {
                ShimletError::permanent(
                    FailureReason::RuntimeError,
                    format!("{e} in namespace {:?} on {}", inner.namespace, inner.origin),
                )
            })?;
        if let Some(nodes) = &inner.nodes {
            // Not a reason to refuse to start (the fit check then says memory unknown), but the
            // first requests should be checked against the nodes when they can be.
            nodes.wait_answered(timeout.min(MIN_SYNC_WAIT)).await;
        }
        tracing::info!(
            cluster = %inner.origin,
            namespace = %inner.namespace,
            services = inner.view.len(),
            replica_addresses = ?replicas,
            "Kubernetes shimlet connected"
        );
        Ok(shimlet)
    }

    /// The namespace workloads go to.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The configuration in force.
    pub fn config(&self) -> &K8sConfig {
        self.inner.renderer.config()
    }

    /// Sends later change notifications to `notifier`: for embedders that start the shimlet
    /// before the engine whose notifier it should use (`EngineBuilder::shimlet_instance`).
    pub fn set_notifier(&self, notifier: Notifier) {
        self.inner.view.set_notifier(notifier);
    }

    /// Sets `engine.maxRestarts` (the engine's default until called; [`K8sShimlet::connect`]
    /// takes it from the engine's settings): a crash-looping or OOM-killed container fails its
    /// service only once its `restartCount` exceeds it.
    pub fn set_max_restarts(&self, max_restarts: u32) {
        self.inner.view.set_max_restarts(max_restarts);
    }

    /// The Deployment and Service `apply` would send for `workload`.
    ///
    /// # Errors
    /// As [`Renderer::render`].
    pub fn manifests(&self, workload: &WorkloadSpec) -> Result<Manifests, ShimletError> {
        self.inner.renderer.render(workload)
    }
}

impl Inner {
    fn params() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    /// Server-side applies both objects; returns the Deployment's `metadata.generation`.
    async fn apply_objects(&self, m: &Manifests) -> Result<i64, ShimletError> {
        let deployment = timed(
            self.timeout,
            &format!("applying Deployment {}", m.name),
            self.deployments
                .patch(&m.name, &Self::params(), &Patch::Apply(&m.deployment)),
        )
        .await?;
        let generation = deployment.metadata.generation.unwrap_or(0);
        timed(
            self.timeout,
            &format!("applying Service {}", m.name),
            self.services
                .patch(&m.name, &Self::params(), &Patch::Apply(&m.service)),
        )
        .await?;
        Ok(generation)
    }

    /// Deletes objects of `service_id` left from an earlier name (the model was renamed).
    async fn delete_leftovers(&self, service_id: &str, current: &str) -> Result<(), ShimletError> {
        let (deployments, services) = self.names_in_view(service_id);
        for name in deployments.iter().filter(|n| n.as_str() != current) {
            tracing::info!(%service_id, deployment = %name, "deleting a Deployment left from an earlier model name");
            self.delete_one(&self.deployments, "Deployment", name)
                .await?;
        }
        for name in services.iter().filter(|n| n.as_str() != current) {
            self.delete_one(&self.services, "Service", name).await?;
        }
        Ok(())
    }

    /// Names of the Deployments and Services the view holds for `service_id`.
    fn names_in_view(&self, service_id: &str) -> (Vec<String>, Vec<String>) {
        self.view.with_objects(service_id, |o| {
            (
                o.deployments.iter().map(|d| d.name.to_string()).collect(),
                o.services.iter().map(|s| s.name.to_string()).collect(),
            )
        })
    }

    /// Asks for an object's removal, foreground: the Deployment goes only after its pods, so
    /// "gone" means the accelerators are free. `true` when the object no longer exists.
    async fn delete_one<K>(
        &self,
        api: &Api<K>,
        kind: &str,
        name: &str,
    ) -> Result<bool, ShimletError>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let what = format!("deleting {kind} {name}");
        match tokio::time::timeout(self.timeout, api.delete(name, &DeleteParams::foreground()))
            .await
        {
            Ok(Ok(_)) => Ok(false),
            Ok(Err(err)) if is_not_found(&err) => Ok(true),
            Ok(Err(err)) => Err(classify(&what, err)),
            Err(_) => Err(ShimletError::unavailable(format!(
                "{what}: the Kubernetes API server did not answer within {:?}",
                self.timeout
            ))),
        }
    }
}

#[async_trait]
impl Shimlet for K8sShimlet {
    async fn apply(&self, workload: &WorkloadSpec) -> Result<(), ShimletError> {
        let inner = &self.inner;
        let mut manifests = inner.renderer.render(workload)?;
        let id = &workload.service_id;
        // With desired state in ModelServices (`--store kubernetes`), the objects belong to theirs.
        if let Some(uid) = crate::store::owner_uid(&inner.origin, inner.renderer.namespace(), id) {
            manifests.owned_by(id, &uid);
        }
        // A service that waits (unschedulable, loading) runs its pipeline again and again; when
        // the cluster already holds exactly what this generation applied, sending it again
        // would only cost API server requests.
        if inner
            .view
            .holds_applied(id, &manifests.name, workload.generation, workload.replicas)
        {
            return inner.delete_leftovers(id, &manifests.name).await;
        }
        let previous = inner
            .view
            .begin_apply(id, workload.generation, workload.replicas);
        match inner.apply_objects(&manifests).await {
            Ok(generation) => inner.view.finish_apply(
                id,
                &manifests.name,
                generation,
                workload.generation,
                workload.replicas,
            ),
            Err(err) => {
                inner.view.abort_apply(id, previous);
                return Err(err);
            }
        }
        inner.delete_leftovers(id, &manifests.name).await
    }

    async fn observe(&self, service_id: &str) -> Result<WorkloadObservation, ShimletError> {
        Ok(self.inner.view.observe(service_id))
    }

    async fn delete(&self, service_id: &str) -> Result<Removal, ShimletError> {
        let inner = &self.inner;
        let selector = ListParams::default().labels(&service_selector(service_id));
        let deployments = timed(
            inner.timeout,
            &format!("listing Deployments of {service_id}"),
            inner.deployments.list(&selector),
        )
        .await?;
        let services = timed(
            inner.timeout,
            &format!("listing Services of {service_id}"),
            inner.services.list(&selector),
        )
        .await?;
        let mut gone = true;
        for name in deployments
            .items
            .iter()
            .filter_map(|d| d.metadata.name.as_deref())
        {
            gone &= inner
                .delete_one(&inner.deployments, "Deployment", name)
                .await?;
        }
        for name in services
            .items
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
        {
            gone &= inner.delete_one(&inner.services, "Service", name).await?;
        }
        if gone {
            inner.view.forget(service_id);
            Ok(Removal::Gone)
        } else {
            Ok(Removal::InProgress)
        }
    }

    async fn list(&self) -> Result<Vec<ManagedWorkload>, ShimletError> {
        let inner = &self.inner;
        let managed = ListParams::default().labels(MANAGED_SELECTOR);
        let deployments = timed(
            inner.timeout,
            "listing managed Deployments",
            inner.deployments.list(&managed),
        )
        .await?;
        let services = timed(
            inner.timeout,
            "listing managed Services",
            inner.services.list(&managed),
        )
        .await?;
        let mut found: BTreeMap<String, (Option<u64>, Vec<String>)> = BTreeMap::new();
        for deployment in &deployments.items {
            let Some(id) = service_id_of(deployment.metadata.labels.as_ref()) else {
                continue;
            };
            let entry = found.entry(id.to_string()).or_default();
            entry.0 = entry.0.max(spec_generation(deployment));
            entry.1.extend(deployment.metadata.name.clone());
        }
        // A Service whose Deployment is gone is managed too (a half-finished delete).
        for service in &services.items {
            let Some(id) = service_id_of(service.metadata.labels.as_ref()) else {
                continue;
            };
            let entry = found.entry(id.to_string()).or_default();
            if entry.1.is_empty() {
                entry.1.extend(service.metadata.name.clone());
            }
        }
        Ok(found
            .into_iter()
            .map(|(service_id, (generation, names))| ManagedWorkload {
                service_id,
                generation,
                name: names.join(","),
            })
            .collect())
    }

    async fn logs(&self, service_id: &str, tail: usize) -> Result<String, ShimletError> {
        let inner = &self.inner;
        let pods: Vec<String> = inner.view.with_objects(service_id, |o| {
            o.pods
                .iter()
                .filter(|p| !p.deleting)
                .map(|p| p.name.to_string())
                .collect()
        });
        if pods.is_empty() {
            return Err(ShimletError::permanent(
                FailureReason::WorkloadMissing,
                format!("service {service_id} has no pods"),
            ));
        }
        let params = LogParams {
            container: Some(CONTAINER_NAME.into()),
            tail_lines: Some(i64::try_from(tail).unwrap_or(i64::MAX)),
            ..LogParams::default()
        };
        let mut text = String::new();
        for pod in &pods {
            let logs = timed(
                inner.timeout,
                &format!("reading the logs of pod {pod}"),
                inner.pods.logs(pod, &params),
            )
            .await?;
            if pods.len() == 1 {
                return Ok(logs);
            }
            // Several replicas: one section each, headed like `tail` does for several files.
            text.push_str(&format!("==> {pod} <==\n{logs}"));
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        Ok(text)
    }

    async fn render(&self, workload: &WorkloadSpec) -> Result<serde_json::Value, ShimletError> {
        Ok(self.inner.renderer.render(workload)?.to_list())
    }

    fn cluster_gpus(&self) -> Option<ClusterGpus> {
        Some(match &self.inner.nodes {
            Some(nodes) => nodes.gpus(),
            None => ClusterGpus::Unknown("shimlets.k8s.watchNodes is false".into()),
        })
    }
}
