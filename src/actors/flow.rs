//! Flow control for one partition: a count and a byte budget over messages buffered or
//! running, with hysteresis between pausing and resuming.
//!
//! ractor mailboxes are unbounded, so the bound lives here: the supervisor stops taking messages
//! off the partition queue when the budget is spent (the bound is never exceeded, except by the
//! one message that crosses the byte budget, so that a message larger than the budget can still
//! run). If the partition stays congested — at the bound with nothing completing — for
//! `pause_after`, it is paused on the consumer, which also frees librdkafka's prefetch. It
//! resumes only once both counts fall to the low mark. A partition at its bound that keeps
//! completing (a steady backlog) is never paused: the prefetch is already bounded by the memory
//! budget, so the pause is the last resort for a partition whose work does not move.
//!
//! Why the delay: every librdkafka pause drops the prefetched messages, and the refetch after a
//! resume was measured at ~0.5 s on tansu and the mock cluster (2 cores, librdkafka 2.12). A
//! burst that drains within milliseconds would pay that half second each time; a partition that
//! stays congested is paused as before. Memory is bounded either way: keyflow never takes more
//! than the bound off the queue, and librdkafka's prefetch is capped per partition
//! (`queued.max.messages.kbytes`, derived from `max_buffered_bytes`).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Pause,
    Resume,
}

#[derive(Debug)]
pub struct FlowControl {
    max_count: usize,
    max_bytes: u64,
    resume_count: usize,
    resume_bytes: u64,
    count: usize,
    bytes: u64,
    paused: bool,
    pause_after: Duration,
    congested_since: Option<Instant>,
}

impl FlowControl {
    /// `resume_at` is the fraction of each bound at which a paused partition resumes;
    /// `pause_after` how long it may stay congested before it is paused.
    pub fn new(max_count: usize, max_bytes: u64, resume_at: f64, pause_after: Duration) -> Self {
        let max_count = max_count.max(1);
        FlowControl {
            max_count,
            max_bytes,
            resume_count: ((max_count as f64 * resume_at) as usize).min(max_count - 1),
            resume_bytes: ((max_bytes as f64 * resume_at) as u64).min(max_bytes.saturating_sub(1)),
            count: 0,
            bytes: 0,
            paused: false,
            pause_after,
            congested_since: None,
        }
    }

    /// Sets the byte bound (a partition's share of the memory budget, re-split on assignment
    /// changes). A lower bound than what is held stops taking until completions fall below it.
    pub fn set_max_bytes(&mut self, max_bytes: u64, resume_at: f64) {
        if max_bytes == self.max_bytes {
            return;
        }
        self.max_bytes = max_bytes;
        self.resume_bytes =
            ((max_bytes as f64 * resume_at) as u64).min(max_bytes.saturating_sub(1));
    }

    /// Whether another message may be taken off the queue.
    pub fn has_room(&self) -> bool {
        self.count < self.max_count && self.bytes < self.max_bytes
    }

    /// How many messages may be taken at once: the room left in messages, and in bytes at
    /// `size_hint` bytes a message; at least one while there is room, none without.
    pub fn room(&self, size_hint: u64) -> usize {
        if !self.has_room() {
            return 0;
        }
        let by_bytes = (self.max_bytes - self.bytes) / size_hint.max(1);
        (self.max_count - self.count).min(by_bytes.max(1).try_into().unwrap_or(usize::MAX))
    }

    pub fn admit(&mut self, size: usize) {
        self.count += 1;
        self.bytes += size as u64;
    }

    /// A message completed. Congestion counts only while nothing completes: a partition at its
    /// bound that keeps completing is a steady backlog, bounded by the budget and the prefetch,
    /// and a pause would only drop the prefetch and cost a refetch.
    pub fn release(&mut self, size: usize) {
        self.count -= 1;
        self.bytes -= size as u64;
        if !self.paused {
            self.congested_since = None;
        }
    }

    /// What to do on the consumer now, if anything.
    pub fn signal(&mut self, now: Instant) -> Option<Signal> {
        let drained = self.count <= self.resume_count && self.bytes <= self.resume_bytes;
        if drained {
            self.congested_since = None;
            if self.paused {
                self.paused = false;
                return Some(Signal::Resume);
            }
            return None;
        }
        if !self.has_room() && self.congested_since.is_none() {
            self.congested_since = Some(now);
        }
        match self.congested_since {
            Some(since) if !self.paused && now.duration_since(since) >= self.pause_after => {
                self.paused = true;
                Some(Signal::Pause)
            }
            _ => None,
        }
    }

    /// Congested but not paused yet: when to look again.
    pub fn pause_due(&self) -> Option<Instant> {
        match (self.paused, self.congested_since) {
            (false, Some(since)) => Some(since + self.pause_after),
            _ => None,
        }
    }

    /// How long the partition has been at its bound with nothing completing (as of the last
    /// [`FlowControl::signal`]).
    pub fn congested_for(&self, now: Instant) -> Duration {
        self.congested_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    pub fn count(&self) -> usize {
        self.count
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn paused(&self) -> bool {
        self.paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Review M1 (issue 10 item 2): under a steady backlog a partition sits at its bound, each
    /// completion freeing room that the next fetch fills. It is not congested in the sense that
    /// matters (work moves), so it must never be paused: the pause would drop the prefetch and
    /// cost a refetch, for nothing.
    #[test]
    fn a_partition_that_keeps_completing_is_never_paused() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(100, 1 << 20, 0.5, Duration::from_secs(30));
        while f.has_room() {
            f.admit(1000);
        }
        assert_eq!(f.signal(t0), None);
        for step in 1..=4000u64 {
            let now = t0 + Duration::from_millis(10 * step);
            f.release(1000);
            while f.has_room() {
                f.admit(1000);
            }
            assert_eq!(f.signal(now), None, "paused at {:?}", now - t0);
        }
        // Nothing completes for `pause_after`: now it is paused.
        let stalled = t0 + Duration::from_millis(40_000) + Duration::from_secs(30);
        assert_eq!(f.signal(stalled), Some(Signal::Pause));
    }

    #[test]
    fn pauses_at_the_bound_and_resumes_at_the_low_mark() {
        let now = Instant::now();
        let mut f = FlowControl::new(4, 1 << 20, 0.5, Duration::ZERO);
        for _ in 0..3 {
            f.admit(10);
            assert_eq!(f.signal(now), None);
        }
        f.admit(10);
        assert!(!f.has_room());
        assert_eq!(f.signal(now), Some(Signal::Pause));
        assert_eq!(f.signal(now), None, "pause is signalled once");
        f.release(10);
        assert_eq!(
            f.signal(now),
            None,
            "3 > low mark 2: still paused (hysteresis)"
        );
        f.release(10);
        assert_eq!(f.signal(now), Some(Signal::Resume));
    }

    #[test]
    fn a_burst_that_drains_quickly_is_not_paused() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(4, 1 << 20, 0.5, Duration::from_millis(100));
        for _ in 0..4 {
            f.admit(10);
        }
        assert_eq!(f.signal(t0), None, "congested, not yet for 100ms");
        assert_eq!(f.pause_due(), Some(t0 + Duration::from_millis(100)));
        f.release(10);
        f.admit(10);
        assert_eq!(f.signal(t0 + Duration::from_millis(50)), None);
        f.release(10);
        f.release(10);
        assert_eq!(
            f.signal(t0 + Duration::from_millis(60)),
            None,
            "drained to the low mark: congestion over"
        );
        assert_eq!(f.pause_due(), None);
        for _ in 0..2 {
            f.admit(10);
        }
        assert_eq!(
            f.signal(t0 + Duration::from_millis(200)),
            None,
            "a new congestion starts its own clock"
        );
        assert_eq!(
            f.signal(t0 + Duration::from_millis(300)),
            Some(Signal::Pause),
            "congested for 100ms: paused"
        );
    }

    #[test]
    fn byte_budget_pauses_too() {
        let now = Instant::now();
        let mut f = FlowControl::new(1000, 100, 0.5, Duration::ZERO);
        f.admit(60);
        assert!(f.has_room());
        f.admit(60);
        assert!(!f.has_room(), "120 bytes ≥ 100");
        assert_eq!(f.signal(now), Some(Signal::Pause));
        f.release(60);
        assert_eq!(f.signal(now), None, "60 > 50");
        f.release(60);
        assert_eq!(f.signal(now), Some(Signal::Resume));
    }

    proptest! {
        /// Admitting only while there is room never exceeds the count bound, and the pause
        /// state always matches the hysteresis rule.
        #[test]
        fn never_exceeds_the_bound(ops in prop::collection::vec((any::<bool>(), 1usize..50), 1..500), max in 1usize..20) {
            let mut f = FlowControl::new(max, 1 << 30, 0.5, Duration::ZERO);
            let mut sizes = Vec::new();
            for (admit, size) in ops {
                if admit && f.has_room() {
                    f.admit(size);
                    sizes.push(size);
                } else if let Some(s) = sizes.pop() {
                    f.release(s);
                }
                prop_assert!(f.count() <= max);
                f.signal(Instant::now());
                if f.count() >= max { prop_assert!(f.paused()); }
                if f.count() == 0 { prop_assert!(!f.paused()); }
            }
        }
    }
}
