//! A hot key and its overflow file (issue 10 item 3), against a real Apache Kafka: the review
//! of 47ab0bd (findings F5 and F6; F1, F2 and F4 are unit tests in
//! `src/actors/partition/overflow.rs`).

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{inline_config, pipeline_header, unique, Broker, OutMsg};

const STUCK_AFTER: Duration = Duration::from_secs(2);

/// Records each run (key, offset). The key "hot" sleeps `first` on its first message and `hot`
/// on the others; other keys 1 ms.
struct Rec {
    hot: Duration,
    first: Duration,
    runs: Mutex<Vec<(String, i64)>>,
}

impl Rec {
    fn new(hot: Duration, first: Duration) -> Arc<Self> {
        Arc::new(Rec {
            hot,
            first,
            runs: Mutex::default(),
        })
    }
}

#[async_trait::async_trait]
impl keyflow::Processor for Rec {
    async fn process(
        &self,
        m: &mut keyflow::Message,
    ) -> Result<keyflow::Flow, keyflow::ProcessError> {
        let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
        let first = key == "hot" && !self.runs.lock().unwrap().iter().any(|r| r.0 == "hot");
        tokio::time::sleep(if key != "hot" {
            Duration::from_millis(1)
        } else if first {
            self.first
        } else {
            self.hot
        })
        .await;
        self.runs.lock().unwrap().push((key, m.offset));
        Ok(keyflow::Flow::Continue)
    }
}

fn keyed(key: &str, payload: usize) -> OutMsg {
    OutMsg {
        key: Some(key.as_bytes().to_vec()),
        payload: vec![b'x'; payload],
        ..Default::default()
    }
}

async fn start(
    b: &Broker,
    topic: &str,
    group: &str,
    extra: &str,
    rec: &Arc<Rec>,
    stuck_after: Option<Duration>,
) -> keyflow::runtime::Running {
    let toml = format!(
        "{}\n[[processors]]\ntype = \"custom\"\nname = \"rec\"\n",
        pipeline_header(topic, group, extra)
    );
    let mut config = inline_config(&b.bootstrap, &toml);
    // `stuck_after` is process-wide (the last runtime started sets it): every test of this
    // file uses the same, so that they can run side by side.
    config.global.stuck_after = stuck_after.unwrap_or(STUCK_AFTER);
    keyflow::Runtime::new(config)
        .with_processor("rec", rec.clone())
        .start()
        .await
        .unwrap()
}

/// F5: messages read back from the overflow file come back within the partition's byte
/// budget (1 MiB here), not `key_share` of them whatever their size: 126 small messages of
/// the hot key, then 300 of 64 KiB, while its first message runs for 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refill_keeps_the_partition_within_its_byte_budget() {
    let broker = Broker::shared();
    let (topic, group) = (unique("ovf-bytes"), unique("ovf-bytes-g"));
    broker.create_topic(&topic, 1).await;
    broker.produce(
        &topic,
        (0..126)
            .map(|_| keyed("hot", 100))
            .chain((0..300).map(|_| keyed("hot", 64 << 10))),
    );
    let rec = Rec::new(Duration::from_millis(10), Duration::from_secs(2));
    let running = start(
        broker,
        &topic,
        &group,
        "max_in_flight = 1000\nmax_buffered_bytes = \"1MiB\"",
        &rec,
        None,
    )
    .await;
    let (t0, mut peak) = (Instant::now(), 0);
    while rec.runs.lock().unwrap().len() < 426 && t0.elapsed() < Duration::from_secs(90) {
        peak = peak.max(
            running.stats[0]
                .partitions()
                .iter()
                .map(|(_, p)| p.buffered_bytes.load(Relaxed))
                .sum::<usize>(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await;
    let runs = rec.runs.lock().unwrap();
    assert_eq!(runs.len(), 426, "every message ran");
    assert!(
        runs.windows(2).all(|w| w[0].1 < w[1].1),
        "the hot key ran in offset order"
    );
    // The byte bound may be passed by one message (flow control's rule) and one more that a
    // key with nothing in memory always gets back.
    let bound = (1 << 20) + 2 * ((64 << 10) + 512);
    println!("peak buffered {peak} bytes, bound {bound}");
    assert!(peak <= bound, "peak {peak} bytes buffered, budget 1 MiB");
}

/// F6: a key whose message hangs while other keys keep flowing (its next messages go to the
/// overflow file) is reported stuck after `stuck_after`, as a partition where nothing
/// completes is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_hot_key_under_steady_traffic_is_reported_stuck() {
    let broker = Broker::shared();
    let (topic, group) = (unique("ovf-hung"), unique("ovf-hung-g"));
    broker.create_topic(&topic, 1).await;
    let rec = Rec::new(Duration::from_secs(3600), Duration::from_secs(3600));
    let running = start(
        broker,
        &topic,
        &group,
        "max_in_flight = 80",
        &rec,
        Some(STUCK_AFTER),
    )
    .await;
    let (t0, mut stuck, mut i) = (Instant::now(), false, 0);
    while !stuck && t0.elapsed() < Duration::from_secs(30) {
        // 200 msg/s, a tenth of them of the hung key.
        broker.produce(
            &topic,
            (0..20).map(|j| {
                i += 1;
                let key = if j % 10 == 0 {
                    "hot".to_string()
                } else {
                    format!("k{i}")
                };
                keyed(&key, 1)
            }),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        stuck = running.stats[0]
            .partitions()
            .iter()
            .any(|(_, p)| p.stuck.load(Relaxed));
    }
    let others = rec.runs.lock().unwrap().len();
    running.shutdown().await;
    assert!(others > 0, "the other keys flowed");
    assert!(
        stuck,
        "a key hung for 30 s while its messages went to the overflow file, and nothing reported it stuck"
    );
}

/// F2: a hung hot key does not let its partition read ahead without bound (the offsets above
/// the commit point and the overflow index grew with everything read, outside the memory
/// budget): at half the partition's share (1 MiB here) the partition takes no more messages,
/// and the backlog waits in Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_hot_key_does_not_read_ahead_without_bound() {
    let broker = Broker::shared();
    let (topic, group) = (unique("ovf-bound"), unique("ovf-bound-g"));
    broker.create_topic(&topic, 1).await;
    const N: usize = 100_000;
    broker.produce(
        &topic,
        (0..N).map(|i| {
            let key = if i % 10 == 0 {
                "hot".to_string()
            } else {
                format!("k{}", i % 1000)
            };
            keyed(&key, 1)
        }),
    );
    let rec = Rec::new(Duration::from_secs(3600), Duration::from_secs(3600));
    let running = start(
        broker,
        &topic,
        &group,
        "max_in_flight = 80\nmax_buffered_bytes = \"1MiB\"",
        &rec,
        None,
    )
    .await;
    // Wait until the other keys stop progressing (2 s without a new run).
    let (mut last, mut since) = (0, Instant::now());
    let t0 = Instant::now();
    while since.elapsed() < Duration::from_secs(2) && t0.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = rec.runs.lock().unwrap().len();
        if n != last {
            (last, since) = (n, Instant::now());
        }
    }
    running.shutdown().await;
    println!(
        "with the hot key hung: {last} of {} other messages ran",
        N - N / 10
    );
    assert!(last > 1000, "the other keys flowed for a while: {last}");
    assert!(
        last < 40_000,
        "the partition read {last} messages past a hung key: its read-ahead is unbounded"
    );
}
