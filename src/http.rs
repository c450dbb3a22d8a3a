//! The HTTP endpoint (`[http] address`, default `0.0.0.0:9464`):
//!
//! - `/metrics`: Prometheus text format.
//! - `/health/live`: 200 while every pipeline's poll loop turns (or waits in a revoke
//!   rendezvous, until its deadline, or has not started yet because an earlier pipeline is still
//!   waiting for its brokers) and the actors answer.
//! - `/health/ready`: 200 once every pipeline has joined its group, reaches its brokers and no
//!   partition is stuck; 503 otherwise, with the reasons in the JSON body (during the startup
//!   wait: "starting: waiting for its brokers…").
//!
//! The binary serves it from before the startup wait (`startup_timeout`), so probes are
//! answered while keyflow waits for its brokers.
//! - `/debug/partitions`: JSON, see [`crate::introspect`].
//! - `/debug/state`: per-key state per partition (keys, bytes, last update; no values).
//!
//! It runs on the same tokio runtime as the actors, off the hot path: scrapes read atomics and
//! ask each partition supervisor once (`/debug` only).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::actors::partition::PartitionMsg;
use crate::introspect::{DebugReport, PartitionDebug, PipelineDebug};
use crate::stats::PipelineStats;

/// A poll loop that has not turned for this long is not alive (it turns every 100 ms).
const POLL_STALE: Duration = Duration::from_secs(10);
/// How long `/debug/partitions` waits for a supervisor (a blocked one is reported as such).
const INSPECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct HttpState {
    pub prometheus: crate::metrics::MetricsHandle,
    pub pipelines: Vec<Arc<PipelineStats>>,
}

/// Binds `address` and serves until the returned task is aborted.
pub async fn serve(
    address: &str,
    state: HttpState,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/debug/partitions", get(debug_partitions))
        .route("/debug/state", get(debug_state))
        .with_state(state.clone());
    // The ready gauge between scrapes (histogram upkeep runs in `metrics::install`).
    let upkeep = state.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            t.tick().await;
            let _ = readiness(&upkeep.pipelines);
        }
    });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    tracing::info!(address = %local, "http endpoint serving /metrics /health/live /health/ready /debug/partitions");
    Ok((local, task))
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let _ = readiness(&s.pipelines);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
        .into_response()
}

#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    reasons: Vec<String>,
}

fn reply(reasons: Vec<String>, ok: &'static str, bad: &'static str) -> Response {
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let status = if reasons.is_empty() { ok } else { bad };
    (code, Json(Health { status, reasons })).into_response()
}

async fn live(State(s): State<HttpState>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let mut reasons = Vec::new();
    for p in &s.pipelines {
        match (p.since_poll_ms(), p.rendezvous_left_ms()) {
            // Queued behind an earlier pipeline's startup wait: the runtime turns (this answer
            // proves it), and readiness says what it waits for.
            (None, _) if p.starting.load(Relaxed) => {}
            (None, _) => reasons.push(format!("pipeline {}: poll loop not started", p.name)),
            // Waiting in a revoke rendezvous (a clean drain) is alive until its deadline.
            (Some(ms), None) if Duration::from_millis(ms) > POLL_STALE => {
                reasons.push(format!("pipeline {}: poll loop silent for {ms} ms", p.name))
            }
            (Some(_), _) => {}
        }
        // The actors answer: a supervisor whose mailbox is dead cannot be asked.
        for (partition, ps) in p.partitions() {
            if let Some(a) = ps.actor.get() {
                if matches!(a.get_status(), ractor::ActorStatus::Stopped) {
                    reasons.push(format!(
                        "pipeline {}: partition {partition} actor stopped",
                        p.name
                    ));
                }
            }
        }
    }
    reply(reasons, "live", "dead")
}

/// Why this instance is not ready (empty: ready). Also sets the `keyflow_ready` gauge.
pub fn readiness(pipelines: &[Arc<PipelineStats>]) -> Vec<String> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut reasons = Vec::new();
    for p in pipelines {
        if p.starting.load(Relaxed) {
            // Served from the start: a probe during the startup wait learns why, rather than
            // being refused a connection.
            let cause = p
                .client_error()
                .map(|e| format!(" (last error: {})", e.reason))
                .unwrap_or_default();
            reasons.push(format!(
                "pipeline {}: starting: waiting for its brokers to answer (up to its \
                 startup_timeout){cause}",
                p.name
            ));
            continue;
        }
        if let Some(down) = p.brokers_unreachable_for() {
            let cause = p.client_error().map(|e| e.reason).unwrap_or_default();
            reasons.push(format!(
                "pipeline {}: brokers unreachable for {}s: {cause}",
                p.name,
                down.as_secs()
            ));
        }
        if p.assigns.load(Relaxed) == 0 {
            reasons.push(format!(
                "pipeline {}: not joined (no assignment yet)",
                p.name
            ));
        }
        if let Some(st) = p.state.get() {
            let restoring = st.restoring();
            if !restoring.is_empty() {
                reasons.push(format!(
                    "pipeline {}: restoring state (partitions {restoring:?} read their changelog {:?})",
                    p.name,
                    st.changelog()
                ));
            }
        }
        for (partition, ps) in p.partitions() {
            if ps.stuck.load(Relaxed) {
                reasons.push(format!(
                    "pipeline {}: partition {partition} stuck (lag {}, nothing completed for {:?})",
                    p.name,
                    ps.lag.load(Relaxed),
                    crate::metrics::stuck_after()
                ));
            }
        }
    }
    metrics::gauge!(crate::metrics::READY).set(if reasons.is_empty() { 1.0 } else { 0.0 });
    reasons
}

async fn ready(State(s): State<HttpState>) -> Response {
    reply(readiness(&s.pipelines), "ready", "not ready")
}

/// Builds the `/debug/partitions` report by asking every partition supervisor.
pub async fn debug_report(pipelines: &[Arc<PipelineStats>]) -> DebugReport {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = DebugReport::default();
    for p in pipelines {
        let mut partitions = Vec::new();
        for (partition, ps) in p.partitions() {
            let answer = match ps.actor.get() {
                Some(a) => a
                    .call(PartitionMsg::Inspect, Some(INSPECT_TIMEOUT))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| match r {
                        ractor::rpc::CallResult::Success(d) => Ok(d),
                        ractor::rpc::CallResult::Timeout => {
                            Err("the supervisor did not answer within 2 s".into())
                        }
                        ractor::rpc::CallResult::SenderError => {
                            Err("the supervisor stopped".into())
                        }
                    }),
                None => Err("the supervisor is not started".into()),
            };
            partitions.push(answer.unwrap_or_else(|error| PartitionDebug {
                partition,
                in_flight: ps.in_flight.load(Relaxed),
                paused: ps.paused.load(Relaxed),
                stuck: ps.stuck.load(Relaxed),
                lag_messages: ps.lag.load(Relaxed),
                error: Some(error),
                ..Default::default()
            }));
        }
        out.pipelines.push(PipelineDebug {
            pipeline: p.name.clone(),
            topic: p.topic.clone(),
            joined: p.assigns.load(Relaxed) > 0,
            partitions,
        });
    }
    out
}

/// `/debug/state` query: `?key=K` describes one key, `?recent=N` lists the N keys changed
/// last.
#[derive(Debug, serde::Deserialize)]
struct StateQuery {
    key: Option<String>,
    recent: Option<usize>,
}

/// `/debug/state`: per pipeline with `[state]`, per partition: keys and bytes in memory, keys
/// spilled to disk, last update and whether it is restoring; per key (`?key=`, `?recent=`):
/// partition, value size, last update, memory or disk. Never the values.
async fn debug_state(
    State(s): State<HttpState>,
    Query(q): Query<StateQuery>,
) -> Json<serde_json::Value> {
    let pipelines: Vec<serde_json::Value> = s
        .pipelines
        .iter()
        .filter_map(|p| {
            let st = p.state.get()?;
            let mut v = serde_json::json!({
                "pipeline": p.name,
                "changelog": st.changelog(),
                "bytes": st.bytes(),
                "memory_cap": st.memory_cap(),
                "disk_bytes": st.disk_bytes(),
                "partitions": st.report(),
            });
            if let Some(k) = &q.key {
                v["key"] = serde_json::json!(st.describe(k.as_bytes()));
            }
            if let Some(n) = q.recent {
                v["recent"] = serde_json::json!(st.recent(n.min(1000)));
            }
            Some(v)
        })
        .collect();
    Json(serde_json::json!({ "pipelines": pipelines }))
}

async fn debug_partitions(State(s): State<HttpState>) -> Json<DebugReport> {
    Json(debug_report(&s.pipelines).await)
}

/// A minimal HTTP/1.1 GET (for `keyflow status`; no client library needed): returns the status
/// code and the body.
pub fn get_blocking(
    address: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let addr = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("cannot resolve {address}")))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed HTTP status line"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
