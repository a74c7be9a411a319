//! `larderd`: the larder cache server.
//!
//! This binary is wiring: it reads the configuration, opens the tiers, installs logging and
//! metrics, and runs the HTTP server until SIGTERM or SIGINT. The HTTP API lives in [`api`], the
//! accept loop and shutdown in [`server`], storage in the `larder-tier` crate.

mod api;
mod config;
mod metrics;
mod server;

use clap::Parser;
use config::{Cli, Config, LogFormat};
use larder_tier::{DiskConfig, DiskTier};
use std::sync::Arc;
use std::time::Instant;

fn init_logging(format: LogFormat) {
    // Access lines (one per request) are off by default: at tens of thousands of small requests
    // per second, formatting them costs more than serving. `LARDER_LOG=info` turns them on.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LARDER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,larderd::access=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() {
    let config = match Config::resolve(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("larderd: {e:#}");
            std::process::exit(2);
        }
    };
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(config)) {
        tracing::error!("{e:#}");
        eprintln!("larderd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = metrics::install()?;
    let mut disk = DiskConfig::new(&config.data_dir);
    disk.limit = config.disk_limit;
    let tier = DiskTier::open(disk).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot open the disk tier in {}: {e}",
            config.data_dir.display()
        )
    })?;
    let state = Arc::new(api::State {
        tier: Arc::new(tier),
        max_ttl: config.max_ttl,
        max_object_size: config.max_object_size,
        metrics,
        started: Instant::now(),
    });
    server::serve(config.listen, state, config.shutdown_grace).await
}
