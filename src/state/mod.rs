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
//! - Memory: the state is part of the process's memory budget (`memory_limit`): a `[state]`
//!   pipeline gives half of its share (or `[state] memory`) to it. Within that share the
//!   recently used keys stay in memory, the least recently used ones are evicted to an
//!   embedded on-disk B-tree ([`spill`], redb), from which a read brings them back. A restore
//!   spills as it reads, so a changelog larger than memory restores within it.
//!   `keyflow_state_bytes` (= `keyflow_memory_used_bytes{part="state"}`) is what memory holds,
//!   `keyflow_state_disk_bytes` the spill file.
//! - Release: when a partition's supervisor stops (revoked, failed), its state leaves memory
//!   and the spill file ([`Store::release`]); the next assignment restores it.

pub mod processor;
pub mod spill;

pub use processor::{Outputs, StateChange, Stateful, StatefulProcessor};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lru::LruCache;
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
use spill::{Spill, SpillError};

/// Metric names (units in the name; labels: `pipeline`).
pub const STATE_BYTES: &str = "keyflow_state_bytes";
pub const STATE_KEYS: &str = "keyflow_state_keys";
pub const STATE_RESTORE_SECONDS: &str = "keyflow_state_restore_seconds";
pub const STATE_RESTORED_KEYS: &str = "keyflow_state_restored_keys";
/// Size of the spill file (state evicted from memory).
pub const STATE_DISK_BYTES: &str = "keyflow_state_disk_bytes";
/// Keys written to / read back from the spill file.
pub const STATE_SPILLED: &str = "keyflow_state_spilled_total";
pub const STATE_UNSPILLED: &str = "keyflow_state_unspilled_total";

/// What an entry costs beyond its key and value: the LRU node (two `Bytes` headers, the flag,
/// two links), its map slot and the allocator's rounding (an estimate, as
/// [`crate::message::MESSAGE_COST`]; `restore_of_100k_keys_is_timed` prints it against RSS).
const ENTRY_COST: usize = 128;
/// What a queued dedup id costs beyond its key (a `Bytes` header and a time).
const EXPIRING_COST: usize = 48;
/// An eviction frees down to this part of the memory share, so that it writes to the spill
/// file in batches rather than one key per put.
const EVICT_TO: f64 = 0.9;

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

/// A key's value in memory. `None`: removed, a removal the spill file has not seen yet (only
/// kept while the partition has spilled; otherwise a removal just leaves the map).
#[derive(Debug, Clone)]
struct Slot {
    value: Option<Bytes>,
    /// Changed since it was read back from the spill file: an eviction writes it there.
    dirty: bool,
    /// Wall-clock ms of the key's last change (`/debug/state`).
    updated_ms: i64,
}

/// A change computed by an attempt, applied once that attempt's writes succeeded.
#[derive(Debug)]
struct Pending {
    offset: i64,
    value: Option<Bytes>,
}

/// Where a partition's state is in its life on this member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not assigned here (or given up): reads and writes of a late worker are refused.
    Released,
    /// Its changelog is being read: only the reader of the current generation writes.
    Restoring,
    Live,
}

/// One partition's state in memory: the recently used keys (least recently used evicted first
/// to the spill file when the partition is over its part of the memory share).
#[derive(Debug)]
struct Inner {
    mem: LruCache<Bytes, Slot>,
    /// Entries an eviction is writing to the spill file (outside the lock): still read from
    /// here, still counted, until the write committed.
    evicting: HashMap<Bytes, Slot>,
    evicting_now: bool,
    pending: HashMap<Bytes, Pending>,
    /// Bytes in memory: `mem`, `evicting` and `expiring`.
    bytes: usize,
    /// The spill file may hold keys of this partition.
    spilled: bool,
    last_update_ms: i64,
    /// Dedup ids in completion order, expired from the front (see [`Store::put_now`]); older
    /// ones are in the spill file's expiry index once the partition spills.
    expiring: VecDeque<(Bytes, i64)>,
    /// The expiry index in the spill file holds entries after `index_cursor`.
    index_on_disk: bool,
    /// The last index entry expired (entries up to it are removed by the next eviction).
    index_cursor: Option<Bytes>,
    /// Bumped by every restore and release: a reader, an eviction or a release of an earlier
    /// generation finds it changed and leaves the partition alone.
    generation: u64,
    phase: Phase,
}

impl Inner {
    fn new(phase: Phase) -> Self {
        Inner {
            mem: LruCache::unbounded(),
            evicting: HashMap::new(),
            evicting_now: false,
            pending: HashMap::new(),
            bytes: 0,
            spilled: false,
            last_update_ms: 0,
            expiring: VecDeque::new(),
            index_on_disk: false,
            index_cursor: None,
            generation: 0,
            phase,
        }
    }
}

/// One input partition's state.
#[derive(Debug)]
pub struct PartitionState {
    inner: Mutex<Inner>,
    /// A guard marks it while its changelog is read.
    restoring: std::sync::atomic::AtomicBool,
    /// `Inner::generation`, readable without the lock (an eviction checks it under redb's
    /// writer lock before it commits).
    generation: AtomicU64,
}

impl PartitionState {
    fn new(phase: Phase) -> Self {
        PartitionState {
            inner: Mutex::new(Inner::new(phase)),
            restoring: std::sync::atomic::AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn cost(key: &[u8], slot: &Slot) -> usize {
    ENTRY_COST + key.len() + slot.value.as_ref().map_or(0, Bytes::len)
}

/// What a queued dedup id costs in [`Inner::expiring`].
fn expiring_cost(key: &[u8]) -> usize {
    EXPIRING_COST + key.len()
}

impl Inner {
    /// Sets or deletes `key` in memory (an eviction takes it to the spill file later); returns
    /// the change in bytes.
    fn put(&mut self, key: Bytes, value: Option<Bytes>, at_ms: i64) -> isize {
        let before = self.bytes;
        // A newer value than the one an eviction is writing: memory has the last word.
        if let Some(old) = self.evicting.remove(&key) {
            self.bytes -= cost(&key, &old);
        }
        let slot = Slot {
            value,
            dirty: true,
            updated_ms: at_ms,
        };
        let old = if slot.value.is_none() && !self.spilled {
            self.mem.pop_entry(&key)
        } else {
            self.bytes += cost(&key, &slot);
            self.mem.push(key, slot)
        };
        if let Some((k, old)) = old {
            self.bytes -= cost(&k, &old);
        }
        self.last_update_ms = self.last_update_ms.max(at_ms);
        self.bytes as isize - before as isize
    }

    /// The value of `key`: memory (now the most recently used), else the spill file, whose
    /// value is kept in memory from then on (clean: an eviction drops it without a write).
    /// Returns the value and the change in bytes.
    fn lookup(
        &mut self,
        spill: Option<&Spill>,
        partition: i32,
        key: &Bytes,
    ) -> Result<(Option<Bytes>, isize), SpillError> {
        if let Some(slot) = self.mem.get(key) {
            return Ok((slot.value.clone(), 0));
        }
        if let Some(slot) = self.evicting.get(key) {
            return Ok((slot.value.clone(), 0));
        }
        let (Some(spill), true) = (spill, self.spilled) else {
            return Ok((None, 0));
        };
        let Some((updated_ms, value)) = spill.get(partition, key)? else {
            return Ok((None, 0));
        };
        let slot = Slot {
            value: Some(value.clone()),
            dirty: false,
            updated_ms,
        };
        let add = cost(key, &slot);
        self.bytes += add;
        self.mem.push(key.clone(), slot);
        Ok((Some(value), add as isize))
    }

    /// The value of `key` without making it recently used or bringing it into memory.
    fn peek(&self, spill: Option<&Spill>, partition: i32, key: &[u8]) -> Option<Bytes> {
        match self.mem.peek(key).or_else(|| self.evicting.get(key)) {
            Some(slot) => slot.value.clone(),
            None if self.spilled => spill
                .and_then(|s| s.get(partition, key).ok().flatten())
                .map(|(_, v)| v),
            None => None,
        }
    }

    /// Empties the partition's state (the spill file's tables are the caller's), in `phase`,
    /// as a new generation. Returns the bytes freed.
    fn reset(&mut self, phase: Phase) -> usize {
        let freed = self.bytes;
        let generation = self.generation + 1;
        *self = Inner::new(phase);
        self.generation = generation;
        freed
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
    /// Partitions live on this member: each may hold `cap / live` in memory.
    live: AtomicUsize,
    /// Bytes in memory, every partition (`keyflow_state_bytes`).
    bytes: AtomicI64,
    /// What the entries may take in memory: the pipeline's state share less the spill file's
    /// page cache. Beyond it the least recently used entries go to `spill`.
    cap: u64,
    /// `None`: everything stays in memory (`keyflow test`, unit tests).
    spill: Option<Spill>,
    /// `dedup`'s ttl in milliseconds (0: no dedup): its ids older than it leave the state.
    expiry_ms: AtomicI64,
    /// When a spill error was last logged (ms), so that a broken disk logs once in a while.
    spill_warned_ms: AtomicI64,
    /// How to reach the brokers for the restore reader.
    client: ClientConfig,
    gauges: Gauges,
}

struct Gauges {
    bytes: metrics::Gauge,
    /// `keyflow_memory_used_bytes{part="state"}` (the same value as `bytes`).
    used: metrics::Gauge,
    keys: metrics::Gauge,
    disk: metrics::Gauge,
    spilled: metrics::Counter,
    unspilled: metrics::Counter,
}

impl Gauges {
    fn noop() -> Self {
        Gauges {
            bytes: metrics::Gauge::noop(),
            used: metrics::Gauge::noop(),
            keys: metrics::Gauge::noop(),
            disk: metrics::Gauge::noop(),
            spilled: metrics::Counter::noop(),
            unspilled: metrics::Counter::noop(),
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pipeline", &self.pipeline)
            .field("changelog", &self.changelog)
            .field("partitions", &self.partitions.len())
            .field("cap", &self.cap)
            .finish()
    }
}

/// `/debug/state`: what one partition holds (never the values).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionReport {
    pub partition: i32,
    /// Keys in memory (a key read back from the spill file is in both).
    pub keys: usize,
    /// Bytes in memory.
    pub bytes: usize,
    /// Keys in the spill file.
    pub spilled_keys: u64,
    /// Wall-clock milliseconds of the last change (0: none).
    pub last_update_ms: i64,
    pub restoring: bool,
}

/// `/debug/state?key=` and `?recent=`: one key (never its value).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyReport {
    pub partition: i32,
    /// The key as text (invalid UTF-8 replaced).
    pub key: String,
    /// Bytes of its value.
    pub size: usize,
    /// Wall-clock milliseconds of its last change.
    pub updated_ms: i64,
    /// In memory; otherwise in the spill file.
    pub in_memory: bool,
}

/// The spill file's page cache: an eighth of the state share, within 64 KiB..32 MiB (and at
/// most half the share).
fn spill_cache(share: u64) -> u64 {
    (share / 8).clamp(64 << 10, 32 << 20).min(share / 2)
}

impl Store {
    /// Checks the changelog topic (same partition count as the input, `cleanup.policy`
    /// compact), creating it if missing, and makes the store, with `memory` bytes for the state
    /// in memory (the pipeline's state share, [`crate::memory::PipelineMemory::state_share`]).
    /// Refuses a changelog that does not fit, naming what it found.
    pub async fn open(
        brokers: &str,
        spec: &PipelineSpec,
        producer: Producer,
        memory: u64,
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
        let cache = spill_cache(memory);
        let spill = Spill::create(&st.dir, partitions, cache as usize).map_err(|e| {
            StateError::Changelog {
                topic: topic.clone(),
                message: format!("{e} (state.dir = {:?})", st.dir),
            }
        })?;
        let cap = memory.saturating_sub(cache);
        info!(pipeline = %spec.name, changelog = %topic, partitions, memory = %bytesize::ByteSize(cap), spill_dir = %st.dir.display(), "state: changelog topic ready");
        let name = spec.name.clone();
        metrics::gauge!(crate::metrics::MEMORY_BUDGET_BYTES, "pipeline" => name.clone(), "topic" => spec.topic.clone(), "part" => "state").set(memory as f64);
        Ok(Arc::new(Store {
            pipeline: name.clone(),
            changelog: Arc::from(topic.as_str()),
            transactional: spec.delivery == crate::config::Delivery::ExactlyOnce,
            producer,
            partitions: (0..partitions)
                .map(|_| PartitionState::new(Phase::Released))
                .collect(),
            restoring: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            bytes: AtomicI64::new(0),
            cap,
            spill: Some(spill),
            expiry_ms: AtomicI64::new(0),
            spill_warned_ms: AtomicI64::new(0),
            client,
            gauges: Gauges {
                bytes: metrics::gauge!(STATE_BYTES, "pipeline" => name.clone()),
                used: metrics::gauge!(crate::metrics::MEMORY_USED_BYTES, "pipeline" => name.clone(), "topic" => spec.topic.clone(), "part" => "state"),
                keys: metrics::gauge!(STATE_KEYS, "pipeline" => name.clone()),
                disk: metrics::gauge!(STATE_DISK_BYTES, "pipeline" => name.clone()),
                spilled: metrics::counter!(STATE_SPILLED, "pipeline" => name.clone()),
                unspilled: metrics::counter!(STATE_UNSPILLED, "pipeline" => name),
            },
        }))
    }

    /// A store without a broker (unit tests, `keyflow test`): changes are applied, nothing is
    /// persisted; everything stays in memory; every partition is live from the start.
    #[doc(hidden)]
    pub fn in_memory(partitions: usize, producer: Producer, transactional: bool) -> Arc<Self> {
        Self::unpersisted(partitions, producer, transactional, u64::MAX, None)
    }

    /// As [`Self::in_memory`], with `cap` bytes in memory and a spill file in `dir` (unit tests
    /// of the eviction).
    #[doc(hidden)]
    pub fn spilling(
        partitions: usize,
        producer: Producer,
        transactional: bool,
        cap: u64,
        dir: &std::path::Path,
    ) -> Result<Arc<Self>, SpillError> {
        let spill = Spill::create(dir, partitions, 1 << 20)?;
        Ok(Self::unpersisted(
            partitions,
            producer,
            transactional,
            cap,
            Some(spill),
        ))
    }

    fn unpersisted(
        partitions: usize,
        producer: Producer,
        transactional: bool,
        cap: u64,
        spill: Option<Spill>,
    ) -> Arc<Self> {
        Arc::new(Store {
            pipeline: "test".into(),
            changelog: Arc::from("changelog"),
            transactional,
            producer,
            partitions: (0..partitions)
                .map(|_| PartitionState::new(Phase::Live))
                .collect(),
            restoring: AtomicUsize::new(0),
            live: AtomicUsize::new(partitions),
            bytes: AtomicI64::new(0),
            cap,
            spill,
            expiry_ms: AtomicI64::new(0),
            spill_warned_ms: AtomicI64::new(0),
            client: ClientConfig::new(),
            gauges: Gauges::noop(),
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
    /// key left). A change staged by an earlier attempt of `msg` is ignored. A spill file that
    /// cannot be read is a retryable error.
    pub fn get(&self, msg: &Message, key: &Bytes) -> Result<Option<Bytes>, ProcessError> {
        let p = self.partition(msg.partition)?;
        let mut inner = p.lock();
        not_live(&inner, msg.partition)?;
        // A change an earlier attempt staged is void: this attempt decides again.
        inner.pending.remove(key);
        let (value, delta) = inner
            .lookup(self.spill.as_ref(), msg.partition, key)
            .map_err(|e| ProcessError::retryable("state", e.to_string()))?;
        if delta != 0 {
            self.gauges.unspilled.increment(1);
            self.account(delta);
            self.fit(p, inner, msg.partition);
        }
        Ok(value)
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
            let mut inner = p.lock();
            not_live(&inner, msg.partition)?;
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
        {
            let mut inner = p.lock();
            if inner.phase != Phase::Live {
                // Given up meanwhile (a late completion): the next owner's restore decides.
                return;
            }
            let now = now_ms();
            let mut delta = inner.put(key.clone(), value.clone(), now);
            if ttl > 0 && key.starts_with(DEDUP_PREFIX) {
                let at = value.as_deref().and_then(entry_ms).unwrap_or(now);
                inner.bytes += expiring_cost(&key);
                delta += expiring_cost(&key) as isize;
                inner.expiring.push_back((key.clone(), at));
                delta += self
                    .expire(&mut inner, msg.partition, now, ttl, EXPIRE_PER_PUT)
                    .0;
            }
            self.account(delta);
            self.fit(p, inner, msg.partition);
        }
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

    /// Removes up to `most` dedup ids older than `ttl` ms (an id completed again since is kept:
    /// its newer entry is further back), the spill file's expiry index first (its entries are
    /// the older ones). Returns the change in bytes.
    fn expire(
        &self,
        inner: &mut Inner,
        partition: i32,
        now: i64,
        ttl: i64,
        most: usize,
    ) -> (isize, usize) {
        let mut delta = 0;
        let mut due: Vec<Bytes> = Vec::new();
        if let (Some(spill), true) = (&self.spill, inner.index_on_disk) {
            match spill.expired(
                partition,
                inner.index_cursor.as_deref(),
                now - ttl - 1,
                most,
            ) {
                Ok(entries) => {
                    if let Some((last, _, _)) = entries.last() {
                        inner.index_cursor = Some(last.clone());
                    }
                    due.extend(entries.into_iter().map(|(_, _, key)| key));
                }
                Err(e) => {
                    warn!(pipeline = %self.pipeline, partition, error = %e, "state: dedup expiry index not read")
                }
            }
        }
        while due.len() < most {
            match inner.expiring.front() {
                Some((_, at)) if now.saturating_sub(*at) > ttl => {}
                _ => break,
            }
            let Some((key, _)) = inner.expiring.pop_front() else {
                break;
            };
            inner.bytes -= expiring_cost(&key);
            delta -= expiring_cost(&key) as isize;
            due.push(key);
        }
        let n = due.len();
        for key in due {
            let expired = inner
                .peek(self.spill.as_ref(), partition, &key)
                .is_some_and(|v| entry_ms(&v).is_none_or(|t| now.saturating_sub(t) > ttl));
            if expired {
                delta += inner.put(key.clone(), None, now);
                if !self.transactional {
                    self.send_now(partition, &key, None);
                }
            }
        }
        (delta, n)
    }

    /// The message's writes succeeded (`written` hook): apply the change it staged, if any.
    pub fn applied(&self, msg: &Message, key: &Bytes) {
        let Ok(p) = self.partition(msg.partition) else {
            return;
        };
        let mut inner = p.lock();
        if inner.phase != Phase::Live {
            // Given up meanwhile (a late completion): the next owner's restore decides.
            return;
        }
        let delta = match inner.pending.remove(key) {
            Some(c) if c.offset == msg.offset => inner.put(key.clone(), c.value, now_ms()),
            // Staged by another message (cannot happen: one message per key at a time).
            Some(other) => {
                inner.pending.insert(key.clone(), other);
                0
            }
            None => 0,
        };
        self.account(delta);
        self.fit(p, inner, msg.partition);
    }

    fn account(&self, delta: isize) {
        if delta != 0 {
            let total = self.bytes.fetch_add(delta as i64, Relaxed) + delta as i64;
            self.gauges.bytes.set(total as f64);
            self.gauges.used.set(total as f64);
        }
    }

    /// What one live partition may hold in memory: the cap over the partitions live here.
    fn part(&self) -> u64 {
        self.cap / self.live.load(Relaxed).max(1) as u64
    }

    /// Over its part of the cap ([`Self::part`]): evicts the partition's least recently used
    /// entries to the spill file, down to [`EVICT_TO`] of its part, and its dedup expiry index
    /// with them. The write runs outside the partition's lock (the entries stay readable, and
    /// counted, in `evicting` meanwhile) and is void if the partition was reset since. One
    /// eviction per partition at a time; a put only grows memory by one entry meanwhile.
    fn fit(&self, p: &PartitionState, mut inner: MutexGuard<'_, Inner>, partition: i32) {
        let Some(spill) = &self.spill else {
            return;
        };
        let part = self.part() as usize;
        if inner.bytes <= part || inner.evicting_now {
            return;
        }
        let want = inner.bytes - (part as f64 * EVICT_TO) as usize;
        // The expiry index leaves memory first: it is read only as ids expire.
        let index: Vec<(Bytes, i64)> = inner.expiring.drain(..).collect();
        let mut gone: usize = index.iter().map(|(k, _)| expiring_cost(k)).sum();
        let mut freed = gone;
        let mut writes: Vec<(Bytes, Slot)> = Vec::new();
        while freed < want {
            let Some((k, slot)) = inner.mem.pop_lru() else {
                break;
            };
            let c = cost(&k, &slot);
            freed += c;
            if slot.dirty {
                inner.evicting.insert(k.clone(), slot.clone());
                writes.push((k, slot));
            } else {
                // Read back from the spill file and unchanged since: it has it.
                gone += c;
            }
        }
        inner.bytes -= gone;
        self.account(-(gone as isize));
        let done_through = inner.index_cursor.clone();
        if writes.is_empty() && index.is_empty() && done_through.is_none() {
            return;
        }
        inner.evicting_now = true;
        inner.spilled |= !writes.is_empty();
        inner.index_on_disk |= !index.is_empty();
        let generation = inner.generation;
        drop(inner);
        let batch = spill::Batch {
            changes: writes
                .iter()
                .map(|(k, s)| (k.as_ref(), s.value.as_deref().map(|v| (s.updated_ms, v))))
                .collect(),
            index_add: &index,
            index_done_through: done_through.as_deref(),
        };
        let result = spill.write(partition, &batch, || {
            p.generation.load(Relaxed) == generation
        });
        drop(batch);
        let mut inner = p.lock();
        if inner.generation != generation {
            // Reset meanwhile: its `evicting` went with it, and the write was void.
            return;
        }
        inner.evicting_now = false;
        match result {
            Ok(_) => {
                let mut written = 0;
                for (k, _) in &writes {
                    // Gone from `evicting` if a newer value was put meanwhile (memory has it).
                    if let Some(slot) = inner.evicting.remove(k) {
                        written += cost(k, &slot);
                    }
                }
                inner.bytes -= written;
                self.account(-(written as isize));
                self.gauges.spilled.increment(writes.len() as u64);
                self.gauges.disk.set(spill.file_bytes() as f64);
            }
            Err(e) => {
                // Back in memory, least recently used first again.
                for (k, _) in writes.iter().rev() {
                    if let Some(slot) = inner.evicting.remove(k) {
                        inner.mem.push(k.clone(), slot);
                        inner.mem.demote(k);
                    }
                }
                let back: usize = index.iter().map(|(k, _)| expiring_cost(k)).sum();
                for entry in index.into_iter().rev() {
                    inner.expiring.push_front(entry);
                }
                inner.bytes += back;
                self.account(back as isize);
                let now = now_ms();
                let last = self.spill_warned_ms.load(Relaxed);
                if now - last > 10_000
                    && self
                        .spill_warned_ms
                        .compare_exchange(last, now, Relaxed, Relaxed)
                        .is_ok()
                {
                    warn!(pipeline = %self.pipeline, partition, error = %e, held = %bytesize::ByteSize(inner.bytes as u64), part = %bytesize::ByteSize(part as u64), "state: cannot spill to disk; the state stays in memory over its share");
                }
            }
        }
    }

    /// After an assignment change: every live partition over its (new) part evicts now, so
    /// that idle partitions do not keep memory the others need.
    fn trim_all(&self) {
        for (i, p) in self.partitions.iter().enumerate() {
            let inner = p.lock();
            if inner.phase == Phase::Live {
                self.fit(p, inner, i as i32);
            }
        }
    }

    /// Bytes held in memory by every partition's state (`keyflow_state_bytes`).
    pub fn bytes(&self) -> i64 {
        self.bytes.load(Relaxed)
    }

    /// What the entries may take in memory (the state share less the spill cache).
    pub fn memory_cap(&self) -> u64 {
        self.cap
    }

    /// The spill file's size (0 without one).
    pub fn disk_bytes(&self) -> u64 {
        self.spill.as_ref().map_or(0, Spill::file_bytes)
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
                let inner = p.lock();
                let spilled_keys = match (&self.spill, inner.spilled) {
                    (Some(s), true) => s.len(i as i32).unwrap_or(0),
                    _ => 0,
                };
                PartitionReport {
                    partition: i as i32,
                    keys: inner.mem.len() + inner.evicting.len(),
                    bytes: inner.bytes,
                    spilled_keys,
                    last_update_ms: inner.last_update_ms,
                    restoring: p.restoring.load(Relaxed),
                }
            })
            .collect()
    }

    /// Where `key` is held, in every partition that has it (one, unless the input's
    /// partitioner changed). Reads it without making it recently used.
    pub fn describe(&self, key: &[u8]) -> Vec<KeyReport> {
        let mut out = Vec::new();
        for (i, p) in self.partitions.iter().enumerate() {
            let inner = p.lock();
            let found = match inner.mem.peek(key).or_else(|| inner.evicting.get(key)) {
                Some(slot) => slot
                    .value
                    .as_ref()
                    .map(|v| (v.len(), slot.updated_ms, true)),
                None if inner.spilled => self
                    .spill
                    .as_ref()
                    .and_then(|s| s.get(i as i32, key).ok().flatten())
                    .map(|(at, v)| (v.len(), at, false)),
                None => None,
            };
            if let Some((size, updated_ms, in_memory)) = found {
                out.push(KeyReport {
                    partition: i as i32,
                    key: String::from_utf8_lossy(key).into_owned(),
                    size,
                    updated_ms,
                    in_memory,
                });
            }
        }
        out
    }

    /// The `n` keys in memory changed last, over every partition (a heap of `n`: no copy of
    /// the whole key set).
    pub fn recent(&self, n: usize) -> Vec<KeyReport> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut top: BinaryHeap<Reverse<(i64, i32, Bytes, usize)>> = BinaryHeap::new();
        for (i, p) in self.partitions.iter().enumerate() {
            let inner = p.lock();
            for (k, slot) in inner.mem.iter() {
                let Some(v) = &slot.value else { continue };
                top.push(Reverse((slot.updated_ms, i as i32, k.clone(), v.len())));
                if top.len() > n {
                    top.pop();
                }
            }
        }
        top.into_sorted_vec()
            .into_iter()
            .map(|Reverse((updated_ms, partition, k, size))| KeyReport {
                partition,
                key: String::from_utf8_lossy(&k).into_owned(),
                size,
                updated_ms,
                in_memory: true,
            })
            .collect()
    }

    /// Every key and value of a partition, memory over the spill file (tests, `keyflow test`).
    #[doc(hidden)]
    pub fn snapshot(&self, partition: i32) -> HashMap<Bytes, Bytes> {
        let Some(p) = self.partitions.get(partition as usize) else {
            return HashMap::new();
        };
        let inner = p.lock();
        let mut out: HashMap<Bytes, Bytes> = match (&self.spill, inner.spilled) {
            (Some(s), true) => s
                .entries(partition)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            _ => HashMap::new(),
        };
        for (k, slot) in inner.evicting.iter().chain(inner.mem.iter()) {
            match &slot.value {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        out
    }

    /// Empties `partition`'s state, memory and spill file, as a new generation in `phase`.
    /// Returns that generation, or an error if the spill file's tables could not be emptied
    /// (they would be read again: the partition is left `Released`).
    fn reset(
        &self,
        p: &PartitionState,
        inner: &mut Inner,
        partition: i32,
        phase: Phase,
    ) -> Result<u64, SpillError> {
        let was_live = inner.phase == Phase::Live;
        let on_disk = inner.spilled || inner.index_on_disk || inner.evicting_now;
        let freed = inner.reset(phase);
        p.generation.store(inner.generation, Relaxed);
        self.account(-(freed as isize));
        if was_live {
            self.live.fetch_sub(1, Relaxed);
        }
        if let (Some(s), true) = (&self.spill, on_disk) {
            if let Err(e) = s.clear(partition) {
                inner.phase = Phase::Released;
                // The next reset tries again.
                inner.spilled = true;
                return Err(e);
            }
        }
        if phase == Phase::Live {
            self.live.fetch_add(1, Relaxed);
        }
        Ok(inner.generation)
    }

    /// The partition's supervisor of restore `generation` stopped (revoked, failed): its state
    /// leaves memory and the spill file, unless a newer restore of the partition began since.
    /// A worker still finishing a message of it afterwards reads and changes nothing (its
    /// `get` fails as retryable, its `applied` is ignored): the next owner redoes the message.
    pub fn release(&self, partition: i32, generation: u64) {
        let Ok(p) = self.partition(partition) else {
            return;
        };
        {
            let mut inner = p.lock();
            if inner.generation != generation || inner.phase == Phase::Released {
                return;
            }
            if let Err(e) = self.reset(p, &mut inner, partition, Phase::Released) {
                warn!(pipeline = %self.pipeline, partition, error = %e, "state: spill file not cleared at release");
            }
        }
        self.set_keys_gauge();
        self.trim_all();
    }

    fn set_keys_gauge(&self) {
        self.gauges.keys.set(
            self.partitions
                .iter()
                .map(|p| p.lock().mem.len())
                .sum::<usize>() as f64,
        );
    }

    /// Rebuilds `partition`'s state from its changelog partition, beginning to end
    /// (`read_committed`: an aborted transaction's changes are not read), within its part of
    /// the memory cap (spilling as it reads). Called by the partition supervisor before it
    /// fetches the first message. Returns the restore's generation (for [`Self::release`]).
    ///
    /// Cancel-safe: when this future is dropped, the partition is reset (released) and the
    /// reader, on a blocking thread, finds the generation changed before its next write.
    pub async fn restore(self: &Arc<Self>, partition: i32) -> Result<u64, StateError> {
        let Ok(p) = self.partition(partition) else {
            return Err(StateError::Changelog {
                topic: self.changelog.to_string(),
                message: format!(
                    "input partition {partition} has no changelog partition ({} partitions)",
                    self.partitions.len()
                ),
            });
        };
        let spill_error = |e: SpillError| StateError::Changelog {
            topic: self.changelog.to_string(),
            message: e.to_string(),
        };
        let generation = {
            let mut inner = p.lock();
            self.reset(p, &mut inner, partition, Phase::Restoring)
                .map_err(spill_error)?
        };
        let _guard = self.mark_restoring(p);
        let started = Instant::now();
        /// Dropped before the restore ended: the partition is released, and the reader stops.
        struct Abandon<'a> {
            store: &'a Store,
            p: &'a PartitionState,
            partition: i32,
            generation: u64,
            cancelled: Arc<std::sync::atomic::AtomicBool>,
            done: bool,
        }
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if self.done {
                    return;
                }
                self.cancelled.store(true, Relaxed);
                let mut inner = self.p.lock();
                if inner.generation == self.generation && inner.phase == Phase::Restoring {
                    let _ = self
                        .store
                        .reset(self.p, &mut inner, self.partition, Phase::Released);
                }
            }
        }
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut abandon = Abandon {
            store: self,
            p,
            partition,
            generation,
            cancelled: cancelled.clone(),
            done: false,
        };
        let (store, c) = (self.clone(), cancelled.clone());
        let records =
            tokio::task::spawn_blocking(move || store.read_changelog(partition, generation, &c))
                .await
                .map_err(|e| StateError::Changelog {
                    topic: self.changelog.to_string(),
                    message: format!("restore task failed: {e}"),
                })??;
        self.settle_restored(p, partition, generation)?;
        abandon.done = true;
        self.set_keys_gauge();
        self.trim_all();
        let took = started.elapsed();
        metrics::histogram!(STATE_RESTORE_SECONDS, "pipeline" => self.pipeline.clone())
            .record(took.as_secs_f64());
        let report = self.report().get(partition as usize).cloned();
        let (keys, spilled_keys) = report.map_or((0, 0), |r| (r.keys, r.spilled_keys));
        metrics::counter!(STATE_RESTORED_KEYS, "pipeline" => self.pipeline.clone())
            .increment(keys as u64 + spilled_keys);
        info!(pipeline = %self.pipeline, changelog = %self.changelog, partition, keys, spilled_keys, records, took = ?took, "state: partition restored");
        Ok(generation)
    }

    /// After a restore's read: expires the dedup ids older than the ttl (tombstones for them
    /// outside `exactly_once`), a chunk at a time within the memory part, then makes the
    /// partition live.
    fn settle_restored(
        &self,
        p: &PartitionState,
        partition: i32,
        generation: u64,
    ) -> Result<(), StateError> {
        let cancelled = || StateError::Changelog {
            topic: self.changelog.to_string(),
            message: "restore cancelled".into(),
        };
        let ttl = self.expiry_ms.load(Relaxed);
        let now = now_ms();
        let mut first = true;
        loop {
            let mut inner = p.lock();
            if inner.generation != generation || inner.phase != Phase::Restoring {
                return Err(cancelled());
            }
            if ttl <= 0 {
                let freed: usize = inner.expiring.iter().map(|(k, _)| expiring_cost(k)).sum();
                inner.expiring.clear();
                inner.bytes -= freed;
                self.account(-(freed as isize));
                break;
            }
            if first {
                inner.expiring.make_contiguous().sort_by_key(|(_, t)| *t);
                first = false;
            }
            let (delta, n) = self.expire(&mut inner, partition, now, ttl, 4096);
            self.account(delta);
            self.fit(p, inner, partition);
            if n < 4096 {
                break;
            }
        }
        let mut inner = p.lock();
        if inner.generation != generation || inner.phase != Phase::Restoring {
            return Err(cancelled());
        }
        inner.phase = Phase::Live;
        self.live.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Blocking: reads a changelog partition to its end into the partition's state of restore
    /// `generation` (tombstones remove), spilling what does not fit. Stops as soon as the
    /// restore is cancelled or the partition reset. Returns how many records were read.
    fn read_changelog(
        &self,
        partition: i32,
        generation: u64,
        cancelled: &std::sync::atomic::AtomicBool,
    ) -> Result<u64, StateError> {
        let kafka = |source| StateError::Kafka {
            topic: self.changelog.to_string(),
            source,
        };
        let stopped = || StateError::Changelog {
            topic: self.changelog.to_string(),
            message: "restore cancelled".into(),
        };
        let p = &self.partitions[partition as usize];
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
        let mut records = 0u64;
        if high <= low {
            return Ok(0);
        }
        info!(pipeline = %self.pipeline, changelog = %self.changelog, partition, records = high - low, "state: restoring partition");
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition_offset(&self.changelog, partition, Offset::Beginning)
            .map_err(kafka)?;
        consumer.assign(&tpl).map_err(kafka)?;
        let dedup = self.expiry_ms.load(Relaxed) > 0;
        let mut last_log = Instant::now();
        let assigned = Instant::now();
        let mut first: Option<Duration> = None;
        loop {
            if cancelled.load(Relaxed) {
                return Err(stopped());
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Ok(m)) => {
                    records += 1;
                    first.get_or_insert_with(|| assigned.elapsed());
                    if let Some(k) = m.key() {
                        let k = Bytes::copy_from_slice(k);
                        let at = m.timestamp().to_millis().unwrap_or(0);
                        let v = m.payload().map(Bytes::copy_from_slice);
                        let mut inner = p.lock();
                        // Checked under the lock, right before the write: a reader of a
                        // dropped restore never touches a newer generation.
                        if cancelled.load(Relaxed)
                            || inner.generation != generation
                            || inner.phase != Phase::Restoring
                        {
                            return Err(stopped());
                        }
                        let mut delta = 0;
                        if let (true, Some(v)) = (dedup && k.starts_with(DEDUP_PREFIX), &v) {
                            inner.bytes += expiring_cost(&k);
                            delta += expiring_cost(&k) as isize;
                            let t = entry_ms(v).unwrap_or(at);
                            inner.expiring.push_back((k.clone(), t));
                        }
                        delta += inner.put(k, v, at);
                        self.account(delta);
                        self.fit(p, inner, partition);
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
        Ok(records)
    }
}

/// Refuses a read or a change of a partition whose state is not live here (a late worker of a
/// supervisor that gave the partition up): retryable, so the message is left for the owner.
fn not_live(inner: &Inner, partition: i32) -> Result<(), ProcessError> {
    match inner.phase {
        Phase::Live => Ok(()),
        Phase::Released | Phase::Restoring => Err(ProcessError::retryable(
            "state",
            format!("the state of partition {partition} is not live on this member (given up or restoring): left for its owner"),
        )),
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
