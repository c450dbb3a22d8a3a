//! The consumer context: turns librdkafka's rebalance callbacks into coordinator messages.
//!
//! The callbacks run on the poll thread (inside `BaseConsumer::poll`). On a revoke the context
//! hands the partitions to the coordinator and **waits** (a rendezvous, bounded by the drain
//! deadline) until their supervisors have drained, then commits their final offsets
//! synchronously before librdkafka gives the partitions away. Blocking here is safe because the
//! poll thread belongs to keyflow alone; the actors run on the tokio runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use ractor::ActorRef;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientContext, TopicPartitionList};
use tracing::{error, info, warn};

use super::committer::Committer;
use super::offsets;
use crate::actors::coordinator::{AssignedPartition, CoordinatorMsg, DrainedOffset};
use crate::stats::{now_ms, ClientError, PipelineStats};

pub struct KeyflowContext {
    pipeline: String,
    coordinator: OnceLock<ActorRef<CoordinatorMsg>>,
    consumer: OnceLock<Weak<super::Consumer>>,
    /// The pipeline's asynchronous commits: one in flight, all moved partitions in it.
    pub committer: Arc<Committer>,
    /// The drain deadline a revoke gives its partitions, counted from the revoke.
    drain_timeout: Duration,
    /// Set once shutdown has drained and committed: the revokes of the final leave need no
    /// rendezvous.
    closing: AtomicBool,
    /// Set when shutdown starts draining: a revoke waiting (or queued behind it) is answered by
    /// the shutdown's drain and commit, so it waits for `closing` instead of giving up.
    shutting_down: AtomicBool,
    stats: Arc<PipelineStats>,
    /// Configured secret values (passwords), blanked out of every error reason kept or shown.
    secrets: Vec<String>,
}

/// How long after the drain deadline `drain_all` may still take, in total (every partition in
/// parallel): supervisors busy at the deadline answering late, then stopping so that their
/// queues are released before the unassign.
pub const DRAIN_MARGIN: Duration = Duration::from_secs(2);

/// How much longer than the whole drain (deadline + [`DRAIN_MARGIN`]) a revoke waits for its
/// report: the report must always win the race, or nothing revoked would be committed.
const RENDEZVOUS_SLACK: Duration = Duration::from_secs(1);

/// How long a revoke waits for a shutdown that took over its partitions to drain, commit and
/// close (the shutdown's own bound: drain deadline + margin + the final commit's bound).
pub const SHUTDOWN_COMMIT_BOUND: Duration = Duration::from_secs(3);

/// How often a waiting revoke looks up from the rendezvous (to notice that shutdown has taken
/// over the drain).
const RENDEZVOUS_SLICE: Duration = Duration::from_millis(50);

pub use crate::config::kafka::secret_values;

/// `text` with every secret value replaced by `***` (see [`crate::config::kafka::redact`]).
pub fn redact(text: &str, secrets: &[String]) -> String {
    crate::config::kafka::redact(text, secrets).into_owned()
}

/// Whether a client error is a configuration error, which retrying at start does not cure:
/// credentials refused, or a broker certificate that does not verify (untrusted CA, expired,
/// wrong host name). A handshake cut short ("SSL handshake failed: Disconnected", a connection
/// reset: a broker stopping or still starting) is an outage like a refused connection, even
/// though librdkafka adds "connecting to a PLAINTEXT broker listener?": TLS to a plaintext Kafka
/// listener looks the same, and then the start ends at `startup_timeout` with that cause. Only
/// consulted while starting: once connected, every error is an outage (readiness 503, retry).
fn configuration_error(code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
    if code == Some(RDKafkaErrorCode::Authentication) {
        return true;
    }
    const BAD_CERTIFICATE: &[&str] = &[
        "certificate verify failed",
        "certificate has expired",
        "certificate is not yet valid",
        "self-signed certificate",
        "self signed certificate",
        "unable to get local issuer certificate",
        "broker certificate could not be verified",
        "Broker: Hostname verification failed",
        "hostname mismatch",
        // TLS to a plaintext listener, or a listener that requires a client certificate.
        "wrong version number",
        "client SSL authentication might be required",
    ];
    BAD_CERTIFICATE.iter().any(|c| reason.contains(c))
}

/// librdkafka's statistics, reduced to what keyflow reads: the brokers' connection states and
/// the bytes queued in each partition's prefetch.
#[derive(serde::Deserialize)]
struct BrokerStates {
    #[serde(default)]
    brokers: std::collections::HashMap<String, BrokerState>,
    #[serde(default)]
    topics: std::collections::HashMap<String, TopicStats>,
}

#[derive(serde::Deserialize)]
struct TopicStats {
    #[serde(default)]
    partitions: std::collections::HashMap<String, PartitionQueueStats>,
}

#[derive(serde::Deserialize)]
struct PartitionQueueStats {
    /// Payload bytes in the partition's fetch queue.
    #[serde(default)]
    fetchq_size: u64,
    /// Messages in it.
    #[serde(default)]
    fetchq_cnt: u64,
}

impl BrokerStates {
    /// What the partitions' fetch queues hold: their payload bytes (`fetchq_size`) and
    /// [`QUEUED_OP_COST`] for each queued message (90-byte messages cost ~4.5× their payload).
    fn prefetched_bytes(&self) -> u64 {
        self.topics
            .values()
            .flat_map(|t| t.partitions.values())
            .map(|p| p.fetchq_size + p.fetchq_cnt * QUEUED_OP_COST)
            .sum()
    }
}

use crate::memory::QUEUED_OP_COST;

/// How often, at most, the prefetch-over-budget warning repeats.
const PREFETCH_WARN_EVERY: Duration = Duration::from_secs(600);

/// How far above its prefetch a partition's queue goes by design: librdkafka refills a queue
/// while it is below `queued.min.messages`, and one fetch (`max.partition.fetch.bytes`, a quarter
/// of the prefetch since 7814ec2, half before) of small messages brings more than that count
/// (1.4× the prefetch measured with 100-byte messages and half-prefetch fetches, review of
/// e0b8e8b). Four times it, something else holds the memory: record batches
/// larger than the prefetch (a partition always holds a whole one).
const PREFETCH_OVERSHOOT: u64 = 4;

/// Whether librdkafka's prefetch (`held`, over `assigned` partitions) is beyond what its
/// settings (`per_partition`) allow.
fn prefetch_over_budget(held: u64, per_partition: u64, assigned: usize) -> bool {
    per_partition > 0
        && assigned > 0
        && held > per_partition.saturating_mul(assigned as u64 * PREFETCH_OVERSHOOT)
}

#[derive(serde::Deserialize)]
struct BrokerState {
    state: String,
}

impl KeyflowContext {
    pub fn new(
        pipeline: &str,
        topic: &str,
        drain_timeout: Duration,
        stats: Arc<PipelineStats>,
        secrets: Vec<String>,
    ) -> Self {
        KeyflowContext {
            pipeline: pipeline.to_string(),
            coordinator: OnceLock::new(),
            consumer: OnceLock::new(),
            committer: Arc::new(Committer::new(topic)),
            drain_timeout,
            closing: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            stats,
            secrets,
        }
    }

    pub fn set_coordinator(&self, c: ActorRef<CoordinatorMsg>) {
        let _ = self.coordinator.set(c);
    }

    pub(super) fn set_consumer(&self, c: Weak<super::Consumer>) {
        let _ = self.consumer.set(c);
    }

    /// The whole of a revoke's wait: strictly longer than the drain it waits for.
    pub fn rendezvous_timeout(drain_timeout: Duration) -> Duration {
        drain_timeout + DRAIN_MARGIN + RENDEZVOUS_SLACK
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    fn on_assign(&self, tpl: &TopicPartitionList) {
        let (Some(coordinator), Some(consumer)) = (
            self.coordinator.get(),
            self.consumer.get().and_then(Weak::upgrade),
        ) else {
            return;
        };
        let mut assigned = Vec::new();
        for e in tpl.elements() {
            // Split before librdkafka assigns, so that no message of this partition reaches the
            // main queue: every message comes through its supervisor's queue.
            match consumer.split_partition_queue(e.topic(), e.partition()) {
                Some(queue) => assigned.push(AssignedPartition {
                    topic: Arc::from(e.topic()),
                    partition: e.partition(),
                    queue,
                }),
                None => {
                    error!(pipeline = %self.pipeline, topic = e.topic(), partition = e.partition(), "could not split the partition queue")
                }
            }
        }
        self.stats.rebalance("assign");
        info!(pipeline = %self.pipeline, partitions = ?assigned.iter().map(|a| a.partition).collect::<Vec<_>>(), "partitions assigned");
        if coordinator
            .cast(CoordinatorMsg::Assigned(assigned))
            .is_err()
        {
            warn!(pipeline = %self.pipeline, "coordinator is gone; assignment ignored");
        }
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let lost = consumer.assignment_lost();
        self.stats.rebalance(if lost { "lost" } else { "revoke" });
        let partitions: Vec<(Arc<str>, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        info!(pipeline = %self.pipeline, partitions = ?partitions.iter().map(|p| p.1).collect::<Vec<_>>(), lost, "partitions revoked");
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let Some(coordinator) = self.coordinator.get() else {
            return;
        };
        let (tx, rx) = mpsc::sync_channel(1);
        // One deadline for the whole drain, counted from here (not from when the coordinator or
        // each supervisor gets to it); the rendezvous waits strictly longer than that drain.
        let drain = if lost {
            Duration::ZERO
        } else {
            self.drain_timeout
        };
        let start = Instant::now();
        let until = start + drain;
        if coordinator
            .cast(CoordinatorMsg::Revoke {
                partitions,
                lost,
                until,
                reply: tx,
            })
            .is_err()
        {
            return;
        }
        let wait = Self::rendezvous_timeout(drain);
        let mut deadline = start + wait;
        // Liveness: the poll loop is silent while it waits here, and that is fine until the
        // deadline (the guard clears the mark however the wait ends).
        let _draining = self.stats.rendezvous(now_ms() + wait.as_millis() as u64);
        let mut shutdown_seen = false;
        let answer = loop {
            match rx.recv_timeout(RENDEZVOUS_SLICE) {
                Ok(drained) => break Ok(drained),
                Err(mpsc::RecvTimeoutError::Disconnected)
                    if self.closing.load(Ordering::SeqCst) =>
                {
                    info!(pipeline = %self.pipeline, "revoke during shutdown: partitions already drained and committed by the shutdown");
                    return;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break Err("the coordinator is gone"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // The shutdown drains (and commits) what it still owns, from its own start:
                    // give it its whole bound rather than unassign under its supervisors.
                    if !shutdown_seen && self.shutting_down.load(Ordering::SeqCst) {
                        shutdown_seen = true;
                        deadline = deadline.max(
                            Instant::now()
                                + Self::rendezvous_timeout(self.drain_timeout)
                                + SHUTDOWN_COMMIT_BOUND,
                        );
                    }
                    // Shutdown drained and committed every partition it still owned (a Revoke
                    // queued behind it is never answered): waiting on would only add the drain
                    // deadline to the exit.
                    if self.closing.load(Ordering::SeqCst) {
                        info!(pipeline = %self.pipeline, "revoke during shutdown: partitions already drained and committed by the shutdown");
                        return;
                    }
                    if Instant::now() >= deadline {
                        break Err("drain rendezvous timed out");
                    }
                }
            }
        };
        match answer {
            Ok(drained) if !lost => {
                let offsets: Vec<_> = drained.iter().map(DrainedOffset::as_commit).collect();
                match offsets::commit(consumer, &offsets, CommitMode::Sync) {
                    Ok(()) => {
                        let offsets: Vec<_> = drained
                            .iter()
                            .map(|d| (d.partition, d.next_offset))
                            .collect();
                        info!(pipeline = %self.pipeline, ?offsets, "committed revoked partitions")
                    }
                    Err(e) => {
                        warn!(pipeline = %self.pipeline, error = %e, "commit of revoked partitions failed; they will be redelivered")
                    }
                }
            }
            // A lost assignment belongs to someone else already: committing would be refused.
            Ok(_) => {}
            Err(why) => {
                warn!(pipeline = %self.pipeline, why, "revoke: no drain report; uncommitted work will be redelivered")
            }
        }
    }
}

impl ClientContext for KeyflowContext {
    /// Client errors: logged (secrets redacted), kept as the cause that readiness and a failed
    /// start report, and "all brokers down" starts the outage clock.
    fn error(&self, error: KafkaError, reason: &str) {
        let reason = redact(reason, &self.secrets);
        error!(pipeline = %self.pipeline, error = %error, reason, "kafka client error");
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            // Keep the cause that brought them down (e.g. "Connection refused"): any error kept
            // now came after the brokers last answered (that clears it), so it is this outage's.
            self.stats.brokers_down();
            if self.stats.client_error().is_some() {
                return;
            }
        }
        let config = configuration_error(code, &reason);
        if code == Some(RDKafkaErrorCode::Authentication) {
            self.stats.brokers_down();
        }
        self.stats.set_client_error(ClientError {
            reason: format!("{error}: {reason}"),
            fatal_at_start: config,
        });
    }

    /// librdkafka's own log lines, secrets redacted (the default logs them verbatim, and some
    /// echo configuration values, e.g. an unparsable `sasl.oauthbearer.config`).
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        let m = redact(log_message, &self.secrets);
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                error!(target: "librdkafka", "librdkafka: {fac} {m}")
            }
            L::Warning => warn!(target: "librdkafka", "librdkafka: {fac} {m}"),
            L::Notice | L::Info => info!(target: "librdkafka", "librdkafka: {fac} {m}"),
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {m}"),
        }
    }

    /// librdkafka's statistics (`statistics.interval.ms`): a broker in state UP ends an outage
    /// and clears the last client error, whether or not it had started an outage (a cause kept
    /// from a healthy time would be reported by the next outage, or stay on readiness).
    /// Parsed into the broker states only; runs on the poll thread every interval.
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(s) = serde_json::from_slice::<BrokerStates>(statistics) else {
            return;
        };
        // The memory budget's use, every statistics interval (not per message).
        let m = &self.stats.metrics;
        let held = s.prefetched_bytes();
        m.memory_used_prefetch.set(held as f64);
        if let Some(turns) = self.stats.turns.get() {
            let (_, waiting) = turns.counts();
            m.fetch_turns.set(turns.limit().unwrap_or(0) as f64);
            m.fetch_turns_waiting.set(waiting as f64);
        }
        let per_partition = self.stats.prefetch_per_partition.load(Ordering::Relaxed);
        // This instance's partitions, as assigned now (the topic may be shared, or have grown).
        let assigned = self.stats.partitions().len();
        if prefetch_over_budget(held, per_partition, assigned) {
            let mut warned = self
                .stats
                .prefetch_warned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if warned.is_none_or(|t| t.elapsed() >= PREFETCH_WARN_EVERY) {
                *warned = Some(Instant::now());
                // librdkafka fetches whole record batches: a partition holds at least one,
                // whatever its prefetch settings, and a batch of small messages costs ~4× its
                // bytes in memory (BENCHMARKS.md, "One batch per partition"). Pausing is no
                // answer (it drops the batch, which is fetched again): say so, once in a while.
                warn!(pipeline = %self.pipeline, held = %bytesize::ByteSize(held), partitions = assigned, prefetch_per_partition = %bytesize::ByteSize(per_partition), "librdkafka's prefetch holds over 4 times what its settings allow these partitions: the input's record batches are probably larger than a partition's prefetch (a partition always holds a whole batch). Smaller producer batches (batch.size), fewer partitions per instance or a larger memory_limit bound it");
            }
        }
        let buffered: usize = self
            .stats
            .partitions()
            .iter()
            .map(|(_, p)| {
                use std::sync::atomic::Ordering::Relaxed;
                // Workers come out of the buffer share too (`memory::WORKER_COST` each).
                p.buffered_bytes.load(Relaxed)
                    + p.workers.load(Relaxed) * crate::memory::WORKER_COST as usize
            })
            .sum();
        m.memory_used_buffers.set(buffered as f64);
        if s.brokers.values().any(|b| b.state == "UP") {
            if self.stats.brokers_unreachable_for().is_some() {
                info!(pipeline = %self.pipeline, "brokers reachable again");
                self.stats.brokers_up();
            }
            if self.stats.client_error().is_some() {
                self.stats.clear_client_error();
            }
        } else if !s.brokers.is_empty() {
            self.stats.brokers_down();
        }
    }
}

impl ConsumerContext for KeyflowContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.on_assign(tpl),
            Rebalance::Revoke(tpl) => self.on_revoke(consumer, tpl),
            Rebalance::Error(e) => error!(pipeline = %self.pipeline, error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        // keyflow's own commits are answered on the committer's queue; this sees only what
        // librdkafka commits by itself (nothing, with auto commit off).
        if let Err(e) = result {
            warn!(pipeline = %self.pipeline, error = %e, partitions = offsets.count(), "offset commit failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_use_counts_each_queued_message_beyond_its_payload() {
        let stats = br#"{"brokers": {}, "topics": {"in": {"partitions": {
            "0": {"fetchq_size": 900, "fetchq_cnt": 10},
            "1": {"fetchq_size": 0, "fetchq_cnt": 0},
            "-1": {"fetchq_size": 0, "fetchq_cnt": 0}}}}}"#;
        let s: BrokerStates = serde_json::from_slice(stats).unwrap();
        assert_eq!(s.prefetched_bytes(), 900 + 10 * QUEUED_OP_COST);
        // Two partitions of 100 bytes each: up to 4× by design.
        assert!(!prefetch_over_budget(800, 100, 2));
        assert!(prefetch_over_budget(801, 100, 2));
        assert!(
            !prefetch_over_budget(1 << 30, 100, 0),
            "nothing assigned: no verdict"
        );
        assert!(
            !prefetch_over_budget(1 << 30, 0, 2),
            "not sized yet: no verdict"
        );
    }

    #[test]
    fn secrets_are_blanked_out_of_reasons() {
        let kafka = vec![
            ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ("sasl.password".to_string(), "hunter2".to_string()),
            ("ssl.key.password".to_string(), "k3y".to_string()),
            ("sasl.oauthbearer.client.secret".to_string(), "".to_string()),
        ];
        let secrets = secret_values(&kafka);
        assert_eq!(secrets, vec!["hunter2".to_string(), "k3y".to_string()]);
        assert_eq!(
            redact("auth as u:hunter2 with k3y failed (SASL_SSL)", &secrets),
            "auth as u:*** with *** failed (SASL_SSL)"
        );
    }

    /// Review H item 4: librdkafka's sensitive properties, not only `password|secret` names.
    #[test]
    fn every_sensitive_librdkafka_value_is_blanked_out() {
        const PEM_LINE: &str = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7";
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{PEM_LINE}\n-----END PRIVATE KEY-----");
        let kafka: Vec<(String, String)> = [
            ("security.protocol", "SASL_SSL"),
            (
                "sasl.oauthbearer.config",
                "principal=admin clientSecret=oauth-cs-1234",
            ),
            ("ssl.key.pem", pem.as_str()),
            ("ssl_key", "internal-key-5678"),
            ("ssl.key.location", "/run/secrets/client-key.pem"),
            ("ssl.ca.pem", "ca-pem-body-2468"),
            ("sasl.oauthbearer.client.secret", "cs-9999"),
            (
                "sasl.oauthbearer.assertion.private.key.passphrase",
                "pp-4242",
            ),
            ("ssl.keystore.password", "ks-1357"),
            // librdkafka marks it sensitive in its own dumps, but it names, not authenticates:
            // shown, so that "wrong user" can be diagnosed (and a short name like "keyflow"
            // does not blank out every log line).
            ("sasl.username", "svc-user-77"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let secrets = secret_values(&kafka);
        for shown in [
            "principal=admin clientSecret=oauth-cs-1234",
            "oauth-cs-1234",
            pem.as_str(),
            PEM_LINE,
            "internal-key-5678",
            "/run/secrets/client-key.pem",
            "ca-pem-body-2468",
            "cs-9999",
            "pp-4242",
            "ks-1357",
        ] {
            let text = format!("Failed: Unrecognized config beginning at: {shown} (SASL_SSL)");
            let r = redact(&text, &secrets);
            assert!(!r.contains(shown), "{shown:?} is shown: {r}");
            assert!(r.contains("(SASL_SSL)"), "{r}");
        }
        assert_eq!(redact("user svc-user-77", &secrets), "user svc-user-77");
    }

    fn ctx() -> (KeyflowContext, Arc<PipelineStats>) {
        let stats = PipelineStats::new("p");
        let c = KeyflowContext::new("p", "t", Duration::from_secs(1), stats.clone(), Vec::new());
        (c, stats)
    }

    const UP: &[u8] = br#"{"brokers":{"127.0.0.1:9092/1":{"state":"UP"}}}"#;

    /// Review H item 2: a handshake cut short (a broker restarting, a connection reset) is an
    /// outage, not a configuration error; an untrusted certificate or refused credentials are.
    #[test]
    fn only_configuration_errors_are_fatal_at_start() {
        let transient = [
            // As librdkafka 2.12 reports a listener hanging up mid-handshake (seen in
            // tests/security.rs a_handshake_cut_short_at_start_is_waited_out).
            (RDKafkaErrorCode::BrokerTransportFailure, "sasl_ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: Disconnected: SSL connection closed by peer: connecting to a PLAINTEXT broker listener? (after 0ms in state SSL_HANDSHAKE)"),
            (RDKafkaErrorCode::SSL, "sasl_ssl://127.0.0.1:9093/1: SSL handshake failed: SSL transport error: Connection reset by peer (after 1ms in state SSL_HANDSHAKE)"),
            (RDKafkaErrorCode::BrokerTransportFailure, "sasl_ssl://127.0.0.1:9093/1: Connect to ipv4#127.0.0.1:9093 failed: Connection refused (after 0ms in state CONNECT)"),
        ];
        for (code, reason) in transient {
            let (c, stats) = ctx();
            c.error(KafkaError::Global(code), reason);
            let e = stats.client_error().expect("kept as the cause");
            assert!(!e.fatal_at_start, "fatal at start: {reason}");
            assert!(e.reason.contains(reason), "{}", e.reason);
        }
        let config = [
            (RDKafkaErrorCode::SSL, "sasl_ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 5ms in state SSL_HANDSHAKE)"),
            (RDKafkaErrorCode::SSL, "ssl://127.0.0.1:9092/bootstrap: SSL handshake failed: error:0A00010B:SSL routines::wrong version number (after 2ms in state SSL_HANDSHAKE)"),
            (RDKafkaErrorCode::Authentication, "sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 8ms in state AUTH_REQ)"),
        ];
        for (code, reason) in config {
            let (c, stats) = ctx();
            c.error(KafkaError::Global(code), reason);
            assert!(
                stats.client_error().is_some_and(|e| e.fatal_at_start),
                "not fatal at start: {reason}"
            );
        }
    }

    /// Review H item 3: the cause readiness gives is cleared once the brokers answer again, and
    /// an old error is never the cause of a later outage.
    #[test]
    fn an_old_client_error_is_not_the_cause_of_a_later_outage() {
        let (c, stats) = ctx();
        let old = "127.0.0.1:9092/1: Disconnected (after 600000ms in state UP)";
        c.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            old,
        );
        // The brokers answer (statistics: a broker UP): healthy, no cause left.
        c.stats_raw(UP);
        assert_eq!(stats.client_error().map(|e| e.reason), None);
        assert!(crate::http::readiness(std::slice::from_ref(&stats))
            .iter()
            .all(|r| !r.contains("600000ms")));
        // Later, an outage: its cause is its own.
        c.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state CONNECT)",
        );
        c.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        let down = crate::http::readiness(std::slice::from_ref(&stats)).join("; ");
        assert!(down.contains("brokers unreachable"), "{down}");
        assert!(down.contains("Connection refused"), "{down}");
        assert!(!down.contains("600000ms"), "an old cause: {down}");
        // Back: no reason mentions the outage any more.
        c.stats_raw(UP);
        let back = crate::http::readiness(std::slice::from_ref(&stats)).join("; ");
        assert!(!back.contains("brokers unreachable"), "{back}");
        assert!(!back.contains("Connection refused"), "{back}");
        assert_eq!(stats.client_error().map(|e| e.reason), None);
    }

    #[test]
    fn the_rendezvous_mark_is_cleared_however_the_wait_ends() {
        let stats = PipelineStats::new("p");
        {
            let _g = stats.rendezvous(now_ms() + 60_000);
            assert!(stats.rendezvous_left_ms().is_some_and(|l| l > 50_000));
        }
        assert_eq!(stats.rendezvous_left_ms(), None);
        let _past = stats.rendezvous(now_ms().saturating_sub(1));
        assert_eq!(stats.rendezvous_left_ms(), None, "past its deadline");
    }
}
