//! Telemetry health: what the agent knows about its own telemetry pipeline, shared by the
//! sampling thread, the sealer and the uplink.
//!
//! Invariants:
//! - Every failure recorded here was also logged at ERROR where it happened.
//! - The state travels to the aggregator in every batch sent ([`TelemetryHealth::stamp`]), so
//!   `flotilla host` shows it; a failure that stops batches from being sealed at all shows there
//!   once sealing works again (and meanwhile as a host that stopped reporting).
//! - The clock offset is the agent's clock minus the aggregator's, measured at each Hello/Welcome
//!   exchange against the midpoint of the round trip.

use std::sync::Mutex;

use common::proto::TelemetryBatch;

/// What has gone wrong with telemetry since the agent started, and the clock offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthState {
    /// Times taking a sample or sealing samples into the spool failed.
    pub errors: u64,
    /// The latest failure (empty when none).
    pub last_error: String,
    /// When it happened, Unix ms (agent clock).
    pub last_error_unix_ms: i64,
    /// Agent clock minus aggregator clock, ms, from the latest Welcome.
    pub clock_offset_ms: Option<i64>,
}

/// The shared handle (cheap to lock; never held across an await).
#[derive(Debug, Default)]
pub struct TelemetryHealth {
    state: Mutex<HealthState>,
}

impl TelemetryHealth {
    /// Records one failure (already logged by the caller).
    pub fn record_error(&self, error: &str) {
        let mut s = self.lock();
        s.errors = s.errors.saturating_add(1);
        error.clone_into(&mut s.last_error);
        s.last_error_unix_ms = unix_ms_now();
    }

    /// Records the clock offset measured from a Welcome: `server_unix_ms` against the local
    /// times the Hello was sent and the Welcome received.
    pub fn record_welcome(&self, sent_unix_ms: i64, received_unix_ms: i64, server_unix_ms: i64) {
        if server_unix_ms <= 0 {
            return; // An aggregator that does not send its clock.
        }
        let midpoint = sent_unix_ms + (received_unix_ms - sent_unix_ms) / 2;
        self.lock().clock_offset_ms = Some(midpoint.saturating_sub(server_unix_ms));
    }

    /// The current state.
    pub fn snapshot(&self) -> HealthState {
        self.lock().clone()
    }

    /// Copies the state into a batch about to be sent.
    pub fn stamp(&self, batch: &mut TelemetryBatch) {
        let s = self.lock();
        batch.clock_offset_ms = s.clock_offset_ms;
        batch.telemetry_errors = s.errors;
        batch.last_telemetry_error.clone_from(&s.last_error);
        batch.last_telemetry_error_unix_ms = s.last_error_unix_ms;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Now, Unix milliseconds (agent clock).
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welcome_gives_the_offset_from_the_round_trip_midpoint() {
        let h = TelemetryHealth::default();
        h.record_welcome(1_000, 1_100, 0);
        assert_eq!(h.snapshot().clock_offset_ms, None, "no server clock, no offset");
        // Sent at 1000, answered at 1100 (agent clock); the aggregator said 6050 in between.
        h.record_welcome(1_000, 1_100, 6_050);
        assert_eq!(h.snapshot().clock_offset_ms, Some(-5_000));
        h.record_error("spool: disk full");
        let mut batch = TelemetryBatch::default();
        h.stamp(&mut batch);
        assert_eq!(batch.clock_offset_ms, Some(-5_000));
        assert_eq!(
            (batch.telemetry_errors, batch.last_telemetry_error.as_str()),
            (1, "spool: disk full")
        );
        assert!(batch.last_telemetry_error_unix_ms > 0);
    }
}
