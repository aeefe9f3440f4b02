//! The shimlet's in-memory view of its containers, which `observe` answers from, and the pure
//! rules that turn Docker's inspect data into typed observations.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use shim_core::shimlet::Failure;
use shim_core::{FailureReason, WorkloadObservation, WorkloadState};
use tokio::task::AbortHandle;

use crate::config::http_url;
use crate::render::{
    LABEL_GENERATION, LABEL_HEALTH_PATH, LABEL_HEALTH_PERIOD_MS, LABEL_MANAGED_BY, LABEL_PORT,
    LABEL_REPLICA, LABEL_REPLICAS, LABEL_SERVICE_ID, LABEL_STARTUP_TIMEOUT_MS, MANAGED_BY_VALUE,
};

/// Restarts by Docker's own restart policy after which a replica counts as crash-looping.
pub(crate) const CRASH_LOOP_RESTARTS: i64 = 3;

/// What the shimlet knows of one service.
#[derive(Debug, Default)]
pub(crate) struct ServiceView {
    /// Replicas wanted (from the last apply, or from labels after re-adoption).
    pub desired_replicas: u32,
    /// Generation wanted; replicas of another generation do not count as ready.
    pub generation: Option<u64>,
    /// Why the last apply could not create what it wanted (image pull, no free GPU, …).
    pub failure: Option<Failure>,
    /// Replicas by index.
    pub replicas: BTreeMap<u32, ReplicaView>,
}

/// What the shimlet knows of one replica's container.
#[derive(Debug)]
pub(crate) struct ReplicaView {
    /// Container id.
    pub container_id: String,
    /// What the last inspect said.
    pub facts: ContainerFacts,
    /// Health as the probe task last saw it.
    pub health: Health,
    /// Why the container is not running (exit code, OOM, crash loop), with its last log lines.
    pub failure: Option<Failure>,
    /// The health probe task watching this container at this host port.
    pub probe: Option<ProbeTask>,
}

/// A running health probe; aborted when dropped, so replacing or forgetting a replica stops it.
#[derive(Debug)]
pub(crate) struct ProbeTask {
    /// Host port it probes (a restarted container may get another one).
    pub host_port: u16,
    /// The task.
    pub handle: AbortHandle,
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Health of a running replica, from the shimlet's own HTTP probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    /// Not ready yet.
    Starting,
    /// Answers its health path with 200.
    Ready,
    /// Was ready; now fails its probe repeatedly.
    Unhealthy(String),
    /// Never became ready within its start-up budget.
    TimedOut(String),
}

/// Coarse container state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Created,
    Running,
    Restarting,
    Paused,
    Exited,
    Dead,
    Removing,
}

/// The parts of an inspect the shimlet uses.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ContainerFacts {
    pub id: String,
    pub name: String,
    pub service_id: String,
    pub replica: u32,
    pub generation: Option<u64>,
    pub desired_replicas: Option<u32>,
    pub status: Status,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    /// Docker's own error (e.g. the entrypoint could not be executed).
    pub error: String,
    pub restart_count: i64,
    pub started_at: Option<SystemTime>,
    /// Engine port inside the container.
    pub container_port: Option<u16>,
    /// Host port it is published on.
    pub host_port: Option<u16>,
    pub health_path: String,
    pub health_period: Duration,
    pub startup_timeout: Duration,
    /// GPU ids in the container's `DeviceRequests`.
    pub gpu_ids: Vec<String>,
    /// The memory limit in bytes, for OOM messages.
    pub memory_limit: Option<i64>,
}

impl ContainerFacts {
    /// Reads an inspect; `None` when the container is not one of ours.
    /// `host_network`: ports are not published, the engine listens on the host directly.
    pub fn from_inspect(info: &ContainerInspectResponse, host_network: bool) -> Option<Self> {
        let config = info.config.as_ref()?;
        let labels = config.labels.as_ref()?;
        if labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MANAGED_BY_VALUE) {
            return None;
        }
        let service_id = labels.get(LABEL_SERVICE_ID)?.clone();
        let replica = labels.get(LABEL_REPLICA)?.parse().ok()?;
        let state = info.state.clone().unwrap_or_default();
        let status = match state.status {
            Some(ContainerStateStatusEnum::RUNNING) => Status::Running,
            Some(ContainerStateStatusEnum::RESTARTING) => Status::Restarting,
            Some(ContainerStateStatusEnum::PAUSED) => Status::Paused,
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::STOPPING) => {
                Status::Exited
            }
            Some(ContainerStateStatusEnum::DEAD) => Status::Dead,
            Some(ContainerStateStatusEnum::REMOVING) => Status::Removing,
            Some(ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::EMPTY) | None => {
                Status::Created
            }
        };
        let container_port: Option<u16> = labels.get(LABEL_PORT).and_then(|p| p.parse().ok());
        let host_port = if host_network {
            container_port
        } else {
            container_port.and_then(|port| published_port(info, port))
        };
        let millis = |key: &str, default: Duration| {
            labels
                .get(key)
                .and_then(|v| v.parse().ok())
                .map_or(default, Duration::from_millis)
        };
        let defaults = shim_core::HealthProbe::default();
        let host_config = info.host_config.as_ref();
        Some(Self {
            id: info.id.clone().unwrap_or_default(),
            name: info
                .name
                .as_deref()
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            service_id,
            replica,
            generation: labels.get(LABEL_GENERATION).and_then(|g| g.parse().ok()),
            desired_replicas: labels.get(LABEL_REPLICAS).and_then(|r| r.parse().ok()),
            status,
            exit_code: state.exit_code,
            oom_killed: state.oom_killed.unwrap_or(false),
            error: state.error.unwrap_or_default(),
            restart_count: info.restart_count.unwrap_or(0),
            started_at: state.started_at.as_deref().and_then(parse_time),
            container_port,
            host_port,
            health_path: labels
                .get(LABEL_HEALTH_PATH)
                .cloned()
                .unwrap_or(defaults.path),
            health_period: millis(LABEL_HEALTH_PERIOD_MS, defaults.period),
            startup_timeout: millis(LABEL_STARTUP_TIMEOUT_MS, defaults.startup_timeout),
            gpu_ids: host_config
                .and_then(|h| h.device_requests.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|r| r.device_ids.clone())
                .flatten()
                .collect(),
            memory_limit: host_config.and_then(|h| h.memory).filter(|m| *m > 0),
        })
    }

    /// Whether the container is not running and will not run again by itself, or keeps
    /// restarting: the states worth fetching log lines for.
    pub fn needs_logs(&self) -> bool {
        match self.status {
            Status::Exited | Status::Dead => true,
            Status::Restarting => self.restart_count >= CRASH_LOOP_RESTARTS,
            Status::Created => !self.error.is_empty(),
            Status::Running | Status::Paused | Status::Removing => false,
        }
    }

    /// Why the container is not serving, in the runtime's words plus its last log lines;
    /// `None` while it runs (readiness is the probe's business) or has merely been created.
    pub fn failure(&self, logs: &str) -> Option<Failure> {
        let tail = if logs.trim().is_empty() {
            String::new()
        } else {
            format!("; last log lines:\n{}", logs.trim_end())
        };
        let name = &self.name;
        let (reason, message) = match self.status {
            Status::Running | Status::Paused | Status::Removing => return None,
            Status::Restarting if self.restart_count < CRASH_LOOP_RESTARTS => return None,
            Status::Restarting => (
                FailureReason::CrashLoop,
                format!(
                    "container {name} keeps crashing: restarted {} times, last exit code {}",
                    self.restart_count,
                    self.exit_code.unwrap_or_default()
                ),
            ),
            Status::Created if self.error.is_empty() => return None,
            Status::Created | Status::Dead => {
                let reason = if looks_like_missing_binary(&self.error) {
                    FailureReason::BinaryNotFound
                } else {
                    FailureReason::RuntimeError
                };
                (
                    reason,
                    format!("container {name} could not run: {}", self.error),
                )
            }
            Status::Exited if self.oom_killed => (
                FailureReason::OutOfMemory,
                match self.memory_limit {
                    Some(limit) => format!(
                        "container {name} was killed for using more memory than its limit of {limit} bytes"
                    ),
                    None => format!("container {name} was killed for running out of memory"),
                },
            ),
            Status::Exited if self.restart_count >= CRASH_LOOP_RESTARTS => (
                FailureReason::CrashLoop,
                format!(
                    "container {name} exited with code {} after {} restarts",
                    self.exit_code.unwrap_or_default(),
                    self.restart_count
                ),
            ),
            Status::Exited => {
                let code = self.exit_code.unwrap_or_default();
                (
                    FailureReason::Exited,
                    format!(
                        "container {name} exited with code {code}{}",
                        signal_note(code)
                    ),
                )
            }
        };
        Some(Failure {
            reason,
            message: format!("{message}{tail}"),
        })
    }
}

/// Exit codes above 128 mean "killed by signal N-128"; name the common ones.
fn signal_note(code: i64) -> &'static str {
    match code {
        137 => " (SIGKILL: killed)",
        143 => " (SIGTERM: stopped)",
        139 => " (SIGSEGV: crashed)",
        134 => " (SIGABRT: aborted)",
        _ => "",
    }
}

/// Whether Docker's error says the entrypoint does not exist in the image.
pub(crate) fn looks_like_missing_binary(error: &str) -> bool {
    error.contains("executable file not found") || error.contains("no such file or directory")
}

/// The host port `port/tcp` is published on.
fn published_port(info: &ContainerInspectResponse, port: u16) -> Option<u16> {
    let ports = info.network_settings.as_ref()?.ports.as_ref()?;
    ports
        .get(&format!("{port}/tcp"))?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.as_deref()?.parse().ok())
}

/// Docker's RFC 3339 times; the zero time ("0001-01-01T00:00:00Z") means "never".
fn parse_time(text: &str) -> Option<SystemTime> {
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    let millis = u64::try_from(time.timestamp_millis()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
}

impl ServiceView {
    /// A view rebuilt from a container found in the engine (re-adoption, or an event for a
    /// service no apply has touched since the shim started).
    pub fn adopted(facts: &ContainerFacts) -> Self {
        Self {
            desired_replicas: facts.desired_replicas.unwrap_or(facts.replica + 1),
            generation: facts.generation,
            failure: None,
            replicas: BTreeMap::new(),
        }
    }

    /// What `observe` reports. `advertised_host` goes into the address.
    pub fn observation(&self, advertised_host: &str) -> WorkloadObservation {
        let desired = self.desired_replicas;
        let current = |r: &&ReplicaView| {
            r.facts.replica < desired
                && (self.generation.is_none() || r.facts.generation == self.generation)
        };
        let ready = self
            .replicas
            .values()
            .filter(current)
            .filter(|r| r.facts.status == Status::Running && r.health == Health::Ready)
            .count() as u32;
        // The address of the lowest ready replica, or of the lowest one with a port.
        let address = self
            .replicas
            .values()
            .filter(current)
            .filter(|r| r.facts.status == Status::Running)
            .min_by_key(|r| (r.health != Health::Ready, r.facts.replica))
            .and_then(|r| r.facts.host_port)
            .map(|port| http_url(advertised_host, port));
        let replica_addresses = self
            .replicas
            .values()
            .filter(current)
            .filter(|r| r.facts.status == Status::Running && r.health == Health::Ready)
            .filter_map(|r| r.facts.host_port)
            .map(|port| http_url(advertised_host, port))
            .collect();
        let mut observation = WorkloadObservation {
            state: WorkloadState::Starting,
            ready_replicas: ready,
            desired_replicas: desired,
            address,
            replica_addresses,
            generation: self.generation,
            failure: None,
        };
        if let Some(failure) = &self.failure {
            observation.state = if failure.reason == FailureReason::Unschedulable {
                WorkloadState::Pending
            } else {
                WorkloadState::Failed
            };
            observation.failure = Some(failure.clone());
            return observation;
        }
        if self.replicas.is_empty() {
            if desired > 0 {
                observation.state = WorkloadState::Missing;
                return observation;
            }
            observation.state = WorkloadState::Ready;
            return observation;
        }
        let replica_failure = (0..desired).find_map(|index| match self.replicas.get(&index) {
            None => Some(Failure {
                reason: FailureReason::WorkloadMissing,
                message: format!("replica {index}'s container is gone"),
            }),
            Some(r) => r.failure.clone().or_else(|| match &r.health {
                Health::Unhealthy(message) | Health::TimedOut(message)
                    if r.facts.status == Status::Running =>
                {
                    Some(Failure {
                        reason: if matches!(r.health, Health::TimedOut(_)) {
                            FailureReason::StartupTimeout
                        } else {
                            FailureReason::RuntimeError
                        },
                        message: message.clone(),
                    })
                }
                _ => None,
            }),
        });
        if let Some(failure) = replica_failure {
            observation.state = WorkloadState::Failed;
            observation.failure = Some(failure);
        } else if ready == desired && self.replicas.len() as u32 == desired {
            observation.state = WorkloadState::Ready;
        }
        observation
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bollard::models::{ContainerConfig, ContainerState, NetworkSettings, PortBinding};

    use super::*;

    fn inspect(status: ContainerStateStatusEnum) -> ContainerInspectResponse {
        let labels = HashMap::from(
            [
                (LABEL_MANAGED_BY, MANAGED_BY_VALUE),
                (LABEL_SERVICE_ID, "svc"),
                (LABEL_REPLICA, "0"),
                (LABEL_REPLICAS, "1"),
                (LABEL_GENERATION, "2"),
                (LABEL_PORT, "8000"),
                (LABEL_HEALTH_PATH, "/ready"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        ContainerInspectResponse {
            id: Some("abc".into()),
            name: Some("/xmod-svc-0".into()),
            config: Some(ContainerConfig {
                labels: Some(labels),
                ..ContainerConfig::default()
            }),
            state: Some(ContainerState {
                status: Some(status),
                exit_code: Some(0),
                started_at: Some("2024-05-01T10:00:00.123456789Z".into()),
                ..ContainerState::default()
            }),
            network_settings: Some(NetworkSettings {
                ports: Some(HashMap::from([(
                    "8000/tcp".to_string(),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some("32768".into()),
                    }]),
                )])),
                ..NetworkSettings::default()
            }),
            ..ContainerInspectResponse::default()
        }
    }

    fn facts(info: &ContainerInspectResponse) -> ContainerFacts {
        ContainerFacts::from_inspect(info, false).unwrap()
    }

    #[test]
    fn inspect_yields_identity_port_and_probe_settings() {
        let f = facts(&inspect(ContainerStateStatusEnum::RUNNING));
        assert_eq!(f.service_id, "svc");
        assert_eq!(f.name, "xmod-svc-0");
        assert_eq!(f.generation, Some(2));
        assert_eq!(f.host_port, Some(32768));
        assert_eq!(f.health_path, "/ready");
        assert!(f.started_at.is_some());
        assert_eq!(f.failure(""), None);
    }

    #[test]
    fn foreign_containers_are_ignored() {
        let mut info = inspect(ContainerStateStatusEnum::RUNNING);
        if let Some(c) = info.config.as_mut() {
            c.labels.as_mut().unwrap().remove(LABEL_MANAGED_BY);
        }
        assert!(ContainerFacts::from_inspect(&info, false).is_none());
    }

    #[test]
    fn exits_oom_kills_and_crash_loops_get_their_reasons() {
        let mut info = inspect(ContainerStateStatusEnum::EXITED);
        info.state.as_mut().unwrap().exit_code = Some(137);
        let failure = facts(&info).failure("loading\nboom\n").unwrap();
        assert_eq!(failure.reason, FailureReason::Exited);
        assert!(failure.message.contains("exited with code 137"));
        assert!(failure.message.ends_with("last log lines:\nloading\nboom"));

        info.state.as_mut().unwrap().oom_killed = Some(true);
        let failure = facts(&info).failure("").unwrap();
        assert_eq!(failure.reason, FailureReason::OutOfMemory);

        let mut info = inspect(ContainerStateStatusEnum::RESTARTING);
        info.restart_count = Some(1);
        assert_eq!(facts(&info).failure(""), None, "one restart is no loop");
        info.restart_count = Some(CRASH_LOOP_RESTARTS);
        assert_eq!(
            facts(&info).failure("").unwrap().reason,
            FailureReason::CrashLoop
        );

        let mut info = inspect(ContainerStateStatusEnum::CREATED);
        info.state.as_mut().unwrap().error =
            Some("exec: \"vllm\": executable file not found in $PATH".into());
        assert_eq!(
            facts(&info).failure("").unwrap().reason,
            FailureReason::BinaryNotFound
        );
    }

    fn view(health: Health, status: ContainerStateStatusEnum) -> ServiceView {
        let facts = facts(&inspect(status));
        let failure = facts.failure("");
        let mut view = ServiceView::adopted(&facts);
        view.replicas.insert(
            0,
            ReplicaView {
                container_id: facts.id.clone(),
                facts,
                health,
                failure,
                probe: None,
            },
        );
        view
    }

    #[test]
    fn observation_follows_health_and_exit() {
        let ready = view(Health::Ready, ContainerStateStatusEnum::RUNNING).observation("h");
        assert_eq!(ready.state, WorkloadState::Ready);
        assert_eq!(ready.ready_replicas, 1);
        assert_eq!(ready.address.as_deref(), Some("http://h:32768"));
        assert_eq!(ready.generation, Some(2));

        let starting = view(Health::Starting, ContainerStateStatusEnum::RUNNING).observation("h");
        assert_eq!(starting.state, WorkloadState::Starting);

        let exited = view(Health::Ready, ContainerStateStatusEnum::EXITED).observation("h");
        assert_eq!(exited.state, WorkloadState::Failed);
        assert_eq!(exited.failure.unwrap().reason, FailureReason::Exited);

        let late = view(
            Health::TimedOut("no answer".into()),
            ContainerStateStatusEnum::RUNNING,
        )
        .observation("h");
        assert_eq!(late.failure.unwrap().reason, FailureReason::StartupTimeout);
    }

    #[test]
    fn other_generations_and_missing_replicas_do_not_count() {
        let mut v = view(Health::Ready, ContainerStateStatusEnum::RUNNING);
        v.generation = Some(3);
        let o = v.observation("h");
        assert_eq!(o.ready_replicas, 0);
        assert_ne!(o.state, WorkloadState::Ready);

        let mut v = view(Health::Ready, ContainerStateStatusEnum::RUNNING);
        v.desired_replicas = 2;
        let o = v.observation("h");
        assert_eq!(o.state, WorkloadState::Failed);
        assert_eq!(o.failure.unwrap().reason, FailureReason::WorkloadMissing);

        let mut v = view(Health::Ready, ContainerStateStatusEnum::RUNNING);
        v.replicas.clear();
        assert_eq!(v.observation("h").state, WorkloadState::Missing);
    }

    #[test]
    fn apply_failures_win_and_unschedulable_means_pending() {
        let mut v = ServiceView {
            desired_replicas: 1,
            ..ServiceView::default()
        };
        v.failure = Some(Failure {
            reason: FailureReason::Unschedulable,
            message: "insufficient GPUs".into(),
        });
        assert_eq!(v.observation("h").state, WorkloadState::Pending);
        v.failure = Some(Failure {
            reason: FailureReason::ImagePull,
            message: "no image".into(),
        });
        assert_eq!(v.observation("h").state, WorkloadState::Failed);
    }
}
