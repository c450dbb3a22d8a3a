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

#[test]
fn unsafe_producer_settings_are_refused_with_the_reason() {
    let e = errors(
        &format!(
            "{MINIMAL}\n[kafka]\nacks = 1\n\"enable.idempotence\" = false\n\"max.in.flight\" = 10\nretries = 0\n\"delivery.report.only.error\" = true\n"
        ),
        &Env::default(),
    );
    assert_eq!(e.len(), 5, "{e:#?}");
    for (field, why) in [
        ("acks", "\"1\" is unsafe: keyflow completes a message, and commits past it, only once its forward and dead-letter writes are acknowledged, which loses nothing only with acks=all"),
        ("enable.idempotence", "false is unsafe: without the idempotent producer"),
        ("max.in.flight", "10 is unsafe: expected 1 to 5"),
        ("retries", "0 is unsafe: expected at least 1"),
        ("delivery.report.only.error", "true is unsafe:"),
    ] {
        let want = format!("FILE: field `kafka.\"{field}\"`: {why}");
        assert!(e.iter().any(|l| l.starts_with(&want)), "missing {want:?} in {e:#?}");
    }
}

#[test]
fn safe_producer_settings_are_accepted() {
    let e = errors(
        &format!("{MINIMAL}\n[kafka]\nacks = \"all\"\n\"enable.idempotence\" = true\n\"max.in.flight.requests.per.connection\" = 5\nretries = 10\n\"enable.gapless.guarantee\" = true\n\"isolation.level\" = \"read_committed\"\n"),
        &Env::default(),
    );
    assert_eq!(e, Vec::<String>::new());
}

/// Partition EOF events: keyflow hands none to processors, and each one, read in a batch, moves
/// the partition's position one past a message not yet received (`rd_kafka_q_serve_rkmessages`),
/// which keyflow undoes only by pausing the partition: a pause at every catch-up. Refused at
/// load, naming the file, the field and why; `false` (what keyflow sets) is accepted.
#[test]
fn partition_eof_events_are_refused_with_the_reason() {
    let e = errors(
        &format!("{MINIMAL}\n[kafka]\n\"enable.partition.eof\" = true\n"),
        &Env::default(),
    );
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with("FILE: field `kafka.\"enable.partition.eof\"`: true is not supported: keyflow hands no end-of-partition events to processors"),
        "{e:#?}"
    );
    assert!(e[0].contains("remove the setting"), "{e:#?}");
    let e = errors(
        &format!("{MINIMAL}\n[kafka]\n\"enable.partition.eof\" = false\n"),
        &Env::default(),
    );
    assert_eq!(e, Vec::<String>::new());
}

#[test]
fn unsafe_settings_in_the_global_file_name_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "keyflow.toml",
        "[kafka]\n\"request.required.acks\" = \"1\"\n\"metadata.broker.list\" = \"x:9092\"\n",
    );
    let err = load_global(Some(&p), &Env::default())
        .unwrap_err()
        .to_string();
    let file = p.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}: field `kafka.\"request.required.acks\"`: \"1\" is unsafe"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}: field `kafka.\"metadata.broker.list\"`: is managed by keyflow: set brokers"
        )),
        "{err}"
    );
    // The environment reaches the same check.
    let err = load_global(
        None,
        &env(&[("KEYFLOW_KAFKA__ENABLE_IDEMPOTENCE", "false")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("field `kafka.\"enable.idempotence\"`: false is unsafe"),
        "{err}"
    );
}

const TOPIC_RULE: &str =
    "a Kafka topic name is 1 to 249 characters from [A-Za-z0-9._-], and not \".\" or \"..\"";

#[test]
fn topic_names_kafka_refuses_fail_validate() {
    let long = "x".repeat(250);
    let text = format!(
        r#"
topic = "orders in"
auto_offset_reset = "earliest"
dead_letter_topic = "orders!dlq"
[[processors]]
type = "forward"
topic = "\u0000"
[[processors]]
type = "route"
default = ".."
routes = [{{ when = "`true`", topic = "{long}" }}]
"#
    );
    let e = errors(&text, &Env::default());
    assert_eq!(
        e,
        vec![
            format!("FILE: field `topic`: \"orders in\" is not a valid topic name: ' ' at byte 6; {TOPIC_RULE}"),
            format!("FILE: field `processors[0].topic`: \"\\0\" is not a valid topic name: '\\0' at byte 0; {TOPIC_RULE}"),
            format!("FILE: field `processors[1].routes[0].topic`: \"{long}\" is not a valid topic name: 250 characters; {TOPIC_RULE}"),
            format!("FILE: field `processors[1].default`: \"..\" is not a valid topic name: {TOPIC_RULE}"),
            format!("FILE: field `dead_letter_topic`: \"orders!dlq\" is not a valid topic name: '!' at byte 6; {TOPIC_RULE}"),
        ]
    );
}

#[test]
fn default_dead_letter_topic_must_be_a_valid_name_too() {
    let topic = "t".repeat(247);
    let e = errors(
        &MINIMAL.replace("\"orders\"", &format!("\"{topic}\"")),
        &Env::default(),
    );
    assert_eq!(
        e,
        vec![format!(
            "FILE: field `dead_letter_topic`: \"{topic}.dlq\" (the default, <topic>.dlq) is not a valid topic name: 251 characters; {TOPIC_RULE}"
        )]
    );
}

#[test]
fn group_protocol_defaults_to_classic_and_accepts_consumer() {
    assert_eq!(errors(MINIMAL, &Env::default()), Vec::<String>::new());
    assert_eq!(
        errors(
            &format!("group_protocol = \"consumer\"\n{MINIMAL}"),
            &Env::default()
        ),
        Vec::<String>::new()
    );
    let e = errors(
        &format!("group_protocol = \"kip848\"\n{MINIMAL}"),
        &Env::default(),
    );
    assert_eq!(e, vec!["FILE: field `group_protocol`: unknown variant `kip848`, expected `classic` or `consumer`"]);
}

#[test]
fn consumer_protocol_explains_what_does_not_apply() {
    let text = format!(
        "group_protocol = \"consumer\"\nsession_timeout = \"20s\"\n{MINIMAL}\n[kafka]\n\"heartbeat.interval.ms\" = 1000\n\"partition.assignment.strategy\" = \"range\"\n\"group.remote.assignor\" = \"uniform\"\n"
    );
    let e = errors(&text, &Env::default());
    assert_eq!(
        e,
        vec![
            "FILE: field `session_timeout`: does not apply under group_protocol = \"consumer\": the session timeout is set on the broker (group.consumer.session.timeout.ms, 45s by default); remove it",
            "FILE: field `kafka.\"heartbeat.interval.ms\"`: does not apply under group_protocol = \"consumer\": the heartbeat interval is set on the broker (group.consumer.heartbeat.interval.ms), and librdkafka refuses it",
            "FILE: field `kafka.\"partition.assignment.strategy\"`: does not apply under group_protocol = \"consumer\": the broker assigns partitions; choose its assignor with \"group.remote.assignor\" (uniform or range)",
        ]
    );
    // The same keys are fine under classic.
    let e = errors(
        &text.replace("group_protocol = \"consumer\"\n", ""),
        &Env::default(),
    );
    assert_eq!(e, Vec::<String>::new());
}

#[test]
fn consumer_protocol_refuses_global_kafka_keys_naming_their_origin() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "orders.toml",
        &format!("group_protocol = \"consumer\"\n{MINIMAL}"),
    );
    let global = Global {
        kafka: vec![("heartbeat.interval.ms".into(), "500".into())],
        ..Global::default()
    };
    let err = load_pipeline(&p, &global, &Env::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("field `kafka.\"heartbeat.interval.ms\"`: set in the global [kafka], which every pipeline inherits: does not apply under group_protocol = \"consumer\""),
        "{err}"
    );
}
#[test]
fn group_protocol_env_override() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "orders.toml", MINIMAL);
    let e = env(&[("KEYFLOW_PIPELINE_ORDERS__GROUP_PROTOCOL", "consumer")]);
    let s = load_pipeline(&p, &Global::default(), &e).unwrap();
    assert_eq!(s.group_protocol, GroupProtocol::Consumer);
    let s = load_pipeline(&p, &Global::default(), &Env::default()).unwrap();
    assert_eq!(s.group_protocol, GroupProtocol::Classic);
    let e = env(&[("KEYFLOW_PIPELINE_ORDERS__GROUP_PROTOCOL", "new")]);
    let err = load_pipeline(&p, &Global::default(), &e)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "env KEYFLOW_PIPELINE_ORDERS__GROUP_PROTOCOL: field `group_protocol`: unknown variant `new`, expected `classic` or `consumer`");
}

#[test]
fn a_zero_startup_timeout_is_refused() {
    let text = format!("startup_timeout = \"0s\"\n{MINIMAL}");
    assert_eq!(
        errors(&text, &Env::default()),
        vec![
            "FILE: field `startup_timeout`: expected a positive duration (how long start waits \
             for a broker), found \"0s\""
                .to_string()
        ]
    );
}

#[test]
fn exactly_once_refuses_http_and_more_in_flight_than_the_metadata_holds() {
    let ok = format!("delivery = \"exactly_once\"\n{MINIMAL}");
    assert_eq!(errors(&ok, &Env::default()), Vec::<String>::new());
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "orders.toml", &ok);
    let s = load_pipeline(&p, &Global::default(), &Env::default()).unwrap();
    assert_eq!(s.delivery, Delivery::ExactlyOnce);
    assert_eq!(s.transaction_timeout, std::time::Duration::from_secs(30));

    let e = errors(
        &format!(
            "delivery = \"exactly_once\"\nmax_in_flight = 1001\ntransaction_timeout = \"20m\"\n{MINIMAL}\n[[processors]]\ntype = \"http\"\nurl = \"http://localhost:1/x\"\n"
        ),
        &Env::default(),
    );
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(
        e[0].starts_with(
            "FILE: field `max_in_flight`: expected at most 1000 under delivery = \"exactly_once\""
        ),
        "{e:#?}"
    );
    assert!(
        e[1].starts_with(
            "FILE: field `processors[1]`: an `http` call cannot join a Kafka transaction"
        ),
        "{e:#?}"
    );
    assert!(
        e[2].starts_with("FILE: field `transaction_timeout`: expected between 1s and 15m"),
        "{e:#?}"
    );

    // The same chain under at-least-once is fine.
    let e = errors(
        &format!("max_in_flight = 1001\n{MINIMAL}\n[[processors]]\ntype = \"http\"\nurl = \"http://localhost:1/x\"\n"),
        &Env::default(),
    );
    assert_eq!(e, Vec::<String>::new());
}

/// Review of cde2a59: the broker aborts a transaction open longer than `transaction_timeout`
/// (10 s by default) and bumps the producer's epoch; librdkafka then reports the producer as
/// fenced, which keyflow treats as fatal (the process stops). A transaction with writes stays
/// open up to `commit_interval` (longer while a commit is postponed), so an interval at or
/// above the timeout must be refused — seen in tests/exactly_once_faults.rs with
/// `commit_interval = "120s"`: "transactional producer fenced by newer producer instance",
/// "exactly-once transaction aborted for good; stopping".
#[test]
fn exactly_once_refuses_a_commit_interval_the_transaction_timeout_cannot_hold() {
    let e = errors(
        &format!("delivery = \"exactly_once\"\ncommit_interval = \"30s\"\n{MINIMAL}"),
        &Env::default(),
    );
    assert!(
        e.iter()
            .any(|e| e.contains("commit_interval") || e.contains("transaction_timeout")),
        "commit_interval 30s with the default 10s transaction_timeout accepted: {e:#?}"
    );
}
