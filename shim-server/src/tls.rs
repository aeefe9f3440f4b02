//! Optional TLS for the API and the gateway (rustls): certificate chain and key from PEM files,
//! reloaded when either file changes, so a renewed certificate (cert-manager, certbot) takes
//! effect without a restart or a dropped connection.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;

use crate::state::AppState;

/// How often the files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The PEM files of the server's certificate chain and private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let time = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((time(&self.cert)?, time(&self.key)?))
    }

    /// Loads the files.
    ///
    /// # Errors
    /// When either file cannot be read or does not hold a usable certificate or key; the
    /// message names both files.
    pub async fn load(&self) -> std::io::Result<RustlsConfig> {
        RustlsConfig::from_pem_file(&self.cert, &self.key)
            .await
            .map_err(|e| self.error(&e))
    }

    fn error(&self, err: &std::io::Error) -> std::io::Error {
        std::io::Error::new(
            err.kind(),
            format!(
                "TLS certificate {} and key {}: {err}",
                self.cert.display(),
                self.key.display()
            ),
        )
    }
}

/// [`serve_app`](crate::serve_app) over TLS. Shutdown is the same: stop accepting, end event
/// streams, let requests in flight finish within the grace period.
///
/// # Errors
/// I/O errors of the listener, or certificate files that cannot be loaded at start. A reload
/// that fails later keeps the certificate in use and is logged.
pub async fn serve_app_tls(
    listener: tokio::net::TcpListener,
    state: AppState,
    extra: Router,
    tls: TlsFiles,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = tls.load().await?;
    let stopping = state.stopping().clone();
    let grace = state.shutdown_grace();
    let handle = axum_server::Handle::new();
    {
        let (handle, stopping) = (handle.clone(), stopping.clone());
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down the HTTPS server");
            stopping.cancel();
            handle.graceful_shutdown(Some(grace));
        });
    }
    tokio::spawn(reload_on_change(config.clone(), tls, stopping));
    let listener = listener.into_std()?;
    axum_server::from_tcp_rustls(listener, config)?
        .handle(handle)
        .serve(extra.merge(crate::router(state)).into_make_service())
        .await
}

/// Reloads the certificate whenever a file's modification time changes, until the server stops.
async fn reload_on_change(
    config: RustlsConfig,
    tls: TlsFiles,
    stopping: tokio_util::sync::CancellationToken,
) {
    let mut seen = tls.modified();
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(RELOAD_CHECK) => {}
        }
        let now = tls.modified();
        if now.is_none() || now == seen {
            continue;
        }
        match config.reload_from_pem_file(&tls.cert, &tls.key).await {
            Ok(()) => {
                seen = now;
                tracing::info!(cert = %tls.cert.display(), "reloaded the TLS certificate");
            }
            // A half-written pair (cert renewed, key not yet): keep the old one, try again.
            Err(err) => {
                tracing::warn!(error = %tls.error(&err), "TLS reload failed; keeping the certificate in use")
            }
        }
    }
}
