//! Prometheus metrics: the recorder installed at start-up and the per-request series.

use http::{Method, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::time::Instant;

/// Latency buckets (seconds) from a page-cache hit to a multi-GiB transfer: histograms rather
/// than the exporter's default summaries, so replicas can be aggregated and alerted on.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

pub fn install() -> anyhow::Result<PrometheusHandle> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), DURATION_BUCKETS)?
        .install_recorder()?)
}

pub struct RequestMetrics<'a> {
    pub route: &'static str,
    pub method: &'a Method,
    pub status: StatusCode,
    pub started: Instant,
}

impl RequestMetrics<'_> {
    pub fn record(self) {
        // Static label values: no allocation per request on the hot path.
        let method = static_method(self.method);
        metrics::counter!(
            "larder_http_requests_total",
            "route" => self.route,
            "method" => method,
            "status" => static_status(self.status)
        )
        .increment(1);
        metrics::histogram!("larder_http_request_duration_seconds", "route" => self.route, "method" => method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

fn static_method(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

fn static_status(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200 => "200",
        201 => "201",
        204 => "204",
        206 => "206",
        304 => "304",
        400 => "400",
        404 => "404",
        405 => "405",
        401 => "401",
        403 => "403",
        408 => "408",
        409 => "409",
        412 => "412",
        413 => "413",
        416 => "416",
        431 => "431",
        500 => "500",
        502 => "502",
        503 => "503",
        507 => "507",
        s if (400..500).contains(&s) => "4xx",
        s if s >= 500 => "5xx",
        _ => "other",
    }
}

/// Counts a request or connection refused by one of the protective limits (`limit` is a static
/// name such as "uploads" or "header_timeout").
pub fn limit_rejected(limit: &'static str) {
    metrics::counter!("larder_limit_rejections_total", "limit" => limit).increment(1);
}
