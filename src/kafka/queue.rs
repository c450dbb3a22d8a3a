//! Reading a partition queue in batches.
//!
//! rust-rdkafka's `PartitionQueue::poll` returns one message per call, and each call is a whole
//! event poll: the queue's lock, three clock reads and a sample of librdkafka's poll-idle
//! histogram inside librdkafka, an `Arc` for the event and a clock read in rust-rdkafka. On
//! ~90-byte messages that was about a sixth of keyflow's CPU per message.
//! `rd_kafka_consume_batch_queue` takes up to N messages in one poll (one poll accounting, one
//! application-position update). rust-rdkafka exposes neither it nor the native handle of its
//! `PartitionQueue`, so [`QueueReader`] opens a second handle on the same librdkafka queue (a
//! reference to it, not a copy: `rd_kafka_queue_get_partition`). The rust-rdkafka handle stays
//! with the supervisor for the queue's non-empty callback; both read one queue.
//!
//! What librdkafka hands over is copied into keyflow's [`Message`] at once and the native
//! message destroyed within [`QueueReader::read`]: nothing native outlives the call.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::Instant;

use rdkafka::bindings as rdsys;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;

use super::Consumer;
use crate::message::Message;

/// The most messages one read takes (the array librdkafka fills).
pub const READ_MAX: usize = 64;

/// A second handle on one partition's librdkafka queue, for batched reads.
pub struct QueueReader {
    queue: NonNull<rdsys::rd_kafka_queue_t>,
    /// librdkafka fills it during [`QueueReader::read`]; every pointer in it is destroyed before
    /// the call returns.
    slots: Vec<*mut rdsys::rd_kafka_message_t>,
    /// The client must outlive the handle (`rd_kafka_queue_destroy` before `rd_kafka_destroy`).
    _consumer: Arc<Consumer>,
}

// SAFETY: librdkafka's queues are thread-safe (every access takes the queue's lock), `slots`
// holds no live pointer between calls, and nothing is reachable through `&QueueReader` (reads
// take `&mut self`).
unsafe impl Send for QueueReader {}
unsafe impl Sync for QueueReader {}

impl QueueReader {
    /// A handle on `topic`/`partition`'s queue. `None` when librdkafka has no such partition.
    /// Open it after rust-rdkafka's `split_partition_queue`, which stops the queue forwarding
    /// into the consumer's main queue (a forwarded queue would read the main queue).
    pub fn open(consumer: &Arc<Consumer>, topic: &str, partition: i32) -> Option<Self> {
        use rdkafka::consumer::Consumer as _;
        let topic = CString::new(topic).ok()?;
        // SAFETY: a live client and a NUL-terminated topic; the result is null or a new
        // reference, destroyed in `drop`.
        let queue = unsafe {
            rdsys::rd_kafka_queue_get_partition(
                consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
            )
        };
        Some(QueueReader {
            queue: NonNull::new(queue)?,
            slots: vec![ptr::null_mut(); READ_MAX],
            _consumer: consumer.clone(),
        })
    }

    /// Takes up to `max` (at most [`READ_MAX`]) messages off the queue without waiting and
    /// passes each, copied into a [`Message`] received at `received`, or its error, to `each`
    /// in queue order. Returns how many librdkafka handed over: fewer than asked means the
    /// queue is empty (its non-empty callback fires on the next message).
    pub fn read(
        &mut self,
        max: usize,
        topic: &Arc<str>,
        received: Instant,
        mut each: impl FnMut(Result<Message, KafkaError>),
    ) -> usize {
        let max = max.clamp(1, READ_MAX);
        // SAFETY: `slots` has room for `max` pointers; timeout 0 returns at once.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(self.queue.as_ptr(), 0, self.slots.as_mut_ptr(), max)
        };
        // -1: an error of the call itself (not of a message); nothing was handed over.
        let n = usize::try_from(n).unwrap_or(0).min(max);
        for slot in &mut self.slots[..n] {
            let raw = std::mem::replace(slot, ptr::null_mut());
            // SAFETY: librdkafka filled the first `n` slots with messages we now own; each is
            // read, then destroyed exactly once (a panic in `each` leaks the rest, it does not
            // free them twice).
            let result = unsafe { to_message(&*raw, topic, received) };
            unsafe { rdsys::rd_kafka_message_destroy(raw) };
            each(result);
        }
        n
    }
}

impl Drop for QueueReader {
    fn drop(&mut self) {
        // SAFETY: the reference taken in `open`, released once, while the client lives.
        unsafe { rdsys::rd_kafka_queue_destroy(self.queue.as_ptr()) }
    }
}

/// A native message (or the error it carries) copied into keyflow's [`Message`].
///
/// # Safety
/// `m` must be a message handed over by librdkafka and not yet destroyed.
unsafe fn to_message(
    m: &rdsys::rd_kafka_message_t,
    topic: &Arc<str>,
    received: Instant,
) -> Result<Message, KafkaError> {
    if m.err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(match m.err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__PARTITION_EOF => KafkaError::PartitionEOF(m.partition),
            e => KafkaError::MessageConsumption(RDKafkaErrorCode::from(e)),
        });
    }
    let key = bytes_at(m.key, m.key_len);
    let payload = bytes_at(m.payload, m.len);
    let mut ts_type = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    let ts = rdsys::rd_kafka_message_timestamp(m, &mut ts_type);
    let timestamp_ms = (ts_type != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
        && ts != -1)
        .then_some(ts);
    Ok(Message::from_parts(
        topic,
        m.partition,
        m.offset,
        timestamp_ms,
        key,
        payload,
        headers_of(m),
        received,
    ))
}

/// # Safety
/// `p` is null or points to `len` readable bytes for the returned borrow.
unsafe fn bytes_at<'a>(p: *const c_void, len: usize) -> Option<&'a [u8]> {
    (!p.is_null()).then(|| std::slice::from_raw_parts(p.cast::<u8>(), len))
}

/// The message's headers, copied; `None` when it has none (no allocation then).
///
/// # Safety
/// `m` as in [`to_message`].
unsafe fn headers_of(m: &rdsys::rd_kafka_message_t) -> Option<OwnedHeaders> {
    let mut hdrs: *mut rdsys::rd_kafka_headers_t = ptr::null_mut();
    if rdsys::rd_kafka_message_headers(m, &mut hdrs) != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        || hdrs.is_null()
    {
        return None;
    }
    let count = rdsys::rd_kafka_header_cnt(hdrs);
    if count == 0 {
        return None;
    }
    let mut owned = OwnedHeaders::new_with_capacity(count);
    for idx in 0..count {
        let (mut name, mut value, mut size) = (ptr::null(), ptr::null(), 0usize);
        if rdsys::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size)
            != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            break;
        }
        // Header names are C strings in librdkafka; a name that is not UTF-8 is kept lossily.
        let key = CStr::from_ptr(name).to_string_lossy();
        owned = owned.insert(Header {
            key: &key,
            value: bytes_at(value, size),
        });
    }
    Some(owned)
}
