//! The CLI as a user runs it, without a broker: what it prints and how.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{temp_dir, wait_until, Keyflow};

/// Logs written to a file (not a terminal) carry no ANSI colour codes: they end up in log
/// collectors, `kubectl logs` and CI artefacts, where escape codes are noise.
#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = temp_dir("keyflow-ansi-");
    let err_path = dir.path().join("stderr.log");
    let err = std::fs::File::create(&err_path).unwrap();
    let mut child = Command::new(Keyflow::bin())
        .args([
            "demo",
            "--duration",
            "2s",
            "--rate",
            "200",
            "--pipeline",
            concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/demo.toml"),
        ])
        // Colour must be off because stderr is a file, not because the environment asks.
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env_remove("KEYFLOW_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            status = child.try_wait().unwrap();
            status.is_some()
        },
        "keyflow demo exits",
    );
    let log = std::fs::read_to_string(&err_path).unwrap();
    // Something was logged (whether or not the short demo got to process anything), so the
    // absence of escapes means something.
    assert!(
        log.contains("pipeline stopped"),
        "no log line in ({:?}):\n{log}",
        status
    );
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a non-terminal log:\n{}",
        log.escape_debug()
    );
}
