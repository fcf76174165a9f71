//! Optimization searches on the agents, followed to their reports and kept: every `optimize`
//! directive an agent accepts (from an operator, the CLI or a budget) becomes an
//! [`OptimizationRecord`], and a follower asks the agent where the search stands (the
//! `optimization` directive) until it reports, every [`FOLLOW_EVERY`] at first and less often
//! as the search goes on ([`follow_interval`]), so the report is kept here
//! (`GET /api/v1/optimizations`, `flotilla optimizations`) whether or not anyone watched.
//!
//! Invariants:
//! - One follower per host and model (the `following` map), so the map and the tasks are
//!   bounded by the fleet's models; a new search of the same model supersedes the older
//!   record (noted as such) and the running follower moves to the new one. A follower that
//!   ends for any reason, a panic included, takes its entry out (a guard), so the next search
//!   gets a new one.
//! - A record stays `running` only while followed: at start the aggregator resumes every
//!   `running` record, and a follower that cannot see the search end within [`MAX_FOLLOW`]
//!   (the host gone, or an agent restart that lost it) marks it `lost`, with why.
//! - The follower's directives are ordinary ones (recorded, pruned with the others), sent only
//!   while the host is connected, so a host that is away does not pile them up; a search that
//!   runs an hour adds about 180.
//! - A follower writes a record only while it is still `running` in the store
//!   ([`super::store::ControlStore::update_running_optimization`]), so a record marked final (superseded,
//!   lost) is never put back to `running`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::directive::DirectiveBody;
use common::ids::HostId;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, info, warn};

use super::delivery::Delivery;
use super::store::{
    DirectiveRecord, DirectiveState, NewDecision, NewDirective, OptimizationRecord,
};
use crate::ingest::now_ms;

/// Between two questions to the agent in a search's first minute.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(3);

/// Between two questions once a search has run `running_for`: every 3 s in the first minute
/// (a progress bar someone may be watching), then every 10 s, and every 30 s after 10 minutes.
pub fn follow_interval(running_for: Duration) -> Duration {
    match running_for.as_secs() {
        0..60 => FOLLOW_EVERY,
        60..600 => Duration::from_secs(10),
        _ => Duration::from_secs(30),
    }
}

/// Longest a search is followed before it is marked lost.
pub const MAX_FOLLOW: Duration = Duration::from_secs(12 * 3600);

/// Lifetime of one follow-up directive (a host away longer answers the next one).
const ASK_TTL: Duration = Duration::from_secs(30);

/// Who follows the searches.
#[derive(Debug)]
pub struct Searches {
    delivery: Arc<Delivery>,
    /// (host, model) -> the record its follower writes, and which follower that is.
    following: Mutex<HashMap<(String, String), Followed>>,
    /// Numbers the followers.
    next_follower: std::sync::atomic::AtomicU64,
}

/// The record one follower writes.
#[derive(Debug, Clone)]
struct Followed {
    directive: String,
    follower: u64,
}

/// Takes a follower's entry out when it ends, however it ends (a panic included), unless a
/// newer follower owns it by then.
struct FollowerGuard {
    searches: Arc<Searches>,
    key: (String, String),
    follower: u64,
}

impl Drop for FollowerGuard {
    fn drop(&mut self) {
        let mut following = self.searches.lock();
        if following.get(&self.key).is_some_and(|f| f.follower == self.follower) {
            following.remove(&self.key);
        }
    }
}

impl FollowerGuard {
    /// The directive whose record this follower writes now.
    fn directive(&self) -> Option<String> {
        self.searches.lock().get(&self.key).map(|f| f.directive.clone())
    }

    /// Ends the follower when `directive` is still the one it follows (true); false when a
    /// newer search of the model arrived meanwhile, which it goes on to follow.
    fn finish(&self, directive: &str) -> bool {
        let mut following = self.searches.lock();
        match following.get(&self.key) {
            Some(f) if f.directive != directive => false,
            _ => {
                following.remove(&self.key);
                true
            }
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Searches {
    /// Followers over `delivery`'s store; [`Self::run`] starts them.
    pub fn new(delivery: Arc<Delivery>) -> Arc<Self> {
        Arc::new(Self {
            delivery,
            following: Mutex::new(HashMap::new()),
            next_follower: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Followed>> {
        self.following.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resumes the unfinished records, then records every `optimize` an agent accepts (and
    /// every rollback) until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut answers = self.delivery.answers();
        let store = self.delivery.store().clone();
        match tokio::task::spawn_blocking(move || store.optimizations(None, None, usize::MAX)).await
        {
            Ok(Ok(records)) => {
                // Oldest first: a newer running record of the same model supersedes an older.
                for r in records.into_iter().rev().filter(OptimizationRecord::is_running) {
                    info!(host = %r.host, model = %r.model, "Following an unfinished optimization search again.");
                    self.follow(r.host, r.model, r.directive);
                }
            }
            Ok(Err(e)) => {
                warn!(error = %common::daemon::error_chain(&e), "Could not read the unfinished optimization searches; they stay unfollowed until a new one starts.");
            }
            Err(e) => warn!(error = %e, "Reading the unfinished optimization searches failed."),
        }
        loop {
            let answer = tokio::select! {
                a = answers.recv() => a,
                () = shutdown.cancelled() => return,
            };
            match answer {
                Ok(answer) => self.clone().answered(&answer).await,
                // A missed `optimize` answer is seen by whoever sent it (the API's own call
                // below); the follower's own answers are read back from the store.
                Err(RecvError::Lagged(n)) => {
                    debug!(missed = n, "Search follower lagged behind the answers.")
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Notes an answered directive: an accepted `optimize` starts a record and its follower,
    /// an accepted `optimize_rollback` is noted on the model's latest record. Idempotent (the
    /// API calls it too, so a lagging listener misses nothing the API started).
    pub async fn answered(self: Arc<Self>, answer: &DirectiveRecord) {
        if answer.state != DirectiveState::Applied {
            return;
        }
        let store = self.delivery.store().clone();
        match &answer.body {
            DirectiveBody::Optimize { model, .. } => {
                let Ok(host) = HostId::new(&answer.host) else { return };
                let (m, id) = (model.clone(), answer.id.clone());
                let at = answer.answered_ms.unwrap_or_else(now_ms);
                let started = tokio::task::spawn_blocking(move || {
                    let known = store.optimizations(Some(&host), Some(&m), usize::MAX)?;
                    if known.iter().any(|r| r.directive == id) {
                        return Ok(false);
                    }
                    let record = OptimizationRecord {
                        host: host.as_str().to_owned(),
                        model: m,
                        directive: id,
                        requested_ms: at,
                        updated_ms: at,
                        state: "running".into(),
                        agent: serde_json::Value::Null,
                        note: None,
                    };
                    store.put_optimization(&record)?;
                    Ok::<_, crate::store::StoreError>(true)
                })
                .await;
                match started {
                    Ok(Ok(true)) => {
                        self.follow(answer.host.clone(), model.clone(), answer.id.clone());
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        warn!(error = %common::daemon::error_chain(&e), host = %answer.host, %model, "Could not record an optimization search; it is not followed.");
                    }
                    Err(e) => warn!(error = %e, "Recording an optimization search failed."),
                }
            }
            DirectiveBody::OptimizeRollback { model } => {
                let Ok(host) = HostId::new(&answer.host) else { return };
                let (m, message, at) = (
                    model.clone(),
                    answer.message.clone(),
                    answer.answered_ms.unwrap_or_else(now_ms),
                );
                let _ = tokio::task::spawn_blocking(move || {
                    // The search whose adoption was rolled back: the newest that adopted.
                    let adopted = store.optimizations(Some(&host), Some(&m), usize::MAX)?;
                    let Some(mut latest) = adopted.into_iter().find(|r| {
                        r.agent["adopted"].as_str().is_some_and(|a| a.starts_with("now serving"))
                    }) else {
                        return Ok(());
                    };
                    latest.note = Some(format!("rolled back: {message}"));
                    latest.updated_ms = at;
                    store.put_optimization(&latest)
                })
                .await;
            }
            _ => {}
        }
    }

    /// Makes `directive`'s record the one followed for `host` and `model`, starting a
    /// follower when none runs; the record it replaces is marked superseded.
    fn follow(self: &Arc<Self>, host: String, model: String, directive: String) {
        let key = (host, model);
        let (replaced, new_follower) = {
            let mut following = self.lock();
            match following.get_mut(&key) {
                // The same search, or an older one arriving late: the follower keeps the newer.
                Some(f) if f.directive >= directive => return,
                Some(f) => (Some(std::mem::replace(&mut f.directive, directive.clone())), None),
                None => {
                    let follower =
                        self.next_follower.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    following
                        .insert(key.clone(), Followed { directive: directive.clone(), follower });
                    (None, Some(follower))
                }
            }
        };
        if let Some(old) = replaced {
            let store = self.delivery.store().clone();
            let (host, model) = key.clone();
            tokio::task::spawn_blocking(move || {
                let why = format!("superseded by the search of directive {directive}");
                mark(&*store, &host, &model, &old, "lost", &why);
            });
        }
        if let Some(follower) = new_follower {
            let guard = FollowerGuard { searches: self.clone(), key, follower };
            tokio::spawn(follow_until_done(guard));
        }
    }

    /// Asks `host` where `model`'s search stands; the agent's answer, or why there is none.
    async fn ask(&self, host: &HostId, model: &str) -> Result<DirectiveRecord, String> {
        let now = now_ms();
        let decision = NewDecision {
            at_ms: now,
            source: "optimizer".into(),
            model: Some(model.to_owned()),
            rule: "optimize.follow".into(),
            reason: format!("following the optimization search of {model} on {host} to its report"),
            inputs: serde_json::Value::Null,
            acted: true,
        };
        let body = DirectiveBody::Optimization { model: model.to_owned() };
        let directive = NewDirective {
            host: host.clone(),
            body,
            not_after_ms: now.saturating_add(ms(ASK_TTL)),
        };
        // Subscribed before the send, so the answer cannot slip past.
        let mut answers = self.delivery.answers();
        let (_, made) = self
            .delivery
            .submit(decision, vec![directive])
            .await
            .map_err(|e| common::daemon::error_chain(&e))?;
        let id = made.into_iter().next().ok_or("the follow-up was not recorded")?.id;
        let deadline = tokio::time::Instant::now() + ASK_TTL + super::delivery::ANSWER_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, answers.recv()).await {
                Ok(Ok(answered)) if answered.id == id => return Ok(answered),
                Ok(Ok(_)) => {}
                // Missed answers (lagged) or time is up: read the record as it stands.
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let store = self.delivery.store().clone();
        let found = tokio::task::spawn_blocking(move || store.directive(&id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| common::daemon::error_chain(&e))?;
        match found {
            Some(d) if d.state.is_final() => Ok(d),
            Some(_) => Err("the agent did not answer in time".into()),
            None => Err("the follow-up directive was pruned unanswered".into()),
        }
    }
}

/// Marks a record final (`state`) with `note`, when it is still running.
fn mark(
    store: &dyn super::store::ControlStore,
    host: &str,
    model: &str,
    directive: &str,
    state: &str,
    note: &str,
) {
    let Ok(h) = HostId::new(host) else { return };
    let found = store.optimizations(Some(&h), Some(model), usize::MAX);
    let Some(mut r) = found.ok().and_then(|v| v.into_iter().find(|r| r.directive == directive))
    else {
        return;
    };
    if !r.is_running() {
        return;
    }
    r.state = state.to_owned();
    r.note = Some(note.to_owned());
    r.updated_ms = now_ms();
    if let Err(e) = store.update_running_optimization(&r) {
        warn!(error = %common::daemon::error_chain(&e), host, model, "Could not mark an optimization search {state}.");
    }
}

/// One follower: asks until the followed record's search reports, fails or is lost.
async fn follow_until_done(guard: FollowerGuard) {
    let searches = guard.searches.clone();
    let (host_name, model) = guard.key.clone();
    let Ok(host) = HostId::new(&host_name) else { return };
    let store = searches.delivery.store().clone();
    let mut interval = FOLLOW_EVERY;
    loop {
        tokio::time::sleep(interval).await;
        let Some(directive) = guard.directive() else { return };
        let (s, h, m) = (store.clone(), host.clone(), model.clone());
        let record =
            tokio::task::spawn_blocking(move || s.optimizations(Some(&h), Some(&m), usize::MAX))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|v| v.into_iter().find(|r| r.directive == directive));
        // Dropped (kept only so many), unreadable or already final: nothing left to follow.
        let Some(mut record) = record.filter(OptimizationRecord::is_running) else {
            if guard.finish(&directive) {
                return;
            }
            continue;
        };
        let running_for = now_ms().saturating_sub(record.requested_ms);
        interval = follow_interval(Duration::from_millis(u64::try_from(running_for).unwrap_or(0)));
        let overdue = running_for > ms(MAX_FOLLOW);
        let answer = if overdue {
            Err(format!("not seen to end within {} h", MAX_FOLLOW.as_secs() / 3600))
        } else if !searches.delivery.is_connected(&host) {
            // Nothing to ask until it is back (the search may still be running there).
            continue;
        } else {
            searches.ask(&host, &model).await
        };
        let now = now_ms();
        match answer {
            Ok(d) if d.state == DirectiveState::Applied => {
                match serde_json::from_str::<serde_json::Value>(&d.message) {
                    Ok(state) => {
                        let seen = state["started_unix_ms"].as_i64();
                        let first = record.agent["started_unix_ms"].as_i64();
                        let agent_state = state["state"].as_str().unwrap_or("").to_owned();
                        // The agent replaced the model's state when it accepted this search, so
                        // the first answer is this search's; a later change of start time means
                        // another search replaced it (started on the agent directly).
                        if first.is_some() && seen != first {
                            record.state = "lost".into();
                            record.note = Some("the agent now shows another search of this model (started on the agent directly)".into());
                        } else {
                            record.state = match agent_state.as_str() {
                                "running" => "running".into(),
                                "done" => "done".into(),
                                _ => "failed".into(),
                            };
                            record.agent = state;
                        }
                    }
                    Err(e) => {
                        record.state = "lost".into();
                        record.note = Some(format!(
                            "the agent's answer is not a search state ({e}): {}",
                            d.message
                        ));
                    }
                }
            }
            Ok(d)
                if d.state == DirectiveState::Rejected
                    || d.state == DirectiveState::Unsupported =>
            {
                record.state = "lost".into();
                record.note = Some(format!("the agent no longer knows this search: {}", d.message));
            }
            Err(why) if overdue => {
                record.state = "lost".into();
                record.note = Some(why);
            }
            // Expired (the host is away) or unanswered: ask again later.
            Ok(_) | Err(_) => continue,
        }
        record.updated_ms = now;
        // A newer search of the model may have superseded this one meanwhile.
        if guard.directive().as_deref() != Some(record.directive.as_str()) {
            continue;
        }
        let s = store.clone();
        let r = record.clone();
        match tokio::task::spawn_blocking(move || s.update_running_optimization(&r)).await {
            Ok(Ok(true)) => {}
            // Marked final meanwhile (superseded): this follower moves on or ends.
            Ok(Ok(false)) => {
                if guard.finish(&record.directive) {
                    return;
                }
                continue;
            }
            Ok(Err(e)) => {
                warn!(error = %common::daemon::error_chain(&e), host = %host_name, %model, "Could not store an optimization search's state.");
            }
            Err(e) => warn!(error = %e, "Storing an optimization search's state failed."),
        }
        if !record.is_running() {
            info!(host = %host_name, %model, state = %record.state, "Optimization search followed to its end.");
            if guard.finish(&record.directive) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::control::store::{ControlStore, DirectiveFilter, SledControlStore};

    fn running(host: &str, model: &str, directive: &str, requested_ms: i64) -> OptimizationRecord {
        OptimizationRecord {
            host: host.into(),
            model: model.into(),
            directive: directive.into(),
            requested_ms,
            updated_ms: requested_ms,
            state: "running".into(),
            agent: serde_json::Value::Null,
            note: None,
        }
    }

    #[tokio::test]
    async fn unfinished_searches_are_followed_again_at_start_absent_hosts_are_not_asked_and_overdue_ones_are_lost()
     {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store: Arc<dyn ControlStore> = Arc::new(SledControlStore::open(&db).unwrap());
        let now = now_ms();
        store.put_optimization(&running("gpu-1", "ocr", "00000001-000000000001", now)).unwrap();
        let long_ago = now - ms(MAX_FOLLOW) - 60_000;
        store
            .put_optimization(&running("gpu-2", "ocr", "00000001-000000000002", long_ago))
            .unwrap();
        let searches = Searches::new(Delivery::new(store.clone()));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(searches.clone().run(shutdown.clone()));
        // gpu-2's is past the longest follow and marked lost without a question. gpu-1's is
        // followed again, but its host is not connected, so nothing is asked meanwhile.
        let deadline = tokio::time::Instant::now() + FOLLOW_EVERY * 4;
        loop {
            let lost = store.optimizations(Some(&HostId::new("gpu-2").unwrap()), None, 1).unwrap();
            if lost[0].state == "lost" {
                let note = lost[0].note.as_deref().unwrap();
                assert!(note.starts_with("not seen to end within 12 h"), "{note}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "gpu-2 {lost:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Past gpu-1's first interval too: still running, still followed, nothing asked.
        tokio::time::sleep(FOLLOW_EVERY + Duration::from_millis(500)).await;
        let gpu1 = HostId::new("gpu-1").unwrap();
        let still = store.optimizations(Some(&gpu1), None, 1).unwrap();
        assert!(still[0].is_running(), "{still:?}");
        let asked = DirectiveFilter { host: Some(gpu1), ..Default::default() };
        assert!(store.directives(&asked, 10).unwrap().is_empty(), "no question to an absent host");
        assert_eq!(searches.lock().len(), 1, "only gpu-1 is still followed");
        let gpu2 = HostId::new("gpu-2").unwrap();
        assert!(
            store
                .directives(&DirectiveFilter { host: Some(gpu2), ..Default::default() }, 10)
                .unwrap()
                .is_empty()
        );
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn a_long_search_is_asked_less_often() {
        assert_eq!(follow_interval(Duration::from_secs(5)), FOLLOW_EVERY);
        assert_eq!(follow_interval(Duration::from_secs(90)), Duration::from_secs(10));
        assert_eq!(follow_interval(Duration::from_secs(3600)), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_new_search_of_the_same_model_supersedes_the_followed_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store: Arc<dyn ControlStore> = Arc::new(SledControlStore::open(&db).unwrap());
        let searches = Searches::new(Delivery::new(store.clone()));
        let now = now_ms();
        for id in ["00000001-000000000001", "00000001-000000000002"] {
            store.put_optimization(&running("gpu-1", "ocr", id, now)).unwrap();
            searches.follow("gpu-1".into(), "ocr".into(), id.into());
        }
        let host = HostId::new("gpu-1").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let records = store.optimizations(Some(&host), Some("ocr"), 10).unwrap();
            let old = records.iter().find(|r| r.directive.ends_with('1')).unwrap();
            if old.state == "lost" {
                assert!(
                    old.note
                        .as_deref()
                        .unwrap()
                        .contains("superseded by the search of directive 00000001-000000000002")
                );
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{records:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // An older search arriving late (a lagging listener) does not take the follower back.
        searches.follow("gpu-1".into(), "ocr".into(), "00000001-000000000001".into());
        let following = searches.lock();
        assert_eq!(following.len(), 1, "one follower per host and model");
        assert_eq!(following.values().next().unwrap().directive, "00000001-000000000002");
    }
}
