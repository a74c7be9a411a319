//! What a person at a terminal sees while a long transfer runs.
//!
//! Transfers of several GiB take long enough that silence looks like a hang, so every long
//! operation reports bytes, rate and ETA through one `Progress` handle, phase by phase (a
//! snapshot save scans, then archives and uploads; a restore downloads and extracts). The same
//! handle carries notes such as "restarting: the object changed", which matter even without a
//! terminal.
//!
//! The library only reports; drawing is the caller's (the `larder` binary draws bars with
//! indicatif in `terminal.rs`, only when stderr is a terminal and `--quiet` is absent), so the
//! library needs no terminal code, library users and tests get a silent default, and scripts
//! never see escape codes.

use std::borrow::Cow;
use std::sync::Arc;

/// What a phase counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Bytes transferred or written.
    Bytes,
    /// Items such as files.
    Items,
}

/// Where progress goes: implemented by whoever shows it.
pub trait ProgressView: Send + Sync + std::fmt::Debug {
    /// A new phase begins (`total` is `None` while unknown); counting restarts at 0.
    fn phase(&self, label: &str, unit: Unit, total: Option<u64>);
    /// Counts `n` more units of the current phase.
    fn inc(&self, n: u64);
    /// Takes back units counted for an attempt that failed and will be done again.
    fn dec(&self, n: u64);
    /// A short status next to the count ("1,024 files", "syncing").
    fn message(&self, msg: &str);
    /// A line for the person, even without a bar (restarts, retries given up, skipped files).
    fn note(&self, line: &str);
    /// The operation ended: remove the bar so the summary line that follows stands alone.
    fn finish(&self);
}

/// A cheap, cloneable handle; every clone reports to the same view.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    view: Option<Arc<dyn ProgressView>>,
}

impl Progress {
    /// Shows nothing.
    pub fn hidden() -> Progress {
        Progress { view: None }
    }

    /// Reports to `view`.
    pub fn to(view: impl ProgressView + 'static) -> Progress {
        Progress {
            view: Some(Arc::new(view)),
        }
    }

    /// Starts a phase measured in bytes; `total` None when the size is not known yet.
    pub(crate) fn bytes_phase(&self, label: &str, total: Option<u64>) {
        if let Some(v) = &self.view {
            v.phase(label, Unit::Bytes, total);
        }
    }

    /// Starts a phase that counts items (files) rather than bytes.
    pub(crate) fn count_phase(&self, label: &str) {
        if let Some(v) = &self.view {
            v.phase(label, Unit::Items, None);
        }
    }

    pub(crate) fn inc(&self, n: u64) {
        if let Some(v) = &self.view {
            v.inc(n);
        }
    }

    pub(crate) fn dec(&self, n: u64) {
        if let Some(v) = &self.view {
            v.dec(n);
        }
    }

    pub(crate) fn set_message(&self, msg: impl Into<Cow<'static, str>>) {
        if let Some(v) = &self.view {
            v.message(&msg.into());
        }
    }

    pub(crate) fn note(&self, line: &str) {
        if let Some(v) = &self.view {
            v.note(line);
        }
    }

    /// Removes the bar, if any.
    pub fn finish(&self) {
        if let Some(v) = &self.view {
            v.finish();
        }
    }
}
