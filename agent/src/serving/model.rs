//! One loaded model version: its signature, its batch queue and worker, the instance threads
//! that run batches on its engine, and its statistics.
//!
//! ```text
//! API --push--> Shared<Pending> queue --worker forms Batch--> instance threads --Engine::run--> replies
//! ```
//! Instance threads are plain OS threads, never the async runtime's workers. A panic inside an
//! engine fails that batch's requests and the thread goes on.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

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
    /// The model was unloaded or stopped while the request waited.
    #[error("model {model} was unloaded while the request waited")]
    Unloaded {
        /// Model name.
        model: String,
    },
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
        let sent = self.jobs.lock().map(|jobs| jobs.send((batch, permit)));
        if let Ok(Err(std_mpsc::SendError((batch, _)))) = sent {
            for p in batch.items {
                self.stats.request_ended(Outcome::Failure);
                let _ = p.reply.send(Err(InferError::Unloaded { model: self.model.clone() }));
            }
        }
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
                        Err(_) => return,
                    };
                    let Ok((batch, permit)) = job else { return };
                    run_batch(&model, engine.as_ref(), &stats, &queue, batch, slots);
                    drop(permit);
                }
            })?;
        }
        let executor: Arc<dyn Executor<Pending>> = Arc::new(ThreadExecutor {
            model: name.to_owned(),
            jobs: Mutex::new(tx),
            stats: stats.clone(),
        });
        tokio::spawn(batcher::run_worker(
            queue.clone(),
            Arc::new(Semaphore::new(config.instances)),
            executor,
            stop.clone(),
        ));
        Ok(Arc::new(Self {
            name: name.to_owned(),
            version: version.to_owned(),
            config,
            signature,
            stats,
            queue,
            stop,
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
        match rx.await {
            Ok(Err(InferError::Expired { model, .. })) => Err(InferError::Expired {
                model,
                timeout_us: timeout.map_or(0, |t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX)),
            }),
            Ok(result) => result,
            Err(_) => Err(InferError::Unloaded { model: self.name.clone() }),
        }
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.queue.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Stops the worker and fails every queued request. Batches already running finish.
    pub fn stop(&self) {
        self.stop.cancel();
        let drained: Vec<Pending> = match self.queue.queue.lock() {
            Ok(mut q) => {
                q.expire(Instant::now() + Duration::from_secs(365 * 24 * 3600), Duration::ZERO)
            }
            Err(_) => Vec::new(),
        };
        for p in drained {
            self.stats.request_ended(Outcome::Failure);
            let _ = p.reply.send(Err(InferError::Unloaded { model: self.name.clone() }));
        }
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        self.stop.cancel();
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
