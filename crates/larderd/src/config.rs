//! larderd's configuration: flags, `LARDER_*` environment variables and a TOML file, merged in
//! that order of precedence (a flag wins over the environment, which wins over the file).
//!
//! clap resolves flag-over-environment itself; every such field is an `Option` without a clap
//! default, so that "not given" stays distinguishable and the file can fill it in. Defaults are
//! applied last, in [`Config::resolve`], from the `DEFAULT_*` constants below, which are also
//! what `--help` shows (added by [`command`]), so a default is written once.
//!
//! Sizes and durations are typed (`ByteSize`, `Interval` from `larder_proto::units`): clap and
//! serde parse them where they are read, and a bad value is refused with the flag's or the
//! file key's name before anything starts.

use crate::auth::{Auth, Grant, NamespacePatterns};
use anyhow::{Context, bail};
use clap::Parser;
use larder_proto::units::{ByteSize, Interval};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./larder-data";
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_MAX_OBJECT_SIZE: u64 = 100 << 30;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_REVALIDATE_AFTER: Duration = Duration::from_secs(5);
pub const DEFAULT_S3_REAP_GRACE: Duration = Duration::from_secs(3600);
pub const DEFAULT_S3_REAP_INTERVAL: Duration = Duration::from_secs(600);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_MAX_UPLOADS: usize = 64;
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// An `ActionResult` lists digests and paths, not file contents: a few KiB for most actions.
pub const DEFAULT_BAZEL_MAX_ACTION_RESULT_SIZE: u64 = 1 << 20;

/// larderd: a tiered cache server for CI artifacts.
///
/// With no arguments it serves on 127.0.0.1:8080 from a disk tier in ./larder-data. Every
/// setting can also come from an environment variable or the TOML file given with --config
/// (a flag wins over the environment, which wins over the file). Sizes accept B, KiB, MiB, GiB,
/// TiB (and KB, MB, GB, TB); durations s, m, h, d.
#[derive(Parser, Clone, Debug, Default)]
#[command(name = "larderd", version, about, long_about)]
pub struct Cli {
    /// TOML configuration file
    #[arg(long, env = "LARDER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Read a bearer token on stdin, print the `sha256 = "…"` line that grants it in a
    /// [[tokens]] entry of the config file, and exit (the same as `sha256sum`)
    #[arg(long)]
    pub hash_token: bool,

    /// Check the configuration as a start would (files, listener exposure, TLS certificate and
    /// key), print a summary and exit: 0 if larderd would start with it, 2 with the reason if
    /// not. Nothing is opened or written (for `systemctl reload`, before SIGHUP)
    #[arg(long)]
    pub check_config: bool,

    /// Address to listen on (TOML: listen)
    #[arg(long, env = "LARDER_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Directory of the disk tier (TOML: disk.dir)
    #[arg(long, env = "LARDER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Size limit of the disk tier; least recently read objects are evicted beyond it, e.g. 50GiB
    /// [default: none] (TOML: disk.limit)
    #[arg(long, env = "LARDER_DISK_LIMIT", value_name = "SIZE")]
    pub disk_limit: Option<ByteSize>,

    /// Longest time to live an object can have; also the TTL of uploads without a
    /// Time-To-Live header (TOML: max_ttl)
    #[arg(long, env = "LARDER_MAX_TTL", value_name = "DURATION")]
    pub max_ttl: Option<Interval>,

    /// Largest object accepted; larger uploads get 413 (TOML: max_object_size)
    #[arg(long, env = "LARDER_MAX_OBJECT_SIZE", value_name = "SIZE")]
    pub max_object_size: Option<ByteSize>,

    /// Log format (TOML: log_format)
    #[arg(long, env = "LARDER_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// How long shutdown waits for requests in flight (TOML: shutdown_grace)
    #[arg(long, env = "LARDER_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<Interval>,

    /// Threads serving connections, each with its own listening socket (SO_REUSEPORT) and event
    /// loop, so that a connection stays on one thread from accept to close (TOML: workers)
    #[arg(long, env = "LARDER_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    /// S3 bucket: enables the S3 tier, with the disk tier as its cache (TOML: s3.bucket).
    /// Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the TOML file
    #[arg(long, env = "LARDER_S3_BUCKET", value_name = "BUCKET")]
    pub s3_bucket: Option<String>,

    /// S3-compatible endpoint, e.g. http://127.0.0.1:9000; also read from AWS_ENDPOINT_URL
    /// [default: AWS S3] (TOML: s3.endpoint)
    #[arg(long, env = "LARDER_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// S3 region [default: us-east-1] (TOML: s3.region)
    #[arg(long, env = "AWS_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,

    /// Key prefix inside the bucket, so several deployments can share one (TOML: s3.prefix)
    #[arg(long, env = "LARDER_S3_PREFIX", value_name = "PREFIX")]
    pub s3_prefix: Option<String>,

    /// How long a disk copy is served without asking S3 whether it is still current; replicas
    /// converge on a new revision within this window (TOML: s3.revalidate_after)
    #[arg(long, env = "LARDER_REVALIDATE_AFTER", value_name = "DURATION")]
    pub revalidate_after: Option<Interval>,

    /// How long an S3 body no longer referenced by any key is kept before the reaper deletes
    /// it, so downloads in flight on other replicas can finish (TOML: s3.reap_grace)
    #[arg(long, env = "LARDER_S3_REAP_GRACE", value_name = "DURATION")]
    pub s3_reap_grace: Option<Interval>,

    /// Serve without access control on a non-loopback address. Without tokens configured
    /// ([[tokens]] in the config file) larderd otherwise refuses to listen beyond loopback
    /// (TOML: allow_anonymous)
    #[arg(long, env = "LARDER_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// PEM certificate chain: serve HTTPS (HTTP/1.1 and HTTP/2) instead of HTTP; needs
    /// --tls-key (TOML: tls.cert)
    #[arg(long, env = "LARDER_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (TOML: tls.key)
    #[arg(long, env = "LARDER_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Most open client connections; more get 503 with Retry-After
    /// (TOML: limits.max_connections)
    #[arg(long, env = "LARDER_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Most uploads in progress at once; more get 503 with Retry-After
    /// (TOML: limits.max_uploads)
    #[arg(long, env = "LARDER_MAX_UPLOADS", value_name = "N")]
    pub max_uploads: Option<usize>,

    /// Time a client has to send a complete request head; slower ones get 408, idle
    /// keep-alive connections are closed after it (TOML: limits.header_timeout)
    #[arg(long, env = "LARDER_HEADER_TIMEOUT", value_name = "DURATION")]
    pub header_timeout: Option<Interval>,

    /// Longest pause in a request or response body before the transfer is abandoned
    /// (upload: 408, nothing stored; download: connection closed) (TOML: limits.idle_timeout)
    #[arg(long, env = "LARDER_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<Interval>,

    /// Upstream git repositories served as snapshots: a URL glob (`*` within a path segment,
    /// `**` across), optionally `=NAMESPACE` for where their snapshots live [default: git].
    /// Repeatable; no pattern, no git feature (TOML: git.allow)
    #[arg(
        long = "git-allow",
        env = "LARDER_GIT_ALLOW",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub git_allow: Vec<String>,

    /// Directory of the git mirrors and of snapshots being built [default: DATA_DIR/git-mirrors]
    /// (TOML: git.mirror_dir)
    #[arg(long, env = "LARDER_GIT_MIRROR_DIR", value_name = "DIR")]
    pub git_mirror_dir: Option<PathBuf>,

    /// Size limit of the git mirrors together; whole mirrors of the least recently asked-for
    /// repositories are removed beyond it [default: none] (TOML: git.mirror_limit)
    #[arg(long, env = "LARDER_GIT_MIRROR_LIMIT", value_name = "SIZE")]
    pub git_mirror_limit: Option<ByteSize>,

    /// How many snapshots of each repository are kept; older ones are deleted when the head
    /// record moves on (TOML: git.keep)
    #[arg(long, env = "LARDER_GIT_KEEP", value_name = "N")]
    pub git_keep: Option<usize>,

    /// How often an active repository is fetched and, if its default branch moved,
    /// snapshotted (TOML: git.interval)
    #[arg(long, env = "LARDER_GIT_INTERVAL", value_name = "DURATION")]
    pub git_interval: Option<Interval>,

    /// A repository whose head record nobody asked for this long is no longer fetched, and its
    /// mirror is removed (TOML: git.idle_after)
    #[arg(long, env = "LARDER_GIT_IDLE_AFTER", value_name = "DURATION")]
    pub git_idle_after: Option<Interval>,

    /// How long snapshots dropped by --git-keep and bundles replaced by a new full bundle stay
    /// readable before they are deleted, so downloads in flight finish (TOML: git.grace)
    #[arg(long, env = "LARDER_GIT_GRACE", value_name = "DURATION")]
    pub git_grace: Option<Interval>,

    /// How long a generator's claim on a commit keeps other replicas from building it; a
    /// generator killed mid-way delays the commit by this much (TOML: git.claim_ttl)
    #[arg(long, env = "LARDER_GIT_CLAIM_TTL", value_name = "DURATION")]
    pub git_claim_ttl: Option<Interval>,

    /// Base URL clients reach larderd at, used for the absolute bundle URIs of bundles.list
    /// (e.g. https://larder.example.com) [default: the request's Host header]
    /// (TOML: git.public_url)
    #[arg(long, env = "LARDER_GIT_PUBLIC_URL", value_name = "URL")]
    pub git_public_url: Option<String>,

    /// Namespaces whose Bazel action cache entries (/bazel/NS/ac/…) are stored as they come:
    /// not parsed as ActionResult, no size cap, no check of the blobs they refer to; for
    /// ccache's `layout=bazel`. A pattern as in tokens (`*` matches any run of characters).
    /// Repeatable [default: none] (TOML: bazel.unchecked_namespaces)
    #[arg(
        long = "bazel-unchecked-namespace",
        env = "LARDER_BAZEL_UNCHECKED_NAMESPACES",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub bazel_unchecked_namespaces: Vec<String>,

    /// Largest Bazel action result accepted in a checked namespace; larger ones get 413
    /// (TOML: bazel.max_action_result_size)
    #[arg(long, env = "LARDER_BAZEL_MAX_ACTION_RESULT_SIZE", value_name = "SIZE")]
    pub bazel_max_action_result_size: Option<ByteSize>,
}

/// The TOML file. Unknown keys are an error, so a typo never silently falls back to a default.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub max_ttl: Option<Interval>,
    pub max_object_size: Option<ByteSize>,
    pub log_format: Option<LogFormat>,
    pub shutdown_grace: Option<Interval>,
    pub workers: Option<usize>,
    #[serde(default)]
    pub disk: DiskSection,
    pub s3: Option<S3Section>,
    pub allow_anonymous: Option<bool>,
    /// Whether /metrics answers without a token when tokens are configured (default true;
    /// false requires the admin scope).
    pub public_metrics: Option<bool>,
    #[serde(default)]
    pub tokens: Vec<TokenSection>,
    #[serde(default)]
    pub limits: LimitsSection,
    pub tls: Option<TlsSection>,
    pub git: Option<GitSection>,
    pub bazel: Option<BazelSection>,
}

/// `[bazel]`: the Bazel HTTP remote cache under `/bazel/{ns}`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct BazelSection {
    #[serde(default)]
    pub unchecked_namespaces: Vec<String>,
    pub max_action_result_size: Option<ByteSize>,
}

/// The Bazel remote cache's settings.
#[derive(Clone, Debug)]
pub struct BazelSettings {
    /// Namespaces whose action cache entries are stored unchecked.
    pub unchecked_namespaces: NamespacePatterns,
    /// Largest action result accepted where they are checked.
    pub max_action_result_size: u64,
}

impl Default for BazelSettings {
    fn default() -> BazelSettings {
        BazelSettings {
            unchecked_namespaces: NamespacePatterns::default(),
            max_action_result_size: DEFAULT_BAZEL_MAX_ACTION_RESULT_SIZE,
        }
    }
}

impl BazelSettings {
    /// Whether action results in `ns` are parsed and checked.
    pub fn checks_action_results(&self, ns: &larder_proto::Namespace) -> bool {
        !self.unchecked_namespaces.matches(ns)
    }
}

/// `[git]`: snapshots of upstream git repositories.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct GitSection {
    #[serde(default)]
    pub allow: Vec<String>,
    pub mirror_dir: Option<PathBuf>,
    pub mirror_limit: Option<ByteSize>,
    pub keep: Option<usize>,
    pub interval: Option<Interval>,
    pub idle_after: Option<Interval>,
    pub grace: Option<Interval>,
    pub claim_ttl: Option<Interval>,
    pub public_url: Option<String>,
}

/// The git snapshot settings, present only when at least one `--git-allow` pattern is given.
#[derive(Clone, Debug)]
pub struct GitSettings {
    /// The patterns as given; checked by `larder_git::AllowList::new` while resolving.
    pub allow: Vec<String>,
    pub mirror_dir: PathBuf,
    pub mirror_limit: Option<u64>,
    pub keep: usize,
    pub interval: Duration,
    pub idle_after: Duration,
    /// How long retired snapshots and bundles stay readable.
    pub grace: Duration,
    pub claim_ttl: Duration,
    /// Base of bundle URIs (no trailing `/`); `None`: from the request's Host header.
    pub public_url: Option<String>,
}

pub const DEFAULT_GIT_GRACE: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_GIT_CLAIM_TTL: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_GIT_INTERVAL: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_GIT_KEEP: usize = 3;
pub const DEFAULT_GIT_IDLE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// `[[tokens]]`: one bearer token, stored as the SHA-256 of the token (hex, as `sha256sum`
/// prints it), never the token itself.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TokenSection {
    pub name: String,
    pub sha256: String,
    /// Any of "read", "write", "admin".
    pub scopes: Vec<String>,
    /// Namespace patterns (`*` matches any run of characters); default all namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_connections: Option<usize>,
    pub max_uploads: Option<usize>,
    pub max_header_bytes: Option<ByteSize>,
    pub max_headers: Option<usize>,
    pub header_timeout: Option<Interval>,
    pub idle_timeout: Option<Interval>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Protective limits on what one client can make the server hold.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_uploads: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_uploads: DEFAULT_MAX_UPLOADS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    pub bucket: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub prefix: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Virtual-hosted-style URLs (bucket.endpoint) instead of path-style.
    pub virtual_hosted_style: Option<bool>,
    pub revalidate_after: Option<Interval>,
    pub reap_grace: Option<Interval>,
    pub reap_interval: Option<Interval>,
    /// Multipart upload part size.
    pub part_size: Option<ByteSize>,
    /// Bodies up to this size are stored inside their key's reference object.
    pub inline_body_max: Option<ByteSize>,
    /// Size and number of parallel ranged GETs for large reads.
    pub read_part_size: Option<ByteSize>,
    pub read_concurrency: Option<usize>,
    /// Limit for one S3 request (one part of a body).
    pub request_timeout: Option<Interval>,
    /// Limit for a small S3 operation (a key's reference), retries included; past it the
    /// request gets 503.
    pub metadata_timeout: Option<Interval>,
}

/// The S3 tier's settings, when one is configured.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub tier: larder_tier::S3Config,
    pub revalidate_after: Duration,
    pub reap_grace: Duration,
    pub reap_interval: Duration,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    pub dir: Option<PathBuf>,
    pub limit: Option<ByteSize>,
    /// Write big bodies with O_DIRECT (default true).
    pub direct_writes: Option<bool>,
    /// Bytes of small revisions kept in memory (default 16 MiB).
    pub memory_cache: Option<ByteSize>,
    /// Revisions of larger objects kept open (default: a quarter of the descriptor limit).
    pub open_files: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The effective configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub disk_limit: Option<u64>,
    /// Big bodies written past the page cache (`[disk] direct_writes`).
    pub disk_direct_writes: bool,
    /// Small revisions kept in memory (`[disk] memory_cache`), in bytes.
    pub disk_memory_cache: u64,
    /// Larger revisions kept open (`[disk] open_files`); `None`: the disk tier's default.
    pub disk_open_files: Option<usize>,
    pub max_ttl: Duration,
    pub max_object_size: u64,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    /// Connection-serving threads (see `server`).
    pub workers: usize,
    pub s3: Option<S3Settings>,
    pub allow_anonymous: bool,
    pub auth: Arc<Auth>,
    pub limits: Limits,
    pub tls: Option<TlsFiles>,
    /// `None`: git snapshots are not enabled (no `--git-allow`).
    pub git: Option<GitSettings>,
    pub bazel: BazelSettings,
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
        let s3 = resolve_s3(&cli, file.s3.unwrap_or_default())?;
        let auth = resolve_auth(file.tokens, file.public_metrics.unwrap_or(true))?;
        let limits = resolve_limits(&cli, file.limits)?;
        let data_dir = cli
            .data_dir
            .clone()
            .or(file.disk.dir)
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let git = resolve_git(&cli, file.git.unwrap_or_default(), &data_dir)?;
        let bazel = resolve_bazel(&cli, file.bazel.unwrap_or_default())?;
        let file_tls = file.tls.unwrap_or_default();
        let tls = match (
            cli.tls_cert.clone().or(file_tls.cert),
            cli.tls_key.clone().or(file_tls.key),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => bail!("TLS needs both a certificate (--tls-cert) and a key (--tls-key)"),
        };
        let listen_text = cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_text.parse().with_context(|| {
            format!("invalid listen address {listen_text:?} (expected IP:PORT)")
        })?;
        Ok(Config {
            s3,
            listen,
            data_dir,
            git,
            bazel,
            disk_limit: cli.disk_limit.or(file.disk.limit).map(|s| s.0),
            disk_direct_writes: file.disk.direct_writes.unwrap_or(true),
            disk_memory_cache: file
                .disk
                .memory_cache
                .map_or(larder_tier::disk::DEFAULT_MEMORY_CACHE, |s| s.0),
            disk_open_files: file.disk.open_files,
            max_ttl: or_default(cli.max_ttl.or(file.max_ttl), DEFAULT_MAX_TTL),
            max_object_size: cli
                .max_object_size
                .or(file.max_object_size)
                .map_or(DEFAULT_MAX_OBJECT_SIZE, |s| s.0),
            log_format: cli
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            shutdown_grace: or_default(
                cli.shutdown_grace.or(file.shutdown_grace),
                DEFAULT_SHUTDOWN_GRACE,
            ),
            workers: match cli.workers.or(file.workers) {
                Some(0) => bail!("workers must be at least 1"),
                Some(n) => n,
                None => default_workers(),
            },
            allow_anonymous: cli.allow_anonymous || file.allow_anonymous.unwrap_or(false),
            auth: Arc::new(auth),
            limits,
            tls,
        })
    }
}

impl Config {
    /// The settings that differ in `newer`, other than the token set (`[[tokens]]` and
    /// `public_metrics`, which a reload puts in force): they are read once, at start.
    pub fn restart_only_changes(&self, newer: &Config) -> Vec<&'static str> {
        // Compared through their Debug form: every setting has one, and a new setting added
        // to `Config` must be listed here (the destructuring below does not compile without).
        let Config {
            listen,
            data_dir,
            disk_limit,
            disk_direct_writes,
            disk_memory_cache,
            disk_open_files,
            max_ttl,
            max_object_size,
            log_format,
            shutdown_grace,
            workers,
            s3,
            allow_anonymous,
            auth: _,
            limits,
            tls,
            git,
            bazel,
        } = self;
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        // `S3Config`'s Debug redacts the secrets, so a new secret alone would look like no
        // change: they are compared beside it.
        let with_secrets = |s3: &Option<S3Settings>| {
            s3.as_ref().map(|s| {
                let tier = &s.tier;
                (
                    s.clone(),
                    tier.secret_access_key.clone(),
                    tier.session_token.clone(),
                )
            })
        };
        let (old_s3, new_s3) = (with_secrets(s3), with_secrets(&newer.s3));
        let settings: [(&'static str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 17] = [
            ("listen", listen, &newer.listen),
            ("data dir", data_dir, &newer.data_dir),
            ("disk limit", disk_limit, &newer.disk_limit),
            (
                "[disk] direct_writes",
                disk_direct_writes,
                &newer.disk_direct_writes,
            ),
            (
                "[disk] memory_cache",
                disk_memory_cache,
                &newer.disk_memory_cache,
            ),
            ("[disk] open_files", disk_open_files, &newer.disk_open_files),
            ("max_ttl", max_ttl, &newer.max_ttl),
            ("max_object_size", max_object_size, &newer.max_object_size),
            ("log_format", log_format, &newer.log_format),
            ("shutdown_grace", shutdown_grace, &newer.shutdown_grace),
            ("workers", workers, &newer.workers),
            ("[s3]", &old_s3, &new_s3),
            ("allow_anonymous", allow_anonymous, &newer.allow_anonymous),
            ("[limits]", limits, &newer.limits),
            ("[tls]", tls, &newer.tls),
            ("[git]", git, &newer.git),
            ("[bazel]", bazel, &newer.bazel),
        ];
        settings
            .into_iter()
            .filter(|(_, old, new)| !same(*old, *new))
            .map(|(name, _, _)| name)
            .collect()
    }
}

/// One connection-serving thread per core the process may run on.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The duration given, else `default`.
fn or_default(given: Option<Interval>, default: Duration) -> Duration {
    given.map_or(default, |i| i.0)
}

/// The command line, with each flag's default appended to its help from the same constant
/// that [`Config::resolve`] applies.
pub fn command() -> clap::Command {
    let defaults: [(&str, String); 19] = [
        ("listen", DEFAULT_LISTEN.to_string()),
        ("data_dir", DEFAULT_DATA_DIR.to_string()),
        ("max_ttl", Interval(DEFAULT_MAX_TTL).to_string()),
        (
            "max_object_size",
            ByteSize(DEFAULT_MAX_OBJECT_SIZE).to_string(),
        ),
        (
            "shutdown_grace",
            Interval(DEFAULT_SHUTDOWN_GRACE).to_string(),
        ),
        (
            "revalidate_after",
            Interval(DEFAULT_REVALIDATE_AFTER).to_string(),
        ),
        ("s3_reap_grace", Interval(DEFAULT_S3_REAP_GRACE).to_string()),
        ("workers", "one per core".to_string()),
        ("max_connections", DEFAULT_MAX_CONNECTIONS.to_string()),
        ("max_uploads", DEFAULT_MAX_UPLOADS.to_string()),
        (
            "header_timeout",
            Interval(DEFAULT_HEADER_TIMEOUT).to_string(),
        ),
        ("idle_timeout", Interval(DEFAULT_IDLE_TIMEOUT).to_string()),
        ("git_keep", DEFAULT_GIT_KEEP.to_string()),
        ("git_interval", Interval(DEFAULT_GIT_INTERVAL).to_string()),
        (
            "git_idle_after",
            Interval(DEFAULT_GIT_IDLE_AFTER).to_string(),
        ),
        ("git_grace", Interval(DEFAULT_GIT_GRACE).to_string()),
        ("git_claim_ttl", Interval(DEFAULT_GIT_CLAIM_TTL).to_string()),
        (
            "bazel_max_action_result_size",
            ByteSize(DEFAULT_BAZEL_MAX_ACTION_RESULT_SIZE).to_string(),
        ),
        ("log_format", "text".to_string()),
    ];
    let mut cmd = <Cli as clap::CommandFactory>::command();
    for (id, default) in defaults {
        cmd = cmd.mut_arg(id, |arg| {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            arg.help(format!("{help} [default: {default}]"))
        });
    }
    cmd
}

/// Parses the command line and the environment (see [`command`]).
pub fn parse_cli() -> Cli {
    use clap::FromArgMatches;
    Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
}

fn resolve_auth(tokens: Vec<TokenSection>, public_metrics: bool) -> anyhow::Result<Auth> {
    let grants = tokens
        .into_iter()
        .map(|t| Ok((t.sha256, Grant::new(t.name, &t.scopes, &t.namespaces)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Auth::new(grants, public_metrics)
}

fn resolve_limits(cli: &Cli, file: LimitsSection) -> anyhow::Result<Limits> {
    let defaults = Limits::default();
    let positive = |name: &str, v: Option<usize>, default: usize| -> anyhow::Result<usize> {
        match v.unwrap_or(default) {
            0 => bail!("{name} must be at least 1"),
            n => Ok(n),
        }
    };
    let header_bytes = file
        .max_header_bytes
        .map_or(defaults.max_header_bytes, |s| s.0 as usize);
    if header_bytes < 1024 {
        bail!("limits.max_header_bytes must be at least 1KiB");
    }
    Ok(Limits {
        max_connections: positive(
            "max connections",
            cli.max_connections.or(file.max_connections),
            defaults.max_connections,
        )?,
        max_uploads: positive(
            "max uploads",
            cli.max_uploads.or(file.max_uploads),
            defaults.max_uploads,
        )?,
        max_header_bytes: header_bytes,
        max_headers: positive("limits.max_headers", file.max_headers, defaults.max_headers)?,
        // An Interval is never zero, which would disable a limit by accident.
        header_timeout: or_default(
            cli.header_timeout.or(file.header_timeout),
            defaults.header_timeout,
        ),
        idle_timeout: or_default(
            cli.idle_timeout.or(file.idle_timeout),
            defaults.idle_timeout,
        ),
    })
}

fn resolve_git(
    cli: &Cli,
    file: GitSection,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<GitSettings>> {
    // Flags and the environment replace the file's list rather than add to it, like every
    // other setting: what an operator passes on the command line is the whole list.
    let allow: Vec<String> = if cli.git_allow.is_empty() {
        file.allow
    } else {
        cli.git_allow.clone()
    };
    let allow: Vec<String> = allow
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if allow.is_empty() {
        return Ok(None);
    }
    larder_git::AllowList::new(&allow)?;
    Ok(Some(GitSettings {
        allow,
        mirror_dir: cli
            .git_mirror_dir
            .clone()
            .or(file.mirror_dir)
            .unwrap_or_else(|| data_dir.join("git-mirrors")),
        mirror_limit: cli.git_mirror_limit.or(file.mirror_limit).map(|s| s.0),
        keep: match cli.git_keep.or(file.keep).unwrap_or(DEFAULT_GIT_KEEP) {
            // The snapshot the head record names is always kept.
            0 => bail!("git keep must be at least 1"),
            n => n,
        },
        interval: or_default(cli.git_interval.or(file.interval), DEFAULT_GIT_INTERVAL),
        idle_after: or_default(
            cli.git_idle_after.or(file.idle_after),
            DEFAULT_GIT_IDLE_AFTER,
        ),
        grace: or_default(cli.git_grace.or(file.grace), DEFAULT_GIT_GRACE),
        claim_ttl: or_default(cli.git_claim_ttl.or(file.claim_ttl), DEFAULT_GIT_CLAIM_TTL),
        public_url: cli
            .git_public_url
            .clone()
            .or(file.public_url)
            .map(|u| public_url(&u))
            .transpose()?,
    }))
}

fn resolve_bazel(cli: &Cli, file: BazelSection) -> anyhow::Result<BazelSettings> {
    // As for --git-allow: what the command line gives is the whole list.
    let patterns: Vec<String> = if cli.bazel_unchecked_namespaces.is_empty() {
        file.unchecked_namespaces
    } else {
        cli.bazel_unchecked_namespaces.clone()
    };
    let patterns: Vec<&str> = patterns
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect();
    let unchecked_namespaces = NamespacePatterns::new(&patterns)
        .map_err(|e| anyhow::anyhow!("bazel unchecked namespaces: {e}"))?;
    let max_action_result_size = cli
        .bazel_max_action_result_size
        .or(file.max_action_result_size)
        .map_or(DEFAULT_BAZEL_MAX_ACTION_RESULT_SIZE, |s| s.0);
    if max_action_result_size < 1024 {
        bail!("bazel max action result size must be at least 1KiB");
    }
    Ok(BazelSettings {
        unchecked_namespaces,
        max_action_result_size,
    })
}

/// Checks a `--git-public-url`: `http` or `https`, a host, nothing git could not take as part
/// of a bundle URI; returned without a trailing `/`.
fn public_url(raw: &str) -> anyhow::Result<String> {
    let url = raw.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            anyhow::anyhow!("git public url {raw:?} must start with http:// or https://")
        })?;
    if rest.is_empty()
        || rest.starts_with('/')
        || url
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "\"\\;#?".contains(c))
    {
        bail!("git public url {raw:?} must be an absolute URL with a host and no query");
    }
    Ok(url.to_string())
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn resolve_s3(cli: &Cli, file: S3Section) -> anyhow::Result<Option<S3Settings>> {
    let Some(bucket) = cli.s3_bucket.clone().or(file.bucket) else {
        return Ok(None);
    };
    let mut tier = larder_tier::S3Config::new(bucket);
    tier.endpoint = cli
        .s3_endpoint
        .clone()
        .or_else(|| env_var("AWS_ENDPOINT_URL"))
        .or(file.endpoint);
    tier.allow_http = tier
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    if let Some(region) = cli
        .s3_region
        .clone()
        .or_else(|| env_var("AWS_DEFAULT_REGION"))
        .or(file.region)
    {
        tier.region = region;
    }
    tier.prefix = cli.s3_prefix.clone().or(file.prefix).unwrap_or_default();
    tier.access_key_id = env_var("AWS_ACCESS_KEY_ID").or(file.access_key_id);
    tier.secret_access_key = env_var("AWS_SECRET_ACCESS_KEY").or(file.secret_access_key);
    tier.session_token = env_var("AWS_SESSION_TOKEN");
    tier.virtual_hosted_style = file.virtual_hosted_style.unwrap_or(false);
    if let Some(part) = file.part_size {
        tier.part_size = part.0 as usize;
    }
    if let Some(part) = file.read_part_size {
        tier.read_part_size = part.0;
    }
    if let Some(max) = file.inline_body_max {
        tier.inline_body_max = usize::try_from(max.0).unwrap_or(usize::MAX);
    }
    if let Some(n) = file.read_concurrency {
        tier.read_concurrency = n;
    }
    tier.request_timeout = or_default(file.request_timeout, tier.request_timeout);
    tier.metadata_timeout = or_default(file.metadata_timeout, tier.metadata_timeout);
    Ok(Some(S3Settings {
        tier,
        revalidate_after: or_default(
            cli.revalidate_after.or(file.revalidate_after),
            DEFAULT_REVALIDATE_AFTER,
        ),
        reap_grace: or_default(cli.s3_reap_grace.or(file.reap_grace), DEFAULT_S3_REAP_GRACE),
        reap_interval: or_default(file.reap_interval, DEFAULT_S3_REAP_INTERVAL),
    }))
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
        assert!(c.disk_direct_writes);
        assert_eq!(c.disk_memory_cache, 16 << 20);
        assert_eq!(c.disk_open_files, None);
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let toml = "listen = \"127.0.0.1:9999\"\nmax_ttl = \"2d\"\nmax_object_size = 1000\n[disk]\ndir = \"/var/cache/larder\"\nlimit = \"50GiB\"\ndirect_writes = false\nmemory_cache = \"1GiB\"\nopen_files = 100\n";
        let c = with_file(toml, Cli::default()).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.max_ttl, Duration::from_secs(2 * 86400));
        assert_eq!(c.max_object_size, 1000);
        assert_eq!(c.disk_limit, Some(50 << 30));
        assert!(!c.disk_direct_writes);
        assert_eq!(c.disk_memory_cache, 1 << 30);
        assert_eq!(c.disk_open_files, Some(100));
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
        // Sizes and durations are refused where they are read, naming the flag or the key.
        let e = command()
            .try_get_matches_from(["larderd", "--disk-limit", "lots"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--disk-limit") && e.contains("invalid size \"lots\""),
            "{e}"
        );
        let e = with_file("[disk]\nlimit = \"lots\"\n", Cli::default()).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("limit") && e.contains("invalid size \"lots\""),
            "{e}"
        );
        let e = Config::resolve(Cli {
            listen: Some("localhost".into()),
            ..Cli::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("listen address"), "{e}");
    }

    #[test]
    fn s3_settings_come_from_the_file_and_flags() {
        let toml = "[s3]\nbucket = \"cache\"\nendpoint = \"http://127.0.0.1:9000\"\nprefix = \"larder\"\nrevalidate_after = \"10s\"\nread_part_size = \"16MiB\"\ninline_body_max = \"4KiB\"\nmetadata_timeout = \"20s\"\nrequest_timeout = \"2m\"\n";
        let c = with_file(toml, Cli::default()).unwrap();
        let s3 = c.s3.unwrap();
        assert_eq!(s3.tier.bucket, "cache");
        assert_eq!(s3.tier.prefix, "larder");
        assert!(s3.tier.allow_http);
        assert_eq!(s3.revalidate_after, Duration::from_secs(10));
        assert_eq!(s3.tier.read_part_size, 16 << 20);
        assert_eq!(s3.tier.inline_body_max, 4 << 10);
        assert_eq!(s3.tier.metadata_timeout, Duration::from_secs(20));
        assert_eq!(s3.tier.request_timeout, Duration::from_secs(120));
        let c = with_file(
            toml,
            Cli {
                s3_bucket: Some("other".into()),
                ..Cli::default()
            },
        )
        .unwrap();
        assert_eq!(c.s3.unwrap().tier.bucket, "other");
        assert!(
            Config::resolve(Cli::default()).unwrap().s3.is_none(),
            "no bucket, no S3 tier"
        );
    }

    #[test]
    fn tokens_limits_and_tls_come_from_the_file() {
        let digest = crate::auth::token_digest_hex("s3cret");
        let toml = format!(
            "public_metrics = false\n\
             [[tokens]]\nname = \"ci\"\nsha256 = \"{digest}\"\nscopes = [\"read\", \"write\"]\nnamespaces = [\"ci-*\"]\n\
             [limits]\nmax_connections = 10\nmax_header_bytes = \"8KiB\"\nheader_timeout = \"5s\"\n\
             [tls]\ncert = \"/etc/larder/cert.pem\"\nkey = \"/etc/larder/key.pem\"\n"
        );
        let c = with_file(&toml, Cli::default()).unwrap();
        assert!(c.auth.enabled());
        assert!(!c.auth.public_metrics);
        assert_eq!(c.limits.max_connections, 10);
        assert_eq!(c.limits.max_header_bytes, 8192);
        assert_eq!(c.limits.header_timeout, Duration::from_secs(5));
        assert_eq!(c.limits.max_uploads, Limits::default().max_uploads);
        assert_eq!(c.tls.unwrap().key, PathBuf::from("/etc/larder/key.pem"));
        let c = with_file(
            &toml,
            Cli {
                max_connections: Some(20),
                ..Cli::default()
            },
        )
        .unwrap();
        assert_eq!(c.limits.max_connections, 20);
    }

    #[test]
    fn a_reload_names_the_settings_only_a_restart_applies() {
        let digest = crate::auth::token_digest_hex("s3cret");
        let tokens =
            format!("[[tokens]]\nname = \"ci\"\nsha256 = \"{digest}\"\nscopes = [\"read\"]\n");
        let running = with_file(
            "max_ttl = \"2d\"\n[limits]\nmax_uploads = 8\n",
            Cli::default(),
        )
        .unwrap();
        // Tokens and public_metrics are what a reload applies: nothing to report.
        let same = with_file(
            &format!(
                "max_ttl = \"2d\"\npublic_metrics = false\n[limits]\nmax_uploads = 8\n{tokens}"
            ),
            Cli::default(),
        )
        .unwrap();
        assert_eq!(running.restart_only_changes(&same), Vec::<&str>::new());
        let changed = with_file(
            "max_ttl = \"3d\"\n[limits]\nmax_uploads = 9\n[s3]\nbucket = \"b\"\n",
            Cli::default(),
        )
        .unwrap();
        assert_eq!(
            running.restart_only_changes(&changed),
            ["max_ttl", "[s3]", "[limits]"]
        );
        // A new secret alone, which the settings' Debug form does not show (set here, not in
        // a file: AWS_SECRET_ACCESS_KEY in the environment would win over the file).
        let first = with_file("[s3]\nbucket = \"b\"\n", Cli::default()).unwrap();
        let mut second = first.clone();
        second.s3.as_mut().unwrap().tier.secret_access_key = Some("another".into());
        assert_eq!(first.restart_only_changes(&first), Vec::<&str>::new());
        assert_eq!(first.restart_only_changes(&second), ["[s3]"]);
    }

    #[test]
    fn bad_auth_limits_and_tls_settings_are_refused() {
        for (toml, expect) in [
            (
                "[[tokens]]\nname = \"a\"\nsha256 = \"abc\"\nscopes = [\"read\"]\n",
                "sha256",
            ),
            (
                "[[tokens]]\nname = \"a\"\ntoken = \"plain\"\nscopes = [\"read\"]\n",
                "unknown field",
            ),
            ("[limits]\nmax_connections = 0\n", "at least 1"),
            ("[limits]\nidle_timeout = \"0s\"\n", "must be positive"),
            ("[tls]\ncert = \"c.pem\"\n", "--tls-key"),
        ] {
            let e = with_file(toml, Cli::default()).unwrap_err();
            assert!(format!("{e:#}").contains(expect), "{toml}: {e:#}");
        }
    }

    #[test]
    fn git_settings_come_from_the_file_flags_and_defaults() {
        assert!(
            Config::resolve(Cli::default()).unwrap().git.is_none(),
            "no pattern, no git feature"
        );
        let toml = "[disk]\ndir = \"/srv/larder\"\n[git]\nallow = [\"https://github.com/acme/*\", \"https://github.com/acme/secret-*=git-secret\"]\ninterval = \"1m\"\nmirror_limit = \"20GiB\"\n";
        let git = with_file(toml, Cli::default()).unwrap().git.unwrap();
        assert_eq!(git.allow.len(), 2);
        assert_eq!(git.interval, Duration::from_secs(60));
        assert_eq!(git.idle_after, DEFAULT_GIT_IDLE_AFTER);
        assert_eq!(git.mirror_dir, PathBuf::from("/srv/larder/git-mirrors"));
        assert_eq!(git.mirror_limit, Some(20 << 30));
        assert_eq!(git.keep, DEFAULT_GIT_KEEP);
        assert_eq!(git.grace, DEFAULT_GIT_GRACE);
        assert_eq!(git.claim_ttl, DEFAULT_GIT_CLAIM_TTL);
        assert_eq!(git.public_url, None);
        let toml = format!(
            "{toml}grace = \"30s\"\nclaim_ttl = \"2m\"\npublic_url = \"https://larder.example:8443/\"\n"
        );
        let git = with_file(&toml, Cli::default()).unwrap().git.unwrap();
        assert_eq!(git.grace, Duration::from_secs(30));
        assert_eq!(git.claim_ttl, Duration::from_secs(120));
        assert_eq!(
            git.public_url.as_deref(),
            Some("https://larder.example:8443"),
            "without the trailing slash"
        );
        let git = with_file(
            &toml,
            Cli {
                git_allow: vec!["http://127.0.0.1:*/**".into()],
                git_mirror_dir: Some("/tmp/m".into()),
                git_idle_after: Some("1h".parse().unwrap()),
                git_keep: Some(5),
                git_grace: Some("1s".parse().unwrap()),
                git_claim_ttl: Some("3s".parse().unwrap()),
                git_public_url: Some("http://10.0.0.1".into()),
                ..Cli::default()
            },
        )
        .unwrap()
        .git
        .unwrap();
        assert_eq!(git.allow, vec!["http://127.0.0.1:*/**".to_string()]);
        assert_eq!(git.mirror_dir, PathBuf::from("/tmp/m"));
        assert_eq!(git.idle_after, Duration::from_secs(3600));
        assert_eq!(git.keep, 5);
        assert_eq!(git.interval, Duration::from_secs(60));
        assert_eq!(git.grace, Duration::from_secs(1));
        assert_eq!(git.claim_ttl, Duration::from_secs(3));
        assert_eq!(git.public_url.as_deref(), Some("http://10.0.0.1"));
    }

    #[test]
    fn bad_git_settings_are_refused_in_one_line() {
        for (toml, expect) in [
            ("[git]\nallow = [\"ftp://x/*\"]\n", "--git-allow pattern"),
            (
                "[git]\nallow = [\"https://x/*=Bad Name\"]\n",
                "--git-allow pattern",
            ),
            (
                "[git]\nallow = [\"https://x/*\"]\ninterval = \"often\"\n",
                "invalid duration \"often\"",
            ),
            ("[git]\nallow = [\"https://x/*\"]\nkeep = 0\n", "at least 1"),
            (
                "[git]\nallow = [\"https://x/*\"]\nmirror_limit = \"big\"\n",
                "invalid size \"big\"",
            ),
            (
                "[git]\nallow = [\"https://x/*\"]\ngrace = \"soon\"\n",
                "invalid duration \"soon\"",
            ),
            (
                "[git]\nallow = [\"https://x/*\"]\nclaim_ttl = \"0s\"\n",
                "invalid duration \"0s\": must be positive",
            ),
            (
                "[git]\nallow = [\"https://x/*\"]\npublic_url = \"larder.example\"\n",
                "http:// or https://",
            ),
            (
                "[git]\nallow = [\"https://x/*\"]\npublic_url = \"https://a b\"\n",
                "absolute URL",
            ),
        ] {
            let e = with_file(toml, Cli::default()).unwrap_err();
            let text = format!("{e:#}");
            assert!(text.contains(expect), "{toml}: {text}");
        }
        let e = Config::resolve(Cli {
            git_allow: vec!["github.com/*".into()],
            ..Cli::default()
        })
        .unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn bazel_settings_come_from_the_file_flags_and_defaults() {
        let ns = |s: &str| larder_proto::Namespace::parse(s).unwrap();
        let c = Config::resolve(Cli::default()).unwrap();
        assert!(
            c.bazel.checks_action_results(&ns("ccache")),
            "checked by default"
        );
        assert_eq!(
            c.bazel.max_action_result_size,
            DEFAULT_BAZEL_MAX_ACTION_RESULT_SIZE
        );
        let toml =
            "[bazel]\nunchecked_namespaces = [\"ccache*\"]\nmax_action_result_size = \"64KiB\"\n";
        let c = with_file(toml, Cli::default()).unwrap();
        assert!(!c.bazel.checks_action_results(&ns("ccache")));
        assert!(!c.bazel.checks_action_results(&ns("ccache-linux")));
        assert!(c.bazel.checks_action_results(&ns("bazel")));
        assert_eq!(c.bazel.max_action_result_size, 64 << 10);
        let flags = command()
            .try_get_matches_from([
                "larderd",
                "--bazel-unchecked-namespace",
                "cc-a,cc-b",
                "--bazel-unchecked-namespace",
                "tools-*",
                "--bazel-max-action-result-size",
                "2MiB",
            ])
            .unwrap();
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&flags).unwrap();
        let c = with_file(toml, cli).unwrap();
        assert!(
            c.bazel.checks_action_results(&ns("ccache")),
            "the flags replace the file's list"
        );
        for unchecked in ["cc-a", "cc-b", "tools-x"] {
            assert!(
                !c.bazel.checks_action_results(&ns(unchecked)),
                "{unchecked}"
            );
        }
        assert_eq!(c.bazel.max_action_result_size, 2 << 20);
        for (toml, expect) in [
            (
                "[bazel]\nunchecked_namespaces = [\"a[\"]\n",
                "namespace pattern \"a[\"",
            ),
            ("[bazel]\nmax_action_result_size = 10\n", "at least 1KiB"),
            ("[bazel]\nunchecked = [\"x\"]\n", "unknown field"),
        ] {
            let e = with_file(toml, Cli::default()).unwrap_err();
            let text = format!("{e:#}");
            assert!(text.contains(expect), "{toml}: {text}");
        }
    }

    #[test]
    fn help_shows_the_defaults_that_apply() {
        let help = command().render_long_help().to_string();
        let defaults = Config::resolve(Cli::default()).unwrap();
        for shown in [
            format!("[default: {}]", Interval(defaults.max_ttl)),
            format!("[default: {}]", ByteSize(defaults.max_object_size)),
            format!("[default: {}]", Interval(defaults.limits.idle_timeout)),
            format!("[default: {}]", defaults.limits.max_uploads),
            "[default: 7d]".to_string(),
            "[default: 100GiB]".to_string(),
            format!(
                "[default: {}]",
                ByteSize(defaults.bazel.max_action_result_size)
            ),
        ] {
            assert!(help.contains(&shown), "{shown} missing from --help");
        }
        let flags = command()
            .try_get_matches_from(["larderd", "--max-ttl", "2h", "--log-format", "json"])
            .unwrap();
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&flags).unwrap();
        let c = Config::resolve(cli).unwrap();
        assert_eq!(c.max_ttl, Duration::from_secs(7200));
        assert_eq!(c.log_format, LogFormat::Json);
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
