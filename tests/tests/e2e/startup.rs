//! Starting up: bad configs, a missing aggregator, and `flotilla up`.

use std::process::Command;

use e2e::{Proc, WAIT, bin, cli, eventually};

#[test]
fn bad_configs_exit_64_and_name_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        "[uplink]\naggregator = \"not-an-address\"\ninterval_secs = 0\n\
         [tls]\nca_cert = \"ca.pem\"\ncert = \"h.pem\"\nkey = \"h.key\"\n\
         [telemetry]\nsample_interval_ms = 1\n[spool]\npath = \"spool\"\n",
    )
    .unwrap();
    let out =
        Command::new(bin("flotilla-agent")).args(["--config"]).arg(&agent_toml).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "uplink.aggregator",
        "\"not-an-address\"",
        "uplink.interval_secs",
        "telemetry.sample_interval_ms",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }

    let agg_toml = dir.path().join("aggregator.toml");
    std::fs::write(&agg_toml, "[listen]\nquic = \"127.0.0.1:0\"\nadmn = \"x\"\n").unwrap();
    let out =
        Command::new(bin("flotilla-aggregator")).arg("--config").arg(&agg_toml).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admn"), "the unknown key is named:\n{err}");

    let out = Command::new(bin("flotilla-agent"))
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

#[test]
fn the_cli_says_clearly_when_the_aggregator_is_unreachable() {
    // A socket bound but not listening holds the port (nobody else can take it) and refuses
    // connections, so the address is unreachable for as long as the test needs it.
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    let any = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, 0);
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&socket), &any).unwrap();
    let bound: nix::sys::socket::SockaddrIn =
        nix::sys::socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&socket)).unwrap();
    let out = cli(&format!("http://127.0.0.1:{}", bound.port()), &["hosts"]);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach"), "{err}");
}

#[test]
fn flotilla_up_runs_a_one_host_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut up = Proc::spawn(
        "flotilla up",
        &bin("flotilla"),
        &[
            "up",
            "--data-dir",
            &data.display().to_string(),
            "--quic",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--inference",
            "127.0.0.1:0",
            "--sample-ms",
            "200",
            "--uplink-secs",
            "1",
        ],
    );
    let line = up.wait_for_log(&["admin API http://"]);
    let api = line[line.find("http://").unwrap()..].split_whitespace().next().unwrap().to_owned();
    let rows = eventually("the local host with samples", WAIT, || {
        let out = cli(&api, &["hosts", "--json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let rows = rows.as_array()?.clone();
        (rows.len() == 1 && rows[0]["samples_total"].as_u64() >= Some(2)).then_some(rows)
    });
    assert_eq!(rows[0]["state"], "online");
    assert!(data.join("tls/ca.pem").exists() && data.join("agent.toml").exists());

    // The demo model answers the request the welcome text shows, on the port it bound.
    let line = up.wait_for_log(&["inference API http://"]);
    let inference =
        line[line.find("http://").unwrap() + 7..].split_whitespace().next().unwrap().to_owned();
    assert!(!inference.ends_with(":0"), "the welcome shows the bound port: {line}");
    let welcome = up.wait_for_log(&["/v2/models/demo/infer"]);
    let body = &welcome[welcome.find('{').unwrap()..welcome.rfind('}').unwrap() + 1];
    let reply = e2e::http_post_json(&inference, "/v2/models/demo/infer", body);
    let probabilities: Vec<f64> = reply["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(reply["outputs"][0]["name"], "probabilities", "{reply}");
    assert_eq!(probabilities.len(), 3);
    assert!((probabilities.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{reply}");
    assert!(up.terminate().success(), "flotilla up did not stop cleanly");
}
