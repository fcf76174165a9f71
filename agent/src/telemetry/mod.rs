//! Telemetry collectors.
