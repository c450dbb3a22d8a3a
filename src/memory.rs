//! One memory budget for the messages of the whole process (`memory_limit` in the global file).
//!
//! What it bounds: every message keyflow holds, wherever it is — librdkafka's prefetch of each
//! partition queue, messages taken off a queue and waiting for their key or a worker, running
//! messages, and messages waiting out a retry backoff. What it does not bound: the process
//! itself (code, runtime, client buffers, metrics: ~20–40 MiB), a processor's own memory (an
//! `http` connection pool) or what a custom processor allocates.
//!
//! How it is split:
//! - equally between pipelines;
//! - within a pipeline, half for librdkafka's prefetch and half for keyflow's own buffers;
//! - the prefetch half over the input topic's partitions (all of them: a member may be given
//!   every partition, and librdkafka's prefetch settings are fixed when the consumer is made),
//!   and never more than [`PREFETCH_USEFUL`] in all: prefetch only covers fetch round trips,
//!   keyflow's buffers hold the backlog it works on;
//! - keyflow's half over the partitions assigned now, re-split on every assignment change
//!   (each supervisor reads its share when it fetches), within `max_buffered_bytes`.
//!
//! librdkafka's prefetch is bounded per partition queue by `queued.max.messages.kbytes`
//! (payload bytes), `queued.min.messages` (a count: small messages cost more than their
//! payload) and `max.partition.fetch.bytes` (one fetch response may overshoot the first two by
//! that much), and per fetch response by `fetch.max.bytes`; [`Prefetch`] derives all four from
//! the share. Pausing a partition drops its
//! prefetch, and the refetch after a resume costs ~0.5 s, so sizing the prefetch, not pausing,
//! is what keeps memory bounded; a pause stays the last resort of flow control. Except where
//! sizing cannot reach: librdkafka reads whole record batches, so a partition that fetches holds
//! at least one, and when one batch per partition would overrun the prefetch share, the
//! partitions take turns to fetch ([`turns`]), paused between turns with an empty queue.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

pub mod turns;
pub use turns::{FetchTurns, Turn, TurnTicket, Wake};

/// Without `memory_limit` and without a container limit.
pub const DEFAULT_LIMIT: u64 = 256 << 20;
/// Part of a container's memory limit (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`)
/// that `memory_limit` defaults to: the rest is the process itself, the allocator's slack and
/// the processors' own memory.
pub const CGROUP_SHARE: f64 = 0.5;
/// The smallest `memory_limit` accepted.
pub const MIN_LIMIT: u64 = 16 << 20;
/// More prefetch than this per pipeline buys no throughput: at 300 MB/s it covers a 100 ms
/// fetch round trip. The rest of the pipeline's prefetch half is left unused, so that peak
/// memory does not grow with the number of partitions.
pub const PREFETCH_USEFUL: u64 = 32 << 20;
/// A partition's prefetch never goes below this, so that it can fetch at all (a topic with
/// more partitions than `prefetch share / 64 KiB` exceeds the prefetch half by that floor).
pub const MIN_PREFETCH: u64 = 64 << 10;
/// Bytes a queued message costs librdkafka beyond its payload (its op and message structs, and
/// its share of the fetch buffer it pins): `queued.min.messages` is derived with it, so that a
/// queue of small messages stays within the share too. Measured: with 90-byte messages on 8
/// partitions, queues of 16,384 messages each (derived with 256) peaked ~50 MiB higher than
/// queues of 4,096, ~510 bytes per queued message (BENCHMARKS.md, "After the hot path").
pub const QUEUED_MESSAGE_COST: u64 = 512;
/// What a queued message costs librdkafka beyond its payload: its op (304 bytes, measured with
/// heaptrack) and the allocator's overhead. The rest of its fetch buffer (record framing, the
/// key) is not counted: [`QUEUED_MESSAGE_COST`], which sizes the queues, includes it.
pub const QUEUED_OP_COST: u64 = 320;
/// What one fetch of a partition is divided by, against the half of its prefetch share a fetch
/// may add (see [`Prefetch::partition_fetch_bytes`]): small records cost librdkafka several
/// times their wire size.
pub const FETCH_EXPANSION: u64 = 2;
/// What a worker actor costs while it exists (its task, mailboxes and ractor cell; ~10 KiB
/// measured with massif, ~12 KiB per worker seen as RSS with 8,192 workers). A partition's
/// workers share its buffer budget with its messages: the pool grows to at most half the
/// partition's share, the messages get what the workers leave.
pub const WORKER_COST: u64 = 12 << 10;
/// Part of a `[state]` pipeline's share that its per-key state may hold in memory by default
/// (`[state] memory` sets it).
pub const STATE_SHARE: f64 = 0.5;
/// Assumed when the input topic does not exist yet at start (the consumer waits for it).
pub const UNKNOWN_TOPIC_PARTITIONS: usize = 64;

/// Where the limit came from, for the start log and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    Configured,
    /// Half of the container's limit (the value in bytes).
    Container(u64),
    Default,
}

/// `memory_limit` as configured, else derived from the container's limit, else
/// [`DEFAULT_LIMIT`].
pub fn resolve_limit(configured: Option<u64>) -> (u64, LimitSource) {
    if let Some(l) = configured {
        return (l, LimitSource::Configured);
    }
    match container_limit() {
        Some(c) => (
            ((c as f64 * CGROUP_SHARE) as u64).max(MIN_LIMIT),
            LimitSource::Container(c),
        ),
        None => (DEFAULT_LIMIT, LimitSource::Default),
    }
}

/// The cgroup memory limit of this process, if it has one (v2, then v1).
pub fn container_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    container_limit_at(Path::new("/sys/fs/cgroup"), &own)
}

/// The tightest memory limit on the path of this process's cgroup (from `/proc/self/cgroup`,
/// `own`) under the cgroup mount `root`, up to the mount itself: the process's own cgroup when
/// the mount shows the whole hierarchy (systemd's `MemoryMax=`, `--cgroupns=host`, Nomad), the
/// mount root when it is a namespace's (a container, where `own` reads `0::/`). A parent's limit
/// binds its children, so the smallest one found counts. cgroup v2 first, then v1's `memory`
/// controller.
fn container_limit_at(root: &Path, own: &str) -> Option<u64> {
    let v2_path = own.lines().find_map(|l| l.strip_prefix("0::"));
    let v1_path = own.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    });
    let tightest = |mount: &Path, path: &str, file: &str| {
        let mut dir = mount.join(path.trim().trim_start_matches('/'));
        let mut best: Option<u64> = None;
        loop {
            if let Some(l) = std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|t| parse_cgroup_limit(&t))
            {
                best = Some(best.map_or(l, |b| b.min(l)));
            }
            if dir == mount || !dir.pop() || !dir.starts_with(mount) {
                return best;
            }
        }
    };
    let v2 = tightest(root, v2_path.unwrap_or("/"), "memory.max");
    v2.or_else(|| {
        tightest(
            &root.join("memory"),
            v1_path.unwrap_or("/"),
            "memory.limit_in_bytes",
        )
    })
}

/// `max` (v2) or a page-rounded `i64::MAX` (v1) mean no limit.
fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let n: u64 = text.trim().parse().ok()?;
    (n < 1 << 60).then_some(n)
}

/// librdkafka's per-partition prefetch settings for one pipeline's consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefetch {
    /// Payload bytes queued per partition (`queued.max.messages.kbytes` × 1024).
    pub bytes_per_partition: u64,
    /// Messages queued per partition (`queued.min.messages`).
    pub messages_per_partition: u64,
    /// One fetch response from one broker (`fetch.max.bytes`): one partition's prefetch.
    /// librdkafka keeps an uncompressed response's buffer until every message of it, on every
    /// partition it covers, has been taken off its queue: responses as large as the whole
    /// prefetch, each pinned by the slowest partition's last message, held ~200 MiB over a
    /// 32-partition backlog (`tests/memory_budget.rs`). librdkafka raises it to
    /// `message.max.bytes` (1 MB) if lower.
    pub fetch_max_bytes: u64,
}

impl Prefetch {
    /// `queued.max.messages.kbytes`: half the partition's prefetch. librdkafka fetches while the
    /// queue is below it, and a fetch adds up to `max.partition.fetch.bytes` (within the other
    /// half, see [`Prefetch::partition_fetch_bytes`]).
    pub fn kbytes(&self) -> u64 {
        (self.bytes_per_partition / 2 / 1024).clamp(1, 2_097_151)
    }

    /// `max.partition.fetch.bytes`: what one fetch may add to a queue at its threshold. A fetch
    /// is counted in wire bytes, but librdkafka turns each record into an op of ~300 bytes that
    /// points into the pinned response, so a fetch of ~100-byte records costs ~4× its size.
    /// Measured (heaptrack, cpu8, 90-byte values) with the whole other half per fetch: queues of
    /// ~24k messages each, 3× their `queued.min.messages`, 59 MB of ops and 34 MB of buffers
    /// against a 32 MiB prefetch. A quarter of the half ([`FETCH_EXPANSION`] = 4) cost cpu64
    /// ~40% more CPU per message in fetch requests; half of it (2) held cpu8's peak RSS at
    /// 73 MiB (from ~110) at no CPU cost (BENCHMARKS.md, "Batched reads").
    pub fn partition_fetch_bytes(&self) -> u64 {
        (self.bytes_per_partition / 2 / FETCH_EXPANSION).clamp(1024, i32::MAX as u64)
    }
}

/// One pipeline's part of the budget.
#[derive(Debug)]
pub struct PipelineMemory {
    /// This pipeline's part of `memory_limit`.
    pub share: u64,
    /// For librdkafka's prefetch (half of `share`).
    pub prefetch_share: u64,
    /// For messages taken off the queues (the other half).
    pub buffer_share: u64,
    max_buffered_bytes: u64,
    /// Partitions assigned to this pipeline now (the coordinator keeps it current).
    assigned: AtomicUsize,
    /// The prefetch the consumer was made with (bytes per partition), for `/metrics`.
    prefetch: AtomicU64,
    /// Bytes of `buffer_share` not granted to any partition (see [`Grant`]).
    free: AtomicU64,
    /// `[state]` pipelines: the part of `share` for per-key state in memory (0 otherwise);
    /// `prefetch_share` and `buffer_share` split the rest.
    pub state_share: u64,
    /// Which partitions may fetch when one record batch each would overrun `prefetch_share`.
    pub turns: Arc<FetchTurns>,
}

impl PipelineMemory {
    /// `limit` split over `pipelines`; `max_buffered_bytes` caps a partition's buffer share.
    pub fn new(limit: u64, pipelines: usize, max_buffered_bytes: u64) -> Self {
        let share = limit / pipelines.max(1) as u64;
        let prefetch_share = share / 2;
        PipelineMemory {
            share,
            prefetch_share,
            buffer_share: share - prefetch_share,
            max_buffered_bytes,
            assigned: AtomicUsize::new(0),
            prefetch: AtomicU64::new(0),
            free: AtomicU64::new(share - prefetch_share),
            state_share: 0,
            turns: Arc::new(FetchTurns::new(prefetch_share)),
        }
    }

    /// A `[state]` pipeline: `state` bytes of its share (default [`STATE_SHARE`] of it) hold
    /// per-key state in memory, beyond which it spills to disk (see [`crate::state`]); the
    /// messages split the rest as in any pipeline. Refuses a `state` that leaves the messages
    /// less than [`MIN_LIMIT`] / 2.
    pub fn with_state(self, state: Option<u64>) -> Result<Self, String> {
        let share = self.share;
        let state = state.unwrap_or((share as f64 * STATE_SHARE) as u64);
        let messages = share.saturating_sub(state);
        if messages < MIN_LIMIT / 2 {
            return Err(format!(
                "state.memory: {} of this pipeline's {} share of memory_limit leaves {} for its messages, expected at least {}: lower state.memory or raise memory_limit",
                bytesize::ByteSize(state),
                bytesize::ByteSize(share),
                bytesize::ByteSize(messages),
                bytesize::ByteSize(MIN_LIMIT / 2)
            ));
        }
        let prefetch_share = messages / 2;
        Ok(PipelineMemory {
            prefetch_share,
            buffer_share: messages - prefetch_share,
            free: AtomicU64::new(messages - prefetch_share),
            state_share: state,
            turns: Arc::new(FetchTurns::new(prefetch_share)),
            ..self
        })
    }

    /// Unbounded by a process budget: `max_buffered_bytes` alone (library use without a
    /// runtime, tests).
    pub fn unbounded(max_buffered_bytes: u64) -> Self {
        Self::new(u64::MAX / 4, 1, max_buffered_bytes)
    }

    /// The prefetch for a topic of `partitions` partitions (`None`: not known yet).
    pub fn prefetch_for(&self, partitions: Option<usize>) -> Prefetch {
        let n = partitions
            .filter(|n| *n > 0)
            .unwrap_or(UNKNOWN_TOPIC_PARTITIONS) as u64;
        let total = self.prefetch_share.min(PREFETCH_USEFUL);
        let bytes = (total / n).max(MIN_PREFETCH);
        Prefetch {
            bytes_per_partition: bytes,
            messages_per_partition: (bytes / QUEUED_MESSAGE_COST).max(16),
            fetch_max_bytes: bytes,
        }
    }

    pub fn set_prefetch(&self, p: Prefetch) {
        self.prefetch.store(p.bytes_per_partition, Relaxed);
    }

    /// Prefetch bytes per partition the consumer was made with (0 before).
    pub fn prefetch_per_partition(&self) -> u64 {
        self.prefetch.load(Relaxed)
    }

    pub fn set_assigned(&self, n: usize) {
        self.assigned.store(n, Relaxed);
        self.turns.set_assigned(n);
    }

    pub fn assigned(&self) -> usize {
        self.assigned.load(Relaxed)
    }

    /// Takes up to `want` bytes of the buffer share that no partition holds.
    fn take(&self, want: u64) -> u64 {
        let mut got = 0;
        let _ = self.free.fetch_update(Relaxed, Relaxed, |free| {
            got = free.min(want);
            Some(free - got)
        });
        got
    }

    fn give(&self, bytes: u64) {
        self.free.fetch_add(bytes, Relaxed);
    }

    /// Bytes of the buffer share granted to no partition (for tests and `/debug`).
    pub fn ungranted(&self) -> u64 {
        self.free.load(Relaxed)
    }

    /// What one assigned partition may hold in keyflow's buffers now: its part of the buffer
    /// share, within `max_buffered_bytes`. A load and a division: read per fetch, not per
    /// message.
    pub fn partition_cap(&self) -> u64 {
        let n = self.assigned().max(1) as u64;
        (self.buffer_share / n).min(self.max_buffered_bytes)
    }

    /// How many workers a partition may have with `cap` (its [`partition_cap`]), within
    /// `max_workers`: at least one.
    ///
    /// [`partition_cap`]: PipelineMemory::partition_cap
    pub fn worker_cap(cap: u64, max_workers: usize) -> usize {
        ((cap / 2 / WORKER_COST) as usize).clamp(1, max_workers.max(1))
    }

    /// What a partition's messages may take when it has `workers`: its cap less the workers'
    /// cost (at least [`MIN_PREFETCH`], so that a message can always be taken).
    pub fn message_cap(cap: u64, workers: usize) -> u64 {
        cap.saturating_sub(workers as u64 * WORKER_COST)
            .max(MIN_PREFETCH.min(cap))
    }

    /// The most this pipeline's messages can take with `assigned` of the topic's `partitions`:
    /// prefetch of every assigned partition plus the buffer caps (each may overshoot by one
    /// message, see `FlowControl`).
    pub fn bound(&self, prefetch: Prefetch, assigned: usize) -> u64 {
        let per_partition_prefetch = prefetch
            .bytes_per_partition
            .max(prefetch.messages_per_partition * QUEUED_MESSAGE_COST);
        assigned as u64 * per_partition_prefetch
            + (self.buffer_share / assigned.max(1) as u64).min(self.max_buffered_bytes)
                * assigned as u64
    }
}

/// A partition's part of its pipeline's buffer share, actually held: the static split
/// ([`PipelineMemory::partition_cap`]) says what a partition *may* hold, the grant what it was
/// *given*. When an assignment grows, the partitions kept hold more than their new cap until
/// their messages complete; a new partition gets only what they have given back, so the
/// partitions together never hold more than the share (review H2). Taken when a partition
/// fetches below its cap (no atomic while the grant covers the cap: not per message), given
/// back on ticks down to `max(cap, held)`, and all of it when the partition's state is dropped
/// (stopped, drained, failed: a `Drop`, so no path forgets it).
#[derive(Debug)]
pub struct Grant {
    memory: std::sync::Arc<PipelineMemory>,
    bytes: u64,
}

impl Grant {
    pub fn new(memory: std::sync::Arc<PipelineMemory>) -> Self {
        Grant { memory, bytes: 0 }
    }

    /// Tops the grant up towards `cap` from what no partition holds; returns what this partition
    /// may hold now: `min(cap, grant)`.
    pub fn budget(&mut self, cap: u64) -> u64 {
        if self.bytes < cap {
            self.bytes += self.memory.take(cap - self.bytes);
        }
        self.bytes.min(cap)
    }

    /// Gives back what exceeds both `cap` and what the partition holds (`held`).
    pub fn trim(&mut self, cap: u64, held: u64) {
        let keep = cap.max(held);
        if self.bytes > keep {
            self.memory.give(self.bytes - keep);
            self.bytes = keep;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.memory.give(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    /// Review H2: 16 partitions each hold their 4 MiB share of a 64 MiB buffer share; the
    /// assignment grows to 32 (caps 2 MiB). The 16 new partitions must not get 2 MiB each while
    /// the 16 kept still hold 4 MiB: together they would hold 96 MiB. They get what the kept
    /// ones give back as their messages complete, and everyone reaches the new cap.
    #[test]
    fn a_grown_assignment_never_grants_more_than_the_share() {
        let m = std::sync::Arc::new(PipelineMemory::new(128 * MIB, 1, 64 * MIB));
        m.set_assigned(16);
        let cap16 = m.partition_cap();
        let mut kept: Vec<(Grant, u64)> = (0..16)
            .map(|_| {
                let mut g = Grant::new(m.clone());
                let held = g.budget(cap16);
                (g, held)
            })
            .collect();
        assert!(kept.iter().all(|(_, held)| *held == 4 * MIB));
        m.set_assigned(32);
        let cap32 = m.partition_cap();
        let mut new: Vec<Grant> = (0..16).map(|_| Grant::new(m.clone())).collect();
        let granted = |kept: &[(Grant, u64)], new: &[Grant]| {
            kept.iter().map(|(g, _)| g.bytes()).sum::<u64>()
                + new.iter().map(Grant::bytes).sum::<u64>()
        };
        for g in &mut new {
            assert_eq!(
                g.budget(cap32),
                0,
                "nothing is free while the kept hold their old share"
            );
        }
        // The kept complete messages down to the new cap, giving back on their ticks.
        for step in 0..=4 {
            let held = 4 * MIB - step * MIB / 2;
            for (g, h) in &mut kept {
                *h = held;
                g.trim(cap32, held);
            }
            for g in &mut new {
                g.budget(cap32);
            }
            assert!(granted(&kept, &new) <= m.buffer_share, "step {step}");
        }
        assert!(new.iter().all(|g| g.bytes() == cap32));
        assert!(kept.iter().all(|(g, _)| g.bytes() == cap32));
        // Revoked or stopped: the grant comes back.
        drop(kept);
        drop(new);
        assert_eq!(m.ungranted(), m.buffer_share);
    }

    #[test]
    fn the_limit_follows_proc_self_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/k.service");
        std::fs::create_dir_all(&unit).unwrap();
        // v2 without a cgroup namespace: the mount root has no memory.max, the unit has one.
        std::fs::write(unit.join("memory.max"), "134217728\n").unwrap();
        std::fs::write(root.path().join("system.slice/memory.max"), "max\n").unwrap();
        assert_eq!(
            container_limit_at(root.path(), "0::/system.slice/k.service\n"),
            Some(128 * MIB)
        );
        // A parent's tighter limit binds the unit.
        std::fs::write(root.path().join("system.slice/memory.max"), "67108864\n").unwrap();
        assert_eq!(
            container_limit_at(root.path(), "0::/system.slice/k.service\n"),
            Some(64 * MIB)
        );
        // In a namespace the process sees `0::/` and the mount root's file.
        std::fs::write(root.path().join("memory.max"), "536870912\n").unwrap();
        assert_eq!(container_limit_at(root.path(), "0::/\n"), Some(512 * MIB));
        // cgroup v1's memory controller.
        let v1 = tempfile::tempdir().unwrap();
        let job = v1.path().join("memory/docker/abc");
        std::fs::create_dir_all(&job).unwrap();
        std::fs::write(job.join("memory.limit_in_bytes"), "268435456\n").unwrap();
        assert_eq!(
            container_limit_at(
                v1.path(),
                "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n"
            ),
            Some(256 * MIB)
        );
        // No limit anywhere.
        let none = tempfile::tempdir().unwrap();
        assert_eq!(container_limit_at(none.path(), "0::/user.slice\n"), None);
    }

    #[test]
    fn cgroup_limits_parse() {
        assert_eq!(parse_cgroup_limit("536870912\n"), Some(512 * MIB));
        assert_eq!(parse_cgroup_limit("max\n"), None);
        // cgroup v1 "no limit".
        assert_eq!(parse_cgroup_limit("9223372036854771712"), None);
        assert_eq!(parse_cgroup_limit(""), None);
    }

    #[test]
    fn configured_limit_wins() {
        assert_eq!(
            resolve_limit(Some(128 * MIB)),
            (128 * MIB, LimitSource::Configured)
        );
    }

    #[test]
    fn prefetch_total_does_not_grow_with_partitions() {
        let m = PipelineMemory::new(256 * MIB, 1, 64 * MIB);
        let p8 = m.prefetch_for(Some(8));
        let p64 = m.prefetch_for(Some(64));
        assert_eq!(p8.bytes_per_partition * 8, PREFETCH_USEFUL);
        assert_eq!(p64.bytes_per_partition * 64, PREFETCH_USEFUL);
        // A small limit: the prefetch half, not the useful amount, bounds it.
        let small = PipelineMemory::new(32 * MIB, 1, 64 * MIB);
        assert_eq!(
            small.prefetch_for(Some(32)).bytes_per_partition * 32,
            16 * MIB
        );
        // Unknown topic: the documented assumption.
        assert_eq!(
            m.prefetch_for(None),
            m.prefetch_for(Some(UNKNOWN_TOPIC_PARTITIONS))
        );
    }

    #[test]
    fn a_stateful_pipeline_gives_its_state_a_part_of_its_share() {
        let m = PipelineMemory::new(256 * MIB, 2, 64 * MIB)
            .with_state(None)
            .unwrap();
        assert_eq!(m.share, 128 * MIB);
        assert_eq!(m.state_share, 64 * MIB);
        assert_eq!(m.state_share + m.prefetch_share + m.buffer_share, m.share);
        assert_eq!(m.ungranted(), m.buffer_share);
        let m = PipelineMemory::new(256 * MIB, 1, 64 * MIB)
            .with_state(Some(200 * MIB))
            .unwrap();
        assert_eq!(m.prefetch_share + m.buffer_share, 56 * MIB);
        let err = PipelineMemory::new(256 * MIB, 1, 64 * MIB)
            .with_state(Some(250 * MIB))
            .unwrap_err();
        assert!(
            err.starts_with("state.memory:") && err.contains("lower state.memory"),
            "{err}"
        );
    }

    #[test]
    fn buffer_share_is_resplit_on_assignment() {
        let m = PipelineMemory::new(128 * MIB, 2, 64 * MIB);
        assert_eq!(m.share, 64 * MIB);
        m.set_assigned(4);
        assert_eq!(m.partition_cap(), 8 * MIB);
        m.set_assigned(32);
        assert_eq!(m.partition_cap(), MIB);
        // max_buffered_bytes stays a per-partition cap inside the budget.
        m.set_assigned(1);
        let capped = PipelineMemory::new(128 * MIB, 1, 4 * MIB);
        capped.set_assigned(1);
        assert_eq!(capped.partition_cap(), 4 * MIB);
    }

    proptest! {
        /// Whatever the limit, the pipelines and the assignment, the pipeline's prefetch plus
        /// its buffers stay within its share (above the per-partition floors).
        #[test]
        fn split_never_exceeds_the_share(
            limit_mib in 16u64..4096,
            pipelines in 1usize..8,
            partitions in 1usize..512,
            assigned_frac in 0.0f64..=1.0,
            max_buffered_mib in 1u64..128,
        ) {
            let m = PipelineMemory::new(limit_mib * MIB, pipelines, max_buffered_mib * MIB);
            let assigned = ((partitions as f64 * assigned_frac) as usize).max(1);
            m.set_assigned(assigned);
            let p = m.prefetch_for(Some(partitions));
            prop_assert!(p.bytes_per_partition >= MIN_PREFETCH);
            let floor_hit = m.prefetch_share.min(PREFETCH_USEFUL) / partitions as u64 <= MIN_PREFETCH;
            if !floor_hit {
                // The prefetch half, counted for every partition of the topic.
                prop_assert!(p.bytes_per_partition * partitions as u64 <= m.prefetch_share);
                prop_assert!(p.messages_per_partition * QUEUED_MESSAGE_COST * partitions as u64 <= m.prefetch_share);
                prop_assert!(m.bound(p, assigned) <= m.share);
            }
            prop_assert!(m.partition_cap() * assigned as u64 <= m.buffer_share);
            prop_assert!(m.partition_cap() <= max_buffered_mib * MIB);
            // Workers and messages of a partition share its cap.
            let cap = m.partition_cap();
            let workers = PipelineMemory::worker_cap(cap, 256);
            prop_assert!((1..=256).contains(&workers));
            if cap >= 2 * WORKER_COST {
                prop_assert!(workers as u64 * WORKER_COST <= cap / 2);
                prop_assert!(
                    workers as u64 * WORKER_COST + PipelineMemory::message_cap(cap, workers) <= cap.max(MIN_PREFETCH + workers as u64 * WORKER_COST)
                );
            }
        }
    }
}
