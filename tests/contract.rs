//! `keyflow test`: the shipped pipelines' tests pass (the JSON Schemas in `pipelines/schemas/`
//! are the contract they exercise), and a wrong expectation fails readably. No broker; the
//! `sql` cases run against a real PostgreSQL (tests/support/postgres.rs).

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::postgres::Postgres;
use support::{temp_dir, Keyflow};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `keyflow test <args>` from the repository root, with none of the shipped pipelines'
/// variables set: the test files must fix what they depend on.
fn keyflow_test(args: &[&str]) -> (Output, String, String) {
    keyflow_test_with(args, &[])
}

/// [`keyflow_test`] with these variables set (e.g. the database of the `sql` cases).
fn keyflow_test_with(args: &[&str], vars: &[(&str, &str)]) -> (Output, String, String) {
    let out = Command::new(Keyflow::bin())
        .arg("test")
        .args(args)
        .current_dir(repo())
        .env_remove("WELCOME_MAIL_URL")
        .env_remove("WELCOME_MAIL_TOKEN")
        .env_remove("ORDERS_DB_URL")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// `[[case]]` headers in a test file.
fn cases_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.trim() == "[[case]]")
        .count()
}

#[test]
fn the_shipped_pipelines_pass_their_tests() {
    let dir = repo().join("pipelines");
    let mut expected = 0;
    let mut pipelines = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".test.toml") {
            expected += cases_in(&p);
            assert!(
                dir.join(format!("{stem}.toml")).exists(),
                "{name}: no pipeline"
            );
        } else if let Some(stem) = name.strip_suffix(".toml") {
            pipelines += 1;
            let t = dir.join(format!("{stem}.test.toml"));
            assert!(
                t.exists(),
                "every example pipeline has tests: {} missing",
                t.display()
            );
        }
    }
    assert!(
        pipelines >= 4 && expected >= 30,
        "{pipelines} pipelines, {expected} cases"
    );

    // order-read-model's `sql` cases run against this server.
    let pg = Postgres::start_new();
    let url = pg.url();
    let started = Instant::now();
    let (out, stdout, stderr) = keyflow_test_with(&["pipelines/"], &[("ORDERS_DB_URL", &url)]);
    let took = started.elapsed();
    println!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("test result: ok. {expected} passed; 0 failed")),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(" ... ok")).count(),
        expected,
        "{stdout}"
    );
    for line in [
        "test pipelines/welcome-mail.test.toml::a_new_user_gets_a_welcome_mail ... ok",
        "test pipelines/orders.test.toml::contract_rejects_a_negative_total ... ok",
        "test pipelines/saga-ship.test.toml::a_redelivered_payment_emits_one_command ... ok",
        "test pipelines/order-read-model.test.toml::order_created_paid_shipped_keeps_one_row_at_version_3 ... ok",
        "test pipelines/order-read-model.test.toml::order_redelivered_event_is_a_duplicate_and_not_applied_again ... ok",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in\n{stdout}");
    }
    // The rows were written to this database, not elsewhere: the last case's row is there
    // (each case starts from `reset`), and the runner's applied positions under its own name.
    assert_eq!(
        pg.psql("SELECT order_id, status, version FROM orders"),
        "o-12|cancelled|1"
    );
    assert_eq!(
        pg.psql("SELECT DISTINCT consumer FROM keyflow_applied"),
        "keyflow-test"
    );
    // welcome-mail's 503 case runs 8 attempts under `backoff = "200ms"`: slept, its backoffs
    // alone would take at least 12.7 s (jitter halves them at most). Retries do not sleep.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    println!("{expected} cases in {took:?}");
}

/// A pipeline and its schema copied to a temporary directory, with `test` as its test file.
fn temp_pipeline(test: &str) -> tempfile::TempDir {
    temp_copy(
        &["saga-ship.toml", "schemas/payment.completed.json"],
        "saga-ship.test.toml",
        test,
    )
}

/// `files` (paths under `pipelines/`) copied to a temporary directory, with `test` written as
/// `test_file` beside them.
fn temp_copy(files: &[&str], test_file: &str, test: &str) -> tempfile::TempDir {
    let dir = temp_dir("keyflow-contract-");
    for f in files {
        let to = dir.path().join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(repo().join("pipelines").join(f), to).unwrap();
    }
    std::fs::write(dir.path().join(test_file), test).unwrap();
    dir
}

#[test]
fn a_wrong_expectation_fails_with_a_diff_naming_the_field_and_both_values() {
    let dir = temp_pipeline(
        r#"
[[case]]
name = "right"
[[case.message]]
value = { payment_id = "p-1", order_id = "o-1", amount = 5 }
expect.outputs = { "shipment.commands" = [{ key = "o-1", value = { payment_id = "p-1", order_id = "o-1", paid_amount = 5, command = "ShipOrder", saga = { step = "ship" } } }] }

[[case]]
name = "wrong_amount"
[[case.message]]
value = { payment_id = "p-2", order_id = "o-2", amount = 5 }
expect.outputs = { "shipment.commands" = [{ key = "o-2", value = { payment_id = "p-2", order_id = "o-2", paid_amount = 6, command = "ShipOrder", saga = { step = "ship" } } }] }

[[case]]
name = "expects_a_schema_error_for_a_valid_payment"
[[case.message]]
value = { payment_id = "p-3", order_id = "o-3", amount = 5 }
expect.dead_lettered = { kind = "schema" }
"#,
    );
    let p = dir.path().display().to_string();
    let (out, stdout, stderr) = keyflow_test(&[&p]);
    println!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let file = format!("{p}/saga-ship.test.toml");
    for line in [
        format!("test {file}::right ... ok"),
        format!("test {file}::wrong_amount ... FAILED"),
        format!("test {file}::expects_a_schema_error_for_a_valid_payment ... FAILED"),
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in\n{stdout}");
    }
    let diff = format!(
        "---- {file}::wrong_amount ----\n\
         message 1 of 1 (key none): 1 difference(s) (- expected, + actual)\n  \
         outputs.\"shipment.commands\"[0].value.paid_amount:\n    - 6\n    + 5\n"
    );
    assert!(stdout.contains(&diff), "{diff}\nin\n{stdout}");
    // The outcome itself differs: both sides shown whole, the actual one with what went out.
    let outcome = stdout
        .split(&format!(
            "---- {file}::expects_a_schema_error_for_a_valid_payment ----"
        ))
        .nth(1)
        .unwrap_or_else(|| panic!("no diff for the outcome case in\n{stdout}"));
    for l in [
        "  outcome:",
        "    -   \"dead_lettered\": {",
        "    -     \"kind\": \"schema\"",
        "    +   \"outputs\": {",
        "    +     \"shipment.commands\": [",
        "    +             \"step\": \"ship\"",
    ] {
        assert!(outcome.lines().any(|x| x == l), "{l:?} in\n{outcome}");
    }
    assert!(
        stdout.contains("test result: FAILED. 1 passed; 2 failed"),
        "{stdout}"
    );
}

/// The `order_*` cases of order-read-model reach its `sql` processor; the `contract_*` ones stop
/// at the schema.
#[test]
fn sql_cases_without_a_database_fail_naming_the_variable() {
    let (out, stdout, stderr) = keyflow_test(&["pipelines/order-read-model.toml"]);
    println!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let file = "pipelines/order-read-model.test.toml";
    // (case, its messages, its key): each fails on its first message, at the `sql` processor.
    for (case, n, key) in [
        (
            "order_created_paid_shipped_keeps_one_row_at_version_3",
            3,
            "o-10",
        ),
        (
            "order_redelivered_event_is_a_duplicate_and_not_applied_again",
            3,
            "o-11",
        ),
        ("order_rows_are_reset_between_cases", 1, "o-12"),
    ] {
        let line = format!("test {file}::{case} ... FAILED");
        assert!(stdout.lines().any(|l| l == line), "{line:?} in\n{stdout}");
        let text = stdout
            .split(&format!("---- {file}::{case} ----\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no failure text for {case} in\n{stdout}"));
        assert_eq!(
            text.lines().next(),
            Some(
                format!("message 1 of {n} (key {key:?}): needs a database: set ORDERS_DB_URL")
                    .as_str()
            ),
            "{case}"
        );
    }
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(" ... ok")).count(),
        5,
        "the contract cases need no database:\n{stdout}"
    );
    assert!(
        stdout.contains("test result: FAILED. 5 passed; 3 failed"),
        "{stdout}"
    );
}

/// order-read-model, its schema and DDL copied to a temporary directory, with `test` as its
/// test file.
fn temp_read_model(test: &str) -> tempfile::TempDir {
    temp_copy(
        &[
            "order-read-model.toml",
            "schemas/order.status.json",
            "sql/orders.sql",
        ],
        "order-read-model.test.toml",
        test,
    )
}

/// `url = "${ORDERS_DB_URL}"` without a default still loads when the variable is unset: the
/// case that reaches `sql` fails naming it (exit 1), not the pipeline file (exit 2).
#[test]
fn a_url_variable_without_default_unset_fails_the_case_not_the_file() {
    let dir = temp_read_model(
        r#"
[database]
url_env = "ORDERS_DB_URL"

[[case]]
name = "applied"
[[case.message]]
key = "o-1"
value = { order_id = "o-1", status = "created", total = 1, at = "2026-12-01T10:00:00Z" }
expect.outputs = {}
"#,
    );
    let pipeline = dir.path().join("order-read-model.toml");
    let text = std::fs::read_to_string(&pipeline).unwrap();
    let no_default = text.replace(
        "${ORDERS_DB_URL:-postgres://keyflow@localhost:5432/orders}",
        "${ORDERS_DB_URL}",
    );
    assert_ne!(text, no_default);
    std::fs::write(&pipeline, no_default).unwrap();
    let p = dir.path().display().to_string();
    let (out, stdout, stderr) = keyflow_test(&[&p]);
    println!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let want = format!(
        "---- {p}/order-read-model.test.toml::applied ----\n\
         message 1 of 1 (key \"o-1\"): needs a database: set ORDERS_DB_URL\n"
    );
    assert!(stdout.contains(&want), "{want}\nin\n{stdout}");
}

#[test]
fn a_wrong_rows_expectation_fails_with_a_diff_of_the_rows() {
    let dir = temp_read_model(
        r#"
[database]
url_env = "ORDERS_DB_URL"
setup = "sql/orders.sql"
reset = "TRUNCATE orders"

[[case]]
name = "paid_twice_counted_once"
[[case.message]]
key = "o-1"
value = { order_id = "o-1", status = "created", total = 1, at = "2026-12-01T10:00:00Z" }
expect.outputs = {}
[[case.message]]
key = "o-1"
value = { order_id = "o-1", status = "paid", total = 1, at = "2026-12-01T10:01:00Z" }
expect.outputs = {}
expect.rows = { query = "SELECT status, version FROM orders", equals = [["paid", 1]] }
"#,
    );
    let pg = Postgres::start_new();
    let url = pg.url();
    let p = dir.path().display().to_string();
    let (out, stdout, stderr) = keyflow_test_with(&[&p], &[("ORDERS_DB_URL", &url)]);
    println!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let diff = format!(
        "---- {p}/order-read-model.test.toml::paid_twice_counted_once ----\n\
         message 2 of 2 (key \"o-1\"): 1 difference(s) (- expected, + actual)\n  \
         rows[0][1]:\n    - 1\n    + 2\n"
    );
    assert!(stdout.contains(&diff), "{diff}\nin\n{stdout}");
    assert!(
        stdout.contains("test result: FAILED. 0 passed; 1 failed"),
        "{stdout}"
    );
}

#[test]
fn a_malformed_test_file_names_the_file_and_the_field() {
    let dir = temp_pipeline(
        r#"
[[case]]
name = "x"
[[case.message]]
value = { payment_id = "p-1", order_id = "o-1", amount = 5 }
expect = { dropped = true, duplicate = true }
[[case.message]]
value = { payment_id = "p-1", order_id = "o-1", amount = 5 }
expect.dead_lettered = { knd = "schema" }
"#,
    );
    let p = dir.path().display().to_string();
    let (out, stdout, stderr) = keyflow_test(&[&p]);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    let first = format!("{p}/saga-ship.test.toml: field `case[0].message[1].expect.dead_lettered.knd`: unknown field `knd`, expected `kind` or `message_contains` (line 9, column 26)");
    assert!(stderr.lines().any(|l| l == first), "{first:?} in\n{stderr}");
    assert!(!stdout.contains("test result"), "nothing ran: {stdout}");

    // Once that is fixed, the semantic errors.
    std::fs::write(
        dir.path().join("saga-ship.test.toml"),
        r#"
[[case]]
name = "x"
[[case.message]]
value = { payment_id = "p-1", order_id = "o-1", amount = 5 }
expect = { dropped = true, duplicate = true }
"#,
    )
    .unwrap();
    let (out, stdout, stderr) = keyflow_test(&[&p]);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    let want = format!("{p}/saga-ship.test.toml: field `case[0].message[0].expect`: expected exactly one of outputs, dropped, duplicate, dead_lettered; found 2");
    assert!(stderr.lines().any(|l| l == want), "{want:?} in\n{stderr}");
}

#[test]
fn run_and_validate_do_not_take_a_test_file_for_a_pipeline() {
    let out = Command::new(Keyflow::bin())
        .args(["validate", "pipelines/"])
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("welcome-mail.toml"), "{stdout}");
    assert!(!stdout.contains(".test.toml"), "{stdout}");
}
