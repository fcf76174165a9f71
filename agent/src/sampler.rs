//! The sampling thread and the sealer.
//!
//! Each sample also carries the served models' statistics since the previous sample, when the
//! agent serves models.
//!
//! The collectors are blocking (NVML calls, exec sources), so they live on one dedicated thread
//! that takes a sample every `sample_interval` on a fixed schedule and hands it to the async
//! side. The sealer buffers samples and, every uplink interval, seals them into the spool as one
//! batch (flushed to disk) and wakes the uplink. At stop it seals whatever it still holds.
//!
//! Failures never end telemetry silently: a collector that panics costs that one sample (logged
//! at ERROR, counted in [`TelemetryHealth`]) and the schedule goes on; a spool write that fails
//! (disk full) is logged at ERROR, counted, and retried with exponential backoff while the
//! samples stay buffered (up to [`MAX_UNSEALED`]; beyond that the oldest go, logged at ERROR).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use common::config::agent::TelemetryConfig;
use common::daemon::error_chain;
use common::proto::{Inventory, Sample};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::health::TelemetryHealth;
use crate::serving::ModelTelemetry;
use crate::spool::{Spool, SpoolError};
use crate::telemetry::{Collectors, TelemetryError};

/// Samples buffered between the thread and the sealer before the thread waits.
const CHANNEL_DEPTH: usize = 1024;

/// Samples the sealer holds while the spool cannot be written, before it drops the oldest.
pub const MAX_UNSEALED: usize = 3600;

/// Longest wait between attempts to seal into a failing spool.
const MAX_SEAL_BACKOFF: Duration = Duration::from_secs(60);

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
    interval: SampleInterval,
}

/// The sampling interval, changeable while the thread runs (by a `set_telemetry_interval`
/// directive); the thread starts a fresh schedule from the next sample.
#[derive(Debug, Clone)]
pub struct SampleInterval(Arc<std::sync::atomic::AtomicU64>);

impl SampleInterval {
    fn new(d: Duration) -> Self {
        Self(Arc::new(std::sync::atomic::AtomicU64::new(millis(d))))
    }

    /// A handle not tied to a sampling thread (for tests of what sets it).
    pub fn for_tests(d: Duration) -> Self {
        Self::new(d)
    }

    /// The interval now.
    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(std::sync::atomic::Ordering::Relaxed).max(1))
    }

    /// Sets it; returns the previous one.
    pub fn set(&self, d: Duration) -> Duration {
        Duration::from_millis(self.0.swap(millis(d), std::sync::atomic::Ordering::Relaxed))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Sampler {
    /// Starts the sampling thread. Returns once the collectors are built, with the host's
    /// inventory and the stream of samples.
    pub async fn start(
        config: &TelemetryConfig,
        labels: &BTreeMap<String, String>,
        models: Option<ModelTelemetry>,
        health: Arc<TelemetryHealth>,
    ) -> Result<(Self, Inventory, mpsc::Receiver<Sample>), SamplerError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (sample_tx, sample_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (stop_tx, stop_rx) = std_mpsc::channel();
        let config = config.clone();
        let labels = labels.clone();
        let interval = SampleInterval::new(config.sample_interval);
        let thread_interval = interval.clone();
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
            sample_loop(&mut collectors, models, &thread_interval, &sample_tx, &stop_rx, &health);
        });
        if let Err(e) = spawned {
            return Err(SamplerError::Thread(e));
        }
        match ready_rx.await {
            Ok(Ok(inventory)) => Ok((Self { stop: stop_tx, interval }, inventory, sample_rx)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SamplerError::Thread(std::io::Error::other(
                "telemetry thread ended before reporting its inventory",
            ))),
        }
    }

    /// The interval handle (for directives).
    pub fn interval(&self) -> SampleInterval {
        self.interval.clone()
    }

    /// Asks the thread to stop after its current sample; the sample stream then ends.
    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

fn sample_loop(
    collectors: &mut Collectors,
    models: Option<ModelTelemetry>,
    interval_now: &SampleInterval,
    out: &mpsc::Sender<Sample>,
    stop: &std_mpsc::Receiver<()>,
    health: &TelemetryHealth,
) {
    let mut start = Instant::now();
    let mut interval = interval_now.get();
    let mut n: u32 = 0;
    let mut last_models = start;
    loop {
        let wanted = interval_now.get();
        if wanted != interval {
            // A new interval starts a fresh schedule from now.
            info!(from_ms = millis(interval), to_ms = millis(wanted), "Sampling interval changed.");
            interval = wanted;
            start = Instant::now();
            n = 0;
        }
        let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut sample = collectors.sample();
            if let Some(models) = &models {
                let now = Instant::now();
                sample.models = models.take(now - last_models);
                last_models = now;
            }
            sample
        }));
        match taken {
            Ok(sample) => {
                if out.blocking_send(sample).is_err() {
                    error!("The telemetry sealer is gone; sampling stopped.");
                    return;
                }
            }
            Err(panic) => {
                let why = panic_message(panic.as_ref());
                error!(reason = %why, "Taking a sample panicked; skipped it, sampling goes on.");
                health.record_error(&format!("taking a sample panicked: {why}"));
            }
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
        // Wait for the next sample in steps of at most a second, so a new interval takes
        // effect within a second rather than after the old (possibly long) one.
        loop {
            let now = Instant::now();
            if now >= next || interval_now.get() != interval {
                break;
            }
            match stop.recv_timeout((next - now).min(Duration::from_secs(1))) {
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Buffers samples and seals them into the spool every `every`; at the end of the stream seals
/// the rest. Wakes the uplink after each seal. A failing spool is retried with backoff (see the
/// module doc); only the last seal at stop returns its error.
pub async fn seal(
    mut samples: mpsc::Receiver<Sample>,
    spool: Arc<Spool>,
    sealed: Arc<Notify>,
    every: Duration,
    health: Arc<TelemetryHealth>,
) -> Result<(), SpoolError> {
    let mut buffer = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failures: u32 = 0;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut trimmed: u64 = 0;
    loop {
        tokio::select! {
            s = samples.recv() => match s {
                Some(s) => {
                    buffer.push(s);
                    if buffer.len() > MAX_UNSEALED {
                        buffer.remove(0);
                        trimmed += 1;
                        if trimmed == 1 || trimmed.is_multiple_of(600) {
                            error!(
                                lost = trimmed,
                                held = MAX_UNSEALED,
                                "The spool cannot be written and the sample buffer is full; \
                                 dropping the oldest samples."
                            );
                        }
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if buffer.is_empty() || retry_at.is_some_and(|t| tokio::time::Instant::now() < t) {
                    continue;
                }
                match seal_now(&spool, std::mem::take(&mut buffer)).await {
                    Ok(()) => {
                        if failures > 0 {
                            info!(failures, lost = trimmed, "Sealing into the spool works again.");
                        }
                        (failures, retry_at, trimmed) = (0, None, 0);
                        sealed.notify_one();
                    }
                    Err((e, unsealed)) => {
                        failures = failures.saturating_add(1);
                        let delay = every
                            .saturating_mul(2u32.saturating_pow(failures.min(16) - 1))
                            .min(MAX_SEAL_BACKOFF.max(every));
                        let chain = error_chain(&e);
                        error!(
                            error = %chain,
                            failures,
                            held = unsealed.as_ref().map_or(0, Vec::len),
                            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                            "Could not seal samples into the spool (disk full or failing?); \
                             keeping them and retrying."
                        );
                        health.record_error(&chain);
                        if let Some(mut unsealed) = unsealed {
                            unsealed.append(&mut buffer);
                            buffer = unsealed;
                        }
                        retry_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            }
        }
    }
    if !buffer.is_empty() {
        if let Err((e, _)) = seal_now(&spool, buffer).await {
            error!(error = %error_chain(&e), "Could not seal the last samples at stop; they are lost.");
            health.record_error(&error_chain(&e));
            return Err(e);
        }
        sealed.notify_one();
    }
    Ok(())
}

/// Appends and flushes one batch. On failure returns the error and, when the batch did not
/// reach the spool, its samples (a failed flush leaves the batch in the spool: not returned).
async fn seal_now(
    spool: &Arc<Spool>,
    samples: Vec<Sample>,
) -> Result<(), (SpoolError, Option<Vec<Sample>>)> {
    let spool = spool.clone();
    let n = samples.len();
    let sealed = tokio::task::spawn_blocking(move || {
        let seq = spool.append(&samples).map_err(|e| (e, Some(samples)))?;
        spool.flush().map_err(|e| (e, None))?;
        Ok::<_, (SpoolError, Option<Vec<Sample>>)>(seq)
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

#[cfg(test)]
mod tests {
    use super::*;
    use common::ids::Seq;

    #[tokio::test]
    async fn a_failing_spool_is_retried_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
        spool.fail_appends.store(3, std::sync::atomic::Ordering::Relaxed);
        let health = Arc::new(TelemetryHealth::default());
        let (tx, rx) = mpsc::channel(16);
        let sealer = tokio::spawn(seal(
            rx,
            spool.clone(),
            Arc::new(Notify::new()),
            Duration::from_millis(10),
            health.clone(),
        ));
        for i in 0..5 {
            tx.send(Sample { unix_ms: i, ..Sample::default() }).await.unwrap();
        }
        // Three failed attempts (10, 20, 40 ms of backoff), then a seal that works.
        let deadline = Instant::now() + Duration::from_secs(10);
        while spool.stats().batches == 0 {
            assert!(
                Instant::now() < deadline,
                "the sealer never recovered: {:?}",
                health.snapshot()
            );
            assert!(!sealer.is_finished(), "the sealer died on a spool error");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx.send(Sample { unix_ms: 5, ..Sample::default() }).await.unwrap();
        drop(tx);
        sealer.await.unwrap().unwrap();
        let state = health.snapshot();
        assert_eq!(state.errors, 3, "{state:?}");
        assert!(state.last_error.contains("injected failure"), "{state:?}");
        let (_, samples) = spool.produced().unwrap();
        assert_eq!(samples, 6, "every sample reached the spool");
        let pending = spool.oldest(Seq(0), 10).unwrap();
        assert_eq!(pending.len(), 2);
    }
}
