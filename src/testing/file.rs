//! The test file, `pipelines/<name>.test.toml`, next to the pipeline `pipelines/<name>.toml`:
//! raw serde structs (`deny_unknown_fields`) → validated [`TestSpec`], with errors that name the
//! file, the field and what was expected (like pipeline configuration errors).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    /// Variables set for loading the pipeline file (`${VAR}`), over the process environment,
    /// so a test does not depend on the shell it runs in.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// The database of the pipeline's `sql` processors.
    #[serde(default)]
    database: Option<RawDatabase>,
    #[serde(default, rename = "case")]
    cases: Vec<RawCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    /// The environment variable holding the connection string.
    url_env: String,
    /// An SQL file run once before the cases, relative to the test file.
    #[serde(default)]
    setup: Option<std::path::PathBuf>,
    /// SQL run before each case.
    #[serde(default)]
    reset: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default, rename = "message")]
    messages: Vec<RawMessage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    #[serde(default)]
    key: Option<String>,
    /// The Kafka offset (default: the message's index in its case); an earlier message's
    /// offset again is a redelivery.
    #[serde(default)]
    offset: Option<i64>,
    /// The value as JSON (any TOML value but a date).
    #[serde(default)]
    value: Option<toml::Value>,
    /// The value as these exact bytes (UTF-8 text), e.g. something that is not JSON.
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// The HTTP stub's answers to this message's calls, in order; the last one repeats.
    #[serde(default)]
    http: Vec<RawAnswer>,
    expect: RawExpect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnswer {
    #[serde(default = "ok_status")]
    status: u16,
    #[serde(default)]
    body: Option<String>,
}

fn ok_status() -> u16 {
    200
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    #[serde(default)]
    outputs: Option<BTreeMap<String, Vec<RawRecord>>>,
    #[serde(default)]
    dropped: Option<bool>,
    #[serde(default)]
    duplicate: Option<bool>,
    #[serde(default)]
    dead_lettered: Option<RawDeadLetter>,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    http: Option<Vec<RawRequest>>,
    #[serde(default)]
    rows: Option<RawRows>,
    /// Reserved for per-key state expectations (stateful pipelines, issue 12 item 1).
    #[serde(default)]
    state: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<toml::Value>,
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRows {
    query: String,
    equals: Vec<Vec<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeadLetter {
    kind: String,
    #[serde(default)]
    message_contains: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    body: Option<toml::Value>,
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// A validated test file.
#[derive(Debug, Clone)]
pub struct TestSpec {
    pub env: BTreeMap<String, String>,
    pub database: Option<Database>,
    pub cases: Vec<Case>,
}

/// Where the `sql` processors run: the database named by an environment variable.
#[derive(Debug, Clone)]
pub struct Database {
    pub url_env: String,
    /// The setup file as named (relative to the test file) and its text.
    pub setup: Option<(String, String)>,
    pub reset: Option<String>,
}

/// A query run after the message, and the rows it must return (each a JSON array of columns).
#[derive(Debug, Clone)]
pub struct Rows {
    pub query: String,
    pub equals: Value,
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub messages: Vec<Input>,
}

#[derive(Debug, Clone)]
pub struct Input {
    pub key: Option<String>,
    pub offset: Option<i64>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub answers: Vec<Answer>,
    pub expect: Expect,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// A value to compare: as JSON (structurally) or as exact text.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Json(Value),
    Raw(String),
}

#[derive(Debug, Clone)]
pub struct Expect {
    pub outcome: Outcome,
    pub attempts: Option<u32>,
    pub http: Option<Vec<Request>>,
    pub rows: Option<Rows>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// Processed; these records written, per topic, in order (an empty map: nothing written).
    Outputs(BTreeMap<String, Vec<OutputRecord>>),
    Dropped,
    Duplicate,
    DeadLettered {
        kind: String,
        message_contains: Option<String>,
    },
}

/// Fields left out (`None`) are not compared; headers are compared as a subset.
#[derive(Debug, Clone)]
pub struct OutputRecord {
    pub key: Option<String>,
    pub value: Option<Body>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: Option<String>,
    pub path: Option<String>,
    pub body: Option<Body>,
    pub headers: Vec<(String, String)>,
}

/// Parses and validates a test file; every error found, each naming the file and the field.
pub fn load(path: &Path) -> Result<TestSpec, Vec<ConfigError>> {
    let src = path.display().to_string();
    let e = |field: &str, message: String| ConfigError {
        source: src.clone(),
        field: field.to_string(),
        message,
    };
    let text =
        std::fs::read_to_string(path).map_err(|x| vec![e("", format!("cannot read: {x}"))])?;
    let de = toml::Deserializer::new(&text);
    let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|x| {
        let field = x.path().to_string();
        let field = if field == "." { String::new() } else { field };
        // toml's message spans lines: "TOML parse error at line L, column C", the line quoted,
        // then what is wrong.
        let text = x.into_inner().to_string();
        let what = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        let message = match text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("TOML parse error at "))
        {
            Some(at) if at != what => format!("{what} ({at})"),
            _ => what.to_string(),
        };
        vec![e(&field, message)]
    })?;
    let mut errs = Vec::new();
    let database = raw
        .database
        .map(|d| database(d, path, &mut |f, m| errs.push(e(f, m))));
    if raw.cases.is_empty() {
        errs.push(e(
            "case",
            "expected at least one [[case]], found none".into(),
        ));
    }
    let mut names = std::collections::HashSet::new();
    let mut cases = Vec::new();
    for (ci, c) in raw.cases.into_iter().enumerate() {
        let at = format!("case[{ci}]");
        if c.name.trim().is_empty() {
            errs.push(e(
                &format!("{at}.name"),
                "expected a name, found \"\"".into(),
            ));
        } else if !names.insert(c.name.clone()) {
            errs.push(e(
                &format!("{at}.name"),
                format!(
                    "{:?} names an earlier case too: names must be unique",
                    c.name
                ),
            ));
        }
        if c.messages.is_empty() {
            errs.push(e(
                &format!("{at}.message"),
                "expected at least one [[case.message]], found none".into(),
            ));
        }
        let mut messages = Vec::new();
        for (mi, m) in c.messages.into_iter().enumerate() {
            let at = format!("{at}.message[{mi}]");
            let mut field_err = |f: &str, msg: String| errs.push(e(&format!("{at}.{f}"), msg));
            messages.push(input(m, database.is_some(), &mut field_err));
        }
        cases.push(Case {
            name: c.name,
            messages,
        });
    }
    if errs.is_empty() {
        Ok(TestSpec {
            env: raw.env,
            database,
            cases,
        })
    } else {
        Err(errs)
    }
}

fn database(d: RawDatabase, test: &Path, err: &mut dyn FnMut(&str, String)) -> Database {
    let name_ok = d
        .url_env
        .chars()
        .next()
        .is_some_and(|c| !c.is_ascii_digit())
        && d.url_env
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !name_ok {
        err(
            "database.url_env",
            format!(
                "expected the name of an environment variable (letters, digits, _), found {:?}",
                d.url_env
            ),
        );
    }
    let setup = d.setup.and_then(|f| {
        let at = test.parent().unwrap_or(Path::new("")).join(&f);
        match std::fs::read_to_string(&at) {
            Ok(text) => Some((f.display().to_string(), text)),
            Err(x) => {
                err(
                    "database.setup",
                    format!(
                        "cannot read {} (relative to the test file): {x}",
                        at.display()
                    ),
                );
                None
            }
        }
    });
    Database {
        url_env: d.url_env,
        setup,
        reset: d.reset.filter(|r| !r.trim().is_empty()),
    }
}

fn input(m: RawMessage, database: bool, err: &mut dyn FnMut(&str, String)) -> Input {
    if m.offset.is_some_and(|o| o < 0) {
        err(
            "offset",
            format!(
                "expected an offset of 0 or more, found {}",
                m.offset.unwrap_or_default()
            ),
        );
    }
    let payload = match body(m.value, m.raw, "value", err) {
        Some(Body::Json(v)) => Some(serde_json::to_vec(&v).unwrap_or_default()),
        Some(Body::Raw(s)) => Some(s.into_bytes()),
        None => None,
    };
    for a in &m.http {
        if !(100..=599).contains(&a.status) {
            err(
                "http",
                format!("expected an HTTP status 100 to 599, found {}", a.status),
            );
        }
    }
    let x = m.expect;
    let mut outcomes = Vec::new();
    if let Some(o) = x.outputs {
        let mut topics = BTreeMap::new();
        for (topic, records) in o {
            let rs = records
                .into_iter()
                .map(|r| OutputRecord {
                    key: r.key,
                    value: body(
                        r.value,
                        r.raw,
                        &format!("expect.outputs.{topic}.value"),
                        err,
                    ),
                    headers: r.headers.into_iter().collect(),
                })
                .collect();
            topics.insert(topic, rs);
        }
        outcomes.push(Outcome::Outputs(topics));
    }
    for (flag, name, o) in [
        (x.dropped, "dropped", Outcome::Dropped),
        (x.duplicate, "duplicate", Outcome::Duplicate),
    ] {
        match flag {
            Some(true) => outcomes.push(o),
            Some(false) => err(
                &format!("expect.{name}"),
                "expected true (or leave it out), found false".into(),
            ),
            None => {}
        }
    }
    if let Some(d) = x.dead_lettered {
        if d.kind.trim().is_empty() {
            err(
                "expect.dead_lettered.kind",
                "expected an error kind (decode, schema, http…), found \"\"".into(),
            );
        }
        outcomes.push(Outcome::DeadLettered {
            kind: d.kind,
            message_contains: d.message_contains,
        });
    }
    if x.state.is_some() {
        err(
            "expect.state",
            "per-key state expectations need a stateful pipeline, which keyflow does not have yet"
                .into(),
        );
    }
    let rows = x.rows.and_then(|r| {
        if !database {
            err(
                "expect.rows",
                "rows are read from the database of [database] url_env, which this file does not give".into(),
            );
        }
        if r.query.trim().is_empty() {
            err("expect.rows.query", "expected an SQL query, found \"\"".into());
        }
        let equals = r
            .equals
            .iter()
            .map(|row| row.iter().map(to_json).collect::<Result<Vec<_>, _>>().map(Value::Array))
            .collect::<Result<Vec<_>, _>>();
        match equals {
            Ok(rows) => Some(Rows {
                query: r.query,
                equals: Value::Array(rows),
            }),
            Err(m) => {
                err("expect.rows.equals", m);
                None
            }
        }
    });
    if x.attempts == Some(0) {
        err("expect.attempts", "expected at least 1, found 0".into());
    }
    let http = x.http.map(|rs| {
        rs.into_iter()
            .enumerate()
            .map(|(i, r)| Request {
                method: r.method.map(|m| m.to_ascii_uppercase()),
                path: r.path,
                body: body(r.body, r.raw, &format!("expect.http[{i}].body"), err),
                headers: r
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
            })
            .collect()
    });
    let outcome = match outcomes.len() {
        1 => outcomes.pop().expect("one outcome"),
        n => {
            err(
                "expect",
                format!(
                    "expected exactly one of outputs, dropped, duplicate, dead_lettered; found {n}"
                ),
            );
            Outcome::Dropped
        }
    };
    Input {
        key: m.key,
        offset: m.offset,
        payload,
        headers: m.headers.into_iter().collect(),
        answers: m
            .http
            .into_iter()
            .map(|a| Answer {
                status: a.status,
                body: a.body.unwrap_or_default(),
            })
            .collect(),
        expect: Expect {
            outcome,
            attempts: x.attempts,
            http,
            rows,
        },
    }
}

/// `value` (JSON) or `raw` (text), not both.
fn body(
    value: Option<toml::Value>,
    raw: Option<String>,
    field: &str,
    err: &mut dyn FnMut(&str, String),
) -> Option<Body> {
    match (value, raw) {
        (Some(_), Some(_)) => {
            err(
                field,
                "expected either the JSON value or `raw` text, found both".into(),
            );
            None
        }
        (Some(v), None) => match to_json(&v) {
            Ok(j) => Some(Body::Json(j)),
            Err(m) => {
                err(field, m);
                None
            }
        },
        (None, Some(r)) => Some(Body::Raw(r)),
        (None, None) => None,
    }
}

fn to_json(v: &toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .ok_or_else(|| format!("{f} has no JSON form"))?,
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => {
            return Err(format!(
                "a TOML date has no JSON form: write it as a string, \"{d}\""
            ))
        }
        toml::Value::Array(a) => Value::Array(a.iter().map(to_json).collect::<Result<_, _>>()?),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| Ok((k.clone(), to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.test.toml");
        std::fs::write(&p, text).unwrap();
        match load(&p) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .iter()
                .map(|e| e.to_string().replace(&p.display().to_string(), "FILE"))
                .collect(),
        }
    }

    #[test]
    fn a_valid_file_loads() {
        let e = errors(
            r#"
[[case]]
name = "a"
[[case.message]]
key = "k"
value = { id = 1, tags = ["x"] }
expect.outputs = { out = [{ key = "k", value = { id = 1, tags = ["x"] } }] }
[[case.message]]
raw = "{"
expect.dead_lettered = { kind = "decode" }
"#,
        );
        assert_eq!(e, Vec::<String>::new());
    }

    #[test]
    fn errors_name_the_file_the_field_and_what_was_expected() {
        assert_eq!(
            errors("[[case]]\nname = \"a\"\n[[case.message]]\nvalue = 1\nexpect = { dropped = true, duplicate = true }\n"),
            ["FILE: field `case[0].message[0].expect`: expected exactly one of outputs, dropped, duplicate, dead_lettered; found 2"]
        );
        assert_eq!(
            errors("[[case]]\nname = \"a\"\n[[case.message]]\nvalue = 1\nraw = \"1\"\nexpect.dropped = false\n"),
            [
                "FILE: field `case[0].message[0].value`: expected either the JSON value or `raw` text, found both",
                "FILE: field `case[0].message[0].expect.dropped`: expected true (or leave it out), found false",
                "FILE: field `case[0].message[0].expect`: expected exactly one of outputs, dropped, duplicate, dead_lettered; found 0",
            ]
        );
        let e =
            errors("[[case]]\nname = \"a\"\n[[case.message]]\nvalu = 1\nexpect.dropped = true\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "FILE: field `case[0].message[0].valu`: unknown field `valu`, expected one of"
            ),
            "{e:?}"
        );
        assert_eq!(
            errors("[[case]]\nname = \"a\"\n[[case]]\nname = \"a\"\n"),
            [
                "FILE: field `case[0].message`: expected at least one [[case.message]], found none",
                "FILE: field `case[1].name`: \"a\" names an earlier case too: names must be unique",
                "FILE: field `case[1].message`: expected at least one [[case.message]], found none",
            ]
        );
        assert_eq!(
            errors(""),
            ["FILE: field `case`: expected at least one [[case]], found none"]
        );
    }

    #[test]
    fn database_rows_and_offset_errors_name_their_field() {
        assert_eq!(
            errors("[[case]]\nname = \"a\"\n[[case.message]]\nkey = \"k\"\noffset = -1\nexpect.outputs = {}\nexpect.rows = { query = \"SELECT 1\", equals = [[1]] }\n"),
            [
                "FILE: field `case[0].message[0].offset`: expected an offset of 0 or more, found -1",
                "FILE: field `case[0].message[0].expect.rows`: rows are read from the database of [database] url_env, which this file does not give",
            ]
        );
        let e = errors("[database]\nurl_env = \"1 DB\"\nsetup = \"missing.sql\"\n[[case]]\nname = \"a\"\n[[case.message]]\nexpect.outputs = {}\nexpect.rows = { query = \" \", equals = [] }\n");
        assert_eq!(e.len(), 3, "{e:?}");
        assert_eq!(e[0], "FILE: field `database.url_env`: expected the name of an environment variable (letters, digits, _), found \"1 DB\"");
        assert!(
            e[1].starts_with("FILE: field `database.setup`: cannot read ")
                && e[1].contains("missing.sql (relative to the test file)"),
            "{e:?}"
        );
        assert_eq!(
            e[2],
            "FILE: field `case[0].message[0].expect.rows.query`: expected an SQL query, found \"\""
        );
        assert_eq!(
            errors("[database]\nurl_env = \"ORDERS_DB_URL\"\nreset = \"TRUNCATE t\"\n[[case]]\nname = \"a\"\n[[case.message]]\nkey = \"k\"\noffset = 3\nexpect.duplicate = true\nexpect.rows = { query = \"SELECT 'x', 1\", equals = [[\"x\", 1]] }\n"),
            Vec::<String>::new()
        );
    }
}
