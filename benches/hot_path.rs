//! Micro-benchmarks of the per-message hot path: the offset tracker, the key scheduler, and one
//! dispatch to a worker actor and back. `cargo bench --bench hot_path`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use keyflow::actors::scheduler::KeyScheduler;
use keyflow::config::Ordering;
use keyflow::kafka::OffsetTracker;
use keyflow::Message;
use ractor::{Actor, ActorProcessingErr, ActorRef};

fn tracker(c: &mut Criterion) {
    let mut g = c.benchmark_group("offset_tracker");
    g.throughput(Throughput::Elements(1000));
    // 1,000 offsets received, completed with a window of out-of-order completions.
    g.bench_function("receive_complete_1000_window_64", |b| {
        b.iter_batched(
            OffsetTracker::new,
            |mut t| {
                for o in 0..1000i64 {
                    t.received(o);
                }
                for base in (0..1000i64).step_by(64) {
                    for o in (base..(base + 64).min(1000)).rev() {
                        t.completed(o);
                    }
                }
                t.committable()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

struct K(Option<Bytes>);
impl keyflow::actors::scheduler::Keyed for K {
    fn key(&self) -> Option<&Bytes> {
        self.0.as_ref()
    }
}

fn scheduler(c: &mut Criterion) {
    let keys: Vec<Bytes> = (0..1000)
        .map(|i| Bytes::from(format!("customer-{i}")))
        .collect();
    let mut g = c.benchmark_group("key_scheduler");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("admit_complete_1000_msgs_1000_keys", |b| {
        b.iter_batched(
            || KeyScheduler::<K>::new(Ordering::Key),
            |mut s| {
                for k in &keys {
                    s.admit(K(Some(k.clone())));
                }
                for k in &keys {
                    s.complete(Some(k));
                }
                s.busy_keys()
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("admit_complete_1000_msgs_10_keys", |b| {
        b.iter_batched(
            || KeyScheduler::<K>::new(Ordering::Key),
            |mut s| {
                for i in 0..1000 {
                    s.admit(K(Some(keys[i % 10].clone())));
                }
                let mut n = 0;
                for i in 0..1000 {
                    if s.complete(Some(&keys[i % 10])).is_some() {
                        n += 1;
                    }
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A worker stand-in that answers every message to its parent, as keyflow's worker does.
struct Echo;
impl Actor for Echo {
    type Msg = (Arc<Message>, tokio::sync::mpsc::UnboundedSender<i64>);
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        (m, back): Self::Msg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let _ = back.send(m.offset);
        Ok(())
    }
}

fn dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (worker, _) = rt.block_on(Actor::spawn(None, Echo, ())).unwrap();
    let msg = Arc::new(Message::new("t", 0, 0, Some(b"customer-1"), &[b'x'; 100]));
    let mut g = c.benchmark_group("dispatch");
    g.throughput(Throughput::Elements(1000));
    g.measurement_time(Duration::from_secs(3));
    // 1,000 messages cast to a worker actor and completions received back (pipelined).
    g.bench_function("worker_round_trip_1000", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                for _ in 0..1000 {
                    worker.cast((msg.clone(), tx.clone())).unwrap();
                }
                for _ in 0..1000 {
                    rx.recv().await.unwrap();
                }
            })
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("message_copy_from_fetch_100b", |b| {
        b.iter(|| Message::new("t", 0, 0, Some(b"customer-1"), &[b'x'; 100]))
    });
    g.finish();
}

criterion_group!(benches, tracker, scheduler, dispatch);
criterion_main!(benches);
