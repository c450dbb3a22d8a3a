//! Chaos soak: two `keyflow` members in one group on an 8-partition topic, run for N minutes
//! against a real broker while a seeded schedule of faults hits them, then checked end to end.
//!
//! ```sh
//! cargo bench --bench soak                      # 10 minutes of faults, then drain and check
//! cargo bench --bench soak -- --minutes 30      # longer
//! cargo bench --bench soak -- --smoke           # ~1.5 min: each fault kind once (CI size)
//! cargo bench --bench soak -- --seed 42         # replays the schedule printed by a run
//! ```
//!
//! The pipeline is `decode → http → forward`: a local axum server stands in for the downstream
//! (answers 200, or 503 during a burst; the `http` processor has a circuit breaker), and good
//! messages end in an output topic. A producer thread writes JSON messages with per-key sequence
//! numbers at a steady rate for the whole run; a consumer thread reads the output topic and the
//! dead-letter topic as they fill.
//!
//! Faults, one at a time, drawn from the seed (each kind once first, then at random): member
//! `kill -9` then restart, member SIGTERM then restart, broker stop then restart on the same data
//! after 5–30 s, a burst of HTTP 503s, a burst of poison messages (not JSON, so `decode` sends
//! them to the DLQ). After each fault the soak waits until everything produced before the fault
//! ended is accounted for (good → output, poison → DLQ): that wait is the fault's recovery time,
//! and a fault not recovered within the limit fails the run.
//!
//! At the end faults stop, keyflow drains and the run checks: nothing lost, per-key order held
//! apart from redeliveries (the first appearance of each message in the output follows the
//! key's sequence), every poison message in the DLQ with `keyflow.error.kind = decode`, every
//! input partition committed to its end, every partition assigned and none paused
//! (`/debug/partitions` and `keyflow_partition_paused` of each member), no member exited by
//! itself, and each member's RSS flat: after warm-up, the floor (lowest sample) of every 40 s
//! window within ±10% of the first window's. A catch-up after a fault is a burst, bounded by the
//! memory budget, that memory returns from; a leak or a high-water never given back raises the
//! floors. Warm-up ends 60 s after the incarnation started, once every fault kind has run and
//! once the incarnation took the last partition it had never owned (what a process keeps per
//! partition is made at its first ownership). Peaks are printed too. It prints the figures and exits 1 if a check failed. Member logs, every RSS sample
//! (`rss.csv`) and the faults (`faults.csv`) are written to `target/soak/<seed>/`.
//!
//! `--outages N` replaces the schedule by N broker outages in a row and prints each member's
//! memory after each recovery (tells a one-off step from growth per outage).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use keyflow::introspect::DebugReport;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Headers, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use support::{free_port, try_rss_kib, unique, Broker, Keyflow};

const PARTITIONS: i32 = 8;
const MEMBERS: usize = 2;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Minutes of faults (the drain and the checks come after).
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// CI size: a short warm-up, each fault kind once with short outages, then the checks.
    #[arg(long)]
    smoke: bool,
    /// Seed of the fault schedule (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Input messages per second (good ones; poison comes on top).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100)]
    keys: u32,
    /// Diagnostic: instead of the random schedule, N broker outages of `--outage-secs` in a row
    /// (no other fault, no poison), printing each member's memory after each recovery. In the
    /// RSS check the first outage stands for "every fault kind ran once". Tells a one-off step
    /// from growth per outage.
    #[arg(long, default_value_t = 0)]
    outages: usize,
    /// Length of each outage of `--outages`.
    #[arg(long, default_value_t = 10)]
    outage_secs: u64,
    /// Extra environment for the members (`KEY=VALUE`, repeatable), e.g. `MALLOC_ARENA_MAX=2`.
    #[arg(long)]
    member_env: Vec<String>,
    /// cargo passes --bench to benchmark executables.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Sizes that differ between a smoke run and a soak.
struct Plan {
    fault_phase: Duration,
    warm_up: Duration,
    sample_every: Duration,
    gap: (u64, u64),
    /// Steady production without faults after the last fault, before the drain: RSS samples
    /// past every warm-up.
    observe: Duration,
    /// RSS is judged by its floor (lowest sample) in consecutive windows of this length: a
    /// catch-up after a fault is a burst that the budget bounds and that memory returns from; a
    /// leak raises the floor.
    floor_window: Duration,
    broker_down: (u64, u64),
    http_down: (u64, u64),
    member_down: (u64, u64),
    poison: (u64, u64),
    recovery_limit: Duration,
    drain_limit: Duration,
}

impl Plan {
    fn new(a: &Args) -> Plan {
        if a.smoke {
            Plan {
                fault_phase: Duration::ZERO, // each kind once, whatever it takes
                warm_up: Duration::from_secs(10),
                sample_every: Duration::from_secs(1),
                gap: (1, 3),
                observe: Duration::from_secs(15),
                floor_window: Duration::from_secs(10),
                broker_down: (5, 8),
                http_down: (3, 6),
                member_down: (0, 2),
                poison: (5, 20),
                recovery_limit: Duration::from_secs(90),
                drain_limit: Duration::from_secs(120),
            }
        } else {
            Plan {
                fault_phase: Duration::from_secs(a.minutes * 60),
                warm_up: Duration::from_secs(60),
                sample_every: Duration::from_secs(5),
                gap: (5, 20),
                observe: Duration::from_secs(30),
                floor_window: Duration::from_secs(40),
                broker_down: (5, 30),
                http_down: (5, 30),
                member_down: (0, 5),
                poison: (1, 50),
                recovery_limit: Duration::from_secs(120),
                drain_limit: Duration::from_secs(180),
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
// the ledger: what was produced, what came out where
// -------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Good,
    Poison,
    /// The producer's delivery report failed: not in the input, not expected anywhere.
    Undelivered,
}

struct Entry {
    kind: Kind,
    key: u32,
    seq: u32,
    out: u32,
    dlq: u32,
    /// For poison: a DLQ copy carried `keyflow.error.kind = decode`.
    dlq_reason_ok: bool,
}

#[derive(Default)]
struct Ledger {
    entries: Vec<Entry>,
    /// Per key: the highest sequence number whose first appearance in the output was seen.
    max_first_seq: Vec<Option<u32>>,
    order_violations: u64,
    order_examples: Vec<String>,
    duplicates: u64,
    good_in_dlq: u64,
    dlq_kinds: BTreeMap<String, u64>,
    poison_bad_reason: Vec<String>,
    unknown: u64,
    undelivered: u64,
    /// Every id below this is accounted for (good in the output, poison in the DLQ).
    done_below: usize,
}

impl Ledger {
    fn advance(&mut self) {
        while let Some(e) = self.entries.get(self.done_below) {
            let done = match e.kind {
                Kind::Good => e.out > 0,
                Kind::Poison => e.dlq > 0,
                Kind::Undelivered => true,
            };
            if !done {
                break;
            }
            self.done_below += 1;
        }
    }

    fn on_output(&mut self, payload: &[u8]) {
        let Some((id, _, _)) = parse_good(payload) else {
            self.unknown += 1;
            return;
        };
        let Some(e) = self.entries.get_mut(id) else {
            self.unknown += 1;
            return;
        };
        e.out += 1;
        if e.out > 1 {
            self.duplicates += 1;
            return;
        }
        let (key, seq) = (e.key, e.seq);
        let slot = &mut self.max_first_seq[key as usize];
        match *slot {
            Some(max) if seq <= max => {
                self.order_violations += 1;
                if self.order_examples.len() < 5 {
                    self.order_examples.push(format!(
                        "key k{key}: seq {seq} (id {id}) first appeared after seq {max}"
                    ));
                }
            }
            _ => *slot = Some(seq),
        }
        self.advance();
    }

    fn on_dlq(&mut self, payload: &[u8], reason: Option<String>) {
        let reason_text = reason.clone().unwrap_or_else(|| "<none>".into());
        *self.dlq_kinds.entry(reason_text.clone()).or_default() += 1;
        let text = String::from_utf8_lossy(payload);
        if let Some(id) = text
            .strip_prefix("poison ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
        {
            let Some(e) = self.entries.get_mut(id) else {
                self.unknown += 1;
                return;
            };
            e.dlq += 1;
            if reason.as_deref() == Some("decode") {
                e.dlq_reason_ok = true;
            } else if self.poison_bad_reason.len() < 5 {
                self.poison_bad_reason
                    .push(format!("poison {id}: keyflow.error.kind = {reason_text}"));
            }
        } else if let Some((id, _, _)) = parse_good(payload) {
            self.good_in_dlq += 1;
            if let Some(e) = self.entries.get_mut(id) {
                e.dlq += 1;
            }
        } else {
            self.unknown += 1;
        }
        self.advance();
    }
}

fn parse_good(payload: &[u8]) -> Option<(usize, u32, u32)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some((
        v.get("id")?.as_u64()? as usize,
        v.get("k")?.as_u64()? as u32,
        v.get("seq")?.as_u64()? as u32,
    ))
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// -------------------------------------------------------------------------------------------
// producer thread
// -------------------------------------------------------------------------------------------

struct DeliveryCtx {
    ledger: Shared<Ledger>,
}

impl ClientContext for DeliveryCtx {}

impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &DeliveryResult<'_>, id: Box<usize>) {
        if result.is_err() {
            let mut l = lock(&self.ledger);
            l.undelivered += 1;
            if let Some(e) = l.entries.get_mut(*id) {
                e.kind = Kind::Undelivered;
            }
            l.advance();
        }
    }
}

/// Writes keyed messages at `rate`/s until `stop`, plus the poison messages asked for through
/// `poison_pending`; every id is entered in the ledger before it is sent.
fn producer_thread(
    bootstrap: String,
    topic: String,
    rate: u64,
    keys: u32,
    ledger: Shared<Ledger>,
    poison_pending: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let producer: ThreadedProducer<DeliveryCtx> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Infinite: a broker outage delays the input, it never drops it.
            .set("message.timeout.ms", "0")
            .create_with_context(DeliveryCtx {
                ledger: ledger.clone(),
            })
            .expect("soak producer");
        let mut seqs = vec![0u32; keys as usize];
        let start = Instant::now();
        let mut good = 0u64;
        let pad = "x".repeat(64);
        while !stop.load(Relaxed) {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            let poison = poison_pending.load(Relaxed);
            let batch = (0..poison).map(|_| false).chain((good..due).map(|_| true));
            for is_good in batch {
                let (id, payload, key) = {
                    let mut l = lock(&ledger);
                    let id = l.entries.len();
                    let (kind, k, seq, payload) = if is_good {
                        let k = (good % keys as u64) as u32;
                        good += 1;
                        let seq = seqs[k as usize];
                        seqs[k as usize] += 1;
                        let p = format!(r#"{{"id":{id},"k":{k},"seq":{seq},"pad":"{pad}"}}"#);
                        (Kind::Good, k, seq, p)
                    } else {
                        let k = id as u32 % keys;
                        (Kind::Poison, k, 0, format!("poison {id} {{\"id\":"))
                    };
                    l.entries.push(Entry {
                        kind,
                        key: k,
                        seq,
                        out: 0,
                        dlq: 0,
                        dlq_reason_ok: false,
                    });
                    (id, payload, format!("k{k}"))
                };
                let mut record = BaseRecord::with_opaque_to(&topic, Box::new(id))
                    .payload(payload.as_bytes())
                    .key(key.as_bytes());
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err((e, _)) => panic!("soak producer: send failed: {e}"),
                    }
                }
            }
            poison_pending.fetch_sub(poison, Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = producer.flush(Duration::from_secs(300)) {
            eprintln!("[soak] producer flush: {e}");
        }
    })
}

// -------------------------------------------------------------------------------------------
// consumer thread (output + DLQ, no group)
// -------------------------------------------------------------------------------------------

fn consumer_thread(
    bootstrap: String,
    output: String,
    dlq: String,
    ledger: Shared<Ledger>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("soak-reader"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("soak consumer");
        let mut tpl = TopicPartitionList::new();
        for t in [&output, &dlq] {
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
            }
        }
        consumer.assign(&tpl).expect("assign output and dlq");
        while !stop.load(Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let payload = m.payload().unwrap_or_default();
                if m.topic() == output {
                    lock(&ledger).on_output(payload);
                } else {
                    let reason = m.headers().and_then(|hs| {
                        hs.iter()
                            .find(|h| h.key == "keyflow.error.kind")
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    });
                    lock(&ledger).on_dlq(payload, reason);
                }
            }
        }
    })
}

// -------------------------------------------------------------------------------------------
// downstream HTTP server
// -------------------------------------------------------------------------------------------

#[derive(Default)]
struct Downstream {
    failing: AtomicBool,
    ok: AtomicU64,
    rejected: AtomicU64,
}

fn serve_downstream(state: Arc<Downstream>) -> SocketAddr {
    use axum::{extract::State, http::StatusCode, routing::post, Router};
    async fn hook(State(s): State<Arc<Downstream>>) -> StatusCode {
        if s.failing.load(Relaxed) {
            s.rejected.fetch_add(1, Relaxed);
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            s.ok.fetch_add(1, Relaxed);
            StatusCode::OK
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("downstream runtime");
        rt.block_on(async move {
            let app = Router::new().route("/hook", post(hook)).with_state(state);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind downstream");
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.expect("downstream server");
        });
    });
    rx.recv().expect("downstream address")
}

// -------------------------------------------------------------------------------------------
// members
// -------------------------------------------------------------------------------------------

struct Member {
    kf: Keyflow,
    http: String,
    incarnation: usize,
}

struct Members {
    slots: Vec<Option<Member>>,
    /// Incarnations no longer running (kept for their logs).
    gone: Vec<(usize, Member)>,
    next_incarnation: usize,
}

/// (member slot, incarnation number).
type Incarnation = (usize, usize);

struct Cluster {
    bootstrap: String,
    pipeline: String,
    /// Extra environment of every member (`--member-env`).
    env: Vec<(String, String)>,
    members: Mutex<Members>,
    /// (member, incarnation) → RSS samples (seconds since `t0`, KiB).
    rss: Mutex<BTreeMap<Incarnation, Vec<(f64, u64)>>>,
    started: Mutex<BTreeMap<Incarnation, Instant>>,
    failures: Mutex<Vec<String>>,
    t0: Instant,
    /// Wall clock at `t0`, to place member log lines on the soak's time line.
    t0_wall: std::time::SystemTime,
}

impl Cluster {
    fn start_member(&self, slot: usize) {
        let http = format!("127.0.0.1:{}", free_port());
        let mut env = vec![
            ("KEYFLOW_HTTP__ADDRESS", http.as_str()),
            ("RUST_LOG", "info"),
        ];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let kf = Keyflow::start_many(&self.bootstrap, &[&self.pipeline], &env);
        let mut m = lock(&self.members);
        m.next_incarnation += 1;
        let incarnation = m.next_incarnation;
        lock(&self.started).insert((slot, incarnation), Instant::now());
        m.slots[slot] = Some(Member {
            kf,
            http,
            incarnation,
        });
    }

    fn take(&self, slot: usize) -> Option<Member> {
        lock(&self.members).slots[slot].take()
    }

    fn bury(&self, slot: usize, m: Member) {
        lock(&self.members).gone.push((slot, m));
    }

    fn fail(&self, what: String) {
        eprintln!("[soak] CHECK FAILED: {what}");
        lock(&self.failures).push(what);
    }

    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// One RSS sample of each running member; a member that exited on its own is a failure
    /// (noted, and it is restarted so the run can go on).
    fn sample(&self) {
        let mut exited = Vec::new();
        {
            let mut m = lock(&self.members);
            for (slot, s) in m.slots.iter_mut().enumerate() {
                let Some(member) = s else { continue };
                if !member.kf.is_running() {
                    exited.push(slot);
                    continue;
                }
                let key = (slot, member.incarnation);
                if let Some(kib) = try_rss_kib(member.kf.pid()) {
                    lock(&self.rss)
                        .entry(key)
                        .or_default()
                        .push((self.secs(), kib));
                }
            }
        }
        for slot in exited {
            if let Some(mut m) = self.take(slot) {
                let status = m.kf.wait_exit(Duration::from_secs(1));
                self.fail(format!(
                    "member {slot} (incarnation {}) exited by itself at t={:.0}s: {status}; log tail:\n{}",
                    m.incarnation,
                    self.secs(),
                    m.kf.log_tail(15)
                ));
                self.bury(slot, m);
                self.start_member(slot);
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
// faults
// -------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Fault {
    Kill9 {
        member: usize,
        down: Duration,
    },
    Sigterm {
        member: usize,
        down: Duration,
    },
    BrokerOutage {
        down: Duration,
    },
    /// With `during`, a member fault is injected half-way through the burst, while the open
    /// breaker holds the gate (partitions paused and then revoked or assigned).
    Http503 {
        down: Duration,
        during: Option<Box<Fault>>,
    },
    Poison {
        messages: u64,
    },
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Kill9 { .. } => "kill -9",
            Fault::Sigterm { .. } => "sigterm",
            Fault::BrokerOutage { .. } => "broker outage",
            Fault::Http503 { during: None, .. } => "http 503 burst",
            Fault::Http503 {
                during: Some(f), ..
            } => match **f {
                Fault::Kill9 { .. } => "503 + kill -9",
                _ => "503 + sigterm",
            },
            Fault::Poison { .. } => "poison burst",
        }
    }

    fn draw(kind: usize, rng: &mut StdRng, plan: &Plan) -> Fault {
        let secs = |rng: &mut StdRng, (a, b): (u64, u64)| {
            Duration::from_millis(rng.random_range(a * 1000..=b * 1000))
        };
        match kind {
            0 => Fault::Kill9 {
                member: rng.random_range(0..MEMBERS),
                down: secs(rng, plan.member_down),
            },
            1 => Fault::Sigterm {
                member: rng.random_range(0..MEMBERS),
                down: secs(rng, plan.member_down),
            },
            2 => Fault::BrokerOutage {
                down: secs(rng, plan.broker_down),
            },
            3 => Fault::Http503 {
                down: secs(rng, plan.http_down),
                during: rng
                    .random_bool(0.5)
                    .then(|| Box::new(Fault::draw(rng.random_range(0..2), rng, plan))),
            },
            _ => Fault::Poison {
                messages: rng.random_range(plan.poison.0..=plan.poison.1),
            },
        }
    }
}

struct FaultRecord {
    fault: Fault,
    at: f64,
    /// From the fault's start to the moment its cause was removed.
    lasted: Duration,
    /// From then until everything produced before it was accounted for.
    recovery: Option<Duration>,
    note: String,
}

fn inject(
    fault: &Fault,
    cluster: &Cluster,
    broker: &Broker,
    downstream: &Downstream,
    poison_pending: &AtomicU64,
    ledger: &Mutex<Ledger>,
) -> String {
    match *fault {
        Fault::Kill9 { member, down } => {
            let mut note = String::new();
            if let Some(mut m) = cluster.take(member) {
                m.kf.kill9();
                note = format!("pid {} killed", m.kf.pid());
                cluster.bury(member, m);
            }
            std::thread::sleep(down);
            cluster.start_member(member);
            note
        }
        Fault::Sigterm { member, down } => {
            let mut note = String::new();
            if let Some(mut m) = cluster.take(member) {
                let t = Instant::now();
                m.kf.sigterm();
                while m.kf.is_running() && t.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if m.kf.is_running() {
                    cluster.fail(format!(
                        "member {member} did not exit within 60 s of SIGTERM; log tail:\n{}",
                        m.kf.log_tail(15)
                    ));
                    m.kf.kill9();
                    note = "no exit in 60 s, killed".into();
                } else {
                    let status = m.kf.wait_exit(Duration::from_secs(1));
                    note = format!("exited in {:.1?} with {status}", t.elapsed());
                }
                cluster.bury(member, m);
            }
            std::thread::sleep(down);
            cluster.start_member(member);
            note
        }
        Fault::BrokerOutage { down } => {
            let t = Instant::now();
            broker.stop();
            let stopped = t.elapsed();
            std::thread::sleep(down);
            let t = Instant::now();
            broker.restart();
            format!("stop took {stopped:.1?}, restart took {:.1?}", t.elapsed())
        }
        Fault::Http503 { down, ref during } => {
            let before = downstream.rejected.load(Relaxed);
            let t = Instant::now();
            downstream.failing.store(true, Relaxed);
            let mut inner = String::new();
            if let Some(f) = during {
                std::thread::sleep(down / 2);
                inner = format!(
                    "; during it {}: {}",
                    f.kind(),
                    inject(f, cluster, broker, downstream, poison_pending, ledger)
                );
            }
            std::thread::sleep(down.saturating_sub(t.elapsed()));
            downstream.failing.store(false, Relaxed);
            format!(
                "{} calls answered 503{inner}",
                downstream.rejected.load(Relaxed) - before
            )
        }
        Fault::Poison { messages } => {
            let before = lock(ledger).entries.len();
            poison_pending.fetch_add(messages, Relaxed);
            let t = Instant::now();
            while poison_pending.load(Relaxed) > 0 && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            format!("ids from {before}")
        }
    }
}

/// From a member's log (`partitions assigned` / `partitions revoked` lines; assignments are
/// incremental), in seconds since `t0_wall`: when it first held every input partition at once
/// (its biggest catch-up), and when it last took a partition it had never owned before (each
/// partition's first ownership creates what the process keeps for it: its Prometheus series,
/// which the recorder keeps for the process's life so that counters never reset, and
/// librdkafka's and keyflow's per-partition structures).
fn partition_milestones(
    log: &str,
    t0_wall: std::time::SystemTime,
    until: f64,
) -> (Option<f64>, Option<f64>) {
    let mut owned = std::collections::BTreeSet::new();
    let mut ever = std::collections::BTreeSet::new();
    let (mut at_once, mut last_new, mut known) = (None, None, 0);
    for line in log.lines() {
        let added = if line.contains("partitions assigned ") {
            true
        } else if line.contains("partitions revoked ") {
            false
        } else {
            continue;
        };
        let Some(list) = line
            .split_once("partitions=[")
            .and_then(|(_, r)| r.split_once(']'))
            .map(|(l, _)| l)
        else {
            continue;
        };
        for p in list.split(',').filter_map(|p| p.trim().parse::<i32>().ok()) {
            if added {
                owned.insert(p);
                ever.insert(p);
            } else {
                owned.remove(&p);
            }
        }
        let stamp = || {
            let at = humantime::parse_rfc3339(line.split_whitespace().next()?).ok()?;
            Some(at.duration_since(t0_wall).ok()?.as_secs_f64())
        };
        // The final shutdown's rebalances (one member leaves first, the other takes its
        // partitions) come after the judged run.
        if stamp().is_some_and(|t| t > until) {
            break;
        }
        if at_once.is_none() && owned.len() == PARTITIONS as usize {
            at_once = stamp();
        }
        if ever.len() > known {
            known = ever.len();
            last_new = stamp();
        }
    }
    (at_once, last_new)
}

/// A member's memory at a glance: RSS (anonymous / file-backed), threads, open files, and the
/// size of its `/metrics` page (a label per error or per incarnation would grow it).
fn memory_probe(pid: u32, http: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().trim_end_matches(" kB").to_string())
            .unwrap_or_else(|| "?".into())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let metrics = keyflow::http::get_blocking(http, "/metrics", Duration::from_secs(5))
        .map_or(0, |(_, b)| b.len());
    format!(
        "RSS {} KiB (anon {}, file {}), threads {}, fds {fds}, /metrics {metrics} B",
        field("VmRSS"),
        field("RssAnon"),
        field("RssFile"),
        field("Threads"),
    )
}

/// Waits until every id produced so far is accounted for; `None` after `limit`.
fn wait_accounted(ledger: &Mutex<Ledger>, limit: Duration) -> Option<Duration> {
    let mark = lock(ledger).entries.len();
    let t = Instant::now();
    loop {
        if lock(ledger).done_below >= mark {
            return Some(t.elapsed());
        }
        if t.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// -------------------------------------------------------------------------------------------
// main
// -------------------------------------------------------------------------------------------

fn pipeline_toml(input: &str, group: &str, output: &str, dlq: &str, hook: SocketAddr) -> String {
    format!(
        r#"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout = "6s"
drain_timeout = "3s"
commit_interval = "200ms"
max_in_flight = 200
dead_letter_topic = "{dlq}"

# Well above the breaker's threshold: an open breaker costs no attempt, so an outage must not
# dead-letter good messages.
[retry]
max_attempts = 20
backoff = "100ms"
max_backoff = "2s"

[[processors]]
type = "decode"

[[processors]]
type = "http"
url = "http://{hook}/hook"
timeout = "2s"
circuit_breaker = {{ failures = 5, cool_down = "2s" }}

[[processors]]
type = "forward"
topic = "{output}"
"#
    )
}

/// The value of every `name{...}` sample in a Prometheus text exposition.
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            let (labels, v) = rest.rsplit_once(' ')?;
            Some((labels.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn main() {
    let a = Args::parse();
    let plan = Plan::new(&a);
    let seed = a.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    println!(
        "[soak] seed {seed} (replay: cargo bench --bench soak -- {}--seed {seed}{})",
        if a.smoke { "--smoke " } else { "" },
        if a.smoke {
            String::new()
        } else {
            format!(" --minutes {}", a.minutes)
        }
    );

    let broker = Broker::start();
    let (input, output, group) = (unique("soak-in"), unique("soak-out"), unique("soak-g"));
    let dlq = format!("{input}.dlq");
    // Not `create_topic_blocking`: its metadata check does not wait long enough on a loaded
    // machine; `partition_count` does.
    let new: Vec<_> = [&input, &output, &dlq]
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let created =
        futures::executor::block_on(broker.admin().create_topics(&new, &AdminOptions::new()))
            .expect("create topics");
    assert!(
        created.iter().all(Result::is_ok),
        "create topics: {created:?}"
    );
    for t in [&input, &output, &dlq] {
        broker.partition_count(t, Duration::from_secs(60));
    }
    let downstream = Arc::new(Downstream::default());
    let hook = serve_downstream(downstream.clone());

    let ledger: Shared<Ledger> = Arc::new(Mutex::new(Ledger {
        max_first_seq: vec![None; a.keys as usize],
        ..Ledger::default()
    }));
    let cluster = Arc::new(Cluster {
        bootstrap: broker.bootstrap.clone(),
        pipeline: pipeline_toml(&input, &group, &output, &dlq, hook),
        env: a
            .member_env
            .iter()
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| panic!("--member-env {kv}: want KEY=VALUE"));
                (k.to_string(), v.to_string())
            })
            .collect(),
        members: Mutex::new(Members {
            slots: (0..MEMBERS).map(|_| None).collect(),
            gone: Vec::new(),
            next_incarnation: 0,
        }),
        rss: Mutex::new(BTreeMap::new()),
        started: Mutex::new(BTreeMap::new()),
        failures: Mutex::new(Vec::new()),
        t0: Instant::now(),
        t0_wall: std::time::SystemTime::now(),
    });
    for slot in 0..MEMBERS {
        cluster.start_member(slot);
    }
    broker.wait_group_stable(&group, MEMBERS, Duration::from_secs(60));

    let stop_producer = Arc::new(AtomicBool::new(false));
    let stop_rest = Arc::new(AtomicBool::new(false));
    let poison_pending = Arc::new(AtomicU64::new(0));
    let producer = producer_thread(
        broker.bootstrap.clone(),
        input.clone(),
        a.rate,
        a.keys,
        ledger.clone(),
        poison_pending.clone(),
        stop_producer.clone(),
    );
    let consumer = consumer_thread(
        broker.bootstrap.clone(),
        output.clone(),
        dlq.clone(),
        ledger.clone(),
        stop_rest.clone(),
    );
    let sampler = {
        let (cluster, stop, every) = (cluster.clone(), stop_rest.clone(), plan.sample_every);
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                cluster.sample();
                std::thread::sleep(every);
            }
        })
    };

    // --- warm-up, then faults ---
    let t_start = Instant::now();
    println!(
        "[soak] {} members, {PARTITIONS} partitions, {} msg/s over {} keys; warm-up {:?}",
        MEMBERS, a.rate, a.keys, plan.warm_up
    );
    std::thread::sleep(plan.warm_up);
    let mut kinds: Vec<usize> = (0..5).collect();
    kinds.shuffle(&mut rng);
    let mut records: Vec<FaultRecord> = Vec::new();
    let fault_end = t_start + plan.warm_up + plan.fault_phase;
    let mut next = 0;
    // RSS is judged once every fault kind has run once (a member holding all 8 partitions, an
    // open breaker, dead letters): before that it steps with what the process first meets.
    let mut cycle_done = None;
    let mut memory_lines = Vec::new();
    for i in 0..a.outages {
        let fault = Fault::BrokerOutage {
            down: Duration::from_secs(a.outage_secs),
        };
        let at = cluster.secs();
        println!("[soak] t={at:>6.1}s outage {}/{}", i + 1, a.outages);
        let t = Instant::now();
        let note = inject(
            &fault,
            &cluster,
            &broker,
            &downstream,
            &poison_pending,
            &ledger,
        );
        let lasted = t.elapsed();
        let recovery = wait_accounted(&ledger, plan.recovery_limit);
        if recovery.is_none() {
            cluster.fail(format!(
                "outage {} at t={at:.0}s: not recovered {:?} after it ended ({note})",
                i + 1,
                plan.recovery_limit
            ));
        }
        // Settle as long as a soak's gap, then look at each member.
        std::thread::sleep(Duration::from_secs(10));
        if i == 0 {
            cycle_done = Some(cluster.secs());
        }
        let m = lock(&cluster.members);
        for (slot, member) in m.slots.iter().enumerate() {
            if let Some(member) = member {
                let line = format!(
                    "after outage {:>2} (t={:>4.0}s, recovered in {:>5}): member {slot} #{}: {}",
                    i + 1,
                    cluster.secs(),
                    recovery.map_or("NONE".into(), |d| format!("{d:.1?}")),
                    member.incarnation,
                    memory_probe(member.kf.pid(), &member.http)
                );
                println!("[soak] {line}");
                memory_lines.push(line);
            }
        }
        drop(m);
        records.push(FaultRecord {
            fault,
            at,
            lasted,
            recovery,
            note,
        });
    }
    // The random schedule (none with --outages).
    loop {
        if a.outages > 0 {
            break;
        }
        if next == kinds.len() {
            cycle_done = Some(cluster.secs());
        }
        let kind = if next < kinds.len() {
            kinds[next]
        } else if Instant::now() < fault_end {
            rng.random_range(0..5)
        } else {
            break;
        };
        next += 1;
        let fault = Fault::draw(kind, &mut rng, &plan);
        let at = cluster.secs();
        println!("[soak] t={at:>6.1}s fault #{next}: {fault:?}");
        let t = Instant::now();
        let note = inject(
            &fault,
            &cluster,
            &broker,
            &downstream,
            &poison_pending,
            &ledger,
        );
        let lasted = t.elapsed();
        let recovery = wait_accounted(&ledger, plan.recovery_limit);
        match recovery {
            Some(r) => println!(
                "[soak]           {} over after {lasted:.1?} ({note}); recovered {r:.1?} later",
                fault.kind()
            ),
            None => {
                // One lock: the ledger's mutex is not reentrant.
                let (produced, accounted) = {
                    let l = lock(&ledger);
                    (l.entries.len(), l.done_below)
                };
                cluster.fail(format!(
                    "fault #{next} ({fault:?}, at t={at:.0}s): not recovered {:?} after it ended \
                     ({note}); {produced} ids produced, {accounted} accounted in order",
                    plan.recovery_limit,
                ))
            }
        }
        records.push(FaultRecord {
            fault,
            at,
            lasted,
            recovery,
            note,
        });
        let gap = rng.random_range(plan.gap.0 * 1000..=plan.gap.1 * 1000);
        std::thread::sleep(Duration::from_millis(gap));
    }

    let fault_phase = t_start.elapsed();
    println!(
        "[soak] t={:.1}s last fault over; {:?} without faults",
        cluster.secs(),
        plan.observe
    );
    std::thread::sleep(plan.observe);

    // --- drain ---
    stop_producer.store(true, Relaxed);
    producer.join().expect("producer thread");
    let produced = lock(&ledger).entries.len();
    let drain_at = cluster.secs();
    println!(
        "[soak] t={drain_at:.1}s faults over; producer stopped at {produced} messages; draining"
    );
    let drain = wait_accounted(&ledger, plan.drain_limit);
    if drain.is_none() {
        let l = lock(&ledger);
        cluster.fail(format!(
            "not drained {:?} after the faults: {} of {produced} ids accounted in order",
            plan.drain_limit, l.done_below
        ));
    }
    // Committed offsets reach the end of every input partition.
    let high = broker.high_watermarks(&input);
    let t = Instant::now();
    let mut committed = broker.committed_offsets(&group, &input, PARTITIONS);
    while committed != high && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        committed = broker.committed_offsets(&group, &input, PARTITIONS);
    }
    if committed != high {
        cluster.fail(format!(
            "committed offsets {committed:?} never reached the high watermarks {high:?}"
        ));
    }
    // Every partition owned by a live member, none paused.
    let mut owned = Vec::new();
    let mut paused_report = Vec::new();
    {
        let m = lock(&cluster.members);
        for (slot, member) in m.slots.iter().enumerate() {
            let Some(member) = member else { continue };
            match keyflow::http::get_blocking(
                &member.http,
                "/debug/partitions",
                Duration::from_secs(5),
            )
            .map(|(_, b)| serde_json::from_str::<DebugReport>(&b))
            {
                Ok(Ok(report)) => {
                    for p in report.pipelines.iter().flat_map(|p| &p.partitions) {
                        owned.push(p.partition);
                        if p.paused || p.error.is_some() {
                            paused_report.push(format!(
                                "member {slot} partition {}: paused {} error {:?}",
                                p.partition, p.paused, p.error
                            ));
                        }
                    }
                }
                other => cluster.fail(format!(
                    "member {slot}: /debug/partitions unreadable: {:?}",
                    other.map(|r| r.map(|_| ()))
                )),
            }
            match keyflow::http::get_blocking(&member.http, "/metrics", Duration::from_secs(5)) {
                Ok((_, text)) => {
                    for (labels, v) in samples(&text, "keyflow_partition_paused") {
                        if v != 0.0 {
                            paused_report.push(format!(
                                "member {slot}: keyflow_partition_paused{labels} = {v}"
                            ));
                        }
                    }
                }
                Err(e) => cluster.fail(format!("member {slot}: /metrics unreadable: {e}")),
            }
        }
    }
    owned.sort_unstable();
    if owned != (0..PARTITIONS).collect::<Vec<_>>() {
        cluster.fail(format!(
            "partitions owned by the live members: {owned:?} (want each of 0..{PARTITIONS} once)"
        ));
    }
    if !paused_report.is_empty() {
        cluster.fail(format!("partitions left paused: {paused_report:?}"));
    }
    // A short quiet period so late duplicates are counted, then stop everything.
    std::thread::sleep(Duration::from_secs(2));
    stop_rest.store(true, Relaxed);
    consumer.join().expect("consumer thread");
    sampler.join().expect("sampler thread");
    let mut exits = Vec::new();
    for slot in 0..MEMBERS {
        if let Some(mut m) = cluster.take(slot) {
            m.kf.sigterm();
            let t = Instant::now();
            while m.kf.is_running() && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if m.kf.is_running() {
                m.kf.kill9();
                exits.push(format!("member {slot}: no exit 30 s after SIGTERM, killed"));
            } else {
                exits.push(format!(
                    "member {slot}: {} in {:.1?}",
                    m.kf.wait_exit(Duration::from_secs(1)),
                    t.elapsed()
                ));
            }
            cluster.bury(slot, m);
        }
    }

    // --- checks and figures ---
    let l = lock(&ledger);
    let good: Vec<(usize, &Entry)> = l
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == Kind::Good)
        .collect();
    let poison: Vec<(usize, &Entry)> = l
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == Kind::Poison)
        .collect();
    let lost: Vec<String> = good
        .iter()
        .filter(|(_, e)| e.out == 0)
        .map(|(id, e)| format!("id {id} (k{} seq {}, {} in DLQ)", e.key, e.seq, e.dlq))
        .collect();
    if !lost.is_empty() {
        cluster.fail(format!(
            "{} good messages missing from the output, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    if l.order_violations > 0 {
        cluster.fail(format!(
            "{} per-key order violations, e.g. {:?}",
            l.order_violations, l.order_examples
        ));
    }
    let poison_missing: Vec<usize> = poison
        .iter()
        .filter(|(_, e)| !e.dlq_reason_ok)
        .map(|(id, _)| *id)
        .collect();
    if !poison_missing.is_empty() {
        cluster.fail(format!(
            "{} poison messages not in the DLQ with keyflow.error.kind = decode, e.g. ids {:?}; \
             wrong reasons: {:?}",
            poison_missing.len(),
            &poison_missing[..poison_missing.len().min(5)],
            l.poison_bad_reason
        ));
    }
    if l.undelivered > 0 {
        cluster.fail(format!(
            "the soak producer failed to deliver {} messages",
            l.undelivered
        ));
    }
    if poison.is_empty() && a.outages == 0 {
        cluster.fail("no poison message was injected".into());
    }

    // RSS: per incarnation, flat after warm-up: the floor (lowest sample) of every window of
    // `floor_window` after warm-up within ±10% of the floor of the first one. A
    // catch-up after a fault is a burst (bounded by the memory budget) that memory returns from
    // within a window; a leak, or a high-water that is never given back, raises the floors.
    // Warm-up ends `plan.warm_up` after the incarnation started, and not before every fault kind
    // ran once. The peak after warm-up is printed too (a burst), and when the incarnation first
    // held every partition at once (from its log): the biggest catch-up.
    let rss = lock(&cluster.rss);
    let started = lock(&cluster.started);
    let milestones: BTreeMap<Incarnation, (Option<f64>, Option<f64>)> = lock(&cluster.members)
        .gone
        .iter()
        .map(|(slot, m)| {
            (
                (*slot, m.incarnation),
                partition_milestones(&m.kf.log(), cluster.t0_wall, drain_at),
            )
        })
        .collect();
    let cycle_done = cycle_done.unwrap_or_else(|| cluster.secs());
    let window = plan.floor_window.as_secs_f64();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut rss_lines = Vec::new();
    let mut judged = 0;
    for (&(slot, inc), s) in rss.iter() {
        let born = started
            .get(&(slot, inc))
            .map_or(0.0, |t| t.duration_since(cluster.t0).as_secs_f64());
        let lived = s.last().map_or(0.0, |x| x.0 - born);
        let (at_once, last_new) = milestones.get(&(slot, inc)).copied().unwrap_or_default();
        let all_at = format!(
            "last new partition at {}, all at once {}",
            last_new.map_or("never".into(), |t| format!("t={t:.0}s")),
            at_once.map_or("never".into(), |t| format!("at t={t:.0}s")),
        );
        // Warm-up also takes the first ownership of each partition the incarnation owns: what
        // the process keeps per partition is made then, once.
        let warm_end = (born + plan.warm_up.as_secs_f64())
            .max(cycle_done)
            .max(last_new.unwrap_or(0.0));
        let floors = rss_floors(s, warm_end, window);
        let Some(((_, reference), later)) = floors.split_first() else {
            rss_lines.push(format!(
                "member {slot} #{inc}: t={born:.0}s..{:.0}s, {all_at}, not sampled after warm-up (t={warm_end:.0}s), {} samples, peak {:.1} MiB",
                born + lived,
                s.len(),
                mib(s.iter().map(|x| x.1).max().unwrap_or(0))
            ));
            continue;
        };
        let reference = *reference;
        let after: Vec<u64> = s
            .iter()
            .filter(|(t, _)| *t >= warm_end)
            .map(|x| x.1)
            .collect();
        let peak = after.iter().copied().max().unwrap_or(reference);
        let end = after.last().copied().unwrap_or(reference);
        let pct = |v: u64| (v as f64 / reference as f64 - 1.0) * 100.0;
        let off: Vec<String> = later
            .iter()
            .filter(|(_, f)| {
                (*f as f64) > reference as f64 * 1.10 || (*f as f64) < reference as f64 * 0.90
            })
            .map(|(t, f)| format!("t={t:.0}s {:.1} MiB ({:+.1}%)", mib(*f), pct(*f)))
            .collect();
        let (hi, lo) = later
            .iter()
            .fold((reference, reference), |(hi, lo), (_, f)| {
                (hi.max(*f), lo.min(*f))
            });
        let line = format!(
            "member {slot} #{inc}: t={born:.0}s..{:.0}s, {all_at}; first {window:.0} s floor after warm-up (t={warm_end:.0}s) {:.1} MiB, \
             {} later {window:.0} s floors {:.1}..{:.1} MiB ({:+.1}%..{:+.1}%); peak {:.1} MiB ({:+.1}%), end {:.1} MiB ({:+.1}%){}",
            born + lived,
            mib(reference),
            later.len(),
            mib(lo),
            mib(hi),
            pct(lo),
            pct(hi),
            mib(peak),
            pct(peak),
            mib(end),
            pct(end),
            if off.is_empty() { String::new() } else { format!("  NOT FLAT: {}", off.join(", ")) }
        );
        if !later.is_empty() {
            judged += 1;
            if !off.is_empty() {
                cluster.fail(format!("RSS not flat: {line}"));
            }
        }
        rss_lines.push(line);
    }
    if judged == 0 {
        cluster.fail("RSS: no member incarnation lived long enough past warm-up to judge".into());
    }

    // Logs, for the evidence.
    let seed_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/soak/{seed}"));
    let _ = std::fs::create_dir_all(&seed_dir);
    for (slot, m) in &lock(&cluster.members).gone {
        let _ = std::fs::copy(
            m.kf.log_path(),
            seed_dir.join(format!("member{slot}-{}.log", m.incarnation)),
        );
    }
    // Every RSS sample, and when each fault ran, to tell a step from a leak afterwards.
    let mut csv = String::from("t_s,member,incarnation,rss_kib\n");
    for (&(slot, inc), s) in rss.iter() {
        for (t, kib) in s {
            csv.push_str(&format!("{t:.1},{slot},{inc},{kib}\n"));
        }
    }
    let _ = std::fs::write(seed_dir.join("rss.csv"), csv);
    let faults: String = records
        .iter()
        .map(|r| format!("{:.1},{:.1},{:?}\n", r.at, r.lasted.as_secs_f64(), r.fault))
        .collect();
    let _ = std::fs::write(seed_dir.join("faults.csv"), faults);

    let mut by_kind: BTreeMap<&str, (usize, Vec<f64>)> = BTreeMap::new();
    for r in &records {
        let e = by_kind.entry(r.fault.kind()).or_default();
        e.0 += 1;
        if let Some(d) = r.recovery {
            e.1.push(d.as_secs_f64());
        }
    }
    println!("\n=== keyflow chaos soak: seed {seed} ===");
    println!(
        "fault phase {:.0}s (incl. {:?} warm-up), {} faults; drain {}",
        fault_phase.as_secs_f64(),
        plan.warm_up,
        records.len(),
        drain.map_or("NOT COMPLETE".into(), |d| format!("{d:.1?}"))
    );
    println!(
        "input: {} messages ({} good, {} poison); output: {} distinct good, {} duplicates; \
         DLQ: {} ({} poison, {} good), by keyflow.error.kind {:?}; unparseable {}",
        l.entries.len(),
        good.len(),
        poison.len(),
        good.iter().filter(|(_, e)| e.out > 0).count(),
        l.duplicates,
        l.entries.iter().map(|e| e.dlq as u64).sum::<u64>(),
        poison.iter().map(|(_, e)| e.dlq as u64).sum::<u64>(),
        l.good_in_dlq,
        l.dlq_kinds,
        l.unknown
    );
    println!(
        "order violations: {}; lost: {}; downstream calls: {} ok, {} answered 503",
        l.order_violations,
        lost.len(),
        downstream.ok.load(Relaxed),
        downstream.rejected.load(Relaxed)
    );
    println!("faults by kind (count; recovery min / median / max s):");
    for (kind, (n, mut rec)) in by_kind {
        rec.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            rec.get(((rec.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        println!(
            "  {kind:<15} {n:>3}; recovery {}",
            match (pick(0.0), pick(0.5), pick(1.0)) {
                (Some(a), Some(b), Some(c)) => format!("{a:.1} / {b:.1} / {c:.1}"),
                _ => "none recovered".into(),
            }
        );
    }
    println!("faults:");
    for r in &records {
        println!(
            "  t={:>6.1}s {:<15} lasted {:>6.1?}, recovery {:>8} {:?} {}",
            r.at,
            r.fault.kind(),
            r.lasted,
            r.recovery.map_or("NONE".into(), |d| format!("{d:.1?}")),
            r.fault,
            r.note
        );
    }
    println!(
        "RSS per member incarnation (warm-up: {:?} after start, not before t={cycle_done:.0}s, when every fault kind had run, nor before the incarnation's last first ownership of a partition; floors per {:?}):",
        plan.warm_up, plan.floor_window
    );
    for line in &rss_lines {
        println!("  {line}");
    }
    if !memory_lines.is_empty() {
        println!("memory after each outage (+10 s):");
        for line in &memory_lines {
            println!("  {line}");
        }
    }
    println!("final exits: {exits:?}");
    println!("member logs: {}", seed_dir.display());
    let failures = lock(&cluster.failures);
    if failures.is_empty() {
        println!("ALL CHECKS PASSED");
    } else {
        println!("{} CHECK(S) FAILED:", failures.len());
        for f in failures.iter() {
            println!("  - {f}");
        }
        drop(failures);
        drop(l);
        drop(rss);
        drop(started);
        std::process::exit(1);
    }
}

/// RSS floors: the lowest sample of each window of `window` seconds from `warm_end` on, with
/// the window's start; the first is the reference the others are judged against. A window
/// without samples is left out; the last one counts only if it spans at least half a window (a
/// partial window at an incarnation's end would judge a floor on one or two samples).
fn rss_floors(s: &[(f64, u64)], warm_end: f64, window: f64) -> Vec<(f64, u64)> {
    let last = s.last().map_or(warm_end, |x| x.0);
    let mut floors = Vec::new();
    let mut from = warm_end;
    while from + window / 2.0 <= last {
        let floor = s
            .iter()
            .filter(|(t, _)| *t >= from && *t < from + window)
            .map(|x| x.1)
            .min();
        if let Some(f) = floor {
            floors.push((from, f));
        }
        from += window;
    }
    floors
}
