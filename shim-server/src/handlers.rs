//! One function per route: extract, call the engine, shape the answer. No decisions about
//! services are made here.

use std::borrow::Cow;
use std::convert::Infallible;
use std::path::Path;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Datelike, Timelike, Utc};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use shim_core::{
    DeploySpec, Desired, Error, Event, EventKind, EventStream, Phase, Received, ServiceRecord,
    ShimletError, StepProgress,
};
use tokio_util::sync::CancellationToken;

use crate::envelope::{ApiError, respond, success};
use crate::state::AppState;

/// Longest service id accepted in a path (generated ids are 8 characters).
const MAX_ID_LEN: usize = 64;
/// Events returned when `limit` is not given, and the most returned at all.
const DEFAULT_EVENTS: usize = 100;
const MAX_EVENTS: usize = 1000;
/// Log lines returned when `tail` is not given, and the most returned at all.
const DEFAULT_TAIL: usize = 100;
const MAX_TAIL: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// Extraction
// ---------------------------------------------------------------------------------------------

/// The `{serviceId}` path segment, checked to be 1–64 characters of `[A-Za-z0-9_-]` so that odd
/// input never reaches the engine, the store or a log line.
pub(crate) struct ServiceId(String);

impl<S: Send + Sync> FromRequestParts<S> for ServiceId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(id) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let valid = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(id))
        } else {
            let shown: String = id.chars().take(MAX_ID_LEN).collect();
            Err(ApiError::bad_request(format!(
                "invalid service id {shown:?}: expected 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_-]"
            )))
        }
    }
}

/// Query of deploy and update.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct WriteQuery {
    /// Render what would be created, without creating it.
    #[serde(rename = "dryRun", default)]
    dry_run: bool,
}

/// Query of the events route.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct EventsQuery {
    limit: Option<usize>,
}

/// Query of the logs route.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct LogsQuery {
    tail: Option<usize>,
    /// Stream new lines as server-sent events after the tail.
    #[serde(default)]
    follow: bool,
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

/// Reads a deploy/update body: JSON (`application/json`, any parameters such as
/// `charset=utf-8`, or no content type at all, as clients often omit it), within the body limit.
fn deploy_spec(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<DeploySpec, ApiError> {
    if let Some(value) = headers.get(header::CONTENT_TYPE) {
        let value = value.to_str().unwrap_or_default();
        let mime = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let json = mime.is_empty()
            || mime == "application/json"
            || (mime.starts_with("application/") && mime.ends_with("+json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content type {value:?}: send application/json"),
            ));
        }
    }
    // The rejection knows its status: 413 when the body is over the limit, 400 otherwise.
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    parse_spec(&body)
}

/// Parses JSON into a [`DeploySpec`], naming the field path of a type error
/// (`resourceRequirements.acceleratorCount: invalid type: string "x", expected i64`).
fn parse_spec(body: &[u8]) -> Result<DeploySpec, ApiError> {
    use serde_json::error::Category;
    // serde's derived structs also accept a JSON array of field values; the contract's body is an
    // object, so anything else is refused rather than read positionally.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => {}
        Some(_) => return Err(ApiError::bad_request("request body must be a JSON object")),
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let spec: DeploySpec = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            Category::Data => {
                let message = without_position(&inner);
                if path == "." {
                    ApiError::bad_request(format!("request body: {message}"))
                } else {
                    ApiError::bad_request(format!("{path}: {message}"))
                }
            }
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad_request(format!("malformed JSON: {inner}"))
            }
        }
    })?;
    // Trailing garbage after the object is malformed input too.
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    Ok(spec)
}

/// serde_json's message without its " at line L column C" suffix: once the field path is named
/// the position only adds noise.
fn without_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&suffix) {
        Some(message) => message.to_string(),
        None => text,
    }
}

// ---------------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------------

/// `{serviceId}`: the data of deploy, update and delete.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IdView<'a> {
    service_id: &'a str,
}

/// A service's status as the client reads it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusView<'a> {
    service_id: &'a str,
    /// One of the six words of the contract.
    status: &'static str,
    /// Full URL ending in `/v1/chat/completions`; empty unless running.
    endpoint: &'a str,
    /// `YYYY-MM-DD HH:MM:SS`, UTC: the last real status change.
    update_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_name: Option<&'a str>,
    /// The engine preset asked for; absent when the deploy left it to the server's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<&'a str>,
    /// The spec's context length and GPU count, so a client can re-send them in an update
    /// (environment values are not shown: they may hold secrets).
    #[serde(skip_serializing_if = "Option::is_none")]
    context_length: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accelerator_count: Option<u32>,
    /// Base URLs of the ready replicas (live services only).
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_replicas: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    desired_replicas: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

impl<'a> StatusView<'a> {
    fn of(record: &'a ServiceRecord) -> Self {
        let running = record.phase == Phase::Running;
        Self {
            service_id: &record.id,
            status: record.phase.wire_word(),
            // The contract: empty until running. A recovering service keeps its old endpoint in
            // the record, but it is not serving, so it is not shown.
            endpoint: if running { &record.endpoint } else { "" },
            update_time: wire_time(record.updated_at),
            model_name: Some(&record.spec.model_name),
            engine: record.spec.engine.as_deref(),
            context_length: record.spec.context_length,
            accelerator_count: Some(record.spec.accelerators()),
            replicas: Some(&record.replicas),
            generation: Some(record.generation),
            ready_replicas: Some(record.ready_replicas),
            desired_replicas: Some(record.desired_replicas),
            reason: record.reason.as_deref().filter(|_| !running),
            message: record.message.as_deref().filter(|_| !running),
        }
    }

    /// A service that is not live: never deployed (`deleted` is `None`) or deleted.
    fn not_exist(id: &'a str, deleted: Option<&'a ServiceRecord>) -> Self {
        Self {
            service_id: id,
            status: Phase::Deleted.wire_word(),
            endpoint: "",
            update_time: wire_time(deleted.map_or_else(Utc::now, |r| r.updated_at)),
            model_name: deleted.map(|r| r.spec.model_name.as_str()),
            engine: deleted.and_then(|r| r.spec.engine.as_deref()),
            context_length: None,
            accelerator_count: None,
            replicas: None,
            generation: deleted.map(|r| r.generation),
            ready_replicas: None,
            desired_replicas: None,
            reason: None,
            message: None,
        }
    }
}

/// The contract's time format (Go layout `2006-01-02 15:04:05`), in UTC.
fn wire_time(time: DateTime<Utc>) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        time.year(),
        time.month(),
        time.day(),
        time.hour(),
        time.minute(),
        time.second()
    )
}

/// One model directory under the model root, with what its headers say (`null` when they
/// cannot be read: no model files yet, or a format this server does not read).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModelView {
    model_name: String,
    model_path: String,
    format: Option<&'static str>,
    architecture: Option<String>,
    parameters: Option<u64>,
    quantization: Option<String>,
    weights_bytes: Option<u64>,
    max_context_length: Option<u64>,
}

impl ModelView {
    /// Fills in the metadata from the model's headers (never the weights).
    fn inspect(mut self) -> Self {
        match shim_model::inspect(Path::new(&self.model_path)) {
            Ok(info) => {
                self.format = Some(info.format.as_str());
                self.architecture = info.architecture;
                self.parameters = Some(info.parameters);
                self.quantization = info.quantization;
                self.weights_bytes = Some(info.weights_bytes);
                self.max_context_length = info.max_context_length;
            }
            Err(err) => {
                tracing::debug!(model = %self.model_name, error = %err, "model metadata unknown");
            }
        }
        self
    }
}

/// Pipeline progress of one service.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PipelineView<'a> {
    service_id: &'a str,
    generation: u64,
    status: &'static str,
    pipeline: &'a str,
    steps: Cow<'a, [StepProgress]>,
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

/// `POST /api/v1/modserv/deploy`.
pub(crate) async fn deploy(
    State(state): State<AppState>,
    write: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let write = query(write)?;
    let spec = deploy_spec(&headers, body)?;
    if write.dry_run {
        return Ok(success(state.engine().dry_run(spec).await?));
    }
    let id = state.engine().deploy(spec).await?;
    Ok(success(IdView { service_id: &id }))
}

/// `PUT /api/v1/modserv/{serviceId}`.
pub(crate) async fn update(
    State(state): State<AppState>,
    ServiceId(id): ServiceId,
    write: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let write = query(write)?;
    let spec = deploy_spec(&headers, body)?;
    if write.dry_run {
        // Renders the new spec; the running service is not touched.
        if state.engine().get(&id).is_none() {
            return Err(Error::NotFound(id).into());
        }
        return Ok(success(state.engine().dry_run(spec).await?));
    }
    state.engine().update(&id, spec).await?;
    Ok(success(IdView { service_id: &id }))
}

/// `DELETE /api/v1/modserv/{serviceId}`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    ServiceId(id): ServiceId,
) -> Result<Response, ApiError> {
    state.engine().delete(&id).await?;
    Ok(success(IdView { service_id: &id }))
}

/// `GET /api/v1/modserv/{serviceId}`: answered from the engine's memory; unknown ids are a
/// successful `notExist`, as the contract wants.
pub(crate) async fn status(State(state): State<AppState>, ServiceId(id): ServiceId) -> Response {
    // Hot path: serialise straight from the live record, under the engine's read lock, no clone.
    if let Some(response) = state
        .engine()
        .with_service(&id, |record| success(StatusView::of(record)))
    {
        return response;
    }
    // Not live. A deleted service's record says when it went away.
    let deleted = match state.engine().history(&id).await {
        Ok(record) => record,
        Err(err) => {
            tracing::warn!(service_id = %id, error = %err, "could not read service history");
            None
        }
    };
    success(StatusView::not_exist(&id, deleted.as_ref()))
}

/// `GET /api/v1/modserv`: every live service, oldest first.
pub(crate) async fn list_services(State(state): State<AppState>) -> Response {
    let records = state.engine().list();
    let views: Vec<StatusView<'_>> = records.iter().map(StatusView::of).collect();
    success(views)
}

/// `GET /api/v1/modserv/list`: the model directories under the model root.
pub(crate) async fn list_models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let root = state.model_root().clone();
    let policy = state.engine().config().validation_policy();
    let models = tokio::task::spawn_blocking(move || {
        read_models(&root).map(|models| {
            // Offer only names a deploy would accept.
            models
                .into_iter()
                .filter(|m| {
                    DeploySpec::named(m.model_name.clone())
                        .validate(&policy)
                        .is_ok()
                })
                .map(ModelView::inspect)
                .collect::<Vec<_>>()
        })
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("listing models failed: {e}"),
        )
    })?
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "cannot read the model root {}: {e}",
                state.model_root().display()
            ),
        )
    })?;
    Ok(success(models))
}

/// Sub-directories of `root` (symlinks to directories included), hidden ones skipped, sorted by
/// name. A missing root is an empty list: nothing has been downloaded yet.
fn read_models(root: &Path) -> std::io::Result<Vec<ModelView>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut models = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not UTF-8: cannot be sent as a modelName
        };
        let path = entry.path();
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        models.push(ModelView {
            model_name: name,
            model_path: path.to_string_lossy().into_owned(),
            format: None,
            architecture: None,
            parameters: None,
            quantization: None,
            weights_bytes: None,
            max_context_length: None,
        });
    }
    models.sort_by(|a, b| a.model_name.cmp(&b.model_name));
    Ok(models)
}

/// `GET /api/v1/modserv/{serviceId}/pipeline`: the steps of the current generation's run.
pub(crate) async fn pipeline(
    State(state): State<AppState>,
    ServiceId(id): ServiceId,
) -> Result<Response, ApiError> {
    let engine = state.engine();
    engine
        .with_service(&id, |record| {
            // Before a worker picks the service up the record has no steps yet; show the
            // pipeline's steps as pending rather than an empty list.
            let steps = if record.steps.is_empty() && record.desired == Desired::Present {
                Cow::Owned(engine.pipeline().initial_progress())
            } else {
                Cow::Borrowed(record.steps.as_slice())
            };
            success(PipelineView {
                service_id: &record.id,
                generation: record.generation,
                status: record.phase.wire_word(),
                pipeline: engine.pipeline().name(),
                steps,
            })
        })
        .ok_or_else(|| ApiError::no_service(&id))
}

/// `GET /api/v1/modserv/{serviceId}/events?limit=N`: the history as JSON, or with
/// `Accept: text/event-stream` the history followed by live events as server-sent events.
pub(crate) async fn events(
    State(state): State<AppState>,
    ServiceId(id): ServiceId,
    params: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let limit = query(params)?
        .limit
        .unwrap_or(DEFAULT_EVENTS)
        .min(MAX_EVENTS);
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let history = state.engine().events(&id, limit).await?;
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct EventsView<'a> {
            service_id: &'a str,
            events: Vec<Event>,
        }
        return Ok(success(EventsView {
            service_id: &id,
            events: history,
        }));
    }
    // Subscribe before reading the history so nothing falls in between; the overlap is removed
    // in `live_events`.
    let live = state.engine().subscribe();
    let history = state.engine().events(&id, limit).await?;
    let still_live = state.engine().with_service(&id, |_| ()).is_some();
    let replay: Vec<Result<SseEvent, Infallible>> =
        history.iter().map(|e| Ok(sse_event(e))).collect();
    let follow = still_live.then(|| live_events(live, id, history, state.stopping().clone()));
    let stream = futures::stream::iter(replay).chain(futures::stream::iter(follow).flatten());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn sse_event(event: &Event) -> SseEvent {
    SseEvent::default().json_data(event).unwrap_or_else(|err| {
        SseEvent::default()
            .event("error")
            .data(format!("could not serialise event: {err}"))
    })
}

/// Live events of one service until it is deleted, the server stops or the engine goes away.
/// Events already sent from the history are skipped; lost ones are announced as a `lagged`
/// event carrying how many were dropped.
fn live_events(
    live: EventStream,
    id: String,
    history: Vec<Event>,
    stopping: CancellationToken,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    struct Follow {
        live: EventStream,
        id: String,
        /// Sent already; consulted only for events not newer than its last one.
        history: Vec<Event>,
        stopping: CancellationToken,
        done: bool,
    }
    let follow = Follow {
        live,
        id,
        history,
        stopping,
        done: false,
    };
    futures::stream::unfold(follow, |mut f| async move {
        if f.done {
            return None;
        }
        loop {
            let received = tokio::select! {
                () = f.stopping.cancelled() => return None,
                received = f.live.next() => received,
            };
            match received {
                Err(_closed) => return None,
                Ok(Received::Lagged(n)) => {
                    let event = SseEvent::default().event("lagged").data(n.to_string());
                    return Some((Ok(event), f));
                }
                Ok(Received::Event(event)) if event.service_id == f.id => {
                    let cutoff = f.history.last().map(|e| e.time);
                    if cutoff.is_some_and(|c| event.time <= c) {
                        if f.history.contains(&event) {
                            continue;
                        }
                    } else {
                        f.history = Vec::new(); // past the overlap: stop comparing
                    }
                    f.done = matches!(
                        event.kind,
                        EventKind::Transition {
                            to: Phase::Deleted,
                            ..
                        }
                    );
                    return Some((Ok(sse_event(&event)), f));
                }
                Ok(Received::Event(_)) => {}
            }
        }
    })
}

/// `GET /api/v1/modserv/{serviceId}/logs?tail=N`.
pub(crate) async fn logs(
    State(state): State<AppState>,
    ServiceId(id): ServiceId,
    params: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query(params)?;
    let tail = params.tail.unwrap_or(DEFAULT_TAIL).min(MAX_TAIL);
    if params.follow {
        return follow_logs(state, id, tail).await;
    }
    match state.engine().logs(&id, tail).await {
        Ok(logs) => {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct LogsView<'a> {
                service_id: &'a str,
                logs: String,
            }
            Ok(success(LogsView {
                service_id: &id,
                logs,
            }))
        }
        Err(Error::Shimlet(err)) if is_unsupported(&err, "logs") => {
            Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, err.message))
        }
        Err(err) => Err(err.into()),
    }
}

/// Whether a shimlet error is the trait's default "does not support" answer.
fn is_unsupported(err: &ShimletError, capability: &str) -> bool {
    !err.retryable && err.message == ShimletError::unsupported(capability).message
}

/// `GET /api/v1/plugins`: registered shimlets and pipelines, the active ones marked.
pub(crate) async fn plugins(State(state): State<AppState>) -> Response {
    success(state.engine().plugins())
}

/// `GET /api/v1/events`: every service's events as server-sent events, live only (no history:
/// a client lists the services first, or after this stream opens so nothing falls in between).
/// Each `data:` is one Event as JSON, as on the per-service stream; a subscriber that falls
/// behind gets an event named `lagged` with the number it missed, and should re-list.
pub(crate) async fn all_events(State(state): State<AppState>) -> Response {
    let live = state.engine().subscribe();
    let stopping = state.stopping().clone();
    let stream = futures::stream::unfold(live, move |mut live| {
        let stopping = stopping.clone();
        async move {
            let received = tokio::select! {
                () = stopping.cancelled() => return None,
                received = live.next() => received,
            };
            let event = match received.ok()? {
                Received::Lagged(n) => SseEvent::default().event("lagged").data(n.to_string()),
                Received::Event(event) => sse_event(&event),
            };
            Some((Ok::<_, Infallible>(event), live))
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `PATCH /api/v1/modserv/{serviceId}`: a JSON merge patch (RFC 7386) of the service's stored
/// spec, e.g. `{"replicaCount": 3}`. The patched spec is validated and applied exactly like a PUT
/// body, so a client can change one field without knowing (or resending) the others, such as
/// environment values, which the status never shows.
pub(crate) async fn patch_service(
    State(state): State<AppState>,
    ServiceId(id): ServiceId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Some(value) = headers.get(header::CONTENT_TYPE) {
        let value = value.to_str().unwrap_or_default();
        if !value.to_ascii_lowercase().contains("json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "unsupported content type {value:?}: send application/merge-patch+json or application/json"
                ),
            ));
        }
    }
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let patch: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "request body must be a JSON object (a merge patch of the spec)",
        ));
    }
    let Some(record) = state.engine().get(&id) else {
        return Err(Error::NotFound(id).into());
    };
    let mut spec = serde_json::to_value(&record.spec).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the stored spec: {e}"),
        )
    })?;
    merge_patch(&mut spec, &patch);
    // Through the same parser as a PUT body: type errors name the field.
    let spec = parse_spec(spec.to_string().as_bytes())?;
    state.engine().update(&id, spec).await?;
    Ok(success(IdView { service_id: &id }))
}

/// RFC 7386: objects merge key by key, `null` removes a key, anything else replaces.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    if let serde_json::Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(
                    target.entry(key.clone()).or_insert(serde_json::Value::Null),
                    value,
                );
            }
        }
    }
}

/// How often a followed log is read again from the runtime (runtimes offer a tail, not a stream).
const LOG_FOLLOW_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Lines read at each poll of a followed log: the overlap with the previous read is found in
/// this window, so more than this many new lines in one interval are reported as a gap.
const LOG_FOLLOW_WINDOW: usize = 2000;

/// `GET /api/v1/modserv/{serviceId}/logs?follow=true&tail=N`: server-sent events. The first
/// message is the last `tail` lines; each later one carries the lines added since (its `data:`
/// lines are log lines). When the new read does not overlap the previous one (the log rotated,
/// or more than the window arrived), an event named `reset` carries the current tail instead,
/// to replace what was shown. The stream ends when the service goes away or the server stops.
async fn follow_logs(state: AppState, id: String, tail: usize) -> Result<Response, ApiError> {
    let first = match state.engine().logs(&id, tail).await {
        Ok(text) => text,
        Err(Error::Shimlet(err)) if is_unsupported(&err, "logs") => {
            return Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, err.message));
        }
        Err(err) => return Err(err.into()),
    };
    struct Follow {
        state: AppState,
        id: String,
        tail: usize,
        /// The last read, as lines; `None` before the first message went out.
        seen: Option<Vec<String>>,
        first: String,
    }
    let follow = Follow {
        state,
        id,
        tail,
        seen: None,
        first,
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        let Some(seen) = &f.seen else {
            let lines: Vec<String> = f.first.lines().map(str::to_owned).collect();
            let event = SseEvent::default().data(lines.join("\n"));
            f.seen = Some(lines);
            return Some((Ok::<_, Infallible>(event), f));
        };
        let mut seen = seen.clone();
        loop {
            tokio::select! {
                () = f.state.stopping().cancelled() => return None,
                () = tokio::time::sleep(LOG_FOLLOW_INTERVAL) => {}
            }
            // `tail` is at most MAX_TAIL already, and the window is below it.
            let window = f.tail.max(LOG_FOLLOW_WINDOW);
            let text = match f.state.engine().logs(&f.id, window).await {
                Ok(text) => text,
                Err(Error::NotFound(_)) => return None,
                Err(err) => {
                    // Runtimes fail transiently (a restarting replica); say so and keep going.
                    tracing::debug!(service_id = %f.id, error = %err, "log follow read failed");
                    continue;
                }
            };
            let current: Vec<String> = text.lines().map(str::to_owned).collect();
            let event = match new_lines(&seen, &current) {
                Some([]) => continue,
                Some(added) => SseEvent::default().data(added.join("\n")),
                None => {
                    let start = current.len().saturating_sub(f.tail);
                    SseEvent::default()
                        .event("reset")
                        .data(current[start..].join("\n"))
                }
            };
            seen = current;
            f.seen = Some(seen);
            return Some((Ok(event), f));
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The lines of `current` (a later tail of the same log) that follow the end of `previous`:
/// after the longest start of `current` that ends `previous`. `None` when they do not overlap
/// at all although both have lines (the log was rotated or replaced, or more new lines came
/// than one read holds).
fn new_lines<'a>(previous: &[String], current: &'a [String]) -> Option<&'a [String]> {
    if previous.is_empty() {
        return Some(current);
    }
    // Candidates end where `current` repeats the last line seen; the longest overlap wins, so
    // a repeated line is not reported twice.
    let last = previous.last()?;
    (1..=current.len().min(previous.len()))
        .rev()
        .filter(|&j| &current[j - 1] == last)
        .find(|&j| current[..j] == previous[previous.len() - j..])
        .map(|j| &current[j..])
        .or_else(|| current.is_empty().then_some(current))
}

#[cfg(test)]
mod follow_tests {
    use super::new_lines;

    fn lines(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn only_the_lines_after_the_overlap_are_new() {
        let before = lines("a b c");
        assert_eq!(
            new_lines(&before, &lines("a b c d e")),
            Some(&lines("d e")[..])
        );
        // The window moved on: the start of the old read fell out of the new one.
        assert_eq!(new_lines(&before, &lines("b c d")), Some(&lines("d")[..]));
        assert_eq!(new_lines(&before, &lines("a b c")), Some(&[][..]));
        assert_eq!(new_lines(&[], &lines("x")), Some(&lines("x")[..]));
    }

    #[test]
    fn repeated_lines_are_not_reported_twice_and_a_rotation_is_no_overlap() {
        assert_eq!(
            new_lines(&lines("x x"), &lines("x x x")),
            Some(&lines("x")[..])
        );
        assert_eq!(new_lines(&lines("a b"), &lines("c d")), None);
    }
}

/// `GET /healthz`.
pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
    #[derive(Serialize)]
    struct Health<'a> {
        shimlet: &'a str,
        pipeline: &'a str,
        leader: bool,
    }
    let engine = state.engine();
    respond(
        StatusCode::OK,
        "ok",
        Some(Health {
            shimlet: engine.shimlet_name(),
            pipeline: engine.pipeline().name(),
            leader: engine.is_leader(),
        }),
    )
}

/// Every GPU with its memory and holder (the cluster's nodes' on Kubernetes); may run
/// nvidia-smi, so off the async workers.
async fn gpu_snapshot(state: &AppState) -> Vec<shim_core::GpuStatus> {
    let engine = state.engine().clone();
    tokio::task::spawn_blocking(move || engine.gpu_inventory())
        .await
        .unwrap_or_default()
}

/// `GET /api/v1/gpus`: each GPU with its memory (bytes, `null` when unknown) and the service
/// holding it.
pub(crate) async fn gpus(State(state): State<AppState>) -> Response {
    #[derive(Serialize)]
    struct Gpus {
        gpus: Vec<shim_core::GpuStatus>,
    }
    success(Gpus {
        gpus: gpu_snapshot(&state).await,
    })
}

/// `GET /metrics`: Prometheus text exposition.
pub(crate) async fn metrics_text(State(state): State<AppState>) -> Response {
    let mut body = crate::metrics::render(state.engine(), state.metrics());
    crate::metrics::render_gpus(&mut body, &gpu_snapshot(&state).await);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `GET /api/v1/openapi.yaml`.
pub(crate) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        crate::OPENAPI_YAML,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_name_the_field_path_without_the_position() {
        let err =
            parse_spec(br#"{"modelName":"m","resourceRequirements":{"acceleratorCount":"x"}}"#)
                .unwrap_err();
        assert_eq!(
            err.message,
            r#"resourceRequirements.acceleratorCount: invalid type: string "x", expected i64"#
        );
        let err = parse_spec(br#"{"modelName":"m","env":[{"key":1}]}"#).unwrap_err();
        assert!(
            err.message.starts_with("env[0].key: invalid type"),
            "{}",
            err.message
        );
        let err = parse_spec(br#"{"modelName":"m","env":{"A":"1"}}"#).unwrap_err();
        assert!(
            err.message.starts_with("env: invalid type: map"),
            "{}",
            err.message
        );
        for body in [&b"[\"m\"]"[..], b" 1", b"\"m\"", b"null"] {
            let err = parse_spec(body).unwrap_err();
            assert_eq!(err.message, "request body must be a JSON object");
        }
    }

    #[test]
    fn syntax_errors_and_trailing_garbage_are_malformed_json() {
        for body in [&b"{"[..], b"", b"{\"modelName\":}", b"{} x"] {
            let err = parse_spec(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(
                err.message.starts_with("malformed JSON: "),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn wire_time_is_the_go_layout() {
        let t = DateTime::parse_from_rfc3339("2024-03-05T07:08:09.123Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(wire_time(t), "2024-03-05 07:08:09");
    }
}
