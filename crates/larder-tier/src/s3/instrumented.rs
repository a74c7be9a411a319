//! An `ObjectStore` wrapper that measures every S3 request: a latency histogram and an error
//! counter per operation, the series an operator alerts on when the shared bucket degrades.
//!
//! Answers that are part of the protocol (404 on a reference, 412/409 on a conditional write)
//! count as answers, not errors.

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug)]
pub(crate) struct InstrumentedStore {
    inner: Arc<dyn ObjectStore>,
}

impl InstrumentedStore {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>) -> InstrumentedStore {
        InstrumentedStore { inner }
    }
}

impl fmt::Display for InstrumentedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Instrumented({})", self.inner)
    }
}

fn record<T>(op: &'static str, started: Instant, result: &Result<T>) {
    metrics::histogram!("larder_s3_request_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        let answer = matches!(
            e,
            object_store::Error::NotFound { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::NotModified { .. }
        );
        if !answer {
            metrics::counter!("larder_s3_errors_total", "op" => op).increment(1);
        }
    }
}

#[async_trait]
impl ObjectStore for InstrumentedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let started = Instant::now();
        let r = self.inner.put_opts(location, payload, opts).await;
        record("put", started, &r);
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let started = Instant::now();
        let r = self.inner.put_multipart_opts(location, opts).await;
        record("multipart_start", started, &r);
        r
    }

    /// Measures the time to the response head; body bytes stream afterwards.
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head { "head" } else { "get" };
        let started = Instant::now();
        let r = self.inner.get_opts(location, options).await;
        record(op, started, &r);
        r
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let started = Instant::now();
        self.inner
            .delete_stream(locations)
            .map(move |r| {
                record("delete", started, &r);
                r
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner
            .list(prefix)
            .map(|r| {
                if r.is_err() {
                    metrics::counter!("larder_s3_errors_total", "op" => "list").increment(1);
                }
                r
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let started = Instant::now();
        let r = self.inner.list_with_delimiter(prefix).await;
        record("list", started, &r);
        r
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.copy_opts(from, to, options).await;
        record("copy", started, &r);
        r
    }
}
