//! Apache Kafka 4 for the tests: installed from Maven Central on first use, run as a
//! single-node KRaft process (combined broker + controller) on free loopback ports.
//!
//! * [`kafka_libs`] fetches `org.apache.kafka:kafka_2.13:`[`KAFKA_VERSION`] and its runtime
//!   dependencies with Maven into `<cache>/kafka-<version>/libs` once (~45 MB; `mvn` and Java 17+
//!   are needed: on Debian `apt-get install maven openjdk-17-jre-headless`, done by
//!   [`super::ensure_command`] when missing). `KEYFLOW_KAFKA_LIBS=/dir` uses a directory of jars
//!   instead.
//! * [`Tls`] generates a throwaway CA, a broker certificate for `localhost`/`127.0.0.1`, and a
//!   second, unrelated CA (for "untrusted CA" tests), with `openssl`.
//! * [`KafkaProcess`] writes `server.properties`, formats the store (with a SCRAM-SHA-512 user),
//!   starts `kafka.Kafka`, and can stop and start again on the same ports and data.
//!
//! Listeners: `PLAINTEXT` (tests and benchmarks), `SASL_SSL` with SCRAM-SHA-512 (security tests),
//! `CONTROLLER` (KRaft, internal).

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{cache_dir, free_ports, log_stdio, spawn_tied, temp_dir, unique};
use tempfile::TempDir;

/// The Apache Kafka release every test, benchmark and end-to-end run uses.
pub const KAFKA_VERSION: &str = "4.1.1";

/// The SCRAM-SHA-512 user created at format time on the `SASL_SSL` listener.
pub const SCRAM_USER: &str = "keyflow-test";

/// Broker settings that make tests fast and honest. Each one is explained; everything else is
/// Apache Kafka's default, as users run it.
pub const TEST_BROKER_SETTINGS: &[(&str, &str, &str)] = &[
    (
        "group.initial.rebalance.delay.ms",
        "0",
        "a classic group's first rebalance starts at once instead of waiting 3 s for more members",
    ),
    (
        "offsets.topic.replication.factor",
        "1",
        "single node: the default 3 would make every group coordinator request fail",
    ),
    (
        "offsets.topic.num.partitions",
        "8",
        "__consumer_offsets is created on first group use; 50 partitions take seconds on 2 cores",
    ),
    (
        "transaction.state.log.replication.factor",
        "1",
        "single node (transactions would fail with the default 3)",
    ),
    ("transaction.state.log.min.isr", "1", "single node"),
    (
        "transaction.state.log.num.partitions",
        "4",
        "faster first transaction on 2 cores",
    ),
    (
        "share.coordinator.state.topic.replication.factor",
        "1",
        "single node",
    ),
    ("share.coordinator.state.topic.min.isr", "1", "single node"),
    (
        "group.min.session.timeout.ms",
        "3000",
        "classic groups: the tests' 4 s sessions (a killed member's partitions move sooner) are \
         below the default minimum of 6 s, which the broker refuses with INVALID_SESSION_TIMEOUT",
    ),
    (
        "group.consumer.min.session.timeout.ms",
        "3000",
        "KIP-848 groups: allow the short session timeouts tests use (default minimum 45 s)",
    ),
    (
        "group.consumer.session.timeout.ms",
        "6000",
        "KIP-848 groups: a killed member's partitions move after 6 s, like the classic tests' \
         session.timeout.ms",
    ),
    (
        "group.consumer.min.heartbeat.interval.ms",
        "500",
        "KIP-848 groups: allow a heartbeat well inside the short session",
    ),
    (
        "group.consumer.heartbeat.interval.ms",
        "1000",
        "KIP-848 groups: members learn of a new assignment within ~1 s (default 5 s)",
    ),
    (
        "num.network.threads",
        "2",
        "2-core machines: fewer idle threads",
    ),
    ("num.io.threads", "4", "2-core machines: fewer idle threads"),
    (
        "num.partitions",
        "1",
        "auto-created topics (a producer's first write) get one partition, as by default",
    ),
];

// ---------------------------------------------------------------------------
// installation
// ---------------------------------------------------------------------------

/// Directory of the broker's jars, fetched on first use (see module docs).
pub fn kafka_libs() -> PathBuf {
    static LIBS: OnceLock<PathBuf> = OnceLock::new();
    LIBS.get_or_init(install_kafka).clone()
}

fn install_kafka() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYFLOW_KAFKA_LIBS").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join(format!("kafka_2.13-{KAFKA_VERSION}.jar"))
                .is_file(),
            "KEYFLOW_KAFKA_LIBS={} holds no kafka_2.13-{KAFKA_VERSION}.jar",
            dir.display()
        );
        return dir;
    }
    let home = cache_dir().join(format!("kafka-{KAFKA_VERSION}"));
    let libs = home.join("libs");
    if libs
        .join(format!("kafka_2.13-{KAFKA_VERSION}.jar"))
        .is_file()
    {
        return libs;
    }
    super::ensure_command("java", "openjdk-17-jre-headless");
    super::ensure_command("mvn", "maven");
    fs::create_dir_all(&home).unwrap_or_else(|e| panic!("cannot create {}: {e}", home.display()));
    let started = Instant::now();
    let tmp = home.join(unique("libs.tmp"));
    let pom = home.join("pom.xml");
    fs::write(
        &pom,
        format!(
            r#"<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>keyflow.test</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId><version>1.7.36</version></dependency>
  </dependencies>
</project>
"#
        ),
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", pom.display()));
    eprintln!(
        "[support] fetching Apache Kafka {KAFKA_VERSION} from Maven Central into {}",
        libs.display()
    );
    super::run_checked(
        Command::new("mvn")
            .args(["-q", "-B", "-f"])
            .arg(&pom)
            .arg("dependency:copy-dependencies")
            .arg(format!("-DoutputDirectory={}", tmp.display()))
            .arg("-DincludeScope=runtime"),
        &format!("fetching org.apache.kafka:kafka_2.13:{KAFKA_VERSION} with Maven"),
    );
    // Atomic publish: a concurrent installer may win the race; then use its copy.
    if let Err(e) = fs::rename(&tmp, &libs) {
        let _ = fs::remove_dir_all(&tmp);
        assert!(
            libs.is_dir(),
            "cannot move the Kafka jars into {}: {e}",
            libs.display()
        );
    }
    eprintln!(
        "[support] Apache Kafka {KAFKA_VERSION} fetched in {:.1?}",
        started.elapsed()
    );
    libs
}

// ---------------------------------------------------------------------------
// certificates
// ---------------------------------------------------------------------------

/// Throwaway TLS material for one broker, in its own directory.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA that signed the broker certificate (give it to clients as `ssl.ca.location`).
    pub ca_pem: PathBuf,
    /// A CA that signed nothing the broker shows: a client trusting only it must fail.
    pub untrusted_ca_pem: PathBuf,
    /// The broker's private key (PKCS#8) followed by its certificate, for `ssl.keystore.type=PEM`.
    keystore_pem: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    super::run_checked(
        Command::new("openssl").args(args).current_dir(dir),
        "generating test certificates with openssl",
    );
}

impl Tls {
    pub fn generate(dir: &Path) -> Tls {
        super::ensure_command("openssl", "openssl");
        let days = "3650";
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    days,
                    "-subj",
                    &format!("/CN=keyflow-test-{ca}"),
                ],
            );
        }
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "broker.key",
                "-out",
                "broker.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        fs::write(
            dir.join("broker.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "broker.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "broker.pem",
                "-days",
                days,
                "-extfile",
                "broker.ext",
            ],
        );
        openssl(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "broker.key",
                "-out",
                "broker.pk8",
            ],
        );
        let keystore = dir.join("keystore.pem");
        let mut pem = fs::read(dir.join("broker.pk8")).unwrap();
        pem.extend(fs::read(dir.join("broker.pem")).unwrap());
        fs::write(&keystore, pem).unwrap();
        Tls {
            ca_pem: dir.join("ca.pem"),
            untrusted_ca_pem: dir.join("other-ca.pem"),
            keystore_pem: keystore,
        }
    }
}

// ---------------------------------------------------------------------------
// the broker process
// ---------------------------------------------------------------------------

/// The ports, files and credentials of one single-node Kafka; survives stop/start.
pub struct KafkaProcess {
    pub port: u16,
    pub sasl_port: u16,
    pub controller_port: u16,
    pub scram_password: String,
    pub tls: Tls,
    pub dir: TempDir,
    properties: PathBuf,
    starts: u32,
}

impl KafkaProcess {
    /// Writes the configuration and formats a fresh store. Ports are chosen now and kept.
    pub fn prepare() -> KafkaProcess {
        let libs = kafka_libs();
        let dir = temp_dir("keyflow-kafka-");
        let tls = Tls::generate(dir.path());
        let [port, sasl_port, controller_port] = free_ports();
        // Random per broker, so a test can grep every log for it.
        let scram_password = format!("pw-{}", unique("scram").replace(['-', '.'], ""));
        let data = dir.path().join("data");
        let mut props = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller_port}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sasl_port},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sasl_port}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL\n\
             log.dirs={}\n\
             sasl.enabled.mechanisms=SCRAM-SHA-512\n\
             listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
             ssl.keystore.type=PEM\n\
             ssl.keystore.location={}\n",
            data.display(),
            tls.keystore_pem.display(),
        );
        for (k, v, _why) in TEST_BROKER_SETTINGS {
            props.push_str(&format!("{k}={v}\n"));
        }
        let properties = dir.path().join("server.properties");
        fs::write(&properties, props).unwrap();
        // Every broker has its own store, so one well-formed cluster id serves them all.
        let cluster_id = "MkU3OEVBNTcwNTJENDM2Qk";
        let log = dir.path().join("format.log");
        let (out, err) = log_stdio(&log);
        let status = Command::new("java")
            .args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"])
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .arg("kafka.tools.StorageTool")
            .args(["format", "-t", cluster_id, "-c"])
            .arg(&properties)
            .arg("--add-scram")
            .arg(format!(
                "SCRAM-SHA-512=[name={SCRAM_USER},password={scram_password}]"
            ))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .unwrap_or_else(|e| panic!("cannot run java (kafka StorageTool): {e}"));
        assert!(
            status.success(),
            "formatting the Kafka store failed ({status}):\n{}",
            super::file_tail(&log, 30)
        );
        KafkaProcess {
            port,
            sasl_port,
            controller_port,
            scram_password,
            tls,
            dir,
            properties,
            starts: 0,
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("kafka-{}.log", self.starts.max(1)))
    }

    /// Starts the broker process (not yet ready: see [`wait_listening`]).
    pub fn spawn(&mut self) -> Child {
        self.starts += 1;
        let (out, err) = log_stdio(&self.log_path());
        let mut cmd = Command::new("java");
        // Fast start on a busy 2-core machine (measured: 12 s to listening with the default JIT
        // and G1, 4 s with these) at some cost in peak broker throughput; benchmarks that want
        // the broker's full speed set `KEYFLOW_KAFKA_JVM_OPTS` (e.g. "-XX:+UseG1GC").
        let jvm_opts = std::env::var("KEYFLOW_KAFKA_JVM_OPTS")
            .unwrap_or_else(|_| "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC".to_string());
        cmd.args(jvm_opts.split_whitespace());
        cmd.args([
            "-Xms256m",
            "-Xmx1g",
            "-Djava.awt.headless=true",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
        ])
        .arg("-cp")
        .arg(format!("{}/*", kafka_libs().display()))
        .arg("kafka.Kafka")
        .arg(&self.properties)
        .current_dir(self.dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot start java (kafka.Kafka): {e}"))
    }

    /// Waits until the PLAINTEXT port accepts connections (the caller then waits for metadata).
    pub fn wait_listening(&self, child: &mut Child, deadline: Instant) -> Result<(), String> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("kafka exited early with {status}"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("port {} never accepted connections", self.port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
