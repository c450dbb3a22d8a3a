//! The pipeline gate: a pipeline-wide "stop taking new messages" switch. It is held while a
//! circuit breaker is open (the downstream is known to be down) or while the dead-letter topic
//! cannot be written; every partition supervisor of the pipeline watches it and pauses its
//! partition on the consumer while it is held. Holds are counted, so independent reasons
//! (two breakers, a failing DLQ) overlap correctly.

use tokio::sync::watch;

#[derive(Debug)]
pub struct Gate {
    holds: watch::Sender<u32>,
    /// `keyflow_circuit_breaker_state` of the pipeline (0 closed, 1 half-open, 2 open), set by
    /// its breakers; with several breakers the latest transition shows.
    breaker_state: metrics::Gauge,
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

    /// Adds a hold: the pipeline's partitions pause until every hold is released.
    pub fn hold(&self) {
        self.holds.send_modify(|n| *n += 1);
    }

    pub fn release(&self) {
        self.holds.send_modify(|n| *n = n.saturating_sub(1));
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
    fn holds_are_counted() {
        let g = Gate::default();
        assert!(!g.is_held());
        g.hold();
        g.hold();
        g.release();
        assert!(g.is_held(), "one hold left");
        g.release();
        assert!(!g.is_held());
        g.release();
        assert!(!g.is_held(), "an extra release never underflows");
    }
}
