//! The console's server side: the embedded pages under `/ui` and the stream of every service's
//! events it follows (`GET /api/v1/events`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures::StreamExt;
use shim_core::testing::InstantShimlet;
use shim_core::{Engine, EngineConfig, Pipeline};
use shim_server::{AppState, ServerConfig, router};
use tower::ServiceExt;

async fn app() -> (axum::Router, Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder()
        .config(EngineConfig {
            gpus: Some(Vec::new()),
            model_root: dir.path().to_path_buf(),
            data_dir: dir.path().join(".data"),
            ..EngineConfig::default()
        })
        .shimlet_instance(|_| Arc::new(InstantShimlet::default()))
        .pipeline(Pipeline::new("empty").build())
        .build()
        .await
        .unwrap();
    let app = router(AppState::new(engine.clone(), ServerConfig::default()));
    (app, engine, dir)
}

#[tokio::test]
async fn the_console_page_and_its_modules_are_served_from_the_binary() {
    let (app, _engine, _dir) = app().await;
    let response = app
        .clone()
        .oneshot(Request::get("/ui").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let html = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        html.contains(r#"<script type="module" src="ui/app.js">"#),
        "{html}"
    );

    let response = app
        .clone()
        .oneshot(Request::get("/ui/app.js").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );

    // An unknown asset is a 404 envelope like any other unknown path.
    let response = app
        .oneshot(Request::get("/ui/nope.js").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_all_services_stream_carries_every_service_s_events() {
    let (app, engine, _dir) = app().await;
    let response = app
        .oneshot(
            Request::get("/api/v1/events")
                .header(header::ACCEPT, "text/event-stream")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = response.into_body().into_data_stream();

    let a = engine
        .deploy(shim_core::DeploySpec::named("alpha"))
        .await
        .unwrap();
    let b = engine
        .deploy(shim_core::DeploySpec::named("beta"))
        .await
        .unwrap();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(text.contains(&format!(r#""serviceId":"{a}""#))
        && text.contains(&format!(r#""serviceId":"{b}""#))
        && text.matches(r#""to":"running""#).count() >= 2)
    {
        let chunk = tokio::time::timeout(deadline - Instant::now(), body.next())
            .await
            .unwrap_or_else(|_| panic!("both services' events in time: {text}"))
            .expect("stream open")
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // Every message is one Event as JSON.
    for line in text.lines().filter(|l| l.starts_with("data: ")) {
        let event: serde_json::Value = serde_json::from_str(&line[6..]).unwrap();
        assert!(
            event["serviceId"].is_string() && event["type"].is_string(),
            "{line}"
        );
    }
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let response = app
        .clone()
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .header(header::CONTENT_TYPE, "application/merge-patch+json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// The console scales with a merge patch: only the named field changes, the rest of the stored
/// spec (environment included, which the status never shows) is kept.
#[tokio::test]
async fn a_merge_patch_changes_one_field_and_keeps_the_rest_of_the_spec() {
    let (app, engine, _dir) = app().await;
    let spec: shim_core::DeploySpec = serde_json::from_value(serde_json::json!({
        "modelName": "alpha", "replicaCount": 1, "contextLength": 4096,
        "env": [{"key": "HF_TOKEN", "value": "secret"}]
    }))
    .unwrap();
    let id = engine.deploy(spec).await.unwrap();

    let (status, body) = call(
        &app,
        "PATCH",
        &format!("/api/v1/modserv/{id}"),
        r#"{"replicaCount": 3}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["serviceId"], id.as_str());
    let record = engine.get(&id).unwrap();
    assert_eq!(record.generation, 2);
    assert_eq!(record.spec.replica_count, Some(3));
    assert_eq!(record.spec.context_length, Some(4096));
    assert_eq!(record.spec.env.len(), 1);
    assert_eq!(record.spec.env[0].value, "secret");

    // `null` removes a field (back to the default).
    let (status, _) = call(
        &app,
        "PATCH",
        &format!("/api/v1/modserv/{id}"),
        r#"{"contextLength": null}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(engine.get(&id).unwrap().spec.context_length, None);

    // A wrong type is named like in a PUT; nothing changes.
    let (status, body) = call(
        &app,
        "PATCH",
        &format!("/api/v1/modserv/{id}"),
        r#"{"replicaCount": "many"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("replicaCount:"),
        "{body}"
    );
    assert_eq!(engine.get(&id).unwrap().generation, 3);

    let (status, _) = call(&app, "PATCH", &format!("/api/v1/modserv/{id}"), "[1]").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = call(
        &app,
        "PATCH",
        "/api/v1/modserv/nosuchid",
        r#"{"replicaCount": 2}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}
