//! SIGHUP: the token set re-read from the configuration file, and the TLS certificate from its
//! files, while the server runs, so that a token can be added, revoked or rotated and a renewed
//! certificate served without dropping a connection.
//!
//! The whole configuration is resolved again, as at start (flags and environment over the
//! file), and must pass every check start-up makes, the listener's exposure included; the
//! certificate and key must read and fit each other. Anything that fails changes nothing, and
//! is reported. Only `[[tokens]]`, `public_metrics` and the certificate take effect; any other
//! setting that changed is named in a warning, since it is read once, at start.

use crate::api::State;
use crate::auth;
use crate::config::{Cli, Config};
use crate::tls;
use rustls::sign::CertifiedKey;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};

/// Installs the SIGHUP handler (replacing the default action, which ends the process) and
/// reloads on every signal. `running` is the configuration the server started with, and
/// `certificate` what its TLS listener serves.
pub fn on_hangup(
    cli: Cli,
    running: Config,
    state: Arc<State>,
    certificate: Option<Arc<tls::Certificate>>,
) -> anyhow::Result<()> {
    let mut hangups = signal(SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reload(&cli, &running, &state, certificate.as_deref());
        }
    });
    Ok(())
}

fn reload(cli: &Cli, running: &Config, state: &State, certificate: Option<&tls::Certificate>) {
    if cli.config.is_none() && certificate.is_none() {
        tracing::warn!(
            "SIGHUP: nothing to reload, larderd was started without --config and without TLS"
        );
        metrics::counter!("larder_config_reloads_total", "result" => "refused").increment(1);
        return;
    }
    let file = cli
        .config
        .as_ref()
        .map_or("none".into(), |p| p.display().to_string());
    match resolve(cli, running) {
        Ok(Reloaded {
            config,
            certified_key,
            restart_only,
        }) => {
            let tokens = config.auth.token_count();
            state.auth.replace(config.auth);
            let certificate = match (certificate, certified_key, &running.tls) {
                (Some(serving), Some(key), Some(files)) => {
                    serving.replace(key);
                    format!(", certificate read again from {}", files.cert.display())
                }
                _ => String::new(),
            };
            metrics::counter!("larder_config_reloads_total", "result" => "applied").increment(1);
            tracing::info!(
                file,
                tokens,
                "SIGHUP: configuration reloaded, {tokens} tokens in force{certificate}"
            );
            if !restart_only.is_empty() {
                tracing::warn!(
                    file,
                    "SIGHUP: {} changed in the file and take effect at the next restart only",
                    restart_only.join(", ")
                );
            }
        }
        Err(e) => {
            metrics::counter!("larder_config_reloads_total", "result" => "refused").increment(1);
            tracing::error!(
                file,
                "SIGHUP: configuration not reloaded, the tokens and certificate in force are \
                 unchanged: {e:#}"
            );
        }
    }
}

/// What a reload puts in force, and what it cannot.
struct Reloaded {
    config: Config,
    /// Read from the files the listener started with (new paths need a restart).
    certified_key: Option<CertifiedKey>,
    /// The settings that changed but are read at start only.
    restart_only: Vec<&'static str>,
}

/// The configuration as the file now says, checked against the listener and the
/// `allow_anonymous` the server runs with, and the certificate as its files now hold it.
fn resolve(cli: &Cli, running: &Config) -> anyhow::Result<Reloaded> {
    let config = Config::resolve(cli.clone())?;
    auth::check_exposure(running.listen, &config.auth, running.allow_anonymous)?;
    let certified_key = running.tls.as_ref().map(tls::load).transpose()?;
    let restart_only = running.restart_only_changes(&config);
    Ok(Reloaded {
        config,
        certified_key,
        restart_only,
    })
}
