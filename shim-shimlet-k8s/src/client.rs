//! Connecting: kubeconfig / context / in-cluster discovery, timeouts and rate limiting, and the
//! start-up checks that turn "cluster unreachable" or "namespace missing" into one clear message.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use shim_core::{FailureReason, ShimletError};

use crate::config::K8sConfig;
use crate::errors::status_of;
use crate::names::MANAGED_SELECTOR;
use crate::ratelimit::RateLimitLayer;

/// A client for the cluster `config` names, and a description of it for messages.
///
/// Without `kubeConfig` and `context` this is kubectl's discovery: `KUBECONFIG`, then
/// `~/.kube/config`, then the in-cluster service account.
///
/// # Errors
/// [`FailureReason::RuntimeError`] naming what could not be loaded.
pub async fn connect(config: &K8sConfig) -> Result<(Client, String), ShimletError> {
    let failed = |what: String| {
        ShimletError::permanent(
            FailureReason::RuntimeError,
            format!(
                "{what} (set shimlets.k8s.kubeConfig and shimlets.k8s.context, or KUBECONFIG, \
                 or run the shim in a cluster with a service account)"
            ),
        )
    };
    let options = KubeConfigOptions {
        context: config.context.clone(),
        cluster: None,
        user: None,
    };
    let mut kube_config = match &config.kube_config {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| {
                failed(format!("cannot read kubeconfig {}: {e}", path.display())).with_source(e)
            })?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| failed(format!("kubeconfig {}: {e}", path.display())).with_source(e))?
        }
        None if config.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| failed(format!("kubeconfig: {e}")).with_source(e))?,
        None => Config::infer().await.map_err(|e| {
            failed(format!("no Kubernetes configuration found: {e}")).with_source(e)
        })?,
    };
    let timeout = Duration::from_secs(config.timeout_secs);
    kube_config.connect_timeout = Some(timeout);
    kube_config.write_timeout = Some(timeout);
    // No read timeout: watches stay open for minutes by design. Each other call is bounded by
    // the shimlet itself (`timeoutSecs`).
    kube_config.read_timeout = None;
    let origin = match &config.context {
        Some(context) => format!("{} (context {context})", kube_config.cluster_url),
        None => kube_config.cluster_url.to_string(),
    };
    let builder = ClientBuilder::try_from(kube_config)
        .map_err(|e| failed(format!("cannot build a client for {origin}: {e}")).with_source(e))?;
    let client = builder
        .with_layer(&RateLimitLayer::new(config.qps, config.burst))
        .build();
    Ok((client, origin))
}

/// Checks, before anything is watched, that the API server answers, that `namespace` exists and
/// that Deployments there may be listed.
///
/// # Errors
/// [`FailureReason::RuntimeError`] (or [`FailureReason::InvalidSpec`] for a missing namespace)
/// with a message naming the cluster and what to change.
pub async fn check_access(
    client: &Client,
    namespace: &str,
    origin: &str,
    timeout: Duration,
) -> Result<(), ShimletError> {
    let unreachable = |detail: String| {
        ShimletError::permanent(
            FailureReason::RuntimeError,
            format!(
                "cannot reach the Kubernetes API server at {origin}: {detail} (check \
                 shimlets.k8s.kubeConfig / context, KUBECONFIG, or the in-cluster service account)"
            ),
        )
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match tokio::time::timeout(timeout, namespaces.get(namespace)).await {
        Err(_) => return Err(unreachable(format!("no answer within {timeout:?}"))),
        Ok(Ok(_)) => {}
        Ok(Err(err)) if status_of(&err) == Some(404) => {
            return Err(ShimletError::permanent(
                FailureReason::InvalidSpec,
                format!(
                    "namespace {namespace:?} does not exist on {origin}; create it \
                     (kubectl create namespace {namespace}) or set shimlets.k8s.namespace"
                ),
            ));
        }
        // Reading the Namespace object needs a permission the least-privilege Role may lack;
        // the list below still proves the API server answers.
        Ok(Err(err)) if status_of(&err) == Some(403) => {
            tracing::debug!(%namespace, "may not read the namespace object; checking by listing");
        }
        Ok(Err(err)) if status_of(&err).is_some() => {
            return Err(unreachable(err.to_string()).with_source(err));
        }
        Ok(Err(err)) => return Err(unreachable(err.to_string()).with_source(err)),
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let probe = ListParams::default().labels(MANAGED_SELECTOR).limit(1);
    match tokio::time::timeout(timeout, deployments.list(&probe)).await {
        Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) if status_of(&err) == Some(403) => Err(ShimletError::permanent(
            FailureReason::RuntimeError,
            format!(
                "the shim may not list Deployments in namespace {namespace:?} on {origin} ({err}); \
                 grant the Role in deploy/rbac.yaml"
            ),
        )
        .with_source(err)),
        Ok(Err(err)) => Err(unreachable(err.to_string()).with_source(err)),
    }
}
