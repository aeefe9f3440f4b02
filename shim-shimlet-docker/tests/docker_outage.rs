//! The Docker daemon unreachable and back, through the engine: the shimlet talks to the real
//! Docker Engine through a Unix-socket proxy that the test closes and reopens (this machine's
//! daemon itself is never touched). A deploy and a delete sent during the outage wait with
//! reason `RuntimeUnavailable`, never `failed`, and complete once the socket is back.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cleanup, containers_of, context, engine_available, ensure_image};
use shim_core::{
    DeploySpec, Engine, EngineConfig, FailureReason, Phase, Pipeline, PipelineContext, StepError,
    WorkloadState,
};
use shim_shimlet_docker::DockerShimlet;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::AbortHandle;

/// Forwards connections on `path` to the real Docker socket while open.
struct SocketProxy {
    path: PathBuf,
    upstream: PathBuf,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl SocketProxy {
    fn new(path: PathBuf) -> Self {
        let upstream = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"));
        Self {
            path,
            upstream,
            tasks: Arc::default(),
        }
    }

    fn open(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("binding the proxy socket");
        let upstream = self.upstream.clone();
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = UnixStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// The daemon goes away: the socket disappears and open connections (the event stream
    /// too) are cut.
    fn close(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SocketProxy {
    fn drop(&mut self) {
        self.close();
    }
}

fn pipeline(model_dir: PathBuf) -> Pipeline {
    Pipeline::new("docker-outage")
        .step("apply", move |ctx: PipelineContext| {
            let model_dir = model_dir.clone();
            async move {
                let mut workload = common::mock_workload(ctx.service_id(), &model_dir);
                workload.generation = ctx.generation();
                ctx.shimlet().apply(&workload).await?;
                Ok(())
            }
        })
        .step("wait-ready", |ctx: PipelineContext| async move {
            loop {
                let seen = ctx.shimlet().observe(ctx.service_id()).await?;
                match (seen.state, seen.failure) {
                    (WorkloadState::Ready, _) => return Ok(()),
                    (WorkloadState::Failed, Some(f)) => {
                        return Err(StepError::permanent(f.reason, f.message));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .build()
}

async fn wait_until(
    engine: &Engine,
    id: &str,
    what: &str,
    secs: u64,
    done: impl Fn(Option<&shim_core::ServiceRecord>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let record = engine.get(id);
        assert_ne!(
            record.as_ref().map(|r| r.phase),
            Some(Phase::Failed),
            "{what}: failed: {record:?}"
        );
        if done(record.as_ref()) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "{what}: timed out; last {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unavailable(r: Option<&shim_core::ServiceRecord>) -> bool {
    r.is_some_and(|r| r.reason == Some(FailureReason::RuntimeUnavailable.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_and_a_delete_during_a_daemon_outage_complete_after_it() {
    if !engine_available().await {
        return;
    }
    ensure_image();
    let dir = tempfile::tempdir().unwrap();
    let proxy = SocketProxy::new(dir.path().join("docker.sock"));
    proxy.open();
    let socket = format!("unix://{}", proxy.path.display());
    let models = tempfile::tempdir().unwrap();
    let engine = Engine::builder()
        .config(EngineConfig {
            gpus: Some(Vec::new()),
            data_dir: dir.path().to_path_buf(),
            backoff_base: Duration::from_millis(100),
            ..EngineConfig::default()
        })
        .shimlet_instance(move |ctx| {
            let ctx = shim_core::ShimletContext {
                notifier: ctx.notifier,
                ..context(serde_json::json!({ "socket": socket }), Vec::new())
            };
            let shimlet = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(DockerShimlet::connect(ctx))
            })
            .expect("connecting through the proxy");
            Arc::new(shimlet)
        })
        .pipeline(pipeline(models.path().to_path_buf()))
        .build()
        .await
        .expect("engine");

    // Down: a deploy waits with the reason, for longer than a step's retries would last.
    proxy.close();
    let id = engine.deploy(DeploySpec::named("tiny")).await.unwrap();
    let _cleanup = Cleanup(id.clone());
    wait_until(&engine, &id, "the outage as the reason", 30, unavailable).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = engine.get(&id).unwrap();
    assert_eq!(waiting.phase, Phase::Initializing, "{waiting:?}");
    assert!(unavailable(Some(&waiting)), "{waiting:?}");
    assert!(containers_of(&id).is_empty());

    // Back: running within the backoff cap (10 s) plus the container's start.
    proxy.open();
    let took = wait_until(&engine, &id, "running after the outage", 40, |r| {
        r.is_some_and(|r| r.phase == Phase::Running)
    })
    .await;
    eprintln!(
        "deploy sent during the outage running {:.1} s after the socket came back",
        took.as_secs_f64()
    );
    assert_eq!(containers_of(&id).len(), 1);

    // A delete during the next outage: terminating with the reason, gone once it is back.
    proxy.close();
    engine.delete(&id).await.unwrap();
    wait_until(&engine, &id, "the delete waiting", 30, |r| {
        r.is_some_and(|r| r.phase == Phase::Terminating) && unavailable(r)
    })
    .await;
    proxy.open();
    let took = wait_until(&engine, &id, "deleted after the outage", 40, |r| {
        r.is_none()
    })
    .await;
    eprintln!(
        "delete sent during the outage done {:.1} s after the socket came back",
        took.as_secs_f64()
    );
    assert!(containers_of(&id).is_empty());
    engine.shutdown().await;
    drop(proxy);
}
