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

/// `keyflow validate` lists, with file and field, topic names Kafka would refuse, producer
/// settings that would void the no-loss and per-key-order promises, and settings that do not
/// apply under the KIP-848 consumer protocol; exit code 2.
#[test]
fn validate_explains_topic_names_producer_safety_and_consumer_protocol() {
    let dir = temp_dir("keyflow-validate-");
    let p = dir.path().join("orders.toml");
    std::fs::write(
        &p,
        r#"
topic = "orders"
auto_offset_reset = "earliest"
group_protocol = "consumer"
session_timeout = "20s"
dead_letter_topic = "orders dlq"
[[processors]]
type = "forward"
topic = "out!"
[kafka]
acks = 1
"partition.assignment.strategy" = "range"
"#,
    )
    .unwrap();
    let out = Command::new(Keyflow::bin())
        .arg("validate")
        .arg(&p)
        .env_remove("KEYFLOW_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let file = p.display().to_string();
    for want in [
        "5 configuration error(s)".to_string(),
        format!("{file}: field `session_timeout`: does not apply under group_protocol = \"consumer\""),
        format!("{file}: field `processors[0].topic`: \"out!\" is not a valid topic name: '!' at byte 3; a Kafka topic name is 1 to 249 characters from [A-Za-z0-9._-]"),
        format!("{file}: field `dead_letter_topic`: \"orders dlq\" is not a valid topic name"),
        format!("{file}: field `kafka.\"acks\"`: \"1\" is unsafe"),
        format!("{file}: field `kafka.\"partition.assignment.strategy\"`: does not apply under group_protocol = \"consumer\": the broker assigns partitions"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
}
