//! Kept-alive HTTP/1.1 connections to replicas: a small last-in-first-out pool per replica.
//!
//! A connection is driven by the request that uses it, in that request's own task: no task per
//! connection, so a proxied request does not hop between tasks (and worker threads) at every
//! read and write, which is most of what a proxy costs besides the system calls. A connection
//! leaves the pool for one request and goes back only when that request's response body has
//! been read to its end. A body dropped early (the client went away) drops the connection with
//! it, which closes the socket and so cancels the generation in the engine at once.
//!
//! Idle connections in the pool are not polled: one the replica closed meanwhile (its
//! keep-alive timeout, a restart) is found closed when it is next taken out, or when it is the
//! oldest one as another comes back, and is dropped then.

use std::collections::{HashMap, VecDeque};
use std::future::{Future as _, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a connection to a replica may take before it counts as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle connections kept per replica; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// Replicas whose pools are kept; past this, pools without idle connections are forgotten.
const MAX_ORIGINS: usize = 1024;

type Connection = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// Why a request did not get a response.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection could be made: nothing was sent, so another replica may be asked.
    Connect(String),
    /// The request may have reached the engine: never resend it.
    Send(hyper::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(err) => f.write_str(err),
            Self::Send(err) => err.fmt(f),
        }
    }
}

/// One connection to a replica: the handle requests are sent through, and the connection's
/// own future, which does the reading and writing whenever it is polled.
#[derive(Debug)]
pub(crate) struct Lease {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended.
    connection: Option<Connection>,
    origin: Arc<Origin>,
}

impl Lease {
    /// Reads and writes what the socket allows; false once the connection has ended.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(connection) = self.connection.as_mut() else {
            return false;
        };
        match Pin::new(connection).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "replica connection ended");
                }
                self.connection = None;
                false
            }
        }
    }

    /// Whether the connection is still open, without waiting for anything.
    fn alive(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && !self.sender.is_closed()
    }

    /// Puts the connection back for the next request (the response body has ended).
    pub(crate) fn release(mut self) {
        if !self.alive() {
            return;
        }
        let origin = self.origin.clone();
        let mut idle = origin.idle.lock().unwrap_or_else(|e| e.into_inner());
        // The oldest idle connection is the likeliest to have been closed by the replica.
        if idle.front_mut().is_some_and(|oldest| !oldest.alive()) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(self);
        }
    }

    /// Sends `request` and drives the connection until the response head arrives.
    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Full<Bytes>>>> {
        // The previous response may have ended a moment before the connection noticed.
        let ready = poll_fn(|cx| {
            let alive = self.drive(cx);
            match self.sender.poll_ready(cx) {
                Poll::Pending if alive => Poll::Pending,
                Poll::Pending => Poll::Ready(false),
                Poll::Ready(result) => Poll::Ready(result.is_ok()),
            }
        })
        .await;
        let mut response = pin!(self.sender.try_send_request(request));
        if !ready {
            // Not sent: the error carries the request back.
            return response.await;
        }
        // Once the connection ends, the response future says how.
        poll_fn(|cx| {
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// One replica's idle connections.
#[derive(Debug)]
struct Origin {
    /// `host:port` to connect to.
    address: String,
    /// The `Host` header: the address as the replica's URL wrote it.
    host: HeaderValue,
    /// The path of the replica's base URL, without its last `/`, put before each request's.
    prefix: String,
    /// Most recently used at the back.
    idle: Mutex<VecDeque<Lease>>,
}

impl Origin {
    fn checkout(&self) -> Option<Lease> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut lease) = idle.pop_back() {
            if lease.alive() {
                return Some(lease);
            }
        }
        None
    }

    async fn connect(self: &Arc<Self>) -> Result<Lease, UpstreamError> {
        let address = self.address.as_str();
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("timed out after {}s", CONNECT_TIMEOUT.as_secs()))
            })?
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        // Small requests and SSE events must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        Ok(Lease {
            sender,
            connection: Some(connection),
            origin: self.clone(),
        })
    }
}

/// Every replica's pool.
#[derive(Debug, Default)]
pub(crate) struct Upstreams {
    origins: RwLock<HashMap<String, Arc<Origin>>>,
}

impl Upstreams {
    fn origin(&self, base: &str) -> Result<Arc<Origin>, String> {
        if let Some(origin) = self
            .origins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(base)
        {
            return Ok(origin.clone());
        }
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("bad replica address {base}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "bad replica address {base}: only http:// is supported"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("bad replica address {base}: no host"))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("bad replica address {base}: {e}"))?;
        let address = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.as_str()),
        };
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let mut origins = self.origins.write().unwrap_or_else(|e| e.into_inner());
        // Replicas come and go with new ports; forget those with nothing pooled.
        if origins.len() >= MAX_ORIGINS {
            origins.retain(|_, o| !o.idle.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
        }
        let origin = origins.entry(base.to_owned()).or_insert_with(|| {
            Arc::new(Origin {
                address,
                host,
                prefix,
                idle: Mutex::new(VecDeque::new()),
            })
        });
        Ok(origin.clone())
    }

    /// Sends `request` (its URI's path and query, its headers but `Host`) to the replica at
    /// `base` (`http://host:port`), on a pooled connection or a new one. The response's body is
    /// read only while the returned [`Lease`] is driven too.
    ///
    /// # Errors
    /// [`UpstreamError::Connect`] when no connection could be made (nothing was sent; a bad
    /// address counts too), [`UpstreamError::Send`] when the request failed on its way.
    pub(crate) async fn send(
        &self,
        base: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let origin = self.origin(base).map_err(UpstreamError::Connect)?;
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = if origin.prefix.is_empty() {
            Uri::from(path)
        } else {
            format!("{}{path}", origin.prefix)
                .parse()
                .map_err(|e| UpstreamError::Connect(format!("bad path for {base}: {e}")))?
        };
        parts.headers.insert(HOST, origin.host.clone());
        let mut request = Request::from_parts(parts, body);
        // Pooled connections first; one the replica closed meanwhile hands the request back
        // unsent, and the next one is tried. A new connection is the last resort.
        while let Some(mut lease) = origin.checkout() {
            match lease.exchange(request).await {
                Ok(response) => return Ok((response, lease)),
                Err(mut err) => match err.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Send(err.into_error())),
                },
            }
        }
        let mut lease = origin.connect().await?;
        match lease.exchange(request).await {
            Ok(response) => Ok((response, lease)),
            Err(mut err) => {
                let unsent = err.take_message().is_some();
                let err = err.into_error();
                if unsent {
                    // Closed before it took the request: as good as refused.
                    Err(UpstreamError::Connect(err.to_string()))
                } else {
                    Err(UpstreamError::Send(err))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_addresses_are_parsed_once() {
        let upstreams = Upstreams::default();
        let origin = upstreams.origin("http://127.0.0.1:9000").unwrap();
        assert_eq!(origin.host, "127.0.0.1:9000");
        assert!(Arc::ptr_eq(
            &origin,
            &upstreams.origin("http://127.0.0.1:9000").unwrap()
        ));
        assert!(upstreams.origin("https://127.0.0.1:9000").is_err());
        assert_eq!(
            upstreams.origin("http://engine").unwrap().address,
            "engine:80"
        );
        assert_eq!(
            upstreams.origin("http://e:1/base/").unwrap().prefix,
            "/base"
        );
        assert!(upstreams.origin("not a url").is_err());
    }
}
