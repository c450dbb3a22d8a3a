//! What `/debug/partitions` shows and `keyflow status` renders: per partition, the in-flight
//! count, paused and stuck state, the oldest incomplete message and its age, and the keys that
//! wait and why. Keys are shown truncated (64 bytes, lossy UTF-8); no configuration value (and
//! so no secret) is ever part of it.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Set in a worker's progress cell while the pipeline sleeps in retry backoff; the low bits hold
/// the attempt number.
pub const BACKING_OFF: u32 = 1 << 31;

tokio::task_local! {
    /// The running message's attempt (and [`BACKING_OFF`]), shared by a worker with its
    /// supervisor so `/debug/partitions` can say why a key waits. Written once per attempt,
    /// never per processor call.
    pub static PROGRESS: Arc<AtomicU32>;
}

/// Records the attempt the pipeline is on, and whether it sleeps before it (no-op outside a
/// worker).
pub fn note_attempt(attempt: u32, backing_off: bool) {
    let v = attempt | if backing_off { BACKING_OFF } else { 0 };
    let _ = PROGRESS.try_with(|p| p.store(v, Relaxed));
}

/// The whole `/debug/partitions` document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DebugReport {
    pub pipelines: Vec<PipelineDebug>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PipelineDebug {
    pub pipeline: String,
    pub topic: String,
    /// Whether this instance has joined the group (received an assignment).
    pub joined: bool,
    pub partitions: Vec<PartitionDebug>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartitionDebug {
    pub partition: i32,
    /// Buffered or running.
    pub in_flight: usize,
    pub running: usize,
    /// Worker actors alive in the partition's pool, running or idle (an idle one is stopped
    /// after a while, so this falls back after a burst), and the pool's cap: `max_workers`, or
    /// less when the partition's memory share is the binding limit.
    #[serde(default)]
    pub workers: usize,
    #[serde(default)]
    pub worker_cap: usize,
    pub buffered_bytes: u64,
    pub paused: bool,
    pub stuck: bool,
    /// High watermark minus the commit point, as of the last tick.
    pub lag_messages: i64,
    /// The next offset to commit (`None` before anything was received).
    pub commit_point: Option<i64>,
    /// The oldest incomplete message: the one holding the commit point back.
    pub oldest_in_flight: Option<InFlightDebug>,
    /// Seconds since a message last completed here.
    pub since_last_completion_seconds: Option<f64>,
    /// Keys held back behind a running message of the same key.
    pub waiting_keys: Vec<WaitingKey>,
    /// Messages in the partition's hot-key overflow file, and the keys with most of them (10).
    #[serde(default)]
    pub overflow_messages: usize,
    #[serde(default)]
    pub overflow_keys: Vec<(String, usize)>,
    #[serde(default)]
    pub overflow_disk_bytes: u64,
    /// Set when the supervisor did not answer in time (it is busy or blocked).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InFlightDebug {
    pub offset: i64,
    pub key: Option<String>,
    /// Since it was taken off the consumer queue.
    pub age_seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WaitingKey {
    pub key: String,
    /// Messages of this key waiting.
    pub waiting: usize,
    /// Why they wait: the running message of the key and for how long it has run.
    pub reason: String,
    pub blocked_by_offset: Option<i64>,
    pub running_seconds: Option<f64>,
}

/// A key as shown in debug output: at most 64 bytes, lossy UTF-8.
pub fn show_key(k: &[u8]) -> String {
    String::from_utf8_lossy(&k[..k.len().min(64)]).into_owned()
}

/// Renders a report as the table `keyflow status` prints.
pub fn render(r: &DebugReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for p in &r.pipelines {
        let _ = writeln!(
            out,
            "pipeline {} (topic {}){}",
            p.pipeline,
            p.topic,
            if p.joined { "" } else { "  NOT JOINED" }
        );
        let _ = writeln!(
            out,
            "  {:>4} {:>9} {:>7} {:>10} {:>6} {:>5} {:>12} {:>10}  oldest in flight",
            "part", "in-flight", "running", "lag", "paused", "stuck", "commit", "idle(s)"
        );
        for q in &p.partitions {
            let oldest = q.oldest_in_flight.as_ref().map_or("-".to_string(), |o| {
                format!(
                    "offset {} key {:?} age {:.1}s",
                    o.offset,
                    o.key.as_deref().unwrap_or("<null>"),
                    o.age_seconds
                )
            });
            let _ = writeln!(
                out,
                "  {:>4} {:>9} {:>7} {:>10} {:>6} {:>5} {:>12} {:>10}  {}",
                q.partition,
                q.in_flight,
                q.running,
                q.lag_messages,
                if q.paused { "yes" } else { "no" },
                if q.stuck { "YES" } else { "no" },
                q.commit_point.map_or("-".into(), |c| c.to_string()),
                q.since_last_completion_seconds
                    .map_or("-".into(), |s| format!("{s:.1}")),
                oldest
            );
            if let Some(e) = &q.error {
                let _ = writeln!(out, "        error: {e}");
            }
            for w in q.waiting_keys.iter().take(10) {
                let _ = writeln!(
                    out,
                    "        key {:?}: {} waiting, {}",
                    w.key, w.waiting, w.reason
                );
            }
            if q.waiting_keys.len() > 10 {
                let _ = writeln!(
                    out,
                    "        … {} more waiting keys",
                    q.waiting_keys.len() - 10
                );
            }
        }
    }
    out
}

/// `keyflow status`: fetches `/debug/partitions` from `address` and renders it, every `every`
/// (clearing the terminal) or once.
pub fn status(address: &str, every: std::time::Duration, once: bool) -> std::process::ExitCode {
    use std::process::ExitCode;
    loop {
        let shown = crate::http::get_blocking(
            address,
            "/debug/partitions",
            every.max(std::time::Duration::from_secs(3)),
        )
        .map_err(|e| format!("cannot reach keyflow at {address}: {e}"))
        .and_then(|(code, body)| {
            if code != 200 {
                return Err(format!(
                    "{address}/debug/partitions answered {code}: {body}"
                ));
            }
            serde_json::from_str::<DebugReport>(&body)
                .map_err(|e| format!("unexpected /debug/partitions document: {e}"))
        });
        match shown {
            Ok(r) if once => {
                print!("{}", render(&r));
                return ExitCode::SUCCESS;
            }
            Ok(r) => print!(
                "\x1b[2J\x1b[H{address}  (every {every:?}, Ctrl-C to stop)\n\n{}",
                render(&r)
            ),
            Err(e) if once => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
            Err(e) => println!("\x1b[2J\x1b[H{e}"),
        }
        std::thread::sleep(every);
    }
}
