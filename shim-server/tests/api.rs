//! The HTTP API end to end through `router(state)`, against an engine with the instant test
//! runtime: the real client's requests replayed, every bad input, envelopes on every error.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use futures::StreamExt;
use serde_json::{Value, json};
use shim_core::testing::InstantShimlet;
use shim_core::{
    Engine, EngineConfig, FailureReason, Pipeline, PipelineContext, StepError, WorkloadSpec,
};
use shim_server::{AppState, ROUTES, ServerConfig, router};
use tempfile::TempDir;
use tower::ServiceExt;

/// The six status words the client maps.
const WORDS: [&str; 6] = [
    "pending",
    "initializing",
    "running",
    "failed",
    "terminating",
    "notExist",
];

/// The content type the real (Java) client sends.
const CLIENT_CONTENT_TYPE: &str = "application/json;charset=utf-8";

fn test_pipeline() -> Pipeline {
    Pipeline::new("test")
        .step("apply", |ctx: PipelineContext| async move {
            if ctx.spec().model_name == "broken" {
                return Err(StepError::permanent(
                    FailureReason::ModelNotFound,
                    "no such model",
                ));
            }
            let mut workload = WorkloadSpec::new(ctx.service_id(), ctx.generation(), "img");
            workload.replicas = ctx.spec().replicas();
            ctx.shimlet().apply(&workload).await?;
            Ok(())
        })
        .step("expose", |ctx: PipelineContext| async move {
            let observed = ctx.shimlet().observe(ctx.service_id()).await?;
            ctx.set_endpoint(format!(
                "{}/v1/chat/completions",
                observed.address.unwrap_or_default()
            ));
            Ok(())
        })
        .build()
}

struct Harness {
    app: Router,
    engine: Engine,
    models: TempDir,
}

async fn harness() -> Harness {
    harness_with(ServerConfig::default()).await
}

async fn harness_with(config: ServerConfig) -> Harness {
    let models = tempfile::tempdir().unwrap();
    let engine = Engine::builder()
        .config(EngineConfig {
            gpus: Some(Vec::new()),
            model_root: models.path().to_path_buf(),
            data_dir: models.path().join(".data"),
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(50),
            ..EngineConfig::default()
        })
        .shimlet_instance(|ctx| Arc::new(InstantShimlet::with_notifier(ctx.notifier)))
        .pipeline(test_pipeline())
        .build()
        .await
        .unwrap();
    let app = router(AppState::new(engine.clone(), config));
    Harness {
        app,
        engine,
        models,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn code(&self) -> i64 {
        self.body["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("code is not an integer: {}", self.body))
    }

    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or_default()
    }

    /// Asserts a failure envelope whose code equals the HTTP status.
    fn assert_error(&self, status: StatusCode) -> &Self {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.code(), i64::from(status.as_u16()), "{}", self.body);
        assert!(!self.message().is_empty(), "{}", self.body);
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/json",
            "{}",
            self.body
        );
        self
    }

    fn assert_success(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        assert_eq!(self.code(), 0, "{}", self.body);
        &self.body["data"]
    }
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    assert!(!bytes.is_empty(), "empty body with status {status}");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}), status {status}: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    Reply {
        status,
        headers,
        body,
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

/// A request as the real client sends it.
fn client_request(method: Method, uri: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, CLIENT_CONTENT_TYPE)
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn deploy(app: &Router, body: &str) -> Reply {
    send(
        app,
        client_request(Method::POST, "/api/v1/modserv/deploy", body),
    )
    .await
}

async fn deploy_ok(app: &Router, model: &str) -> String {
    let reply = deploy(app, &json!({ "modelName": model }).to_string()).await;
    reply.assert_success()["serviceId"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Polls the status route until `status` (checking every answer on the way), returns its data.
async fn wait_status(app: &Router, id: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(app, &format!("/api/v1/modserv/{id}")).await;
        let data = reply.assert_success().clone();
        let word = data["status"].as_str().unwrap();
        assert!(
            WORDS.contains(&word),
            "status word {word:?} is not one of the six"
        );
        assert_eq!(data["serviceId"], id);
        assert_update_time(&data);
        if word != "running" {
            assert_eq!(data["endpoint"], "", "endpoint must be empty until running");
        }
        if word == status {
            return data;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {status}; last: {data}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `updateTime` matches `^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$`.
fn assert_update_time(data: &Value) {
    let time = data["updateTime"].as_str().expect("updateTime is a string");
    let shape = "dddd-dd-dd dd:dd:dd";
    assert_eq!(time.len(), shape.len(), "{time}");
    for (c, s) in time.chars().zip(shape.chars()) {
        match s {
            'd' => assert!(c.is_ascii_digit(), "{time}"),
            other => assert_eq!(c, other, "{time}"),
        }
    }
}

#[tokio::test]
async fn the_real_clients_requests_replayed() {
    let h = harness().await;
    // Exactly what LocalModelHandler sends: four fields, charset content type.
    let body = r#"{"modelName":"Qwen2.5-7B-Instruct","replicaCount":2,"resourceRequirements":{"acceleratorCount":0},"contextLength":8192}"#;
    let reply = deploy(&h.app, body).await;
    let data = reply.assert_success();
    assert_eq!(reply.message(), "success");
    let id = data["serviceId"].as_str().unwrap().to_string();
    assert!(!id.is_empty());

    let running = wait_status(&h.app, &id, "running").await;
    let endpoint = running["endpoint"].as_str().unwrap();
    assert!(endpoint.ends_with("/v1/chat/completions"), "{endpoint}");
    assert!(endpoint.starts_with("http://"), "{endpoint}");
    assert_eq!(running["modelName"], "Qwen2.5-7B-Instruct");
    assert_eq!(running["desiredReplicas"], 2);
    assert_eq!(running["readyReplicas"], 2);
    assert!(running.get("reason").is_none(), "{running}");

    // The client updates with the same body shape, then deletes.
    let reply = send(
        &h.app,
        client_request(
            Method::PUT,
            &format!("/api/v1/modserv/{id}"),
            r#"{"modelName":"Qwen2.5-7B-Instruct","replicaCount":1}"#,
        ),
    )
    .await;
    assert_eq!(reply.assert_success()["serviceId"], id.as_str());
    let running = wait_status(&h.app, &id, "running").await;
    assert_eq!(running["generation"], 2);
    assert_eq!(running["desiredReplicas"], 1);

    let reply = send(
        &h.app,
        client_request(Method::DELETE, &format!("/api/v1/modserv/{id}"), ""),
    )
    .await;
    assert_eq!(reply.assert_success()["serviceId"], id.as_str());
    let gone = wait_status(&h.app, &id, "notExist").await;
    assert_eq!(gone["endpoint"], "");

    // Gone for good: mutations now say so.
    let reply = send(
        &h.app,
        client_request(Method::DELETE, &format!("/api/v1/modserv/{id}"), ""),
    )
    .await;
    reply.assert_error(StatusCode::NOT_FOUND);
    assert_eq!(reply.message(), format!("service {id} does not exist"));
}

#[tokio::test]
async fn lenient_bodies_are_accepted() {
    let h = harness().await;
    for body in [
        r#"{"modelName":"m","resourceRequirements":{}}"#,
        r#"{"modelName":"m","unknownField":{"nested":[1,2]},"another":true}"#,
        r#"{"modelName":"m","resourceRequirements":null,"env":null,"replicaCount":null}"#,
        r#"{"modelName":"m","resourceRequirements":{"cpu":4,"memory":"16Gi","acceleratorType":"NVIDIA"}}"#,
        r#"{"modelName":"m","env":[{"key":"A","value":"1"},{"key":"B"}]}"#,
    ] {
        deploy(&h.app, body).await.assert_success();
    }
    // Plain application/json and no content type at all are fine too.
    for content_type in [
        Some("application/json"),
        Some("Application/JSON; charset=UTF-8"),
        None,
    ] {
        let mut request = Request::post("/api/v1/modserv/deploy");
        if let Some(ct) = content_type {
            request = request.header(header::CONTENT_TYPE, ct);
        }
        let reply = send(
            &h.app,
            request.body(Body::from(r#"{"modelName":"m"}"#)).unwrap(),
        )
        .await;
        reply.assert_success();
    }
}

#[tokio::test]
async fn every_bad_body_is_a_400_envelope_naming_the_problem() {
    let h = harness().await;
    // (body, substring of the message, field named in data.errors when validation caught it)
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("{", "malformed JSON", None),
        ("", "malformed JSON", None),
        (r#"{"modelName":"m"} trailing"#, "malformed JSON", None),
        (
            r#"{"modelName":"m","resourceRequirements":{"acceleratorCount":"x"}}"#,
            r#"resourceRequirements.acceleratorCount: invalid type: string "x", expected i64"#,
            None,
        ),
        (
            r#"{"modelName":"m","replicaCount":1.5}"#,
            "replicaCount: invalid type",
            None,
        ),
        (r#"["m"]"#, "request body must be a JSON object", None),
        (r#"{}"#, "modelName: is required", Some("modelName")),
        (r#"{"replicaCount":1}"#, "modelName", Some("modelName")),
        (
            r#"{"modelName":"../../etc"}"#,
            "modelName",
            Some("modelName"),
        ),
        (r#"{"modelName":"a/b"}"#, "modelName", Some("modelName")),
        (
            r#"{"modelName":"m","replicaCount":-1}"#,
            "replicaCount: must be >= 0",
            Some("replicaCount"),
        ),
        (
            r#"{"modelName":"m","resourceRequirements":{"cpu":"lots"}}"#,
            "resourceRequirements.cpu",
            Some("resourceRequirements.cpu"),
        ),
        (
            r#"{"modelName":"m","env":[{"key":"A","value":"1"},{"key":"A","value":"2"}]}"#,
            "appears twice",
            Some("env[1].key"),
        ),
        (
            r#"{"modelName":"m","modelFileDir":"/etc"}"#,
            "outside the allowed model roots",
            Some("modelFileDir"),
        ),
    ];
    for (body, needle, field) in cases {
        let reply = deploy(&h.app, body).await;
        reply.assert_error(StatusCode::BAD_REQUEST);
        assert!(
            reply.message().contains(needle),
            "{body}: {:?} lacks {needle:?}",
            reply.message()
        );
        match field {
            Some(field) => {
                assert!(
                    reply.message().starts_with("invalid request: "),
                    "{}",
                    reply.message()
                );
                let errors = reply.body["data"]["errors"].as_array().unwrap();
                assert!(
                    errors
                        .iter()
                        .any(|e| e["field"] == *field && e["message"].is_string()),
                    "{body}: {errors:?}"
                );
            }
            None => assert!(reply.body.get("data").is_none(), "{}", reply.body),
        }
    }
    assert!(
        h.engine.list().is_empty(),
        "no bad request may create a service"
    );

    // The same rules on update.
    let id = deploy_ok(&h.app, "m").await;
    let reply = send(
        &h.app,
        client_request(
            Method::PUT,
            &format!("/api/v1/modserv/{id}"),
            r#"{"modelName":".."}"#,
        ),
    )
    .await;
    reply.assert_error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn bodies_over_the_limit_and_foreign_content_types_are_refused_with_envelopes() {
    let h = harness_with(ServerConfig {
        body_limit_bytes: 1024,
        ..ServerConfig::default()
    })
    .await;
    let big = json!({ "modelName": "m", "padding": "x".repeat(2000) }).to_string();
    let reply = deploy(&h.app, &big).await;
    reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE);

    // The default limit is 1 MiB.
    let h = harness().await;
    let big = json!({ "modelName": "m", "padding": "x".repeat(1024 * 1024 + 1) }).to_string();
    deploy(&h.app, &big)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE);
    let fine = json!({ "modelName": "m", "padding": "x".repeat(512 * 1024) }).to_string();
    deploy(&h.app, &fine).await.assert_success();

    let reply = send(
        &h.app,
        Request::post("/api/v1/modserv/deploy")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(r#"{"modelName":"m"}"#))
            .unwrap(),
    )
    .await;
    reply.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn unknown_services_read_as_not_exist_and_cannot_be_changed() {
    let h = harness().await;
    let reply = get(&h.app, "/api/v1/modserv/deadbeef").await;
    let data = reply.assert_success();
    assert_eq!(data["status"], "notExist");
    assert_eq!(data["endpoint"], "");
    assert_eq!(data["serviceId"], "deadbeef");
    assert_update_time(data);

    let reply = send(
        &h.app,
        client_request(
            Method::PUT,
            "/api/v1/modserv/deadbeef",
            r#"{"modelName":"m"}"#,
        ),
    )
    .await;
    reply.assert_error(StatusCode::NOT_FOUND);
    assert_eq!(reply.message(), "service deadbeef does not exist");
    let reply = send(
        &h.app,
        client_request(Method::DELETE, "/api/v1/modserv/deadbeef", ""),
    )
    .await;
    reply.assert_error(StatusCode::NOT_FOUND);
    for uri in [
        "/api/v1/modserv/deadbeef/pipeline",
        "/api/v1/modserv/deadbeef/events",
        "/api/v1/modserv/deadbeef/logs",
    ] {
        get(&h.app, uri).await.assert_error(StatusCode::NOT_FOUND);
    }

    // Ids that no generator makes never reach the engine.
    let long = "a".repeat(65);
    for bad in ["bad.id", "a%20b", "%2E%2E", long.as_str()] {
        let reply = get(&h.app, &format!("/api/v1/modserv/{bad}")).await;
        reply.assert_error(StatusCode::BAD_REQUEST);
        assert!(
            reply.message().contains("invalid service id"),
            "{}",
            reply.message()
        );
    }
}

#[tokio::test]
async fn routing_errors_are_envelopes_too() {
    let h = harness().await;
    let reply = get(&h.app, "/no/such/route").await;
    reply.assert_error(StatusCode::NOT_FOUND);
    assert!(reply.message().contains("/no/such/route"));

    for (method, uri) in [
        (Method::GET, "/api/v1/modserv/deploy"),
        // PATCH is served on the service itself (a merge patch), not on its pipeline.
        (Method::PATCH, "/api/v1/modserv/abc/pipeline"),
        (Method::POST, "/api/v1/modserv/list"),
        (Method::DELETE, "/healthz"),
    ] {
        let reply = send(
            &h.app,
            Request::builder()
                .method(method.clone())
                .uri(uri)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        reply.assert_error(StatusCode::METHOD_NOT_ALLOWED);
        assert!(reply.headers.contains_key(header::ALLOW), "{method} {uri}");
    }

    // A bad query parameter is an envelope, not axum's plain-text rejection.
    let id = deploy_ok(&h.app, "m").await;
    let reply = get(&h.app, &format!("/api/v1/modserv/{id}/events?limit=lots")).await;
    reply.assert_error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn mutations_need_the_bearer_token_when_one_is_configured() {
    let h = harness_with(ServerConfig {
        auth_token: Some("s3cret".into()),
        ..ServerConfig::default()
    })
    .await;
    let body = r#"{"modelName":"m"}"#;
    let reply = deploy(&h.app, body).await;
    reply.assert_error(StatusCode::UNAUTHORIZED);
    assert_eq!(reply.headers[header::WWW_AUTHENTICATE], "Bearer");

    for auth in ["Bearer wrong", "Basic s3cret", "Bearer s3cret2", "s3cret"] {
        let mut request = client_request(Method::POST, "/api/v1/modserv/deploy", body);
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, auth.parse().unwrap());
        send(&h.app, request)
            .await
            .assert_error(StatusCode::UNAUTHORIZED);
    }
    let mut request = client_request(Method::POST, "/api/v1/modserv/deploy", body);
    request
        .headers_mut()
        .insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
    let id = send(&h.app, request).await.assert_success()["serviceId"]
        .as_str()
        .unwrap()
        .to_string();

    // Reads stay open; deletes need the token too.
    get(&h.app, &format!("/api/v1/modserv/{id}"))
        .await
        .assert_success();
    get(&h.app, "/api/v1/modserv/list").await.assert_success();
    let reply = send(
        &h.app,
        client_request(Method::DELETE, &format!("/api/v1/modserv/{id}"), ""),
    )
    .await;
    reply.assert_error(StatusCode::UNAUTHORIZED);
    assert!(h.engine.get(&id).is_some());
}

fn mkdir(root: &Path, name: &str) {
    std::fs::create_dir_all(root.join(name)).unwrap();
}

#[tokio::test]
async fn list_shows_the_model_directories_under_the_model_root() {
    let h = harness().await;
    let root = h.models.path();
    mkdir(root, "Qwen2.5-7B-Instruct");
    mkdir(root, "llama-3-8b");
    mkdir(root, ".cache");
    std::fs::write(root.join("README.md"), "not a model").unwrap();
    let data = get(&h.app, "/api/v1/modserv/list")
        .await
        .assert_success()
        .clone();
    let root = std::path::absolute(root).unwrap();
    // No model files yet: the metadata is null.
    let unknown = json!({"format": null, "architecture": null, "parameters": null,
                         "quantization": null, "weightsBytes": null, "maxContextLength": null});
    let entry = |name: &str| {
        let mut e = unknown.clone();
        e["modelName"] = json!(name);
        e["modelPath"] = json!(root.join(name).to_str().unwrap());
        e
    };
    assert_eq!(
        data,
        json!([entry("Qwen2.5-7B-Instruct"), entry("llama-3-8b")])
    );
    // With a safetensors shard (12 bf16 parameters) and config.json, the headers are read.
    let header = br#"{"w":{"dtype":"BF16","shape":[3,4],"data_offsets":[0,24]}}"#;
    let mut shard = (header.len() as u64).to_le_bytes().to_vec();
    shard.extend_from_slice(header);
    shard.extend_from_slice(&[0u8; 24]);
    std::fs::write(root.join("llama-3-8b/model.safetensors"), shard).unwrap();
    std::fs::write(
        root.join("llama-3-8b/config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"max_position_embeddings":8192,"torch_dtype":"bfloat16"}"#,
    )
    .unwrap();
    let listed = get(&h.app, "/api/v1/modserv/list")
        .await
        .assert_success()
        .clone();
    let mut expected = entry("llama-3-8b");
    for (k, v) in [
        ("format", json!("safetensors")),
        ("architecture", json!("LlamaForCausalLM")),
        ("parameters", json!(12)),
        ("quantization", json!("BF16")),
        ("weightsBytes", json!(24)),
        ("maxContextLength", json!(8192)),
    ] {
        expected[k] = v;
    }
    assert_eq!(listed[1], expected);
    // Every listed name deploys.
    for model in data.as_array().unwrap() {
        deploy_ok(&h.app, model["modelName"].as_str().unwrap()).await;
    }

    // A model root that does not exist yet is an empty list, not an error.
    let h = harness_with(ServerConfig {
        model_root: Some(h.models.path().join("missing")),
        ..ServerConfig::default()
    })
    .await;
    let data = get(&h.app, "/api/v1/modserv/list")
        .await
        .assert_success()
        .clone();
    assert_eq!(data, json!([]));
}

#[tokio::test]
async fn services_are_listed_with_their_status() {
    let h = harness().await;
    let a = deploy_ok(&h.app, "a").await;
    let b = deploy_ok(&h.app, "broken").await;
    wait_status(&h.app, &a, "running").await;
    let failed = wait_status(&h.app, &b, "failed").await;
    assert_eq!(failed["reason"], "ModelNotFound");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("no such model")
    );
    assert_eq!(failed["endpoint"], "");

    let data = get(&h.app, "/api/v1/modserv")
        .await
        .assert_success()
        .clone();
    let listed: Vec<(&str, &str)> = data
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["serviceId"].as_str().unwrap(),
                s["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&(a.as_str(), "running")));
    assert!(listed.contains(&(b.as_str(), "failed")));
}

#[tokio::test]
async fn pipeline_progress_shows_each_step() {
    let h = harness().await;
    let id = deploy_ok(&h.app, "m").await;
    // Right after the deploy every step is listed, even before a worker starts.
    let data = get(&h.app, &format!("/api/v1/modserv/{id}/pipeline"))
        .await
        .assert_success()
        .clone();
    assert_eq!(data["serviceId"], id.as_str());
    assert_eq!(data["pipeline"], "test");
    assert_eq!(data["generation"], 1);
    let names: Vec<&str> = data["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["apply", "expose"]);

    wait_status(&h.app, &id, "running").await;
    let data = get(&h.app, &format!("/api/v1/modserv/{id}/pipeline"))
        .await
        .assert_success()
        .clone();
    for step in data["steps"].as_array().unwrap() {
        assert_eq!(step["state"], "succeeded", "{step}");
        assert!(step["attempts"].as_u64().unwrap() >= 1);
        assert!(step.get("durationMs").is_some());
    }
}

#[tokio::test]
async fn events_come_as_json_history_or_as_a_stream() {
    let h = harness().await;
    let id = deploy_ok(&h.app, "m").await;
    wait_status(&h.app, &id, "running").await;

    let data = get(&h.app, &format!("/api/v1/modserv/{id}/events"))
        .await
        .assert_success()
        .clone();
    let events = data["events"].as_array().unwrap();
    assert!(events.len() >= 4, "{events:?}");
    assert_eq!(events[0]["type"], "accepted");
    assert!(events.iter().all(|e| e["serviceId"] == id.as_str()));
    let limited = get(&h.app, &format!("/api/v1/modserv/{id}/events?limit=2"))
        .await
        .assert_success()
        .clone();
    assert_eq!(limited["events"].as_array().unwrap().len(), 2);

    // As server-sent events: the history first, then what happens next, live.
    let response = h
        .app
        .clone()
        .oneshot(
            Request::get(format!("/api/v1/modserv/{id}/events?limit=1"))
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
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("an event in time")
        .expect("stream open")
        .unwrap();
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    assert!(text.starts_with("data: {"), "{text}");

    // Delete: the stream carries the teardown and ends once the service is gone.
    let reply = send(
        &h.app,
        client_request(Method::DELETE, &format!("/api/v1/modserv/{id}"), ""),
    )
    .await;
    reply.assert_success();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fut = body.next();
        match tokio::time::timeout(deadline - Instant::now(), fut).await {
            Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
            Ok(None) => break,
            Err(_) => panic!("stream did not end after the delete: {text}"),
        }
    }
    assert!(text.contains(r#""to":"terminating""#), "{text}");
    assert!(text.contains(r#""to":"deleted""#), "{text}");
}

#[tokio::test]
async fn logs_the_runtime_cannot_give_are_a_501() {
    let h = harness().await;
    let id = deploy_ok(&h.app, "m").await;
    let reply = get(&h.app, &format!("/api/v1/modserv/{id}/logs?tail=5")).await;
    reply.assert_error(StatusCode::NOT_IMPLEMENTED);
    assert!(reply.message().contains("logs"), "{}", reply.message());
}

#[tokio::test]
async fn dry_runs_render_through_the_runtime_and_deploy_nothing() {
    let h = harness().await;
    let reply = deploy_at(
        &h.app,
        "/api/v1/modserv/deploy?dryRun=true",
        r#"{"modelName":"m","replicaCount":2}"#,
    )
    .await;
    let data = reply.assert_success().clone();
    assert_eq!(data["workloads"][0]["replicas"], 2, "{data}");
    assert_eq!(data["manifests"][0]["instant"]["replicas"], 2, "{data}");
    assert!(
        data["steps"].as_array().is_some_and(|s| !s.is_empty()),
        "{data}"
    );
    let reply = deploy_at(
        &h.app,
        "/api/v1/modserv/deploy?dryRun=true",
        r#"{"modelName":""}"#,
    )
    .await;
    reply.assert_error(StatusCode::BAD_REQUEST);
    assert!(h.engine.list().is_empty(), "a dry run must not deploy");
    let reply = send(
        &h.app,
        client_request(
            Method::PUT,
            "/api/v1/modserv/abcdef12?dryRun=true",
            r#"{"modelName":"m"}"#,
        ),
    )
    .await;
    reply.assert_error(StatusCode::NOT_FOUND);
    deploy_at(
        &h.app,
        "/api/v1/modserv/deploy?dryRun=false",
        r#"{"modelName":"m"}"#,
    )
    .await
    .assert_success();
}

async fn deploy_at(app: &Router, uri: &str, body: &str) -> Reply {
    send(app, client_request(Method::POST, uri, body)).await
}

#[tokio::test]
async fn health_plugins_and_openapi_are_served() {
    let h = harness().await;
    let reply = get(&h.app, "/healthz").await;
    assert_eq!(reply.code(), 0);
    assert_eq!(reply.message(), "ok");
    assert_eq!(
        reply.body["data"],
        json!({"shimlet": "custom", "pipeline": "test", "leader": true})
    );

    let data = get(&h.app, "/api/v1/plugins")
        .await
        .assert_success()
        .clone();
    assert!(
        data["shimlets"].is_array() && data["pipelines"].is_array(),
        "{data}"
    );

    let response = h
        .app
        .clone()
        .oneshot(
            Request::get("/api/v1/openapi.yaml")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(&bytes[..], shim_server::OPENAPI_YAML.as_bytes());
}

#[tokio::test]
async fn metrics_expose_services_reconciles_and_requests() {
    let h = harness().await;
    let id = deploy_ok(&h.app, "m").await;
    wait_status(&h.app, &id, "running").await;
    get(&h.app, "/api/v1/modserv/other").await.assert_success();
    get(&h.app, "/nope").await;
    get(&h.app, "/api/v1/modserv/deploy")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED);

    let response = h
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    for needle in [
        "xmod_shim_services{phase=\"running\"} 1",
        "xmod_shim_services{phase=\"pending\"} 0",
        "xmod_shim_services{phase=\"deleted\"} 0",
        "# TYPE xmod_shim_reconcile_total counter",
        "xmod_shim_reconcile_errors_total 0",
        "# TYPE xmod_shim_reconcile_duration_seconds histogram",
        "xmod_shim_reconcile_duration_seconds_bucket{le=\"0.001\"}",
        "xmod_shim_reconcile_duration_seconds_bucket{le=\"+Inf\"}",
        "xmod_shim_reconcile_duration_seconds_sum ",
        "xmod_shim_reconcile_duration_seconds_count ",
        "xmod_shim_http_requests_total{route=\"/api/v1/modserv/deploy\",method=\"POST\",code=\"200\"} 1",
        "xmod_shim_http_requests_total{route=\"/api/v1/modserv/{serviceId}\",method=\"GET\",code=\"200\"}",
        "xmod_shim_http_requests_total{route=\"unmatched\",method=\"GET\",code=\"404\"} 1",
        "xmod_shim_http_requests_total{route=\"/api/v1/modserv/deploy\",method=\"GET\",code=\"405\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains(&id), "ids must not become label values");
    // Every sample line parses as `name{labels} number`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    // The histogram's buckets never decrease.
    let buckets: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("xmod_shim_reconcile_duration_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 9);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
}

#[tokio::test]
async fn a_deleted_service_keeps_its_update_time_and_model_in_not_exist() {
    let h = harness().await;
    let id = deploy_ok(&h.app, "m").await;
    wait_status(&h.app, &id, "running").await;
    send(
        &h.app,
        client_request(Method::DELETE, &format!("/api/v1/modserv/{id}"), ""),
    )
    .await
    .assert_success();
    let gone = wait_status(&h.app, &id, "notExist").await;
    assert_eq!(gone["modelName"], "m");
    let again = get(&h.app, &format!("/api/v1/modserv/{id}")).await;
    assert_eq!(
        again.assert_success()["updateTime"],
        gone["updateTime"],
        "the time of deletion, not the time of asking"
    );
}

/// docs/openapi.yaml describes exactly the routes the router serves.
#[test]
fn openapi_document_matches_the_route_table() {
    let doc: serde_yaml::Value = serde_yaml::from_str(shim_server::OPENAPI_YAML).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.0"),
        "OpenAPI 3.0 expected"
    );
    let methods = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().expect("paths").iter() {
        let path = path.as_str().unwrap();
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if methods.contains(&method) {
                documented.insert((method.to_ascii_uppercase(), path.to_string()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
}

/// Every route in the table answers (not with the router's own 404 or 405).
#[tokio::test]
async fn every_route_in_the_table_is_served() {
    let h = harness().await;
    for (method, path) in ROUTES {
        let uri = path.replace("{serviceId}", "deadbeef");
        let response = h
            .app
            .clone()
            .oneshot(
                Request::builder()
                    .method(*method)
                    .uri(&uri)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from("{}"))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        if status == StatusCode::NOT_FOUND {
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            assert!(
                body["message"].as_str().unwrap().contains("does not exist"),
                "{method} {path} is not routed: {body}"
            );
        }
    }
}

/// `serve` stops on its signal even while an event stream is open.
#[tokio::test]
async fn serve_shuts_down_gracefully_with_open_streams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness().await;
    let id = deploy_ok(&h.app, "m").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = AppState::new(h.engine.clone(), ServerConfig::default());
    let server = tokio::spawn(shim_server::serve(listener, state, async move {
        let _ = stopped.await;
    }));

    // A plain request over TCP.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""code":0"#), "{answer}");

    // An open event stream.
    let mut sse = tokio::net::TcpStream::connect(addr).await.unwrap();
    sse.write_all(
        format!(
            "GET /api/v1/modserv/{id}/events HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 512];
    let n = sse.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("text/event-stream"));

    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returned after the signal")
        .unwrap();
    assert!(result.is_ok());
    // The engine was left alone: the service is still there.
    assert!(h.engine.get(&id).is_some());
}
