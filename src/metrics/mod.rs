//! Metric names, descriptions, buckets and the Prometheus recorder.
//!
//! Every name lives here as a constant, with its unit in the name. Labels are bounded:
//! `pipeline`, `topic`, `partition`, `outcome`, `kind`, `result` — never a message key.
//! Histograms have explicit buckets so that they render as Prometheus histograms (summaries
//! cannot be aggregated across instances).
//!
//! The hot path never looks a metric up by name: handles are registered once per pipeline
//! ([`PipelineMetrics`]) and once per assigned partition ([`PartitionMetrics`]), then
//! incremented. Without an installed recorder (library use, in-process tests) the handles are
//! no-ops.
//!
//! keyflow's histograms count their samples into fixed buckets as they come ([`buckets`]: an
//! atomic add, no allocation, nothing held between scrapes). Other histograms (an embedding
//! application's) go to the exporter, which keeps each sample until upkeep folds it into
//! buckets; [`install`] runs that upkeep on a thread of its own, independent of the HTTP
//! endpoint: with `[http] address = "off"` the recorder stays installed (a library user or an
//! embedding application can still render it through [`handle`]) and its memory stays bounded.

pub mod buckets;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Messages completed or retried, by `outcome` (see the `OUTCOME_*` constants).
pub const MESSAGES_TOTAL: &str = "keyflow_messages_total";
/// Time of one attempt: from its start on a worker to its completion or failure (the DLQ write
/// included for the last attempt; retry backoffs are not part of it).
pub const PROCESS_DURATION_SECONDS: &str = "keyflow_process_duration_seconds";
/// Time from a message's receipt off the consumer queue to its start on a worker.
pub const QUEUE_WAIT_SECONDS: &str = "keyflow_queue_wait_seconds";
/// Time from a message's Kafka timestamp to its completion.
pub const END_TO_END_LATENCY_SECONDS: &str = "keyflow_end_to_end_latency_seconds";
/// High watermark minus the commit point, per partition.
pub const CONSUMER_LAG_MESSAGES: &str = "keyflow_consumer_lag_messages";
/// Age of the oldest incomplete message (by its Kafka timestamp), per partition.
pub const CONSUMER_LAG_SECONDS: &str = "keyflow_consumer_lag_seconds";
/// Messages buffered or running, per partition.
pub const IN_FLIGHT_MESSAGES: &str = "keyflow_in_flight_messages";
/// Key + payload bytes buffered or running, per partition.
pub const BUFFERED_BYTES: &str = "keyflow_buffered_bytes";
/// 1 while the partition is paused on the consumer (flow control, the gate, a fetch error).
pub const PARTITION_PAUSED: &str = "keyflow_partition_paused";
/// Times the partition was paused.
pub const PARTITION_PAUSES_TOTAL: &str = "keyflow_partition_pauses_total";
/// 1 while the stuck-partition watchdog flags the partition.
pub const PARTITION_STUCK: &str = "keyflow_partition_stuck";
/// The process-wide memory budget for messages (`memory_limit`).
pub const MEMORY_LIMIT_BYTES: &str = "keyflow_memory_limit_bytes";
/// A pipeline's part of the budget, by `part`: `prefetch` (librdkafka's partition queues) or
/// `buffers` (messages taken off the queues: waiting, running, in retry backoff).
pub const MEMORY_BUDGET_BYTES: &str = "keyflow_memory_budget_bytes";
/// What a pipeline holds now, by `part` (as `keyflow_memory_budget_bytes`): `buffers` counts
/// keyflow's accounting (payload, key, headers and a fixed per-message cost), `prefetch`
/// librdkafka's queued messages (its statistics, every 2 s): payload bytes and 320 bytes a
/// message (its op). Above four times what the settings allow the assigned partitions, a
/// warning says why (whole record batches larger than a partition's prefetch).
pub const MEMORY_USED_BYTES: &str = "keyflow_memory_used_bytes";
/// Partitions of a pipeline that may fetch at once because one record batch each would
/// overrun its prefetch share (`memory::turns`); 0 while every partition fetches freely.
pub const FETCH_TURNS: &str = "keyflow_fetch_turns";
/// Partitions of a pipeline paused until a fetch turn is free.
pub const FETCH_TURNS_WAITING: &str = "keyflow_fetch_turns_waiting";
/// Partitions currently assigned to this instance.
pub const ASSIGNED_PARTITIONS: &str = "keyflow_assigned_partitions";
/// Rebalance events by `kind` (assign, revoke, lost).
pub const REBALANCES_TOTAL: &str = "keyflow_rebalances_total";
/// Offset commits by `result` (ok, failed).
pub const COMMITS_TOTAL: &str = "keyflow_commits_total";
/// Exactly-once transactions aborted (the pipeline rewound to its last committed transaction);
/// committed transactions count as `keyflow_commits_total{result="ok"}`.
pub const TRANSACTIONS_ABORTED_TOTAL: &str = "keyflow_transactions_aborted_total";
/// Size of the completed-offsets metadata each commit carries (0: nothing above the point).
pub const COMMIT_METADATA_BYTES: &str = "keyflow_commit_metadata_bytes";
/// Commits whose completed-offsets metadata was cut to fit the cap (the cut runs are processed
/// again after a restart).
pub const COMMIT_METADATA_TRUNCATED_TOTAL: &str = "keyflow_commit_metadata_truncated_total";
/// Messages of a key over its share of the partition's in-flight budget, written to the
/// partition's overflow file to come back as the key drains (a hot key).
pub const HOT_KEY_OVERFLOW_TOTAL: &str = "keyflow_hot_key_overflow_total";
/// The last committed offset (the next offset to consume), per partition.
pub const COMMITTED_OFFSET: &str = "keyflow_committed_offset";
/// Workers restarted after a crash.
pub const WORKER_RESTARTS_TOTAL: &str = "keyflow_worker_restarts_total";
/// Circuit-breaker state: 0 closed, 1 half-open, 2 open.
pub const CIRCUIT_BREAKER_STATE: &str = "keyflow_circuit_breaker_state";
/// Dead-letter topic writes by `result` (ok, failed).
pub const DEAD_LETTER_WRITES_TOTAL: &str = "keyflow_dead_letter_writes_total";
/// 1 while this instance is ready (joined, nothing stuck); 0 otherwise.
pub const READY: &str = "keyflow_ready";
/// Messages per run of a batch processor (`[batch]`; the halves of a split batch included).
pub const BATCH_SIZE: &str = "keyflow_batch_size";
/// Failed batches split in two to find their failing message.
pub const BATCH_SPLITS_TOTAL: &str = "keyflow_batch_splits_total";
/// Always 1; the labels carry the version.
pub const BUILD_INFO: &str = "keyflow_build_info";

pub const OUTCOME_PROCESSED: &str = "processed";
pub const OUTCOME_RETRIED: &str = "retried";
pub const OUTCOME_DEAD_LETTERED: &str = "dead_lettered";
pub const OUTCOME_FILTERED: &str = "filtered";
/// Dropped by `dedup`: its business id already completed within the TTL.
pub const OUTCOME_DEDUPLICATED: &str = "deduplicated";
/// Completed by a previous owner above its commit point (commit metadata): not run again.
pub const OUTCOME_SKIPPED: &str = "skipped";

/// Commit metadata sizes in bytes, up to the cap (`offsets::METADATA_CAP`).
pub const METADATA_BUCKETS: &[f64] = &[0.0, 16.0, 64.0, 256.0, 1024.0, 2048.0, 4000.0];

/// Processing and queue-wait buckets: 1 ms … 60 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Batch sizes, up to `config::BATCH_MAX_MESSAGES`.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
/// End-to-end buckets reach further: a backlog is hours old.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 14400.0,
];

static HANDLE: OnceLock<MetricsHandle> = OnceLock::new();
/// How often the upkeep thread folds the exporter's histogram samples into their buckets (only
/// histograms that are not keyflow's keep samples: see [`buckets`]).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The stuck-partition watchdog threshold in milliseconds (process-wide; `[http] stuck_after`).
// The default of `[http] stuck_after` (config::default_stuck_after); `Runtime::start` sets the
// configured value.
static STUCK_AFTER_MS: AtomicU64 = AtomicU64::new(120_000);

/// Renders everything the installed recorder holds: the exporter's counters and gauges, then
/// keyflow's histograms.
#[derive(Clone)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
    histograms: buckets::Histograms,
}

impl MetricsHandle {
    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = self.prometheus.render();
        self.histograms.render(&mut text);
        text
    }

    /// Folds the exporter's pending histogram samples into their buckets.
    pub fn run_upkeep(&self) {
        self.prometheus.run_upkeep();
    }
}

/// Installs the Prometheus recorder once per process and returns its handle (later calls return
/// the same handle), and starts the upkeep thread that keeps its memory bounded. Call it before
/// the runtime starts so that every handle registers.
pub fn install() -> MetricsHandle {
    HANDLE
        .get_or_init(|| {
            let inner = PrometheusBuilder::new().build_recorder();
            let histograms = buckets::Histograms::default();
            let handle = MetricsHandle {
                prometheus: inner.handle(),
                histograms: histograms.clone(),
            };
            metrics::set_global_recorder(buckets::Recorder { inner, histograms })
                .expect("no other metrics recorder is installed");
            describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// Runs the recorder's upkeep every [`UPKEEP_INTERVAL`] for the life of the process. A thread,
/// not a task: `install` may run outside a tokio runtime, and upkeep must outlive any of them.
fn spawn_upkeep(handle: MetricsHandle) {
    let started = std::thread::Builder::new()
        .name("keyflow-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the metrics upkeep thread: histogram samples will accumulate until /metrics is scraped");
    }
}

/// The installed recorder's handle, if any.
pub fn handle() -> Option<&'static MetricsHandle> {
    HANDLE.get()
}

/// Exports the process-wide memory budget (`keyflow_memory_limit_bytes`).
pub fn set_memory_limit(bytes: u64) {
    gauge!(MEMORY_LIMIT_BYTES).set(bytes as f64);
}

pub fn set_stuck_after(d: Duration) {
    STUCK_AFTER_MS.store(d.as_millis() as u64, Relaxed);
}

pub fn stuck_after() -> Duration {
    Duration::from_millis(STUCK_AFTER_MS.load(Relaxed))
}

fn describe() {
    describe_counter!(
        MESSAGES_TOTAL,
        "Messages by outcome: processed, retried, dead_lettered, filtered, deduplicated, skipped"
    );
    describe_histogram!(
        COMMIT_METADATA_BYTES,
        Unit::Bytes,
        "Completed-offsets metadata carried by each commit"
    );
    describe_counter!(
        HOT_KEY_OVERFLOW_TOTAL,
        "Messages of a hot key over its share, held in the partition's overflow file instead of memory"
    );
    describe_counter!(
        COMMIT_METADATA_TRUNCATED_TOTAL,
        "Commits whose completed-offsets metadata was cut to fit the cap"
    );
    describe_histogram!(
        PROCESS_DURATION_SECONDS,
        Unit::Seconds,
        "One attempt: start on a worker to completion or failure"
    );
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Receipt off the consumer queue to start on a worker"
    );
    describe_histogram!(
        END_TO_END_LATENCY_SECONDS,
        Unit::Seconds,
        "Kafka message timestamp to completion"
    );
    describe_gauge!(
        CONSUMER_LAG_MESSAGES,
        "High watermark minus the commit point"
    );
    describe_gauge!(
        CONSUMER_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest incomplete message"
    );
    describe_gauge!(IN_FLIGHT_MESSAGES, "Messages buffered or running");
    describe_gauge!(
        BUFFERED_BYTES,
        Unit::Bytes,
        "Key and payload bytes buffered or running"
    );
    describe_gauge!(
        PARTITION_PAUSED,
        "1 while paused: flow control, the pipeline gate, a fetch error's backoff, or waiting for a fetch turn"
    );
    describe_counter!(PARTITION_PAUSES_TOTAL, "Pauses by flow control");
    describe_gauge!(
        PARTITION_STUCK,
        "1 while lag > 0 and nothing completed for stuck_after"
    );
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions assigned to this instance");
    describe_gauge!(
        MEMORY_LIMIT_BYTES,
        Unit::Bytes,
        "Process-wide memory budget for messages (memory_limit)"
    );
    describe_gauge!(
        MEMORY_BUDGET_BYTES,
        Unit::Bytes,
        "A pipeline's part of the memory budget, by part (prefetch, buffers)"
    );
    describe_gauge!(
        MEMORY_USED_BYTES,
        Unit::Bytes,
        "Message bytes a pipeline holds now, by part (prefetch, buffers)"
    );
    describe_gauge!(
        FETCH_TURNS,
        "Partitions that may fetch at once while one record batch each would overrun the prefetch share (0: all)"
    );
    describe_gauge!(
        FETCH_TURNS_WAITING,
        "Partitions paused until a fetch turn is free"
    );
    describe_counter!(REBALANCES_TOTAL, "Rebalance events by kind");
    describe_counter!(COMMITS_TOTAL, "Offset commits by result");
    describe_counter!(
        TRANSACTIONS_ABORTED_TOTAL,
        "Exactly-once transactions aborted (the pipeline rewound to its last commit)"
    );
    describe_gauge!(COMMITTED_OFFSET, "Last committed offset (next to consume)");
    describe_counter!(WORKER_RESTARTS_TOTAL, "Workers restarted after a crash");
    describe_gauge!(
        CIRCUIT_BREAKER_STATE,
        "Circuit breaker: 0 closed, 1 half-open, 2 open"
    );
    describe_counter!(DEAD_LETTER_WRITES_TOTAL, "Dead-letter writes by result");
    describe_gauge!(READY, "1 while ready: joined, no partition stuck");
    describe_histogram!(BATCH_SIZE, "Messages per run of a batch processor");
    describe_counter!(
        BATCH_SPLITS_TOTAL,
        "Failed batches split in two to find their failing message"
    );
    describe_gauge!(BUILD_INFO, "Build information");
}

/// Handles of one pipeline (labels `pipeline`, `topic`), registered once.
#[derive(Debug, Clone)]
pub struct PipelineMetrics {
    pub processed: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    pub filtered: Counter,
    pub deduplicated: Counter,
    pub skipped: Counter,
    pub overflowed: Counter,
    pub commit_metadata_bytes: Histogram,
    pub commit_metadata_truncated: Counter,
    pub process_duration: Histogram,
    pub queue_wait: Histogram,
    pub end_to_end: Histogram,
    pub assigned: Gauge,
    pub memory_budget_prefetch: Gauge,
    pub memory_budget_buffers: Gauge,
    pub memory_used_prefetch: Gauge,
    pub memory_used_buffers: Gauge,
    pub fetch_turns: Gauge,
    pub fetch_turns_waiting: Gauge,
    pub rebalance_assign: Counter,
    pub rebalance_revoke: Counter,
    pub rebalance_lost: Counter,
    pub commits_ok: Counter,
    pub commits_failed: Counter,
    pub transactions_aborted: Counter,
    pub worker_restarts: Counter,
    pub breaker_state: Gauge,
    pub dlq_ok: Counter,
    pub dlq_failed: Counter,
    pub batch_size: Histogram,
    pub batch_splits: Counter,
    pub labels: (String, String),
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        PipelineMetrics {
            processed: Counter::noop(),
            retried: Counter::noop(),
            dead_lettered: Counter::noop(),
            filtered: Counter::noop(),
            deduplicated: Counter::noop(),
            skipped: Counter::noop(),
            overflowed: Counter::noop(),
            commit_metadata_bytes: Histogram::noop(),
            commit_metadata_truncated: Counter::noop(),
            process_duration: Histogram::noop(),
            queue_wait: Histogram::noop(),
            end_to_end: Histogram::noop(),
            assigned: Gauge::noop(),
            memory_budget_prefetch: Gauge::noop(),
            memory_budget_buffers: Gauge::noop(),
            memory_used_prefetch: Gauge::noop(),
            memory_used_buffers: Gauge::noop(),
            fetch_turns: Gauge::noop(),
            fetch_turns_waiting: Gauge::noop(),
            rebalance_assign: Counter::noop(),
            rebalance_revoke: Counter::noop(),
            rebalance_lost: Counter::noop(),
            commits_ok: Counter::noop(),
            commits_failed: Counter::noop(),
            transactions_aborted: Counter::noop(),
            worker_restarts: Counter::noop(),
            breaker_state: Gauge::noop(),
            dlq_ok: Counter::noop(),
            dlq_failed: Counter::noop(),
            batch_size: Histogram::noop(),
            batch_splits: Counter::noop(),
            labels: Default::default(),
        }
    }
}

impl PipelineMetrics {
    pub fn new(pipeline: &str, topic: &str) -> Self {
        let (p, t) = (pipeline.to_string(), topic.to_string());
        let msgs = |outcome: &'static str| counter!(MESSAGES_TOTAL, "pipeline" => p.clone(), "topic" => t.clone(), "outcome" => outcome);
        let rebalance = |kind: &'static str| counter!(REBALANCES_TOTAL, "pipeline" => p.clone(), "topic" => t.clone(), "kind" => kind);
        let commits = |result: &'static str| counter!(COMMITS_TOTAL, "pipeline" => p.clone(), "topic" => t.clone(), "result" => result);
        let memory = |name: &'static str, part: &'static str| gauge!(name, "pipeline" => p.clone(), "topic" => t.clone(), "part" => part);
        let dlq = |result: &'static str| counter!(DEAD_LETTER_WRITES_TOTAL, "pipeline" => p.clone(), "topic" => t.clone(), "result" => result);
        let m = PipelineMetrics {
            processed: msgs(OUTCOME_PROCESSED),
            retried: msgs(OUTCOME_RETRIED),
            dead_lettered: msgs(OUTCOME_DEAD_LETTERED),
            filtered: msgs(OUTCOME_FILTERED),
            deduplicated: msgs(OUTCOME_DEDUPLICATED),
            skipped: msgs(OUTCOME_SKIPPED),
            overflowed: counter!(HOT_KEY_OVERFLOW_TOTAL, "pipeline" => p.clone(), "topic" => t.clone()),
            commit_metadata_bytes: histogram!(COMMIT_METADATA_BYTES, "pipeline" => p.clone(), "topic" => t.clone()),
            commit_metadata_truncated: counter!(COMMIT_METADATA_TRUNCATED_TOTAL, "pipeline" => p.clone(), "topic" => t.clone()),
            process_duration: histogram!(PROCESS_DURATION_SECONDS, "pipeline" => p.clone(), "topic" => t.clone()),
            queue_wait: histogram!(QUEUE_WAIT_SECONDS, "pipeline" => p.clone(), "topic" => t.clone()),
            end_to_end: histogram!(END_TO_END_LATENCY_SECONDS, "pipeline" => p.clone(), "topic" => t.clone()),
            assigned: gauge!(ASSIGNED_PARTITIONS, "pipeline" => p.clone(), "topic" => t.clone()),
            memory_budget_prefetch: memory(MEMORY_BUDGET_BYTES, "prefetch"),
            memory_budget_buffers: memory(MEMORY_BUDGET_BYTES, "buffers"),
            memory_used_prefetch: memory(MEMORY_USED_BYTES, "prefetch"),
            memory_used_buffers: memory(MEMORY_USED_BYTES, "buffers"),
            fetch_turns: gauge!(FETCH_TURNS, "pipeline" => p.clone(), "topic" => t.clone()),
            fetch_turns_waiting: gauge!(FETCH_TURNS_WAITING, "pipeline" => p.clone(), "topic" => t.clone()),
            rebalance_assign: rebalance("assign"),
            rebalance_revoke: rebalance("revoke"),
            rebalance_lost: rebalance("lost"),
            commits_ok: commits("ok"),
            commits_failed: commits("failed"),
            transactions_aborted: counter!(TRANSACTIONS_ABORTED_TOTAL, "pipeline" => p.clone(), "topic" => t.clone()),
            worker_restarts: counter!(WORKER_RESTARTS_TOTAL, "pipeline" => p.clone(), "topic" => t.clone()),
            breaker_state: gauge!(CIRCUIT_BREAKER_STATE, "pipeline" => p.clone(), "topic" => t.clone()),
            dlq_ok: dlq("ok"),
            dlq_failed: dlq("failed"),
            batch_size: histogram!(BATCH_SIZE, "pipeline" => p.clone(), "topic" => t.clone()),
            batch_splits: counter!(BATCH_SPLITS_TOTAL, "pipeline" => p.clone(), "topic" => t.clone()),
            labels: (p, t),
        };
        // Register every series at zero so that dashboards and alerts see them from the start.
        for c in [
            &m.processed,
            &m.retried,
            &m.dead_lettered,
            &m.filtered,
            &m.deduplicated,
            &m.skipped,
            &m.commit_metadata_truncated,
            &m.rebalance_assign,
            &m.rebalance_revoke,
            &m.rebalance_lost,
            &m.commits_ok,
            &m.commits_failed,
            &m.transactions_aborted,
            &m.worker_restarts,
            &m.dlq_ok,
            &m.dlq_failed,
        ] {
            c.increment(0);
        }
        m.assigned.set(0.0);
        // Closed until a breaker of the pipeline opens (see `Gate::breaker_state`).
        m.breaker_state.set(0.0);
        m
    }

    /// Handles of one assigned partition of this pipeline.
    pub fn partition(&self, partition: i32) -> PartitionMetrics {
        let (p, t) = (self.labels.0.clone(), self.labels.1.clone());
        let n = partition.to_string();
        let g = |name: &'static str| gauge!(name, "pipeline" => p.clone(), "topic" => t.clone(), "partition" => n.clone());
        let m = PartitionMetrics {
            lag_messages: g(CONSUMER_LAG_MESSAGES),
            lag_seconds: g(CONSUMER_LAG_SECONDS),
            in_flight: g(IN_FLIGHT_MESSAGES),
            buffered_bytes: g(BUFFERED_BYTES),
            paused: g(PARTITION_PAUSED),
            stuck: g(PARTITION_STUCK),
            committed: g(COMMITTED_OFFSET),
            pauses: counter!(PARTITION_PAUSES_TOTAL, "pipeline" => p.clone(), "topic" => t.clone(), "partition" => n.clone()),
            pipeline: self.clone(),
        };
        for gauge in [
            &m.lag_messages,
            &m.lag_seconds,
            &m.in_flight,
            &m.buffered_bytes,
            &m.paused,
            &m.stuck,
        ] {
            gauge.set(0.0);
        }
        m.pauses.increment(0);
        m
    }
}

/// Handles of one assigned partition (labels `pipeline`, `topic`, `partition`), registered once
/// on assignment; the per-message ones are the pipeline's.
#[derive(Debug, Clone)]
pub struct PartitionMetrics {
    pub lag_messages: Gauge,
    pub lag_seconds: Gauge,
    pub in_flight: Gauge,
    pub buffered_bytes: Gauge,
    pub paused: Gauge,
    pub stuck: Gauge,
    pub committed: Gauge,
    pub pauses: Counter,
    pub pipeline: PipelineMetrics,
}

impl Default for PartitionMetrics {
    fn default() -> Self {
        PartitionMetrics {
            lag_messages: Gauge::noop(),
            lag_seconds: Gauge::noop(),
            in_flight: Gauge::noop(),
            buffered_bytes: Gauge::noop(),
            paused: Gauge::noop(),
            stuck: Gauge::noop(),
            committed: Gauge::noop(),
            pauses: Counter::noop(),
            pipeline: PipelineMetrics::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Library users who never call `set_stuck_after` get the documented default, the same as
    /// `keyflow run` without `[http] stuck_after` (it was 60 s against 120 s).
    #[test]
    fn the_stuck_watchdog_default_matches_the_config_default() {
        assert_eq!(
            super::stuck_after(),
            crate::config::Global::default().stuck_after
        );
    }
}
