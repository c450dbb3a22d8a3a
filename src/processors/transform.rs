//! `transform`: edit the JSON value — set, rename and remove fields (dotted paths) — and build
//! the output key from fields. Applied in that order: rename, set, remove, key.
//!
//! ```toml
//! [[processors]]
//! type = "transform"
//! rename = { "userId" = "user.id" }
//! set = { "status" = "welcomed", "meta.source" = "keyflow" }
//! remove = ["password"]
//! key = ["user.id"]              # output key: the fields' values joined by key_separator
//! key_separator = ":"
//! ```

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::{json, Flow, ProcessError, Processor};
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    #[serde(default)]
    pub set: BTreeMap<String, Value>,
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default)]
    pub key: Vec<String>,
    #[serde(default = "default_separator")]
    pub key_separator: String,
}

fn default_separator() -> String {
    ":".into()
}

impl TransformConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        if self.set.is_empty()
            && self.rename.is_empty()
            && self.remove.is_empty()
            && self.key.is_empty()
        {
            return vec![(
                "set".into(),
                "expected at least one of set, rename, remove, key".into(),
            )];
        }
        Vec::new()
    }
}

pub struct Transform {
    cfg: TransformConfig,
}

impl Transform {
    pub fn new(cfg: &TransformConfig) -> Self {
        Transform { cfg: cfg.clone() }
    }
}

#[async_trait]
impl Processor for Transform {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let mut v = json::parse(msg)?;
        for (from, to) in &self.cfg.rename {
            if let Some(x) = json::remove(&mut v, from) {
                json::set(&mut v, to, x);
            }
        }
        for (path, x) in &self.cfg.set {
            if !json::set(&mut v, path, x.clone()) {
                return Err(ProcessError::permanent(
                    "transform",
                    format!("cannot set {path:?}: a parent is not an object"),
                ));
            }
        }
        for path in &self.cfg.remove {
            json::remove(&mut v, path);
        }
        if !self.cfg.key.is_empty() {
            let mut key = String::new();
            for (i, path) in self.cfg.key.iter().enumerate() {
                let part = json::get(&v, path)
                    .and_then(json::scalar_text)
                    .ok_or_else(|| {
                        ProcessError::permanent(
                            "transform",
                            format!("key field {path:?} is missing or not a scalar"),
                        )
                    })?;
                if i > 0 {
                    key.push_str(&self.cfg.key_separator);
                }
                key.push_str(&part);
            }
            msg.key = Some(Bytes::from(key));
        }
        json::store(msg, &v);
        Ok(Flow::Continue)
    }
}
