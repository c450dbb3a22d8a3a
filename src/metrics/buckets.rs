//! Histograms with fixed buckets whose samples cost an atomic add, no allocation.
//!
//! metrics-exporter-prometheus keeps every histogram sample (in blocks allocated 64 samples at a
//! time) until its upkeep folds them into buckets: three samples a message at 300k msg/s is an
//! allocation every ~20 messages and ~7 MB held between upkeeps. keyflow's histograms all have
//! fixed buckets (so that they render as Prometheus histograms), and a sample needs nothing but
//! its bucket's counter and the sum. [`Recorder`] wraps the exporter's recorder: it keeps the
//! histograms whose buckets it knows ([`bounds_for`]) and passes everything else through;
//! [`Histograms::render`] writes them after the exporter's text, with the exporter's own
//! formatting helpers, so `/metrics` reads as before.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use indexmap::IndexMap;
use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use metrics_exporter_prometheus::formatting::{
    write_help_line, write_metric_line, write_type_line,
};
use metrics_exporter_prometheus::{LabelSet, PrometheusRecorder};

/// One histogram series: a counter per bucket (the last one past every bound: `+Inf`) and the
/// sum of the samples.
#[derive(Debug)]
pub struct Buckets {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
}

impl Buckets {
    pub fn new(bounds: &'static [f64]) -> Self {
        Buckets {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn add(&self, value: f64, n: u64) {
        // Prometheus buckets are `le`: a sample equal to a bound belongs to that bound's bucket.
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i].fetch_add(n, Relaxed);
        let _ = self.sum_bits.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + value * n as f64).to_bits())
        });
    }

    /// Cumulative counts per bound, the total count and the sum, as Prometheus renders them.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cumulative = 0;
        let per_bound = self
            .bounds
            .iter()
            .zip(self.counts.iter())
            .map(|(le, c)| {
                cumulative += c.load(Relaxed);
                (*le, cumulative)
            })
            .collect();
        let total = cumulative + self.counts[self.bounds.len()].load(Relaxed);
        (
            per_bound,
            total,
            f64::from_bits(self.sum_bits.load(Relaxed)),
        )
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        self.add(value, 1);
    }

    fn record_many(&self, value: f64, count: usize) {
        self.add(value, count as u64);
    }
}

/// The bucket bounds of keyflow's histograms, by metric name (`None`: not one of ours).
pub fn bounds_for(name: &str) -> Option<&'static [f64]> {
    use super::*;
    Some(match name {
        PROCESS_DURATION_SECONDS | QUEUE_WAIT_SECONDS => DURATION_BUCKETS,
        END_TO_END_LATENCY_SECONDS | crate::state::STATE_RESTORE_SECONDS => LATENCY_BUCKETS,
        COMMIT_METADATA_BYTES => METADATA_BUCKETS,
        BATCH_SIZE => BATCH_SIZE_BUCKETS,
        _ => return None,
    })
}

#[derive(Default)]
struct Family {
    help: Option<String>,
    series: Vec<(Key, Arc<Buckets>)>,
}

/// keyflow's fixed-bucket histograms, by name, as registered (a handle per pipeline and topic:
/// registration is rare, recording never takes the lock).
#[derive(Default, Clone)]
pub struct Histograms(Arc<Mutex<BTreeMap<String, Family>>>);

impl Histograms {
    /// The series of `key`, made on its first registration (same key: same series).
    pub fn register(&self, key: &Key, bounds: &'static [f64]) -> Arc<Buckets> {
        let mut families = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let family = families.entry(key.name().to_string()).or_default();
        if let Some((_, b)) = family.series.iter().find(|(k, _)| k == key) {
            return b.clone();
        }
        let b = Arc::new(Buckets::new(bounds));
        family.series.push((key.clone(), b.clone()));
        b
    }

    fn describe(&self, name: &str, help: &str) {
        let mut families = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        families.entry(name.to_string()).or_default().help = Some(help.to_string());
    }

    /// Appends every registered series in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let families = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let no_global_labels = IndexMap::new();
        for (name, family) in families.iter().filter(|(_, f)| !f.series.is_empty()) {
            if let Some(help) = &family.help {
                write_help_line(out, name, None, None, help);
            }
            write_type_line(out, name, None, None, "histogram");
            for (key, buckets) in &family.series {
                let labels = LabelSet::from_key_and_global(key, &no_global_labels);
                let (per_bound, count, sum) = buckets.snapshot();
                for (le, c) in per_bound {
                    write_metric_line(
                        out,
                        name,
                        Some("bucket"),
                        &labels,
                        Some(("le", le)),
                        c,
                        None,
                    );
                }
                write_metric_line(
                    out,
                    name,
                    Some("bucket"),
                    &labels,
                    Some(("le", "+Inf")),
                    count,
                    None,
                );
                write_metric_line::<&str, f64>(out, name, Some("sum"), &labels, None, sum, None);
                write_metric_line::<&str, u64>(
                    out,
                    name,
                    Some("count"),
                    &labels,
                    None,
                    count,
                    None,
                );
            }
            out.push('\n');
        }
    }
}

/// The exporter's recorder, with keyflow's histograms kept in [`Histograms`].
pub struct Recorder {
    pub inner: PrometheusRecorder,
    pub histograms: Histograms,
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description)
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description)
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if bounds_for(key.as_str()).is_some() {
            self.histograms.describe(key.as_str(), &description);
        } else {
            self.inner.describe_histogram(key, unit, description)
        }
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        match bounds_for(key.name()) {
            Some(bounds) => Histogram::from_arc(self.histograms.register(key, bounds)),
            None => self.inner.register_histogram(key, metadata),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let b = Buckets::new(&[0.5, 1.0, 2.0]);
        for v in [0.1, 0.5, 0.7, 1.0, 3.0, 4.0] {
            b.record(v);
        }
        b.record_many(1.5, 3);
        let (per_bound, count, sum) = b.snapshot();
        assert_eq!(per_bound, vec![(0.5, 2), (1.0, 4), (2.0, 7)]);
        assert_eq!(count, 9);
        assert!((sum - (0.1 + 0.5 + 0.7 + 1.0 + 3.0 + 4.0 + 4.5)).abs() < 1e-9);
    }

    #[test]
    fn renders_as_the_exporter_renders_a_histogram() {
        let h = Histograms::default();
        h.describe("kf_x_seconds", "What x takes");
        let key = Key::from_parts("kf_x_seconds", vec![metrics::Label::new("pipeline", "p")]);
        let b = h.register(&key, &[0.5, 1.0]);
        assert!(
            Arc::ptr_eq(&b, &h.register(&key, &[0.5, 1.0])),
            "one series per key"
        );
        b.record(0.2);
        b.record(2.0);
        let mut out = String::new();
        h.render(&mut out);
        assert_eq!(
            out,
            "# HELP kf_x_seconds What x takes\n\
             # TYPE kf_x_seconds histogram\n\
             kf_x_seconds_bucket{pipeline=\"p\",le=\"0.5\"} 1\n\
             kf_x_seconds_bucket{pipeline=\"p\",le=\"1\"} 1\n\
             kf_x_seconds_bucket{pipeline=\"p\",le=\"+Inf\"} 2\n\
             kf_x_seconds_sum{pipeline=\"p\"} 2.2\n\
             kf_x_seconds_count{pipeline=\"p\"} 2\n\n"
        );
    }
}
