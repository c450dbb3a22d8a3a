//! Observability, proven against real tools: keyflow (in process and as the binary) against a
//! Apache Kafka broker, scraped by a real Prometheus (Debian's `prometheus` package) which evaluates
//! every PromQL expression of the dashboards and alert rules; `promtool` checks and unit tests;
//! the compose file parsed by docker-compose; exact metric values; health and the stuck
//! watchdog; `keyflow status`; the `traceparent` trace id on output and DLQ messages.

mod support;

use support::prometheus_sample as sample;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyflow::config;
use keyflow::http::{get_blocking, HttpState};
use keyflow::{Flow, Message, ProcessError, Processor, Runtime};
use support::{free_port, spawn_tied, temp_dir, unique, wait_until, Broker, Keyflow, OutMsg};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool the tests need: `prometheus` and `promtool` come with Debian's `prometheus` package,
/// `docker-compose` with its own. Installed on first use when missing (see
/// `support::ensure_command`); never skipped.
fn tool(name: &str) -> PathBuf {
    let package = match name {
        "prometheus" | "promtool" => "prometheus",
        other => other,
    };
    support::ensure_command(name, package);
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not on PATH after installing {package}");
}

fn run_tool(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn http_get(address: &str, path: &str) -> (u16, String) {
    get_blocking(address, path, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET http://{address}{path}: {e}"))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server process (killed on drop).
struct Prometheus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` every second and loads the repository's alert rules.
    fn start(target: &str) -> Prometheus {
        let dir = temp_dir("prometheus-");
        std::fs::copy(
            repo().join("prometheus/alerts.yml"),
            dir.path().join("alerts.yml"),
        )
        .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
                 scrape_configs:\n  - job_name: keyflow\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        run_tool(
            Command::new(tool("promtool"))
                .arg("check")
                .arg("config")
                .arg(&config),
        );
        let address = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(tool("prometheus"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap());
        let child = spawn_tied(cmd).expect("start prometheus");
        let p = Prometheus {
            child,
            address,
            _dir: dir,
        };
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                get_blocking(&p.address, "/-/ready", Duration::from_secs(2))
                    .is_ok_and(|(c, _)| c == 200)
            },
            "prometheus ready",
        );
        p
    }

    /// `/api/v1/query`: (status, number of result series).
    fn query(&self, expr: &str) -> (String, usize, String) {
        let (_, body) = http_get(
            &self.address,
            &format!("/api/v1/query?query={}", percent_encode(expr)),
        );
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus answered {body:?}: {e}"));
        let status = v["status"].as_str().unwrap_or("").to_string();
        let n = v["data"]["result"].as_array().map_or(0, Vec::len);
        (status, n, body)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every PromQL expression of a Grafana dashboard: panel targets, and the selectors inside
/// `label_values(…)` template queries.
fn dashboard_exprs(path: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in v["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for var in v["templating"]["list"].as_array().unwrap() {
        let q = var["query"]["query"].as_str().unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .map(|(sel, _)| sel.trim().to_string())
            .unwrap_or_else(|| panic!("unexpected template query {q}"));
        out.push(inner);
    }
    out
}

/// Every alert expression of a rules file (the `expr:` values, block scalars included).
fn rule_exprs(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let t = l.trim_start();
        let Some(rest) = t.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" || rest == ">" {
            let indent = l.len() - t.len();
            let mut e = String::new();
            while let Some(n) = lines.peek() {
                let nt = n.trim_start();
                if nt.is_empty() || n.len() - nt.len() <= indent {
                    break;
                }
                e.push_str(nt);
                e.push('\n');
                lines.next();
            }
            out.push(e);
        } else {
            out.push(rest.to_string());
        }
    }
    out
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("keyflow_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        let n = &expr[start..end];
        let base = n
            .strip_suffix("_bucket")
            .or_else(|| n.strip_suffix("_count"))
            .or_else(|| n.strip_suffix("_sum"))
            .unwrap_or(n);
        names.insert(base.to_string());
        i = end;
    }
    names
}

// ---------------------------------------------------------------------------------------------

#[test]
fn promtool_checks_config_and_rules_and_runs_rule_tests() {
    let promtool = tool("promtool");
    let dir = repo().join("prometheus");
    let out = run_tool(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_tool(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(dir.join("alerts.yml")),
    );
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
    let out = run_tool(
        Command::new(&promtool)
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every topic a shipped pipeline reads or writes: input, dead-letter topic (as keyflow resolves
/// its default), and the `topic` of every processor and route.
fn topics_of_shipped_pipelines() -> std::collections::BTreeSet<String> {
    let mut topics = std::collections::BTreeSet::new();
    let global = keyflow::config::Global::default();
    for entry in std::fs::read_dir(repo().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        // `x.test.toml` holds the tests of `x.toml` (`keyflow test`), not a pipeline.
        if path.extension().and_then(|e| e.to_str()) != Some("toml")
            || keyflow::testing::is_test_file(&path)
        {
            continue;
        }
        let spec = keyflow::config::load_pipeline(&path, &global, &keyflow::config::Env::default())
            .unwrap_or_else(|e| panic!("{e}"));
        topics.insert(spec.topic.clone());
        topics.insert(spec.dead_letter_topic.clone());
        let raw: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let processors = raw.get("processors").and_then(|p| p.as_array());
        for p in processors.into_iter().flatten() {
            let routes = p.get("routes").and_then(|r| r.as_array());
            for t in std::iter::once(p).chain(routes.into_iter().flatten()) {
                if let Some(topic) = t.get("topic").and_then(|t| t.as_str()) {
                    topics.insert(topic.to_string());
                }
            }
        }
    }
    topics
}

#[test]
fn compose_creates_every_topic_of_the_shipped_pipelines() {
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let init = compose
        .split("kafka-init:")
        .nth(1)
        .and_then(|rest| rest.split("\n  keyflow:").next())
        .expect("a kafka-init service before keyflow");
    let created: std::collections::BTreeSet<&str> = init
        .split(|c: char| c.is_whitespace() || c == '\\' || c == ';')
        .filter(|w| w.contains('.') && !w.ends_with('.') && !w.contains('/') && !w.contains(':'))
        .collect();
    let needed = topics_of_shipped_pipelines();
    let missing: Vec<&String> = needed
        .iter()
        .filter(|t| !created.contains(t.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docker-compose.yml's kafka-init does not create {missing:?} (it creates {created:?})"
    );
    assert!(needed.len() >= 10, "{needed:?}");
}

#[test]
fn compose_file_is_valid_for_a_real_compose_parser() {
    // docker-compose (Debian's package) parses and validates the file against the compose
    // schema and resolves it; no engine is needed for `config`.
    let out = run_tool(
        Command::new(tool("docker-compose"))
            .args(["-f", "docker-compose.yml", "config"])
            .current_dir(repo()),
    );
    for service in [
        "kafka:",
        "kafka-init:",
        "keyflow:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(out.contains(service), "service {service} missing:\n{out}");
    }
    assert!(out.contains("apache/kafka"), "{out}");
    assert!(
        out.contains("KAFKA_PROCESS_ROLES: broker,controller"),
        "{out}"
    );
    // Every file the compose file mounts exists.
    for f in [
        "pipelines",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "dashboards/provisioning/datasources/prometheus.yml",
        "dashboards/provisioning/dashboards/keyflow.yml",
        "dashboards/keyflow-overview.json",
        "Dockerfile",
    ] {
        assert!(repo().join(f).exists(), "{f} is referenced but missing");
    }
    // The Dockerfile builds the binary the tests use, as a non-root user, with a health check.
    let docker = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    for needle in [
        "cargo build --release --locked --bin keyflow",
        "USER 10001",
        "libssl3",
        "HEALTHCHECK",
        "/health/live",
    ] {
        assert!(docker.contains(needle), "Dockerfile lacks {needle:?}");
    }
}

// ---------------------------------------------------------------------------------------------

/// Decides the outcome from the payload: `ok`, `drop` (filtered), `retry` (fails once, then
/// succeeds), `bad` (permanent error → dead letter).
struct Outcomes {
    attempts: Mutex<HashMap<(i32, i64), u32>>,
}

#[async_trait]
impl Processor for Outcomes {
    async fn process(&self, msg: &mut Message) -> Result<Flow, ProcessError> {
        match msg.payload_str().unwrap_or("").split(':').next().unwrap() {
            "ok" => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(Flow::Continue)
            }
            "drop" => Ok(Flow::Drop),
            "retry" => {
                let mut a = self.attempts.lock().unwrap();
                let n = a.entry((msg.partition, msg.offset)).or_insert(0);
                *n += 1;
                if *n == 1 {
                    Err(ProcessError::retryable("flaky", "first attempt fails"))
                } else {
                    Ok(Flow::Continue)
                }
            }
            _ => Err(ProcessError::permanent("decode", "not a valid order")),
        }
    }
}

fn config(broker: &Broker, toml: &str) -> config::Config {
    support::inline_config(&broker.bootstrap, toml)
}

fn msg(key: &str, payload: &str, traceparent: bool) -> OutMsg {
    OutMsg {
        key: Some(key.as_bytes().to_vec()),
        payload: payload.as_bytes().to_vec(),
        headers: if traceparent {
            vec![("traceparent".into(), TRACEPARENT.as_bytes().to_vec())]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

fn trace_id_of(headers: &[(String, Vec<u8>)]) -> Option<(String, String)> {
    let v = headers.iter().find(|(k, _)| k == "traceparent")?;
    let s = String::from_utf8(v.1.clone()).ok()?;
    let parts: Vec<&str> = s.split('-').collect();
    Some((parts[1].to_string(), parts[2].to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_metrics_lag_dashboards_and_alerts_through_real_prometheus() {
    const OK: usize = 1000;
    const DROP: usize = 40;
    const RETRY: usize = 15;
    const BAD: usize = 7;
    let prometheus_handle = keyflow::metrics::install();
    let broker = Broker::shared();
    let (input, output, dlq, group) = (
        unique("obs-in"),
        unique("obs-out"),
        unique("obs-dlq"),
        unique("obs-g"),
    );
    let name = unique("obs");
    for t in [&input, &output, &dlq] {
        broker.create_topic(t, 2).await;
    }
    // The backlog: every outcome, some with a traceparent.
    let mut msgs = Vec::new();
    for i in 0..OK {
        msgs.push(msg(
            &format!("k{}", i % 10),
            &format!("ok:{i}"),
            i % 100 == 0,
        ));
    }
    for i in 0..DROP {
        msgs.push(msg(&format!("d{i}"), "drop", false));
    }
    for i in 0..RETRY {
        msgs.push(msg(&format!("r{i}"), "retry", false));
    }
    for i in 0..BAD {
        msgs.push(msg(&format!("b{i}"), "bad", i == 0));
    }
    broker.produce(&input, msgs);
    // A trailing marker per partition: the delivery reports are the truth for "the end",
    // not a high watermark read at some moment.
    let end = broker.produce(
        &input,
        (0..2).map(|p| OutMsg {
            partition: Some(p),
            key: Some(b"marker".to_vec()),
            payload: b"ok:marker".to_vec(),
            ..Default::default()
        }),
    );

    let cfg = config(
        broker,
        &format!(
            r#"
name = "{name}"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout = "4s"
drain_timeout = "3s"
commit_interval = "200ms"
dead_letter_topic = "{dlq}"
[retry]
max_attempts = 3
backoff = "10ms"
max_backoff = "20ms"
[[processors]]
type = "custom"
name = "outcomes"
[[processors]]
type = "forward"
topic = "{output}"
"#
        ),
    );
    let runtime = Runtime::new(cfg).with_processor(
        "outcomes",
        Arc::new(Outcomes {
            attempts: Mutex::new(HashMap::new()),
        }),
    );
    let running = runtime.start().await.unwrap();
    let (addr, server) = keyflow::http::serve(
        "127.0.0.1:0",
        HttpState {
            prometheus: prometheus_handle,
            pipelines: running.stats.clone(),
        },
    )
    .await
    .unwrap();
    let addr = addr.to_string();

    // Sample the lag while the backlog is worked off: it must be seen above 0.
    let max_lag = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (max_lag, stop, addr, name) =
            (max_lag.clone(), stop.clone(), addr.clone(), name.clone());
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                if let Ok((_, text)) = get_blocking(&addr, "/metrics", Duration::from_secs(5)) {
                    for p in ["0", "1"] {
                        if let Some(v) = sample(
                            &text,
                            "keyflow_consumer_lag_messages",
                            &[("pipeline", &name), ("partition", p)],
                        ) {
                            max_lag.fetch_max(v as i64, Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let ends: Vec<i64> = (0..2).map(|p| end.next_offsets[&p]).collect();
    tokio::task::block_in_place(|| {
        wait_until(
            Duration::from_secs(120),
            Duration::from_millis(200),
            || broker.committed_offsets(&group, &input, 2) == ends,
            "every message, markers included, committed",
        )
    });
    // Lag returns to 0 (gauges are set on the next tick).
    let lagless = |text: &str| {
        ["0", "1"].iter().all(|p| {
            sample(
                text,
                "keyflow_consumer_lag_messages",
                &[("pipeline", &name), ("partition", p)],
            ) == Some(0.0)
                && sample(
                    text,
                    "keyflow_committed_offset",
                    &[("pipeline", &name), ("partition", p)],
                ) == Some(ends[p.parse::<usize>().unwrap()] as f64)
        })
    };
    tokio::task::block_in_place(|| {
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || lagless(&http_get(&addr, "/metrics").1),
            "lag gauges at 0 and committed offsets at the end",
        )
    });
    stop.store(true, Relaxed);
    sampler.join().unwrap();
    assert!(
        max_lag.load(Relaxed) > 0,
        "the lag gauge never showed the backlog"
    );

    // Exact counts.
    let text = http_get(&addr, "/metrics").1;
    let count = |outcome: &str| {
        sample(
            &text,
            "keyflow_messages_total",
            &[("pipeline", &name), ("outcome", outcome)],
        )
    };
    assert_eq!(count("processed"), Some((OK + RETRY + 2) as f64), "{text}");
    assert_eq!(count("retried"), Some(RETRY as f64));
    assert_eq!(count("dead_lettered"), Some(BAD as f64));
    assert_eq!(count("filtered"), Some(DROP as f64));
    assert_eq!(count("deduplicated"), Some(0.0));
    assert_eq!(
        sample(
            &text,
            "keyflow_dead_letter_writes_total",
            &[("pipeline", &name), ("result", "ok")]
        ),
        Some(BAD as f64)
    );
    assert_eq!(
        sample(
            &text,
            "keyflow_process_duration_seconds_count",
            &[("pipeline", &name)]
        ),
        // One sample per attempt: the supervisor re-runs a retried message (issue 3), and each
        // RETRY message takes two attempts.
        Some((OK + DROP + 2 * RETRY + BAD + 2) as f64)
    );
    assert_eq!(
        sample(
            &text,
            "keyflow_end_to_end_latency_seconds_count",
            &[("pipeline", &name)]
        ),
        Some((OK + DROP + RETRY + BAD + 2) as f64)
    );
    assert_eq!(
        sample(&text, "keyflow_assigned_partitions", &[("pipeline", &name)]),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "keyflow_rebalances_total",
            &[("pipeline", &name), ("kind", "assign")]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            "keyflow_commits_total",
            &[("pipeline", &name), ("result", "ok")]
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        text.contains("# TYPE keyflow_process_duration_seconds histogram"),
        "not a histogram"
    );
    assert!(
        text.contains("keyflow_process_duration_seconds_bucket{"),
        "no buckets"
    );
    assert!(!text.contains("quantile="), "summaries rendered");
    for key in ["k1", "d1", "r1", "b1", "marker"] {
        assert!(
            !text.contains(&format!("\"{key}\"")),
            "a message key is a label value"
        );
    }
    assert_eq!(http_get(&addr, "/health/ready").0, 200);
    assert_eq!(http_get(&addr, "/health/live").0, 200);

    // Tracing: output and DLQ messages carry the input's trace id, under a new span id.
    let out = broker.consume_all(&output, OK + RETRY + 2, Duration::from_secs(60));
    let traced: Vec<_> = out.iter().filter_map(|m| trace_id_of(&m.headers)).collect();
    assert_eq!(traced.len(), OK / 100, "outputs with a traceparent");
    for (t, span) in &traced {
        assert_eq!(t, TRACE_ID);
        assert_ne!(
            span, "00f067aa0ba902b7",
            "the span id is continued, not copied"
        );
    }
    let dead = broker.consume_all(&dlq, BAD, Duration::from_secs(60));
    assert_eq!(dead.len(), BAD);
    let traced: Vec<_> = dead
        .iter()
        .filter_map(|m| trace_id_of(&m.headers))
        .collect();
    assert_eq!(traced.len(), 1, "the DLQ message with a traceparent");
    assert_eq!(traced[0].0, TRACE_ID);

    // A real Prometheus scrapes keyflow and evaluates every dashboard and alert expression.
    let prom = tokio::task::block_in_place(|| Prometheus::start(&addr));
    let up = format!("up{{instance=\"{addr}\"}} == 1");
    tokio::task::block_in_place(|| {
        let prom = &prom;
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(250),
            || prom.query(&up).1 == 1,
            "prometheus scraping keyflow",
        );
        // rate() needs two samples in its window.
        let first = Instant::now();
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(250),
            || {
                first.elapsed() > Duration::from_secs(3)
                    && prom
                        .query("count_over_time(keyflow_build_info[30s]) >= 3")
                        .1
                        > 0
            },
            "three scrapes",
        );
    });
    let exposed = http_get(&addr, "/metrics").1;
    let dashboard = repo().join("dashboards/keyflow-overview.json");
    let exprs = dashboard_exprs(&dashboard);
    assert!(
        exprs.len() >= 20,
        "only {} dashboard expressions",
        exprs.len()
    );
    for raw in &exprs {
        let e = raw
            .replace("$__rate_interval", "30s")
            .replace("$pipeline", &name)
            .replace("$topic", &input);
        let (status, n, body) = prom.query(&e);
        assert_eq!(
            status, "success",
            "dashboard expression {raw:?} failed: {body}"
        );
        assert!(
            n > 0,
            "dashboard expression {raw:?} returned no data: {body}"
        );
        for m in metric_names(raw) {
            assert!(
                exposed.contains(&format!("\n{m}")),
                "dashboard uses {m}, which keyflow does not expose"
            );
        }
    }
    let rules = rule_exprs(&repo().join("prometheus/alerts.yml"));
    assert_eq!(rules.len(), 6);
    for e in &rules {
        let (status, _, body) = prom.query(e);
        assert_eq!(status, "success", "alert expression {e:?} failed: {body}");
        for m in metric_names(e) {
            assert!(
                exposed.contains(&format!("\n{m}")),
                "alert uses {m}, which keyflow does not expose"
            );
        }
    }
    // Prometheus itself loaded the rules and evaluates them without error.
    let (_, body) = http_get(&prom.address, "/api/v1/rules");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let loaded: Vec<&serde_json::Value> = v["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), 6, "{body}");
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let (_, body) = http_get(&prom.address, "/api/v1/rules");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["data"]["groups"][0]["rules"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["health"] == "ok")
        },
        "every alert rule evaluated with health ok",
    );

    drop(prom);
    server.abort();
    running.shutdown().await;
}

/// Blocks "hold" messages until released: the partition fills and is paused.
struct Gate {
    open: tokio::sync::watch::Receiver<bool>,
}

#[async_trait]
impl Processor for Gate {
    async fn process(&self, _msg: &mut Message) -> Result<Flow, ProcessError> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        Ok(Flow::Continue)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_gauge_is_one_while_paused() {
    let prometheus_handle = keyflow::metrics::install();
    let broker = Broker::shared();
    let (input, group, name) = (unique("pause-in"), unique("pause-g"), unique("pause"));
    broker.create_topic(&input, 1).await;
    broker.produce(&input, (0..200).map(|i| msg(&format!("k{i}"), "x", false)));
    let cfg = config(
        broker,
        &format!(
            r#"
name = "{name}"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout = "4s"
drain_timeout = "3s"
commit_interval = "100ms"
max_in_flight = 20
pause_after = "100ms"
[[processors]]
type = "custom"
name = "gate"
"#
        ),
    );
    let (open_tx, open) = tokio::sync::watch::channel(false);
    let running = Runtime::new(cfg)
        .with_processor("gate", Arc::new(Gate { open }))
        .start()
        .await
        .unwrap();
    let stats = running.stats[0].clone();
    let (addr, server) = keyflow::http::serve(
        "127.0.0.1:0",
        HttpState {
            prometheus: prometheus_handle,
            pipelines: running.stats.clone(),
        },
    )
    .await
    .unwrap();
    let addr = addr.to_string();
    let paused = |addr: &str| {
        sample(
            &http_get(addr, "/metrics").1,
            "keyflow_partition_paused",
            &[("pipeline", &name), ("partition", "0")],
        )
    };
    {
        tokio::task::block_in_place(|| {
            wait_until(
                Duration::from_secs(60),
                Duration::from_millis(50),
                || paused(&addr) == Some(1.0),
                "paused gauge 1",
            );
            let s = stats.snapshot();
            assert!(
                s.partitions[0].paused,
                "the gauge says paused, the partition is not"
            );
            assert_eq!(s.partitions[0].pauses, 1);
        });
    }
    let text = http_get(&addr, "/metrics").1;
    assert_eq!(
        sample(
            &text,
            "keyflow_partition_pauses_total",
            &[("pipeline", &name), ("partition", "0")]
        ),
        Some(1.0)
    );
    let debug: serde_json::Value =
        serde_json::from_str(&http_get(&addr, "/debug/partitions").1).unwrap();
    let p = debug["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pipeline"] == name.as_str())
        .unwrap();
    assert_eq!(p["partitions"][0]["paused"], true);
    assert_eq!(p["partitions"][0]["in_flight"], 20);
    assert_eq!(p["partitions"][0]["oldest_in_flight"]["offset"], 0);
    open_tx.send(true).unwrap();
    tokio::task::block_in_place(|| {
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(50),
            || paused(&addr) == Some(0.0),
            "paused gauge back to 0 once resumed",
        )
    });
    server.abort();
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------

#[test]
fn health_ready_lifecycle_stuck_partition_and_status_command() {
    let broker = Broker::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (input, group) = (unique("health-in"), unique("health-g"));
    rt.block_on(broker.create_topic(&input, 2));
    let address = format!("127.0.0.1:{}", free_port());
    let secret = "s3cr3t-never-logged";
    let pipeline = format!(
        r#"
name = "health"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout = "6s"
drain_timeout = "1s"
commit_interval = "200ms"
[[processors]]
type = "simulate"
latency = {{ distribution = "fixed", value = "1h" }}
[kafka]
"sasl.password" = "${{HEALTH_SECRET}}"
"#
    );
    let mut kf = Keyflow::start_many(
        &broker.bootstrap,
        &[&pipeline],
        &[
            ("KEYFLOW_HTTP__ADDRESS", &address),
            ("KEYFLOW_HTTP__STUCK_AFTER", "2s"),
            ("HEALTH_SECRET", secret),
        ],
    );
    // Live as soon as the poll loop turns; not ready before the assignment.
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            get_blocking(&address, "/health/live", Duration::from_secs(2))
                .is_ok_and(|(c, _)| c == 200)
        },
        "/health/live 200",
    );
    // keyflow serves HTTP from before its startup wait ("starting" until the brokers answer),
    // and Apache Kafka assigns within milliseconds of the join: the assignment may already be
    // there. Either way, never ready without it.
    let (code, body) = http_get(&address, "/health/ready");
    if code == 200 {
        assert!(
            kf.log().contains("partitions assigned"),
            "ready before the assignment: {body}"
        );
    } else {
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("not joined") || body.contains("starting"),
            "{body}"
        );
        let text = http_get(&address, "/metrics").1;
        assert_eq!(sample(&text, "keyflow_ready", &[]), Some(0.0));
    }
    // Ready once assigned.
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || http_get(&address, "/health/ready").0 == 200,
        "/health/ready 200 after the assignment",
    );
    let text = http_get(&address, "/metrics").1;
    assert_eq!(sample(&text, "keyflow_ready", &[]), Some(1.0));
    assert!(
        sample(
            &text,
            "keyflow_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ) == Some(1.0)
    );

    // `keyflow status` renders /debug/partitions.
    let status = |address: &str| {
        run_tool(
            Command::new(Keyflow::bin())
                .args(["status", "--once", "--address", address])
                .env("NO_COLOR", "1"),
        )
    };
    let out = status(&address);
    assert!(out.contains("pipeline health"), "{out}");
    assert!(out.contains("in-flight"), "{out}");

    // A processor that never returns: the partition is stuck after stuck_after (2 s).
    broker.produce_to_partition(
        &input,
        [
            (0, Some(b"stuck-key".to_vec()), b"x".to_vec()),
            (0, Some(b"stuck-key".to_vec()), b"y".to_vec()),
        ],
    );
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || http_get(&address, "/health/ready").0 == 503,
        "/health/ready 503 once a partition is stuck",
    );
    let (_, body) = http_get(&address, "/health/ready");
    assert!(body.contains("partition 0 stuck"), "{body}");
    let text = http_get(&address, "/metrics").1;
    assert_eq!(
        sample(
            &text,
            "keyflow_partition_stuck",
            &[("pipeline", "health"), ("partition", "0")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "keyflow_partition_stuck",
            &[("pipeline", "health"), ("partition", "1")]
        ),
        Some(0.0)
    );
    // Stuck means the oldest message waited stuck_after itself: its lag in seconds says so.
    let lag_seconds = sample(
        &text,
        "keyflow_consumer_lag_seconds",
        &[("pipeline", "health"), ("partition", "0")],
    )
    .unwrap();
    assert!(
        lag_seconds >= 2.0,
        "lag seconds {lag_seconds} on a stuck partition"
    );
    let debug = http_get(&address, "/debug/partitions").1;
    let v: serde_json::Value = serde_json::from_str(&debug).unwrap();
    let p0 = v["pipelines"][0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["partition"] == 0)
        .unwrap()
        .clone();
    assert_eq!(p0["stuck"], true, "{debug}");
    assert_eq!(p0["oldest_in_flight"]["offset"], 0, "{debug}");
    assert_eq!(p0["oldest_in_flight"]["key"], "stuck-key", "{debug}");
    assert!(p0["oldest_in_flight"]["age_seconds"].as_f64().unwrap() >= 2.0);
    assert_eq!(p0["waiting_keys"][0]["key"], "stuck-key", "{debug}");
    assert_eq!(p0["waiting_keys"][0]["blocked_by_offset"], 0, "{debug}");
    assert!(
        p0["waiting_keys"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("slow processor"),
        "{debug}"
    );
    let out = status(&address);
    assert!(
        out.contains("YES"),
        "status shows the stuck partition:\n{out}"
    );
    assert!(out.contains("stuck-key"), "{out}");
    // Liveness is unaffected: the process and its poll loop are fine.
    assert_eq!(http_get(&address, "/health/live").0, 200);
    // Secrets appear neither in /debug nor in the logs.
    assert!(!debug.contains(secret));
    assert!(!kf.log().contains(secret), "the secret was logged");
    kf.kill9();
}

/// Always fails with a retryable error.
struct Flaky;

#[async_trait]
impl Processor for Flaky {
    async fn process(&self, _msg: &mut Message) -> Result<Flow, ProcessError> {
        Err(ProcessError::retryable("flaky", "always fails"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_partitions_says_a_key_waits_on_retry_backoff() {
    let prometheus_handle = keyflow::metrics::install();
    let broker = Broker::shared();
    let (input, group, name) = (unique("backoff-in"), unique("backoff-g"), unique("backoff"));
    broker.create_topic(&input, 1).await;
    broker.produce(
        &input,
        (0..3).map(|i| msg("same-key", &format!("{i}"), false)),
    );
    let cfg = config(
        broker,
        &format!(
            r#"
name = "{name}"
topic = "{input}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout = "4s"
drain_timeout = "1s"
[retry]
max_attempts = 3
backoff = "60s"
max_backoff = "60s"
[[processors]]
type = "custom"
name = "flaky"
"#
        ),
    );
    let running = Runtime::new(cfg)
        .with_processor("flaky", Arc::new(Flaky))
        .start()
        .await
        .unwrap();
    let (addr, server) = keyflow::http::serve(
        "127.0.0.1:0",
        HttpState {
            prometheus: prometheus_handle,
            pipelines: running.stats.clone(),
        },
    )
    .await
    .unwrap();
    let addr = addr.to_string();
    let mut last = String::new();
    tokio::task::block_in_place(|| {
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                last = http_get(&addr, "/debug/partitions").1;
                let v: serde_json::Value = serde_json::from_str(&last).unwrap();
                let w = &v["pipelines"][0]["partitions"][0]["waiting_keys"][0];
                w["key"] == "same-key"
                    && w["waiting"] == 2
                    && w["blocked_by_offset"] == 0
                    && w["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("retry backoff: offset 0 failed, attempt 2"))
            },
            "/debug/partitions: same-key waits on offset 0's retry backoff",
        )
    });
    let text = http_get(&addr, "/metrics").1;
    assert_eq!(
        sample(
            &text,
            "keyflow_messages_total",
            &[("pipeline", &name), ("outcome", "retried")]
        ),
        Some(1.0),
        "{last}"
    );
    server.abort();
    running.shutdown().await;
}
