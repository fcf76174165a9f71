//! One loaded model version: its signature, its batch queue and worker, the instance threads
//! that run batches on its engine, and its statistics.
//!
//! ```text
//! API --push--> Shared<Pending> queue --worker forms Batch--> instance threads --Engine::run--> replies
//! ```
//! Instance threads are plain OS threads, never the async runtime's workers. A panic inside an
//! engine fails that batch's requests and the thread goes on.
//!
//! Invariant: every queued request gets an answer. Stopping the model (unload, reload,
//! shutdown) and the end of the batch worker for any reason close the queue and answer each
//! request still in it with [`InferError::Unloaded`] and the [`StopCause`]; a request pushed
//! after the close answers the queue itself; a reply dropped unanswered (a thread that died)
//! reads as `Unloaded` with [`StopCause::Lost`].

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::batcher::{self, Batch, Executor, Policy, Refusal, Shared};
use super::model_config::ModelConfig;
use super::runner::{Engine, Signature};
use super::stats::{ModelStats, Outcome};
use super::tensor::Tensor;

/// A request waiting for its batch.
pub struct Pending {
    /// Inputs in signature order.
    pub inputs: Vec<Tensor>,
    /// Rows along axis 0 (1 for an unbatched model).
    pub rows: usize,
    /// When the API received it.
    pub arrived: Instant,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Vec<Tensor>, InferError>>,
}

/// Why an inference did not produce outputs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// Refused at admission.
    #[error("model {model}: {refusal}")]
    Refused {
        /// Model name.
        model: String,
        /// Why.
        refusal: Refusal,
    },
    /// The deadline passed before compute could finish.
    #[error(
        "model {model}: the request's deadline passed before it could be computed (timeout {timeout_us} us); raise the timeout or add instances"
    )]
    Expired {
        /// Model name.
        model: String,
        /// The timeout the request had.
        timeout_us: u64,
    },
    /// The engine failed.
    #[error("model {model}: inference failed: {message}")]
    Failed {
        /// Model name.
        model: String,
        /// The engine's message.
        message: String,
    },
    /// The model stopped serving (unload, reload, shutdown) before the request could run.
    #[error(
        "model {model} {cause}; the request was not run, retry it (on another host if this one is stopping)"
    )]
    Unloaded {
        /// Model name.
        model: String,
        /// Why it stopped.
        cause: StopCause,
    },
}

/// Why a loaded model version stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StopCause {
    /// `POST /v2/repository/models/M/unload`.
    #[error("was unloaded")]
    Unload,
    /// A new load replaced this version.
    #[error("is being reloaded")]
    Reload,
    /// The agent is shutting down.
    #[error("is stopping because the agent is shutting down")]
    Shutdown,
    /// The batch worker task ended on its own (a bug; logged at ERROR).
    #[error("stopped serving because its batch worker ended unexpectedly")]
    WorkerEnded,
    /// Every instance thread is gone.
    #[error("has no instance threads left")]
    NoInstances,
    /// The reply was dropped unanswered inside the agent (a bug).
    #[error("lost the request inside the agent (an instance thread failed)")]
    Lost,
}

/// A loaded, serving model version.
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Version directory name.
    pub version: String,
    /// Its config.
    pub config: ModelConfig,
    /// What it takes and returns.
    pub signature: Signature,
    /// Its statistics.
    pub stats: Arc<ModelStats>,
    queue: Arc<Shared<Pending>>,
    stop: CancellationToken,
    cause: Arc<OnceLock<StopCause>>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

struct ThreadExecutor {
    model: String,
    jobs: Mutex<std_mpsc::Sender<(Batch<Pending>, OwnedSemaphorePermit)>>,
    stats: Arc<ModelStats>,
}

impl Executor<Pending> for ThreadExecutor {
    fn submit(&self, batch: Batch<Pending>, permit: OwnedSemaphorePermit) {
        // A poisoned lock still holds a working sender.
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Err(std_mpsc::SendError((unsent, _))) = jobs.send((batch, permit)) else { return };
        drop(jobs);
        error!(model = %self.model, "No instance thread is left to run batches.");
        answer_unloaded(&self.model, &self.stats, unsent.items, StopCause::NoInstances);
    }

    fn expired(&self, items: Vec<Pending>) {
        for p in items {
            self.stats.request_ended(Outcome::Expired);
            let _ =
                p.reply.send(Err(InferError::Expired { model: self.model.clone(), timeout_us: 0 }));
        }
    }
}

impl LoadedModel {
    /// Starts serving `engine` with the model's batching and instance settings. Must be called
    /// inside a tokio runtime (the batch worker is a task).
    pub fn start(
        name: &str,
        version: &str,
        config: ModelConfig,
        signature: Signature,
        engine: Arc<dyn Engine>,
    ) -> std::io::Result<Arc<Self>> {
        let mut policy = Policy::from_config(&config);
        policy.max_batch_size = signature.max_batch_size;
        let slots = signature.max_batch_size;
        let queue = Arc::new(Shared::new(policy));
        let stats = Arc::new(ModelStats::new(name, version));
        let stop = CancellationToken::new();
        let cause = Arc::new(OnceLock::new());
        let (tx, rx) = std_mpsc::channel::<(Batch<Pending>, OwnedSemaphorePermit)>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..config.instances {
            let rx = rx.clone();
            let engine = engine.clone();
            let stats = stats.clone();
            let queue = queue.clone();
            let model = name.to_owned();
            std::thread::Builder::new().name(format!("model-{name}-{i}")).spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    let Ok((batch, permit)) = job else { return };
                    // A panic outside the engine call drops the batch's replies, which their
                    // callers read as `StopCause::Lost`; the thread lives on for the next batch.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_batch(&model, engine.as_ref(), &stats, &queue, batch, slots);
                    }));
                    if ran.is_err() {
                        error!(model = %model, "An instance thread panicked around a batch; its requests were failed.");
                    }
                    drop(permit);
                }
            })?;
        }
        let executor: Arc<dyn Executor<Pending>> = Arc::new(ThreadExecutor {
            model: name.to_owned(),
            jobs: Mutex::new(tx),
            stats: stats.clone(),
        });
        let worker = tokio::spawn(batcher::run_worker(
            queue.clone(),
            Arc::new(Semaphore::new(config.instances)),
            executor,
            stop.clone(),
        ));
        // However the worker ends (stopped, returned, panicked), close the queue and answer
        // what is left in it, so no request waits on a worker that is gone.
        let watch = Closer {
            model: name.to_owned(),
            stats: stats.clone(),
            queue: queue.clone(),
            stop: stop.clone(),
            cause: cause.clone(),
        };
        tokio::spawn(async move {
            let ended = worker.await;
            if !watch.stop.is_cancelled() {
                let why = ended.err().map(|e| e.to_string()).unwrap_or_default();
                error!(model = %watch.model, why = %why, "The batch worker ended unexpectedly; failing queued requests.");
            }
            watch.close(StopCause::WorkerEnded);
        });
        Ok(Arc::new(Self {
            name: name.to_owned(),
            version: version.to_owned(),
            config,
            signature,
            stats,
            queue,
            stop,
            cause,
        }))
    }

    /// Queues a request and waits for its outputs. `timeout` overrides the model's default.
    pub async fn infer(
        &self,
        inputs: Vec<Tensor>,
        priority: Option<u32>,
        timeout: Option<Duration>,
    ) -> Result<Vec<Tensor>, InferError> {
        let arrived = Instant::now();
        let rows = if self.signature.max_batch_size == 0 {
            1
        } else {
            inputs.first().map_or(1, Tensor::rows)
        };
        let timeout = timeout.or(self.config.default_timeout);
        let deadline = timeout.map(|t| arrived + t);
        let (tx, rx) = oneshot::channel();
        let pending = Pending { inputs, rows, arrived, reply: tx };
        let priority = priority.unwrap_or(self.config.default_priority);
        if let Err((_, refusal)) = self.queue.push(pending, rows, priority, deadline) {
            self.stats.request_ended(Outcome::Rejected);
            return Err(InferError::Refused { model: self.name.clone(), refusal });
        }
        if self.stop.is_cancelled() {
            // Stopped between our lookup and our push: the closer may have drained already,
            // so answer the queue (this request included) here.
            self.closer().close(StopCause::Unload);
        }
        match rx.await {
            Ok(Err(InferError::Expired { model, .. })) => Err(InferError::Expired {
                model,
                timeout_us: timeout.map_or(0, |t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX)),
            }),
            Ok(result) => result,
            Err(_) => Err(InferError::Unloaded {
                model: self.name.clone(),
                cause: self.cause.get().copied().unwrap_or(StopCause::Lost),
            }),
        }
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.queue.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Stops the worker and answers every queued request with [`InferError::Unloaded`] and
    /// `cause`. Batches already running finish. Later pushes are answered the same way.
    pub fn stop(&self, cause: StopCause) {
        self.closer().close(cause);
    }

    /// Why this version stopped, once it has.
    pub fn stopped_because(&self) -> Option<StopCause> {
        self.cause.get().copied()
    }

    fn closer(&self) -> Closer {
        Closer {
            model: self.name.clone(),
            stats: self.stats.clone(),
            queue: self.queue.clone(),
            stop: self.stop.clone(),
            cause: self.cause.clone(),
        }
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        self.closer().close(StopCause::Unload);
    }
}

/// Closes a model's queue: the first cause wins, the worker stops, every queued request is
/// answered.
struct Closer {
    model: String,
    stats: Arc<ModelStats>,
    queue: Arc<Shared<Pending>>,
    stop: CancellationToken,
    cause: Arc<OnceLock<StopCause>>,
}

impl Closer {
    fn close(&self, cause: StopCause) {
        let _ = self.cause.set(cause);
        let cause = self.cause.get().copied().unwrap_or(cause);
        // Cancel before draining: a push that misses this drain sees the cancel and drains.
        self.stop.cancel();
        let drained = match self.queue.queue.lock() {
            Ok(mut q) => q.drain_all(),
            Err(poisoned) => poisoned.into_inner().drain_all(),
        };
        answer_unloaded(&self.model, &self.stats, drained, cause);
    }
}

fn answer_unloaded(model: &str, stats: &ModelStats, items: Vec<Pending>, cause: StopCause) {
    for p in items {
        stats.request_ended(Outcome::Failure);
        let _ = p.reply.send(Err(InferError::Unloaded { model: model.to_owned(), cause }));
    }
}

fn run_batch(
    model: &str,
    engine: &dyn Engine,
    stats: &ModelStats,
    queue: &Shared<Pending>,
    batch: Batch<Pending>,
    slots: usize,
) {
    let dispatched = Instant::now();
    let Batch { mut items, rows, reason } = batch;
    let inputs = if items.len() == 1 {
        Ok(std::mem::take(&mut items[0].inputs))
    } else {
        (0..items[0].inputs.len())
            .map(|i| {
                let parts: Vec<&Tensor> = items.iter().map(|p| &p.inputs[i]).collect();
                Tensor::concat_rows(&parts).map_err(|e| e.0)
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let started = std::time::Instant::now();
    let result = inputs.and_then(|inputs| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(inputs)))
            .map_err(|_| "the engine panicked; the batch was dropped".to_owned())
            .and_then(|r| r.map_err(|e| e.0))
    });
    let compute = started.elapsed();
    queue.observe_compute(compute);
    stats.batch_ran(rows, slots.max(rows), compute, reason);
    let outputs = match result {
        Ok(outputs) => outputs,
        Err(message) => {
            warn!(model, rows, error = %message, "Batch failed.");
            for p in items {
                stats.request_ended(Outcome::Failure);
                let _ = p.reply.send(Err(InferError::Failed {
                    model: model.to_owned(),
                    message: message.clone(),
                }));
            }
            return;
        }
    };
    let single = items.len() == 1;
    let mut whole = Some(outputs);
    let mut start = 0;
    for p in items {
        // One request keeps the outputs as they are; several each get their rows.
        let mine = match whole.as_ref() {
            Some(outputs) if !single => {
                outputs.iter().map(|o| o.slice_rows(start, p.rows)).collect::<Result<Vec<_>, _>>()
            }
            _ => Ok(whole.take().unwrap_or_default()),
        };
        start += p.rows;
        let now = Instant::now();
        match mine {
            Ok(out) => {
                stats.request_succeeded(now - p.arrived, dispatched - p.arrived);
                let _ = p.reply.send(Ok(out));
            }
            Err(e) => {
                stats.request_ended(Outcome::Failure);
                let message = format!("splitting the batch's outputs: {e}");
                let _ = p.reply.send(Err(InferError::Failed { model: model.to_owned(), message }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::runner::{IoSpec, RunError};
    use crate::serving::tensor::DataType;

    /// An engine that takes `delay` per batch and echoes its inputs.
    struct Slow {
        delay: Duration,
    }

    impl Engine for Slow {
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            std::thread::sleep(self.delay);
            Ok(inputs)
        }
    }

    fn slow_model(delay: Duration) -> Arc<LoadedModel> {
        let io =
            |name: &str| IoSpec { name: name.to_owned(), datatype: DataType::F32, dims: vec![1] };
        let signature = Signature {
            inputs: vec![io("x")],
            outputs: vec![io("y")],
            max_batch_size: 0,
            batching_off_reason: None,
        };
        let config = ModelConfig { max_batch_size: 0, instances: 1, ..ModelConfig::default() };
        LoadedModel::start("slow", "1", config, signature, Arc::new(Slow { delay }))
            .expect("instance thread")
    }

    fn one() -> Vec<Tensor> {
        vec![Tensor::from_bytes(DataType::F32, vec![1], 1.0f32.to_le_bytes().to_vec()).expect("x")]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_answers_every_queued_request_with_its_cause() {
        let model = slow_model(Duration::from_millis(100));
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let m = model.clone();
                tokio::spawn(async move { m.infer(one(), None, None).await })
            })
            .collect();
        // Let one batch start and the rest queue (no deadlines: the default).
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(model.queued() >= 6, "queued {}", model.queued());
        model.stop(StopCause::Unload);
        let mut unloaded = 0;
        for call in calls {
            let answer = tokio::time::timeout(Duration::from_secs(2), call)
                .await
                .expect("every request is answered after stop")
                .expect("task");
            match answer {
                Ok(_) => {}
                Err(InferError::Unloaded { cause: StopCause::Unload, .. }) => unloaded += 1,
                Err(other) => panic!("unexpected answer {other}"),
            }
        }
        assert!(unloaded >= 6, "{unloaded} of 8 answered unloaded");
        assert_eq!(model.queued(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_after_stop_is_answered_with_the_first_cause() {
        let model = slow_model(Duration::from_millis(1));
        model.stop(StopCause::Shutdown);
        model.stop(StopCause::Unload);
        let answer = tokio::time::timeout(Duration::from_secs(2), model.infer(one(), None, None))
            .await
            .expect("answered, not left waiting");
        let err = answer.expect_err("refused after stop");
        assert!(matches!(err, InferError::Unloaded { cause: StopCause::Shutdown, .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("slow") && text.contains("shutting down"), "{text}");
    }
}
