//! `model-serve-shim`: the xmod-shim server (the default command) plus client subcommands
//! against a running server, and the built-in mock engine.

mod chat;
mod client;
mod config;
mod migrate;
mod mock_engine;
mod registered;
mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Deploy AI models onto any runtime through one REST API.
#[derive(Debug, Parser)]
#[command(
    name = "model-serve-shim",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Flags of the server (also accepted without the `serve` subcommand, as in the seed).
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// YAML configuration file.
    #[arg(long, env = "XMOD_SHIM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to bind [config: service.host; default 127.0.0.1].
    #[arg(long)]
    pub host: Option<String>,
    /// Port to bind [config: service.port; default 8080].
    #[arg(long)]
    pub port: Option<u16>,
    /// Runtime: process, docker, ... [config: plugins.defaultShimlet; default process].
    #[arg(long)]
    pub shimlet: Option<String>,
    /// Pipeline [config: plugins.defaultPipeline; default opensourcellm].
    #[arg(long)]
    pub pipeline: Option<String>,
    /// error|warn|info|debug|trace or a tracing filter [config: logging.level].
    #[arg(long)]
    pub log_level: Option<String>,
    /// text or json [config: logging.format].
    #[arg(long)]
    pub log_format: Option<String>,
    /// Where state lives [config: engine.dataDir; default .data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// One sub-directory per model [config: engine.modelRoot; default models].
    #[arg(long)]
    pub model_root: Option<PathBuf>,
    /// Engine preset for requests that name none [config: engine.defaultEngine; default vllm].
    #[arg(long)]
    pub default_engine: Option<String>,
    /// Where desired state lives: redb or kubernetes [config: engine.store; default kubernetes
    /// with --shimlet k8s inside a cluster, else redb].
    #[arg(long)]
    pub store: Option<String>,
}

impl ServeArgs {
    /// The flags that were given, as a config tree (they override file and env).
    pub fn as_config(&self) -> serde_json::Value {
        let mut tree = serde_json::json!({});
        let mut set = |section: &str, key: &str, value: serde_json::Value| {
            tree.as_object_mut()
                .expect("object")
                .entry(section)
                .or_insert_with(|| serde_json::json!({}))[key] = value;
        };
        if let Some(v) = &self.host {
            set("service", "host", v.as_str().into());
        }
        if let Some(v) = self.port {
            set("service", "port", v.into());
        }
        if let Some(v) = &self.shimlet {
            set("plugins", "defaultShimlet", v.as_str().into());
        }
        if let Some(v) = &self.pipeline {
            set("plugins", "defaultPipeline", v.as_str().into());
        }
        if let Some(v) = &self.log_level {
            set("logging", "level", v.as_str().into());
        }
        if let Some(v) = &self.log_format {
            set("logging", "format", v.as_str().into());
        }
        if let Some(v) = &self.data_dir {
            set("engine", "dataDir", v.display().to_string().into());
        }
        if let Some(v) = &self.model_root {
            set("engine", "modelRoot", v.display().to_string().into());
        }
        if let Some(v) = &self.default_engine {
            set("engine", "defaultEngine", v.as_str().into());
        }
        if let Some(v) = &self.store {
            set("engine", "store", v.as_str().into());
        }
        tree
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Deploy a model on a running server.
    Deploy(client::DeployArgs),
    /// Show what a deploy would create (dry run), without creating it.
    Render(client::RenderArgs),
    /// Replace a service's spec.
    Update(client::UpdateArgs),
    /// Show one service.
    Status(client::IdArgs),
    /// List services.
    List(client::ClientArgs),
    /// Delete a service.
    Delete(client::DeleteArgs),
    /// Show a service's engine logs.
    Logs(client::LogsArgs),
    /// Show a service's event history.
    Events(client::IdArgs),
    /// List registered shimlets and pipelines.
    Plugins(client::ClientArgs),
    /// List the models under the server's model root.
    Models(client::ClientArgs),
    /// Chat with a deployed model through the OpenAI gateway, streaming the answer.
    Chat(chat::ChatArgs),
    /// Run the built-in mock OpenAI-compatible engine (for demos and tests; loads no model).
    MockEngine(mock_engine::MockEngineArgs),
    /// Move the services of the file store into ModelService resources (shim stopped).
    Migrate(migrate::MigrateArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => serve::run(cli.serve).await,
            Some(Command::Serve(args)) => serve::run(args).await,
            Some(Command::Deploy(args)) => client::deploy(args).await,
            Some(Command::Render(args)) => client::render(args).await,
            Some(Command::Update(args)) => client::update(args).await,
            Some(Command::Status(args)) => client::status(args).await,
            Some(Command::List(args)) => client::list(args).await,
            Some(Command::Delete(args)) => client::delete(args).await,
            Some(Command::Logs(args)) => client::logs(args).await,
            Some(Command::Events(args)) => client::events(args).await,
            Some(Command::Plugins(args)) => client::plugins(args).await,
            Some(Command::Models(args)) => client::models(args).await,
            Some(Command::Chat(args)) => chat::run(args).await,
            Some(Command::MockEngine(args)) => mock_engine::run(args).await,
            Some(Command::Migrate(args)) => migrate::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
