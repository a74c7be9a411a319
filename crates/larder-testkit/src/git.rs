//! Real git repositories and a real smart-HTTP git server for tests of git snapshots, mirrors and
//! bundles, on loopback and without network.
//!
//! [`GitHttpServer`] runs `git http-backend` as a CGI program per request, as a web server in
//! front of a git host would, so that tests exercise exactly what `git clone http://…` and
//! `git fetch` do over the wire (protocol v2 included) rather than a local-path shortcut; it counts
//! the bytes it serves, which is how a test can show that a clone took its objects from somewhere
//! else. [`generated_repo`] builds repositories with `git fast-import` (many commits, big files,
//! executable bits, symlinks, branches, both kinds of tags) in well under a second, and
//! [`ripgrep_upstream`] turns the real-world fixture bundle into an upstream.
//!
//! Every git command here uses the binary named by `LARDER_GIT` (default `git`), the same one
//! the code under test uses, so running a test suite once with `LARDER_GIT=/usr/bin/git` covers
//! an older git end to end, server side included.

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The git binary under test: `LARDER_GIT`, or `git` from `PATH`.
pub fn git_bin() -> PathBuf {
    std::env::var_os("LARDER_GIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("git"))
}

/// A `git` command with the binary under test, isolated from the machine's and the user's git
/// configuration so that a developer's settings cannot change what a test sees.
pub fn git() -> Command {
    git_with(&git_bin())
}

/// Like [`git`], with the binary `bin` (e.g. `/usr/bin/git` beside the one on `PATH`, to run a
/// check with both git versions).
pub fn git_with(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "larder test")
        .env("GIT_AUTHOR_EMAIL", "test@larder.invalid")
        .env("GIT_COMMITTER_NAME", "larder test")
        .env("GIT_COMMITTER_EMAIL", "test@larder.invalid")
        .stdin(Stdio::null());
    cmd
}

/// Runs `git args…` in `dir` and returns its trimmed stdout; panics with stderr on failure.
pub fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = git().current_dir(dir).args(args).output().expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 git output")
        .trim_end()
        .to_string()
}

/// `git --version`'s number, e.g. `(2, 39)`.
pub fn git_version() -> (u32, u32) {
    let v = git_in(Path::new("."), &["--version"]);
    let mut nums = v
        .trim_start_matches("git version ")
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
}

/// A smart-HTTP git server over a directory of bare repositories, on a loopback port, with its
/// own thread and runtime so that tests may block while it serves.
pub struct GitHttpServer {
    /// `127.0.0.1:PORT`
    pub addr: String,
    root: PathBuf,
    stats: Arc<Stats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Stats {
    body_bytes: AtomicU64,
    requests: AtomicU64,
    log: std::sync::Mutex<Vec<String>>,
}

impl GitHttpServer {
    /// Serves every repository under `root` (`root/x.git` is `http://ADDR/x.git`).
    pub fn start(root: &Path) -> GitHttpServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr").to_string();
        let stats = Arc::new(Stats::default());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (root_t, stats_t) = (root.to_path_buf(), Arc::clone(&stats));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(serve(listener, root_t, stats_t, rx));
        });
        GitHttpServer {
            addr,
            root: root.to_path_buf(),
            stats,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT/name`
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// The directory served.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Response body bytes sent so far (what an upstream pays for clones and fetches).
    pub fn bytes_served(&self) -> u64 {
        self.stats.body_bytes.load(Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::SeqCst)
    }

    /// `METHOD /path?query [content-encoding] -> status` of every request so far, in order.
    pub fn request_log(&self) -> Vec<String> {
        self.stats.log.lock().expect("log").clone()
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    root: PathBuf,
    stats: Arc<Stats>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => return,
            conn = listener.accept() => conn,
        };
        let Ok((stream, peer)) = conn else { continue };
        let (root, stats) = (root.clone(), Arc::clone(&stats));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                cgi(req, root.clone(), peer.ip().to_string(), Arc::clone(&stats))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

type CgiBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// One request through `git http-backend` (RFC 3875 CGI, as git's documentation sets it up
/// behind Apache).
async fn cgi(
    req: Request<Incoming>,
    root: PathBuf,
    remote: String,
    stats: Arc<Stats>,
) -> Result<Response<CgiBody>, std::io::Error> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut cmd = tokio::process::Command::new(git_bin());
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", req.method().as_str())
        .env("PATH_INFO", req.uri().path())
        .env("QUERY_STRING", req.uri().query().unwrap_or(""))
        .env("REMOTE_ADDR", &remote)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(v) = header("content-type") {
        cmd.env("CONTENT_TYPE", v);
    }
    // Without a length (a chunked upload, which git sends for requests over http.postBuffer),
    // http-backend reads the body to its end.
    if let Some(v) = header("content-length") {
        cmd.env("CONTENT_LENGTH", v);
    }
    // http-backend inflates gzip request bodies itself when told the encoding.
    if let Some(v) = header("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", v);
    }
    if let Some(v) = header("git-protocol") {
        cmd.env("HTTP_GIT_PROTOCOL", v);
    }
    let line = format!(
        "{} {}{}",
        req.method(),
        req.uri().path_and_query().map_or("/", |p| p.as_str()),
        header("content-encoding").map_or(String::new(), |e| format!(" [{e}]"))
    );
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("stdin");
    let mut body = req.into_body();
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            if let Some(data) = frame.data_ref()
                && stdin.write_all(data).await.is_err()
            {
                return;
            }
        }
        let _ = stdin.shutdown().await;
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut builder = Response::builder();
    let mut status = StatusCode::OK;
    loop {
        let mut l = String::new();
        if stdout.read_line(&mut l).await? == 0 {
            break;
        }
        let l = l.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().unwrap_or("500");
            status = code.parse().unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else {
            builder = builder.header(name, value);
        }
    }
    stats.requests.fetch_add(1, Ordering::SeqCst);
    stats
        .log
        .lock()
        .expect("log")
        .push(format!("{line} -> {}", status.as_u16()));
    let counted = Arc::clone(&stats);
    let stream = tokio_util::io::ReaderStream::with_capacity(stdout, 64 * 1024).map(move |chunk| {
        if let Ok(c) = &chunk {
            counted
                .body_bytes
                .fetch_add(c.len() as u64, Ordering::SeqCst);
        }
        chunk.map(Frame::data)
    });
    // The child is reaped once its output has been read to the end.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let body = BodyExt::boxed(StreamBody::new(stream));
    builder
        .status(status)
        .body(body)
        .map_err(std::io::Error::other)
}

/// Commit times of generated repositories start here, so that they do not depend on the clock.
const EPOCH: u64 = 1_700_000_000;

/// Makes a bare repository at `dir` with `git fast-import`: `commits` commits on `main` over a
/// tree of `files` small files, two incompressible files of `big_file_bytes` (one of them
/// rewritten half-way), an executable script, symlinks (to a file, to a directory, dangling),
/// branches `feature/a` and `release` that diverge from `main`, and tags `v0.1` (annotated),
/// `v0.2` (lightweight) and `v1.0` (annotated, on the tip). `HEAD` is `main`.
pub fn generated_repo(dir: &Path, commits: usize, files: usize, big_file_bytes: usize) -> PathBuf {
    assert!(
        commits >= 2,
        "a generated repository has at least two commits"
    );
    let out = git()
        .args(["init", "-q", "--bare"])
        .arg(dir)
        .output()
        .expect("git init");
    assert!(out.status.success(), "git init --bare failed");
    git_in(dir, &["symbolic-ref", "HEAD", "refs/heads/main"]);

    let mut s: Vec<u8> = Vec::new();
    let mut mark = 0usize;
    let mut blob = |s: &mut Vec<u8>, data: &[u8]| {
        mark += 1;
        write!(s, "blob\nmark :{mark}\ndata {}\n", data.len()).unwrap();
        s.extend_from_slice(data);
        s.push(b'\n');
        mark
    };
    let mut commit_marks = Vec::new();
    let mut time = EPOCH;
    let mut commit = |s: &mut Vec<u8>,
                      mark: usize,
                      branch: &str,
                      parent: Option<usize>,
                      msg: &str,
                      changes: &[(String, &str, usize)]| {
        time += 60;
        write!(
            s,
            "commit refs/heads/{branch}\nmark :{mark}\n\
             author Ada Author <ada@larder.invalid> {time} +0000\n\
             committer Carl Committer <carl@larder.invalid> {time} +0000\n\
             data {}\n{msg}\n",
            msg.len()
        )
        .unwrap();
        if let Some(p) = parent {
            writeln!(s, "from :{p}").unwrap();
        }
        for (path, mode, blob) in changes {
            writeln!(s, "M {mode} :{blob} {path}").unwrap();
        }
        s.push(b'\n');
    };
    // Commit marks live far above blob marks.
    let cmark = |i: usize| 1_000_000 + i;

    let script = blob(&mut s, b"#!/bin/sh\necho built\n");
    let link_file = blob(&mut s, b"docs/file-0.txt");
    let link_dir = blob(&mut s, b"docs");
    let link_dangling = blob(&mut s, b"does/not/exist");
    let big_a = blob(&mut s, &crate::pattern(big_file_bytes, 1));
    let big_b = blob(&mut s, &crate::pattern(big_file_bytes, 2));
    let mut first: Vec<(String, &str, usize)> = vec![
        ("bin/build.sh".into(), "100755", script),
        ("link-to-file".into(), "120000", link_file),
        ("link-to-dir".into(), "120000", link_dir),
        ("dangling-link".into(), "120000", link_dangling),
        ("assets/big-a.bin".into(), "100644", big_a),
        ("assets/big-b.bin".into(), "100644", big_b),
    ];
    for f in 0..files.max(1) {
        let b = blob(&mut s, format!("file {f}\nline two\n").as_bytes());
        first.push((format!("docs/file-{f}.txt"), "100644", b));
    }
    commit(&mut s, cmark(0), "main", None, "initial import", &first);
    commit_marks.push(cmark(0));
    for i in 1..commits {
        let f = i % files.max(1);
        let b = blob(
            &mut s,
            format!("file {f}\nchanged in commit {i}\n").as_bytes(),
        );
        let mut changes = vec![(format!("docs/file-{f}.txt"), "100644", b)];
        if i == commits / 2 {
            let big = blob(&mut s, &crate::pattern(big_file_bytes, 3));
            changes.push(("assets/big-a.bin".into(), "100644", big));
        }
        if i % 7 == 0 {
            let tool = blob(&mut s, format!("#!/bin/sh\necho tool {i}\n").as_bytes());
            changes.push((format!("bin/tool-{i}.sh"), "100755", tool));
        }
        commit(
            &mut s,
            cmark(i),
            "main",
            Some(cmark(i - 1)),
            &format!("commit {i} on main"),
            &changes,
        );
        commit_marks.push(cmark(i));
    }
    let mid = commit_marks[commits / 2];
    for (k, branch) in ["feature/a", "release"].iter().enumerate() {
        let b = blob(&mut s, format!("only on {branch}\n").as_bytes());
        commit(
            &mut s,
            cmark(commits + k),
            branch,
            Some(mid),
            &format!("work on {branch}"),
            &[(format!("{}.txt", branch.replace('/', "-")), "100644", b)],
        );
    }
    let tag = |s: &mut Vec<u8>, name: &str, target: usize| {
        let msg = format!("release {name}");
        write!(
            s,
            "tag {name}\nfrom :{target}\ntagger Tess Tagger <tess@larder.invalid> {EPOCH} +0000\n\
             data {}\n{msg}\n",
            msg.len()
        )
        .unwrap();
    };
    tag(&mut s, "v0.1", commit_marks[0]);
    write!(s, "reset refs/tags/v0.2\nfrom :{}\n\n", commit_marks[1]).unwrap();
    tag(&mut s, "v1.0", *commit_marks.last().expect("commits"));
    fast_import(dir, &s);
    dir.to_path_buf()
}

/// Adds `n` commits to `branch` of the bare repository `dir` (each changing one file) and
/// returns the new tip.
pub fn append_commits(dir: &Path, branch: &str, n: usize) -> String {
    let parent = git_in(dir, &["rev-parse", &format!("refs/heads/{branch}")]);
    let mut s = Vec::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for i in 0..n {
        let content = format!("appended {i} at {now} to {parent}\n");
        let msg = format!("appended commit {i}");
        write!(
            s,
            "commit refs/heads/{branch}\n\
             committer Carl Committer <carl@larder.invalid> {} +0000\n\
             data {}\n{msg}\n",
            now + i as u64,
            msg.len()
        )
        .unwrap();
        if i == 0 {
            writeln!(s, "from {parent}").unwrap();
        }
        write!(
            s,
            "M 100644 inline appended.txt\ndata {}\n{content}\n\n",
            content.len()
        )
        .unwrap();
    }
    fast_import(dir, &s);
    git_in(dir, &["rev-parse", &format!("refs/heads/{branch}")])
}

fn fast_import(dir: &Path, stream: &[u8]) {
    let mut child = git()
        .current_dir(dir)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn git fast-import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stream)
        .expect("feed fast-import");
    let status = child.wait().expect("wait for fast-import");
    assert!(status.success(), "git fast-import failed");
}

/// Where the real-world fixture lives: `shared/` beside the repository, or
/// `LARDER_GIT_FIXTURES`.
fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LARDER_GIT_FIXTURES") {
        return PathBuf::from(dir);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let beside = repo.join("../shared/fixtures/git");
    if beside.is_dir() {
        return beside;
    }
    // A throw-away clone of a local checkout (CI's "fresh clone", e.g. under /tmp) has no
    // `../shared` of its own; the checkout it was cloned from does.
    let origin = Command::new("git")
        .args(["config", "--get", "remote.origin.url"])
        .current_dir(&repo)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|u| u.starts_with('/'));
    match origin {
        Some(origin) => Path::new(&origin).join("../shared/fixtures/git"),
        None => beside,
    }
}

/// A bare clone of the ripgrep fixture bundle at `dest` (an upstream with real history), or
/// `None` after printing `SKIPPED <test>: …` when the fixture is absent. Under CI (`CI` set) an
/// absent fixture is a failure, so that a broken checkout cannot pass by skipping.
pub fn ripgrep_upstream(test: &str, dest: &Path) -> Option<PathBuf> {
    let bundle = fixtures_dir().join("ripgrep.bundle");
    if !bundle.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: the fixture {} is missing under CI",
            bundle.display()
        );
        println!("SKIPPED {test}: no fixture at {}", bundle.display());
        return None;
    }
    let out = git()
        .args(["clone", "-q", "--bare"])
        .arg(&bundle)
        .arg(dest)
        .output()
        .expect("git clone");
    assert!(
        out.status.success(),
        "cloning {} failed: {}",
        bundle.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(dest.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clone_through(server: &GitHttpServer, name: &str, dest: &Path) {
        let out = git()
            .args(["clone", "-q", &server.url(name)])
            .arg(dest)
            .output()
            .expect("git clone");
        assert!(
            out.status.success(),
            "clone failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn plain_git_clone_over_http_backend_gets_every_ref_and_counts_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let up = generated_repo(&tmp.path().join("srv/gen.git"), 30, 20, 200_000);
        let server = GitHttpServer::start(&tmp.path().join("srv"));
        let dest = tmp.path().join("clone");
        clone_through(&server, "gen.git", &dest);
        assert_eq!(
            git_in(&dest, &["rev-parse", "HEAD"]),
            git_in(&up, &["rev-parse", "main"])
        );
        assert_eq!(git_in(&dest, &["status", "--porcelain"]), "");
        let remote_refs = git_in(&dest, &["for-each-ref", "--format=%(refname)"]);
        for r in [
            "refs/remotes/origin/feature/a",
            "refs/remotes/origin/release",
            "refs/tags/v0.1",
            "refs/tags/v0.2",
            "refs/tags/v1.0",
        ] {
            assert!(remote_refs.lines().any(|l| l == r), "{r} missing");
        }
        // Two incompressible big files alone are 400 kB, so the pack cannot be smaller.
        assert!(server.bytes_served() > 400_000, "{}", server.bytes_served());
        assert!(
            server
                .request_log()
                .iter()
                .any(|l| l.starts_with("POST /gen.git/git-upload-pack") && l.ends_with("200")),
            "{:?}",
            server.request_log()
        );
    }

    #[test]
    fn generated_repo_keeps_modes_symlinks_and_history() {
        let tmp = tempfile::tempdir().unwrap();
        let up = generated_repo(&tmp.path().join("gen.git"), 25, 10, 1000);
        assert_eq!(git_in(&up, &["rev-list", "--count", "main"]), "25");
        let tree = git_in(&up, &["ls-tree", "-r", "main"]);
        assert!(tree.contains("100755 blob") && tree.contains("bin/build.sh"));
        assert!(tree.contains("120000 blob") && tree.contains("link-to-dir"));
        assert_eq!(
            git_in(&up, &["cat-file", "-t", "v1.0"]),
            "tag",
            "v1.0 is annotated"
        );
        assert_eq!(
            git_in(&up, &["cat-file", "-t", "v0.2"]),
            "commit",
            "v0.2 is lightweight"
        );
        let tip = append_commits(&up, "main", 2);
        assert_eq!(git_in(&up, &["rev-list", "--count", &tip]), "27");
    }

    #[test]
    fn a_fetch_with_a_gzip_encoded_negotiation_works() {
        // Over 1 KiB of "have" lines, git compresses the upload-pack request.
        let tmp = tempfile::tempdir().unwrap();
        let up = generated_repo(&tmp.path().join("srv/gen.git"), 5, 5, 100);
        let server = GitHttpServer::start(&tmp.path().join("srv"));
        let dest = tmp.path().join("clone");
        clone_through(&server, "gen.git", &dest);
        for i in 0..60 {
            git_in(
                &dest,
                &["commit", "-q", "--allow-empty", "-m", &format!("local {i}")],
            );
        }
        let tip = append_commits(&up, "main", 1);
        git_in(&dest, &["fetch", "-q", "origin"]);
        assert_eq!(git_in(&dest, &["rev-parse", "origin/main"]), tip);
        assert!(
            server.request_log().iter().any(|l| l.contains("[gzip]")),
            "{:?}",
            server.request_log()
        );
    }

    #[test]
    fn ripgrep_upstream_is_a_bare_repository_with_a_default_branch() {
        let tmp = tempfile::tempdir().unwrap();
        let name = "ripgrep_upstream_is_a_bare_repository_with_a_default_branch";
        let Some(up) = ripgrep_upstream(name, &tmp.path().join("rg.git")) else {
            return;
        };
        assert_eq!(git_in(&up, &["rev-parse", "--is-bare-repository"]), "true");
        let head = git_in(&up, &["symbolic-ref", "HEAD"]);
        assert!(
            git_in(&up, &["rev-list", "--count", &head])
                .parse::<u32>()
                .unwrap()
                > 100
        );
    }

    #[test]
    fn pushing_a_big_chunked_request_through_http_backend_works() {
        // A push with a body over http.postBuffer is sent chunked, without Content-Length.
        let tmp = tempfile::tempdir().unwrap();
        let src = generated_repo(&tmp.path().join("src.git"), 5, 5, 2_000_000);
        let srv = tmp.path().join("srv");
        std::fs::create_dir_all(&srv).unwrap();
        git_in(&srv, &["init", "-q", "--bare", "empty.git"]);
        git_in(
            &srv.join("empty.git"),
            &["config", "http.receivepack", "true"],
        );
        let server = GitHttpServer::start(&srv);
        git_in(
            &src,
            &[
                "-c",
                "http.postBuffer=65536",
                "push",
                "-q",
                &server.url("empty.git"),
                "main",
            ],
        );
        assert_eq!(
            git_in(&srv.join("empty.git"), &["rev-parse", "main"]),
            git_in(&src, &["rev-parse", "main"])
        );
    }
}
