//! Fault tests for `delivery = "exactly_once"` (review of cde2a59): each drives the runtime
//! into one window where the promise — a `read_committed` reader downstream sees each input's
//! outputs exactly once — can break, and asserts the promise.

mod support;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use support::{unique, Broker, Keyflow};

fn member(broker: &Broker, toml: &str, instance: &str) -> Keyflow {
    Keyflow::start_many(
        &broker.bootstrap,
        &[toml],
        &[
            ("KEYFLOW_INSTANCE_ID", instance),
            ("RUST_LOG", "keyflow=debug,info"),
        ],
    )
}

fn admin_opts() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)))
}

/// A one-partition topic whose records may be at most `max_bytes` (the broker refuses larger).
fn create_small_topic(broker: &Broker, name: &str, max_bytes: usize) {
    let max = max_bytes.to_string();
    let topic = NewTopic::new(name, 1, TopicReplication::Fixed(1)).set("max.message.bytes", &max);
    let r = futures::executor::block_on(broker.admin().create_topics([&topic], &admin_opts()))
        .expect("create_topics");
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    // Waits for its metadata (an existing topic is accepted).
    broker.create_topic_blocking(name, 1);
}

fn set_max_bytes(broker: &Broker, name: &str, max_bytes: usize) {
    let max = max_bytes.to_string();
    let c = AlterConfig::new(ResourceSpecifier::Topic(name)).set("max.message.bytes", &max);
    let r = futures::executor::block_on(broker.admin().alter_configs([&c], &admin_opts()))
        .expect("alter_configs");
    assert!(r.iter().all(Result::is_ok), "{r:?}");
}

fn rewinds(kf: &Keyflow) -> usize {
    kf.log().matches("exactly-once: rewound").count()
}

/// A rewind (the open transaction aborted, e.g. one record the broker refuses) runs the aborted
/// messages again. `dedup` remembered their ids when they were written into the transaction
/// that was then aborted, so the second run drops them as duplicates and commits their offsets
/// with no output: a read_committed reader never sees them.
#[test]
fn dedup_does_not_drop_the_reruns_of_an_aborted_transaction() {
    let broker = Broker::start();
    let (input, output, group) = (unique("eosf-in"), unique("eosf-out"), unique("eosf-g"));
    broker.create_topic_blocking(&input, 1);
    broker.create_topic_blocking(&format!("{input}.dlq"), 1);
    create_small_topic(&broker, &output, 4000);
    // The 5 s interval (below half the 30 s transaction timeout) leaves time for the small outputs
    // and the refused record to share a transaction.
    let toml = format!(
        r#"
name = "eos"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
delivery = "exactly_once"
session_timeout = "6s"
drain_timeout = "2s"
commit_interval = "5s"
commit_every = 1000

[[processors]]
type = "dedup"
field = "id"
ttl = "1h"

[[processors]]
type = "forward"
topic = "{output}"
"#
    );
    let mut kf = member(&broker, &toml, "a");
    kf.wait_for_log("partition supervisor started", Duration::from_secs(60));
    // A first message, committed: the commit cycle has just run when the small ones come, so
    // the next commit is ~5 s away.
    broker.produce_keyed(
        &input,
        vec![(Some(b"w".to_vec()), br#"{"id":"warm"}"#.to_vec())],
    );
    support::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || broker.committed_offsets(&group, &input, 1) == vec![1],
        "the first message committed",
    );
    // 20 small messages, then (while their outputs sit in the open transaction) one the
    // broker refuses. If a commit slipped in between, another 20 (at most 5 tries).
    let mut inputs = 1i64;
    let pad = "x".repeat(10_000);
    for attempt in 0..5 {
        let before = broker.committed_offsets(&group, &input, 1);
        let small: Vec<_> = (0..20)
            .map(|i| {
                (
                    Some(format!("k{i}").into_bytes()),
                    format!(r#"{{"id":"m{attempt}-{i}"}}"#).into_bytes(),
                )
            })
            .collect();
        broker.produce_keyed(&input, small);
        inputs += 20;
        // Written, not committed (the high watermark a read_committed client sees is the
        // last stable offset): read them uncommitted.
        broker.consume_all_isolated(
            &output,
            inputs as usize,
            Duration::from_secs(30),
            Duration::from_millis(20),
            "read_uncommitted",
        );
        if broker.committed_offsets(&group, &input, 1) == before {
            // 10 kB: above the output topic's 4,000-byte limit, below the producer's own.
            broker.produce_keyed(
                &input,
                vec![(
                    Some(b"big".to_vec()),
                    format!(r#"{{"id":"big","pad":"{pad}"}}"#).into_bytes(),
                )],
            );
            inputs += 1;
            break;
        }
        assert!(
            attempt < 4,
            "a commit came between the small outputs and the refused record every time"
        );
    }
    support::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || rewinds(&kf) >= 1,
        "the refused record aborts the transaction and the pipeline rewinds",
    );
    // The broker now takes the large record: the next run of it succeeds and is committed.
    set_max_bytes(&broker, &output, 1_000_000);
    support::wait_until(
        Duration::from_secs(90),
        Duration::from_millis(100),
        || broker.committed_offsets(&group, &input, 1) == vec![inputs],
        "every input committed",
    );
    // Everything the read_committed reader gets (returns after 3 s without a new record).
    let seen = broker.consume_all_isolated(
        &output,
        1,
        Duration::from_secs(30),
        Duration::from_secs(3),
        "read_committed",
    );
    kf.sigterm();
    let _ = kf.wait_exit(Duration::from_secs(30));
    let ids: Vec<String> = seen
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload[..m.payload.len().min(12)]).into_owned())
        .collect();
    println!(
        "dedup + rewind: {} rewinds; input offsets 0..{inputs} committed; read_committed output holds {} of {inputs} inputs: {ids:?}",
        rewinds(&kf),
        seen.len()
    );
    assert_eq!(
        seen.len(),
        inputs as usize,
        "LOSS: inputs committed whose outputs are in no committed transaction"
    );
}

/// A record the broker refuses for good (larger than the output topic's `max.message.bytes`)
/// is dead-lettered under at_least_once (`write_error`: permanent). Under exactly_once its
/// failed write aborts the transaction, the pipeline rewinds, runs it again, and fails again:
/// the partition never passes it, for ever.
#[test]
fn a_record_the_broker_refuses_is_dead_lettered_not_rewound_for_ever() {
    let broker = Broker::start();
    let (input, output, group) = (unique("eosp-in"), unique("eosp-out"), unique("eosp-g"));
    let dlq = format!("{input}.dlq");
    broker.create_topic_blocking(&input, 1);
    broker.create_topic_blocking(&dlq, 1);
    create_small_topic(&broker, &output, 4000);
    let toml = format!(
        r#"
name = "eos"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
delivery = "exactly_once"
session_timeout = "6s"
drain_timeout = "2s"
commit_interval = "200ms"

[[processors]]
type = "forward"
topic = "{output}"
"#
    );
    let mut kf = member(&broker, &toml, "a");
    kf.wait_for_log("partition supervisor started", Duration::from_secs(60));
    let pad = "x".repeat(10_000);
    let mut batch = vec![(Some(b"big".to_vec()), pad.into_bytes())];
    batch.extend((0..10).map(|i| (Some(format!("k{i}").into_bytes()), b"small".to_vec())));
    broker.produce_keyed(&input, batch);
    let started = Instant::now();
    // Under at_least_once this takes well under a second (dead-lettered at once).
    let passed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        support::wait_until(
            Duration::from_secs(40),
            Duration::from_millis(200),
            || broker.committed_offsets(&group, &input, 1) == vec![11],
            "the input committed past the refused record",
        )
    }))
    .is_ok();
    let n = rewinds(&kf);
    let committed = broker.committed_offsets(&group, &input, 1);
    kf.sigterm();
    let _ = kf.wait_exit(Duration::from_secs(30));
    println!(
        "poison record under exactly_once: after {:.1?}: committed {committed:?} of 11, {n} rewinds",
        started.elapsed()
    );
    assert!(
        passed,
        "STALL: the refused record was never dead-lettered; {n} rewinds in {:.1?}, committed {committed:?}",
        started.elapsed()
    );
}
