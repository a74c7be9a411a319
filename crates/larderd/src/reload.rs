//! SIGHUP: the token set re-read from the configuration file while the server runs, so that a
//! token can be added, revoked or rotated without dropping a connection.
//!
//! The whole configuration is resolved again, as at start (flags and environment over the
//! file), and must pass every check start-up makes, the listener's exposure included: a file
//! that no longer parses, or that would leave a network listener without tokens, changes
//! nothing and is reported. Only `[[tokens]]` and `public_metrics` take effect; any other
//! setting that changed is named in a warning, since it is read once, at start.

use crate::api::State;
use crate::auth;
use crate::config::{Cli, Config};
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};

/// Installs the SIGHUP handler (replacing the default action, which ends the process) and
/// reloads on every signal. `running` is the configuration the server started with.
pub fn on_hangup(cli: Cli, running: Config, state: Arc<State>) -> anyhow::Result<()> {
    let mut hangups = signal(SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reload(&cli, &running, &state);
        }
    });
    Ok(())
}

fn reload(cli: &Cli, running: &Config, state: &State) {
    let Some(path) = &cli.config else {
        tracing::warn!("SIGHUP: nothing to reload, larderd was started without --config");
        metrics::counter!("larder_config_reloads_total", "result" => "refused").increment(1);
        return;
    };
    match resolve(cli, running) {
        Ok((newer, restart_only)) => {
            let tokens = newer.auth.token_count();
            state.auth.replace(newer.auth);
            metrics::counter!("larder_config_reloads_total", "result" => "applied").increment(1);
            tracing::info!(
                file = %path.display(),
                tokens,
                "SIGHUP: configuration reloaded, {tokens} tokens in force"
            );
            if !restart_only.is_empty() {
                tracing::warn!(
                    file = %path.display(),
                    "SIGHUP: {} changed in the file and take effect at the next restart only",
                    restart_only.join(", ")
                );
            }
        }
        Err(e) => {
            metrics::counter!("larder_config_reloads_total", "result" => "refused").increment(1);
            tracing::error!(
                file = %path.display(),
                "SIGHUP: configuration not reloaded, the tokens in force are unchanged: {e:#}"
            );
        }
    }
}

/// The configuration as the file now says, checked against the listener and the
/// `allow_anonymous` the server runs with, and the names of the settings that need a restart.
fn resolve(cli: &Cli, running: &Config) -> anyhow::Result<(Config, Vec<&'static str>)> {
    let newer = Config::resolve(cli.clone())?;
    auth::check_exposure(running.listen, &newer.auth, running.allow_anonymous)?;
    let restart_only = running.restart_only_changes(&newer);
    Ok((newer, restart_only))
}
