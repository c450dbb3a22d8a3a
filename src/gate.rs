//! The pipeline gate: a pipeline-wide "stop taking new messages" switch. It is held while a
//! circuit breaker is open (the downstream is known to be down) or while the dead-letter topic
//! cannot be written; every partition supervisor of the pipeline watches it and pauses its
//! partition on the consumer while it is held. Holds are counted, so independent reasons
//! (two breakers, a failing DLQ) overlap correctly.
//!
//! A hold is a [`HoldGuard`]: it is released when the guard is dropped, so a hold taken by a
//! future that is cancelled mid-await (a worker killed by its stopping supervisor, a drain
//! deadline) is released with it and never pauses the pipeline for good.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug)]
pub struct Gate {
    holds: watch::Sender<u32>,
    /// `keyflow_circuit_breaker_state` of the pipeline (0 closed, 1 half-open, 2 open), set by
    /// its breakers; with several breakers the latest transition shows.
    breaker_state: metrics::Gauge,
}

/// One hold on a [`Gate`]; dropping it releases the hold.
#[must_use = "the hold is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct HoldGuard {
    gate: Arc<Gate>,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.gate.holds.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::with_breaker_gauge(metrics::Gauge::noop())
    }
}

impl Gate {
    pub fn with_breaker_gauge(breaker_state: metrics::Gauge) -> Self {
        Gate {
            holds: watch::Sender::new(0),
            breaker_state,
        }
    }

    /// A breaker of this pipeline changed state: 0 closed, 1 half-open, 2 open.
    pub fn breaker_state(&self, state: f64) {
        self.breaker_state.set(state);
    }

    /// Adds a hold: the pipeline's partitions pause until every guard is dropped.
    pub fn hold(self: &Arc<Self>) -> HoldGuard {
        self.holds.send_modify(|n| *n += 1);
        HoldGuard { gate: self.clone() }
    }

    pub fn is_held(&self) -> bool {
        *self.holds.borrow() > 0
    }

    /// A receiver that sees every change of the hold count.
    pub fn subscribe(&self) -> watch::Receiver<u32> {
        self.holds.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_counted_and_released_on_drop() {
        let g = Arc::new(Gate::default());
        assert!(!g.is_held());
        let a = g.hold();
        let b = g.hold();
        drop(a);
        assert!(g.is_held(), "one hold left");
        drop(b);
        assert!(!g.is_held());
    }

    #[tokio::test]
    async fn a_hold_inside_a_cancelled_future_is_released() {
        let g = Arc::new(Gate::default());
        let g2 = g.clone();
        let task = tokio::spawn(async move {
            let _hold = g2.hold();
            std::future::pending::<()>().await;
        });
        let mut rx = g.subscribe();
        rx.wait_for(|n| *n == 1).await.unwrap();
        task.abort();
        let _ = task.await;
        assert!(!g.is_held(), "the aborted task's hold was released");
    }
}
