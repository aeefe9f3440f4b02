//! Background tasks that keep the view current without a Docker call per `observe`: the engine's
//! event stream (container start, die, OOM, destroy …) and one HTTP health probe per running
//! replica. Both hold only a weak reference, so they end when the shimlet is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use futures::StreamExt as _;
use tokio::task::AbortHandle;

use crate::config::http_url;
use crate::render::managed_filter;
use crate::runtime::Inner;
use crate::state::{ContainerFacts, Health};

/// Consecutive failed probes after which a ready replica is reported unhealthy (one slow answer
/// must not send a serving engine into repair).
const UNHEALTHY_AFTER: u32 = 3;
/// Least time between probes once a replica is ready: readiness is what needs a fast answer;
/// after that, exits arrive through events and a light liveness check is enough.
const READY_PROBE_MIN: Duration = Duration::from_secs(5);
/// First wait before re-subscribing after the event stream broke; doubles while the engine stays
/// away, up to [`RECONNECT_DELAY_MAX`].
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// Longest wait between re-subscription attempts: short, because services converge only once
/// the view is current again after the daemon comes back.
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(4);
/// How far back to replay events when subscribing: covers the gap between listing containers
/// and the subscription taking effect (and small clock differences with a remote engine).
const REPLAY_MARGIN_SECS: i64 = 5;
/// Container actions that say nothing about its state.
const IGNORED_ACTIONS: &[&str] = &[
    "attach",
    "resize",
    "top",
    "copy",
    "archive-path",
    "extract-to-dir",
    "export",
    "commit",
];

/// Seconds since the epoch, as Docker's `since` wants them.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Starts the event watcher; events from `since` (unix seconds) on are replayed first.
pub(crate) fn spawn_watcher(inner: &Arc<Inner>, since: i64) -> AbortHandle {
    let weak = Arc::downgrade(inner);
    let docker = inner.docker.clone();
    tokio::spawn(watch_events(weak, docker, since)).abort_handle()
}

async fn watch_events(inner: Weak<Inner>, docker: Docker, mut since: i64) {
    let filters = HashMap::from([
        ("type", vec!["container".to_string()]),
        ("label", vec![managed_filter()]),
    ]);
    let mut reconnecting = false;
    let mut delay = RECONNECT_DELAY;
    loop {
        let options = EventsOptionsBuilder::new()
            .since(&(since - REPLAY_MARGIN_SECS).to_string())
            .filters(&filters)
            .build();
        let mut stream = docker.events(Some(options));
        if reconnecting {
            // Events may have been dropped while disconnected (Docker replays only a short
            // history), so look at everything again.
            let Some(strong) = inner.upgrade() else {
                return;
            };
            match strong.resync().await {
                // The engine answers again: a later break starts over with a short wait.
                Ok(()) => delay = RECONNECT_DELAY,
                Err(err) => tracing::warn!(error = %err, "re-listing managed containers failed"),
            }
        }
        loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    delay = RECONNECT_DELAY;
                    since = since.max(event.time.unwrap_or(since));
                    let Some(strong) = inner.upgrade() else {
                        return;
                    };
                    on_event(&strong, event).await;
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "Docker event stream failed; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!("Docker event stream ended; reconnecting");
                    break;
                }
            }
        }
        reconnecting = true;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_DELAY_MAX);
        if inner.strong_count() == 0 {
            return;
        }
    }
}

async fn on_event(inner: &Arc<Inner>, event: EventMessage) {
    let action = event.action.unwrap_or_default();
    let Some(id) = event.actor.and_then(|a| a.id) else {
        return;
    };
    if action.starts_with("exec_") || IGNORED_ACTIONS.contains(&action.as_str()) {
        return;
    }
    tracing::debug!(container = %id, %action, "Docker event");
    if action == "destroy" {
        inner.forget(&id);
        return;
    }
    if let Err(err) = inner.refresh(&id).await {
        tracing::warn!(container = %id, %action, error = %err, "could not inspect after an event");
    }
}

/// Starts probing a running replica at `host_port`.
pub(crate) fn spawn_probe(
    inner: &Arc<Inner>,
    facts: &ContainerFacts,
    host_port: u16,
) -> AbortHandle {
    let probe = Probe {
        service_id: facts.service_id.clone(),
        replica: facts.replica,
        container_id: facts.id.clone(),
        name: facts.name.clone(),
        url: format!(
            "{}{}",
            http_url(&inner.config.probe_host(), host_port),
            facts.health_path
        ),
        period: facts.health_period.max(Duration::from_millis(50)),
        startup_timeout: facts.startup_timeout,
        started_at: facts.started_at.unwrap_or_else(SystemTime::now),
    };
    tokio::spawn(probe_loop(Arc::downgrade(inner), probe)).abort_handle()
}

struct Probe {
    service_id: String,
    replica: u32,
    container_id: String,
    name: String,
    url: String,
    period: Duration,
    startup_timeout: Duration,
    started_at: SystemTime,
}

async fn probe_loop(inner: Weak<Inner>, probe: Probe) {
    let mut failures = 0_u32;
    loop {
        let Some(http) = inner.upgrade().map(|i| i.http.clone()) else {
            return;
        };
        let result = check(&http, &probe).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let ready = record(&strong, &probe, result, &mut failures);
        drop(strong);
        let wait = if ready {
            probe.period.max(READY_PROBE_MIN)
        } else {
            probe.period
        };
        tokio::time::sleep(wait).await;
    }
}

/// One probe: GET the health URL; 200 means ready.
async fn check(http: &reqwest::Client, probe: &Probe) -> Result<(), String> {
    let timeout = probe
        .period
        .clamp(Duration::from_secs(1), Duration::from_secs(5));
    match http.get(&probe.url).timeout(timeout).send().await {
        Ok(resp) if resp.status() == reqwest::StatusCode::OK => Ok(()),
        Ok(resp) => Err(format!("GET {} answered {}", probe.url, resp.status())),
        Err(err) => Err(format!("GET {} failed: {err}", probe.url)),
    }
}

/// Applies a probe result to the replica's health; returns whether it is ready.
fn record(inner: &Inner, probe: &Probe, result: Result<(), String>, failures: &mut u32) -> bool {
    inner
        .update_existing(&probe.service_id, |view| {
        let Some(replica) = view
            .replicas
            .get_mut(&probe.replica)
            .filter(|r| r.container_id == probe.container_id)
        else {
            return false;
        };
        let next = match result {
            Ok(()) => {
                *failures = 0;
                Health::Ready
            }
            Err(error) => {
                *failures += 1;
                match &replica.health {
                    Health::Ready | Health::Unhealthy(_) if *failures >= UNHEALTHY_AFTER => {
                        Health::Unhealthy(format!(
                            "container {} stopped answering its health check ({} failures in a row): {error}",
                            probe.name, *failures
                        ))
                    }
                    Health::Ready => Health::Ready,
                    Health::Starting if started_too_long_ago(probe) => {
                        Health::TimedOut(format!(
                            "container {} did not become ready within {:?}: {error}",
                            probe.name, probe.startup_timeout
                        ))
                    }
                    other => other.clone(),
                }
            }
        };
        replica.health = next;
        replica.health == Health::Ready
    })
    .unwrap_or(false)
}

fn started_too_long_ago(probe: &Probe) -> bool {
    probe
        .started_at
        .elapsed()
        .is_ok_and(|age| age >= probe.startup_timeout)
}
