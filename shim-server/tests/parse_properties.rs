//! Property test of request parsing: whatever body arrives at deploy, update, patch or a dry
//! run (random JSON shaped like a deploy request with wrong types, odd numbers and strange
//! strings, or random bytes), the answer is never a server error or a panic: a success, or a 4xx
//! envelope whose code equals the HTTP status and whose message says what is wrong.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use shim_core::testing::InstantShimlet;
use shim_core::{Engine, EngineConfig, Pipeline, PipelineContext, WorkloadSpec};
use shim_server::{AppState, ServerConfig, router};
use tower::ServiceExt;

/// Scalars of every JSON type, with the edge cases parsers trip on.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(i64::MAX),
            Just(i64::MIN)
        ]
        .prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        Just(json!(1e300)),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just(""),
            Just("../etc"),
            Just("a/b"),
            Just("qwen"),
            Just("Qwen2.5-7B"),
            Just("16Gi"),
            Just("500m"),
            Just("-1"),
            Just("\u{0}"),
            Just("名字"),
        ]
        .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A deploy-shaped body: the real field names with values of any type, some left out.
fn deploy_body() -> impl Strategy<Value = Value> {
    let fields = [
        "modelName",
        "modelFileDir",
        "replicaCount",
        "contextLength",
        "engine",
        "env",
        "resourceRequirements",
    ];
    let requirements = proptest::collection::btree_map(
        prop_oneof![
            Just("acceleratorCount".to_string()),
            Just("acceleratorType".to_string()),
            Just("cpu".to_string()),
            Just("memory".to_string()),
            ".{0,6}".prop_map(String::from),
        ],
        value(),
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()));
    let env = proptest::collection::vec(
        proptest::collection::btree_map(
            prop_oneof![Just("key".to_string()), Just("value".to_string())],
            value(),
            0..3,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect())),
        0..3,
    )
    .prop_map(Value::Array);
    (
        proptest::sample::subsequence(fields.to_vec(), 0..=fields.len()),
        value(),
        requirements,
        env,
        prop_oneof![scalar(), Just(json!("qwen"))],
    )
        .prop_map(|(present, any, requirements, env, name)| {
            let mut body = Map::new();
            for field in present {
                let v = match field {
                    "resourceRequirements" => requirements.clone(),
                    "env" => env.clone(),
                    "modelName" => name.clone(),
                    _ => any.clone(),
                };
                body.insert(field.to_string(), v);
            }
            Value::Object(body)
        })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => deploy_body().prop_map(|v| v.to_string().into_bytes()),
        1 => value().prop_map(|v| v.to_string().into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

async fn app() -> (Router, String) {
    let engine = Engine::builder()
        .config(EngineConfig {
            gpus: Some(Vec::new()),
            ..EngineConfig::default()
        })
        .shimlet_instance(|ctx| Arc::new(InstantShimlet::with_notifier(ctx.notifier)))
        .pipeline(
            Pipeline::new("test")
                .step("apply", |ctx: PipelineContext| async move {
                    let mut w = WorkloadSpec::new(ctx.service_id(), ctx.generation(), "img");
                    w.replicas = ctx.spec().replicas();
                    ctx.shimlet().apply(&w).await?;
                    Ok(())
                })
                .build(),
        )
        .build()
        .await
        .unwrap();
    let id = engine
        .deploy(shim_core::DeploySpec::named("existing"))
        .await
        .unwrap();
    (router(AppState::new(engine, ServerConfig::default())), id)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_body_makes_a_server_error(body in body(), route in 0usize..4) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (app, id) = app().await;
            let (method, uri) = match route {
                0 => (Method::POST, "/api/v1/modserv/deploy".to_string()),
                1 => (Method::POST, "/api/v1/modserv/deploy?dryRun=true".to_string()),
                2 => (Method::PUT, format!("/api/v1/modserv/{id}")),
                _ => (Method::PATCH, format!("/api/v1/modserv/{id}")),
            };
            let request = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header("Content-Type", "application/json;charset=utf-8")
                .body(Body::from(body.clone()))
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
            let text = String::from_utf8_lossy(&body);
            prop_assert!(
                !status.is_server_error(),
                "{method} {uri} with {text:?} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
            let envelope: Value = serde_json::from_slice(&bytes).map_err(|e| {
                TestCaseError::fail(format!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
            })?;
            if status.is_success() {
                prop_assert_eq!(&envelope["code"], 0);
            } else {
                prop_assert_eq!(envelope["code"].as_u64(), Some(u64::from(status.as_u16())));
                prop_assert!(
                    envelope["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{envelope}"
                );
            }
            Ok(())
        })?;
    }
}
