//! Access control: bearer tokens with scopes over namespace patterns.
//!
//! The configuration holds only SHA-256 digests of tokens, so a leaked config file or a core
//! dump of the config parser gives nobody access. A presented token is hashed and looked up;
//! the token itself is never stored, logged or put in a metric label — only the name the
//! operator gave it.
//!
//! Without any token configured larderd runs open (every request has every scope); the
//! listener check in [`check_exposure`] keeps that mode on loopback unless the operator says
//! `--allow-anonymous`.
//!
//! The tokens in force ([`LiveAuth`]) can be replaced while the server runs (SIGHUP re-reads
//! the configuration file): a request resolves its caller against one whole set, old or new,
//! never a mix.

use globset::{Glob, GlobMatcher};
use http::HeaderMap;
use http::header::AUTHORIZATION;
use larder_proto::Namespace;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> anyhow::Result<Scope> {
        match s {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            other => anyhow::bail!("unknown scope {other:?} (expected read, write or admin)"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// Namespace patterns as the configuration writes them (a token's `namespaces`, the Bazel
/// route's `unchecked_namespaces`): `*` matches any run of characters.
#[derive(Clone, Debug, Default)]
pub struct NamespacePatterns(Vec<GlobMatcher>);

impl NamespacePatterns {
    /// Compiles `patterns`; `Err` names the pattern that is not one.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> anyhow::Result<NamespacePatterns> {
        patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                Glob::new(p)
                    .map(|g| g.compile_matcher())
                    .map_err(|e| anyhow::anyhow!("namespace pattern {p:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(NamespacePatterns)
    }

    /// Whether any pattern matches `ns` (none does when there are no patterns).
    pub fn matches(&self, ns: &Namespace) -> bool {
        self.0.iter().any(|m| m.is_match(ns.as_str()))
    }
}

/// One configured token: its name (for logs), its scopes and the namespaces they cover.
#[derive(Debug)]
pub struct Grant {
    pub name: String,
    scopes: Vec<Scope>,
    namespaces: NamespacePatterns,
}

impl Grant {
    pub fn new(name: String, scopes: &[String], namespaces: &[String]) -> anyhow::Result<Grant> {
        if scopes.is_empty() {
            anyhow::bail!("token {name:?} has no scopes");
        }
        let scopes = scopes
            .iter()
            .map(|s| Scope::parse(s))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| anyhow::anyhow!("token {name:?}: {e}"))?;
        let patterns: Vec<&str> = if namespaces.is_empty() {
            vec!["*"]
        } else {
            namespaces.iter().map(String::as_str).collect()
        };
        let namespaces = NamespacePatterns::new(&patterns)
            .map_err(|e| anyhow::anyhow!("token {name:?}: {e}"))?;
        Ok(Grant {
            name,
            scopes,
            namespaces,
        })
    }

    fn allows(&self, scope: Scope, ns: Option<&Namespace>) -> bool {
        self.scopes.contains(&scope)
            && match ns {
                Some(ns) => self.namespaces.matches(ns),
                None => true,
            }
    }
}

/// Who is asking: resolved once per request from the `Authorization` header.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// No tokens are configured: everything is allowed.
    Open,
    Token(&'a Grant),
}

impl Caller<'_> {
    /// Whether the caller may use `scope` on `ns` (or, with `None`, on some namespace: for
    /// routes that are not about one namespace, like stats).
    pub fn allows(&self, scope: Scope, ns: Option<&Namespace>) -> bool {
        match self {
            Caller::Open => true,
            Caller::Token(grant) => grant.allows(scope, ns),
        }
    }

    /// The token's name for logs; never the token.
    pub fn name(&self) -> &str {
        match self {
            Caller::Open => "",
            Caller::Token(grant) => &grant.name,
        }
    }
}

/// Why a request was refused before it reached a handler.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// 401: no usable credentials.
    Unauthenticated(&'static str),
    /// 403: a known token without the scope.
    Forbidden(String),
}

#[derive(Debug, Default)]
pub struct Auth {
    by_digest: HashMap<[u8; 32], Grant>,
    /// Whether `/metrics` is readable without a token when tokens are configured.
    pub public_metrics: bool,
}

impl Auth {
    /// `tokens` are (hex SHA-256 digest, grant) pairs from the configuration.
    pub fn new(tokens: Vec<(String, Grant)>, public_metrics: bool) -> anyhow::Result<Auth> {
        let mut by_digest = HashMap::new();
        for (hex, grant) in tokens {
            let digest = parse_digest(&hex).map_err(|e| {
                anyhow::anyhow!(
                    "token {:?}: sha256 {e} (expected 64 hex digits)",
                    grant.name
                )
            })?;
            if let Some(previous) = by_digest.insert(digest, grant) {
                anyhow::bail!(
                    "token {:?}: the same sha256 is configured twice",
                    previous.name
                );
            }
        }
        Ok(Auth {
            by_digest,
            public_metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        !self.by_digest.is_empty()
    }

    /// How many tokens are configured.
    pub fn token_count(&self) -> usize {
        self.by_digest.len()
    }

    /// Resolves the caller of a request. Without configured tokens every request is `Open`,
    /// whatever it sends.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller<'_>, Denied> {
        if !self.enabled() {
            return Ok(Caller::Open);
        }
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Err(Denied::Unauthenticated("a bearer token is required"));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(token_of)
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Unauthenticated(
                "the Authorization header is neither \"Bearer <token>\" nor Basic with the token as password",
            ))?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_digest
            .get(&digest)
            .map(Caller::Token)
            .ok_or(Denied::Unauthenticated("unknown token"))
    }

    /// Resolves the caller and checks one scope in one step.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        scope: Scope,
        ns: Option<&Namespace>,
    ) -> Result<Caller<'_>, Denied> {
        let caller = self.caller(headers)?;
        if caller.allows(scope, ns) {
            return Ok(caller);
        }
        Err(Denied::Forbidden(match ns {
            Some(ns) => format!(
                "token {:?} has no {} scope on namespace {ns}",
                caller.name(),
                scope.as_str()
            ),
            None => format!("token {:?} has no {} scope", caller.name(), scope.as_str()),
        }))
    }
}

/// The token set in force, replaceable while requests run.
///
/// Every request reads it, so reading must take no lock and write no memory that other cores
/// read (a `RwLock` would write its reader count, a line every worker shares, on each request).
/// An `ArcSwap` load writes only this thread's own slot, about 80 instructions with its
/// release; a small GET on the fast path is about 7,800, so without tokens (where the answer
/// is always "open") the fast path reads only `open`, a flag that changes with a reload.
#[derive(Debug)]
pub struct LiveAuth {
    current: arc_swap::ArcSwap<Auth>,
    /// Whether `current` has no tokens: written after `current` on a reload, so a request that
    /// sees it set finds no tokens in `current` either, or comes just before the new set.
    open: AtomicBool,
}

impl LiveAuth {
    pub fn new(auth: Arc<Auth>) -> LiveAuth {
        LiveAuth {
            open: AtomicBool::new(!auth.enabled()),
            current: arc_swap::ArcSwap::new(auth),
        }
    }

    /// Whether no token is configured: every request may do everything.
    pub fn open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The set in force, for one request's checks (not to be kept across an `.await`: see
    /// [`LiveAuth::current_owned`]).
    pub fn current(&self) -> arc_swap::Guard<Arc<Auth>> {
        self.current.load()
    }

    /// The set in force, for a request that checks again after waiting on something.
    pub fn current_owned(&self) -> Arc<Auth> {
        self.current.load_full()
    }

    /// Puts `auth` in force for every request that resolves its caller from now on.
    pub fn replace(&self, auth: Arc<Auth>) {
        let open = !auth.enabled();
        self.current.store(auth);
        self.open.store(open, Ordering::Release);
    }
}

/// The token in an `Authorization` value: `Bearer <token>`, or `Basic` with the token as the
/// password (Gradle and Maven send nothing else; the user name is not checked), or as the user
/// name when the password is empty.
fn token_of(value: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()?;
    let pair = String::from_utf8(decoded).ok()?;
    let (user, password) = pair.split_once(':')?;
    Some(if password.is_empty() { user } else { password }.to_string())
}

fn parse_digest(hex: &str) -> Result<[u8; 32], &'static str> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return Err("has the wrong length");
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| "is not hex")?;
        out[i] = u8::from_str_radix(text, 16).map_err(|_| "is not hex")?;
    }
    Ok(out)
}

/// The SHA-256 of a token as the configuration expects it (what `sha256sum` prints).
pub fn token_digest_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Refuses to serve without access control on an address other hosts can reach, unless the
/// operator asked for it: an open cache on a network is a way to poison every build.
pub fn check_exposure(
    listen: SocketAddr,
    auth: &Auth,
    allow_anonymous: bool,
) -> anyhow::Result<()> {
    if auth.enabled() && allow_anonymous {
        anyhow::bail!(
            "--allow-anonymous cannot be combined with configured tokens: with tokens every \
             request needs one; remove allow_anonymous or the tokens"
        );
    }
    if !auth.enabled() && !allow_anonymous && !listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {listen} without access control: configure tokens \
             ([[tokens]] in the config file) or pass --allow-anonymous to serve everyone"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn auth() -> Auth {
        let ci = Grant::new(
            "ci".into(),
            &["read".into(), "write".into()],
            &["ci-*".into()],
        )
        .unwrap();
        let ops = Grant::new("ops".into(), &["admin".into(), "read".into()], &[]).unwrap();
        Auth::new(
            vec![
                (token_digest_hex("ci-secret"), ci),
                (token_digest_hex("ops-secret"), ops),
            ],
            true,
        )
        .unwrap()
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn ns(s: &str) -> Namespace {
        Namespace::parse(s).unwrap()
    }

    #[test]
    fn scopes_apply_only_to_matching_namespaces() {
        let auth = auth();
        let h = bearer("ci-secret");
        assert!(
            auth.authorize(&h, Scope::Write, Some(&ns("ci-main")))
                .is_ok()
        );
        assert!(matches!(
            auth.authorize(&h, Scope::Write, Some(&ns("release"))),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            auth.authorize(&h, Scope::Admin, Some(&ns("ci-main"))),
            Err(Denied::Forbidden(_))
        ));
        let ops = bearer("ops-secret");
        assert!(
            auth.authorize(&ops, Scope::Read, Some(&ns("release")))
                .is_ok()
        );
        assert!(auth.authorize(&ops, Scope::Admin, None).is_ok());
        assert!(matches!(
            auth.authorize(&ops, Scope::Write, Some(&ns("release"))),
            Err(Denied::Forbidden(_))
        ));
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let auth = auth();
        let none = HeaderMap::new();
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, HeaderValue::from_static("Basic Y2k6eA=="));
        for h in [none, basic, bearer("ci-secretx"), bearer("")] {
            assert!(matches!(
                auth.authorize(&h, Scope::Read, Some(&ns("ci-a"))),
                Err(Denied::Unauthenticated(_))
            ));
        }
    }

    #[test]
    fn without_tokens_everything_is_open() {
        let auth = Auth::default();
        assert!(
            auth.authorize(&HeaderMap::new(), Scope::Admin, None)
                .is_ok()
        );
    }

    #[test]
    fn digests_are_validated() {
        let grant = || Grant::new("x".into(), &["read".into()], &[]).unwrap();
        assert!(Auth::new(vec![("abc".into(), grant())], true).is_err());
        assert!(Auth::new(vec![("zz".repeat(32), grant())], true).is_err());
        let d = token_digest_hex("t");
        assert!(Auth::new(vec![(d.clone(), grant()), (d, grant())], true).is_err());
        assert!(Grant::new("x".into(), &["delete".into()], &[]).is_err());
        assert!(Grant::new("x".into(), &[], &[]).is_err());
        // What `printf %s abc | sha256sum` prints.
        assert_eq!(
            token_digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn open_mode_stays_on_loopback_unless_allowed() {
        let open = Auth::default();
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let lo6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert!(check_exposure(any, &open, false).is_err());
        assert!(check_exposure(lo, &open, false).is_ok());
        assert!(check_exposure(lo6, &open, false).is_ok());
        assert!(check_exposure(any, &open, true).is_ok());
        assert!(check_exposure(any, &auth(), false).is_ok());
        assert!(check_exposure(lo, &auth(), true).is_err());
    }
}
