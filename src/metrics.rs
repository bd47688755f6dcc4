//! The node's metrics, rendered in the Prometheus text format at `GET /metrics`.
//!
//! Small and dependency-free: request counters by route, method and status, and
//! latency histograms with fixed exponential buckets. Histograms are exposed as
//! Prometheus histograms and, for people reading the page, as p50/p99/p999
//! estimates (the upper bound of the bucket holding the quantile).
//!
//! Recording a request takes no lock and allocates nothing: every counter and
//! bucket is an atomic in a table fixed at start ([`ROUTES_MAX`] routes, the
//! common methods, every registered status code). A route's slot is claimed on
//! its first request, under a lock taken only then; the router has a fixed set
//! of routes, so after warm-up no request takes it. (`prometheus-client` was
//! not adopted: its label families are maps behind a lock.)

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
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

/// Most routes counted apart; the requests of any further route count under
/// the route `other`. The API has about ten.
pub const ROUTES_MAX: usize = 32;

/// Methods counted apart; any other counts as `OTHER`.
const METHODS: [&str; 8] = ["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH", "OTHER"];

/// Status codes counted apart: those of the IANA HTTP status code registry.
/// Any other counts under the status `other`.
const STATUSES: [u16; 63] = [
    100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304,
    305, 307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415,
    416, 417, 421, 422, 423, 424, 425, 426, 428, 429, 431, 451, 500, 501, 502, 503, 504, 505, 506,
    507, 508, 510, 511, 418, 309,
];

/// Slots per method: one per status in [`STATUSES`], and `other`.
const STATUS_SLOTS: usize = STATUSES.len() + 1;

/// Status code → slot in [`STATUSES`]; `u8::MAX` for the codes not listed.
const STATUS_SLOT: [u8; 600] = {
    let mut slots = [u8::MAX; 600];
    let mut i = 0;
    while i < STATUSES.len() {
        slots[STATUSES[i] as usize] = i as u8;
        i += 1;
    }
    slots
};

const _: () = assert!(STATUS_SLOTS < u8::MAX as usize, "status slots fit the u8 table");

fn status_slot(status: u16) -> usize {
    match STATUS_SLOT.get(usize::from(status)) {
        Some(&slot) if slot != u8::MAX => usize::from(slot),
        _ => STATUSES.len(),
    }
}

fn method_slot(method: &str) -> usize {
    METHODS[..METHODS.len() - 1].iter().position(|m| *m == method).unwrap_or(METHODS.len() - 1)
}

/// The counters and latency of one route.
struct RouteMetrics {
    /// Set once, by the route's first request.
    name: OnceLock<Box<str>>,
    requests: [[AtomicU64; STATUS_SLOTS]; METHODS.len()],
    latency: Histogram,
}

impl RouteMetrics {
    fn new() -> RouteMetrics {
        RouteMetrics {
            name: OnceLock::new(),
            requests: [const { [const { AtomicU64::new(0) }; STATUS_SLOTS] }; METHODS.len()],
            latency: Histogram::default(),
        }
    }

    fn name(&self) -> &str {
        self.name.get().map_or("other", |name| name)
    }
}

/// Every metric of a node.
pub struct Metrics {
    /// [`ROUTES_MAX`] slots claimed in order, then the slot of `other`.
    routes: Box<[RouteMetrics]>,
    /// Taken only to claim a route's slot.
    claiming: Mutex<()>,
    /// Requests refused by load shedding.
    pub shed: AtomicU64,
    /// Requests that ran past the request timeout.
    pub timed_out: AtomicU64,
    /// Requests refused for a missing or wrong token.
    pub unauthorized: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let routes: Vec<&str> = self.claimed().iter().map(RouteMetrics::name).collect();
        f.debug_struct("Metrics").field("routes", &routes).finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            routes: (0..=ROUTES_MAX).map(|_| RouteMetrics::new()).collect(),
            claiming: Mutex::new(()),
            shed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// The claimed route slots, in the order they were claimed.
    fn claimed(&self) -> &[RouteMetrics] {
        let claimed = self.routes[..ROUTES_MAX].iter().take_while(|r| r.name.get().is_some());
        &self.routes[..claimed.count()]
    }

    /// The slot of `route`: a scan of the claimed slots (no lock); on a route's
    /// first request, a claim under the lock.
    fn route(&self, route: &str) -> &RouteMetrics {
        if let Some(found) = self.claimed().iter().find(|r| r.name() == route) {
            return found;
        }
        let _claiming = self.claiming.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in &self.routes[..ROUTES_MAX] {
            match slot.name.get() {
                Some(name) if **name == *route => return slot,
                Some(_) => continue,
                None => {
                    // Under the lock no one else claims: the set succeeds.
                    let _ = slot.name.set(route.into());
                    return slot;
                }
            }
        }
        &self.routes[ROUTES_MAX]
    }

    /// Records one finished HTTP request: atomic increments, no allocation.
    pub fn record_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let slot = self.route(route);
        slot.requests[method_slot(method)][status_slot(status)].fetch_add(1, Ordering::Relaxed);
        slot.latency.observe(elapsed);
    }

    /// The latency histogram of a route, if it has served a request.
    pub fn route_latency(&self, route: &str) -> Option<&Histogram> {
        self.claimed().iter().find(|r| r.name() == route).map(|r| &r.latency)
    }

    /// The routes with requests, by name (`other` last, when it has any).
    fn routes_by_name(&self) -> Vec<&RouteMetrics> {
        let mut routes: Vec<&RouteMetrics> = self.claimed().iter().collect();
        routes.sort_by(|a, b| a.name().cmp(b.name()));
        let other = &self.routes[ROUTES_MAX];
        if other.latency.count() > 0 {
            routes.push(other);
        }
        routes
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
        let routes = self.routes_by_name();
        for route in &routes {
            let name = route.name();
            for (method, counts) in METHODS.iter().zip(&route.requests) {
                for (slot, count) in counts.iter().enumerate() {
                    let n = count.load(Ordering::Relaxed);
                    if n == 0 {
                        continue;
                    }
                    let status = STATUSES.get(slot).map_or("other".to_string(), u16::to_string);
                    let _ = writeln!(
                        out,
                        "calmkv_http_requests_total{{route=\"{name}\",method=\"{method}\",status=\"{status}\"}} {n}"
                    );
                }
            }
        }
        let latency: Vec<(String, &Histogram)> =
            routes.iter().map(|r| (format!("route=\"{}\"", r.name()), &r.latency)).collect();
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
    use std::collections::BTreeMap;

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

    /// Methods and statuses outside the fixed tables, and routes past
    /// `ROUTES_MAX`, are counted (as `OTHER`, `other`, `other`), never dropped,
    /// and never add series: the table is bounded whatever clients send.
    #[test]
    fn unknown_methods_statuses_and_routes_past_the_bound_count_as_other() {
        let m = Metrics::default();
        m.record_request("/a", "BREW", 299, Duration::from_micros(10));
        m.record_request("/a", "GET", 200, Duration::from_micros(10));
        m.record_request("/a", "GET", 200, Duration::from_micros(10));
        for i in 0..ROUTES_MAX + 5 {
            m.record_request(&format!("/r{i}"), "PUT", 204, Duration::from_micros(10));
        }
        let text = m.render(&[], &[]);
        assert!(text.contains(
            "calmkv_http_requests_total{route=\"/a\",method=\"OTHER\",status=\"other\"} 1"
        ));
        assert!(text
            .contains("calmkv_http_requests_total{route=\"/a\",method=\"GET\",status=\"200\"} 2"));
        // `/a` took one slot, so 31 of the 37 other routes got one; 6 are `other`.
        assert!(text.contains(
            "calmkv_http_requests_total{route=\"other\",method=\"PUT\",status=\"204\"} 6"
        ));
        assert!(!text.contains("route=\"/r31\""), "{text}");
        assert!(text.contains("route=\"/r30\""));
        assert_eq!(m.route_latency("/a").map(Histogram::count), Some(3));
        assert!(m.route_latency("/r40").is_none());
    }

    #[test]
    fn every_status_of_the_table_has_its_own_slot() {
        let mut seen = std::collections::BTreeSet::new();
        for status in STATUSES {
            assert!(seen.insert(status_slot(status)), "{status} shares a slot");
            assert!(status_slot(status) < STATUSES.len());
        }
        for status in [0, 99, 199, 599, 600, u16::MAX] {
            assert_eq!(status_slot(status), STATUSES.len(), "{status}");
        }
    }
}
