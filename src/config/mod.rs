//! Configuration: file structs (serde, `deny_unknown_fields`) → validated specs.
//!
//! Two kinds of file:
//! - a global file (`keyflow.toml`, optional): brokers, HTTP address, librdkafka options for every
//!   client;
//! - one pipeline file per input topic (`pipelines/*.toml`): what to consume, how to process it,
//!   where results and failures go.
//!
//! Every setting can be overridden from the environment (`KEYFLOW_BROKERS`,
//! `KEYFLOW_PIPELINE_<NAME>__<FIELD>`), and `${VAR}` inside any string is replaced from the
//! environment, so secrets never sit in files. Errors name the file (or variable), the field, the
//! value and what was expected; [`load`] collects every error it can instead of stopping at one.

pub mod duration;
pub mod env;
pub mod kafka;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

pub use duration::HumanDuration;
pub use env::Env;
pub use kafka::{topic_name_error, TOPIC_NAME_RULE};

use crate::processors::ProcessorConfig;

/// One configuration error: where, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or `env KEYFLOW_…` when the value came from the environment.
    pub source: String,
    /// Dotted field path, empty for file-level errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(
                f,
                "{}: field `{}`: {}",
                self.source, self.field, self.message
            )
        }
    }
}

/// Every error found while loading; `Display` prints one per line.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// How messages of one partition may overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// A message starts only after the previous message with the same key on the same partition
    /// has completed; different keys run concurrently. Null keys carry no ordering.
    #[default]
    Key,
    /// One message at a time per partition (the classic consumer loop).
    Partition,
    /// No ordering: every message may start at once.
    Unordered,
}

/// Where a group with no committed offset starts. Explicit on purpose: the librdkafka default
/// (`latest`) silently skips a backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// The consumer group protocol (`group.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupProtocol {
    /// The classic protocol: the group leader assigns (keyflow uses `cooperative-sticky`), the
    /// session and heartbeat are client settings (`session_timeout`).
    #[default]
    Classic,
    /// KIP-848 (Kafka 4.0+): the broker assigns partitions incrementally and owns the session
    /// timeout, heartbeat interval and assignor settings.
    Consumer,
}

impl GroupProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

/// What a pipeline promises about its Kafka writes (`delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Writes are acknowledged before the input offset completes; a crash, a rebalance or a
    /// drain deadline can write an input's outputs again (duplicates, never loss).
    #[default]
    AtLeastOnce,
    /// Every write of the pipeline (forward, route, dead letter) and the input offsets that
    /// cover them are committed in one Kafka transaction: a `read_committed` reader sees each
    /// input's outputs exactly once.
    ExactlyOnce,
}

/// The largest `max_in_flight` allowed under `exactly_once`: the offsets completed above the
/// commit point must always fit the commit metadata (see `kafka::offsets::METADATA_CAP`), or a
/// crash would redo (and write again) what the transaction already committed.
pub const EXACTLY_ONCE_MAX_IN_FLIGHT: usize = 1000;

/// Under `exactly_once`, a partition takes no new message while this many offsets above its
/// commit point are received (complete or not): completions above a held-back message are not
/// bounded by `max_in_flight`, and each run of them costs metadata. 1,000 offsets in the worst
/// layout (every other one a transaction marker of the upstream producer) encode to ~2.7 KB,
/// under the 4,000-byte cap (`kafka::offsets` tests it).
pub const EXACTLY_ONCE_MAX_PENDING: usize = 1000;

/// Under `group_protocol = "consumer"` the session timeout is the broker's
/// `group.consumer.session.timeout.ms`, which a client cannot read; keyflow assumes Kafka's
/// default (also its default minimum) for the checks that depend on it.
pub const CONSUMER_PROTOCOL_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

/// The global file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalFile {
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Directory of pipeline files used when `keyflow run` is given no path.
    #[serde(default = "default_pipelines_dir")]
    pub pipelines: PathBuf,
    #[serde(default)]
    pub http: HttpConfig,
    /// The memory budget for messages of the whole process (see `memory`): librdkafka's
    /// prefetch, buffered, running and retrying messages. Default: half the container's memory
    /// limit, else 256 MiB.
    pub memory_limit: Option<ByteSize>,
    /// Passed verbatim to librdkafka for every client (security.protocol, sasl.*, ssl.*…).
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `/metrics` and `/health/*`; `"off"` disables the server.
    #[serde(default = "default_http_address")]
    pub address: String,
    /// Stuck-partition watchdog: lag > 0 and no message completed for this long.
    #[serde(default = "default_stuck_after")]
    pub stuck_after: HumanDuration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            address: default_http_address(),
            stuck_after: default_stuck_after(),
        }
    }
}

// Where the defaults come from: a local broker for development, the conventional layout.
fn default_brokers() -> String {
    "localhost:9092".into()
}
fn default_pipelines_dir() -> PathBuf {
    PathBuf::from("pipelines")
}
fn default_http_address() -> String {
    "0.0.0.0:9464".into()
}
// Long enough for a slow but healthy message, short enough to page before the backlog is hours.
fn default_stuck_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}

/// The validated global settings.
#[derive(Debug, Clone)]
pub struct Global {
    pub brokers: String,
    pub pipelines: PathBuf,
    pub http_address: Option<String>,
    /// `[http] stuck_after`: the stuck-partition watchdog threshold.
    pub stuck_after: Duration,
    /// `memory_limit` as written (`None`: derived at start, see [`crate::memory::resolve_limit`]).
    pub memory_limit: Option<u64>,
    pub kafka: Vec<(String, String)>,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            brokers: default_brokers(),
            pipelines: default_pipelines_dir(),
            http_address: Some(default_http_address()),
            stuck_after: default_stuck_after().get(),
            memory_limit: None,
            kafka: Vec::new(),
        }
    }
}

/// A pipeline file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Defaults to the file name without `.toml`.
    pub name: Option<String>,
    /// The input topic.
    pub topic: String,
    /// Defaults to `keyflow-<name>`.
    pub group_id: Option<String>,
    pub auto_offset_reset: OffsetReset,
    /// `classic` (default) or `consumer` (KIP-848).
    #[serde(default)]
    pub group_protocol: GroupProtocol,
    /// `at_least_once` (default) or `exactly_once` (Kafka transactions).
    #[serde(default)]
    pub delivery: Delivery,
    /// `exactly_once` only: how long the broker lets a transaction stay open before aborting
    /// it (`transaction.timeout.ms`). A crashed member's open transaction holds back
    /// `read_committed` readers until this passes, unless it restarts with the same
    /// `KEYFLOW_INSTANCE_ID`.
    #[serde(default = "default_transaction_timeout")]
    pub transaction_timeout: HumanDuration,
    #[serde(default)]
    pub ordering: Ordering,
    /// Messages buffered or running per partition; at the bound the partition is paused.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Payload+key bytes buffered or running per partition; at the bound the partition is paused.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: ByteSize,
    /// Resume a paused partition when both counts fall to this fraction of their bound.
    #[serde(default = "default_resume_at")]
    pub resume_at: f64,
    /// Worker actors per partition: how many messages run at once (≤ max_in_flight). Each
    /// worker costs a few tens of KiB; messages ready to start wait for a free worker.
    #[serde(default = "default_max_workers")]
    pub max_workers: usize,
    /// Start each attempt on the partition supervisor, moving it to a worker only if it awaits
    /// (the hot path: no hand-off for processors that finish at once). `false`: every attempt
    /// runs on a worker, for processors that block their thread (synchronous I/O, long
    /// computations), which would hold up the whole partition inline.
    #[serde(default = "default_inline")]
    pub inline: bool,
    /// Pause a partition on the consumer once it has stayed at its bound this long.
    #[serde(default = "default_pause_after")]
    pub pause_after: HumanDuration,
    #[serde(default = "default_commit_interval")]
    pub commit_interval: HumanDuration,
    /// Also commit as soon as this many messages completed since the last commit, so a burst
    /// (a backlog after a restart) is committed as it goes, not only on the timer.
    #[serde(default = "default_commit_every")]
    pub commit_every: u64,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
    /// Classic protocol only (default [`default_session_timeout`]); under `consumer` the broker
    /// sets it, so writing it is an error rather than a setting silently ignored.
    pub session_timeout: Option<HumanDuration>,
    /// How long start waits for a broker to answer before exiting with the cause.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout: HumanDuration,
    #[serde(default)]
    pub worker_restarts: RestartBudget,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Defaults to `<topic>.dlq`.
    pub dead_letter_topic: Option<String>,
    /// Per-key state with a changelog topic (see [`crate::state`]).
    #[serde(default)]
    pub state: Option<StateFile>,
    pub processors: Vec<ProcessorConfig>,
    /// Passed verbatim to librdkafka for this pipeline's clients, after the global `[kafka]`.
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
    /// Run the last processor on batches of messages (see [`crate::batch`]).
    #[serde(default)]
    pub batch: Option<BatchFile>,
}

/// `[batch]`: the last processor runs on batches of up to `max_messages` messages ready to
/// run, sent when full or `max_wait` after the first one was ready.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    #[serde(default = "default_batch_max_messages")]
    pub max_messages: usize,
    #[serde(default = "default_batch_max_wait")]
    pub max_wait: HumanDuration,
}

/// The validated `[batch]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpec {
    pub max_messages: usize,
    pub max_wait: std::time::Duration,
}

// 500 rows in one database transaction: the per-transaction cost (a round trip, a WAL flush)
// is spread thin while a failed batch's bisection stays ~9 levels deep.
fn default_batch_max_messages() -> usize {
    500
}
// A batch waits at most this long to fill: the latency a quiet stream pays for batching.
fn default_batch_max_wait() -> HumanDuration {
    HumanDuration::from_millis(50)
}
/// The most messages one batch may hold (a bisection of it is at most 14 levels deep).
pub const BATCH_MAX_MESSAGES: usize = 10_000;

// 1,000 in flight keeps a 2 ms downstream busy at 500k msg/s per partition while bounding memory.
fn default_max_in_flight() -> usize {
    1000
}
// 64 MiB: librdkafka's own default prefetch budget (queued.max.messages.kbytes).
fn default_max_buffered_bytes() -> ByteSize {
    ByteSize::mib(64)
}
// Half: a pause drops librdkafka's prefetch, so resume only once there is room for a full fetch.
fn default_resume_at() -> f64 {
    0.5
}
// 256 concurrent messages per partition: 128k msg/s per partition at a 2 ms downstream. Each
// worker actor's task and mailboxes cost ~10 KiB (massif): 12 partitions × 256 ≈ 30 MiB.
fn default_inline() -> bool {
    true
}

fn default_max_workers() -> usize {
    256
}
// Longer than a refetch after resume (~0.5 s measured): only sustained congestion pauses.
// The last resort: librdkafka's prefetch is already bounded by the memory budget, so a pause
// frees little, and each costs a refetch (~0.5 s) after the resume. A processor that keeps a
// partition at its bound for this long gives the prefetch back.
fn default_pause_after() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_commit_interval() -> HumanDuration {
    HumanDuration::from_secs(1)
}
// A commit per 1,000 completions: at 300k msg/s over 8 partitions, 300 commit requests a
// second; a crash redoes at most max_in_flight + 1,000 messages per partition.
fn default_commit_every() -> u64 {
    1000
}
// Short enough that a crashed member's open transaction does not hold back read_committed
// readers for long, long enough to hold the default drain (10 s) twice over.
fn default_transaction_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_drain_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
// librdkafka's default is 45 s; 30 s moves a dead member's partitions sooner.
fn default_session_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

// Long enough for a broker that is restarting alongside keyflow (a compose stack, a rolling
// restart); short enough that a wrong address or credentials fail the start visibly.
fn default_startup_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

/// How often workers may crash before the partition is failed (loudly).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartBudget {
    #[serde(default = "default_restart_max")]
    pub max: u32,
    #[serde(default = "default_restart_within")]
    pub within: HumanDuration,
}
fn default_restart_max() -> u32 {
    10
}
fn default_restart_within() -> HumanDuration {
    HumanDuration::from_secs(60)
}
impl Default for RestartBudget {
    fn default() -> Self {
        RestartBudget {
            max: default_restart_max(),
            within: default_restart_within(),
        }
    }
}

/// Retries of a failed message before it is dead-lettered.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff")]
    pub backoff: HumanDuration,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
}
fn default_max_attempts() -> u32 {
    5
}
fn default_backoff() -> HumanDuration {
    HumanDuration::from_millis(100)
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration::from_secs(10)
}
impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: default_max_attempts(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

/// `[state]`: the pipeline keeps per-key state, persisted to a compacted changelog topic.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Defaults to `<topic>.<pipeline>-changelog`.
    #[serde(default)]
    pub changelog: Option<String>,
    /// The state's part of the pipeline's memory share; beyond it, state spills to disk.
    /// Defaults to half the share (see [`crate::memory::STATE_SHARE`]).
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// Where the spill file is made (an anonymous file: nothing is left there). Defaults to
    /// the system's temporary directory.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// `[state]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSpec {
    /// The compacted changelog topic, co-partitioned with the input.
    pub changelog: String,
    /// `[state] memory` (`None`: [`crate::memory::STATE_SHARE`] of the pipeline's share).
    pub memory: Option<u64>,
    /// Where the spill file goes.
    pub dir: PathBuf,
}

/// A validated pipeline: every default resolved.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub file: PathBuf,
    pub name: String,
    pub topic: String,
    pub group_id: String,
    pub auto_offset_reset: OffsetReset,
    pub group_protocol: GroupProtocol,
    pub delivery: Delivery,
    pub transaction_timeout: std::time::Duration,
    pub ordering: Ordering,
    pub max_in_flight: usize,
    pub max_buffered_bytes: u64,
    pub resume_at: f64,
    pub max_workers: usize,
    pub inline: bool,
    pub pause_after: std::time::Duration,
    pub commit_interval: std::time::Duration,
    pub commit_every: u64,
    pub drain_timeout: std::time::Duration,
    /// The client's `session.timeout.ms` under `classic`; under `consumer` the broker's, assumed
    /// to be [`CONSUMER_PROTOCOL_SESSION_TIMEOUT`] (not sent to librdkafka).
    pub session_timeout: std::time::Duration,
    pub startup_timeout: std::time::Duration,
    pub worker_restarts: RestartBudget,
    pub retry: RetryPolicy,
    pub dead_letter_topic: String,
    /// `[state]`: per-key state and its changelog topic.
    pub state: Option<StateSpec>,
    pub processors: Vec<ProcessorConfig>,
    /// Global `[kafka]` then the pipeline's, as librdkafka strings.
    pub kafka: Vec<(String, String)>,
    /// `[batch]`: the last processor runs on batches.
    pub batch: Option<BatchSpec>,
}

/// Everything `keyflow run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub global: Global,
    pub pipelines: Vec<PipelineSpec>,
}

fn err(source: &str, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        source: source.to_string(),
        field: field.into(),
        message: message.into(),
    }
}

fn read_table(path: &Path, errs: &mut Vec<ConfigError>) -> Option<toml::Table> {
    let src = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errs.push(err(&src, "", format!("cannot read: {e}")));
            return None;
        }
    };
    match toml::from_str::<toml::Table>(&text) {
        Ok(t) => Some(t),
        Err(e) => {
            errs.push(err(
                &src,
                "",
                format!("not valid TOML: {}", e.to_string().trim_end()),
            ));
            None
        }
    }
}

/// Interpolates, then deserializes with the failing field's path in the error.
fn decode<T: serde::de::DeserializeOwned>(
    src: &str,
    mut table: toml::Table,
    overrides: &[(String, String)],
    env: &Env,
    errs: &mut Vec<ConfigError>,
) -> Option<T> {
    let mut ierrs = Vec::new();
    for (k, v) in table.iter_mut() {
        env::interpolate_tree(v, k, env, &mut ierrs);
    }
    if !ierrs.is_empty() {
        errs.extend(ierrs.into_iter().map(|(f, m)| err(src, f, m)));
        return None;
    }
    match serde_path_to_error::deserialize::<_, T>(toml::Value::Table(table)) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let source = overrides
                .iter()
                .find(|(p, _)| !path.is_empty() && path.starts_with(p.as_str()))
                .map(|(_, var)| format!("env {var}"))
                .unwrap_or_else(|| src.to_string());
            // toml appends "in `field`" on later lines; the path already says where.
            let msg = e.into_inner().to_string();
            let msg = msg.lines().next().unwrap_or_default().to_string();
            errs.push(err(&source, path, msg));
            None
        }
    }
}

fn kafka_strings(
    src: &str,
    table: &BTreeMap<String, toml::Value>,
    errs: &mut Vec<ConfigError>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in table {
        let field = format!("kafka.\"{k}\"");
        let s = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                errs.push(err(
                    src,
                    field,
                    format!(
                        "expected a string, number or boolean, found {}",
                        other.type_str()
                    ),
                ));
                continue;
            }
        };
        if let Some(why) = kafka::refusal(k, &s) {
            errs.push(err(src, field, why));
            continue;
        }
        out.push((k.clone(), s));
    }
    out
}

/// Loads the global file (if any) with `KEYFLOW_*` overrides.
pub fn load_global(path: Option<&Path>, env: &Env) -> Result<Global, ConfigErrors> {
    let mut errs = Vec::new();
    let src = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "environment".into());
    let mut table = match path {
        Some(p) => read_table(p, &mut errs).unwrap_or_default(),
        None => toml::Table::new(),
    };
    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    let overrides = env::overlay(
        &mut table,
        "KEYFLOW_",
        |f| {
            matches!(
                f,
                "brokers" | "pipelines" | "http" | "memory_limit" | "kafka"
            )
        },
        env,
    );
    let Some(file) = decode::<GlobalFile>(&src, table, &overrides, env, &mut errs) else {
        return Err(ConfigErrors(errs));
    };
    let kafka = kafka_strings(&src, &file.kafka, &mut errs);
    if file.brokers.trim().is_empty() {
        errs.push(err(
            &src,
            "brokers",
            "expected a comma-separated list of host:port, found \"\"",
        ));
    }
    if let Some(l) = file
        .memory_limit
        .filter(|l| l.as_u64() < crate::memory::MIN_LIMIT)
    {
        errs.push(err(
            &src,
            "memory_limit",
            format!(
                "expected at least {}, found {l}",
                ByteSize(crate::memory::MIN_LIMIT)
            ),
        ));
    }
    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    let http_address = (file.http.address != "off").then_some(file.http.address);
    Ok(Global {
        brokers: file.brokers,
        pipelines: file.pipelines,
        http_address,
        stuck_after: file.http.stuck_after.get(),
        memory_limit: file.memory_limit.map(|l| l.as_u64()),
        kafka,
    })
}

/// Loads and validates one pipeline file.
pub fn load_pipeline(
    path: &Path,
    global: &Global,
    env: &Env,
) -> Result<PipelineSpec, ConfigErrors> {
    let mut errs = Vec::new();
    let src = path.display().to_string();
    let Some(mut table) = read_table(path, &mut errs) else {
        return Err(ConfigErrors(errs));
    };
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("pipeline")
        .to_string();
    let name = table
        .get("name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or(stem);
    let prefix = format!("KEYFLOW_PIPELINE_{}__", env::env_name(&name));
    let overrides = env::overlay(&mut table, &prefix, |_| true, env);
    let Some(file) = decode::<PipelineFile>(&src, table, &overrides, env, &mut errs) else {
        return Err(ConfigErrors(errs));
    };
    let spec = validate_pipeline(path, name, file, global, &mut errs);
    if errs.is_empty() {
        Ok(spec)
    } else {
        Err(ConfigErrors(errs))
    }
}

fn validate_pipeline(
    path: &Path,
    name: String,
    f: PipelineFile,
    global: &Global,
    errs: &mut Vec<ConfigError>,
) -> PipelineSpec {
    let src = path.display().to_string();
    let e =
        |errs: &mut Vec<ConfigError>, field: &str, msg: String| errs.push(err(&src, field, msg));
    if name.trim().is_empty() {
        e(errs, "name", "expected a non-empty name, found \"\"".into());
    }
    let topic_ok = match topic_name_error(&f.topic) {
        Some(why) => {
            e(errs, "topic", why);
            false
        }
        None => true,
    };
    if f.max_in_flight == 0 {
        e(errs, "max_in_flight", "expected at least 1, found 0".into());
    }
    if f.max_workers == 0 {
        e(errs, "max_workers", "expected at least 1, found 0".into());
    }
    if f.max_buffered_bytes.as_u64() < 1024 {
        e(
            errs,
            "max_buffered_bytes",
            format!("expected at least 1 KiB, found {}", f.max_buffered_bytes),
        );
    }
    if !(f.resume_at > 0.0 && f.resume_at < 1.0) {
        e(
            errs,
            "resume_at",
            format!(
                "expected a fraction between 0 and 1 (exclusive), found {}",
                f.resume_at
            ),
        );
    }
    if f.ordering == Ordering::Unordered {
        for (i, p) in f.processors.iter().enumerate() {
            if let ProcessorConfig::Sql(_) = p {
                e(
                    errs,
                    &format!("processors[{i}]"),
                    "`sql` records the last applied offset per key, which needs each key's messages in offset order: use ordering = \"key\" (or \"partition\"), not \"unordered\"".into(),
                );
            }
        }
    }
    if let Some(b) = &f.batch {
        for (field, why) in batch_errors(b, &f) {
            e(errs, &field, why);
        }
    }
    if f.commit_interval.get().is_zero() {
        e(
            errs,
            "commit_interval",
            "expected a positive duration, found \"0s\"".into(),
        );
    }
    if f.delivery == Delivery::ExactlyOnce {
        if f.max_in_flight > EXACTLY_ONCE_MAX_IN_FLIGHT {
            e(
                errs,
                "max_in_flight",
                format!("expected at most {EXACTLY_ONCE_MAX_IN_FLIGHT} under delivery = \"exactly_once\" (the offsets completed above the commit point must fit the commit metadata), found {}", f.max_in_flight),
            );
        }
        for (i, p) in f.processors.iter().enumerate() {
            if let ProcessorConfig::Http(_) = p {
                e(
                    errs,
                    &format!("processors[{i}]"),
                    "an `http` call cannot join a Kafka transaction: under delivery = \"exactly_once\" it could run again after a crash or a rebalance, so the pipeline would not be exactly-once; use delivery = \"at_least_once\" with an idempotent downstream (e.g. `dedup`, an idempotency key)".into(),
                );
            }
        }
        let t = f.transaction_timeout.get();
        if t < std::time::Duration::from_secs(1) || t > std::time::Duration::from_secs(900) {
            e(
                errs,
                "transaction_timeout",
                format!("expected between 1s and 15m (the broker's transaction.max.timeout.ms), found {t:?}"),
            );
        } else {
            // A transaction stays open until the next commit (or the end of a drain): the
            // broker aborts it at the timeout and fences the producer.
            for (field, d) in [
                ("commit_interval", f.commit_interval.get()),
                ("drain_timeout", f.drain_timeout.get()),
            ] {
                if d * 2 > t {
                    e(
                        errs,
                        field,
                        format!("expected at most half of transaction_timeout ({t:?}) under delivery = \"exactly_once\" (the broker aborts a transaction left open that long), found {d:?}"),
                    );
                }
            }
        }
    }
    if f.commit_every == 0 {
        e(
            errs,
            "commit_every",
            "expected a positive number of messages, found 0".into(),
        );
    }
    if f.startup_timeout.get().is_zero() {
        e(
            errs,
            "startup_timeout",
            "expected a positive duration (how long start waits for a broker), found \"0s\"".into(),
        );
    }
    let session_timeout = match (f.group_protocol, f.session_timeout) {
        (GroupProtocol::Classic, t) => {
            let t = t.unwrap_or_else(default_session_timeout);
            if t.get() < std::time::Duration::from_secs(1) {
                e(
                    errs,
                    "session_timeout",
                    format!("expected at least \"1s\", found \"{t}\""),
                );
            }
            if f.drain_timeout >= t {
                e(
                    errs,
                    "drain_timeout",
                    format!(
                        "\"{}\" must be below session_timeout (\"{t}\"): a member that drains longer than its session is expelled while it drains",
                        f.drain_timeout
                    ),
                );
            }
            t.get()
        }
        (GroupProtocol::Consumer, set) => {
            let t = CONSUMER_PROTOCOL_SESSION_TIMEOUT;
            if set.is_some() {
                e(
                    errs,
                    "session_timeout",
                    format!(
                        "does not apply under group_protocol = \"consumer\": the session timeout is set on the broker (group.consumer.session.timeout.ms, {} by default); remove it",
                        HumanDuration(t)
                    ),
                );
            }
            if f.drain_timeout.get() >= t {
                e(
                    errs,
                    "drain_timeout",
                    format!(
                        "\"{}\" must be below the broker's session timeout (group.consumer.session.timeout.ms, assumed \"{}\", Kafka's default and minimum): a member that drains longer than its session is expelled while it drains",
                        f.drain_timeout,
                        HumanDuration(t)
                    ),
                );
            }
            t
        }
    };
    if f.retry.max_attempts == 0 {
        e(
            errs,
            "retry.max_attempts",
            "expected at least 1, found 0".into(),
        );
    }
    if f.retry.backoff > f.retry.max_backoff {
        e(
            errs,
            "retry.backoff",
            format!(
                "\"{}\" must not exceed retry.max_backoff (\"{}\")",
                f.retry.backoff, f.retry.max_backoff
            ),
        );
    }
    if f.processors.is_empty() {
        e(
            errs,
            "processors",
            "expected at least one [[processors]] entry, found none".into(),
        );
    }
    let mut f = f;
    let base = path.parent().unwrap_or(Path::new("."));
    for (i, p) in f.processors.iter_mut().enumerate() {
        for (field, msg) in p.validate(&f.topic, base) {
            e(errs, &format!("processors[{i}].{field}"), msg);
        }
        for (field, topic) in output_topics(p) {
            // An empty name is already reported by the processor's own validation.
            if topic.trim().is_empty() {
                continue;
            }
            if let Some(why) = topic_name_error(topic) {
                e(errs, &format!("processors[{i}].{field}"), why);
            }
        }
    }
    let (dead_letter_topic, dlq_default) = match f.dead_letter_topic {
        Some(t) => (t, false),
        None => (format!("{}.dlq", f.topic), true),
    };
    // A refused name would surface only at the first poison message, and pause the pipeline.
    if !dlq_default || topic_ok {
        if let Some(why) = topic_name_error(&dead_letter_topic) {
            let why = if dlq_default {
                why.replacen(
                    " is not a valid",
                    " (the default, <topic>.dlq) is not a valid",
                    1,
                )
            } else {
                why
            };
            e(errs, "dead_letter_topic", why);
        }
    }
    if dead_letter_topic == f.topic {
        e(
            errs,
            "dead_letter_topic",
            format!(
                "{dead_letter_topic:?} is the input topic: dead letters would be consumed again"
            ),
        );
    }
    let state = f.state.map(|st| StateSpec {
        changelog: st
            .changelog
            .unwrap_or_else(|| format!("{}.{}-changelog", f.topic, name)),
        memory: st.memory.map(|m| m.as_u64()),
        dir: st.dir.unwrap_or_else(std::env::temp_dir),
    });
    if let Some(m) = state.as_ref().and_then(|st| st.memory) {
        if m < 128 << 10 {
            e(
                errs,
                "state.memory",
                format!("{} is too small, expected at least 128 KiB", ByteSize(m)),
            );
        }
    }
    if let Some(st) = &state {
        if let Some(why) = topic_name_error(&st.changelog) {
            e(errs, "state.changelog", why);
        }
        if st.changelog == f.topic || st.changelog == dead_letter_topic {
            e(
                errs,
                "state.changelog",
                format!(
                    "{:?} is the input or dead-letter topic: the changelog needs its own topic",
                    st.changelog
                ),
            );
        }
    }
    let mut kafka = global.kafka.clone();
    kafka.extend(kafka_strings(&src, &f.kafka, errs));
    for (k, _) in &kafka {
        if let Some(why) = kafka::protocol_refusal(k, f.group_protocol) {
            let origin = if f.kafka.contains_key(k) {
                ""
            } else {
                "set in the global [kafka], which every pipeline inherits: "
            };
            e(errs, &format!("kafka.\"{k}\""), format!("{origin}{why}"));
        }
    }
    if let Some(why) = kafka::size_conflict(&kafka) {
        e(errs, "kafka.\"receive.message.max.bytes\"", why);
    }
    let group_id = f.group_id.unwrap_or_else(|| format!("keyflow-{name}"));
    PipelineSpec {
        file: path.to_path_buf(),
        name,
        topic: f.topic,
        group_id,
        auto_offset_reset: f.auto_offset_reset,
        group_protocol: f.group_protocol,
        delivery: f.delivery,
        transaction_timeout: f.transaction_timeout.get(),
        ordering: f.ordering,
        max_in_flight: f.max_in_flight,
        max_buffered_bytes: f.max_buffered_bytes.as_u64(),
        resume_at: f.resume_at,
        pause_after: f.pause_after.get(),
        max_workers: f.max_workers.min(f.max_in_flight).max(1),
        inline: f.inline,
        commit_interval: f.commit_interval.get(),
        commit_every: f.commit_every,
        drain_timeout: f.drain_timeout.get(),
        session_timeout,
        startup_timeout: f.startup_timeout.get(),
        worker_restarts: f.worker_restarts,
        retry: f.retry,
        dead_letter_topic,
        state,
        processors: f.processors,
        kafka,
        batch: f.batch.map(|b| BatchSpec {
            max_messages: b.max_messages,
            max_wait: b.max_wait.get(),
        }),
    }
}

/// `[batch]` checks: the bounds, a last processor that takes batches, and no exactly-once
/// (a batch's outputs would have to join the Kafka transaction as one).
fn batch_errors(b: &BatchFile, f: &PipelineFile) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if !(1..=BATCH_MAX_MESSAGES).contains(&b.max_messages) {
        v.push((
            "batch.max_messages".into(),
            format!(
                "expected between 1 and {BATCH_MAX_MESSAGES}, found {}",
                b.max_messages
            ),
        ));
    }
    if b.max_wait.get().is_zero() {
        v.push((
            "batch.max_wait".into(),
            "expected a duration above 0, found \"0s\"".into(),
        ));
    }
    if f.delivery == Delivery::ExactlyOnce {
        v.push((
            "batch".into(),
            "batches are not supported with delivery = \"exactly_once\" yet: use \"at_least_once\" (the `sql` processor is exactly-once into its database either way)".into(),
        ));
    }
    if f.state.is_some() {
        v.push((
            "batch".into(),
            "[state] with [batch] is not supported yet: the batch path never applies a per-key state change (every message of a key would see the state its last restore left); remove one of them".into(),
        ));
    }
    match f.processors.last() {
        Some(ProcessorConfig::Sql(_) | ProcessorConfig::Custom(_)) => {}
        Some(ProcessorConfig::Http(h)) if h.batch => {}
        Some(p) => v.push((
            format!("processors[{}]", f.processors.len() - 1),
            format!(
                "[batch] runs the last processor on batches, which must take them: `sql`, `http` with batch = true, or a custom batch processor; found `{}`",
                p.type_name()
            ),
        )),
        None => {}
    }
    v
}

/// The topics a processor writes to, with their field paths.
fn output_topics(p: &ProcessorConfig) -> Vec<(String, &str)> {
    match p {
        ProcessorConfig::Forward(c) => vec![("topic".to_string(), c.topic.as_str())],
        ProcessorConfig::Route(c) => c
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("routes[{i}].topic"), r.topic.as_str()))
            .chain(
                c.default
                    .iter()
                    .map(|t| ("default".to_string(), t.as_str())),
            )
            .collect(),
        _ => Vec::new(),
    }
}

/// Expands files and directories (every `*.toml` inside but `*.test.toml`, sorted) into pipeline
/// files.
pub fn pipeline_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ConfigErrors> {
    let mut out = Vec::new();
    let mut errs = Vec::new();
    for p in paths {
        if p.is_dir() {
            match std::fs::read_dir(p) {
                Ok(rd) => {
                    let mut files: Vec<PathBuf> = rd
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                        // `x.test.toml`: the tests of `x.toml` (`keyflow test`), not a pipeline.
                        .filter(|f| !f.to_string_lossy().ends_with(".test.toml"))
                        .collect();
                    files.sort();
                    if files.is_empty() {
                        errs.push(err(
                            &p.display().to_string(),
                            "",
                            "directory holds no *.toml pipeline file",
                        ));
                    }
                    out.extend(files);
                }
                Err(e) => errs.push(err(
                    &p.display().to_string(),
                    "",
                    format!("cannot read directory: {e}"),
                )),
            }
        } else if p.exists() {
            out.push(p.clone());
        } else {
            errs.push(err(
                &p.display().to_string(),
                "",
                "no such file or directory",
            ));
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errs))
    }
}

/// Loads every pipeline, collecting all errors, and checks them against each other.
pub fn load(global: Global, paths: &[PathBuf], env: &Env) -> Result<Config, ConfigErrors> {
    let files = pipeline_files(paths)?;
    let mut errs = Vec::new();
    let mut pipelines: Vec<PipelineSpec> = Vec::new();
    for f in &files {
        match load_pipeline(f, &global, env) {
            Ok(p) => pipelines.push(p),
            Err(ConfigErrors(e)) => errs.extend(e),
        }
    }
    let mut names: HashMap<&str, &Path> = HashMap::new();
    let mut topics: HashMap<&str, &Path> = HashMap::new();
    for p in &pipelines {
        if let Some(other) = names.insert(&p.name, &p.file) {
            errs.push(err(
                &p.file.display().to_string(),
                "name",
                format!("{:?} is also the name of {}", p.name, other.display()),
            ));
        }
        if let Some(other) = topics.insert(&p.topic, &p.file) {
            errs.push(err(
                &p.file.display().to_string(),
                "topic",
                format!(
                    "{:?} is also consumed by {}: one pipeline file per input topic",
                    p.topic,
                    other.display()
                ),
            ));
        }
    }
    if errs.is_empty() {
        Ok(Config { global, pipelines })
    } else {
        Err(ConfigErrors(errs))
    }
}

#[cfg(test)]
mod tests;
