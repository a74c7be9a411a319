//! Replica health: which replica gets the next range, backoff after failures, quarantine of a
//! failing replica, the penalty of one that lost hedge races, and replicas that diverged (serve
//! another revision than the pin).

use super::*;

pub(super) struct Replica {
    pub(super) client: Client,
    pub(super) health: Mutex<Health>,
    pub(super) bytes: AtomicU64,
    pub(super) failures: AtomicU64,
    /// Serves another revision than the current attempt's pin: not asked again in this attempt.
    pub(super) diverged: AtomicBool,
}

/// A replica that just failed is avoided for a while, longer after each further failure, so a
/// dead one costs a few connection attempts rather than one per chunk.
#[derive(Default)]
pub(super) struct Health {
    pub(super) consecutive: u32,
    pub(super) down_until: Option<Instant>,
    /// Another replica just answered one of its ranges first (a hedge won): new ranges go
    /// elsewhere until then, when it gets another chance.
    pub(super) slow_until: Option<Instant>,
}

/// How long a replica that lost a hedge race gets no new ranges while others are available.
pub(super) const SLOW_PENALTY: Duration = Duration::from_secs(2);

pub(super) const FIRST_QUARANTINE: Duration = Duration::from_millis(250);
pub(super) const MAX_QUARANTINE: Duration = Duration::from_secs(10);
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(4);

impl Replica {
    pub(super) fn succeeded(&self) {
        let mut h = lock(&self.health);
        h.consecutive = 0;
        h.down_until = None;
    }

    /// Its request for a range lost the race against a hedge: it works, but slowly.
    pub(super) fn outpaced(&self) {
        lock(&self.health).slow_until = Some(Instant::now() + SLOW_PENALTY);
    }

    pub(super) fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut h = lock(&self.health);
        h.consecutive = h.consecutive.saturating_add(1);
        let factor = 1u32 << (h.consecutive - 1).min(6);
        h.down_until = Some(Instant::now() + (FIRST_QUARANTINE * factor).min(MAX_QUARANTINE));
    }
}

impl Shared {
    /// The replica for the `index`th range: spread round-robin, skipping quarantined replicas
    /// and, when there is a choice, the one that just failed this range and those that just
    /// lost a hedge race (slow ones come next, quarantined ones last).
    pub(super) fn pick(&self, index: u64, avoid: Option<usize>) -> usize {
        let n = self.replicas.len();
        let now = Instant::now();
        let mut soonest: Option<(Instant, usize)> = None;
        let mut slow: Option<usize> = None;
        for k in 0..n {
            let r = ((index % n as u64) as usize + k) % n;
            if (Some(r) == avoid && n > 1) || self.replicas[r].diverged.load(Ordering::Relaxed) {
                continue;
            }
            let h = lock(&self.replicas[r].health);
            match h.down_until {
                Some(until) if until > now => {
                    if soonest.is_none_or(|(t, _)| until < t) {
                        soonest = Some((until, r));
                    }
                }
                _ if h.slow_until.is_some_and(|until| until > now) => {
                    slow.get_or_insert(r);
                }
                _ => return r,
            }
        }
        if let Some(r) = slow {
            return r;
        }
        // Everyone left is quarantined: try the one that comes back first. The origin is never
        // dropped, so when nothing else is left it is the one.
        soonest.map_or_else(
            || match avoid {
                Some(a) if !self.replicas[a].diverged.load(Ordering::Relaxed) => a,
                _ => self.origin.load(Ordering::Relaxed),
            },
            |(_, r)| r,
        )
    }

    /// How long to wait before retrying on `next` after `failed` failed `attempt` times.
    pub(super) fn backoff(&self, attempt: u32, failed: usize, next: usize) -> Duration {
        if next != failed && lock(&self.replicas[next].health).down_until.is_none() {
            // A healthy replica is available: go at once, with a little jitter so that chunks
            // leaving a dead replica do not arrive in one burst.
            return Duration::from_millis(rand::random_range(0..=20));
        }
        let exp = FIRST_BACKOFF * (1u32 << attempt.saturating_sub(1).min(8));
        let cap = exp.min(MAX_BACKOFF).as_millis() as u64;
        Duration::from_millis(rand::random_range(cap / 2..=cap))
    }

    pub(super) fn any_diverged(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.diverged.load(Ordering::Relaxed))
    }

    /// The error after the last allowed attempt failed.
    pub(super) fn exhausted(
        &self,
        r: usize,
        attempts: u32,
        what: &str,
        why: String,
        connect: Option<String>,
    ) -> Error {
        let url = self.replicas[r].client.base_url().to_string();
        if let Some(cause) = connect
            && self.replicas.len() == 1
        {
            return Error::Connect { url, cause };
        }
        Error::Transport {
            op: "GET",
            target: self.name.to_string(),
            cause: format!("{what} failed {attempts} times, last from {url}: {why}"),
        }
    }
}
