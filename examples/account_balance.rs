//! Event sourcing with keyflow's per-key state: folds deposit/withdraw events into each
//! account's balance and emits a rejection when a withdrawal would overdraw.
//!
//! ```sh
//! KEYFLOW_BROKERS=localhost:9092 cargo run --release --example account_balance -- examples/account-balance.toml
//! ```
//!
//! Input (key = the account id):
//! `{"id": "e-1", "account": "acc-7", "type": "deposit", "amount": 100}`.
//! The state of each account is `{"balance": 100, "events": 1}`, kept in the changelog topic
//! of the pipeline's `[state]`. A withdrawal above the balance leaves the balance as it is and
//! writes `{"id": …, "account": …, "amount": …, "balance": …, "reason": "insufficient funds"}`
//! to `ACCOUNT_REJECTIONS_TOPIC` (default `account-balance.rejections`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use keyflow::state::{Outputs, StateChange, Stateful, StatefulProcessor};
use keyflow::{Message, ProcessError};
use serde::{Deserialize, Serialize};

/// An account's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub balance: i64,
    /// Events applied (deposits and accepted withdrawals).
    pub events: u64,
}

#[derive(Debug, Deserialize)]
struct Event<'a> {
    #[serde(default, borrow)]
    id: Option<&'a str>,
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    amount: i64,
}

/// The fold, as a stateful processor.
pub struct AccountBalance {
    rejections: Arc<str>,
}

impl AccountBalance {
    pub fn new(rejections: &str) -> Self {
        AccountBalance {
            rejections: Arc::from(rejections),
        }
    }
}

/// One step of the fold: the new state, or `Err((balance, reason))` when a withdrawal would
/// overdraw or a deposit overflow the balance.
pub fn apply(state: &Account, kind: &str, amount: i64) -> Result<Account, (i64, &'static str)> {
    let balance = match kind {
        "deposit" => state
            .balance
            .checked_add(amount)
            .ok_or((state.balance, "balance overflow"))?,
        _ if state.balance >= amount => state.balance - amount,
        _ => return Err((state.balance, "insufficient funds")),
    };
    Ok(Account {
        balance,
        events: state.events + 1,
    })
}

#[async_trait::async_trait]
impl StatefulProcessor for AccountBalance {
    type State = Account;

    async fn process(
        &self,
        state: Option<Account>,
        msg: &Message,
        out: &mut Outputs,
    ) -> Result<StateChange<Account>, ProcessError> {
        let payload = msg.payload.as_deref().unwrap_or_default();
        let e: Event<'_> = serde_json::from_slice(payload)
            .map_err(|e| ProcessError::permanent("decode", format!("not an account event: {e}")))?;
        if !matches!(e.kind, "deposit" | "withdraw") || e.amount < 0 {
            return Err(ProcessError::permanent(
                "decode",
                format!(
                    "expected a deposit or withdraw of a non-negative amount, found {:?} {}",
                    e.kind, e.amount
                ),
            ));
        }
        let state = state.unwrap_or_default();
        match apply(&state, e.kind, e.amount) {
            Ok(next) => Ok(StateChange::Set(next)),
            Err((balance, reason)) => {
                let rejection = serde_json::json!({
                    "id": e.id,
                    "account": msg.key.as_deref().map(String::from_utf8_lossy),
                    "amount": e.amount,
                    "balance": balance,
                    "reason": reason,
                });
                out.send(
                    self.rejections.clone(),
                    msg.key.clone(),
                    rejection.to_string(),
                );
                Ok(StateChange::Keep)
            }
        }
    }
}

/// Registers the processor and runs the pipelines until SIGTERM/SIGINT.
pub async fn run(paths: Vec<PathBuf>) -> ExitCode {
    let env = keyflow::config::Env::from_process();
    let config = match keyflow::config::load_global(None, &env)
        .and_then(|g| keyflow::config::load(g, &paths, &env))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rejections = std::env::var("ACCOUNT_REJECTIONS_TOPIC")
        .unwrap_or_else(|_| "account-balance.rejections".into());
    let prometheus = keyflow::metrics::install();
    let http_address = config.global.http_address.clone();
    let runtime = keyflow::Runtime::new(config).with_processor(
        "account-balance",
        Stateful::new(AccountBalance::new(&rejections)),
    );
    let http = match http_address {
        Some(address) => {
            let state = keyflow::http::HttpState {
                prometheus,
                pipelines: runtime.stats(),
            };
            match keyflow::http::serve(&address, state).await {
                Ok((_, task)) => Some(task),
                Err(e) => {
                    tracing::error!(%address, error = %e, "cannot serve the http endpoint");
                    return ExitCode::from(1);
                }
            }
        }
        None => None,
    };
    let signal = keyflow::shutdown::signal();
    tokio::pin!(signal);
    let mut running = match runtime.start_unless(&mut signal).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "could not start");
            return ExitCode::from(1);
        }
    };
    let failure = tokio::select! {
        _ = &mut signal => None,
        f = running.failed() => Some(f),
    };
    let clean = running.shutdown().await.iter().all(|r| r.clean());
    if let Some(t) = http {
        t.abort();
    }
    match failure {
        Some(f) => {
            tracing::error!(reason = %f, "exiting after a partition failure");
            ExitCode::from(1)
        }
        None if clean => ExitCode::SUCCESS,
        None => ExitCode::from(1),
    }
}

#[allow(dead_code)] // also compiled into tests/state.rs, which has its own main
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let paths: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if paths.is_empty() {
        eprintln!("usage: account_balance <pipeline.toml>...");
        return ExitCode::from(2);
    }
    tokio::runtime::Runtime::new()
        .expect("a tokio runtime")
        .block_on(run(paths))
}
