//! W3C trace context: a `traceparent` header on an input message is continued on every message
//! keyflow writes for it (output and dead letter): same trace id and flags, a new parent (span)
//! id naming keyflow's step. Messages without one are written as they came.
//!
//! Only messages that carry headers pay anything: the header list is scanned once.

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

/// `headers` with a valid `traceparent` replaced by its continuation (same trace id and flags,
/// a fresh span id); returned unchanged when there is none.
pub fn continue_trace(headers: OwnedHeaders) -> OwnedHeaders {
    let Some(tp) = headers
        .iter()
        .find(|h| h.key == TRACEPARENT)
        .and_then(|h| h.value)
        .filter(|v| trace_id(v).is_some())
        .map(|v| String::from_utf8_lossy(v).into_owned())
    else {
        return headers;
    };
    let mut span = [0u8; 8];
    rand::rng().fill(&mut span);
    if span == [0; 8] {
        span[7] = 1;
    }
    let span: String = span.iter().map(|b| format!("{b:02x}")).collect();
    let continued = format!("00-{}-{}-{}", &tp[3..35], span, &tp[53..55]);
    let mut out = OwnedHeaders::new_with_capacity(headers.count());
    for h in headers.iter() {
        out = out.insert(Header {
            key: h.key,
            value: if h.key == TRACEPARENT {
                Some(continued.as_bytes())
            } else {
                h.value
            },
        });
    }
    out
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
        let out = continue_trace(h);
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
