//! `delivery = "exactly_once"` on Apache Kafka: kill -9 at ten moments while input arrives,
//! a two-member rebalance mid-stream, and a zombie member; a `read_committed` reader of the
//! output sees every input exactly once, in per-key order. The same output read
//! `read_uncommitted` holds the aborted records, so the check can fail.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::ordered::{check_output, output_progress, produce_until, wait_progress};
use support::{unique, Broker, Keyflow};

fn pipeline(input: &str, output: &str, group: &str, extra: &str) -> String {
    format!(
        r#"
name = "eos"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
delivery = "exactly_once"
session_timeout = "4s"
drain_timeout = "2s"
commit_interval = "200ms"
{extra}

[[processors]]
type = "simulate"
latency = {{ distribution = "uniform", min = "0ms", max = "2ms" }}

[[processors]]
type = "forward"
topic = "{output}"
"#
    )
}

fn member(broker: &Broker, toml: &str, instance: &str) -> Keyflow {
    Keyflow::start_many(
        &broker.bootstrap,
        &[toml],
        &[("KEYFLOW_INSTANCE_ID", instance)],
    )
}

/// Reads the output both ways once the group committed the end of the input: returns
/// (read_committed duplicates, read_uncommitted records, read_committed records).
fn read_both(
    broker: &Broker,
    output: &str,
    expected: &HashMap<String, usize>,
) -> (usize, usize, usize) {
    let n: usize = expected.values().sum();
    let committed = broker.consume_all_isolated(
        output,
        n,
        Duration::from_secs(60),
        Duration::from_secs(2),
        "read_committed",
    );
    let dups = check_output(&committed, expected);
    let all = broker.consume_all_isolated(
        output,
        n,
        Duration::from_secs(60),
        Duration::from_secs(2),
        "read_uncommitted",
    );
    (dups, all.len(), committed.len())
}

#[test]
fn every_input_exactly_once_through_ten_kills_and_a_rebalance() {
    const KEYS: usize = 200;
    const PARTITIONS: i32 = 4;
    const CRASHES: usize = 10;
    let broker = Broker::start();
    let (input, output, group) = (unique("eos-in"), unique("eos-out"), unique("eos-g"));
    broker.create_topic_blocking(&input, PARTITIONS);
    broker.create_topic_blocking(&output, PARTITIONS);
    broker.create_topic_blocking(&format!("{input}.dlq"), 1);
    let toml = pipeline(&input, &output, &group, "max_in_flight = 50");
    let expected: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    let produced = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut kills = Vec::new();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let producer =
            scope.spawn(|| produce_until(&broker, &input, KEYS, &stop, &produced, &expected));
        for crash in 0..CRASHES {
            let before = produced.load(Relaxed);
            support::wait_until(
                Duration::from_secs(30),
                Duration::from_millis(20),
                || produced.load(Relaxed) >= before + 1000,
                "a backlog while keyflow is down",
            );
            let out_before = output_progress(&broker, &output);
            let backlog = produced.load(Relaxed) as i64;
            let mut kf = member(&broker, &toml, "a");
            let moment = if crash % 2 == 0 {
                // In the burst after the restart: transactions open, work in flight.
                support::wait_until(
                    Duration::from_secs(90),
                    Duration::from_millis(5),
                    || output_progress(&broker, &output) >= out_before + 300,
                    "the burst after a restart",
                );
                "burst"
            } else {
                support::wait_until(
                    Duration::from_secs(90),
                    Duration::from_millis(20),
                    || output_progress(&broker, &output) >= backlog + 500,
                    "caught up and streaming",
                );
                "steady"
            };
            kf.kill9();
            kills.push(moment);
        }
        // Two members mid-stream: B joins (a rebalance), then leaves with SIGTERM (another).
        let mut a = member(&broker, &toml, "a");
        let mut b = member(&broker, &toml, "b");
        b.wait_for_log("partition supervisor started", Duration::from_secs(60));
        broker.wait_group_stable(&group, 2, Duration::from_secs(60));
        wait_progress(
            &broker,
            &output,
            499,
            Duration::from_secs(60),
            "progress with two members",
        );
        b.sigterm();
        assert!(
            b.wait_exit(Duration::from_secs(30)).success(),
            "{}",
            b.log_tail(30)
        );
        stop.store(true, Relaxed);
        // The producer may be inside its last batch: the end is read once it is written (a
        // batch landing after the read put the commits past `end` for good).
        producer.join().expect("producer thread");
        let end = broker.high_watermarks(&input);
        support::wait_until(
            Duration::from_secs(120),
            Duration::from_millis(200),
            || broker.committed_offsets(&group, &input, PARTITIONS) == end,
            "the last member commits the end of the input",
        );
        a.sigterm();
        assert!(
            a.wait_exit(Duration::from_secs(30)).success(),
            "{}",
            a.log_tail(30)
        );
    });
    let expected = expected.into_inner().unwrap();
    let n: usize = expected.values().sum();
    let (dups, uncommitted, committed) = read_both(&broker, &output, &expected);
    println!(
        "exactly-once: {n} inputs, {CRASHES} kill -9 ({kills:?}) and a 2-member rebalance in {:.1?}: read_committed {committed} records, {dups} duplicates, 0 missing; read_uncommitted {uncommitted} records ({} aborted)",
        started.elapsed(),
        uncommitted - committed
    );
    assert_eq!(dups, 0, "a read_committed reader saw inputs twice");
    assert_eq!(committed, n, "read_committed: every input exactly once");
    assert!(
        uncommitted > committed,
        "kill -9 mid-transaction leaves aborted records in the log ({uncommitted} read_uncommitted vs {committed}): without them this test could not tell"
    );
}

#[test]
fn a_zombie_member_cannot_commit() {
    const KEYS: usize = 100;
    const PARTITIONS: i32 = 4;
    let broker = Broker::start();
    let (input, output, group) = (
        unique("zombie-in"),
        unique("zombie-out"),
        unique("zombie-g"),
    );
    broker.create_topic_blocking(&input, PARTITIONS);
    broker.create_topic_blocking(&output, PARTITIONS);
    let toml = pipeline(&input, &output, &group, "");
    let expected: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    let produced = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let producer =
            scope.spawn(|| produce_until(&broker, &input, KEYS, &stop, &produced, &expected));
        let mut a = member(&broker, &toml, "a");
        a.wait_for_log("partition supervisor started", Duration::from_secs(60));
        let mut b = member(&broker, &toml, "b");
        b.wait_for_log("partition supervisor started", Duration::from_secs(60));
        broker.wait_group_stable(&group, 2, Duration::from_secs(60));
        wait_progress(
            &broker,
            &output,
            499,
            Duration::from_secs(60),
            "progress with two members",
        );
        // A freezes mid-transaction; its session expires and B takes its partitions over.
        a.signal(libc::SIGSTOP);
        let frozen = Instant::now();
        broker.wait_group_stable(&group, 1, Duration::from_secs(60));
        wait_progress(
            &broker,
            &output,
            499,
            Duration::from_secs(60),
            "B processing A's partitions",
        );
        // A wakes up believing it still owns them: the broker refuses its offsets (stale
        // generation), so its open transaction, and every write in it, is aborted; A rewinds
        // and rejoins as a new member.
        let before = a.log().len();
        a.signal(libc::SIGCONT);
        support::wait_until(
            Duration::from_secs(60),
            Duration::from_millis(50),
            || a.log()[before..].contains("exactly-once: rewound"),
            "the zombie's transaction aborted and its pipeline rewound",
        );
        let log = a.log()[before..].to_string();
        let refused = log
            .lines()
            .find(|l| l.contains("transaction aborted"))
            .unwrap_or_default()
            .to_string();
        println!(
            "zombie: frozen {:.1?}; then: {}",
            frozen.elapsed(),
            &refused[..refused.len().min(400)]
        );
        assert!(!refused.is_empty(), "{}", a.log_tail(30));
        stop.store(true, Relaxed);
        // The producer may be inside its last batch: the end is read once it is written (a
        // batch landing after the read put the commits past `end` for good).
        producer.join().expect("producer thread");
        let end = broker.high_watermarks(&input);
        support::wait_until(
            Duration::from_secs(120),
            Duration::from_millis(200),
            || broker.committed_offsets(&group, &input, PARTITIONS) == end,
            "the group commits the end of the input",
        );
        // One at a time, each from a stable group: a final commit made while the group is
        // rebalancing (the zombie rejoining, the other member leaving) is refused, which
        // aborts it (nothing is lost or doubled, but the exit is 1).
        broker.wait_group_stable(&group, 2, Duration::from_secs(60));
        b.sigterm();
        assert!(
            b.wait_exit(Duration::from_secs(30)).success(),
            "{}",
            b.log_tail(30)
        );
        broker.wait_group_stable(&group, 1, Duration::from_secs(60));
        a.sigterm();
        assert!(
            a.wait_exit(Duration::from_secs(30)).success(),
            "{}",
            a.log_tail(30)
        );
    });
    let expected = expected.into_inner().unwrap();
    let n: usize = expected.values().sum();
    let (dups, uncommitted, committed) = read_both(&broker, &output, &expected);
    println!("zombie: {n} inputs; read_committed {committed} records, {dups} duplicates; read_uncommitted {uncommitted}");
    assert_eq!(
        dups, 0,
        "the zombie's writes reached read_committed readers"
    );
    assert_eq!(committed, n);
}
