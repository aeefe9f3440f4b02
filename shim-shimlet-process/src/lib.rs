//! The embedded default runtime of xmod-shim, registered as `process`: every replica of a
//! [`WorkloadSpec`](shim_core::WorkloadSpec) runs as a local child process.
//!
//! # What a replica is
//! - `command[0]` is the program, `command[1..]` and then the rendered `args` its arguments
//!   (`{host}` = `bindHost`, `{port}` = a free port allocated per replica, `{model_dir}` = the
//!   model's host path). No shell is ever involved.
//! - It leads its own process group (the shim's Ctrl-C does not reach it; stopping it reaches its
//!   worker processes), has stdin closed, and appends stdout and stderr to
//!   `<state_dir>/logs/<service_id>-<replica>.log`.
//! - The environment is the shim's plus the workload's `env`, plus `CUDA_VISIBLE_DEVICES` when
//!   the workload asks for accelerators (allocated from the shared
//!   [`GpuAllocator`](shim_core::GpuAllocator); too few free → `Unschedulable`).
//! - A background task per replica waits for its exit and probes
//!   `GET http://<bindHost>:<port><health.path>` until it answers 200, then less often; every
//!   change reaches the engine through the [`Notifier`](shim_core::Notifier).
//!
//! # Identity and restarts
//! Each service's replicas are recorded in `<state_dir>/<service_id>.json` as (pid, start time,
//! port, GPUs, log). The start time (field 22 of `/proc/<pid>/stat`) guards against PID reuse:
//! no signal is sent to a pid whose start time differs from the recorded one. A shim that
//! restarts re-adopts the replicas still running and reports the others as exited.
//!
//! # Configuration (`shimlets.process`)
//! See [`ProcessConfig`]: `bindHost`, `advertiseHost`, `stopGracePeriodSecs`, `logTailLines`,
//! `portRange`.

mod config;
mod logs;
mod procfs;
mod replica;
mod shimlet;
mod state;

use std::sync::Arc;

use futures::future::BoxFuture;
use shim_core::{Shimlet, ShimletContext, ShimletError};

pub use config::ProcessConfig;
pub use shimlet::ProcessShimlet;

/// The name this runtime is registered under (`--shimlet=process`).
pub const NAME: &str = "process";

/// The registry factory: builds a [`ProcessShimlet`] (re-adopting what its state directory
/// records).
pub fn factory(ctx: ShimletContext) -> BoxFuture<'static, Result<Arc<dyn Shimlet>, ShimletError>> {
    Box::pin(async move { Ok(Arc::new(ProcessShimlet::new(ctx).await?) as Arc<dyn Shimlet>) })
}

shim_core::inventory::submit! {
    shim_core::ShimletEntry::new(NAME, "local child processes (embedded default)", factory)
}
