//! The [`Engine`] facade: accepts desired state, runs the reconciler, answers reads from memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::EngineConfig;
use crate::dry_run::{DryRun, Recorder, StepLog};
use crate::error::{Error, Result};
use crate::event::{Event, EventBus, EventKind, EventStream};
use crate::gpu::GpuAllocator;
use crate::phase::{self, Phase, TransitionError, Trigger};
use crate::pipeline::{Pipeline, PipelineContext, PipelineObserver, StepErrorKind, StepProgress};
use crate::queue::WorkQueue;
use crate::record::{Desired, ServiceRecord};
use crate::registry;
use crate::shimlet::{Failure, Notifier, Shimlet, ShimletContext, WorkloadState};
use crate::spec::{DeploySpec, ValidationPolicy};
use crate::store::{Ack, MemoryStore, Store};
use crate::workload::FailureReason;

mod leadership;

/// The running engine. Cheap to clone; clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("shimlet", &self.inner.shimlet_name)
            .field("pipeline", &self.inner.pipeline.name())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: EngineConfig,
    policy: ValidationPolicy,
    store: Arc<dyn Store>,
    bus: EventBus,
    shimlet: Arc<dyn Shimlet>,
    shimlet_name: String,
    pipeline: Arc<Pipeline>,
    queue: Arc<WorkQueue>,
    /// The GPU inventory and allocator shared with the shimlet (admission reads it).
    gpus: Arc<GpuAllocator>,
    /// The live services; every read is answered from here, never from a runtime. Each record
    /// is shared with the store that keeps it in memory: a change copies it (`Arc::make_mut`)
    /// and the next save shares the new one, so a service costs one record, not two.
    services: RwLock<HashMap<String, Arc<ServiceRecord>>>,
    /// Cancels the pipeline run in flight for an id when a newer request supersedes it.
    in_flight: Mutex<HashMap<String, CancellationToken>>,
    /// Consecutive failed reconciles per id, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    shutdown: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stats: ReconcileStats,
    /// Whether this engine may run pipelines now: `None` = always (one engine per store); with
    /// several replicas on one store, only the holder of the lease (see [`leadership`]).
    leading: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Counters the engine keeps about its reconciler, for metrics.
#[derive(Debug, Default)]
pub struct ReconcileStats {
    /// Reconciles finished.
    pub total: AtomicU64,
    /// Reconciles that ended in an error (retried with backoff).
    pub errors: AtomicU64,
    /// Reconcile time spent, microseconds.
    pub micros: AtomicU64,
    /// Histogram: reconciles that took at most each of [`RECONCILE_BUCKETS`] seconds.
    pub buckets: [AtomicU64; 8],
}

/// Upper bounds (seconds) of the reconcile-duration histogram.
pub const RECONCILE_BUCKETS: [f64; 8] = [0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0];

/// Registered plugins and which are active.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginInfo {
    /// Registered shimlets.
    pub shimlets: Vec<PluginEntryInfo>,
    /// Registered pipelines.
    pub pipelines: Vec<PluginEntryInfo>,
}

/// One plugin in [`PluginInfo`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginEntryInfo {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Whether this engine uses it.
    pub active: bool,
}

type ShimletMaker = Box<dyn FnOnce(ShimletContext) -> Arc<dyn Shimlet> + Send>;

/// Builds an [`Engine`]: `Engine::builder().config(..).shimlet("process").pipeline_named("opensourcellm").build().await`.
#[must_use = "call build().await to start the engine"]
pub struct EngineBuilder {
    config: EngineConfig,
    store: Option<Arc<dyn Store>>,
    shimlet_name: Option<String>,
    shimlet_maker: Option<ShimletMaker>,
    pipeline: Option<Pipeline>,
    pipeline_name: Option<String>,
    leading: Option<tokio::sync::watch::Receiver<bool>>,
}

impl EngineBuilder {
    /// Engine settings.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Where state lives (default: in memory).
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// A registered shimlet by name.
    pub fn shimlet(mut self, name: impl Into<String>) -> Self {
        self.shimlet_name = Some(name.into());
        self.shimlet_maker = None;
        self
    }

    /// A shimlet built by the embedder; the closure gets the notifier and GPU allocator.
    pub fn shimlet_instance(
        mut self,
        make: impl FnOnce(ShimletContext) -> Arc<dyn Shimlet> + Send + 'static,
    ) -> Self {
        self.shimlet_name = Some("custom".into());
        self.shimlet_maker = Some(Box::new(make));
        self
    }

    /// A pipeline built in code.
    pub fn pipeline(mut self, pipeline: Pipeline) -> Self {
        self.pipeline = Some(pipeline);
        self
    }

    /// A registered pipeline by name.
    pub fn pipeline_named(mut self, name: impl Into<String>) -> Self {
        self.pipeline_name = Some(name.into());
        self
    }

    /// Runs pipelines only while `leading` reads `true`: for several engines sharing one store,
    /// each asking "may I reconcile now?" of a leader election (a Kubernetes Lease, say). The
    /// others answer reads and accept requests into the store, and follow the leader's writes
    /// through [`Engine::mirror`]. Without it the engine always leads.
    pub fn leadership(mut self, leading: tokio::sync::watch::Receiver<bool>) -> Self {
        self.leading = Some(leading);
        self
    }

    /// Builds the plugins, loads the store, re-adopts what was running and starts the workers.
    ///
    /// # Errors
    /// Unknown or duplicate plugin names, a shimlet that cannot reach its runtime, an unreadable store.
    pub async fn build(self) -> Result<Engine> {
        let config = self.config;
        let queue = Arc::new(WorkQueue::new());
        let gpus = Arc::new(GpuAllocator::with_inventory(
            config.gpus.clone(),
            config.share_gpus,
            "nvidia-smi",
        ));
        let shimlet_name = self.shimlet_name.unwrap_or_else(|| "process".into());
        let context = ShimletContext {
            settings: config.plugin_settings(),
            state_dir: config.data_dir.join("shimlets").join(&shimlet_name),
            notifier: Notifier::new(queue.clone()),
            gpus: gpus.clone(),
        };
        let shimlet = match self.shimlet_maker {
            Some(make) => make(context),
            None => {
                let entry = registry::shimlet(&shimlet_name)?;
                (entry.factory)(context).await?
            }
        };
        let pipeline = match (self.pipeline, self.pipeline_name) {
            (Some(p), _) => p,
            (None, Some(name)) => {
                let entry = registry::pipeline(&name)?;
                (entry.factory)(&config.plugin_settings()).map_err(Error::Config)?
            }
            (None, None) => return Err(Error::Config("no pipeline given".into())),
        };
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new(config.event_history)));
        let live = store.load_live().await?;
        let inner = Arc::new(Inner {
            policy: config.validation_policy(),
            store,
            bus: EventBus::new(4096),
            shimlet,
            shimlet_name,
            pipeline: Arc::new(pipeline),
            queue,
            gpus,
            services: RwLock::new(
                live.into_iter()
                    .map(|r| (r.id.clone(), Arc::new(r)))
                    .collect(),
            ),
            in_flight: Mutex::default(),
            failures: Mutex::default(),
            shutdown: CancellationToken::new(),
            tasks: Mutex::default(),
            stats: ReconcileStats::default(),
            leading: self.leading,
            config,
        });
        let engine = Engine { inner };
        engine.restore_gpu_needs().await;
        if engine.is_leader() {
            engine.report_orphans().await;
        }
        engine.start_workers();
        engine.follow_leadership();
        Ok(engine)
    }
}

impl Engine {
    /// Starts building an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            config: EngineConfig::default(),
            store: None,
            shimlet_name: None,
            shimlet_maker: None,
            pipeline: None,
            pipeline_name: None,
            leading: None,
        }
    }

    /// Accepts a new service; returns its id once the request is durably stored. The deployment
    /// itself proceeds in the background (watch it with [`Engine::get`] or [`Engine::subscribe`]).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming each bad field; store errors.
    pub async fn deploy(&self, spec: DeploySpec) -> Result<String> {
        self.accepting()?;
        spec.validate(&self.inner.policy).map_err(Error::Invalid)?;
        let verdict = self.admit(&spec, None, false).await?;
        self.insert_new("deploy", spec, verdict.need, |services| {
            Ok(loop {
                let id = format!("{:08x}", rand::random::<u32>());
                if !services.contains_key(&id) {
                    break id;
                }
            })
        })
        .await
    }

    /// Stores and queues a new service under the id `choose` picks (under the services lock),
    /// announced as `action`. A record the store could not persist is forgotten again: the
    /// client is told it failed, and no service it does not know about may run.
    async fn insert_new(
        &self,
        action: &str,
        spec: DeploySpec,
        need: Option<crate::gpu::GpuNeed>,
        choose: impl FnOnce(&HashMap<String, Arc<ServiceRecord>>) -> Result<String>,
    ) -> Result<String> {
        let (id, ack) = {
            let mut services = self.inner.services.write().expect("services lock");
            let id = choose(&services)?;
            let record = Arc::new(ServiceRecord::new(id.clone(), spec, Utc::now()));
            let ack = self.inner.store.save(&record);
            self.emit(
                &record,
                EventKind::Accepted {
                    action: action.into(),
                },
            );
            self.emit(
                &record,
                EventKind::Transition {
                    from: None,
                    to: Phase::Pending,
                    trigger: None,
                    reason: None,
                    message: None,
                },
            );
            services.insert(id.clone(), record);
            (id, ack)
        };
        if let Err(err) = ack.await {
            self.inner
                .services
                .write()
                .expect("services lock")
                .remove(&id);
            return Err(err);
        }
        self.inner.gpus.set_need(&id, need);
        self.inner.queue.add(&id);
        Ok(id)
    }

    /// Replaces a service's spec; it converges to the new one (generation + 1).
    ///
    /// # Errors
    /// [`Error::NotFound`] for unknown or deleted ids; [`Error::Invalid`].
    pub async fn update(&self, id: &str, spec: DeploySpec) -> Result<()> {
        self.accepting()?;
        spec.validate(&self.inner.policy).map_err(Error::Invalid)?;
        let verdict = self.admit(&spec, Some(id), false).await?;
        let (ack, previous) = self.accept(id, "update", Trigger::Update, |record| {
            record.desired_replicas = spec.replicas();
            record.spec = spec;
            record.desired = Desired::Present;
        })?;
        if let Err(err) = ack.await {
            self.roll_back(previous);
            return Err(err);
        }
        self.inner.gpus.set_need(id, verdict.need);
        self.inner.queue.add(id);
        Ok(())
    }

    /// Asks for a service to be removed; it reads `terminating` until the runtime confirms, then
    /// `notExist`. Deleting a service that is already terminating changes nothing.
    ///
    /// # Errors
    /// [`Error::NotFound`] for unknown or deleted ids.
    pub async fn delete(&self, id: &str) -> Result<()> {
        self.accepting()?;
        {
            let services = self.inner.services.read().expect("services lock");
            match services.get(id) {
                Some(r) if r.desired == Desired::Absent => return Ok(()),
                Some(_) => {}
                None => return Err(Error::NotFound(id.to_string())),
            }
        }
        let (ack, previous) = self.accept(id, "delete", Trigger::Delete, |record| {
            record.desired = Desired::Absent;
        })?;
        if let Err(err) = ack.await {
            self.roll_back(previous);
            return Err(err);
        }
        self.inner.queue.add(id);
        Ok(())
    }

    /// Runs the pipeline for `spec` without creating anything: the runtime renders what `apply`
    /// would create (the manifests, container bodies or process plans).
    ///
    /// # Errors
    /// [`Error::Invalid`]; [`Error::DryRun`] naming the step that stopped (a missing model, or a
    /// shimlet that cannot render).
    pub async fn dry_run(&self, spec: DeploySpec) -> Result<DryRun> {
        spec.validate(&self.inner.policy).map_err(Error::Invalid)?;
        let verdict = self.admit(&spec, None, true).await?;
        let recorder = Arc::new(Recorder::new(self.inner.shimlet.clone()));
        let steps = Arc::new(StepLog::default());
        let context = PipelineContext::new("dry-run", 1, spec, recorder.clone(), steps.clone());
        self.inner
            .pipeline
            .run(&context)
            .await
            .map_err(Error::DryRun)?;
        // What a dry run shows leaves the shim: secret environment values are redacted.
        let mut workloads = std::mem::take(&mut *recorder.workloads.lock().expect("dry-run lock"));
        for workload in &mut workloads {
            crate::redact::redact_env(&mut workload.env);
        }
        let mut manifests = std::mem::take(&mut *recorder.manifests.lock().expect("dry-run lock"));
        manifests.iter_mut().for_each(crate::redact::redact_json);
        let steps = std::mem::take(&mut *steps.0.lock().expect("dry-run lock"));
        Ok(DryRun {
            workloads,
            manifests,
            steps,
            estimate: verdict.estimate,
        })
    }

    /// Checks `spec` against the GPUs at request time (`engine.fitCheck`), before anything is
    /// accepted; see [`crate::admission`].
    async fn admit(
        &self,
        spec: &DeploySpec,
        id: Option<&str>,
        dry_run: bool,
    ) -> Result<crate::admission::Verdict> {
        crate::admission::admit(
            &self.inner.pipeline,
            &self.inner.gpus,
            self.inner.shimlet.cluster_gpus(),
            self.inner.config.fit_check,
            spec,
            id,
            dry_run,
        )
        .await
    }

    /// Records again what each loaded service needs per GPU (kept in memory only), before any
    /// replica is placed again.
    async fn restore_gpu_needs(&self) {
        if self.inner.config.fit_check == crate::FitCheck::Off {
            return;
        }
        let wanted: Vec<(String, DeploySpec)> = self
            .inner
            .services
            .read()
            .expect("services lock")
            .values()
            .filter(|r| r.desired == Desired::Present && r.spec.accelerators() > 0)
            .map(|r| (r.id.clone(), r.spec.clone()))
            .collect();
        for (id, spec) in wanted {
            let need = crate::admission::need_of(
                &self.inner.pipeline,
                &self.inner.gpus,
                self.inner.shimlet.cluster_gpus(),
                &spec,
                &id,
            )
            .await;
            self.inner.gpus.set_need(&id, need);
        }
    }

    /// This host's GPU inventory and allocator, which the local runtimes place replicas with.
    pub fn gpus(&self) -> &Arc<GpuAllocator> {
        &self.inner.gpus
    }

    /// The GPUs services get (`GET /api/v1/gpus`, GPU metrics): the cluster's nodes' when the
    /// runtime's scheduler places replicas ([`Shimlet::cluster_gpus`]), else this host's. May
    /// run `nvidia-smi`: call it off the async workers.
    pub fn gpu_inventory(&self) -> Vec<crate::gpu::GpuStatus> {
        match self.inner.shimlet.cluster_gpus() {
            Some(cluster) => cluster.rows(),
            None => self.inner.gpus.snapshot(),
        }
    }

    /// A live service's record; `None` once deleted or never deployed.
    pub fn get(&self, id: &str) -> Option<ServiceRecord> {
        self.with_service(id, ServiceRecord::clone)
    }

    /// Runs `f` on a live service's record without cloning it (hot read path of the API).
    pub fn with_service<R>(&self, id: &str, f: impl FnOnce(&ServiceRecord) -> R) -> Option<R> {
        self.inner
            .services
            .read()
            .expect("services lock")
            .get(id)
            .map(|record| f(record))
    }

    /// Every live service, oldest first.
    pub fn list(&self) -> Vec<ServiceRecord> {
        let mut all: Vec<_> = self
            .inner
            .services
            .read()
            .expect("services lock")
            .values()
            .map(|record| ServiceRecord::clone(record))
            .collect();
        all.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        all
    }

    /// Number of live services per phase.
    pub fn phase_counts(&self) -> Vec<(Phase, usize)> {
        let mut counts: Vec<(Phase, usize)> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
        for record in self.inner.services.read().expect("services lock").values() {
            if let Some(entry) = counts.iter_mut().find(|(p, _)| *p == record.phase) {
                entry.1 += 1;
            }
        }
        counts
    }

    /// A record from the store, deleted ones included (history).
    ///
    /// # Errors
    /// Store errors.
    pub async fn history(&self, id: &str) -> Result<Option<ServiceRecord>> {
        match self.get(id) {
            Some(record) => Ok(Some(record)),
            None => self.inner.store.get(id).await,
        }
    }

    /// The newest `limit` events of a service, oldest first.
    ///
    /// # Errors
    /// [`Error::NotFound`] for ids never seen; store errors.
    pub async fn events(&self, id: &str, limit: usize) -> Result<Vec<Event>> {
        if self.history(id).await?.is_none() {
            return Err(Error::NotFound(id.to_string()));
        }
        self.inner.store.events(id, limit).await
    }

    /// The last `tail` lines of a live service's logs, from its runtime.
    ///
    /// # Errors
    /// [`Error::NotFound`]; the shimlet's error (e.g. logs unsupported).
    pub async fn logs(&self, id: &str, tail: usize) -> Result<String> {
        if self.get(id).is_none() {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok(self.inner.shimlet.logs(id, tail).await?)
    }

    /// Runs `f` over every live service under one read lock, without cloning records: for
    /// readers on a hot path (the gateway's routing) that need a few fields of many services.
    /// `f` must be quick; writers wait while it runs.
    pub fn for_each_service(&self, mut f: impl FnMut(&ServiceRecord)) {
        let services = self.inner.services.read().expect("services lock");
        for record in services.values() {
            f(record);
        }
    }

    /// Asks the reconciler to look at a service now rather than at the next resync, e.g. when
    /// a client of its replicas saw one refuse connections.
    pub fn nudge(&self, id: &str) {
        self.inner.queue.add(id);
    }

    /// Subscribes to every event from now on.
    pub fn subscribe(&self) -> EventStream {
        self.inner.bus.subscribe()
    }

    /// The active shimlet's name.
    pub fn shimlet_name(&self) -> &str {
        &self.inner.shimlet_name
    }

    /// The active pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.inner.pipeline
    }

    /// The active shimlet.
    pub fn shimlet(&self) -> &Arc<dyn Shimlet> {
        &self.inner.shimlet
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Reconciler counters.
    pub fn reconcile_stats(&self) -> &ReconcileStats {
        &self.inner.stats
    }

    /// Registered plugins, marking the active ones.
    pub fn plugins(&self) -> PluginInfo {
        let shimlets = registry::shimlets().unwrap_or_default();
        let pipelines = registry::pipelines().unwrap_or_default();
        PluginInfo {
            shimlets: shimlets
                .iter()
                .map(|e| PluginEntryInfo {
                    name: e.name.into(),
                    description: e.description.into(),
                    active: e.name == self.inner.shimlet_name,
                })
                .collect(),
            pipelines: pipelines
                .iter()
                .map(|e| PluginEntryInfo {
                    name: e.name.into(),
                    description: e.description.into(),
                    active: e.name == self.inner.pipeline.name(),
                })
                .collect(),
        }
    }

    /// Stops the workers and waits for them. Workloads keep running, to be re-adopted next start.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.queue.close();
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
        for task in tasks {
            let _ = task.await;
        }
    }

    fn accepting(&self) -> Result<()> {
        if self.inner.shutdown.is_cancelled() {
            Err(Error::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Applies an accepted request to a live record: new generation, FSM transition, cancel the
    /// superseded pipeline run, store, publish. Returns the store's acknowledgement and the
    /// record as it was, for [`Engine::roll_back`] when the write fails.
    fn accept(
        &self,
        id: &str,
        action: &str,
        trigger: Trigger,
        change: impl FnOnce(&mut ServiceRecord),
    ) -> Result<(Ack, Arc<ServiceRecord>)> {
        let mut services = self.inner.services.write().expect("services lock");
        let entry = services
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let to = phase::next(entry.phase, trigger).map_err(|e| Error::Config(e.to_string()))?;
        let previous = Arc::clone(entry);
        let from = entry.phase;
        let record = Arc::make_mut(entry);
        change(record);
        record.generation += 1;
        record.phase = to;
        record.reason = None;
        record.message = None;
        record.endpoint.clear();
        record.ready_replicas = 0;
        record.replicas.clear();
        record.restarts = 0;
        record.blocked_step = None;
        record.steps.clear();
        record.updated_at = Utc::now();
        if let Some(token) = self
            .inner
            .in_flight
            .lock()
            .expect("in-flight lock")
            .remove(id)
        {
            token.cancel();
        }
        let ack = self.inner.store.save(entry);
        self.emit(
            entry,
            EventKind::Accepted {
                action: action.into(),
            },
        );
        self.emit(
            entry,
            EventKind::Transition {
                from: Some(from),
                to,
                trigger: Some(trigger),
                reason: None,
                message: None,
            },
        );
        Ok((ack, previous))
    }

    /// Puts back the record as it was before a request whose store write failed (a full disk):
    /// the client was told it failed, so nothing of it may remain. The superseded run was
    /// cancelled, so the service is queued to converge on its previous spec again.
    fn roll_back(&self, previous: Arc<ServiceRecord>) {
        let id = previous.id.clone();
        {
            let mut services = self.inner.services.write().expect("services lock");
            match services.get_mut(&id) {
                Some(record) if record.generation == previous.generation + 1 => {
                    tracing::warn!(service_id = %id, generation = record.generation,
                        "the store could not persist the request; the service keeps its previous spec");
                    *record = previous;
                }
                // A newer request got through meanwhile; it decides.
                _ => return,
            }
        }
        self.inner.queue.add(&id);
    }

    fn emit(&self, record: &ServiceRecord, kind: EventKind) {
        log_event(&record.id, record.generation, &kind);
        let event = Event {
            time: Utc::now(),
            service_id: record.id.clone(),
            generation: record.generation,
            kind,
        };
        // History is best effort; the record itself is what must be durable.
        drop(self.inner.store.append_event(&event));
        self.inner.bus.publish(event);
    }

    /// Moves a service through the FSM if it is still at `generation`. Returns `None` for stale
    /// work (a newer request arrived), else the store acknowledgement.
    fn transition(
        &self,
        id: &str,
        generation: u64,
        trigger: Trigger,
        failure: Option<(FailureReason, String)>,
        change: impl FnOnce(&mut ServiceRecord),
    ) -> Result<Option<Ack>, TransitionError> {
        let mut services = self.inner.services.write().expect("services lock");
        let Some(record) = services.get_mut(id) else {
            return Ok(None);
        };
        if record.generation != generation {
            return Ok(None);
        }
        let event = apply_trigger(Arc::make_mut(record), trigger, failure, change)?;
        let to = record.phase;
        let ack = self.inner.store.save(record);
        if let Some(event) = event {
            self.emit(record, event);
        }
        if to == Phase::Deleted {
            services.remove(id);
        }
        Ok(Some(ack))
    }

    async fn report_orphans(&self) {
        match self.inner.shimlet.list().await {
            Ok(workloads) => {
                let services = self.inner.services.read().expect("services lock");
                for workload in workloads
                    .iter()
                    .filter(|w| !services.contains_key(&w.service_id))
                {
                    tracing::warn!(
                        service_id = %workload.service_id,
                        name = %workload.name,
                        "runtime holds a workload this shim has no record of; leaving it alone"
                    );
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not list managed workloads"),
        }
    }

    fn start_workers(&self) {
        let mut tasks = self.inner.tasks.lock().expect("tasks lock");
        for _ in 0..self.inner.config.workers.max(1) {
            let engine = self.clone();
            tasks.push(tokio::spawn(async move { engine.work().await }));
        }
        let engine = self.clone();
        tasks.push(tokio::spawn(async move { engine.resync().await }));
        self.enqueue_all();
    }

    /// Queues the services waiting for resources.
    fn enqueue_blocked(&self) {
        let ids: Vec<String> = self
            .inner
            .services
            .read()
            .expect("services lock")
            .values()
            .filter(|r| r.blocked_step.is_some())
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            self.inner.queue.add(&id);
        }
    }

    /// Queues every live service (start-up and periodic resync).
    fn enqueue_all(&self) {
        let ids: Vec<String> = self
            .inner
            .services
            .read()
            .expect("services lock")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.inner.queue.add(&id);
        }
    }

    async fn resync(&self) {
        let mut ticker = tokio::time::interval(self.inner.config.resync_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if self.is_leader() {
                self.enqueue_all();
            }
        }
    }

    async fn work(&self) {
        while let Some(id) = self.inner.queue.next().await {
            // A follower leaves the work to the leader; it queues everything again when it leads.
            if !self.is_leader() {
                self.inner.queue.done(&id);
                continue;
            }
            let started = Instant::now();
            // Each reconcile runs in its own task so a panicking step cannot take a worker down.
            let engine = self.clone();
            let key = id.clone();
            let outcome = tokio::spawn(async move { engine.reconcile(&key).await })
                .await
                .unwrap_or_else(|panic| Outcome::Retry(format!("reconcile panicked: {panic}")));
            self.record_stats(started.elapsed(), matches!(outcome, Outcome::Retry(_)));
            self.inner.queue.done(&id);
            match outcome {
                Outcome::Done => {
                    self.inner
                        .failures
                        .lock()
                        .expect("failures lock")
                        .remove(&id);
                }
                Outcome::Retry(error) => {
                    let failures = {
                        let mut map = self.inner.failures.lock().expect("failures lock");
                        let n = map.entry(id.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    let delay = backoff(
                        self.inner.config.backoff_base,
                        self.inner.config.backoff_cap,
                        failures,
                    );
                    tracing::debug!(service_id = %id, %error, ?delay, "reconcile will be retried");
                    if !self.inner.shutdown.is_cancelled() {
                        self.inner.queue.add_after(&id, delay);
                    }
                }
            }
        }
    }

    fn record_stats(&self, elapsed: Duration, failed: bool) {
        let stats = &self.inner.stats;
        stats.total.fetch_add(1, Ordering::Relaxed);
        if failed {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        stats
            .micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        for (bucket, bound) in stats.buckets.iter().zip(RECONCILE_BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Level-triggered: compares the desired state of one service with what its runtime shows,
    /// and does the next thing needed.
    async fn reconcile(&self, id: &str) -> Outcome {
        let Some(record) = self.get(id) else {
            return Outcome::Done;
        };
        if record.desired == Desired::Absent {
            return self.tear_down(record).await;
        }
        match record.phase {
            Phase::Pending | Phase::Initializing | Phase::Recovering => self.converge(record).await,
            Phase::Running => self.check_running(record).await,
            Phase::Failed | Phase::Terminating | Phase::Deleted => Outcome::Done,
        }
    }

    async fn check_running(&self, record: ServiceRecord) -> Outcome {
        let observed = match self.inner.shimlet.observe(&record.id).await {
            Ok(observed) => observed,
            Err(err) => return Outcome::Retry(err.to_string()),
        };
        if observed.state == WorkloadState::Ready {
            if observed.ready_replicas != record.ready_replicas
                || observed.replica_addresses != record.replicas
            {
                let ack =
                    self.transition(&record.id, record.generation, Trigger::Ready, None, |r| {
                        r.ready_replicas = observed.ready_replicas;
                        r.replicas = observed.replica_addresses.clone();
                        r.reason = None;
                    });
                if let Ok(Some(ack)) = ack {
                    let _ = ack.await;
                }
            }
            return Outcome::Done;
        }
        // Drift: a replica exited, crashed, or was removed behind our back.
        let (reason, detail) = match &observed.failure {
            Some(f) => (f.reason, f.message.clone()),
            None if observed.state == WorkloadState::Missing => (
                FailureReason::WorkloadMissing,
                "the workload disappeared from the runtime".to_string(),
            ),
            None => (
                FailureReason::RuntimeError,
                format!("workload is {:?}", observed.state),
            ),
        };
        self.emit(
            &record,
            EventKind::Observed {
                ready: observed.ready_replicas,
                desired: record.desired_replicas,
                message: detail.clone(),
            },
        );
        if record.restarts >= self.inner.config.max_restarts {
            let message = format!("gave up after {} repairs; last: {detail}", record.restarts);
            let reason = if reason == FailureReason::Exited {
                FailureReason::CrashLoop
            } else {
                reason
            };
            return self
                .settle(self.transition(
                    &record.id,
                    record.generation,
                    Trigger::Fail,
                    Some((reason, message)),
                    |r| {
                        r.endpoint.clear();
                        r.ready_replicas = observed.ready_replicas;
                        r.replicas.clear();
                    },
                ))
                .await;
        }
        let repaired = self.transition(
            &record.id,
            record.generation,
            Trigger::Degrade,
            Some((reason, detail)),
            |r| {
                r.restarts += 1;
                r.ready_replicas = observed.ready_replicas;
                // The replicas still ready keep serving while the rest is repaired.
                r.replicas = observed.replica_addresses.clone();
            },
        );
        match repaired {
            Ok(Some(ack)) => {
                let _ = ack.await;
                match self.get(&record.id) {
                    Some(current) => self.converge(current).await,
                    None => Outcome::Done,
                }
            }
            Ok(None) => Outcome::Done,
            Err(err) => Outcome::Retry(err.to_string()),
        }
    }

    /// Runs the deploy pipeline for the record's generation.
    async fn converge(&self, record: ServiceRecord) -> Outcome {
        let generation = record.generation;
        let steps = self.inner.pipeline.initial_progress();
        // A service waiting for resources stays `pending` with its reason while it tries again;
        // it turns `initializing` only once the step that blocked it gets through (see
        // `RunObserver`), so clients do not see it flap between the two.
        let retrying_blocked = record.phase == Phase::Pending && record.blocked_step.is_some();
        let trigger = if retrying_blocked {
            Trigger::Block
        } else {
            Trigger::Start
        };
        let waiting_for_runtime = record.reason == Some(FailureReason::RuntimeUnavailable.as_str());
        let started = self.transition(&record.id, generation, trigger, None, |r| {
            r.steps = steps;
            // Keep the reason visible while a blocked service retries, while a running
            // service that lost a replica recovers, and while the runtime is unreachable.
            if retrying_blocked || waiting_for_runtime || r.phase == Phase::Recovering {
                r.reason = record.reason.clone();
                r.message = record.message.clone();
            }
        });
        match started {
            Ok(Some(ack)) => {
                if let Err(err) = ack.await {
                    return Outcome::Retry(err.to_string());
                }
            }
            Ok(None) => return Outcome::Done,
            Err(err) => return Outcome::Retry(err.to_string()),
        }
        let Some(token) = self.register_run(&record.id, generation) else {
            return Outcome::Done;
        };
        let context = self.context(&record, generation);
        let result = tokio::select! {
            result = self.inner.pipeline.run(&context) => Some(result),
            _ = token.cancelled() => None,
        };
        self.inner
            .in_flight
            .lock()
            .expect("in-flight lock")
            .remove(&record.id);
        let Some(result) = result else {
            // Superseded by a newer request (which re-queued the id) or shutting down.
            return Outcome::Done;
        };
        match result {
            Ok(()) => {
                let observed = self.inner.shimlet.observe(&record.id).await.ok();
                let endpoint = context.endpoint().unwrap_or_default();
                self.settle(
                    self.transition(&record.id, generation, Trigger::Ready, None, |r| {
                        r.endpoint = endpoint;
                        r.applied_generation = generation;
                        match observed {
                            Some(o) => {
                                r.ready_replicas = o.ready_replicas;
                                r.replicas = o.replica_addresses;
                            }
                            None => r.ready_replicas = r.desired_replicas,
                        }
                    }),
                )
                .await
            }
            Err(failure) if failure.error.kind == StepErrorKind::Blocked => {
                let message = format!("{}: {}", failure.step, failure.error.message);
                let outcome = self
                    .settle(self.transition(
                        &record.id,
                        generation,
                        Trigger::Block,
                        Some((failure.error.reason, message.clone())),
                        |r| r.blocked_step = Some(failure.step.clone()),
                    ))
                    .await;
                match outcome {
                    Outcome::Done => Outcome::Retry(message),
                    other => other,
                }
            }
            Err(failure) if failure.error.kind == StepErrorKind::Unavailable => {
                // Never a reason to fail: the phase stays, the reason says why nothing moves,
                // and the run is tried again (capped backoff) until the runtime answers.
                let message = format!("{}: {}", failure.step, failure.error.message);
                let outcome = self
                    .settle(self.transition(
                        &record.id,
                        generation,
                        Trigger::Unavailable,
                        Some((FailureReason::RuntimeUnavailable, message.clone())),
                        |_| {},
                    ))
                    .await;
                match outcome {
                    Outcome::Done => Outcome::Retry(message),
                    other => other,
                }
            }
            Err(failure) => {
                let message = format!("step {} failed: {}", failure.step, failure.error.message);
                self.settle(self.transition(
                    &record.id,
                    generation,
                    Trigger::Fail,
                    Some((failure.error.reason, message)),
                    |r| {
                        r.endpoint.clear();
                        r.replicas.clear();
                    },
                ))
                .await
            }
        }
    }

    async fn tear_down(&self, record: ServiceRecord) -> Outcome {
        let generation = record.generation;
        let Some(token) = self.register_run(&record.id, generation) else {
            return Outcome::Done;
        };
        let context = self.context(&record, generation);
        let result = tokio::select! {
            result = self.inner.pipeline.run_teardown(&context) => Some(result),
            _ = token.cancelled() => None,
        };
        self.inner
            .in_flight
            .lock()
            .expect("in-flight lock")
            .remove(&record.id);
        match result {
            None => Outcome::Done,
            Some(Ok(())) => {
                let outcome = self
                    .settle(self.transition(
                        &record.id,
                        generation,
                        Trigger::TornDown,
                        None,
                        |_| {},
                    ))
                    .await;
                // What it held (GPUs, ports) is free now: services waiting for resources need
                // not sit out their backoff.
                self.enqueue_blocked();
                outcome
            }
            Some(Err(failure)) => {
                let message = format!(
                    "teardown step {} failed: {}",
                    failure.step, failure.error.message
                );
                let mut services = self.inner.services.write().expect("services lock");
                if let Some(r) = services
                    .get_mut(&record.id)
                    .filter(|r| r.generation == generation)
                {
                    let record = Arc::make_mut(r);
                    record.reason = Some(failure.error.reason.as_str());
                    record.message = Some(message.clone());
                    drop(self.inner.store.save(r));
                }
                Outcome::Retry(message)
            }
        }
    }

    /// Awaits a transition's store write and turns the result into an outcome.
    async fn settle(&self, transition: Result<Option<Ack>, TransitionError>) -> Outcome {
        match transition {
            Ok(Some(ack)) => match ack.await {
                Ok(()) => Outcome::Done,
                Err(err) => Outcome::Retry(err.to_string()),
            },
            Ok(None) => Outcome::Done,
            Err(err) => Outcome::Retry(err.to_string()),
        }
    }

    /// Registers a cancellable run for `id` at `generation`; `None` if it is already stale.
    fn register_run(&self, id: &str, generation: u64) -> Option<CancellationToken> {
        let services = self.inner.services.read().expect("services lock");
        if services.get(id).map(|r| r.generation) != Some(generation) {
            return None;
        }
        let token = self.inner.shutdown.child_token();
        self.inner
            .in_flight
            .lock()
            .expect("in-flight lock")
            .insert(id.to_string(), token.clone());
        Some(token)
    }

    fn context(&self, record: &ServiceRecord, generation: u64) -> PipelineContext {
        let observer = Arc::new(RunObserver {
            engine: Arc::downgrade(&self.inner),
            id: record.id.clone(),
            generation,
        });
        PipelineContext::new(
            record.id.clone(),
            generation,
            record.spec.clone(),
            self.inner.shimlet.clone(),
            observer,
        )
    }

    /// Accepts a service under an id chosen elsewhere, as [`Engine::deploy`] would (validate,
    /// admit, store, queue): for a store whose resources can be created behind the engine's back
    /// (a `ModelService` made with `kubectl apply` is named by its id).
    ///
    /// # Errors
    /// [`Error::Invalid`] for an id that is not a DNS label (1 to 63 lower-case letters, digits
    /// and inner `-`: ids become object names) or a bad spec; [`Error::Config`] when the id is
    /// already taken; store errors.
    pub async fn adopt(&self, id: String, spec: DeploySpec) -> Result<()> {
        self.accepting()?;
        let dns_label = !id.is_empty()
            && id.len() <= 63
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !id.starts_with('-')
            && !id.ends_with('-');
        if !dns_label {
            return Err(Error::Invalid(vec![crate::spec::FieldError {
                field: "id".into(),
                message: format!(
                    "{id:?} is not a DNS label (1-63 lower-case letters, digits and inner '-')"
                ),
            }]));
        }
        spec.validate(&self.inner.policy).map_err(Error::Invalid)?;
        let verdict = self.admit(&spec, None, false).await?;
        self.insert_new("adopt", spec, verdict.need, |services| {
            // A deleted record stays as history under its id; a new service may take the id over.
            if services.get(&id).is_some_and(|r| r.is_live()) {
                return Err(Error::Config(format!("service {id} already exists")));
            }
            Ok(id)
        })
        .await
        .map(drop)
    }
}

/// Moves `record` through the FSM: new phase, the failure's reason and message (cleared when
/// there is none), then `change`. Returns the transition event when something visible changed.
fn apply_trigger(
    record: &mut ServiceRecord,
    trigger: Trigger,
    failure: Option<(FailureReason, String)>,
    change: impl FnOnce(&mut ServiceRecord),
) -> Result<Option<EventKind>, TransitionError> {
    let to = phase::next(record.phase, trigger)?;
    let from = record.phase;
    let before = (
        record.phase,
        record.reason.take(),
        record.message.take(),
        record.endpoint.clone(),
    );
    if let Some((reason, message)) = failure {
        record.reason = Some(reason.as_str());
        record.message = Some(message);
    }
    record.phase = to;
    if to != Phase::Pending {
        record.blocked_step = None;
    }
    change(record);
    let after = (
        record.phase,
        record.reason.clone(),
        record.message.clone(),
        record.endpoint.clone(),
    );
    if before == after {
        return Ok(None);
    }
    record.updated_at = Utc::now();
    Ok(Some(EventKind::Transition {
        from: Some(from),
        to,
        trigger: Some(trigger),
        reason: record.reason.clone(),
        message: record.message.clone(),
    }))
}

/// Every event also goes to the log, so an operator tailing it sees each long wait progress.
fn log_event(id: &str, generation: u64, kind: &EventKind) {
    match kind {
        EventKind::Transition {
            from,
            to,
            reason,
            message,
            ..
        } => tracing::info!(
            service_id = id,
            generation,
            from = from.map(|p| p.to_string()),
            to = %to,
            reason = reason.as_deref(),
            message = message.as_deref(),
            "service {id} is now {}",
            to.wire_word()
        ),
        EventKind::StepProgress { step, message } => {
            tracing::info!(
                service_id = id,
                generation,
                step = step.as_str(),
                "{message}"
            )
        }
        EventKind::StepRetrying {
            step,
            attempt,
            error,
            delay_ms,
        } => tracing::warn!(
            service_id = id,
            generation,
            step = step.as_str(),
            attempt,
            delay_ms,
            "step failed, retrying: {error}"
        ),
        EventKind::StepFailed { step, error } => {
            tracing::warn!(
                service_id = id,
                generation,
                step = step.as_str(),
                "step failed: {error}"
            )
        }
        EventKind::Observed { message, .. } => {
            tracing::warn!(service_id = id, generation, "runtime: {message}")
        }
        other => tracing::debug!(service_id = id, generation, event = ?other),
    }
}

/// What a reconcile asks the worker to do next.
enum Outcome {
    /// Nothing until the next change or resync.
    Done,
    /// Failed; retry with exponential backoff.
    Retry(String),
}

fn backoff(base: Duration, cap: Duration, failures: u32) -> Duration {
    base.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
        .min(cap)
}

/// Records a pipeline run's progress on the service and publishes it.
struct RunObserver {
    engine: std::sync::Weak<Inner>,
    id: String,
    generation: u64,
}

impl RunObserver {
    /// Runs `f` on this run's record if it is still at this run's generation.
    fn with_record(&self, f: impl FnOnce(&Engine, &mut Arc<ServiceRecord>)) {
        let Some(inner) = self.engine.upgrade() else {
            return;
        };
        let engine = Engine { inner };
        let mut services = engine.inner.services.write().expect("services lock");
        if let Some(record) = services
            .get_mut(&self.id)
            .filter(|r| r.generation == self.generation)
        {
            f(&engine, record);
        }
    }
}

/// A step got through after the runtime was unreachable: it answers again, so the outage is
/// no longer the reason the service is not ready yet.
fn runtime_back(engine: &Engine, record: &mut Arc<ServiceRecord>) {
    if record.reason == Some(FailureReason::RuntimeUnavailable.as_str())
        && matches!(record.phase, Phase::Initializing | Phase::Recovering)
        && let Ok(Some(transition)) =
            apply_trigger(Arc::make_mut(record), Trigger::Start, None, |_| {})
    {
        drop(engine.inner.store.save(record));
        engine.emit(record, transition);
    }
}

/// A pending service whose blocking step got through is initializing again.
fn unblock(engine: &Engine, record: &mut Arc<ServiceRecord>, step: &str) {
    if record.phase == Phase::Pending
        && record.blocked_step.as_deref() == Some(step)
        && let Ok(Some(transition)) =
            apply_trigger(Arc::make_mut(record), Trigger::Start, None, |_| {})
    {
        drop(engine.inner.store.save(record));
        engine.emit(record, transition);
    }
}

impl PipelineObserver for RunObserver {
    fn on_change(&self, steps: &[StepProgress], event: EventKind) {
        self.with_record(|engine, record| {
            if let EventKind::StepSucceeded { step, .. } = &event {
                unblock(engine, record, step);
                runtime_back(engine, record);
            }
            // Teardown steps are events only; the record shows the deploy steps of this
            // generation.
            if record.desired == Desired::Present {
                Arc::make_mut(record).steps = steps.to_vec();
                if !matches!(event, EventKind::StepProgress { .. }) {
                    drop(engine.inner.store.save(record));
                }
            }
            engine.emit(record, event);
        });
    }

    fn on_unblocked(&self, step: &str) {
        self.with_record(|engine, record| unblock(engine, record, step));
    }

    fn on_reason(&self, _step: &str, why: Option<&Failure>) {
        self.with_record(|engine, record| {
            // Only a service on its way up: a pending one shows what it waits for, and a
            // settled one has its own reason.
            if !matches!(record.phase, Phase::Initializing | Phase::Recovering) {
                return;
            }
            let reason = why.map(|f| f.reason.as_str());
            let message = why.map(|f| f.message.clone());
            if record.reason == reason && record.message == message {
                return;
            }
            let changed = Arc::make_mut(record);
            changed.reason = reason;
            changed.message = message;
            drop(engine.inner.store.save(record));
        });
    }
}

#[cfg(test)]
mod tests;
