//! keyflow as a separate process against a real Apache Kafka broker: graceful shutdown, kill -9 at
//! twelve moments while input arrives, rebalances between members, the CLI (`validate`, `demo`). The shutdown, crash
//! and rebalance tests run under both consumer group protocols: `classic` and `consumer`
//! (KIP-848, where the broker owns the session timeout: `group.consumer.session.timeout.ms`,
//! 6 s on the test broker).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::ordered::{check_output, output_progress, parse, produce_until, wait_progress};
use support::{unique, Broker, Keyflow};

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
        (400..4000).contains(&total),
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
fn kill_9_at_twelve_moments_while_input_arrives_classic() {
    kill_9_at_twelve_moments_while_input_arrives(Protocol::Classic);
}

#[test]
fn kill_9_at_twelve_moments_while_input_arrives_consumer_protocol() {
    kill_9_at_twelve_moments_while_input_arrives(Protocol::Consumer);
}

/// One member, input arriving at ~1,000 msg/s, `kill -9` at 12 moments and a restart after
/// each: half of them right after a restart, while the backlog of the outage is being worked
/// through in a burst, half of them in the steady stream after it caught up. Nothing is lost,
/// per-key order holds apart from redeliveries, and a crash redoes at most what was in flight
/// plus what completed since the last commit: `max_in_flight + commit_every` per partition
/// (offsets completed above the commit point travel in the commit metadata and are skipped).
fn kill_9_at_twelve_moments_while_input_arrives(protocol: Protocol) {
    const KEYS: usize = 200;
    const PARTITIONS: i32 = 4;
    const MAX_IN_FLIGHT: usize = 20;
    const COMMIT_EVERY: usize = 50;
    const CRASHES: usize = 12;
    let broker = Broker::start();
    let (input, output, group) = (unique("crash-in"), unique("crash-out"), unique("crash-g"));
    broker.create_topic_blocking(&input, PARTITIONS);
    broker.create_topic_blocking(&output, PARTITIONS);
    let expected: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    let produced = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // The timer alone (500 ms, as a user might set it) would let a burst run far ahead of the
    // last commit; commit_every bounds it.
    let toml = pipeline(
        protocol,
        &input,
        &output,
        &group,
        &format!("max_in_flight = {MAX_IN_FLIGHT}\ncommit_interval = \"500ms\"\ncommit_every = {COMMIT_EVERY}"),
        r#"{ distribution = "uniform", min = "0ms", max = "2ms" }"#,
    );
    let mut kills = Vec::new();
    let mut metadata_sizes = MetadataSizes::default();
    std::thread::scope(|scope| {
        // ~1,000 msg/s in batches of 50, until stopped.
        scope.spawn(|| produce_until(&broker, &input, KEYS, &stop, &produced, &expected));
        for crash in 0..CRASHES {
            // Let a backlog build while no member runs.
            let before = produced.load(Relaxed);
            support::wait_until(
                Duration::from_secs(30),
                Duration::from_millis(20),
                || produced.load(Relaxed) >= before + 1000,
                "a backlog while keyflow is down",
            );
            let out_before = output_progress(&broker, &output);
            let backlog = produced.load(Relaxed) as i64;
            let mut kf = Keyflow::start(&broker.bootstrap, &toml);
            let moment = if crash % 2 == 0 {
                // Right after the restart: the burst has begun, the backlog is not done.
                support::wait_until(
                    Duration::from_secs(90),
                    Duration::from_millis(5),
                    || output_progress(&broker, &output) >= out_before + 300,
                    "the burst after a restart",
                );
                "burst"
            } else {
                // Caught up, then in the steady stream.
                support::wait_until(
                    Duration::from_secs(90),
                    Duration::from_millis(20),
                    || output_progress(&broker, &output) >= backlog + 500,
                    "caught up and streaming",
                );
                "steady"
            };
            metadata_sizes.add(&kf);
            kf.kill9();
            let out_after = output_progress(&broker, &output);
            kills.push((moment, out_after));
        }
        stop.store(true, Relaxed);
    });
    let expected = expected.into_inner().unwrap();
    let n: usize = expected.values().sum();
    let mut kf = Keyflow::start(&broker.bootstrap, &toml);
    // Done when the group committed the end of every input partition (an output count cannot
    // tell: duplicates reach it early).
    let end = broker.high_watermarks(&input);
    support::wait_until(
        Duration::from_secs(180),
        Duration::from_millis(200),
        || broker.committed_offsets(&group, &input, PARTITIONS) == end,
        "the last member commits the end of the input",
    );
    kf.sigterm();
    assert!(kf.wait_exit(Duration::from_secs(30)).success());
    let out = broker.consume_all(
        &output,
        output_progress(&broker, &output) as usize,
        Duration::from_secs(60),
    );
    let dups = check_output(&out, &expected);
    let bound = PARTITIONS as usize * (MAX_IN_FLIGHT + COMMIT_EVERY);
    println!("crash ({protocol:?}): {n} inputs, {} output records, {dups} duplicates over {CRASHES} crashes: {:.1} per crash (bound {bound} = {PARTITIONS} partitions × (max_in_flight {MAX_IN_FLIGHT} + commit_every {COMMIT_EVERY})); kills (moment, output count): {kills:?}", out.len(), dups as f64 / CRASHES as f64);
    println!("crash ({protocol:?}): commit metadata sizes seen: {metadata_sizes}");
    assert!(
        dups <= CRASHES * bound,
        "{dups} duplicates for {CRASHES} crashes exceeds {CRASHES} × {bound} (in flight + commit_every per partition)"
    );
}

/// The distribution of `keyflow_commit_metadata_bytes` over member incarnations, read from
/// each one's `/metrics` just before it is killed (for the report, not asserted).
#[derive(Default)]
struct MetadataSizes {
    /// Cumulative count per bucket bound (`le`), summed over incarnations.
    buckets: BTreeMap<String, f64>,
    sum: f64,
}

impl MetadataSizes {
    fn add(&mut self, kf: &Keyflow) {
        let log = kf.log();
        let Some(address) = log
            .split("http endpoint serving")
            .nth(1)
            .and_then(|l| l.split("address=").nth(1))
            .and_then(|a| a.split_whitespace().next())
        else {
            return;
        };
        let Ok((_, text)) =
            keyflow::http::get_blocking(address, "/metrics", Duration::from_secs(5))
        else {
            return;
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("keyflow_commit_metadata_bytes_bucket{") {
                let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
                let v = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
                if let (Some(le), Some(v)) = (le, v) {
                    *self.buckets.entry(le.to_string()).or_default() += v;
                }
            } else if let Some(rest) = line.strip_prefix("keyflow_commit_metadata_bytes_sum") {
                self.sum += rest
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
}

impl std::fmt::Display for MetadataSizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = self.buckets.get("+Inf").copied().unwrap_or(0.0);
        let mut bounds: Vec<(f64, f64)> = self
            .buckets
            .iter()
            .filter_map(|(le, v)| le.parse::<f64>().ok().map(|b| (b, *v)))
            .collect();
        bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        write!(
            f,
            "{total} commit points, mean {:.0} bytes;",
            self.sum / total.max(1.0)
        )?;
        for (b, v) in bounds {
            write!(f, " ≤{b}: {:.0}%", 100.0 * v / total.max(1.0))?;
        }
        Ok(())
    }
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
