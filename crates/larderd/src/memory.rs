//! Gives memory back to the operating system after a burst of connections.
//!
//! Every connection holds buffers of its own (read and write buffers, body chunks in flight), so
//! 500 connections cost about half a GiB. When they close, glibc's allocator keeps the freed
//! memory in its per-thread arenas for reuse, and a cache server that served one burst would sit
//! at its peak resident size for good, which looks like a leak on every dashboard (measured:
//! 479 MiB resident 15 s after a 500-connection load test; `malloc_trim(0)` brought it to
//! 57 MiB). So a watcher samples the number of open connections once a second and, when it has
//! fallen to a quarter of the peak since the last trim, asks the allocator to return its free
//! pages. Trimming only after a fall keeps it off the hot path: under steady load the memory is
//! in use and nothing is trimmed. A trim runs on a blocking thread and took 74 ms for ~450 MiB
//! (10 ms for the next one) on a 2-core machine; requests allocating from an arena being trimmed
//! may wait that long, which is why it happens only once the burst is over.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Below this peak, what a trim could return is not worth a pass over the heap.
const MIN_PEAK: usize = 32;
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Tracks the peak of open connections since the last trim and says when to trim.
#[derive(Debug, Default)]
struct TrimRule {
    peak: usize,
}

impl TrimRule {
    /// Takes one sample of open connections; true when memory should be trimmed now.
    fn sample(&mut self, open: usize) -> bool {
        self.peak = self.peak.max(open);
        if self.peak >= MIN_PEAK && open <= self.peak / 4 {
            self.peak = open;
            return true;
        }
        false
    }
}

/// Starts the watcher. `connections` is the server's connection limit semaphore, whose
/// permits in use are the open connections; the same sample feeds the
/// `larder_connections_open` gauge.
pub fn spawn_trimmer(connections: Arc<Semaphore>, max_connections: usize) {
    tokio::spawn(async move {
        let mut rule = TrimRule::default();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let open = max_connections.saturating_sub(connections.available_permits());
            metrics::gauge!("larder_connections_open").set(open as f64);
            if rule.sample(open) {
                // A pass over the whole heap: off the async workers.
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    let started = std::time::Instant::now();
    // SAFETY: malloc_trim only releases free memory of the allocator; no pointer is involved.
    let released = unsafe { libc::malloc_trim(0) };
    metrics::counter!("larder_memory_trims_total").increment(1);
    tracing::debug!(
        released = released != 0,
        micros = started.elapsed().as_micros() as u64,
        "returned free heap memory to the OS"
    );
}

/// Other allocators (musl's, for one) give memory back on their own, or offer no way to ask.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_burst_falls_to_a_quarter() {
        let mut rule = TrimRule::default();
        for open in [0, 10, 200, 500, 480, 300, 126] {
            assert!(!rule.sample(open), "{open} open is still busy");
        }
        assert!(rule.sample(125), "a quarter of the 500 peak");
        // The peak starts again from there: no trim per sample while it stays about level...
        for open in [125, 60, 40] {
            assert!(!rule.sample(open), "{open}: already trimmed");
        }
        // ...one more once the rest close, then none while idle.
        assert!(rule.sample(0));
        for _ in 0..10 {
            assert!(!rule.sample(0));
        }
    }

    #[test]
    fn small_peaks_and_steady_load_never_trim() {
        let mut rule = TrimRule::default();
        for open in [0, 31, 0, 20, 0] {
            assert!(
                !rule.sample(open),
                "a peak of {open} is too small to matter"
            );
        }
        let mut busy = TrimRule::default();
        for _ in 0..100 {
            assert!(!busy.sample(400));
            assert!(!busy.sample(350));
        }
    }

    #[test]
    fn a_second_burst_trims_again() {
        let mut rule = TrimRule::default();
        rule.sample(400);
        assert!(rule.sample(50));
        assert!(!rule.sample(300));
        assert!(rule.sample(0));
    }
}
