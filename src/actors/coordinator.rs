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
use crate::kafka::context::secret_values;
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
        reply: mpsc::SyncSender<Vec<DrainedOffset>>,
    },
    Stray(Message),
    Shutdown(RpcReplyPort<ShutdownReport>),
}

pub struct CoordinatorState {
    spec: Arc<PipelineSpec>,
    pipeline: Arc<Pipeline>,
    stats: Arc<PipelineStats>,
    consumer: Option<Arc<Consumer>>,
    poll_stop: Arc<AtomicBool>,
    poll_thread: Option<ThreadHandle<()>>,
    partitions: HashMap<i32, ActorRef<PartitionMsg>>,
    fatal: UnboundedSender<String>,
    shutting_down: bool,
    /// Revoke drains in progress (each bounded by the drain deadline): shutdown waits for them
    /// so that their commits happen before the consumer closes.
    revoking: Vec<tokio::task::JoinHandle<()>>,
}

/// Sets the poll thread's stop flag when dropped (unless disarmed by taking the flag out).
struct PollStopGuard(Option<Arc<AtomicBool>>);

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
/// not an outage). Runs once at start.
async fn wait_reachable(
    consumer: &Arc<Consumer>,
    spec: &PipelineSpec,
    stats: &Arc<PipelineStats>,
) -> Result<(), ActorProcessingErr> {
    let (consumer, stats) = (consumer.clone(), stats.clone());
    let (topic, timeout) = (spec.topic.clone(), spec.startup_timeout);
    let res = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            let slice = left.min(Duration::from_millis(500));
            let metadata = consumer.fetch_metadata(Some(&topic), slice);
            if metadata.is_ok() {
                stats.brokers_up();
                stats.clear_client_error();
                return Ok(());
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
        let ctx = KeyflowContext::new(
            &a.spec.name,
            a.spec.drain_timeout,
            a.stats.clone(),
            secret_values(&a.spec.kafka),
        );
        let consumer = client::create_consumer(&a.brokers, &a.spec, ctx)?;
        consumer.context().set_coordinator(me.clone());
        let poll_stop = Arc::new(AtomicBool::new(false));
        // Polling from the start serves the client's error events, which name the cause if the
        // brokers cannot be reached.
        let poll_thread = spawn_poll_thread(
            &a.spec,
            consumer.clone(),
            me,
            poll_stop.clone(),
            a.stats.clone(),
        )?;
        // Stops the poll thread if start fails or this future is dropped mid-await.
        let mut stop_guard = PollStopGuard(Some(poll_stop.clone()));
        let reached = wait_reachable(&consumer, &a.spec, &a.stats).await;
        if let Err(e) = reached.and_then(|()| Ok(consumer.subscribe(&[&a.spec.topic])?)) {
            drop(stop_guard);
            drop(consumer);
            let _ = tokio::task::spawn_blocking(move || poll_thread.join()).await;
            return Err(e);
        }
        stop_guard.0 = None;
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
                for a in list {
                    if let Some(old) = s.partitions.remove(&a.partition) {
                        old.stop(Some("reassigned".into()));
                    }
                    let args = PartitionArgs {
                        topic: a.topic,
                        partition: a.partition,
                        queue: a.queue,
                        consumer: consumer.clone(),
                        pipeline: s.pipeline.clone(),
                        spec: s.spec.clone(),
                        stats: s.stats.partition(a.partition),
                    };
                    let (sup, _) =
                        Actor::spawn_linked(None, PartitionSupervisor, args, me.get_cell()).await?;
                    s.partitions.insert(a.partition, sup);
                }
            }
            CoordinatorMsg::Revoke {
                partitions,
                lost,
                reply,
            } => {
                let sups: Vec<_> = partitions
                    .iter()
                    .filter_map(|(_, p)| s.partitions.remove(p))
                    .collect();
                let deadline = if lost {
                    Duration::ZERO
                } else {
                    s.spec.drain_timeout
                };
                // Drain off the coordinator's mailbox so it keeps serving (e.g. stray messages).
                s.revoking.retain(|h| !h.is_finished());
                s.revoking.push(tokio::spawn(async move {
                    let reports = drain_all(sups, deadline).await;
                    let offsets = reports
                        .into_iter()
                        .filter_map(|r| {
                            r.next_offset.map(|n| DrainedOffset {
                                topic: r.topic,
                                partition: r.partition,
                                next_offset: n,
                            })
                        })
                        .collect();
                    let _ = reply.send(offsets);
                }));
                for (_, p) in &partitions {
                    s.stats.remove_partition(*p);
                }
            }
            CoordinatorMsg::Stray(m) => {
                // Not ours (any more): not committed, so its owner receives it.
                if let Some(sup) = s.partitions.get(&m.partition) {
                    let _ = sup.cast(PartitionMsg::Deliver(m));
                }
            }
            CoordinatorMsg::Shutdown(reply) => {
                let report = shutdown(s).await;
                let _ = reply.send(report);
                me.stop(None);
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
                .find(|(_, a)| a.get_id() == cell.get_id())
                .map(|(p, _)| *p);
            if let Some(p) = partition {
                s.partitions.remove(&p);
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
        if s.poll_thread.is_some() {
            // Stopped without a Shutdown (e.g. the runtime is dropped): still leave the group.
            stop_consumer(s).await;
        }
        Ok(())
    }
}

async fn drain_all(sups: Vec<ActorRef<PartitionMsg>>, deadline: Duration) -> Vec<DrainReport> {
    let calls = sups.iter().map(|sup| {
        sup.call(
            |reply| PartitionMsg::Drain { deadline, reply },
            Some(deadline + Duration::from_secs(1)),
        )
    });
    let mut reports = Vec::new();
    for r in futures::future::join_all(calls).await {
        match r {
            Ok(ractor::rpc::CallResult::Success(report)) => reports.push(report),
            Ok(_) => warn!("a partition did not answer its drain in time"),
            Err(e) => warn!(error = %e, "a partition could not be drained"),
        }
    }
    // Wait until the supervisors are gone, so their queues are released before the unassign.
    for sup in sups {
        let _ = tokio::time::timeout(Duration::from_secs(2), wait_stopped(&sup)).await;
    }
    reports
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
    let sups: Vec<_> = s.partitions.drain().map(|(_, a)| a).collect();
    info!(pipeline = %s.spec.name, partitions = sups.len(), "shutting down: draining");
    let reports = drain_all(sups, s.spec.drain_timeout).await;
    // Revokes that began before the shutdown end by their own (earlier) deadline; their
    // rendezvous commits before the consumer closes.
    for h in s.revoking.drain(..) {
        let _ = h.await;
    }
    let mut final_offsets = Vec::new();
    for r in reports {
        if let Some(n) = r.next_offset {
            final_offsets.push((r.topic.clone(), r.partition, n));
            report.committed.push((r.partition, n));
        }
        report
            .abandoned
            .extend(r.abandoned.into_iter().map(|a| (r.partition, a)));
        s.stats.remove_partition(r.partition);
    }
    if let Some(consumer) = s.consumer.clone() {
        let offsets = final_offsets.clone();
        let res = tokio::task::spawn_blocking(move || {
            let o: Vec<(&str, i32, i64)> = offsets.iter().map(|(t, p, n)| (&**t, *p, *n)).collect();
            offsets::commit(&consumer, &o, CommitMode::Sync)
        })
        .await;
        match res {
            Ok(Ok(())) => {
                info!(pipeline = %s.spec.name, offsets = ?report.committed, "final commit done")
            }
            Ok(Err(e)) => report.commit_error = Some(e.to_string()),
            Err(e) => report.commit_error = Some(e.to_string()),
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
    if let Some(t) = s.poll_thread.take() {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    info!(pipeline = %s.spec.name, "left the group");
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
                        let _ = coordinator
                            .cast(CoordinatorMsg::Stray(Message::from_borrowed(&m, &topic)));
                    }
                    Some(Err(e)) => warn!(pipeline = %name, error = %e, "consumer error"),
                    None => {}
                }
            }
            consumer.unsubscribe();
            // Dropping the last reference closes the consumer (LeaveGroup), polling as it goes.
            drop(consumer);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
