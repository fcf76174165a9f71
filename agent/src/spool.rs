//! The agent's durable queue of telemetry batches (sled).
//!
//! Invariants:
//! - A batch is in the spool from the moment [`Spool::append`] returns until [`Spool::ack`] is
//!   called for its seq, which the uplink does only after the aggregator's *application* `Ack`
//!   (sent once the batch is durable there). A QUIC-level ack is never enough.
//! - Seqs start at 1, increase by 1 per batch and are never reused within a spool epoch; sample
//!   indexes likewise, so the aggregator can count samples exactly once. A batch and the
//!   `next_seq` / `next_sample_index` counters are written in one sled transaction, and
//!   [`Spool::open`] also raises the counters past the newest stored batch, so a crash (or a
//!   spool written by an older agent) can never make a seq or sample index repeat.
//! - The low seq ([`Spool::low_seq`]) is the lowest seq the spool can still send: its oldest
//!   batch, or the next seq when it is empty. Every seq below it was either acknowledged or
//!   dropped, and will never be sent again; the uplink tells the aggregator (Hello and every
//!   batch) so it can stop waiting for the dropped ones.
//! - The epoch is a random number chosen when the spool is created; a wiped spool gets a new one.
//! - The spool never holds more than `max_bytes` of batches (except the newest batch, always
//!   kept). Beyond that the *oldest* batches are dropped; each drop is counted (batches and
//!   samples), logged at WARN, persisted in the same transaction as the removal, and reported to
//!   the aggregator in every batch.
//! - All key layouts live here: `batches`: seq (u64 BE) -> TelemetryBatch (protobuf, without the
//!   drop counters, which are filled in when sent); `meta`: fixed names -> u64 BE.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use common::ids::Seq;
use common::proto::{Sample, TelemetryBatch};
use prost::Message;
use sled::Transactional as _;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tracing::warn;

const META_NEXT_SEQ: &[u8] = b"next_seq";
const META_NEXT_SAMPLE: &[u8] = b"next_sample_index";
const META_EPOCH: &[u8] = b"epoch";
const META_DROPPED_BATCHES: &[u8] = b"dropped_batches";
const META_DROPPED_SAMPLES: &[u8] = b"dropped_samples";

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The sled database could not be opened.
    #[error("spool {path}: open failed")]
    Open {
        /// Directory.
        path: PathBuf,
        /// sled's reason.
        #[source]
        source: sled::Error,
    },
    /// A read or write failed.
    #[error("spool {path}: {op} failed")]
    Io {
        /// Directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// sled's reason.
        #[source]
        source: sled::Error,
    },
    /// A stored record does not decode (disk corruption or a foreign file).
    #[error("spool record {seq}: undecodable")]
    Decode {
        /// The record.
        seq: Seq,
        /// prost's reason.
        #[source]
        source: prost::DecodeError,
    },
}

/// What the spool holds and has dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Batches waiting for an ack.
    pub batches: u64,
    /// Their total encoded size.
    pub bytes: u64,
    /// Batches dropped (spool full, or too large to deliver), over the spool's life.
    pub dropped_batches: u64,
    /// Samples in those batches.
    pub dropped_samples: u64,
}

/// The spool handle. Methods are blocking (sled); call them off the async workers for flushes.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    db: sled::Db,
    batches: sled::Tree,
    meta: sled::Tree,
    max_bytes: u64,
    epoch: u64,
    // Serializes appends and drops so counters and sizes stay consistent.
    state: Mutex<SpoolStats>,
    // Appends that fail before touching sled, for tests of the callers' error handling.
    #[cfg(test)]
    pub(crate) fail_appends: std::sync::atomic::AtomicU32,
}

impl Spool {
    /// Opens (or creates) the spool at `path` with a size cap of `max_bytes`.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let open_err = |source| SpoolError::Open { path: path.into(), source };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(4 * 1024 * 1024)
            // No background flusher waking every second: each seal flushes its batch (the
            // write that matters), and an ack lost in a crash only makes the aggregator see a
            // duplicate, which it answers as one.
            .flush_every_ms(None)
            .open()
            .map_err(open_err)?;
        let batches = db.open_tree("batches").map_err(open_err)?;
        let meta = db.open_tree("meta").map_err(open_err)?;
        let mut spool = Self {
            path: path.into(),
            db,
            batches,
            meta,
            max_bytes,
            epoch: 0,
            state: Mutex::new(SpoolStats::default()),
            #[cfg(test)]
            fail_appends: std::sync::atomic::AtomicU32::new(0),
        };
        spool.epoch = match spool.meta_u64(META_EPOCH)? {
            0 => {
                let epoch = rand::random::<u64>().max(1);
                spool.put_meta(META_EPOCH, epoch)?;
                epoch
            }
            e => e,
        };
        let mut stats = SpoolStats {
            dropped_batches: spool.meta_u64(META_DROPPED_BATCHES)?,
            dropped_samples: spool.meta_u64(META_DROPPED_SAMPLES)?,
            ..SpoolStats::default()
        };
        for item in spool.batches.iter() {
            let (_, v) = item.map_err(|source| spool.io("scan", source))?;
            stats.batches += 1;
            stats.bytes += v.len() as u64;
        }
        spool.state = Mutex::new(stats);
        spool.reconcile_counters()?;
        Ok(spool)
    }

    /// Raises `next_seq` / `next_sample_index` past the newest stored batch, in case a crash
    /// (or an older agent that wrote them separately) left them behind it.
    fn reconcile_counters(&self) -> Result<(), SpoolError> {
        let Some((k, v)) = self.batches.last().map_err(|source| self.io("scan", source))? else {
            return Ok(());
        };
        let last = key_seq(&k);
        let last_sample = TelemetryBatch::decode(v.as_ref())
            .map_err(|source| SpoolError::Decode { seq: Seq(last), source })?
            .samples
            .iter()
            .map(|s| s.sample_index)
            .max()
            .unwrap_or(0);
        let (next_seq, next_sample) =
            (self.meta_u64(META_NEXT_SEQ)?, self.meta_u64(META_NEXT_SAMPLE)?);
        if next_seq <= last || next_sample <= last_sample {
            warn!(
                path = %self.path.display(),
                next_seq,
                newest_batch = last,
                next_sample,
                newest_sample = last_sample,
                "Spool counters were behind the newest batch (interrupted write); raised them."
            );
            self.put_meta(META_NEXT_SEQ, next_seq.max(last.saturating_add(1)))?;
            self.put_meta(META_NEXT_SAMPLE, next_sample.max(last_sample.saturating_add(1)))?;
        }
        Ok(())
    }

    /// The spool's epoch (random, fixed for the spool's life).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Seals `samples` into a new batch: numbers the samples, assigns the next seq, stores it and
    /// enforces the size cap. Durable once [`Spool::flush`] returns.
    pub fn append(&self, samples: &[Sample]) -> Result<Seq, SpoolError> {
        let mut state = self.lock();
        #[cfg(test)]
        if self.fail_appends.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            self.fail_appends.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return Err(self.io("append", sled::Error::Unsupported("injected failure".into())));
        }
        // One transaction: the batch and both counters land together or not at all.
        let (seq, len) = (&self.batches, &self.meta)
            .transaction(|(batches, meta)| {
                let seq = tx_u64(meta, META_NEXT_SEQ)?.max(1);
                let mut next_sample = tx_u64(meta, META_NEXT_SAMPLE)?.max(1);
                let mut samples = samples.to_vec();
                for s in &mut samples {
                    s.sample_index = next_sample;
                    next_sample += 1;
                }
                let batch = TelemetryBatch { seq, samples, ..TelemetryBatch::default() };
                let bytes = batch.encode_to_vec();
                batches.insert(&seq.to_be_bytes(), bytes.as_slice())?;
                meta.insert(META_NEXT_SEQ, &(seq + 1).to_be_bytes())?;
                meta.insert(META_NEXT_SAMPLE, &next_sample.to_be_bytes())?;
                Ok((seq, bytes.len() as u64))
            })
            .map_err(|e| self.tx_err("append", e))?;
        state.batches += 1;
        state.bytes += len;
        self.enforce_cap(&mut state)?;
        Ok(Seq(seq))
    }

    /// The lowest seq the spool can still send: its oldest batch, or the next seq to be sealed
    /// when it is empty. Every seq below it was acknowledged or dropped.
    pub fn low_seq(&self) -> Result<Seq, SpoolError> {
        let _state = self.lock();
        self.low_seq_locked()
    }

    fn low_seq_locked(&self) -> Result<Seq, SpoolError> {
        match self.batches.first().map_err(|source| self.io("read", source))? {
            Some((k, _)) => Ok(Seq(key_seq(&k))),
            None => Ok(Seq(self.meta_u64(META_NEXT_SEQ)?.max(1))),
        }
    }

    /// Up to `n` of the oldest unacknowledged batches with seq above `after`, ready to send
    /// (drop counters filled in).
    pub fn oldest(&self, after: Seq, n: usize) -> Result<Vec<(Seq, Bytes)>, SpoolError> {
        self.oldest_stamped(after, n, |_| {})
    }

    /// Like [`Spool::oldest`], with `stamp` applied to each batch just before it is encoded
    /// (the uplink adds what is known only at send time, such as the clock offset).
    pub fn oldest_stamped(
        &self,
        after: Seq,
        n: usize,
        stamp: impl Fn(&mut TelemetryBatch),
    ) -> Result<Vec<(Seq, Bytes)>, SpoolError> {
        let (stats, low) = {
            let state = self.lock();
            (*state, self.low_seq_locked()?)
        };
        let start = after.0.saturating_add(1).to_be_bytes();
        let mut out = Vec::with_capacity(n);
        for item in self.batches.range(start..).take(n) {
            let (k, v) = item.map_err(|source| self.io("read", source))?;
            let seq = Seq(key_seq(&k));
            let mut batch = TelemetryBatch::decode(v.as_ref())
                .map_err(|source| SpoolError::Decode { seq, source })?;
            batch.spool_dropped_batches = stats.dropped_batches;
            batch.spool_dropped_samples = stats.dropped_samples;
            batch.spool_low_seq = low.0;
            stamp(&mut batch);
            out.push((seq, common::wire::encode(&batch)));
        }
        Ok(out)
    }

    /// Removes a batch the aggregator has acknowledged. Acking an absent seq is a no-op.
    pub fn ack(&self, seq: Seq) -> Result<(), SpoolError> {
        let mut state = self.lock();
        if let Some(old) =
            self.batches.remove(seq.0.to_be_bytes()).map_err(|source| self.io("ack", source))?
        {
            state.batches = state.batches.saturating_sub(1);
            state.bytes = state.bytes.saturating_sub(old.len() as u64);
        }
        Ok(())
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.db.flush().map(drop).map_err(|source| self.io("flush", source))
    }

    /// Batches and samples ever sealed into this spool (its highest seq and sample index).
    pub fn produced(&self) -> Result<(u64, u64), SpoolError> {
        let _state = self.lock();
        let batches = self.meta_u64(META_NEXT_SEQ)?.saturating_sub(1);
        let samples = self.meta_u64(META_NEXT_SAMPLE)?.saturating_sub(1);
        Ok((batches, samples))
    }

    /// Current counters.
    pub fn stats(&self) -> SpoolStats {
        *self.lock()
    }

    /// Drops a batch that can never be delivered (larger than the aggregator accepts), counting
    /// it like a batch dropped for space. Returns the samples it held.
    pub fn discard(&self, seq: Seq) -> Result<u64, SpoolError> {
        let mut state = self.lock();
        Ok(self.drop_batch(&mut state, seq, "discard")?.unwrap_or(0))
    }

    fn enforce_cap(&self, state: &mut SpoolStats) -> Result<(), SpoolError> {
        while state.bytes > self.max_bytes && state.batches > 1 {
            let Some((k, _)) = self.batches.first().map_err(|source| self.io("drop", source))?
            else {
                break;
            };
            let seq = Seq(key_seq(&k));
            let Some(samples) = self.drop_batch(state, seq, "drop")? else { break };
            warn!(
                %seq,
                samples,
                dropped_batches = state.dropped_batches,
                max_bytes = self.max_bytes,
                "Spool full: dropped the oldest batch."
            );
        }
        Ok(())
    }

    /// Removes batch `seq` and counts it as dropped, in one transaction. Returns its samples,
    /// or `None` when it was not there.
    fn drop_batch(
        &self,
        state: &mut SpoolStats,
        seq: Seq,
        op: &'static str,
    ) -> Result<Option<u64>, SpoolError> {
        let (dropped_batches, dropped_samples) = (state.dropped_batches, state.dropped_samples);
        let removed = (&self.batches, &self.meta)
            .transaction(|(batches, meta)| {
                let Some(v) = batches.remove(&seq.0.to_be_bytes())? else {
                    return Ok(None);
                };
                let samples =
                    TelemetryBatch::decode(v.as_ref()).map_or(0, |b| b.samples.len() as u64);
                meta.insert(META_DROPPED_BATCHES, &(dropped_batches + 1).to_be_bytes())?;
                meta.insert(META_DROPPED_SAMPLES, &(dropped_samples + samples).to_be_bytes())?;
                Ok(Some((v.len() as u64, samples)))
            })
            .map_err(|e| self.tx_err(op, e))?;
        let Some((len, samples)) = removed else { return Ok(None) };
        state.batches = state.batches.saturating_sub(1);
        state.bytes = state.bytes.saturating_sub(len);
        state.dropped_batches += 1;
        state.dropped_samples += samples;
        Ok(Some(samples))
    }

    fn tx_err(&self, op: &'static str, e: TransactionError<()>) -> SpoolError {
        match e {
            TransactionError::Storage(source) => self.io(op, source),
            // The closures above never abort.
            TransactionError::Abort(()) => {
                self.io(op, sled::Error::Unsupported("transaction aborted".into()))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolStats> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn meta_u64(&self, key: &[u8]) -> Result<u64, SpoolError> {
        let v = self.meta.get(key).map_err(|source| self.io("read meta", source))?;
        Ok(v.and_then(|v| v.as_ref().try_into().ok()).map_or(0, u64::from_be_bytes))
    }

    fn put_meta(&self, key: &[u8], v: u64) -> Result<(), SpoolError> {
        self.meta
            .insert(key, &v.to_be_bytes())
            .map(drop)
            .map_err(|source| self.io("write meta", source))
    }

    /// Another tree in the spool's database, for state that must survive a restart with the
    /// spool (the directive ledger). Its bytes are not counted against `max_bytes`; its owner
    /// bounds it.
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, SpoolError> {
        self.db.open_tree(name).map_err(|source| self.io("open tree", source))
    }

    fn io(&self, op: &'static str, source: sled::Error) -> SpoolError {
        SpoolError::Io { path: self.path.clone(), op, source }
    }
}

/// Reads a u64 counter inside a transaction (absent or malformed reads as 0).
fn tx_u64(tree: &TransactionalTree, key: &[u8]) -> Result<u64, ConflictableTransactionError<()>> {
    let v = tree.get(key)?;
    Ok(v.and_then(|v| v.as_ref().try_into().ok()).map_or(0, u64::from_be_bytes))
}

fn key_seq(k: &[u8]) -> u64 {
    k.try_into().map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled releases its file lock from a background thread shortly after the handle drops.
    fn reopen(path: &Path, max_bytes: u64) -> Spool {
        for _ in 0..100 {
            if let Ok(s) = Spool::open(path, max_bytes) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Spool::open(path, max_bytes).unwrap()
    }

    fn samples(n: usize) -> Vec<Sample> {
        (0..n).map(|i| Sample { unix_ms: i as i64, ..Sample::default() }).collect()
    }

    #[test]
    fn append_ack_and_reopen_keep_order_and_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let epoch;
        {
            let spool = reopen(dir.path(), 1 << 20);
            epoch = spool.epoch();
            assert_eq!(spool.append(&samples(2)).unwrap(), Seq(1));
            assert_eq!(spool.append(&samples(3)).unwrap(), Seq(2));
            spool.ack(Seq(1)).unwrap();
            spool.flush().unwrap();
        }
        let spool = reopen(dir.path(), 1 << 20);
        assert_eq!(spool.epoch(), epoch, "epoch survives a restart");
        assert_eq!(spool.stats().batches, 1);
        let pending = spool.oldest(Seq(0), 10).unwrap();
        assert_eq!(pending.len(), 1);
        let (batch, _) =
            common::wire::decode_frame::<TelemetryBatch>(&pending[0].1, u32::MAX).unwrap().unwrap();
        assert_eq!(batch.seq, 2);
        let idx: Vec<u64> = batch.samples.iter().map(|s| s.sample_index).collect();
        assert_eq!(idx, [3, 4, 5], "sample indexes continue across batches");
        assert_eq!(spool.append(&samples(1)).unwrap(), Seq(3), "seqs continue after reopen");
        assert!(spool.oldest(Seq(2), 10).unwrap().iter().all(|(s, _)| s.0 > 2));
    }

    #[test]
    fn size_cap_drops_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = reopen(dir.path(), 200);
        for _ in 0..10 {
            spool.append(&samples(5)).unwrap();
        }
        let stats = spool.stats();
        assert!(stats.bytes <= 200 || stats.batches == 1, "{stats:?}");
        assert!(stats.dropped_batches > 0);
        assert_eq!(stats.dropped_samples, stats.dropped_batches * 5);
        assert_eq!(stats.batches + stats.dropped_batches, 10);
        // The newest survive, and the drop counters travel with every batch.
        let pending = spool.oldest(Seq(0), 100).unwrap();
        assert_eq!(pending.last().unwrap().0, Seq(10));
        let (batch, _) =
            common::wire::decode_frame::<TelemetryBatch>(&pending[0].1, u32::MAX).unwrap().unwrap();
        assert_eq!(batch.spool_dropped_batches, stats.dropped_batches);
        drop(spool);
        let spool = reopen(dir.path(), 200);
        assert_eq!(spool.stats().dropped_batches, stats.dropped_batches, "drops are persisted");
        let newest = pending.last().unwrap().0;
        assert_eq!(spool.discard(newest).unwrap(), 5);
        assert_eq!(spool.stats().dropped_batches, stats.dropped_batches + 1);
        assert_eq!(spool.discard(newest).unwrap(), 0, "discarding twice counts once");
    }

    #[test]
    fn a_batch_written_without_its_counters_is_not_renumbered() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = reopen(dir.path(), 1 << 20);
            assert_eq!(spool.append(&samples(2)).unwrap(), Seq(1));
            // What a crash between the batch write and the counter writes leaves behind: batch 2
            // (samples 3 and 4) is stored, the counters still say seq 2 / sample 3.
            let mut crashed = samples(2);
            crashed[0].sample_index = 3;
            crashed[1].sample_index = 4;
            let batch = TelemetryBatch { seq: 2, samples: crashed, ..TelemetryBatch::default() };
            spool.batches.insert(2u64.to_be_bytes(), batch.encode_to_vec()).unwrap();
            spool.flush().unwrap();
        }
        let spool = reopen(dir.path(), 1 << 20);
        assert_eq!(spool.append(&samples(1)).unwrap(), Seq(3), "seq 2 must not be reused");
        let pending = spool.oldest(Seq(2), 10).unwrap();
        let (batch, _) =
            common::wire::decode_frame::<TelemetryBatch>(&pending[0].1, u32::MAX).unwrap().unwrap();
        assert_eq!(batch.samples[0].sample_index, 5, "sample indexes must not be reused");
        assert_eq!(spool.produced().unwrap(), (3, 5));
    }

    #[test]
    fn low_seq_is_the_oldest_sendable_batch() {
        let dir = tempfile::tempdir().unwrap();
        let spool = reopen(dir.path(), 200);
        assert_eq!(spool.low_seq().unwrap(), Seq(1), "empty new spool: the next seq");
        for _ in 0..10 {
            spool.append(&samples(5)).unwrap();
        }
        let oldest = spool.oldest(Seq(0), 100).unwrap();
        let first = oldest[0].0;
        assert!(first > Seq(1), "the cap dropped some batches");
        assert_eq!(spool.low_seq().unwrap(), first);
        let (batch, _) =
            common::wire::decode_frame::<TelemetryBatch>(&oldest[0].1, u32::MAX).unwrap().unwrap();
        assert_eq!(batch.spool_low_seq, first.0, "every batch carries the low seq");
        for (seq, _) in &oldest {
            spool.ack(*seq).unwrap();
        }
        assert_eq!(spool.low_seq().unwrap(), Seq(11), "all acked: the next seq");
    }
}
