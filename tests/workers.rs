//! The per-partition worker pool gives its workers back after a burst (issue 11, the soak's RSS
//! check): a worker idle for longer than the pool's idle window (10 s) is stopped on a tick and
//! its slot freed, and the pool grows again for the next burst, its completions routed to the
//! right messages (the commit point reaches the end). Against a real broker, in process, with
//! a processor that holds every message until the test opens a gate, so a burst on many keys
//! needs a worker per key.

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyflow::runtime::Running;
use keyflow::{Flow, Message, ProcessError, Processor, Runtime};
use support::{unique, wait_until, Broker};
use tokio::sync::watch;

/// Distinct keys per burst: one running message, so one worker, each.
const KEYS: usize = 48;

/// Holds every message until the gate is open.
struct Hold(watch::Receiver<bool>);

#[async_trait]
impl Processor for Hold {
    async fn process(&self, _msg: &mut Message) -> Result<Flow, ProcessError> {
        let mut gate = self.0.clone();
        let _ = gate.wait_for(|open| *open).await;
        Ok(Flow::Continue)
    }
}

/// Worker actors alive over the pipeline's partitions, as `/debug/partitions` reports them.
async fn workers(running: &Running) -> usize {
    let report = keyflow::http::debug_report(&running.stats).await;
    report
        .pipelines
        .iter()
        .flat_map(|p| &p.partitions)
        .map(|p| p.workers)
        .sum()
}

/// Polls the pool size until `want` holds; panics with the last size after `timeout`.
async fn wait_workers(
    running: &Running,
    timeout: Duration,
    want: impl Fn(usize) -> bool,
    what: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        let n = workers(running).await;
        if want(n) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what} (workers: {n})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn burst(broker: &Broker, topic: &str, round: usize) {
    broker.produce_keyed(
        topic,
        (0..KEYS).map(|k| {
            (
                Some(format!("key-{round}-{k}").into_bytes()),
                b"{}".to_vec(),
            )
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_are_stopped_after_a_burst_and_the_pool_grows_again() {
    let broker = Broker::shared();
    let (input, group, name) = (unique("workers-in"), unique("workers-g"), unique("workers"));
    broker.create_topic(&input, 1).await;
    let cfg = support::inline_config(
        &broker.bootstrap,
        &format!(
            "name = \"{name}\"\n{}\n[[processors]]\ntype = \"custom\"\nname = \"hold\"\n",
            support::pipeline_header(&input, &group, "")
        ),
    );
    let (gate, rx) = watch::channel(false);
    let running = Runtime::new(cfg)
        .with_processor("hold", Arc::new(Hold(rx)))
        .start()
        .await
        .unwrap();
    let processed = |running: &Running| running.stats[0].processed.load(Relaxed) as usize;

    for round in 0..2 {
        // A burst on KEYS keys, held: one worker per key.
        burst(broker, &input, round);
        wait_workers(
            &running,
            Duration::from_secs(60),
            |n| n == KEYS,
            &format!("burst {round}: a worker per held key"),
        )
        .await;
        gate.send_replace(true);
        let done = (round + 1) * KEYS;
        let since = Instant::now();
        while processed(&running) < done {
            assert!(
                since.elapsed() < Duration::from_secs(60),
                "burst {round}: {} of {done} processed after 60 s",
                processed(&running)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Idle now: the pool gives its workers back within the idle window and a few ticks.
        let took = wait_workers(
            &running,
            Duration::from_secs(45),
            |n| n == 0,
            &format!("burst {round}: the idle pool shrinks to nothing"),
        )
        .await;
        println!("burst {round}: {KEYS} workers stopped {took:?} after the last completion");
        gate.send_replace(false);
    }
    // Every completion reached its own message: the commit point is the end.
    tokio::task::block_in_place(|| {
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(200),
            || broker.committed_offsets(&group, &input, 1) == vec![(2 * KEYS) as i64],
            "committed offset at the end after two bursts",
        )
    });
    running.shutdown().await;
}
