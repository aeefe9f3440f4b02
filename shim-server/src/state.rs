//! What every handler shares: the engine, the server's settings and its metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shim_core::Engine;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, ApiToken};
use crate::metrics::HttpMetrics;

/// Settings of the HTTP layer (the engine has its own).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body accepted; larger ones get a 413 envelope. Default 1 MiB.
    pub body_limit_bytes: usize,
    /// When set, POST, PUT and DELETE need `Authorization: Bearer <token>`; GETs stay open.
    /// An operator token named `admin` in the audit log.
    pub auth_token: Option<String>,
    /// Tokens with roles: viewers read, operators also change.
    pub tokens: Vec<ApiToken>,
    /// Reads need a token too (viewer or operator). Off by default: the existing client polls
    /// status without one.
    pub protect_reads: bool,
    /// Where changing requests are recorded as JSON lines; `None` records nothing.
    pub audit_log: Option<PathBuf>,
    /// Directory that `GET /api/v1/modserv/list` lists; `None` uses the engine's `model_root`.
    pub model_root: Option<PathBuf>,
    /// How long [`serve`](crate::serve) waits for requests in flight after the shutdown signal.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            body_limit_bytes: 1024 * 1024,
            auth_token: None,
            tokens: Vec::new(),
            protect_reads: false,
            audit_log: None,
            model_root: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The router's state. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    access: Access,
    body_limit: usize,
    model_root: PathBuf,
    shutdown_grace: Duration,
    metrics: Arc<HttpMetrics>,
    /// Cancelled when the server stops, so long-lived event streams end.
    stopping: CancellationToken,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: say only whether there is one.
        f.debug_struct("AppState")
            .field("engine", &self.inner.engine)
            .field("auth", &self.inner.access.enabled())
            .field("body_limit", &self.inner.body_limit)
            .field("model_root", &self.inner.model_root)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State for a router over `engine`.
    ///
    /// # Panics
    /// When the audit log cannot be opened; [`AppState::try_new`] returns the error instead.
    pub fn new(engine: Engine, config: ServerConfig) -> Self {
        Self::try_new(engine, config).expect("opening the audit log")
    }

    /// State for a router over `engine`.
    ///
    /// # Errors
    /// When the audit log cannot be created or opened for appending.
    pub fn try_new(engine: Engine, config: ServerConfig) -> std::io::Result<Self> {
        let model_root = config
            .model_root
            .unwrap_or_else(|| engine.config().model_root.clone());
        // `/list` answers with absolute paths, the same ones validation checks against.
        let model_root = shim_core::spec::absolute(&model_root);
        let access = Access::new(
            config.auth_token,
            config.tokens,
            config.protect_reads,
            config.audit_log.as_deref(),
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                access,
                body_limit: config.body_limit_bytes,
                model_root,
                shutdown_grace: config.shutdown_grace,
                metrics: Arc::new(HttpMetrics::new()),
                stopping: CancellationToken::new(),
            }),
        })
    }

    /// The engine behind the API.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Request counters of this server.
    pub fn metrics(&self) -> &Arc<HttpMetrics> {
        &self.inner.metrics
    }

    /// Tokens, roles and the audit log.
    pub(crate) fn access(&self) -> &Access {
        &self.inner.access
    }

    pub(crate) fn body_limit(&self) -> usize {
        self.inner.body_limit
    }

    /// Absolute directory listed by `/list`.
    pub(crate) fn model_root(&self) -> &PathBuf {
        &self.inner.model_root
    }

    pub(crate) fn shutdown_grace(&self) -> Duration {
        self.inner.shutdown_grace
    }

    /// Cancelled once the server begins to shut down.
    pub(crate) fn stopping(&self) -> &CancellationToken {
        &self.inner.stopping
    }
}
