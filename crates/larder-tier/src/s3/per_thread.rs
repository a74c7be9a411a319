//! One S3 client per thread.
//!
//! A pooled HTTP connection is served by a task on the runtime that opened it. larderd runs one
//! single-threaded runtime per core, so with one client for the process, a worker's S3 request
//! often went over a connection another worker (or the start-up runtime) had opened: every
//! frame of the body then woke that other thread, which handed it back across threads (a fill
//! of 1 GiB made about 11,000 context switches on each of two workers). With a client per
//! thread, a worker's S3 requests travel over its own connections, on its own thread.
//!
//! Each thread builds its client the first time it talks to S3; the client built at start-up
//! (which checked the configuration) serves the thread that built it, and any thread whose own
//! client cannot be built.

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

type Build = dyn Fn() -> Option<Arc<dyn ObjectStore>> + Send + Sync;

pub(crate) struct PerThreadStore {
    /// Tells this store's clients apart from other stores' in a thread's list.
    id: u64,
    /// Dropped with the store: a thread's list forgets clients whose store is gone.
    alive: Arc<()>,
    first: Arc<dyn ObjectStore>,
    build: Box<Build>,
}

/// A thread's client of one store: the store's id, whether that store still exists, the client.
type ThreadClient = (u64, Weak<()>, Arc<dyn ObjectStore>);

thread_local! {
    static CLIENTS: RefCell<Vec<ThreadClient>> = const { RefCell::new(Vec::new()) };
}

impl PerThreadStore {
    /// `first` serves the calling thread; `build` makes the client of each other thread.
    pub(crate) fn new(
        first: Arc<dyn ObjectStore>,
        build: impl Fn() -> Option<Arc<dyn ObjectStore>> + Send + Sync + 'static,
    ) -> PerThreadStore {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let store = PerThreadStore {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
            first: first.clone(),
            build: Box::new(build),
        };
        store.remember(first);
        store
    }

    fn remember(&self, client: Arc<dyn ObjectStore>) {
        let _ = CLIENTS.try_with(|clients| {
            let mut clients = clients.borrow_mut();
            clients.retain(|(_, alive, _)| alive.strong_count() > 0);
            clients.push((self.id, Arc::downgrade(&self.alive), client));
        });
    }

    /// The calling thread's client, built on first use.
    fn client(&self) -> Arc<dyn ObjectStore> {
        let known = CLIENTS
            .try_with(|clients| {
                clients
                    .borrow()
                    .iter()
                    .find(|(id, _, _)| *id == self.id)
                    .map(|(_, _, client)| client.clone())
            })
            .ok()
            .flatten();
        if let Some(client) = known {
            return client;
        }
        match (self.build)() {
            Some(client) => {
                self.remember(client.clone());
                client
            }
            None => self.first.clone(),
        }
    }
}

impl fmt::Debug for PerThreadStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PerThread({:?})", self.first)
    }
}

impl fmt::Display for PerThreadStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PerThread({})", self.first)
    }
}

#[async_trait]
impl ObjectStore for PerThreadStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.client().put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.client().put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.client().get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.client().delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.client().list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.client().list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.client().copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn each_thread_talks_through_its_own_client_and_keeps_it() {
        let built = Arc::new(AtomicUsize::new(0));
        let counted = built.clone();
        let first: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = Arc::new(PerThreadStore::new(first.clone(), move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Some(Arc::new(InMemory::new()) as Arc<dyn ObjectStore>)
        }));
        assert!(
            Arc::ptr_eq(&store.client(), &first),
            "the building thread keeps the first"
        );
        assert_eq!(built.load(Ordering::SeqCst), 0);
        let others: Vec<_> = (0..3)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mine = store.client();
                    assert!(Arc::ptr_eq(&store.client(), &mine), "kept for the thread");
                    Arc::as_ptr(&mine) as *const () as usize
                })
                .join()
                .unwrap()
            })
            .collect();
        assert_eq!(
            built.load(Ordering::SeqCst),
            3,
            "one client built per other thread"
        );
        let first_at = Arc::as_ptr(&first) as *const () as usize;
        assert!(others.iter().all(|&at| at != first_at));
    }

    #[test]
    fn a_thread_whose_client_cannot_be_built_uses_the_first() {
        let first: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = Arc::new(PerThreadStore::new(first.clone(), || None));
        let same = std::thread::spawn({
            let (store, first) = (store.clone(), first.clone());
            move || Arc::ptr_eq(&store.client(), &first)
        });
        assert!(same.join().unwrap());
    }

    #[tokio::test]
    async fn requests_reach_the_threads_client() {
        let first: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = PerThreadStore::new(first.clone(), || None);
        let path = Path::from("k");
        store
            .put(&path, PutPayload::from_static(b"v"))
            .await
            .unwrap();
        let got = first.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"v");
    }

    #[test]
    fn a_dropped_stores_clients_are_forgotten_by_the_thread() {
        let make = || Arc::new(InMemory::new()) as Arc<dyn ObjectStore>;
        let old = PerThreadStore::new(make(), || None);
        drop(old);
        let _new = PerThreadStore::new(make(), || None);
        let held = CLIENTS.with(|clients| clients.borrow().len());
        assert_eq!(held, 1, "only the live store's client stays");
    }
}
