//! `larder`, the command-line client of larderd.
//!
//! This file is only wiring: it parses arguments, validates them locally (so a typo costs no
//! request), calls the client library and formats results. Data goes to stdout, status lines to
//! stderr (silenced by `--quiet`), errors always to stderr. Exit status: 0 success, 2 object not
//! found, 1 anything else — including usage errors, which clap would otherwise report as 2 and
//! make indistinguishable from a cache miss.

use clap::{Parser, Subcommand};
use larder_client::{Client, ETag, Error, ObjectInfo, ObjectName, Precondition, PutOptions};
use larder_proto::units::{format_size, parse_duration};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "larder",
    version,
    about = "Store and fetch CI artifacts in a larder cache"
)]
struct Cli {
    /// larderd server URL.
    #[arg(
        long,
        env = "LARDER_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,

    /// Print nothing but data and errors.
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
        /// Only create: fail if NS/KEY already exists.
        #[arg(long, conflicts_with = "if_match")]
        if_none_match: bool,
        /// Only replace the revision with this ETag (compare-and-swap).
        #[arg(long, value_name = "ETAG")]
        if_match: Option<String>,
        /// Time to live, e.g. 30m, 12h, 7d (the server caps it).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Content-Type to store and serve with the object.
        #[arg(long, value_name = "TYPE")]
        content_type: Option<String>,
    },
    /// Download NS/KEY, verified against its ETag.
    Get {
        #[command(flatten)]
        target: Target,
        /// Output file, replaced only after a verified download; `-` or absent is stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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

async fn run(cli: Cli) -> Result<(), Error> {
    let quiet = cli.quiet;
    // Validate every argument before connecting, so a bad name never reaches the network.
    match cli.command {
        Command::Put {
            target,
            file,
            if_none_match,
            if_match,
            ttl,
            content_type,
        } => {
            let name = target.name()?;
            let precondition = match (if_none_match, if_match) {
                (true, _) => Precondition::CreateOnly,
                (false, Some(e)) => Precondition::IfMatch(parse_etag(&e)?),
                (false, None) => Precondition::None,
            };
            let ttl = ttl
                .map(|t| parse_duration(&t).map_err(|e| Error::InvalidInput(format!("--ttl: {e}"))))
                .transpose()?;
            let opts = PutOptions {
                precondition,
                ttl,
                content_type,
            };
            let client = Client::new(&cli.url)?;
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
            write_stdout(&format!("{}\n", put.etag.as_str()))?;
            let how = if put.created { "new" } else { "replaced" };
            status(
                quiet,
                format_args!("stored {name}: {} ({how})", format_size(put.size)),
            );
        }
        Command::Get { target, output } => {
            let name = target.name()?;
            let client = Client::new(&cli.url)?;
            match output.filter(|o| o.as_os_str() != "-") {
                Some(path) => {
                    let info = client.get_to_file(&name, &path).await?;
                    status(
                        quiet,
                        format_args!(
                            "wrote {} from {name}: {}, verified",
                            path.display(),
                            format_size(info.size)
                        ),
                    );
                }
                None => {
                    client
                        .get_to_writer(&name, tokio::io::stdout(), "stdout")
                        .await?;
                }
            }
        }
        Command::Stat { target, json } => {
            let name = target.name()?;
            let info = Client::new(&cli.url)?.stat(&name).await?;
            print_stat(&name, &info, json)?;
        }
        Command::Rm { target } => {
            let name = target.name()?;
            Client::new(&cli.url)?.delete(&name).await?;
            status(quiet, format_args!("removed {name}"));
        }
        Command::Ls { json } => {
            let list = Client::new(&cli.url)?.namespaces().await?;
            if json {
                let v = serde_json::json!({ "namespaces": list });
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
