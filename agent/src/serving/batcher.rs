//! Dynamic batching: a pure queue policy ([`BatchQueue`]) and the per-model worker that drives
//! it ([`run_worker`]).
//!
//! The policy owns no clock and no I/O: every call takes `now`, so its behaviour is tested
//! exactly. Requests are ordered by effective priority (their level, raised one step per
//! `priority_aging` waited, so low priority never starves), then earliest deadline, then arrival.
//! A batch goes when it is full, when it reaches a preferred size, when a request's deadline
//! would otherwise be missed, when a top-priority request has waited its (short) delay, or when
//! the oldest request has waited `max_queue_delay` and at least `min_batch_size` rows are there
//! (or `min_batch_wait_cap` has passed). Requests that can no longer meet their deadline are
//! taken out before compute. The queue is bounded; a full queue refuses at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model_config::ModelConfig;

/// The batching knobs of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Most rows per batch now; 0 means every request runs alone. A single request with more
    /// rows (up to `max_request_rows`) still runs, alone.
    pub max_batch_size: usize,
    /// Most rows one request may carry (the model signature's limit); 0 for an unbatched model.
    pub max_request_rows: usize,
    /// Sizes dispatched as soon as they are formed, ascending.
    pub preferred_batch_sizes: Vec<usize>,
    /// Longest the oldest request waits for company.
    pub max_queue_delay: Duration,
    /// Fewest rows dispatched on delay before `min_batch_wait_cap`.
    pub min_batch_size: usize,
    /// Longest a request waits for `min_batch_size` rows.
    pub min_batch_wait_cap: Duration,
    /// Levels 1 (highest) ..= this.
    pub priority_levels: u32,
    /// Waiting this long raises a request one level.
    pub priority_aging: Duration,
    /// Longest a level-1 request waits when there are several levels.
    pub high_priority_max_queue_delay: Duration,
    /// Requests waiting at most.
    pub max_queue_size: usize,
    /// Longest expected wait a new request is admitted into; `None` for no limit.
    pub max_queue_wait: Option<Duration>,
    /// Instances running batches in parallel (the expected wait is shared among them).
    pub instances: usize,
}

impl Policy {
    /// The policy part of a model config.
    pub fn from_config(c: &ModelConfig) -> Self {
        Self {
            max_batch_size: c.max_batch_size,
            max_request_rows: c.max_batch_size,
            preferred_batch_sizes: c.preferred_batch_sizes.clone(),
            max_queue_delay: c.max_queue_delay,
            min_batch_size: c.min_batch_size,
            min_batch_wait_cap: c.min_batch_wait_cap,
            priority_levels: c.priority_levels,
            priority_aging: c.priority_aging,
            high_priority_max_queue_delay: c.high_priority_max_queue_delay,
            max_queue_size: c.max_queue_size,
            max_queue_wait: c.max_queue_wait,
            instances: c.instances,
        }
    }

    fn rows_cap(&self) -> usize {
        self.max_batch_size.max(1)
    }
}

/// Why a batch was dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// It reached `max_batch_size`.
    Full,
    /// It reached a preferred size.
    Preferred,
    /// The oldest request waited `max_queue_delay` (or the min-batch cap).
    Delay,
    /// A request's deadline was near.
    Deadline,
    /// A top-priority request waited its delay.
    Priority,
    /// Batching is off for the model: each request is its own batch.
    Unbatched,
}

impl Reason {
    /// Every reason, for counters.
    pub const ALL: [Self; 6] =
        [Self::Full, Self::Preferred, Self::Delay, Self::Deadline, Self::Priority, Self::Unbatched];

    /// Label value for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Preferred => "preferred",
            Self::Delay => "delay",
            Self::Deadline => "deadline",
            Self::Priority => "priority",
            Self::Unbatched => "unbatched",
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The queue holds `max_queue_size` requests.
    #[error(
        "the queue is full ({waiting} requests waiting, max_queue_size {max}); retry later, add instances, or raise max_queue_size"
    )]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
        /// The limit.
        max: usize,
    },
    /// The request has more rows than one batch takes.
    #[error("the request has {rows} rows but max_batch_size is {max}; split it")]
    TooManyRows {
        /// Rows asked for.
        rows: usize,
        /// The limit.
        max: usize,
    },
    /// The batches queued ahead would keep the request waiting longer than `max_queue_wait`.
    #[error(
        "the queue would keep this request about {expected_ms} ms, over max_queue_wait_ms {limit_ms}; retry later or on another host, or add instances"
    )]
    WaitTooLong {
        /// Expected wait before the request's batch starts.
        expected_ms: u64,
        /// The limit.
        limit_ms: u64,
    },
    /// The priority is outside 1..=levels.
    #[error("priority {priority} is outside 1..={levels} for this model")]
    BadPriority {
        /// As asked.
        priority: u32,
        /// Levels configured.
        levels: u32,
    },
}

struct Entry<T> {
    item: T,
    rows: usize,
    level: u32,
    deadline: Option<Instant>,
    enqueued: Instant,
    seq: u64,
}

/// A formed batch.
#[derive(Debug)]
pub struct Batch<T> {
    /// Requests in dispatch order.
    pub items: Vec<T>,
    /// Their rows together.
    pub rows: usize,
    /// Why it went now.
    pub reason: Reason,
}

/// What the worker should do next.
#[derive(Debug)]
pub enum Step<T> {
    /// Run this batch.
    Dispatch(Batch<T>),
    /// Nothing is ready; ask again at this instant (or when a request arrives).
    WaitUntil(Instant),
    /// The queue is empty.
    Idle,
}

/// The waiting requests of one model and the rules for forming batches.
pub struct BatchQueue<T> {
    policy: Policy,
    entries: Vec<Entry<T>>,
    next_seq: u64,
}

impl<T> BatchQueue<T> {
    /// An empty queue.
    pub fn new(policy: Policy) -> Self {
        Self { policy, entries: Vec::new(), next_seq: 0 }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy. Queued requests stay queued: one with more rows than the new
    /// `max_batch_size` runs alone.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Expected wait before a request queued now starts running: the batches already queued
    /// ahead of it, each taking about `compute`, spread over the instances.
    pub fn expected_wait(&self, compute: Duration) -> Duration {
        let rows: usize = self.entries.iter().map(|e| e.rows).sum();
        let batches = rows.div_ceil(self.policy.rows_cap());
        let per_instance = batches.div_ceil(self.policy.instances.max(1));
        compute.saturating_mul(u32::try_from(per_instance).unwrap_or(u32::MAX))
    }

    /// The refusal for a request that would wait past `max_queue_wait`. (A request that
    /// cannot finish by its own deadline is queued and answered 504 by `expire`, as before.)
    fn wait_refusal(&self, compute: Duration) -> Option<Refusal> {
        let limit = self.policy.max_queue_wait?;
        if compute.is_zero() {
            return None; // no batch has run yet: nothing to estimate from
        }
        let expected = self.expected_wait(compute);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        (expected > limit)
            .then(|| Refusal::WaitTooLong { expected_ms: ms(expected), limit_ms: ms(limit) })
    }

    /// Queues a request, or refuses it at once: bad priority, too many rows, a full queue, or
    /// (once `compute`, the estimate of one batch's run time, is known) an expected wait over
    /// `max_queue_wait`.
    pub fn push(
        &mut self,
        item: T,
        rows: usize,
        priority: u32,
        deadline: Option<Instant>,
        now: Instant,
        compute: Duration,
    ) -> Result<(), (T, Refusal)> {
        if priority == 0 || priority > self.policy.priority_levels {
            let levels = self.policy.priority_levels;
            return Err((item, Refusal::BadPriority { priority, levels }));
        }
        if self.policy.max_request_rows > 0 && rows > self.policy.max_request_rows {
            return Err((item, Refusal::TooManyRows { rows, max: self.policy.max_request_rows }));
        }
        if self.entries.len() >= self.policy.max_queue_size {
            let refusal =
                Refusal::QueueFull { waiting: self.entries.len(), max: self.policy.max_queue_size };
            return Err((item, refusal));
        }
        if let Some(refusal) = self.wait_refusal(compute) {
            return Err((item, refusal));
        }
        self.entries.push(Entry {
            item,
            rows,
            level: priority,
            deadline,
            enqueued: now,
            seq: self.next_seq,
        });
        self.next_seq += 1;
        Ok(())
    }

    /// Takes out every request that cannot finish by its deadline, given that a batch takes
    /// about `compute` to run.
    pub fn expire(&mut self, now: Instant, compute: Duration) -> Vec<T> {
        let mut expired = Vec::new();
        let mut kept = Vec::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            if e.deadline.is_some_and(|d| d < now + compute) {
                expired.push(e.item);
            } else {
                kept.push(e);
            }
        }
        self.entries = kept;
        expired
    }

    /// Takes out every waiting request, deadline or not, in arrival order (unload, reload and
    /// shutdown answer each one).
    pub fn drain_all(&mut self) -> Vec<T> {
        self.entries.drain(..).map(|e| e.item).collect()
    }

    fn effective_level(&self, e: &Entry<T>, now: Instant) -> u32 {
        let aging = self.policy.priority_aging.as_nanos().max(1);
        let steps = now.saturating_duration_since(e.enqueued).as_nanos() / aging;
        let steps = u32::try_from(steps).unwrap_or(u32::MAX);
        e.level.saturating_sub(steps).max(1)
    }

    /// Decides what to do at `now`. `compute` is the expected run time of one batch.
    pub fn next(&mut self, now: Instant, compute: Duration) -> Step<T> {
        if self.entries.is_empty() {
            return Step::Idle;
        }
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by_key(|i| {
            let e = &self.entries[*i];
            (self.effective_level(e, now), e.deadline.is_none(), e.deadline, e.seq)
        });
        if self.policy.max_batch_size == 0 {
            return Step::Dispatch(self.take(&order[..1], Reason::Unbatched));
        }
        let cap = self.policy.rows_cap();
        let mut chosen = Vec::new();
        let mut rows = 0;
        for i in &order {
            let r = self.entries[*i].rows;
            // The first request always goes: one larger than the batch size in force (queued
            // before it shrank, or bigger than it) runs alone.
            if rows + r > cap && !chosen.is_empty() {
                break;
            }
            rows += r;
            chosen.push(*i);
        }
        let oldest = self.entries.iter().map(|e| e.enqueued).min().unwrap_or(now);
        let waited = now.saturating_duration_since(oldest);
        let urgent_at = |e: &Entry<T>| e.deadline.map(|d| d.checked_sub(compute * 2).unwrap_or(d));
        let multi_level = self.policy.priority_levels > 1;
        let top_due = |e: &Entry<T>| {
            (multi_level && e.level == 1)
                .then_some(e.enqueued + self.policy.high_priority_max_queue_delay)
        };
        let chosen_entries = || chosen.iter().map(|i| &self.entries[*i]);
        let reason = if rows >= cap {
            Some(Reason::Full)
        } else if self.policy.preferred_batch_sizes.contains(&rows) {
            Some(Reason::Preferred)
        } else if chosen_entries().filter_map(urgent_at).any(|t| t <= now) {
            Some(Reason::Deadline)
        } else if chosen_entries().filter_map(top_due).any(|t| t <= now) {
            Some(Reason::Priority)
        } else if waited >= self.policy.max_queue_delay
            && (rows >= self.policy.min_batch_size || waited >= self.policy.min_batch_wait_cap)
        {
            Some(Reason::Delay)
        } else {
            None
        };
        if let Some(reason) = reason {
            return Step::Dispatch(self.take(&chosen, reason));
        }
        let delay_due = if rows >= self.policy.min_batch_size {
            oldest + self.policy.max_queue_delay
        } else {
            oldest + self.policy.max_queue_delay.max(self.policy.min_batch_wait_cap)
        };
        let wake = chosen_entries()
            .filter_map(urgent_at)
            .chain(chosen_entries().filter_map(top_due))
            .fold(delay_due, Instant::min);
        Step::WaitUntil(wake.max(now))
    }

    /// Takes the entries at `indexes` (in that order) out; the rest keep their arrival order.
    fn take(&mut self, indexes: &[usize], reason: Reason) -> Batch<T> {
        let mut slots: Vec<Option<Entry<T>>> = self.entries.drain(..).map(Some).collect();
        let picked: Vec<Entry<T>> = indexes.iter().filter_map(|i| slots[*i].take()).collect();
        self.entries = slots.into_iter().flatten().collect();
        let rows = picked.iter().map(|e| e.rows).sum();
        Batch { items: picked.into_iter().map(|e| e.item).collect(), rows, reason }
    }
}

/// What the worker hands formed batches to (the runner's threads, or a test recorder). It must
/// release `permit` when the batch is done, which lets the worker form the next one.
pub trait Executor<T>: Send + Sync + 'static {
    /// Starts running a batch.
    fn submit(&self, batch: Batch<T>, permit: OwnedSemaphorePermit);
    /// Answers requests that expired in the queue.
    fn expired(&self, items: Vec<T>);
}

/// The shared side of a model's queue: the API pushes, the worker pops.
pub struct Shared<T> {
    /// The queue itself (held only for short, non-blocking sections).
    pub queue: Mutex<BatchQueue<T>>,
    /// Wakes the worker on arrival.
    pub arrived: Notify,
    /// Expected batch run time in microseconds (an EWMA kept by the executor).
    pub compute_estimate_us: std::sync::atomic::AtomicU64,
}

impl<T> Shared<T> {
    /// A shared queue with this policy.
    pub fn new(policy: Policy) -> Self {
        Self {
            queue: Mutex::new(BatchQueue::new(policy)),
            arrived: Notify::new(),
            compute_estimate_us: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Queues a request and wakes the worker.
    pub fn push(
        &self,
        item: T,
        rows: usize,
        priority: u32,
        deadline: Option<Instant>,
    ) -> Result<(), (T, Refusal)> {
        let now = Instant::now();
        let compute = self.compute_estimate();
        let pushed = match self.queue.lock() {
            Ok(mut q) => q.push(item, rows, priority, deadline, now, compute),
            Err(poisoned) => {
                poisoned.into_inner().push(item, rows, priority, deadline, now, compute)
            }
        };
        if pushed.is_ok() {
            self.arrived.notify_one();
        }
        pushed
    }

    /// Changes the policy under the queue's lock and wakes the worker, so a shorter delay or a
    /// smaller batch size takes effect for the requests already waiting.
    pub fn update_policy(&self, change: impl FnOnce(&mut Policy)) {
        let mut q = match self.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut policy = q.policy().clone();
        change(&mut policy);
        q.set_policy(policy);
        drop(q);
        self.arrived.notify_one();
    }

    /// A copy of the policy in force.
    pub fn policy(&self) -> Policy {
        match self.queue.lock() {
            Ok(q) => q.policy().clone(),
            Err(poisoned) => poisoned.into_inner().policy().clone(),
        }
    }

    /// Folds one batch's run time into the estimate.
    pub fn observe_compute(&self, took: Duration) {
        use std::sync::atomic::Ordering;
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let old = self.compute_estimate_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.compute_estimate_us.store(new, Ordering::Relaxed);
    }

    fn compute_estimate(&self) -> Duration {
        Duration::from_micros(self.compute_estimate_us.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Forms batches for one model until `stop`: waits for a free instance, then for a batch to be
/// due, and hands it over with the instance's permit.
pub async fn run_worker<T: Send + 'static>(
    shared: Arc<Shared<T>>,
    instances: Arc<Semaphore>,
    executor: Arc<dyn Executor<T>>,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            p = instances.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            () = stop.cancelled() => return,
        };
        loop {
            let now = Instant::now();
            let compute = shared.compute_estimate();
            let (expired, step) = {
                let mut q = match shared.queue.lock() {
                    Ok(q) => q,
                    Err(poisoned) => poisoned.into_inner(),
                };
                let expired = q.expire(now, compute);
                (expired, q.next(now, compute))
            };
            if !expired.is_empty() {
                executor.expired(expired);
            }
            match step {
                Step::Dispatch(batch) => {
                    executor.submit(batch, permit);
                    break;
                }
                Step::WaitUntil(at) => tokio::select! {
                    () = shared.arrived.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                    () = stop.cancelled() => return,
                },
                Step::Idle => tokio::select! {
                    () = shared.arrived.notified() => {}
                    () = stop.cancelled() => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            max_batch_size: 8,
            max_request_rows: 8,
            preferred_batch_sizes: vec![],
            max_queue_delay: Duration::from_millis(5),
            min_batch_size: 1,
            min_batch_wait_cap: Duration::from_millis(50),
            priority_levels: 1,
            priority_aging: Duration::from_millis(100),
            high_priority_max_queue_delay: Duration::ZERO,
            max_queue_size: 16,
            max_queue_wait: None,
            instances: 1,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn dispatched<T: std::fmt::Debug>(step: Step<T>) -> Batch<T> {
        match step {
            Step::Dispatch(b) => b,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn drain_all_takes_requests_with_and_without_deadlines() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy());
        q.push(0, 1, 1, None, t0, Duration::ZERO).expect("room");
        q.push(1, 1, 1, Some(t0 + ms(10)), t0, Duration::ZERO).expect("room");
        q.push(2, 2, 1, None, t0, Duration::ZERO).expect("room");
        assert_eq!(q.drain_all(), vec![0, 1, 2]);
        assert!(q.is_empty());
        assert!(matches!(q.next(t0, Duration::ZERO), Step::Idle));
        assert!(q.drain_all().is_empty());
    }

    #[test]
    fn full_batch_goes_at_once_and_partial_waits_for_delay() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy());
        for i in 0..10 {
            q.push(i, 1, 1, None, t0, Duration::ZERO).expect("room");
        }
        let b = dispatched(q.next(t0, Duration::ZERO));
        assert_eq!((b.items, b.reason), ((0..8).collect(), Reason::Full));
        match q.next(t0, Duration::ZERO) {
            Step::WaitUntil(at) => assert_eq!(at, t0 + ms(5)),
            other => panic!("{other:?}"),
        }
        let b = dispatched(q.next(t0 + ms(5), Duration::ZERO));
        assert_eq!((b.items, b.reason), (vec![8, 9], Reason::Delay));
        assert!(matches!(q.next(t0 + ms(6), Duration::ZERO), Step::Idle));
    }

    #[test]
    fn preferred_size_goes_early_and_rows_count() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(Policy { preferred_batch_sizes: vec![4], ..policy() });
        q.push("a", 3, 1, None, t0, Duration::ZERO).expect("room");
        assert!(matches!(q.next(t0, Duration::ZERO), Step::WaitUntil(_)));
        q.push("b", 1, 1, None, t0, Duration::ZERO).expect("room");
        let b = dispatched(q.next(t0, Duration::ZERO));
        assert_eq!((b.rows, b.reason), (4, Reason::Preferred));
        let too_big = q.push("c", 9, 1, None, t0, Duration::ZERO).unwrap_err();
        assert_eq!(too_big.1, Refusal::TooManyRows { rows: 9, max: 8 });
    }

    #[test]
    fn min_batch_size_waits_until_its_cap() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(Policy { min_batch_size: 3, ..policy() });
        q.push(1, 1, 1, None, t0, Duration::ZERO).expect("room");
        match q.next(t0 + ms(10), Duration::ZERO) {
            Step::WaitUntil(at) => assert_eq!(at, t0 + ms(50)),
            other => panic!("{other:?}"),
        }
        let b = dispatched(q.next(t0 + ms(50), Duration::ZERO));
        assert_eq!(b.reason, Reason::Delay);
    }

    /// Issue 8, hole 8 (overload): a queue bounded only by count let admitted requests wait
    /// many seconds at 2x and 5x overload. Admission now refuses a request whose expected wait
    /// (batches ahead x batch time / instances) is over `max_queue_wait`.
    #[test]
    fn expected_wait_over_the_limit_is_refused_at_once() {
        let t0 = Instant::now();
        let compute = ms(100);
        let mut q = BatchQueue::new(limited_again());
        // Nothing ahead: admitted whatever the estimate.
        q.push(0, 2, 1, None, t0, compute).expect("empty queue");
        assert_eq!(q.expected_wait(compute), ms(100), "1 batch ahead over 2 instances");
        for i in 1..5 {
            q.push(i, 2, 1, None, t0, compute).expect("within the limit");
        }
        // 5 batches ahead over 2 instances: 3 rounds of 100 ms = 300 ms > 250 ms.
        let (item, refusal) = q.push(9, 1, 1, None, t0, compute).unwrap_err();
        assert_eq!(item, 9);
        assert!(
            matches!(refusal, Refusal::WaitTooLong { expected_ms: 300, limit_ms: 250 }),
            "{refusal:?}"
        );
        assert!(refusal.to_string().contains("max_queue_wait_ms"), "{refusal}");
        // Without a limit only the count bounds the queue.
        let mut q = BatchQueue::new(Policy { max_batch_size: 2, max_request_rows: 2, ..policy() });
        for i in 0..16 {
            q.push(i, 2, 1, None, t0, compute).expect("no wait limit");
        }
        let mut q = BatchQueue::new(limited_again());
        q.push(0, 2, 1, None, t0, compute).expect("room");
        q.push(1, 2, 1, None, t0, compute).expect("room");
        q.push(2, 2, 1, None, t0, compute).expect("room");
        // No estimate yet (no batch has run): nothing to refuse on.
        for i in 3..10 {
            q.push(i, 2, 1, None, t0, Duration::ZERO).expect("no estimate");
        }
    }

    fn limited_again() -> Policy {
        Policy {
            max_batch_size: 2,
            max_request_rows: 2,
            max_queue_wait: Some(ms(250)),
            instances: 2,
            ..policy()
        }
    }

    #[test]
    fn a_smaller_batch_size_applies_to_queued_requests_and_big_ones_run_alone() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy());
        q.push("big", 6, 1, None, t0, Duration::ZERO).expect("room");
        for i in ["a", "b", "c"] {
            q.push(i, 1, 1, None, t0, Duration::ZERO).expect("room");
        }
        q.set_policy(Policy { max_batch_size: 2, ..policy() });
        let b = dispatched(q.next(t0, Duration::ZERO));
        assert_eq!((b.items, b.rows, b.reason), (vec!["big"], 6, Reason::Full));
        let b = dispatched(q.next(t0, Duration::ZERO));
        assert_eq!((b.items, b.reason), (vec!["a", "b"], Reason::Full));
        // A request up to the signature's limit is still admitted at the smaller size.
        q.push("d", 8, 1, None, t0, Duration::ZERO).expect("within max_request_rows");
        assert_eq!(q.policy().max_batch_size, 2);
        assert!(matches!(q.next(t0, Duration::ZERO), Step::WaitUntil(_)), "c waits for company");
        let b = dispatched(q.next(t0 + ms(5), Duration::ZERO));
        assert_eq!((b.items, b.reason), (vec!["c"], Reason::Delay), "d does not fit beside c");
        let b = dispatched(q.next(t0 + ms(5), Duration::ZERO));
        assert_eq!((b.items, b.rows), (vec!["d"], 8));
    }

    #[test]
    fn full_queue_refuses_at_once() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(Policy { max_queue_size: 2, ..policy() });
        q.push(1, 1, 1, None, t0, Duration::ZERO).expect("room");
        q.push(2, 1, 1, None, t0, Duration::ZERO).expect("room");
        let (item, refusal) = q.push(3, 1, 1, None, t0, Duration::ZERO).unwrap_err();
        assert_eq!(item, 3);
        assert_eq!(refusal, Refusal::QueueFull { waiting: 2, max: 2 });
        assert!(refusal.to_string().contains("max_queue_size"));
    }

    #[test]
    fn deadlines_order_within_a_level_and_expire_before_compute() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(Policy { max_batch_size: 2, ..policy() });
        q.push("late", 1, 1, Some(t0 + ms(100)), t0, Duration::ZERO).expect("room");
        q.push("none", 1, 1, None, t0, Duration::ZERO).expect("room");
        q.push("soon", 1, 1, Some(t0 + ms(20)), t0, Duration::ZERO).expect("room");
        q.push("doomed", 1, 1, Some(t0 + ms(3)), t0, Duration::ZERO).expect("room");
        // With batches taking 5 ms, "doomed" cannot finish by t0 + 3 ms.
        assert_eq!(q.expire(t0, ms(5)), vec!["doomed"]);
        let b = dispatched(q.next(t0, ms(5)));
        assert_eq!((b.items, b.reason), (vec!["soon", "late"], Reason::Full));
    }

    #[test]
    fn near_deadline_dispatches_before_the_delay() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(Policy { max_queue_delay: ms(50), ..policy() });
        q.push(1, 1, 1, Some(t0 + ms(30)), t0, Duration::ZERO).expect("room");
        match q.next(t0, ms(10)) {
            Step::WaitUntil(at) => assert_eq!(at, t0 + ms(10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(dispatched(q.next(t0 + ms(10), ms(10))).reason, Reason::Deadline);
    }

    #[test]
    fn priorities_go_first_and_aging_prevents_starvation() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(Policy {
            max_batch_size: 1,
            priority_levels: 3,
            priority_aging: ms(10),
            high_priority_max_queue_delay: ms(1),
            ..policy()
        });
        q.push("low", 1, 3, None, t0, Duration::ZERO).expect("room");
        let mut order = Vec::new();
        // A steady stream of top-priority work arrives every 5 ms for 100 ms.
        for step in 0..20u64 {
            let now = t0 + ms(step * 5);
            q.push("high", 1, 1, None, now, Duration::ZERO).expect("room");
            if let Step::Dispatch(b) = q.next(now, Duration::ZERO) {
                order.extend(b.items);
            }
        }
        let low_at = order.iter().position(|x| *x == "low").expect("low priority ran");
        assert!(low_at > 0, "high priority went first: {order:?}");
        // Aged from level 3 to 1 after 20 ms, then first by arrival order.
        assert!(low_at <= 5, "low priority starved: {order:?}");
        let bad = q.push("x", 1, 4, None, t0, Duration::ZERO).unwrap_err();
        assert_eq!(bad.1, Refusal::BadPriority { priority: 4, levels: 3 });
    }

    #[test]
    fn top_priority_waits_only_its_own_delay() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(Policy {
            priority_levels: 2,
            high_priority_max_queue_delay: ms(1),
            ..policy()
        });
        q.push("normal", 1, 2, None, t0, Duration::ZERO).expect("room");
        q.push("urgent", 1, 1, None, t0, Duration::ZERO).expect("room");
        match q.next(t0, Duration::ZERO) {
            Step::WaitUntil(at) => assert_eq!(at, t0 + ms(1)),
            other => panic!("{other:?}"),
        }
        let b = dispatched(q.next(t0 + ms(1), Duration::ZERO));
        assert_eq!((b.items, b.reason), (vec!["urgent", "normal"], Reason::Priority));
    }

    #[test]
    fn unbatched_models_run_each_request_alone() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(Policy { max_batch_size: 0, ..policy() });
        q.push("a", 4, 1, None, t0, Duration::ZERO).expect("any rows");
        q.push("b", 2, 1, None, t0, Duration::ZERO).expect("any rows");
        let b = dispatched(q.next(t0, Duration::ZERO));
        assert_eq!((b.items, b.rows, b.reason), (vec!["a"], 4, Reason::Unbatched));
    }

    /// Records batches and answers them at once.
    struct Recorder(Mutex<Vec<(Vec<u32>, Reason, Instant)>>, Mutex<Vec<u32>>);

    impl Executor<u32> for Recorder {
        fn submit(&self, batch: Batch<u32>, permit: OwnedSemaphorePermit) {
            if let Ok(mut seen) = self.0.lock() {
                seen.push((batch.items, batch.reason, Instant::now()));
            }
            drop(permit);
        }
        fn expired(&self, items: Vec<u32>) {
            if let Ok(mut e) = self.1.lock() {
                e.extend(items);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn worker_forms_batches_on_size_and_delay_under_paused_time() {
        let shared = Arc::new(Shared::new(policy()));
        shared.observe_compute(ms(2));
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new()), Mutex::new(Vec::new())));
        let stop = CancellationToken::new();
        let worker = tokio::spawn(run_worker(
            shared.clone(),
            Arc::new(Semaphore::new(1)),
            recorder.clone(),
            stop.clone(),
        ));
        let t0 = Instant::now();
        for i in 0..8 {
            shared.push(i, 1, 1, None).map_err(|e| e.1).expect("room");
        }
        tokio::time::sleep(ms(1)).await;
        shared.push(100, 1, 1, None).map_err(|e| e.1).expect("room");
        shared.push(101, 1, 1, Some(t0 + ms(2))).map_err(|e| e.1).expect("room");
        tokio::time::sleep(ms(20)).await;
        stop.cancel();
        worker.await.expect("worker");
        let seen = recorder.0.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!((seen[0].0.clone(), seen[0].1), ((0..8).collect(), Reason::Full));
        assert_eq!(seen[0].2, t0);
        assert_eq!((seen[1].0.clone(), seen[1].1), (vec![100], Reason::Delay));
        assert_eq!(seen[1].2, t0 + ms(1) + ms(5));
        // 101 could not finish 2 ms of compute by its deadline: it never reached the executor.
        assert_eq!(*recorder.1.lock().expect("lock"), vec![101]);
    }
}
