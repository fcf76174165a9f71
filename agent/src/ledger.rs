//! The directive ledger: the result of every directive this agent applied, kept in the
//! spool's sled database so that a directive the aggregator sends again, after a reconnect or
//! an agent restart, is answered with its first result and never applied twice.
//!
//! Invariants:
//! - [`Ledger::once`] runs at most one directive at a time, so two copies of one id arriving
//!   together cannot both apply it: the second waits and gets the first's result.
//! - A result is written and flushed before it is returned (and so before it is answered).
//!   A crash after applying and before that write means the directive is applied again when
//!   resent; every directive kind sets an absolute state (instances = 4, not "+1"), so applying
//!   one twice ends in the same state.
//! - The ledger keeps the newest [`REMEMBERED`] results; older ids are forgotten. The
//!   aggregator's directives expire long before that many are sent to one host.
//! - A stored result that does not decode is treated as absent (logged): the directive is
//!   applied again rather than answered with garbage.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use common::proto::DirectiveResult;
use prost::Message as _;
use tracing::warn;

use crate::spool::{Spool, SpoolError};

/// Results kept.
pub const REMEMBERED: u64 = 10_000;

/// The persisted results of applied directives.
#[derive(Debug)]
pub struct Ledger {
    /// id -> encoded `DirectiveResult`.
    results: sled::Tree,
    /// big-endian sequence -> id, oldest first (for forgetting the oldest).
    order: sled::Tree,
    next: AtomicU64,
    capacity: u64,
    applying: tokio::sync::Mutex<()>,
}

impl Ledger {
    /// Opens the ledger in the spool's database, keeping [`REMEMBERED`] results.
    pub fn open(spool: &Spool) -> Result<Self, SpoolError> {
        Self::open_with_capacity(spool, REMEMBERED)
    }

    /// Opens the ledger keeping the newest `capacity` results (at least 1).
    pub fn open_with_capacity(spool: &Spool, capacity: u64) -> Result<Self, SpoolError> {
        let results = spool.open_tree("directive_results")?;
        let order = spool.open_tree("directive_order")?;
        let next = match order.last() {
            Ok(Some((k, _))) => k.as_ref().try_into().map_or(0, u64::from_be_bytes) + 1,
            _ => 0,
        };
        Ok(Self {
            results,
            order,
            next: AtomicU64::new(next),
            capacity: capacity.max(1),
            applying: Default::default(),
        })
    }

    /// The stored result for `id`, if it was applied.
    pub fn result(&self, id: &str) -> Option<DirectiveResult> {
        let bytes = self.results.get(id).ok().flatten()?;
        match DirectiveResult::decode(bytes.as_ref()) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(%id, error = %e, "A stored directive result does not decode; treating it as not applied.");
                None
            }
        }
    }

    /// Results stored.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Whether none is stored.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// Answers `id` from the ledger, or runs `apply` and stores its result first. The second
    /// value says whether this call applied it (false: a repeat).
    pub async fn once<F>(&self, id: &str, apply: F) -> (DirectiveResult, bool)
    where
        F: Future<Output = DirectiveResult>,
    {
        let _one_at_a_time = self.applying.lock().await;
        if let Some(previous) = self.result(id) {
            return (previous, false);
        }
        let result = apply.await;
        if let Err(e) = self.store(id, &result).await {
            warn!(%id, error = %e, "Could not persist a directive's result; a resend would apply it again.");
        }
        (result, true)
    }

    async fn store(&self, id: &str, result: &DirectiveResult) -> Result<(), sled::Error> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        self.results.insert(id, result.encode_to_vec())?;
        self.order.insert(seq.to_be_bytes(), id)?;
        if seq >= self.capacity {
            let cutoff = (seq + 1 - self.capacity).to_be_bytes();
            for item in self.order.range(..cutoff.as_slice()) {
                let (k, old) = item?;
                self.order.remove(k)?;
                self.results.remove(old)?;
            }
        }
        self.results.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use common::proto::DirectiveStatus;

    fn result(id: &str, message: &str) -> DirectiveResult {
        DirectiveResult {
            id: id.into(),
            status: DirectiveStatus::Applied.into(),
            message: message.into(),
            payload: vec![],
        }
    }

    #[tokio::test]
    async fn a_directive_applied_before_a_restart_is_answered_not_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let applied = std::sync::atomic::AtomicU32::new(0);
        let apply = |msg: &'static str| {
            applied.fetch_add(1, Ordering::SeqCst);
            async move { result("d1", msg) }
        };
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            let ledger = Ledger::open(&spool).unwrap();
            let (r, fresh) = ledger.once("d1", apply("first")).await;
            assert!(fresh);
            assert_eq!(r.message, "first");
            let (r, fresh) = ledger.once("d1", async { result("d1", "second") }).await;
            assert!(!fresh);
            assert_eq!(r.message, "first");
        }
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let ledger = Ledger::open(&spool).unwrap();
        let (r, fresh) = ledger.once("d1", async { result("d1", "after restart") }).await;
        assert!(!fresh);
        assert_eq!(r.message, "first");
        assert_eq!(applied.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn two_copies_arriving_together_apply_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let ledger = Ledger::open(&spool).unwrap();
        let runs = std::sync::atomic::AtomicU32::new(0);
        let slow = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            result("x", "done")
        };
        let (a, b) = tokio::join!(ledger.once("x", slow()), ledger.once("x", slow()));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(a.0, b.0);
        assert!(a.1 != b.1, "exactly one of the two applied it");
    }

    #[tokio::test]
    async fn only_the_newest_results_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let keep = 20;
        let ledger = Ledger::open_with_capacity(&spool, keep).unwrap();
        let total = keep + 5;
        for i in 0..total {
            let id = format!("d{i}");
            ledger.once(&id, async { result("", "") }).await;
        }
        assert_eq!(ledger.len() as u64, keep);
        assert!(ledger.result("d0").is_none());
        assert!(ledger.result("d4").is_none());
        assert!(ledger.result("d5").is_some());
        assert!(ledger.result(&format!("d{}", total - 1)).is_some());
        // The order survives a reopen.
        drop(ledger);
        let ledger = Ledger::open_with_capacity(&spool, keep).unwrap();
        ledger.once("new", async { result("", "") }).await;
        assert_eq!(ledger.len() as u64, keep);
        assert!(ledger.result("d5").is_none());
    }
}
