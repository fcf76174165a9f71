//! Directives from the aggregator: each arrives on a stream the aggregator opens, and is
//! answered on the same stream with a `DirectiveResult`.
//!
//! Invariants:
//! - A directive id is applied at most once, across reconnects and agent restarts (the
//!   [`Ledger`] persists results); a repeat gets the first result again.
//! - A directive past its `not_after_unix_ms` is answered `EXPIRED` and not applied.
//! - Kinds this agent does not know are answered `UNSUPPORTED`, naming the kind; a payload
//!   that does not parse, or a change that cannot be made, is `REJECTED` with the reason and
//!   changes nothing ([`Actuator`]).
//! - A malformed directive frame resets that stream only.

use std::sync::Arc;

use common::directive::{BodyError, DirectiveBody};
use common::framed;
use common::proto::{Directive, DirectiveResult, DirectiveStatus};
use tracing::{info, warn};

use crate::actuator::Actuator;
use crate::ledger::Ledger;

/// Largest directive frame accepted.
const MAX_DIRECTIVE_BYTES: u32 = 1024 * 1024;

/// What directive streams need: the ledger of applied ids and what they act on. Shared by
/// every connection of this agent process.
#[derive(Debug)]
pub struct Directives {
    /// Applied ids and their results.
    pub ledger: Ledger,
    /// What directives change.
    pub actuator: Actuator,
}

/// How long a directive stream may take to deliver its frame.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves directive streams on `conn` until it closes. Each stream is handled by its own task
/// in a `JoinSet` (as many as the connection's stream limit lets the aggregator open): a task
/// that panics is reported, not lost, and every task ends with the connection.
pub async fn serve(conn: quinn::Connection, directives: Arc<Directives>) {
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
        handlers.spawn(handle(send, recv, directives.clone()));
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
    directives: Arc<Directives>,
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
    let result = apply_once(&directives, &directive, unix_ms_now()).await;
    if let Err(e) = framed::write(&mut send, &result).await {
        warn!(id = %directive.id, error = %e, "Could not answer a directive.");
    }
    let _ = send.finish();
}

/// Answers a repeat from the ledger, or applies the directive and records its result.
async fn apply_once(directives: &Directives, d: &Directive, now_ms: i64) -> DirectiveResult {
    let (result, fresh) =
        directives.ledger.once(&d.id, apply(&directives.actuator, d, now_ms)).await;
    if fresh {
        info!(id = %d.id, kind = %d.kind, status = ?result.status(), message = %result.message, "Directive handled.");
    } else {
        info!(id = %d.id, kind = %d.kind, "Directive repeated; answered with its first result.");
    }
    result
}

async fn apply(actuator: &Actuator, d: &Directive, now_ms: i64) -> DirectiveResult {
    let (status, message) = if d.not_after_unix_ms > 0 && now_ms > d.not_after_unix_ms {
        (DirectiveStatus::Expired, format!("deadline {} passed", d.not_after_unix_ms))
    } else {
        match DirectiveBody::parse(&d.kind, &d.payload) {
            Err(BodyError::UnknownKind(kind)) => (
                DirectiveStatus::Unsupported,
                format!(
                    "agent {} does not know directive kind {kind:?}",
                    env!("CARGO_PKG_VERSION")
                ),
            ),
            Err(e) => (DirectiveStatus::Rejected, e.to_string()),
            Ok(body) => match actuator.apply(&body).await {
                Ok(changed) => (DirectiveStatus::Applied, changed),
                Err(why) => (DirectiveStatus::Rejected, why),
            },
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn directive(id: &str, kind: &str, payload: &str, not_after: i64) -> Directive {
        Directive {
            id: id.into(),
            kind: kind.into(),
            payload: payload.as_bytes().to_vec(),
            not_after_unix_ms: not_after,
        }
    }

    #[tokio::test]
    async fn kinds_deadlines_refusals_and_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::spool::Spool::open(dir.path(), 1 << 20).unwrap();
        let interval = crate::sampler::SampleInterval::for_tests(std::time::Duration::from_secs(1));
        let d = Directives {
            ledger: Ledger::open(&spool).unwrap(),
            actuator: Actuator {
                repository: None,
                interval: Some(interval.clone()),
                optimizations: None,
            },
        };
        let r = apply_once(&d, &directive("1", "ping", "", 0), 100).await;
        assert_eq!((r.status(), r.message.as_str()), (DirectiveStatus::Applied, "pong"));
        let r = apply_once(&d, &directive("2", "reboot-the-moon", "", 0), 100).await;
        assert_eq!(r.status(), DirectiveStatus::Unsupported);
        assert!(r.message.contains("reboot-the-moon"));
        let r = apply_once(&d, &directive("3", "ping", "", 50), 100).await;
        assert_eq!(r.status(), DirectiveStatus::Expired);
        // A repeat of id 3 with a new deadline still gets the first answer.
        let r = apply_once(&d, &directive("3", "ping", "", 0), 100).await;
        assert_eq!(r.status(), DirectiveStatus::Expired);
        // A bad value is refused by name and changes nothing.
        let r = apply_once(
            &d,
            &directive("4", "set_telemetry_interval", r#"{"interval_ms":5}"#, 0),
            100,
        )
        .await;
        assert_eq!(r.status(), DirectiveStatus::Rejected);
        assert!(r.message.contains("interval_ms = 5 is out of range"), "{}", r.message);
        assert_eq!(interval.get(), std::time::Duration::from_secs(1));
        let r = apply_once(
            &d,
            &directive("5", "set_telemetry_interval", r#"{"interval_ms":250}"#, 0),
            100,
        )
        .await;
        assert_eq!(r.status(), DirectiveStatus::Applied, "{}", r.message);
        assert_eq!(interval.get(), std::time::Duration::from_millis(250));
        // Without [serving], model directives are refused with the reason.
        let r = apply_once(
            &d,
            &directive("6", "set_instances", r#"{"model":"m","instances":2}"#, 0),
            100,
        )
        .await;
        assert_eq!(r.status(), DirectiveStatus::Rejected);
        assert!(r.message.contains("serves no models"), "{}", r.message);
        let r = apply_once(&d, &directive("7", "set_instances", r#"{"model":"m"}"#, 0), 100).await;
        assert_eq!(r.status(), DirectiveStatus::Rejected);
        assert!(r.message.contains("missing field `instances`"), "{}", r.message);
    }
}
