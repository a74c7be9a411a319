//! Git snapshots on the server side (README "Git snapshots (server)"): which upstream a
//! `/api/v1/git/{host}/{path}/…` route names, the registry of repositories clients asked for,
//! and the background generator that keeps each one's snapshot and head record current.
//!
//! A request never waits for git: the head route only reads the head record from the tier and,
//! whatever it finds, marks the repository as asked for. Each registered repository has one
//! task, started on its first request, that fetches its mirror every `--git-interval` and,
//! when the default branch's tip has no snapshot yet, builds one and publishes it:
//!
//! 1. a claim object (`{prefix}/claims/{commit}`) written create-only with a short TTL, so that
//!    replicas over one bucket build each commit once; a replica that finds the claim taken
//!    skips the round, and a generator killed mid-way leaves a claim that simply expires;
//! 2. the snapshot, streamed from the archiver into `Tier::put` create-only under
//!    `Upstream::snapshot_key(commit)` (immutable: a download in flight is never invalidated);
//! 3. the head record, replaced by compare-and-swap only when `larder_git::head::decide` says
//!    the new one is an improvement, retried when another replica swapped first.
//!
//! After the head record moved, the repository's snapshot index (`snapshots.json`, replaced by
//! compare-and-swap) gains the new commit and snapshots beyond the newest `--git-keep` are
//! deleted.
//!
//! A repository nobody asked for during `--git-idle-after` is dropped from the registry and its
//! mirror deleted; the next request registers it again. With `--git-mirror-limit`, whole
//! mirrors of the least recently asked-for repositories are removed after a round while the
//! mirrors together exceed it.

use crate::config::GitSettings;
use futures_util::StreamExt;
use larder_git::head::{self, HeadRecord, Lineage};
use larder_git::{
    AllowList, Checkout, CommitId, Mirror, MirrorOptions, Scheme, SnapshotOptions, Upstream,
};
use larder_proto::{ETag, Key, Namespace, ReadOutcome, WritePrecondition};
use larder_tier::{ErrorKind, GetOptions, PutOptions, Tier};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How many times a head record update is retried when another replica swapped first.
const HEAD_CAS_ATTEMPTS: usize = 5;

/// How many times a bundle chain extension starts over after another replica extended the
/// chain first (each attempt may make a bundle: a few, not many).
const BUNDLE_CAS_ATTEMPTS: usize = 3;

/// Deadline of one `git bundle create`: as long as a snapshot of a large repository may take.
const BUNDLE_TIMEOUT: Duration = larder_git::bundles::DEFAULT_BUNDLE_TIMEOUT;

/// `snapshots.json`: the commits whose snapshots are kept, oldest first, and those dropped by
/// `--git-keep` whose snapshots are deleted once `--git-grace` has passed.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct SnapshotIndex {
    commits: Vec<CommitId>,
    /// Absent in indexes written before it existed.
    #[serde(default)]
    retired: Vec<RetiredSnapshot>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RetiredSnapshot {
    commit: CommitId,
    /// Unix seconds when it left `commits`.
    since: u64,
}

pub struct GitService {
    allow: AllowList,
    settings: GitSettings,
    tier: Arc<dyn Tier>,
    git: larder_git::Git,
    /// TTL of snapshots and head records (`--max-ttl`).
    ttl: Duration,
    /// Whether larderd serves TLS: the scheme of bundle URIs built from a Host header.
    tls: bool,
    /// Registered repositories by normalised URL.
    repos: Mutex<HashMap<String, Entry>>,
}

/// A registered repository.
struct Entry {
    /// When a client last asked for it.
    last_asked: Instant,
    /// Its mirror, held by its task for the length of a round; another task that evicts it
    /// for `--git-mirror-limit` takes it only when no round is running.
    mirror: Arc<tokio::sync::Mutex<Option<Mirror>>>,
    dir: PathBuf,
    /// The mirror directory's size after the last round (0 when evicted).
    size: u64,
}

/// Why a route is not served: status and a one-line reason.
pub struct Refused {
    pub status: http::StatusCode,
    pub reason: String,
}

impl GitService {
    pub fn new(
        settings: GitSettings,
        tier: Arc<dyn Tier>,
        ttl: Duration,
        tls: bool,
    ) -> anyhow::Result<Self> {
        let allow = AllowList::new(&settings.allow)?;
        std::fs::create_dir_all(&settings.mirror_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the git mirror directory {}: {e}",
                settings.mirror_dir.display()
            )
        })?;
        Ok(GitService {
            allow,
            settings,
            tier,
            git: larder_git::Git::from_env(),
            ttl,
            tls,
            repos: Mutex::new(HashMap::new()),
        })
    }

    /// The upstream and namespace of a route (`{host}/{path}`, still percent-encoded).
    ///
    /// Routes carry no scheme. The upstream is `https://{route}` when a pattern allows that,
    /// else `http://{route}` when a pattern allows that (a host configured only with an `http`
    /// pattern, such as a test server or an internal mirror). `https` wins when both are
    /// allowed, so a route always names one repository and one set of keys.
    pub fn resolve(&self, route: &str) -> Result<(Upstream, Namespace), Refused> {
        let bad = |reason: String| Refused {
            status: http::StatusCode::BAD_REQUEST,
            reason,
        };
        let decoded = percent_encoding::percent_decode_str(route)
            .decode_utf8()
            .map_err(|_| bad("the repository path is not UTF-8".into()))?;
        let https = Upstream::from_route(Scheme::Https, &decoded)
            // The reason never repeats the path: it could carry a credential.
            .map_err(|e| bad(format!("invalid repository path: {e}")))?;
        let refusal = match self.allow.check(&https) {
            Ok(ns) => return Ok((https, ns)),
            Err(refusal) => refusal,
        };
        if let Ok(http) = Upstream::from_route(Scheme::Http, &decoded)
            && let Ok(ns) = self.allow.check(&http)
        {
            return Ok((http, ns));
        }
        Err(Refused {
            status: http::StatusCode::FORBIDDEN,
            reason: refusal.to_string(),
        })
    }

    /// Notes that a client asked for `upstream`; the first time, starts its generator task.
    pub fn register(self: &Arc<Self>, upstream: &Upstream, ns: &Namespace) {
        let url = upstream.url();
        let new = {
            let mut repos = self.repos.lock().expect("registry lock");
            match repos.get_mut(&url) {
                Some(entry) => {
                    entry.last_asked = Instant::now();
                    None
                }
                None => {
                    let mirror = Arc::new(tokio::sync::Mutex::new(None));
                    let entry = Entry {
                        last_asked: Instant::now(),
                        mirror: mirror.clone(),
                        dir: self.repo_dir(upstream),
                        size: 0,
                    };
                    repos.insert(url.clone(), entry);
                    Some(mirror)
                }
            }
        };
        if let Some(mirror) = new {
            tracing::info!(upstream = %url, namespace = %ns, "git repository registered");
            let service = self.clone();
            let (upstream, ns) = (upstream.clone(), ns.clone());
            tokio::spawn(async move { service.run(upstream, ns, mirror).await });
        }
    }

    fn last_asked(&self, url: &str) -> Option<Instant> {
        self.repos
            .lock()
            .expect("registry lock")
            .get(url)
            .map(|e| e.last_asked)
    }

    /// Records this repository's mirror size, then removes whole mirrors of other
    /// repositories, least recently asked for first, while the total exceeds `limit`. A
    /// mirror in the middle of a round is skipped, and a repository's own round never removes
    /// its own mirror (one mirror larger than the limit stays); an evicted repository that is
    /// still asked for fetches its mirror anew on its next round.
    async fn enforce_mirror_limit(&self, url: &str, dir: &std::path::Path, limit: u64) {
        let own = {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || dir_size(&dir))
                .await
                .unwrap_or(0)
        };
        let mut candidates = {
            let mut repos = self.repos.lock().expect("registry lock");
            if let Some(entry) = repos.get_mut(url) {
                entry.size = own;
            }
            let total: u64 = repos.values().map(|e| e.size).sum();
            if total <= limit {
                return;
            }
            let mut others: Vec<_> = repos
                .iter()
                .filter(|(u, e)| u.as_str() != url && e.size > 0)
                .map(|(u, e)| (e.last_asked, u.clone(), e.mirror.clone(), e.dir.clone()))
                .collect();
            others.sort_by_key(|(asked, ..)| *asked);
            (total, others)
        };
        for (_, other, mirror, other_dir) in candidates.1.drain(..) {
            if candidates.0 <= limit {
                break;
            }
            let Ok(mut slot) = mirror.try_lock() else {
                continue;
            };
            drop(slot.take());
            remove_dir(&other_dir, &other).await;
            let freed = {
                let mut repos = self.repos.lock().expect("registry lock");
                repos
                    .get_mut(&other)
                    .map_or(0, |e| std::mem::take(&mut e.size))
            };
            candidates.0 = candidates.0.saturating_sub(freed);
            metrics::counter!("larder_git_mirrors_evicted_total").increment(1);
            tracing::info!(upstream = %other, freed, "git mirror removed (--git-mirror-limit)");
        }
    }

    fn repo_dir(&self, upstream: &Upstream) -> PathBuf {
        // The key prefix is already a safe relative path (escaped segments, ending in `~`, so
        // one repository's directory never contains another's).
        self.settings.mirror_dir.join(upstream.key_prefix())
    }

    /// One repository's generator: a round at once, then one per interval until nobody asked
    /// for it during `idle_after`.
    async fn run(
        self: Arc<Self>,
        upstream: Upstream,
        ns: Namespace,
        mirror: Arc<tokio::sync::Mutex<Option<Mirror>>>,
    ) {
        let url = upstream.url();
        let dir = self.repo_dir(&upstream);
        let is_idle =
            |t: Option<Instant>| t.is_none_or(|t| t.elapsed() >= self.settings.idle_after);
        loop {
            if is_idle(self.last_asked(&url)) {
                // The mirror goes while the repository is still registered, so that a request
                // arriving meanwhile cannot start a second task on the same directory.
                drop(mirror.lock().await.take());
                remove_dir(&dir, &url).await;
                let mut repos = self.repos.lock().expect("registry lock");
                if is_idle(repos.get(&url).map(|e| e.last_asked)) {
                    repos.remove(&url);
                    tracing::info!(upstream = %url, "git repository idle: dropped");
                    return;
                }
                // Asked for again meanwhile: carry on (the mirror is fetched anew).
            }
            let result = {
                let mut slot = mirror.lock().await;
                self.round(&upstream, &ns, &dir, &mut slot).await
            };
            if let Some(limit) = self.settings.mirror_limit {
                self.enforce_mirror_limit(&url, &dir, limit).await;
            }
            match result {
                Ok(outcome) => {
                    tracing::debug!(upstream = %url, outcome, "git round");
                    // Every round, not only those that moved the head: what was retired must
                    // go once its grace has passed even if the upstream stopped moving.
                    if let Err(e) = self.reap(&upstream, &ns).await {
                        tracing::warn!(upstream = %url, error = %format!("{e:#}"), "cannot remove retired git snapshots or bundles");
                    }
                }
                Err(e) => {
                    metrics::counter!("larder_git_rounds_failed_total").increment(1);
                    // Errors from larder-git are scrubbed of credentials; the URL is normalised
                    // and carries none.
                    tracing::warn!(upstream = %url, error = %format!("{e:#}"), "git round failed");
                    // A repository whose mirror never fetched cleanly may not exist at all: a
                    // pattern such as `https://github.com/acme/*` admits any name, and each one
                    // asked for would otherwise be fetched every interval until it went idle.
                    // Drop it; a client asking again (it got 404 + Retry-After) registers it
                    // again, so a misspelt name costs one fetch per request, not one per
                    // interval for a week.
                    let mut slot = mirror.lock().await;
                    if slot.as_ref().is_none_or(|m| !m.is_ready()) {
                        drop(slot.take());
                        remove_dir(&dir, &url).await;
                        self.repos.lock().expect("registry lock").remove(&url);
                        tracing::info!(upstream = %url, "git repository never fetched: dropped");
                        return;
                    }
                }
            }
            tokio::time::sleep(self.settings.interval).await;
        }
    }

    /// Fetches the mirror and, if the tip has no snapshot yet, publishes one. Returns what it
    /// did, for the debug log.
    async fn round(
        &self,
        upstream: &Upstream,
        ns: &Namespace,
        dir: &std::path::Path,
        slot: &mut Option<Mirror>,
    ) -> anyhow::Result<&'static str> {
        if slot.is_none() {
            tokio::fs::create_dir_all(dir).await?;
            *slot = Some(
                Mirror::open_or_create(
                    &self.git,
                    &dir.join("mirror.git"),
                    upstream,
                    MirrorOptions::default(),
                )
                .await?,
            );
        }
        let mirror = slot.as_mut().expect("opened above");
        let fetched = mirror.fetch().await?;
        if fetched.rebuilt {
            metrics::counter!("larder_git_mirrors_rebuilt_total").increment(1);
        }
        let tip = fetched.tip.clone();
        let current = self.read_head(ns, upstream).await?;
        let snapshot_key = upstream.snapshot_key(&tip);
        if let Some((record, _)) = &current
            && record.commit == tip
        {
            // The record is current if the snapshot it names is still there: both expire
            // after --max-ttl, and a tip that did not move for that long is snapshotted anew.
            let stored = self.stat(ns, &snapshot_key).await?;
            if stored.is_some_and(|(etag, _)| etag.as_str() == record.etag) {
                return Ok("unchanged");
            }
        }
        let mut claimed = false;
        let (etag, size) = match self.stat(ns, &snapshot_key).await? {
            Some(found) => found,
            None => {
                let claim = upstream.key(&format!("claims/{tip}"))?;
                if !self.claim(ns, &claim).await? {
                    return Ok("claimed by another replica");
                }
                match self
                    .generate(ns, upstream, mirror, &tip, &snapshot_key, dir)
                    .await
                {
                    Ok(stored) => {
                        claimed = true;
                        stored
                    }
                    Err(e) => {
                        // Release the claim so the next round (here or on another replica)
                        // tries again instead of waiting for it to expire. Should the claim
                        // have expired and been taken by another replica meanwhile, that one
                        // merely loses its exclusivity: duplicate work, never a wrong result.
                        if let Err(d) = self.tier.delete(ns, &claim).await {
                            tracing::warn!(upstream = %upstream, error = %d, "cannot release a git claim");
                        }
                        // A failed clone from the mirror can mean a damaged mirror
                        // (index-pack re-hashes every object): rebuild it next round.
                        if matches!(
                            e.downcast_ref::<larder_git::SnapshotError>(),
                            Some(larder_git::SnapshotError::Git(_))
                        ) {
                            metrics::counter!("larder_git_mirrors_rebuilt_total").increment(1);
                            mirror.discard().await?;
                        }
                        return Err(e);
                    }
                }
            }
        };
        let record = HeadRecord {
            version: head::VERSION,
            commit: tip,
            git_ref: format!("refs/heads/{}", fetched.default_branch),
            snapshot_key: snapshot_key.as_str().to_string(),
            etag: etag.as_str().to_string(),
            size,
            observed_at: fetched.fetched_at,
            created_at: unix_now(),
        };
        let outcome = self.publish(ns, upstream, mirror, record).await?;
        // The replica that held the claim for the tip also extends the bundle chain, so that
        // replicas do not race to bundle the same commits; after the head record, so that the
        // snapshot never waits for a bundle. A failed bundle costs stock-git clones some
        // upstream traffic, nothing more: it never fails the round.
        if claimed && let Err(e) = self.extend_bundles(ns, upstream, mirror, dir).await {
            metrics::counter!("larder_git_bundle_failures_total").increment(1);
            tracing::warn!(upstream = %upstream, error = %format!("{e:#}"), "git bundle not made");
        }
        Ok(outcome)
    }

    /// Adds a bundle of what is new in the mirror to the repository's chain
    /// (`bundles/chain.json`): builds it into a scratch directory, uploads it create-only under
    /// `Upstream::bundle_key`, then replaces the chain by compare-and-swap. When another replica
    /// wrote first (the bundle's key or the chain), what this attempt uploaded is deleted and
    /// it starts over from the chain as it is now. A new full bundle retires the bundles it
    /// replaces; `reap` deletes them after `--git-grace`.
    async fn extend_bundles(
        &self,
        ns: &Namespace,
        upstream: &Upstream,
        mirror: &Mirror,
        dir: &std::path::Path,
    ) -> anyhow::Result<()> {
        let key = upstream.bundle_chain_key();
        // Only this repository's round (holding its mirror) uses it: whatever is left there
        // is from a process that died mid-way.
        let scratch = dir.join("bundles");
        remove_dir(&scratch, &upstream.url()).await;
        // The token of a bundle key found taken: the next attempt hands out a higher one. When
        // the key is another replica's new bundle, the chain read again has moved past it
        // anyway; when it is a leftover (of a chain that expired and restarted its tokens),
        // this keeps it from blocking the chain for good.
        let mut taken_token = 0;
        for _ in 0..BUNDLE_CAS_ATTEMPTS {
            let (mut chain, precondition) =
                match self.read_json::<larder_git::BundleChain>(ns, &key).await? {
                    Some((chain, etag)) => (chain, WritePrecondition::replace_if(&etag)),
                    None => (
                        larder_git::BundleChain::default(),
                        WritePrecondition::create_only(),
                    ),
                };
            chain.last_token = chain.last_token.max(taken_token);
            let mut full = chain.wants_full();
            if !full && let Some(first) = chain.bundles.first() {
                // A chain whose full bundle expired (`--max-ttl`) is useless to a fresh clone:
                // start it again.
                full = self
                    .stat(ns, &upstream.bundle_key(&first.id)?)
                    .await?
                    .is_none();
            }
            let Some((bundle, path)) = chain.extend(mirror, &scratch, full, BUNDLE_TIMEOUT).await?
            else {
                return Ok(());
            };
            let bundle_key = upstream.bundle_key(&bundle.id)?;
            let uploaded = self.upload_bundle(ns, &bundle_key, &path).await;
            if let Err(e) = tokio::fs::remove_file(&path).await {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a bundle file");
            }
            match uploaded {
                Ok(true) => {}
                Ok(false) => {
                    // Another replica made a bundle with this token: its chain is (about to
                    // be) newer than the one read. Nothing of ours was stored.
                    taken_token = bundle.creation_token;
                    self.tier.invalidate(ns, &key).await?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let data = serde_json::to_vec(&chain)?;
            match self
                .put_small(ns, &key, data, precondition, "application/json")
                .await
            {
                Ok(()) => {
                    let kind = if bundle.full { "full" } else { "incremental" };
                    metrics::counter!("larder_git_bundles_generated_total", "kind" => kind)
                        .increment(1);
                    tracing::info!(
                        upstream = %upstream, bundle = %bundle.id, size = bundle.size,
                        "git bundle generated"
                    );
                    return Ok(());
                }
                Err(e) => {
                    // Never listed, so nobody can be reading it.
                    self.delete_quietly(ns, &bundle_key, upstream).await;
                    if e.kind != ErrorKind::PreconditionFailed {
                        return Err(e.into());
                    }
                    self.tier.invalidate(ns, &key).await?;
                }
            }
        }
        anyhow::bail!("the bundle chain kept changing under {BUNDLE_CAS_ATTEMPTS} attempts")
    }

    /// Stores the bundle file at `path` create-only under `key`, streamed from the file.
    /// `false` when the key exists already.
    async fn upload_bundle(
        &self,
        ns: &Namespace,
        key: &Key,
        path: &std::path::Path,
    ) -> anyhow::Result<bool> {
        let file = tokio::fs::File::open(path).await?;
        let body: larder_tier::UploadStream =
            Box::pin(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
        let opts = PutOptions {
            ttl: self.ttl,
            precondition: WritePrecondition::create_only(),
            headers: vec![("content-type".into(), "application/x-git-bundle".into())],
            ..PutOptions::default()
        };
        match self.tier.put(ns, key, body, opts).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::PreconditionFailed => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_quietly(&self, ns: &Namespace, key: &Key, upstream: &Upstream) {
        match self.tier.delete(ns, key).await {
            Ok(_) => {}
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(upstream = %upstream, key = %key, error = %e, "cannot delete"),
        }
    }

    /// A small object written in one piece with `precondition`.
    async fn put_small(
        &self,
        ns: &Namespace,
        key: &Key,
        data: Vec<u8>,
        precondition: WritePrecondition,
        content_type: &str,
    ) -> Result<(), larder_tier::TierError> {
        let data = bytes::Bytes::from(data);
        let body: larder_tier::UploadStream =
            Box::pin(futures_util::stream::once(async move { Ok(data) }));
        let opts = PutOptions {
            ttl: self.ttl,
            precondition,
            headers: vec![("content-type".into(), content_type.into())],
            ..PutOptions::default()
        };
        self.tier.put(ns, key, body, opts).await.map(|_| ())
    }

    /// Deletes the snapshots and bundles retired longer than `--git-grace` ago, then drops them
    /// from `snapshots.json` and `bundles/chain.json` (by compare-and-swap, so replicas doing
    /// the same agree). Deleting first means a failure leaves them listed for the next round,
    /// never stored and forgotten.
    async fn reap(&self, upstream: &Upstream, ns: &Namespace) -> anyhow::Result<()> {
        let now = unix_now();
        let grace = self.settings.grace.as_secs();
        let due = |since: u64| now.saturating_sub(since) >= grace;

        let index_key = upstream.snapshot_index_key();
        if let Some((index, _)) = self.read_json::<SnapshotIndex>(ns, &index_key).await? {
            let gone: Vec<CommitId> = index
                .retired
                .iter()
                .filter(|r| due(r.since) && !index.commits.contains(&r.commit))
                .map(|r| r.commit.clone())
                .collect();
            if !gone.is_empty() {
                for commit in &gone {
                    match self.tier.delete(ns, &upstream.snapshot_key(commit)).await {
                        Ok(_) => {
                            metrics::counter!("larder_git_snapshots_removed_total").increment(1);
                            tracing::info!(upstream = %upstream, commit = %commit, "old git snapshot removed (--git-keep)");
                        }
                        Err(e) if e.kind == ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.update_json::<SnapshotIndex>(ns, &index_key, |index| {
                    let before = index.retired.len();
                    index.retired.retain(|r| !gone.contains(&r.commit));
                    index.retired.len() != before
                })
                .await?;
            }
        }

        let chain_key = upstream.bundle_chain_key();
        if let Some((chain, _)) = self
            .read_json::<larder_git::BundleChain>(ns, &chain_key)
            .await?
        {
            let gone: Vec<String> = chain
                .retired
                .iter()
                .filter(|r| due(r.since) && !chain.bundles.iter().any(|b| b.id == r.id))
                .map(|r| r.id.clone())
                .collect();
            if !gone.is_empty() {
                for id in &gone {
                    match self.tier.delete(ns, &upstream.bundle_key(id)?).await {
                        Ok(_) => {
                            metrics::counter!("larder_git_bundles_removed_total").increment(1);
                            tracing::info!(upstream = %upstream, bundle = %id, "replaced git bundle removed");
                        }
                        Err(e) if e.kind == ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.update_json::<larder_git::BundleChain>(ns, &chain_key, |chain| {
                    let before = chain.retired.len();
                    chain.retired.retain(|r| !gone.contains(&r.id));
                    chain.retired.len() != before
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Reads the JSON object at `key` (a default one when there is none), lets `change` edit it
    /// (`false`: nothing to write) and writes it back by compare-and-swap, starting over when
    /// another replica wrote first.
    async fn update_json<T>(
        &self,
        ns: &Namespace,
        key: &Key,
        mut change: impl FnMut(&mut T) -> bool,
    ) -> anyhow::Result<()>
    where
        T: Default + serde::Serialize + serde::de::DeserializeOwned,
    {
        for _ in 0..HEAD_CAS_ATTEMPTS {
            let (mut value, precondition) = match self.read_json::<T>(ns, key).await? {
                Some((value, etag)) => (value, WritePrecondition::replace_if(&etag)),
                None => (T::default(), WritePrecondition::create_only()),
            };
            if !change(&mut value) {
                return Ok(());
            }
            let data = serde_json::to_vec(&value)?;
            match self
                .put_small(ns, key, data, precondition, "application/json")
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.kind == ErrorKind::PreconditionFailed => {
                    // The value read may have been a local copy not yet revalidated.
                    self.tier.invalidate(ns, key).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("{key} kept changing under {HEAD_CAS_ATTEMPTS} attempts")
    }

    /// Builds the snapshot of `tip` and stores it create-only under `key`, streaming the
    /// archive. Returns its ETag and size; when another replica stored the
    /// same commit first, theirs.
    async fn generate(
        &self,
        ns: &Namespace,
        upstream: &Upstream,
        mirror: &Mirror,
        tip: &CommitId,
        key: &Key,
        dir: &std::path::Path,
    ) -> anyhow::Result<(ETag, u64)> {
        let work = dir.join("work");
        tokio::fs::create_dir_all(&work).await?;
        let opts = SnapshotOptions::default();
        let checkout = Checkout::build(mirror, tip, &work, &opts).await?;
        let stream = checkout.into_stream(&opts);
        let body: larder_tier::UploadStream = Box::pin(stream.body.boxed());
        let put = self
            .tier
            .put(
                ns,
                key,
                body,
                PutOptions {
                    ttl: self.ttl,
                    precondition: WritePrecondition::create_only(),
                    headers: vec![("content-type".into(), "application/zstd".into())],
                    ..PutOptions::default()
                },
            )
            .await;
        let stats = stream.finished.await;
        match put {
            Ok(put) => {
                let stats = stats??;
                metrics::counter!("larder_git_snapshots_generated_total").increment(1);
                tracing::info!(
                    upstream = %upstream, commit = %tip, size = put.size,
                    files = stats.files, "git snapshot generated"
                );
                Ok((put.etag, put.size))
            }
            // Another replica stored it first (after our claim expired): same commit, an
            // equally good snapshot; publish theirs.
            Err(e) if e.kind == ErrorKind::PreconditionFailed => self
                .stat(ns, key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("snapshot {key} vanished")),
            Err(e) => {
                // The archiver's own error says more than "the body failed".
                stats??;
                Err(e.into())
            }
        }
    }

    /// Replaces the head record with `record` when `decide` allows it, by compare-and-swap.
    async fn publish(
        &self,
        ns: &Namespace,
        upstream: &Upstream,
        mirror: &Mirror,
        record: HeadRecord,
    ) -> anyhow::Result<&'static str> {
        let key = upstream.head_key();
        for _ in 0..HEAD_CAS_ATTEMPTS {
            let current = self.read_head(ns, upstream).await?;
            let lineage = match &current {
                Some((cur, _)) if cur.commit != record.commit => {
                    head::lineage(mirror, &cur.commit, &record.commit).await?
                }
                _ => Lineage::Descendant,
            };
            let decision = head::decide(current.as_ref().map(|(r, _)| r), &record, lineage);
            // `decide` leaves a record of the same commit alone; but one naming another
            // revision of the snapshot names one that expired (snapshots are create-only), and
            // the new revision replaces it.
            let renewed = current.as_ref().is_some_and(|(r, _)| {
                r.commit == record.commit && r.git_ref == record.git_ref && r.etag != record.etag
            });
            if !decision.replaces() && !renewed {
                return Ok("head record left as it is");
            }
            let precondition = match &current {
                Some((_, etag)) => WritePrecondition::replace_if(etag),
                None => WritePrecondition::create_only(),
            };
            let data = bytes::Bytes::from(record.to_json());
            let body: larder_tier::UploadStream =
                Box::pin(futures_util::stream::once(async move { Ok(data) }));
            let put = self
                .tier
                .put(
                    ns,
                    &key,
                    body,
                    PutOptions {
                        ttl: self.ttl,
                        precondition,
                        headers: vec![("content-type".into(), "application/json".into())],
                        ..PutOptions::default()
                    },
                )
                .await;
            match put {
                Ok(_) => {
                    tracing::info!(upstream = %upstream, commit = %record.commit, ?decision, "git head record moved");
                    self.retain(ns, upstream, &record.commit).await?;
                    return Ok("head record moved");
                }
                Err(e) if e.kind == ErrorKind::PreconditionFailed => {
                    // Another replica swapped first, and the record read may have been a local
                    // copy not yet revalidated against S3: drop it, so the next read is fresh.
                    self.tier.invalidate(ns, &key).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("the head record kept changing under {HEAD_CAS_ATTEMPTS} attempts")
    }

    /// Adds `commit` to the repository's snapshot index (`snapshots.json`, oldest first) and
    /// retires the snapshots beyond the newest `keep`, by compare-and-swap on the index so that
    /// replicas agree on what is kept. Called after the head record moved to `commit`, so the
    /// snapshot it names is the newest and never retired. A retired snapshot stays readable
    /// for `--git-grace` (`reap` deletes it then), so a client that resolved the previous head
    /// record just before it moved still downloads it.
    async fn retain(
        &self,
        ns: &Namespace,
        upstream: &Upstream,
        commit: &CommitId,
    ) -> anyhow::Result<()> {
        let keep = self.settings.keep;
        let now = unix_now();
        self.update_json::<SnapshotIndex>(ns, &upstream.snapshot_index_key(), |index| {
            index.commits.retain(|c| c != commit);
            index.commits.push(commit.clone());
            // Made again after it was retired (it expired and the tip had not moved): current.
            index.retired.retain(|r| &r.commit != commit);
            let excess = index.commits.len().saturating_sub(keep);
            index.retired.extend(
                index
                    .commits
                    .drain(..excess)
                    .map(|commit| RetiredSnapshot { commit, since: now }),
            );
            true
        })
        .await
    }

    /// The repository's bundle list in git's format, each bundle URI absolute under `base`
    /// (`http(s)://host[:port]`, no trailing `/`); `None` before the first bundle exists.
    pub async fn bundle_list(
        &self,
        ns: &Namespace,
        upstream: &Upstream,
        base: &str,
    ) -> anyhow::Result<Option<String>> {
        let Some((chain, _)) = self
            .read_json::<larder_git::BundleChain>(ns, &upstream.bundle_chain_key())
            .await?
        else {
            return Ok(None);
        };
        if chain.bundles.is_empty() {
            return Ok(None);
        }
        let list = chain.render_list(|b| match upstream.bundle_key(&b.id) {
            Ok(key) => format!("{base}/api/v1/object/{ns}/{key}"),
            // Ids are made by `extend` (`full-N`, `inc-N`) and always valid keys; a stored
            // chain that says otherwise renders an URI `render_list` refuses.
            Err(_) => String::new(),
        })?;
        Ok(Some(list))
    }

    /// The configured `--git-public-url`, if any.
    pub fn public_url(&self) -> Option<&str> {
        self.settings.public_url.as_deref()
    }

    /// Whether bundle URIs built from a Host header say `https`.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The stored head record and its ETag, if any.
    async fn read_head(
        &self,
        ns: &Namespace,
        upstream: &Upstream,
    ) -> anyhow::Result<Option<(HeadRecord, ETag)>> {
        match self.read_object(ns, &upstream.head_key()).await? {
            Some((data, etag)) => Ok(Some((HeadRecord::from_json(&data)?, etag))),
            None => Ok(None),
        }
    }

    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        ns: &Namespace,
        key: &Key,
    ) -> anyhow::Result<Option<(T, ETag)>> {
        match self.read_object(ns, key).await? {
            Some((data, etag)) => Ok(Some((serde_json::from_slice(&data)?, etag))),
            None => Ok(None),
        }
    }

    /// A small object's bytes and ETag, if it exists.
    async fn read_object(
        &self,
        ns: &Namespace,
        key: &Key,
    ) -> anyhow::Result<Option<(Vec<u8>, ETag)>> {
        let got = match self.tier.get(ns, key, GetOptions::default()).await {
            Ok(got) => got,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match (got.outcome, got.body) {
            (ReadOutcome::Full, Some(body)) => {
                let data = larder_tier::body_to_bytes(body).await?;
                Ok(Some((data, got.meta.etag)))
            }
            (ReadOutcome::NotFound, _) => Ok(None),
            (other, _) => anyhow::bail!("unexpected outcome reading {key}: {other:?}"),
        }
    }

    /// ETag and size of an object, if it exists.
    async fn stat(&self, ns: &Namespace, key: &Key) -> anyhow::Result<Option<(ETag, u64)>> {
        let opts = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self.tier.get(ns, key, opts).await {
            Ok(got) if got.outcome == ReadOutcome::NotFound => Ok(None),
            Ok(got) => Ok(Some((got.meta.etag, got.meta.size))),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the claim on building one commit: `false` when another replica holds it.
    async fn claim(&self, ns: &Namespace, key: &Key) -> anyhow::Result<bool> {
        let owner = bytes::Bytes::from(format!(
            "{{\"pid\":{},\"at\":{}}}\n",
            std::process::id(),
            unix_now()
        ));
        let body: larder_tier::UploadStream =
            Box::pin(futures_util::stream::once(async move { Ok(owner) }));
        let opts = PutOptions {
            // Never longer than the snapshot lives, or a snapshot that expired could not be
            // made again until the claim did.
            ttl: self.settings.claim_ttl.min(self.ttl),
            precondition: WritePrecondition::create_only(),
            ..PutOptions::default()
        };
        match self.tier.put(ns, key, body, opts).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::PreconditionFailed => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

async fn remove_dir(dir: &std::path::Path, url: &str) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(upstream = %url, dir = %dir.display(), error = %e, "cannot remove a git mirror");
    }
}

/// Bytes of the regular files under `dir` (symbolic links not followed).
fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
