//! The drain of a partition given up (revoke, lost assignment, shutdown): nothing new starts,
//! running messages get until a deadline shared by every partition of the revoke, and the
//! supervisor reports the offset to commit (never past an incomplete message) before stopping.

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};
use tracing::{info, warn};

use super::path::commit_metadata;
use super::{PartitionMsg, PartitionState};

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

/// Revoke or shutdown: messages not yet started are abandoned now (the commit point cannot pass
/// them, so the next owner receives them); running ones may finish until `until`, then
/// [`finish`] reports the commit point and stops the supervisor.
pub(super) fn begin(
    me: &ActorRef<PartitionMsg>,
    s: &mut PartitionState,
    until: tokio::time::Instant,
    reply: RpcReplyPort<DrainReport>,
) {
    for m in s
        .scheduler
        .take_waiting()
        .into_iter()
        .chain(s.ready.drain(..).map(|(m, _)| m))
    {
        s.flow.release(m.size());
    }
    s.draining = Some(reply);
    // Takes no more messages: its fetch turn goes to the next partition waiting.
    s.turn = None;
    if s.retrying > 0 {
        // Waiting out a backoff: abandoned like the messages not yet started.
        info!(topic = %s.topic, partition = s.partition, retrying = s.retrying, "draining: messages waiting to retry are left for the next owner");
    }
    if s.running == 0 {
        finish(me, s);
    } else {
        let deadline = until.saturating_duration_since(tokio::time::Instant::now());
        info!(topic = %s.topic, partition = s.partition, running = s.running, ?deadline, "draining");
        me.send_after(deadline, || PartitionMsg::DrainDeadline);
    }
}

/// Reports the commit point once nothing runs any more (or at the deadline), and stops.
pub(super) fn finish(me: &ActorRef<PartitionMsg>, s: &mut PartitionState) {
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
        // `[batch]`: every message of a batch still running.
        .chain(s.batch.iter().flat_map(|b| b.running_messages()))
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
