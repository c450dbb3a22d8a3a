//! What Kafka and librdkafka accept, checked at config load: the `[kafka]` properties keyflow
//! manages or whose values its promises depend on, and the topic names a broker would refuse.
//!
//! keyflow completes a message (and may commit past it) only once its `forward`/`route` and
//! dead-letter writes are acknowledged, and promises per-key order on the output. Both rest on
//! the producer settings it makes itself (`enable.idempotence=true`, `acks=all`); a `[kafka]`
//! table may add to them but not weaken them, and the refusal says why.

use super::GroupProtocol;

/// The name librdkafka stores a property under, for matching: the `topic.` prefix stripped
/// (librdkafka strips it too) and the aliases that matter here resolved, so `acks`, `topic.acks`
/// and `request.required.acks` are one property.
fn canonical(key: &str) -> &str {
    let key = key.strip_prefix("topic.").unwrap_or(key);
    match key {
        "bootstrap.servers" => "metadata.broker.list",
        "acks" => "request.required.acks",
        "max.in.flight" => "max.in.flight.requests.per.connection",
        "retries" => "message.send.max.retries",
        "auto.commit.enable" => "enable.auto.commit",
        "max.partition.fetch.bytes" => "fetch.message.max.bytes",
        other => other,
    }
}

/// Properties keyflow sets itself, refused whatever their value, with the field to use instead.
const MANAGED: &[(&str, &str)] = &[
    ("group.id", "group_id"),
    (
        "enable.auto.commit",
        "commit_interval (keyflow commits on completion)",
    ),
    (
        "enable.auto.offset.store",
        "nothing: keyflow stores offsets on completion",
    ),
    ("auto.offset.reset", "auto_offset_reset"),
    ("session.timeout.ms", "session_timeout"),
    ("group.protocol", "group_protocol"),
    ("metadata.broker.list", "brokers (or KEYFLOW_BROKERS)"),
    (
        "queued.max.messages.kbytes",
        "memory_limit in the global file (keyflow derives librdkafka's prefetch per partition \
         from its share of the memory budget)",
    ),
    (
        "queued.min.messages",
        "memory_limit in the global file (keyflow derives librdkafka's prefetch per partition \
         from its share of the memory budget)",
    ),
    (
        "fetch.max.bytes",
        "memory_limit in the global file (keyflow derives librdkafka's prefetch per partition \
         from its share of the memory budget)",
    ),
    (
        "fetch.queue.backoff.ms",
        "nothing: keyflow sizes the partition queues from memory_limit and fetches a full one \
         again after 10 ms",
    ),
    (
        "fetch.message.max.bytes",
        "memory_limit in the global file (keyflow derives librdkafka's prefetch per partition \
         from its share of the memory budget)",
    ),
    (
        "statistics.interval.ms",
        "nothing: keyflow reads broker states from librdkafka's statistics every 2 s to end an \
         outage on /health/ready",
    ),
];

/// librdkafka's boolean spelling (`true`/`t`/`1`, `false`/`f`/`0`, any case).
fn parse_bool(v: &str) -> Option<bool> {
    let v = v.trim().to_ascii_lowercase();
    match v.as_str() {
        "true" | "t" | "1" => Some(true),
        "false" | "f" | "0" => Some(false),
        _ => None,
    }
}

/// Why keyflow refuses `key = value` in a `[kafka]` table, whatever the pipeline's protocol, or
/// `None` when it is passed on to librdkafka. Values librdkafka itself cannot parse are left to
/// librdkafka.
pub(super) fn refusal(key: &str, value: &str) -> Option<String> {
    let name = canonical(key);
    if let Some((_, instead)) = MANAGED.iter().find(|(m, _)| *m == name) {
        return Some(format!("is managed by keyflow: set {instead}"));
    }
    const WRITES: &str = "keyflow completes a message, and commits past it, only once its \
                          forward and dead-letter writes are acknowledged";
    match name {
        "request.required.acks" => {
            let v = value.trim();
            (!(v.eq_ignore_ascii_case("all") || v == "-1")).then(|| {
                format!(
                    "{value:?} is unsafe: {WRITES}, which loses nothing only with acks=all \
                     (keyflow sets it): with fewer acknowledgements a leader failure loses \
                     writes that were acknowledged; remove the setting"
                )
            })
        }
        "enable.idempotence" => (parse_bool(value) == Some(false)).then(|| {
            "false is unsafe: without the idempotent producer (keyflow enables it) a retried \
             write can be duplicated or overtake the next write of the same key, breaking \
             per-key order on the output; remove the setting"
                .to_string()
        }),
        "max.in.flight.requests.per.connection" => match value.trim().parse::<i64>() {
            Ok(n) if (1..=5).contains(&n) => None,
            Ok(n) => Some(format!(
                "{n} is unsafe: expected 1 to 5, the most the idempotent producer allows while \
                 keeping per-key order on retries"
            )),
            Err(_) => None,
        },
        "message.send.max.retries" => match value.trim().parse::<i64>() {
            Ok(n) if n < 1 => Some(format!(
                "{n} is unsafe: expected at least 1 (librdkafka's default retries until \
                 message.timeout.ms); without retries a write fails at the first transient \
                 broker error, and the idempotent producer refuses to start"
            )),
            _ => None,
        },
        "queuing.strategy" => (!value.trim().eq_ignore_ascii_case("fifo")).then(|| {
            format!(
                "{value:?} is unsafe: only \"fifo\" keeps the order in which keyflow writes, \
                 on which per-key order on the output depends; remove the setting"
            )
        }),
        "delivery.report.only.error" => (parse_bool(value) == Some(true)).then(|| {
            format!(
                "true is unsafe: {WRITES}, that is when the delivery report arrives; \
                 with only failures reported, messages whose writes succeed would never \
                 complete; remove the setting"
            )
        }),
        "partitioner" => value.trim().eq_ignore_ascii_case("random").then(|| {
            "\"random\" is unsafe: it ignores the key, so the writes of one key would spread \
             over the output partitions and per-key order on the output would be lost; use a \
             key-hashing partitioner (consistent_random, murmur2_random, fnv1a_random, ...)"
                .to_string()
        }),
        "enable.partition.eof" => (parse_bool(value) == Some(true)).then(|| {
            "true is not supported: keyflow hands no end-of-partition events to processors, \
             and each one, taken in keyflow's batched read, moves the partition's position one \
             past a message not yet received, which keyflow can only put back by pausing the \
             partition: a pause at every catch-up; remove the setting"
                .to_string()
        }),
        "transactional.id" => Some(
            "is not supported: keyflow's producer is idempotent, not transactional, and with \
             a transactional id every forward and dead-letter write would be refused"
                .to_string(),
        ),
        _ => None,
    }
}

/// Why `key` is refused under `protocol`, or `None`. Under the KIP-848 `consumer` protocol the
/// broker owns the session, heartbeat and assignment, and librdkafka refuses to create a consumer
/// that sets these.
pub(super) fn protocol_refusal(key: &str, protocol: GroupProtocol) -> Option<&'static str> {
    if protocol != GroupProtocol::Consumer {
        return None;
    }
    match canonical(key) {
        "heartbeat.interval.ms" => Some(
            "does not apply under group_protocol = \"consumer\": the heartbeat interval is set \
             on the broker (group.consumer.heartbeat.interval.ms), and librdkafka refuses it",
        ),
        "partition.assignment.strategy" => Some(
            "does not apply under group_protocol = \"consumer\": the broker assigns partitions; \
             choose its assignor with \"group.remote.assignor\" (uniform or range)",
        ),
        "group.protocol.type" => {
            Some("does not apply under group_protocol = \"consumer\", and librdkafka refuses it")
        }
        _ => None,
    }
}

/// The properties librdkafka marks *sensitive* (`_RK_SENSITIVE` in `rdkafka_conf.c`, librdkafka
/// 2.12: the ones its own configuration dumps print as `[redacted]`). Their values, and those of
/// any property whose name says password, secret or passphrase, are blanked out of everything
/// keyflow shows: client error reasons (logs, `/health/ready`, the start error) and, in the
/// binary, every log line ([`redact`]). librdkafka also marks `sasl.username`; keyflow shows it
/// on purpose: it names rather than authenticates, "wrong user" must be diagnosable, and blanking
/// a short name such as "keyflow" out of every line would mangle the log.
pub const SENSITIVE: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.ca.pem",
    "ssl.keystore.password",
];

/// Whether the value of `key` must never be shown: librdkafka's [`SENSITIVE`] list, plus any
/// name containing `password`, `secret` or `passphrase` (newer librdkafka properties, and the
/// same words in a `[kafka]` table of a future version).
/// librdkafka needs `receive.message.max.bytes` ≥ `fetch.max.bytes` + 512 when the user sets
/// it, and keyflow's `fetch.max.bytes` is never below `message.max.bytes` (which librdkafka
/// requires too): so a set `receive.message.max.bytes` below `message.max.bytes` + 512 could only
/// fail when the consumer is made, after the brokers answered, naming a property the user never
/// set. Refused at load instead.
pub fn size_conflict(kafka: &[(String, String)]) -> Option<String> {
    let get = |key: &str| {
        kafka
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.trim().parse::<u64>().ok())
    };
    let receive = get("receive.message.max.bytes")?;
    let message = get("message.max.bytes").unwrap_or(1_000_000);
    (receive < message + 512).then(|| {
        format!(
            "expected at least message.max.bytes + 512 = {} (librdkafka reads whole fetch responses of up to that size), found {receive}",
            message + 512
        )
    })
}

pub fn is_sensitive(key: &str) -> bool {
    let k = canonical(key).to_ascii_lowercase();
    SENSITIVE.contains(&k.as_str())
        || ["password", "secret", "passphrase"]
            .iter()
            .any(|w| k.contains(w))
}

/// The strings to blank out for a `[kafka]` table: every sensitive value, and the parts of one
/// that may be echoed alone (each line of a PEM, the value of a `…secret=`/`…password=`/
/// `…token=` entry of `sasl.oauthbearer.config`). Longest first, so that a secret containing
/// another is blanked whole.
pub fn secret_values(kafka: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (k, v) in kafka.iter().filter(|(k, _)| is_sensitive(k)) {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        out.push(v.to_string());
        // PEM bodies: a reason or a JSON log line may carry one line of it (JSON escapes the
        // newlines, so the whole value never matches there).
        out.extend(
            v.lines()
                .map(str::trim)
                .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                .map(str::to_string),
        );
        if canonical(k) == "sasl.oauthbearer.config" {
            out.extend(v.split_whitespace().filter_map(|kv| {
                let (name, value) = kv.split_once('=')?;
                let name = name.to_ascii_lowercase();
                (["secret", "password", "token"]
                    .iter()
                    .any(|w| name.contains(w))
                    && !value.is_empty())
                .then(|| value.to_string())
            }));
        }
    }
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out.dedup();
    out
}

/// `text` with every secret value replaced by `***`. Allocates only when a secret occurs.
pub fn redact<'a>(text: &'a str, secrets: &[String]) -> std::borrow::Cow<'a, str> {
    let mut out = std::borrow::Cow::Borrowed(text);
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if out.contains(s.as_str()) {
            out = std::borrow::Cow::Owned(out.replace(s.as_str(), "***"));
        }
    }
    out
}

/// What Kafka accepts as a topic name (`org.apache.kafka.common.internals.Topic`).
pub const TOPIC_NAME_RULE: &str =
    "a Kafka topic name is 1 to 249 characters from [A-Za-z0-9._-], and not \".\" or \"..\"";

/// Why a broker would refuse `name` as a topic, or `None` if it is a legal name.
pub fn topic_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some(format!(
            "expected a topic name, found \"\": {TOPIC_NAME_RULE}"
        ));
    }
    if name == "." || name == ".." {
        return Some(format!(
            "{name:?} is not a valid topic name: {TOPIC_NAME_RULE}"
        ));
    }
    if let Some((at, c)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "{name:?} is not a valid topic name: {c:?} at byte {at}; {TOPIC_NAME_RULE}"
        ));
    }
    // Only ASCII is left, so bytes are characters.
    if name.len() > 249 {
        return Some(format!(
            "{name:?} is not a valid topic name: {} characters; {TOPIC_NAME_RULE}",
            name.len()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_max_below_the_message_max_is_refused() {
        let kv = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(size_conflict(&kv(&[])), None);
        assert_eq!(
            size_conflict(&kv(&[("receive.message.max.bytes", "10485760")])),
            None
        );
        let why = size_conflict(&kv(&[("receive.message.max.bytes", "999999")])).unwrap();
        assert!(why.contains("1000512") && why.contains("999999"), "{why}");
        assert!(size_conflict(&kv(&[
            ("message.max.bytes", "20000000"),
            ("receive.message.max.bytes", "10485760"),
        ]))
        .is_some());
    }

    #[test]
    fn topic_names_kafka_accepts_and_refuses() {
        for ok in ["orders", "a", "order.created-v2_x", "..a", &"x".repeat(249)] {
            assert_eq!(topic_name_error(ok), None, "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "a!",
            "\u{0}",
            "é",
            "a/b",
            &"x".repeat(250),
        ] {
            let e = topic_name_error(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(e.contains(TOPIC_NAME_RULE), "{e}");
        }
        assert_eq!(
            topic_name_error("a b").unwrap(),
            format!("\"a b\" is not a valid topic name: ' ' at byte 1; {TOPIC_NAME_RULE}")
        );
    }

    #[test]
    fn producer_safety_values() {
        for (k, v) in [
            ("acks", "1"),
            ("acks", "0"),
            ("request.required.acks", "1"),
            ("topic.acks", "1"),
            ("enable.idempotence", "false"),
            ("enable.idempotence", "0"),
            ("max.in.flight.requests.per.connection", "6"),
            ("max.in.flight", "1000"),
            ("retries", "0"),
            ("message.send.max.retries", "0"),
            ("queuing.strategy", "lifo"),
            ("delivery.report.only.error", "true"),
            ("transactional.id", "t"),
            ("bootstrap.servers", "x:1"),
            ("metadata.broker.list", "x:1"),
            ("auto.commit.enable", "true"),
            ("topic.auto.offset.reset", "latest"),
            ("group.protocol", "consumer"),
            // Review findings: a key-blind partitioner breaks per-key order on the output; a
            // bigger prefetch lifts the memory bound; statistics off blinds outage readiness.
            ("partitioner", "random"),
            ("topic.partitioner", "random"),
            ("queued.max.messages.kbytes", "2097151"),
            ("statistics.interval.ms", "0"),
            // The prefetch comes from memory_limit: each property and its alias (review M2).
            ("queued.min.messages", "100000"),
            ("fetch.max.bytes", "52428800"),
            ("max.partition.fetch.bytes", "1048576"),
            ("fetch.message.max.bytes", "1048576"),
            ("fetch.queue.backoff.ms", "1000"),
            ("enable.partition.eof", "true"),
        ] {
            assert!(refusal(k, v).is_some(), "{k} = {v} accepted");
        }
        for (k, v) in [
            ("acks", "all"),
            ("acks", "-1"),
            ("acks", "ALL"),
            ("enable.idempotence", "true"),
            ("max.in.flight", "5"),
            ("max.in.flight.requests.per.connection", "1"),
            ("retries", "3"),
            ("queuing.strategy", "fifo"),
            ("delivery.report.only.error", "false"),
            ("enable.gapless.guarantee", "true"),
            ("message.timeout.ms", "60000"),
            ("isolation.level", "read_uncommitted"),
            ("security.protocol", "SASL_SSL"),
            ("partitioner", "murmur2_random"),
            ("partitioner", "consistent_random"),
            ("topic.partitioner", "fnv1a"),
            ("enable.partition.eof", "false"),
        ] {
            assert_eq!(refusal(k, v), None, "{k} = {v} refused");
        }
    }

    #[test]
    fn consumer_protocol_refuses_what_librdkafka_refuses() {
        for k in [
            "heartbeat.interval.ms",
            "partition.assignment.strategy",
            "group.protocol.type",
        ] {
            assert!(
                protocol_refusal(k, GroupProtocol::Consumer).is_some(),
                "{k}"
            );
            assert_eq!(protocol_refusal(k, GroupProtocol::Classic), None, "{k}");
        }
        assert_eq!(
            protocol_refusal("group.remote.assignor", GroupProtocol::Consumer),
            None
        );
    }
}
