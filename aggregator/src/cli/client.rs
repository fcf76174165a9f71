//! A blocking client for the aggregator's admin HTTP JSON API, used by the `flotilla` CLI.
//!
//! It owns the base URL, the optional bearer token, the timeouts, and the mapping of transport
//! failures and error responses to [`ClientError`]s an operator can act on:
//!
//! - a refused, unresolvable or timed-out connection is [`ClientError::Unreachable`] (the CLI
//!   exits 69 for it);
//! - a non-2xx answer is [`ClientError::Status`], carrying the `{"error": ...}` message of the
//!   body (or the body text when it is not that shape) and the status;
//! - a 2xx answer whose body is not the expected JSON shape is [`ClientError::Decode`].
//!
//! Path segments (host ids, metric names) are percent-encoded here, so callers pass them raw.

use std::io;
use std::time::Duration;

use serde::de::DeserializeOwned;
use ureq::http::{Response, StatusCode};

use crate::views::{ApiError, HostDetail, HostSummary, MetricNames, MetricSeries, RevokeResult};

/// The admin API address the CLI uses when neither `--api` nor `FLOTILLA_API` is given.
pub const DEFAULT_API: &str = "http://127.0.0.1:7070";

/// Longest time to wait for a TCP connection to the admin API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest time one request (connect, send, receive the whole body) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest error body quoted in a [`ClientError::Status`] when it is not `{"error": ...}`.
const MAX_QUOTED_BODY_CHARS: usize = 200;

/// Why a call to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made: nothing listens there, the name does not resolve, or the
    /// connection attempt timed out.
    #[error(
        "cannot reach the aggregator admin API at {api}: {reason}. Is flotilla-aggregator \
         running? Use --api URL or FLOTILLA_API to point elsewhere."
    )]
    Unreachable {
        /// Base URL the CLI tried.
        api: String,
        /// What went wrong, in words ("connection refused").
        reason: String,
    },
    /// The aggregator answered with a non-2xx status.
    #[error("{method} {path}: the aggregator answered {status}: {message}{hint}")]
    Status {
        /// HTTP method of the request.
        method: &'static str,
        /// Request path, e.g. `/api/v1/hosts/gpu-01`.
        path: String,
        /// Status code, e.g. 404.
        code: u16,
        /// Status code and reason, e.g. `404 Not Found`.
        status: String,
        /// The `error` field of the body, or the body text.
        message: String,
        /// What to try next, for statuses that have an obvious next step (401), else empty.
        hint: &'static str,
    },
    /// The request failed after the connection was made (protocol error, read timeout, ...).
    #[error("{method} {url}: request failed")]
    Request {
        /// HTTP method of the request.
        method: &'static str,
        /// Full request URL.
        url: String,
        /// The transport error.
        #[source]
        source: ureq::Error,
    },
    /// A 2xx answer whose body is not the JSON shape this CLI expects.
    #[error(
        "{method} {path}: the answer is not the expected JSON (is {api} a flotilla aggregator \
         of the same version?)"
    )]
    Decode {
        /// HTTP method of the request.
        method: &'static str,
        /// Request path.
        path: String,
        /// Base URL.
        api: String,
        /// The decoding error.
        #[source]
        source: ureq::Error,
    },
}

impl ClientError {
    /// True when the aggregator could not be reached at all (the CLI exits 69, EX_UNAVAILABLE).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    /// The HTTP status code when the aggregator answered with a non-2xx status.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A connection to one aggregator's admin API.
#[derive(Debug)]
pub struct Client {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:7070`.
    api: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    token: Option<String>,
    /// The HTTP agent; keeps the connection alive across the calls of one command.
    agent: ureq::Agent,
}

// === impl Client ===

impl Client {
    /// A client for the admin API at `api` (e.g. `http://127.0.0.1:7070`), sending `token` as a
    /// bearer token when given. Makes no connection yet.
    pub fn new(api: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            // Error bodies carry the message the operator needs; read them ourselves.
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Self { api: api.trim_end_matches('/').to_owned(), token, agent }
    }

    /// The base URL this client talks to, without a trailing slash.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// `GET /api/v1/hosts`: every known host.
    pub fn hosts(&self) -> Result<Vec<HostSummary>, ClientError> {
        self.get("/api/v1/hosts".to_owned(), &[])
    }

    /// `GET /api/v1/hosts/{host}`: one host's inventory and latest sample.
    pub fn host(&self, host: &str) -> Result<HostDetail, ClientError> {
        self.get(format!("/api/v1/hosts/{}", encode_segment(host)), &[])
    }

    /// `GET /api/v1/hosts/{host}/metrics/{metric}`: the series over the last `since_secs`, at
    /// `resolution` (`raw`, `minute`, `hour`) or the server's choice when `None`.
    pub fn metric(
        &self,
        host: &str,
        metric: &str,
        since_secs: u64,
        resolution: Option<&str>,
    ) -> Result<MetricSeries, ClientError> {
        let path =
            format!("/api/v1/hosts/{}/metrics/{}", encode_segment(host), encode_segment(metric));
        let since = since_secs.to_string();
        let mut query = vec![("since_secs", since.as_str())];
        if let Some(resolution) = resolution {
            query.push(("resolution", resolution));
        }
        self.get(path, &query)
    }

    /// `GET /api/v1/hosts/{host}/metric-names`: the series the host's latest sample has.
    pub fn metric_names(&self, host: &str) -> Result<MetricNames, ClientError> {
        self.get(format!("/api/v1/hosts/{}/metric-names", encode_segment(host)), &[])
    }

    /// `POST /api/v1/hosts/{host}/revoke`: refuse the host's current certificates and close its
    /// connection.
    pub fn revoke(&self, host: &str) -> Result<RevokeResult, ClientError> {
        let path = format!("/api/v1/hosts/{}/revoke", encode_segment(host));
        let url = self.url(&path);
        let request = self.authorize(self.agent.post(&url));
        let response = request.send_empty();
        self.finish("POST", path, url, response)
    }

    /// `DELETE /api/v1/hosts/{host}/revoke`: lift a revocation.
    pub fn unrevoke(&self, host: &str) -> Result<RevokeResult, ClientError> {
        let path = format!("/api/v1/hosts/{}/revoke", encode_segment(host));
        let url = self.url(&path);
        let request = self.authorize(self.agent.delete(&url));
        let response = request.call();
        self.finish("DELETE", path, url, response)
    }

    /// `GET path` with a query, decoded as `T` (the analytics routes use this).
    pub fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        self.get(path.to_owned(), query)
    }

    /// `GET /api/v1/forecasts/{target}` (`metric` picks a host's series).
    pub fn forecast(
        &self,
        target: &str,
        metric: Option<&str>,
    ) -> Result<crate::analytics::ForecastView, ClientError> {
        let path = format!("/api/v1/forecasts/{}", encode_segment(target));
        let query: Vec<(&str, &str)> = metric.map(|m| ("metric", m)).into_iter().collect();
        self.get(path, &query)
    }

    /// `POST path` with a JSON body (or none), decoded as `T`.
    pub fn post_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let request = self.authorize(self.agent.post(&url));
        let response = match body {
            Some(b) => request.send_json(b),
            None => request.send_empty(),
        };
        self.finish("POST", path.to_owned(), url, response)
    }

    /// `DELETE /api/v1/budgets/{name}`.
    pub fn delete_budget(
        &self,
        name: &str,
    ) -> Result<Vec<crate::analytics::budgets::Budget>, ClientError> {
        let path = format!("/api/v1/budgets/{}", encode_segment(name));
        let url = self.url(&path);
        let response = self.authorize(self.agent.delete(&url)).call();
        self.finish("DELETE", path, url, response)
    }

    // --- helpers ---

    fn get<T: DeserializeOwned>(
        &self,
        path: String,
        query: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        let url = self.url(&path);
        let mut request = self.authorize(self.agent.get(&url));
        for (key, value) in query {
            request = request.query(*key, *value);
        }
        let response = request.call();
        self.finish("GET", path, url, response)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// Turns a transport result into the decoded body or a [`ClientError`].
    fn finish<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: String,
        url: String,
        response: Result<Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = match response {
            Ok(response) => response,
            Err(source) => return Err(self.transport_error(method, url, source)),
        };
        let status = response.status();
        if !status.is_success() {
            let body = response.body_mut().read_to_string().unwrap_or_default();
            return Err(ClientError::Status {
                method,
                path,
                code: status.as_u16(),
                status: status_text(status),
                message: error_message(&body),
                hint: status_hint(status),
            });
        }
        response.body_mut().read_json::<T>().map_err(|source| ClientError::Decode {
            method,
            path,
            api: self.api.clone(),
            source,
        })
    }

    /// Classifies a transport error: "could not connect at all" versus everything else.
    fn transport_error(
        &self,
        method: &'static str,
        url: String,
        source: ureq::Error,
    ) -> ClientError {
        match unreachable_reason(&source) {
            Some(reason) => ClientError::Unreachable { api: self.api.clone(), reason },
            None => ClientError::Request { method, url, source },
        }
    }
}

/// The reason to show when `error` means no connection could be made, else `None`.
fn unreachable_reason(error: &ureq::Error) -> Option<String> {
    match error {
        ureq::Error::Io(io) => match io.kind() {
            io::ErrorKind::ConnectionRefused => Some("connection refused".to_owned()),
            io::ErrorKind::TimedOut => Some("connection timed out".to_owned()),
            io::ErrorKind::HostUnreachable => Some("host unreachable".to_owned()),
            io::ErrorKind::NetworkUnreachable => Some("network unreachable".to_owned()),
            io::ErrorKind::AddrNotAvailable => Some("address not available".to_owned()),
            io::ErrorKind::NotFound => Some("host name not found".to_owned()),
            _ => None,
        },
        ureq::Error::HostNotFound => Some("host name not found".to_owned()),
        ureq::Error::ConnectionFailed => Some("connection failed".to_owned()),
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
            Some("connection timed out".to_owned())
        }
        ureq::Error::BadUri(uri) => Some(format!("not a usable URL ({uri})")),
        ureq::Error::Tls(_) | ureq::Error::TlsRequired => {
            Some("this flotilla build speaks plain HTTP only; use an http:// URL".to_owned())
        }
        _ => None,
    }
}

/// `404 Not Found`, or just `599` for codes without a canonical reason.
fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// What to try next for statuses with an obvious next step.
fn status_hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            " (pass the admin token with --token or FLOTILLA_TOKEN)"
        }
        _ => "",
    }
}

/// The `error` field of an `{"error": ...}` body; otherwise the body text, shortened.
fn error_message(body: &str) -> String {
    if let Ok(api) = serde_json::from_str::<ApiError>(body) {
        return api.error;
    }
    let body = body.trim();
    if body.is_empty() {
        return "(no message)".to_owned();
    }
    let mut quoted: String = body.chars().take(MAX_QUOTED_BODY_CHARS).collect();
    if body.chars().count() > MAX_QUOTED_BODY_CHARS {
        quoted.push('…');
    }
    quoted
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for one path segment.
pub(crate) fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A loopback address where nothing listens (bound, then released).
    fn closed_port_api() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("http://127.0.0.1:{port}")
    }

    /// Serves one canned HTTP response on a loopback port, returning the base URL and a handle
    /// that yields the request head it received.
    fn serve_once(response: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut buf = [0_u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            stream.write_all(response.as_bytes()).unwrap();
            String::from_utf8_lossy(&head).into_owned()
        });
        (api, handle)
    }

    #[test]
    fn unreachable_api_says_so() {
        let api = closed_port_api();
        let err = Client::new(&api, None).hosts().unwrap_err();
        assert!(err.is_unreachable(), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("cannot reach"), "{message}");
        assert!(message.contains(&api), "{message}");
        assert!(message.contains("connection refused"), "{message}");
        assert!(message.contains("--api URL or FLOTILLA_API"), "{message}");
    }

    #[test]
    fn error_body_message_and_status_are_reported() {
        let (api, server) = serve_once(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 33\r\n\
             connection: close\r\n\r\n{\"error\": \"unknown host gpu-09\"}\n",
        );
        let client = Client::new(&format!("{api}/"), Some("s3cret".to_owned()));
        let err = client.host("gpu-09").unwrap_err();
        let head = server.join().unwrap();
        assert!(head.starts_with("GET /api/v1/hosts/gpu-09 HTTP/1.1\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("authorization: bearer s3cret\r\n"), "{head}");
        assert!(!err.is_unreachable());
        assert_eq!(
            err.to_string(),
            "GET /api/v1/hosts/gpu-09: the aggregator answered 404 Not Found: unknown host gpu-09"
        );
    }

    #[test]
    fn unauthorized_hints_at_the_token() {
        let (api, server) = serve_once(
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        let err = Client::new(&api, None).hosts().unwrap_err();
        server.join().unwrap();
        let message = err.to_string();
        assert!(message.contains("401 Unauthorized: (no message)"), "{message}");
        assert!(message.contains("--token or FLOTILLA_TOKEN"), "{message}");
    }

    #[test]
    fn metric_query_and_json_decoding() {
        let body = r#"{"host":"a b","metric":"cpu_util_pct","resolution":"minute","points":[{"unix_ms":60000,"value":1.5,"min":1.0,"max":2.0,"count":60}]}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (api, server) = serve_once(response);
        let series = Client::new(&api, None).metric("a b", "cpu_util_pct", 3600, Some("minute"));
        let head = server.join().unwrap();
        assert!(
            head.starts_with(
                "GET /api/v1/hosts/a%20b/metrics/cpu_util_pct?since_secs=3600&resolution=minute "
            ),
            "{head}"
        );
        let series = series.unwrap();
        assert_eq!(series.points.len(), 1);
        assert_eq!(series.points[0].count, 60);
    }

    #[test]
    fn non_json_error_bodies_are_quoted_and_shortened() {
        assert_eq!(error_message(r#"{"error":"nope"}"#), "nope");
        assert_eq!(error_message("  \n"), "(no message)");
        assert_eq!(error_message("Bad Gateway\n"), "Bad Gateway");
        let long = "x".repeat(500);
        assert_eq!(error_message(&long).chars().count(), MAX_QUOTED_BODY_CHARS + 1);
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("gpu-01.example_~"), "gpu-01.example_~");
        assert_eq!(encode_segment("a/b c?"), "a%2Fb%20c%3F");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }
}
