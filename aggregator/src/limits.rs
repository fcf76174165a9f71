//! Ingest load limits: what bounds the aggregator's memory and each host's share of it.
//!
//! Invariants:
//! - A frame's bytes are reserved from one global budget ([`InflightBudget`],
//!   `ingest.max_inflight_bytes`) after its length prefix is read and before its payload is;
//!   before the payload is decoded, the reservation grows to the most it can decode into
//!   ([`common::decoded_size::bound`]), and it stays reserved until the batch is acked or
//!   refused. A payload whose bound is over the whole budget is refused undecoded; one that
//!   waits more than 5 s for the rest of its reservation is refused with `retry_after_ms`
//!   (reason `busy`), which releases its bytes, so reads holding part of the budget while
//!   waiting for more can never wait on each other forever. Frames being read and batches waiting in
//!   the commit queue together never hold more than the budget; a stream that cannot reserve
//!   waits, and QUIC flow control then holds its sender. The budget is at least one maximum
//!   frame (checked in the config), so every frame can eventually be read.
//! - Each host may send `ingest.host_rate_bytes_per_sec` of batches on average, in bursts of up
//!   to `ingest.host_burst_bytes` ([`HostRates`], a token bucket per host). A batch over the rate
//!   is refused with `retry_after_ms` (the agent keeps it and tries again) and counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::ids::HostId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The global budget of bytes held by frames being read or batches waiting to be committed.
#[derive(Debug, Clone)]
pub struct InflightBudget {
    bytes: Arc<Semaphore>,
    capacity: usize,
}

impl InflightBudget {
    /// A budget of `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        // One reservation takes at most u32::MAX permits, so the budget stops there (4 GiB).
        let permits = usize::try_from(max_bytes.min(u64::from(u32::MAX)))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self { bytes: Arc::new(Semaphore::new(permits)), capacity: permits }
    }

    /// The whole budget: a reservation over it could never be granted.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reserves `len` bytes, waiting while the budget is spent. `None` only if the budget was
    /// closed (never, today).
    pub async fn reserve(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        // Never more than the whole budget, which fits a u32 (see `new`).
        let n = u32::try_from(len.min(self.capacity)).unwrap_or(u32::MAX);
        self.bytes.clone().acquire_many_owned(n).await.ok()
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// Token buckets of batch bytes, one per host.
#[derive(Debug)]
pub struct HostRates {
    bytes_per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<HostId, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl HostRates {
    /// `bytes_per_sec` on average, bursts up to `burst_bytes`.
    pub fn new(bytes_per_sec: u64, burst_bytes: u64) -> Self {
        Self {
            bytes_per_sec: (bytes_per_sec as f64).max(1.0),
            burst: burst_bytes as f64,
            buckets: Mutex::default(),
        }
    }

    /// Takes `bytes` from `host`'s bucket at `now`, or says how long until it could.
    pub fn take(&self, host: &HostId, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry(host.clone()).or_insert(Bucket { tokens: self.burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.bytes_per_sec).min(self.burst);
        bucket.at = now;
        let want = bytes as f64;
        if bucket.tokens >= want {
            bucket.tokens -= want;
            Ok(())
        } else {
            let wait = (want.min(self.burst) - bucket.tokens) / self.bytes_per_sec;
            Err(Duration::from_secs_f64(wait.clamp(0.001, 3600.0)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_over_its_rate_is_told_when_to_retry() {
        let rates = HostRates::new(1000, 5000);
        let (a, b) = (HostId::new("a").unwrap(), HostId::new("b").unwrap());
        let t0 = Instant::now();
        assert_eq!(rates.take(&a, 5000, t0), Ok(()), "a full burst passes");
        let wait = rates.take(&a, 2000, t0).unwrap_err();
        assert!((1.9..=2.1).contains(&wait.as_secs_f64()), "{wait:?}");
        assert_eq!(rates.take(&b, 5000, t0), Ok(()), "hosts have their own buckets");
        assert_eq!(rates.take(&a, 2000, t0 + Duration::from_secs(2)), Ok(()));
    }

    #[tokio::test]
    async fn the_budget_holds_bytes_until_released() {
        let budget = InflightBudget::new(100);
        let first = budget.reserve(60).await.unwrap();
        assert_eq!(budget.available(), 40);
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.reserve(60)).await;
        assert!(waiting.is_err(), "a reservation over the budget waits");
        drop(first);
        assert!(budget.reserve(60).await.is_some());
    }
}
