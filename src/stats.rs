//! Live counters shared between the actors and whoever watches them (the demo's progress line,
//! tests, `/health` and `/debug`). Plain relaxed atomics: one uncontended add per event. The
//! Prometheus handles ride along (`metrics`), so events counted here are exported too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use ractor::ActorRef;

use crate::actors::partition::PartitionMsg;
use crate::metrics::{PartitionMetrics, PipelineMetrics};

#[derive(Debug, Default)]
pub struct PipelineStats {
    pub name: String,
    pub processed: AtomicU64,
    pub filtered: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retries: AtomicU64,
    pub worker_restarts: AtomicU64,
    pub assigns: AtomicU64,
    pub revokes: AtomicU64,
    pub lost: AtomicU64,
    pub commits_ok: AtomicU64,
    pub commits_failed: AtomicU64,
    /// The input topic (a metric label).
    pub topic: String,
    /// Prometheus handles (no-ops unless a recorder is installed).
    pub metrics: PipelineMetrics,
    /// Wall-clock milliseconds of the poll loop's last turn (liveness).
    pub poll_heartbeat_ms: AtomicU64,
    /// While the poll thread waits in a revoke rendezvous: the wall-clock milliseconds until
    /// which it may (0: not waiting). Liveness accepts a silent poll loop until then.
    pub rendezvous_until_ms: AtomicU64,
    /// Set by [`crate::runtime::Runtime::new`] until this pipeline's coordinator has reached
    /// its brokers and subscribed: `/health` serves during the startup wait and says so.
    pub starting: AtomicBool,
    /// Wall-clock milliseconds since when no broker is reachable (0: reachable).
    pub brokers_down_since_ms: AtomicU64,
    /// The last error the Kafka client reported (secrets redacted): the cause given by
    /// readiness and by a failed start. Written on client errors only, never per message.
    pub last_client_error: Mutex<Option<ClientError>>,
    /// Per assigned partition; entries come and go with the assignment.
    partitions: Mutex<BTreeMap<i32, Arc<PartitionStats>>>,
    /// `[state]`: the per-key state store (readiness while restoring, `/debug/state`).
    pub state: OnceLock<Arc<crate::state::Store>>,
    /// librdkafka's prefetch per partition, as the consumer was made (bytes; 0 before it is
    /// sized), against which its statistics are checked (see `KeyflowContext::stats_raw`).
    pub prefetch_per_partition: AtomicU64,
    /// The pipeline's fetch turns (`memory::turns`), for `/metrics`.
    pub turns: OnceLock<Arc<crate::memory::FetchTurns>>,
    /// When the last "prefetch over its budget" warning was logged.
    pub prefetch_warned: Mutex<Option<std::time::Instant>>,
}

#[derive(Debug, Default)]
pub struct PartitionStats {
    pub in_flight: AtomicUsize,
    pub buffered_bytes: AtomicUsize,
    /// Worker actors alive in the partition's pool, as of the last tick.
    pub workers: AtomicUsize,
    pub paused: AtomicBool,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    /// The most messages ever buffered or running at once (must stay ≤ max_in_flight).
    pub in_flight_high_water: AtomicUsize,
    /// Next offset to consume, as last acknowledged by the broker (-1 before the first commit).
    pub committed: AtomicI64,
    pub processed: AtomicU64,
    /// High watermark minus the commit point, as of the last tick.
    pub lag: AtomicI64,
    /// Flagged by the stuck-partition watchdog (lag > 0, nothing completed for `stuck_after`).
    pub stuck: AtomicBool,
    pub metrics: PartitionMetrics,
    /// The partition's supervisor, asked for `/debug/partitions`.
    pub actor: OnceLock<ActorRef<PartitionMsg>>,
}

/// A Kafka client error, as reported through the client context.
#[derive(Debug, Clone)]
pub struct ClientError {
    /// librdkafka's reason, secrets redacted.
    pub reason: String,
    /// Authentication or TLS certificate failures: configuration, not an outage; retrying at
    /// start does not help.
    pub fatal_at_start: bool,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub processed: u64,
    pub filtered: u64,
    pub dead_lettered: u64,
    pub retries: u64,
    pub worker_restarts: u64,
    pub rebalances: u64,
    pub commits_ok: u64,
    pub commits_failed: u64,
    pub partitions: Vec<PartitionSnapshot>,
}

#[derive(Debug, Clone, Default)]
pub struct PartitionSnapshot {
    pub partition: i32,
    pub in_flight: usize,
    pub buffered_bytes: usize,
    pub paused: bool,
    pub pauses: u64,
    pub resumes: u64,
    pub in_flight_high_water: usize,
    pub committed: i64,
    pub processed: u64,
}

impl PipelineStats {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(PipelineStats {
            name: name.to_string(),
            ..Default::default()
        })
    }

    /// Stats with Prometheus handles labelled by pipeline and topic.
    pub fn with_topic(name: &str, topic: &str) -> Arc<Self> {
        Arc::new(PipelineStats {
            name: name.to_string(),
            topic: topic.to_string(),
            metrics: PipelineMetrics::new(name, topic),
            ..Default::default()
        })
    }

    pub fn poll_heartbeat(&self) {
        self.poll_heartbeat_ms.store(now_ms(), Relaxed);
    }

    /// Milliseconds since the poll loop last turned (`None` before its first turn).
    pub fn since_poll_ms(&self) -> Option<u64> {
        match self.poll_heartbeat_ms.load(Relaxed) {
            0 => None,
            t => Some(now_ms().saturating_sub(t)),
        }
    }

    /// Marks the poll thread as waiting in a revoke rendezvous until `until_ms` (wall clock);
    /// the returned guard clears the mark when dropped, however the wait ends.
    pub fn rendezvous(&self, until_ms: u64) -> RendezvousGuard<'_> {
        self.rendezvous_until_ms.store(until_ms, Relaxed);
        RendezvousGuard(self)
    }

    /// How long the current revoke rendezvous may still last (`None`: not in one, or past its
    /// deadline).
    pub fn rendezvous_left_ms(&self) -> Option<u64> {
        match self.rendezvous_until_ms.load(Relaxed) {
            0 => None,
            until => until.checked_sub(now_ms()),
        }
    }

    /// No broker is reachable (librdkafka's "all brokers down", or no broker up in its
    /// statistics). Keeps the earliest time.
    pub fn brokers_down(&self) {
        let _ = self
            .brokers_down_since_ms
            .compare_exchange(0, now_ms(), Relaxed, Relaxed);
    }

    /// A broker is reachable again.
    pub fn brokers_up(&self) {
        self.brokers_down_since_ms.store(0, Relaxed);
    }

    /// How long no broker has been reachable (`None`: reachable).
    pub fn brokers_unreachable_for(&self) -> Option<std::time::Duration> {
        match self.brokers_down_since_ms.load(Relaxed) {
            0 => None,
            since => Some(std::time::Duration::from_millis(
                now_ms().saturating_sub(since),
            )),
        }
    }

    pub fn set_client_error(&self, e: ClientError) {
        *self.last_client_error.lock().unwrap() = Some(e);
    }

    pub fn clear_client_error(&self) {
        *self.last_client_error.lock().unwrap() = None;
    }

    pub fn client_error(&self) -> Option<ClientError> {
        self.last_client_error.lock().unwrap().clone()
    }

    /// Every assigned partition's stats.
    pub fn partitions(&self) -> Vec<(i32, Arc<PartitionStats>)> {
        let map = self.partitions.lock().unwrap();
        map.iter().map(|(p, s)| (*p, s.clone())).collect()
    }

    pub fn rebalance(&self, kind: &str) {
        match kind {
            "assign" => &self.metrics.rebalance_assign,
            "lost" => &self.metrics.rebalance_lost,
            _ => &self.metrics.rebalance_revoke,
        }
        .increment(1);
        match kind {
            "assign" => &self.assigns,
            "lost" => &self.lost,
            _ => &self.revokes,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn commit(&self, ok: bool) {
        if ok {
            &self.metrics.commits_ok
        } else {
            &self.metrics.commits_failed
        }
        .increment(1);
        if ok {
            &self.commits_ok
        } else {
            &self.commits_failed
        }
        .fetch_add(1, Relaxed);
    }

    /// A commit the broker answered (the client context's commit callback): records the
    /// acknowledged offsets. Per commit, not per message.
    pub fn commit_answered(&self, ok: bool, offsets: &[(i32, i64)]) {
        self.commit(ok);
        let map = self.partitions.lock().unwrap();
        if !ok {
            return;
        }
        for &(partition, next) in offsets {
            let Some(p) = map.get(&partition) else {
                continue;
            };
            // Answers of commits sent earlier may arrive later: never move back.
            if p.committed.fetch_max(next, Relaxed) < next {
                p.metrics.committed.set(next as f64);
            }
        }
    }

    pub fn partition(&self, partition: i32) -> Arc<PartitionStats> {
        let p = Arc::new(PartitionStats {
            committed: AtomicI64::new(-1),
            metrics: self.metrics.partition(partition),
            ..Default::default()
        });
        let mut map = self.partitions.lock().unwrap();
        map.insert(partition, p.clone());
        self.metrics.assigned.set(map.len() as f64);
        p
    }

    pub fn remove_partition(&self, partition: i32) {
        let mut map = self.partitions.lock().unwrap();
        if let Some(p) = map.remove(&partition) {
            // A partition that is no longer ours is neither lagging, paused nor stuck here.
            for g in [
                &p.metrics.lag_messages,
                &p.metrics.lag_seconds,
                &p.metrics.in_flight,
                &p.metrics.buffered_bytes,
                &p.metrics.paused,
                &p.metrics.stuck,
            ] {
                g.set(0.0);
            }
        }
        self.metrics.assigned.set(map.len() as f64);
    }

    pub fn snapshot(&self) -> Snapshot {
        let partitions = self
            .partitions
            .lock()
            .unwrap()
            .iter()
            .map(|(&partition, p)| PartitionSnapshot {
                partition,
                in_flight: p.in_flight.load(Relaxed),
                buffered_bytes: p.buffered_bytes.load(Relaxed),
                paused: p.paused.load(Relaxed),
                pauses: p.pauses.load(Relaxed),
                resumes: p.resumes.load(Relaxed),
                in_flight_high_water: p.in_flight_high_water.load(Relaxed),
                committed: p.committed.load(Relaxed),
                processed: p.processed.load(Relaxed),
            })
            .collect();
        Snapshot {
            processed: self.processed.load(Relaxed),
            filtered: self.filtered.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            retries: self.retries.load(Relaxed),
            worker_restarts: self.worker_restarts.load(Relaxed),
            rebalances: self.assigns.load(Relaxed)
                + self.revokes.load(Relaxed)
                + self.lost.load(Relaxed),
            commits_ok: self.commits_ok.load(Relaxed),
            commits_failed: self.commits_failed.load(Relaxed),
            partitions,
        }
    }
}

/// Clears [`PipelineStats::rendezvous_until_ms`] on drop.
#[derive(Debug)]
pub struct RendezvousGuard<'a>(&'a PipelineStats);

impl Drop for RendezvousGuard<'_> {
    fn drop(&mut self) {
        self.0.rendezvous_until_ms.store(0, Relaxed);
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
