//! The HTTP API of xmod-shim: a thin axum layer over [`shim_core::Engine`].
//!
//! It does routing, (de)serialisation, the wire envelope, authentication, limits and metrics, and
//! nothing else: every decision about services is the engine's.
//!
//! # Wire rules (see `shared/reference/api-contract.md` and `docs/openapi.yaml`)
//! - Every JSON response is the envelope `{"code": <int>, "message": <string>, "data": <value>}`
//!   with lowercase keys; `code` is `0` on success and equals the HTTP status on failure. The real
//!   client reads only `code`, so errors from routing (404, 405), body limits (413), panics (500)
//!   and extractors are all turned into envelopes too; no response has an empty body.
//!   The exceptions are `/metrics` (Prometheus text), `/api/v1/openapi.yaml` and event streams
//!   (`text/event-stream`), which are not read by that client.
//! - `updateTime` is `YYYY-MM-DD HH:MM:SS` in **UTC**.
//! - Status words are exactly the six the client maps (`Phase::wire_word`).
//!
//! # Embedding
//! ```no_run
//! # async fn demo(engine: shim_core::Engine) -> std::io::Result<()> {
//! use shim_server::{AppState, ServerConfig};
//! let state = AppState::new(engine.clone(), ServerConfig::default());
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! let stop = async { let _ = tokio::signal::ctrl_c().await; };
//! shim_server::serve(listener, state, stop).await?;
//! engine.shutdown().await; // workloads keep running; the next start re-adopts them
//! # Ok(()) }
//! ```

mod accept;
mod access;
mod console;
mod envelope;
mod handlers;
mod metrics;
mod middleware;
mod state;
mod tls;

use std::future::Future;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{self, MethodRouter};
use tower_http::catch_panic::CatchPanicLayer;

pub use accept::Front;
pub use access::{ApiToken, Role};
pub use envelope::ApiError;
pub use metrics::HttpMetrics;
pub use state::{AppState, ServerConfig};
pub use tls::{TlsFiles, serve_app_tls};

/// Every `(method, path)` the router serves, in axum's path syntax (which OpenAPI shares).
///
/// The router is built from this table (see [`router`]), and a test checks that
/// `docs/openapi.yaml` describes exactly these pairs, so the three cannot drift apart.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/modserv/deploy"),
    ("GET", "/api/v1/modserv"),
    ("GET", "/api/v1/modserv/list"),
    ("GET", "/api/v1/gpus"),
    ("GET", "/api/v1/modserv/{serviceId}"),
    ("PUT", "/api/v1/modserv/{serviceId}"),
    ("DELETE", "/api/v1/modserv/{serviceId}"),
    ("PATCH", "/api/v1/modserv/{serviceId}"),
    ("GET", "/api/v1/modserv/{serviceId}/pipeline"),
    ("GET", "/api/v1/modserv/{serviceId}/events"),
    ("GET", "/api/v1/modserv/{serviceId}/logs"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/plugins"),
    ("GET", "/api/v1/openapi.yaml"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
];

/// The OpenAPI 3.0 description of this API, served at `GET /api/v1/openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../docs/openapi.yaml");

/// The handler of one entry of [`ROUTES`]; `None` for a pair the table does not know (a test
/// asserts there is none, so the table and this match stay in step).
fn handler_for(method: &str, path: &str) -> Option<MethodRouter<AppState>> {
    use handlers::*;
    let handler = match (method, path) {
        ("POST", "/api/v1/modserv/deploy") => routing::post(deploy),
        ("GET", "/api/v1/modserv") => routing::get(list_services),
        ("GET", "/api/v1/modserv/list") => routing::get(list_models),
        ("GET", "/api/v1/gpus") => routing::get(gpus),
        ("GET", "/api/v1/modserv/{serviceId}") => routing::get(status),
        ("PUT", "/api/v1/modserv/{serviceId}") => routing::put(update),
        ("DELETE", "/api/v1/modserv/{serviceId}") => routing::delete(delete),
        ("PATCH", "/api/v1/modserv/{serviceId}") => routing::patch(patch_service),
        ("GET", "/api/v1/modserv/{serviceId}/pipeline") => routing::get(pipeline),
        ("GET", "/api/v1/modserv/{serviceId}/events") => routing::get(events),
        ("GET", "/api/v1/modserv/{serviceId}/logs") => routing::get(logs),
        ("GET", "/api/v1/events") => routing::get(all_events),
        ("GET", "/api/v1/plugins") => routing::get(plugins),
        ("GET", "/api/v1/openapi.yaml") => routing::get(openapi),
        ("GET", "/metrics") => routing::get(metrics_text),
        ("GET", "/healthz") => routing::get(healthz),
        _ => return None,
    };
    Some(handler)
}

/// The whole API as an axum router, with envelopes for every error, auth, body limit, panic
/// catching and request metrics.
///
/// Static segments win over parameters in axum's matcher, so `/api/v1/modserv/list` is never
/// read as a service id.
pub fn router(state: AppState) -> Router {
    // Group the table by path: axum wants one MethodRouter per path.
    let mut paths: Vec<(&str, MethodRouter<AppState>)> = Vec::new();
    for &(method, path) in ROUTES {
        let Some(handler) = handler_for(method, path) else {
            tracing::error!(
                method,
                path,
                "route table entry without a handler; not served"
            );
            continue;
        };
        match paths.iter_mut().find(|(p, _)| *p == path) {
            Some((_, existing)) => {
                let merged = std::mem::take(existing).merge(handler);
                *existing = merged;
            }
            None => paths.push((path, handler)),
        }
    }
    // The web console's static pages sit beside the API (not in ROUTES: they are no API).
    let mut app = console::routes();
    for (path, handler) in paths {
        app = app.route(path, handler);
    }
    with_layers(app, state)
}

/// Fallbacks and the cross-cutting layers, around any set of routes (tests add their own).
fn with_layers(app: Router<AppState>, state: AppState) -> Router {
    // Layers added with `Router::layer` wrap every route and the fallbacks after routing, so the
    // metrics middleware sees `MatchedPath`. The last one added is the outermost.
    app.method_not_allowed_fallback(middleware::method_not_allowed)
        .fallback(middleware::not_found)
        .layer(DefaultBodyLimit::max(state.body_limit()))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        // One middleware for auth, metrics and envelopes: each `from_fn` layer costs a boxed
        // future and a clone of the inner service per request, and the status GET is hot.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::edge,
        ))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then stops accepting connections,
/// ends event streams and lets requests in flight finish (at most
/// [`ServerConfig::shutdown_grace`]).
///
/// The engine is left alone: workloads keep running, and the caller decides whether to call
/// `engine.shutdown()` afterwards.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_app(listener, state, Router::new(), shutdown).await
}

/// [`serve`] with `extra` routes beside the API, outside its envelope, auth and body limit: for
/// routers that answer in their own shape, such as the OpenAI gateway's `/v1/*` (its errors are
/// OpenAI's, not envelopes). Their paths must not overlap the API's, and `extra` must have no
/// fallback of its own.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve_app(
    listener: tokio::net::TcpListener,
    state: AppState,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_app_with(listener, state, extra, None, shutdown).await
}

/// [`serve_app`] with a [`Front`] that reads each connection first and may answer its
/// requests itself before the router sees any (the OpenAI gateway's fast path).
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve_app_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    extra: Router,
    front: Option<Front>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stopping = state.stopping().clone();
    let grace = state.shutdown_grace();
    accept::serve(
        listener,
        extra.merge(router(state)),
        front,
        stopping,
        grace,
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    async fn state() -> AppState {
        let engine = shim_core::Engine::builder()
            .config(shim_core::EngineConfig {
                gpus: Some(Vec::new()),
                ..shim_core::EngineConfig::default()
            })
            .shimlet_instance(|_| Arc::new(shim_core::testing::InstantShimlet::default()))
            .pipeline(shim_core::Pipeline::new("empty").build())
            .build()
            .await
            .unwrap();
        AppState::new(engine, ServerConfig::default())
    }

    async fn call(app: &Router, uri: &str) -> (StatusCode, serde_json::Value) {
        let response = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// Panics and error responses that handlers did not shape themselves still reach the client
    /// as envelopes, and are counted.
    #[tokio::test]
    async fn panics_and_foreign_errors_become_envelopes() {
        let state = state().await;
        let metrics = state.metrics().clone();
        let routes = Router::new()
            .route(
                "/boom",
                routing::get(|| async {
                    if true {
                        panic!("kaboom");
                    }
                }),
            )
            .route(
                "/plain",
                routing::get(|| async { (StatusCode::BAD_REQUEST, "plain words") }),
            )
            .route(
                "/empty",
                routing::get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
            );
        let app = with_layers(routes, state);

        let (status, body) = call(&app, "/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["code"], 500);
        assert!(body["message"].as_str().unwrap().contains("panicked"));

        let (status, body) = call(&app, "/plain").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            serde_json::json!({"code": 400, "message": "plain words"})
        );

        let (status, body) = call(&app, "/empty").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            serde_json::json!({"code": 503, "message": "Service Unavailable"})
        );
        assert_eq!(metrics.requests("unmatched", "GET", 500), 1);
    }

    #[test]
    fn every_route_in_the_table_has_a_handler_and_appears_once() {
        for (i, &(method, path)) in ROUTES.iter().enumerate() {
            assert!(handler_for(method, path).is_some(), "{method} {path}");
            assert!(
                !ROUTES[..i].contains(&(method, path)),
                "{method} {path} listed twice"
            );
        }
    }
}
