//! One request at a time: discovery, a pinned range with retries over the replicas, sending with
//! the idle timeout, and reading a body into a recycled buffer with progress accounting.

use super::*;

impl Shared {
    /// The first range request: size, ETag and first chunk of the current revision.
    pub(super) async fn discover(&self, restarts: u32) -> Result<Discovered, Error> {
        // A fresh pin: every replica may serve it, whatever it served before.
        for replica in &self.replicas {
            replica.diverged.store(false, Ordering::Relaxed);
        }
        let mut attempts = 0u32;
        let mut avoid = None;
        loop {
            let r = self.pick(u64::from(restarts) + u64::from(attempts), avoid);
            let started = Instant::now();
            match self.try_discover(r).await {
                Ok(found) => {
                    // A full range request like the others: the first hint of what is normal.
                    if found.first.len() as u64 == self.chunk_size {
                        self.hedging.record(started.elapsed());
                    }
                    self.replicas[r].succeeded();
                    self.origin.store(r, Ordering::Relaxed);
                    return Ok(found);
                }
                Err(Fail::Transient { why, connect }) => {
                    self.replicas[r].failed();
                    attempts += 1;
                    if attempts > self.retries {
                        return Err(self.exhausted(r, attempts, "the first range", why, connect));
                    }
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    let next = self.pick(u64::from(restarts) + u64::from(attempts), Some(r));
                    tokio::time::sleep(self.backoff(attempts, r, next)).await;
                    avoid = Some(r);
                }
                // Nothing is pinned yet, so a "change" is just another failure to report.
                Err(Fail::Changed(why)) => return Err(Error::Protocol(why)),
                Err(Fail::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Fetches one pinned range, retrying transient failures.
    pub(super) async fn fetch(
        &self,
        index: u64,
        range: ByteRange,
        pin: &Pin,
    ) -> Result<Bytes, Stop> {
        let mut attempts = 0u32;
        let mut r = self.pick(index, None);
        loop {
            let (answered, result) = self.try_range_hedged(index, r, range, pin).await;
            r = answered;
            match result {
                Ok(data) => {
                    self.replicas[r].succeeded();
                    return Ok(data);
                }
                Err(Fail::Transient { why, connect }) => {
                    self.replicas[r].failed();
                    attempts += 1;
                    if attempts > self.retries {
                        if self.any_diverged() {
                            // Those left cannot deliver the pin and the others no longer have
                            // it: a fresh discovery pins what the live replicas serve.
                            return Err(Stop::Restart(format!(
                                "the replicas that still serve the pinned revision failed \
                                 ({why})"
                            )));
                        }
                        let what = format!("bytes {}-{}", range.start, range.last());
                        return Err(Stop::Fatal(
                            self.exhausted(r, attempts, &what, why, connect),
                        ));
                    }
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    let next = self.pick(index, Some(r));
                    tokio::time::sleep(self.backoff(attempts, r, next)).await;
                    r = self.pick(index, Some(r));
                }
                Err(Fail::Changed(why)) => {
                    if r == self.origin.load(Ordering::Relaxed) {
                        return Err(Stop::Restart(why));
                    }
                    // Another replica than the origin: it diverged, the pin is still served.
                    if !self.replicas[r].diverged.swap(true, Ordering::Relaxed) {
                        self.progress.note(&format!(
                            "{why}; finishing the download of {} from the other replicas",
                            self.name
                        ));
                    }
                    r = self.pick(index, Some(r));
                }
                Err(Fail::Fatal(e)) => return Err(Stop::Fatal(e)),
            }
        }
    }

    pub(super) async fn send(
        &self,
        r: usize,
        req: reqwest::RequestBuilder,
    ) -> Result<Response, Fail> {
        let url = self.replicas[r].client.base_url();
        match tokio::time::timeout(self.idle, req.send()).await {
            Err(_) => Err(transient(format!(
                "{url} sent no response within {}s",
                self.idle.as_secs_f64()
            ))),
            // No replica will present a certificate this client trusts more than this one did.
            Ok(Err(e)) if crate::error::is_certificate_error(&e) => Err(Fail::Fatal(
                Error::request("GET", &self.name.to_string(), url, e),
            )),
            // Only a refused or unroutable connection means "not running"; a reset after
            // connecting is an ordinary transient failure.
            Ok(Err(e)) if e.is_connect() => {
                let cause = crate::error::innermost_cause(&e);
                Err(Fail::Transient {
                    why: format!("cannot connect ({cause})"),
                    connect: Some(cause),
                })
            }
            Ok(Err(e)) => Err(transient(format!(
                "{url}: the request failed ({})",
                crate::error::causes(&e)
            ))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    pub(super) async fn try_discover(&self, r: usize) -> Result<Discovered, Fail> {
        let client = &self.replicas[r].client;
        let url = client.base_url();
        let want = ByteRange {
            start: 0,
            len: self.chunk_size,
        };
        let req = client
            .request(Method::GET, &self.name)
            .header(header::RANGE, want.to_header());
        let resp = self.send_checked(r, req, false).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let etag = response_etag(&headers)
            .ok_or_else(|| transient(format!("{url} answered {status} without a larder ETag")))?;
        let base = |size: u64| ObjectInfo {
            etag: etag.clone(),
            size,
            last_modified: text(&headers, header::LAST_MODIFIED)
                .and_then(|v| httpdate::parse_http_date(v).ok()),
            content_type: text(&headers, header::CONTENT_TYPE).map(str::to_string),
        };
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let raw = text(&headers, header::CONTENT_RANGE).unwrap_or("");
                let (got, total) = parse_content_range(raw).ok_or_else(|| {
                    transient(format!(
                        "{url} answered 206 with an invalid Content-Range {raw:?}"
                    ))
                })?;
                let expect = ByteRange {
                    start: 0,
                    len: self.chunk_size.min(total),
                };
                check_range(url, got, expect, total, raw)?;
                check_length(url, &headers, got.len)?;
                let first = self.read_body(r, resp, got.len).await?;
                Ok(Discovered {
                    info: base(total),
                    first,
                })
            }
            StatusCode::OK => {
                // The whole object: larderd sends this only when it ignores the Range header.
                let size = content_length(&headers).ok_or_else(|| {
                    transient(format!("{url} answered 200 without a Content-Length"))
                })?;
                if size > self.chunk_size {
                    return Err(Fail::Fatal(Error::Protocol(format!(
                        "{url} ignored the Range request (it answered 200 with all {size} bytes); \
                         parallel downloads need range support: is --url pointing at larderd?"
                    ))));
                }
                let first = self.read_body(r, resp, size).await?;
                Ok(Discovered {
                    info: base(size),
                    first,
                })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // `bytes=0-…` is unsatisfiable only for an empty object.
                let raw = text(&headers, header::CONTENT_RANGE).unwrap_or("");
                if raw.trim() == "bytes */0" {
                    Ok(Discovered {
                        info: base(0),
                        first: Bytes::new(),
                    })
                } else {
                    Err(transient(format!(
                        "{url} answered 416 to a request for the first bytes, with Content-Range \
                         {raw:?}"
                    )))
                }
            }
            other => Err(transient(format!(
                "{url} answered {other} to a range request"
            ))),
        }
    }

    pub(super) async fn try_range(
        &self,
        r: usize,
        range: ByteRange,
        pin: &Pin,
    ) -> Result<Bytes, Fail> {
        let client = &self.replicas[r].client;
        let url = client.base_url();
        let req = client
            .request(Method::GET, &self.name)
            .header(header::RANGE, range.to_header())
            .header(header::IF_MATCH, pin.etag.header_value());
        let resp = self.send_checked(r, req, true).await?;
        let status = resp.status();
        let headers = resp.headers();
        match status {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::PRECONDITION_FAILED => {
                let now =
                    response_etag(headers).map_or_else(|| "unknown".to_string(), |e| e.to_string());
                return Err(Fail::Changed(format!(
                    "{url} no longer serves ETag {}, the current one is {now}",
                    pin.etag
                )));
            }
            // With If-Match a server must answer 412 before 416; either way the revision is gone.
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(Fail::Changed(format!(
                    "{url} answered 416 for bytes {}-{} of ETag {}",
                    range.start,
                    range.last(),
                    pin.etag
                )));
            }
            StatusCode::OK => {
                return Err(transient(format!(
                    "{url} answered 200 (the whole object) to a request for bytes {}-{}",
                    range.start,
                    range.last()
                )));
            }
            other => {
                return Err(transient(format!(
                    "{url} answered {other} to a request for bytes {}-{}",
                    range.start,
                    range.last()
                )));
            }
        }
        match response_etag(headers) {
            Some(e) if e == pin.etag => {}
            // The server ignored If-Match: what it sends is of another revision.
            Some(e) => {
                return Err(Fail::Changed(format!(
                    "{url} answered ETag {e} to a request pinned to {}",
                    pin.etag
                )));
            }
            None => {
                return Err(transient(format!(
                    "{url} answered 206 without a larder ETag"
                )));
            }
        }
        let raw = text(headers, header::CONTENT_RANGE).unwrap_or("");
        let (got, total) = parse_content_range(raw).ok_or_else(|| {
            transient(format!(
                "{url} answered 206 with an invalid Content-Range {raw:?}"
            ))
        })?;
        check_range(url, got, range, pin.total, raw)?;
        if total != pin.total {
            return Err(transient(format!(
                "{url} answered Content-Range {raw:?} but ETag {} has {} bytes",
                pin.etag, pin.total
            )));
        }
        check_length(url, headers, range.len)?;
        self.read_body(r, resp, range.len).await
    }

    /// Sends, and sorts the statuses that are never worth a retry (404, other 4xx) from the rest.
    pub(super) async fn send_checked(
        &self,
        r: usize,
        req: reqwest::RequestBuilder,
        pinned: bool,
    ) -> Result<Response, Fail> {
        let resp = self.send(r, req).await?;
        let status = resp.status();
        if status.is_success()
            || status == StatusCode::PRECONDITION_FAILED
            || status == StatusCode::RANGE_NOT_SATISFIABLE
        {
            return Ok(resp);
        }
        let url = self.replicas[r].client.base_url();
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            let reason = self.replicas[r].client.reason(status, resp).await;
            return Err(transient(format!("{url} answered {status}: {reason}")));
        }
        if status == StatusCode::NOT_FOUND && pinned {
            // Deleted since discovery: a fresh discovery reports the miss properly.
            return Err(Fail::Changed(format!("{url} no longer has the object")));
        }
        Err(Fail::Fatal(
            self.replicas[r]
                .client
                .failure("GET", &self.name, resp)
                .await,
        ))
    }

    /// Reads exactly `len` body bytes, each wait bounded by the idle timeout.
    pub(super) async fn read_body(
        &self,
        r: usize,
        mut resp: Response,
        len: u64,
    ) -> Result<Bytes, Fail> {
        let url = self.replicas[r].client.base_url();
        let mut buf = self.pool.take(len as usize);
        // Bytes shown on the progress bar are taken back unless the range is delivered: after
        // a failure, and when a hedge race drops this request half-way.
        let mut shown = ShownBytes {
            progress: &self.progress,
            bytes: 0,
        };
        let fail = |why: String| Err(transient(format!("{url}: {why}")));
        loop {
            let next = match tokio::time::timeout(self.idle, resp.chunk()).await {
                Err(_) => {
                    return fail(format!(
                        "the body stalled: no data for {}s after {} of {len} bytes",
                        self.idle.as_secs_f64(),
                        buf.len()
                    ));
                }
                Ok(Err(e)) => {
                    let cause = crate::error::causes(&e);
                    return fail(format!(
                        "the body broke off after {} of {len} bytes ({cause})",
                        buf.len()
                    ));
                }
                Ok(Ok(next)) => next,
            };
            let Some(bytes) = next else { break };
            if buf.len() as u64 + bytes.len() as u64 > len {
                return fail(format!("the body is longer than the {len} bytes announced"));
            }
            buf.extend_from_slice(&bytes);
            self.replicas[r]
                .bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.progress.inc(bytes.len() as u64);
            shown.bytes += bytes.len() as u64;
        }
        if buf.len() as u64 != len {
            return fail(format!("the body ended after {} of {len} bytes", buf.len()));
        }
        shown.bytes = 0;
        Ok(buf.freeze())
    }
}

/// Progress of a range still being read; see [`Shared::read_body`].
pub(super) struct ShownBytes<'a> {
    pub(super) progress: &'a Progress,
    pub(super) bytes: u64,
}

impl Drop for ShownBytes<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.progress.dec(self.bytes);
        }
    }
}
