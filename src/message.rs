//! The message a worker processes: an owned copy of what the consumer fetched.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rdkafka::message::{BorrowedMessage, Headers, Message as _, OwnedHeaders};

/// What a held message costs beyond its key, payload and headers: the struct in its `Arc`
/// (~180 bytes) and the allocator's overhead of its two buffers, rounded up.
pub const MESSAGE_COST: usize = 256;

/// One consumed record. Key and payload are `Bytes`, each in a shared buffer of its own (a key
/// kept longer, in state or a scheduler's map, does not keep the payload), and headers are shared
/// too, so passing a message between actors, or starting an attempt from it, copies nothing and
/// allocates nothing: the one copy is out of librdkafka's buffer on receipt. A processor that
/// changes the headers takes them ([`Message::take_headers`]: copied only if shared) and sets
/// new ones.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Producer or log-append time, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    /// Shared between the message as consumed and each attempt's copy (copy on write).
    pub headers: Option<Arc<OwnedHeaders>>,
    /// When keyflow took it off the consumer queue (queue-wait and drain reporting).
    pub received: Instant,
    /// Under `delivery = "exactly_once"`: what this attempt will write, held until the chain
    /// succeeds and then written in the pipeline's transaction (see [`crate::kafka::transaction`]).
    /// Empty, and never allocated, otherwise.
    pub outbox: Vec<Record>,
}

/// A record to produce, owned: key and payload share the input's `Bytes` (no payload copy).
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    /// `None`: the producer's partitioner picks it from the key. A changelog record names the
    /// input's partition (co-partitioned, see [`crate::state`]).
    pub partition: Option<i32>,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    pub headers: Option<OwnedHeaders>,
    pub timestamp_ms: Option<i64>,
}

impl Message {
    /// Copies a fetched message out of librdkafka's memory, taken off the queue at `received`
    /// (read once per fetch, not per message). `topic` is shared per partition so that no
    /// per-message string is allocated.
    pub fn from_borrowed(m: &BorrowedMessage<'_>, topic: &Arc<str>, received: Instant) -> Self {
        Message::from_parts(
            topic,
            m.partition(),
            m.offset(),
            m.timestamp().to_millis(),
            m.key(),
            m.payload(),
            m.headers().filter(|h| h.count() > 0).map(|h| h.detach()),
            received,
        )
    }

    /// Copies key and payload out of the consumer's memory (see [`Message::from_borrowed`];
    /// [`crate::kafka::queue`] reads native messages with it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        topic: &Arc<str>,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
        received: Instant,
    ) -> Self {
        let (key, payload) = key_and_payload(key, payload);
        Message {
            topic: topic.clone(),
            partition,
            offset,
            timestamp_ms,
            key,
            payload,
            headers: headers.map(Arc::new),
            received,
            outbox: Vec::new(),
        }
    }

    /// Takes the headers to change them: no copy unless another holder (the message as
    /// consumed, kept for a retry) shares them.
    pub fn take_headers(&mut self) -> Option<OwnedHeaders> {
        self.headers
            .take()
            .map(|h| Arc::try_unwrap(h).unwrap_or_else(|shared| (*shared).clone()))
    }

    /// Replaces the headers.
    pub fn set_headers(&mut self, headers: OwnedHeaders) {
        self.headers = Some(Arc::new(headers));
    }

    /// Bytes counted against a partition's buffer budget (`max_buffered_bytes`, its share of
    /// `memory_limit`): key, payload, headers and [`MESSAGE_COST`] for the rest of what a held
    /// message takes. Called twice per message (taken, completed): header bytes are summed only
    /// when the message has headers.
    pub fn size(&self) -> usize {
        let headers = self.headers.as_ref().map_or(0, |h| {
            h.iter()
                .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len))
                .sum()
        });
        MESSAGE_COST
            + headers
            + self.key.as_ref().map_or(0, Bytes::len)
            + self.payload.as_ref().map_or(0, Bytes::len)
    }

    /// The payload as UTF-8, for processors that read text.
    pub fn payload_str(&self) -> Option<&str> {
        self.payload
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok())
    }

    /// A message built in memory (tests, benchmarks, custom sources).
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Self {
        let (key, payload) = key_and_payload(key, Some(payload));
        Message {
            topic: Arc::from(topic),
            partition,
            offset,
            timestamp_ms: None,
            key,
            payload,
            headers: None,
            received: Instant::now(),
            outbox: Vec::new(),
        }
    }
}

/// Key and payload copied out of librdkafka's buffer, each into a buffer of its own that clones
/// only by counting references (a `Bytes` made from a `Vec`, as `copy_from_slice` makes it,
/// allocates a shared header on its first clone instead: on every message's first attempt).
/// Not one buffer for both: a key outlives its message in the scheduler's busy map, the
/// overflow index and `[state]` stores, and it must not keep the payload alive there (review of
/// e637ab6, `tests/state_retention.rs`).
fn key_and_payload(key: Option<&[u8]>, payload: Option<&[u8]>) -> (Option<Bytes>, Option<Bytes>) {
    (key.map(shared), payload.map(shared))
}

fn shared(bytes: &[u8]) -> Bytes {
    let mut buf = BytesMut::from(bytes);
    // `split_to` makes the buffer shared (even at 0): the `Bytes` then clones without allocating.
    drop(buf.split_to(0));
    buf.freeze()
}
