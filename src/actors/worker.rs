//! Worker: runs the pipeline on one message (or one batch, `[batch]`) at a time and reports back to its partition
//! supervisor. Workers hold no per-message state the supervisor does not also hold, so a worker
//! that panics is replaced and its message runs again.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::ReusableBoxFuture;
use tracing::Instrument;

use super::partition::{Completion, Inbox, PartitionMsg};
use crate::kafka::transaction::{Ownership, TxnGuard};
use crate::message::Message;
use crate::pipeline::{Outcome, Pipeline};
use crate::processors::ProcessError;

pub struct Worker;

pub struct WorkerArgs {
    /// The worker's slot in its supervisor's pool.
    pub id: usize,
    pub pipeline: Arc<Pipeline>,
    pub parent: ActorRef<PartitionMsg>,
    /// The running message's attempt, read by the supervisor for `/debug/partitions`.
    pub progress: Arc<AtomicU32>,
    /// The partition's right to write in the pipeline's transaction (exactly-once).
    pub owner: Arc<Ownership>,
    /// Where completions go in batches; `None` under exactly-once (one `Done` each).
    pub inbox: Option<Arc<Inbox>>,
}

pub struct WorkerState {
    id: usize,
    pipeline: Arc<Pipeline>,
    parent: ActorRef<PartitionMsg>,
    progress: Arc<AtomicU32>,
    owner: Arc<Ownership>,
    inbox: Option<Arc<Inbox>>,
}

pub enum WorkerMsg {
    /// Run attempt `.1` (1-based) of the pipeline on this message.
    Run(Arc<Message>, u32),
    /// The message crashed its worker too often: dead-letter it without running it again.
    DeadLetter(Arc<Message>, ProcessError),
    /// `[batch]` pipelines: run this batch to its end (retries and splits included, see
    /// [`crate::batch`]) and report one outcome per message.
    RunBatch(Arc<[Arc<Message>]>),
    /// Finish an attempt the supervisor started inline and that did not complete in its first
    /// poll (see [`job`]).
    Resume(Job),
}

/// One attempt of the pipeline on one message, owned, so that it can start on the supervisor
/// (inline: most processors finish within their first poll) and move to a worker if it awaits.
/// Its box is reused: every attempt is the same future type, so a finished job's box takes the
/// next attempt without allocating (the supervisor keeps the spare ones, a worker hands its
/// back with `Done`).
pub type Job = ReusableBoxFuture<'static, (Outcome, Option<TxnGuard>)>;

/// The attempt as a [`Job`]: what `Run` does, in `spare`'s box if there is one.
pub fn job(
    spare: Option<Job>,
    pipeline: Arc<Pipeline>,
    m: Arc<Message>,
    attempt: u32,
    owner: Arc<Ownership>,
) -> Job {
    let attempt = async move { attempt_once(&pipeline, &m, attempt, &owner).await };
    match spare {
        Some(mut job) => {
            job.set(attempt);
            job
        }
        None => ReusableBoxFuture::new(attempt),
    }
}

/// One attempt, inside the message's span (with the input's W3C trace id, so logs join the
/// caller's trace; read only when the span is recorded: no cost otherwise).
async fn attempt_once(
    pipeline: &Pipeline,
    m: &Message,
    attempt: u32,
    owner: &Arc<Ownership>,
) -> (Outcome, Option<TxnGuard>) {
    let span = tracing::debug_span!("message", topic = %m.topic, partition = m.partition, offset = m.offset, trace_id = tracing::field::Empty);
    if !span.is_disabled() {
        if let Some(t) = m.headers.as_deref().and_then(crate::trace::find_trace_id) {
            span.record("trace_id", t.as_str());
        }
    }
    pipeline
        .execute_in(m, attempt, owner)
        .instrument(span)
        .await
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<WorkerMsg>,
        a: WorkerArgs,
    ) -> Result<WorkerState, ActorProcessingErr> {
        Ok(WorkerState {
            id: a.id,
            pipeline: a.pipeline,
            parent: a.parent,
            progress: a.progress,
            owner: a.owner,
            inbox: a.inbox,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        s: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        let mut spare = None;
        let (outcome, txn) = match msg {
            WorkerMsg::Run(m, attempt) => {
                s.progress.store(1, Relaxed);
                crate::introspect::PROGRESS
                    .scope(
                        s.progress.clone(),
                        attempt_once(&s.pipeline, &m, attempt, &s.owner),
                    )
                    .await
            }
            WorkerMsg::Resume(mut job) => {
                s.progress.store(1, Relaxed);
                let done = crate::introspect::PROGRESS
                    .scope(s.progress.clone(), &mut job)
                    .await;
                spare = Some(job);
                done
            }
            WorkerMsg::DeadLetter(m, e) => s.pipeline.dead_letter_now_in(&m, &e, &s.owner).await,
            WorkerMsg::RunBatch(b) => {
                s.progress.store(1, Relaxed);
                let outcomes = s.pipeline.execute_batch(&b).await;
                // Dropped with the supervisor if it is gone, like `Done` below.
                let _ = s.parent.cast(PartitionMsg::BatchDone {
                    worker: s.id,
                    outcomes,
                });
                return Ok(());
            }
        };
        // If the supervisor is gone (revoked, abandoned at the drain deadline) the completion is
        // dropped with it: a revoked partition's late completion is never committed here.
        let done = Completion {
            worker: s.id,
            outcome,
            job: spare,
        };
        match &s.inbox {
            // One `Completions` in the mailbox stands for every completion in the inbox: sent
            // only by the push that found it empty.
            Some(inbox) => {
                if inbox.push(done) {
                    let _ = s.parent.cast(PartitionMsg::Completions);
                }
            }
            None => {
                let _ = s.parent.cast(PartitionMsg::Done(done));
            }
        }
        // Exactly-once: the completion is in the supervisor's mailbox before a commit can start
        // (the commit asks the supervisor for its point after it).
        drop(txn);
        Ok(())
    }
}
