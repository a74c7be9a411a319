//! A few seconds of the load generator against the real larderd, so the generator (and its
//! checks of every answer) keeps working between the long runs of bench/load-test.sh.

use larder_testkit::Larderd;
use std::process::Command;

#[test]
fn a_short_mixed_load_gets_only_expected_answers() {
    let srv = Larderd::start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_larder-load"))
        .args([
            "--url",
            &srv.url(),
            "--duration",
            "3s",
            "--connections",
            "32",
        ])
        .args(["--objects", "4KiB:8,64KiB:4,1MiB:4,3MiB:2"])
        .args(["--class-weights", "4,3,2,1"])
        .args(["--pid", &srv.pid().to_string()])
        .output()
        .expect("run larder-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "larder-load reported unexpected answers or failed"
    );
    // Every kind of request ran and was answered as expected at least once.
    for row in [
        "| GET |",
        "| range GET (If-Match) |",
        "| HEAD |",
        "| GET If-None-Match |",
        "| PUT (overwrite) |",
    ] {
        let line = stdout.lines().find(|l| l.starts_with(row)).expect(row);
        let count: u64 = line.split('|').nth(2).unwrap().trim().parse().unwrap();
        assert!(count > 0, "no {row} request ran: {line}");
    }
    assert!(stdout.contains(" 0 unexpected"), "{stdout}");
}
