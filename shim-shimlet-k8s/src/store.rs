//! A [`Store`] on `ModelService` resources (`--store kubernetes`): desired state lives in the
//! cluster, so it outlives the shim's volume and `kubectl get modelservices` shows what is
//! deployed.
//!
//! * A service's id is its ModelService's name, in the namespace of `shimlets.k8s`.
//! * [`Store::save`] is a server-side apply (field manager `xmod-shim`) of the spec and of the
//!   whole [`ServiceRecord`] as JSON in the `xmod-shim.io/record` annotation, then an apply of the
//!   status through the status subresource. The annotation is what [`Store::load_live`] rebuilds
//!   from, exactly; the spec and status are for people and tools. A deleted record deletes the
//!   resource (its history stays in memory while the process lives).
//! * Writes go through one queue in call order; a batch keeps only the newest record per service
//!   (earlier ones are superseded) and writes different services concurrently.
//! * Events: the newest `history` per service in memory, and each phase transition also as a
//!   Kubernetes Event on the ModelService, so `kubectl describe` tells the story.
//! * A watch on ModelServices reports what someone else did, as [`ClusterChange`]s to the
//!   receiver of [`KubeStore::changes`], whose owner tells the engine:
//!   - created (`kubectl apply` of a new one): it carries no record annotation → adopt it
//!     ([`shim_core::Engine::adopt`]);
//!   - spec changed (`kubectl apply`, `kubectl scale`): the spec differs from the one in the
//!     record annotation, which the shim writes in the same apply as its spec, so the shim's own
//!     writes never read as changes → update;
//!   - deleted (`kubectl delete`) while the engine wants it → delete; the engine's writes for it
//!     are then not applied (they would create it again) until its teardown is done.
//!
//!
//! # Several replicas
//! Every replica serves reads from memory and writes requests into the resources; one, the
//! holder of the Lease ([`crate::lease`]), reconciles. Each write carries the resourceVersion last
//! seen, so a write based on an old state is refused (409) instead of overwriting another
//! replica's: the store then reads the resource again and either writes on top of it (same
//! generation: only the observed part differs) or drops its own write as superseded and hands
//! the newer record to the engine ([`ClusterChange::Record`]). The watch hands every record
//! written by another replica to the engine the same way ([`shim_core::Engine::mirror`]), so
//! followers' reads and event streams follow the leader, and the leader picks up requests
//! that followers accepted. Adopting, updating and deleting on behalf of kubectl is the
//! leader's job; [`KubeStore::rescan`] offers all of it again when a replica takes the lead.
//!
//! # Deletion and ownership
//! Every ModelService carries the finalizer [`FINALIZER`]: a `kubectl delete` (or a REST
//! delete) leaves it in place, `terminating`, until the engine has torn the workload down, and
//! only then is the finalizer removed. The k8s shimlet's Deployment and Service carry an
//! ownerReference to their ModelService ([`owner_uid`]), so the cluster's garbage collector
//! removes them even when no shim runs: `kubectl delete --cascade=foreground` deletes them at
//! once; the ModelService itself then waits, `terminating`, for a shim to confirm.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Event as KubeEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, Resource as _, ResourceExt as _};
use shim_core::event::{Event, EventKind};
use shim_core::record::ServiceRecord;
use shim_core::store::{Ack, EventHistory, Store};
use shim_core::{DeploySpec, Phase};
use tokio::sync::{mpsc, oneshot};

use crate::config::K8sConfig;
use crate::crd::{ANNOTATION_RECORD, FINALIZER, ModelService, ModelServiceSpec, status_of};
use crate::errors::status_of as http_status;
use crate::names::{FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY_VALUE};

/// Attempts of one write before it is reported as failed.
const ATTEMPTS: u32 = 5;
/// Services written at once within a batch.
const PARALLEL: usize = 16;
/// Wait before a record whose write failed (the API server away) is written again.
const RESAVE_AFTER: Duration = Duration::from_secs(5);

/// What went wrong talking to the cluster about ModelServices.
#[derive(Debug, thiserror::Error)]
pub enum KubeStoreError {
    /// The CustomResourceDefinition is missing.
    #[error(
        "the ModelService resource is not installed on {origin}; install it with \
         kubectl apply -f deploy/crds/modelservices.yaml"
    )]
    NotInstalled {
        /// The cluster.
        origin: String,
    },
    /// RBAC refuses.
    #[error(
        "not allowed to {verb} modelservices in namespace {namespace:?} on {origin}: {detail} \
         (apply deploy/rbac.yaml, which grants the store's verbs)"
    )]
    Forbidden {
        /// What was tried.
        verb: &'static str,
        /// Where.
        namespace: String,
        /// The cluster.
        origin: String,
        /// The API server's words.
        detail: String,
    },
    /// Any other API error, after retries.
    #[error("{action} modelservice {name:?}: {source}")]
    Api {
        /// What was tried.
        action: &'static str,
        /// Which resource.
        name: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A record annotation that does not parse.
    #[error("modelservice {name:?} has a damaged {ANNOTATION_RECORD} annotation: {source}")]
    Damaged {
        /// Which resource.
        name: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The writer task is gone (the runtime is shutting down).
    #[error("the ModelService writer has stopped")]
    Stopped,
    /// The `shimlets.k8s` section is invalid.
    #[error("shimlets.k8s: {0}")]
    Config(String),
}

fn store_err(err: KubeStoreError) -> shim_core::Error {
    shim_core::Error::store(err)
}

/// What someone else did to a ModelService, for the engine to follow.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterChange {
    /// Created: adopt it under its name.
    Adopt {
        /// The resource's name: the service id.
        id: String,
        /// Its spec as a deploy request.
        spec: DeploySpec,
    },
    /// Its spec changed: update the service.
    Update {
        /// The service id.
        id: String,
        /// The new spec.
        spec: DeploySpec,
    },
    /// Deleted: remove the service.
    Delete {
        /// The service id.
        id: String,
    },
    /// Another replica wrote this record (its request, or the leader's progress): hand it to
    /// [`shim_core::Engine::mirror`].
    Record(Arc<ServiceRecord>),
}

impl ClusterChange {
    /// Whether only the leader acts on it (what kubectl users did), rather than every replica.
    pub fn for_leader(&self) -> bool {
        !matches!(self, Self::Record(_))
    }
}

/// What the store keeps of a resource it saw: what its writes and the engine need, not the
/// whole object.
#[derive(Debug, Clone, Default)]
struct Seen {
    uid: Option<String>,
    /// The newest resourceVersion seen or written, for the next write's precondition.
    resource_version: Option<String>,
    /// The resourceVersion this process's own last write produced: watch events up to it are
    /// echoes.
    written: Option<u64>,
    deleting: bool,
    has_finalizer: bool,
    /// The spec, when it is not the one in the record annotation: made or edited by someone else.
    outside_spec: Option<ModelServiceSpec>,
    /// Whether it carries a record annotation (else it was made by someone else: adopt it).
    annotated: bool,
}

/// resourceVersions are etcd revisions: numbers that grow with every write.
fn revision(rv: Option<&str>) -> Option<u64> {
    rv.and_then(|v| v.parse().ok())
}

enum Job {
    Save(Arc<ServiceRecord>, oneshot::Sender<shim_core::Result<()>>),
    Event(Box<Event>),
}

struct Inner {
    api: Api<ModelService>,
    kube_events: Api<KubeEvent>,
    namespace: String,
    /// Every record this process knows, deleted ones included (as history); live ones are
    /// shared with the engine.
    records: Mutex<HashMap<String, Arc<ServiceRecord>>>,
    events: EventHistory,
    /// What was last seen of each resource, by name.
    seen: Mutex<HashMap<String, Seen>>,
    /// Names already handed out for adoption (each is handed out once).
    offered: Mutex<HashSet<String>>,
    /// The last spec handed out as an update per name (each change is handed out once).
    offered_specs: Mutex<HashMap<String, ModelServiceSpec>>,
    /// Deleted by someone else, teardown not yet done: the engine's writes are not applied.
    gone: Mutex<HashSet<String>>,
    /// Services whose newest record is due to be written again after a failed write.
    resave: Mutex<HashSet<String>>,
    adopt_tx: mpsc::UnboundedSender<ClusterChange>,
}

impl Inner {
    /// Empty state for the resources in `namespace`, registered for [`owner_uid`] under
    /// `origin`.
    fn registered(
        client: Client,
        namespace: String,
        history: usize,
        origin: &str,
        adopt_tx: mpsc::UnboundedSender<ClusterChange>,
    ) -> Arc<Self> {
        let inner = Arc::new(Self {
            api: Api::namespaced(client.clone(), &namespace),
            kube_events: Api::namespaced(client, &namespace),
            namespace,
            records: Mutex::default(),
            events: EventHistory::new(history),
            seen: Mutex::default(),
            offered: Mutex::default(),
            offered_specs: Mutex::default(),
            gone: Mutex::default(),
            resave: Mutex::default(),
            adopt_tx,
        });
        register_owners(origin, &inner);
        inner
    }
}

/// [`Store`] on ModelService resources; see the module docs.
#[derive(Clone)]
pub struct KubeStore {
    inner: Arc<Inner>,
    writer: mpsc::UnboundedSender<Job>,
    adoptions: Arc<Mutex<Option<mpsc::UnboundedReceiver<ClusterChange>>>>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.inner.namespace)
            .finish()
    }
}

impl KubeStore {
    /// Connects with the `shimlets.k8s` settings (kubeconfig, context, namespace, rate limit),
    /// checks that the resource is installed and may be listed, and starts the writer and the
    /// watch. Keeps `history` events per service in memory.
    ///
    /// # Errors
    /// A bad config section, an unreachable cluster, a missing CRD or missing permissions, each
    /// saying what to change.
    pub async fn connect(config: &K8sConfig, history: usize) -> Result<Self, shim_core::Error> {
        config
            .validate()
            .map_err(|e| store_err(KubeStoreError::Config(e)))?;
        let (client, origin) = crate::client::connect(config)
            .await
            .map_err(shim_core::Error::from)?;
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        Self::start(client, namespace, &origin, history).await
    }

    /// As [`KubeStore::connect`], on a client built by the caller.
    ///
    /// # Errors
    /// As [`KubeStore::connect`].
    pub async fn start(
        client: Client,
        namespace: String,
        origin: &str,
        history: usize,
    ) -> Result<Self, shim_core::Error> {
        let api: Api<ModelService> = Api::namespaced(client.clone(), &namespace);
        // One cheap list proves the CRD exists and RBAC lets us read; its errors are the ones a
        // person can act on.
        if let Err(err) = api.list(&ListParams::default().limit(1)).await {
            return Err(store_err(match http_status(&err) {
                Some(404) => KubeStoreError::NotInstalled {
                    origin: origin.to_string(),
                },
                Some(403) => KubeStoreError::Forbidden {
                    verb: "list",
                    namespace,
                    origin: origin.to_string(),
                    detail: err.to_string(),
                },
                _ => KubeStoreError::Api {
                    action: "list",
                    name: String::new(),
                    source: err,
                },
            }));
        }
        let (adopt_tx, adopt_rx) = mpsc::unbounded_channel();
        let inner = Inner::registered(client, namespace, history, origin, adopt_tx);
        let (writer, jobs) = mpsc::unbounded_channel();
        let (publisher, events) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(
            inner.clone(),
            jobs,
            writer.downgrade(),
            publisher,
        ));
        tokio::spawn(event_loop(inner.clone(), events));
        tokio::spawn(watch_loop(inner.clone()));
        Ok(Self {
            inner,
            writer,
            adoptions: Arc::new(Mutex::new(Some(adopt_rx))),
        })
    }

    /// What someone else did to the ModelServices, for the engine to follow. Taken once: the
    /// second call returns `None`.
    pub fn changes(&self) -> Option<mpsc::UnboundedReceiver<ClusterChange>> {
        self.adoptions.lock().ok()?.take()
    }

    /// Marks a ModelService the engine refused to adopt (a bad spec) as failed, with the
    /// engine's words, so `kubectl get` shows why nothing runs.
    ///
    /// # Errors
    /// When the status cannot be written.
    pub async fn reject(&self, id: &str, message: &str) -> Result<(), shim_core::Error> {
        let status = serde_json::json!({
            "apiVersion": "xmod-shim.io/v1alpha1",
            "kind": "ModelService",
            "metadata": { "name": id },
            "status": {
                "phase": "failed",
                "reason": "InvalidSpec",
                "message": message,
                "endpoint": "",
                "readyReplicas": 0,
            }
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.inner
            .api
            .patch_status(id, &params, &Patch::Apply(&status))
            .await
            .map(|_| ())
            .map_err(|source| {
                store_err(KubeStoreError::Api {
                    action: "write the status of",
                    name: id.to_string(),
                    source,
                })
            })
    }

    /// The namespace the resources live in.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Starts competing for Lease `lease` (in the store's namespace) as `identity`; see
    /// [`crate::lease`].
    pub fn elect(&self, lease: &str, identity: String) -> crate::lease::Election {
        crate::lease::Election::start(
            self.inner.api.clone().into_client(),
            &self.inner.namespace,
            lease,
            identity,
        )
    }

    /// Makes the k8s shimlet's Deployment and Service of service `id` dependents of its
    /// ModelService, for workloads made before desired state moved into the cluster
    /// (`model-serve-shim migrate`). A merge patch of `metadata.ownerReferences` only: the pod
    /// template is untouched, so no engine restarts. Returns how many objects it patched.
    ///
    /// # Errors
    /// When the ModelService is unknown (save it first) or the API server refuses.
    pub async fn own_workloads(&self, id: &str) -> Result<usize, shim_core::Error> {
        use k8s_openapi::api::apps::v1::Deployment;
        use k8s_openapi::api::core::v1::Service;
        let uid = self
            .inner
            .seen
            .lock()
            .ok()
            .and_then(|s| s.get(id).and_then(|s| s.uid.clone()))
            .ok_or_else(|| {
                store_err(KubeStoreError::Config(format!(
                    "modelservice {id:?} is not written yet"
                )))
            })?;
        let patch = serde_json::json!({
            "metadata": { "ownerReferences": [{
                "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
                "kind": "ModelService",
                "name": id,
                "uid": uid,
                "controller": true,
            }]}
        });
        let client = self.inner.api.clone().into_client();
        let selector = ListParams::default().labels(&crate::names::service_selector(id));
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &self.inner.namespace);
        let services: Api<Service> = Api::namespaced(client, &self.inner.namespace);
        let patched = set_owner(&deployments, &selector, &patch, id).await?
            + set_owner(&services, &selector, &patch, id).await?;
        Ok(patched)
    }

    /// Offers again everything kubectl users did that a leader must act on (resources to adopt,
    /// edited specs, deletions): for a replica that has just taken the lead, since the previous
    /// leader may have died before acting.
    pub fn rescan(&self) {
        if let Ok(mut offered) = self.inner.offered.lock() {
            offered.clear();
        }
        if let Ok(mut offered) = self.inner.offered_specs.lock() {
            offered.clear();
        }
        let seen: Vec<(String, Seen)> = match self.inner.seen.lock() {
            Ok(seen) => seen.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => return,
        };
        for (name, seen) in seen {
            for change in outside_changes(&self.inner, &name, &seen) {
                if self.inner.adopt_tx.send(change).is_err() {
                    return;
                }
            }
        }
    }
}

/// Merge-patches `patch` (the ownerReference) onto each object of `api` that `selector` finds.
async fn set_owner<K>(
    api: &Api<K>,
    selector: &ListParams,
    patch: &serde_json::Value,
    id: &str,
) -> Result<usize, shim_core::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let failed = |action: &'static str| {
        move |source| {
            store_err(KubeStoreError::Api {
                action,
                name: id.to_string(),
                source,
            })
        }
    };
    let objects = api
        .list(selector)
        .await
        .map_err(failed("list the workload objects of"))?;
    for object in &objects {
        api.patch(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map_err(failed("set the owner of a workload object of"))?;
    }
    Ok(objects.items.len())
}

/// The stores of this process by API server and namespace, for [`owner_uid`].
static OWNERS: LazyLock<Mutex<HashMap<String, Weak<Inner>>>> = LazyLock::new(Mutex::default);

fn owners_key(origin: &str, namespace: &str) -> String {
    format!("{origin}|{namespace}")
}

fn register_owners(origin: &str, inner: &Arc<Inner>) {
    if let Ok(mut owners) = OWNERS.lock() {
        owners.retain(|_, store| store.strong_count() > 0);
        owners.insert(owners_key(origin, &inner.namespace), Arc::downgrade(inner));
    }
}

/// The uid of ModelService `name`, when a [`KubeStore`] of this process keeps desired state on
/// the same API server (`origin`, as [`crate::connect`] names it) and in the same namespace:
/// what the k8s shimlet puts in its objects' ownerReferences. The key includes the API server,
/// because an ownerReference to a uid that does not exist makes the garbage collector delete
/// the object.
pub fn owner_uid(origin: &str, namespace: &str, name: &str) -> Option<String> {
    let inner = OWNERS
        .lock()
        .ok()?
        .get(&owners_key(origin, namespace))?
        .upgrade()?;
    let seen = inner.seen.lock().ok()?;
    let seen = seen.get(name)?;
    if seen.deleting {
        return None;
    }
    seen.uid.clone()
}

#[async_trait]
impl Store for KubeStore {
    fn save(&self, record: &Arc<ServiceRecord>) -> Ack {
        if let Ok(mut records) = self.inner.records.lock() {
            records.insert(record.id.clone(), Arc::clone(record));
        }
        let (tx, rx) = oneshot::channel();
        if self.writer.send(Job::Save(Arc::clone(record), tx)).is_err() {
            return Box::pin(async { Err(store_err(KubeStoreError::Stopped)) });
        }
        Box::pin(async move { rx.await.unwrap_or(Err(store_err(KubeStoreError::Stopped))) })
    }

    fn append_event(&self, event: &Event) -> Ack {
        self.inner.events.push(event);
        // The Kubernetes Event is a courtesy for `kubectl describe`: it never holds up or fails
        // the engine's write.
        if matches!(event.kind, EventKind::Transition { .. }) {
            let _ = self.writer.send(Job::Event(Box::new(event.clone())));
        }
        Box::pin(async { Ok(()) })
    }

    async fn load_live(&self) -> shim_core::Result<Vec<ServiceRecord>> {
        let list = self
            .inner
            .api
            .list(&ListParams::default())
            .await
            .map_err(|source| {
                store_err(KubeStoreError::Api {
                    action: "list",
                    name: String::new(),
                    source,
                })
            })?;
        let mut live = Vec::new();
        for object in list.items {
            let name = object.name_any();
            // Resources without a record were made by someone else: the watch offers them for
            // adoption. A damaged record is refused loudly rather than guessed at.
            let record = record_of(&object)?;
            remember(&self.inner, &object, record.as_ref(), false);
            let Some(record) = record else {
                continue;
            };
            if record.id != name {
                tracing::warn!(%name, id = %record.id, "record annotation names another id; skipped");
                continue;
            }
            if let Ok(mut records) = self.inner.records.lock() {
                records.insert(name, Arc::new(record.clone()));
            }
            if record.is_live() {
                live.push(record);
            }
        }
        Ok(live)
    }

    async fn get(&self, id: &str) -> shim_core::Result<Option<ServiceRecord>> {
        if let Some(record) = self
            .inner
            .records
            .lock()
            .ok()
            .and_then(|r| r.get(id).map(|record| ServiceRecord::clone(record)))
        {
            return Ok(Some(record));
        }
        match self.inner.api.get_opt(id).await {
            Ok(Some(object)) => record_of(&object),
            Ok(None) => Ok(None),
            Err(source) => Err(store_err(KubeStoreError::Api {
                action: "get",
                name: id.to_string(),
                source,
            })),
        }
    }

    async fn events(&self, id: &str, limit: usize) -> shim_core::Result<Vec<Event>> {
        Ok(self.inner.events.newest(id, limit))
    }
}

/// The record kept in a resource's annotation; `None` when it has none.
fn record_of(object: &ModelService) -> shim_core::Result<Option<ServiceRecord>> {
    let Some(json) = object.annotations().get(ANNOTATION_RECORD) else {
        return Ok(None);
    };
    serde_json::from_str(json).map(Some).map_err(|source| {
        store_err(KubeStoreError::Damaged {
            name: object.name_any(),
            source,
        })
    })
}

/// Notes what `object` shows, given the record in its annotation (`None` when it has none or a
/// damaged one); `mine` when it is the answer to this process's own write. Returns whether it
/// is newer than this process's last write (someone else's change).
fn remember(
    inner: &Inner,
    object: &ModelService,
    record: Option<&ServiceRecord>,
    mine: bool,
) -> bool {
    let name = object.name_any();
    let Ok(mut seen) = inner.seen.lock() else {
        return false;
    };
    let entry = seen.entry(name).or_default();
    let rv = object.resource_version();
    let revision_now = revision(rv.as_deref());
    // Watch events can trail this process's own writes: never go back to an older version.
    if revision_now.is_none()
        || revision(entry.resource_version.as_deref()).is_none_or(|old| revision_now >= Some(old))
    {
        entry.resource_version = rv;
    }
    if mine {
        entry.written = revision_now;
    }
    let newer = !mine
        && entry
            .written
            .is_none_or(|w| revision_now.is_none_or(|now| now > w));
    if let Some(uid) = object.uid() {
        entry.uid = Some(uid);
    }
    entry.deleting = object.meta().deletion_timestamp.is_some();
    entry.has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);
    let record_spec = record.map(|record| ModelServiceSpec::from(&record.spec));
    entry.annotated = record_spec.is_some();
    entry.outside_spec = (record_spec.as_ref() != Some(&object.spec)).then(|| object.spec.clone());
    newer
}

/// Applies queued writes in order. Each batch is what has queued meanwhile: per service only the
/// newest record is written (the earlier ones' acknowledgements wait for it), services in
/// parallel; then the batch's Kubernetes Events go to [`event_loop`], after the writes so
/// that a new resource's first Event can name its uid, but without holding up the next batch.
///
/// A failed write is reported to its callers and, so the resource does not keep a stale status
/// when no later change comes (an API server outage during the last transition), the service's
/// newest record is written again after [`RESAVE_AFTER`] until a write succeeds.
async fn write_loop(
    inner: Arc<Inner>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    requeue: mpsc::WeakUnboundedSender<Job>,
    publisher: mpsc::UnboundedSender<Vec<Event>>,
) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while let Ok(job) = jobs.try_recv() {
            batch.push(job);
        }
        let mut order: Vec<String> = Vec::new();
        let mut saves: HashMap<String, (Arc<ServiceRecord>, Vec<oneshot::Sender<_>>)> =
            HashMap::new();
        let mut events = Vec::new();
        for job in batch {
            match job {
                Job::Save(record, ack) => {
                    let entry = saves.entry(record.id.clone()).or_insert_with(|| {
                        order.push(record.id.clone());
                        (Arc::clone(&record), Vec::new())
                    });
                    entry.0 = record;
                    entry.1.push(ack);
                }
                Job::Event(event) => events.push(*event),
            }
        }
        let writes = order
            .into_iter()
            .filter_map(|id| saves.remove(&id))
            .map(|(record, acks)| {
                let inner = inner.clone();
                let requeue = requeue.clone();
                async move {
                    let result = write_record(&inner, &record).await;
                    if let Err(err) = &result {
                        tracing::warn!(id = %record.id, error = %err, "cannot write the ModelService; will write it again");
                        resave_later(&inner, &record.id, requeue);
                    }
                    for ack in acks {
                        let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| {
                            shim_core::Error::store(std::io::Error::other(e.to_string()))
                        }));
                    }
                }
            });
        futures::stream::iter(writes)
            .buffer_unordered(PARALLEL)
            .collect::<Vec<()>>()
            .await;
        if !events.is_empty() {
            let _ = publisher.send(events);
        }
    }
}

/// Creates the Kubernetes Events the writer hands over: each service's in order, services in
/// parallel. Everything queued meanwhile goes in one round, so a burst of transitions (1,000
/// deploys) costs a few rounds, not one request after another.
async fn event_loop(inner: Arc<Inner>, mut batches: mpsc::UnboundedReceiver<Vec<Event>>) {
    while let Some(first) = batches.recv().await {
        let mut queued = first;
        while let Ok(more) = batches.try_recv() {
            queued.extend(more);
        }
        let mut order: Vec<String> = Vec::new();
        let mut per_service: HashMap<String, Vec<Event>> = HashMap::new();
        for event in queued {
            per_service
                .entry(event.service_id.clone())
                .or_insert_with(|| {
                    order.push(event.service_id.clone());
                    Vec::new()
                })
                .push(event);
        }
        let rounds = order
            .into_iter()
            .filter_map(|id| per_service.remove(&id))
            .map(|events| {
                let inner = inner.clone();
                async move {
                    for event in events {
                        if let Err(err) = publish(&inner, &event).await {
                            tracing::debug!(error = %err, "cannot create a Kubernetes Event");
                        }
                    }
                }
            });
        futures::stream::iter(rounds)
            .buffer_unordered(PARALLEL)
            .collect::<Vec<()>>()
            .await;
    }
}

/// Writes the service's newest record again after [`RESAVE_AFTER`] (once per service at a time).
fn resave_later(inner: &Arc<Inner>, id: &str, requeue: mpsc::WeakUnboundedSender<Job>) {
    if !inner
        .resave
        .lock()
        .is_ok_and(|mut r| r.insert(id.to_string()))
    {
        return;
    }
    let inner = inner.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        tokio::time::sleep(RESAVE_AFTER).await;
        if let Ok(mut resave) = inner.resave.lock() {
            resave.remove(&id);
        }
        let newest = inner.records.lock().ok().and_then(|r| r.get(&id).cloned());
        if let (Some(record), Some(writer)) = (newest, requeue.upgrade()) {
            // Nobody waits for this write: its acknowledgement is dropped.
            let (ack, _) = oneshot::channel();
            let _ = writer.send(Job::Save(record, ack));
        }
    });
}

/// Whether an error may pass by itself: throttling, server errors, transport. (A conflict is a
/// newer write by someone else: [`write_record`] reads what it was.)
fn transient(err: &kube::Error) -> bool {
    match http_status(err) {
        Some(code) => code == 429 || code >= 500,
        None => true,
    }
}

fn conflict(err: &KubeStoreError) -> bool {
    matches!(err, KubeStoreError::Api { source, .. } if http_status(source) == Some(409))
}

async fn retrying<T, F, Fut>(
    action: &'static str,
    name: &str,
    mut call: F,
) -> Result<T, KubeStoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(err) if attempt < ATTEMPTS && transient(&err) => {
                tracing::debug!(%name, attempt, error = %err, "{action} modelservice: retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(source) => {
                return Err(KubeStoreError::Api {
                    action,
                    name: name.to_string(),
                    source,
                });
            }
        }
    }
}

async fn write_record(inner: &Inner, record: &ServiceRecord) -> Result<(), KubeStoreError> {
    let name = record.id.as_str();
    if !record.is_live() {
        // The teardown is done (the engine writes `deleted` only once the runtime confirmed):
        // the resource goes; the record stays in memory as history.
        if let Ok(mut offered) = inner.offered.lock() {
            offered.remove(name);
        }
        if let Ok(mut gone) = inner.gone.lock() {
            gone.remove(name);
        }
        return remove(inner, name).await;
    }
    // Deleted by someone else: applying would create it again; the teardown's last write
    // (above) ends this.
    if inner.gone.lock().is_ok_and(|g| g.contains(name)) {
        return Ok(());
    }
    let json = serde_json::to_string(record).map_err(|source| KubeStoreError::Damaged {
        name: name.to_string(),
        source,
    })?;
    // `force`: the shim owns the fields it writes, also of a resource someone else created.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut attempt = 1;
    let applied = loop {
        let known = inner.seen.lock().ok().and_then(|s| s.get(name).cloned());
        let mut metadata = serde_json::json!({
            "name": name,
            "labels": { LABEL_MANAGED_BY: MANAGED_BY_VALUE },
            "annotations": { ANNOTATION_RECORD: &json },
            "finalizers": [FINALIZER],
        });
        // The precondition: refused if another replica wrote since this process last saw it.
        if let Some(rv) = known.as_ref().and_then(|k| k.resource_version.clone()) {
            metadata["resourceVersion"] = rv.into();
        }
        let object = serde_json::json!({
            "apiVersion": "xmod-shim.io/v1alpha1",
            "kind": "ModelService",
            "metadata": metadata,
            "spec": ModelServiceSpec::from(&record.spec),
        });
        let spec_patch = Patch::Apply(&object);
        match retrying("apply", name, || {
            inner.api.patch(name, &params, &spec_patch)
        })
        .await
        {
            Ok(applied) => break applied,
            Err(err) if conflict(&err) && attempt < ATTEMPTS => {
                attempt += 1;
                if superseded(inner, record).await? {
                    return Ok(());
                }
            }
            Err(err) => return Err(err),
        }
    };
    // The answer carries the annotation just written: `record`.
    remember(inner, &applied, Some(record), true);
    let status = serde_json::json!({
        "apiVersion": "xmod-shim.io/v1alpha1",
        "kind": "ModelService",
        "metadata": { "name": name },
        "status": status_of(record, applied.meta().generation),
    });
    let status_patch = Patch::Apply(&status);
    let written = retrying("write the status of", name, || {
        inner.api.patch_status(name, &params, &status_patch)
    })
    .await?;
    remember(inner, &written, Some(record), true);
    Ok(())
}

/// After a conflict: reads the resource again. Returns whether it holds a newer request than
/// `record` (a later generation, or another request at the same generation), which the engine
/// is then given instead of this write going through.
async fn superseded(inner: &Inner, record: &ServiceRecord) -> Result<bool, KubeStoreError> {
    let name = record.id.as_str();
    let Some(current) = retrying("read", name, || inner.api.get_opt(name)).await? else {
        if let Ok(mut seen) = inner.seen.lock() {
            seen.remove(name);
        }
        return Ok(false);
    };
    let theirs = record_of(&current).ok().flatten();
    remember(inner, &current, theirs.as_ref(), false);
    let newer = theirs.filter(|theirs| {
        theirs.generation > record.generation
            || (theirs.generation == record.generation
                && (theirs.spec != record.spec || theirs.desired != record.desired))
    });
    match newer {
        Some(theirs) => {
            tracing::info!(id = %name, generation = theirs.generation, "another replica wrote a newer request; following it");
            let theirs = Arc::new(theirs);
            if let Ok(mut records) = inner.records.lock() {
                records.insert(name.to_string(), Arc::clone(&theirs));
            }
            let _ = inner.adopt_tx.send(ClusterChange::Record(theirs));
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Ends a resource whose teardown is done: deletes it (it stays while it has finalizers) and
/// removes [`FINALIZER`], so it goes.
async fn remove(inner: &Inner, name: &str) -> Result<(), KubeStoreError> {
    let held = retrying("delete", name, || async {
        match inner.api.delete(name, &DeleteParams::default()).await {
            Ok(either) => Ok(either.left()),
            Err(err) if http_status(&err) == Some(404) => Ok(None),
            Err(err) => Err(err),
        }
    })
    .await?;
    let mut current = held;
    for _ in 0..ATTEMPTS {
        let Some(object) = current.take() else {
            break;
        };
        let rest: Vec<&String> = object
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .collect();
        if rest.len() == object.finalizers().len() {
            break;
        }
        // The resourceVersion guards the list: another controller's finalizer added meanwhile
        // is not dropped.
        let patch = serde_json::json!({
            "metadata": { "finalizers": rest, "resourceVersion": object.resource_version() }
        });
        match inner
            .api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => break,
            Err(err) if http_status(&err) == Some(404) => break,
            Err(err) if http_status(&err) == Some(409) || transient(&err) => {
                current = retrying("read", name, || inner.api.get_opt(name)).await?;
            }
            Err(source) => {
                return Err(KubeStoreError::Api {
                    action: "remove the finalizer of",
                    name: name.to_string(),
                    source,
                });
            }
        }
    }
    if let Ok(mut seen) = inner.seen.lock() {
        seen.remove(name);
    }
    Ok(())
}

async fn publish(inner: &Inner, event: &Event) -> Result<(), KubeStoreError> {
    let EventKind::Transition {
        from,
        to,
        trigger,
        reason,
        message,
    } = &event.kind
    else {
        return Ok(());
    };
    let name = event.service_id.as_str();
    let uid = inner
        .seen
        .lock()
        .ok()
        .and_then(|s| s.get(name).and_then(|s| s.uid.clone()));
    let word = |p: &Phase| p.to_string();
    let note = match (from, message) {
        (Some(from), Some(m)) => format!("{} -> {}: {m}", word(from), word(to)),
        (Some(from), None) => format!("{} -> {}", word(from), word(to)),
        (None, Some(m)) => format!("{}: {m}", word(to)),
        (None, None) => word(to),
    };
    let note = match trigger {
        Some(t) => format!(
            "{note} ({})",
            serde_json::to_value(t)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        ),
        None => note,
    };
    let kind = if matches!(to, Phase::Failed) || reason.is_some() {
        "Warning"
    } else {
        "Normal"
    };
    let reason = reason.clone().unwrap_or_else(|| {
        let mut r = word(to);
        if let Some(first) = r.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        r
    });
    // `Time` has whole seconds.
    let time = event.time.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let body = serde_json::json!({
        "metadata": {
            "generateName": format!("{name}."),
            "namespace": inner.namespace,
        },
        "involvedObject": {
            "apiVersion": "xmod-shim.io/v1alpha1",
            "kind": "ModelService",
            "name": name,
            "namespace": inner.namespace,
            "uid": uid,
        },
        "reason": reason,
        "message": note,
        "type": kind,
        "count": 1,
        "firstTimestamp": time,
        "lastTimestamp": time,
        "source": { "component": FIELD_MANAGER },
    });
    let kube_event: KubeEvent =
        serde_json::from_value(body).map_err(|source| KubeStoreError::Damaged {
            name: name.to_string(),
            source,
        })?;
    inner
        .kube_events
        .create(&PostParams::default(), &kube_event)
        .await
        .map(|_| ())
        .map_err(|source| KubeStoreError::Api {
            action: "create an Event for",
            name: name.to_string(),
            source,
        })
}

/// Watches ModelServices and reports what someone else did (see the module docs). The watcher
/// relists by itself after errors; only a closed receiver ends the loop.
async fn watch_loop(inner: Arc<Inner>) {
    let stream = watcher(inner.api.clone(), watcher::Config::default());
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        let (deleted, object) = match item {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => (false, o),
            Ok(watcher::Event::Delete(o)) => (true, o),
            Ok(_) => continue,
            Err(err) => {
                tracing::warn!(error = %err, "watching modelservices failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for change in change_of(&inner, deleted, &object) {
            match &change {
                ClusterChange::Record(record) => {
                    tracing::debug!(id = %record.id, generation = record.generation, phase = %record.phase, "another replica wrote a record");
                }
                other => {
                    tracing::info!(change = ?other, "a ModelService was changed outside the shim")
                }
            }
            if inner.adopt_tx.send(change).is_err() {
                return;
            }
        }
    }
}

/// What a watch event means for the engine: another replica's record, and what kubectl users
/// did (created, edited or deleted a resource).
fn change_of(inner: &Inner, deleted: bool, object: &ModelService) -> Vec<ClusterChange> {
    let name = object.name_any();
    let known = inner
        .records
        .lock()
        .ok()
        .and_then(|r| r.get(&name).cloned());
    if deleted {
        if let Ok(mut seen) = inner.seen.lock() {
            seen.remove(&name);
        }
        return match known.filter(|record| record.is_live()) {
            // A teardown done (by the leader, maybe another replica): the service is gone.
            Some(mut record) if record.desired == shim_core::Desired::Absent => {
                Arc::make_mut(&mut record).phase = Phase::Deleted;
                if let Ok(mut records) = inner.records.lock() {
                    records.insert(name, Arc::clone(&record));
                }
                vec![ClusterChange::Record(record)]
            }
            // Gone without the finalizer's wait (someone removed it): remove the workload.
            Some(_) => {
                if let Ok(mut gone) = inner.gone.lock() {
                    gone.insert(name.clone());
                }
                vec![ClusterChange::Delete { id: name }]
            }
            None => Vec::new(),
        };
    }
    let theirs = record_of(object).ok().flatten();
    let newer = remember(inner, object, theirs.as_ref(), false);
    let mut changes = Vec::new();
    if newer
        && let Some(theirs) = theirs
        && theirs.id == name
        && known.as_deref() != Some(&theirs)
        && known
            .as_ref()
            .is_none_or(|k| theirs.generation >= k.generation)
    {
        let theirs = Arc::new(theirs);
        if let Ok(mut records) = inner.records.lock() {
            records.insert(name.clone(), Arc::clone(&theirs));
        }
        changes.push(ClusterChange::Record(theirs));
    }
    let seen = inner
        .seen
        .lock()
        .ok()
        .and_then(|s| s.get(&name).cloned())
        .unwrap_or_default();
    changes.extend(outside_changes(inner, &name, &seen));
    changes
}

/// What kubectl users did to resource `name`, each offered once: created it (adopt), deleted it
/// (the finalizer holds it for the teardown), or edited its spec.
fn outside_changes(inner: &Inner, name: &str, seen: &Seen) -> Vec<ClusterChange> {
    let wanted = inner
        .records
        .lock()
        .ok()
        .and_then(|r| r.get(name).cloned())
        .filter(|r| r.is_live() && r.desired == shim_core::Desired::Present);
    if seen.deleting {
        return match wanted {
            Some(_) if seen.has_finalizer => vec![ClusterChange::Delete {
                id: name.to_string(),
            }],
            _ => Vec::new(),
        };
    }
    let Some(spec) = &seen.outside_spec else {
        return Vec::new();
    };
    if !seen.annotated {
        let fresh = inner
            .offered
            .lock()
            .is_ok_and(|mut o| o.insert(name.to_string()));
        if wanted.is_some() || !fresh {
            return Vec::new();
        }
        return vec![ClusterChange::Adopt {
            id: name.to_string(),
            spec: DeploySpec::from(spec),
        }];
    }
    if wanted.is_none() {
        return Vec::new();
    }
    let Ok(mut offered) = inner.offered_specs.lock() else {
        return Vec::new();
    };
    if offered.get(name) == Some(spec) {
        return Vec::new();
    }
    offered.insert(name.to_string(), spec.clone());
    vec![ClusterChange::Update {
        id: name.to_string(),
        spec: DeploySpec::from(spec),
    }]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use http_body_util::Full;

    use super::*;

    type Mock =
        tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<Full<Bytes>>>;

    fn client() -> (Client, Mock) {
        let (service, handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<Full<Bytes>>,
        >();
        (Client::new(service, "ns"), handle)
    }

    /// An `Inner` whose API is never called (`change_of` only reads the watch's objects).
    /// A store's state, registered as the owner registry's entry for `https://lab` and `origin`.
    fn inner_at(origin: &str) -> (Arc<Inner>, mpsc::UnboundedReceiver<ClusterChange>) {
        let (client, _) = client();
        let (adopt_tx, rx) = mpsc::unbounded_channel();
        let inner = Inner::registered(client, "ns".into(), 10, origin, adopt_tx);
        (inner, rx)
    }

    fn inner() -> (Arc<Inner>, mpsc::UnboundedReceiver<ClusterChange>) {
        inner_at("https://unused")
    }

    fn record(id: &str, replicas: i64) -> ServiceRecord {
        let mut spec = DeploySpec::named("m");
        spec.replica_count = Some(replicas);
        ServiceRecord::new(
            id.into(),
            spec,
            serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).expect("time"),
        )
    }

    /// The resource as the shim writes it: spec and record annotation from one record.
    fn written(record: &ServiceRecord) -> ModelService {
        let mut object = ModelService::new(&record.id, ModelServiceSpec::from(&record.spec));
        object.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_RECORD.to_string(),
            serde_json::to_string(record).expect("json"),
        )]));
        object
    }

    fn at_version(mut object: ModelService, rv: u64) -> ModelService {
        object.metadata.resource_version = Some(rv.to_string());
        object.metadata.uid = Some(format!("uid-{}", object.name_any()));
        object.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        object
    }

    #[tokio::test]
    async fn the_shims_own_writes_are_no_change_and_each_outside_change_is_reported_once() {
        let (inner, _rx) = inner_at("https://owner-test");
        let mine = record("abc", 1);
        inner
            .records
            .lock()
            .unwrap()
            .insert("abc".into(), Arc::new(mine.clone()));

        // Its own write, as the API server answered it and then through the watch: nothing.
        let object = at_version(written(&mine), 7);
        assert!(!remember(&inner, &object, Some(&mine), true));
        assert_eq!(change_of(&inner, false, &object), vec![]);
        // The shimlet's ownerReferences name it, on this API server only.
        assert_eq!(
            owner_uid("https://owner-test", "ns", "abc").as_deref(),
            Some("uid-abc")
        );
        assert_eq!(owner_uid("https://elsewhere", "ns", "abc"), None);
        assert_eq!(owner_uid("https://owner-test", "other", "abc"), None);

        // `kubectl scale`: the spec differs from the annotation's → one update.
        let mut scaled = at_version(object.clone(), 8);
        scaled.spec.replica_count = Some(3);
        match change_of(&inner, false, &scaled).as_slice() {
            [ClusterChange::Update { id, spec }] => {
                assert_eq!(id, "abc");
                assert_eq!(spec.replica_count, Some(3));
            }
            other => panic!("expected an update, got {other:?}"),
        }
        assert_eq!(change_of(&inner, false, &scaled), vec![], "reported twice");

        // `kubectl delete`: the finalizer holds it → delete, once the engine wants it gone.
        let mut deleting = at_version(object.clone(), 9);
        deleting.metadata.deletion_timestamp =
            Some(serde_json::from_value(serde_json::json!("2026-01-01T00:00:01Z")).expect("time"));
        assert_eq!(
            change_of(&inner, false, &deleting),
            vec![ClusterChange::Delete { id: "abc".into() }]
        );
        let mut terminating = mine.clone();
        terminating.desired = shim_core::Desired::Absent;
        terminating.generation = 2;
        inner
            .records
            .lock()
            .unwrap()
            .insert("abc".into(), Arc::new(terminating.clone()));
        assert_eq!(change_of(&inner, false, &deleting), vec![], "asked twice");
        assert_eq!(
            owner_uid("https://owner-test", "ns", "abc"),
            None,
            "no owner while deleting"
        );

        // Gone after a teardown: every replica hears that the service is deleted.
        match change_of(&inner, true, &deleting).as_slice() {
            [ClusterChange::Record(record)] => {
                assert_eq!(record.phase, Phase::Deleted);
                assert_eq!(record.generation, 2);
            }
            other => panic!("expected the deleted record, got {other:?}"),
        }
        // This process's own teardown (its record is no longer live) is no change.
        assert_eq!(change_of(&inner, true, &deleting), vec![]);
    }

    #[tokio::test]
    async fn a_deletion_that_skipped_the_finalizer_removes_the_workload() {
        let (inner, _rx) = inner();
        let mine = record("abc", 1);
        inner
            .records
            .lock()
            .unwrap()
            .insert("abc".into(), Arc::new(mine.clone()));
        assert_eq!(
            change_of(&inner, true, &written(&mine)),
            vec![ClusterChange::Delete { id: "abc".into() }]
        );
        assert!(inner.gone.lock().unwrap().contains("abc"));
    }

    #[tokio::test]
    async fn another_replicas_newer_record_reaches_the_engine_and_its_echo_does_not() {
        let (inner, _rx) = inner();
        let mine = record("abc", 1);
        inner
            .records
            .lock()
            .unwrap()
            .insert("abc".into(), Arc::new(mine.clone()));
        remember(&inner, &at_version(written(&mine), 5), Some(&mine), true);

        // The leader's progress on the same generation, written after this process's write.
        let mut running = mine.clone();
        running.phase = Phase::Running;
        running.endpoint = "http://x:8000/v1/chat/completions".into();
        match change_of(&inner, false, &at_version(written(&running), 6)).as_slice() {
            [ClusterChange::Record(record)] => assert_eq!(**record, running),
            other => panic!("expected the leader's record, got {other:?}"),
        }
        // Seen again (a relist): no change.
        assert_eq!(
            change_of(&inner, false, &at_version(written(&running), 6)),
            vec![]
        );
        // An old version arriving late never goes back.
        assert_eq!(
            change_of(&inner, false, &at_version(written(&mine), 4)),
            vec![]
        );

        // A follower's update: generation 2.
        let mut update = running.clone();
        update.generation = 2;
        update.spec.replica_count = Some(2);
        let mut object = at_version(written(&update), 9);
        object.spec = ModelServiceSpec::from(&update.spec);
        match change_of(&inner, false, &object).as_slice() {
            [ClusterChange::Record(record)] => assert_eq!(record.generation, 2),
            other => panic!("expected the update, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_resource_without_a_record_is_offered_for_adoption_once() {
        let (inner, _rx) = inner();
        let mut spec = ModelServiceSpec {
            model_name: "m".into(),
            ..ModelServiceSpec::default()
        };
        spec.replica_count = Some(2);
        let object = ModelService::new("from-kubectl", spec);
        match change_of(&inner, false, &object).as_slice() {
            [ClusterChange::Adopt { id, spec }] => {
                assert_eq!(id, "from-kubectl");
                assert_eq!(spec.model_name, "m");
                assert_eq!(spec.replica_count, Some(2));
            }
            other => panic!("expected an adoption, got {other:?}"),
        }
        assert_eq!(change_of(&inner, false, &object), vec![], "offered twice");
        // Deleting one the engine never had is no change either.
        assert_eq!(change_of(&inner, true, &object), vec![]);
    }

    async fn start_error(code: u16) -> String {
        let (client, mut handle) = client();
        tokio::spawn(async move {
            while let Some((_, reply)) = handle.next_request().await {
                let body = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "message": "refused here", "code": code});
                reply.send_response(
                    http::Response::builder()
                        .status(code)
                        .body(Full::new(Bytes::from(body.to_string())))
                        .expect("response"),
                );
            }
        });
        KubeStore::start(client, "ns".into(), "https://lab", 10)
            .await
            .expect_err("the start must fail")
            .to_string()
    }

    #[tokio::test]
    async fn a_missing_crd_or_missing_rbac_fails_the_start_saying_what_to_apply() {
        let missing = start_error(404).await;
        assert!(
            missing.contains("not installed on https://lab"),
            "{missing}"
        );
        assert!(
            missing.contains("deploy/crds/modelservices.yaml"),
            "{missing}"
        );
        let forbidden = start_error(403).await;
        assert!(
            forbidden.contains("not allowed to list modelservices"),
            "{forbidden}"
        );
        assert!(forbidden.contains("deploy/rbac.yaml"), "{forbidden}");
    }

    /// An API server outage during the last write: the caller is told, and the record is
    /// written again once the API server is back, without any further change.
    #[tokio::test]
    async fn a_failed_write_is_written_again_when_the_api_server_is_back() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (client, mut handle) = client();
        let up = Arc::new(AtomicBool::new(false));
        let status_writes = Arc::new(AtomicUsize::new(0));
        let (up2, writes2) = (up.clone(), status_writes.clone());
        tokio::spawn(async move {
            let mut watches = Vec::new();
            while let Some((request, reply)) = handle.next_request().await {
                let query = request.uri().query().unwrap_or_default().to_string();
                let respond = |code: u16, body: serde_json::Value| {
                    http::Response::builder()
                        .status(code)
                        .body(Full::new(Bytes::from(body.to_string())))
                        .expect("response")
                };
                if query.contains("watch=true") {
                    watches.push(reply); // held open, never answered
                } else if request.method() == http::Method::GET {
                    reply.send_response(respond(
                        200,
                        serde_json::json!({
                        "apiVersion": "xmod-shim.io/v1alpha1", "kind": "ModelServiceList",
                        "metadata": {"resourceVersion": "1"}, "items": []}),
                    ));
                } else if !up2.load(Ordering::SeqCst) {
                    reply.send_response(respond(
                        503,
                        serde_json::json!({"kind": "Status",
                        "apiVersion": "v1", "status": "Failure", "message": "down", "code": 503}),
                    ));
                } else {
                    if request.uri().path().ends_with("/status") {
                        writes2.fetch_add(1, Ordering::SeqCst);
                    }
                    reply.send_response(respond(
                        200,
                        serde_json::json!({
                        "apiVersion": "xmod-shim.io/v1alpha1", "kind": "ModelService",
                        "metadata": {"name": "abc", "namespace": "ns", "generation": 1, "uid": "u"},
                        "spec": {"modelName": "m"}}),
                    ));
                }
            }
        });
        let store = KubeStore::start(client, "ns".into(), "https://lab", 10)
            .await
            .expect("start");
        let err = store
            .save(&Arc::new(record("abc", 1)))
            .await
            .expect_err("the API server is down");
        assert!(
            err.to_string().contains("503") || err.to_string().contains("down"),
            "{err}"
        );
        up.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + RESAVE_AFTER + Duration::from_secs(5);
        while status_writes.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never written again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
