//! The runtime: builds each pipeline (producer, processor chain) and its coordinator, and stops
//! them in order.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::actors::coordinator::{Coordinator, CoordinatorArgs, CoordinatorMsg, ShutdownReport};
use crate::config::Config;
use crate::kafka::client;
use crate::pipeline::Pipeline;
use crate::processors::{build_chain, BuildContext, Processor};
use crate::stats::PipelineStats;

/// Configured, not yet started.
pub struct Runtime {
    config: Config,
    custom: HashMap<String, Arc<dyn Processor>>,
    /// One per pipeline, in configuration order, made before the start so that `/health` and
    /// `/metrics` can serve during the startup wait (each marked `starting` until its
    /// coordinator has reached its brokers and subscribed).
    stats: Vec<Arc<PipelineStats>>,
}

/// Started: pipelines are consuming.
pub struct Running {
    coordinators: Vec<(
        String,
        ActorRef<CoordinatorMsg>,
        ractor::concurrency::JoinHandle<()>,
    )>,
    /// One per pipeline, in configuration order.
    pub stats: Vec<Arc<PipelineStats>>,
    fatal: mpsc::UnboundedReceiver<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The client could not be created (librdkafka refused the configuration); secrets
    /// redacted.
    #[error("pipeline {pipeline}: kafka client: {message}")]
    Kafka { pipeline: String, message: String },
    #[error("pipeline {pipeline}: {message}")]
    Build { pipeline: String, message: String },
    #[error("pipeline {pipeline}: coordinator did not start: {message}")]
    Spawn { pipeline: String, message: String },
    /// No broker answered within `startup_timeout`, or they refused the credentials or the
    /// certificate: the cause is librdkafka's last error, secrets redacted.
    #[error("pipeline {pipeline}: {source}")]
    Unreachable {
        pipeline: String,
        source: crate::actors::coordinator::Unreachable,
    },
    /// The stop future of [`Runtime::start_unless`] resolved first (SIGTERM during the startup
    /// wait); the pipelines already started have been shut down.
    #[error("stopped while starting (pipeline {pipeline} was waiting for its brokers)")]
    Stopped { pipeline: String },
}

impl StartError {
    fn spawn(pipeline: &str, e: ractor::SpawnErr, secrets: &[String]) -> Self {
        if let ractor::SpawnErr::StartupFailed(inner) = &e {
            if let Some(u) = inner.downcast_ref::<crate::actors::coordinator::Unreachable>() {
                return StartError::Unreachable {
                    pipeline: pipeline.to_string(),
                    source: crate::actors::coordinator::Unreachable {
                        waited: u.waited,
                        cause: u.cause.clone(),
                    },
                };
            }
        }
        // librdkafka's refusal of a configuration may quote the value.
        StartError::Spawn {
            pipeline: pipeline.to_string(),
            message: crate::kafka::context::redact(&e.to_string(), secrets),
        }
    }
}

impl Runtime {
    pub fn new(config: Config) -> Self {
        let stats = config
            .pipelines
            .iter()
            .map(|spec| {
                let s = PipelineStats::with_topic(&spec.name, &spec.topic);
                s.starting.store(true, std::sync::atomic::Ordering::Relaxed);
                s
            })
            .collect();
        Runtime {
            config,
            custom: HashMap::new(),
            stats,
        }
    }

    /// Every pipeline's stats, before the start: serve `/health` and `/metrics` with them while
    /// [`Runtime::start`] waits for the brokers.
    pub fn stats(&self) -> Vec<Arc<PipelineStats>> {
        self.stats.clone()
    }

    /// Registers a processor written in Rust, used by `[[processors]] type = "custom", name = …`.
    pub fn with_processor(mut self, name: &str, p: Arc<dyn Processor>) -> Self {
        self.custom.insert(name.to_string(), p);
        self
    }

    /// Starts every pipeline, in order; each waits up to its `startup_timeout` for its brokers.
    pub async fn start(self) -> Result<Running, StartError> {
        self.start_unless(std::future::pending()).await
    }

    /// [`Runtime::start`], unless `stop` resolves first (a signal during the startup wait): then
    /// the pipeline waiting for its brokers gives up at once (its coordinator's start is dropped,
    /// which stops its poll thread), those already started are shut down, and the result is
    /// [`StartError::Stopped`].
    pub async fn start_unless(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Running, StartError> {
        tokio::pin!(stop);
        crate::metrics::set_stuck_after(self.config.global.stuck_after);
        let (fatal_tx, fatal) = mpsc::unbounded_channel();
        let mut coordinators = Vec::new();
        let mut stats = Vec::new();
        let brokers = self.config.global.brokers.clone();
        let (memory_limit, source) = crate::memory::resolve_limit(self.config.global.memory_limit);
        crate::metrics::set_memory_limit(memory_limit);
        let pipelines = self.config.pipelines.len();
        info!(
            memory_limit = %bytesize::ByteSize(memory_limit),
            ?source,
            pipelines,
            "memory budget for messages"
        );
        for (spec, pstats) in self.config.pipelines.into_iter().zip(self.stats) {
            let mut memory = crate::memory::PipelineMemory::new(
                memory_limit,
                pipelines,
                spec.max_buffered_bytes,
            );
            if let Some(st) = &spec.state {
                memory = memory
                    .with_state(st.memory)
                    .map_err(|message| StartError::Build {
                        pipeline: spec.name.clone(),
                        message,
                    })?;
            }
            let memory = Arc::new(memory);
            pstats
                .metrics
                .memory_budget_buffers
                .set(memory.buffer_share as f64);
            let name = spec.name.clone();
            let secrets = crate::kafka::context::secret_values(&spec.kafka);
            let kafka_error = |source: rdkafka::error::KafkaError| StartError::Kafka {
                pipeline: name.clone(),
                message: crate::kafka::context::redact(&source.to_string(), &secrets),
            };
            let exactly_once = spec.delivery == crate::config::Delivery::ExactlyOnce;
            let txn = if exactly_once {
                // Blocking: fences an earlier producer with the same transactional.id, bounded
                // by `startup_timeout`.
                let (b, sp, st, f) = (
                    brokers.clone(),
                    spec.clone(),
                    pstats.clone(),
                    fatal_tx.clone(),
                );
                let created = tokio::task::spawn_blocking(move || {
                    crate::kafka::transaction::Transactions::create(&b, &sp, st, f)
                });
                let created = tokio::select! {
                    r = created => r.map_err(|e| StartError::Kafka { pipeline: name.clone(), message: e.to_string() })?,
                    () = &mut stop => Err(rdkafka::error::KafkaError::Canceled),
                };
                Some(created.map_err(kafka_error)?)
            } else {
                None
            };
            let producer = match &txn {
                Some(t) => t.producer().clone(),
                None => client::create_producer(&brokers, &spec).map_err(kafka_error)?,
            };
            let custom = |n: &str| self.custom.get(n).cloned();
            let gate = Arc::new(crate::gate::Gate::with_breaker_gauge(
                pstats.metrics.breaker_state.clone(),
            ));
            let chain = build_chain(
                &spec.processors,
                &BuildContext {
                    producer: &producer,
                    custom: &custom,
                    gate: &gate,
                    pipeline: &name,
                    transactional: exactly_once,
                },
            )
            .map_err(|message| StartError::Build {
                pipeline: name.clone(),
                message,
            })?;
            if spec.batch.is_some() && chain.last().and_then(|p| p.as_batch()).is_none() {
                return Err(StartError::Build {
                    pipeline: name.clone(),
                    message: "[batch]: the last processor takes no batches (a custom one must implement BatchProcessor and return it from Processor::as_batch)".into(),
                });
            }
            let state = match &spec.state {
                Some(_) => {
                    let opened = tokio::select! {
                        r = crate::state::Store::open(&brokers, &spec, producer.clone(), memory.state_share) => r,
                        () = &mut stop => return Err(StartError::Stopped { pipeline: name.clone() }),
                    };
                    let store = opened.map_err(|e| StartError::Build {
                        pipeline: name.clone(),
                        message: crate::kafka::context::redact(&e.to_string(), &secrets),
                    })?;
                    let _ = pstats.state.set(store.clone());
                    Some(store)
                }
                None => None,
            };
            crate::processors::bind_state(&chain, state.as_ref()).map_err(|message| {
                StartError::Build {
                    pipeline: name.clone(),
                    message,
                }
            })?;
            let mut pipeline =
                Pipeline::new(&spec, chain, producer, pstats.clone(), gate).with_memory(memory);
            if let Some(st) = state {
                pipeline = pipeline.with_state(st);
            }
            if let Some(t) = txn {
                pipeline = pipeline.with_transactions(t);
            }
            let pipeline = Arc::new(pipeline);
            let args = CoordinatorArgs {
                spec: Arc::new(spec),
                brokers: brokers.clone(),
                pipeline,
                stats: pstats.clone(),
                fatal: fatal_tx.clone(),
            };
            let spawned = tokio::select! {
                r = Actor::spawn(None, Coordinator, args) => r.map_err(|e| StartError::spawn(&name, e, &secrets)),
                () = &mut stop => Err(StartError::Stopped { pipeline: name.clone() }),
            };
            let (actor, handle) = match spawned {
                Ok(started) => started,
                Err(e) => {
                    // Pipelines started before this one leave their groups.
                    let started = Running {
                        coordinators,
                        stats,
                        fatal,
                    };
                    started.shutdown().await;
                    return Err(e);
                }
            };
            pstats
                .starting
                .store(false, std::sync::atomic::Ordering::Relaxed);
            coordinators.push((name, actor, handle));
            stats.push(pstats);
        }
        Ok(Running {
            coordinators,
            stats,
            fatal,
        })
    }
}

impl Running {
    /// Resolves when a partition has failed (its worker restart budget is spent); the caller
    /// should then shut down and exit non-zero.
    pub async fn failed(&mut self) -> String {
        match self.fatal.recv().await {
            Some(m) => m,
            None => std::future::pending().await,
        }
    }

    /// Stops every pipeline: stop fetching, drain (up to each drain deadline), commit
    /// synchronously, leave the group.
    pub async fn shutdown(self) -> Vec<ShutdownReport> {
        let calls = self.coordinators.iter().map(|(name, c, _)| async move {
            match ractor::call!(c, crate::actors::coordinator::CoordinatorMsg::Shutdown) {
                Ok(r) => r,
                Err(e) => {
                    error!(pipeline = %name, error = %e, "shutdown failed");
                    ShutdownReport {
                        pipeline: name.clone(),
                        commit_error: Some(format!("coordinator did not answer: {e}")),
                        ..Default::default()
                    }
                }
            }
        });
        let reports = futures::future::join_all(calls).await;
        for (_, _, h) in self.coordinators {
            let _ = h.await;
        }
        for r in &reports {
            info!(pipeline = %r.pipeline, clean = r.clean(), committed = ?r.committed, "pipeline stopped");
        }
        reports
    }
}
