//! `filter`: keep a message when a JMESPath expression over it is truthy, drop it otherwise
//! (a dropped message completes as `filtered`). The expression sees
//! `{value, key, headers, topic, partition, offset}`; `value` is the JSON value (null when the
//! value is not JSON).
//!
//! ```toml
//! [[processors]]
//! type = "filter"
//! expression = "value.country == 'FR' && headers.\"x-test\" == null"
//! ```

use async_trait::async_trait;
use serde::Deserialize;

use super::{json, Flow, ProcessError, Processor};
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// JMESPath; truthy keeps the message.
    pub expression: String,
}

impl FilterConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        match json::compile(&self.expression) {
            Ok(_) => Vec::new(),
            Err(e) => vec![("expression".into(), e)],
        }
    }
}

pub struct Filter {
    expr: jmespath::Expression<'static>,
}

impl Filter {
    pub fn new(cfg: &FilterConfig) -> Result<Self, String> {
        Ok(Filter {
            expr: json::compile(&cfg.expression)?,
        })
    }
}

#[async_trait]
impl Processor for Filter {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let doc = json::expression_input(msg);
        let keep = self
            .expr
            .search(&doc)
            .map_err(|e| ProcessError::permanent("filter", e.to_string()))?
            .is_truthy();
        Ok(if keep { Flow::Continue } else { Flow::Drop })
    }
}
