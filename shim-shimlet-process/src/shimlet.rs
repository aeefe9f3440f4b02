//! [`ProcessShimlet`]: the service table, apply/observe/delete, re-adoption.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use shim_core::shimlet::Failure;
use shim_core::{
    FailureReason, GpuAllocator, ManagedWorkload, Notifier, Removal, Shimlet, ShimletContext,
    ShimletError, WorkloadObservation, WorkloadSpec, WorkloadState,
};
use tokio::task::AbortHandle;

use crate::config::{ProcessConfig, url_authority};
use crate::logs::tail_lines;
use crate::procfs;
use crate::replica::{self, Health, Probe, ReplicaKey, Watch};
use crate::state::{self, FORMAT_VERSION, ReplicaRecord, ServiceFile};

/// Environment variable set on every engine, naming the state directory of the shim that
/// started it (see `Inner::kill_unrecorded_engines`).
const OWNER_ENV: &str = "XMOD_SHIM_PROCESS_OWNER";
/// Runs each replica of a [`WorkloadSpec`] as a local child process. See the crate docs.
pub struct ProcessShimlet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessShimlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessShimlet")
            .field("state_dir", &self.inner.state_dir)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Shared by the shimlet and (weakly) by its monitor tasks.
pub(crate) struct Inner {
    config: ProcessConfig,
    state_dir: PathBuf,
    log_dir: PathBuf,
    notifier: Notifier,
    gpus: Arc<GpuAllocator>,
    http: reqwest::Client,
    /// Never held across an `.await`: observe must stay cheap.
    services: Mutex<HashMap<String, Service>>,
    /// Serialises port choice and spawn, so two services starting at once cannot pick one port
    /// (an engine may not listen on its port for minutes, so the kernel does not know it is taken).
    spawning: Mutex<()>,
    monitors: Mutex<Vec<AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Monitors only hold weak references; stop them with the shimlet. The engines keep
        // running (they are not killed on drop) and a new shimlet re-adopts them.
        if let Ok(monitors) = self.monitors.get_mut() {
            for handle in monitors.drain(..) {
                handle.abort();
            }
        }
    }
}

/// One service as this shimlet sees it.
struct Service {
    spec: WorkloadSpec,
    replicas: BTreeMap<u32, Replica>,
    retired: Vec<ReplicaRecord>,
    /// Why the last apply could not start every replica.
    start_error: Option<Failure>,
    deleting: bool,
}

struct Replica {
    record: ReplicaRecord,
    health: Health,
}

impl Service {
    fn file(&self) -> ServiceFile {
        ServiceFile {
            version: FORMAT_VERSION,
            spec: self.spec.clone(),
            replicas: self.replicas.values().map(|r| r.record.clone()).collect(),
            retired: self.retired.clone(),
            deleting: self.deleting,
        }
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.replicas
            .values()
            .map(|r| r.record.port)
            .chain(self.retired.iter().map(|r| r.port))
    }
}

/// Two specs launch the same processes: only the generation, the replica count (handled by
/// scaling), labels and the image (unused here) may differ.
fn same_launch(a: &WorkloadSpec, b: &WorkloadSpec) -> bool {
    // Durations are persisted in whole milliseconds; compare them that way so a spec read back
    // from a state file after a restart does not look changed.
    let ms = |d: Duration| Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let strip = |s: &WorkloadSpec| {
        let mut s = WorkloadSpec {
            generation: 0,
            replicas: 0,
            labels: BTreeMap::new(),
            image: String::new(),
            ..s.clone()
        };
        s.health.period = ms(s.health.period);
        s.health.startup_timeout = ms(s.health.startup_timeout);
        s
    };
    strip(a) == strip(b)
}

/// Service ids name files, so only a conservative character set is accepted.
fn check_id(service_id: &str) -> Result<(), ShimletError> {
    let ok = !service_id.is_empty()
        && service_id.len() <= 200
        && !service_id.starts_with('.')
        && service_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ShimletError::permanent(
            FailureReason::InvalidSpec,
            format!(
                "service id {service_id:?} cannot name a process workload: use letters, digits, '-', '_' and '.'"
            ),
        ))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn internal(message: String) -> ShimletError {
    ShimletError::permanent(FailureReason::Internal, message)
}

impl ProcessShimlet {
    /// Reads `shimlets.process`, prepares `state_dir` and re-adopts the replicas recorded there
    /// whose processes still run.
    ///
    /// # Errors
    /// A bad config section, or a state directory that cannot be created or listed.
    pub async fn new(ctx: ShimletContext) -> Result<Self, ShimletError> {
        let config: ProcessConfig = ctx
            .settings
            .section_as(&["shimlets", "process"])
            .and_then(|c: ProcessConfig| c.validate().map(|()| c))
            .map_err(|e| ShimletError::permanent(FailureReason::InvalidSpec, e))?;
        let log_dir = ctx.state_dir.join("logs");
        std::fs::create_dir_all(&log_dir).map_err(|e| {
            internal(format!(
                "cannot create the process runtime's state directory {}: {e}",
                log_dir.display()
            ))
            .with_source(e)
        })?;
        let http = reqwest::Client::builder()
            // Probes go to local engines; an HTTP(S)_PROXY in the environment must not capture them.
            .no_proxy()
            .build()
            .map_err(|e| internal(format!("cannot build the health-probe client: {e}")))?;
        let inner = Arc::new(Inner {
            config,
            state_dir: ctx.state_dir,
            log_dir,
            notifier: ctx.notifier,
            gpus: ctx.gpus,
            http,
            services: Mutex::new(HashMap::new()),
            spawning: Mutex::new(()),
            monitors: Mutex::new(Vec::new()),
        });
        inner.readopt().await?;
        Ok(Self { inner })
    }

    /// The configuration in effect.
    pub fn config(&self) -> &ProcessConfig {
        &self.inner.config
    }
}

impl Inner {
    fn services(&self) -> MutexGuard<'_, HashMap<String, Service>> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn persist(&self, service_id: &str, service: &Service) {
        if let Err(err) = state::save(&self.state_dir, service_id, &service.file()) {
            // The processes run regardless; only re-adoption after a restart is at risk.
            tracing::error!(service_id, error = %err, "cannot write the process state file");
        }
    }

    fn url(&self, port: u16, path: &str) -> String {
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        format!(
            "http://{}{path}",
            url_authority(self.config.probe_host(), port)
        )
    }

    fn log_path(&self, service_id: &str, index: u32) -> PathBuf {
        self.log_dir.join(format!("{service_id}-{index}.log"))
    }

    fn probe_for(&self, spec: &WorkloadSpec, record: &ReplicaRecord) -> Probe {
        Probe {
            http: self.http.clone(),
            url: self.url(record.port, &spec.health.path),
            period: spec.health.period.max(Duration::from_millis(50)),
            startup_timeout: spec.health.startup_timeout,
            started_at: UNIX_EPOCH + Duration::from_millis(record.started_at_ms),
            log_path: record.log_path.clone(),
            tail_lines: self.config.log_tail_lines,
        }
    }

    fn spawn_monitor(
        self: &Arc<Self>,
        spec: &WorkloadSpec,
        record: &ReplicaRecord,
        watch: Watch,
        health: Health,
    ) {
        let key = ReplicaKey {
            service_id: spec.service_id.clone(),
            index: record.index,
            pid: record.pid,
        };
        let probe = self.probe_for(spec, record);
        let task = tokio::spawn(replica::monitor(
            Arc::downgrade(self),
            key,
            watch,
            probe,
            health,
        ));
        let mut monitors = self
            .monitors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        monitors.retain(|h| !h.is_finished());
        monitors.push(task.abort_handle());
    }

    /// Monitor callback: a tracked replica's health changed. Returns whether it is still tracked.
    pub(crate) fn set_health(&self, key: &ReplicaKey, health: Health) -> bool {
        let mut services = self.services();
        let Some(replica) = services
            .get_mut(&key.service_id)
            .and_then(|s| s.replicas.get_mut(&key.index))
            .filter(|r| r.record.pid == key.pid && r.record.exit.is_none())
        else {
            return false;
        };
        if replica.health != health {
            tracing::info!(service_id = %key.service_id, replica = key.index, ?health, "replica health changed");
            replica.health = health;
            drop(services);
            self.notifier.changed(&key.service_id);
        }
        true
    }

    /// Monitor callback: a tracked replica exited.
    pub(crate) fn record_exit(&self, key: &ReplicaKey, failure: Failure) {
        let mut services = self.services();
        let Some(service) = services.get_mut(&key.service_id) else {
            return;
        };
        let Some(replica) = service
            .replicas
            .get_mut(&key.index)
            .filter(|r| r.record.pid == key.pid && r.record.exit.is_none())
        else {
            // Stopped on purpose (replaced, scaled away, deleted): not a failure.
            return;
        };
        tracing::warn!(service_id = %key.service_id, replica = key.index, message = %failure.message, "replica exited");
        replica.record.exit = Some(failure);
        self.persist(&key.service_id, service);
        drop(services);
        self.notifier.changed(&key.service_id);
    }

    /// Loads every state file: live replicas are adopted, dead ones recorded as exited.
    async fn readopt(self: &Arc<Self>) -> Result<(), ShimletError> {
        let files = state::load_all(&self.state_dir).map_err(|e| {
            internal(format!(
                "cannot list the process state directory {}: {e}",
                self.state_dir.display()
            ))
        })?;
        for file in files {
            match file {
                Ok(file) => self.adopt(file).await,
                // Left in place for a human: guessing what it held could kill the wrong thing.
                Err(err) => tracing::error!(error = %err, "ignoring unusable process state file"),
            }
        }
        self.kill_unrecorded_engines();
        Ok(())
    }

    /// The environment entry every engine this shimlet starts carries, naming its state
    /// directory: how an engine it started but never recorded is recognised after a crash.
    fn owner_tag(&self) -> String {
        format!("{OWNER_ENV}={}", self.owner().display())
    }

    /// The state directory, absolute, as the engines' owner.
    fn owner(&self) -> PathBuf {
        std::fs::canonicalize(&self.state_dir).unwrap_or_else(|_| self.state_dir.clone())
    }

    /// Kills engines started by an earlier run of this shim that died (kill -9) between
    /// spawning them and recording them: nothing would ever stop them, and their services get
    /// engines of their own.
    fn kill_unrecorded_engines(&self) {
        let known: std::collections::HashSet<u32> = self
            .services()
            .values()
            .flat_map(|s| s.replicas.values().map(|r| r.record.pid))
            .collect();
        for pid in procfs::unrecorded_leaders(&self.owner_tag(), &known) {
            tracing::warn!(
                pid,
                "killing an engine started just before the shim died and never recorded"
            );
            procfs::kill_unrecorded(pid);
        }
    }

    async fn adopt(self: &Arc<Self>, file: ServiceFile) {
        let id = file.spec.service_id.clone();
        let mut service = Service {
            spec: file.spec,
            replicas: BTreeMap::new(),
            retired: file.retired,
            start_error: None,
            deleting: file.deleting,
        };
        let mut monitored = Vec::new();
        for mut record in file.replicas {
            let running =
                record.exit.is_none() && procfs::is_running(record.pid, record.start_time);
            if record.exit.is_none() && !running {
                let lines =
                    tail_lines(&record.log_path, self.config.log_tail_lines).unwrap_or_default();
                record.exit = Some(replica::failure_for(
                    record.index,
                    record.pid,
                    "exited while the shim was down (exit status unknown)",
                    &lines,
                    &record.log_path,
                ));
            }
            if running {
                self.gpus
                    .claim(&format!("{id}/{}", record.index), record.gpus.clone());
                tracing::info!(service_id = %id, replica = record.index, pid = record.pid, "re-adopted a running replica");
                monitored.push(record.clone());
            }
            service.replicas.insert(
                record.index,
                Replica {
                    record,
                    health: Health::Starting,
                },
            );
        }
        // Probe the adopted replicas once now, so a healthy service reads as ready right after a
        // restart instead of looking like it dropped to "starting" (which the engine would treat
        // as drift and repair).
        let spec = service.spec.clone();
        let checks = futures::future::join_all(
            monitored
                .iter()
                .map(|r| async { replica::check(&self.probe_for(&spec, r)).await.is_ok() }),
        )
        .await;
        for (record, healthy) in monitored.iter().zip(&checks) {
            if let Some(replica) = service.replicas.get_mut(&record.index) {
                replica.health = if *healthy {
                    Health::Ready
                } else {
                    Health::Starting
                };
            }
        }
        // Retired replicas were being stopped when the shim went down; finish the job.
        service
            .retired
            .retain(|r| procfs::is_running(r.pid, r.start_time));
        let has_retired = !service.retired.is_empty();
        self.persist(&id, &service);
        self.services().insert(id.clone(), service);
        for (record, healthy) in monitored.iter().zip(checks) {
            self.spawn_monitor(
                &spec,
                record,
                Watch::Adopted {
                    start_time: record.start_time,
                },
                if healthy {
                    Health::Ready
                } else {
                    Health::Starting
                },
            );
        }
        if has_retired {
            let inner = self.clone();
            tokio::spawn(async move {
                inner.stop_retired(&id).await;
            });
        }
    }

    /// Stops every retired replica of a service (concurrently), forgetting those that are gone.
    /// Returns how many are still running.
    async fn stop_retired(&self, service_id: &str) -> usize {
        let retired: Vec<ReplicaRecord> = self
            .services()
            .get(service_id)
            .map(|s| s.retired.clone())
            .unwrap_or_default();
        if retired.is_empty() {
            return 0;
        }
        let grace = self.config.stop_grace_period();
        let results = futures::future::join_all(
            retired
                .iter()
                .map(|r| replica::stop(r.pid, r.start_time, grace)),
        )
        .await;
        let gone: HashSet<u32> = retired
            .iter()
            .zip(&results)
            .filter(|(_, gone)| **gone)
            .map(|(r, _)| r.pid)
            .collect();
        let mut services = self.services();
        let Some(service) = services.get_mut(service_id) else {
            return 0;
        };
        for record in retired.iter().filter(|r| gone.contains(&r.pid)) {
            // Free the accelerators unless a current replica of that index holds them now.
            if !service.replicas.contains_key(&record.index) {
                self.gpus.release(&format!("{service_id}/{}", record.index));
            }
        }
        service.retired.retain(|r| !gone.contains(&r.pid));
        self.persist(service_id, service);
        service.retired.len()
    }

    /// A port for a new replica: `preferred` (its predecessor's, so the address stays put) when
    /// free, else one from `portRange`, else one the kernel picks. Ports held by any replica of
    /// this shimlet are skipped even when nothing listens on them yet.
    fn pick_port(&self, preferred: Option<u16>) -> Result<u16, String> {
        let used: HashSet<u16> = self.services().values().flat_map(Service::ports).collect();
        let host = self.config.bind_host.as_str();
        let bindable = |port: u16| std::net::TcpListener::bind((host, port)).is_ok();
        if let Some(port) = preferred.filter(|p| !used.contains(p) && bindable(*p)) {
            return Ok(port);
        }
        if let Some([from, to]) = self.config.port_range {
            return (from..=to)
                .find(|p| !used.contains(p) && bindable(*p))
                .ok_or_else(|| format!("no free port in portRange [{from}, {to}]"));
        }
        for _ in 0..64 {
            let listener = std::net::TcpListener::bind((host, 0))
                .map_err(|e| format!("cannot bind {host} to find a free port: {e}"))?;
            let port = listener
                .local_addr()
                .map_err(|e| format!("cannot read the bound port: {e}"))?
                .port();
            if !used.contains(&port) {
                return Ok(port);
            }
        }
        Err("no free port found after 64 tries".into())
    }

    /// Starts replica `index` of `spec` and starts watching it.
    fn start_replica(
        self: &Arc<Self>,
        spec: &WorkloadSpec,
        index: u32,
        preferred_port: Option<u16>,
    ) -> Result<(), ShimletError> {
        let id = &spec.service_id;
        let owner = format!("{id}/{index}");
        let _spawning = self
            .spawning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gpus = self
            .gpus
            .allocate(&owner, spec.resources.accelerators)
            .map_err(|e| {
                ShimletError::permanent(
                    FailureReason::Unschedulable,
                    format!("replica {index}: {e}"),
                )
            })?;
        let started = self.spawn_process(spec, index, preferred_port, &gpus);
        let (record, child) = match started {
            Ok(started) => started,
            Err(err) => {
                self.gpus.release(&owner);
                return Err(err);
            }
        };
        {
            let mut services = self.services();
            let Some(service) = services.get_mut(id) else {
                // Cannot happen while calls for one service never overlap; if it does, do not
                // leave an untracked engine behind (unreaped, so its pid is still ours).
                let mut child = child;
                let _ = child.start_kill();
                tokio::spawn(async move { child.wait().await });
                return Err(internal(format!("service {id} vanished while starting")));
            };
            service.replicas.insert(
                index,
                Replica {
                    record: record.clone(),
                    health: Health::Starting,
                },
            );
            self.persist(id, service);
        }
        tracing::info!(service_id = %id, replica = index, pid = record.pid, port = record.port, "started replica");
        self.spawn_monitor(spec, &record, Watch::Child(child), Health::Starting);
        Ok(())
    }

    fn spawn_process(
        &self,
        spec: &WorkloadSpec,
        index: u32,
        preferred_port: Option<u16>,
        gpus: &[String],
    ) -> Result<(ReplicaRecord, tokio::process::Child), ShimletError> {
        let Some((program, leading)) = spec.command.split_first() else {
            return Err(ShimletError::permanent(
                FailureReason::InvalidSpec,
                "the process runtime needs a command (program and leading args)",
            ));
        };
        let port = self
            .pick_port(preferred_port)
            .map_err(|e| ShimletError::transient(FailureReason::PortInUse, e))?;
        let log_path = self.log_path(&spec.service_id, index);
        let log_error = |e: std::io::Error| {
            ShimletError::transient(
                FailureReason::RuntimeError,
                format!("cannot open the replica log {}: {e}", log_path.display()),
            )
        };
        rotate_if_larger(&log_path, self.config.max_log_bytes).map_err(log_error)?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(log_error)?;
        // A marker between runs, so the log of a restarted replica reads clearly. Args are left
        // out: they may carry API keys.
        writeln!(
            log,
            "--- replica {index} of {} (generation {}) starting {program} on port {port} at {} ms since the epoch ---",
            spec.service_id,
            spec.generation,
            now_ms()
        )
        .map_err(log_error)?;
        let stderr = log.try_clone().map_err(log_error)?;
        let model_dir = spec
            .model
            .as_ref()
            .map(|m| m.host_path.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut command = tokio::process::Command::new(program);
        command
            .args(leading)
            .args(spec.render_args(&self.config.bind_host, port, &model_dir))
            .envs(&spec.env)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(stderr)
            // Its own process group: the shim's Ctrl-C does not reach engines, and stopping
            // signals the engine's workers along with it.
            .process_group(0)
            .kill_on_drop(false);
        if !gpus.is_empty() {
            command.env("CUDA_VISIBLE_DEVICES", gpus.join(","));
        }
        command.env(OWNER_ENV, self.owner());
        let mut child = command.spawn().map_err(|e| spawn_error(program, e))?;
        let Some(pid) = child.id() else {
            return Err(internal(format!("{program} started without a pid")));
        };
        let Some(start_time) = procfs::start_time(pid) else {
            // Without its start time it could never be signalled safely; do not keep it.
            // (The child is not reaped yet, so its pid cannot have been reused.)
            let _ = child.start_kill();
            return Err(internal(format!(
                "cannot read /proc/{pid}/stat of the replica just started"
            )));
        };
        let record = ReplicaRecord {
            index,
            pid,
            start_time,
            port,
            gpus: gpus.to_vec(),
            log_path,
            started_at_ms: now_ms(),
            exit: None,
        };
        Ok((record, child))
    }

    fn observe(&self, service_id: &str) -> WorkloadObservation {
        let services = self.services();
        let Some(service) = services.get(service_id).filter(|s| !s.deleting) else {
            return WorkloadObservation::missing();
        };
        let desired = service.spec.replicas;
        let wanted = || service.replicas.range(..desired).map(|(_, r)| r);
        let ready = u32::try_from(
            wanted()
                .filter(|r| r.record.exit.is_none() && r.health == Health::Ready)
                .count(),
        )
        .unwrap_or(u32::MAX);
        let url = |r: &Replica| {
            format!(
                "http://{}",
                url_authority(self.config.advertise_host(), r.record.port)
            )
        };
        let address = (desired > 0).then(|| wanted().next()).flatten().map(url);
        let replica_addresses = wanted()
            .filter(|r| r.record.exit.is_none() && r.health == Health::Ready)
            .map(url)
            .collect();
        let exited = wanted().find_map(|r| r.record.exit.clone());
        let timed_out = wanted().find_map(|r| match &r.health {
            Health::TimedOut(f) if r.record.exit.is_none() => Some(f.clone()),
            _ => None,
        });
        let unhealthy = wanted().find_map(|r| match &r.health {
            Health::Unhealthy(m) if r.record.exit.is_none() => Some(Failure {
                reason: FailureReason::RuntimeError,
                message: m.clone(),
            }),
            _ => None,
        });
        let (state, failure) = if desired == 0 {
            (WorkloadState::Ready, None)
        } else if let Some(failure) = exited {
            (WorkloadState::Failed, Some(failure))
        } else if let Some(failure) = service.start_error.clone() {
            if failure.reason == FailureReason::Unschedulable {
                (WorkloadState::Pending, Some(failure))
            } else {
                (WorkloadState::Failed, Some(failure))
            }
        } else if let Some(failure) = timed_out {
            (WorkloadState::Failed, Some(failure))
        } else if ready == desired {
            (WorkloadState::Ready, None)
        } else {
            (WorkloadState::Starting, unhealthy)
        };
        WorkloadObservation {
            state,
            ready_replicas: ready,
            desired_replicas: desired,
            address,
            replica_addresses,
            generation: Some(service.spec.generation),
            failure,
        }
    }

    /// Removes this service's log files (`<id>-<n>.log` and rotated `<id>-<n>.log.1`, exactly:
    /// another id may start with this one).
    fn remove_logs(&self, service_id: &str) {
        let Ok(entries) = std::fs::read_dir(&self.log_dir) else {
            return;
        };
        let prefix = format!("{service_id}-");
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name
                .strip_prefix(&prefix)
                .and_then(|rest| {
                    rest.strip_suffix(".log")
                        .or_else(|| rest.strip_suffix(".log.1"))
                })
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if ours && let Err(err) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %err, "cannot remove a replica log");
            }
        }
    }
}

fn spawn_error(program: &str, err: std::io::Error) -> ShimletError {
    let message = match err.kind() {
        std::io::ErrorKind::NotFound if program.contains('/') => {
            format!("engine program `{program}` not found")
        }
        std::io::ErrorKind::NotFound => format!(
            "engine program `{program}` not found on PATH; install it or give its full path in the engine preset"
        ),
        std::io::ErrorKind::PermissionDenied => {
            format!("engine program `{program}` is not executable: {err}")
        }
        // EAGAIN / ENOMEM from fork: the host is out of processes or memory for now. That is
        // the runtime being overloaded, never a reason to fail the service.
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::OutOfMemory => {
            return ShimletError::unavailable(format!(
                "cannot start `{program}` now, the host is out of resources: {err}"
            ))
            .with_source(err);
        }
        _ => {
            return ShimletError::transient(
                FailureReason::RuntimeError,
                format!("cannot start `{program}`: {err}"),
            )
            .with_source(err);
        }
    };
    ShimletError::permanent(FailureReason::BinaryNotFound, message).with_source(err)
}

/// Where `program` would be found, the way `execvp` looks (for dry runs).
fn resolve_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

#[async_trait]
impl Shimlet for ProcessShimlet {
    async fn apply(&self, workload: &WorkloadSpec) -> Result<(), ShimletError> {
        check_id(&workload.service_id)?;
        if workload.command.is_empty() && workload.replicas > 0 {
            return Err(ShimletError::permanent(
                FailureReason::InvalidSpec,
                "the process runtime needs a command (program and leading args); it does not run images",
            ));
        }
        let inner = &self.inner;
        let id = workload.service_id.as_str();
        // Decide what changes, under the lock; the slow parts (stopping, spawning) come after.
        let to_start: Vec<(u32, Option<u16>)> = {
            let mut services = inner.services();
            let service = services.entry(id.to_string()).or_insert_with(|| Service {
                spec: workload.clone(),
                replicas: BTreeMap::new(),
                retired: Vec::new(),
                start_error: None,
                deleting: false,
            });
            let relaunch = !same_launch(&service.spec, workload);
            let mut ports = HashMap::new();
            let replaced: Vec<u32> = service
                .replicas
                .iter()
                .filter(|(index, r)| {
                    relaunch
                        || **index >= workload.replicas
                        || r.record.exit.is_some()
                        // Hung (failed its probes after being ready) or never ready: the
                        // engine's repair replaces it, like a Kubernetes liveness probe.
                        || matches!(r.health, Health::TimedOut(_) | Health::Unhealthy(_))
                })
                .map(|(index, _)| *index)
                .collect();
            for index in replaced {
                if let Some(old) = service.replicas.remove(&index) {
                    if index < workload.replicas {
                        ports.insert(index, old.record.port);
                    }
                    service.retired.push(old.record);
                }
            }
            service.spec = workload.clone();
            service.start_error = None;
            service.deleting = false;
            inner.persist(id, service);
            (0..workload.replicas)
                .filter(|index| !service.replicas.contains_key(index))
                .map(|index| (index, ports.get(&index).copied()))
                .collect()
        };
        let stuck = inner.stop_retired(id).await;
        if stuck > 0 {
            return Err(ShimletError::transient(
                FailureReason::RuntimeError,
                format!("{stuck} old replica(s) did not exit even after SIGKILL; will retry"),
            ));
        }
        for (index, port) in to_start {
            if let Err(err) = inner.start_replica(workload, index, port) {
                let mut services = inner.services();
                if let Some(service) = services.get_mut(id) {
                    service.start_error = Some(Failure {
                        reason: err.reason,
                        message: err.message.clone(),
                    });
                }
                return Err(err);
            }
        }
        Ok(())
    }

    async fn observe(&self, service_id: &str) -> Result<WorkloadObservation, ShimletError> {
        Ok(self.inner.observe(service_id))
    }

    async fn delete(&self, service_id: &str) -> Result<Removal, ShimletError> {
        check_id(service_id)?;
        let inner = &self.inner;
        {
            let mut services = inner.services();
            let Some(service) = services.get_mut(service_id) else {
                inner.remove_logs(service_id);
                return Ok(Removal::Gone);
            };
            // Everything becomes retired: monitors stop reporting, observe says Missing, and
            // a restart mid-delete finishes the job from the state file.
            let replicas = std::mem::take(&mut service.replicas);
            service
                .retired
                .extend(replicas.into_values().map(|r| r.record));
            service.deleting = true;
            inner.persist(service_id, service);
        }
        if inner.stop_retired(service_id).await > 0 {
            return Ok(Removal::InProgress);
        }
        inner.services().remove(service_id);
        inner.gpus.release_prefix(&format!("{service_id}/"));
        state::remove(&inner.state_dir, service_id)
            .map_err(|e| internal(format!("cannot remove the state file of {service_id}: {e}")))?;
        inner.remove_logs(service_id);
        Ok(Removal::Gone)
    }

    async fn list(&self) -> Result<Vec<ManagedWorkload>, ShimletError> {
        let services = self.inner.services();
        let mut listed: Vec<ManagedWorkload> = services
            .iter()
            .map(|(id, service)| {
                let pids: Vec<String> = service
                    .replicas
                    .values()
                    .map(|r| &r.record)
                    .filter(|r| r.exit.is_none())
                    .chain(&service.retired)
                    .map(|r| r.pid.to_string())
                    .collect();
                ManagedWorkload {
                    service_id: id.clone(),
                    generation: Some(service.spec.generation),
                    name: if pids.is_empty() {
                        "no running process".into()
                    } else {
                        format!("pid {}", pids.join(","))
                    },
                }
            })
            .collect();
        listed.sort_by(|a, b| a.service_id.cmp(&b.service_id));
        Ok(listed)
    }

    async fn logs(&self, service_id: &str, tail: usize) -> Result<String, ShimletError> {
        let paths: Vec<(u32, PathBuf)> = {
            let services = self.inner.services();
            let Some(service) = services.get(service_id) else {
                return Err(ShimletError::permanent(
                    FailureReason::WorkloadMissing,
                    format!("no process workload for service {service_id}"),
                ));
            };
            service
                .replicas
                .values()
                .map(|r| (r.record.index, r.record.log_path.clone()))
                .collect()
        };
        let prefixed = paths.len() > 1;
        let mut out = String::new();
        for (index, path) in paths {
            let lines = tail_lines(&path, tail).map_err(|e| {
                ShimletError::transient(
                    FailureReason::RuntimeError,
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            for line in lines {
                if prefixed {
                    out.push_str(&format!("[replica {index}] "));
                }
                out.push_str(&line);
                out.push('\n');
            }
        }
        Ok(out)
    }

    async fn render(&self, workload: &WorkloadSpec) -> Result<serde_json::Value, ShimletError> {
        check_id(&workload.service_id)?;
        let inner = &self.inner;
        let (program, leading) = workload.command.split_first().ok_or_else(|| {
            ShimletError::permanent(
                FailureReason::InvalidSpec,
                "the process runtime needs a command (program and leading args)",
            )
        })?;
        let model_dir = workload
            .model
            .as_ref()
            .map(|m| m.host_path.to_string_lossy().into_owned())
            .unwrap_or_default();
        // `{port}` is only known at start; show where it goes.
        let mut shown = workload.clone();
        for arg in &mut shown.args {
            *arg = arg.replace("{port}", "<allocated>");
        }
        let args: Vec<String> = leading
            .iter()
            .cloned()
            .chain(shown.render_args(&inner.config.bind_host, 0, &model_dir))
            .collect();
        let accelerators = workload.resources.accelerators;
        let replicas: Vec<serde_json::Value> = (0..workload.replicas)
            .map(|index| {
                serde_json::json!({
                    "replica": index,
                    "program": program,
                    "resolvedProgram": resolve_program(program),
                    "args": args,
                    "env": workload.env,
                    "cudaVisibleDevices": (accelerators > 0).then(|| format!(
                        "<{accelerators} of {:?}, allocated at start>", inner.gpus.devices()
                    )),
                    "port": "<allocated>",
                    "processGroup": "own (leader)",
                    "logPath": inner.log_path(&workload.service_id, index),
                })
            })
            .collect();
        Ok(serde_json::json!({
            "runtime": "process",
            "serviceId": workload.service_id,
            "generation": workload.generation,
            "bindHost": inner.config.bind_host,
            "address": (workload.replicas > 0).then(|| format!(
                "http://{}", url_authority(inner.config.advertise_host(), "<allocated>")
            )),
            "health": {
                "url": format!("http://{}{}", url_authority(inner.config.probe_host(), "<allocated>"), workload.health.path),
                "periodMs": u64::try_from(workload.health.period.as_millis()).unwrap_or(u64::MAX),
                "startupTimeoutMs": u64::try_from(workload.health.startup_timeout.as_millis()).unwrap_or(u64::MAX),
            },
            "stateFile": state::path(&inner.state_dir, &workload.service_id),
            "replicas": replicas,
        }))
    }
}

/// Moves `path` to `<path>.1` (replacing an older one) when it is larger than `limit`, so a
/// replica that restarts often cannot fill the disk. Only called before a replica starts, when
/// no process writes to the file.
fn rotate_if_larger(path: &std::path::Path, limit: u64) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() > limit => {
            let mut rotated = path.as_os_str().to_owned();
            rotated.push(".1");
            std::fs::rename(path, rotated)
        }
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::rotate_if_larger;

    #[test]
    fn a_log_over_the_limit_moves_aside_and_a_small_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("s-0.log");
        std::fs::write(&log, "x".repeat(100)).unwrap();
        rotate_if_larger(&log, 1000).unwrap();
        assert!(log.exists(), "under the limit: untouched");
        rotate_if_larger(&log, 10).unwrap();
        assert!(!log.exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("s-0.log.1"))
                .unwrap()
                .len(),
            100
        );
        rotate_if_larger(&dir.path().join("missing.log"), 10).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_launch_relevant_fields_force_a_relaunch() {
        let a = WorkloadSpec::new("s", 1, "img");
        let mut b = a.clone();
        b.generation = 2;
        b.replicas = 3;
        b.labels.insert("x".into(), "y".into());
        b.image = "other".into();
        assert!(same_launch(&a, &b));
        b.health.period += Duration::from_micros(300);
        assert!(
            same_launch(&a, &b),
            "sub-millisecond parts are not persisted"
        );
        b.env.insert("K".into(), "V".into());
        assert!(!same_launch(&a, &b));
    }

    #[test]
    fn ids_that_could_escape_the_state_dir_are_refused() {
        assert!(check_id("a1b2c3d4").is_ok());
        assert!(check_id("svc-1_x.y").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert_eq!(
                check_id(bad).unwrap_err().reason,
                FailureReason::InvalidSpec,
                "{bad:?}"
            );
        }
    }
}
