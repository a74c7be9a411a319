//! larderd's configuration: flags, `LARDER_*` environment variables and a TOML file, merged in
//! that order of precedence (a flag wins over the environment, which wins over the file).
//!
//! clap resolves flag-over-environment itself; every such field is an `Option` without a clap
//! default, so that "not given" stays distinguishable and the file can fill it in. Defaults are
//! applied last, in [`Config::resolve`].

use anyhow::{Context, bail};
use clap::Parser;
use larder_proto::units::{parse_duration, parse_size};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./larder-data";
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_MAX_OBJECT_SIZE: u64 = 100 << 30;

/// larderd: a tiered cache server for CI artifacts.
///
/// With no arguments it serves on 127.0.0.1:8080 from a disk tier in ./larder-data. Every
/// setting can also come from an environment variable or the TOML file given with --config
/// (a flag wins over the environment, which wins over the file). Sizes accept B, KiB, MiB, GiB,
/// TiB (and KB, MB, GB, TB); durations s, m, h, d.
#[derive(Parser, Debug, Default)]
#[command(name = "larderd", version, about, long_about)]
pub struct Cli {
    /// TOML configuration file
    #[arg(long, env = "LARDER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8080] (TOML: listen)
    #[arg(long, env = "LARDER_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Directory of the disk tier [default: ./larder-data] (TOML: disk.dir)
    #[arg(long, env = "LARDER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Size limit of the disk tier; least recently read objects are evicted beyond it, e.g. 50GiB
    /// [default: none] (TOML: disk.limit)
    #[arg(long, env = "LARDER_DISK_LIMIT", value_name = "SIZE")]
    pub disk_limit: Option<String>,

    /// Longest time to live an object can have; also the TTL of uploads without a
    /// Time-To-Live header [default: 7d] (TOML: max_ttl)
    #[arg(long, env = "LARDER_MAX_TTL", value_name = "DURATION")]
    pub max_ttl: Option<String>,

    /// Largest object accepted; larger uploads get 413 [default: 100GiB] (TOML: max_object_size)
    #[arg(long, env = "LARDER_MAX_OBJECT_SIZE", value_name = "SIZE")]
    pub max_object_size: Option<String>,

    /// Log format: text or json [default: text] (TOML: log_format)
    #[arg(long, env = "LARDER_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// How long shutdown waits for requests in flight [default: 30s] (TOML: shutdown_grace)
    #[arg(long, env = "LARDER_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
}

/// The TOML file. Unknown keys are an error, so a typo never silently falls back to a default.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub max_ttl: Option<String>,
    pub max_object_size: Option<SizeValue>,
    pub log_format: Option<String>,
    pub shutdown_grace: Option<String>,
    #[serde(default)]
    pub disk: DiskSection,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    pub dir: Option<PathBuf>,
    pub limit: Option<SizeValue>,
}

/// Sizes may be written as `"50GiB"` or as a plain number of bytes.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn to_text(&self) -> String {
        match self {
            SizeValue::Bytes(n) => n.to_string(),
            SizeValue::Text(s) => s.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The effective configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub disk_limit: Option<u64>,
    pub max_ttl: Duration,
    pub max_object_size: u64,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
}

impl Config {
    /// Merges flags/environment (`cli`) over the file named by `--config`, then defaults.
    pub fn resolve(cli: Cli) -> anyhow::Result<Config> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let listen_text = cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_text.parse().with_context(|| {
            format!("invalid listen address {listen_text:?} (expected IP:PORT)")
        })?;
        let size = |name: &str, v: Option<String>| -> anyhow::Result<Option<u64>> {
            v.map(|s| parse_size(&s).map_err(|e| anyhow::anyhow!("{name}: {e}")))
                .transpose()
        };
        let duration = |name: &str, v: Option<String>| -> anyhow::Result<Option<Duration>> {
            v.map(|s| parse_duration(&s).map_err(|e| anyhow::anyhow!("{name}: {e}")))
                .transpose()
        };
        let log_format = match cli.log_format.or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("log format: {other:?} is neither \"text\" nor \"json\""),
        };
        Ok(Config {
            listen,
            data_dir: cli
                .data_dir
                .or(file.disk.dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            disk_limit: size(
                "disk limit",
                cli.disk_limit.or(file.disk.limit.map(|s| s.to_text())),
            )?,
            max_ttl: duration("max ttl", cli.max_ttl.or(file.max_ttl))?.unwrap_or(DEFAULT_MAX_TTL),
            max_object_size: size(
                "max object size",
                cli.max_object_size
                    .or(file.max_object_size.map(|s| s.to_text())),
            )?
            .unwrap_or(DEFAULT_MAX_OBJECT_SIZE),
            log_format,
            shutdown_grace: duration("shutdown grace", cli.shutdown_grace.or(file.shutdown_grace))?
                .unwrap_or(Duration::from_secs(30)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(toml: &str, cli: Cli) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("larder.toml");
        std::fs::write(&path, toml).unwrap();
        Config::resolve(Cli {
            config: Some(path),
            ..cli
        })
    }

    #[test]
    fn defaults_are_the_embedded_disk_setup() {
        let c = Config::resolve(Cli::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.max_ttl, DEFAULT_MAX_TTL);
        assert_eq!(c.disk_limit, None);
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let toml = "listen = \"127.0.0.1:9999\"\nmax_ttl = \"2d\"\nmax_object_size = 1000\n[disk]\ndir = \"/var/cache/larder\"\nlimit = \"50GiB\"\n";
        let c = with_file(toml, Cli::default()).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.max_ttl, Duration::from_secs(2 * 86400));
        assert_eq!(c.max_object_size, 1000);
        assert_eq!(c.disk_limit, Some(50 << 30));
        assert_eq!(c.data_dir, PathBuf::from("/var/cache/larder"));
        let c = with_file(
            toml,
            Cli {
                listen: Some("127.0.0.1:1234".into()),
                ..Cli::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 1234);
    }

    #[test]
    fn bad_values_are_explained() {
        let e = with_file("listn = \"x\"\n", Cli::default()).unwrap_err();
        assert!(format!("{e:#}").contains("unknown field"), "{e:#}");
        let e = Config::resolve(Cli {
            disk_limit: Some("lots".into()),
            ..Cli::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk limit"), "{e}");
        let e = Config::resolve(Cli {
            listen: Some("localhost".into()),
            ..Cli::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("listen address"), "{e}");
    }

    #[test]
    fn the_sample_config_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../larder.example.toml");
        let c = Config::resolve(Cli {
            config: Some(path.into()),
            ..Cli::default()
        })
        .unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    }
}
