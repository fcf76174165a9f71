//! The control state: per-host desired state, the durable directive outbox, the decisions that
//! made the directives, and the scalers' own state. The [`ControlStore`] interface and its sled
//! implementation.
//!
//! Invariants:
//! - A decision, its directives, their outbox entries and the desired-state changes they imply
//!   are written in ONE sled transaction and flushed before [`ControlStore::record_decision`]
//!   returns: after a crash either all of a decision is there or none of it.
//! - A directive is in the outbox (`control_outbox`, key `host \0 id`) exactly while it has no
//!   final answer; answering it removes the entry in the same transaction that records the
//!   answer, so a restart resends exactly the unanswered ones, oldest first.
//! - Directive ids are `EPOCH-COUNTER` (8 + 12 hex digits): the epoch is random per store, so a
//!   wiped and recreated store never reuses an id an agent remembers; within a store they sort
//!   in creation order.
//! - Records are typed (serde structs encoded as JSON so fields can be added later); a record
//!   that does not decode is skipped by lists and counted, never fatal.

use std::collections::BTreeMap;

use common::directive::{BatchingChange, DirectiveBody};
use common::ids::HostId;
use serde::{Deserialize, Serialize};
use sled::Transactional as _;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::store::{StoreError, decode_or_skip};

/// Where a directive is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectiveState {
    /// Waiting for its host to be connected.
    Pending,
    /// Sent at least once, no answer yet (it is sent again after a reconnect).
    Sent,
    /// The agent applied it.
    Applied,
    /// The agent refused it and changed nothing.
    Rejected,
    /// The agent does not know the kind.
    Unsupported,
    /// Its deadline passed before it was applied.
    Expired,
}

impl DirectiveState {
    /// Whether this is a final answer (the directive has left the outbox).
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Sent)
    }

    /// The lowercase name used by the API and CLI.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Applied => "applied",
            Self::Rejected => "rejected",
            Self::Unsupported => "unsupported",
            Self::Expired => "expired",
        }
    }

    /// Parses [`Self::name`].
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Pending, Self::Sent, Self::Applied, Self::Rejected, Self::Unsupported, Self::Expired]
            .into_iter()
            .find(|s| s.name() == text)
    }
}

/// One directive and its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectiveRecord {
    /// Unique id (see the module invariants).
    pub id: String,
    /// The host it is for.
    pub host: String,
    /// What it asks.
    pub body: DirectiveBody,
    /// The decision that made it.
    pub decision: String,
    /// Created, Unix ms.
    pub created_ms: i64,
    /// Not to be applied after this, Unix ms.
    pub not_after_ms: i64,
    /// Where it is now.
    pub state: DirectiveState,
    /// Times it was sent.
    pub attempts: u32,
    /// First sent, Unix ms.
    pub first_sent_ms: Option<i64>,
    /// Answered (or expired unsent), Unix ms.
    pub answered_ms: Option<i64>,
    /// The agent's message: what changed, or why not.
    pub message: String,
}

/// A directive to create with a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDirective {
    /// The host.
    pub host: HostId,
    /// What to do.
    pub body: DirectiveBody,
    /// Deadline, Unix ms.
    pub not_after_ms: i64,
}

/// Why something was decided: its inputs, the rule that fired and the directives it made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Unique id (same scheme as directives).
    pub id: String,
    /// Decided at, Unix ms.
    pub at_ms: i64,
    /// Who decided: `policy:NAME`, `operator`, `budget:NAME`.
    pub source: String,
    /// The model it is about, if any.
    pub model: Option<String>,
    /// The rule that fired (machine-stable, e.g. `reactive.scale_up`).
    pub rule: String,
    /// A sentence with the numbers.
    pub reason: String,
    /// The inputs it saw, as JSON (their shape depends on the source).
    pub inputs: serde_json::Value,
    /// Whether it acted (false: recorded only, e.g. forecast-only or within tolerance).
    pub acted: bool,
    /// Ids of the directives it made.
    pub directives: Vec<String>,
    /// What an actuator outside the fleet answered (the fleet-size actuator), when it was
    /// asked: absent until it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<serde_json::Value>,
}

/// A decision to record (ids are assigned by the store).
#[derive(Debug, Clone, PartialEq)]
pub struct NewDecision {
    /// Decided at, Unix ms.
    pub at_ms: i64,
    /// Who decided.
    pub source: String,
    /// The model, if any.
    pub model: Option<String>,
    /// The rule that fired.
    pub rule: String,
    /// A sentence with the numbers.
    pub reason: String,
    /// The inputs, as JSON.
    pub inputs: serde_json::Value,
    /// Whether it acts.
    pub acted: bool,
}

/// What the aggregator wants one host to run, revision by revision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Bumped by every directive that changes it.
    pub revision: u64,
    /// Last changed, Unix ms.
    pub updated_ms: i64,
    /// Per model.
    pub models: BTreeMap<String, DesiredModel>,
    /// Telemetry sample interval, when set.
    pub telemetry_interval_ms: Option<u64>,
}

/// What one model should be on one host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredModel {
    /// Loaded (true) or unloaded (false); `None` when never directed.
    pub loaded: Option<bool>,
    /// Instances, when directed.
    pub instances: Option<u32>,
    /// Batching settings directed so far (fields merge).
    pub batching: BatchingChange,
    /// Draining.
    pub draining: bool,
}

impl DesiredState {
    /// The directives that bring an agent that restarted with its own configuration back to
    /// this state: per model, `unload` when it is to be unloaded, else its instance count and
    /// batching settings; and the telemetry interval. Not `drain` (an agent restarted after a
    /// drain is meant to serve again) nor `load` (a restarted agent loads what is on its disk).
    pub fn resync(&self) -> Vec<DirectiveBody> {
        let mut out = Vec::new();
        for (model, m) in &self.models {
            if m.loaded == Some(false) {
                out.push(DirectiveBody::Unload { model: model.clone() });
                continue;
            }
            if let Some(instances) = m.instances {
                out.push(DirectiveBody::SetInstances {
                    model: model.clone(),
                    version: None,
                    instances,
                });
            }
            if m.batching != BatchingChange::default() {
                out.push(DirectiveBody::SetBatching {
                    model: model.clone(),
                    version: None,
                    batching: m.batching.clone(),
                });
            }
        }
        if let Some(interval_ms) = self.telemetry_interval_ms {
            out.push(DirectiveBody::SetTelemetryInterval { interval_ms });
        }
        out
    }

    /// Folds a directive's intent in; returns whether anything changed.
    pub fn apply(&mut self, body: &DirectiveBody, now_ms: i64) -> bool {
        let before = self.clone();
        match body {
            // Requests, not state: nothing to restore after a reconnect.
            DirectiveBody::Ping
            | DirectiveBody::Optimize { .. }
            | DirectiveBody::Optimization { .. }
            | DirectiveBody::OptimizeRollback { .. } => {}
            DirectiveBody::SetInstances { model, instances, .. } => {
                self.models.entry(model.clone()).or_default().instances = Some(*instances);
            }
            DirectiveBody::SetBatching { model, batching, .. } => {
                let b = &mut self.models.entry(model.clone()).or_default().batching;
                if batching.max_batch_size.is_some() {
                    b.max_batch_size = batching.max_batch_size;
                }
                if batching.max_queue_delay_us.is_some() {
                    b.max_queue_delay_us = batching.max_queue_delay_us;
                }
                if batching.adaptive.is_some() {
                    b.adaptive = batching.adaptive;
                }
                if batching.min_batch_size.is_some() {
                    b.min_batch_size = batching.min_batch_size;
                }
                if batching.latency_slo_ms.is_some() {
                    b.latency_slo_ms = batching.latency_slo_ms;
                }
            }
            DirectiveBody::Load { model } => {
                let m = self.models.entry(model.clone()).or_default();
                m.loaded = Some(true);
                m.draining = false;
            }
            DirectiveBody::Unload { model } => {
                self.models.entry(model.clone()).or_default().loaded = Some(false);
            }
            DirectiveBody::Drain { model } => {
                self.models.entry(model.clone()).or_default().draining = true;
            }
            DirectiveBody::SetTelemetryInterval { interval_ms } => {
                self.telemetry_interval_ms = Some(*interval_ms);
            }
        }
        let changed = *self != before;
        if changed {
            self.revision += 1;
            self.updated_ms = now_ms;
        }
        changed
    }
}

/// Which directives to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectiveFilter {
    /// Only this host's.
    pub host: Option<HostId>,
    /// Only in this state. `Pending` matches `Sent` too (both are unanswered).
    pub state: Option<DirectiveState>,
    /// Only those made by this decision.
    pub decision: Option<String>,
}

impl DirectiveFilter {
    fn matches(&self, d: &DirectiveRecord) -> bool {
        self.host.as_ref().is_none_or(|h| h.as_str() == d.host)
            && self.decision.as_ref().is_none_or(|id| *id == d.decision)
            && self.state.is_none_or(|s| match s {
                DirectiveState::Pending => !d.state.is_final(),
                other => other == d.state,
            })
    }
}

/// What the control loop may ask of storage. Every method is blocking.
pub trait ControlStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records a decision with its directives (each folded into its host's desired state and
    /// put in the outbox), in one transaction, durably. Returns the stored records.
    fn record_decision(
        &self,
        decision: NewDecision,
        directives: Vec<NewDirective>,
    ) -> Result<(DecisionRecord, Vec<DirectiveRecord>), StoreError>;
    /// A host's unanswered directives, oldest first.
    fn outbox(&self, host: &HostId) -> Result<Vec<DirectiveRecord>, StoreError>;
    /// Hosts with unanswered directives.
    fn outbox_hosts(&self) -> Result<Vec<HostId>, StoreError>;
    /// Notes one more send of an unanswered directive. Not flushed: a lost note only
    /// undercounts attempts.
    fn mark_sent(&self, id: &str, now_ms: i64) -> Result<(), StoreError>;
    /// Records a final answer and takes the directive out of the outbox (not flushed: see the
    /// delivery invariants). A directive already answered keeps its first answer; returns the
    /// record as stored.
    fn answer(
        &self,
        id: &str,
        state: DirectiveState,
        message: &str,
        now_ms: i64,
    ) -> Result<Option<DirectiveRecord>, StoreError>;
    /// One directive.
    fn directive(&self, id: &str) -> Result<Option<DirectiveRecord>, StoreError>;
    /// Directives matching `filter`, newest first, at most `limit`.
    fn directives(
        &self,
        filter: &DirectiveFilter,
        limit: usize,
    ) -> Result<Vec<DirectiveRecord>, StoreError>;
    /// Decisions (about `model`, when given), newest first, at most `limit`.
    fn decisions(
        &self,
        model: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DecisionRecord>, StoreError>;
    /// Records what an outside actuator answered for decision `id`, durably; the first
    /// outcome stands. Returns false when there is no such decision (pruned meanwhile).
    fn record_outcome(&self, id: &str, outcome: serde_json::Value) -> Result<bool, StoreError>;
    /// A host's desired state.
    fn desired(&self, host: &HostId) -> Result<Option<DesiredState>, StoreError>;
    /// The run id `host`'s agent last said Hello with (`None` before the first).
    fn agent_run(&self, host: &HostId) -> Result<Option<u64>, StoreError>;
    /// Records the run id `host`'s agent said Hello with. Not flushed: a record lost in a crash
    /// only means one more resync of that agent.
    fn set_agent_run(&self, host: &HostId, run_id: u64) -> Result<(), StoreError>;
    /// Stores a scaler's own state (opaque JSON) under `key`.
    fn put_scaler_state(&self, key: &str, json: &[u8]) -> Result<(), StoreError>;
    /// A scaler's stored state.
    fn scaler_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Answers `expired` every unanswered directive whose deadline is before `before_ms` (its
    /// host never came back for it, so nothing else would take it out of the outbox), then
    /// deletes answered directives and decisions older than `before_ms`; returns how many
    /// records it expired or deleted.
    fn prune(&self, before_ms: i64) -> Result<u64, StoreError>;
    /// Stores an optimization record (creating or replacing the one with its host, model and
    /// directive), then drops that host's and model's oldest beyond [`KEEP_OPTIMIZATIONS`].
    /// Not flushed: a record lost in a crash is rewritten by the follower, which resumes the
    /// unfinished ones at start.
    fn put_optimization(&self, record: &OptimizationRecord) -> Result<(), StoreError>;
    /// Replaces an optimization record only while the stored one is still `running` (a
    /// compare-and-swap): a record already final (superseded, lost, done) stays as it is.
    /// Returns whether it was replaced.
    fn update_running_optimization(&self, record: &OptimizationRecord) -> Result<bool, StoreError>;
    /// Optimization records (of `host`, and `model`, when given), newest first, at most `limit`.
    fn optimizations(
        &self,
        host: Option<&HostId>,
        model: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OptimizationRecord>, StoreError>;
}

/// Optimization records kept per host and model (older ones are dropped as new ones come).
pub const KEEP_OPTIMIZATIONS: usize = 10;

/// One optimization search on one host, as the aggregator follows it: the `optimize` directive
/// that started it and the agent's last answer about it (progress while it runs, then its
/// report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizationRecord {
    /// The host.
    pub host: String,
    /// The model.
    pub model: String,
    /// Id of the `optimize` directive that started it.
    pub directive: String,
    /// When the agent accepted it, Unix ms.
    pub requested_ms: i64,
    /// When this record last changed, Unix ms.
    pub updated_ms: i64,
    /// `running`, `done`, `failed` (the agent says why) or `lost` (the aggregator could not
    /// follow it to its end; `note` says why).
    pub state: String,
    /// The agent's last answer about it (its `optimization` state: progress, report, error);
    /// null before the first.
    pub agent: serde_json::Value,
    /// What happened to it since: lost, superseded, rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl OptimizationRecord {
    /// Whether the aggregator still follows it.
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

fn optimization_key(host: &str, model: &str, directive: &str) -> Vec<u8> {
    let mut k = outbox_key(host, model);
    k.push(0);
    k.extend_from_slice(directive.as_bytes());
    k
}

/// The sled implementation, on the aggregator's one database.
#[derive(Debug)]
pub struct SledControlStore {
    db: sled::Db,
    directives: sled::Tree,
    outbox: sled::Tree,
    decisions: sled::Tree,
    desired: sled::Tree,
    scalers: sled::Tree,
    /// Host -> the agent run id it last said Hello with (8 bytes, big-endian).
    agent_runs: sled::Tree,
    /// `host \0 model \0 directive id` -> [`OptimizationRecord`].
    optimizations: sled::Tree,
    epoch: u32,
}

const EPOCH_KEY: &[u8] = b"id_epoch";

impl SledControlStore {
    /// Opens the control trees of `db`.
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let tree = |name: &str| db.open_tree(name).map_err(io("open control tree"));
        let meta = tree("control_meta")?;
        let epoch = match meta.get(EPOCH_KEY).map_err(io("read id epoch"))? {
            Some(v) if v.len() == 4 => u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
            _ => {
                let epoch: u32 = rand::random();
                meta.insert(EPOCH_KEY, &epoch.to_be_bytes()).map_err(io("write id epoch"))?;
                db.flush().map_err(io("flush"))?;
                epoch
            }
        };
        Ok(Self {
            directives: tree("control_directives")?,
            outbox: tree("control_outbox")?,
            decisions: tree("control_decisions")?,
            desired: tree("control_desired")?,
            scalers: tree("control_scalers")?,
            agent_runs: tree("control_agent_runs")?,
            optimizations: tree("control_optimizations")?,
            db: db.clone(),
            epoch,
        })
    }

    fn next_id(&self) -> Result<String, StoreError> {
        let n = self.db.generate_id().map_err(io("generate id"))?;
        Ok(format!("{:08x}-{:012x}", self.epoch, n))
    }

    fn read<T: serde::de::DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let Some(v) = tree.get(key).map_err(io("read control record"))? else { return Ok(None) };
        Ok(decode_or_skip(what, key, serde_json::from_slice::<T>(&v)))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(io("flush"))
    }
}

fn outbox_key(host: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(host.len() + 1 + id.len());
    k.extend_from_slice(host.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value)
        .map_err(|e| StoreError::Corrupt { what: what.to_owned(), reason: e.to_string() })
}

fn io(op: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |source| StoreError::Io { op, source }
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(source) => StoreError::Io { op: "control transaction", source },
    }
}

impl ControlStore for SledControlStore {
    fn record_decision(
        &self,
        decision: NewDecision,
        directives: Vec<NewDirective>,
    ) -> Result<(DecisionRecord, Vec<DirectiveRecord>), StoreError> {
        let decision_id = self.next_id()?;
        let mut records = Vec::with_capacity(directives.len());
        for d in directives {
            records.push(DirectiveRecord {
                id: self.next_id()?,
                host: d.host.to_string(),
                body: d.body,
                decision: decision_id.clone(),
                created_ms: decision.at_ms,
                not_after_ms: d.not_after_ms,
                state: DirectiveState::Pending,
                attempts: 0,
                first_sent_ms: None,
                answered_ms: None,
                message: String::new(),
            });
        }
        let record = DecisionRecord {
            id: decision_id,
            at_ms: decision.at_ms,
            source: decision.source,
            model: decision.model,
            rule: decision.rule,
            reason: decision.reason,
            inputs: decision.inputs,
            acted: decision.acted,
            directives: records.iter().map(|d| d.id.clone()).collect(),
            outcome: None,
        };
        let decision_bytes = encode("decision", &record)?;
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = records
            .iter()
            .map(|d| Ok((d.id.clone().into_bytes(), encode("directive", d)?)))
            .collect::<Result<_, StoreError>>()?;
        let at = record.at_ms;
        (&self.decisions, &self.directives, &self.outbox, &self.desired)
            .transaction(|(decisions, directives, outbox, desired)| {
                decisions.insert(record.id.as_bytes(), decision_bytes.as_slice())?;
                let mut states: BTreeMap<&str, DesiredState> = BTreeMap::new();
                for (d, (key, bytes)) in records.iter().zip(&encoded) {
                    directives.insert(key.as_slice(), bytes.as_slice())?;
                    outbox.insert(outbox_key(&d.host, &d.id), &[][..])?;
                    if !states.contains_key(d.host.as_str()) {
                        let current = desired
                            .get(d.host.as_bytes())?
                            .and_then(|v| serde_json::from_slice(&v).ok())
                            .unwrap_or_default();
                        states.insert(&d.host, current);
                    }
                    if let Some(state) = states.get_mut(d.host.as_str()) {
                        state.apply(&d.body, at);
                    }
                }
                for (host, state) in &states {
                    let bytes = encode("desired state", state)
                        .map_err(ConflictableTransactionError::Abort)?;
                    desired.insert(host.as_bytes(), bytes)?;
                }
                Ok(())
            })
            .map_err(tx_error)?;
        self.flush()?;
        Ok((record, records))
    }

    fn outbox(&self, host: &HostId) -> Result<Vec<DirectiveRecord>, StoreError> {
        let mut out = Vec::new();
        for key in self.outbox.scan_prefix(outbox_key(host.as_str(), "")).keys() {
            let key = key.map_err(io("scan outbox"))?;
            let id = &key[host.as_str().len() + 1..];
            match self.read::<DirectiveRecord>(&self.directives, id, "directive")? {
                Some(d) => out.push(d),
                // An entry whose record is gone or unreadable can never be sent: drop it.
                None => {
                    self.outbox.remove(&key).map_err(io("remove outbox entry"))?;
                }
            }
        }
        Ok(out)
    }

    fn outbox_hosts(&self) -> Result<Vec<HostId>, StoreError> {
        let mut hosts: Vec<HostId> = Vec::new();
        for key in self.outbox.iter().keys() {
            let key = key.map_err(io("scan outbox"))?;
            let Some(end) = key.iter().position(|b| *b == 0) else { continue };
            let Ok(host) = HostId::new(&String::from_utf8_lossy(&key[..end])) else { continue };
            if hosts.last() != Some(&host) {
                hosts.push(host);
            }
        }
        Ok(hosts)
    }

    fn mark_sent(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.directives
            .fetch_and_update(id.as_bytes(), |v| {
                let v = v?;
                let Ok(mut d) = serde_json::from_slice::<DirectiveRecord>(v) else {
                    return Some(v.to_vec());
                };
                if !d.state.is_final() {
                    d.state = DirectiveState::Sent;
                    d.attempts = d.attempts.saturating_add(1);
                    d.first_sent_ms.get_or_insert(now_ms);
                }
                serde_json::to_vec(&d).ok().or_else(|| Some(v.to_vec()))
            })
            .map_err(io("mark directive sent"))?;
        Ok(())
    }

    fn answer(
        &self,
        id: &str,
        state: DirectiveState,
        message: &str,
        now_ms: i64,
    ) -> Result<Option<DirectiveRecord>, StoreError> {
        let stored = (&self.directives, &self.outbox)
            .transaction(|(directives, outbox)| {
                let Some(v) = directives.get(id.as_bytes())? else { return Ok(None) };
                let mut d: DirectiveRecord = serde_json::from_slice(&v).map_err(|e| {
                    ConflictableTransactionError::Abort(StoreError::Corrupt {
                        what: format!("directive {id}"),
                        reason: e.to_string(),
                    })
                })?;
                if d.state.is_final() {
                    return Ok(Some(d));
                }
                d.state = state;
                d.answered_ms = Some(now_ms);
                message.clone_into(&mut d.message);
                let bytes = encode("directive", &d).map_err(ConflictableTransactionError::Abort)?;
                directives.insert(id.as_bytes(), bytes)?;
                outbox.remove(outbox_key(&d.host, id))?;
                Ok(Some(d))
            })
            .map_err(tx_error)?;
        // No flush: an answer lost in a crash leaves the directive in the outbox, it is sent
        // again, and the agent repeats its first answer.
        Ok(stored)
    }

    fn directive(&self, id: &str) -> Result<Option<DirectiveRecord>, StoreError> {
        self.read(&self.directives, id.as_bytes(), "directive")
    }

    fn directives(
        &self,
        filter: &DirectiveFilter,
        limit: usize,
    ) -> Result<Vec<DirectiveRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.directives.iter().rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(io("scan directives"))?;
            let Some(d) =
                decode_or_skip("directive", &k, serde_json::from_slice::<DirectiveRecord>(&v))
            else {
                continue;
            };
            if filter.matches(&d) {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn decisions(
        &self,
        model: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DecisionRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.decisions.iter().rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(io("scan decisions"))?;
            let Some(d) =
                decode_or_skip("decision", &k, serde_json::from_slice::<DecisionRecord>(&v))
            else {
                continue;
            };
            if model.is_none_or(|m| d.model.as_deref() == Some(m)) {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn record_outcome(&self, id: &str, outcome: serde_json::Value) -> Result<bool, StoreError> {
        let found = self
            .decisions
            .transaction(|tx| {
                let Some(bytes) = tx.get(id.as_bytes())? else { return Ok(false) };
                let mut record: DecisionRecord = serde_json::from_slice(&bytes).map_err(|e| {
                    ConflictableTransactionError::Abort(StoreError::Corrupt {
                        what: format!("decision {id}"),
                        reason: e.to_string(),
                    })
                })?;
                if record.outcome.is_none() {
                    record.outcome = Some(outcome.clone());
                    let bytes =
                        encode("decision", &record).map_err(ConflictableTransactionError::Abort)?;
                    tx.insert(id.as_bytes(), bytes)?;
                }
                Ok(true)
            })
            .map_err(tx_error)?;
        self.flush()?;
        Ok(found)
    }

    fn agent_run(&self, host: &HostId) -> Result<Option<u64>, StoreError> {
        let v = self.agent_runs.get(host.as_str().as_bytes()).map_err(io("read agent run"))?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes))
    }

    fn set_agent_run(&self, host: &HostId, run_id: u64) -> Result<(), StoreError> {
        self.agent_runs
            .insert(host.as_str().as_bytes(), &run_id.to_be_bytes())
            .map_err(io("write agent run"))?;
        Ok(())
    }

    fn desired(&self, host: &HostId) -> Result<Option<DesiredState>, StoreError> {
        self.read(&self.desired, host.as_str().as_bytes(), "desired state")
    }

    fn put_scaler_state(&self, key: &str, json: &[u8]) -> Result<(), StoreError> {
        self.scalers.insert(key, json).map_err(io("write scaler state"))?;
        Ok(())
    }

    fn scaler_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.scalers.get(key).map_err(io("read scaler state"))?.map(|v| v.to_vec()))
    }

    fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut removed = 0;
        for key in self.outbox.iter().keys() {
            let key = key.map_err(io("scan outbox"))?;
            let Some(end) = key.iter().position(|b| *b == 0) else { continue };
            let id = String::from_utf8_lossy(&key[end + 1..]).into_owned();
            let Some(d) =
                self.read::<DirectiveRecord>(&self.directives, id.as_bytes(), "directive")?
            else {
                self.outbox.remove(&key).map_err(io("remove outbox entry"))?;
                continue;
            };
            if d.not_after_ms < before_ms {
                let why = "deadline passed while its host was not connected";
                self.answer(&id, DirectiveState::Expired, why, before_ms)?;
                removed += 1;
            }
        }
        for item in self.directives.iter() {
            let (k, v) = item.map_err(io("scan directives"))?;
            let Ok(d) = serde_json::from_slice::<DirectiveRecord>(&v) else { continue };
            if d.state.is_final() && d.answered_ms.unwrap_or(d.created_ms) < before_ms {
                self.directives.remove(k).map_err(io("prune directive"))?;
                removed += 1;
            }
        }
        for item in self.decisions.iter() {
            let (k, v) = item.map_err(io("scan decisions"))?;
            let Ok(d) = serde_json::from_slice::<DecisionRecord>(&v) else { continue };
            if d.at_ms < before_ms {
                self.decisions.remove(k).map_err(io("prune decision"))?;
                removed += 1;
            }
        }
        if removed > 0 {
            self.flush()?;
        }
        Ok(removed)
    }

    fn put_optimization(&self, record: &OptimizationRecord) -> Result<(), StoreError> {
        let key = optimization_key(&record.host, &record.model, &record.directive);
        let value = encode("optimization", record)?;
        self.optimizations.insert(key, value).map_err(io("write optimization"))?;
        // Ids sort in creation order, so the host's and model's oldest come first.
        let prefix = optimization_key(&record.host, &record.model, "");
        let keys: Vec<_> = self
            .optimizations
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(io("scan optimizations"))?;
        for old in keys.iter().take(keys.len().saturating_sub(KEEP_OPTIMIZATIONS)) {
            self.optimizations.remove(old).map_err(io("drop optimization"))?;
        }
        Ok(())
    }

    fn update_running_optimization(&self, record: &OptimizationRecord) -> Result<bool, StoreError> {
        let key = optimization_key(&record.host, &record.model, &record.directive);
        let new = encode("optimization", record)?;
        loop {
            let Some(old) = self.optimizations.get(&key).map_err(io("read optimization"))? else {
                return Ok(false);
            };
            let running =
                serde_json::from_slice::<OptimizationRecord>(&old).is_ok_and(|r| r.is_running());
            if !running {
                return Ok(false);
            }
            let swapped = self
                .optimizations
                .compare_and_swap(&key, Some(&old), Some(new.as_slice()))
                .map_err(io("write optimization"))?;
            // Changed meanwhile: look again.
            if swapped.is_ok() {
                return Ok(true);
            }
        }
    }

    fn optimizations(
        &self,
        host: Option<&HostId>,
        model: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OptimizationRecord>, StoreError> {
        let prefix = match (host, model) {
            (Some(h), Some(m)) => optimization_key(h.as_str(), m, ""),
            (Some(h), None) => {
                let mut k = h.as_str().as_bytes().to_vec();
                k.push(0);
                k
            }
            (None, _) => Vec::new(),
        };
        let mut found = Vec::new();
        for item in self.optimizations.scan_prefix(&prefix) {
            let (k, v) = item.map_err(io("scan optimizations"))?;
            let Some(r) = decode_or_skip::<OptimizationRecord, _>(
                "optimization",
                &k,
                serde_json::from_slice(&v),
            ) else {
                continue;
            };
            if model.is_none_or(|m| r.model == m) {
                found.push(r);
            }
        }
        found.sort_by(|a, b| {
            b.requested_ms.cmp(&a.requested_ms).then(b.directive.cmp(&a.directive))
        });
        found.truncate(limit);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn host(h: &str) -> HostId {
        HostId::new(h).unwrap()
    }

    fn decide(
        store: &SledControlStore,
        at: i64,
        bodies: Vec<(&str, DirectiveBody)>,
    ) -> (DecisionRecord, Vec<DirectiveRecord>) {
        let directives = bodies
            .into_iter()
            .map(|(h, body)| NewDirective { host: host(h), body, not_after_ms: at + 60_000 })
            .collect();
        let decision = NewDecision {
            at_ms: at,
            source: "operator".into(),
            model: Some("ocr".into()),
            rule: "operator".into(),
            reason: "test".into(),
            inputs: serde_json::json!({"why": "test"}),
            acted: true,
        };
        store.record_decision(decision, directives).unwrap()
    }

    /// Opens the database again once the previous handle's background thread let go of it.
    fn reopen(path: &std::path::Path) -> sled::Db {
        for _ in 0..250 {
            if let Ok(db) = sled::open(path) {
                return db;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        sled::open(path).unwrap()
    }

    fn set(model: &str, n: u32) -> DirectiveBody {
        DirectiveBody::SetInstances { model: model.into(), version: None, instances: n }
    }

    #[test]
    fn a_decision_its_outbox_and_desired_state_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (decision, made) = {
            let db = sled::open(dir.path()).unwrap();
            let store = SledControlStore::open(&db).unwrap();
            decide(
                &store,
                1000,
                vec![("a", set("ocr", 3)), ("b", set("ocr", 2)), ("a", set("ocr", 4))],
            )
        };
        let db = reopen(dir.path());
        let store = SledControlStore::open(&db).unwrap();
        assert_eq!(decision.directives.len(), 3);
        // Oldest first, per host.
        let a: Vec<String> = store.outbox(&host("a")).unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(a, vec![made[0].id.clone(), made[2].id.clone()]);
        assert_eq!(store.outbox_hosts().unwrap(), vec![host("a"), host("b")]);
        let desired = store.desired(&host("a")).unwrap().unwrap();
        assert_eq!(desired.models["ocr"].instances, Some(4));
        assert_eq!(desired.revision, 2);
        // Ids from a later store continue, never repeat.
        let (_, more) = decide(&store, 2000, vec![("a", DirectiveBody::Ping)]);
        assert!(more[0].id > made[2].id);
        assert_eq!(store.decisions(Some("ocr"), 10).unwrap().len(), 2);
        assert!(store.decisions(Some("other"), 10).unwrap().is_empty());
    }

    #[test]
    fn a_restarted_agent_gets_its_desired_state_back_but_no_drain_or_load() {
        let mut d = DesiredState::default();
        d.apply(&set("ocr", 3), 1);
        let batching = BatchingChange { max_batch_size: Some(4), ..BatchingChange::default() };
        d.apply(
            &DirectiveBody::SetBatching {
                model: "ocr".into(),
                version: None,
                batching: batching.clone(),
            },
            2,
        );
        d.apply(&DirectiveBody::Drain { model: "ocr".into() }, 3);
        d.apply(&DirectiveBody::Load { model: "vad".into() }, 4);
        d.apply(&set("old", 2), 5);
        d.apply(&DirectiveBody::Unload { model: "old".into() }, 6);
        d.apply(&DirectiveBody::SetTelemetryInterval { interval_ms: 5000 }, 7);
        assert_eq!(
            d.resync(),
            vec![
                set("ocr", 3),
                DirectiveBody::SetBatching { model: "ocr".into(), version: None, batching },
                DirectiveBody::Unload { model: "old".into() },
                DirectiveBody::SetTelemetryInterval { interval_ms: 5000 },
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = SledControlStore::open(&db).unwrap();
        assert_eq!(store.agent_run(&host("a")).unwrap(), None);
        store.set_agent_run(&host("a"), 7).unwrap();
        assert_eq!(store.agent_run(&host("a")).unwrap(), Some(7));
        store.set_agent_run(&host("a"), 9).unwrap();
        assert_eq!(store.agent_run(&host("a")).unwrap(), Some(9));
        assert_eq!(store.agent_run(&host("b")).unwrap(), None);
    }

    #[test]
    fn an_outcome_is_recorded_once_on_its_decision_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let db = sled::open(dir.path()).unwrap();
            let store = SledControlStore::open(&db).unwrap();
            let (decision, _) = decide(&store, 1000, Vec::new());
            assert_eq!(decision.outcome, None);
            assert!(store.record_outcome(&decision.id, serde_json::json!({"ok": true})).unwrap());
            assert!(store.record_outcome(&decision.id, serde_json::json!({"ok": false})).unwrap());
            assert!(!store.record_outcome("0-0", serde_json::json!({})).unwrap());
            decision.id
        };
        let db = reopen(dir.path());
        let store = SledControlStore::open(&db).unwrap();
        let d = store.decisions(None, 10).unwrap().into_iter().find(|d| d.id == id).unwrap();
        assert_eq!(d.outcome, Some(serde_json::json!({"ok": true})), "the first outcome stands");
    }

    #[test]
    fn optimization_records_are_kept_per_host_and_model_newest_first_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let record = |h: &str, m: &str, n: usize| OptimizationRecord {
            host: h.into(),
            model: m.into(),
            directive: format!("00000001-{n:012x}"),
            requested_ms: i64::try_from(n).unwrap() * 1000,
            updated_ms: 0,
            state: "running".into(),
            agent: serde_json::Value::Null,
            note: None,
        };
        {
            let db = sled::open(dir.path()).unwrap();
            let store = SledControlStore::open(&db).unwrap();
            for n in 0..KEEP_OPTIMIZATIONS + 3 {
                store.put_optimization(&record("a", "ocr", n)).unwrap();
            }
            store.put_optimization(&record("a", "ocr-2", 100)).unwrap();
            store.put_optimization(&record("ab", "ocr", 101)).unwrap();
            // Replacing a record (its state moves on) keeps one per directive.
            let mut done = record("a", "ocr", KEEP_OPTIMIZATIONS + 2);
            done.state = "done".into();
            store.put_optimization(&done).unwrap();
            db.flush().unwrap();
        }
        let db = reopen(dir.path());
        let store = SledControlStore::open(&db).unwrap();
        // A final record is not put back to running; a running one is updated.
        let mut stale = record("a", "ocr", KEEP_OPTIMIZATIONS + 2);
        stale.updated_ms = 7;
        assert!(!store.update_running_optimization(&stale).unwrap(), "done stays done");
        stale.directive = format!("00000001-{:012x}", KEEP_OPTIMIZATIONS + 1);
        assert!(store.update_running_optimization(&stale).unwrap());
        assert!(!store.update_running_optimization(&record("a", "gone", 1)).unwrap());
        let ocr = store.optimizations(Some(&host("a")), Some("ocr"), usize::MAX).unwrap();
        assert_eq!(ocr.len(), KEEP_OPTIMIZATIONS, "the oldest were dropped");
        assert_eq!(ocr[0].requested_ms, 1000 * (i64::try_from(KEEP_OPTIMIZATIONS).unwrap() + 2));
        assert_eq!(ocr[0].state, "done");
        assert_eq!(ocr.last().unwrap().requested_ms, 3000, "0, 1 and 2 dropped");
        // Host "a" is not a prefix match for host "ab".
        let a = store.optimizations(Some(&host("a")), None, usize::MAX).unwrap();
        assert_eq!(a.len(), KEEP_OPTIMIZATIONS + 1);
        assert_eq!(a[0].model, "ocr-2", "newest first across models");
        let all = store.optimizations(None, Some("ocr"), 3).unwrap();
        assert_eq!(all.iter().map(|r| r.host.as_str()).collect::<Vec<_>>(), ["ab", "a", "a"]);
    }

    #[test]
    fn the_first_answer_stands_and_leaves_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = SledControlStore::open(&db).unwrap();
        let (_, made) = decide(&store, 1000, vec![("a", set("ocr", 3))]);
        let id = &made[0].id;
        store.mark_sent(id, 1100).unwrap();
        store.mark_sent(id, 1200).unwrap();
        let sent = store.directive(id).unwrap().unwrap();
        assert_eq!(
            (sent.state, sent.attempts, sent.first_sent_ms),
            (DirectiveState::Sent, 2, Some(1100))
        );
        let pending =
            DirectiveFilter { state: Some(DirectiveState::Pending), ..Default::default() };
        assert_eq!(store.directives(&pending, 10).unwrap().len(), 1);
        let done =
            store.answer(id, DirectiveState::Applied, "instances 1 -> 3", 1300).unwrap().unwrap();
        assert_eq!(done.state, DirectiveState::Applied);
        let again = store.answer(id, DirectiveState::Expired, "late", 1400).unwrap().unwrap();
        assert_eq!(
            (again.state, again.message.as_str()),
            (DirectiveState::Applied, "instances 1 -> 3")
        );
        assert!(store.outbox(&host("a")).unwrap().is_empty());
        assert!(store.directives(&pending, 10).unwrap().is_empty());
        let applied = DirectiveFilter {
            state: Some(DirectiveState::Applied),
            host: Some(host("a")),
            ..Default::default()
        };
        assert_eq!(store.directives(&applied, 10).unwrap().len(), 1);
        assert!(store.answer("nope", DirectiveState::Applied, "", 0).unwrap().is_none());
        // Answered and old: pruned; the decision too.
        assert_eq!(store.prune(2000).unwrap(), 2);
        assert!(store.directive(id).unwrap().is_none());
    }

    #[test]
    fn a_host_that_never_returns_does_not_keep_its_outbox_forever() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = SledControlStore::open(&db).unwrap();
        // Deadlines at 61,000 ms.
        let (_, made) = decide(&store, 1000, vec![("gone", set("ocr", 3))]);
        // The old decision goes; its directive is not past its deadline yet.
        assert_eq!(store.prune(50_000).unwrap(), 1);
        assert_eq!(store.outbox(&host("gone")).unwrap().len(), 1);
        assert_eq!(store.prune(70_000).unwrap(), 1, "expired, kept until the next pass");
        assert!(store.outbox(&host("gone")).unwrap().is_empty());
        let d = store.directive(&made[0].id).unwrap().unwrap();
        assert_eq!(d.state, DirectiveState::Expired);
        assert!(d.message.contains("host was not connected"), "{}", d.message);
        assert!(store.outbox_hosts().unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_record_is_skipped_and_its_outbox_entry_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = SledControlStore::open(&db).unwrap();
        let (_, made) = decide(&store, 1000, vec![("a", set("ocr", 3)), ("a", set("ocr", 5))]);
        store.directives.insert(made[0].id.as_bytes(), &b"{garbage"[..]).unwrap();
        let left = store.outbox(&host("a")).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, made[1].id);
        assert_eq!(store.outbox.len(), 1);
        assert_eq!(store.directives(&DirectiveFilter::default(), 10).unwrap().len(), 1);
    }
}
