//! Outputs of `<key>:<seq>` payloads: nothing missing, per-key order, duplicates counted.

use std::collections::{BTreeMap, HashMap};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use super::{Broker, ConsumedMsg};

/// `<key>:<seq>` → (key, seq).
pub fn parse(payload: &[u8]) -> (String, usize) {
    let s = std::str::from_utf8(payload).unwrap();
    let (k, n) = s.rsplit_once(':').unwrap();
    (k.to_string(), n.parse().unwrap())
}

/// Every (key, seq) of `expected` is in `out`; per key the first occurrences are in sequence
/// order (duplicates may repeat earlier ones). Returns the number of duplicates.
pub fn check_output(out: &[ConsumedMsg], expected: &HashMap<String, usize>) -> usize {
    let mut by_partition: BTreeMap<i32, Vec<&ConsumedMsg>> = BTreeMap::new();
    for m in out {
        by_partition.entry(m.partition).or_default().push(m);
    }
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut dups = 0;
    for msgs in by_partition.values_mut() {
        msgs.sort_by_key(|m| m.offset);
        for m in msgs.iter() {
            let (k, n) = parse(&m.payload);
            let want = next.entry(k.clone()).or_insert(1);
            if n == *want {
                *want += 1;
            } else if n < *want {
                dups += 1; // a redelivered duplicate of an earlier message
            } else {
                panic!(
                    "key {k}: seq {n} written before seq {want} (output partition {}, offset {})",
                    m.partition, m.offset
                );
            }
        }
    }
    for (k, &count) in expected {
        assert_eq!(
            next.get(k).copied().unwrap_or(1) - 1,
            count,
            "key {k}: messages missing from the output"
        );
    }
    dups
}

/// Writes `<key>:<seq>` at ~1,000 msg/s in batches of 50 until `stop`; `expected` holds the
/// last sequence number per key.
pub fn produce_until(
    broker: &Broker,
    input: &str,
    keys: usize,
    stop: &AtomicBool,
    produced: &AtomicUsize,
    expected: &Mutex<HashMap<String, usize>>,
) {
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut i = 0usize;
    while !stop.load(Relaxed) {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                let k = format!("k{}", i % keys);
                i += 1;
                let seq = next.entry(k.clone()).or_insert(0);
                *seq += 1;
                (
                    Some(k.clone().into_bytes()),
                    format!("{k}:{seq}").into_bytes(),
                )
            })
            .collect();
        broker.produce_keyed(input, batch);
        *expected.lock().unwrap() = next.clone();
        produced.fetch_add(50, Relaxed);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sum of `topic`'s high watermarks: moves with every write (committed or not, and with each
/// transaction marker), so it shows progress, never a count of messages.
pub fn output_progress(broker: &Broker, topic: &str) -> i64 {
    broker.high_watermarks(topic).iter().sum()
}

/// Waits until `topic` has moved by more than `more` beyond where it is now.
pub fn wait_progress(broker: &Broker, topic: &str, more: i64, timeout: Duration, what: &str) {
    let before = output_progress(broker, topic);
    super::wait_until(
        timeout,
        Duration::from_millis(50),
        || output_progress(broker, topic) > before + more,
        what,
    );
}
