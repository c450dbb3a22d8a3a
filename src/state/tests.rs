use super::*;
use crate::processors::{Flow, Processor};
use crate::state::processor::{Outputs, StateChange, Stateful, StatefulProcessor};

/// Adds the payload (a number) to the key's sum; "0" deletes it; a negative result is
/// refused (an output, the state kept).
struct Sum;

#[async_trait::async_trait]
impl StatefulProcessor for Sum {
    type State = i64;
    async fn process(
        &self,
        state: Option<i64>,
        msg: &Message,
        out: &mut Outputs,
    ) -> Result<StateChange<i64>, ProcessError> {
        let n: i64 = msg
            .payload_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ProcessError::permanent("decode", "not a number"))?;
        if n == 0 {
            return Ok(StateChange::Delete);
        }
        let next = state.unwrap_or(0) + n;
        if next < 0 {
            out.send("rejected", msg.key.clone(), "overdrawn");
            return Ok(StateChange::Keep);
        }
        Ok(StateChange::Set(next))
    }
}

fn producer() -> Producer {
    ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:1")
        .create()
        .unwrap()
}

fn msg(offset: i64, key: &str, n: i64) -> Message {
    Message::new(
        "in",
        1,
        offset,
        Some(key.as_bytes()),
        n.to_string().as_bytes(),
    )
}

fn value(store: &Store, key: &str) -> Option<i64> {
    store
        .snapshot(1)
        .get(key.as_bytes())
        .map(|v| serde_json::from_slice(v).unwrap())
}

#[tokio::test]
async fn a_change_is_applied_only_once_its_writes_succeeded() {
    let store = Store::in_memory(2, producer(), true);
    let p = Stateful::wrap(Sum);
    p.bind_state(Some(&store)).unwrap();

    let mut m = msg(0, "a", 10);
    assert_eq!(p.process(&mut m).await.unwrap(), Flow::Continue);
    // Staged in the outbox (exactly-once), partition = the input's, not applied yet.
    assert_eq!(m.outbox.len(), 1);
    assert_eq!(m.outbox[0].partition, Some(1));
    assert_eq!(&*m.outbox[0].topic, "changelog");
    assert_eq!(m.outbox[0].payload.as_deref(), Some(&b"10"[..]));
    assert_eq!(value(&store, "a"), None, "not applied before its writes");
    p.written(&m);
    assert_eq!(value(&store, "a"), Some(10));

    // A failed attempt (its writes never happen): the retry sees the same state.
    let mut m = msg(1, "a", 5);
    p.process(&mut m).await.unwrap();
    let mut retry = msg(1, "a", 5);
    p.process(&mut retry).await.unwrap();
    assert_eq!(retry.outbox[0].payload.as_deref(), Some(&b"15"[..]));
    p.written(&retry);
    assert_eq!(value(&store, "a"), Some(15));

    // A staged change of a message that was dead-lettered instead is never applied by the next.
    let mut dead = msg(2, "a", 100);
    p.process(&mut dead).await.unwrap();
    let mut next = msg(3, "a", 1);
    p.process(&mut next).await.unwrap();
    p.written(&dead); // a late hook of another offset changes nothing
    assert_eq!(value(&store, "a"), Some(15));
    p.written(&next);
    assert_eq!(value(&store, "a"), Some(16));

    // Keep with an output: the rejection is staged, no changelog record.
    let mut over = msg(4, "a", -100);
    p.process(&mut over).await.unwrap();
    assert_eq!(over.outbox.len(), 1);
    assert_eq!(&*over.outbox[0].topic, "rejected");
    p.written(&over);
    assert_eq!(value(&store, "a"), Some(16));

    // Delete: a tombstone, the key gone, its bytes given back.
    let before = store.bytes();
    assert!(before > 0);
    let mut del = msg(5, "a", 0);
    p.process(&mut del).await.unwrap();
    assert_eq!(del.outbox[0].payload, None, "a tombstone");
    p.written(&del);
    assert_eq!(value(&store, "a"), None);
    assert_eq!(store.bytes(), 0);
    let r = store.report();
    assert_eq!((r[1].keys, r[1].bytes), (0, 0));
    assert!(r[1].last_update_ms > 0);
}

#[tokio::test]
async fn a_message_without_key_or_store_is_refused_not_panicking() {
    let p = Stateful::wrap(Sum);
    assert!(p.bind_state(None).is_err(), "needs [state]");
    let mut m = msg(0, "a", 1);
    assert!(!p.process(&mut m).await.unwrap_err().is_retryable());
    let store = Store::in_memory(1, producer(), true);
    p.bind_state(Some(&store)).unwrap();
    let mut m = Message::new("in", 0, 0, None, b"1");
    assert!(!p.process(&mut m).await.unwrap_err().is_retryable());
    // A partition the store does not have (the input grew): retryable, not a panic.
    let mut m = Message::new("in", 5, 0, Some(b"k"), b"1");
    assert!(p.process(&mut m).await.unwrap_err().is_retryable());
}

#[tokio::test]
async fn dedup_keeps_its_window_in_the_state() {
    let store = Store::in_memory(2, producer(), true);
    let d = crate::processors::dedup::Dedup::new(&crate::processors::dedup::DedupConfig {
        field: Some("id".into()),
        header: None,
        ttl: "1h".parse().unwrap(),
        max_ids: 10,
    });
    d.bind_state(Some(&store)).unwrap();
    let mut m = Message::new("in", 1, 0, Some(b"k"), br#"{"id": 7}"#);
    assert_eq!(d.process(&mut m).await.unwrap(), Flow::Continue);
    assert_eq!(m.outbox.len(), 1, "the id joins the transaction");
    assert_eq!(m.outbox[0].partition, Some(1));
    d.completed(&m);
    let mut again = Message::new("in", 1, 9, Some(b"k"), br#"{"id": 7}"#);
    assert_eq!(d.process(&mut again).await.unwrap(), Flow::Duplicate);
    assert!(d.is_empty(), "not in the in-memory window");
    assert_eq!(store.report()[1].keys, 1);
}

#[test]
fn readiness_says_restoring_state_while_a_partition_restores() {
    let store = Store::in_memory(2, producer(), true);
    let stats = crate::stats::PipelineStats::with_topic("p", "in");
    stats.state.set(store.clone()).unwrap();
    {
        let _restoring = store.mark_restoring(&store.partitions[1]);
        let r = crate::http::readiness(std::slice::from_ref(&stats));
        assert!(
            r.iter()
                .any(|x| x.contains("restoring state") && x.contains("[1]")),
            "{r:?}"
        );
        assert!(store.report()[1].restoring);
    }
    let r = crate::http::readiness(std::slice::from_ref(&stats));
    assert!(!r.iter().any(|x| x.contains("restoring")), "{r:?}");
    assert!(store.restoring().is_empty());
    assert!(!store.report()[1].restoring);
}

/// Fails permanently (a processor after the stateful one: its message is dead-lettered).
struct Boom;

#[async_trait::async_trait]
impl Processor for Boom {
    async fn process(&self, _: &mut Message) -> Result<Flow, ProcessError> {
        Err(ProcessError::permanent("boom", "refused"))
    }
}

/// Passes every message on.
struct Pass;

#[async_trait::async_trait]
impl Processor for Pass {
    async fn process(&self, _: &mut Message) -> Result<Flow, ProcessError> {
        Ok(Flow::Continue)
    }
}

/// At-least-once pipeline `[stateful sum, custom second]` with `[state]`, on a mock cluster.
fn alo_pipeline(
    brokers: &str,
    second: Arc<dyn Processor>,
) -> (crate::pipeline::Pipeline, Arc<Store>) {
    use crate::config::{load_pipeline, Env, Global};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "topic = \"in\"\ngroup_id = \"g\"\nauto_offset_reset = \"earliest\"\n\
         [retry]\nmax_attempts = 1\nbackoff = \"1ms\"\nmax_backoff = \"5ms\"\n\
         [state]\n\
         [[processors]]\ntype = \"custom\"\nname = \"sum\"\n\
         [[processors]]\ntype = \"custom\"\nname = \"second\"\n",
    )
    .unwrap();
    let global = Global {
        brokers: brokers.into(),
        ..Global::default()
    };
    let spec = load_pipeline(&path, &global, &Env::default()).unwrap_or_else(|e| panic!("{e}"));
    let producer: Producer = crate::kafka::client::producer_config(brokers, &spec)
        .create()
        .unwrap();
    let store = Store::in_memory(1, producer.clone(), false);
    let sum = Stateful::new(Sum);
    let custom = move |name: &str| match name {
        "sum" => Some(sum.clone()),
        _ => Some(second.clone()),
    };
    let (p, _) = crate::pipeline::for_test(&spec, producer, &custom);
    crate::processors::bind_state(&p.chain, Some(&store)).unwrap();
    (p.with_state(store.clone()), store)
}

fn changelog_records(brokers: &str) -> i64 {
    let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "probe")
        .create()
        .unwrap();
    let (low, high) = c
        .fetch_watermarks("changelog", 0, Duration::from_secs(5))
        .unwrap();
    high - low
}

/// At-least-once: the changelog record is written once the whole chain succeeded (after the
/// outputs, before the offset completes). A message dead-lettered by a later processor leaves
/// no change in the changelog: its change is not in memory either, and a restore (restart,
/// rebalance) would otherwise bring back the change of a message that never completed.
#[tokio::test]
async fn at_least_once_a_dead_lettered_message_leaves_no_change_in_the_changelog() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("in.dlq", 1, 1).unwrap();
    cluster.create_topic("changelog", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();

    let (p, store) = alo_pipeline(&brokers, Arc::new(Boom));
    let m = Message::new("in", 0, 0, Some(b"a"), b"10");
    let out = p.execute(&m, 1).await;
    assert!(
        matches!(out, crate::pipeline::Outcome::DeadLettered),
        "{out:?}"
    );
    assert!(store.snapshot(0).is_empty(), "not applied in memory");
    assert_eq!(
        changelog_records(&brokers),
        0,
        "the change of a dead-lettered message reached the changelog (memory and changelog diverge)"
    );

    // A message whose chain succeeds: its change is in the changelog and in memory.
    let (p, store) = alo_pipeline(&brokers, Arc::new(Pass));
    let m = Message::new("in", 0, 1, Some(b"a"), b"7");
    let out = p.execute(&m, 1).await;
    assert!(
        matches!(out, crate::pipeline::Outcome::Processed),
        "{out:?}"
    );
    assert_eq!(
        store.snapshot(0).get(&b"a"[..]).map(|v| &v[..]),
        Some(&b"7"[..])
    );
    assert_eq!(changelog_records(&brokers), 1);
}

/// `[state]` with `[batch]` is refused: the batch path never applies a staged change (no
/// `written` hook), so every message of a key would see the state the last restore left.
#[test]
fn state_with_batch_is_refused() {
    use crate::config::{load_pipeline, Env, Global};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "topic = \"in\"\nauto_offset_reset = \"earliest\"\n[state]\n[batch]\n\
         [[processors]]\ntype = \"custom\"\nname = \"x\"\n",
    )
    .unwrap();
    let e = load_pipeline(&path, &Global::default(), &Env::default())
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert!(
        e.as_ref().is_err_and(|e| e.contains("[state]")),
        "[state] with [batch] accepted: {e:?}"
    );
}

/// The dedup window in the state is bounded by its ttl: ids older than it leave the state
/// (memory, and at-least-once the changelog, by a tombstone), as the in-memory window's did.
/// Without it every id ever completed stays in memory and in the changelog for ever.
#[tokio::test]
async fn dedup_ids_older_than_the_ttl_leave_the_state() {
    let store = Store::in_memory(1, producer(), false);
    let d = crate::processors::dedup::Dedup::new(&crate::processors::dedup::DedupConfig {
        field: Some("id".into()),
        header: None,
        ttl: "50ms".parse().unwrap(),
        max_ids: 10,
    });
    d.bind_state(Some(&store)).unwrap();
    for i in 0..100 {
        complete(&d, i).await;
    }
    assert_eq!(store.report()[0].keys, 100);
    // Time passing beyond the ttl (not a synchronisation).
    std::thread::sleep(Duration::from_millis(150));
    complete(&d, 100).await;
    complete(&d, 101).await;
    let keys = store.report()[0].keys;
    assert_eq!(
        keys, 2,
        "expired dedup ids still held in the state: {keys} keys"
    );
}

async fn complete(d: &crate::processors::dedup::Dedup, i: i64) {
    let body = format!("{{\"id\": {i}}}");
    let mut m = Message::new("in", 0, i, Some(b"k"), body.as_bytes());
    assert_eq!(d.process(&mut m).await.unwrap(), Flow::Continue);
    d.completed(&m);
}

/// A store with a few KiB of memory reads and snapshots as a plain map whatever the sequence of
/// sets, deletes and reads (entries evicted to the spill file and read back), stays within
/// its cap plus one entry, and a release empties both tiers.
mod spilling {
    use super::*;
    use proptest::prelude::*;

    const CAP: u64 = 4096;

    fn run(ops: Vec<(u8, Option<Vec<u8>>)>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spilling(2, producer(), true, CAP, dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let generation = store.partitions[1].generation.load(Relaxed);
        let mut model: HashMap<Bytes, Bytes> = HashMap::new();
        for (i, (k, v)) in ops.into_iter().enumerate() {
            let key = Bytes::from(format!("key-{k}"));
            let mut m = Message::new("in", 1, i as i64, Some(&key), b"x");
            assert_eq!(store.get(&m, &key).unwrap(), model.get(&key).cloned());
            let v = v.map(Bytes::from);
            rt.block_on(store.stage(&mut m, key.clone(), v.clone()))
                .unwrap();
            store.applied(&m, &key);
            match v {
                Some(v) => model.insert(key, v),
                None => model.remove(&key),
            };
            let one_entry = (ENTRY_COST + 16 + 300) as u64;
            assert!(
                store.bytes() as u64 <= CAP + one_entry,
                "{} bytes in memory, cap {CAP}",
                store.bytes()
            );
        }
        assert_eq!(store.snapshot(1), model);
        store.release(1, generation);
        assert_eq!(store.bytes(), 0);
        assert!(store.snapshot(1).is_empty());
        assert_eq!(store.report()[1].spilled_keys, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn reads_as_a_map_within_its_cap(
            ops in proptest::collection::vec(
                (0u8..60, proptest::option::weighted(0.8, proptest::collection::vec(any::<u8>(), 0..300))),
                1..400,
            )
        ) {
            run(ops);
        }
    }

    #[test]
    fn many_keys_spill_and_come_back() {
        // 200 keys of ~250 bytes: ~75 KiB of state in 4 KiB of memory.
        let ops = (0..200u8)
            .map(|k| (k % 60, Some(vec![k; 250])))
            .chain((0..60u8).map(|k| (k, None)))
            .collect();
        run(ops);
    }

    #[tokio::test]
    async fn debug_describes_keys_in_memory_and_on_disk_without_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spilling(2, producer(), true, CAP, dir.path()).unwrap();
        for i in 0..100i64 {
            let key = Bytes::from(format!("acct-{i:03}"));
            let mut m = Message::new("in", 1, i, Some(&key), b"x");
            store
                .stage(&mut m, key.clone(), Some(Bytes::from(vec![b'v'; 200])))
                .await
                .unwrap();
            store.applied(&m, &key);
        }
        let old = store.describe(b"acct-000");
        assert_eq!(old.len(), 1, "{old:?}");
        assert!(
            !old[0].in_memory && old[0].size == 200 && old[0].updated_ms > 0,
            "{old:?}"
        );
        let new = store.describe(b"acct-099");
        assert!(new[0].in_memory && new[0].partition == 1, "{new:?}");
        assert!(store.describe(b"nobody").is_empty());
        let recent = store.recent(3);
        assert_eq!(recent.len(), 3);
        assert!(recent
            .windows(2)
            .all(|w| w[0].updated_ms >= w[1].updated_ms));
        let json = serde_json::to_string(&recent).unwrap();
        assert!(!json.contains("vvvv"), "a value was printed: {json}");
    }

    #[tokio::test]
    async fn a_release_of_an_earlier_assignment_leaves_a_newer_restore_alone() {
        let store = Store::in_memory(2, producer(), true);
        let key = Bytes::from_static(b"a");
        let mut m = msg(0, "a", 1);
        store
            .stage(&mut m, key.clone(), Some(Bytes::from_static(b"1")))
            .await
            .unwrap();
        store.applied(&m, &key);
        // The supervisor of generation 0 stops after generation 1's restore began.
        store.partitions[1].lock().generation += 1;
        store.release(1, 0);
        assert_eq!(store.snapshot(1).len(), 1, "released by a stale supervisor");
        store.release(1, 1);
        assert!(store.snapshot(1).is_empty());
        assert_eq!(store.bytes(), 0);
    }
}

/// Review of 7a8e695 (state spill): each test failed on that commit.
mod review {
    use super::*;

    /// Finding 1: a worker still running a message of a partition whose state was released
    /// (stopped at the drain deadline) writes nothing computed from the emptied state.
    #[tokio::test]
    async fn a_late_message_of_a_released_partition_writes_nothing_computed_from_an_empty_state() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("in.dlq", 1, 1).unwrap();
        cluster.create_topic("changelog", 1, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let ((p, store), key) = (
            alo_pipeline(&brokers, Arc::new(Pass)),
            Bytes::from_static(b"a"),
        );
        let mut m0 = Message::new("in", 0, 0, Some(b"a"), b"100");
        store
            .stage(&mut m0, key.clone(), Some(Bytes::from_static(b"100")))
            .await
            .unwrap();
        store.applied(&m0, &key);
        let generation = store.partitions[0].lock().generation;
        store.release(0, generation);
        let out = p
            .execute(&Message::new("in", 0, 1, Some(b"a"), b"5"), 1)
            .await;
        assert_eq!(
            changelog_records(&brokers),
            0,
            "a message of a released partition wrote a=5, computed from an empty state ({out:?})"
        );
        // A late completion of the released partition leaves nothing in memory either.
        let mut late = Message::new("in", 0, 2, Some(b"b"), b"1");
        let _ = store
            .stage(&mut late, key.clone(), Some(Bytes::from_static(b"1")))
            .await;
        store.applied(&late, &key);
        store.put_now(
            &late,
            Bytes::from_static(b"c"),
            Some(Bytes::from_static(b"1")),
        );
        assert_eq!(store.bytes(), 0);
        assert!(store.snapshot(0).is_empty());
    }

    /// Finding 2: a release that checked its generation and then waited for the lock leaves a
    /// newer restore's state alone.
    #[test]
    fn a_release_that_lost_the_race_to_a_newer_restore_leaves_its_state_alone() {
        let store = Store::in_memory(2, producer(), true);
        let (s, p) = (store.clone(), &store.partitions[1]);
        let mut inner = p.lock();
        // Generation 0's supervisor stops: its release waits for the lock.
        let release = std::thread::spawn(move || s.release(1, 0));
        std::thread::sleep(Duration::from_millis(200));
        // Meanwhile generation 1's restore begins and reads a record.
        inner.generation += 1;
        let d = inner.put(Bytes::from_static(b"a"), Some(Bytes::from_static(b"1")), 0);
        store.account(d);
        drop(inner);
        release.join().unwrap();
        assert_eq!(
            store.snapshot(1).len(),
            1,
            "a stale release emptied the state a newer restore is reading"
        );
    }

    /// Finding 3: the blocking reader of a dropped restore (its task run late) never touches
    /// the partition again.
    #[tokio::test]
    async fn the_reader_of_a_dropped_restore_never_touches_the_partition_again() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("changelog", 2, 1).unwrap();
        let mut store = Store::in_memory(2, producer(), true);
        Arc::get_mut(&mut store)
            .unwrap()
            .client
            .set("bootstrap.servers", cluster.bootstrap_servers());
        let key = Bytes::from_static(b"a");
        let mut m = msg(0, "a", 1);
        store
            .stage(&mut m, key.clone(), Some(Bytes::from_static(b"7")))
            .await
            .unwrap();
        store.applied(&m, &key);
        for cancelled in [true, false] {
            // Generation 0's reader, its restore dropped, runs now against generation 0 (live).
            let (s, c) = (store.clone(), std::sync::atomic::AtomicBool::new(cancelled));
            let _ = tokio::task::spawn_blocking(move || s.read_changelog(1, 0, &c))
                .await
                .unwrap();
            assert_eq!(
                store.snapshot(1).get(&key[..]).map(|v| &v[..]),
                Some(&b"7"[..]),
                "a cancelled restore's reader emptied the live state"
            );
        }
    }

    /// Finding 4: a partition full of idle keys does not push another partition's keys out.
    #[tokio::test]
    async fn a_full_idle_partition_does_not_push_out_another_partitions_hot_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spilling(2, producer(), true, 4096, dir.path()).unwrap();
        for (p, n) in [(0, 17), (1, 10)] {
            for i in 0..n {
                let key = Bytes::from(format!("p{p}-{i:02}"));
                let mut m = Message::new("in", p, i, Some(&key), b"x");
                store
                    .stage(&mut m, key.clone(), Some(Bytes::from(vec![b'v'; 100])))
                    .await
                    .unwrap();
                store.applied(&m, &key);
            }
        }
        let r = store.report();
        assert!(
            r[1].keys >= 5,
            "partition 1's hot keys evicted, partition 0's idle ones kept: {r:?}"
        );
        assert!(store.bytes() as u64 <= 4096 + 2 * 300, "{r:?}");
    }

    /// Finding 5: a read of a key in memory does not wait for the spill file's writer.
    #[test]
    fn a_read_of_a_key_in_memory_does_not_wait_for_the_spill_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spilling(2, producer(), true, 4096, dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let stage = |m: &mut Message, k: &'static str, n: usize| {
            rt.block_on(store.stage(
                m,
                Bytes::from_static(k.as_bytes()),
                Some(Bytes::from(vec![b'v'; n])),
            ))
            .unwrap();
        };
        let mut hot = Message::new("in", 1, 0, Some(b"hot"), b"x");
        stage(&mut hot, "hot", 10);
        store.applied(&hot, &Bytes::from_static(b"hot"));
        // Another writer of the spill file (partition 0's eviction) holds redb's writer.
        let ((hold, held), s) = (std::sync::mpsc::channel::<()>(), store.clone());
        let writer = std::thread::spawn(move || {
            s.spill
                .as_ref()
                .unwrap()
                .write(0, &spill::Batch::default(), || held.recv().is_ok())
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(100));
        // Partition 1 goes over its part: its eviction waits for that writer.
        let mut big = Message::new("in", 1, 1, Some(b"big"), b"x");
        stage(&mut big, "big", 5000);
        let s = store.clone();
        let evicting = std::thread::spawn(move || s.applied(&big, &Bytes::from_static(b"big")));
        std::thread::sleep(Duration::from_millis(100));
        let ((tx, rx), s) = (std::sync::mpsc::channel(), store.clone());
        std::thread::spawn(move || {
            let m = Message::new("in", 1, 2, Some(b"hot"), b"x");
            tx.send(
                s.get(&m, &Bytes::from_static(b"hot"))
                    .ok()
                    .flatten()
                    .is_some(),
            )
        });
        let answered = rx.recv_timeout(Duration::from_secs(1));
        hold.send(()).unwrap();
        writer.join().unwrap();
        evicting.join().unwrap();
        assert_eq!(
            answered,
            Ok(true),
            "a read of an in-memory key waited for another partition's spill write"
        );
        assert!(store.describe(b"big")[0].size == 5000);
    }

    /// Finding 6: dedup ids within their ttl stay within the memory cap (their expiry index
    /// goes to the spill file), and still expire from there.
    #[tokio::test]
    async fn dedup_ids_within_the_ttl_stay_within_the_memory_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spilling(1, producer(), true, 4096, dir.path()).unwrap();
        store.set_expiry(Duration::from_millis(300));
        let id = |i: i64| {
            let mut key = DEDUP_PREFIX.to_vec();
            key.extend_from_slice(i.to_string().as_bytes());
            Bytes::from(key)
        };
        for i in 0..500i64 {
            let m = Message::new("in", 0, i, Some(b"k"), b"{}");
            store.put_now(
                &m,
                id(i),
                Some(Bytes::copy_from_slice(&now_ms().to_be_bytes())),
            );
        }
        assert!(
            store.bytes() <= 4096 + 256,
            "{} bytes in memory for a 4096-byte cap",
            store.bytes()
        );
        assert_eq!(store.snapshot(0).len(), 500);
        // After the ttl, new ids expire the old ones, the spilled index's first.
        std::thread::sleep(Duration::from_millis(400));
        for i in 500..520i64 {
            let m = Message::new("in", 0, i, Some(b"k"), b"{}");
            store.put_now(
                &m,
                id(i),
                Some(Bytes::copy_from_slice(&now_ms().to_be_bytes())),
            );
        }
        let left = store.snapshot(0);
        assert!(
            !left.contains_key(&id(0)) && left.len() < 500,
            "{} ids left; id 0 still there: {}",
            left.len(),
            left.contains_key(&id(0))
        );
    }
}
