//! A hot key does not starve its partition: a key may hold at most its **share** of the
//! partition's in-flight messages waiting behind its running one (`max_in_flight / 8`, see
//! [`key_share`]). Its messages beyond that leave memory for a per-partition **overflow file**
//! and come back, in order, as the key drains; the other keys of the partition keep the rest of
//! the budget and move at their own pace.
//!
//! - Order: once a key has messages in the file, every later message of it goes there too, and
//!   they are read back oldest first, only behind what the key already holds in memory.
//! - Commit: a message in the file is received and not complete, so the commit point stays at
//!   or below it: a crash or a rebalance re-delivers it from Kafka (the file is a cache, never
//!   read after the supervisor stops).
//! - Memory: an index entry per message in the file ([`INDEX_COST`]), counted with the offset
//!   tracker in the partition's share: at half of it the partition takes no more messages
//!   until the hot key catches up (the backlog stays in Kafka). The file is anonymous (made
//!   unlinked in the system's temp dir, gone with the process), a chain of segments each
//!   dropped once every message in it was read back.
//! - A failed write (disk full): what was pushed stays readable from the write buffer, and the
//!   partition takes no more messages until a write succeeds.
//! - Cost: nothing on the path of a key under its share (one flag test); a spilled message is
//!   written once (buffered, one `pwrite` per [`WRITE_BUFFER`]) and read once (one `pread`).
//!
//! Why not re-read the hot key's messages from Kafka (seek back to the first one dropped): each
//! re-read fetches again everything read past it (other keys' messages included), once per time
//! the key drains, and a seek drops the partition's prefetch (~0.5 s to refill, as a pause).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rustc_hash::FxHashMap;

use crate::message::Message;

/// Bytes gathered before a write to the file.
const WRITE_BUFFER: usize = 64 << 10;
/// The file is a chain of segments of about this size: a segment is dropped (its disk space
/// given back) once every message in it was read back, so the disk holds about the backlog,
/// not everything ever spilled.
const SEGMENT_BYTES: u64 = 4 << 20;
/// What a message in the file costs in memory: its index entry (and the deque's slack).
pub const INDEX_COST: u64 = 24;

/// A key's share of a partition's in-flight messages: how many may wait behind its running one
/// before the rest go to the overflow file.
pub fn key_share(max_in_flight: usize) -> usize {
    (max_in_flight / 8).max(4)
}

/// Where a message is: segment id, place in it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    segment: u64,
    pos: u32,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    file: File,
    /// Bytes written to the file; the write buffer (last segment only) continues from here.
    written: u64,
    /// Messages in it not read back yet.
    live: usize,
}

/// One partition's overflow: messages of keys over their share, per key in offset order.
#[derive(Debug, Default)]
pub struct Overflow {
    /// Oldest first; the last one is written to.
    segments: VecDeque<Segment>,
    next_id: u64,
    /// Bytes of the last segment not written yet (they are read from here meanwhile).
    buf: Vec<u8>,
    keys: FxHashMap<Bytes, VecDeque<Entry>>,
    /// Messages in the file not read back yet.
    held: usize,
    /// The last write failed (disk full, I/O error): what was pushed is still readable from
    /// `buf`, and the partition takes no more messages until a write succeeds.
    failing: bool,
}

impl Overflow {
    /// No message is held: a key's messages need not be looked up.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Messages held in the file.
    pub fn len(&self) -> usize {
        self.held
    }

    /// Keys with messages in the file, and how many each.
    pub fn keys(&self) -> impl Iterator<Item = (&Bytes, usize)> {
        self.keys.iter().map(|(k, q)| (k, q.len()))
    }

    /// `key` has messages in the file (its next messages must follow them there).
    pub fn holds(&self, key: &Bytes) -> bool {
        !self.is_empty() && self.keys.contains_key(key)
    }

    /// The last write failed: take no more messages (see [`Self::retry`]).
    pub fn failing(&self) -> bool {
        self.failing
    }

    /// Memory the overflow takes: its index and the write buffer.
    pub fn memory(&self) -> u64 {
        self.held as u64 * INDEX_COST + self.buf.capacity() as u64
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.written).sum()
    }

    /// Writes `m` (it has a key) behind its key's earlier ones. Never refuses: a record that
    /// cannot be written stays readable in the buffer, and [`Self::failing`] says so.
    pub fn push(&mut self, m: &Message) -> io::Result<()> {
        let Some(key) = &m.key else {
            return Err(io::Error::other("a message without key is never held back"));
        };
        let full = self
            .segments
            .back()
            .is_none_or(|s| s.written + self.buf.len() as u64 >= SEGMENT_BYTES);
        if full && self.flush().is_ok() {
            // A new segment (the last one is complete): on failure, keep appending to the
            // buffer of the last one, if any.
            match tempfile::tempfile() {
                Ok(file) => {
                    self.segments.push_back(Segment {
                        id: self.next_id,
                        file,
                        written: 0,
                        live: 0,
                    });
                    self.next_id += 1;
                }
                Err(e) if self.segments.is_empty() => {
                    self.failing = true;
                    return Err(e);
                }
                Err(_) => self.failing = true,
            }
        }
        let Some(seg) = self.segments.back_mut() else {
            return Err(io::Error::other("no overflow segment"));
        };
        let pos = seg.written + self.buf.len() as u64;
        encode(m, &mut self.buf);
        let len = (seg.written + self.buf.len() as u64 - pos) as u32;
        seg.live += 1;
        let entry = Entry {
            segment: seg.id,
            pos: pos as u32,
            len,
        };
        self.keys.entry(key.clone()).or_default().push_back(entry);
        self.held += 1;
        if self.buf.len() >= WRITE_BUFFER {
            let _ = self.flush();
        }
        Ok(())
    }

    /// Writes the buffer to the last segment; a failure keeps it (readable) and sets
    /// [`Self::failing`].
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(seg) = self.segments.back_mut() else {
            return Ok(());
        };
        match seg.file.write_all_at(&self.buf, seg.written) {
            Ok(()) => {
                seg.written += self.buf.len() as u64;
                self.buf.clear();
                self.failing = false;
                Ok(())
            }
            Err(e) => {
                self.failing = true;
                Err(e)
            }
        }
    }

    /// After a failed write: tries again (on a tick, or before a fetch).
    pub fn retry(&mut self) {
        if self.failing {
            let _ = self.flush();
        }
    }

    /// The oldest message of `key` in the file, if any. A segment every message of which was
    /// read back is dropped; when nothing is held the buffer is given back too.
    pub fn pop(
        &mut self,
        key: &Bytes,
        topic: &Arc<str>,
        partition: i32,
    ) -> Option<io::Result<Message>> {
        let q = self.keys.get_mut(key)?;
        let e = q.pop_front()?;
        if q.is_empty() {
            self.keys.remove(key);
        }
        self.held -= 1;
        let read = self.read(e).map(|bytes| decode(bytes, topic, partition));
        if let Some(seg) = self.segment_mut(e.segment) {
            seg.live -= 1;
        }
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.live == 0) {
            self.segments.pop_front();
        }
        if self.held == 0 {
            self.segments.clear();
            self.buf = Vec::new();
            self.keys.shrink_to_fit();
            self.failing = false;
        }
        Some(read.and_then(|m| m.ok_or_else(|| io::Error::other("overflow record unreadable"))))
    }

    fn segment_mut(&mut self, id: u64) -> Option<&mut Segment> {
        let first = self.segments.front()?.id;
        self.segments.get_mut(id.checked_sub(first)? as usize)
    }

    fn read(&mut self, e: Entry) -> io::Result<Bytes> {
        let last = self.segments.back().map(|s| (s.id, s.written));
        let (pos, len) = (e.pos as u64, e.len as usize);
        if let Some((id, written)) = last {
            if id == e.segment && pos >= written {
                // Still in the write buffer: no write needed to read it.
                let at = (pos - written) as usize;
                return self
                    .buf
                    .get(at..at + len)
                    .map(Bytes::copy_from_slice)
                    .ok_or_else(|| io::Error::other("overflow record past the buffer"));
            }
        }
        let Some(seg) = self.segment_mut(e.segment) else {
            return Err(io::Error::other("overflow segment missing"));
        };
        let mut b = BytesMut::zeroed(len);
        seg.file.read_exact_at(&mut b, pos)?;
        Ok(b.freeze())
    }
}

fn put_opt(buf: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            buf.put_u32(b.len() as u32);
            buf.put_slice(b);
        }
        None => buf.put_u32(u32::MAX),
    }
}

fn encode(m: &Message, buf: &mut Vec<u8>) {
    buf.put_i64(m.offset);
    match m.timestamp_ms {
        Some(t) => {
            buf.put_u8(1);
            buf.put_i64(t);
        }
        None => buf.put_u8(0),
    }
    put_opt(buf, m.key.as_deref());
    put_opt(buf, m.payload.as_deref());
    match &m.headers {
        Some(h) => {
            buf.put_u32(h.count() as u32);
            for x in h.iter() {
                put_opt(buf, Some(x.key.as_bytes()));
                put_opt(buf, x.value);
            }
        }
        None => buf.put_u32(u32::MAX),
    }
}

fn get_opt(b: &mut Bytes) -> Option<Option<Bytes>> {
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32();
    if n == u32::MAX {
        return Some(None);
    }
    (b.remaining() >= n as usize).then(|| Some(b.split_to(n as usize)))
}

/// The message written by [`encode`]; `None` if the bytes are not one (a damaged file).
fn decode(mut b: Bytes, topic: &Arc<str>, partition: i32) -> Option<Message> {
    if b.remaining() < 9 {
        return None;
    }
    let offset = b.get_i64();
    let timestamp_ms = match b.get_u8() {
        1 if b.remaining() >= 8 => Some(b.get_i64()),
        0 => None,
        _ => return None,
    };
    let key = get_opt(&mut b)?;
    let payload = get_opt(&mut b)?;
    if b.remaining() < 4 {
        return None;
    }
    let headers = match b.get_u32() {
        u32::MAX => None,
        n => {
            let mut h = OwnedHeaders::new_with_capacity(n as usize);
            for _ in 0..n {
                let k = get_opt(&mut b)??;
                let v = get_opt(&mut b)?;
                h = h.insert(Header {
                    key: std::str::from_utf8(&k).ok()?,
                    value: v.as_deref(),
                });
            }
            Some(h)
        }
    };
    Some(Message {
        topic: topic.clone(),
        partition,
        offset,
        timestamp_ms,
        key,
        payload,
        headers: headers.map(Arc::new),
        // Back in memory now: queue wait and drain ages count from here.
        received: Instant::now(),
        outbox: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: i64, key: &str, payload: &str) -> Message {
        let mut m = Message::new("t", 3, offset, Some(key.as_bytes()), payload.as_bytes());
        m.timestamp_ms = Some(1_700_000_000_000 + offset);
        m
    }

    /// Review of e637ab6: a message written to the overflow file leaves memory, but the index
    /// keeps its key; were the key a view of the buffer that also holds the payload, the payload
    /// would stay in memory, outside `memory()`, as long as the key has overflow.
    #[test]
    fn an_overflowed_key_does_not_keep_its_payload_in_memory() {
        let mut o = Overflow::default();
        let big = "x".repeat(1 << 20);
        o.push(&msg(1, "hot", &big)).unwrap();
        // The message itself is gone (written to the overflow buffer/file).
        let (key, _) = o.keys.drain().next().unwrap();
        let retained = key
            .try_into_mut()
            .expect("the index holds the only reference")
            .capacity();
        assert!(
            retained < 1024,
            "the overflow index's 3-byte key keeps a {retained}-byte buffer alive"
        );
    }

    #[test]
    fn messages_come_back_per_key_in_order_with_everything() {
        let topic: Arc<str> = Arc::from("t");
        let mut o = Overflow::default();
        let mut with_headers = msg(2, "a", "two");
        with_headers.set_headers(
            OwnedHeaders::new()
                .insert(Header {
                    key: "h",
                    value: Some(&b"v"[..]),
                })
                .insert(Header::<&[u8]> {
                    key: "null",
                    value: None,
                }),
        );
        let mut no_payload = msg(3, "b", "");
        no_payload.payload = None;
        no_payload.timestamp_ms = None;
        for m in [
            &msg(1, "a", "one"),
            &with_headers,
            &no_payload,
            &msg(4, "a", "four"),
        ] {
            o.push(m).unwrap();
        }
        assert_eq!(o.len(), 4);
        assert!(o.holds(&Bytes::from_static(b"a")) && !o.holds(&Bytes::from_static(b"c")));
        let a = Bytes::from_static(b"a");
        let got: Vec<Message> = std::iter::from_fn(|| o.pop(&a, &topic, 3))
            .map(Result::unwrap)
            .collect();
        assert_eq!(got.iter().map(|m| m.offset).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(got[0].payload.as_deref(), Some(&b"one"[..]));
        assert_eq!(got[0].timestamp_ms, Some(1_700_000_000_001));
        assert_eq!((got[0].partition, &*got[0].topic), (3, "t"));
        let h = got[1].headers.as_ref().unwrap();
        assert_eq!(h.count(), 2);
        assert_eq!((h.get(0).key, h.get(0).value), ("h", Some(&b"v"[..])));
        assert_eq!((h.get(1).key, h.get(1).value), ("null", None));
        let b = o
            .pop(&Bytes::from_static(b"b"), &topic, 3)
            .unwrap()
            .unwrap();
        assert_eq!((b.offset, b.payload, b.timestamp_ms), (3, None, None));
        assert!(o.is_empty());
        assert!(
            o.segments.is_empty(),
            "emptied once everything was read back"
        );
    }

    #[test]
    fn a_large_backlog_is_written_in_chunks_and_read_back() {
        let topic: Arc<str> = Arc::from("t");
        let mut o = Overflow::default();
        let payload = "x".repeat(1000);
        for i in 0..500 {
            o.push(&msg(i, "hot", &payload)).unwrap();
        }
        assert!(o.disk_bytes() > 0, "written to the file, not all buffered");
        let hot = Bytes::from_static(b"hot");
        for i in 0..500 {
            let m = o.pop(&hot, &topic, 3).unwrap().unwrap();
            assert_eq!(m.offset, i);
            assert_eq!(m.payload.as_deref().map(<[u8]>::len), Some(1000));
        }
        assert!(o.pop(&hot, &topic, 3).is_none());
    }

    /// Review F1: a steady hot key (always one message held) does not grow the file.
    #[test]
    fn a_steady_hot_key_does_not_grow_the_file() {
        let (topic, hot): (Arc<str>, _) = (Arc::from("t"), Bytes::from_static(b"hot"));
        let (mut o, payload) = (Overflow::default(), "x".repeat(1000));
        o.push(&msg(0, "hot", &payload)).unwrap();
        for i in 1..20_000 {
            o.push(&msg(i, "hot", &payload)).unwrap();
            assert_eq!(o.pop(&hot, &topic, 3).unwrap().unwrap().offset, i - 1);
        }
        let on_disk = o.disk_bytes();
        assert!(
            on_disk <= 2 * SEGMENT_BYTES,
            "1 message (1 KB) held, {on_disk} bytes on disk"
        );
    }

    /// Review F4: with the disk full, what was pushed stays readable (from the buffer, without
    /// a write), the overflow says it is failing, and nothing is lost or reordered.
    #[test]
    fn a_full_disk_keeps_what_was_pushed_readable_and_in_order() {
        let (topic, hot): (Arc<str>, _) = (Arc::from("t"), Bytes::from_static(b"hot"));
        let mut o = Overflow::default();
        let payload = "x".repeat(1000);
        o.push(&msg(0, "hot", &payload)).unwrap();
        o.segments.back_mut().unwrap().file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
            .unwrap();
        for i in 1..200 {
            o.push(&msg(i, "hot", &payload)).unwrap();
        }
        assert!(o.failing(), "a failed write is reported");
        for i in 0..200 {
            let m = o
                .pop(&hot, &topic, 3)
                .unwrap()
                .expect("readable without a write");
            assert_eq!(m.offset, i);
        }
        assert!(o.is_empty() && !o.failing());
    }

    #[test]
    fn damaged_bytes_decode_to_none_never_a_panic() {
        let topic: Arc<str> = Arc::from("t");
        let mut buf = Vec::new();
        encode(&msg(9, "k", "payload"), &mut buf);
        for cut in 0..buf.len() {
            let _ = decode(Bytes::copy_from_slice(&buf[..cut]), &topic, 0);
        }
        let mut bad = buf.clone();
        bad[8] = 7;
        assert!(decode(Bytes::from(bad), &topic, 0).is_none());
    }
}
