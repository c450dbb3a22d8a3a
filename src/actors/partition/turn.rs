//! The partition's fetch turn (see [`crate::memory::turns`]): while its pipeline is gated
//! (one record batch per partition would overrun the prefetch share), the partition fetches
//! only while it holds a turn, and stays paused, with an empty librdkafka queue, otherwise.
//!
//! Looked at after each fetch, when a completion frees room while it is idle, when the turns
//! wake it (gated, ungated, granted), and when a turn's lease runs out. One lock of the turns
//! per look, and one of the queue while gated: per fetch, not per message.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Acquire;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::ActorRef;

use super::path::sync_pause;
use super::{PartitionMsg, PartitionState};
use crate::memory::turns::FLOOR_WINDOW;
use crate::memory::{PipelineMemory, Turn, TurnTicket, QUEUED_OP_COST};

/// A turn on which nothing arrived for this long is given back when others wait if the
/// partition is at the end of its log, so that a partition caught up cannot keep one (a
/// partition behind it keeps its turn while its next batch is on the way, up to `TURN_MAX`).
pub(super) const LEASE: Duration = Duration::from_millis(100);

/// The longest a turn lasts while others wait, from its first batch (or from the grant while
/// nothing came): at most about 2 × `TURN_MAX` + `LEASE` from the grant in all. librdkafka
/// fetches a partition's next batch as soon as its queue falls below `queued.min.messages`,
/// long before it is empty: a partition with a backlog that it works through steadily (never
/// congested) would keep its turn until the backlog is gone, and the partitions waiting would
/// not fetch at all meanwhile (for ever while producers keep up with the processing). After
/// this it gives the turn back with its queue: the pause drops what is queued, fetched again
/// on its next turn (review of c62cae2).
pub(super) const TURN_MAX: Duration = Duration::from_secs(1);

/// Joins the pipeline's turns; the turns wake the supervisor with [`PartitionMsg::Turn`].
/// Once the partition is given up (`released`) the wake says the member is gone: a turn is
/// no longer granted to it, and one it holds is taken back at the assignment change that
/// follows the release, even while a processor blocks its thread past the drain (the queue it
/// was for is no longer its own).
pub(super) fn join(
    me: &ActorRef<PartitionMsg>,
    memory: &PipelineMemory,
    released: Arc<AtomicBool>,
) -> TurnTicket {
    let m = me.clone();
    memory.turns.join(Box::new(move || {
        !released.load(Acquire) && m.cast(PartitionMsg::Turn).is_ok()
    }))
}

/// A fetch's first read took `got` messages of `bytes` in all, and `left` more are queued: what
/// one fetch leaves in a queue, at librdkafka's cost, for the pipeline's floor.
/// Told only when it passes this partition's last reading of the window (one lock per fetch
/// while a queue grows, none while it holds steady).
pub(super) fn observe(s: &mut PartitionState, got: usize, bytes: u64, left: usize) {
    if got == 0 {
        return;
    }
    let queued = (got + left) as u64 * (bytes / got as u64 + QUEUED_OP_COST);
    if s.clock.duration_since(s.turn_seen.1) >= FLOOR_WINDOW / 2 {
        s.turn_seen = (0, s.clock);
    }
    if queued <= s.turn_seen.0 {
        return;
    }
    s.turn_seen.0 = queued;
    let Some(ticket) = &s.turn else {
        return;
    };
    // Gated by this reading: decided at the end of the fetch.
    s.turn_state = ticket.observe(queued, s.clock);
}

/// The membership `decide` found (kept until the drain takes it).
fn ticket(s: &PartitionState) -> &TurnTicket {
    s.turn.as_ref().expect("decide runs with a membership")
}

/// Whether the partition's librdkafka queue is empty (a pause then drops nothing).
fn queue_empty(s: &PartitionState) -> bool {
    s.reader.as_ref().is_none_or(|r| r.queued() == 0)
}

/// Whether the partition is at the end of its log: where the consumer takes next (librdkafka's
/// position, past the control records of transactions; the offset after the last message
/// received; or, before anything since the assignment, where the group resumes it) is at the
/// partition's end (the later of librdkafka's high watermark and the broker's last answer).
/// Local lookups, looked at only when a turn idles while others wait; `false` when either end
/// is not known yet (the turn is then given back after `TURN_MAX`). A `read_committed`
/// consumer behind an open transaction reads as behind. Left (review of d132d89): an end a
/// few seconds old reads a partition that producers appended to meanwhile as caught up, and
/// its turn may be given back before the fetch that would bring the new messages.
fn caught_up(s: &PartitionState) -> bool {
    use crate::kafka::client::{cached_high_watermark, position};
    // librdkafka's watermark moves only with fetch responses, so a partition paused while
    // producers appended still shows the old end; the broker's own answer, asked on ticks
    // while that value stands still (`report::BrokerEnd`), is at most a few seconds old.
    let cached = cached_high_watermark(&s.consumer, &s.topic, s.partition);
    let Some(high) = cached.max(s.broker_end.high()) else {
        return false;
    };
    let next = position(&s.consumer, &s.topic, s.partition)
        .max(s.tracker.next_to_receive())
        .or_else(|| s.broker_end.start());
    next.is_some_and(|n| n >= high)
}

/// Looks at the partition's turn: takes one, gives it back, or pauses and waits (see the
/// module). A draining supervisor no longer owns the consumer's pause flag (STYLE 15).
pub(super) fn decide(me: &ActorRef<PartitionMsg>, s: &mut PartitionState) {
    if s.released() {
        // Given up (a handler that ran past the release): the membership goes now, not at the
        // drain, so that it takes no turn meanwhile.
        s.turn = None;
    }
    let Some(t) = s.turn.as_ref().filter(|_| s.draining.is_none()) else {
        return;
    };
    let now = Instant::now();
    let mut turn = t.turn();
    if turn != Turn::Held {
        // A turn this supervisor held and the turns took back (ungated, then gated again
        // before it looked): the next turn starts afresh.
        s.turn_since = None;
    } else if s.turn_since.is_none() {
        granted(me, s, now);
    }
    turn = match turn {
        Turn::Free => {
            s.turn_since = None;
            Turn::Free
        }
        Turn::Held => {
            let since = s.turn_since.unwrap_or(now);
            // Nothing came for a lease. Given back only at the end of the partition's log: a
            // partition behind it waits for its fetch (one response serves the fetching
            // partitions in turn, so a fresh turn's first batch, or the next one, may take
            // several round trips, and a turn given back meanwhile drops that fetch and pays
            // the hand-over again), up to `TURN_MAX` (`long`).
            let idle = now.saturating_duration_since(s.turn_received.unwrap_or(since)) >= LEASE;
            // No room, or paused for a fetch error (its backoff): a turn it cannot use.
            let full = !s.flow.has_room() || s.error_paused;
            // Takes nothing for a while (slow processing): its queue is dropped with the pause
            // and fetched again on its next turn, so that the turn serves a partition that can
            // use it. A partition that completes messages is never congested.
            let stalled = s.flow.paused() || s.flow.congested_for(now) >= LEASE;
            // Held long enough: a queue that never empties (a backlog), or one the partition
            // does not read (exactly-once metadata or a hot key's overflow at their bound).
            let long = now >= since + TURN_MAX;
            let give_back = if queue_empty(s) {
                full || ((idle || long) && ticket(s).contended() && (long || caught_up(s)))
            } else {
                // (A fetch error's pause made what is queued outdated.)
                s.error_paused || ((stalled || long) && ticket(s).contended())
            };
            if give_back {
                s.turn_since = None;
                // A partition that cannot take messages now asks again when it can.
                let then = if full || s.flow.paused() {
                    Turn::Idle
                } else {
                    Turn::Waiting
                };
                ticket(s).give_back(then)
            } else {
                Turn::Held
            }
        }
        Turn::Waiting => Turn::Waiting,
        // Asks for a turn with room for more, or with messages already queued (fetched before
        // the pipeline was gated: kept if a turn is free, dropped by the pause otherwise).
        // (A partition paused for its turn may still count outdated messages, which the pause
        // dropped: only a running partition's queue counts.)
        Turn::Idle
            if (s.flow.has_room() && !s.flow.paused() && !s.error_paused)
                || (!s.turn_paused && !s.error_paused && !queue_empty(s)) =>
        {
            ticket(s).ask()
        }
        Turn::Idle => Turn::Idle,
    };
    if turn != Turn::Held {
        s.turn_since = None;
    } else if s.turn_since.is_none() {
        granted(me, s, now);
    }
    s.turn_state = turn;
    let paused = matches!(turn, Turn::Waiting | Turn::Idle);
    if paused != s.turn_paused {
        s.turn_paused = paused;
        sync_pause(s);
        if !paused {
            // Takes what the pause left in the queue (outdated: dropped), so that its wake-up
            // fires on the first message of this turn.
            let _ = me.cast(PartitionMsg::Fetch);
        }
    }
}

/// A turn starts: nothing received on it yet, and its lease is looked at when it runs out.
fn granted(me: &ActorRef<PartitionMsg>, s: &mut PartitionState, now: Instant) {
    s.turn_since = Some(now);
    s.turn_received = None;
    s.turn_grants += 1;
    arm_lease(me, s.turn_grants);
}

fn arm_lease(me: &ActorRef<PartitionMsg>, grant: u64) {
    me.send_after(LEASE, move || PartitionMsg::TurnLease(grant));
}

/// The lease of turn `grant` ran out: looked at again, and every lease after it while the turn
/// is held (a partition caught up gets no fetch that would look at it, and others may start
/// waiting at any time). A lease of an earlier turn does nothing.
pub(super) fn lease(me: &ActorRef<PartitionMsg>, s: &mut PartitionState, grant: u64) {
    if grant != s.turn_grants || s.turn_since.is_none() {
        return;
    }
    decide(me, s);
    if grant == s.turn_grants && s.turn_since.is_some() {
        arm_lease(me, grant);
    }
}
