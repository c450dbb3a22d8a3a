//! Per-key scheduling: which fetched message may start now, and which must wait.
//!
//! In `key` mode a message waits only behind the running message with the same key on the
//! same partition; every other key proceeds. There is no fixed pool of key-hash slots, so a
//! slow key never blocks an unrelated key that happens to hash alike. A **null key carries no
//! ordering**: Kafka's partitioner spreads null-keyed records anyway, so keyflow runs them
//! concurrently, as in `unordered` mode.

use std::collections::VecDeque;

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::config::Ordering;

/// Anything with an optional key (a message, or a test double).
pub trait Keyed {
    fn key(&self) -> Option<&Bytes>;
}

impl<T: Keyed> Keyed for std::sync::Arc<T> {
    fn key(&self) -> Option<&Bytes> {
        (**self).key()
    }
}

impl Keyed for crate::message::Message {
    fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }
}

#[derive(Debug)]
pub struct KeyScheduler<T> {
    mode: Ordering,
    /// Keys with a message running → the messages waiting behind it, in offset order. An entry
    /// exists exactly while a message of that key runs.
    busy: FxHashMap<Bytes, VecDeque<T>>,
    /// `partition` mode: whether a message runs, and those waiting behind it.
    lane_busy: bool,
    lane: VecDeque<T>,
    waiting: usize,
}

impl<T: Keyed> KeyScheduler<T> {
    pub fn new(mode: Ordering) -> Self {
        KeyScheduler {
            mode,
            busy: FxHashMap::default(),
            lane_busy: false,
            lane: VecDeque::new(),
            waiting: 0,
        }
    }

    /// Offers a fetched message: returns it if it may start now, or keeps it until
    /// [`complete`](Self::complete) releases it.
    pub fn admit(&mut self, m: T) -> Option<T> {
        match self.mode {
            Ordering::Unordered => Some(m),
            Ordering::Partition => {
                if self.lane_busy {
                    self.lane.push_back(m);
                    self.waiting += 1;
                    None
                } else {
                    self.lane_busy = true;
                    Some(m)
                }
            }
            Ordering::Key => {
                let Some(key) = m.key() else { return Some(m) };
                if let Some(q) = self.busy.get_mut(key) {
                    q.push_back(m);
                    self.waiting += 1;
                    None
                } else {
                    self.busy.insert(key.clone(), VecDeque::new());
                    Some(m)
                }
            }
        }
    }

    /// As [`admit`](Self::admit), unless the message's key already has `share` messages
    /// waiting behind its running one (key mode): then it is handed back, not kept
    /// (`Err`). One map lookup, as `admit`.
    pub fn admit_within(&mut self, m: T, share: usize) -> Result<Option<T>, T> {
        if self.mode == Ordering::Key {
            if let Some(q) = m.key().and_then(|k| self.busy.get_mut(k)) {
                if q.len() >= share {
                    return Err(m);
                }
                q.push_back(m);
                self.waiting += 1;
                return Ok(None);
            }
        }
        Ok(self.admit(m))
    }

    /// A message of `key` runs (key mode).
    pub fn is_busy(&self, key: &Bytes) -> bool {
        self.busy.contains_key(key)
    }

    /// Messages waiting behind the running message of `key` (key mode).
    pub fn queued(&self, key: &Bytes) -> usize {
        self.busy.get(key).map_or(0, VecDeque::len)
    }

    /// A message with `key` completed: returns the next message that may start in its place.
    pub fn complete(&mut self, key: Option<&Bytes>) -> Option<T> {
        match self.mode {
            Ordering::Unordered => None,
            Ordering::Partition => {
                let next = self.lane.pop_front();
                self.lane_busy = next.is_some();
                self.waiting -= usize::from(next.is_some());
                next
            }
            Ordering::Key => {
                let key = key?;
                let q = self.busy.get_mut(key)?;
                match q.pop_front() {
                    Some(next) => {
                        self.waiting -= 1;
                        Some(next)
                    }
                    None => {
                        self.busy.remove(key);
                        None
                    }
                }
            }
        }
    }

    /// Messages held back behind a running message of their key.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Keys with messages held back behind a running one, and how many (key mode; for
    /// `/debug/partitions`, not the hot path).
    pub fn waiting_keys(&self) -> impl Iterator<Item = (&Bytes, usize)> {
        self.busy
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, q)| (k, q.len()))
    }

    /// Keys with a message running (key mode).
    pub fn busy_keys(&self) -> usize {
        self.busy.len()
    }

    /// Removes every waiting message (a revoke abandons work that has not started: the new
    /// owner will receive it, since the commit point cannot pass it).
    pub fn take_waiting(&mut self) -> Vec<T> {
        let mut out: Vec<T> = self.lane.drain(..).collect();
        for q in self.busy.values_mut() {
            out.extend(q.drain(..));
        }
        self.waiting = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq)]
    struct M(Option<Bytes>, u32);
    impl Keyed for M {
        fn key(&self) -> Option<&Bytes> {
            self.0.as_ref()
        }
    }
    /// Review of e637ab6: the busy entry keeps the key of the message that opened it; while the
    /// key stays busy (a hot key: a next message always waiting), a key sharing its buffer with
    /// the payload would keep that first message's whole payload in memory after it completed.
    #[test]
    fn a_busy_key_does_not_keep_a_completed_payload_alive() {
        use crate::message::Message;
        use std::sync::Arc;
        let big = vec![b'x'; 1 << 20];
        let mut s = KeyScheduler::new(Ordering::Key);
        let first = Arc::new(Message::new("t", 0, 1, Some(b"hot"), &big));
        let second = Arc::new(Message::new("t", 0, 2, Some(b"hot"), b"small"));
        assert!(s.admit(first.clone()).is_some());
        assert!(s.admit(second).is_none());
        // The first completes (and is released); the second starts: the key is still busy.
        let next = s.complete(first.key.as_ref()).unwrap();
        assert_eq!(next.offset, 2);
        drop(first);
        let (key, _) = s.busy.drain().next().unwrap();
        let retained = key
            .try_into_mut()
            .expect("only the map holds it")
            .capacity();
        assert!(
            retained < 1024,
            "the busy map's 3-byte key keeps a {retained}-byte buffer alive"
        );
    }

    fn m(k: &str, n: u32) -> M {
        M(Some(Bytes::copy_from_slice(k.as_bytes())), n)
    }

    #[test]
    fn a_key_at_its_share_hands_the_message_back() {
        let mut s = KeyScheduler::new(Ordering::Key);
        assert_eq!(s.admit_within(m("a", 1), 2), Ok(Some(m("a", 1))));
        assert_eq!(s.admit_within(m("a", 2), 2), Ok(None));
        assert_eq!(s.admit_within(m("a", 3), 2), Ok(None));
        assert_eq!(
            s.admit_within(m("a", 4), 2),
            Err(m("a", 4)),
            "two already wait"
        );
        assert_eq!(s.admit_within(m("b", 5), 2), Ok(Some(m("b", 5))));
        assert_eq!(s.queued(&Bytes::from_static(b"a")), 2);
        assert_eq!(s.complete(Some(&Bytes::from_static(b"a"))), Some(m("a", 2)));
        assert_eq!(s.admit_within(m("a", 4), 2), Ok(None), "room again");
        assert_eq!(s.waiting(), 2);
    }

    #[test]
    fn same_key_waits_other_keys_run() {
        let mut s = KeyScheduler::new(Ordering::Key);
        assert_eq!(s.admit(m("a", 1)), Some(m("a", 1)));
        assert_eq!(s.admit(m("a", 2)), None);
        assert_eq!(
            s.admit(m("b", 3)),
            Some(m("b", 3)),
            "another key is not held back"
        );
        assert_eq!(
            s.admit(M(None, 4)),
            Some(M(None, 4)),
            "null keys carry no ordering"
        );
        assert_eq!(s.admit(M(None, 5)), Some(M(None, 5)));
        assert_eq!(s.waiting(), 1);
        assert_eq!(s.complete(Some(&Bytes::from_static(b"a"))), Some(m("a", 2)));
        assert_eq!(s.complete(Some(&Bytes::from_static(b"a"))), None);
        assert_eq!(s.busy_keys(), 1, "only b still runs");
        assert_eq!(s.admit(m("a", 6)), Some(m("a", 6)), "a is free again");
    }

    #[test]
    fn partition_mode_is_one_at_a_time() {
        let mut s = KeyScheduler::new(Ordering::Partition);
        assert!(s.admit(m("a", 1)).is_some());
        assert!(s.admit(m("b", 2)).is_none());
        assert!(s.admit(M(None, 3)).is_none());
        assert_eq!(s.complete(None), Some(m("b", 2)));
        assert_eq!(s.complete(None), Some(M(None, 3)));
        assert_eq!(s.complete(None), None);
        assert!(s.admit(m("c", 4)).is_some());
    }

    #[test]
    fn unordered_never_waits() {
        let mut s = KeyScheduler::new(Ordering::Unordered);
        for i in 0..10 {
            assert!(s.admit(m("a", i)).is_some());
        }
        assert_eq!(s.waiting(), 0);
    }

    proptest! {
        /// Simulates random completions: per key, messages start in admission order and never
        /// two at once; every message eventually starts.
        #[test]
        fn per_key_order_and_exclusivity(
            keys in prop::collection::vec(0u8..6, 1..300),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 300),
        ) {
            let mut s = KeyScheduler::new(Ordering::Key);
            let mut running: Vec<M> = Vec::new();
            let mut started: Vec<Vec<u32>> = vec![Vec::new(); 6];
            let mut pick = picks.iter().cycle();
            let mut feed = keys.iter().enumerate();
            let mut done = 0;
            loop {
                // Alternate between admitting and completing a random running message.
                if let Some((i, &k)) = feed.next() {
                    if let Some(go) = s.admit(m(&k.to_string(), i as u32)) {
                        prop_assert!(!running.iter().any(|r| r.0 == go.0), "two of a key at once");
                        started[k as usize].push(go.1);
                        running.push(go);
                    }
                }
                if !running.is_empty() {
                    let r = running.swap_remove(pick.next().unwrap().index(running.len()));
                    done += 1;
                    if let Some(go) = s.complete(r.0.as_ref()) {
                        prop_assert!(!running.iter().any(|x| x.0 == go.0), "two of a key at once");
                        let k: usize = std::str::from_utf8(go.0.as_ref().unwrap()).unwrap().parse().unwrap();
                        started[k].push(go.1);
                        running.push(go);
                    }
                } else if done == keys.len() {
                    break;
                }
            }
            for seq in &started {
                prop_assert!(seq.windows(2).all(|w| w[0] < w[1]), "out of order: {:?}", seq);
            }
            prop_assert_eq!(started.iter().map(Vec::len).sum::<usize>(), keys.len());
            prop_assert_eq!(s.busy_keys(), 0);
        }
    }
}
