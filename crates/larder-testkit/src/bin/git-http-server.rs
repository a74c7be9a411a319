//! `git-http-server ROOT STATS_FILE`: the tests' smart-HTTP git upstream (`GitHttpServer`, git's
//! own `http-backend` behind a small HTTP server) as a process, for benchmarks in `bench/` that
//! need a local upstream. Prints `127.0.0.1:PORT` on stdout, then keeps STATS_FILE holding the
//! response body bytes served so far (replaced atomically, so a reader never sees half a number)
//! until it is killed.

use larder_testkit::git::GitHttpServer;
use std::path::PathBuf;
use std::time::Duration;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(root), Some(stats)) = (args.next(), args.next()) else {
        eprintln!("usage: git-http-server ROOT STATS_FILE");
        std::process::exit(2);
    };
    let (root, stats) = (PathBuf::from(root), PathBuf::from(stats));
    let server = GitHttpServer::start(&root);
    println!("{}", server.addr);
    let staged = stats.with_extension("tmp");
    let mut last = u64::MAX;
    loop {
        let served = server.bytes_served();
        if served != last {
            std::fs::write(&staged, format!("{served}\n")).expect("write stats");
            std::fs::rename(&staged, &stats).expect("replace stats");
            last = served;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
