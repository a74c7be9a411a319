//! Test harness for larder's integration tests: builds and starts the real `larderd` binary on
//! a loopback port with a throw-away data directory, and stops it (gracefully or with
//! `kill -9`) when asked or when dropped.
//!
//! Tests talk to the process over HTTP exactly as users do; nothing here reaches into the
//! server. The binary is (re)built once per test process with `cargo build`, so a test never
//! runs against a stale server. [`TestPki`] and [`token_sha256`] provide what tests of HTTPS
//! and access control configure it with; [`TcpRelay`] puts the S3 server behind a slow or broken
//! link; [`s3`] says whether a real S3 server is there and how to point replicas at it;
//! [`Launch`] adds environment and a log file to a start; [`bazel`] writes what a Bazel client
//! would store.

pub mod bazel;
pub mod git;
mod pki;
mod relay;

pub use git::{GitHttpServer, generated_repo, ripgrep_upstream};
pub use pki::{TestPki, token_sha256};
pub use relay::TcpRelay;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace's target directory, derived from the running test executable
/// (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of a workspace binary, built up to date on first use.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let release = profile_dir().file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        // The same selection as `cargo test --workspace` (the README's test command): with
        // test targets in the build, dev-dependencies take part in feature unification, so
        // this resolves the features exactly as the test run did and finds the binaries it
        // built up to date. Building only the binaries would resolve other features (the
        // tests' TLS crates enable more of ring and rustls) and relink both binaries, and the
        // next `cargo test` would do it again.
        cmd.args(["build", "--quiet", "--workspace", "--bins", "--tests"]);
        // What cargo sets for the test process describes the test's own package; a build
        // script that watches one of them (ring's watches CARGO_MANIFEST_DIR) would rerun and
        // rebuild everything above it, differently from each package's tests.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_")
                || matches!(
                    &*name,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                )
            {
                cmd.env_remove(&*name);
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the larder binaries failed"
        );
    });
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// How to start a larderd: its arguments (after `--listen` and `--data-dir`, which the harness
/// sets), extra environment, and where its stderr goes.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    args: Vec<String>,
    env: Vec<(String, String)>,
    stderr: Option<PathBuf>,
    wrapper: Vec<String>,
}

impl Launch {
    pub fn new(args: &[&str]) -> Launch {
        Launch {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Launch::default()
        }
    }

    /// Sets an environment variable of the server (`LARDER_LOG` defaults to the test's, else
    /// `warn`).
    pub fn env(mut self, name: &str, value: &str) -> Launch {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Appends the server's stderr (its log) to `path` instead of the test's own stderr: a test
    /// that turns on one log line per request would otherwise bury its own output.
    pub fn stderr_to(mut self, path: &Path) -> Launch {
        self.stderr = Some(path.to_path_buf());
        self
    }

    /// Runs larderd as the last argument of the command `wrapper` (for example
    /// `strace -f -o FILE --`), which must run it with the same stdout. [`Larderd::pid`],
    /// [`Larderd::terminate`] and [`Larderd::kill9`] then act on larderd, and the wrapper is
    /// waited for.
    pub fn wrapped(mut self, wrapper: &[&str]) -> Launch {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Starts it on a free loopback port with a fresh data directory.
    pub fn start(self) -> Larderd {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let mut l = self.start_in(&data_dir);
        l._owned_dir = Some(dir);
        l
    }

    /// Starts it on `data_dir` (kept after the process stops, for restart tests).
    pub fn start_in(self, data_dir: &Path) -> Larderd {
        let (child, scheme, addr) = spawn(data_dir, &self);
        Larderd {
            child: Some(child),
            addr,
            scheme,
            data_dir: data_dir.to_path_buf(),
            launch: self,
            _owned_dir: None,
        }
    }
}

/// A running larderd.
pub struct Larderd {
    /// larderd, or the wrapper that runs it (see [`Launch::wrapped`]).
    child: Option<Child>,
    pub addr: String,
    /// `http` or `https` (with --tls-cert).
    pub scheme: String,
    pub data_dir: PathBuf,
    launch: Launch,
    _owned_dir: Option<tempfile::TempDir>,
}

impl Larderd {
    /// Starts larderd on a free loopback port with a fresh data directory and extra `args`.
    pub fn start(args: &[&str]) -> Larderd {
        Launch::new(args).start()
    }

    /// Like [`Larderd::start`], with extra environment variables (e.g. `AWS_ENDPOINT_URL`).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Larderd {
        env.iter()
            .fold(Launch::new(args), |l, (k, v)| l.env(k, v))
            .start()
    }

    /// Starts larderd on `data_dir` (kept after the process stops, for restart tests).
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Larderd {
        Launch::new(args).start_in(data_dir)
    }

    /// Starts larderd on `data_dir` under the command `wrapper` (see [`Launch::wrapped`]).
    pub fn start_wrapped_in(wrapper: &[&str], data_dir: &Path, args: &[&str]) -> Larderd {
        Launch::new(args).wrapped(wrapper).start_in(data_dir)
    }

    /// `http://127.0.0.1:PORT` (or `https://…`)
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn object_url(&self, ns: &str, key: &str) -> String {
        format!("{}/api/v1/object/{ns}/{key}", self.url())
    }

    /// larderd's process id (also when it runs under a wrapper).
    pub fn pid(&self) -> u32 {
        self.server_pid().expect("larderd is running")
    }

    fn server_pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?.id();
        if self.launch.wrapper.is_empty() {
            return Some(child);
        }
        // The wrapper's only child, which printed the listening line.
        std::fs::read_to_string(format!("/proc/{child}/task/{child}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Sends `signal` (a name `kill` knows: `HUP`, `TERM`, …) to larderd.
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        if !self.launch.wrapper.is_empty()
            && let Some(pid) = self.server_pid()
        {
            // A wrapper such as strace lets its child run on when it is killed itself.
            send_signal(pid, "KILL");
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for exit; returns the exit status (the wrapper's, if there is one).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        send_signal(self.pid(), "TERM");
        let mut c = self.child.take().expect("running");
        c.wait().expect("wait")
    }

    /// Starts a new process on the same data directory and launch settings (a fresh port).
    pub fn restart(&mut self) {
        self.kill9();
        let (child, scheme, addr) = spawn(&self.data_dir, &self.launch);
        self.child = Some(child);
        self.scheme = scheme;
        self.addr = addr;
    }
}

fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

fn spawn(data_dir: &Path, launch: &Launch) -> (Child, String, String) {
    let stderr = match &launch.stderr {
        None => Stdio::inherit(),
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open {} for larderd's log: {e}", path.display()))
            .into(),
    };
    let mut cmd = match launch.wrapper.split_first() {
        Some((program, wrapper_args)) => {
            let mut cmd = Command::new(program);
            cmd.args(wrapper_args).arg(binary("larderd"));
            cmd
        }
        None => Command::new(binary("larderd")),
    };
    let mut child = cmd
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir)
        .args(&launch.args)
        .env(
            "LARDER_LOG",
            std::env::var("LARDER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        // After the default, so a launch can set LARDER_LOG too.
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn larderd");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            if let Some((scheme, addr)) = line
                .strip_prefix("larderd listening on ")
                .and_then(|url| url.split_once("://"))
            {
                let _ = tx.send((scheme.to_string(), addr.to_string()));
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((scheme, addr)) = rx.recv_timeout(Duration::from_millis(50)) {
            return (child, scheme, addr);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("larderd exited during start-up: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "larderd did not start within 30 s"
        );
    }
}

impl Drop for Larderd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The real S3 server the tests share (started by scripts/test.sh).
pub mod s3 {
    /// Whether an S3 server is configured; prints `SKIPPED <test>: …` when not.
    pub fn available(test: &str) -> bool {
        let ok = ["AWS_ENDPOINT_URL", "S3_BUCKET", "AWS_ACCESS_KEY_ID"]
            .iter()
            .all(|v| std::env::var_os(v).is_some());
        if !ok {
            println!("SKIPPED {test}: no S3 server (run scripts/s3-server.sh, or scripts/test.sh)");
        }
        ok
    }

    /// The S3 server's `host:port`.
    pub fn endpoint_addr() -> String {
        let url = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL");
        url.trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string()
    }

    /// A key prefix of the shared bucket that no other test uses.
    pub fn unique_prefix(test: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!("{test}/{:x}-{}", nanos, std::process::id())
    }

    /// larderd arguments for a replica over the shared bucket under `prefix`.
    pub fn replica_args(prefix: &str) -> Vec<String> {
        vec![
            "--s3-bucket".into(),
            std::env::var("S3_BUCKET").expect("S3_BUCKET"),
            "--s3-prefix".into(),
            prefix.into(),
        ]
    }
}

/// The `ETag` header value larder gives `data`: its BLAKE3 digest, quoted.
pub fn etag_of(data: &[u8]) -> String {
    format!("\"{}\"", blake3::hash(data).to_hex())
}

/// `len` bytes of a xorshift sequence: incompressible, and different for every seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Waits up to 10 s until the log file at `path` (see [`Launch::stderr_to`]) holds `needle`,
/// and returns the log.
pub fn wait_for_log(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the first Prometheus series in `metrics` whose text starts with `prefix`
/// (name and labels), e.g. `larder_fills_total{result="filled"}`.
pub fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A GET with `headers` through `http`: status, ETag (empty when none) and the whole body.
pub async fn get(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (reqwest::StatusCode, String, Vec<u8>) {
    let mut req = http.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, etag, r.bytes().await.unwrap().to_vec())
}

impl Larderd {
    /// The server's Prometheus text (`/metrics`, open unless `public_metrics = false`).
    pub async fn scrape(&self, http: &reqwest::Client) -> String {
        let r = http.get(format!("{}/metrics", self.url())).send().await;
        r.unwrap().text().await.unwrap()
    }
}
