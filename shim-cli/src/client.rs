//! Client subcommands: talk to a running server over its REST API.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// Where the server is.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the server.
    #[arg(
        long,
        env = "XMOD_SHIM_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// Bearer token for mutating calls (when the server requires one).
    #[arg(long, env = "XMOD_SHIM_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

/// `deploy` flags.
#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    /// Model directory name under the server's model root.
    pub model_name: String,
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Waiting for a deploy or update to converge.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Wait until the service is running (or failed), showing pipeline progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
}

/// `render` flags.
#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// Model directory name under the server's model root.
    pub model_name: String,
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `update` flags.
#[derive(Debug, Clone, Args)]
pub struct UpdateArgs {
    /// Service id.
    pub id: String,
    /// Model directory name under the server's model root.
    #[arg(long)]
    pub model_name: String,
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The optional fields of a deploy body.
#[derive(Debug, Clone, Args)]
pub struct SpecArgs {
    /// Replicas.
    #[arg(long)]
    pub replicas: Option<i64>,
    /// Accelerators per replica.
    #[arg(long)]
    pub accelerators: Option<i64>,
    /// CPU per replica (Kubernetes quantity).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory per replica (Kubernetes quantity).
    #[arg(long)]
    pub memory: Option<String>,
    /// Maximum context length.
    #[arg(long)]
    pub context_length: Option<i64>,
    /// Engine preset (vllm, sglang, llamacpp, mock).
    #[arg(long)]
    pub engine: Option<String>,
    /// Explicit model directory (inside an allowed root).
    #[arg(long)]
    pub model_file_dir: Option<String>,
    /// Extra environment, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
}

impl SpecArgs {
    fn body(&self, model_name: &str) -> anyhow::Result<Value> {
        let mut body = json!({ "modelName": model_name });
        let mut resources = serde_json::Map::new();
        if let Some(n) = self.accelerators {
            resources.insert("acceleratorCount".into(), n.into());
        }
        if let Some(cpu) = &self.cpu {
            resources.insert("cpu".into(), cpu.as_str().into());
        }
        if let Some(memory) = &self.memory {
            resources.insert("memory".into(), memory.as_str().into());
        }
        if !resources.is_empty() {
            body["resourceRequirements"] = Value::Object(resources);
        }
        if let Some(n) = self.replicas {
            body["replicaCount"] = n.into();
        }
        if let Some(n) = self.context_length {
            body["contextLength"] = n.into();
        }
        if let Some(engine) = &self.engine {
            body["engine"] = engine.as_str().into();
        }
        if let Some(dir) = &self.model_file_dir {
            body["modelFileDir"] = dir.as_str().into();
        }
        if !self.env.is_empty() {
            let mut env = Vec::new();
            for pair in &self.env {
                let (key, value) = pair
                    .split_once('=')
                    .with_context(|| format!("--env {pair:?}: expected KEY=VALUE"))?;
                env.push(json!({ "key": key, "value": value }));
            }
            body["env"] = env.into();
        }
        Ok(body)
    }
}

/// Flags that name one service.
#[derive(Debug, Clone, Args)]
pub struct IdArgs {
    /// Service id.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `delete` flags.
#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// Service id.
    pub id: String,
    /// Wait until the service no longer exists.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `logs` flags.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// Service id.
    pub id: String,
    /// Lines to show.
    #[arg(long, default_value_t = 100)]
    pub tail: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            base: args.server.trim_end_matches('/').to_string(),
            token: args.token.clone(),
            http,
        })
    }

    /// Sends a request and returns the envelope's `data`, or the envelope's message as an error.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = response.status();
        let envelope: Value = response.json().await.with_context(|| {
            format!("{method} {url}: the server answered {status} without a JSON envelope")
        })?;
        if envelope["code"].as_i64() != Some(0) {
            bail!(
                "{} (code {})",
                envelope["message"].as_str().unwrap_or("request failed"),
                envelope["code"]
            );
        }
        Ok(envelope.get("data").cloned().unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

/// `deploy`.
pub async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.client)?;
    let body = args.spec.body(&args.model_name)?;
    let data = api
        .call(reqwest::Method::POST, "/api/v1/modserv/deploy", Some(&body))
        .await?;
    let id = data["serviceId"]
        .as_str()
        .context("the server returned no serviceId")?
        .to_string();
    println!("serviceId: {id}");
    if args.wait.wait {
        wait_running(&api, &id, Duration::from_secs(args.wait.timeout)).await?;
    }
    Ok(())
}

/// `render`: the dry run's workloads and runtime objects, as JSON.
pub async fn render(args: RenderArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.client)?;
    let body = args.spec.body(&args.model_name)?;
    let data = api
        .call(
            reqwest::Method::POST,
            "/api/v1/modserv/deploy?dryRun=true",
            Some(&body),
        )
        .await?;
    println!("{}", serde_json::to_string_pretty(&data)?);
    Ok(())
}

/// `update`.
pub async fn update(args: UpdateArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.client)?;
    let body = args.spec.body(&args.model_name)?;
    api.call(
        reqwest::Method::PUT,
        &format!("/api/v1/modserv/{}", args.id),
        Some(&body),
    )
    .await?;
    println!("updated {}", args.id);
    if args.wait.wait {
        wait_running(&api, &args.id, Duration::from_secs(args.wait.timeout)).await?;
    }
    Ok(())
}

/// Polls until running or failed, drawing the pipeline's steps as a progress bar (or printing
/// each step change as a line when stderr is not a terminal).
async fn wait_running(api: &Api, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last_line = String::new();
    loop {
        let status = api.get(&format!("/api/v1/modserv/{id}")).await?;
        let word = status["status"].as_str().unwrap_or("?").to_string();
        if let Ok(pipeline) = api.get(&format!("/api/v1/modserv/{id}/pipeline")).await {
            let steps = pipeline["steps"].as_array().cloned().unwrap_or_default();
            let done = steps
                .iter()
                .filter(|s| matches!(s["state"].as_str(), Some("succeeded" | "skipped")))
                .count();
            bar.set_length(steps.len().max(1) as u64);
            bar.set_position(done as u64);
            let current = steps
                .iter()
                .find(|s| !matches!(s["state"].as_str(), Some("succeeded" | "skipped")));
            let line = match current {
                Some(step) => format!(
                    "{word}: {} {}",
                    step["name"].as_str().unwrap_or(""),
                    step["message"].as_str().unwrap_or("")
                ),
                None => word.clone(),
            };
            if line != last_line {
                if bar.is_hidden() {
                    eprintln!("{line}");
                }
                bar.set_message(line.clone());
                last_line = line;
            }
        }
        match word.as_str() {
            "running" => {
                bar.finish_with_message("running");
                println!(
                    "status: running\nendpoint: {}",
                    status["endpoint"].as_str().unwrap_or("")
                );
                return Ok(());
            }
            "failed" => {
                bar.abandon_with_message("failed");
                bail!(
                    "service {id} failed: {} {}",
                    status["reason"].as_str().unwrap_or(""),
                    status["message"].as_str().unwrap_or("")
                );
            }
            "notExist" => {
                bar.abandon();
                bail!("service {id} does not exist");
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            bar.abandon();
            bail!("service {id} still {word} after {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `status`.
pub async fn status(args: IdArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.client)?;
    let data = api.get(&format!("/api/v1/modserv/{}", args.id)).await?;
    println!("{}", serde_json::to_string_pretty(&data)?);
    Ok(())
}

/// `list`.
pub async fn list(args: ClientArgs) -> anyhow::Result<()> {
    let api = Api::new(&args)?;
    let data = api.get("/api/v1/modserv").await?;
    println!(
        "{:<10} {:<14} {:<24} {:<9} ENDPOINT",
        "ID", "STATUS", "MODEL", "READY"
    );
    for s in data.as_array().cloned().unwrap_or_default() {
        println!(
            "{:<10} {:<14} {:<24} {:<9} {}",
            s["serviceId"].as_str().unwrap_or(""),
            s["status"].as_str().unwrap_or(""),
            s["modelName"].as_str().unwrap_or(""),
            format!("{}/{}", s["readyReplicas"], s["desiredReplicas"]),
            s["endpoint"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `delete`.
pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.client)?;
    api.call(
        reqwest::Method::DELETE,
        &format!("/api/v1/modserv/{}", args.id),
        None,
    )
    .await?;
    println!("deleting {}", args.id);
    if args.wait {
        let spinner = ProgressBar::new_spinner();
        spinner.enable_steady_tick(Duration::from_millis(200));
        loop {
            let status = api.get(&format!("/api/v1/modserv/{}", args.id)).await?;
            let word = status["status"].as_str().unwrap_or("?");
            spinner.set_message(word.to_string());
            if word == "notExist" {
                spinner.finish_with_message("notExist");
                println!("status: notExist");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    Ok(())
}

/// `logs`.
pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.client)?;
    let data = api
        .get(&format!(
            "/api/v1/modserv/{}/logs?tail={}",
            args.id, args.tail
        ))
        .await?;
    print!("{}", data["logs"].as_str().unwrap_or(""));
    Ok(())
}

/// `events`.
pub async fn events(args: IdArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.client)?;
    let data = api
        .get(&format!("/api/v1/modserv/{}/events", args.id))
        .await?;
    let list = data.get("events").cloned().unwrap_or(data);
    for event in list.as_array().cloned().unwrap_or_default() {
        println!("{}", serde_json::to_string(&event)?);
    }
    Ok(())
}

/// `plugins`.
pub async fn plugins(args: ClientArgs) -> anyhow::Result<()> {
    let api = Api::new(&args)?;
    let data = api.get("/api/v1/plugins").await?;
    for kind in ["shimlets", "pipelines"] {
        println!("{kind}:");
        for p in data[kind].as_array().cloned().unwrap_or_default() {
            let active = if p["active"].as_bool() == Some(true) {
                "*"
            } else {
                " "
            };
            println!(
                "  {active} {:<16} {}",
                p["name"].as_str().unwrap_or(""),
                p["description"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `models`.
pub async fn models(args: ClientArgs) -> anyhow::Result<()> {
    let api = Api::new(&args)?;
    let data = api.get("/api/v1/modserv/list").await?;
    let models = data.as_array().cloned().unwrap_or_default();
    if !models.is_empty() {
        println!(
            "{:<32} {:<12} {:<20} {:>8} {:<10} {:>9} {:>8}  PATH",
            "NAME", "FORMAT", "ARCHITECTURE", "PARAMS", "QUANT", "WEIGHTS", "CONTEXT"
        );
    }
    for m in models {
        println!("{}", model_line(&m));
    }
    Ok(())
}

/// One row of `models`; `-` where the server could not read the metadata.
fn model_line(m: &Value) -> String {
    let text = |key: &str| m[key].as_str().unwrap_or("-").to_string();
    let params = m["parameters"].as_u64().map_or("-".into(), |p| {
        if p >= 1_000_000_000 {
            format!("{:.1}B", p as f64 / 1e9)
        } else if p >= 1_000_000 {
            format!("{:.1}M", p as f64 / 1e6)
        } else {
            format!("{:.1}K", p as f64 / 1e3)
        }
    });
    let weights = m["weightsBytes"].as_u64().map_or("-".into(), |b| {
        format!("{:.2}GiB", b as f64 / f64::from(1u32 << 30))
    });
    let context = m["maxContextLength"]
        .as_u64()
        .map_or("-".into(), |c| c.to_string());
    format!(
        "{:<32} {:<12} {:<20} {:>8} {:<10} {:>9} {:>8}  {}",
        text("modelName"),
        text("format"),
        text("architecture"),
        params,
        text("quantization"),
        weights,
        context,
        text("modelPath"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_rows_show_the_metadata_or_a_dash() {
        let row = model_line(&json!({
            "modelName": "llama-8b", "modelPath": "/m/llama-8b", "format": "safetensors",
            "architecture": "LlamaForCausalLM", "parameters": 8_030_261_248u64,
            "quantization": "BF16", "weightsBytes": 16_060_522_496u64, "maxContextLength": 8192
        }));
        for part in [
            "llama-8b",
            "safetensors",
            "LlamaForCausalLM",
            "8.0B",
            "BF16",
            "14.96GiB",
            "8192",
            "/m/llama-8b",
        ] {
            assert!(row.contains(part), "{part} missing in {row}");
        }
        let unknown = model_line(&json!({
            "modelName": "empty", "modelPath": "/m/empty", "format": null, "architecture": null,
            "parameters": null, "quantization": null, "weightsBytes": null, "maxContextLength": null
        }));
        let dashes = unknown.split_whitespace().filter(|w| *w == "-").count();
        assert_eq!(dashes, 6, "every unknown field reads '-': {unknown}");
    }

    #[test]
    fn the_deploy_body_carries_only_what_was_given() {
        let spec = SpecArgs {
            replicas: Some(2),
            accelerators: Some(1),
            cpu: None,
            memory: Some("16Gi".into()),
            context_length: None,
            engine: Some("mock".into()),
            model_file_dir: None,
            env: vec!["A=1".into(), "B=x=y".into()],
        };
        assert_eq!(
            spec.body("qwen").unwrap(),
            json!({
                "modelName": "qwen", "replicaCount": 2, "engine": "mock",
                "resourceRequirements": { "acceleratorCount": 1, "memory": "16Gi" },
                "env": [{ "key": "A", "value": "1" }, { "key": "B", "value": "x=y" }]
            })
        );
        let bad = SpecArgs {
            env: vec!["NOEQUALS".into()],
            ..spec
        };
        assert!(
            bad.body("qwen")
                .unwrap_err()
                .to_string()
                .contains("KEY=VALUE")
        );
    }
}
