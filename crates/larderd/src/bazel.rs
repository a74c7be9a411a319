//! The Bazel HTTP remote cache: `GET|HEAD|PUT /bazel/{ns}/ac/{hash}` and `/bazel/{ns}/cas/{hash}`,
//! what Bazel speaks with `--remote_cache=http://HOST/bazel/NS` (and ccache with
//! `layout=bazel`, and bazel-remote serves). See docs/ARCHITECTURE.md, "Bazel remote cache".
//!
//! This module sits beside `git.rs` because, like it, it is a protocol larderd speaks on top of
//! its object API, and it is named after its route prefix: `api.rs` only routes `/bazel/…` here.
//! Everything but the protocol's checks is the object route's: access control
//! (`api::admit`), reads (`api::get`, `api::respond`), writes (`api::put_checked`), metrics, the
//! access log and the tiers. Entries are ordinary objects of the namespace `{ns}` under the
//! keys `ac/{hash}` and `cas/{hash}`.
//!
//! The checks, and why:
//! - `cas/` PUT: the SHA-256 of the body, computed while it streams in, must be the key. A
//!   mismatch ends the upload in an error before the tier commits (`io::checked`), so nothing is
//!   stored on any tier, and the client gets `400` with the two digests.
//! - `ac/` PUT, unless the namespace is unchecked (`[bazel] unchecked_namespaces`): at most
//!   `max_action_result_size` bytes (`413`), and a REAPI `ActionResult` with at least one output
//!   and well-formed digests (`400` otherwise). The key cannot be checked: it is the digest of
//!   the action, which the cache never sees.
//! - `ac/` GET and HEAD (same namespaces): an entry is served only while every CAS blob it
//!   refers to (output files, output directories' trees, stdout, stderr) is stored with the
//!   size its digest says; a blob that expired, was evicted or deleted makes the entry a miss
//!   (`404`), as bazel-remote does, so Bazel runs the action again instead of failing to
//!   download its outputs. The check reads one byte of each blob, which counts as a read for
//!   the disk tier's eviction order: an entry that is used keeps its blobs too. As a client can
//!   see it, an action result therefore never outlives its blobs. (Files inside an output
//!   directory's tree are not looked at; the tree blob itself is.)

use crate::api::{self, Body, OBJECT_PUT, PutRules, ReadRoute, Req, RequestLog, State, text};
use crate::auth::Scope;
use crate::io::{BodyCheck, Refusal};
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use http::{Method, Response, StatusCode};
use larder_proto::{Key, Namespace, ReadConditions, decide_read};
use larder_tier::{ErrorKind, GetOptions, GetResponse, TierError};
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeSet;
use std::sync::Arc;

const METHODS: &str = "GET, HEAD, PUT";
/// The SHA-256 of no bytes: the key of the empty blob, which needs no storing to exist.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// How many blobs of one action result are looked up at once.
const BLOB_CHECKS_AT_ONCE: usize = 8;

/// The two stores of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// Action cache: action digest → `ActionResult`.
    Ac,
    /// Content-addressed storage: SHA-256 → bytes.
    Cas,
}

impl Store {
    fn as_str(self) -> &'static str {
        match self {
            Store::Ac => "ac",
            Store::Cas => "cas",
        }
    }
}

/// The label of the route's metrics and access line (`rest` is the path after `/bazel/`): the
/// action cache's misses are the build's, the CAS's should stay near zero.
pub fn label(rest: &str) -> &'static str {
    match rest.split('/').nth(1) {
        Some("ac") => "bazel_ac",
        Some("cas") => "bazel_cas",
        _ => "bazel",
    }
}

/// `{ns}/{ac|cas}/{hash}` into its parts; `Err` is the status and the one-line reason.
fn parse_path(rest: &str) -> Result<(Namespace, Store, &str), (StatusCode, String)> {
    let mut parts = rest.splitn(3, '/');
    let (ns, store, hash) = (parts.next(), parts.next(), parts.next());
    let store = match store {
        Some("ac") => Store::Ac,
        Some("cas") => Store::Cas,
        _ => {
            return Err((
                StatusCode::NOT_FOUND,
                "no such Bazel cache path: expected /bazel/{namespace}/ac/{sha256} or /bazel/{namespace}/cas/{sha256}".into(),
            ));
        }
    };
    let ns =
        Namespace::parse(ns.unwrap_or("")).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let hash = hash.unwrap_or("");
    if !is_sha256_hex(hash) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "a Bazel {} key must be 64 lowercase hex digits (a SHA-256)",
                store.as_str()
            ),
        ));
    }
    Ok((ns, store, hash))
}

/// The check a write of `key` through the object route must pass when the key names a CAS
/// blob (`cas/{sha256}`): its SHA-256. Nothing on the read side could catch a blob stored under
/// another digest, so no route may store one. (An action result stored that way is caught on
/// the read side: `/bazel/` serves only one that decodes and whose blobs exist.)
pub(crate) fn object_route_check(key: &Key) -> Option<Box<dyn BodyCheck>> {
    let hash = key.as_str().strip_prefix("cas/")?;
    is_sha256_hex(hash).then(|| Box::new(Sha256Check::new(hash)) as Box<dyn BodyCheck>)
}

/// The route, namespace and key of a read under `/bazel/` (`rest` is the path after it) that
/// the fast path answers: a blob, or an action result (a plain object read where action results
/// are unchecked, else [`action_result`]). Anything else, a malformed hash included, is
/// [`handle`]'s, which says what is wrong.
pub(crate) fn read_route(rest: &str) -> Option<(ReadRoute, &str, &str)> {
    let (ns, key) = rest.split_once('/')?;
    let (store, hash) = key.split_once('/')?;
    let route = match store {
        "cas" => ReadRoute::BazelCas,
        "ac" => ReadRoute::BazelAc,
        _ => return None,
    };
    is_sha256_hex(hash).then_some((route, ns, key))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The object key of an entry: `ac/{hash}` or `cas/{hash}`.
fn entry_key(store: Store, hash: &str) -> Key {
    Key::parse(&format!("{}/{hash}", store.as_str()))
        .expect("ac/ or cas/ followed by 64 hex digits is a key")
}

/// Answers a request under `/bazel/` (`rest` is the path after it).
pub(crate) async fn handle(
    state: &Arc<State>,
    rest: &str,
    req: &mut Req,
    log: &mut RequestLog,
) -> Response<Body> {
    let method = req.method().clone();
    if !matches!(method, Method::GET | Method::HEAD | Method::PUT) {
        return api::method_not_allowed(METHODS);
    }
    let (ns, store, hash) = match parse_path(rest) {
        Ok(parts) => parts,
        Err((status, reason)) => return text(status, reason),
    };
    let key = entry_key(store, hash);
    let put = method == Method::PUT;
    let scope = if put { Scope::Write } else { Scope::Read };
    if let Err(refused) = api::admit(state, req, log, (&ns, &key), scope) {
        return *refused;
    }
    let checked = store == Store::Ac && state.bazel.checks_action_results(&ns);
    let head = method == Method::HEAD;
    match (store, put) {
        (Store::Cas, true) => {
            let check = Sha256Check::new(hash);
            api::put_checked(state, &ns, &key, req, &OBJECT_PUT, Some(Box::new(check))).await
        }
        (Store::Ac, true) if checked => {
            let max = state.bazel.max_action_result_size;
            let rules = PutRules {
                max_size: Some((max, "Bazel action result size")),
                ..OBJECT_PUT
            };
            let check = ActionResultCheck::new(max);
            api::put_checked(state, &ns, &key, req, &rules, Some(Box::new(check))).await
        }
        (Store::Ac, false) if checked => {
            let conditions = api::read_conditions(req.headers());
            let (response, tier) = action_result(state, (&ns, &key), &conditions, head).await;
            log.tier = tier;
            response
        }
        (_, true) => api::put(state, &ns, &key, req, &OBJECT_PUT).await,
        (_, false) => api::get(state, &ns, &key, req.headers(), head, log).await,
    }
}

/// Refuses a CAS upload whose SHA-256 is not its key.
pub(crate) struct Sha256Check {
    expected: [u8; 32],
    hasher: Sha256,
}

impl Sha256Check {
    /// `hex` is the key: 64 lowercase hex digits (checked by the route).
    fn new(hex: &str) -> Sha256Check {
        let mut expected = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate().take(32) {
            let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            expected[i] = digit(pair[0]) << 4 | digit(pair[1]);
        }
        Sha256Check {
            expected,
            hasher: Sha256::new(),
        }
    }
}

impl BodyCheck for Sha256Check {
    fn update(&mut self, chunk: &[u8]) -> Result<(), Refusal> {
        self.hasher.update(chunk);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Refusal> {
        let got: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        if got == self.expected {
            return Ok(());
        }
        Err(Refusal::bad_request(format!(
            "the body's SHA-256 is {}, not its key {}; nothing was stored",
            hex(&got),
            hex(&self.expected)
        )))
    }
}

/// Refuses an action cache upload over the size limit (at once) or that is not an
/// `ActionResult` (at its end).
pub(crate) struct ActionResultCheck {
    body: BytesMut,
    max: u64,
}

impl ActionResultCheck {
    fn new(max: u64) -> ActionResultCheck {
        ActionResultCheck {
            body: BytesMut::new(),
            max,
        }
    }
}

impl BodyCheck for ActionResultCheck {
    fn update(&mut self, chunk: &[u8]) -> Result<(), Refusal> {
        if (self.body.len() + chunk.len()) as u64 > self.max {
            return Err(Refusal {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                reason: format!(
                    "a Bazel action result may have at most {} bytes; nothing was stored",
                    self.max
                ),
            });
        }
        self.body.extend_from_slice(chunk);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Refusal> {
        decode_action_result(&self.body).map(drop).map_err(|e| {
            Refusal::bad_request(format!("not a Bazel ActionResult: {e}; nothing was stored"))
        })
    }
}

/// The messages of the Remote Execution API (build/bazel/remote/execution/v2/
/// remote_execution.proto) that an action result is checked with; fields this module does not
/// look at are left out (protobuf skips unknown fields).
pub(crate) mod reapi {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Digest {
        #[prost(string, tag = "1")]
        pub hash: String,
        #[prost(int64, tag = "2")]
        pub size_bytes: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ActionResult {
        #[prost(message, repeated, tag = "2")]
        pub output_files: Vec<OutputFile>,
        #[prost(message, repeated, tag = "10")]
        pub output_file_symlinks: Vec<OutputSymlink>,
        #[prost(message, repeated, tag = "12")]
        pub output_symlinks: Vec<OutputSymlink>,
        #[prost(message, repeated, tag = "3")]
        pub output_directories: Vec<OutputDirectory>,
        #[prost(message, repeated, tag = "11")]
        pub output_directory_symlinks: Vec<OutputSymlink>,
        #[prost(int32, tag = "4")]
        pub exit_code: i32,
        #[prost(bytes = "vec", tag = "5")]
        pub stdout_raw: Vec<u8>,
        #[prost(message, optional, tag = "6")]
        pub stdout_digest: Option<Digest>,
        #[prost(bytes = "vec", tag = "7")]
        pub stderr_raw: Vec<u8>,
        #[prost(message, optional, tag = "8")]
        pub stderr_digest: Option<Digest>,
        #[prost(message, optional, tag = "9")]
        pub execution_metadata: Option<ExecutedActionMetadata>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OutputFile {
        #[prost(string, tag = "1")]
        pub path: String,
        #[prost(message, optional, tag = "2")]
        pub digest: Option<Digest>,
        #[prost(bool, tag = "4")]
        pub is_executable: bool,
        #[prost(bytes = "vec", tag = "5")]
        pub contents: Vec<u8>,
        #[prost(message, optional, tag = "7")]
        pub node_properties: Option<NodeProperties>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OutputSymlink {
        #[prost(string, tag = "1")]
        pub path: String,
        #[prost(string, tag = "2")]
        pub target: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OutputDirectory {
        #[prost(string, tag = "1")]
        pub path: String,
        #[prost(message, optional, tag = "3")]
        pub tree_digest: Option<Digest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProperties {
        #[prost(message, repeated, tag = "1")]
        pub properties: Vec<NodeProperty>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProperty {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExecutedActionMetadata {
        #[prost(string, tag = "1")]
        pub worker: String,
    }
}

/// Parses an action cache entry as an `ActionResult` and checks what a cache relies on: every
/// digest is a SHA-256 with a size that fits it, every output file has a path and a digest,
/// every output directory a tree digest, and there is at least one output (Bazel declares an
/// output for every action, and a result without any is what most garbage decodes to: fields
/// protobuf does not know are skipped). `Err` is the reason, one line.
pub(crate) fn decode_action_result(bytes: &[u8]) -> Result<reapi::ActionResult, String> {
    let result = reapi::ActionResult::decode(bytes).map_err(|e| e.to_string())?;
    let digest = |what: &str, d: &reapi::Digest| -> Result<(), String> {
        if !is_sha256_hex(&d.hash) {
            return Err(format!(
                "{what}: the digest's hash is not 64 lowercase hex digits"
            ));
        }
        if d.size_bytes < 0 || (d.size_bytes == 0) != (d.hash == EMPTY_SHA256) {
            return Err(format!(
                "{what}: the digest's size {} does not fit its hash",
                d.size_bytes
            ));
        }
        Ok(())
    };
    for file in &result.output_files {
        if file.path.is_empty() {
            return Err("an output file has no path".into());
        }
        let what = format!("output file {:?}", file.path);
        match &file.digest {
            Some(d) => digest(&what, d)?,
            None => return Err(format!("{what} has no digest")),
        }
    }
    for dir in &result.output_directories {
        let what = format!("output directory {:?}", dir.path);
        match &dir.tree_digest {
            Some(d) => digest(&what, d)?,
            None => return Err(format!("{what} has no tree digest")),
        }
    }
    for link in result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks)
    {
        if link.path.is_empty() || link.target.is_empty() {
            return Err("an output symlink has no path or no target".into());
        }
    }
    for (what, d) in [
        ("stdout", &result.stdout_digest),
        ("stderr", &result.stderr_digest),
    ] {
        if let Some(d) = d {
            digest(what, d)?;
        }
    }
    if result.output_files.is_empty()
        && result.output_directories.is_empty()
        && result.output_symlinks.is_empty()
        && result.output_file_symlinks.is_empty()
        && result.output_directory_symlinks.is_empty()
    {
        return Err("it has no outputs".into());
    }
    Ok(result)
}

/// The CAS blobs an action result refers to, as (hash, size), each once, without the empty blob
/// (it exists without being stored).
fn referenced_blobs(result: &reapi::ActionResult) -> Vec<(String, u64)> {
    let digests = result
        .output_files
        .iter()
        .filter_map(|f| f.digest.as_ref())
        .chain(
            result
                .output_directories
                .iter()
                .filter_map(|d| d.tree_digest.as_ref()),
        )
        .chain(result.stdout_digest.as_ref())
        .chain(result.stderr_digest.as_ref());
    let unique: BTreeSet<(String, u64)> = digests
        .filter(|d| d.hash != EMPTY_SHA256)
        .map(|d| (d.hash.clone(), d.size_bytes.max(0) as u64))
        .collect();
    unique.into_iter().collect()
}

/// `GET|HEAD` of an action result in a checked namespace, on either path: read whole (it is
/// small), parsed, and served only while every blob it refers to is stored; then decided
/// against the request's conditions like any read (`decide_read` on the revision read). With
/// the answer, the tier that held the entry (empty when none could be asked).
pub(crate) async fn action_result(
    state: &State,
    (ns, key): (&Namespace, &Key),
    conditions: &ReadConditions,
    head: bool,
) -> (Response<Body>, &'static str) {
    let got = match state.tier.get(ns, key, GetOptions::default()).await {
        Ok(got) => got,
        Err(e) => return (api::tier_error(e), ""),
    };
    let source = got.source;
    (checked_read(state, ns, got, conditions, head).await, source)
}

/// The answer to a read of the action result `got`.
async fn checked_read(
    state: &State,
    ns: &Namespace,
    got: GetResponse,
    conditions: &ReadConditions,
    head: bool,
) -> Response<Body> {
    let miss = |reason: String| {
        tracing::info!(%reason, "Bazel action result treated as a miss");
        text(StatusCode::NOT_FOUND, reason)
    };
    let max = state.bazel.max_action_result_size;
    if got.meta.size > max {
        return miss(format!(
            "the stored action result has {} bytes, over the limit of {max}; treated as a miss",
            got.meta.size
        ));
    }
    let bytes: Bytes = match got.body {
        Some(body) => {
            let read = body
                .try_fold(BytesMut::new(), |mut all, chunk| async move {
                    all.extend_from_slice(&chunk);
                    Ok(all)
                })
                .await;
            match read {
                Ok(all) => all.freeze(),
                Err(e) => return api::tier_error(e),
            }
        }
        None => Bytes::new(),
    };
    let result = match decode_action_result(&bytes) {
        Ok(result) => result,
        Err(e) => {
            return miss(format!(
                "the stored entry is not a Bazel ActionResult ({e}); treated as a miss"
            ));
        }
    };
    match first_missing_blob(state, ns, &result).await {
        Ok(None) => {}
        Ok(Some(hash)) => {
            return miss(format!(
                "the action result refers to cas/{hash}, which is no longer stored; treated as a miss"
            ));
        }
        Err(e) => return api::tier_error(e),
    }
    let outcome = decide_read(conditions, Some(&got.meta.validators()));
    let body = match outcome.body_range(got.meta.size) {
        Some(range) if !head => {
            let part = bytes.slice(range.start as usize..(range.start + range.len) as usize);
            Some(futures_util::stream::once(async move { Ok(part) }).boxed())
        }
        _ => None,
    };
    api::respond(
        GetResponse {
            outcome,
            meta: got.meta,
            body,
            source: got.source,
            file: None,
        },
        // The caller logs the tier it was given.
        &mut RequestLog::default(),
    )
}

/// The first blob of `result` that is not stored with the size its digest says, if any. Each
/// lookup reads the blob's first byte, so the disk tier counts it as used.
async fn first_missing_blob(
    state: &State,
    ns: &Namespace,
    result: &reapi::ActionResult,
) -> Result<Option<String>, TierError> {
    let first_byte = ReadConditions::from_headers(None, None, None, None, None, Some("bytes=0-0"));
    let lookups = futures_util::stream::iter(referenced_blobs(result))
        .map(|(hash, size)| {
            let opts = GetOptions {
                conditions: first_byte.clone(),
                head: false,
            };
            async move {
                match state
                    .tier
                    .get(ns, &entry_key(Store::Cas, &hash), opts)
                    .await
                {
                    // The body (one byte) is not needed: dropping it ends the read.
                    Ok(got) if got.meta.size == size => Ok(None),
                    Ok(_) => Ok(Some(hash)),
                    Err(e) if e.kind == ErrorKind::NotFound => Ok(Some(hash)),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(BLOB_CHECKS_AT_ONCE);
    futures_util::pin_mut!(lookups);
    while let Some(found) = lookups.try_next().await? {
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::reapi::{ActionResult, Digest, OutputDirectory, OutputFile};
    use super::*;

    fn sha256_hex(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    fn digest_of(data: &[u8]) -> Digest {
        Digest {
            hash: sha256_hex(data),
            size_bytes: data.len() as i64,
        }
    }

    /// Feeds `chunks` to `check` as `io::checked` would.
    fn run(check: &mut dyn BodyCheck, chunks: &[&[u8]]) -> Result<(), Refusal> {
        for chunk in chunks {
            check.update(chunk)?;
        }
        check.finish()
    }

    #[test]
    fn the_sha256_check_accepts_the_body_its_key_names_however_it_is_cut() {
        let data = b"the bytes of an output file".as_slice();
        let key = sha256_hex(data);
        assert_eq!(run(&mut Sha256Check::new(&key), &[data]), Ok(()));
        assert_eq!(
            run(
                &mut Sha256Check::new(&key),
                &[&data[..3], &data[3..10], &[], &data[10..]]
            ),
            Ok(())
        );
        assert_eq!(key, sha256_hex(data), "the key is the SHA-256");
        assert_eq!(
            run(&mut Sha256Check::new(EMPTY_SHA256), &[]),
            Ok(()),
            "0 bytes"
        );
        assert_eq!(sha256_hex(b""), EMPTY_SHA256);
    }

    #[test]
    fn the_sha256_check_refuses_other_bytes_with_both_digests() {
        let key = sha256_hex(b"expected");
        for body in [&b"expected!"[..], b"expecte", b"", b"EXPECTED"] {
            let refusal = run(&mut Sha256Check::new(&key), &[body]).unwrap_err();
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
            assert!(
                refusal.reason.contains(&key) && refusal.reason.contains(&sha256_hex(body)),
                "{}",
                refusal.reason
            );
            assert!(!refusal.reason.contains('\n'));
        }
        assert!(run(&mut Sha256Check::new(EMPTY_SHA256), &[b"x"]).is_err());
    }

    fn result_with_output(data: &[u8]) -> ActionResult {
        ActionResult {
            output_files: vec![OutputFile {
                path: "bazel-out/k8-fastbuild/bin/out.txt".into(),
                digest: Some(digest_of(data)),
                ..OutputFile::default()
            }],
            stdout_digest: Some(digest_of(b"")),
            ..ActionResult::default()
        }
    }

    #[test]
    fn a_well_formed_action_result_is_accepted() {
        let bytes = result_with_output(b"out").encode_to_vec();
        let decoded = decode_action_result(&bytes).unwrap();
        assert_eq!(decoded, result_with_output(b"out"));
        let mut check = ActionResultCheck::new(1 << 20);
        assert_eq!(run(&mut check, &[&bytes[..5], &bytes[5..]]), Ok(()));
    }

    /// The tag numbers, checked against bytes written by hand from remote_execution.proto
    /// rather than by the structs under test: ActionResult.output_files = 2,
    /// output_directories = 3, exit_code = 4, stdout_digest = 6; OutputFile.path = 1,
    /// digest = 2, is_executable = 4; OutputDirectory.path = 1, tree_digest = 3;
    /// Digest.hash = 1, size_bytes = 2.
    #[test]
    fn tag_numbers_are_those_of_the_remote_execution_api() {
        fn field(tag: u8, payload: &[u8]) -> Vec<u8> {
            assert!(payload.len() < 128);
            let mut out = vec![tag << 3 | 2, payload.len() as u8];
            out.extend_from_slice(payload);
            out
        }
        let digest = |data: &[u8]| {
            let mut d = field(1, sha256_hex(data).as_bytes());
            d.extend_from_slice(&[2 << 3, data.len() as u8]); // size_bytes, varint
            d
        };
        let mut file = field(1, b"out/a.o");
        file.extend(field(2, &digest(b"object")));
        file.extend_from_slice(&[4 << 3, 1]); // is_executable = true
        let mut dir = field(1, b"out/dir");
        dir.extend(field(3, &digest(b"tree")));
        let mut bytes = field(2, &file);
        bytes.extend(field(3, &dir));
        bytes.extend_from_slice(&[4 << 3, 3]); // exit_code = 3
        bytes.extend(field(6, &digest(b"stdout")));
        let r = decode_action_result(&bytes).unwrap();
        assert_eq!(r.output_files[0].path, "out/a.o");
        assert_eq!(r.output_files[0].digest, Some(digest_of(b"object")));
        assert!(r.output_files[0].is_executable);
        assert_eq!(r.output_directories[0].path, "out/dir");
        assert_eq!(
            r.output_directories[0].tree_digest,
            Some(digest_of(b"tree"))
        );
        assert_eq!(r.exit_code, 3);
        assert_eq!(r.stdout_digest, Some(digest_of(b"stdout")));
    }

    #[test]
    fn garbage_and_malformed_action_results_are_refused_with_a_reason() {
        let good = result_with_output(b"out");
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not a protobuf at all, just text".to_vec(), ""),
            (vec![0xff; 64], ""),
            (Vec::new(), "no outputs"),
            // A message of unknown fields only decodes to an empty result.
            ([15 << 3, 0].to_vec(), "no outputs"),
        ];
        let mut with = |f: &dyn Fn(&mut ActionResult), expect: &'static str| {
            let mut r = good.clone();
            f(&mut r);
            cases.push((r.encode_to_vec(), expect));
        };
        with(&|r| r.output_files[0].digest = None, "has no digest");
        with(&|r| r.output_files[0].path.clear(), "no path");
        with(
            &|r| r.output_files[0].digest.as_mut().unwrap().hash = "ABC".repeat(21) + "D",
            "64 lowercase hex",
        );
        with(
            &|r| {
                let d = r.output_files[0].digest.as_mut().unwrap();
                d.hash = d.hash.to_uppercase();
            },
            "64 lowercase hex",
        );
        with(
            &|r| r.output_files[0].digest.as_mut().unwrap().size_bytes = -1,
            "size -1",
        );
        with(
            &|r| r.output_files[0].digest.as_mut().unwrap().size_bytes = 0,
            "size 0",
        );
        with(
            &|r| r.stdout_digest.as_mut().unwrap().size_bytes = 5,
            "stdout",
        );
        with(
            &|r| {
                r.output_directories.push(OutputDirectory {
                    path: "d".into(),
                    tree_digest: None,
                })
            },
            "no tree digest",
        );
        for (bytes, expect) in cases {
            let e = decode_action_result(&bytes).unwrap_err();
            assert!(e.contains(expect), "{e:?} should say {expect:?}");
            assert!(!e.contains('\n'));
            let refusal = run(&mut ActionResultCheck::new(1 << 20), &[&bytes]).unwrap_err();
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
            assert!(
                refusal.reason.starts_with("not a Bazel ActionResult: "),
                "{}",
                refusal.reason
            );
        }
    }

    #[test]
    fn an_action_result_over_the_limit_is_refused_as_soon_as_it_is() {
        let mut check = ActionResultCheck::new(10);
        assert_eq!(check.update(b"0123456"), Ok(()));
        let refusal = check.update(b"7890").unwrap_err();
        assert_eq!(refusal.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            refusal.reason.contains("at most 10 bytes"),
            "{}",
            refusal.reason
        );
    }

    #[test]
    fn referenced_blobs_are_listed_once_without_the_empty_one() {
        let mut r = result_with_output(b"same");
        r.output_files.push(OutputFile {
            path: "copy".into(),
            digest: Some(digest_of(b"same")),
            ..OutputFile::default()
        });
        r.output_directories.push(OutputDirectory {
            path: "dir".into(),
            tree_digest: Some(digest_of(b"tree")),
        });
        r.stderr_digest = Some(digest_of(b"warning"));
        let mut want = vec![
            (sha256_hex(b"same"), 4),
            (sha256_hex(b"tree"), 4),
            (sha256_hex(b"warning"), 7),
        ];
        want.sort();
        assert_eq!(referenced_blobs(&r), want, "stdout is the empty blob");
    }

    #[test]
    fn paths_name_a_namespace_a_store_and_a_sha256() {
        let hash = sha256_hex(b"x");
        let path = format!("ci/cas/{hash}");
        let (ns, store, h) = parse_path(&path).unwrap();
        assert_eq!((ns.as_str(), store, h), ("ci", Store::Cas, hash.as_str()));
        assert_eq!(parse_path(&format!("ci/ac/{hash}")).unwrap().1, Store::Ac);
        assert_eq!(label(&format!("ci/ac/{hash}")), "bazel_ac");
        assert_eq!(label(&format!("ci/cas/{hash}")), "bazel_cas");
        assert_eq!(label("ci/other"), "bazel");
        for (path, status) in [
            (
                format!("ci/cas/{}", hash.to_uppercase()),
                StatusCode::BAD_REQUEST,
            ),
            (format!("ci/cas/{}", &hash[1..]), StatusCode::BAD_REQUEST),
            (format!("ci/cas/{hash}0"), StatusCode::BAD_REQUEST),
            (format!("ci/cas/{hash}/x"), StatusCode::BAD_REQUEST),
            ("ci/cas/".to_string(), StatusCode::BAD_REQUEST),
            (format!("Bad_NS/ac/{hash}"), StatusCode::BAD_REQUEST),
            (format!("ci/blobs/{hash}"), StatusCode::NOT_FOUND),
            ("ci".to_string(), StatusCode::NOT_FOUND),
        ] {
            let (got, reason) = parse_path(&path).unwrap_err();
            assert_eq!(got, status, "{path}: {reason}");
            assert!(!reason.is_empty() && !reason.contains('\n'));
        }
        assert_eq!(entry_key(Store::Cas, &hash).as_str(), format!("cas/{hash}"));
    }
}
