//! Progress on a terminal for the `larder` binary: an indicatif bar on stderr, and notes printed
//! above it (or alone, without a bar). The library reports through `larder_client::Progress` and
//! never draws; this is the one place that does.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use larder_client::{Progress, ProgressView, Unit};
use std::time::Duration;

/// Redraws per second: enough to look live, few enough to cost nothing at GB/s.
const REFRESH_HZ: u8 = 8;

#[derive(Debug)]
struct Stderr {
    bar: ProgressBar,
    notes: bool,
}

/// `bar`: draw a progress bar on stderr (the caller checks that stderr is a terminal).
/// `notes`: print notes (restarts, retries given up, skipped files) on stderr.
pub fn stderr(bar: bool, notes: bool) -> Progress {
    if !bar && !notes {
        return Progress::hidden();
    }
    let bar = if bar {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(REFRESH_HZ))
    } else {
        ProgressBar::hidden()
    };
    Progress::to(Stderr { bar, notes })
}

impl ProgressView for Stderr {
    fn phase(&self, label: &str, unit: Unit, total: Option<u64>) {
        if self.bar.is_hidden() {
            return;
        }
        let template = match (unit, total) {
            (Unit::Bytes, Some(_)) => {
                "{prefix:>11.bold} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}"
            }
            (Unit::Bytes, None) => {
                "{prefix:>11.bold} {spinner} {bytes} {binary_bytes_per_sec} {elapsed} {msg}"
            }
            (Unit::Items, _) => "{prefix:>11.bold} {spinner} {pos} {msg} {elapsed}",
        };
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

    fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    fn dec(&self, n: u64) {
        self.bar.dec(n);
    }

    fn message(&self, msg: &str) {
        if !self.bar.is_hidden() {
            self.bar.set_message(msg.to_string());
        }
    }

    /// Printed above the bar so the two do not garble each other.
    fn note(&self, line: &str) {
        if !self.notes {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn finish(&self) {
        self.bar.disable_steady_tick();
        self.bar.finish_and_clear();
    }
}
