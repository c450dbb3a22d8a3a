//! keyflow as a separate process against a real Apache Kafka broker: graceful shutdown, kill -9 at
//! three moments, rebalances between members, the CLI (`validate`, `demo`). The shutdown, crash
//! and rebalance tests run under both consumer group protocols: `classic` and `consumer`
//! (KIP-848, where the broker owns the session timeout: `group.consumer.session.timeout.ms`,
//! 6 s on the test broker).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{unique, Broker, ConsumedMsg, Keyflow};

/// The consumer group protocol a test runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Classic,
    Consumer,
}

impl Protocol {
    /// The pipeline lines that choose the protocol. Under `consumer` the session timeout is the
    /// broker's, so the pipeline sets none.
    fn settings(self, session: &str) -> String {
        match self {
            Protocol::Classic => {
                format!("group_protocol = \"classic\"\nsession_timeout = \"{session}\"\n")
            }
            Protocol::Consumer => "group_protocol = \"consumer\"\n".to_string(),
        }
    }
}

fn pipeline(
    protocol: Protocol,
    input: &str,
    output: &str,
    group: &str,
    extra: &str,
    latency: &str,
) -> String {
    let drain = if extra.contains("drain_timeout") {
        ""
    } else {
        "drain_timeout = \"2s\"\n"
    };
    let settings = protocol.settings("4s");
    format!(
        r#"
name = "p"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
{settings}{drain}{extra}

[[processors]]
type = "simulate"
latency = {latency}

[[processors]]
type = "forward"
topic = "{output}"
"#
    )
}

fn parse(payload: &[u8]) -> (String, usize) {
    let s = std::str::from_utf8(payload).unwrap();
    let (k, n) = s.rsplit_once(':').unwrap();
    (k.to_string(), n.parse().unwrap())
}

fn output_progress(broker: &Broker, topic: &str) -> i64 {
    broker.high_watermarks(topic).iter().sum()
}

/// Every (key, seq) of `expected` is in `out`; per key the first occurrences are in sequence
/// order (duplicates may repeat earlier ones). Returns the number of duplicates.
fn check_output(out: &[ConsumedMsg], expected: &HashMap<String, usize>) -> usize {
    let mut by_partition: BTreeMap<i32, Vec<&ConsumedMsg>> = BTreeMap::new();
    for m in out {
        by_partition.entry(m.partition).or_default().push(m);
    }
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut dups = 0;
    for msgs in by_partition.values_mut() {
        msgs.sort_by_key(|m| m.offset);
        for m in msgs.iter() {
            let (k, n) = parse(&m.payload);
            let want = next.entry(k.clone()).or_insert(1);
            if n == *want {
                *want += 1;
            } else if n < *want {
                dups += 1; // a redelivered duplicate of an earlier message
            } else {
                panic!(
                    "key {k}: seq {n} written before seq {want} (output partition {}, offset {})",
                    m.partition, m.offset
                );
            }
        }
    }
    for (k, &count) in expected {
        assert_eq!(
            next.get(k).copied().unwrap_or(1) - 1,
            count,
            "key {k}: messages missing from the output"
        );
    }
    dups
}

/// Input and output topics of 4 partitions; 4,000 messages `p<partition>:<seq>` on the input.
fn four_partitions_loaded(
    broker: &Broker,
    prefix: &str,
) -> (String, String, String, support::Produced) {
    let (input, output, group) = (
        unique(&format!("{prefix}-in")),
        unique(&format!("{prefix}-out")),
        unique(&format!("{prefix}-g")),
    );
    broker.create_topic_blocking(&input, 4);
    broker.create_topic_blocking(&output, 4);
    let produced = broker.produce_to_partition(
        &input,
        (0..4000).map(|i| {
            (
                i % 4,
                Some(format!("k{}", i % 40).into_bytes()),
                format!("p{}:{}", i % 4, i / 4 + 1).into_bytes(),
            )
        }),
    );
    (input, output, group, produced)
}

#[test]
fn sigterm_drains_commits_and_exits_zero_classic() {
    sigterm_drains_commits_and_exits_zero(Protocol::Classic);
}

#[test]
fn sigterm_drains_commits_and_exits_zero_consumer_protocol() {
    sigterm_drains_commits_and_exits_zero(Protocol::Consumer);
}

fn sigterm_drains_commits_and_exits_zero(protocol: Protocol) {
    let broker = Broker::start();
    // Part 1: everything processed, then SIGTERM: committed = last offset + 1 everywhere.
    let (input, output, group, produced) = four_partitions_loaded(&broker, "sd");
    let mut kf = Keyflow::start(
        &broker.bootstrap,
        &pipeline(
            protocol,
            &input,
            &output,
            &group,
            "",
            r#"{ distribution = "uniform", min = "0ms", max = "1ms" }"#,
        ),
    );
    broker.consume_all(&output, 4000, Duration::from_secs(120));
    kf.sigterm();
    let status = kf.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        kf.log_tail(30)
    );
    let committed = broker.committed_offsets(&group, &input, 4);
    let want: Vec<i64> = (0..4).map(|p| produced.next_offsets[&p]).collect();
    assert_eq!(
        committed, want,
        "committed offset of every partition = last processed + 1"
    );

    // Part 2: mid-stream, one message at a time per partition (ordering = "partition"): after
    // SIGTERM the committed offset of each partition equals the number of its messages
    // processed, i.e. last processed + 1.
    let (input, output, group, _) = four_partitions_loaded(&broker, "sd2");
    let mut kf = Keyflow::start(
        &broker.bootstrap,
        &pipeline(
            protocol,
            &input,
            &output,
            &group,
            "ordering = \"partition\"",
            r#"{ distribution = "fixed", value = "5ms" }"#,
        ),
    );
    support::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || output_progress(&broker, &output) >= 400,
        "400 messages processed",
    );
    kf.sigterm();
    let status = kf.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        kf.log_tail(30)
    );
    let committed = broker.committed_offsets(&group, &input, 4);
    let total: i64 = committed.iter().sum();
    assert!(
        total >= 400 && total < 4000,
        "stopped mid-stream: {committed:?}"
    );
    let out = broker.consume_all(&output, total as usize, Duration::from_secs(60));
    let mut per_source = [0i64; 4];
    for m in &out {
        let (p, _) = parse(&m.payload);
        per_source[p[1..].parse::<usize>().unwrap()] += 1;
    }
    assert_eq!(per_source.to_vec(), committed, "processed per partition == committed offset (no message lost or processed past the commit)");
    println!(
        "shutdown ({protocol:?}): full run committed {want:?}; mid-stream committed {committed:?}"
    );
}

#[test]
fn kill_9_at_three_moments_loses_nothing_classic() {
    kill_9_at_three_moments_loses_nothing(Protocol::Classic);
}

#[test]
fn kill_9_at_three_moments_loses_nothing_consumer_protocol() {
    kill_9_at_three_moments_loses_nothing(Protocol::Consumer);
}

fn kill_9_at_three_moments_loses_nothing(protocol: Protocol) {
    const N: usize = 10_000;
    const KEYS: usize = 200;
    const PARTITIONS: i32 = 4;
    const MAX_IN_FLIGHT: usize = 20;
    let broker = Broker::start();
    let (input, output, group) = (unique("crash-in"), unique("crash-out"), unique("crash-g"));
    broker.create_topic_blocking(&input, PARTITIONS);
    broker.create_topic_blocking(&output, PARTITIONS);
    let mut expected = HashMap::new();
    broker.produce_keyed(
        &input,
        (0..N).map(|i| {
            let k = format!("k{}", i % KEYS);
            let seq = expected.entry(k.clone()).or_insert(0);
            *seq += 1;
            (
                Some(k.clone().into_bytes()),
                format!("{k}:{seq}").into_bytes(),
            )
        }),
    );
    // 20 ms per message and 20 in flight per partition: ~4,000 msg/s, slow enough to be killed
    // mid-stream; commits every 10 ms keep the redelivered window small.
    let toml = pipeline(
        protocol,
        &input,
        &output,
        &group,
        &format!("max_in_flight = {MAX_IN_FLIGHT}\ncommit_interval = \"10ms\""),
        r#"{ distribution = "fixed", value = "20ms" }"#,
    );
    let mut kills = Vec::new();
    for at in [1_500i64, 4_500, 7_500] {
        let mut kf = Keyflow::start(&broker.bootstrap, &toml);
        support::wait_until(
            Duration::from_secs(90),
            Duration::from_millis(10),
            || output_progress(&broker, &output) >= at,
            "progress before the kill",
        );
        kf.kill9();
        kills.push(output_progress(&broker, &output));
    }
    let mut kf = Keyflow::start(&broker.bootstrap, &toml);
    let out =
        broker.consume_all_with_quiet(&output, N, Duration::from_secs(180), Duration::from_secs(3));
    kf.sigterm();
    assert!(kf.wait_exit(Duration::from_secs(30)).success());
    let dups = check_output(&out, &expected);
    // What a crash may redeliver: the messages in flight, plus those completed since the last
    // commit the broker acknowledged. Commits are asynchronous every 10 ms, and Apache Kafka
    // acknowledges an OffsetCommit in 10-150 ms on a loaded 2-core machine (tansu, in memory,
    // took under 1 ms), so allow 200 ms of completions at the configured rate (20 in flight ×
    // 4 partitions / 20 ms = 4,000 msg/s). A commit loop that stopped would redeliver thousands
    // per crash (everything since the previous restart). Issue 9 (completed offsets in the commit
    // metadata, commits acknowledged before they count) is what removes the second term.
    let in_flight = MAX_IN_FLIGHT * PARTITIONS as usize;
    let rate = in_flight as f64 / 0.020;
    let bound = in_flight + (rate * 0.200) as usize;
    println!("crash ({protocol:?}): killed at output counts {kills:?}; {} output records for {N} inputs: {dups} duplicates over 3 crashes ({:.1} per crash; bound {bound} = in flight {in_flight} + 200 ms of completions)", out.len(), dups as f64 / 3.0);
    assert!(
        dups <= 3 * bound,
        "{dups} duplicates for 3 crashes exceeds 3 × {bound} (in flight + 200 ms of completions)"
    );
}

/// Waits until `more` output records beyond the current count have been written.
fn wait_progress(broker: &Broker, output: &str, more: i64, timeout: Duration, what: &str) {
    let before = output_progress(broker, output);
    support::wait_until(
        timeout,
        Duration::from_millis(50),
        || output_progress(broker, output) > before + more,
        what,
    );
}

/// Starts a member and waits until it processes and the group is stable with `members`.
/// Returns it with the time from its start to its first partition supervisor.
fn join_member(broker: &Broker, toml: &str, group: &str, members: usize) -> (Keyflow, Duration) {
    let t = Instant::now();
    let mut k = Keyflow::start(&broker.bootstrap, toml);
    k.wait_for_log("partition supervisor started", Duration::from_secs(60));
    let joined = t.elapsed();
    broker.wait_group_stable(group, members, Duration::from_secs(60));
    (k, joined)
}

#[test]
fn members_join_leave_and_die_without_loss_or_reordering_classic() {
    members_join_leave_and_die_without_loss_or_reordering(Protocol::Classic);
}

#[test]
fn members_join_leave_and_die_without_loss_or_reordering_consumer_protocol() {
    members_join_leave_and_die_without_loss_or_reordering(Protocol::Consumer);
}

fn members_join_leave_and_die_without_loss_or_reordering(protocol: Protocol) {
    const KEYS: usize = 100;
    const PARTITIONS: i32 = 8;
    let broker = Arc::new(Broker::start());
    let (input, output, group) = (unique("rb-in"), unique("rb-out"), unique("rb-g"));
    broker.create_topic_blocking(&input, PARTITIONS);
    broker.create_topic_blocking(&output, PARTITIONS);
    let toml = pipeline(
        protocol,
        &input,
        &output,
        &group,
        "drain_timeout = \"3s\"\ncommit_interval = \"100ms\"",
        r#"{ distribution = "uniform", min = "1ms", max = "3ms" }"#,
    )
    .replace("session_timeout = \"4s\"", "session_timeout = \"6s\"");

    // A producer writes 300 msg/s for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (stop, broker, input) = (stop.clone(), broker.clone(), input.clone());
        std::thread::spawn(move || {
            let mut seq = vec![0usize; KEYS];
            let mut i = 0usize;
            while !stop.load(Relaxed) {
                let batch: Vec<_> = (0..30)
                    .map(|_| {
                        let k = i % KEYS;
                        i += 1;
                        seq[k] += 1;
                        (
                            Some(format!("k{k}").into_bytes()),
                            format!("k{k}:{}", seq[k]).into_bytes(),
                        )
                    })
                    .collect();
                broker.produce_keyed(&input, batch);
                std::thread::sleep(Duration::from_millis(100));
            }
            seq.iter()
                .enumerate()
                .map(|(k, &n)| (format!("k{k}"), n))
                .collect::<HashMap<_, _>>()
        })
    };
    let mut a = Keyflow::start(&broker.bootstrap, &toml);
    support::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || output_progress(&broker, &output) >= 300,
        "A processing",
    );

    // B joins mid-stream.
    let (mut b, join_b) = join_member(&broker, &toml, &group, 2);
    wait_progress(
        &broker,
        &output,
        300,
        Duration::from_secs(30),
        "progress with two members",
    );

    // B leaves gracefully once the group is stable (one rebalance at a time).
    b.sigterm();
    assert!(
        b.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        b.log_tail(30)
    );
    broker.wait_group_stable(&group, 1, Duration::from_secs(60));
    wait_progress(
        &broker,
        &output,
        300,
        Duration::from_secs(30),
        "progress after B left",
    );

    // C joins, then dies.
    let (mut c, join_c) = join_member(&broker, &toml, &group, 2);
    c.kill9();
    let t = Instant::now();
    broker.wait_group_stable(&group, 1, Duration::from_secs(60));
    wait_progress(
        &broker,
        &output,
        300,
        Duration::from_secs(60),
        "progress after C died",
    );
    let recover_c = t.elapsed();

    stop.store(true, Relaxed);
    let expected = producer.join().unwrap();
    let total: usize = expected.values().sum();
    let out = broker.consume_all_with_quiet(
        &output,
        total,
        Duration::from_secs(120),
        Duration::from_secs(3),
    );
    a.sigterm();
    assert!(
        a.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        a.log_tail(30)
    );
    let dups = check_output(&out, &expected);
    println!("rebalance ({protocol:?}): {total} inputs, {} outputs, {dups} redelivered duplicates; join→processing: B {join_b:?}, C {join_c:?}; C killed → progress again after {recover_c:?}", out.len());
}

#[test]
fn validate_lists_every_error_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "topic = \"t\"\nauto_offset_reset = \"earliest\"\nmax_in_flight = 0\ndrain_timeout = \"1m\"\n[[processors]]\ntype = \"forward\"\ntopic = \"t\"\n").unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "topik = \"t\"\n").unwrap();
    let out = std::process::Command::new(Keyflow::bin())
        .args(["validate"])
        .arg(&bad)
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "4 configuration error(s)",
        "bad.toml: field `max_in_flight`: expected at least 1, found 0",
        "bad.toml: field `drain_timeout`: \"1m\" must be below session_timeout (\"30s\")",
        "bad.toml: field `processors[0].topic`: \"t\" is the input topic",
        "typo.toml: field `topik`: unknown field `topik`",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let ok = std::process::Command::new(Keyflow::bin())
        .args([
            "validate",
            concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"),
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn demo_runs_on_the_embedded_broker() {
    let mut kf = Keyflow::start_with_args(
        &[
            "demo",
            "--duration",
            "10s",
            "--pipeline",
            concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/demo.toml"),
        ],
        &[],
    );
    let status = kf.wait_exit(Duration::from_secs(60));
    let log = kf.log();
    assert!(
        status.success(),
        "demo exited {status:?}\n{}",
        kf.log_tail(40)
    );
    let processed: u64 = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("processed"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("summary line 'processed N'");
    println!("demo: processed {processed} messages in 10 s");
    assert!(processed > 1000, "{log}");
}
