//! Helpers for the process shimlet's tests: a sandbox (state dir + cleanup of every process it
//! records), a tiny HTTP "engine" made of python3, and polling.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use shim_core::{
    EngineConfig, GpuAllocator, HealthProbe, Notifier, ShimletContext, WorkloadObservation,
    WorkloadSpec,
};
use shim_shimlet_process::ProcessShimlet;

/// A python3 one-liner HTTP server: prints its CUDA_VISIBLE_DEVICES and EXTRA env, then answers
/// `GET /health` with 200 on `argv[1]:argv[2]`.
pub const ENGINE: &str = r#"
import http.server, os, sys
print("CVD=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), flush=True)
print("EXTRA=" + os.environ.get("EXTRA", ""), flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// A temporary state directory whose recorded processes (and any registered extra pid) are
/// SIGKILLed on drop, so a failing test leaves nothing running.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub gpus: Arc<GpuAllocator>,
    pub config: serde_json::Value,
    extra: std::sync::Mutex<Vec<(u32, u64)>>,
}

impl Sandbox {
    /// A sandbox with a short stop grace period and the given accelerator ids.
    pub fn new(gpus: &[&str]) -> Self {
        Self::with_config(
            gpus,
            serde_json::json!({ "stopGracePeriodSecs": 0.5, "logTailLines": 5 }),
        )
    }

    pub fn with_config(gpus: &[&str], process: serde_json::Value) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            gpus: Arc::new(GpuAllocator::new(
                gpus.iter().map(|g| (*g).to_string()).collect(),
                false,
            )),
            config: serde_json::json!({ "shimlets": { "process": process } }),
            extra: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("shimlets").join("process")
    }

    pub fn context(&self) -> ShimletContext {
        let config = EngineConfig {
            data_dir: self.dir.path().to_path_buf(),
            plugins: Arc::new(self.config.clone()),
            ..EngineConfig::default()
        };
        ShimletContext {
            settings: config.plugin_settings(),
            state_dir: self.state_dir(),
            notifier: Notifier::detached(),
            gpus: self.gpus.clone(),
        }
    }

    /// A fresh shimlet over this sandbox's state directory (re-adopting what it records).
    pub async fn shimlet(&self) -> ProcessShimlet {
        ProcessShimlet::new(self.context()).await.expect("shimlet")
    }

    /// Also kill `pid` on drop (if it is still the process started at `start_time`).
    pub fn guard(&self, pid: u32) {
        if let Some(start) = start_time(pid) {
            self.extra.lock().unwrap().push((pid, start));
        }
    }

    /// The state file of a service, parsed.
    pub fn state(&self, id: &str) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.state_dir().join(format!("{id}.json"))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Pids of a service's replicas that have not exited, by replica index.
    pub fn pids(&self, id: &str) -> Vec<u32> {
        let Some(state) = self.state(id) else {
            return Vec::new();
        };
        state["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["exit"].is_null())
            .filter_map(|r| r["pid"].as_u64())
            .map(|p| u32::try_from(p).unwrap())
            .collect()
    }

    fn recorded(&self) -> Vec<(u32, u64)> {
        let mut found = self.extra.lock().unwrap().clone();
        let Ok(entries) = std::fs::read_dir(self.state_dir()) else {
            return found;
        };
        for entry in entries.flatten() {
            let Ok(bytes) = std::fs::read(entry.path()) else {
                continue;
            };
            let Ok(state) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            for list in ["replicas", "retired"] {
                for r in state[list].as_array().into_iter().flatten() {
                    if let (Some(pid), Some(start)) = (r["pid"].as_u64(), r["startTime"].as_u64()) {
                        found.push((u32::try_from(pid).unwrap(), start));
                    }
                }
            }
        }
        found
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (pid, start) in self.recorded() {
            // Same rule as the shimlet: only what this test started, identified by start time.
            if pid > 1 && start_time(pid) == Some(start) && pid != std::process::id() {
                let target = Pid::from_raw(i32::try_from(pid).unwrap());
                let _ = killpg(target, Signal::SIGKILL);
                let _ = kill(target, Signal::SIGKILL);
            }
        }
    }
}

/// `(state, start_time)` from /proc/<pid>/stat.
pub fn stat(pid: u32) -> Option<(char, u64)> {
    let content = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &content[content.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields[0].chars().next()?, fields[19].parse().ok()?))
}

pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.1)
}

/// Whether `pid` still runs (a zombie has exited).
pub fn alive(pid: u32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// A one-replica workload running `command` with `args`, probed quickly.
pub fn workload(id: &str, command: &[&str], args: &[&str]) -> WorkloadSpec {
    let mut spec = WorkloadSpec::new(id, 1, "unused-image");
    spec.command = command.iter().map(|s| (*s).to_string()).collect();
    spec.args = args.iter().map(|s| (*s).to_string()).collect();
    spec.health = HealthProbe {
        path: "/health".into(),
        period: Duration::from_millis(50),
        startup_timeout: Duration::from_secs(30),
    };
    spec.env = BTreeMap::new();
    spec
}

/// The python HTTP engine as a workload.
pub fn engine(id: &str) -> WorkloadSpec {
    workload(id, &["python3", "-c", ENGINE], &["{host}", "{port}"])
}

/// Polls `f` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Observes until `pred` holds.
pub async fn observe_until(
    shimlet: &dyn shim_core::Shimlet,
    id: &str,
    what: &str,
    pred: impl Fn(&WorkloadObservation) -> bool,
) -> WorkloadObservation {
    let _ = what; // the shared helper's panic names the service and its last observation
    shim_core::testing::observe_until(shimlet, id, Duration::from_secs(10), pred).await
}

pub fn path_exists(path: &Path) -> bool {
    path.exists()
}
