//! `sql`: keep a read model in PostgreSQL. Runs one parameterised statement per message, with
//! values taken from the message's JSON value, **exactly once** into the database.
//!
//! ```toml
//! [[processors]]
//! type = "sql"
//! url = "${ORDERS_DB_URL}"                 # postgres://user:pass@host:5432/db, from the environment
//! statement = "INSERT INTO orders (id, status, version) VALUES ($1, $2, 1) ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, version = orders.version + 1"
//! params = ["/id", "/status"]              # one per $n, in order
//! tls = "prefer"                           # disable | prefer | require | verify_full (default: the URL's sslmode, else prefer)
//! ca_file = "certs/db-ca.pem"              # verify_full: the CA to trust (default: the system's)
//! pool_size = 16                           # connections (default 16)
//! timeout = "10s"                          # one message's whole transaction (default 10s)
//! applied_table = "keyflow_applied"        # where source positions are recorded (default)
//! consumer = "orders-read-model"           # its name in applied_table (default: the pipeline name)
//! circuit_breaker = { failures = 5, cool_down = "10s" }
//! ```
//!
//! # Parameters
//! Each entry of `params` is a JSON pointer (RFC 6901: `/a/b/0`, `""` for the whole value) into
//! the value, or one of `$key`, `$topic`, `$partition`, `$offset`, `$timestamp` (the Kafka
//! record's, the timestamp in milliseconds since the epoch). The type of each `$n` is the one
//! PostgreSQL infers when the statement is prepared (once per connection), and the JSON value is
//! converted to it: text types (a number or boolean as its JSON text), `int2/4/8` (an integral
//! number, or a string holding one), `float4/8`, `numeric` (a number or a decimal string),
//! `bool`, `json`/`jsonb` (any value), `timestamptz`/`timestamp` (an RFC 3339 string or epoch
//! milliseconds), `date` (`YYYY-MM-DD`), `uuid`, `bytea` (a string's bytes; `$key` as is). JSON
//! `null` is SQL `NULL`. For any other type, cast a text parameter in the statement:
//! `$3::text::inet`. A missing field, or a value that does not convert, is a permanent error
//! naming the parameter and its pointer: the message goes to the dead-letter topic.
//!
//! # Exactly once
//! Each message runs in one transaction that (a) claims its source position in `applied_table`,
//! (b) runs the statement, (c) commits:
//!
//! ```sql
//! INSERT INTO keyflow_applied (consumer, topic, "partition", key, "offset") VALUES (…)
//! ON CONFLICT (consumer, topic, "partition", key) DO UPDATE SET "offset" = EXCLUDED."offset"
//!   WHERE keyflow_applied."offset" < EXCLUDED."offset"
//! RETURNING "offset"
//! ```
//!
//! No row back means this key already has an offset ≥ the message's: the message was applied
//! (before a crash, by the member that had the partition before a rebalance, or by an attempt
//! whose answer was lost), so the transaction is rolled back and the message counts as
//! `deduplicated`. One row per **key**, not per partition: keyflow runs the messages of one key
//! in offset order (`ordering = "key"` or `"partition"`), but the offsets of a partition
//! complete out of order across keys, so a partition's highest applied offset says nothing
//! about a lower offset of another key. The claim is an upsert, so two members racing on one
//! key (a zombie after a rebalance) serialise on its row lock: the second sees the first's
//! committed offset and skips. The statement and the claim commit or roll back together, so a
//! crash at any point leaves either both or neither.
//!
//! Cancellation: a message whose future is dropped mid-transaction (`timeout`, a drain
//! deadline, a stopped worker) closes its connection rather than return it to the pool inside a
//! transaction (`Conn`). The server then rolls the transaction back, unless its COMMIT had
//! already been sent (it is pipelined behind the statement): then it committed as a whole, and
//! the message's retry finds its claim and is skipped. Either way it is applied once.
//!
//! Consequences: a message **without a key** cannot be placed in that order and is refused
//! (permanent error, dead-lettered); `ordering = "unordered"` is refused by `keyflow validate`.
//! The table holds one row per key ever seen (as many as the read model); it is created when
//! the first connection is made if absent. To rebuild a read model from the start of the topic,
//! empty it and delete the consumer's rows from `applied_table` (or choose a new `consumer`).
//!
//! # Batches
//! With a pipeline `[batch]` table, a batch (at most one message per key, see
//! [`crate::batch`]) runs in **one** transaction: BEGIN and every message's claim pipelined in
//! one round trip, then the statement of each claimed message and COMMIT in a second. A message
//! whose claim finds its key already at or past its offset is `deduplicated` and its statement
//! is not run; the others commit together with their claims. Any error rolls the whole batch
//! back (the first error in batch order is reported: those after it are PostgreSQL's
//! "transaction is aborted"), and the pipeline retries or splits it. `timeout` bounds the
//! whole batch's transaction.
//!
//! # Errors
//! Connection errors, timeouts, and the SQLSTATEs of a transient condition (classes 08, 40
//! — serialization failure, deadlock —, 53, 55P03, 57P01-57P03, 57014, 58) are retryable, and
//! feed the circuit breaker: during an outage the pipeline pauses instead of using up
//! attempts, and connections are made again when the database is back. Every other SQLSTATE
//! (constraint violations, class 23; data exceptions, class 22; an undefined column, class 42…)
//! is permanent: the message goes to the dead-letter topic with the SQLSTATE in its reason.
//! The URL is never shown: logs and errors name the database as `postgres host:port/db`.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use serde::Deserialize;
use serde_json::Value;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::batch::BatchProcessor;
use super::breaker::{Breaker, BreakerConfig};
use super::{json, Flow, ProcessError, Processor};
use crate::config::HumanDuration;
use crate::gate::Gate;
use crate::message::Message;

const KIND: &str = "sql";

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// A PostgreSQL connection string (URL or `key=value` pairs). Never shown.
    pub url: String,
    pub statement: String,
    #[serde(default)]
    pub params: Vec<String>,
    #[serde(default)]
    pub tls: Option<TlsMode>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    #[serde(default = "default_applied_table")]
    pub applied_table: String,
    #[serde(default)]
    pub consumer: Option<String>,
    #[serde(default)]
    pub circuit_breaker: Option<BreakerConfig>,
}

/// The URL is left out: it carries the password.
impl std::fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &"<redacted>")
            .field("statement", &self.statement)
            .field("params", &self.params)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("applied_table", &self.applied_table)
            .field("consumer", &self.consumer)
            .field("circuit_breaker", &self.circuit_breaker)
            .finish()
    }
}

/// TLS to the database. `prefer` and `require` encrypt without checking the server's
/// certificate (libpq's meaning); `verify_full` checks it against `ca_file` (or the system's
/// roots) and the host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

/// Enough for `max_workers` of a typical pipeline; each connection is a server process.
fn default_pool_size() -> usize {
    16
}

fn default_timeout() -> HumanDuration {
    "10s".parse().expect("a valid duration")
}

fn default_applied_table() -> String {
    "keyflow_applied".into()
}

/// Where a parameter's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Pointer(String),
    Key,
    Topic,
    Partition,
    Offset,
    Timestamp,
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "$key" => Source::Key,
            "$topic" => Source::Topic,
            "$partition" => Source::Partition,
            "$offset" => Source::Offset,
            "$timestamp" => Source::Timestamp,
            p if p.starts_with('$') => {
                return Err(format!(
                    "{p:?} is not one of $key, $topic, $partition, $offset, $timestamp"
                ))
            }
            p => {
                pointer_error(p).map_or(Ok(()), Err)?;
                Source::Pointer(p.to_string())
            }
        })
    }
}

/// Why `p` is not a JSON pointer (RFC 6901), if it is not.
fn pointer_error(p: &str) -> Option<String> {
    if !p.is_empty() && !p.starts_with('/') {
        return Some(format!(
            "{p:?} is not a JSON pointer: expected \"\" or a path starting with '/', e.g. \"/{p}\""
        ));
    }
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Some(format!(
                "{p:?} is not a JSON pointer: '~' must be followed by 0 or 1"
            ));
        }
    }
    None
}

/// The highest `$n` of `statement`, outside quoted strings, quoted identifiers and comments.
fn highest_placeholder(statement: &str) -> usize {
    let b = statement.as_bytes();
    let (mut i, mut max) = (0, 0);
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'$' => {
                let start = i + 1;
                let mut end = start;
                while end < b.len() && b[end].is_ascii_digit() {
                    end += 1;
                }
                if end > start && (start == 1 || !b[i - 1].is_ascii_alphanumeric()) {
                    max = max.max(statement[start..end].parse().unwrap_or(0));
                }
                i = end.max(start) - 1;
            }
            _ => {}
        }
        i += 1;
    }
    max
}

fn is_identifier(s: &str) -> bool {
    s.split('.').count() <= 2
        && s.split('.').all(|p| {
            p.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && p.len() <= 63
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

impl SqlConfig {
    /// Checks that need no database. Relative `ca_file` paths are resolved against `base`.
    pub fn validate(&mut self, base: &std::path::Path) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if self.url.trim().is_empty() {
            v.push(("url".into(), "expected a PostgreSQL connection string, found an empty string (set it from the environment: url = \"${DB_URL}\")".into()));
        } else if tokio_postgres::Config::from_str(&self.url).is_err() {
            // Not echoed: it carries the password.
            v.push((
                "url".into(),
                "not a PostgreSQL connection string (postgres://user:password@host:5432/db or host=… dbname=… pairs)".into(),
            ));
        }
        if self.statement.trim().is_empty() {
            v.push((
                "statement".into(),
                "expected an SQL statement, found an empty string".into(),
            ));
        } else {
            let n = highest_placeholder(&self.statement);
            if n != self.params.len() {
                v.push((
                    "params".into(),
                    format!(
                        "the statement uses parameters up to ${n}, but params lists {} value(s)",
                        self.params.len()
                    ),
                ));
            }
        }
        for (i, p) in self.params.iter().enumerate() {
            if let Err(e) = p.parse::<Source>() {
                v.push((format!("params[{i}]"), e));
            }
        }
        if self.pool_size == 0 {
            v.push(("pool_size".into(), "expected at least 1, found 0".into()));
        }
        if self.timeout.get().is_zero() {
            v.push(("timeout".into(), "expected a duration above 0".into()));
        }
        if !is_identifier(&self.applied_table) {
            v.push((
                "applied_table".into(),
                format!(
                    "{:?} is not a table name (letters, digits, _; optionally schema.table)",
                    self.applied_table
                ),
            ));
        }
        if self
            .consumer
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            v.push(("consumer".into(), "expected a non-empty name".into()));
        }
        if let Some(ca) = &mut self.ca_file {
            if ca.is_relative() {
                *ca = base.join(&*ca);
            }
            if !ca.is_file() {
                v.push(("ca_file".into(), format!("{} is not a file", ca.display())));
            }
            if self.tls != Some(TlsMode::VerifyFull) {
                v.push((
                    "ca_file".into(),
                    "only used with tls = \"verify_full\"".into(),
                ));
            }
        }
        if let Some(b) = &self.circuit_breaker {
            v.extend(b.validate());
        }
        v
    }
}

/// The `sql` processor: a connection pool, the statement, and the claim of source positions.
pub struct Sql {
    pool: Pool,
    statement: String,
    params: Vec<Source>,
    consumer: String,
    /// The claim upsert on `applied_table` (see the module doc).
    claim: String,
    create: String,
    /// Set once `applied_table` is known to exist. A cancelled creation leaves it unset.
    created: tokio::sync::OnceCell<()>,
    /// `postgres host:port/db`: the database as errors and logs show it.
    target: String,
    timeout: Duration,
    breaker: Option<Breaker>,
}

impl Sql {
    pub fn new(cfg: &SqlConfig, gate: &Arc<Gate>, pipeline: &str) -> Result<Self, String> {
        let mut pg = tokio_postgres::Config::from_str(&cfg.url)
            .map_err(|_| "url: not a PostgreSQL connection string".to_string())?;
        pg.connect_timeout(cfg.timeout.get());
        let mut ssl = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls())
            .map_err(|e| format!("tls: {e}"))?;
        let verify = cfg.tls == Some(TlsMode::VerifyFull);
        if let Some(ca) = &cfg.ca_file {
            ssl.set_ca_file(ca)
                .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        }
        if !verify {
            ssl.set_verify(openssl::ssl::SslVerifyMode::NONE);
        }
        let mut tls = postgres_openssl::MakeTlsConnector::new(ssl.build());
        if !verify {
            tls.set_callback(|c, _| {
                c.set_verify_hostname(false);
                Ok(())
            });
        }
        match cfg.tls {
            Some(TlsMode::Disable) => pg.ssl_mode(SslMode::Disable),
            Some(TlsMode::Prefer) => pg.ssl_mode(SslMode::Prefer),
            Some(TlsMode::Require | TlsMode::VerifyFull) => pg.ssl_mode(SslMode::Require),
            None => &mut pg,
        };
        let target = describe_target(&pg);
        let mgr = Manager::from_config(
            pg,
            tls,
            ManagerConfig {
                // A connection whose socket died (a server restart) is dropped when it is
                // next taken from the pool; one that looks alive but is not fails its first
                // statement, a retryable error, and is dropped then (see `Conn`).
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .build()
            .map_err(|e| format!("pool: {e}"))?;
        let params = cfg
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| p.parse().map_err(|e| format!("params[{i}]: {e}")))
            .collect::<Result<_, String>>()?;
        let t = &cfg.applied_table;
        Ok(Sql {
            pool,
            statement: cfg.statement.clone(),
            params,
            consumer: cfg.consumer.clone().unwrap_or_else(|| pipeline.to_string()),
            claim: format!(
                "INSERT INTO {t} (consumer, topic, \"partition\", key, \"offset\") VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (consumer, topic, \"partition\", key) DO UPDATE SET \"offset\" = EXCLUDED.\"offset\" \
                 WHERE {t}.\"offset\" < EXCLUDED.\"offset\" RETURNING \"offset\""
            ),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (consumer TEXT NOT NULL, topic TEXT NOT NULL, \
                 \"partition\" INT NOT NULL, key BYTEA NOT NULL, \"offset\" BIGINT NOT NULL, \
                 PRIMARY KEY (consumer, topic, \"partition\", key))"
            ),
            created: tokio::sync::OnceCell::new(),
            breaker: cfg.circuit_breaker.map(|b| {
                Breaker::new(b, format!("{pipeline}/sql {target}"), gate.clone())
            }),
            target,
            timeout: cfg.timeout.get(),
        })
    }

    fn error(&self, e: &tokio_postgres::Error) -> ProcessError {
        db_error(&self.target, e)
    }

    async fn conn(&self) -> Result<Conn, ProcessError> {
        let obj = self.pool.get().await.map_err(|e| {
            let text = match e {
                deadpool_postgres::PoolError::Backend(e) => return self.error(&e),
                e => e.to_string(),
            };
            ProcessError::retryable(KIND, format!("{}: {text}", self.target))
        })?;
        Ok(Conn {
            obj: Some(obj),
            idle: true,
        })
    }

    /// Creates `applied_table` if absent, once per process.
    /// The statement and the claim, prepared (cached per connection), with the statement's
    /// parameter count checked against `params`.
    async fn prepare(
        &self,
        c: &Object,
    ) -> Result<(tokio_postgres::Statement, tokio_postgres::Statement), ProcessError> {
        let stmt = c
            .prepare_cached(&self.statement)
            .await
            .map_err(|e| self.error(&e))?;
        let claim = c
            .prepare_cached(&self.claim)
            .await
            .map_err(|e| self.error(&e))?;
        let n = stmt.params().len();
        if n != self.params.len() {
            return Err(ProcessError::permanent(
                KIND,
                format!(
                    "the statement takes {n} parameter(s), params lists {}",
                    self.params.len()
                ),
            ));
        }
        Ok((stmt, claim))
    }

    async fn ensure_table(&self) -> Result<(), ProcessError> {
        self.created
            .get_or_try_init(|| async {
                let conn = self.conn().await?;
                conn.client()
                    .batch_execute(&self.create)
                    .await
                    // Two processes creating it at once: one fails (23505 on pg_type); the
                    // retry finds the table.
                    .map_err(|e| {
                        ProcessError::retryable(
                            KIND,
                            format!("creating the applied table: {}", self.error(&e).message()),
                        )
                    })
            })
            .await
            .map(|_| ())
    }

    async fn apply(&self, msg: &Message) -> Result<Flow, ProcessError> {
        let Some(key) = msg.key.as_deref() else {
            return Err(ProcessError::permanent(
                KIND,
                "the message has no key: sql applies each key's messages in offset order and records the last one per key (see keyflow's README, sql)",
            ));
        };
        let doc = if self.params.iter().any(|p| matches!(p, Source::Pointer(_))) {
            json::parse(msg)?
        } else {
            Value::Null
        };
        self.ensure_table().await?;
        let mut conn = self.conn().await?;
        let c = conn.client();
        let (stmt, claim) = self.prepare(c).await?;
        let types = stmt.params();
        let args = self
            .params
            .iter()
            .zip(types)
            .enumerate()
            .map(|(i, (src, ty))| arg(src, ty, &doc, msg).map_err(|e| param_error(i, src, e)))
            .collect::<Result<Vec<Arg<'_>>, ProcessError>>()?;

        // Two round trips: BEGIN + claim, then statement + COMMIT, each pair pipelined.
        conn.idle = false;
        let c = conn.client();
        let topic: &str = &msg.topic;
        let position: [&(dyn ToSql + Sync); 5] =
            [&self.consumer, &topic, &msg.partition, &key, &msg.offset];
        let (begun, claimed) =
            tokio::join!(c.batch_execute("BEGIN"), c.query_opt(&claim, &position));
        begun.map_err(|e| self.error(&e))?;
        if claimed.map_err(|e| self.error(&e))?.is_none() {
            c.batch_execute("ROLLBACK")
                .await
                .map_err(|e| self.error(&e))?;
            conn.idle = true;
            return Ok(Flow::Duplicate);
        }
        // A failed statement aborts the transaction; the COMMIT behind it then rolls back.
        let (done, committed) =
            tokio::join!(c.execute_raw(&stmt, args.iter()), c.batch_execute("COMMIT"));
        // Both answered: the connection is idle again, whatever they said.
        conn.idle = answered(&done) && answered(&committed);
        done.map_err(|e| self.error(&e))?;
        committed.map_err(|e| self.error(&e))?;
        Ok(Flow::Continue)
    }

    /// A batch in one transaction: BEGIN and every message's claim pipelined in one round trip,
    /// then the statement of each message claimed and COMMIT in a second. A message already
    /// applied (no claim) is `Duplicate`; an error anywhere rolls the whole batch back (the
    /// first error in batch order is the cause; those after it are PostgreSQL's "transaction
    /// aborted"), and the caller splits the batch to find the failing message.
    async fn apply_batch(&self, msgs: &[&Message]) -> Result<Vec<Flow>, ProcessError> {
        let keys = msgs
            .iter()
            .map(|m| {
                m.key.as_deref().ok_or_else(|| {
                    ProcessError::permanent(
                        KIND,
                        "the message has no key: sql applies each key's messages in offset order and records the last one per key (see keyflow's README, sql)",
                    )
                })
            })
            .collect::<Result<Vec<&[u8]>, ProcessError>>()?;
        let pointers = self.params.iter().any(|p| matches!(p, Source::Pointer(_)));
        let docs = msgs
            .iter()
            .map(|m| {
                if pointers {
                    json::parse(m)
                } else {
                    Ok(Value::Null)
                }
            })
            .collect::<Result<Vec<Value>, ProcessError>>()?;
        self.ensure_table().await?;
        let mut conn = self.conn().await?;
        let c = conn.client();
        let (stmt, claim) = self.prepare(c).await?;
        let types = stmt.params();
        let args = msgs
            .iter()
            .zip(&docs)
            .map(|(m, doc)| {
                self.params
                    .iter()
                    .zip(types)
                    .enumerate()
                    .map(|(i, (src, ty))| arg(src, ty, doc, m).map_err(|e| param_error(i, src, e)))
                    .collect::<Result<Vec<Arg<'_>>, ProcessError>>()
            })
            .collect::<Result<Vec<_>, ProcessError>>()?;
        let topics: Vec<&str> = msgs.iter().map(|m| &*m.topic).collect();
        let positions: Vec<[&(dyn ToSql + Sync); 5]> = msgs
            .iter()
            .zip(&keys)
            .zip(&topics)
            .map(|((m, key), topic)| -> [&(dyn ToSql + Sync); 5] {
                [&self.consumer, topic, &m.partition, key, &m.offset]
            })
            .collect();

        conn.idle = false;
        let c = conn.client();
        let (begun, claimed) = tokio::join!(
            c.batch_execute("BEGIN"),
            futures::future::join_all(positions.iter().map(|p| c.query_opt(&claim, p)))
        );
        begun.map_err(|e| self.error(&e))?;
        let mut flows = Vec::with_capacity(msgs.len());
        for r in claimed {
            flows.push(match r.map_err(|e| self.error(&e))? {
                Some(_) => Flow::Continue,
                None => Flow::Duplicate,
            });
        }
        if !flows.contains(&Flow::Continue) {
            c.batch_execute("ROLLBACK")
                .await
                .map_err(|e| self.error(&e))?;
            conn.idle = true;
            return Ok(flows);
        }
        let (done, committed) = tokio::join!(
            futures::future::join_all(
                args.iter()
                    .zip(&flows)
                    .filter(|(_, f)| **f == Flow::Continue)
                    .map(|(a, _)| c.execute_raw(&stmt, a.iter()))
            ),
            c.batch_execute("COMMIT")
        );
        conn.idle = done.iter().all(answered) && answered(&committed);
        for d in done {
            d.map_err(|e| self.error(&e))?;
        }
        committed.map_err(|e| self.error(&e))?;
        Ok(flows)
    }

    async fn timed_batch(&self, msgs: &[&Message]) -> Result<Vec<Flow>, ProcessError> {
        tokio::time::timeout(self.timeout, self.apply_batch(msgs))
            .await
            .unwrap_or_else(|_| {
                Err(ProcessError::retryable(
                    KIND,
                    format!("{}: no answer within {:?}", self.target, self.timeout),
                ))
            })
    }

    async fn timed(&self, msg: &Message) -> Result<Flow, ProcessError> {
        tokio::time::timeout(self.timeout, self.apply(msg))
            .await
            .unwrap_or_else(|_| {
                Err(ProcessError::retryable(
                    KIND,
                    format!("{}: no answer within {:?}", self.target, self.timeout),
                ))
            })
    }
}

/// The server answered (with a result or an error of its own): the request is finished.
fn answered<T>(r: &Result<T, tokio_postgres::Error>) -> bool {
    r.as_ref().err().is_none_or(|e| e.as_db_error().is_some())
}

/// A pooled connection that goes back to the pool only if no transaction is left open on it:
/// dropped mid-transaction (a timeout, a cancelled worker, a broken socket), the connection is
/// closed instead, and the server rolls the transaction back.
struct Conn {
    obj: Option<Object>,
    idle: bool,
}

impl Conn {
    fn client(&self) -> &Object {
        self.obj.as_ref().expect("taken only on drop")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.idle {
            if let Some(o) = self.obj.take() {
                drop(Object::take(o));
            }
        }
    }
}

/// `postgres host:port/db`, without user or password.
fn describe_target(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("postgres {host}:{port}/{}", pg.get_dbname().unwrap_or(""))
}

/// Whether a SQLSTATE names a transient condition (see the module doc).
fn retryable_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "58"))
        || matches!(code, "55P03" | "57P01" | "57P02" | "57P03" | "57014")
}

fn db_error(target: &str, e: &tokio_postgres::Error) -> ProcessError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let mut text = format!("{target}: SQLSTATE {code}: {}", db.message());
            if let Some(c) = db.constraint() {
                text.push_str(&format!(" (constraint {c})"));
            }
            if let Some(c) = db.column() {
                text.push_str(&format!(" (column {c})"));
            }
            if retryable_sqlstate(code) {
                ProcessError::retryable(KIND, text)
            } else {
                ProcessError::permanent(KIND, text)
            }
        }
        // No SQLSTATE: the connection failed (refused, reset, closed, TLS), a retryable error.
        None => {
            // `error connecting to server`, then its causes (`Connection refused`), each once.
            let mut text = format!("{target}: {e}");
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let c_text = c.to_string();
                if !text.contains(&c_text) {
                    text.push_str(": ");
                    text.push_str(&c_text);
                }
                cause = c.source();
            }
            ProcessError::retryable(KIND, text)
        }
    }
}

fn param_error(i: usize, src: &Source, why: String) -> ProcessError {
    let name = match src {
        Source::Pointer(p) => p.as_str(),
        Source::Key => "$key",
        Source::Topic => "$topic",
        Source::Partition => "$partition",
        Source::Offset => "$offset",
        Source::Timestamp => "$timestamp",
    };
    ProcessError::permanent(KIND, format!("params[{i}] ({name:?}, ${}): {why}", i + 1))
}

/// A parameter value, converted to the type PostgreSQL expects for it.
#[derive(Debug)]
enum Arg<'a> {
    Null,
    Str(&'a str),
    String(String),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Json(&'a Value),
    JsonOwned(Value),
    Numeric(rust_decimal::Decimal),
    TimestampTz(chrono::DateTime<chrono::FixedOffset>),
    Timestamp(chrono::NaiveDateTime),
    Date(chrono::NaiveDate),
    Uuid(uuid::Uuid),
    Bytes(&'a [u8]),
    BytesOwned(Vec<u8>),
}

impl ToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Arg::Null => Ok(IsNull::Yes),
            Arg::Str(v) => v.to_sql(ty, out),
            Arg::String(v) => v.to_sql(ty, out),
            Arg::I16(v) => v.to_sql(ty, out),
            Arg::I32(v) => v.to_sql(ty, out),
            Arg::I64(v) => v.to_sql(ty, out),
            Arg::F32(v) => v.to_sql(ty, out),
            Arg::F64(v) => v.to_sql(ty, out),
            Arg::Bool(v) => v.to_sql(ty, out),
            Arg::Json(v) => v.to_sql(ty, out),
            Arg::JsonOwned(v) => v.to_sql(ty, out),
            Arg::Numeric(v) => v.to_sql(ty, out),
            Arg::TimestampTz(v) => v.to_sql(ty, out),
            Arg::Timestamp(v) => v.to_sql(ty, out),
            Arg::Date(v) => v.to_sql(ty, out),
            Arg::Uuid(v) => v.to_sql(ty, out),
            Arg::Bytes(v) => v.to_sql(ty, out),
            Arg::BytesOwned(v) => v.to_sql(ty, out),
        }
    }

    /// Each variant was chosen for its parameter's type (see [`convert`]).
    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The value of parameter `src`, for a parameter of type `ty`.
fn arg<'a>(src: &Source, ty: &Type, doc: &'a Value, msg: &'a Message) -> Result<Arg<'a>, String> {
    match src {
        Source::Pointer(p) => match doc.pointer(p) {
            Some(v) => convert(v, ty),
            None => Err(format!("the value has no field {p}")),
        },
        Source::Key => match msg.key.as_deref() {
            None => Ok(Arg::Null),
            Some(k) if *ty == Type::BYTEA => Ok(Arg::Bytes(k)),
            Some(k) => match std::str::from_utf8(k) {
                Ok(s) if is_text(ty) => Ok(Arg::Str(s)),
                Ok(s) => convert_owned(Value::String(s.to_string()), ty),
                Err(_) => Err(format!("the key is not UTF-8 text (for {ty}; use bytea)")),
            },
        },
        Source::Topic if is_text(ty) => Ok(Arg::Str(&msg.topic)),
        Source::Topic => convert_owned(Value::String(msg.topic.to_string()), ty),
        Source::Partition => convert_owned(Value::from(msg.partition), ty),
        Source::Offset => convert_owned(Value::from(msg.offset), ty),
        Source::Timestamp => convert_owned(msg.timestamp_ms.map_or(Value::Null, Value::from), ty),
    }
}

/// [`convert`] for a value made here (the key, the offset…), not borrowed from the message.
fn convert_owned(v: Value, ty: &Type) -> Result<Arg<'static>, String> {
    Ok(match convert(&v, ty)? {
        Arg::Str(s) => Arg::String(s.to_string()),
        Arg::Json(j) => Arg::JsonOwned(j.clone()),
        Arg::Bytes(b) => Arg::BytesOwned(b.to_vec()),
        Arg::Null => Arg::Null,
        Arg::String(s) => Arg::String(s),
        Arg::I16(n) => Arg::I16(n),
        Arg::I32(n) => Arg::I32(n),
        Arg::I64(n) => Arg::I64(n),
        Arg::F32(n) => Arg::F32(n),
        Arg::F64(n) => Arg::F64(n),
        Arg::Bool(b) => Arg::Bool(b),
        Arg::JsonOwned(j) => Arg::JsonOwned(j),
        Arg::Numeric(n) => Arg::Numeric(n),
        Arg::TimestampTz(t) => Arg::TimestampTz(t),
        Arg::Timestamp(t) => Arg::Timestamp(t),
        Arg::Date(d) => Arg::Date(d),
        Arg::Uuid(u) => Arg::Uuid(u),
        Arg::BytesOwned(b) => Arg::BytesOwned(b),
    })
}

fn is_text(ty: &Type) -> bool {
    <&str as ToSql>::accepts(ty)
}

fn found(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Converts a JSON value to a parameter of type `ty`. JSON `null` is SQL `NULL`.
fn convert<'a>(v: &'a Value, ty: &Type) -> Result<Arg<'a>, String> {
    if v.is_null() {
        return Ok(Arg::Null);
    }
    let expected = |what: &str| format!("expected {what} (a {ty} parameter), found {}", found(v));
    let int = |min: i64, max: i64| -> Result<i64, String> {
        let n = match v {
            Value::Number(n) => n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
                    .map(|f| f as i64)
            }),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        n.filter(|n| (min..=max).contains(n))
            .ok_or_else(|| expected(&format!("an integer between {min} and {max}")))
    };
    let float = || -> Result<f64, String> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .ok_or_else(|| expected("a number"))
    };
    Ok(match *ty {
        Type::INT2 => Arg::I16(int(i16::MIN.into(), i16::MAX.into())? as i16),
        Type::INT4 => Arg::I32(int(i32::MIN.into(), i32::MAX.into())? as i32),
        Type::INT8 => Arg::I64(int(i64::MIN, i64::MAX)?),
        Type::FLOAT4 => Arg::F32(float()? as f32),
        Type::FLOAT8 => Arg::F64(float()?),
        Type::NUMERIC => {
            let s = match v {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.trim().to_string(),
                _ => return Err(expected("a number")),
            };
            Arg::Numeric(
                rust_decimal::Decimal::from_str(&s)
                    .or_else(|_| rust_decimal::Decimal::from_scientific(&s))
                    .map_err(|_| expected("a decimal number"))?,
            )
        }
        Type::BOOL => Arg::Bool(v.as_bool().ok_or_else(|| expected("true or false"))?),
        Type::JSON | Type::JSONB => Arg::Json(v),
        Type::TIMESTAMPTZ => Arg::TimestampTz(match v {
            Value::String(s) => chrono::DateTime::parse_from_rfc3339(s.trim())
                .map_err(|_| expected("an RFC 3339 timestamp"))?,
            Value::Number(_) => chrono::DateTime::from_timestamp_millis(int(i64::MIN, i64::MAX)?)
                .ok_or_else(|| expected("milliseconds since the epoch"))?
                .fixed_offset(),
            _ => return Err(expected("an RFC 3339 timestamp")),
        }),
        Type::TIMESTAMP => Arg::Timestamp(match v {
            Value::String(s) => {
                let s = s.trim();
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| t.naive_utc())
                    .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f"))
                    .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
                    .map_err(|_| expected("a timestamp (RFC 3339 or YYYY-MM-DDTHH:MM:SS)"))?
            }
            Value::Number(_) => chrono::DateTime::from_timestamp_millis(int(i64::MIN, i64::MAX)?)
                .ok_or_else(|| expected("milliseconds since the epoch"))?
                .naive_utc(),
            _ => return Err(expected("a timestamp")),
        }),
        Type::DATE => Arg::Date(
            v.as_str()
                .and_then(|s| chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok())
                .ok_or_else(|| expected("a date (YYYY-MM-DD)"))?,
        ),
        Type::UUID => Arg::Uuid(
            v.as_str()
                .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
                .ok_or_else(|| expected("a UUID"))?,
        ),
        Type::BYTEA => Arg::Bytes(
            v.as_str()
                .ok_or_else(|| expected("a string"))?
                .as_bytes(),
        ),
        _ if is_text(ty) => match v {
            Value::String(s) => Arg::Str(s),
            other => Arg::String(other.to_string()),
        },
        _ => {
            return Err(format!(
                "sql does not convert JSON to {ty}; cast a text parameter in the statement (e.g. $n::text::{ty})"
            ))
        }
    })
}

#[async_trait]
impl Processor for Sql {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        match &self.breaker {
            Some(b) => b.call(KIND, self.timed(msg)).await,
            None => self.timed(msg).await,
        }
    }

    fn as_batch(&self) -> Option<&dyn BatchProcessor> {
        Some(self)
    }
}

/// `[batch]`: one transaction per batch (see [`Sql::apply_batch`]), the same claims.
#[async_trait]
impl BatchProcessor for Sql {
    async fn process_batch(&self, msgs: &[&Message]) -> Result<Vec<Flow>, ProcessError> {
        match &self.breaker {
            Some(b) => b.call(KIND, self.timed_batch(msgs)).await,
            None => self.timed_batch(msgs).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> SqlConfig {
        toml::from_str(&format!(
            "url = \"postgres://u:s3cret@db:5433/orders\"\nstatement = \"INSERT INTO t VALUES ($1, $2)\"\nparams = [\"/id\", \"$key\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn validates_without_a_database() {
        let base = std::path::Path::new(".");
        assert!(cfg("").validate(base).is_empty());
        let mut c = cfg("pool_size = 0\napplied_table = \"x; drop\"");
        c.params = vec!["id".into(), "$nope".into(), "/a~2".into()];
        c.url = "postgres://u:s3cret@db:notaport/x".into();
        let errs = c.validate(base);
        let text = format!("{errs:?}");
        for want in [
            "params[0]",
            "\\\"/id\\\"",
            "params[1]",
            "params[2]",
            "up to $2, but params lists 3",
            "pool_size",
            "applied_table",
            "url",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(!text.contains("s3cret"), "{text}");
        let mut c = cfg("");
        c.statement = " ".into();
        assert_eq!(c.validate(base)[0].0, "statement");
        assert!(!format!("{:?}", cfg("")).contains("s3cret"));
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            highest_placeholder("SELECT $1, $12, '$13', \"$14\" -- $15\n, $2"),
            12
        );
        assert_eq!(highest_placeholder("SELECT 1"), 0);
        assert_eq!(highest_placeholder("SELECT a$1 , $3"), 3);
    }

    #[test]
    fn sqlstates() {
        for (code, retryable) in [
            ("40001", true),
            ("40P01", true),
            ("57P01", true),
            ("08006", true),
            ("53300", true),
            ("23505", false),
            ("23502", false),
            ("22P02", false),
            ("42703", false),
            ("42P01", false),
        ] {
            assert_eq!(retryable_sqlstate(code), retryable, "{code}");
        }
    }

    #[test]
    fn conversions() {
        let v: Value = serde_json::json!({
            "n": 7, "big": 4_000_000_000i64, "f": 2.5, "s": "x", "b": true, "t": "2026-01-02T03:04:05+02:00",
            "d": "2026-01-02", "u": "67e55044-10b1-426f-9247-bb680e5fe0c8", "nul": null, "sn": "12"
        });
        let c = |p: &str, ty: &Type| convert(v.pointer(p).unwrap(), ty);
        assert!(matches!(c("/n", &Type::INT4), Ok(Arg::I32(7))));
        assert!(matches!(c("/sn", &Type::INT8), Ok(Arg::I64(12))));
        assert!(c("/big", &Type::INT4).unwrap_err().contains("between"));
        assert!(c("/f", &Type::INT4).is_err());
        assert!(matches!(c("/f", &Type::NUMERIC), Ok(Arg::Numeric(_))));
        assert!(matches!(c("/n", &Type::TEXT), Ok(Arg::String(s)) if s == "7"));
        assert!(matches!(c("/s", &Type::VARCHAR), Ok(Arg::Str("x"))));
        assert!(c("/s", &Type::BOOL).unwrap_err().contains("found \"x\""));
        assert!(matches!(c("/b", &Type::BOOL), Ok(Arg::Bool(true))));
        assert!(matches!(
            c("/t", &Type::TIMESTAMPTZ),
            Ok(Arg::TimestampTz(_))
        ));
        assert!(matches!(c("/d", &Type::DATE), Ok(Arg::Date(_))));
        assert!(matches!(c("/u", &Type::UUID), Ok(Arg::Uuid(_))));
        assert!(matches!(c("/nul", &Type::INT4), Ok(Arg::Null)));
        assert!(matches!(c("", &Type::JSONB), Ok(Arg::Json(_))));
        assert!(c("/s", &Type::INET).unwrap_err().contains("::text::inet"));
    }
}
