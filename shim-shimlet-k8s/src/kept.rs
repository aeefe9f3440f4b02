//! What the view keeps of a watched object: a small projection holding only the facts
//! [`crate::status`], the view and the shimlet read, so 1,000 services cost neither 1,000 pod
//! templates, label maps and managed-field lists, nor the inline size of k8s-openapi's types
//! (a `Pod` is over 2 KiB before any of its strings).
//!
//! - [`DeploymentFacts`]: name, being deleted, `metadata.generation`, the spec generation of its
//!   `xmod-shim/generation` annotation, `spec.replicas`, the rollout counts of its status, and the
//!   two conditions the rules read (a passed progress deadline, a replica failure).
//! - [`ServiceFacts`]: name, being deleted, its first port (and node port), the load balancer's
//!   first ingress address.
//! - [`PodFacts`]: name, being deleted, finished (phase `Succeeded` or `Failed`), `Ready`, host
//!   IP, the scheduler's message when unschedulable, and the containers (init ones first) that
//!   wait for a reason a rule reads, each with name, image, restart count, waiting reason and
//!   message, and last termination.
//!
//! Labels and annotations are not kept: the service id is read from the labels when an object
//! arrives, and the spec generation from its annotation. Strings are `Box<str>` (no spare
//! capacity), and the objects of one kind in a service are a short vector sorted by name
//! ([`ByName`]), not a B-tree map whose first node has room for eleven.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodCondition, Service};

use crate::status::{reason_read, spec_generation};

/// A kept object's name: the key of [`ByName`].
pub trait Named {
    /// `metadata.name`.
    fn name(&self) -> &str;
}

/// Objects of one kind, sorted by name, each name once. A service has one Deployment and one
/// Service (two briefly after a rename) and a pod per replica: a vector searched by bisection
/// is as quick as a map for so few, and holds no more than they need.
#[derive(Debug, Clone)]
pub struct ByName<T>(Vec<T>);

impl<T> Default for ByName<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Named> ByName<T> {
    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|o| o.name().cmp(name))
    }

    /// The object called `name`.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.position(name).ok().map(|i| &self.0[i])
    }

    /// Adds `object`, or replaces the one of the same name.
    pub fn insert(&mut self, object: T) {
        match self.position(object.name()) {
            Ok(i) => self.0[i] = object,
            Err(i) => {
                // One more, not twice as many: most lists never grow past one or two.
                self.0.reserve_exact(1);
                self.0.insert(i, object);
            }
        }
    }

    /// Removes the object called `name`.
    pub fn remove(&mut self, name: &str) -> Option<T> {
        let removed = self.0.remove(self.position(name).ok()?);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(removed)
    }
}

impl<T> ByName<T> {
    /// The objects, by name.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes every object.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl<T: Named> FromIterator<T> for ByName<T> {
    fn from_iter<I: IntoIterator<Item = T>>(objects: I) -> Self {
        let mut list = Self::default();
        for object in objects {
            list.insert(object);
        }
        list
    }
}

impl<'a, T> IntoIterator for &'a ByName<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

fn boxed(s: String) -> Box<str> {
    s.into_boxed_str()
}

/// What the view keeps of a Deployment; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentFacts {
    pub(crate) name: Box<str>,
    /// It has a `deletionTimestamp`.
    pub(crate) deleting: bool,
    /// `metadata.generation`.
    pub(crate) generation: Option<i64>,
    /// The spec generation it was applied from (annotation `xmod-shim/generation`).
    pub(crate) spec_generation: Option<u64>,
    /// `spec.replicas` (1 when unset, as the API defaults it).
    pub(crate) replicas: i32,
    /// Its status' rollout counts; `None` without a status.
    pub(crate) rollout: Option<Rollout>,
    /// The message (empty if none) of a `Progressing` condition that is `False` for
    /// `ProgressDeadlineExceeded`.
    pub(crate) deadline_exceeded: Option<Box<str>>,
    /// A `ReplicaFailure` condition that is `True`.
    pub(crate) replica_failure: Option<ReplicaFailure>,
}

/// A Deployment status' counts (0 when unset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    pub(crate) observed_generation: i64,
    pub(crate) replicas: i32,
    pub(crate) updated_replicas: i32,
    pub(crate) ready_replicas: i32,
}

/// A Deployment's `ReplicaFailure` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFailure {
    /// Its reason (`ReplicaFailure` when it gives none).
    pub(crate) reason: Box<str>,
    /// Its message (empty if none).
    pub(crate) message: Box<str>,
}

impl Named for DeploymentFacts {
    fn name(&self) -> &str {
        &self.name
    }
}

impl From<Deployment> for DeploymentFacts {
    fn from(deployment: Deployment) -> Self {
        let spec_generation = spec_generation(&deployment);
        let Deployment {
            metadata,
            spec,
            status,
        } = deployment;
        let (rollout, conditions) = match status {
            Some(s) => (
                Some(Rollout {
                    observed_generation: s.observed_generation.unwrap_or(0),
                    replicas: s.replicas.unwrap_or(0),
                    updated_replicas: s.updated_replicas.unwrap_or(0),
                    ready_replicas: s.ready_replicas.unwrap_or(0),
                }),
                s.conditions.unwrap_or_default(),
            ),
            None => (None, Vec::new()),
        };
        let mut deadline_exceeded = None;
        let mut replica_failure = None;
        // The first of each, as the rules would find them.
        for c in conditions {
            let DeploymentCondition {
                type_,
                status,
                reason,
                message,
                ..
            } = c;
            if deadline_exceeded.is_none()
                && type_ == "Progressing"
                && status == "False"
                && reason.as_deref() == Some("ProgressDeadlineExceeded")
            {
                deadline_exceeded = Some(boxed(message.unwrap_or_default()));
            } else if replica_failure.is_none() && type_ == "ReplicaFailure" && status == "True" {
                replica_failure = Some(ReplicaFailure {
                    reason: reason.map_or_else(|| "ReplicaFailure".into(), boxed),
                    message: boxed(message.unwrap_or_default()),
                });
            }
        }
        Self {
            name: boxed(metadata.name.unwrap_or_default()),
            deleting: metadata.deletion_timestamp.is_some(),
            generation: metadata.generation,
            spec_generation,
            replicas: spec.and_then(|s| s.replicas).unwrap_or(1),
            rollout,
            deadline_exceeded,
            replica_failure,
        }
    }
}

/// What the view keeps of a Service; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub(crate) name: Box<str>,
    /// It has a `deletionTimestamp`.
    pub(crate) deleting: bool,
    /// Its first port.
    pub(crate) port: Option<ServicePort>,
    /// The IP, else the hostname, of the load balancer's first ingress.
    pub(crate) ingress: Option<Box<str>>,
}

/// A Service's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort {
    pub(crate) port: i32,
    pub(crate) node_port: Option<i32>,
}

impl Named for ServiceFacts {
    fn name(&self) -> &str {
        &self.name
    }
}

impl From<Service> for ServiceFacts {
    fn from(service: Service) -> Self {
        let Service {
            metadata,
            spec,
            status,
        } = service;
        let port = spec
            .and_then(|s| s.ports)
            .and_then(|p| p.into_iter().next())
            .map(|p| ServicePort {
                port: p.port,
                node_port: p.node_port,
            });
        let ingress = status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.into_iter().next())
            .and_then(|i| i.ip.or(i.hostname))
            .map(boxed);
        Self {
            name: boxed(metadata.name.unwrap_or_default()),
            deleting: metadata.deletion_timestamp.is_some(),
            port,
            ingress,
        }
    }
}

/// What the view keeps of a Pod; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub(crate) name: Box<str>,
    /// It has a `deletionTimestamp`.
    pub(crate) deleting: bool,
    /// Its phase is `Succeeded` or `Failed`: it will not run again.
    pub(crate) finished: bool,
    /// Its `Ready` condition is `True`.
    pub(crate) ready: bool,
    /// `status.hostIP`.
    pub(crate) host_ip: Option<Box<str>>,
    /// Why it cannot be scheduled (the message of a `PodScheduled` condition that is `False` for
    /// `Unschedulable`, or a sentence naming the pod when the scheduler gave none).
    pub(crate) unschedulable: Option<Box<str>>,
    /// Its containers, init ones first, that wait for a reason the rules read.
    pub(crate) waiting: Box<[ContainerFacts]>,
}

/// What the view keeps of a container that waits for a reason the rules read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFacts {
    pub(crate) name: Box<str>,
    pub(crate) image: Box<str>,
    pub(crate) restart_count: i32,
    /// `state.waiting.reason`.
    pub(crate) reason: Box<str>,
    /// `state.waiting.message` (empty if none).
    pub(crate) message: Box<str>,
    /// `lastState.terminated`.
    pub(crate) last_exit: Option<LastExit>,
}

/// How a container last ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastExit {
    /// Its reason (`Error` when it gives none).
    pub(crate) reason: Box<str>,
    /// Its message (empty if none): the end of the program's output, when the kubelet keeps it.
    pub(crate) message: Box<str>,
    pub(crate) exit_code: i32,
}

impl Named for PodFacts {
    fn name(&self) -> &str {
        &self.name
    }
}

impl From<Pod> for PodFacts {
    fn from(pod: Pod) -> Self {
        let name = boxed(pod.metadata.name.unwrap_or_default());
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let status = pod.status.unwrap_or_default();
        let conditions = status.conditions.unwrap_or_default();
        let ready = conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let unschedulable = conditions
            .into_iter()
            .find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
            .map(|PodCondition { message, .. }| match message {
                Some(message) => boxed(message),
                None => format!("pod {name} cannot be scheduled").into(),
            });
        let waiting = status
            .init_container_statuses
            .into_iter()
            .flatten()
            .chain(status.container_statuses.into_iter().flatten())
            .filter_map(ContainerFacts::of)
            .collect();
        Self {
            name,
            deleting,
            finished: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            ready,
            host_ip: status.host_ip.map(boxed),
            unschedulable,
            waiting,
        }
    }
}

impl ContainerFacts {
    /// The container's facts if it waits for a reason a rule reads (else no rule looks at it).
    fn of(container: ContainerStatus) -> Option<Self> {
        let waiting = container.state?.waiting?;
        let reason = waiting.reason.filter(|r| reason_read(r))?;
        let last_exit = container
            .last_state
            .and_then(|s| s.terminated)
            .map(|t| LastExit {
                reason: t.reason.map_or_else(|| "Error".into(), boxed),
                message: boxed(t.message.unwrap_or_default()),
                exit_code: t.exit_code,
            });
        Some(Self {
            name: boxed(container.name),
            image: boxed(container.image),
            restart_count: container.restart_count,
            reason: boxed(reason),
            message: boxed(waiting.message.unwrap_or_default()),
            last_exit,
        })
    }
}
