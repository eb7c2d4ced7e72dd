//! A window of a serving engine, from two scrapes of its `/metrics`: the increase of its
//! counters and histograms between them (an engine restart, any counter going down, counts
//! from zero), quantiles interpolated exactly as Prometheus's `histogram_quantile` does, and
//! its gauges as of the window's end. Absent figures are `None`, never 0.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::model::engine::{Catalogue, EngineKind, EngineScrape, HistogramName, MeanNames, Series};

/// One engine's window, as `diagnose` shows it (`engines[]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EngineSummary {
    pub workload: String,
    /// The endpoint, credentials removed.
    pub url: String,
    /// None until the endpoint has answered with metrics envelope recognises.
    pub engine: Option<EngineKind>,
    /// The model label's values (several joined with ", "), where the engine has the label.
    pub model: Option<String>,
    /// Requests finished in the window and their rate.
    pub requests: Option<u64>,
    pub rate_per_s: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p95_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    /// Mean end-to-end time: the only latency figure of engines that export sums and counts
    /// instead of histograms (Triton).
    pub e2e_mean_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub tpot_p95_ms: Option<f64>,
    /// Mean time per output token (llama.cpp: slot seconds over tokens).
    pub tpot_mean_ms: Option<f64>,
    pub queue_p95_ms: Option<f64>,
    pub queue_mean_ms: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub generation_tokens: Option<u64>,
    /// Prompt and generated tokens per second over the window.
    pub tokens_per_s: Option<f64>,
    /// Prefix-cache hits over lookups in the window, 0-1.
    pub prefix_cache_hit_rate: Option<f64>,
    /// KV-cache blocks in use, 0-1, at the window's end.
    pub kv_cache_usage: Option<f64>,
    /// Requests running and waiting at the window's end.
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    /// Why there are no figures this window (the endpoint is slow, down, oversized or not an
    /// engine's); null when fresh.
    pub stale: Option<String>,
    /// The engine's counters went down since the last scrape (a restart): the window counts
    /// from the restart.
    pub restarted: bool,
    /// The window's end-to-end and first-token buckets, `(upper bound in seconds, requests
    /// in that bucket and below)`: what a budget that counts requests reads.
    #[serde(skip)]
    pub e2e_buckets: Vec<(f64, f64)>,
    #[serde(skip)]
    pub ttft_buckets: Vec<(f64, f64)>,
}

/// How many of a window's requests took at most `bound_s`, from cumulative `(le, count)`
/// buckets, interpolated inside the bucket that holds the bound as `histogram_quantile`
/// interpolates (uniform within a bucket, the lowest one starting at 0). None without
/// observations or a +Inf bucket.
pub fn count_at_most(buckets: &[(f64, f64)], bound_s: f64) -> Option<f64> {
    let total = buckets.last().filter(|(le, _)| *le == f64::INFINITY)?.1;
    if total <= 0.0 {
        return None;
    }
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if bound_s < le {
            if le == f64::INFINITY {
                return Some(lower.1); // above the highest finite bound: all of those below it
            }
            let fraction = ((bound_s - lower.0) / (le - lower.0)).clamp(0.0, 1.0);
            return Some(lower.1 + (count - lower.1) * fraction);
        }
        lower = (le, count);
    }
    Some(total)
}

impl EngineSummary {
    pub fn stale(workload: &str, url: &str, engine: Option<EngineKind>, reason: String) -> Self {
        Self {
            workload: workload.to_string(),
            url: url.to_string(),
            engine,
            stale: Some(reason),
            ..Self::default()
        }
    }
}

/// `histogram_quantile(q, ...)` over cumulative `(le, count)` buckets, as Prometheus computes
/// it (promql/quantile.go): buckets sorted by bound, equal bounds merged, counts forced
/// monotonic; none without a +Inf bucket, with fewer than two buckets or no observations;
/// linear interpolation inside the bucket that holds the rank, the lowest bucket starting at
/// 0; a rank in the +Inf bucket gives the highest finite bound.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    if !(0.0..=1.0).contains(&q) {
        return None;
    }
    let mut sorted: Vec<(f64, f64)> = buckets.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(sorted.len());
    for (bound, count) in sorted {
        match merged.last_mut() {
            Some(last) if last.0 == bound => last.1 += count,
            _ => merged.push((bound, count)),
        }
    }
    let last = merged.last()?;
    if merged.len() < 2 || last.0 != f64::INFINITY {
        return None;
    }
    for i in 1..merged.len() {
        if merged[i].1 < merged[i - 1].1 {
            merged[i].1 = merged[i - 1].1;
        }
    }
    let observations = merged[merged.len() - 1].1;
    if observations <= 0.0 {
        return None;
    }
    let rank = q * observations;
    let b = merged.iter().position(|(_, count)| *count >= rank)?;
    if b == merged.len() - 1 {
        return Some(merged[merged.len() - 2].0);
    }
    if b == 0 && merged[0].0 <= 0.0 {
        return Some(merged[0].0);
    }
    let (start, count_before) = if b == 0 { (0.0, 0.0) } else { merged[b - 1] };
    let (end, count) = merged[b];
    let in_bucket = count - count_before;
    if in_bucket <= 0.0 {
        return Some(end);
    }
    Some(start + (end - start) * ((rank - count_before) / in_bucket))
}

/// A series' identity: its name and labels.
type SeriesKey<'a> = (&'a str, &'a [(String, String)]);

/// The increase of every series between two scrapes: from zero after a restart (any
/// counter went down) or for a series new since the last scrape (client libraries create
/// series at first use); gauges as they are.
struct Increase<'a> {
    series: Vec<(&'a Series, f64)>,
    has_previous: bool,
    restarted: bool,
}

impl<'a> Increase<'a> {
    fn new(
        previous: Option<&'a EngineScrape>,
        current: &'a EngineScrape,
        gauges: &BTreeSet<&str>,
    ) -> Self {
        let before: HashMap<SeriesKey, f64> = previous
            .iter()
            .flat_map(|scrape| &scrape.series)
            .map(|s| ((s.name.as_str(), s.labels.as_slice()), s.value))
            .collect();
        let value_before =
            |s: &Series| before.get(&(s.name.as_str(), s.labels.as_slice())).copied();
        let is_gauge = |s: &Series| gauges.contains(s.name.as_str());
        let restarted = current
            .series
            .iter()
            .any(|s| !is_gauge(s) && value_before(s).is_some_and(|b| s.value < b));
        let series = current
            .series
            .iter()
            .map(|s| {
                let increase = if is_gauge(s) || restarted {
                    s.value
                } else {
                    (s.value - value_before(s).unwrap_or(0.0)).max(0.0)
                };
                (s, increase)
            })
            .collect();
        Self {
            series,
            has_previous: previous.is_some(),
            restarted,
        }
    }

    fn named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = (&'a Series, f64)> + 's {
        self.series
            .iter()
            .filter(move |(s, _)| s.name == name)
            .copied()
    }

    fn present(&self, name: &str) -> bool {
        self.named(name).next().is_some()
    }

    /// A counter's increase summed over its series; None without a previous scrape or
    /// without the counter.
    fn counter(&self, name: &str) -> Option<f64> {
        (self.has_previous && self.present(name)).then(|| self.named(name).map(|(_, d)| d).sum())
    }

    /// The first of `names` the scrape has, as a counter.
    fn first_counter(&self, names: &[String]) -> Option<f64> {
        names
            .iter()
            .find(|name| self.present(name))
            .and_then(|name| self.counter(name))
    }

    /// A gauge summed over its series (running, waiting), or averaged (usage ratios).
    fn gauge(&self, names: &[String], average: bool) -> Option<f64> {
        let name = names.iter().find(|name| self.present(name))?;
        let values: Vec<f64> = self
            .named(name)
            .map(|(_, v)| v)
            .filter(|v| v.is_finite())
            .collect();
        if values.is_empty() {
            return None;
        }
        let sum: f64 = values.iter().sum();
        Some(if average {
            sum / values.len() as f64
        } else {
            sum
        })
    }

    /// The first of `histograms` the scrape has: its window buckets `(le, increase)` summed
    /// over its series (`sum by (le)`), and its sum and count increases.
    fn histogram<'h>(&self, histograms: &'h [HistogramName]) -> Option<WindowHistogram<'h>> {
        let histogram = histograms
            .iter()
            .find(|h| self.present(&format!("{}_bucket", h.name)))?;
        if !self.has_previous {
            return None;
        }
        let mut by_bound: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (series, increase) in self.named(&format!("{}_bucket", histogram.name)) {
            let Some(bound) = series.label("le").and_then(parse_bound) else {
                continue;
            };
            by_bound.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += increase;
        }
        Some(WindowHistogram {
            name: histogram,
            buckets: by_bound.into_values().collect(),
            sum: self.counter(&format!("{}_sum", histogram.name)),
            count: self.counter(&format!("{}_count", histogram.name)),
        })
    }
}

/// A histogram's increase over the window.
struct WindowHistogram<'h> {
    name: &'h HistogramName,
    buckets: Vec<(f64, f64)>,
    sum: Option<f64>,
    count: Option<f64>,
}

impl WindowHistogram<'_> {
    /// Cumulative buckets in seconds.
    fn cumulative_s(&self) -> Vec<(f64, f64)> {
        let mut total = 0.0;
        self.buckets
            .iter()
            .map(|(le, count)| {
                total = f64::max(total, *count);
                (le * self.name.seconds_per_unit, total)
            })
            .collect()
    }

    /// The quantile in milliseconds.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        histogram_quantile(q, &self.buckets).map(|v| round_ms(v * self.name.seconds_per_unit * 1e3))
    }

    fn mean_ms(&self) -> Option<f64> {
        mean_ms(self.sum?, self.count?, self.name.seconds_per_unit)
    }
}

fn mean_ms(sum: f64, count: f64, seconds_per_unit: f64) -> Option<f64> {
    (count > 0.0).then(|| round_ms(sum / count * seconds_per_unit * 1e3))
}

/// Milliseconds to the microsecond.
fn round_ms(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

/// A bucket bound as the exposition writes it (`0.5`, `+Inf`).
fn parse_bound(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        _ => text.parse().ok().filter(|v: &f64| !v.is_nan()),
    }
}

/// The engine's window from the scrape at its start (None: the first) and at its end.
pub fn summarize_engine(
    workload: &str,
    url: &str,
    catalogue: &Catalogue,
    previous: Option<&EngineScrape>,
    current: &EngineScrape,
) -> EngineSummary {
    let gauges: BTreeSet<&str> = [
        &catalogue.cache_hit_rate,
        &catalogue.kv_cache_usage,
        &catalogue.running,
        &catalogue.waiting,
    ]
    .into_iter()
    .flatten()
    .map(String::as_str)
    .collect();
    let increase = Increase::new(previous, current, &gauges);
    let e2e = increase.histogram(&catalogue.e2e);
    let ttft = increase.histogram(&catalogue.ttft);
    let tpot = increase.histogram(&catalogue.tpot);
    let queue = increase.histogram(&catalogue.queue);
    let quantile = |h: &Option<WindowHistogram>, q| h.as_ref().and_then(|h| h.quantile_ms(q));
    let mean = |h: &Option<WindowHistogram>, names: &Option<MeanNames>| {
        h.as_ref().and_then(WindowHistogram::mean_ms).or_else(|| {
            let names = names.as_ref()?;
            mean_ms(
                increase.counter(&names.sum)?,
                increase.counter(&names.count)?,
                names.seconds_per_unit,
            )
        })
    };
    let requests = increase
        .first_counter(&catalogue.requests)
        .or_else(|| e2e.as_ref().and_then(|h| h.count));
    let seconds = previous.map(|p| current.at_s - p.at_s).filter(|s| *s > 0.0);
    let hit_rate = match (
        increase.first_counter(&catalogue.cache_hits),
        increase.first_counter(&catalogue.cache_queries),
    ) {
        (Some(hits), Some(queries)) if queries > 0.0 => Some((hits / queries).clamp(0.0, 1.0)),
        _ => increase.gauge(&catalogue.cache_hit_rate, true),
    };
    let models: BTreeSet<&str> = catalogue
        .model_label
        .map(|label| {
            current
                .series
                .iter()
                .filter_map(|s| s.label(label))
                .collect()
        })
        .unwrap_or_default();
    let count = |value: Option<f64>| value.map(|v| v.round() as u64);
    let prompt_tokens = increase.first_counter(&catalogue.prompt_tokens);
    let generation_tokens = increase.first_counter(&catalogue.generation_tokens);
    EngineSummary {
        workload: workload.to_string(),
        url: url.to_string(),
        engine: Some(catalogue.engine),
        model: (!models.is_empty()).then(|| models.into_iter().collect::<Vec<_>>().join(", ")),
        requests: count(requests),
        rate_per_s: requests
            .zip(seconds)
            .map(|(n, s)| (n / s * 1000.0).round() / 1000.0),
        e2e_p50_ms: quantile(&e2e, 0.50),
        e2e_p95_ms: quantile(&e2e, 0.95),
        e2e_p99_ms: quantile(&e2e, 0.99),
        e2e_mean_ms: mean(&e2e, &catalogue.e2e_mean),
        ttft_p50_ms: quantile(&ttft, 0.50),
        ttft_p95_ms: quantile(&ttft, 0.95),
        ttft_p99_ms: quantile(&ttft, 0.99),
        tpot_p95_ms: quantile(&tpot, 0.95),
        tpot_mean_ms: mean(&tpot, &catalogue.tpot_mean),
        queue_p95_ms: quantile(&queue, 0.95),
        queue_mean_ms: mean(&queue, &catalogue.queue_mean),
        prompt_tokens: count(prompt_tokens),
        generation_tokens: count(generation_tokens),
        tokens_per_s: match (prompt_tokens, generation_tokens) {
            (None, None) => None,
            (p, g) => seconds
                .map(|s| ((p.unwrap_or(0.0) + g.unwrap_or(0.0)) / s * 1000.0).round() / 1000.0),
        },
        prefix_cache_hit_rate: hit_rate.map(|r| (r * 1e4).round() / 1e4),
        kv_cache_usage: increase.gauge(&catalogue.kv_cache_usage, true),
        running: increase.gauge(&catalogue.running, false),
        waiting: increase.gauge(&catalogue.waiting, false),
        stale: None,
        restarted: increase.restarted,
        e2e_buckets: e2e
            .as_ref()
            .map(WindowHistogram::cumulative_s)
            .unwrap_or_default(),
        ttft_buckets: ttft
            .as_ref()
            .map(WindowHistogram::cumulative_s)
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::engine::Series;

    fn series(name: &str, labels: &[(&str, &str)], value: f64) -> Series {
        Series {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    /// vLLM's e2e histogram (bounds 0.5, 1, 2.5, +Inf) with cumulative `counts`, plus a
    /// success counter, tokens and gauges.
    fn vllm(at_s: f64, counts: [f64; 4], sum: f64, tokens: f64, running: f64) -> EngineScrape {
        let model = ("model_name", "llama");
        let mut all: Vec<Series> = ["0.5", "1.0", "2.5", "+Inf"]
            .iter()
            .zip(counts)
            .map(|(le, count)| {
                series(
                    "vllm:e2e_request_latency_seconds_bucket",
                    &[("le", le), model],
                    count,
                )
            })
            .collect();
        all.push(series(
            "vllm:e2e_request_latency_seconds_sum",
            &[model],
            sum,
        ));
        all.push(series(
            "vllm:e2e_request_latency_seconds_count",
            &[model],
            counts[3],
        ));
        all.push(series(
            "vllm:request_success_total",
            &[("finished_reason", "stop"), model],
            counts[3],
        ));
        all.push(series("vllm:generation_tokens_total", &[model], tokens));
        all.push(series(
            "vllm:prefix_cache_queries_total",
            &[model],
            tokens * 2.0,
        ));
        all.push(series("vllm:prefix_cache_hits_total", &[model], tokens));
        all.push(series("vllm:num_requests_running", &[model], running));
        EngineScrape {
            at_s,
            series: all,
            unreadable_lines: 0,
        }
    }

    #[test]
    fn quantiles_interpolate_exactly_as_prometheus_histogram_quantile() {
        let buckets = [
            (0.1, 10.0),
            (0.5, 60.0),
            (1.0, 90.0),
            (f64::INFINITY, 100.0),
        ];
        // rank 50 in (0.1, 0.5]: 0.1 + 0.4 * (50 - 10) / 50
        assert_eq!(
            histogram_quantile(0.5, &buckets),
            Some(0.1 + 0.4 * 40.0 / 50.0)
        );
        // rank 5 in the lowest bucket, which starts at 0.
        assert_eq!(histogram_quantile(0.05, &buckets), Some(0.05));
        // rank 90 exactly at 1.0's count.
        assert_eq!(histogram_quantile(0.9, &buckets), Some(1.0));
        // rank 95 in +Inf: the highest finite bound.
        assert_eq!(histogram_quantile(0.95, &buckets), Some(1.0));
        // Unsorted input, a duplicate bound merged, a non-monotonic count forced up.
        let messy = [(f64::INFINITY, 4.0), (1.0, 1.0), (2.0, 0.5), (1.0, 1.0)];
        assert_eq!(histogram_quantile(0.5, &messy), Some(1.0));
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 5.0), (2.0, 10.0)]),
            None,
            "no +Inf"
        );
        assert_eq!(
            histogram_quantile(0.5, &[(f64::INFINITY, 5.0)]),
            None,
            "one bucket"
        );
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
    }

    #[test]
    fn a_window_is_the_increase_between_two_scrapes() {
        let before = vllm(100.0, [1.0, 2.0, 3.0, 3.0], 2.0, 100.0, 2.0);
        // 20 more requests: 4 <= 0.5 s, 6 in (0.5, 1], 8 in (1, 2.5], 2 above.
        let after = vllm(110.0, [5.0, 12.0, 21.0, 23.0], 32.0, 1100.0, 7.0);
        let catalogue = Catalogue::of(EngineKind::Vllm);
        let window = summarize_engine("llm", "http://x/metrics", &catalogue, Some(&before), &after);
        assert_eq!(window.requests, Some(20));
        assert_eq!(window.rate_per_s, Some(2.0));
        // P50: rank 10 in (0.5, 1] holding 6 after 4: 0.5 + 0.5 * 6 / 6 = 1.0 s.
        assert_eq!(window.e2e_p50_ms, Some(1000.0));
        // P95: rank 19 in (1, 2.5] holding 8 after 10: 1 + 1.5 * 9 / 8 -> capped by the bucket
        // (rank 19 > 18): the +Inf bucket, so the highest finite bound.
        assert_eq!(window.e2e_p95_ms, Some(2500.0));
        // P25: rank 5 in (0.5, 1]: 0.5 + 0.5 * 1 / 6.
        let p25 = histogram_quantile(
            0.25,
            &[(0.5, 4.0), (1.0, 10.0), (2.5, 18.0), (f64::INFINITY, 20.0)],
        );
        assert_eq!(p25, Some(0.5 + 0.5 / 6.0));
        assert_eq!(window.e2e_mean_ms, Some(1500.0), "30 s over 20 requests");
        assert_eq!(window.generation_tokens, Some(1000));
        assert_eq!(window.prefix_cache_hit_rate, Some(0.5));
        assert_eq!(
            window.running,
            Some(7.0),
            "a gauge is its value, not an increase"
        );
        assert_eq!(window.model.as_deref(), Some("llama"));
        assert_eq!(
            (window.ttft_p95_ms, window.prompt_tokens),
            (None, None),
            "absent, not 0"
        );
        assert!(!window.restarted);
    }

    #[test]
    fn requests_within_a_bound_are_counted_from_the_buckets_as_prometheus_interpolates() {
        // 4 <= 0.5 s, 6 in (0.5, 1], 8 in (1, 2.5], 2 above.
        let buckets = [(0.5, 4.0), (1.0, 10.0), (2.5, 18.0), (f64::INFINITY, 20.0)];
        assert_eq!(count_at_most(&buckets, 0.5), Some(4.0));
        assert_eq!(
            count_at_most(&buckets, 0.25),
            Some(2.0),
            "the lowest bucket starts at 0"
        );
        assert_eq!(count_at_most(&buckets, 0.75), Some(7.0), "half of (0.5, 1]");
        assert_eq!(
            count_at_most(&buckets, 10.0),
            Some(18.0),
            "the +Inf bucket's are above"
        );
        assert_eq!(
            count_at_most(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 1.0),
            None
        );
        let window = summarize_engine(
            "llm",
            "u",
            &Catalogue::of(EngineKind::Vllm),
            Some(&vllm(100.0, [1.0, 2.0, 3.0, 3.0], 2.0, 100.0, 2.0)),
            &vllm(110.0, [5.0, 12.0, 21.0, 23.0], 32.0, 1100.0, 7.0),
        );
        assert_eq!(
            window.e2e_buckets, buckets,
            "the window's increase, in seconds"
        );
    }

    #[test]
    fn an_engine_restart_counts_from_zero_instead_of_going_negative() {
        let before = vllm(100.0, [10.0, 20.0, 30.0, 30.0], 40.0, 5000.0, 2.0);
        let after = vllm(110.0, [2.0, 4.0, 4.0, 4.0], 3.0, 50.0, 1.0);
        let window = summarize_engine(
            "llm",
            "u",
            &Catalogue::of(EngineKind::Vllm),
            Some(&before),
            &after,
        );
        assert!(window.restarted);
        assert_eq!(window.requests, Some(4));
        assert_eq!(window.generation_tokens, Some(50));
        // 2 <= 0.5, 2 in (0.5, 1]: P50 rank 2 exactly at 0.5.
        assert_eq!(window.e2e_p50_ms, Some(500.0));
    }

    #[test]
    fn the_first_scrape_has_gauges_only() {
        let first = vllm(100.0, [1.0, 2.0, 3.0, 3.0], 2.0, 100.0, 2.0);
        let window = summarize_engine("llm", "u", &Catalogue::of(EngineKind::Vllm), None, &first);
        assert_eq!(
            (window.requests, window.e2e_p95_ms, window.rate_per_s),
            (None, None, None)
        );
        assert_eq!(window.running, Some(2.0));
    }

    #[test]
    fn triton_gives_means_from_cumulative_microseconds_labelled_as_means() {
        let scrape = |at_s, success, duration_us, queue_us| EngineScrape {
            at_s,
            series: vec![
                series(
                    "nv_inference_request_success",
                    &[("model", "resnet"), ("version", "1")],
                    success,
                ),
                series(
                    "nv_inference_request_duration_us",
                    &[("model", "resnet"), ("version", "1")],
                    duration_us,
                ),
                series(
                    "nv_inference_queue_duration_us",
                    &[("model", "resnet"), ("version", "1")],
                    queue_us,
                ),
                series(
                    "nv_inference_pending_request_count",
                    &[("model", "resnet"), ("version", "1")],
                    3.0,
                ),
            ],
            unreadable_lines: 0,
        };
        let window = summarize_engine(
            "vision",
            "u",
            &Catalogue::of(EngineKind::Triton),
            Some(&scrape(0.0, 100.0, 1_000_000.0, 50_000.0)),
            &scrape(5.0, 150.0, 3_500_000.0, 100_000.0),
        );
        assert_eq!(window.requests, Some(50));
        assert_eq!(window.e2e_mean_ms, Some(50.0), "2.5 s over 50 requests");
        assert_eq!(window.queue_mean_ms, Some(1.0));
        assert_eq!(window.e2e_p95_ms, None, "no histogram: no quantile");
        assert_eq!(window.waiting, Some(3.0));
        assert_eq!(window.model.as_deref(), Some("resnet"));
    }
}
