//! The download driver: discovery, the window of range requests in flight, the reorder buffer
//! and the verifier thread that hashes bytes in order and hands them to the sink, restarts when
//! the pinned revision is gone, and the summary.

use super::*;

impl Downloader {
    /// Downloads `name` into `sink` and returns the sink after its `finish`.
    pub async fn download<S: Sink>(
        &self,
        name: &ObjectName,
        sink: S,
    ) -> Result<(DownloadSummary, S), Error> {
        let started = Instant::now();
        let shared = Arc::new(Shared {
            name: name.clone(),
            replicas: self
                .replicas
                .iter()
                .map(|client| Replica {
                    client: client.clone(),
                    health: Mutex::new(Health::default()),
                    bytes: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    diverged: AtomicBool::new(false),
                })
                .collect(),
            origin: AtomicUsize::new(0),
            chunk_size: self.opts.chunk_size,
            idle: self.opts.idle_timeout,
            retries: self.opts.retries,
            progress: self.opts.progress.clone(),
            retried: AtomicU64::new(0),
            hedging: Hedging::new(self.opts.concurrency),
            pool: Arc::new(BufferPool {
                free: Mutex::new(Vec::new()),
                keep: 2 * self.opts.concurrency,
            }),
        });
        let sink = Arc::new(Mutex::new(sink));
        let mut restarts = 0u32;
        let info = loop {
            let result = match shared.discover(restarts).await {
                Ok(found) => self.attempt(&shared, found, &sink).await,
                Err(e) => Err(Stop::Fatal(e)),
            };
            match result {
                Ok(info) => break info,
                Err(Stop::Restart(why)) => {
                    restarts += 1;
                    if restarts > self.opts.max_restarts {
                        let consequence = lock(&sink).failure_consequence();
                        return Err(Error::Transport {
                            op: "GET",
                            target: name.to_string(),
                            cause: format!(
                                "the object changed during the download {restarts} times in a row \
                                 (last: {why}); {consequence}; retry when its writers are done"
                            ),
                        });
                    }
                    shared.progress.note(&format!(
                        "{name} changed during the download ({why}); restarting ({restarts} of \
                         at most {})",
                        self.opts.max_restarts
                    ));
                }
                Err(Stop::Fatal(e)) => {
                    let consequence = lock(&sink).failure_consequence();
                    return Err(with_consequence(e, &consequence));
                }
            }
        };
        lock(&sink).finish()?;
        let sink = match Arc::try_unwrap(sink) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(_) => unreachable!("the verifier thread has ended, so the sink has one owner"),
        };
        let summary = DownloadSummary {
            info,
            restarts,
            retries: shared.retried.load(Ordering::Relaxed),
            hedged: shared.hedging.started.load(Ordering::Relaxed),
            hedges_won: shared.hedging.won.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            replicas: shared
                .replicas
                .iter()
                .map(|r| ReplicaUsage {
                    url: r.client.base_url().to_string(),
                    bytes: r.bytes.load(Ordering::Relaxed),
                    failures: r.failures.load(Ordering::Relaxed),
                    diverged: r.diverged.load(Ordering::Relaxed),
                })
                .collect(),
        };
        Ok((summary, sink))
    }

    /// One pass over the object pinned to the discovered ETag: fetch, write, hash, verify.
    async fn attempt<S: Sink>(
        &self,
        shared: &Arc<Shared>,
        found: Discovered,
        sink: &Arc<Mutex<S>>,
    ) -> Result<ObjectInfo, Stop> {
        let info = found.info;
        let total = info.size;
        let chunk = self.opts.chunk_size;
        let chunks = total.div_ceil(chunk);
        lock(sink).begin(&info).map_err(Stop::Fatal)?;
        let positioned = lock(sink).positioned();
        let phase = lock(sink).phase();
        shared.progress.bytes_phase(phase, Some(total));
        shared.progress.inc(found.first.len() as u64);

        // The verifier: hashes in order and feeds the sink. It reports each chunk it is done
        // with, which is what moves the fetch window forward.
        let (to_verify, verify_rx) = std::sync::mpsc::channel::<Bytes>();
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<Result<(), Error>>();
        let verifier_sink = Arc::clone(sink);
        let pool = Arc::clone(&shared.pool);
        let verifier = std::thread::Builder::new()
            .name("larder-verify".into())
            .spawn(move || {
                let mut hasher = blake3::Hasher::new();
                for data in verify_rx {
                    hasher.update(&data);
                    let result = lock(&verifier_sink).ordered(&data);
                    pool.recycle(data);
                    let failed = result.is_err();
                    let _ = done_tx.send(result);
                    if failed {
                        return None;
                    }
                }
                Some(hasher.finalize())
            })
            .map_err(|e| Stop::Fatal(Error::io("cannot start the verifier thread", e)))?;

        let pin = Arc::new(Pin {
            etag: info.etag.clone(),
            total,
        });
        let window = 2 * self.opts.concurrency as u64;
        let mut fetching: JoinSet<(u64, Result<Bytes, Stop>)> = JoinSet::new();
        let mut writer = match positioned {
            Some(file) => Some(Writer::start(file, chunk, self.opts.sync).map_err(Stop::Fatal)?),
            None => None,
        };
        let mut ready: BTreeMap<u64, Bytes> = BTreeMap::new();
        let (mut next_fetch, mut next_verify, mut verified) = (0u64, 0u64, 0u64);
        if chunks > 0 {
            arrived(0, found.first, &mut writer, &mut ready);
            next_fetch = 1;
        }
        let outcome: Result<(), Stop> = loop {
            while let Some(data) = ready.remove(&next_verify) {
                // A send fails only if the verifier stopped, which it reports through `done`.
                let _ = to_verify.send(data);
                next_verify += 1;
            }
            if verified == chunks {
                break Ok(());
            }
            // A running hedge holds a second buffer for its range: it counts against the window,
            // so hedging never lifts memory above the bound.
            while fetching.len() < self.opts.concurrency
                && next_fetch < chunks
                && next_fetch + shared.hedging.running() < verified + window
            {
                let start = next_fetch * chunk;
                let range = ByteRange {
                    start,
                    len: chunk.min(total - start),
                };
                let index = next_fetch;
                let (shared, pin) = (Arc::clone(shared), Arc::clone(&pin));
                fetching.spawn(async move { (index, shared.fetch(index, range, &pin).await) });
                next_fetch += 1;
            }
            tokio::select! {
                Some(joined) = fetching.join_next(), if !fetching.is_empty() => {
                    match joined.expect("a range task panicked") {
                        (i, Ok(data)) => arrived(i, data, &mut writer, &mut ready),
                        (_, Err(stop)) => break Err(stop),
                    }
                }
                Some(written) = Writer::next(&mut writer), if Writer::busy(&writer) => {
                    match written {
                        Ok((i, data)) => {
                            ready.insert(i, data);
                        }
                        Err(e) => break Err(Stop::Fatal(e)),
                    }
                }
                event = done.recv() => match event {
                    Some(Ok(())) => verified += 1,
                    Some(Err(e)) => break Err(Stop::Fatal(e)),
                    None => break Err(Stop::Fatal(Error::Protocol(
                        "internal error: the verifier thread stopped".into(),
                    ))),
                },
            }
        };

        // Stop everything this attempt started before anyone reuses the sink: a positioned write
        // of this attempt landing after the next attempt's write would corrupt the file
        // unnoticed, since the digest is computed from memory.
        fetching.abort_all();
        while fetching.join_next().await.is_some() {}
        if let Some(w) = writer {
            w.stop().await;
        }
        drop(to_verify);
        let digest = tokio::task::spawn_blocking(move || verifier.join())
            .await
            .expect("joining the verifier")
            .expect("the verifier thread panicked");
        outcome?;
        let digest = digest.expect("the verifier finished every chunk");
        let actual = ETag::from_digest(&digest);
        if actual != info.etag {
            return Err(Stop::Fatal(Error::DigestMismatch {
                target: shared.name.to_string(),
                expected: info.etag.clone(),
                actual,
                consequence: lock(sink).failure_consequence(),
            }));
        }
        Ok(info)
    }
}

/// Files a completed chunk: for file outputs a positioned write right away, and then the reorder
/// buffer until the verifier's turn comes. A chunk reaches the verifier only once written, so the
/// window (counted in verified chunks) also bounds the writes still in flight.
pub(super) fn arrived(
    index: u64,
    data: Bytes,
    writer: &mut Option<Writer>,
    ready: &mut BTreeMap<u64, Bytes>,
) {
    match writer {
        Some(w) => w.write(index, data),
        None => {
            ready.insert(index, data);
        }
    }
}
