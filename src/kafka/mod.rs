//! Everything that talks to librdkafka: client construction, the consumer context (the
//! rebalance rendezvous with the actors), and offsets (the tracker and the one commit call).

pub mod client;
pub mod committer;
pub mod context;
pub mod offsets;
pub mod queue;
pub mod transaction;

pub use client::{Consumer, Producer};
pub use context::KeyflowContext;
pub use offsets::OffsetTracker;
