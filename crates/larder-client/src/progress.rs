//! What a person at a terminal sees while a long transfer runs.
//!
//! Transfers of several GiB take long enough that silence looks like a hang, so every long
//! operation reports bytes, rate and ETA through one `Progress` handle, phase by phase (a
//! snapshot save scans, then archives and uploads; a restore downloads and extracts). The same
//! handle carries notes such as "restarting: the object changed", which matter even without a
//! terminal. The library never decides whether to draw: the caller builds the handle (the CLI
//! draws only when stderr is a terminal and `--quiet` is absent), so library users and tests get
//! a silent default and scripts never see escape codes.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::borrow::Cow;
use std::time::Duration;

/// A cheap, cloneable handle; every clone drives the same bar.
#[derive(Clone, Debug)]
pub struct Progress {
    bar: ProgressBar,
    notes: bool,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress::hidden()
    }
}

/// Redraws per second: enough to look live, few enough to cost nothing at GB/s.
const REFRESH_HZ: u8 = 8;

impl Progress {
    /// Draws nothing and prints no notes.
    pub fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            notes: false,
        }
    }

    /// `bar`: draw a progress bar on stderr (the caller checks that stderr is a terminal).
    /// `notes`: print notes (restarts, retries given up, skipped files) on stderr.
    pub fn stderr(bar: bool, notes: bool) -> Progress {
        let bar = if bar {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(REFRESH_HZ))
        } else {
            ProgressBar::hidden()
        };
        Progress { bar, notes }
    }

    /// Starts a phase measured in bytes; `total` None when the size is not known yet.
    pub(crate) fn bytes_phase(&self, label: &str, total: Option<u64>) {
        if self.bar.is_hidden() {
            return;
        }
        let template = if total.is_some() {
            "{prefix:>11.bold} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}"
        } else {
            "{prefix:>11.bold} {spinner} {bytes} {binary_bytes_per_sec} {elapsed} {msg}"
        };
        self.start(label, total, template);
    }

    /// Starts a phase that counts items (files) rather than bytes.
    pub(crate) fn count_phase(&self, label: &str) {
        if self.bar.is_hidden() {
            return;
        }
        self.start(
            label,
            None,
            "{prefix:>11.bold} {spinner} {pos} {msg} {elapsed}",
        );
    }

    fn start(&self, label: &str, total: Option<u64>, template: &str) {
        let style = ProgressStyle::with_template(template)
            .expect("progress template")
            .progress_chars("=> ");
        self.bar.set_style(style);
        self.bar.set_prefix(label.to_string());
        self.bar.set_message("");
        match total {
            Some(t) => self.bar.set_length(t),
            None => self.bar.unset_length(),
        }
        self.bar.reset();
        self.bar.enable_steady_tick(Duration::from_millis(125));
    }

    pub(crate) fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Takes back bytes counted for an attempt that failed and will be fetched again.
    pub(crate) fn dec(&self, n: u64) {
        self.bar.dec(n);
    }

    pub(crate) fn set_message(&self, msg: impl Into<Cow<'static, str>>) {
        if !self.bar.is_hidden() {
            self.bar.set_message(msg);
        }
    }

    /// A line for the person, printed above the bar so the two do not garble each other.
    pub(crate) fn note(&self, line: &str) {
        if !self.notes {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Removes the bar, so the summary line that follows stands alone.
    pub fn finish(&self) {
        self.bar.disable_steady_tick();
        self.bar.finish_and_clear();
    }
}
