//! `larderd`: the larder cache server.
//!
//! This binary is wiring: it reads the configuration, opens the tiers, installs logging and
//! metrics, and runs the HTTP server until SIGTERM or SIGINT. The HTTP API lives in [`api`], the
//! accept loop and shutdown in [`server`], storage in the `larder-tier` crate.

mod access_log;
mod api;
mod auth;
mod bazel;
mod config;
mod fast_path;
mod git;
mod io;
mod memory;
mod metrics;
mod nx;
mod recent;
mod reload;
mod server;
mod tls;
mod turbo;

use config::{Config, LogFormat};
use larder_tier::{DiskConfig, DiskTier, S3Tier, Tier, TieredTier};
use std::sync::Arc;
use std::time::Instant;

/// Messages (a log line, or a batch of access lines) waiting for the log writer thread before
/// whoever logs next waits for it: at most 32 MiB of access-line batches.
const LOG_CHANNEL_MESSAGES: usize = 1024;

/// Logs, the access log (one line per request) included, go to stderr through a buffer that a
/// thread of their own writes out: formatting a line is all a request pays, never a write to a
/// slow stderr (a pipe into journald). Lines are written in batches as they come; the returned
/// guard flushes what is left when the process ends, so it must be dropped, not skipped by
/// `process::exit`.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LARDER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // A full buffer (a stuck stderr) makes requests wait instead of losing lines.
        .lossy(false)
        .buffered_lines_limit(LOG_CHANNEL_MESSAGES)
        // Smaller than an access batch (`access_log::BATCH_BYTES`), which `BufWriter` then
        // writes straight out instead of copying it into its buffer first.
        .finish(std::io::BufWriter::with_capacity(
            access_log::BATCH_BYTES / 2,
            std::io::stderr(),
        ));
    // Colours only for a person at a terminal: escape codes cost a third of a request's
    // instructions when every request logs a line, and mean nothing to journald or a file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer.clone());
    match format {
        LogFormat::Json => builder.json().init(),
        // Fields as `name=value` without the default formatter's styling machinery, which
        // runs even with colours off: the request span's fields are formatted on every request.
        LogFormat::Text => builder.init(),
    }
    // After the filter is in place: whether the access log is on is decided once, from it.
    access_log::install(writer, format == LogFormat::Json);
    guard
}

fn main() {
    let cli = config::parse_cli();
    if cli.hash_token {
        let mut token = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut token) {
            eprintln!("larderd: cannot read a token on stdin: {e}");
            std::process::exit(2);
        }
        // A trailing newline from `echo` is not part of the token.
        let token = token.trim_end_matches(['\r', '\n']);
        if token.is_empty() {
            eprintln!("larderd: no token on stdin");
            std::process::exit(2);
        }
        println!("sha256 = \"{}\"", auth::token_digest_hex(token));
        return;
    }
    let config = match Config::resolve(cli.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("larderd: {e:#}");
            std::process::exit(2);
        }
    };
    if cli.check_config {
        match check(&config) {
            Ok(summary) => println!("larderd: configuration OK: {summary}"),
            Err(e) => {
                eprintln!("larderd: {e:#}");
                std::process::exit(2);
            }
        }
        return;
    }
    let log_guard = init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli, config));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    drop(runtime);
    drop(log_guard);
    if let Err(e) = result {
        eprintln!("larderd: {e:#}");
        std::process::exit(1);
    }
}

/// `--check-config`: the checks a start makes before it opens anything, and what the
/// configuration amounts to, in one line.
fn check(config: &Config) -> anyhow::Result<String> {
    auth::check_exposure(config.listen, &config.auth, config.allow_anonymous)?;
    if let Some(files) = &config.tls {
        tls::load(files)?;
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let tiers = match &config.s3 {
        None => format!("disk tier in {}", config.data_dir.display()),
        Some(s3) => format!(
            "disk tier in {} over S3 bucket {:?}",
            config.data_dir.display(),
            s3.tier.bucket
        ),
    };
    let access = match config.auth.token_count() {
        0 => "no tokens (every request may read and write)".to_string(),
        n => format!("{n} tokens"),
    };
    Ok(format!("{scheme}://{}, {tiers}, {access}", config.listen))
}

/// Raises the soft limit on open descriptors to the hard one, as nginx (`worker_rlimit_nofile`)
/// and Go's runtime do: connections, uploads, fills and the disk tier's open revisions (sized
/// from this limit) all take descriptors, and a login shell's 1024 is reached at a few hundred
/// clients.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct they are given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur >= limit.rlim_max
    {
        return;
    }
    let from = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        // git and what it starts get the limit larderd was started with.
        larder_git::command::start_children_with_descriptor_limit(from);
        tracing::debug!(
            from,
            to = limit.rlim_max,
            "raised the open descriptor limit"
        );
    }
}

async fn run(cli: config::Cli, config: Config) -> anyhow::Result<()> {
    auth::check_exposure(config.listen, &config.auth, config.allow_anonymous)?;
    let (tls, certificate) = config.tls.as_ref().map(tls::acceptor).transpose()?.unzip();
    if !config.auth.enabled() {
        tracing::info!("no tokens configured: every request may read and write");
    }
    let metrics = metrics::install()?;
    raise_descriptor_limit();
    let mut disk = DiskConfig::new(&config.data_dir);
    disk.limit = config.disk_limit;
    disk.direct_writes = config.disk_direct_writes;
    disk.memory_cache = config.disk_memory_cache;
    if let Some(open_files) = config.disk_open_files {
        disk.open_files = open_files;
    }
    let disk = DiskTier::open(disk).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot open the disk tier in {}: {e}",
            config.data_dir.display()
        )
    })?;
    let tier: Arc<dyn Tier> = match &config.s3 {
        None => Arc::new(disk),
        Some(s3) => {
            let remote = S3Tier::connect(s3.tier.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot use S3 bucket {:?}: {e}", s3.tier.bucket))?;
            tracing::info!(bucket = %s3.tier.bucket, prefix = %s3.tier.prefix, "S3 tier connected");
            spawn_reaper(remote.clone(), s3.reap_grace, s3.reap_interval);
            Arc::new(TieredTier::new(
                Arc::new(disk),
                Arc::new(remote),
                s3.revalidate_after,
            ))
        }
    };
    let git = match &config.git {
        None => None,
        Some(settings) => {
            let service = git::GitService::new(
                settings.clone(),
                tier.clone(),
                config.max_ttl,
                config.tls.is_some(),
            )?;
            tracing::info!(
                patterns = ?settings.allow,
                mirror_dir = %settings.mirror_dir.display(),
                "git snapshots enabled"
            );
            Some(Arc::new(service))
        }
    };
    let state = Arc::new(api::State {
        git,
        bazel: config.bazel.clone(),
        tier,
        max_ttl: config.max_ttl,
        max_object_size: config.max_object_size,
        metrics,
        started: Instant::now(),
        auth: auth::LiveAuth::new(config.auth.clone()),
        uploads: Arc::new(tokio::sync::Semaphore::new(config.limits.max_uploads)),
        limits: config.limits.clone(),
        test_fault_panic: test_fault_panic()?,
    });
    // Before the listener opens: a SIGHUP from then on reloads instead of ending the process.
    reload::on_hangup(cli, config.clone(), state.clone(), certificate)?;
    let options = server::ServeOptions {
        limits: config.limits,
        tls,
        grace: config.shutdown_grace,
    };
    server::serve(config.listen, config.workers, state, options).await
}

/// The test fault hook of `api::State::test_fault_panic`: deliberately an environment variable
/// outside the configuration (no flag, no TOML, not in `--help`), named so that nobody sets it
/// by accident, and loud when set.
fn test_fault_panic() -> anyhow::Result<Option<(larder_proto::Namespace, larder_proto::Key)>> {
    let Ok(value) = std::env::var("LARDER_TEST_FAULT_PANIC_KEY") else {
        return Ok(None);
    };
    let (ns, key) = value.split_once('/').unwrap_or((&value, ""));
    let names = larder_proto::Namespace::parse(ns)
        .and_then(|ns| Ok((ns, larder_proto::Key::parse(key)?)))
        .map_err(|e| anyhow::anyhow!("LARDER_TEST_FAULT_PANIC_KEY={value:?}: {e}"))?;
    tracing::warn!(
        object = %value,
        "test fault hook on: requests for this object panic (LARDER_TEST_FAULT_PANIC_KEY)"
    );
    Ok(Some(names))
}

/// Deletes S3 bodies that no key references any more (after a grace period, so downloads in
/// flight on other replicas finish) and expired keys. Every replica runs it; it is idempotent.
fn spawn_reaper(s3: S3Tier, grace: std::time::Duration, interval: std::time::Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match s3.reap(grace).await {
                Ok(report) => {
                    ::metrics::counter!("larder_s3_reaper_passes_total", "result" => "ok")
                        .increment(1);
                    tracing::info!(?report, "S3 reaper pass");
                }
                Err(e) => {
                    ::metrics::counter!("larder_s3_reaper_passes_total", "result" => "failed")
                        .increment(1);
                    tracing::warn!(error = %e.chain(), "S3 reaper pass failed");
                }
            }
        }
    });
}
