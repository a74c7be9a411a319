//! Shared harness of the `larder` CLI tests: running the binary, test data, and two small test
//! servers for the fault cases a real larderd does not produce on demand.
//!
//! The servers are deliberately dumb, blocking, thread-per-connection HTTP/1.1 over std::net:
//! they exist to break the protocol in precise ways (a wrong `Content-Range`, a stalled body, a
//! proxy that lands an overwrite between two range requests), which a real HTTP library would
//! not let us do. Every test that checks correct behaviour runs against the real larderd.

#![allow(dead_code)]

use larder_proto::ETag;
use larder_testkit::binary;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("utf-8 stdout")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout).expect("stdout is JSON")
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "expected success; stderr: {}", self.stderr);
        self
    }

    #[track_caller]
    pub fn fails(self, code: i32, message: &str) -> Run {
        assert_eq!(self.code, code, "stderr: {}", self.stderr);
        assert!(
            self.stderr.contains(message),
            "expected {message:?} in stderr: {}",
            self.stderr
        );
        self
    }
}

/// Runs `larder --url URL ARGS…`, feeding `stdin` if given.
pub fn larder(url: &str, args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut child = Command::new(binary("larder"))
        .arg("--url")
        .arg(url)
        .args(args)
        .env_remove("LARDER_URL")
        .env_remove("LARDER_TOKEN")
        .env_remove("LARDER_CA_CERT")
        .env_remove("LARDER_CONCURRENCY")
        .env_remove("LARDER_CHUNK_SIZE")
        .env_remove("LARDER_NO_SYNC")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn larder");
    // Feed stdin from a thread so a large body cannot deadlock against unread output.
    let feeder = stdin.map(|data| {
        let data = data.to_vec();
        let mut pipe = child.stdin.take().expect("stdin pipe");
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let mut stdout_pipe = child.stdout.take().expect("stdout pipe");
    let mut stderr_pipe = child.stderr.take().expect("stderr pipe");
    let stdout = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout_pipe.read_to_end(&mut buf);
        buf
    });
    let stderr = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut buf);
        buf
    });
    // A request that should never have been sent may hang on a silent listener: fail instead.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for larder") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("larder {args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(f) = feeder {
        f.join().expect("stdin feeder");
    }
    Run {
        code: status.code().expect("larder exited by a signal"),
        stdout: stdout.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&stderr.join().expect("stderr reader")).into_owned(),
    }
}

/// Runs `larder ARGS…` with the given extra environment and no inherited LARDER_* settings.
pub fn larder_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(binary("larder"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in [
        "LARDER_URL",
        "LARDER_TOKEN",
        "LARDER_CA_CERT",
        "LARDER_CONCURRENCY",
        "LARDER_CHUNK_SIZE",
        "LARDER_NO_SYNC",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn larder");
    let mut stdout = Vec::new();
    let mut stderr = String::new();
    let mut out_pipe = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        out_pipe.read_to_end(&mut buf).unwrap();
        buf
    });
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    stdout.extend(reader.join().unwrap());
    let status = child.wait().unwrap();
    Run {
        code: status.code().expect("exited by a signal"),
        stdout,
        stderr,
    }
}

/// Deterministic, incompressible-looking bytes, so a misplaced chunk changes the digest.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn etag_of(bytes: &[u8]) -> String {
    ETag::of(bytes).as_str().to_string()
}

pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A loopback URL where nothing listens.
pub fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// One parsed request head.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Lowercase names.
    pub headers: HashMap<String, String>,
    /// The head exactly as received, for forwarding.
    pub raw: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Reads one request head (GET/HEAD only: no body). None when the peer closed.
fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => return None,
            Ok(_) => raw.push(byte[0]),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Request {
        method,
        path,
        headers,
        raw,
    })
}

/// How [`FaultServer`] misbehaves on pinned (`If-Match`) range requests; discovery is answered
/// correctly so that the client gets as far as the parallel phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Content-Length and body one byte short of the range, Content-Range as asked.
    WrongLength,
    /// Content-Range (and the bytes) shifted one byte down from what was asked.
    WrongContentRange,
    /// The right bytes under the ETag of other content (a server that ignores If-Match).
    WrongETag,
    /// Headers and half the body, then silence.
    Stall,
    /// The first request for each range gets this fault, later ones are answered correctly.
    Once(OnceFault),
    /// A consistent server whose ETag is not the digest of what it serves (a corrupt tier).
    Lie,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnceFault {
    /// A 206 that covers only half the range.
    Short,
    /// The connection closes halfway through the body.
    Reset,
    /// 503 with a reason.
    Unavailable,
    /// Half the body, then silence.
    Stall,
}

/// A tiny HTTP/1.1 server holding one object at every key, answering ranges like larderd except
/// for the configured fault.
pub struct FaultServer {
    pub url: String,
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultServer {
    pub fn start(body: Vec<u8>, fault: Option<Fault>) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let body = Arc::new(body);
        let claimed = if fault == Some(Fault::Lie) {
            ETag::of(b"what the server claims to have")
        } else {
            ETag::of(&body)
        };
        let seen: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let (count, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (body, claimed, seen, count) = (
                    Arc::clone(&body),
                    claimed.clone(),
                    Arc::clone(&seen),
                    Arc::clone(&count),
                );
                std::thread::spawn(move || {
                    serve_faulty(stream, &body, &claimed, fault, &seen, &count)
                });
            }
        });
        FaultServer {
            url,
            requests,
            stop,
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn serve_faulty(
    mut stream: TcpStream,
    body: &[u8],
    etag: &ETag,
    fault: Option<Fault>,
    seen: &Mutex<std::collections::HashSet<String>>,
    count: &AtomicU64,
) {
    let total = body.len() as u64;
    while let Some(req) = read_request(&mut stream) {
        count.fetch_add(1, Ordering::Relaxed);
        let pinned = req.header("if-match").is_some();
        if let Some(want) = req.header("if-match")
            && want != etag.header_value()
        {
            let msg = format!("precondition failed: current ETag is {etag}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 412 Precondition Failed\r\nETag: {etag}\r\nContent-Length: {}\r\n\r\n{msg}",
                msg.len()
            );
            continue;
        }
        let range = req
            .header("range")
            .and_then(larder_proto::RangeSpec::parse)
            .map(|spec| spec.resolve(total));
        let (start, len) = match range {
            None | Some(Ok(None)) => (0, total),
            Some(Ok(Some(r))) => (r.start, r.len),
            Some(Err(())) => {
                let _ = write!(
                    stream,
                    "HTTP/1.1 416 Range Not Satisfiable\r\nETag: {etag}\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\n\r\n"
                );
                continue;
            }
        };
        let partial = range.is_some();
        let first_time = seen.lock().unwrap().insert(format!("{start}-{len}"));
        let active = match fault {
            Some(Fault::Once(_)) if !first_time => None,
            Some(Fault::Lie) => None,
            f if pinned => f,
            _ => None,
        };
        let mut etag_sent = etag.clone();
        let (mut start, mut len, mut cl) = (start, len, len);
        let mut status_line = if partial {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        let mut stall_after = None;
        let mut close_after = None;
        match active {
            None => {}
            Some(Fault::WrongLength) => {
                len -= 1;
                cl = len;
                // Content-Range still claims the full range.
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nETag: {etag}\r\nContent-Range: bytes {}-{}/{total}\r\nContent-Length: {cl}\r\n\r\n",
                    start,
                    start + len
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body[start as usize..(start + len) as usize]);
                continue;
            }
            Some(Fault::WrongContentRange) => {
                start -= 1;
            }
            Some(Fault::WrongETag) => etag_sent = ETag::of(b"some other revision"),
            Some(Fault::Stall) | Some(Fault::Once(OnceFault::Stall)) => stall_after = Some(len / 2),
            Some(Fault::Once(OnceFault::Short)) => {
                len /= 2;
                cl = len;
            }
            Some(Fault::Once(OnceFault::Reset)) => close_after = Some(len / 2),
            Some(Fault::Once(OnceFault::Unavailable)) => {
                status_line = "503 Service Unavailable";
                let msg = "the disk tier is overloaded\n";
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status_line}\r\nContent-Length: {}\r\n\r\n{msg}",
                    msg.len()
                );
                continue;
            }
            Some(Fault::Lie) => unreachable!(),
        }
        let mut head = format!("HTTP/1.1 {status_line}\r\nETag: {etag_sent}\r\n");
        if partial {
            head.push_str(&format!(
                "Content-Range: bytes {}-{}/{total}\r\n",
                start,
                start + len - 1
            ));
        }
        head.push_str(&format!("Content-Length: {cl}\r\n\r\n"));
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        if req.method == "HEAD" {
            continue;
        }
        let bytes = &body[start as usize..(start + len) as usize];
        if let Some(n) = stall_after {
            let _ = stream.write_all(&bytes[..n as usize]);
            // Silence until the client gives up (it closes, and the read below returns).
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let mut sink = [0u8; 1];
            let _ = stream.read(&mut sink);
            return;
        }
        if let Some(n) = close_after {
            let _ = stream.write_all(&bytes[..n as usize]);
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        if stream.write_all(bytes).is_err() {
            return;
        }
    }
}

/// A forwarding proxy in front of a real larderd that counts requests, can run a hook before
/// forwarding one (to overwrite the object between two range requests), and can throttle
/// response bodies (so that a download is reliably "in the middle" when a test acts).
pub struct Proxy {
    pub url: String,
    pub requests: Arc<AtomicU64>,
}

pub type Hook = Arc<dyn Fn(u64, &Request) + Send + Sync>;

/// Decides whether a request reaches upstream: `Some(response)` answers it with those bytes
/// instead (an access-control layer in front of larderd, say).
pub type Gate = Arc<dyn Fn(&Request) -> Option<Vec<u8>> + Send + Sync>;

impl Proxy {
    /// `bytes_per_sec`: per-connection body rate, None for full speed.
    pub fn start(upstream: &str, bytes_per_sec: Option<u64>, hook: Option<Hook>) -> Proxy {
        Proxy::start_gated(upstream, bytes_per_sec, hook, None)
    }

    pub fn start_gated(
        upstream: &str,
        bytes_per_sec: Option<u64>,
        hook: Option<Hook>,
        gate: Option<Gate>,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicU64::new(0));
        let upstream = upstream.trim_start_matches("http://").to_string();
        let count = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (upstream, count, hook, gate) = (
                    upstream.clone(),
                    Arc::clone(&count),
                    hook.clone(),
                    gate.clone(),
                );
                std::thread::spawn(move || {
                    forward(
                        stream,
                        &upstream,
                        bytes_per_sec,
                        &count,
                        hook.as_ref(),
                        gate.as_ref(),
                    )
                });
            }
        });
        Proxy { url, requests }
    }
}

fn forward(
    mut client: TcpStream,
    upstream: &str,
    rate: Option<u64>,
    count: &AtomicU64,
    hook: Option<&Hook>,
    gate: Option<&Gate>,
) {
    if let Some(req) = read_request(&mut client) {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(hook) = hook {
            hook(n, &req);
        }
        if let Some(answer) = gate.and_then(|g| g(&req)) {
            let _ = client.write_all(&answer);
            // Close only our side and swallow any request body still coming: closing a socket
            // with unread data resets it, and the client could lose the answer.
            let _ = client.shutdown(Shutdown::Write);
            let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = std::io::copy(&mut client, &mut std::io::sink());
            return;
        }
        let Ok(mut up) = TcpStream::connect(upstream) else {
            // Upstream is dead: the client sees its connection close without an answer.
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        // One upstream connection per request, closed by the server after its answer, so the
        // end of the response is the end of the stream and no framing needs parsing.
        let head = String::from_utf8_lossy(&req.raw);
        let head: String = head
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect::<Vec<_>>()
            .join("\r\n");
        let head = head.trim_end_matches("\r\n").to_string() + "\r\nConnection: close\r\n\r\n";
        if up.write_all(head.as_bytes()).is_err() {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        // A request body (PUT) follows the head unparsed; it ends when the client is done, and
        // at the latest when this proxy closes the client connection below.
        if let (Ok(mut from), Ok(mut to)) = (client.try_clone(), up.try_clone()) {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
            });
        }
        // Tell the client the connection closes too, so it never reuses a connection whose
        // response framing this proxy does not track.
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent_head = false;
        let mut pending = Vec::new();
        loop {
            let got = match up.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => k,
            };
            let mut out = &buf[..got];
            let rewritten;
            if !sent_head {
                pending.extend_from_slice(out);
                let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                let head: Vec<&str> = head
                    .split("\r\n")
                    .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                    .collect();
                let mut all = (head.join("\r\n") + "\r\nConnection: close\r\n\r\n").into_bytes();
                all.extend_from_slice(&pending[end + 4..]);
                rewritten = all;
                out = &rewritten;
                sent_head = true;
            }
            if client.write_all(out).is_err() {
                return;
            }
            if let Some(rate) = rate {
                std::thread::sleep(Duration::from_secs_f64(out.len() as f64 / rate as f64));
            }
        }
        let _ = client.shutdown(Shutdown::Both);
    }
}

/// A tar entry written header by header, so that names the tar crate refuses to write (`..`,
/// absolute paths) and sequences it would not produce (one path several times) can be made.
pub enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// A tar + zstd snapshot of exactly these entries, in this order.
pub fn raw_archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, kind, body, link): (&str, tar::EntryType, &[u8], Option<&str>) = match e {
            Entry::File(n, body) => (n, tar::EntryType::Regular, body, None),
            Entry::Dir(n) => (n, tar::EntryType::Directory, b"", None),
            Entry::Symlink(n, t) => (n, tar::EntryType::Symlink, b"", Some(t)),
            Entry::Hardlink(n, t) => (n, tar::EntryType::Link, b"", Some(t)),
        };
        let slot = &mut h.as_old_mut().name;
        slot[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(t) = link {
            let slot = &mut h.as_old_mut().linkname;
            slot[..t.len()].copy_from_slice(t.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(body.len() as u64);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        b.append(&h, body).unwrap();
    }
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}
