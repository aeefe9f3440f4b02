//! Mapping Docker Engine errors to typed [`ShimletError`]s.

use bollard::errors::Error as DockerError;
use shim_core::{FailureReason, ShimletError};

use crate::state::looks_like_missing_binary;

/// The HTTP status of an engine error response, if it is one.
pub(crate) fn status_of(err: &DockerError) -> Option<u16> {
    match err {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Whether the engine said "no such object".
pub(crate) fn is_not_found(err: &DockerError) -> bool {
    status_of(err) == Some(404)
}

/// A Docker error during `what`, typed: 4xx answers are permanent (retrying the same request
/// will not help), other 5xx may pass, and a daemon that cannot be reached or says it is
/// unavailable (transport errors, timeouts, 503, 429) is `RuntimeUnavailable`, which never fails
/// a service. Known messages get their own reasons.
pub(crate) fn classify(what: &str, err: DockerError) -> ShimletError {
    let text = err.to_string();
    let message = format!("{what}: {text}");
    let lower = text.to_ascii_lowercase();
    let error = if lower.contains("port is already allocated")
        || lower.contains("address already in use")
    {
        ShimletError::transient(FailureReason::PortInUse, message)
    } else if lower.contains("bind source path does not exist") {
        ShimletError::permanent(FailureReason::ModelNotFound, message)
    } else if lower.contains("could not select device driver") {
        ShimletError::permanent(
            FailureReason::RuntimeError,
            format!(
                "{message} (accelerators were requested but the Docker Engine has no such GPU \
                 device driver; install the NVIDIA Container Toolkit or set shimlets.docker.gpuDriver)"
            ),
        )
    } else if looks_like_missing_binary(&lower) {
        ShimletError::permanent(FailureReason::BinaryNotFound, message)
    } else {
        match status_of(&err) {
            Some(429 | 503) | None => ShimletError::unavailable(format!(
                "{what}: the Docker Engine is unavailable: {text}"
            )),
            Some(code) if (400..500).contains(&code) && code != 409 => {
                ShimletError::permanent(FailureReason::RuntimeError, message)
            }
            Some(_) => ShimletError::transient(FailureReason::RuntimeError, message),
        }
    };
    error.with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status_code: u16, message: &str) -> DockerError {
        DockerError::DockerResponseServerError {
            status_code,
            message: message.into(),
        }
    }

    #[test]
    fn known_messages_get_typed_reasons() {
        let e = classify(
            "start",
            server(
                500,
                "driver failed programming external connectivity: Bind for 127.0.0.1:8000 failed: port is already allocated",
            ),
        );
        assert_eq!((e.reason, e.retryable), (FailureReason::PortInUse, true));
        let e = classify(
            "create",
            server(
                400,
                "invalid mount config for type \"bind\": bind source path does not exist: /m",
            ),
        );
        assert_eq!(e.reason, FailureReason::ModelNotFound);
        let e = classify(
            "start",
            server(
                500,
                "OCI runtime create failed: exec: \"vllm\": executable file not found in $PATH",
            ),
        );
        assert_eq!(e.reason, FailureReason::BinaryNotFound);
        let e = classify(
            "start",
            server(
                500,
                "could not select device driver \"nvidia\" with capabilities: [[gpu]]",
            ),
        );
        assert!(!e.retryable);
        assert!(e.message.contains("gpuDriver"));
    }

    #[test]
    fn client_errors_are_permanent_and_server_errors_transient() {
        assert!(!classify("x", server(400, "bad")).retryable);
        assert!(classify("x", server(409, "conflict")).retryable);
        let e = classify("x", server(500, "oops"));
        assert_eq!((e.reason, e.retryable), (FailureReason::RuntimeError, true));
        for unreachable in [DockerError::RequestTimeoutError, server(503, "restarting")] {
            let e = classify("x", unreachable);
            assert_eq!(
                (e.reason, e.retryable),
                (FailureReason::RuntimeUnavailable, true)
            );
        }
    }
}
