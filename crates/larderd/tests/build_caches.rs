//! Build tools' remote caches against the real larderd, driven by the real clients (issue 14):
//! each test stores with one build, then builds again from a clean local cache and checks that
//! the tool reports remote hits and produces identical outputs.
//!
//! ccache (4.7, Debian) speaks HTTP remote storage with its default `subdirs` layout
//! (`GET/PUT/HEAD {url}/{2 hex}/{rest of the key}`), and Gradle (4.4, Debian) its HTTP build
//! cache (`GET/PUT {url}/{cache key}`): both are the generic object route as it is; Gradle
//! authenticates with HTTP Basic, the token as the password.
//!
//! Bazel (2.1.0, the npm package's binary, named by `LARDER_BAZEL`) and ccache's `layout=bazel`
//! speak the Bazel HTTP cache protocol on `/bazel/{ns}` (`GET/PUT {url}/ac/{sha256}`,
//! `{url}/cas/{sha256}`), where larderd checks what is stored: those checks are tested here
//! over HTTP too, on disk and through S3.

use larder_testkit::bazel::{self as pb, EMPTY_SHA256, sha256_hex};
use larder_testkit::{Larderd, metric, s3};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The program on PATH, or `None` with a SKIPPED line (a failure under CI, which installs it).
fn tool(test: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: {name} is not installed (scripts/test.sh installs it from Debian)"
        );
        println!("SKIPPED {test}: {name} is not installed (scripts/test.sh installs it)");
    }
    found
}

/// `ccache --print-stats` of one cache directory, as `name value` pairs.
fn ccache_stats(ccache: &Path, cache_dir: &Path) -> std::collections::HashMap<String, u64> {
    let out = Command::new(ccache)
        .arg("--print-stats")
        .env("CCACHE_DIR", cache_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once('\t')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// A C source file and its header in `work/src`, for ccache to compile.
fn ccache_sources(work: &Path) -> PathBuf {
    let src = work.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(
        src.join("greeting.h"),
        "#define GREETING \"hello from larder\"\n",
    )
    .unwrap();
    std::fs::write(
        src.join("main.c"),
        "#include <stdio.h>\n#include \"greeting.h\"\nint main(void) { puts(GREETING); return 0; }\n",
    )
    .unwrap();
    src
}

/// `ccache gcc -c main.c -o {output}` in `work/src` with the local cache `work/{cache}` and the
/// remote storage `remote`; returns that cache's statistics.
fn ccache_build(
    ccache: &Path,
    work: &Path,
    remote: &str,
    cache: &str,
    output: &str,
) -> std::collections::HashMap<String, u64> {
    let cache_dir = work.join(cache);
    let out = Command::new(ccache)
        .args(["gcc", "-O2", "-c", "main.c", "-o", output])
        .current_dir(work.join("src"))
        .env("CCACHE_DIR", &cache_dir)
        .env("CCACHE_REMOTE_STORAGE", remote)
        // Paths differ between the two builds of a CI fleet; the key must not depend on them.
        .env("CCACHE_BASEDIR", work)
        .env_remove("CCACHE_DISABLE")
        .env_remove("CCACHE_REMOTE_ONLY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ccache_stats(ccache, &cache_dir)
}

/// Runs `build` (a tool's build that only reads from larder) and asserts that no connection
/// left larderd's fast path meanwhile (`larder_fast_path_handovers_total`): every request the
/// tool sent was one the fast path answers. The scrapes share one connection, which is with
/// hyper after the first and adds nothing.
fn stays_on_the_fast_path<T>(srv: &Larderd, tool: &str, build: impl FnOnce() -> T) -> T {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let handovers = || {
        let metrics = runtime.block_on(srv.scrape(&http));
        metric(&metrics, "larder_fast_path_handovers_total").unwrap_or(0.0)
    };
    let before = handovers();
    let built = build();
    assert_eq!(
        handovers() - before,
        0.0,
        "{tool}'s reads stayed on the fast path"
    );
    built
}

#[test]
fn ccache_gets_remote_hits_from_larder_and_identical_objects() {
    let name = "ccache_gets_remote_hits_from_larder_and_identical_objects";
    let (Some(ccache), Some(_)) = (tool(name, "ccache"), tool(name, "gcc")) else {
        return;
    };
    let srv = Larderd::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let src = ccache_sources(work.path());
    let remote = format!("{}/api/v1/object/ccache", srv.url());
    let build =
        |cache: &str, output: &str| ccache_build(&ccache, work.path(), &remote, cache, output);

    let first = build("cache-a", "first.o");
    assert_eq!(
        first.get("remote_storage_hit").copied().unwrap_or(0),
        0,
        "{first:?}"
    );
    assert!(
        first.get("remote_storage_write").copied().unwrap_or(0) >= 1,
        "stored in larder: {first:?}"
    );
    // Another machine: an empty local cache, the same remote.
    let second = stays_on_the_fast_path(&srv, "ccache", || build("cache-b", "second.o"));
    assert!(
        second.get("remote_storage_hit").copied().unwrap_or(0) >= 1,
        "a remote hit from larder: {second:?}"
    );
    assert_eq!(
        second.get("cache_miss").copied().unwrap_or(0),
        0,
        "{second:?}"
    );
    assert_eq!(
        std::fs::read(src.join("first.o")).unwrap(),
        std::fs::read(src.join("second.o")).unwrap(),
        "the object file from the cache is the one the compiler made"
    );
    // What ccache stored is in the namespace, as ordinary objects.
    let url = format!("{}/api/v1/namespaces", srv.url());
    let list = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() });
    assert!(list.contains("\"ccache\""), "{list}");
    assert_eq!(
        second.get("remote_storage_error").copied().unwrap_or(0),
        0,
        "{second:?}"
    );
}

/// A one-class Java project whose `settings.gradle` points Gradle's HTTP build cache at `url`
/// with `password` (the larder token) for HTTP Basic, local cache off.
fn gradle_project(dir: &Path, url: &str, password: &str) {
    std::fs::create_dir_all(dir.join("src/main/java")).unwrap();
    std::fs::write(
        dir.join("settings.gradle"),
        format!(
            "rootProject.name = 'hello'\n\
             buildCache {{\n\
               local(DirectoryBuildCache) {{ enabled = false }}\n\
               remote(HttpBuildCache) {{\n\
                 url = '{url}'\n\
                 push = true\n\
                 credentials {{ username = 'gradle'; password = '{password}' }}\n\
               }}\n\
             }}\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("build.gradle"), "apply plugin: 'java'\n").unwrap();
    std::fs::write(
        dir.join("src/main/java/Hello.java"),
        "public class Hello { public static void main(String[] a) { System.out.println(\"hello from larder\"); } }\n",
    )
    .unwrap();
}

/// Runs `gradle compileJava` with the build cache in `dir`, with its own Gradle home; returns
/// the plain console output.
fn gradle_compile(gradle: &Path, dir: &Path) -> String {
    let out = Command::new(gradle)
        .args([
            "--no-daemon",
            "--build-cache",
            "--console=plain",
            "compileJava",
        ])
        .current_dir(dir)
        .env("GRADLE_USER_HOME", dir.join(".gradle-home"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "gradle failed:\n{text}");
    text
}

#[test]
fn gradle_takes_its_outputs_from_larder_with_the_token_as_basic_password() {
    let name = "gradle_takes_its_outputs_from_larder_with_the_token_as_basic_password";
    let Some(gradle) = tool(name, "gradle") else {
        return;
    };
    const WRITER: &str = "gradle-writer-5b1e77";
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("larder.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[tokens]]\nname = \"gradle\"\nsha256 = \"{}\"\nscopes = [\"read\", \"write\"]\nnamespaces = [\"gradle\"]\n",
            larder_testkit::token_sha256(WRITER)
        ),
    )
    .unwrap();
    let srv = Larderd::start(&["--config", cfg.to_str().unwrap()]);
    let url = format!("{}/api/v1/object/gradle/", srv.url());
    let class = "build/classes/java/main/Hello.class";

    let first = work.path().join("first");
    gradle_project(&first, &url, WRITER);
    let out = gradle_compile(&gradle, &first);
    assert!(!out.contains("FROM-CACHE"), "{out}");
    // Another checkout, another Gradle home: the compiled class comes from larder.
    let second = work.path().join("second");
    gradle_project(&second, &url, WRITER);
    // Gradle sends its credentials only after a 401; both are answered on the fast path.
    let out = stays_on_the_fast_path(&srv, "Gradle", || gradle_compile(&gradle, &second));
    assert!(out.contains(":compileJava FROM-CACHE"), "{out}");
    assert_eq!(
        std::fs::read(first.join(class)).unwrap(),
        std::fs::read(second.join(class)).unwrap()
    );
    // A wrong token is refused: the build compiles itself, never gets a foreign output.
    let third = work.path().join("third");
    gradle_project(&third, &url, "not-a-token");
    let out = gradle_compile(&gradle, &third);
    assert!(!out.contains("FROM-CACHE"), "{out}");
    assert_eq!(
        std::fs::read(first.join(class)).unwrap(),
        std::fs::read(third.join(class)).unwrap()
    );
}

// ---- Bazel HTTP remote cache (`/bazel/{ns}`) ----

/// A PUT of `body` to `url`, sent in 64 KiB chunks without a Content-Length (as a stream, so
/// that a check can only decide at its end); status and the answer's text.
async fn put_streamed(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> (reqwest::StatusCode, String) {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    let r = http
        .put(url)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn put(http: &reqwest::Client, url: &str, body: &[u8]) -> (reqwest::StatusCode, String) {
    let r = http.put(url).body(body.to_vec()).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn fetch(http: &reqwest::Client, url: &str) -> (reqwest::StatusCode, Vec<u8>) {
    let r = http.get(url).send().await.unwrap();
    (r.status(), r.bytes().await.unwrap().to_vec())
}

/// A CAS upload whose bytes are not its key is refused by `servers[0]`, and nothing of it can be
/// read from any of `servers`: not as a new key, not in place of the revision already there.
async fn cas_mismatches_store_nothing(servers: &[Larderd]) {
    let http = reqwest::Client::new();
    let good = larder_testkit::pattern(3 << 20, 7);
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1; // differs only in its last byte: decided at the very end
    let key = sha256_hex(&good);
    let url = |i: usize, hash: &str| format!("{}/bazel/ci/cas/{hash}", servers[i].url());

    let (status, reason) = put_streamed(&http, &url(0, &key), bad.clone()).await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{reason}");
    assert!(
        reason.contains(&key) && reason.contains(&sha256_hex(&bad)),
        "the reason names both digests: {reason}"
    );
    assert_eq!(reason.trim_end().lines().count(), 1, "{reason}");
    for i in 0..servers.len() {
        assert_eq!(
            fetch(&http, &url(i, &key)).await.0,
            reqwest::StatusCode::NOT_FOUND,
            "server {i}: nothing was stored"
        );
    }

    // Nor through the object route, which stores the same key (nothing on the read side could
    // tell the blob is not the one its digest names).
    let object_url = servers[0].object_url("ci", &format!("cas/{key}"));
    let (status, reason) = put_streamed(&http, &object_url, bad.clone()).await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{reason}");
    assert!(reason.contains(&sha256_hex(&bad)), "{reason}");
    for i in 0..servers.len() {
        assert_eq!(
            fetch(&http, &url(i, &key)).await.0,
            reqwest::StatusCode::NOT_FOUND,
            "server {i}: nothing was stored through the object route"
        );
    }

    let (status, reason) = put_streamed(&http, &url(0, &key), good.clone()).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{reason}");
    let (status, _) = put_streamed(&http, &url(0, &key), bad.clone()).await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST);
    let (status, _) = put(&http, &url(0, &key), b"short").await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST);
    let (status, _) = put(&http, &object_url, b"short").await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST);
    // Keys that only look like CAS keys are ordinary objects.
    let (status, reason) = put(&http, &servers[0].object_url("ci", "cas/x"), b"any").await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{reason}");
    for i in 0..servers.len() {
        let (status, body) = fetch(&http, &url(i, &key)).await;
        assert_eq!(status, reqwest::StatusCode::OK, "server {i}");
        assert!(body == good, "server {i}: the stored revision is unchanged");
    }

    // The empty blob is a blob like any other.
    let (status, reason) = put(&http, &url(0, EMPTY_SHA256), b"").await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{reason}");
    let (status, _) = put(&http, &url(0, EMPTY_SHA256), b"not empty").await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST);
    for i in 0..servers.len() {
        let (status, body) = fetch(&http, &url(i, EMPTY_SHA256)).await;
        assert_eq!(
            (status, body.len()),
            (reqwest::StatusCode::OK, 0),
            "server {i}"
        );
    }
}

#[tokio::test]
async fn a_bazel_cas_upload_whose_sha256_is_not_its_key_stores_nothing_on_disk() {
    cas_mismatches_store_nothing(&[Larderd::start(&[])]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bazel_cas_upload_whose_sha256_is_not_its_key_stores_nothing_through_s3() {
    if !s3::available("a_bazel_cas_upload_whose_sha256_is_not_its_key_stores_nothing_through_s3") {
        return;
    }
    // The second replica has its own empty disk: what it serves comes from the bucket.
    let prefix = s3::unique_prefix("bazel-cas");
    let args = s3::replica_args(&prefix);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cas_mismatches_store_nothing(&[Larderd::start(&args), Larderd::start(&args)]).await;
}

#[tokio::test]
async fn bazel_action_results_are_checked_unless_their_namespace_is_unchecked() {
    let srv = Larderd::start(&[
        "--bazel-unchecked-namespace",
        "ccache*",
        "--bazel-max-action-result-size",
        "4KiB",
    ]);
    let http = reqwest::Client::new();
    let ac = |ns: &str, key: &str| format!("{}/bazel/{ns}/ac/{key}", srv.url());
    let key = sha256_hex(b"an action");
    let garbage = b"cCrS\x00\x01 not an action result at all".to_vec();
    let big = {
        let outputs: Vec<(String, Vec<u8>)> = (0..100)
            .map(|i| {
                (
                    format!("bazel-out/k8-fastbuild/bin/file-{i}.o"),
                    vec![i as u8],
                )
            })
            .collect();
        let refs: Vec<(&str, &[u8])> = outputs
            .iter()
            .map(|(p, d)| (p.as_str(), d.as_slice()))
            .collect();
        pb::action_result(&refs, b"")
    };
    assert!(big.len() > 4096);

    for (body, status, reason) in [
        (garbage.clone(), 400, "not a Bazel ActionResult"),
        (Vec::new(), 400, "no outputs"),
        (big.clone(), 413, "4096"),
    ] {
        let (got, text) = put(&http, &ac("bazel-ci", &key), &body).await;
        assert_eq!(got.as_u16(), status, "{text}");
        assert!(text.contains(reason), "{text}");
        let (got, text) = put_streamed(&http, &ac("bazel-ci", &key), body).await;
        assert_eq!(got.as_u16(), status, "streamed: {text}");
        assert_eq!(
            fetch(&http, &ac("bazel-ci", &key)).await.0,
            reqwest::StatusCode::NOT_FOUND,
            "a refused action result is not stored"
        );
    }
    // The same bytes stored through the object route are not served as an action result.
    let r = http
        .put(srv.object_url("bazel-ci", &format!("ac/{key}")))
        .body(garbage.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let (status, text) = fetch(&http, &ac("bazel-ci", &key)).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&text).contains("treated as a miss"));

    // In an unchecked namespace the action cache takes any bytes, of any size.
    for body in [garbage, big] {
        let (status, text) = put(&http, &ac("ccache-linux", &key), &body).await;
        assert!(status.is_success(), "{text}");
        assert_eq!(
            fetch(&http, &ac("ccache-linux", &key)).await,
            (reqwest::StatusCode::OK, body)
        );
    }
    // Keys are SHA-256 digests in lower case, in both stores and every namespace.
    for path in [
        format!("ccache-linux/ac/{}", key.to_uppercase()),
        format!("bazel-ci/cas/{}", &key[..63]),
        "bazel-ci/cas/x".to_string(),
    ] {
        let (status, text) = put(&http, &format!("{}/bazel/{path}", srv.url()), b"x").await;
        assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{path}: {text}");
        assert!(text.contains("64 lowercase hex"), "{text}");
    }
}

#[tokio::test]
async fn a_bazel_action_result_is_a_miss_once_a_blob_it_refers_to_is_gone() {
    let srv = Larderd::start(&[]);
    let http = reqwest::Client::new();
    let cas = |data: &[u8]| format!("{}/bazel/ci/cas/{}", srv.url(), sha256_hex(data));
    let (output, stdout) = (b"the output file".as_slice(), b"compiling\n".as_slice());
    for blob in [output, stdout] {
        assert_eq!(
            put(&http, &cas(blob), blob).await.0,
            reqwest::StatusCode::CREATED
        );
    }
    let result = pb::action_result(&[("bazel-out/bin/out.txt", output)], stdout);
    let ac = format!("{}/bazel/ci/ac/{}", srv.url(), sha256_hex(b"the action"));
    assert_eq!(
        put(&http, &ac, &result).await.0,
        reqwest::StatusCode::CREATED
    );
    assert_eq!(
        fetch(&http, &ac).await,
        (reqwest::StatusCode::OK, result.clone())
    );
    let head = |url: String| {
        let http = http.clone();
        async move { http.head(url).send().await.unwrap().status() }
    };
    assert_eq!(head(ac.clone()).await, reqwest::StatusCode::OK);

    // The output's blob goes (deleted here; expired or evicted alike).
    let r = http
        .delete(srv.object_url("ci", &format!("cas/{}", sha256_hex(output))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NO_CONTENT);
    let (status, text) = fetch(&http, &ac).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains(&format!("cas/{}", sha256_hex(output))),
        "{text}"
    );
    assert_eq!(head(ac.clone()).await, reqwest::StatusCode::NOT_FOUND);
    // So does stdout's, once the output is back: any blob counts.
    assert_eq!(
        put(&http, &cas(output), output).await.0,
        reqwest::StatusCode::CREATED
    );
    assert_eq!(fetch(&http, &ac).await.0, reqwest::StatusCode::OK);
    http.delete(srv.object_url("ci", &format!("cas/{}", sha256_hex(stdout))))
        .send()
        .await
        .unwrap();
    assert_eq!(fetch(&http, &ac).await.0, reqwest::StatusCode::NOT_FOUND);
    // The entry itself was kept: with its blobs back it is a hit again.
    assert_eq!(
        put(&http, &cas(stdout), stdout).await.0,
        reqwest::StatusCode::CREATED
    );
    assert_eq!(fetch(&http, &ac).await, (reqwest::StatusCode::OK, result));
}

#[tokio::test]
async fn reading_a_bazel_action_result_keeps_its_blobs_from_eviction() {
    // Room for two 256 KiB blobs and an action result, not three: the third blob evicts the
    // least recently read entry.
    let srv = Larderd::start(&["--disk-limit", "600KiB"]);
    let http = reqwest::Client::new();
    let cas = |data: &[u8]| format!("{}/bazel/ci/cas/{}", srv.url(), sha256_hex(data));
    let blob = |seed| larder_testkit::pattern(256 << 10, seed);
    let (used, unused, filler) = (blob(1), blob(2), blob(3));
    // Written first, so without a refresh the used blob would be the first to go.
    for b in [&used, &unused] {
        assert_eq!(put(&http, &cas(b), b).await.0, reqwest::StatusCode::CREATED);
    }
    let result = pb::action_result(&[("bazel-out/bin/used", used.as_slice())], b"");
    let ac = format!("{}/bazel/ci/ac/{}", srv.url(), sha256_hex(b"an action"));
    assert_eq!(
        put(&http, &ac, &result).await.0,
        reqwest::StatusCode::CREATED
    );
    assert_eq!(fetch(&http, &ac).await.0, reqwest::StatusCode::OK);

    assert_eq!(
        put(&http, &cas(&filler), &filler).await.0,
        reqwest::StatusCode::CREATED
    );
    let metrics = srv.scrape(&http).await;
    assert_eq!(
        metric(&metrics, "larder_disk_evictions_total"),
        Some(1.0),
        "one blob had to go"
    );
    assert_eq!(
        fetch(&http, &cas(&unused)).await.0,
        reqwest::StatusCode::NOT_FOUND,
        "the blob nobody read was evicted"
    );
    assert_eq!(
        fetch(&http, &cas(&used)).await,
        (reqwest::StatusCode::OK, used)
    );
    assert_eq!(fetch(&http, &ac).await, (reqwest::StatusCode::OK, result));
}

/// Bazel 2.1.0 from `LARDER_BAZEL` (`scripts/install-npm-tools.sh`), or `None` with a SKIPPED
/// line (a failure under CI, where scripts/test.sh installs it).
fn bazel_binary(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("LARDER_BAZEL")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: LARDER_BAZEL does not name the Bazel binary (scripts/test.sh sets it)"
        );
        println!(
            "SKIPPED {test}: LARDER_BAZEL is not set (eval \"$(scripts/install-npm-tools.sh)\" sets it)"
        );
    }
    found
}

/// One Bazel JVM at a time: each takes a core and half a GiB while it analyses.
static BAZEL_RUNS: Mutex<()> = Mutex::new(());

/// A Bazel workspace in `dir/ws` with its own output root and home under `dir`: three genrules
/// (`b` from `a`, a generated header) and a `cc_binary` linking a `cc_library`, built with the
/// local gcc. Bazel's server is shut down when this is dropped.
///
/// Offline: Bazel 2.1's default WORKSPACE declares `rules_cc` and `rules_java` as
/// `http_archive`s (the local C++ toolchain and the registered Java toolchains load them), so
/// the workspace points both at local stubs that forward to the native rules.
struct BazelWorkspace {
    bazel: PathBuf,
    dir: PathBuf,
}

impl BazelWorkspace {
    fn new(bazel: PathBuf, dir: &Path) -> BazelWorkspace {
        let ws = dir.join("ws");
        let files: &[(&str, &str)] = &[
            (
                "WORKSPACE",
                "local_repository(name = \"rules_cc\", path = \"stubs/rules_cc\")\n\
                 local_repository(name = \"rules_java\", path = \"stubs/rules_java\")\n",
            ),
            ("stubs/rules_cc/WORKSPACE", ""),
            ("stubs/rules_cc/cc/BUILD", ""),
            (
                "stubs/rules_cc/cc/defs.bzl",
                r#"def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)
"#,
            ),
            ("stubs/rules_java/WORKSPACE", ""),
            ("stubs/rules_java/java/BUILD", ""),
            (
                "stubs/rules_java/java/defs.bzl",
                r#"def java_binary(**kwargs):
    native.java_binary(**kwargs)

def java_import(**kwargs):
    native.java_import(**kwargs)

def java_library(**kwargs):
    native.java_library(**kwargs)

def java_runtime(**kwargs):
    native.java_runtime(**kwargs)

def java_toolchain(**kwargs):
    native.java_toolchain(**kwargs)
"#,
            ),
            (
                "BUILD",
                r#"genrule(
    name = "a",
    outs = ["a.txt"],
    cmd = "echo alpha > $@",
)

genrule(
    name = "b",
    srcs = [":a"],
    outs = ["b.txt"],
    cmd = "cat $(location :a) > $@ && echo beta >> $@",
)

genrule(
    name = "greeting_h",
    outs = ["greeting.h"],
    cmd = "echo '#define GREETING \"hello from larder\"' > $@",
)

cc_library(
    name = "greet",
    srcs = ["greet.c"],
    hdrs = ["greet.h", ":greeting_h"],
)

cc_binary(
    name = "hello",
    srcs = ["main.c"],
    deps = [":greet"],
)
"#,
            ),
            ("greet.h", "void greet(void);\n"),
            (
                "greet.c",
                "#include <stdio.h>\n#include \"greet.h\"\n#include \"greeting.h\"\n\
                 void greet(void) { puts(GREETING); }\n",
            ),
            (
                "main.c",
                "#include \"greet.h\"\nint main(void) { greet(); return 0; }\n",
            ),
        ];
        for (path, text) in files {
            let path = ws.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        std::fs::create_dir_all(dir.join("home")).unwrap();
        BazelWorkspace {
            bazel,
            dir: dir.to_path_buf(),
        }
    }

    /// `bazel COMMAND ARGS…` in the workspace; its output (stderr, where Bazel reports) after
    /// it succeeded.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bazel)
            .arg(format!(
                "--output_user_root={}",
                self.dir.join("root").display()
            ))
            // A backstop: the server also goes when this is dropped.
            .args(["--max_idle_secs=10", "--nohome_rc", "--nosystem_rc"])
            .args(args)
            .current_dir(self.dir.join("ws"))
            .env("HOME", self.dir.join("home"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "bazel {args:?} failed:\n{text}");
        text
    }

    /// `bazel build //:hello` with larder as the remote cache (`remote`: `http://…/bazel/NS`) and
    /// a bearer token; returns (processes, remote cache hits) from Bazel's summary.
    fn build(&self, remote: &str, token: &str) -> (u32, u32) {
        let out = self.run(&[
            "build",
            "--color=no",
            "--curses=no",
            &format!("--remote_cache={remote}"),
            &format!("--remote_header=Authorization=Bearer {token}"),
            "//:hello",
            "//:b",
        ]);
        processes(&out).unwrap_or_else(|| panic!("no process summary in:\n{out}"))
    }

    /// A clean checkout on another machine: no local output, no local action cache.
    fn expunge(&self) {
        self.run(&["clean", "--expunge"]);
    }

    /// The build's outputs that the test compares: the genrules' files and the binary.
    fn outputs(&self) -> Vec<(String, Vec<u8>)> {
        ["a.txt", "b.txt", "greeting.h", "hello"]
            .iter()
            .map(|name| {
                let path = self.dir.join("ws/bazel-bin").join(name);
                (name.to_string(), std::fs::read(&path).unwrap())
            })
            .collect()
    }

    fn run_hello(&self) -> String {
        let out = Command::new(self.dir.join("ws/bazel-bin/hello"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for BazelWorkspace {
    fn drop(&mut self) {
        let _ = Command::new(&self.bazel)
            .arg(format!(
                "--output_user_root={}",
                self.dir.join("root").display()
            ))
            .args(["--nohome_rc", "--nosystem_rc", "shutdown"])
            .current_dir(self.dir.join("ws"))
            .env("HOME", self.dir.join("home"))
            .output();
    }
}

/// (processes, remote cache hits) from Bazel's last "INFO: N processes: …" line, e.g.
/// "INFO: 7 processes: 5 remote cache hit, 2 linux-sandbox."
fn processes(output: &str) -> Option<(u32, u32)> {
    let line = output.lines().rev().find(|l| l.contains(" processes"))?;
    let (total, kinds) = line.trim_start_matches("INFO: ").split_once(" processes")?;
    let hits = kinds
        .trim_start_matches(':')
        .trim_end_matches('.')
        .split(',')
        .filter_map(|kind| kind.trim().strip_suffix(" remote cache hit"))
        .filter_map(|n| n.parse::<u32>().ok())
        .sum();
    Some((total.trim().parse().ok()?, hits))
}

#[test]
fn bazel_processes_are_parsed_from_its_summary() {
    assert_eq!(
        processes(
            "x\nINFO: 7 processes: 5 remote cache hit, 2 linux-sandbox.\nINFO: Build completed"
        ),
        Some((7, 5))
    );
    assert_eq!(
        processes("INFO: 3 processes: 3 remote cache hit."),
        Some((3, 3))
    );
    assert_eq!(
        processes("INFO: 4 processes: 4 linux-sandbox."),
        Some((4, 0))
    );
    assert_eq!(processes("INFO: 0 processes."), Some((0, 0)));
}

/// A larderd whose only token (`TOKEN`, read and write) covers the `bazel-*` namespaces.
fn bazel_larderd(work: &Path, token: &str) -> Larderd {
    let cfg = work.join("larder.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[tokens]]\nname = \"bazel\"\nsha256 = \"{}\"\nscopes = [\"read\", \"write\"]\nnamespaces = [\"bazel-*\"]\n",
            larder_testkit::token_sha256(token)
        ),
    )
    .unwrap();
    Larderd::start(&["--config", cfg.to_str().unwrap()])
}

#[test]
fn bazel_gets_remote_cache_hits_from_a_token_protected_larder_and_identical_outputs() {
    let name = "bazel_gets_remote_cache_hits_from_a_token_protected_larder_and_identical_outputs";
    let (Some(bazel), Some(_)) = (bazel_binary(name), tool(name, "gcc")) else {
        return;
    };
    let _one_at_a_time = BAZEL_RUNS.lock().unwrap_or_else(|e| e.into_inner());
    const TOKEN: &str = "bazel-token-0c41f2";
    let work = tempfile::tempdir().unwrap();
    let srv = bazel_larderd(work.path(), TOKEN);
    let remote = format!("{}/bazel/bazel-ci", srv.url());
    let ws = BazelWorkspace::new(bazel, work.path());

    let (total, hits) = ws.build(&remote, TOKEN);
    assert_eq!(hits, 0, "an empty cache");
    assert!(total >= 5, "genrules, compiles and a link ran: {total}");
    let first = ws.outputs();
    ws.expunge();
    // A build served from the cache only reads: action results (their blobs checked) and blobs.
    let (again, hits) = stays_on_the_fast_path(&srv, "Bazel", || ws.build(&remote, TOKEN));
    assert_eq!(
        (again, hits),
        (total, total),
        "every process is a remote cache hit"
    );
    assert!(
        ws.outputs() == first,
        "the outputs from larder are those built"
    );
    assert_eq!(ws.run_hello(), "hello from larder\n");

    // Without the token the cache refuses and Bazel builds everything itself.
    ws.expunge();
    let (again, hits) = ws.build(&remote, "not-the-token");
    assert_eq!((again, hits), (total, 0));
    assert!(ws.outputs() == first);
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(srv.scrape(&reqwest::Client::new()));
    assert!(
        metric(
            &metrics,
            "larder_http_requests_total{route=\"bazel_ac\",method=\"GET\",status=\"401\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the refusals were the token's"
    );
}

#[test]
fn bazel_runs_an_action_again_when_a_blob_its_cached_result_needs_is_gone() {
    let name = "bazel_runs_an_action_again_when_a_blob_its_cached_result_needs_is_gone";
    let (Some(bazel), Some(_)) = (bazel_binary(name), tool(name, "gcc")) else {
        return;
    };
    let _one_at_a_time = BAZEL_RUNS.lock().unwrap_or_else(|e| e.into_inner());
    const TOKEN: &str = "bazel-token-7d2e90";
    let work = tempfile::tempdir().unwrap();
    let srv = bazel_larderd(work.path(), TOKEN);
    let remote = format!("{}/bazel/bazel-ci", srv.url());
    let ws = BazelWorkspace::new(bazel, work.path());
    let (total, _) = ws.build(&remote, TOKEN);
    let first = ws.outputs();

    // The blob of genrule a's output goes behind Bazel's back; its action result stays.
    let a_txt = &first.iter().find(|(n, _)| n == "a.txt").unwrap().1;
    let blob = format!("cas/{}", sha256_hex(a_txt));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let status = rt.block_on(async {
        http.delete(srv.object_url("bazel-ci", &blob))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT);
    let before = rt.block_on(srv.scrape(&http));
    let count = |metrics: &str, series: &str| metric(metrics, series).unwrap_or(0.0);
    const AC_MISS: &str =
        "larder_http_requests_total{route=\"bazel_ac\",method=\"GET\",status=\"404\"}";
    const CAS_MISS: &str =
        "larder_http_requests_total{route=\"bazel_cas\",method=\"GET\",status=\"404\"}";

    ws.expunge();
    let (again, hits) = ws.build(&remote, TOKEN);
    assert_eq!(
        (again, hits),
        (total, total - 1),
        "genrule a ran again, everything else (b too: same input bytes) came from larder"
    );
    assert!(ws.outputs() == first, "and the outputs are the same");
    let after = rt.block_on(srv.scrape(&http));
    assert_eq!(
        count(&after, AC_MISS) - count(&before, AC_MISS),
        1.0,
        "larder answered a's action result with a miss"
    );
    assert_eq!(
        count(&after, CAS_MISS),
        count(&before, CAS_MISS),
        "so Bazel never asked for the missing blob"
    );
    // Running a again stored its output again.
    let (status, body) = rt.block_on(async {
        let r = http
            .get(format!("{}/bazel/bazel-ci/{blob}", srv.url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (r.status(), r.bytes().await.unwrap().to_vec())
    });
    assert_eq!((status, &body), (reqwest::StatusCode::OK, a_txt));
}

#[test]
fn ccache_with_the_bazel_layout_gets_remote_hits_only_where_action_results_are_unchecked() {
    let name =
        "ccache_with_the_bazel_layout_gets_remote_hits_only_where_action_results_are_unchecked";
    let (Some(ccache), Some(_)) = (tool(name, "ccache"), tool(name, "gcc")) else {
        return;
    };
    let srv = Larderd::start(&["--bazel-unchecked-namespace", "ccache*"]);
    let work = tempfile::tempdir().unwrap();
    let src = ccache_sources(work.path());
    let remote = |ns: &str| format!("{}/bazel/{ns}|layout=bazel", srv.url());

    let first = ccache_build(
        &ccache,
        work.path(),
        &remote("ccache"),
        "cache-a",
        "first.o",
    );
    assert!(
        first.get("remote_storage_write").copied().unwrap_or(0) >= 1,
        "stored in larder: {first:?}"
    );
    let second = ccache_build(
        &ccache,
        work.path(),
        &remote("ccache"),
        "cache-b",
        "second.o",
    );
    assert!(
        second.get("remote_storage_hit").copied().unwrap_or(0) >= 1,
        "a remote hit from larder: {second:?}"
    );
    assert_eq!(
        second.get("cache_miss").copied().unwrap_or(0),
        0,
        "{second:?}"
    );
    assert_eq!(
        std::fs::read(src.join("first.o")).unwrap(),
        std::fs::read(src.join("second.o")).unwrap()
    );

    // Where action results are checked, ccache's entries are not ActionResults: refused.
    let third = ccache_build(
        &ccache,
        work.path(),
        &remote("bazel-ci"),
        "cache-c",
        "third.o",
    );
    let fourth = ccache_build(
        &ccache,
        work.path(),
        &remote("bazel-ci"),
        "cache-d",
        "fourth.o",
    );
    assert_eq!(
        (
            third.get("remote_storage_hit").copied().unwrap_or(0),
            fourth.get("remote_storage_hit").copied().unwrap_or(0)
        ),
        (0, 0),
        "{third:?} {fourth:?}"
    );
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(srv.scrape(&reqwest::Client::new()));
    let refused = metric(
        &metrics,
        "larder_http_requests_total{route=\"bazel_ac\",method=\"PUT\",status=\"400\"}",
    );
    assert!(
        refused.unwrap_or(0.0) >= 1.0,
        "ccache's uploads were refused: {refused:?}"
    );
    assert_eq!(
        std::fs::read(src.join("first.o")).unwrap(),
        std::fs::read(src.join("fourth.o")).unwrap()
    );
}
