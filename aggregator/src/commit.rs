//! Group commit: many connections' batches share one durable flush.
//!
//! Ingest handlers hand each decoded batch to the [`Committer`] handle (a bounded queue) and
//! wait for its outcome. The worker takes everything queued (up to [`MAX_GROUP`]), stores the
//! group with one flush on a blocking thread, and answers each handler. While one group is being
//! flushed the next one gathers, so throughput grows with load instead of paying one fsync per
//! batch. A full queue makes handlers wait (backpressure on the QUIC streams), never drops.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::error;

use crate::stats::Stats;
use crate::store::{CommitOutcome, IncomingBatch, TelemetryStore};

/// Most batches stored under one flush.
pub const MAX_GROUP: usize = 2048;

/// How long the worker waits for more batches to join a group before flushing it.
pub const GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// Batches waiting for the worker before handlers are made to wait.
const QUEUE_DEPTH: usize = 8192;

/// Why a batch could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The store failed; the agent keeps the batch and retries.
    #[error("storing the batch failed: {0}")]
    Store(String),
    /// The aggregator is stopping.
    #[error("the aggregator is stopping")]
    Stopping,
}

struct Request {
    batch: IncomingBatch,
    reply: oneshot::Sender<Result<CommitOutcome, CommitError>>,
}

/// Handle to the commit worker.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl Committer {
    /// Starts the worker. It ends when every handle is dropped, after committing what is queued.
    pub fn start(
        store: Arc<dyn TelemetryStore>,
        stats: Arc<Stats>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let worker = common::daemon::spawn_watched("commit worker", work(rx, store, stats));
        (Self { tx }, worker)
    }

    /// Stores `batch` and waits until it is durable.
    pub async fn commit(&self, batch: IncomingBatch) -> Result<CommitOutcome, CommitError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request { batch, reply }).await.map_err(|_| CommitError::Stopping)?;
        answer.await.map_err(|_| CommitError::Stopping)?
    }
}

async fn work(mut rx: mpsc::Receiver<Request>, store: Arc<dyn TelemetryStore>, stats: Arc<Stats>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        if group.len() < MAX_GROUP {
            // Let a few more batches join before paying for a flush: at moderate load this
            // turns many small flushes into one, for at most GATHER of extra ack latency.
            tokio::time::sleep(GATHER).await;
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
        }
        let (batches, replies): (Vec<_>, Vec<_>) =
            group.drain(..).map(|r| (r.batch, r.reply)).unzip();
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || store.commit(&batches)).await;
        stats.commit_groups.inc();
        match result {
            Ok(Ok(outcomes)) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Ok(Err(e)) => {
                error!(error = %common::daemon::error_chain(&e), batches = replies.len(), "Store failed; agents will retry.");
                for reply in replies {
                    let _ = reply.send(Err(CommitError::Store(e.to_string())));
                }
            }
            Err(join) => {
                error!(error = %join, "Commit task failed; agents will retry.");
                for reply in replies {
                    let _ = reply.send(Err(CommitError::Store(join.to_string())));
                }
            }
        }
    }
}
