//! One replica's life: how it stops, how its exit is described, and the background task that
//! watches it (exit and health) and reports changes to the shimlet.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use shim_core::FailureReason;
use shim_core::shimlet::Failure;
use tokio::process::Child;

use crate::logs::tail_lines;
use crate::procfs;
use crate::shimlet::Inner;

/// How often an adopted replica (not our child, so no exit notification) is checked for life.
const ADOPTED_POLL: Duration = Duration::from_millis(500);
/// How often stopping checks whether a process has gone.
const STOP_POLL: Duration = Duration::from_millis(25);
/// How long to wait for a process to disappear after SIGKILL before reporting it as stuck.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Consecutive failed probes after which a ready replica is reported unhealthy.
const UNHEALTHY_AFTER: u32 = 3;
/// Shortest time between health probes of a ready replica (a failed probe is re-checked at the
/// start-up cadence, so a hung engine is confirmed within a few seconds).
const READY_PROBE_MIN: Duration = Duration::from_secs(2);

/// What the monitor reports about a running replica.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Health {
    /// Not ready yet.
    Starting,
    /// Passes its health probe.
    Ready,
    /// Was ready, now fails its probe.
    Unhealthy(String),
    /// Never became ready within the start-up budget.
    TimedOut(Failure),
}

/// Which replica a monitor watches: the pid makes a restarted replica a different one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplicaKey {
    pub service_id: String,
    pub index: u32,
    pub pid: u32,
}

/// How the monitor learns of the exit.
pub(crate) enum Watch {
    /// Our child: `wait()` reports exactly when and how it ended.
    Child(Child),
    /// Adopted after a restart: only `/proc` tells whether it still runs.
    Adopted { start_time: u64 },
}

/// How a replica ended.
#[derive(Debug)]
enum Ending {
    Status(ExitStatus),
    Unknown(String),
}

impl Watch {
    /// Resolves when the process has ended (cancel-safe: `Child::wait` is, and polling is
    /// stateless).
    async fn ended(&mut self, pid: u32) -> Ending {
        match self {
            Self::Child(child) => match child.wait().await {
                Ok(status) => Ending::Status(status),
                Err(err) => Ending::Unknown(format!("waiting for it failed: {err}")),
            },
            Self::Adopted { start_time } => {
                while procfs::is_running(pid, *start_time) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                Ending::Unknown(
                    "exit status unknown: the process was adopted after a shim restart".into(),
                )
            }
        }
    }

    /// Reaps our child once it is no longer tracked, so it does not linger as a zombie.
    async fn reap(self) {
        if let Self::Child(mut child) = self {
            let _ = child.wait().await;
        }
    }
}

/// What the monitor needs to probe and describe a replica.
pub(crate) struct Probe {
    pub http: reqwest::Client,
    pub url: String,
    pub period: Duration,
    pub startup_timeout: Duration,
    pub started_at: SystemTime,
    pub log_path: PathBuf,
    pub tail_lines: usize,
}

/// Watches one replica until it exits or stops being tracked; holds only a weak reference so a
/// dropped shimlet does not live on through its monitors.
pub(crate) async fn monitor(
    inner: Weak<Inner>,
    key: ReplicaKey,
    mut watch: Watch,
    probe: Probe,
    mut health: Health,
) {
    let mut failures = 0u32;
    loop {
        let delay = if health == Health::Ready && failures == 0 {
            probe.period.max(READY_PROBE_MIN)
        } else {
            probe.period
        };
        tokio::select! {
            ending = watch.ended(key.pid) => {
                let failure = describe_exit(&key, &ending, &probe);
                if let Some(inner) = inner.upgrade() {
                    inner.record_exit(&key, failure);
                }
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
        let next = match check(&probe).await {
            Ok(()) => {
                failures = 0;
                Health::Ready
            }
            Err(err) => {
                failures += 1;
                match &health {
                    Health::Ready | Health::Unhealthy(_) if failures >= UNHEALTHY_AFTER => {
                        Health::Unhealthy(format!(
                            "replica {} failed {failures} health checks in a row: {err}",
                            key.index
                        ))
                    }
                    Health::Starting if started_too_long_ago(&probe) => {
                        Health::TimedOut(describe_timeout(&key, &probe))
                    }
                    other => other.clone(),
                }
            }
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let tracked = next == health || strong.set_health(&key, next.clone());
        drop(strong);
        if !tracked {
            watch.reap().await;
            return;
        }
        health = next;
    }
}

fn started_too_long_ago(probe: &Probe) -> bool {
    probe
        .started_at
        .elapsed()
        .is_ok_and(|age| age >= probe.startup_timeout)
}

/// One health probe: GET the URL, 200 means ready.
pub(crate) async fn check(probe: &Probe) -> Result<(), String> {
    let timeout = probe
        .period
        .clamp(Duration::from_secs(1), Duration::from_secs(5));
    match probe.http.get(&probe.url).timeout(timeout).send().await {
        Ok(resp) if resp.status() == reqwest::StatusCode::OK => Ok(()),
        Ok(resp) => Err(format!("GET {} answered {}", probe.url, resp.status())),
        Err(err) => Err(format!("GET {} failed: {err}", probe.url)),
    }
}

fn log_excerpt(probe: &Probe) -> String {
    match tail_lines(&probe.log_path, probe.tail_lines) {
        Ok(lines) if lines.is_empty() => format!("its log {} is empty", probe.log_path.display()),
        Ok(lines) => format!(
            "last log lines ({}):\n{}",
            probe.log_path.display(),
            lines.join("\n")
        ),
        Err(err) => format!("its log {} is unreadable: {err}", probe.log_path.display()),
    }
}

fn describe_timeout(key: &ReplicaKey, probe: &Probe) -> Failure {
    Failure {
        reason: FailureReason::StartupTimeout,
        message: format!(
            "replica {} (pid {}) did not pass GET {} within {:?}; {}",
            key.index,
            key.pid,
            probe.url,
            probe.startup_timeout,
            log_excerpt(probe)
        ),
    }
}

fn describe_exit(key: &ReplicaKey, ending: &Ending, probe: &Probe) -> Failure {
    let how = match ending {
        Ending::Status(status) => describe_status(*status),
        Ending::Unknown(why) => format!("exited ({why})"),
    };
    let lines = tail_lines(&probe.log_path, probe.tail_lines).unwrap_or_default();
    failure_for(key.index, key.pid, &how, &lines, &probe.log_path)
}

/// "exited with exit code 3" / "was killed by signal SIGKILL".
pub(crate) fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with exit code {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name =
                Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.to_string());
            let hint = if sig == Signal::SIGKILL as i32 {
                " (sent by someone else or by the kernel's OOM killer)"
            } else {
                ""
            };
            format!("was killed by {name}{hint}")
        }
        None => format!("ended with {status}"),
    }
}

/// The failure reported for an ended replica: typed from what its log says, with the log's tail.
pub(crate) fn failure_for(
    index: u32,
    pid: u32,
    how: &str,
    lines: &[String],
    log_path: &std::path::Path,
) -> Failure {
    let lower: Vec<String> = lines.iter().map(|l| l.to_lowercase()).collect();
    let says = |needle: &str| lower.iter().any(|l| l.contains(needle));
    // Engines print these on their way out; matching them saves the user reading the log.
    let reason = if says("out of memory") || says("outofmemoryerror") {
        FailureReason::OutOfMemory
    } else if says("address already in use") {
        FailureReason::PortInUse
    } else {
        FailureReason::Exited
    };
    let excerpt = if lines.is_empty() {
        format!("its log {} is empty", log_path.display())
    } else {
        format!(
            "last log lines ({}):\n{}",
            log_path.display(),
            lines.join("\n")
        )
    };
    Failure {
        reason,
        message: format!("replica {index} (pid {pid}) {how}; {excerpt}"),
    }
}

/// Stops a replica: SIGTERM to its process group, up to `grace` to exit, then SIGKILL.
/// Nothing is signalled unless (pid, start time) still match. Returns whether it is gone.
pub(crate) async fn stop(pid: u32, start_time: u64, grace: Duration) -> bool {
    if procfs::signal(pid, start_time, Signal::SIGTERM) {
        wait_gone(pid, start_time, grace).await;
        if procfs::is_running(pid, start_time) {
            tracing::info!(pid, ?grace, "replica ignored SIGTERM; sending SIGKILL");
            procfs::signal(pid, start_time, Signal::SIGKILL);
            wait_gone(pid, start_time, KILL_WAIT).await;
        }
    }
    // Engine workers (vLLM, SGLang spawn several) may outlive the leader of their group.
    procfs::kill_leftover_group(pid, start_time);
    !procfs::is_running(pid, start_time)
}

async fn wait_gone(pid: u32, start_time: u64, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while procfs::is_running(pid, start_time) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(STOP_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn exits_are_typed_from_the_log() {
        let log = Path::new("/x.log");
        let oom = failure_for(
            0,
            7,
            "exited with exit code 1",
            &["torch.OutOfMemoryError: CUDA out of memory.".into()],
            log,
        );
        assert_eq!(oom.reason, FailureReason::OutOfMemory);
        let port = failure_for(
            1,
            8,
            "exited with exit code 1",
            &["OSError: [Errno 98] Address already in use".into()],
            log,
        );
        assert_eq!(port.reason, FailureReason::PortInUse);
        let plain = failure_for(2, 9, "exited with exit code 3", &[], log);
        assert_eq!(plain.reason, FailureReason::Exited);
        assert_eq!(
            plain.message,
            "replica 2 (pid 9) exited with exit code 3; its log /x.log is empty"
        );
    }

    #[test]
    fn statuses_read_like_a_human_wrote_them() {
        assert_eq!(
            describe_status(ExitStatus::from_raw(3 << 8)),
            "exited with exit code 3"
        );
        assert!(describe_status(ExitStatus::from_raw(9)).starts_with("was killed by SIGKILL"));
        assert_eq!(
            describe_status(ExitStatus::from_raw(15)),
            "was killed by SIGTERM"
        );
    }
}
