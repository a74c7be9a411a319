//! Test harness for larder's integration tests: builds and starts the real `larderd` binary on
//! a loopback port with a throw-away data directory, and stops it (gracefully or with
//! `kill -9`) when asked or when dropped.
//!
//! Tests talk to the process over HTTP exactly as users do; nothing here reaches into the
//! server. The binary is (re)built once per test process with `cargo build`, so a test never
//! runs against a stale server. [`TestPki`] and [`token_sha256`] provide what tests of HTTPS
//! and access control configure it with.

mod pki;

pub use pki::{TestPki, token_sha256};

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

/// A running larderd.
pub struct Larderd {
    /// larderd, or the wrapper that runs it (see [`Larderd::start_wrapped`]).
    child: Option<Child>,
    pub addr: String,
    /// `http` or `https` (with --tls-cert).
    pub scheme: String,
    pub data_dir: PathBuf,
    args: Vec<String>,
    wrapper: Vec<String>,
    _owned_dir: Option<tempfile::TempDir>,
}

impl Larderd {
    /// Starts larderd on a free loopback port with a fresh data directory and extra `args`.
    pub fn start(args: &[&str]) -> Larderd {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let mut l = Larderd::start_in(&data_dir, args);
        l._owned_dir = Some(dir);
        l
    }

    /// Starts larderd on `data_dir` (kept after the process stops, for restart tests).
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Larderd {
        Larderd::start_wrapped_in(&[], data_dir, args)
    }

    /// Starts larderd like [`Larderd::start`], but as the last argument of the command
    /// `wrapper` (for example `strace -f -o FILE --`), which must run it with the same stdout.
    /// [`Larderd::pid`], [`Larderd::terminate`] and [`Larderd::kill9`] then act on larderd,
    /// and the wrapper is waited for.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Larderd {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let mut l = Larderd::start_wrapped_in(wrapper, &data_dir, args);
        l._owned_dir = Some(dir);
        l
    }

    /// [`Larderd::start_wrapped`] on `data_dir` (kept after the process stops).
    pub fn start_wrapped_in(wrapper: &[&str], data_dir: &Path, args: &[&str]) -> Larderd {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let wrapper: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        let (child, scheme, addr) = spawn(&wrapper, data_dir, &args);
        Larderd {
            child: Some(child),
            addr,
            scheme,
            data_dir: data_dir.to_path_buf(),
            args,
            wrapper,
            _owned_dir: None,
        }
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
        if self.wrapper.is_empty() {
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

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        if !self.wrapper.is_empty()
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

    /// Starts a new process on the same data directory and arguments (a fresh port).
    pub fn restart(&mut self) {
        self.kill9();
        let (child, scheme, addr) = spawn(&self.wrapper, &self.data_dir, &self.args);
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

fn spawn(wrapper: &[String], data_dir: &Path, args: &[String]) -> (Child, String, String) {
    let mut cmd = match wrapper.split_first() {
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
        .args(args)
        .env(
            "LARDER_LOG",
            std::env::var("LARDER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
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
