//! A full disk during a deploy, through the HTTP API: the answer is a 507 envelope, and nothing
//! of the request remains (no service is listed, none runs). The store is a double that fails
//! every write with ENOSPC, since this machine's disk cannot be filled for a test.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use shim_core::store::{Ack, Store};
use shim_core::testing::InstantShimlet;
use shim_core::{
    Engine, EngineConfig, Error, Event, Pipeline, PipelineContext, ServiceRecord, Shimlet,
    WorkloadSpec,
};
use shim_server::{AppState, ServerConfig, router};
use tower::ServiceExt;

/// Every write fails: no space left on device.
struct FullDisk;

fn enospc() -> Ack {
    Box::pin(async { Err(Error::store(std::io::Error::from_raw_os_error(28))) })
}

#[async_trait::async_trait]
impl Store for FullDisk {
    fn save(&self, _: &std::sync::Arc<ServiceRecord>) -> Ack {
        enospc()
    }
    fn append_event(&self, _: &Event) -> Ack {
        enospc()
    }
    async fn load_live(&self) -> shim_core::Result<Vec<ServiceRecord>> {
        Ok(Vec::new())
    }
    async fn get(&self, _: &str) -> shim_core::Result<Option<ServiceRecord>> {
        Ok(None)
    }
    async fn events(&self, _: &str, _: usize) -> shim_core::Result<Vec<Event>> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_deploy_on_a_full_disk_is_a_507_and_leaves_nothing() {
    let runtime = Arc::new(InstantShimlet::default());
    let shimlet = runtime.clone();
    let engine = Engine::builder()
        .config(EngineConfig {
            gpus: Some(Vec::new()),
            ..EngineConfig::default()
        })
        .store(Arc::new(FullDisk))
        .shimlet_instance(move |_| shimlet)
        .pipeline(
            Pipeline::new("test")
                .step("apply", |ctx: PipelineContext| async move {
                    let w = WorkloadSpec::new(ctx.service_id(), ctx.generation(), "img");
                    ctx.shimlet().apply(&w).await?;
                    Ok(())
                })
                .build(),
        )
        .build()
        .await
        .unwrap();
    let app = router(AppState::new(engine.clone(), ServerConfig::default()));
    let response = app
        .clone()
        .oneshot(
            Request::post("/api/v1/modserv/deploy")
                .header("Content-Type", "application/json")
                .body(Body::from(r#"{"modelName":"qwen"}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INSUFFICIENT_STORAGE);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let envelope: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(envelope["code"], 507, "{envelope}");
    assert!(
        envelope["message"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{envelope}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(engine.list().is_empty(), "a refused deploy is listed");
    assert!(
        runtime.list().await.unwrap().is_empty(),
        "a refused deploy runs"
    );
}
