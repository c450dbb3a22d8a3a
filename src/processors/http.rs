//! `http`: call a URL with the message value as the body. 2xx completes the step; 5xx, 408, 429,
//! timeouts and connection errors are retryable; any other status (a 4xx) is permanent and the
//! message goes to the dead-letter topic. Secrets come from the environment through `${VAR}`
//! (resolved when the file is loaded). An optional circuit breaker pauses the pipeline during
//! an outage instead of burning retries.
//!
//! ```toml
//! [[processors]]
//! type = "http"
//! url = "https://mail.internal/welcome"
//! method = "POST"                          # default POST
//! headers = { Authorization = "Bearer ${MAIL_TOKEN}", "Content-Type" = "application/json" }
//! timeout = "5s"                           # default 10s
//! circuit_breaker = { failures = 5, cool_down = "30s" }
//! ```
//!
//! The message key and offset go along as `x-keyflow-key` and `x-keyflow-offset`, so the
//! downstream can deduplicate (delivery is at-least-once). A valid W3C `traceparent` header on
//! the message is continued as the request's `traceparent` (same trace id, new span id).
//!
//! With a pipeline `[batch]` table and `batch = true` (the downstream takes batches), one
//! request carries a whole batch: its body is the JSON array of the messages' values, with
//! `x-keyflow-count`; the answer is classified as above for the batch as a whole.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::batch::BatchProcessor;
use super::breaker::{Breaker, BreakerConfig};
use super::{Flow, ProcessError, Processor};
use crate::config::HumanDuration;
use crate::gate::Gate;
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    #[serde(default)]
    pub circuit_breaker: Option<BreakerConfig>,
    /// With `[batch]`: send a batch as one request whose body is a JSON array of the
    /// messages' values (each parsed as JSON; see [`Http::call_batch`]).
    #[serde(default)]
    pub batch: bool,
}

fn default_method() -> String {
    "POST".into()
}

fn default_timeout() -> HumanDuration {
    "10s".parse().expect("a valid duration")
}

impl HttpConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => v.push((
                "url".into(),
                format!(
                    "expected an http or https URL, found scheme {:?}",
                    u.scheme()
                ),
            )),
            // The value is not echoed: it may carry a secret (a token in the userinfo, the
            // path or the query, often from `${VAR}`).
            Err(e) => v.push(("url".into(), format!("not a URL: {e}"))),
        }
        if reqwest::Method::from_bytes(self.method.to_ascii_uppercase().as_bytes()).is_err() {
            v.push((
                "method".into(),
                format!("{:?} is not an HTTP method", self.method),
            ));
        }
        for (k, val) in &self.headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(val).is_err()
            {
                v.push((format!("headers.{k}"), "not a valid HTTP header".into()));
            }
        }
        if self.timeout.get().is_zero() {
            v.push(("timeout".into(), "expected a duration above 0".into()));
        }
        if let Some(b) = &self.circuit_breaker {
            v.extend(b.validate());
        }
        v
    }
}

pub struct Http {
    client: reqwest::Client,
    url: reqwest::Url,
    /// `METHOD scheme://host:port/…`: the call as logs, errors (and so the `keyflow.error`
    /// header of dead letters) and the breaker's name show it. See [`redacted`].
    target: String,
    method: reqwest::Method,
    headers: reqwest::header::HeaderMap,
    breaker: Option<Breaker>,
    /// `batch = true`: takes batches ([`Http::call_batch`]).
    batch: bool,
}

/// Idle connections kept per downstream host, and for how long.
const IDLE_CONNECTIONS_PER_HOST: usize = 16;
const IDLE_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Http {
    pub fn new(cfg: &HttpConfig, gate: &Arc<Gate>, pipeline: &str) -> Result<Self, String> {
        // Idle connections are capped: after a catch-up on every partition the pool kept up to
        // ~150 sockets and 4 MiB for 100 keys (heaptrack, soak), for 90 s, with no bound per
        // host. Busy connections are not limited by this (concurrency is `max_workers`).
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout.get())
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST)
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("header {k:?}: {e}"))?;
            let val = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| format!("header {k:?}: {e}"))?;
            headers.insert(name, val);
        }
        if !headers.contains_key(reqwest::header::CONTENT_TYPE) {
            headers.insert(
                reqwest::header::CONTENT_TYPE,
                reqwest::header::HeaderValue::from_static("application/json"),
            );
        }
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| format!("url: {e}"))?;
        let method = reqwest::Method::from_bytes(cfg.method.to_ascii_uppercase().as_bytes())
            .map_err(|e| format!("method: {e}"))?;
        let shown = redacted(&url);
        Ok(Http {
            client,
            target: format!("{method} {shown}"),
            url,
            method,
            headers,
            breaker: cfg
                .circuit_breaker
                .map(|b| Breaker::new(b, format!("{pipeline}/http {shown}"), gate.clone())),
            batch: cfg.batch,
        })
    }

    /// `batch = true`: one request whose body is the JSON array of the messages' values, in
    /// batch order (a value that is not JSON fails the batch permanently, so the split leaves
    /// it alone in the dead-letter topic); `x-keyflow-count` says how many. The answer is
    /// classified as for one message: a 2xx completes every message, a 5xx/408/429 or a
    /// connection error is retried, any other status splits the batch.
    pub async fn call_batch(&self, msgs: &[&Message]) -> Result<(), ProcessError> {
        let mut body = Vec::with_capacity(2 + msgs.iter().map(|m| m.size() + 1).sum::<usize>());
        body.push(b'[');
        for (i, m) in msgs.iter().enumerate() {
            let v = m.payload.as_deref().unwrap_or(b"null");
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(v) {
                return Err(ProcessError::permanent(
                    "http",
                    format!("offset {}: the value is not JSON ({e}); batch = true sends a JSON array of the values", m.offset),
                ));
            }
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(v);
        }
        body.push(b']');
        let req = self
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone())
            .header("x-keyflow-count", msgs.len())
            .body(body);
        self.answer(req).await
    }

    async fn call(&self, msg: &Message) -> Result<(), ProcessError> {
        let mut req = self
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone())
            .header("x-keyflow-offset", msg.offset);
        if let Some(k) = msg.key.as_deref() {
            if let Ok(v) = reqwest::header::HeaderValue::from_bytes(k) {
                req = req.header("x-keyflow-key", v);
            }
        }
        if let Some(tp) = msg
            .headers
            .as_deref()
            .and_then(crate::trace::traceparent)
            .and_then(crate::trace::continued)
        {
            if let Ok(v) = reqwest::header::HeaderValue::from_bytes(&tp) {
                req = req.header(crate::trace::TRACEPARENT, v);
            }
        }
        if let Some(p) = &msg.payload {
            req = req.body(p.clone());
        }
        self.answer(req).await
    }

    /// Sends `req` and classifies the answer.
    async fn answer(&self, req: reqwest::RequestBuilder) -> Result<(), ProcessError> {
        let resp = req.send().await.map_err(|e| {
            // Timeouts, refused connections, resets: the downstream may come back.
            ProcessError::retryable("http", format!("{}: {}", self.target, describe(e)))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = format!("{} answered {status}", self.target);
        if status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            Err(ProcessError::retryable("http", text))
        } else {
            Err(ProcessError::permanent("http", text))
        }
    }
}

/// The URL as keyflow shows it: `scheme://host[:port]/…`. Webhook URLs carry their secret in
/// the userinfo (`https://user:token@…`), the query (`?token=…`, `?key=…&token=…`) or the path:
/// Slack (`/services/T…/B…/<token>`), Discord (`/api/webhooks/<id>/<token>`) and others put it
/// in a path segment that nothing tells apart from a route segment. So all three are left out,
/// `/…` standing for any path or query; the host and port name the downstream, and the
/// pipeline name beside it tells two downstreams on one host apart in logs.
fn redacted(url: &reqwest::Url) -> String {
    let mut s = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        s.push_str(&format!(":{port}"));
    }
    s.push_str(if url.path() == "/" && url.query().is_none() {
        "/"
    } else {
        "/…"
    });
    s
}

/// A request error without its URL (reqwest's message names the full URL, secrets and all),
/// with its causes (`error sending request: … connection refused`), which do not.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[async_trait]
impl Processor for Http {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        match &self.breaker {
            Some(b) => b.call("http", self.call(msg)).await?,
            None => self.call(msg).await?,
        }
        Ok(Flow::Continue)
    }

    fn as_batch(&self) -> Option<&dyn BatchProcessor> {
        self.batch.then_some(self as &dyn BatchProcessor)
    }
}

#[async_trait]
impl BatchProcessor for Http {
    async fn process_batch(&self, msgs: &[&Message]) -> Result<Vec<Flow>, ProcessError> {
        match &self.breaker {
            Some(b) => b.call("http", self.call_batch(msgs)).await?,
            None => self.call_batch(msgs).await?,
        }
        Ok(vec![Flow::Continue; msgs.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{extract::Path, http::StatusCode, routing::post, Router};

    async fn server() -> std::net::SocketAddr {
        async fn status(Path(code): Path<u16>) -> StatusCode {
            if code == 1 {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                return StatusCode::OK;
            }
            StatusCode::from_u16(code).unwrap()
        }
        let app = Router::new().route("/{code}", post(status));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn sends_a_continued_traceparent() {
        use rdkafka::message::{Header, OwnedHeaders};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
        let app = Router::new().route(
            "/",
            post(move |h: axum::http::HeaderMap| async move {
                let _ = tx.send(
                    h.get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                );
                StatusCode::OK
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let cfg: HttpConfig = toml::from_str(&format!("url = \"http://{addr}/\"")).unwrap();
        let h = Http::new(&cfg, &Arc::new(Gate::default()), "p").unwrap();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut m = Message::new("t", 0, 0, Some(b"k"), b"{}");
        m.set_headers(OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some(tp),
        }));
        assert_eq!(h.process(&mut m).await.unwrap(), Flow::Continue);
        let got = rx.recv().await.unwrap().expect("a traceparent header");
        assert_eq!(
            crate::trace::trace_id(got.as_bytes()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            "{got}"
        );
        assert_ne!(got, tp, "a new span id");
        assert!(got.ends_with("-01"));
        // Without a traceparent none is invented.
        h.process(&mut Message::new("t", 0, 1, None, b"{}"))
            .await
            .unwrap();
        assert_eq!(rx.recv().await.unwrap(), None);
    }

    #[tokio::test]
    async fn classifies_statuses_and_timeouts() {
        let addr = server().await;
        let gate = Arc::new(Gate::default());
        let call = |code: u16| {
            let cfg: HttpConfig = toml::from_str(&format!(
                "url = \"http://{addr}/{code}\"\ntimeout = \"300ms\"\nheaders = {{ Authorization = \"Bearer t\" }}"
            ))
            .unwrap();
            assert!(cfg.validate().is_empty());
            let h = Http::new(&cfg, &gate, "p").unwrap();
            async move {
                h.process(&mut Message::new("t", 0, 0, Some(b"k"), b"{}"))
                    .await
            }
        };
        assert_eq!(call(200).await.unwrap(), Flow::Continue);
        for (code, retryable) in [
            (503, true),
            (500, true),
            (429, true),
            (404, false),
            (400, false),
        ] {
            let e = call(code).await.unwrap_err();
            assert_eq!(e.is_retryable(), retryable, "{code}: {e}");
            assert_eq!(e.kind(), "http");
        }
        assert!(
            call(1).await.unwrap_err().is_retryable(),
            "a timeout is retryable"
        );
    }

    #[tokio::test]
    async fn a_batch_is_one_json_array() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let app = Router::new().route(
            "/",
            post(move |h: axum::http::HeaderMap, body: String| async move {
                let n = h
                    .get("x-keyflow-count")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send((n, body));
                StatusCode::OK
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let cfg: HttpConfig =
            toml::from_str(&format!("url = \"http://{addr}/\"\nbatch = true")).unwrap();
        let h = Http::new(&cfg, &Arc::new(Gate::default()), "p").unwrap();
        let a = Message::new("t", 0, 0, Some(b"a"), br#"{"n": 1}"#);
        let b = Message::new("t", 0, 1, Some(b"b"), b"2");
        let bp = h.as_batch().expect("batch = true takes batches");
        assert_eq!(
            bp.process_batch(&[&a, &b]).await.unwrap(),
            vec![Flow::Continue; 2]
        );
        let (n, body) = rx.recv().await.unwrap();
        assert_eq!((n.as_str(), body.as_str()), ("2", r#"[{"n": 1},2]"#));
        let bad = Message::new("t", 0, 2, Some(b"c"), b"not json");
        let e = bp.process_batch(&[&a, &bad]).await.unwrap_err();
        assert!(!e.is_retryable() && e.message().contains("offset 2"), "{e}");
        let plain: HttpConfig = toml::from_str(&format!("url = \"http://{addr}/\"")).unwrap();
        let plain = Http::new(&plain, &Arc::new(Gate::default()), "p").unwrap();
        assert!(plain.as_batch().is_none());
    }

    #[test]
    fn redacted_urls() {
        for (url, shown) in [
            ("https://mail.internal/welcome", "https://mail.internal/…"),
            (
                "http://u:p@10.0.0.1:8080/?token=t",
                "http://10.0.0.1:8080/…",
            ),
            (
                "https://hooks.slack.com/services/T0/B0/XyZ",
                "https://hooks.slack.com/…",
            ),
            ("http://[::1]:9000/", "http://[::1]:9000/"),
            ("https://example.com", "https://example.com/"),
        ] {
            assert_eq!(redacted(&reqwest::Url::parse(url).unwrap()), shown, "{url}");
        }
    }

    /// Collects what `tracing` writes while it is the thread's default subscriber.
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn secrets_in_the_url_reach_neither_errors_nor_logs() {
        // Answers 503 to a request that carries the URL's credentials and query (so they are
        // still sent), 400 to one that does not.
        let app = Router::new().route(
            "/h",
            post(
                |h: axum::http::HeaderMap, q: axum::extract::RawQuery| async move {
                    let auth = h.get("authorization").and_then(|v| v.to_str().ok());
                    if auth.is_some_and(|a| a.starts_with("Basic "))
                        && q.0.as_deref() == Some("token=s3cret")
                    {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::BAD_REQUEST
                    }
                },
            ),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        // A port nothing listens on: a connection error.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };

        let logs = Logs::default();
        let w = logs.clone();
        let _sub = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || w.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish(),
        );
        let gate = Arc::new(Gate::default());
        let mut errors = Vec::new();
        for a in [addr, closed] {
            let cfg: HttpConfig = toml::from_str(&format!(
                "url = \"http://u:s3cret@{a}/h?token=s3cret\"\ncircuit_breaker = {{ failures = 1, cool_down = \"10s\" }}"
            ))
            .unwrap();
            assert!(cfg.validate().is_empty());
            let h = Http::new(&cfg, &gate, "p").unwrap();
            let e = h
                .process(&mut Message::new("t", 0, 0, Some(b"k"), b"{}"))
                .await
                .unwrap_err();
            assert!(e.is_retryable(), "{e}");
            // The breaker opened on that failure (and logged its name).
            assert!(h.breaker.as_ref().is_some_and(Breaker::is_open));
            errors.push(e.to_string());
        }
        assert!(
            errors[0].ends_with("answered 503 Service Unavailable"),
            "{errors:?}"
        );
        println!("errors: {errors:?}");
        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("circuit open"), "{logs}");
        for text in errors.iter().chain([&logs]) {
            // What is written into `keyflow.error` and logged.
            assert!(!text.contains("s3cret"), "a secret leaked: {text}");
            assert!(!text.contains("token="), "a secret leaked: {text}");
        }
        assert!(
            errors[0].contains(&format!("POST http://{addr}/")),
            "the host stays: {errors:?}"
        );
        assert!(
            errors[1].contains(&format!("POST http://{closed}/")),
            "the host stays: {errors:?}"
        );
    }
}
