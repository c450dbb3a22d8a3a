//! W3C trace context: a `traceparent` header on an input message is continued on every message
//! keyflow writes for it (`forward`, `route`, the dead letter) and on every `http` request made
//! for it: same trace id and flags, a new parent (span) id naming keyflow's step. Messages
//! without one are written as they came, and no `traceparent` is invented.
//!
//! Only messages that carry headers pay anything: the header list is scanned once, and the new
//! value is built on the stack.

use rand::Rng;
use rdkafka::message::{Header, Headers, OwnedHeaders};

pub const TRACEPARENT: &str = "traceparent";

/// The trace id of a valid `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(traceparent).ok()?;
    let mut parts = s.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2))
    .then_some(trace)
}

/// The trace id carried by these headers, if any.
pub fn find_trace_id(headers: &OwnedHeaders) -> Option<String> {
    headers
        .iter()
        .find(|h| h.key == TRACEPARENT)
        .and_then(|h| h.value)
        .and_then(trace_id)
        .map(str::to_string)
}

/// The value of a valid `traceparent` header, if these headers carry one.
pub fn traceparent(headers: &OwnedHeaders) -> Option<&[u8]> {
    headers
        .iter()
        .find(|h| h.key == TRACEPARENT)
        .and_then(|h| h.value)
        .filter(|v| trace_id(v).is_some())
}

/// The length of a version-00 `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;

/// The continuation of a valid `traceparent`: same trace id and flags, a fresh random span
/// (parent) id. Built on the stack: no allocation. `None` if `traceparent` is not valid.
pub fn continued(traceparent: &[u8]) -> Option<[u8; TRACEPARENT_LEN]> {
    trace_id(traceparent)?;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut span = [0u8; 8];
    rand::rng().fill(&mut span);
    if span == [0; 8] {
        span[7] = 1;
    }
    let mut out = [0u8; TRACEPARENT_LEN];
    out[..3].copy_from_slice(b"00-");
    // Validated above: ASCII hex at fixed positions.
    out[3..35].copy_from_slice(&traceparent[3..35]);
    out[35] = b'-';
    for (i, b) in span.iter().enumerate() {
        out[36 + 2 * i] = HEX[usize::from(b >> 4)];
        out[37 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    out[52] = b'-';
    out[53..55].copy_from_slice(&traceparent[53..55]);
    Some(out)
}

/// A copy of `headers` for a message keyflow writes, with a valid `traceparent` replaced by its
/// continuation (see [`continued`]). The message's own headers stay as they are, for the
/// processors after this one.
pub fn continue_trace(headers: &OwnedHeaders) -> OwnedHeaders {
    let Some(next) = traceparent(headers).and_then(continued) else {
        return headers.clone();
    };
    let mut out = OwnedHeaders::new_with_capacity(headers.count());
    for h in headers.iter() {
        out = out.insert(Header {
            key: h.key,
            value: if h.key == TRACEPARENT {
                Some(&next[..])
            } else {
                h.value
            },
        });
    }
    out
}

/// [`continue_trace`] for headers the caller gives away: returned as they are (no copy) when
/// they carry no valid `traceparent`.
pub fn continue_trace_owned(headers: OwnedHeaders) -> OwnedHeaders {
    if traceparent(&headers).is_none() {
        return headers;
    }
    continue_trace(&headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_trace_id_with_new_span() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some("1"),
            })
            .insert(Header {
                key: TRACEPARENT,
                value: Some(tp),
            });
        let out = continue_trace(&h);
        assert_eq!(
            traceparent(&h),
            Some(tp.as_bytes()),
            "the input is left as it was"
        );
        let v = out
            .iter()
            .find(|h| h.key == TRACEPARENT)
            .unwrap()
            .value
            .unwrap();
        let v = std::str::from_utf8(v).unwrap();
        assert_eq!(
            trace_id(v.as_bytes()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_ne!(v, tp);
        assert!(v.ends_with("-01"));
        assert_eq!(
            out.iter().find(|h| h.key == "a").unwrap().value,
            Some(&b"1"[..])
        );
    }

    #[test]
    fn rejects_invalid() {
        assert_eq!(
            trace_id(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id(b"00-xyz-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id(b"garbage"), None);
    }
}
