//! `larder`, the command-line client of larderd.
//!
//! This file is only wiring: it parses arguments, validates them locally (so a typo costs no
//! request), calls the client library and formats results. Data (objects, ETags, `--json`
//! summaries) goes to stdout; progress bars (only when stderr is a terminal) and status lines go
//! to stderr, both silenced by `--quiet`; errors always go to stderr. Exit status: 0 success,
//! 2 object not found, 3 refused by access control (401/403), 1 anything else — including usage
//! errors, which clap would otherwise report as 2 and make indistinguishable from a cache miss.
//!
//! `--url` may be given before and after the subcommand and all of them count. clap's global
//! arguments would let the later occurrence replace the earlier, so the subcommands get their
//! own `--url` (added in [`command`]) and the two lists are joined after parsing.

mod terminal;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand};
use larder_client::{
    Client, Connection, DownloadOptions, DownloadSummary, Downloader, ETag, Error,
    GitRestoreOptions, LoadedConnection, ObjectInfo, ObjectName, Precondition, Progress,
    PutOptions, RestoreOptions, SaveOptions, Token,
};
use larder_git::CommitId;
use larder_proto::units::{format_size, parse_duration, parse_size};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "larder",
    version,
    about = "Store and fetch CI artifacts in a larder cache",
    after_help = EXIT_STATUS
)]
struct Cli {
    /// larderd server URL (http:// or https://). Repeat it (or give a comma-separated list) to
    /// spread downloads (`get`, `restore`) over replicas; other commands use the first.
    #[arg(
        long,
        env = "LARDER_URL",
        default_value = "http://127.0.0.1:8080",
        value_delimiter = ','
    )]
    url: Vec<String>,

    /// Bearer token sent with every request, for a larderd with access control. Prefer
    /// LARDER_TOKEN: other users of the machine can read command lines.
    #[arg(
        long,
        env = "LARDER_TOKEN",
        hide_env_values = true,
        global = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,

    /// PEM file of a CA to trust for https:// URLs, in addition to the system's CAs.
    #[arg(long, env = "LARDER_CA_CERT", global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,

    /// Print nothing but data and errors (no progress bar, no status lines).
    #[arg(long, short, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upload FILE (or stdin) as NS/KEY and print its ETag.
    Put {
        #[command(flatten)]
        target: Target,
        /// File to upload; `-` or absent reads stdin.
        file: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
        /// Content-Type to store and serve with the object.
        #[arg(long, value_name = "TYPE")]
        content_type: Option<String>,
        /// Print a JSON summary instead of the bare ETag.
        #[arg(long)]
        json: bool,
    },
    /// Download NS/KEY in parallel ranges, verified against its ETag.
    Get {
        #[command(flatten)]
        target: Target,
        /// Output file, replaced only after a verified download; `-` or absent is stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        download: DownloadArgs,
        /// Print a JSON summary on stdout (needs -o FILE, since stdout otherwise carries the
        /// object).
        #[arg(long)]
        json: bool,
    },
    /// Archive DIR (or PATHs inside it) as tar + zstd and store it as NS/KEY.
    Save {
        #[command(flatten)]
        target: Target,
        /// Directory to snapshot.
        dir: PathBuf,
        /// Paths inside DIR to include (default: all of DIR).
        paths: Vec<PathBuf>,
        /// Leave out matching paths; repeatable. `*.o` or `node_modules` match at any depth,
        /// `build/tmp` only from DIR's top, a trailing `/` only directories.
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// zstd compression level, 1 (fast) to 19 (small).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// zstd worker threads (0: one per CPU).
        #[arg(long, default_value_t = 0)]
        threads: u32,
        #[command(flatten)]
        store: StoreArgs,
        /// Print a JSON summary instead of the bare ETag.
        #[arg(long)]
        json: bool,
    },
    /// Restore the snapshot NS/KEY into DIR, which appears only once complete and verified.
    Restore {
        #[command(flatten)]
        target: Target,
        /// Directory to create (or replace, with --force).
        dir: PathBuf,
        /// Replace DIR if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        download: DownloadArgs,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Git snapshots: restore a repository from the cache instead of cloning it.
    Git {
        #[command(subcommand)]
        command: GitCommand,
    },
    /// Show the ETag, size, modification time and content type of NS/KEY.
    Stat {
        #[command(flatten)]
        target: Target,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Delete NS/KEY (succeeds if it does not exist).
    #[command(alias = "delete")]
    Rm {
        #[command(flatten)]
        target: Target,
    },
    /// List namespaces with their object counts and sizes.
    Ls {
        /// Print the server's JSON list.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GitCommand {
    /// Restore the cache's snapshot of UPSTREAM into DIR (working tree and full history, as
    /// `git clone` leaves it), then fetch from UPSTREAM only what the snapshot lacks. Exit
    /// status 2 when the cache has no snapshot yet (it starts making one).
    Restore(GitArgs),
    /// Like `restore`, but run `git clone UPSTREAM DIR` when the cache cannot help (no
    /// snapshot yet, larderd unreachable or refusing), so that the step never fails because of
    /// the cache.
    Clone(GitArgs),
}

#[derive(clap::Args)]
struct GitArgs {
    /// Upstream repository URL, as for `git clone` (http:// or https://).
    upstream: String,
    /// Directory to create (or replace, with --force).
    dir: PathBuf,
    /// Check out this commit (detached), fetching it from UPSTREAM if the snapshot lacks it.
    #[arg(long, value_name = "SHA", conflicts_with = "git_ref")]
    commit: Option<String>,
    /// Check out this branch (tracking origin) or tag, fetching it if the snapshot lacks it.
    /// Default: the snapshot's branch (UPSTREAM's default branch) at the snapshot's commit.
    #[arg(long = "ref", value_name = "REF")]
    git_ref: Option<String>,
    /// Replace DIR if it exists.
    #[arg(long)]
    force: bool,
    /// The git program to run.
    #[arg(
        long,
        env = "LARDER_GIT",
        default_value = "git",
        value_name = "PROGRAM"
    )]
    git: PathBuf,
    #[command(flatten)]
    download: DownloadArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

/// The object an operation is about.
#[derive(clap::Args)]
struct Target {
    /// Namespace, e.g. `ci` (lowercase letters, digits, `_` and `-`).
    ns: String,
    /// Key, e.g. `linux/build.tar.zst` (letters, digits, `._~-` and `/`).
    key: String,
}

impl Target {
    fn name(&self) -> Result<ObjectName, Error> {
        ObjectName::parse(&self.ns, &self.key)
    }
}

/// How an upload may replace what is stored.
#[derive(clap::Args)]
struct StoreArgs {
    /// Only create: fail if NS/KEY already exists.
    #[arg(long, conflicts_with = "if_match")]
    if_none_match: bool,
    /// Only replace the revision with this ETag (compare-and-swap).
    #[arg(long, value_name = "ETAG")]
    if_match: Option<String>,
    /// Time to live, e.g. 30m, 12h, 7d (the server caps it).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
}

impl StoreArgs {
    fn options(&self, progress: Progress) -> Result<PutOptions, Error> {
        let precondition = match (self.if_none_match, &self.if_match) {
            (true, _) => Precondition::CreateOnly,
            (false, Some(e)) => Precondition::IfMatch(parse_etag(e)?),
            (false, None) => Precondition::None,
        };
        let ttl = self
            .ttl
            .as_deref()
            .map(|t| parse_duration(t).map_err(|e| Error::InvalidInput(format!("--ttl: {e}"))))
            .transpose()?;
        Ok(PutOptions {
            precondition,
            ttl,
            content_type: None,
            progress,
        })
    }
}

/// Tuning of parallel downloads.
#[derive(clap::Args)]
struct DownloadArgs {
    /// Ranges in flight at once, over all --url replicas.
    #[arg(long, env = "LARDER_CONCURRENCY", default_value_t = larder_client::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Bytes per range request, e.g. 8MiB.
    #[arg(
        long,
        env = "LARDER_CHUNK_SIZE",
        default_value = "8MiB",
        value_name = "SIZE"
    )]
    chunk_size: String,
    /// Give up on a response that sends nothing for this long, and retry it.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    idle_timeout: String,
    /// Retries per range after transient failures (resets, 5xx, stalls).
    #[arg(long, default_value_t = larder_client::DEFAULT_RETRIES)]
    retries: u32,
    /// Do not flush the file or restored tree to disk before placing it. Faster (a large
    /// restore takes 30–50 % less time); after a power loss it may then be visible with data
    /// missing. For disks that do not outlive the machine, such as ephemeral CI runners.
    #[arg(long, env = "LARDER_NO_SYNC", value_parser = clap::builder::BoolishValueParser::new())]
    no_sync: bool,
}

impl DownloadArgs {
    fn options(&self, progress: Progress) -> Result<DownloadOptions, Error> {
        let chunk_size = parse_size(&self.chunk_size)
            .map_err(|e| Error::InvalidInput(format!("--chunk-size: {e}")))?;
        let idle_timeout = parse_duration(&self.idle_timeout)
            .map_err(|e| Error::InvalidInput(format!("--idle-timeout: {e}")))?;
        Ok(DownloadOptions {
            concurrency: self.concurrency,
            chunk_size,
            idle_timeout,
            retries: self.retries,
            sync: !self.no_sync,
            progress,
            ..DownloadOptions::default()
        })
    }
}

const EXIT_STATUS: &str = "\
Exit status:
  0  success
  1  error (usage, network, server, verification)
  2  the object or snapshot does not exist
  3  refused by the server's access control: 401 (no token, or one the server does not know)
     or 403 (the token's scopes do not cover the namespace or operation)";

/// The id of the `--url` given after the subcommand.
const URL_AFTER: &str = "url_after_command";

/// The CLI, with a `--url` on every subcommand so that URLs after the subcommand add to those
/// before it.
fn command() -> clap::Command {
    fn with_url(sub: clap::Command) -> clap::Command {
        let sub = sub.mut_subcommands(with_url);
        sub.arg(
            Arg::new(URL_AFTER)
                .long("url")
                .value_name("URL")
                .value_delimiter(',')
                .action(ArgAction::Append)
                .help(
                    "larderd server URL; adds to any --url before the subcommand (and replaces \
                     LARDER_URL)",
                ),
        )
    }
    Cli::command().mut_subcommands(with_url)
}

fn parse() -> Result<Cli, clap::Error> {
    let mut matches = command().try_get_matches()?;
    // From every level of subcommand (`larder git --url A restore --url B`).
    let mut after: Vec<String> = Vec::new();
    let mut level = matches.subcommand();
    while let Some((_, sub)) = level {
        after.extend(
            sub.get_many::<String>(URL_AFTER)
                .into_iter()
                .flatten()
                .cloned(),
        );
        level = sub.subcommand();
    }
    let before_given = matches.value_source("url") == Some(ValueSource::CommandLine);
    let mut cli = Cli::from_arg_matches_mut(&mut matches)?;
    if !after.is_empty() {
        // LARDER_URL and the default stand in only when no --url was given at all.
        if !before_given {
            cli.url.clear();
        }
        cli.url.extend(after);
    }
    Ok(cli)
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Every URL, validated, so a typo in the third replica is reported before any transfer.
fn clients(urls: &[String], conn: &LoadedConnection) -> Result<Vec<Client>, Error> {
    let clients: Vec<Client> = urls
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(|u| Client::with_connection(u, conn))
        .collect::<Result<_, _>>()?;
    if clients.is_empty() {
        return Err(Error::InvalidInput(
            "no server URL: set --url or LARDER_URL".into(),
        ));
    }
    Ok(clients)
}

async fn run(cli: Cli) -> Result<(), Error> {
    let quiet = cli.quiet;
    let conn = Connection {
        // An empty LARDER_TOKEN (a CI secret that is not set) means no token.
        token: cli
            .token
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .map(Token::new)
            .transpose()?,
        ca_certs: cli.ca_cert.iter().cloned().collect(),
    }
    .load()?;
    // A bar only for a person watching; notes (restarts, skipped files) unless --quiet.
    let progress = terminal::stderr(!quiet && std::io::stderr().is_terminal(), !quiet);
    // Validate every argument before connecting, so a bad name never reaches the network.
    match cli.command {
        Command::Put {
            target,
            file,
            store,
            content_type,
            json,
        } => {
            let name = target.name()?;
            let mut opts = store.options(progress)?;
            opts.content_type = content_type;
            let client = clients(&cli.url, &conn)?.swap_remove(0);
            let put = match file.filter(|f| f.as_os_str() != "-") {
                Some(path) => client.put_file(&name, &path, &opts).await?,
                None => {
                    let stdin = std::io::stdin();
                    if stdin.is_terminal() && !quiet {
                        eprintln!("reading the object from stdin (end with Ctrl-D)");
                    }
                    client
                        .put_reader(&name, tokio::io::stdin(), None, "stdin", &opts)
                        .await?
                }
            };
            if json {
                let v = json!({
                    "namespace": name.ns.as_str(),
                    "key": name.key.as_str(),
                    "etag": put.etag.as_str(),
                    "size": put.size,
                    "created": put.created,
                });
                write_stdout(&format!("{v}\n"))?;
            } else {
                write_stdout(&format!("{}\n", put.etag.as_str()))?;
            }
            let how = if put.created { "new" } else { "replaced" };
            status(
                quiet,
                format_args!("stored {name}: {} ({how})", format_size(put.size)),
            );
        }
        Command::Get {
            target,
            output,
            download,
            json,
        } => {
            let name = target.name()?;
            let output = output.filter(|o| o.as_os_str() != "-");
            if json && output.is_none() {
                return Err(Error::InvalidInput(
                    "--json needs -o FILE: without it stdout carries the object".into(),
                ));
            }
            let opts = download.options(progress.clone())?;
            let downloader = Downloader::new(clients(&cli.url, &conn)?, opts)?;
            match output {
                Some(path) => {
                    let summary = downloader.download_to_file(&name, &path).await?;
                    progress.finish();
                    let dest = path.display().to_string();
                    if json {
                        write_stdout(&format!("{}\n", download_json(&name, &dest, &summary)))?;
                    }
                    status(
                        quiet,
                        format_args!(
                            "wrote {dest} from {name}: {}, verified",
                            rate(summary.info.size, summary.elapsed, summary.restarts)
                        ),
                    );
                }
                None => {
                    downloader
                        .download_to_writer(&name, std::io::stdout(), "stdout")
                        .await?;
                    progress.finish();
                }
            }
        }
        Command::Save {
            target,
            dir,
            paths,
            exclude,
            level,
            threads,
            store,
            json,
        } => {
            let name = target.name()?;
            let opts = SaveOptions {
                paths,
                exclude,
                level,
                threads,
                put: store.options(Progress::hidden())?,
                progress: progress.clone(),
            };
            let client = clients(&cli.url, &conn)?.swap_remove(0);
            let saved = client.save(&name, &dir, &opts).await?;
            if json {
                let v = json!({
                    "namespace": name.ns.as_str(),
                    "key": name.key.as_str(),
                    "etag": saved.put.etag.as_str(),
                    "archive_size": saved.put.size,
                    "input_bytes": saved.input_bytes,
                    "files": saved.files,
                    "dirs": saved.dirs,
                    "symlinks": saved.symlinks,
                    "skipped": saved.skipped,
                    "created": saved.put.created,
                });
                write_stdout(&format!("{v}\n"))?;
            } else {
                write_stdout(&format!("{}\n", saved.put.etag.as_str()))?;
            }
            status(
                quiet,
                format_args!(
                    "saved {} as {name}: {} files, {} dirs, {} symlinks, {} in a {} archive",
                    dir.display(),
                    saved.files,
                    saved.dirs,
                    saved.symlinks,
                    format_size(saved.input_bytes),
                    format_size(saved.put.size),
                ),
            );
        }
        Command::Restore {
            target,
            dir,
            force,
            download,
            json,
        } => {
            let name = target.name()?;
            let opts = download.options(progress.clone())?;
            let downloader = Downloader::new(clients(&cli.url, &conn)?, opts)?;
            let restored = downloader
                .restore(
                    &name,
                    &dir,
                    &RestoreOptions {
                        force,
                        ..RestoreOptions::default()
                    },
                )
                .await?;
            progress.finish();
            if json {
                let mut v = download_json(&name, &dir.display().to_string(), &restored.download);
                v["files"] = json!(restored.files);
                v["dirs"] = json!(restored.dirs);
                v["symlinks"] = json!(restored.symlinks);
                v["hardlinks"] = json!(restored.hardlinks);
                v["bytes"] = json!(restored.bytes);
                write_stdout(&format!("{v}\n"))?;
            }
            status(
                quiet,
                format_args!(
                    "restored {name} into {}: {} files, {} dirs, {} symlinks, {} (archive {}), \
                     verified",
                    dir.display(),
                    restored.files,
                    restored.dirs,
                    restored.symlinks,
                    format_size(restored.bytes),
                    rate(
                        restored.download.info.size,
                        restored.download.elapsed,
                        restored.download.restarts
                    ),
                ),
            );
        }
        Command::Git { command } => {
            let (args, clone_on_miss) = match command {
                GitCommand::Restore(args) => (args, false),
                GitCommand::Clone(args) => (args, true),
            };
            git_restore(&cli.url, &conn, args, clone_on_miss, progress, quiet).await?;
        }
        Command::Stat { target, json } => {
            let name = target.name()?;
            let info = clients(&cli.url, &conn)?[0].stat(&name).await?;
            print_stat(&name, &info, json)?;
        }
        Command::Rm { target } => {
            let name = target.name()?;
            clients(&cli.url, &conn)?[0].delete(&name).await?;
            status(quiet, format_args!("removed {name}"));
        }
        Command::Ls { json } => {
            let list = clients(&cli.url, &conn)?[0].namespaces().await?;
            if json {
                let v = json!({ "namespaces": list });
                write_stdout(&format!("{v}\n"))?;
            } else {
                let rows: Vec<[String; 3]> = list
                    .iter()
                    .map(|n| [n.name.clone(), n.objects.to_string(), format_size(n.bytes)])
                    .collect();
                write_stdout(&table(["NAMESPACE", "OBJECTS", "SIZE"], &rows))?;
            }
        }
    }
    Ok(())
}

/// "1.2 GiB in 3.4 s (360 MiB/s)", plus the restarts if there were any.
fn rate(bytes: u64, elapsed: Duration, restarts: u32) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut s = format!(
        "{} in {secs:.1} s ({}/s)",
        format_size(bytes),
        format_size((bytes as f64 / secs) as u64)
    );
    if restarts > 0 {
        s.push_str(&format!(", after {restarts} restart(s) because it changed"));
    }
    s
}

fn download_json(name: &ObjectName, dest: &str, s: &DownloadSummary) -> serde_json::Value {
    let secs = s.elapsed.as_secs_f64();
    json!({
        "namespace": name.ns.as_str(),
        "key": name.key.as_str(),
        "path": dest,
        "etag": s.info.etag.as_str(),
        "size": s.info.size,
        "seconds": secs,
        "bytes_per_second": if secs > 0.0 { (s.info.size as f64 / secs) as u64 } else { 0 },
        "restarts": s.restarts,
        "retries": s.retries,
        "hedged": s.hedged,
        "hedges_won": s.hedges_won,
        "replicas": s.replicas.iter().map(|r| json!({
            "url": r.url,
            "bytes": r.bytes,
            "failures": r.failures,
            "diverged": r.diverged,
        })).collect::<Vec<_>>(),
    })
}

/// `larder git restore|clone`.
async fn git_restore(
    urls: &[String],
    conn: &LoadedConnection,
    args: GitArgs,
    clone_on_miss: bool,
    progress: Progress,
    quiet: bool,
) -> Result<(), Error> {
    let commit = args
        .commit
        .as_deref()
        .map(|c| {
            CommitId::parse(&c.to_ascii_lowercase()).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "--commit {c:?}: not a full commit id (40 or 64 hex digits)"
                ))
            })
        })
        .transpose()?;
    let opts = GitRestoreOptions {
        commit,
        git_ref: args.git_ref,
        force: args.force,
        git: Some(args.git),
    };
    larder_client::git::parse_upstream(&args.upstream)?;
    let started = std::time::Instant::now();
    let download = args.download.options(progress.clone())?;
    let restored = match clients(urls, conn).and_then(|c| Downloader::new(c, download)) {
        Ok(downloader) => {
            downloader
                .git_restore(&args.upstream, &args.dir, &opts)
                .await
        }
        Err(e) => Err(e),
    };
    progress.finish();
    let (summary, source) = match restored {
        Ok(summary) => (summary, "snapshot"),
        // Bad arguments or an existing DIR would fail a clone the same way; anything else the
        // cache did (a miss, a refusal, a failure of larderd or of its data) a clone avoids.
        Err(e) if clone_on_miss && !matches!(e, Error::InvalidInput(_)) => {
            status(
                quiet,
                format_args!("{e}; cloning {} instead", args.upstream),
            );
            let (url, dir) = (args.upstream.clone(), args.dir.clone());
            let cloned = tokio::task::spawn_blocking(move || {
                larder_client::git::clone_from_upstream(&url, &dir, &opts)
            })
            .await
            .map_err(|e| Error::Git(format!("the clone did not finish: {e}")))??;
            (cloned, "clone")
        }
        Err(e) => return Err(e),
    };
    let elapsed = started.elapsed();
    if args.json {
        let restore = summary.restore.as_ref();
        let v = json!({
            "upstream": args.upstream,
            "dir": args.dir.display().to_string(),
            "source": source,
            "snapshot_commit": summary.snapshot_commit.as_ref().map(|c| c.as_str()),
            "commit": summary.commit.as_str(),
            "branch": summary.branch,
            "fetched_from_upstream": summary.fetched_from_upstream,
            "fetched_from_bundles": summary.fetched_from_bundles,
            "files": restore.map(|r| r.files),
            "bytes": restore.map(|r| r.bytes),
            "archive_size": restore.map(|r| r.download.info.size),
            "seconds": elapsed.as_secs_f64(),
        });
        write_stdout(&format!("{v}\n"))?;
    }
    let at = match &summary.branch {
        Some(b) => format!("{b} at {}", summary.commit),
        None => format!("{} (detached)", summary.commit),
    };
    match &summary.restore {
        Some(r) => status(
            quiet,
            format_args!(
                "restored {} into {}: {at}, {} files, {} from a {} snapshot{} in {:.2} s",
                args.upstream,
                args.dir.display(),
                r.files,
                format_size(r.bytes),
                format_size(r.download.info.size),
                match (summary.fetched_from_bundles, summary.fetched_from_upstream) {
                    (_, true) => ", then fetched from the upstream",
                    (true, false) => ", then caught up from larder's bundles",
                    (false, false) => "",
                },
                elapsed.as_secs_f64()
            ),
        ),
        None => status(
            quiet,
            format_args!(
                "cloned {} into {}: {at} in {:.2} s",
                args.upstream,
                args.dir.display(),
                elapsed.as_secs_f64()
            ),
        ),
    }
    Ok(())
}

fn parse_etag(s: &str) -> Result<ETag, Error> {
    ETag::parse(s).ok_or_else(|| {
        Error::InvalidInput(format!(
            "invalid --if-match {s:?}: expected an ETag as printed by `larder put` or `larder stat` \
             (64 lowercase hex digits, optionally quoted)"
        ))
    })
}

fn status(quiet: bool, line: std::fmt::Arguments<'_>) {
    if !quiet {
        eprintln!("{line}");
    }
}

/// Like `print!`, but a closed stdout is an error rather than a panic.
fn write_stdout(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| Error::Io {
            context: "writing to stdout".into(),
            source,
        })
}

fn print_stat(name: &ObjectName, info: &ObjectInfo, json: bool) -> Result<(), Error> {
    let modified = info.last_modified.map(httpdate::fmt_http_date);
    let text = if json {
        let v = serde_json::json!({
            "namespace": name.ns.as_str(),
            "key": name.key.as_str(),
            "etag": info.etag.as_str(),
            "size": info.size,
            "last_modified": modified,
            "content_type": info.content_type,
        });
        format!("{v}\n")
    } else {
        format!(
            "etag:          {}\nsize:          {} ({})\nlast-modified: {}\ncontent-type:  {}\n",
            info.etag.as_str(),
            info.size,
            format_size(info.size),
            modified.as_deref().unwrap_or("-"),
            info.content_type.as_deref().unwrap_or("-"),
        )
    };
    write_stdout(&text)
}

/// Left-aligned text, right-aligned numbers, two spaces between columns.
fn table(header: [&str; 3], rows: &[[String; 3]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 3]| {
        out.push_str(&format!(
            "{:<w0$}  {:>w1$}  {:>w2$}\n",
            cells[0],
            cells[1],
            cells[2],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        ));
    };
    line(header);
    for row in rows {
        line([&row[0], &row[1], &row[2]]);
    }
    out
}
