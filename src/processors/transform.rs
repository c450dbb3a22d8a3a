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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renames_sets_removes_and_keys() {
        let cfg: TransformConfig = toml::from_str(
            r#"
rename = { "amount" = "paid.amount" }
set = { "command" = "ShipOrder" }
remove = ["card"]
key = ["order_id", "paid.amount"]
"#,
        )
        .unwrap();
        let t = Transform::new(&cfg);
        let mut m = Message::new(
            "t",
            0,
            0,
            None,
            br#"{"order_id": "o1", "amount": 5, "card": "x"}"#,
        );
        assert_eq!(t.process(&mut m).await.unwrap(), Flow::Continue);
        let v: Value = serde_json::from_slice(m.payload.as_deref().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"order_id": "o1", "paid": {"amount": 5}, "command": "ShipOrder"})
        );
        assert_eq!(m.key.as_deref(), Some(&b"o1:5"[..]));
        let mut bad = Message::new("t", 0, 1, None, br#"{"amount": 5}"#);
        let e = t.process(&mut bad).await.unwrap_err();
        assert!(!e.is_retryable() && e.kind() == "transform", "{e}");
        let mut not_json = Message::new("t", 0, 2, None, b"\xff");
        assert_eq!(t.process(&mut not_json).await.unwrap_err().kind(), "decode");
    }
}
