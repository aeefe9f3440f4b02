//! Leader election on a `coordination.k8s.io/v1` Lease, for several shim replicas on one cluster:
//! exactly one, the Lease's holder, runs the reconciler; the others answer reads and take
//! requests into the ModelServices, and take over when the holder stops renewing.
//!
//! The rules are client-go's: the holder renews every [`RETRY_PERIOD`] and steps down when it
//! could not renew for [`RENEW_DEADLINE`]; a candidate takes the Lease once it has seen the same
//! holder and renew time for a whole lease duration ([`LEASE_DURATION`]), measured on its own
//! clock, so clocks that disagree between nodes do not matter. Every write carries the
//! resourceVersion it read, so two candidates cannot both win. A holder that stops cleanly
//! ([`Election::release`]) empties the Lease, so the next one takes over at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::errors::status_of as http_status;

/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// A holder that could not renew for this long stops leading (before others may take over).
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the holder renews and candidates look.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Bound of one request to the API server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A running election; drop it or call [`Election::release`] to stop.
#[derive(Debug)]
pub struct Election {
    leading: watch::Receiver<bool>,
    stop: CancellationToken,
    done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Election {
    /// Starts competing for Lease `name` in `namespace` as `identity` (unique per replica: the
    /// pod name).
    pub fn start(client: Client, namespace: &str, name: &str, identity: String) -> Self {
        let (tx, leading) = watch::channel(false);
        let stop = CancellationToken::new();
        let candidate = Candidate {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity,
            observed: None,
            renewed: None,
        };
        let task = tokio::spawn(candidate.run(tx, stop.clone()));
        Self {
            leading,
            stop,
            done: tokio::sync::Mutex::new(Some(task)),
        }
    }

    /// Says whether this replica leads now, and when that changes.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops competing; a holder empties the Lease so another replica takes over at once.
    pub async fn release(&self) {
        self.stop.cancel();
        if let Some(task) = self.done.lock().await.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Candidate {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The holder and renew time last seen, and when they were first seen so.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
    /// When this replica last renewed successfully.
    renewed: Option<Instant>,
}

impl Candidate {
    async fn run(mut self, leading: watch::Sender<bool>, stop: CancellationToken) {
        loop {
            let lead = match tokio::time::timeout(REQUEST_TIMEOUT, self.try_acquire_or_renew())
                .await
            {
                Ok(Ok(lead)) => lead,
                Ok(Err(err)) => {
                    tracing::debug!(lease = %self.name, error = %err, "leader election: request failed");
                    self.still_leading()
                }
                Err(_) => {
                    tracing::debug!(lease = %self.name, "leader election: request timed out");
                    self.still_leading()
                }
            };
            if lead != *leading.borrow() {
                tracing::info!(lease = %self.name, identity = %self.identity, lead, "leader election");
                leading.send_replace(lead);
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(RETRY_PERIOD) => {}
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            let release = tokio::time::timeout(REQUEST_TIMEOUT, self.release());
            match release.await {
                Ok(Ok(())) => tracing::info!(lease = %self.name, "leader election: lease released"),
                Ok(Err(err)) => {
                    tracing::warn!(lease = %self.name, error = %err, "leader election: cannot release the lease; it expires by itself")
                }
                Err(_) => {
                    tracing::warn!(lease = %self.name, "leader election: releasing the lease timed out")
                }
            }
        }
    }

    /// A holder that cannot reach the API server leads until the renew deadline passes.
    fn still_leading(&self) -> bool {
        self.renewed.is_some_and(|at| at.elapsed() < RENEW_DEADLINE)
    }

    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(Some(now.clone()), now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.renewed = Some(Instant::now());
                    Ok(true)
                }
                Err(err) if http_status(&err) == Some(409) => Ok(false),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine && holder.is_some() && !self.expired(&holder, &spec.renew_time) {
            self.renewed = None;
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time
        } else {
            Some(now.clone())
        };
        lease.spec = Some(self.spec(acquired, now, transitions));
        // `replace` sends the resourceVersion read above: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !mine {
                    tracing::info!(lease = %self.name, previous = ?holder, "leader election: took the lease");
                }
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            Err(err) if http_status(&err) == Some(409) => {
                self.renewed = None;
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Whether the holder has not renewed for a lease duration, by this replica's clock.
    fn expired(&mut self, holder: &Option<String>, renew: &Option<MicroTime>) -> bool {
        match &self.observed {
            Some((h, r, since)) if h == holder && r == renew => since.elapsed() >= LEASE_DURATION,
            _ => {
                self.observed = Some((holder.clone(), renew.clone(), Instant::now()));
                false
            }
        }
    }

    fn spec(&self, acquired: Option<MicroTime>, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: acquired,
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        lease.metadata.managed_fields = None;
        let name = lease.name_any();
        self.api
            .replace(&name, &PostParams::default(), &lease)
            .await
            .map(drop)
    }
}
