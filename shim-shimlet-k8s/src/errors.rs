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

/// An API error during `what`, typed. An invalid object (400, 422) will be refused again, so it
/// is permanent; a conflict may pass, so it is transient. An API server that cannot be reached
/// or is overloaded (transport failures, 429, 5xx) is `RuntimeUnavailable`, which never fails a
/// service: the engine waits it out. So are 401 and 403: neither the spec nor the model causes
/// them, an operator's RBAC fix (or the API server finishing its start: a restarted one answers
/// 403 until its authorizer has loaded the RBAC objects) ends them, and the service then
/// converges on its own.
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
                403 => ShimletError::unavailable(format!(
                    "{message}; the shim's Kubernetes identity lacks a permission (see deploy/rbac.yaml)"
                )),
                401 => ShimletError::unavailable(format!(
                    "{message}; the API server rejected the credentials"
                )),
                400 | 422 => ShimletError::permanent(FailureReason::InvalidSpec, message),
                404 => ShimletError::permanent(FailureReason::WorkloadMissing, message),
                429 | 500.. => ShimletError::unavailable(format!(
                    "{message}; the Kubernetes API server is overloaded or unavailable"
                )),
                _ => ShimletError::transient(FailureReason::RuntimeError, message),
            }
        }
        other => ShimletError::unavailable(format!(
            "{what}: cannot reach the Kubernetes API server: {other}"
        )),
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
        Err(_) => Err(ShimletError::unavailable(format!(
            "{what}: the Kubernetes API server did not answer within {timeout:?}"
        ))),
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
    fn invalid_objects_are_permanent_and_everything_else_is_waited_out() {
        let e = classify(
            "applying Deployment x",
            api(403, "deployments.apps \"x\" is forbidden"),
        );
        assert_eq!(e.reason, FailureReason::RuntimeUnavailable);
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
        let e = classify("x", api(409, "conflict"));
        assert_eq!((e.reason, e.retryable), (FailureReason::RuntimeError, true));
        for code in [429, 500, 503] {
            let e = classify("x", api(code, "try again"));
            assert_eq!(
                (e.reason, e.retryable),
                (FailureReason::RuntimeUnavailable, true),
                "{code}"
            );
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
        assert_eq!(err.reason, FailureReason::RuntimeUnavailable);
        assert!(
            err.message.contains("did not answer within 3s"),
            "{}",
            err.message
        );
    }
}
