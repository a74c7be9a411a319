//! Build tools' remote caches against the real larderd, driven by the real clients (issue 14):
//! each test stores with one build, then builds again from a clean local cache and checks that
//! the tool reports remote hits and produces identical outputs.
//!
//! ccache (4.7, Debian) speaks HTTP remote storage with its default `subdirs` layout
//! (`GET/PUT/HEAD {url}/{2 hex}/{rest of the key}`), and Gradle (4.4, Debian) its HTTP build
//! cache (`GET/PUT {url}/{cache key}`): both are the generic object route as it is; Gradle
//! authenticates with HTTP Basic, the token as the password.

use larder_testkit::Larderd;
use std::path::{Path, PathBuf};
use std::process::Command;

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

#[test]
fn ccache_gets_remote_hits_from_larder_and_identical_objects() {
    let name = "ccache_gets_remote_hits_from_larder_and_identical_objects";
    let (Some(ccache), Some(_)) = (tool(name, "ccache"), tool(name, "gcc")) else {
        return;
    };
    let srv = Larderd::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
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
    let remote = format!("{}/api/v1/object/ccache", srv.url());
    let build = |cache: &str, output: &str| {
        let cache_dir = work.path().join(cache);
        let out = Command::new(&ccache)
            .args(["gcc", "-O2", "-c", "main.c", "-o", output])
            .current_dir(&src)
            .env("CCACHE_DIR", &cache_dir)
            .env("CCACHE_REMOTE_STORAGE", &remote)
            // Paths differ between the two builds of a CI fleet; the key must not depend on them.
            .env("CCACHE_BASEDIR", work.path())
            .env_remove("CCACHE_DISABLE")
            .env_remove("CCACHE_REMOTE_ONLY")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ccache_stats(&ccache, &cache_dir)
    };

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
    let second = build("cache-b", "second.o");
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
    let out = gradle_compile(&gradle, &second);
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
