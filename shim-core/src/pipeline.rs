//! Pipelines: ordered, named, async steps with per-step retry budgets, backoff and timeouts,
//! whose progress is recorded step by step.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::event::EventKind;
use crate::shimlet::{Failure, Shimlet, ShimletError};
use crate::spec::DeploySpec;
use crate::workload::FailureReason;

type StepFn =
    Arc<dyn Fn(PipelineContext) -> BoxFuture<'static, Result<(), StepError>> + Send + Sync>;
type CheckFn = Arc<dyn Fn(PipelineContext) -> BoxFuture<'static, bool> + Send + Sync>;

/// Retry budget, backoff and timeout of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOptions {
    /// Retries after the first attempt for transient errors.
    pub retries: u32,
    /// Delay before the first retry; doubles each retry.
    pub backoff: Duration,
    /// Largest delay between retries.
    pub backoff_cap: Duration,
    /// Longest one attempt may run.
    pub timeout: Duration,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            retries: 2,
            backoff: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            timeout: Duration::from_secs(300),
        }
    }
}

impl StepOptions {
    /// Delay before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.backoff.saturating_mul(factor).min(self.backoff_cap)
    }
}

/// How a step failed, which decides what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StepErrorKind {
    /// May succeed if tried again: retried within the step's budget.
    Transient,
    /// Will not succeed: the service fails with the reason.
    Permanent,
    /// Cannot go on yet (e.g. no free GPU): the service waits as `pending` and is retried later.
    Blocked,
    /// The runtime cannot be reached: the run stops at once, the service keeps its phase with
    /// reason `RuntimeUnavailable`, and the engine runs the pipeline again (capped backoff)
    /// for as long as the outage lasts. Goal-style steps make the re-runs cheap.
    Unavailable,
}

/// A step's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// What to do about it.
    pub kind: StepErrorKind,
    /// Typed reason.
    pub reason: FailureReason,
    /// Explanation, including the runtime's own words.
    pub message: String,
}

impl StepError {
    /// A failure worth retrying.
    pub fn transient(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            kind: StepErrorKind::Transient,
            reason,
            message: message.into(),
        }
    }

    /// A failure that retrying will not fix.
    pub fn permanent(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            kind: StepErrorKind::Permanent,
            reason,
            message: message.into(),
        }
    }

    /// The runtime cannot be reached; the engine retries the run until it answers.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: StepErrorKind::Unavailable,
            reason: FailureReason::RuntimeUnavailable,
            message: message.into(),
        }
    }

    /// The step cannot go on for now; the service waits.
    pub fn blocked(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            kind: StepErrorKind::Blocked,
            reason,
            message: message.into(),
        }
    }
}

impl From<ShimletError> for StepError {
    fn from(err: ShimletError) -> Self {
        let kind = if err.reason == FailureReason::Unschedulable {
            StepErrorKind::Blocked
        } else if err.reason == FailureReason::RuntimeUnavailable {
            StepErrorKind::Unavailable
        } else if err.retryable {
            StepErrorKind::Transient
        } else {
            StepErrorKind::Permanent
        };
        Self {
            kind,
            reason: err.reason,
            message: err.message,
        }
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StepState {
    /// Not started.
    Pending,
    /// An attempt is running.
    Running,
    /// Waiting to retry after a transient error.
    Retrying,
    /// Done.
    Succeeded,
    /// Its goal already held; nothing was done.
    Skipped,
    /// Failed for good (or blocked).
    Failed,
}

/// Progress of one step, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepProgress {
    /// Step name.
    pub name: String,
    /// State.
    pub state: StepState,
    /// Attempts made.
    pub attempts: u32,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Latest progress message from the step.
    pub message: Option<String>,
    /// Time spent, once finished.
    pub duration_ms: Option<u64>,
}

impl StepProgress {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            state: StepState::Pending,
            attempts: 0,
            last_error: None,
            message: None,
            duration_ms: None,
        }
    }
}

/// Receives every change of a pipeline run (the engine records and publishes them).
pub trait PipelineObserver: Send + Sync {
    /// `steps` is the whole run's progress after the change described by `event`.
    fn on_change(&self, steps: &[StepProgress], event: EventKind);

    /// The running step says what it was blocked on is there now (see
    /// [`PipelineContext::unblocked`]).
    fn on_unblocked(&self, step: &str) {
        let _ = step;
    }

    /// The running step says why it is not done yet although nothing failed for good, or
    /// (`None`) that this no longer holds (see [`PipelineContext::set_reason`]).
    fn on_reason(&self, step: &str, why: Option<&Failure>) {
        let _ = (step, why);
    }
}

struct Step {
    name: String,
    options: StepOptions,
    run: StepFn,
    achieved: Option<CheckFn>,
}

/// An ordered list of named async steps, plus the steps that tear a service down.
pub struct Pipeline {
    name: String,
    steps: Vec<Step>,
    teardown: Vec<Step>,
    /// Checks at request time whether a spec fits the GPUs (see [`crate::admission`]).
    admission: Option<crate::admission::AdmissionFn>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.name)
            .field("steps", &self.step_names())
            .field(
                "teardown",
                &self.teardown.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Builds a [`Pipeline`].
#[must_use = "call build() to get the pipeline"]
pub struct PipelineBuilder {
    pipeline: Pipeline,
    defaults: StepOptions,
    last_in_teardown: bool,
}

impl Pipeline {
    /// Starts a pipeline called `name`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(name: impl Into<String>) -> PipelineBuilder {
        PipelineBuilder {
            pipeline: Pipeline {
                name: name.into(),
                steps: Vec::new(),
                teardown: Vec::new(),
                admission: None,
            },
            defaults: StepOptions::default(),
            last_in_teardown: false,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Names of the deploy steps, in order.
    pub fn step_names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.name.as_str()).collect()
    }

    /// Fresh progress entries for every deploy step.
    pub fn initial_progress(&self) -> Vec<StepProgress> {
        self.steps
            .iter()
            .map(|s| StepProgress::new(&s.name))
            .collect()
    }

    /// Asks the admission hook about a request; `None` when the pipeline has none.
    pub async fn admit(
        &self,
        request: crate::admission::AdmissionRequest,
    ) -> Option<crate::admission::Verdict> {
        match &self.admission {
            Some(hook) => Some(hook(request).await),
            None => None,
        }
    }

    /// Runs the deploy steps in order.
    ///
    /// # Errors
    /// The first step that failed for good, with its error.
    pub async fn run(&self, ctx: &PipelineContext) -> Result<(), StepFailure> {
        run_steps(&self.steps, ctx).await
    }

    /// Runs the teardown steps in order; without any, deletes through the shimlet until gone.
    ///
    /// # Errors
    /// The first step that failed for good, with its error.
    pub async fn run_teardown(&self, ctx: &PipelineContext) -> Result<(), StepFailure> {
        if self.teardown.is_empty() {
            let default = [Step {
                name: "delete".into(),
                options: StepOptions::default(),
                run: Arc::new(|ctx: PipelineContext| Box::pin(delete_until_gone(ctx))),
                achieved: None,
            }];
            return run_steps(&default, ctx).await;
        }
        run_steps(&self.teardown, ctx).await
    }
}

/// The default teardown: ask the shimlet to delete until it reports the workload gone.
pub async fn delete_until_gone(ctx: PipelineContext) -> Result<(), StepError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match ctx.shimlet().delete(ctx.service_id()).await? {
            crate::shimlet::Removal::Gone => return Ok(()),
            crate::shimlet::Removal::InProgress => {
                ctx.report("waiting for the runtime to remove the workload");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl PipelineBuilder {
    /// Options for the steps added after this call.
    pub fn defaults(mut self, options: StepOptions) -> Self {
        self.defaults = options;
        self
    }

    /// Adds a deploy step with the current default options.
    pub fn step<F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(PipelineContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let options = self.defaults;
        self.step_with(name, options, f)
    }

    /// Adds a deploy step with its own retry budget and timeout.
    pub fn step_with<F, Fut>(mut self, name: impl Into<String>, options: StepOptions, f: F) -> Self
    where
        F: Fn(PipelineContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.pipeline.steps.push(make_step(name.into(), options, f));
        self.last_in_teardown = false;
        self
    }

    /// Adds a teardown step (run on delete).
    pub fn teardown_step<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(PipelineContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.pipeline
            .teardown
            .push(make_step(name.into(), self.defaults, f));
        self.last_in_teardown = true;
        self
    }

    /// Makes the step added last goal-style: `check` says whether its goal already holds, and
    /// if so the step is skipped (cheap, idempotent re-runs after a restart or on resync).
    pub fn achieved_when<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn(PipelineContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let list = if self.last_in_teardown {
            &mut self.pipeline.teardown
        } else {
            &mut self.pipeline.steps
        };
        if let Some(step) = list.last_mut() {
            step.achieved = Some(Arc::new(move |ctx| Box::pin(check(ctx))));
        }
        self
    }

    /// Sets the admission hook, which the engine calls at request time (deploy, update, dry
    /// run) before accepting anything, to check that the spec fits the GPUs.
    pub fn admission<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(crate::admission::AdmissionRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = crate::admission::Verdict> + Send + 'static,
    {
        self.pipeline.admission = Some(Arc::new(move |request| Box::pin(hook(request))));
        self
    }

    /// Finishes the pipeline.
    pub fn build(self) -> Pipeline {
        self.pipeline
    }
}

fn make_step<F, Fut>(name: String, options: StepOptions, f: F) -> Step
where
    F: Fn(PipelineContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), StepError>> + Send + 'static,
{
    Step {
        name,
        options,
        run: Arc::new(move |ctx| Box::pin(f(ctx))),
        achieved: None,
    }
}

/// The step that failed and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step {step} failed: {error}")]
pub struct StepFailure {
    /// Step name.
    pub step: String,
    /// Its last error.
    pub error: StepError,
}

async fn run_steps(steps: &[Step], ctx: &PipelineContext) -> Result<(), StepFailure> {
    let mut progress: Vec<StepProgress> =
        steps.iter().map(|s| StepProgress::new(&s.name)).collect();
    ctx.inner
        .progress
        .lock()
        .expect("progress lock")
        .clone_from(&progress);
    for (index, step) in steps.iter().enumerate() {
        *ctx.inner.current_step.lock().expect("step lock") = index;
        let started = Instant::now();
        if let Some(check) = &step.achieved
            && check(ctx.clone()).await
        {
            progress[index].state = StepState::Skipped;
            progress[index].duration_ms = Some(started.elapsed().as_millis() as u64);
            ctx.publish(
                &progress,
                EventKind::StepSucceeded {
                    step: step.name.clone(),
                    duration_ms: 0,
                    skipped: true,
                },
            );
            continue;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            progress[index].state = StepState::Running;
            progress[index].attempts = attempt;
            ctx.publish(
                &progress,
                EventKind::StepStarted {
                    step: step.name.clone(),
                    attempt,
                },
            );
            let outcome =
                match tokio::time::timeout(step.options.timeout, (step.run)(ctx.clone())).await {
                    Ok(result) => result,
                    Err(_) => Err(StepError::transient(
                        FailureReason::StepTimeout,
                        format!(
                            "step {} timed out after {:?}",
                            step.name, step.options.timeout
                        ),
                    )),
                };
            // Progress messages may have been written while the step ran.
            progress[index].message = ctx.inner.progress.lock().expect("progress lock")[index]
                .message
                .clone();
            match outcome {
                Ok(()) => {
                    let duration_ms = started.elapsed().as_millis() as u64;
                    progress[index].state = StepState::Succeeded;
                    progress[index].duration_ms = Some(duration_ms);
                    ctx.publish(
                        &progress,
                        EventKind::StepSucceeded {
                            step: step.name.clone(),
                            duration_ms,
                            skipped: false,
                        },
                    );
                    break;
                }
                Err(error) => {
                    progress[index].last_error = Some(error.message.clone());
                    let retry =
                        error.kind == StepErrorKind::Transient && attempt <= step.options.retries;
                    if !retry {
                        progress[index].state = StepState::Failed;
                        progress[index].duration_ms = Some(started.elapsed().as_millis() as u64);
                        ctx.publish(
                            &progress,
                            EventKind::StepFailed {
                                step: step.name.clone(),
                                error: error.message.clone(),
                            },
                        );
                        return Err(StepFailure {
                            step: step.name.clone(),
                            error,
                        });
                    }
                    let delay = step.options.delay(attempt);
                    progress[index].state = StepState::Retrying;
                    ctx.publish(
                        &progress,
                        EventKind::StepRetrying {
                            step: step.name.clone(),
                            attempt,
                            error: error.message,
                            delay_ms: delay.as_millis() as u64,
                        },
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    Ok(())
}

/// What steps see: the service, its spec, the runtime, and scratch data passed between steps.
/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct PipelineContext {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    service_id: String,
    generation: u64,
    spec: DeploySpec,
    shimlet: Arc<dyn Shimlet>,
    observer: Arc<dyn PipelineObserver>,
    scratch: Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
    progress: Mutex<Vec<StepProgress>>,
    current_step: Mutex<usize>,
    unblocked: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PipelineContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineContext")
            .field("service_id", &self.inner.service_id)
            .field("generation", &self.inner.generation)
            .finish_non_exhaustive()
    }
}

/// The endpoint a pipeline exposes; the engine reads it after a successful run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed(pub String);

impl PipelineContext {
    /// A context for one run.
    pub fn new(
        service_id: impl Into<String>,
        generation: u64,
        spec: DeploySpec,
        shimlet: Arc<dyn Shimlet>,
        observer: Arc<dyn PipelineObserver>,
    ) -> Self {
        Self {
            inner: Arc::new(ContextInner {
                service_id: service_id.into(),
                generation,
                spec,
                shimlet,
                observer,
                scratch: Mutex::new(HashMap::new()),
                progress: Mutex::new(Vec::new()),
                current_step: Mutex::new(0),
                unblocked: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The service id.
    pub fn service_id(&self) -> &str {
        &self.inner.service_id
    }

    /// The spec generation being deployed.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The requested spec.
    pub fn spec(&self) -> &DeploySpec {
        &self.inner.spec
    }

    /// The runtime.
    pub fn shimlet(&self) -> &Arc<dyn Shimlet> {
        &self.inner.shimlet
    }

    /// Stores a value for later steps (one per type).
    pub fn put<T: Any + Send + Sync>(&self, value: T) {
        self.inner
            .scratch
            .lock()
            .expect("scratch lock")
            .insert(TypeId::of::<T>(), Box::new(value));
    }

    /// A value an earlier step stored.
    pub fn get<T: Any + Send + Sync + Clone>(&self) -> Option<T> {
        let scratch = self.inner.scratch.lock().expect("scratch lock");
        scratch
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
            .cloned()
    }

    /// Sets the endpoint the service will report once running.
    pub fn set_endpoint(&self, url: impl Into<String>) {
        self.put(Exposed(url.into()));
    }

    /// The endpoint set by a step, if any.
    pub fn endpoint(&self) -> Option<String> {
        self.get::<Exposed>().map(|e| e.0)
    }

    /// Reports progress of the running step (shown in the API, published as an event).
    pub fn report(&self, message: impl Into<String>) {
        let message = message.into();
        let index = *self.inner.current_step.lock().expect("step lock");
        let snapshot = {
            let mut progress = self.inner.progress.lock().expect("progress lock");
            let Some(entry) = progress.get_mut(index) else {
                return;
            };
            entry.message = Some(message.clone());
            progress.clone()
        };
        let step = snapshot[index].name.clone();
        self.inner
            .observer
            .on_change(&snapshot, EventKind::StepProgress { step, message });
    }

    /// Says why the running step is not done yet although nothing has failed for good (e.g. a
    /// container that crashes and that the runtime restarts, fewer than `maxRestarts` times):
    /// the service keeps its phase and shows `why` as its reason and message, so a client sees
    /// what goes wrong before it turns `failed` or recovers. `None` withdraws it.
    pub fn set_reason(&self, why: Option<Failure>) {
        let index = *self.inner.current_step.lock().expect("step lock");
        let step = self
            .inner
            .progress
            .lock()
            .expect("progress lock")
            .get(index)
            .map(|s| s.name.clone());
        if let Some(step) = step {
            self.inner.observer.on_reason(&step, why.as_ref());
        }
    }

    /// Says that what this step was blocked on (resources, scheduling) is there now, so a service
    /// that waited as `pending` is `initializing` again while the step goes on (e.g. pods were
    /// scheduled and now load the model). Only the first call of a run counts.
    pub fn unblocked(&self) {
        if self
            .inner
            .unblocked
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let index = *self.inner.current_step.lock().expect("step lock");
        let step = self
            .inner
            .progress
            .lock()
            .expect("progress lock")
            .get(index)
            .map(|s| s.name.clone());
        if let Some(step) = step {
            self.inner.observer.on_unblocked(&step);
        }
    }

    fn publish(&self, progress: &[StepProgress], event: EventKind) {
        self.inner
            .progress
            .lock()
            .expect("progress lock")
            .clone_from(&progress.to_vec());
        self.inner.observer.on_change(progress, event);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::testing::InstantShimlet;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<EventKind>>);

    impl PipelineObserver for Recorder {
        fn on_change(&self, _steps: &[StepProgress], event: EventKind) {
            self.0.lock().unwrap().push(event);
        }
    }

    fn context(observer: Arc<Recorder>) -> PipelineContext {
        PipelineContext::new(
            "svc",
            1,
            DeploySpec::named("m"),
            Arc::new(InstantShimlet::default()),
            observer,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_with_exponential_backoff() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let options = StepOptions {
            retries: 3,
            backoff: Duration::from_secs(1),
            ..StepOptions::default()
        };
        let pipeline = Pipeline::new("p")
            .step_with("flaky", options, move |_ctx| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        Err(StepError::transient(FailureReason::RuntimeError, "blip"))
                    } else {
                        Ok(())
                    }
                }
            })
            .build();
        let recorder = Arc::new(Recorder::default());
        let started = tokio::time::Instant::now();
        pipeline.run(&context(recorder.clone())).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // 1 s then 2 s of backoff, on the paused clock.
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        let delays: Vec<u64> = recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                EventKind::StepRetrying { delay_ms, .. } => Some(*delay_ms),
                _ => None,
            })
            .collect();
        assert_eq!(delays, [1000, 2000]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_runs_out_and_names_the_step() {
        let options = StepOptions {
            retries: 1,
            ..StepOptions::default()
        };
        let pipeline = Pipeline::new("p")
            .step("ok", |_ctx| async { Ok(()) })
            .step_with("broken", options, |_ctx| async {
                Err(StepError::transient(
                    FailureReason::RuntimeError,
                    "still broken",
                ))
            })
            .step("never", |_ctx| async {
                panic!("must not run after a failed step")
            })
            .build();
        let failure = pipeline
            .run(&context(Arc::new(Recorder::default())))
            .await
            .unwrap_err();
        assert_eq!(failure.step, "broken");
        assert_eq!(failure.error.message, "still broken");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_step_times_out_and_counts_as_transient() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let options = StepOptions {
            retries: 1,
            timeout: Duration::from_secs(10),
            ..StepOptions::default()
        };
        let pipeline = Pipeline::new("p")
            .step_with("hang", options, move |_ctx| {
                counter.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
            })
            .build();
        let started = tokio::time::Instant::now();
        let failure = pipeline
            .run(&context(Arc::new(Recorder::default())))
            .await
            .unwrap_err();
        assert_eq!(failure.error.reason, FailureReason::StepTimeout);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(started.elapsed(), Duration::from_millis(20_500));
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried_and_scratch_data_flows_between_steps() {
        #[derive(Clone)]
        struct Rendered(u32);
        let pipeline = Pipeline::new("p")
            .step("render", |ctx: PipelineContext| async move {
                ctx.put(Rendered(7));
                Ok(())
            })
            .step("use", |ctx: PipelineContext| async move {
                let Rendered(n) = ctx.get::<Rendered>().expect("set by render");
                Err(StepError::permanent(
                    FailureReason::InvalidSpec,
                    format!("saw {n}"),
                ))
            })
            .build();
        let recorder = Arc::new(Recorder::default());
        let failure = pipeline.run(&context(recorder.clone())).await.unwrap_err();
        assert_eq!(failure.error.message, "saw 7");
        let starts = recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, EventKind::StepStarted { .. }))
            .count();
        assert_eq!(starts, 2);
    }

    #[tokio::test]
    async fn goal_style_steps_are_skipped_when_their_goal_holds() {
        let pipeline = Pipeline::new("p")
            .step("apply", |_ctx| async {
                panic!("goal holds; must be skipped")
            })
            .achieved_when(|_ctx| async { true })
            .build();
        let recorder = Arc::new(Recorder::default());
        pipeline.run(&context(recorder.clone())).await.unwrap();
        assert!(matches!(
            &recorder.0.lock().unwrap()[0],
            EventKind::StepSucceeded { skipped: true, .. }
        ));
    }
}
