//! The accept loop: each connection is offered to the [`Front`] first (when there is one), then
//! served by hyper with the router, with graceful shutdown for both.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::{Buf as _, Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A connection's first reader, ahead of the HTTP server: it may answer requests itself (the
/// OpenAI gateway answers its proxied requests this way, see `shim_gateway::Gateway::
/// serve_connection`), and returns the connection, with the bytes it read of the next request,
/// when that request is for the router; `None` when the connection has ended. It should close
/// idle connections once the token is cancelled (shutdown).
pub type Front = Arc<
    dyn Fn(
            TcpStream,
            CancellationToken,
        ) -> Pin<Box<dyn Future<Output = Option<(TcpStream, Bytes)>> + Send>>
        + Send
        + Sync,
>;

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets the
/// connections finish (hyper's graceful shutdown; the front sees `stopping`), and returns
/// when they have, or after `grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    front: Option<Front>,
    stopping: CancellationToken,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(err) => {
                if !is_connection_error(&err) {
                    // Most likely out of file descriptors: wait for some to be closed.
                    tracing::error!(error = %err, "accept failed; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        // Small answers on kept-alive connections must not wait for Nagle's algorithm.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        connections.spawn(connection(
            tcp,
            front.clone(),
            app.clone(),
            graceful.watcher(),
            stopping.clone(),
        ));
    }
    drop(listener);
    tracing::info!("shutting down the HTTP server");
    // Ends the SSE streams, which would otherwise hold graceful shutdown open forever, and
    // tells the front to close idle connections.
    stopping.cancel();
    connections.close();
    let drained = async {
        graceful.shutdown().await;
        connections.wait().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            ?grace,
            "requests still in flight after the grace period; stopping anyway"
        );
    }
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn connection(
    tcp: TcpStream,
    front: Option<Front>,
    app: Router,
    watcher: Watcher,
    stopping: CancellationToken,
) {
    let (tcp, read) = match front {
        Some(front) => match front(tcp, stopping).await {
            Some(handoff) => handoff,
            None => return,
        },
        None => (tcp, Bytes::new()),
    };
    let io = TokioIo::new(Rewind { read, inner: tcp });
    let service = TowerToHyperService::new(app);
    let builder = Builder::new(TokioExecutor::new());
    // Boxed: only connections handed over pay for hyper's connection state in their task.
    let served = Box::pin(
        watcher.watch(
            builder
                .serve_connection_with_upgrades(io, service)
                .into_owned(),
        ),
    );
    if let Err(err) = served.await {
        tracing::trace!(error = %err, "connection ended with an error");
    }
}

/// A stream that yields bytes already read from it before reading on.
struct Rewind {
    read: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
