//! Commit on completion: the offset tracker, and the one function that commits.

use std::collections::VecDeque;

use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// Tracks the offsets a partition actually received (Kafka offsets can have gaps: compaction,
/// transaction markers) and which of them completed. The commit point is the lowest offset that
/// is not complete; everything below it is done.
///
/// Received offsets only grow, so `pending` is sorted and a completion is a binary search.
/// Memory is bounded by the partition's in-flight limit.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Received and not yet passed by the commit point, oldest first; `true` once complete.
    pending: VecDeque<(i64, bool)>,
    /// Commit point once everything received is complete: last received + 1.
    next_after_last: Option<i64>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a received offset. Returns `false`, recording nothing, for an offset at or below
    /// one already received (a redelivery this partition has already seen).
    pub fn received(&mut self, offset: i64) -> bool {
        if self.next_after_last.is_some_and(|n| offset < n) {
            return false;
        }
        self.pending.push_back((offset, false));
        self.next_after_last = Some(offset + 1);
        true
    }

    /// Marks an offset complete. Returns `false` if it is not pending (never received, or
    /// completed already).
    pub fn completed(&mut self, offset: i64) -> bool {
        let Ok(i) = self.pending.binary_search_by_key(&offset, |e| e.0) else {
            return false;
        };
        if self.pending[i].1 {
            return false;
        }
        self.pending[i].1 = true;
        while self.pending.front().is_some_and(|e| e.1) {
            self.pending.pop_front();
        }
        true
    }

    /// The offset to commit (the next one to consume): every received offset below it has
    /// completed. `None` before anything was received.
    pub fn committable(&self) -> Option<i64> {
        match self.pending.front() {
            Some(&(o, _)) => Some(o),
            None => self.next_after_last,
        }
    }

    /// Received offsets not yet passed by the commit point (incomplete, or complete above an
    /// incomplete one).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The oldest incomplete offset.
    pub fn oldest_incomplete(&self) -> Option<i64> {
        self.pending.front().map(|e| e.0)
    }
}

/// The one place keyflow commits offsets. `next_offset` is the next offset to consume (Kafka's
/// convention), i.e. [`OffsetTracker::committable`].
pub fn commit<C: ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    offsets: &[(&str, i32, i64)],
    mode: CommitMode,
) -> KafkaResult<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for &(topic, partition, next) in offsets {
        tpl.add_partition_offset(topic, partition, Offset::Offset(next))?;
    }
    consumer.commit(&tpl, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commit_point_waits_for_the_oldest() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.committable(), None);
        for o in [10, 11, 12, 15] {
            assert!(t.received(o));
        }
        assert_eq!(t.committable(), Some(10));
        assert!(t.completed(11));
        assert!(t.completed(15));
        assert_eq!(
            t.committable(),
            Some(10),
            "11 and 15 are done but 10 is not"
        );
        assert!(t.completed(10));
        assert_eq!(t.committable(), Some(12));
        assert!(t.completed(12));
        assert_eq!(
            t.committable(),
            Some(16),
            "gap 13-14 never received: last + 1"
        );
        assert!(!t.completed(12), "double completion is refused");
        assert!(!t.completed(13), "never received");
        assert!(!t.received(14), "below the last received");
    }

    proptest! {
        /// Random gaps, random completion order: the commit point never passes an incomplete
        /// offset, never moves backwards, and reaches last + 1 when all complete.
        #[test]
        fn never_passes_an_incomplete_offset(
            gaps in prop::collection::vec(1i64..4, 1..200),
            order in any::<prop::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in &gaps { o += g; offsets.push(o); }
            let mut t = OffsetTracker::new();
            for &o in &offsets { prop_assert!(t.received(o)); }
            let mut todo = offsets.clone();
            // A deterministic shuffle from the seed and the sampled index.
            let mut s = seed ^ (order.index(1 << 20) as u64);
            for i in (1..todo.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                todo.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut done = std::collections::BTreeSet::new();
            let mut last = t.committable().unwrap();
            for o in todo {
                prop_assert!(t.completed(o));
                done.insert(o);
                let c = t.committable().unwrap();
                prop_assert!(c >= last, "commit point went back");
                for &x in &offsets {
                    if x < c { prop_assert!(done.contains(&x), "committed past incomplete {}", x); }
                }
                last = c;
            }
            prop_assert_eq!(t.committable(), Some(offsets.last().unwrap() + 1));
            prop_assert_eq!(t.pending(), 0);
        }
    }
}
