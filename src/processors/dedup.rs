//! `dedup`: drop a message whose business id was already **completed** (the whole chain ran to
//! the end) within `ttl`. The id comes from a JSON field (dotted path) or a header. The id is
//! recorded only on completion, so a failed attempt is retried rather than mistaken for a
//! duplicate. Memory is bounded: at most `max_ids` ids are kept, the oldest evicted first.
//!
//! The window lives with the pipeline's processor chain, which is built once per process and
//! shared by every partition: a rebalance that moves a partition away and back within the
//! process keeps it. (Across processes, make the side effect itself idempotent.)
//!
//! ```toml
//! [[processors]]
//! type = "dedup"
//! field = "order_id"          # or: header = "idempotency-key"
//! ttl = "1h"
//! max_ids = 1000000
//! ```
//!
//! Messages without the id pass through (they cannot be deduplicated).
//!
//! In a pipeline with `[state]` the window is kept in the pipeline's per-key state instead
//! (see [`crate::state`]): each completed id is a changelog entry of the message's partition
//! (key `\0dedup\0<id>`, value its completion time), restored with the partition, so a
//! redelivery after a crash (kill -9) or a rebalance to another member is still recognised.
//! Under `exactly_once` the entry is written in the message's transaction. `max_ids` does not
//! apply there: the state holds every id completed within `ttl`; older ones leave it as new
//! ids complete (from memory, and from the changelog by a tombstone outside `exactly_once`)
//! and are not restored.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use async_trait::async_trait;
use rdkafka::message::Headers;
use serde::Deserialize;

use super::{json, Flow, ProcessError, Processor};
use crate::config::HumanDuration;
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub header: Option<String>,
    pub ttl: HumanDuration,
    #[serde(default = "default_max_ids")]
    pub max_ids: usize,
}

fn default_max_ids() -> usize {
    1_000_000
}

impl DedupConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if self.field.is_some() == self.header.is_some() {
            v.push((
                "field".into(),
                "expected exactly one of field or header".into(),
            ));
        }
        if self.max_ids == 0 {
            v.push(("max_ids".into(), "expected at least 1, found 0".into()));
        }
        if self.ttl.get().is_zero() {
            v.push(("ttl".into(), "expected a duration above 0".into()));
        }
        v
    }
}

/// Completed ids with their completion time; `order` is the eviction queue (it may hold stale
/// entries for ids completed again later, skipped when popped).
#[derive(Default)]
struct Window {
    ids: HashMap<Box<[u8]>, Instant>,
    order: VecDeque<(Box<[u8]>, Instant)>,
}

pub struct Dedup {
    cfg: DedupConfig,
    window: Mutex<Window>,
    /// `[state]`: the window lives in the pipeline's state store instead.
    store: std::sync::OnceLock<std::sync::Arc<crate::state::Store>>,
}

/// The state key prefix of a dedup id (a message key never starts with a NUL byte in practice).
const STATE_PREFIX: &[u8] = crate::state::DEDUP_PREFIX;

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn state_key(id: &[u8]) -> bytes::Bytes {
    let mut k = Vec::with_capacity(STATE_PREFIX.len() + id.len());
    k.extend_from_slice(STATE_PREFIX);
    k.extend_from_slice(id);
    bytes::Bytes::from(k)
}

impl Dedup {
    pub fn new(cfg: &DedupConfig) -> Self {
        Dedup {
            cfg: cfg.clone(),
            window: Mutex::new(Window::default()),
            store: std::sync::OnceLock::new(),
        }
    }

    fn id(&self, msg: &Message) -> Option<Box<[u8]>> {
        if let Some(h) = &self.cfg.header {
            let hs = msg.headers.as_ref()?;
            return hs
                .iter()
                .find(|x| x.key == h)
                .and_then(|x| x.value)
                .map(Box::from);
        }
        let v = serde_json::from_slice::<serde_json::Value>(msg.payload.as_deref()?).ok()?;
        let id = json::scalar_text(json::get(&v, self.cfg.field.as_deref()?)?)?;
        Some(id.into_bytes().into_boxed_slice())
    }

    /// Ids remembered now (tests).
    pub fn len(&self) -> usize {
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ids
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Window {
    fn expire(&mut self, now: Instant, ttl: std::time::Duration, max: usize) {
        while let Some((id, at)) = self.order.front() {
            let stale = self.ids.get(id) != Some(at);
            if stale || now.duration_since(*at) > ttl || self.ids.len() > max {
                let (id, at) = self.order.pop_front().expect("front exists");
                if !stale && self.ids.get(&id) == Some(&at) {
                    self.ids.remove(&id);
                }
            } else {
                break;
            }
        }
    }
}

#[async_trait]
impl Processor for Dedup {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let Some(id) = self.id(msg) else {
            return Ok(Flow::Continue);
        };
        if let Some(store) = self.store.get() {
            let key = state_key(&id);
            let now = wall_ms();
            let seen = store.get(msg, &key)?.is_some_and(|v| {
                <[u8; 8]>::try_from(&v[..]).is_ok_and(|b| {
                    now.saturating_sub(i64::from_be_bytes(b)) as u128
                        <= self.cfg.ttl.get().as_millis()
                })
            });
            if seen {
                return Ok(Flow::Duplicate);
            }
            // Exactly-once: the id joins the transaction of the message's writes.
            store.stage_in_transaction(
                msg,
                key,
                Some(bytes::Bytes::copy_from_slice(&now.to_be_bytes())),
            );
            return Ok(Flow::Continue);
        }
        let now = Instant::now();
        let ttl = self.cfg.ttl.get();
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let seen = w
            .ids
            .get(&id)
            .is_some_and(|at| now.duration_since(*at) <= ttl);
        Ok(if seen {
            Flow::Duplicate
        } else {
            Flow::Continue
        })
    }

    fn completed(&self, msg: &Message) {
        let Some(id) = self.id(msg) else {
            return;
        };
        if let Some(store) = self.store.get() {
            let now = bytes::Bytes::copy_from_slice(&wall_ms().to_be_bytes());
            store.put_now(msg, state_key(&id), Some(now));
            return;
        }
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.ids.insert(id.clone(), now);
        w.order.push_back((id, now));
        w.expire(now, self.cfg.ttl.get(), self.cfg.max_ids);
    }

    fn bind_state(
        &self,
        store: Option<&std::sync::Arc<crate::state::Store>>,
    ) -> Result<(), String> {
        if let Some(s) = store {
            s.set_expiry(self.cfg.ttl.get());
            let _ = self.store.set(s.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dedup(max: usize, ttl: &str) -> Dedup {
        Dedup::new(&DedupConfig {
            field: Some("id".into()),
            header: None,
            ttl: ttl.parse().unwrap(),
            max_ids: max,
        })
    }

    #[tokio::test]
    async fn drops_completed_ids_only() {
        let d = dedup(10, "1h");
        let mut m = Message::new("t", 0, 0, None, br#"{"id": 7}"#);
        assert_eq!(d.process(&mut m).await.unwrap(), Flow::Continue);
        assert_eq!(
            d.process(&mut m).await.unwrap(),
            Flow::Continue,
            "not completed yet: a retry is not a duplicate"
        );
        d.completed(&m);
        assert_eq!(d.process(&mut m).await.unwrap(), Flow::Duplicate);
    }

    #[tokio::test]
    async fn bounded_and_expiring() {
        let d = dedup(3, "1h");
        for i in 0..10 {
            d.completed(&Message::new(
                "t",
                0,
                i,
                None,
                format!("{{\"id\": {i}}}").as_bytes(),
            ));
        }
        assert_eq!(d.len(), 3);
        let mut old = Message::new("t", 0, 0, None, br#"{"id": 0}"#);
        assert_eq!(
            d.process(&mut old).await.unwrap(),
            Flow::Continue,
            "evicted"
        );
        let d = dedup(10, "10ms");
        d.completed(&old);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            d.process(&mut old).await.unwrap(),
            Flow::Continue,
            "expired"
        );
    }
}
