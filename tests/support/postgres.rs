//! A real PostgreSQL server for the `sql` processor's tests: Debian's `postgresql` package
//! (installed with apt-get when its binaries are missing), a cluster `initdb`-ed into a temp
//! dir, started on a free loopback port with its socket in that dir, stopped on drop.
//!
//! PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user the
//! package creates (its dir is chowned to it); otherwise as the current user. Clients connect
//! over TCP as the superuser `keyflow`, trusted without a password, to the database `postgres`.
//!
//! [`Postgres::stop`] and [`Postgres::start`] stop the server (fast shutdown: sessions are
//! ended, open transactions rolled back) and start it again on the same data and port.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{ensure_command, file_tail, free_port, run_checked, spawn_tied, temp_dir};

pub struct Postgres {
    dir: Option<TempDir>,
    dir_path: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// `(uid, gid)` of the `postgres` user when the tests run as root.
    run_as: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding a server.
fn find_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, b)| b)
}

fn bin_dir() -> PathBuf {
    if let Some(b) = find_bin_dir() {
        return b;
    }
    // `pg_ctlcluster` comes with the package (postgresql-common) and is on PATH.
    ensure_command("pg_ctlcluster", "postgresql");
    find_bin_dir().unwrap_or_else(|| {
        panic!("no PostgreSQL server under /usr/lib/postgresql/*/bin: apt-get install postgresql")
    })
}

fn postgres_user() -> (u32, u32) {
    let name = c"postgres";
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root, PostgreSQL needs the `postgres` user (created by Debian's postgresql package)"
    );
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

impl Postgres {
    /// initdb + start; panics (with the server's log) if it does not accept connections.
    pub fn start_new() -> Postgres {
        Self::start_with(&[])
    }

    /// Like [`Postgres::start_new`], with `(setting, value)` pairs given as `-c` options.
    pub fn start_with(settings: &[(&str, &str)]) -> Postgres {
        Self::init(settings, false)
    }

    /// Like [`Postgres::start_new`], with TLS on: a self-signed certificate for `127.0.0.1` and
    /// `localhost` (made with the `openssl` command), at [`Postgres::certificate`].
    pub fn start_tls() -> Postgres {
        Self::init(&[], true)
    }

    /// The server's self-signed certificate (PEM), when started by [`Postgres::start_tls`].
    pub fn certificate(&self) -> PathBuf {
        self.dir_path.join("server.crt")
    }

    fn init(settings: &[(&str, &str)], tls: bool) -> Postgres {
        let bin = bin_dir();
        let dir = temp_dir("keyflow-pg-");
        let run_as = (unsafe { libc::geteuid() } == 0).then(postgres_user);
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let pg = Postgres {
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
            bin,
            port: free_port(),
            run_as,
            child: Mutex::new(None),
        };
        let mut initdb = pg.command("initdb");
        initdb
            .arg("-D")
            .arg(pg.data())
            .args(["-U", "keyflow", "-A", "trust", "-E", "UTF8", "--no-locale"])
            .arg("--no-sync");
        run_checked(&mut initdb, "initdb");
        let mut conf = String::new();
        if tls {
            ensure_command("openssl", "openssl");
            let (crt, key) = (pg.certificate(), pg.dir_path.join("server.key"));
            run_checked(
                Command::new("openssl")
                    .args([
                        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    ])
                    .args(["-subj", "/CN=localhost"])
                    .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
                    .arg("-keyout")
                    .arg(&key)
                    .arg("-out")
                    .arg(&crt),
                "a certificate for postgres",
            );
            // The server refuses a key readable by others, or not its own.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = pg.run_as {
                for f in [&crt, &key] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).unwrap();
                }
            }
            conf.push_str(&format!(
                "ssl = 'on'\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                crt.display(),
                key.display()
            ));
        }
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        fs::write(pg.dir_path.join("extra.conf"), conf).unwrap();
        pg.start();
        pg
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.current_dir(&self.dir_path).stdin(Stdio::null());
        c
    }

    fn data(&self) -> PathBuf {
        self.dir_path.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir_path.join("postgres.log")
    }

    /// Starts the server (again) on the same data and port; waits until it accepts connections.
    pub fn start(&self) {
        let mut slot = self.child.lock().unwrap();
        assert!(slot.is_none(), "postgres is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir_path)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=200"]);
        let extra = fs::read_to_string(self.dir_path.join("extra.conf")).unwrap_or_default();
        for line in extra.lines() {
            if let Some((k, v)) = line.split_once(" = ") {
                cmd.arg("-c").arg(format!("{k}={}", v.trim_matches('\'')));
            }
        }
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        let child = spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot start postgres: {e}"));
        *slot = Some(child);
        drop(slot);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .command("pg_isready")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "keyflow",
                ])
                .args(["-d", "postgres", "-t", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "postgres exited with {status}:\n{}",
                    file_tail(&self.log_path(), 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections within 60 s:\n{}",
                file_tail(&self.log_path(), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown (SIGINT): sessions are ended and their transactions rolled back. Waits
    /// for the server to exit.
    pub fn stop(&self) {
        let Some(mut child) = self.child.lock().unwrap().take() else {
            return;
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection string for keyflow and for the tests' own clients.
    pub fn url(&self) -> String {
        format!("postgres://keyflow@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with psql; returns its unaligned, tuples-only output, trimmed. Panics on an
    /// error.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url())
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The temp dir holding the data directory, the socket and the log.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- postgres log ({}) ---\n{}",
                self.log_path().display(),
                file_tail(&self.log_path(), 40)
            );
        }
    }
}
