//! The node's metrics, rendered in the Prometheus text format at `GET /metrics`.
//!
//! Small and dependency-free: counters keyed by label values, and latency
//! histograms with fixed exponential buckets. Histograms are exposed as
//! Prometheus histograms and, for people reading the page, as p50/p99/p999
//! estimates (the upper bound of the bucket holding the quantile).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds: 50 µs doubling to ~54 s.
const BUCKET_BOUNDS_US: [u64; 21] = {
    let mut bounds = [0u64; 21];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = 50 << i;
        i += 1;
    }
    bounds
};

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket; the last slot counts what exceeds every bound.
    buckets: [AtomicU64; BUCKET_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let slot = BUCKET_BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(BUCKET_BOUNDS_US.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), in seconds;
    /// `None` when empty, infinity when it lies past every bound.
    pub fn quantile_seconds(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (slot, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(
                    BUCKET_BOUNDS_US.get(slot).map_or(f64::INFINITY, |&us| us as f64 / 1e6),
                );
            }
        }
        Some(f64::INFINITY)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (slot, bound) in BUCKET_BOUNDS_US.iter().enumerate() {
            cumulative += self.buckets[slot].load(Ordering::Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {count}");
    }

    /// The p50/p99/p999 estimates as samples of the gauge family `{name}_quantile`.
    fn render_quantiles(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (q, label) in [(0.5, "0.5"), (0.99, "0.99"), (0.999, "0.999")] {
            if let Some(v) = self.quantile_seconds(q) {
                let _ = writeln!(out, "{name}_quantile{{{labels}{sep}quantile=\"{label}\"}} {v}");
            }
        }
    }
}

/// Renders histograms sharing `name` as one histogram family, then their
/// quantile estimates as a separate gauge family, `{name}_quantile` (the text
/// format wants every family's lines in one group, under its own TYPE).
fn render_family(out: &mut String, name: &str, help: &str, histograms: &[(String, &Histogram)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (labels, histogram) in histograms {
        histogram.render(out, name, labels);
    }
    let _ = writeln!(
        out,
        "# HELP {name}_quantile {help} Estimates: the upper bound of the bucket holding the quantile.\n# TYPE {name}_quantile gauge"
    );
    for (labels, histogram) in histograms {
        histogram.render_quantiles(out, name, labels);
    }
}

/// Every metric of a node.
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP requests by (route, method, status).
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// HTTP latency by route.
    latency: Mutex<BTreeMap<String, Arc<Histogram>>>,
    /// Requests refused by load shedding.
    pub shed: AtomicU64,
    /// Requests that ran past the request timeout.
    pub timed_out: AtomicU64,
    /// Requests refused for a missing or wrong token.
    pub unauthorized: AtomicU64,
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Records one finished HTTP request.
    pub fn record_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        {
            let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            *requests.entry((route.to_string(), method.to_string(), status)).or_insert(0) += 1;
        }
        let histogram = {
            let mut latency = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            latency.entry(route.to_string()).or_default().clone()
        };
        histogram.observe(elapsed);
    }

    /// The latency histogram of a route, if it has served a request.
    pub fn route_latency(&self, route: &str) -> Option<Arc<Histogram>> {
        self.latency.lock().unwrap_or_else(|p| p.into_inner()).get(route).cloned()
    }

    /// Renders the HTTP metrics; `gauges` (counters when named `*_total`) and
    /// `histograms`, each (name, help, value), append metrics owned elsewhere.
    pub fn render(
        &self,
        gauges: &[(&str, &str, f64)],
        histograms: &[(&str, &str, &Histogram)],
    ) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP calmkv_http_requests_total HTTP requests by route, method and status.\n",
        );
        out.push_str("# TYPE calmkv_http_requests_total counter\n");
        for ((route, method, status), n) in
            self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter()
        {
            let _ = writeln!(
                out,
                "calmkv_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            );
        }
        let latency: Vec<(String, Arc<Histogram>)> = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(route, h)| (format!("route=\"{route}\""), h.clone()))
            .collect();
        let latency: Vec<(String, &Histogram)> =
            latency.iter().map(|(labels, h)| (labels.clone(), h.as_ref())).collect();
        render_family(
            &mut out,
            "calmkv_http_request_duration_seconds",
            "HTTP latency by route.",
            &latency,
        );
        for (name, help, value) in [
            ("calmkv_http_requests_shed_total", "Requests refused by load shedding.", &self.shed),
            ("calmkv_http_requests_timed_out_total", "Requests past the timeout.", &self.timed_out),
            (
                "calmkv_http_requests_unauthorized_total",
                "Requests without a valid token.",
                &self.unauthorized,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        for (name, help, value) in gauges {
            // By Prometheus convention a `_total` is a counter; the rest are gauges.
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        for (name, help, histogram) in histograms {
            render_family(&mut out, name, help, &[(String::new(), histogram)]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_bucket_holding_them() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.observe(Duration::from_micros(40));
        }
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        assert_eq!(h.quantile_seconds(0.5), Some(50e-6));
        assert_eq!(h.quantile_seconds(0.99), Some(3.2e-3));
        assert_eq!(h.quantile_seconds(0.999), Some(f64::INFINITY));
    }

    #[test]
    fn an_empty_histogram_has_no_quantiles() {
        assert_eq!(Histogram::default().quantile_seconds(0.5), None);
    }

    /// Each family's samples form one group right after its TYPE line, as the
    /// text format requires: with two routes, the latency histogram's lines do
    /// not interleave with its quantile estimates.
    #[test]
    fn every_family_is_one_group_under_its_own_type() {
        let m = Metrics::default();
        m.record_request("/a", "GET", 200, Duration::from_micros(120));
        m.record_request("/b", "GET", 200, Duration::from_millis(3));
        let flushes = Histogram::default();
        flushes.observe(Duration::from_millis(2));
        let text = m.render(&[], &[("calmkv_store_flush_seconds", "Flushes.", &flushes)]);
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(typed.insert(name.to_string(), kind.to_string()).is_none(), "{name} twice");
                current = Some(name.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let series = line.split(['{', ' ']).next().unwrap();
            let family = current.as_deref().expect("a sample after a TYPE line");
            let belongs = match typed[family].as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| series.strip_suffix(suffix) == Some(family)),
                _ => series == family,
            };
            assert!(belongs, "{series} sampled under the TYPE of {family}:\n{text}");
        }
        assert_eq!(typed["calmkv_http_request_duration_seconds_quantile"], "gauge");
        assert_eq!(typed["calmkv_store_flush_seconds_quantile"], "gauge");
    }

    #[test]
    fn rendering_lists_requests_and_quantiles() {
        let m = Metrics::default();
        m.record_request("/v1/kv/{*key}", "GET", 200, Duration::from_micros(120));
        let flushes = Histogram::default();
        flushes.observe(Duration::from_millis(2));
        let text = m.render(
            &[("calmkv_store_size_bytes", "Store size.", 42.0)],
            &[("calmkv_store_flush_seconds", "Flush latency.", &flushes)],
        );
        assert!(text.contains(
            "calmkv_http_requests_total{route=\"/v1/kv/{*key}\",method=\"GET\",status=\"200\"} 1"
        ));
        assert!(text.contains("calmkv_http_request_duration_seconds_quantile{route=\"/v1/kv/{*key}\",quantile=\"0.99\"} 0.0002"));
        assert!(text.contains("calmkv_store_size_bytes 42"));
        assert!(text.contains("calmkv_store_flush_seconds_count 1"));
        assert!(text.contains("calmkv_store_flush_seconds_quantile{quantile=\"0.5\"} 0.0032"));
    }
}
