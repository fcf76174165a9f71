//! The agent's durable queue of telemetry batches (sled).
//!
//! Invariants:
//! - A batch is in the spool from the moment [`Spool::append`] returns until [`Spool::ack`] is
//!   called for its seq, which the uplink does only after the aggregator's *application* `Ack`
//!   (sent once the batch is durable there). A QUIC-level ack is never enough.
//! - Seqs start at 1, increase by 1 per batch and are never reused within a spool epoch; sample
//!   indexes likewise, so the aggregator can count samples exactly once.
//! - The epoch is a random number chosen when the spool is created; a wiped spool gets a new one.
//! - The spool never holds more than `max_bytes` of batches (except the newest batch, always
//!   kept). Beyond that the *oldest* batches are dropped; each drop is counted (batches and
//!   samples), logged at WARN, persisted, and reported to the aggregator in every batch.
//! - All key layouts live here: `batches`: seq (u64 BE) -> TelemetryBatch (protobuf, without the
//!   drop counters, which are filled in when sent); `meta`: fixed names -> u64 BE.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use common::ids::Seq;
use common::proto::{Sample, TelemetryBatch};
use prost::Message;
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
}

impl Spool {
    /// Opens (or creates) the spool at `path` with a size cap of `max_bytes`.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let open_err = |source| SpoolError::Open { path: path.into(), source };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(4 * 1024 * 1024)
            .flush_every_ms(Some(1000))
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
        Ok(spool)
    }

    /// The spool's epoch (random, fixed for the spool's life).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Seals `samples` into a new batch: numbers the samples, assigns the next seq, stores it and
    /// enforces the size cap. Durable once [`Spool::flush`] returns.
    pub fn append(&self, mut samples: Vec<Sample>) -> Result<Seq, SpoolError> {
        let mut state = self.lock();
        let seq = self.meta_u64(META_NEXT_SEQ)?.max(1);
        let mut next_sample = self.meta_u64(META_NEXT_SAMPLE)?.max(1);
        for s in &mut samples {
            s.sample_index = next_sample;
            next_sample += 1;
        }
        let batch = TelemetryBatch { seq, samples, ..TelemetryBatch::default() };
        let bytes = batch.encode_to_vec();
        let mut tx = sled::Batch::default();
        tx.insert(&seq.to_be_bytes(), bytes.as_slice());
        self.batches.apply_batch(tx).map_err(|source| self.io("append", source))?;
        self.put_meta(META_NEXT_SEQ, seq + 1)?;
        self.put_meta(META_NEXT_SAMPLE, next_sample)?;
        state.batches += 1;
        state.bytes += bytes.len() as u64;
        self.enforce_cap(&mut state)?;
        Ok(Seq(seq))
    }

    /// Up to `n` of the oldest unacknowledged batches with seq above `after`, ready to send
    /// (drop counters filled in).
    pub fn oldest(&self, after: Seq, n: usize) -> Result<Vec<(Seq, Bytes)>, SpoolError> {
        let stats = *self.lock();
        let start = after.0.saturating_add(1).to_be_bytes();
        let mut out = Vec::with_capacity(n);
        for item in self.batches.range(start..).take(n) {
            let (k, v) = item.map_err(|source| self.io("read", source))?;
            let seq = Seq(key_seq(&k));
            let mut batch = TelemetryBatch::decode(v.as_ref())
                .map_err(|source| SpoolError::Decode { seq, source })?;
            batch.spool_dropped_batches = stats.dropped_batches;
            batch.spool_dropped_samples = stats.dropped_samples;
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
        let Some(v) = self
            .batches
            .remove(seq.0.to_be_bytes())
            .map_err(|source| self.io("discard", source))?
        else {
            return Ok(0);
        };
        self.count_drop(&mut state, &v)
    }

    fn enforce_cap(&self, state: &mut SpoolStats) -> Result<(), SpoolError> {
        while state.bytes > self.max_bytes && state.batches > 1 {
            let Some((k, v)) = self.batches.pop_min().map_err(|source| self.io("drop", source))?
            else {
                break;
            };
            let samples = self.count_drop(state, &v)?;
            warn!(
                seq = key_seq(&k),
                samples,
                dropped_batches = state.dropped_batches,
                max_bytes = self.max_bytes,
                "Spool full: dropped the oldest batch."
            );
        }
        Ok(())
    }

    fn count_drop(&self, state: &mut SpoolStats, batch: &[u8]) -> Result<u64, SpoolError> {
        let samples = TelemetryBatch::decode(batch).map_or(0, |b| b.samples.len() as u64);
        state.batches = state.batches.saturating_sub(1);
        state.bytes = state.bytes.saturating_sub(batch.len() as u64);
        state.dropped_batches += 1;
        state.dropped_samples += samples;
        self.put_meta(META_DROPPED_BATCHES, state.dropped_batches)?;
        self.put_meta(META_DROPPED_SAMPLES, state.dropped_samples)?;
        Ok(samples)
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

    fn io(&self, op: &'static str, source: sled::Error) -> SpoolError {
        SpoolError::Io { path: self.path.clone(), op, source }
    }
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
            assert_eq!(spool.append(samples(2)).unwrap(), Seq(1));
            assert_eq!(spool.append(samples(3)).unwrap(), Seq(2));
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
        assert_eq!(spool.append(samples(1)).unwrap(), Seq(3), "seqs continue after reopen");
        assert!(spool.oldest(Seq(2), 10).unwrap().iter().all(|(s, _)| s.0 > 2));
    }

    #[test]
    fn size_cap_drops_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = reopen(dir.path(), 200);
        for _ in 0..10 {
            spool.append(samples(5)).unwrap();
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
}
