//! Processors: the [`Processor`] trait users implement, and the built-ins chosen by name in a
//! pipeline file (`[[processors]] type = "…"`), run in file order.

pub mod forward;
pub mod log;
pub mod simulate;

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
}

/// A processing failure. Retryable errors (a timeout, a 5xx) are retried with backoff; the others
/// (a decode error, a 4xx) go to the dead-letter topic at once.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ProcessError {
    retryable: bool,
    kind: &'static str,
    message: String,
}

impl ProcessError {
    pub fn retryable(kind: &'static str, message: impl Into<String>) -> Self {
        ProcessError {
            retryable: true,
            kind,
            message: message.into(),
        }
    }
    pub fn permanent(kind: &'static str, message: impl Into<String>) -> Self {
        ProcessError {
            retryable: false,
            kind,
            message: message.into(),
        }
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

/// One step of a pipeline. Implement it for your own logic and pass it to
/// [`crate::runtime::Runtime::with_processor`].
///
/// A processor may be called concurrently for different messages, and again for the same message
/// after a retry or a worker restart (at-least-once): make side effects idempotent.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError>;
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomConfig {
    pub name: String,
}

impl ProcessorConfig {
    /// Cross-field checks; returns `(field, message)` pairs.
    pub fn validate(&self, input_topic: &str) -> Vec<(String, String)> {
        match self {
            ProcessorConfig::Forward(c) => c.validate(input_topic),
            ProcessorConfig::Simulate(c) => c.validate(),
            ProcessorConfig::Log(_) | ProcessorConfig::Custom(_) => Vec::new(),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            ProcessorConfig::Forward(_) => "forward",
            ProcessorConfig::Log(_) => "log",
            ProcessorConfig::Simulate(_) => "simulate",
            ProcessorConfig::Custom(_) => "custom",
        }
    }
}

/// What building a processor may need.
pub struct BuildContext<'a> {
    pub producer: &'a Producer,
    pub custom: &'a dyn Fn(&str) -> Option<Arc<dyn Processor>>,
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
                ProcessorConfig::Forward(f) => {
                    Arc::new(forward::Forward::new(f, ctx.producer.clone()))
                }
                ProcessorConfig::Log(l) => Arc::new(log::Log::new(l)),
                ProcessorConfig::Simulate(s) => Arc::new(simulate::Simulate::new(s)),
                ProcessorConfig::Custom(c) => (ctx.custom)(&c.name).ok_or_else(|| {
                    format!(
                        "processors[{i}]: no custom processor named {:?} is registered",
                        c.name
                    )
                })?,
            })
        })
        .collect()
}
