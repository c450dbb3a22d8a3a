//! Stalls (issue 11 items 1, 4, 6, 9; issue 8 item 2): fault sequences that used to stop a
//! pipeline for good, or report it healthy or dead when it was not. Each test bounds its waits
//! so that a regression fails instead of hanging.

mod support;

use support::prometheus_sample as sample;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyflow::config;
use keyflow::stats::PipelineStats;
use keyflow::{Flow, Message, ProcessError, Processor, Runtime};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use support::{unique, Broker, Keyflow};

fn pipeline(brokers: &str, toml: &str) -> config::Config {
    support::inline_config(brokers, toml)
}

fn custom(topic: &str, group: &str, extra: &str) -> String {
    format!(
        "{}\n[[processors]]\ntype = \"custom\"\nname = \"p\"\n",
        support::pipeline_header(topic, group, extra)
    )
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assigned(stats: &PipelineStats) -> Vec<i32> {
    stats.partitions().into_iter().map(|(p, _)| p).collect()
}

/// Holds every message while `held`; records the payloads it completed.
struct Held {
    held: tokio::sync::watch::Receiver<bool>,
    seen: Mutex<HashSet<String>>,
    running: AtomicU64,
}

impl Held {
    fn new(held: bool) -> (Arc<Self>, tokio::sync::watch::Sender<bool>) {
        let (tx, rx) = tokio::sync::watch::channel(held);
        let p = Arc::new(Held {
            held: rx,
            seen: Mutex::new(HashSet::new()),
            running: AtomicU64::new(0),
        });
        (p, tx)
    }
    fn seen(&self, payload: &str) -> bool {
        self.seen.lock().unwrap().contains(payload)
    }
}

#[async_trait]
impl Processor for Held {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        self.running.fetch_add(1, Relaxed);
        let mut rx = self.held.clone();
        let _ = rx.wait_for(|h| !*h).await;
        self.seen
            .lock()
            .unwrap()
            .insert(msg.payload_str().unwrap_or_default().to_string());
        Ok(Flow::Continue)
    }
}

/// A plain consumer joining `group` (cooperative-sticky, like keyflow), polled on its own thread
/// until the returned flag is set; it commits nothing.
fn join_plain_member(bootstrap: &str, group: &str, topic: &str) -> Arc<AtomicBool> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        while !s.load(Relaxed) {
            let _ = c.poll(Duration::from_millis(100));
        }
        drop(c);
    });
    stop
}

// ---------------------------------------------------------------------------------------------
// issue 11 item 1: a paused partition that comes back to the same process resumes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_given_back_to_the_same_member_resumes() {
    let broker = Broker::shared();
    let (topic, group) = (unique("paused-back"), unique("paused-back-g"));
    broker.create_topic_blocking(&topic, 2);
    let extra = "max_in_flight = 4\nmax_workers = 4\npause_after = \"100ms\"";
    // A holds every message: both partitions fill their budget and are paused on the consumer.
    let (a_proc, a_release) = Held::new(true);
    let a = Runtime::new(pipeline(&broker.bootstrap, &custom(&topic, &group, extra)))
        .with_processor("p", a_proc.clone())
        .start()
        .await
        .unwrap();
    let a_stats = a.stats[0].clone();
    broker.produce_to_partition(
        &topic,
        (0..2).flat_map(|p| {
            (0..20).map(move |i| {
                (
                    p,
                    Some(format!("k{i}").into_bytes()),
                    format!("old-{p}-{i}").into_bytes(),
                )
            })
        }),
    );
    wait_for("A pauses both partitions", Duration::from_secs(60), || {
        let s = a_stats.snapshot();
        s.partitions.len() == 2 && s.partitions.iter().all(|p| p.paused)
    })
    .await;
    // B joins: one paused partition moves to B (A drains it to the deadline and gives it up).
    let (b_proc, _b_release) = Held::new(false);
    let b = Runtime::new(pipeline(&broker.bootstrap, &custom(&topic, &group, extra)))
        .with_processor("p", b_proc.clone())
        .start()
        .await
        .unwrap();
    let b_stats = b.stats[0].clone();
    wait_for("one partition moves to B", Duration::from_secs(60), || {
        assigned(&a_stats).len() == 1 && assigned(&b_stats).len() == 1
    })
    .await;
    let moved = assigned(&b_stats)[0];
    wait_for(
        "B processes the moved partition",
        Duration::from_secs(30),
        || (0..20).all(|i| b_proc.seen(&format!("old-{moved}-{i}"))),
    )
    .await;
    // B leaves: the partition comes back to A, the member that paused it.
    assert!(b.shutdown().await[0].clean());
    wait_for(
        "the moved partition comes back to A",
        Duration::from_secs(60),
        || assigned(&a_stats).len() == 2,
    )
    .await;
    a_release.send(false).unwrap();
    broker.produce_to_partition(
        &topic,
        (0..2).flat_map(|p| {
            (0..10).map(move |i| {
                (
                    p,
                    Some(format!("k{i}").into_bytes()),
                    format!("new-{p}-{i}").into_bytes(),
                )
            })
        }),
    );
    let t = Instant::now();
    wait_for(
        &format!("A processes new messages on the partition {moved} it got back"),
        Duration::from_secs(30),
        || (0..2).all(|p| (0..10).all(|i| a_proc.seen(&format!("new-{p}-{i}")))),
    )
    .await;
    println!(
        "partition {moved}: paused, moved to B, given back to A: new messages processed {:.1?} after release",
        t.elapsed()
    );
    assert!(!a_stats.snapshot().partitions.iter().any(|p| p.paused));
    assert!(a.shutdown().await[0].clean());
}

// ---------------------------------------------------------------------------------------------
// issue 11 item 9: lag seconds counts messages waiting out a retry backoff
// ---------------------------------------------------------------------------------------------

/// Fails every attempt with a retryable error.
struct AlwaysRetry;

#[async_trait]
impl Processor for AlwaysRetry {
    async fn process(&self, _msg: &mut Message) -> Result<Flow, ProcessError> {
        Err(ProcessError::retryable("down", "the downstream is down"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_seconds_counts_a_message_waiting_in_retry_backoff() {
    let prometheus = keyflow::metrics::install();
    let broker = Broker::shared();
    let (topic, group) = (unique("lag-backoff"), unique("lag-backoff-g"));
    broker.create_topic_blocking(&topic, 1);
    let name = unique("lagbackoff");
    let toml = format!(
        "name = \"{name}\"\n{}\n[retry]\nmax_attempts = 1000\nbackoff = \"2s\"\nmax_backoff = \"2s\"\n[[processors]]\ntype = \"custom\"\nname = \"p\"\n",
        support::pipeline_header(&topic, &group, "")
    );
    broker.produce_to_partition(&topic, [(0, Some(b"k".to_vec()), b"stuck".to_vec())]);
    let running = Runtime::new(pipeline(&broker.bootstrap, &toml))
        .with_processor("p", Arc::new(AlwaysRetry))
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    wait_for("the message is retried", Duration::from_secs(60), || {
        stats.snapshot().retries >= 2
    })
    .await;
    // The message is older than 3 s: lag seconds must say so, although it spends nearly all of
    // its time waiting out the backoff rather than running.
    let lag = || {
        sample(
            &prometheus.render(),
            "keyflow_consumer_lag_seconds",
            &[("pipeline", &name), ("partition", "0")],
        )
        .unwrap_or(0.0)
    };
    let mut seen = Vec::new();
    wait_for(
        "lag seconds ≥ 3 while the only message waits in retry backoff",
        Duration::from_secs(20),
        || {
            let l = lag();
            seen.push(l);
            l >= 3.0
        },
    )
    .await;
    println!("lag seconds while retrying: {:?}", seen.last());
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// issue 11 item 6: liveness holds during a clean drain; a rebalance during shutdown adds nothing
// ---------------------------------------------------------------------------------------------

fn header_with(topic: &str, group: &str, drain: &str, session: &str, extra: &str) -> String {
    format!(
        "topic = \"{topic}\"\ngroup_id = \"{group}\"\nauto_offset_reset = \"earliest\"\nsession_timeout = \"{session}\"\ndrain_timeout = \"{drain}\"\ncommit_interval = \"200ms\"\n{extra}\n[[processors]]\ntype = \"custom\"\nname = \"p\"\n"
    )
}

/// Starts a pipeline on a 2-partition topic whose processor holds every message, and waits until
/// a message runs on each partition.
async fn held_on_two_partitions(
    broker: &Broker,
    prefix: &str,
    drain: &str,
    session: &str,
) -> (keyflow::runtime::Running, Arc<Held>, String, String) {
    let (topic, group) = (unique(prefix), unique(&format!("{prefix}-g")));
    broker.create_topic_blocking(&topic, 2);
    let (proc_, release) = Held::new(true);
    // Kept held for the whole test (the sender lives in the processor's watch channel).
    std::mem::forget(release);
    let running = Runtime::new(pipeline(
        &broker.bootstrap,
        &header_with(&topic, &group, drain, session, ""),
    ))
    .with_processor("p", proc_.clone())
    .start()
    .await
    .unwrap();
    broker.produce_to_partition(
        &topic,
        (0..2).map(|p| (p, Some(b"k".to_vec()), format!("m{p}").into_bytes())),
    );
    let stats = running.stats[0].clone();
    wait_for(
        "a message runs on each partition",
        Duration::from_secs(60),
        || proc_.running.load(Relaxed) >= 2 && assigned(&stats).len() == 2,
    )
    .await;
    (running, proc_, topic, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_stays_200_while_a_revoke_drains_past_the_poll_staleness() {
    let broker = Broker::shared();
    // The drain (14 s) outlasts the liveness rule for a silent poll loop (10 s).
    let (running, _p, topic, group) =
        held_on_two_partitions(broker, "live-drain", "14s", "30s").await;
    let stats = running.stats[0].clone();
    let (address, http) = keyflow::http::serve(
        "127.0.0.1:0",
        keyflow::http::HttpState {
            prometheus: keyflow::metrics::install(),
            pipelines: running.stats.clone(),
        },
    )
    .await
    .unwrap();
    let address = address.to_string();
    let get = |path: &str| {
        keyflow::http::get_blocking(&address, path, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    };
    assert_eq!(get("/health/live").0, 200);
    let member = join_plain_member(&broker.bootstrap, &group, &topic);
    wait_for("the revoke starts", Duration::from_secs(30), || {
        stats.snapshot().rebalances >= 2
    })
    .await;
    let t = Instant::now();
    let mut longest_silence = 0;
    // Until the poll loop turns again after the drain (14 s, the running message abandoned).
    loop {
        let silent = stats.since_poll_ms().unwrap_or(0);
        longest_silence = longest_silence.max(silent);
        if longest_silence > 10_000 && silent < 1_000 {
            break;
        }
        let (code, body) = tokio::task::block_in_place(|| get("/health/live"));
        assert_eq!(
            code, 200,
            "/health/live during a clean drain ({:.1?} into the revoke, poll loop silent for {silent} ms): {body}",
            t.elapsed()
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the drain did not end"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        longest_silence > 10_000,
        "the poll loop was silent for only {longest_silence} ms: the test did not reach the staleness rule"
    );
    println!("revoke drain: /health/live stayed 200 while the poll loop was silent for {longest_silence} ms");
    member.store(true, Relaxed);
    http.abort();
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_during_shutdown_does_not_add_the_drain_timeout() {
    const DRAIN: Duration = Duration::from_secs(6);
    let broker = Broker::shared();
    let (running, _p, topic, group) =
        held_on_two_partitions(broker, "shut-rebal", "6s", "12s").await;
    let stats = running.stats[0].clone();
    let t = Instant::now();
    let shutdown = tokio::spawn(running.shutdown());
    // A member joins while the shutdown drains: keyflow's poll thread gets a revoke.
    let member = join_plain_member(&broker.bootstrap, &group, &topic);
    let reports = tokio::time::timeout(Duration::from_secs(60), shutdown)
        .await
        .expect("shutdown ended")
        .unwrap();
    let took = t.elapsed();
    member.store(true, Relaxed);
    let revokes = stats.revokes.load(Relaxed) + stats.lost.load(Relaxed);
    assert!(
        revokes >= 2,
        "no revoke came during the shutdown ({revokes} revokes): the sequence was not tested"
    );
    assert_eq!(reports[0].abandoned.len(), 2, "{:?}", reports[0]);
    assert!(
        took < DRAIN + Duration::from_secs(2),
        "shutdown with a rebalance in between took {took:.1?} (drain_timeout {DRAIN:?})"
    );
    println!("shutdown with a rebalance during its drain: {took:.1?} (drain_timeout {DRAIN:?})");
}

// ---------------------------------------------------------------------------------------------
// issue 11 item 4: broker outage (librdkafka's mock cluster: the broker goes down, comes back)
// ---------------------------------------------------------------------------------------------

enum MockCmd {
    Down,
    Up,
}

/// Runs a one-broker mock cluster on its own thread (it is not Send) with `topics`; returns its
/// bootstrap address and a command channel. The cluster lives until the sender is dropped.
fn mock_cluster(topics: &[(&str, i32)]) -> (String, std::sync::mpsc::Sender<MockCmd>) {
    use rdkafka::mocking::MockCluster;
    let topics: Vec<(String, i32)> = topics.iter().map(|(t, p)| (t.to_string(), *p)).collect();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<MockCmd>();
    std::thread::spawn(move || {
        let c = MockCluster::new(1).unwrap();
        for (t, p) in &topics {
            c.create_topic(t, *p, 1).unwrap();
        }
        addr_tx.send(c.bootstrap_servers()).unwrap();
        while let Ok(cmd) = cmd_rx.recv() {
            match cmd {
                MockCmd::Down => c.broker_down(1).unwrap(),
                MockCmd::Up => c.broker_up(1).unwrap(),
            }
        }
    });
    (addr_rx.recv().unwrap(), cmd_tx)
}

async fn produce_mock(bootstrap: &str, topic: &str, range: std::ops::Range<usize>) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for i in range {
        let (key, payload) = (format!("k{}", i % 7), format!("m{i}"));
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
    }
}

fn committed_mock(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    match c.committed_offsets(tpl, Duration::from_secs(5)) {
        Ok(tpl) => tpl
            .elements()
            .iter()
            .map(|e| e.offset().to_raw().unwrap_or(-1).max(0))
            .sum(),
        Err(_) => -1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_reported_by_readiness_and_recovered_without_loss() {
    let (topic, group) = ("outage", "outage-g");
    let (bootstrap, mock) = mock_cluster(&[(topic, 2)]);
    produce_mock(&bootstrap, topic, 0..100).await;
    let (proc_, _release) = Held::new(false);
    let name = unique("outage");
    let toml = format!("name = \"{name}\"\n{}", custom(topic, group, ""));
    let running = Runtime::new(pipeline(&bootstrap, &toml))
        .with_processor("p", proc_.clone())
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    let seen_all = |n: usize| (0..n).all(|i| proc_.seen(&format!("m{i}")));
    wait_for(
        "the first 100 are processed",
        Duration::from_secs(60),
        || seen_all(100),
    )
    .await;
    wait_for("ready", Duration::from_secs(30), || {
        keyflow::http::readiness(&running.stats).is_empty()
    })
    .await;
    mock.send(MockCmd::Down).unwrap();
    let down = Instant::now();
    let mut reason = String::new();
    wait_for(
        "readiness reports the unreachable brokers",
        Duration::from_secs(30),
        || {
            let r = keyflow::http::readiness(&running.stats);
            reason = r.join("; ");
            r.iter().any(|r| r.contains("brokers unreachable"))
        },
    )
    .await;
    let reported_after = down.elapsed();
    assert!(reason.contains(&format!("pipeline {name}")), "{reason}");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let still = keyflow::http::readiness(&running.stats).join("; ");
    assert!(still.contains("brokers unreachable"), "{still}");
    mock.send(MockCmd::Up).unwrap();
    let up = Instant::now();
    produce_mock(&bootstrap, topic, 100..200).await;
    wait_for(
        "everything produced before and after the outage is processed",
        Duration::from_secs(90),
        || seen_all(200),
    )
    .await;
    wait_for("ready again", Duration::from_secs(30), || {
        keyflow::http::readiness(&running.stats).is_empty()
    })
    .await;
    let ready_after = up.elapsed();
    wait_for("everything committed", Duration::from_secs(30), || {
        committed_mock(&bootstrap, group, topic, 2) == 200
    })
    .await;
    let s = stats.snapshot();
    println!(
        "outage: readiness said {still:?} ({reported_after:.1?} after the broker went down); ready again {ready_after:.1?} after it came back; processed {} (200 distinct), committed 200",
        s.processed
    );
    assert!(running.shutdown().await[0].clean());
    drop(mock);
}

// ---------------------------------------------------------------------------------------------
// issue 11 item 4 / issue 8 item 2: unreachable brokers at start: a bounded, clear exit
// ---------------------------------------------------------------------------------------------

#[test]
fn unreachable_brokers_at_start_exit_1_naming_the_pipeline_and_cause_without_the_secret() {
    const SECRET: &str = "hunter2-s3cr3t-Zq9";
    let port = support::free_port();
    let bootstrap = format!("127.0.0.1:{port}");
    let toml = format!(
        "name = \"unreach\"\n{}startup_timeout = \"5s\"\n[kafka]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanisms\" = \"PLAIN\"\n\"sasl.username\" = \"keyflow\"\n\"sasl.password\" = \"${{KF_TEST_SECRET}}\"\n",
        support::pipeline_header("unreach-topic", "unreach-g", "")
    );
    let toml = format!("{toml}\n[[processors]]\ntype = \"log\"\n");
    let t = Instant::now();
    let mut k = Keyflow::start_many(&bootstrap, &[&toml], &[("KF_TEST_SECRET", SECRET)]);
    let status = k.wait_exit(Duration::from_secs(30));
    let took = t.elapsed();
    let log = k.log();
    assert_eq!(status.code(), Some(1), "exit status {status}; log:\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("could not start"))
        .unwrap_or_else(|| panic!("no start error in the log:\n{log}"));
    assert!(line.contains("pipeline unreach"), "{line}");
    assert!(line.contains("brokers unreachable"), "{line}");
    assert!(
        line.to_lowercase().contains("connection refused"),
        "the cause is missing: {line}"
    );
    assert!(!log.contains(SECRET), "the secret is printed:\n{log}");
    assert!(took < Duration::from_secs(15), "exited after {took:.1?}");
    println!("unreachable at start: exit 1 after {took:.1?}: {line}");
}

// ---------------------------------------------------------------------------------------------
// issue 11 item 4 on Apache Kafka: the broker stops for 30 s mid-stream and comes back
// ---------------------------------------------------------------------------------------------

/// Records every payload it completed, after `delay`.
struct Slow {
    delay: Duration,
    seen: Mutex<HashSet<String>>,
    done: AtomicU64,
}

#[async_trait]
impl Processor for Slow {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        tokio::time::sleep(self.delay).await;
        self.seen
            .lock()
            .unwrap()
            .insert(msg.payload_str().unwrap_or_default().to_string());
        self.done.fetch_add(1, Relaxed);
        Ok(Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30s_broker_outage_mid_stream_loses_nothing_and_readiness_reports_it() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let broker = Broker::start();
    let (topic, group) = (unique("outage30"), unique("outage30-g"));
    broker.create_topic_blocking(&topic, 2);
    let produce = |range: std::ops::Range<usize>| {
        broker.produce_keyed(
            &topic,
            range.map(|i| {
                (
                    Some(format!("k{}", i % 16).into_bytes()),
                    format!("m{i}").into_bytes(),
                )
            }),
        );
    };
    produce(0..400);
    let p = Arc::new(Slow {
        delay: Duration::from_millis(50),
        seen: Mutex::new(HashSet::new()),
        done: AtomicU64::new(0),
    });
    let name = unique("outage30");
    let running = Runtime::new(pipeline(
        &broker.bootstrap,
        &format!("name = \"{name}\"\n{}", custom(&topic, &group, "")),
    ))
    .with_processor("p", p.clone())
    .start()
    .await
    .unwrap();
    wait_for(
        "mid-stream (100 processed)",
        Duration::from_secs(90),
        || p.done.load(Relaxed) >= 100,
    )
    .await;
    let stopped = Instant::now();
    tokio::task::block_in_place(|| broker.stop());
    let mut reason = String::new();
    wait_for(
        "readiness reports the outage",
        Duration::from_secs(30),
        || {
            reason = keyflow::http::readiness(&running.stats).join("; ");
            reason.contains("brokers unreachable")
        },
    )
    .await;
    let reported_after = stopped.elapsed();
    assert!(reason.contains(&format!("pipeline {name}")), "{reason}");
    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;
    let late = keyflow::http::readiness(&running.stats).join("; ");
    assert!(
        late.contains("brokers unreachable"),
        "after {OUTAGE:?}: {late}"
    );
    let restarted = Instant::now();
    tokio::task::block_in_place(|| broker.restart());
    let restart_took = restarted.elapsed();
    produce(400..500);
    wait_for(
        "every message from before, during and after the outage is processed",
        Duration::from_secs(120),
        || (0..500).all(|i| p.seen.lock().unwrap().contains(&format!("m{i}"))),
    )
    .await;
    wait_for("ready again", Duration::from_secs(60), || {
        keyflow::http::readiness(&running.stats).is_empty()
    })
    .await;
    let ready_after = restarted.elapsed();
    // Everything is committed up to the end of each partition (a producer retry across the
    // restart may have written a record twice, so the ends are read, not assumed).
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let last = tokio::task::block_in_place(|| {
            (
                broker.committed_offsets(&group, &topic, 2),
                broker.high_watermarks(&topic),
            )
        });
        // An empty partition has nothing committed (-1) and ends at 0.
        if last
            .0
            .iter()
            .map(|c| (*c).max(0))
            .eq(last.1.iter().copied())
        {
            break last;
        }
        assert!(
            Instant::now() < deadline,
            "not everything committed after 60 s: committed {:?}, partition ends {:?}, stats {:?}",
            last.0,
            last.1,
            running.stats[0].snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let processed = p.done.load(Relaxed);
    assert!(running.shutdown().await[0].clean());
    println!(
        "30 s outage: readiness said {late:?} ({reported_after:.1?} after the stop); broker restart took {restart_took:.1?}; ready again {ready_after:.1?} after the restart began; 500 distinct processed ({processed} runs), committed {:?} = the partition ends", last.0
    );
}

// ---------------------------------------------------------------------------------------------
// review G: the revoke rendezvous outlasts the whole drain; shutdown during a broker outage is
// bounded
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_during_a_broker_outage_exits_within_the_drain_timeout_plus_5s() {
    const DRAIN: Duration = Duration::from_secs(3);
    let broker = Broker::start();
    let (topic, group) = (unique("outage-term"), unique("outage-term-g"));
    broker.create_topic_blocking(&topic, 2);
    broker.produce_keyed(
        &topic,
        (0..20).map(|i| {
            (
                Some(format!("k{i}").into_bytes()),
                format!("m{i}").into_bytes(),
            )
        }),
    );
    // A long session: librdkafka would park the final synchronous commit and the close for it.
    let toml = format!(
        "topic = \"{topic}\"\ngroup_id = \"{group}\"\nauto_offset_reset = \"earliest\"\nsession_timeout = \"30s\"\ndrain_timeout = \"3s\"\ncommit_interval = \"200ms\"\n[[processors]]\ntype = \"log\"\n"
    );
    let mut k = Keyflow::start_many(&broker.bootstrap, &[&toml], &[("RUST_LOG", "info")]);
    k.wait_for_log("partitions assigned", Duration::from_secs(60));
    support::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            broker
                .committed_offsets(&group, &topic, 2)
                .iter()
                .sum::<i64>()
                == 20
        },
        "the 20 messages processed and committed",
    );
    broker.stop();
    k.wait_for_log("All broker", Duration::from_secs(60));
    let t = Instant::now();
    k.sigterm();
    let status = k.wait_exit(Duration::from_secs(120));
    let took = t.elapsed();
    assert!(
        took < DRAIN + Duration::from_secs(5),
        "SIGTERM during an outage: exit took {took:.1?} (drain_timeout {DRAIN:?}), status {status:?}\n{}",
        k.log_tail(30)
    );
    println!("SIGTERM during a broker outage: exit ({status:?}) after {took:.1?} (drain_timeout {DRAIN:?})");
}

// ---------------------------------------------------------------------------------------------
// review F: a lost wake-up heals within a tick; a draining supervisor leaves the pause flag alone
// ---------------------------------------------------------------------------------------------

/// The supervisor of the only assigned partition (after the pipeline got its assignment).
async fn only_supervisor(
    stats: &PipelineStats,
) -> ractor::ActorRef<keyflow::actors::partition::PartitionMsg> {
    wait_for("one partition assigned", Duration::from_secs(60), || {
        stats
            .partitions()
            .first()
            .is_some_and(|(_, p)| p.actor.get().is_some())
    })
    .await;
    stats.partitions()[0].1.actor.get().unwrap().clone()
}

/// A second handle on the partition's queue dropped after the supervisor armed its non-empty
/// callback clears that callback (rdkafka's `PartitionQueue::drop`), as an old supervisor of
/// the same partition stopping late does. Messages produced afterwards must still be processed
/// within a commit interval (200 ms here) plus slack; they used to wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_queue_wakeup_heals_within_a_commit_interval() {
    use keyflow::actors::partition::PartitionMsg;
    let broker = Broker::shared();
    let (topic, group) = (unique("lost-wakeup"), unique("lost-wakeup-g"));
    broker.create_topic_blocking(&topic, 1);
    let (proc_, _release) = Held::new(false);
    let running = Runtime::new(pipeline(&broker.bootstrap, &custom(&topic, &group, "")))
        .with_processor("p", proc_.clone())
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    let sup = only_supervisor(&stats).await;
    broker.produce_to_partition(
        &topic,
        (0..5).map(|i| (0, None, format!("warm-{i}").into_bytes())),
    );
    wait_for("the warm-up messages", Duration::from_secs(60), || {
        (0..5).all(|i| proc_.seen(&format!("warm-{i}")))
    })
    .await;
    let opened = sup
        .call(
            PartitionMsg::DropSecondQueueHandle,
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert!(
        matches!(opened, ractor::rpc::CallResult::Success(true)),
        "the test hook could not open a second queue handle"
    );
    for batch in ["after", "again"] {
        broker.produce_to_partition(
            &topic,
            (0..10).map(|i| (0, None, format!("{batch}-{i}").into_bytes())),
        );
        let t = Instant::now();
        wait_for(
            &format!("{batch}: messages produced after the wake-up was lost"),
            Duration::from_millis(200) + Duration::from_secs(5),
            || (0..10).all(|i| proc_.seen(&format!("{batch}-{i}"))),
        )
        .await;
        println!("{batch}: processed {:.1?} after the produce", t.elapsed());
    }
    assert!(running.shutdown().await[0].clean());
}

/// Once draining, a supervisor ignores gate changes: pausing the partition on the consumer then
/// could undo the next owner's resume while /debug shows it unpaused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_supervisor_does_not_pause_for_the_gate() {
    use keyflow::actors::partition::PartitionMsg;
    let broker = Broker::shared();
    let (topic, group) = (unique("drain-gate"), unique("drain-gate-g"));
    broker.create_topic_blocking(&topic, 1);
    let (proc_, release) = Held::new(true);
    let running = Runtime::new(pipeline(&broker.bootstrap, &custom(&topic, &group, "")))
        .with_processor("p", proc_.clone())
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    let sup = only_supervisor(&stats).await;
    let part = stats.partitions()[0].1.clone();
    broker.produce_to_partition(&topic, [(0, None, b"held".to_vec())]);
    wait_for("the message runs (held)", Duration::from_secs(60), || {
        proc_.running.load(Relaxed) == 1
    })
    .await;
    assert_eq!(part.pauses.load(Relaxed), 0);
    // Drain (the running message keeps it draining), then the gate closes. The mailbox is FIFO:
    // the Inspect answer comes after both were handled.
    let (tx, rx) = ractor::concurrency::oneshot();
    sup.cast(PartitionMsg::Drain {
        until: tokio::time::Instant::now() + Duration::from_secs(30),
        reply: tx.into(),
    })
    .unwrap();
    sup.cast(PartitionMsg::Gate(true)).unwrap();
    sup.cast(PartitionMsg::FlowCheck).unwrap();
    let debug = sup
        .call(PartitionMsg::Inspect, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(matches!(debug, ractor::rpc::CallResult::Success(_)));
    assert_eq!(
        (part.pauses.load(Relaxed), part.paused.load(Relaxed)),
        (0, false),
        "a draining supervisor paused its partition on the consumer for the gate"
    );
    release.send(false).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("the drain ends once the held message completes")
        .unwrap();
    assert_eq!(report.next_offset, Some(1));
    // The supervisor drained outside the coordinator: its own drain finds it gone.
    let _ = running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// review H item 1: HTTP and SIGTERM from the start, not only once every pipeline reached its
// brokers
// ---------------------------------------------------------------------------------------------

/// Nobody listens on the bootstrap and `startup_timeout` is long: while keyflow waits, probes are
/// answered (live 200, ready 503 saying why) and SIGTERM ends the wait at once, exit 0.
#[test]
fn http_answers_and_sigterm_ends_the_wait_while_brokers_are_unreachable_at_start() {
    use keyflow::http::get_blocking;
    let [broker_port, http_port] = support::free_ports();
    let bootstrap = format!("127.0.0.1:{broker_port}");
    let http = format!("127.0.0.1:{http_port}");
    let toml = format!(
        "name = \"waiting\"\n{}startup_timeout = \"300s\"\n[[processors]]\ntype = \"log\"\n",
        support::pipeline_header("waiting-topic", "waiting-g", "")
    );
    let mut k = Keyflow::start_many(&bootstrap, &[&toml], &[("KEYFLOW_HTTP__ADDRESS", &http)]);
    let get = |path: &str| get_blocking(&http, path, Duration::from_secs(2));
    let mut ready = Err(std::io::Error::other("not asked yet"));
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        ready = get("/health/ready");
        if ready.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = ready.unwrap_or_else(|e| {
        panic!(
            "/health/ready unanswered {:.1?} into the startup wait: {e}\n{}",
            t.elapsed(),
            k.log_tail(20)
        )
    });
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("pipeline waiting") && body.contains("starting"),
        "ready gives no reason: {body}"
    );
    let (live, live_body) = get("/health/live").expect("/health/live answers");
    assert_eq!(live, 200, "not live while waiting for brokers: {live_body}");
    assert!(k.is_running(), "keyflow gave up early:\n{}", k.log_tail(20));
    let t = Instant::now();
    k.sigterm();
    let status = k.wait_exit(Duration::from_secs(60));
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM during the startup wait: exit after {took:.1?}\n{}",
        k.log_tail(20)
    );
    assert_eq!(status.code(), Some(0), "{status}\n{}", k.log_tail(20));
    println!("startup wait: ready {code} {body}; live {live}; SIGTERM → {status} after {took:.1?}");
}

// ---------------------------------------------------------------------------------------------
// review H item 5: a partition that never fetches after its assignment shows its lag
// ---------------------------------------------------------------------------------------------

/// The partition is paused on the consumer behind its supervisor's back right after the
/// assignment (as a stale pause flag does), then messages arrive on the broker: nothing is ever
/// received, librdkafka's cached watermark is stale, and the lag used to read 0, so the watchdog
/// and readiness never saw it. Expected: the broker's watermark gives lag > 0, and it is stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_never_fetches_shows_its_lag_and_becomes_stuck() {
    use keyflow::actors::partition::PartitionMsg;
    const STUCK_AFTER: Duration = Duration::from_secs(3);
    let broker = Broker::shared();
    let (topic, group) = (unique("never-fetch"), unique("never-fetch-g"));
    broker.create_topic_blocking(&topic, 1);
    let (proc_, _release) = Held::new(false);
    let mut config = pipeline(&broker.bootstrap, &custom(&topic, &group, ""));
    config.global.stuck_after = STUCK_AFTER;
    let running = Runtime::new(config)
        .with_processor("p", proc_.clone())
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    let sup = only_supervisor(&stats).await;
    let paused = sup
        .call(
            PartitionMsg::PauseBehindItsBack,
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert!(matches!(paused, ractor::rpc::CallResult::Success(true)));
    broker.produce_to_partition(
        &topic,
        (0..20).map(|i| (0, None, format!("m{i}").into_bytes())),
    );
    let part = stats.partitions()[0].1.clone();
    let t = Instant::now();
    wait_for(
        "lag > 0 for the partition that never fetches",
        Duration::from_secs(30),
        || part.lag.load(Relaxed) > 0,
    )
    .await;
    let lag_after = t.elapsed();
    assert_eq!(part.lag.load(Relaxed), 20);
    wait_for("it is flagged stuck", Duration::from_secs(30), || {
        part.stuck.load(Relaxed)
    })
    .await;
    let ready = keyflow::http::readiness(&running.stats).join("; ");
    assert!(ready.contains("stuck (lag 20"), "{ready}");
    assert_eq!(proc_.seen.lock().unwrap().len(), 0, "it fetched after all");
    println!(
        "never-fetching partition: lag 20 seen {lag_after:.1?} after the produce, stuck {:.1?} after; readiness: {ready}",
        t.elapsed()
    );
    let _ = running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// a supervisor the drain gave up on (its handler blocked its thread) reads nothing afterwards
// ---------------------------------------------------------------------------------------------

/// The first message of each partition blocks its thread (`std::thread::sleep`, polled inline by
/// the supervisor) until `wake`; every later message waits (asynchronously) for `release`.
/// Records the payloads it completed.
struct BlocksFirst {
    blocked: Mutex<HashSet<i32>>,
    blocking: AtomicU64,
    wake: AtomicBool,
    release: tokio::sync::watch::Receiver<bool>,
    /// Later messages started, per partition (0 and 1).
    started: [AtomicU64; 2],
    seen: Mutex<HashSet<String>>,
}

#[async_trait]
impl Processor for BlocksFirst {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let first = self.blocked.lock().unwrap().insert(msg.partition);
        if first {
            self.blocking.fetch_add(1, Relaxed);
            let t = Instant::now();
            while !self.wake.load(Relaxed) && t.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            self.started[msg.partition as usize].fetch_add(1, Relaxed);
            let mut rx = self.release.clone();
            let _ = rx.wait_for(|r| *r).await;
        }
        self.seen
            .lock()
            .unwrap()
            .insert(msg.payload_str().unwrap_or_default().to_string());
        Ok(Flow::Continue)
    }
}

/// A processor blocks a supervisor's thread for longer than the drain timeout plus its margin
/// while a member joins: the revoke gives up on that supervisor, which stays alive in its
/// handler. The member leaves, the partition comes back, a new supervisor reads it. When the
/// old handler wakes up it must read nothing more off the partition's librdkafka queue, which it
/// shares with the new supervisor: messages it took would never reach the new owner, whose
/// commit point then passes them (lost). Before the fix the old supervisor's queued ticks read
/// the whole backlog (one key: into its hot-key overflow) and its drain dropped it: 200 of the
/// partition's 200 messages were never processed while the group committed the partition's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_supervisor_the_drain_gave_up_on_takes_nothing_from_the_partitions_next_owner() {
    const N: usize = 200;
    let broker = Broker::shared();
    let (topic, group) = (unique("late-sup"), unique("late-sup-g"));
    broker.create_topic_blocking(&topic, 2);
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let p = Arc::new(BlocksFirst {
        blocked: Mutex::new(HashSet::new()),
        blocking: AtomicU64::new(0),
        wake: AtomicBool::new(false),
        release,
        started: [AtomicU64::new(0), AtomicU64::new(0)],
        seen: Mutex::new(HashSet::new()),
    });
    let extra = "max_in_flight = 16\nmax_workers = 4";
    let a = Runtime::new(pipeline(
        &broker.bootstrap,
        &header_with(&topic, &group, "1s", "6s", extra),
    ))
    .with_processor("p", p.clone())
    .start()
    .await
    .unwrap();
    let stats = a.stats[0].clone();
    broker.produce_to_partition(
        &topic,
        (0..2).map(|q| (q, Some(b"k".to_vec()), format!("first-{q}").into_bytes())),
    );
    wait_for(
        "each partition's supervisor is blocked in its first message",
        Duration::from_secs(60),
        || p.blocking.load(Relaxed) == 2,
    )
    .await;
    let supervisors: Vec<_> = stats
        .partitions()
        .into_iter()
        .map(|(q, s)| (q, s.actor.get().unwrap().clone()))
        .collect();
    // A member joins: one partition is revoked; its supervisor does not answer the drain.
    let member = join_plain_member(&broker.bootstrap, &group, &topic);
    wait_for("one partition is revoked", Duration::from_secs(60), || {
        assigned(&stats).len() == 1
    })
    .await;
    let moved = (0..2).find(|q| !assigned(&stats).contains(q)).unwrap();
    let old = supervisors
        .iter()
        .find(|(q, _)| *q == moved)
        .unwrap()
        .1
        .clone();
    // (The rendezvous mark is set just after the revoke is handed to the coordinator.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_for(
        "the revoke gives up on the blocked supervisor",
        Duration::from_secs(30),
        || stats.rendezvous_until_ms.load(Relaxed) == 0,
    )
    .await;
    // The member leaves: the partition comes back to a new supervisor.
    member.store(true, Relaxed);
    wait_for("the partition comes back", Duration::from_secs(60), || {
        stats
            .partitions()
            .iter()
            .any(|(q, s)| *q == moved && s.actor.get().is_some_and(|a| a.get_id() != old.get_id()))
    })
    .await;
    assert!(
        !matches!(old.get_status(), ractor::ActorStatus::Stopped),
        "the old supervisor stopped: the sequence was not tested"
    );
    broker.produce_to_partition(
        &topic,
        (0..2).flat_map(|q| {
            (0..N).map(move |i| (q, Some(b"k".to_vec()), format!("m-{q}-{i}").into_bytes()))
        }),
    );
    // Fetched into the partition's librdkafka queue, which both supervisors read. (The new one
    // takes nothing yet: the old one still holds the partition's memory grant.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started_before = p.started[moved as usize].load(Relaxed);
    // The old handler wakes up, then its mailbox: ticks queued before the drain, the drain.
    p.wake.store(true, Relaxed);
    wait_for("the old supervisor stops", Duration::from_secs(30), || {
        matches!(old.get_status(), ractor::ActorStatus::Stopped)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    release_tx.send(true).unwrap();
    // Later messages: the new owner's commit point passes whatever the old one took.
    const TAIL: usize = 10;
    broker.produce_to_partition(
        &topic,
        (0..2).flat_map(|q| {
            (0..TAIL).map(move |i| (q, Some(b"k".to_vec()), format!("t-{q}-{i}").into_bytes()))
        }),
    );
    let end = (1 + N + TAIL) as i64;
    let t = Instant::now();
    let mut committed = Vec::new();
    while t.elapsed() < Duration::from_secs(60) {
        committed = tokio::task::block_in_place(|| broker.committed_offsets(&group, &topic, 2));
        if committed.iter().all(|&c| c == end) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let missing: Vec<String> = (0..2)
        .flat_map(|q| {
            (0..N)
                .map(move |i| format!("m-{q}-{i}"))
                .chain((0..TAIL).map(move |i| format!("t-{q}-{i}")))
        })
        .filter(|m| !p.seen.lock().unwrap().contains(m))
        .collect();
    println!(
        "partition {moved} revoked with its supervisor blocked, given back: the new supervisor started {started_before} messages before the old one woke; committed {committed:?} (end {end}), {} of {} messages never processed",
        missing.len(),
        2 * (N + TAIL)
    );
    assert!(
        missing.is_empty(),
        "lost: {} messages never processed while the group committed {committed:?} (end {end}); the old supervisor of partition {moved} took them off the queue it shares with the new one: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(committed, vec![end, end]);
    a.shutdown().await;
}
