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
    /// A processor dropped it (a filter, a route without a match).
    Filtered,
    /// `dedup` dropped it: its business id already completed.
    Deduplicated,
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
            Ok(Flow::Duplicate) => Outcome::Deduplicated,
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
            match p.process(msg).await? {
                Flow::Continue => {}
                stop => return Ok(stop),
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
        // nothing new is taken, and the commit point cannot pass this message. The hold is a
        // guard: if this future is dropped mid-await (its worker killed by a stopping
        // supervisor, a drain deadline) the hold goes with it.
        let mut hold: Option<crate::gate::HoldGuard> = None;
        loop {
            let mut headers = msg
                .headers
                .as_ref()
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
                    if hold.take().is_some() {
                        warn!(pipeline = %self.name, topic = %self.dead_letter_topic, tries, "dead-letter topic writable again");
                    }
                    self.stats.metrics.dlq_ok.increment(1);
                    return;
                }
                Err((err, _)) => {
                    tries += 1;
                    if hold.is_none() {
                        hold = Some(self.gate.hold());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_pipeline, Env, Global};
    use crate::kafka::client::producer_config;
    use crate::processors::{build_chain, BuildContext};
    use crate::stats::PipelineStats;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message as _};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn spec(brokers: &str, rest: &str) -> PipelineSpec {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            format!("topic = \"in\"\ngroup_id = \"g\"\nauto_offset_reset = \"earliest\"\n{rest}\n[[processors]]\ntype = \"log\"\n"),
        )
        .unwrap();
        let global = Global {
            brokers: brokers.into(),
            ..Global::default()
        };
        load_pipeline(&path, &global, &Env::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A pipeline whose chain is built from `spec` (its trailing `log` included).
    fn pipeline(spec: &PipelineSpec, producer: Producer) -> (Pipeline, Arc<Gate>) {
        let gate = Arc::new(Gate::default());
        let custom = |_: &str| None;
        let chain = build_chain(
            &spec.processors,
            &BuildContext {
                producer: &producer,
                custom: &custom,
                gate: &gate,
                pipeline: "p",
            },
        )
        .unwrap();
        let stats = PipelineStats::with_topic("p", "in");
        (
            Pipeline::new(spec, chain, producer, stats, gate.clone()),
            gate,
        )
    }

    fn traced(offset: i64, extra: &[(&str, &str)]) -> Message {
        let mut m = Message::new("in", 0, offset, Some(b"k"), br#"{"n": 1}"#);
        let mut h = OwnedHeaders::new().insert(Header {
            key: crate::trace::TRACEPARENT,
            value: Some(TP),
        });
        for (k, v) in extra {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        m.headers = Some(h);
        m
    }

    /// The headers of every message of partition 0 of `topic`, as (key, value) strings.
    fn read_all(brokers: &str, topic: &str, n: usize) -> Vec<Vec<(String, String)>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "reader")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while out.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{topic}: {} of {n} messages",
                out.len()
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                out.push(m.headers().map_or_else(Vec::new, |h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_string(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into(),
                            )
                        })
                        .collect()
                }));
            }
        }
        out
    }

    fn header<'a>(h: &'a [(String, String)], k: &str) -> Option<&'a str> {
        h.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
    }

    /// The written traceparent continues the input's: same trace id and flags, new span id.
    fn assert_continued(h: &[(String, String)], what: &str) {
        let tp = header(h, "traceparent").unwrap_or_else(|| panic!("{what}: no traceparent"));
        assert_eq!(
            crate::trace::trace_id(tp.as_bytes()),
            Some(TRACE),
            "{what}: {tp}"
        );
        assert_ne!(tp, TP, "{what}: the span id must be new");
        assert!(tp.ends_with("-01"), "{what}: flags kept: {tp}");
    }

    fn mock(topics: &[&str]) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        let c = MockCluster::new(1).unwrap();
        for t in topics {
            c.create_topic(t, 1, 1).unwrap();
        }
        c
    }

    #[tokio::test]
    async fn a_cancelled_dead_letter_write_releases_the_gate() {
        // Nothing listens on port 1: every dead-letter write times out, the gate is held and
        // the writer sleeps before the next try. Dropping it there is what a supervisor that
        // stops does to its running workers.
        let spec = spec(
            "127.0.0.1:1",
            "[retry]\nbackoff = \"10ms\"\nmax_backoff = \"50ms\"",
        );
        let producer: Producer = producer_config("127.0.0.1:1", &spec)
            .set("message.timeout.ms", "200")
            .create()
            .unwrap();
        let (p, gate) = pipeline(&spec, producer);
        let msg = Message::new("in", 0, 7, Some(b"k"), b"v");
        let e = ProcessError::permanent("decode", "bad");
        {
            let write = p.dead_letter_now(&msg, &e);
            tokio::pin!(write);
            let mut holds = gate.subscribe();
            tokio::time::timeout(Duration::from_secs(20), async {
                tokio::select! {
                    _ = &mut write => panic!("an unreachable dead-letter topic cannot be written"),
                    r = holds.wait_for(|n| *n > 0) => { r.unwrap(); }
                }
            })
            .await
            .expect("the failing write holds the gate");
            assert!(gate.is_held());
        }
        assert!(
            !gate.is_held(),
            "the dropped dead-letter write released its hold"
        );
    }

    #[tokio::test]
    async fn forward_leaves_headers_for_a_later_forward_and_a_header_dedup() {
        let cluster = mock(&["in", "a", "c", "in.dlq"]);
        let brokers = cluster.bootstrap_servers();
        let spec = spec(
            &brokers,
            r#"
[[processors]]
type = "forward"
topic = "a"
[[processors]]
type = "forward"
topic = "c"
[[processors]]
type = "dedup"
header = "idempotency-key"
ttl = "1h"
"#,
        );
        let producer: Producer = producer_config(&brokers, &spec).create().unwrap();
        let (p, _) = pipeline(&spec, producer);
        let m = traced(0, &[("idempotency-key", "order-1")]);
        assert_eq!(p.execute(&m, 1).await, Outcome::Processed);
        let again = traced(1, &[("idempotency-key", "order-1")]);
        assert_eq!(
            p.execute(&again, 1).await,
            Outcome::Deduplicated,
            "the second forward must not have taken the id header from dedup"
        );
        for topic in ["a", "c"] {
            let h = read_all(&brokers, topic, 2);
            assert_eq!(
                header(&h[0], "idempotency-key"),
                Some("order-1"),
                "{topic}: {h:?}"
            );
            assert_continued(&h[0], topic);
        }
    }

    #[tokio::test]
    async fn route_continues_the_trace() {
        let cluster = mock(&["in", "b", "in.dlq"]);
        let brokers = cluster.bootstrap_servers();
        let spec = spec(
            &brokers,
            r#"
[[processors]]
type = "route"
routes = [{ when = "headers.tenant == 'x'", topic = "b" }]
"#,
        );
        let producer: Producer = producer_config(&brokers, &spec).create().unwrap();
        let (p, _) = pipeline(&spec, producer);
        assert_eq!(
            p.execute(&traced(0, &[("tenant", "x")]), 1).await,
            Outcome::Processed
        );
        let h = read_all(&brokers, "b", 1);
        assert_eq!(header(&h[0], "tenant"), Some("x"));
        assert_continued(&h[0], "route");
    }
}
