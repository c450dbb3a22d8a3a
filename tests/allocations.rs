//! What the per-message path allocates, counted by a global allocator (per thread, so the test
//! harness's other threads do not count): starting an attempt from a message copies no payload
//! or headers, and a histogram sample costs no allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use keyflow::message::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations `f` made on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn message_with_headers() -> Message {
    let mut m = Message::new("in", 3, 42, Some(b"user-7"), br#"{"id": 7, "n": 1}"#);
    m.set_headers(OwnedHeaders::new().insert(Header {
        key: "traceparent",
        value: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    }));
    m
}

#[test]
fn an_attempt_copy_of_a_message_allocates_nothing() {
    let m = message_with_headers();
    // Every attempt starts from a copy of the message as consumed (`Pipeline::execute_in`).
    let n = allocations(|| {
        for _ in 0..1000 {
            let copy = m.clone();
            assert_eq!(copy.payload.as_deref(), m.payload.as_deref());
            drop(copy);
        }
    });
    assert_eq!(n, 0, "1,000 copies of a message allocated {n} times");
}

#[test]
fn taking_headers_copies_them_only_while_shared() {
    let m = message_with_headers();
    let mut attempt = m.clone();
    // Shared with the message as consumed (kept for a retry): the taker gets its own copy.
    let taken = attempt.take_headers().unwrap();
    assert_eq!(taken.count(), 1);
    assert_eq!(
        m.headers.as_ref().unwrap().count(),
        1,
        "the original keeps its headers"
    );
    // Held once: handed over as they are.
    let mut only = message_with_headers();
    let n = allocations(|| {
        let h = only.take_headers().unwrap();
        assert_eq!(h.count(), 1);
        std::mem::forget(h);
    });
    assert_eq!(n, 0, "taking unshared headers allocated {n} times");
}

#[test]
fn a_histogram_sample_allocates_nothing() {
    let handle = keyflow::metrics::install();
    let h = metrics::histogram!(keyflow::metrics::PROCESS_DURATION_SECONDS, "pipeline" => "alloc", "topic" => "t");
    let n = allocations(|| {
        for i in 0..100_000u32 {
            h.record(f64::from(i % 100) / 1000.0);
        }
    });
    assert_eq!(n, 0, "100,000 samples allocated {n} times");
    let text = handle.render();
    let count = text
        .lines()
        .find(|l| {
            l.starts_with("keyflow_process_duration_seconds_count")
                && l.contains("pipeline=\"alloc\"")
        })
        .unwrap_or_else(|| panic!("no count line in:\n{text}"));
    assert!(count.ends_with(" 100000"), "{count}");
    // 0 ms … 99 ms: 2 samples in 100 are ≤ 1 ms.
    assert!(
        text.contains(
            "keyflow_process_duration_seconds_bucket{pipeline=\"alloc\",topic=\"t\",le=\"0.001\"} 2000\n"
        ),
        "{text}"
    );
}
