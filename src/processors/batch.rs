//! [`BatchProcessor`]: a processor that takes many messages at once (a database transaction, a
//! bulk HTTP call). A pipeline with a `[batch]` table runs its **last** processor this way; the
//! processors before it still run per message (see [`crate::batch`] for how batches are formed,
//! retried and split).

use async_trait::async_trait;

use super::{Flow, ProcessError};
use crate::message::Message;

/// A processor that handles a batch of messages as one unit.
///
/// A batch never holds two messages of one key (see [`crate::batch`]), and the messages are in
/// no particular order across keys. `process_batch` succeeds or fails **as a whole**:
///
/// - `Ok(flows)`: every message is done; `flows` holds one [`Flow`] per message, in the order of
///   `msgs` (`Flow::Duplicate` for one already applied, as `sql`'s claim finds; `Flow::Continue`
///   for one processed). A list of another length is a bug of the processor: the batch fails
///   with a permanent error.
/// - `Err(e)`: none of them is done (make the batch atomic, or idempotent per message: a
///   failed batch is run again, and split). A retryable error is retried with the pipeline's
///   retry policy; a permanent one, or the last retryable one, splits the batch in halves until
///   the failing message is alone, and that message alone goes to the dead-letter topic with
///   `e` as its reason. [`ProcessError::not_attempted`] (an open circuit breaker) waits and runs
///   the same attempt again.
///
/// Called concurrently for different batches of one partition, and again for the same messages
/// after a failure or a worker restart (at-least-once).
#[async_trait]
pub trait BatchProcessor: Send + Sync + 'static {
    async fn process_batch(&self, msgs: &[&Message]) -> Result<Vec<Flow>, ProcessError>;
}
