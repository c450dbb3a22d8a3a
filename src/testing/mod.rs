//! `keyflow test`: a pipeline's tests, without a broker. Each `pipelines/<name>.test.toml` gives
//! cases — input messages in sequence and the expected outcome of each — that run through the
//! processor chain the runtime builds from `pipelines/<name>.toml` ([`build_chain`], the same
//! code), with three differences, all at the edges of the chain:
//! - the chain is built in exactly-once staging mode (`BuildContext::transactional`): `forward`
//!   and `route` put their records in the message's outbox, and those records are the outputs
//!   compared; the producer handle the build needs has no broker and is never called;
//! - `http` processors call a local stub ([`stub`]) answering as the test file says;
//! - `sql` processors run against the database the test file names (`[database] url_env`, see
//!   [`db`]), or, when it is not given or not set, fail the case that reaches them (never a
//!   skip, never a pass);
//! - a retryable error is retried per the pipeline's `[retry]` at once (no backoff sleep), and
//!   circuit breakers are left out (they change when a message is tried, not how it ends), so
//!   the outcome is the one the runtime finally reaches: processed after retries, or
//!   dead-lettered with the error's kind.
//!
//! Output and exit code like `cargo test`: 0 all passed, 1 a case failed, 2 a test or pipeline
//! file is malformed (every error listed, naming file and field).

pub mod db;
pub mod diff;
pub mod file;
pub mod stub;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::config::{self, ConfigError, Env, Global, PipelineSpec, RetryPolicy};
use crate::message::{Message, Record};
use crate::processors::{
    build_chain, BuildContext, Flow, ProcessError, Processor, ProcessorConfig,
};
use diff::{field, Mismatch};
use file::{Body, Expect, Input, Outcome, TestSpec};

/// Exit code: every case passed.
pub const PASSED: u8 = 0;
/// Exit code: a case failed (or could not run).
pub const FAILED: u8 = 1;
/// Exit code: a test file or its pipeline file is malformed.
pub const MALFORMED: u8 = 2;

/// A test file with its pipeline.
struct Suite {
    /// The test file, as shown in the report.
    file: PathBuf,
    pipeline: PipelineSpec,
    spec: TestSpec,
}

/// Runs the tests under `paths` (files or directories; `pipelines` when empty), printing the
/// report to `out` and notes to stderr. Returns the exit code.
pub async fn run(paths: &[PathBuf], out: &mut dyn Write) -> u8 {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("pipelines")]
    } else {
        paths.to_vec()
    };
    // Staging mode never calls the producer; it exists because the build takes one. No
    // bootstrap servers: it never connects. One for the whole run (creating one takes ~100 ms).
    let producer: crate::kafka::Producer = match rdkafka::ClientConfig::new()
        .set("message.timeout.ms", "1000")
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot create the (unconnected) producer handle: {e}");
            return FAILED;
        }
    };
    let suites = match load(&paths, &producer) {
        Ok(s) => s,
        Err(errs) => {
            eprintln!("{} error(s) in test or pipeline files:", errs.len());
            for e in &errs {
                eprintln!("{e}");
            }
            return MALFORMED;
        }
    };
    let total: usize = suites.iter().map(|s| s.spec.cases.len()).sum();
    let plural = if total == 1 { "" } else { "s" };
    let _ = writeln!(out, "\nrunning {total} test{plural}");
    let (mut passed, mut failures) = (0usize, Vec::new());
    for s in &suites {
        let db = database(s).await;
        let stub = match needs_stub(&s.pipeline) {
            true => match stub::Stub::start().await {
                Ok(st) => Some(st),
                Err(e) => {
                    eprintln!("{}: cannot start the HTTP stub: {e}", s.file.display());
                    return FAILED;
                }
            },
            false => None,
        };
        for case in &s.spec.cases {
            let name = format!("{}::{}", s.file.display(), case.name);
            let r = run_case(s, case, stub.as_ref(), &db, &producer).await;
            let _ = writeln!(
                out,
                "test {name} ... {}",
                if r.is_ok() { "ok" } else { "FAILED" }
            );
            match r {
                Ok(()) => passed += 1,
                Err(text) => failures.push((name, text)),
            }
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "\nfailures:\n");
        for (name, text) in &failures {
            let _ = writeln!(out, "---- {name} ----\n{text}");
        }
        let _ = writeln!(out, "failures:");
        for (name, _) in &failures {
            let _ = writeln!(out, "    {name}");
        }
    }
    let verdict = if failures.is_empty() { "ok" } else { "FAILED" };
    let _ = writeln!(
        out,
        "\ntest result: {verdict}. {passed} passed; {} failed",
        failures.len()
    );
    if failures.is_empty() {
        PASSED
    } else {
        FAILED
    }
}

/// `x.test.toml` is the test file of the pipeline `x.toml`.
pub fn is_test_file(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".test.toml"))
}

fn pipeline_of(test: &Path) -> PathBuf {
    let name = test
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    test.with_file_name(format!("{}.toml", name.trim_end_matches(".test.toml")))
}

fn test_of(pipeline: &Path) -> PathBuf {
    let stem = pipeline
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    pipeline.with_file_name(format!("{stem}.test.toml"))
}

/// The test files under `paths`, each with its pipeline file. A directory's pipelines without
/// a test file are named on stderr; a pipeline file given by name must have one.
fn discover(paths: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>, Vec<ConfigError>> {
    let e = |p: &Path, message: String| ConfigError {
        source: p.display().to_string(),
        field: String::new(),
        message,
    };
    let mut errs = Vec::new();
    let mut found = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = match std::fs::read_dir(p) {
                Ok(rd) => rd
                    .filter_map(|x| x.ok().map(|x| x.path()))
                    .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                    .collect(),
                Err(x) => {
                    errs.push(e(p, format!("cannot read directory: {x}")));
                    continue;
                }
            };
            files.sort();
            for f in &files {
                if is_test_file(f) {
                    found.push(f.clone());
                } else if !test_of(f).exists() {
                    eprintln!(
                        "note: {} has no test file ({})",
                        f.display(),
                        test_of(f).display()
                    );
                }
            }
        } else if !p.exists() {
            errs.push(e(p, "no such file or directory".into()));
        } else if is_test_file(p) {
            found.push(p.clone());
        } else if test_of(p).exists() {
            found.push(test_of(p));
        } else {
            errs.push(e(
                p,
                format!(
                    "no test file next to it (expected {})",
                    test_of(p).display()
                ),
            ));
        }
    }
    found.dedup();
    let mut pairs = Vec::new();
    for t in found {
        let pipeline = pipeline_of(&t);
        if pipeline.exists() {
            pairs.push((t, pipeline));
        } else {
            errs.push(e(
                &t,
                format!(
                    "no pipeline file for this test file (expected {})",
                    pipeline.display()
                ),
            ));
        }
    }
    if errs.is_empty() {
        Ok(pairs)
    } else {
        Err(errs)
    }
}

/// Loads every test file and its pipeline and builds each chain once, so that every problem is
/// reported before anything runs.
fn load(
    paths: &[PathBuf],
    producer: &crate::kafka::Producer,
) -> Result<Vec<Suite>, Vec<ConfigError>> {
    let mut errs = Vec::new();
    let mut suites = Vec::new();
    for (test, pipeline) in discover(paths)? {
        let spec = match file::load(&test) {
            Ok(s) => s,
            Err(e) => {
                errs.extend(e);
                continue;
            }
        };
        // The file's `[env]` over the process environment: `${VAR}` in the pipeline resolves
        // the same wherever the test runs.
        let mut env = Env::from_process();
        env.0.extend(spec.env.clone());
        // The database variable unset: `${VAR}` still loads (a stand-in that is never
        // connected to); the cases that reach `sql` fail naming VAR.
        if let Some(d) = &spec.database {
            env.0
                .entry(d.url_env.clone())
                .or_insert_with(|| "postgres://keyflow-test@127.0.0.1:9/unset".into());
        }
        let p = match config::load_pipeline(&pipeline, &Global::default(), &env) {
            Ok(p) => p,
            Err(e) => {
                errs.extend(e.0);
                continue;
            }
        };
        // A stub address that is never listened on: this build only checks the chain.
        if let Err(m) = chain(
            &p,
            Some("127.0.0.1:9".parse().expect("an address")),
            None,
            producer,
        ) {
            errs.push(ConfigError {
                source: pipeline.display().to_string(),
                field: String::new(),
                message: m,
            });
            continue;
        }
        suites.push(Suite {
            file: test,
            pipeline: p,
            spec,
        });
    }
    if errs.is_empty() {
        Ok(suites)
    } else {
        Err(errs)
    }
}

/// The database of a suite's `sql` processors, or why there is none (the text a case that needs
/// it fails with).
enum Database {
    Ready { db: db::Db, url: String },
    Unavailable(String),
}

/// Connects to the suite's database and runs its setup file, once for the suite.
async fn database(s: &Suite) -> Database {
    let Some(d) = &s.spec.database else {
        return Database::Unavailable(
            "needs a database: give one in the test file ([database] url_env = \"VAR\", see \
             keyflow's README, keyflow test) and set VAR"
                .into(),
        );
    };
    let url = match std::env::var(&d.url_env) {
        Ok(u) if !u.trim().is_empty() => u,
        _ => return Database::Unavailable(format!("needs a database: set {}", d.url_env)),
    };
    let db = match db::Db::connect(&url).await {
        Ok(db) => db,
        Err(e) => return Database::Unavailable(format!("database ({}): {e}", d.url_env)),
    };
    if let Some((file, text)) = &d.setup {
        if let Err(e) = db.execute(text).await {
            return Database::Unavailable(format!("database setup {file}: {e}"));
        }
    }
    Database::Ready { db, url }
}

/// Before each case: the `sql` processors' positions forgotten, then the file's `reset`.
async fn reset(s: &Suite, db: &db::Db) -> Result<(), String> {
    let tables: Vec<String> = s
        .pipeline
        .processors
        .iter()
        .filter_map(|c| match c {
            ProcessorConfig::Sql(q) => Some(q.applied_table.clone()),
            _ => None,
        })
        .collect();
    db.forget_positions(&tables)
        .await
        .map_err(|e| format!("database reset: {e}"))?;
    if let Some(r) = s.spec.database.as_ref().and_then(|d| d.reset.as_ref()) {
        db.execute(r)
            .await
            .map_err(|e| format!("database reset ({r:?}): {e}"))?;
    }
    Ok(())
}

fn needs_stub(p: &PipelineSpec) -> bool {
    p.processors
        .iter()
        .any(|c| matches!(c, ProcessorConfig::Http(_)))
}

/// The pipeline's chain as the runtime builds it, in staging mode, with `http` pointed at the
/// stub (same path and query), `sql` at the test database (as [`db::CONSUMER`]), and without
/// circuit breakers.
fn chain(
    p: &PipelineSpec,
    stub: Option<std::net::SocketAddr>,
    database: Option<&str>,
    producer: &crate::kafka::Producer,
) -> Result<Vec<Arc<dyn Processor>>, String> {
    let mut configs = p.processors.clone();
    for c in &mut configs {
        match c {
            ProcessorConfig::Sql(q) => {
                q.circuit_breaker = None;
                if let Some(url) = database {
                    q.url = url.to_string();
                    q.consumer = Some(db::CONSUMER.to_string());
                }
            }
            ProcessorConfig::Http(h) => {
                h.circuit_breaker = None;
                if let Some(addr) = stub {
                    let mut url = reqwest::Url::parse(&h.url).map_err(|e| format!("url: {e}"))?;
                    url.set_scheme("http")
                        .and_then(|()| url.set_username(""))
                        .and_then(|()| url.set_password(None))
                        .and_then(|()| url.set_ip_host(addr.ip()))
                        .and_then(|()| url.set_port(Some(addr.port())))
                        .map_err(|()| "url: cannot point it at the HTTP stub".to_string())?;
                    h.url = url.to_string();
                }
            }
            ProcessorConfig::Forward(f) => f.circuit_breaker = None,
            ProcessorConfig::Custom(c) => {
                return Err(format!(
                    "custom processor {:?}: keyflow test runs the built-in processors only \
                     (test a custom processor from Rust)",
                    c.name
                ))
            }
            _ => {}
        }
    }
    let gate = Arc::new(crate::gate::Gate::default());
    build_chain(
        &configs,
        &BuildContext {
            producer,
            custom: &|_| None,
            gate: &gate,
            pipeline: &p.name,
            transactional: true,
        },
    )
}

/// How one message ended.
#[derive(Debug)]
enum Ended {
    Processed(Vec<Record>),
    Dropped,
    Duplicate,
    DeadLettered(ProcessError),
}

/// Runs a case's messages in order on a fresh chain; the first message that differs from its
/// expectation fails the case with the differences.
async fn run_case(
    s: &Suite,
    case: &file::Case,
    stub: Option<&stub::Stub>,
    database: &Database,
    producer: &crate::kafka::Producer,
) -> Result<(), String> {
    let (db, url, unavailable) = match database {
        Database::Ready { db, url } => {
            reset(s, db).await?;
            (Some(db), Some(url.as_str()), None)
        }
        Database::Unavailable(why) => (None, None, Some(why.as_str())),
    };
    let chain = chain(&s.pipeline, stub.map(|x| x.addr), url, producer)?;
    // Without a database, the processors a message must not reach.
    let blocked: Vec<bool> = s
        .pipeline
        .processors
        .iter()
        .map(|c| unavailable.is_some() && matches!(c, ProcessorConfig::Sql(_)))
        .collect();
    let n = case.messages.len();
    for (i, input) in case.messages.iter().enumerate() {
        let at = format!(
            "message {} of {n} (key {})",
            i + 1,
            input
                .key
                .as_deref()
                .map_or("none".to_string(), |k| format!("{k:?}")),
        );
        let msg = message(&s.pipeline.topic, input.offset.unwrap_or(i as i64), input);
        if let Some(st) = stub {
            st.script(&input.answers);
        }
        let needs_db = |why: Option<&str>| format!("{at}: {}", why.unwrap_or_default());
        let (ended, attempts) = execute(&chain, &blocked, &s.pipeline.retry, &msg)
            .await
            .ok_or_else(|| needs_db(unavailable))?;
        let calls = stub.map(|st| st.calls()).unwrap_or_default();
        let mut diffs = Vec::new();
        compare(&input.expect, &ended, attempts, &calls, &mut diffs);
        if let Some(want) = &input.expect.rows {
            let db = db.ok_or_else(|| needs_db(unavailable))?;
            let got = db
                .rows(&want.query)
                .await
                .map_err(|e| format!("{at}: expect.rows: the query failed: {e}"))?;
            diff::json("rows", &want.equals, &got, &mut diffs);
        }
        if !diffs.is_empty() {
            let mut text = format!(
                "{at}: {} difference(s) (- expected, + actual)\n",
                diffs.len()
            );
            for d in &diffs {
                d.render(&mut text);
            }
            return Err(text);
        }
    }
    Ok(())
}

fn message(topic: &str, offset: i64, input: &Input) -> Message {
    let mut m = Message::new(
        topic,
        0,
        offset,
        input.key.as_deref().map(str::as_bytes),
        b"",
    );
    m.payload = input.payload.clone().map(Into::into);
    if !input.headers.is_empty() {
        let mut h = rdkafka::message::OwnedHeaders::new();
        for (k, v) in &input.headers {
            h = h.insert(rdkafka::message::Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        m.set_headers(h);
    }
    m
}

/// Runs `original` to its end the way `Pipeline::execute_in` and the partition supervisor do —
/// each attempt on a fresh copy, the `completed` hooks after a success, a retryable error
/// retried until `max_attempts` — but without the backoff sleeps. Returns the last attempt, or
/// `None` when the message reached a processor marked in `blocked` (one the run cannot give).
async fn execute(
    chain: &[Arc<dyn Processor>],
    blocked: &[bool],
    retry: &RetryPolicy,
    original: &Message,
) -> Option<(Ended, u32)> {
    // A call not attempted (an open breaker; none are built here) is run again without
    // counting an attempt; bounded so that a test can never spin.
    let mut not_attempted = 0;
    let mut attempt = 1;
    loop {
        let mut msg = original.clone();
        let r = run_chain(chain, blocked, &mut msg).await?;
        let e = match r {
            Ok(Flow::Continue) => {
                for p in chain {
                    p.completed(original);
                }
                return Some((Ended::Processed(std::mem::take(&mut msg.outbox)), attempt));
            }
            Ok(Flow::Drop) => return Some((Ended::Dropped, attempt)),
            Ok(Flow::Duplicate) => return Some((Ended::Duplicate, attempt)),
            Err(e) => e,
        };
        if e.not_attempted_wait().is_some() && not_attempted < 100 {
            not_attempted += 1;
        } else if e.is_retryable() && attempt < retry.max_attempts {
            attempt += 1;
        } else {
            return Some((Ended::DeadLettered(e), attempt));
        }
    }
}

/// One attempt through the chain; `None` when it reaches a processor marked in `blocked`.
async fn run_chain(
    chain: &[Arc<dyn Processor>],
    blocked: &[bool],
    msg: &mut Message,
) -> Option<Result<Flow, ProcessError>> {
    for (i, p) in chain.iter().enumerate() {
        if blocked.get(i).copied().unwrap_or(false) {
            return None;
        }
        match p.process(msg).await {
            Ok(Flow::Continue) => {}
            stop => return Some(stop),
        }
    }
    Some(Ok(Flow::Continue))
}

/// A payload as JSON when it is JSON, as text otherwise.
fn payload_json(p: Option<&[u8]>) -> Value {
    match p {
        None => Value::Null,
        Some(b) => serde_json::from_slice(b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned())),
    }
}

fn body_json(b: &Body) -> Value {
    match b {
        Body::Json(v) => v.clone(),
        Body::Raw(s) => Value::String(s.clone()),
    }
}

fn headers_json(h: &[(String, String)]) -> Value {
    Value::Object(
        h.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

fn record_headers(r: &Record) -> Vec<(String, String)> {
    use rdkafka::message::Headers as _;
    r.headers.as_ref().map_or_else(Vec::new, |h| {
        h.iter()
            .map(|x| {
                (
                    x.key.to_string(),
                    String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect()
    })
}

fn record_json(r: &Record) -> Value {
    json!({
        "key": r.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "value": payload_json(r.payload.as_deref()),
        "headers": headers_json(&record_headers(r)),
    })
}

fn expected_record_json(r: &file::OutputRecord) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(k) = &r.key {
        m.insert("key".into(), Value::String(k.clone()));
    }
    if let Some(v) = &r.value {
        m.insert("value".into(), body_json(v));
    }
    if !r.headers.is_empty() {
        m.insert("headers".into(), headers_json(&r.headers));
    }
    Value::Object(m)
}

fn expected_outcome_json(o: &Outcome) -> Value {
    match o {
        Outcome::Outputs(topics) => json!({ "outputs": topics
            .iter()
            .map(|(t, rs)| (t.clone(), rs.iter().map(expected_record_json).collect()))
            .collect::<serde_json::Map<String, Value>>() }),
        Outcome::Dropped => json!("dropped"),
        Outcome::Duplicate => json!("duplicate"),
        Outcome::DeadLettered {
            kind,
            message_contains,
        } => {
            let mut m = json!({ "kind": kind });
            if let Some(c) = message_contains {
                m["message_contains"] = json!(c);
            }
            json!({ "dead_lettered": m })
        }
    }
}

fn ended_json(e: &Ended) -> Value {
    match e {
        Ended::Processed(records) => json!({ "outputs": by_topic(records)
            .iter()
            .map(|(t, rs)| (t.to_string(), rs.iter().map(|r| record_json(r)).collect()))
            .collect::<serde_json::Map<String, Value>>() }),
        Ended::Dropped => json!("dropped"),
        Ended::Duplicate => json!("duplicate"),
        Ended::DeadLettered(e) => json!({ "dead_lettered": {
            "kind": e.kind(),
            "message": e.message(),
            "retryable": e.is_retryable(),
        }}),
    }
}

fn by_topic(records: &[Record]) -> BTreeMap<&str, Vec<&Record>> {
    let mut m: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        m.entry(&r.topic).or_default().push(r);
    }
    m
}

/// The fields the test file gives, only.
fn expected_request_json(r: &file::Request) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(x) = &r.method {
        m.insert("method".into(), json!(x));
    }
    if let Some(x) = &r.path {
        m.insert("path".into(), json!(x));
    }
    if !r.headers.is_empty() {
        m.insert("headers".into(), headers_json(&r.headers));
    }
    if let Some(b) = &r.body {
        m.insert("body".into(), body_json(b));
    }
    Value::Object(m)
}

fn call_json(c: &stub::Call) -> Value {
    json!({
        "method": c.method,
        "path": c.path,
        "headers": headers_json(&c.headers),
        "body": payload_json(Some(&c.body)),
    })
}

fn compare(
    expect: &Expect,
    ended: &Ended,
    attempts: u32,
    calls: &[stub::Call],
    out: &mut Vec<Mismatch>,
) {
    match (&expect.outcome, ended) {
        (Outcome::Outputs(want), Ended::Processed(records)) => outputs(want, records, out),
        (Outcome::Dropped, Ended::Dropped) | (Outcome::Duplicate, Ended::Duplicate) => {}
        (
            Outcome::DeadLettered {
                kind,
                message_contains,
            },
            Ended::DeadLettered(e),
        ) => {
            if kind != e.kind() {
                out.push(Mismatch::new(
                    "dead_lettered.kind",
                    Some(json!(kind)),
                    Some(json!(e.kind())),
                ));
            }
            if let Some(c) = message_contains
                .as_ref()
                .filter(|c| !e.message().contains(*c))
            {
                out.push(Mismatch::new(
                    "dead_lettered.message (contains)",
                    Some(json!(c)),
                    Some(json!(e.message())),
                ));
            }
        }
        (want, got) => out.push(Mismatch::new(
            "outcome",
            Some(expected_outcome_json(want)),
            Some(ended_json(got)),
        )),
    }
    if let Some(n) = expect.attempts.filter(|&n| n != attempts) {
        out.push(Mismatch::new(
            "attempts",
            Some(json!(n)),
            Some(json!(attempts)),
        ));
    }
    if let Some(want) = &expect.http {
        requests(want, calls, out);
    }
}

fn outputs(
    want: &BTreeMap<String, Vec<file::OutputRecord>>,
    records: &[Record],
    out: &mut Vec<Mismatch>,
) {
    let got = by_topic(records);
    let mut topics: Vec<&str> = want
        .keys()
        .map(String::as_str)
        .chain(got.keys().copied())
        .collect();
    topics.sort();
    topics.dedup();
    for t in topics {
        let path = format!("outputs.{}", field(t));
        let w = want.get(t).map(Vec::as_slice).unwrap_or_default();
        let g = got.get(t).map(Vec::as_slice).unwrap_or_default();
        if w.len() != g.len() {
            let side = |v: Vec<Value>| (!v.is_empty()).then_some(Value::Array(v));
            out.push(Mismatch::new(
                path,
                side(w.iter().map(expected_record_json).collect()),
                side(g.iter().map(|r| record_json(r)).collect()),
            ));
            continue;
        }
        for (i, (w, g)) in w.iter().zip(g).enumerate() {
            let at = format!("{path}[{i}]");
            if let Some(k) = &w.key {
                let gk = g
                    .key
                    .as_deref()
                    .map(|k| String::from_utf8_lossy(k).into_owned());
                if gk.as_deref() != Some(k.as_str()) {
                    out.push(Mismatch::new(
                        format!("{at}.key"),
                        Some(json!(k)),
                        gk.map(Value::String),
                    ));
                }
            }
            body(
                &format!("{at}.value"),
                w.value.as_ref(),
                g.payload.as_deref(),
                out,
            );
            subset(
                &format!("{at}.headers"),
                &w.headers,
                &record_headers(g),
                out,
            );
        }
    }
}

fn requests(want: &[file::Request], calls: &[stub::Call], out: &mut Vec<Mismatch>) {
    if want.len() != calls.len() {
        out.push(Mismatch::new(
            format!(
                "http (requests: {} expected, {} received)",
                want.len(),
                calls.len()
            ),
            Some(Value::Array(
                want.iter().map(expected_request_json).collect(),
            )),
            Some(Value::Array(calls.iter().map(call_json).collect())),
        ));
        return;
    }
    for (i, (w, c)) in want.iter().zip(calls).enumerate() {
        let at = format!("http[{i}]");
        for (name, want, got) in [("method", &w.method, &c.method), ("path", &w.path, &c.path)] {
            if let Some(x) = want.as_ref().filter(|x| *x != got) {
                out.push(Mismatch::new(
                    format!("{at}.{name}"),
                    Some(json!(x)),
                    Some(json!(got)),
                ));
            }
        }
        body(&format!("{at}.body"), w.body.as_ref(), Some(&c.body), out);
        subset(&format!("{at}.headers"), &w.headers, &c.headers, out);
    }
}

/// An expected body against the bytes received: as JSON, or as exact text.
fn body(path: &str, want: Option<&Body>, got: Option<&[u8]>, out: &mut Vec<Mismatch>) {
    match (want, got) {
        (None, _) => {}
        (Some(w), None) => out.push(Mismatch::new(path, Some(body_json(w)), None)),
        (Some(Body::Json(w)), Some(g)) => match serde_json::from_slice::<Value>(g) {
            Ok(g) => diff::json(path, w, &g, out),
            Err(_) => out.push(Mismatch::new(
                format!("{path} (not JSON)"),
                Some(w.clone()),
                Some(json!(String::from_utf8_lossy(g))),
            )),
        },
        (Some(Body::Raw(w)), Some(g)) => {
            if w.as_bytes() != g {
                out.push(Mismatch::new(
                    path,
                    Some(json!(w)),
                    Some(json!(String::from_utf8_lossy(g))),
                ));
            }
        }
    }
}

/// Every expected header present with its value (others may be there too).
fn subset(
    path: &str,
    want: &[(String, String)],
    got: &[(String, String)],
    out: &mut Vec<Mismatch>,
) {
    for (k, v) in want {
        let g = got.iter().find(|(gk, _)| gk == k).map(|(_, gv)| gv);
        if g != Some(v) {
            out.push(Mismatch::new(
                format!("{path}.{}", field(k)),
                Some(json!(v)),
                g.map(|g| json!(g)),
            ));
        }
    }
}
