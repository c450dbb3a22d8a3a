//! `keyflow dlq replay`: re-publish dead-lettered messages to their source topic (from the
//! `keyflow.source.topic` header) or to a topic given, optionally filtered by error kind, time
//! range and key. `--dry-run` counts what would be sent and sends nothing.
//!
//! The replayed record carries the original key, value and headers; the `keyflow.*` headers the
//! dead-letter writer added are stripped, so a message that fails again is dead-lettered afresh
//! with up-to-date headers. The DLQ itself is read, never modified or committed: replaying twice
//! sends twice (pair it with `dedup` or idempotent side effects, or narrow it with the filters).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tracing::{info, warn};

/// What to replay and where.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    pub brokers: String,
    /// The dead-letter topic to read.
    pub dlq_topic: String,
    /// Send everything here instead of each message's source topic.
    pub to: Option<String>,
    /// Only these error kinds (`keyflow.error.kind`); empty = all.
    pub kinds: Vec<String>,
    /// Only messages dead-lettered at or after / before this time (ms since the epoch,
    /// `keyflow.time`).
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only messages with exactly this key.
    pub key: Option<String>,
    pub dry_run: bool,
    /// Extra librdkafka properties (security settings) for both clients.
    pub kafka: Vec<(String, String)>,
    /// The end of the topic is reached once every partition's high watermark was read and
    /// nothing new arrived for this long.
    pub idle: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters read.
    pub scanned: u64,
    /// Those that passed the filters (and were sent, unless dry-run).
    pub matched: u64,
    /// Matched but without a source topic header and no `--to`: not sent.
    pub no_target: u64,
    /// Per target topic.
    pub by_topic: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0:?} does not exist or has no partitions")]
    NoTopic(String),
    #[error("{failed} of {total} writes failed; first error: {first}")]
    Writes {
        failed: usize,
        total: usize,
        first: String,
    },
}

fn header<'a>(h: Option<&'a rdkafka::message::BorrowedHeaders>, name: &str) -> Option<&'a str> {
    h?.iter()
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Reads the whole dead-letter topic once and replays what matches.
pub async fn replay(o: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &o.brokers)
        .set("group.id", "keyflow-dlq-replay")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let mut pc = ClientConfig::new();
    pc.set("bootstrap.servers", &o.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all");
    for (k, v) in &o.kafka {
        cc.set(k, v);
        pc.set(k, v);
    }
    let consumer: BaseConsumer = cc.create()?;
    let producer: FutureProducer = pc.create()?;

    let md = consumer.fetch_metadata(Some(&o.dlq_topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == o.dlq_topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        return Err(ReplayError::NoTopic(o.dlq_topic.clone()));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for &p in &parts {
        let (_, high) = consumer.fetch_watermarks(&o.dlq_topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
        tpl.add_partition_offset(&o.dlq_topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;

    let mut report = ReplayReport::default();
    let mut sends = Vec::new();
    let mut read_to: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last = Instant::now();
    loop {
        let reached = ends
            .iter()
            .all(|(p, high)| *high == 0 || read_to.get(p).is_some_and(|o| o + 1 >= *high));
        let idle = last.elapsed();
        if (reached && idle >= o.idle) || idle >= o.idle * 10 {
            break;
        }
        let Some(r) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = match r {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "dlq read error");
                continue;
            }
        };
        last = Instant::now();
        read_to.insert(m.partition(), m.offset());
        report.scanned += 1;
        let h = m.headers();
        if !o.kinds.is_empty() {
            match header(h, "keyflow.error.kind") {
                Some(k) if o.kinds.iter().any(|x| x == k) => {}
                _ => continue,
            }
        }
        if o.since_ms.is_some() || o.until_ms.is_some() {
            let Some(t) = header(h, "keyflow.time").and_then(|t| t.parse::<i64>().ok()) else {
                continue;
            };
            if o.since_ms.is_some_and(|s| t < s) || o.until_ms.is_some_and(|u| t >= u) {
                continue;
            }
        }
        if let Some(k) = &o.key {
            if m.key() != Some(k.as_bytes()) {
                continue;
            }
        }
        let target = match (&o.to, header(h, "keyflow.source.topic")) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) => t.to_string(),
            (None, None) => {
                report.no_target += 1;
                continue;
            }
        };
        report.matched += 1;
        *report.by_topic.entry(target.clone()).or_default() += 1;
        if o.dry_run {
            continue;
        }
        let mut headers = OwnedHeaders::new();
        if let Some(h) = h {
            for x in h.iter().filter(|x| !x.key.starts_with("keyflow.")) {
                headers = headers.insert(Header {
                    key: x.key,
                    value: x.value,
                });
            }
        }
        let key = m.key().map(<[u8]>::to_vec);
        let payload = m.payload().map(<[u8]>::to_vec);
        let producer = producer.clone();
        sends.push(async move {
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target).headers(headers);
            if let Some(k) = key.as_deref() {
                rec = rec.key(k);
            }
            if let Some(p) = payload.as_deref() {
                rec = rec.payload(p);
            }
            producer
                .send(rec, Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| format!("write to {target:?}: {e}"))
        });
    }
    let total = sends.len();
    let errors: Vec<String> = join_all(sends)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if let Some(first) = errors.first() {
        return Err(ReplayError::Writes {
            failed: errors.len(),
            total,
            first: first.clone(),
        });
    }
    info!(?report, dry_run = o.dry_run, "dlq replay done");
    Ok(report)
}

/// `2026-11-23T21:00:00Z` (RFC 3339) or milliseconds since the epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?}: expected RFC 3339 (2026-11-23T21:00:00Z) or epoch ms ({e})"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .map_err(|e| e.to_string())
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn times() {
        assert_eq!(super::parse_time("1000").unwrap(), 1000);
        assert_eq!(super::parse_time("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert!(super::parse_time("yesterday").is_err());
    }
}
