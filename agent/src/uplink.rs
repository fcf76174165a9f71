//! The QUIC client that moves spooled batches to the aggregator.
//!
//! Invariants:
//! - A batch leaves the spool only after the aggregator's application `Ack` for its seq.
//! - Every connection starts with Hello/Welcome on a control stream; a Refusal is logged with
//!   its reason at ERROR (an operator must act: upgrade, or fix the certificate).
//! - Each batch travels on its own bidirectional stream, up to [`WINDOW`] at once, so a stream
//!   error affects one batch and retries are safe (the aggregator dedups on `(host, seq)`).
//! - Hello and every batch carry the spool's low seq (the lowest seq it can still send), so the
//!   aggregator stops waiting for seqs the spool dropped; every batch also carries the telemetry
//!   health and the clock offset measured from the latest Welcome ([`TelemetryHealth`]).
//! - Reconnects back off exponentially with jitter, from `backoff_initial` to `backoff_max`.
//! - On stop, pending batches get one last chance within the grace period, then the connection
//!   is closed with code OK.

use std::sync::Arc;
use std::time::Duration;

use common::config::agent::UplinkConfig;
use common::daemon::error_chain;
use common::framed::{self, FrameError};
use common::ids::Seq;
use common::proto::{Ack, Hello, HelloReply, Welcome, code, hello_reply};
use rand::Rng as _;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::health::{TelemetryHealth, unix_ms_now};
use crate::spool::{Spool, SpoolError};

/// Batches in flight at once on one connection.
pub const WINDOW: usize = 16;

/// How long one batch may take from open to Ack.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting plus Hello/Welcome may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Clock offset from the aggregator above which the agent warns, ms.
pub const CLOCK_WARN_MS: i64 = 2_000;

/// Largest reply frame the agent reads (Acks and Welcomes are tiny).
const MAX_REPLY_BYTES: u32 = 64 * 1024;

/// Why the uplink lost (or could not get) a connection.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The aggregator's name did not resolve.
    #[error("resolving {target}")]
    Resolve {
        /// `host:port` from the config.
        target: String,
        /// The resolver's reason.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed before the handshake.
    #[error("connecting to {addr}")]
    Connect {
        /// Aggregator address.
        addr: std::net::SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },
    /// The connection failed or closed.
    #[error("connection to the aggregator")]
    Connection(#[source] quinn::ConnectionError),
    /// A frame could not be exchanged.
    #[error("{what}")]
    Frame {
        /// What was being exchanged.
        what: String,
        /// The reason.
        #[source]
        source: FrameError,
    },
    /// The aggregator refused the Hello.
    #[error("aggregator refused this agent: {reason} (it speaks protocol {min}..={max})")]
    Refused {
        /// The aggregator's words.
        reason: String,
        /// Lowest version it speaks.
        min: u32,
        /// Highest version it speaks.
        max: u32,
    },
    /// The aggregator acked a different seq than was sent.
    #[error("sent batch {sent} but the aggregator acked {got}")]
    AckMismatch {
        /// Seq sent.
        sent: u64,
        /// Seq acked.
        got: u64,
    },
    /// Something took too long.
    #[error("timed out {what}")]
    Timeout {
        /// What.
        what: String,
    },
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// The uplink task's inputs.
#[derive(Debug)]
pub struct Uplink {
    /// Client endpoint with the host's certificate.
    pub endpoint: quinn::Endpoint,
    /// Where and how.
    pub config: UplinkConfig,
    /// Batches to send.
    pub spool: Arc<Spool>,
    /// The Hello sent on every connection.
    pub hello: Hello,
    /// Signalled whenever a batch is sealed into the spool.
    pub sealed: Arc<Notify>,
    /// How long pending batches may take to drain at stop.
    pub drain_grace: Duration,
    /// Directive results, kept across connections.
    pub directives: Arc<crate::downlink::Directives>,
    /// Telemetry health and clock offset, stamped on every batch sent.
    pub health: Arc<TelemetryHealth>,
}

impl Uplink {
    /// Runs until `stop` is cancelled, then drains within the grace period and closes.
    pub async fn run(self, stop: CancellationToken) {
        let addr = self.config.aggregator.clone();
        let mut attempt: u32 = 0;
        while !stop.is_cancelled() {
            let connected = tokio::select! {
                r = self.connect() => r,
                () = stop.cancelled() => break,
            };
            match connected {
                Ok((conn, welcome)) => {
                    attempt = 0;
                    let max_frame = welcome.max_frame_bytes;
                    let clock_offset_ms = self.health.snapshot().clock_offset_ms;
                    if let Some(offset) = clock_offset_ms.filter(|o| o.abs() > CLOCK_WARN_MS) {
                        warn!(
                            aggregator = %addr,
                            clock_offset_ms = offset,
                            "This host's clock differs from the aggregator's; sample times are \
                             this host's clock. Check NTP."
                        );
                    }
                    info!(
                        aggregator = %addr,
                        host = %welcome.host_id,
                        version = welcome.version,
                        clock_offset_ms,
                        pending = self.spool.stats().batches,
                        "Connected to aggregator."
                    );
                    let downlink =
                        tokio::spawn(crate::downlink::serve(conn.clone(), self.directives.clone()));
                    let result = self.pump(&conn, max_frame, &stop).await;
                    if stop.is_cancelled() {
                        self.drain(&conn, max_frame).await;
                        conn.close(quinn::VarInt::from_u32(code::OK), b"agent stopping");
                        downlink.abort();
                        break;
                    }
                    downlink.abort();
                    if let Err(e) = result {
                        warn!(aggregator = %addr, error = %error_chain(&e), "Uplink lost; reconnecting.");
                    }
                }
                Err(e @ UplinkError::Refused { .. }) => {
                    error!(aggregator = %addr, error = %e, "Aggregator refused the connection.");
                }
                Err(e) => {
                    let chain = error_chain(&e);
                    match refusal_kind(&chain) {
                        Some(TlsRefusal::OurCertificate) => error!(
                            aggregator = %addr,
                            attempt,
                            error = %chain,
                            "Aggregator refused this host's certificate (revoked, expired, or \
                             from another CA); issue a new one with `flotilla-aggregator ca \
                             issue`. Will retry."
                        ),
                        Some(TlsRefusal::TheirCertificate) => error!(
                            aggregator = %addr,
                            attempt,
                            error = %chain,
                            "This agent does not trust the aggregator's certificate; check \
                             uplink.server_name and tls.ca_cert. Will retry."
                        ),
                        None => warn!(
                            aggregator = %addr,
                            attempt,
                            error = %chain,
                            "Cannot reach aggregator; will retry."
                        ),
                    }
                }
            }
            let delay = backoff(&self.config, attempt);
            attempt = attempt.saturating_add(1);
            debug!(
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "Backing off before reconnecting."
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => {}
            }
        }
        // Give close frames a moment to leave; never hang shutdown on an unreachable peer.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    async fn connect(&self) -> Result<(quinn::Connection, Welcome), UplinkError> {
        let target = &self.config.aggregator;
        let attempt = async {
            let addr = self.resolve().await?;
            let connecting = self
                .endpoint
                .connect(addr, &self.config.server_name)
                .map_err(|source| UplinkError::Connect { addr, source })?;
            let conn = connecting.await.map_err(UplinkError::Connection)?;
            let welcome = self.hello(&conn).await?;
            Ok((conn, welcome))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| UplinkError::Timeout { what: format!("connecting to {target}") })?
    }

    /// Resolves the aggregator's name to an address of the endpoint's family.
    async fn resolve(&self) -> Result<std::net::SocketAddr, UplinkError> {
        let target = &self.config.aggregator;
        let want_v6 = self.endpoint.local_addr().is_ok_and(|a| a.is_ipv6());
        let found = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|source| UplinkError::Resolve { target: target.to_string(), source })?;
        found.into_iter().find(|a| a.is_ipv6() == want_v6).ok_or_else(|| UplinkError::Resolve {
            target: target.to_string(),
            source: std::io::Error::other(if want_v6 {
                "no IPv6 address"
            } else {
                "no IPv4 address (IPv6-only aggregators need an IPv6 literal in uplink.aggregator)"
            }),
        })
    }

    async fn hello(&self, conn: &quinn::Connection) -> Result<Welcome, UplinkError> {
        let frame_err = |source| UplinkError::Frame { what: "Hello/Welcome".into(), source };
        let (mut send, mut recv) = conn.open_bi().await.map_err(UplinkError::Connection)?;
        let mut hello = self.hello.clone();
        let spool = self.spool.clone();
        hello.spool_low_seq = tokio::task::spawn_blocking(move || spool.low_seq())
            .await
            .map_err(|e| UplinkError::Timeout { what: format!("reading the spool: {e}") })??
            .0;
        let sent_ms = unix_ms_now();
        framed::write(&mut send, &hello).await.map_err(frame_err)?;
        let reply: HelloReply =
            framed::read(&mut recv, MAX_REPLY_BYTES).await.map_err(frame_err)?;
        match reply.reply {
            Some(hello_reply::Reply::Welcome(w)) => {
                self.health.record_welcome(sent_ms, unix_ms_now(), w.server_unix_ms);
                Ok(w)
            }
            Some(hello_reply::Reply::Refusal(r)) => Err(UplinkError::Refused {
                reason: r.reason,
                min: r.server_min_version,
                max: r.server_max_version,
            }),
            None => Err(frame_err(FrameError::Finished)),
        }
    }

    /// Sends whatever is pending, then waits for new batches, until the connection fails or
    /// `stop` is cancelled.
    async fn pump(
        &self,
        conn: &quinn::Connection,
        max_frame: u32,
        stop: &CancellationToken,
    ) -> Result<(), UplinkError> {
        loop {
            self.send_pending(conn, max_frame).await?;
            tokio::select! {
                () = self.sealed.notified() => {}
                e = conn.closed() => return Err(UplinkError::Connection(e)),
                () = stop.cancelled() => return Ok(()),
            }
        }
    }

    async fn drain(&self, conn: &quinn::Connection, max_frame: u32) {
        match tokio::time::timeout(self.drain_grace, self.send_pending(conn, max_frame)).await {
            Ok(Ok(())) => info!("Drained the spool before stopping."),
            Ok(Err(e)) => {
                warn!(error = %error_chain(&e), "Could not drain the spool; batches stay spooled.")
            }
            Err(_) => warn!(
                pending = self.spool.stats().batches,
                "Stop grace period ran out; remaining batches stay spooled."
            ),
        }
    }

    /// Sends every spooled batch, [`WINDOW`] at a time, acking each in the spool. A batch over
    /// the aggregator's frame limit (from its Welcome) can never be delivered: it is discarded
    /// and counted as dropped, with an ERROR.
    async fn send_pending(
        &self,
        conn: &quinn::Connection,
        max_frame: u32,
    ) -> Result<(), UplinkError> {
        loop {
            let batch = self.spool.oldest_stamped(Seq(0), WINDOW, |b| self.health.stamp(b))?;
            if batch.is_empty() {
                return Ok(());
            }
            let full = batch.len() == WINDOW;
            let mut in_flight = JoinSet::new();
            for (seq, frame) in batch {
                let payload = frame.len().saturating_sub(common::wire::PREFIX_LEN);
                if max_frame > 0 && payload > max_frame as usize {
                    let samples = self.spool.discard(seq)?;
                    error!(
                        %seq,
                        samples,
                        bytes = payload,
                        max_frame,
                        "Batch larger than the aggregator accepts; dropped it (counted as a spool \
                         drop). Check exec sources for oversized output."
                    );
                    continue;
                }
                let conn = conn.clone();
                in_flight.spawn(async move { send_batch(&conn, seq, frame).await });
            }
            let mut first_error = None;
            let mut retry_after = Duration::ZERO;
            while let Some(joined) = in_flight.join_next().await {
                match joined {
                    Ok(Ok(Delivery::Stored(seq))) => self.spool.ack(seq)?,
                    Ok(Ok(Delivery::Refused { seq, reason })) => {
                        let samples = self.spool.discard(seq)?;
                        error!(
                            %seq,
                            samples,
                            %reason,
                            "The aggregator refused this batch as invalid; dropped it (counted as \
                             a spool drop)."
                        );
                    }
                    Ok(Ok(Delivery::RetryAfter { seq, reason, after })) => {
                        warn!(%seq, %reason, after_ms = after.as_millis(), "The aggregator \
                              refused this batch for load; it stays spooled and is sent again.");
                        retry_after = retry_after.max(after);
                    }
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(join) => {
                        first_error.get_or_insert(UplinkError::Timeout {
                            what: format!("batch task ended abnormally: {join}"),
                        });
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            if !retry_after.is_zero() {
                tokio::time::sleep(retry_after.min(MAX_RETRY_AFTER)).await;
                continue;
            }
            if !full {
                return Ok(());
            }
        }
    }
}

/// Longest pause an aggregator's `retry_after_ms` can impose before the next try.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What the aggregator did with one batch.
enum Delivery {
    /// Stored (or already stored): ack it in the spool.
    Stored(Seq),
    /// Refused for good (invalid or over a size limit): drop it.
    Refused { seq: Seq, reason: String },
    /// Refused for load: keep it and send it again after `after`.
    RetryAfter { seq: Seq, reason: String, after: Duration },
}

async fn send_batch(
    conn: &quinn::Connection,
    seq: Seq,
    frame: bytes::Bytes,
) -> Result<Delivery, UplinkError> {
    let exchange = async {
        let frame_err = |source| UplinkError::Frame { what: format!("batch {seq}"), source };
        let (mut send, mut recv) = conn.open_bi().await.map_err(UplinkError::Connection)?;
        send.write_all(&frame).await.map_err(|e| frame_err(FrameError::Write(e)))?;
        let _ = send.finish();
        let ack: Ack = framed::read(&mut recv, MAX_REPLY_BYTES).await.map_err(frame_err)?;
        if ack.seq != seq.0 {
            return Err(UplinkError::AckMismatch { sent: seq.0, got: ack.seq });
        }
        if !ack.refused.is_empty() {
            let reason = ack.refused;
            return Ok(match ack.retry_after_ms {
                0 => Delivery::Refused { seq, reason },
                ms => Delivery::RetryAfter {
                    seq,
                    reason,
                    after: Duration::from_millis(u64::from(ms)),
                },
            });
        }
        debug!(%seq, duplicate = ack.duplicate, "Batch acknowledged.");
        Ok(Delivery::Stored(seq))
    };
    tokio::time::timeout(BATCH_TIMEOUT, exchange)
        .await
        .map_err(|_| UplinkError::Timeout { what: format!("waiting for the ack of batch {seq}") })?
}

/// Which side's certificate a failed handshake was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRefusal {
    /// The aggregator refused this host's certificate (its alert came back).
    OurCertificate,
    /// This agent refused the aggregator's certificate.
    TheirCertificate,
}

/// Classifies a connection error chain: a certificate problem reported by the peer ("by peer")
/// is about our certificate; one found locally is about theirs.
pub fn refusal_kind(chain: &str) -> Option<TlsRefusal> {
    if !chain.contains("certificate") {
        None
    } else if chain.contains("by peer") {
        Some(TlsRefusal::OurCertificate)
    } else {
        Some(TlsRefusal::TheirCertificate)
    }
}

/// The delay before reconnect attempt `attempt` (0-based): exponential, capped, with jitter in
/// its upper half so many agents restarting together spread out.
pub fn backoff(config: &UplinkConfig, attempt: u32) -> Duration {
    let base = config
        .backoff_initial
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(config.backoff_max);
    let half = base / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_refusals_are_told_apart() {
        let ours = "Hello/Welcome: reading frame: connection lost: aborted by peer: the \
                    cryptographic handshake failed: error 44: invalid peer certificate: Revoked";
        assert_eq!(refusal_kind(ours), Some(TlsRefusal::OurCertificate));
        let theirs = "connection to the aggregator: the cryptographic handshake failed: error 42: \
                      invalid peer certificate: certificate not valid for name \"wrong-name\"";
        assert_eq!(refusal_kind(theirs), Some(TlsRefusal::TheirCertificate));
        assert_eq!(refusal_kind("connecting to 10.0.0.1:7443: timed out"), None);
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let cfg = common::config::agent::AgentConfig::embedded(std::path::Path::new(".")).uplink;
        for attempt in 0..30 {
            let ideal = cfg
                .backoff_initial
                .saturating_mul(2u32.saturating_pow(attempt.min(20)))
                .min(cfg.backoff_max);
            let d = backoff(&cfg, attempt);
            assert!(d >= ideal / 2 && d <= ideal, "attempt {attempt}: {d:?} vs {ideal:?}");
        }
        assert!(backoff(&cfg, 100) <= cfg.backoff_max);
    }
}
