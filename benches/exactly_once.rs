//! The throughput cost of `delivery = "exactly_once"` against `at_least_once`, in the same run
//! on the same Apache Kafka broker (installed and started the way the tests do it).
//!
//! `cargo bench --bench exactly_once` (`-- --messages N --runs R`, `-- --smoke` for tiny sizes):
//! one input topic of 4 partitions holds N keyed messages; each run starts the `keyflow`
//! binary on it with a fresh group and a fresh output topic (`forward`, optionally after a
//! `simulate` latency) and times from the first output write until the group has committed the
//! end of the input. The modes alternate, so machine noise hits both alike; the table gives
//! the median msg/s of each and their ratio. Exactly-once runs also check their output with a
//! `read_committed` reader: every input exactly once.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use clap::Parser;
use support::{unique, Broker, Keyflow};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// `simulate` latency per message in ms (0: forward only).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    #[arg(long)]
    smoke: bool,
    /// Ignored (cargo bench passes it).
    #[arg(long)]
    bench: bool,
}

const PARTITIONS: i32 = 4;
const KEYS: usize = 1000;

fn pipeline(input: &str, output: &str, group: &str, delivery: &str, latency_ms: u64) -> String {
    let simulate = if latency_ms > 0 {
        format!("[[processors]]\ntype = \"simulate\"\nlatency = {{ distribution = \"fixed\", value = \"{latency_ms}ms\" }}\n\n")
    } else {
        String::new()
    };
    format!(
        r#"
name = "bench"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
delivery = "{delivery}"

{simulate}[[processors]]
type = "forward"
topic = "{output}"
"#
    )
}

/// msg/s from the first output write until the end of the input is committed.
fn run(broker: &Broker, input: &str, n: usize, delivery: &str, latency_ms: u64) -> f64 {
    let (output, group) = (unique("bench-eos-out"), unique("bench-eos-g"));
    broker.create_topic_blocking(&output, PARTITIONS);
    let end = broker.high_watermarks(input);
    let mut kf = Keyflow::start_many(
        &broker.bootstrap,
        &[&pipeline(input, &output, &group, delivery, latency_ms)],
        &[("KEYFLOW_INSTANCE_ID", "bench"), ("RUST_LOG", "warn")],
    );
    support::wait_until(
        Duration::from_secs(120),
        Duration::from_millis(5),
        || broker.high_watermarks(&output).iter().sum::<i64>() > 0,
        "the first output write",
    );
    let t0 = Instant::now();
    support::wait_until(
        Duration::from_secs(600),
        Duration::from_millis(20),
        || broker.committed_offsets(&group, input, PARTITIONS) == end,
        "the end of the input committed",
    );
    let took = t0.elapsed();
    kf.sigterm();
    assert!(
        kf.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        kf.log_tail(20)
    );
    if delivery == "exactly_once" {
        let out = broker.consume_all_isolated(
            &output,
            n,
            Duration::from_secs(120),
            Duration::from_secs(1),
            "read_committed",
        );
        assert_eq!(out.len(), n, "read_committed: every input exactly once");
    }
    n as f64 / took.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut a = Args::parse();
    if a.smoke {
        a.messages = 5_000;
        a.runs = 1;
    }
    let broker = Broker::start();
    let input = unique("bench-eos-in");
    broker.create_topic_blocking(&input, PARTITIONS);
    broker.produce_to_partition(
        &input,
        (0..a.messages).map(|i| {
            let k = i % KEYS;
            (
                (k % PARTITIONS as usize) as i32,
                Some(format!("k{k}").into_bytes()),
                format!("k{k}:{}", i / KEYS + 1).into_bytes(),
            )
        }),
    );
    let (mut alo, mut eos) = (Vec::new(), Vec::new());
    for r in 0..a.runs {
        let x = run(&broker, &input, a.messages, "at_least_once", a.latency_ms);
        let y = run(&broker, &input, a.messages, "exactly_once", a.latency_ms);
        println!(
            "run {}: at_least_once {x:.0} msg/s, exactly_once {y:.0} msg/s ({:.2}x)",
            r + 1,
            y / x
        );
        alo.push(x);
        eos.push(y);
    }
    let (x, y) = (median(alo), median(eos));
    println!(
        "\n{} messages, {PARTITIONS} partitions, {KEYS} keys, forward{}; median of {} runs each:",
        a.messages,
        if a.latency_ms > 0 {
            format!(" after a {} ms simulate", a.latency_ms)
        } else {
            String::new()
        },
        a.runs
    );
    println!(
        "| mode | msg/s |\n| --- | --- |\n| at_least_once | {x:.0} |\n| exactly_once | {y:.0} |"
    );
    println!(
        "exactly_once / at_least_once = {:.2} (cost {:.0}%)",
        y / x,
        (1.0 - y / x) * 100.0
    );
}
