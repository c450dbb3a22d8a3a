//! A pipeline at run time: the processor chain, the retry policy and the dead-letter writer.
//! Workers call [`Pipeline::execute`] once per message.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tracing::{debug, error, warn};

use crate::config::{PipelineSpec, RetryPolicy};
use crate::gate::Gate;
use crate::kafka::Producer;
use crate::message::Message;
use crate::processors::{Flow, ProcessError, Processor};
use crate::stats::PipelineStats;

/// How a message completed. Every variant completes its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Processed,
    /// A processor dropped it (a filter).
    Filtered,
    /// Written to the dead-letter topic after its last attempt or a permanent error.
    DeadLettered,
    /// Not complete: run it again as attempt `attempt` after `after`. Its key waits meanwhile.
    Retry {
        attempt: u32,
        after: Duration,
    },
}

pub struct Pipeline {
    pub name: String,
    chain: Vec<Arc<dyn Processor>>,
    retry: RetryPolicy,
    producer: Producer,
    dead_letter_topic: String,
    pub stats: Arc<PipelineStats>,
    /// Held while a breaker is open or the dead-letter topic fails: partitions pause.
    pub gate: Arc<Gate>,
}

impl Pipeline {
    pub fn new(
        spec: &PipelineSpec,
        chain: Vec<Arc<dyn Processor>>,
        producer: Producer,
        stats: Arc<PipelineStats>,
        gate: Arc<Gate>,
    ) -> Self {
        Pipeline {
            name: spec.name.clone(),
            chain,
            retry: spec.retry,
            producer,
            dead_letter_topic: spec.dead_letter_topic.clone(),
            stats,
            gate,
        }
    }

    /// Runs attempt `attempt` (1-based) of the chain. A retryable failure with attempts left
    /// returns [`Outcome::Retry`]: the caller (the partition supervisor) waits out the backoff
    /// with the key held but the worker free, so a failing key never blocks other keys. On a
    /// permanent error or the last failed attempt the message is dead-lettered; this returns only
    /// once the message is complete (processed, filtered, or acknowledged by the dead-letter
    /// topic), so its offset may be committed.
    pub async fn execute(&self, original: &Message, attempt: u32) -> Outcome {
        // Each attempt starts from the message as consumed: a clone shares key and payload
        // (`Bytes`), so no payload is copied.
        let mut msg = original.clone();
        match self.run_chain(&mut msg).await {
            Ok(Flow::Continue) => {
                for p in &self.chain {
                    p.completed(original);
                }
                Outcome::Processed
            }
            Ok(Flow::Drop) => Outcome::Filtered,
            Err(e) => {
                if let Some(wait) = e.not_attempted_wait() {
                    // An open circuit breaker: the same attempt runs again after the cool-down.
                    return Outcome::Retry {
                        attempt,
                        after: wait,
                    };
                }
                if e.is_retryable() && attempt < self.retry.max_attempts {
                    self.stats.retries.fetch_add(1, Relaxed);
                    self.stats.metrics.retried.increment(1);
                    let after = backoff(&self.retry, attempt);
                    debug!(offset = original.offset, attempt, error = %e, ?after, "retrying");
                    return Outcome::Retry {
                        attempt: attempt + 1,
                        after,
                    };
                }
                self.dead_letter(original, &e, attempt).await;
                Outcome::DeadLettered
            }
        }
    }

    async fn run_chain(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        for p in &self.chain {
            if p.process(msg).await? == Flow::Drop {
                return Ok(Flow::Drop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Dead-letters a message without running it (e.g. it crashed its worker repeatedly).
    pub async fn dead_letter_now(&self, msg: &Message, e: &ProcessError) {
        self.dead_letter(msg, e, self.retry.max_attempts).await
    }

    /// Writes the original message with headers naming the failure. Retries until the write is
    /// acknowledged: an offset is never completed for a message that is neither processed nor
    /// dead-lettered.
    async fn dead_letter(&self, msg: &Message, e: &ProcessError, attempts: u32) {
        warn!(pipeline = %self.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset, attempts, error = %e, "dead-lettering message");
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            .to_string();
        let attempts_s = attempts.to_string();
        let partition_s = msg.partition.to_string();
        let offset_s = msg.offset.to_string();
        let mut tries = 0u32;
        // While the dead-letter topic cannot be written the pipeline's partitions are paused:
        // nothing new is taken, and the commit point cannot pass this message.
        let mut holding = false;
        loop {
            let mut headers = msg
                .headers
                .clone()
                .map_or_else(OwnedHeaders::new, crate::trace::continue_trace);
            for (k, v) in [
                ("keyflow.error", e.message()),
                ("keyflow.error.kind", e.kind()),
                (
                    "keyflow.error.retryable",
                    if e.is_retryable() { "true" } else { "false" },
                ),
                ("keyflow.attempts", &attempts_s),
                ("keyflow.source.topic", &msg.topic),
                ("keyflow.source.partition", &partition_s),
                ("keyflow.source.offset", &offset_s),
                ("keyflow.pipeline", &self.name),
                ("keyflow.time", &now_ms),
            ] {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.dead_letter_topic).headers(headers);
            if let Some(k) = msg.key.as_deref() {
                record = record.key(k);
            }
            if let Some(p) = msg.payload.as_deref() {
                record = record.payload(p);
            }
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => {
                    self.stats.dead_lettered.fetch_add(1, Relaxed);
                    if holding {
                        self.gate.release();
                        warn!(pipeline = %self.name, topic = %self.dead_letter_topic, tries, "dead-letter topic writable again");
                    }
                    self.stats.metrics.dlq_ok.increment(1);
                    return;
                }
                Err((err, _)) => {
                    tries += 1;
                    if !holding {
                        holding = true;
                        self.gate.hold();
                    }
                    self.stats.metrics.dlq_failed.increment(1);
                    error!(pipeline = %self.name, topic = %self.dead_letter_topic, error = %err, tries, "dead-letter write failed; retrying");
                    tokio::time::sleep(backoff(&self.retry, tries)).await;
                }
            }
        }
    }
}

/// Exponential backoff with jitter: `backoff × 2^(attempt-1)`, capped, then scaled by a random
/// factor in [0.5, 1.0] so that failing keys do not retry in lockstep.
pub fn backoff(p: &RetryPolicy, attempt: u32) -> Duration {
    let base = p.backoff.get().as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
    let capped = base.min(p.max_backoff.get().as_secs_f64());
    Duration::from_secs_f64(capped * rand::rng().random_range(0.5..=1.0))
}
