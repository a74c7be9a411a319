//! Hedging: a range still unfinished after three times the median time of recent ranges is asked
//! again from another replica; the first complete, checked answer wins.

use super::*;

/// A range is hedged no sooner than this: below it, a second request costs more than it can
/// save, and a loopback or LAN download never waits that long for a healthy range.
pub const MIN_HEDGE_DELAY: Duration = Duration::from_millis(200);
/// How many times the median range time a range may take before it is hedged.
pub(super) const HEDGE_FACTOR: u32 = 3;
/// Range times remembered for the median, and how many are needed before hedging starts: few,
/// because when one replica is slow, its ranges soon take every connection and the fast replica
/// gets no chance to add more (the floor guards against hedging on a lucky first sample).
pub(super) const LATENCY_WINDOW: usize = 64;
pub(super) const LATENCY_MIN_SAMPLES: usize = 2;

/// When to hedge, and how many hedges may run (see the module comment).
pub(super) struct Hedging {
    /// Durations of the latest successful range requests, oldest first.
    pub(super) recent: Mutex<std::collections::VecDeque<Duration>>,
    pub(super) slots: tokio::sync::Semaphore,
    pub(super) max_slots: usize,
    pub(super) started: AtomicU64,
    pub(super) won: AtomicU64,
}

impl Hedging {
    pub(super) fn new(concurrency: usize) -> Hedging {
        Hedging {
            recent: Mutex::new(std::collections::VecDeque::with_capacity(LATENCY_WINDOW)),
            slots: tokio::sync::Semaphore::new((concurrency / 4).max(1)),
            max_slots: (concurrency / 4).max(1),
            started: AtomicU64::new(0),
            won: AtomicU64::new(0),
        }
    }

    /// Hedges under way, each holding an extra chunk buffer.
    pub(super) fn running(&self) -> u64 {
        self.max_slots
            .saturating_sub(self.slots.available_permits()) as u64
    }

    pub(super) fn record(&self, took: Duration) {
        let mut recent = lock(&self.recent);
        if recent.len() == LATENCY_WINDOW {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    /// How long a range may run before it is hedged; `None` until enough ranges finished to
    /// know what is normal.
    pub(super) fn delay(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = lock(&self.recent).iter().copied().collect();
        if times.len() < LATENCY_MIN_SAMPLES {
            return None;
        }
        let mid = times.len() / 2;
        let (_, median, _) = times.select_nth_unstable(mid);
        Some((*median * HEDGE_FACTOR).max(MIN_HEDGE_DELAY))
    }
}

impl Shared {
    /// One request for the range on replica `r`, and a second one on another replica if the
    /// first is slow (see the module comment). Returns the replica whose answer counts: the
    /// winner's, or the one that failed last.
    pub(super) async fn try_range_hedged(
        &self,
        index: u64,
        r: usize,
        range: ByteRange,
        pin: &Pin,
    ) -> (usize, Result<Bytes, Fail>) {
        use futures_util::future::{Either, select};
        let started = Instant::now();
        let first = Box::pin(self.timed_range(r, range, pin));
        if self.replicas.len() == 1 {
            return (r, first.await);
        }
        let first = match select(first, Box::pin(self.hedge_time(started))).await {
            Either::Left((result, _)) => return (r, result),
            Either::Right(((), first)) => first,
        };
        if self.hedge_target(index, r).is_none() {
            return (r, first.await);
        }
        // Slow ranges often come in groups (all those on one replica): they queue for a hedge
        // slot rather than give up on hedging when another holds it.
        let (slot, first) = match select(first, Box::pin(self.hedging.slots.acquire())).await {
            Either::Left((result, _)) => return (r, result),
            Either::Right((slot, first)) => (slot, first),
        };
        // Replicas may have failed while this range waited for the slot.
        let (slot, other) = match (slot, self.hedge_target(index, r)) {
            (Ok(slot), Some(other)) => (slot, other),
            // Not hedged after all: the slot goes back before the long wait.
            (slot, _) => {
                drop(slot);
                return (r, first.await);
            }
        };
        self.hedging.started.fetch_add(1, Ordering::Relaxed);
        let second = Box::pin(self.timed_range(other, range, pin));
        let outcome = match select(first, second).await {
            Either::Left((Ok(data), _)) => (r, Ok(data)),
            Either::Right((Ok(data), _)) => {
                self.hedging.won.fetch_add(1, Ordering::Relaxed);
                self.replicas[r].outpaced();
                (other, Ok(data))
            }
            // One failed transiently: the other may still make it. Its failure is booked now,
            // since the caller only hears of the request that counts.
            Either::Left((Err(Fail::Transient { .. }), second)) => {
                self.replicas[r].failed();
                let result = second.await;
                if result.is_ok() {
                    self.hedging.won.fetch_add(1, Ordering::Relaxed);
                }
                (other, result)
            }
            Either::Right((Err(Fail::Transient { .. }), first)) => {
                self.replicas[other].failed();
                (r, first.await)
            }
            // A changed revision or a fatal answer decides at once, as without a hedge.
            Either::Left((Err(fail), _)) => (r, Err(fail)),
            Either::Right((Err(fail), _)) => (other, Err(fail)),
        };
        drop(slot);
        outcome
    }

    /// Another replica than `r` that may take over the `index`th range now: serving the pin
    /// and not in quarantine.
    pub(super) fn hedge_target(&self, index: u64, r: usize) -> Option<usize> {
        let other = self.pick(index, Some(r));
        let healthy = lock(&self.replicas[other].health)
            .down_until
            .is_none_or(|until| until <= Instant::now());
        let serves_pin = !self.replicas[other].diverged.load(Ordering::Relaxed);
        (other != r && healthy && serves_pin).then_some(other)
    }

    /// Returns once a range started at `started` counts as slow. Until enough ranges finished
    /// to know what is normal, it keeps looking, so the first ranges can be hedged too.
    pub(super) async fn hedge_time(&self, started: Instant) {
        loop {
            match self.hedging.delay().map(|d| started + d) {
                Some(due) if due <= Instant::now() => return,
                // The median may grow meanwhile: look again when this deadline comes.
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => tokio::time::sleep(MIN_HEDGE_DELAY).await,
            }
        }
    }

    /// [`Shared::try_range`], remembering how long successful requests take.
    pub(super) async fn timed_range(
        &self,
        r: usize,
        range: ByteRange,
        pin: &Pin,
    ) -> Result<Bytes, Fail> {
        let started = Instant::now();
        let result = self.try_range(r, range, pin).await;
        if result.is_ok() {
            self.hedging.record(started.elapsed());
        }
        result
    }
}
