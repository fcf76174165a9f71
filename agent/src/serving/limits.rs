//! Admission limits of the inference API, checked before a request costs memory or a plan:
//! request bytes in flight (per model version and in total), HTTP requests at once, a time
//! limit per request, and the distinct free-dim shapes each model version accepts.
//!
//! Invariants: a limit is never waited on; a request over one is refused at once (503 for
//! bytes and concurrency, 504 for time, 400 for a new shape past the cap) with a message naming
//! the `serving.*` key, and counted in [`Limits::refusals`]. Byte reservations are released when
//! the request's future ends, answered, failed or dropped on timeout.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use common::config::agent::ServingLimits;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::model::LoadedModel;

/// Bytes per semaphore permit: byte budgets count KiB so a TiB fits `acquire_many`'s `u32`.
const UNIT: usize = 1024;

/// Why a request was refused by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `serving.max_model_inflight_bytes`.
    ModelBytes,
    /// `serving.max_inflight_bytes`.
    TotalBytes,
    /// `serving.max_concurrent_requests`.
    Concurrency,
    /// `serving.request_timeout_ms`.
    Timeout,
    /// `serving.max_shapes_per_model`.
    Shapes,
}

impl Limit {
    /// Every limit, in metric order.
    pub const ALL: [Self; 5] =
        [Self::ModelBytes, Self::TotalBytes, Self::Concurrency, Self::Timeout, Self::Shapes];

    /// The `limit` label on `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Self::ModelBytes => "model_bytes",
            Self::TotalBytes => "total_bytes",
            Self::Concurrency => "concurrency",
            Self::Timeout => "timeout",
            Self::Shapes => "shapes",
        }
    }
}

/// Shared admission state of one API.
#[derive(Debug)]
pub struct Limits {
    config: ServingLimits,
    total: Arc<Semaphore>,
    per_model: Mutex<HashMap<String, Arc<Semaphore>>>,
    requests: Arc<Semaphore>,
    shapes: Mutex<HashMap<String, Shapes>>,
    refused: [AtomicU64; Limit::ALL.len()],
}

/// The free-dim shapes one loaded version has accepted.
#[derive(Debug)]
struct Shapes {
    model: Weak<LoadedModel>,
    seen: HashSet<Vec<usize>>,
}

/// Bytes reserved for one request; released on drop.
#[derive(Debug)]
pub struct BytesPermit {
    _model: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

impl Limits {
    /// Limits with nothing in flight.
    pub fn new(config: ServingLimits) -> Self {
        Self {
            total: Arc::new(Semaphore::new(units(config.max_inflight_bytes) as usize)),
            requests: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            per_model: Mutex::default(),
            shapes: Mutex::default(),
            refused: Default::default(),
            config,
        }
    }

    /// The configured values.
    pub fn config(&self) -> &ServingLimits {
        &self.config
    }

    /// Counts a refusal.
    pub fn refused(&self, limit: Limit) {
        if let Some(n) =
            Limit::ALL.iter().position(|l| *l == limit).and_then(|i| self.refused.get(i))
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals so far, per limit, in [`Limit::ALL`] order.
    pub fn refusals(&self) -> Vec<(Limit, u64)> {
        Limit::ALL.iter().zip(&self.refused).map(|(l, n)| (*l, n.load(Ordering::Relaxed))).collect()
    }

    /// Takes a slot for one HTTP request, or says why not.
    pub fn request_slot(&self) -> Result<OwnedSemaphorePermit, String> {
        self.requests.clone().try_acquire_owned().map_err(|_| {
            self.refused(Limit::Concurrency);
            format!(
                "the agent is handling {} requests at once (serving.max_concurrent_requests); retry later",
                self.config.max_concurrent_requests
            )
        })
    }

    /// Reserves `bytes` of request data for model version `key` (`name/version`).
    pub fn reserve(&self, key: &str, bytes: usize) -> Result<BytesPermit, (Limit, String)> {
        let model = {
            let mut map = match self.per_model.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            map.entry(key.to_owned())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(units(self.config.max_model_inflight_bytes) as usize))
                })
                .clone()
        };
        let n = units(bytes);
        let refuse = |limit: Limit, what: String| {
            self.refused(limit);
            Err((limit, what))
        };
        let Ok(model_permit) = model.try_acquire_many_owned(n) else {
            return refuse(
                Limit::ModelBytes,
                format!(
                    "model {key} already holds close to {} bytes of requests in flight (serving.max_model_inflight_bytes); this one has {bytes}; retry later",
                    self.config.max_model_inflight_bytes
                ),
            );
        };
        let Ok(total_permit) = self.total.clone().try_acquire_many_owned(n) else {
            return refuse(
                Limit::TotalBytes,
                format!(
                    "the agent already holds close to {} bytes of requests in flight (serving.max_inflight_bytes); this one has {bytes}; retry later",
                    self.config.max_inflight_bytes
                ),
            );
        };
        Ok(BytesPermit { _model: model_permit, _total: total_permit })
    }

    /// Admits a request whose free dims (client-chosen sizes, batch axis excluded) are `free`
    /// for `model`: a shape seen before always passes; a new one only while the version has
    /// accepted fewer than `serving.max_shapes_per_model`.
    pub fn admit_shape(&self, model: &Arc<LoadedModel>, free: Vec<usize>) -> Result<(), String> {
        if free.is_empty() {
            return Ok(());
        }
        let key = format!("{}/{}", model.name, model.version);
        let mut map = match self.shapes.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = map
            .entry(key.clone())
            .or_insert_with(|| Shapes { model: Arc::downgrade(model), seen: HashSet::new() });
        // A reloaded version starts again.
        if !entry.model.upgrade().is_some_and(|m| Arc::ptr_eq(&m, model)) {
            *entry = Shapes { model: Arc::downgrade(model), seen: HashSet::new() };
        }
        if entry.seen.contains(&free) {
            return Ok(());
        }
        let cap = self.config.max_shapes_per_model;
        if entry.seen.len() >= cap {
            drop(map);
            self.refused(Limit::Shapes);
            return Err(format!(
                "model {key} already serves {cap} distinct sizes of its free dims (serving.max_shapes_per_model), each a compiled plan; this request's free dims {free:?} would be a new one. Send one of the sizes in use, pad to it, or declare the dims in the model's config.toml"
            ));
        }
        entry.seen.insert(free);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(model: usize, total: usize, concurrent: usize) -> Limits {
        Limits::new(ServingLimits {
            max_inflight_bytes: total,
            max_model_inflight_bytes: model,
            max_concurrent_requests: concurrent,
            ..ServingLimits::default()
        })
    }

    #[test]
    fn bytes_are_bounded_per_model_and_in_total_and_given_back() {
        let l = limits(10 * UNIT, 16 * UNIT, 8);
        let a = l.reserve("m/1", 8 * UNIT).expect("fits");
        let (limit, msg) = l.reserve("m/1", 4 * UNIT).expect_err("model full");
        assert_eq!(limit, Limit::ModelBytes);
        assert!(msg.contains("serving.max_model_inflight_bytes") && msg.contains("m/1"), "{msg}");
        let b = l.reserve("n/1", 8 * UNIT).expect("another model fits");
        let (limit, msg) = l.reserve("o/1", 1).expect_err("total full");
        assert_eq!(limit, Limit::TotalBytes);
        assert!(msg.contains("serving.max_inflight_bytes"), "{msg}");
        drop(a);
        drop(b);
        let _c = l.reserve("m/1", 10 * UNIT).expect("released");
        let counts: Vec<u64> = l.refusals().iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, vec![1, 1, 0, 0, 0]);
    }

    #[test]
    fn concurrency_refuses_at_once() {
        let l = limits(UNIT, UNIT, 2);
        let a = l.request_slot().expect("1");
        let _b = l.request_slot().expect("2");
        let msg = l.request_slot().expect_err("3");
        assert!(msg.contains("2 requests at once (serving.max_concurrent_requests)"), "{msg}");
        drop(a);
        let _slot = l.request_slot().expect("freed");
        assert_eq!(l.refusals()[2], (Limit::Concurrency, 1));
    }
}
