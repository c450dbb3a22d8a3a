//! What a partition tells operators: lag (messages and seconds), the gauges and the
//! stuck-partition watchdog every tick, and the `/debug/partitions` report.

use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;
use tracing::warn;

use super::path::now_ms;
use super::PartitionState;
use crate::introspect::{show_key, InFlightDebug, PartitionDebug, WaitingKey, BACKING_OFF};
use crate::kafka::Consumer;
use crate::message::Message;

/// The oldest incomplete message: the lowest offset among those running (alone or in a batch),
/// waiting out a retry backoff, or ready and waiting for a worker (or in the open batch). A
/// message parked behind its key always sits behind one of those with a lower offset, so it is
/// never the oldest. Called per tick and per `/debug` request, not per message.
fn oldest_incomplete(s: &PartitionState) -> Option<&Arc<Message>> {
    let batch = s.batch.as_ref();
    s.workers
        .iter()
        .filter_map(|w| w.running.as_ref())
        .chain(s.backoffs.iter().map(|(m, _, _)| m))
        .chain(s.ready.iter().map(|(m, _)| m))
        .chain(batch.into_iter().flat_map(|b| b.running_messages()))
        .chain(batch.into_iter().flat_map(|b| b.open_messages()))
        .min_by_key(|m| m.offset)
}

/// How often at most the broker is asked for a partition's end (one request in flight at most).
const BROKER_END_EVERY: Duration = Duration::from_secs(5);
/// librdkafka's cached watermark is stale once unchanged for this many commit intervals while
/// nothing is in flight: a paused or silently non-fetching partition keeps the value of its last
/// fetch response for ever.
const STALE_TICKS: u32 = 3;

/// What the broker says about a partition, asked off the actor's thread (`fetch_watermarks`
/// and `committed_offsets` block on a round trip) when librdkafka's cached high watermark cannot
/// be trusted: never fetched since the assignment (unknown), or unchanged for
/// [`STALE_TICKS`] commit intervals with nothing in flight (a partition that stopped fetching
/// looks exactly like an idle one from the cache). Without it such a partition read lag 0, and
/// neither the watchdog nor readiness saw it.
#[derive(Default)]
pub(super) struct BrokerEnd {
    answer: Arc<BrokerAnswer>,
    /// When the last request was sent.
    asked: Option<Instant>,
    /// The cached watermark as of the last tick, and since when it has had that value.
    cached: Option<(i64, Instant)>,
}

struct BrokerAnswer {
    in_flight: AtomicBool,
    /// The partition's high watermark on the broker (-1: not known yet).
    high: AtomicI64,
    /// Where the group resumes a partition it has received nothing of: the committed offset, or
    /// per `auto_offset_reset` (-1: not known yet).
    start: AtomicI64,
}

impl Default for BrokerAnswer {
    fn default() -> Self {
        BrokerAnswer {
            in_flight: AtomicBool::new(false),
            high: AtomicI64::new(-1),
            start: AtomicI64::new(-1),
        }
    }
}

/// Clears `in_flight` however the request ends (done, panicked, or never run).
struct InFlight(Arc<BrokerAnswer>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.store(false, Release);
    }
}

impl BrokerEnd {
    /// Sends one request on the blocking pool unless one is in flight or the last was sent less
    /// than [`BROKER_END_EVERY`] ago. Called from a tick, never per message.
    fn ask(
        &mut self,
        consumer: &Arc<Consumer>,
        topic: &Arc<str>,
        partition: i32,
        reset: crate::config::OffsetReset,
        want_start: bool,
    ) {
        let now = Instant::now();
        if self
            .asked
            .is_some_and(|t| now.duration_since(t) < BROKER_END_EVERY)
            || self.answer.in_flight.swap(true, AcqRel)
        {
            return;
        }
        self.asked = Some(now);
        let guard = InFlight(self.answer.clone());
        let (consumer, topic) = (consumer.clone(), topic.clone());
        // Detached: the answer lands in `self.answer`, read by a later tick.
        drop(tokio::task::spawn_blocking(move || {
            let answer = &guard.0;
            let Ok((low, high)) = consumer.fetch_watermarks(&topic, partition, BROKER_END_EVERY)
            else {
                return;
            };
            answer.high.store(high, Relaxed);
            if want_start {
                let mut tpl = TopicPartitionList::with_capacity(1);
                tpl.add_partition(&topic, partition);
                let committed = consumer
                    .committed_offsets(tpl, BROKER_END_EVERY)
                    .ok()
                    .and_then(|t| t.find_partition(&topic, partition)?.offset().to_raw())
                    .filter(|o| *o >= 0);
                let start = committed.unwrap_or(match reset {
                    crate::config::OffsetReset::Earliest => low,
                    crate::config::OffsetReset::Latest => high,
                });
                answer.start.store(start, Relaxed);
            }
        }));
    }

    pub(super) fn high(&self) -> Option<i64> {
        Some(self.answer.high.load(Relaxed)).filter(|h| *h >= 0)
    }

    pub(super) fn start(&self) -> Option<i64> {
        Some(self.answer.start.load(Relaxed)).filter(|o| *o >= 0)
    }
}

/// Every tick: lag in messages and seconds, gauges, and the stuck-partition watchdog.
pub(super) fn observe(s: &mut PartitionState) {
    let committed = s.stats.committed.load(Relaxed);
    let next = s
        .tracker
        .committable()
        .or((committed >= 0).then_some(committed));
    let now = Instant::now();
    // librdkafka's cached high watermark (from fetch responses): no broker round trip. When it
    // is unknown or stale, the broker is asked off this thread (see `BrokerEnd`).
    let cached = crate::kafka::client::cached_high_watermark(&s.consumer, &s.topic, s.partition);
    s.broker_end.cached = match (cached, s.broker_end.cached) {
        (Some(h), Some((was, since))) if h == was => Some((h, since)),
        (Some(h), _) => Some((h, now)),
        (None, _) => None,
    };
    let stale_after = s.spec.commit_interval * STALE_TICKS;
    let stale = match s.broker_end.cached {
        None => true,
        Some((_, since)) => s.flow.count() == 0 && now.duration_since(since) >= stale_after,
    };
    if stale || next.is_none() {
        s.broker_end.ask(
            &s.consumer,
            &s.topic,
            s.partition,
            s.spec.auto_offset_reset,
            next.is_none(),
        );
    }
    let high = cached.max(s.broker_end.high());
    let lag = match (high, next.or_else(|| s.broker_end.start())) {
        (Some(high), Some(n)) => (high - n).max(0),
        _ => 0,
    };
    let m = &s.stats.metrics;
    let oldest = oldest_incomplete(s);
    let oldest_received = oldest.map(|o| o.received);
    let lag_seconds = oldest.map_or(0.0, |o| match o.timestamp_ms {
        Some(ts) if ts > 0 => (now_ms() - ts).max(0) as f64 / 1000.0,
        _ => o.received.elapsed().as_secs_f64(),
    });
    let pending = lag > 0 || s.flow.count() > 0;
    if !pending {
        s.last_progress = now;
    }
    // Work became pending at the last idle tick at the earliest, but no earlier than the oldest
    // incomplete message arrived: a message is never called stuck before it has waited
    // `stuck_after` itself (ticks are `commit_interval` apart).
    let waiting_since = oldest_received.map_or(s.last_progress, |r| r.max(s.last_progress));
    let stuck_after = crate::metrics::stuck_after();
    let idle = pending && now.duration_since(waiting_since) > stuck_after;
    // A hung key among flowing keys: the others complete, so the partition looks alive, but one
    // message has run for `stuck_after` while more of its key wait (in memory or in the
    // overflow file) and it holds the commit point. O(workers) per tick.
    let hung = s
        .workers
        .iter()
        .filter_map(|w| w.running.as_ref().map(|m| (m, w.started)))
        .find(|(m, started)| {
            now.duration_since(*started) > stuck_after
                && m.key
                    .as_ref()
                    .is_some_and(|k| s.overflow.holds(k) || s.scheduler.queued(k) > 0)
        });
    let stuck = idle || hung.is_some();
    if stuck && !s.stats.stuck.load(Relaxed) {
        match hung.filter(|_| !idle) {
            Some((m, started)) => {
                warn!(topic = %s.topic, partition = s.partition, offset = m.offset, key = %m.key.as_deref().map(show_key).unwrap_or_default(), running = ?now.duration_since(started), waiting = s.scheduler.queued(m.key.as_ref().unwrap_or(&bytes::Bytes::new())), in_overflow = s.overflow.len(), "partition stuck: one key's message has run for stuck_after while more of the key wait")
            }
            None => {
                warn!(topic = %s.topic, partition = s.partition, lag, in_flight = s.flow.count(), since_progress = ?now.duration_since(waiting_since), "partition stuck: nothing completed")
            }
        }
    }
    s.stats.stuck.store(stuck, Relaxed);
    s.stats.lag.store(lag, Relaxed);
    m.lag_messages.set(lag as f64);
    m.lag_seconds.set(lag_seconds);
    m.in_flight.set(s.flow.count() as f64);
    m.buffered_bytes.set(s.flow.bytes() as f64);
    m.stuck.set(if stuck { 1.0 } else { 0.0 });
}

/// `/debug/partitions` for this partition.
pub(super) fn inspect(s: &PartitionState) -> PartitionDebug {
    let now = Instant::now();
    let running_key = |key: &bytes::Bytes| {
        s.workers
            .iter()
            .filter_map(|w| w.running.as_ref().map(|m| (m, w)))
            .find(|(m, _)| m.key.as_ref() == Some(key))
    };
    let waiting_keys = s
        .scheduler
        .waiting_keys()
        .map(|(k, waiting)| {
            let blocker = running_key(k);
            let backoff = s.backoffs.iter().find(|(m, _, _)| m.key.as_ref() == Some(k));
            let running_seconds = blocker
                .map(|(_, w)| now.duration_since(w.started).as_secs_f64())
                .or(backoff.map(|(_, _, since)| now.duration_since(*since).as_secs_f64()));
            let reason = match blocker {
                None => match backoff {
                    Some((m, attempt, since)) => format!(
                        "retry backoff: offset {} failed, attempt {attempt} waits ({:.1}s so far)",
                        m.offset,
                        now.duration_since(*since).as_secs_f64()
                    ),
                    None => "behind the running message of the key".to_string(),
                },
                Some((m, w)) => {
                    let p = w.progress.load(Relaxed);
                    let (attempt, backing_off) = (p & !BACKING_OFF, p & BACKING_OFF != 0);
                    let r = running_seconds.unwrap_or_default();
                    if backing_off {
                        format!("retry backoff: offset {} failed, attempt {attempt} waits (running {r:.1}s)", m.offset)
                    } else if attempt > 1 {
                        format!("retrying: offset {} on attempt {attempt} (running {r:.1}s)", m.offset)
                    } else {
                        format!("slow processor: offset {} running {r:.1}s", m.offset)
                    }
                }
            };
            WaitingKey {
                key: show_key(k),
                waiting,
                reason,
                blocked_by_offset: blocker
                    .map(|(m, _)| m.offset)
                    .or(backoff.map(|(m, _, _)| m.offset)),
                running_seconds,
            }
        })
        .collect();
    PartitionDebug {
        partition: s.partition,
        in_flight: s.flow.count(),
        running: s.running,
        workers: s.live_workers,
        worker_cap: crate::memory::PipelineMemory::worker_cap(
            s.pipeline.memory.partition_cap(),
            s.spec.max_workers,
        ),
        buffered_bytes: s.flow.bytes(),
        paused: s.stats.paused.load(Relaxed),
        stuck: s.stats.stuck.load(Relaxed),
        lag_messages: s.stats.lag.load(Relaxed),
        commit_point: s.tracker.committable(),
        oldest_in_flight: oldest_incomplete(s).map(|m| InFlightDebug {
            offset: m.offset,
            key: m.key.as_deref().map(show_key),
            age_seconds: m.received.elapsed().as_secs_f64(),
        }),
        since_last_completion_seconds: s
            .last_completion
            .map(|t| now.duration_since(t).as_secs_f64()),
        waiting_keys,
        overflow_messages: s.overflow.len(),
        overflow_disk_bytes: s.overflow.disk_bytes(),
        overflow_keys: {
            let mut keys: Vec<(String, usize)> =
                s.overflow.keys().map(|(k, n)| (show_key(k), n)).collect();
            keys.sort_unstable_by(|a, b| b.1.cmp(&a.1));
            keys.truncate(10);
            keys
        },
        error: None,
    }
}
