//! Failures without loss (issue 3), against a real Apache Kafka broker (and librdkafka's mock cluster
//! for DLQ fault injection): poison messages, retries, no head-of-line blocking, a downstream
//! outage behind a circuit breaker, an unwritable DLQ, replay, dedup, panics, and the example
//! pipelines end to end.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyflow::config;
use keyflow::stats::PipelineStats;
use keyflow::{Flow, Message, ProcessError, Processor, Runtime};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::mock::{mock_cluster, MockCmd};
use support::{unique, Broker, ConsumedMsg, Keyflow, OutMsg};

/// Loads a pipeline written inline, against `brokers`.
fn pipeline(brokers: &str, toml: &str) -> config::Config {
    support::inline_config(brokers, toml)
}

fn header(topic: &str, group: &str, extra: &str) -> String {
    support::pipeline_header(topic, group, extra)
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_complete(stats: &PipelineStats, n: u64, timeout: Duration) {
    wait_for(&format!("{n} messages complete"), timeout, || {
        let s = stats.snapshot();
        s.processed + s.filtered + s.dead_lettered >= n
    })
    .await;
}

fn hdr<'a>(m: &'a ConsumedMsg, name: &str) -> Option<&'a str> {
    m.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

fn keyed(key: &str, payload: String) -> OutMsg {
    OutMsg {
        key: Some(key.as_bytes().to_vec()),
        payload: payload.into_bytes(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// poison
// ---------------------------------------------------------------------------------------------

const USER_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["id", "email"],
  "properties": { "id": { "type": "integer" }, "email": { "type": "string" } }
}"#;

#[test]
fn poison_messages_are_dead_lettered_with_headers_and_nothing_is_lost() {
    let broker = Broker::shared();
    let (input, output, group) = (
        unique("poison-in"),
        unique("poison-out"),
        unique("poison-g"),
    );
    let dlq = format!("{input}.dlq");
    broker.create_topic_blocking(&input, 3);
    broker.create_topic_blocking(&output, 3);
    broker.create_topic_blocking(&dlq, 1);
    let dir = support::temp_dir("poison-schema-");
    let schema = dir.path().join("user.json");
    std::fs::write(&schema, USER_SCHEMA).unwrap();

    // 1,000 messages: 10% invalid JSON, 5% failing the schema, a few of 1 MiB (valid or
    // binary), some with null keys.
    // "1 MiB": as large as the broker's default message size limit allows.
    const BIG: usize = 990_000;
    let big_json = format!(
        r#"{{"id": 1, "email": "big@x", "pad": "{}"}}"#,
        "x".repeat(BIG)
    );
    let mut msgs = Vec::new();
    let mut expect_bad: BTreeMap<usize, &str> = BTreeMap::new();
    for i in 0..1000usize {
        let key = (i % 50 != 11).then(|| format!("user-{}", i % 37).into_bytes());
        let payload = if i % 10 == 0 {
            expect_bad.insert(i, "decode");
            format!("{{not json {i}").into_bytes()
        } else if i % 20 == 5 {
            expect_bad.insert(i, "schema");
            format!(r#"{{"id": "not-a-number", "seq": {i}}}"#).into_bytes()
        } else if i == 1 || i == 3 {
            big_json.clone().into_bytes()
        } else if i == 7 {
            expect_bad.insert(i, "decode");
            (0..BIG).map(|b| (b % 251) as u8).collect()
        } else {
            format!(r#"{{"id": {i}, "email": "u{i}@example.com"}}"#).into_bytes()
        };
        msgs.push(OutMsg {
            key,
            payload,
            headers: vec![("seq".into(), i.to_string().into_bytes())],
            ..Default::default()
        });
    }
    let produced = broker.produce(&input, msgs);
    let toml = format!(
        "{}\n[[processors]]\ntype = \"validate\"\nschema = {:?}\n[[processors]]\ntype = \"forward\"\ntopic = \"{output}\"\n",
        header(&input, &group, ""),
        schema.display().to_string()
    );
    let mut k = Keyflow::start(&broker.bootstrap, &toml);

    let good = 1000 - expect_bad.len();
    let out = broker.consume_all(&output, good, Duration::from_secs(120));
    let dead = broker.consume_all(&dlq, expect_bad.len(), Duration::from_secs(60));
    assert!(k.is_running(), "the process stays alive");

    let seq = |m: &ConsumedMsg| -> usize { hdr(m, "seq").unwrap().parse().unwrap() };
    let out_seqs: HashSet<usize> = out.iter().map(seq).collect();
    assert_eq!(out.len(), good, "each good message once in the output");
    for i in 0..1000 {
        assert_eq!(
            out_seqs.contains(&i),
            !expect_bad.contains_key(&i),
            "message {i}"
        );
    }
    assert_eq!(
        dead.len(),
        expect_bad.len(),
        "each bad message once in the DLQ"
    );
    for m in &dead {
        let i = seq(m);
        assert_eq!(
            hdr(m, "keyflow.error.kind"),
            Some(expect_bad[&i]),
            "message {i}"
        );
        assert_eq!(hdr(m, "keyflow.error.retryable"), Some("false"));
        assert_eq!(hdr(m, "keyflow.attempts"), Some("1"), "not retried");
        assert_eq!(hdr(m, "keyflow.source.topic"), Some(input.as_str()));
        assert!(hdr(m, "keyflow.source.partition").is_some());
        assert!(hdr(m, "keyflow.source.offset")
            .unwrap()
            .parse::<i64>()
            .is_ok());
        assert!(hdr(m, "keyflow.time").unwrap().parse::<i64>().is_ok());
        assert!(hdr(m, "keyflow.pipeline").is_some());
        assert!(!hdr(m, "keyflow.error").unwrap().is_empty());
        if i == 7 {
            assert_eq!(m.payload.len(), BIG, "the original binary value, whole");
        }
        let key = (i % 50 != 11).then(|| format!("user-{}", i % 37).into_bytes());
        assert_eq!(m.key, key, "the original key (null stays null)");
    }
    // Everything is committed: nothing is lost on a restart.
    let ends: Vec<i64> = (0..3)
        .map(|p| *produced.next_offsets.get(&p).unwrap_or(&0))
        .collect();
    support::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || broker.committed_offsets(&group, &input, 3) == ends,
        "all offsets committed",
    );
    k.sigterm();
    assert!(k.wait_exit(Duration::from_secs(20)).success());
}

// ---------------------------------------------------------------------------------------------
// retry
// ---------------------------------------------------------------------------------------------

/// Fails the first `fail_first` attempts of every message, then records (key, seq).
struct FlakyDownstream {
    fail_first: usize,
    attempts: Mutex<HashMap<i64, usize>>,
    done: Mutex<Vec<(Vec<u8>, usize)>>,
}

#[async_trait]
impl Processor for FlakyDownstream {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let n = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(msg.offset * 16 + msg.partition as i64).or_default();
            *n += 1;
            *n
        };
        if n <= self.fail_first {
            return Err(ProcessError::retryable(
                "downstream",
                format!("attempt {n} fails"),
            ));
        }
        let seq: usize = msg.payload_str().unwrap().parse().unwrap();
        self.done
            .lock()
            .unwrap()
            .push((msg.key.as_deref().unwrap().to_vec(), seq));
        Ok(Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_fails_twice_then_succeeds_in_order() {
    const N: usize = 2000;
    let broker = Broker::shared();
    let (input, group) = (unique("retry-in"), unique("retry-g"));
    broker.create_topic(&input, 2).await;
    broker.produce(
        &input,
        (0..N).map(|i| keyed(&format!("k{}", i % 40), (i / 40).to_string())),
    );
    let p = Arc::new(FlakyDownstream {
        fail_first: 2,
        attempts: Mutex::default(),
        done: Mutex::default(),
    });
    let cfg = pipeline(
        &broker.bootstrap,
        &format!(
            "{}\n[retry]\nmax_attempts = 3\nbackoff = \"10ms\"\nmax_backoff = \"50ms\"\n[[processors]]\ntype = \"custom\"\nname = \"flaky\"\n",
            header(&input, &group, "")
        ),
    );
    let running = Runtime::new(cfg)
        .with_processor("flaky", p.clone())
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    wait_complete(&stats, N as u64, Duration::from_secs(120)).await;
    let s = stats.snapshot();
    assert!(running.shutdown().await[0].clean());
    assert_eq!(s.processed, N as u64);
    assert_eq!(s.dead_lettered, 0, "the third attempt succeeds");
    assert_eq!(s.retries, 2 * N as u64, "two retries counted per message");
    let done = p.done.lock().unwrap();
    assert_eq!(done.len(), N);
    let mut last: HashMap<&[u8], usize> = HashMap::new();
    for (k, seq) in done.iter() {
        if let Some(prev) = last.insert(k, *seq) {
            assert_eq!(*seq, prev + 1, "key {:?}: order holds across retries", k);
        }
    }
    println!(
        "retry: {N} messages, {} retries, no dead letters",
        s.retries
    );
}

// ---------------------------------------------------------------------------------------------
// no head-of-line blocking
// ---------------------------------------------------------------------------------------------

/// Every message takes `delay`; key `bad` fails on every attempt. Records when good messages
/// complete.
struct OneBadKey {
    delay: Duration,
    good: AtomicUsize,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

#[async_trait]
impl Processor for OneBadKey {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        tokio::time::sleep(self.delay).await;
        if msg.key.as_deref() == Some(b"bad") {
            return Err(ProcessError::retryable("downstream", "always fails"));
        }
        let now = Instant::now();
        self.first.lock().unwrap().get_or_insert(now);
        *self.last.lock().unwrap() = Some(now);
        self.good.fetch_add(1, Relaxed);
        Ok(Flow::Continue)
    }
}

/// Good-key throughput (messages/s between the first and the last good completion).
async fn good_throughput(broker: &Broker, with_bad_key: bool) -> f64 {
    const GOOD: usize = 6000;
    let (input, group) = (unique("hol-in"), unique("hol-g"));
    broker.create_topic(&input, 1).await;
    let mut msgs = Vec::new();
    for i in 0..GOOD {
        if with_bad_key && i % 500 == 0 {
            msgs.push(keyed("bad", i.to_string()));
        }
        msgs.push(keyed(&format!("good-{}", i % 64), i.to_string()));
    }
    broker.produce(&input, msgs);
    let p = Arc::new(OneBadKey {
        delay: Duration::from_millis(5),
        good: AtomicUsize::new(0),
        first: Mutex::default(),
        last: Mutex::default(),
    });
    // One partition, so the failing key shares its partition (and worker pool) with all others.
    let cfg = pipeline(
        &broker.bootstrap,
        &format!(
            "{}\n[retry]\nmax_attempts = 6\nbackoff = \"200ms\"\nmax_backoff = \"1s\"\n[[processors]]\ntype = \"custom\"\nname = \"p\"\n",
            header(&input, &group, "max_in_flight = 256")
        ),
    );
    let running = Runtime::new(cfg)
        .with_processor("p", p.clone())
        .start()
        .await
        .unwrap();
    wait_for("good messages processed", Duration::from_secs(120), || {
        p.good.load(Relaxed) >= GOOD
    })
    .await;
    let (first, last) = (
        p.first.lock().unwrap().unwrap(),
        p.last.lock().unwrap().unwrap(),
    );
    let _ = running.shutdown().await;
    GOOD as f64 / (last - first).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_does_not_block_other_keys() {
    let broker = Broker::shared();
    let base = good_throughput(broker, false).await;
    let with_bad = good_throughput(broker, true).await;
    let ratio = with_bad / base;
    println!(
        "no head-of-line blocking: other keys' throughput {with_bad:.0} msg/s with a failing key vs {base:.0} msg/s without: {:.1}%",
        ratio * 100.0
    );
    assert!(ratio >= 0.9, "{:.1}% < 90%", ratio * 100.0);
}

// ---------------------------------------------------------------------------------------------
// outage behind a circuit breaker (real local HTTP server)
// ---------------------------------------------------------------------------------------------

/// A downstream that answers 503 for `outage` from its first request, then 200, recording the
/// ids it accepted.
#[derive(Default)]
struct Downstream {
    since: Mutex<Option<Instant>>,
    outage: Duration,
    rejected: AtomicUsize,
    accepted: Mutex<Vec<String>>,
    fail_all: AtomicBool,
}

async fn serve(state: Arc<Downstream>) -> SocketAddr {
    use axum::{body::Bytes, extract::State, http::StatusCode, routing::post, Router};
    async fn hook(State(s): State<Arc<Downstream>>, body: Bytes) -> StatusCode {
        let start = *s.since.lock().unwrap().get_or_insert_with(Instant::now);
        if s.fail_all.load(Relaxed) || start.elapsed() < s.outage {
            s.rejected.fetch_add(1, Relaxed);
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        s.accepted
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&body).into_owned());
        StatusCode::OK
    }
    let app = Router::new().route("/hook", post(hook)).with_state(state);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_the_breaker_pauses_and_ends_with_an_empty_dlq() {
    const N: usize = 300;
    let broker = Broker::shared();
    let (input, group) = (unique("outage-in"), unique("outage-g"));
    broker.create_topic(&input, 2).await;
    let ds = Arc::new(Downstream {
        outage: Duration::from_secs(20),
        ..Default::default()
    });
    let addr = serve(ds.clone()).await;
    let cfg = pipeline(
        &broker.bootstrap,
        &format!(
            "{}\n[retry]\nmax_attempts = 5\nbackoff = \"100ms\"\nmax_backoff = \"1s\"\n[[processors]]\ntype = \"http\"\nurl = \"http://{addr}/hook\"\ntimeout = \"2s\"\ncircuit_breaker = {{ failures = 5, cool_down = \"3s\" }}\n",
            header(&input, &group, "")
        ),
    );
    let running = Runtime::new(cfg).start().await.unwrap();
    let stats = running.stats[0].clone();
    broker.produce(
        &input,
        (0..N).map(|i| keyed(&format!("k{}", i % 30), format!("{{\"id\": {i}}}"))),
    );
    let t = Instant::now();
    wait_for(
        "the breaker pauses the partitions",
        Duration::from_secs(60),
        || stats.snapshot().partitions.iter().any(|p| p.paused),
    )
    .await;
    let paused_after = t.elapsed();
    wait_complete(&stats, N as u64, Duration::from_secs(120)).await;
    let took = t.elapsed();
    let s = stats.snapshot();
    assert!(running.shutdown().await[0].clean());
    assert_eq!(s.dead_lettered, 0, "nothing dead-lettered by the outage");
    assert_eq!(s.processed, N as u64);
    let accepted: HashSet<String> = ds.accepted.lock().unwrap().iter().cloned().collect();
    assert_eq!(accepted.len(), N, "every message delivered");
    let rejected = ds.rejected.load(Relaxed);
    let pauses: u64 = s.partitions.iter().map(|p| p.pauses).sum();
    assert!(pauses >= 1);
    assert!(
        took >= Duration::from_secs(20),
        "completes after the outage"
    );
    // Without the breaker every message would burn its attempts: N × 5 calls, all in the DLQ.
    assert!(
        rejected < N * 2,
        "{rejected} calls during the outage: the breaker held them back"
    );
    println!(
        "outage: breaker opened and partitions paused {paused_after:.1?} after the first message; 20 s of 503s cost {rejected} calls (vs {} without a breaker); all {N} delivered {took:.1?} after the start, DLQ empty, {pauses} pauses",
        N * 5
    );
}

// ---------------------------------------------------------------------------------------------
// DLQ unavailable (librdkafka's mock cluster: produce requests fail)
// ---------------------------------------------------------------------------------------------

/// Fails permanently on payload "bad".
struct RejectBad;

#[async_trait]
impl Processor for RejectBad {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        if msg.payload.as_deref() == Some(b"bad") {
            return Err(ProcessError::permanent("rejected", "bad payload"));
        }
        Ok(Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dlq_pauses_and_never_commits_past_the_message() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    const N: i64 = 200;
    const BAD: i64 = 50;
    let (input, group) = ("dlqdown", "dlqdown-g");
    let (bootstrap, mock) = mock_cluster(&[(input, 1), ("dlqdown.dlq", 1)]);
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for i in 0..N {
        let payload = if i == BAD {
            "bad".to_string()
        } else {
            format!("ok-{i}")
        };
        let key = format!("k{}", i % 10);
        producer
            .send(
                FutureRecord::to(input)
                    .key(&key)
                    .payload(&payload)
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // The DLQ write fails 12 times in a row (then the topic is writable again).
    mock.send(MockCmd::RequestErrors(
        RDKafkaApiKey::Produce,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        12,
    ))
    .unwrap();
    let cfg = pipeline(
        &bootstrap,
        &format!(
            "{}\n[retry]\nmax_attempts = 3\nbackoff = \"200ms\"\nmax_backoff = \"1s\"\n[[processors]]\ntype = \"custom\"\nname = \"p\"\n",
            header(input, group, "")
        ),
    );
    let running = Runtime::new(cfg)
        .with_processor("p", Arc::new(RejectBad))
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    let committed = || support::mock::committed_offset(&bootstrap, group, input, 0);
    let t = Instant::now();
    wait_for(
        "the partition pauses while the DLQ fails",
        Duration::from_secs(60),
        || stats.snapshot().partitions.iter().any(|p| p.paused),
    )
    .await;
    let mut max_seen = -1;
    while stats.snapshot().dead_lettered == 0 {
        let c = committed();
        max_seen = max_seen.max(c);
        assert!(
            c <= BAD,
            "committed {c}, past the message {BAD} that is not dead-lettered yet"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let outage = t.elapsed();
    wait_complete(&stats, N as u64, Duration::from_secs(60)).await;
    wait_for("everything committed", Duration::from_secs(30), || {
        committed() == N
    })
    .await;
    let s = stats.snapshot();
    assert!(running.shutdown().await[0].clean());
    assert_eq!((s.processed, s.dead_lettered), (N as u64 - 1, 1));
    println!("dlq unavailable: paused, commit held at ≤ {max_seen} (bad message {BAD}) for {outage:.1?}; then everything completed and committed");
    drop(mock);
}

// ---------------------------------------------------------------------------------------------
// replay
// ---------------------------------------------------------------------------------------------

/// Fails permanently (kind `bug`) while `broken`; then records each payload.
struct Fixable {
    broken: AtomicBool,
    seen: Mutex<Vec<String>>,
}

#[async_trait]
impl Processor for Fixable {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        if self.broken.load(Relaxed) {
            return Err(ProcessError::permanent(
                "bug",
                "the downstream mapping is broken",
            ));
        }
        self.seen
            .lock()
            .unwrap()
            .push(msg.payload_str().unwrap().to_string());
        Ok(Flow::Continue)
    }
}

fn replay_cli(bootstrap: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(Keyflow::bin())
        .args(["dlq", "replay"])
        .args(args)
        .env("KEYFLOW_BROKERS", bootstrap)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "replay {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reprocesses_every_dead_letter_and_dry_run_counts_match() {
    const N: usize = 300;
    let broker = Broker::shared();
    let (input, group) = (unique("replay-in"), unique("replay-g"));
    let dlq = format!("{input}.dlq");
    broker.create_topic(&input, 2).await;
    broker.create_topic(&dlq, 1).await;
    broker.produce(
        &input,
        (0..N).map(|i| keyed(&format!("k{}", i % 3), format!("m{i}"))),
    );
    let p = Arc::new(Fixable {
        broken: AtomicBool::new(true),
        seen: Mutex::default(),
    });
    let cfg = pipeline(
        &broker.bootstrap,
        &format!(
            "{}\n[[processors]]\ntype = \"custom\"\nname = \"p\"\n",
            header(&input, &group, "")
        ),
    );
    let running = Runtime::new(cfg)
        .with_processor("p", p.clone())
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    wait_for("all dead-lettered", Duration::from_secs(60), || {
        stats.snapshot().dead_lettered == N as u64
    })
    .await;
    // Fix the cause.
    p.broken.store(false, Relaxed);

    let b = &broker.bootstrap;
    let dry = replay_cli(b, &[&dlq, "--dry-run"]);
    assert!(
        dry.contains(&format!("would replay {N} of {N} dead letters")),
        "{dry}"
    );
    let by_key = replay_cli(b, &[&dlq, "--dry-run", "--key", "k1"]);
    assert!(
        by_key.contains(&format!("would replay {} of {N}", N / 3)),
        "{by_key}"
    );
    let other_kind = replay_cli(b, &[&dlq, "--dry-run", "--kind", "decode"]);
    assert!(
        other_kind.contains(&format!("would replay 0 of {N}")),
        "{other_kind}"
    );
    let future = replay_cli(b, &[&dlq, "--dry-run", "--since", "2999-01-01T00:00:00Z"]);
    assert!(
        future.contains(&format!("would replay 0 of {N}")),
        "{future}"
    );
    let past = replay_cli(
        b,
        &[
            &dlq,
            "--dry-run",
            "--kind",
            "bug",
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2999-01-01T00:00:00Z",
        ],
    );
    assert!(past.contains(&format!("would replay {N} of {N}")), "{past}");
    assert!(p.seen.lock().unwrap().is_empty(), "a dry run sends nothing");

    let real = replay_cli(b, &[&dlq]);
    assert!(
        real.contains(&format!("replayed {N} of {N} dead letters")),
        "{real}"
    );
    wait_for(
        "replayed messages processed",
        Duration::from_secs(60),
        || stats.snapshot().processed == N as u64,
    )
    .await;
    assert!(running.shutdown().await[0].clean());
    let seen = p.seen.lock().unwrap();
    let unique_seen: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), N, "each processed once more");
    assert_eq!(unique_seen.len(), N);
    println!("replay: {N} dead letters; dry-run counted {N} (key k1: {}, kind decode: 0); replay sent {N}, all processed once", N / 3);
}

// ---------------------------------------------------------------------------------------------
// dedup
// ---------------------------------------------------------------------------------------------

/// Counts how often each business id reaches the end of the chain.
#[derive(Default)]
struct CountIds(Mutex<HashMap<String, usize>>);

#[async_trait]
impl Processor for CountIds {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let v: serde_json::Value = serde_json::from_slice(msg.payload.as_deref().unwrap()).unwrap();
        *self
            .0
            .lock()
            .unwrap()
            .entry(v["order_id"].to_string())
            .or_default() += 1;
        Ok(Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_processes_each_business_id_once() {
    const N: usize = 1000;
    let broker = Broker::shared();
    let (input, group) = (unique("dedup-in"), unique("dedup-g"));
    broker.create_topic(&input, 3).await;
    let msg = |i: usize| {
        keyed(
            &format!("o{i}"),
            format!(r#"{{"order_id": {i}, "total": 5}}"#),
        )
    };
    // Every message produced twice: the duplicate right after, and again after all of them.
    let mut msgs = Vec::new();
    for i in 0..N / 2 {
        msgs.push(msg(i));
        msgs.push(msg(i));
    }
    broker.produce(&input, msgs);
    let counts = Arc::new(CountIds::default());
    let cfg = pipeline(
        &broker.bootstrap,
        &format!(
            "{}\n[[processors]]\ntype = \"dedup\"\nfield = \"order_id\"\nttl = \"10m\"\nmax_ids = 100000\n[[processors]]\ntype = \"custom\"\nname = \"count\"\n",
            header(&input, &group, "")
        ),
    );
    let running = Runtime::new(cfg)
        .with_processor("count", counts.clone())
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    wait_complete(&stats, N as u64, Duration::from_secs(60)).await;
    // The second half, and every message again, after a rebalance within the process: a
    // second member of the group takes some partitions, then leaves and keyflow gets them back.
    let before = stats.snapshot().rebalances;
    let intruder: rdkafka::consumer::BaseConsumer = broker
        .client_config()
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "4000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .unwrap();
    rdkafka::consumer::Consumer::subscribe(&intruder, &[&input]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let _ = intruder.poll(Duration::from_millis(50));
            }
            intruder
        })
    };
    wait_for(
        "partitions move to the second member",
        Duration::from_secs(90),
        || stats.snapshot().rebalances > before,
    )
    .await;
    broker.wait_group_stable(&group, 2, Duration::from_secs(60));
    stop.store(true, Relaxed);
    drop(poller.join().unwrap());
    let moved = stats.snapshot().rebalances;
    wait_for(
        "keyflow gets every partition back",
        Duration::from_secs(90),
        || stats.snapshot().rebalances > moved && stats.snapshot().partitions.len() == 3,
    )
    .await;
    let mut msgs = Vec::new();
    for i in N / 2..N {
        msgs.push(msg(i));
    }
    for i in 0..N {
        msgs.push(msg(i));
    }
    broker.produce(&input, msgs);
    wait_complete(
        &stats,
        2 * N as u64 + N as u64 / 2,
        Duration::from_secs(120),
    )
    .await;
    let s = stats.snapshot();
    assert!(running.shutdown().await[0].clean());
    let counts = counts.0.lock().unwrap();
    assert_eq!(counts.len(), N, "every business id processed");
    assert!(
        counts.values().all(|&c| c == 1),
        "each exactly once: {:?}",
        counts
            .iter()
            .filter(|(_, &c)| c != 1)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(s.filtered, 3 * N as u64 / 2, "every duplicate dropped");
    println!("dedup: {N} ids, each produced 2-3 times across a rebalance ({} rebalances): processed once each, {} duplicates dropped", s.rebalances, s.filtered);
}

// ---------------------------------------------------------------------------------------------
// panics
// ---------------------------------------------------------------------------------------------

struct PanicsOn(&'static [u8]);

#[async_trait]
impl Processor for PanicsOn {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        if msg.payload.as_deref() == Some(self.0) {
            panic!("processor bug");
        }
        Ok(Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_retried_then_dead_lettered_and_the_process_lives() {
    let broker = Broker::shared();
    let (input, group) = (unique("panic-in"), unique("panic-g"));
    let dlq = format!("{input}.dlq");
    broker.create_topic(&input, 1).await;
    broker.create_topic(&dlq, 1).await;
    broker.produce(
        &input,
        (0..100).map(|i| {
            keyed(
                "k",
                if i == 40 {
                    "boom".into()
                } else {
                    format!("m{i}")
                },
            )
        }),
    );
    let cfg = pipeline(
        &broker.bootstrap,
        &format!("{}\n[retry]\nmax_attempts = 3\nbackoff = \"10ms\"\nmax_backoff = \"20ms\"\n[[processors]]\ntype = \"custom\"\nname = \"p\"\n", header(&input, &group, "")),
    );
    let running = Runtime::new(cfg)
        .with_processor("p", Arc::new(PanicsOn(b"boom")))
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    wait_complete(&stats, 100, Duration::from_secs(60)).await;
    let s = stats.snapshot();
    assert!(running.shutdown().await[0].clean());
    assert_eq!((s.processed, s.dead_lettered), (99, 1));
    assert_eq!(
        s.worker_restarts, 3,
        "the worker restarted after each crash"
    );
    let dead = broker.consume_all(&dlq, 1, Duration::from_secs(30));
    assert_eq!(hdr(&dead[0], "keyflow.error.kind"), Some("panic"));
    assert_eq!(dead[0].payload, b"boom");
}

// ---------------------------------------------------------------------------------------------
// the example pipelines, end to end
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_pipelines_validate_and_run_end_to_end() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines");
    let v = std::process::Command::new(Keyflow::bin())
        .args(["validate", dir])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&v.stderr)
    );
    for f in ["welcome-mail.toml", "orders.toml", "saga-ship.toml"] {
        assert!(out.contains(f), "{f} validated: {out}");
    }

    // Fixed topic names: a broker of its own.
    let broker = Broker::start();
    for t in [
        "user.created",
        "order.created",
        "payment.completed",
        "payment.requested",
        "inventory.reserve",
        "shipment.commands",
        "user.created.dlq",
        "order.created.dlq",
        "payment.completed.dlq",
    ] {
        broker.create_topic(t, 2).await;
    }
    let ds = Arc::new(Downstream::default());
    let addr = serve(ds.clone()).await;
    let url = format!("http://{addr}/hook");
    let paths: Vec<String> = ["welcome-mail", "orders", "saga-ship"]
        .iter()
        .map(|n| format!("{dir}/{n}.toml"))
        .collect();
    let mut args = vec!["run"];
    args.extend(paths.iter().map(String::as_str));
    let mut env: Vec<(String, String)> = vec![
        ("KEYFLOW_BROKERS".into(), broker.bootstrap.clone()),
        ("WELCOME_MAIL_URL".into(), url.clone()),
    ];
    // A short session: a killed member is noticed in seconds.
    for n in ["WELCOME_MAIL", "ORDERS", "SAGA_SHIP"] {
        env.push((
            format!("KEYFLOW_PIPELINE_{n}__SESSION_TIMEOUT"),
            "6s".into(),
        ));
        env.push((format!("KEYFLOW_PIPELINE_{n}__DRAIN_TIMEOUT"), "3s".into()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut k = Keyflow::start_with_args(&args, &env);

    // user.created: 20 users (2 test accounts), one duplicate delivery, one contract violation.
    let mut users: Vec<OutMsg> = (0..20)
        .map(|i| {
            keyed(
                &format!("u{i}"),
                format!(
                    r#"{{"user_id": "u{i}", "email": "u{i}@example.com", "name": "User {i}", "test_account": {}}}"#,
                    i >= 18
                ),
            )
        })
        .collect();
    users.push(users[3].clone());
    users.push(keyed("u99", r#"{"user_id": "u99"}"#.into()));
    broker.produce("user.created", users);
    // order.created: 10 full orders, one free (inventory only), one empty (payment only), one bad.
    let mut orders: Vec<OutMsg> = (0..10)
        .map(|i| {
            keyed(
                &format!("o{i}"),
                format!(r#"{{"order_id": "o{i}", "customer_id": "c{i}", "total": 12.5, "items": [{{"sku": "s{i}", "qty": 1}}]}}"#),
            )
        })
        .collect();
    orders.push(keyed("free", r#"{"order_id": "free", "customer_id": "c", "total": 0, "items": [{"sku": "gift", "qty": 1}]}"#.into()));
    orders.push(keyed(
        "empty",
        r#"{"order_id": "empty", "customer_id": "c", "total": 3, "items": []}"#.into(),
    ));
    orders.push(keyed("bad", r#"{"order_id": "bad", "total": -1}"#.into()));
    broker.produce("order.created", orders);
    // payment.completed: 5 payments, one delivered twice → 5 ShipOrder commands.
    let mut payments: Vec<OutMsg> = (0..5)
        .map(|i| {
            keyed(
                &format!("o{i}"),
                format!(r#"{{"payment_id": "p{i}", "order_id": "o{i}", "amount": 12.5}}"#),
            )
        })
        .collect();
    payments.push(payments[0].clone());
    broker.produce("payment.completed", payments);

    let payment = broker.consume_all("payment.requested", 11, Duration::from_secs(90));
    let inventory = broker.consume_all("inventory.reserve", 11, Duration::from_secs(30));
    let ship = broker.consume_all("shipment.commands", 5, Duration::from_secs(30));
    let order_dlq = broker.consume_all("order.created.dlq", 1, Duration::from_secs(30));
    let user_dlq = broker.consume_all("user.created.dlq", 1, Duration::from_secs(30));
    let ids = |ms: &[ConsumedMsg]| -> HashSet<String> {
        ms.iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                v["order_id"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(payment.len(), 11);
    assert!(ids(&payment).contains("empty") && !ids(&payment).contains("free"));
    assert_eq!(inventory.len(), 11);
    assert!(ids(&inventory).contains("free") && !ids(&inventory).contains("empty"));
    assert_eq!(hdr(&order_dlq[0], "keyflow.error.kind"), Some("schema"));
    assert_eq!(hdr(&user_dlq[0], "keyflow.error.kind"), Some("schema"));
    assert_eq!(
        ship.len(),
        5,
        "one command per payment, the duplicate dropped"
    );
    for m in &ship {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["command"], "ShipOrder");
        assert_eq!(v["saga"]["step"], "ship");
        assert_eq!(
            m.key.as_deref(),
            v["order_id"].as_str().map(str::as_bytes),
            "keyed by order"
        );
        assert!(v.get("paid_amount").is_some() && v.get("amount").is_none());
    }
    wait_for("18 welcome mails", Duration::from_secs(30), || {
        ds.accepted.lock().unwrap().len() >= 18
    })
    .await;
    let mails: Vec<serde_json::Value> = ds
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    assert_eq!(
        mails.len(),
        18,
        "18 real users, u3 delivered twice but mailed once"
    );
    let users: HashSet<&str> = mails.iter().filter_map(|m| m["user_id"].as_str()).collect();
    assert_eq!(users.len(), 18);
    assert!(mails
        .iter()
        .all(|m| m["template"] == "welcome-v2" && m["display_name"].is_string()));
    k.sigterm();
    assert!(
        k.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        k.log_tail(40)
    );
}
