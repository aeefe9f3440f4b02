//! Mapping Kubernetes API errors to typed [`ShimletError`]s, and bounding each call in time.

use std::future::Future;
use std::time::Duration;

use shim_core::{FailureReason, ShimletError};

/// The HTTP status of an API error answer, if it is one.
pub(crate) fn status_of(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Whether the API server said "no such object".
pub(crate) fn is_not_found(err: &kube::Error) -> bool {
    status_of(err) == Some(404)
}

/// An API error during `what`, typed. A refused request (400, 401, 403, 422) will be refused
/// again, so it is permanent; conflicts, throttling, server errors and transport failures may
/// pass, so they are transient.
pub(crate) fn classify(what: &str, err: kube::Error) -> ShimletError {
    let error = match &err {
        kube::Error::Api(status) => {
            let said = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            let message = format!("{what}: {said} ({})", status.code);
            match status.code {
                403 => ShimletError::permanent(
                    FailureReason::RuntimeError,
                    format!(
                        "{message}; the shim's Kubernetes identity lacks a permission (see deploy/rbac.yaml)"
                    ),
                ),
                401 => ShimletError::permanent(
                    FailureReason::RuntimeError,
                    format!("{message}; the API server rejected the credentials"),
                ),
                400 | 422 => ShimletError::permanent(FailureReason::InvalidSpec, message),
                404 => ShimletError::permanent(FailureReason::WorkloadMissing, message),
                _ => ShimletError::transient(FailureReason::RuntimeError, message),
            }
        }
        other => ShimletError::transient(
            FailureReason::RuntimeError,
            format!("{what}: cannot reach the Kubernetes API server: {other}"),
        ),
    };
    error.with_source(err)
}

/// Runs one API call, giving up after `timeout` (an API server that accepts connections but
/// never answers must not hold a reconcile worker forever).
pub(crate) async fn timed<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ShimletError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(classify(what, err)),
        Err(_) => Err(ShimletError::transient(
            FailureReason::RuntimeError,
            format!("{what}: the Kubernetes API server did not answer within {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn api(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(
            Status {
                code,
                message: message.into(),
                reason: "Reason".into(),
                ..Status::default()
            }
            .boxed(),
        )
    }

    #[test]
    fn refusals_are_permanent_and_blips_transient() {
        let e = classify(
            "applying Deployment x",
            api(403, "deployments.apps \"x\" is forbidden"),
        );
        assert!(!e.retryable);
        assert!(e.message.contains("deploy/rbac.yaml"), "{}", e.message);
        let e = classify(
            "applying Deployment x",
            api(422, "spec.replicas: Invalid value"),
        );
        assert_eq!((e.reason, e.retryable), (FailureReason::InvalidSpec, false));
        assert!(
            e.message.contains("spec.replicas: Invalid value (422)"),
            "{}",
            e.message
        );
        for code in [409, 429, 500, 503] {
            assert!(classify("x", api(code, "try again")).retryable, "{code}");
        }
        assert!(is_not_found(&api(404, "not found")));
        assert!(!is_not_found(&api(409, "conflict")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_api_server_times_out() {
        let never = std::future::pending::<Result<(), kube::Error>>();
        let err = timed(Duration::from_secs(3), "listing", never)
            .await
            .unwrap_err();
        assert!(err.retryable);
        assert!(
            err.message.contains("did not answer within 3s"),
            "{}",
            err.message
        );
    }
}
