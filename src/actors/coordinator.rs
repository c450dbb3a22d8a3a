//! Coordinator: one per pipeline. It owns the consumer and the thread that polls it, turns
//! assignments into partition supervisors and revokes into drains, and runs the shutdown
//! sequence: stop fetching → drain → synchronous commit → leave the group → drop the consumer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rdkafka::consumer::{CommitMode, Consumer as _};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info, warn};

use super::partition::{Abandoned, DrainReport, PartitionArgs, PartitionMsg, PartitionSupervisor};
use crate::config::PipelineSpec;
use crate::kafka::context::{secret_values, DRAIN_MARGIN, SHUTDOWN_COMMIT_BOUND};
use crate::kafka::transaction::Ownership;
use crate::kafka::{client, offsets, Consumer, KeyflowContext};
use crate::message::Message;
use crate::pipeline::Pipeline;
use crate::stats::PipelineStats;

type PartitionQueue = rdkafka::consumer::base_consumer::PartitionQueue<KeyflowContext>;

pub struct Coordinator;

pub struct CoordinatorArgs {
    pub spec: Arc<PipelineSpec>,
    pub brokers: String,
    pub pipeline: Arc<Pipeline>,
    pub stats: Arc<PipelineStats>,
    /// Where a failed partition is reported; the runtime then shuts everything down.
    pub fatal: UnboundedSender<String>,
}

pub struct AssignedPartition {
    pub topic: Arc<str>,
    pub partition: i32,
    pub queue: PartitionQueue,
}

/// A revoked partition's final commit point.
#[derive(Debug, Clone)]
pub struct DrainedOffset {
    pub topic: Arc<str>,
    pub partition: i32,
    pub next_offset: i64,
    /// Offsets completed above it ([`offsets::encode_metadata`]).
    pub metadata: Option<String>,
}

impl DrainedOffset {
    pub fn as_commit(&self) -> offsets::CommitOffset<'_> {
        offsets::CommitOffset {
            topic: &self.topic,
            partition: self.partition,
            next: self.next_offset,
            metadata: self.metadata.as_deref(),
        }
    }
}

/// How a pipeline stopped.
#[derive(Debug, Clone, Default)]
pub struct ShutdownReport {
    pub pipeline: String,
    /// Final commit points.
    pub committed: Vec<(i32, i64)>,
    /// Work still running at the drain deadline.
    pub abandoned: Vec<(i32, Abandoned)>,
    pub commit_error: Option<String>,
}

impl ShutdownReport {
    pub fn clean(&self) -> bool {
        self.abandoned.is_empty() && self.commit_error.is_none()
    }
}

pub enum CoordinatorMsg {
    Assigned(Vec<AssignedPartition>),
    Revoke {
        partitions: Vec<(Arc<str>, i32)>,
        lost: bool,
        /// The drain deadline, fixed once when librdkafka revoked (the rendezvous waits
        /// [`KeyflowContext::rendezvous_timeout`] from then, strictly longer than the drain).
        until: std::time::Instant,
        reply: mpsc::SyncSender<Vec<DrainedOffset>>,
    },
    Stray(Message),
    Shutdown(RpcReplyPort<ShutdownReport>),
    /// Exactly-once: the open transaction could not commit (a rebalance moved on, the member was
    /// fenced, a write failed). Abort it and restart every partition from its committed offset.
    Rewind(String),
}

pub struct CoordinatorState {
    spec: Arc<PipelineSpec>,
    pipeline: Arc<Pipeline>,
    stats: Arc<PipelineStats>,
    consumer: Option<Arc<Consumer>>,
    poll_stop: Arc<AtomicBool>,
    poll_thread: Option<ThreadHandle<()>>,
    partitions: HashMap<i32, Supervised>,
    fatal: UnboundedSender<String>,
    shutting_down: bool,
    /// Revoke drains in progress (each bounded by the drain deadline): shutdown waits for them
    /// so that their commits happen before the consumer closes.
    revoking: Vec<tokio::task::JoinHandle<()>>,
    /// Exactly-once: the transaction commit cycle.
    txn_cycle: Option<tokio::task::JoinHandle<()>>,
}

/// A running partition supervisor, and the flag that tells it the partition is no longer its own.
struct Supervised {
    actor: ActorRef<PartitionMsg>,
    released: Arc<AtomicBool>,
}

impl Supervised {
    /// The partition is given up (revoked, lost, shut down, rewound or reassigned): from now on
    /// the supervisor reads nothing more off the partition's librdkafka queue, leaves its pause
    /// flag alone and commits nothing. A supervisor whose handler is still running (a processor
    /// blocked its thread) when the drain gives up on it outlives the revoke; if the partition
    /// comes back to this member, its next supervisor reads the same librdkafka queue, and
    /// whatever the old one took there would be dropped by its drain while the new one's commit
    /// point passes it. Set before the drain is asked for.
    fn release(self) -> ActorRef<PartitionMsg> {
        self.released.store(true, Ordering::Release);
        self.actor
    }
}

/// Sets the poll thread's stop flag when dropped (unless disarmed by taking the flag out).
struct PollStopGuard(Option<Arc<AtomicBool>>);

impl PollStopGuard {
    fn disarm(mut self) -> Option<Arc<AtomicBool>> {
        self.0.take()
    }
}

/// A consumer with its poll thread running, not yet subscribed.
struct Opened {
    consumer: Arc<Consumer>,
    poll_thread: Option<ThreadHandle<()>>,
    poll_stop: Arc<AtomicBool>,
    /// Stops the poll thread if the start fails or is dropped mid-await.
    stop_guard: PollStopGuard,
}

impl Opened {
    /// Stops the poll thread and waits for it. It holds the last reference to the consumer
    /// (the commit-answer queue must be closed before the client), so ours goes first.
    async fn close(self) {
        let Opened {
            consumer,
            poll_thread,
            stop_guard,
            ..
        } = self;
        drop(stop_guard);
        drop(consumer);
        if let Some(t) = poll_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Makes the pipeline's consumer with `prefetch` and starts polling it at once: polling serves
/// the client's error events, which name the cause if the brokers cannot be reached.
fn open_consumer(
    me: &ActorRef<CoordinatorMsg>,
    a: &CoordinatorArgs,
    prefetch: crate::memory::Prefetch,
) -> Result<Opened, ActorProcessingErr> {
    let ctx = KeyflowContext::new(
        &a.spec.name,
        &a.spec.topic,
        a.spec.drain_timeout,
        a.stats.clone(),
        secret_values(&a.spec.kafka),
    );
    let consumer = client::create_consumer(&a.brokers, &a.spec, prefetch, ctx)?;
    consumer.context().set_coordinator(me.clone());
    consumer
        .context()
        .committer
        .start(&consumer, a.stats.clone());
    let poll_stop = Arc::new(AtomicBool::new(false));
    let poll_thread = spawn_poll_thread(
        &a.spec,
        consumer.clone(),
        me.clone(),
        poll_stop.clone(),
        a.stats.clone(),
    )?;
    Ok(Opened {
        consumer,
        poll_thread: Some(poll_thread),
        stop_guard: PollStopGuard(Some(poll_stop.clone())),
        poll_stop,
    })
}

impl Drop for PollStopGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            stop.store(true, Ordering::SeqCst);
        }
    }
}

/// The brokers could not be reached at start (or refused keyflow's credentials).
#[derive(Debug, thiserror::Error)]
#[error("brokers unreachable at start (waited {waited:.1?}): {cause}")]
pub struct Unreachable {
    pub waited: Duration,
    /// The client's last error, secrets redacted.
    pub cause: String,
}

/// Waits until a broker answers a metadata request for the input topic, up to
/// `startup_timeout`; fails at once on an authentication or certificate failure (configuration,
/// not an outage). Runs once at start. Returns the topic's partition count (`None`: the topic
/// does not exist yet).
async fn wait_reachable(
    consumer: &Arc<Consumer>,
    spec: &PipelineSpec,
    stats: &Arc<PipelineStats>,
) -> Result<Option<usize>, ActorProcessingErr> {
    let (consumer, stats) = (consumer.clone(), stats.clone());
    let (topic, timeout) = (spec.topic.clone(), spec.startup_timeout);
    let res = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            let slice = left.min(Duration::from_millis(500));
            let metadata = consumer.fetch_metadata(Some(&topic), slice);
            if let Ok(m) = &metadata {
                stats.brokers_up();
                stats.clear_client_error();
                let partitions = m
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
                    .filter(|n| *n > 0);
                return Ok(partitions);
            }
            let error = stats.client_error();
            if error.as_ref().is_some_and(|e| e.fatal_at_start) || start.elapsed() >= timeout {
                let cause = error.map_or_else(
                    || match metadata {
                        Err(e) => e.to_string(),
                        Ok(_) => "no answer".to_string(),
                    },
                    |e| e.reason,
                );
                return Err(Unreachable {
                    waited: start.elapsed(),
                    cause,
                });
            }
        }
    })
    .await?;
    Ok(res?)
}

impl Actor for Coordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<CoordinatorMsg>,
        a: CoordinatorArgs,
    ) -> Result<CoordinatorState, ActorProcessingErr> {
        let me_for_txn = me.clone();
        let memory = a.pipeline.memory.clone();
        // librdkafka's prefetch is fixed when the consumer is made, and its share of the memory
        // budget depends on the topic's partition count: a first consumer, made with the
        // prefetch for an unknown topic, waits for the brokers and reads the count; if the
        // prefetch it needs differs, it is closed (it never subscribed) and a second one is made
        // with the right one. Once per start.
        let probe = memory.prefetch_for(None);
        let opened = open_consumer(&me, &a, probe)?;
        let reached = wait_reachable(&opened.consumer, &a.spec, &a.stats).await;
        let reached = match reached {
            Ok(partitions) => {
                let prefetch = memory.prefetch_for(partitions);
                info!(pipeline = %a.spec.name, topic = %a.spec.topic, partitions = ?partitions, prefetch_per_partition = %bytesize::ByteSize(prefetch.bytes_per_partition), prefetch_messages = prefetch.messages_per_partition, buffers = %bytesize::ByteSize(memory.buffer_share), "memory share");
                memory.set_prefetch(prefetch);
                let _ = a.stats.turns.set(memory.turns.clone());
                // What librdkafka may hold: the per-partition prefetch over every partition it
                // was sized for (an unknown topic is sized for `UNKNOWN_TOPIC_PARTITIONS`).
                let sized_for = partitions
                    .filter(|n| *n > 0)
                    .unwrap_or(crate::memory::UNKNOWN_TOPIC_PARTITIONS)
                    as u64;
                let prefetch_total = prefetch.bytes_per_partition * sized_for;
                a.stats
                    .metrics
                    .memory_budget_prefetch
                    .set(prefetch_total as f64);
                a.stats.prefetch_per_partition.store(
                    prefetch.bytes_per_partition,
                    std::sync::atomic::Ordering::Relaxed,
                );
                if prefetch_total > memory.prefetch_share {
                    warn!(pipeline = %a.spec.name, topic = %a.spec.topic, partitions = sized_for, prefetch = %bytesize::ByteSize(prefetch_total), share = %bytesize::ByteSize(memory.prefetch_share), "the smallest useful prefetch per partition over this many partitions exceeds the pipeline's prefetch share: raise memory_limit or run fewer pipelines per process");
                }
                if prefetch == probe {
                    Ok(opened)
                } else {
                    opened.close().await;
                    open_consumer(&me, &a, prefetch)
                }
            }
            Err(e) => {
                opened.close().await;
                Err(e)
            }
        };
        let opened = reached?;
        if let Err(e) = opened.consumer.subscribe(&[&a.spec.topic]) {
            opened.close().await;
            return Err(e.into());
        }
        let Opened {
            consumer,
            poll_thread,
            poll_stop,
            stop_guard,
        } = opened;
        let poll_thread = poll_thread.expect("open until closed");
        drop(stop_guard.disarm());
        let txn_cycle = a.pipeline.txn.clone().map(|t| {
            t.attach(me_for_txn.clone());
            tokio::spawn(t.run(consumer.clone(), a.spec.commit_interval))
        });
        info!(pipeline = %a.spec.name, topic = %a.spec.topic, group = %a.spec.group_id, "subscribed");
        Ok(CoordinatorState {
            spec: a.spec,
            pipeline: a.pipeline,
            stats: a.stats,
            consumer: Some(consumer),
            poll_stop,
            poll_thread: Some(poll_thread),
            partitions: HashMap::new(),
            fatal: a.fatal,
            shutting_down: false,
            revoking: Vec::new(),
            txn_cycle,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<CoordinatorMsg>,
        msg: CoordinatorMsg,
        s: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordinatorMsg::Assigned(list) => {
                let Some(consumer) = s.consumer.clone() else {
                    return Ok(());
                };
                if s.shutting_down {
                    return Ok(());
                }
                consumer
                    .context()
                    .committer
                    .open(list.iter().map(|a| a.partition));
                let skips = read_skip_sets(&consumer, &s.spec, &list).await;
                start_supervisors(&me, s, &consumer, list, skips).await?;
            }
            CoordinatorMsg::Revoke {
                partitions,
                lost,
                until,
                reply,
            } => {
                let sups: Vec<_> = partitions
                    .iter()
                    .filter_map(|(_, p)| s.partitions.remove(p))
                    .map(Supervised::release)
                    .collect();
                s.pipeline.memory.set_assigned(s.partitions.len());
                let txn = s.pipeline.txn.clone();
                let epoch = txn.as_ref().map_or(0, |t| t.epoch());
                if let Some(t) = &txn {
                    if lost {
                        // Their uncommitted writes are in the open transaction, which must not
                        // commit now: abort it and rewind what this member still owns.
                        t.fail("partitions lost (session expired or fenced): their work belongs to their new owner");
                    }
                    t.deregister(partitions.iter().map(|(_, p)| *p), lost);
                }
                let consumer = s.consumer.clone();
                if let Some(c) = &s.consumer {
                    c.context()
                        .committer
                        .forget(partitions.iter().map(|(_, p)| *p));
                }
                let until = tokio::time::Instant::from_std(until);
                // Drain off the coordinator's mailbox so it keeps serving (e.g. stray messages).
                s.revoking.retain(|h| !h.is_finished());
                s.revoking.push(tokio::spawn(async move {
                    let reports = drain_all(sups, until).await;
                    let offsets: Vec<DrainedOffset> = reports
                        .into_iter()
                        .filter_map(|r| {
                            r.next_offset.map(|n| DrainedOffset {
                                topic: r.topic,
                                partition: r.partition,
                                next_offset: n,
                                metadata: r.metadata,
                            })
                        })
                        .collect();
                    match (txn, consumer) {
                        (Some(t), Some(consumer)) => {
                            // Exactly-once: the final points go in the transaction with the
                            // writes they cover, before the partitions are given up; the
                            // consumer commits nothing itself.
                            if !lost {
                                if let Err(e) = t.commit(&consumer, &offsets, epoch).await {
                                    warn!(error = %e, "revoked partitions not committed; their new owner runs them again");
                                }
                            }
                            let _ = reply.send(Vec::new());
                        }
                        _ => {
                            let _ = reply.send(offsets);
                        }
                    }
                }));
                for (_, p) in &partitions {
                    s.stats.remove_partition(*p);
                }
            }
            CoordinatorMsg::Stray(m) => {
                // Not ours (any more): not committed, so its owner receives it.
                if let Some(sup) = s.partitions.get(&m.partition) {
                    let _ = sup.actor.cast(PartitionMsg::Deliver(m));
                }
            }
            CoordinatorMsg::Shutdown(reply) => {
                let report = shutdown(s).await;
                let _ = reply.send(report);
                me.stop(None);
            }
            CoordinatorMsg::Rewind(cause) => {
                if !s.shutting_down {
                    rewind(&me, s, &cause).await?;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<CoordinatorMsg>,
        evt: SupervisionEvent,
        s: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, reason) = evt {
            let partition = s
                .partitions
                .iter()
                .find(|(_, a)| a.actor.get_id() == cell.get_id())
                .map(|(p, _)| *p);
            if let Some(p) = partition {
                if let Some(failed) = s.partitions.remove(&p) {
                    failed.release();
                }
                s.pipeline.memory.set_assigned(s.partitions.len());
            }
            let msg = format!(
                "pipeline {}: partition {:?} failed: {reason}",
                s.spec.name, partition
            );
            error!("{msg}");
            let _ = s.fatal.send(msg);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<CoordinatorMsg>,
        s: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(cycle) = s.txn_cycle.take() {
            cycle.abort();
        }
        if s.poll_thread.is_some() {
            // Stopped without a Shutdown (e.g. the runtime is dropped): still leave the group.
            stop_consumer(s).await;
        }
        Ok(())
    }
}

/// Starts a supervisor per assigned partition, with the offsets to skip.
async fn start_supervisors(
    me: &ActorRef<CoordinatorMsg>,
    s: &mut CoordinatorState,
    consumer: &Arc<Consumer>,
    list: Vec<AssignedPartition>,
    mut skips: HashMap<i32, offsets::SkipSet>,
) -> Result<(), ActorProcessingErr> {
    // The buffer share is split over every partition of the new assignment before the first
    // supervisor starts taking messages.
    let new = list
        .iter()
        .filter(|a| !s.partitions.contains_key(&a.partition))
        .count();
    s.pipeline.memory.set_assigned(s.partitions.len() + new);
    let (cap, max_workers) = (s.pipeline.memory.partition_cap(), s.spec.max_workers);
    let workers = crate::memory::PipelineMemory::worker_cap(cap, max_workers);
    if new > 0 && workers < max_workers {
        // The memory budget, not `max_workers`, bounds each partition's concurrency: say so once
        // per assignment (`/debug/partitions` shows `worker_cap`).
        warn!(pipeline = %s.spec.name, assigned = s.partitions.len() + new, partition_share = %bytesize::ByteSize(cap), worker_cap = workers, max_workers, "the memory budget caps each partition's workers below max_workers: raise memory_limit for more concurrency");
    }
    for a in list {
        let skip = skips.remove(&a.partition).unwrap_or_default();
        if let Some(old) = s.partitions.remove(&a.partition) {
            old.release().stop(Some("reassigned".into()));
        }
        let owner = Arc::new(Ownership::default());
        let released = Arc::new(AtomicBool::new(false));
        let args = PartitionArgs {
            topic: a.topic,
            partition: a.partition,
            queue: a.queue,
            consumer: consumer.clone(),
            pipeline: s.pipeline.clone(),
            spec: s.spec.clone(),
            stats: s.stats.partition(a.partition),
            skip,
            owner: owner.clone(),
            released: released.clone(),
        };
        let (sup, _) = Actor::spawn_linked(None, PartitionSupervisor, args, me.get_cell()).await?;
        if let Some(t) = &s.pipeline.txn {
            t.register(a.partition, sup.clone(), owner);
        }
        s.partitions.insert(
            a.partition,
            Supervised {
                actor: sup,
                released,
            },
        );
    }
    s.pipeline.memory.set_assigned(s.partitions.len());
    Ok(())
}

/// Exactly-once: aborts the open transaction, then restarts every partition this member owns
/// from its committed offset and metadata (what the aborted transaction held runs again). A
/// partition never committed starts again at the first offset its supervisor received.
async fn rewind(
    me: &ActorRef<CoordinatorMsg>,
    s: &mut CoordinatorState,
    cause: &str,
) -> Result<(), ActorProcessingErr> {
    let (Some(txn), Some(consumer)) = (s.pipeline.txn.clone(), s.consumer.clone()) else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    if txn.abort().await.is_err() {
        return Ok(()); // fatal: the runtime stops
    }
    let mut firsts = HashMap::new();
    for (p, sup) in s.partitions.drain() {
        let sup = sup.release();
        let first = match sup
            .call(PartitionMsg::Abandon, Some(Duration::from_secs(5)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(f)) => Ok(f),
            _ => {
                sup.stop(Some("rewound".into()));
                Err(())
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), wait_stopped(&sup)).await;
        firsts.insert(p, first);
    }
    let partitions: Vec<i32> = firsts.keys().copied().collect();
    let topic: Arc<str> = Arc::from(s.spec.topic.as_str());
    let (c, t, ps) = (consumer.clone(), topic.clone(), partitions.clone());
    let committed = blocking_bounded(SKIP_SET_READ_BOUND + Duration::from_secs(1), move || {
        offsets::committed_with_metadata(&c, &t, &ps, SKIP_SET_READ_BOUND)
    })
    .await;
    let committed: HashMap<i32, (i64, Vec<u8>)> = match committed {
        Some(Ok(c)) => c.into_iter().map(|(p, o, m)| (p, (o, m))).collect(),
        other => {
            let why = match other {
                Some(Err(e)) => e.to_string(),
                _ => "no answer in time".to_string(),
            };
            txn.fail(&format!("rewind: committed offsets unreadable: {why}"));
            return Ok(());
        }
    };
    let mut list = Vec::new();
    let mut skips = HashMap::new();
    for p in partitions {
        let (from, metadata) = match (committed.get(&p), firsts.get(&p).copied()) {
            (Some((o, m)), _) if *o >= 0 => (Some(*o), m.as_slice()),
            (_, Some(Ok(first))) => (first, &[][..]),
            _ => {
                // Never committed, and where its supervisor began is unknown: starting
                // anywhere could skip what it received. Stop; the restart starts from the
                // group's reset position.
                txn.fatal(&format!(
                    "rewind: partition {p} was never committed and its first offset is unknown"
                ));
                return Ok(());
            }
        };
        if let Some(from) = from {
            let (c, t) = (consumer.clone(), topic.clone());
            let seek = blocking_bounded(Duration::from_secs(6), move || {
                c.seek(&t, p, rdkafka::Offset::Offset(from), Duration::from_secs(5))
            })
            .await;
            if !matches!(seek, Some(Ok(()))) {
                txn.fail(&format!(
                    "rewind: partition {p} could not seek to {from}: {seek:?}"
                ));
                return Ok(());
            }
            if !metadata.is_empty() {
                if let Ok(skip) = offsets::decode_metadata(from, metadata) {
                    skips.insert(p, skip);
                }
            }
        }
        match consumer.split_partition_queue(&topic, p) {
            Some(queue) => list.push(AssignedPartition {
                topic: topic.clone(),
                partition: p,
                queue,
            }),
            None => {
                txn.fail(&format!("rewind: partition {p}: no queue"));
                return Ok(());
            }
        }
    }
    let n = list.len();
    start_supervisors(me, s, &consumer, list, skips).await?;
    warn!(pipeline = %s.spec.name, cause, partitions = n, took = ?started.elapsed(), "exactly-once: rewound to the last committed transaction");
    Ok(())
}

/// How long an assignment waits for the committed offsets' metadata before starting without it.
const SKIP_SET_READ_BOUND: Duration = Duration::from_secs(5);

/// Reads the completed-offsets metadata committed with each assigned partition's offset (one
/// broker round trip per assignment, bounded): the offsets the previous owner completed above
/// its commit point, to skip. Metadata another program wrote is ignored with a warning; if the
/// read fails, the partitions start without skip sets (their completed offsets run again, which
/// is at-least-once).
async fn read_skip_sets(
    consumer: &Arc<Consumer>,
    spec: &PipelineSpec,
    assigned: &[AssignedPartition],
) -> HashMap<i32, offsets::SkipSet> {
    let mut skips = HashMap::new();
    let Some(first) = assigned.first() else {
        return skips;
    };
    let (consumer, topic) = (consumer.clone(), first.topic.clone());
    let partitions: Vec<i32> = assigned.iter().map(|a| a.partition).collect();
    let read = blocking_bounded(SKIP_SET_READ_BOUND + Duration::from_secs(1), move || {
        offsets::committed_with_metadata(&consumer, &topic, &partitions, SKIP_SET_READ_BOUND)
    })
    .await;
    let committed = match read {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            warn!(pipeline = %spec.name, error = %e, "could not read the committed offsets' metadata; offsets completed above the commit point will be processed again");
            return skips;
        }
        None => {
            warn!(pipeline = %spec.name, bound = ?SKIP_SET_READ_BOUND, "committed offsets' metadata not read in time; offsets completed above the commit point will be processed again");
            return skips;
        }
    };
    for (partition, offset, metadata) in committed {
        if metadata.is_empty() {
            continue;
        }
        match offsets::decode_metadata(offset, &metadata) {
            Ok(skip) => {
                info!(pipeline = %spec.name, partition, committed = offset, skip = skip.len(), "offsets completed above the commit point will be skipped");
                skips.insert(partition, skip);
            }
            Err(e) => {
                warn!(pipeline = %spec.name, partition, committed = offset, metadata_bytes = metadata.len(), reason = %e, "commit metadata ignored")
            }
        }
    }
    skips
}

/// Drains `sups` in parallel: each finishes its running work until `until`, reports, and stops.
/// Takes at most `until + DRAIN_MARGIN` in all, however many supervisors and however late each
/// handles its `Drain`; returns the reports that came (a partition that did not report keeps its
/// last commit and is redelivered from there, the others are committed).
async fn drain_all(
    sups: Vec<ActorRef<PartitionMsg>>,
    until: tokio::time::Instant,
) -> Vec<DrainReport> {
    let total = until + DRAIN_MARGIN;
    let each = sups.into_iter().map(|sup| async move {
        let call = sup.call(|reply| PartitionMsg::Drain { until, reply }, None);
        let report = match tokio::time::timeout_at(total, call).await {
            Ok(Ok(ractor::rpc::CallResult::Success(report))) => Some(report),
            Ok(Ok(_)) | Err(_) => {
                warn!(partition = ?sup.get_name(), "a partition did not answer its drain in time");
                None
            }
            Ok(Err(e)) => {
                warn!(error = %e, "a partition could not be drained");
                None
            }
        };
        // Wait until the supervisor is gone, so its queue is released before the unassign.
        let _ = tokio::time::timeout_at(total, wait_stopped(&sup)).await;
        report
    });
    futures::future::join_all(each)
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn wait_stopped(sup: &ActorRef<PartitionMsg>) {
    while !matches!(sup.get_status(), ractor::ActorStatus::Stopped) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn shutdown(s: &mut CoordinatorState) -> ShutdownReport {
    s.shutting_down = true;
    let mut report = ShutdownReport {
        pipeline: s.spec.name.clone(),
        ..Default::default()
    };
    if let Some(c) = &s.consumer {
        // A revoke waiting on (or queued behind) this drain waits for its commit.
        c.context().set_shutting_down();
    }
    if let Some(c) = &s.consumer {
        c.context().committer.forget(s.partitions.keys().copied());
    }
    if let Some(t) = &s.pipeline.txn {
        t.deregister(s.partitions.keys().copied(), false);
    }
    let sups: Vec<_> = s.partitions.drain().map(|(_, a)| a.release()).collect();
    let epoch = s.pipeline.txn.as_ref().map_or(0, |t| t.epoch());
    info!(pipeline = %s.spec.name, partitions = sups.len(), "shutting down: draining");
    let until = tokio::time::Instant::now() + s.spec.drain_timeout;
    let reports = drain_all(sups, until).await;
    // Revokes that began before the shutdown end by their own (earlier) deadline; their
    // rendezvous commits before the consumer closes.
    for h in s.revoking.drain(..) {
        let _ = h.await;
    }
    let mut final_offsets = Vec::new();
    for r in reports {
        if let Some(n) = r.next_offset {
            final_offsets.push(DrainedOffset {
                topic: r.topic.clone(),
                partition: r.partition,
                next_offset: n,
                metadata: r.metadata.clone(),
            });
            report.committed.push((r.partition, n));
        }
        report
            .abandoned
            .extend(r.abandoned.into_iter().map(|a| (r.partition, a)));
        s.stats.remove_partition(r.partition);
    }
    if let (Some(t), Some(consumer)) = (s.pipeline.txn.clone(), s.consumer.clone()) {
        // Exactly-once: the final points go in the last transaction, with the writes they
        // cover; a failed pipeline commits nothing (its transaction was aborted).
        t.stop();
        if let Some(cycle) = s.txn_cycle.take() {
            let _ = cycle.await;
        }
        match t.failure() {
            Some(f) => report.commit_error = Some(f),
            None => match t.commit(&consumer, &final_offsets, epoch).await {
                Ok(()) => {
                    info!(pipeline = %s.spec.name, offsets = ?report.committed, "final transaction committed")
                }
                Err(e) => report.commit_error = Some(e),
            },
        }
    } else if let Some(down) = s.stats.brokers_unreachable_for() {
        // librdkafka would park a synchronous commit until the session times out: skip it (the
        // work is redelivered from the last commit, which is at-least-once).
        if !final_offsets.is_empty() {
            report.commit_error = Some(format!(
                "final commit skipped: brokers unreachable for {down:.1?}"
            ));
        }
    } else if let Some(consumer) = s.consumer.clone() {
        let offsets = final_offsets.clone();
        let commit = blocking_bounded(SHUTDOWN_COMMIT_BOUND, move || {
            let o: Vec<_> = offsets.iter().map(DrainedOffset::as_commit).collect();
            offsets::commit(&consumer, &o, CommitMode::Sync)
        })
        .await;
        match commit {
            Some(Ok(())) => {
                info!(pipeline = %s.spec.name, offsets = ?report.committed, "final commit done")
            }
            Some(Err(e)) => report.commit_error = Some(e.to_string()),
            None => {
                report.commit_error = Some(format!(
                    "final commit not confirmed within {SHUTDOWN_COMMIT_BOUND:?}"
                ))
            }
        }
    }
    stop_consumer(s).await;
    report
}

/// Leaves the group: the poll thread holds the last reference, so the consumer closes there
/// (its final revoke needs no rendezvous once `closing` is set).
async fn stop_consumer(s: &mut CoordinatorState) {
    if let Some(c) = s.consumer.take() {
        c.context().set_closing();
    }
    s.poll_stop.store(true, Ordering::SeqCst);
    // During an outage librdkafka's close waits for a coordinator it cannot reach: bounded, the
    // thread is left to end with the process.
    let bound = if s.stats.brokers_unreachable_for().is_some() {
        CLOSE_BOUND_UNREACHABLE
    } else {
        CLOSE_BOUND
    };
    if let Some(t) = s.poll_thread.take() {
        let joined = tokio::time::timeout(bound, async {
            while !t.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if joined.is_err() {
            warn!(pipeline = %s.spec.name, ?bound, "the consumer did not close in time; left behind");
            return;
        }
        let _ = t.join();
    }
    info!(pipeline = %s.spec.name, "left the group");
}

/// How long closing the consumer (LeaveGroup) may take at shutdown.
const CLOSE_BOUND: Duration = Duration::from_secs(10);
/// The same while no broker is reachable: the LeaveGroup cannot be sent anyway.
const CLOSE_BOUND_UNREACHABLE: Duration = Duration::from_secs(1);

/// Runs `f` on its own thread and waits for it up to `bound` (`None`: still running; the
/// thread is left to finish on its own). Not the blocking pool: the runtime's drop would wait
/// for a task parked in librdkafka.
async fn blocking_bounded<T: Send + 'static>(
    bound: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("kf-commit".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if spawned.is_err() {
        return None;
    }
    tokio::time::timeout(bound, rx).await.ok()?.ok()
}

fn spawn_poll_thread(
    spec: &PipelineSpec,
    consumer: Arc<Consumer>,
    coordinator: ActorRef<CoordinatorMsg>,
    stop: Arc<AtomicBool>,
    stats: Arc<PipelineStats>,
) -> std::io::Result<ThreadHandle<()>> {
    let topic: Arc<str> = Arc::from(spec.topic.as_str());
    let name = spec.name.clone();
    std::thread::Builder::new()
        .name(format!("kf-poll-{}", spec.name))
        .spawn(move || {
            // Serves rebalance callbacks and client events; messages normally arrive on their
            // partition queues, not here.
            while !stop.load(Ordering::SeqCst) {
                stats.poll_heartbeat();
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let _ = coordinator.cast(CoordinatorMsg::Stray(Message::from_borrowed(
                            &m,
                            &topic,
                            std::time::Instant::now(),
                        )));
                    }
                    Some(Err(e)) => warn!(pipeline = %name, error = %e, "consumer error"),
                    None => {}
                }
            }
            consumer.unsubscribe();
            // A librdkafka queue must not outlive its client.
            consumer.context().committer.close_queue();
            // Dropping the last reference closes the consumer (LeaveGroup), polling as it goes.
            drop(consumer);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for a partition supervisor: its handler is busy for `busy` before it answers a
    /// drain (a slow-to-handle mailbox), and it stops afterwards only if `stops`.
    struct FakeSup {
        busy: Duration,
        stops: bool,
    }

    impl Actor for FakeSup {
        type Msg = PartitionMsg;
        type State = i32;
        type Arguments = i32;

        async fn pre_start(
            &self,
            _me: ActorRef<PartitionMsg>,
            partition: i32,
        ) -> Result<i32, ActorProcessingErr> {
            Ok(partition)
        }

        async fn handle(
            &self,
            me: ActorRef<PartitionMsg>,
            msg: PartitionMsg,
            partition: &mut i32,
        ) -> Result<(), ActorProcessingErr> {
            if let PartitionMsg::Drain { reply, .. } = msg {
                tokio::time::sleep(self.busy).await;
                let _ = reply.send(DrainReport {
                    topic: Arc::from("t"),
                    partition: *partition,
                    next_offset: Some(100 + i64::from(*partition)),
                    metadata: None,
                    abandoned: Vec::new(),
                });
                if self.stops {
                    me.stop(None);
                }
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_all_ends_before_the_rendezvous_with_every_report_that_came() {
        const DRAIN: Duration = Duration::from_millis(500);
        let mut sups = Vec::new();
        // Three drain at once but are slow to stop; one is busy well past the deadline.
        for p in 0..3 {
            let fake = FakeSup {
                busy: Duration::from_millis(10),
                stops: false,
            };
            sups.push(Actor::spawn(None, fake, p).await.unwrap());
        }
        let busy = FakeSup {
            busy: DRAIN + Duration::from_secs(30),
            stops: true,
        };
        sups.push(Actor::spawn(None, busy, 3).await.unwrap());
        let refs: Vec<_> = sups.iter().map(|(a, _)| a.clone()).collect();
        let start = tokio::time::Instant::now();
        let reports = drain_all(refs, start + DRAIN).await;
        let took = start.elapsed();
        let rendezvous = KeyflowContext::rendezvous_timeout(DRAIN);
        let mut drained: Vec<_> = reports
            .iter()
            .map(|r| (r.partition, r.next_offset))
            .collect();
        drained.sort();
        println!("drain_all with 3 slow-to-stop and 1 busy supervisor: {took:.2?} (rendezvous {rendezvous:?}), reports {drained:?}");
        assert!(
            took < rendezvous,
            "drain_all took {took:.2?}, the rendezvous gives up at {rendezvous:?}: nothing would be committed"
        );
        assert!(
            took <= DRAIN + DRAIN_MARGIN + Duration::from_millis(300),
            "{took:.2?}"
        );
        assert_eq!(
            drained,
            vec![(0, Some(100)), (1, Some(101)), (2, Some(102))],
            "the partitions that drained are reported (and so committed)"
        );
        for (a, _) in sups {
            a.stop(None);
        }
    }

    #[test]
    fn the_poll_stop_guard_stops_the_thread_unless_disarmed() {
        let flag = Arc::new(AtomicBool::new(false));
        drop(PollStopGuard(Some(flag.clone())));
        assert!(
            flag.load(Ordering::SeqCst),
            "dropped: the poll thread is told to stop"
        );
        let flag = Arc::new(AtomicBool::new(false));
        let mut g = PollStopGuard(Some(flag.clone()));
        g.0 = None;
        drop(g);
        assert!(
            !flag.load(Ordering::SeqCst),
            "disarmed: the poll thread runs on"
        );
    }
}
