//! Client-side rate limiting (`qps`, `burst`): a token bucket in front of the kube client, like
//! client-go's, so a burst of deploys (or a reconcile storm after a restart) cannot flood the API
//! server. Every request the shimlet sends takes a token: applies, deletes, lists, and each
//! (re)connection of a watch; events arriving on an open watch cost nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// A token bucket holding up to `burst` tokens, refilled at `qps` per second.
#[derive(Debug)]
struct TokenBucket {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: qps.max(f64::MIN_POSITIVE),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn try_take(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.qps).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.qps))
        }
    }
}

/// Layer adding a shared [`RateLimit`] to a service stack.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    bucket: Arc<TokenBucket>,
}

impl RateLimitLayer {
    /// `qps` requests per second on average, `burst` at once.
    pub fn new(qps: f64, burst: u32) -> Self {
        Self {
            bucket: Arc::new(TokenBucket::new(qps, burst)),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            bucket: self.bucket.clone(),
            wait: None,
            reserved: false,
        }
    }
}

/// A service that is ready only when the bucket has a token for its next request.
pub struct RateLimit<S> {
    inner: S,
    bucket: Arc<TokenBucket>,
    wait: Option<Pin<Box<Sleep>>>,
    reserved: bool,
}

impl<S> std::fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl<S, Request> Service<Request> for RateLimit<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.reserved {
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            match self.bucket.try_take() {
                Ok(()) => self.reserved = true,
                Err(delay) => self.wait = Some(Box::pin(tokio::time::sleep(delay))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.reserved = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_pass_then_requests_are_paced_at_qps() {
        let layer = RateLimitLayer::new(10.0, 3);
        let mut service = layer.layer(tower::service_fn(|n: u32| async move { Ok::<_, ()>(n) }));
        let started = Instant::now();
        let mut at = Vec::new();
        for n in 0..7 {
            let answer = service.ready().await.unwrap().call(n).await.unwrap();
            assert_eq!(answer, n);
            at.push(started.elapsed());
        }
        // Three at once, then one every 100 ms.
        assert!(
            at[..3].iter().all(|d| *d < Duration::from_millis(1)),
            "{at:?}"
        );
        for (i, d) in at[3..].iter().enumerate() {
            let expected = Duration::from_millis(100 * (i as u64 + 1));
            assert!(d.abs_diff(expected) < Duration::from_millis(5), "{at:?}");
        }
        // Clones share the bucket: a second client stack cannot double the rate.
        let mut other = layer.layer(tower::service_fn(|n: u32| async move { Ok::<_, ()>(n) }));
        let before = Instant::now();
        other.ready().await.unwrap().call(0).await.unwrap();
        assert!(before.elapsed() >= Duration::from_millis(95));
    }
}
