//! Directives from the aggregator: each arrives on a stream the aggregator opens, and is
//! answered on the same stream with a `DirectiveResult`.
//!
//! Invariants:
//! - A directive id is applied at most once; a repeat gets the first result again.
//! - A directive past its `not_after_unix_ms` is answered `EXPIRED` and not applied.
//! - Kinds this agent does not know are answered `UNSUPPORTED`, naming the kind.
//! - A malformed directive frame resets that stream only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use common::framed;
use common::proto::{Directive, DirectiveResult, DirectiveStatus};
use tracing::{info, warn};

/// Largest directive frame accepted.
const MAX_DIRECTIVE_BYTES: u32 = 1024 * 1024;

/// Results remembered for repeat detection.
const REMEMBERED: usize = 4096;

/// Results of directives already handled, shared by every connection of this agent process
/// so a directive re-sent after a reconnect is not applied twice. (Not persisted yet: the
/// aggregator's durable outbox, which will resend across agent restarts, comes with the
/// directive-sending work.)
#[derive(Debug, Clone, Default)]
pub struct DirectiveMemory(Arc<Mutex<Applied>>);

/// How long a directive stream may take to deliver its frame.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves directive streams on `conn` until it closes. Each stream is handled by its own task
/// in a `JoinSet` (as many as the connection's stream limit lets the aggregator open): a task
/// that panics is reported, not lost, and every task ends with the connection.
pub async fn serve(conn: quinn::Connection, memory: DirectiveMemory) {
    let memory = memory.0;
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept_bi() => accepted,
            Some(done) = handlers.join_next(), if !handlers.is_empty() => {
                report(done);
                continue;
            }
        };
        let Ok((send, recv)) = accepted else { break };
        handlers.spawn(handle(send, recv, memory.clone()));
    }
    handlers.abort_all();
    while let Some(done) = handlers.join_next().await {
        report(done);
    }
}

fn report(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "A directive handler panicked; its directive was not answered.");
    }
}

async fn handle(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    memory: Arc<Mutex<Applied>>,
) {
    let read = tokio::time::timeout(READ_TIMEOUT, framed::read(&mut recv, MAX_DIRECTIVE_BYTES));
    let directive: Directive = match read.await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            warn!(error = %e, "Refused a malformed directive.");
            if let Some(code) = e.code() {
                framed::refuse(&mut send, &mut recv, code);
            }
            return;
        }
        Err(_) => {
            warn!(
                secs = READ_TIMEOUT.as_secs(),
                "A directive stream sent no whole frame in time; closed it."
            );
            framed::refuse(&mut send, &mut recv, common::proto::code::UNEXPECTED_MESSAGE);
            return;
        }
    };
    let result = apply_once(&memory, &directive, unix_ms_now());
    if let Err(e) = framed::write(&mut send, &result).await {
        warn!(id = %directive.id, error = %e, "Could not answer a directive.");
    }
    let _ = send.finish();
}

#[derive(Debug, Default)]
pub(crate) struct Applied {
    results: HashMap<String, DirectiveResult>,
    order: VecDeque<String>,
}

fn apply_once(memory: &Mutex<Applied>, d: &Directive, now_ms: i64) -> DirectiveResult {
    let mut memory = memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(previous) = memory.results.get(&d.id) {
        return previous.clone();
    }
    let result = apply(d, now_ms);
    info!(id = %d.id, kind = %d.kind, status = ?result.status(), "Directive handled.");
    memory.results.insert(d.id.clone(), result.clone());
    memory.order.push_back(d.id.clone());
    if memory.order.len() > REMEMBERED
        && let Some(old) = memory.order.pop_front()
    {
        memory.results.remove(&old);
    }
    result
}

fn apply(d: &Directive, now_ms: i64) -> DirectiveResult {
    let (status, message) = if d.not_after_unix_ms > 0 && now_ms > d.not_after_unix_ms {
        (DirectiveStatus::Expired, format!("deadline {} passed", d.not_after_unix_ms))
    } else {
        match d.kind.as_str() {
            "ping" => (DirectiveStatus::Applied, "pong".to_owned()),
            other => (
                DirectiveStatus::Unsupported,
                format!(
                    "agent {} does not know directive kind {other:?}",
                    env!("CARGO_PKG_VERSION")
                ),
            ),
        }
    };
    DirectiveResult { id: d.id.clone(), status: status.into(), message, payload: Vec::new() }
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directive(id: &str, kind: &str, not_after: i64) -> Directive {
        Directive {
            id: id.into(),
            kind: kind.into(),
            payload: vec![],
            not_after_unix_ms: not_after,
        }
    }

    #[test]
    fn kinds_deadlines_and_repeats() {
        let m = Mutex::new(Applied::default());
        let r = apply_once(&m, &directive("1", "ping", 0), 100);
        assert_eq!(r.status(), DirectiveStatus::Applied);
        let r = apply_once(&m, &directive("2", "reboot-the-moon", 0), 100);
        assert_eq!(r.status(), DirectiveStatus::Unsupported);
        assert!(r.message.contains("reboot-the-moon"));
        let r = apply_once(&m, &directive("3", "ping", 50), 100);
        assert_eq!(r.status(), DirectiveStatus::Expired);
        // A repeat of id 3 with a new deadline still gets the first answer.
        let r = apply_once(&m, &directive("3", "ping", 0), 100);
        assert_eq!(r.status(), DirectiveStatus::Expired);
    }
}
