//! The Docker shimlet against the real Docker Engine, with the mock-engine image (built on first
//! use with the `cargo xtask docker-image` recipe). Without a reachable engine each test prints
//! "SKIPPED: no Docker Engine reachable" and passes, except on CI (`CI=true`), where it fails.

mod common;

use std::time::{Duration, Instant};

use common::{
    Cleanup, chat, containers_of, context, docker, engine_available, ensure_image, mock_workload,
    service_id, shimlet, shimlet_with_queue, wait_for,
};
use shim_core::{FailureReason, Removal, Shimlet, WorkloadState};
use shim_shimlet_docker::{DockerConfig, DockerShimlet, LABEL_GENERATION};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn is_ready(o: &shim_core::WorkloadObservation) -> bool {
    o.state == WorkloadState::Ready
}

#[tokio::test]
async fn deploys_serves_lists_and_deletes() {
    if !engine_available().await {
        return;
    }
    ensure_image();
    let id = service_id("serve");
    let _cleanup = Cleanup(id.clone());
    let models = tempfile::tempdir().unwrap();
    let shimlet = shimlet().await;
    let workload = mock_workload(&id, models.path());

    shimlet.apply(&workload).await.expect("apply");
    let ready = wait_for(&shimlet, &id, READY_TIMEOUT, is_ready).await;
    assert_eq!((ready.ready_replicas, ready.desired_replicas), (1, 1));
    assert_eq!(ready.generation, Some(1));
    let address = ready.address.expect("an address once ready");
    assert!(address.starts_with("http://127.0.0.1:"), "{address}");
    assert!(chat(&address).await.contains("hello docker"));

    // Applying the same spec again changes nothing.
    let before = containers_of(&id);
    assert_eq!(before.len(), 1);
    shimlet.apply(&workload).await.expect("second apply");
    assert_eq!(containers_of(&id), before);

    // What Docker shows matches what was asked for.
    let name = format!("xmod-{id}-0");
    let mounts = docker(&["inspect", "--format", "{{json .Mounts}}", &name]);
    assert!(
        mounts.contains(r#""Destination":"/models/tiny""#),
        "{mounts}"
    );
    assert!(mounts.contains(r#""RW":false"#), "{mounts}");

    let listed = shimlet.list().await.unwrap();
    let mine = listed.iter().find(|w| w.service_id == id).expect("listed");
    assert_eq!(
        (mine.generation, mine.name.as_str()),
        (Some(1), name.as_str())
    );
    let logs = shimlet.logs(&id, 10).await.unwrap();
    assert!(logs.contains("listening on 0.0.0.0:8000"), "{logs}");

    let deadline = Instant::now() + Duration::from_secs(30);
    while shimlet.delete(&id).await.expect("delete") != Removal::Gone {
        assert!(Instant::now() < deadline, "delete did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(containers_of(&id).is_empty(), "docker ps -a still shows it");
    assert_eq!(
        shimlet.observe(&id).await.unwrap().state,
        WorkloadState::Missing
    );
    assert_eq!(shimlet.delete(&id).await.unwrap(), Removal::Gone);
}

#[tokio::test]
async fn a_killed_container_is_reported_with_its_exit_and_repaired_by_apply() {
    if !engine_available().await {
        return;
    }
    ensure_image();
    let id = service_id("kill");
    let _cleanup = Cleanup(id.clone());
    let models = tempfile::tempdir().unwrap();
    let (shimlet, queue) = shimlet_with_queue().await;
    let workload = mock_workload(&id, models.path());
    shimlet.apply(&workload).await.expect("apply");
    wait_for(&shimlet, &id, READY_TIMEOUT, is_ready).await;
    let first = containers_of(&id);

    let mut changes = shimlet.subscribe();
    docker(&["kill", &format!("xmod-{id}-0")]);
    // The event stream, not polling, brings the news: the engine's work queue gets the id
    // (through the context's notifier), and so do subscribers.
    let notified = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let queued = queue.next().await.expect("queue open");
            queue.done(&queued);
            if queued == id && shimlet.observe(&id).await.unwrap().state == WorkloadState::Failed {
                break;
            }
        }
    })
    .await;
    assert!(notified.is_ok(), "no notification after docker kill");
    let mut subscribed = false;
    while let Ok(changed) = changes.try_recv() {
        subscribed |= changed == id;
    }
    assert!(subscribed, "subscribers hear of the change too");
    let failed = shimlet.observe(&id).await.unwrap();
    let failure = failed.failure.expect("a failure reason");
    assert_eq!(failure.reason, FailureReason::Exited);
    assert!(
        failure.message.contains("exited with code 137"),
        "{failure:?}"
    );
    assert!(
        failure.message.contains("listening on"),
        "last log lines: {failure:?}"
    );
    assert_eq!(failed.ready_replicas, 0);

    shimlet.apply(&workload).await.expect("repairing apply");
    let repaired = wait_for(&shimlet, &id, READY_TIMEOUT, is_ready).await;
    let second = containers_of(&id);
    assert_eq!(second.len(), 1);
    assert_ne!(first, second, "the dead container was replaced");
    assert!(chat(&repaired.address.unwrap()).await.contains("hello"));

    // Removed behind the shim's back: reported missing, and apply brings it back.
    docker(&["rm", "-f", &format!("xmod-{id}-0")]);
    wait_for(&shimlet, &id, Duration::from_secs(10), |o| {
        o.state == WorkloadState::Missing
    })
    .await;
    shimlet.apply(&workload).await.expect("apply after removal");
    wait_for(&shimlet, &id, READY_TIMEOUT, is_ready).await;
    assert_eq!(containers_of(&id).len(), 1);
}

#[tokio::test]
async fn a_restarted_shim_adopts_the_running_container() {
    if !engine_available().await {
        return;
    }
    ensure_image();
    let id = service_id("adopt");
    let _cleanup = Cleanup(id.clone());
    let models = tempfile::tempdir().unwrap();
    let workload = mock_workload(&id, models.path());
    let address = {
        let first = shimlet().await;
        first.apply(&workload).await.expect("apply");
        wait_for(&first, &id, READY_TIMEOUT, is_ready).await.address
    };
    let container = containers_of(&id);

    // A new instance, as after a restart of the shim.
    let second = shimlet().await;
    let adopted = wait_for(&second, &id, READY_TIMEOUT, is_ready).await;
    assert_eq!(adopted.address, address);
    assert_eq!(adopted.generation, Some(1));
    second.apply(&workload).await.expect("apply after adoption");
    assert_eq!(containers_of(&id), container, "adopted, not recreated");

    // A new generation replaces it.
    let mut next = workload.clone();
    next.generation = 2;
    second.apply(&next).await.expect("apply generation 2");
    let updated = wait_for(&second, &id, READY_TIMEOUT, is_ready).await;
    assert_eq!(updated.generation, Some(2));
    assert_ne!(containers_of(&id), container);
    let label = docker(&[
        "inspect",
        "--format",
        &format!("{{{{index .Config.Labels \"{LABEL_GENERATION}\"}}}}"),
        &format!("xmod-{id}-0"),
    ]);
    assert_eq!(label, "2");
}

#[tokio::test]
async fn replicas_scale_up_and_down() {
    if !engine_available().await {
        return;
    }
    ensure_image();
    let id = service_id("scale");
    let _cleanup = Cleanup(id.clone());
    let models = tempfile::tempdir().unwrap();
    let shimlet = shimlet().await;
    let mut workload = mock_workload(&id, models.path());
    workload.replicas = 2;
    shimlet.apply(&workload).await.expect("apply 2");
    let ready = wait_for(&shimlet, &id, READY_TIMEOUT, is_ready).await;
    assert_eq!(ready.ready_replicas, 2);
    assert_eq!(containers_of(&id).len(), 2);

    workload.replicas = 1;
    shimlet.apply(&workload).await.expect("apply 1");
    let ready = wait_for(&shimlet, &id, READY_TIMEOUT, is_ready).await;
    assert_eq!((ready.ready_replicas, ready.desired_replicas), (1, 1));
    assert_eq!(containers_of(&id).len(), 1);
    docker(&["inspect", &format!("xmod-{id}-0")]);
}

#[tokio::test]
async fn a_crash_loop_under_a_docker_restart_policy_is_reported_with_its_logs() {
    if !engine_available().await {
        return;
    }
    ensure_image();
    let id = service_id("crashloop");
    let _cleanup = Cleanup(id.clone());
    let models = tempfile::tempdir().unwrap();
    let shimlet = DockerShimlet::connect(context(
        serde_json::json!({ "restartPolicy": "on-failure" }),
        Vec::new(),
    ))
    .await
    .unwrap();
    let mut workload = mock_workload(&id, models.path());
    workload.env.insert("MOCK_FAIL_AT_START".into(), "4".into());
    shimlet.apply(&workload).await.expect("apply");
    let failed = wait_for(&shimlet, &id, Duration::from_secs(30), |o| {
        o.state == WorkloadState::Failed
    })
    .await;
    let failure = failed.failure.unwrap();
    assert_eq!(failure.reason, FailureReason::CrashLoop, "{failure:?}");
    assert!(
        failure.message.contains("failed to load model weights"),
        "{failure:?}"
    );
}

#[tokio::test]
async fn a_missing_image_is_an_image_pull_failure_naming_the_image() {
    if !engine_available().await {
        return;
    }
    let id = service_id("noimage");
    let _cleanup = Cleanup(id.clone());
    let shimlet = shimlet().await;
    let mut workload = mock_workload(&id, std::env::temp_dir().as_path());
    workload.image = "xmod-shim/does-not-exist:latest".into();
    let err = shimlet.apply(&workload).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::ImagePull);
    assert!(!err.retryable);
    assert!(
        err.message.starts_with(
            "image xmod-shim/does-not-exist:latest not found locally and could not be pulled: "
        ),
        "{}",
        err.message
    );
    let observed = shimlet.observe(&id).await.unwrap();
    assert_eq!(observed.state, WorkloadState::Failed);
    assert_eq!(observed.failure.unwrap().reason, FailureReason::ImagePull);
    assert!(containers_of(&id).is_empty());
}

#[tokio::test]
async fn too_few_gpus_leave_the_service_pending_without_a_container() {
    if !engine_available().await {
        return;
    }
    let id = service_id("nogpu");
    let _cleanup = Cleanup(id.clone());
    let shimlet = shimlet().await;
    let mut workload = mock_workload(&id, std::env::temp_dir().as_path());
    workload.resources.accelerators = 1;
    let err = shimlet.apply(&workload).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::Unschedulable);
    assert!(err.message.contains("insufficient GPUs"), "{}", err.message);
    assert_eq!(
        shimlet.observe(&id).await.unwrap().state,
        WorkloadState::Pending
    );
    assert!(containers_of(&id).is_empty());
}

#[tokio::test]
async fn render_shows_the_create_bodies_without_creating_anything() {
    if !engine_available().await {
        return;
    }
    let id = service_id("render");
    let shimlet = shimlet().await;
    let mut workload = mock_workload(&id, std::path::Path::new("/srv/models/tiny"));
    workload.replicas = 2;
    workload.resources.cpu = Some("2".into());
    workload.resources.memory = Some("512Mi".into());
    workload.resources.accelerators = 2;
    let rendered = shimlet.render(&workload).await.unwrap();
    let containers = rendered.as_array().unwrap();
    assert_eq!(containers.len(), 2);
    assert_eq!(containers[1]["name"], format!("xmod-{id}-1"));
    let body = &containers[0]["body"];
    assert_eq!(body["Labels"]["xmod-shim.managed-by"], "xmod-shim");
    assert_eq!(body["Labels"]["xmod-shim.service-id"], id.as_str());
    assert_eq!(body["Labels"]["xmod-shim.generation"], "1");
    assert_eq!(body["Labels"]["xmod-shim.replica"], "0");
    let host = &body["HostConfig"];
    assert_eq!(
        host["PortBindings"]["8000/tcp"][0],
        serde_json::json!({"HostIp": "127.0.0.1", "HostPort": ""})
    );
    assert_eq!(host["Mounts"][0]["ReadOnly"], true);
    assert_eq!(host["Mounts"][0]["Source"], "/srv/models/tiny");
    assert_eq!(host["NanoCpus"], 2_000_000_000_i64);
    assert_eq!(host["Memory"], 512 * 1024 * 1024);
    assert_eq!(
        host["DeviceRequests"],
        serde_json::json!([{"Driver": "nvidia", "Count": 2, "Capabilities": [["gpu"]]}])
    );
    assert!(containers_of(&id).is_empty());
}

#[tokio::test]
async fn an_unreachable_engine_is_a_clear_start_up_error() {
    let config = DockerConfig {
        socket: Some("unix:///nonexistent/docker.sock".into()),
        ..DockerConfig::default()
    };
    let err = DockerShimlet::with_config(
        config,
        shim_core::Notifier::detached(),
        std::sync::Arc::new(shim_core::GpuAllocator::new(Vec::new(), false)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason, FailureReason::RuntimeError);
    assert!(
        err.message
            .starts_with("cannot reach the Docker Engine at unix:///nonexistent/docker.sock"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn a_bad_config_section_is_rejected_at_start_up() {
    let err = DockerShimlet::connect(context(
        serde_json::json!({ "hostIp": "not-an-ip" }),
        Vec::new(),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.reason, FailureReason::InvalidSpec);
    assert!(err.message.contains("hostIp"), "{}", err.message);
}

#[test]
fn the_shimlet_is_registered_as_docker() {
    let entry = shim_core::registry::shimlet("docker").expect("registered");
    assert_eq!(entry.description, "Docker Engine containers (bollard)");
}

/// The whole loop through the engine core: deploy → running, a `docker kill` reaches the
/// reconciler through the shimlet's notifier (the periodic resync is an hour away, so nothing
/// else could), the engine repairs the service, and delete removes the container.
#[tokio::test]
async fn the_engine_deploys_repairs_and_deletes_through_the_docker_shimlet() {
    use shim_core::{
        DeploySpec, Engine, EngineConfig, Phase, Pipeline, PipelineContext, StepError,
    };

    if !engine_available().await {
        return;
    }
    ensure_image();
    let models = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let model_dir = models.path().to_path_buf();
    let pipeline = Pipeline::new("docker-test")
        .step("apply", move |ctx: PipelineContext| {
            let mut workload = mock_workload(ctx.service_id(), &model_dir);
            workload.generation = ctx.generation();
            async move {
                ctx.shimlet().apply(&workload).await?;
                Ok(())
            }
        })
        .step("wait-ready", |ctx: PipelineContext| async move {
            loop {
                let observed = ctx.shimlet().observe(ctx.service_id()).await?;
                match observed.state {
                    WorkloadState::Ready => {
                        let address = observed.address.unwrap_or_default();
                        ctx.set_endpoint(address);
                        return Ok(());
                    }
                    WorkloadState::Failed => {
                        let failure = observed.failure.expect("failed with a reason");
                        return Err(StepError::permanent(failure.reason, failure.message));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .build();
    let engine = Engine::builder()
        .config(EngineConfig {
            gpus: Some(Vec::new()),
            data_dir: data.path().to_path_buf(),
            resync_interval: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(50),
            ..EngineConfig::default()
        })
        .shimlet("docker")
        .pipeline(pipeline)
        .build()
        .await
        .expect("engine with the docker shimlet");
    let id = engine.deploy(DeploySpec::named("tiny")).await.unwrap();
    let _cleanup = Cleanup(id.clone());
    let phase_is = |phase: Phase, restarts: u32| {
        let engine = &engine;
        let id = &id;
        async move {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let record = engine.get(id);
                if record
                    .as_ref()
                    .is_some_and(|r| r.phase == phase && r.restarts == restarts)
                {
                    return record.unwrap();
                }
                assert!(Instant::now() < deadline, "stuck at {record:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let running = phase_is(Phase::Running, 0).await;
    assert!(chat(&running.endpoint).await.contains("hello"));
    let first = containers_of(&id);

    docker(&["kill", &format!("xmod-{id}-0")]);
    let repaired = phase_is(Phase::Running, 1).await;
    assert_ne!(containers_of(&id), first, "repaired with a new container");
    assert!(chat(&repaired.endpoint).await.contains("hello"));

    engine.delete(&id).await.unwrap();
    let deadline = Instant::now() + READY_TIMEOUT;
    while engine.get(&id).is_some_and(|r| r.phase != Phase::Deleted) {
        assert!(
            Instant::now() < deadline,
            "delete stuck: {:?}",
            engine.get(&id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(containers_of(&id).is_empty());
    engine.shutdown().await;
}
