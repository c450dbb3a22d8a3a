//! `simulate`: a stand-in for real work, with a latency distribution and a failure rate.
//!
//! ```toml
//! [[processors]]
//! type = "simulate"
//! latency = { distribution = "uniform", min = "0ms", max = "2ms" }
//! failure_rate = 0.01     # fraction of attempts that fail (retryable)
//! ```

use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde::Deserialize;

use super::{Flow, ProcessError, Processor};
use crate::config::HumanDuration;
use crate::message::Message;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulateConfig {
    #[serde(default)]
    pub latency: Latency,
    /// Fraction of attempts that fail with a retryable error, 0.0–1.0.
    #[serde(default)]
    pub failure_rate: f64,
}

/// How long one attempt takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "distribution", rename_all = "snake_case", deny_unknown_fields)]
pub enum Latency {
    Fixed {
        value: HumanDuration,
    },
    Uniform {
        min: HumanDuration,
        max: HumanDuration,
    },
    /// Exponential with the given mean, capped at `max` (long tails without unbounded stalls).
    Exponential {
        mean: HumanDuration,
        max: HumanDuration,
    },
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed {
            value: HumanDuration::default(),
        }
    }
}

impl SimulateConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if !(0.0..=1.0).contains(&self.failure_rate) {
            v.push((
                "failure_rate".into(),
                format!(
                    "expected a fraction between 0.0 and 1.0, found {}",
                    self.failure_rate
                ),
            ));
        }
        match &self.latency {
            Latency::Uniform { min, max } if min > max => v.push((
                "latency.min".into(),
                format!("\"{min}\" must not exceed latency.max (\"{max}\")"),
            )),
            Latency::Exponential { mean, max } if mean > max => v.push((
                "latency.mean".into(),
                format!("\"{mean}\" must not exceed latency.max (\"{max}\")"),
            )),
            _ => {}
        }
        v
    }
}

pub struct Simulate {
    latency: Latency,
    failure_rate: f64,
}

impl Simulate {
    pub fn new(c: &SimulateConfig) -> Self {
        Simulate {
            latency: c.latency.clone(),
            failure_rate: c.failure_rate,
        }
    }

    fn sample(&self) -> (Duration, bool) {
        let mut rng = rand::rng();
        let d = match &self.latency {
            Latency::Fixed { value } => value.get(),
            Latency::Uniform { min, max } => {
                if min == max {
                    min.get()
                } else {
                    Duration::from_nanos(
                        rng.random_range(min.get().as_nanos() as u64..=max.get().as_nanos() as u64),
                    )
                }
            }
            Latency::Exponential { mean, max } => {
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                Duration::from_secs_f64(-u.ln() * mean.get().as_secs_f64()).min(max.get())
            }
        };
        let fail = self.failure_rate > 0.0 && rng.random_bool(self.failure_rate);
        (d, fail)
    }
}

#[async_trait]
impl Processor for Simulate {
    async fn process(&self, _msg: &mut Message) -> Result<Flow, ProcessError> {
        let (d, fail) = self.sample();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        if fail {
            Err(ProcessError::retryable("simulate", "simulated failure"))
        } else {
            Ok(Flow::Continue)
        }
    }
}
