//! A `[state]` entry keyed by a message's key must not keep the consumed payload alive, outside
//! the state's memory accounting (review of e637ab6, where key and payload shared one buffer).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use keyflow::message::Message;
use keyflow::processors::Processor;
use keyflow::state::{Outputs, StateChange, Stateful, StatefulProcessor, Store};
use keyflow::ProcessError;
use rdkafka::ClientConfig;

struct Live;
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Live {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as i64 - l.size() as i64, Relaxed);
        System.realloc(p, l, n)
    }
}
#[global_allocator]
static A: Live = Live;

/// Counts messages per key (state: a small number).
struct Count;
#[async_trait::async_trait]
impl StatefulProcessor for Count {
    type State = u64;
    async fn process(
        &self,
        state: Option<u64>,
        _msg: &Message,
        _out: &mut Outputs,
    ) -> Result<StateChange<u64>, ProcessError> {
        Ok(StateChange::Set(state.unwrap_or(0) + 1))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn state_keys_do_not_keep_consumed_payloads_alive() {
    let producer = ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:1")
        .create()
        .unwrap();
    let store = Store::in_memory(2, producer, true);
    let p = Stateful::wrap(Count);
    p.bind_state(Some(&store)).unwrap();
    let payload = vec![b'x'; 64 * 1024];
    let before = LIVE.load(Relaxed);
    for i in 0..200i64 {
        let key = format!("acct-{i}");
        let mut m = Message::new("in", 1, i, Some(key.as_bytes()), &payload);
        p.process(&mut m).await.unwrap();
        p.written(&m);
        drop(m);
    }
    let grew = LIVE.load(Relaxed) - before;
    let accounted = store.bytes();
    // 200 keys of ~8 bytes and 1-3 byte values: the store accounts a few KiB; 200 payloads of
    // 64 KiB would be 12.5 MiB.
    assert!(
        grew < 2 * 1024 * 1024,
        "200 state entries hold {grew} live heap bytes (store accounts {accounted}): the payloads of the messages that created them are still alive"
    );
}
