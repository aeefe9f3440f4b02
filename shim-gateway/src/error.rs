//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: OpenAI SDKs parse
//! it and show the message, so every gateway error uses it (never the admin API's envelope).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// A request the gateway answers itself, with an OpenAI-shaped body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct GatewayError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable; names the field or the model.
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// A stable machine word (`model_not_found`, `queue_full`, ...).
    pub code: &'static str,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
}

impl GatewayError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            kind,
            code,
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or unknown API key: send 'Authorization: Bearer <key>' with a key listed in gateway.apiKeys".into(),
        )
    }

    pub(crate) fn forbidden(model: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "model_not_allowed",
            format!("this API key may not use the model `{model}`"),
        )
    }

    pub(crate) fn model_not_found(model: &str, available: &[String]) -> Self {
        let list = if available.is_empty() {
            "none is deployed".to_owned()
        } else {
            format!("available: {}", available.join(", "))
        };
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist ({list})"),
        )
    }

    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body is larger than gateway.maxBodyBytes ({limit} bytes)"),
        )
    }

    pub(crate) fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            code,
            message.into(),
        )
    }

    pub(crate) fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_error",
            message.into(),
        )
    }

    pub(crate) fn queue_full(model: &str, size: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "queue_full",
            format!(
                "the model `{model}` is starting and {size} requests already wait for it (gateway.queueSize); retry later"
            ),
        )
        .retry_after(5)
    }

    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl GatewayError {
    /// The JSON body clients get.
    pub(crate) fn body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": null,
                "code": self.code,
            }
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// Headers besides the content type: `Retry-After`, and `WWW-Authenticate` on a 401.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (header::HeaderName, HeaderValue)> {
        let retry = self
            .retry_after
            .map(|secs| (header::RETRY_AFTER, HeaderValue::from(secs)));
        let challenge = (self.status == StatusCode::UNAUTHORIZED)
            .then(|| (header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        retry.into_iter().chain(challenge)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body(),
        )
            .into_response();
        response.headers_mut().extend(self.headers());
        response
    }
}
