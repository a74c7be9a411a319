//! Prometheus metrics: the recorder installed at start-up and the per-request series.

use http::{Method, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::time::Instant;

pub fn install() -> anyhow::Result<PrometheusHandle> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

pub struct RequestMetrics<'a> {
    pub route: &'static str,
    pub method: &'a Method,
    pub status: StatusCode,
    pub started: Instant,
}

impl RequestMetrics<'_> {
    pub fn record(self) {
        let method = self.method.as_str().to_string();
        metrics::counter!(
            "larder_http_requests_total",
            "route" => self.route,
            "method" => method.clone(),
            "status" => self.status.as_str().to_string()
        )
        .increment(1);
        metrics::histogram!("larder_http_request_duration_seconds", "route" => self.route, "method" => method)
            .record(self.started.elapsed().as_secs_f64());
    }
}
