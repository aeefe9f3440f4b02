//! A fake Kubernetes API server in the kube-rs testing style: `tower_test::mock::pair()` stands
//! in for the HTTP stack of a real `kube::Client`, and a verifier task answers each request the
//! way the API server would (lists with a resource version, watches that stream `ADDED`,
//! `MODIFIED` and `DELETED` events from that version, server-side apply, foreground deletes,
//! logs). It checks the contract on the way (apply content type, field manager, force, foreground
//! propagation) and records every request, so tests can assert method, path, query and body, and
//! count requests.
//!
//! [`Behaviour`] makes it play the controllers too: roll Deployments out at once (ready pods,
//! complete status) and finish foreground deletions at once.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use serde_json::{Value, json};
use shim_core::queue::WorkQueue;
use shim_core::{ModelVolume, Notifier, WorkloadSpec};
use shim_shimlet_k8s::{K8sConfig, K8sShimlet, ReplicaAddresses};
use tokio::sync::mpsc;

/// Response body of the fake: whole, or a stream for watches.
pub type MockBody = BoxBody<Bytes, Infallible>;

/// The namespace the tests use.
pub const NAMESPACE: &str = "models";
/// The field manager every apply must use.
pub const FIELD_MANAGER: &str = "xmod-shim";

/// The kinds the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Deployment,
    Service,
    Pod,
}

impl Kind {
    fn from_plural(plural: &str) -> Option<Self> {
        match plural {
            "deployments" => Some(Self::Deployment),
            "services" => Some(Self::Service),
            "pods" => Some(Self::Pod),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Deployment => "apps/v1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::Service => "Service",
            Self::Pod => "Pod",
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
}

impl Recorded {
    /// Whether this opened a watch.
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }

    /// `METHOD path`, for assertion messages.
    pub fn line(&self) -> String {
        format!("{} {} {:?}", self.method, self.path, self.query)
    }
}

/// How the fake's simulated controllers behave.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// A Deployment rolls out the moment it is applied: its pods run and are ready, and its
    /// status says so.
    pub auto_rollout: bool,
    /// Foreground deletions finish at once; otherwise objects stay with a deletion timestamp
    /// until [`FakeCluster::collect_garbage`].
    pub instant_delete: bool,
    /// Listing Deployments is forbidden (403), as without the Role.
    pub forbid_list: bool,
    /// The namespace does not exist.
    pub no_namespace: bool,
}

struct Watcher {
    kind: Kind,
    selector: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<Result<http_body::Frame<Bytes>, Infallible>>,
}

struct State {
    behaviour: Behaviour,
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    /// Every change, for watches that start at an older resource version.
    history: Vec<(u64, Kind, &'static str, Value)>,
    watchers: Vec<Watcher>,
    next_port: i64,
    logs: BTreeMap<String, String>,
    violations: Vec<String>,
}

/// Handle on the fake cluster: its objects, its request log, and test-side changes (what a
/// user with kubectl, the scheduler or the kubelet would do).
#[derive(Clone)]
pub struct FakeCluster {
    state: Arc<Mutex<State>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

/// A kube client whose requests go to a new fake cluster.
pub fn fake_cluster(behaviour: Behaviour) -> (kube::Client, FakeCluster) {
    let cluster = FakeCluster::new(behaviour);
    (cluster.client(), cluster)
}

impl FakeCluster {
    /// An empty cluster with the test namespace.
    pub fn new(behaviour: Behaviour) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                behaviour,
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                watchers: Vec::new(),
                next_port: 30000,
                logs: BTreeMap::new(),
                violations: Vec::new(),
            })),
            requests: Arc::default(),
        }
    }

    /// A new kube client talking to this cluster (each is one shim process).
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((request, reply)) = handle.next_request().await {
                let response = server.answer(request).await;
                reply.send_response(response);
            }
        });
        kube::Client::new(service, NAMESPACE)
    }
}

fn whole(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a response")
}

fn json_response(status: StatusCode, value: &Value) -> Response<MockBody> {
    whole(status, "application/json", value.to_string().into_bytes())
}

fn status(code: u16, reason: &str, message: &str) -> Response<MockBody> {
    json_response(
        StatusCode::from_u16(code).expect("a status code"),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

fn labels_match(object: &Value, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| object["metadata"]["labels"][k].as_str() == Some(v.as_str()))
}

fn parse_selector(text: Option<&String>) -> Vec<(String, String)> {
    text.map(|t| {
        t.split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
    .unwrap_or_default()
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Records a change and sends it to the watches it matches.
    fn emit(&mut self, kind: Kind, event: &'static str, object: Value) {
        let rv = self.rv;
        self.watchers.retain(|w| {
            if w.kind != kind || !labels_match(&object, &w.selector) {
                return !w.tx.is_closed();
            }
            w.tx.send(Ok(http_body::Frame::data(event_line(event, &object))))
                .is_ok()
        });
        self.history.push((rv, kind, event, object));
    }

    /// Stores `object` (new resource version, generation bumped on spec changes) and emits.
    fn store(&mut self, kind: Kind, name: &str, mut object: Value) -> (Value, bool) {
        let key = (kind, name.to_string());
        let existing = self.objects.get(&key).cloned();
        let rv = self.next_rv();
        let meta = &mut object["metadata"];
        meta["namespace"] = json!(NAMESPACE);
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = existing.as_ref().map_or_else(
            || json!(format!("uid-{rv}")),
            |e| e["metadata"]["uid"].clone(),
        );
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        if kind == Kind::Deployment {
            let generation = match &existing {
                Some(e) if e["spec"] == object["spec"] => e["metadata"]["generation"].clone(),
                Some(e) => json!(e["metadata"]["generation"].as_i64().unwrap_or(0) + 1),
                None => json!(1),
            };
            object["metadata"]["generation"] = generation;
        }
        let created = existing.is_none();
        self.objects.insert(key, object.clone());
        self.emit(
            kind,
            if created { "ADDED" } else { "MODIFIED" },
            object.clone(),
        );
        (object, created)
    }

    fn remove(&mut self, kind: Kind, name: &str) -> Option<Value> {
        let mut object = self.objects.remove(&(kind, name.to_string()))?;
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(kind, "DELETED", object.clone());
        if kind == Kind::Deployment {
            for pod in self.pods_of(name) {
                self.remove(Kind::Pod, &pod);
            }
        }
        Some(object)
    }

    fn pods_of(&self, deployment: &str) -> Vec<String> {
        let prefix = format!("{deployment}-");
        self.objects
            .keys()
            .filter(|(k, n)| *k == Kind::Pod && n.starts_with(&prefix))
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// What the Deployment controller, scheduler and kubelet do when all goes well: one ready
    /// pod per replica, and a complete status.
    fn roll_out(&mut self, name: &str) {
        let Some(deployment) = self
            .objects
            .get(&(Kind::Deployment, name.to_string()))
            .cloned()
        else {
            return;
        };
        for pod in self.pods_of(name) {
            self.remove(Kind::Pod, &pod);
        }
        let replicas = deployment["spec"]["replicas"].as_i64().unwrap_or(1);
        let template = &deployment["spec"]["template"];
        for i in 0..replicas {
            let pod_name = format!("{name}-7c9d8f6b5-p{i}");
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "labels": template["metadata"]["labels"]},
                "spec": template["spec"],
                "status": {"phase": "Running", "hostIP": format!("10.0.0.{}", i + 1),
                    "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]},
            });
            self.store(Kind::Pod, &pod_name, pod);
        }
        let mut done = deployment;
        done["status"] = json!({
            "observedGeneration": done["metadata"]["generation"],
            "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
        });
        let rv = self.next_rv();
        done["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects
            .insert((Kind::Deployment, name.to_string()), done.clone());
        self.emit(Kind::Deployment, "MODIFIED", done);
    }
}

impl FakeCluster {
    async fn answer(&self, request: Request<kube::client::Body>) -> Response<MockBody> {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let query: BTreeMap<String, String> = parts
            .uri
            .query()
            .map(|q| {
                url_pairs(q)
                    .into_iter()
                    .collect::<BTreeMap<String, String>>()
            })
            .unwrap_or_default();
        let recorded = Recorded {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query,
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(String::from),
            body: serde_json::from_slice(&bytes).ok(),
        };
        self.requests
            .lock()
            .expect("requests lock")
            .push(recorded.clone());
        self.route(&recorded)
    }

    fn route(&self, r: &Recorded) -> Response<MockBody> {
        let segments: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        let mut state = self.state.lock().expect("state lock");
        let (kind, name, sub) = match segments.as_slice() {
            ["api", "v1", "namespaces", ns] if r.method == "GET" => {
                return if state.behaviour.no_namespace || *ns != NAMESPACE {
                    status(404, "NotFound", &format!("namespaces \"{ns}\" not found"))
                } else {
                    json_response(
                        StatusCode::OK,
                        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                    )
                };
            }
            [
                "apis",
                "apps",
                "v1",
                "namespaces",
                NAMESPACE,
                plural,
                rest @ ..,
            ]
            | ["api", "v1", "namespaces", NAMESPACE, plural, rest @ ..] => {
                let Some(kind) = Kind::from_plural(plural) else {
                    return status(404, "NotFound", "no such resource");
                };
                (kind, rest.first().copied(), rest.get(1).copied())
            }
            _ => {
                state
                    .violations
                    .push(format!("unexpected request {}", r.line()));
                return status(
                    404,
                    "NotFound",
                    &format!("fake API server: no route for {}", r.path),
                );
            }
        };
        match (r.method.as_str(), name, sub) {
            ("GET", None, None) if r.is_watch() => Self::watch(&mut state, kind, r),
            ("GET", None, None) => {
                if kind == Kind::Deployment && state.behaviour.forbid_list {
                    return status(
                        403,
                        "Forbidden",
                        "deployments.apps is forbidden: User \"system:serviceaccount:models:default\" cannot list resource \"deployments\"",
                    );
                }
                let selector = parse_selector(r.query.get("labelSelector"));
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((k, _), o)| *k == kind && labels_match(o, &selector))
                    .map(|(_, o)| o.clone())
                    .collect();
                json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": kind.api_version(), "kind": format!("{}List", kind.name()),
                            "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
                )
            }
            ("GET", Some(name), None) => match state.objects.get(&(kind, name.to_string())) {
                Some(o) => json_response(StatusCode::OK, o),
                None => status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", kind.name()),
                ),
            },
            ("GET", Some(name), Some("log")) => match state.logs.get(name) {
                Some(text) => whole(StatusCode::OK, "text/plain", text.clone().into_bytes()),
                None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
            },
            ("PATCH", Some(name), None) => Self::apply(&mut state, kind, name, r),
            ("DELETE", Some(name), None) => Self::delete(&mut state, kind, name, r),
            _ => {
                state
                    .violations
                    .push(format!("unexpected request {}", r.line()));
                status(
                    405,
                    "MethodNotAllowed",
                    "fake API server: unexpected request",
                )
            }
        }
    }

    fn watch(state: &mut State, kind: Kind, r: &Recorded) -> Response<MockBody> {
        let selector = parse_selector(r.query.get("labelSelector"));
        let since: u64 = r
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        for (rv, k, event, object) in &state.history {
            if *rv > since && *k == kind && labels_match(object, &selector) {
                let _ = tx.send(Ok(http_body::Frame::data(event_line(event, object))));
            }
        }
        state.watchers.push(Watcher { kind, selector, tx });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(StreamBody::new(stream).boxed())
            .expect("a response")
    }

    fn apply(state: &mut State, kind: Kind, name: &str, r: &Recorded) -> Response<MockBody> {
        let mut problems = Vec::new();
        if r.content_type.as_deref() != Some("application/apply-patch+yaml") {
            problems.push(format!(
                "content type {:?} is not server-side apply",
                r.content_type
            ));
        }
        if r.query.get("fieldManager").map(String::as_str) != Some(FIELD_MANAGER) {
            problems.push(format!("field manager {:?}", r.query.get("fieldManager")));
        }
        if r.query.get("force").map(String::as_str) != Some("true") {
            problems.push("apply without force".into());
        }
        let Some(mut body) = r.body.clone() else {
            return status(400, "BadRequest", "fake API server: no JSON body");
        };
        if body["metadata"]["name"].as_str() != Some(name) || body["kind"] != kind.name() {
            problems.push(format!(
                "body names {} {}",
                body["kind"], body["metadata"]["name"]
            ));
        }
        if !problems.is_empty() {
            let message = format!("fake API server: {}", problems.join("; "));
            state.violations.push(message.clone());
            return status(400, "BadRequest", &message);
        }
        let existing = state.objects.get(&(kind, name.to_string())).cloned();
        if let Some(e) = &existing {
            // Server-owned fields survive an apply.
            body["status"] = e["status"].clone();
            if !e["metadata"]["deletionTimestamp"].is_null() {
                body["metadata"]["deletionTimestamp"] = e["metadata"]["deletionTimestamp"].clone();
            }
        }
        if kind == Kind::Service {
            body["spec"]["clusterIP"] = existing
                .as_ref()
                .map_or_else(|| json!("10.96.0.10"), |e| e["spec"]["clusterIP"].clone());
            if matches!(
                body["spec"]["type"].as_str(),
                Some("NodePort" | "LoadBalancer")
            ) {
                let port = existing
                    .as_ref()
                    .and_then(|e| e["spec"]["ports"][0]["nodePort"].as_i64())
                    .unwrap_or_else(|| {
                        state.next_port += 1;
                        state.next_port
                    });
                body["spec"]["ports"][0]["nodePort"] = json!(port);
            }
        }
        let (stored, created) = state.store(kind, name, body);
        if kind == Kind::Deployment && state.behaviour.auto_rollout {
            state.roll_out(name);
        }
        json_response(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &stored,
        )
    }

    fn delete(state: &mut State, kind: Kind, name: &str, r: &Recorded) -> Response<MockBody> {
        if r.body
            .as_ref()
            .and_then(|b| b["propagationPolicy"].as_str())
            != Some("Foreground")
        {
            state
                .violations
                .push(format!("delete of {name} without foreground propagation"));
        }
        let key = (kind, name.to_string());
        let Some(mut object) = state.objects.get(&key).cloned() else {
            return status(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", kind.name()),
            );
        };
        if state.behaviour.instant_delete {
            let removed = state.remove(kind, name).unwrap_or(object);
            return json_response(StatusCode::OK, &removed);
        }
        if object["metadata"]["deletionTimestamp"].is_null() {
            object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:10Z");
            object["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
            let rv = state.next_rv();
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            state.objects.insert(key, object.clone());
            state.emit(kind, "MODIFIED", object.clone());
        }
        json_response(StatusCode::OK, &object)
    }

    // --- What tests (kubectl users, the scheduler, the kubelet) do -------------------------

    /// Creates or replaces an object (a Deployment's generation moves when its spec changes).
    pub fn put(&self, kind: Kind, object: Value) {
        let name = object["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        let mut object = object;
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        self.state
            .lock()
            .expect("state lock")
            .store(kind, &name, object);
    }

    /// Changes a stored object in place (status or spec) and emits `MODIFIED`.
    pub fn modify(&self, kind: Kind, name: &str, change: impl FnOnce(&mut Value)) {
        let mut state = self.state.lock().expect("state lock");
        let mut object = state
            .objects
            .get(&(kind, name.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("no {kind:?} {name}"));
        change(&mut object);
        state.store(kind, name, object);
    }

    /// Deletes an object at once (`kubectl delete`), with its pods for a Deployment.
    pub fn remove(&self, kind: Kind, name: &str) -> Option<Value> {
        self.state.lock().expect("state lock").remove(kind, name)
    }

    /// Finishes every deletion in progress (what the garbage collector does).
    pub fn collect_garbage(&self) {
        let mut state = self.state.lock().expect("state lock");
        let terminating: Vec<(Kind, String)> = state
            .objects
            .iter()
            .filter(|(_, o)| !o["metadata"]["deletionTimestamp"].is_null())
            .map(|(k, _)| k.clone())
            .collect();
        for (kind, name) in terminating {
            state.remove(kind, &name);
        }
    }

    /// Rolls a Deployment out as if everything went well.
    pub fn roll_out(&self, name: &str) {
        self.state.lock().expect("state lock").roll_out(name);
    }

    /// Sets what a pod's log returns.
    pub fn set_log(&self, pod: &str, text: &str) {
        self.state
            .lock()
            .expect("state lock")
            .logs
            .insert(pod.to_string(), text.to_string());
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, name: &str) -> Option<Value> {
        self.state
            .lock()
            .expect("state lock")
            .objects
            .get(&(kind, name.to_string()))
            .cloned()
    }

    /// Names of the stored objects of `kind`.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        self.state
            .lock()
            .expect("state lock")
            .objects
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        let mut state = self.state.lock().expect("state lock");
        state.watchers.retain(|w| !w.tx.is_closed());
        state.watchers.len()
    }

    /// Waits until `n` watches are open (a watcher opens its watch just after its list).
    pub async fn wait_for_watches(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.open_watches() < n {
            assert!(
                Instant::now() < deadline,
                "only {} watches opened",
                self.open_watches()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Requests so far.
    pub fn request_count(&self) -> usize {
        self.requests.lock().expect("requests lock").len()
    }

    /// Requests after the first `from`, watches excluded unless asked for.
    pub fn requests_since(&self, from: usize) -> Vec<Recorded> {
        self.requests.lock().expect("requests lock")[from..].to_vec()
    }

    /// Contract breaches seen (apply without force, delete without foreground, stray paths).
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().expect("state lock").violations.clone()
    }
}

/// `a=b&c=d`, percent-decoded.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A shimlet on a fresh fake cluster whose notifier feeds a queue the test reads.
pub async fn start(
    behaviour: Behaviour,
    config: K8sConfig,
) -> (K8sShimlet, FakeCluster, Arc<WorkQueue>) {
    let (client, cluster) = fake_cluster(behaviour);
    let queue = Arc::new(WorkQueue::new());
    let shimlet = K8sShimlet::with_client(
        client,
        config,
        PathBuf::from("/srv/models"),
        Notifier::new(queue.clone()),
    )
    .await
    .expect("the shimlet starts against the fake cluster");
    cluster.wait_for_watches(3).await;
    (shimlet, cluster, queue)
}

/// The configuration the tests use: the fake's namespace and the Service address (the fake
/// serves no EndpointSlices; unset, a test run inside a pod would want them), defaults otherwise.
/// The fake serves no Nodes either, so the node watch is off (it is tested in `src/nodes.rs` and
/// `shim-cli`'s `e2e_k8s_gpus.rs`); on, its requests would show as violations and in counts.
pub fn config() -> K8sConfig {
    K8sConfig {
        namespace: Some(NAMESPACE.into()),
        timeout_secs: 5,
        watch_nodes: false,
        replica_addresses: Some(ReplicaAddresses::Service),
        ..K8sConfig::default()
    }
}

/// One GPU replica of a vLLM-like engine.
pub fn workload(service_id: &str) -> WorkloadSpec {
    let mut w = WorkloadSpec::new(service_id, 1, "vllm/vllm-openai:v0.9");
    w.model_name = "Qwen2.5-7B".into();
    w.args = [
        "{model_dir}",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--served-model-name",
        "Qwen2.5-7B",
    ]
    .map(String::from)
    .to_vec();
    w.resources.cpu = Some("4".into());
    w.resources.memory = Some("16Gi".into());
    w.resources.accelerators = 1;
    w.model = Some(ModelVolume {
        host_path: "/srv/models/Qwen2.5-7B".into(),
        mount_path: "/models/model".into(),
    });
    w.health.startup_timeout = Duration::from_secs(600);
    w
}

/// Polls `observe` until `done` holds (shared by every shimlet's tests).
#[allow(unused_imports)] // not every test file polls
pub use shim_core::testing::observe_until as wait_for;

/// Waits until the queue hands out `service_id` (the shimlet notified the engine).
pub async fn notified(queue: &WorkQueue, service_id: &str) {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let id = queue.next().await.expect("queue open");
            queue.done(&id);
            if id == service_id {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no notification for {service_id}"));
}
