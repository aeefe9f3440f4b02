//! The in-memory view of the cluster that `observe` reads: kube-runtime watchers on the managed
//! Deployments, Services and Pods (label `app.kubernetes.io/managed-by=xmod-shim`) feed it, indexed
//! by service id, and every change tells the engine through its [`Notifier`].
//!
//! Of each object the view keeps only a small projection ([`crate::kept`]): the facts the status
//! rules, the drift checks and the shimlet read, never the k8s-openapi object itself. The
//! service id comes from the object's labels as it arrives, so no label is kept either.
//!
//! With `replicaAddresses: pods` a fourth watcher follows the managed Services' EndpointSlices
//! (the EndpointSlice controller copies a Service's labels onto its slices), of which the view
//! keeps only the base URL of each ready endpoint: those are the replica addresses `observe`
//! reports, so the gateway balances over the pods themselves.
//!
//! Relists (at start, and after a watch broke for longer than the server keeps history) follow
//! kube-runtime's protocol: objects arrive between `Init` and `InitDone` and replace that kind's
//! objects in one step, so a read never sees a half-listed cluster.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt as _, watcher as watch_stream};
use serde::de::DeserializeOwned;
use shim_core::{Notifier, WorkloadObservation, WorkloadState};
use tokio::task::AbortHandle;

use crate::config::ReplicaAddresses;
use crate::kept::{ByName, DeploymentFacts, Named, PodFacts, ServiceFacts};
use crate::names::{MANAGED_SELECTOR, PORT_NAME, service_id_of};
use crate::status::{self, ApplyMark, EndpointResolver, ServiceObjects};

/// The kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Deployment = 0,
    Service = 1,
    Pod = 2,
    EndpointSlice = 3,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Deployment,
        Kind::Service,
        Kind::Pod,
        Kind::EndpointSlice,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Self::Deployment => "deployments",
            Self::Service => "services",
            Self::Pod => "pods",
            Self::EndpointSlice => "endpointslices",
        }
    }
}

/// A watched kind: what the view keeps of one object, and where, in a service's entry and in
/// the relist buffer.
pub(crate) trait Tracked:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: Kind;
    /// What the view keeps of one object.
    type Kept: Named + Debug + Send + Sync;
    fn keep(self) -> Self::Kept;
    fn slot(entry: &mut Entry) -> &mut ByName<Self::Kept>;
    fn buffer(buffers: &mut Buffers) -> &mut Listed<Self::Kept>;
    /// A Deployment's `metadata.generation` and spec generation, which the apply marks follow.
    fn generations(_kept: &Self::Kept) -> Option<(Option<i64>, Option<u64>)> {
        None
    }
}

impl Tracked for Deployment {
    const KIND: Kind = Kind::Deployment;
    type Kept = DeploymentFacts;
    fn keep(self) -> DeploymentFacts {
        self.into()
    }
    fn slot(entry: &mut Entry) -> &mut ByName<DeploymentFacts> {
        &mut entry.objects.deployments
    }
    fn buffer(buffers: &mut Buffers) -> &mut Listed<DeploymentFacts> {
        &mut buffers.deployments
    }
    fn generations(kept: &DeploymentFacts) -> Option<(Option<i64>, Option<u64>)> {
        Some((kept.generation, kept.spec_generation))
    }
}

impl Tracked for Service {
    const KIND: Kind = Kind::Service;
    type Kept = ServiceFacts;
    fn keep(self) -> ServiceFacts {
        self.into()
    }
    fn slot(entry: &mut Entry) -> &mut ByName<ServiceFacts> {
        &mut entry.objects.services
    }
    fn buffer(buffers: &mut Buffers) -> &mut Listed<ServiceFacts> {
        &mut buffers.services
    }
}

impl Tracked for Pod {
    const KIND: Kind = Kind::Pod;
    type Kept = PodFacts;
    fn keep(self) -> PodFacts {
        self.into()
    }
    fn slot(entry: &mut Entry) -> &mut ByName<PodFacts> {
        &mut entry.objects.pods
    }
    fn buffer(buffers: &mut Buffers) -> &mut Listed<PodFacts> {
        &mut buffers.pods
    }
}

impl Tracked for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    type Kept = SliceAddresses;
    fn keep(self) -> SliceAddresses {
        SliceAddresses::of(&self)
    }
    fn slot(entry: &mut Entry) -> &mut ByName<SliceAddresses> {
        &mut entry.slices
    }
    fn buffer(buffers: &mut Buffers) -> &mut Listed<SliceAddresses> {
        &mut buffers.slices
    }
}

/// What a relist in progress delivered of one kind: each managed object's service id and what
/// the view keeps of it; `None` when no relist is under way.
pub(crate) type Listed<T> = Option<Vec<(String, T)>>;

/// Objects of a relist in progress, per kind.
#[derive(Default)]
pub(crate) struct Buffers {
    deployments: Listed<DeploymentFacts>,
    services: Listed<ServiceFacts>,
    pods: Listed<PodFacts>,
    slices: Listed<SliceAddresses>,
}

/// All the view keeps of an EndpointSlice: its name, its Service and its ready endpoints' base
/// URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SliceAddresses {
    name: Box<str>,
    /// The Service the slice belongs to (label `kubernetes.io/service-name`).
    service: Box<str>,
    /// `http://<address>:<port>` of every ready endpoint.
    ready: Box<[Box<str>]>,
}

impl Named for SliceAddresses {
    fn name(&self) -> &str {
        &self.name
    }
}

impl SliceAddresses {
    /// The label the EndpointSlice controller puts on every slice it makes for a Service.
    const SERVICE_NAME_LABEL: &'static str = "kubernetes.io/service-name";

    fn of(slice: &EndpointSlice) -> Self {
        let name = slice.metadata.name.as_deref().unwrap_or_default().into();
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(Self::SERVICE_NAME_LABEL))
            .map(String::as_str)
            .unwrap_or_default()
            .into();
        let ports = slice.ports.as_deref().unwrap_or_default();
        // The engine's port is the one named `http`; a Service with one unnamed port has it first.
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(PORT_NAME))
            .or_else(|| ports.first())
            .and_then(|p| p.port);
        let ipv6 = slice.address_type == "IPv6";
        let ready = match port {
            None => Box::default(),
            Some(port) => slice
                .endpoints
                .iter()
                // The API: an unset `ready` is to be read as ready.
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                // Consumers use the first address; the others are the same pod's.
                .filter_map(|e| e.addresses.first())
                .map(|address| {
                    if ipv6 {
                        format!("http://[{address}]:{port}").into()
                    } else {
                        format!("http://{address}:{port}").into()
                    }
                })
                .collect(),
        };
        Self {
            name,
            service,
            ready,
        }
    }
}

/// One service: its objects and what this shimlet last applied.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    objects: ServiceObjects,
    /// Its EndpointSlices, by name (`replicaAddresses: pods` only).
    slices: ByName<SliceAddresses>,
    mark: Option<ApplyMark>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.slices.is_empty()
    }

    /// The ready pods' base URLs behind the Service of the live Deployment, sorted, each once
    /// (an endpoint may show in two slices while the controller moves it).
    fn pod_addresses(&self) -> Option<Vec<String>> {
        let name = &self.objects.deployment()?.name;
        let addresses: BTreeSet<&str> = self
            .slices
            .iter()
            .filter(|s| s.service == *name)
            .flat_map(|s| s.ready.iter().map(AsRef::as_ref))
            .collect();
        Some(addresses.into_iter().map(str::to_string).collect())
    }
}

#[derive(Default)]
struct State {
    services: HashMap<String, Entry>,
    buffers: Buffers,
}

/// The view; see the [module docs](self).
pub(crate) struct View {
    state: RwLock<State>,
    endpoints: EndpointResolver,
    replicas: ReplicaAddresses,
    /// The kinds watched, as bits of [`Kind::bit`].
    watched: u8,
    synced: tokio::sync::watch::Sender<u8>,
    /// The last error of each watch, for start-up messages.
    errors: Mutex<[Option<String>; 4]>,
    /// Told of every service whose objects changed.
    notifier: RwLock<Notifier>,
    /// `engine.maxRestarts`: restarts of a crashing container before its service fails.
    max_restarts: AtomicU32,
}

impl View {
    /// A view of Deployments, Services and Pods, and with `replicas` [`ReplicaAddresses::Pods`]
    /// of EndpointSlices too.
    pub(crate) fn new(
        endpoints: EndpointResolver,
        replicas: ReplicaAddresses,
        notifier: Notifier,
    ) -> Self {
        let watched = Kind::ALL
            .into_iter()
            .filter(|k| *k != Kind::EndpointSlice || replicas == ReplicaAddresses::Pods)
            .fold(0, |bits, k| bits | k.bit());
        Self {
            state: RwLock::default(),
            endpoints,
            replicas,
            watched,
            synced: tokio::sync::watch::channel(0).0,
            errors: Mutex::default(),
            notifier: RwLock::new(notifier),
            max_restarts: AtomicU32::new(shim_core::EngineConfig::default().max_restarts),
        }
    }

    /// Sets how often a crashing container may restart before its service fails.
    pub(crate) fn set_max_restarts(&self, max_restarts: u32) {
        self.max_restarts.store(max_restarts, Ordering::Relaxed);
    }

    /// Sends later changes to `notifier`.
    pub(crate) fn set_notifier(&self, notifier: Notifier) {
        *self.notifier.write().unwrap_or_else(|e| e.into_inner()) = notifier;
    }

    fn notify(&self, ids: &BTreeSet<String>) {
        let notifier = self.notifier.read().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            notifier.changed(id);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is one step).
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// What the view shows for a service: memory only, never the API server.
    pub(crate) fn observe(&self, service_id: &str) -> WorkloadObservation {
        let state = self.read();
        let Some(entry) = state.services.get(service_id) else {
            return WorkloadObservation::missing();
        };
        let mut seen = status::observe(
            &entry.objects,
            entry.mark.as_ref(),
            &self.endpoints,
            service_id,
            self.max_restarts.load(Ordering::Relaxed),
        );
        if self.replicas == ReplicaAddresses::Pods && seen.state != WorkloadState::Missing {
            // Every ready pod, also while others start or fail: the engine keeps those serving.
            if let Some(pods) = entry.pod_addresses() {
                seen.replica_addresses = pods;
            }
        }
        seen
    }

    /// Runs `f` on a service's objects (empty when unknown).
    pub(crate) fn with_objects<R>(
        &self,
        service_id: &str,
        f: impl FnOnce(&ServiceObjects) -> R,
    ) -> R {
        let state = self.read();
        match state.services.get(service_id) {
            Some(entry) => f(&entry.objects),
            None => f(&ServiceObjects::default()),
        }
    }

    /// Services in the view.
    pub(crate) fn len(&self) -> usize {
        self.read().services.len()
    }

    /// Whether the cluster holds what the last apply of `spec_generation` sent, untouched: the
    /// Deployment `name` at the generation that apply produced (so nobody changed or deleted
    /// it since) with as many replicas, and its Service.
    pub(crate) fn holds_applied(
        &self,
        service_id: &str,
        name: &str,
        spec_generation: u64,
        replicas: u32,
    ) -> bool {
        let state = self.read();
        let Some(entry) = state.services.get(service_id) else {
            return false;
        };
        let Some(mark) = entry.mark else {
            return false;
        };
        let deployment_untouched = entry
            .objects
            .deployments
            .get(name)
            .is_some_and(|d| !d.deleting && d.generation == Some(mark.object_generation));
        !mark.in_flight
            && mark.spec_generation == spec_generation
            && mark.replicas == replicas
            && deployment_untouched
            && entry.objects.service(name).is_some()
    }

    /// Notes that an apply starts; returns the mark to restore if it fails.
    pub(crate) fn begin_apply(
        &self,
        service_id: &str,
        spec_generation: u64,
        replicas: u32,
    ) -> Option<ApplyMark> {
        let mut state = self.write();
        let entry = state.services.entry(service_id.to_string()).or_default();
        let previous = entry.mark;
        entry.mark = Some(match previous {
            Some(mark) => ApplyMark {
                in_flight: true,
                ..mark
            },
            None => ApplyMark {
                object_generation: i64::MAX,
                spec_generation,
                replicas,
                seen: false,
                in_flight: true,
            },
        });
        previous
    }

    /// Records a Deployment apply's answer (its `metadata.generation`).
    pub(crate) fn finish_apply(
        &self,
        service_id: &str,
        name: &str,
        object_generation: i64,
        spec_generation: u64,
        replicas: u32,
    ) {
        let mut state = self.write();
        let entry = state.services.entry(service_id.to_string()).or_default();
        // The watch may have been quicker than the answer.
        let seen = entry
            .objects
            .deployments
            .get(name)
            .and_then(|d| d.generation)
            .is_some_and(|g| g >= object_generation);
        entry.mark = Some(ApplyMark {
            object_generation,
            spec_generation,
            replicas,
            seen,
            in_flight: false,
        });
    }

    /// Puts back the mark from before a failed apply.
    pub(crate) fn abort_apply(&self, service_id: &str, previous: Option<ApplyMark>) {
        let mut state = self.write();
        if let Some(entry) = state.services.get_mut(service_id) {
            entry.mark = previous;
            if entry.mark.is_none() && entry.is_empty() {
                state.services.remove(service_id);
            }
        }
    }

    /// Forgets a service whose objects are gone.
    pub(crate) fn forget(&self, service_id: &str) {
        let mut state = self.write();
        if let Some(entry) = state.services.get_mut(service_id) {
            entry.mark = None;
            if entry.is_empty() {
                state.services.remove(service_id);
            }
        }
    }

    /// Applies one watch event; returns the service ids whose objects changed.
    pub(crate) fn apply_event<K: Tracked>(&self, event: Event<K>) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        let mut state = self.write();
        match event {
            Event::Init => *K::buffer(&mut state.buffers) = Some(Vec::new()),
            Event::InitApply(object) => {
                // Objects without a service id are not the view's.
                if let Some(id) = service_id(&object) {
                    K::buffer(&mut state.buffers)
                        .get_or_insert_with(Vec::new)
                        .push((id, object.keep()));
                }
            }
            Event::InitDone => {
                let listed = K::buffer(&mut state.buffers).take().unwrap_or_default();
                for (id, entry) in &mut state.services {
                    let slot = K::slot(entry);
                    if !slot.is_empty() {
                        slot.clear();
                        changed.insert(id.clone());
                    }
                }
                for (id, kept) in listed {
                    insert::<K>(&mut state, &id, kept);
                    changed.insert(id);
                }
                state
                    .services
                    .retain(|_, e| e.mark.is_some() || !e.is_empty());
                drop(state);
                self.synced.send_modify(|bits| *bits |= K::KIND.bit());
                return changed;
            }
            Event::Apply(object) => {
                if let Some(id) = service_id(&object) {
                    insert::<K>(&mut state, &id, object.keep());
                    changed.insert(id);
                }
            }
            Event::Delete(object) => {
                if let Some(id) = service_id(&object) {
                    let name = object.meta().name.as_deref().unwrap_or_default();
                    if let Some(entry) = state.services.get_mut(&id) {
                        K::slot(entry).remove(name);
                        if entry.mark.is_none() && entry.is_empty() {
                            state.services.remove(&id);
                        }
                    }
                    changed.insert(id);
                }
            }
        }
        changed
    }

    fn record_error(&self, kind: Kind, error: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        errors[kind as usize] = Some(error);
    }

    /// Waits until every kind has been listed once; on timeout, says which have not and why.
    pub(crate) async fn wait_synced(&self, timeout: Duration) -> Result<(), String> {
        let mut synced = self.synced.subscribe();
        let watched = self.watched;
        let done =
            tokio::time::timeout(timeout, synced.wait_for(|bits| *bits & watched == watched)).await;
        if matches!(done, Ok(Ok(_))) {
            return Ok(());
        }
        let bits = *self.synced.borrow();
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let missing: Vec<String> = Kind::ALL
            .into_iter()
            .filter(|k| watched & k.bit() != 0 && bits & k.bit() == 0)
            .map(|k| match (&errors[k as usize], k) {
                (Some(error), Kind::EndpointSlice) => format!(
                    "{} ({error}; they give the pods' addresses: grant list and watch on them \
                     as deploy/rbac.yaml does, or set shimlets.k8s.replicaAddresses: service)",
                    k.plural()
                ),
                (Some(error), _) => format!("{} ({error})", k.plural()),
                (None, _) => k.plural().to_string(),
            })
            .collect();
        Err(format!(
            "could not list and watch managed {} within {timeout:?}",
            missing.join(", ")
        ))
    }
}

/// The service id of a managed object (its labels), `None` for others.
fn service_id<K: Resource>(object: &K) -> Option<String> {
    service_id_of(object.meta().labels.as_ref()).map(str::to_string)
}

/// Puts what the view keeps of an object in the entry of its service `id`.
fn insert<K: Tracked>(state: &mut State, id: &str, kept: K::Kept) {
    let entry = state.services.entry(id.to_string()).or_default();
    if let Some((generation, applied)) = K::generations(&kept) {
        let generation = generation.unwrap_or(0);
        match &mut entry.mark {
            Some(mark) if !mark.seen && generation >= mark.object_generation => mark.seen = true,
            Some(_) => {}
            // First sight of a Deployment this process did not apply (a restart): later
            // changes are compared with what it is now.
            None => {
                entry.mark = Some(ApplyMark::adopted(generation, applied.unwrap_or(0), 0));
            }
        }
    }
    K::slot(entry).insert(kept);
}

/// Starts the watches (EndpointSlices' only when the view uses them); the tasks stop when the
/// view is dropped or the handles are aborted.
pub(crate) fn spawn_watches(
    view: &Arc<View>,
    deployments: Api<Deployment>,
    services: Api<Service>,
    pods: Api<Pod>,
    slices: Api<EndpointSlice>,
) -> Vec<AbortHandle> {
    let mut handles = vec![
        tokio::spawn(watch(deployments, Arc::downgrade(view))).abort_handle(),
        tokio::spawn(watch(services, Arc::downgrade(view))).abort_handle(),
        tokio::spawn(watch(pods, Arc::downgrade(view))).abort_handle(),
    ];
    if view.watched & Kind::EndpointSlice.bit() != 0 {
        handles.push(tokio::spawn(watch(slices, Arc::downgrade(view))).abort_handle());
    }
    handles
}

async fn watch<K: Tracked>(api: Api<K>, view: Weak<View>) {
    let config = watcher::Config::default().labels(MANAGED_SELECTOR);
    loop {
        // Backs off between failed attempts (API server away, RBAC missing) instead of
        // spinning, but never for long: a service converges only once its watch is back.
        let mut events = std::pin::pin!(
            watch_stream(api.clone(), config.clone()).backoff(WatchBackoff::default())
        );
        let mut relist = false;
        while let Some(item) = events.next().await {
            let Some(view) = view.upgrade() else {
                return;
            };
            match item {
                Ok(event) => {
                    let changed = view.apply_event(event);
                    view.notify(&changed);
                }
                Err(err) => {
                    let message = err.to_string();
                    tracing::warn!(kind = K::KIND.plural(), error = %message, "Kubernetes watch failed; retrying");
                    view.record_error(K::KIND, message.clone());
                    relist = resource_version_ahead(&message);
                    if relist {
                        break;
                    }
                }
            }
        }
        if !relist {
            return;
        }
        // A restarted API server's watch cache can lag behind the resource version this watch
        // last saw, and refuses to resume from it ("Too large resource version") until it
        // catches up, which may take a minute. Listing anew is at once and loses nothing.
        tracing::info!(
            kind = K::KIND.plural(),
            "the API server is behind this watch's resource version; listing anew"
        );
    }
}

/// Whether a watch error says the API server has not reached the resource version the watch
/// asked to resume from.
fn resource_version_ahead(message: &str) -> bool {
    message.contains("Too large resource version")
}

/// Retry delays of a failed watch: 250 ms doubling to at most 4 s, started afresh once events
/// flow again. (kube's default waits up to 30 s, which would hold up convergence after an API
/// server outage by as much.)
#[derive(Debug, Clone, Copy)]
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(250);
    const CAP: Duration = Duration::from_secs(4);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use shim_core::WorkloadState;

    use super::*;
    use crate::config::K8sConfig;

    fn view() -> View {
        View::new(
            EndpointResolver::new(&K8sConfig::default(), "models"),
            ReplicaAddresses::Service,
            Notifier::detached(),
        )
    }

    fn labels(id: &str) -> serde_json::Value {
        json!({"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": id})
    }

    fn deployment(id: &str, generation: i64) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": format!("xmod-{id}"), "generation": generation, "labels": labels(id),
                "managedFields": [{"manager": "xmod-shim", "operation": "Apply"}]},
            "spec": {"replicas": 1, "selector": {}, "template": {}},
            "status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1},
        }))
        .unwrap()
    }

    fn service(id: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": format!("xmod-{id}"), "labels": labels(id)},
            "spec": {"ports": [{"port": 8000}]},
        }))
        .unwrap()
    }

    fn ids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_relist_replaces_one_kind_at_once_and_names_every_service_it_touched() {
        let v = view();
        assert!(v.apply_event(Event::<Deployment>::Init).is_empty());
        v.apply_event(Event::InitApply(deployment("a", 1)));
        v.apply_event(Event::InitApply(deployment("b", 1)));
        // Nothing is visible before InitDone.
        assert_eq!(v.observe("a").state, WorkloadState::Missing);
        assert_eq!(
            v.apply_event(Event::<Deployment>::InitDone),
            ids(&["a", "b"])
        );
        v.apply_event(Event::<Service>::Init);
        v.apply_event(Event::InitApply(service("a")));
        v.apply_event(Event::<Service>::InitDone);
        assert_eq!(v.observe("a").state, WorkloadState::Ready);
        assert_eq!(
            v.observe("b").state,
            WorkloadState::Starting,
            "no Service yet"
        );
        // The view keeps the facts status reads, by name.
        v.with_objects("a", |o| {
            let d = o.deployments.get("xmod-a").unwrap();
            assert_eq!((d.generation, d.replicas), (Some(1), 1));
        });

        // After a broken watch, b was deleted and c created while nobody listened.
        v.apply_event(Event::<Deployment>::Init);
        v.apply_event(Event::InitApply(deployment("a", 1)));
        v.apply_event(Event::InitApply(deployment("c", 1)));
        assert_eq!(
            v.apply_event(Event::<Deployment>::InitDone),
            ids(&["a", "b", "c"])
        );
        assert_eq!(v.observe("b").state, WorkloadState::Missing);
        assert_eq!(
            v.observe("a").state,
            WorkloadState::Ready,
            "Services untouched"
        );
    }

    #[test]
    fn events_update_one_service_and_foreign_objects_are_ignored() {
        let v = view();
        assert_eq!(v.apply_event(Event::Apply(deployment("a", 1))), ids(&["a"]));
        assert_eq!(v.apply_event(Event::Apply(service("a"))), ids(&["a"]));
        assert_eq!(v.observe("a").state, WorkloadState::Ready);
        let mut foreign = deployment("x", 1);
        foreign.metadata.labels = Some([("app".into(), "web".into())].into());
        assert!(v.apply_event(Event::Apply(foreign)).is_empty());
        assert_eq!(v.apply_event(Event::Delete(service("a"))), ids(&["a"]));
        assert_eq!(v.observe("a").state, WorkloadState::Starting);
        assert_eq!(
            v.apply_event(Event::Delete(deployment("a", 1))),
            ids(&["a"])
        );
        assert_eq!(v.observe("a").state, WorkloadState::Missing);
        assert_eq!(
            v.len(),
            1,
            "the adopted mark keeps the entry (deleted behind our back)"
        );
        v.forget("a");
        assert_eq!(v.len(), 0);
    }

    #[test]
    fn apply_marks_follow_the_watch() {
        let v = view();
        // First apply, answer before the watch.
        let previous = v.begin_apply("a", 1, 1);
        assert_eq!(previous, None);
        assert_eq!(v.observe("a").state, WorkloadState::Starting);
        v.finish_apply("a", "xmod-a", 1, 1, 1);
        assert_eq!(
            v.observe("a").state,
            WorkloadState::Starting,
            "not seen yet"
        );
        v.apply_event(Event::Apply(deployment("a", 1)));
        v.apply_event(Event::Apply(service("a")));
        assert_eq!(v.observe("a").state, WorkloadState::Ready);
        // An update whose watch event came before the answer.
        let previous = v.begin_apply("a", 2, 1);
        v.apply_event(Event::Apply(deployment("a", 2)));
        v.finish_apply("a", "xmod-a", 2, 2, 1);
        assert_eq!(v.observe("a").state, WorkloadState::Ready);
        assert!(previous.is_some());
        // A failed apply puts the mark back.
        let before = v.begin_apply("a", 3, 1);
        v.abort_apply("a", before);
        assert_eq!(v.observe("a").state, WorkloadState::Ready);
        // A failed first apply leaves nothing.
        let none = v.begin_apply("z", 1, 1);
        v.abort_apply("z", none);
        assert_eq!(v.observe("z").state, WorkloadState::Missing);
        assert_eq!(v.len(), 1);
    }

    #[tokio::test]
    async fn waiting_for_the_first_lists_names_the_kinds_still_missing() {
        let v = view();
        v.apply_event(Event::<Deployment>::InitDone);
        v.record_error(Kind::Pod, "pods is forbidden".into());
        let err = v.wait_synced(Duration::from_millis(10)).await.unwrap_err();
        assert!(err.contains("services, pods (pods is forbidden)"), "{err}");
        v.apply_event(Event::<Service>::InitDone);
        v.apply_event(Event::<Pod>::InitDone);
        v.wait_synced(Duration::from_millis(10)).await.unwrap();
    }

    fn pods_view() -> View {
        View::new(
            EndpointResolver::new(&K8sConfig::default(), "models"),
            ReplicaAddresses::Pods,
            Notifier::detached(),
        )
    }

    /// A slice of Service `service` of service `id`, with (IP, ready) endpoints.
    fn slice(
        name: &str,
        id: &str,
        service: &str,
        endpoints: &[(&str, Option<bool>)],
    ) -> EndpointSlice {
        let mut labels = labels(id);
        labels["kubernetes.io/service-name"] = json!(service);
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
            "endpoints": endpoints.iter().map(|(ip, ready)| match ready {
                Some(ready) => json!({"addresses": [ip], "conditions": {"ready": ready}}),
                None => json!({"addresses": [ip]}),
            }).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn with_pod_addresses_every_ready_endpoint_of_the_live_service_is_a_replica() {
        let v = pods_view();
        v.apply_event(Event::Apply(deployment("a", 1)));
        v.apply_event(Event::Apply(service("a")));
        let seen = v.observe("a");
        assert_eq!(seen.state, WorkloadState::Ready);
        assert_eq!(
            seen.address.as_deref(),
            Some("http://xmod-a.models.svc.cluster.local:8000"),
            "the endpoint stays the Service's"
        );
        assert!(seen.replica_addresses.is_empty(), "no slice yet");

        let changed = v.apply_event(Event::Apply(slice(
            "xmod-a-1",
            "a",
            "xmod-a",
            &[
                ("10.0.0.7", Some(true)),
                ("10.0.0.5", None),
                ("10.0.0.9", Some(false)),
            ],
        )));
        assert_eq!(changed, ids(&["a"]), "the engine hears of it");
        // A second slice repeating one endpoint, and one of a Service left from a rename.
        v.apply_event(Event::Apply(slice(
            "xmod-a-2",
            "a",
            "xmod-a",
            &[("10.0.0.7", Some(true))],
        )));
        v.apply_event(Event::Apply(slice(
            "old-a-1",
            "a",
            "old-a",
            &[("10.0.0.3", Some(true))],
        )));
        assert_eq!(
            v.observe("a").replica_addresses,
            ["http://10.0.0.5:8000", "http://10.0.0.7:8000"]
        );

        // A relist replaces every slice at once.
        v.apply_event(Event::<EndpointSlice>::Init);
        v.apply_event(Event::InitApply(slice(
            "xmod-a-3",
            "a",
            "xmod-a",
            &[("10.0.0.8", Some(true))],
        )));
        assert_eq!(
            v.observe("a").replica_addresses.len(),
            2,
            "not before InitDone"
        );
        assert_eq!(v.apply_event(Event::<EndpointSlice>::InitDone), ids(&["a"]));
        assert_eq!(v.observe("a").replica_addresses, ["http://10.0.0.8:8000"]);

        // Gone with the objects: the slice alone keeps the entry until its own delete.
        v.apply_event(Event::Delete(deployment("a", 1)));
        v.apply_event(Event::Delete(service("a")));
        assert!(v.observe("a").replica_addresses.is_empty());
        v.forget("a");
        assert_eq!(v.len(), 1);
        v.apply_event(Event::Delete(slice("xmod-a-3", "a", "xmod-a", &[])));
        assert_eq!(v.len(), 0);
    }

    #[test]
    fn ipv6_endpoints_are_bracketed_and_a_slice_without_port_gives_none() {
        let mut six = slice("s", "a", "xmod-a", &[("fd00::5", Some(true))]);
        six.address_type = "IPv6".into();
        assert_eq!(
            SliceAddresses::of(&six).ready,
            ["http://[fd00::5]:8000".into()].into()
        );
        let mut portless = slice("s", "a", "xmod-a", &[("10.0.0.5", Some(true))]);
        portless.ports = None;
        assert!(SliceAddresses::of(&portless).ready.is_empty());
    }

    #[test]
    fn with_the_service_address_slices_are_not_waited_for_nor_used() {
        let v = view();
        v.apply_event(Event::Apply(deployment("a", 1)));
        v.apply_event(Event::Apply(service("a")));
        v.apply_event(Event::Apply(slice(
            "xmod-a-1",
            "a",
            "xmod-a",
            &[("10.0.0.5", Some(true))],
        )));
        assert_eq!(
            v.observe("a").replica_addresses,
            ["http://xmod-a.models.svc.cluster.local:8000"]
        );
    }

    #[tokio::test]
    async fn with_pod_addresses_start_up_waits_for_the_slices_and_says_how_to_do_without() {
        let v = pods_view();
        v.apply_event(Event::<Deployment>::InitDone);
        v.apply_event(Event::<Service>::InitDone);
        v.apply_event(Event::<Pod>::InitDone);
        v.record_error(Kind::EndpointSlice, "endpointslices is forbidden".into());
        let err = v.wait_synced(Duration::from_millis(10)).await.unwrap_err();
        assert!(
            err.contains("endpointslices (endpointslices is forbidden;"),
            "{err}"
        );
        assert!(err.contains("replicaAddresses: service"), "{err}");
        v.apply_event(Event::<EndpointSlice>::InitDone);
        v.wait_synced(Duration::from_millis(10)).await.unwrap();
    }

    #[test]
    fn watch_retries_back_off_to_at_most_4_s_and_start_afresh() {
        use kube::runtime::utils::Backoff as _;
        let mut backoff = WatchBackoff::default();
        let delays: Vec<u64> = (&mut backoff)
            .take(7)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 4000, 4000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn a_lagging_api_server_cache_is_recognised() {
        assert!(resource_version_ahead(
            "error returned by apiserver during watch: Timeout: Too large resource version: 337, current: 304"
        ));
        assert!(!resource_version_ahead("connection refused"));
    }
}
