//! The actor tree of one pipeline:
//!
//! ```text
//! Coordinator (one per pipeline: owns the consumer, its poll thread and the assignment)
//!  ├── PartitionSupervisor  topic/0   (queue, key scheduler, flow control, offset tracker)
//!  │     ├── Worker 0  ─ runs the processor chain on one message at a time
//!  │     ├── Worker 1
//!  │     └── …         (an elastic pool: grows to the partition's concurrency, ≤ max_in_flight)
//!  └── PartitionSupervisor  topic/1
//!        └── …
//! ```
//!
//! `scheduler` and `flow` are plain data structures (unit- and property-tested); the actors
//! wire them to Kafka.

pub mod coordinator;
pub mod flow;
pub mod partition;
pub mod scheduler;
pub mod worker;
