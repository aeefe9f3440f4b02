//! Property test of the engine: random sequences of deploys, updates, deletes, runtime faults
//! (crashes, workloads removed behind its back, outages) and engine restarts over one store and
//! one runtime. Once things settle:
//! - every service follows the last request accepted for it: deleted ones are gone, the others
//!   run that spec at that generation (or have failed, only from crashes past `maxRestarts`);
//! - the runtime holds no workload for a deleted service, and one at the current generation for
//!   every running one;
//! - every status word is one of the client's six.
//!
//! The runtime is the in-memory [`InstantShimlet`]: this checks the engine's bookkeeping, not a
//! real runtime (the shimlets have their own tests against real ones).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use shim_core::store::MemoryStore;
use shim_core::testing::InstantShimlet;
use shim_core::{
    DeploySpec, Engine, EngineConfig, FailureReason, Phase, Pipeline, PipelineContext, Shimlet,
    WorkloadSpec,
};

#[derive(Debug, Clone)]
enum Op {
    Deploy { model: u8, replicas: u8 },
    Update { target: u8, replicas: u8 },
    Delete { target: u8 },
    Crash { target: u8 },
    Vanish { target: u8 },
    Outage(bool),
    Restart,
    Pause,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 1u8..4).prop_map(|(model, replicas)| Op::Deploy { model, replicas }),
        2 => (any::<u8>(), 1u8..4).prop_map(|(target, replicas)| Op::Update { target, replicas }),
        2 => any::<u8>().prop_map(|target| Op::Delete { target }),
        1 => any::<u8>().prop_map(|target| Op::Crash { target }),
        1 => any::<u8>().prop_map(|target| Op::Vanish { target }),
        1 => any::<bool>().prop_map(Op::Outage),
        1 => Just(Op::Restart),
        1 => Just(Op::Pause),
    ]
}

fn pipeline() -> Pipeline {
    Pipeline::new("props")
        .step("apply", |ctx: PipelineContext| async move {
            let mut workload = WorkloadSpec::new(ctx.service_id(), ctx.generation(), "img");
            workload.replicas = ctx.spec().replicas();
            ctx.shimlet().apply(&workload).await?;
            Ok(())
        })
        .build()
}

async fn start(store: &Arc<MemoryStore>, runtime: &Arc<InstantShimlet>) -> Engine {
    let runtime = runtime.clone();
    Engine::builder()
        .config(EngineConfig {
            gpus: Some(Vec::new()),
            backoff_base: Duration::from_millis(5),
            backoff_cap: Duration::from_millis(20),
            resync_interval: Duration::from_millis(50),
            max_restarts: 2,
            ..EngineConfig::default()
        })
        .store(store.clone())
        .shimlet_instance(move |ctx| {
            runtime.set_notifier(ctx.notifier);
            runtime
        })
        .pipeline(pipeline())
        .build()
        .await
        .expect("engine")
}

/// The last request the engine accepted for a service.
#[derive(Debug, Clone)]
enum Last {
    Present {
        spec: Box<DeploySpec>,
        generation: u64,
    },
    Absent,
}

fn spec(model: u8, replicas: u8) -> DeploySpec {
    DeploySpec {
        replica_count: Some(i64::from(replicas)),
        ..DeploySpec::named(format!("model-{model}"))
    }
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let store = Arc::new(MemoryStore::default());
    let runtime = Arc::new(InstantShimlet::default());
    let mut engine = start(&store, &runtime).await;
    let mut ids: Vec<String> = Vec::new();
    let mut last: BTreeMap<String, Last> = BTreeMap::new();
    let pick = |ids: &Vec<String>, target: u8| {
        (!ids.is_empty()).then(|| ids[usize::from(target) % ids.len()].clone())
    };
    for op in ops {
        match op {
            Op::Deploy { model, replicas } => {
                let spec = spec(model, replicas);
                if let Ok(id) = engine.deploy(spec.clone()).await {
                    ids.push(id.clone());
                    last.insert(
                        id,
                        Last::Present {
                            spec: Box::new(spec),
                            generation: 1,
                        },
                    );
                }
            }
            Op::Update { target, replicas } => {
                if let Some(id) = pick(&ids, target) {
                    let generation = engine.get(&id).map(|r| r.generation);
                    let spec = spec(target % 3, replicas);
                    if engine.update(&id, spec.clone()).await.is_ok() {
                        let generation = generation.expect("updated a service it knew") + 1;
                        last.insert(
                            id,
                            Last::Present {
                                spec: Box::new(spec),
                                generation,
                            },
                        );
                    }
                }
            }
            Op::Delete { target } => {
                if let Some(id) = pick(&ids, target)
                    && engine.delete(&id).await.is_ok()
                {
                    last.insert(id, Last::Absent);
                }
            }
            Op::Crash { target } => {
                if let Some(id) = pick(&ids, target) {
                    runtime.crash(&id, "killed by the test");
                }
            }
            Op::Vanish { target } => {
                if let Some(id) = pick(&ids, target) {
                    runtime.vanish(&id);
                }
            }
            Op::Outage(down) => runtime.set_unavailable(down),
            Op::Restart => {
                engine.shutdown().await;
                engine = start(&store, &runtime).await;
            }
            Op::Pause => tokio::time::sleep(Duration::from_millis(15)).await,
        }
        for record in engine.list() {
            let word = record.phase.wire_word();
            prop_assert!(
                [
                    "pending",
                    "initializing",
                    "running",
                    "failed",
                    "terminating",
                    "notExist"
                ]
                .contains(&word),
                "{word}"
            );
        }
    }

    // The runtime is back; everything must settle, engine and runtime agreeing.
    runtime.set_unavailable(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Err(violation) = settled(&engine, &runtime, &last).await else {
            break;
        };
        prop_assert!(
            Instant::now() < deadline,
            "did not settle: {violation}; want {last:?}; engine has {:#?}",
            engine.list()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        // Shrinking reruns whole engines; keep it bounded.
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_engine_follows_the_last_accepted_request_through_faults_and_restarts(
        ops in proptest::collection::vec(op(), 1..16)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(ops))?;
    }
}

/// `Ok` once every service is where its last accepted request puts it, in the engine and in
/// the runtime alike; else the first thing that is not (yet).
async fn settled(
    engine: &Engine,
    runtime: &InstantShimlet,
    last: &BTreeMap<String, Last>,
) -> Result<(), String> {
    let workloads = runtime.list().await.map_err(|e| e.to_string())?;
    for (id, want) in last {
        let held: Vec<_> = workloads.iter().filter(|w| &w.service_id == id).collect();
        let record = engine.get(id);
        match (want, record) {
            (Last::Absent, None) if held.is_empty() => {}
            (Last::Absent, _) => return Err(format!("{id} is deleted but not gone")),
            (Last::Present { .. }, None) => return Err(format!("{id} is gone")),
            (Last::Present { spec, generation }, Some(record)) => {
                if record.generation != *generation || record.spec != **spec {
                    return Err(format!("{id} is not at its last spec: {record:?}"));
                }
                match record.phase {
                    Phase::Running => {
                        let observed = runtime.observe(id).await.map_err(|e| e.to_string())?;
                        if held.len() != 1
                            || held[0].generation != Some(*generation)
                            || observed.desired_replicas != spec.replicas()
                        {
                            return Err(format!(
                                "{id} runs in the engine but the runtime holds {held:?} ({observed:?})"
                            ));
                        }
                    }
                    // Failed only when crashes used up the repair budget.
                    Phase::Failed => {
                        let reason = record.reason.clone().unwrap_or_default();
                        let allowed = [
                            FailureReason::CrashLoop.as_str(),
                            FailureReason::Exited.as_str(),
                            FailureReason::WorkloadMissing.as_str(),
                        ];
                        if !allowed.contains(&reason) {
                            return Err(format!(
                                "{id} failed with {reason:?}: {:?}",
                                record.message
                            ));
                        }
                    }
                    other => return Err(format!("{id} is still {other:?}")),
                }
            }
        }
    }
    Ok(())
}
