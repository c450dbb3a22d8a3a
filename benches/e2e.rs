//! End-to-end benchmark: keyflow against a minimal rdkafka consumer loop, in the same run, on a
//! real broker (Apache Kafka, installed and started the way the tests do it).
//!
//! `cargo bench --bench e2e` runs every scenario 3 times per side and prints a table of medians;
//! `-- --scenario io --runs 1` (or a list, `--scenario cpu8,cpu64`), `-- --smoke` (tiny sizes,
//! what CI runs) and size flags adjust it. Results go to `target/bench/<scenario>.json`.
//!
//! Per side and run: peak RSS (VmHWM), CPU seconds (user+sys, getrusage of the child at its
//! end) and CPU µs per message, the steady rate after the first message, keyflow's partition
//! pauses (the baseline never pauses), and with `gaps` (the backlog scenarios) the processing
//! gaps: a partition that completes nothing for ≥ 50 ms and then resumes. That is the stall a
//! pause/resume cycle costs when the refetch after the resume comes later than the buffered
//! messages run out. keyflow's stats have no resume → next-fetch timestamp, so the refetch
//! delay itself is not measured.
//!
//! Each side runs in its own child process (this executable, re-invoked with `--child`), so that
//! peak RSS is that side's alone. Both sides do the same per-message work: parse the JSON
//! payload, count the message id (lost/duplicated) and check the per-key sequence (order
//! violations); the io scenarios also await a 2 ms (or 1 ms) "downstream call".

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use clap::Parser;
use keyflow::config::{self, Env, Global};
use keyflow::{Flow, Message, ProcessError, Processor, Runtime};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// cpu | cpu8 | cpu64 | io | skew | backlog | backlog1g | latency | all, or a
    /// comma-separated list of them.
    #[arg(long, default_value = "all")]
    scenario: String,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tiny sizes: checks the harness works (CI), measures nothing.
    #[arg(long)]
    smoke: bool,
    #[arg(long)]
    cpu_messages: Option<usize>,
    #[arg(long)]
    io_messages: Option<usize>,
    #[arg(long)]
    backlog_messages: Option<usize>,
    /// Messages of cpu8 and cpu64 (2,000,000).
    #[arg(long)]
    cpu_n_messages: Option<usize>,
    /// Messages of backlog1g (1 KiB each; 1,048,576 = 1 GiB of values).
    #[arg(long)]
    backlog1g_messages: Option<usize>,
    /// keyflow's process-wide memory budget (`memory_limit`, bytes), keyflow side only; without
    /// it keyflow's default applies (half the cgroup limit, else 256 MiB).
    #[arg(long)]
    memory_limit: Option<u64>,
    /// The preload producer's `batch.size` (bytes). A consumer fetches whole record batches:
    /// left to librdkafka's default (1 MB, filled or not depending on how busy the machine is),
    /// the preload's batch sizes varied from run to run (8 to 56 batches per partition on cpu64)
    /// and with them every peak RSS. 65,536 keeps them the same in every run (the Java
    /// producer's default is 16,384); `--preload-batch-bytes 1000000` shows what ~1 MB batches
    /// cost (BENCHMARKS.md, "One batch per partition").
    #[arg(long, default_value_t = 65_536)]
    preload_batch_bytes: usize,
    /// Messages per second produced during the latency scenario.
    #[arg(long, default_value_t = 20_000)]
    latency_rate: usize,
    /// Which sides run, of `keyflow` and `baseline`.
    #[arg(long, default_value = "keyflow,baseline")]
    sides: String,
    /// Another build of this benchmark (an older commit's `target/release/deps/e2e-*`, built
    /// into its own target directory): its keyflow side, `against`, runs in every run right
    /// after this build's, on the same broker and topic, and the table gives this build's
    /// rate, peak RSS and CPU against it. Machines here are shared: only runs interleaved like
    /// this compare two commits.
    #[arg(long)]
    against: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 10)]
    latency_seconds: usize,
    // --- child mode ---
    #[arg(long)]
    child: Option<String>,
    #[arg(long, default_value = "")]
    bootstrap: String,
    #[arg(long, default_value = "")]
    topic: String,
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    #[arg(long, default_value_t = 0)]
    expect: usize,
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    #[arg(long, default_value_t = 0)]
    sleep_us: u64,
    #[arg(long, default_value_t = 1000)]
    max_in_flight: usize,
    #[arg(long)]
    hot_key: Option<u32>,
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
    /// Stop this many seconds after the first message (0: no cap but `max_seconds`).
    #[arg(long, default_value_t = 0)]
    cap_seconds: u64,
    /// Track per-partition processing gaps (a little work per message; backlog scenarios).
    #[arg(long)]
    gaps: bool,
    #[arg(long)]
    latency: bool,
    /// cargo passes --bench to benchmark executables.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What one side reports for one run.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
struct RunResult {
    side: String,
    scenario: String,
    messages: u64,
    /// First message processed → last commit done.
    seconds: f64,
    msgs_per_sec: f64,
    /// Start → first message (group join, fetch start); excluded from `seconds`.
    join_seconds: f64,
    /// Skew: first message → every message of the non-hot keys done.
    nonhot_seconds: Option<f64>,
    peak_rss_mib: f64,
    end_rss_mib: f64,
    order_violations: u64,
    /// Whether every expected message was processed (skew stops once the non-hot keys are done,
    /// backlog at its time cap); `lost` is counted only then.
    complete: bool,
    lost: u64,
    duplicated: u64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    p999_ms: Option<f64>,
    /// Processed when the run stopped (all expected, or the time cap), before shutdown.
    stop_messages: u64,
    /// First message → the run stopped: the rate of capped runs, without the shutdown drain.
    stop_seconds: f64,
    /// User + system CPU seconds of the whole child (getrusage at its end).
    cpu_seconds: f64,
    /// Of which before the first message (start, join, first fetch).
    cpu_seconds_before_first: f64,
    /// Partition pauses (keyflow's stats; always 0 for the baseline) and resumes.
    pauses: u64,
    resumes: u64,
    /// Processing gaps ≥ `GAP_MS` (only with `--gaps`): count, total and longest.
    gaps: u64,
    gap_seconds: f64,
    gap_max_ms: f64,
    /// The keyflow side's `memory_limit`, when it was applied.
    memory_limit: Option<u64>,
}

impl RunResult {
    /// The steady rate after the first message: to the last commit for complete runs, to the
    /// cap for capped ones (a capped run's shutdown drain is not steady state).
    fn rate(&self) -> f64 {
        if self.complete || self.stop_seconds <= 0.0 {
            self.msgs_per_sec
        } else {
            self.stop_messages as f64 / self.stop_seconds
        }
    }

    fn cpu_us_per_msg(&self) -> f64 {
        self.cpu_seconds * 1e6 / (self.messages.max(1) as f64)
    }
}

/// A partition that completes nothing for this long and then completes again had a gap.
const GAP_MS: u64 = 50;

/// User + system CPU seconds of this process, all threads.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[derive(Deserialize)]
struct Payload<'a> {
    id: usize,
    k: u32,
    seq: u32,
    ts: u64,
    #[allow(dead_code)]
    #[serde(borrow)]
    p: &'a str,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The per-message work and bookkeeping both sides share. Lock-free except latency samples.
struct Check {
    counts: Vec<AtomicU8>,
    last_seq: Vec<AtomicU32>,
    violations: AtomicU64,
    processed: AtomicU64,
    first: OnceLock<Instant>,
    hot_key: Option<u32>,
    nonhot_expected: u64,
    nonhot_done: AtomicU64,
    nonhot_done_at: OnceLock<Instant>,
    latencies_us: Option<Mutex<Vec<u32>>>,
    cpu_at_first: OnceLock<f64>,
    /// Per partition, µs since `epoch` + 1 of its last completion (0: none yet); empty unless
    /// gaps are tracked.
    last_done_us: Vec<AtomicU64>,
    epoch: Instant,
    gaps: AtomicU64,
    gap_total_us: AtomicU64,
    gap_max_us: AtomicU64,
    /// Set when the run stops: (processed then, when).
    stopped: OnceLock<(u64, Instant)>,
}

impl Check {
    fn new(
        expect: usize,
        keys: usize,
        hot_key: Option<u32>,
        nonhot_expected: u64,
        latency: bool,
        gap_partitions: usize,
    ) -> Self {
        Check {
            counts: (0..expect).map(|_| AtomicU8::new(0)).collect(),
            last_seq: (0..keys).map(|_| AtomicU32::new(0)).collect(),
            violations: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            first: OnceLock::new(),
            hot_key,
            nonhot_expected,
            nonhot_done: AtomicU64::new(0),
            nonhot_done_at: OnceLock::new(),
            latencies_us: latency.then(|| Mutex::new(Vec::with_capacity(expect))),
            cpu_at_first: OnceLock::new(),
            last_done_us: (0..gap_partitions).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            gaps: AtomicU64::new(0),
            gap_total_us: AtomicU64::new(0),
            gap_max_us: AtomicU64::new(0),
            stopped: OnceLock::new(),
        }
    }

    fn record(&self, partition: i32, payload: Option<&[u8]>) -> Result<(), String> {
        self.first.get_or_init(|| {
            let _ = self.cpu_at_first.set(cpu_seconds());
            Instant::now()
        });
        if let Some(last) = self.last_done_us.get(partition as usize) {
            let now = self.epoch.elapsed().as_micros() as u64 + 1;
            let prev = last.swap(now, Relaxed);
            let gap = now.saturating_sub(prev);
            if prev != 0 && gap >= GAP_MS * 1000 {
                self.gaps.fetch_add(1, Relaxed);
                self.gap_total_us.fetch_add(gap, Relaxed);
                self.gap_max_us.fetch_max(gap, Relaxed);
            }
        }
        let p: Payload =
            serde_json::from_slice(payload.unwrap_or_default()).map_err(|e| e.to_string())?;
        if let Some(c) = self.counts.get(p.id) {
            c.fetch_add(1, Relaxed);
        }
        if let Some(last) = self.last_seq.get(p.k as usize) {
            if last.fetch_max(p.seq, Relaxed) >= p.seq {
                self.violations.fetch_add(1, Relaxed);
            }
        }
        if let Some(l) = &self.latencies_us {
            let us = now_us().saturating_sub(p.ts).min(u32::MAX as u64) as u32;
            l.lock().unwrap().push(us);
        }
        if self.hot_key.is_some_and(|h| h != p.k)
            && self.nonhot_done.fetch_add(1, Relaxed) + 1 == self.nonhot_expected
        {
            let _ = self.nonhot_done_at.set(Instant::now());
        }
        self.processed.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Whether the run should stop: everything done, the cap after the first message passed, or
    /// `max_seconds` after start. Records the moment and count of the stop.
    fn should_stop(&self, a: &Args, start: Instant) -> bool {
        let now = Instant::now();
        let capped = a.cap_seconds > 0
            && self
                .first
                .get()
                .is_some_and(|f| now.duration_since(*f) >= Duration::from_secs(a.cap_seconds));
        let stop = self.done(a.expect as u64)
            || capped
            || now.duration_since(start) >= Duration::from_secs(a.max_seconds);
        if stop {
            let _ = self.stopped.set((self.processed.load(Relaxed), now));
        }
        stop
    }

    fn finish(&self, side: &str, scenario: &str, start: Instant, committed: Instant) -> RunResult {
        let cpu = cpu_seconds();
        let first = *self.first.get().unwrap_or(&committed);
        let (stop_messages, stopped_at) = *self
            .stopped
            .get()
            .unwrap_or(&(self.processed.load(Relaxed), committed));
        let seconds = committed.duration_since(first).as_secs_f64();
        let messages = self.processed.load(Relaxed);
        let (mut lost, mut duplicated) = (0, 0);
        for c in &self.counts {
            match c.load(Relaxed) {
                0 => lost += 1,
                n => duplicated += (n - 1) as u64,
            }
        }
        let complete = messages >= self.counts.len() as u64;
        if !complete {
            lost = 0;
        }
        let pct = |v: &[u32], q: f64| {
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .map(|us| *us as f64 / 1000.0)
        };
        let (mut p50, mut p99, mut p999) = (None, None, None);
        if let Some(l) = &self.latencies_us {
            let mut v = l.lock().unwrap().clone();
            v.sort_unstable();
            (p50, p99, p999) = (pct(&v, 0.5), pct(&v, 0.99), pct(&v, 0.999));
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |field: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        RunResult {
            side: side.into(),
            scenario: scenario.into(),
            messages,
            seconds,
            msgs_per_sec: messages as f64 / seconds.max(1e-9),
            join_seconds: first.duration_since(start).as_secs_f64(),
            nonhot_seconds: self
                .nonhot_done_at
                .get()
                .map(|t| t.duration_since(first).as_secs_f64()),
            peak_rss_mib: kib("VmHWM:") / 1024.0,
            end_rss_mib: kib("VmRSS:") / 1024.0,
            order_violations: self.violations.load(Relaxed),
            complete,
            lost,
            duplicated,
            p50_ms: p50,
            p99_ms: p99,
            p999_ms: p999,
            stop_messages,
            stop_seconds: stopped_at.saturating_duration_since(first).as_secs_f64(),
            cpu_seconds: cpu,
            cpu_seconds_before_first: *self.cpu_at_first.get().unwrap_or(&cpu),
            pauses: 0,
            resumes: 0,
            gaps: self.gaps.load(Relaxed),
            gap_seconds: self.gap_total_us.load(Relaxed) as f64 / 1e6,
            gap_max_ms: self.gap_max_us.load(Relaxed) as f64 / 1e3,
            memory_limit: None,
        }
    }

    /// Done when every expected message (or, for skew, every non-hot one) was processed.
    fn done(&self, expect: u64) -> bool {
        match self.hot_key {
            Some(_) => self.nonhot_done.load(Relaxed) >= self.nonhot_expected,
            None => self.processed.load(Relaxed) >= expect,
        }
    }
}

struct BenchProcessor {
    check: Arc<Check>,
    sleep: Option<Duration>,
}

#[async_trait]
impl Processor for BenchProcessor {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        if let Some(d) = self.sleep {
            tokio::time::sleep(d).await;
        }
        self.check
            .record(msg.partition, msg.payload.as_deref())
            .map_err(|e| ProcessError::permanent("decode", e))?;
        Ok(Flow::Continue)
    }
}

fn child_check(a: &Args) -> Arc<Check> {
    // For skew the parent passes the number of non-hot messages through `keys`' companion:
    // every message of the hot key is `expect × 0.3` (see `produce_scenario`).
    let nonhot = a
        .hot_key
        .map(|_| (a.expect - hot_count(a.expect)) as u64)
        .unwrap_or(0);
    let gap_partitions = if a.gaps {
        a.partitions.max(0) as usize
    } else {
        0
    };
    Arc::new(Check::new(
        a.expect,
        a.keys,
        a.hot_key,
        nonhot,
        a.latency,
        gap_partitions,
    ))
}

fn hot_count(expect: usize) -> usize {
    expect * 3 / 10
}

async fn run_keyflow(a: &Args) -> RunResult {
    let check = child_check(a);
    let sleep = (a.sleep_us > 0).then(|| Duration::from_micros(a.sleep_us));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"bench\"\ntopic = \"{}\"\ngroup_id = \"{}\"\nauto_offset_reset = \"earliest\"\nordering = \"key\"\nmax_in_flight = {}\nsession_timeout = \"6s\"\ndrain_timeout = \"5s\"\n{}\n[[processors]]\ntype = \"custom\"\nname = \"bench\"\n",
            a.topic,
            support::unique("bench-kf"),
            a.max_in_flight,
            std::env::var("KEYFLOW_BENCH_EXTRA").unwrap_or_default().replace(';', "\n"),
        ),
    )
    .unwrap();
    let mut global = Global {
        brokers: a.bootstrap.clone(),
        ..Global::default()
    };
    let memory_limit = a
        .memory_limit
        .filter(|&bytes| apply_memory_limit(&mut global, bytes));
    let spec =
        config::load_pipeline(&path, &global, &Env::default()).unwrap_or_else(|e| panic!("{e}"));
    let cfg = config::Config {
        global,
        pipelines: vec![spec],
    };
    let start = Instant::now();
    let running = Runtime::new(cfg)
        .with_processor(
            "bench",
            Arc::new(BenchProcessor {
                check: check.clone(),
                sleep,
            }),
        )
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    while stats.snapshot().partitions.len() < a.partitions as usize {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("READY");
    while !check.should_stop(a, start) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let snap = stats.snapshot();
    eprintln!(
        "   keyflow: in-flight high water per partition {:?}, pauses {}",
        snap.partitions
            .iter()
            .map(|p| p.in_flight_high_water)
            .collect::<Vec<_>>(),
        snap.partitions.iter().map(|p| p.pauses).sum::<u64>()
    );
    running.shutdown().await;
    RunResult {
        pauses: snap.partitions.iter().map(|p| p.pauses).sum(),
        resumes: snap.partitions.iter().map(|p| p.resumes).sum(),
        memory_limit,
        ..check.finish("keyflow", &a.scenario, start, Instant::now())
    }
}

/// Sets keyflow's process-wide memory budget (`memory_limit`) to `bytes`.
fn apply_memory_limit(global: &mut Global, bytes: u64) -> bool {
    global.memory_limit = Some(bytes);
    true
}

fn baseline_config(a: &Args) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &a.bootstrap)
        .set("group.id", support::unique("bench-base"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    c
}

fn all_partitions(a: &Args) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for p in 0..a.partitions {
        tpl.add_partition_offset(&a.topic, p, Offset::Beginning)
            .unwrap();
    }
    tpl
}

/// The classic loop: poll, process, store the offset, commit at the end. No actors.
fn run_baseline_loop(a: &Args) -> RunResult {
    let check = child_check(a);
    let consumer: BaseConsumer = baseline_config(a).create().unwrap();
    let start = Instant::now();
    consumer.assign(&all_partitions(a)).unwrap();
    println!("READY");
    while !check.should_stop(a, start) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                use rdkafka::Message as _;
                check.record(m.partition(), m.payload()).unwrap();
                consumer.store_offset_from_message(&m).unwrap();
            }
            Some(Err(e)) => eprintln!("baseline: {e}"),
            None => {}
        }
    }
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    check.finish("baseline", &a.scenario, start, Instant::now())
}

/// One task per partition (keeps per-partition order), each awaiting the downstream call.
async fn run_baseline_tasks(a: &Args) -> RunResult {
    let check = child_check(a);
    let consumer: Arc<StreamConsumer> = Arc::new(baseline_config(a).create().unwrap());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..a.partitions {
        let q = consumer.split_partition_queue(&a.topic, p).unwrap();
        let (c, check, sleep) = (
            consumer.clone(),
            check.clone(),
            Duration::from_micros(a.sleep_us),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let m = match q.recv().await {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("baseline: {e}");
                        continue;
                    }
                };
                if !sleep.is_zero() {
                    tokio::time::sleep(sleep).await;
                }
                use rdkafka::Message as _;
                check.record(m.partition(), m.payload()).unwrap();
                c.store_offset_from_message(&m).unwrap();
            }
        }));
    }
    consumer.assign(&all_partitions(a)).unwrap();
    let main = {
        let c = consumer.clone();
        tokio::spawn(async move {
            loop {
                let _ = c.recv().await;
            }
        })
    };
    println!("READY");
    while !check.should_stop(a, start) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for t in &tasks {
        t.abort();
    }
    main.abort();
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    check.finish("baseline", &a.scenario, start, Instant::now())
}

fn child(a: Args) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let side = a.child.clone().unwrap();
    let r = match (side.as_str(), a.sleep_us > 0) {
        ("keyflow", _) => rt.block_on(run_keyflow(&a)),
        ("baseline", false) => run_baseline_loop(&a),
        ("baseline", true) => rt.block_on(run_baseline_tasks(&a)),
        (other, _) => panic!("unknown side {other}"),
    };
    println!("{}", serde_json::to_string(&r).unwrap());
    std::io::stdout().flush().unwrap();
}

// ----------------------------------------------------------------------------------------------
// Parent

struct Scenario {
    name: &'static str,
    messages: usize,
    partitions: i32,
    keys: usize,
    sleep_us: u64,
    max_in_flight: usize,
    hot: bool,
    latency: bool,
    max_seconds: u64,
    /// Stop this long after the first message (0: run to the end).
    cap_seconds: u64,
    /// Size of every value in bytes (0: ~100 bytes, the fields plus 40 bytes of padding).
    value_bytes: usize,
    /// Track processing gaps (see `GAP_MS`).
    gaps: bool,
}

impl Scenario {
    /// The defaults of the 12-partition scenarios; each scenario states what differs.
    const BASE: Scenario = Scenario {
        name: "",
        messages: 0,
        partitions: 12,
        keys: 10_000,
        sleep_us: 0,
        max_in_flight: 1000,
        hot: false,
        latency: false,
        max_seconds: 600,
        cap_seconds: 0,
        value_bytes: 0,
        gaps: false,
    };
}

/// The JSON value both sides parse: `value_bytes` long (padded), or the fields plus 40 bytes
/// of padding (~100 bytes) when 0.
fn payload(id: usize, k: u32, seq: u32, ts: u64, value_bytes: usize) -> Vec<u8> {
    let head = format!(r#"{{"id":{id},"k":{k},"seq":{seq},"ts":{ts},"p":""#);
    let pad = match value_bytes {
        0 => 40,
        n => n.saturating_sub(head.len() + 2),
    };
    let mut v = Vec::with_capacity(head.len() + pad + 2);
    v.extend_from_slice(head.as_bytes());
    v.resize(v.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

/// Messages of a scenario: keys round-robin (or 30% on key 0 for skew), per-key sequences.
fn messages(s: &Scenario) -> impl Iterator<Item = support::OutMsg> + '_ {
    let mut seq = vec![0u32; s.keys];
    let hot_every = if s.hot { 10 } else { 0 };
    (0..s.messages).map(move |id| {
        let k = if hot_every > 0 && id % hot_every < 3 {
            0
        } else {
            1 + (id * 7919) % (s.keys - 1)
        } as u32;
        seq[k as usize] += 1;
        support::OutMsg {
            key: Some(format!("k{k}").into_bytes()),
            payload: payload(id, k, seq[k as usize], now_us(), s.value_bytes),
            ..Default::default()
        }
    })
}

/// Starts one side's child: `against` is the keyflow side of the build `exe` names (older
/// builds know only the arguments they had: the ones left at their default are not passed).
fn spawn_child(
    side: &str,
    exe: &std::path::Path,
    s: &Scenario,
    bootstrap: &str,
    topic: &str,
    memory_limit: Option<u64>,
) -> std::process::Child {
    let side = if side == "against" { "keyflow" } else { side };
    // KEYFLOW_BENCH_WRAP="valgrind --tool=massif" profiles the keyflow side.
    let mut cmd = match std::env::var("KEYFLOW_BENCH_WRAP")
        .ok()
        .filter(|_| side == "keyflow")
    {
        Some(w) => {
            let mut parts = w.split_whitespace();
            let mut c = Command::new(parts.next().unwrap());
            c.args(parts).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.args([
        "--child",
        side,
        "--scenario",
        s.name,
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
    ])
    .args([
        "--partitions",
        &s.partitions.to_string(),
        "--expect",
        &s.messages.to_string(),
        "--keys",
        &s.keys.to_string(),
    ])
    .args([
        "--sleep-us",
        &s.sleep_us.to_string(),
        "--max-in-flight",
        &s.max_in_flight.to_string(),
    ])
    .args(["--max-seconds", &s.max_seconds.to_string()]);
    if s.cap_seconds > 0 {
        cmd.args(["--cap-seconds", &s.cap_seconds.to_string()]);
    }
    if let Some(limit) = memory_limit.filter(|_| side == "keyflow") {
        cmd.args(["--memory-limit", &limit.to_string()]);
    }
    if s.gaps {
        cmd.arg("--gaps");
    }
    if s.hot {
        cmd.args(["--hot-key", "0"]);
    }
    if s.latency {
        cmd.arg("--latency");
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn read_result(child: std::process::Child, on_ready: impl FnOnce()) -> RunResult {
    let mut child = child;
    let stdout = child.stdout.take().unwrap();
    let mut on_ready = Some(on_ready);
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line == "READY" {
            if let Some(f) = on_ready.take() {
                f();
            }
        } else if line.starts_with('{') {
            result = Some(serde_json::from_str(&line).unwrap());
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "bench child failed: {status:?}");
    result.expect("bench child printed no result")
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let a = Args::parse();
    if a.child.is_some() {
        return child(a);
    }
    let k = if a.smoke { 100 } else { 1 };
    let scenarios = [
        Scenario {
            name: "cpu",
            messages: a.cpu_messages.unwrap_or(1_000_000 / k),
            keys: 10_000 / k,
            ..Scenario::BASE
        },
        // Issue 10: 2,000,000 preloaded ~90-byte messages, 1,000 keys, no sleep, on 8 and on 64
        // partitions (the 64/8 peak-RSS ratio is printed after the table).
        Scenario {
            name: "cpu8",
            messages: a.cpu_n_messages.unwrap_or(2_000_000 / k),
            partitions: 8,
            keys: 1000,
            value_bytes: 90,
            ..Scenario::BASE
        },
        Scenario {
            name: "cpu64",
            messages: a.cpu_n_messages.unwrap_or(2_000_000 / k),
            partitions: 64,
            keys: 1000,
            value_bytes: 90,
            ..Scenario::BASE
        },
        Scenario {
            name: "io",
            messages: a.io_messages.unwrap_or(200_000 / k),
            keys: 10_000 / k,
            sleep_us: 2000,
            ..Scenario::BASE
        },
        Scenario {
            name: "skew",
            messages: a.io_messages.unwrap_or(200_000 / k),
            keys: 10_000 / k,
            sleep_us: 2000,
            hot: true,
            ..Scenario::BASE
        },
        Scenario {
            name: "backlog",
            messages: a.backlog_messages.unwrap_or(2_000_000 / k),
            keys: 10_000 / k,
            sleep_us: 1000,
            max_seconds: if a.smoke { 60 } else { 120 },
            ..Scenario::BASE
        },
        // Issue 10: a 1 GiB preloaded backlog (1,048,576 values of 1 KiB) on 32 partitions, a
        // 5 ms processor, max_in_flight 1000; stopped 60 s after the first message.
        Scenario {
            name: "backlog1g",
            messages: a.backlog1g_messages.unwrap_or(1_048_576 / k),
            partitions: 32,
            keys: 1000,
            sleep_us: 5000,
            max_seconds: 600,
            cap_seconds: 60,
            value_bytes: 1024,
            gaps: true,
            ..Scenario::BASE
        },
        Scenario {
            name: "latency",
            messages: a.latency_rate * a.latency_seconds / k,
            keys: 10_000 / k,
            latency: true,
            max_seconds: 120,
            ..Scenario::BASE
        },
    ];
    let runs = if a.smoke { 1 } else { a.runs };
    let sides: Vec<&str> = ["keyflow", "against", "baseline"]
        .into_iter()
        .filter(|s| match *s {
            "against" => a.against.is_some(),
            s => a.sides.split(',').any(|n| n == s),
        })
        .collect();
    let broker = support::Broker::start();
    let out_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut table = Vec::new();
    for s in scenarios
        .iter()
        .filter(|s| a.scenario == "all" || a.scenario.split(',').any(|n| n == s.name))
    {
        eprintln!(
            "== {} ({} messages, {} partitions, {} keys)",
            s.name, s.messages, s.partitions, s.keys
        );
        let loaded = (!s.latency).then(|| {
            let topic = support::unique(&format!("bench-{}", s.name));
            broker.create_topic_blocking(&topic, s.partitions);
            let t = Instant::now();
            broker.produce_in_batches_of(a.preload_batch_bytes, &topic, messages(s));
            eprintln!(
                "   loaded in {:.1} s (producer batches of at most {} bytes)",
                t.elapsed().as_secs_f64(),
                a.preload_batch_bytes
            );
            topic
        });
        let mut results: Vec<RunResult> = Vec::new();
        for run in 1..=runs {
            for &side in &sides {
                let topic = loaded.clone().unwrap_or_else(|| {
                    let t = support::unique("bench-latency");
                    broker.create_topic_blocking(&t, s.partitions);
                    t
                });
                let exe = match side {
                    "against" => a.against.clone().unwrap(),
                    _ => std::env::current_exe().unwrap(),
                };
                let child = spawn_child(side, &exe, s, &broker.bootstrap, &topic, a.memory_limit);
                let r = if s.latency {
                    // Produce at a fixed rate once the consumer is ready.
                    let (b, t, rate, n) = (&broker, topic.clone(), a.latency_rate / k, s.messages);
                    std::thread::scope(|scope| {
                        let mut producer = None;
                        let r = read_result(child, || {
                            producer =
                                Some(scope.spawn(move || produce_at_rate(b, &t, s, rate, n)));
                        });
                        if let Some(p) = producer.take() {
                            p.join().unwrap();
                        }
                        r
                    })
                } else {
                    read_result(child, || {})
                };
                let r = RunResult {
                    side: side.to_string(),
                    ..r
                };
                eprintln!(
                    "   run {run} {side:8} {:>9} msgs {:>7.2} s {:>10.0} msg/s{} join {:.1} s peak {:.0} MiB cpu {:.2} s ({:.2} µs/msg, {:.2} s before the first) pauses {} resumes {}{} viol {} lost {} dup {}{}",
                    r.messages, r.seconds, r.msgs_per_sec,
                    if r.complete { String::new() } else { format!(" (capped: {} msgs in {:.1} s = {:.0} msg/s)", r.stop_messages, r.stop_seconds, r.rate()) },
                    r.join_seconds, r.peak_rss_mib, r.cpu_seconds, r.cpu_us_per_msg(), r.cpu_seconds_before_first,
                    r.pauses, r.resumes,
                    if s.gaps { format!(" gaps≥{GAP_MS}ms {} ({:.2} s, max {:.0} ms)", r.gaps, r.gap_seconds, r.gap_max_ms) } else { String::new() },
                    r.order_violations, r.lost, r.duplicated,
                    r.p99_ms.map(|p| format!(" p99 {p:.1} ms")).unwrap_or_default()
                );
                results.push(r);
            }
        }
        std::fs::write(
            out_dir.join(format!("{}.json", s.name)),
            serde_json::to_string_pretty(&results).unwrap(),
        )
        .unwrap();
        table.push((s.name, results));
    }
    print_table(&table);
}

fn produce_at_rate(broker: &support::Broker, topic: &str, s: &Scenario, rate: usize, n: usize) {
    let start = Instant::now();
    let batch = (rate / 100).max(1);
    let mut it = messages(s);
    let mut sent = 0;
    while sent < n {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as usize).min(n);
        if due > sent {
            let chunk: Vec<support::OutMsg> = it
                .by_ref()
                .take((due - sent).min(batch))
                .map(|mut m| {
                    // Stamp the send time, not the generation time.
                    let p: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    m.payload = payload(
                        p["id"].as_u64().unwrap() as usize,
                        p["k"].as_u64().unwrap() as u32,
                        p["seq"].as_u64().unwrap() as u32,
                        now_us(),
                        s.value_bytes,
                    );
                    m
                })
                .collect();
            sent += chunk.len();
            broker.produce(topic, chunk);
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn print_table(table: &[(&str, Vec<RunResult>)]) {
    println!(
        "\n{:<9} {:<9} {:>11} {:>15} {:>8} {:>7} {:>7} {:>7} {:>7} {:>12} {:>5} {:>4} {:>4} {:>7} {:>7}",
        "scenario",
        "side",
        "msg/s (med)",
        "spread",
        "peak MiB",
        "end MiB",
        "cpu s",
        "µs/msg",
        "pauses",
        "gaps (s)",
        "viol",
        "lost",
        "dup",
        "p99 ms",
        "nonhot"
    );
    let mut peaks = std::collections::HashMap::new();
    for (name, results) in table {
        let mut med = std::collections::HashMap::new();
        for side in ["keyflow", "against", "baseline"] {
            let rs: Vec<&RunResult> = results.iter().filter(|r| r.side == side).collect();
            if rs.is_empty() {
                continue;
            }
            let of = |f: &dyn Fn(&RunResult) -> f64| median(rs.iter().map(|r| f(r)).collect());
            let (m, lo, hi) = of(&|r| r.rate());
            let (peak, _, _) = of(&|r| r.peak_rss_mib);
            let (end, _, _) = of(&|r| r.end_rss_mib);
            let (cpu, _, _) = of(&|r| r.cpu_seconds);
            let (us, _, _) = of(&|r| r.cpu_us_per_msg());
            let (pauses, _, _) = of(&|r| r.pauses as f64);
            let (gaps, _, _) = of(&|r| r.gaps as f64);
            let (gap_s, _, _) = of(&|r| r.gap_seconds);
            let p99 = rs.iter().filter_map(|r| r.p99_ms).collect::<Vec<_>>();
            let nh = rs
                .iter()
                .filter_map(|r| r.nonhot_seconds)
                .collect::<Vec<_>>();
            let opt = |v: Vec<f64>| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.2}", median(v).0)
                }
            };
            println!(
                "{:<9} {:<9} {:>11.0} {:>15} {:>8.0} {:>7.0} {:>7.2} {:>7.2} {:>7.0} {:>12} {:>5} {:>4} {:>4} {:>7} {:>7}",
                name,
                side,
                m,
                format!("{lo:.0}–{hi:.0}"),
                peak,
                end,
                cpu,
                us,
                pauses,
                format!("{gaps:.0} ({gap_s:.1})"),
                rs.iter().map(|r| r.order_violations).sum::<u64>(),
                rs.iter().map(|r| r.lost).sum::<u64>(),
                rs.iter().map(|r| r.duplicated).sum::<u64>(),
                opt(p99),
                opt(nh),
            );
            med.insert(side, (m, peak, us));
            peaks.insert((*name, side), peak);
        }
        for other in ["baseline", "against"] {
            if let (Some(k), Some(b)) = (med.get("keyflow"), med.get(other)) {
                println!(
                    "{:<9} ratio     keyflow/{other}: msg/s {:.2}×, peak RSS {:.2}×, CPU s/msg {:.2}×",
                    name,
                    k.0 / b.0,
                    k.1 / b.1,
                    k.2 / b.2
                );
            }
        }
    }
    for side in ["keyflow", "baseline"] {
        if let (Some(p64), Some(p8)) = (peaks.get(&("cpu64", side)), peaks.get(&("cpu8", side))) {
            println!(
                "{side}: peak RSS on 64 partitions / on 8 partitions {:.2}× ({p64:.0} / {p8:.0} MiB)",
                p64 / p8
            );
        }
    }
}
