#![allow(dead_code)]
//! Shared support for keyflow's integration tests (`mod support;`).
//!
//! * [`Broker`] runs Apache Kafka 4 ([`kafka::KAFKA_VERSION`], single-node KRaft, fetched from
//!   Maven Central once into `target/test-cache/kafka-<version>` or `$KEYFLOW_TEST_CACHE`) on free
//!   loopback ports, with a PLAINTEXT and a SASL_SSL (SCRAM-SHA-512) listener, and offers rdkafka
//!   helpers (topics, producing, consuming, committed offsets, group state). It can be stopped
//!   and started again on the same data ([`Broker::stop`], [`Broker::restart`]).
//!   `KEYFLOW_KAFKA_JVM_OPTS` replaces the JVM flags chosen for a fast start.
//! * [`ensure_command`] installs a missing tool (Maven, Java, openssl, Prometheus, ...) from
//!   Debian's packages, so the test command works on a fresh machine.
//! * [`Keyflow`] runs the `keyflow` binary as a separate process with its
//!   output captured to a log file.
//! * [`wait_until`], [`rss_kib`], [`peak_rss_kib`], [`unique`].
//!
//! Every helper panics with a descriptive message on failure: tests never skip.
//! On a failing test, `Broker`/`Keyflow` keep their temp dirs and print the
//! log tail while unwinding.
//!
//! Environment knobs: `KEYFLOW_TEST_CACHE` (cache dir), `KEYFLOW_KAFKA_LIBS` (a directory
//! holding the broker's jars), `KEYFLOW_TEST_RUST_LOG` (RUST_LOG for keyflow children, default
//! `info,keyflow=debug`; the `env` argument of the `Keyflow` starters wins).
//! keyflow children serve their HTTP endpoint on `127.0.0.1:0` unless `env` sets
//! `KEYFLOW_HTTP__ADDRESS`.
//!
//! Every child process (Kafka, keyflow) is spawned with
//! `PR_SET_PDEATHSIG=SIGKILL` from one long-lived thread, so nothing outlives
//! the test binary, even when it is killed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tempfile::TempDir;

pub mod kafka;
pub mod mock;
pub mod ordered;

const LOG_TAIL_ON_PANIC: usize = 60;

// ---------------------------------------------------------------------------
// small utilities
// ---------------------------------------------------------------------------

/// A name unique across processes and calls: `<prefix>-<pid>-<time>-<counter>`.
/// Only `[A-Za-z0-9._-]` characters are added, so it is a valid topic/group
/// name when `prefix` is.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{prefix}-{}-{:x}-{n}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

/// Polls `cond` every `poll_every` until it returns true; panics naming `what`
/// after `timeout`. Use this instead of sleeping.
pub fn wait_until(
    timeout: Duration,
    poll_every: Duration,
    mut cond: impl FnMut() -> bool,
    what: &str,
) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(poll_every);
    }
}

/// Async variant of [`wait_until`] (needs a tokio runtime); use it when the
/// condition depends on tasks running on the same runtime.
pub async fn wait_until_async(
    timeout: Duration,
    poll_every: Duration,
    mut cond: impl FnMut() -> bool,
    what: &str,
) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(poll_every).await;
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Current resident set size (VmRSS) of `pid` in KiB; `None` if the process is
/// gone or a zombie.
pub fn try_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// Peak resident set size (VmHWM) of `pid` in KiB; `None` if unavailable.
pub fn try_peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM")
}

/// Current resident set size (VmRSS) of a live process in KiB; panics if unavailable.
pub fn rss_kib(pid: u32) -> u64 {
    try_rss_kib(pid).unwrap_or_else(|| panic!("cannot read VmRSS of pid {pid} (exited?)"))
}

/// Peak resident set size (VmHWM) of a live process in KiB; panics if unavailable.
pub fn peak_rss_kib(pid: u32) -> u64 {
    try_peak_rss_kib(pid).unwrap_or_else(|| panic!("cannot read VmHWM of pid {pid} (exited?)"))
}

/// A fresh temporary directory (removed on drop).
pub fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// Last `n` lines of a (log) file, lossily decoded; reads at most the last 4 MiB.
pub fn file_tail(path: &Path, n: usize) -> String {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("<cannot open {}: {e}>", path.display()),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(4 << 20);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

/// Directory for cached test tooling: `$KEYFLOW_TEST_CACHE`, else
/// `<crate>/target/test-cache`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("KEYFLOW_TEST_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-cache"),
    }
}

// ---------------------------------------------------------------------------
// child processes tied to the test binary's lifetime
// ---------------------------------------------------------------------------

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `cmd` so the child receives SIGKILL when this test process dies.
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so all
/// children are forked by one thread that lives as long as the process.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent died between fork and prctl.
                return Err(io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
    let tx = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("test-support-spawner".into())
                .spawn(move || {
                    for mut req in rx {
                        let _ = req.reply.send(req.cmd.spawn());
                    }
                })
                .expect("cannot start the spawner thread");
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (reply, rx) = mpsc::channel();
    tx.send(SpawnRequest { cmd, reply })
        .expect("spawner thread is gone");
    rx.recv().expect("spawner thread dropped the request")
}

fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let f = File::create(path)
        .unwrap_or_else(|e| panic!("cannot create log file {}: {e}", path.display()));
    let f2 = f
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot clone log file handle: {e}"));
    (Stdio::from(f), Stdio::from(f2))
}

fn send_signal(pid: u32, sig: libc::c_int) {
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    send_signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

// ---------------------------------------------------------------------------
// installing what the tests need
// ---------------------------------------------------------------------------

pub(crate) fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
}

/// Makes sure `command` is on PATH, installing Debian's `package` with apt-get when it is not
/// (the tests run as root on the project's machines; elsewhere through sudo). Panics with what to
/// install by hand if that fails: a test never skips because a tool is missing.
pub fn ensure_command(command: &str, package: &str) {
    static APT: Mutex<()> = Mutex::new(());
    if on_path(command) {
        return;
    }
    let _one_at_a_time = APT.lock().unwrap_or_else(|e| e.into_inner());
    if on_path(command) {
        return;
    }
    eprintln!("[support] `{command}` is missing: installing Debian package {package}");
    let root = unsafe { libc::geteuid() } == 0;
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("-n").arg("apt-get");
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run_checked(
            &mut cmd,
            &format!(
                "installing `{command}` (apt-get install {package}; run it by hand if this fails)"
            ),
        );
    };
    apt(&["update", "-q"]);
    apt(&["install", "-y", "-q", "--no-install-recommends", package]);
    assert!(
        on_path(command),
        "apt-get installed {package} but `{command}` is still not on PATH"
    );
}

// ---------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------

/// A message read back by [`Broker::consume_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedMsg {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A message to produce with [`Broker::produce`].
#[derive(Debug, Clone, Default)]
pub struct OutMsg {
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Result of a produce call, taken from the delivery reports.
#[derive(Debug, Clone, Default)]
pub struct Produced {
    /// Messages delivered (always equal to the number given: failures panic).
    pub count: usize,
    /// Per partition: 1 + the highest offset delivered by this call.
    pub next_offsets: BTreeMap<i32, i64>,
}

/// Group state as reported by DescribeGroups (see [`Broker::describe_group`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDesc {
    /// Kafka error code for this group (0 = none).
    pub error_code: i16,
    /// As librdkafka names it, e.g. "Stable", "Empty", "PreparingRebalance",
    /// "CompletingRebalance", "Dead", "Reconciling"/"Assigning" (KIP-848; compare
    /// case-insensitively).
    pub state: String,
    /// The group protocol: "Classic" or "Consumer".
    pub protocol_type: String,
    /// Assignor name, e.g. "cooperative-sticky" (classic) or "uniform" (KIP-848, broker-side).
    pub protocol: String,
    pub members: usize,
    pub member_ids: Vec<String>,
    pub client_ids: Vec<String>,
}

impl GroupDesc {
    pub fn is_stable(&self) -> bool {
        self.error_code == 0 && self.state.eq_ignore_ascii_case("stable")
    }
}

/// `rd_kafka_DescribeConsumerGroups` for one group (rust-rdkafka does not wrap it).
fn describe_consumer_group(
    admin: &AdminClient<DefaultClientContext>,
    group: &str,
) -> Result<GroupDesc, String> {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, CString};
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: librdkafka returns NUL-terminated strings valid while the event lives.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let name = CString::new(group).map_err(|e| e.to_string())?;
    let rk = admin.inner().native_ptr();
    // SAFETY: every pointer passed is valid for the call; the result event is read before it is
    // destroyed, and every object created here is destroyed on every path.
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
        );
        let mut groups = [name.as_ptr()];
        rd::rd_kafka_DescribeConsumerGroups(rk, groups.as_mut_ptr(), 1, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, 10_000);
        let result = if event.is_null() {
            Err("DescribeConsumerGroups: no answer in 10 s".to_string())
        } else if rd::rd_kafka_event_error(event) as i32 != 0 {
            Err(text(rd::rd_kafka_event_error_string(event)))
        } else {
            let res = rd::rd_kafka_event_DescribeConsumerGroups_result(event);
            let mut n = 0usize;
            let descs = rd::rd_kafka_DescribeConsumerGroups_result_groups(res, &mut n);
            if n == 0 {
                Err("DescribeConsumerGroups: empty result".to_string())
            } else {
                let d = *descs;
                let err = rd::rd_kafka_ConsumerGroupDescription_error(d);
                if !err.is_null()
                    && rd::rd_kafka_error_code(err)
                        == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_GROUP_ID_NOT_FOUND
                {
                    Ok(GroupDesc {
                        error_code: 0,
                        state: "Dead".into(),
                        protocol_type: String::new(),
                        protocol: String::new(),
                        members: 0,
                        member_ids: vec![],
                        client_ids: vec![],
                    })
                } else if !err.is_null() {
                    Err(text(rd::rd_kafka_error_string(err)))
                } else {
                    let members = rd::rd_kafka_ConsumerGroupDescription_member_count(d);
                    let member = |i| rd::rd_kafka_ConsumerGroupDescription_member(d, i);
                    Ok(GroupDesc {
                        error_code: 0,
                        state: text(rd::rd_kafka_consumer_group_state_name(
                            rd::rd_kafka_ConsumerGroupDescription_state(d),
                        )),
                        protocol_type: text(rd::rd_kafka_consumer_group_type_name(
                            rd::rd_kafka_ConsumerGroupDescription_type(d),
                        )),
                        protocol: text(rd::rd_kafka_ConsumerGroupDescription_partition_assignor(d)),
                        members,
                        member_ids: (0..members)
                            .map(|i| text(rd::rd_kafka_MemberDescription_consumer_id(member(i))))
                            .collect(),
                        client_ids: (0..members)
                            .map(|i| text(rd::rd_kafka_MemberDescription_client_id(member(i))))
                            .collect(),
                    })
                }
            }
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_queue_destroy(queue);
        result
    }
}

#[derive(Default)]
struct Batch {
    ok: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<Vec<String>>,
    next_offsets: Mutex<HashMap<i32, i64>>,
}

/// Producer context that accounts delivery reports per produce call.
struct DeliveryCtx;

impl ClientContext for DeliveryCtx {}

impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = Arc<Batch>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Arc<Batch>) {
        match result {
            Ok(m) => {
                let mut next = batch.next_offsets.lock().unwrap();
                let e = next.entry(m.partition()).or_insert(0);
                *e = (*e).max(m.offset() + 1);
                drop(next);
                batch.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, m)) => {
                let mut errs = batch.errors.lock().unwrap();
                if errs.len() < 10 {
                    errs.push(format!("{e} (partition {})", m.partition()));
                }
                drop(errs);
                batch.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The `SASL_SSL` listener of a test broker: SCRAM-SHA-512 over TLS with a throwaway CA.
#[derive(Debug, Clone)]
pub struct SecureListener {
    /// `127.0.0.1:PORT` of the SASL_SSL listener.
    pub bootstrap: String,
    /// PEM of the CA that signed the broker's certificate (`ssl.ca.location`).
    pub ca_pem: PathBuf,
    /// PEM of an unrelated CA: a client that trusts only it must fail the handshake.
    pub untrusted_ca_pem: PathBuf,
    pub username: String,
    /// Random per broker, so tests can grep logs for it.
    pub password: String,
}

struct Running {
    kafka: Option<kafka::KafkaProcess>,
    child: Option<Child>,
}

/// An Apache Kafka 4 broker (single-node KRaft, see [`kafka`]) on free loopback ports, with a
/// `PLAINTEXT` listener ([`Broker::bootstrap`]) and a `SASL_SSL` one ([`Broker::secure`]).
pub struct Broker {
    /// `127.0.0.1:PORT` of the PLAINTEXT listener, for `bootstrap.servers` / `KEYFLOW_BROKERS`.
    pub bootstrap: String,
    pub port: u16,
    pub secure: SecureListener,
    running: Mutex<Running>,
    log_dir: PathBuf,
    admin: OnceLock<AdminClient<DefaultClientContext>>,
    producer: OnceLock<BaseProducer<DeliveryCtx>>,
}

pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free loopback ports. The listeners are held until all are chosen: dropping
/// each before binding the next let the kernel hand out the same port twice (a broker then
/// refused `PLAINTEXT://127.0.0.1:P,CONTROLLER://127.0.0.1:P` in CI).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [TcpListener; N] = std::array::from_fn(|_| {
        TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"))
    });
    listeners.map(|l| l.local_addr().unwrap().port())
}

/// How long a broker may take to start on a busy 2-core machine.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(90);

impl Broker {
    /// Installs (first use) and starts Apache Kafka, and waits until it answers a metadata
    /// request. Panics with the broker log on failure.
    pub fn start() -> Broker {
        let started = Instant::now();
        let kafka = kafka::KafkaProcess::prepare();
        let prepared = started.elapsed();
        let broker = Broker {
            bootstrap: format!("127.0.0.1:{}", kafka.port),
            port: kafka.port,
            secure: SecureListener {
                bootstrap: format!("127.0.0.1:{}", kafka.sasl_port),
                ca_pem: kafka.tls.ca_pem.clone(),
                untrusted_ca_pem: kafka.tls.untrusted_ca_pem.clone(),
                username: kafka::SCRAM_USER.to_string(),
                password: kafka.scram_password.clone(),
            },
            log_dir: kafka.dir.path().to_path_buf(),
            running: Mutex::new(Running {
                kafka: Some(kafka),
                child: None,
            }),
            admin: OnceLock::new(),
            producer: OnceLock::new(),
        };
        broker.restart();
        eprintln!(
            "[support] Apache Kafka {} ready on {} (SASL_SSL {}) in {:.1?} ({:.1?} of it \
             certificates and format) (log: {})",
            kafka::KAFKA_VERSION,
            broker.bootstrap,
            broker.secure.bootstrap,
            started.elapsed(),
            prepared,
            broker.log_path().display()
        );
        broker
    }

    /// Starts the (stopped) broker again on the same ports and data, and waits until it serves
    /// metadata. Used by [`Broker::start`] and by outage tests after [`Broker::stop`].
    pub fn restart(&self) {
        let started = Instant::now();
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        assert!(running.child.is_none(), "restart() of a running broker");
        let kafka = running.kafka.as_mut().expect("broker state");
        let mut child = kafka.spawn();
        let listening = kafka.wait_listening(&mut child, started + BROKER_START_TIMEOUT);
        running.child = Some(child);
        drop(running);
        let ready = listening.and_then(|()| self.wait_metadata(started + BROKER_START_TIMEOUT));
        if let Err(e) = ready {
            panic!(
                "Apache Kafka did not become ready in {:.0?}: {e}\n--- broker log ({}) ---\n{}",
                started.elapsed(),
                self.log_path().display(),
                self.log_tail(40)
            );
        }
    }

    /// Stops the broker (SIGTERM, a controlled shutdown; SIGKILL after 30 s) and keeps its data,
    /// for outage tests; [`Broker::restart`] brings it back.
    pub fn stop(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = running.child.take() {
            terminate(&mut child, Duration::from_secs(30));
        }
    }

    fn wait_metadata(&self, deadline: Instant) -> Result<(), String> {
        loop {
            if let Some(status) = self.exit_status() {
                return Err(format!("kafka exited early with {status}"));
            }
            let last = match self
                .admin()
                .inner()
                .fetch_metadata(None, Duration::from_secs(2))
            {
                Ok(md) if !md.brokers().is_empty() => return Ok(()),
                Ok(_) => "metadata lists no brokers".to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!("metadata request never succeeded: {last}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.child.as_mut()?.try_wait().ok().flatten()
    }

    /// One broker shared by all tests of this test binary (never stopped; it
    /// dies with the process). Use unique topic and group names with it.
    pub fn shared() -> &'static Broker {
        static SHARED: OnceLock<Broker> = OnceLock::new();
        SHARED.get_or_init(Broker::start)
    }

    /// The broker's process id (0 while stopped).
    pub fn pid(&self) -> u32 {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.child.as_ref().map_or(0, Child::id)
    }

    /// The log of the broker's current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .kafka
            .as_ref()
            .map_or_else(|| self.log_dir.join("kafka-1.log"), |k| k.log_path())
    }

    pub fn log_tail(&self, n_lines: usize) -> String {
        file_tail(&self.log_path(), n_lines)
    }

    /// A `ClientConfig` for the SASL_SSL listener with the right CA and credentials.
    pub fn secure_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.secure.bootstrap)
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", &self.secure.username)
            .set("sasl.password", &self.secure.password)
            .set("ssl.ca.location", self.secure.ca_pem.to_str().unwrap());
        c
    }

    /// A `ClientConfig` with `bootstrap.servers` set.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    /// The broker's (lazily created) admin client.
    pub fn admin(&self) -> &AdminClient<DefaultClientContext> {
        self.admin.get_or_init(|| {
            self.client_config()
                .create()
                .unwrap_or_else(|e| panic!("cannot create AdminClient: {e}"))
        })
    }

    /// Creates `name` with `partitions` partitions (replication 1) and waits
    /// until metadata shows it. An existing topic is accepted.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        let results = self
            .admin()
            .create_topics([&topic], &opts)
            .await
            .unwrap_or_else(|e| panic!("create_topics({name}) failed: {e}"));
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => panic!("creating topic {t} failed: {code:?} ({code})"),
            }
        }
        // Kafka answers CreateTopics before every partition's leader is known to metadata.
        let mut last = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            last = self.try_partition_count(name).unwrap_or(0);
            if last >= partitions as usize {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("topic {name} created but metadata shows {last} of {partitions} partitions");
    }

    /// Blocking [`Broker::create_topic`] (works inside or outside a runtime
    /// thread; the admin client's own thread drives the request).
    pub fn create_topic_blocking(&self, name: &str, partitions: i32) {
        futures::executor::block_on(self.create_topic(name, partitions))
    }

    fn try_partition_count(&self, topic: &str) -> Option<usize> {
        let md = self
            .admin()
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(2))
            .ok()?;
        let t = md.topics().iter().find(|t| t.name() == topic)?;
        // A partition without a leader yet cannot be written: not ready.
        if t.error().is_some()
            || t.partitions().is_empty()
            || t.partitions().iter().any(|p| p.leader() < 0)
        {
            return None;
        }
        Some(t.partitions().len())
    }

    /// Number of partitions of `topic`, waiting up to `timeout` for it to exist.
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            if let Some(n) = self.try_partition_count(topic) {
                return n;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "topic {topic} does not exist on {} after {timeout:?}",
                    self.bootstrap
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether metadata currently lists `topic`.
    pub fn topic_exists(&self, topic: &str) -> bool {
        self.try_partition_count(topic).is_some()
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("batch.num.messages", "10000")
            .set("message.timeout.ms", "60000");
        c
    }

    /// A new idempotent `FutureProducer` (linger 5 ms, large queue).
    pub fn producer(&self) -> FutureProducer {
        self.producer_config()
            .create()
            .unwrap_or_else(|e| panic!("cannot create FutureProducer: {e}"))
    }

    fn base_producer(&self) -> &BaseProducer<DeliveryCtx> {
        self.producer.get_or_init(|| {
            self.producer_config()
                .create_with_context(DeliveryCtx)
                .unwrap_or_else(|e| panic!("cannot create BaseProducer: {e}"))
        })
    }

    /// Produces `(key, payload)` messages (key-hash partitioning), waiting for
    /// every delivery report; panics on any delivery error.
    pub fn produce_keyed(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = (Option<Vec<u8>>, Vec<u8>)>,
    ) -> Produced {
        self.produce(
            topic,
            messages.into_iter().map(|(key, payload)| OutMsg {
                key,
                payload,
                ..OutMsg::default()
            }),
        )
    }

    /// Produces `(partition, key, payload)` messages to explicit partitions.
    pub fn produce_to_partition(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = (i32, Option<Vec<u8>>, Vec<u8>)>,
    ) -> Produced {
        self.produce(
            topic,
            messages
                .into_iter()
                .map(|(partition, key, payload)| OutMsg {
                    partition: Some(partition),
                    key,
                    payload,
                    ..OutMsg::default()
                }),
        )
    }

    /// General produce (optional partition, key, headers); waits for every
    /// delivery report and panics on any delivery error.
    pub fn produce(&self, topic: &str, messages: impl IntoIterator<Item = OutMsg>) -> Produced {
        self.produce_on(self.base_producer(), topic, messages)
    }

    /// [`Self::produce`] with record batches of at most `batch_bytes` (`batch.size`), from a
    /// producer of its own: what a consumer fetches comes in whole batches, so a benchmark's
    /// preload fixes their size rather than leave it to how busy the machine was.
    pub fn produce_in_batches_of(
        &self,
        batch_bytes: usize,
        topic: &str,
        messages: impl IntoIterator<Item = OutMsg>,
    ) -> Produced {
        let producer: BaseProducer<DeliveryCtx> = self
            .producer_config()
            .set("batch.size", batch_bytes.to_string())
            .create_with_context(DeliveryCtx)
            .unwrap_or_else(|e| panic!("cannot create BaseProducer: {e}"));
        self.produce_on(&producer, topic, messages)
    }

    fn produce_on(
        &self,
        producer: &BaseProducer<DeliveryCtx>,
        topic: &str,
        messages: impl IntoIterator<Item = OutMsg>,
    ) -> Produced {
        let batch = Arc::new(Batch::default());
        let mut sent = 0usize;
        for m in messages {
            let mut record: BaseRecord<'_, [u8], [u8], Arc<Batch>> =
                BaseRecord::with_opaque_to(topic, batch.clone()).payload(&m.payload[..]);
            if let Some(key) = &m.key {
                record = record.key(&key[..]);
            }
            if let Some(p) = m.partition {
                record = record.partition(p);
            }
            if !m.headers.is_empty() {
                let mut h = OwnedHeaders::new_with_capacity(m.headers.len());
                for (k, v) in &m.headers {
                    h = h.insert(Header {
                        key: k.as_str(),
                        value: Some(&v[..]),
                    });
                }
                record = record.headers(h);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        producer.poll(Duration::from_millis(5));
                    }
                    Err((e, _)) => panic!("producing to {topic} failed: {e}"),
                }
            }
            sent += 1;
            if sent % 1024 == 0 {
                producer.poll(Duration::ZERO);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done = batch.ok.load(Ordering::Relaxed) + batch.failed.load(Ordering::Relaxed);
            if done >= sent {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "producing to {topic}: only {done} of {sent} delivery reports after 120s \
                     (broker log: {})",
                    self.log_path().display()
                );
            }
            producer.poll(Duration::from_millis(20));
        }
        let failed = batch.failed.load(Ordering::Relaxed);
        if failed > 0 {
            panic!(
                "producing to {topic}: {failed} of {sent} messages failed, e.g. {:?}",
                batch.errors.lock().unwrap()
            );
        }
        let next_offsets = batch
            .next_offsets
            .lock()
            .unwrap()
            .clone()
            .into_iter()
            .collect();
        Produced {
            count: sent,
            next_offsets,
        }
    }

    /// A `BaseConsumer` with `group.id = group`, auto-commit off, earliest reset,
    /// session.timeout.ms 6000 (a killed test member is noticed within seconds).
    pub fn group_consumer(&self, group: &str) -> BaseConsumer {
        self.client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("enable.partition.eof", "false")
            .create()
            .unwrap_or_else(|e| panic!("cannot create consumer for group {group}: {e}"))
    }

    /// Reads `topic` from the beginning (assign, no group join) until at least
    /// `expected` messages arrived, then for another 1 s of quiet so extra
    /// duplicates show up. Panics on timeout with the count seen.
    pub fn consume_all(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<ConsumedMsg> {
        self.consume_all_with_quiet(topic, expected, timeout, Duration::from_secs(1))
    }

    /// [`Broker::consume_all`] with an explicit quiet period.
    pub fn consume_all_with_quiet(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
        quiet: Duration,
    ) -> Vec<ConsumedMsg> {
        self.consume_all_isolated(topic, expected, timeout, quiet, "read_committed")
    }

    /// [`Broker::consume_all_with_quiet`] with the reader's `isolation.level`
    /// (`read_committed`, librdkafka's default, or `read_uncommitted`: aborted records too).
    pub fn consume_all_isolated(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
        quiet: Duration,
        isolation: &str,
    ) -> Vec<ConsumedMsg> {
        let start = Instant::now();
        let partitions = self.partition_count(topic, timeout) as i32;
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", unique("support-consume-all"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .set("isolation.level", isolation)
            .create()
            .unwrap_or_else(|e| panic!("cannot create consumer: {e}"));
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer
            .assign(&tpl)
            .unwrap_or_else(|e| panic!("cannot assign {topic}: {e}"));
        let mut out = Vec::with_capacity(expected);
        let mut errors: Vec<String> = Vec::new();
        let mut last_progress = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    out.push(ConsumedMsg {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        headers: m
                            .headers()
                            .map(|hs| {
                                hs.iter()
                                    .map(|h| {
                                        (h.key.to_string(), h.value.unwrap_or_default().to_vec())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                    last_progress = Instant::now();
                    continue;
                }
                Some(Err(e)) if errors.len() < 10 => errors.push(e.to_string()),
                Some(Err(_)) | None => {}
            }
            if out.len() >= expected
                && (last_progress.elapsed() >= quiet || start.elapsed() >= timeout)
            {
                return out;
            }
            if start.elapsed() >= timeout {
                let mut per_partition = BTreeMap::new();
                for m in &out {
                    *per_partition.entry(m.partition).or_insert(0usize) += 1;
                }
                panic!(
                    "consume_all({topic}): saw {} messages, expected at least {expected}, \
                     after {timeout:?}; per partition: {per_partition:?}; consumer errors: \
                     {errors:?}",
                    out.len()
                );
            }
        }
    }

    /// High watermarks per partition.
    pub fn high_watermarks(&self, topic: &str) -> Vec<i64> {
        let partitions = self.partition_count(topic, Duration::from_secs(10)) as i32;
        let consumer = self.group_consumer(&unique("support-watermarks"));
        (0..partitions)
            .map(|p| {
                // A leader change (a broker just started, a topic just created) answers
                // NotLeaderForPartition until metadata is refreshed: retry those for a while.
                let start = Instant::now();
                loop {
                    match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                        Ok((_, high)) => break high,
                        Err(e) if start.elapsed() < Duration::from_secs(20) => {
                            eprintln!(
                                "[support] fetch_watermarks({topic}/{p}) retrying after: {e}"
                            );
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        Err(e) => panic!("fetch_watermarks({topic}/{p}): {e}"),
                    }
                }
            })
            .collect()
    }

    /// Number of messages in `topic`, by reading it all (watermarks are only
    /// used as a lower bound).
    pub fn count_messages(&self, topic: &str) -> usize {
        let lower: i64 = self.high_watermarks(topic).iter().sum();
        self.consume_all(topic, lower.max(0) as usize, Duration::from_secs(60))
            .len()
    }

    /// Committed offsets of `group` for partitions `0..partitions` of `topic`;
    /// -1 where nothing is committed.
    pub fn committed_offsets(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer = self.group_consumer(group);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Invalid).unwrap();
        }
        let start = Instant::now();
        loop {
            match consumer.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
                Ok(res) => {
                    let mut out = vec![-1; partitions as usize];
                    for e in res.elements_for_topic(topic) {
                        if let Offset::Offset(o) = e.offset() {
                            if let Some(slot) = out.get_mut(e.partition() as usize) {
                                *slot = o;
                            }
                        }
                    }
                    return out;
                }
                Err(e) if start.elapsed() < Duration::from_secs(20) => {
                    eprintln!("[support] committed_offsets({group}) retrying after: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("committed_offsets({group}, {topic}) failed: {e}"),
            }
        }
    }

    /// Commits `(partition, next_offset)` pairs for `group` without joining it
    /// (only valid while the group has no active members).
    pub fn commit_offsets(&self, group: &str, topic: &str, offsets: &[(i32, i64)]) {
        let consumer = self.group_consumer(group);
        let mut tpl = TopicPartitionList::new();
        for &(p, o) in offsets {
            tpl.add_partition_offset(topic, p, Offset::Offset(o))
                .unwrap();
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .unwrap_or_else(|e| panic!("commit_offsets({group}, {topic}) failed: {e}"));
    }

    /// Commits `(partition, next_offset, metadata)` for `group` without joining it, as another
    /// program (or a tool) would.
    pub fn commit_offsets_with_metadata(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(i32, i64, &str)],
    ) {
        let consumer = self.group_consumer(group);
        let mut tpl = TopicPartitionList::new();
        for &(p, o, m) in offsets {
            tpl.add_partition_offset(topic, p, Offset::Offset(o))
                .unwrap();
            tpl.find_partition(topic, p).unwrap().set_metadata(m);
        }
        consumer.commit(&tpl, CommitMode::Sync).unwrap_or_else(|e| {
            panic!("commit_offsets_with_metadata({group}, {topic}) failed: {e}")
        });
    }

    /// The group as the broker describes it, under either group protocol: librdkafka's
    /// DescribeConsumerGroups admin call (ConsumerGroupDescribe for KIP-848 groups, whose classic
    /// DescribeGroups answer is "not found"; DescribeGroups for classic ones). An unknown group
    /// reports state "Dead" with no members.
    pub fn describe_group(&self, group: &str) -> GroupDesc {
        // A client of its own, destroyed after the call: librdkafka 2.12 aborted a soak
        // (`rd_kafka_enq_once_del_source_return: eonce->refcnt > 0`, its coordinator-request
        // code) when the broker went down long after the shared admin client had described a
        // group.
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .unwrap_or_else(|e| panic!("cannot create AdminClient: {e}"));
        let mut last = String::new();
        for _ in 0..5 {
            match describe_consumer_group(&admin, group) {
                Ok(desc) => return desc,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("describe_group({group}) failed: {last}");
    }

    /// Waits until `group` is Stable with exactly `members` members, e.g.
    /// before SIGTERMing a member, so that the test measures one rebalance at a time.
    pub fn wait_group_stable(&self, group: &str, members: usize, timeout: Duration) -> GroupDesc {
        self.wait_group(
            group,
            timeout,
            &format!("Stable with {members} members"),
            |g| g.is_stable() && g.members == members,
        )
    }

    /// Polls [`Broker::describe_group`] every 100 ms until `pred` holds;
    /// panics naming `what` and the last description on timeout.
    pub fn wait_group(
        &self,
        group: &str,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&GroupDesc) -> bool,
    ) -> GroupDesc {
        let start = Instant::now();
        loop {
            let last = self.describe_group(group);
            if pred(&last) {
                return last;
            }
            if start.elapsed() >= timeout {
                panic!("group {group} not {what} after {timeout:?}; last DescribeGroups: {last:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Clients first, while the broker can still answer them.
        drop(self.producer.take());
        drop(self.admin.take());
        self.stop();
        let running = self.running.get_mut().unwrap_or_else(|e| e.into_inner());
        if std::thread::panicking() {
            if let Some(kafka) = running.kafka.take() {
                let kept = kafka.dir.keep();
                eprintln!(
                    "[support] test failed; Kafka logs kept in {} — last lines:\n{}",
                    kept.display(),
                    file_tail(&kept.join("kafka-1.log"), 20)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// keyflow process
// ---------------------------------------------------------------------------

/// The `keyflow` binary running as a child process, output in a log file.
pub struct Keyflow {
    child: Child,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    log_path: PathBuf,
    pipeline_paths: Vec<PathBuf>,
    status: Option<ExitStatus>,
}

impl Keyflow {
    /// Path of the keyflow binary under test.
    pub fn bin() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_keyflow"))
    }

    /// `keyflow run <file>` with the pipeline text written to a temp file and
    /// `KEYFLOW_BROKERS=bootstrap`.
    pub fn start(bootstrap: &str, pipeline_toml: &str) -> Keyflow {
        Self::start_many(bootstrap, &[pipeline_toml], &[])
    }

    /// `keyflow run <file>...` with one file per pipeline text and extra env.
    pub fn start_many(bootstrap: &str, pipelines: &[&str], env: &[(&str, &str)]) -> Keyflow {
        let dir = temp_dir("keyflow-run-");
        let mut paths = Vec::new();
        for (i, text) in pipelines.iter().enumerate() {
            let p = dir.path().join(format!("pipeline-{i}.toml"));
            fs::write(&p, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
            paths.push(p);
        }
        let mut args: Vec<OsString> = vec!["run".into()];
        args.extend(paths.iter().map(|p| p.clone().into_os_string()));
        let mut all_env = vec![("KEYFLOW_BROKERS", bootstrap)];
        all_env.extend_from_slice(env);
        let mut k = Self::spawn(dir, &args, &all_env);
        k.pipeline_paths = paths;
        k
    }

    /// `keyflow <args>` (e.g. `validate PATH`, `demo --duration 10s`) with extra env.
    pub fn start_with_args(args: &[&str], env: &[(&str, &str)]) -> Keyflow {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        Self::spawn(temp_dir("keyflow-cmd-"), &args, env)
    }

    fn spawn(dir: TempDir, args: &[OsString], env: &[(&str, &str)]) -> Keyflow {
        let log_path = dir.path().join("keyflow.log");
        let (out, err) = log_stdio(&log_path);
        let mut cmd = Command::new(Self::bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "RUST_LOG",
                std::env::var("KEYFLOW_TEST_RUST_LOG")
                    .unwrap_or_else(|_| "info,keyflow=debug".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            // Several keyflow processes run at once: each serves /metrics on an ephemeral port
            // unless the test names one (the `env` argument wins).
            .env("KEYFLOW_HTTP__ADDRESS", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = spawn_tied(cmd)
            .unwrap_or_else(|e| panic!("cannot start {} {args:?}: {e}", Self::bin().display()));
        Keyflow {
            child,
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
            log_path,
            pipeline_paths: Vec::new(),
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir holding the pipeline files and the log.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn pipeline_paths(&self) -> &[PathBuf] {
        &self.pipeline_paths
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whole captured output (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    pub fn log_tail(&self, n_lines: usize) -> String {
        file_tail(&self.log_path, n_lines)
    }

    /// Waits until the captured output contains `needle`; panics with the log
    /// tail on timeout or if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self.try_status() {
                if self.log().contains(needle) {
                    return;
                }
                panic!(
                    "keyflow exited ({status}) before logging {needle:?}; log tail:\n{}",
                    self.log_tail(LOG_TAIL_ON_PANIC)
                );
            }
            if start.elapsed() >= timeout {
                panic!(
                    "keyflow did not log {needle:?} within {timeout:?}; log tail:\n{}",
                    self.log_tail(LOG_TAIL_ON_PANIC)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `sig` (e.g. `libc::SIGINT`) unless the process was already reaped.
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            send_signal(self.pid(), sig);
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Waits for the process to exit; panics with the log tail on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "keyflow (pid {}) did not exit within {timeout:?}; log tail:\n{}",
                    self.pid(),
                    self.log_tail(LOG_TAIL_ON_PANIC)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Current VmRSS in KiB (panics if the process is gone).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// VmHWM in KiB (panics if the process is gone).
    pub fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(self.pid())
    }
}

impl Drop for Keyflow {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "[support] test failed; keyflow files kept at {} — log tail:\n{}",
                    kept.display(),
                    self.log_tail(LOG_TAIL_ON_PANIC)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// in-process pipelines
// ---------------------------------------------------------------------------

/// In-process keyflow logs, when asked for: `KEYFLOW_TEST_RUST_LOG=keyflow=debug cargo test …`.
pub fn init_test_logs() {
    if let Ok(f) = std::env::var("KEYFLOW_TEST_RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
}

/// Loads a pipeline written inline (as a file would be), against `brokers`, with the in-process
/// logs of [`init_test_logs`].
pub fn inline_config(brokers: &str, toml: &str) -> keyflow::config::Config {
    use keyflow::config::{self, Env, Global};
    init_test_logs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, toml).unwrap();
    let global = Global {
        brokers: brokers.to_string(),
        ..Global::default()
    };
    let spec =
        config::load_pipeline(&path, &global, &Env::default()).unwrap_or_else(|e| panic!("{e}"));
    config::Config {
        global,
        pipelines: vec![spec],
    }
}

/// The head of a test pipeline file: short session and drain, frequent commits.
pub fn pipeline_header(topic: &str, group: &str, extra: &str) -> String {
    format!(
        r#"
topic = "{topic}"
group_id = "{group}"
auto_offset_reset = "earliest"
session_timeout = "4s"
drain_timeout = "3s"
commit_interval = "200ms"
{extra}
"#
    )
}

/// The value of one sample in Prometheus text format: `name{…}` with all of `labels`.
pub fn prometheus_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
pub mod postgres;
