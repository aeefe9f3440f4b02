//! The server command: load config, build the engine on the embedded store, serve HTTP until
//! SIGTERM/SIGINT, then stop the engine and leave workloads running for re-adoption.

use std::sync::Arc;

use anyhow::Context as _;
use shim_core::Engine;
use shim_core::store::{RedbStore, Store};
use tracing_subscriber::EnvFilter;

use crate::ServeArgs;
use crate::config::{Logging, Settings, StoreKind};

/// Runs the server.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::load(args.config.as_deref(), args.as_config())?;
    init_logging(&settings.logging)?;
    raise_open_file_limit();
    let config = settings.engine_config();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let store_kind = settings
        .engine
        .store_kind(&settings.plugins.default_shimlet);
    let (store, kube_store): (Arc<dyn Store>, _) = match store_kind {
        StoreKind::Redb => {
            let store_path = config.data_dir.join("state.redb");
            // The store's errors name the file and say what to do.
            let store = RedbStore::open(&store_path, config.event_history)
                .context("cannot open the store")?;
            (Arc::new(store), None)
        }
        StoreKind::Kubernetes => {
            // The same cluster settings as the k8s shimlet (kubeconfig, context, namespace).
            let k8s = settings.k8s_config()?;
            let store = shim_shimlet_k8s::store::KubeStore::connect(&k8s, config.event_history)
                .await
                .context("cannot open the Kubernetes store (engine.store: kubernetes)")?;
            (Arc::new(store.clone()), Some(store))
        }
    };
    // Desired state in the cluster: several replicas may share it, and only the holder of the
    // Lease reconciles.
    let election = kube_store.as_ref().map(|store| {
        let identity = replica_identity();
        tracing::info!(%identity, lease = LEASE_NAME, "competing for the reconciler's lease");
        store.elect(LEASE_NAME, identity)
    });
    let mut builder = Engine::builder()
        .config(config)
        .store(store)
        .shimlet(settings.plugins.default_shimlet.clone())
        .pipeline_named(settings.plugins.default_pipeline.clone());
    if let Some(election) = &election {
        builder = builder.leadership(election.leading());
    }
    let engine = builder.build().await.context("cannot start the engine")?;
    if let (Some(store), Some(election)) = (kube_store, &election) {
        follow_cluster(engine.clone(), store, election.leading());
    }
    let address = format!("{}:{}", settings.service.host, settings.service.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    tracing::info!(
        address = %listener.local_addr()?,
        shimlet = engine.shimlet_name(),
        pipeline = engine.pipeline().name(),
        model_root = %engine.config().model_root.display(),
        data_dir = %engine.config().data_dir.display(),
        "model-serve-shim {} listening",
        env!("CARGO_PKG_VERSION")
    );
    let state = shim_server::AppState::try_new(
        engine.clone(),
        shim_server::ServerConfig {
            auth_token: settings.service.auth_token.clone(),
            tokens: settings.service.tokens.clone(),
            protect_reads: settings.service.protect_reads,
            audit_log: Some(
                settings
                    .service
                    .audit_log
                    .clone()
                    .unwrap_or_else(|| engine.config().data_dir.join("audit.log")),
            ),
            body_limit_bytes: settings.service.body_limit_bytes,
            ..shim_server::ServerConfig::default()
        },
    )
    .context("cannot open the audit log (service.auditLog)")?;
    // The OpenAI gateway shares the port, outside the admin API's envelope and token.
    let gateway = shim_gateway::Gateway::new(engine.clone(), settings.gateway.clone());
    let metrics = gateway.clone();
    state
        .metrics()
        .append(Box::new(move |out| metrics.render_metrics(out)));
    match &settings.service.tls {
        Some(tls) => {
            let files = shim_server::TlsFiles {
                cert: tls.cert_file.clone(),
                key: tls.key_file.clone(),
            };
            shim_server::serve_app_tls(listener, state, gateway.router(), files, shutdown_signal())
                .await
                .context("server failed (service.tls)")?;
        }
        None => {
            // The gateway reads each connection first and answers its proxied requests
            // itself; everything else goes on to the router.
            let router = gateway.router();
            let front: shim_server::Front = std::sync::Arc::new(move |stream, stopping| {
                let gateway = gateway.clone();
                Box::pin(async move { gateway.serve_connection(stream, stopping).await })
            });
            shim_server::serve_app_with(listener, state, router, Some(front), shutdown_signal())
                .await
                .context("server failed")?;
        }
    }
    tracing::info!("shutting down; workloads keep running and are re-adopted on the next start");
    engine.shutdown().await;
    if let Some(election) = election {
        // Another replica takes over at once instead of after the lease runs out.
        election.release().await;
    }
    Ok(())
}

/// The Lease the replicas of one installation (one namespace) compete for.
const LEASE_NAME: &str = "xmod-shim-leader";

/// This replica's name in the Lease: the pod's name (`POD_NAME`, from the downward API in
/// deploy/), else host name and process id.
fn replica_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "shim".into());
    format!("{host}-{}", std::process::id())
}

/// Follows what others did to the ModelServices. Every replica mirrors the records other
/// replicas wrote; the leader also acts for kubectl users (`kubectl apply`, `scale`, `delete`):
/// the engine adopts, updates or deletes. A resource the engine refuses to adopt is marked
/// failed with the engine's words, so `kubectl get` shows why nothing runs. A replica that
/// takes the lead is offered again what the previous leader may have left undone.
fn follow_cluster(
    engine: Engine,
    store: shim_shimlet_k8s::store::KubeStore,
    mut leading: tokio::sync::watch::Receiver<bool>,
) {
    use shim_shimlet_k8s::store::ClusterChange;
    let Some(mut changes) = store.changes() else {
        return;
    };
    let rescan = store.clone();
    tokio::spawn(async move {
        while leading.changed().await.is_ok() {
            if *leading.borrow_and_update() {
                rescan.rescan();
            }
        }
    });
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            if change.for_leader() && !engine.is_leader() {
                continue;
            }
            match change {
                ClusterChange::Record(record) => {
                    engine.mirror(record);
                }
                ClusterChange::Adopt { id, spec } => match engine.adopt(id.clone(), spec).await {
                    Ok(()) => tracing::info!(%id, "adopted a ModelService"),
                    Err(err) => {
                        tracing::warn!(%id, error = %err, "cannot adopt a ModelService");
                        if let Err(err) = store.reject(&id, &err.to_string()).await {
                            tracing::warn!(%id, error = %err, "cannot mark the ModelService failed");
                        }
                    }
                },
                ClusterChange::Update { id, spec } => {
                    if let Err(err) = engine.update(&id, spec).await {
                        tracing::warn!(%id, error = %err, "cannot apply a ModelService's new spec");
                    }
                }
                ClusterChange::Delete { id } => {
                    if let Err(err) = engine.delete(&id).await {
                        tracing::warn!(%id, error = %err, "cannot delete a deleted ModelService's service");
                    }
                }
            }
        }
    });
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime and most servers do:
/// every proxied stream holds two sockets (the client's and the replica's), and the usual soft
/// limit of 1024 would cap the gateway near 500 streams while the hard limit allows far more.
/// Children (engines started by the process runtime) inherit the raised limit.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(err) => {
                tracing::warn!(soft, hard, error = %err, "cannot raise the open-file limit");
            }
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open-file limit"),
        Err(err) => tracing::warn!(error = %err, "cannot read the open-file limit"),
    }
}

fn init_logging(logging: &Logging) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&logging.level)
        .with_context(|| format!("bad logging.level {:?}", logging.level))?;
    // Colours only on a terminal: log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match logging.format.as_str() {
        "json" => builder.json().init(),
        "text" => builder.init(),
        other => anyhow::bail!("bad logging.format {other:?}: expected text or json"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT"),
        _ = term.recv() => tracing::info!("received SIGTERM"),
    }
}
