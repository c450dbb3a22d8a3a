//! The consumer context: turns librdkafka's rebalance callbacks into coordinator messages.
//!
//! The callbacks run on the poll thread (inside `BaseConsumer::poll`). On a revoke the context
//! hands the partitions to the coordinator and **waits** (a rendezvous, bounded by the drain
//! deadline) until their supervisors have drained, then commits their final offsets
//! synchronously before librdkafka gives the partitions away. Blocking here is safe because the
//! poll thread belongs to keyflow alone; the actors run on the tokio runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock, Weak};
use std::time::Duration;

use ractor::ActorRef;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientContext, TopicPartitionList};
use tracing::{error, info, warn};

use super::offsets;
use crate::actors::coordinator::{AssignedPartition, CoordinatorMsg, DrainedOffset};
use crate::stats::PipelineStats;

pub struct KeyflowContext {
    pipeline: String,
    coordinator: OnceLock<ActorRef<CoordinatorMsg>>,
    consumer: OnceLock<Weak<super::Consumer>>,
    /// How long a revoke may wait for the drain (the drain deadline plus a margin).
    rendezvous_timeout: Duration,
    /// Set once shutdown has drained and committed: the revokes of the final leave need no
    /// rendezvous.
    closing: AtomicBool,
    stats: Arc<PipelineStats>,
}

impl KeyflowContext {
    pub fn new(pipeline: &str, drain_timeout: Duration, stats: Arc<PipelineStats>) -> Self {
        KeyflowContext {
            pipeline: pipeline.to_string(),
            coordinator: OnceLock::new(),
            consumer: OnceLock::new(),
            rendezvous_timeout: drain_timeout + Duration::from_secs(2),
            closing: AtomicBool::new(false),
            stats,
        }
    }

    pub fn set_coordinator(&self, c: ActorRef<CoordinatorMsg>) {
        let _ = self.coordinator.set(c);
    }

    pub(super) fn set_consumer(&self, c: Weak<super::Consumer>) {
        let _ = self.consumer.set(c);
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
        if coordinator
            .cast(CoordinatorMsg::Revoke {
                partitions,
                lost,
                reply: tx,
            })
            .is_err()
        {
            return;
        }
        match rx.recv_timeout(self.rendezvous_timeout) {
            Ok(drained) if !lost => {
                let offsets: Vec<(&str, i32, i64)> = drained
                    .iter()
                    .map(|d: &DrainedOffset| (&*d.topic, d.partition, d.next_offset))
                    .collect();
                match offsets::commit(consumer, &offsets, CommitMode::Sync) {
                    Ok(()) => {
                        info!(pipeline = %self.pipeline, ?offsets, "committed revoked partitions")
                    }
                    Err(e) => {
                        warn!(pipeline = %self.pipeline, error = %e, "commit of revoked partitions failed; they will be redelivered")
                    }
                }
            }
            // A lost assignment belongs to someone else already: committing would be refused.
            Ok(_) => {}
            Err(_) => {
                warn!(pipeline = %self.pipeline, "revoke: drain rendezvous timed out; uncommitted work will be redelivered")
            }
        }
    }
}

impl ClientContext for KeyflowContext {
    fn error(&self, error: KafkaError, reason: &str) {
        error!(pipeline = %self.pipeline, error = %error, reason, "kafka client error");
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
        // Successes are counted when the commit is sent; failures when librdkafka reports them.
        if let Err(e) = result {
            self.stats.commit(false);
            warn!(pipeline = %self.pipeline, error = %e, partitions = offsets.count(), "offset commit failed");
        }
    }
}
