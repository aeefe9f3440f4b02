//! The gateway against real HTTP replicas (small in-test OpenAI-like servers) and a real
//! engine whose runtime reports those replicas' addresses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use shim_core::shimlet::{
    ManagedWorkload, Removal, Shimlet, ShimletError, WorkloadObservation, WorkloadState,
};
use shim_core::{
    DeploySpec, Engine, EngineConfig, FailureReason, Phase, Pipeline, PipelineContext, StepError,
    WorkloadSpec,
};
use shim_gateway::{Gateway, GatewayConfig};
use tokio::sync::{Notify, watch};

// ---------------------------------------------------------------------------------------------
// Replicas: tiny OpenAI-like servers that say who they are.

#[derive(Default)]
struct Replica {
    name: String,
    /// Answer every request with this status instead.
    fail_with: Option<StatusCode>,
    requests: AtomicU64,
    /// (x-request-id, authorization, model) of each request.
    seen: Mutex<Vec<(String, Option<String>, String)>>,
    /// A streamed answer sends its first event, then waits for this before the rest.
    release: Notify,
    hold_streams: bool,
    /// Set when a streamed answer's body was dropped before it ended (client went away).
    stream_cancelled: AtomicBool,
    /// TCP connections accepted.
    connections: AtomicU64,
}

struct DropFlag(Arc<Replica>, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.stream_cancelled.store(true, Ordering::SeqCst);
        }
    }
}

async fn chat(State(replica): State<Arc<Replica>>, headers: HeaderMap, body: Bytes) -> Response {
    replica.requests.fetch_add(1, Ordering::SeqCst);
    let body: Value = serde_json::from_slice(&body).expect("the gateway forwards JSON");
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    replica.seen.lock().unwrap().push((
        headers
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
        model.clone(),
    ));
    if let Some(status) = replica.fail_with {
        return (status, "replica says no").into_response();
    }
    let usage = json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5});
    if body["stream"] != json!(true) {
        return axum::Json(json!({
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": replica.name}}],
            "usage": usage,
        }))
        .into_response();
    }
    let first = format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": "first"}}]})
    );
    let rest = format!(
        "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": replica.name}}]}),
        json!({"choices": [], "usage": usage}),
    );
    let state = replica.clone();
    let stream = async_stream(state, first, rest);
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn async_stream(
    replica: Arc<Replica>,
    first: String,
    rest: String,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures::stream::unfold(
        (0, Some(DropFlag(replica, false)), first, rest),
        |(step, mut flag, first, rest)| async move {
            match step {
                0 => Some((Ok(Bytes::from(first.clone())), (1, flag, first, rest))),
                1 => {
                    let replica = flag.as_ref().unwrap().0.clone();
                    if replica.hold_streams {
                        replica.release.notified().await;
                    }
                    if let Some(f) = flag.as_mut() {
                        f.1 = true;
                    }
                    Some((Ok(Bytes::from(rest.clone())), (2, flag, first, rest)))
                }
                _ => None,
            }
        },
    )
}

async fn start_replica(replica: Replica) -> (String, Arc<Replica>) {
    let replica = Arc::new(replica);
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(chat))
        .with_state(replica.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counter = replica.clone();
    let listener = listener.tap_io(move |_| {
        counter.connections.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, replica)
}

fn named(name: &str) -> Replica {
    Replica {
        name: name.into(),
        ..Replica::default()
    }
}

/// An address nothing listens on (bound, then released).
async fn refusing_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

// ---------------------------------------------------------------------------------------------
// A runtime whose replicas are the servers above: a model's addresses are set per model name,
// and models whose name starts with "slow" start only when the gate opens.

#[derive(Default)]
struct Fleet {
    by_model: Mutex<HashMap<String, Vec<String>>>,
    running: Mutex<HashMap<String, Vec<String>>>,
}

struct FleetShimlet(Arc<Fleet>);

#[async_trait]
impl Shimlet for FleetShimlet {
    async fn apply(&self, _workload: &WorkloadSpec) -> Result<(), ShimletError> {
        Ok(())
    }

    async fn observe(&self, service_id: &str) -> Result<WorkloadObservation, ShimletError> {
        let running = self.0.running.lock().unwrap();
        Ok(match running.get(service_id) {
            Some(addresses) => {
                let n = u32::try_from(addresses.len()).unwrap();
                WorkloadObservation {
                    state: WorkloadState::Ready,
                    ready_replicas: n,
                    desired_replicas: n,
                    address: addresses.first().cloned(),
                    replica_addresses: addresses.clone(),
                    generation: None,
                    failure: None,
                }
            }
            None => WorkloadObservation::missing(),
        })
    }

    async fn delete(&self, service_id: &str) -> Result<Removal, ShimletError> {
        self.0.running.lock().unwrap().remove(service_id);
        Ok(Removal::Gone)
    }

    async fn list(&self) -> Result<Vec<ManagedWorkload>, ShimletError> {
        Ok(Vec::new())
    }
}

struct Harness {
    engine: Engine,
    gateway: Gateway,
    base: String,
    fleet: Arc<Fleet>,
    gate: watch::Sender<bool>,
    http: reqwest::Client,
}

/// How the harness serves the gateway: as the binary does (the gateway's connection front,
/// then the router for the rest, via `shim_server::serve_app_with`), or through its router
/// alone, as TLS serving and embedders that mount `Gateway::router` do.
#[derive(Clone, Copy, Debug)]
enum Server {
    Front,
    Router,
}

/// Every test, once per [`Server`].
macro_rules! each_server {
    ($($name:ident),* $(,)?) => {
        mod front {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Server::Front).await;
            })*
        }
        mod router {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Server::Router).await;
            })*
        }
    };
}

each_server!(
    routes_by_name_and_id_and_every_replica_serves,
    bad_requests_get_openai_errors_and_never_reach_a_replica,
    streams_pass_through_unbuffered_and_a_client_leaving_cancels_upstream,
    replica_connections_are_kept_alive_and_reused,
    a_request_for_a_starting_model_waits_and_the_queue_is_bounded,
    a_cold_start_that_takes_too_long_gets_503,
    refused_connections_and_503s_are_retried_once_on_another_replica,
    api_keys_guard_v1_and_may_limit_models
);

async fn harness(server: Server, config: GatewayConfig) -> Harness {
    let fleet = Arc::new(Fleet::default());
    let (gate, gate_rx) = watch::channel(false);
    let pipeline = {
        let fleet = fleet.clone();
        Pipeline::new("fleet")
            .step("start", move |ctx: PipelineContext| {
                let fleet = fleet.clone();
                let mut gate = gate_rx.clone();
                async move {
                    let model = ctx.spec().model_name.clone();
                    if model == "broken" {
                        return Err(StepError::permanent(
                            FailureReason::Exited,
                            "engine exited with code 1: out of memory",
                        ));
                    }
                    if model.starts_with("slow") {
                        let _ = gate.wait_for(|open| *open).await;
                    }
                    let addresses = fleet
                        .by_model
                        .lock()
                        .unwrap()
                        .get(&model)
                        .cloned()
                        .unwrap_or_default();
                    fleet
                        .running
                        .lock()
                        .unwrap()
                        .insert(ctx.service_id().to_owned(), addresses);
                    Ok(())
                }
            })
            .build()
    };
    let engine = {
        let fleet = fleet.clone();
        Engine::builder()
            .config(EngineConfig {
                gpus: Some(Vec::new()),
                ..EngineConfig::default()
            })
            .shimlet_instance(move |_| Arc::new(FleetShimlet(fleet)))
            .pipeline(pipeline)
            .build()
            .await
            .unwrap()
    };
    let gateway = Gateway::new(engine.clone(), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = gateway.router();
    match server {
        Server::Router => {
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        Server::Front => {
            let state =
                shim_server::AppState::new(engine.clone(), shim_server::ServerConfig::default());
            let front_gateway = gateway.clone();
            let front: shim_server::Front = Arc::new(move |stream, stopping| {
                let gateway = front_gateway.clone();
                Box::pin(async move { gateway.serve_connection(stream, stopping).await })
            });
            tokio::spawn(shim_server::serve_app_with(
                listener,
                state,
                app,
                Some(front),
                std::future::pending(),
            ));
        }
    }
    Harness {
        engine,
        gateway,
        base,
        fleet,
        gate,
        http: reqwest::Client::new(),
    }
}

impl Harness {
    async fn deploy(&self, model: &str, replicas: &[&str]) -> String {
        self.fleet.by_model.lock().unwrap().insert(
            model.to_owned(),
            replicas.iter().map(|s| (*s).to_owned()).collect(),
        );
        let mut spec = DeploySpec::named(model);
        spec.replica_count = Some(i64::try_from(replicas.len().max(1)).unwrap());
        self.engine.deploy(spec).await.unwrap()
    }

    async fn wait_phase(&self, id: &str, phase: Phase) {
        for _ in 0..200 {
            if self.engine.get(id).is_some_and(|r| r.phase == phase) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{id} never reached {phase}: {:?}", self.engine.get(id));
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn chat(&self, model: &str) -> (StatusCode, Value) {
        let response = self
            .post(
                "/v1/chat/completions",
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        (status, response.json().await.unwrap())
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        self.gateway.render_metrics(&mut out);
        out
    }
}

fn assert_openai_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(body["error"]["type"].is_string(), "{body}");
}

// ---------------------------------------------------------------------------------------------

async fn routes_by_name_and_id_and_every_replica_serves(server: Server) {
    let h = harness(server, GatewayConfig::default()).await;
    let (a_url, a) = start_replica(named("a")).await;
    let (b_url, b) = start_replica(named("b")).await;
    let id = h.deploy("llama", &[&a_url, &b_url]).await;
    h.wait_phase(&id, Phase::Running).await;

    let mut answers = std::collections::HashSet::new();
    for _ in 0..10 {
        let (status, body) = h.chat("llama").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        answers.insert(body["choices"][0]["message"]["content"].clone());
    }
    assert_eq!(answers.len(), 2, "both replicas answered: {answers:?}");
    assert!(a.requests.load(Ordering::SeqCst) >= 3);
    assert!(b.requests.load(Ordering::SeqCst) >= 3);

    // By service id: the engine still sees its served name.
    let (status, _) = h.chat(&id).await;
    assert_eq!(status, StatusCode::OK);
    let models: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|r| r.seen.lock().unwrap().clone())
        .map(|(_, _, m)| m)
        .collect();
    assert!(models.iter().all(|m| m == "llama"), "{models:?}");

    // The request id is taken from the client, passed on, and echoed.
    let response = h
        .http
        .post(format!("{}/v1/embeddings", h.base))
        .header("x-request-id", "req-123")
        .json(&json!({"model": "llama", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let ids: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|r| r.seen.lock().unwrap().clone())
        .map(|(id, _, _)| id)
        .collect();
    assert!(ids.contains(&"req-123".to_owned()));
    assert!(ids.iter().all(|id| !id.is_empty()), "generated when absent");

    // The list shows the model with its status, services and replicas.
    let list: Value = h
        .http
        .get(format!("{}/v1/models", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "llama");
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["data"][0]["status"], "running");
    assert_eq!(list["data"][0]["services"], json!([id]));
    assert_eq!(list["data"][0]["replicas"], 2);

    let metrics = h.metrics();
    assert!(
        metrics.contains("xmod_shim_gateway_requests_total{model=\"llama\",code=\"200\"} 12"),
        "{metrics}"
    );
    assert!(metrics.contains("xmod_shim_gateway_prompt_tokens_total{model=\"llama\"} 36"));
    assert!(metrics.contains("xmod_shim_gateway_in_flight{model=\"llama\"} 0"));
    let per_replica = h.gateway.replica_requests("llama");
    assert_eq!(per_replica.len(), 2, "{per_replica:?}");

    // A long body (1.5 MiB, more than the front reserves ahead at once) arrives whole.
    let padding = "x".repeat(1536 * 1024);
    let before = a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
    let response = h
        .http
        .post(format!("{}/v1/chat/completions", h.base))
        .json(&json!({"model": "llama", "messages": [{"role": "user", "content": padding}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let after = a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
    assert_eq!(after, before + 1);
}

async fn bad_requests_get_openai_errors_and_never_reach_a_replica(server: Server) {
    let h = harness(
        server,
        GatewayConfig {
            max_body_bytes: 2048,
            ..GatewayConfig::default()
        },
    )
    .await;
    let (url, replica) = start_replica(named("a")).await;
    let id = h.deploy("llama", &[&url]).await;
    h.wait_phase(&id, Phase::Running).await;
    let broken = h.deploy("broken", &[]).await;
    h.wait_phase(&broken, Phase::Failed).await;

    let (status, body) = h.chat("nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&body, "model_not_found");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("nope") && message.contains("llama"),
        "{message}"
    );

    let response = h
        .http
        .post(format!("{}/v1/chat/completions", h.base))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_openai_error(&response.json().await.unwrap(), "invalid_json");

    let response = h
        .post("/v1/chat/completions", json!({"messages": []}))
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_openai_error(&body, "missing_model");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`model`")
    );

    let response = h
        .post(
            "/v1/chat/completions",
            json!({"model": "llama", "padding": "x".repeat(4096)}),
        )
        .await;
    assert_eq!(response.status(), 413);
    assert_openai_error(&response.json().await.unwrap(), "request_too_large");

    let response = h
        .http
        .get(format!("{}/v1/chat/completions", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);

    let (status, body) = h.chat("broken").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_openai_error(&body, "model_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("out of memory"),
        "{body}"
    );

    assert_eq!(replica.requests.load(Ordering::SeqCst), 0);
    assert_eq!(h.gateway.requests("unknown", 404), 1);
    assert_eq!(h.gateway.requests("broken", 503), 1);
}

async fn streams_pass_through_unbuffered_and_a_client_leaving_cancels_upstream(server: Server) {
    let h = harness(server, GatewayConfig::default()).await;
    let (url, replica) = start_replica(Replica {
        hold_streams: true,
        ..named("a")
    })
    .await;
    let id = h.deploy("llama", &[&url]).await;
    h.wait_phase(&id, Phase::Running).await;
    let request =
        json!({"model": "llama", "stream": true, "messages": [{"role": "user", "content": "hi"}]});

    // The first event arrives while the replica still holds the rest back.
    let response = h.post("/v1/chat/completions", request.clone()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the first event is not held back")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("first"));
    replica.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.contains("[DONE]"), "{rest}");
    assert!(!replica.stream_cancelled.load(Ordering::SeqCst));
    // Usage sent in the stream's last event is counted.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        h.metrics()
            .contains("xmod_shim_gateway_completion_tokens_total{model=\"llama\"} 2")
    );

    // A client that leaves mid-stream: the replica's stream is dropped too.
    let response = h.post("/v1/chat/completions", request).await;
    let mut stream = response.bytes_stream();
    let _ = stream.next().await;
    drop(stream);
    for _ in 0..100 {
        if replica.stream_cancelled.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        replica.stream_cancelled.load(Ordering::SeqCst),
        "upstream generation was cancelled"
    );
    for _ in 0..100 {
        if h.metrics()
            .contains("xmod_shim_gateway_in_flight{model=\"llama\"} 0")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("in-flight never returned to 0: {}", h.metrics());
}

async fn replica_connections_are_kept_alive_and_reused(server: Server) {
    let h = harness(server, GatewayConfig::default()).await;
    let (url, replica) = start_replica(named("a")).await;
    let id = h.deploy("llama", &[&url]).await;
    h.wait_phase(&id, Phase::Running).await;
    let stream =
        json!({"model": "llama", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let (status, body) = h.chat("llama").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let response = h.post("/v1/chat/completions", stream.clone()).await;
        assert!(response.text().await.unwrap().contains("[DONE]"));
    }
    assert_eq!(replica.requests.load(Ordering::SeqCst), 6);
    assert_eq!(
        replica.connections.load(Ordering::SeqCst),
        1,
        "one connection serves requests one after another"
    );

    // Concurrent requests may open more connections, which stay for the next ones: never more
    // than the most requests at once.
    for _ in 0..3 {
        let burst = (0..4).map(|_| h.post("/v1/chat/completions", stream.clone()));
        for response in futures::future::join_all(burst).await {
            assert!(response.text().await.unwrap().contains("[DONE]"));
        }
    }
    let connections = replica.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 4,
        "{connections} connections for 18 requests"
    );
}

async fn a_request_for_a_starting_model_waits_and_the_queue_is_bounded(server: Server) {
    let h = harness(
        server,
        GatewayConfig {
            queue_size: 1,
            ..GatewayConfig::default()
        },
    )
    .await;
    let (url, _replica) = start_replica(named("a")).await;
    let id = h.deploy("slow", &[&url]).await;
    h.wait_phase(&id, Phase::Initializing).await;

    let waiting = {
        let http = h.http.clone();
        let base = h.base.clone();
        tokio::spawn(async move {
            http.post(format!("{base}/v1/chat/completions"))
                .json(&json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
        })
    };
    // Wait until it is queued, then a second request finds the queue full.
    for _ in 0..100 {
        if h.metrics()
            .contains("xmod_shim_gateway_queue_depth{model=\"slow\"} 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = h
        .post(
            "/v1/chat/completions",
            json!({"model": "slow", "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_openai_error(&response.json().await.unwrap(), "queue_full");
    assert!(!waiting.is_finished());

    h.gate.send(true).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered once the model is up")
        .unwrap();
    assert_eq!(answered.status(), 200);
    assert!(
        h.metrics()
            .contains("xmod_shim_gateway_queue_depth{model=\"slow\"} 0")
    );
}

async fn a_cold_start_that_takes_too_long_gets_503(server: Server) {
    let h = harness(
        server,
        GatewayConfig {
            cold_start_timeout_secs: 1,
            ..GatewayConfig::default()
        },
    )
    .await;
    let id = h.deploy("slow-forever", &[]).await;
    h.wait_phase(&id, Phase::Initializing).await;
    let (status, body) = h.chat("slow-forever").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_openai_error(&body, "cold_start_timeout");
}

async fn refused_connections_and_503s_are_retried_once_on_another_replica(server: Server) {
    let h = harness(server, GatewayConfig::default()).await;
    let dead = refusing_address().await;
    let (good_url, good) = start_replica(named("good")).await;
    let (busy_url, busy) = start_replica(Replica {
        fail_with: Some(StatusCode::SERVICE_UNAVAILABLE),
        ..named("busy")
    })
    .await;
    let id = h.deploy("llama", &[&dead, &good_url]).await;
    h.wait_phase(&id, Phase::Running).await;
    for _ in 0..6 {
        let (status, body) = h.chat("llama").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(good.requests.load(Ordering::SeqCst), 6);
    // The refusing replica sat out after its first refusal: one retry in all.
    assert!(
        h.metrics()
            .contains("xmod_shim_gateway_retries_total{model=\"llama\"} 1"),
        "{}",
        h.metrics()
    );

    let id = h.deploy("qwen", &[&busy_url, &good_url]).await;
    h.wait_phase(&id, Phase::Running).await;
    for _ in 0..4 {
        let (status, _) = h.chat("qwen").await;
        assert_eq!(status, StatusCode::OK);
    }
    assert!(busy.requests.load(Ordering::SeqCst) >= 1);

    // A single replica's 503 is the answer: there is nowhere else to go.
    let id = h.deploy("solo", &[&busy_url]).await;
    h.wait_phase(&id, Phase::Running).await;
    let response = h
        .post(
            "/v1/chat/completions",
            json!({"model": "solo", "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.text().await.unwrap(), "replica says no");
}

async fn api_keys_guard_v1_and_may_limit_models(server: Server) {
    let keys: shim_gateway::ApiKeys =
        serde_json::from_value(json!("admin-key,llama-key=llama")).unwrap();
    let h = harness(
        server,
        GatewayConfig {
            api_keys: keys,
            ..GatewayConfig::default()
        },
    )
    .await;
    let (url, replica) = start_replica(named("a")).await;
    for model in ["llama", "qwen"] {
        let id = h.deploy(model, &[&url]).await;
        h.wait_phase(&id, Phase::Running).await;
    }
    let call = |key: Option<&'static str>, model: &'static str| {
        let mut request = h
            .http
            .post(format!("{}/v1/chat/completions", h.base))
            .json(&json!({"model": model, "messages": []}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let response = call(None, "llama").await.unwrap();
    assert_eq!(response.status(), 401);
    assert_openai_error(&response.json().await.unwrap(), "invalid_api_key");
    assert_eq!(call(Some("wrong"), "llama").await.unwrap().status(), 401);
    assert_eq!(call(Some("admin-key"), "qwen").await.unwrap().status(), 200);
    assert_eq!(
        call(Some("llama-key"), "llama").await.unwrap().status(),
        200
    );
    let response = call(Some("llama-key"), "qwen").await.unwrap();
    assert_eq!(response.status(), 403);
    assert_openai_error(&response.json().await.unwrap(), "model_not_allowed");

    let list: Value = h
        .http
        .get(format!("{}/v1/models", h.base))
        .bearer_auth("llama-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama"]);
    // The gateway's key is not the engine's business.
    assert!(
        replica
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|(_, auth, _)| auth.is_none())
    );
}
