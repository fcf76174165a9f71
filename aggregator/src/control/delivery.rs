//! Directive delivery: every decision goes through [`Delivery::submit`], which records it (and
//! its directives, in the outbox) durably, then wakes the hosts concerned. Each connected host
//! has one delivery task, started by ingest when the host is welcomed, that sends the host's
//! unanswered directives one at a time, oldest first, on streams it opens on the host's
//! connection, and records each answer.
//!
//! Invariants:
//! - Nothing is sent before its decision is durable, so an agent never applies what a crash
//!   could make the aggregator forget.
//! - Directives of one host are sent in order, one at a time: a later `set_instances` can never
//!   overtake an earlier one.
//! - A directive without a final answer stays in the outbox and is sent again when the host
//!   next connects (or, on a live connection, after [`RETRY_AFTER`]); the agent applies an id
//!   at most once and answers repeats with its first result.
//! - Answers are recorded without a flush of their own: one lost in a crash is asked again,
//!   and the agent repeats it. This keeps a flush off every round trip.
//! - A directive past its deadline is answered `expired` here, unsent.
//! - The wake-up map holds one entry per host with a live delivery task, removed when the task
//!   ends (its connection closed), so it is bounded by the open connections.
//! - An agent that says Hello with a new run id restarted and came back with its own
//!   configuration: [`Delivery::resync_if_restarted`] records a `desired.resync` decision whose
//!   directives bring it back to its desired state. A reconnect of the same run sends nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::directive::DirectiveBody;
use common::framed;
use common::ids::HostId;
use common::proto::{Directive, DirectiveResult, DirectiveStatus};
use tokio::sync::{Notify, broadcast};
use tracing::{debug, info, warn};

use super::store::{
    ControlStore, DecisionRecord, DirectiveFilter, DirectiveRecord, DirectiveState, NewDecision,
    NewDirective,
};
use crate::stats::Counter;
use crate::store::StoreError;

/// How long an agent may take to answer one directive (a model load can take a while).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause before trying a host's outbox again after a stream failed on a live connection.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Lifetime of the directives that resync a restarted agent.
pub const RESYNC_TTL: Duration = Duration::from_secs(600);

/// How many of a host's latest directives a resync looks through for refusals.
const RESYNC_LOOKBACK: usize = 1000;

/// Largest `DirectiveResult` frame read.
const MAX_RESULT_BYTES: u32 = 1024 * 1024;

/// Delivery counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Directive sends (first or repeat).
    pub sent: Counter,
    /// Final answers recorded, by state: applied, rejected, unsupported, expired.
    pub answered: [Counter; 4],
    /// Sends that got no answer (stream failed or timed out); sent again later.
    pub unanswered: Counter,
}

impl DeliveryStats {
    /// The `/metrics` lines.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::from(
            "# HELP flotilla_directives_sent_total Directive sends, first or repeated.\n\
             # TYPE flotilla_directives_sent_total counter\n",
        );
        let _ = writeln!(out, "flotilla_directives_sent_total {}", self.sent.get());
        out.push_str(
            "# HELP flotilla_directives_answered_total Final answers recorded, by state.\n\
             # TYPE flotilla_directives_answered_total counter\n",
        );
        for (state, n) in ANSWER_STATES.iter().zip(&self.answered) {
            let _ = writeln!(
                out,
                "flotilla_directives_answered_total{{state=\"{}\"}} {}",
                state.name(),
                n.get()
            );
        }
        out.push_str(
            "# HELP flotilla_directives_unanswered_total Sends that got no answer (sent again \
             later).\n# TYPE flotilla_directives_unanswered_total counter\n",
        );
        let _ = writeln!(out, "flotilla_directives_unanswered_total {}", self.unanswered.get());
        out
    }
}

/// Labels of `DeliveryStats::answered`.
pub const ANSWER_STATES: [DirectiveState; 4] = [
    DirectiveState::Applied,
    DirectiveState::Rejected,
    DirectiveState::Unsupported,
    DirectiveState::Expired,
];

/// Records decisions and delivers their directives.
#[derive(Debug)]
pub struct Delivery {
    store: Arc<dyn ControlStore>,
    wakeups: Mutex<HashMap<HostId, Arc<Notify>>>,
    answers: broadcast::Sender<DirectiveRecord>,
    /// Counters.
    pub stats: DeliveryStats,
}

/// How a send failed.
enum SendFailure {
    /// The connection is gone: this task ends.
    Connection(String),
    /// This stream failed or timed out: try again later.
    Stream(String),
}

impl Delivery {
    /// Delivery over `store`.
    pub fn new(store: Arc<dyn ControlStore>) -> Arc<Self> {
        let (answers, _) = broadcast::channel(1024);
        Arc::new(Self {
            store,
            wakeups: Mutex::new(HashMap::new()),
            answers,
            stats: DeliveryStats::default(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ControlStore> {
        &self.store
    }

    /// Every final answer as it is recorded (for waiting callers and benches; a slow
    /// receiver misses answers rather than holding delivery back).
    pub fn answers(&self) -> broadcast::Receiver<DirectiveRecord> {
        self.answers.subscribe()
    }

    /// Records a decision and its directives durably, then wakes their hosts' delivery.
    pub async fn submit(
        &self,
        decision: NewDecision,
        directives: Vec<NewDirective>,
    ) -> Result<(DecisionRecord, Vec<DirectiveRecord>), StoreError> {
        let store = self.store.clone();
        let (decision, made) =
            tokio::task::spawn_blocking(move || store.record_decision(decision, directives))
                .await
                .map_err(|e| StoreError::Corrupt {
                    what: "decision".into(),
                    reason: format!("recording task failed: {e}"),
                })??;
        for d in &made {
            if let Ok(host) = HostId::new(&d.host) {
                self.wake(&host);
            }
        }
        Ok((decision, made))
    }

    /// Whether `host` has a live connection (a delivery task) now.
    pub fn is_connected(&self, host: &HostId) -> bool {
        self.lock().contains_key(host)
    }

    /// Wakes `host`'s delivery task, if it has one.
    pub fn wake(&self, host: &HostId) {
        if let Some(n) = self.lock().get(host) {
            n.notify_one();
        }
    }

    /// Delivers `host`'s outbox on `conn` until the connection closes. Ingest runs this for
    /// every welcomed connection.
    pub async fn serve_host(self: Arc<Self>, host: HostId, conn: quinn::Connection) {
        let wake = Arc::new(Notify::new());
        self.lock().insert(host.clone(), wake.clone());
        let reason = self.deliver(&host, &conn, &wake).await;
        debug!(%host, %reason, "Directive delivery ended.");
        let mut map = self.lock();
        if map.get(&host).is_some_and(|n| Arc::ptr_eq(n, &wake)) {
            map.remove(&host);
        }
    }

    async fn deliver(&self, host: &HostId, conn: &quinn::Connection, wake: &Notify) -> String {
        loop {
            // Registered before the outbox is read, so a wake-up in between is not lost.
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let outbox = match self
                .blocking({
                    let host = host.clone();
                    move |s| s.outbox(&host)
                })
                .await
            {
                Ok(o) => o,
                Err(e) => {
                    warn!(%host, error = %common::daemon::error_chain(&e), "Could not read the outbox; retrying.");
                    Vec::new()
                }
            };
            let mut retry = false;
            for d in outbox {
                match self.deliver_one(conn, &d).await {
                    Ok(()) => {}
                    Err(SendFailure::Connection(why)) => return why,
                    Err(SendFailure::Stream(why)) => {
                        self.stats.unanswered.inc();
                        warn!(%host, id = %d.id, %why, "Directive not answered; sending it again later.");
                        retry = true;
                        break;
                    }
                }
            }
            let pause = tokio::time::sleep(if retry { RETRY_AFTER } else { Duration::MAX / 4 });
            tokio::select! {
                () = &mut woken, if !retry => {}
                () = pause, if retry => {}
                e = conn.closed() => return e.to_string(),
            }
        }
    }

    async fn deliver_one(
        &self,
        conn: &quinn::Connection,
        d: &DirectiveRecord,
    ) -> Result<(), SendFailure> {
        let now = crate::ingest::now_ms();
        if now > d.not_after_ms {
            let why = format!("deadline passed before delivery ({} ms late)", now - d.not_after_ms);
            self.record(&d.id, DirectiveState::Expired, why).await;
            return Ok(());
        }
        let id = d.id.clone();
        let _ = self.blocking(move |s| s.mark_sent(&id, now)).await;
        self.stats.sent.inc();
        let result = send(conn, d).await?;
        let state = match result.status() {
            DirectiveStatus::Applied => DirectiveState::Applied,
            DirectiveStatus::Rejected => DirectiveState::Rejected,
            DirectiveStatus::Unsupported => DirectiveState::Unsupported,
            DirectiveStatus::Expired => DirectiveState::Expired,
            DirectiveStatus::Unspecified => {
                return Err(SendFailure::Stream("the agent's answer has no status".into()));
            }
        };
        info!(host = %d.host, id = %d.id, what = %d.body.summary(), state = state.name(), message = %result.message, "Directive answered.");
        self.record(&d.id, state, result.message).await;
        Ok(())
    }

    async fn record(&self, id: &str, state: DirectiveState, message: String) {
        let owned = id.to_owned();
        let stored = self
            .blocking(move |s| s.answer(&owned, state, &message, crate::ingest::now_ms()))
            .await;
        match stored {
            Ok(Some(record)) => {
                if let Some(i) = ANSWER_STATES.iter().position(|s| *s == record.state) {
                    self.stats.answered[i].inc();
                }
                let _ = self.answers.send(record);
            }
            Ok(None) => warn!(%id, "Answered a directive the store no longer has."),
            Err(e) => {
                warn!(%id, error = %common::daemon::error_chain(&e), "Could not record a directive's answer; it will be asked again.");
            }
        }
    }

    /// When `host`'s agent says Hello with a run id other than the one recorded (it restarted),
    /// records a decision (source `resync`, rule `desired.resync`) with the directives that bring
    /// it back to its desired state ([`super::store::DesiredState::resync`]), each deliverable
    /// for [`RESYNC_TTL`], leaving out those whose kind and model the agent refused last time.
    /// Nothing for the first Hello ever recorded, an unchanged run id, a run id of 0 (an older
    /// agent), or an empty desired state.
    pub async fn resync_if_restarted(
        &self,
        host: &HostId,
        run_id: u64,
        now_ms: i64,
    ) -> Result<Option<DecisionRecord>, StoreError> {
        if run_id == 0 {
            return Ok(None);
        }
        let (before, desired) = self
            .blocking({
                let host = host.clone();
                move |s| Ok((s.agent_run(&host)?, s.desired(&host)?))
            })
            .await?;
        if before == Some(run_id) {
            return Ok(None);
        }
        // The new run id is written only after its resync is recorded: a crash in between
        // resyncs again at the next Hello, never skips it.
        let remember = || {
            let host = host.clone();
            self.blocking(move |s| s.set_agent_run(&host, run_id))
        };
        let (Some(before), Some(desired)) = (before, desired) else {
            remember().await?;
            return Ok(None);
        };
        let recent = self
            .blocking({
                let host = host.clone();
                move |s| {
                    let filter = DirectiveFilter { host: Some(host), ..Default::default() };
                    s.directives(&filter, RESYNC_LOOKBACK)
                }
            })
            .await?;
        // What the agent refused last time (an unknown model, a bad value) is not sent again:
        // the desired state records intents, refused ones included.
        let mut last: HashMap<(&str, Option<&str>), DirectiveState> = HashMap::new();
        for d in &recent {
            last.entry((d.body.kind(), d.body.model())).or_insert(d.state);
        }
        let refused = |b: &DirectiveBody| {
            matches!(
                last.get(&(b.kind(), b.model())),
                Some(DirectiveState::Rejected | DirectiveState::Unsupported)
            )
        };
        let bodies: Vec<DirectiveBody> =
            desired.resync().into_iter().filter(|b| !refused(b)).collect();
        if bodies.is_empty() {
            remember().await?;
            return Ok(None);
        }
        let summary: Vec<String> = bodies.iter().map(DirectiveBody::summary).collect();
        let ttl_ms = i64::try_from(RESYNC_TTL.as_millis()).unwrap_or(i64::MAX);
        let decision = NewDecision {
            at_ms: now_ms,
            source: "resync".to_owned(),
            model: None,
            rule: "desired.resync".to_owned(),
            reason: format!(
                "{host}'s agent restarted (run {before:016x} -> {run_id:016x}) with its own \
                 configuration; sending its desired state (revision {}) again: {}",
                desired.revision,
                summary.join(", ")
            ),
            inputs: serde_json::json!({
                "host": host.as_str(),
                "previous_run": format!("{before:016x}"),
                "run": format!("{run_id:016x}"),
                "revision": desired.revision,
            }),
            acted: true,
        };
        let directives = bodies
            .into_iter()
            .map(|body| NewDirective {
                host: host.clone(),
                body,
                not_after_ms: now_ms.saturating_add(ttl_ms),
            })
            .collect();
        let (record, _) = self.submit(decision, directives).await?;
        remember().await?;
        info!(%host, decision = %record.id, "Agent restarted: sending its desired state again.");
        Ok(Some(record))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn ControlStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref())).await.map_err(|e| {
            StoreError::Corrupt {
                what: "control store".into(),
                reason: format!("task failed: {e}"),
            }
        })?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, Arc<Notify>>> {
        self.wakeups.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn send(
    conn: &quinn::Connection,
    d: &DirectiveRecord,
) -> Result<DirectiveResult, SendFailure> {
    let (mut tx, mut rx) =
        conn.open_bi().await.map_err(|e| SendFailure::Connection(e.to_string()))?;
    let frame = Directive {
        id: d.id.clone(),
        kind: d.body.kind().to_owned(),
        payload: d.body.payload(),
        not_after_unix_ms: d.not_after_ms,
    };
    let stream = |e: framed::FrameError| SendFailure::Stream(e.to_string());
    framed::write(&mut tx, &frame).await.map_err(stream)?;
    let _ = tx.finish();
    let result: DirectiveResult =
        match tokio::time::timeout(ANSWER_TIMEOUT, framed::read(&mut rx, MAX_RESULT_BYTES)).await {
            Ok(r) => r.map_err(stream)?,
            Err(_) => {
                return Err(SendFailure::Stream(format!(
                    "no answer within {} s",
                    ANSWER_TIMEOUT.as_secs()
                )));
            }
        };
    if result.id != d.id {
        return Err(SendFailure::Stream(format!(
            "the agent answered id {:?} on the stream of {:?}",
            result.id, d.id
        )));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::control::store::SledControlStore;

    #[tokio::test]
    async fn only_a_new_run_of_a_known_agent_is_resynced() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let delivery = Delivery::new(Arc::new(SledControlStore::open(&db).unwrap()));
        let host = HostId::new("gpu-1").unwrap();
        let set = DirectiveBody::SetInstances { model: "ocr".into(), version: None, instances: 3 };
        let operator = NewDecision {
            at_ms: 1,
            source: "operator".into(),
            model: Some("ocr".into()),
            rule: "operator".into(),
            reason: String::new(),
            inputs: serde_json::Value::Null,
            acted: true,
        };
        // First Hello ever: recorded, nothing sent.
        assert!(delivery.resync_if_restarted(&host, 11, 10).await.unwrap().is_none());
        let new = NewDirective { host: host.clone(), body: set.clone(), not_after_ms: i64::MAX };
        delivery.submit(operator.clone(), vec![new]).await.unwrap();
        // One the agent refused: in the desired state, but not sent again.
        let bad =
            DirectiveBody::SetInstances { model: "nosuch".into(), version: None, instances: 2 };
        let new = NewDirective { host: host.clone(), body: bad, not_after_ms: i64::MAX };
        let (_, made) = delivery.submit(operator, vec![new]).await.unwrap();
        delivery
            .store()
            .answer(&made[0].id, DirectiveState::Rejected, "unknown model", 15)
            .unwrap();
        // The same run reconnecting, or an older agent (0): nothing.
        assert!(delivery.resync_if_restarted(&host, 11, 20).await.unwrap().is_none());
        assert!(delivery.resync_if_restarted(&host, 0, 30).await.unwrap().is_none());
        // A new run: the desired state again, after what was already in the outbox.
        let d = delivery.resync_if_restarted(&host, 12, 40).await.unwrap().unwrap();
        assert_eq!((d.source.as_str(), d.rule.as_str()), ("resync", "desired.resync"));
        let outbox = delivery.store().outbox(&host).unwrap();
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox[1].body, set);
        assert_eq!(outbox[1].decision, d.id);
        assert!(delivery.resync_if_restarted(&host, 12, 50).await.unwrap().is_none());
    }
}
