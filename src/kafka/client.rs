//! Client construction: keyflow's settings first, then the user's `[kafka]` tables verbatim.

use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

use super::context::KeyflowContext;
use crate::config::{GroupProtocol, PipelineSpec};
use crate::memory::Prefetch;

/// The consumer: a `BaseConsumer`, polled on a dedicated thread (see `actors::coordinator`) so
/// that the rebalance callback may block while partitions drain without stalling the runtime.
pub type Consumer = BaseConsumer<KeyflowContext>;
/// Shared by `forward` processors and the dead-letter writer of a pipeline. Cloning is cheap.
pub type Producer = FutureProducer;

fn apply_user(cfg: &mut ClientConfig, kafka: &[(String, String)]) {
    for (k, v) in kafka {
        cfg.set(k, v);
    }
}

pub fn consumer_config(brokers: &str, spec: &PipelineSpec, prefetch: Prefetch) -> ClientConfig {
    // librdkafka refuses a `fetch.max.bytes` it did not choose below `message.max.bytes`, and a
    // user's `receive.message.max.bytes` below `fetch.max.bytes` + 512 (one it chose itself it
    // raises); `config` refuses a `receive.message.max.bytes` below `message.max.bytes` + 512.
    let message_max = user_bytes(&spec.kafka, "message.max.bytes").unwrap_or(1_000_000);
    let mut fetch_max = prefetch.fetch_max_bytes.max(message_max);
    if let Some(receive_max) = user_bytes(&spec.kafka, "receive.message.max.bytes") {
        fetch_max = fetch_max
            .min(receive_max.saturating_sub(512))
            .max(message_max);
    }
    let partition_fetch = prefetch.partition_fetch_bytes().min(fetch_max);
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", &spec.group_id)
        .set("client.id", format!("keyflow-{}", spec.name))
        .set("auto.offset.reset", spec.auto_offset_reset.as_librdkafka())
        .set("group.protocol", spec.group_protocol.as_librdkafka());
    match spec.group_protocol {
        GroupProtocol::Classic => {
            let session_ms = spec.session_timeout.as_millis().max(1);
            cfg.set("session.timeout.ms", session_ms.to_string())
                // Heartbeat well within the session even when tests set it low.
                .set(
                    "heartbeat.interval.ms",
                    (session_ms / 3).clamp(100, 3000).to_string(),
                )
                // Cooperative: a rebalance moves only the partitions that change owner.
                .set("partition.assignment.strategy", "cooperative-sticky");
        }
        // KIP-848: the broker owns the session, the heartbeat and the assignment (always
        // incremental), and librdkafka refuses a consumer that sets any of the three.
        GroupProtocol::Consumer => {}
    }
    // keyflow commits explicitly: only offsets whose messages (and all before) completed.
    cfg.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Broker connection states for readiness: a broker UP again ends an outage.
        .set("statistics.interval.ms", "2000")
        // librdkafka's prefetch per partition queue, from the pipeline's part of the memory
        // budget (see `memory`): payload bytes, a message count (small messages cost more than
        // their payload), and the size of one partition's fetch response, by which a queue may
        // overshoot the first two.
        .set("queued.max.messages.kbytes", prefetch.kbytes().to_string())
        // A queue at its threshold is looked at again after this, not librdkafka's 1 s: with
        // queues sized from the budget, one fetch response fills one, and a 1 s wait would cap
        // a backlog at one fetch per partition per second.
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string())
        .set(
            "queued.min.messages",
            prefetch.messages_per_partition.to_string(),
        )
        .set("max.partition.fetch.bytes", partition_fetch.to_string())
        .set("fetch.max.bytes", fetch_max.to_string());
    apply_user(&mut cfg, &spec.kafka);
    cfg
}

/// `fetch.queue.backoff.ms`: how soon librdkafka fetches again for a partition whose queue was
/// full (its default, 1,000 ms, is meant for large queues).
pub const FETCH_QUEUE_BACKOFF_MS: u64 = 10;

/// A byte count the `[kafka]` table sets (its last value), if it parses.
fn user_bytes(kafka: &[(String, String)], key: &str) -> Option<u64> {
    kafka
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
}

pub fn producer_config(brokers: &str, spec: &PipelineSpec) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("client.id", format!("keyflow-{}-producer", spec.name))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000");
    // Consumer-only keys in the shared [kafka] table would make librdkafka warn on a producer.
    let shared: Vec<(String, String)> = spec
        .kafka
        .iter()
        .filter(|(k, _)| !is_consumer_only(k))
        .cloned()
        .collect();
    apply_user(&mut cfg, &shared);
    cfg
}

fn is_consumer_only(key: &str) -> bool {
    matches!(
        key,
        "partition.assignment.strategy"
            | "heartbeat.interval.ms"
            | "max.poll.interval.ms"
            | "fetch.min.bytes"
            | "fetch.max.bytes"
            | "fetch.wait.max.ms"
            | "max.partition.fetch.bytes"
            | "fetch.message.max.bytes"
            | "fetch.queue.backoff.ms"
            | "queued.min.messages"
            | "queued.max.messages.kbytes"
            | "isolation.level"
            | "group.remote.assignor"
            | "group.instance.id"
            | "check.crcs"
    )
}

pub fn create_consumer(
    brokers: &str,
    spec: &PipelineSpec,
    prefetch: Prefetch,
    ctx: KeyflowContext,
) -> KafkaResult<Arc<Consumer>> {
    let consumer: Consumer = consumer_config(brokers, spec, prefetch).create_with_context(ctx)?;
    let consumer = Arc::new(consumer);
    consumer.context().set_consumer(Arc::downgrade(&consumer));
    Ok(consumer)
}

pub fn create_producer(brokers: &str, spec: &PipelineSpec) -> KafkaResult<Producer> {
    producer_config(brokers, spec).create()
}

/// The offset librdkafka's consumer takes next from this partition (past the control records
/// of transactions, which the application never sees): a local lookup. `None` until something
/// was consumed from it since the assignment.
pub fn position(consumer: &Consumer, topic: &str, partition: i32) -> Option<i64> {
    use rdkafka::consumer::Consumer as _;
    let mut tpl = rdkafka::TopicPartitionList::with_capacity(1);
    tpl.add_partition(topic, partition);
    // SAFETY: the client pointer is valid while `consumer` is borrowed; `tpl` is a valid list
    // that librdkafka fills in place.
    let err =
        unsafe { rdkafka::bindings::rd_kafka_position(consumer.client().native_ptr(), tpl.ptr()) };
    if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return None;
    }
    tpl.find_partition(topic, partition)?
        .offset()
        .to_raw()
        .filter(|o| *o >= 0)
}

/// The high watermark librdkafka last saw in a fetch response for this partition: a local
/// lookup, no broker round trip (unlike `fetch_watermarks`), so metrics can read it every tick.
/// `None` until a fetch response has arrived; kept while the partition is paused and across a
/// reassignment (it moves only with fetch responses).
pub fn cached_high_watermark(consumer: &Consumer, topic: &str, partition: i32) -> Option<i64> {
    use rdkafka::consumer::Consumer as _;
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` is borrowed; the topic is a valid
    // NUL-terminated string for the call; low/high are valid out-pointers.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_pipeline, Env, Global};

    /// A pipeline with `top` fields and a `[kafka]` table of `kafka` lines.
    fn spec(top: &str, kafka: &str) -> PipelineSpec {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("orders.toml");
        std::fs::write(
            &p,
            format!("{top}\ntopic = \"orders\"\nauto_offset_reset = \"earliest\"\n[[processors]]\ntype = \"log\"\n[kafka]\n{kafka}\n"),
        )
        .unwrap();
        load_pipeline(&p, &Global::default(), &Env::default()).unwrap()
    }

    fn prefetch() -> Prefetch {
        crate::memory::PipelineMemory::new(256 << 20, 1, 64 << 20).prefetch_for(Some(8))
    }

    #[test]
    fn prefetch_comes_from_the_memory_share() {
        let s = spec("", "");
        let cfg = consumer_config("b:9092", &s, prefetch());
        // 32 MiB of useful prefetch over 8 partitions.
        // Half queued, half for the fetch response that may land on a queue just below it,
        // fetched in halves of that (small records cost librdkafka ~4× their wire size).
        assert_eq!(cfg.get("queued.max.messages.kbytes"), Some("2048"));
        assert_eq!(cfg.get("max.partition.fetch.bytes"), Some("1048576"));
        assert_eq!(cfg.get("queued.min.messages"), Some("8192"));
        assert_eq!(cfg.get("fetch.max.bytes"), Some("4194304"));
        // A full queue is fetched again within 10 ms, not librdkafka's 1 s (review H1).
        assert_eq!(cfg.get("fetch.queue.backoff.ms"), Some("10"));
        // Never below message.max.bytes, which librdkafka requires.
        let small =
            crate::memory::PipelineMemory::new(256 << 20, 1, 64 << 20).prefetch_for(Some(64));
        let cfg = consumer_config("b:9092", &s, small);
        assert_eq!(cfg.get("fetch.max.bytes"), Some("1000000"));
        let c: rdkafka::error::KafkaResult<BaseConsumer> = cfg.create();
        assert!(c.is_ok(), "{:?}", c.err());
        let c: rdkafka::error::KafkaResult<BaseConsumer> = cfg.create();
        assert!(c.is_ok(), "{:?}", c.err());
    }

    /// Review M2b: a `message.max.bytes` above 99,999,488 made keyflow set a `fetch.max.bytes`
    /// below it, which librdkafka refuses (it adjusts only a value it chose itself).
    #[test]
    fn a_large_message_max_bytes_still_creates_the_consumer() {
        let s = spec("", "\"message.max.bytes\" = \"200000000\"");
        let cfg = consumer_config("b:9092", &s, prefetch());
        let c: rdkafka::error::KafkaResult<BaseConsumer> = cfg.create();
        assert!(c.is_ok(), "{:?}", c.err());
    }

    /// Review M2c: a user's `receive.message.max.bytes` must stay ≥ `fetch.max.bytes` + 512,
    /// which a few-partition topic's prefetch (a large `fetch.max.bytes`) broke: the consumer
    /// failed after the brokers had answered, naming a property the user never set.
    #[test]
    fn a_user_receive_message_max_bytes_bounds_fetch_max_bytes() {
        let s = spec("", "\"receive.message.max.bytes\" = \"10485760\"");
        let one = crate::memory::PipelineMemory::new(256 << 20, 1, 64 << 20).prefetch_for(Some(1));
        let cfg = consumer_config("b:9092", &s, one);
        let c: rdkafka::error::KafkaResult<BaseConsumer> = cfg.create();
        assert!(c.is_ok(), "{:?}", c.err());
        let fetch: u64 = cfg.get("fetch.max.bytes").unwrap().parse().unwrap();
        let partition: u64 = cfg
            .get("max.partition.fetch.bytes")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            fetch + 512 <= 10485760 && partition <= fetch,
            "{fetch} {partition}"
        );
    }

    const CLASSIC_ONLY: [&str; 3] = [
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "partition.assignment.strategy",
    ];

    #[test]
    fn classic_consumer_sets_session_heartbeat_and_cooperative_assignor() {
        let cfg = consumer_config(
            "b:9092",
            &spec("session_timeout = \"6s\"\ndrain_timeout = \"2s\"", ""),
            prefetch(),
        );
        assert_eq!(cfg.get("group.protocol"), Some("classic"));
        assert_eq!(cfg.get("session.timeout.ms"), Some("6000"));
        assert_eq!(cfg.get("heartbeat.interval.ms"), Some("2000"));
        assert_eq!(
            cfg.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(cfg.get("enable.auto.commit"), Some("false"));
        let c: rdkafka::error::KafkaResult<BaseConsumer> = cfg.create();
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn consumer_protocol_sets_none_of_what_librdkafka_refuses() {
        let s = spec("group_protocol = \"consumer\"", "");
        let cfg = consumer_config("b:9092", &s, prefetch());
        assert_eq!(cfg.get("group.protocol"), Some("consumer"));
        for k in CLASSIC_ONLY {
            assert_eq!(cfg.get(k), None, "{k} is set under the consumer protocol");
        }
        assert_eq!(cfg.get("enable.auto.commit"), Some("false"));
        assert_eq!(cfg.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(cfg.get("group.id"), Some("keyflow-orders"));
        // librdkafka agrees: the configuration creates a consumer (no broker needed)...
        let c: rdkafka::error::KafkaResult<BaseConsumer> = cfg.create();
        assert!(c.is_ok(), "{:?}", c.err());
        // ...and would not with any of the classic-only settings.
        for k in CLASSIC_ONLY {
            let mut bad = cfg.clone();
            bad.set(k, if k.ends_with(".ms") { "3000" } else { "range" });
            let c: rdkafka::error::KafkaResult<BaseConsumer> = bad.create();
            assert!(
                c.is_err(),
                "librdkafka accepted {k} under the consumer protocol"
            );
        }
    }

    #[test]
    fn producer_keeps_idempotence_and_acks_all() {
        let s = spec(
            "",
            "\"group.remote.assignor\" = \"uniform\"\n\"max.in.flight\" = 5",
        );
        let cfg = producer_config("b:9092", &s);
        assert_eq!(cfg.get("enable.idempotence"), Some("true"));
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("max.in.flight"), Some("5"));
        assert_eq!(cfg.get("group.remote.assignor"), None);
    }
}
