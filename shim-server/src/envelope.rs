//! The wire envelope `{"code", "message", "data"}` and the API's error type.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shim_core::{Error, FailureReason};

/// The body of every JSON response. `code` is `0` on success and the HTTP status otherwise;
/// `data` is left out when there is none.
#[derive(Debug, Serialize)]
pub(crate) struct Envelope<'a, T: Serialize> {
    /// `0` = success; anything else is a failure.
    pub(crate) code: u16,
    /// `"success"` or what went wrong.
    pub(crate) message: &'a str,
    /// The payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data: Option<T>,
}

/// Written when serialising a response fails, which only a bug can cause.
const SERIALISATION_FAILED: &[u8] =
    br#"{"code":500,"message":"internal error: could not serialise the response"}"#;

/// Serialises an envelope into a response with `status`.
pub(crate) fn respond<T: Serialize>(
    status: StatusCode,
    message: &str,
    data: Option<T>,
) -> Response {
    let code = if status.is_success() {
        0
    } else {
        status.as_u16()
    };
    let envelope = Envelope {
        code,
        message,
        data,
    };
    let (status, body) = match serde_json::to_vec(&envelope) {
        Ok(body) => (status, body),
        Err(err) => {
            tracing::error!(error = %err, "response serialisation failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                SERIALISATION_FAILED.to_vec(),
            )
        }
    };
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A success envelope (`code` 0, `message` "success").
pub(crate) fn success<T: Serialize>(data: T) -> Response {
    respond(StatusCode::OK, "success", Some(data))
}

/// A failed request: the HTTP status (also the envelope's `code`), a message and optional data.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status; the envelope's `code` equals it.
    pub status: StatusCode,
    /// What went wrong, for a human.
    pub message: Cow<'static, str>,
    /// Machine-readable detail (e.g. `{"errors": [{field, message}]}`).
    pub data: Option<serde_json::Value>,
}

impl ApiError {
    /// An error without data.
    pub fn new(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            message: message.into(),
            data: None,
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 for a service id the engine does not know.
    pub fn no_service(id: &str) -> Self {
        Self::from(Error::NotFound(id.to_string()))
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let status = match &err {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            // The request is well-formed but could not be rendered (missing model, a runtime
            // that cannot render).
            Error::DryRun(_) => StatusCode::UNPROCESSABLE_ENTITY,
            // Well-formed, but the model does not fit the GPUs (`engine.fitCheck: enforce`).
            Error::Unfit { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            // Nothing was applied (the engine rolls back); the client may retry once there is
            // room.
            Error::Store(_) if err.is_storage_full() => StatusCode::INSUFFICIENT_STORAGE,
            // Logs of a service whose workload does not exist (yet, or any more).
            Error::Shimlet(e) if e.reason == FailureReason::WorkloadMissing => {
                StatusCode::NOT_FOUND
            }
            Error::Shimlet(e) if e.reason == FailureReason::RuntimeUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let data = match &err {
            Error::Invalid(fields) => Some(serde_json::json!({ "errors": fields })),
            Error::DryRun(failure) => Some(serde_json::json!({
                "step": failure.step,
                "reason": failure.error.reason.as_str(),
            })),
            Error::Unfit { estimate, .. } => Some(serde_json::json!({ "estimate": estimate })),
            _ => None,
        };
        if status.is_server_error() {
            tracing::warn!(error = %err, "request failed in the engine");
        }
        Self {
            status,
            message: err.to_string().into(),
            data,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        respond(self.status, &self.message, self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_507_and_other_store_failures_500() {
        let full = Error::store(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert_eq!(
            ApiError::from(full).status,
            StatusCode::INSUFFICIENT_STORAGE
        );
        let broken = Error::store(std::io::Error::other("checksum mismatch"));
        assert_eq!(
            ApiError::from(broken).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
