//! `[http] address = "off"`: the metrics recorder is still installed, and nothing it records
//! may pile up unscraped (the exporter's histograms buffered ~24 bytes per message until
//! upkeep; keyflow's count into fixed buckets).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use support::{pipeline_header, unique, wait_until, Broker, Keyflow};

/// Live heap bytes of this test process, exactly.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as isize, Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The heap measurement must not see the other test's allocations.
static SERIAL: Mutex<()> = Mutex::new(());

const MB: isize = 1024 * 1024;

#[test]
fn histogram_samples_hold_no_memory_without_the_http_endpoint() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // What `keyflow run` does with the HTTP endpoint off: install, never serve.
    let handle = keyflow::metrics::install();
    let m = keyflow::metrics::PipelineMetrics::new("mem", "t");
    let base = LIVE.load(Relaxed);
    // 1M messages' worth: the three per-message histograms of the hot path. The exporter's own
    // histograms buffered every sample until upkeep (+24 MB here); keyflow's count buckets.
    for i in 0..1_000_000u32 {
        let s = f64::from(i % 1000) / 1000.0;
        m.process_duration.record(s);
        m.queue_wait.record(s / 10.0);
        m.end_to_end.record(s * 10.0);
    }
    let grown = LIVE.load(Relaxed) - base;
    println!("1M messages recorded: heap {grown:+} B");
    assert!(
        grown < 64 * 1024,
        "histogram samples held {grown} B of heap with no scrape and no upkeep"
    );
    let text = handle.render();
    assert!(
        text.contains(
            "keyflow_process_duration_seconds_count{pipeline=\"mem\",topic=\"t\"} 1000000\n"
        ),
        "every sample counted: {text}"
    );
}

#[test]
fn rss_stays_flat_over_two_million_messages_with_http_off() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const N: usize = 2_000_000;
    const PARTITIONS: i32 = 4;
    let broker = Broker::shared();
    let topic = unique("mem-http-off");
    let group = unique("mem-http-off-g");
    broker.create_topic_blocking(&topic, PARTITIONS);
    broker.create_topic_blocking(&format!("{topic}.dlq"), 1);
    broker.produce_keyed(
        &topic,
        (0..N).map(|i| (Some(format!("k{}", i % 1000).into_bytes()), b"{}".to_vec())),
    );
    let k = Keyflow::start_many(
        &broker.bootstrap,
        &[&format!(
            "{}\n[[processors]]\ntype = \"log\"\nlevel = \"debug\"\n",
            pipeline_header(&topic, &group, "max_buffered_bytes = 1048576")
        )],
        &[("KEYFLOW_HTTP__ADDRESS", "off"), ("RUST_LOG", "warn")],
    );
    let done = || -> i64 {
        broker
            .committed_offsets(&group, &topic, PARTITIONS)
            .iter()
            .map(|o| (*o).max(0))
            .sum()
    };
    // Warm-up: buffers, librdkafka queues and allocator arenas reach their working size.
    wait_until(
        Duration::from_secs(600),
        Duration::from_millis(200),
        || done() >= N as i64 / 5,
        "a fifth of the messages committed",
    );
    let warm = k.rss_kib();
    wait_until(
        Duration::from_secs(900),
        Duration::from_millis(200),
        || done() >= N as i64,
        "every message committed",
    );
    let end = k.rss_kib();
    let growth = end as i64 - warm as i64;
    println!(
        "{N} messages, http off: RSS {warm} KiB after {} → {end} KiB at the end ({growth:+} KiB)",
        N / 5
    );
    // Without upkeep the three hot-path histograms keep ~47 bytes per message (the test above:
    // +46.9 MB per 1M), ~75 MB over the last 1.6M. RSS itself moves by up to ±18 MB between
    // two samples of the same run with upkeep working (librdkafka's fetch buffers and glibc's
    // high-water: +17.7 MB, +8.9, +3.4, -14.6 measured at 1M messages), so the bound sits
    // between the two.
    assert!(
        growth < 30 * 1024,
        "RSS grew by {growth} KiB over {} messages with the HTTP endpoint off",
        N - N / 5
    );
}
