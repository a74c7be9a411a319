//! Upstream repository URLs: what larder accepts, the one spelling it keeps, and the names the
//! same repository has in routes and in storage keys; plus the `--git-allow` list that decides
//! which upstreams larder serves and in which namespace their snapshots live.
//!
//! An upstream URL arrives from configuration and, later, from request paths chosen by anyone
//! who can reach the server, so parsing is strict rather than forgiving: only `http` and `https`;
//! no user name or password (credentials belong in git's own configuration, where they never
//! reach a snapshot, a key or a log line); no query or fragment; no empty, `.` or `..` path
//! segment, also when percent-encoded (a URL parser would quietly resolve `a/%2e%2e/b` to `b`,
//! and two spellings of one repository, or a path that escapes its prefix, must not exist).
//! Normalising (lower-case scheme and host, default port dropped, trailing `/` stripped) gives
//! each repository one URL, which is also what a snapshot's `remote.origin.url` says.
//!
//! Storage keys must satisfy `larder_proto::Key` (`[A-Za-z0-9._~-]` and `/`), so each segment is
//! escaped with `~XX` (lower-case hex) for every other byte and for `~` itself. Escaping is
//! reversible, and the key prefix ends in a segment of a lone `~`, which no escaped path segment
//! can be: one repository's keys can never be another's, however their paths nest.
//!
//! Route form (`{host}/{path}`, as in `/api/v1/git/127.0.0.1:8000/cargo.git/head`) drops the
//! scheme, so `http://h/r` and `https://h/r` share a route; [`Upstream::from_route`] takes the
//! scheme from whoever resolves the route (the allow-list knows which one is configured).

use globset::{GlobBuilder, GlobMatcher};
use larder_proto::{Key, Namespace};
use std::fmt;
use thiserror::Error;

/// Why a URL is not an acceptable upstream. The text is a one-line reason that never repeats a
/// credential.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UpstreamError {
    /// Not a URL at all, or one without a host (the text is the parser's reason).
    #[error("not a URL: {0}")]
    Syntax(String),
    /// A scheme other than `http` or `https` (the text is the scheme).
    #[error("unsupported scheme {0:?}: upstreams are http:// or https:// URLs")]
    Scheme(String),
    #[error(
        "the URL carries a user name or password; configure upstream credentials in git \
         (a credential helper or http.extraHeader) instead"
    )]
    /// The URL carries a user name or a password.
    Credentials,
    /// The URL has a `?query` or a `#fragment`.
    #[error("the URL has a query or a fragment, which a repository URL does not need")]
    QueryOrFragment,
    /// The URL names a host but no repository path.
    #[error("the URL has no repository path")]
    EmptyPath,
    /// A path segment is empty, `.` or `..`, also when percent-encoded.
    #[error("the URL path has an empty, '.' or '..' segment (also percent-encoded)")]
    Segment,
    /// The URL contains a backslash or a control character.
    #[error("the URL path has a backslash or a control character")]
    Character,
    /// The URL's storage-key prefix would be longer than 400 bytes.
    #[error("the URL is too long to name storage keys (at most {MAX_PREFIX} bytes escaped)")]
    TooLong,
    /// A route or a storage-key prefix does not name an upstream (the text says why).
    #[error("not a route: {0}")]
    Route(String),
}

/// An upstream's scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// `http://`
    Http,
    /// `https://`
    Https,
}

impl Scheme {
    /// The scheme as written in a URL: `"http"` or `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A normalised upstream repository URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Upstream {
    scheme: Scheme,
    /// Lower-case host, with `[…]` around IPv6 and `:port` unless the default.
    authority: String,
    /// Without leading or trailing `/`; never empty.
    path: String,
}

/// Longest key prefix, so that every key under it stays within `larder_proto::Key`'s 512 bytes.
const MAX_PREFIX: usize = 400;

impl Upstream {
    /// Parses and normalises an upstream URL (lower-case host, default port dropped, trailing `/`
    /// stripped), refusing anything [`UpstreamError`] lists.
    pub fn parse(raw: &str) -> Result<Upstream, UpstreamError> {
        if raw.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
            return Err(UpstreamError::Character);
        }
        // The raw path is checked before the URL parser resolves dot segments away.
        if let Some((_, after_scheme)) = raw.split_once("://") {
            let path_start = after_scheme.find('/').unwrap_or(after_scheme.len());
            let rest = &after_scheme[path_start..];
            let path = rest.split(['?', '#']).next().unwrap_or("");
            check_raw_segments(path)?;
        }
        let url = url::Url::parse(raw).map_err(|e| UpstreamError::Syntax(e.to_string()))?;
        let scheme = match url.scheme() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(UpstreamError::Scheme(other.to_string())),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UpstreamError::Credentials);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(UpstreamError::QueryOrFragment);
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| UpstreamError::Syntax("no host".into()))?
            .to_ascii_lowercase();
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host,
        };
        let path = url.path().trim_start_matches('/');
        let path = path.strip_suffix('/').unwrap_or(path);
        let upstream = Upstream::from_parts(scheme, authority, path.to_string())?;
        Ok(upstream)
    }

    fn from_parts(
        scheme: Scheme,
        authority: String,
        path: String,
    ) -> Result<Upstream, UpstreamError> {
        if path.is_empty() {
            return Err(UpstreamError::EmptyPath);
        }
        check_raw_segments(&format!("/{path}"))?;
        let upstream = Upstream {
            scheme,
            authority,
            path,
        };
        if upstream.key_prefix().len() > MAX_PREFIX {
            return Err(UpstreamError::TooLong);
        }
        Ok(upstream)
    }

    /// The upstream named by a route (`{host}/{path}`) under `scheme`. The route is what the
    /// server took from its request path, already percent-decoded once.
    pub fn from_route(scheme: Scheme, route: &str) -> Result<Upstream, UpstreamError> {
        if route.contains("://") || route.starts_with('/') {
            return Err(UpstreamError::Route(
                "expected host/path without a scheme".into(),
            ));
        }
        Upstream::parse(&format!("{}://{route}", scheme.as_str()))
    }

    /// The upstream whose [`Upstream::key_prefix`] is `prefix`.
    pub fn from_key_prefix(prefix: &str) -> Result<Upstream, UpstreamError> {
        let bad = || UpstreamError::Route(format!("not a git key prefix: {prefix:?}"));
        let mut segments = prefix.split('/');
        let scheme = match segments.next() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err(bad()),
        };
        let authority = unescape(segments.next().ok_or_else(bad)?).ok_or_else(bad)?;
        let mut rest: Vec<&str> = segments.collect();
        if rest.pop() != Some("~") {
            return Err(bad());
        }
        let path = rest
            .iter()
            .map(|s| unescape(s))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?
            .join("/");
        let upstream = Upstream::from_parts(scheme, authority, path)?;
        if upstream.key_prefix() != prefix {
            return Err(bad());
        }
        Ok(upstream)
    }

    /// The URL's scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Host (lower case, `[…]` for IPv6) and `:port` unless it is the scheme's default.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The repository path, without leading or trailing `/`, as it appears in the URL.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The normalised URL, e.g. `https://github.com/acme/app.git`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}/{}",
            self.scheme.as_str(),
            self.authority,
            self.path
        )
    }

    /// `{host}/{path}`, as in `/api/v1/git/{host}/{path}/head`.
    pub fn route(&self) -> String {
        format!("{}/{}", self.authority, self.path)
    }

    /// The key prefix of everything stored for this repository:
    /// `{scheme}/{escaped host}/{escaped path segments}/~`.
    pub fn key_prefix(&self) -> String {
        let mut out = format!("{}/{}", self.scheme.as_str(), escape(&self.authority));
        for segment in self.path.split('/') {
            out.push('/');
            out.push_str(&escape(segment));
        }
        out.push_str("/~");
        out
    }

    /// `{prefix}/{name}` as a storage key.
    pub fn key(&self, name: &str) -> Result<Key, larder_proto::NameError> {
        Key::parse(&format!("{}/{name}", self.key_prefix()))
    }

    /// Where the head record lives: `{prefix}/head.json`.
    pub fn head_key(&self) -> Key {
        self.key("head.json")
            .expect("a valid prefix makes valid keys")
    }

    /// Where the snapshot of `commit` lives: `{prefix}/snapshots/{commit}.tar.zst`.
    pub fn snapshot_key(&self, commit: &crate::CommitId) -> Key {
        self.key(&format!("snapshots/{commit}.tar.zst"))
            .expect("a valid prefix makes valid keys")
    }

    /// Where the list of stored snapshots lives (the server's retention): `{prefix}/snapshots.json`.
    pub fn snapshot_index_key(&self) -> Key {
        self.key("snapshots.json")
            .expect("a valid prefix makes valid keys")
    }

    /// Where a bundle lives: `{prefix}/bundles/{id}.bundle` (`id` as made by
    /// [`crate::BundleChain`], `full-N` or `inc-N`).
    pub fn bundle_key(&self, id: &str) -> Result<Key, larder_proto::NameError> {
        self.key(&format!("bundles/{id}.bundle"))
    }

    /// Where the bundle chain's state lives: `{prefix}/bundles/chain.json`.
    pub fn bundle_chain_key(&self) -> Key {
        self.key("bundles/chain.json")
            .expect("a valid prefix makes valid keys")
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

impl std::str::FromStr for Upstream {
    type Err = UpstreamError;

    fn from_str(s: &str) -> Result<Upstream, UpstreamError> {
        Upstream::parse(s)
    }
}

/// Refuses empty, `.` and `..` segments of a raw (still percent-encoded) path, however their dots
/// are spelled, before anything resolves them.
fn check_raw_segments(path: &str) -> Result<(), UpstreamError> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        return Err(UpstreamError::EmptyPath);
    }
    for segment in path.split('/') {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        if decoded.is_empty() || decoded == "." || decoded == ".." {
            return Err(UpstreamError::Segment);
        }
    }
    Ok(())
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// `~XX` for every byte outside `[A-Za-z0-9._-]`. A segment of only dots is escaped whole, so
/// that an escaped segment is never `.` or `..` (which the path check excludes anyway).
fn escape(segment: &str) -> String {
    let all_dots = segment.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if is_plain(b) && !all_dots {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02x}"));
        }
    }
    out
}

fn unescape(segment: &str) -> Option<String> {
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'~' {
            let hex = segment.get(i + 1..i + 3)?;
            if hex
                .bytes()
                .any(|c| !(c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if is_plain(b[i]) {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// The namespace of upstreams matched by a pattern that names none.
pub const DEFAULT_NAMESPACE: &str = "git";

/// A `--git-allow` pattern that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid --git-allow pattern {pattern:?}: {reason}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// Why it was refused, one line.
    pub reason: String,
}

/// Why an upstream is not served; the text is a one-line reason for a 403/404 body or a log.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct Refusal(String);

struct Rule {
    pattern: String,
    glob: GlobMatcher,
    namespace: Namespace,
    /// Length of the text before the first glob character: the longer, the more specific.
    literal: usize,
}

/// The upstreams larder serves (`--git-allow URLGLOB[=namespace]`, repeatable).
///
/// `*` matches within one path segment and `**` across segments, over the normalised URL
/// (`https://github.com/acme/*`). When several patterns match, the most specific one (the
/// longest text before its first glob character; the later one on a tie) names the namespace,
/// so `https://github.com/acme/secret-*=git-secret` keeps those snapshots apart however the
/// patterns are ordered.
pub struct AllowList {
    rules: Vec<Rule>,
}

impl AllowList {
    /// Parses `URLGLOB[=namespace]` patterns (namespace `git` when omitted); the first invalid one
    /// is the error.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<AllowList, PatternError> {
        let rules = patterns
            .iter()
            .map(|p| parse_rule(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(AllowList { rules })
    }

    /// Whether no pattern was given, so that no upstream is served.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The namespace `upstream`'s snapshots live in, or why it is not served.
    pub fn check(&self, upstream: &Upstream) -> Result<Namespace, Refusal> {
        let url = upstream.url();
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.glob.is_match(&url))
            .max_by_key(|(i, r)| (r.literal, *i))
            .map(|(_, r)| r.namespace.clone())
            .ok_or_else(|| {
                Refusal(if self.rules.is_empty() {
                    format!("{url} is not served: no --git-allow pattern is configured")
                } else {
                    format!("{url} is not served: it matches no --git-allow pattern")
                })
            })
    }

    /// The patterns as given, for logs and error messages.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.pattern.as_str())
    }
}

fn parse_rule(raw: &str) -> Result<Rule, PatternError> {
    let err = |reason: &str| PatternError {
        pattern: raw.to_string(),
        reason: reason.to_string(),
    };
    let (glob_text, namespace) = match raw.rsplit_once('=') {
        Some((g, ns)) => (
            g,
            Namespace::parse(ns).map_err(|e| err(&format!("{e} (after '=')")))?,
        ),
        None => (
            raw,
            Namespace::parse(DEFAULT_NAMESPACE).expect("the default namespace is valid"),
        ),
    };
    let (scheme, rest) = glob_text
        .split_once("://")
        .ok_or_else(|| err("expected a URL glob such as https://github.com/acme/*"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(err("the scheme must be http or https"));
    }
    // Scheme and host are case-insensitive, and upstream URLs are compared in lower case.
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() || host.contains('@') {
        return Err(err("expected a host (and no user name) after the scheme"));
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let normalised = format!("{scheme}://{}/{path}", host.to_ascii_lowercase());
    let glob = GlobBuilder::new(&normalised)
        .literal_separator(true)
        .build()
        .map_err(|e| err(&e.to_string()))?
        .compile_matcher();
    let literal = normalised
        .find(['*', '?', '[', '{', '\\'])
        .unwrap_or(normalised.len());
    Ok(Rule {
        pattern: raw.to_string(),
        glob,
        namespace,
        literal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> Upstream {
        Upstream::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    #[test]
    fn urls_are_normalised_to_one_spelling() {
        for (raw, want) in [
            (
                "HTTPS://GitHub.COM/acme/App.git/",
                "https://github.com/acme/App.git",
            ),
            (
                "https://github.com:443/acme/app",
                "https://github.com/acme/app",
            ),
            (
                "http://127.0.0.1:8000/cargo.git",
                "http://127.0.0.1:8000/cargo.git",
            ),
            ("http://[::1]:8000/r.git", "http://[::1]:8000/r.git"),
            ("http://[2001:DB8::1]/r", "http://[2001:db8::1]/r"),
            ("https://h/a%20b/c", "https://h/a%20b/c"),
            ("https://h/.well-known/r", "https://h/.well-known/r"),
        ] {
            assert_eq!(ok(raw).url(), want, "{raw}");
        }
    }

    #[test]
    fn route_form_is_host_and_path() {
        let u = ok("http://127.0.0.1:8000/cargo.git");
        assert_eq!(u.route(), "127.0.0.1:8000/cargo.git");
        assert_eq!(Upstream::from_route(Scheme::Http, &u.route()).unwrap(), u);
        let v6 = ok("https://[::1]/group/sub/r.git");
        assert_eq!(v6.route(), "[::1]/group/sub/r.git");
        assert_eq!(
            Upstream::from_route(Scheme::Https, &v6.route()).unwrap(),
            v6
        );
        assert!(Upstream::from_route(Scheme::Http, "http://h/r").is_err());
        assert!(Upstream::from_route(Scheme::Http, "h/../r").is_err());
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_being_repeated() {
        for raw in [
            "https://user:hunter2@github.com/acme/app.git",
            "https://token@github.com/acme/app.git",
            "https://:hunter2@github.com/acme/app.git",
        ] {
            let e = Upstream::parse(raw).unwrap_err();
            assert_eq!(e, UpstreamError::Credentials, "{raw}");
            assert!(!e.to_string().contains("hunter2"));
        }
    }

    #[test]
    fn hostile_paths_are_refused_before_they_are_resolved() {
        for raw in [
            "https://h/a/../b",
            "https://h/a/%2e%2e/b",
            "https://h/a/%2E%2e/b",
            "https://h/a/.%2e/b",
            "https://h/a/./b",
            "https://h/a/%2e/b",
            "https://h/..",
            "https://h/a//b",
            "https://h/",
            "https://h",
            "https:///r.git",
            "https://h/a\\..\\b",
            "https://h/a\nb",
            "https://h/r?x=1",
            "https://h/r#frag",
            "ssh://h/r.git",
            "git@github.com:acme/app.git",
            "file:///etc/passwd",
            "/srv/git/r.git",
            "",
        ] {
            assert!(Upstream::parse(raw).is_err(), "{raw:?} was accepted");
        }
    }

    #[test]
    fn key_prefixes_are_valid_keys_and_reversible() {
        for raw in [
            "http://127.0.0.1:8000/cargo.git",
            "https://[::1]:8443/a/b/c.git",
            "https://h/a%20b/~user/r",
            "https://h/.../r",
            "https://h/x_y-z.git",
        ] {
            let u = ok(raw);
            let prefix = u.key_prefix();
            Key::parse(&prefix).unwrap_or_else(|e| panic!("{prefix}: {e}"));
            u.key("head.json").unwrap();
            assert_eq!(Upstream::from_key_prefix(&prefix).unwrap(), u, "{prefix}");
        }
        let u = ok("http://127.0.0.1:8000/cargo.git");
        assert_eq!(u.key_prefix(), "http/127.0.0.1~3a8000/cargo.git/~");
        assert_eq!(
            u.head_key().as_str(),
            "http/127.0.0.1~3a8000/cargo.git/~/head.json"
        );
        let commit = crate::CommitId::parse(&"a".repeat(64)).unwrap();
        assert_eq!(
            u.snapshot_key(&commit).as_str(),
            format!("http/127.0.0.1~3a8000/cargo.git/~/snapshots/{commit}.tar.zst")
        );
        assert!(u.bundle_key("inc-7").is_ok());
        assert!(u.bundle_key("../x").is_err());
        u.bundle_chain_key();
        // The longest accepted URL still leaves room for every key under it.
        let longest = ok(&format!("https://h/{}", "a".repeat(MAX_PREFIX - 12)));
        longest.snapshot_key(&commit);
    }

    #[test]
    fn one_repository_keys_never_fall_under_another() {
        // A repository whose path continues another's must not share its key space.
        let a = ok("https://h/group/app").key_prefix();
        let b = ok("https://h/group/app/~/head.json").key_prefix();
        let c = ok("https://h/group/app/~").key_prefix();
        for other in [&b, &c] {
            assert!(!other.starts_with(&format!("{a}/")), "{other} under {a}");
        }
        assert_ne!(
            ok("http://h/r").key_prefix(),
            ok("https://h/r").key_prefix()
        );
    }

    #[test]
    fn malformed_key_prefixes_are_refused() {
        for p in [
            "",
            "ftp/h/r/~",
            "https/h/r",
            "https/h/~",
            "https/h/r~zz/~",
            "https/h/r~3A/~",
            "https/h/%41/~",
            "https/h/~2e~2e/~",
        ] {
            assert!(Upstream::from_key_prefix(p).is_err(), "{p:?} was accepted");
        }
    }

    #[test]
    fn over_long_urls_are_refused() {
        let long = format!("https://h/{}", "a/".repeat(250));
        assert_eq!(Upstream::parse(&long).unwrap_err(), UpstreamError::TooLong);
    }

    fn allow(patterns: &[&str]) -> AllowList {
        AllowList::new(patterns).unwrap()
    }

    #[test]
    fn allow_list_matches_within_segments_and_names_namespaces() {
        let list = allow(&[
            "https://github.com/acme/*",
            "https://GitHub.com/acme/secret-*=git-secret",
            "http://127.0.0.1:*/**",
        ]);
        let ns = |raw: &str| list.check(&ok(raw)).map(|n| n.to_string());
        assert_eq!(ns("https://github.com/acme/app.git").unwrap(), "git");
        assert_eq!(
            ns("https://github.com/acme/secret-x").unwrap(),
            "git-secret"
        );
        assert_eq!(ns("http://127.0.0.1:8000/a/b/c.git").unwrap(), "git");
        assert!(ns("https://github.com/acme/group/app.git").is_err());
        assert!(ns("https://github.com/evil/app.git").is_err());
        assert!(ns("http://github.com/acme/app.git").is_err());
        assert!(ns("https://github.com.evil.example/acme/app.git").is_err());
    }

    #[test]
    fn the_most_specific_pattern_wins_in_any_order() {
        let a = allow(&["https://h/acme/secret-*=git-secret", "https://h/acme/*"]);
        let b = allow(&["https://h/acme/*", "https://h/acme/secret-*=git-secret"]);
        for list in [a, b] {
            let ns = list.check(&ok("https://h/acme/secret-1")).unwrap();
            assert_eq!(ns.as_str(), "git-secret");
        }
    }

    #[test]
    fn refusals_are_one_line_reasons() {
        let r = allow(&["https://h/acme/*"])
            .check(&ok("https://h/x/y"))
            .unwrap_err();
        assert_eq!(
            r.to_string(),
            "https://h/x/y is not served: it matches no --git-allow pattern"
        );
        let none = AllowList::new::<&str>(&[]).unwrap();
        assert!(
            none.check(&ok("https://h/x"))
                .unwrap_err()
                .to_string()
                .contains("no --git-allow")
        );
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in [
            "github.com/acme/*",
            "ssh://h/*",
            "https://h/*=Bad_NS",
            "https://h/*=",
            "https://u@h/*",
            "https://h/[",
        ] {
            assert!(AllowList::new(&[p]).is_err(), "{p:?} was accepted");
        }
    }
}
