//! The process shimlet against real processes: a python3 HTTP server as the engine, `sh` for
//! failures.

mod common;

use std::time::{Duration, Instant};

use common::{Sandbox, alive, engine, eventually, observe_until, start_time, workload};
use shim_core::{FailureReason, Removal, Shimlet, WorkloadState};

#[tokio::test]
async fn registered_as_process_and_built_by_its_factory() {
    let entry = shim_core::registry::shimlet("process").expect("registered");
    assert_eq!(entry.name, shim_shimlet_process::NAME);
    let sandbox = Sandbox::new(&[]);
    let shimlet = (entry.factory)(sandbox.context()).await.expect("factory");
    assert!(shimlet.list().await.unwrap().is_empty());
    assert_eq!(
        shimlet.observe("nothing").await.unwrap().state,
        WorkloadState::Missing
    );
}

#[tokio::test]
async fn apply_becomes_ready_with_an_address_and_is_idempotent() {
    let sandbox = Sandbox::new(&[]);
    let shimlet = sandbox.shimlet().await;
    let spec = engine("svc-ready");
    shimlet.apply(&spec).await.unwrap();

    // Observe answers from memory: fast even while the engine is starting.
    let t = Instant::now();
    let first = shimlet.observe("svc-ready").await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(50));
    assert!(matches!(
        first.state,
        WorkloadState::Starting | WorkloadState::Ready
    ));

    let ready = observe_until(&shimlet, "svc-ready", "ready", |o| {
        o.state == WorkloadState::Ready
    })
    .await;
    assert_eq!((ready.ready_replicas, ready.desired_replicas), (1, 1));
    assert_eq!(ready.generation, Some(1));
    let address = ready.address.clone().expect("address");
    assert!(address.starts_with("http://127.0.0.1:"), "{address}");
    let health = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{address}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // Same spec again: nothing restarts. A new generation with the same launch: still nothing.
    let pids = sandbox.pids("svc-ready");
    assert_eq!(pids.len(), 1);
    shimlet.apply(&spec).await.unwrap();
    let mut next = spec.clone();
    next.generation = 2;
    shimlet.apply(&next).await.unwrap();
    assert_eq!(sandbox.pids("svc-ready"), pids);
    let again = shimlet.observe("svc-ready").await.unwrap();
    assert_eq!(again.state, WorkloadState::Ready);
    assert_eq!(again.generation, Some(2));
    assert_eq!(again.address, ready.address);

    let listed = shimlet.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, format!("pid {}", pids[0]));

    assert_eq!(shimlet.delete("svc-ready").await.unwrap(), Removal::Gone);
    assert!(!alive(pids[0]));
    assert!(sandbox.state("svc-ready").is_none());
}

#[tokio::test]
async fn an_exit_is_failed_with_its_code_and_log_tail_and_apply_restarts_it_on_its_port() {
    let sandbox = Sandbox::new(&[]);
    let shimlet = sandbox.shimlet().await;
    let spec = workload(
        "svc-exit",
        &[
            "sh",
            "-c",
            "echo first line; echo boom: engine crashed; exit 3",
            "sh",
        ],
        &["{port}"],
    );
    shimlet.apply(&spec).await.unwrap();
    let failed = observe_until(&shimlet, "svc-exit", "failure", |o| {
        o.state == WorkloadState::Failed
    })
    .await;
    let failure = failed.failure.expect("failure");
    assert_eq!(failure.reason, FailureReason::Exited);
    assert!(
        failure.message.contains("exit code 3"),
        "{}",
        failure.message
    );
    assert!(
        failure.message.contains("boom: engine crashed"),
        "{}",
        failure.message
    );
    assert_eq!(failed.ready_replicas, 0);
    let address = failed.address.clone().expect("address");

    // Apply of the same spec restarts only the exited replica, on the same port.
    shimlet.apply(&spec).await.unwrap();
    let restarted = shimlet.observe("svc-exit").await.unwrap();
    assert_eq!(restarted.address.as_deref(), Some(address.as_str()));
    eventually(
        "the restarted run's output",
        Duration::from_secs(5),
        || async {
            let logs = shimlet.logs("svc-exit", 50).await.unwrap();
            (logs.matches("boom: engine crashed").count() == 2).then_some(())
        },
    )
    .await;
    observe_until(&shimlet, "svc-exit", "the restart to fail again", |o| {
        o.state == WorkloadState::Failed
    })
    .await;
    shimlet.delete("svc-exit").await.unwrap();
}

#[tokio::test]
async fn a_missing_program_is_binary_not_found() {
    let sandbox = Sandbox::new(&[]);
    let shimlet = sandbox.shimlet().await;
    let spec = workload("svc-nobin", &["no-such-engine-binary-xyz", "serve"], &[]);
    let err = shimlet.apply(&spec).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::BinaryNotFound);
    assert!(!err.retryable);
    assert!(err.message.contains("no-such-engine-binary-xyz"), "{err}");
    assert_eq!(
        shimlet.observe("svc-nobin").await.unwrap().state,
        WorkloadState::Failed
    );
    assert_eq!(shimlet.delete("svc-nobin").await.unwrap(), Removal::Gone);
}

#[tokio::test]
async fn accelerators_are_allocated_and_exhaustion_is_unschedulable() {
    let sandbox = Sandbox::new(&["0", "1"]);
    let shimlet = sandbox.shimlet().await;
    let mut one = engine("svc-gpu1");
    one.resources.accelerators = 1;
    shimlet.apply(&one).await.unwrap();
    let logs = eventually("CVD in the log", Duration::from_secs(10), || async {
        let logs = shimlet.logs("svc-gpu1", 10).await.unwrap();
        logs.contains("CVD=").then_some(logs)
    })
    .await;
    assert!(logs.contains("CVD=0\n"), "{logs}");

    let mut two = engine("svc-gpu2");
    two.resources.accelerators = 2;
    let err = shimlet.apply(&two).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::Unschedulable);
    assert!(err.message.contains("2 requested, 1 of 2 free"), "{err}");
    let pending = shimlet.observe("svc-gpu2").await.unwrap();
    assert_eq!(pending.state, WorkloadState::Pending);
    assert_eq!(
        pending.failure.unwrap().reason,
        FailureReason::Unschedulable
    );

    // Without accelerators the variable is left alone.
    let plain = engine("svc-cpu");
    shimlet.apply(&plain).await.unwrap();

    // Deleting the first frees its GPU for the second.
    assert_eq!(shimlet.delete("svc-gpu1").await.unwrap(), Removal::Gone);
    shimlet.apply(&two).await.unwrap();
    let logs = eventually("CVD in the log", Duration::from_secs(10), || async {
        let logs = shimlet.logs("svc-gpu2", 10).await.unwrap();
        logs.contains("CVD=").then_some(logs)
    })
    .await;
    assert!(logs.contains("CVD=0,1\n"), "{logs}");
    let cpu_logs = eventually("CVD in the log", Duration::from_secs(10), || async {
        let logs = shimlet.logs("svc-cpu", 10).await.unwrap();
        logs.contains("CVD=").then_some(logs)
    })
    .await;
    if std::env::var_os("CUDA_VISIBLE_DEVICES").is_none() {
        assert!(cpu_logs.contains("CVD=<unset>"), "{cpu_logs}");
    }
    shimlet.delete("svc-gpu2").await.unwrap();
    shimlet.delete("svc-cpu").await.unwrap();
}

#[tokio::test]
async fn delete_sigkills_a_replica_that_ignores_sigterm_after_the_grace_period() {
    let sandbox = Sandbox::new(&[]);
    let shimlet = sandbox.shimlet().await;
    // `trap '' TERM` is inherited by `sleep`, so the whole group ignores SIGTERM.
    let spec = workload(
        "svc-stubborn",
        &[
            "sh",
            "-c",
            "trap '' TERM; echo started; while :; do sleep 0.05; done",
        ],
        &[],
    );
    shimlet.apply(&spec).await.unwrap();
    let pid = sandbox.pids("svc-stubborn")[0];
    eventually("the trap to be set", Duration::from_secs(5), || async {
        let logs = shimlet.logs("svc-stubborn", 5).await.unwrap();
        logs.contains("started").then_some(())
    })
    .await;
    let t = Instant::now();
    assert_eq!(shimlet.delete("svc-stubborn").await.unwrap(), Removal::Gone);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!alive(pid));
    assert_eq!(
        shimlet.observe("svc-stubborn").await.unwrap().state,
        WorkloadState::Missing
    );
    assert!(shimlet.list().await.unwrap().is_empty());
    assert!(!sandbox.state_dir().join("logs/svc-stubborn-0.log").exists());
}

#[tokio::test]
async fn a_restarted_shim_readopts_running_replicas_and_can_delete_them() {
    let mut sandbox = Sandbox::new(&["0"]);
    let mut spec = engine("svc-adopt");
    spec.resources.accelerators = 1;
    let address = {
        let shimlet = sandbox.shimlet().await;
        shimlet.apply(&spec).await.unwrap();
        let ready = observe_until(&shimlet, "svc-adopt", "ready", |o| {
            o.state == WorkloadState::Ready
        })
        .await;
        ready.address
    };
    let pid = sandbox.pids("svc-adopt")[0];
    assert!(alive(pid), "dropping the shimlet must not stop its engines");

    // A restarted shim starts with a fresh allocator.
    sandbox.gpus = std::sync::Arc::new(shim_core::GpuAllocator::new(vec!["0".into()], false));
    let shimlet = sandbox.shimlet().await;
    let listed = shimlet.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, format!("pid {pid}"));
    // Probed during adoption: ready at once, not "starting" (which the engine would repair).
    let ready = shimlet.observe("svc-adopt").await.unwrap();
    assert_eq!(ready.state, WorkloadState::Ready);
    assert_eq!(ready.address, address);
    // The adopted replica's GPU was claimed again.
    assert!(sandbox.gpus.allocate("other/0", 1).is_err());
    // Applying the same spec keeps the adopted process.
    shimlet.apply(&spec).await.unwrap();
    assert_eq!(sandbox.pids("svc-adopt"), [pid]);

    assert_eq!(shimlet.delete("svc-adopt").await.unwrap(), Removal::Gone);
    assert!(!alive(pid));
    assert!(sandbox.gpus.allocate("other/0", 1).is_ok());
}

#[tokio::test]
async fn stale_state_files_never_signal_a_reused_pid() {
    let sandbox = Sandbox::new(&[]);
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    sandbox.guard(bystander.id());
    std::fs::create_dir_all(sandbox.state_dir()).unwrap();
    let own = std::process::id();
    for (id, pid) in [("stale-own", own), ("stale-other", bystander.id())] {
        let spec = engine(id);
        let state = serde_json::json!({
            "version": 1,
            "spec": spec,
            "replicas": [{
                "index": 0,
                "pid": pid,
                "startTime": start_time(pid).unwrap() + 12345,
                "port": 1,
                "gpus": [],
                "logPath": sandbox.state_dir().join(format!("logs/{id}-0.log")),
                "startedAtMs": 0,
            }],
            "retired": [{
                "index": 1,
                "pid": pid,
                "startTime": start_time(pid).unwrap() + 1,
                "port": 2,
                "logPath": "/nonexistent.log",
                "startedAtMs": 0,
            }],
        });
        std::fs::write(
            sandbox.state_dir().join(format!("{id}.json")),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
    }
    let shimlet = sandbox.shimlet().await;
    for id in ["stale-own", "stale-other"] {
        let observed = shimlet.observe(id).await.unwrap();
        assert_eq!(observed.state, WorkloadState::Failed);
        let failure = observed.failure.unwrap();
        assert_eq!(failure.reason, FailureReason::Exited);
        assert!(
            failure.message.contains("exited while the shim was down"),
            "{}",
            failure.message
        );
        assert_eq!(shimlet.delete(id).await.unwrap(), Removal::Gone);
    }
    // Both the test process and the bystander survived.
    assert!(alive(bystander.id()));
    assert!(bystander.try_wait().unwrap().is_none());
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[tokio::test]
async fn scaling_and_spec_changes() {
    let sandbox = Sandbox::new(&[]);
    let shimlet = sandbox.shimlet().await;
    let mut spec = engine("svc-scale");
    spec.replicas = 2;
    shimlet.apply(&spec).await.unwrap();
    let ready = observe_until(&shimlet, "svc-scale", "2 ready", |o| {
        o.state == WorkloadState::Ready
    })
    .await;
    assert_eq!((ready.ready_replicas, ready.desired_replicas), (2, 2));
    let pids = sandbox.pids("svc-scale");
    assert_eq!(pids.len(), 2);
    let logs = eventually("both logs", Duration::from_secs(5), || async {
        let logs = shimlet.logs("svc-scale", 10).await.unwrap();
        (logs.contains("[replica 0] CVD=") && logs.contains("[replica 1] CVD=")).then_some(logs)
    })
    .await;
    assert!(logs.contains("[replica 1] EXTRA="), "{logs}");

    // Down to one: replica 1 stops, replica 0 keeps running.
    spec.replicas = 1;
    spec.generation = 2;
    shimlet.apply(&spec).await.unwrap();
    assert!(!alive(pids[1]));
    assert_eq!(sandbox.pids("svc-scale"), [pids[0]]);
    let one = shimlet.observe("svc-scale").await.unwrap();
    assert_eq!(
        (one.state, one.ready_replicas, one.desired_replicas),
        (WorkloadState::Ready, 1, 1)
    );

    // A changed environment relaunches, on the same port.
    spec.env.insert("EXTRA".into(), "changed".into());
    spec.generation = 3;
    shimlet.apply(&spec).await.unwrap();
    assert!(!alive(pids[0]));
    let relaunched = observe_until(&shimlet, "svc-scale", "relaunched ready", |o| {
        o.state == WorkloadState::Ready
    })
    .await;
    assert_eq!(relaunched.address, one.address);
    assert_eq!(relaunched.generation, Some(3));
    let logs = shimlet.logs("svc-scale", 10).await.unwrap();
    assert!(logs.contains("EXTRA=changed"), "{logs}");

    // Zero replicas: ready, nothing running, no address.
    let last = sandbox.pids("svc-scale");
    spec.replicas = 0;
    shimlet.apply(&spec).await.unwrap();
    assert!(!alive(last[0]));
    let zero = shimlet.observe("svc-scale").await.unwrap();
    assert_eq!(
        (
            zero.state,
            zero.ready_replicas,
            zero.desired_replicas,
            zero.address
        ),
        (WorkloadState::Ready, 0, 0, None)
    );
    assert_eq!(shimlet.delete("svc-scale").await.unwrap(), Removal::Gone);
}

#[tokio::test]
async fn a_replica_that_never_gets_ready_times_out() {
    let sandbox = Sandbox::new(&[]);
    let shimlet = sandbox.shimlet().await;
    let mut spec = workload(
        "svc-slow",
        &["sh", "-c", "echo loading; exec sleep 30"],
        &[],
    );
    spec.health.startup_timeout = Duration::from_millis(300);
    shimlet.apply(&spec).await.unwrap();
    let pid = sandbox.pids("svc-slow")[0];
    let failed = observe_until(&shimlet, "svc-slow", "startup timeout", |o| {
        o.state == WorkloadState::Failed
    })
    .await;
    let failure = failed.failure.unwrap();
    assert_eq!(failure.reason, FailureReason::StartupTimeout);
    assert!(failure.message.contains("loading"), "{}", failure.message);
    // Applying again replaces the stuck replica.
    shimlet.apply(&spec).await.unwrap();
    assert!(!alive(pid));
    assert_ne!(sandbox.pids("svc-slow"), [pid]);
    assert_eq!(shimlet.delete("svc-slow").await.unwrap(), Removal::Gone);
}

#[tokio::test]
async fn render_describes_the_launch_without_starting_anything() {
    let sandbox = Sandbox::new(&["0", "1"]);
    let shimlet = sandbox.shimlet().await;
    let mut spec = workload(
        "svc-render",
        &["vllm", "serve"],
        &["{model_dir}", "--host", "{host}", "--port", "{port}"],
    );
    spec.model = Some(shim_core::ModelVolume {
        host_path: "/models/qwen".into(),
        mount_path: "/model".into(),
    });
    spec.resources.accelerators = 2;
    spec.env.insert("HF_HOME".into(), "/cache".into());
    let rendered = shimlet.render(&spec).await.unwrap();
    let replica = &rendered["replicas"][0];
    assert_eq!(replica["program"], "vllm");
    assert_eq!(
        replica["args"],
        serde_json::json!([
            "serve",
            "/models/qwen",
            "--host",
            "127.0.0.1",
            "--port",
            "<allocated>"
        ])
    );
    assert_eq!(replica["env"]["HF_HOME"], "/cache");
    assert!(
        replica["cudaVisibleDevices"]
            .as_str()
            .unwrap()
            .contains('2')
    );
    assert!(
        replica["logPath"]
            .as_str()
            .unwrap()
            .ends_with("logs/svc-render-0.log")
    );
    assert_eq!(rendered["address"], "http://127.0.0.1:<allocated>");
    assert!(shimlet.list().await.unwrap().is_empty());
    assert!(sandbox.gpus.allocate("x/0", 2).is_ok());
}

/// Answers `/health` with 200 three times, then 500 forever: an engine that hangs after start.
const HANGS_AFTER_START: &str = r#"
import http.server, sys
seen = [0]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        seen[0] += 1
        self.send_response(200 if seen[0] <= 3 else 500)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

#[tokio::test]
async fn a_replica_that_fails_its_probes_after_being_ready_is_replaced_by_the_next_apply() {
    let sandbox = Sandbox::new(&[]);
    let shimlet = sandbox.shimlet().await;
    let spec = workload(
        "svc-hang",
        &["python3", "-c", HANGS_AFTER_START],
        &["{host}", "{port}"],
    );
    shimlet.apply(&spec).await.unwrap();
    observe_until(&shimlet, "svc-hang", "ready", |o| {
        o.state == WorkloadState::Ready
    })
    .await;
    let first = sandbox.pids("svc-hang");
    let hung = observe_until(&shimlet, "svc-hang", "unhealthy", |o| {
        o.state == WorkloadState::Starting && o.failure.is_some()
    })
    .await;
    let failure = hung.failure.unwrap();
    assert_eq!(failure.reason, FailureReason::RuntimeError);
    assert!(
        failure.message.contains("failed 3 health checks in a row"),
        "{}",
        failure.message
    );

    // The engine's repair re-applies: the hung process is replaced by a fresh one.
    shimlet.apply(&spec).await.unwrap();
    let second = sandbox.pids("svc-hang");
    assert_eq!(second.len(), 1);
    assert_ne!(second, first, "a new process");
    assert!(!alive(first[0]), "the hung one was stopped");
    observe_until(&shimlet, "svc-hang", "ready again", |o| {
        o.state == WorkloadState::Ready
    })
    .await;
    assert_eq!(shimlet.delete("svc-hang").await.unwrap(), Removal::Gone);
}

/// An engine the shim started but never recorded (it was killed between spawning the engine and
/// writing its state file) is found by its owner tag and killed on the next start; a recorded
/// engine of the same shim, and any process without the tag, are left alone.
#[tokio::test]
async fn an_engine_started_but_never_recorded_is_killed_on_the_next_start() {
    use std::os::unix::process::CommandExt as _;
    let sandbox = Sandbox::new(&[]);
    let shimlet = sandbox.shimlet().await;
    let recorded = engine("recorded");
    shimlet.apply(&recorded).await.unwrap();
    let kept = eventually("the recorded engine", Duration::from_secs(10), || async {
        sandbox.pids("recorded").first().copied()
    })
    .await;
    drop(shimlet);

    let owner = std::fs::canonicalize(sandbox.state_dir()).unwrap();
    let spawn = |tagged: bool| {
        let mut command = std::process::Command::new("sleep");
        command.arg("300").process_group(0);
        if tagged {
            command.env("XMOD_SHIM_PROCESS_OWNER", &owner);
        }
        let child = command.spawn().unwrap();
        sandbox.guard(child.id());
        child
    };
    let mut orphan = spawn(true);
    let mut stranger = spawn(false);

    let _restarted = sandbox.shimlet().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = orphan.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the unrecorded engine still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "{status}");
    assert!(alive(kept), "the recorded engine was killed");
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "an untagged process was killed"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}
