//! The admin API's edges: the bearer token, its file checked at start, plain HTTP kept on
//! loopback, and errors that are always JSON.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;

use e2e::{Aggregator, Fleet};

/// A raw HTTP/1.1 exchange, so the test sees exactly what any client would.
fn http(api: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let addr = api.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn token_is_required_when_configured_and_errors_are_json() {
    let fleet = Fleet::new();
    let token_file = fleet.path().join("admin.token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = fleet.aggregator_config(0);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "admin = \"127.0.0.1:0\"",
        "admin = \"127.0.0.1:0\"\nadmin_token_file = \"admin.token\"",
    );
    std::fs::write(&config, text).unwrap();
    let agg = Aggregator::start(&config);

    let (status, body) = http(&agg.api, "GET", "/api/v1/hosts", None);
    assert_eq!(status, 401);
    assert!(body.contains("\"error\"") && body.contains("bearer token"), "{body}");
    let (status, _) = http(&agg.api, "GET", "/metrics", Some("wrong"));
    assert_eq!(status, 401, "/metrics is protected too");
    let (status, body) = http(&agg.api, "GET", "/api/v1/hosts", Some("s3cret-token"));
    assert_eq!((status, body.as_str()), (200, "[]"));

    let denied = agg.cli(&["hosts"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("token"));
    let allowed = agg.cli(&["--token", "s3cret-token", "hosts", "--json"]);
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));

    // Bad input gets JSON errors with the right status, never plain text or an empty body.
    let t = Some("s3cret-token");
    for (method, path, want) in [
        ("GET", "/api/v1/hosts/BAD%20HOST", 400),
        ("GET", "/api/v1/hosts/%FF", 400),
        ("GET", "/api/v1/hosts/nobody", 404),
        ("GET", "/api/v1/hosts/nobody/metrics/cpu_util_pct?resolution=weekly", 400),
        ("DELETE", "/api/v1/hosts", 405),
        ("GET", "/no/such/route", 404),
    ] {
        let (status, body) = http(&agg.api, method, path, t);
        assert_eq!(status, want, "{method} {path}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {body:?}"));
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{method} {path}: {body}");
    }
}

/// Regression (issue 8, hole 9): an empty or group/world-readable token file, or an admin address
/// off loopback (plain HTTP would carry the token in cleartext), stops the aggregator at start
/// with exit 64 and a message naming the key and the fix.
#[test]
fn unsafe_admin_settings_are_refused_at_start() {
    let fleet = Fleet::new();
    let token_file = fleet.path().join("admin.token");
    let config = fleet.aggregator_config(0);
    let base = std::fs::read_to_string(&config).unwrap();
    let with_token = base.replace(
        "admin = \"127.0.0.1:0\"",
        "admin = \"127.0.0.1:0\"\nadmin_token_file = \"admin.token\"",
    );
    let cases = [
        (with_token.as_str(), "", 0o600, "is empty"),
        (with_token.as_str(), "s3cret\n", 0o644, "chmod 600"),
        (
            &*base.replace("admin = \"127.0.0.1:0\"", "admin = \"0.0.0.0:0\""),
            "s3cret\n",
            0o600,
            "listen.admin: must be a loopback address",
        ),
    ];
    for (text, token, mode, needle) in cases {
        std::fs::write(&config, text).unwrap();
        std::fs::write(&token_file, token).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(mode)).unwrap();
        for command in [
            &["--config", config.to_str().unwrap()][..],
            &["--config", config.to_str().unwrap(), "check-config"],
        ] {
            let out = std::process::Command::new(e2e::bin("flotilla-aggregator"))
                .args(command)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{needle}: {stderr}");
            assert!(stderr.contains(needle), "{needle}: {stderr}");
        }
    }
}
