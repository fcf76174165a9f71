//! Bytes from the network never crash the aggregator: bad frames reset their own stream, the
//! connection carries on, an incompatible Hello gets a clear refusal, and a batch that decodes
//! but is invalid is refused with the reason instead of being stored.

use common::framed;
use common::ids::HostId;
use common::proto::{
    Ack, Hello, HelloReply, Histogram, ModelSample, Sample, TelemetryBatch, code, hello_reply,
};
use e2e::{Aggregator, Fleet, quic_client};

fn identity(fleet: &Fleet, host: &str) -> (String, String, String) {
    let ca = std::fs::read_to_string(fleet.path().join("tls/ca.pem")).unwrap();
    let pair = fleet.ca().issue_host(&HostId::new(host).unwrap(), 1).unwrap();
    (ca, pair.cert_pem, pair.key_pem)
}

fn hello(min: u32, max: u32) -> Hello {
    Hello {
        min_version: min,
        max_version: max,
        agent_version: "test".into(),
        spool_epoch: 1,
        ..Hello::default()
    }
}

/// Starts an aggregator whose `[ingest]` table also has `lines`.
fn start_with_ingest(fleet: &Fleet, lines: &str) -> Aggregator {
    let config = fleet.aggregator_config(0);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(lines);
    std::fs::write(&config, text).unwrap();
    Aggregator::start(&config)
}

/// Connects as `host` (a fresh certificate from the fleet CA) and says Hello; the endpoint
/// must outlive the connection.
async fn welcomed(
    fleet: &Fleet,
    agg: &Aggregator,
    host: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    let (ca, cert, key) = identity(fleet, host);
    let endpoint = quic_client(&ca, &cert, &key);
    let conn = endpoint.connect(agg.quic, "flotilla-aggregator").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    framed::write(&mut send, &hello(1, 1)).await.unwrap();
    let reply: HelloReply = framed::read(&mut recv, 1 << 16).await.unwrap();
    assert!(matches!(reply.reply, Some(hello_reply::Reply::Welcome(_))), "{reply:?}");
    (endpoint, conn)
}

/// Reads a stream to its end and returns the reset code, if it was reset.
async fn reset_code(recv: &mut quinn::RecvStream) -> Option<u64> {
    match recv.read_to_end(1 << 16).await {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Some(code.into_inner()),
        other => panic!("expected a reset, got {other:?}"),
    }
}

#[test]
fn bad_frames_reset_their_stream_and_the_connection_goes_on() {
    let fleet = Fleet::new();
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (ca, cert, key) = identity(&fleet, "framer");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = quic_client(&ca, &cert, &key);
        let conn = endpoint.connect(agg.quic, "flotilla-aggregator").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        framed::write(&mut send, &hello(1, 1)).await.unwrap();
        let reply: HelloReply = framed::read(&mut recv, 1 << 20).await.unwrap();
        let Some(hello_reply::Reply::Welcome(welcome)) = reply.reply else { panic!("{reply:?}") };
        assert_eq!(welcome.host_id, "framer", "the host id comes from the certificate");

        // Malformed: an invalid protobuf wire type.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0, 0, 3, 0x0f, 0xff, 0xff]).await.unwrap();
        // Already refused, perhaps: the whole frame fits in the first packet.
        let _ = send.finish();
        assert_eq!(reset_code(&mut recv).await, Some(u64::from(code::MALFORMED_FRAME)));

        // Oversized: a 100 MiB length prefix, refused before any payload is read.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&(100u32 << 20).to_be_bytes()).await.unwrap();
        // The aggregator may stop this stream as soon as it reads the prefix, so this write
        // may fail with "stopped by peer"; what matters is the reset code below.
        let _ = send.write_all(&[0u8; 1024]).await;
        assert_eq!(reset_code(&mut recv).await, Some(u64::from(code::FRAME_TOO_LARGE)));

        // Truncated: the stream ends inside a frame.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0, 0, 50, 1, 2]).await.unwrap();
        send.finish().unwrap();
        assert_eq!(reset_code(&mut recv).await, Some(u64::from(code::MALFORMED_FRAME)));

        // The same connection still carries good batches, and a retry is acked as a duplicate.
        let batch = TelemetryBatch {
            seq: 1,
            samples: vec![Sample {
                unix_ms: 1_700_000_000_000,
                sample_index: 1,
                ..Sample::default()
            }],
            ..TelemetryBatch::default()
        };
        for expect_duplicate in [false, true] {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            framed::write(&mut send, &batch).await.unwrap();
            send.finish().unwrap();
            let ack: Ack = framed::read(&mut recv, 1024).await.unwrap();
            assert_eq!(ack, Ack { seq: 1, duplicate: expect_duplicate, ..Ack::default() });
        }
        assert!(conn.close_reason().is_none(), "connection survived: {:?}", conn.close_reason());
        conn.close(0u32.into(), b"done");
    });
    agg.proc.wait_for_log(&["Refused a bad frame", "malformed_frame"]);
    agg.proc.wait_for_log(&["Refused a bad frame", "frame_too_large"]);
    let detail = agg.cli_json(&["host", "framer"]).unwrap();
    assert_eq!(detail["summary"]["samples_total"], 1);
}

#[test]
fn an_incompatible_protocol_version_is_refused_with_the_reason() {
    let fleet = Fleet::new();
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (ca, cert, key) = identity(&fleet, "time-traveller");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = quic_client(&ca, &cert, &key);
        let conn = endpoint.connect(agg.quic, "flotilla-aggregator").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        framed::write(&mut send, &hello(7, 9)).await.unwrap();
        let reply: HelloReply = framed::read(&mut recv, 1 << 20).await.unwrap();
        let Some(hello_reply::Reply::Refusal(refusal)) = reply.reply else { panic!("{reply:?}") };
        assert!(refusal.reason.contains("7..=9") && refusal.reason.contains("upgrade"), "{}", refusal.reason);
        assert_eq!((refusal.server_min_version, refusal.server_max_version), (1, 1));
        let closed = conn.closed().await;
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code::VERSION_REFUSED.into()),
            "{closed:?}"
        );
    });
    agg.proc.wait_for_log(&["incompatible protocol version", "time-traveller"]);
}

/// Regression (issue 8, hole 6): a histogram with `min > max` was stored, and every later
/// `/api/v1/models` call and analytics pass panicked on it. Now the batch is refused with the
/// field named in the Ack, nothing is stored, and the refusal is counted on /metrics.
#[test]
fn an_invalid_batch_is_refused_with_the_reason_and_not_stored() {
    let fleet = Fleet::new();
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_endpoint, conn) = welcomed(&fleet, &agg, "liar").await;
        let model = ModelSample {
            model: "m".into(),
            version: "1".into(),
            latency_us: Some(Histogram {
                bucket_index: vec![5],
                bucket_count: vec![1],
                count: 1,
                sum: 5,
                min: 9,
                max: 1,
            }),
            ..ModelSample::default()
        };
        let batch = TelemetryBatch {
            seq: 1,
            samples: vec![Sample {
                unix_ms: 1_700_000_000_000,
                sample_index: 1,
                models: vec![model],
                ..Sample::default()
            }],
            ..TelemetryBatch::default()
        };
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        framed::write(&mut send, &batch).await.unwrap();
        send.finish().unwrap();
        let ack: Ack = framed::read(&mut recv, 1 << 16).await.unwrap();
        assert_eq!((ack.seq, ack.retry_after_ms), (1, 0));
        assert!(ack.refused.contains("samples[0].models[0].latency_us"), "{}", ack.refused);
        conn.close(0u32.into(), b"done");
    });
    let detail = agg.cli_json(&["host", "liar"]).unwrap();
    assert_eq!(detail["summary"]["samples_total"], 0);
    let models = agg.cli(&["models", "--json"]);
    assert!(models.status.success(), "{}", String::from_utf8_lossy(&models.stderr));
    let text = {
        use std::io::{Read as _, Write as _};
        let addr = agg.api.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    assert!(text.contains("flotilla_ingest_refused_total{reason=\"histogram\"} 1"), "{text}");
}

/// The aggregator's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Regression (issue 8, section 2 "bounded aggregator memory"): a 4 MiB frame of two million
/// empty samples is 2 bytes per sample on the wire and a `Sample` struct each once decoded, so
/// the aggregator used to allocate hundreds of MiB decoding it before refusing it by count. Now
/// its decoded size is bounded from its bytes first, and it is refused undecoded, with a reason
/// the agent acts on (drop it), counted on /metrics, and the peak memory barely moves.
#[test]
fn a_frame_that_would_decode_huge_is_refused_undecoded() {
    let fleet = Fleet::new();
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let before = peak_rss_kib(agg.proc.pid());
    rt.block_on(async {
        let (_endpoint, conn) = welcomed(&fleet, &agg, "inflater").await;

        // seq = 7, then field 2 (samples) empty, two million times: just under 4 MiB.
        let mut payload = vec![0x08, 0x07];
        for _ in 0..2_000_000 {
            payload.extend_from_slice(&[0x12, 0x00]);
        }
        let mut frame = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        let ack: Ack = framed::read(&mut recv, 1 << 16).await.unwrap();
        assert_eq!((ack.seq, ack.retry_after_ms), (7, 0), "refused for good: {ack:?}");
        assert!(
            ack.refused.contains("could decode into") && ack.refused.contains("budget"),
            "{}",
            ack.refused
        );
        assert!(conn.close_reason().is_none(), "the connection goes on");
        conn.close(0u32.into(), b"done");
    });
    let grown_mib = peak_rss_kib(agg.proc.pid()).saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "peak RSS grew by {grown_mib} MiB reading one 4 MiB frame");
    let metrics = e2e::http_get(agg.api.trim_start_matches("http://"), "/metrics");
    assert!(
        metrics.contains("flotilla_ingest_refused_total{reason=\"decoded_size\"} 1"),
        "{metrics}"
    );
    let detail = agg.cli_json(&["host", "inflater"]).unwrap();
    assert_eq!(detail["summary"]["samples_total"], 0);
}

/// Reconnect storms (issue 8, section 2 "load"): past `ingest.max_concurrent_handshakes`
/// connections in handshake or Hello, a new one is refused at once (the agent backs off) rather
/// than left to time out half-done; the slot frees as soon as the connection is welcomed.
#[test]
fn connections_past_the_handshake_limit_are_refused_at_once_then_admitted() {
    let fleet = Fleet::new();
    let agg = start_with_ingest(&fleet, "max_concurrent_handshakes = 1\n");
    let (ca, cert, key) = identity(&fleet, "queued");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The first connection completes its handshake and holds the one slot: no Hello yet.
        let first_endpoint = quic_client(&ca, &cert, &key);
        let first = first_endpoint.connect(agg.quic, "flotilla-aggregator").unwrap().await.unwrap();
        // The second is refused before any crypto work.
        let second_endpoint = quic_client(&ca, &cert, &key);
        let refused = second_endpoint.connect(agg.quic, "flotilla-aggregator").unwrap().await;
        assert!(
            matches!(&refused, Err(quinn::ConnectionError::ConnectionClosed(c))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
            "{refused:?}"
        );
        // Welcomed, the first frees the slot, and a new connection gets through.
        let (mut send, mut recv) = first.open_bi().await.unwrap();
        framed::write(&mut send, &hello(1, 1)).await.unwrap();
        let reply: HelloReply = framed::read(&mut recv, 1 << 16).await.unwrap();
        assert!(matches!(reply.reply, Some(hello_reply::Reply::Welcome(_))), "{reply:?}");
        let third = second_endpoint.connect(agg.quic, "flotilla-aggregator").unwrap().await;
        assert!(third.is_ok(), "admitted once the slot is free: {third:?}");
        first.close(0u32.into(), b"done");
    });
    let metrics = e2e::http_get(&agg.api, "/metrics");
    assert!(
        metrics.contains("flotilla_connections_refused_total{stage=\"admission\"} 1"),
        "{metrics}"
    );
}

/// A read that holds its wire bytes and waits for the rest of its decoded-size reservation
/// gives up after 5 s with "retry later" (the agent keeps the batch), releasing what it held,
/// so reads that each hold part of the budget can never wait on each other forever.
#[test]
fn a_batch_that_cannot_reserve_its_decoded_size_is_told_to_retry() {
    let fleet = Fleet::new();
    let agg =
        start_with_ingest(&fleet, "max_frame_bytes = 1048576\nmax_inflight_bytes = 1048576\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_endpoint, conn) = welcomed(&fleet, &agg, "squeezed").await;
        // B: seq 9 and 100 empty samples; its decoded-size bound fits the budget.
        let mut small = vec![0x08, 0x09];
        for _ in 0..100 {
            small.extend_from_slice(&[0x12, 0x00]);
        }
        let bound = common::decoded_size::bound(&small);
        assert!(bound > small.len() && bound < 1 << 20, "{bound}");
        // A: announces exactly what leaves room for B's wire bytes, and stalls mid-payload.
        let hold = (1 << 20) - small.len();
        let (mut stalled, _stalled_recv) = conn.open_bi().await.unwrap();
        stalled.write_all(&u32::try_from(hold).unwrap().to_be_bytes()).await.unwrap();
        stalled.write_all(&[0u8; 16]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut frame = u32::try_from(small.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(&small);
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        let ack = tokio::time::timeout(e2e::WAIT, framed::read::<Ack>(&mut recv, 1 << 16));
        let ack = ack.await.expect("answered, not left waiting on the stalled read").unwrap();
        assert_eq!((ack.seq, ack.retry_after_ms), (9, 1000), "{ack:?}");
        assert!(ack.refused.contains("budget") && ack.refused.contains("retry"), "{}", ack.refused);
        conn.close(0u32.into(), b"done");
    });
    let metrics = e2e::http_get(&agg.api, "/metrics");
    assert!(metrics.contains("flotilla_ingest_refused_total{reason=\"busy\"} 1"), "{metrics}");
}
