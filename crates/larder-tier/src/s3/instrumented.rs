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

/// One S3 request being measured: recorded when its answer arrives, or, when the caller gives
/// up first (larderd's own deadline on small operations), when it is dropped — as an error that
/// took as long as it was given. Those timed-out requests are the failures an operator of a
/// slow bucket most needs to see.
struct Measured {
    op: &'static str,
    started: Instant,
    ended: bool,
}

impl Measured {
    fn start(op: &'static str) -> Measured {
        Measured {
            op,
            started: Instant::now(),
            ended: false,
        }
    }

    fn ended<T>(mut self, result: &Result<T>) {
        self.ended = true;
        let answer = match result {
            Ok(_) => true,
            Err(e) => matches!(
                e,
                object_store::Error::NotFound { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::NotModified { .. }
            ),
        };
        record(self.op, self.started, answer);
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        if !self.ended {
            record(self.op, self.started, false);
        }
    }
}

fn record(op: &'static str, started: Instant, answered: bool) {
    metrics::histogram!("larder_s3_request_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if !answered {
        metrics::counter!("larder_s3_errors_total", "op" => op).increment(1);
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
        let measured = Measured::start("put");
        let r = self.inner.put_opts(location, payload, opts).await;
        measured.ended(&r);
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let measured = Measured::start("multipart_start");
        let r = self.inner.put_multipart_opts(location, opts).await;
        measured.ended(&r);
        r
    }

    /// Measures the time to the response head; body bytes stream afterwards.
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head { "head" } else { "get" };
        let measured = Measured::start(op);
        let r = self.inner.get_opts(location, options).await;
        measured.ended(&r);
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
                let answered = matches!(r, Ok(_) | Err(object_store::Error::NotFound { .. }));
                record("delete", started, answered);
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
        let measured = Measured::start("list");
        let r = self.inner.list_with_delimiter(prefix).await;
        measured.ended(&r);
        r
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let measured = Measured::start("copy");
        let r = self.inner.copy_opts(from, to, options).await;
        measured.ended(&r);
        r
    }
}
