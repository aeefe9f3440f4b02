//! Engine and reconciler tests against the in-memory store and the instant test shimlet.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::event::Received;
use crate::pipeline::StepError;
use crate::store::RedbStore;
use crate::testing::InstantShimlet;
use crate::workload::WorkloadSpec;

/// Blocked attempts of the "scheduled-later" model (one test uses it).
static SCHEDULING_WAITS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Lets the "restarting" model's wait step finish (one test uses it).
static RESTARTS_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Blocked attempts left for the "gpu-later" model (one test uses it).
static GPU_WAITS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn test_pipeline() -> Pipeline {
    test_steps().build()
}

fn test_steps() -> crate::pipeline::PipelineBuilder {
    Pipeline::new("test")
        .step("apply", |ctx: PipelineContext| async move {
            let mut workload = WorkloadSpec::new(ctx.service_id(), ctx.generation(), "img");
            workload.replicas = ctx.spec().replicas();
            if ctx.spec().model_name == "needs-gpu" {
                return Err(StepError::blocked(
                    FailureReason::Unschedulable,
                    "insufficient GPUs: 1 requested, 0 free",
                ));
            }
            if ctx.spec().model_name == "gpu-later"
                && GPU_WAITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3
            {
                return Err(StepError::blocked(
                    FailureReason::Unschedulable,
                    "insufficient GPUs: 1 requested, 0 free",
                ));
            }
            if ctx.spec().model_name == "broken" {
                return Err(StepError::permanent(
                    FailureReason::ModelNotFound,
                    "no such model",
                ));
            }
            ctx.shimlet().apply(&workload).await?;
            Ok(())
        })
        .step("wait", |ctx: PipelineContext| async move {
            if ctx.spec().model_name == "restarting" {
                // The runtime restarts a crashed container: not a failure yet, but visible.
                ctx.set_reason(Some(crate::shimlet::Failure {
                    reason: FailureReason::CrashLoop,
                    message: "container engine keeps crashing (1 restarts of the 2 engine.maxRestarts allows)"
                        .into(),
                }));
                while !RESTARTS_OVER.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                ctx.set_reason(None);
            }
            if ctx.spec().model_name == "scheduled-later" {
                if SCHEDULING_WAITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    return Err(StepError::blocked(
                        FailureReason::Unschedulable,
                        "0/3 nodes are available",
                    ));
                }
                // Scheduled now; the model loads for a while before the step is done.
                ctx.unblocked();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        })
        .step("expose", |ctx: PipelineContext| async move {
            let observed = ctx.shimlet().observe(ctx.service_id()).await?;
            ctx.set_endpoint(format!(
                "{}/v1/chat/completions",
                observed.address.unwrap_or_default()
            ));
            Ok(())
        })
}

fn config() -> EngineConfig {
    EngineConfig {
        gpus: Some(Vec::new()),
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(50),
        max_restarts: 2,
        ..EngineConfig::default()
    }
}

async fn engine_with(store: Arc<dyn Store>) -> (Engine, Arc<InstantShimlet>) {
    engine_on(store, None).await
}

/// An engine on `store`, leading while `leading` reads true (always without one).
async fn engine_on(
    store: Arc<dyn Store>,
    leading: Option<tokio::sync::watch::Receiver<bool>>,
) -> (Engine, Arc<InstantShimlet>) {
    let slot = Arc::new(Mutex::new(None));
    let keep = slot.clone();
    let mut builder = Engine::builder().config(config()).store(store);
    if let Some(leading) = leading {
        builder = builder.leadership(leading);
    }
    let engine = builder
        .shimlet_instance(move |ctx| {
            let shimlet = Arc::new(InstantShimlet::with_notifier(ctx.notifier));
            *keep.lock().unwrap() = Some(shimlet.clone());
            shimlet
        })
        .pipeline(test_pipeline())
        .build()
        .await
        .unwrap();
    let shimlet = slot.lock().unwrap().clone().unwrap();
    (engine, shimlet)
}

async fn engine() -> (Engine, Arc<InstantShimlet>) {
    engine_with(Arc::new(MemoryStore::default())).await
}

/// Waits until the service reaches `phase` (or is gone, for `Deleted`).
async fn wait_for(engine: &Engine, id: &str, phase: Phase) -> Option<ServiceRecord> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let record = engine.get(id);
        match &record {
            None if phase == Phase::Deleted => return None,
            Some(r) if r.phase == phase => return record,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {phase:?}; last: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_deploy_goes_pending_initializing_running_with_every_transition_published() {
    let (engine, _) = engine().await;
    let mut events = engine.subscribe();
    let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    assert_eq!(id.len(), 8);
    assert!(
        id.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    let running = wait_for(&engine, &id, Phase::Running).await.unwrap();
    assert_eq!(
        running.endpoint,
        format!("http://instant.invalid/{id}/v1/chat/completions")
    );
    assert_eq!(running.applied_generation, 1);
    assert!(
        running
            .steps
            .iter()
            .all(|s| s.state == crate::StepState::Succeeded),
        "{:?}",
        running.steps
    );

    let mut phases = Vec::new();
    while phases.last() != Some(&Phase::Running) {
        if let EventKind::Transition { to, .. } = events.recv().await.unwrap().kind {
            phases.push(to);
        }
    }
    assert_eq!(
        phases,
        [Phase::Pending, Phase::Initializing, Phase::Running]
    );
    let history = engine.events(&id, 100).await.unwrap();
    assert!(
        history
            .iter()
            .any(|e| matches!(&e.kind, EventKind::StepSucceeded { step, .. } if step == "expose"))
    );
}

#[tokio::test]
async fn a_reason_set_by_a_running_step_shows_while_initializing_and_clears_when_withdrawn() {
    let (engine, _) = engine().await;
    let id = engine
        .deploy(DeploySpec::named("restarting"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        let record = engine.get(&id).unwrap();
        if record.reason.is_some() {
            break record;
        }
        assert!(Instant::now() < deadline, "no reason shown: {record:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(waiting.phase, Phase::Initializing);
    assert_eq!(waiting.reason.as_deref(), Some("CrashLoop"));
    assert!(
        waiting
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("keeps crashing"),
        "{waiting:?}"
    );
    RESTARTS_OVER.store(true, std::sync::atomic::Ordering::SeqCst);
    let running = wait_for(&engine, &id, Phase::Running).await.unwrap();
    assert_eq!((running.reason, running.message), (None, None));
    engine.shutdown().await;
}

#[tokio::test]
async fn invalid_specs_are_refused_with_the_field_named() {
    let (engine, _) = engine().await;
    let err = engine
        .deploy(DeploySpec::named("../etc"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(fields) if fields[0].field == "modelName"),
        "{err}"
    );
    assert!(engine.list().is_empty());
}

#[tokio::test]
async fn a_crashed_workload_is_repaired_then_failed_once_the_budget_is_spent() {
    let (engine, shimlet) = engine().await;
    let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    wait_for(&engine, &id, Phase::Running).await;

    shimlet.crash(&id, "exit code 3");
    // Repaired: applied again, running again, and the repair counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while shimlet.applies(&id) < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let repaired = wait_for(&engine, &id, Phase::Running).await.unwrap();
    assert_eq!(repaired.restarts, 1);

    shimlet.crash(&id, "exit code 3");
    while engine.get(&id).unwrap().restarts < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for(&engine, &id, Phase::Running).await;
    shimlet.crash(&id, "exit code 3");
    let failed = wait_for(&engine, &id, Phase::Failed).await.unwrap();
    assert_eq!(failed.reason.as_deref(), Some("CrashLoop"));
    assert!(failed.message.unwrap().contains("exit code 3"));
    assert_eq!(
        failed.endpoint, "",
        "a failed service never shows an endpoint"
    );
}

#[tokio::test]
async fn a_workload_removed_behind_our_back_is_restored() {
    let (engine, shimlet) = engine().await;
    let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    wait_for(&engine, &id, Phase::Running).await;
    shimlet.vanish(&id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while shimlet.applies(&id) < 2 {
        assert!(Instant::now() < deadline, "drift was not repaired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for(&engine, &id, Phase::Running).await;
    let history = engine.events(&id, 100).await.unwrap();
    assert!(history.iter().any(|e| matches!(&e.kind, EventKind::Transition { reason: Some(r), .. } if r == "WorkloadMissing")));
}

#[tokio::test]
async fn a_permanent_step_error_fails_the_service_with_its_reason() {
    let (engine, _) = engine().await;
    let id = engine.deploy(DeploySpec::named("broken")).await.unwrap();
    let failed = wait_for(&engine, &id, Phase::Failed).await.unwrap();
    assert_eq!(failed.reason.as_deref(), Some("ModelNotFound"));
    assert!(
        failed
            .message
            .unwrap()
            .contains("step apply failed: no such model")
    );
}

#[tokio::test]
async fn a_blocked_service_waits_as_pending_with_its_reason() {
    let (engine, _) = engine().await;
    let id = engine.deploy(DeploySpec::named("needs-gpu")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = engine.get(&id).unwrap();
        if r.phase == Phase::Pending && r.reason.as_deref() == Some("Unschedulable") {
            assert!(r.message.unwrap().contains("insufficient GPUs"));
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Unblocked by a new spec.
    engine.update(&id, DeploySpec::named("qwen")).await.unwrap();
    let running = wait_for(&engine, &id, Phase::Running).await.unwrap();
    assert_eq!(running.generation, 2);
    assert_eq!(running.reason, None);
}

#[tokio::test]
async fn delete_goes_through_terminating_to_not_exist_and_keeps_history() {
    let (engine, shimlet) = engine().await;
    let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    wait_for(&engine, &id, Phase::Running).await;
    engine.delete(&id).await.unwrap();
    assert_eq!(wait_for(&engine, &id, Phase::Deleted).await, None);
    assert_eq!(
        shimlet.observe(&id).await.unwrap().state,
        WorkloadState::Missing
    );
    assert_eq!(
        engine.history(&id).await.unwrap().unwrap().phase,
        Phase::Deleted
    );
    assert!(matches!(engine.delete(&id).await, Err(Error::NotFound(_))));
    assert!(matches!(
        engine.update(&id, DeploySpec::named("x")).await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn racing_deploy_update_delete_end_in_the_last_accepted_state() {
    let (engine, shimlet) = engine().await;
    // Delete last: gone.
    let a = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    engine.update(&a, DeploySpec::named("llama")).await.unwrap();
    engine.delete(&a).await.unwrap();
    assert_eq!(wait_for(&engine, &a, Phase::Deleted).await, None);
    assert_eq!(
        shimlet.observe(&a).await.unwrap().state,
        WorkloadState::Missing
    );

    // Update after delete (accepted while still terminating): running with the update's spec.
    let b = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    engine.delete(&b).await.unwrap();
    if engine.update(&b, DeploySpec::named("llama")).await.is_ok() {
        let running = wait_for(&engine, &b, Phase::Running).await.unwrap();
        assert_eq!(running.spec.model_name, "llama");
        assert_eq!(running.generation, 3);
        assert_eq!(
            shimlet.observe(&b).await.unwrap().state,
            WorkloadState::Ready
        );
    } else {
        // The teardown won the race before the update arrived: the update was refused, not lost.
        assert_eq!(wait_for(&engine, &b, Phase::Deleted).await, None);
    }
}

#[tokio::test]
async fn state_survives_an_engine_restart_on_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let id = {
        let store = Arc::new(RedbStore::open(&path, 50).unwrap());
        let (engine, _) = engine_with(store).await;
        let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
        wait_for(&engine, &id, Phase::Running).await;
        engine.shutdown().await;
        id
    };
    let store = loop {
        match RedbStore::open(&path, 50) {
            Ok(store) => break Arc::new(store),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let (engine, shimlet) = engine_with(store).await;
    let restored = engine.get(&id).expect("record reloaded");
    assert_eq!(restored.spec.model_name, "qwen");
    // The fresh test runtime has no workload: the reconciler sees drift and restores it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while shimlet.applies(&id) == 0 {
        assert!(
            Instant::now() < deadline,
            "the restored service was never re-applied"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for(&engine, &id, Phase::Running).await;
    assert!(engine.events(&id, 100).await.unwrap().len() > 3);
}

#[tokio::test]
async fn shutdown_stops_accepting_work() {
    let (engine, _) = engine().await;
    engine.shutdown().await;
    assert!(matches!(
        engine.deploy(DeploySpec::named("m")).await,
        Err(Error::ShuttingDown)
    ));
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let base = Duration::from_millis(100);
    let cap = Duration::from_secs(1);
    let delays: Vec<u64> = (1..=6)
        .map(|n| backoff(base, cap, n).as_millis() as u64)
        .collect();
    assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
}

#[tokio::test]
async fn a_dry_run_renders_through_the_runtime_and_creates_nothing() {
    let (engine, shimlet) = engine().await;
    let dry = engine
        .dry_run(DeploySpec {
            replica_count: Some(3),
            ..DeploySpec::named("qwen")
        })
        .await
        .unwrap();
    assert_eq!(dry.workloads.len(), 1);
    assert_eq!(dry.workloads[0].replicas, 3);
    assert_eq!(dry.manifests[0]["instant"]["replicas"], 3);
    assert_eq!(dry.steps.len(), 3);
    // A step that stops names itself.
    let err = engine
        .dry_run(DeploySpec::named("broken"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("step apply failed: no such model"),
        "{err}"
    );
    assert!(matches!(
        engine.dry_run(DeploySpec::named("../x")).await,
        Err(Error::Invalid(_))
    ));
    assert!(engine.list().is_empty());
    assert_eq!(
        shimlet.applies("dry-run"),
        0,
        "nothing was applied to the real runtime"
    );
}

#[tokio::test]
async fn a_blocked_service_stays_pending_while_it_retries_then_initializes_once_unblocked() {
    let (engine, _) = engine().await;
    let mut events = engine.subscribe();
    let id = engine.deploy(DeploySpec::named("gpu-later")).await.unwrap();
    wait_for(&engine, &id, Phase::Running).await;
    let mut phases = Vec::new();
    while phases.last() != Some(&Phase::Running) {
        if let EventKind::Transition { to, reason, .. } = events.recv().await.unwrap().kind {
            phases.push(to);
            if to == Phase::Pending && phases.len() > 1 {
                assert_eq!(reason.as_deref(), Some("Unschedulable"));
            }
        }
    }
    // One try before anything is known to block, then pending (with the reason) through every
    // retry, and initializing only once the GPU is there.
    assert_eq!(
        phases,
        [
            Phase::Pending,
            Phase::Initializing,
            Phase::Pending,
            Phase::Initializing,
            Phase::Running
        ]
    );
}

#[tokio::test]
async fn a_step_that_waited_for_scheduling_turns_the_service_initializing_while_it_loads() {
    let (engine, _) = engine().await;
    let mut events = engine.subscribe();
    let id = engine
        .deploy(DeploySpec::named("scheduled-later"))
        .await
        .unwrap();
    wait_for(&engine, &id, Phase::Running).await;
    let mut seen = Vec::new();
    loop {
        match events.recv().await.unwrap().kind {
            EventKind::Transition { to, .. } => seen.push(format!("{to}")),
            EventKind::StepSucceeded { step, .. } if step == "wait" => {
                seen.push("wait done".into())
            }
            _ => continue,
        }
        if seen.last().map(String::as_str) == Some("running") {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "pending",
            "initializing",
            "pending",
            "initializing",
            "wait done",
            "running"
        ]
    );
}

/// A store whose disk fills up on demand: while full, every write fails with ENOSPC.
#[derive(Default)]
struct FullDisk {
    room: std::sync::atomic::AtomicBool,
    inner: MemoryStore,
}

impl FullDisk {
    fn full() -> Self {
        Self::default()
    }

    fn set_room(&self, room: bool) {
        self.room.store(room, std::sync::atomic::Ordering::SeqCst);
    }

    fn enospc() -> Error {
        Error::store(std::io::Error::from(std::io::ErrorKind::StorageFull))
    }
}

#[async_trait::async_trait]
impl Store for FullDisk {
    fn save(&self, record: &std::sync::Arc<ServiceRecord>) -> crate::store::Ack {
        if self.room.load(std::sync::atomic::Ordering::SeqCst) {
            return self.inner.save(record);
        }
        Box::pin(async { Err(FullDisk::enospc()) })
    }
    fn append_event(&self, _: &Event) -> crate::store::Ack {
        Box::pin(async { Err(FullDisk::enospc()) })
    }
    async fn load_live(&self) -> Result<Vec<ServiceRecord>> {
        Ok(Vec::new())
    }
    async fn get(&self, _: &str) -> Result<Option<ServiceRecord>> {
        Ok(None)
    }
    async fn events(&self, _: &str, _: usize) -> Result<Vec<Event>> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_deploy_the_store_cannot_persist_is_refused_and_forgotten() {
    let (engine, shimlet) = engine_with(Arc::new(FullDisk::full())).await;
    let err = engine.deploy(DeploySpec::named("qwen")).await.unwrap_err();
    assert!(err.is_storage_full(), "{err}");
    assert!(
        engine.list().is_empty(),
        "nothing the client was told failed may run"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(shimlet.list().await.unwrap().is_empty());
}

/// Waits until `pred` holds for the service's record.
async fn wait_until(
    engine: &Engine,
    id: &str,
    what: &str,
    pred: impl Fn(&ServiceRecord) -> bool,
) -> ServiceRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let record = engine.get(id);
        if let Some(r) = record.as_ref().filter(|r| pred(r)) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The rule of `FailureReason::RuntimeUnavailable`: a runtime outage during a deploy, while the
/// service runs, and during a delete never makes the service `failed`; it keeps its phase with
/// the reason, and everything converges once the runtime is back.
#[tokio::test]
async fn a_runtime_outage_never_fails_a_service_and_everything_converges_after_it() {
    let (engine, shimlet) = engine().await;
    let mut events = engine.subscribe();
    let unavailable = Some(FailureReason::RuntimeUnavailable.as_str());

    // Deploy while the runtime is down: initializing with the reason, retried, never failed.
    shimlet.set_unavailable(true);
    let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    let waiting = wait_until(&engine, &id, "the outage reason", |r| {
        r.reason == unavailable
    })
    .await;
    assert_eq!(waiting.phase, Phase::Initializing);
    assert!(
        waiting
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("simulated runtime outage"),
        "{waiting:?}"
    );
    // Many retries at the test's 50 ms cap; still not failed.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let still = engine.get(&id).unwrap();
    assert_eq!(still.phase, Phase::Initializing, "{still:?}");
    assert_eq!(still.reason, unavailable);
    assert_eq!(shimlet.applies(&id), 0, "nothing was applied while down");

    shimlet.set_unavailable(false);
    let running = wait_for(&engine, &id, Phase::Running).await.unwrap();
    assert_eq!(running.reason, None, "the reason clears once it runs");

    // While it runs, an outage (observe fails) leaves it running.
    shimlet.set_unavailable(true);
    engine.nudge(&id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(engine.get(&id).unwrap().phase, Phase::Running);

    // A delete during the outage waits as terminating, then completes after it.
    engine.delete(&id).await.unwrap();
    let terminating = wait_until(&engine, &id, "teardown blocked by the outage", |r| {
        r.phase == Phase::Terminating && r.reason == unavailable
    })
    .await;
    assert!(terminating.message.is_some());
    shimlet.set_unavailable(false);
    assert!(wait_for(&engine, &id, Phase::Deleted).await.is_none());

    // Not once did the service pass through failed.
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, events.recv())
        .await
        .map(Result::ok)
    {
        if let EventKind::Transition { to, .. } = event.kind {
            assert_ne!(to, Phase::Failed, "{event:?}");
        }
    }
}

/// An update or delete the store cannot persist leaves nothing behind: the service keeps its
/// previous spec, generation and phase, and keeps running.
#[tokio::test]
async fn an_update_or_delete_the_store_cannot_persist_changes_nothing() {
    let disk = Arc::new(FullDisk::default());
    disk.set_room(true);
    let (engine, shimlet) = engine_with(disk.clone()).await;
    let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    let before = wait_for(&engine, &id, Phase::Running).await.unwrap();

    disk.set_room(false);
    let mut bigger = DeploySpec::named("qwen");
    bigger.replica_count = Some(3);
    let err = engine.update(&id, bigger).await.unwrap_err();
    assert!(err.is_storage_full(), "{err}");
    let err = engine.delete(&id).await.unwrap_err();
    assert!(err.is_storage_full(), "{err}");

    let after = engine.get(&id).unwrap();
    assert_eq!(after.generation, before.generation);
    assert_eq!(after.spec, before.spec);
    assert_eq!(after.desired, Desired::Present);
    // The cancelled run of the refused request is replaced by the previous spec's.
    let after = wait_for(&engine, &id, Phase::Running).await.unwrap();
    assert_eq!(after.generation, before.generation);
    assert_eq!(shimlet.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_follower_accepts_requests_runs_nothing_and_takes_over_when_it_leads() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let (lead, leading) = tokio::sync::watch::channel(false);
    let (follower, shimlet) = engine_on(store.clone(), Some(leading)).await;
    assert!(!follower.is_leader());

    let id = follower.deploy(DeploySpec::named("m")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(follower.get(&id).unwrap().phase, Phase::Pending);
    assert_eq!(shimlet.applies(&id), 0, "a follower ran a pipeline");
    assert!(
        store.get(&id).await.unwrap().is_some(),
        "the request is stored"
    );

    lead.send_replace(true);
    let running = wait_for(&follower, &id, Phase::Running).await.unwrap();
    assert_eq!(shimlet.applies(&id), 1);
    assert!(follower.is_leader());
    assert_eq!(running.generation, 1);
}

#[tokio::test]
async fn the_leader_takes_new_requests_of_others_and_followers_take_the_leaders_progress() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let (_lead, leading) = tokio::sync::watch::channel(true);
    let (leader, leader_runtime) = engine_on(store.clone(), Some(leading)).await;
    let (_follow, following) = tokio::sync::watch::channel(false);
    let (follower, _) = engine_on(store.clone(), Some(following)).await;
    let mut follower_events = follower.subscribe();

    // A request the follower accepted reaches the leader (through the store's watch, in a
    // cluster), which runs it.
    let id = follower.deploy(DeploySpec::named("m")).await.unwrap();
    assert!(leader.mirror(follower.get(&id).unwrap()));
    let running = wait_for(&leader, &id, Phase::Running).await.unwrap();
    assert_eq!(leader_runtime.applies(&id), 1);

    // The leader's progress reaches the follower, as a transition on its event stream.
    assert!(follower.mirror(running.clone()));
    assert_eq!(follower.get(&id).unwrap(), running);
    let mut saw_running = false;
    while let Ok(Ok(Received::Event(event))) =
        tokio::time::timeout(Duration::from_millis(200), follower_events.next()).await
    {
        if let EventKind::Transition {
            to: Phase::Running, ..
        } = event.kind
        {
            saw_running = true;
        }
    }
    assert!(saw_running, "the follower's subscribers never saw running");

    // Echoes are no change: the leader ignores an older view of the same generation, and
    // neither takes what it already holds.
    let mut stale = running.clone();
    stale.phase = Phase::Initializing;
    assert!(!leader.mirror(stale));
    assert!(!follower.mirror(running.clone()));
    assert!(!leader.mirror(running.clone()));

    // An update accepted by the follower: a new generation for the leader to run.
    let mut spec = DeploySpec::named("m");
    spec.replica_count = Some(2);
    follower.update(&id, spec).await.unwrap();
    let update = follower.get(&id).unwrap();
    assert_eq!(update.generation, 2);
    assert!(leader.mirror(update));
    wait_for(&leader, &id, Phase::Running).await;
    assert_eq!(leader.get(&id).unwrap().generation, 2);
    assert_eq!(leader_runtime.applies(&id), 2);

    // A delete the follower accepted; the leader tears down, and the follower hears it is gone.
    follower.delete(&id).await.unwrap();
    assert!(leader.mirror(follower.get(&id).unwrap()));
    wait_for(&leader, &id, Phase::Deleted).await;
    let mut gone = follower.get(&id).unwrap();
    gone.phase = Phase::Deleted;
    assert!(follower.mirror(gone));
    assert!(follower.get(&id).is_none());
}

#[tokio::test]
async fn gpu_needs_are_recorded_again_for_services_loaded_at_start() {
    // The pipeline's hook says 8 GiB per GPU for any request with GPUs.
    let with_admission = || {
        test_steps()
            .admission(|request: crate::admission::AdmissionRequest| async move {
                crate::admission::Verdict {
                    need: (request.spec.accelerators() > 0).then_some(crate::gpu::GpuNeed {
                        bytes: 8 << 30,
                        memory_fraction: 0.9,
                    }),
                    ..crate::admission::Verdict::default()
                }
            })
            .build()
    };
    let build = |store: Arc<dyn Store>, pipeline: Pipeline| async move {
        Engine::builder()
            .config(config())
            .store(store)
            .shimlet_instance(|ctx| Arc::new(InstantShimlet::with_notifier(ctx.notifier)))
            .pipeline(pipeline)
            .build()
            .await
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let mut spec = DeploySpec::named("qwen");
    spec.resource_requirements = Some(crate::spec::ResourceRequirements {
        accelerator_count: Some(1),
        ..Default::default()
    });
    let id = {
        let engine = build(
            Arc::new(RedbStore::open(&path, 50).unwrap()),
            with_admission(),
        )
        .await;
        let id = engine.deploy(spec).await.unwrap();
        assert_eq!(engine.gpus().need(&id).map(|n| n.bytes), Some(8 << 30));
        engine.shutdown().await;
        id
    };
    let store = loop {
        match RedbStore::open(&path, 50) {
            Ok(store) => break Arc::new(store),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let engine = build(store, with_admission()).await;
    assert_eq!(
        engine.gpus().need(&id).map(|n| n.bytes),
        Some(8 << 30),
        "the need was not recorded again at start"
    );
}
