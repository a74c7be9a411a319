//! Nx's self-hosted remote cache at `/nx/{ns}/v1/cache/{hash}`: `nx` with
//! `NX_SELF_HOSTED_REMOTE_CACHE_SERVER=https://HOST/nx/{ns}` and
//! `NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN` (a larder token) stores and fetches its task
//! results in the namespace `{ns}`, unmodified. Nx appends `/v1/cache/{hash}` to the server
//! URL itself, so the namespace goes into that URL.
//!
//! Like `turbo.rs`, this file is only the translation of one tool's protocol onto the object
//! route's handlers (`api::get`, `api::put`, with their access control, limits, tiers, metrics
//! under the route label `nx`, and access log). What nx 24 expects, and why each answer is
//! what it is (its client reads nothing but the status, and one header):
//!
//! - `GET {hash}`: `200` with the tar.gz nx uploaded, `404` for a miss. Any other status fails
//!   the run as a misconfigured cache ("Unexpected response status"), a `403` included.
//! - `PUT {hash}` is create-only (an entry is never replaced, the key is the hash of the task's
//!   inputs): `200` when stored, `409` when the hash exists, `403` for a token without the
//!   write scope; nx takes `409` and `403` as "not stored" and carries on. Anything else, such
//!   as the object route's `201`, fails the run.
//! - `401` (no or an unknown token, when tokens are configured) must say `Content-Type:
//!   text/plain` exactly: nx then reports the reason as "Unauthorized"; with any other type it
//!   reports a misconfigured server instead. Either way the run stops.
//!
//! The key is the hash itself; nx's hashes are decimal numbers.

use crate::api::{self, Body, PutRules, Req, RequestLog, State};
use crate::auth::Scope;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use larder_proto::Namespace;
use std::sync::Arc;

const PREFIX: &str = "/nx/";
const CACHE: &str = "/v1/cache/";
const METHODS: &str = "GET, HEAD, PUT";

/// Task results are immutable: never replaced, and nothing but the body is kept.
const ENTRY_PUT: PutRules = PutRules {
    storable: |_| false,
    create_only: true,
    max_size: None,
};

/// `/nx/{ns}/v1/cache/{hash}` as `(ns, hash)`, still as they came in the path; `None` for any
/// other path.
pub(crate) fn parse(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix(PREFIX)?.split_once(CACHE)
}

pub(crate) async fn handle(
    state: &Arc<State>,
    (ns, hash): (&str, &str),
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    let method = req.method().clone();
    let scope = match method {
        Method::GET | Method::HEAD => Scope::Read,
        Method::PUT => Scope::Write,
        _ => return api::method_not_allowed(METHODS),
    };
    let ns = match Namespace::parse(ns) {
        Ok(ns) => ns,
        Err(e) => return api::text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let key = match api::hash_key(hash) {
        Ok(key) => key,
        Err(reason) => return api::text(StatusCode::BAD_REQUEST, reason),
    };
    match state
        .auth
        .current()
        .authorize(req.headers(), scope, Some(&ns))
    {
        Ok(caller) => log.token = caller.name().to_string(),
        Err(d) => return for_nx(api::denied(d)),
    }
    let span = tracing::Span::current();
    span.record("ns", ns.as_str());
    span.record("key", key.as_str());
    log.ns = Some(ns.clone());
    log.key = Some(key.clone());
    if method == Method::PUT {
        for_nx(api::put(state, &ns, &key, req, &ENTRY_PUT).await)
    } else {
        api::get(state, &ns, &key, req.headers(), method == Method::HEAD, log).await
    }
}

/// The object route's answers in the statuses nx understands (see the module comment).
fn for_nx(mut response: Response<Body>) -> Response<Body> {
    match response.status() {
        StatusCode::CREATED => *response.status_mut() = StatusCode::OK,
        StatusCode::PRECONDITION_FAILED => {
            let mut conflict = api::text(
                StatusCode::CONFLICT,
                "an entry for this hash exists; entries are never replaced",
            );
            if let Some(etag) = response.headers().get(header::ETAG) {
                conflict.headers_mut().insert(header::ETAG, etag.clone());
            }
            return conflict;
        }
        StatusCode::UNAUTHORIZED => {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        _ => {}
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_into_namespace_and_hash() {
        assert_eq!(
            parse("/nx/ci/v1/cache/8788862417028171840"),
            Some(("ci", "8788862417028171840"))
        );
        // Checked by the handler, which refuses them with a reason.
        assert_eq!(parse("/nx/a/b/v1/cache/1"), Some(("a/b", "1")));
        assert_eq!(parse("/nx/ci/v1/cache/"), Some(("ci", "")));
        assert_eq!(parse("/nx/ci/v1/cache"), None);
        assert_eq!(parse("/nx/ci/v2/cache/1"), None);
        assert_eq!(parse("/api/v1/object/ci/v1/cache/1"), None);
    }

    #[test]
    fn answers_take_the_statuses_nx_expects() {
        let created = api::json_response(StatusCode::CREATED, &serde_json::json!({}));
        assert_eq!(for_nx(created).status(), StatusCode::OK);
        let mut exists = api::text(StatusCode::PRECONDITION_FAILED, "precondition failed");
        exists
            .headers_mut()
            .insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        let conflict = for_nx(exists);
        assert_eq!(conflict.status(), StatusCode::CONFLICT);
        assert_eq!(conflict.headers()[header::ETAG], "\"abc\"");
        let unauthorized = for_nx(api::text(StatusCode::UNAUTHORIZED, "unknown token"));
        assert_eq!(unauthorized.headers()[header::CONTENT_TYPE], "text/plain");
        let forbidden = for_nx(api::text(StatusCode::FORBIDDEN, "no write scope"));
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    }
}
