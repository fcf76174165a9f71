//! Durable telemetry storage: the [`TelemetryStore`] interface and its sled implementation.
//!
//! The interface is what the rest of the aggregator may ask of storage, kept narrow so that a
//! second backend (PostgreSQL, for several aggregators sharing one fleet) can implement it.
//! Every method is blocking; async callers use `spawn_blocking`.
//!
//! Invariants:
//! - [`TelemetryStore::commit`] returns only after the batches are durable (sled flushed).
//! - `(host, seq)` is stored at most once per spool epoch: a per-host watermark says "every seq up
//!   to here is stored", and the `seen` tree holds stored seqs above it (normally none or a few).
//! - The watermark also moves past seqs the agent says it will never send (its spool's low seq,
//!   in Hello and every batch: those were dropped), and `seen` entries at or below the watermark
//!   are removed as it moves, so `seen` stays bounded by the agent's spool however many batches
//!   were dropped.
//! - A sample more than [`MAX_FUTURE_MS`] ahead of its batch's arrival is refused (counted in
//!   the host's [`HostHealth`], logged), so a wrong agent clock cannot pin "latest" or keep
//!   samples beyond retention.
//! - Raw sample keys are deterministic (`host, unix_ms, sample_index`), so a batch re-applied
//!   after a crash between its writes overwrites itself instead of duplicating.
//! - The host record (watermark, counters) is written after the batch's samples, as one key, so
//!   recovery never sees the counters ahead of the data.
//! - Rollups are derived data: ingest marks (host, minute) dirty; [`TelemetryStore::roll_up`]
//!   recomputes dirty minutes from raw samples and dirty hours from minutes, so late or replayed
//!   data is folded in correctly.
//!
//! Key layouts (all in [`keys`]): `host` is the host id bytes, `\0` separates; times are i64
//! Unix ms mapped to order-preserving big-endian u64.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::warn;

use common::ids::HostId;
use common::model_stats::ModelTotals;
use common::proto::{Hello, Inventory, Sample, TelemetryBatch};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::views::{MetricPoint, Resolution};

/// Stored records skipped by reads because they did not decode, since this process started
/// (`flotilla_store_skipped_records_total`). A read that meets one goes on without it rather
/// than failing every query of that host and time; each skip is counted and logged.
static SKIPPED_RECORDS: AtomicU64 = AtomicU64::new(0);

/// Records skipped by reads so far, since this process started.
pub fn skipped_records() -> u64 {
    SKIPPED_RECORDS.load(Ordering::Relaxed)
}

/// Decodes a stored record with `decode`; one that does not decode is counted, logged (the
/// first, then every thousandth, so a corrupt range cannot flood the log) and skipped.
pub fn decode_or_skip<T, E: std::fmt::Display>(
    what: &str,
    key: &[u8],
    decoded: Result<T, E>,
) -> Option<T> {
    match decoded {
        Ok(value) => Some(value),
        Err(error) => {
            let skipped = SKIPPED_RECORDS.fetch_add(1, Ordering::Relaxed) + 1;
            if skipped == 1 || skipped.is_multiple_of(1000) {
                warn!(
                    record = what,
                    key = %String::from_utf8_lossy(key).escape_debug(),
                    %error,
                    skipped,
                    "Skipped a stored record that does not decode (corrupt, or written by a \
                     newer version); reads go on without it."
                );
            }
            None
        }
    }
}

/// One minute, ms.
pub const MINUTE_MS: i64 = 60_000;
/// One hour, ms.
pub const HOUR_MS: i64 = 3_600_000;
/// How long after a bucket ends it is rolled up (late batches re-mark it and are folded in).
pub const ROLLUP_GRACE_MS: i64 = 60_000;
/// How far ahead of its arrival (aggregator clock) a sample's time may be before it is refused.
pub const MAX_FUTURE_MS: i64 = 5 * MINUTE_MS;
/// Version byte in front of every stored [`HostHealth`].
const HEALTH_VERSION: u8 = 1;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened.
    #[error("store {path}: open failed")]
    Open {
        /// Directory.
        path: PathBuf,
        /// sled's reason.
        #[source]
        source: sled::Error,
    },
    /// A read or write failed.
    #[error("store: {op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// sled's reason.
        #[source]
        source: sled::Error,
    },
    /// A stored value does not decode.
    #[error("store: record {what} is corrupt: {reason}")]
    Corrupt {
        /// Which record.
        what: String,
        /// The decoder's message.
        reason: String,
    },
}

/// What the store keeps about a host (small: it is rewritten with every batch; the inventory
/// lives in its own tree and is written only on Hello).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Agent version from the latest Hello.
    pub agent_version: String,
    /// Config version from the latest Hello.
    pub config_version: String,
    /// The agent's spool epoch; seqs are scoped to it.
    pub spool_epoch: u64,
    /// Every seq up to this one is stored.
    pub watermark: u64,
    /// Stored seqs above the watermark (entries in the `seen` tree); 0 in the usual in-order case,
    /// which lets a batch skip the `seen` lookups entirely.
    pub seen_above: u64,
    /// Highest seq stored.
    pub last_seq: u64,
    /// First Hello, Unix ms.
    pub first_seen_ms: i64,
    /// Latest Hello or batch, Unix ms.
    pub last_seen_ms: i64,
    /// Samples stored, ever.
    pub samples_total: u64,
    /// Batches stored, ever.
    pub batches_total: u64,
    /// The agent's spool drop counters, as last reported.
    pub spool_dropped_batches: u64,
    /// Samples in those drops.
    pub spool_dropped_samples: u64,
    /// Client certificate expiry at the latest handshake, Unix seconds.
    pub cert_not_after_secs: i64,
}

/// How a host's telemetry pipeline is doing: what its agent last reported about itself, and
/// what the aggregator refused from it. Stored apart from [`HostRecord`] (tree `host_health`,
/// key `host`, a version byte then postcard), written only when it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHealth {
    /// The agent's clock minus the aggregator's, ms, as the agent last measured it.
    pub clock_offset_ms: Option<i64>,
    /// Times the agent failed to take a sample or seal samples into its spool since it started.
    pub telemetry_errors: u64,
    /// The latest such failure, in the agent's words (empty when none).
    pub last_telemetry_error: String,
    /// When it happened, Unix ms (agent clock; 0 when none).
    pub last_telemetry_error_unix_ms: i64,
    /// Samples refused because their time was more than [`MAX_FUTURE_MS`] ahead of arrival.
    pub future_samples_refused: u64,
    /// The latest arrival time (aggregator clock, Unix ms) of a refused future sample.
    pub last_future_refusal_ms: i64,
}

/// A batch to store, with the host it came from (read from its certificate).
#[derive(Debug, Clone)]
pub struct IncomingBatch {
    /// Sender.
    pub host: HostId,
    /// The batch.
    pub batch: TelemetryBatch,
    /// When it arrived, Unix ms.
    pub received_ms: i64,
}

/// What became of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Stored now.
    Stored,
    /// Already stored before (a retry); nothing changed.
    Duplicate,
}

/// Aggregates of one series over one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Values.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stats {
    fn of(v: f64) -> Self {
        Self { count: 1, sum: v, min: v, max: v }
    }

    fn merge(&mut self, o: &Self) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }
}

/// One bucket's aggregates for every series of a host.
pub type Rollup = BTreeMap<String, Stats>;

/// One model's requests in a bucket or window, merged with their histograms, and the samples
/// skipped because their histograms were malformed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelWindow {
    /// Everything the model did, merged.
    pub totals: ModelTotals,
    /// Samples skipped as malformed.
    pub malformed: u64,
}

/// Per model, its totals: what a model rollup holds and what [`TelemetryStore::model_totals`]
/// answers.
pub type ModelRollup = BTreeMap<String, ModelWindow>;

/// Adds a sample's model samples to `into` (a malformed one is counted, not added).
pub fn add_models(into: &mut ModelRollup, sample: &Sample) {
    for m in &sample.models {
        let w = into.entry(m.model.clone()).or_default();
        if w.totals.add(m).is_err() {
            w.malformed += 1;
        }
    }
}

/// Merges `from` into `into`.
pub fn merge_models(into: &mut ModelRollup, from: &ModelRollup) {
    for (model, w) in from {
        let e = into.entry(model.clone()).or_default();
        e.totals.merge(&w.totals);
        e.malformed += w.malformed;
    }
}

/// A stored model rollup: per model, its totals as a protobuf `ModelSample` (read back through
/// the same validation as the wire) and its malformed count.
#[derive(Serialize, Deserialize)]
struct StoredModel {
    sample: Vec<u8>,
    malformed: u64,
}

fn encode_models(rollup: &ModelRollup) -> Result<Vec<u8>, postcard::Error> {
    let stored: BTreeMap<&str, StoredModel> = rollup
        .iter()
        .map(|(m, w)| {
            (
                m.as_str(),
                StoredModel {
                    sample: w.totals.to_sample(m).encode_to_vec(),
                    malformed: w.malformed,
                },
            )
        })
        .collect();
    postcard::to_allocvec(&stored)
}

fn decode_models(bytes: &[u8]) -> Result<ModelRollup, String> {
    let stored: BTreeMap<String, StoredModel> =
        postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
    let mut out = ModelRollup::new();
    for (model, s) in stored {
        let sample =
            common::proto::ModelSample::decode(s.sample.as_slice()).map_err(|e| e.to_string())?;
        let mut w = ModelWindow { malformed: s.malformed, ..ModelWindow::default() };
        w.totals.add(&sample).map_err(|e| e.to_string())?;
        out.insert(model, w);
    }
    Ok(out)
}

/// What one rollup pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupReport {
    /// Minute buckets recomputed.
    pub minutes: u64,
    /// Hour buckets recomputed.
    pub hours: u64,
}

/// Where a reader of hour rollups stands: which store process wrote them, and how many hour
/// rollups it had written when the reader last asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupCursor {
    /// The store instance (a fresh number each time a store is opened).
    pub instance: u64,
    /// Hour rollups written by that instance so far.
    pub writes: u64,
}

/// Hour rollups written since a cursor ([`TelemetryStore::hour_changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HourChanges {
    /// The cursor to ask from next time.
    pub cursor: RollupCursor,
    /// `(host, hour start)` of each hour rollup written since the cursor asked from, oldest
    /// first (repeats possible); `None` when the store cannot tell (a cursor of another
    /// instance, or older than the writes it remembers): read every hour again.
    pub changed: Option<Vec<(String, i64)>>,
}

/// Hour rollup writes a [`SledStore`] remembers for [`TelemetryStore::hour_changes`] (about
/// 4 MiB): many times what a large fleet writes between two analytics passes (10,000 hosts
/// write 10,000 an hour). After a bigger backlog a reader is told it cannot know and reads
/// everything once.
pub const HOUR_LOG_CAPACITY: usize = 1 << 16;

/// How long each kind of data is kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Raw samples, ms.
    pub raw_ms: i64,
    /// Minute rollups, ms.
    pub minute_ms: i64,
    /// Hour rollups, ms.
    pub hour_ms: i64,
}

/// A read-modify-write step for [`ReportStore::update_doc`]: given the document's current
/// bytes (`None` when absent), returns the bytes to store, or an error that leaves it unchanged.
pub type DocUpdate<'a> = dyn FnMut(Option<&[u8]>) -> Result<Vec<u8>, StoreError> + 'a;

/// What the aggregator may ask of storage.
pub trait TelemetryStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records a host's Hello; a new spool epoch resets its seq watermark. Returns the record.
    fn record_hello(
        &self,
        host: &HostId,
        hello: &Hello,
        cert_not_after_secs: i64,
        now_ms: i64,
    ) -> Result<HostRecord, StoreError>;
    /// Stores batches, each at most once, and returns once they are durable.
    fn commit(&self, batches: &[IncomingBatch]) -> Result<Vec<CommitOutcome>, StoreError>;
    /// A host's telemetry health (default when nothing was ever reported or refused).
    fn host_health(&self, host: &HostId) -> Result<HostHealth, StoreError>;
    /// Stored seqs above a host's watermark (`seen` entries); stays bounded by the agent's spool.
    fn seen_count(&self, host: &HostId) -> Result<u64, StoreError>;
    /// Every known host.
    fn hosts(&self) -> Result<Vec<(HostId, HostRecord)>, StoreError>;
    /// One host.
    fn host(&self, host: &HostId) -> Result<Option<HostRecord>, StoreError>;
    /// A host's inventory from its latest Hello.
    fn inventory(&self, host: &HostId) -> Result<Option<Inventory>, StoreError>;
    /// The newest raw sample of a host.
    fn latest_sample(&self, host: &HostId) -> Result<Option<Sample>, StoreError>;
    /// Raw samples stored for a host (counts keys; for audits and tests).
    fn count_samples(&self, host: &HostId) -> Result<u64, StoreError>;
    /// A metric's points since `since_ms`, oldest first.
    fn series(
        &self,
        host: &HostId,
        metric: &str,
        since_ms: i64,
        resolution: Resolution,
    ) -> Result<Vec<MetricPoint>, StoreError>;
    /// Recomputes dirty rollups of buckets that closed at least [`ROLLUP_GRACE_MS`] before
    /// `now_ms` (so a minute is normally computed once, after its last samples arrived).
    fn roll_up(&self, now_ms: i64) -> Result<RollupReport, StoreError>;
    /// The hour rollups written since `since` (see [`HourChanges`]), so a reader can keep the
    /// decoded hours it has and re-read only those. A backend that cannot tell answers
    /// `changed: None` (this default), and readers read everything.
    fn hour_changes(&self, since: Option<RollupCursor>) -> Result<HourChanges, StoreError> {
        let _ = since;
        Ok(HourChanges::default())
    }
    /// Deletes data older than the retention allows; returns the number of records deleted.
    fn enforce_retention(&self, now_ms: i64, retention: Retention) -> Result<u64, StoreError>;
    /// Whole rollups (every series) of a host with bucket start in `[since_ms, until_ms)`,
    /// oldest first; `Raw` is treated as `Minute`.
    fn rollups(
        &self,
        host: &HostId,
        since_ms: i64,
        until_ms: i64,
        resolution: Resolution,
    ) -> Result<Vec<(i64, Rollup)>, StoreError>;
    /// Per model, everything a host's models did in `[since_ms, until_ms)`, merged with their
    /// latency histograms: exact percentiles over any window the data is kept for. This
    /// default merges the raw samples; a backend with model rollups reads whole hours and
    /// minutes from them and only the rest from raw samples, with the same result.
    fn model_totals(
        &self,
        host: &HostId,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<ModelRollup, StoreError> {
        let mut out = ModelRollup::new();
        for s in self.samples(host, since_ms, until_ms)? {
            add_models(&mut out, &s);
        }
        Ok(out)
    }
    /// Raw samples of a host in `[since_ms, until_ms)`, oldest first (undecodable ones skipped).
    fn samples(
        &self,
        host: &HostId,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<Sample>, StoreError>;
}

/// Revoked hosts: what outlives a restart so a revoked certificate stays refused.
pub trait RevocationStore: Send + Sync + std::fmt::Debug + 'static {
    /// Marks a host revoked at `at_secs`.
    fn revoke(&self, host: &HostId, at_secs: i64) -> Result<(), StoreError>;
    /// Lifts a revocation; returns whether there was one.
    fn unrevoke(&self, host: &HostId) -> Result<bool, StoreError>;
    /// Every revocation.
    fn revocations(&self) -> Result<Vec<(HostId, i64)>, StoreError>;
}

/// Analytics reports and history: documents the scheduler writes after each pass (forecasts,
/// costs, plans, the alert book, operator budgets) and the alert and anomaly history.
pub trait ReportStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores an analytics document (JSON) under `key`, durably.
    fn put_doc(&self, key: &str, json: &[u8]) -> Result<(), StoreError>;
    /// An analytics document.
    fn doc(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Atomically replaces the document under `key` with `update(current)`, durably: a
    /// compare-and-swap loop, so concurrent updates are never lost (each sees the other's
    /// result). An error from `update` leaves the document as it was and is returned.
    fn update_doc(&self, key: &str, update: &mut DocUpdate<'_>) -> Result<(), StoreError>;
    /// Analytics documents whose key starts with `prefix`, in key order.
    fn docs(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Deletes the analytics documents whose key starts with `prefix`; returns how many.
    fn delete_docs(&self, prefix: &str) -> Result<u64, StoreError>;
    /// Appends (or overwrites: the key is `kind, unix_ms, id`) one history record.
    fn put_history(
        &self,
        kind: &str,
        unix_ms: i64,
        id: &str,
        json: &[u8],
    ) -> Result<(), StoreError>;
    /// History records of `kind` at or after `since_ms`, newest first, at most `limit`.
    fn history(&self, kind: &str, since_ms: i64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError>;
}

/// The aggregator's storage, one interface per concern, so that a second backend can take over
/// one concern (say telemetry in PostgreSQL) without its callers changing. [`SledStore`]
/// implements them all on one sled database; [`Stores::sled`] builds the set from it.
#[derive(Debug, Clone)]
pub struct Stores {
    /// Hosts, batches, samples and rollups.
    pub telemetry: Arc<dyn TelemetryStore>,
    /// Revoked hosts.
    pub revocations: Arc<dyn RevocationStore>,
    /// Analytics reports and history.
    pub reports: Arc<dyn ReportStore>,
    /// Desired state, directive outbox, decisions, scaler state.
    pub control: Arc<dyn crate::control::store::ControlStore>,
}

impl Stores {
    /// Every concern on one sled database.
    pub fn sled(store: SledStore) -> Result<Self, StoreError> {
        let control = Arc::new(crate::control::store::SledControlStore::open(&store.db)?);
        let store = Arc::new(store);
        Ok(Self { telemetry: store.clone(), revocations: store.clone(), reports: store, control })
    }
}

/// Key layouts: the one place that knows how keys are built.
pub mod keys {
    /// i64 to order-preserving big-endian bytes.
    pub fn time(ms: i64) -> [u8; 8] {
        ((ms as u64) ^ (1 << 63)).to_be_bytes()
    }

    /// Inverse of [`time`].
    pub fn time_from(b: &[u8]) -> i64 {
        let raw = b.try_into().map_or(0, u64::from_be_bytes);
        (raw ^ (1 << 63)) as i64
    }

    /// `host \0`: the prefix of everything per host.
    pub fn host_prefix(host: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(host.len() + 17);
        k.extend_from_slice(host.as_bytes());
        k.push(0);
        k
    }

    /// `host \0 seq`.
    pub fn seen(host: &str, seq: u64) -> Vec<u8> {
        let mut k = host_prefix(host);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    /// `host \0 time index`: one raw sample.
    pub fn sample(host: &str, unix_ms: i64, index: u64) -> Vec<u8> {
        let mut k = host_prefix(host);
        k.extend_from_slice(&time(unix_ms));
        k.extend_from_slice(&index.to_be_bytes());
        k
    }

    /// `host \0 time`: a bucket (rollups, dirty marks) or the start of a time range.
    pub fn bucket(host: &str, start_ms: i64) -> Vec<u8> {
        let mut k = host_prefix(host);
        k.extend_from_slice(&time(start_ms));
        k
    }

    /// `kind \0 time id`: one analytics history record (alert transitions, anomalies).
    pub fn history(kind: &str, unix_ms: i64, id: &str) -> Vec<u8> {
        let mut k = host_prefix(kind);
        k.extend_from_slice(&time(unix_ms));
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// Splits a bucket or sample key into host and time.
    pub fn split(k: &[u8]) -> Option<(&str, i64)> {
        let nul = k.iter().position(|b| *b == 0)?;
        let host = std::str::from_utf8(&k[..nul]).ok()?;
        let t = k.get(nul + 1..nul + 9)?;
        Some((host, time_from(t)))
    }
}

/// The sled backend.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    hosts: sled::Tree,
    inventories: sled::Tree,
    seen: sled::Tree,
    health: sled::Tree,
    samples: sled::Tree,
    minutes: sled::Tree,
    hours: sled::Tree,
    model_minutes: sled::Tree,
    model_hours: sled::Tree,
    dirty_minutes: sled::Tree,
    dirty_hours: sled::Tree,
    revoked: sled::Tree,
    analytics: sled::Tree,
    history: sled::Tree,
    // Serializes every read-modify-write of host records (Hello on connection tasks, batches on
    // the commit worker) so neither overwrites the other's counters or epoch.
    host_records: std::sync::Mutex<()>,
    // Minutes already marked dirty since the last rollup pass began.
    marked_minutes: std::sync::Mutex<std::collections::HashSet<(String, i64)>>,
    // Dirty marks carry a fresh number so a rollup pass can clear only what it saw.
    mark: AtomicU64,
    // The last HOUR_LOG_CAPACITY hour rollups written, for `hour_changes`.
    hour_log: std::sync::Mutex<HourLog>,
}

/// The hour rollups a store instance wrote, newest last, bounded.
#[derive(Debug)]
struct HourLog {
    instance: u64,
    writes: u64,
    recent: std::collections::VecDeque<(String, i64)>,
}

// === impl HourLog ===

impl HourLog {
    fn new() -> Self {
        use std::hash::{BuildHasher as _, Hasher as _};
        // A number that differs between openings of a store and between processes (hash map
        // seeds are random per process and advance per call).
        let instance = std::collections::hash_map::RandomState::new().build_hasher().finish();
        Self { instance, writes: 0, recent: std::collections::VecDeque::new() }
    }

    fn record(&mut self, written: &[(String, i64)]) {
        for w in written {
            if self.recent.len() == HOUR_LOG_CAPACITY {
                self.recent.pop_front();
            }
            self.recent.push_back(w.clone());
        }
        self.writes += written.len() as u64;
    }

    fn since(&self, since: Option<RollupCursor>) -> HourChanges {
        let cursor = RollupCursor { instance: self.instance, writes: self.writes };
        let changed = since.filter(|c| c.instance == self.instance).and_then(|c| {
            let missed = usize::try_from(self.writes.checked_sub(c.writes)?).ok()?;
            let skip = self.recent.len().checked_sub(missed)?;
            Some(self.recent.iter().skip(skip).cloned().collect())
        });
        HourChanges { cursor, changed }
    }
}

// === impl SledStore ===

impl SledStore {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: path.into(), source };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(256 * 1024 * 1024)
            .open()
            .map_err(open_err)?;
        let tree = |name: &str| db.open_tree(name).map_err(open_err);
        Ok(Self {
            hosts: tree("hosts")?,
            inventories: tree("inventories")?,
            seen: tree("seen")?,
            health: tree("host_health")?,
            samples: tree("samples")?,
            minutes: tree("rollup_minute")?,
            hours: tree("rollup_hour")?,
            model_minutes: tree("model_rollup_minute")?,
            model_hours: tree("model_rollup_hour")?,
            dirty_minutes: tree("dirty_minute")?,
            dirty_hours: tree("dirty_hour")?,
            revoked: tree("revoked")?,
            analytics: tree("analytics")?,
            history: tree("history")?,
            mark: AtomicU64::new(1),
            hour_log: std::sync::Mutex::new(HourLog::new()),
            host_records: std::sync::Mutex::new(()),
            marked_minutes: std::sync::Mutex::default(),
            db,
        })
    }

    fn lock_marked(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<(String, i64)>> {
        self.marked_minutes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_host_records(&self) -> std::sync::MutexGuard<'_, ()> {
        self.host_records.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_host(&self, host: &str) -> Result<Option<HostRecord>, StoreError> {
        let Some(v) = self.hosts.get(host).map_err(io("read host"))? else {
            return Ok(None);
        };
        decode_host(host, &v).map(Some)
    }

    fn write_host(&self, host: &str, rec: &HostRecord) -> Result<(), StoreError> {
        let bytes = encode_host(host, rec)?;
        self.hosts.insert(host, bytes).map(drop).map_err(io("write host"))
    }

    fn mark_dirty(&self, tree: &sled::Tree, host: &str, bucket: i64) -> Result<(), StoreError> {
        let m = self.mark.fetch_add(1, Ordering::Relaxed);
        tree.insert(keys::bucket(host, bucket), &m.to_be_bytes())
            .map(drop)
            .map_err(io("mark dirty"))
    }

    /// Moves the watermark to at least `low - 1` (the agent will never send a seq below its
    /// spool's low seq), removing the `seen` entries it passes, then on through any contiguous
    /// `seen` entries above. Returns whether the record changed.
    fn advance_watermark(
        &self,
        host: &str,
        rec: &mut HostRecord,
        low: u64,
    ) -> Result<bool, StoreError> {
        let target = low.saturating_sub(1);
        if target <= rec.watermark {
            return Ok(false);
        }
        if rec.seen_above > 0 {
            let range =
                keys::seen(host, rec.watermark.saturating_add(1))..=keys::seen(host, target);
            let mut batch = sled::Batch::default();
            for k in self.seen.range(range).keys() {
                batch.remove(k.map_err(io("scan seen"))?);
                rec.seen_above = rec.seen_above.saturating_sub(1);
            }
            self.seen.apply_batch(batch).map_err(io("prune seen"))?;
        }
        rec.watermark = target;
        self.fold_seen(host, rec)?;
        Ok(true)
    }

    /// Moves the watermark through the `seen` entries just above it.
    fn fold_seen(&self, host: &str, rec: &mut HostRecord) -> Result<(), StoreError> {
        while rec.seen_above > 0
            && self
                .seen
                .remove(keys::seen(host, rec.watermark + 1))
                .map_err(io("advance"))?
                .is_some()
        {
            rec.watermark += 1;
            rec.seen_above -= 1;
        }
        Ok(())
    }

    fn read_health(&self, host: &str) -> Result<HostHealth, StoreError> {
        let Some(v) = self.health.get(host).map_err(io("read host health"))? else {
            return Ok(HostHealth::default());
        };
        let corrupt =
            |reason: String| StoreError::Corrupt { what: format!("health {host}"), reason };
        match v.split_first() {
            Some((&HEALTH_VERSION, rest)) => {
                postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string()))
            }
            Some((other, _)) => Err(corrupt(format!(
                "version {other}, this aggregator reads version {HEALTH_VERSION}; upgrade it"
            ))),
            None => Err(corrupt("empty record".into())),
        }
    }

    /// Applies `change` to a host's health and writes it back if it changed.
    fn update_health(
        &self,
        host: &str,
        change: impl FnOnce(&mut HostHealth),
    ) -> Result<(), StoreError> {
        let before = self.read_health(host)?;
        let mut after = before.clone();
        change(&mut after);
        if after == before {
            return Ok(());
        }
        let mut bytes = vec![HEALTH_VERSION];
        bytes.extend(postcard::to_allocvec(&after).map_err(|e| StoreError::Corrupt {
            what: format!("health {host}"),
            reason: e.to_string(),
        })?);
        self.health.insert(host, bytes).map(drop).map_err(io("write host health"))
    }

    fn commit_one(&self, b: &IncomingBatch) -> Result<CommitOutcome, StoreError> {
        let host = b.host.as_str();
        let mut rec = self.read_host(host)?.unwrap_or_else(|| HostRecord {
            first_seen_ms: b.received_ms,
            ..HostRecord::default()
        });
        let seq = b.batch.seq;
        // The low seq is never above the batch's own seq (that batch is still in the spool); one
        // that is cannot be trusted and is ignored.
        let low = if b.batch.spool_low_seq <= seq { b.batch.spool_low_seq } else { 0 };
        let advanced = self.advance_watermark(host, &mut rec, low)?;
        let seen_key = keys::seen(host, seq);
        let seen_before =
            rec.seen_above > 0 && self.seen.contains_key(&seen_key).map_err(io("read seen"))?;
        if seq <= rec.watermark || seen_before {
            if advanced {
                self.write_host(host, &rec)?;
            }
            return Ok(CommitOutcome::Duplicate);
        }
        // A set: a spooled batch may span many minutes (a per-sample list search was quadratic).
        let mut minutes = std::collections::BTreeSet::new();
        let mut writes = sled::Batch::default();
        let newest_allowed = b.received_ms.saturating_add(MAX_FUTURE_MS);
        let mut future = 0u64;
        let mut furthest_ms = 0i64;
        for s in &b.batch.samples {
            if s.unix_ms > newest_allowed {
                future += 1;
                furthest_ms = furthest_ms.max(s.unix_ms - b.received_ms);
                continue;
            }
            writes.insert(keys::sample(host, s.unix_ms, s.sample_index), s.encode_to_vec());
            minutes.insert(s.unix_ms.div_euclid(MINUTE_MS) * MINUTE_MS);
        }
        self.samples.apply_batch(writes).map_err(io("write samples"))?;
        for m in minutes {
            // One mark per (host, minute) between rollup passes is enough.
            if self.lock_marked().insert((host.to_owned(), m)) {
                self.mark_dirty(&self.dirty_minutes, host, m)?;
            }
        }
        if future > 0 {
            tracing::warn!(
                host,
                seq,
                refused = future,
                ahead_ms = furthest_ms,
                max_ahead_ms = MAX_FUTURE_MS,
                "Refused samples dated in the future; check the host's clock (NTP)."
            );
        }
        let health = &b.batch;
        self.update_health(host, |h| {
            if health.clock_offset_ms.is_some() {
                h.clock_offset_ms = health.clock_offset_ms;
            }
            h.telemetry_errors = health.telemetry_errors;
            h.last_telemetry_error.clone_from(&health.last_telemetry_error);
            h.last_telemetry_error_unix_ms = health.last_telemetry_error_unix_ms;
            if future > 0 {
                h.future_samples_refused += future;
                h.last_future_refusal_ms = b.received_ms;
            }
        })?;
        rec.samples_total += b.batch.samples.len() as u64 - future;
        rec.batches_total += 1;
        rec.last_seen_ms = rec.last_seen_ms.max(b.received_ms);
        rec.last_seq = rec.last_seq.max(seq);
        rec.spool_dropped_batches = b.batch.spool_dropped_batches;
        rec.spool_dropped_samples = b.batch.spool_dropped_samples;
        if seq == rec.watermark + 1 {
            rec.watermark = seq;
            self.fold_seen(host, &mut rec)?;
        } else {
            self.seen.insert(seen_key, &[]).map_err(io("write seen"))?;
            rec.seen_above += 1;
        }
        self.write_host(host, &rec)?;
        Ok(CommitOutcome::Stored)
    }

    /// Recomputes every bucket marked in `dirty` that closed at least [`ROLLUP_GRACE_MS`] before
    /// `now_ms`, with `fold(host, start, end)`, into `target` (series) and `models` (model
    /// totals); returns the buckets recomputed.
    fn roll_level(
        &self,
        dirty: &sled::Tree,
        (target, models): (&sled::Tree, &sled::Tree),
        width_ms: i64,
        now_ms: i64,
        fold: impl Fn(&str, i64, i64) -> Result<(Rollup, ModelRollup), StoreError>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut done = Vec::new();
        for item in dirty.iter() {
            let (key, mark) = item.map_err(io("scan dirty buckets"))?;
            let Some((host, start)) = keys::split(&key) else { continue };
            if start.saturating_add(width_ms + ROLLUP_GRACE_MS) > now_ms {
                continue;
            }
            let (rollup, model_rollup) = fold(host, start, start + width_ms)?;
            self.put_rollup(target, host, start, &rollup)?;
            self.put_models(models, host, start, &model_rollup)?;
            // Clear the mark only if no batch re-marked it meanwhile.
            let _ = dirty
                .compare_and_swap(&key, Some(mark), None::<&[u8]>)
                .map_err(io("clear dirty bucket"))?;
            done.push((host.to_owned(), start));
        }
        Ok(done)
    }

    /// Aggregates the raw samples of `host` in `[start, end)`.
    fn fold_samples(
        &self,
        host: &str,
        start: i64,
        end: i64,
    ) -> Result<(Rollup, ModelRollup), StoreError> {
        let mut rollup = Rollup::new();
        let mut models = ModelRollup::new();
        for s in self.samples.range(keys::bucket(host, start)..keys::bucket(host, end)) {
            let (k, v) = s.map_err(io("scan samples"))?;
            let Some(sample) = decode_or_skip("sample", &k, Sample::decode(v.as_ref())) else {
                continue;
            };
            for (name, value) in common::metrics::flatten(&sample) {
                merge_into(&mut rollup, name, Stats::of(value));
            }
            add_models(&mut models, &sample);
        }
        Ok((rollup, models))
    }

    /// Merges the minute rollups of `host` in `[start, end)`.
    fn fold_minutes(
        &self,
        host: &str,
        start: i64,
        end: i64,
    ) -> Result<(Rollup, ModelRollup), StoreError> {
        let mut rollup = Rollup::new();
        for m in self.minutes.range(keys::bucket(host, start)..keys::bucket(host, end)) {
            let (k, v) = m.map_err(io("scan minutes"))?;
            let Some(minute) = decode_or_skip("rollup", &k, postcard::from_bytes::<Rollup>(&v))
            else {
                continue;
            };
            for (name, st) in minute {
                merge_into(&mut rollup, name, st);
            }
        }
        let mut models = ModelRollup::new();
        for m in self.model_minutes.range(keys::bucket(host, start)..keys::bucket(host, end)) {
            let (k, v) = m.map_err(io("scan model minutes"))?;
            if let Some(minute) = decode_or_skip("model rollup", &k, decode_models(&v)) {
                merge_models(&mut models, &minute);
            }
        }
        Ok((rollup, models))
    }

    fn put_models(
        &self,
        tree: &sled::Tree,
        host: &str,
        start: i64,
        rollup: &ModelRollup,
    ) -> Result<(), StoreError> {
        let key = keys::bucket(host, start);
        if rollup.is_empty() {
            return tree.remove(key).map(drop).map_err(io("write model rollup"));
        }
        let bytes = encode_models(rollup).map_err(|e| StoreError::Corrupt {
            what: format!("model rollup {host}"),
            reason: e.to_string(),
        })?;
        tree.insert(key, bytes).map(drop).map_err(io("write model rollup"))
    }

    /// Whether any key of `host` lies in `[start, end)` of `tree`.
    fn any_in(
        &self,
        tree: &sled::Tree,
        host: &str,
        start: i64,
        end: i64,
    ) -> Result<bool, StoreError> {
        Ok(tree
            .range(keys::bucket(host, start)..keys::bucket(host, end))
            .next()
            .transpose()
            .map_err(io("scan range"))?
            .is_some())
    }

    /// The model rollup of `host` at `start` in `tree`, if one is stored and decodes.
    fn model_bucket(
        &self,
        tree: &sled::Tree,
        host: &str,
        start: i64,
    ) -> Result<Option<ModelRollup>, StoreError> {
        let key = keys::bucket(host, start);
        Ok(tree
            .get(&key)
            .map_err(io("read model rollup"))?
            .and_then(|v| decode_or_skip("model rollup", &key, decode_models(&v))))
    }

    fn put_rollup(
        &self,
        tree: &sled::Tree,
        host: &str,
        start: i64,
        rollup: &Rollup,
    ) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(rollup).map_err(|e| StoreError::Corrupt {
            what: format!("rollup {host}"),
            reason: e.to_string(),
        })?;
        tree.insert(keys::bucket(host, start), bytes).map(drop).map_err(io("write rollup"))
    }

    fn delete_before(
        &self,
        tree: &sled::Tree,
        host: &str,
        cutoff_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut n = 0;
        let range = keys::host_prefix(host)..keys::bucket(host, cutoff_ms);
        let mut batch = sled::Batch::default();
        for item in tree.range(range).keys() {
            batch.remove(item.map_err(io("scan for retention"))?);
            n += 1;
        }
        tree.apply_batch(batch).map_err(io("delete expired"))?;
        Ok(n)
    }
}

impl TelemetryStore for SledStore {
    fn record_hello(
        &self,
        host: &HostId,
        hello: &Hello,
        cert_not_after_secs: i64,
        now_ms: i64,
    ) -> Result<HostRecord, StoreError> {
        let _guard = self.lock_host_records();
        let mut rec = self
            .read_host(host.as_str())?
            .unwrap_or_else(|| HostRecord { first_seen_ms: now_ms, ..HostRecord::default() });
        if rec.spool_epoch != hello.spool_epoch {
            // A new spool numbers from 1 again: forget the old epoch's seqs.
            rec.spool_epoch = hello.spool_epoch;
            rec.watermark = 0;
            rec.seen_above = 0;
            rec.last_seq = 0;
            for k in self.seen.scan_prefix(keys::host_prefix(host.as_str())).keys() {
                self.seen.remove(k.map_err(io("scan seen"))?).map_err(io("reset seen"))?;
            }
        }
        self.advance_watermark(host.as_str(), &mut rec, hello.spool_low_seq)?;
        let inventory = hello.inventory.clone().unwrap_or_default().encode_to_vec();
        self.inventories.insert(host.as_str(), inventory).map_err(io("write inventory"))?;
        rec.agent_version.clone_from(&hello.agent_version);
        rec.config_version.clone_from(&hello.config_version);
        rec.last_seen_ms = rec.last_seen_ms.max(now_ms);
        rec.cert_not_after_secs = cert_not_after_secs;
        self.write_host(host.as_str(), &rec)?;
        // No flush here: nothing acknowledged depends on this record. The next commit's flush
        // makes it durable with that commit's batches (sled flushes every write before it); if
        // the aggregator dies first, the agent says Hello again on reconnecting. A flush per
        // Hello made a reconnect storm wait on the disk once per agent.
        Ok(rec)
    }

    fn commit(&self, batches: &[IncomingBatch]) -> Result<Vec<CommitOutcome>, StoreError> {
        let guard = self.lock_host_records();
        let outcomes = batches.iter().map(|b| self.commit_one(b)).collect::<Result<Vec<_>, _>>()?;
        drop(guard);
        self.db.flush().map_err(io("flush"))?;
        Ok(outcomes)
    }

    fn host_health(&self, host: &HostId) -> Result<HostHealth, StoreError> {
        self.read_health(host.as_str())
    }

    fn seen_count(&self, host: &HostId) -> Result<u64, StoreError> {
        Ok(self.seen.scan_prefix(keys::host_prefix(host.as_str())).keys().count() as u64)
    }

    fn hosts(&self) -> Result<Vec<(HostId, HostRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.hosts.iter() {
            let (k, v) = item.map_err(io("scan hosts"))?;
            let Ok(id) = HostId::new(&String::from_utf8_lossy(&k)) else {
                warn!(key = %String::from_utf8_lossy(&k).escape_debug(), "Skipped a host record with an invalid host id.");
                continue;
            };
            // One bad record must not hide every other host: report it and go on.
            match decode_host(&id, &v) {
                Ok(rec) => out.push((id, rec)),
                Err(e) => warn!(host = %id, error = %e, "Skipped an undecodable host record."),
            }
        }
        Ok(out)
    }

    fn host(&self, host: &HostId) -> Result<Option<HostRecord>, StoreError> {
        self.read_host(host.as_str())
    }

    fn inventory(&self, host: &HostId) -> Result<Option<Inventory>, StoreError> {
        let Some(v) = self.inventories.get(host.as_str()).map_err(io("read inventory"))? else {
            return Ok(None);
        };
        Inventory::decode(v.as_ref()).map(Some).map_err(|e| StoreError::Corrupt {
            what: format!("inventory {host}"),
            reason: e.to_string(),
        })
    }

    fn latest_sample(&self, host: &HostId) -> Result<Option<Sample>, StoreError> {
        let Some(item) = self.samples.scan_prefix(keys::host_prefix(host.as_str())).next_back()
        else {
            return Ok(None);
        };
        let (k, v) = item.map_err(io("read latest sample"))?;
        Sample::decode(v.as_ref()).map(Some).map_err(|e| StoreError::Corrupt {
            what: format!("sample {:?}", keys::split(&k)),
            reason: e.to_string(),
        })
    }

    fn count_samples(&self, host: &HostId) -> Result<u64, StoreError> {
        Ok(self.samples.scan_prefix(keys::host_prefix(host.as_str())).keys().count() as u64)
    }

    fn series(
        &self,
        host: &HostId,
        metric: &str,
        since_ms: i64,
        resolution: Resolution,
    ) -> Result<Vec<MetricPoint>, StoreError> {
        let h = host.as_str();
        let range = keys::bucket(h, since_ms)..keys::bucket(h, i64::MAX);
        let mut points = Vec::new();
        match resolution {
            Resolution::Raw => {
                for item in self.samples.range(range) {
                    let (k, v) = item.map_err(io("scan samples"))?;
                    let Some(s) = decode_or_skip("sample", &k, Sample::decode(v.as_ref())) else {
                        continue;
                    };
                    if let Some(value) = common::metrics::value(&s, metric) {
                        points.push(MetricPoint {
                            unix_ms: s.unix_ms,
                            value,
                            min: value,
                            max: value,
                            count: 1,
                        });
                    }
                }
            }
            Resolution::Minute | Resolution::Hour => {
                let tree =
                    if resolution == Resolution::Minute { &self.minutes } else { &self.hours };
                for item in tree.range(range) {
                    let (k, v) = item.map_err(io("scan rollups"))?;
                    let Some((_, start)) = keys::split(&k) else { continue };
                    let Some(rollup) =
                        decode_or_skip("rollup", &k, postcard::from_bytes::<Rollup>(&v))
                    else {
                        continue;
                    };
                    if let Some(st) = rollup.get(metric).filter(|st| st.count > 0) {
                        points.push(MetricPoint {
                            unix_ms: start,
                            value: st.sum / st.count as f64,
                            min: st.min,
                            max: st.max,
                            count: st.count,
                        });
                    }
                }
            }
        }
        Ok(points)
    }

    fn roll_up(&self, now_ms: i64) -> Result<RollupReport, StoreError> {
        // Batches from here on mark their minutes again, so a minute recomputed below before
        // they arrived stays dirty for the next pass.
        self.lock_marked().clear();
        // Each minute's hour is marked dirty before the minute's own mark is cleared, so a
        // reader never sees a settled minute under an hour rollup that lacks it. A set: after
        // a backlog (an agent's spool replaying hours) there are many minutes, and a list
        // searched per minute made this pass quadratic.
        let hours_marked = std::cell::RefCell::new(std::collections::HashSet::new());
        let minutes = self.roll_level(
            &self.dirty_minutes,
            (&self.minutes, &self.model_minutes),
            MINUTE_MS,
            now_ms,
            |h, a, b| {
                let hour = a.div_euclid(HOUR_MS) * HOUR_MS;
                if hours_marked.borrow_mut().insert((h.to_owned(), hour)) {
                    self.mark_dirty(&self.dirty_hours, h, hour)?;
                }
                self.fold_samples(h, a, b)
            },
        )?;
        let hours = self.roll_level(
            &self.dirty_hours,
            (&self.hours, &self.model_hours),
            HOUR_MS,
            now_ms,
            |h, a, b| self.fold_minutes(h, a, b),
        )?;
        self.hour_log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(&hours);
        Ok(RollupReport { minutes: minutes.len() as u64, hours: hours.len() as u64 })
    }

    fn hour_changes(&self, since: Option<RollupCursor>) -> Result<HourChanges, StoreError> {
        Ok(self.hour_log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).since(since))
    }

    fn enforce_retention(&self, now_ms: i64, r: Retention) -> Result<u64, StoreError> {
        let mut n = 0;
        for (host, _) in self.hosts()? {
            let h = host.as_str();
            n += self.delete_before(&self.samples, h, now_ms - r.raw_ms)?;
            n += self.delete_before(&self.minutes, h, now_ms - r.minute_ms)?;
            n += self.delete_before(&self.hours, h, now_ms - r.hour_ms)?;
            n += self.delete_before(&self.model_minutes, h, now_ms - r.minute_ms)?;
            n += self.delete_before(&self.model_hours, h, now_ms - r.hour_ms)?;
            // Samples dated past the future bound (stored before ingest refused them) would
            // pin "latest" and never expire.
            let future = keys::bucket(h, now_ms.saturating_add(MAX_FUTURE_MS + 1))
                ..keys::bucket(h, i64::MAX);
            let mut batch = sled::Batch::default();
            for k in self.samples.range(future).keys() {
                batch.remove(k.map_err(io("scan future samples"))?);
                n += 1;
            }
            self.samples.apply_batch(batch).map_err(io("delete future samples"))?;
        }
        // Analytics history lives as long as hourly rollups.
        let mut batch = sled::Batch::default();
        for k in self.history.iter().keys() {
            let k = k.map_err(io("scan history"))?;
            if keys::split(&k).is_some_and(|(_, t)| t < now_ms - r.hour_ms) {
                batch.remove(k);
                n += 1;
            }
        }
        self.history.apply_batch(batch).map_err(io("delete expired history"))?;
        Ok(n)
    }

    fn rollups(
        &self,
        host: &HostId,
        since_ms: i64,
        until_ms: i64,
        resolution: Resolution,
    ) -> Result<Vec<(i64, Rollup)>, StoreError> {
        let tree = if resolution == Resolution::Hour { &self.hours } else { &self.minutes };
        self.scan_rollups(tree, host.as_str(), since_ms, until_ms)
    }

    fn model_totals(
        &self,
        host: &HostId,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<ModelRollup, StoreError> {
        // Whole hours from hour rollups, whole minutes from minute rollups, the rest from raw
        // samples. A bucket is read from its rollup only when nothing in it is waiting to be
        // rolled up (its own dirty mark, or for an hour a dirty minute in it), so late data is
        // never missed: the finer level holds it.
        let h = host.as_str();
        let mut out = ModelRollup::new();
        let mut t = since_ms;
        while t < until_ms {
            let hour = t.div_euclid(HOUR_MS) * HOUR_MS;
            let hour_end = hour + HOUR_MS;
            if t == hour && hour_end <= until_ms {
                let settled = !self.any_in(&self.dirty_hours, h, hour, hour + 1)?
                    && !self.any_in(&self.dirty_minutes, h, hour, hour_end)?;
                if settled {
                    if let Some(b) = self.model_bucket(&self.model_hours, h, hour)? {
                        merge_models(&mut out, &b);
                        t = hour_end;
                        continue;
                    }
                    // Settled without an hour rollup: an hour without data (skipped whole)
                    // or one from before model rollups existed (read below, finer).
                    if !self.any_in(&self.samples, h, hour, hour_end)?
                        && !self.any_in(&self.model_minutes, h, hour, hour_end)?
                    {
                        t = hour_end;
                        continue;
                    }
                }
            }
            let minute = t.div_euclid(MINUTE_MS) * MINUTE_MS;
            let minute_end = (minute + MINUTE_MS).min(hour_end);
            if t == minute
                && minute_end <= until_ms
                && !self.any_in(&self.dirty_minutes, h, minute, minute + 1)?
                && let Some(b) = self.model_bucket(&self.model_minutes, h, minute)?
            {
                merge_models(&mut out, &b);
                t = minute_end;
                continue;
            }
            let end = minute_end.min(until_ms);
            for s in self.samples(host, t, end)? {
                add_models(&mut out, &s);
            }
            t = end;
        }
        Ok(out)
    }

    fn samples(
        &self,
        host: &HostId,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<Sample>, StoreError> {
        let h = host.as_str();
        let mut out = Vec::new();
        if since_ms >= until_ms {
            return Ok(out);
        }
        for item in self.samples.range(keys::bucket(h, since_ms)..keys::bucket(h, until_ms)) {
            let (_, v) = item.map_err(io("scan samples"))?;
            if let Ok(s) = Sample::decode(v.as_ref()) {
                out.push(s);
            }
        }
        Ok(out)
    }
}

impl RevocationStore for SledStore {
    fn revoke(&self, host: &HostId, at_secs: i64) -> Result<(), StoreError> {
        self.revoked.insert(host.as_str(), &at_secs.to_be_bytes()).map_err(io("revoke"))?;
        self.db.flush().map(drop).map_err(io("flush"))
    }

    fn unrevoke(&self, host: &HostId) -> Result<bool, StoreError> {
        let had = self.revoked.remove(host.as_str()).map_err(io("unrevoke"))?.is_some();
        self.db.flush().map_err(io("flush"))?;
        Ok(had)
    }

    fn revocations(&self) -> Result<Vec<(HostId, i64)>, StoreError> {
        let mut out = Vec::new();
        for item in self.revoked.iter() {
            let (k, v) = item.map_err(io("scan revocations"))?;
            let Ok(host) = HostId::new(&String::from_utf8_lossy(&k)) else { continue };
            let at = v.as_ref().try_into().map_or(0, i64::from_be_bytes);
            out.push((host, at));
        }
        Ok(out)
    }
}

impl ReportStore for SledStore {
    fn put_doc(&self, key: &str, json: &[u8]) -> Result<(), StoreError> {
        self.analytics.insert(key, json).map_err(io("write analytics document"))?;
        self.analytics.flush().map(drop).map_err(io("flush"))
    }

    fn doc(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.analytics.get(key).map_err(io("read analytics document"))?.map(|v| v.to_vec()))
    }

    fn update_doc(&self, key: &str, update: &mut DocUpdate<'_>) -> Result<(), StoreError> {
        loop {
            let current = self.analytics.get(key).map_err(io("read analytics document"))?;
            let next = update(current.as_deref())?;
            let swapped = self
                .analytics
                .compare_and_swap(key, current, Some(next))
                .map_err(io("update analytics document"))?;
            if swapped.is_ok() {
                return self.analytics.flush().map(drop).map_err(io("flush"));
            }
            // Someone else wrote in between: read their value and apply `update` again.
        }
    }

    fn docs(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.analytics.scan_prefix(prefix) {
            let (k, v) = item.map_err(io("scan analytics documents"))?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    fn delete_docs(&self, prefix: &str) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.analytics.scan_prefix(prefix).keys() {
            batch.remove(k.map_err(io("scan analytics documents"))?);
            n += 1;
        }
        self.analytics.apply_batch(batch).map_err(io("delete analytics documents"))?;
        self.analytics.flush().map_err(io("flush"))?;
        Ok(n)
    }

    fn put_history(
        &self,
        kind: &str,
        unix_ms: i64,
        id: &str,
        json: &[u8],
    ) -> Result<(), StoreError> {
        self.history.insert(keys::history(kind, unix_ms, id), json).map_err(io("write history"))?;
        self.history.flush().map(drop).map_err(io("flush"))
    }

    fn history(&self, kind: &str, since_ms: i64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let range = keys::bucket(kind, since_ms)..keys::bucket(kind, i64::MAX);
        let mut out = Vec::new();
        for item in self.history.range(range).rev().take(limit) {
            let (_, v) = item.map_err(io("scan history"))?;
            out.push(v.to_vec());
        }
        Ok(out)
    }
}

impl SledStore {
    fn scan_rollups(
        &self,
        tree: &sled::Tree,
        host: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(i64, Rollup)>, StoreError> {
        let mut out = Vec::new();
        if since_ms >= until_ms {
            return Ok(out);
        }
        for item in tree.range(keys::bucket(host, since_ms)..keys::bucket(host, until_ms)) {
            let (k, v) = item.map_err(io("scan rollups"))?;
            let Some((_, start)) = keys::split(&k) else { continue };
            let Some(rollup) = decode_or_skip("rollup", &k, postcard::from_bytes::<Rollup>(&v))
            else {
                continue;
            };
            out.push((start, rollup));
        }
        Ok(out)
    }
}

/// Host records start with this magic byte and then a version byte, then postcard. Records
/// written before versioning are bare postcard; they are read as version 0.
const HOST_RECORD_MAGIC: u8 = 0xF1;
/// The host record layout written now.
const HOST_RECORD_VERSION: u8 = 1;

fn encode_host(host: &str, rec: &HostRecord) -> Result<Vec<u8>, StoreError> {
    let mut bytes = vec![HOST_RECORD_MAGIC, HOST_RECORD_VERSION];
    postcard::to_io(rec, &mut bytes)
        .map_err(|e| StoreError::Corrupt { what: format!("host {host}"), reason: e.to_string() })?;
    Ok(bytes)
}

fn decode_host(host: impl std::fmt::Display, bytes: &[u8]) -> Result<HostRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { what: format!("host {host}"), reason };
    match bytes {
        [HOST_RECORD_MAGIC, HOST_RECORD_VERSION, rest @ ..] => {
            // A legacy record whose first string is 241+ bytes long also starts with the magic
            // byte; fall back to the legacy layout before calling it corrupt.
            postcard::from_bytes(rest)
                .or_else(|e| postcard::from_bytes(bytes).map_err(|_| e))
                .map_err(|e| corrupt(e.to_string()))
        }
        [HOST_RECORD_MAGIC, v, ..] if *v > HOST_RECORD_VERSION => postcard::from_bytes(bytes)
            .map_err(|_| {
                corrupt(format!(
                    "written by a newer aggregator (host record version {v}, this one reads up \
                     to {HOST_RECORD_VERSION}); upgrade this aggregator"
                ))
            }),
        _ => postcard::from_bytes(bytes).map_err(|e| corrupt(e.to_string())),
    }
}

fn merge_into(rollup: &mut Rollup, name: String, st: Stats) {
    rollup.entry(name).and_modify(|e| e.merge(&st)).or_insert(st);
}

fn io(op: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |source| StoreError::Io { op, source }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use common::proto::HostSample;

    /// sled releases its file lock from a background thread shortly after the handle drops.
    pub(crate) fn reopen(path: &Path) -> SledStore {
        for _ in 0..100 {
            if let Ok(s) = SledStore::open(path) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        SledStore::open(path).unwrap()
    }

    fn host(n: &str) -> HostId {
        HostId::new(n).unwrap()
    }

    fn batch(h: &str, seq: u64, first_index: u64, times: &[i64]) -> IncomingBatch {
        let samples = times
            .iter()
            .enumerate()
            .map(|(i, t)| Sample {
                unix_ms: *t,
                sample_index: first_index + i as u64,
                host: Some(HostSample {
                    cpu_util_pct: (i as f32 + 1.0) * 10.0,
                    interval_ms: 1000,
                    ..HostSample::default()
                }),
                ..Sample::default()
            })
            .collect();
        IncomingBatch {
            host: host(h),
            batch: TelemetryBatch { seq, samples, ..TelemetryBatch::default() },
            received_ms: times.last().copied().unwrap_or(0),
        }
    }

    fn hello(epoch: u64) -> Hello {
        Hello { spool_epoch: epoch, agent_version: "t".into(), ..Hello::default() }
    }

    #[test]
    fn host_records_are_versioned_and_one_bad_record_is_skipped() {
        // Regression (issue 8, hole 11): one undecodable host record failed `hosts()` for all.
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.record_hello(&host("a"), &hello(1), 0, 5).unwrap();
        let raw = store.hosts.get("a").unwrap().unwrap();
        assert_eq!(raw[..2], [HOST_RECORD_MAGIC, HOST_RECORD_VERSION]);
        // A record written before versioning still reads.
        let legacy =
            HostRecord { agent_version: "0.1.0".into(), watermark: 9, ..HostRecord::default() };
        store.hosts.insert("b", postcard::to_allocvec(&legacy).unwrap()).unwrap();
        store.hosts.insert("c", &[0xff, 0xff, 0xff][..]).unwrap();
        store.hosts.insert("d", &[HOST_RECORD_MAGIC, 9, 1][..]).unwrap();
        let hosts = store.hosts().unwrap();
        let names: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(hosts[1].1, legacy);
        let err = store.host(&host("d")).unwrap_err().to_string();
        assert!(err.contains("newer aggregator"), "{err}");
        assert!(store.host(&host("c")).is_err(), "a direct read still reports the corruption");
    }

    #[test]
    fn undecodable_samples_and_rollups_are_skipped_counted_and_the_rest_served() {
        // Reads used to drop these without a trace; now each skip is counted for /metrics.
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.commit(&[batch("a", 1, 1, &[60_000, 61_000])]).unwrap();
        store.roll_up(10 * 60_000).unwrap();
        let before = skipped_records();
        store.samples.insert(keys::sample("a", 62_000, 99), &[0xff, 0xff, 0xff][..]).unwrap();
        store.minutes.insert(keys::bucket("a", 120_000), &[0xff; 3][..]).unwrap();
        let raw = store.series(&host("a"), "cpu_util_pct", 0, Resolution::Raw).unwrap();
        assert_eq!(raw.len(), 2, "the good samples are served: {raw:?}");
        let minutes = store.series(&host("a"), "cpu_util_pct", 0, Resolution::Minute).unwrap();
        assert_eq!(minutes.len(), 1, "the good minute is served: {minutes:?}");
        assert!(skipped_records() >= before + 2, "both skips are counted");
    }

    proptest::proptest! {
        /// Stored-record decoding never panics, whatever bytes are on disk.
        #[test]
        fn stored_records_decode_or_err_on_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode_host("h", &bytes);
            let mut magic = vec![HOST_RECORD_MAGIC, HOST_RECORD_VERSION];
            magic.extend_from_slice(&bytes);
            let _ = decode_host("h", &magic);
            let _ = postcard::from_bytes::<Rollup>(&bytes);
            let _ = Sample::decode(bytes.as_slice());
            let _ = crate::scheduler::decode_api_budgets(Some(&bytes));
            let _ = serde_json::from_slice::<crate::analytics::alerts::AlertBook>(&bytes);
            let _ = serde_json::from_slice::<crate::scheduler::AnomalyEvent>(&bytes);
        }
    }

    #[test]
    fn update_doc_loses_no_concurrent_update() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        store
                            .update_doc("list", &mut |cur| {
                                let mut v: Vec<u32> =
                                    cur.map_or(Ok(Vec::new()), serde_json::from_slice).unwrap();
                                v.push(t * 100 + i);
                                Ok(serde_json::to_vec(&v).unwrap())
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let v: Vec<u32> = serde_json::from_slice(&store.doc("list").unwrap().unwrap()).unwrap();
        assert_eq!(v.len(), 200);
        // A failing update leaves the document alone.
        let err = store.update_doc("list", &mut |_| {
            Err(StoreError::Corrupt { what: "x".into(), reason: "no".into() })
        });
        assert!(err.is_err());
        assert_eq!(store.doc("list").unwrap().unwrap(), serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn batches_are_stored_once_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.record_hello(&host("a"), &hello(7), 0, 0).unwrap();
        let b1 = batch("a", 1, 1, &[1000, 2000]);
        let b2 = batch("a", 2, 3, &[3000]);
        let b3 = batch("a", 3, 4, &[4000, 5000]);
        // Out of order, with retries.
        let out = store.commit(&[b3.clone(), b1.clone(), b3.clone()]).unwrap();
        assert_eq!(out, [CommitOutcome::Stored, CommitOutcome::Stored, CommitOutcome::Duplicate]);
        assert_eq!(store.host(&host("a")).unwrap().unwrap().watermark, 1);
        let out = store.commit(&[b2, b1]).unwrap();
        assert_eq!(out, [CommitOutcome::Stored, CommitOutcome::Duplicate]);
        let rec = store.host(&host("a")).unwrap().unwrap();
        assert_eq!((rec.watermark, rec.last_seq, rec.samples_total), (3, 3, 5));
        assert_eq!(rec.seen_above, 0, "the out-of-order seq was folded into the watermark");
        assert_eq!(store.seen.len(), 0);
        assert_eq!(store.count_samples(&host("a")).unwrap(), 5);
        assert_eq!(store.latest_sample(&host("a")).unwrap().unwrap().unix_ms, 5000);
        // Survives a reopen.
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.commit(&[b3]).unwrap(), [CommitOutcome::Duplicate]);
    }

    fn with_low(mut b: IncomingBatch, low: u64) -> IncomingBatch {
        b.batch.spool_low_seq = low;
        b
    }

    #[test]
    fn dropped_seqs_do_not_pin_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = host("a");
        store.record_hello(&a, &hello(7), 0, 0).unwrap();
        store.commit(&[batch("a", 1, 1, &[1000])]).unwrap();
        // The agent's spool dropped seqs 2..=4 (full while the aggregator was away).
        for seq in 5..=9 {
            store.commit(&[batch("a", seq, seq, &[seq as i64 * 1000])]).unwrap();
        }
        assert_eq!(store.seen_count(&a).unwrap(), 5, "without the low seq every batch waits");
        // The agent reconnects and says its spool now starts at 10: 2..=4 will never come.
        let mut h = hello(7);
        h.spool_low_seq = 10;
        let rec = store.record_hello(&a, &h, 0, 0).unwrap();
        assert_eq!((rec.watermark, rec.seen_above), (9, 0));
        assert_eq!(store.seen_count(&a).unwrap(), 0, "seen is empty again");
        // Batches carry it too: 13 arrives first, saying 11 and 12 were dropped meanwhile.
        store.commit(&[with_low(batch("a", 13, 13, &[13_000]), 13)]).unwrap();
        let rec = store.host(&a).unwrap().unwrap();
        assert_eq!((rec.watermark, rec.seen_above), (13, 0));
        assert_eq!(store.seen_count(&a).unwrap(), 0);
        // A gap the agent still holds keeps waiting, and a low seq above the batch is ignored.
        store.commit(&[with_low(batch("a", 15, 15, &[15_000]), 99)]).unwrap();
        assert_eq!(store.seen_count(&a).unwrap(), 1);
        assert_eq!(
            store.commit(&[with_low(batch("a", 14, 14, &[14_000]), 14)]).unwrap(),
            [CommitOutcome::Stored]
        );
        let rec = store.host(&a).unwrap().unwrap();
        assert_eq!((rec.watermark, rec.seen_above, rec.samples_total), (15, 0, 9));
        assert_eq!(store.seen.len(), 0);
    }

    #[test]
    fn future_samples_are_refused_counted_and_health_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = host("a");
        store.record_hello(&a, &hello(7), 0, 0).unwrap();
        let now = 1_700_000_000_000;
        let mut b = batch("a", 1, 1, &[now - 1000, now + MAX_FUTURE_MS, now + 365 * 86_400_000]);
        b.received_ms = now;
        b.batch.clock_offset_ms = Some(-1500);
        b.batch.telemetry_errors = 2;
        b.batch.last_telemetry_error = "disk full".into();
        b.batch.last_telemetry_error_unix_ms = now - 5000;
        store.commit(&[b]).unwrap();
        assert_eq!(store.count_samples(&a).unwrap(), 2, "the sample a year ahead is refused");
        assert_eq!(store.latest_sample(&a).unwrap().unwrap().unix_ms, now + MAX_FUTURE_MS);
        let health = store.host_health(&a).unwrap();
        assert_eq!(health.future_samples_refused, 1);
        assert_eq!(health.clock_offset_ms, Some(-1500));
        assert_eq!(
            (health.telemetry_errors, health.last_telemetry_error.as_str()),
            (2, "disk full")
        );
        assert_eq!(store.host(&a).unwrap().unwrap().samples_total, 2);
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.host_health(&a).unwrap().future_samples_refused, 1, "persisted");
        // Future samples stored before this check existed are removed by retention.
        store.samples.insert(keys::sample("a", now + 86_400_000, 9), Vec::<u8>::new()).unwrap();
        let keep = Retention { raw_ms: i64::MAX / 4, minute_ms: 0, hour_ms: 0 };
        store.enforce_retention(now, keep).unwrap();
        assert_eq!(store.count_samples(&a).unwrap(), 2);
    }

    #[test]
    fn new_spool_epoch_restarts_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.record_hello(&host("a"), &hello(1), 0, 0).unwrap();
        store.commit(&[batch("a", 1, 1, &[1000])]).unwrap();
        store.record_hello(&host("a"), &hello(2), 0, 0).unwrap();
        assert_eq!(store.commit(&[batch("a", 1, 1, &[9000])]).unwrap(), [CommitOutcome::Stored]);
        assert_eq!(store.host(&host("a")).unwrap().unwrap().samples_total, 2);
    }

    #[test]
    fn rollups_match_hand_computed_values_and_absorb_late_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        // Minute 0: cpu 10, 20; minute 1: cpu 10.
        store.commit(&[batch("a", 1, 1, &[1000, 2000]), batch("a", 2, 3, &[61_000])]).unwrap();
        assert_eq!(store.roll_up(i64::MAX).unwrap(), RollupReport { minutes: 2, hours: 1 });
        let pts = store.series(&host("a"), "cpu_util_pct", 0, Resolution::Minute).unwrap();
        assert_eq!(pts.len(), 2);
        assert_eq!((pts[0].value, pts[0].min, pts[0].max, pts[0].count), (15.0, 10.0, 20.0, 2));
        // A late sample for minute 0 (cpu 10) is folded in on the next pass.
        store.commit(&[batch("a", 3, 4, &[3000])]).unwrap();
        assert_eq!(store.roll_up(i64::MAX).unwrap(), RollupReport { minutes: 1, hours: 1 });
        let pts = store.series(&host("a"), "cpu_util_pct", 0, Resolution::Minute).unwrap();
        assert_eq!(pts[0].count, 3);
        assert!((pts[0].value - 40.0 / 3.0).abs() < 1e-9);
        let hour = store.series(&host("a"), "cpu_util_pct", 0, Resolution::Hour).unwrap();
        assert_eq!(hour.len(), 1);
        assert_eq!((hour[0].count, hour[0].sum_check()), (4, 50.0));
        let raw = store.series(&host("a"), "cpu_util_pct", 2000, Resolution::Raw).unwrap();
        assert_eq!(raw.iter().map(|p| p.unix_ms).collect::<Vec<_>>(), [2000, 3000, 61_000]);
        assert_eq!(store.roll_up(i64::MAX).unwrap(), RollupReport::default(), "nothing left dirty");
    }

    /// Samples of model `m` at `times`, each with one request of latency `t % 997` ms.
    fn model_batch(h: &str, seq: u64, times: &[i64]) -> IncomingBatch {
        let samples = times
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut latency = common::histogram::LogHistogram::new();
                latency.record(u64::try_from(t.rem_euclid(997) * 1000 + 1).unwrap());
                Sample {
                    unix_ms: *t,
                    sample_index: i as u64,
                    models: vec![common::proto::ModelSample {
                        model: "m".into(),
                        interval_ms: 1000,
                        requests: 1,
                        successes: 1,
                        latency_us: Some(latency.to_proto()),
                        ..common::proto::ModelSample::default()
                    }],
                    ..Sample::default()
                }
            })
            .collect();
        IncomingBatch {
            host: host(h),
            batch: TelemetryBatch { seq, samples, ..TelemetryBatch::default() },
            received_ms: times.iter().copied().max().unwrap_or(0),
        }
    }

    /// The model totals of the raw samples alone: what every window must equal.
    fn raw_totals(store: &SledStore, from: i64, to: i64) -> ModelRollup {
        let mut out = ModelRollup::new();
        for s in store.samples(&host("a"), from, to).unwrap() {
            add_models(&mut out, &s);
        }
        out
    }

    #[test]
    fn model_totals_from_rollups_equal_the_raw_samples_and_outlive_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        // Three hours, a sample every 7 minutes and a few seconds.
        let times: Vec<i64> = (0..26).map(|i| i * 7 * MINUTE_MS + 1_000 * i).collect();
        store.commit(&[model_batch("a", 1, &times)]).unwrap();
        // Hours 0 and 1 rolled up; hour 2 only in minutes and raw samples.
        store.roll_up(2 * HOUR_MS + 30 * MINUTE_MS).unwrap();
        let windows = [
            (0, 3 * HOUR_MS),
            (0, HOUR_MS),
            (5 * MINUTE_MS + 500, 2 * HOUR_MS + 17 * MINUTE_MS),
            (HOUR_MS, 2 * HOUR_MS + 45 * MINUTE_MS),
            (59 * MINUTE_MS, 61 * MINUTE_MS),
        ];
        for (from, to) in windows {
            assert_eq!(
                store.model_totals(&host("a"), from, to).unwrap(),
                raw_totals(&store, from, to),
                "{from}..{to}"
            );
        }
        // Late data in hour 0, not rolled up yet: read from the finer levels, still exact.
        store.commit(&[model_batch("a", 2, &[30 * MINUTE_MS + 5])]).unwrap();
        let all = store.model_totals(&host("a"), 0, 3 * HOUR_MS).unwrap();
        assert_eq!(all, raw_totals(&store, 0, 3 * HOUR_MS));
        assert_eq!(all["m"].totals.requests, 27);
        store.roll_up(4 * HOUR_MS).unwrap();
        assert_eq!(store.model_totals(&host("a"), 0, 3 * HOUR_MS).unwrap(), all);
        // Raw samples and minutes expire; whole hours stay exact from the hour rollups.
        let r = Retention { raw_ms: HOUR_MS, minute_ms: HOUR_MS, hour_ms: 100 * HOUR_MS };
        store.enforce_retention(10 * HOUR_MS, r).unwrap();
        assert!(store.samples(&host("a"), 0, 3 * HOUR_MS).unwrap().is_empty());
        let kept = store.model_totals(&host("a"), 0, 3 * HOUR_MS).unwrap();
        assert_eq!(kept, all);
        assert_eq!(kept["m"].totals.latency_us.count(), 27);
    }

    #[test]
    fn hour_changes_name_the_hours_rewritten_since_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let start = store.hour_changes(None).unwrap();
        assert_eq!(start.changed, None, "no cursor: read everything");
        store.commit(&[batch("a", 1, 1, &[1000]), batch("b", 1, 1, &[HOUR_MS + 1000])]).unwrap();
        store.roll_up(i64::MAX).unwrap();
        let first = store.hour_changes(Some(start.cursor)).unwrap();
        let mut changed = first.changed.clone().unwrap();
        changed.sort();
        assert_eq!(changed, [("a".to_owned(), 0), ("b".to_owned(), HOUR_MS)]);
        // Nothing new: nothing changed. Late data for an old hour: that hour again.
        assert_eq!(store.hour_changes(Some(first.cursor)).unwrap().changed, Some(vec![]));
        store.commit(&[batch("a", 2, 2, &[2000])]).unwrap();
        store.roll_up(i64::MAX).unwrap();
        let late = store.hour_changes(Some(first.cursor)).unwrap();
        assert_eq!(late.changed, Some(vec![("a".to_owned(), 0)]));
        // A cursor of another opening of the store is not trusted.
        drop(store);
        let reopened = reopen(dir.path());
        assert_eq!(reopened.hour_changes(Some(late.cursor)).unwrap().changed, None);
    }

    #[test]
    fn the_hour_log_forgets_past_its_capacity_and_then_says_so() {
        let mut log = HourLog::new();
        let cursor = log.since(None).cursor;
        let writes: Vec<(String, i64)> =
            (0..HOUR_LOG_CAPACITY as i64 + 1).map(|i| ("h".to_owned(), i)).collect();
        log.record(&writes);
        assert_eq!(log.since(Some(cursor)).changed, None);
        let now = log.since(None).cursor;
        log.record(&writes[..2]);
        assert_eq!(log.since(Some(now)).changed.map(|c| c.len()), Some(2));
    }

    #[test]
    fn open_buckets_wait_for_their_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.commit(&[batch("a", 1, 1, &[1000])]).unwrap();
        // Minute 0 ends at 60 s; it is rolled up only from 120 s on.
        assert_eq!(store.roll_up(119_999).unwrap(), RollupReport::default());
        assert_eq!(store.roll_up(120_000).unwrap(), RollupReport { minutes: 1, hours: 0 });
        // Its hour closes at 1 h and is rolled up after the grace.
        assert_eq!(
            store.roll_up(HOUR_MS + ROLLUP_GRACE_MS).unwrap(),
            RollupReport { minutes: 0, hours: 1 }
        );
    }

    trait SumCheck {
        fn sum_check(&self) -> f64;
    }
    impl SumCheck for MetricPoint {
        fn sum_check(&self) -> f64 {
            self.value * self.count as f64
        }
    }

    #[test]
    fn retention_deletes_only_old_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.record_hello(&host("a"), &hello(1), 0, 0).unwrap();
        store.commit(&[batch("a", 1, 1, &[1000, HOUR_MS * 3])]).unwrap();
        store.roll_up(i64::MAX).unwrap();
        let r = Retention { raw_ms: HOUR_MS, minute_ms: HOUR_MS * 2, hour_ms: HOUR_MS * 10 };
        let deleted = store.enforce_retention(HOUR_MS * 3 + 1, r).unwrap();
        assert_eq!(deleted, 2, "one raw sample and one minute rollup");
        assert_eq!(store.count_samples(&host("a")).unwrap(), 1);
        assert_eq!(store.series(&host("a"), "cpu_util_pct", 0, Resolution::Hour).unwrap().len(), 2);
    }

    #[test]
    fn revocations_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.revoke(&host("x"), 42).unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.revocations().unwrap(), vec![(host("x"), 42)]);
        assert!(store.unrevoke(&host("x")).unwrap());
        assert!(store.revocations().unwrap().is_empty());
    }

    #[test]
    fn analytics_documents_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.put_doc("forecast/a", b"1").unwrap();
        store.put_doc("forecast/b", b"2").unwrap();
        store.put_doc("report", b"3").unwrap();
        assert_eq!(store.docs("forecast/").unwrap().len(), 2);
        assert_eq!(store.delete_docs("forecast/").unwrap(), 2);
        assert_eq!(store.doc("report").unwrap().as_deref(), Some(&b"3"[..]));
        for (t, id) in [(10, "x"), (20, "y"), (20, "y"), (30, "z")] {
            store.put_history("alert", t, id, id.as_bytes()).unwrap();
        }
        store.put_history("anomaly", 25, "q", b"q").unwrap();
        let h = store.history("alert", 15, 10).unwrap();
        assert_eq!(h, vec![b"z".to_vec(), b"y".to_vec()], "newest first, rewrites deduplicated");
        assert_eq!(store.history("alert", 0, 1).unwrap().len(), 1);
    }

    #[test]
    fn whole_rollups_and_raw_samples_by_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.commit(&[batch("a", 1, 1, &[1000, HOUR_MS + 1000, 2 * HOUR_MS])]).unwrap();
        store.roll_up(i64::MAX).unwrap();
        let r = store.rollups(&host("a"), 0, 2 * HOUR_MS, Resolution::Hour).unwrap();
        assert_eq!(r.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [0, HOUR_MS]);
        assert_eq!(r[0].1["cpu_util_pct"].count, 1);
        assert_eq!(store.samples(&host("a"), 1000, 2 * HOUR_MS).unwrap().len(), 2);
    }

    #[test]
    fn time_keys_sort_like_times() {
        let ts = [i64::MIN, -5, 0, 1, 1_700_000_000_000, i64::MAX];
        for w in ts.windows(2) {
            assert!(keys::time(w[0]) < keys::time(w[1]));
            assert_eq!(keys::time_from(&keys::time(w[0])), w[0]);
        }
    }
}
