//! `dedup` drops are counted as `keyflow_messages_total{outcome="deduplicated"}`, not `filtered`.

mod support;

use std::time::Duration;

use keyflow::runtime::Runtime;
use support::{inline_config, pipeline_header, unique, wait_until_async, Broker};

/// The value of `keyflow_messages_total{pipeline=…,outcome=…}` in a Prometheus rendering.
fn outcome(text: &str, pipeline: &str, outcome: &str) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with("keyflow_messages_total{"))
        .filter(|l| l.contains(&format!("pipeline=\"{pipeline}\"")))
        .find(|l| l.contains(&format!("outcome=\"{outcome}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_drops_are_counted_as_deduplicated() {
    const IDS: usize = 100;
    let prometheus = keyflow::metrics::install();
    let broker = Broker::shared();
    let (topic, group, name) = (unique("dd-in"), unique("dd-g"), unique("dd"));
    broker.create_topic(&topic, 2).await;
    broker.create_topic(&format!("{topic}.dlq"), 1).await;
    // Each id three times, keyed by the id: its copies run one after the other, so the first
    // completes before the next is looked up.
    broker.produce_keyed(
        &topic,
        (0..3 * IDS).map(|i| {
            let id = i % IDS;
            (
                Some(format!("id-{id}").into_bytes()),
                format!("{{\"order_id\": {id}}}").into_bytes(),
            )
        }),
    );
    let cfg = inline_config(
        &broker.bootstrap,
        &format!(
            "name = \"{name}\"\n{}\n[[processors]]\ntype = \"dedup\"\nfield = \"order_id\"\nttl = \"1h\"\n",
            pipeline_header(&topic, &group, "")
        ),
    );
    let running = Runtime::new(cfg).start().await.unwrap();
    let stats = running.stats[0].clone();
    wait_until_async(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let s = stats.snapshot();
            s.processed + s.filtered >= 3 * IDS as u64
        },
        "every message completed",
    )
    .await;
    let text = prometheus.render();
    running.shutdown().await;
    let (processed, dedup, filtered) = (
        outcome(&text, &name, "processed"),
        outcome(&text, &name, "deduplicated"),
        outcome(&text, &name, "filtered"),
    );
    println!("processed {processed:?}, deduplicated {dedup:?}, filtered {filtered:?}");
    assert_eq!(processed, Some(IDS as u64));
    assert_eq!(
        dedup,
        Some(2 * IDS as u64),
        "every duplicate counted as deduplicated"
    );
    assert_eq!(filtered, Some(0), "no duplicate counted as filtered");
}
