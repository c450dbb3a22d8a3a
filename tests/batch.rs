//! Batch pipelines (`[batch]`) against a real broker and a real PostgreSQL server: the `sql`
//! processor applies each batch in one transaction; a poison message is found by splitting
//! its batch and goes alone to the dead-letter topic; each key's events apply in order; every
//! offset is committed. The `--ignored` test prints the projection throughput per batch size.

mod support;

use std::time::{Duration, Instant};

use keyflow::http::get_blocking;
use support::postgres::Postgres;
use support::{free_port, prometheus_sample, unique, wait_until, Broker, ConsumedMsg, OutMsg};
use support::{Keyflow, Produced};

const PARTITIONS: i32 = 4;

/// Event `seq` (1-based) of order `order`; `amount` below 0 breaks the table's CHECK.
fn event(order: usize, seq: usize, amount: i64) -> OutMsg {
    OutMsg {
        key: Some(format!("o{order}").into_bytes()),
        payload: format!(r#"{{"order_id": "o{order}", "amount": {amount}, "seq": {seq}}}"#)
            .into_bytes(),
        ..Default::default()
    }
}

/// Round `seq` carries event `seq` of every order, so a batch holds many keys and every key
/// has a run of events queued behind its head.
fn events(orders: usize, per_order: usize, poison: Option<(usize, usize)>) -> Vec<OutMsg> {
    (1..=per_order)
        .flat_map(|seq| {
            (0..orders).map(move |o| {
                let bad = poison == Some((o, seq));
                event(o, seq, if bad { -1 } else { (o * 10 + seq) as i64 })
            })
        })
        .collect()
}

/// `out_of_order` counts updates whose `seq` is not above the stored one: a key's events
/// applied out of order (or one applied twice) leave it above 0. `version` counts updates.
fn create_table(pg: &Postgres, table: &str) {
    pg.psql(&format!(
        "CREATE TABLE {table} (order_id TEXT PRIMARY KEY, amount BIGINT NOT NULL CHECK (amount >= 0), \
         seq INT NOT NULL, version INT NOT NULL, out_of_order INT NOT NULL)"
    ));
}

fn pipeline(name: &str, topic: &str, group: &str, table: &str, batch: &str) -> String {
    format!(
        r#"
name = "{name}"
topic = "{topic}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout = "6s"
drain_timeout = "3s"
commit_interval = "500ms"
max_in_flight = 4000
max_workers = 4
{batch}

[retry]
max_attempts = 3
backoff = "50ms"
max_backoff = "500ms"

[[processors]]
type = "sql"
url = "${{PG_URL}}"
statement = "INSERT INTO {table} (order_id, amount, seq, version, out_of_order) VALUES ($1, $2, $3, 1, 0) ON CONFLICT (order_id) DO UPDATE SET amount = EXCLUDED.amount, seq = EXCLUDED.seq, version = {table}.version + 1, out_of_order = {table}.out_of_order + CASE WHEN EXCLUDED.seq <= {table}.seq THEN 1 ELSE 0 END"
params = ["/order_id", "/amount", "/seq"]
pool_size = 24
timeout = "10s"
"#
    )
}

fn count(pg: &Postgres, sql: &str) -> i64 {
    pg.psql(sql).parse().unwrap_or(-1)
}

/// Waits until the group's committed offsets reach the end of every non-empty partition.
fn wait_committed(broker: &Broker, group: &str, topic: &str, timeout: Duration, k: &Keyflow) {
    let end = broker.high_watermarks(topic);
    let n = end.len() as i32;
    let deadline = Instant::now() + timeout;
    loop {
        let c = broker.committed_offsets(group, topic, n);
        if c.iter().zip(&end).all(|(c, e)| *e == 0 || c == e) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed {c:?}, end {end:?}\n{}",
            k.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn header<'a>(m: &'a ConsumedMsg, name: &str) -> Option<&'a str> {
    m.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[test]
fn a_poison_message_alone_is_dead_lettered_and_every_key_applies_in_order() {
    const ORDERS: usize = 300;
    const PER_ORDER: usize = 8;
    const POISON: (usize, usize) = (7, 4);
    let pg = Postgres::start_new();
    let broker = Broker::shared();
    let (topic, group, name) = (unique("batch-in"), unique("batch-g"), unique("batch"));
    let dlq = format!("{topic}.dlq");
    let table = "orders_batch";
    create_table(&pg, table);
    broker.create_topic_blocking(&topic, PARTITIONS);
    broker.create_topic_blocking(&dlq, 1);
    let produced: Produced = broker.produce(&topic, events(ORDERS, PER_ORDER, Some(POISON)));
    assert_eq!(produced.count, ORDERS * PER_ORDER);

    let url = pg.url();
    let address = format!("127.0.0.1:{}", free_port());
    let k = Keyflow::start_many(
        &broker.bootstrap,
        &[&pipeline(
            &name,
            &topic,
            &group,
            table,
            "[batch]\nmax_messages = 100\nmax_wait = \"20ms\"",
        )],
        &[
            ("PG_URL", url.as_str()),
            ("KEYFLOW_HTTP__ADDRESS", &address),
        ],
    );
    wait_committed(broker, &group, &topic, Duration::from_secs(90), &k);

    // Only the poison message is dead-lettered, with the database's reason.
    let dead =
        broker.consume_all_with_quiet(&dlq, 1, Duration::from_secs(30), Duration::from_secs(2));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].key.as_deref(), Some(&b"o7"[..]));
    let reason = header(&dead[0], "keyflow.error").unwrap_or_default();
    println!("dead letter: {reason}");
    assert!(reason.contains("SQLSTATE 23514"), "{reason}");
    assert!(
        std::str::from_utf8(&dead[0].payload)
            .unwrap()
            .contains("\"seq\": 4"),
        "{dead:?}"
    );

    // Every other event applied once, each key's in order.
    let total = (ORDERS * PER_ORDER - 1) as i64;
    assert_eq!(
        count(&pg, &format!("SELECT sum(version) FROM {table}")),
        total,
        "every good event applied exactly once\n{}",
        k.log_tail(30)
    );
    assert_eq!(
        count(&pg, &format!("SELECT sum(out_of_order) FROM {table}")),
        0,
        "no key's events applied out of order"
    );
    assert_eq!(
        count(
            &pg,
            &format!("SELECT count(*) FROM {table} WHERE seq = {PER_ORDER}")
        ),
        ORDERS as i64,
        "every order ends at its last event"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT version FROM {table} WHERE order_id = 'o7'"
        )),
        (PER_ORDER - 1).to_string(),
        "o7's events after the poison one still applied"
    );

    // Batches really formed, and one split found the poison message.
    let (status, metrics) =
        get_blocking(&address, "/metrics", Duration::from_secs(5)).expect("GET /metrics");
    assert_eq!(status, 200);
    let labels = [("pipeline", name.as_str())];
    let runs = prometheus_sample(&metrics, "keyflow_batch_size_count", &labels).unwrap_or(0.0);
    let sizes = prometheus_sample(&metrics, "keyflow_batch_size_sum", &labels).unwrap_or(0.0);
    let splits = prometheus_sample(&metrics, "keyflow_batch_splits_total", &labels).unwrap_or(0.0);
    println!("{runs} batch runs, {sizes} messages in them, {splits} splits");
    assert!(splits >= 1.0, "the failed batch was split: {splits}");
    assert!(
        runs > 0.0 && runs < (total as f64) / 4.0,
        "messages went in batches: {runs} runs for {total} messages"
    );
}

#[test]
fn batches_apply_exactly_once_across_a_kill_9() {
    const ORDERS: usize = 4_000;
    const PER_ORDER: usize = 5;
    const TOTAL: i64 = (ORDERS * PER_ORDER) as i64;
    let pg = Postgres::start_new();
    let broker = Broker::shared();
    let (topic, group, name) = (unique("batch-kill"), unique("batch-kg"), unique("batch-k"));
    let table = "orders_batch_kill";
    create_table(&pg, table);
    broker.create_topic_blocking(&topic, PARTITIONS);
    broker.create_topic_blocking(&format!("{topic}.dlq"), 1);
    broker.produce(&topic, events(ORDERS, PER_ORDER, None));
    let text = pipeline(
        &name,
        &topic,
        &group,
        table,
        "[batch]\nmax_messages = 200\nmax_wait = \"20ms\"",
    );
    let url = pg.url();
    let env = [("PG_URL", url.as_str())];
    let versions = || {
        count(
            &pg,
            &format!("SELECT coalesce(sum(version), 0) FROM {table}"),
        )
    };
    let mut k = Keyflow::start_many(&broker.bootstrap, &[&text], &env);
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(5),
        || versions() >= TOTAL * 3 / 10,
        "30% of the events applied",
    );
    k.kill9();
    let applied = versions();
    let committed: i64 = broker
        .committed_offsets(&group, &topic, PARTITIONS)
        .iter()
        .map(|o| (*o).max(0))
        .sum();
    println!("killed at {applied} applied, {committed} committed");
    assert!(
        committed < applied,
        "batches applied but not committed when killed ({committed} committed, {applied} applied): the restart must skip them"
    );
    let k2 = Keyflow::start_many(&broker.bootstrap, &[&text], &env);
    wait_committed(broker, &group, &topic, Duration::from_secs(120), &k2);
    assert_eq!(
        versions(),
        TOTAL,
        "no event applied twice\n{}",
        k2.log_tail(30)
    );
    assert_eq!(
        count(&pg, &format!("SELECT sum(out_of_order) FROM {table}")),
        0,
        "no key's events applied out of order"
    );
    assert_eq!(
        count(
            &pg,
            &format!(
                "SELECT count(*) FROM {table} WHERE seq = {PER_ORDER} AND version = {PER_ORDER}"
            )
        ),
        ORDERS as i64
    );
    assert_eq!(broker.count_messages(&format!("{topic}.dlq")), 0);
}

/// Projection throughput per batch size (`cargo test --release --test batch -- --ignored
/// --nocapture`): 100,000 order events on 4 partitions, 4 workers each, from the first row
/// applied to the last offset committed. `per message` is the pipeline without `[batch]`.
#[test]
#[ignore = "a measurement that prints figures, not a check: run it with --ignored"]
fn projection_throughput_per_batch_size() {
    const ORDERS: usize = 20_000;
    const PER_ORDER: usize = 5;
    let pg = Postgres::start_new();
    let broker = Broker::shared();
    let mut figures = Vec::new();
    for (label, batch) in [
        ("per message", String::new()),
        ("batch 1", "[batch]\nmax_messages = 1".to_string()),
        ("batch 50", "[batch]\nmax_messages = 50".to_string()),
        ("batch 500", "[batch]\nmax_messages = 500".to_string()),
    ] {
        let (topic, group, name) = (unique("batch-tp"), unique("batch-tpg"), unique("batch-tp"));
        let table = format!("orders_{}", name.replace('-', "_"));
        create_table(&pg, &table);
        broker.create_topic_blocking(&topic, PARTITIONS);
        broker.create_topic_blocking(&format!("{topic}.dlq"), 1);
        broker.produce(&topic, events(ORDERS, PER_ORDER, None));
        let url = pg.url();
        let k = Keyflow::start_many(
            &broker.bootstrap,
            &[&pipeline(&name, &topic, &group, &table, &batch)],
            &[("PG_URL", url.as_str())],
        );
        let versions = || {
            count(
                &pg,
                &format!("SELECT coalesce(sum(version), 0) FROM {table}"),
            )
        };
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(10),
            || versions() > 0,
            "the first row applied",
        );
        let started = Instant::now();
        wait_committed(broker, &group, &topic, Duration::from_secs(300), &k);
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(versions(), (ORDERS * PER_ORDER) as i64, "{label}");
        let rate = (ORDERS * PER_ORDER) as f64 / secs;
        println!("{label}: {rate:.0} msg/s ({secs:.1} s)");
        figures.push((label, rate));
        drop(k);
    }
    println!("projection throughput: {figures:?}");
}

/// A custom batch processor: records each batch's offsets; panics on a batch holding payload
/// `boom`; while `hang` is set, never returns (a downstream that does not answer).
#[derive(Default)]
struct Custom {
    batches: std::sync::Mutex<Vec<Vec<i64>>>,
    hang: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl keyflow::Processor for Custom {
    async fn process(
        &self,
        _: &mut keyflow::Message,
    ) -> Result<keyflow::Flow, keyflow::ProcessError> {
        Ok(keyflow::Flow::Continue)
    }
    fn as_batch(&self) -> Option<&dyn keyflow::processors::batch::BatchProcessor> {
        Some(self)
    }
}

#[async_trait::async_trait]
impl keyflow::processors::batch::BatchProcessor for Custom {
    async fn process_batch(
        &self,
        msgs: &[&keyflow::Message],
    ) -> Result<Vec<keyflow::Flow>, keyflow::ProcessError> {
        self.batches
            .lock()
            .unwrap()
            .push(msgs.iter().map(|m| m.offset).collect());
        while self.hang.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if msgs.iter().any(|m| m.payload.as_deref() == Some(b"boom")) {
            panic!("the batch processor panics on input");
        }
        Ok(vec![keyflow::Flow::Continue; msgs.len()])
    }
}

/// `n` messages of distinct keys on partition 0 of a new topic (and its dead-letter topic),
/// offset `boom` with payload `boom`; a runtime on it with `Custom` as the batch processor.
async fn start_custom(
    name: &str,
    n: usize,
    boom: Option<usize>,
    custom: &std::sync::Arc<Custom>,
) -> (String, keyflow::runtime::Running) {
    let broker = Broker::shared();
    let (topic, group) = (unique(&format!("{name}-in")), unique(&format!("{name}-g")));
    broker.create_topic(&topic, 1).await;
    broker.create_topic(&format!("{topic}.dlq"), 1).await;
    broker.produce_to_partition(
        &topic,
        (0..n).map(|i| {
            let v: &[u8] = if Some(i) == boom { b"boom" } else { b"{}" };
            (0, Some(format!("k{i}").into_bytes()), v.to_vec())
        }),
    );
    let toml = format!(
        "name = \"{name}\"\n{}\n[retry]\nmax_attempts = 3\nbackoff = \"10ms\"\n\
         [batch]\nmax_messages = {n}\nmax_wait = \"200ms\"\n\
         [[processors]]\ntype = \"custom\"\nname = \"c\"\n",
        support::pipeline_header(&topic, &group, "")
    );
    let running = keyflow::Runtime::new(support::inline_config(&broker.bootstrap, &toml))
        .with_processor("c", custom.clone())
        .start()
        .await
        .unwrap();
    (topic, running)
}

/// A batch processor that panics on one message's batch: the panic is that batch's permanent
/// failure, so the split leaves the message alone in the dead-letter topic and every other
/// message completes (before: the batch crashed its worker again and again, past the restart
/// budget, and nothing completed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_panics_its_processor_is_split_to_the_poison_message() {
    let custom = std::sync::Arc::new(Custom::default());
    let (_, running) = start_custom("panic", 20, Some(7), &custom).await;
    let stats = running.stats[0].clone();
    support::wait_until_async(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let s = stats.snapshot();
            s.processed == 19 && s.dead_lettered == 1
        },
        "19 processed and the panicking message dead-lettered",
    )
    .await;
    let batches = custom.batches.lock().unwrap().clone();
    assert!(
        batches.iter().any(|b| b == &vec![7]),
        "offset 7 ran alone: {batches:?}"
    );
    running.shutdown().await;
}

/// A batch still running at the drain deadline is reported abandoned (the shutdown is not
/// clean, main exits 1 and names each offset), and `/debug` shows its oldest message while it
/// runs (before: the report was empty and the shutdown clean; `oldest_in_flight` was null).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_running_at_the_drain_deadline_is_reported_abandoned() {
    let custom = std::sync::Arc::new(Custom::default());
    custom
        .hang
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (_, running) = start_custom("abandon", 5, None, &custom).await;
    support::wait_until_async(
        Duration::from_secs(60),
        Duration::from_millis(20),
        || !custom.batches.lock().unwrap().is_empty(),
        "a batch runs",
    )
    .await;
    let mut given = custom.batches.lock().unwrap()[0].clone();
    given.sort();
    let debug = keyflow::http::debug_report(&running.stats).await;
    let v = serde_json::to_value(&debug).unwrap();
    assert_eq!(
        v["pipelines"][0]["partitions"][0]["oldest_in_flight"]["offset"], given[0],
        "{v}"
    );
    let reports = running.shutdown().await;
    let mut abandoned: Vec<i64> = reports[0].abandoned.iter().map(|(_, a)| a.offset).collect();
    abandoned.sort();
    assert_eq!(abandoned, given, "{:?}", reports[0]);
    assert!(!reports[0].clean());
}
