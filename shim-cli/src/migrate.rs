//! `model-serve-shim migrate --from redb --to kubernetes`: moves the services of a shim's file
//! store into ModelService resources, for a shim that starts again with `engine.store:
//! kubernetes` (and may then run as several replicas).
//!
//! Run it with the shim stopped (the file store allows one process) and the same configuration
//! (`--config`, `--data-dir`). Each live record is written as it is (id, generation, phase,
//! steps), so the next start re-adopts the running workloads without restarting an engine; the
//! k8s shimlet's Deployments and Services get an ownerReference to their new ModelService. The
//! file is then renamed `state.redb.migrated`, so a later start on the file store cannot
//! manage the same services a second time. Event history stays in that file.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use shim_core::ServiceRecord;
use shim_core::store::{RedbStore, Store};

use crate::ServeArgs;
use crate::config::{Settings, StoreKind};

/// `migrate` flags.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The store to move from (only `redb`).
    #[arg(long, value_parser = parse_kind)]
    pub from: StoreKind,
    /// The store to move to (only `kubernetes`).
    #[arg(long, value_parser = parse_kind)]
    pub to: StoreKind,
    /// YAML configuration file of the shim (its `engine.dataDir` and `shimlets.k8s`).
    #[arg(long, env = "XMOD_SHIM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the file store lives [config: engine.dataDir; default .data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

fn parse_kind(word: &str) -> Result<StoreKind, String> {
    serde_json::from_value(serde_json::Value::String(word.to_string()))
        .map_err(|_| format!("unknown store {word:?}: expected redb or kubernetes"))
}

/// Runs the migration, one line per service.
pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.from == StoreKind::Redb && args.to == StoreKind::Kubernetes,
        "only --from redb --to kubernetes is supported"
    );
    let flags = ServeArgs {
        config: args.config.clone(),
        data_dir: args.data_dir.clone(),
        ..ServeArgs::default()
    };
    let settings = Settings::load(args.config.as_deref(), flags.as_config())?;
    let config = settings.engine_config();
    let path = config.data_dir.join("state.redb");
    anyhow::ensure!(
        path.is_file(),
        "no file store at {} (set --data-dir or --config as the shim runs)",
        path.display()
    );
    let source = RedbStore::open(&path, config.event_history)
        .with_context(|| format!("cannot open {} (stop the shim first)", path.display()))?;
    let records: Vec<Arc<ServiceRecord>> = source
        .load_live()
        .await?
        .into_iter()
        .map(Arc::new)
        .collect();
    let k8s = settings.k8s_config()?;
    let target = shim_shimlet_k8s::store::KubeStore::connect(&k8s, config.event_history)
        .await
        .context("cannot open the Kubernetes store")?;
    eprintln!(
        "moving {} services from {} to ModelServices in namespace {}",
        records.len(),
        path.display(),
        target.namespace()
    );
    for (n, record) in records.iter().enumerate() {
        target
            .save(record)
            .await
            .with_context(|| format!("cannot write ModelService {}", record.id))?;
        let owned = target
            .own_workloads(&record.id)
            .await
            .with_context(|| format!("cannot set the owner of service {}'s workload", record.id))?;
        eprintln!(
            "[{}/{}] {} ({}, {}, generation {}): ModelService written, {owned} workload objects now owned by it",
            n + 1,
            records.len(),
            record.id,
            record.spec.model_name,
            record.phase,
            record.generation
        );
    }
    drop(source);
    let moved = path.with_extension("redb.migrated");
    std::fs::rename(&path, &moved)
        .with_context(|| format!("cannot rename {} to {}", path.display(), moved.display()))?;
    eprintln!(
        "done; {} is now {} (its event history stays there). Start the shim with engine.store: kubernetes.",
        path.display(),
        moved.display()
    );
    Ok(())
}
