//! The per-message path of a partition, top to bottom: fetch (read messages off the partition
//! queue in batches while flow control has room) → admit (record the offset, skip what a
//! previous owner completed, hand the message to the key scheduler) → start (on an idle or new
//! worker, or park it until one is free; the supervisor polls the attempt once itself, inline,
//! and only an attempt that awaits moves to the worker) → complete (inline, or the workers'
//! completions, in batches through the `Inbox`: the offset completes, the budget is freed, the
//! key's next message starts on the same worker) → commit (the commit point and the offsets
//! completed above it, every `commit_every` completions or `commit_interval`). Flow control
//! pauses the partition on the consumer when it stays congested.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;
use tracing::{debug, error, warn};

use super::{
    drain, turn, Completion, InlineDone, PartitionMsg, PartitionQueue, PartitionState, Slot,
    WORKER_IDLE_STOP,
};
use crate::actors::worker::{self, Worker, WorkerArgs, WorkerMsg};
use crate::config::EXACTLY_ONCE_MAX_PENDING;
use crate::kafka::committer::Point;
use crate::kafka::queue::READ_MAX;
use crate::kafka::Consumer;
use crate::memory::{PipelineMemory, Turn, WORKER_COST};
use crate::message::Message;
use crate::pipeline::Outcome;
use crate::processors::ProcessError;

/// Messages taken off the queue per `Fetch` before yielding to the mailbox, so completions
/// interleave with fetching.
const FETCH_BATCH: usize = 512;

/// (Re)sets the queue's non-empty callback: librdkafka calls it when the queue goes from empty
/// to non-empty; coalesced through `scheduled` so that the mailbox holds at most one pending
/// `Fetch`. Replacing a callback is safe: librdkafka swaps it under the queue's lock.
pub(super) fn arm_wakeup(
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
pub(super) async fn fetch(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
) -> Result<(), ActorProcessingErr> {
    if s.draining.is_some() || s.gate_held || s.released() {
        s.fetch_left = true;
        return Ok(());
    }
    // This partition's share of the pipeline's buffer budget, re-split when the assignment
    // changes, as far as the other partitions have given it back (see `memory::Grant`): read
    // once per fetch, not per message. Its workers' cost comes out of it first.
    let budget = s.grant.budget(s.pipeline.memory.partition_cap());
    let cap = PipelineMemory::message_cap(budget, s.live_workers);
    s.flow.set_max_bytes(cap, s.spec.resume_at);
    let Some(mut reader) = s.reader.take() else {
        return Ok(());
    };
    let mut read = std::mem::take(&mut s.read);
    s.tick_clock();
    s.overflow.retry();
    let mut taken = 0;
    let mut result = Ok(());
    // Whether messages may be left in the queue when the loop stops: not when it stops on an
    // empty queue (librdkafka's wake-up sends `Fetch` when one arrives) nor at `FETCH_BATCH`
    // (a `Fetch` is queued), so that a completion polls the queue only when the bound, not
    // the queue, stopped the last fetch.
    let mut left = true;
    let mut first = true;
    'fetch: while !metadata_full(s) && !overflow_full(s, budget) {
        if taken >= FETCH_BATCH {
            let _ = me.cast(PartitionMsg::Fetch);
            left = false;
            break;
        }
        let want = read_size(s);
        // Given up while this handler ran (an inline attempt blocked it): the queue may be its
        // next supervisor's already.
        if want == 0 || s.released() {
            break;
        }
        // `clock` moves on with each inline attempt (see `start`): the batch is received now.
        let (topic, partition, clock) = (s.topic.clone(), s.partition, s.clock);
        let got = reader.read(want, &topic, clock, |m| match m {
            Ok(m) => read.push(m),
            Err(e) => warn!(%topic, partition, error = %e, "fetch error"),
        });
        let (mut largest, mut bytes) = (0, 0);
        for m in &read {
            let size = m.size() as u64;
            largest = largest.max(size);
            bytes += size;
        }
        if largest > 0 {
            s.read_size_hint = largest;
        }
        if first && !read.is_empty() {
            // The queue's length (its lock) only when the read took something.
            first = false;
            turn::observe(s, read.len(), bytes, reader.queued());
        }
        taken += read.len();
        for m in read.drain(..) {
            if let Err(e) = admit(me, s, m).await {
                result = Err(e);
                break 'fetch;
            }
        }
        if reader.holds_error() {
            // The read ended on a fetch error: the partition pauses below, which makes what
            // follows it in the queue outdated. Nothing more is read in this handler.
            break;
        }
        if got < want {
            left = false;
            break;
        }
    }
    read.clear();
    s.read = read;
    let error = reader.holds_error();
    s.reader = Some(reader);
    s.fetch_left = left;
    if error {
        // Paused in this handler: the position the error moved is put back before anything
        // else (a rebalance) can pause the partition and restart its fetch there. An error
        // read while already paused (an item that was in the queue before the pause took
        // effect) moved the position again: it is put back again (`sync_pause` does, on a
        // paused partition) and the backoff starts over; the earlier timer ends nothing.
        s.error_paused = true;
        s.error_pauses += 1;
        let generation = s.error_pauses;
        me.send_after(ERROR_PAUSE, move || PartitionMsg::ErrorResume(generation));
        warn!(topic = %s.topic, partition = s.partition, pause = ?ERROR_PAUSE, "fetch error: the partition pauses and fetches again from the message after the last one received");
        sync_pause(s);
    }
    if taken > 0 {
        if s.turn_received.is_none() && s.turn_since.is_some() {
            // A turn's time counts from its first batch, not from the grant: the fetch after
            // the resume may wait for the one before it (a long poll of partitions caught up).
            s.turn_since = Some(s.clock);
        }
        s.turn_received = Some(s.clock);
        tracing::trace!(topic = %s.topic, partition = s.partition, taken, in_flight = s.flow.count(), "fetched");
    }
    apply_flow(me, s);
    if s.turn_state != Turn::Free {
        turn::decide(me, s);
    }
    result
}

/// How many messages the next read may take: the room left under the partition's bounds, in
/// messages and in bytes at the size of the last read's largest message (at least one while
/// there is room), and under exactly-once the room left in the commit metadata. A read of
/// larger messages than the last one may pass the byte bound by that read: messages
/// librdkafka already held (counted as prefetch), moved into the partition's buffer.
fn read_size(s: &PartitionState) -> usize {
    let mut n = s.flow.room(s.read_size_hint).min(READ_MAX);
    if s.pipeline.txn.is_some() {
        n = n.min(EXACTLY_ONCE_MAX_PENDING.saturating_sub(s.tracker.pending()));
    }
    n
}

/// How long a partition stays paused after a fetch error (librdkafka's `fetch.error.backoff.ms`
/// default); `PartitionMsg::ErrorResume`, sent when the pause begins, ends it.
pub(super) const ERROR_PAUSE: Duration = Duration::from_millis(500);

/// The first read's size hint, before any message of the partition was seen.
pub(super) const READ_SIZE_HINT: u64 = 4096;

/// Exactly-once: the offsets received above the commit point are at
/// [`EXACTLY_ONCE_MAX_PENDING`], the most the commit metadata is sure to hold. Completions free
/// flow-control room but not this: one held-back message (a retry, a slow key) with completions
/// above it, split into runs by an upstream producer's transaction markers, would otherwise
/// outgrow the metadata, and a cut one's outputs would be written again after a crash. Taking
/// waits until the commit point moves (the lag and the stuck watchdog show it meanwhile).
fn metadata_full(s: &PartitionState) -> bool {
    s.pipeline.txn.is_some() && s.tracker.pending() >= EXACTLY_ONCE_MAX_PENDING
}

/// A hot key is far behind: the offsets received above the commit point (the tracker's
/// entries) and the overflow file's index take half the partition's share, or the overflow
/// file cannot be written. The partition takes no more messages until the key catches up (the
/// backlog waits in Kafka, as it did before the overflow). One compare per fetched message.
fn overflow_full(s: &PartitionState, budget: u64) -> bool {
    !s.overflow.is_empty()
        && (s.overflow.failing()
            || s.tracker.pending() as u64 * OFFSET_COST + s.overflow.memory() > budget / 2)
}

/// What an offset received above the commit point costs the tracker.
const OFFSET_COST: u64 = 16;

pub(super) async fn admit(
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
    let size = m.size();
    let m = Arc::new(m);
    let admitted = if s.batch.is_some() {
        s.scheduler.admit(m)
    } else {
        // A key over its share (or with messages in the overflow file already) waits in the
        // file, not in memory: see `overflow`.
        let m = match m.key.as_ref() {
            Some(k) if s.overflow.holds(k) => Err(m),
            _ => s.scheduler.admit_within(m, s.key_share),
        };
        match m {
            Ok(m) => m,
            Err(m) => match s.overflow.push(&m) {
                Ok(()) => {
                    s.stats.metrics.pipeline.overflowed.increment(1);
                    return Ok(());
                }
                Err(e) => {
                    // Kept in memory (over the key's share) rather than lost.
                    warn!(topic = %s.topic, partition = s.partition, error = %e, "hot key overflow file not written; the message waits in memory");
                    s.scheduler.admit(m)
                }
            },
        }
    };
    s.flow.admit(size);
    // An atomic store only when the high water rises, not a read-modify-write per message.
    if s.flow.count() > s.high_water {
        s.high_water = s.flow.count();
        s.stats.in_flight_high_water.store(s.high_water, Relaxed);
    }
    if let Some(m) = admitted {
        if s.batch.is_some() {
            super::batch::offer(me, s, m).await?;
        } else {
            start_or_park(me, s, m, 1).await?;
            settle(me, s).await?;
        }
    }
    Ok(())
}

/// Starts `m` on an idle or new worker, or parks it until a worker is free (`max_workers`).
pub(super) async fn start_or_park(
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

/// An idle worker, or a new one (in a slot freed by [`shrink_pool`] first) while the pool is
/// below its cap.
pub(super) async fn acquire_worker(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
) -> Result<Option<usize>, ActorProcessingErr> {
    if let Some(id) = s.idle.pop() {
        return Ok(Some(id));
    }
    if s.live_workers >= worker_cap(s) {
        return Ok(None);
    }
    // A new worker's cost must fit beside the messages already held (the byte bound was set for
    // the pool as it was when the fetch began); the first one always may.
    let budget = s.grant.bytes().min(s.pipeline.memory.partition_cap());
    if s.live_workers > 0 && s.flow.bytes() + (s.live_workers as u64 + 1) * WORKER_COST > budget {
        return Ok(None);
    }
    let id = match s.free.pop() {
        Some(id) => {
            let actor = spawn_worker(me, s, id, s.workers[id].progress.clone()).await?;
            s.workers[id].actor = Some(actor);
            id
        }
        None => {
            let id = s.workers.len();
            let progress = Arc::new(AtomicU32::new(0));
            let actor = spawn_worker(me, s, id, progress.clone()).await?;
            let now = Instant::now();
            s.workers.push(Slot {
                actor: Some(actor),
                running: None,
                attempt: 1,
                crashes: 0,
                started: now,
                progress,
                idle_since: now,
            });
            id
        }
    };
    s.live_workers += 1;
    // The bound for messages shrinks by the new worker's cost at once (review P1: a catch-up
    // after the pool had emptied admitted a whole share of messages, then spawned its workers
    // on top).
    s.flow.set_max_bytes(
        PipelineMemory::message_cap(budget, s.live_workers),
        s.spec.resume_at,
    );
    Ok(Some(id))
}

/// The pool's cap: `max_workers`, within half the partition's memory share (see
/// `memory::WORKER_COST`). Re-read as the share is re-split on assignment changes.
fn worker_cap(s: &PartitionState) -> usize {
    let cap = s.pipeline.memory.partition_cap().min(s.grant.bytes());
    PipelineMemory::worker_cap(cap, s.spec.max_workers)
}

/// A worker that finished and has nothing to start: idle from `now` (the completion's time,
/// already read: no clock read per message).
pub(super) fn park_idle(s: &mut PartitionState, id: usize, now: Instant) {
    s.workers[id].idle_since = now;
    s.idle.push(id);
}

/// On a tick: stops the idle workers above the pool's cap (it fell when the assignment grew)
/// and those idle for longer than [`WORKER_IDLE_STOP`], frees their slots, then drops the free
/// slots at the end of `workers`, so the pool falls back after a burst. Only idle workers are
/// stopped: an idle worker has reported its last message and has none queued (the supervisor
/// sends `Run` only to a worker it takes off `idle`), so no completion of it can arrive later, and
/// its exit is not a crash (a stop is `ActorTerminated`, not `ActorFailed`). A slot reused later
/// gets a new actor, whose cell id the crash handler matches. O(pool) per tick.
pub(super) fn shrink_pool(s: &mut PartitionState, now: Instant) {
    let mut over = s.live_workers.saturating_sub(worker_cap(s));
    let (workers, free, live) = (&mut s.workers, &mut s.free, &mut s.live_workers);
    // The bottom of `idle` has idled longest: stop from there.
    s.idle.retain(|&id| {
        let w = &mut workers[id];
        if over == 0 && now.saturating_duration_since(w.idle_since) < WORKER_IDLE_STOP {
            return true;
        }
        over = over.saturating_sub(1);
        if let Some(actor) = w.actor.take() {
            actor.stop(Some("idle".into()));
            *live -= 1;
        }
        free.push(id);
        false
    });
    let before = s.workers.len();
    while s.workers.last().is_some_and(|w| w.actor.is_none()) {
        s.workers.pop();
    }
    if s.workers.len() < before {
        let len = s.workers.len();
        s.free.retain(|&id| id < len);
    }
    if s.workers.is_empty() {
        // Give the vectors' high-water back too (a few KiB at `max_workers` slots).
        s.workers.shrink_to_fit();
        s.idle.shrink_to_fit();
        s.free.shrink_to_fit();
    }
}

pub(super) async fn spawn_worker(
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
        inbox: s.inbox.clone(),
    };
    let (actor, _) = Actor::spawn_linked(None, Worker, args, me.get_cell()).await?;
    Ok(actor)
}

/// When attempts start inline ([`start`]), and when they go to the workers instead:
/// - `inline = false` in the pipeline: never inline.
/// - Each handler may run attempts inline for [`INLINE_SLICE`] after it began (one fetch, one
///   completion and what it starts): the attempts it starts later go to the workers, so that a
///   hot key's backlog draining message after message does not keep the supervisor from its
///   mailbox (completions, ticks, drains, `/debug`).
/// - A processor heavy on CPU: when [`INLINE_SLOW_OF`] of the last 32 first polls took longer
///   than [`INLINE_MAX`], attempts go to the workers (spread over the runtime's threads) for
///   [`INLINE_PAUSE`]. A window, not one poll: a thread preempted by the OS in the middle of a
///   cheap poll (milliseconds on a busy machine) is not a slow processor.
/// - A processor that blocks its thread: one first poll over [`INLINE_BLOCKED`] turns inline off
///   for the life of this supervisor, with a warning (the poll held the whole partition).
pub(super) const INLINE_SLICE: Duration = Duration::from_millis(10);
const INLINE_MAX: Duration = Duration::from_micros(200);
const INLINE_SLOW_OF: u32 = 8;
const INLINE_PAUSE: Duration = Duration::from_secs(5);
const INLINE_BLOCKED: Duration = Duration::from_millis(50);

/// Starts attempt `attempt` of `m` on worker `id`. The supervisor polls the attempt once itself
/// (inline): a processor that does not await finishes there, with no hand-off to the worker and
/// back (two mailbox hops and two task wake-ups per message), and its completion is queued for
/// [`settle`]. An attempt that awaits moves, as it is, to the worker (`Resume`), which finishes
/// it. Either way the slot is the worker's while the message runs, so `/debug`, the watchdog,
/// the drain and crash handling see one model. A panic in the inline poll counts as a crash of
/// the worker: the message runs again on it (see [`rerun_after_crash`]).
fn start(
    s: &mut PartitionState,
    id: usize,
    m: Arc<Message>,
    attempt: u32,
) -> Result<(), ActorProcessingErr> {
    // The partition's clock, read when the handler began and after each inline attempt: one
    // clock read per message, not three.
    let now = s.clock;
    s.stats
        .metrics
        .pipeline
        .queue_wait
        .record(now.saturating_duration_since(m.received));
    let slot = &mut s.workers[id];
    // Only slots taken off `idle` or just spawned are started, and both have an actor.
    let Some(actor) = slot.actor.as_ref() else {
        return Err(format!("worker slot {id} has no actor").into());
    };
    let inline =
        s.spec.inline && now < s.inline_slice_end && s.inline_off_until.is_none_or(|t| now >= t);
    if !inline {
        actor.cast(WorkerMsg::Run(m.clone(), attempt))?;
    }
    slot.running = Some(m.clone());
    slot.attempt = attempt;
    slot.crashes = 0;
    slot.started = now;
    s.running += 1;
    if inline {
        poll_inline(s, id, m, attempt, now)?;
    }
    Ok(())
}

/// [`start`]'s first poll on the supervisor: queue the completion, hand the attempt to worker
/// `id`, or count its panic as the worker's crash.
fn poll_inline(
    s: &mut PartitionState,
    id: usize,
    m: Arc<Message>,
    attempt: u32,
    now: Instant,
) -> Result<(), ActorProcessingErr> {
    let spare = s.spare_jobs.pop();
    let mut job = worker::job(spare, s.pipeline.clone(), m, attempt, s.owner.clone());
    let polled = catch_unwind(AssertUnwindSafe(|| {
        job.poll(&mut Context::from_waker(Waker::noop()))
    }));
    let end = Instant::now();
    s.clock = end;
    let took = end.saturating_duration_since(now);
    s.inline_slow = (s.inline_slow << 1) | u32::from(took > INLINE_MAX);
    if took > INLINE_BLOCKED {
        s.inline_off_until = Some(end + Duration::from_secs(365 * 24 * 3600));
        warn!(topic = %s.topic, partition = s.partition, offset = s.workers[id].running.as_ref().map(|m| m.offset), ?took, "a processor blocked the partition's supervisor in its first poll: every message of this partition runs on a worker from now on (set `inline = false` for processors that block their thread)");
    } else if s.inline_slow.count_ones() >= INLINE_SLOW_OF {
        s.inline_slow = 0;
        s.inline_off_until = Some(end + INLINE_PAUSE);
        debug!(topic = %s.topic, partition = s.partition, ?took, "first polls are slow: messages run on workers for a while");
    }
    match polled {
        Ok(Poll::Ready((outcome, guard))) => {
            s.spare_jobs.push(job);
            s.inline_done.push_back(InlineDone {
                worker: id,
                outcome,
                guard,
                at: end,
            })
        }
        // The waker of the first poll was a no-op: the worker polls it again at once, with its
        // own (a future must wake the waker of its latest poll).
        Ok(Poll::Pending) => match s.workers[id].actor.as_ref() {
            Some(actor) => actor.cast(WorkerMsg::Resume(job))?,
            None => return Err(format!("worker slot {id} has no actor").into()),
        },
        Err(panic) => {
            drop(job);
            let reason = crate::batch::panic_text(&*panic);
            rerun_after_crash(s, id, &format!("panicked: {reason}"))?;
        }
    }
    Ok(())
}

/// A crash of worker `id` (its actor died, or its message panicked in the inline poll): counted
/// against the restart budget (spent: the partition fails), then the message runs again on the
/// worker, or is dead-lettered once it has crashed `max_attempts` times. The worker's actor
/// must be alive (respawned after an actor crash).
pub(super) fn rerun_after_crash(
    s: &mut PartitionState,
    id: usize,
    reason: &str,
) -> Result<(), ActorProcessingErr> {
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
    let slot = &mut s.workers[id];
    let offset = slot.running.as_ref().map(|m| m.offset);
    error!(topic = %s.topic, partition = s.partition, worker = id, ?offset, %reason, restarts = s.restarts.len(), "worker crashed (or its message panicked in its first poll); running the message again on it");
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
    let Some(actor) = slot.actor.clone() else {
        return Err(format!("worker slot {id} has no actor").into());
    };
    if let Some(b) = s.batch.as_ref().and_then(|b| b.running(id)) {
        actor.cast(WorkerMsg::RunBatch(b))?;
    }
    if let Some(m) = slot.running.clone() {
        slot.crashes += 1;
        let crashes = slot.crashes;
        let msg = if crashes >= s.spec.retry.max_attempts {
            WorkerMsg::DeadLetter(
                m,
                ProcessError::permanent(
                    "panic",
                    format!("crashed its worker {crashes} times: {reason}"),
                ),
            )
        } else {
            WorkerMsg::Run(m, slot.attempt)
        };
        actor.cast(msg)?;
    }
    Ok(())
}

/// Completes what finished inline ([`start`]), oldest first. A completion may start the key's
/// next message, inline too: this loop, not recursion, finishes it. Called after every start,
/// so a slot is the worker's only while its message runs, and before the handler returns.
pub(super) async fn settle(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
) -> Result<(), ActorProcessingErr> {
    while let Some(d) = s.inline_done.pop_front() {
        complete(me, s, d.worker, d.outcome, d.at).await?;
        // Exactly-once: the completion is recorded before the transaction may commit.
        drop(d.guard);
    }
    Ok(())
}

/// Workers reported their messages (one `Done`, or the inbox's batch): complete them in the
/// order they finished, then what finished inline behind them, then take more messages if that
/// freed room. One handler for a batch: one clock read, one settle and one fetch for all of it.
pub(super) async fn on_done(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    done: impl IntoIterator<Item = Completion>,
) -> Result<(), ActorProcessingErr> {
    let now = s.tick_clock();
    for d in done {
        s.spare_jobs.extend(d.job);
        complete(me, s, d.worker, d.outcome, now).await?;
    }
    settle_and_fetch(me, s).await
}

/// After a start or a completion outside the fetch loop: settle what finished inline, then
/// pause or resume, and take more messages if there is room.
pub(super) async fn settle_and_fetch(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
) -> Result<(), ActorProcessingErr> {
    settle(me, s).await?;
    if s.draining.is_some() {
        return Ok(());
    }
    apply_flow(me, s);
    if s.turn_state == Turn::Idle && s.flow.has_room() {
        turn::decide(me, s);
    }
    if s.flow.has_room() && s.fetch_left {
        fetch(me, s).await?;
    }
    Ok(())
}

/// Worker `worker`'s message finished at `now` with `outcome`: its offset completes (or its
/// retry is scheduled), and the worker takes the key's next message, a parked one, or idles.
async fn complete(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    worker: usize,
    outcome: Outcome,
    now: Instant,
) -> Result<(), ActorProcessingErr> {
    let Some((m, started)) = s
        .workers
        .get_mut(worker)
        .and_then(|w| Some((w.running.take()?, w.started)))
    else {
        return Ok(());
    };
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
            None => park_idle(s, worker, now),
        }
        if s.draining.is_some() {
            if s.running == 0 {
                drain::finish(me, s);
            }
            return Ok(());
        }
        s.retrying += 1;
        s.backoffs.push((m.clone(), attempt, now));
        me.send_after(after, move || PartitionMsg::Retry(m, attempt));
        return Ok(());
    }
    record_completion(s, &m, outcome, now);
    if s.draining.is_some() {
        if s.running == 0 {
            drain::finish(me, s);
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
            None => park_idle(s, worker, now),
        },
    }
    if let Some(key) = m.key.as_ref().filter(|k| s.overflow.holds(k)) {
        refill(me, s, key).await?;
    }
    Ok(())
}

/// A key with messages in the overflow file drained below half its share: its oldest ones come
/// back, up to the share, behind what it holds. A file that cannot be read fails the partition
/// (its messages would otherwise never complete, holding the commit point for good): the
/// process stops, and Kafka re-delivers them from the commit point.
async fn refill(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    key: &bytes::Bytes,
) -> Result<(), ActorProcessingErr> {
    if s.scheduler.queued(key) >= s.key_share / 2 {
        return Ok(());
    }
    // Within the partition's byte budget, except one message when the key has nothing in
    // memory: it must run, or nothing would call this again for the key.
    while s.scheduler.queued(key) < s.key_share && (s.flow.has_room() || !s.scheduler.is_busy(key))
    {
        let Some(read) = s.overflow.pop(key, &s.topic, s.partition) else {
            break;
        };
        let m = read.map_err(|e| {
            format!(
                "partition {}: hot key overflow file unreadable: {e}",
                s.partition
            )
        })?;
        s.flow.admit(m.size());
        if let Some(m) = s.scheduler.admit(Arc::new(m)) {
            start_or_park(me, s, m, 1).await?;
        }
    }
    Ok(())
}

/// `m` completed with `outcome` (not a retry): its offset completes, its budget is freed, and
/// it is counted.
#[inline]
pub(super) fn record_completion(
    s: &mut PartitionState,
    m: &Message,
    outcome: Outcome,
    now: Instant,
) {
    let pm = &s.stats.metrics.pipeline;
    if let Some(ts) = m.timestamp_ms.filter(|&t| t > 0) {
        pm.end_to_end
            .record((s.wall_ms(now) - ts).max(0) as f64 / 1000.0);
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
}

/// Pauses or resumes the partition on the consumer when the budget says so.
pub(super) fn apply_flow(me: &ActorRef<PartitionMsg>, s: &mut PartitionState) {
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

/// Pauses the partition on the consumer while flow control, the pipeline gate, a fetch error or
/// the want of a fetch turn wants it paused, and resumes it once none does.
pub(super) fn sync_pause(s: &mut PartitionState) {
    if s.released() {
        // The pause flag belongs to the partition's next owner (STYLE 15); nothing resumes a
        // pause another supervisor set.
        return;
    }
    let want = s.flow.paused() || s.gate_held || s.error_paused || s.turn_paused;
    if want == s.consumer_paused {
        if want {
            // Already paused: a fetch error's position is put back all the same.
            if let Some(reader) = s.reader.as_mut() {
                reader.put_back();
            }
        }
        return;
    }
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(&s.topic, s.partition);
    let r = if want {
        s.stats.pauses.fetch_add(1, Relaxed);
        s.stats.metrics.pauses.increment(1);
        match s.reader.as_mut() {
            // Through the reader: it puts back a position a fetch error moved.
            Some(reader) => reader.pause(),
            None => s.consumer.pause(&tpl),
        }
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
pub(super) fn resume_on_start(consumer: &Consumer, topic: &str, partition: i32) {
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
pub(super) fn commit_progress(s: &mut PartitionState) {
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
    // Given up: the committer may already take points for the partition's next supervisor.
    if s.draining.is_some() || s.released() || (s.commit_sent == Some(next) && s.uncommitted == 0) {
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
pub(super) fn commit_metadata(s: &PartitionState) -> Option<String> {
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

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
