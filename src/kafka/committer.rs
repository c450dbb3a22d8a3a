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
//! The broker's answer (the consumer context's commit callback) frees the slot and sends what
//! accumulated meanwhile; a failed commit goes back to pending (unless a newer point replaced it)
//! and is sent again at the next trigger, a supervisor's tick or commit. An answer that never
//! comes frees the slot after [`ANSWER_BOUND`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, ConsumerContext};
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

#[derive(Debug, Default)]
struct State {
    /// The newest point of each partition, not yet sent.
    pending: BTreeMap<i32, Point>,
    /// The commit awaiting the broker's answer.
    in_flight: Option<(Instant, BTreeMap<i32, Point>)>,
}

/// The pipeline's committer (one per consumer: one input topic).
#[derive(Debug)]
pub struct Committer {
    topic: String,
    state: Mutex<State>,
}

impl Committer {
    pub fn new(topic: &str) -> Self {
        Committer {
            topic: topic.to_string(),
            state: Mutex::new(State::default()),
        }
    }

    /// A supervisor's newest commit point: sent now if no commit is outstanding, else with the
    /// next one. Per `commit_every` completions or tick, not per message.
    pub fn submit<C: ConsumerContext>(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<C>,
        partition: i32,
        point: Point,
    ) {
        let mut st = self.state.lock().unwrap();
        st.pending.insert(partition, point);
        self.send(consumer, &mut st);
    }

    /// A trigger without a new point: sends what is pending (after a failure, or an answer that
    /// never came) if nothing is outstanding.
    pub fn tick<C: ConsumerContext>(&self, consumer: &rdkafka::consumer::BaseConsumer<C>) {
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

    /// The broker answered the outstanding commit. On failure its points go back to pending
    /// (where no newer point replaced them) for the next trigger; on success what accumulated
    /// meanwhile is sent at once.
    pub fn answered<C: ConsumerContext>(
        &self,
        consumer: Option<&rdkafka::consumer::BaseConsumer<C>>,
        ok: bool,
    ) {
        let mut st = self.state.lock().unwrap();
        tracing::debug!(topic = %self.topic, ok, after = ?st.in_flight.as_ref().map(|(t, _)| t.elapsed()), pending = st.pending.len(), "offset commit answered");
        if ok {
            st.in_flight = None;
            if let Some(c) = consumer {
                self.send(c, &mut st);
            }
        } else {
            Self::requeue(&mut st);
        }
    }

    /// Partitions given up (revoke, shutdown): their final commit is synchronous, through the
    /// coordinator; nothing pending of theirs may be sent after it.
    pub fn forget(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut st = self.state.lock().unwrap();
        for p in partitions {
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

    fn send<C: ConsumerContext>(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<C>,
        st: &mut State,
    ) {
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
        match offsets::commit(consumer, &list, CommitMode::Async) {
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
