//! Exactly-once Kafka→Kafka (`delivery = "exactly_once"`).
//!
//! One Kafka transaction at a time per pipeline holds every write of the pipeline (`forward`,
//! `route`, dead letters) and the input offsets that cover them, with the completed-offsets
//! metadata ([`super::offsets::encode_metadata`]); a `read_committed` reader downstream sees
//! each input's outputs once, whatever the completion order across keys.
//!
//! The rule that makes it exact: **a transaction commits a message's writes only together with
//! an input offset (or metadata) that marks the message done.** Three mechanisms keep it:
//! - A message's records are staged in its outbox while its chain runs (nothing is written by a
//!   failed attempt) and written at completion, under a read lock of [`Transactions::lock`].
//!   The worker reports the completion to its supervisor *before* it drops the lock.
//! - A commit takes the write lock: no write is in progress, and every written message's
//!   completion is already in its supervisor's mailbox. It then asks each supervisor for its
//!   commit point ([`PartitionMsg::Point`], answered after those completions) and commits the
//!   points and the writes in one transaction.
//! - A partition given up (revoke, shutdown) closes its [`Ownership`] first: a message still
//!   running there afterwards writes nothing (the next owner runs it), and the drain waits for
//!   writes already under way, so its final commit point covers them.
//!
//! Fencing: the offsets go through `send_offsets_to_transaction` with the consumer's group
//! metadata, so the broker refuses them from a member that lost its partitions (a zombie: its
//! generation is stale, or a rebalance moved on meanwhile).
//!
//! Recovery: a transaction that cannot commit is aborted and the pipeline **rewinds**
//! ([`Transactions::abort`], then the coordinator restarts every partition from its committed
//! offset and metadata): the aborted writes are invisible to `read_committed` readers and their
//! inputs run again. Every completion of the aborted transaction belongs to an older *epoch*
//! and is never committed afterwards. Only a fatal producer error (another producer took over
//! the same `transactional.id`) stops the process. A crashed member's open transaction is
//! aborted by its restart (`init_transactions` under the same `KEYFLOW_INSTANCE_ID`) or by the
//! broker after `transaction_timeout`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::ActorRef;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc::UnboundedSender, Notify, OwnedRwLockReadGuard, RwLock};
use tracing::{debug, error, info, warn};

use super::client::{producer_config, Consumer, Producer};
use crate::actors::coordinator::{CoordinatorMsg, DrainedOffset};
use crate::actors::partition::PartitionMsg;
use crate::config::PipelineSpec;
use crate::message::Record;
use crate::stats::PipelineStats;

/// The shortest time between two transaction commits triggered by `commit_every`: a commit
/// holds every write of the pipeline for a few broker round trips, so back-to-back commits
/// would stall it (Kafka Streams commits every 100 ms under exactly-once, too).
pub const MIN_COMMIT_GAP: Duration = Duration::from_millis(100);

/// How long a write waits for room in librdkafka's local queue before it counts as failed.
const QUEUE_FULL_BOUND: Duration = Duration::from_secs(30);

/// How long a commit waits for a partition supervisor's commit point.
const POINT_BOUND: Duration = Duration::from_secs(5);

/// A partition's right to write in the transaction, shared by its supervisor and workers. The
/// supervisor closes it when it gives the partition up; a write then refuses to start, and the
/// drain waits for the writes already under way.
#[derive(Debug, Default)]
pub struct Ownership(AtomicU64);

const CLOSED: u64 = 1 << 63;

impl Ownership {
    /// A writer's entry, or `None` once closed.
    pub fn enter(self: &Arc<Self>) -> Option<OwnerGuard> {
        let before = self.0.fetch_add(1, SeqCst);
        if before & CLOSED != 0 {
            self.0.fetch_sub(1, SeqCst);
            return None;
        }
        Some(OwnerGuard(self.clone()))
    }

    /// Closes it (idempotent); returns how many writes are still under way.
    pub fn close(&self) -> u64 {
        (self.0.fetch_or(CLOSED, SeqCst) | CLOSED) & !CLOSED
    }

    pub fn is_closed(&self) -> bool {
        self.0.load(SeqCst) & CLOSED != 0
    }
}

/// One write under way on a partition; a guard, so a write dropped mid-await still leaves.
#[derive(Debug)]
pub struct OwnerGuard(Arc<Ownership>);

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, SeqCst);
    }
}

/// Held by a worker from the write of its message's records until its completion has reached
/// the supervisor: no commit can start in between.
#[derive(Debug)]
pub struct TxnGuard {
    _lock: OwnedRwLockReadGuard<()>,
    _owner: OwnerGuard,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The record was refused locally (too large): nothing was written, the transaction is
    /// intact. The caller may write something smaller.
    #[error("{0}")]
    TooLarge(KafkaError),
    /// The transaction cannot commit any more; the pipeline is stopping.
    #[error("transaction failed: {0}")]
    Failed(String),
    /// The partition was given up while the message ran: nothing written, the next owner runs it.
    #[error("partition given up")]
    GivenUp,
}

/// A partition's supervisor and its right to write.
type Registered = (ActorRef<PartitionMsg>, Arc<Ownership>);

/// The pipeline's transactional producer and the commit cycle around it.
pub struct Transactions {
    pipeline: String,
    topic: String,
    producer: Producer,
    lock: Arc<RwLock<()>>,
    supervisors: Mutex<HashMap<i32, Registered>>,
    /// Bumped by every abort: completions reported under an older epoch are never committed.
    epoch: AtomicU64,
    /// Told to rewind the pipeline after an abort.
    coordinator: std::sync::OnceLock<ActorRef<CoordinatorMsg>>,
    /// The last committed point per partition: unchanged partitions are not sent again.
    last: Mutex<HashMap<i32, (i64, Option<String>)>>,
    due: Notify,
    /// Processors' `completed` hooks (e.g. `dedup` recording an id) of messages written in the
    /// open transaction: run once it commits, dropped if it aborts (the messages run again).
    deferred: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    /// Partitions given up (revoke, lost) whose drain may still write: an abort closes them too.
    given_up: Mutex<Vec<Arc<Ownership>>>,
    /// Messages whose records the broker refused for good, with how often: after the rewind
    /// they are dead-lettered instead (see [`Self::refused`]).
    poison: Mutex<HashMap<(i32, i64), (u32, String)>>,
    failed: Mutex<Option<String>>,
    stopped: AtomicBool,
    fatal: UnboundedSender<String>,
    stats: Arc<PipelineStats>,
    op_timeout: Duration,
}

/// `keyflow.<group>.<pipeline>.<instance>`: the instance is `KEYFLOW_INSTANCE_ID` (a name
/// unique per replica and stable across its restarts, e.g. a StatefulSet pod name), else random.
pub fn transactional_id(spec: &PipelineSpec, instance: Option<&str>) -> String {
    let instance = match instance.filter(|i| !i.trim().is_empty()) {
        Some(i) => i.trim().to_string(),
        None => format!("{:016x}", rand::random::<u64>()),
    };
    format!("keyflow.{}.{}.{}", spec.group_id, spec.name, instance)
}

impl Transactions {
    /// Creates the transactional producer, fences any earlier producer with the same
    /// `transactional.id` (aborting what it left open) and begins the first transaction.
    /// Blocking: call it off the async runtime.
    pub fn create(
        brokers: &str,
        spec: &PipelineSpec,
        stats: Arc<PipelineStats>,
        fatal: UnboundedSender<String>,
    ) -> Result<Arc<Self>, KafkaError> {
        let instance = std::env::var("KEYFLOW_INSTANCE_ID").ok();
        let id = transactional_id(spec, instance.as_deref());
        let producer: Producer = producer_config(brokers, spec)
            .set("transactional.id", &id)
            .set(
                "transaction.timeout.ms",
                spec.transaction_timeout.as_millis().to_string(),
            )
            .create()?;
        let started = Instant::now();
        producer.init_transactions(spec.startup_timeout)?;
        producer.begin_transaction()?;
        info!(pipeline = %spec.name, transactional_id = %id, took = ?started.elapsed(), "exactly-once: transactional producer ready");
        Ok(Arc::new(Transactions {
            pipeline: spec.name.clone(),
            topic: spec.topic.clone(),
            producer,
            lock: Arc::new(RwLock::new(())),
            supervisors: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            coordinator: std::sync::OnceLock::new(),
            last: Mutex::new(HashMap::new()),
            due: Notify::new(),
            deferred: Mutex::new(Vec::new()),
            given_up: Mutex::new(Vec::new()),
            poison: Mutex::new(HashMap::new()),
            failed: Mutex::new(None),
            stopped: AtomicBool::new(false),
            fatal,
            stats,
            op_timeout: spec.transaction_timeout,
        }))
    }

    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }

    /// The coordinator that rewinds the pipeline after an abort.
    pub fn attach(&self, coordinator: ActorRef<CoordinatorMsg>) {
        let _ = self.coordinator.set(coordinator);
    }

    /// The current epoch (see [`Self::commit`]'s `finals_epoch`).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// A partition's supervisor, asked for its commit point at each commit, and its right to
    /// write, closed by an abort.
    pub fn register(&self, partition: i32, sup: ActorRef<PartitionMsg>, owner: Arc<Ownership>) {
        self.supervisors
            .lock()
            .unwrap()
            .insert(partition, (sup, owner));
    }

    /// Partitions being given up: their final points come with the drain's commit.
    ///
    /// Their owners stay known until closed: an abort while they drain closes them, so that no
    /// late write of theirs joins the next transaction. `close` (lost partitions) closes them
    /// at once.
    pub fn deregister(&self, partitions: impl IntoIterator<Item = i32>, close: bool) {
        let mut s = self.supervisors.lock().unwrap();
        let mut last = self.last.lock().unwrap();
        let mut given_up = self.given_up.lock().unwrap();
        given_up.retain(|o| !o.is_closed());
        for p in partitions {
            if let Some((_, owner)) = s.remove(&p) {
                if close {
                    owner.close();
                } else {
                    given_up.push(owner);
                }
            }
            last.remove(&p);
        }
    }

    /// Runs `hook` (a processor's `completed`) once the open transaction commits; never if it
    /// aborts. Call it under the write guard of the message ([`TxnGuard`]).
    pub fn defer(&self, hook: Box<dyn FnOnce() + Send>) {
        self.deferred.lock().unwrap().push(hook);
    }

    /// Why the broker refused the records of the message at `offset` of `partition`, and how
    /// often, if it did (its reruns are dead-lettered instead of written).
    pub fn refused(&self, partition: i32, offset: i64) -> Option<(u32, String)> {
        self.poison
            .lock()
            .unwrap()
            .get(&(partition, offset))
            .cloned()
    }

    /// The message is complete after all: forget its refusals.
    pub fn settled(&self, partition: i32, offset: i64) {
        let mut p = self.poison.lock().unwrap();
        if !p.is_empty() {
            p.remove(&(partition, offset));
        }
    }

    /// A partition completed `commit_every` messages: commit now rather than at the interval.
    pub fn request_commit(&self) {
        self.due.notify_one();
    }

    /// Writes `records` in the open transaction, waiting for acknowledgement. The returned guard
    /// must be held until the message's completion has been sent to its supervisor.
    ///
    /// `source` is the input message (partition, offset): if the broker refuses a record for
    /// good (too large for the topic, invalid), it is remembered, the transaction aborts, and
    /// after the rewind the message is dead-lettered ([`Self::refused`]) instead of aborting
    /// again for ever.
    pub async fn write(
        &self,
        owner: &Arc<Ownership>,
        records: Vec<Record>,
        source: (i32, i64),
    ) -> Result<TxnGuard, WriteError> {
        let lock = self.lock.clone().read_owned().await;
        if let Some(f) = self.failure() {
            return Err(WriteError::Failed(f));
        }
        let Some(entered) = owner.enter() else {
            return Err(WriteError::GivenUp);
        };
        let mut acks = Vec::with_capacity(records.len());
        for r in &records {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic);
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            if let Some(k) = r.key.as_deref() {
                record = record.key(k);
            }
            if let Some(p) = r.payload.as_deref() {
                record = record.payload(p);
            }
            if let Some(h) = &r.headers {
                record = record.headers(h.clone());
            }
            if let Some(ts) = r.timestamp_ms {
                record = record.timestamp(ts);
            }
            // librdkafka's local queue full: wait for room (as `forward` does), bounded.
            let deadline = Instant::now() + QUEUE_FULL_BOUND;
            let sent = loop {
                match self.producer.send_result(record) {
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < deadline =>
                    {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => break other,
                }
            };
            match sent {
                Ok(ack) => acks.push((ack, &r.topic)),
                Err((e, _)) if crate::processors::too_large(&e) => {
                    // Refused locally, before anything was sent: the message is dead-lettered
                    // (in this transaction). A rewind would meet it again, for ever. Records of
                    // the same message queued before it stay in the transaction (a fan-out
                    // whose later target refuses the size): said in the log.
                    if !acks.is_empty() {
                        warn!(pipeline = %self.pipeline, topic = %r.topic, written = acks.len(), "a record of a fan-out is too large; the message is dead-lettered, the records before it stay written");
                    }
                    drop(acks);
                    return Err(WriteError::TooLarge(e));
                }
                Err((e, _)) => {
                    let cause = format!("write to {} refused: {e}", r.topic);
                    self.fail(&cause);
                    return Err(WriteError::Failed(cause));
                }
            }
        }
        for (ack, topic) in acks {
            let failed = match ack.await {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => {
                    let why = format!("write to {topic} failed: {e}");
                    if !crate::processors::write_error("forward", topic, &e).is_retryable() {
                        let mut p = self.poison.lock().unwrap();
                        let entry = p.entry(source).or_insert((0, String::new()));
                        entry.0 += 1;
                        entry.1 = why.clone();
                    }
                    Some(why)
                }
                Err(_) => Some(format!("write to {topic}: producer gone")),
            };
            if let Some(cause) = failed {
                self.fail(&cause);
                return Err(WriteError::Failed(cause));
            }
        }
        Ok(TxnGuard {
            _lock: lock,
            _owner: entered,
        })
    }

    /// Commits the open transaction with every registered partition's commit point and the
    /// final points of partitions being given up (`finals`), then begins the next. Nothing is
    /// sent when no point moved. An error aborts the transaction and fails the pipeline.
    ///
    /// `finals` were reported by drained supervisors during `finals_epoch`: if a transaction
    /// was aborted since, their completions went with it and they are not committed (their new
    /// owner, or the rewind, runs them again).
    pub async fn commit(
        &self,
        consumer: &Arc<Consumer>,
        finals: &[DrainedOffset],
        finals_epoch: u64,
    ) -> Result<(), String> {
        let write = self.lock.clone().write_owned().await;
        if let Some(f) = self.failure() {
            return Err(f);
        }
        // The hooks of the messages written in this transaction (taken under the write lock:
        // none of the next one's); run only if it commits.
        let hooks = std::mem::take(&mut *self.deferred.lock().unwrap());
        let finals = if finals_epoch == self.epoch() {
            finals
        } else {
            if !finals.is_empty() {
                info!(pipeline = %self.pipeline, partitions = ?finals.iter().map(|f| f.partition).collect::<Vec<_>>(), "drained partitions not committed: their transaction was aborted since; they run again");
            }
            &[]
        };
        let sups: Vec<_> = self
            .supervisors
            .lock()
            .unwrap()
            .iter()
            .map(|(p, (s, _))| (*p, s.clone()))
            .collect();
        let mut points: Vec<(i32, i64, Option<String>)> = finals
            .iter()
            .map(|f| (f.partition, f.next_offset, f.metadata.clone()))
            .collect();
        // Asked in parallel: the write lock is held meanwhile.
        let asks = sups
            .into_iter()
            .filter(|(p, _)| !points.iter().any(|(q, _, _)| q == p))
            .map(|(partition, sup)| async move {
                (
                    partition,
                    sup.call(PartitionMsg::Point, Some(POINT_BOUND)).await,
                )
            });
        for (partition, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(CallResult::Success(Some((next, metadata)))) => {
                    points.push((partition, next, metadata))
                }
                Ok(CallResult::Success(None)) => {}
                other => {
                    // Its writes may be in this transaction while its completions are not
                    // known: commit nothing this time (the next cycle commits them with their
                    // offsets). Final points cannot wait: the partitions are being given up
                    // with their writes in this transaction, so it must abort.
                    if !finals.is_empty() {
                        let cause = format!("no commit point from partition {partition} while committing given-up partitions: {other:?}", other = other.map(|_| ()));
                        self.fail(&cause);
                        return Err(cause);
                    }
                    warn!(pipeline = %self.pipeline, partition, answer = ?other.map(|_| ()), "no commit point; transaction commit postponed");
                    self.deferred.lock().unwrap().splice(0..0, hooks);
                    return Ok(());
                }
            }
        }
        {
            let last = self.last.lock().unwrap();
            points.retain(|(p, n, m)| {
                finals.iter().any(|f| f.partition == *p)
                    || last.get(p).is_none_or(|(ln, lm)| ln != n || lm != m)
            });
        }
        if points.is_empty() {
            self.deferred.lock().unwrap().splice(0..0, hooks);
            return Ok(());
        }
        let Some(group) = consumer.group_metadata() else {
            let cause = "no consumer group metadata (not a group member)".to_string();
            self.fail(&cause);
            return Err(cause);
        };
        let mut tpl = TopicPartitionList::with_capacity(points.len());
        for (p, next, metadata) in &points {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*next));
            if let (Some(m), Some(mut e)) = (metadata, tpl.find_partition(&self.topic, *p)) {
                e.set_metadata(m);
            }
        }
        let producer = self.producer.clone();
        let timeout = self.op_timeout;
        let started = Instant::now();
        // The write lock goes into the blocking call: even if this future is dropped, no write
        // starts before the transaction is committed and the next begun.
        let done = match tokio::task::spawn_blocking(move || {
            let _write = write;
            producer.send_offsets_to_transaction(&tpl, &group, timeout)?;
            producer.commit_transaction(timeout)?;
            producer.begin_transaction()
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(KafkaError::Canceled),
        };
        let offsets: Vec<(i32, i64)> = points.iter().map(|(p, n, _)| (*p, *n)).collect();
        match done {
            Ok(()) => {
                debug!(pipeline = %self.pipeline, ?offsets, took = ?started.elapsed(), "transaction committed");
                self.stats.commit_answered(true, &offsets);
                {
                    let mut last = self.last.lock().unwrap();
                    for (p, n, m) in points {
                        last.insert(p, (n, m));
                    }
                }
                for h in hooks {
                    h();
                }
                Ok(())
            }
            Err(e) => {
                self.stats.commit_answered(false, &offsets);
                let cause = format!("transaction commit failed: {e}");
                if is_fatal(&e) {
                    self.fatal(&cause);
                } else {
                    self.fail(&cause);
                }
                Err(cause)
            }
        }
    }

    /// Aborts the open transaction and begins the next, closing every registered partition's
    /// right to write first (under the write lock: no write is under way). The registered
    /// partitions are forgotten; the caller restarts them from their committed offsets.
    pub async fn abort(&self) -> Result<(), String> {
        let write = self.lock.clone().write_owned().await;
        for (_, (_, owner)) in self.supervisors.lock().unwrap().drain() {
            owner.close();
        }
        for owner in self.given_up.lock().unwrap().drain(..) {
            owner.close();
        }
        // Their messages run again; their hooks (dedup ids) would drop the reruns.
        self.deferred.lock().unwrap().clear();
        self.last.lock().unwrap().clear();
        self.epoch.fetch_add(1, SeqCst);
        let producer = self.producer.clone();
        let timeout = self.op_timeout;
        let done = match tokio::task::spawn_blocking(move || {
            let _write = write;
            producer.abort_transaction(timeout)?;
            producer.begin_transaction()
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(KafkaError::Canceled),
        };
        match done {
            Ok(()) => {
                self.stats.metrics.transactions_aborted.increment(1);
                *self.failed.lock().unwrap() = None;
                Ok(())
            }
            Err(e) => {
                let cause = format!("abort failed: {e}");
                self.fatal(&cause);
                Err(cause)
            }
        }
    }

    /// The commit cycle: every `interval`, or sooner when a partition asks
    /// ([`Self::request_commit`]) but never less than [`MIN_COMMIT_GAP`] after the previous
    /// one (every write waits while a transaction commits), until [`Self::stop`].
    pub async fn run(self: Arc<Self>, consumer: Arc<Consumer>, interval: Duration) {
        let gap = MIN_COMMIT_GAP.min(interval);
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval.saturating_sub(gap)) => {}
                () = self.due.notified() => {}
            }
            tokio::time::sleep(gap).await;
            if self.stopped.load(SeqCst) {
                return;
            }
            if self.failure().is_some() {
                // Waiting for the rewind.
                continue;
            }
            let _ = self.commit(&consumer, &[], self.epoch()).await;
        }
    }

    /// Ends the commit cycle (shutdown): the final commit is the caller's.
    pub fn stop(&self) {
        self.stopped.store(true, SeqCst);
        self.due.notify_one();
    }

    /// The open transaction cannot commit: no write or commit is accepted until the coordinator
    /// has aborted it and rewound the pipeline (told here). Without a coordinator, the process
    /// stops.
    pub fn fail(&self, cause: &str) {
        {
            let mut f = self.failed.lock().unwrap();
            if f.is_some() {
                return;
            }
            *f = Some(cause.to_string());
        }
        error!(pipeline = %self.pipeline, cause, "exactly-once: transaction aborted; the pipeline rewinds to its last committed transaction");
        match self.coordinator.get() {
            Some(c) if c.cast(CoordinatorMsg::Rewind(cause.to_string())).is_ok() => {}
            _ => self.fatal(cause),
        }
    }

    /// Nothing can be committed any more (fenced by another producer with the same
    /// `transactional.id`, or the abort itself failed): the runtime stops; the restart resumes
    /// from the last committed transaction.
    pub fn fatal(&self, cause: &str) {
        *self.failed.lock().unwrap() = Some(cause.to_string());
        error!(pipeline = %self.pipeline, cause, "exactly-once: transaction aborted for good; stopping");
        let _ = self.fatal.send(format!(
            "pipeline {}: exactly-once transaction aborted: {cause}",
            self.pipeline
        ));
    }
}

/// A producer that cannot go on (fenced, or a fatal librdkafka error).
fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_refuses_writers_once_closed_and_counts_those_under_way() {
        let o = Arc::new(Ownership::default());
        let a = o.enter().expect("open");
        let b = o.enter().expect("open");
        assert_eq!(o.close(), 2, "two writes under way");
        assert!(o.enter().is_none(), "closed: no new write");
        drop(a);
        assert_eq!(o.close(), 1);
        drop(b);
        assert_eq!(o.close(), 0);
        assert!(o.is_closed());
    }
}
