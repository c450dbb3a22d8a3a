//! PartitionSupervisor: one per assigned partition. It owns the partition's queue of fetched
//! messages, the per-key scheduler, the in-flight bound (flow control) and the offset tracker,
//! and supervises an elastic pool of workers.
//!
//! Life of a message: the queue's non-empty callback sends `Fetch`; the supervisor takes
//! messages off the queue while the flow budget has room, records each offset, and hands each
//! message to the scheduler, which either starts it on an idle (or new) worker or parks it
//! behind the running message of its key. `Done` completes the offset, frees the budget, and
//! starts the next message of that key on the same worker. Every `commit_interval`, or as soon
//! as `commit_every` messages completed, the commit point (all offsets below it complete) is
//! committed with the offsets completed above it in the commit's metadata; a new owner skips
//! those (`SkipSet`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;
use tracing::{debug, error, info, warn, Instrument};

use super::flow::FlowControl;
use super::scheduler::KeyScheduler;
use super::worker::{Worker, WorkerArgs, WorkerMsg};
use crate::config::{PipelineSpec, EXACTLY_ONCE_MAX_PENDING};
use crate::introspect::{show_key, InFlightDebug, PartitionDebug, WaitingKey, BACKING_OFF};
use crate::kafka::committer::Point;
use crate::kafka::offsets::SkipSet;
use crate::kafka::transaction::Ownership;
use crate::kafka::{Consumer, KeyflowContext, OffsetTracker};
use crate::message::Message;
use crate::pipeline::{Outcome, Pipeline};
use crate::processors::ProcessError;
use crate::stats::PartitionStats;

type PartitionQueue = rdkafka::consumer::base_consumer::PartitionQueue<KeyflowContext>;

/// Messages taken off the queue per `Fetch` before yielding to the mailbox, so completions
/// interleave with fetching.
const FETCH_BATCH: usize = 512;

pub struct PartitionSupervisor;

pub struct PartitionArgs {
    pub topic: Arc<str>,
    pub partition: i32,
    pub queue: PartitionQueue,
    pub consumer: Arc<Consumer>,
    pub pipeline: Arc<Pipeline>,
    pub spec: Arc<PipelineSpec>,
    pub stats: Arc<PartitionStats>,
    /// Offsets the previous owner completed above its commit point (read at assignment).
    pub skip: SkipSet,
    /// Exactly-once: the partition's right to write in the pipeline's transaction.
    pub owner: Arc<Ownership>,
}

pub enum PartitionMsg {
    /// The queue became non-empty (or there is room again): take messages.
    Fetch,
    /// A message of this partition that arrived on the consumer's main queue.
    Deliver(Message),
    /// A worker finished its message.
    Done {
        worker: usize,
        outcome: Outcome,
    },
    /// Commit interval.
    Tick,
    /// The partition has been congested since a while: pause it if it still is.
    FlowCheck,
    /// Revoke or shutdown: stop taking messages, finish running ones until `deadline`, report the
    /// commit point, stop.
    Drain {
        /// Absolute, fixed by the revoke (or shutdown) for every partition alike.
        until: tokio::time::Instant,
        reply: RpcReplyPort<DrainReport>,
    },
    DrainDeadline,
    /// A message's backoff has passed: run it again (its key waited meanwhile).
    Retry(Arc<Message>, u32),
    /// The pipeline gate changed: `true` while it is held (breaker open, DLQ failing).
    Gate(bool),
    /// `/debug/partitions`: report what the partition holds and why it waits.
    Inspect(RpcReplyPort<PartitionDebug>),
    /// Exactly-once: the commit point and the offsets completed above it, for the transaction
    /// being committed (answered after every completion already in the mailbox).
    Point(RpcReplyPort<Option<(i64, Option<String>)>>),
    /// Exactly-once rewind: the transaction was aborted, so everything this supervisor
    /// completed since the last commit is void. Replies the first offset it received (where to
    /// start again when nothing was ever committed) and stops, without a commit.
    Abandon(RpcReplyPort<Option<i64>>),
    /// Test hook, not API: opens a second handle on this partition's queue and drops it at once,
    /// as a stopped supervisor's handle dropping late does. rdkafka's `PartitionQueue::drop`
    /// clears the non-empty callback of the queue it shares with ours: this supervisor's
    /// wake-ups stop (tests/stalls.rs). Replies whether the handle could be opened.
    #[doc(hidden)]
    DropSecondQueueHandle(RpcReplyPort<bool>),
    /// Test hook, not API: pauses this partition on the consumer behind the supervisor's back,
    /// as a pause flag left by an earlier owner does (issue 11 stall 1): librdkafka stops
    /// fetching it while the supervisor believes it is running (tests/stalls.rs).
    #[doc(hidden)]
    PauseBehindItsBack(RpcReplyPort<bool>),
}

/// What a drained partition hands back.
#[derive(Debug, Clone)]
pub struct DrainReport {
    pub topic: Arc<str>,
    pub partition: i32,
    /// The offset to commit: never past an incomplete message. `None` if nothing was received.
    pub next_offset: Option<i64>,
    /// The offsets completed above it, as commit metadata.
    pub metadata: Option<String>,
    /// Messages still running at the deadline (abandoned: the next owner receives them again).
    pub abandoned: Vec<Abandoned>,
}

#[derive(Debug, Clone)]
pub struct Abandoned {
    pub offset: i64,
    pub key: Option<String>,
    pub running_for: Duration,
}

struct Slot {
    actor: ActorRef<WorkerMsg>,
    running: Option<Arc<Message>>,
    /// The attempt the running message is on (1-based).
    attempt: u32,
    /// Times the running message has crashed a worker.
    crashes: u32,
    /// When the running message started (processing duration).
    started: Instant,
    /// The running message's attempt and backoff state, written by the worker.
    progress: Arc<AtomicU32>,
}

pub struct PartitionState {
    topic: Arc<str>,
    partition: i32,
    queue: Option<PartitionQueue>,
    consumer: Arc<Consumer>,
    pipeline: Arc<Pipeline>,
    spec: Arc<PipelineSpec>,
    fetch_scheduled: Arc<AtomicBool>,
    tracker: OffsetTracker,
    scheduler: KeyScheduler<Arc<Message>>,
    flow: FlowControl,
    workers: Vec<Slot>,
    idle: Vec<usize>,
    /// Free to start (their key is not busy) but every worker is taken.
    ready: VecDeque<(Arc<Message>, u32)>,
    /// The most messages buffered or running at once (mirrored in the stats when it rises).
    high_water: usize,
    running: usize,
    restarts: VecDeque<Instant>,
    /// The commit point last sent (its answer is recorded in the stats by the client context).
    commit_sent: Option<i64>,
    /// Offsets completed (or skipped) since the last commit was sent: `commit_every` triggers a
    /// commit, and a commit point that did not move still carries new completions above it.
    uncommitted: u64,
    /// Offsets a previous owner completed above its commit point: completed as they arrive.
    skip: SkipSet,
    draining: Option<RpcReplyPort<DrainReport>>,
    flow_check_scheduled: bool,
    ticker: Option<JoinHandle<()>>,
    stats: Arc<PartitionStats>,
    /// Messages waiting out a retry backoff: their keys are held, their workers free.
    retrying: usize,
    /// Those messages, with the attempt they wait for and since when (for `/debug`).
    backoffs: Vec<(Arc<Message>, u32, Instant)>,
    /// The pipeline gate is held: take nothing new, keep the partition paused.
    gate_held: bool,
    /// Whether the partition is paused on the consumer (for flow control or the gate).
    consumer_paused: bool,
    gate_watch: Option<JoinHandle<()>>,
    /// When a message last completed, or when work became pending (stuck watchdog).
    last_progress: Instant,
    last_completion: Option<Instant>,
    /// `partition{pipeline, topic, partition}`: every handler runs inside it.
    span: tracing::Span,
    /// Exactly-once: this partition's right to write in the transaction, closed when the
    /// partition is given up.
    owner: Arc<Ownership>,
    /// The first offset received (exactly-once rewind of a partition never committed).
    first_received: Option<i64>,
    /// The broker's end of the partition, for lag when librdkafka's cached watermark is unknown
    /// or stale (see [`observe`]).
    broker_end: BrokerEnd,
}

impl Actor for PartitionSupervisor {
    type Msg = PartitionMsg;
    type State = PartitionState;
    type Arguments = PartitionArgs;

    async fn pre_start(
        &self,
        me: ActorRef<PartitionMsg>,
        a: PartitionArgs,
    ) -> Result<PartitionState, ActorProcessingErr> {
        let mut queue = a.queue;
        let flag = Arc::new(AtomicBool::new(false));
        arm_wakeup(&mut queue, &flag, &me);
        let spec = a.spec;
        let _ = a.stats.actor.set(me.clone());
        resume_on_start(&a.consumer, &a.topic, a.partition);
        let span = tracing::info_span!("partition", pipeline = %spec.name, topic = %a.topic, partition = a.partition);
        Ok(PartitionState {
            last_progress: Instant::now(),
            last_completion: None,
            span,
            topic: a.topic,
            partition: a.partition,
            queue: Some(queue),
            consumer: a.consumer,
            pipeline: a.pipeline,
            fetch_scheduled: flag,
            tracker: OffsetTracker::new(),
            scheduler: KeyScheduler::new(spec.ordering),
            flow: FlowControl::new(
                spec.max_in_flight,
                spec.max_buffered_bytes,
                spec.resume_at,
                spec.pause_after,
            ),
            workers: Vec::new(),
            idle: Vec::new(),
            ready: VecDeque::new(),
            high_water: 0,
            running: 0,
            restarts: VecDeque::new(),
            commit_sent: None,
            uncommitted: 0,
            skip: a.skip,
            draining: None,
            flow_check_scheduled: false,
            ticker: None,
            stats: a.stats,
            spec,
            retrying: 0,
            backoffs: Vec::new(),
            gate_held: false,
            consumer_paused: false,
            gate_watch: None,
            broker_end: BrokerEnd::default(),
            owner: a.owner,
            first_received: None,
        })
    }

    async fn post_start(
        &self,
        me: ActorRef<PartitionMsg>,
        s: &mut PartitionState,
    ) -> Result<(), ActorProcessingErr> {
        s.ticker = Some(me.send_interval(s.spec.commit_interval, || PartitionMsg::Tick));
        // Forward the pipeline gate's changes into the mailbox (breaker open, DLQ failing).
        let mut gate = s.pipeline.gate.subscribe();
        let m = me.clone();
        s.gate_watch = Some(tokio::spawn(async move {
            loop {
                let held = *gate.borrow_and_update() > 0;
                if m.cast(PartitionMsg::Gate(held)).is_err() {
                    return;
                }
                if gate.changed().await.is_err() {
                    return;
                }
            }
        }));
        info!(topic = %s.topic, partition = s.partition, "partition supervisor started");
        // The queue may already hold messages (its callback fires only on a transition).
        let _ = me.cast(PartitionMsg::Fetch);
        Ok(())
    }

    async fn post_stop(
        &self,
        me: ActorRef<PartitionMsg>,
        s: &mut PartitionState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = s.ticker.take() {
            t.abort();
        }
        if let Some(t) = s.gate_watch.take() {
            t.abort();
        }
        // Stopped without a drain (reassigned, failed): its late writes must not join the
        // transaction either.
        s.owner.close();
        me.stop_children(None);
        s.queue = None;
        debug!(topic = %s.topic, partition = s.partition, "partition supervisor stopped");
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<PartitionMsg>,
        msg: PartitionMsg,
        s: &mut PartitionState,
    ) -> Result<(), ActorProcessingErr> {
        let span = s.span.clone();
        match msg {
            PartitionMsg::Fetch => {
                s.fetch_scheduled.store(false, Release);
                fetch(&me, s).instrument(span).await?;
            }
            PartitionMsg::Deliver(m) => {
                if s.draining.is_none() {
                    admit(&me, s, m).instrument(span).await?;
                    apply_flow(&me, s);
                }
            }
            PartitionMsg::Done { worker, outcome } => {
                on_done(&me, s, worker, outcome).instrument(span).await?;
            }
            PartitionMsg::FlowCheck => {
                s.flow_check_scheduled = false;
                // A draining supervisor no longer owns the consumer's pause flag: the next
                // owner may already have resumed the partition (STYLE 15).
                if s.draining.is_none() {
                    apply_flow(&me, s);
                }
            }
            PartitionMsg::Tick => {
                if s.draining.is_none() {
                    // Heal a lost wake-up within one tick. The queue's non-empty callback lives
                    // on librdkafka's queue, shared by every handle of the partition: another
                    // handle dropped after ours was armed (an old supervisor of this partition
                    // stopping late) clears it, and the partition would never fetch again.
                    // Re-arm it, then take what is waiting: one callback swap and one
                    // non-blocking poll per tick, nothing per message. `fetch` does nothing
                    // while the gate is held or the budget is spent.
                    if let Some(q) = s.queue.as_mut() {
                        arm_wakeup(q, &s.fetch_scheduled, &me);
                    }
                    fetch(&me, s).instrument(span).await?;
                }
                commit_progress(s);
                // Sends what a failed commit left pending, even if nothing moved here.
                s.consumer.context().committer.tick(&s.consumer);
                s.stats.in_flight.store(s.flow.count(), Relaxed);
                s.stats
                    .buffered_bytes
                    .store(s.flow.bytes() as usize, Relaxed);
                observe(s);
            }
            PartitionMsg::Inspect(reply) => {
                let _ = reply.send(inspect(s));
            }
            PartitionMsg::Abandon(reply) => {
                s.owner.close();
                let _ = reply.send(s.first_received);
                me.stop(Some("rewound".into()));
            }
            PartitionMsg::Point(reply) => {
                let point = s.tracker.committable().map(|n| (n, commit_metadata(s)));
                s.uncommitted = 0;
                let _ = reply.send(point);
            }
            PartitionMsg::DropSecondQueueHandle(reply) => {
                let opened = s
                    .consumer
                    .split_partition_queue(&s.topic, s.partition)
                    .is_some();
                let _ = reply.send(opened);
            }
            PartitionMsg::PauseBehindItsBack(reply) => {
                let mut tpl = TopicPartitionList::with_capacity(1);
                tpl.add_partition(&s.topic, s.partition);
                let _ = reply.send(s.consumer.pause(&tpl).is_ok());
            }
            PartitionMsg::Drain { until, reply } => {
                // Messages not yet started are abandoned now: the commit point cannot pass them,
                // so the next owner receives them.
                for m in s
                    .scheduler
                    .take_waiting()
                    .into_iter()
                    .chain(s.ready.drain(..).map(|(m, _)| m))
                {
                    s.flow.release(m.size());
                }
                s.draining = Some(reply);
                if s.retrying > 0 {
                    // Waiting out a backoff: abandoned like the messages not yet started.
                    info!(topic = %s.topic, partition = s.partition, retrying = s.retrying, "draining: messages waiting to retry are left for the next owner");
                }
                if s.running == 0 {
                    finish_drain(&me, s);
                } else {
                    let deadline = until.saturating_duration_since(tokio::time::Instant::now());
                    info!(topic = %s.topic, partition = s.partition, running = s.running, ?deadline, "draining");
                    me.send_after(deadline, || PartitionMsg::DrainDeadline);
                }
            }
            PartitionMsg::DrainDeadline => {
                if s.draining.is_some() {
                    finish_drain(&me, s);
                }
            }
            PartitionMsg::Retry(m, attempt) => {
                s.retrying -= 1;
                s.backoffs.retain(|(b, _, _)| b.offset != m.offset);
                // While draining a waiting retry is abandoned: the commit point cannot pass it.
                if s.draining.is_none() {
                    start_or_park(&me, s, m, attempt).await?;
                }
            }
            PartitionMsg::Gate(held) => {
                // Once draining, the gate no longer matters here (nothing new is taken) and the
                // pause flag on the consumer belongs to the next owner: pausing it now could
                // undo that owner's `resume_on_start` while /debug shows it unpaused.
                if s.draining.is_none() && held != s.gate_held {
                    s.gate_held = held;
                    info!(topic = %s.topic, partition = s.partition, held, "pipeline gate");
                    sync_pause(s);
                    if !held {
                        fetch(&me, s).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<PartitionMsg>,
        evt: SupervisionEvent,
        s: &mut PartitionState,
    ) -> Result<(), ActorProcessingErr> {
        // Override ractor's default (which stops the supervisor when a child exits): a crashed
        // worker is replaced and its message runs again, within a restart budget.
        let SupervisionEvent::ActorFailed(cell, reason) = evt else {
            return Ok(());
        };
        let Some(id) = s
            .workers
            .iter()
            .position(|w| w.actor.get_id() == cell.get_id())
        else {
            return Ok(());
        };
        s.stats_restart();
        let now = Instant::now();
        let budget = s.spec.worker_restarts;
        s.restarts.push_back(now);
        while s
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > budget.within.get())
        {
            s.restarts.pop_front();
        }
        let offset = s.workers[id].running.as_ref().map(|m| m.offset);
        error!(topic = %s.topic, partition = s.partition, worker = id, ?offset, %reason, restarts = s.restarts.len(), "worker crashed; restarting it");
        if s.restarts.len() as u32 > budget.max {
            return Err(format!(
                "partition {}/{}: {} worker crashes within {} (budget {}); failing the partition",
                s.topic,
                s.partition,
                s.restarts.len(),
                budget.within,
                budget.max
            )
            .into());
        }
        let actor = spawn_worker(&me, s, id, s.workers[id].progress.clone()).await?;
        s.workers[id].actor = actor;
        if let Some(m) = s.workers[id].running.clone() {
            s.workers[id].crashes += 1;
            let crashes = s.workers[id].crashes;
            let msg = if crashes >= s.spec.retry.max_attempts {
                WorkerMsg::DeadLetter(
                    m,
                    ProcessError::permanent(
                        "panic",
                        format!("crashed its worker {crashes} times: {reason}"),
                    ),
                )
            } else {
                WorkerMsg::Run(m, s.workers[id].attempt)
            };
            s.workers[id].actor.cast(msg)?;
        }
        Ok(())
    }
}

impl PartitionState {
    fn stats_restart(&self) {
        self.pipeline.stats.worker_restarts.fetch_add(1, Relaxed);
        self.stats.metrics.pipeline.worker_restarts.increment(1);
    }
}

async fn spawn_worker(
    me: &ActorRef<PartitionMsg>,
    s: &PartitionState,
    id: usize,
    progress: Arc<AtomicU32>,
) -> Result<ActorRef<WorkerMsg>, ActorProcessingErr> {
    let args = WorkerArgs {
        id,
        pipeline: s.pipeline.clone(),
        parent: me.clone(),
        progress,
        owner: s.owner.clone(),
    };
    let (actor, _) = Actor::spawn_linked(None, Worker, args, me.get_cell()).await?;
    Ok(actor)
}

/// (Re)sets the queue's non-empty callback: librdkafka calls it when the queue goes from empty
/// to non-empty; coalesced through `scheduled` so that the mailbox holds at most one pending
/// `Fetch`. Replacing a callback is safe: librdkafka swaps it under the queue's lock.
fn arm_wakeup(
    queue: &mut PartitionQueue,
    scheduled: &Arc<AtomicBool>,
    me: &ActorRef<PartitionMsg>,
) {
    let (f, m) = (scheduled.clone(), me.clone());
    queue.set_nonempty_callback(move || {
        if !f.swap(true, AcqRel) {
            let _ = m.cast(PartitionMsg::Fetch);
        }
    });
}

/// Takes messages off the partition queue while the budget has room.
async fn fetch(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
) -> Result<(), ActorProcessingErr> {
    if s.draining.is_some() || s.gate_held {
        return Ok(());
    }
    // Taken out for the loop: a polled message borrows the queue while `s` is mutated.
    let Some(queue) = s.queue.take() else {
        return Ok(());
    };
    let mut taken = 0;
    let mut result = Ok(());
    while s.flow.has_room() && !metadata_full(s) {
        if taken == FETCH_BATCH {
            let _ = me.cast(PartitionMsg::Fetch);
            break;
        }
        let m = match queue.poll(Duration::ZERO) {
            None => break,
            Some(Err(e)) => {
                warn!(topic = %s.topic, partition = s.partition, error = %e, "fetch error");
                continue;
            }
            Some(Ok(b)) => Message::from_borrowed(&b, &s.topic),
        };
        taken += 1;
        if let Err(e) = admit(me, s, m).await {
            result = Err(e);
            break;
        }
    }
    s.queue = Some(queue);
    if taken > 0 {
        tracing::trace!(topic = %s.topic, partition = s.partition, taken, in_flight = s.flow.count(), "fetched");
    }
    apply_flow(me, s);
    result
}

/// Exactly-once: the offsets received above the commit point are at
/// [`EXACTLY_ONCE_MAX_PENDING`], the most the commit metadata is sure to hold. Completions free
/// flow-control room but not this: one held-back message (a retry, a slow key) with completions
/// above it, split into runs by an upstream producer's transaction markers, would otherwise
/// outgrow the metadata, and a cut one's outputs would be written again after a crash. Taking
/// waits until the commit point moves (the lag and the stuck watchdog show it meanwhile).
fn metadata_full(s: &PartitionState) -> bool {
    s.pipeline.txn.is_some() && s.tracker.pending() >= EXACTLY_ONCE_MAX_PENDING
}

async fn admit(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    m: Message,
) -> Result<(), ActorProcessingErr> {
    if !s.tracker.received(m.offset) {
        debug!(topic = %s.topic, partition = s.partition, offset = m.offset, "already received; skipped");
        return Ok(());
    }
    if s.first_received.is_none() {
        s.first_received = Some(m.offset);
    }
    if s.skip.take(m.offset) {
        // Completed by the previous owner above its commit point: done, not run again.
        s.tracker.completed(m.offset);
        s.stats.metrics.pipeline.skipped.increment(1);
        count_completion(s);
        return Ok(());
    }
    s.flow.admit(m.size());
    // An atomic store only when the high water rises, not a read-modify-write per message.
    if s.flow.count() > s.high_water {
        s.high_water = s.flow.count();
        s.stats.in_flight_high_water.store(s.high_water, Relaxed);
    }
    if let Some(m) = s.scheduler.admit(Arc::new(m)) {
        start_or_park(me, s, m, 1).await?;
    }
    Ok(())
}

/// Starts `m` on an idle or new worker, or parks it until a worker is free (`max_workers`).
async fn start_or_park(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    m: Arc<Message>,
    attempt: u32,
) -> Result<(), ActorProcessingErr> {
    match acquire_worker(me, s).await? {
        Some(id) => start(s, id, m, attempt),
        None => {
            s.ready.push_back((m, attempt));
            Ok(())
        }
    }
}

/// An idle worker, or a new one while the pool is below `max_workers`.
async fn acquire_worker(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
) -> Result<Option<usize>, ActorProcessingErr> {
    if let Some(id) = s.idle.pop() {
        return Ok(Some(id));
    }
    if s.workers.len() >= s.spec.max_workers {
        return Ok(None);
    }
    let id = s.workers.len();
    let progress = Arc::new(AtomicU32::new(0));
    let actor = spawn_worker(me, s, id, progress.clone()).await?;
    s.workers.push(Slot {
        actor,
        running: None,
        attempt: 1,
        crashes: 0,
        started: Instant::now(),
        progress,
    });
    Ok(Some(id))
}

fn start(
    s: &mut PartitionState,
    id: usize,
    m: Arc<Message>,
    attempt: u32,
) -> Result<(), ActorProcessingErr> {
    let now = Instant::now();
    s.stats
        .metrics
        .pipeline
        .queue_wait
        .record(now.saturating_duration_since(m.received));
    let slot = &mut s.workers[id];
    slot.running = Some(m.clone());
    slot.attempt = attempt;
    slot.crashes = 0;
    slot.started = now;
    s.running += 1;
    slot.actor.cast(WorkerMsg::Run(m, attempt))?;
    Ok(())
}

async fn on_done(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    worker: usize,
    outcome: Outcome,
) -> Result<(), ActorProcessingErr> {
    let Some((m, started)) = s
        .workers
        .get_mut(worker)
        .and_then(|w| Some((w.running.take()?, w.started)))
    else {
        return Ok(());
    };
    let now = Instant::now();
    s.last_progress = now;
    s.last_completion = Some(now);
    s.stats
        .metrics
        .pipeline
        .process_duration
        .record(now.saturating_duration_since(started));
    s.running -= 1;
    if let Outcome::Retry { attempt, after } = outcome {
        // The key stays held (the scheduler is not told), the offset stays incomplete and the
        // budget stays taken; only the worker is freed, for other keys or a parked message.
        match s.ready.pop_front() {
            Some((next, a)) => start(s, worker, next, a)?,
            None => s.idle.push(worker),
        }
        if s.draining.is_some() {
            if s.running == 0 {
                finish_drain(me, s);
            }
            return Ok(());
        }
        s.retrying += 1;
        s.backoffs.push((m.clone(), attempt, now));
        me.send_after(after, move || PartitionMsg::Retry(m, attempt));
        return Ok(());
    }
    let pm = &s.stats.metrics.pipeline;
    if let Some(ts) = m.timestamp_ms.filter(|&t| t > 0) {
        pm.end_to_end.record((now_ms() - ts).max(0) as f64 / 1000.0);
    }
    match outcome {
        Outcome::Processed => &pm.processed,
        Outcome::Filtered => &pm.filtered,
        Outcome::Deduplicated => &pm.deduplicated,
        Outcome::DeadLettered | Outcome::Retry { .. } => &pm.dead_lettered,
    }
    .increment(1);
    s.tracker.completed(m.offset);
    s.flow.release(m.size());
    s.stats.processed.fetch_add(1, Relaxed);
    count_completion(s);
    // Dead letters are counted by the writer, once acknowledged.
    match outcome {
        Outcome::Processed => s.pipeline.stats.processed.fetch_add(1, Relaxed),
        // The in-process snapshot counts every processor drop (filter or dedup) as filtered.
        Outcome::Filtered | Outcome::Deduplicated => {
            s.pipeline.stats.filtered.fetch_add(1, Relaxed)
        }
        Outcome::DeadLettered | Outcome::Retry { .. } => 0,
    };
    if s.draining.is_some() {
        if s.running == 0 {
            finish_drain(me, s);
        }
        return Ok(());
    }
    // The next message of the same key starts on the worker that just finished; it then
    // hands over to the parked key, else to the oldest message waiting for a worker.
    match s.scheduler.complete(m.key.as_ref()) {
        Some(next) => {
            if s.ready.is_empty() {
                start(s, worker, next, 1)?;
            } else {
                s.ready.push_back((next, 1));
                let (oldest, attempt) = s.ready.pop_front().expect("not empty");
                start(s, worker, oldest, attempt)?;
            }
        }
        None => match s.ready.pop_front() {
            Some((next, attempt)) => start(s, worker, next, attempt)?,
            None => s.idle.push(worker),
        },
    }
    apply_flow(me, s);
    if s.flow.has_room() {
        fetch(me, s).await?;
    }
    Ok(())
}

/// Pauses or resumes the partition on the consumer when the budget says so.
fn apply_flow(me: &ActorRef<PartitionMsg>, s: &mut PartitionState) {
    let Some(signal) = s.flow.signal(Instant::now()) else {
        if let (Some(due), false) = (s.flow.pause_due(), s.flow_check_scheduled) {
            s.flow_check_scheduled = true;
            me.send_after(due.saturating_duration_since(Instant::now()), || {
                PartitionMsg::FlowCheck
            });
        }
        return;
    };
    s.stats.in_flight.store(s.flow.count(), Relaxed);
    debug!(topic = %s.topic, partition = s.partition, ?signal, in_flight = s.flow.count(), bytes = s.flow.bytes(), "flow control");
    sync_pause(s);
}

/// Pauses the partition on the consumer while flow control or the pipeline gate wants it
/// paused, and resumes it once neither does.
fn sync_pause(s: &mut PartitionState) {
    let want = s.flow.paused() || s.gate_held;
    if want == s.consumer_paused {
        return;
    }
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(&s.topic, s.partition);
    let r = if want {
        s.stats.pauses.fetch_add(1, Relaxed);
        s.stats.metrics.pauses.increment(1);
        s.consumer.pause(&tpl)
    } else {
        s.stats.resumes.fetch_add(1, Relaxed);
        s.consumer.resume(&tpl)
    };
    s.consumer_paused = want;
    s.stats.paused.store(want, Relaxed);
    s.stats.metrics.paused.set(if want { 1.0 } else { 0.0 });
    if let Err(e) = r {
        warn!(topic = %s.topic, partition = s.partition, paused = want, error = %e, "pause/resume failed");
    }
}

/// A supervisor starts with the partition resumed, and makes it so on the consumer (STYLE 15).
/// librdkafka keeps the application's pause flag across a revoke and a later reassignment (it
/// clears only its own flag): a partition paused by an earlier supervisor of this process and
/// given back to it would otherwise never be fetched again. Runs once per assignment, not per
/// message.
fn resume_on_start(consumer: &Consumer, topic: &str, partition: i32) {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(topic, partition);
    if let Err(e) = consumer.resume(&tpl) {
        warn!(topic, partition, error = %e, "resume on start failed");
    }
}

/// One more offset completed: commit now once `commit_every` completed since the last commit
/// (an integer compare per message; the commit itself every `commit_every` messages).
fn count_completion(s: &mut PartitionState) {
    s.uncommitted += 1;
    if s.uncommitted >= s.spec.commit_every {
        commit_progress(s);
    }
}

/// Hands the commit point, with the offsets completed above it, to the pipeline's committer if
/// anything completed since the last time (the committer sends one commit for all partitions at
/// a time and the client context records the broker's answer). A draining partition hands
/// nothing more: its final commit is synchronous, through the coordinator.
fn commit_progress(s: &mut PartitionState) {
    if let Some(t) = &s.pipeline.txn {
        // Exactly-once: the pipeline's transaction asks for the point when it commits.
        if s.uncommitted >= s.spec.commit_every {
            t.request_commit();
            s.uncommitted = 0;
        }
        return;
    }
    let Some(next) = s.tracker.committable() else {
        return;
    };
    if s.draining.is_some() || (s.commit_sent == Some(next) && s.uncommitted == 0) {
        return;
    }
    let metadata = commit_metadata(s);
    debug!(topic = %s.topic, partition = s.partition, next, completed = s.uncommitted, metadata_bytes = metadata.as_ref().map_or(0, String::len), "commit point handed to the committer");
    let point = Point { next, metadata };
    s.consumer
        .context()
        .committer
        .submit(&s.consumer, s.partition, point);
    s.commit_sent = Some(next);
    s.uncommitted = 0;
}

/// The completed-offsets metadata for the current commit point, measured.
fn commit_metadata(s: &PartitionState) -> Option<String> {
    let pm = &s.stats.metrics.pipeline;
    let Some(m) = s.tracker.metadata() else {
        pm.commit_metadata_bytes.record(0.0);
        return None;
    };
    pm.commit_metadata_bytes.record(m.text.len() as f64);
    if m.truncated {
        pm.commit_metadata_truncated.increment(1);
        if s.pipeline.txn.is_some() {
            // Under exactly-once the cut offsets' outputs are committed with this transaction:
            // a crash before the next commit would write them again.
            error!(topic = %s.topic, partition = s.partition, pending = s.tracker.pending(), "exactly-once: completed offsets cut to fit the commit metadata cap; a crash before the next commit would duplicate their outputs");
        }
        debug!(topic = %s.topic, partition = s.partition, pending = s.tracker.pending(), "completed offsets cut to fit the commit metadata cap");
    }
    Some(m.text)
}

fn finish_drain(me: &ActorRef<PartitionMsg>, s: &mut PartitionState) {
    if s.draining.is_none() {
        return;
    }
    // Exactly-once: nothing running here may write any more; writes already under way finish
    // first, so that the final point covers them (their completions arrive meanwhile).
    if s.owner.close() > 0 {
        me.send_after(Duration::from_millis(2), || PartitionMsg::DrainDeadline);
        return;
    }
    let Some(reply) = s.draining.take() else {
        return;
    };
    let abandoned: Vec<Abandoned> = s
        .workers
        .iter()
        .filter_map(|w| w.running.as_ref())
        .map(|m| Abandoned {
            offset: m.offset,
            key: m
                .key
                .as_deref()
                .map(|k| String::from_utf8_lossy(&k[..k.len().min(64)]).into_owned()),
            running_for: m.received.elapsed(),
        })
        .collect();
    for a in &abandoned {
        warn!(topic = %s.topic, partition = s.partition, offset = a.offset, key = ?a.key, running_for = ?a.running_for, "still running at the drain deadline; abandoned (will be redelivered)");
    }
    let next_offset = s.tracker.committable();
    let metadata = next_offset.and_then(|_| commit_metadata(s));
    let _ = reply.send(DrainReport {
        topic: s.topic.clone(),
        partition: s.partition,
        next_offset,
        metadata,
        abandoned,
    });
    me.stop(None);
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The oldest incomplete message: the lowest offset among those running, waiting out a retry
/// backoff, or ready and waiting for a worker. A message parked behind its key always sits
/// behind one of those with a lower offset, so it is never the oldest. Called per tick and per
/// `/debug` request, not per message.
fn oldest_incomplete(s: &PartitionState) -> Option<&Arc<Message>> {
    s.workers
        .iter()
        .filter_map(|w| w.running.as_ref())
        .chain(s.backoffs.iter().map(|(m, _, _)| m))
        .chain(s.ready.iter().map(|(m, _)| m))
        .min_by_key(|m| m.offset)
}

/// How often at most the broker is asked for a partition's end (one request in flight at most).
const BROKER_END_EVERY: Duration = Duration::from_secs(5);
/// librdkafka's cached watermark is stale once unchanged for this many commit intervals while
/// nothing is in flight: a paused or silently non-fetching partition keeps the value of its last
/// fetch response for ever.
const STALE_TICKS: u32 = 3;

/// What the broker says about a partition, asked off the actor's thread (`fetch_watermarks`
/// and `committed_offsets` block on a round trip) when librdkafka's cached high watermark cannot
/// be trusted: never fetched since the assignment (unknown), or unchanged for
/// [`STALE_TICKS`] commit intervals with nothing in flight (a partition that stopped fetching
/// looks exactly like an idle one from the cache). Without it such a partition read lag 0, and
/// neither the watchdog nor readiness saw it.
#[derive(Default)]
struct BrokerEnd {
    answer: Arc<BrokerAnswer>,
    /// When the last request was sent.
    asked: Option<Instant>,
    /// The cached watermark as of the last tick, and since when it has had that value.
    cached: Option<(i64, Instant)>,
}

struct BrokerAnswer {
    in_flight: AtomicBool,
    /// The partition's high watermark on the broker (-1: not known yet).
    high: AtomicI64,
    /// Where the group resumes a partition it has received nothing of: the committed offset, or
    /// per `auto_offset_reset` (-1: not known yet).
    start: AtomicI64,
}

impl Default for BrokerAnswer {
    fn default() -> Self {
        BrokerAnswer {
            in_flight: AtomicBool::new(false),
            high: AtomicI64::new(-1),
            start: AtomicI64::new(-1),
        }
    }
}

/// Clears `in_flight` however the request ends (done, panicked, or never run).
struct InFlight(Arc<BrokerAnswer>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.store(false, Release);
    }
}

impl BrokerEnd {
    /// Sends one request on the blocking pool unless one is in flight or the last was sent less
    /// than [`BROKER_END_EVERY`] ago. Called from a tick, never per message.
    fn ask(
        &mut self,
        consumer: &Arc<Consumer>,
        topic: &Arc<str>,
        partition: i32,
        reset: crate::config::OffsetReset,
        want_start: bool,
    ) {
        let now = Instant::now();
        if self
            .asked
            .is_some_and(|t| now.duration_since(t) < BROKER_END_EVERY)
            || self.answer.in_flight.swap(true, AcqRel)
        {
            return;
        }
        self.asked = Some(now);
        let guard = InFlight(self.answer.clone());
        let (consumer, topic) = (consumer.clone(), topic.clone());
        // Detached: the answer lands in `self.answer`, read by a later tick.
        drop(tokio::task::spawn_blocking(move || {
            let answer = &guard.0;
            let Ok((low, high)) = consumer.fetch_watermarks(&topic, partition, BROKER_END_EVERY)
            else {
                return;
            };
            answer.high.store(high, Relaxed);
            if want_start {
                let mut tpl = TopicPartitionList::with_capacity(1);
                tpl.add_partition(&topic, partition);
                let committed = consumer
                    .committed_offsets(tpl, BROKER_END_EVERY)
                    .ok()
                    .and_then(|t| t.find_partition(&topic, partition)?.offset().to_raw())
                    .filter(|o| *o >= 0);
                let start = committed.unwrap_or(match reset {
                    crate::config::OffsetReset::Earliest => low,
                    crate::config::OffsetReset::Latest => high,
                });
                answer.start.store(start, Relaxed);
            }
        }));
    }

    fn high(&self) -> Option<i64> {
        Some(self.answer.high.load(Relaxed)).filter(|h| *h >= 0)
    }

    fn start(&self) -> Option<i64> {
        Some(self.answer.start.load(Relaxed)).filter(|o| *o >= 0)
    }
}

/// Every tick: lag in messages and seconds, gauges, and the stuck-partition watchdog.
fn observe(s: &mut PartitionState) {
    let committed = s.stats.committed.load(Relaxed);
    let next = s
        .tracker
        .committable()
        .or((committed >= 0).then_some(committed));
    let now = Instant::now();
    // librdkafka's cached high watermark (from fetch responses): no broker round trip. When it
    // is unknown or stale, the broker is asked off this thread (see `BrokerEnd`).
    let cached = crate::kafka::client::cached_high_watermark(&s.consumer, &s.topic, s.partition);
    s.broker_end.cached = match (cached, s.broker_end.cached) {
        (Some(h), Some((was, since))) if h == was => Some((h, since)),
        (Some(h), _) => Some((h, now)),
        (None, _) => None,
    };
    let stale_after = s.spec.commit_interval * STALE_TICKS;
    let stale = match s.broker_end.cached {
        None => true,
        Some((_, since)) => s.flow.count() == 0 && now.duration_since(since) >= stale_after,
    };
    if stale || next.is_none() {
        s.broker_end.ask(
            &s.consumer,
            &s.topic,
            s.partition,
            s.spec.auto_offset_reset,
            next.is_none(),
        );
    }
    let high = cached.max(s.broker_end.high());
    let lag = match (high, next.or_else(|| s.broker_end.start())) {
        (Some(high), Some(n)) => (high - n).max(0),
        _ => 0,
    };
    let m = &s.stats.metrics;
    let oldest = oldest_incomplete(s);
    let oldest_received = oldest.map(|o| o.received);
    let lag_seconds = oldest.map_or(0.0, |o| match o.timestamp_ms {
        Some(ts) if ts > 0 => (now_ms() - ts).max(0) as f64 / 1000.0,
        _ => o.received.elapsed().as_secs_f64(),
    });
    let pending = lag > 0 || s.flow.count() > 0;
    if !pending {
        s.last_progress = now;
    }
    // Work became pending at the last idle tick at the earliest, but no earlier than the oldest
    // incomplete message arrived: a message is never called stuck before it has waited
    // `stuck_after` itself (ticks are `commit_interval` apart).
    let waiting_since = oldest_received.map_or(s.last_progress, |r| r.max(s.last_progress));
    let stuck = pending && now.duration_since(waiting_since) > crate::metrics::stuck_after();
    if stuck && !s.stats.stuck.load(Relaxed) {
        warn!(topic = %s.topic, partition = s.partition, lag, in_flight = s.flow.count(), since_progress = ?now.duration_since(waiting_since), "partition stuck: nothing completed");
    }
    s.stats.stuck.store(stuck, Relaxed);
    s.stats.lag.store(lag, Relaxed);
    m.lag_messages.set(lag as f64);
    m.lag_seconds.set(lag_seconds);
    m.in_flight.set(s.flow.count() as f64);
    m.buffered_bytes.set(s.flow.bytes() as f64);
    m.stuck.set(if stuck { 1.0 } else { 0.0 });
}

/// `/debug/partitions` for this partition.
fn inspect(s: &PartitionState) -> PartitionDebug {
    let now = Instant::now();
    let running_key = |key: &bytes::Bytes| {
        s.workers
            .iter()
            .filter_map(|w| w.running.as_ref().map(|m| (m, w)))
            .find(|(m, _)| m.key.as_ref() == Some(key))
    };
    let waiting_keys = s
        .scheduler
        .waiting_keys()
        .map(|(k, waiting)| {
            let blocker = running_key(k);
            let backoff = s.backoffs.iter().find(|(m, _, _)| m.key.as_ref() == Some(k));
            let running_seconds = blocker
                .map(|(_, w)| now.duration_since(w.started).as_secs_f64())
                .or(backoff.map(|(_, _, since)| now.duration_since(*since).as_secs_f64()));
            let reason = match blocker {
                None => match backoff {
                    Some((m, attempt, since)) => format!(
                        "retry backoff: offset {} failed, attempt {attempt} waits ({:.1}s so far)",
                        m.offset,
                        now.duration_since(*since).as_secs_f64()
                    ),
                    None => "behind the running message of the key".to_string(),
                },
                Some((m, w)) => {
                    let p = w.progress.load(Relaxed);
                    let (attempt, backing_off) = (p & !BACKING_OFF, p & BACKING_OFF != 0);
                    let r = running_seconds.unwrap_or_default();
                    if backing_off {
                        format!("retry backoff: offset {} failed, attempt {attempt} waits (running {r:.1}s)", m.offset)
                    } else if attempt > 1 {
                        format!("retrying: offset {} on attempt {attempt} (running {r:.1}s)", m.offset)
                    } else {
                        format!("slow processor: offset {} running {r:.1}s", m.offset)
                    }
                }
            };
            WaitingKey {
                key: show_key(k),
                waiting,
                reason,
                blocked_by_offset: blocker
                    .map(|(m, _)| m.offset)
                    .or(backoff.map(|(m, _, _)| m.offset)),
                running_seconds,
            }
        })
        .collect();
    PartitionDebug {
        partition: s.partition,
        in_flight: s.flow.count(),
        running: s.running,
        buffered_bytes: s.flow.bytes(),
        paused: s.stats.paused.load(Relaxed),
        stuck: s.stats.stuck.load(Relaxed),
        lag_messages: s.stats.lag.load(Relaxed),
        commit_point: s.tracker.committable(),
        oldest_in_flight: oldest_incomplete(s).map(|m| InFlightDebug {
            offset: m.offset,
            key: m.key.as_deref().map(show_key),
            age_seconds: m.received.elapsed().as_secs_f64(),
        }),
        since_last_completion_seconds: s
            .last_completion
            .map(|t| now.duration_since(t).as_secs_f64()),
        waiting_keys,
        error: None,
    }
}
