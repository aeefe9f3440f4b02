//! Tokens with roles and the audit log, through the real binary.

mod common;

use common::{Reaper, Shim, free_port, get};
use serde_json::{Value, json};

fn post(shim: &Shim, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = common::client()
        .post(shim.url(path))
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

/// A viewer reads but may not change; an operator changes; reads stay open for the existing
/// client; every changing request, allowed or refused, is in the audit log with who, what,
/// which service and the result.
#[test]
fn viewers_read_operators_change_and_every_change_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("demo")).unwrap();
    // The operator's deploy starts a mock engine, which outlives the shim by design.
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
    let config = dir.path().join("shim.yaml");
    std::fs::write(
        &config,
        "service:\n  tokens:\n    - {name: dashboard, token: view-123, role: viewer}\n    - {name: ci-bot, token: op-456, role: operator}\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let shim = Shim::start_with(
        &data,
        &models,
        free_port(),
        &["--config", config.to_str().unwrap()],
    );
    let body = json!({"modelName": "demo", "engine": "mock"});

    let (status, envelope) = post(&shim, "/api/v1/modserv/deploy", None, &body);
    assert_eq!(
        (status, envelope["code"].as_i64()),
        (401, Some(401)),
        "{envelope}"
    );
    let (status, envelope) = post(&shim, "/api/v1/modserv/deploy", Some("view-123"), &body);
    assert_eq!(status, 403, "{envelope}");
    assert!(
        envelope["message"].as_str().unwrap().contains("viewer"),
        "{envelope}"
    );
    let (status, envelope) = post(&shim, "/api/v1/modserv/deploy", Some("op-456"), &body);
    assert_eq!(
        (status, envelope["code"].as_i64()),
        (200, Some(0)),
        "{envelope}"
    );
    let id = envelope["data"]["serviceId"].as_str().unwrap().to_string();
    // The existing client polls status without a token.
    let status = get(&shim.url(&format!("/api/v1/modserv/{id}"))).unwrap();
    assert_eq!(status["code"], 0, "{status}");

    let audit = std::fs::read_to_string(data.join("audit.log")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{audit}");
    let seen: Vec<(&str, u64)> = lines
        .iter()
        .map(|l| (l["who"].as_str().unwrap(), l["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [("anonymous", 401), ("dashboard", 403), ("ci-bot", 200)]
    );
    assert_eq!(lines[2]["serviceId"], id.as_str());
    assert_eq!(lines[2]["role"], "operator");
    assert_eq!(lines[2]["method"], "POST");
    assert_eq!(lines[2]["path"], "/api/v1/modserv/deploy");
    assert!(
        !audit.contains("op-456"),
        "a token leaked into the audit log"
    );
}
