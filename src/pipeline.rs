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
use crate::kafka::transaction::{Ownership, Transactions, TxnGuard, WriteError};
use crate::kafka::Producer;
use crate::message::{Message, Record};
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
    pub(crate) chain: Arc<Vec<Arc<dyn Processor>>>,
    pub(crate) retry: RetryPolicy,
    producer: Producer,
    dead_letter_topic: Arc<str>,
    pub stats: Arc<PipelineStats>,
    /// Held while a breaker is open or the dead-letter topic fails: partitions pause.
    pub gate: Arc<Gate>,
    /// `delivery = "exactly_once"`: every write goes through the pipeline's transaction.
    pub txn: Option<Arc<Transactions>>,
    /// This pipeline's part of the process memory budget.
    pub memory: Arc<crate::memory::PipelineMemory>,
    /// Whether a processor of the chain has a `completed` hook (`dedup`, custom ones).
    completion_hooks: bool,
    /// `[state]`: the per-key state store, restored by each partition supervisor at start.
    pub state: Option<Arc<crate::state::Store>>,
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
            chain: Arc::new(chain),
            retry: spec.retry,
            producer,
            dead_letter_topic: Arc::from(spec.dead_letter_topic.as_str()),
            stats,
            gate,
            txn: None,
            memory: Arc::new(crate::memory::PipelineMemory::unbounded(
                spec.max_buffered_bytes,
            )),
            state: None,
            completion_hooks: spec.processors.iter().any(|p| {
                matches!(
                    p,
                    crate::processors::ProcessorConfig::Dedup(_)
                        | crate::processors::ProcessorConfig::Custom(_)
                )
            }),
        }
    }

    /// Exactly-once: the chain stages its records (built with `transactional`) and they, and
    /// dead letters, are written in `txn`.
    pub fn with_transactions(mut self, txn: Arc<Transactions>) -> Self {
        self.txn = Some(txn);
        self
    }

    /// `[state]`: the store its partition supervisors restore before fetching.
    pub fn with_state(mut self, state: Arc<crate::state::Store>) -> Self {
        self.state = Some(state);
        self
    }

    /// Bounds the pipeline's messages by its part of the process budget.
    pub fn with_memory(mut self, memory: Arc<crate::memory::PipelineMemory>) -> Self {
        self.memory = memory;
        self
    }

    /// Runs attempt `attempt` (1-based) of the chain. A retryable failure with attempts left
    /// returns [`Outcome::Retry`]: the caller (the partition supervisor) waits out the backoff
    /// with the key held but the worker free, so a failing key never blocks other keys. On a
    /// permanent error or the last failed attempt the message is dead-lettered; this returns only
    /// once the message is complete (processed, filtered, or acknowledged by the dead-letter
    /// topic), so its offset may be committed.
    pub async fn execute(&self, original: &Message, attempt: u32) -> Outcome {
        let owner = Arc::new(Ownership::default());
        self.execute_in(original, attempt, &owner).await.0
    }

    /// [`Self::execute`] for a partition's worker. Under exactly-once the message's records are
    /// written in the transaction once the chain succeeded, and the returned guard must be held
    /// until the completion has been sent to the supervisor (see [`crate::kafka::transaction`]);
    /// `owner` is the partition's right to write.
    pub async fn execute_in(
        &self,
        original: &Message,
        attempt: u32,
        owner: &Arc<Ownership>,
    ) -> (Outcome, Option<TxnGuard>) {
        // Each attempt starts from the message as consumed: a clone shares key and payload
        // (`Bytes`), so no payload is copied.
        let mut msg = original.clone();
        let mut res = self.run_chain(&mut msg).await;
        // At-least-once per-key state: the changelog records the chain staged are written once
        // it succeeded (after its outputs), before the change is applied and the offset done.
        if self.txn.is_none() && !msg.outbox.is_empty() && matches!(res, Ok(Flow::Continue)) {
            if let Some(st) = &self.state {
                if let Err(e) = st.flush(&msg.outbox).await {
                    res = Err(e);
                }
            }
        }
        match res {
            Ok(Flow::Continue) => {
                let Some(t) = &self.txn else {
                    if self.completion_hooks {
                        for p in self.chain.iter() {
                            p.written(original);
                        }
                    }
                    for p in self.chain.iter() {
                        p.completed(original);
                    }
                    return (Outcome::Processed, None);
                };
                let source = (original.partition, original.offset);
                if let Some((times, why)) = t.refused(source.0, source.1) {
                    // The broker refused its records for good (the transaction was aborted and
                    // this is the rerun): dead-letter it rather than abort again for ever.
                    let e = ProcessError::permanent(
                        "forward",
                        format!("output refused by the broker: {why}"),
                    );
                    return self
                        .dead_letter_refused(t, original, &e, attempt, owner, times)
                        .await;
                }
                let mut guard = None;
                if !msg.outbox.is_empty() {
                    match t
                        .write(owner, std::mem::take(&mut msg.outbox), source)
                        .await
                    {
                        Ok(g) => guard = Some(g),
                        Err(WriteError::TooLarge(err)) => {
                            let e = ProcessError::permanent(
                                "forward",
                                format!("output too large to write: {err}"),
                            );
                            return self
                                .dead_letter_in_transaction(t, original, &e, attempt, owner, 0)
                                .await;
                        }
                        Err(w) => return (not_written(original.offset, attempt, &w), None),
                    }
                }
                if self.completion_hooks {
                    // Per-key state: the next message of the key (possibly before the commit)
                    // sees this change; an abort rewinds and restores from the changelog.
                    for p in self.chain.iter() {
                        p.written(original);
                    }
                    // `dedup` must not remember a message whose transaction may still abort
                    // (its rerun would be dropped): the hooks run once it commits.
                    let (chain, m) = (self.chain.clone(), original.clone());
                    t.defer(Box::new(move || {
                        for p in chain.iter() {
                            p.completed(&m);
                        }
                    }));
                }
                (Outcome::Processed, guard)
            }
            Ok(Flow::Drop) => (Outcome::Filtered, None),
            Ok(Flow::Duplicate) => (Outcome::Deduplicated, None),
            Err(e) => {
                if let Some(wait) = e.not_attempted_wait() {
                    // An open circuit breaker: the same attempt runs again after the cool-down.
                    return (
                        Outcome::Retry {
                            attempt,
                            after: wait,
                        },
                        None,
                    );
                }
                if e.is_retryable() && attempt < self.retry.max_attempts {
                    self.stats.retries.fetch_add(1, Relaxed);
                    self.stats.metrics.retried.increment(1);
                    let after = backoff(&self.retry, attempt);
                    debug!(offset = original.offset, attempt, error = %e, ?after, "retrying");
                    return (
                        Outcome::Retry {
                            attempt: attempt + 1,
                            after,
                        },
                        None,
                    );
                }
                self.dead_letter_in(original, &e, attempt, owner).await
            }
        }
    }

    /// Dead-letters `msg` after attempt `attempts`, in the transaction under exactly-once.
    pub async fn dead_letter_in(
        &self,
        msg: &Message,
        e: &ProcessError,
        attempts: u32,
        owner: &Arc<Ownership>,
    ) -> (Outcome, Option<TxnGuard>) {
        match &self.txn {
            Some(t) => {
                self.dead_letter_in_transaction(t, msg, e, attempts, owner, 0)
                    .await
            }
            None => {
                self.dead_letter(msg, e, attempts).await;
                (Outcome::DeadLettered, None)
            }
        }
    }

    async fn run_chain(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        for p in self.chain.iter() {
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

    /// [`Self::dead_letter_now`] for a partition's worker (see [`Self::execute_in`]).
    pub async fn dead_letter_now_in(
        &self,
        msg: &Message,
        e: &ProcessError,
        owner: &Arc<Ownership>,
    ) -> (Outcome, Option<TxnGuard>) {
        self.dead_letter_in(msg, e, self.retry.max_attempts, owner)
            .await
    }

    /// Writes the original message with headers naming the failure. Retries until the write is
    /// acknowledged: an offset is never completed for a message that is neither processed nor
    /// dead-lettered.
    ///
    /// A dead letter too large to be written (the message was consumed, but cannot be produced
    /// as it is: above the producer's `message.max.bytes` or the topic's `max.message.bytes`)
    /// would fail for ever and keep the pipeline paused. It is written without what made it
    /// too large instead, see [`TRIMS`], each part left out named by a
    /// `keyflow.<part>.dropped = "too large: N bytes"` header; the reason stays in
    /// `keyflow.error`.
    pub(crate) async fn dead_letter(&self, msg: &Message, e: &ProcessError, attempts: u32) {
        warn!(pipeline = %self.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset, attempts, error = %e, "dead-lettering message");
        let fields = DeadLetterFields::of(msg, attempts);
        let mut trim = 0usize;
        let mut tries = 0u32;
        // While the dead-letter topic cannot be written the pipeline's partitions are paused:
        // nothing new is taken, and the commit point cannot pass this message. The hold is a
        // guard: if this future is dropped mid-await (its worker killed by a stopping
        // supervisor, a drain deadline) the hold goes with it.
        let mut hold: Option<crate::gate::HoldGuard> = None;
        loop {
            let t = TRIMS[trim];
            let r = self.dead_letter_record(msg, e, &fields, t);
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic);
            if let Some(h) = r.headers {
                record = record.headers(h);
            }
            if let Some(k) = r.key.as_deref() {
                record = record.key(k);
            }
            if let Some(p) = r.payload.as_deref() {
                record = record.payload(p);
            }
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => {
                    self.stats.dead_lettered.fetch_add(1, Relaxed);
                    if hold.take().is_some() {
                        warn!(pipeline = %self.name, topic = %self.dead_letter_topic, tries, "dead-letter topic writable again");
                    }
                    if trim > 0 {
                        warn!(pipeline = %self.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                            payload_dropped = t.payload, headers_dropped = t.headers, key_dropped = t.key,
                            "dead letter too large as it was; written without parts of the message");
                    }
                    self.stats.metrics.dlq_ok.increment(1);
                    return;
                }
                Err((err, _)) => {
                    let smaller =
                        (trim + 1..TRIMS.len()).find(|&i| TRIMS[i].drops_any(&fields.sizes));
                    if let (true, Some(next)) = (crate::processors::too_large(&err), smaller) {
                        // Not a failure of the topic: try at once with less of the message.
                        debug!(pipeline = %self.name, offset = msg.offset, error = %err, "dead letter too large; trimming");
                        trim = next;
                        continue;
                    }
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

    /// The dead letter of `msg`: the original key, value and headers (minus what `t` leaves
    /// out) and the `keyflow.*` headers naming the failure.
    fn dead_letter_record(
        &self,
        msg: &Message,
        e: &ProcessError,
        f: &DeadLetterFields,
        t: Trim,
    ) -> Record {
        let mut headers = match &msg.headers {
            Some(h) if !t.headers => crate::trace::continue_trace(h),
            // Left out: only the trace goes on (continued), so the dead letter stays
            // findable by trace id.
            Some(h) => match crate::trace::traceparent(h).and_then(crate::trace::continued) {
                Some(tp) => OwnedHeaders::new().insert(Header {
                    key: crate::trace::TRACEPARENT,
                    value: Some(&tp[..]),
                }),
                None => OwnedHeaders::new(),
            },
            None => OwnedHeaders::new(),
        };
        for (k, v) in [
            ("keyflow.error", e.message()),
            ("keyflow.error.kind", e.kind()),
            (
                "keyflow.error.retryable",
                if e.is_retryable() { "true" } else { "false" },
            ),
            ("keyflow.attempts", &f.attempts),
            ("keyflow.source.topic", &msg.topic),
            ("keyflow.source.partition", &f.partition),
            ("keyflow.source.offset", &f.offset),
            ("keyflow.pipeline", &self.name),
            ("keyflow.time", &f.now_ms),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        for (dropped, k, v) in [
            (t.payload, "keyflow.payload.dropped", &f.sizes.payload),
            (t.headers, "keyflow.headers.dropped", &f.sizes.headers),
            (t.key, "keyflow.key.dropped", &f.sizes.key),
        ] {
            if let (true, Some(v)) = (dropped, v) {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
        }
        Record {
            topic: self.dead_letter_topic.clone(),
            partition: None,
            key: msg.key.clone().filter(|_| !t.key),
            payload: msg.payload.clone().filter(|_| !t.payload),
            headers: Some(headers),
            timestamp_ms: None,
        }
    }

    /// Exactly-once dead letter: written in the pipeline's transaction (trimmed like
    /// [`Self::dead_letter`] when too large).
    async fn dead_letter_in_transaction(
        &self,
        t: &Transactions,
        msg: &Message,
        e: &ProcessError,
        attempts: u32,
        owner: &Arc<Ownership>,
        mut trim: usize,
    ) -> (Outcome, Option<TxnGuard>) {
        warn!(pipeline = %self.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset, attempts, error = %e, "dead-lettering message (in the transaction)");
        let fields = DeadLetterFields::of(msg, attempts);
        loop {
            let r = self.dead_letter_record(msg, e, &fields, TRIMS[trim]);
            match t.write(owner, vec![r], (msg.partition, msg.offset)).await {
                Ok(g) => {
                    t.settled(msg.partition, msg.offset);
                    self.stats.dead_lettered.fetch_add(1, Relaxed);
                    self.stats.metrics.dlq_ok.increment(1);
                    return (Outcome::DeadLettered, Some(g));
                }
                Err(WriteError::TooLarge(err)) => {
                    match (trim + 1..TRIMS.len()).find(|&i| TRIMS[i].drops_any(&fields.sizes)) {
                        Some(next) => trim = next,
                        None => {
                            let cause =
                                format!("dead letter too large even without the message: {err}");
                            t.fail(&cause);
                            return (
                                not_written(msg.offset, attempts, &WriteError::Failed(cause)),
                                None,
                            );
                        }
                    }
                }
                Err(w) => return (not_written(msg.offset, attempts, &w), None),
            }
        }
    }

    /// The rerun of a message whose records the broker refused (`times` refusals, the last
    /// one `e`): dead-lettered whole the first time, with only the `keyflow.*` headers if the
    /// dead-letter topic refused it too; after a third refusal nothing of it can be written,
    /// and it completes with an error in the log rather than stop the partition for ever.
    async fn dead_letter_refused(
        &self,
        t: &Transactions,
        msg: &Message,
        e: &ProcessError,
        attempts: u32,
        owner: &Arc<Ownership>,
        times: u32,
    ) -> (Outcome, Option<TxnGuard>) {
        match times {
            1 => {
                self.dead_letter_in_transaction(t, msg, e, attempts, owner, 0)
                    .await
            }
            2 => {
                self.dead_letter_in_transaction(t, msg, e, attempts, owner, TRIMS.len() - 1)
                    .await
            }
            _ => {
                error!(pipeline = %self.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset, error = %e,
                    "neither the output nor the dead-letter topic accepts this message, even without its key, value and headers; it completes unwritten");
                t.settled(msg.partition, msg.offset);
                self.stats.metrics.dlq_failed.increment(1);
                (Outcome::DeadLettered, None)
            }
        }
    }
}

/// The `keyflow.*` values of a dead letter that do not change between tries.
struct DeadLetterFields {
    now_ms: String,
    attempts: String,
    partition: String,
    offset: String,
    sizes: Sizes,
}

impl DeadLetterFields {
    fn of(msg: &Message, attempts: u32) -> Self {
        DeadLetterFields {
            now_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
                .to_string(),
            attempts: attempts.to_string(),
            partition: msg.partition.to_string(),
            offset: msg.offset.to_string(),
            sizes: Sizes::of(msg),
        }
    }
}

/// A message whose records could not be written in the transaction stays incomplete: given up
/// (the next owner runs it) or the pipeline is failing (the restart runs it).
fn not_written(offset: i64, attempt: u32, e: &WriteError) -> Outcome {
    debug!(offset, error = %e, "not written in the transaction");
    Outcome::Retry {
        attempt,
        after: match e {
            WriteError::GivenUp => Duration::from_secs(3600),
            _ => Duration::from_secs(1),
        },
    }
}

/// What the dead-letter writer leaves out of a dead letter that is too large, tried in this
/// order until one fits: nothing; the payload (the usual culprit); the message's own headers
/// but not the payload (a small payload stays replayable when a header is the culprit); both;
/// also the key. The `keyflow.*` headers, which say what happened, are always written.
const TRIMS: [Trim; 5] = [
    Trim::NONE,
    Trim {
        payload: true,
        ..Trim::NONE
    },
    Trim {
        headers: true,
        ..Trim::NONE
    },
    Trim {
        payload: true,
        headers: true,
        key: false,
    },
    Trim {
        payload: true,
        headers: true,
        key: true,
    },
];

#[derive(Debug, Clone, Copy)]
struct Trim {
    payload: bool,
    headers: bool,
    key: bool,
}

impl Trim {
    const NONE: Trim = Trim {
        payload: false,
        headers: false,
        key: false,
    };

    /// Whether leaving these parts out changes the record (a part that is absent or empty
    /// is not worth a try).
    fn drops_any(self, s: &Sizes) -> bool {
        (self.payload && s.payload.is_some())
            || (self.headers && s.headers.is_some())
            || (self.key && s.key.is_some())
    }
}

/// `"too large: N bytes"` for each non-empty part of a message, the values of the
/// `keyflow.<part>.dropped` headers.
struct Sizes {
    payload: Option<String>,
    headers: Option<String>,
    key: Option<String>,
}

impl Sizes {
    fn of(msg: &Message) -> Sizes {
        use rdkafka::message::Headers as _;
        let text = |n: usize| (n > 0).then(|| format!("too large: {n} bytes"));
        Sizes {
            payload: text(msg.payload.as_ref().map_or(0, |p| p.len())),
            headers: text(msg.headers.as_ref().map_or(0, |h| {
                h.iter()
                    .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len))
                    .sum()
            })),
            key: text(msg.key.as_ref().map_or(0, |k| k.len())),
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

/// Tests: a pipeline for `spec` with its chain built as the runtime builds it (`custom` names
/// the custom processors), a fresh gate, and the stats of pipeline "p" on topic "in".
#[cfg(test)]
pub(crate) fn for_test(
    spec: &PipelineSpec,
    producer: Producer,
    custom: &dyn Fn(&str) -> Option<Arc<dyn Processor>>,
) -> (Pipeline, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let chain = crate::processors::build_chain(
        &spec.processors,
        &crate::processors::BuildContext {
            producer: &producer,
            custom,
            gate: &gate,
            pipeline: "p",
            transactional: false,
        },
    )
    .expect("the test pipeline's chain builds");
    let stats = PipelineStats::with_topic("p", "in");
    (
        Pipeline::new(spec, chain, producer, stats, gate.clone()),
        gate,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_pipeline, Env, Global};
    use crate::kafka::client::producer_config;
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
        for_test(spec, producer, &|_| None)
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
        m.set_headers(h);
        m
    }

    /// The headers of every message of partition 0 of `topic`, as (key, value) strings.
    fn read_all(brokers: &str, topic: &str, n: usize) -> Vec<Vec<(String, String)>> {
        read_records(brokers, topic, n)
            .into_iter()
            .map(|r| r.headers)
            .collect()
    }

    struct Record {
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Vec<(String, String)>,
    }

    /// Every message of partition 0 of `topic`: key, payload and headers.
    fn read_records(brokers: &str, topic: &str, n: usize) -> Vec<Record> {
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
                out.push(Record {
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m.headers().map_or_else(Vec::new, |h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default()).into(),
                                )
                            })
                            .collect()
                    }),
                });
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

    /// Runs `m` to its end as the partition supervisor would: each `Retry` waits out its
    /// backoff and runs the next attempt. Returns the outcome and the last attempt.
    async fn to_the_end(p: &Pipeline, m: &Message) -> (Outcome, u32) {
        let mut attempt = 1;
        loop {
            match p.execute(m, attempt).await {
                Outcome::Retry { attempt: a, after } => {
                    tokio::time::sleep(after).await;
                    attempt = a;
                }
                o => return (o, attempt),
            }
        }
    }

    #[tokio::test]
    async fn an_oversized_message_is_dead_lettered_and_the_partition_moves_on() {
        // The producer refuses anything above 1,000 bytes (librdkafka's minimum; 1,000,000 by
        // default, below the broker's 1,048,588): a 2,000-byte message consumed fine can never
        // be forwarded, nor dead-lettered as it is.
        let cluster = mock(&["in", "out", "in.dlq"]);
        let brokers = cluster.bootstrap_servers();
        let spec = spec(
            &brokers,
            r#"
[retry]
max_attempts = 3
backoff = "10ms"
max_backoff = "50ms"
[[processors]]
type = "forward"
topic = "out"
"#,
        );
        let producer: Producer = producer_config(&brokers, &spec)
            .set("message.max.bytes", "1000")
            .create()
            .unwrap();
        let (p, gate) = pipeline(&spec, producer);
        // 1. The payload is too large: dead-lettered without it, headers kept.
        let mut big_payload = traced(0, &[("tenant", "x")]);
        big_payload.payload = Some(vec![b'v'; 2000].into());
        // 2. A header is too large: dead-lettered with the payload, without the headers.
        let blob = "h".repeat(1500);
        let mut big_headers = traced(1, &[("blob", &blob)]);
        big_headers.payload = Some(b"small".to_vec().into());
        // 3. The key is too large: only the keyflow headers are left.
        let mut big_key = traced(2, &[]);
        big_key.key = Some(vec![b'k'; 1500].into());
        let started = std::time::Instant::now();
        for m in [&big_payload, &big_headers, &big_key] {
            let (outcome, attempt) =
                tokio::time::timeout(Duration::from_secs(10), to_the_end(&p, m))
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "offset {}: not complete after 10 s; its partition is stuck",
                            m.offset
                        )
                    });
            assert_eq!(outcome, Outcome::DeadLettered, "offset {}", m.offset);
            assert_eq!(attempt, 1, "a size error is permanent: no retry");
        }
        assert!(!gate.is_held(), "nothing left paused");
        assert_eq!(p.stats.dead_lettered.load(Relaxed), 3);
        println!(
            "3 oversized messages dead-lettered in {:?}",
            started.elapsed()
        );

        let r = read_records(&brokers, "in.dlq", 3);
        for (i, rec) in r.iter().enumerate() {
            let h = &rec.headers;
            let err = header(h, "keyflow.error").unwrap_or_default();
            assert!(err.contains("too large"), "{i}: the reason: {err:?}");
            println!("dead letter {i}: keyflow.error = {err:?}");
            assert_eq!(header(h, "keyflow.error.kind"), Some("forward"), "{i}");
            assert_eq!(header(h, "keyflow.error.retryable"), Some("false"), "{i}");
            assert_eq!(header(h, "keyflow.attempts"), Some("1"), "{i}");
            assert_eq!(header(h, "keyflow.source.offset"), Some(&*i.to_string()));
            assert_continued(h, "dead letter");
        }
        // 1: no payload, a header saying why, the original headers kept.
        assert_eq!(r[0].payload, None);
        assert_eq!(
            header(&r[0].headers, "keyflow.payload.dropped"),
            Some("too large: 2000 bytes")
        );
        assert_eq!(header(&r[0].headers, "tenant"), Some("x"));
        assert_eq!(r[0].key.as_deref(), Some(&b"k"[..]));
        // 2: the payload kept, the original headers (apart from the trace) dropped.
        assert_eq!(r[1].payload.as_deref(), Some(&b"small"[..]));
        assert_eq!(header(&r[1].headers, "keyflow.payload.dropped"), None);
        assert_eq!(header(&r[1].headers, "blob"), None);
        let hdr_bytes = "traceparent".len() + TP.len() + "blob".len() + blob.len();
        assert_eq!(
            header(&r[1].headers, "keyflow.headers.dropped"),
            Some(&*format!("too large: {hdr_bytes} bytes"))
        );
        // 3: neither key, payload nor original headers.
        assert_eq!(r[2].key, None);
        assert_eq!(
            header(&r[2].headers, "keyflow.key.dropped"),
            Some("too large: 1500 bytes")
        );
    }

    #[tokio::test]
    async fn an_oversized_message_routed_is_dead_lettered_at_once() {
        let cluster = mock(&["in", "out", "in.dlq"]);
        let brokers = cluster.bootstrap_servers();
        let spec = spec(
            &brokers,
            r#"
[retry]
max_attempts = 3
backoff = "10ms"
max_backoff = "50ms"
[[processors]]
type = "route"
routes = [{ when = "`true`", topic = "out" }]
"#,
        );
        let producer: Producer = producer_config(&brokers, &spec)
            .set("message.max.bytes", "1000")
            .create()
            .unwrap();
        let (p, gate) = pipeline(&spec, producer);
        let m = Message::new("in", 0, 0, Some(b"k"), &[b'v'; 2000]);
        let (outcome, attempt) = tokio::time::timeout(Duration::from_secs(10), to_the_end(&p, &m))
            .await
            .expect("the oversized message completes");
        assert_eq!((outcome, attempt), (Outcome::DeadLettered, 1));
        assert!(!gate.is_held());
        let r = read_records(&brokers, "in.dlq", 1);
        assert_eq!(header(&r[0].headers, "keyflow.error.kind"), Some("route"));
        assert_eq!(
            header(&r[0].headers, "keyflow.payload.dropped"),
            Some("too large: 2000 bytes")
        );
    }
}
