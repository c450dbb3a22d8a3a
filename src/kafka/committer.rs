//! One asynchronous offset commit in flight per pipeline, covering every partition that moved.
//!
//! A broker handles one request per connection at a time and leaves the next ones unread in the
//! socket meanwhile; a consumer that sent a commit per partition every `commit_every` messages
//! queued hundreds of them behind each other (measured: the broker ran a second behind what
//! keyflow had sent), and on `kill -9` the unread ones were lost with the connection. So the
//! partition supervisors hand their latest commit point here, and the committer sends one
//! OffsetCommit for all of them whenever none is outstanding: the newest point of each partition
//! replaces an older one that was not sent yet, and the commit rate follows the broker's pace.
//!
//! The commit's answer comes back on the committer's own librdkafka queue, served by the
//! committer's own thread: not the consumer's queue, which the poll thread does not serve while
//! it waits in a revoke's rendezvous (a drain can last `drain_timeout`), and which it serves
//! only between 100 ms polls. An answer frees the slot and sends
//! what accumulated meanwhile; a partition whose commit failed goes back to pending (unless a
//! newer point replaced it) and is sent again at the next trigger, a supervisor's tick or commit;
//! a partition whose metadata the broker refused as too large (`offset.metadata.max.bytes` below
//! keyflow's cap) is sent again without it. An answer that never comes frees the slot after
//! [`ANSWER_BOUND`]; a late answer to an older commit is recognised and does not free the slot
//! of a newer one.
//!
//! Revoked partitions are closed here before their drain: their final commit is synchronous,
//! through the coordinator, and no point of theirs handed in after that (a tick or completion
//! queued ahead of the drain) is ever sent after it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use tracing::warn;

use super::offsets::{self, CommitOffset};

/// How long a sent commit may stay unanswered before the next one is sent regardless.
pub const ANSWER_BOUND: Duration = Duration::from_secs(10);

/// A partition's commit point with the offsets completed above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub next: i64,
    pub metadata: Option<String>,
}

/// The committer's reply queue (a librdkafka handle). Created by `start`, destroyed by
/// `close_queue` once the thread that polls it has exited.
#[derive(Debug, Clone, Copy)]
struct ReplyQueue(*mut rd::rd_kafka_queue_t);

// SAFETY: librdkafka queues are thread-safe.
unsafe impl Send for ReplyQueue {}

#[derive(Debug, Default)]
struct State {
    /// The newest point of each partition, not yet sent.
    pending: BTreeMap<i32, Point>,
    /// The commit awaiting the broker's answer.
    in_flight: Option<(Instant, BTreeMap<i32, Point>)>,
    /// Partitions revoked or shut down: nothing of theirs is sent any more (until reassigned).
    closed: BTreeSet<i32>,
    /// None before `start` and after `close_queue`: commits go out unanswered.
    queue: Option<ReplyQueue>,
}

/// The pipeline's committer (one per consumer: one input topic).
#[derive(Debug)]
pub struct Committer {
    topic: String,
    state: Mutex<State>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A commit's answer, read off the reply queue.
struct Answer {
    /// The request-level error, if any.
    error: Option<rd::rd_kafka_resp_err_t>,
    /// (partition, offset, per-partition error).
    partitions: Vec<(i32, i64, rd::rd_kafka_resp_err_t)>,
}

impl Committer {
    pub fn new(topic: &str) -> Self {
        Committer {
            topic: topic.to_string(),
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        }
    }

    /// Creates the reply queue and starts the thread that serves it (once, after the consumer
    /// exists). Without it commits go out unanswered (and nothing waits for an answer).
    pub fn start<C: ConsumerContext + 'static>(
        self: &Arc<Self>,
        consumer: &Arc<BaseConsumer<C>>,
        stats: Arc<crate::stats::PipelineStats>,
    ) {
        // SAFETY: the consumer's live handle; the queue is destroyed by `close_queue`, before
        // the consumer (the poll thread holds the last reference and calls it first).
        let q = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        if q.is_null() {
            return;
        }
        let queue = ReplyQueue(q);
        self.state.lock().unwrap().queue = Some(queue);
        let (me, weak): (Arc<Self>, Weak<BaseConsumer<C>>) =
            (self.clone(), Arc::downgrade(consumer));
        let spawned = std::thread::Builder::new()
            .name("kf-commit-answers".into())
            .spawn(move || me.serve(queue, weak, &stats));
        match spawned {
            Ok(t) => *self.thread.lock().unwrap() = Some(t),
            Err(e) => {
                warn!(topic = %self.topic, error = %e, "cannot start the commit answer thread; commits go out unanswered");
                self.state.lock().unwrap().queue = None;
                // SAFETY: nobody else has it.
                unsafe { rd::rd_kafka_queue_destroy(q) };
            }
        }
    }

    /// The answer thread: waits on the reply queue (never under the state lock) and handles
    /// each answer as it comes.
    fn serve<C: ConsumerContext>(
        &self,
        queue: ReplyQueue,
        consumer: Weak<BaseConsumer<C>>,
        stats: &crate::stats::PipelineStats,
    ) {
        // The poll thread closes the queue (stopping this loop) before the consumer goes; the
        // strong count is a second guard for a consumer dropped some other way.
        while !self.stop.load(Ordering::SeqCst) && consumer.strong_count() > 0 {
            let Some(answer) = poll_answer(queue, 100) else {
                continue;
            };
            let Some(consumer) = consumer.upgrade() else {
                return;
            };
            let mut st = self.state.lock().unwrap();
            self.answered(&consumer, stats, &mut st, answer);
        }
    }

    /// Partitions (re)assigned to this member: their points are sent again.
    pub fn open(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut st = self.state.lock().unwrap();
        for p in partitions {
            st.closed.remove(&p);
        }
    }

    /// A supervisor's newest commit point: sent now if no commit is outstanding, else with the
    /// next one. Per `commit_every` completions or tick, not per message.
    pub fn submit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partition: i32,
        point: Point,
    ) {
        let mut st = self.state.lock().unwrap();
        if st.closed.contains(&partition) {
            return;
        }
        st.pending.insert(partition, point);
        self.send(consumer, &mut st);
    }

    /// A trigger without a new point: sends what is pending (after a failure, or an answer that
    /// never came) if nothing is outstanding.
    pub fn tick<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let mut st = self.state.lock().unwrap();
        if st
            .in_flight
            .as_ref()
            .is_some_and(|(sent, _)| sent.elapsed() > ANSWER_BOUND)
        {
            warn!(topic = %self.topic, bound = ?ANSWER_BOUND, "offset commit unanswered; sending the next one");
            Self::requeue(&mut st);
        }
        self.send(consumer, &mut st);
    }

    /// The broker answered a commit. On success the acknowledged offsets are recorded and what
    /// accumulated meanwhile is sent at once; failed partitions go back to pending for the next
    /// trigger.
    fn answered<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        stats: &crate::stats::PipelineStats,
        st: &mut State,
        answer: Answer,
    ) {
        let acked: Vec<(i32, i64)> = answer
            .partitions
            .iter()
            .filter(|(_, _, e)| answer.error.is_none() && !is_error(*e))
            .map(|&(p, o, _)| (p, o))
            .collect();
        let ok = answer.error.is_none() && acked.len() == answer.partitions.len();
        stats.commit_answered(ok, &acked);
        if !ok {
            warn!(topic = %self.topic, error = ?answer.error, failed = ?answer.partitions.iter().filter(|(_, _, e)| is_error(*e)).map(|(p, _, e)| (p, *e)).collect::<Vec<_>>(), "offset commit failed; sent again at the next trigger");
        }
        // The answer of the outstanding commit (not of an older one given up on).
        let ours = st.in_flight.as_ref().is_some_and(|(_, sent)| {
            sent.len() == answer.partitions.len()
                && answer
                    .partitions
                    .iter()
                    .all(|(p, o, _)| sent.get(p).is_some_and(|pt| pt.next == *o))
        });
        if !ours {
            return;
        }
        let (_, sent) = st.in_flight.take().expect("checked");
        for (p, point) in sent {
            let err = answer.error.or_else(|| {
                answer
                    .partitions
                    .iter()
                    .find(|(q, _, e)| *q == p && is_error(*e))
                    .map(|(_, _, e)| *e)
            });
            let Some(err) = err else { continue };
            if st.closed.contains(&p) {
                continue;
            }
            let point = if err
                == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE
            {
                warn!(topic = %self.topic, partition = p, "the broker refused the completed-offsets metadata as too large (offset.metadata.max.bytes); committing without it");
                Point {
                    metadata: None,
                    ..point
                }
            } else {
                point
            };
            st.pending.entry(p).or_insert(point);
        }
        if ok {
            self.send(consumer, st);
        }
    }

    /// Destroys the reply queue (before the consumer is destroyed: a librdkafka queue must not
    /// outlive its client). Later commits go out unanswered.
    pub fn close_queue(&self) {
        let queue = {
            let mut st = self.state.lock().unwrap();
            st.in_flight = None;
            st.queue.take()
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        if let Some(q) = queue {
            // SAFETY: created by `start`, taken out of the state once, and its thread has exited.
            unsafe { rd::rd_kafka_queue_destroy(q.0) };
        }
    }

    /// Partitions given up (revoke, shutdown): their final commit is synchronous, through the
    /// coordinator; nothing pending of theirs may be sent after it.
    pub fn forget(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut st = self.state.lock().unwrap();
        for p in partitions {
            st.closed.insert(p);
            st.pending.remove(&p);
            // Sent already: if it fails, it is not sent again.
            if let Some((_, sent)) = st.in_flight.as_mut() {
                sent.remove(&p);
            }
        }
    }

    fn requeue(st: &mut State) {
        if let Some((_, sent)) = st.in_flight.take() {
            for (p, point) in sent {
                st.pending.entry(p).or_insert(point);
            }
        }
    }

    fn send<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, st: &mut State) {
        if st.in_flight.is_some() || st.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut st.pending);
        let list: Vec<CommitOffset<'_>> = batch
            .iter()
            .map(|(&partition, p)| CommitOffset {
                topic: &self.topic,
                partition,
                next: p.next,
                metadata: p.metadata.as_deref(),
            })
            .collect();
        let queue = st.queue.as_ref().map_or(std::ptr::null_mut(), |q| q.0);
        // SAFETY: `queue` is null or the committer's own live queue (closed only with the
        // consumer, see `close_queue`).
        match unsafe { offsets::commit_async(consumer, &list, queue) } {
            // Without a reply queue nobody answers: the slot stays free.
            Ok(()) if queue.is_null() => {}
            Ok(()) => st.in_flight = Some((Instant::now(), batch)),
            Err(e) => {
                warn!(topic = %self.topic, error = %e, "offset commit not sent; retried at the next trigger");
                st.pending = batch;
            }
        }
    }

    /// Points not yet answered (pending or outstanding), for tests.
    #[doc(hidden)]
    pub fn outstanding(&self) -> (usize, bool) {
        let st = self.state.lock().unwrap();
        (st.pending.len(), st.in_flight.is_some())
    }
}

fn is_error(e: rd::rd_kafka_resp_err_t) -> bool {
    e != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
}

/// One commit answer off the reply queue, waiting up to `timeout_ms`. Other events are dropped.
fn poll_answer(q: ReplyQueue, timeout_ms: i32) -> Option<Answer> {
    loop {
        // SAFETY: a live queue (see `ReplyQueue`); each event is destroyed once, after its list
        // (owned by the event) was copied out.
        unsafe {
            let ev = rd::rd_kafka_queue_poll(q.0, timeout_ms);
            if ev.is_null() {
                return None;
            }
            if rd::rd_kafka_event_type(ev) != rd::RD_KAFKA_EVENT_OFFSET_COMMIT {
                rd::rd_kafka_event_destroy(ev);
                continue;
            }
            let err = rd::rd_kafka_event_error(ev);
            let list = rd::rd_kafka_event_topic_partition_list(ev);
            let mut partitions = Vec::new();
            if !list.is_null() {
                let l = &*list;
                for i in 0..l.cnt as usize {
                    let e = &*l.elems.add(i);
                    partitions.push((e.partition, e.offset, e.err));
                }
            }
            rd::rd_kafka_event_destroy(ev);
            return Some(Answer {
                error: is_error(err).then_some(err),
                partitions,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rd::rd_kafka_resp_err_t as E;
    use rdkafka::consumer::DefaultConsumerContext;
    use rdkafka::ClientConfig;

    fn consumer() -> BaseConsumer<DefaultConsumerContext> {
        ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "committer-unit")
            .create()
            .unwrap()
    }

    fn point(next: i64, metadata: Option<&str>) -> Point {
        Point {
            next,
            metadata: metadata.map(str::to_string),
        }
    }

    /// `partition → point` sent and awaiting its answer.
    fn in_flight(c: &Committer, sent: &[(i32, Point)]) {
        c.state.lock().unwrap().in_flight = Some((Instant::now(), sent.iter().cloned().collect()));
    }

    fn answer(partitions: &[(i32, i64, E)]) -> Answer {
        Answer {
            error: None,
            partitions: partitions.to_vec(),
        }
    }

    fn pending(c: &Committer) -> BTreeMap<i32, Point> {
        c.state.lock().unwrap().pending.clone()
    }

    #[test]
    fn a_point_of_a_revoked_partition_is_never_sent_after_its_final_commit() {
        let (c, k) = (Committer::new("t"), consumer());
        let stats = crate::stats::PipelineStats::with_topic("p", "t");
        // Partition 0's point is on the wire when the revoke's final synchronous commit (at a
        // higher offset) happens; then the async one fails.
        in_flight(&c, &[(0, point(5, None)), (1, point(7, None))]);
        c.forget([0]);
        let mut st = c.state.lock().unwrap();
        c.answered(
            &k,
            &stats,
            &mut st,
            answer(&[(1, 7, E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT)]),
        );
        drop(st);
        assert_eq!(
            pending(&c).keys().copied().collect::<Vec<_>>(),
            vec![1],
            "only the partition still owned is sent again: a stale point of partition 0 would move its committed offset back"
        );
        // A late supervisor of the revoked partition hands in a point while partition 1's
        // commit is outstanding: ignored, not queued.
        in_flight(&c, &[(1, point(7, None))]);
        c.submit(&k, 0, point(6, None));
        assert!(!pending(&c).contains_key(&0));
        // Reassigned: its points go out again.
        c.open([0]);
        c.submit(&k, 0, point(9, None));
        assert_eq!(pending(&c).get(&0), Some(&point(9, None)));
    }

    #[test]
    fn metadata_refused_as_too_large_is_committed_again_without_it() {
        let (c, k) = (Committer::new("t"), consumer());
        let stats = crate::stats::PipelineStats::with_topic("p", "t");
        in_flight(&c, &[(0, point(5, Some("kf1:5:rAQE")))]);
        let mut st = c.state.lock().unwrap();
        c.answered(
            &k,
            &stats,
            &mut st,
            answer(&[(0, 5, E::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE)]),
        );
        drop(st);
        assert_eq!(
            pending(&c).get(&0),
            Some(&point(5, None)),
            "sent again with the same offset, without the metadata the broker refuses (else it fails for ever)"
        );
    }

    #[test]
    fn a_late_answer_of_a_commit_given_up_on_does_not_settle_the_newer_one() {
        let (c, k) = (Committer::new("t"), consumer());
        let stats = crate::stats::PipelineStats::with_topic("p", "t");
        // The commit of offset 5 went unanswered past the bound; offset 10 is now on the wire.
        in_flight(&c, &[(0, point(10, None))]);
        let mut st = c.state.lock().unwrap();
        c.answered(
            &k,
            &stats,
            &mut st,
            answer(&[(0, 5, E::RD_KAFKA_RESP_ERR_NO_ERROR)]),
        );
        let still = st.in_flight.as_ref().map(|(_, s)| s.clone());
        drop(st);
        assert_eq!(
            still,
            Some([(0, point(10, None))].into_iter().collect()),
            "the answer for 5 must not be taken for the commit of 10"
        );
    }
}
