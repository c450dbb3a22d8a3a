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
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::TopicPartitionList;

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
    consumer: Arc<Consumer>,
    topic: String,
    partition: i32,
    /// The offset after the last message handed over: where the partition's application
    /// position belongs (see [`QueueReader::keep_position`]).
    next: Option<i64>,
    /// Where the application position must be put back before the partition is paused: a read
    /// ended on an error, and no message was handed over since.
    rewind: Option<i64>,
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
        let name = topic;
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
            consumer: consumer.clone(),
            topic: name.to_owned(),
            partition,
            next: None,
            rewind: None,
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
            rdsys::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                0,
                self.slots.as_mut_ptr(),
                max,
            )
        };
        // -1: an error of the call itself (not of a message); nothing was handed over.
        let n = usize::try_from(n).unwrap_or(0).min(max);
        self.keep_position(n);
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

    /// Notes where the application position belongs after a read that ended on an error. A
    /// batch read moves the partition's application position to `offset + 1` of every item it
    /// hands over, errors included (`rd_kafka_q_serve_rkmessages`; the event API skips errors).
    /// A fetch error carries the offset of the next message to fetch, so the position is then
    /// one past a message never received ([`rewind_to`] says which errors do). That position
    /// matters at any pause, keyflow's or librdkafka's own during a cooperative rebalance: a
    /// pause drops the prefetch and fetches again from it on resume, and the message would be
    /// lost for good (review of 3bafaad, and of f447476 for the rebalance). The supervisor
    /// pauses the partition in the handler that read the error, and [`QueueReader::pause`]
    /// puts the position back. Not seeking on a
    /// running partition: a seek puts it back in fetch state ACTIVE, which clears librdkafka's
    /// fetch-error backoff, and a persistent error would be fetched again on every round trip
    /// (review of ee82e2d); paused, it waits for the supervisor's backoff instead.
    fn keep_position(&mut self, n: usize) {
        for &raw in &self.slots[..n] {
            // SAFETY: the first `n` slots hold messages librdkafka just handed over.
            let m = unsafe { &*raw };
            if m.err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                self.next = Some(m.offset + 1);
                self.rewind = None;
            } else if let Some(to) = rewind_to(m.err, m.offset, self.next) {
                self.rewind = Some(to);
            }
        }
    }

    /// Messages waiting in the queue now (one lock of the queue): what the supervisor reads
    /// before it gives its fetch turn back or takes one (see `memory::turns`), and what one
    /// fetch left there.
    pub fn queued(&self) -> usize {
        // SAFETY: the handle lives as long as `self`.
        unsafe { rdsys::rd_kafka_queue_length(self.queue.as_ptr()) }
    }

    /// Whether the last reads ended on a fetch error that moved the application position (see
    /// [`QueueReader::keep_position`]): the supervisor pauses the partition at once, which puts
    /// the position back, and fetches again after a backoff.
    pub fn holds_error(&self) -> bool {
        self.rewind.is_some()
    }

    /// Pauses the partition on the consumer (flow control, the pipeline gate, a fetch error),
    /// then puts back an application position a fetch error moved ([`QueueReader::put_back`]).
    pub fn pause(&mut self) -> KafkaResult<()> {
        use rdkafka::consumer::Consumer as _;
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(&self.topic, self.partition);
        self.consumer.pause(&tpl)?;
        self.put_back();
        Ok(())
    }

    /// On a paused partition: seeks to the offset after the last message handed over, if a
    /// fetch error moved the application position past it. A seek while paused sets where the
    /// fetch starts on resume, and leaves the application position unset, so that no later
    /// pause (librdkafka pauses every partition during a cooperative rebalance, and saves the
    /// application position as the restart point) can take the moved one. Asynchronous
    /// (timeout 0), queued behind the pause on the partition's op queue.
    pub fn put_back(&mut self) {
        use rdkafka::consumer::Consumer as _;
        let Some(to) = self.rewind.take() else {
            return;
        };
        if let Err(e) = self.consumer.seek(
            &self.topic,
            self.partition,
            rdkafka::Offset::Offset(to),
            std::time::Duration::ZERO,
        ) {
            tracing::error!(topic = %self.topic, partition = self.partition, offset = to, error = %e, "could not put the partition's position back after a fetch error: the message at this offset may be skipped");
        }
    }
}

/// Where the application position must be put back after an error item at `offset`, `next`
/// being the offset after the last message handed over: there (or at the error's offset before
/// any message was), when the item moved the position past a message librdkafka will fetch
/// again; `None` when it moved nothing or librdkafka steps over that message itself.
///
/// - A batch read moves the position to `offset + 1` only above it (rd_kafka_q_serve_rkmessages,
///   rdkafka_queue.c:828-839): an error without an offset (`RD_KAFKA_OFFSET_INVALID`: a failed
///   offset commit or lookup) or below `next` moved nothing.
/// - Fetch errors (rdkafka_fetcher.c:300-340: authorization, message too large, any broker
///   error), `MSG_SIZE_TOO_LARGE` from the message set reader, partition EOF and decompression
///   failures carry the offset of the next message to fetch, which librdkafka fetches again
///   after its backoff: put back.
/// - A message that fails its CRC check (`check.crcs`, rdkafka_msgset_reader.c:609-629 and
///   1081-1101) and one with an unsupported MagicByte (1233-1259, `fetch_pos` set past it) are
///   stepped over: librdkafka fetches on after them, and the event API skips their error items.
///   Putting the position back there would fetch the message, and its error, again after every
///   pause, for ever when it ends a read. `__NOT_IMPLEMENTED` also stands for a batch in a codec
///   this build lacks (line 434), which librdkafka does not step over; leaving the position one
///   past its first offset loses nothing that could be read: the broker returns the whole batch
///   for any offset in it, and it fails the same way.
fn rewind_to(err: RDKafkaRespErr, offset: i64, next: Option<i64>) -> Option<i64> {
    let skipped = matches!(
        err,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__BAD_MSG
            | RDKafkaRespErr::RD_KAFKA_RESP_ERR__NOT_IMPLEMENTED
    );
    let moved = offset >= 0 && next.is_none_or(|n| offset >= n);
    (moved && !skipped).then_some(next.unwrap_or(offset))
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
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__PARTITION_EOF => {
                KafkaError::PartitionEOF(m.partition)
            }
            e => KafkaError::MessageConsumption(RDKafkaErrorCode::from(e)),
        });
    }
    let key = bytes_at(m.key, m.key_len);
    let payload = bytes_at(m.payload, m.len);
    let mut ts_type = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    let ts = rdsys::rd_kafka_message_timestamp(m, &mut ts_type);
    let timestamp_ms =
        (ts_type != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ts != -1)
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

#[cfg(test)]
mod tests {
    //! Fault tests of the batched read (review of 3bafaad, helper-31: the second failed on it).

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rdkafka::consumer::Consumer as _;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    use super::QueueReader;
    use crate::kafka::{Consumer, KeyflowContext};
    use crate::stats::PipelineStats;

    type PartitionQueue = rdkafka::consumer::base_consumer::PartitionQueue<KeyflowContext>;

    /// The batched read under review, or (control) rust-rdkafka's event poll keyflow used before.
    enum Read<'a> {
        Batch(&'a mut QueueReader),
        Event(&'a PartitionQueue),
    }

    /// Reads for `d`, returning the offsets of the messages and the number of errors handed over.
    fn read_for(
        r: &mut Read<'_>,
        topic: &Arc<str>,
        d: Duration,
        mut stop: impl FnMut(&[i64], usize) -> bool,
    ) -> (Vec<i64>, usize) {
        let (mut offsets, mut errors) = (Vec::new(), 0);
        let end = Instant::now() + d;
        while Instant::now() < end && !stop(&offsets, errors) {
            match r {
                Read::Batch(r) => {
                    r.read(64, topic, Instant::now(), |m| match m {
                        Ok(m) => offsets.push(m.offset),
                        Err(_) => errors += 1,
                    });
                }
                Read::Event(q) => {
                    use rdkafka::Message as _;
                    while let Some(m) = q.poll(Duration::ZERO) {
                        match m {
                            Ok(m) => offsets.push(m.offset()),
                            Err(_) => errors += 1,
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (offsets, errors)
    }

    /// `rd_kafka_consume_batch_queue` (rd_kafka_q_serve_rkmessages, rdkafka_queue.c:828-839)
    /// moves the partition's application position to `offset + 1` of *every* rkmessage it hands
    /// over, error ops included; the event API keyflow used before (`rd_kafka_fetch_op_app_prepare`,
    /// rdkafka_op.c:985) skips ops with an error. A fetch error carries the offset of the next
    /// message to fetch (rdkafka_fetcher.c:300-340: TOPIC_AUTHORIZATION_FAILED,
    /// MSG_SIZE_TOO_LARGE, any unlisted error), so after reading it the application position is
    /// one past a message keyflow never received. A pause (flow control, the pipeline gate)
    /// restarts fetching from the application position (rdkafka_partition.c:1968-1974): that
    /// message is never delivered, and the commit point passes it.
    #[test]
    fn a_fetch_error_read_in_a_batch_does_not_skip_the_next_message() {
        fetch_error_then_pause(true);
    }

    /// The same through rust-rdkafka's event API (keyflow's read before 3bafaad) delivers it.
    #[test]
    fn a_fetch_error_read_through_the_event_api_does_not_skip_the_next_message() {
        fetch_error_then_pause(false);
    }

    fn fetch_error_then_pause(batch: bool) {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("t", 1, 1).expect("topic");
        let bootstrap = mock.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("producer");
        let produce = |payload: &str| {
            producer
                .send(BaseRecord::<(), _>::to("t").partition(0).payload(payload))
                .expect("send");
            producer.flush(Duration::from_secs(5)).expect("flush");
        };
        produce("m0");

        let ctx = KeyflowContext::new(
            "p",
            "t",
            Duration::from_secs(1),
            PipelineStats::new("p"),
            Vec::new(),
        );
        let consumer: Arc<Consumer> = Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "review-g")
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("enable.partition.eof", "false")
                .set("fetch.wait.max.ms", "10")
                .set("fetch.error.backoff.ms", "10")
                .create_with_context(ctx)
                .expect("consumer"),
        );
        // As keyflow does: split, then assign, then open the second handle.
        let _queue = consumer
            .split_partition_queue("t", 0)
            .expect("partition queue");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).expect("assign");
        let mut reader_handle = QueueReader::open(&consumer, "t", 0).expect("reader");
        let mut reader = if batch {
            Read::Batch(&mut reader_handle)
        } else {
            Read::Event(&_queue)
        };
        let topic: Arc<str> = Arc::from("t");
        let position = |c: &Consumer| c.position().unwrap().elements()[0].offset();

        let (got, _) = read_for(&mut reader, &topic, Duration::from_secs(10), |o, _| {
            !o.is_empty()
        });
        assert_eq!(got, vec![0], "m0 first");
        assert_eq!(position(&consumer), Offset::Offset(1));

        // One Fetch fails (as an ACL change or an oversized message would make it).
        mock.request_errors(
            RDKafkaApiKey::Fetch,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let (got, errors) = read_for(&mut reader, &topic, Duration::from_secs(10), |_, e| e > 0);
        assert!(
            got.is_empty() && errors == 1,
            "the fetch error: {got:?} {errors}"
        );
        let after_error = position(&consumer);

        // The next message arrives; the supervisor's flow control pauses and resumes the
        // partition before it is read (apply_flow → sync_pause).
        produce("m1");
        match &mut reader {
            Read::Batch(r) => r.pause().expect("pause"),
            Read::Event(_) => consumer.pause(&tpl).expect("pause"),
        }
        std::thread::sleep(Duration::from_millis(300));
        consumer.resume(&tpl).expect("resume");
        produce("m2");
        let (got, _) = read_for(&mut reader, &topic, Duration::from_secs(5), |o, _| {
            o.len() >= 2
        });
        assert_eq!(
            got,
            vec![1, 2],
            "offset 1 was never delivered: the fetch error moved the application position to \
             {after_error:?} (one past a message not received), and the pause restarted \
             fetching there"
        );
    }
}

#[cfg(test)]
mod error_backoff {
    //! Review of ee82e2d (helper-32; the first test failed on it with 79 errors in 2 s): a seek on
    //! every read that ended on an error puts the partition back in
    //! fetch state ACTIVE (rd_kafka_toppar_seek → rd_kafka_offset_validate, epoch -1 →
    //! set_fetch_state(ACTIVE)), which clears `rktp_ts_fetch_backoff`
    //! (rdkafka_partition.c:380). A fetch error that persists (a broker answering every Fetch
    //! of the partition with an error, an undecodable batch librdkafka cannot step over) is
    //! then fetched again at once instead of after `fetch.error.backoff.ms`: a fetch, a seek
    //! and a `fetch error` warning per broker round trip.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rdkafka::consumer::Consumer as _;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    use super::QueueReader;
    use crate::kafka::{Consumer, KeyflowContext};
    use crate::stats::PipelineStats;

    /// Errors handed over in `window` while the broker fails every Fetch, through the batched
    /// read (`batch`) or rust-rdkafka's event poll (control, no seek).
    fn errors_while_fetch_fails(batch: bool, window: Duration) -> usize {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("t", 1, 1).expect("topic");
        let bootstrap = mock.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("producer");
        producer
            .send(BaseRecord::<(), _>::to("t").partition(0).payload("m0"))
            .expect("send");
        producer.flush(Duration::from_secs(5)).expect("flush");
        let ctx = KeyflowContext::new(
            "p",
            "t",
            Duration::from_secs(1),
            PipelineStats::new("p"),
            Vec::new(),
        );
        // keyflow leaves fetch.error.backoff.ms at librdkafka's default (500 ms).
        let consumer: Arc<Consumer> = Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "error-backoff-g")
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("enable.partition.eof", "false")
                .set("fetch.wait.max.ms", "10")
                .set("fetch.error.backoff.ms", "500")
                .create_with_context(ctx)
                .expect("consumer"),
        );
        let queue = consumer.split_partition_queue("t", 0).expect("queue");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).expect("assign");
        let mut reader = QueueReader::open(&consumer, "t", 0).expect("reader");
        let topic: Arc<str> = Arc::from("t");
        let (mut offsets, mut errors) = (Vec::new(), 0usize);
        let mut read = |offsets: &mut Vec<i64>, errors: &mut usize| {
            if batch {
                reader.read(64, &topic, Instant::now(), |m| match m {
                    Ok(m) => offsets.push(m.offset),
                    Err(_) => *errors += 1,
                });
            } else {
                use rdkafka::Message as _;
                while let Some(m) = queue.poll(Duration::ZERO) {
                    match m {
                        Ok(m) => offsets.push(m.offset()),
                        Err(_) => *errors += 1,
                    }
                }
            }
        };
        let end = Instant::now() + Duration::from_secs(10);
        while offsets.is_empty() && Instant::now() < end {
            read(&mut offsets, &mut errors);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(offsets, vec![0], "m0 first");
        // The broker fails the partition's Fetches (a persistent broker-side error).
        mock.request_errors(
            RDKafkaApiKey::Fetch,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_MSG; 1000],
        );
        errors = 0;
        let end = Instant::now() + window;
        while Instant::now() < end {
            read(&mut offsets, &mut errors);
            std::thread::sleep(Duration::from_millis(5));
        }
        mock.clear_request_errors(RDKafkaApiKey::Fetch);
        errors
    }

    /// Failed on ee82e2d: 79 errors (one fetch per read loop) in 2 s, not ~4.
    #[test]
    fn a_persistent_fetch_error_is_fetched_again_after_the_error_backoff() {
        let window = Duration::from_secs(2);
        let errors = errors_while_fetch_fails(true, window);
        println!("batched read: {errors} fetch errors in {window:?} (backoff 500 ms)");
        assert!(
            errors <= 8,
            "{errors} fetch errors in {window:?} with fetch.error.backoff.ms = 500: each error's \
             seek (keep_position) cleared librdkafka's fetch backoff, so the failing Fetch is \
             sent again at once (a fetch, a seek and a warning per round trip)"
        );
    }

    /// The event API (no seek) sees one error per backoff.
    #[test]
    fn the_event_api_respects_the_error_backoff() {
        let window = Duration::from_secs(2);
        let errors = errors_while_fetch_fails(false, window);
        println!("event API: {errors} fetch errors in {window:?} (backoff 500 ms)");
        assert!(errors <= 8, "{errors}");
    }
}

#[cfg(test)]
mod rewind {
    //! Which error items the reader puts the application position back for ([`rewind_to`]),
    //! per error code. The mock cluster cannot corrupt a stored batch or write an old message
    //! format, so librdkafka's own skips (a CRC failure with `check.crcs`, an unsupported
    //! MagicByte) are tested here, on the decision, not end to end.

    use rdkafka::types::RDKafkaRespErr as E;

    use super::rewind_to;

    /// Fetch errors carry the offset of the next message to fetch (`fetch_pos`,
    /// rdkafka_fetcher.c:300-340), which librdkafka fetches again after its backoff: the
    /// position the error moved one past it is put back to the message after the last one
    /// received (or to the error's offset before any was).
    #[test]
    fn a_fetch_error_is_rewound_to_the_message_after_the_last_received() {
        for err in [
            E::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
            E::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            E::RD_KAFKA_RESP_ERR_INVALID_MSG,
            E::RD_KAFKA_RESP_ERR_UNKNOWN,
            E::RD_KAFKA_RESP_ERR__PARTITION_EOF,
            // Decompression failures: librdkafka does not step over the batch either
            // (rdkafka_msgset_reader.c:517-526, `goto err` before `msetr_next_offset`).
            E::RD_KAFKA_RESP_ERR__BAD_COMPRESSION,
            E::RD_KAFKA_RESP_ERR__CRIT_SYS_RESOURCE,
        ] {
            assert_eq!(rewind_to(err, 5, Some(5)), Some(5), "{err:?}");
            assert_eq!(
                rewind_to(err, 5, None),
                Some(5),
                "{err:?} before any message"
            );
        }
    }

    /// librdkafka hands over an error for a message it steps over on purpose and fetches on
    /// past it: a CRC failure (`check.crcs`, rdkafka_msgset_reader.c:609-629 and 1081-1101,
    /// "continue with next message") and an unsupported MagicByte (1233-1259: `fetch_pos` set
    /// to the offset + 1). Putting the position back there would fetch the same message, and
    /// the same error, again after every pause: when it ends a read, for ever.
    #[test]
    fn a_message_librdkafka_skips_is_not_rewound_to() {
        for err in [
            E::RD_KAFKA_RESP_ERR__BAD_MSG,
            E::RD_KAFKA_RESP_ERR__NOT_IMPLEMENTED,
        ] {
            assert_eq!(rewind_to(err, 5, Some(5)), None, "{err:?}");
            assert_eq!(rewind_to(err, 5, None), None, "{err:?} before any message");
        }
    }

    /// A batch read moves the application position only to `offset + 1` above it
    /// (rd_kafka_q_serve_rkmessages): an error without an offset (a failed offset commit or
    /// offset lookup: `RD_KAFKA_OFFSET_INVALID`) or below the next message moved nothing, and
    /// there is nothing to put back (nor a reason to pause).
    #[test]
    fn an_error_that_did_not_move_the_position_is_not_rewound() {
        let err = E::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
        assert_eq!(rewind_to(err, -1001, Some(5)), None, "no offset");
        assert_eq!(rewind_to(err, -1001, None), None, "no offset, no message");
        assert_eq!(rewind_to(err, 3, Some(5)), None, "below the next message");
        assert_eq!(rewind_to(err, 7, Some(5)), Some(5), "above it");
    }
}
