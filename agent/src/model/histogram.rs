//! Merged latency histograms: per-CPU merging, deltas between reads, quantiles.
use agent_common::histogram::{
    HISTOGRAM_BUCKETS, LatencyHistogram, bucket_lower_bound_ns, bucket_upper_bound_ns,
};

/// A latency distribution merged across CPUs, in the kernel's log-linear buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    buckets: Box<[u64; HISTOGRAM_BUCKETS]>,
    count: u64,
    sum_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: Box::new([0; HISTOGRAM_BUCKETS]),
            count: 0,
            sum_ns: 0,
        }
    }
}

impl Histogram {
    /// Merges the per-CPU copies that the kernel keeps.
    pub fn from_per_cpu<'a>(per_cpu: impl IntoIterator<Item = &'a LatencyHistogram>) -> Self {
        let mut merged = Self::default();
        for cpu in per_cpu {
            for (total, value) in merged.buckets.iter_mut().zip(cpu.buckets.iter()) {
                *total += value;
            }
            merged.count += cpu.count;
            merged.sum_ns += cpu.sum_ns;
        }
        merged
    }

    /// Builds a histogram from raw samples (tests, synthetic inputs).
    pub fn from_samples_ns(samples: impl IntoIterator<Item = u64>) -> Self {
        let mut histogram = Self::default();
        for sample in samples {
            histogram.record_ns(sample);
        }
        histogram
    }

    pub fn record_ns(&mut self, value_ns: u64) {
        self.buckets[agent_common::histogram::bucket_index(value_ns)] += 1;
        self.count += 1;
        self.sum_ns += value_ns;
    }

    pub fn add(&mut self, other: &Histogram) {
        for (total, value) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *total += value;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
    }

    /// What was recorded since `earlier`. The kernel's counters only grow, so a bucket that
    /// went down means the entry was evicted and recreated: the new value is then the delta.
    pub fn delta_since(&self, earlier: &Histogram) -> Histogram {
        if self.count < earlier.count
            || self
                .buckets
                .iter()
                .zip(earlier.buckets.iter())
                .any(|(now, before)| now < before)
        {
            return self.clone();
        }
        let mut delta = Histogram::default();
        for ((out, now), before) in delta
            .buckets
            .iter_mut()
            .zip(self.buckets.iter())
            .zip(earlier.buckets.iter())
        {
            *out = now - before;
        }
        delta.count = self.count - earlier.count;
        delta.sum_ns = self.sum_ns.saturating_sub(earlier.sum_ns);
        delta
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Counts re-bucketed onto explicit upper bounds (OTLP style: bucket i holds values in
    /// (bounds[i-1], bounds[i]], plus one overflow bucket). Each kernel bucket goes whole to
    /// the bucket holding its midpoint, so a bound that is not a kernel bucket edge is off by
    /// at most one kernel bucket (6.25%). O(kernel buckets), whatever the number of events.
    pub fn rebucket_ns(&self, upper_bounds_ns: &[f64]) -> Vec<u64> {
        let mut counts = vec![0u64; upper_bounds_ns.len() + 1];
        for (index, &in_bucket) in self.buckets.iter().enumerate() {
            if in_bucket == 0 {
                continue;
            }
            let midpoint =
                (bucket_lower_bound_ns(index) as f64 + bucket_upper_bound_ns(index) as f64) / 2.0;
            let target = upper_bounds_ns.partition_point(|&bound| bound < midpoint);
            counts[target] += in_bucket;
        }
        counts
    }

    pub fn sum_ns(&self) -> u64 {
        self.sum_ns
    }

    pub fn mean_ns(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_ns as f64 / self.count as f64)
    }

    /// The `quantile` (0..=1) in nanoseconds, interpolated linearly inside its bucket, or
    /// None without samples. Bucket counts, not `count`, are the ground truth here: the two
    /// can differ by a sample or two when a read races a CPU updating its copy.
    pub fn quantile_ns(&self, quantile: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = quantile.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (index, &in_bucket) in self.buckets.iter().enumerate() {
            if in_bucket == 0 {
                continue;
            }
            if (below + in_bucket) as f64 >= rank {
                let lower = bucket_lower_bound_ns(index) as f64;
                let upper = bucket_upper_bound_ns(index) as f64;
                let fraction = ((rank - below as f64) / in_bucket as f64).clamp(0.0, 1.0);
                return Some(lower + fraction * (upper - lower));
            }
            below += in_bucket;
        }
        // Unreachable while rank <= total; keep a sane answer rather than panic.
        Some(bucket_lower_bound_ns(HISTOGRAM_BUCKETS - 1) as f64)
    }

    pub fn quantile_ms(&self, quantile: f64) -> Option<f64> {
        self.quantile_ns(quantile).map(|ns| ns / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebucketing_keeps_every_sample_and_respects_the_bounds() {
        // 100 samples at 1 ms, 50 at 20 ms, 10 at 3 s.
        let histogram = Histogram::from_samples_ns(
            std::iter::repeat_n(1_000_000, 100)
                .chain(std::iter::repeat_n(20_000_000, 50))
                .chain(std::iter::repeat_n(3_000_000_000, 10)),
        );
        let counts = histogram.rebucket_ns(&[5e6, 10e6, 100e6, 1e9]);
        assert_eq!(counts, vec![100, 0, 50, 0, 10]);
        assert_eq!(counts.iter().sum::<u64>(), histogram.count());
    }

    /// Exact quantile of a sorted sample set (nearest rank).
    fn exact_quantile(sorted: &[u64], quantile: f64) -> f64 {
        let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64
    }

    /// A deterministic pseudo-random sequence, so the test needs no extra crate.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn quantiles_are_within_ten_percent_over_the_whole_range() {
        let mut seed = 7;
        // Log-uniform samples from 1 us to 10 s: every octave gets exercised.
        let mut samples: Vec<u64> = (0..200_000)
            .map(|_| {
                let exponent = (lcg(&mut seed) % 1_000_000) as f64 / 1_000_000.0 * 7.0;
                (1_000.0 * 10f64.powf(exponent)) as u64
            })
            .collect();
        let histogram = Histogram::from_samples_ns(samples.iter().copied());
        samples.sort_unstable();
        for quantile in [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999] {
            let truth = exact_quantile(&samples, quantile);
            let estimate = histogram.quantile_ns(quantile).unwrap();
            let error = (estimate - truth).abs() / truth;
            assert!(
                error < 0.10,
                "q{quantile}: estimate {estimate} truth {truth}"
            );
        }
    }

    #[test]
    fn a_single_value_is_reported_within_its_bucket() {
        for value in [1_000u64, 1_500, 84_000_000, 9_999_999_999] {
            let histogram = Histogram::from_samples_ns(std::iter::repeat_n(value, 100));
            for quantile in [0.5, 0.95, 0.99] {
                let estimate = histogram.quantile_ns(quantile).unwrap();
                let error = (estimate - value as f64).abs() / value as f64;
                assert!(error <= 1.0 / 16.0, "{value}: {estimate}");
            }
        }
    }

    #[test]
    fn bimodal_p95_lands_in_the_slow_mode() {
        // 90% at 100 us, 10% at 50 ms: log2 buckets would put P95 anywhere in [32, 64) ms.
        let samples =
            std::iter::repeat_n(100_000u64, 900).chain(std::iter::repeat_n(50_000_000, 100));
        let histogram = Histogram::from_samples_ns(samples);
        let p95 = histogram.quantile_ms(0.95).unwrap();
        assert!((p95 - 50.0).abs() / 50.0 < 0.0625, "p95 {p95}");
        let p50 = histogram.quantile_ms(0.5).unwrap();
        assert!((p50 - 0.1).abs() / 0.1 < 0.0625, "p50 {p50}");
    }

    #[test]
    fn empty_histogram_has_no_quantiles_or_mean() {
        let histogram = Histogram::default();
        assert_eq!(histogram.quantile_ns(0.5), None);
        assert_eq!(histogram.mean_ns(), None);
    }

    #[test]
    fn per_cpu_copies_merge_into_one_distribution() {
        let mut cpu0 = LatencyHistogram::ZERO;
        let mut cpu1 = LatencyHistogram::ZERO;
        cpu0.buckets[agent_common::histogram::bucket_index(1_000)] = 3;
        cpu0.count = 3;
        cpu0.sum_ns = 3_000;
        cpu1.buckets[agent_common::histogram::bucket_index(1_000)] = 2;
        cpu1.buckets[agent_common::histogram::bucket_index(2_000_000)] = 5;
        cpu1.count = 7;
        cpu1.sum_ns = 2_000 + 10_000_000;
        let merged = Histogram::from_per_cpu([&cpu0, &cpu1]);
        assert_eq!(merged.count(), 10);
        assert_eq!(merged.sum_ns(), 10_005_000);
        assert_eq!(merged.mean_ns(), Some(1_000_500.0));
        // Half the samples are at 1 us, half at 2 ms.
        assert!(merged.quantile_ns(0.4).unwrap() < 1_100.0);
        assert!(merged.quantile_ns(0.6).unwrap() > 1_900_000.0);
    }

    #[test]
    fn delta_subtracts_an_earlier_read() {
        let earlier = Histogram::from_samples_ns([1_000, 1_000, 5_000]);
        let mut later = earlier.clone();
        later.record_ns(5_000);
        later.record_ns(9_000_000);
        let delta = later.delta_since(&earlier);
        assert_eq!(delta.count(), 2);
        assert_eq!(delta.sum_ns(), 9_005_000);
        assert_eq!(delta, Histogram::from_samples_ns([5_000, 9_000_000]));
    }

    #[test]
    fn delta_after_eviction_is_the_new_value() {
        let earlier = Histogram::from_samples_ns([1_000, 1_000, 5_000]);
        let recreated = Histogram::from_samples_ns([7_000]);
        assert_eq!(recreated.delta_since(&earlier), recreated);
    }
}
