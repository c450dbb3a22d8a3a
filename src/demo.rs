//! `keyflow demo`: the main job on an embedded broker.
//!
//! librdkafka's mock cluster runs in-process on a loopback port (it is not `Send`, so it lives
//! on its own thread); a synthetic producer writes keyed orders at a fixed rate; the pipeline
//! from `pipelines/demo.toml` consumes them through the real runtime; a progress line shows
//! messages/s, in-flight, paused partitions and committed offsets.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::ClientConfig;

use crate::config::{self, Env, Global};
use crate::processors::ProcessorConfig;
use crate::runtime::Runtime;

pub struct DemoOptions {
    pub duration: Duration,
    pub pipeline: PathBuf,
    pub rate: u32,
}

const PARTITIONS: i32 = 6;
const CUSTOMERS: u64 = 1000;

/// Runs the mock cluster until `stop` is dropped; sends back its bootstrap address.
fn start_cluster(
    topics: Vec<String>,
) -> Result<(String, mpsc::Sender<()>, std::thread::JoinHandle<()>), String> {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("kf-mock-cluster".into())
        .spawn(move || {
            let cluster = match MockCluster::new(1) {
                Ok(c) => c,
                Err(e) => {
                    let _ = addr_tx.send(Err(format!("mock cluster: {e}")));
                    return;
                }
            };
            for t in &topics {
                if let Err(e) = cluster.create_topic(t, PARTITIONS, 1) {
                    let _ = addr_tx.send(Err(format!("create topic {t}: {e}")));
                    return;
                }
            }
            let _ = addr_tx.send(Ok(cluster.bootstrap_servers()));
            let _ = stop_rx.recv();
        })
        .map_err(|e| e.to_string())?;
    let addr = addr_rx.recv().map_err(|e| e.to_string())??;
    Ok((addr, stop_tx, handle))
}

/// Writes `{"order_id":…,"customer":…,"seq":…}` keyed by customer at `rate` messages/s.
fn start_producer(
    brokers: &str,
    topic: String,
    rate: u32,
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .map_err(|e| format!("demo producer: {e}"))?;
    std::thread::Builder::new()
        .name("kf-demo-producer".into())
        .spawn(move || {
            let start = Instant::now();
            let mut seq = vec![0u64; CUSTOMERS as usize];
            let mut n: u64 = 0;
            let mut payload = String::with_capacity(128);
            while !stop.load(Relaxed) {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                while n < due && !stop.load(Relaxed) {
                    let customer = (n.wrapping_mul(2654435761)) % CUSTOMERS;
                    let key = format!("customer-{customer}");
                    seq[customer as usize] += 1;
                    payload.clear();
                    use std::fmt::Write;
                    let _ = write!(
                        payload,
                        r#"{{"order_id":{n},"customer":"{key}","seq":{},"amount":{}}}"#,
                        seq[customer as usize],
                        10 + n % 490
                    );
                    match producer.send(BaseRecord::to(&topic).key(&key).payload(&payload)) {
                        Ok(()) => {
                            n += 1;
                            produced.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                }
                producer.poll(Duration::from_millis(5));
            }
            let _ = producer.flush(Duration::from_secs(5));
        })
        .map_err(|e| e.to_string())
}

/// The shipped demo pipeline, used when `--pipeline` does not exist (run from another directory).
const EMBEDDED_PIPELINE: &str = include_str!("../pipelines/demo.toml");

pub async fn run(mut opts: DemoOptions) -> ExitCode {
    let env = Env::from_process();
    if !opts.pipeline.exists() {
        let path = std::env::temp_dir().join(format!("keyflow-demo-{}.toml", std::process::id()));
        if let Err(e) = std::fs::write(&path, EMBEDDED_PIPELINE) {
            eprintln!("demo: {}: {e}", path.display());
            return ExitCode::from(1);
        }
        eprintln!(
            "{} not found: using the built-in demo pipeline",
            opts.pipeline.display()
        );
        opts.pipeline = path;
    }
    let mut spec = match config::load_pipeline(&opts.pipeline, &Global::default(), &env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Every topic the pipeline touches must exist: the mock cluster does not create topics.
    let mut topics = vec![spec.topic.clone(), spec.dead_letter_topic.clone()];
    topics.extend(spec.processors.iter().filter_map(|p| match p {
        ProcessorConfig::Forward(f) => Some(f.topic.clone()),
        _ => None,
    }));
    let (brokers, cluster_stop, cluster) = match start_cluster(topics) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(1);
        }
    };
    spec.kafka.retain(|(k, _)| {
        !k.starts_with("security.") && !k.starts_with("sasl.") && !k.starts_with("ssl.")
    });
    println!("keyflow demo: embedded broker at {brokers}, topic {:?} with {PARTITIONS} partitions, {} msg/s for {}",
        spec.topic, opts.rate, humantime::format_duration(opts.duration));
    let global = Global {
        brokers: brokers.clone(),
        ..Global::default()
    };
    let topic = spec.topic.clone();
    let cfg = config::Config {
        global,
        pipelines: vec![spec],
    };

    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = match start_producer(&brokers, topic, opts.rate, stop.clone(), produced.clone())
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(1);
        }
    };
    let mut running = match Runtime::new(cfg).start().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(1);
        }
    };
    let stats = running.stats[0].clone();
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("template"),
    );
    let started = Instant::now();
    let deadline = tokio::time::sleep(opts.duration);
    tokio::pin!(deadline);
    let signal = crate::shutdown::signal();
    tokio::pin!(signal);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let (mut last_n, mut last_t) = (0u64, Instant::now());
    let mut failure = None;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = &mut signal => break,
            f = running.failed() => { failure = Some(f); break; }
            _ = tick.tick() => {
                let snap = stats.snapshot();
                let now = Instant::now();
                let rate = (snap.processed - last_n.min(snap.processed)) as f64 / now.duration_since(last_t).as_secs_f64();
                (last_n, last_t) = (snap.processed, now);
                let in_flight: usize = snap.partitions.iter().map(|p| p.in_flight).sum();
                let paused = snap.partitions.iter().filter(|p| p.paused).count();
                let committed: Vec<String> = snap.partitions.iter().map(|p| format!("{}:{}", p.partition, p.committed)).collect();
                let line = format!(
                    "{rate:>8.0} msg/s | produced {} | processed {} | in-flight {in_flight} | paused {paused}/{} | retries {} | committed [{}]",
                    produced.load(Relaxed), snap.processed, snap.partitions.len(), snap.retries, committed.join(" "));
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.set_message(line);
                    bar.tick();
                }
            }
        }
    }
    bar.finish_and_clear();
    stop.store(true, Relaxed);
    let _ = tokio::task::spawn_blocking(move || producer.join()).await;
    let reports = running.shutdown().await;
    let snap = stats.snapshot();
    let secs = started.elapsed().as_secs_f64();
    println!("\nkeyflow demo summary");
    println!("  ran                {secs:.1} s");
    println!("  produced           {}", produced.load(Relaxed));
    println!(
        "  processed          {} ({:.0} msg/s)",
        snap.processed,
        snap.processed as f64 / secs
    );
    println!("  dead-lettered      {}", snap.dead_lettered);
    println!("  retries            {}", snap.retries);
    println!("  worker restarts    {}", snap.worker_restarts);
    println!("  rebalances         {}", snap.rebalances);
    println!(
        "  commits ok/failed  {}/{}",
        snap.commits_ok, snap.commits_failed
    );
    for r in &reports {
        let mut c = r.committed.clone();
        c.sort();
        println!(
            "  final commits      {}",
            c.iter()
                .map(|(p, o)| format!("{p}:{o}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("  clean shutdown     {}", r.clean());
    }
    let _ = cluster_stop.send(());
    let _ = tokio::task::spawn_blocking(move || cluster.join()).await;
    if let Some(f) = failure {
        eprintln!("demo: {f}");
        return ExitCode::from(1);
    }
    if snap.processed == 0 {
        eprintln!("demo: no message was processed");
        return ExitCode::from(1);
    }
    if reports.iter().all(|r| r.clean()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
