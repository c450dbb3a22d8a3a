//! The `keyflow` binary: CLI → config → run. Exit codes: 0 clean, 1 runtime failure (drain
//! deadline passed, a partition failed, brokers unreachable at start), 2 configuration error. A
//! SIGTERM or SIGINT during the startup wait exits 0 at once.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use keyflow::config::{self, Env, HumanDuration};
use keyflow::runtime::{Runtime, StartError};

#[derive(Parser)]
#[command(
    name = "keyflow",
    version,
    about = "Kafka processing with per-key ordering, bounded memory and commit on completion"
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "KEYFLOW_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and process: the main job.
    Run {
        /// Global settings file (brokers, HTTP address, [kafka]); defaults to ./keyflow.toml if
        /// present.
        #[arg(long, env = "KEYFLOW_CONFIG")]
        config: Option<PathBuf>,
        /// Pipeline files or directories (default: the global file's `pipelines`, "pipelines").
        paths: Vec<PathBuf>,
    },
    /// Check configuration files; exit 2 listing every error.
    Validate {
        #[arg(long, env = "KEYFLOW_CONFIG")]
        config: Option<PathBuf>,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run the main job on an embedded broker (librdkafka's mock cluster) fed by a synthetic
    /// keyed producer, with live progress.
    Demo {
        /// Stop after this long (Ctrl-C stops earlier).
        #[arg(long, default_value = "30s")]
        duration: HumanDuration,
        /// The pipeline file to run (its topic is created on the embedded broker).
        #[arg(long, default_value = "pipelines/demo.toml")]
        pipeline: PathBuf,
        /// Messages per second the synthetic producer writes.
        #[arg(long, default_value_t = 5000)]
        rate: u32,
    },
    /// Show what each partition holds and why it waits (`/debug/partitions` of a running
    /// keyflow), refreshed live.
    Status {
        /// The running keyflow's HTTP address (its `[http] address`).
        #[arg(long, default_value = "127.0.0.1:9464", env = "KEYFLOW_STATUS_ADDRESS")]
        address: String,
        /// Refresh period.
        #[arg(long, default_value = "1s")]
        every: HumanDuration,
        /// Print once and exit (for scripts and tests).
        #[arg(long)]
        once: bool,
    },
    /// Run pipeline tests (`<name>.test.toml` next to `<name>.toml`) without a broker; exit 1
    /// if a case fails, 2 if a file is malformed.
    Test {
        /// Test or pipeline files, or directories (default: "pipelines").
        paths: Vec<PathBuf>,
    },
    /// Dead-letter topic tools.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Re-publish dead-lettered messages to their source topic (or --to), optionally filtered.
    Replay {
        /// The dead-letter topic to read (e.g. order.created.dlq).
        topic: String,
        #[arg(long, env = "KEYFLOW_BROKERS")]
        brokers: String,
        /// Send to this topic instead of each message's keyflow.source.topic.
        #[arg(long)]
        to: Option<String>,
        /// Only this error kind (keyflow.error.kind); repeatable.
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Only dead letters written at or after this time (RFC 3339 or epoch ms).
        #[arg(long)]
        since: Option<String>,
        /// Only dead letters written before this time (RFC 3339 or epoch ms).
        #[arg(long)]
        until: Option<String>,
        /// Only messages with exactly this key.
        #[arg(long)]
        key: Option<String>,
        /// Count what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Global settings file: its `[kafka]` table (and `KEYFLOW_KAFKA__*` variables) give the
        /// security settings, as for `run`; defaults to ./keyflow.toml if present.
        #[arg(long, env = "KEYFLOW_CONFIG")]
        config: Option<PathBuf>,
        /// A librdkafka property for both clients, NAME=VALUE; repeatable; wins over the global
        /// file. Keep secrets out of the command line: use `KEYFLOW_KAFKA__SASL_PASSWORD`.
        #[arg(long = "kafka", value_name = "NAME=VALUE")]
        kafka: Vec<String>,
        /// Quiet time after the end of every partition before stopping.
        #[arg(long, default_value = "1s")]
        idle: HumanDuration,
    },
}

/// Logs go to stderr with every configured secret blanked out of each line (`secrets`: the
/// values of sensitive `[kafka]` properties, see `keyflow::config::kafka::SENSITIVE`): keyflow
/// redacts what it formats itself, but librdkafka's messages reach the log through client
/// contexts keyflow does not own (the producers'), and some quote configuration values.
fn init_logging(format: LogFormat, secrets: Vec<String>) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,rdkafka=warn"));
    // Colour only for a person at a terminal: in files, log collectors and CI artefacts the
    // escape codes are noise that breaks grep. `NO_COLOR` turns it off at a terminal too.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(RedactedStderr(secrets));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

/// Stderr with secrets blanked out; the formatter writes each event in one call, so a secret is
/// never split across writes. Costs a substring search per secret per log line, nothing when no
/// secret is configured.
struct RedactedStderr(Vec<String>);

struct RedactedWriter<'a>(&'a [String]);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactedStderr {
    type Writer = RedactedWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        RedactedWriter(&self.0)
    }
}

impl std::io::Write for RedactedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        match std::str::from_utf8(buf) {
            Ok(text) if !self.0.is_empty() => {
                err.write_all(config::kafka::redact(text, self.0).as_bytes())?
            }
            _ => err.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Every sensitive `[kafka]` value of every pipeline.
fn secrets_of(config: &config::Config) -> Vec<String> {
    let all: Vec<(String, String)> = config
        .pipelines
        .iter()
        .flat_map(|p| p.kafka.iter().cloned())
        .chain(config.global.kafka.iter().cloned())
        .collect();
    config::kafka::secret_values(&all)
}

fn load(
    config_path: Option<PathBuf>,
    paths: Vec<PathBuf>,
) -> Result<config::Config, config::ConfigErrors> {
    let env = Env::from_process();
    let config_path =
        config_path.or_else(|| Some(PathBuf::from("keyflow.toml")).filter(|p| p.exists()));
    let global = config::load_global(config_path.as_deref(), &env)?;
    let paths = if paths.is_empty() {
        vec![global.pipelines.clone()]
    } else {
        paths
    };
    config::load(global, &paths, &env)
}

/// How often freed heap memory is handed back to the OS (see [`spawn_malloc_trim`]).
const MALLOC_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// glibc's malloc keeps what a burst freed (a catch-up after a broker outage: connections,
/// workers, fetched messages) as the process's high-water: the live heap falls back, RSS does
/// not. A thread asks it every [`MALLOC_TRIM_EVERY`] to return the free pages of every arena
/// (`malloc_trim(0)`). Off the message path, but not free: glibc locks each arena in turn while
/// it walks its free chunks and `madvise`s them, so an allocation on that arena waits for the
/// walk (sub-millisecond on keyflow's tens-of-MiB heap; long on huge heaps), and returned pages
/// are faulted in again when reused. `KEYFLOW_MALLOC_TRIM=off` turns it off. Measured against
/// jemalloc with the soak's `--outages` (BENCHMARKS.md, "Chaos soak"): both return the memory,
/// this one at the lower RSS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn spawn_malloc_trim() {
    if matches!(
        std::env::var("KEYFLOW_MALLOC_TRIM").as_deref(),
        Ok("off" | "0" | "false")
    ) {
        tracing::info!("malloc_trim thread off (KEYFLOW_MALLOC_TRIM)");
        return;
    }
    let trim = || loop {
        std::thread::sleep(MALLOC_TRIM_EVERY);
        // SAFETY: malloc_trim takes no pointer; it only releases free memory of glibc's arenas.
        unsafe {
            libc::malloc_trim(0);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("kf-malloc-trim".into())
        .spawn(trim)
    {
        tracing::warn!(error = %e, "no malloc_trim thread: freed memory stays in the process");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn spawn_malloc_trim() {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config, paths } => match load(config, paths) {
            Ok(c) => {
                for p in &c.pipelines {
                    println!(
                        "ok: {} (pipeline {:?}, topic {:?})",
                        p.file.display(),
                        p.name,
                        p.topic
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{} configuration error(s):\n{e}", e.0.len());
                ExitCode::from(2)
            }
        },
        Command::Run { config, paths } => {
            let config = match load(config, paths) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{} configuration error(s):\n{e}", e.0.len());
                    return ExitCode::from(2);
                }
            };
            init_logging(cli.log_format, secrets_of(&config));
            spawn_malloc_trim();
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            let code = rt.block_on(run(config));
            // A startup wait cut short by a signal leaves its blocking metadata request to end
            // by itself (up to `startup_timeout`): the exit does not wait for it.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
        Command::Status {
            address,
            every,
            once,
        } => keyflow::introspect::status(&address, every.get(), once),
        Command::Demo {
            duration,
            pipeline,
            rate,
        } => {
            init_logging(cli.log_format, Vec::new());
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            rt.block_on(keyflow::demo::run(keyflow::demo::DemoOptions {
                duration: duration.get(),
                pipeline,
                rate,
            }))
        }
        Command::Dlq { command } => dlq(command, cli.log_format),
        Command::Test { paths } => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            let code = rt.block_on(keyflow::testing::run(&paths, &mut std::io::stdout()));
            ExitCode::from(code)
        }
    }
}

fn dlq(command: DlqCommand, log_format: LogFormat) -> ExitCode {
    let DlqCommand::Replay {
        topic,
        brokers,
        to,
        kinds,
        since,
        until,
        key,
        dry_run,
        config: config_path,
        kafka,
        idle,
    } = command;
    // The same [kafka] settings as `run` (global file, KEYFLOW_KAFKA__* variables), then --kafka.
    let config_path =
        config_path.or_else(|| Some(PathBuf::from("keyflow.toml")).filter(|p| p.exists()));
    let global = match config::load_global(config_path.as_deref(), &Env::from_process()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let time = |s: Option<String>, name: &str| match s.as_deref().map(keyflow::dlq::parse_time) {
        Some(Err(e)) => Err(format!("--{name} {e}")),
        Some(Ok(t)) => Ok(Some(t)),
        None => Ok(None),
    };
    let kafka: Result<Vec<(String, String)>, String> = global
        .kafka
        .into_iter()
        .map(Ok)
        .chain(kafka.iter().map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--kafka {kv:?}: expected NAME=VALUE"))
        }))
        .collect();
    let opts = match (time(since, "since"), time(until, "until"), kafka) {
        (Ok(since_ms), Ok(until_ms), Ok(kafka)) => keyflow::dlq::ReplayOptions {
            brokers,
            dlq_topic: topic,
            to,
            kinds,
            since_ms,
            until_ms,
            key,
            dry_run,
            kafka,
            idle: idle.get(),
        },
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let secrets = config::kafka::secret_values(&opts.kafka);
    init_logging(log_format, secrets.clone());
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(keyflow::dlq::replay(&opts)) {
        Ok(r) => {
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!("{verb} {} of {} dead letters", r.matched, r.scanned);
            for (t, n) in &r.by_topic {
                println!("  {t}: {n}");
            }
            if r.no_target > 0 {
                println!(
                    "  skipped (no keyflow.source.topic header; use --to): {}",
                    r.no_target
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let e = config::kafka::redact(&e.to_string(), &secrets).into_owned();
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: config::Config) -> ExitCode {
    let prometheus = keyflow::metrics::install();
    let http_address = config.global.http_address.clone();
    // SIGTERM and SIGINT are handled from here on, through the startup wait: a pod stopped
    // while its brokers do not answer exits at once, cleanly, instead of at `startup_timeout`.
    let signal = keyflow::shutdown::signal();
    tokio::pin!(signal);
    if futures::poll!(&mut signal).is_ready() {
        return ExitCode::SUCCESS;
    }
    let runtime = Runtime::new(config);
    // Served before the startup wait, so that probes are answered (live, and not ready with the
    // reason) while the pipelines wait for their brokers.
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
    let mut running = match runtime.start_unless(&mut signal).await {
        Ok(r) => r,
        Err(e @ StartError::Stopped { .. }) => {
            tracing::info!(reason = %e, "stopped before processing anything");
            if let Some(t) = http {
                t.abort();
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            tracing::error!(error = %e, "could not start");
            if let Some(t) = http {
                t.abort();
            }
            return ExitCode::from(1);
        }
    };
    let failure = tokio::select! {
        _ = &mut signal => None,
        f = running.failed() => Some(f),
    };
    let reports = running.shutdown().await;
    if let Some(t) = http {
        t.abort();
    }
    let clean = reports.iter().all(|r| r.clean());
    for r in reports.iter().filter(|r| !r.clean()) {
        for (p, a) in &r.abandoned {
            tracing::error!(pipeline = %r.pipeline, partition = p, offset = a.offset, key = ?a.key, running_for = ?a.running_for, "still running at the shutdown deadline");
        }
        if let Some(e) = &r.commit_error {
            tracing::error!(pipeline = %r.pipeline, error = %e, "final commit failed");
        }
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
