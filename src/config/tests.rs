//! Config validation with the exact error messages a user sees.

use std::path::PathBuf;

use super::*;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn env(pairs: &[(&str, &str)]) -> Env {
    Env(pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

const MINIMAL: &str = r#"
topic = "orders"
auto_offset_reset = "earliest"
[[processors]]
type = "forward"
topic = "orders.out"
"#;

fn errors(text: &str, e: &Env) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "orders.toml", text);
    let prefix = format!("{}: ", p.display());
    match load_pipeline(&p, &Global::default(), e) {
        Ok(_) => Vec::new(),
        Err(ConfigErrors(v)) => v
            .iter()
            .map(|e| e.to_string().replace(&prefix, "FILE: "))
            .collect(),
    }
}

#[test]
fn minimal_file_gets_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "orders.toml", MINIMAL);
    let s = load_pipeline(&p, &Global::default(), &Env::default()).unwrap();
    assert_eq!(s.name, "orders");
    assert_eq!(s.group_id, "keyflow-orders");
    assert_eq!(s.dead_letter_topic, "orders.dlq");
    assert_eq!(s.ordering, Ordering::Key);
    assert_eq!(s.max_in_flight, 1000);
    assert_eq!(s.commit_interval, std::time::Duration::from_secs(1));
}

#[test]
fn unknown_field_is_an_error() {
    let e = errors(&format!("max_inflight = 5\n{MINIMAL}"), &Env::default());
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with(
            "FILE: field `max_inflight`: unknown field `max_inflight`, expected one of"
        ),
        "{e:?}"
    );
}

#[test]
fn wrong_type_names_field_value_and_expectation() {
    let e = errors(
        &format!("max_in_flight = \"lots\"\n{MINIMAL}"),
        &Env::default(),
    );
    assert_eq!(
        e,
        vec!["FILE: field `max_in_flight`: invalid type: string \"lots\", expected usize"]
    );
}

#[test]
fn bad_enum_and_duration() {
    let e = errors(&MINIMAL.replace("earliest", "beginning"), &Env::default());
    assert_eq!(e, vec!["FILE: field `auto_offset_reset`: unknown variant `beginning`, expected `earliest` or `latest`"]);
    let e = errors(&format!("drain_timeout = 10\n{MINIMAL}"), &Env::default());
    assert_eq!(e, vec!["FILE: field `drain_timeout`: invalid type: integer `10`, expected a duration string with a unit, like \"250ms\" or \"30s\""]);
}

#[test]
fn auto_offset_reset_is_required() {
    let e = errors(
        &MINIMAL.replace("auto_offset_reset = \"earliest\"", ""),
        &Env::default(),
    );
    assert_eq!(e, vec!["FILE: missing field `auto_offset_reset`"]);
}

#[test]
fn every_semantic_error_is_listed() {
    let text = format!("drain_timeout = \"40s\"\nmax_in_flight = 0\nresume_at = 1.5\n{MINIMAL}")
        .replace("orders.out", "orders");
    let e = errors(&text, &Env::default());
    assert_eq!(
        e,
        vec![
            "FILE: field `max_in_flight`: expected at least 1, found 0",
            "FILE: field `resume_at`: expected a fraction between 0 and 1 (exclusive), found 1.5",
            "FILE: field `drain_timeout`: \"40s\" must be below session_timeout (\"30s\"): a member that drains longer than its session is expelled while it drains",
            "FILE: field `processors[0].topic`: \"orders\" is the input topic: messages would loop forever",
        ]
    );
}

#[test]
fn managed_kafka_keys_are_refused() {
    let e = errors(
        &format!("{MINIMAL}\n[kafka]\n\"enable.auto.commit\" = true\n\"fetch.min.bytes\" = 1\n"),
        &Env::default(),
    );
    assert_eq!(e, vec!["FILE: field `kafka.\"enable.auto.commit\"`: is managed by keyflow: set commit_interval (keyflow commits on completion)"]);
}

#[test]
fn env_overrides_and_interpolation() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "orders.toml",
        &format!("{MINIMAL}\n[kafka]\n\"sasl.password\" = \"${{ORDERS_PW}}\"\n"),
    );
    let e = env(&[
        ("ORDERS_PW", "hunter2"),
        ("KEYFLOW_PIPELINE_ORDERS__MAX_IN_FLIGHT", "42"),
    ]);
    let s = load_pipeline(&p, &Global::default(), &e).unwrap();
    assert_eq!(s.max_in_flight, 42);
    assert!(s
        .kafka
        .contains(&("sasl.password".into(), "hunter2".into())));

    let e = env(&[
        ("ORDERS_PW", "x"),
        ("KEYFLOW_PIPELINE_ORDERS__MAX_IN_FLIGHT", "many"),
    ]);
    let err = load_pipeline(&p, &Global::default(), &e)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("env KEYFLOW_PIPELINE_ORDERS__MAX_IN_FLIGHT: field `max_in_flight`: invalid type: string \"many\""), "{err}");
}

#[test]
fn missing_variable_is_named() {
    let e = errors(
        &format!("{MINIMAL}\n[kafka]\n\"sasl.password\" = \"${{NOT_SET_ANYWHERE}}\"\n"),
        &Env::default(),
    );
    assert_eq!(e, vec!["FILE: field `kafka.sasl.password`: environment variable NOT_SET_ANYWHERE is not set (referenced as `${NOT_SET_ANYWHERE}`)"]);
}

#[test]
fn global_env_overrides() {
    let g = load_global(
        None,
        &env(&[
            ("KEYFLOW_BROKERS", "b1:9092,b2:9092"),
            ("KEYFLOW_KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
            ("KEYFLOW_TEST_CACHE", "/x"),
        ]),
    )
    .unwrap();
    assert_eq!(g.brokers, "b1:9092,b2:9092");
    assert_eq!(
        g.kafka,
        vec![("security.protocol".to_string(), "SASL_SSL".to_string())]
    );
}

#[test]
fn duplicate_topics_across_files() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "a.toml", MINIMAL);
    write(&dir, "b.toml", MINIMAL);
    let err = load(
        Global::default(),
        &[dir.path().to_path_buf()],
        &Env::default(),
    )
    .unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(
        err.0[0]
            .message
            .contains("one pipeline file per input topic"),
        "{err}"
    );
}

#[test]
fn shipped_pipelines_are_valid() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let c = load(Global::default(), &[dir], &Env::default()).unwrap();
    assert!(c.pipelines.len() >= 2);
}
