//! Turborepo's remote cache API (v8) under `/turbo`: `turbo` with `TURBO_API=https://HOST/turbo`,
//! `TURBO_TOKEN` (a larder token) and `TURBO_TEAM` stores and fetches its task artifacts in
//! larder, unmodified.
//!
//! Each build tool's protocol has a file of its own beside `git.rs` (this one, `nx.rs`), named
//! after the tool, because that is what someone chasing "what does larder answer turbo" looks
//! for. It holds only the translation: the tool's URLs, query parameters and error shapes onto
//! the object route's handlers (`api::get`, `api::put`), which bring access control, limits,
//! the tiers, metrics (route labels `turbo_*`) and the access log with them.
//!
//! What turbo 2.11 sends, all with `?slug=` (`TURBO_TEAM`) and/or `?teamId=` (`TURBO_TEAMID`,
//! sent only when it starts with `team_`) and `Authorization: Bearer`:
//!
//! - `GET /turbo/v8/artifacts/status` at the start of a run: `{"status":"enabled"}`.
//! - `GET|HEAD /turbo/v8/artifacts/{hash}`: the artifact (a miss is `404`), with the
//!   `x-artifact-tag` and `x-artifact-duration` it was stored with.
//! - `PUT /turbo/v8/artifacts/{hash}`: stores the body with those two headers (its signature
//!   and how long the task took, in milliseconds); a later `PUT` replaces it.
//! - `POST /turbo/v8/artifacts` with `{"hashes":[…]}` (`turbo run --dry`): for each hash
//!   `{"size","taskDurationMs","tag"}` or `null`.
//! - `POST /turbo/v8/artifacts/events`: hit/miss analytics, accepted and discarded.
//! - `OPTIONS` on any of these before each request with `--preflight`: a CORS preflight, whose
//!   `Access-Control-Allow-Headers` decides whether turbo sends its token on the request.
//!
//! The team names the namespace: `turbo-` and the `teamId`, else the `slug`, in lower case
//! (`TURBO_TEAM=web` → `turbo-web`); a request without a team, or one that cannot name a
//! namespace (more than 58 characters, or other than ASCII letters, digits, `-`, `_`), gets
//! `400`. The key is the hash itself. Tokens grant scopes on these namespaces like on any
//! other (`namespaces = ["turbo-*"]`).
//!
//! Every error answer is JSON: `{"code":"forbidden","message":"…","error":{same}}`. The
//! top-level pair is the shape the Go versions of turbo and other remote cache servers use;
//! the `error` object is what turbo 2.x itself parses out of a `403` (anything else there is
//! reported as invalid JSON instead of the reason).

use crate::api::{self, Body, PutRules, Req, RequestLog, State};
use crate::auth::Scope;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use larder_proto::{Key, Namespace, ReadConditions};
use larder_tier::{ErrorKind, GetOptions, ObjectMeta, TierError};
use serde_json::{Value, json};
use std::sync::Arc;

const PREFIX: &str = "/turbo/v8/artifacts";
/// The artifact's signature (`remoteCache.signature` in turbo.json); opaque to larder.
const TAG: &str = "x-artifact-tag";
/// How long the task took to produce the artifact, in milliseconds ("time saved" on a hit).
const DURATION: &str = "x-artifact-duration";
const NAMESPACE_PREFIX: &str = "turbo-";
/// Bounds of the batch query: a run's task hashes, about 20 bytes each in the JSON.
const MAX_QUERY_BODY: usize = 1 << 20;
const MAX_QUERY_HASHES: usize = 10_000;
/// Tier lookups of one batch query in flight at once.
const QUERY_CONCURRENCY: usize = 16;

/// An artifact keeps its signature and duration; turbo sends nothing else worth replaying.
const ARTIFACT_PUT: PutRules = PutRules {
    storable: is_artifact_header,
    create_only: false,
    max_size: None,
};

fn is_artifact_header(name: &str) -> bool {
    name == TAG || name == DURATION
}

/// The routes under `/turbo/v8/artifacts`; the hash is still as it came in the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TurboRoute<'a> {
    /// `GET|HEAD|PUT /turbo/v8/artifacts/{hash}`
    Artifact(&'a str),
    /// `POST /turbo/v8/artifacts`: which of these hashes are stored.
    Query,
    /// `GET /turbo/v8/artifacts/status`
    Status,
    /// `POST /turbo/v8/artifacts/events`
    Events,
}

impl<'a> TurboRoute<'a> {
    /// `None` for a path outside `/turbo/v8/artifacts`.
    pub(crate) fn parse(path: &'a str) -> Option<TurboRoute<'a>> {
        Some(match path.strip_prefix(PREFIX)? {
            "" => TurboRoute::Query,
            "/status" => TurboRoute::Status,
            "/events" => TurboRoute::Events,
            rest => TurboRoute::Artifact(rest.strip_prefix('/')?),
        })
    }

    /// The label of its metrics and access line.
    pub(crate) fn label(self) -> &'static str {
        match self {
            TurboRoute::Artifact(_) => "turbo_artifact",
            TurboRoute::Query => "turbo_query",
            TurboRoute::Status => "turbo_status",
            TurboRoute::Events => "turbo_events",
        }
    }

    /// The methods it answers, as `Allow` lists them.
    fn allowed(self) -> &'static str {
        match self {
            TurboRoute::Artifact(_) => "GET, HEAD, PUT",
            TurboRoute::Status => "GET, HEAD",
            TurboRoute::Query | TurboRoute::Events => "POST",
        }
    }

    /// The scope a method needs here; `Err` is the `Allow` list of a method it does not answer.
    fn scope(self, method: &Method) -> Result<Scope, &'static str> {
        match (self, method) {
            (TurboRoute::Artifact(_), &Method::PUT) => Ok(Scope::Write),
            (TurboRoute::Artifact(_) | TurboRoute::Status, &Method::GET | &Method::HEAD) => {
                Ok(Scope::Read)
            }
            // Both only read: a query looks artifacts up, events are discarded.
            (TurboRoute::Query | TurboRoute::Events, &Method::POST) => Ok(Scope::Read),
            _ => Err(self.allowed()),
        }
    }
}

/// Request headers a preflight allows: turbo's own, and `Authorization`, which turbo sends on
/// the request that follows only when this list names it.
const PREFLIGHT_HEADERS: &str = "Authorization, Content-Type, User-Agent, x-artifact-duration, \
     x-artifact-tag, x-artifact-client-ci, x-artifact-client-interactive";

/// The answer to `OPTIONS` (`turbo --preflight`, `TURBO_PREFLIGHT=true`): a CORS preflight
/// that allows the route's methods and turbo's headers. It needs no token and names no team,
/// as a preflight tells nothing about what is stored; the request that follows is checked in
/// full. Without it turbo drops its token after the preflight and every request gets 401.
fn preflight(route: TurboRoute<'_>) -> Response<Body> {
    let mut r = Response::new(api::empty_body());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let headers = r.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static(route.allowed()));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(route.allowed()),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(PREFLIGHT_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

pub(crate) async fn handle(
    state: &Arc<State>,
    route: TurboRoute<'_>,
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    let response = answer(state, route, req, log).await;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        return json_error(response).await;
    }
    response
}

async fn answer(
    state: &Arc<State>,
    route: TurboRoute<'_>,
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    let method = req.method().clone();
    if method == Method::OPTIONS {
        return preflight(route);
    }
    let scope = match route.scope(&method) {
        Ok(scope) => scope,
        Err(allow) => return api::method_not_allowed(allow),
    };
    let ns = match team_namespace(req.head.uri.query()) {
        Ok(ns) => ns,
        Err(reason) => return api::text(StatusCode::BAD_REQUEST, reason),
    };
    // Names are checked before access, as on the object route: a malformed request gets the
    // same answer with any token.
    let key = match route {
        TurboRoute::Artifact(hash) => match api::hash_key(hash) {
            Ok(key) => Some(key),
            Err(reason) => return api::text(StatusCode::BAD_REQUEST, reason),
        },
        _ => None,
    };
    match state
        .auth
        .current()
        .authorize(req.headers(), scope, Some(&ns))
    {
        Ok(caller) => log.token = caller.name().to_string(),
        Err(d) => return api::denied(d),
    }
    let span = tracing::Span::current();
    span.record("ns", ns.as_str());
    log.ns = Some(ns.clone());
    match (route, key) {
        (TurboRoute::Artifact(_), Some(key)) => {
            span.record("key", key.as_str());
            log.key = Some(key.clone());
            if method == Method::PUT {
                if let Err(reason) = check_duration(req.headers()) {
                    return api::text(StatusCode::BAD_REQUEST, reason);
                }
                api::put(state, &ns, &key, req, &ARTIFACT_PUT).await
            } else {
                let head = method == Method::HEAD;
                api::get(state, &ns, &key, req.headers(), head, log).await
            }
        }
        (TurboRoute::Status, _) => {
            api::json_response(StatusCode::OK, &json!({"status": "enabled"}))
        }
        (TurboRoute::Events, _) => api::json_response(StatusCode::OK, &json!({})),
        (TurboRoute::Query, _) => query(state, &ns, req).await,
        (TurboRoute::Artifact(_), None) => unreachable!("an artifact route has a key"),
    }
}

/// The namespace of a request's team: `turbo-` and the `teamId` parameter, else the `slug`, in
/// lower case. `Err` is the reason for a 400.
fn team_namespace(query: Option<&str>) -> Result<Namespace, String> {
    let (mut team_id, mut slug) = (None, None);
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "teamId" => &mut team_id,
            "slug" => &mut slug,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("the query names {name} more than once"));
        }
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("{name} is not UTF-8"))?;
        *slot = Some(value.into_owned());
    }
    let nonempty = |t: &String| !t.is_empty();
    let team = team_id.filter(nonempty).or(slug.filter(nonempty)).ok_or(
        "no team: turbo sends it as ?slug= (TURBO_TEAM) or ?teamId= (TURBO_TEAMID), and larder \
         keeps each team's artifacts in the namespace turbo-<team>",
    )?;
    let name = format!("{NAMESPACE_PREFIX}{}", team.to_ascii_lowercase());
    Namespace::parse(&name).map_err(|_| {
        let shown: String = team.chars().take(70).collect();
        format!(
            "team {shown:?} cannot name a namespace (turbo-<team>): up to 58 ASCII letters, digits, '-' or '_'"
        )
    })
}

/// `Err` is the reason for a 400: turbo fails to read back a duration that is not a number.
fn check_duration(headers: &HeaderMap) -> Result<(), String> {
    match headers.get(DURATION) {
        None => Ok(()),
        Some(v) if v.to_str().is_ok_and(|s| s.parse::<u64>().is_ok()) => Ok(()),
        Some(_) => Err(format!("{DURATION} is not a whole number of milliseconds")),
    }
}

#[derive(serde::Deserialize)]
struct QueryBody {
    hashes: Vec<String>,
}

/// `POST /turbo/v8/artifacts`: `{"<hash>": {"size", "taskDurationMs", "tag"} | null, …}`.
async fn query(state: &State, ns: &Namespace, req: &mut Req) -> Response<Body> {
    let body = match read_small_body(state, req, MAX_QUERY_BODY).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let hashes = match serde_json::from_slice::<QueryBody>(&body) {
        Ok(q) => q.hashes,
        Err(e) => {
            return api::text(
                StatusCode::BAD_REQUEST,
                format!("the body is not {{\"hashes\": [\"<hash>\", …]}}: {e}"),
            );
        }
    };
    if hashes.len() > MAX_QUERY_HASHES {
        return api::text(
            StatusCode::BAD_REQUEST,
            format!(
                "{} hashes in one query; the limit is {MAX_QUERY_HASHES}",
                hashes.len()
            ),
        );
    }
    let keys = match hashes
        .iter()
        .map(|h| api::hash_key(h))
        .collect::<Result<Vec<Key>, String>>()
    {
        Ok(keys) => keys,
        Err(reason) => return api::text(StatusCode::BAD_REQUEST, reason),
    };
    // A loop rather than `stream::iter(…).buffered(…)`: a closure returning a future that
    // borrows the state makes rustc unable to prove the request future `Send`.
    let mut found = Vec::with_capacity(keys.len());
    let mut in_flight = FuturesOrdered::new();
    for key in &keys {
        if in_flight.len() >= QUERY_CONCURRENCY
            && let Some(done) = in_flight.next().await
        {
            found.push(done);
        }
        in_flight.push_back(lookup(state, ns, key));
    }
    while let Some(done) = in_flight.next().await {
        found.push(done);
    }
    let mut answer = serde_json::Map::new();
    for (hash, found) in hashes.into_iter().zip(found) {
        let entry = match found {
            Ok(Some(meta)) => hit(&meta),
            Ok(None) => Value::Null,
            Err(e) => return api::tier_error(e),
        };
        answer.insert(hash, entry);
    }
    api::json_response(StatusCode::OK, &Value::Object(answer))
}

/// The metadata of a stored artifact, `None` when there is none: a HEAD through the tiers.
async fn lookup(state: &State, ns: &Namespace, key: &Key) -> Result<Option<ObjectMeta>, TierError> {
    let opts = GetOptions {
        conditions: ReadConditions::default(),
        head: true,
    };
    match state.tier.get(ns, key, opts).await {
        Ok(got) => Ok(Some(got.meta)),
        Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A batch query's entry for a stored artifact.
fn hit(meta: &ObjectMeta) -> Value {
    let stored = |name: &str| {
        meta.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let duration = stored(DURATION).and_then(|d| d.parse::<u64>().ok());
    let mut entry = json!({ "size": meta.size, "taskDurationMs": duration.unwrap_or(0) });
    if let Some(tag) = stored(TAG) {
        entry["tag"] = Value::from(tag);
    }
    entry
}

/// Reads a request body of at most `limit` bytes within the idle timeout; `Err` is the answer
/// to give instead (413 beyond the limit, 408 when it stalls, 400 when it breaks off).
async fn read_small_body(
    state: &State,
    req: &mut Req,
    limit: usize,
) -> Result<Bytes, Response<Body>> {
    let mut incoming = req.take_body();
    let idle = state.limits.idle_timeout;
    let read = tokio::time::timeout(idle, Limited::new(&mut incoming, limit).collect()).await;
    match read {
        Ok(Ok(collected)) => {
            req.body_done();
            Ok(collected.to_bytes())
        }
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            // `handle` drains the rest (bounded) or closes the connection.
            req.return_body(incoming);
            Err(api::text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body exceeds {limit} bytes"),
            ))
        }
        // A body that broke off or stalled stays taken: the connection closes after the answer.
        Ok(Err(_)) => Err(api::text(
            StatusCode::BAD_REQUEST,
            "the request body broke off",
        )),
        Err(_) => Err(api::text(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body was not sent within {}s", idle.as_secs()),
        )),
    }
}

/// Turns one of larder's error answers (a line of text) into turbo's JSON error shape, with its
/// status and headers (`WWW-Authenticate`, `Allow`, `Retry-After`, `ETag`) kept.
async fn json_error(response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    // Error bodies are one line in memory; the bound only guards against a surprise.
    let message = match Limited::new(body, 64 << 10).collect().await {
        Ok(text) => String::from_utf8_lossy(&text.to_bytes())
            .trim_end()
            .to_string(),
        Err(_) => String::new(),
    };
    let code = error_code(parts.status);
    let error = json!({ "code": code, "message": message });
    let mut shape = error.clone();
    shape["error"] = error;
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, api::full(format!("{shape}\n")))
}

/// `forbidden`, `not_found`, `payload_too_large`, …: the status's reason phrase in snake case.
/// Never `remote_caching_*`, which turbo reads as the cache being switched off for the team.
fn error_code(status: StatusCode) -> String {
    status.canonical_reason().map_or_else(
        || "error".to_string(),
        |reason| reason.to_ascii_lowercase().replace([' ', '-'], "_"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_into_turbo_routes() {
        let parse = TurboRoute::parse;
        assert_eq!(
            parse("/turbo/v8/artifacts/2aad5ac5ec1e54a0"),
            Some(TurboRoute::Artifact("2aad5ac5ec1e54a0"))
        );
        assert_eq!(parse("/turbo/v8/artifacts"), Some(TurboRoute::Query));
        assert_eq!(
            parse("/turbo/v8/artifacts/status"),
            Some(TurboRoute::Status)
        );
        assert_eq!(
            parse("/turbo/v8/artifacts/events"),
            Some(TurboRoute::Events)
        );
        // Handed to the handler, whose hash check refuses it with a reason.
        assert_eq!(
            parse("/turbo/v8/artifacts/a/b"),
            Some(TurboRoute::Artifact("a/b"))
        );
        assert_eq!(parse("/turbo/v8/artifactsx"), None);
        assert_eq!(parse("/turbo/v2/artifacts/abc"), None);
        assert_eq!(parse("/turbo"), None);
    }

    #[test]
    fn the_team_names_the_namespace() {
        let ns = |q: &str| team_namespace(Some(q)).map(|ns| ns.as_str().to_string());
        assert_eq!(ns("slug=web").unwrap(), "turbo-web");
        assert_eq!(ns("slug=Web-App_2").unwrap(), "turbo-web-app_2");
        // teamId wins over the slug, and is folded to lower case like it.
        assert_eq!(
            ns("teamId=team_AbC123&slug=web").unwrap(),
            "turbo-team_abc123"
        );
        assert_eq!(ns("x=1&teamId=&slug=web").unwrap(), "turbo-web");
        assert_eq!(ns("slug=a%2Db").unwrap(), "turbo-a-b");
        assert!(team_namespace(None).unwrap_err().starts_with("no team"));
        assert!(ns("teamId=&slug=").unwrap_err().starts_with("no team"));
        assert!(ns("slug=a&slug=b").unwrap_err().contains("more than once"));
        for bad in [
            "slug=a%2Fb",
            "slug=a.b",
            "slug=caf%C3%A9",
            &format!("slug={}", "x".repeat(59)),
        ] {
            assert!(
                ns(bad).unwrap_err().contains("cannot name a namespace"),
                "{bad}"
            );
        }
        assert_eq!(ns(&format!("slug={}", "x".repeat(58))).unwrap().len(), 64);
        assert_eq!(ns("slug=%FF").unwrap_err(), "slug is not UTF-8");
    }

    #[test]
    fn durations_must_be_milliseconds() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(DURATION, HeaderValue::from_str(v).unwrap());
            check_duration(&h)
        };
        assert!(check_duration(&HeaderMap::new()).is_ok());
        assert!(with("536").is_ok());
        assert!(with("-1").is_err());
        assert!(with("1.5").is_err());
        assert!(with("").is_err());
    }

    #[test]
    fn only_the_tag_and_the_duration_are_stored() {
        assert!(is_artifact_header("x-artifact-tag"));
        assert!(is_artifact_header("x-artifact-duration"));
        for other in [
            "authorization",
            "x-artifact-dirty-hash",
            "content-type",
            "x-larder-meta-a",
        ] {
            assert!(!is_artifact_header(other), "{other}");
        }
    }

    #[test]
    fn error_codes_are_snake_case_reasons() {
        assert_eq!(error_code(StatusCode::FORBIDDEN), "forbidden");
        assert_eq!(error_code(StatusCode::NOT_FOUND), "not_found");
        assert_eq!(
            error_code(StatusCode::PAYLOAD_TOO_LARGE),
            "payload_too_large"
        );
        assert_eq!(error_code(StatusCode::from_u16(599).unwrap()), "error");
    }

    #[tokio::test]
    async fn errors_become_turbo_json_with_their_headers() {
        let mut refused = api::text(StatusCode::FORBIDDEN, "token \"ci\" has no write scope");
        refused
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        let r = json_error(refused).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        let expected = json!({"code": "forbidden", "message": "token \"ci\" has no write scope"});
        assert_eq!(v["error"], expected);
        assert_eq!(v["code"], expected["code"]);
        assert_eq!(v["message"], expected["message"]);
    }

    #[test]
    fn a_hit_reports_size_duration_and_tag() {
        let meta = |headers: Vec<(&str, &str)>| ObjectMeta {
            etag: larder_proto::ETag::of(b"x"),
            size: 381,
            last_modified: std::time::SystemTime::UNIX_EPOCH,
            expires: std::time::SystemTime::UNIX_EPOCH,
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(
            hit(&meta(vec![(TAG, "sig"), (DURATION, "536")])),
            json!({"size": 381, "taskDurationMs": 536, "tag": "sig"})
        );
        assert_eq!(
            hit(&meta(vec![])),
            json!({"size": 381, "taskDurationMs": 0})
        );
    }
}
