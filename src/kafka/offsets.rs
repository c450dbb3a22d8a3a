//! Commit on completion: the offset tracker, the completed-offsets metadata a commit carries,
//! and the one function that commits.
//!
//! The commit point is the lowest incomplete offset, so everything completed above it would be
//! processed again by the next owner (after a crash, a rebalance, or a shutdown at the drain
//! deadline). Each commit therefore carries, in Kafka's per-partition commit metadata, the
//! offsets completed above the commit point; a new owner reads it back on assignment and skips
//! them. Format (ASCII, at most [`METADATA_CAP`] bytes):
//!
//! ```text
//! kf1:<commit point>:r<base64url(runs)>     runs as LEB128 varints
//! kf1:<commit point>:z<base64url(deflate(runs))>   when that is shorter
//! ```
//!
//! `runs` is a sequence of `(gap, len)` pairs walking up from the commit point: skip `gap`
//! offsets, then `len` completed offsets. Only offsets that were received and completed are
//! listed (a gap in the partition is never assumed done). Metadata that does not parse, or
//! whose commit point differs from the committed offset (written by another program, or offsets
//! reset by a tool), is ignored with a warning: the partition is simply processed from the
//! committed offset, which is what at-least-once promises anyway.

use std::collections::VecDeque;
use std::io::Write as _;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// Tracks the offsets a partition actually received (Kafka offsets can have gaps: compaction,
/// transaction markers) and which of them completed. The commit point is the lowest offset that
/// is not complete; everything below it is done.
///
/// Received offsets only grow, so `pending` is sorted and a completion is an index (dense
/// offsets) or a binary search.
/// Memory is bounded by the partition's in-flight limit.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Received and not yet passed by the commit point, oldest first; `true` once complete.
    pending: VecDeque<(i64, bool)>,
    /// Commit point once everything received is complete: last received + 1.
    next_after_last: Option<i64>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a received offset. Returns `false`, recording nothing, for an offset at or below
    /// one already received (a redelivery this partition has already seen).
    pub fn received(&mut self, offset: i64) -> bool {
        if self.next_after_last.is_some_and(|n| offset < n) {
            return false;
        }
        self.pending.push_back((offset, false));
        self.next_after_last = Some(offset + 1);
        true
    }

    /// Marks an offset complete. Returns `false` if it is not pending (never received, or
    /// completed already).
    pub fn completed(&mut self, offset: i64) -> bool {
        // Offsets are dense but for compaction gaps and transaction markers: the entry is
        // almost always at `offset - oldest`, an index; a binary search otherwise.
        let guess = self
            .pending
            .front()
            .and_then(|f| usize::try_from(offset - f.0).ok())
            .filter(|&i| self.pending.get(i).is_some_and(|e| e.0 == offset));
        let i = match guess {
            Some(i) => i,
            None => match self.pending.binary_search_by_key(&offset, |e| e.0) {
                Ok(i) => i,
                Err(_) => return false,
            },
        };
        if self.pending[i].1 {
            return false;
        }
        self.pending[i].1 = true;
        while self.pending.front().is_some_and(|e| e.1) {
            self.pending.pop_front();
        }
        true
    }

    /// The offset after the last one received (`None` before anything was received).
    pub fn next_to_receive(&self) -> Option<i64> {
        self.next_after_last
    }

    /// The offset to commit (the next one to consume): every received offset below it has
    /// completed. `None` before anything was received.
    pub fn committable(&self) -> Option<i64> {
        match self.pending.front() {
            Some(&(o, _)) => Some(o),
            None => self.next_after_last,
        }
    }

    /// Received offsets not yet passed by the commit point (incomplete, or complete above an
    /// incomplete one).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The oldest incomplete offset.
    pub fn oldest_incomplete(&self) -> Option<i64> {
        self.pending.front().map(|e| e.0)
    }

    /// The offsets completed above the commit point, as runs `(first, len)` of consecutive
    /// received-and-completed offsets, ascending. Per commit, not per message: O(pending).
    pub fn completed_runs(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        let mut it = self.pending.iter().skip_while(|e| !e.1).peekable();
        std::iter::from_fn(move || {
            // The next completed entry starts a run; it extends while offsets are consecutive
            // and complete.
            let &(first, _) = loop {
                let e = it.next()?;
                if e.1 {
                    break e;
                }
            };
            let mut len = 1;
            while it.next_if(|e| e.1 && e.0 == first + len).is_some() {
                len += 1;
            }
            Some((first, len))
        })
    }

    /// The commit metadata for the current commit point, or `None` when nothing above it is
    /// complete. See [`encode_metadata`].
    pub fn metadata(&self) -> Option<Encoded> {
        let base = self.committable()?;
        let mut runs = self.completed_runs().peekable();
        runs.peek()?;
        Some(encode_metadata(base, runs))
    }
}

/// Kafka brokers refuse commit metadata above `offset.metadata.max.bytes` (4096 by default);
/// keyflow keeps its own below that. A completion set that does not fit is cut to the runs that
/// do (the lowest offsets first): the rest is processed again after a restart, as without
/// metadata, and the cut is counted (`keyflow_commit_metadata_truncated_total`).
pub const METADATA_CAP: usize = 4000;

const PREFIX: &str = "kf1:";

/// Encoded commit metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub text: String,
    /// Completed runs left out because the encoding would pass [`METADATA_CAP`].
    pub truncated: bool,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encodes the completed runs `(first, len)` (ascending, all above `base`) as commit metadata,
/// deflated when that is shorter, cut to [`METADATA_CAP`].
pub fn encode_metadata(base: i64, runs: impl IntoIterator<Item = (i64, i64)>) -> Encoded {
    let head = format!("{PREFIX}{base}:");
    // base64 makes 4 characters of 3 bytes: the raw runs that fit the cap.
    let room = (METADATA_CAP.saturating_sub(head.len() + 1)) / 4 * 3;
    let mut raw = Vec::new();
    let mut pos = base;
    let mut truncated = false;
    let mut scratch = Vec::with_capacity(20);
    for (first, len) in runs {
        debug_assert!(
            first >= pos && len > 0,
            "runs ascend above the commit point"
        );
        scratch.clear();
        put_varint(&mut scratch, (first - pos) as u64);
        put_varint(&mut scratch, len as u64);
        if raw.len() + scratch.len() > room {
            truncated = true;
            break;
        }
        raw.extend_from_slice(&scratch);
        pos = first + len;
    }
    let deflated = {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&raw).and_then(|()| z.finish()).ok()
    };
    let (tag, body) = match deflated {
        Some(z) if z.len() < raw.len() => ('z', z),
        _ => ('r', raw),
    };
    let mut text = head;
    text.push(tag);
    URL_SAFE_NO_PAD.encode_string(&body, &mut text);
    Encoded { text, truncated }
}

/// Why commit metadata was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("not keyflow's completed-offsets metadata")]
    Foreign,
    #[error("written for commit point {written}, but the committed offset is {committed}")]
    OtherCommitPoint { written: i64, committed: i64 },
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// Decodes commit metadata written by [`encode_metadata`] for the committed offset `committed`
/// into the completed runs to skip. Never panics, whatever the bytes.
pub fn decode_metadata(committed: i64, metadata: &[u8]) -> Result<SkipSet, MetadataError> {
    let text = std::str::from_utf8(metadata).map_err(|_| MetadataError::Foreign)?;
    let rest = text.strip_prefix(PREFIX).ok_or(MetadataError::Foreign)?;
    let (base, rest) = rest
        .split_once(':')
        .ok_or(MetadataError::Malformed("no commit point"))?;
    let base: i64 = base
        .parse()
        .map_err(|_| MetadataError::Malformed("commit point is not a number"))?;
    if base != committed {
        return Err(MetadataError::OtherCommitPoint {
            written: base,
            committed,
        });
    }
    let mut chars = rest.chars();
    let tag = chars.next().ok_or(MetadataError::Malformed("empty"))?;
    let body = URL_SAFE_NO_PAD
        .decode(chars.as_str())
        .map_err(|_| MetadataError::Malformed("not base64"))?;
    let raw = match tag {
        'r' => body,
        'z' => {
            let mut out = Vec::new();
            // Bounded: the cap on what a valid encoding can hold, against a deflate bomb.
            let limit = (METADATA_CAP * 4) as u64;
            let mut z = flate2::read::DeflateDecoder::new(&body[..]);
            std::io::copy(&mut std::io::Read::take(&mut z, limit + 1), &mut out)
                .map_err(|_| MetadataError::Malformed("bad deflate stream"))?;
            if out.len() as u64 > limit {
                return Err(MetadataError::Malformed("inflates past the cap"));
            }
            out
        }
        _ => return Err(MetadataError::Malformed("unknown encoding")),
    };
    let mut input = &raw[..];
    let mut runs = Vec::new();
    let mut pos = committed;
    while !input.is_empty() {
        let gap = get_varint(&mut input).ok_or(MetadataError::Malformed("truncated"))?;
        let len = get_varint(&mut input).ok_or(MetadataError::Malformed("truncated"))?;
        let first = i64::try_from(gap)
            .ok()
            .and_then(|g| pos.checked_add(g))
            .ok_or(MetadataError::Malformed("offset overflow"))?;
        let len = i64::try_from(len)
            .ok()
            .filter(|&l| l > 0)
            .ok_or(MetadataError::Malformed("empty run"))?;
        // The commit point itself is incomplete by definition: a run never starts on it.
        if runs.is_empty() && first == committed {
            return Err(MetadataError::Malformed(
                "the commit point listed as complete",
            ));
        }
        pos = first
            .checked_add(len)
            .ok_or(MetadataError::Malformed("offset overflow"))?;
        runs.push((first, len));
    }
    Ok(SkipSet { runs: runs.into() })
}

/// Offsets a previous owner completed above its commit point: skipped (completed without
/// processing) as they arrive again. Offsets arrive in ascending order, so each check looks at
/// the front run only and the set empties as the partition passes it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SkipSet {
    runs: VecDeque<(i64, i64)>,
}

impl SkipSet {
    /// Whether `offset` was completed before; forgets runs below it. Ascending offsets only.
    pub fn take(&mut self, offset: i64) -> bool {
        while let Some(&(first, len)) = self.runs.front() {
            if offset < first {
                return false;
            }
            if offset < first + len {
                return true;
            }
            self.runs.pop_front();
        }
        false
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// How many offsets the set holds.
    pub fn len(&self) -> i64 {
        self.runs.iter().map(|r| r.1).sum()
    }
}

/// One partition's commit: the next offset to consume (Kafka's convention, i.e.
/// [`OffsetTracker::committable`]) and the completed-offsets metadata above it.
#[derive(Debug, Clone)]
pub struct CommitOffset<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub next: i64,
    pub metadata: Option<&'a str>,
}

/// The offsets as Kafka takes them (commit, or a transaction's offsets).
pub fn to_list(offsets: &[CommitOffset<'_>]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for o in offsets {
        tpl.add_partition_offset(o.topic, o.partition, Offset::Offset(o.next))?;
        if let (Some(m), Some(mut e)) = (o.metadata, tpl.find_partition(o.topic, o.partition)) {
            e.set_metadata(m);
        }
    }
    Ok(tpl)
}

/// Commits synchronously (revoke and shutdown) or asynchronously without an answer.
pub fn commit<C: ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    offsets: &[CommitOffset<'_>],
    mode: CommitMode,
) -> KafkaResult<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    consumer.commit(&to_list(offsets)?, mode)
}

/// Commits asynchronously with the answer delivered to `reply` as an `OFFSET_COMMIT` event (see
/// [`super::committer`]); a null `reply` sends it unanswered. `rd_kafka_commit(async)` would
/// report a manual commit's result to nobody (its events cover automatic commits only).
///
/// # Safety
/// `reply` is null or a live librdkafka queue of the same client instance.
pub unsafe fn commit_async<C: ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    offsets: &[CommitOffset<'_>],
    reply: *mut rdkafka::bindings::rd_kafka_queue_t,
) -> KafkaResult<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let tpl = to_list(offsets)?;
    if reply.is_null() {
        return consumer.commit(&tpl, CommitMode::Async);
    }
    use rdkafka::bindings as rd;
    use rdkafka::consumer::Consumer as _;
    // SAFETY: the consumer's live handle and a live queue; the reply op keeps its own reference
    // to the queue, and librdkafka copies the list before this returns.
    let err = unsafe {
        rd::rd_kafka_commit_queue(
            consumer.client().native_ptr(),
            tpl.ptr(),
            reply,
            None,
            std::ptr::null_mut(),
        )
    };
    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(rdkafka::error::KafkaError::ConsumerCommit(err.into()))
    }
}

/// The committed offsets of `partitions` with their raw metadata bytes (rdkafka's `metadata()`
/// panics on bytes that are not UTF-8, and another program may have written anything there).
/// A partition with no committed offset is left out. One broker round trip: at assignment.
pub fn committed_with_metadata<C: ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    timeout: std::time::Duration,
) -> KafkaResult<Vec<(i32, i64, Vec<u8>)>> {
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    let tpl = consumer.committed_offsets(tpl, timeout)?;
    let mut out = Vec::with_capacity(partitions.len());
    // SAFETY: `tpl` owns a valid list of `cnt` elements for the duration of this loop; the
    // metadata pointer/size pairs are librdkafka's copies owned by that list.
    unsafe {
        let list = &*tpl.ptr();
        for i in 0..list.cnt as usize {
            let e = &*list.elems.add(i);
            if e.offset < 0 {
                continue;
            }
            let metadata = if e.metadata.is_null() || e.metadata_size == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(e.metadata as *const u8, e.metadata_size).to_vec()
            };
            out.push((e.partition, e.offset, metadata));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Review of cde2a59 (exactly_once): `max_in_flight` counts *incomplete* messages (a
    /// completion releases its slot), so one message held back (a retry backoff, a slow key)
    /// lets the completed set above it grow; and an input written by a transactional producer
    /// (e.g. an upstream keyflow in exactly_once) has a marker offset after each of its
    /// transactions, which keyflow never receives, so the completed offsets form one run per
    /// upstream transaction. Unbounded, the metadata was cut (1 incomplete offset, 89,817
    /// completed above it: cut at 1,498 bytes, marking 6,867 of them done), and under
    /// exactly_once the outputs of the offsets cut are in the committed transaction: written
    /// again after a crash. A supervisor under exactly_once stops taking messages at
    /// `EXACTLY_ONCE_MAX_PENDING` received offsets above the commit point; the worst layout up
    /// to that bound (runs of one, a marker after each) must fit uncut.
    #[test]
    fn exactly_once_pending_bound_fits_the_metadata_in_the_worst_layout() {
        for run_len in [1u64, 2, 8] {
            let mut t = OffsetTracker::new();
            let mut o = 1_000i64;
            assert!(t.received(o)); // held back: the commit point
            let stuck = o;
            o += 1;
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            'fill: loop {
                // An upstream transaction of 1..=run_len records, then its commit marker.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                for _ in 0..=(seed % run_len) {
                    if t.pending() >= crate::config::EXACTLY_ONCE_MAX_PENDING {
                        break 'fill;
                    }
                    assert!(t.received(o));
                    assert!(t.completed(o));
                    o += 1;
                }
                o += 1; // the marker: never received
            }
            let completed = t.pending() - 1;
            assert_eq!(t.committable(), Some(stuck));
            let m = t
                .metadata()
                .expect("completed offsets above the commit point");
            let kept = decode_metadata(stuck, m.text.as_bytes()).unwrap().len();
            assert!(
                !m.truncated && kept as usize == completed,
                "runs up to {run_len}: {completed} completed above the held-back offset; metadata {} bytes, cut {}, marks {kept}",
                m.text.len(),
                m.truncated
            );
        }
    }

    #[test]
    fn commit_point_waits_for_the_oldest() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.committable(), None);
        for o in [10, 11, 12, 15] {
            assert!(t.received(o));
        }
        assert_eq!(t.committable(), Some(10));
        assert!(t.completed(11));
        assert!(t.completed(15));
        assert_eq!(
            t.committable(),
            Some(10),
            "11 and 15 are done but 10 is not"
        );
        assert!(t.completed(10));
        assert_eq!(t.committable(), Some(12));
        assert!(t.completed(12));
        assert_eq!(
            t.committable(),
            Some(16),
            "gap 13-14 never received: last + 1"
        );
        assert!(!t.completed(12), "double completion is refused");
        assert!(!t.completed(13), "never received");
        assert!(!t.received(14), "below the last received");
    }

    #[test]
    fn completed_runs_list_only_received_completed_offsets_above_the_point() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 12, 13, 15, 16, 20] {
            t.received(o);
        }
        for o in [11, 12, 15, 16, 20] {
            t.completed(o);
        }
        // 13 is incomplete, 14 was never received: 15-16 is its own run.
        assert_eq!(
            t.completed_runs().collect::<Vec<_>>(),
            vec![(11, 2), (15, 2), (20, 1)]
        );
        let m = t.metadata().unwrap();
        assert!(m.text.starts_with("kf1:10:"), "{}", m.text);
        assert!(!m.truncated);
        let mut skip = decode_metadata(10, m.text.as_bytes()).unwrap();
        let skipped: Vec<i64> = (10..25).filter(|&o| skip.take(o)).collect();
        assert_eq!(skipped, vec![11, 12, 15, 16, 20]);
        // Nothing above the point: no metadata.
        t.completed(10);
        t.completed(13);
        assert_eq!(t.metadata(), None);
    }

    #[test]
    fn foreign_or_garbage_metadata_is_refused_without_panicking() {
        for m in [
            &b""[..],
            b"some other tool",
            b"\xff\xfe\x00 not utf-8",
            b"kf1:",
            b"kf1:x:r",
            b"kf1:10",
            b"kf1:10:q!!",
            b"kf1:10:r%%%",
            b"kf1:10:zAAAA",
            b"kf1:10:r_____________w",
        ] {
            assert!(decode_metadata(10, m).is_err(), "{m:?}");
        }
        // Written for another commit point (offsets reset by a tool): not used.
        let m = encode_metadata(5, [(7, 3)]);
        assert_eq!(
            decode_metadata(10, m.text.as_bytes()),
            Err(MetadataError::OtherCommitPoint {
                written: 5,
                committed: 10
            })
        );
    }

    #[test]
    fn a_set_too_large_for_the_cap_is_cut_to_its_lowest_runs() {
        // Every other offset complete, with irregular gaps deflate cannot fold: far past 4000
        // bytes.
        let mut x = 1u64;
        let runs: Vec<(i64, i64)> = (0..20_000i64)
            .map(|i| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (1 + i * 1000 + (x >> 60) as i64, 1 + (x >> 62) as i64)
            })
            .collect();
        let m = encode_metadata(0, runs.iter().copied());
        assert!(m.truncated);
        assert!(m.text.len() <= METADATA_CAP, "{}", m.text.len());
        let mut skip = decode_metadata(0, m.text.as_bytes()).unwrap();
        let kept = skip.len();
        assert!(kept > 100, "the cut keeps what fits: {kept}");
        let (first, _) = runs[0];
        assert!(skip.take(first), "the lowest runs are kept");
    }

    proptest! {
        /// Random gaps, random completion order: the commit point never passes an incomplete
        /// offset, never moves backwards, and reaches last + 1 when all complete.
        #[test]
        fn never_passes_an_incomplete_offset(
            gaps in prop::collection::vec(1i64..4, 1..200),
            order in any::<prop::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in &gaps { o += g; offsets.push(o); }
            let mut t = OffsetTracker::new();
            for &o in &offsets { prop_assert!(t.received(o)); }
            let mut todo = offsets.clone();
            // A deterministic shuffle from the seed and the sampled index.
            let mut s = seed ^ (order.index(1 << 20) as u64);
            for i in (1..todo.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                todo.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut done = std::collections::BTreeSet::new();
            let mut last = t.committable().unwrap();
            for o in todo {
                prop_assert!(t.completed(o));
                done.insert(o);
                let c = t.committable().unwrap();
                prop_assert!(c >= last, "commit point went back");
                for &x in &offsets {
                    if x < c { prop_assert!(done.contains(&x), "committed past incomplete {}", x); }
                }
                last = c;
            }
            prop_assert_eq!(t.committable(), Some(offsets.last().unwrap() + 1));
            prop_assert_eq!(t.pending(), 0);
        }

        /// Random completion sets round-trip through the metadata (within the cap), and the
        /// skip set never holds an offset that is incomplete or was never received.
        #[test]
        fn metadata_round_trips_and_never_skips_an_incomplete_offset(
            gaps in prop::collection::vec(1i64..5, 1..2000),
            done in prop::collection::vec(any::<bool>(), 2000),
            start in 0i64..1_000_000_000_000,
        ) {
            let mut t = OffsetTracker::new();
            let mut offsets = Vec::new();
            let mut o = start;
            for g in &gaps { o += g; offsets.push(o); t.received(o); }
            let mut completed = std::collections::BTreeSet::new();
            for (&o, &d) in offsets.iter().zip(&done) {
                if d { t.completed(o); completed.insert(o); }
            }
            let Some(point) = t.committable() else { unreachable!() };
            let above: Vec<i64> = completed.iter().copied().filter(|&o| o > point).collect();
            match t.metadata() {
                None => prop_assert!(above.is_empty()),
                Some(m) => {
                    prop_assert!(m.text.len() <= METADATA_CAP);
                    let mut skip = decode_metadata(point, m.text.as_bytes()).unwrap();
                    let skipped: Vec<i64> = offsets.iter().copied().filter(|&o| o >= point && skip.take(o)).collect();
                    for o in &skipped {
                        prop_assert!(completed.contains(o), "skips incomplete offset {}", o);
                    }
                    if m.truncated {
                        prop_assert!(skipped.len() < above.len());
                        prop_assert_eq!(&skipped[..], &above[..skipped.len()], "a cut keeps the lowest");
                    } else {
                        prop_assert_eq!(skipped, above);
                    }
                }
            }
        }

        /// Whatever the bytes, decoding never panics.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..200),
            committed in any::<i64>(),
        ) {
            let mut with_prefix = format!("kf1:{committed}:").into_bytes();
            with_prefix.extend_from_slice(&bytes);
            let _ = decode_metadata(committed, &bytes);
            let _ = decode_metadata(committed, &with_prefix);
        }
    }
}
