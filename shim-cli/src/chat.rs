//! `model-serve-shim chat <model> [prompt]`: talk to a deployed model through the server's
//! OpenAI gateway, printing the answer token by token as it streams (like `ollama run`).

use std::io::{BufRead as _, Write as _};

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt as _;
use serde_json::{Value, json};

/// `chat` flags.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Served model name (or service id).
    pub model: String,
    /// One prompt to answer; without it, an interactive conversation (empty line or Ctrl-D ends).
    pub prompt: Option<String>,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Base URL of the server.
    #[arg(
        long,
        env = "XMOD_SHIM_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Gateway API key (one of `gateway.apiKeys`), when the gateway requires one.
    #[arg(long, env = "XMOD_SHIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Runs the command.
pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = &args.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    if let Some(prompt) = &args.prompt {
        messages.push(json!({"role": "user", "content": prompt}));
        answer(&http, &args, &messages).await?;
        return Ok(());
    }
    let stdin = std::io::stdin();
    loop {
        eprint!(">>> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(json!({"role": "user", "content": line.trim_end()}));
        let reply = answer(&http, &args, &messages).await?;
        messages.push(json!({"role": "assistant", "content": reply}));
    }
}

/// Streams one answer to stdout and returns its text.
async fn answer(
    http: &reqwest::Client,
    args: &ChatArgs,
    messages: &[Value],
) -> anyhow::Result<String> {
    let url = format!("{}/v1/chat/completions", args.server.trim_end_matches('/'));
    let mut body = json!({"model": args.model, "messages": messages, "stream": true});
    if let Some(max) = args.max_tokens {
        body["max_tokens"] = max.into();
    }
    let mut request = http.post(&url).json(&body);
    if let Some(key) = &args.api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        anyhow::bail!("{status}: {message}");
    }
    let mut stream = response.bytes_stream();
    let mut pending = Vec::new();
    let mut reply = String::new();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk.context("the answer stream broke off")?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<Value>(data) else {
                continue;
            };
            if let Some(token) = event["choices"][0]["delta"]["content"].as_str() {
                reply.push_str(token);
                print!("{token}");
                stdout.flush()?;
            }
        }
    }
    println!();
    Ok(reply)
}
