//! Who may connect: only holders of unexpired, unrevoked certificates from the fleet CA.

use common::ids::HostId;
use common::proto::{Hello, HelloReply};
use common::tls::Ca;
use e2e::{Aggregator, Fleet, WAIT, agent, eventually, quic_client};
use time::{Duration, OffsetDateTime};

/// Connects with the given identity and tries a Hello; returns the error the client saw.
async fn try_hello(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    addr: std::net::SocketAddr,
) -> String {
    let endpoint = quic_client(ca_pem, cert_pem, key_pem);
    let attempt = async {
        let conn = endpoint
            .connect(addr, "flotilla-aggregator")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        common::framed::write(
            &mut send,
            &Hello { min_version: 1, max_version: 1, ..Hello::default() },
        )
        .await
        // The whole chain: a refusal that lands mid-write hides its alert behind "writing frame".
        .map_err(|e| common::daemon::error_chain(&e))?;
        let reply: HelloReply =
            common::framed::read(&mut recv, 1 << 20).await.map_err(|e| format!("{e:?}"))?;
        Ok::<_, String>(reply)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(20), attempt).await {
        Ok(Ok(reply)) => panic!("connection was accepted: {reply:?}"),
        Ok(Err(e)) => e,
        Err(_) => panic!("no refusal within 20 s"),
    }
}

#[test]
fn foreign_expired_and_revoked_certificates_are_refused_at_the_handshake() {
    let fleet = Fleet::new();
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let ca_pem = std::fs::read_to_string(fleet.path().join("tls/ca.pem")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // A certificate from another CA.
    let (stranger_ca, _) = Ca::generate("Some other fleet", 10).unwrap();
    let pair = stranger_ca.issue_host(&HostId::new("stranger").unwrap(), 10).unwrap();
    let seen = rt.block_on(try_hello(&ca_pem, &pair.cert_pem, &pair.key_pem, agg.quic));
    assert!(
        seen.to_lowercase().contains("unknown") || seen.contains("alert"),
        "client saw: {seen}"
    );
    agg.proc.wait_for_log(&["Refused connection: TLS handshake failed", "UnknownIssuer"]);

    // An expired certificate from the right CA.
    let now = OffsetDateTime::now_utc();
    let pair = fleet
        .ca()
        .issue_host_between(
            &HostId::new("old-host").unwrap(),
            now - Duration::days(10),
            now - Duration::days(1),
        )
        .unwrap();
    rt.block_on(try_hello(&ca_pem, &pair.cert_pem, &pair.key_pem, agg.quic));
    agg.proc.wait_for_log(&["Refused connection: TLS handshake failed", "expired"]);

    // A revoked host: connected first, then cut off and refused on every retry.
    fleet.issue("rev-1");
    let rev_agent = agent("rev-1", &fleet.agent_config("rev-1", agg.quic, 200));
    eventually("rev-1 online", WAIT, || {
        let rows = agg.cli_json(&["hosts"]).ok()?;
        rows.as_array()?
            .iter()
            .any(|r| r["host"] == "rev-1" && r["state"] == "online")
            .then_some(())
    });
    let out = agg.cli(&["hosts", "revoke", "rev-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("rev-1"), "{said}");
    agg.proc.wait_for_log(&["Refused connection: TLS handshake failed", "Revoked"]);
    let seen = rev_agent.wait_for_log(&["refused this host's certificate"]);
    assert!(seen.contains("ERROR") && seen.to_lowercase().contains("revoked"), "{seen}");
    let rows = agg.cli_json(&["hosts"]).unwrap();
    let row = rows.as_array().unwrap().iter().find(|r| r["host"] == "rev-1").unwrap().clone();
    assert_eq!(row["state"], "revoked", "{row}");
    // The revocation is durable: the CLI lists it after the fact, and nothing else was refused.
    let refused = agg.proc.logs().iter().filter(|l| l.contains("TLS handshake failed")).count();
    assert!(refused >= 3, "expected the three refusals in the log");
}
