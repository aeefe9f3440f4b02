//! `model-serve-shim mock-engine`: a small OpenAI-compatible *mock* inference server that
//! stands in for vLLM / llama.cpp in demos and tests. It loads no model and says so.
//!
//! It reproduces the parts of a real engine's behaviour that an orchestrator cares about:
//! slow start-up (the port opens only after "weights load"), start-up failure, a crash
//! mid-service, `/health`, `/v1/models`, and plain or streamed (SSE) chat and text
//! completions with OpenAI-shaped success and error bodies.
//!
//! Every answer names the replica that gave it: `x-mock-engine-host` (the machine's or
//! container's hostname) and `x-mock-engine-listen` (the address it listens on), so tests of a
//! gateway in front of several replicas can tell which one answered.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// Value of `owned_by` in `/v1/models`, so clients can tell they are talking to the mock.
pub const OWNED_BY: &str = "xmod-shim-mock";

/// Prefix of every generated reply; it is always the first token, so even `max_tokens: 1`
/// yields text that admits it comes from a mock.
const REPLY_PREFIX: &str = "[mock engine]";

/// `max_tokens` when the request does not give one.
const DEFAULT_MAX_TOKENS: u64 = 16;

/// 400 message for a `prompt` the mock cannot echo.
const PROMPT_SHAPE: &str = "`prompt` must be a string or an array of strings (token ids are not supported by the mock engine)";

/// How much of the user's text is echoed back; keeps replies short whatever the prompt.
const ECHO_MAX_CHARS: usize = 200;

/// After a simulated crash is triggered, how long to wait so the last response's bytes
/// leave the socket before the process exits.
const CRASH_FLUSH_DELAY: Duration = Duration::from_millis(100);

/// After SIGTERM/SIGINT, how long in-flight requests (e.g. slow streams) may take to finish
/// before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Exit code used by `--crash-after`.
const CRASH_EXIT_CODE: i32 = 3;

/// Response header: the hostname of the machine (or container) the replica runs on.
pub const HOST_HEADER: &str = "x-mock-engine-host";

/// Response header: the address the replica listens on (`ip:port`).
pub const LISTEN_HEADER: &str = "x-mock-engine-listen";

/// Flags of `model-serve-shim mock-engine`.
#[derive(Debug, Clone, clap::Args)]
pub struct MockEngineArgs {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0 picks a free one; the chosen port is logged).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name served in /v1/models and accepted in requests (like vLLM --served-model-name).
    #[arg(long, default_value = "mock")]
    pub served_model_name: String,
    /// Model directory (accepted for launch-compatibility; printed, not read).
    pub model: Option<String>,
    /// Simulated weight-loading time before the port opens (ms).
    #[arg(long, default_value_t = 0, env = "MOCK_STARTUP_DELAY_MS")]
    pub startup_delay_ms: u64,
    /// Exit with this code right at start-up, after printing an error (simulates a broken model).
    #[arg(long, env = "MOCK_FAIL_AT_START")]
    pub fail_at_start: Option<i32>,
    /// Exit with code 3 once N requests to /v1/* have been answered (simulates an engine crash).
    #[arg(long, env = "MOCK_CRASH_AFTER")]
    pub crash_after: Option<u64>,
    /// Per-token delay for streamed responses (ms); settable through a deploy's env, so a test
    /// can watch a stream arrive token by token.
    #[arg(long, default_value_t = 0, env = "MOCK_TOKEN_DELAY_MS")]
    pub token_delay_ms: u64,
}

/// Shared state of the mock server's router. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MockState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    served_model_name: String,
    token_delay: Duration,
    crash_after: Option<u64>,
    /// Requests seen on /v1/* routes, for `--crash-after`.
    v1_requests: AtomicU64,
    /// Signalled once the request that reaches `crash_after` has been answered.
    crash: Notify,
    /// Reported as `created` in `/v1/models`: the time the engine "loaded" the model.
    created: u64,
    /// `x-mock-engine-host` and `x-mock-engine-listen`, once the server is bound.
    identity: Option<(HeaderValue, HeaderValue)>,
}

impl MockState {
    /// Builds the router state from the command-line flags, for a server that does not name
    /// itself (in-process tests).
    #[cfg(test)]
    pub fn new(args: &MockEngineArgs) -> Self {
        Self::with_identity(args, None)
    }

    /// The state of a server on `hostname` listening on `listen`: every response then names
    /// this replica ([`HOST_HEADER`], [`LISTEN_HEADER`]).
    pub fn identified(args: &MockEngineArgs, hostname: &str, listen: std::net::SocketAddr) -> Self {
        let value = |text: &str| {
            HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        };
        Self::with_identity(args, Some((value(hostname), value(&listen.to_string()))))
    }

    fn with_identity(args: &MockEngineArgs, identity: Option<(HeaderValue, HeaderValue)>) -> Self {
        Self {
            inner: Arc::new(Inner {
                served_model_name: args.served_model_name.clone(),
                token_delay: Duration::from_millis(args.token_delay_ms),
                crash_after: args.crash_after,
                v1_requests: AtomicU64::new(0),
                crash: Notify::new(),
                created: unix_now(),
                identity,
            }),
        }
    }

    /// Completes once `--crash-after` has been reached and the triggering response has been
    /// sent (its body finished or was dropped). Never completes without `--crash-after`.
    /// The router only signals; [`run`] is what exits, so in-process tests stay alive.
    pub async fn crash_requested(&self) {
        self.inner.crash.notified().await;
    }

    /// Number of /v1/* requests received so far.
    pub fn v1_requests(&self) -> u64 {
        self.inner.v1_requests.load(Ordering::SeqCst)
    }
}

/// The mock engine's HTTP routes, without binding anything (used by [`run`] and by tests).
pub fn router(state: MockState) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        // route_layer: only matched /v1 routes count towards --crash-after.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            count_v1_request,
        ));
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .merge(v1)
        .fallback(not_found)
        .layer(middleware::map_response_with_state(
            state.clone(),
            name_the_replica,
        ))
        .with_state(state)
}

/// Adds [`HOST_HEADER`] and [`LISTEN_HEADER`] to every response of an identified server.
async fn name_the_replica(State(state): State<MockState>, mut response: Response) -> Response {
    if let Some((host, listen)) = &state.inner.identity {
        let headers = response.headers_mut();
        headers.insert(HOST_HEADER, host.clone());
        headers.insert(LISTEN_HEADER, listen.clone());
    }
    response
}

/// The hostname of this machine, or of the container it runs in.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Runs the mock engine until SIGTERM/SIGINT (returns `Ok`) or a simulated failure
/// (exits the process with the simulated code).
pub async fn run(args: MockEngineArgs) -> anyhow::Result<()> {
    println!("{REPLY_PREFIX} this is xmod-shim's mock OpenAI-compatible engine, not a real model");
    let model_dir = args.model.as_deref().unwrap_or("(none given)");
    println!(
        "{REPLY_PREFIX} model dir: {model_dir} (not read); served model name: {}",
        args.served_model_name
    );

    if let Some(code) = args.fail_at_start {
        eprintln!(
            "error: failed to load model weights from {model_dir} (simulated by --fail-at-start)"
        );
        std::process::exit(code);
    }

    // Install the handlers before the simulated load so a SIGTERM during a long start-up
    // still exits cleanly instead of taking the default "killed by signal" path.
    let mut signals = ShutdownSignals::new()?;

    if args.startup_delay_ms > 0 {
        println!(
            "{REPLY_PREFIX} loading model weights (simulated, {} ms)...",
            args.startup_delay_ms
        );
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(args.startup_delay_ms)) => {}
            name = signals.recv() => {
                println!("{REPLY_PREFIX} received {name} while loading, exiting");
                return Ok(());
            }
        }
    }

    // Bind only now, like vLLM: the port opening means the model is ready.
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("failed to bind {}:{}", args.host, args.port))?;
    let addr = listener
        .local_addr()
        .context("failed to read bound address")?;
    println!("{REPLY_PREFIX} listening on {addr}");

    let state = MockState::identified(&args, &hostname(), addr);
    let stop = Arc::new(Notify::new());
    let server = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown({
            let stop = stop.clone();
            async move { stop.notified().await }
        })
        .into_future();
    tokio::pin!(server);

    tokio::select! {
        res = &mut server => res.context("mock engine server failed")?,
        name = signals.recv() => {
            println!("{REPLY_PREFIX} received {name}, shutting down");
            // notify_one stores a permit, so this works even if the graceful-shutdown
            // future has not been polled yet.
            stop.notify_one();
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(res) => res.context("mock engine server failed")?,
                Err(_) => println!(
                    "{REPLY_PREFIX} requests still in flight after {SHUTDOWN_GRACE:?}, exiting anyway"
                ),
            }
            println!("{REPLY_PREFIX} stopped");
        }
        () = state.crash_requested() => {
            tokio::time::sleep(CRASH_FLUSH_DELAY).await;
            eprintln!(
                "{REPLY_PREFIX} crashing after {} requests (simulated by --crash-after)",
                state.v1_requests()
            );
            std::process::exit(CRASH_EXIT_CODE);
        }
    }
    Ok(())
}

/// SIGTERM (on Unix) and SIGINT, as one awaitable source.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("failed to install SIGTERM handler")?,
        })
    }

    /// Waits for the next signal and returns its name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            // If the handler cannot be installed, never report a signal rather than
            // shutting down spuriously.
            match tokio::signal::ctrl_c().await {
                Ok(()) => "SIGINT",
                Err(_) => std::future::pending().await,
            }
        }
    }
}

/// Counts /v1/* requests; the one that reaches `--crash-after` triggers the crash once its
/// response body has been fully sent (or dropped), so the client still gets its answer.
async fn count_v1_request(State(state): State<MockState>, req: Request, next: Next) -> Response {
    let seen = state.inner.v1_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let response = next.run(req).await;
    // `max(1)`: with --crash-after 0 the first request is still answered before crashing.
    match state.inner.crash_after {
        Some(limit) if seen == limit.max(1) => {
            let (parts, body) = response.into_parts();
            let guard = CrashOnDrop(state.clone());
            // The guard lives inside the stream, so it drops when hyper is done with the body.
            let body = body.into_data_stream().map(move |chunk| {
                let _keep = &guard;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(body))
        }
        _ => response,
    }
}

/// Signals [`MockState::crash_requested`] when dropped.
struct CrashOnDrop(MockState);

impl Drop for CrashOnDrop {
    fn drop(&mut self) {
        self.0.inner.crash.notify_one();
    }
}

async fn list_models(State(state): State<MockState>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.inner.served_model_name,
            "object": "model",
            "created": state.inner.created,
            "owned_by": OWNED_BY,
        }],
    }))
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("Not Found".to_owned())
}

/// Body of `POST /v1/chat/completions`; unknown fields (temperature, ...) are ignored.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    max_tokens: Option<u64>,
    /// Newer OpenAI name for `max_tokens`; used when `max_tokens` is absent.
    max_completion_tokens: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    /// A string, an array of content parts, or null (assistant tool calls).
    #[serde(default)]
    content: Value,
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    /// A string or an array of strings; a missing prompt is an empty one.
    #[serde(default)]
    prompt: Value,
    max_tokens: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What both endpoints produce: the reply tokens and the OpenAI bookkeeping around them.
struct Generation {
    tokens: Vec<String>,
    finish_reason: &'static str,
    prompt_tokens: u64,
}

impl Generation {
    /// Deterministic reply echoing `echo`, cut to `max_tokens` word tokens.
    fn new(echo: &str, prompt_tokens: u64, max_tokens: u64) -> Self {
        let echo: String = echo.chars().take(ECHO_MAX_CHARS).collect();
        let mut all = vec![
            REPLY_PREFIX.to_owned(),
            "you".to_owned(),
            "said:".to_owned(),
        ];
        let before = all.len();
        all.extend(echo.split_whitespace().map(str::to_owned));
        if all.len() == before {
            all.push("nothing".to_owned());
        }
        let limit = usize::try_from(max_tokens).unwrap_or(usize::MAX);
        let finish_reason = if all.len() > limit { "length" } else { "stop" };
        all.truncate(limit);
        Self {
            tokens: all,
            finish_reason,
            prompt_tokens,
        }
    }

    fn text(&self) -> String {
        self.tokens.join(" ")
    }

    /// Token `i` as streamed: later tokens carry their leading space so the deltas
    /// concatenate to exactly [`Generation::text`].
    fn delta(&self, i: usize) -> String {
        if i == 0 {
            self.tokens[0].clone()
        } else {
            format!(" {}", self.tokens[i])
        }
    }

    fn usage(&self) -> Value {
        let completion = self.tokens.len() as u64;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }
}

async fn chat_completions(
    State(state): State<MockState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(&body)?;
    check_model(&state, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "`messages` must contain at least one message".to_owned(),
        ));
    }
    let max_tokens = check_max_tokens(req.max_tokens.or(req.max_completion_tokens))?;

    let texts: Vec<(String, String)> = req
        .messages
        .iter()
        .map(|m| (m.role.clone(), content_text(&m.content)))
        .collect();
    let prompt_tokens = texts.iter().map(|(_, t)| count_words(t)).sum();
    let last_user = texts
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .map_or("", |(_, t)| t.as_str());
    let generation = Generation::new(last_user, prompt_tokens, max_tokens);

    let id = new_id("chatcmpl");
    let created = unix_now();
    let model = req.model;

    if !req.stream.unwrap_or(false) {
        return Ok(axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": generation.text()},
                "logprobs": null,
                "finish_reason": generation.finish_reason,
            }],
            "usage": generation.usage(),
        }))
        .into_response());
    }

    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        })
    };
    // Like OpenAI: a role-only first chunk, one chunk per token, then the finish reason.
    let mut events = vec![chunk(json!([{
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": null,
        "finish_reason": null,
    }]))];
    let first_token_event = events.len();
    events.extend((0..generation.tokens.len()).map(|i| {
        chunk(json!([{
            "index": 0,
            "delta": {"content": generation.delta(i)},
            "logprobs": null,
            "finish_reason": null,
        }]))
    }));
    events.push(chunk(json!([{
        "index": 0,
        "delta": {},
        "logprobs": null,
        "finish_reason": generation.finish_reason,
    }])));
    if req.stream_options.unwrap_or_default().include_usage {
        let mut usage_chunk = chunk(json!([]));
        usage_chunk["usage"] = generation.usage();
        events.push(usage_chunk);
    }
    Ok(sse_response(
        events,
        first_token_event,
        generation.tokens.len(),
        &state,
    ))
}

async fn completions(State(state): State<MockState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body)?;
    check_model(&state, &req.model)?;
    let max_tokens = check_max_tokens(req.max_tokens)?;
    let prompt = match &req.prompt {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        // Batched prompts: the mock answers the first one only (one choice).
        Value::Array(items) => match items.first() {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::bad_request(PROMPT_SHAPE.to_owned())),
        },
        _ => return Err(ApiError::bad_request(PROMPT_SHAPE.to_owned())),
    };
    let generation = Generation::new(&prompt, count_words(&prompt), max_tokens);

    let id = new_id("cmpl");
    let created = unix_now();
    let model = req.model;

    if !req.stream.unwrap_or(false) {
        return Ok(axum::Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "text": generation.text(),
                "logprobs": null,
                "finish_reason": generation.finish_reason,
            }],
            "usage": generation.usage(),
        }))
        .into_response());
    }

    let chunk = |text: String, finish_reason: Option<&str>| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        })
    };
    let mut events: Vec<Value> = (0..generation.tokens.len())
        .map(|i| chunk(generation.delta(i), None))
        .collect();
    events.push(chunk(String::new(), Some(generation.finish_reason)));
    if req.stream_options.unwrap_or_default().include_usage {
        let mut usage_chunk = chunk(String::new(), None);
        usage_chunk["choices"] = json!([]);
        usage_chunk["usage"] = generation.usage();
        events.push(usage_chunk);
    }
    Ok(sse_response(events, 0, generation.tokens.len(), &state))
}

/// Streams `events` as `data: <json>\n\n` lines followed by `data: [DONE]\n\n`, sleeping
/// `--token-delay-ms` before each of the `token_count` events starting at `first_token`.
fn sse_response(
    events: Vec<Value>,
    first_token: usize,
    token_count: usize,
    state: &MockState,
) -> Response {
    let delay = state.inner.token_delay;
    let token_events = first_token..first_token + token_count;
    let frames = events
        .into_iter()
        .map(|event| format!("data: {event}\n\n"))
        .chain(std::iter::once("data: [DONE]\n\n".to_owned()))
        .enumerate()
        .map(move |(i, frame)| (!delay.is_zero() && token_events.contains(&i), frame));
    let stream = futures::stream::iter(frames).then(move |(wait, frame)| async move {
        if wait {
            tokio::time::sleep(delay).await;
        }
        Ok::<_, Infallible>(frame)
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Parses a JSON body ourselves (rather than with `axum::Json`) so malformed bodies and
/// missing content types get an OpenAI-shaped 400 instead of axum's plain-text rejection.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn check_model(state: &MockState, model: &str) -> Result<(), ApiError> {
    if model == state.inner.served_model_name {
        Ok(())
    } else {
        // Same wording as vLLM, which clients and tests may match on.
        Err(ApiError::not_found(format!(
            "The model `{model}` does not exist."
        )))
    }
}

/// Like vLLM, `max_tokens` must be at least 1; absent means [`DEFAULT_MAX_TOKENS`].
fn check_max_tokens(max_tokens: Option<u64>) -> Result<u64, ApiError> {
    match max_tokens {
        None => Ok(DEFAULT_MAX_TOKENS),
        Some(0) => Err(ApiError::bad_request(
            "`max_tokens` must be at least 1, got 0.".to_owned(),
        )),
        Some(n) => Ok(n),
    }
}

/// An error answered with an OpenAI-style body:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "BadRequestError",
            message,
        }
    }

    fn not_found(message: String) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "NotFoundError",
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": null,
                "code": self.status.as_u16(),
            }
        });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Text of a chat message's `content`: a plain string, or the `text` of each content part.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The mock's notion of a token: a whitespace-separated word.
fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-mock-{:016x}", rand::random::<u64>())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> MockEngineArgs {
        MockEngineArgs {
            host: "127.0.0.1".to_owned(),
            port: 0,
            served_model_name: "mock".to_owned(),
            model: None,
            startup_delay_ms: 0,
            fail_at_start: None,
            crash_after: None,
            token_delay_ms: 0,
        }
    }

    /// Serves the router on an ephemeral port; returns its base URL and state.
    async fn serve(args: MockEngineArgs) -> (String, MockState) {
        let state = MockState::new(&args);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), state)
    }

    async fn post(url: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// The JSON payloads of an SSE body, with `[DONE]` kept as a string.
    fn sse_payloads(body: &str) -> Vec<String> {
        assert!(body.ends_with("data: [DONE]\n\n"), "body: {body:?}");
        body.split("\n\n")
            .filter(|frame| !frame.is_empty())
            .map(|frame| {
                frame
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("bad frame {frame:?}"))
                    .to_owned()
            })
            .collect()
    }

    #[tokio::test]
    async fn an_identified_server_names_its_replica_on_every_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(MockState::identified(&args(), "replica-a", addr));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let base = format!("http://{addr}");
        for stream in [false, true] {
            let resp = post(
                &format!("{base}/v1/chat/completions"),
                json!({"model": "mock", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()[HOST_HEADER], "replica-a");
            assert_eq!(resp.headers()[LISTEN_HEADER], addr.to_string().as_str());
        }
        let missing = reqwest::get(format!("{base}/nope")).await.unwrap();
        assert_eq!(missing.status(), 404);
        assert_eq!(missing.headers()[HOST_HEADER], "replica-a");
        // Without an identity (in-process tests), no header.
        let (plain, _) = serve(args()).await;
        let resp = reqwest::get(format!("{plain}/health")).await.unwrap();
        assert!(resp.headers().get(HOST_HEADER).is_none());
        assert!(!hostname().is_empty());
    }

    #[tokio::test]
    async fn health_is_ok_and_empty() {
        let (base, _) = serve(args()).await;
        let resp = reqwest::get(format!("{base}/health")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn models_lists_served_name_as_mock() {
        let (base, _) = serve(MockEngineArgs {
            served_model_name: "my-model".to_owned(),
            ..args()
        })
        .await;
        let v: Value = reqwest::get(format!("{base}/v1/models"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "my-model");
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["owned_by"], "xmod-shim-mock");
        assert!(v["data"][0]["created"].as_u64().unwrap() > 0);
    }

    #[tokio::test]
    async fn chat_non_stream() {
        let (base, _) = serve(args()).await;
        let resp = post(
            &format!("{base}/v1/chat/completions"),
            json!({"model": "mock", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"},
            ]}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["model"], "mock");
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(
            choice["message"]["content"],
            "[mock engine] you said: hello there"
        );
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 9);
    }

    #[tokio::test]
    async fn chat_max_tokens_truncates_with_length() {
        let (base, _) = serve(args()).await;
        let v: Value = post(
            &format!("{base}/v1/chat/completions"),
            json!({"model": "mock", "max_tokens": 2,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "a b c"}]}]}),
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "[mock engine] you");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 2);
    }

    #[tokio::test]
    async fn chat_stream_chunks_then_done() {
        let (base, _) = serve(MockEngineArgs {
            token_delay_ms: 1,
            ..args()
        })
        .await;
        let resp = post(
            &format!("{base}/v1/chat/completions"),
            json!({"model": "mock", "stream": true,
                   "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let payloads = sse_payloads(&resp.text().await.unwrap());
        assert_eq!(payloads.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "[mock engine] you said: hi");
        // role chunk + 4 tokens + finish chunk + usage chunk
        assert_eq!(chunks.len(), 7);
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[6]["usage"]["completion_tokens"], 4);
    }

    #[tokio::test]
    async fn wrong_model_is_404_openai_error() {
        let (base, _) = serve(args()).await;
        let resp = post(
            &format!("{base}/v1/chat/completions"),
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(resp.status(), 404);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["message"], "The model `gpt-4` does not exist.");
        assert_eq!(v["error"]["type"], "NotFoundError");
        assert_eq!(v["error"]["code"], 404);
    }

    #[tokio::test]
    async fn bad_json_is_400_openai_error() {
        let (base, _) = serve(args()).await;
        for (path, body) in [
            ("/v1/chat/completions", "{not json"),
            ("/v1/chat/completions", r#"{"model":"mock"}"#),
            ("/v1/chat/completions", r#"{"model":"mock","messages":[]}"#),
            (
                "/v1/completions",
                r#"{"model":"mock","prompt":"x","max_tokens":0}"#,
            ),
        ] {
            let resp = reqwest::Client::new()
                .post(format!("{base}{path}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{path} {body}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["type"], "BadRequestError");
            assert_eq!(v["error"]["code"], 400);
            assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn completions_non_stream_and_stream() {
        let (base, _) = serve(args()).await;
        let url = format!("{base}/v1/completions");
        let v: Value = post(&url, json!({"model": "mock", "prompt": "once upon a time"}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["object"], "text_completion");
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(
            v["choices"][0]["text"],
            "[mock engine] you said: once upon a time"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        assert_eq!(v["usage"]["completion_tokens"], 7);

        let resp = post(
            &url,
            json!({"model": "mock", "prompt": "once upon a time", "stream": true, "max_tokens": 3}),
        )
        .await;
        let payloads = sse_payloads(&resp.text().await.unwrap());
        assert_eq!(payloads.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "[mock engine] you said:");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "length"
        );

        let resp = post(&url, json!({"model": "other", "prompt": "x"})).await;
        assert_eq!(resp.status(), 404);
    }

    #[tokio::test]
    async fn unknown_route_is_404_openai_error() {
        let (base, _) = serve(args()).await;
        let resp = reqwest::get(format!("{base}/v1/nope")).await.unwrap();
        assert_eq!(resp.status(), 404);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], 404);
    }

    #[tokio::test]
    async fn crash_after_signals_once_answered() {
        let (base, state) = serve(MockEngineArgs {
            crash_after: Some(2),
            ..args()
        })
        .await;
        // /health does not count; the first /v1 request does not trigger the crash.
        reqwest::get(format!("{base}/health")).await.unwrap();
        let first = reqwest::get(format!("{base}/v1/models")).await.unwrap();
        assert_eq!(first.status(), 200);
        let early = tokio::time::timeout(Duration::from_millis(50), state.crash_requested()).await;
        assert!(early.is_err(), "crash signalled after only one request");

        // The second one is answered in full, then the crash is signalled.
        let second = reqwest::get(format!("{base}/v1/models")).await.unwrap();
        let v: Value = second.json().await.unwrap();
        assert_eq!(v["data"][0]["owned_by"], "xmod-shim-mock");
        tokio::time::timeout(Duration::from_secs(5), state.crash_requested())
            .await
            .expect("crash not signalled after the second request");
        assert_eq!(state.v1_requests(), 2);
    }
}
