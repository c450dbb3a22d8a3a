//! Smoke test of the integration-test support module against a real Apache Kafka broker.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};

use support::{Broker, Keyflow, OutMsg};

const PARTITIONS: i32 = 4;
const MESSAGES: usize = 10_000;

fn key_of(i: usize) -> Vec<u8> {
    format!("key-{}", i % 97).into_bytes()
}

fn payload_of(i: usize) -> Vec<u8> {
    format!("payload-{i:08}-{}", "x".repeat(80)).into_bytes()
}

#[test]
fn broker_produce_consume_commit() {
    let t0 = Instant::now();
    let broker = Broker::start();
    eprintln!(
        "broker (incl. the Kafka download if needed) ready in {:?}",
        t0.elapsed()
    );

    let topic = support::unique("smoke");
    futures::executor::block_on(broker.create_topic(&topic, PARTITIONS));
    assert_eq!(
        broker.partition_count(&topic, Duration::from_secs(5)),
        PARTITIONS as usize
    );
    // Creating it again is accepted.
    broker.create_topic_blocking(&topic, PARTITIONS);

    let t = Instant::now();
    let produced = broker.produce_keyed(
        &topic,
        (0..MESSAGES).map(|i| (Some(key_of(i)), payload_of(i))),
    );
    eprintln!(
        "produced {} in {:?}: {:?}",
        produced.count,
        t.elapsed(),
        produced.next_offsets
    );
    assert_eq!(produced.count, MESSAGES);
    assert_eq!(produced.next_offsets.values().sum::<i64>(), MESSAGES as i64);

    let t = Instant::now();
    let msgs = broker.consume_all(&topic, MESSAGES, Duration::from_secs(30));
    eprintln!("consumed {} in {:?}", msgs.len(), t.elapsed());
    assert_eq!(msgs.len(), MESSAGES, "duplicates or extra messages");
    let seen: HashSet<(Vec<u8>, Vec<u8>)> = msgs
        .iter()
        .map(|m| (m.key.clone().unwrap(), m.payload.clone()))
        .collect();
    let expected: HashSet<(Vec<u8>, Vec<u8>)> =
        (0..MESSAGES).map(|i| (key_of(i), payload_of(i))).collect();
    assert_eq!(seen, expected);
    // Keyed partitioning: each key on one partition, in production order there.
    let mut key_partition: HashMap<Vec<u8>, i32> = HashMap::new();
    let mut last_offset: BTreeMap<i32, i64> = BTreeMap::new();
    for m in &msgs {
        let p = *key_partition
            .entry(m.key.clone().unwrap())
            .or_insert(m.partition);
        assert_eq!(p, m.partition, "a key spans partitions");
        let prev = last_offset.insert(m.partition, m.offset);
        assert!(prev.is_none_or(|o| o < m.offset), "offsets out of order");
    }
    let ends: BTreeMap<i32, i64> = last_offset.iter().map(|(p, o)| (*p, o + 1)).collect();
    assert_eq!(ends, produced.next_offsets);
    assert_eq!(broker.count_messages(&topic), MESSAGES);

    // A real group member: subscribe, read everything, commit, read the commit back.
    let group = support::unique("smoke-group");
    let t = Instant::now();
    {
        let consumer = broker.group_consumer(&group);
        consumer.subscribe(&[&topic]).unwrap();
        let mut n = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while n < MESSAGES {
            assert!(Instant::now() < deadline, "group consumer read only {n}");
            if let Some(r) = consumer.poll(Duration::from_millis(100)) {
                r.expect("consumer error");
                n += 1;
            }
        }
        eprintln!("group consumer read {n} in {:?}", t.elapsed());
        let desc = broker.wait_group_stable(&group, 1, Duration::from_secs(20));
        assert_eq!(desc.members, 1);
        consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    }
    broker.wait_group(&group, Duration::from_secs(20), "Empty", |g| g.members == 0);
    let committed = broker.committed_offsets(&group, &topic, PARTITIONS);
    let want: Vec<i64> = (0..PARTITIONS)
        .map(|p| produced.next_offsets.get(&p).copied().unwrap_or(-1))
        .collect();
    assert_eq!(committed, want);

    // Never-committed group: all -1. Simple (non-member) commit + read back.
    let other = support::unique("smoke-other");
    assert_eq!(
        broker.committed_offsets(&other, &topic, PARTITIONS),
        vec![-1; PARTITIONS as usize]
    );
    broker.commit_offsets(&other, &topic, &[(0, 7), (2, 9)]);
    assert_eq!(
        broker.committed_offsets(&other, &topic, PARTITIONS),
        vec![7, -1, 9, -1]
    );
}

#[test]
fn explicit_partitions_headers_and_bulk_throughput() {
    let broker = Broker::start();
    let topic = support::unique("smoke-parts");
    broker.create_topic_blocking(&topic, 3);

    let produced =
        broker.produce_to_partition(&topic, (0..30).map(|i| (i % 3, None, vec![i as u8])));
    assert_eq!(
        produced.next_offsets,
        BTreeMap::from([(0, 10), (1, 10), (2, 10)])
    );
    broker.produce(
        &topic,
        [OutMsg {
            partition: Some(1),
            key: Some(b"k".to_vec()),
            payload: b"with-headers".to_vec(),
            headers: vec![("trace".into(), b"abc".to_vec()), ("n".into(), vec![1, 2])],
        }],
    );
    let msgs = broker.consume_all(&topic, 31, Duration::from_secs(30));
    assert_eq!(msgs.len(), 31);
    for m in &msgs {
        if m.payload == b"with-headers" {
            assert_eq!((m.partition, m.offset), (1, 10));
            assert_eq!(
                m.headers,
                vec![
                    ("trace".to_string(), b"abc".to_vec()),
                    ("n".to_string(), vec![1, 2])
                ]
            );
        } else {
            assert_eq!(m.partition, m.payload[0] as i32 % 3);
            assert!(m.headers.is_empty() && m.key.is_none());
        }
    }

    // 200k messages of ~100 bytes, auto-created topic.
    let bulk = support::unique("smoke-bulk");
    let payload = vec![b'p'; 100];
    let t = Instant::now();
    let produced = broker.produce_keyed(
        &bulk,
        (0..200_000u32).map(|i| (Some(i.to_be_bytes().to_vec()), payload.clone())),
    );
    let elapsed = t.elapsed();
    eprintln!("produced 200k x 100 B in {elapsed:?}");
    assert_eq!(produced.count, 200_000);
    assert!(
        elapsed < Duration::from_secs(30),
        "bulk produce too slow: {elapsed:?}"
    );
    let t = Instant::now();
    let n = broker
        .consume_all(&bulk, 200_000, Duration::from_secs(60))
        .len();
    eprintln!("consumed {n} in {:?}", t.elapsed());
    assert_eq!(n, 200_000);
}

#[test]
fn wait_until_and_rss() {
    let me = std::process::id();
    assert!(support::rss_kib(me) > 0);
    assert!(support::peak_rss_kib(me) >= support::rss_kib(me) / 2);
    let t = Instant::now();
    support::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || t.elapsed() > Duration::from_millis(50),
        "50ms to pass",
    );
}

#[test]
fn keyflow_process_harness() {
    // `--help` exits successfully with any clap CLI; exercises spawn, log capture, wait_exit.
    let mut k = Keyflow::start_with_args(&["--help"], &[]);
    assert!(k.pid() > 0);
    let status = k.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "keyflow --help failed: {status}\n{}",
        k.log_tail(50)
    );
    assert!(!k.is_running());
}

/// Apache Kafka 4 serves the KIP-848 consumer group protocol (`group.protocol=consumer`):
/// a member gets its assignment, reads and commits, and the support's `describe_group` sees the
/// group as Stable with one member of type Consumer (classic DescribeGroups says "not found").
#[test]
fn consumer_group_protocol_kip848_is_served() {
    let broker = Broker::shared();
    let topic = support::unique("smoke-848");
    broker.create_topic_blocking(&topic, 3);
    let produced = broker.produce_keyed(
        &topic,
        (0..300).map(|i| (Some(format!("k{i}").into_bytes()), b"v".to_vec())),
    );
    let group = support::unique("smoke-848-g");
    let t = Instant::now();
    let consumer: rdkafka::consumer::BaseConsumer = broker
        .client_config()
        .set("group.id", &group)
        .set("group.protocol", "consumer")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("a consumer under group.protocol=consumer");
    consumer.subscribe(&[&topic]).unwrap();
    let mut n = 0;
    let mut first = None;
    while n < 300 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "read only {n} of 300"
        );
        if let Some(r) = consumer.poll(Duration::from_millis(100)) {
            r.expect("consumer error");
            first.get_or_insert(t.elapsed());
            n += 1;
        }
    }
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    let desc = broker.describe_group(&group);
    eprintln!(
        "KIP-848: first message {:?} after subscribe; DescribeGroups says {desc:?}",
        first.unwrap()
    );
    assert!(
        desc.is_stable() && desc.members == 1 && desc.protocol_type == "Consumer",
        "{desc:?}"
    );
    let committed = broker.committed_offsets(&group, &topic, 3);
    let want: Vec<i64> = (0..3).map(|p| produced.next_offsets[&p]).collect();
    assert_eq!(committed, want);
}
