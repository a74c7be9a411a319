#![warn(missing_docs)]

//! The larder client library: talks to larderd's HTTP object API (the README's "HTTP API by
//! example"; docs/ARCHITECTURE.md, "Client").
//!
//! It lives in a library rather than in the `larder` binary so the CLI stays thin wiring and the
//! pieces — parallel pinned downloads ([`Downloader`]), snapshot save and restore
//! ([`Client::save`], [`Downloader::restore`]), staged outputs, error mapping — can be used by
//! other programs and by the server's tests. Every name is validated with `larder_proto` before
//! a request is made, so a typo is reported locally with the same reason the server would give,
//! and every download is checked against its content-digest ETag.
//!
//! How to reach a server — a bearer token, extra trusted CAs for `https://` — is a
//! [`Connection`] shared by all replicas, applied once when a [`Client`] is built so that every
//! request of every operation carries it. The token is held in a [`Token`] whose `Debug` and
//! `Display` never show it, and is marked sensitive in the HTTP layer, so no message, summary
//! or debug print of a client can leak it.

mod archive_path;
mod download;
mod error;
pub mod git;
mod output;
mod progress;
mod put;
mod restore;
mod save;

pub use download::{
    DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_RESTARTS,
    DEFAULT_RETRIES, DownloadOptions, DownloadSummary, Downloader, ReplicaUsage,
};
pub use error::{Error, Fault};
pub use git::{GitHead, GitRestoreOptions, GitRestoreSummary};
pub use larder_proto::{ETag, Key, Namespace};
pub use output::{FileSink, Sink, WriterSink};
pub use progress::{Progress, ProgressView, Unit};
pub use put::{Precondition, PutOptions, PutResult};
pub use restore::{Prepare, RestoreOptions, RestoreSummary};
pub use save::{SaveOptions, SaveSummary};

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A validated `namespace/key` pair: holding one proves both parts are acceptable to the server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectName {
    /// The namespace.
    pub ns: Namespace,
    /// The key within the namespace.
    pub key: Key,
}

impl ObjectName {
    /// Validates both parts, echoing the offending value so the user sees what was refused.
    pub fn parse(ns: &str, key: &str) -> Result<ObjectName, Error> {
        let ns =
            Namespace::parse(ns).map_err(|e| Error::InvalidInput(format!("{e} (got {ns:?})")))?;
        let key = Key::parse(key).map_err(|e| Error::InvalidInput(format!("{e} (got {key:?})")))?;
        Ok(ObjectName { ns, key })
    }
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ns, self.key)
    }
}

/// What HEAD (or the headers of a GET) says about the current revision of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Strong ETag of the revision (the BLAKE3 digest of its bytes); downloads are pinned to it.
    pub etag: ETag,
    /// Length of the whole body in bytes.
    pub size: u64,
    /// `Last-Modified`, whole seconds; `None` when the header is missing or not an HTTP date.
    pub last_modified: Option<SystemTime>,
    /// `Content-Type` stored with the object, if any.
    pub content_type: Option<String>,
}

/// One line of `GET /api/v1/namespaces`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceUsage {
    /// The namespace.
    pub name: String,
    /// Number of objects in it.
    pub objects: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

#[derive(Deserialize)]
struct NamespaceList {
    namespaces: Vec<NamespaceUsage>,
}

/// A bearer token for larderd's access control. It is a secret: `Debug` and `Display` show
/// `***`, and nothing in this crate formats the inner string except the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Accepts what can travel in an `Authorization: Bearer` header: visible ASCII without
    /// spaces. The error never quotes the token.
    pub fn new(token: &str) -> Result<Token, Error> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::InvalidInput(
                "the token is empty: pass --token TOKEN or set LARDER_TOKEN to a non-empty value"
                    .into(),
            ));
        }
        if let Some(bad) = token.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(Error::InvalidInput(format!(
                "the token has a character that cannot be sent in an HTTP header at position {} \
                 (only visible ASCII without spaces is allowed; the token is not shown)",
                bad + 1
            )));
        }
        Ok(Token(token.to_string()))
    }

    /// The header value, marked sensitive so HTTP-layer debug output shows `Sensitive`.
    fn header(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .expect("validated as visible ASCII");
        v.set_sensitive(true);
        v
    }

    /// Replaces the token wherever it occurs in `text` (a server reason that echoes a header).
    pub(crate) fn redact(&self, text: &str) -> String {
        text.replace(&self.0, "***")
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// How to reach the servers, the same for every replica of one command.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// Sent as `Authorization: Bearer …` with every request.
    pub token: Option<Token>,
    /// PEM files of CAs to trust for `https://` URLs, on top of the system's roots.
    pub ca_certs: Vec<PathBuf>,
}

impl Connection {
    /// Reads the CA files once, so that a bad file is reported before any request and every
    /// replica's client shares the parsed certificates.
    pub fn load(&self) -> Result<LoadedConnection, Error> {
        let mut roots = Vec::new();
        for path in &self.ca_certs {
            roots.extend(read_ca(path)?);
        }
        Ok(LoadedConnection {
            token: self.token.clone(),
            roots,
        })
    }
}

/// A [`Connection`] with its CA files read and parsed.
#[derive(Clone, Debug, Default)]
pub struct LoadedConnection {
    token: Option<Token>,
    roots: Vec<reqwest::Certificate>,
}

fn read_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, Error> {
    let pem = std::fs::read(path)
        .map_err(|e| Error::io(format!("cannot read the CA file {}", path.display()), e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        Error::InvalidInput(format!(
            "{} is not a PEM certificate file ({e}); --ca-cert wants the CA certificate that \
             signed the server's, as PEM (-----BEGIN CERTIFICATE-----)",
            path.display()
        ))
    })?;
    if certs.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{} holds no PEM certificate; --ca-cert wants the CA certificate that signed the \
             server's, as PEM (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// A connection pool to one larderd.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// Without a trailing slash, so paths can be appended and messages show what the user typed.
    base: String,
    /// Whether requests carry a token: a 401 means different things with and without one.
    token: Option<Token>,
}

/// Long enough for a busy server, short enough that a black-holed address does not look hung.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// A client for the server at `url` (for example `http://127.0.0.1:8080`), without a token
    /// and trusting only the system's CAs.
    pub fn new(url: &str) -> Result<Client, Error> {
        Client::with_connection(url, &LoadedConnection::default())
    }

    /// A client for the server at `url` that sends `conn`'s token and trusts its CAs.
    pub fn with_connection(url: &str, conn: &LoadedConnection) -> Result<Client, Error> {
        let invalid = |why: String| {
            Error::InvalidInput(format!(
                "invalid server URL {url:?}: {why} (expected e.g. http://127.0.0.1:8080)"
            ))
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(format!("unsupported scheme {:?}", parsed.scheme())));
        }
        if parsed.host().is_none() {
            return Err(invalid("no host".into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Credentials in a URL end up in every message that names the server.
            return Err(invalid(
                "credentials in the URL are not supported; use --token or LARDER_TOKEN".into(),
            ));
        }
        let mut headers = HeaderMap::new();
        if let Some(token) = &conn.token {
            headers.insert(header::AUTHORIZATION, token.header());
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            // Parallel ranges want many independent streams; HTTP/1.1 gives one TCP connection
            // (and one congestion window) per request in flight.
            .http1_only()
            .tcp_nodelay(true)
            // A token must not follow a redirect to another host; larderd never redirects.
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .user_agent(concat!("larder/", env!("CARGO_PKG_VERSION")));
        for root in &conn.roots {
            builder = builder.add_root_certificate(root.clone());
        }
        let http = builder
            .build()
            .map_err(|e| Error::InvalidInput(format!("cannot set up the HTTP client: {e}")))?;
        let base = parsed.as_str().trim_end_matches('/').to_string();
        Ok(Client {
            http,
            base,
            token: conn.token.clone(),
        })
    }

    /// The server URL, as used in messages.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The object's URL. Names are validated to the unreserved URL alphabet plus `/`, so they
    /// need no percent-encoding.
    pub fn object_url(&self, name: &ObjectName) -> String {
        format!("{}/api/v1/object/{}/{}", self.base, name.ns, name.key)
    }

    pub(crate) fn request(&self, method: Method, name: &ObjectName) -> reqwest::RequestBuilder {
        self.http.request(method, self.object_url(name))
    }

    pub(crate) async fn send(
        &self,
        op: &'static str,
        name: &ObjectName,
        req: reqwest::RequestBuilder,
    ) -> Result<Response, Error> {
        req.send()
            .await
            .map_err(|e| Error::request(op, &name.to_string(), &self.base, e))
    }

    /// HEAD: the current revision's validators, without the body.
    pub async fn stat(&self, name: &ObjectName) -> Result<ObjectInfo, Error> {
        let resp = self
            .send("HEAD", name, self.request(Method::HEAD, name))
            .await?;
        if !resp.status().is_success() {
            return Err(self.failure("HEAD", name, resp).await);
        }
        object_info(resp.headers(), name)
    }

    /// DELETE; deleting a missing object succeeds (the server treats it as idempotent).
    pub async fn delete(&self, name: &ObjectName) -> Result<(), Error> {
        let resp = self
            .send("DELETE", name, self.request(Method::DELETE, name))
            .await?;
        if !resp.status().is_success() {
            return Err(self.failure("DELETE", name, resp).await);
        }
        Ok(())
    }

    /// Namespaces with their object counts and sizes.
    pub async fn namespaces(&self) -> Result<Vec<NamespaceUsage>, Error> {
        let url = format!("{}/api/v1/namespaces", self.base);
        let target = "namespaces";
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| Error::request("GET", target, &self.base, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.status_error("GET", target, status, resp).await);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| Error::request("GET", target, &self.base, e))?;
        let list: NamespaceList = serde_json::from_slice(&body).map_err(|e| {
            Error::Protocol(format!(
                "{url} did not answer with a namespace list ({e}); is --url pointing at larderd?"
            ))
        })?;
        Ok(list.namespaces)
    }
}

/// Reads the validators a larderd always sends with a 200/206/HEAD.
pub(crate) fn object_info(headers: &HeaderMap, name: &ObjectName) -> Result<ObjectInfo, Error> {
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let etag = text(header::ETAG).and_then(ETag::parse).ok_or_else(|| {
        Error::Protocol(format!(
            "{name}: the server sent no larder ETag (a quoted 64-hex BLAKE3 digest), so the object \
             cannot be verified; is --url pointing at larderd?"
        ))
    })?;
    // Read the header itself: reqwest reports the (empty) body's length for HEAD.
    let size = text(header::CONTENT_LENGTH)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            Error::Protocol(format!(
                "{name}: the server sent no Content-Length; is --url pointing at larderd?"
            ))
        })?;
    Ok(ObjectInfo {
        etag,
        size,
        last_modified: text(header::LAST_MODIFIED).and_then(|v| httpdate::parse_http_date(v).ok()),
        content_type: text(header::CONTENT_TYPE).map(str::to_string),
    })
}

impl Client {
    /// Turns an unsuccessful response about an object into an error carrying the server's
    /// reason.
    pub(crate) async fn failure(
        &self,
        op: &'static str,
        name: &ObjectName,
        resp: Response,
    ) -> Error {
        let status = resp.status();
        let current = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(ETag::parse);
        match status {
            StatusCode::NOT_FOUND => Error::NotFound {
                target: name.to_string(),
            },
            StatusCode::PRECONDITION_FAILED => {
                let reason = self.reason(status, resp).await;
                let message = if reason.starts_with("precondition failed") {
                    reason
                } else {
                    format!("precondition failed: {reason}")
                };
                Error::PreconditionFailed { message, current }
            }
            _ => self.status_error(op, &name.to_string(), status, resp).await,
        }
    }

    /// Any other unsuccessful answer; 401 and 403 become their own errors, since what to do
    /// about them (get a token, get a token with more scope) is not "retry later".
    pub(crate) async fn status_error(
        &self,
        op: &'static str,
        target: &str,
        status: StatusCode,
        resp: Response,
    ) -> Error {
        let reason = self.reason(status, resp).await;
        let target = target.to_string();
        match status {
            StatusCode::UNAUTHORIZED => Error::Unauthorized {
                op,
                target,
                token_sent: self.token.is_some(),
                reason,
            },
            StatusCode::FORBIDDEN => Error::Forbidden { op, target, reason },
            _ => Error::Server {
                op,
                target,
                status,
                reason,
            },
        }
    }

    /// The server's reason, with the token blanked out should the server echo it.
    pub(crate) async fn reason(&self, status: StatusCode, resp: Response) -> String {
        let reason = reason_line(status, resp).await;
        match &self.token {
            Some(t) => t.redact(&reason),
            None => reason,
        }
    }
}

/// Longest reason echoed: a proxy in the way may answer with a whole HTML page.
const MAX_REASON: usize = 300;

/// The first line of an error body, or the status's standard phrase when there is none (HEAD).
async fn reason_line(status: StatusCode, resp: Response) -> String {
    let html = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/html"));
    let body = resp.bytes().await.unwrap_or_default();
    // larderd answers in one line of text; a page of markup means something else answered.
    if html || body.trim_ascii_start().starts_with(b"<") {
        return format!(
            "{} (an HTML page, not a larderd reason; is --url pointing at larderd?)",
            status.canonical_reason().unwrap_or("error")
        );
    }
    let text = String::from_utf8_lossy(&body);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if line.is_empty() {
        return status
            .canonical_reason()
            .unwrap_or("no reason given")
            .to_string();
    }
    match line.char_indices().nth(MAX_REASON) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}
