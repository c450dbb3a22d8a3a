//! Processors: the [`Processor`] trait users implement, and the built-ins chosen by name in a
//! pipeline file (`[[processors]] type = "…"`), run in file order.

pub mod batch;
pub mod breaker;
pub mod decode;
pub mod dedup;
pub mod filter;
pub mod forward;
pub mod http;
pub mod json;
pub mod log;
pub mod route;
pub mod simulate;
pub mod sql;
pub mod transform;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::kafka::client::Producer;
use crate::message::Message;

/// What a processor decided about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Pass the message to the next processor (or complete it after the last one).
    Continue,
    /// Stop here: the message is complete and nothing further runs (a filter).
    Drop,
    /// Stop here: the message duplicates one already completed (`dedup`). Like `Drop`, but
    /// counted as `deduplicated`.
    Duplicate,
}

/// A processing failure. Retryable errors (a timeout, a 5xx) are retried with backoff; the others
/// (a decode error, a 4xx) go to the dead-letter topic at once.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ProcessError {
    retryable: bool,
    kind: &'static str,
    message: String,
    /// Set by an open circuit breaker: the downstream is known to be down, so this is not an
    /// attempt of the message; run it again after this wait.
    not_attempted: Option<std::time::Duration>,
}

impl ProcessError {
    pub fn retryable(kind: &'static str, message: impl Into<String>) -> Self {
        ProcessError {
            retryable: true,
            kind,
            message: message.into(),
            not_attempted: None,
        }
    }
    pub fn permanent(kind: &'static str, message: impl Into<String>) -> Self {
        ProcessError {
            retryable: false,
            kind,
            message: message.into(),
            not_attempted: None,
        }
    }
    /// The call was not made (an open circuit breaker): retry after `wait` without counting an
    /// attempt, so an outage never uses up a message's attempts.
    pub fn not_attempted(kind: &'static str, wait: std::time::Duration) -> Self {
        ProcessError {
            retryable: true,
            kind,
            message: format!("circuit open; next try in {wait:?}"),
            not_attempted: Some(wait),
        }
    }
    /// `Some(wait)` if the call was not attempted (see [`ProcessError::not_attempted`]).
    pub fn not_attempted_wait(&self) -> Option<std::time::Duration> {
        self.not_attempted
    }
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
    /// A short, bounded name (`forward`, `decode`…) fit for a metric label or DLQ header.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A failed write to Kafka (`forward`, `route`) as a [`ProcessError`] of `kind`.
///
/// Permanent when this record can never be written however often it is retried, while other
/// records can: its size (above the producer's `message.max.bytes` or the topic's
/// `max.message.bytes`), a record the broker refuses as invalid (`InvalidRecord`: e.g. no key
/// on a compacted topic), a timestamp outside the topic's accepted range. Retrying those only
/// delays the dead letter.
///
/// Everything else stays retryable, including errors that are not transient but fail every
/// record alike (`TopicAuthorizationFailed`, `InvalidTopic`, an unknown topic, a broker outage):
/// they are faults of the pipeline, not of the message, fixed by an operator. Declaring them
/// permanent would dead-letter the whole stream while they last; retryable, they use the retry
/// budget and, with a `circuit_breaker`, pause the pipeline until fixed.
pub fn write_error(
    kind: &'static str,
    topic: &str,
    e: &rdkafka::error::KafkaError,
) -> ProcessError {
    use rdkafka::types::RDKafkaErrorCode as C;
    let message = format!("write to {topic:?} failed: {e}");
    match e.rdkafka_error_code() {
        Some(C::InvalidRecord | C::InvalidTimestamp) => ProcessError::permanent(kind, message),
        _ if too_large(e) => ProcessError::permanent(kind, message),
        _ => ProcessError::retryable(kind, message),
    }
}

/// The record is too large to be written: librdkafka refused it locally (its size above the
/// producer's `message.max.bytes`; librdkafka reports the broker's code for this) or the broker
/// did (above the topic's `max.message.bytes`).
pub fn too_large(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge)
    )
}

/// One step of a pipeline. Implement it for your own logic and pass it to
/// [`crate::runtime::Runtime::with_processor`].
///
/// A processor may be called concurrently for different messages, and again for the same message
/// after a retry or a worker restart (at-least-once): make side effects idempotent.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError>;

    /// Called once the whole chain has processed `msg` (the message as consumed), before its
    /// offset completes. `dedup` records the business id here, so a failed attempt is never
    /// mistaken for a completed one.
    fn completed(&self, _msg: &Message) {}

    /// This processor as a [`batch::BatchProcessor`], if it takes batches. A pipeline with a
    /// `[batch]` table runs its last processor through it (override it to return `Some(self)`).
    fn as_batch(&self) -> Option<&dyn batch::BatchProcessor> {
        None
    }

    /// Called once the whole chain has processed `msg` and its writes succeeded (under
    /// `exactly_once`: written in the open transaction), before its completion reaches the
    /// supervisor, so before the next message of its key starts. Not deferred to the commit as
    /// [`Processor::completed`] is: a stateful processor applies its key's change here (an
    /// aborted transaction rewinds and restores the state from the changelog).
    fn written(&self, _msg: &Message) {}

    /// Called once when the chain is built, with the pipeline's per-key state store (`None`
    /// without a `[state]` table). A processor that needs state refuses `None`.
    fn bind_state(&self, _store: Option<&Arc<crate::state::Store>>) -> Result<(), String> {
        Ok(())
    }
}

/// The built-in processors, selected by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProcessorConfig {
    /// Produce the message to another topic; completes when the write is acknowledged.
    Forward(forward::ForwardConfig),
    /// Log each message.
    Log(log::LogConfig),
    /// Sleep for a sampled latency and fail at a configured rate (demos, tests, benchmarks).
    Simulate(simulate::SimulateConfig),
    /// A processor registered in code under this name (`Runtime::with_processor`).
    Custom(CustomConfig),
    /// Parse the value as JSON, optionally checking a JSON Schema (permanent errors).
    Decode(decode::DecodeConfig),
    /// Parse the value as JSON and check it against a JSON Schema file (required).
    Validate(decode::DecodeConfig),
    /// Keep or drop by a JMESPath expression.
    Filter(filter::FilterConfig),
    /// Set, rename, remove fields; build the output key.
    Transform(transform::TransformConfig),
    /// Produce to the topics whose expression matches (fan-out).
    Route(route::RouteConfig),
    /// Call an HTTP downstream.
    Http(http::HttpConfig),
    /// Drop a message whose business id already completed within a TTL.
    Dedup(dedup::DedupConfig),
    /// Run a statement per message in PostgreSQL, exactly once (a read model).
    Sql(sql::SqlConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomConfig {
    pub name: String,
}

impl ProcessorConfig {
    /// Cross-field checks; returns `(field, message)` pairs. Relative file paths (schemas) are
    /// resolved against `base`, the pipeline file's directory.
    pub fn validate(&mut self, input_topic: &str, base: &std::path::Path) -> Vec<(String, String)> {
        match self {
            ProcessorConfig::Forward(c) => c.validate(input_topic),
            ProcessorConfig::Simulate(c) => c.validate(),
            ProcessorConfig::Log(_) | ProcessorConfig::Custom(_) => Vec::new(),
            ProcessorConfig::Decode(c) => c.validate(base, false),
            ProcessorConfig::Validate(c) => c.validate(base, true),
            ProcessorConfig::Filter(c) => c.validate(),
            ProcessorConfig::Transform(c) => c.validate(),
            ProcessorConfig::Route(c) => c.validate(input_topic),
            ProcessorConfig::Http(c) => c.validate(),
            ProcessorConfig::Dedup(c) => c.validate(),
            ProcessorConfig::Sql(c) => c.validate(base),
        }
    }

    /// Whether this processor may read a message's headers (so an earlier `forward` must leave
    /// them on the message). Custom processors may.
    pub fn reads_headers(&self) -> bool {
        match self {
            ProcessorConfig::Forward(_)
            | ProcessorConfig::Route(_)
            | ProcessorConfig::Http(_)
            | ProcessorConfig::Filter(_)
            | ProcessorConfig::Custom(_) => true,
            ProcessorConfig::Dedup(c) => c.header.is_some(),
            ProcessorConfig::Log(_)
            | ProcessorConfig::Simulate(_)
            | ProcessorConfig::Decode(_)
            | ProcessorConfig::Validate(_)
            | ProcessorConfig::Transform(_)
            | ProcessorConfig::Sql(_) => false,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            ProcessorConfig::Forward(_) => "forward",
            ProcessorConfig::Log(_) => "log",
            ProcessorConfig::Simulate(_) => "simulate",
            ProcessorConfig::Custom(_) => "custom",
            ProcessorConfig::Decode(_) => "decode",
            ProcessorConfig::Validate(_) => "validate",
            ProcessorConfig::Filter(_) => "filter",
            ProcessorConfig::Transform(_) => "transform",
            ProcessorConfig::Route(_) => "route",
            ProcessorConfig::Http(_) => "http",
            ProcessorConfig::Dedup(_) => "dedup",
            ProcessorConfig::Sql(_) => "sql",
        }
    }
}

/// What building a processor may need.
pub struct BuildContext<'a> {
    pub producer: &'a Producer,
    pub custom: &'a dyn Fn(&str) -> Option<Arc<dyn Processor>>,
    /// The pipeline's gate, held by open circuit breakers.
    pub gate: &'a Arc<crate::gate::Gate>,
    /// The pipeline's name (logs).
    pub pipeline: &'a str,
    /// `delivery = "exactly_once"`: `forward` and `route` stage their records in the message's
    /// outbox instead of writing them.
    pub transactional: bool,
}

/// Binds every processor of a chain to the pipeline's state store (`None`: no `[state]`).
pub fn bind_state(
    chain: &[Arc<dyn Processor>],
    store: Option<&Arc<crate::state::Store>>,
) -> Result<(), String> {
    for (i, p) in chain.iter().enumerate() {
        p.bind_state(store)
            .map_err(|e| format!("processors[{i}]: {e}"))?;
    }
    Ok(())
}

/// Builds the processor chain of a pipeline.
pub fn build_chain(
    configs: &[ProcessorConfig],
    ctx: &BuildContext<'_>,
) -> Result<Vec<Arc<dyn Processor>>, String> {
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| -> Result<Arc<dyn Processor>, String> {
            Ok(match c {
                ProcessorConfig::Forward(f) => Arc::new(forward::Forward::new(
                    f,
                    ctx.producer.clone(),
                    ctx.gate,
                    ctx.pipeline,
                    configs[i + 1..].iter().any(ProcessorConfig::reads_headers),
                    ctx.transactional,
                )),
                ProcessorConfig::Log(l) => Arc::new(log::Log::new(l)),
                ProcessorConfig::Simulate(s) => Arc::new(simulate::Simulate::new(s)),
                ProcessorConfig::Custom(c) => (ctx.custom)(&c.name).ok_or_else(|| {
                    format!(
                        "processors[{i}]: no custom processor named {:?} is registered",
                        c.name
                    )
                })?,
                ProcessorConfig::Decode(c) | ProcessorConfig::Validate(c) => Arc::new(
                    decode::Decode::new(c).map_err(|e| format!("processors[{i}].schema: {e}"))?,
                ),
                ProcessorConfig::Filter(c) => Arc::new(
                    filter::Filter::new(c)
                        .map_err(|e| format!("processors[{i}].expression: {e}"))?,
                ),
                ProcessorConfig::Transform(c) => Arc::new(transform::Transform::new(c)),
                ProcessorConfig::Route(c) => Arc::new(
                    route::Route::new(c, ctx.producer.clone(), ctx.transactional)
                        .map_err(|e| format!("processors[{i}].routes: {e}"))?,
                ),
                ProcessorConfig::Http(c) => Arc::new(
                    http::Http::new(c, ctx.gate, ctx.pipeline)
                        .map_err(|e| format!("processors[{i}]: {e}"))?,
                ),
                ProcessorConfig::Dedup(c) => Arc::new(dedup::Dedup::new(c)),
                ProcessorConfig::Sql(c) => Arc::new(
                    sql::Sql::new(c, ctx.gate, ctx.pipeline)
                        .map_err(|e| format!("processors[{i}]: {e}"))?,
                ),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn write_errors_that_cannot_succeed_on_retry_are_permanent() {
        for (code, retryable) in [
            (C::MessageSizeTooLarge, false),
            (C::MessageBatchTooLarge, false),
            (C::InvalidRecord, false),
            (C::InvalidTimestamp, false),
            // Pipeline-wide faults an operator fixes: retried (and paused by a breaker),
            // never a reason to dead-letter the whole stream.
            (C::TopicAuthorizationFailed, true),
            (C::InvalidTopic, true),
            (C::UnknownTopicOrPartition, true),
            (C::MessageTimedOut, true),
            (C::QueueFull, true),
            (C::NotEnoughReplicas, true),
        ] {
            let e = super::write_error("forward", "out", &KafkaError::MessageProduction(code));
            assert_eq!(e.is_retryable(), retryable, "{code:?}: {e}");
            assert!(e.message().contains("\"out\""), "{e}");
        }
        assert!(super::write_error("forward", "out", &KafkaError::Canceled).is_retryable());
    }
}
