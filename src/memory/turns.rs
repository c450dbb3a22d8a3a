//! Fetch turns: which of a pipeline's partitions may fetch, when one fetch per partition would
//! overrun the pipeline's prefetch share.
//!
//! librdkafka reads only whole record batches: it grows a partition's fetch until a batch fits,
//! and parses all of it into its queue at once (~320 bytes of op per message beyond the
//! payload). So every partition that fetches holds at least one batch, whatever
//! `queued.max.messages.kbytes` says. With the Java producer's 16 KiB batches that floor is
//! small; with librdkafka's 1 MB `batch.size` filled by a fast producer, a batch of ~90-byte
//! messages costs ~4 MiB queued, and 64 partitions held ~270 MiB against a 128 MiB prefetch
//! share (BENCHMARKS.md, "The one-batch floor").
//!
//! Each supervisor tells [`FetchTurns`] what its queue holds when it reads it (the largest
//! recent reading is the *floor*: what one fetch leaves in a queue). While `share / floor` is at
//! least the number of partitions assigned, every partition fetches freely and nothing here
//! costs anything. Below it, the pipeline is *gated*: `share / floor` partitions hold a turn
//! and fetch, the others stay paused with an empty librdkafka queue (a pause then drops
//! nothing), queued first come first served. While others wait, a supervisor gives its turn
//! back when its queue is empty and it has read to the end of its log (or nothing came for a
//! long while), or when it has held the turn for a while (its queue, never empty with a
//! backlog, is dropped by the pause and fetched again on its next turn); it keeps the turn
//! while its next batch is on the way. It asks again when it has room for more. Turns are
//! counted here, under one lock, taken per fetch decision, never per message.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a floor reading counts: the floor is the largest reading of the current and the
/// previous window, so a pipeline whose producers moved to smaller batches is ungated within
/// two windows.
pub const FLOOR_WINDOW: Duration = Duration::from_secs(10);

/// Tells a supervisor to look at its turn again (a cast to its mailbox); `false` when the
/// supervisor is gone.
pub type Wake = Box<dyn Fn() -> bool + Send + Sync>;

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Not gated: fetch freely.
    Free,
    /// Gated, holding a turn: fetch.
    Held,
    /// Gated, queued for a turn: stay paused.
    Waiting,
    /// Gated, neither holding nor asking (no room for more): stay paused.
    Idle,
}

struct Member {
    wake: Wake,
    turn: Turn,
}

struct Inner {
    /// Partitions assigned to the pipeline now.
    assigned: usize,
    /// The largest reading of the current window and of the previous one.
    floor: [u64; 2],
    window_start: Instant,
    members: HashMap<u64, Member>,
    next_id: u64,
    held: usize,
    waiting: VecDeque<u64>,
}

/// One pipeline's fetch turns (see the module).
pub struct FetchTurns {
    /// librdkafka's queues of this pipeline together may hold this (its prefetch share).
    share: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for FetchTurns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.lock();
        f.debug_struct("FetchTurns")
            .field("share", &self.share)
            .field("floor", &i.floor)
            .field("held", &i.held)
            .field("waiting", &i.waiting.len())
            .finish()
    }
}

impl FetchTurns {
    pub fn new(share: u64) -> Self {
        FetchTurns {
            share,
            inner: Mutex::new(Inner {
                assigned: 0,
                floor: [0; 2],
                window_start: Instant::now(),
                members: HashMap::new(),
                next_id: 0,
                held: 0,
                waiting: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock leaves counts that are still consistent (every update is one
        // statement): go on with them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A supervisor joins; it leaves when the ticket drops.
    pub fn join(self: &Arc<Self>, wake: Wake) -> TurnTicket {
        let mut i = self.lock();
        let id = i.next_id;
        i.next_id += 1;
        let turn = if i.turns(self.share).is_some() {
            Turn::Idle
        } else {
            Turn::Free
        };
        i.members.insert(id, Member { wake, turn });
        TurnTicket {
            turns: self.clone(),
            id,
        }
    }

    /// The partitions assigned to the pipeline changed.
    pub fn set_assigned(&self, n: usize) {
        let mut i = self.lock();
        i.assigned = n;
        i.regate(self.share);
    }

    /// How many turns there are while gated (`None`: not gated).
    pub fn limit(&self) -> Option<usize> {
        self.lock().turns(self.share)
    }

    /// The floor: the most one partition's queue held at a reading, recently.
    pub fn floor(&self) -> u64 {
        let i = self.lock();
        i.floor[0].max(i.floor[1])
    }

    /// (turns held, members waiting), for `/debug` and tests.
    pub fn counts(&self) -> (usize, usize) {
        let i = self.lock();
        (i.held, i.waiting.len())
    }
}

impl Inner {
    fn floor(&self) -> u64 {
        self.floor[0].max(self.floor[1])
    }

    /// Turns while gated: `share / floor` (at least one), when that is fewer than the
    /// partitions assigned.
    fn turns(&self, share: u64) -> Option<usize> {
        let floor = self.floor();
        if floor == 0 {
            return None;
        }
        let turns = ((share / floor) as usize).max(1);
        (turns < self.assigned).then_some(turns)
    }

    fn observe(&mut self, bytes: u64, now: Instant, share: u64) {
        let before = self.turns(share);
        if now.duration_since(self.window_start) >= FLOOR_WINDOW {
            let stale = now.duration_since(self.window_start) >= 2 * FLOOR_WINDOW;
            self.floor = [if stale { 0 } else { self.floor[1] }, 0];
            self.window_start = now;
        }
        self.floor[1] = self.floor[1].max(bytes);
        if self.turns(share) != before {
            self.regate(share);
        }
    }

    /// The gate, its number of turns or the assignment changed: ungated, every member is free
    /// (and those paused are woken to resume); gated, the free ones and the holders are woken to
    /// decide (a holder gone, or given up, leaves), and waiting ones get the turns there are.
    fn regate(&mut self, share: u64) {
        match self.turns(share) {
            None => {
                self.held = 0;
                self.waiting.clear();
                self.members.retain(|_, m| {
                    let was = std::mem::replace(&mut m.turn, Turn::Free);
                    was == Turn::Free || (m.wake)()
                });
            }
            Some(_) => {
                let mut gone = 0;
                self.members.retain(|_, m| match m.turn {
                    Turn::Free => {
                        m.turn = Turn::Idle;
                        (m.wake)()
                    }
                    // A holder whose partition was given up (its wake says so once the
                    // coordinator released it) may be blocked past its drain and never give
                    // its turn back: the assignment change that follows every release takes
                    // it back. A live holder is told to look again.
                    Turn::Held => {
                        let alive = (m.wake)();
                        gone += usize::from(!alive);
                        alive
                    }
                    _ => true,
                });
                self.held -= gone;
                self.grant(share);
            }
        }
    }

    /// Hands free turns to the members waiting longest.
    fn grant(&mut self, share: u64) {
        let Some(turns) = self.turns(share) else {
            return;
        };
        while self.held < turns {
            let Some(id) = self.waiting.pop_front() else {
                return;
            };
            let Some(m) = self.members.get_mut(&id) else {
                continue;
            };
            if m.turn != Turn::Waiting {
                continue;
            }
            m.turn = Turn::Held;
            self.held += 1;
            if !(m.wake)() {
                self.leave(id);
            }
        }
    }

    fn leave(&mut self, id: u64) {
        if let Some(m) = self.members.remove(&id) {
            if m.turn == Turn::Held {
                self.held -= 1;
            }
            if m.turn == Turn::Waiting {
                self.waiting.retain(|w| *w != id);
            }
        }
    }
}

/// A supervisor's membership (see the module); leaving (the drop) gives its turn back.
pub struct TurnTicket {
    turns: Arc<FetchTurns>,
    id: u64,
}

impl std::fmt::Debug for TurnTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnTicket").field("id", &self.id).finish()
    }
}

impl TurnTicket {
    /// What this member may do now.
    pub fn turn(&self) -> Turn {
        let i = self.turns.lock();
        i.members.get(&self.id).map_or(Turn::Free, |m| m.turn)
    }

    /// This member's queue held `bytes` at a reading (its messages at their librdkafka cost).
    /// Returns what the member may do now.
    pub fn observe(&self, bytes: u64, now: Instant) -> Turn {
        let mut i = self.turns.lock();
        i.observe(bytes, now, self.turns.share);
        i.members.get(&self.id).map_or(Turn::Free, |m| m.turn)
    }

    /// Asks for a turn (gated, not holding one): held at once when one is free, else queued
    /// (first come, first served). Returns what the member may do now.
    pub fn ask(&self) -> Turn {
        let share = self.turns.share;
        let mut i = self.turns.lock();
        let Some(turns) = i.turns(share) else {
            return self.free(&mut i);
        };
        let free = i.held < turns && i.waiting.is_empty();
        let Some(m) = i.members.get_mut(&self.id) else {
            return Turn::Free;
        };
        match m.turn {
            Turn::Held | Turn::Waiting => m.turn,
            Turn::Free | Turn::Idle if free => {
                m.turn = Turn::Held;
                i.held += 1;
                Turn::Held
            }
            Turn::Free | Turn::Idle => {
                m.turn = Turn::Waiting;
                i.waiting.push_back(self.id);
                Turn::Waiting
            }
        }
    }

    /// Gives a held turn back (its queue is empty and others wait): `then` is what the member
    /// becomes ([`Turn::Waiting`] to queue again at the back, [`Turn::Idle`] otherwise).
    pub fn give_back(&self, then: Turn) -> Turn {
        let share = self.turns.share;
        let mut i = self.turns.lock();
        if i.turns(share).is_none() {
            return self.free(&mut i);
        }
        let Some(m) = i.members.get_mut(&self.id) else {
            return Turn::Free;
        };
        if m.turn != Turn::Held {
            return m.turn;
        }
        m.turn = then;
        i.held -= 1;
        if then == Turn::Waiting {
            i.waiting.push_back(self.id);
        }
        i.grant(share);
        i.members.get(&self.id).map_or(Turn::Free, |m| m.turn)
    }

    /// Others are waiting for a turn.
    pub fn contended(&self) -> bool {
        !self.turns.lock().waiting.is_empty()
    }

    /// Not gated: the member is free (a turn it held or waited for is forgotten; regate
    /// already reset the counts).
    fn free(&self, i: &mut Inner) -> Turn {
        if let Some(m) = i.members.get_mut(&self.id) {
            m.turn = Turn::Free;
        }
        Turn::Free
    }
}

impl Drop for TurnTicket {
    fn drop(&mut self) {
        let share = self.turns.share;
        let mut i = self.turns.lock();
        i.leave(self.id);
        i.grant(share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    fn member(turns: &Arc<FetchTurns>) -> (TurnTicket, Arc<AtomicUsize>) {
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let t = turns.join(Box::new(move || {
            w.fetch_add(1, Relaxed);
            true
        }));
        (t, woken)
    }

    #[test]
    fn small_batches_leave_every_partition_free() {
        let turns = Arc::new(FetchTurns::new(128 << 20));
        turns.set_assigned(64);
        let members: Vec<_> = (0..64).map(|_| member(&turns)).collect();
        let now = Instant::now();
        // 1.3 MiB a queue: 64 of them fit in 128 MiB.
        assert_eq!(members[0].0.observe(1_300_000, now), Turn::Free);
        assert_eq!(turns.limit(), None);
        assert!(members.iter().all(|(_, w)| w.load(Relaxed) == 0));
    }

    #[test]
    fn large_batches_gate_the_pipeline_and_turns_never_exceed_share_over_floor() {
        let turns = Arc::new(FetchTurns::new(128 << 20));
        turns.set_assigned(64);
        let members: Vec<_> = (0..64).map(|_| member(&turns)).collect();
        // 4.2 MiB a queue (~1 MB batches of 90-byte messages): 30 turns.
        members[0].0.observe(4_400_000, Instant::now());
        let limit = turns.limit().expect("gated");
        assert_eq!(limit, (128 << 20) / 4_400_000);
        // Every free member was woken to decide.
        assert!(members.iter().all(|(_, w)| w.load(Relaxed) == 1));
        let got: Vec<Turn> = members.iter().map(|(t, _)| t.ask()).collect();
        assert_eq!(got.iter().filter(|t| **t == Turn::Held).count(), limit);
        assert_eq!(
            got.iter().filter(|t| **t == Turn::Waiting).count(),
            64 - limit
        );
        assert_eq!(turns.counts(), (limit, 64 - limit));
        // A holder gives its turn back: the longest waiting member gets it, and is woken.
        let first_waiting = got.iter().position(|t| *t == Turn::Waiting).unwrap();
        let before = members[first_waiting].1.load(Relaxed);
        assert_eq!(members[0].0.give_back(Turn::Waiting), Turn::Waiting);
        assert_eq!(members[first_waiting].0.turn(), Turn::Held);
        assert_eq!(members[first_waiting].1.load(Relaxed), before + 1);
        assert_eq!(turns.counts().0, limit);
    }

    #[test]
    fn a_member_that_leaves_gives_its_turn_to_the_next() {
        let turns = Arc::new(FetchTurns::new(10));
        turns.set_assigned(3);
        let (a, _) = member(&turns);
        let (b, _) = member(&turns);
        let (c, _) = member(&turns);
        a.observe(10, Instant::now());
        assert_eq!(turns.limit(), Some(1));
        assert_eq!(a.ask(), Turn::Held);
        assert_eq!(b.ask(), Turn::Waiting);
        assert_eq!(c.ask(), Turn::Waiting);
        drop(a);
        assert_eq!(b.turn(), Turn::Held);
        assert_eq!(c.turn(), Turn::Waiting);
        assert_eq!(turns.counts(), (1, 1));
        // A waiting member that leaves is no longer queued.
        drop(c);
        assert_eq!(turns.counts(), (1, 0));
    }

    #[test]
    fn a_turn_granted_to_a_gone_member_goes_to_the_next() {
        let turns = Arc::new(FetchTurns::new(10));
        turns.set_assigned(3);
        let (a, _) = member(&turns);
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = alive.clone();
        let gone = turns.join(Box::new(move || flag.load(Relaxed)));
        let (c, _) = member(&turns);
        a.observe(10, Instant::now());
        assert_eq!(a.ask(), Turn::Held);
        assert_eq!(gone.ask(), Turn::Waiting);
        assert_eq!(c.ask(), Turn::Waiting);
        // Its supervisor stops (its mailbox is closed) before its ticket drops.
        alive.store(false, Relaxed);
        a.give_back(Turn::Idle);
        assert_eq!(c.turn(), Turn::Held);
        assert_eq!(turns.counts(), (1, 0));
        drop(gone);
        assert_eq!(turns.counts(), (1, 0));
    }

    /// Review of 91f3f0d (helper-38): the coordinator gives a partition up (revoke, lost,
    /// shutdown, rewind) while its supervisor's thread is blocked (a processor blocking past the
    /// drain): the supervisor cannot look at its turn until it wakes, so a turn it holds was never
    /// given back, and with one turn every other partition of the pipeline stayed paused. Its
    /// wake says it is gone once released; the assignment change that follows every release
    /// takes the turn back.
    #[test]
    fn a_turn_held_by_a_partition_given_up_goes_to_the_next_at_the_assignment_change() {
        let turns = Arc::new(FetchTurns::new(10));
        turns.set_assigned(3);
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = released.clone();
        // Its supervisor is blocked: its mailbox is open, but it handles nothing.
        let given_up = turns.join(Box::new(move || !flag.load(Relaxed)));
        let (b, _) = member(&turns);
        let (_c, _) = member(&turns);
        given_up.observe(10, Instant::now());
        assert_eq!(turns.limit(), Some(1));
        assert_eq!(given_up.ask(), Turn::Held);
        assert_eq!(b.ask(), Turn::Waiting);
        // The coordinator releases its partition, then sets the assignment without it.
        released.store(true, Relaxed);
        turns.set_assigned(2);
        assert_eq!(
            b.turn(),
            Turn::Held,
            "the turn of a partition given up waits for its blocked supervisor"
        );
        assert_eq!(turns.counts(), (1, 0));
        // The supervisor wakes and drains later: it has nothing more to give back.
        drop(given_up);
        assert_eq!(turns.counts(), (1, 0));
        assert_eq!(b.turn(), Turn::Held);
    }

    #[test]
    fn smaller_batches_ungate_within_two_windows_and_wake_the_paused() {
        let turns = Arc::new(FetchTurns::new(10));
        turns.set_assigned(2);
        let (a, _) = member(&turns);
        let (b, wb) = member(&turns);
        let t0 = Instant::now();
        a.observe(10, t0);
        assert_eq!(a.ask(), Turn::Held);
        assert_eq!(b.ask(), Turn::Waiting);
        let woken = wb.load(Relaxed);
        // Still gated within the next window (the previous window's reading counts).
        a.observe(1, t0 + FLOOR_WINDOW);
        assert_eq!(turns.limit(), Some(1));
        // Two windows on, only small readings count: ungated, the waiting member is woken free.
        a.observe(1, t0 + 2 * FLOOR_WINDOW + Duration::from_millis(1));
        assert_eq!(turns.limit(), None);
        assert_eq!(b.turn(), Turn::Free);
        assert_eq!(wb.load(Relaxed), woken + 1);
        assert_eq!(turns.counts(), (0, 0));
    }

    #[test]
    fn more_partitions_assigned_gate_a_pipeline_whose_floor_fit_before() {
        let turns = Arc::new(FetchTurns::new(100));
        turns.set_assigned(4);
        let (a, wa) = member(&turns);
        a.observe(25, Instant::now());
        assert_eq!(turns.limit(), None);
        turns.set_assigned(8);
        assert_eq!(turns.limit(), Some(4));
        assert_eq!(a.turn(), Turn::Idle);
        assert_eq!(wa.load(Relaxed), 1);
    }
}
