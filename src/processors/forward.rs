//! `forward`: produce the message (key, value, headers) to another topic.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::producer::FutureRecord;
use serde::Deserialize;

use std::sync::Arc;

use super::breaker::{Breaker, BreakerConfig};
use super::{Flow, ProcessError, Processor};
use crate::gate::Gate;
use crate::kafka::client::Producer;
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// The output topic.
    pub topic: String,
    /// Pause the pipeline while the output cannot be written (see `breaker`).
    #[serde(default)]
    pub circuit_breaker: Option<BreakerConfig>,
}

impl ForwardConfig {
    pub fn validate(&self, input_topic: &str) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if self.topic.trim().is_empty() {
            v.push(("topic".into(), "expected a topic name, found \"\"".into()));
        } else if self.topic == input_topic {
            v.push((
                "topic".into(),
                format!(
                    "{:?} is the input topic: messages would loop forever",
                    self.topic
                ),
            ));
        }
        if let Some(b) = &self.circuit_breaker {
            v.extend(b.validate());
        }
        v
    }
}

/// Writes through the pipeline's idempotent producer (`acks=all`); the input message completes
/// only when the broker has acknowledged the write, so a crash can duplicate but never lose it.
/// The key is kept, so the output partition (and per-key order) follows the key.
///
/// The written headers continue the input's trace (see [`crate::trace`]). The message keeps its
/// headers for the processors after this one; when none of them reads headers
/// (`keep_headers` false, decided when the chain is built) the list is given to the producer
/// instead of copied.
pub struct Forward {
    topic: Arc<str>,
    producer: Producer,
    breaker: Option<Breaker>,
    keep_headers: bool,
    /// `delivery = "exactly_once"`: the record goes to the message's outbox, written in the
    /// pipeline's transaction once the whole chain succeeded.
    transactional: bool,
}

impl Forward {
    pub fn new(
        cfg: &ForwardConfig,
        producer: Producer,
        gate: &Arc<Gate>,
        pipeline: &str,
        keep_headers: bool,
        transactional: bool,
    ) -> Self {
        Forward {
            topic: Arc::from(cfg.topic.as_str()),
            producer,
            keep_headers,
            transactional,
            breaker: cfg.circuit_breaker.map(|b| {
                Breaker::new(b, format!("{pipeline}/forward {}", cfg.topic), gate.clone())
            }),
        }
    }

    /// Exactly-once: nothing is written yet; the record joins the outbox (no payload copy: key
    /// and payload are shared `Bytes`).
    fn stage(&self, msg: &mut Message) {
        let headers = if self.keep_headers {
            msg.headers.as_deref().map(crate::trace::continue_trace)
        } else {
            msg.take_headers().map(crate::trace::continue_trace_owned)
        };
        msg.outbox.push(crate::message::Record {
            topic: self.topic.clone(),
            partition: None,
            key: msg.key.clone(),
            payload: msg.payload.clone(),
            headers,
            timestamp_ms: msg.timestamp_ms,
        });
    }

    async fn write(&self, msg: &mut Message) -> Result<(), ProcessError> {
        // Each written message continues the input's trace under its own span id. Without
        // `keep_headers` nothing after this step reads them: they are handed over, copied only
        // if the message as consumed still shares them (it does while a retry may need them).
        let headers = if self.keep_headers {
            msg.headers.as_deref().map(crate::trace::continue_trace)
        } else {
            msg.take_headers().map(crate::trace::continue_trace_owned)
        };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic);
        if let Some(k) = msg.key.as_deref() {
            record = record.key(k);
        }
        if let Some(p) = msg.payload.as_deref() {
            record = record.payload(p);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        if let Some(ts) = msg.timestamp_ms {
            record = record.timestamp(ts);
        }
        // Queue timeout: wait for room in librdkafka's local queue rather than failing.
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(super::write_error("forward", &self.topic, &e)),
        }
    }
}

#[async_trait]
impl Processor for Forward {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        if self.transactional {
            self.stage(msg);
            return Ok(Flow::Continue);
        }
        match &self.breaker {
            Some(b) => b.call("forward", self.write(msg)).await?,
            None => self.write(msg).await?,
        }
        Ok(Flow::Continue)
    }
}
