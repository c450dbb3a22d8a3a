//! Environment: `${VAR}` interpolation inside string values and `KEYFLOW_…` overrides.
//!
//! Interpolation happens on parsed string values, never on raw file text, so a secret that
//! contains quotes or newlines cannot change the structure of the file.

use std::collections::BTreeMap;

/// A snapshot of the environment. Tests pass their own; `from_process` reads the real one.
#[derive(Clone, Debug, Default)]
pub struct Env(pub BTreeMap<String, String>);

impl Env {
    pub fn from_process() -> Self {
        Env(std::env::vars().collect())
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in `s`. Returns the name of a variable that is
/// neither set nor defaulted.
pub fn interpolate(s: &str, env: &Env) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated `${{` in {s:?}"))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        match (env.get(name), default) {
            (Some(v), _) => out.push_str(v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (referenced as `${{{name}}}`)"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Walks a TOML tree and interpolates every string; errors carry the dotted field path.
pub fn interpolate_tree(
    v: &mut toml::Value,
    path: &str,
    env: &Env,
    errs: &mut Vec<(String, String)>,
) {
    match v {
        toml::Value::String(s) if s.contains("${") => match interpolate(s, env) {
            Ok(n) => *s = n,
            Err(e) => errs.push((path.to_string(), e)),
        },
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                interpolate_tree(v, &p, env, errs);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter_mut().enumerate() {
                interpolate_tree(v, &format!("{path}[{i}]"), env, errs);
            }
        }
        _ => {}
    }
}

/// Turns an environment value into TOML: `200` is an integer, `true` a bool, `"10s"` and
/// `localhost:9092` strings.
fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Applies every `PREFIX<FIELD>[__<SUBFIELD>]` variable to `table`. Field names are lower-cased;
/// under `kafka` underscores become dots (`KAFKA__SASL_PASSWORD` → `kafka."sasl.password"`),
/// because librdkafka property names are dotted. Returns `(path, variable)` for each override so
/// errors can name the variable instead of the file.
pub fn overlay(
    table: &mut toml::Table,
    prefix: &str,
    accept: impl Fn(&str) -> bool,
    env: &Env,
) -> Vec<(String, String)> {
    let mut applied = Vec::new();
    for (var, raw) in &env.0 {
        let Some(rest) = var.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.is_empty() || parts[0].is_empty() || !accept(&parts[0]) {
            continue;
        }
        let mut t = &mut *table;
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let key = if i == 1 && parts[0] == "kafka" {
                part.replace('_', ".")
            } else {
                part.clone()
            };
            if last {
                t.insert(key.clone(), parse_env_value(raw));
                let path = parts[..i]
                    .iter()
                    .cloned()
                    .chain([key])
                    .collect::<Vec<_>>()
                    .join(".");
                applied.push((path, var.clone()));
            } else {
                let entry = t
                    .entry(key)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if !entry.is_table() {
                    *entry = toml::Value::Table(toml::Table::new());
                }
                t = entry.as_table_mut().expect("just made a table");
            }
        }
    }
    applied
}

/// The name part of `KEYFLOW_PIPELINE_<NAME>__…` for a pipeline name: upper case, and every
/// character that is not a letter or digit becomes `_`.
pub fn env_name(pipeline: &str) -> String {
    pipeline
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env(pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    #[test]
    fn interpolates_and_defaults() {
        let e = env(&[("PW", "s3\"cr et")]);
        assert_eq!(interpolate("a${PW}b", &e).unwrap(), "as3\"cr etb");
        assert_eq!(interpolate("${NOPE:-x}", &e).unwrap(), "x");
        assert_eq!(
            interpolate("${NOPE}", &e).unwrap_err(),
            "environment variable NOPE is not set (referenced as `${NOPE}`)"
        );
    }

    #[test]
    fn overlay_types_and_kafka_dots() {
        let mut t = toml::Table::new();
        let e = env(&[
            ("KEYFLOW_PIPELINE_ORDERS__MAX_IN_FLIGHT", "200"),
            ("KEYFLOW_PIPELINE_ORDERS__KAFKA__SASL_PASSWORD", "pw"),
            ("KEYFLOW_PIPELINE_ORDERS__DRAIN_TIMEOUT", "10s"),
            ("KEYFLOW_OTHER", "1"),
        ]);
        let applied = overlay(&mut t, "KEYFLOW_PIPELINE_ORDERS__", |_| true, &e);
        assert_eq!(t["max_in_flight"].as_integer(), Some(200));
        assert_eq!(t["drain_timeout"].as_str(), Some("10s"));
        assert_eq!(t["kafka"]["sasl.password"].as_str(), Some("pw"));
        assert_eq!(applied.len(), 3);
        assert_eq!(env_name("user.created-v2"), "USER_CREATED_V2");
    }
}
