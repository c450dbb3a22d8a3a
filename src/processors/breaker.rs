//! A circuit breaker around a downstream (`http`, `forward`).
//!
//! Closed: calls go through; `failures` retryable failures in a row open it. Open: no call is
//! made for `cool_down`; the pipeline's partitions are paused (the [`Gate`] is held) and a
//! message that reaches the breaker is put back to wait without using an attempt. When the
//! cool-down ends the gate is released and the breaker is half-open: exactly one call, the
//! probe, goes through. Its success closes the breaker; its failure opens it again (and, the
//! downstream being known down, does not use the probing message's attempt either). So an
//! outage of any length costs each message at most the attempts it used before the breaker
//! opened, and nothing is dead-lettered because of it.
//!
//! Cancellation: a probe whose future is dropped mid-await (its worker killed, a drain deadline)
//! gives its probe slot back on drop, so the next call probes. It records no failure: nothing
//! was learnt about the downstream, and re-opening would pause the pipeline for another
//! cool-down without cause. The gate hold of an open breaker is a [`HoldGuard`] kept in the
//! breaker's state, released with the state change that ends it.
//!
//! ```toml
//! circuit_breaker = { failures = 5, cool_down = "30s" }
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Deserialize;
use tracing::{info, warn};

use super::ProcessError;
use crate::config::HumanDuration;
use crate::gate::{Gate, HoldGuard};

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Retryable failures in a row that open the breaker.
    pub failures: u32,
    /// How long it stays open before the half-open probe.
    pub cool_down: HumanDuration,
}

impl BreakerConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if self.failures == 0 {
            v.push((
                "circuit_breaker.failures".into(),
                "expected at least 1, found 0".into(),
            ));
        }
        if self.cool_down.get().is_zero() {
            v.push((
                "circuit_breaker.cool_down".into(),
                "expected a duration above 0, found \"0s\"".into(),
            ));
        }
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

struct Inner {
    cfg: BreakerConfig,
    name: String,
    state: Mutex<Shared>,
    gate: Arc<Gate>,
}

struct Shared {
    state: State,
    /// `Some` exactly while `state` is `Open`: the pipeline's partitions are paused.
    hold: Option<HoldGuard>,
}

/// Gives the half-open probe slot back if the probe's future is dropped before it finished.
struct ProbeSlot<'a> {
    breaker: &'a Breaker,
    armed: bool,
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.abandon_probe();
        }
    }
}

/// Cheap to clone; one per processor instance.
#[derive(Clone)]
pub struct Breaker(Arc<Inner>);

impl Breaker {
    pub fn new(cfg: BreakerConfig, name: String, gate: Arc<Gate>) -> Self {
        Breaker(Arc::new(Inner {
            cfg,
            name,
            state: Mutex::new(Shared {
                state: State::Closed { failures: 0 },
                hold: None,
            }),
            gate,
        }))
    }

    /// Runs `call` unless the breaker is open; records its result.
    pub async fn call<T>(
        &self,
        kind: &'static str,
        call: impl Future<Output = Result<T, ProcessError>>,
    ) -> Result<T, ProcessError> {
        let probe = self
            .admit()
            .map_err(|wait| ProcessError::not_attempted(kind, wait))?;
        let mut slot = ProbeSlot {
            breaker: self,
            armed: probe,
        };
        let r = call.await;
        slot.armed = false;
        let failed = matches!(&r, Err(e) if e.is_retryable());
        self.record(failed, probe);
        match r {
            Err(e) if failed && probe => {
                warn!(breaker = %self.0.name, error = %e, "half-open probe failed; open again");
                Err(ProcessError::not_attempted(
                    kind,
                    self.0.cfg.cool_down.get(),
                ))
            }
            r => r,
        }
    }

    /// `Ok(is_probe)` if the call may go ahead, else how long to wait.
    fn admit(&self) -> Result<bool, Duration> {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Open { until } = st.state {
            let now = Instant::now();
            if now < until {
                return Err(jitter(until - now));
            }
            self.half_open(&mut st);
        }
        match st.state {
            State::Closed { .. } => Ok(false),
            State::HalfOpen { probing: false } => {
                st.state = State::HalfOpen { probing: true };
                Ok(true)
            }
            _ => Err(jitter(
                self.0.cfg.cool_down.get().min(Duration::from_millis(500)),
            )),
        }
    }

    /// The probe's future was dropped before it finished: the next call probes.
    fn abandon_probe(&self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.state == (State::HalfOpen { probing: true }) {
            st.state = State::HalfOpen { probing: false };
            info!(breaker = %self.0.name, "half-open probe cancelled; the next call probes");
        }
    }

    fn record(&self, failed: bool, probe: bool) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        match (st.state, failed) {
            (State::HalfOpen { .. }, false) if probe => {
                info!(breaker = %self.0.name, "probe succeeded; circuit closed");
                st.state = State::Closed { failures: 0 };
                self.0.gate.breaker_state(0.0);
            }
            (State::HalfOpen { .. }, true) if probe => self.open(&mut st),
            (State::Closed { .. }, false) => st.state = State::Closed { failures: 0 },
            (State::Closed { failures }, true) => {
                if failures + 1 >= self.0.cfg.failures {
                    self.open(&mut st);
                } else {
                    st.state = State::Closed {
                        failures: failures + 1,
                    };
                }
            }
            // A call admitted before the breaker opened, finishing late: nothing to learn.
            _ => {}
        }
    }

    fn open(&self, st: &mut Shared) {
        let cool = self.0.cfg.cool_down.get();
        warn!(breaker = %self.0.name, cool_down = ?cool, "circuit open; pausing the pipeline's partitions");
        st.state = State::Open {
            until: Instant::now() + cool,
        };
        self.0.gate.breaker_state(2.0);
        if st.hold.is_none() {
            st.hold = Some(self.0.gate.hold());
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(cool).await;
            let mut st = me.0.state.lock().unwrap_or_else(|p| p.into_inner());
            me.half_open(&mut st);
        });
    }

    /// Open → half-open (once, whoever comes first: the timer or a late caller).
    fn half_open(&self, st: &mut Shared) {
        if let State::Open { until } = st.state {
            if Instant::now() >= until {
                st.state = State::HalfOpen { probing: false };
                self.0.gate.breaker_state(1.0);
                st.hold = None;
                info!(breaker = %self.0.name, "cool-down over; half-open, resuming for one probe");
            }
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(
            self.0.state.lock().unwrap_or_else(|p| p.into_inner()).state,
            State::Open { .. }
        )
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(1.0..=1.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ms: u64) -> BreakerConfig {
        BreakerConfig {
            failures: 2,
            cool_down: format!("{ms}ms").parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn opens_holds_the_gate_and_closes_through_a_probe() {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        // The pipeline's keyflow_circuit_breaker_state gauge, read back directly.
        let cell = Arc::new(AtomicU64::new(0));
        let state = || f64::from_bits(cell.load(Relaxed));
        let gate = Arc::new(Gate::with_breaker_gauge(metrics::Gauge::from_arc(
            cell.clone(),
        )));
        let b = Breaker::new(cfg(50), "t".into(), gate.clone());
        let fail = || async { Err::<(), _>(ProcessError::retryable("http", "503")) };
        assert!(b.call("http", fail()).await.is_err());
        assert!(!gate.is_held(), "one failure of two");
        assert!(b.call("http", fail()).await.is_err());
        assert!(b.is_open() && gate.is_held(), "two in a row: open");
        assert_eq!(state(), 2.0, "gauge: open");
        let e = b.call("http", async { Ok(()) }).await.unwrap_err();
        assert!(e.not_attempted_wait().is_some(), "open: not attempted");
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!gate.is_held(), "cool-down over: half-open");
        assert_eq!(state(), 1.0, "gauge: half-open");
        // The probe fails: open again, and the probing message loses no attempt.
        let e = b.call("http", fail()).await.unwrap_err();
        assert!(e.not_attempted_wait().is_some());
        assert!(gate.is_held());
        tokio::time::sleep(Duration::from_millis(80)).await;
        b.call("http", async { Ok(()) }).await.unwrap();
        assert!(!b.is_open() && !gate.is_held(), "probe succeeded: closed");
        assert_eq!(state(), 0.0, "gauge: closed");
    }

    // Real time (50 ms cool-down): tokio's paused clock needs its `test-util` feature, which
    // this crate does not enable.
    #[tokio::test]
    async fn a_cancelled_probe_does_not_leave_the_breaker_half_open() {
        let gate = Arc::new(Gate::default());
        let b = Breaker::new(cfg(50), "t".into(), gate.clone());
        let fail = || async { Err::<(), _>(ProcessError::retryable("http", "503")) };
        let _ = b.call("http", fail()).await;
        let _ = b.call("http", fail()).await;
        assert!(b.is_open());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!gate.is_held(), "cool-down over: half-open");
        // The probe hangs and is dropped mid-await (a drain deadline, a killed worker).
        let probe = b.call("http", std::future::pending::<Result<(), ProcessError>>());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), probe)
                .await
                .is_err(),
            "the probe hangs"
        );
        // The downstream answers again: a later call must reach it (and close the breaker).
        let attempted = std::sync::atomic::AtomicBool::new(false);
        let r = b
            .call("http", async {
                attempted.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            })
            .await;
        assert!(
            attempted.load(std::sync::atomic::Ordering::Relaxed),
            "the call after a cancelled probe was not attempted: {r:?}"
        );
        assert!(r.is_ok() && !b.is_open() && !gate.is_held());
    }

    #[test]
    fn a_permanent_error_does_not_count() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let gate = Arc::new(Gate::default());
        let b = Breaker::new(cfg(50), "t".into(), gate.clone());
        rt.block_on(async {
            for _ in 0..5 {
                let _ = b
                    .call("http", async {
                        Err::<(), _>(ProcessError::permanent("http", "404"))
                    })
                    .await;
            }
        });
        assert!(!b.is_open());
    }
}
