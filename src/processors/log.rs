//! `log`: one structured log line per message.

use async_trait::async_trait;
use serde::Deserialize;

use super::{Flow, ProcessError, Processor};
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `info` (default) or `debug`.
    #[serde(default)]
    pub level: LogLevel,
    /// Include up to this many payload bytes (lossy UTF-8); 0 logs no payload.
    #[serde(default)]
    pub payload_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    #[default]
    Info,
    Debug,
}

pub struct Log {
    level: LogLevel,
    payload_bytes: usize,
}

impl Log {
    pub fn new(c: &LogConfig) -> Self {
        Log {
            level: c.level,
            payload_bytes: c.payload_bytes,
        }
    }
}

#[async_trait]
impl Processor for Log {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let key = msg.key.as_deref().map(String::from_utf8_lossy);
        let payload = msg
            .payload
            .as_deref()
            .filter(|_| self.payload_bytes > 0)
            .map(|p| String::from_utf8_lossy(&p[..p.len().min(self.payload_bytes)]));
        match self.level {
            LogLevel::Info => {
                tracing::info!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, key = ?key, payload = ?payload, "message")
            }
            LogLevel::Debug => {
                tracing::debug!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, key = ?key, payload = ?payload, "message")
            }
        }
        Ok(Flow::Continue)
    }
}
