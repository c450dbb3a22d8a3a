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

/// The values of `[kafka]` properties that hold secrets (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, …).
pub fn secret_values(kafka: &[(String, String)]) -> Vec<String> {
    kafka
        .iter()
        .filter(|(k, v)| (k.contains("password") || k.contains("secret")) && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect()
}

/// `text` with every secret value replaced by `***`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
}

/// librdkafka's statistics, reduced to what keyflow reads: the brokers' connection states.
#[derive(serde::Deserialize)]
struct BrokerStates {
    #[serde(default)]
    brokers: std::collections::HashMap<String, BrokerState>,
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
            // Keep the cause that brought them down (e.g. "Connection refused").
            self.stats.brokers_down();
            if self.stats.client_error().is_some() {
                return;
            }
        }
        let auth = code == Some(RDKafkaErrorCode::Authentication);
        let bad_cert =
            reason.contains("certificate verify failed") || reason.contains("SSL handshake failed");
        if auth {
            self.stats.brokers_down();
        }
        self.stats.set_client_error(ClientError {
            reason: format!("{error}: {reason}"),
            fatal_at_start: auth || bad_cert,
        });
    }

    /// librdkafka's statistics (`statistics.interval.ms`): a broker in state UP ends an outage.
    /// Parsed into the broker states only; runs on the poll thread every interval.
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(s) = serde_json::from_slice::<BrokerStates>(statistics) else {
            return;
        };
        if s.brokers.values().any(|b| b.state == "UP") {
            if self.stats.brokers_unreachable_for().is_some() {
                info!(pipeline = %self.pipeline, "brokers reachable again");
                self.stats.brokers_up();
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
