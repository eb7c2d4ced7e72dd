//! Helpers shared by the probe families: tracepoint offsets, histogram recording, context.
use agent_common::{
    histogram::{HISTOGRAM_BUCKETS, LatencyHistogram, bucket_index},
    tracepoint::TracepointOffsets,
};
use aya_ebpf::{macros::map, maps::PerCpuArray};

/// Field offsets, overwritten by userspace at load time from the live format files.
#[unsafe(no_mangle)]
pub static TRACEPOINT_OFFSETS: TracepointOffsets = TracepointOffsets::LINUX_6_18;

/// Reads one offset. The volatile read stops the compiler from folding the default value in:
/// userspace rewrites the global in the object's .rodata before loading.
macro_rules! offset {
    ($field:ident) => {
        $crate::probes::shared::read_offset(core::ptr::addr_of!(
            $crate::probes::shared::TRACEPOINT_OFFSETS.$field
        ))
    };
}
pub(crate) use offset;

#[inline(always)]
pub fn read_offset(field: *const u16) -> usize {
    // SAFETY: `field` points into a static that lives as long as the program.
    unsafe { core::ptr::read_volatile(field) as usize }
}

/// A zeroed histogram to insert from: 4 KiB does not fit on the 512-byte eBPF stack.
#[map]
static ZERO_HISTOGRAM: PerCpuArray<LatencyHistogram> = PerCpuArray::with_max_entries(1, 0);

/// Insert only if absent, so two CPUs racing to create a key do not clobber each other.
pub const BPF_NOEXIST: u64 = 1;

/// Returns a pointer to the zeroed histogram, for inserting a new key.
#[inline(always)]
pub fn zero_histogram() -> Option<&'static LatencyHistogram> {
    ZERO_HISTOGRAM.get(0)
}

/// Adds one sample to a histogram that lives in a per-CPU map value.
#[inline(always)]
pub fn add_sample(histogram: *mut LatencyHistogram, value_ns: u64) {
    let index = bucket_index(value_ns);
    // SAFETY: the pointer comes from a successful map lookup and is this CPU's slot.
    unsafe {
        if index < HISTOGRAM_BUCKETS {
            (*histogram).buckets[index] += 1;
        }
        (*histogram).count += 1;
        (*histogram).sum_ns += value_ns;
    }
}

/// Finds the value for `$key` in a per-CPU hash map, inserting `$zero` first when missing.
macro_rules! get_or_insert {
    ($map:expr, $key:expr, $zero:expr) => {
        match $map.get_ptr_mut($key) {
            Some(value) => Some(value),
            None => {
                let _ = $map.insert($key, $zero, $crate::probes::shared::BPF_NOEXIST);
                $map.get_ptr_mut($key)
            }
        }
    };
}
pub(crate) use get_or_insert;

/// Records `value_ns` into the histogram of `$key` in `$map`.
macro_rules! record_latency {
    ($map:expr, $key:expr, $value_ns:expr) => {
        if let Some(zero) = $crate::probes::shared::zero_histogram() {
            if let Some(histogram) = $crate::probes::shared::get_or_insert!($map, $key, zero) {
                $crate::probes::shared::add_sample(histogram, $value_ns);
            }
        }
    };
}
pub(crate) use record_latency;
