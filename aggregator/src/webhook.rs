//! Alert webhook delivery: one HTTP POST of JSON per analytics pass that changed alerts,
//! retried with exponential backoff.
//!
//! Invariants:
//! - Delivery runs on a blocking thread, never on an async worker, and never holds up the
//!   analytics pass (the pass hands the payload over and goes on).
//! - A 2xx answer is success; anything else (connection refused, timeout, 5xx, 4xx) is retried
//!   up to [`ATTEMPTS`] times, waiting [`FIRST_BACKOFF`] and then twice as long each time. A
//!   delivery that still fails is logged at ERROR (an operator must look at the receiver); the
//!   alert stays in the history and in `flotilla alerts` either way.
//! - Delivery is at-least-once while the process runs; it is not persisted across restarts.

use std::time::Duration;

use serde::Serialize;
use tracing::{error, info, warn};

use crate::analytics::alerts::Alert;

/// Tries per payload.
pub const ATTEMPTS: u32 = 5;
/// Wait after the first failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest time one POST may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The JSON body.
#[derive(Debug, Clone, Serialize)]
pub struct Payload<'a> {
    /// Always `flotilla`.
    pub source: &'static str,
    /// When the pass ran, Unix ms.
    pub generated_ms: i64,
    /// The transitions: newly firing and resolved alerts.
    pub alerts: &'a [Alert],
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// No answer.
    #[error("POST {url}: {source}")]
    Transport {
        /// Target.
        url: String,
        /// ureq's reason.
        #[source]
        source: ureq::Error,
    },
    /// A non-2xx answer.
    #[error("POST {url}: answered {status}")]
    Status {
        /// Target.
        url: String,
        /// HTTP status.
        status: u16,
    },
}

/// POSTs `alerts` to `url`, retrying; blocking. Returns the attempts used, or the last error.
pub fn deliver(
    url: &str,
    generated_ms: i64,
    alerts: &[Alert],
    backoff: Duration,
) -> Result<u32, WebhookError> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_TIMEOUT))
        .user_agent(concat!("flotilla-aggregator/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent();
    let body = Payload { source: "flotilla", generated_ms, alerts };
    let mut wait = backoff;
    let mut attempt = 1;
    loop {
        let result = match agent.post(url).send_json(&body) {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(WebhookError::Status { url: url.to_owned(), status: r.status().as_u16() }),
            Err(source) => Err(WebhookError::Transport { url: url.to_owned(), source }),
        };
        match result {
            Ok(()) => {
                info!(url, alerts = alerts.len(), attempt, "Delivered alerts to the webhook.");
                return Ok(attempt);
            }
            Err(e) if attempt < ATTEMPTS => {
                warn!(url, attempt, error = %e, retry_in_ms = wait.as_millis(), "Alert webhook failed; retrying.");
                std::thread::sleep(wait);
                wait *= 2;
                attempt += 1;
            }
            Err(e) => {
                error!(url, attempts = attempt, error = %e, "Alert webhook failed; giving up on this delivery.");
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::alerts::{AlertState, Severity};
    use std::io::{Read, Write};

    /// A loopback server answering 503 once, then 200, recording each body.
    #[test]
    fn retries_until_the_receiver_accepts() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            for status in ["503 Service Unavailable", "200 OK"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            bodies.push(text[end + 4..].to_owned());
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                s.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap();
            }
            bodies
        });
        let alert = Alert {
            key: "k".into(),
            rule: "r".into(),
            subject: "s".into(),
            severity: Severity::Critical,
            state: AlertState::Firing,
            message: "m".into(),
            value: Some(1.0),
            threshold: 0.5,
            fired_ms: 1,
            resolved_ms: None,
        };
        assert_eq!(deliver(&url, 7, &[alert], Duration::from_millis(1)).unwrap(), 2);
        let bodies = server.join().unwrap();
        assert_eq!(bodies.len(), 2);
        let v: serde_json::Value = serde_json::from_str(&bodies[1]).unwrap();
        assert_eq!(v["alerts"][0]["key"], "k");
        assert_eq!(v["generated_ms"], 7);
    }
}
