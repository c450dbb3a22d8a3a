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
//! - Memory: an index entry per message in the file (its place and when it arrived); the file
//!   is anonymous (made unlinked in the system's temp dir, gone with the process) and is
//!   emptied each time every message in it has been read back.
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

/// A key's share of a partition's in-flight messages: how many may wait behind its running one
/// before the rest go to the overflow file.
pub fn key_share(max_in_flight: usize) -> usize {
    (max_in_flight / 8).max(4)
}

/// Where a message is in the file.
#[derive(Debug, Clone, Copy)]
struct Entry {
    pos: u64,
    len: u32,
    received: Instant,
}

/// One partition's overflow: messages of keys over their share, per key in offset order.
#[derive(Debug, Default)]
pub struct Overflow {
    file: Option<File>,
    /// Bytes written to the file; the write buffer continues from here.
    flushed: u64,
    buf: Vec<u8>,
    keys: FxHashMap<Bytes, VecDeque<Entry>>,
    /// Messages in the file not read back yet.
    held: usize,
    /// Every message ever spilled / read back (for `/debug` and metrics).
    pub spilled_total: u64,
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

    /// Writes `m` (it has a key) to the file, behind its key's earlier ones.
    pub fn push(&mut self, m: &Message) -> io::Result<()> {
        let Some(key) = &m.key else {
            return Err(io::Error::other("a message without key is never held back"));
        };
        if self.file.is_none() {
            self.file = Some(tempfile::tempfile()?);
        }
        let pos = self.flushed + self.buf.len() as u64;
        encode(m, &mut self.buf);
        let len = (self.flushed + self.buf.len() as u64 - pos) as u32;
        if self.buf.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        self.keys.entry(key.clone()).or_default().push_back(Entry {
            pos,
            len,
            received: m.received,
        });
        self.held += 1;
        self.spilled_total += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(f) = &self.file else {
            return Err(io::Error::other("overflow file missing"));
        };
        f.write_all_at(&self.buf, self.flushed)?;
        self.flushed += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// The oldest message of `key` in the file, if any. When the file holds nothing more it is
    /// emptied (its space given back).
    pub fn pop(&mut self, key: &Bytes, topic: &Arc<str>, partition: i32) -> Option<io::Result<Message>> {
        let q = self.keys.get_mut(key)?;
        let e = q.pop_front()?;
        if q.is_empty() {
            self.keys.remove(key);
        }
        self.held -= 1;
        let read = self.read(e).map(|bytes| decode(bytes, topic, partition, e.received));
        if self.held == 0 {
            self.reset();
        }
        Some(read.and_then(|m| m.ok_or_else(|| io::Error::other("overflow record unreadable"))))
    }

    fn read(&mut self, e: Entry) -> io::Result<Bytes> {
        if e.pos + e.len as u64 > self.flushed {
            self.flush()?;
        }
        let Some(f) = &self.file else {
            return Err(io::Error::other("overflow file missing"));
        };
        let mut b = BytesMut::zeroed(e.len as usize);
        f.read_exact_at(&mut b, e.pos)?;
        Ok(b.freeze())
    }

    /// Nothing held: the file is truncated and written from its start again.
    fn reset(&mut self) {
        self.buf.clear();
        self.buf.shrink_to(0);
        self.flushed = 0;
        self.keys.shrink_to_fit();
        if let Some(f) = &self.file {
            if f.set_len(0).is_err() {
                self.file = None;
            }
        }
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
fn decode(mut b: Bytes, topic: &Arc<str>, partition: i32, received: Instant) -> Option<Message> {
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
        headers,
        received,
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

    #[test]
    fn messages_come_back_per_key_in_order_with_everything() {
        let topic: Arc<str> = Arc::from("t");
        let mut o = Overflow::default();
        let mut with_headers = msg(2, "a", "two");
        with_headers.headers = Some(
            OwnedHeaders::new()
                .insert(Header { key: "h", value: Some(&b"v"[..]) })
                .insert(Header::<&[u8]> { key: "null", value: None }),
        );
        let mut no_payload = msg(3, "b", "");
        no_payload.payload = None;
        no_payload.timestamp_ms = None;
        for m in [&msg(1, "a", "one"), &with_headers, &no_payload, &msg(4, "a", "four")] {
            o.push(m).unwrap();
        }
        assert_eq!(o.len(), 4);
        assert!(o.holds(&Bytes::from_static(b"a")) && !o.holds(&Bytes::from_static(b"c")));
        let a = Bytes::from_static(b"a");
        let got: Vec<Message> = std::iter::from_fn(|| o.pop(&a, &topic, 3)).map(Result::unwrap).collect();
        assert_eq!(got.iter().map(|m| m.offset).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(got[0].payload.as_deref(), Some(&b"one"[..]));
        assert_eq!(got[0].timestamp_ms, Some(1_700_000_000_001));
        assert_eq!((got[0].partition, &*got[0].topic), (3, "t"));
        let h = got[1].headers.as_ref().unwrap();
        assert_eq!(h.count(), 2);
        assert_eq!((h.get(0).key, h.get(0).value), ("h", Some(&b"v"[..])));
        assert_eq!((h.get(1).key, h.get(1).value), ("null", None));
        let b = o.pop(&Bytes::from_static(b"b"), &topic, 3).unwrap().unwrap();
        assert_eq!((b.offset, b.payload, b.timestamp_ms), (3, None, None));
        assert!(o.is_empty());
        assert_eq!(o.flushed, 0, "emptied once everything was read back");
    }

    #[test]
    fn a_large_backlog_is_written_in_chunks_and_read_back() {
        let topic: Arc<str> = Arc::from("t");
        let mut o = Overflow::default();
        let payload = "x".repeat(1000);
        for i in 0..500 {
            o.push(&msg(i, "hot", &payload)).unwrap();
        }
        assert!(o.flushed > 0, "written to the file, not all buffered");
        let hot = Bytes::from_static(b"hot");
        for i in 0..500 {
            let m = o.pop(&hot, &topic, 3).unwrap().unwrap();
            assert_eq!(m.offset, i);
            assert_eq!(m.payload.as_deref().map(<[u8]>::len), Some(1000));
        }
        assert!(o.pop(&hot, &topic, 3).is_none());
    }

    #[test]
    fn damaged_bytes_decode_to_none_never_a_panic() {
        let topic: Arc<str> = Arc::from("t");
        let mut buf = Vec::new();
        encode(&msg(9, "k", "payload"), &mut buf);
        for cut in 0..buf.len() {
            let _ = decode(Bytes::copy_from_slice(&buf[..cut]), &topic, 0, Instant::now());
        }
        let mut bad = buf.clone();
        bad[8] = 7;
        assert!(decode(Bytes::from(bad), &topic, 0, Instant::now()).is_none());
    }
}
