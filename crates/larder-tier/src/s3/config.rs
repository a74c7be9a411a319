//! Settings of the S3 tier and the `object_store` client built from them.
//!
//! Kept apart from the tier so that the server's configuration layer (flags, environment, TOML)
//! and tests can fill one plain struct, and so that every client knob that matters for
//! correctness under failure — timeouts, retry budget, path-style addressing, conditional PUT —
//! is set in one place rather than inherited from whatever the environment says.

use crate::error::{ErrorKind, TierError};
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use std::fmt;
use std::time::Duration;

/// S3 rejects multipart parts smaller than this (except the last one).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// The largest `inline_body_max` accepted. A reference is read whole on every revalidation,
/// listing and compare-and-swap, and recently read ones are kept in memory, so only bodies whose
/// transfer costs less than a round trip belong in it.
pub const MAX_INLINE_BODY: usize = 1 << 20;

/// Settings of an [`S3Tier`](crate::S3Tier): where the bucket is, credentials, and the client's
/// sizes, concurrency and time limits. [`S3Config::new`] gives the defaults; `Debug` redacts the
/// secret and the session token.
#[derive(Clone)]
pub struct S3Config {
    /// Bucket name; must not be empty.
    pub bucket: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); `None` means AWS itself.
    pub endpoint: Option<String>,
    /// Region to sign requests for; `us-east-1` by default.
    pub region: String,
    /// Key prefix inside the bucket ("" or e.g. `larder/prod`), without leading or trailing `/`.
    pub prefix: String,
    /// `None` lets `object_store` find credentials itself (instance metadata, web identity).
    pub access_key_id: Option<String>,
    /// The secret paired with `access_key_id`; never shown by `Debug`.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials, if any; never shown by `Debug`.
    pub session_token: Option<String>,
    /// Required for `http://` endpoints (loopback test servers, in-cluster MinIO).
    pub allow_http: bool,
    /// `bucket.host/key` instead of `host/bucket/key`. Off by default because RGW, MinIO and
    /// Garage deployments rarely have the wildcard DNS it needs.
    pub virtual_hosted_style: bool,
    /// Multipart upload part size, and the size below which a body goes up in one PUT.
    pub part_size: usize,
    /// Parts of one upload in flight at once (memory: about this many × `part_size`).
    pub upload_concurrency: usize,
    /// Bodies of at most this many bytes travel inside their reference object instead of a body
    /// object of their own: a small write is then one conditional PUT (plus a reference read when
    /// the key may exist), and a cold small read one GET, where a separate body costs a round
    /// trip more each way.
    /// 0 keeps every body in its own object. At most [`MAX_INLINE_BODY`].
    pub inline_body_max: usize,
    /// Size of each ranged GET when reading a body.
    pub read_part_size: u64,
    /// Ranged GETs of one read in flight at once (memory: about this many × `read_part_size`).
    pub read_concurrency: usize,
    /// Limit for one HTTP request including its body (one part), so a hung server cannot hold
    /// a request forever.
    pub request_timeout: Duration,
    /// Limit for establishing a connection; a dead endpoint must turn into a 503 quickly.
    pub connect_timeout: Duration,
    /// Limit for a whole small operation (reading or writing a reference object), retries
    /// included.
    pub metadata_timeout: Duration,
    /// Retries of a failed request (connection errors, 5xx), with exponential backoff.
    pub max_retries: usize,
    /// No retry starts after this much time since the first attempt.
    pub retry_timeout: Duration,
    /// Refuse to start on a server that ignores conditional PUT (Garage, old MinIO): without it
    /// create-only and compare-and-swap writes silently overwrite.
    pub require_conditional_put: bool,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("part_size", &self.part_size)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("inline_body_max", &self.inline_body_max)
            .field("read_part_size", &self.read_part_size)
            .field("read_concurrency", &self.read_concurrency)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("metadata_timeout", &self.metadata_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .field("require_conditional_put", &self.require_conditional_put)
            .finish()
    }
}

impl S3Config {
    /// Defaults for everything but the bucket.
    pub fn new(bucket: impl Into<String>) -> S3Config {
        S3Config {
            bucket: bucket.into(),
            endpoint: None,
            region: "us-east-1".into(),
            prefix: String::new(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            allow_http: false,
            virtual_hosted_style: false,
            part_size: 8 << 20,
            upload_concurrency: 4,
            inline_body_max: 64 << 10,
            read_part_size: 8 << 20,
            read_concurrency: 4,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            metadata_timeout: Duration::from_secs(5),
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
            require_conditional_put: true,
        }
    }

    /// From the standard variables: `S3_BUCKET`, `AWS_ENDPOINT_URL`, `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    /// `None` when no bucket is named. An `http://` endpoint allows plain HTTP.
    pub fn from_env() -> Option<S3Config> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut config = S3Config::new(var("S3_BUCKET")?);
        config.endpoint = var("AWS_ENDPOINT_URL");
        config.allow_http = config
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        if let Some(region) = var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")) {
            config.region = region;
        }
        config.access_key_id = var("AWS_ACCESS_KEY_ID");
        config.secret_access_key = var("AWS_SECRET_ACCESS_KEY");
        config.session_token = var("AWS_SESSION_TOKEN");
        Some(config)
    }

    pub(crate) fn validate(&self) -> Result<(), TierError> {
        let invalid = |m: String| Err(TierError::new(ErrorKind::InvalidInput, m));
        if self.bucket.is_empty() {
            return invalid("S3 bucket name is empty".into());
        }
        if self.part_size < MIN_PART_SIZE {
            return invalid(format!(
                "S3 part size {} is below the S3 minimum of {MIN_PART_SIZE} bytes",
                self.part_size
            ));
        }
        if self.read_part_size == 0 || self.read_concurrency == 0 || self.upload_concurrency == 0 {
            return invalid("S3 read part size and concurrencies must be positive".into());
        }
        if self.inline_body_max > MAX_INLINE_BODY {
            return invalid(format!(
                "S3 inline body limit {} is above the maximum of {MAX_INLINE_BODY} bytes",
                self.inline_body_max
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return invalid(format!(
                "S3 prefix {:?} must not start or end with '/'",
                self.prefix
            ));
        }
        if !self.prefix.is_empty() && object_store::path::Path::parse(&self.prefix).is_err() {
            return invalid(format!(
                "S3 prefix {:?} is not a valid key prefix",
                self.prefix
            ));
        }
        Ok(())
    }

    /// The `object_store` client for this configuration. Public so that tools and tests can
    /// look at the bucket exactly as the tier sees it.
    pub fn build_store(&self) -> Result<AmazonS3, TierError> {
        self.validate()?;
        let client = ClientOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
            .with_allow_http(self.allow_http);
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_allow_http(self.allow_http)
            .with_virtual_hosted_style_request(self.virtual_hosted_style)
            .with_client_options(client)
            .with_retry(retry)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(id) = &self.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &self.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(token) = &self.session_token {
            builder = builder.with_token(token);
        }
        builder.build().map_err(|e| {
            TierError::new(
                ErrorKind::InvalidInput,
                format!("S3 configuration: {}", super::error::one_line(&e)),
            )
        })
    }
}
