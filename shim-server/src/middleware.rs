//! Cross-cutting layers: bearer-token auth, request metrics, envelopes for errors produced
//! outside the handlers (routing, limits, panics).

use std::any::Any;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::access::{AuditEntry, Caller, service_of_path};
use crate::envelope::{ApiError, respond};
use crate::state::AppState;

/// Most bytes of a foreign error body kept as the envelope's message.
const MAX_FOREIGN_MESSAGE: usize = 1024;

/// Fallback for paths no route matches.
pub(crate) async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
}

/// Fallback for a known path asked with a method it does not serve.
pub(crate) async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// Turns a panic in a handler into a 500 envelope instead of a dropped connection.
pub(crate) fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error: the request handler panicked",
    )
    .into_response()
}

/// The edge of every request: refuses what the caller's token does not allow (see
/// [`crate::access`]), counts the request under its route template, wraps any error response
/// that is not JSON (axum's own rejections, a body-limit error) in the envelope, so no client
/// sees an empty or plain-text error, and writes changing requests to the audit log.
pub(crate) async fn edge(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let metrics = state.metrics();
    let route = metrics.route_index(
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let method = request.method().clone();
    let changing = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    // Only changing requests pay for the audit (the status GET is the hot path).
    let audited = (changing && state.access().auditing()).then(|| {
        request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().path().to_string(), ToString::to_string)
    });
    let (caller, refused) = state.access().authorize(&method, request.headers());
    let response = match refused {
        Some(refused) => refused,
        None => next.run(request).await,
    };
    let response = if response.status().is_client_error() || response.status().is_server_error() {
        ensure_envelope(response).await
    } else {
        response
    };
    let response = match audited {
        Some(path) => audit(&state, &method, &path, caller.as_ref(), response).await,
        None => response,
    };
    metrics.record(route, &method, response.status());
    response
}

/// Writes one changing request to the audit log. A successful deploy's service id is only in
/// its answer, so that small body is read and put back.
async fn audit(
    state: &AppState,
    method: &Method,
    path: &str,
    caller: Option<&Caller>,
    response: Response,
) -> Response {
    let status = response.status();
    let (response, deployed) = if status.is_success() && path.starts_with("/api/v1/modserv/deploy")
    {
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        let id = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["data"]["serviceId"].as_str().map(str::to_string));
        (
            Response::from_parts(parts, axum::body::Body::from(bytes)),
            id,
        )
    } else {
        (response, None)
    };
    state.access().audit(&AuditEntry {
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        who: caller.map_or("anonymous", |c| c.name.as_str()),
        role: caller.map(|c| c.role),
        method: method.as_str(),
        path,
        service_id: deployed
            .as_deref()
            .or_else(|| service_of_path(path.split('?').next().unwrap_or(path))),
        status: status.as_u16(),
    });
    response
}

async fn ensure_envelope(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_FOREIGN_MESSAGE * 4).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let mut message = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text
    };
    if message.len() > MAX_FOREIGN_MESSAGE {
        let mut cut = MAX_FOREIGN_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let mut wrapped = respond::<()>(parts.status, &message, None);
    // Keep headers such as `Allow` or `WWW-Authenticate`, but not the old body's framing.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            wrapped.headers_mut().append(name.clone(), value.clone());
        }
    }
    wrapped
}
