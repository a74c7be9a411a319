//! The HTTP object API (docs/ARCHITECTURE.md, "One request's path"): routing, and the translation of tier
//! outcomes into status lines and headers.
//!
//! Handlers decide nothing themselves: the tier applies `larder_proto::decide_read` to the
//! revision it opened, and a handler only turns the outcome into a response. A response with a
//! body is built only once the tier has opened its first byte source, and a body stream that
//! fails later makes hyper abort the connection (the declared `Content-Length` is never met),
//! so a failure can never look like a clean short body.

use crate::access_log::AccessLine;
use crate::auth::{Caller, Denied, LiveAuth, Scope};
use crate::config::Limits;
use crate::io::{BodyCheck, Pump};
use crate::metrics::{RequestMetrics, limit_rejected};
use bytes::Bytes;
use futures_util::{FutureExt, TryStreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use larder_proto::units::parse_duration;
use larder_proto::{ByteRange, Key, Namespace, ReadConditions, ReadOutcome, WritePrecondition};
use larder_tier::{
    AtHandBody, ErrorKind, FileRegion, GetOptions, GetResponse, ObjectMeta, PutOptions, Tier,
    TierError,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use tracing::Instrument;

pub type Body = UnsyncBoxBody<Bytes, TierError>;

pub struct State {
    pub tier: Arc<dyn Tier>,
    pub max_ttl: Duration,
    pub max_object_size: u64,
    pub metrics: PrometheusHandle,
    pub started: Instant,
    pub auth: LiveAuth,
    pub limits: Limits,
    /// One permit per upload in progress (`limits.max_uploads`).
    pub uploads: Arc<Semaphore>,
    /// Test fault hook, never for production: requests for this object panic in the handler,
    /// so tests can check that a panic costs only its own request. Read once at start-up from
    /// `LARDER_TEST_FAULT_PANIC_KEY` (`ns/key`); when unset, one `None` check per request.
    pub test_fault_panic: Option<(Namespace, Key)>,
    /// Git snapshots; `None` when no `--git-allow` pattern is configured.
    pub git: Option<Arc<crate::git::GitService>>,
    /// The Bazel remote cache's settings (`[bazel]`).
    pub bazel: crate::config::BazelSettings,
}

/// What the access log line of a request reports beyond the status: filled in by the handler
/// that knows it.
#[derive(Default)]
pub(crate) struct RequestLog {
    pub(crate) ns: Option<Namespace>,
    pub(crate) key: Option<Key>,
    pub(crate) tier: &'static str,
    pub(crate) token: String,
}

/// A request as handlers see it: the head, and the body for the handler that reads it. Whatever
/// of the body a handler leaves unread, `handle` deals with once the answer is decided (see
/// [`finish_body`]), so no handler has to remember it for each early answer.
pub(crate) struct Req {
    pub(crate) head: Parts,
    body: BodyState,
}

enum BodyState {
    /// Untouched by the handler.
    Unread(Incoming),
    /// Taken by a handler that has not said how far it read it: nothing can finish it, so the
    /// connection must close. A handler that panics with the body leaves it so.
    Taken,
    /// Given back by a handler that stopped reading before the end.
    Returned(Incoming),
    /// Read to its end.
    Done,
}

impl Req {
    pub(crate) fn method(&self) -> &Method {
        &self.head.method
    }

    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.head.headers
    }

    /// The body, for a handler that reads it; it then reports with `body_done` or `return_body`.
    pub(crate) fn take_body(&mut self) -> Incoming {
        match std::mem::replace(&mut self.body, BodyState::Taken) {
            BodyState::Unread(body) | BodyState::Returned(body) => body,
            BodyState::Taken | BodyState::Done => unreachable!("the request body is taken once"),
        }
    }

    pub(crate) fn body_done(&mut self) {
        self.body = BodyState::Done;
    }

    pub(crate) fn return_body(&mut self, body: Incoming) {
        self.body = BodyState::Returned(body);
    }

    /// Gives back a body the handler took but never read from: as if untouched, so a body
    /// behind `Expect: 100-continue` stays uninvited.
    pub(crate) fn return_unread_body(&mut self, body: Incoming) {
        self.body = BodyState::Unread(body);
    }
}

const OBJECT_PREFIX: &str = "/api/v1/object/";
const BAZEL_PREFIX: &str = "/bazel/";
const GIT_PREFIX: &str = "/api/v1/git/";
/// Names the namespace of a repository's snapshots in answers of the head route.
const GIT_NAMESPACE_HEADER: HeaderName = HeaderName::from_static("larder-namespace");
const GIT_HEAD: &str = "/head";
const GIT_BUNDLES_LIST: &str = "/bundles.list";
/// How long a client waits before asking again for a head record that is being generated.
const GIT_RETRY_AFTER: &str = "5";
const OBJECT_METHODS: &str = "GET, HEAD, PUT, POST, DELETE";
const READ_METHODS: &str = "GET, HEAD";

/// Response headers a client may store with an object. Everything else (Authorization, Cookie,
/// hop-by-hop headers, …) is dropped so a cache can never replay credentials.
fn is_storable_header(name: &str) -> bool {
    matches!(
        name,
        "content-type" | "content-encoding" | "content-disposition" | "cache-control"
    ) || name.starts_with("x-larder-meta-")
}

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let request_id =
        RequestId::of_request(req.headers().get("x-request-id").map(HeaderValue::as_bytes));
    let id = request_id.as_str();
    // The futures are instrumented, never entered across an `.await`: a guard held over a
    // suspension point stays on the stack of whichever thread ran it, so other requests' log
    // lines inherited it (chains of dozens of spans) and the subscriber could panic.
    let span = tracing::info_span!(
        "request",
        request_id = id,
        %method,
        ns = tracing::field::Empty,
        key = tracing::field::Empty,
        tier = tracing::field::Empty,
        etag = tracing::field::Empty
    );
    let mut log = RequestLog::default();
    let (head, body) = req.into_parts();
    let mut req = Req {
        head,
        body: BodyState::Unread(body),
    };
    // The route borrows the path from a copy of the URI (a reference count), so that the
    // handler may still borrow the request mutably.
    let uri = req.head.uri.clone();
    let (route, mut response) = match oversized_head(&state.limits, req.headers()) {
        Some(refused) => ("unknown", refused),
        None => {
            let parsed = Route::parse(uri.path());
            let route = parsed.label();
            let routed = AssertUnwindSafe(self::route(&state, parsed, &mut req, &mut log))
                .catch_unwind()
                .instrument(span.clone())
                .await;
            match routed {
                Ok(response) => (route, response),
                // One request's bug must not cost the connection (and the other requests
                // queued on it): it gets a 500, and its body is finished like any other.
                Err(panic) => (route, panicked(id, &*panic)),
            }
        }
    };
    finish_body(&mut req, &mut response).instrument(span).await;
    let status = response.status();
    let etag = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    account(
        started,
        &method,
        status,
        AccessLine {
            request_id: id,
            route,
            ns: log.ns.as_ref().map_or("", |n| n.as_str()),
            key: log.key.as_ref().map_or("", |k| k.as_str()),
            tier: log.tier,
            etag,
            token: &log.token,
            ..AccessLine::default()
        },
    );
    response.headers_mut().insert(
        HeaderName::from_static("x-request-id"),
        request_id.header_value(),
    );
    response
}

/// The routes whose reads the HTTP/1.1 fast path answers: on each, a GET or HEAD is a plain read
/// of one object, so it means the same on either path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadRoute {
    /// `/api/v1/object/{ns}/{key}`
    Object,
    /// `/bazel/{ns}/cas/{sha256}`: Bazel's blobs, most of a build's cache reads.
    BazelCas,
    /// `/bazel/{ns}/ac/{sha256}`: a plain object read where action results are not checked
    /// (ccache's `layout=bazel`), else answered by `bazel::action_result`, after its blobs.
    BazelAc,
}

impl ReadRoute {
    /// The route, namespace and key of `path` when it is one of these routes; Bazel's only with
    /// a well-formed hash (else `bazel.rs` says what is wrong).
    pub(crate) fn of_path(path: &str) -> Option<(ReadRoute, &str, &str)> {
        if let Some(rest) = path.strip_prefix(OBJECT_PREFIX) {
            let (ns, key) = rest.split_once('/').unwrap_or((rest, ""));
            return Some((ReadRoute::Object, ns, key));
        }
        crate::bazel::read_route(path.strip_prefix(BAZEL_PREFIX)?)
    }

    /// The label of its metrics and access lines, as on the general path.
    fn label(self) -> &'static str {
        match self {
            ReadRoute::Object => "object",
            ReadRoute::BazelCas => "bazel_cas",
            ReadRoute::BazelAc => "bazel_ac",
        }
    }
}

/// A GET or HEAD of an object as the HTTP/1.1 fast path (`fast_path.rs`) parsed it: the only
/// request fields it lets through.
pub(crate) struct ObjectRead<'a> {
    pub route: ReadRoute,
    pub ns: &'a str,
    pub key: &'a str,
    pub head: bool,
    pub request_id: RequestId,
    pub authorization: Option<HeaderValue>,
    pub if_match: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub range: Option<&'a str>,
}

/// Bodies from the local disk that it holds in memory (up to this size) are written by the fast
/// path with their head. Bodies in a file are sent from it by the kernel, whatever their size:
/// reading one into memory to write it cost two copies more, which for 64 KiB objects was half
/// the CPU of a request once they no longer fit in the CPU's cache (BENCHMARKS.md, round 12).
pub(crate) const SMALL_READ: u64 = 64 * 1024;

/// What [`read_object`] decided.
pub(crate) enum ReadAnswer {
    /// A 200 or 206 (or their HEAD) or a 304 whose body, if any, is small and was read whole:
    /// the fast path writes it with the fields of [`body_fields`] / [`not_modified_fields`].
    Small {
        status: StatusCode,
        meta: ObjectMeta,
        range: Option<ByteRange>,
        body: Bytes,
        request_id: RequestId,
        /// When the read was answered: the access line's time, and the `Date` to send.
        answered_at: SystemTime,
    },
    /// A 200 or 206 from the local disk whose body is not small: the fields of [`body_fields`],
    /// then the bytes of `region`, which the fast path hands to `sendfile` (or, with
    /// `LARDER_SENDFILE=0`, copies from `body`, which is there in that case).
    File {
        status: StatusCode,
        meta: ObjectMeta,
        range: Option<ByteRange>,
        region: FileRegion,
        body: Option<larder_tier::BodyStream>,
        request_id: RequestId,
        answered_at: SystemTime,
    },
    /// Any other answer, with `X-Request-Id`, and the tier that serves its body.
    Response(Response<Body>, &'static str),
    /// The body failed while it was read; the request was counted as the general path counts
    /// it (the status was decided), and the connection cannot say more.
    Broken,
}

/// Answers a read on the fast path, counted in the metrics and the access log like any other
/// request; `None` when it must take the general path instead (a malformed name, the test
/// fault hook): nothing has happened yet then. `started` is when the request's
/// head had arrived (the caller's clock read, which it keeps for its own timeout).
pub(crate) async fn read_object(
    state: &State,
    read: ObjectRead<'_>,
    started: Instant,
) -> Option<ReadAnswer> {
    let (ns, key) = parse_names(read.ns, read.key).ok()?;
    if state
        .test_fault_panic
        .as_ref()
        .is_some_and(|fault| fault.0 == ns && fault.1 == key)
    {
        return None;
    }
    let id = read.request_id.as_str();
    let method = if read.head { Method::HEAD } else { Method::GET };
    let token = if state.auth.open() {
        String::new()
    } else {
        let mut headers = HeaderMap::new();
        if let Some(value) = read.authorization {
            headers.insert(header::AUTHORIZATION, value);
        }
        // The token set is let go at the end of this statement, before the read waits.
        match state
            .auth
            .current()
            .authorize(&headers, Scope::Read, Some(&ns))
        {
            Ok(caller) => caller.name().to_string(),
            // Answered here, as the general path answers it: a client that sends its
            // credentials only after a challenge (Gradle, Maven) would otherwise take its
            // connection to hyper with its first request, for good.
            Err(refused) => {
                let (answer, status, _) =
                    general(denied(refused), &RequestLog::default(), &read.request_id);
                account(
                    started,
                    &method,
                    status,
                    AccessLine {
                        request_id: id,
                        route: read.route.label(),
                        ..AccessLine::default()
                    },
                );
                return Some(answer);
            }
        }
    };
    let mut log = RequestLog {
        ns: None,
        key: None,
        tier: "",
        token,
    };
    let conditions = ReadConditions::from_headers(
        read.if_match,
        read.if_none_match,
        None,
        None,
        None,
        read.range,
    );
    if read.route == ReadRoute::BazelAc && state.bazel.checks_action_results(&ns) {
        // Small, and answered after its blobs are looked up: no file or memory at hand to
        // write from, but no reason to leave the connection to hyper either.
        let span = tracing::info_span!(
            "request",
            request_id = id,
            %method,
            ns = ns.as_str(),
            key = key.as_str()
        );
        let checked = crate::bazel::action_result(state, (&ns, &key), &conditions, read.head);
        let answered = AssertUnwindSafe(checked.instrument(span))
            .catch_unwind()
            .await;
        let (response, tier) = match answered {
            Ok(answered) => answered,
            Err(panic) => (panicked(id, &*panic), ""),
        };
        log.tier = tier;
        let (answer, status, etag) = general(response, &log, &read.request_id);
        let read_of = (read.route, &ns, &key);
        account_read(started, &method, status, id, read_of, &log, etag.as_ref());
        return Some(answer);
    }
    let opts = GetOptions {
        conditions,
        head: read.head,
    };
    // No request span around the read: creating one (its fields formatted by the subscriber)
    // cost as much as serving a small object from disk. What the tiers log on their own names
    // the key; the line that reports a failed request is written inside the request's span.
    // What the tier has at hand (a body in memory or in an open file) is answered without a
    // future or a body stream, each of which cost about as much as the lookup; anything else
    // takes the tier's `get`. With `LARDER_SENDFILE=0` every read takes `get`: copying a body
    // from a file needs the tier's stream, and asking twice would look the key up (and count
    // its hit) twice.
    let at_hand = if crate::fast_path::sendfile_enabled() {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            state.tier.read_at_hand(&ns, &key, &opts)
        }))
    } else {
        Ok(None)
    };
    let answered = match at_hand {
        Ok(Some(read)) => Ok(read.map(Got::AtHand)),
        Ok(None) => AssertUnwindSafe(state.tier.get(&ns, &key, opts))
            .catch_unwind()
            .await
            .map(|got| got.map(Got::Streamed)),
        Err(panic) => Err(panic),
    };
    let (mut answer, status, etag) = match answered {
        Ok(Ok(got)) => match local_answer(got).await {
            Ok(Local::Read(status, range, meta, body)) => {
                log.tier = "disk";
                let etag = Some(meta.etag.clone());
                let answer = match body {
                    Some(body) => ReadAnswer::Small {
                        status,
                        meta,
                        range,
                        body,
                        request_id: read.request_id,
                        // Set below, from the clock read that stamps the access line.
                        answered_at: SystemTime::UNIX_EPOCH,
                    },
                    None => ReadAnswer::Broken,
                };
                (answer, status, etag)
            }
            Ok(Local::File(status, range, meta, region, body)) => {
                log.tier = "disk";
                let etag = Some(meta.etag.clone());
                let answer = ReadAnswer::File {
                    status,
                    meta,
                    range,
                    region,
                    body,
                    request_id: read.request_id,
                    answered_at: SystemTime::UNIX_EPOCH,
                };
                (answer, status, etag)
            }
            Err(got) => general(respond(got, &mut log), &log, &read.request_id),
        },
        Ok(Err(e)) => {
            let span = tracing::info_span!(
                "request",
                request_id = id,
                %method,
                ns = ns.as_str(),
                key = key.as_str()
            );
            general(span.in_scope(|| tier_error(e)), &log, &read.request_id)
        }
        Err(panic) => general(panicked(id, &*panic), &log, &read.request_id),
    };
    let read_of = (read.route, &ns, &key);
    let now = account_read(started, &method, status, id, read_of, &log, etag.as_ref());
    if let ReadAnswer::Small { answered_at, .. } | ReadAnswer::File { answered_at, .. } =
        &mut answer
    {
        *answered_at = now;
    }
    Some(answer)
}

/// Counts a read of the fast path in the metrics and writes its access line; the clock read
/// that stamped it.
fn account_read(
    started: Instant,
    method: &Method,
    status: StatusCode,
    request_id: &str,
    (route, ns, key): (ReadRoute, &Namespace, &Key),
    log: &RequestLog,
    etag: Option<&larder_proto::ETag>,
) -> SystemTime {
    account(
        started,
        method,
        status,
        AccessLine {
            request_id,
            route: route.label(),
            ns: ns.as_str(),
            key: key.as_str(),
            tier: log.tier,
            etag: etag.map_or("", larder_proto::ETag::quoted),
            token: &log.token,
            ..AccessLine::default()
        },
    )
}

/// A general answer of the fast path, with what its access line needs.
fn general(
    mut response: Response<Body>,
    log: &RequestLog,
    request_id: &RequestId,
) -> (ReadAnswer, StatusCode, Option<larder_proto::ETag>) {
    let status = response.status();
    let etag = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .and_then(larder_proto::ETag::parse);
    response.headers_mut().insert(
        HeaderName::from_static("x-request-id"),
        request_id.header_value(),
    );
    (ReadAnswer::Response(response, log.tier), status, etag)
}

/// A read the fast path writes itself: from the local disk, a 200, 206 or 304.
enum Local {
    /// Its body, small, read whole (`None`: the body failed).
    Read(StatusCode, Option<ByteRange>, ObjectMeta, Option<Bytes>),
    /// Its body, large, as a region of the revision's file (and as the tier's stream, when
    /// the tier made one).
    File(
        StatusCode,
        Option<ByteRange>,
        ObjectMeta,
        FileRegion,
        Option<larder_tier::BodyStream>,
    ),
}

/// A read as the tier answered it.
enum Got {
    AtHand(larder_tier::AtHand),
    Streamed(GetResponse),
}

/// What the fast path writes of a decided read, or the response back for the general path.
#[allow(clippy::result_large_err)]
async fn local_answer(got: Got) -> Result<Local, GetResponse> {
    let got = match got {
        Got::AtHand(read) => return at_hand_answer(read),
        Got::Streamed(got) => got,
    };
    let (status, range) = match got.outcome {
        ReadOutcome::Full => (StatusCode::OK, None),
        ReadOutcome::Partial(range) => (StatusCode::PARTIAL_CONTENT, Some(range)),
        ReadOutcome::NotModified => (StatusCode::NOT_MODIFIED, None),
        _ => return Err(got),
    };
    if got.source != "disk" {
        return Err(got);
    }
    let Some(mut stream) = got.body else {
        return Ok(Local::Read(status, range, got.meta, Some(Bytes::new())));
    };
    let len = range.map_or(got.meta.size, |r| r.len);
    if len > SMALL_READ || got.file.is_some() {
        // Sent from the file; the stream, not polled yet, reads nothing unless sendfile is off.
        return match got.file {
            Some(region) => Ok(Local::File(status, range, got.meta, region, Some(stream))),
            None => Err(GetResponse {
                body: Some(stream),
                ..got
            }),
        };
    }
    let mut whole = bytes::BytesMut::new();
    let mut first: Option<Bytes> = None;
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let Ok(chunk) = chunk else {
            return Ok(Local::Read(status, range, got.meta, None));
        };
        crate::metrics::bytes_served("disk", chunk.len() as u64);
        match first.take() {
            None if whole.is_empty() => first = Some(chunk),
            earlier => {
                if let Some(earlier) = earlier {
                    whole.extend_from_slice(&earlier);
                }
                whole.extend_from_slice(&chunk);
            }
        }
    }
    let body = first.unwrap_or_else(|| whole.freeze());
    // A body shorter than the Content-Length about to be sent would leave the client waiting.
    if body.len() as u64 != len {
        return Ok(Local::Read(status, range, got.meta, None));
    }
    Ok(Local::Read(status, range, got.meta, Some(body)))
}

/// [`local_answer`] of a read answered at hand: whatever its tier, its body is in memory or in
/// a local file, which the fast path writes itself.
#[allow(clippy::result_large_err)]
fn at_hand_answer(read: larder_tier::AtHand) -> Result<Local, GetResponse> {
    let (status, range) = match read.outcome {
        ReadOutcome::Full => (StatusCode::OK, None),
        ReadOutcome::Partial(range) => (StatusCode::PARTIAL_CONTENT, Some(range)),
        ReadOutcome::NotModified => (StatusCode::NOT_MODIFIED, None),
        // An outcome without a body (412, 416): the general path writes it.
        _ => {
            debug_assert!(matches!(read.body, AtHandBody::None));
            return Err(GetResponse {
                outcome: read.outcome,
                meta: read.meta,
                body: None,
                source: read.source,
                file: None,
            });
        }
    };
    match read.body {
        AtHandBody::None => Ok(Local::Read(status, range, read.meta, Some(Bytes::new()))),
        AtHandBody::Bytes(body) => {
            if !body.is_empty() {
                crate::metrics::bytes_served(read.source, body.len() as u64);
            }
            Ok(Local::Read(status, range, read.meta, Some(body)))
        }
        AtHandBody::File(region) => Ok(Local::File(status, range, read.meta, region, None)),
    }
}

/// Counts a finished request in the metrics and writes its access line (method, status and
/// time taken filled in here): one place for the general path and the fast path. Returns the
/// wall-clock time the line carries, for a `Date` field: one clock read serves both.
fn account(
    started: Instant,
    method: &Method,
    status: StatusCode,
    line: AccessLine<'_>,
) -> SystemTime {
    let took = started.elapsed();
    let now = SystemTime::now();
    RequestMetrics {
        route: line.route,
        method,
        status,
        took,
    }
    .record();
    crate::access_log::record(
        &AccessLine {
            method: method.as_str(),
            status: status.as_u16(),
            micros: took.as_micros() as u64,
            ..line
        },
        now,
    );
    now
}

/// The answer to a request whose handling panicked, logged and counted. `request_id` lets an
/// operator find the panic message the runtime printed for it.
pub fn panicked(request_id: &str, panic: &(dyn std::any::Any + Send)) -> Response<Body> {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not text)");
    metrics::counter!("larder_request_panics_total").increment(1);
    tracing::error!(request_id, panic = message, "request handler panicked");
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!(
            "internal error: the request handler panicked (request id {request_id}); the server log has the details"
        ),
    )
}

/// The id a request is known by, held in place: the client's `X-Request-Id` when it is short
/// and printable (so logs of a CI job and of the cache can be joined), else a new number, unique
/// within this process. A [`HeaderValue`] is made of it only for an answer built as a
/// [`Response`]: making one for every small GET on the fast path (a shared block's reference
/// count taken and dropped twice, the digits checked again) cost more than parsing its path.
#[derive(Clone, Copy)]
pub(crate) struct RequestId {
    bytes: [u8; MAX_REQUEST_ID],
    len: u8,
}

/// The longest client request id kept; a longer one is replaced by a new id.
const MAX_REQUEST_ID: usize = 64;

impl RequestId {
    /// The client's id (the value of its `X-Request-Id`, if it sent one) when it is short and
    /// printable, else a new one, unique within this process.
    pub(crate) fn of_request(given: Option<&[u8]>) -> RequestId {
        let mut id = RequestId {
            bytes: [0; MAX_REQUEST_ID],
            len: 0,
        };
        let mut number = itoa::Buffer::new();
        let kept = match given {
            Some(v) if usable_request_id(v) => v,
            _ => number.format(next_request_id()).as_bytes(),
        };
        id.bytes[..kept.len()].copy_from_slice(kept);
        id.len = kept.len() as u8;
        id
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The id as text (printable ASCII, so the empty fallback is never taken).
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// For an answer built as a [`Response`].
    pub(crate) fn header_value(&self) -> HeaderValue {
        // Printable ASCII is a valid value; the fallback is never taken.
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// Whether a client's request id is kept: short and printable, so that it can be written into
/// a log line and an answer as it is.
fn usable_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.iter().all(|b| b.is_ascii_graphic())
}

/// A number no other request of this process gets. Each thread takes a block of them at a
/// time: one shared counter bumped by every request of every worker is a cache line passed
/// between cores each time. Ids are unique, increasing within a thread, not across threads.
fn next_request_id() -> u64 {
    const BLOCK: u64 = 1024;
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static MINE: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    MINE.with(|mine| {
        let (mut next, mut end) = mine.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        mine.set((next + 1, end));
        next
    })
}

/// 431 for request heads over the configured limits. hyper's own limits sit above these (see
/// `server`) and answer without a reason; these answer with one.
fn oversized_head(limits: &Limits, headers: &HeaderMap) -> Option<Response<Body>> {
    if headers.len() > limits.max_headers {
        limit_rejected("header_count");
        return Some(text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request has {} header fields; the limit is {}",
                headers.len(),
                limits.max_headers
            ),
        ));
    }
    // Counted as on the wire: "name: value\r\n".
    let bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if bytes > limits.max_header_bytes {
        limit_rejected("header_bytes");
        return Some(text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request's header fields take {bytes} bytes; the limit is {}",
                limits.max_header_bytes
            ),
        ));
    }
    None
}

pub(crate) fn denied(d: Denied) -> Response<Body> {
    match d {
        Denied::Unauthenticated(reason) => {
            metrics::counter!("larder_auth_denied_total", "reason" => "unauthenticated")
                .increment(1);
            let mut r = text(StatusCode::UNAUTHORIZED, reason);
            // Both schemes are offered: HTTP clients of build tools (Gradle, Maven) send their
            // credentials only after a Basic challenge.
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"larder\""),
            );
            r.headers_mut().append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"larder\", charset=\"UTF-8\""),
            );
            r
        }
        Denied::Forbidden(reason) => {
            metrics::counter!("larder_auth_denied_total", "reason" => "forbidden").increment(1);
            text(StatusCode::FORBIDDEN, reason)
        }
    }
}

/// Where a request goes, parsed once from its path; the parameters are still percent-encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route<'a> {
    /// `/api/v1/object/{ns}/{key}`: namespace and key.
    Object(&'a str, &'a str),
    /// `/api/v1/git/{host}/{path}/head`: `{host}/{path}`.
    GitHead(&'a str),
    /// `/api/v1/git/{host}/{path}/bundles.list`: `{host}/{path}`.
    GitBundlesList(&'a str),
    /// Turborepo's remote cache API, `/turbo/v8/artifacts…` (`turbo.rs`).
    Turbo(crate::turbo::TurboRoute<'a>),
    /// Nx's self-hosted remote cache, `/nx/{ns}/v1/cache/{hash}` (`nx.rs`): namespace and hash.
    Nx(&'a str, &'a str),
    /// `/bazel/{ns}/ac/{hash}`, `/bazel/{ns}/cas/{hash}`: what follows `/bazel/` (`bazel.rs`).
    Bazel(&'a str),
    /// Health, metrics and listings: read-only, no parameters.
    Service(ServiceRoute),
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceRoute {
    /// `/_liveness`
    Liveness,
    /// `/_readiness`
    Readiness,
    /// `/metrics`
    Metrics,
    /// `/api/v1/namespaces`
    Namespaces,
    /// `/api/v1/stats`
    Stats,
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Route<'a> {
        if let Some(rest) = path.strip_prefix(OBJECT_PREFIX) {
            let (ns, key) = rest.split_once('/').unwrap_or((rest, ""));
            return Route::Object(ns, key);
        }
        if let Some(rest) = path.strip_prefix(BAZEL_PREFIX) {
            return Route::Bazel(rest);
        }
        if let Some(rest) = path.strip_prefix(GIT_PREFIX) {
            if let Some(repo) = rest.strip_suffix(GIT_HEAD) {
                return Route::GitHead(repo);
            }
            if let Some(repo) = rest.strip_suffix(GIT_BUNDLES_LIST) {
                return Route::GitBundlesList(repo);
            }
        }
        if let Some(turbo) = crate::turbo::TurboRoute::parse(path) {
            return Route::Turbo(turbo);
        }
        if let Some((ns, hash)) = crate::nx::parse(path) {
            return Route::Nx(ns, hash);
        }
        Route::Service(match path {
            "/_liveness" => ServiceRoute::Liveness,
            "/_readiness" => ServiceRoute::Readiness,
            "/metrics" => ServiceRoute::Metrics,
            "/api/v1/namespaces" => ServiceRoute::Namespaces,
            "/api/v1/stats" => ServiceRoute::Stats,
            _ => return Route::Unknown,
        })
    }

    /// The label of its metrics and access line.
    fn label(self) -> &'static str {
        match self {
            Route::Object(..) => "object",
            Route::GitHead(_) => "git_head",
            Route::GitBundlesList(_) => "git_bundles_list",
            Route::Turbo(turbo) => turbo.label(),
            Route::Nx(..) => "nx",
            Route::Bazel(rest) => crate::bazel::label(rest),
            Route::Service(ServiceRoute::Liveness) => "liveness",
            Route::Service(ServiceRoute::Readiness) => "readiness",
            Route::Service(ServiceRoute::Metrics) => "metrics",
            Route::Service(ServiceRoute::Namespaces) => "namespaces",
            Route::Service(ServiceRoute::Stats) => "stats",
            Route::Unknown => "unknown",
        }
    }
}

async fn route(
    state: &Arc<State>,
    route: Route<'_>,
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    match route {
        Route::Object(ns, key) => object(state, (ns, key), req, log).await,
        Route::GitHead(repo) => git_head(state, repo, req, log).await,
        Route::GitBundlesList(repo) => git_bundles_list(state, repo, req, log).await,
        Route::Turbo(turbo) => crate::turbo::handle(state, turbo, req, log).await,
        Route::Nx(ns, hash) => crate::nx::handle(state, (ns, hash), req, log).await,
        Route::Bazel(rest) => crate::bazel::handle(state, rest, req, log).await,
        Route::Unknown => text(
            StatusCode::NOT_FOUND,
            format!("no route for {}", req.head.uri.path()),
        ),
        Route::Service(service_route) => service(state, service_route, req, log).await,
    }
}

/// The read-only routes: health checks, metrics, namespace list and statistics.
async fn service(
    state: &Arc<State>,
    route: ServiceRoute,
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed(READ_METHODS);
    }
    // Owned: the namespace listing checks the caller again after waiting for the tier.
    let auth = state.auth.current_owned();
    // Health checks stay open: load balancers and supervisors carry no tokens.
    let needs = match route {
        ServiceRoute::Liveness | ServiceRoute::Readiness => None,
        ServiceRoute::Metrics if auth.public_metrics => None,
        ServiceRoute::Metrics | ServiceRoute::Stats => Some(Scope::Admin),
        ServiceRoute::Namespaces => Some(Scope::Read),
    };
    let caller = match needs {
        None => Caller::Open,
        Some(scope) => match auth.authorize(req.headers(), scope, None) {
            Ok(caller) => caller,
            Err(d) => return denied(d),
        },
    };
    log.token = caller.name().to_string();
    match route {
        ServiceRoute::Liveness => text(StatusCode::OK, "ok"),
        ServiceRoute::Readiness => match state.tier.ready().await {
            Ok(()) => text(StatusCode::OK, "ready"),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")),
        },
        ServiceRoute::Metrics => {
            let mut r = Response::new(full(crate::metrics::render(&state.metrics)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        ServiceRoute::Namespaces => match state.tier.list_namespaces().await {
            Ok(mut list) => {
                // A token sees only the namespaces it may read.
                list.retain(|usage| {
                    Namespace::parse(&usage.name)
                        .is_ok_and(|ns| caller.allows(Scope::Read, Some(&ns)))
                });
                json_response(StatusCode::OK, &json!({ "namespaces": list }))
            }
            Err(e) => tier_error(e),
        },
        ServiceRoute::Stats => match state.tier.stats().await {
            Ok(tiers) => json_response(
                StatusCode::OK,
                &json!({ "uptime_seconds": state.started.elapsed().as_secs(), "tiers": tiers }),
            ),
            Err(e) => tier_error(e),
        },
    }
}

fn parse_names(ns: &str, key: &str) -> Result<(Namespace, Key), larder_proto::NameError> {
    Ok((Namespace::parse(ns)?, Key::from_url_path(key)?))
}

/// The key of a build tool's content hash, which Turborepo and Nx send as one path segment:
/// 1 to 128 ASCII letters, digits, `-`, `_` and `.` (no percent-encoding, no dot segments).
/// `Err` is the reason for a 400.
pub(crate) fn hash_key(hash: &str) -> Result<Key, String> {
    let well_formed = !hash.is_empty()
        && hash.len() <= 128
        && hash
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    match well_formed.then(|| Key::parse(hash)) {
        Some(Ok(key)) => Ok(key),
        _ => {
            let shown: String = hash.chars().take(130).collect();
            Err(format!(
                "invalid hash {shown:?}: expected 1 to 128 ASCII letters, digits, '-', '_' or '.'"
            ))
        }
    }
}

async fn object(
    state: &Arc<State>,
    (ns, key): (&str, &str),
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    let method = req.method().clone();
    if !matches!(
        method,
        Method::GET | Method::HEAD | Method::PUT | Method::POST | Method::DELETE
    ) {
        return method_not_allowed(OBJECT_METHODS);
    }
    // `POST …/{key}/invalidate` drops local copies only; other methods on such a path address
    // a key ending in "/invalidate" like any other.
    if method == Method::POST
        && let Some(target) = key.strip_suffix("/invalidate")
    {
        let (ns, key) = match parse_names(ns, target) {
            Ok(names) => names,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        };
        match state
            .auth
            .current()
            .authorize(req.headers(), Scope::Admin, Some(&ns))
        {
            Ok(caller) => log.token = caller.name().to_string(),
            Err(d) => return denied(d),
        }
        log.ns = Some(ns.clone());
        log.key = Some(key.clone());
        return match state.tier.invalidate(&ns, &key).await {
            Ok(_) => empty(StatusCode::NO_CONTENT),
            Err(e) => tier_error(e),
        };
    }
    let (ns, key) = match parse_names(ns, key) {
        Ok(names) => names,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let scope = match method {
        Method::GET | Method::HEAD => Scope::Read,
        _ => Scope::Write,
    };
    if let Err(refused) = admit(state, req, log, (&ns, &key), scope) {
        return *refused;
    }
    if let Some(fault) = &state.test_fault_panic
        && fault.0 == ns
        && fault.1 == key
    {
        panic!("test fault hook LARDER_TEST_FAULT_PANIC_KEY names {ns}/{key}");
    }
    match method {
        Method::GET | Method::HEAD => {
            get(state, &ns, &key, req.headers(), method == Method::HEAD, log).await
        }
        Method::PUT | Method::POST => match crate::bazel::object_route_check(&key) {
            Some(check) => put_checked(state, &ns, &key, req, &OBJECT_PUT, Some(check)).await,
            None => put(state, &ns, &key, req, &OBJECT_PUT).await,
        },
        _ => match state.tier.delete(&ns, &key).await {
            Ok(_) => empty(StatusCode::NO_CONTENT),
            Err(e) => tier_error(e),
        },
    }
}

/// Access control of a request for one object, and what its log lines name: the caller must
/// have `scope` on the namespace. `Err` is the answer instead (boxed: the cold path).
pub(crate) fn admit(
    state: &State,
    req: &Req,
    log: &mut RequestLog,
    (ns, key): (&Namespace, &Key),
    scope: Scope,
) -> Result<(), Box<Response<Body>>> {
    match state
        .auth
        .current()
        .authorize(req.headers(), scope, Some(ns))
    {
        Ok(caller) => log.token = caller.name().to_string(),
        Err(d) => return Err(Box::new(denied(d))),
    }
    log.ns = Some(ns.clone());
    log.key = Some(key.clone());
    let span = tracing::Span::current();
    span.record("ns", ns.as_str());
    span.record("key", key.as_str());
    Ok(())
}

/// The steps every git route shares: the method, the feature, the route resolved to an
/// upstream and its namespace (allow-list), the read scope on that namespace, and the
/// registration of the repository with the generator. `Err` is the answer to give instead
/// (boxed: a response is large, and this is the cold path).
fn git_repository(
    state: &Arc<State>,
    route: &str,
    req: &Req,
    log: &mut RequestLog,
) -> Result<(Arc<crate::git::GitService>, larder_git::Upstream, Namespace), Box<Response<Body>>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(Box::new(method_not_allowed(READ_METHODS)));
    }
    let Some(git) = &state.git else {
        return Err(Box::new(text(
            StatusCode::NOT_FOUND,
            "git snapshots are not enabled (no --git-allow)",
        )));
    };
    let (upstream, ns) = git
        .resolve(route)
        .map_err(|refused| Box::new(text(refused.status, refused.reason)))?;
    // Access is checked before anything is registered: a caller who may not read the
    // namespace must not be able to make the server fetch repositories either.
    match state
        .auth
        .current()
        .authorize(req.headers(), Scope::Read, Some(&ns))
    {
        Ok(caller) => log.token = caller.name().to_string(),
        Err(d) => return Err(Box::new(denied(d))),
    }
    log.ns = Some(ns.clone());
    git.register(&upstream, &ns);
    Ok((git.clone(), upstream, ns))
}

/// A git route's answer for something the generator has not made yet.
fn git_not_yet(reason: String) -> Response<Body> {
    let mut response = text(StatusCode::NOT_FOUND, reason);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(GIT_RETRY_AFTER),
    );
    response
}

/// `GET|HEAD /api/v1/git/{host}/{path}/head`: the repository's head record, served like an
/// object (ETag, conditional requests) from its namespace. A miss is `404` with `Retry-After`;
/// every request, hit or miss, marks the repository as asked for, which starts (or keeps)
/// its generator. The generator never runs in the request.
async fn git_head(
    state: &Arc<State>,
    route: &str,
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    let (_, upstream, ns) = match git_repository(state, route, req, log) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let key = upstream.head_key();
    log.key = Some(key.clone());
    let head = req.method() == Method::HEAD;
    let mut response = get(state, &ns, &key, req.headers(), head, log).await;
    if response.status() == StatusCode::NOT_FOUND {
        return git_not_yet(format!(
            "no snapshot of {upstream} yet; it is being generated, ask again later"
        ));
    }
    if let Ok(value) = HeaderValue::from_str(ns.as_str()) {
        // The client reads the snapshot through the object route, so it needs the namespace
        // that the allow-list chose for this repository.
        response.headers_mut().insert(GIT_NAMESPACE_HEADER, value);
    }
    response
}

/// `GET|HEAD /api/v1/git/{host}/{path}/bundles.list`: the repository's bundle list for `git
/// clone --bundle-uri`, in git's format, rendered from the bundle chain with absolute URIs of
/// the bundles in the object API (git 2.39 ignores relative ones). The base of those URIs is
/// `--git-public-url`, else the scheme larderd serves and the request's host. A repository
/// with no bundle yet is `404` with `Retry-After`, like the head route.
async fn git_bundles_list(
    state: &Arc<State>,
    route: &str,
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    let (git, upstream, ns) = match git_repository(state, route, req, log) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    log.key = Some(upstream.bundle_chain_key());
    let base = match git.public_url() {
        Some(url) => url.to_string(),
        None => {
            // h2 carries the host as the URI's authority, HTTP/1.1 in the Host header.
            let host = match req.head.uri.authority() {
                Some(a) => Some(a.as_str()),
                None => req
                    .headers()
                    .get(header::HOST)
                    .map(|h| h.to_str().unwrap_or("")),
            };
            let Some(host) = host else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "bundles.list needs a Host header to build absolute bundle URIs (or the server's --git-public-url)",
                );
            };
            // Only what a host[:port] can hold, so the URIs cannot be made to say more.
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            {
                return text(
                    StatusCode::BAD_REQUEST,
                    "the Host header is not a host[:port]",
                );
            }
            let scheme = if git.tls() { "https" } else { "http" };
            format!("{scheme}://{host}")
        }
    };
    let list = match git.bundle_list(&ns, &upstream, &base).await {
        Ok(Some(list)) => list,
        Ok(None) => {
            return git_not_yet(format!(
                "no bundles of {upstream} yet; they are made with its next snapshot, ask again later"
            ));
        }
        Err(e) => {
            return match e.downcast::<TierError>() {
                Ok(e) => tier_error(e),
                Err(e) => {
                    tracing::warn!(upstream = %upstream, error = %format!("{e:#}"), "cannot render the bundle list");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot render the bundle list: {e}"),
                    )
                }
            };
        }
    };
    // The list depends on the base URI as well as on the chain: the ETag is of the bytes sent.
    let etag = larder_proto::ETag::of(list.as_bytes());
    // A client that polls the list with the ETag it has gets a 304 until a new bundle is listed.
    if header_text(req.headers(), header::IF_NONE_MATCH)
        .is_some_and(|tags| larder_proto::TagList::parse(tags).matches_weak(&etag))
    {
        let mut r = Response::new(empty_body());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        let h = r.headers_mut();
        h.insert(header::ETAG, value(&etag.header_value()));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return r;
    }
    let len = list.len();
    let body = if req.method() == Method::HEAD {
        empty_body()
    } else {
        full(list)
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ETAG, value(&etag.header_value()));
    // Changes with every new bundle: caches must ask again.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// A header value as text. A value that is not visible ASCII becomes `""`: for `If-Match` that
/// matches nothing (412), for `Range` it is malformed (ignored) — never silently "absent".
fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).map(|v| v.to_str().unwrap_or(""))
}

/// The conditional and range headers of a GET or HEAD.
pub(crate) fn read_conditions(headers: &HeaderMap) -> ReadConditions {
    ReadConditions::from_headers(
        header_text(headers, header::IF_MATCH),
        header_text(headers, header::IF_NONE_MATCH),
        header_text(headers, header::IF_MODIFIED_SINCE),
        header_text(headers, header::IF_UNMODIFIED_SINCE),
        header_text(headers, header::IF_RANGE),
        header_text(headers, header::RANGE),
    )
}

pub(crate) async fn get(
    state: &State,
    ns: &Namespace,
    key: &Key,
    headers: &HeaderMap,
    head: bool,
    log: &mut RequestLog,
) -> Response<Body> {
    let conditions = read_conditions(headers);
    match state
        .tier
        .get(ns, key, GetOptions { conditions, head })
        .await
    {
        Ok(got) => respond(got, log),
        Err(e) => tier_error(e),
    }
}

/// Renders a decided read: status, `Content-Length`, `Content-Range`, validators, stored
/// headers, and the body stream counted per serving tier.
pub(crate) fn respond(got: GetResponse, log: &mut RequestLog) -> Response<Body> {
    log.tier = got.source;
    // Every log line of the request from here on says which tier answered and which revision,
    // except on a local disk hit: recording two span fields cost an eighth of a small GET's
    // instructions, and nothing logs after a disk hit but the access line, which says both.
    if got.source != "disk" {
        let span = tracing::Span::current();
        span.record("tier", got.source);
        span.record("etag", got.meta.etag.as_str());
    }
    let meta = &got.meta;
    let (status, mut response) = match got.outcome {
        ReadOutcome::Full | ReadOutcome::Partial(_) => {
            let (status, len) = match got.outcome {
                ReadOutcome::Partial(r) => (StatusCode::PARTIAL_CONTENT, r.len),
                _ => (StatusCode::OK, meta.size),
            };
            let body = match got.body {
                Some(stream) => {
                    let tier = got.source;
                    UnsyncBoxBody::new(StreamBody::new(stream.map_ok(move |chunk| {
                        crate::metrics::bytes_served(tier, chunk.len() as u64);
                        Frame::data(chunk)
                    })))
                }
                None => empty_body(),
            };
            let mut r = Response::new(body);
            let h = r.headers_mut();
            // Room for every header a GET answers with, so the map is not grown three times.
            h.reserve(12);
            let range = match got.outcome {
                ReadOutcome::Partial(range) => Some(range),
                _ => None,
            };
            body_fields(meta, len, range, &mut |name, v| insert_field(h, name, v));
            (status, r)
        }
        ReadOutcome::NotModified => {
            let mut r = Response::new(empty_body());
            not_modified_fields(meta, &mut |name, v| insert_field(r.headers_mut(), name, v));
            (StatusCode::NOT_MODIFIED, r)
        }
        ReadOutcome::PreconditionFailed => (
            StatusCode::PRECONDITION_FAILED,
            text(
                StatusCode::PRECONDITION_FAILED,
                format!("precondition failed: current ETag is {}", meta.etag),
            ),
        ),
        ReadOutcome::RangeNotSatisfiable => {
            let mut r = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable: the object has {} bytes", meta.size),
            );
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                value(&larder_proto::range::unsatisfied_content_range(meta.size)),
            );
            (StatusCode::RANGE_NOT_SATISFIABLE, r)
        }
        ReadOutcome::NotFound => return tier_error(TierError::not_found()),
    };
    *response.status_mut() = status;
    if !matches!(
        status,
        StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
    ) {
        validator_fields(meta, &mut |name, v| {
            insert_field(response.headers_mut(), name, v)
        });
    }
    response
}

/// The value of one header field of a read's answer, in the form it is known in: `respond`
/// turns it into a `HeaderValue`, the fast path writes it onto the wire as it is.
pub(crate) enum FieldValue<'a> {
    Text(&'a str),
    Number(u64),
    ETag(&'a larder_proto::ETag),
    Date(std::time::SystemTime),
    Owned(String),
}

impl FieldValue<'_> {
    fn header_value(&self) -> HeaderValue {
        match self {
            FieldValue::Text(t) => value(t),
            FieldValue::Number(n) => HeaderValue::from(*n),
            FieldValue::ETag(etag) => value(etag.quoted()),
            FieldValue::Date(at) => value(&httpdate::fmt_http_date(*at)),
            FieldValue::Owned(text) => value(text),
        }
    }
}

fn insert_field(h: &mut HeaderMap, name: &str, v: FieldValue<'_>) {
    // Every name given here is a valid one (see `body_fields`).
    if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
        h.append(name, v.header_value());
    }
}

/// The header fields of a read's 200 or 206 (and of their HEAD), in order: length, range,
/// stored headers, the defaults for what was not stored, validators. One plan for both writers
/// of answers, so that the fast path and hyper cannot drift apart.
pub(crate) fn body_fields<'a>(
    meta: &'a ObjectMeta,
    len: u64,
    range: Option<larder_proto::ByteRange>,
    field: &mut impl FnMut(&'a str, FieldValue<'a>),
) {
    field("content-length", FieldValue::Number(len));
    field("accept-ranges", FieldValue::Text("bytes"));
    if let Some(range) = range {
        field(
            "content-range",
            FieldValue::Owned(range.content_range(meta.size)),
        );
    }
    let mut has_type = false;
    let mut has_cache_control = false;
    for (name, v) in meta.headers.iter() {
        if HeaderName::from_bytes(name.as_bytes()).is_ok() && valid_field_value(v) {
            has_type |= name == "content-type";
            has_cache_control |= name == "cache-control";
            field(name, FieldValue::Text(v));
        }
    }
    // A key can be overwritten at any time: an HTTP cache between client and larderd must
    // revalidate (cheap: a conditional request) rather than guess a lifetime.
    if !has_cache_control {
        field("cache-control", FieldValue::Text("no-cache"));
    }
    if !has_type {
        field("content-type", FieldValue::Text("application/octet-stream"));
    }
    validator_fields(meta, field);
}

/// The header fields of a 304: the Cache-Control the 200 would have (RFC 9110 15.4.5) and the
/// validators.
pub(crate) fn not_modified_fields<'a>(
    meta: &'a ObjectMeta,
    field: &mut impl FnMut(&'a str, FieldValue<'a>),
) {
    let cache_control = meta
        .headers
        .iter()
        .find(|(n, v)| n == "cache-control" && valid_field_value(v))
        .map_or("no-cache", |(_, cc)| cc.as_str());
    field("cache-control", FieldValue::Text(cache_control));
    validator_fields(meta, field);
}

fn validator_fields<'a>(meta: &'a ObjectMeta, field: &mut impl FnMut(&'a str, FieldValue<'a>)) {
    field("etag", FieldValue::ETag(&meta.etag));
    field("last-modified", FieldValue::Date(meta.last_modified));
}

/// What `HeaderValue` accepts: visible ASCII, spaces, tabs and obs-text; no control bytes.
fn valid_field_value(v: &str) -> bool {
    v.bytes().all(|b| (b >= 32 && b != 127) || b == b'\t')
}

/// What a PUT's headers ask for, decided before any byte of the body is read: the TTL
/// (`Time-To-Live`, capped at `max_ttl`), the headers stored with the object, and the write
/// precondition. `Err` is the one-line reason for a 400.
fn put_options(
    headers: &HeaderMap,
    max_ttl: Duration,
    max_object_size: u64,
    rules: &PutRules,
) -> Result<PutOptions, String> {
    let ttl = match headers.get("time-to-live") {
        None => max_ttl,
        Some(v) => v
            .to_str()
            .map_err(|_| "not text".to_string())
            .and_then(parse_duration)
            .map_err(|e| format!("invalid Time-To-Live: {e}"))?
            .min(max_ttl),
    };
    let mut stored = Vec::new();
    for (name, v) in headers {
        if (rules.storable)(name.as_str()) {
            let v = v
                .to_str()
                .map_err(|_| format!("header {name} is not visible ASCII"))?;
            stored.push((name.as_str().to_string(), v.to_string()));
        }
    }
    let precondition = if rules.create_only {
        WritePrecondition::create_only()
    } else {
        WritePrecondition::from_headers(
            header_text(headers, header::IF_MATCH),
            header_text(headers, header::IF_NONE_MATCH),
        )
    };
    Ok(PutOptions {
        ttl,
        precondition,
        headers: stored,
        max_size: Some(max_object_size),
        expect_etag: None,
        last_modified: None,
    })
}

/// What a route's PUT keeps besides the body, whether it may replace a revision, and how large
/// it may be.
pub(crate) struct PutRules {
    /// Which request headers are stored with the object and returned with it.
    pub(crate) storable: fn(&str) -> bool,
    /// Create-only whatever the request says: an existing key answers `412`.
    pub(crate) create_only: bool,
    /// A limit below `--max-object-size`, and what the 413's reason calls it.
    pub(crate) max_size: Option<(u64, &'static str)>,
}

/// The object route's PUT: the generic storable headers, preconditions as the client sends them.
pub(crate) const OBJECT_PUT: PutRules = PutRules {
    storable: is_storable_header,
    create_only: false,
    max_size: None,
};

/// Stores the request body under `key` as `rules` say.
pub(crate) async fn put(
    state: &State,
    ns: &Namespace,
    key: &Key,
    req: &mut Req,
    rules: &PutRules,
) -> Response<Body> {
    put_checked(state, ns, key, req, rules, None).await
}

/// [`put`], and with a `check` (`io::checked`) the body is checked while it streams in: a
/// refusal is the answer, and nothing is stored.
pub(crate) async fn put_checked(
    state: &State,
    ns: &Namespace,
    key: &Key,
    req: &mut Req,
    rules: &PutRules,
    check: Option<Box<dyn BodyCheck>>,
) -> Response<Body> {
    let headers = req.headers();
    let (max_size, limit_name) = match rules.max_size {
        Some((max, name)) if max < state.max_object_size => (max, name),
        _ => (state.max_object_size, "object size"),
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > max_size
    {
        let response = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body of {len} bytes exceeds the maximum {limit_name} of {max_size} bytes"),
        );
        limit_rejected("object_size");
        return response;
    }
    let Ok(_upload_permit) = state.uploads.clone().try_acquire_owned() else {
        limit_rejected("uploads");
        let mut response = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many uploads in progress (limit {}); retry shortly",
                state.limits.max_uploads
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let opts = match put_options(headers, state.max_ttl, max_size, rules) {
        Ok(opts) => opts,
        Err(reason) => return text(StatusCode::BAD_REQUEST, reason),
    };
    // The body is pumped through a channel rather than handed to the tier, so that when the tier
    // refuses it half-way (disk full, too large, a precondition checked first) the handler still
    // owns the connection's body and can give the remainder back to `handle` to drain: the
    // client then reads the 4xx/5xx instead of a reset.
    let mut incoming = req.take_body();
    let (tx, upload, demand) = larder_tier::upload_channel();
    let (upload, verdict) = match check {
        Some(check) => {
            let (upload, verdict) = crate::io::checked(upload, check);
            (upload, Some(verdict))
        }
        None => (upload, None),
    };
    let idle = state.limits.idle_timeout;
    let pump = crate::io::pump_body(&mut incoming, tx, demand, idle);
    let (result, pumped) = tokio::join!(state.tier.put(ns, key, upload, opts), pump);
    match pumped {
        Pump::Complete => req.body_done(),
        Pump::Stopped => req.return_body(incoming),
        Pump::NotAsked => req.return_unread_body(incoming),
        // A client that stalled is not waited for again: the body stays taken, and the
        // answer announces the close.
        Pump::Idle => {
            limit_rejected("request_body_idle");
            return text(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the upload body sent nothing for {}s; nothing was stored",
                    idle.as_secs()
                ),
            );
        }
    }
    match result {
        Ok(put) => {
            let status = if put.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut r = json_response(
                status,
                &json!({ "etag": put.etag.header_value(), "size": put.size }),
            );
            r.headers_mut()
                .insert(header::ETAG, value(&put.etag.header_value()));
            tracing::Span::current().record("etag", put.etag.as_str());
            tracing::info!(size = put.size, created = put.created, "stored");
            r
        }
        // The tier saw the check's refusal as a failed body and stored nothing; the client is
        // told why.
        Err(e) => match verdict.as_ref().and_then(|v| v.get()) {
            Some(refusal) => {
                tracing::info!(reason = %refusal.reason, "upload refused by its check");
                text(refusal.status, refusal.reason.clone())
            }
            None => tier_error(e),
        },
    }
}

/// Decides what becomes of the request body a handler left unread, before the answer goes out.
///
/// hyper reads such a remainder only if it already sits in its buffer; otherwise it ends the
/// connection after the answer, which by then may have promised keep-alive, and the client's
/// next request meets a closed socket. So the remainder is read here, within bounds, and the
/// connection stays; when it cannot be read, the answer says `Connection: close`, so the client
/// knows to open a new connection. A body behind `Expect: 100-continue` is never read: the
/// client has not sent it, and reading would make hyper invite the upload that was refused.
async fn finish_body(req: &mut Req, response: &mut Response<Body>) {
    // HTTP/2 ends an unread stream on its own, and forbids connection headers.
    if req.head.version >= Version::HTTP_2 {
        return;
    }
    let keep = match std::mem::replace(&mut req.body, BodyState::Done) {
        BodyState::Done => true,
        BodyState::Taken => false,
        BodyState::Unread(body) if body.is_end_stream() => true,
        BodyState::Unread(_) if expects_continue(req.headers()) => false,
        BodyState::Unread(mut body) | BodyState::Returned(mut body) => drain(&mut body).await,
    };
    if !keep {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads and discards what is left of a request body, up to a bound: enough for a client that
/// is still sending to read the answer instead of a reset, never an invitation to stream
/// gigabytes into the void. True when the body was read to its end.
async fn drain(body: &mut Incoming) -> bool {
    const MAX_BYTES: u64 = 64 << 20;
    if body.size_hint().lower() > MAX_BYTES {
        return false;
    }
    let mut seen = 0u64;
    let read = async {
        loop {
            match body.frame().await {
                None => return true,
                Some(Err(_)) => return false,
                Some(Ok(frame)) => {
                    seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if seen > MAX_BYTES {
                        return false;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .unwrap_or(false)
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub(crate) fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty_body() -> Body {
    full(Bytes::new())
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(empty_body());
    *r.status_mut() = status;
    r
}

/// A one-line plain-text response: every 4xx/5xx body is a reason a person can read.
pub fn text(status: StatusCode, reason: impl Into<String>) -> Response<Body> {
    let mut line = reason.into();
    line.push('\n');
    let mut r = Response::new(full(line));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(crate) fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(format!("{v}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; allowed: {allow}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

pub(crate) fn tier_error(e: TierError) -> Response<Body> {
    let status = StatusCode::from_u16(e.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // Logged once, here, with every cause; the client gets the one-line message only.
    match e.fault() {
        larder_tier::Fault::Server => {
            tracing::error!(kind = e.kind.label(), error = %e.chain(), "request failed")
        }
        larder_tier::Fault::Dependency => {
            tracing::warn!(kind = e.kind.label(), error = %e.chain(), "request failed: a dependency failed")
        }
        larder_tier::Fault::Client => {}
    }
    let mut r = text(status, e.message.clone());
    if e.kind == ErrorKind::PreconditionFailed
        && let Some(etag) = &e.current_etag
    {
        r.headers_mut()
            .insert(header::ETAG, value(&etag.header_value()));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_is_the_clients_when_usable_else_a_new_number() {
        let longest = "i".repeat(MAX_REQUEST_ID);
        for kept in ["job-7", "a", longest.as_str(), "x\"y"] {
            let id = RequestId::of_request(Some(kept.as_bytes()));
            assert_eq!(id.as_str(), kept);
            assert_eq!(id.header_value().as_bytes(), kept.as_bytes());
        }
        let too_long = "i".repeat(MAX_REQUEST_ID + 1);
        let replaced: Vec<RequestId> = [
            None,
            Some(&b""[..]),
            Some(b"two words"),
            Some(b"tab\there"),
            Some("caf\u{e9}".as_bytes()),
            Some(too_long.as_bytes()),
        ]
        .into_iter()
        .map(RequestId::of_request)
        .collect();
        let numbers: Vec<u64> = replaced
            .iter()
            .map(|id| {
                assert_eq!(id.header_value().to_str().unwrap(), id.as_str());
                id.as_str().parse().unwrap()
            })
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    }

    #[test]
    fn generated_request_ids_are_never_given_twice_across_threads() {
        // More than one block per thread, so blocks are taken while others are in use.
        let per_thread = 2_500;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let ids: Vec<u64> = (0..per_thread).map(|_| next_request_id()).collect();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing per thread");
                    ids
                })
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for thread in threads {
            for id in thread.join().unwrap() {
                assert!(all.insert(id), "id {id} given twice");
            }
        }
        assert_eq!(all.len(), 4 * per_thread);
    }

    #[test]
    fn paths_parse_into_routes() {
        assert_eq!(
            Route::parse("/api/v1/object/ci/a/b.tar"),
            Route::Object("ci", "a/b.tar")
        );
        assert_eq!(Route::parse("/api/v1/object/ci"), Route::Object("ci", ""));
        assert_eq!(
            Route::parse("/api/v1/git/github.com/acme/app.git/head"),
            Route::GitHead("github.com/acme/app.git")
        );
        assert_eq!(
            Route::parse("/api/v1/git/127.0.0.1:8000/x.git/bundles.list"),
            Route::GitBundlesList("127.0.0.1:8000/x.git")
        );
        assert_eq!(Route::parse("/api/v1/git/h/x.git/other"), Route::Unknown);
        assert_eq!(
            Route::parse("/bazel/ci/cas/00ff"),
            Route::Bazel("ci/cas/00ff")
        );
        assert_eq!(Route::parse("/bazel/ci/ac/00ff").label(), "bazel_ac");
        assert_eq!(Route::parse("/bazel/ci/cas/00ff").label(), "bazel_cas");
        assert_eq!(Route::parse("/bazel").label(), "unknown");
        assert_eq!(
            Route::parse("/metrics"),
            Route::Service(ServiceRoute::Metrics)
        );
        assert_eq!(Route::parse("/api/v1/stats").label(), "stats");
        assert_eq!(Route::parse("/api/v1/statsx"), Route::Unknown);
        assert_eq!(Route::parse("/").label(), "unknown");
        assert_eq!(
            Route::parse("/turbo/v8/artifacts/abc"),
            Route::Turbo(crate::turbo::TurboRoute::Artifact("abc"))
        );
        assert_eq!(Route::parse("/turbo/v8/artifacts").label(), "turbo_query");
        assert_eq!(Route::parse("/turbo/v8/other"), Route::Unknown);
        assert_eq!(Route::parse("/nx/ci/v1/cache/123"), Route::Nx("ci", "123"));
        assert_eq!(Route::parse("/nx/ci/v1/cache/123").label(), "nx");
        assert_eq!(Route::parse("/nx/ci/123"), Route::Unknown);
    }

    #[test]
    fn hashes_are_single_segment_keys() {
        assert_eq!(
            hash_key("8788862417028171840").unwrap().as_str(),
            "8788862417028171840"
        );
        assert_eq!(
            hash_key("2aad5ac5ec1e54a0").unwrap().as_str(),
            "2aad5ac5ec1e54a0"
        );
        assert!(hash_key(&"a".repeat(128)).is_ok());
        for bad in ["", ".", "..", "a/b", "a%2Fb", "a b", "caf\u{e9}"] {
            let e = hash_key(bad).unwrap_err();
            assert!(e.starts_with("invalid hash"), "{bad}: {e}");
        }
        assert!(hash_key(&"a".repeat(129)).is_err());
    }

    #[test]
    fn create_only_rules_ignore_the_clients_preconditions() {
        let rules = PutRules {
            storable: |name| name == "x-kept",
            create_only: true,
            max_size: None,
        };
        let opts = put_options(
            &headers(&[
                ("if-match", b"\"abc\""),
                ("x-kept", b"1"),
                ("content-type", b"text/plain"),
            ]),
            Duration::from_secs(60),
            1,
            &rules,
        )
        .unwrap();
        assert_eq!(opts.precondition, WritePrecondition::create_only());
        assert_eq!(opts.headers, vec![("x-kept".to_string(), "1".to_string())]);
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        h
    }

    #[test]
    fn put_options_cap_the_ttl_and_keep_only_storable_headers() {
        let max = Duration::from_secs(3600);
        let opts = put_options(
            &headers(&[
                ("time-to-live", b"2h"),
                ("content-type", b"application/zstd"),
                ("x-larder-meta-build", b"42"),
                ("authorization", b"Bearer secret"),
                ("if-none-match", b"*"),
            ]),
            max,
            1 << 20,
            &OBJECT_PUT,
        )
        .unwrap();
        assert_eq!(opts.ttl, max, "capped at the maximum");
        assert_eq!(
            opts.headers,
            vec![
                ("content-type".to_string(), "application/zstd".to_string()),
                ("x-larder-meta-build".to_string(), "42".to_string()),
            ],
            "credentials are never stored"
        );
        assert_eq!(opts.precondition, WritePrecondition::create_only());
        assert_eq!(opts.max_size, Some(1 << 20));
        let opts = put_options(&headers(&[("time-to-live", b"30m")]), max, 1, &OBJECT_PUT).unwrap();
        assert_eq!(opts.ttl, Duration::from_secs(1800));
        assert_eq!(
            put_options(&HeaderMap::new(), max, 1, &OBJECT_PUT)
                .unwrap()
                .ttl,
            max
        );
    }

    #[test]
    fn bad_put_headers_are_refused_with_a_reason() {
        let max = Duration::from_secs(3600);
        let e =
            put_options(&headers(&[("time-to-live", b"soon")]), max, 1, &OBJECT_PUT).unwrap_err();
        assert!(e.starts_with("invalid Time-To-Live"), "{e}");
        let e = put_options(
            &headers(&[("content-type", b"caf\xc3\xa9")]),
            max,
            1,
            &OBJECT_PUT,
        )
        .unwrap_err();
        assert_eq!(e, "header content-type is not visible ASCII");
    }
}
