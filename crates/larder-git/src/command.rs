//! The system `git`, run the way a long-lived service must run a child it does not control.
//!
//! larder keeps mirrors with the real `git` rather than a library because upstream hosts are
//! tuned for it (protocol v2, partial negotiation, credential helpers, `http.extraHeader`), and
//! the snapshots must be byte-for-byte what that same `git` makes of a clone. A git child can
//! hang on a dead network, and it starts children of its own (`git-remote-https`, `index-pack`,
//! `upload-pack`), so each command gets its own process group and a deadline, and on the
//! deadline (or when the caller stops waiting) the whole group is killed, not only the git we
//! started. Nothing may wait for a human: standard input is closed, `GIT_TERMINAL_PROMPT=0`, and
//! askpass programs are removed from the environment, as are variables that would point git at
//! another repository or make it trace HTTP headers to stderr.
//!
//! Upstream credentials live in the service's git configuration, and git may still echo them:
//! a URL with a user name in an error, an `Authorization:` header in a trace. Everything a caller
//! sees of a command (its arguments and its stderr) passes through [`scrub`] first, so it can go
//! into an error message or a log line as it is.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// The soft limit on open descriptors git children start with; 0 leaves them the service's.
static CHILD_DESCRIPTOR_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Starts every git child with `soft` as its soft limit on open descriptors (the hard limit is
/// left as it is), not the service's own. larderd raises its soft limit to the hard one to keep
/// thousands of files open; a child that loops over every possible descriptor (closing them
/// before an exec, or `select`) slows down or breaks with a huge one, which is why Go restores
/// the original limit in the processes it starts. 0 turns it off.
pub fn start_children_with_descriptor_limit(soft: u64) {
    CHILD_DESCRIPTOR_LIMIT.store(soft, std::sync::atomic::Ordering::Relaxed);
}

/// How long a git command may run unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Bytes of stderr kept (the end of it, where git says what went wrong).
const STDERR_TAIL: usize = 16 * 1024;

/// Inherited variables that would point git at another repository, index or object store than
/// the one a command is run in (a CI job's own `GIT_DIR`, or git's variables when larder runs
/// inside a hook). The client's git commands drop these too.
pub const REPOSITORY_ENV: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_QUARANTINE_PATH",
];

/// Further inherited variables the server's git must not see: they would make it ask someone
/// for a password, or print HTTP headers (credentials) to stderr.
const SERVICE_REMOVED_ENV: &[&str] = &["GIT_ASKPASS", "SSH_ASKPASS", "GIT_CURL_VERBOSE"];

/// A git binary and the defaults its commands run with.
#[derive(Clone, Debug)]
pub struct Git {
    bin: PathBuf,
    timeout: Duration,
    env: Vec<(OsString, OsString)>,
}

impl Git {
    /// The binary named by `LARDER_GIT`, or `git` from `PATH`.
    pub fn from_env() -> Git {
        Git::new(std::env::var_os("LARDER_GIT").unwrap_or_else(|| "git".into()))
    }

    /// The git binary at `bin` (a path, or a name looked up in `PATH`), with the default deadline
    /// ([`DEFAULT_TIMEOUT`]) and no extra environment.
    pub fn new(bin: impl Into<PathBuf>) -> Git {
        Git {
            bin: bin.into(),
            timeout: DEFAULT_TIMEOUT,
            env: Vec::new(),
        }
    }

    /// The deadline of commands that do not set their own.
    pub fn with_timeout(mut self, timeout: Duration) -> Git {
        self.timeout = timeout;
        self
    }

    /// An environment variable for every command (e.g. `GIT_CONFIG_GLOBAL` pointing at the
    /// service's own git configuration).
    pub fn with_env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Git {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The binary commands are started with, as given.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// `git args…`, to be configured and run.
    pub fn cmd<I, S>(&self, args: I) -> GitCommand<'_>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        GitCommand {
            git: self,
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            dir: None,
            timeout: self.timeout,
            env: Vec::new(),
            stdin: None,
        }
    }

    /// `git --version` as `(major, minor)`.
    pub async fn version(&self) -> Result<(u32, u32), GitError> {
        let v = self.cmd(["--version"]).stdout_string().await?;
        let mut nums = v
            .trim_start_matches("git version ")
            .split(['.', ' '])
            .map(|n| n.parse::<u32>().unwrap_or(0));
        Ok((nums.next().unwrap_or(0), nums.next().unwrap_or(0)))
    }
}

/// One git invocation being set up.
pub struct GitCommand<'a> {
    git: &'a Git,
    args: Vec<OsString>,
    dir: Option<PathBuf>,
    timeout: Duration,
    env: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
}

/// What a finished command printed and how it ended.
#[derive(Debug)]
pub struct Finished {
    /// The exit code (`None` if a signal ended it).
    pub code: Option<i32>,
    /// Everything the command wrote to its standard output.
    pub stdout: Vec<u8>,
    /// Scrubbed, and only the last 16 KiB.
    pub stderr: String,
}

impl<'a> GitCommand<'a> {
    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> GitCommand<'a> {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Bytes for the command's standard input (closed otherwise).
    pub fn stdin(mut self, input: Vec<u8>) -> GitCommand<'a> {
        self.stdin = Some(input);
        self
    }

    /// Runs the command in `dir` (else in this process's working directory).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> GitCommand<'a> {
        self.dir = Some(dir.into());
        self
    }

    /// Deadline of this command, replacing the [`Git`] default; past it the process group is
    /// killed.
    pub fn timeout(mut self, timeout: Duration) -> GitCommand<'a> {
        self.timeout = timeout;
        self
    }

    /// Sets an environment variable for this command; it wins over one of the same name set on
    /// the [`Git`].
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> GitCommand<'a> {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The command line as it may appear in errors and logs.
    pub fn display(&self) -> String {
        let mut s = self.git.bin.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        scrub(&s)
    }

    /// Runs to the end; exit code 0 or an error.
    pub async fn output(self) -> Result<Finished, GitError> {
        let command = self.display();
        let done = self.run().await?;
        if done.code == Some(0) {
            Ok(done)
        } else {
            Err(GitError {
                command,
                kind: match done.code {
                    Some(code) => ErrorKind::Exit(code),
                    None => ErrorKind::Killed,
                },
                stderr: done.stderr,
            })
        }
    }

    /// Runs to the end and returns stdout without its trailing newline.
    pub async fn stdout_string(self) -> Result<String, GitError> {
        let command = self.display();
        let done = self.output().await?;
        let mut s = String::from_utf8(done.stdout).map_err(|_| GitError {
            command,
            kind: ErrorKind::Output("stdout is not UTF-8".into()),
            stderr: String::new(),
        })?;
        s.truncate(s.trim_end_matches(['\n', '\r']).len());
        Ok(s)
    }

    /// Runs to the end whatever the exit code (for commands that answer with it, such as
    /// `merge-base --is-ancestor`); only failing to run, a signal or the deadline are errors.
    pub async fn run(self) -> Result<Finished, GitError> {
        let command = self.display();
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(&self.git.bin);
        cmd.args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if REPOSITORY_ENV.contains(&&*name)
                || SERVICE_REMOVED_ENV.contains(&&*name)
                || name.starts_with("GIT_TRACE")
            {
                cmd.env_remove(&k);
            }
        }
        cmd.env("GIT_TERMINAL_PROMPT", "0");
        for (k, v) in self.git.env.iter().chain(&self.env) {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        let soft = CHILD_DESCRIPTOR_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
        if soft != 0 {
            // SAFETY: runs in the forked child before exec, calling only getrlimit and
            // setrlimit, which are async-signal-safe and touch nothing but the struct given.
            unsafe {
                cmd.pre_exec(move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
                        && soft < limit.rlim_cur
                    {
                        limit.rlim_cur = soft;
                        // Failing leaves the child the service's limit: no reason not to run it.
                        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| GitError {
            command: command.clone(),
            kind: ErrorKind::Spawn(e.to_string()),
            stderr: String::new(),
        })?;
        let group = GroupKiller(child.id().map(|id| id as libc::pid_t));
        if let (Some(input), Some(mut pipe)) = (self.stdin, child.stdin.take()) {
            // Written by a task of its own: a child may fill its stdout before reading all of
            // its input.
            tokio::spawn(async move {
                let _ = pipe.write_all(&input).await;
            });
        }
        let stdout = tokio::spawn(read_all(child.stdout.take().expect("piped")));
        let stderr = tokio::spawn(read_all(child.stderr.take().expect("piped")));
        let waited = tokio::time::timeout(self.timeout, async {
            let status = child.wait().await;
            // A grandchild that kept the pipes open keeps these going until the deadline.
            let out = stdout.await;
            let err = stderr.await;
            (status, out, err)
        })
        .await;
        let elapsed = started.elapsed();
        match waited {
            Ok((status, out, err)) => {
                group.disarm();
                let io = |e: String| GitError {
                    command: command.clone(),
                    kind: ErrorKind::Output(e),
                    stderr: String::new(),
                };
                let status = status.map_err(|e| io(e.to_string()))?;
                let stdout = out
                    .map_err(|e| io(e.to_string()))?
                    .map_err(|e| io(e.to_string()))?;
                let stderr = err.map_err(|e| io(e.to_string()))?.unwrap_or_default();
                tracing::debug!(command, code = ?status.code(), elapsed_ms = elapsed.as_millis() as u64, "git finished");
                Ok(Finished {
                    code: status.code(),
                    stdout,
                    stderr: scrub(&tail(&stderr)),
                })
            }
            Err(_) => {
                group.kill();
                let _ = child.wait().await;
                tracing::warn!(
                    command,
                    timeout_s = self.timeout.as_secs(),
                    "git timed out; killed its process group"
                );
                Err(GitError {
                    command,
                    kind: ErrorKind::TimedOut(self.timeout),
                    stderr: String::new(),
                })
            }
        }
    }
}

async fn read_all(mut r: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).await?;
    Ok(buf)
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Kills a command's whole process group unless disarmed: on the deadline, and when the future
/// running the command is dropped (a cancelled caller must not leave git running).
struct GroupKiller(Option<libc::pid_t>);

impl GroupKiller {
    fn kill(&self) {
        if let Some(pgid) = self.0 {
            // SAFETY: kill(2) with a negative pid signals the process group we created for the
            // child (its pid, which stays reserved until the child is reaped).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What went wrong with a git command, for callers that decide by it (retry, rebuild, report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The binary could not be started (not installed, not executable).
    Spawn(String),
    /// It exited with this non-zero code.
    Exit(i32),
    /// A signal ended it.
    Killed,
    /// It ran past its deadline; its process group was killed.
    TimedOut(Duration),
    /// Its output could not be read or was not what was expected.
    Output(String),
}

/// A failed git command: which one (scrubbed), how it failed, and the end of its stderr
/// (scrubbed), so that it can be logged or shown as it is.
#[derive(Clone, Debug, Error)]
#[error("{}", self.describe())]
pub struct GitError {
    /// The command line, credentials scrubbed.
    pub command: String,
    /// How the command failed.
    pub kind: ErrorKind,
    /// The end (at most 16 KiB) of its stderr, scrubbed; may be empty.
    pub stderr: String,
}

impl GitError {
    /// Whether the command was killed at its deadline.
    pub fn timed_out(&self) -> bool {
        matches!(self.kind, ErrorKind::TimedOut(_))
    }

    /// A one-line description: the command, how it ended, and the last lines of its stderr.
    fn describe(&self) -> String {
        let how = match &self.kind {
            ErrorKind::Spawn(e) => format!("could not be started: {e}"),
            ErrorKind::Exit(code) => format!("exited with status {code}"),
            ErrorKind::Killed => "was killed by a signal".to_string(),
            ErrorKind::TimedOut(t) => format!("timed out after {} s", t.as_secs_f64()),
            ErrorKind::Output(e) => format!("failed: {e}"),
        };
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let last = &lines[lines.len().saturating_sub(3)..];
        if last.is_empty() {
            format!("`{}` {how}", self.command)
        } else {
            format!("`{}` {how}: {}", self.command, last.join(" / "))
        }
    }
}

/// Header names whose values are secrets wherever they appear (`Authorization: Basic …`,
/// `http.extraHeader=Authorization: …`, `-c http.https://h/.extraheader=…`).
const SECRET_NAMES: &[&str] = &[
    "authorization",
    "extraheader",
    "cookie",
    "private-token",
    "job-token",
    "x-api-key",
    "password",
    "token",
];

/// Removes credentials from text git printed or from a command line: the user-info part of
/// URLs, and everything after a secret-bearing header or setting name (to the end of its line),
/// since a value may contain spaces (`Basic dXNlcjpwYXNz`).
pub fn scrub(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| scrub_names(&scrub_userinfo(line)))
        .collect()
}

fn scrub_userinfo(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find("://") {
        let (head, after) = rest.split_at(i + 3);
        out.push_str(head);
        let end = after
            .find(|c: char| c == '/' || c.is_whitespace() || "'\"<>`".contains(c))
            .unwrap_or(after.len());
        let authority = &after[..end];
        if let Some(at) = authority.rfind('@') {
            out.push_str("***");
            out.push_str(&authority[at..]);
        } else {
            out.push_str(authority);
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn scrub_names(line: &str) -> String {
    let lower = line.to_ascii_lowercase();
    let first = SECRET_NAMES
        .iter()
        .filter_map(|name| {
            let mut from = 0;
            // A name counts when a separator follows it (`: `, `=`), not inside a word.
            while let Some(i) = lower[from..].find(name) {
                let at = from + i;
                let after = &lower[at + name.len()..];
                if after.trim_start().starts_with([':', '=']) {
                    return Some(at + name.len());
                }
                from = at + name.len();
            }
            None
        })
        .min();
    match first {
        Some(end) => {
            let sep = line[end..]
                .find([':', '='])
                .map_or(line.len(), |i| end + i + 1);
            let newline = if line.ends_with('\n') { "\n" } else { "" };
            format!("{} ***{newline}", &line[..sep])
        }
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_userinfo_from_urls() {
        assert_eq!(
            scrub("fatal: unable to access 'https://bob:hunter2@git.example/r.git/': 403"),
            "fatal: unable to access 'https://***@git.example/r.git/': 403"
        );
        assert_eq!(
            scrub("from http://tok@h:80/x and https://h/y"),
            "from http://***@h:80/x and https://h/y"
        );
        assert_eq!(scrub("https://a:b@c@h/r"), "https://***@h/r");
    }

    #[test]
    fn scrub_removes_header_and_setting_values() {
        for (raw, want) in [
            (
                "=> Send header: Authorization: Basic dXNlcjpwYXNz\n",
                "=> Send header: Authorization: ***\n",
            ),
            (
                "git -c http.extraHeader=Authorization: Bearer abc fetch",
                "git -c http.extraHeader= ***",
            ),
            (
                "git -c http.https://h/.extraheader=AUTHORIZATION: x ls-remote",
                "git -c http.https://h/.extraheader= ***",
            ),
            ("PRIVATE-TOKEN: glpat-123", "PRIVATE-TOKEN: ***"),
            ("password=hunter2", "password= ***"),
        ] {
            let got = scrub(raw);
            assert_eq!(got, want, "{raw}");
            for secret in ["dXNlcjpwYXNz", "abc", "glpat", "hunter2", "Bearer"] {
                assert!(!got.contains(secret), "{got}");
            }
        }
    }

    #[test]
    fn scrub_leaves_ordinary_git_messages_alone() {
        for msg in [
            "fatal: repository 'http://127.0.0.1:1/x.git/' not found\n",
            "error: RPC failed; HTTP 500 curl 22\n",
            "hint: the token bucket is empty\n",
            "warning: redirecting to https://h/r.git/\n",
        ] {
            assert_eq!(scrub(msg), msg);
        }
    }

    #[tokio::test]
    async fn a_failed_command_reports_its_command_code_and_scrubbed_stderr() {
        let git = Git::from_env();
        let err = git
            .cmd([
                "-c",
                "alias.leak=!echo 'fatal: https://u:hunter2@h/r Authorization: Bearer s3cr3t' >&2; exit 3",
                "leak",
            ])
            .output()
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Exit(3));
        assert!(err.command.contains("leak"), "{}", err.command);
        let text = err.to_string();
        assert!(text.contains("exited with status 3"), "{text}");
        assert!(text.contains("https://***@h/r"), "{text}");
        for secret in ["hunter2", "s3cr3t"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[tokio::test]
    async fn children_start_with_the_descriptor_limit_they_are_given() {
        let mut ours = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) },
            0
        );
        let limit_in_child = |which: &'static str| async move {
            Git::from_env()
                .cmd(["-c", &format!("alias.limit=!ulimit -{which}n"), "limit"])
                .stdout_string()
                .await
                .unwrap()
        };
        let wanted = (ours.rlim_cur / 2).max(64);
        start_children_with_descriptor_limit(wanted);
        let soft = limit_in_child("S").await;
        let hard = limit_in_child("H").await;
        start_children_with_descriptor_limit(0);
        assert_eq!(soft, wanted.to_string());
        let ours_hard = if ours.rlim_max == libc::RLIM_INFINITY {
            "unlimited".to_owned()
        } else {
            ours.rlim_max.to_string()
        };
        assert_eq!(hard, ours_hard, "the hard limit is left as it is");
    }

    #[tokio::test]
    async fn a_missing_binary_is_a_spawn_error() {
        let err = Git::new("/nonexistent/git")
            .cmd(["--version"])
            .output()
            .await
            .unwrap_err();
        assert!(matches!(err.kind, ErrorKind::Spawn(_)), "{err}");
    }

    #[tokio::test]
    async fn git_never_waits_for_a_password() {
        // A prompt would hang; with prompts off, git fails at once on a 401.
        let git = Git::from_env().with_env("GIT_ASKPASS", "");
        let err = git
            .cmd(["ls-remote", "http://127.0.0.1:9/none.git"])
            .timeout(Duration::from_secs(20))
            .output()
            .await
            .unwrap_err();
        assert!(!err.timed_out(), "{err}");
    }

    fn alive(pid: i32) -> bool {
        // A zombie is dead for this purpose: nothing of it runs any more.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            }
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn a_timeout_kills_the_child_and_its_grandchildren() {
        let tmp = tempfile::tempdir().unwrap();
        let pids = tmp.path().join("pids");
        let script = format!(
            "!sh -c 'sleep 300 & echo $! >> {p}; echo $$ >> {p}; wait'",
            p = pids.display()
        );
        let git = Git::from_env();
        let started = Instant::now();
        let err = git
            .cmd(["-c", &format!("alias.nap={script}"), "nap"])
            .timeout(Duration::from_millis(1500))
            .output()
            .await
            .unwrap_err();
        assert!(err.timed_out(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let pids: Vec<i32> = std::fs::read_to_string(&pids)
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 2, "{pids:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&p| alive(p)) {
            assert!(Instant::now() < deadline, "still running: {pids:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn dropping_a_running_command_kills_its_group() {
        let tmp = tempfile::tempdir().unwrap();
        let pids = tmp.path().join("pids");
        let script = format!(
            "!sh -c 'sleep 300 & echo $! >> {p}; wait'",
            p = pids.display()
        );
        let git = Git::from_env();
        let run = git
            .cmd(["-c", &format!("alias.nap={script}"), "nap"])
            .output();
        // The future is dropped when the shorter timeout wins.
        let _ = tokio::time::timeout(Duration::from_millis(1500), run).await;
        let pid: i32 = std::fs::read_to_string(&pids)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(Instant::now() < deadline, "grandchild {pid} still running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
