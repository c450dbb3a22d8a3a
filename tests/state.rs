//! Per-key state against a real Apache Kafka (issue 12 item 1).
//!
//! A custom harness (`harness = false`): the members of the stateful pipeline are this test
//! binary started again as a child process (`STATE_CHILD=1`), running the shipped example's
//! processor (examples/account_balance.rs) — a real process that `kill -9` can kill. Run one
//! test with `cargo test --release --test state <name>`.

#[path = "../examples/account_balance.rs"]
#[allow(dead_code)]
mod account_balance;
mod support;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use account_balance::{apply, Account};
use support::{pipeline_header, unique, wait_until, Broker, Keyflow};

const ACCOUNTS: usize = 1_000;
const EVENTS: usize = 100_000;
const PARTITIONS: i32 = 8;

/// A member running the example's processor: this binary in child mode.
struct Member {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Member {
    fn start(bootstrap: &str, pipeline: &str, instance: &str, rejections: &str) -> Member {
        let dir = support::temp_dir("state-member-");
        let path = dir.path().join("account-balance.toml");
        std::fs::write(&path, pipeline).unwrap();
        let log = dir.path().join("member.log");
        let out = File::create(&log).unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.arg(&path)
            .env("STATE_CHILD", "1")
            .env("KEYFLOW_BROKERS", bootstrap)
            .env("KEYFLOW_INSTANCE_ID", instance)
            .env("KEYFLOW_HTTP__ADDRESS", "127.0.0.1:0")
            .env("ACCOUNT_REJECTIONS_TOPIC", rejections)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = support::spawn_tied(cmd).unwrap();
        Member {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Keys in the spill file after each "state: partition restored" line so far.
    fn spilled_at_restore(&self) -> Vec<u64> {
        self.log()
            .lines()
            .filter(|l| l.contains("state: partition restored"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("spilled_keys="))?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// (keys, records, seconds) of every "state: partition restored" line so far.
    fn restores(&self) -> Vec<(u64, u64, f64)> {
        self.log()
            .lines()
            .filter(|l| l.contains("state: partition restored"))
            .filter_map(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .map(str::to_string)
                };
                let keys = field("keys=")?.parse().ok()?;
                let records = field("records=")?.parse().ok()?;
                Some((keys, records, parse_duration(&field("took=")?)?))
            })
            .collect()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `12.3ms`, `1.2s`, `850µs` (Debug of a Duration) → seconds.
fn parse_duration(s: &str) -> Option<f64> {
    for (unit, scale) in [("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0)] {
        if let Some(n) = s.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// The pipeline, its state held to `STATE_MEMORY` in memory: ~170 KiB of state (1,000
/// accounts) in 128 KiB, of which the spill file's page cache takes 64 KiB, so most accounts
/// live in the spill file and are read back from it (the on-disk store under kill -9 and a
/// rebalance).
const STATE_MEMORY: &str = "128KiB";

fn pipeline(topic: &str, group: &str, changelog: &str) -> String {
    format!(
        "name = \"account-balance\"\n{}\n[state]\nchangelog = \"{changelog}\"\nmemory = \"{STATE_MEMORY}\"\n\n[[processors]]\ntype = \"custom\"\nname = \"account-balance\"\n",
        pipeline_header(
            topic,
            group,
            "delivery = \"exactly_once\"\ntransaction_timeout = \"10s\"\nsession_timeout = \"6s\"\nmax_in_flight = 1000"
        )
        .replace("session_timeout = \"4s\"\n", "")
    )
}

/// The events: `(account, payload, kind, amount)`, deterministic.
fn events() -> Vec<(String, Vec<u8>, &'static str, i64)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    (0..EVENTS)
        .map(|i| {
            let account = format!("acc-{}", rng.random_range(0..ACCOUNTS));
            let kind = if rng.random_bool(0.55) {
                "deposit"
            } else {
                "withdraw"
            };
            let amount = rng.random_range(1..=100i64);
            let payload = format!("{{\"id\":\"e-{i}\",\"type\":\"{kind}\",\"amount\":{amount}}}")
                .into_bytes();
            (account, payload, kind, amount)
        })
        .collect()
}

fn produce(broker: &Broker, topic: &str, batch: &[(String, Vec<u8>, &'static str, i64)]) {
    broker.produce_keyed(
        topic,
        batch
            .iter()
            .map(|(a, p, _, _)| (Some(a.clone().into_bytes()), p.clone())),
    );
}

fn committed_total(broker: &Broker, group: &str, topic: &str) -> i64 {
    broker
        .committed_offsets(group, topic, PARTITIONS)
        .iter()
        .map(|o| (*o).max(0))
        .sum()
}

/// 100,000 deposit/withdraw events over 1,000 accounts on 8 partitions, exactly-once; member
/// A is killed with SIGKILL mid-stream and restarted, then member B joins (a rebalance moves
/// partitions and their state). Every account's last changelog value equals the fold of its
/// events, and the rejections are exactly the fold's.
fn balances_equal_the_fold_after_kill9_and_rebalance() {
    let broker = Broker::shared();
    let (topic, group) = (unique("acct-in"), unique("acct-g"));
    let (changelog, rejections) = (format!("{topic}.changelog"), format!("{topic}.rejected"));
    broker.create_topic_blocking(&topic, PARTITIONS);
    broker.create_topic_blocking(&format!("{topic}.dlq"), 1);
    broker.create_topic_blocking(&rejections, 1);
    let p = pipeline(&topic, &group, &changelog);
    let evs = events();
    let started = Instant::now();

    produce(broker, &topic, &evs[..40_000]);
    let mut a = Member::start(&broker.bootstrap, &p, "a", &rejections);
    wait_until(
        Duration::from_secs(90),
        Duration::from_millis(100),
        || committed_total(broker, &group, &topic) >= 15_000,
        "member a committed 15,000 events",
    );
    assert!(
        broker.topic_exists(&changelog),
        "the changelog topic was created"
    );
    a.kill9();
    let at_kill = committed_total(broker, &group, &topic);
    println!("kill -9 of member a at {at_kill} committed events");
    produce(broker, &topic, &evs[40_000..70_000]);
    let a = Member::start(&broker.bootstrap, &p, "a", &rejections);
    wait_until(
        Duration::from_secs(90),
        Duration::from_millis(100),
        || committed_total(broker, &group, &topic) >= at_kill + 10_000,
        "the restarted member a makes progress",
    );
    let b = Member::start(&broker.bootstrap, &p, "b", &rejections);
    produce(broker, &topic, &evs[70_000..]);
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || !b.restores().is_empty(),
        "member b restored the partitions it was given",
    );
    wait_until(
        Duration::from_secs(120),
        Duration::from_millis(250),
        || committed_total(broker, &group, &topic) >= EVENTS as i64,
        "every event committed",
    );
    let took = started.elapsed();

    // The fold, per account in produce order (one partition per account keeps it).
    let mut expected: HashMap<String, Account> = HashMap::new();
    let mut rejected = 0usize;
    for (acct, _, kind, amount) in &evs {
        let s = expected.entry(acct.clone()).or_default();
        match apply(s, kind, *amount) {
            Ok(next) => *s = next,
            Err(_) => rejected += 1,
        }
    }
    // The last committed changelog value per key.
    let total_records: i64 = broker.high_watermarks(&changelog).iter().sum();
    let records = broker.consume_all_isolated(
        &changelog,
        1,
        Duration::from_secs(60),
        Duration::from_secs(2),
        "read_committed",
    );
    let mut actual: HashMap<String, Account> = HashMap::new();
    for r in &records {
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        actual.insert(key, serde_json::from_slice(&r.payload).unwrap());
    }
    let mut wrong = Vec::new();
    for (acct, want) in &expected {
        if actual.get(acct) != Some(want) {
            wrong.push(format!("{acct}: want {want:?}, got {:?}", actual.get(acct)));
        }
    }
    assert!(
        wrong.is_empty() && actual.len() == expected.len(),
        "{} of {} accounts differ from their fold ({} in the changelog); first: {:?}",
        wrong.len(),
        expected.len(),
        actual.len(),
        &wrong[..wrong.len().min(5)]
    );
    let rejections_read = broker.consume_all_isolated(
        &rejections,
        rejected,
        Duration::from_secs(60),
        Duration::from_secs(2),
        "read_committed",
    );
    assert_eq!(
        rejections_read.len(),
        rejected,
        "exactly one rejection per overdrawing withdrawal"
    );
    for l in a.log().lines().chain(b.log().lines()) {
        if l.contains("state: partition restored") || l.contains("state: changelog read") {
            println!("{}", l.rsplit("state: ").next().unwrap_or(l));
        }
    }
    let restores: Vec<(u64, u64, f64)> = a.restores().into_iter().chain(b.restores()).collect();
    let (keys, records, secs) = restores
        .iter()
        .fold((0u64, 0u64, 0f64), |(k, r, s), (k2, r2, s2)| {
            (k + k2, r + r2, s + s2)
        });
    assert!(
        keys > 0,
        "the restarted members restored state: {restores:?}"
    );
    let spilled: Vec<u64> = a
        .spilled_at_restore()
        .into_iter()
        .chain(b.spilled_at_restore())
        .collect();
    assert!(
        spilled.iter().any(|&n| n > 0),
        "with {STATE_MEMORY} of state memory, restores spilled to disk: {spilled:?}"
    );
    println!(
        "keys in the spill file after each restore ({STATE_MEMORY} of state memory): {spilled:?}"
    );
    println!(
        "{EVENTS} events, {ACCOUNTS} accounts, {PARTITIONS} partitions: all balances equal their fold; \
         {rejected} rejections; {total_records} changelog records (uncompacted); in {took:?}"
    );
    println!(
        "restore: {} partition restores, {keys} keys from {records} changelog records in {secs:.3} s \
         = {:.3} s per 100k records read ({:.3} s per partition restore)",
        restores.len(),
        secs / records.max(1) as f64 * 100_000.0,
        secs / restores.len() as f64
    );
    drop((a, b));
}

/// `dedup` in a pipeline with `[state]`: a business id completed before a kill -9 is still
/// recognised when it is delivered again after the restart (the window was restored from the
/// changelog). The keyflow binary itself (dedup is built in).
fn dedup_recognises_a_redelivery_after_kill9() {
    let broker = Broker::shared();
    let (topic, group, out) = (unique("dds-in"), unique("dds-g"), unique("dds-out"));
    broker.create_topic_blocking(&topic, 2);
    broker.create_topic_blocking(&format!("{topic}.dlq"), 1);
    broker.create_topic_blocking(&out, 1);
    let state = std::env::var("STATE_TEST_WITHOUT_STATE").map_or("[state]\n", |_| "");
    let p = format!(
        "{}\n{state}\n[[processors]]\ntype = \"dedup\"\nfield = \"id\"\nttl = \"1h\"\n\n[[processors]]\ntype = \"forward\"\ntopic = \"{out}\"\n",
        pipeline_header(&topic, &group, "delivery = \"exactly_once\"\ntransaction_timeout = \"10s\"")
    );
    let env = [("KEYFLOW_INSTANCE_ID", "dd-a")];
    let msg = |id: &str| {
        (
            Some(b"order-1".to_vec()),
            format!("{{\"id\":\"{id}\"}}").into_bytes(),
        )
    };
    let first = broker.produce_keyed(&topic, [msg("biz-1")]);
    let (&part, &next) = first.next_offsets.iter().next().unwrap();
    let mut k = Keyflow::start_many(&broker.bootstrap, &[&p], &env);
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || broker.committed_offsets(&group, &topic, 2)[part as usize] >= next,
        "the first delivery committed",
    );
    k.kill9();
    // The redelivery (same business id), then a new id to see the restarted member work.
    broker.produce_keyed(&topic, [msg("biz-1"), msg("biz-2")]);
    let k = Keyflow::start_many(&broker.bootstrap, &[&p], &env);
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || broker.committed_offsets(&group, &topic, 2)[part as usize] >= next + 2,
        "the redelivery and the new id committed",
    );
    let written = broker.consume_all_isolated(
        &out,
        2,
        Duration::from_secs(30),
        Duration::from_secs(2),
        "read_committed",
    );
    let ids: Vec<String> = written
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(
        ids,
        vec!["{\"id\":\"biz-1\"}", "{\"id\":\"biz-2\"}"],
        "biz-1 forwarded once, before the kill; its redelivery recognised after it.\n{}",
        k.log_tail(40)
    );
    println!("redelivery after kill -9 recognised: outputs {ids:?}");
}

/// Restore speed: 100,000 keys (one changelog record each, ~60-byte values) in one changelog
/// partition, restored in process through the library (`Store::open` creates the compacted
/// changelog, `Store::restore` reads it). Also refuses a changelog that is not co-partitioned.
fn restore_of_100k_keys_is_timed() {
    const KEYS: usize = 100_000;
    let broker = Broker::shared();
    let (topic, group) = (unique("rs-in"), unique("rs-g"));
    broker.create_topic_blocking(&topic, 2);
    let config = support::inline_config(
        &broker.bootstrap,
        &format!(
            "{}\n[state]\n[[processors]]\ntype = \"log\"\n",
            pipeline_header(&topic, &group, "")
        ),
    );
    let spec = config.pipelines[0].clone();
    let changelog = spec.state.clone().unwrap().changelog;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let producer = keyflow::kafka::client::create_producer(&broker.bootstrap, &spec).unwrap();
    let store = rt
        .block_on(keyflow::state::Store::open(
            &broker.bootstrap,
            &spec,
            producer.clone(),
            256 << 20,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        broker.partition_count(&changelog, Duration::from_secs(10)),
        2
    );
    broker.produce_to_partition(
        &changelog,
        (0..KEYS).map(|i| {
            (
                1,
                Some(format!("account-{i:06}").into_bytes()),
                format!(
                    "{{\"balance\":{i},\"events\":{},\"owner\":\"someone-{i:06}\"}}",
                    i % 97
                )
                .into_bytes(),
            )
        }),
    );
    let started = Instant::now();
    rt.block_on(store.restore(1)).unwrap();
    let took = started.elapsed();
    let in_memory = store.snapshot(1);
    assert_eq!(in_memory.len(), KEYS);
    assert_eq!(store.report()[1].keys, KEYS);
    let bytes = store.bytes();
    println!(
        "restore in memory: {KEYS} keys in {:.3} s (s per 100k keys); state {:.1} MiB ({} bytes per key as counted)",
        took.as_secs_f64() / KEYS as f64 * 100_000.0,
        bytes as f64 / (1 << 20) as f64,
        bytes / KEYS as i64
    );
    // The same changelog with 4 MiB of state memory (the state takes ~20 MiB): the restore
    // spills to disk as it reads, memory stays within the cap, and every key is still there.
    let small = rt
        .block_on(keyflow::state::Store::open(
            &broker.bootstrap,
            &spec,
            producer.clone(),
            4 << 20,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    rt.block_on(small.restore(1)).unwrap();
    let spilled_took = started.elapsed();
    let report = &small.report()[1];
    println!(
        "restore spilling: {KEYS} keys in {:.3} s (s per 100k keys); {} keys in memory ({:.1} MiB, cap {:.1} MiB), {} in the spill file ({:.1} MiB on disk)",
        spilled_took.as_secs_f64() / KEYS as f64 * 100_000.0,
        report.keys,
        small.bytes() as f64 / (1 << 20) as f64,
        small.memory_cap() as f64 / (1 << 20) as f64,
        report.spilled_keys,
        small.disk_bytes() as f64 / (1 << 20) as f64,
    );
    assert!(
        small.bytes() as u64 <= small.memory_cap(),
        "state memory {} over its cap {}",
        small.bytes(),
        small.memory_cap()
    );
    assert!(report.spilled_keys > 0 && report.keys < KEYS, "{report:?}");
    assert!(
        small.snapshot(1) == in_memory,
        "the spilled state differs from the state restored in memory"
    );
    // A changelog with another partition count is refused, naming both counts.
    let (topic2, bad) = (unique("rs-in2"), unique("rs-bad"));
    broker.create_topic_blocking(&topic2, 4);
    broker.create_topic_blocking(&bad, 2);
    let config = support::inline_config(
        &broker.bootstrap,
        &format!(
            "{}\n[state]\nchangelog = \"{bad}\"\n[[processors]]\ntype = \"log\"\n",
            pipeline_header(&topic2, &group, "")
        ),
    );
    let err = rt
        .block_on(keyflow::state::Store::open(
            &broker.bootstrap,
            &config.pipelines[0],
            producer,
            64 << 20,
        ))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 2 partitions") && err.contains("has 4"),
        "{err}"
    );
    println!("refused: {err}");
    // Co-partitioned but not compacted: refused too (retention would lose the state).
    let mut spec = config.pipelines[0].clone();
    let not_compacted = unique("rs-delete");
    broker.create_topic_blocking(&not_compacted, 4);
    spec.state = Some(keyflow::config::StateSpec {
        changelog: not_compacted,
        memory: None,
        dir: std::env::temp_dir(),
    });
    let producer = keyflow::kafka::client::create_producer(&broker.bootstrap, &spec).unwrap();
    let err = rt
        .block_on(keyflow::state::Store::open(
            &broker.bootstrap,
            &spec,
            producer,
            64 << 20,
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cleanup.policy"), "{err}");
    println!("refused: {err}");
}

fn main() {
    if std::env::var_os("STATE_CHILD").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_ansi(false)
            .init();
        let paths = std::env::args_os().skip(1).map(PathBuf::from).collect();
        let code = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(account_balance::run(paths));
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    let tests: [(&str, fn()); 3] = [
        (
            "restore_of_100k_keys_is_timed",
            restore_of_100k_keys_is_timed,
        ),
        (
            "balances_equal_the_fold_after_kill9_and_rebalance",
            balances_equal_the_fold_after_kill9_and_rebalance,
        ),
        (
            "dedup_recognises_a_redelivery_after_kill9",
            dedup_recognises_a_redelivery_after_kill9,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = 0;
    let selected: Vec<_> = tests
        .iter()
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("running {} tests", selected.len());
    for (name, f) in &selected {
        let t = Instant::now();
        let ok = std::panic::catch_unwind(f).is_ok();
        println!(
            "test {name} ... {} ({:?})",
            if ok { "ok" } else { "FAILED" },
            t.elapsed()
        );
        failed += usize::from(!ok);
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" },
        selected.len() - failed
    );
    if failed > 0 {
        std::process::exit(101);
    }
}
