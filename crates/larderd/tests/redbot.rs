//! An outside referee: REDbot (mnot's HTTP linter) checks a larderd object URL.
//!
//! Our own tests can only check the RFC 9110 behaviour we thought of; REDbot is an independent
//! reading of the same RFCs. Given one URL it does a plain GET and then probes on its own: a
//! range request for a piece of the body it saw, conditional requests with the ETag
//! (`If-None-Match`) and the Last-Modified date (`If-Modified-Since`), content negotiation,
//! and it lints every response's headers. Its HAR output (`-o har`) carries its notes, each
//! with a category and a level; any "bad" note, and any warning about validation, partial
//! content or caching, fails the test. All notes are printed so a person sees REDbot's warnings too.
//!
//! REDbot comes from PyPI; `scripts/test.sh` installs it into `target/redbot-venv` when it is
//! missing. Without it the test prints `SKIPPED: …`, except under CI, where it fails.

use larder_testkit::Larderd;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// REDbot's executable, or `None` after printing why the test is skipped (under CI a missing
/// REDbot is a failure: scripts/test.sh should have installed it).
fn find_redbot() -> Option<PathBuf> {
    let found = locate_redbot();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "REDbot is not installed, and CI is set: scripts/test.sh should have installed it"
        );
        println!(
            "SKIPPED: REDbot is not installed (scripts/test.sh installs it: pip install redbot)"
        );
    }
    found
}

/// `LARDER_REDBOT`, else the venv `scripts/test.sh` installs, else `redbot` on PATH.
fn locate_redbot() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("LARDER_REDBOT").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/redbot-venv/bin/redbot")),
        Some(PathBuf::from("redbot")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .arg("--help")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Every note of the HAR's entries, subnotes flattened, as (category, level, id, summary).
fn notes(har: &Value) -> Vec<(String, String, String, String)> {
    fn walk(n: &Value, out: &mut Vec<(String, String, String, String)>) {
        let s = |k: &str| n[k].as_str().unwrap_or("").to_string();
        out.push((s("category"), s("level"), s("note_id"), s("summary")));
        for sub in n["subnotes"].as_array().into_iter().flatten() {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    for entry in har["log"]["entries"].as_array().into_iter().flatten() {
        for n in entry["_red_messages"].as_array().into_iter().flatten() {
            walk(n, &mut out);
        }
    }
    out
}

fn body() -> Vec<u8> {
    // Big enough that REDbot's range probe picks a piece from the middle of a real body.
    (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Stores an object as `larder put` does (no Content-Type or Cache-Control of its own, so
/// REDbot sees larderd's defaults).
async fn put(url: &str) {
    let put = reqwest::Client::new()
        .put(url)
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
}

/// Runs REDbot on `url`, prints every note, and fails on any error-level note about
/// validation or partial content, or if a probe that should pass did not run or pass.
async fn referee(redbot: &Path, url: &str) {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(redbot)
            .args(["-o", "har", url])
            .output(),
    )
    .await
    .expect("REDbot finished within 120 s")
    .expect("run REDbot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "REDbot failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let har: Value = serde_json::from_str(&stdout).expect("REDbot's HAR output is JSON");
    assert!(
        har["log"]["_red_error"].is_null(),
        "REDbot could not check the URL: {}",
        har["log"]["_red_error"]
    );

    let notes = notes(&har);
    println!("REDbot {} on {url}:", har["log"]["creator"]["version"]);
    for (category, level, id, summary) in &notes {
        println!("  [{level:>4}] {category:<10} {id}: {summary}");
    }
    let errors: Vec<_> = notes
        .iter()
        .filter(|(c, l, _, _)| {
            l == "BAD" || (l == "WARN" && (c == "VALIDATION" || c == "RANGE" || c == "CACHING"))
        })
        .collect();
    assert!(
        errors.is_empty(),
        "REDbot reports errors, or warnings about validators, ranges, conditional requests or \
         caching: {errors:#?}"
    );
    // The probes really ran and passed: without these the absence of errors would prove nothing.
    for expected in ["RANGE_CORRECT", "INM_304", "IMS_304"] {
        assert!(
            notes
                .iter()
                .any(|(_, l, id, _)| id == expected && l == "GOOD"),
            "REDbot did not report {expected}: its probe did not run or did not pass"
        );
    }
}

#[tokio::test]
async fn redbot_reports_no_errors_about_validators_ranges_or_conditional_requests() {
    let Some(redbot) = find_redbot() else {
        return;
    };
    let srv = Larderd::start(&[]);
    let url = srv.object_url("referee", "artifacts/build.tar");
    put(&url).await;
    referee(&redbot, &url).await;
}

/// The same on a replica that does not hold the object: its first answer comes from the S3
/// tier (and starts a fill), the probes after it from S3 or the freshly filled disk copy.
#[tokio::test]
async fn redbot_reports_no_errors_on_a_replica_reading_through_s3() {
    let Some(redbot) = find_redbot() else {
        return;
    };
    let ok = ["AWS_ENDPOINT_URL", "S3_BUCKET", "AWS_ACCESS_KEY_ID"]
        .iter()
        .all(|v| std::env::var_os(v).is_some());
    if !ok {
        println!("SKIPPED: no S3 server (run scripts/s3-server.sh, or scripts/test.sh)");
        return;
    }
    let bucket = std::env::var("S3_BUCKET").unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("redbot-test/{nanos:x}");
    let args = ["--s3-bucket", &bucket, "--s3-prefix", &prefix];
    let writer = Larderd::start(&args);
    let reader = Larderd::start(&args);
    put(&writer.object_url("referee", "artifacts/build.tar")).await;
    referee(
        &redbot,
        &reader.object_url("referee", "artifacts/build.tar"),
    )
    .await;
}
