//! `decode` / `validate`: parse the value as JSON and check it against a JSON Schema file, the
//! consumer-driven contract of the topic. Both failures are permanent (`decode`, `schema`): a
//! retry cannot fix the message, so it goes to the dead-letter topic at once, with the
//! validation error in `keyflow.error`.
//!
//! ```toml
//! [[processors]]
//! type = "validate"                  # or "decode" (schema optional there)
//! schema = "schemas/user.created.json"   # relative to the pipeline file
//! ```

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::Deserialize;

use super::{json, Flow, ProcessError, Processor};
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// A JSON Schema file; a relative path is resolved against the pipeline file's directory.
    #[serde(default)]
    pub schema: Option<PathBuf>,
}

impl DecodeConfig {
    /// Resolves the schema path and compiles it, so a bad schema fails `keyflow validate`.
    pub fn validate(&mut self, base: &Path, required: bool) -> Vec<(String, String)> {
        let Some(p) = self.schema.clone() else {
            return if required {
                vec![(
                    "schema".into(),
                    "expected a JSON Schema file path, found none".into(),
                )]
            } else {
                Vec::new()
            };
        };
        if p.is_relative() {
            self.schema = Some(base.join(&p));
        }
        match load_schema(self.schema.as_deref().unwrap_or(&p)) {
            Ok(_) => Vec::new(),
            Err(e) => vec![("schema".into(), e)],
        }
    }
}

fn load_schema(path: &Path) -> Result<jsonschema::Validator, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    jsonschema::validator_for(&v)
        .map_err(|e| format!("{} is not a valid JSON Schema: {e}", path.display()))
}

pub struct Decode {
    schema: Option<jsonschema::Validator>,
}

impl Decode {
    pub fn new(cfg: &DecodeConfig) -> Result<Self, String> {
        Ok(Decode {
            schema: cfg.schema.as_deref().map(load_schema).transpose()?,
        })
    }
}

#[async_trait]
impl Processor for Decode {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let v = json::parse(msg)?;
        if let Some(schema) = &self.schema {
            let errors: Vec<String> = schema
                .iter_errors(&v)
                .take(3)
                .map(|e| format!("{} at {:?}", e, e.instance_path.to_string()))
                .collect();
            if !errors.is_empty() {
                return Err(ProcessError::permanent("schema", errors.join("; ")));
            }
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn schema_errors_are_permanent_and_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("s.json"),
            r#"{"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}"#,
        )
        .unwrap();
        let mut cfg = DecodeConfig {
            schema: Some("s.json".into()),
        };
        assert!(cfg.validate(dir.path(), true).is_empty());
        let d = Decode::new(&cfg).unwrap();
        let mut ok = Message::new("t", 0, 0, None, br#"{"id": 1}"#);
        assert_eq!(d.process(&mut ok).await.unwrap(), Flow::Continue);
        let mut bad = Message::new("t", 0, 1, None, br#"{"id": "x"}"#);
        let e = d.process(&mut bad).await.unwrap_err();
        assert_eq!(e.kind(), "schema");
        assert!(!e.is_retryable());
        assert!(e.message().contains("/id"), "{e}");
        let mut garbage = Message::new("t", 0, 2, None, b"{");
        assert_eq!(d.process(&mut garbage).await.unwrap_err().kind(), "decode");
        let mut missing = DecodeConfig { schema: None };
        assert_eq!(
            missing.validate(dir.path(), true).len(),
            1,
            "validate needs a schema"
        );
        assert!(
            missing.validate(dir.path(), false).is_empty(),
            "decode does not"
        );
    }
}
