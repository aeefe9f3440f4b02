//! The process shimlet under the real engine: its notifier drives repair of a crashed replica
//! without waiting for the periodic resync.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Sandbox, alive, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shim_core::{
    DeploySpec, Engine, EngineConfig, Phase, Pipeline, PipelineContext, StepError, WorkloadState,
};

fn pipeline() -> Pipeline {
    Pipeline::new("process-test")
        .step("apply", |ctx: PipelineContext| async move {
            let mut workload = common::engine(ctx.service_id());
            workload.generation = ctx.generation();
            ctx.shimlet().apply(&workload).await?;
            Ok(())
        })
        .step("wait-ready", |ctx: PipelineContext| async move {
            loop {
                let observed = ctx.shimlet().observe(ctx.service_id()).await?;
                match (observed.state, observed.failure) {
                    (WorkloadState::Ready, _) => {
                        ctx.set_endpoint(observed.address.unwrap_or_default());
                        return Ok(());
                    }
                    (WorkloadState::Failed, Some(f)) => {
                        return Err(StepError::permanent(f.reason, f.message));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(25)).await,
                }
            }
        })
        .build()
}

/// The engine on the process runtime of `sandbox`. Only the shimlet's notifications can make it
/// look again in time: the periodic resync is an hour away.
async fn engine(sandbox: &Sandbox) -> Engine {
    Engine::builder()
        .config(EngineConfig {
            data_dir: sandbox.dir.path().to_path_buf(),
            plugins: Arc::new(sandbox.config.clone()),
            gpus: Some(Vec::new()),
            resync_interval: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(50),
            ..EngineConfig::default()
        })
        .shimlet("process")
        .pipeline(pipeline())
        .build()
        .await
        .expect("engine")
}

#[tokio::test]
async fn a_killed_replica_is_noticed_and_repaired_without_a_resync() {
    let sandbox = Sandbox::new(&[]);
    let engine = engine(&sandbox).await;
    let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    let running = eventually("running", Duration::from_secs(10), || async {
        engine.get(&id).filter(|r| r.phase == Phase::Running)
    })
    .await;
    assert!(running.endpoint.starts_with("http://127.0.0.1:"));
    let pid = sandbox.pids(&id)[0];

    kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGKILL).unwrap();
    let repaired = eventually("repaired", Duration::from_secs(10), || async {
        engine
            .get(&id)
            .filter(|r| r.phase == Phase::Running && r.restarts == 1)
    })
    .await;
    assert_eq!(
        repaired.endpoint, running.endpoint,
        "same port after restart"
    );
    let new_pid = sandbox.pids(&id)[0];
    assert_ne!(new_pid, pid);
    assert!(alive(new_pid));

    engine.delete(&id).await.unwrap();
    eventually("deleted", Duration::from_secs(10), || async {
        engine.get(&id).is_none().then_some(())
    })
    .await;
    assert!(!alive(new_pid));
    engine.shutdown().await;
}

/// An engine that hangs (SIGSTOP: its port still accepts connections, nothing answers) fails
/// its liveness probes and is replaced; the hung process is killed, not left behind.
#[tokio::test]
async fn a_hung_replica_is_detected_by_liveness_and_replaced() {
    let sandbox = Sandbox::new(&[]);
    let engine = engine(&sandbox).await;
    let id = engine.deploy(DeploySpec::named("qwen")).await.unwrap();
    eventually("running", Duration::from_secs(10), || async {
        engine.get(&id).filter(|r| r.phase == Phase::Running)
    })
    .await;
    let hung = sandbox.pids(&id)[0];
    kill(Pid::from_raw(i32::try_from(hung).unwrap()), Signal::SIGSTOP).unwrap();
    let started = std::time::Instant::now();
    let replaced = eventually("replaced", Duration::from_secs(40), || async {
        engine
            .get(&id)
            .filter(|r| r.phase == Phase::Running && r.restarts == 1)
    })
    .await;
    eprintln!(
        "hung replica replaced after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(replaced.ready_replicas, 1);
    let new_pid = sandbox.pids(&id)[0];
    assert_ne!(new_pid, hung);
    assert!(alive(new_pid));
    assert!(!alive(hung), "the hung process was left running");

    engine.delete(&id).await.unwrap();
    eventually("deleted", Duration::from_secs(10), || async {
        engine.get(&id).is_none().then_some(())
    })
    .await;
    engine.shutdown().await;
}
