//! larder-load: a bounded load generator for larderd (issue 5, "Load").
//!
//! It opens one HTTP/1.1 connection per worker (so `--connections 500` really is 500 sockets on
//! the server), and every worker loops over a mix of full GETs, pinned range GETs (`Range` +
//! `If-Match`), HEADs, conditional GETs (`If-None-Match` → 304) and PUTs that overwrite keys the
//! other workers are reading, until the duration is up.
//!
//! A load test that only counts 2xx answers would miss exactly the bugs a cache like this can
//! have (a range spliced from two revisions, a 412 without a cause, a 304 for a stale ETag), so
//! the generator keeps a model of every key: which revisions exist, which is current, and
//! whether a writer touched the key while a request was in flight. Every response is checked
//! against what that model allows for its request kind, bytes included: full bodies are hashed
//! and compared with the content-digest ETag, range bodies are compared byte for byte with the
//! pinned revision, which the generator can regenerate at any offset. Anything else is an
//! "unexpected" answer; the process exits non-zero if there was one.
//!
//! Object contents are a pure function of (key, revision, offset), so neither side needs to
//! keep bodies in memory, and total disk use is bounded by the object set plus `--put-budget`.

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use larder_proto::units::{parse_duration, parse_size};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Load generator for larderd: N concurrent connections mixing reads and writes, every answer
/// checked against a model of the stored objects.
#[derive(Parser, Debug)]
#[command(name = "larder-load")]
struct Args {
    /// Base URL of larderd (plain HTTP)
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// How long the mixed load runs (s, m, h)
    #[arg(long, default_value = "2m")]
    duration: String,
    /// Concurrent connections, one per worker
    #[arg(long, default_value_t = 500)]
    connections: usize,
    /// Namespace the objects are written to
    #[arg(long, default_value = "load")]
    namespace: String,
    /// Object set: SIZE:COUNT pairs
    #[arg(long, default_value = "4KiB:64,64KiB:32,1MiB:16,16MiB:8,64MiB:4")]
    objects: String,
    /// Relative weights of the size classes (same order as --objects) when a request picks a key
    #[arg(long, default_value = "40,25,20,10,5")]
    class_weights: String,
    /// Relative weights of full GET, range GET, HEAD, conditional GET, PUT
    #[arg(long, default_value = "20,35,15,20,10")]
    mix: String,
    /// Bytes that overwrites may upload during the run; once spent, only objects of at most
    /// 64 KiB are overwritten (bounds the disk and S3 space a run uses)
    #[arg(long, default_value = "1GiB")]
    put_budget: String,
    /// Longest range asked for by a range GET
    #[arg(long, default_value = "1MiB")]
    max_range: String,
    /// Bearer token sent as `Authorization: Bearer TOKEN`
    #[arg(long, env = "LARDER_TOKEN")]
    token: Option<String>,
    /// PID of the server, to sample its RSS from /proc/PID/status
    #[arg(long)]
    pid: Option<u32>,
    /// Per-request timeout
    #[arg(long, default_value = "120s")]
    timeout: String,
    /// Seed of the request mix
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the summary as JSON to this file as well
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Name of this run in the summary (e.g. the server configuration)
    #[arg(long, default_value = "larderd")]
    label: String,
    /// Write the objects as files under DIR (at their URL paths) instead of PUTting them, for
    /// a static file server whose document root is DIR (nginx, as the reference); the ETags
    /// are then the server's own, learnt with a HEAD. Needs a mix without PUT.
    #[arg(long, value_name = "DIR")]
    static_root: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Get,
    Range,
    Head,
    CondGet,
    Put,
}

const KINDS: [Kind; 5] = [Kind::Get, Kind::Range, Kind::Head, Kind::CondGet, Kind::Put];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Get => "GET",
            Kind::Range => "range GET (If-Match)",
            Kind::Head => "HEAD",
            Kind::CondGet => "GET If-None-Match",
            Kind::Put => "PUT (overwrite)",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Object contents: a pure function of (object id, revision, offset).

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `buf` with the bytes of revision `rev` of object `id` starting at `offset`.
fn fill(id: u64, rev: u32, offset: u64, buf: &mut [u8]) {
    let seed = splitmix64((id << 32) | rev as u64);
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(seed ^ (pos / 8).wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

const CHUNK: usize = 1 << 20;

fn etag_of(id: u64, rev: u32, size: u64) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        fill(id, rev, off, &mut buf[..n]);
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    format!("\"{}\"", hasher.finalize().to_hex())
}

// ---------------------------------------------------------------------------------------------
// The model of the stored objects.

struct Object {
    id: u64,
    path: String,
    size: u64,
    state: Mutex<ObjState>,
    /// One writer per key at a time, so "the current revision" is always well defined.
    writing: AtomicBool,
}

#[derive(Default)]
struct ObjState {
    current: u32,
    etags: HashMap<String, u32>,
    /// The BLAKE3 digest of each revision's bytes, as larderd's ETags spell it (for larderd the
    /// ETag is this digest; a static file server has ETags of its own).
    digests: HashMap<u32, String>,
    /// PUTs started on this key; a reader compares it before and after its request.
    puts_started: u64,
    in_flight: bool,
}

/// What a reader knew about its key when it sent the request.
struct Snapshot {
    rev: u32,
    etag: String,
    puts_started: u64,
    in_flight: bool,
}

impl Object {
    fn snapshot(&self) -> Snapshot {
        let s = self.state.lock().unwrap();
        let etag = s
            .etags
            .iter()
            .find(|(_, r)| **r == s.current)
            .map(|(e, _)| e.clone())
            .expect("current revision has an ETag");
        Snapshot {
            rev: s.current,
            etag,
            puts_started: s.puts_started,
            in_flight: s.in_flight,
        }
    }

    /// Whether a write could have changed the key between `snap` and now.
    fn changed_since(&self, snap: &Snapshot) -> bool {
        snap.in_flight || self.state.lock().unwrap().puts_started > snap.puts_started
    }

    fn rev_of(&self, etag: &str) -> Option<u32> {
        self.state.lock().unwrap().etags.get(etag).copied()
    }

    fn digest_of(&self, rev: u32) -> Option<String> {
        self.state.lock().unwrap().digests.get(&rev).cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Default)]
struct Stats {
    latencies: HashMap<Kind, Vec<u32>>,
    /// (kind, status or error label) → count of answers the model allows.
    outcomes: BTreeMap<(Kind, String), u64>,
    unexpected: BTreeMap<(Kind, String), u64>,
    examples: Vec<String>,
    bytes_in: u64,
    bytes_out: u64,
    reconnects: u64,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        for (k, mut v) in o.latencies {
            self.latencies.entry(k).or_default().append(&mut v);
        }
        for (k, v) in o.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
        for (k, v) in o.unexpected {
            *self.unexpected.entry(k).or_default() += v;
        }
        for e in o.examples {
            if self.examples.len() < 30 {
                self.examples.push(e);
            }
        }
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.reconnects += o.reconnects;
    }
}

enum Verdict {
    Ok(String),
    Unexpected(String, String),
}

fn ok(label: impl Into<String>) -> Verdict {
    Verdict::Ok(label.into())
}

fn bad(label: impl Into<String>, detail: impl Into<String>) -> Verdict {
    Verdict::Unexpected(label.into(), detail.into())
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing: one connection per worker.

type ReqBody = BoxBody<Bytes, std::io::Error>;

struct Conn {
    addr: String,
    host: String,
    auth: Option<String>,
    sender: Option<SendRequest<ReqBody>>,
}

impl Conn {
    async fn sender(&mut self, stats: &mut Stats) -> anyhow::Result<&mut SendRequest<ReqBody>> {
        let usable = match &mut self.sender {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            if self.sender.is_some() {
                stats.reconnects += 1;
            }
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .with_context(|| format!("connect to {}", self.addr))?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("connected"))
    }

    fn request(&self, method: Method, path: &str) -> http::request::Builder {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host);
        if let Some(a) = &self.auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b
    }
}

fn empty_body() -> ReqBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The upload body of revision `rev` of `obj`, generated chunk by chunk.
fn put_body(id: u64, rev: u32, size: u64) -> ReqBody {
    let chunks = futures_util::stream::unfold(0u64, move |off| async move {
        if off >= size {
            return None;
        }
        let n = (size - off).min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        fill(id, rev, off, &mut buf);
        Some((
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(buf))),
            off + n as u64,
        ))
    });
    BoxBody::new(StreamBody::new(chunks))
}

fn header_str(h: &http::HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// How a body is checked while it streams in.
enum BodyCheck {
    /// Hash it; compare with the ETag afterwards.
    Digest(Box<blake3::Hasher>),
    /// Compare with revision `rev` of object `id` from `offset` on.
    Bytes { id: u64, rev: u32, offset: u64 },
    /// Ignore it (error bodies).
    Discard,
}

struct Received {
    len: u64,
    digest: Option<String>,
    /// Offset of the first byte that differed from the expected revision.
    mismatch_at: Option<u64>,
}

async fn read_body(
    body: hyper::body::Incoming,
    mut check: BodyCheck,
    scratch: &mut Vec<u8>,
) -> anyhow::Result<Received> {
    let mut body = body;
    let mut len = 0u64;
    let mut mismatch_at = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the body")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match &mut check {
            BodyCheck::Digest(h) => {
                h.update(&data);
            }
            BodyCheck::Bytes { id, rev, offset } => {
                if mismatch_at.is_none() {
                    scratch.resize(data.len(), 0);
                    fill(*id, *rev, *offset + len, scratch);
                    if let Some(i) = scratch.iter().zip(data.iter()).position(|(a, b)| a != b) {
                        mismatch_at = Some(*offset + len + i as u64);
                    }
                }
            }
            BodyCheck::Discard => {}
        }
        len += data.len() as u64;
    }
    let digest = match check {
        BodyCheck::Digest(h) => Some(format!("\"{}\"", h.finalize().to_hex())),
        _ => None,
    };
    Ok(Received {
        len,
        digest,
        mismatch_at,
    })
}

// ---------------------------------------------------------------------------------------------
// The requests and their checks.

struct Ctx {
    objects: Vec<Arc<Object>>,
    by_class: Vec<Vec<usize>>,
    class_weights: Vec<u32>,
    mix: Vec<u32>,
    put_budget: AtomicI64,
    max_range: u64,
    timeout: Duration,
    deadline: Instant,
}

fn pick(rng: &mut SmallRng, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    let mut r = rng.random_range(0..total);
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return i;
        }
        r -= w;
    }
    weights.len() - 1
}

/// Checks a 200 full body (GET) or a 200 HEAD against the model: an existing revision of the
/// key, the one current at the start unless a write could have intervened, with the right
/// length and (GET) bytes that hash to the ETag.
fn check_full(
    obj: &Object,
    snap: &Snapshot,
    etag: Option<&str>,
    content_length: Option<u64>,
    got: &Received,
    head: bool,
) -> Verdict {
    let Some(etag) = etag else {
        return bad("200 without ETag", "");
    };
    let Some(rev) = obj.rev_of(etag) else {
        return bad("200 unknown ETag", format!("ETag {etag}"));
    };
    if rev != snap.rev && !(rev > snap.rev && obj.changed_since(snap)) {
        return bad(
            "200 wrong revision",
            format!(
                "revision {rev}, expected {} and no write in between",
                snap.rev
            ),
        );
    }
    if content_length != Some(obj.size) {
        return bad(
            "200 wrong Content-Length",
            format!("{content_length:?}, size {}", obj.size),
        );
    }
    if head {
        if got.len != 0 {
            return bad("HEAD with a body", format!("{} bytes", got.len));
        }
    } else {
        if got.len != obj.size {
            return bad(
                "200 short body",
                format!("{} of {} bytes", got.len, obj.size),
            );
        }
        if got.digest.is_none() || got.digest != obj.digest_of(rev) {
            return bad(
                "200 body does not match ETag",
                format!("ETag {etag}, body digest {:?}", got.digest),
            );
        }
    }
    if rev == snap.rev {
        ok("200")
    } else {
        ok("200 (newer revision)")
    }
}

async fn one_request(
    ctx: &Ctx,
    conn: &mut Conn,
    rng: &mut SmallRng,
    stats: &mut Stats,
    scratch: &mut Vec<u8>,
) -> (Kind, Verdict) {
    let mut kind = KINDS[pick(rng, &ctx.mix)];
    let class = pick(rng, &ctx.class_weights);
    let keys = &ctx.by_class[class];
    let obj = ctx.objects[keys[rng.random_range(0..keys.len())]].clone();
    if kind == Kind::Put {
        // Another worker is writing this key, or the budget for big uploads is spent: read the
        // key instead.
        if obj.writing.swap(true, Ordering::AcqRel) {
            kind = Kind::Range;
        } else if obj.size > 64 << 10
            && ctx.put_budget.fetch_sub(obj.size as i64, Ordering::Relaxed) < obj.size as i64
        {
            obj.writing.store(false, Ordering::Release);
            kind = Kind::Range;
        }
    }
    let started = Instant::now();
    let verdict =
        match tokio::time::timeout(ctx.timeout, run(ctx, kind, &obj, conn, rng, stats, scratch))
            .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                conn.sender = None;
                bad("transport error", format!("{e:#}"))
            }
            Err(_) => {
                conn.sender = None;
                bad(
                    "timeout",
                    format!("no complete answer within {:?}", ctx.timeout),
                )
            }
        };
    if kind == Kind::Put {
        obj.state.lock().unwrap().in_flight = false;
        obj.writing.store(false, Ordering::Release);
    }
    let micros = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
    stats.latencies.entry(kind).or_default().push(micros);
    if let Verdict::Unexpected(_, d) = &verdict {
        let d = format!("{} {} ({} bytes): {d}", kind.name(), obj.path, obj.size);
        if stats.examples.len() < 30 {
            stats.examples.push(d);
        }
    }
    (kind, verdict)
}

async fn run(
    ctx: &Ctx,
    kind: Kind,
    obj: &Object,
    conn: &mut Conn,
    rng: &mut SmallRng,
    stats: &mut Stats,
    scratch: &mut Vec<u8>,
) -> anyhow::Result<Verdict> {
    match kind {
        Kind::Put => {
            let rev = obj.state.lock().unwrap().current + 1;
            let etag = etag_of(obj.id, rev, obj.size);
            {
                let mut s = obj.state.lock().unwrap();
                s.etags.insert(etag.clone(), rev);
                s.digests.insert(rev, etag.clone());
                s.puts_started += 1;
                s.in_flight = true;
            }
            let req = conn
                .request(Method::PUT, &obj.path)
                .header(header::CONTENT_LENGTH, obj.size)
                .body(put_body(obj.id, rev, obj.size))?;
            let resp = conn.sender(stats).await?.send_request(req).await?;
            stats.bytes_out += obj.size;
            let status = resp.status();
            let got_etag = header_str(resp.headers(), header::ETAG);
            read_body(resp.into_body(), BodyCheck::Discard, scratch).await?;
            if status != StatusCode::OK {
                return Ok(bad(
                    status.as_str(),
                    "PUT over an existing key: expected 200",
                ));
            }
            if got_etag.as_deref() != Some(etag.as_str()) {
                return Ok(bad(
                    "200 wrong ETag",
                    format!("got {got_etag:?}, content digest {etag}"),
                ));
            }
            obj.state.lock().unwrap().current = rev;
            Ok(ok("200"))
        }
        Kind::Get | Kind::Head => {
            let snap = obj.snapshot();
            let head = kind == Kind::Head;
            let method = if head { Method::HEAD } else { Method::GET };
            let req = conn.request(method, &obj.path).body(empty_body())?;
            let resp = conn.sender(stats).await?.send_request(req).await?;
            let status = resp.status();
            let etag = header_str(resp.headers(), header::ETAG);
            let cl =
                header_str(resp.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
            let check = if head || status != StatusCode::OK {
                BodyCheck::Discard
            } else {
                BodyCheck::Digest(Box::default())
            };
            let got = read_body(resp.into_body(), check, scratch).await?;
            stats.bytes_in += got.len;
            if status != StatusCode::OK {
                return Ok(bad(status.as_str(), "expected 200"));
            }
            Ok(check_full(obj, &snap, etag.as_deref(), cl, &got, head))
        }
        Kind::CondGet => {
            let snap = obj.snapshot();
            let req = conn
                .request(Method::GET, &obj.path)
                .header(header::IF_NONE_MATCH, &snap.etag)
                .body(empty_body())?;
            let resp = conn.sender(stats).await?.send_request(req).await?;
            let status = resp.status();
            let etag = header_str(resp.headers(), header::ETAG);
            let cl =
                header_str(resp.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
            let check = if status == StatusCode::OK {
                BodyCheck::Digest(Box::default())
            } else {
                BodyCheck::Discard
            };
            let got = read_body(resp.into_body(), check, scratch).await?;
            stats.bytes_in += got.len;
            match status {
                StatusCode::NOT_MODIFIED => {
                    if etag.as_deref() != Some(snap.etag.as_str()) {
                        return Ok(bad("304 wrong ETag", format!("{etag:?} for {}", snap.etag)));
                    }
                    if got.len != 0 {
                        return Ok(bad("304 with a body", format!("{} bytes", got.len)));
                    }
                    Ok(ok("304"))
                }
                // Only a newer revision may be served in full; check_full says whether one was.
                StatusCode::OK => match check_full(obj, &snap, etag.as_deref(), cl, &got, false) {
                    Verdict::Ok(_) if etag.as_deref() == Some(snap.etag.as_str()) => Ok(bad(
                        "200 for a current ETag",
                        format!("If-None-Match {} ignored", snap.etag),
                    )),
                    v => Ok(v),
                },
                s => Ok(bad(s.as_str(), "expected 304")),
            }
        }
        Kind::Range => {
            let snap = obj.snapshot();
            let len = rng.random_range(1..=obj.size.min(ctx.max_range));
            let start = rng.random_range(0..=obj.size - len);
            let end = start + len - 1;
            let req = conn
                .request(Method::GET, &obj.path)
                .header(header::RANGE, format!("bytes={start}-{end}"))
                .header(header::IF_MATCH, &snap.etag)
                .body(empty_body())?;
            let resp = conn.sender(stats).await?.send_request(req).await?;
            let status = resp.status();
            let etag = header_str(resp.headers(), header::ETAG);
            let content_range = header_str(resp.headers(), header::CONTENT_RANGE);
            let check = if status == StatusCode::PARTIAL_CONTENT {
                BodyCheck::Bytes {
                    id: obj.id,
                    rev: snap.rev,
                    offset: start,
                }
            } else {
                BodyCheck::Discard
            };
            let got = read_body(resp.into_body(), check, scratch).await?;
            stats.bytes_in += got.len;
            match status {
                StatusCode::PARTIAL_CONTENT => {
                    let want_cr = format!("bytes {start}-{end}/{}", obj.size);
                    if etag.as_deref() != Some(snap.etag.as_str()) {
                        return Ok(bad(
                            "206 wrong ETag",
                            format!("{etag:?}, pinned {}", snap.etag),
                        ));
                    }
                    if content_range.as_deref() != Some(want_cr.as_str()) {
                        return Ok(bad(
                            "206 wrong Content-Range",
                            format!("{content_range:?}, asked {want_cr}"),
                        ));
                    }
                    if got.len != len {
                        return Ok(bad(
                            "206 wrong length",
                            format!("{} of {len} bytes", got.len),
                        ));
                    }
                    if let Some(at) = got.mismatch_at {
                        return Ok(bad(
                            "206 wrong bytes",
                            format!("byte {at} differs from revision {}", snap.rev),
                        ));
                    }
                    Ok(ok("206"))
                }
                StatusCode::PRECONDITION_FAILED => {
                    if !obj.changed_since(&snap) {
                        return Ok(bad("412", "pinned to the current revision, no write since"));
                    }
                    match etag.as_deref().map(|e| obj.rev_of(e)) {
                        Some(Some(r)) if r > snap.rev => Ok(ok("412 (overwritten)")),
                        _ => Ok(bad(
                            "412 without a newer ETag",
                            format!("ETag {etag:?}, pinned revision {}", snap.rev),
                        )),
                    }
                }
                s => Ok(bad(s.as_str(), "expected 206")),
            }
        }
    }
}

async fn worker(ctx: Arc<Ctx>, mut conn: Conn, seed: u64) -> Stats {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    let mut scratch = Vec::new();
    while Instant::now() < ctx.deadline {
        let (kind, verdict) =
            one_request(&ctx, &mut conn, &mut rng, &mut stats, &mut scratch).await;
        match verdict {
            Verdict::Ok(label) => *stats.outcomes.entry((kind, label)).or_default() += 1,
            Verdict::Unexpected(label, _) => {
                *stats.unexpected.entry((kind, label)).or_default() += 1;
                // Back off a little so a server in trouble is not hammered by a tight error loop.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// RSS sampling.

#[derive(Default, Clone)]
struct Rss {
    samples: u64,
    max_rss_kib: u64,
    hwm_kib: u64,
    last_rss_kib: u64,
    /// VmRSS every 10 s: whether memory levels off or keeps growing under steady load.
    timeline_mib: Vec<u64>,
}

/// CPU time used so far, in seconds: (a process's user + system, the whole machine's busy).
/// The share the generator itself takes matters on a small machine, and the machine's total
/// shows whether other work competed with the server during the run.
#[derive(Default, Clone, Copy)]
struct Cpu {
    server: f64,
    generator: f64,
    machine_busy: f64,
}

fn process_cpu(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

fn machine_busy() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: busy = all but idle and iowait.
    let busy: u64 = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?;
    Some(busy as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn cpu_now(pid: Option<u32>) -> Cpu {
    Cpu {
        server: pid.and_then(|p| process_cpu(&p.to_string())).unwrap_or(0.0),
        generator: process_cpu("self").unwrap_or(0.0),
        machine_busy: machine_busy().unwrap_or(0.0),
    }
}

fn read_status(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

// ---------------------------------------------------------------------------------------------

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn parse_objects(spec: &str) -> anyhow::Result<Vec<(u64, usize)>> {
    spec.split(',')
        .map(|pair| {
            let (size, count) = pair
                .split_once(':')
                .with_context(|| format!("{pair:?}: expected SIZE:COUNT"))?;
            let size = parse_size(size).map_err(anyhow::Error::msg)?;
            let count: usize = count
                .parse()
                .with_context(|| format!("count in {pair:?}"))?;
            if size == 0 || count == 0 {
                bail!("{pair:?}: size and count must be positive");
            }
            Ok((size, count))
        })
        .collect()
}

fn parse_weights(spec: &str, n: usize, what: &str) -> anyhow::Result<Vec<u32>> {
    let w: Vec<u32> = spec
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what}: expected comma-separated integers"))?;
    if w.len() != n || w.iter().sum::<u32>() == 0 {
        bail!("{what}: expected {n} weights, not all zero");
    }
    Ok(w)
}

fn human_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// Writes revision 0 of `obj` as a file under `root` at its URL path, and returns the ETag the
/// server in front of `root` gives it.
async fn write_static(
    root: &std::path::Path,
    obj: &Object,
    conn: &mut Conn,
    stats: &mut Stats,
) -> anyhow::Result<String> {
    let path = root.join(obj.path.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().unwrap())?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < obj.size {
        let n = (obj.size - off).min(CHUNK as u64) as usize;
        fill(obj.id, 0, off, &mut buf[..n]);
        std::io::Write::write_all(&mut file, &buf[..n])?;
        off += n as u64;
    }
    std::io::Write::flush(&mut file)?;
    let req = conn.request(Method::HEAD, &obj.path).body(empty_body())?;
    let resp = conn.sender(stats).await?.send_request(req).await?;
    let etag = header_str(resp.headers(), header::ETAG);
    match (resp.status(), etag) {
        (StatusCode::OK, Some(etag)) => Ok(etag),
        (status, etag) => bail!(
            "HEAD {} after writing it: {status}, ETag {etag:?}",
            obj.path
        ),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let duration = parse_duration(&args.duration).map_err(anyhow::Error::msg)?;
    let timeout = parse_duration(&args.timeout).map_err(anyhow::Error::msg)?;
    let objects_spec = parse_objects(&args.objects)?;
    let class_weights = parse_weights(&args.class_weights, objects_spec.len(), "--class-weights")?;
    let mix = parse_weights(&args.mix, KINDS.len(), "--mix")?;
    let put_budget = parse_size(&args.put_budget).map_err(anyhow::Error::msg)?;
    let max_range = parse_size(&args.max_range)
        .map_err(anyhow::Error::msg)?
        .max(1);
    let host = args
        .url
        .strip_prefix("http://")
        .context("--url must start with http://")?
        .trim_end_matches('/')
        .to_string();
    let auth = args.token.as_ref().map(|t| format!("Bearer {t}"));
    let new_conn = || Conn {
        addr: host.clone(),
        host: host.clone(),
        auth: auth.clone(),
        sender: None,
    };

    // The object set, revision 0 of each, written before the clock starts.
    let mut objects = Vec::new();
    let mut by_class = vec![Vec::new(); objects_spec.len()];
    for (class, (size, count)) in objects_spec.iter().enumerate() {
        for i in 0..*count {
            let id = objects.len() as u64 + 1;
            by_class[class].push(objects.len());
            objects.push(Arc::new(Object {
                id,
                path: format!(
                    "/api/v1/object/{}/{}/obj-{i}",
                    args.namespace,
                    human_size(*size).replace(' ', "")
                ),
                size: *size,
                state: Mutex::new(ObjState::default()),
                writing: AtomicBool::new(false),
            }));
        }
    }
    let total: u64 = objects.iter().map(|o| o.size).sum();
    eprintln!(
        "larder-load: writing {} objects ({}) to {}",
        objects.len(),
        human_size(total),
        args.url
    );
    let setup = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    if args.static_root.is_some() && mix[KINDS.iter().position(|k| *k == Kind::Put).unwrap()] > 0 {
        bail!("--static-root needs a --mix without PUT (a static file server takes no uploads)");
    }
    for _ in 0..8 {
        let static_root = args.static_root.clone();
        let objects = objects.clone();
        let next = next.clone();
        let mut conn = new_conn();
        writers.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(obj) = objects.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                let etag = etag_of(obj.id, 0, obj.size);
                if let Some(root) = &static_root {
                    let served = write_static(root, obj, &mut conn, &mut stats).await?;
                    let mut s = obj.state.lock().unwrap();
                    s.etags.insert(served, 0);
                    s.digests.insert(0, etag);
                    continue;
                }
                let req = conn
                    .request(Method::PUT, &obj.path)
                    .header(header::CONTENT_LENGTH, obj.size)
                    .body(put_body(obj.id, 0, obj.size))?;
                let resp = conn.sender(&mut stats).await?.send_request(req).await?;
                let status = resp.status();
                let got = header_str(resp.headers(), header::ETAG);
                read_body(resp.into_body(), BodyCheck::Discard, &mut Vec::new()).await?;
                if !(status == StatusCode::CREATED || status == StatusCode::OK)
                    || got.as_deref() != Some(etag.as_str())
                {
                    bail!(
                        "setup PUT {}: {status}, ETag {got:?}, expected {etag}",
                        obj.path
                    );
                }
                let mut s = obj.state.lock().unwrap();
                s.etags.insert(etag.clone(), 0);
                s.digests.insert(0, etag);
            }
        }));
    }
    for w in writers {
        w.await??;
    }
    eprintln!(
        "larder-load: set-up took {:.1} s; {} connections for {:?}",
        setup.elapsed().as_secs_f64(),
        args.connections,
        duration
    );

    let ctx = Arc::new(Ctx {
        objects,
        by_class,
        class_weights,
        mix,
        put_budget: AtomicI64::new(put_budget as i64),
        max_range,
        timeout,
        deadline: Instant::now() + duration,
    });

    let rss = Arc::new(Mutex::new(Rss::default()));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = args.pid.map(|pid| {
        let rss = rss.clone();
        let sampling = sampling.clone();
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some((now, hwm)) = read_status(pid) {
                    let mut r = rss.lock().unwrap();
                    r.samples += 1;
                    r.max_rss_kib = r.max_rss_kib.max(now);
                    r.hwm_kib = hwm;
                    r.last_rss_kib = now;
                    if r.samples % 50 == 1 {
                        r.timeline_mib.push(now >> 10);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });

    let started = Instant::now();
    let cpu0 = cpu_now(args.pid);
    let mut handles = Vec::new();
    for w in 0..args.connections {
        handles.push(tokio::spawn(worker(
            ctx.clone(),
            new_conn(),
            args.seed.wrapping_mul(1_000_003).wrapping_add(w as u64),
        )));
    }
    let mut stats = Stats::default();
    for h in handles {
        stats.merge(h.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu1 = cpu_now(args.pid);
    let pct = |a: f64, b: f64| (b - a) / elapsed * 100.0;
    let (server_cpu, generator_cpu, machine_cpu) = (
        pct(cpu0.server, cpu1.server),
        pct(cpu0.generator, cpu1.generator),
        pct(cpu0.machine_busy, cpu1.machine_busy),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    sampling.store(false, Ordering::Relaxed);
    if let Some(s) = sampler {
        s.await?;
    }
    let rss = rss.lock().unwrap().clone();

    // The report.
    let mut out = String::new();
    let requests: usize = stats.latencies.values().map(Vec::len).sum();
    let unexpected: u64 = stats.unexpected.values().sum();
    writeln!(
        out,
        "## {}: {} connections, {:.0} s, {} requests ({:.0} req/s), {:.1} MiB/s received, {:.1} MiB/s sent, {} unexpected, {} reconnects",
        args.label,
        args.connections,
        elapsed,
        requests,
        requests as f64 / elapsed,
        stats.bytes_in as f64 / elapsed / (1 << 20) as f64,
        stats.bytes_out as f64 / elapsed / (1 << 20) as f64,
        unexpected,
        stats.reconnects
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| request | count | req/s | p50 ms | p99 ms | max ms | answers | unexpected |"
    )?;
    writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
    )?;
    let mut json_kinds = serde_json::Map::new();
    for kind in KINDS {
        let mut lat = stats.latencies.remove(&kind).unwrap_or_default();
        lat.sort_unstable();
        let answers: Vec<String> = stats
            .outcomes
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, l), n)| format!("{l}: {n}"))
            .collect();
        let bad_n: u64 = stats
            .unexpected
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, n)| n)
            .sum();
        let (p50, p99, max) = (
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
        );
        writeln!(
            out,
            "| {} | {} | {:.0} | {p50:.1} | {p99:.1} | {max:.1} | {} | {bad_n} |",
            kind.name(),
            lat.len(),
            lat.len() as f64 / elapsed,
            answers.join(", ")
        )?;
        json_kinds.insert(
            kind.name().to_string(),
            serde_json::json!({
                "count": lat.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max,
                "answers": answers, "unexpected": bad_n,
            }),
        );
    }
    if args.pid.is_some() {
        writeln!(
            out,
            "\nServer RSS ({} samples every 0.2 s): peak sampled {:.1} MiB, VmHWM {:.1} MiB, at the end {:.1} MiB",
            rss.samples,
            rss.max_rss_kib as f64 / 1024.0,
            rss.hwm_kib as f64 / 1024.0,
            rss.last_rss_kib as f64 / 1024.0
        )?;
        writeln!(
            out,
            "Server RSS every 10 s (MiB): {}",
            rss.timeline_mib
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        )?;
    }
    writeln!(
        out,
        "CPU (% of one core; the machine has {}%): server {server_cpu:.0}%, generator {generator_cpu:.0}%, other processes {:.0}%, machine {machine_cpu:.0}%",
        cores * 100,
        (machine_cpu - server_cpu - generator_cpu).max(0.0)
    )?;
    if unexpected > 0 {
        writeln!(out, "\nUnexpected answers:")?;
        for ((kind, label), n) in &stats.unexpected {
            writeln!(out, "- {}: {label} × {n}", kind.name())?;
        }
        writeln!(out, "\nFirst examples:")?;
        for e in &stats.examples {
            writeln!(out, "- {e}")?;
        }
    }
    print!("{out}");
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "label": args.label,
            "connections": args.connections,
            "seconds": elapsed,
            "requests": requests,
            "req_per_s": requests as f64 / elapsed,
            "mib_per_s_in": stats.bytes_in as f64 / elapsed / (1 << 20) as f64,
            "mib_per_s_out": stats.bytes_out as f64 / elapsed / (1 << 20) as f64,
            "unexpected": unexpected,
            "reconnects": stats.reconnects,
            "rss_peak_mib": rss.max_rss_kib as f64 / 1024.0,
            "rss_hwm_mib": rss.hwm_kib as f64 / 1024.0,
            "rss_end_mib": rss.last_rss_kib as f64 / 1024.0,
            "rss_timeline_mib": rss.timeline_mib,
            "cpu_pct": { "server": server_cpu, "generator": generator_cpu, "machine": machine_cpu },
            "kinds": json_kinds,
        });
        std::fs::write(path, format!("{v:#}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    if unexpected > 0 {
        std::process::exit(1);
    }
    Ok(())
}
