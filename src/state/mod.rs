//! Per-key state (event sourcing): a [`Store`] per pipeline with `[state]`, one in-memory map
//! per input partition, every change persisted to a compacted **changelog topic**
//! co-partitioned with the input (changelog partition `p` holds the state of input partition
//! `p`), restored from it when a partition is assigned.
//!
//! - Ownership: keyflow runs one message per key at a time and a partition on one member at a
//!   time, so only the worker running a key's message touches that key. The per-partition
//!   `Mutex` is held around a get or a put only, never across an `.await`.
//! - Writes: a change is staged by the processor ([`Store::stage`]) and applied in memory only
//!   once the message's writes succeeded ([`Store::applied`], from
//!   [`crate::processors::Processor::written`]): a failed attempt, a retry or a dead letter
//!   never leaves its change behind. Under `exactly_once` the changelog record joins the
//!   message's outbox (same transaction as its outputs and input offset); otherwise it is
//!   written after the outputs and awaited before the offset completes.
//! - Restore ([`Store::restore`]): the partition supervisor reads its changelog partition from
//!   the beginning to the end (`read_committed`) before it fetches its first message; readiness
//!   says "restoring state" meanwhile.
//! - Memory: everything is in memory; `keyflow_state_bytes` shows what it takes (see README
//!   "Per-key state"). An on-disk store is the documented next step.

pub mod processor;

pub use processor::{Outputs, StateChange, Stateful, StatefulProcessor};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::config::PipelineSpec;
use crate::kafka::Producer;
use crate::message::{Message, Record};
use crate::processors::ProcessError;

/// Metric names (units in the name; labels: `pipeline`).
pub const STATE_BYTES: &str = "keyflow_state_bytes";
pub const STATE_KEYS: &str = "keyflow_state_keys";
pub const STATE_RESTORE_SECONDS: &str = "keyflow_state_restore_seconds";
pub const STATE_RESTORED_KEYS: &str = "keyflow_state_restored_keys";

/// What an entry costs beyond its key and value: the map slot, two `Bytes` headers and the
/// allocator's rounding (an estimate, as [`crate::message::MESSAGE_COST`]).
const ENTRY_COST: usize = 96;

/// The state key prefix of a `dedup` id; its value is the completion time (wall-clock
/// milliseconds, 8 bytes big-endian).
pub const DEDUP_PREFIX: &[u8] = b"\0dedup\0";

/// The most expired dedup ids one put removes (each put adds one: the expiry keeps up).
const EXPIRE_PER_PUT: usize = 64;

/// The time held by a dedup entry's value.
fn entry_ms(v: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(v).ok().map(i64::from_be_bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state changelog {topic:?}: {message}")]
    Changelog { topic: String, message: String },
    #[error("state changelog {topic:?}: kafka: {source}")]
    Kafka {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    value: Bytes,
}

/// A change computed by an attempt, applied once that attempt's writes succeeded.
#[derive(Debug)]
struct Pending {
    offset: i64,
    value: Option<Bytes>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Bytes, Entry>,
    pending: HashMap<Bytes, Pending>,
    bytes: usize,
    last_update_ms: i64,
    /// Dedup ids in completion order, expired from the front (see [`Store::put_now`]).
    expiring: VecDeque<(Bytes, i64)>,
}

/// One input partition's state.
#[derive(Debug, Default)]
pub struct PartitionState {
    inner: Mutex<Inner>,
    /// A guard marks it while its changelog is read.
    restoring: std::sync::atomic::AtomicBool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn cost(key: &Bytes, value: &Bytes) -> usize {
    ENTRY_COST + key.len() + value.len()
}

impl Inner {
    /// Sets or deletes `key`; returns the change in bytes.
    fn put(&mut self, key: Bytes, value: Option<Bytes>, at_ms: i64) -> isize {
        let before = self.bytes;
        match value {
            Some(v) => {
                let add = cost(&key, &v);
                if let Some(old) = self.map.insert(key.clone(), Entry { value: v }) {
                    self.bytes -= cost(&key, &old.value);
                }
                self.bytes += add;
            }
            None => {
                if let Some(old) = self.map.remove(&key) {
                    self.bytes -= cost(&key, &old.value);
                }
            }
        }
        self.last_update_ms = self.last_update_ms.max(at_ms);
        self.bytes as isize - before as isize
    }
}

/// Marks a partition as restoring and counts it in the store; undone on drop, so a restore
/// dropped mid-await (its supervisor stopped) never leaves readiness at "restoring".
struct RestoringGuard<'a>(&'a Store, &'a PartitionState);

impl Drop for RestoringGuard<'_> {
    fn drop(&mut self) {
        self.1.restoring.store(false, Relaxed);
        self.0.restoring.fetch_sub(1, Relaxed);
    }
}

/// A pipeline's per-key state.
pub struct Store {
    pipeline: String,
    changelog: Arc<str>,
    /// `exactly_once`: changelog records join the message's outbox.
    transactional: bool,
    producer: Producer,
    /// Index = input partition (the partition count is fixed when the store is made).
    partitions: Vec<PartitionState>,
    restoring: AtomicUsize,
    bytes: AtomicI64,
    /// `dedup`'s ttl in milliseconds (0: no dedup): its ids older than it leave the state.
    expiry_ms: AtomicI64,
    /// How to reach the brokers for the restore reader.
    client: ClientConfig,
    bytes_gauge: metrics::Gauge,
    keys_gauge: metrics::Gauge,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pipeline", &self.pipeline)
            .field("changelog", &self.changelog)
            .field("partitions", &self.partitions.len())
            .finish()
    }
}

/// `/debug/state`: what one partition holds (never the values).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionReport {
    pub partition: i32,
    pub keys: usize,
    pub bytes: usize,
    /// Wall-clock milliseconds of the last change (0: none).
    pub last_update_ms: i64,
    pub restoring: bool,
}

impl Store {
    /// Checks the changelog topic (same partition count as the input, `cleanup.policy`
    /// compact), creating it if missing, and makes the store. Refuses a changelog that does not
    /// fit, naming what it found.
    pub async fn open(
        brokers: &str,
        spec: &PipelineSpec,
        producer: Producer,
    ) -> Result<Arc<Self>, StateError> {
        let Some(st) = &spec.state else {
            return Err(StateError::Changelog {
                topic: String::new(),
                message: "the pipeline has no [state] table".into(),
            });
        };
        let topic = st.changelog.clone();
        let kafka = |source| StateError::Kafka {
            topic: topic.clone(),
            source,
        };
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", brokers);
        for (k, v) in &spec.kafka {
            client.set(k, v);
        }
        let partitions = ensure_changelog(&client, spec, &topic)
            .await
            .map_err(|e| match e {
                Ensure::Kafka(k) => kafka(k),
                Ensure::Refused(message) => StateError::Changelog {
                    topic: topic.clone(),
                    message,
                },
            })?;
        info!(pipeline = %spec.name, changelog = %topic, partitions, "state: changelog topic ready");
        Ok(Arc::new(Store {
            pipeline: spec.name.clone(),
            changelog: Arc::from(topic.as_str()),
            transactional: spec.delivery == crate::config::Delivery::ExactlyOnce,
            producer,
            partitions: (0..partitions).map(|_| PartitionState::default()).collect(),
            restoring: AtomicUsize::new(0),
            bytes: AtomicI64::new(0),
            expiry_ms: AtomicI64::new(0),
            client,
            bytes_gauge: metrics::gauge!(STATE_BYTES, "pipeline" => spec.name.clone()),
            keys_gauge: metrics::gauge!(STATE_KEYS, "pipeline" => spec.name.clone()),
        }))
    }

    /// A store without a broker (unit tests, `keyflow test`): changes are applied, nothing is
    /// persisted.
    #[doc(hidden)]
    pub fn in_memory(partitions: usize, producer: Producer, transactional: bool) -> Arc<Self> {
        Arc::new(Store {
            pipeline: "test".into(),
            changelog: Arc::from("changelog"),
            transactional,
            producer,
            partitions: (0..partitions).map(|_| PartitionState::default()).collect(),
            restoring: AtomicUsize::new(0),
            bytes: AtomicI64::new(0),
            expiry_ms: AtomicI64::new(0),
            client: ClientConfig::new(),
            bytes_gauge: metrics::Gauge::noop(),
            keys_gauge: metrics::Gauge::noop(),
        })
    }

    pub fn changelog(&self) -> &str {
        &self.changelog
    }

    fn partition(&self, p: i32) -> Result<&PartitionState, ProcessError> {
        usize::try_from(p)
            .ok()
            .and_then(|i| self.partitions.get(i))
            .ok_or_else(|| {
                ProcessError::retryable(
                    "state",
                    format!(
                        "partition {p} has no state (the changelog {:?} has {} partitions; the input grew?)",
                        self.changelog,
                        self.partitions.len()
                    ),
                )
            })
    }

    /// The current value of `key` in `msg`'s partition (what the last completed message of the
    /// key left). A change staged by an earlier attempt of `msg` is ignored.
    pub fn get(&self, msg: &Message, key: &Bytes) -> Result<Option<Bytes>, ProcessError> {
        let p = self.partition(msg.partition)?;
        let mut inner = p.inner.lock().unwrap_or_else(|e| e.into_inner());
        // A change an earlier attempt staged is void: this attempt decides again.
        inner.pending.remove(key);
        Ok(inner.map.get(key).map(|e| e.value.clone()))
    }

    /// Stages a change of `key` by `msg`: the changelog record joins `msg`'s outbox (written in
    /// the transaction under `exactly_once`, by [`Self::flush`] otherwise). Applied in memory
    /// by [`Self::applied`] once the message's writes succeeded.
    pub async fn stage(
        &self,
        msg: &mut Message,
        key: Bytes,
        value: Option<Bytes>,
    ) -> Result<(), ProcessError> {
        let p = self.partition(msg.partition)?;
        let record = Record {
            topic: self.changelog.clone(),
            partition: Some(msg.partition),
            key: Some(key.clone()),
            payload: value.clone(),
            headers: None,
            timestamp_ms: msg.timestamp_ms,
        };
        {
            let mut inner = p.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.pending.insert(
                key,
                Pending {
                    offset: msg.offset,
                    value,
                },
            );
        }
        // Both modes: the record waits in the outbox for the end of the chain. Under
        // `exactly_once` it joins the message's transaction; otherwise the pipeline writes it
        // once the whole chain succeeded, after the outputs ([`Self::flush`]): a message
        // dropped or dead-lettered later in the chain leaves no change in the changelog.
        msg.outbox.push(record);
        Ok(())
    }

    /// At-least-once: writes the changelog records of a message whose chain succeeded,
    /// awaited, before its change is applied and its offset completes.
    pub async fn flush(&self, records: &[Record]) -> Result<(), ProcessError> {
        for r in records {
            self.write(r).await?;
        }
        Ok(())
    }

    /// Writes one changelog record outside a transaction, awaited.
    async fn write(&self, r: &Record) -> Result<(), ProcessError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic);
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(k) = r.key.as_deref() {
            record = record.key(k);
        }
        if let Some(v) = r.payload.as_deref() {
            record = record.payload(v);
        }
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(crate::processors::write_error("state", &r.topic, &e)),
        }
    }

    /// Under `exactly_once`: adds a changelog record of `key` to `msg`'s outbox, written in the
    /// transaction with the message's other records (if the chain succeeds); the in-memory
    /// change is made by [`Self::put_now`] when the transaction commits. Does nothing
    /// otherwise.
    pub fn stage_in_transaction(&self, msg: &mut Message, key: Bytes, value: Option<Bytes>) {
        if self.transactional {
            msg.outbox.push(Record {
                topic: self.changelog.clone(),
                partition: Some(msg.partition),
                key: Some(key),
                payload: value,
                headers: None,
                timestamp_ms: msg.timestamp_ms,
            });
        }
    }

    /// Writes a change now (not staged): `dedup` at completion outside `exactly_once`. The
    /// record is queued, not awaited (the completion hook is synchronous): a crash right after
    /// can lose it, as it could lose the in-memory window before.
    pub fn put_now(&self, msg: &Message, key: Bytes, value: Option<Bytes>) {
        let Ok(p) = self.partition(msg.partition) else {
            return;
        };
        let ttl = self.expiry_ms.load(Relaxed);
        let delta = {
            let mut inner = p.inner.lock().unwrap_or_else(|e| e.into_inner());
            let now = now_ms();
            let mut delta = inner.put(key.clone(), value.clone(), now);
            if ttl > 0 && key.starts_with(DEDUP_PREFIX) {
                let at = value.as_deref().and_then(entry_ms).unwrap_or(now);
                inner.expiring.push_back((key.clone(), at));
                delta += self.expire(&mut inner, msg.partition, now, ttl);
            }
            delta
        };
        self.account(delta, p);
        if self.transactional {
            return;
        }
        self.send_now(msg.partition, &key, value.as_deref());
    }

    /// Queues a changelog record outside a transaction (not awaited).
    fn send_now(&self, partition: i32, key: &[u8], value: Option<&[u8]>) {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.changelog).partition(partition);
        record = record.key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Err((e, _)) = self.producer.send_result(record) {
            warn!(pipeline = %self.pipeline, changelog = %self.changelog, error = %e, "state: changelog write not queued");
        }
    }

    /// `dedup`'s ttl: its ids older than it leave the state (memory, and the changelog by a
    /// tombstone outside `exactly_once`; under it a restore drops them).
    pub fn set_expiry(&self, ttl: Duration) {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        self.expiry_ms.store(ms, Relaxed);
    }

    /// Removes up to [`EXPIRE_PER_PUT`] dedup ids older than `ttl` ms (an id completed again
    /// since is kept: its newer entry is further back). Returns the change in bytes.
    fn expire(&self, inner: &mut Inner, partition: i32, now: i64, ttl: i64) -> isize {
        let mut delta = 0;
        for _ in 0..EXPIRE_PER_PUT {
            match inner.expiring.front() {
                Some((_, at)) if now.saturating_sub(*at) > ttl => {}
                _ => break,
            }
            let Some((key, _)) = inner.expiring.pop_front() else {
                break;
            };
            let expired = inner
                .map
                .get(&key)
                .is_some_and(|e| entry_ms(&e.value).map_or(true, |t| now.saturating_sub(t) > ttl));
            if expired {
                delta += inner.put(key.clone(), None, now);
                if !self.transactional {
                    self.send_now(partition, &key, None);
                }
            }
        }
        delta
    }

    /// The message's writes succeeded (`written` hook): apply the change it staged, if any.
    pub fn applied(&self, msg: &Message, key: &Bytes) {
        let Ok(p) = self.partition(msg.partition) else {
            return;
        };
        let delta = {
            let mut inner = p.inner.lock().unwrap_or_else(|e| e.into_inner());
            match inner.pending.remove(key) {
                Some(c) if c.offset == msg.offset => inner.put(key.clone(), c.value, now_ms()),
                // Staged by another message (cannot happen: one message per key at a time).
                Some(other) => {
                    inner.pending.insert(key.clone(), other);
                    0
                }
                None => 0,
            }
        };
        self.account(delta, p);
    }

    fn account(&self, delta: isize, _p: &PartitionState) {
        if delta != 0 {
            let total = self.bytes.fetch_add(delta as i64, Relaxed) + delta as i64;
            self.bytes_gauge.set(total as f64);
        }
    }

    /// Bytes held by every partition's state (`keyflow_state_bytes`).
    pub fn bytes(&self) -> i64 {
        self.bytes.load(Relaxed)
    }

    /// Marks `p` as restoring (readiness, `/debug/state`) until the guard drops.
    fn mark_restoring<'a>(&'a self, p: &'a PartitionState) -> RestoringGuard<'a> {
        p.restoring.store(true, Relaxed);
        self.restoring.fetch_add(1, Relaxed);
        RestoringGuard(self, p)
    }

    /// Partitions reading their changelog now.
    pub fn restoring(&self) -> Vec<i32> {
        if self.restoring.load(Relaxed) == 0 {
            return Vec::new();
        }
        (0..self.partitions.len())
            .filter(|&i| self.partitions[i].restoring.load(Relaxed))
            .map(|i| i as i32)
            .collect()
    }

    /// Per partition: keys, bytes, last update (never values).
    pub fn report(&self) -> Vec<PartitionReport> {
        self.partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let inner = p.inner.lock().unwrap_or_else(|e| e.into_inner());
                PartitionReport {
                    partition: i as i32,
                    keys: inner.map.len(),
                    bytes: inner.bytes,
                    last_update_ms: inner.last_update_ms,
                    restoring: p.restoring.load(Relaxed),
                }
            })
            .collect()
    }

    /// Every key and value of a partition (tests, `keyflow test`).
    #[doc(hidden)]
    pub fn snapshot(&self, partition: i32) -> HashMap<Bytes, Bytes> {
        self.partitions
            .get(partition as usize)
            .map(|p| {
                let inner = p.inner.lock().unwrap_or_else(|e| e.into_inner());
                inner
                    .map
                    .iter()
                    .map(|(k, e)| (k.clone(), e.value.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rebuilds `partition`'s state from its changelog partition, beginning to end
    /// (`read_committed`: an aborted transaction's changes are not read). Called by the
    /// partition supervisor before it fetches the first message. Returns the keys restored.
    ///
    /// Cancel-safe: the reader runs on a blocking thread and stops at the next poll when this
    /// future is dropped; the restoring mark is a guard.
    pub async fn restore(self: &Arc<Self>, partition: i32) -> Result<usize, StateError> {
        let Ok(p) = self.partition(partition) else {
            return Err(StateError::Changelog {
                topic: self.changelog.to_string(),
                message: format!(
                    "input partition {partition} has no changelog partition ({} partitions)",
                    self.partitions.len()
                ),
            });
        };
        let _guard = self.mark_restoring(p);
        let started = Instant::now();
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Cancel(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Cancel {
            fn drop(&mut self) {
                self.0.store(true, Relaxed);
            }
        }
        let _cancel = Cancel(cancelled.clone());
        let (store, c) = (self.clone(), cancelled.clone());
        let read = tokio::task::spawn_blocking(move || store.read_changelog(partition, &c))
            .await
            .map_err(|e| StateError::Changelog {
                topic: self.changelog.to_string(),
                message: format!("restore task failed: {e}"),
            })??;
        let (map, records) = read;
        let mut inner = Inner::default();
        let ttl = self.expiry_ms.load(Relaxed);
        let now = now_ms();
        let mut dedup = Vec::new();
        for (k, (v, at)) in map {
            if ttl > 0 && k.starts_with(DEDUP_PREFIX) {
                match entry_ms(&v) {
                    Some(t) if now.saturating_sub(t) <= ttl => dedup.push((k.clone(), t)),
                    // Expired: not restored, and compacted away outside `exactly_once`.
                    _ => {
                        if !self.transactional {
                            self.send_now(partition, &k, None);
                        }
                        continue;
                    }
                }
            }
            inner.put(k, Some(v), at);
        }
        dedup.sort_by_key(|(_, t)| *t);
        inner.expiring.extend(dedup);
        let keys = inner.map.len();
        let delta = {
            let mut cur = p.inner.lock().unwrap_or_else(|e| e.into_inner());
            let before = cur.bytes as isize;
            *cur = inner;
            cur.bytes as isize - before
        };
        self.account(delta, p);
        self.keys_gauge.set(
            self.partitions
                .iter()
                .map(|p| p.inner.lock().unwrap_or_else(|e| e.into_inner()).map.len())
                .sum::<usize>() as f64,
        );
        let took = started.elapsed();
        metrics::histogram!(STATE_RESTORE_SECONDS, "pipeline" => self.pipeline.clone())
            .record(took.as_secs_f64());
        metrics::counter!(STATE_RESTORED_KEYS, "pipeline" => self.pipeline.clone())
            .increment(keys as u64);
        info!(pipeline = %self.pipeline, changelog = %self.changelog, partition, keys, records, took = ?took, "state: partition restored");
        Ok(keys)
    }

    /// Blocking: reads a changelog partition to its end; returns the last value of every key
    /// (tombstones remove) and how many records were read.
    #[allow(clippy::type_complexity)]
    fn read_changelog(
        &self,
        partition: i32,
        cancelled: &std::sync::atomic::AtomicBool,
    ) -> Result<(HashMap<Bytes, (Bytes, i64)>, u64), StateError> {
        let kafka = |source| StateError::Kafka {
            topic: self.changelog.to_string(),
            source,
        };
        let mut cfg = self.client.clone();
        cfg.set("group.id", format!("keyflow-restore-{}", self.pipeline))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            // At the end of the partition the broker would hold an empty fetch for 500 ms
            // (the default) before librdkafka can report the end: every restore would pay it.
            .set("fetch.wait.max.ms", "10")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = cfg.create().map_err(kafka)?;
        let (low, high) = consumer
            .fetch_watermarks(&self.changelog, partition, Duration::from_secs(30))
            .map_err(kafka)?;
        let mut map: HashMap<Bytes, (Bytes, i64)> = HashMap::new();
        let mut records = 0u64;
        if high <= low {
            return Ok((map, 0));
        }
        info!(pipeline = %self.pipeline, changelog = %self.changelog, partition, records = high - low, "state: restoring partition");
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition_offset(&self.changelog, partition, Offset::Beginning)
            .map_err(kafka)?;
        consumer.assign(&tpl).map_err(kafka)?;
        let mut last_log = Instant::now();
        let assigned = Instant::now();
        let mut first: Option<Duration> = None;
        loop {
            if cancelled.load(Relaxed) {
                return Err(StateError::Changelog {
                    topic: self.changelog.to_string(),
                    message: "restore cancelled".into(),
                });
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Ok(m)) => {
                    records += 1;
                    first.get_or_insert_with(|| assigned.elapsed());
                    if let Some(k) = m.key() {
                        let k = Bytes::copy_from_slice(k);
                        match m.payload() {
                            Some(v) => {
                                let at = m.timestamp().to_millis().unwrap_or(0);
                                map.insert(k, (Bytes::copy_from_slice(v), at));
                            }
                            None => {
                                map.remove(&k);
                            }
                        }
                    }
                    if m.offset() + 1 >= high {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => {
                    warn!(pipeline = %self.pipeline, changelog = %self.changelog, partition, error = %e, "state: restore read error; retrying")
                }
            }
            if last_log.elapsed() > Duration::from_secs(5) {
                last_log = Instant::now();
                info!(pipeline = %self.pipeline, changelog = %self.changelog, partition, records, of = high - low, "state: restoring partition");
            }
        }
        info!(pipeline = %self.pipeline, changelog = %self.changelog, partition, records, first_record_after = ?first, read = ?assigned.elapsed(), "state: changelog read");
        Ok((map, records))
    }
}

enum Ensure {
    Kafka(KafkaError),
    Refused(String),
}

/// Creates the changelog if missing; checks its partitions and cleanup policy. Returns the
/// partition count.
async fn ensure_changelog(
    client: &ClientConfig,
    spec: &PipelineSpec,
    topic: &str,
) -> Result<usize, Ensure> {
    // The admin client is a producer underneath, whose metadata requests would auto-create a
    // missing topic (with the broker's default policy) when the broker allows it.
    let admin: AdminClient<DefaultClientContext> = client
        .clone()
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(Ensure::Kafka)?;
    let timeout = spec.startup_timeout;
    let input = partition_count(&admin, &spec.topic, timeout)?.ok_or_else(|| {
        Ensure::Refused(format!(
            "the input topic {:?} does not exist: cannot size the changelog",
            spec.topic
        ))
    })?;
    match partition_count(&admin, topic, timeout)? {
        None => {
            let opts = AdminOptions::new().operation_timeout(Some(timeout));
            let new = NewTopic::new(topic, input as i32, TopicReplication::Fixed(-1))
                .set("cleanup.policy", "compact");
            let r = admin
                .create_topics([&new], &opts)
                .await
                .map_err(Ensure::Kafka)?;
            for res in r {
                if let Err((t, code)) = res {
                    if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                        return Err(Ensure::Refused(format!("could not create {t:?}: {code}")));
                    }
                }
            }
            info!(pipeline = %spec.name, changelog = %topic, partitions = input, "state: changelog topic created (compacted, co-partitioned with the input)");
            Ok(input)
        }
        Some(n) if n != input => Err(Ensure::Refused(format!(
            "has {n} partitions, the input {:?} has {input}: a changelog must be co-partitioned with its input (same partition count)",
            spec.topic
        ))),
        Some(n) => {
            let opts = AdminOptions::new().request_timeout(Some(timeout));
            let r = admin
                .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
                .await
                .map_err(Ensure::Kafka)?;
            let policy = r
                .into_iter()
                .filter_map(Result::ok)
                .flat_map(|res| res.entries)
                .find(|e| e.name == "cleanup.policy")
                .and_then(|e| e.value)
                .unwrap_or_default();
            if !policy.split(',').any(|p| p.trim() == "compact") {
                return Err(Ensure::Refused(format!(
                    "has cleanup.policy={policy:?}, expected \"compact\": the state would be lost to retention"
                )));
            }
            Ok(n)
        }
    }
}

/// Partitions of `topic`, `None` if it does not exist.
fn partition_count(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<usize>, Ensure> {
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), timeout)
        .map_err(Ensure::Kafka)?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None => Ok(Some(t.partitions().len())),
        Some(e)
            if rdkafka::types::RDKafkaErrorCode::from(e)
                == rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition =>
        {
            Ok(None)
        }
        Some(e) => Err(Ensure::Refused(format!(
            "metadata of {topic:?}: {}",
            rdkafka::types::RDKafkaErrorCode::from(e)
        ))),
    }
}

#[cfg(test)]
mod tests;
