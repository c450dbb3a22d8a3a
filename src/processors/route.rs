//! `route`: choose the output topic(s) by expression. Every route whose `when` (JMESPath, over
//! the same document as `filter`) is truthy receives the message — one message can fan out to
//! several topics; the writes run concurrently and the message completes once all are
//! acknowledged. With no match it goes to `default`, or is dropped (`filtered`) if there is none.
//!
//! ```toml
//! [[processors]]
//! type = "route"
//! default = "order.unrouted"             # optional
//! routes = [
//!   { when = "value.total > `0`", topic = "payment.requested" },
//!   { when = "length(value.items) > `0`", topic = "inventory.reserve" },
//! ]
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::producer::FutureRecord;
use serde::Deserialize;

use super::{json, Flow, ProcessError, Processor};
use crate::kafka::client::Producer;
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub routes: Vec<RouteRule>,
    #[serde(default)]
    pub default: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    pub when: String,
    pub topic: String,
}

impl RouteConfig {
    pub fn validate(&self, input_topic: &str) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if self.routes.is_empty() {
            v.push((
                "routes".into(),
                "expected at least one route, found none".into(),
            ));
        }
        let topics = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("routes[{i}].topic"), &r.topic))
            .chain(self.default.iter().map(|t| ("default".to_string(), t)));
        for (field, t) in topics {
            if t.trim().is_empty() {
                v.push((field, "expected a topic name, found \"\"".into()));
            } else if t == input_topic {
                v.push((
                    field,
                    format!("{t:?} is the input topic: messages would loop forever"),
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Err(e) = json::compile(&r.when) {
                v.push((format!("routes[{i}].when"), e));
            }
        }
        v
    }
}

pub struct Route {
    routes: Vec<(jmespath::Expression<'static>, Arc<str>)>,
    default: Option<Arc<str>>,
    producer: Producer,
    /// `delivery = "exactly_once"`: records go to the message's outbox (see `forward`).
    transactional: bool,
}

impl Route {
    pub fn new(cfg: &RouteConfig, producer: Producer, transactional: bool) -> Result<Self, String> {
        Ok(Route {
            routes: cfg
                .routes
                .iter()
                .map(|r| Ok((json::compile(&r.when)?, Arc::from(r.topic.as_str()))))
                .collect::<Result<_, String>>()?,
            default: cfg.default.as_deref().map(Arc::from),
            producer,
            transactional,
        })
    }
}

#[async_trait]
impl Processor for Route {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let doc = json::expression_input(msg);
        let mut targets = Vec::new();
        for (expr, topic) in &self.routes {
            let hit = expr
                .search(&doc)
                .map_err(|e| ProcessError::permanent("route", e.to_string()))?
                .is_truthy();
            if hit {
                targets.push(topic);
            }
        }
        if targets.is_empty() {
            match &self.default {
                Some(d) => targets.push(d),
                None => return Ok(Flow::Drop),
            }
        }
        if self.transactional {
            for topic in targets {
                msg.outbox.push(crate::message::Record {
                    topic: topic.clone(),
                    partition: None,
                    key: msg.key.clone(),
                    payload: msg.payload.clone(),
                    headers: msg.headers.as_deref().map(crate::trace::continue_trace),
                    timestamp_ms: None,
                });
            }
            return Ok(Flow::Continue);
        }
        let msg = &*msg;
        let writes = targets.iter().map(|topic| async move {
            let topic: &str = topic;
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = msg.key.as_deref() {
                record = record.key(k);
            }
            if let Some(p) = msg.payload.as_deref() {
                record = record.payload(p);
            }
            // Each written message continues the input's trace under its own span id.
            if let Some(h) = &msg.headers {
                record = record.headers(crate::trace::continue_trace(h));
            }
            self.producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| super::write_error("route", topic, &e))
        });
        for r in futures::future::join_all(writes).await {
            r?;
        }
        Ok(Flow::Continue)
    }
}
