//! Attempts start inline on the partition supervisor (the hot path, `path::start`): what that
//! must not cost. Fault tests from the review of b21619e, against a real Apache Kafka; each
//! failed on b21619e (R1–R3 in the closing note of issue 10).

mod support;

use std::collections::HashSet;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyflow::actors::partition::PartitionMsg;
use keyflow::stats::PipelineStats;
use ractor::rpc::CallResult;
use support::{inline_config, pipeline_header, unique, Broker, OutMsg};

/// Process-wide (the last runtime started sets it): the same in every test of this file.
const STUCK_AFTER: Duration = Duration::from_secs(2);

fn keyed(key: &str) -> OutMsg {
    OutMsg {
        key: Some(key.as_bytes().to_vec()),
        payload: b"x".to_vec(),
        ..Default::default()
    }
}

fn key_of(m: &keyflow::Message) -> String {
    String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned()
}

async fn start(
    b: &Broker,
    topic: &str,
    group: &str,
    extra: &str,
    p: Arc<dyn keyflow::Processor>,
) -> keyflow::runtime::Running {
    let toml = format!(
        "{}\n[[processors]]\ntype = \"custom\"\nname = \"p\"\n",
        pipeline_header(topic, group, extra)
    );
    let mut config = inline_config(&b.bootstrap, &toml);
    config.global.stuck_after = STUCK_AFTER;
    keyflow::Runtime::new(config)
        .with_processor("p", p)
        .start()
        .await
        .unwrap()
}

async fn only_supervisor(stats: &PipelineStats) -> ractor::ActorRef<PartitionMsg> {
    let t0 = Instant::now();
    while stats
        .partitions()
        .first()
        .is_none_or(|(_, p)| p.actor.get().is_none())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no partition assigned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stats.partitions()[0].1.actor.get().unwrap().clone()
}

/// How long the supervisor takes to answer `/debug/partitions` (`None`: not within `bound`).
async fn inspect_latency(
    sup: &ractor::ActorRef<PartitionMsg>,
    bound: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    match sup.call(PartitionMsg::Inspect, Some(bound)).await {
        Ok(CallResult::Success(_)) => Some(t.elapsed()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// R1: a first poll that blocks its thread blocks the supervisor: every other key of the
// partition, the watchdog, /debug (and the drain, Point) wait behind it.
// ---------------------------------------------------------------------------------------------

/// The first message of key "slow" blocks its thread for `block` (a synchronous client call, a
/// large payload decoded on the CPU); every other message completes at once.
struct BlocksOnce {
    block: Duration,
    started: AtomicBool,
    others: AtomicUsize,
}

#[async_trait::async_trait]
impl keyflow::Processor for BlocksOnce {
    async fn process(
        &self,
        m: &mut keyflow::Message,
    ) -> Result<keyflow::Flow, keyflow::ProcessError> {
        if key_of(m) == "slow" {
            if !self.started.swap(true, SeqCst) {
                std::thread::sleep(self.block);
            }
        } else {
            self.others.fetch_add(1, SeqCst);
        }
        Ok(keyflow::Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_inline_off_a_blocking_processor_does_not_freeze_the_partition() {
    let broker = Broker::shared();
    let (topic, group) = (unique("inl-block"), unique("inl-block-g"));
    broker.create_topic(&topic, 1).await;
    // The blocking message first, then 300 of other keys, and 5 more of "slow" waiting behind it.
    broker.produce(
        &topic,
        std::iter::once(keyed("slow"))
            .chain((0..300).map(|i| keyed(&format!("k{i}"))))
            .chain((0..5).map(|_| keyed("slow"))),
    );
    let p = Arc::new(BlocksOnce {
        block: Duration::from_secs(8),
        started: AtomicBool::new(false),
        others: AtomicUsize::new(0),
    });
    // A processor that blocks its thread says so: every attempt runs on a worker.
    let running = start(broker, &topic, &group, "inline = false", p.clone()).await;
    let stats = running.stats[0].clone();
    let sup = only_supervisor(&stats).await;
    while !p.started.load(SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let mut worst_inspect: Option<Duration> = Some(Duration::ZERO);
    let mut stuck_at = None;
    while t0.elapsed() < Duration::from_secs(5) {
        let l = inspect_latency(&sup, Duration::from_secs(1)).await;
        worst_inspect = match (worst_inspect, l) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        if stuck_at.is_none()
            && stats
                .partitions()
                .iter()
                .any(|(_, p)| p.stuck.load(Relaxed))
        {
            stuck_at = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let others = p.others.load(SeqCst);
    println!(
        "5 s into an 8 s blocking first poll: {others}/300 other keys done; worst /debug answer {worst_inspect:?} (None: >1 s); stuck reported at {stuck_at:?}"
    );
    running.shutdown().await;
    assert!(
        others >= 300,
        "one blocked message froze its whole partition: only {others}/300 messages of other keys ran in 5 s"
    );
    assert!(
        worst_inspect.is_some(),
        "the supervisor did not answer /debug within 1 s while one message blocked"
    );
    assert!(
        stuck_at.is_some(),
        "a message blocked for 5 s with its key's messages waiting (stuck_after 2 s), and the watchdog said nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// R2: a hot key's backlog (memory + overflow file) completes in ONE handler: settle's loop
// starts the key's next message inline after each completion, and `refill` tops it up from the
// overflow file, so the supervisor does not return to its mailbox until the backlog is gone.
// ---------------------------------------------------------------------------------------------

/// "hot": its first message awaits `first` (so the key's backlog builds up behind it); the
/// others spin `spin` on the CPU without awaiting (well under the 200 µs slow-poll bound).
/// Other keys complete at once.
struct HotChain {
    first: Duration,
    spin: Duration,
    first_done: AtomicBool,
    hot_done: AtomicUsize,
    seen_first: AtomicBool,
    early: AtomicUsize,
}

#[async_trait::async_trait]
impl keyflow::Processor for HotChain {
    async fn process(
        &self,
        m: &mut keyflow::Message,
    ) -> Result<keyflow::Flow, keyflow::ProcessError> {
        if key_of(m) == "hot" {
            if !self.seen_first.swap(true, SeqCst) {
                tokio::time::sleep(self.first).await;
                self.first_done.store(true, SeqCst);
            } else {
                if !self.first_done.load(SeqCst) {
                    self.early.fetch_add(1, SeqCst);
                }
                let t = Instant::now();
                while t.elapsed() < self.spin {
                    std::hint::spin_loop();
                }
            }
            self.hot_done.fetch_add(1, SeqCst);
        }
        Ok(keyflow::Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_backlog_does_not_hold_the_supervisor_for_its_whole_length() {
    let broker = Broker::shared();
    let (topic, group) = (unique("inl-hot"), unique("inl-hot-g"));
    broker.create_topic(&topic, 1).await;
    const N: usize = 150_000;
    broker.produce(
        &topic,
        (0..N).map(|i| {
            if i % 10 == 5 {
                keyed(&format!("k{}", i % 1000))
            } else {
                keyed("hot")
            }
        }),
    );
    let hot_total = N - N / 10;
    let p = Arc::new(HotChain {
        first: Duration::from_secs(5),
        spin: Duration::from_micros(25),
        first_done: AtomicBool::new(false),
        hot_done: AtomicUsize::new(0),
        seen_first: AtomicBool::new(false),
        early: AtomicUsize::new(0),
    });
    let running = start(broker, &topic, &group, "", p.clone()).await;
    let stats = running.stats[0].clone();
    let sup = only_supervisor(&stats).await;
    // Ask /debug every 50 ms from the start until the hot key's backlog has run, from a thread
    // with its own runtime (so the probe itself is not starved by the pool's threads).
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (sup, stop, p) = (sup.clone(), stop.clone(), p.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (mut worst, mut timeouts, mut asked) = (Duration::ZERO, 0u32, 0u32);
                while !stop.load(SeqCst) {
                    asked += 1;
                    let before = p.hot_done.load(SeqCst);
                    let t = Instant::now();
                    match inspect_latency(&sup, Duration::from_secs(1)).await {
                        Some(l) => worst = worst.max(l),
                        None => {
                            timeouts += 1;
                            let _ = inspect_latency(&sup, Duration::from_secs(60)).await;
                            let l = t.elapsed();
                            worst = worst.max(l);
                            println!(
                                "  /debug unanswered for {l:.1?}; meanwhile hot messages done {before} -> {}",
                                p.hot_done.load(SeqCst)
                            );
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (worst, timeouts, asked)
            })
        })
    };
    let t1 = Instant::now();
    while p.hot_done.load(SeqCst) < hot_total && t1.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t1.elapsed();
    stop.store(true, SeqCst);
    let (worst, timeouts, asked) = probe.join().unwrap();
    println!(
        "hot messages run before the key's first completed: {}",
        p.early.load(SeqCst)
    );
    println!(
        "{hot_total} hot messages in {took:.1?}: /debug asked {asked} times, {timeouts} unanswered within 1 s, slowest answer {worst:?}"
    );
    running.shutdown().await;
    assert_eq!(
        timeouts, 0,
        "the supervisor stayed away from its mailbox (>1 s, {timeouts} times) while one key's backlog ran inline: drains, ticks, Point and Done of other workers wait behind it"
    );
}

// ---------------------------------------------------------------------------------------------
// R3: CPU/blocking work under the slow-poll bounds runs serially on the supervisor: a pattern of
// 3 slow first polls then a fast one never trips the 4-in-a-row streak, each stays under 50 ms,
// so a partition's messages of *different* keys never run in parallel any more.
// ---------------------------------------------------------------------------------------------

struct Concurrency {
    now: AtomicUsize,
    peak: AtomicUsize,
    done: Mutex<HashSet<i64>>,
}

#[async_trait::async_trait]
impl keyflow::Processor for Concurrency {
    async fn process(
        &self,
        m: &mut keyflow::Message,
    ) -> Result<keyflow::Flow, keyflow::ProcessError> {
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(n, SeqCst);
        if m.offset % 4 != 3 {
            // 30 ms of synchronous work (a sync client call, CPU): under INLINE_BLOCKED (50 ms).
            std::thread::sleep(Duration::from_millis(30));
        }
        self.now.fetch_sub(1, SeqCst);
        self.done.lock().unwrap().insert(m.offset);
        Ok(keyflow::Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_of_different_keys_still_run_in_parallel() {
    let broker = Broker::shared();
    let (topic, group) = (unique("inl-par"), unique("inl-par-g"));
    broker.create_topic(&topic, 1).await;
    const N: usize = 200;
    broker.produce(&topic, (0..N).map(|i| keyed(&format!("k{i}"))));
    let p = Arc::new(Concurrency {
        now: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        done: Mutex::default(),
    });
    let running = start(broker, &topic, &group, "max_workers = 8", p.clone()).await;
    let t0 = Instant::now();
    while p.done.lock().unwrap().len() < N && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = t0.elapsed();
    let peak = p.peak.load(SeqCst);
    println!("{N} messages of {N} keys (150 with 30 ms of blocking work): {took:.1?}, peak concurrency {peak}");
    running.shutdown().await;
    assert!(
        peak >= 2,
        "200 messages of 200 distinct keys ran one at a time on the supervisor (peak concurrency {peak}, {took:.1?}); max_workers = 8"
    );
}
