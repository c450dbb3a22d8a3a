//! keyflow: consume Kafka topics and process every message with per-key ordering, bounded
//! memory and commit on completion.
//!
//! # Layout
//! - [`config`]: pipeline and global files → validated [`config::PipelineSpec`]s.
//! - [`kafka`]: client construction, the consumer context (rebalance rendezvous) and the
//!   [`kafka::OffsetTracker`] with the one commit call.
//! - [`actors`]: the actor tree — [`actors::coordinator`] (one per pipeline) →
//!   [`actors::partition`] supervisors (one per assigned partition; with
//!   [`actors::scheduler`] and [`actors::flow`]) → [`actors::worker`]s.
//! - [`processors`]: the [`processors::Processor`] trait and the built-ins.
//! - [`pipeline`]: the chain with retries and the dead-letter writer, run by workers;
//!   [`batch`]: `[batch]` pipelines (batches formed per partition, retried, split).
//! - [`runtime`]: starts pipelines and stops them in order; [`shutdown`]: signals.
//! - [`stats`]: live counters; [`demo`]: the embedded demo.
//! - [`gate`]: the pipeline-wide pause held by an open circuit breaker or a failing DLQ;
//!   [`dlq`]: `keyflow dlq replay`.
//! - Observability: [`metrics`] (names, buckets, recorder, handles) · [`http`] (`/metrics`,
//!   `/health/*`, `/debug/partitions`) · [`introspect`] (the debug report, `keyflow status`) ·
//!   [`trace`] (W3C `traceparent` continued on every write).
//! - [`state`]: per-key state for stateful processors, its changelog topic and restore.
//! - [`testing`]: `keyflow test`, a pipeline's test cases run through its chain without a broker.

pub mod actors;
pub mod batch;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod gate;
pub mod http;
pub mod introspect;
pub mod kafka;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod processors;
pub mod runtime;
pub mod shutdown;
pub mod state;
pub mod stats;
pub mod testing;
pub mod trace;

pub use message::Message;
pub use processors::{Flow, ProcessError, Processor};
pub use runtime::Runtime;
