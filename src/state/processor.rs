//! The stateful processor API: [`StatefulProcessor`] (what a user implements) and
//! [`Stateful`], the adapter that makes it a [`Processor`] of the chain.
//!
//! ```ignore
//! struct Balance;
//! #[async_trait::async_trait]
//! impl StatefulProcessor for Balance {
//!     type State = i64;
//!     async fn process(&self, state: Option<i64>, msg: &Message, out: &mut Outputs)
//!         -> Result<StateChange<i64>, ProcessError> { … }
//! }
//! Runtime::new(config).with_processor("balance", Stateful::new(Balance));
//! ```

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use super::Store;
use crate::message::{Message, Record};
use crate::processors::{Flow, ProcessError, Processor};

/// What a [`StatefulProcessor`] does with its key's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange<S> {
    /// Leave it as it is (nothing written to the changelog).
    Keep,
    /// Replace it.
    Set(S),
    /// Remove it (a tombstone in the changelog).
    Delete,
}

/// The records a [`StatefulProcessor`] emits for a message. Written with the state change:
/// in the same transaction under `exactly_once`, before the changelog record otherwise.
#[derive(Debug, Default)]
pub struct Outputs {
    records: Vec<Record>,
}

impl Outputs {
    /// Emits `payload` with `key` to `topic` (partitioned by the key). Keep the topic in an
    /// `Arc<str>` to send without allocating its name.
    pub fn send(
        &mut self,
        topic: impl Into<Arc<str>>,
        key: Option<Bytes>,
        payload: impl Into<Bytes>,
    ) {
        self.records.push(Record {
            topic: topic.into(),
            partition: None,
            key,
            payload: Some(payload.into()),
            headers: None,
            timestamp_ms: None,
        });
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// A processor that owns a typed state per message key.
///
/// keyflow calls it with the current state of the message's key (`None`: no state yet) and
/// applies the returned change once the message's writes succeeded. One message per key runs
/// at a time, in offset order within the partition, so the state it receives is the one the
/// previous message of the key left. A failed attempt leaves no change behind; the retry
/// receives the same state again. Under `at_least_once` a message can still run twice after a
/// crash (its change replayed from the changelog, then applied again): use `exactly_once` for
/// an exact fold.
#[async_trait]
pub trait StatefulProcessor: Send + Sync + 'static {
    type State: Serialize + DeserializeOwned + Send + Sync;

    async fn process(
        &self,
        state: Option<Self::State>,
        msg: &Message,
        out: &mut Outputs,
    ) -> Result<StateChange<Self::State>, ProcessError>;
}

/// Adapts a [`StatefulProcessor`] to the chain. Register it with
/// [`crate::runtime::Runtime::with_processor`] in a pipeline that has a `[state]` table; one
/// instance per pipeline (it binds to that pipeline's store).
pub struct Stateful<P> {
    inner: P,
    store: OnceLock<Arc<Store>>,
}

impl<P: StatefulProcessor> Stateful<P> {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(inner: P) -> Arc<dyn Processor> {
        Arc::new(Self::wrap(inner))
    }

    /// The adapter itself (tests: to bind it to a store by hand).
    pub fn wrap(inner: P) -> Self {
        Stateful {
            inner,
            store: OnceLock::new(),
        }
    }

    fn store(&self) -> Result<&Arc<Store>, ProcessError> {
        self.store.get().ok_or_else(|| {
            ProcessError::permanent("state", "stateful processor not bound to a state store")
        })
    }
}

#[async_trait]
impl<P: StatefulProcessor> Processor for Stateful<P> {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        let store = self.store()?;
        let Some(key) = msg.key.clone() else {
            return Err(ProcessError::permanent(
                "state",
                "the message has no key: per-key state needs one",
            ));
        };
        let state = match store.get(msg, &key)? {
            Some(b) => Some(serde_json::from_slice::<P::State>(&b).map_err(|e| {
                ProcessError::permanent(
                    "state",
                    format!("the key's stored state does not decode: {e}"),
                )
            })?),
            None => None,
        };
        let mut out = Outputs::default();
        let change = self.inner.process(state, msg, &mut out).await?;
        if store.transactional {
            msg.outbox.append(&mut out.records);
        } else {
            for r in &out.records {
                store.write(r).await?;
            }
        }
        match change {
            StateChange::Keep => {}
            StateChange::Set(s) => {
                let v = serde_json::to_vec(&s).map_err(|e| {
                    ProcessError::permanent("state", format!("the new state does not encode: {e}"))
                })?;
                store.stage(msg, key, Some(Bytes::from(v))).await?;
            }
            StateChange::Delete => store.stage(msg, key, None).await?,
        }
        Ok(Flow::Continue)
    }

    fn written(&self, msg: &Message) {
        if let (Some(store), Some(key)) = (self.store.get(), msg.key.as_ref()) {
            store.applied(msg, key);
        }
    }

    fn bind_state(&self, store: Option<&Arc<Store>>) -> Result<(), String> {
        let Some(store) = store else {
            return Err("a stateful processor needs a [state] table in its pipeline".into());
        };
        match self.store.get() {
            Some(s) if !Arc::ptr_eq(s, store) => {
                Err("this stateful processor is already bound to another pipeline's state; register one instance per pipeline".into())
            }
            _ => {
                let _ = self.store.set(store.clone());
                Ok(())
            }
        }
    }
}
