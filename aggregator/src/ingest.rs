//! QUIC ingest: accept agents, check who they are, take their Hello, store their batches, ack.
//!
//! Invariants:
//! - The host id comes from the verified client certificate, never from a message.
//! - Certificates from another CA, expired or revoked are refused in the TLS handshake; each
//!   refusal is logged at WARN with the peer address and rustls' reason.
//! - The first stream must carry a Hello within [`HELLO_TIMEOUT`]; an incompatible version gets a
//!   `Refusal` naming both sides' versions, then the connection closes with `VERSION_REFUSED`.
//! - An `Ack` is written only after the batch is durable (see [`crate::commit`]).
//! - Every decoded Hello and batch passes [`common::validate`] before it is stored; an invalid
//!   batch is answered with an `Ack` whose `refused` names the field (the agent drops it) and
//!   counted on `/metrics` by reason; an invalid Hello gets a `Refusal` naming the field.
//! - A bad frame resets its own stream with `MALFORMED_FRAME` / `FRAME_TOO_LARGE`; the
//!   connection and its other streams carry on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::framed::{self, FrameError};
use common::ids::HostId;
use common::proto::{Ack, Hello, HelloReply, Refusal, TelemetryBatch, Welcome, code, hello_reply};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::commit::Committer;
use crate::connections::Connections;
use crate::stats::Stats;
use crate::store::{CommitOutcome, IncomingBatch, TelemetryStore};
use common::daemon::error_chain;

/// How long a new connection has to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler shares.
#[derive(Debug)]
pub struct IngestContext {
    /// Storage.
    pub store: Arc<dyn TelemetryStore>,
    /// Directive delivery: each welcomed connection gets its outbox delivered.
    pub delivery: Arc<crate::control::delivery::Delivery>,
    /// Group commit handle.
    pub committer: Committer,
    /// Open connections.
    pub connections: Connections,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Largest frame accepted.
    pub max_frame_bytes: u32,
    /// Most samples accepted in one batch.
    pub max_batch_samples: usize,
    /// Global budget of bytes held by frames being read and batches awaiting commit.
    pub inflight: crate::limits::InflightBudget,
    /// Per-host report byte rates.
    pub rates: crate::limits::HostRates,
    /// Connections allowed through the handshake and Hello at once
    /// (`ingest.max_concurrent_handshakes`).
    pub handshakes: Arc<tokio::sync::Semaphore>,
}

/// Accepts connections until `shutdown`, then closes the endpoint and waits for handlers.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<IngestContext>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        // Held through the handshake and the Hello: past the limit a connection is refused
        // before any crypto, and its agent backs off, rather than all of them timing out.
        let Ok(admitted) = ctx.handshakes.clone().try_acquire_owned() else {
            ctx.stats.admissions_refused.inc();
            debug!(peer = %incoming.remote_address(), "Refused a connection: too many handshakes in progress.");
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move { handle_connection(incoming, ctx, shutdown, admitted).await });
    }
    endpoint.close(quinn::VarInt::from_u32(code::OK), b"aggregator stopping");
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.is_err() {
        warn!("Some connection handlers did not finish within 5 s.");
    }
}

async fn handle_connection(
    incoming: quinn::Incoming,
    ctx: Arc<IngestContext>,
    shutdown: CancellationToken,
    admitted: tokio::sync::OwnedSemaphorePermit,
) {
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            ctx.stats.handshakes_refused.inc();
            warn!(%peer, reason = %e, "Refused connection: TLS handshake failed.");
            return;
        }
    };
    let identity = match peer_identity(&conn) {
        Ok(id) => id,
        Err(reason) => {
            ctx.stats.handshakes_refused.inc();
            warn!(%peer, %reason, "Refused connection: no usable client certificate.");
            conn.close(quinn::VarInt::from_u32(code::UNEXPECTED_MESSAGE), reason.as_bytes());
            return;
        }
    };
    let host = identity.host.clone();
    let Some(hello) = accept_hello(&conn, &ctx, &host, peer).await else {
        return;
    };
    let run_id = hello.0.agent_run_id;
    let record = {
        let store = ctx.store.clone();
        let host = host.clone();
        let not_after = identity.not_after_secs;
        tokio::task::spawn_blocking(move || {
            store.record_hello(&host, &hello.0, not_after, now_ms())
        })
        .await
    };
    let record = match record {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            warn!(%host, error = %error_chain(&e), "Could not record Hello; closing.");
            conn.close(quinn::VarInt::from_u32(code::INTERNAL), b"storage failure");
            return;
        }
        Err(e) => {
            warn!(%host, error = %e, "Hello task failed; closing.");
            conn.close(quinn::VarInt::from_u32(code::INTERNAL), b"internal failure");
            return;
        }
    };
    let (mut control_send, version) = (hello.1, hello.2);
    let welcome = HelloReply {
        reply: Some(hello_reply::Reply::Welcome(Welcome {
            version,
            host_id: host.to_string(),
            max_frame_bytes: ctx.max_frame_bytes,
            last_stored_seq: record.watermark,
            server_unix_ms: now_ms(),
        })),
    };
    if let Err(e) = framed::write(&mut control_send, &welcome).await {
        warn!(%host, error = %e, "Could not send Welcome.");
        return;
    }
    let _ = control_send.finish();
    let replaced = ctx.connections.insert(host.clone(), conn.clone());
    ctx.stats.connections_accepted.inc();
    info!(%host, %peer, version, replaced, watermark = record.watermark, "Agent connected.");
    // Welcomed: the next connection may start its handshake.
    drop(admitted);

    let delivery = tokio::spawn(ctx.delivery.clone().serve_host(host.clone(), conn.clone()));
    {
        let (delivery, host) = (ctx.delivery.clone(), host.clone());
        tokio::spawn(async move {
            if let Err(e) = delivery.resync_if_restarted(&host, run_id, now_ms()).await {
                warn!(%host, error = %error_chain(&e), "Could not resync the restarted agent's desired state; its policies will decide again.");
            }
        });
    }
    let streams = TaskTracker::new();
    let reason = loop {
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            () = shutdown.cancelled() => break "aggregator stopping".to_owned(),
        };
        match accepted {
            Ok((send, recv)) => {
                let ctx = ctx.clone();
                let host = host.clone();
                streams.spawn(async move { handle_batch(send, recv, &ctx, host).await });
            }
            Err(e) => break e.to_string(),
        }
    };
    delivery.abort();
    streams.close();
    streams.wait().await;
    ctx.connections.remove(&host, &conn);
    info!(%host, %reason, "Agent disconnected.");
}

/// Reads and checks the Hello; on refusal answers and closes. Returns the Hello, the control
/// stream's send half and the negotiated version.
async fn accept_hello(
    conn: &quinn::Connection,
    ctx: &IngestContext,
    host: &HostId,
    peer: SocketAddr,
) -> Option<(Hello, quinn::SendStream, u32)> {
    let hello_missing = |why: String| {
        ctx.stats.hellos_refused.inc();
        warn!(%host, %peer, reason = %why, "Refused connection: no valid Hello.");
        conn.close(quinn::VarInt::from_u32(code::HELLO_MISSING), why.as_bytes());
    };
    let stream = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let len =
            framed::read_len(&mut recv, ctx.max_frame_bytes).await.map_err(|e| e.to_string())?;
        // Under the same budget as batches: a reconnect storm of large Hellos is bounded too.
        let (payload, _reserved) = match read_budgeted(&mut recv, len, ctx).await {
            Ok(Some(read)) => read,
            Ok(None) => return Err("the aggregator is stopping".to_owned()),
            Err(Budgeted::Frame(e)) => return Err(e.to_string()),
            Err(Budgeted::OverBudget { error, .. }) => {
                ctx.stats.refuse("decoded_size");
                return Err(error.to_string());
            }
            Err(Budgeted::Busy { .. }) => {
                ctx.stats.refuse("busy");
                return Err("the aggregator's ingest budget is full; reconnect later".to_owned());
            }
        };
        let hello: Hello = common::wire::decode_payload(&payload).map_err(|e| e.to_string())?;
        Ok::<_, String>((send, hello))
    })
    .await;
    let (mut send, hello) = match stream {
        Ok(Ok(x)) => x,
        Ok(Err(why)) => {
            hello_missing(why);
            return None;
        }
        Err(_) => {
            hello_missing(format!("no Hello within {} s", HELLO_TIMEOUT.as_secs()));
            return None;
        }
    };
    if let Err(invalid) = common::validate::hello(&hello) {
        ctx.stats.hellos_refused.inc();
        ctx.stats.refuse(invalid.reason());
        let reason =
            format!("invalid Hello: {invalid}; fix the agent's configuration or inventory");
        refuse_hello(conn, host, peer, &mut send, reason, code::MALFORMED_FRAME).await;
        return None;
    }
    let Some(version) = common::proto::negotiate_version(hello.min_version, hello.max_version)
    else {
        ctx.stats.hellos_refused.inc();
        let reason = format!(
            "incompatible protocol version: agent speaks {}..={}, this aggregator speaks {}..={}; upgrade the older side",
            hello.min_version,
            hello.max_version,
            common::proto::MIN_VERSION,
            common::proto::MAX_VERSION
        );
        refuse_hello(conn, host, peer, &mut send, reason, code::VERSION_REFUSED).await;
        return None;
    };
    Some((hello, send, version))
}

/// Answers a Hello with a `Refusal` carrying `reason`, then closes the connection with `code`.
async fn refuse_hello(
    conn: &quinn::Connection,
    host: &HostId,
    peer: SocketAddr,
    send: &mut quinn::SendStream,
    reason: String,
    code: u32,
) {
    warn!(%host, %peer, %reason, "Refused agent's Hello.");
    let refusal = HelloReply {
        reply: Some(hello_reply::Reply::Refusal(Refusal {
            reason: reason.clone(),
            server_min_version: common::proto::MIN_VERSION,
            server_max_version: common::proto::MAX_VERSION,
        })),
    };
    let _ = framed::write(send, &refusal).await;
    let _ = send.finish();
    // Let the refusal reach the agent before the close does.
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(quinn::VarInt::from_u32(code), reason.as_bytes());
}

async fn handle_batch(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: &IngestContext,
    host: HostId,
) {
    let len = match framed::read_len(&mut recv, ctx.max_frame_bytes).await {
        Ok(len) => len,
        Err(e) => {
            refuse_frame(&mut send, &mut recv, ctx, &host, &e);
            return;
        }
    };
    // Held until this handler returns: after the ack, or the refusal.
    let (payload, _reserved) = match read_budgeted(&mut recv, len, ctx).await {
        Ok(Some(read)) => read,
        Ok(None) => return,
        Err(Budgeted::Frame(e)) => {
            refuse_frame(&mut send, &mut recv, ctx, &host, &e);
            return;
        }
        Err(Budgeted::OverBudget { payload, error }) => {
            // Every byte was read, so the agent gets an answer it acts on (drop the batch, not
            // retry it forever); its seq is read without decoding the rest.
            ctx.stats.refuse("decoded_size");
            let seq = seq_of(&payload);
            warn!(%host, seq, error = %error, "Refused a batch that could decode into more than the in-flight budget; the agent drops it.");
            let refusal =
                Ack { seq, duplicate: false, refused: error.to_string(), retry_after_ms: 0 };
            if framed::write(&mut send, &refusal).await.is_ok() {
                let _ = send.finish();
            }
            return;
        }
        Err(Budgeted::Busy { payload }) => {
            ctx.stats.refuse("busy");
            let seq = seq_of(&payload);
            debug!(%host, seq, "Refused a batch for now: the in-flight budget stayed full.");
            let refusal = Ack {
                seq,
                duplicate: false,
                refused: format!(
                    "the aggregator's ingest budget (ingest.max_inflight_bytes) is full; \
                     retry in {BUSY_RETRY_MS} ms"
                ),
                retry_after_ms: BUSY_RETRY_MS,
            };
            if framed::write(&mut send, &refusal).await.is_ok() {
                let _ = send.finish();
            }
            return;
        }
    };
    let batch: TelemetryBatch = match common::wire::decode_payload(&payload) {
        Ok(b) => b,
        Err(e) => {
            refuse_frame(&mut send, &mut recv, ctx, &host, &e.into());
            return;
        }
    };
    drop(payload);
    if batch.seq == 0 {
        ctx.stats.frames_malformed.inc();
        warn!(%host, "Refused a batch with seq 0 (seqs start at 1).");
        framed::refuse(&mut send, &mut recv, code::UNEXPECTED_MESSAGE);
        return;
    }
    if let Err(invalid) = common::validate::batch(&batch, ctx.max_batch_samples) {
        ctx.stats.refuse(invalid.reason());
        let seq = batch.seq;
        warn!(%host, seq, reason = invalid.reason(), error = %invalid, "Refused an invalid batch; the agent drops it.");
        let refusal =
            Ack { seq, duplicate: false, refused: invalid.to_string(), retry_after_ms: 0 };
        if framed::write(&mut send, &refusal).await.is_ok() {
            let _ = send.finish();
        }
        return;
    }
    if let Err(wait) = ctx.rates.take(&host, len as u64, std::time::Instant::now()) {
        ctx.stats.refuse("rate");
        let seq = batch.seq;
        let retry_after_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
        debug!(%host, seq, retry_after_ms, "Refused a batch over the host's rate limit.");
        let refusal = Ack {
            seq,
            duplicate: false,
            refused: format!(
                "this host is over its report rate (ingest.host_rate_bytes_per_sec); \
                 retry in {retry_after_ms} ms"
            ),
            retry_after_ms,
        };
        if framed::write(&mut send, &refusal).await.is_ok() {
            let _ = send.finish();
        }
        return;
    }
    let seq = batch.seq;
    let samples = batch.samples.len() as u64;
    let incoming = IncomingBatch { host: host.clone(), batch, received_ms: now_ms() };
    match ctx.committer.commit(incoming).await {
        Ok(outcome) => {
            let duplicate = outcome == CommitOutcome::Duplicate;
            if duplicate {
                ctx.stats.batches_duplicate.inc();
            } else {
                ctx.stats.batches_stored.inc();
                ctx.stats.samples_stored.add(samples);
            }
            debug!(%host, seq, samples, duplicate, "Batch stored.");
            if framed::write(&mut send, &Ack { seq, duplicate, ..Ack::default() }).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(e) => {
            ctx.stats.batches_failed.inc();
            warn!(%host, seq, error = %e, "Batch not stored; the agent will retry.");
            framed::refuse(&mut send, &mut recv, code::INTERNAL);
        }
    }
}

/// The seq of an undecoded `TelemetryBatch` payload (0 if it has none).
fn seq_of(payload: &[u8]) -> u64 {
    prost::Message::decode(payload).map_or(0, |b: BatchSeq| b.seq)
}

/// Only the seq of a `TelemetryBatch`: prost skips the other fields without allocating.
#[derive(Clone, PartialEq, prost::Message)]
struct BatchSeq {
    #[prost(uint64, tag = "1")]
    seq: u64,
}

/// Why a budgeted read gave no payload.
enum Budgeted {
    /// The stream or its bytes were bad.
    Frame(FrameError),
    /// The payload could decode into more than the whole budget; here it is, undecoded.
    OverBudget { payload: Vec<u8>, error: common::wire::WireError },
    /// The budget stayed too full for this payload's decoded size for [`BUDGET_WAIT`]; here it
    /// is, undecoded, to be answered "retry later".
    Busy { payload: Vec<u8> },
}

/// How long a read payload waits for the rest of its decoded-size reservation.
const BUDGET_WAIT: Duration = Duration::from_secs(5);

/// How long an agent told "busy" waits before sending the batch again.
const BUSY_RETRY_MS: u32 = 1000;

/// Reads a `len`-byte payload under the in-flight budget: the wire bytes are reserved before
/// they are read, then the reservation grows to the most they can decode into
/// ([`common::decoded_size::bound`]) before anyone decodes them. `Ok(None)` if the budget is
/// closed. The returned permit holds the whole reservation.
///
/// The wire bytes stay reserved while the rest is awaited, so every byte held is counted. The
/// wait is bounded: reads each holding their wire bytes while waiting for more could otherwise
/// wait on each other forever. After [`BUDGET_WAIT`] the payload is given back as
/// [`Budgeted::Busy`] and its reservation released.
async fn read_budgeted(
    recv: &mut quinn::RecvStream,
    len: usize,
    ctx: &IngestContext,
) -> Result<Option<(Vec<u8>, tokio::sync::OwnedSemaphorePermit)>, Budgeted> {
    let Some(mut reserved) = ctx.inflight.reserve(len).await else { return Ok(None) };
    let payload = framed::read_payload_bytes(recv, len).await.map_err(Budgeted::Frame)?;
    let bound = common::decoded_size::bound(&payload).max(len);
    let max = ctx.inflight.capacity();
    if bound > max {
        let error = common::wire::WireError::DecodesTooLarge { len, bound, max };
        return Err(Budgeted::OverBudget { payload, error });
    }
    let extra = bound - len;
    if extra > 0 {
        match tokio::time::timeout(BUDGET_WAIT, ctx.inflight.reserve(extra)).await {
            Ok(Some(more)) => reserved.merge(more),
            Ok(None) => return Ok(None),
            Err(_) => return Err(Budgeted::Busy { payload }),
        }
    }
    Ok(Some((payload, reserved)))
}

fn refuse_frame(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    ctx: &IngestContext,
    host: &HostId,
    e: &FrameError,
) {
    let Some(code) = e.code() else {
        debug!(%host, error = %e, "Batch stream ended early.");
        return;
    };
    if code == common::proto::code::FRAME_TOO_LARGE {
        ctx.stats.frames_too_large.inc();
    } else {
        ctx.stats.frames_malformed.inc();
    }
    warn!(
        %host,
        code = common::proto::code::name(u64::from(code)),
        error = %e,
        "Refused a bad frame; the stream is reset, the connection goes on."
    );
    framed::refuse(send, recv, code);
}

fn peer_identity(conn: &quinn::Connection) -> Result<common::tls::CertIdentity, String> {
    let any = conn.peer_identity().ok_or("no client certificate")?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type".to_owned())?;
    let leaf = chain.first().ok_or("empty certificate chain")?;
    common::tls::host_id_of(leaf).map_err(|e| e.to_string())
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
