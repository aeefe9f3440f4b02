//! The OpenAI-compatible gateway: one `/v1` endpoint in front of every model the engine runs.
//!
//! A request names a `model`; the gateway finds the live services serving that name (or that id),
//! pools their ready replicas, picks one (least in-flight, or prompt-prefix hashing with bounded
//! load), and passes the request through unchanged, streaming the answer back frame by frame.
//! A model that is still starting holds its requests in a bounded queue until a replica is ready.
//! It reads the engine's records only ([`Engine::for_each_service`]); it never calls a runtime.
//!
//! ```no_run
//! # async fn demo(engine: shim_core::Engine) {
//! let gateway = shim_gateway::Gateway::new(engine, shim_gateway::GatewayConfig::default());
//! let app: axum::Router = gateway.router(); // serve it, or merge it into another router
//! # }
//! ```

mod balance;
mod body;
mod config;
mod error;
mod front;
mod metrics;
mod upstream;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde::Deserialize;
use shim_core::{Engine, Phase};

use crate::balance::{Balancer, Candidate, Resolution};
use crate::body::{MeteredBody, ModelInFlight, Report};
use crate::metrics::{Metrics, UNKNOWN_MODEL};
use crate::upstream::{UpstreamError, Upstreams};

pub use config::{ApiKey, ApiKeys, Balance, GatewayConfig};
pub use error::GatewayError;
pub use front::Handoff;

/// Header carrying the request id, accepted from the client or generated, sent to the replica.
pub const REQUEST_ID: &str = "x-request-id";

/// How often a waiting request re-reads the engine's records besides waking on its events:
/// a replica set that changes while the phase stays put emits no event.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Request ids longer than this are replaced (they end up in logs and upstream headers).
const MAX_REQUEST_ID: usize = 128;

/// The gateway. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    config: GatewayConfig,
    balancer: Balancer,
    metrics: Metrics,
    upstreams: Upstreams,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over `engine`'s services. Logs once when it is open (no `apiKeys`).
    pub fn new(engine: Engine, config: GatewayConfig) -> Self {
        if config.api_keys.is_empty() {
            tracing::warn!(
                "gateway.apiKeys is empty: /v1/* is open to anyone who can reach this port"
            );
        } else {
            tracing::info!(keys = config.api_keys.0.len(), "gateway requires API keys");
        }
        let balancer = Balancer::new(config.balance, config.cooldown());
        Self {
            inner: Arc::new(Inner {
                engine,
                config,
                balancer,
                metrics: Metrics::default(),
                upstreams: Upstreams::default(),
            }),
        }
    }

    /// The routes: `GET /v1/models`, `GET /v1/models/{model}`, and `POST /v1/*` for any JSON
    /// body with a `model` (chat, completions, embeddings, ...). It has no fallback, so it can be
    /// merged into a router that has one.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/models", any(list_models))
            .route("/v1/models/{model}", any(get_model))
            .route("/v1/{*rest}", any(proxy))
            .with_state(self.clone())
    }

    /// Appends the gateway's Prometheus metrics (text format 0.0.4) to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        self.inner.metrics.render(out);
    }

    /// Requests for `model` (its served name) answered with `code` so far.
    pub fn requests(&self, model: &str, code: u16) -> u64 {
        self.inner.metrics.requests(model, code)
    }

    /// Requests for `model` sent to each replica base URL so far.
    pub fn replica_requests(&self, model: &str) -> HashMap<String, u64> {
        self.inner.metrics.replica_requests(model)
    }

    /// The key a request presents, when keys are configured: `Ok(None)` = the gateway is open.
    fn authorize(&self, authorization: Option<&str>) -> Result<Option<&ApiKey>, GatewayError> {
        let keys = &self.inner.config.api_keys.0;
        if keys.is_empty() {
            return Ok(None);
        }
        let presented = authorization
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(GatewayError::unauthorized)?;
        // Compare with every key, without stopping early, so timing says nothing about them.
        let mut found = None;
        for key in keys {
            if constant_time_eq(key.key.as_bytes(), presented.as_bytes()) {
                found = Some(key);
            }
        }
        found.map(Some).ok_or_else(GatewayError::unauthorized)
    }

    /// Waits, in the model's bounded queue, until a replica of `model` is ready.
    async fn wait_until_ready(
        &self,
        model: &str,
        served: &str,
        metrics: &metrics::ModelMetrics,
    ) -> Result<Resolution, GatewayError> {
        let config = &self.inner.config;
        let queued = metrics
            .queue_depth
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Leaves the queue however the wait ends, including the client going away.
        let _leave = QueueSlot(metrics);
        if queued >= i64::try_from(config.queue_size).unwrap_or(i64::MAX) {
            return Err(GatewayError::queue_full(served, config.queue_size));
        }
        let deadline = tokio::time::Instant::now() + config.cold_start_timeout();
        // Subscribe before reading, so a transition between the two is not missed.
        let mut events = self.inner.engine.subscribe();
        loop {
            match balance::resolve(&self.inner.engine, model) {
                Resolution::Starting { .. } => {}
                other => return Ok(other),
            }
            let woke = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = events.recv() => {}
                    () = tokio::time::sleep(WAIT_POLL) => {}
                }
            })
            .await;
            if woke.is_err() {
                return Err(GatewayError::unavailable(
                    "cold_start_timeout",
                    format!(
                        "the model `{served}` did not become ready within {}s (gateway.coldStartTimeoutSecs)",
                        config.cold_start_timeout_secs
                    ),
                )
                .retry_after(30));
            }
        }
    }
}

/// A request waiting in a model's cold-start queue.
struct QueueSlot<'a>(&'a metrics::ModelMetrics);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0
            .queue_depth
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn method_not_allowed(method: &Method, uri: &Uri) -> GatewayError {
    let mut error = GatewayError::bad_request(
        "method_not_allowed",
        format!("method {method} is not allowed on {}", uri.path()),
    );
    error.status = StatusCode::METHOD_NOT_ALLOWED;
    error
}

/// One entry of `GET /v1/models`: OpenAI's fields plus status, service ids and replica count.
fn model_entries(gateway: &Gateway, key: Option<&ApiKey>) -> Vec<serde_json::Value> {
    struct Entry {
        created: i64,
        phase: Phase,
        services: Vec<String>,
        replicas: usize,
    }
    // Which phase a pooled model shows: the most useful one any of its services is in.
    fn rank(phase: Phase) -> u8 {
        match phase {
            Phase::Running => 0,
            Phase::Recovering => 1,
            Phase::Initializing => 2,
            Phase::Pending => 3,
            Phase::Failed => 4,
            Phase::Terminating => 5,
            Phase::Deleted => 6,
        }
    }
    let mut models: BTreeMap<String, Entry> = BTreeMap::new();
    gateway.inner.engine.for_each_service(|record| {
        if record.phase == Phase::Deleted {
            return;
        }
        let entry = models
            .entry(record.spec.model_name.clone())
            .or_insert(Entry {
                created: record.created_at.timestamp(),
                phase: record.phase,
                services: Vec::new(),
                replicas: 0,
            });
        entry.created = entry.created.min(record.created_at.timestamp());
        if rank(record.phase) < rank(entry.phase) {
            entry.phase = record.phase;
        }
        entry.services.push(record.id.clone());
        entry.replicas += record.replicas.len();
    });
    models
        .into_iter()
        .filter(|(name, entry)| key.is_none_or(|k| k.allows(name, &entry.services)))
        .map(|(name, mut entry)| {
            entry.services.sort();
            serde_json::json!({
                "id": name,
                "object": "model",
                "created": entry.created,
                "owned_by": "xmod-shim",
                "status": entry.phase.wire_word(),
                "services": entry.services,
                "replicas": entry.replicas,
            })
        })
        .collect()
}

/// `GET /v1/models`.
async fn list_models(State(gateway): State<Gateway>, request: Request) -> Response {
    if request.method() != Method::GET {
        return method_not_allowed(request.method(), request.uri()).into_response();
    }
    let key = match gateway.authorize(authorization(request.headers())) {
        Ok(key) => key,
        Err(err) => return err.into_response(),
    };
    axum::Json(serde_json::json!({
        "object": "list",
        "data": model_entries(&gateway, key),
    }))
    .into_response()
}

/// `GET /v1/models/{model}`.
async fn get_model(
    State(gateway): State<Gateway>,
    Path(model): Path<String>,
    request: Request,
) -> Response {
    if request.method() != Method::GET {
        return method_not_allowed(request.method(), request.uri()).into_response();
    }
    let key = match gateway.authorize(authorization(request.headers())) {
        Ok(key) => key,
        Err(err) => return err.into_response(),
    };
    let entries = model_entries(&gateway, key);
    match entries.iter().find(|e| e["id"] == model.as_str()) {
        Some(entry) => axum::Json(entry.clone()).into_response(),
        None => {
            let names: Vec<String> = entries
                .iter()
                .filter_map(|e| e["id"].as_str().map(str::to_owned))
                .collect();
            GatewayError::model_not_found(&model, &names).into_response()
        }
    }
}

/// The `Authorization` header, when it is text.
fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The fields of a request body the gateway reads; everything else passes through untouched.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// An error answered by the gateway, with the model label its metrics go under.
pub(crate) struct Refusal {
    model: Option<String>,
    error: GatewayError,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Self { model: None, error }
    }
}

/// A request to pass to a replica, as the gateway needs it whichever HTTP server took it (the
/// router below, or the connection front in [`front`]).
#[derive(Debug, Default)]
pub(crate) struct Inbound {
    /// Path and query as the client sent them.
    pub(crate) target: String,
    /// The `Authorization` header.
    pub(crate) authorization: Option<String>,
    /// The client's `x-request-id`.
    pub(crate) request_id: Option<String>,
    /// The header lines that go on to the replica, `name: value\r\n` each (see [`is_forwarded`]).
    pub(crate) headers: Vec<u8>,
    pub(crate) body: Bytes,
}

impl Inbound {
    /// Takes in one client header.
    pub(crate) fn header(&mut self, name: &str, value: &[u8]) {
        if name.eq_ignore_ascii_case("authorization") {
            self.authorization = std::str::from_utf8(value).ok().map(str::to_owned);
        } else if name.eq_ignore_ascii_case(REQUEST_ID) {
            self.request_id = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
                .map(str::to_owned);
        } else if is_forwarded(name) {
            self.headers.extend_from_slice(name.as_bytes());
            self.headers.extend_from_slice(b": ");
            self.headers.extend_from_slice(value);
            self.headers.extend_from_slice(b"\r\n");
        }
    }

    /// The request id: the client's, or a new one.
    pub(crate) fn request_id(&mut self) -> String {
        self.request_id.take().unwrap_or_else(new_request_id)
    }
}

/// Whether a client's request header goes on to the replica: not those about the connection,
/// not the gateway key (ours, not the engine's), and not those the gateway sets itself (host,
/// length, request id).
fn is_forwarded(name: &str) -> bool {
    !(is_hop_by_hop_name(name)
        || ["host", "authorization", "content-length", REQUEST_ID]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n)))
}

/// Whether a `Connection` header's value has the `close` token: the connection ends after this
/// message.
pub(crate) fn asks_close(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// Headers that describe one connection, not the message: never forwarded either way.
pub(crate) fn is_hop_by_hop_name(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// `POST /v1/*` through the router: route by `model` and pass the request through.
async fn proxy(State(gateway): State<Gateway>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let mut inbound = Inbound {
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        ..Inbound::default()
    };
    for (name, value) in &parts.headers {
        inbound.header(name.as_str(), value.as_bytes());
    }
    let request_id = inbound.request_id();
    let outcome = async {
        if parts.method != Method::POST {
            return Err(method_not_allowed(&parts.method, &parts.uri).into());
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        inbound.body = read_body(body, declared, gateway.inner.config.max_body_bytes).await?;
        gateway.handle(inbound, &request_id, started).await
    }
    .await;
    let mut response = match outcome {
        Ok(Proxied {
            status,
            headers,
            body,
        }) => {
            let mut response = Response::new(Body::new(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Err(refusal) => gateway
            .refused(refusal, &request_id, started)
            .into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// The request body, within `gateway.maxBodyBytes`: the model is in it, and a retry must be
/// able to resend it.
async fn read_body(body: Body, declared: Option<u64>, limit: usize) -> Result<Bytes, Refusal> {
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::too_large(limit).into());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(GatewayError::too_large(limit).into())
        }
        Err(err) => Err(GatewayError::bad_request(
            "body_unreadable",
            format!("could not read the request body: {err}"),
        )
        .into()),
    }
}

/// A replica's answer on its way to the client.
pub(crate) struct Proxied {
    pub(crate) status: StatusCode,
    /// End-to-end headers only: framing is the server's business.
    pub(crate) headers: HeaderMap,
    pub(crate) body: MeteredBody,
}

/// A new request id: 32 hex digits, a random half drawn once per process and a counter, so ids
/// are unique without drawing random numbers per request.
fn new_request_id() -> String {
    static PREFIX: std::sync::LazyLock<u64> = std::sync::LazyLock::new(rand::random);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:016x}{n:016x}", *PREFIX)
}

impl Gateway {
    /// Counts and logs a refused request; the error is what the client gets.
    pub(crate) fn refused(
        &self,
        Refusal { model, error }: Refusal,
        request_id: &str,
        started: Instant,
    ) -> GatewayError {
        let label = model.as_deref().unwrap_or(UNKNOWN_MODEL);
        self.inner
            .metrics
            .model(label)
            .count_code(error.status.as_u16());
        tracing::info!(
            request_id,
            model = label,
            status = error.status.as_u16(),
            code = error.code,
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            "gateway request refused: {}",
            error.message
        );
        error
    }

    /// Routes `inbound` by its `model` and sends it to a replica: the answer's status and
    /// headers, and its body still to be streamed (metered as it goes).
    pub(crate) async fn handle(
        &self,
        inbound: Inbound,
        request_id: &str,
        started: Instant,
    ) -> Result<Proxied, Refusal> {
        let inner = &self.inner;
        let config = &inner.config;
        let key = self.authorize(inbound.authorization.as_deref())?;
        let body = inbound.body;
        let probe: Probe<'_> = serde_json::from_slice(&body).map_err(|e| {
            GatewayError::bad_request(
                "invalid_json",
                format!("the request body must be a JSON object: {e}"),
            )
        })?;
        let model = match probe.model {
            Some(model) if !model.is_empty() => model.into_owned(),
            _ => {
                return Err(GatewayError::bad_request(
                    "missing_model",
                    "the request body needs `model`: the served model name or a service id",
                )
                .into());
            }
        };

        let mut resolution = balance::resolve(&inner.engine, &model);
        if let Resolution::Starting { served, .. } = &resolution {
            let served = served.clone();
            // A key that may not use the model is refused now, not after the wait.
            if let Some(key) = key
                && !key.allows(&served, std::slice::from_ref(&model))
            {
                return Err(Refusal {
                    error: GatewayError::forbidden(&model),
                    model: Some(served),
                });
            }
            let metrics = inner.metrics.model(&served);
            resolution = self
                .wait_until_ready(&model, &served, &metrics)
                .await
                .map_err(|error| Refusal {
                    model: Some(served.clone()),
                    error,
                })?;
        }
        let (served, service_ids, replicas) = match resolution {
            Resolution::Ready {
                served,
                service_ids,
                replicas,
            } => (served, service_ids, replicas),
            Resolution::Unknown => {
                let available: Vec<String> = balance::available_models(&inner.engine)
                    .into_iter()
                    .filter(|m| key.is_none_or(|k| k.allows(m, &[])))
                    .collect();
                return Err(GatewayError::model_not_found(&model, &available).into());
            }
            Resolution::Failed { served, reason, .. } => {
                return Err(Refusal {
                    error: GatewayError::unavailable(
                        "model_failed",
                        format!("the model `{served}` failed: {reason}"),
                    ),
                    model: Some(served),
                });
            }
            Resolution::Terminating { served } => {
                return Err(Refusal {
                    error: GatewayError::unavailable(
                        "model_terminating",
                        format!("the model `{served}` is being deleted"),
                    ),
                    model: Some(served),
                });
            }
            Resolution::Starting { served, .. } => {
                // `wait_until_ready` returns only other outcomes; kept total for the compiler.
                return Err(Refusal {
                    error: GatewayError::unavailable(
                        "model_starting",
                        format!("the model `{served}` is starting"),
                    ),
                    model: Some(served),
                });
            }
        };
        if let Some(key) = key
            && !key.allows(&served, &service_ids)
        {
            return Err(Refusal {
                error: GatewayError::forbidden(&model),
                model: Some(served),
            });
        }
        let refuse = |error: GatewayError| Refusal {
            model: Some(served.clone()),
            error,
        };

        // A request naming a service id reaches an engine that knows only its served name.
        let body = if model == served {
            body
        } else {
            rewrite_model(&body, &served).map_err(refuse)?
        };
        let prefix = match config.balance {
            Balance::Prefix => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| balance::prompt_prefix(&v, config.prefix_chars)),
            Balance::LeastInFlight => None,
        };
        let mut headers = inbound.headers;
        headers.extend_from_slice(REQUEST_ID.as_bytes());
        headers.extend_from_slice(b": ");
        headers.extend_from_slice(request_id.as_bytes());
        headers.extend_from_slice(b"\r\n");
        let outgoing = upstream::Outgoing {
            method: "POST",
            target: &inbound.target,
            headers: &headers,
            body: &body,
        };

        let metrics = inner.metrics.model(&served);
        let model_in_flight = ModelInFlight::new(metrics.clone());
        let mut tried: Option<String> = None;
        let mut last_error = None;
        for attempt in 0..2 {
            let Some((index, replica_in_flight)) =
                inner
                    .balancer
                    .pick(&replicas, tried.as_deref(), prefix.as_deref())
            else {
                break;
            };
            let Candidate { service_id, url } = &replicas[index];
            metrics.count_replica(url);
            if attempt > 0 {
                metrics.count_retry();
            }
            match inner.upstreams.send(url, outgoing).await {
                Ok(exchange) => {
                    let status = exchange.status;
                    let retryable = matches!(
                        status,
                        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                    );
                    // Nothing reached the client yet, so another replica may still answer.
                    if retryable && attempt == 0 && replicas.len() > 1 {
                        tracing::debug!(request_id, replica = %url, %status, "retrying on another replica");
                        tried = Some(url.clone());
                        continue;
                    }
                    metrics.count_code(status.as_u16());
                    let mut report = Report::new(
                        model_in_flight,
                        replica_in_flight,
                        started,
                        request_id.to_owned(),
                        served.clone(),
                        url.clone(),
                        status.as_u16(),
                        attempt > 0,
                    );
                    let content_type = exchange
                        .headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    report.set_scan(
                        content_type.starts_with("text/event-stream"),
                        content_type.starts_with("application/json"),
                    );
                    return Ok(Proxied {
                        status,
                        headers: exchange.headers,
                        body: MeteredBody::new(exchange.body, report),
                    });
                }
                Err(err @ UpstreamError::Connect(_)) => {
                    tracing::warn!(request_id, replica = %url, service_id, error = %err,
                        "replica refused the connection; cooling it down and asking the engine to look");
                    inner.balancer.cool_down(url);
                    inner.engine.nudge(service_id);
                    tried = Some(url.clone());
                    last_error = Some(format!("replica {url} refused the connection: {err}"));
                }
                Err(err @ UpstreamError::Send(_)) => {
                    // The request may have reached the engine: never resent.
                    return Err(refuse(GatewayError::bad_gateway(format!(
                        "replica {url} failed: {err}"
                    ))));
                }
            }
        }
        Err(refuse(GatewayError::bad_gateway(
            last_error.unwrap_or_else(|| "no replica answered".to_owned()),
        )))
    }
}

/// The body with `model` replaced by the served name.
fn rewrite_model(body: &[u8], served: &str) -> Result<Bytes, GatewayError> {
    let mut value: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| {
            GatewayError::bad_request(
                "invalid_json",
                format!("the request body must be a JSON object: {e}"),
            )
        })?;
    value.insert("model".into(), serde_json::Value::String(served.to_owned()));
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| GatewayError::bad_request("invalid_json", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_and_keys_compare_safely() {
        assert_eq!(new_request_id().len(), 32);
        assert_ne!(new_request_id(), new_request_id());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn rewriting_the_model_keeps_other_fields() {
        let out = rewrite_model(br#"{"model":"1234abcd","stream":true}"#, "llama").unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value, serde_json::json!({"model": "llama", "stream": true}));
    }
}
