//! Batch pipelines (`[batch]`): the last processor takes many messages at once
//! ([`crate::processors::batch::BatchProcessor`]).
//!
//! # How a batch is formed
//! A partition supervisor collects the messages its key scheduler lets start (each key's head:
//! the oldest incomplete message of its key) and hands them to a worker as one batch when
//! `max_messages` are ready or `max_wait` after the first one became ready, as soon as a
//! worker is free (`max_workers` batches run at once per partition).
//!
//! **A batch holds at most one message per key.** The scheduler releases a key's next message
//! only when the previous one completed (its batch succeeded, or it was dead-lettered), so a
//! key's messages run in offset order across batches, and splitting a batch (below) can never
//! reorder them: there is nothing of the same key in the other half. Putting a key's
//! consecutive messages into one batch would apply them in fewer transactions, but a split
//! would then have to keep their order by hand and the `sql` claim (one row per key) would
//! see two positions of one key in one transaction; a hot key costs one message per batch
//! instead, the price of the simple rule. `ordering = "unordered"` promises no order: its
//! batches may hold several messages of a key.
//!
//! # How a batch completes
//! The processors before the last run per message first (a message they drop or dead-letter
//! leaves the batch). Then the batch runs: on success every message completes with it (its
//! offset may be committed; the commit rule is unchanged: never past an incomplete offset). A
//! retryable failure is retried with the pipeline's `[retry]` policy (backoff); a permanent
//! failure, or the last retryable one, **splits** the batch in two halves, each run the same
//! way, until the failing message is alone: it goes to the dead-letter topic with the batch's
//! error as its reason, and every other message completes. A batch of `n` with one poison
//! message costs about `2·log2(n)` extra runs. Backoffs are waited out on the batch's worker
//! (its keys stay held, other batches run on other workers).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::FutureExt as _;

use tracing::{debug, warn};

use crate::message::Message;
use crate::pipeline::{backoff, Outcome, Pipeline};
use crate::processors::batch::BatchProcessor;
use crate::processors::{Flow, ProcessError, Processor};

impl Pipeline {
    /// Runs a batch to its end: one final outcome per message of `msgs`, in order (never
    /// [`Outcome::Retry`]: retries and splits happen here).
    pub async fn execute_batch(&self, msgs: &[Arc<Message>]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Processed; msgs.len()];
        let Some((last, prefix)) = self.chain.split_last() else {
            return outcomes;
        };
        let Some(bp) = last.as_batch() else {
            // The runtime refuses this; run each message alone rather than lose it.
            for (o, m) in outcomes.iter_mut().zip(msgs) {
                *o = self.run_alone(m).await;
            }
            return outcomes;
        };
        // The per-message processors; those still going reach the batch.
        let mut staged: Vec<(usize, Message)> = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            match self.run_prefix(prefix, m).await {
                Ok(out) => staged.push((i, out)),
                Err(o) => outcomes[i] = o,
            }
        }
        // Ranges of `staged` still to run; the left half of a split runs first.
        let mut todo = Vec::with_capacity(16);
        todo.push(0..staged.len());
        while let Some(r) = todo.pop() {
            if r.is_empty() {
                continue;
            }
            let part = &staged[r.clone()];
            match self.run_batch(bp, part).await {
                Ok(flows) => {
                    for ((i, _), f) in part.iter().zip(flows) {
                        outcomes[*i] = match f {
                            Flow::Continue => {
                                for p in self.chain.iter() {
                                    p.completed(&msgs[*i]);
                                }
                                Outcome::Processed
                            }
                            Flow::Drop => Outcome::Filtered,
                            Flow::Duplicate => Outcome::Deduplicated,
                        };
                    }
                }
                Err((e, attempts)) if r.len() == 1 => {
                    let i = part[0].0;
                    self.dead_letter(&msgs[i], &e, attempts).await;
                    outcomes[i] = Outcome::DeadLettered;
                }
                Err((e, attempts)) => {
                    self.stats.metrics.batch_splits.increment(1);
                    let mid = r.start + r.len() / 2;
                    debug!(pipeline = %self.name, size = r.len(), attempts, error = %e, "batch failed; splitting it");
                    todo.push(mid..r.end);
                    todo.push(r.start..mid);
                }
            }
        }
        outcomes
    }

    /// One batch with the retry policy: the processor's flows, or the last error and the
    /// attempts it took. An open circuit breaker's refusal waits and does not count.
    async fn run_batch(
        &self,
        bp: &dyn BatchProcessor,
        part: &[(usize, Message)],
    ) -> Result<Vec<Flow>, (ProcessError, u32)> {
        let refs: Vec<&Message> = part.iter().map(|(_, m)| m).collect();
        let mut attempt = 1;
        loop {
            self.stats.metrics.batch_size.record(refs.len() as f64);
            // A panic is the batch's permanent failure: the split finds the message that
            // causes it (a crashed worker would run the same batch again, until the restart
            // budget fails the partition).
            let r = AssertUnwindSafe(bp.process_batch(&refs))
                .catch_unwind()
                .await
                .unwrap_or_else(|p| Err(panicked(p)));
            let e = match r {
                Ok(flows) if flows.len() == refs.len() => return Ok(flows),
                Ok(flows) => ProcessError::permanent(
                    "batch",
                    format!(
                        "the batch processor returned {} flows for {} messages",
                        flows.len(),
                        refs.len()
                    ),
                ),
                Err(e) => e,
            };
            if let Some(wait) = e.not_attempted_wait() {
                tokio::time::sleep(wait).await;
                continue;
            }
            if !e.is_retryable() || attempt >= self.retry.max_attempts {
                return Err((e, attempt));
            }
            self.stats.retries.fetch_add(refs.len() as u64, Relaxed);
            self.stats.metrics.retried.increment(refs.len() as u64);
            let after = backoff(&self.retry, attempt);
            debug!(pipeline = %self.name, size = refs.len(), attempt, error = %e, ?after, "batch failed; retrying");
            tokio::time::sleep(after).await;
            attempt += 1;
        }
    }

    /// The processors before the batch one, on one message, with the retry policy: the message
    /// as they left it, or its final outcome (dropped, dead-lettered).
    async fn run_prefix(
        &self,
        prefix: &[Arc<dyn Processor>],
        original: &Message,
    ) -> Result<Message, Outcome> {
        let mut attempt = 1;
        loop {
            let mut m = original.clone();
            let r = AssertUnwindSafe(run(prefix, &mut m))
                .catch_unwind()
                .await
                .unwrap_or_else(|p| Err(panicked(p)));
            let e = match r {
                Ok(Flow::Continue) => return Ok(m),
                Ok(Flow::Drop) => return Err(Outcome::Filtered),
                Ok(Flow::Duplicate) => return Err(Outcome::Deduplicated),
                Err(e) => e,
            };
            if let Some(wait) = e.not_attempted_wait() {
                tokio::time::sleep(wait).await;
                continue;
            }
            if !e.is_retryable() || attempt >= self.retry.max_attempts {
                self.dead_letter(original, &e, attempt).await;
                return Err(Outcome::DeadLettered);
            }
            self.stats.retries.fetch_add(1, Relaxed);
            self.stats.metrics.retried.increment(1);
            tokio::time::sleep(backoff(&self.retry, attempt)).await;
            attempt += 1;
        }
    }

    /// The whole chain on one message, retries waited out here.
    async fn run_alone(&self, m: &Message) -> Outcome {
        warn!(pipeline = %self.name, "the last processor takes no batches; running the message alone");
        let mut attempt = 1;
        loop {
            match self.execute(m, attempt).await {
                Outcome::Retry { attempt: a, after } => {
                    tokio::time::sleep(after).await;
                    attempt = a;
                }
                done => return done,
            }
        }
    }
}

/// A processor's panic as a permanent error naming it.
fn panicked(p: Box<dyn std::any::Any + Send>) -> ProcessError {
    let text = panic_text(&*p);
    ProcessError::permanent("panic", format!("the processor panicked: {text}"))
}

/// The message of a caught panic.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into())
}

async fn run(chain: &[Arc<dyn Processor>], m: &mut Message) -> Result<Flow, ProcessError> {
    for p in chain {
        match p.process(m).await? {
            Flow::Continue => {}
            stop => return Ok(stop),
        }
    }
    Ok(Flow::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_pipeline, Env, Global, PipelineSpec};
    use crate::kafka::client::producer_config;
    use crate::kafka::Producer;
    use async_trait::async_trait;
    use rdkafka::mocking::MockCluster;
    use std::sync::Mutex;

    /// Records every batch it is given (as offsets); a batch holding a payload `poison` fails
    /// permanently, and the first `flaky` calls fail with a retryable error.
    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<Vec<i64>>>,
        flaky: Mutex<u32>,
    }

    #[async_trait]
    impl Processor for Recorder {
        async fn process(&self, _: &mut Message) -> Result<Flow, ProcessError> {
            Ok(Flow::Continue)
        }
        fn as_batch(&self) -> Option<&dyn BatchProcessor> {
            Some(self)
        }
    }

    #[async_trait]
    impl BatchProcessor for Recorder {
        async fn process_batch(&self, msgs: &[&Message]) -> Result<Vec<Flow>, ProcessError> {
            self.batches
                .lock()
                .unwrap()
                .push(msgs.iter().map(|m| m.offset).collect());
            {
                let mut f = self.flaky.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    return Err(ProcessError::retryable("rec", "flaky"));
                }
            }
            if msgs.iter().any(|m| m.payload.as_deref() == Some(b"poison")) {
                return Err(ProcessError::permanent("rec", "poison"));
            }
            Ok(vec![Flow::Continue; msgs.len()])
        }
    }

    fn spec(brokers: &str) -> PipelineSpec {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "topic = \"in\"\ngroup_id = \"g\"\nauto_offset_reset = \"earliest\"\n\
             [retry]\nmax_attempts = 3\nbackoff = \"1ms\"\nmax_backoff = \"5ms\"\n\
             [batch]\nmax_messages = 100\n\
             [[processors]]\ntype = \"custom\"\nname = \"rec\"\n",
        )
        .unwrap();
        let global = Global {
            brokers: brokers.into(),
            ..Global::default()
        };
        load_pipeline(&path, &global, &Env::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn pipeline(brokers: &str, rec: Arc<Recorder>) -> Pipeline {
        let spec = spec(brokers);
        let producer: Producer = producer_config(brokers, &spec).create().unwrap();
        let custom = move |_: &str| Some(rec.clone() as Arc<dyn Processor>);
        crate::pipeline::for_test(&spec, producer, &custom).0
    }

    fn batch(n: i64, poison: &[i64]) -> Vec<Arc<Message>> {
        (0..n)
            .map(|o| {
                let v: &[u8] = if poison.contains(&o) {
                    b"poison"
                } else {
                    b"ok"
                };
                Arc::new(Message::new(
                    "in",
                    0,
                    o,
                    Some(format!("k{o}").as_bytes()),
                    v,
                ))
            })
            .collect()
    }

    #[tokio::test]
    async fn a_poison_message_alone_is_dead_lettered_by_bisection() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("in.dlq", 1, 1).unwrap();
        let rec = Arc::new(Recorder::default());
        let p = pipeline(&cluster.bootstrap_servers(), rec.clone());
        let out = p.execute_batch(&batch(20, &[13])).await;
        for (o, outcome) in out.iter().enumerate() {
            let want = if o == 13 {
                Outcome::DeadLettered
            } else {
                Outcome::Processed
            };
            assert_eq!(*outcome, want, "offset {o}: {out:?}");
        }
        let batches = rec.batches.lock().unwrap().clone();
        println!("batches run: {batches:?}");
        assert_eq!(batches[0], (0..20).collect::<Vec<_>>(), "one batch first");
        // A permanent error is not retried: each failing range splits at once, down to 13.
        let failed: Vec<&Vec<i64>> = batches.iter().filter(|b| b.contains(&13)).collect();
        assert_eq!(
            failed.iter().map(|b| b.len()).collect::<Vec<_>>(),
            vec![20, 10, 5, 3, 2, 1],
            "{batches:?}"
        );
        // Every other message ran in exactly one successful batch.
        let mut ok: Vec<i64> = batches
            .iter()
            .filter(|b| !b.contains(&13))
            .flatten()
            .copied()
            .collect();
        ok.sort();
        assert_eq!(ok, (0..20).filter(|&o| o != 13).collect::<Vec<_>>());
        assert_eq!(p.stats.dead_lettered.load(Relaxed), 1);
    }

    #[test]
    fn batch_config_is_checked() {
        let load = |text: &str| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.toml");
            std::fs::write(
                &path,
                format!("topic = \"in\"\nauto_offset_reset = \"earliest\"\n{text}"),
            )
            .unwrap();
            load_pipeline(&path, &Global::default(), &Env::default())
                .map(|s| s.batch)
                .map_err(|e| e.to_string())
        };
        let custom = "[[processors]]\ntype = \"custom\"\nname = \"x\"\n";
        assert_eq!(
            load(&format!("[batch]\n{custom}")).unwrap(),
            Some(crate::config::BatchSpec {
                max_messages: 500,
                max_wait: std::time::Duration::from_millis(50)
            })
        );
        assert_eq!(load(custom).unwrap(), None);
        let e = load(&format!(
            "[batch]\nmax_messages = 0\nmax_wait = \"0s\"\n{custom}"
        ))
        .unwrap_err();
        assert!(
            e.contains("batch.max_messages") && e.contains("found 0"),
            "{e}"
        );
        assert!(e.contains("batch.max_wait"), "{e}");
        let e = load("[batch]\n[[processors]]\ntype = \"log\"\n").unwrap_err();
        assert!(
            e.contains("processors[0]") && e.contains("found `log`"),
            "{e}"
        );
        let e =
            load("[batch]\n[[processors]]\ntype = \"http\"\nurl = \"http://h/\"\n").unwrap_err();
        assert!(e.contains("batch = true"), "{e}");
        let e = load(&format!("delivery = \"exactly_once\"\n[batch]\n{custom}")).unwrap_err();
        assert!(e.contains("exactly_once"), "{e}");
    }

    #[tokio::test]
    async fn a_retryable_failure_is_retried_whole_before_any_split() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("in.dlq", 1, 1).unwrap();
        let rec = Arc::new(Recorder::default());
        *rec.flaky.lock().unwrap() = 2;
        let p = pipeline(&cluster.bootstrap_servers(), rec.clone());
        let out = p.execute_batch(&batch(8, &[])).await;
        assert!(out.iter().all(|o| *o == Outcome::Processed), "{out:?}");
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(
            batches.len(),
            3,
            "two retries of the whole batch: {batches:?}"
        );
        assert!(batches.iter().all(|b| b.len() == 8));
        assert_eq!(p.stats.dead_lettered.load(Relaxed), 0);
    }
}
