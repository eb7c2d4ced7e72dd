//! Log-linear latency histogram, shared bucket arithmetic.
//!
//! Every power of two is split into [`SUB_BUCKETS_PER_OCTAVE`] equal-width buckets, as in
//! HdrHistogram. With 16 sub-buckets a bucket is at most 1/16 of its lower bound wide, so a
//! quantile read from it (interpolated inside the bucket) is within 6.25% of the truth,
//! against up to 100% for the log2 buckets of bcc's biolatency. Values are nanoseconds;
//! values below 32 ns get one bucket each, the last bucket starts at 31 x 2^30 ns (33 s)
//! and collects everything above it.

/// log2 of the number of linear sub-buckets per power of two.
pub const SUB_BUCKET_BITS: u32 = 4;
/// Linear sub-buckets in each power-of-two range.
pub const SUB_BUCKETS_PER_OCTAVE: u64 = 1 << SUB_BUCKET_BITS;
/// Number of buckets: covers 0 ns up to 2^35 ns (34 s) at full resolution.
pub const HISTOGRAM_BUCKETS: usize = 512;
/// Lower bound of the last bucket, which also takes every larger value.
pub const LAST_BUCKET_LOWER_BOUND_NS: u64 = bucket_lower_bound_ns(HISTOGRAM_BUCKETS - 1);

/// Per-CPU latency histogram as stored in eBPF maps; userspace merges the CPUs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LatencyHistogram {
    pub buckets: [u64; HISTOGRAM_BUCKETS],
    /// Number of samples recorded (the sum of `buckets`).
    pub count: u64,
    /// Sum of all samples in nanoseconds, for an exact mean.
    pub sum_ns: u64,
}

impl LatencyHistogram {
    pub const ZERO: Self = Self {
        buckets: [0; HISTOGRAM_BUCKETS],
        count: 0,
        sum_ns: 0,
    };
}

/// Floor of log2(value) for value > 0, without `leading_zeros`, which the BPF backend
/// cannot lower to a single instruction. Returns 0 for 0.
#[inline(always)]
pub const fn floor_log2(value: u64) -> u32 {
    let mut v = value;
    let mut log = 0;
    if v >= 1 << 32 {
        v >>= 32;
        log += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        log += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        log += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        log += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        log += 2;
    }
    if v >= 1 << 1 {
        log += 1;
    }
    log
}

/// Index of the bucket that holds `value_ns`, always below [`HISTOGRAM_BUCKETS`].
#[inline(always)]
pub const fn bucket_index(value_ns: u64) -> usize {
    if value_ns < 2 * SUB_BUCKETS_PER_OCTAVE {
        return value_ns as usize;
    }
    let shift = floor_log2(value_ns) - SUB_BUCKET_BITS;
    // value >> shift lies in [16, 32): the sub-bucket plus one octave of offset.
    let index = (shift as u64) * SUB_BUCKETS_PER_OCTAVE + (value_ns >> shift);
    if index >= HISTOGRAM_BUCKETS as u64 {
        HISTOGRAM_BUCKETS - 1
    } else {
        index as usize
    }
}

/// Smallest value (ns) that falls into bucket `index`.
pub const fn bucket_lower_bound_ns(index: usize) -> u64 {
    let index = index as u64;
    if index < 2 * SUB_BUCKETS_PER_OCTAVE {
        return index;
    }
    let shift = index / SUB_BUCKETS_PER_OCTAVE - 1;
    let mantissa = index % SUB_BUCKETS_PER_OCTAVE + SUB_BUCKETS_PER_OCTAVE;
    mantissa << shift
}

/// First value (ns) past bucket `index` (exclusive upper bound).
pub const fn bucket_upper_bound_ns(index: usize) -> u64 {
    bucket_lower_bound_ns(index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_log2_matches_leading_zeros() {
        for shift in 0..64 {
            for v in [
                1u64 << shift,
                (1u64 << shift) | 1,
                (1u64 << shift).wrapping_mul(3) / 2,
            ] {
                if v == 0 {
                    continue;
                }
                assert_eq!(floor_log2(v), 63 - v.leading_zeros(), "value {v}");
            }
        }
        assert_eq!(floor_log2(u64::MAX), 63);
    }

    #[test]
    fn small_values_get_exact_buckets() {
        for v in 0..32 {
            assert_eq!(bucket_index(v), v as usize);
            assert_eq!(bucket_lower_bound_ns(v as usize), v);
        }
    }

    #[test]
    fn every_value_lies_inside_its_bucket() {
        let mut v = 1u64;
        while v < LAST_BUCKET_LOWER_BOUND_NS {
            for probe in [v, v + v / 3, v + v / 2, 2 * v - 1] {
                let index = bucket_index(probe);
                assert!(
                    bucket_lower_bound_ns(index) <= probe,
                    "value {probe} index {index}"
                );
                assert!(
                    probe < bucket_upper_bound_ns(index),
                    "value {probe} index {index}"
                );
            }
            v *= 2;
        }
    }

    #[test]
    fn buckets_are_contiguous_and_increasing() {
        for index in 0..HISTOGRAM_BUCKETS - 1 {
            assert_eq!(
                bucket_upper_bound_ns(index),
                bucket_lower_bound_ns(index + 1)
            );
            assert!(bucket_lower_bound_ns(index) < bucket_lower_bound_ns(index + 1));
            assert_eq!(bucket_index(bucket_lower_bound_ns(index)), index);
        }
    }

    #[test]
    fn bucket_width_is_at_most_a_sixteenth_of_its_lower_bound_from_one_microsecond() {
        for index in bucket_index(1_000)..HISTOGRAM_BUCKETS - 1 {
            let lower = bucket_lower_bound_ns(index);
            let width = bucket_upper_bound_ns(index) - lower;
            assert!(width * 16 <= lower, "bucket {index}: [{lower}, +{width})");
        }
    }

    #[test]
    fn range_covers_ten_seconds_at_full_resolution() {
        const { assert!(LAST_BUCKET_LOWER_BOUND_NS > 10_000_000_000) };
        assert_eq!(LAST_BUCKET_LOWER_BOUND_NS, 31 << 30);
        assert_eq!(bucket_index(u64::MAX), HISTOGRAM_BUCKETS - 1);
        assert_eq!(bucket_index(10_000_000_000), 482);
    }
}
