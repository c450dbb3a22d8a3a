//! Flow control for one partition: a count and a byte budget over messages buffered or
//! running, with hysteresis between pausing and resuming.
//!
//! ractor mailboxes are unbounded, so the bound lives here: the supervisor stops taking messages
//! off the partition queue when the budget is spent (the bound is never exceeded, except by the
//! one message that crosses the byte budget, so that a message larger than the budget can still
//! run) and pauses the partition on the consumer, which also frees librdkafka's prefetch. It
//! resumes only once both counts fall to the low mark, because every pause drops the prefetch
//! and a pause/resume per message would refetch constantly.

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
}

impl FlowControl {
    /// `resume_at` is the fraction of each bound at which a paused partition resumes.
    pub fn new(max_count: usize, max_bytes: u64, resume_at: f64) -> Self {
        let max_count = max_count.max(1);
        FlowControl {
            max_count,
            max_bytes,
            resume_count: ((max_count as f64 * resume_at) as usize).min(max_count - 1),
            resume_bytes: ((max_bytes as f64 * resume_at) as u64).min(max_bytes.saturating_sub(1)),
            count: 0,
            bytes: 0,
            paused: false,
        }
    }

    /// Whether another message may be taken off the queue.
    pub fn has_room(&self) -> bool {
        self.count < self.max_count && self.bytes < self.max_bytes
    }

    pub fn admit(&mut self, size: usize) {
        self.count += 1;
        self.bytes += size as u64;
    }

    pub fn release(&mut self, size: usize) {
        self.count -= 1;
        self.bytes -= size as u64;
    }

    /// What to do on the consumer now, if anything.
    pub fn signal(&mut self) -> Option<Signal> {
        if !self.paused && !self.has_room() {
            self.paused = true;
            Some(Signal::Pause)
        } else if self.paused && self.count <= self.resume_count && self.bytes <= self.resume_bytes {
            self.paused = false;
            Some(Signal::Resume)
        } else {
            None
        }
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

    #[test]
    fn pauses_at_the_bound_and_resumes_at_the_low_mark() {
        let mut f = FlowControl::new(4, 1 << 20, 0.5);
        for _ in 0..3 {
            f.admit(10);
            assert_eq!(f.signal(), None);
        }
        f.admit(10);
        assert!(!f.has_room());
        assert_eq!(f.signal(), Some(Signal::Pause));
        assert_eq!(f.signal(), None, "pause is signalled once");
        f.release(10);
        assert_eq!(f.signal(), None, "3 > low mark 2: still paused (hysteresis)");
        f.release(10);
        assert_eq!(f.signal(), Some(Signal::Resume));
    }

    #[test]
    fn byte_budget_pauses_too() {
        let mut f = FlowControl::new(1000, 100, 0.5);
        f.admit(60);
        assert!(f.has_room());
        f.admit(60);
        assert!(!f.has_room(), "120 bytes ≥ 100");
        assert_eq!(f.signal(), Some(Signal::Pause));
        f.release(60);
        assert_eq!(f.signal(), None, "60 > 50");
        f.release(60);
        assert_eq!(f.signal(), Some(Signal::Resume));
    }

    proptest! {
        /// Admitting only while there is room never exceeds the count bound, and the pause
        /// state always matches the hysteresis rule.
        #[test]
        fn never_exceeds_the_bound(ops in prop::collection::vec((any::<bool>(), 1usize..50), 1..500), max in 1usize..20) {
            let mut f = FlowControl::new(max, 1 << 30, 0.5);
            let mut sizes = Vec::new();
            for (admit, size) in ops {
                if admit && f.has_room() {
                    f.admit(size);
                    sizes.push(size);
                } else if let Some(s) = sizes.pop() {
                    f.release(s);
                }
                prop_assert!(f.count() <= max);
                f.signal();
                if f.count() >= max { prop_assert!(f.paused()); }
                if f.count() == 0 { prop_assert!(!f.paused()); }
            }
        }
    }
}
