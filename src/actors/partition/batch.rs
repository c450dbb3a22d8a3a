//! Batch dispatch for `[batch]` pipelines (see [`crate::batch`] for the rules): the messages
//! the key scheduler lets start collect in an open batch, which goes to a free worker once it
//! holds `max_messages` or its first message has waited `max_wait`. A batch's completion
//! completes each of its messages' offsets and releases each key's next message into the next
//! batch. Pipelines without `[batch]` never come here (`PartitionState::batch` is `None`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorProcessingErr, ActorRef};

use super::path::{acquire_worker, apply_flow, fetch, park_idle, record_completion};
use super::{drain, PartitionMsg, PartitionState};
use crate::actors::worker::WorkerMsg;
use crate::config::BatchSpec;
use crate::message::Message;
use crate::pipeline::Outcome;

pub(super) struct Batching {
    spec: BatchSpec,
    /// Messages free to start (one per key), for the next batch.
    open: VecDeque<Arc<Message>>,
    /// When the oldest of `open` became free to start.
    open_since: Option<Instant>,
    /// A `BatchFlush` is on its way.
    timer: bool,
    /// The batch each worker runs, by worker id (re-sent to a restarted worker).
    running: Vec<Option<Arc<[Arc<Message>]>>>,
}

impl Batching {
    pub(super) fn new(spec: BatchSpec) -> Self {
        Batching {
            spec,
            open: VecDeque::new(),
            open_since: None,
            timer: false,
            running: Vec::new(),
        }
    }

    /// The batch worker `id` runs, if any (a crashed worker's batch runs again on its
    /// replacement).
    pub(super) fn running(&self, id: usize) -> Option<Arc<[Arc<Message>]>> {
        self.running.get(id).cloned().flatten()
    }

    /// The messages of the batches running now (for the drain's abandoned list and `/debug`).
    pub(super) fn running_messages(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.running.iter().flatten().flat_map(|b| b.iter())
    }

    /// The messages of the open batch, not started yet.
    pub(super) fn open_messages(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.open.iter()
    }
}

/// `m` may start (its key's head): it joins the open batch, which goes out if full.
pub(super) async fn offer(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    m: Arc<Message>,
) -> Result<(), ActorProcessingErr> {
    let Some(b) = s.batch.as_mut() else {
        return Ok(());
    };
    if b.open.is_empty() {
        b.open_since = Some(Instant::now());
    }
    b.open.push_back(m);
    if b.open.len() >= b.spec.max_messages || !b.timer {
        flush(me, s).await?;
    }
    Ok(())
}

/// `max_wait` may have passed for the open batch.
pub(super) async fn on_timer(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
) -> Result<(), ActorProcessingErr> {
    if let Some(b) = s.batch.as_mut() {
        b.timer = false;
    }
    flush(me, s).await
}

/// Sends out every batch that is due (full, or its first message waited `max_wait`) while a
/// worker is free; arms the timer for the rest.
async fn flush(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
) -> Result<(), ActorProcessingErr> {
    if s.draining.is_some() {
        // Not started: the next owner receives them (the commit point cannot pass them).
        return Ok(());
    }
    loop {
        let Some(b) = s.batch.as_ref() else {
            return Ok(());
        };
        let now = Instant::now();
        let waited = b
            .open_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let due = b.open.len() >= b.spec.max_messages
            || (!b.open.is_empty() && waited >= b.spec.max_wait);
        if !due {
            if !b.open.is_empty() && !b.timer {
                let after = b.spec.max_wait.saturating_sub(waited);
                me.send_after(after, || PartitionMsg::BatchFlush);
                if let Some(b) = s.batch.as_mut() {
                    b.timer = true;
                }
            }
            return Ok(());
        }
        // A worker frees when its batch completes, which flushes again.
        let Some(id) = acquire_worker(me, s).await? else {
            return Ok(());
        };
        let Some(b) = s.batch.as_mut() else {
            return Ok(());
        };
        let n = b.open.len().min(b.spec.max_messages);
        let batch: Arc<[Arc<Message>]> = b.open.drain(..n).collect();
        // The rest have waited since before: they go out at the next chance.
        if b.open.is_empty() {
            b.open_since = None;
        }
        if b.running.len() <= id {
            b.running.resize(id + 1, None);
        }
        b.running[id] = Some(batch.clone());
        let qw = &s.stats.metrics.pipeline.queue_wait;
        for m in batch.iter() {
            qw.record(now.saturating_duration_since(m.received));
        }
        let slot = &mut s.workers[id];
        // Slots taken by `acquire_worker` have an actor (only idle ones are stopped).
        let Some(actor) = slot.actor.as_ref() else {
            return Err(format!("worker slot {id} has no actor").into());
        };
        actor.cast(WorkerMsg::RunBatch(batch))?;
        slot.attempt = 1;
        slot.crashes = 0;
        slot.started = now;
        s.running += 1;
    }
}

/// Worker `worker` finished its batch: each message completes with its outcome, each key's
/// next message joins the open batch, and due batches go out.
pub(super) async fn on_done(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    worker: usize,
    outcomes: Vec<Outcome>,
) -> Result<(), ActorProcessingErr> {
    let Some(batch) = s
        .batch
        .as_mut()
        .and_then(|b| b.running.get_mut(worker))
        .and_then(Option::take)
    else {
        return Ok(());
    };
    let now = s.tick_clock();
    s.last_progress = now;
    s.last_completion = Some(now);
    if let Some(w) = s.workers.get(worker) {
        s.stats
            .metrics
            .pipeline
            .process_duration
            .record(now.saturating_duration_since(w.started));
    }
    s.running -= 1;
    park_idle(s, worker, now);
    for (m, outcome) in batch.iter().zip(outcomes) {
        record_completion(s, m, outcome, now);
        if s.draining.is_none() {
            if let Some(next) = s.scheduler.complete(m.key.as_ref()) {
                if let Some(b) = s.batch.as_mut() {
                    if b.open.is_empty() {
                        b.open_since = Some(now);
                    }
                    b.open.push_back(next);
                }
            }
        }
    }
    if s.draining.is_some() {
        if s.running == 0 {
            drain::finish(me, s);
        }
        return Ok(());
    }
    flush(me, s).await?;
    apply_flow(me, s);
    if s.flow.has_room() {
        fetch(me, s).await?;
    }
    Ok(())
}
