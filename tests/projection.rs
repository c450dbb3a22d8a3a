//! The `sql` processor (read-model projection) against a real PostgreSQL server
//! (`support::postgres`, Debian's package) and a real broker: exactly-once into the database
//! across a kill -9, a database outage, dead letters with their SQLSTATE or field, and the
//! connection guard when a transaction's future is dropped.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyflow::gate::Gate;
use keyflow::message::Message;
use keyflow::processors::sql::{Sql, SqlConfig};
use keyflow::processors::{Flow, Processor};
use support::postgres::Postgres;
use support::{unique, wait_until, Broker, ConsumedMsg, Keyflow, OutMsg};

const STATUSES: [&str; 5] = ["created", "paid", "packed", "shipped", "delivered"];
const PARTITIONS: i32 = 8;

/// Event `seq` (1-based) of order `order`: its status and amount change with every event.
fn event(order: usize, seq: usize) -> OutMsg {
    OutMsg {
        key: Some(format!("o{order}").into_bytes()),
        payload: format!(
            r#"{{"order_id": "o{order}", "status": "{}", "amount": {}, "seq": {seq}}}"#,
            STATUSES[(seq - 1) % STATUSES.len()],
            amount(order, seq)
        )
        .into_bytes(),
        ..Default::default()
    }
}

fn amount(order: usize, seq: usize) -> String {
    format!("{}.{:02}", order % 1000, (seq * 25) % 100)
}

/// `orders` rows and their events, interleaved: round `r` carries event `r` of every order, so
/// a crash at any point leaves orders half-way through their events.
fn events(orders: usize, per_order: usize) -> impl Iterator<Item = OutMsg> {
    (1..=per_order).flat_map(move |seq| (0..orders).map(move |o| event(o, seq)))
}

fn create_table(pg: &Postgres, table: &str) {
    pg.psql(&format!(
        "CREATE TABLE {table} (order_id TEXT PRIMARY KEY, status TEXT NOT NULL, \
         amount NUMERIC(12,2) NOT NULL CHECK (amount >= 0), seq INT NOT NULL, version INT NOT NULL)"
    ));
}

fn statement(table: &str) -> String {
    format!(
        "INSERT INTO {table} (order_id, status, amount, seq, version) VALUES ($1, $2, $3, $4, 1) \
         ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, amount = EXCLUDED.amount, \
         seq = EXCLUDED.seq, version = {table}.version + 1"
    )
}

/// A projection pipeline; the database URL comes from `${PG_URL}`.
fn pipeline(name: &str, topic: &str, group: &str, table: &str, extra: &str) -> String {
    format!(
        r#"
name = "{name}"
topic = "{topic}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout = "6s"
drain_timeout = "3s"
commit_interval = "1s"
max_in_flight = 2000
max_workers = 4
{extra}

[retry]
max_attempts = 10
backoff = "100ms"
max_backoff = "2s"

[[processors]]
type = "sql"
url = "${{PG_URL}}"
statement = "{}"
params = ["/order_id", "/status", "/amount", "/seq"]
pool_size = 24
timeout = "5s"
circuit_breaker = {{ failures = 3, cool_down = "2s" }}
"#,
        statement(table)
    )
}

/// `order_id → (status, amount, seq, version)` as stored.
fn rows(pg: &Postgres, table: &str) -> HashMap<String, (String, String, usize, usize)> {
    pg.psql(&format!(
        "SELECT order_id, status, amount, seq, version FROM {table}"
    ))
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split('|').collect();
        (
            f[0].to_string(),
            (
                f[1].to_string(),
                f[2].to_string(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
            ),
        )
    })
    .collect()
}

/// Every order's row equals its last event, and its version counter equals its number of
/// events (a message applied twice would count twice). Returns the mismatches.
fn check_rows(pg: &Postgres, table: &str, orders: usize, per_order: usize) -> Vec<String> {
    let rows = rows(pg, table);
    let mut bad = Vec::new();
    if rows.len() != orders {
        bad.push(format!("{} rows, expected {orders}", rows.len()));
    }
    for o in 0..orders {
        let want = (
            STATUSES[(per_order - 1) % STATUSES.len()].to_string(),
            amount(o, per_order),
            per_order,
            per_order,
        );
        match rows.get(&format!("o{o}")) {
            Some(r) if *r == want => {}
            r => bad.push(format!("o{o}: {r:?}, expected {want:?}")),
        }
    }
    bad
}

fn sum_versions(pg: &Postgres, table: &str) -> usize {
    pg.psql(&format!("SELECT coalesce(sum(version), 0) FROM {table}"))
        .parse()
        .unwrap()
}

/// Waits until the group's committed offsets reach the end of every non-empty partition.
fn wait_committed(broker: &Broker, group: &str, topic: &str, timeout: Duration) {
    let end = broker.high_watermarks(topic);
    let partitions = end.len() as i32;
    wait_until(
        timeout,
        Duration::from_millis(250),
        || {
            // An empty partition has nothing to commit.
            let c = broker.committed_offsets(group, topic, partitions);
            c.iter().zip(&end).all(|(c, e)| *e == 0 || c == e)
        },
        "every offset committed",
    );
}

#[test]
fn hundred_thousand_events_with_a_kill_9_apply_exactly_once() {
    const ORDERS: usize = 20_000;
    const PER_ORDER: usize = 5;
    const TOTAL: usize = ORDERS * PER_ORDER;
    let pg = Postgres::start_new();
    let broker = Broker::shared();
    let (topic, group, name) = (unique("proj-in"), unique("proj-g"), unique("proj"));
    let table = "orders_kill";
    create_table(&pg, table);
    broker.create_topic_blocking(&topic, PARTITIONS);
    broker.create_topic_blocking(&format!("{topic}.dlq"), 1);
    let produced = broker.produce(&topic, events(ORDERS, PER_ORDER));
    assert_eq!(produced.count, TOTAL);

    let text = pipeline(&name, &topic, &group, table, "");
    let url = pg.url();
    let env = [("PG_URL", url.as_str())];
    let started = Instant::now();
    let mut k = Keyflow::start_many(&broker.bootstrap, &[&text], &env);
    wait_until(
        Duration::from_secs(120),
        Duration::from_millis(50),
        || sum_versions(&pg, table) >= TOTAL * 3 / 10,
        "30% of the events applied",
    );
    let first = sum_versions(&pg, table);
    let first_rate = first as f64 / started.elapsed().as_secs_f64();
    k.kill9();
    let committed: i64 = broker
        .committed_offsets(&group, &topic, PARTITIONS)
        .iter()
        .map(|o| (*o).max(0))
        .sum();
    println!("killed at {first} applied messages, {committed} committed");
    assert!(
        (committed as usize) < first,
        "some messages were applied but not committed when killed ({committed} committed, {first} applied): the restart must skip them"
    );

    let restarted = Instant::now();
    let k2 = Keyflow::start_many(&broker.bootstrap, &[&text], &env);
    wait_committed(broker, &group, &topic, Duration::from_secs(150));
    let secs = restarted.elapsed().as_secs_f64();
    let bad = check_rows(&pg, table, ORDERS, PER_ORDER);
    assert!(
        bad.is_empty(),
        "{} bad rows, e.g. {:?}\n{}",
        bad.len(),
        &bad[..bad.len().min(10)],
        k2.log_tail(30)
    );
    assert_eq!(sum_versions(&pg, table), TOTAL, "no event applied twice");
    assert_eq!(broker.count_messages(&format!("{topic}.dlq")), 0);
    let applied = pg.psql(&format!(
        "SELECT count(*) FROM keyflow_applied WHERE consumer = '{name}'"
    ));
    assert_eq!(applied, ORDERS.to_string(), "one position row per key");
    println!(
        "projection throughput (per-message transactions, pool 24): first run {first_rate:.0} msg/s; \
         after the restart {:.0} msg/s ({} messages, re-read included, in {secs:.1} s)",
        (TOTAL as i64 - committed) as f64 / secs,
        TOTAL as i64 - committed
    );
}

#[test]
fn a_20_second_database_outage_ends_with_everything_applied_and_nothing_dead_lettered() {
    const ORDERS: usize = 4_000;
    const PER_ORDER: usize = 5;
    let pg = Postgres::start_new();
    let broker = Broker::shared();
    let (topic, group, name) = (unique("proj-out"), unique("proj-og"), unique("proj-o"));
    let table = "orders_outage";
    create_table(&pg, table);
    broker.create_topic_blocking(&topic, PARTITIONS);
    broker.create_topic_blocking(&format!("{topic}.dlq"), 1);
    // Half the events before the outage, half during it.
    let first: Vec<OutMsg> = events(ORDERS, PER_ORDER).collect();
    let (before, during) = first.split_at(first.len() / 2);
    broker.produce(&topic, before.to_vec());
    let url = pg.url();
    let k = Keyflow::start_many(
        &broker.bootstrap,
        &[&pipeline(&name, &topic, &group, table, "")],
        &[("PG_URL", url.as_str())],
    );
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(20),
        || sum_versions(&pg, table) >= 2_000,
        "the projection running",
    );
    pg.stop();
    let down = Instant::now();
    broker.produce(&topic, during.to_vec());
    std::thread::sleep(Duration::from_secs(20).saturating_sub(down.elapsed()));
    pg.start();
    println!("database down for {:.1} s", down.elapsed().as_secs_f64());
    wait_committed(broker, &group, &topic, Duration::from_secs(90));
    let bad = check_rows(&pg, table, ORDERS, PER_ORDER);
    assert!(
        bad.is_empty(),
        "{} bad rows, e.g. {:?}\n{}",
        bad.len(),
        &bad[..bad.len().min(10)],
        k.log_tail(30)
    );
    assert_eq!(sum_versions(&pg, table), ORDERS * PER_ORDER);
    assert_eq!(
        broker.count_messages(&format!("{topic}.dlq")),
        0,
        "nothing dead-lettered by the outage"
    );
    let log = k.log();
    assert!(
        log.contains("circuit open"),
        "the breaker opened during the outage:\n{}",
        k.log_tail(40)
    );
}

fn header<'a>(m: &'a ConsumedMsg, name: &str) -> Option<&'a str> {
    m.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[test]
fn a_constraint_violation_and_a_missing_field_go_to_the_dead_letter_topic() {
    let pg = Postgres::start_new();
    let broker = Broker::shared();
    let (topic, group, name) = (unique("proj-dlq"), unique("proj-dg"), unique("proj-d"));
    let dlq = format!("{topic}.dlq");
    let table = "orders_dlq";
    create_table(&pg, table);
    broker.create_topic_blocking(&topic, 2);
    broker.create_topic_blocking(&dlq, 1);
    let msg = |key: Option<&str>, payload: &str| OutMsg {
        key: key.map(|k| k.as_bytes().to_vec()),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    };
    broker.produce(
        &topic,
        vec![
            msg(
                Some("neg"),
                r#"{"order_id": "neg", "status": "created", "amount": -5, "seq": 1}"#,
            ),
            msg(
                Some("nostatus"),
                r#"{"order_id": "nostatus", "amount": 1, "seq": 1}"#,
            ),
            msg(
                Some("badseq"),
                r#"{"order_id": "badseq", "status": "created", "amount": 1, "seq": "x"}"#,
            ),
            msg(
                None,
                r#"{"order_id": "nokey", "status": "created", "amount": 1, "seq": 1}"#,
            ),
            msg(
                Some("ok"),
                r#"{"order_id": "ok", "status": "created", "amount": 1.5, "seq": 1}"#,
            ),
        ],
    );
    let url = pg.url();
    let k = Keyflow::start_many(
        &broker.bootstrap,
        &[&pipeline(&name, &topic, &group, table, "")],
        &[("PG_URL", url.as_str())],
    );
    let dead = broker.consume_all(&dlq, 4, Duration::from_secs(60));
    let reason = |key: Option<&str>| -> String {
        let m = dead
            .iter()
            .find(|m| m.key.as_deref() == key.map(str::as_bytes))
            .unwrap_or_else(|| panic!("{key:?} not dead-lettered: {dead:?}\n{}", k.log_tail(30)));
        assert_eq!(header(m, "keyflow.error.kind"), Some("sql"), "{m:?}");
        header(m, "keyflow.error").unwrap_or_default().to_string()
    };
    let neg = reason(Some("neg"));
    println!("constraint violation: {neg}");
    assert!(neg.contains("SQLSTATE 23514"), "{neg}");
    assert!(!neg.contains("keyflow@"), "the URL is not shown: {neg}");
    let missing = reason(Some("nostatus"));
    println!("missing field: {missing}");
    assert!(missing.contains("/status"), "{missing}");
    let bad = reason(Some("badseq"));
    println!("bad value: {bad}");
    assert!(bad.contains("/seq") && bad.contains("int4"), "{bad}");
    let nokey = reason(None);
    assert!(nokey.contains("no key"), "{nokey}");
    wait_committed(broker, &group, &topic, Duration::from_secs(30));
    assert_eq!(
        pg.psql(&format!(
            "SELECT order_id || ' ' || amount || ' ' || version FROM {table}"
        )),
        "ok 1.50 1",
        "only the good message was applied"
    );
}

fn sql(pg: &Postgres, extra: &str) -> Sql {
    let mut cfg: SqlConfig = toml::from_str(&format!(
        "url = \"{}\"\ntls = \"disable\"\n{extra}",
        pg.url()
    ))
    .unwrap();
    let errs = cfg.validate(std::path::Path::new("."));
    assert!(errs.is_empty(), "{errs:?}");
    Sql::new(&cfg, &Arc::new(Gate::default()), "direct").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_skipped_and_a_dropped_transaction_is_applied_once() {
    let pg = Postgres::start_new();
    pg.psql("CREATE TABLE slow (id TEXT PRIMARY KEY, n INT NOT NULL)");
    // The statement sleeps 3 s when asked to (n < 0): long enough to drop it half-way.
    let p = sql(
        &pg,
        r#"statement = "INSERT INTO slow (id, n) SELECT $1, $2 FROM (SELECT CASE WHEN $2 < 0 THEN pg_sleep(3) END) s ON CONFLICT (id) DO UPDATE SET n = slow.n + EXCLUDED.n"
params = ["/id", "/n"]"#,
    );
    let mut m = Message::new("t", 0, 10, Some(b"a"), br#"{"id": "a", "n": 1}"#);
    assert_eq!(p.process(&mut m).await.unwrap(), Flow::Continue);
    // The same message again (a redelivery after a crash or a rebalance), and an older one.
    assert_eq!(p.process(&mut m).await.unwrap(), Flow::Duplicate);
    let mut old = Message::new("t", 0, 9, Some(b"a"), br#"{"id": "a", "n": 100}"#);
    assert_eq!(p.process(&mut old).await.unwrap(), Flow::Duplicate);
    assert_eq!(pg.psql("SELECT n FROM slow WHERE id = 'a'"), "1");

    // Dropped mid-transaction (a drain deadline, a killed worker, the timeout): the claim and
    // the statement commit or roll back together (the COMMIT may already be on its way), the
    // connection does not go back to the pool inside the transaction, and the retry of the
    // message applies it exactly once either way.
    let payload = br#"{"id": "a", "n": -1}"#;
    let mut slow = Message::new("t", 0, 11, Some(b"a"), payload);
    let dropped = tokio::time::timeout(Duration::from_millis(500), p.process(&mut slow)).await;
    assert!(dropped.is_err(), "still running when dropped");
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            pg.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND \
                 (state LIKE 'idle in transaction%' OR (state = 'active' AND query LIKE '%pg_sleep(3)%'))",
            ) == "0"
        },
        "the dropped transaction ended",
    );
    let state = || {
        pg.psql(
            "SELECT n || ' ' || \"offset\" FROM slow, keyflow_applied WHERE id = 'a' AND consumer = 'direct'",
        )
    };
    let after_drop = state();
    println!("after the dropped transaction: n, offset = {after_drop}");
    assert!(
        after_drop == "1 10" || after_drop == "0 11",
        "statement and claim together: {after_drop}"
    );
    let mut retry = Message::new("t", 0, 11, Some(b"a"), payload);
    let flow = p.process(&mut retry).await.unwrap();
    assert_eq!(
        flow == Flow::Duplicate,
        after_drop == "0 11",
        "skipped exactly when it had committed"
    );
    assert_eq!(state(), "0 11", "applied once");

    // A message whose transaction outlives `timeout` is a retryable error, and rolled back.
    let t = sql(
        &pg,
        r#"statement = "INSERT INTO slow (id, n) SELECT $1, 0 FROM pg_sleep(2)"
params = ["/id"]
timeout = "300ms""#,
    );
    let e = t
        .process(&mut Message::new("t", 1, 0, Some(b"b"), br#"{"id": "b"}"#))
        .await
        .unwrap_err();
    assert!(e.is_retryable() && e.message().contains("300ms"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_retryable_and_reconnects() {
    let pg = Postgres::start_new();
    pg.psql("CREATE TABLE r (id TEXT PRIMARY KEY)");
    let p = sql(
        &pg,
        "statement = \"INSERT INTO r VALUES ($1)\"\nparams = [\"$key\"]",
    );
    let m = |o: i64, k: &'static [u8]| Message::new("t", 0, o, Some(k), b"{}");
    assert_eq!(p.process(&mut m(0, b"a")).await.unwrap(), Flow::Continue);
    pg.stop();
    let e = p.process(&mut m(1, b"b")).await.unwrap_err();
    println!("database down: {e}");
    assert!(e.is_retryable(), "{e}");
    assert!(
        !e.message().contains("keyflow@"),
        "the URL is not shown: {e}"
    );
    pg.start();
    assert_eq!(p.process(&mut m(1, b"b")).await.unwrap(), Flow::Continue);
    assert_eq!(
        pg.psql("SELECT string_agg(id, ',' ORDER BY id) FROM r"),
        "a,b"
    );
}

#[test]
fn the_example_pipeline_keeps_the_orders_table() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pg = Postgres::start_new();
    pg.psql(&std::fs::read_to_string(repo.join("pipelines/sql/orders.sql")).unwrap());
    // Fixed topic names: a broker of its own.
    let broker = Broker::start();
    broker.create_topic_blocking("order.status", 2);
    broker.create_topic_blocking("order.status.dlq", 1);
    let event = |id: &str, status: &str, total: &str, at: &str| OutMsg {
        key: Some(id.as_bytes().to_vec()),
        payload: format!(
            r#"{{"order_id": "{id}", "status": "{status}", "total": {total}, "at": "{at}"}}"#
        )
        .into_bytes(),
        ..Default::default()
    };
    broker.produce(
        "order.status",
        vec![
            event("o1", "created", "10", "2026-03-01T10:00:00Z"),
            event("o2", "created", "3.5", "2026-03-01T10:00:01Z"),
            event("o1", "paid", "12.25", "2026-03-01T11:00:00+01:00"),
            event("o1", "shipped", "12.25", "2026-03-02T09:30:00Z"),
            // Against the contract: dead-lettered by `validate`.
            event("bad", "lost", "1", "2026-03-01T10:00:00Z"),
            // Within the contract, but not a timestamp: dead-lettered by `sql`.
            event("o3", "created", "1", "yesterday"),
        ],
    );
    let path = repo.join("pipelines/order-read-model.toml");
    let url = pg.url();
    let k = Keyflow::start_with_args(
        &["run", path.to_str().unwrap()],
        &[
            ("KEYFLOW_BROKERS", broker.bootstrap.as_str()),
            ("ORDERS_DB_URL", url.as_str()),
        ],
    );
    wait_committed(
        &broker,
        "keyflow-order-read-model",
        "order.status",
        Duration::from_secs(60),
    );
    assert_eq!(
        pg.psql(
            "SELECT order_id || ' ' || status || ' ' || total || ' ' || \
             to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' ' || version \
             FROM orders ORDER BY order_id"
        ),
        "o1 shipped 12.25 2026-03-02 09:30 3\no2 created 3.50 2026-03-01 10:00 1",
        "{}",
        k.log_tail(30)
    );
    let dead = broker.consume_all("order.status.dlq", 2, Duration::from_secs(10));
    let kinds: Vec<_> = dead
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned(),
                header(m, "keyflow.error.kind")
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("bad".into(), "schema".into())),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("o3".into(), "sql".into())), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database() {
    let pg = Postgres::start_tls();
    pg.psql("CREATE TABLE tls_check (id TEXT PRIMARY KEY, ssl BOOL NOT NULL)");
    let statement = r#"statement = "INSERT INTO tls_check SELECT $1, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
params = ["$key"]"#;
    let with = |tls: &str| -> Sql {
        let mut cfg: SqlConfig =
            toml::from_str(&format!("url = \"{}\"\n{tls}\n{statement}", pg.url())).unwrap();
        let errs = cfg.validate(std::path::Path::new("."));
        assert!(errs.is_empty(), "{errs:?}");
        Sql::new(&cfg, &Arc::new(Gate::default()), tls).unwrap()
    };
    let crt = pg.certificate();
    let cases = [
        ("tls = \"disable\"".to_string(), "disable"),
        ("tls = \"require\"".to_string(), "require"),
        (
            format!("tls = \"verify_full\"\nca_file = \"{}\"", crt.display()),
            "verify_full",
        ),
    ];
    for (i, (tls, key)) in cases.iter().enumerate() {
        let mut m = Message::new("t", 0, i as i64, Some(key.as_bytes()), b"{}");
        let r = with(tls).process(&mut m).await;
        assert_eq!(r.unwrap(), Flow::Continue, "{tls}");
    }
    assert_eq!(
        pg.psql("SELECT string_agg(id || '=' || ssl, ' ' ORDER BY id) FROM tls_check"),
        "disable=false require=true verify_full=true"
    );
    // The self-signed certificate is not trusted by the system's roots.
    let e = with("tls = \"verify_full\"")
        .process(&mut Message::new("t", 0, 9, Some(b"untrusted"), b"{}"))
        .await
        .unwrap_err();
    println!("untrusted certificate: {e}");
    assert!(e.is_retryable(), "{e}");
    assert!(e.message().contains("certificate"), "{e}");
}
