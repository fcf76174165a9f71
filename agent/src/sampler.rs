//! The sampling thread and the sealer.
//!
//! Each sample also carries the served models' statistics since the previous sample, when the
//! agent serves models.
//!
//! The collectors are blocking (NVML calls, exec sources), so they live on one dedicated thread
//! that takes a sample every `sample_interval` on a fixed schedule and hands it to the async
//! side. The sealer buffers samples and, every uplink interval, seals them into the spool as one
//! batch (flushed to disk) and wakes the uplink. At stop it seals whatever it still holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use common::config::agent::TelemetryConfig;
use common::proto::{Inventory, Sample};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, warn};

use crate::serving::ModelTelemetry;
use crate::spool::{Spool, SpoolError};
use crate::telemetry::{Collectors, TelemetryError};

/// Samples buffered between the thread and the sealer before the thread waits.
const CHANNEL_DEPTH: usize = 1024;

/// Why sampling could not start.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A collector could not be built.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The thread could not be started or died at once.
    #[error("telemetry thread")]
    Thread(#[source] std::io::Error),
}

/// Handle to the sampling thread.
#[derive(Debug)]
pub struct Sampler {
    stop: std_mpsc::Sender<()>,
}

impl Sampler {
    /// Starts the sampling thread. Returns once the collectors are built, with the host's
    /// inventory and the stream of samples.
    pub async fn start(
        config: &TelemetryConfig,
        labels: &BTreeMap<String, String>,
        models: Option<ModelTelemetry>,
    ) -> Result<(Self, Inventory, mpsc::Receiver<Sample>), SamplerError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (sample_tx, sample_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (stop_tx, stop_rx) = std_mpsc::channel();
        let config = config.clone();
        let labels = labels.clone();
        let spawned = std::thread::Builder::new().name("telemetry".into()).spawn(move || {
            let mut collectors = match Collectors::new(&config) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if ready_tx.send(Ok(collectors.inventory(&labels))).is_err() {
                return;
            }
            sample_loop(&mut collectors, models, config.sample_interval, &sample_tx, &stop_rx);
        });
        if let Err(e) = spawned {
            return Err(SamplerError::Thread(e));
        }
        match ready_rx.await {
            Ok(Ok(inventory)) => Ok((Self { stop: stop_tx }, inventory, sample_rx)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SamplerError::Thread(std::io::Error::other(
                "telemetry thread ended before reporting its inventory",
            ))),
        }
    }

    /// Asks the thread to stop after its current sample; the sample stream then ends.
    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

fn sample_loop(
    collectors: &mut Collectors,
    models: Option<ModelTelemetry>,
    interval: Duration,
    out: &mpsc::Sender<Sample>,
    stop: &std_mpsc::Receiver<()>,
) {
    let start = Instant::now();
    let mut n: u32 = 0;
    let mut last_models = start;
    loop {
        let mut sample = collectors.sample();
        if let Some(models) = &models {
            let now = Instant::now();
            sample.models = models.take(now - last_models);
            last_models = now;
        }
        if out.blocking_send(sample).is_err() {
            return;
        }
        // Fixed schedule: a slow sample does not push every later one back.
        n = n.saturating_add(1);
        let next = start + interval.saturating_mul(n);
        let now = Instant::now();
        if next <= now {
            let behind = now - next;
            warn!(
                behind_ms = u64::try_from(behind.as_millis()).unwrap_or(u64::MAX),
                "Sampling fell behind schedule."
            );
            n = u32::try_from((now - start).as_nanos() / interval.as_nanos().max(1))
                .unwrap_or(u32::MAX);
            continue;
        }
        match stop.recv_timeout(next - now) {
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Buffers samples and seals them into the spool every `every`; at the end of the stream seals
/// the rest. Wakes the uplink after each seal.
pub async fn seal(
    mut samples: mpsc::Receiver<Sample>,
    spool: Arc<Spool>,
    sealed: Arc<Notify>,
    every: Duration,
) -> Result<(), SpoolError> {
    let mut buffer = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            s = samples.recv() => match s {
                Some(s) => buffer.push(s),
                None => break,
            },
            _ = tick.tick() => {
                if !buffer.is_empty() {
                    seal_now(&spool, std::mem::take(&mut buffer)).await?;
                    sealed.notify_one();
                }
            }
        }
    }
    if !buffer.is_empty() {
        seal_now(&spool, buffer).await?;
        sealed.notify_one();
    }
    Ok(())
}

async fn seal_now(spool: &Arc<Spool>, samples: Vec<Sample>) -> Result<(), SpoolError> {
    let spool = spool.clone();
    let n = samples.len();
    let sealed = tokio::task::spawn_blocking(move || {
        let seq = spool.append(samples)?;
        spool.flush()?;
        Ok::<_, SpoolError>(seq)
    })
    .await;
    match sealed {
        Ok(Ok(seq)) => {
            debug!(%seq, samples = n, "Sealed batch into spool.");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        // The closure does not panic; a cancelled blocking task means the runtime is going away.
        Err(_) => Ok(()),
    }
}
